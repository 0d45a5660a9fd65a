"""Optional re-ranking of retrieval scores by the encoder (fusion models: BLIP's ITM head over each query's top-k).

An encoder opts in with a ``rerank(sim, images, captions) -> (i2t, t2i)`` method (and ``rerank_enabled`` not
False); see :class:`~mat_lightning.models.hf.BlipRetrievalEncoder`. Evaluation then keeps the split's (possibly
adversarial) images and captions next to the embeddings, in the embedding bank's canonical order, and computes text
retrieval ranks from ``i2t`` and image retrieval ranks from ``t2i``. Dual encoders (CLIP) are untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mat_lightning.eval.retrieval import RetrievalRanks, retrieval_ranks, similarity


def wants_rerank(encoder: object) -> bool:
    return (
        callable(getattr(encoder, "rerank", None)) and getattr(encoder, "rerank_enabled", True) is not False
    )


class PixelBank:
    """Images (float[B, 3, H, W], on the CPU) and captions of an evaluation split, batch by batch, in split order."""

    def __init__(self) -> None:
        self.items: list[tuple[Tensor, Tensor, list[str], Tensor]] = []

    def add(self, images: Tensor, image_ids: Tensor, captions: list[str], txt2img: Tensor) -> None:
        self.items.append((images.detach().float().cpu(), image_ids.cpu(), list(captions), txt2img.cpu()))

    def compute(self) -> tuple[Tensor, list[str]]:
        """(images in image-id order, captions in (image id, position) order): the order of ``EmbeddingBank``."""
        items = self.items
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, items)
            items = [it for part in parts for it in part]
        images: dict[int, Tensor] = {}
        captions: dict[int, list[str]] = {}
        for imgs, ids, caps, t2i in items:
            for b, image_id in enumerate(ids.tolist()):
                if image_id not in images:  # DistributedSampler may repeat an image: keep the first
                    images[image_id] = imgs[b]
                    captions[image_id] = [c for c, i in zip(caps, t2i.tolist(), strict=True) if i == b]
        order = sorted(images)
        return torch.stack([images[i] for i in order]), [c for i in order for c in captions[i]]


def ranks(
    encoder: object, img: Tensor, txt: Tensor, txt2img: Tensor, pixels: PixelBank | None = None
) -> RetrievalRanks:
    """Retrieval ranks of ``img @ txt.T``, re-ranked by the encoder when it asks for it (``pixels`` given)."""
    sim = similarity(img, txt)  # float32, also under a bf16 autocast
    if pixels is None or not wants_rerank(encoder):
        return retrieval_ranks(sim, txt2img)
    images, captions = pixels.compute()
    i2t, t2i = encoder.rerank(sim, images, captions)
    return RetrievalRanks(tr=retrieval_ranks(i2t, txt2img).tr, ir=retrieval_ranks(t2i, txt2img).ir)
