"""Hand-written references for the tests: recall from a checkpoint's weights, image PGD, in plain loops.

Nothing here calls the code under test (``recall_at_k``, ``PGD``, ``robust_retrieval``); the encoder is the model,
not the thing tested.
"""

from __future__ import annotations

from pathlib import Path

import torch
from test_retrieval import brute_force

__all__ = ["brute_force", "encoder_from_checkpoint", "hand_pgd_caption_cosine", "split_recall", "tr_r1_hits"]


def encoder_from_checkpoint(ckpt: str | Path | None, start: str | Path):
    """The tiny CLIP with the ``encoder.*`` weights of a Lightning checkpoint (other modules' keys ignored); the
    start weights ``start`` alone when ``ckpt`` is None."""
    from mat_lightning.models.encoder import OpenClipEncoder

    encoder = OpenClipEncoder("mat-tiny", pretrained=str(start)).eval()
    if ckpt is None:
        return encoder
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    encoder.load_state_dict(
        {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    )
    return encoder


@torch.no_grad()
def split_recall(encoder, images_uint8: torch.Tensor, captions: list[list[str]]) -> dict[str, float]:
    """Clean recall of a whole split by the definition (explicit loops), one caption list per image."""
    flat = [c for caps in captions for c in caps]
    txt2img = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    sim = encoder.encode_image(images_uint8.float() / 255) @ encoder.encode_text(flat).T
    return brute_force(sim, txt2img)


def tr_r1_hits(sim: torch.Tensor, txt2img: torch.Tensor) -> list[bool]:
    """Per image: is one of its captions the top-scoring caption (ties count against it)?"""
    hits = []
    for i in range(sim.shape[0]):
        own = [t for t in range(sim.shape[1]) if txt2img[t] == i]
        best_own = max(sim[i, t].item() for t in own)
        hits.append(all(sim[i, t].item() < best_own for t in range(sim.shape[1]) if t not in own))
    return hits


def hand_pgd_caption_cosine(
    encoder,
    images: torch.Tensor,
    captions: list[str],
    txt2img: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
) -> torch.Tensor:
    """L∞ sign-gradient ascent from the clean image on -(sum of the cosines of each image to its captions),
    projected to the eps-ball and [0, 1] after every step (Madry et al.; no random start)."""
    with torch.no_grad():
        text = encoder.encode_text(captions)
    adv = images.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        emb = encoder.encode_image(adv)
        loss = -sum((emb[int(txt2img[t])] * text[t]).sum() for t in range(len(captions)))
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + alpha * grad.sign()
            adv = torch.min(torch.max(adv, images - eps), images + eps).clamp(0, 1)
    return adv.detach()
