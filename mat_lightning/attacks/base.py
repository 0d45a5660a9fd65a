"""The attack contract: small pluggable objects, one call signature for image, text and multimodal attacks.

Modelled on torchattacks' ``Attack`` base class (``__call__`` owns the cross-cutting concerns, subclasses write
``forward``), generalised from classifiers to dual encoders:

``attack(encoder, images, captions, txt2img) -> AttackResult(images, captions)``

* ``images``: ``float[B, 3, H, W]`` in [0, 1]; the result has the same shape and stays in [0, 1].
* ``captions``: ``T`` strings, image-major, ``txt2img: long[T]`` the row of each caption's image; the result's
  captions are aligned with the input (caption ``t`` becomes ``result.captions[t]``).
* **Hygiene**: the encoder's ``training`` flag, every parameter's ``requires_grad`` and ``.grad`` are as they were
  afterwards. During the attack the encoder is in eval mode and its parameters are frozen, so autograd computes
  gradients for the inputs only (cheaper, and nothing leaks into a training step's gradients).
* **Determinism**: randomness comes from the attack's own ``torch.Generator`` seeded with ``seed``; two attacks
  built with the same seed give the same outputs on the same inputs.
* ``name`` (used in results and metric keys), ``modality`` ("image", "text", "multimodal"); budgets carry units
  (``eps_255`` is in 1/255 of the pixel range).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder

Modality = Literal["image", "text", "multimodal"]


@contextmanager
def attacking(encoder: VLEncoder) -> Iterator[None]:
    """The attack-time state of an encoder: eval mode, parameters frozen, autograd on; all restored on exit.

    Defenses that call an attack's lower-level ``perturb`` with their own objective wrap it in this.
    """
    # A duck-typed encoder (DESIGN §4: encode_image, encode_text, logit_scale, image_size) may have no parameters
    # or modes; then there is nothing to freeze or restore.
    was_training = getattr(encoder, "training", None)
    parameters = getattr(encoder, "parameters", None)
    flags = [(p, p.requires_grad) for p in parameters()] if callable(parameters) else []
    if was_training is not None and hasattr(encoder, "train"):
        encoder.train(False)
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if was_training is not None and hasattr(encoder, "train"):
            encoder.train(was_training)


@dataclass
class AttackResult:
    """Adversarial images (float[B, 3, H, W] in [0, 1]) and captions (T strings, aligned with the input)."""

    images: Tensor
    captions: list[str]


class Attack(ABC):
    """Base class: subclasses set ``name``/``modality`` and implement :meth:`forward`.

    Args:
        seed: seed of the attack's random generator (random starts, noise); None draws from torch's global RNG.

    The generator is created on first use and advances across calls, so a run over a data set is reproducible for
    a given batch order. It is independent of the run's ``seed_everything`` on purpose: every model is evaluated
    with the same attack noise.
    """

    name: str = "attack"
    modality: Modality = "image"

    def __init__(self, seed: int | None = 0) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The attack's own generator on ``device`` (created and seeded on first use)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        if len(captions) != txt2img.numel():
            raise ConfigError(
                f"{self.name}: {len(captions)} captions but txt2img has {txt2img.numel()} entries"
            )
        with attacking(encoder):
            result = self.forward(encoder, images.detach(), list(captions), txt2img.to(images.device))
        return AttackResult(result.images.detach(), result.captions)

    def prepare(self, device: torch.device | str) -> None:
        """Load what the attack needs (a masked LM, ...) before it is timed or first used; default: nothing."""
        return None

    @abstractmethod
    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        """The attack proper; called with the encoder frozen and in eval mode, gradients enabled."""

    # -- budgets ----------------------------------------------------------------------------------------------------

    @property
    def eps_255(self) -> float | None:
        """The image budget in 1/255 units, or None for attacks without one (text attacks)."""
        return None

    def with_eps(self, eps_255: float) -> Attack:
        """A copy with the image budget set to ``eps_255`` (an ε grid); step sizes scale with it.

        Attacks without an image budget return themselves.
        """
        return self

    def clone(self) -> Attack:
        """A fresh copy with its own, re-seeded generator."""
        other = copy.copy(self)
        other._generator = None
        return other

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
