"""The defense contract: a training objective that may call attacks, selected by config.

A defense is an ``nn.Module`` so that whatever state it needs (FARE's frozen copy of the starting encoder) is saved
in checkpoints, restored on resume and moved to the right device by Lightning, like the encoder itself.

``MatModule`` calls, once, ``defense.attach(encoder)`` and freezes the towers not in ``defense.trains``; then in
every ``training_step`` ``defense(encoder, batch) -> DefenseOutput``. Training-time adversarial examples come from
:mod:`mat_lightning.attacks` (no second PGD or BERT-Attack here).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mat_lightning.attacks.base import Attack, check_budget_override, with_budgets
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.errors import ConfigError
from mat_lightning.losses import distributed_contrastive_loss
from mat_lightning.models.encoder import VLEncoder


@dataclass
class DefenseOutput:
    """``loss``: the scalar to minimise; ``logs``: floats logged under ``train/`` (``loss_adv``, ``attack_seconds``)."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Defense(nn.Module):
    """Base class. ``name`` labels results; ``trains`` lists the towers that receive updates.

    Args:
        clean_weight: weight of an extra loss term on the clean batch (0 = adversarial loss only, the paper's MAT).
    """

    name: str = "defense"
    trains: tuple[str, ...] = ("vision", "text")
    #: the attack each attack argument left unset gets: ``{argument: (class, keyword arguments)}``; the ``mat`` CLI
    #: writes them into the config (with the data's masked LM), so ``--print_config`` and config.yaml show them
    default_parts: dict[str, tuple[type, dict]] = {}

    def __init__(self, clean_weight: float = 0.0) -> None:
        super().__init__()
        if clean_weight < 0:
            raise ConfigError(f"defense clean_weight={clean_weight}: must be >= 0")
        self.clean_weight = clean_weight

    def attach(self, encoder: VLEncoder) -> None:
        """Called once with the starting encoder, before training (FARE copies it here)."""

    def attacks(self) -> list[Attack]:
        """The training-time attacks (prepared before the first step)."""
        return [a for a in vars(self).values() if isinstance(a, Attack)]

    def part(self, key: str, given: Attack | None) -> Attack:
        """``given``, or the class's default attack for argument ``key`` (:attr:`default_parts`)."""
        if given is not None:
            return given
        cls, kwargs = self.default_parts[key]
        return cls(**kwargs)

    def override_budgets(self, eps_255: float | None = None, max_words: int | None = None) -> None:
        """Suite-level budgets of the training attacks (``--model.defense.eps_255``/``max_words``): ε of every image
        attack (its step scaled with it, :func:`~mat_lightning.attacks.base.with_budgets`), words of every text
        attack; None leaves an attack as configured. Subclasses call it last in ``__init__``."""
        check_budget_override(eps_255, max_words, f"model.defense ({type(self).__name__})")
        for key, attack in list(vars(self).items()):
            if isinstance(attack, Attack):
                setattr(self, key, with_budgets(attack, eps_255, max_words))

    def prepare(self, device: torch.device | str) -> None:
        for attack in self.attacks():
            attack.prepare(device)

    def with_clean_term(
        self, loss_adv: Tensor, clean_loss: Callable[[], Tensor], logs: dict[str, float]
    ) -> DefenseOutput:
        """``loss_adv + clean_weight * clean_loss()`` (the clean term computed only when weighted)."""
        logs["loss_adv"] = loss_adv.item()
        loss = loss_adv
        if self.clean_weight > 0:
            clean = clean_loss()
            logs["loss_clean"] = clean.item()
            loss = loss + self.clean_weight * clean
        return DefenseOutput(loss, logs)

    def forward(
        self, encoder: VLEncoder, batch: RetrievalBatch
    ) -> DefenseOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def clip_loss(encoder: VLEncoder, images: Tensor, captions: list[str], batch: RetrievalBatch) -> Tensor:
    """The (multi-positive, DDP-aware) CLIP contrastive loss of ``images``/``captions`` laid out like ``batch``."""
    return distributed_contrastive_loss(
        encoder.encode_image(images),
        encoder.encode_text(captions),
        encoder.logit_scale,
        batch.txt2img,
        batch.image_ids,
    )


def batch_keys(batch: RetrievalBatch) -> dict[str, Tensor | None]:
    """The attack call's keyword arguments that key its random draws per sample (``Attack.__call__``)."""
    return {"image_ids": batch.image_ids, "sample_keys": batch.sample_keys}


@contextmanager
def timed(logs: dict[str, float], key: str = "attack_seconds") -> Iterator[None]:
    """Adds the wall time of the block to ``logs[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        logs[key] = logs.get(key, 0.0) + time.perf_counter() - t0


def changed_fraction(before: list[str], after: list[str]) -> float:
    """Share of captions the text attack changed (logged as ``train/captions_changed``)."""
    return sum(a != b for a, b in zip(before, after, strict=True)) / max(1, len(before))
