"""The 1:N augmentations of MAT+ (DESIGN §2 "1:N").

* :mod:`.eda`: EDA text augmentation (synonym replacement, random insertion, swap, deletion);
* :mod:`.image`: basic image augmentation (random resized crop, flip, colour jitter);
* :mod:`.providers`: precomputed LM rewrites, I2T captions and T2I images, read from JSON files;
* :mod:`.pairs`: :class:`OneToMany`, how a training image's caption pool and image variant are formed;
* :mod:`.generate`: ``mat augment rewrite|i2t``, writing the precomputed files with local HF models.
"""

from __future__ import annotations

from mat_lightning.data.augment.eda import EDA
from mat_lightning.data.augment.image import ImageAugment
from mat_lightning.data.augment.pairs import OneToMany
from mat_lightning.data.augment.providers import PrecomputedCaptions, PrecomputedImages

__all__ = ["EDA", "ImageAugment", "OneToMany", "PrecomputedCaptions", "PrecomputedImages"]
