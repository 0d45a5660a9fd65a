"""ITM re-ranking of retrieval scores for fusion models (BLIP), sharded across processes, no pixels moved.

An encoder opts in (and ``rerank_enabled`` is not False) with:

* ``itm_image_states(images) -> Tensor[B, ...]``: what its ITM head needs of each image (BLIP: the vision states),
  computed without gradients, in the encoder's compute dtype, on its device;
* ``itm_scores(states, captions) -> float[P]``: the ITM score of P aligned (image states, caption) pairs;
* ``rerank_score(itm, itc) -> Tensor``: a re-ranked entry from its ITM and ITC scores (BLIP: their sum);
* ``rerank_k`` (candidates per query) and optionally ``itm_batch_size`` (pairs per ITM forward, default 128).

Evaluation keeps an :class:`ItmBank` next to the embedding bank. Every rank ends with the full ITC similarity
``sim`` (the gathered embeddings) and so computes the same top-k candidates of every image query (text retrieval)
and of every caption query (image retrieval). The union of these (image, caption) pairs is scored **once**, each
pair by the rank that evaluated its image (the owner: the lowest rank that saw it), with the vision states it kept;
a pair in both an image's and a caption's top-k is scored once for both. The partial score vectors are summed with
one all-reduce (every pair has exactly one owner, so the sum is its score exactly, and every rank gets the same
vectors), then each query's top-k is re-scored and placed above the rest of its row, which keeps its ITC order.
Pairs are scored in a fixed order with the captions padded to ``max_length``, so the rows do not depend on the
number of processes (``tests/test_rerank_sharded.py``).

What moves between ranks: the caption strings (all_gather_object, ~1.5 MB for COCO's 25,010) and the sorted ids of
each rank's images, then one all-reduce of the pair scores (float32, at most ``(n_img + n_txt) * k``). No pixels and
no vision states.

Why states are kept by their owner, not gathered everywhere (COCO 5k test, 384 px, ViT-B/16: 577 tokens x 768):

* pixels of all images, float32: 5,000 x 3 x 384 x 384 x 4 B = 8.85 GB per rank (the design this replaced);
* vision states of all images: 5,000 x 577 x 768 x 4 B = 8.86 GB float32 (4.43 GB bf16) per rank, plus an
  all-gather receiving 7/8 of that on each of 8 ranks, for an exactly even split of the ITM work;
* states kept by their owner (this module), 8 ranks: 625 x 577 x 768 x 4 B = 1.11 GB float32 (0.55 GB bf16) per
  rank, nothing exchanged but the scores: at most (5,000 + 25,010) x 256 = 7.68 M float32 = 31 MB.

The price is balance: image queries split exactly (1/W each), but a caption's top-k images belong to whichever ranks
evaluated them, so a rank's share of the caption-query pairs is the share of candidates its images take; shards
are strided (rank r holds images r, r+W, ...), so it is 1/W up to the spread of how often single images appear in
top-k lists. ``make bench`` (``rerank_scaling``) reports the ITM pairs of the busiest rank. Recomputing the states
when re-ranking (keeping the images instead) would save nothing: an image's float32 pixels and its float32 states
are the same size (442,368 vs 443,136 values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from mat_lightning.eval.embeddings import caption_keys, first_occurrence
from mat_lightning.eval.retrieval import RetrievalRanks, retrieval_ranks, similarity

ITM_METHODS = ("itm_image_states", "itm_scores", "rerank_score")


def wants_rerank(encoder: object) -> bool:
    return all(callable(getattr(encoder, m, None)) for m in ITM_METHODS) and (
        getattr(encoder, "rerank_enabled", True) is not False
    )


def _world() -> tuple[int, int]:
    """(world size, rank); (1, 0) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ItmBank:
    """What ITM re-ranking needs of this process's share of an evaluation split.

    The ITM inputs of each image it evaluated (``encoder.itm_image_states``: the vision states, in the encoder's
    compute dtype, on its device, computed once per image when added) and its captions with their (image id,
    position) keys, the keys of :class:`~mat_lightning.eval.embeddings.EmbeddingBank`.
    """

    def __init__(self, encoder: object) -> None:
        self.encoder = encoder
        self.states: dict[int, Tensor] = {}  # image id -> states (a view into its batch's tensor)
        self.captions: list[str] = []
        self.keys: list[Tensor] = []

    def add(self, images: Tensor, image_ids: Tensor, captions: Sequence[str], txt2img: Tensor) -> None:
        """One batch: images float[B, 3, H, W] in [0, 1] (possibly adversarial), their split ids long[B], T captions
        (possibly adversarial) and txt2img long[T] (row in this batch)."""
        ids = image_ids.tolist()
        new = [
            b for b, i in enumerate(ids) if i not in self.states
        ]  # a repeated image keeps its first states
        if new:
            with torch.no_grad():
                states = self.encoder.itm_image_states(images[new] if len(new) < len(ids) else images)
            for b, s in zip(new, states, strict=True):
                self.states[ids[b]] = s.detach()
        self.captions += list(captions)
        self.keys.append(caption_keys(image_ids, txt2img))

    def compute(self) -> tuple[dict[int, Tensor], list[str]]:
        """``({row: states} of the images this rank scores, captions)``.

        Rows index the split's image ids of all ranks in sorted order (the rows of ``EmbeddingBank``'s image
        matrix); an image seen by several ranks is scored by the lowest. Captions are those of all ranks, in
        (image id, position) order (its text matrix's rows). Gathers ids and captions when distributed.
        """
        local = (
            sorted(self.states),
            torch.cat(self.keys) if self.keys else torch.zeros(0, 2, dtype=torch.long),
            self.captions,
        )
        world, rank = _world()
        parts = [local]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, local)
        owner: dict[int, int] = {}
        for r, (ids, _, _) in enumerate(parts):
            for i in ids:
                owner.setdefault(i, r)
        row = {i: n for n, i in enumerate(sorted(owner))}
        states = {row[i]: s for i, s in self.states.items() if owner[i] == rank}
        keys = torch.cat([p[1] for p in parts])
        captions = [c for p in parts for c in p[2]]
        codes = keys[:, 0] * (int(keys[:, 1].max()) + 1 if len(keys) else 1) + keys[:, 1]
        _, first = first_occurrence(codes)
        return states, [captions[j] for j in first.tolist()]


def sum_over_ranks(scores: Tensor) -> Tensor:
    """Element-wise sum over all ranks (the identity on one process)."""
    if _world()[0] > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.SUM)
    return scores


def rerank(
    encoder,
    sim: Tensor,
    states: dict[int, Tensor],
    captions: Sequence[str],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """ITM re-ranking of every query's top-k, this rank scoring the pairs of the images in ``states``.

    Args:
        sim: float[n_img, n_txt] ITC similarities, the same on every rank.
        states: ``{row of sim: encoder.itm_image_states of that image}`` for the images this rank scores; the ranks'
            rows together must cover every image exactly once.
        captions: the n_txt captions, in the column order of ``sim``.
        reduce: sums the ranks' partial score vectors (default :func:`sum_over_ranks`; tests pass a hand-made sum).

    Returns:
        ``(i2t, t2i)``, both float[n_img, n_txt] on sim's device: scores for text retrieval (rows = image
        queries) and image retrieval (columns = caption queries). In each query's top ``rerank_k`` the score is
        ``encoder.rerank_score(itm, itc)``; every other entry keeps its ITC order, below all re-ranked ones.
    """
    n_img, n_txt = sim.shape
    if len(captions) != n_txt:
        raise ValueError(f"{len(captions)} captions for a similarity matrix with {n_txt} columns")
    k_txt, k_img = min(encoder.rerank_k, n_txt), min(encoder.rerank_k, n_img)
    i2t_itc, i2t_top = sim.topk(k_txt, dim=1)  # each image's candidate captions
    t2i_itc, t2i_top = sim.T.topk(k_img, dim=1)  # each caption's candidate images
    img_of = torch.cat([torch.arange(n_img).repeat_interleave(k_txt), t2i_top.reshape(-1).cpu()])
    txt_of = torch.cat([i2t_top.reshape(-1).cpu(), torch.arange(n_txt).repeat_interleave(k_img)])
    pairs, where = torch.unique(img_of * n_txt + txt_of, return_inverse=True)  # sorted: image-major
    held = torch.zeros(n_img, dtype=torch.bool)
    held[list(states)] = True
    is_mine = held[pairs // n_txt]
    mine = pairs[is_mine]
    device = next(iter(states.values())).device if states else sim.device
    scores = torch.zeros(len(pairs), device=device)  # where the process group can reduce it (NCCL: the GPU)
    scores[is_mine.to(device)] = _itm(encoder, mine // n_txt, mine % n_txt, states, captions).to(device)
    itm = (reduce or sum_over_ranks)(scores).to(sim.device)[where.to(sim.device)]
    i2t_itm, t2i_itm = itm[: n_img * k_txt].view(n_img, k_txt), itm[n_img * k_txt :].view(n_txt, k_img)
    i2t = _above_the_rest(sim, i2t_top, encoder.rerank_score(i2t_itm, i2t_itc))
    t2i = _above_the_rest(sim.T, t2i_top, encoder.rerank_score(t2i_itm, t2i_itc)).T
    return i2t, t2i


def _itm(encoder, rows: Tensor, cols: Tensor, states: dict[int, Tensor], captions: Sequence[str]) -> Tensor:
    """ITM scores float[P] of the pairs (image row, caption column), in batches of ``encoder.itm_batch_size``."""
    size = int(getattr(encoder, "itm_batch_size", 128))
    out = [
        encoder.itm_scores(
            torch.stack([states[r] for r in rows[s : s + size].tolist()]),
            [captions[c] for c in cols[s : s + size].tolist()],
        ).float()
        for s in range(0, len(rows), size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def _above_the_rest(scores: Tensor, top_idx: Tensor, new_top: Tensor) -> Tensor:
    """``scores`` with each row's ``top_idx`` entries set to ``new_top``, the others shifted below them."""
    new_top = new_top.to(scores)
    shift = scores.max(dim=1, keepdim=True).values - new_top.min(dim=1, keepdim=True).values + 1
    return (scores - shift).scatter(1, top_idx, new_top)


def ranks(
    encoder: object, img: Tensor, txt: Tensor, txt2img: Tensor, bank: ItmBank | None = None
) -> RetrievalRanks:
    """Retrieval ranks of ``img @ txt.T``, re-ranked by the encoder's ITM head when it has one (``bank`` given)."""
    sim = similarity(img, txt)  # float32, also under a bf16 autocast
    if bank is None or not wants_rerank(encoder):
        return retrieval_ranks(sim, txt2img)
    states, captions = bank.compute()
    i2t, t2i = rerank(encoder, sim, states, captions)
    return RetrievalRanks(tr=retrieval_ranks(i2t, txt2img).tr, ir=retrieval_ranks(t2i, txt2img).ir)
