"""Text-only adversarial training: BERT-Attack on the captions, then the CLIP loss on (image, adversarial caption).

The text counterpart of image AT (both towers trained). The attack is
:class:`~mat_lightning.attacks.bert_attack.BertAttack` (1 word, image-guided by default).
"""

from __future__ import annotations

from mat_lightning.attacks.bert_attack import BertAttack
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import Defense, DefenseOutput, batch_keys, changed_fraction, clip_loss, timed
from mat_lightning.models.encoder import VLEncoder


class TextAT(Defense):
    """Text-only adversarial training on the CLIP contrastive loss.

    Args:
        attack: the training-time text attack (default: BERT-Attack, bert-base-uncased, top-10, 1 word).
        clean_weight: weight of an extra clean CLIP loss.
        max_words: if set, the training text attack's word budget; None keeps the attack's own.
    """

    name = "text_at"
    default_parts = {"attack": (BertAttack, {"max_words": 1})}

    def __init__(
        self, attack: BertAttack | None = None, clean_weight: float = 0.0, max_words: int | None = None
    ) -> None:
        super().__init__(clean_weight)
        self.attack = self.part("attack", attack)
        self.override_budgets(None, max_words)

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        logs: dict[str, float] = {}
        with timed(logs):
            adv_captions = self.attack(
                encoder, batch.images, batch.captions, batch.txt2img, **batch_keys(batch)
            ).captions
        logs["captions_changed"] = changed_fraction(batch.captions, adv_captions)
        loss_adv = clip_loss(encoder, batch.images, adv_captions, batch)
        return self.with_clean_term(
            loss_adv, lambda: clip_loss(encoder, batch.images, batch.captions, batch), logs
        )
