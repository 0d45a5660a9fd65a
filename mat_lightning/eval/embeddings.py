"""Collects the embeddings of an evaluation split batch by batch, across DDP ranks, in a canonical order.

Each rank sees a shard of the split (a shard may be empty; Lightning's DistributedSampler would also repeat a few
images to even the shards out, ``data.sampling.EvalShards`` does not). The
bank keys every image by its split index and every caption by (image index, position), gathers the keys and the
embeddings from all ranks, drops repeats and sorts, so every rank ends with the same ``[n_img, D]`` and
``[n_txt, D]`` matrices in split order: clean and attacked runs line up query by query (needed for ``asr_flip``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class EmbeddingBank:
    def __init__(self) -> None:
        self.img: list[Tensor] = []
        self.img_ids: list[Tensor] = []
        self.txt: list[Tensor] = []
        self.txt_keys: list[Tensor] = []

    def add(self, image_emb: Tensor, image_ids: Tensor, text_emb: Tensor, txt2img: Tensor) -> None:
        """One batch: image_emb float[B, D], image_ids long[B] (split indices), text_emb float[T, D], txt2img long[T]
        (row in this batch); captions of one image must appear in their original order."""
        self.img.append(image_emb.detach().float().cpu())
        self.img_ids.append(image_ids.detach().cpu())
        self.txt.append(text_emb.detach().float().cpu())
        self.txt_keys.append(caption_keys(image_ids, txt2img))

    def compute(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(image_emb[n_img, D], text_emb[n_txt, D], txt2img[n_txt], image_ids[n_img])`` in split order.

        ``txt2img`` indexes rows of the returned ``image_emb``. Gathers across ranks when distributed.
        """
        local = (
            (torch.cat(self.img), torch.cat(self.img_ids), torch.cat(self.txt), torch.cat(self.txt_keys))
            if self.img
            else None  # an empty shard (fewer images than ranks)
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            parts = [p for p in parts if p is not None]
            img = torch.cat([p[0] for p in parts])
            ids = torch.cat([p[1] for p in parts])
            txt = torch.cat([p[2] for p in parts])
            keys = torch.cat([p[3] for p in parts])
        else:
            img, ids, txt, keys = local
        uniq_ids, first = first_occurrence(ids)
        img, ids = img[first], uniq_ids
        key_codes = keys[:, 0] * (int(keys[:, 1].max()) + 1 if len(keys) else 1) + keys[:, 1]
        _, first_t = first_occurrence(key_codes)
        txt, keys = txt[first_t], keys[first_t]
        txt2img = torch.searchsorted(ids, keys[:, 0].contiguous())
        return img, txt, txt2img, ids


def caption_keys(image_ids: Tensor, txt2img: Tensor) -> Tensor:
    """long[T, 2]: each caption's (image id, position among its image's captions in batch order)."""
    image_ids, txt2img = image_ids.detach().cpu(), txt2img.detach().cpu()
    owner = image_ids[txt2img]
    position = torch.zeros_like(owner)
    for b in range(len(image_ids)):
        sel = txt2img == b
        position[sel] = torch.arange(int(sel.sum()))
    return torch.stack([owner, position], dim=1)


def first_occurrence(values: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values and the index of the first occurrence of each."""
    uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
    order = torch.arange(len(values))
    first = torch.full((len(uniq),), len(values), dtype=torch.long).scatter_reduce(
        0, inverse, order, reduce="amin"
    )
    return uniq, first
