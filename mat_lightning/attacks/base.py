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
* **Determinism**: randomness comes from the attack's ``seed``; two attacks built with the same seed give the same
  outputs on the same inputs. With ``sample_keys`` (long[B], one per image row: its split index in evaluation, a
  per-epoch draw in training) every row draws from its own stream seeded by (seed, key): an image gets the same
  random start and noise whatever batch, position, process or rank it lands in, so results do not depend on the
  batch size or the number of processes. Without keys (the plain four-argument call) draws come from the attack's
  own ``torch.Generator``, which advances across calls (reproducible for a given batch order only).
* ``image_ids`` (long[B], optional): the identity of each row in its split; objectives that compare an image with
  the rest of the split (``contrastive`` with ``negatives="split"``) need it to tell positives from negatives.
* ``name`` (used in results and metric keys), ``modality`` ("image", "text", "multimodal"); budgets carry units
  (``eps_255`` is in 1/255 of the pixel range).
"""

from __future__ import annotations

import copy
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mat_lightning.attacks.objectives import Gallery
from mat_lightning.errors import ConfigError, check_eps_255
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


class SampleRandomness:
    """The random draws of one attack call: per-row streams when the rows have keys, else one shared generator.

    Args:
        seed: the attack's seed (None: torch's global generator, no per-row streams).
        keys: long[B] sample keys, or None.
        device: where the draws are made.
        generator: the shared generator used when there are no keys.

    Each draw takes a per-row ``shape[1:]`` from row ``b``'s stream, so row ``b`` gets the same numbers in the same
    order of draws whatever the other rows are.
    """

    def __init__(
        self,
        seed: int | None,
        keys: Tensor | None,
        device: torch.device,
        generator: torch.Generator | None,
    ) -> None:
        self.device, self.generator = torch.device(device), generator
        self.streams: list[torch.Generator] | None = None
        if keys is not None and seed is not None:
            self.streams = [
                torch.Generator(device=self.device).manual_seed(stream_seed(seed, int(k)))
                for k in keys.detach().cpu().tolist()
            ]

    def _draw(self, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        fn = torch.rand if kind == "uniform" else torch.randn
        if self.streams is None:
            return fn(shape, generator=self.generator, device=self.device, dtype=dtype)
        if len(self.streams) != shape[0]:
            raise ValueError(f"{len(self.streams)} sample keys for {shape[0]} rows")
        return torch.stack(
            [fn(shape[1:], generator=g, device=self.device, dtype=dtype) for g in self.streams]
        )

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """U[0, 1) of ``shape`` (first dimension: rows)."""
        return self._draw("uniform", tuple(shape), dtype)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """N(0, 1) of ``shape`` (first dimension: rows)."""
        return self._draw("normal", tuple(shape), dtype)


def stream_seed(seed: int, key: int) -> int:
    """A 63-bit seed for the stream of sample ``key`` under attack seed ``seed`` (nearby keys give unrelated
    streams; no arithmetic coincidence such as seed 1 key 0 == seed 0 key 1)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class AttackResult:
    """Adversarial images (float[B, 3, H, W] in [0, 1]) and captions (T strings, aligned with the input)."""

    images: Tensor
    captions: list[str]


class Attack(ABC):
    """Base class: subclasses set ``name``/``modality`` and implement :meth:`forward`.

    Args:
        seed: seed of the attack's random generator (random starts, noise); None draws from torch's global RNG.
        name: the attack's row label in results and metric keys, instead of the class's (``bert_attack``, ...):
            two attacks of one class in a suite need distinct names (``bert_attack_synonym``). Letters, digits,
            ``_``, ``-`` and ``.``; recorded in ``results.json``'s attack settings.

    Calls with ``sample_keys`` (or ``image_ids``) draw each row's randomness from its own stream seeded by (seed,
    key) (:meth:`randomness`), so an image gets the same noise in any batch. Calls without keys use the attack's
    generator, created on first use and advancing across calls (reproducible for a given batch order only). Both
    are independent of the run's ``seed_everything`` on purpose: every model is evaluated with the same attack
    noise.
    """

    name: str = "attack"
    modality: Modality = "image"

    def __init__(self, seed: int | None = 0, name: str | None = None) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        if name is not None:
            if not isinstance(name, str) or not re.fullmatch(r"\w[\w.-]*", name):
                raise ConfigError(
                    f"{type(self).__name__} name={name!r}: a row label of letters, digits, '_', '-' and '.' (not "
                    "first), e.g. bert_attack_synonym"
                )
            self.name = name  # an instance attribute: the class's label stays the default of the others

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The attack's own generator on ``device`` (created and seeded on first use)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def randomness(self, device: torch.device, keys: Tensor | None = None) -> SampleRandomness:
        """The draws of one call: per-sample streams keyed by (seed, key) with ``keys``, else :meth:`generator`."""
        return SampleRandomness(self.seed, keys, device, self.generator(device))

    def __call__(
        self,
        encoder: VLEncoder,
        images: Tensor,
        captions: list[str],
        txt2img: Tensor,
        image_ids: Tensor | None = None,
        sample_keys: Tensor | None = None,
    ) -> AttackResult:
        """Attack a batch (module docstring). ``sample_keys`` default to ``image_ids`` when only those are given."""
        if len(captions) != txt2img.numel():
            raise ConfigError(
                f"{self.name}: {len(captions)} captions but txt2img has {txt2img.numel()} entries"
            )
        for label, ids in (("image_ids", image_ids), ("sample_keys", sample_keys)):
            if ids is not None and ids.numel() != images.shape[0]:
                raise ConfigError(f"{self.name}: {ids.numel()} {label} for {images.shape[0]} images")
        with self.keyed(image_ids, sample_keys), attacking(encoder):
            result = self.forward(encoder, images.detach(), list(captions), txt2img.to(images.device))
        return AttackResult(result.images.detach(), result.captions)

    @contextmanager
    def keyed(self, image_ids: Tensor | None, sample_keys: Tensor | None = None) -> Iterator[None]:
        """Within the block, :attr:`image_ids` and :attr:`sample_keys` describe the batch being attacked.

        ``sample_keys`` default to ``image_ids``. Defenses that call ``perturb`` directly wrap it in this (and in
        :func:`attacking`); composite attacks key their parts too.
        """
        previous = (self.image_ids, self.sample_keys)
        self._image_ids = image_ids
        self._sample_keys = sample_keys if sample_keys is not None else image_ids
        try:
            yield
        finally:
            self._image_ids, self._sample_keys = previous

    @property
    def image_ids(self) -> Tensor | None:
        """long[B] row identities of the batch being attacked (None outside a call or when not given)."""
        return getattr(self, "_image_ids", None)

    @property
    def sample_keys(self) -> Tensor | None:
        """long[B] keys of the rows' random streams in the current call (None: the shared generator)."""
        return getattr(self, "_sample_keys", None)

    def with_gallery(self, gallery: Gallery) -> Attack:
        """The attack with the split's clean embeddings available to its objectives (default: unchanged)."""
        return self

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

    def with_max_words(self, max_words: int) -> Attack:
        """A copy with the word budget of its text part set to ``max_words`` (a suite-level override).

        Attacks without a word budget (image attacks) return themselves.
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


def check_budget_override(eps_255: object, max_words: object, where: str) -> None:
    """The one check of the suite-level budgets (``robust_eval.eps_255``/``max_words``, ``model.defense.*``,
    ``mat eval --eps_255/--max_words``): ε a finite number > 0, words an integer >= 1, or None (unchanged).

    Raises:
        ConfigError: naming ``<where>.<key>`` and the value.
    """
    if eps_255 is not None:
        check_eps_255(eps_255, f"{where}.eps_255")  # the one ε check (also the grid's and mat eval's)
    if max_words is not None and (
        isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1
    ):
        raise ConfigError(
            f"{where}.max_words={max_words!r}: the word budget must be an integer >= 1, or left out to keep "
            "each attack's own"
        )


def with_budgets(attack: Attack, eps_255: float | None = None, max_words: int | None = None) -> Attack:
    """``attack`` with a suite-level budget: ε of every image part, words of every text part (None: unchanged).

    The step rule is :meth:`Attack.with_eps`'s, the same as the ε grid's: each image part's step scales with its ε
    (``steps x step / ε`` stays constant: PGD 10 x 0.5/255 at ε = 2/255 becomes 10 x 1/255 at ε = 4/255).
    """
    if eps_255 is not None and attack.eps_255 is not None:
        attack = attack.with_eps(float(eps_255))
    if max_words is not None:
        attack = attack.with_max_words(int(max_words))
    return attack
