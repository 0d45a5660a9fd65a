"""MMCoA — multimodal contrastive adversarial training (Zhou et al., arXiv 2404.19287; ElleZWQ/MMCoA ``MMCoA.py``).

Image and text are attacked **independently** (each against the clean other modality) and the model is trained on
``λ_t·CLIP(clean image, adversarial text) + λ_i·CLIP(adversarial image, clean text)``, where MAT trains on the
jointly attacked pair. MMCoA's code sums the two cross-entropies of each CLIP term and weights them by 0.5
(``--lamda``, ``--lamda_advtxt``); with our CLIP loss being the *mean* of the two directions, λ = 1 is the same
objective. Its text attack is Co-Attack's KL BERT-Attack, its image attack PGD on the CLIP cross-entropy; its own
code evaluates zero-shot classification only, so our retrieval table is the first like-for-like comparison.
"""

from __future__ import annotations

from mat_lightning.attacks.bert_attack import BertAttack
from mat_lightning.attacks.pgd import PGD
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import Defense, DefenseOutput, batch_keys, clip_loss, timed
from mat_lightning.models.encoder import VLEncoder


class MMCoA(Defense):
    """Independent image and text attacks, two CLIP terms.

    Args:
        text_attack: default BERT-Attack with the ``embedding_kl`` objective (Co-Attack's, as MMCoA uses), 1 word.
        image_attack: default L∞ PGD, ε = 2/255, 2 steps of 1/255, contrastive objective.
        lambda_text, lambda_image: weights of the two terms.
        eps_255: if set, the training attack's ε (1/255 units), its step scaled with it (the suite-level rule of
            README "Budgets"); None keeps the attack's own.
        max_words: if set, the training text attack's word budget; None keeps the attack's own.
    """

    name = "mmcoa"
    default_parts = {
        "text_attack": (BertAttack, {"max_words": 1, "objective": "embedding_kl"}),
        "image_attack": (PGD, {"eps_255": 2, "steps": 2, "step_255": 1}),
    }

    def __init__(
        self,
        text_attack: BertAttack | None = None,
        image_attack: PGD | None = None,
        lambda_text: float = 1.0,
        lambda_image: float = 1.0,
        eps_255: float | None = None,
        max_words: int | None = None,
    ) -> None:
        super().__init__(0.0)
        self.text_attack = self.part("text_attack", text_attack)
        self.image_attack = self.part("image_attack", image_attack)
        self.lambda_text, self.lambda_image = lambda_text, lambda_image
        self.override_budgets(eps_255, max_words)

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        logs: dict[str, float] = {}
        with timed(logs):
            adv_captions = self.text_attack(
                encoder, batch.images, batch.captions, batch.txt2img, **batch_keys(batch)
            ).captions
            adv_images = self.image_attack(
                encoder, batch.images, batch.captions, batch.txt2img, **batch_keys(batch)
            ).images
        loss_text = clip_loss(encoder, batch.images, adv_captions, batch)
        loss_image = clip_loss(encoder, adv_images, batch.captions, batch)
        logs.update(loss_adv_text=loss_text.item(), loss_adv_image=loss_image.item())
        return DefenseOutput(self.lambda_text * loss_text + self.lambda_image * loss_image, logs)
