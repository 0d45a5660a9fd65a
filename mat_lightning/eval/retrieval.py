"""Image-text retrieval recall@K for 1:N data (any number of captions per image), and attack success.

Follows the Karpathy-split protocol of Co-Attack/SGA/CLIP_benchmark (DESIGN §3):

* **TR R@K** (text retrieval, image -> text): an image is a hit if *any* of its captions ranks in its top K.
* **IR R@K** (image retrieval, text -> image): a caption is a hit if its image ranks in its top K.

Values are percentages (0-100), as the papers print them. torchmetrics' ``RetrievalRecall`` is the IR-style
fraction of relevant items retrieved, which for TR with 5 captions is a different number; we do not use it.

**Ties count against the query** (pessimistic ranking): a negative that scores *equal* to the best positive ranks
above it. Sorting-based code (SGA's ``itm_eval``) breaks ties by index order instead; we differ on purpose, so that an
attack collapsing all embeddings to one point reads as 0 % recall, not 100 %.

Memory and time: one pass over the similarity matrix in row blocks, comparing each score with the positive scores
and counting (exact ranks, ties included), never a sort: at COCO 5k size (5,000 x 25,010) the temporaries are a
few MB beyond the matrix (`make bench` measures time and peak memory against a plain ``torch.topk``).

**Non-finite scores are refused** (:class:`~mat_lightning.errors.NonFiniteError`), never ranked: NaN compares false
with everything, so it would rank first and count as a hit (a model with NaN weights read as 100 % recall); an
infinite score would tie or win for reasons that have nothing to do with the model's retrieval. DESIGN §4: a
non-finite number is an error, never a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mat_lightning.errors import NonFiniteError

NO_POSITIVE = torch.iinfo(torch.long).max  # rank of a query with nothing to find: a miss at every K


@dataclass
class RetrievalRanks:
    """0-based rank of the first positive for every query (rank < K means hit at K).

    Attributes:
        tr: long[n_img]; per image, number of negative captions scoring >= its best caption.
        ir: long[n_txt]; per caption, number of other images scoring >= its own image.
    """

    tr: Tensor
    ir: Tensor


def similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """float32[n_img, n_txt] = ``image_emb @ text_emb.T`` in float32, also under a bf16 autocast: bf16 scores
    (8-bit mantissa) would tie often, and ties count against the query."""
    with torch.autocast(image_emb.device.type, enabled=False):
        return image_emb.float() @ text_emb.float().T


def _check_inputs(sim: Tensor, txt2img: Tensor) -> None:
    if sim.ndim != 2:
        raise ValueError(f"sim must be [n_img, n_txt], got shape {tuple(sim.shape)}")
    if txt2img.ndim != 1 or txt2img.numel() != sim.shape[1]:
        raise ValueError(
            f"txt2img must be long[n_txt] with n_txt={sim.shape[1]} (one image index per caption), "
            f"got shape {tuple(txt2img.shape)}"
        )
    if txt2img.numel() and (int(txt2img.min()) < 0 or int(txt2img.max()) >= sim.shape[0]):
        raise ValueError(
            f"txt2img values must lie in [0, {sim.shape[0]}), got [{int(txt2img.min())}, {int(txt2img.max())}]"
        )


def _refuse_non_finite(n_bad: Tensor, n_txt: int) -> None:
    """Raise NonFiniteError naming the rows if any score was NaN or infinite (``n_bad``: long[n_img] per row)."""
    rows = n_bad.nonzero().flatten()
    if rows.numel():
        raise NonFiniteError(
            f"{int(n_bad.sum())} of {n_bad.numel() * n_txt} similarities are NaN or infinite, in {rows.numel()} of "
            f"{n_bad.numel()} image rows (first: row {int(rows[0])}): the model's embeddings are not finite "
            "(non-finite weights or inputs?), so there is no recall to report"
        )


@torch.no_grad()
def retrieval_ranks(sim: Tensor, txt2img: Tensor, chunk_size: int = 16) -> RetrievalRanks:
    """Ranks of the first positive for both directions.

    One pass over ``sim`` in row blocks: the positive scores are gathered first (``n_txt`` values), then each block
    is compared with them and the comparisons counted, for TR along rows and for IR accumulated down the columns.
    Counting is exact (ties included) and costs one comparison per score, as cheap as a ``torch.topk`` (`make
    bench` compares them), with temporaries of one ``chunk_size`` x ``n_txt`` block.

    Args:
        sim: float[n_img, n_txt], similarity of every image to every caption (higher = closer).
        txt2img: long[n_txt], index of each caption's image (row of ``sim``).
        chunk_size: rows processed at once; bounds the temporary memory.

    Returns:
        :class:`RetrievalRanks`. An image without any caption gets rank ``NO_POSITIVE`` (never a hit).

    Raises:
        NonFiniteError: a score is NaN or infinite (counted per block: no temporary of the matrix's size).
    """
    _check_inputs(sim, txt2img)
    n_img, n_txt = sim.shape
    device = sim.device
    txt2img = txt2img.to(device).long()
    pos_score = sim[txt2img, torch.arange(n_txt, device=device)]  # (n_txt,) each caption with its own image
    # TR: each image's best positive, and how many of its positives tie with it (they are not negatives)
    best_pos = torch.full((n_img,), float("-inf"), dtype=sim.dtype, device=device).scatter_reduce(
        0, txt2img, pos_score, "amax"
    )
    n_pos_at_best = torch.zeros(n_img, dtype=torch.long, device=device).index_add_(
        0, txt2img, (pos_score == best_pos[txt2img]).long()
    )
    has_pos = torch.zeros(n_img, dtype=torch.bool, device=device)
    has_pos[txt2img] = True

    tr = torch.empty(n_img, dtype=torch.long, device=device)
    ir = torch.zeros(n_txt, dtype=torch.long, device=device)
    n_bad = torch.zeros(
        n_img, dtype=torch.long, device=device
    )  # non-finite scores per row (checked blockwise)
    for start in range(0, n_img, chunk_size):
        block = sim[start : start + chunk_size]  # (b, n_txt)
        stop = start + block.shape[0]
        n_bad[start:stop] = (~torch.isfinite(block)).sum(dim=1)
        tr[start:stop] = (block >= best_pos[start:stop, None]).sum(dim=1)
        ir += (block >= pos_score[None, :]).sum(dim=0)
    _refuse_non_finite(n_bad, n_txt)
    tr = torch.where(has_pos, tr - n_pos_at_best, torch.full_like(tr, NO_POSITIVE))
    return RetrievalRanks(tr=tr, ir=ir - 1)  # minus the own image


def recall_from_ranks(ranks: RetrievalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"tr_r1": .., "ir_r1": .., ..., "r_mean": ..}`` in percent from precomputed ranks."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * (ranks.tr < k).double().mean().item()
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * (ranks.ir < k).double().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def recall_at_k(
    sim: Tensor, txt2img: Tensor, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 16
) -> dict[str, float]:
    """Retrieval recall@K in both directions (DESIGN §3 contract).

    Args:
        sim: float[n_img, n_txt] image-caption similarities (cosine of L2-normalised embeddings for CLIP).
        txt2img: long[n_txt], the image (row) each caption belongs to; any number of captions per image.
        ks: the K values; keys are named ``tr_r{k}`` and ``ir_r{k}``.
        chunk_size: rows/columns per step, bounding temporary memory.

    Returns:
        ``{"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"}``, percentages; ``r_mean`` is the mean
        of the 2·len(ks) recalls.
    """
    return recall_from_ranks(retrieval_ranks(sim, txt2img, chunk_size), ks)


def attack_success(
    clean: RetrievalRanks, adv: RetrievalRanks, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Both attack-success definitions of the literature, named apart (reference-implementations.md §0.1).

    * ``asr_drop_<m>`` = clean recall − adversarial recall, in points (Co-Attack's definition).
    * ``asr_flip_<m>`` = % of queries that were hits for the clean model and are misses under attack
      (SGA's definition; queries that only become hits under attack do not count). 0 when no query was a clean hit.

    ``<m>`` runs over ``tr_r{k}``, ``ir_r{k}``; ``asr_drop_r_mean`` is included.
    """
    clean_r, adv_r = recall_from_ranks(clean, ks), recall_from_ranks(adv, ks)
    out = {f"asr_drop_{m}": clean_r[m] - adv_r[m] for m in clean_r}
    for direction in ("tr", "ir"):
        c, a = getattr(clean, direction), getattr(adv, direction)
        for k in ks:
            was_hit = c < k
            lost = was_hit & (a >= k)
            n = int(was_hit.sum())
            out[f"asr_flip_{direction}_r{k}"] = 100.0 * int(lost.sum()) / n if n else 0.0
    return out
