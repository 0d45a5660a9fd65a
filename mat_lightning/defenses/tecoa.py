"""TeCoA — text-guided contrastive adversarial training (Mao et al., ICLR 2023), adapted to retrieval.

TeCoA fine-tunes the **vision tower only** with cross-entropy of ``logit_scale · cos(f(x + δ), text classes)`` and an
inner PGD maximising the same cross-entropy (cvlab-columbia/ZSRobust4FoundationModel; RobustVLM ``--loss ce``).
Retrieval has no class prompts, so the classes of a batch are its images, each represented by the normalised mean
embedding of its captions from the (frozen) text tower; the label of an image is its own class. Images that appear
twice in a batch (same ``image_id``) form one class.
"""

from __future__ import annotations

import torch

from mat_lightning.attacks.base import attacking
from mat_lightning.attacks.objectives import Guidance, caption_prototypes, cross_entropy
from mat_lightning.attacks.pgd import PGD
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import Defense, DefenseOutput, timed
from mat_lightning.models.encoder import VLEncoder


class TeCoA(Defense):
    """Vision-only adversarial fine-tuning on the caption-class cross-entropy.

    Args:
        attack: budget and step rule of the inner PGD (default: L∞, ε = 2/255, 2 steps of 1/255); its objective is
            replaced by the cross-entropy above.
        clean_weight: weight of the same cross-entropy on clean images.
        eps_255: if set, the training attack's ε (1/255 units), its step scaled with it (the suite-level rule of
            README "Budgets"); None keeps the attack's own.
    """

    name = "tecoa"
    default_parts = {"attack": (PGD, {"eps_255": 2, "steps": 2, "step_255": 1})}
    trains = ("vision",)

    def __init__(
        self, attack: PGD | None = None, clean_weight: float = 0.0, eps_255: float | None = None
    ) -> None:
        super().__init__(clean_weight)
        self.attack = self.part("attack", attack)
        self.override_budgets(eps_255)

    @torch.no_grad()
    def classes(self, encoder: VLEncoder, batch: RetrievalBatch) -> Guidance:
        """Caption-set prototypes (one per distinct image) and each row's label."""
        text = encoder.encode_text(batch.captions)  # (T, D); the text tower is frozen in TeCoA
        class_emb, labels = caption_prototypes(text, batch.txt2img, len(batch), batch.image_ids)
        return Guidance(class_emb=class_emb, labels=labels, logit_scale=encoder.logit_scale.detach())

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        g = self.classes(encoder, batch)
        logs: dict[str, float] = {}
        with timed(logs), attacking(encoder), self.attack.keyed(batch.image_ids, batch.sample_keys):
            adv = self.attack.perturb(encoder, batch.images, cross_entropy, g)
        loss_adv = cross_entropy(encoder.encode_image(adv), g)
        return self.with_clean_term(
            loss_adv, lambda: cross_entropy(encoder.encode_image(batch.images), g), logs
        )
