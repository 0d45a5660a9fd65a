"""How MAT+ forms its one-to-many training pairs (DESIGN §2 "1:N"; Waseda et al., arXiv 2405.18770).

An image has many valid captions and a caption many valid images. For each training image ``i``:

* its **caption pool** is its ground-truth captions (``keep_ground_truth``), plus every caption source's captions of
  it (LM rewrites, I2T captions), plus, with EDA, one fresh EDA variant of each ground-truth caption drawn at
  sampling time; the data module samples ``k = captions_per_image`` positives from the pool;
* its **image** is, with probability ``p_image_source``, a random one of its generated images (T2I) instead of the
  original, then, with probability ``p_image_augment``, augmented (crop, flip, colour jitter).

The item keeps image ``i``'s index, so the multi-positive loss treats a T2I render and the original as one image.
Randomness comes from the generators the data module derives from torch's global one, so
``lightning.seed_everything`` makes the batches reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mat_lightning.data.augment.eda import EDA
from mat_lightning.data.augment.image import ImageAugment
from mat_lightning.data.augment.providers import PrecomputedCaptions, PrecomputedImages
from mat_lightning.data.formats import ImageCaptions
from mat_lightning.errors import ConfigError, DataError


class OneToMany:
    """The 1:N augmentation of training pairs: which captions and which image variant an image is trained with.

    Args:
        caption_sources: precomputed captions to add to each image's pool (LM rewrites, I2T).
        eda: EDA, adding one fresh variant of each ground-truth caption to the pool at every draw.
        image_sources: precomputed generated images (T2I) that may replace the original image.
        image_augment: basic image augmentation applied to the (original or generated) image.
        keep_ground_truth: keep the ground-truth captions in the pool (off: train on augmented captions only).
        p_image_source: probability of replacing the image by a random generated one (when ``image_sources``).
        p_image_augment: probability of applying ``image_augment`` (when set).

    Raises:
        ConfigError: a probability outside [0, 1], or a configuration whose caption pool is always empty.
    """

    def __init__(
        self,
        caption_sources: list[PrecomputedCaptions] | None = None,
        eda: EDA | None = None,
        image_sources: list[PrecomputedImages] | None = None,
        image_augment: ImageAugment | None = None,
        keep_ground_truth: bool = True,
        p_image_source: float = 0.5,
        p_image_augment: float = 0.5,
    ) -> None:
        for name, p in (("p_image_source", p_image_source), ("p_image_augment", p_image_augment)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"data.one_to_many.{name}={p}: must be in [0, 1]")
        if not keep_ground_truth and not caption_sources and eda is None:
            raise ConfigError(
                "data.one_to_many: keep_ground_truth is false and there are no caption_sources and no eda, "
                "so no image has a caption. Add a caption source or keep the ground truth."
            )
        self.caption_sources = list(caption_sources or [])
        self.eda = eda
        self.image_sources = list(image_sources or [])
        self.image_augment = image_augment
        self.keep_ground_truth = keep_ground_truth
        self.p_image_source, self.p_image_augment = p_image_source, p_image_augment
        self.records: Sequence[ImageCaptions] = ()
        self.image_size: int | None = None
        self.cache = True
        self._decoded: dict[Path, Tensor] = {}  # generated images, decoded once (per DataLoader worker)

    def __repr__(self) -> str:
        return (
            f"OneToMany(caption_sources={self.caption_sources}, eda={self.eda}, image_sources={self.image_sources}, "
            f"image_augment={self.image_augment}, keep_ground_truth={self.keep_ground_truth}, "
            f"p_image_source={self.p_image_source}, p_image_augment={self.p_image_augment})"
        )

    def __getstate__(self) -> dict:
        # Checkpoints and spawned workers get the configuration, not megabytes of decoded images.
        return {**self.__dict__, "_decoded": {}}

    # -- set-up -------------------------------------------------------------------------------------------------------

    def bind(self, records: Sequence[ImageCaptions], image_size: int, cache: bool = True) -> None:
        """Attach the train split and check every source covers it, so a bad file fails now, not mid-epoch.

        Args:
            records: the train split's records; item ``i`` of the data set is ``records[i]``.
            image_size: side in pixels generated images are decoded to (the data module's).
            cache: keep generated images in memory once decoded (the data module's ``preload``; off for real
                data sets, where two generated images per Flickr30K image at 224 px are ~9 GB per worker).

        Raises:
            DataError: a source file is missing, malformed or (strict) lacks an image of the split.
        """
        for source in (*self.caption_sources, *self.image_sources):
            source.check_covers([r.image_id for r in records])
        self.records, self.image_size, self.cache = records, image_size, cache
        self._decoded = {}

    # -- sampling -----------------------------------------------------------------------------------------------------

    def caption_pool(self, i: int, rng: random.Random) -> list[str]:
        """All captions eligible as positives of image ``i`` at this draw (duplicates removed, order kept).

        Raises:
            DataError: the pool is empty (no ground truth kept and no source has a caption of the image).
        """
        record = self.records[i]
        pool = list(record.captions) if self.keep_ground_truth else []
        for source in self.caption_sources:
            pool.extend(source.captions(record.image_id))
        if self.eda is not None:
            pool.extend(self.eda(c, rng) for c in record.captions)
        pool = list(dict.fromkeys(pool))
        if not pool:
            raise DataError(
                f"image {record.image_id!r} ({record.image_path}) has no caption to train with: keep_ground_truth "
                "is false and no caption source has one for it. Add its captions to a source, or keep the "
                "ground truth."
            )
        return pool

    def fixed_captions(self, i: int) -> list[str]:
        """The captions of image ``i``'s pool known before training: the ground truth (if kept) and the caption
        sources' (EDA's random edits are drawn per step)."""
        record = self.records[i]
        pool = list(record.captions) if self.keep_ground_truth else []
        for source in self.caption_sources:
            pool.extend(source.captions(record.image_id))
        return list(dict.fromkeys(pool))

    def _generated(self, path: Path) -> Tensor:
        """A generated image, uint8[3, S, S], decoded once when caching."""
        if path in self._decoded:
            return self._decoded[path]
        from mat_lightning.data.datamodule import load_image  # lazy: the data module imports this module

        image = load_image(path, self.image_size)
        if self.cache:
            self._decoded[path] = image
        return image

    def image(self, i: int, original: Tensor, generator: torch.Generator) -> Tensor:
        """The image variant image ``i`` is trained with at this draw.

        Args:
            i: index into the bound records.
            original: uint8[3, S, S], image ``i`` as the data module decoded it.
            generator: source of every random draw.

        Returns:
            uint8[3, S, S] when not augmented (the original or a generated image), else float[3, S, S] in [0, 1].
        """
        image = original
        if self.image_sources and float(torch.rand((), generator=generator)) < self.p_image_source:
            paths = [p for s in self.image_sources for p in s.image_paths(self.records[i].image_id)]
            if paths:
                image = self._generated(paths[int(torch.randint(len(paths), (), generator=generator))])
        if (
            self.image_augment is not None
            and float(torch.rand((), generator=generator)) < self.p_image_augment
        ):
            image = self.image_augment(image.float().div(255), generator)
        return image
