"""Clean fine-tuning: the CLIP contrastive loss on the data as it is (no attack). The baseline every defense beats."""

from __future__ import annotations

from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import Defense, DefenseOutput, clip_loss
from mat_lightning.models.encoder import VLEncoder


class Clean(Defense):
    """Symmetric InfoNCE on clean pairs, both towers trained; multi-positive when a batch has k > 1 captions/image.

    (``clean_weight`` has no meaning here: the whole loss is clean.)
    """

    name = "clean"

    def __init__(self) -> None:
        super().__init__(clean_weight=0.0)

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        loss = clip_loss(encoder, batch.images, batch.captions, batch)
        return DefenseOutput(loss, {"loss_clean": loss.item()})
