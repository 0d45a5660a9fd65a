"""MAT and MAT+1:N — multimodal adversarial training (Waseda et al., arXiv 2405.18770, WACV 2026).

``min_θ E[ max_{δ, t'} L_con(f_θ(x + δ), g_θ(t')) ]``: each step builds an adversarial **pair** against the current
model, by default text first (BERT-Attack changing 1 word, guided by the clean image), then image (2-step L∞ PGD,
ε = 2/255, on the contrastive loss against the *adversarial* captions), and minimises the CLIP contrastive loss on
it. Order, budgets and word budget are config; an optional clean term has weight ``clean_weight`` (default 0).

MAT+1:N is the same objective over one-to-many pairs: the data module samples ``k > 1`` positives per image from
ground-truth and augmented captions (and augmented images, ``data.one_to_many``), and the loss treats every caption
of an image as a positive, never a negative (:func:`~mat_lightning.losses.contrastive_loss`). So ``MAT1N`` differs
from ``MAT`` in the data it is given; the class checks that it is given 1:N batches.

Where the paper is silent (PGD step size, the text attack's candidate objective) we follow the reference attack
code: step 1/255 so that 2 steps reach the ε-ball's surface; SGA's image-guided candidate choice.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from mat_lightning.attacks.bert_attack import BertAttack
from mat_lightning.attacks.pgd import PGD
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import (
    Defense,
    DefenseOutput,
    batch_keys,
    changed_fraction,
    clip_loss,
    timed,
)
from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder


class MAT(Defense):
    """Multimodal adversarial training: attack the caption, then the image against it; train on the pair.

    Args:
        text_attack: the word-level attack (default: BERT-Attack, 1 word, top-10, image-guided).
        image_attack: the pixel attack (default: L∞ PGD, ε = 2/255, 2 steps of 1/255, contrastive objective).
        order: ``text_first`` (the paper) or ``image_first``; the second attack is run against the first's output.
        clean_weight: weight of an extra clean CLIP loss (0 in the paper).
        eps_255: if set, the training attack's ε (1/255 units), its step scaled with it (the suite-level rule of
            README "Budgets"); None keeps the attack's own.
        max_words: if set, the training text attack's word budget; None keeps the attack's own.
    """

    name = "mat"
    default_parts = {
        "text_attack": (BertAttack, {"max_words": 1}),
        "image_attack": (PGD, {"eps_255": 2, "steps": 2, "step_255": 1}),
    }

    def __init__(
        self,
        text_attack: BertAttack | None = None,
        image_attack: PGD | None = None,
        order: Literal["text_first", "image_first"] = "text_first",
        clean_weight: float = 0.0,
        eps_255: float | None = None,
        max_words: int | None = None,
    ) -> None:
        super().__init__(clean_weight)
        if order not in ("text_first", "image_first"):
            raise ConfigError(f"MAT order={order!r}: use text_first or image_first")
        self.text_attack = self.part("text_attack", text_attack)
        self.image_attack = self.part("image_attack", image_attack)
        self.order = order
        self.override_budgets(eps_255, max_words)

    def adversarial_pair(self, encoder: VLEncoder, batch: RetrievalBatch) -> tuple[torch.Tensor, list[str]]:
        """(adversarial images, adversarial captions), each attack against the other's output."""
        images, captions, txt2img, keys = batch.images, batch.captions, batch.txt2img, batch_keys(batch)
        if self.order == "text_first":
            captions = self.text_attack(encoder, images, captions, txt2img, **keys).captions
            images = self.image_attack(encoder, images, captions, txt2img, **keys).images
        else:
            images = self.image_attack(encoder, images, captions, txt2img, **keys).images
            captions = self.text_attack(encoder, images, captions, txt2img, **keys).captions
        return images, captions

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        logs: dict[str, float] = {}
        with timed(logs):
            adv_images, adv_captions = self.adversarial_pair(encoder, batch)
        logs["captions_changed"] = changed_fraction(batch.captions, adv_captions)
        loss_adv = clip_loss(encoder, adv_images, adv_captions, batch)
        return self.with_clean_term(
            loss_adv, lambda: clip_loss(encoder, batch.images, batch.captions, batch), logs
        )


class MAT1N(MAT):
    """MAT over one-to-many augmented pairs (MAT+ in the paper); configure ``data.captions_per_image > 1`` and
    ``data.one_to_many``. Same arguments as :class:`MAT`."""

    name = "mat_1n"

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        if not getattr(self, "_checked", False):
            self._checked = True
            if batch.txt2img.numel() <= len(batch.image_ids) and batch.image_ids.unique().numel() == len(
                batch.image_ids
            ):
                rank_zero_warn(
                    "mat_1n got 1:1 batches (one caption per image): set data.captions_per_image > 1"
                )
        return super().forward(encoder, batch)
