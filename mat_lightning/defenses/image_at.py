"""Image-only adversarial training: PGD on the contrastive loss, then the CLIP loss on (adversarial image, caption).

The standard AT baseline of the VL robustness papers (both towers trained). The attack is
:class:`~mat_lightning.attacks.pgd.PGD` with the ``contrastive`` objective (supervised PGD).
"""

from __future__ import annotations

from mat_lightning.attacks.pgd import PGD
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import Defense, DefenseOutput, batch_keys, clip_loss, timed
from mat_lightning.models.encoder import VLEncoder


class ImageAT(Defense):
    """Image-only adversarial training on the CLIP contrastive loss.

    Args:
        attack: the training-time image attack (default: L∞ PGD, ε = 2/255, 2 steps of 1/255, contrastive).
        clean_weight: weight of an extra clean CLIP loss.
        eps_255: if set, the training attack's ε (1/255 units), its step scaled with it (the suite-level rule of
            README "Budgets"); None keeps the attack's own.
    """

    name = "image_at"
    default_parts = {"attack": (PGD, {"eps_255": 2, "steps": 2, "step_255": 1, "objective": "contrastive"})}

    def __init__(
        self, attack: PGD | None = None, clean_weight: float = 0.0, eps_255: float | None = None
    ) -> None:
        super().__init__(clean_weight)
        self.attack = self.part("attack", attack)
        self.override_budgets(eps_255)

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        logs: dict[str, float] = {}
        with timed(logs):
            adv = self.attack(
                encoder, batch.images, batch.captions, batch.txt2img, **batch_keys(batch)
            ).images
        loss_adv = clip_loss(encoder, adv, batch.captions, batch)
        return self.with_clean_term(
            loss_adv, lambda: clip_loss(encoder, batch.images, batch.captions, batch), logs
        )
