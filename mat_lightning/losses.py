"""The CLIP contrastive loss, multi-positive for 1:N batches, DDP-aware.

With one caption per image and no repeated image this is exactly CLIP's symmetric InfoNCE (cross-entropy over
``logit_scale * cos``; open_clip ``loss.py::ClipLoss``). With ``k`` captions per image (MAT+1:N) or an image present
twice (a T2I render beside its source), every caption of an image is a **positive, never a negative**: for each
positive pair (i, t) the softmax runs over that pair and the query's *negatives* only,

    l(i, t) = -log( exp(s_it) / (exp(s_it) + sum_{n not positive for i} exp(s_in)) ),

averaged over the positives of a query, then over queries, in both directions (image->text and text->image).
Positivity is read from image identity: caption t is positive for image i iff ``image_ids[i] == image_ids[txt2img[t]]``.

DDP follows open_clip's recommended setting (``local_loss=True, gather_with_grad=True``, issue #894): features are
all-gathered with autograd, each rank scores its *local* queries against the *global* gallery, and DDP's gradient
averaging then gives the same gradient as one process with the whole batch.

Mixed precision: every loss here computes its logits and reductions in float32 (autocast off, inputs upcast), so
``--trainer.precision=bf16-mixed`` runs the towers in bf16 but not the loss (:func:`fp32`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def fp32(like: Tensor) -> torch.autocast:
    """Autocast off on ``like``'s device: under ``bf16-mixed`` the losses run in float32.

    bf16 keeps 8 bits of mantissa: a cosine times logit scale 100 would be off by up to ~0.4 in the logits, and
    FARE's sum of squared differences over D dims would lose the small differences it is made of.
    """
    return torch.autocast(device_type=like.device.type, enabled=False)


def _directional(logits: Tensor, positive: Tensor) -> Tensor:
    """Mean over rows of the mean over each row's positives of -log p(pos | pos + negatives).

    logits: float[Q, G] (query x gallery); positive: bool[Q, G]. Rows without a positive are skipped.
    """
    neg_lse = logits.masked_fill(positive, float("-inf")).logsumexp(dim=1, keepdim=True)  # (Q, 1)
    per_pair = torch.logaddexp(logits, neg_lse) - logits  # (Q, G): -log softmax over {pair} + negatives
    n_pos = positive.sum(dim=1)
    per_row = (per_pair * positive).sum(dim=1) / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    return per_row[has_pos].mean() if has_pos.any() else logits.sum() * 0.0


def contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    txt2img: Tensor,
    image_ids: Tensor | None = None,
) -> Tensor:
    """Symmetric multi-positive InfoNCE on one process.

    Args:
        image_emb: float[B, D], L2-normalised.
        text_emb: float[T, D], L2-normalised.
        logit_scale: scalar temperature multiplier (already exponentiated).
        txt2img: long[T], the row of ``image_emb`` each caption belongs to.
        image_ids: long[B] identities of the images; equal ids are the same image (default: all distinct).

    Returns:
        Scalar: (L_image->text + L_text->image) / 2.
    """
    if image_ids is None:
        image_ids = torch.arange(image_emb.shape[0], device=image_emb.device)
    caption_ids = image_ids[txt2img]  # (T,)
    positive = image_ids[:, None] == caption_ids[None, :]  # (B, T)
    with fp32(image_emb):
        logits = logit_scale.float() * image_emb.float() @ text_emb.float().T  # (B, T)
        return (_directional(logits, positive) + _directional(logits.T, positive.T)) / 2


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient of the gathered tensor and returns this rank's
    slice (each input feeds every rank's loss). Written here because ``torch.distributed.nn.functional.all_gather``
    is deprecated (a warning per call) and its replacement is private."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 keeping the autograd graph (equal sizes on every rank); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def distributed_contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    txt2img: Tensor,
    image_ids: Tensor,
) -> Tensor:
    """:func:`contrastive_loss` over the union of all ranks' batches, scored locally (``local_loss``).

    Every rank must pass the same numbers of images and captions. ``image_ids`` must be globally meaningful (the
    dataset index), so that the same image on two ranks is recognised as a positive.
    On one process this is :func:`contrastive_loss`.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return contrastive_loss(image_emb, text_emb, logit_scale, txt2img, image_ids)
    all_img = gather_with_grad(image_emb)  # (W*B, D)
    all_txt = gather_with_grad(text_emb)  # (W*T, D)
    all_ids = gather_no_grad(image_ids)  # (W*B,)
    all_cap_ids = gather_no_grad(image_ids[txt2img])  # (W*T,)
    local_cap_ids = image_ids[txt2img]
    with fp32(image_emb):
        scale = logit_scale.float()
        i2t = scale * image_emb.float() @ all_txt.float().T  # (B, W*T)
        t2i = scale * text_emb.float() @ all_img.float().T  # (T, W*B)
        loss_i2t = _directional(i2t, image_ids[:, None] == all_cap_ids[None, :])
        loss_t2i = _directional(t2i, local_cap_ids[:, None] == all_ids[None, :])
        return (loss_i2t + loss_t2i) / 2


def fare_loss(embedding: Tensor, reference: Tensor) -> Tensor:
    """FARE's loss: squared L2 distance of unnormalised embeddings, summed over dims, mean over the batch."""
    with fp32(embedding):
        return (embedding.float() - reference.float()).pow(2).sum(dim=-1).mean()
