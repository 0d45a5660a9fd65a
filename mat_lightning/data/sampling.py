"""Which items each process reads, so that results do not depend on the number of processes.

Lightning would replace the loaders' samplers under DDP with a ``DistributedSampler`` (which pads the evaluation
split with repeats, and shuffles training data differently from a single process). Both samplers here are
``DistributedSampler`` subclasses, so Lightning keeps them, and they are used on one process too:

* :class:`TrainShards` — one permutation per epoch seeded by (seed, epoch), the same for every number of processes;
  rank ``r`` of ``W`` reads positions ``r, r + W, ...``, so the union of the ranks' ``j``-th batches of ``B`` is the
  ``j``-th batch of ``W·B`` of one process (the global batch is the same set of images). Every index comes with a
  **key** derived from (seed, epoch, index) that seeds that item's random draws (captions sampled, 1:N augmentation,
  the training attacks' random starts), so they do not depend on which process or batch position draws them.
* :class:`EvalShards` — the evaluation split in order, rank ``r`` reading ``r, r + W, ...``, without padding: every
  image is evaluated (and attacked) exactly once; embeddings are gathered in split order afterwards
  (:class:`~mat_lightning.eval.embeddings.EmbeddingBank`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


def item_key(seed: int, epoch: int, index: int) -> int:
    """A 63-bit key for item ``index`` in ``epoch`` of a run seeded with ``seed`` (unrelated for nearby inputs)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TrainShards(DistributedSampler):
    """Seeded training order, sharded by rank; yields ``(index, key)`` (see the module docstring).

    The tail that does not fill a whole round of ``num_replicas`` items is dropped (as the loader's ``drop_last``
    drops the last partial batch), so every rank reads the same number of items.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for index in super().__iter__():
            yield index, item_key(self.seed, self.epoch, index)


class EvalShards(DistributedSampler):
    """Split order, rank ``r`` of ``W`` reading items ``r, r + W, ...``; no padding, no shuffling."""

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
