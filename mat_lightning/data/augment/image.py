"""Basic image augmentation, the image->image augmentation of MAT+ (DESIGN §2 "1:N"): random resized crop, horizontal
flip and colour jitter, with torchvision's semantics (``RandomResizedCrop``, ``RandomHorizontalFlip``,
``ColorJitter``) but every random number drawn from an explicit ``torch.Generator``, so an augmented batch is a
function of the seed alone (torchvision's transforms draw from the global generator).

Works on one float image ``[3, H, W]`` in [0, 1] and returns the same shape and range; it never normalises (the
encoder does). Misaligned augmentations hurt, the paper finds: a horizontal flip turns "a disc left of a box" into a
picture of "a disc right of a box", and a hue shift changes the colour a caption names (a red square becomes orange)
in the synthetic world, whose captions are mostly about positions and colours. Hence ``hue=0`` by default, and set
``p_flip=0`` when captions talk about left and right.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor

from mat_lightning.errors import ConfigError


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class ImageAugment:
    """Random resized crop -> horizontal flip -> colour jitter (in random order), drawn from a generator.

    Args:
        scale: range of the crop's area as a fraction of the image's area; the crop is resized back to the input
            size (bilinear, antialiased). ``[1.0, 1.0]`` disables cropping.
        ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly as torchvision does.
        p_flip: probability of a horizontal flip.
        brightness: brightness factor drawn from ``[1 - brightness, 1 + brightness]``; 0 disables.
        contrast: contrast factor drawn from ``[1 - contrast, 1 + contrast]``; 0 disables.
        saturation: saturation factor drawn from ``[1 - saturation, 1 + saturation]``; 0 disables.
        hue: hue shift drawn from ``[-hue, hue]`` (a fraction of the colour circle, at most 0.5); 0 disables.

    Raises:
        ConfigError: a value outside its range.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.6, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        p_flip: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.0,
    ) -> None:
        scale, ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"image_augment.scale={list(scale)}: need 0 < min <= max <= 1")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"image_augment.ratio={list(ratio)}: need 0 < min <= max")
        if not 0 <= p_flip <= 1:
            raise ConfigError(f"image_augment.p_flip={p_flip}: must be in [0, 1]")
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= value < 1:
                raise ConfigError(f"image_augment.{name}={value}: must be in [0, 1)")
        if not 0 <= hue <= 0.5:
            raise ConfigError(f"image_augment.hue={hue}: must be in [0, 0.5]")
        self.scale, self.ratio, self.p_flip = scale, ratio, p_flip
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __repr__(self) -> str:
        return (
            f"ImageAugment(scale={self.scale}, ratio={self.ratio}, p_flip={self.p_flip}, "
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, hue={self.hue})"
        )

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a random crop (torchvision's ``RandomResizedCrop.get_params`` algorithm)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(generator, *self.scale)
            aspect = math.exp(_uniform(generator, *log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=generator))
                left = int(torch.randint(0, width - w + 1, (), generator=generator))
                return top, left, h, w
        # Fallback, as torchvision: the largest centred crop with an aspect ratio in range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Augment one image.

        Args:
            image: float[3, H, W] in [0, 1].
            generator: the source of every random draw (a CPU generator).

        Returns:
            float[3, H, W] in [0, 1].
        """
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"ImageAugment expects a float image [3, H, W], got {tuple(image.shape)} {image.dtype}"
            )
        height, width = image.shape[-2:]
        out = image
        if self.scale != (1.0, 1.0):
            top, left, h, w = self.crop_box(height, width, generator)
            out = F.resized_crop(out, top, left, h, w, size=[height, width], antialias=True)
        if float(torch.rand((), generator=generator)) < self.p_flip:
            out = F.horizontal_flip(out)
        # ColorJitter applies its four adjustments in a random order.
        for k in torch.randperm(4, generator=generator).tolist():
            if k == 0 and self.brightness > 0:
                out = F.adjust_brightness(out, _uniform(generator, 1 - self.brightness, 1 + self.brightness))
            elif k == 1 and self.contrast > 0:
                out = F.adjust_contrast(out, _uniform(generator, 1 - self.contrast, 1 + self.contrast))
            elif k == 2 and self.saturation > 0:
                out = F.adjust_saturation(out, _uniform(generator, 1 - self.saturation, 1 + self.saturation))
            elif k == 3 and self.hue > 0:
                out = F.adjust_hue(out, _uniform(generator, -self.hue, self.hue))
        return out.clamp_(0.0, 1.0) if out is not image else out.clone()
