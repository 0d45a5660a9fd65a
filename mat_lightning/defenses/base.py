"""The defense contract: a training objective that may call attacks, selected by config.

A defense is an ``nn.Module`` so that whatever state it needs (FARE's frozen copy of the starting encoder) is saved
in checkpoints, restored on resume and moved to the right device by Lightning, like the encoder itself.

``MatModule`` calls, once, ``defense.attach(encoder)`` and freezes the towers not in ``defense.trains``; then in
every ``training_step`` ``defense(encoder, batch) -> DefenseOutput``. Training-time adversarial examples come from
:mod:`mat_lightning.attacks` (no second PGD or BERT-Attack here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.losses import distributed_contrastive_loss
from mat_lightning.models.encoder import VLEncoder


@dataclass
class DefenseOutput:
    """``loss``: the scalar to minimise; ``logs``: floats logged under ``train/`` (``loss_adv``, ``attack_seconds``)."""

    loss: Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Defense(nn.Module):
    """Base class. ``name`` labels results; ``trains`` lists the towers that receive updates."""

    name: str = "defense"
    trains: tuple[str, ...] = ("vision", "text")

    def attach(self, encoder: VLEncoder) -> None:
        """Called once with the starting encoder, before training (FARE copies it here)."""

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
