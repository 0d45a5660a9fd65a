"""FARE — unsupervised robust fine-tuning of the vision tower (Schlarmann et al., ICML 2024; chs20/RobustVLM).

Loss ``‖f_θ(x + δ) − f_orig(x)‖²`` on **unnormalised** embeddings (sum over dimensions, mean over the batch), with
``f_orig`` a frozen copy of the starting encoder and an inner PGD maximising the same distance. Only the vision tower
is trained, so the text tower (and the captions) play no part. The frozen copy is a submodule: it is saved in
checkpoints (a resumed run keeps the *original* reference) and moved with the model.

The inner attack defaults to RobustVLM's README setting: L∞ PGD, 10 steps of 1/255 with momentum 0.9 (which, in
RobustVLM's formulation, does not change an L∞ attack), at ε = 2/255.
"""

from __future__ import annotations

import copy

import torch

from mat_lightning.attacks.base import attacking
from mat_lightning.attacks.objectives import Guidance, embedding_l2
from mat_lightning.attacks.pgd import PGD
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import Defense, DefenseOutput, timed
from mat_lightning.errors import ConfigError
from mat_lightning.losses import fare_loss
from mat_lightning.models.encoder import VLEncoder, encode_image_unnormalised


class FARE(Defense):
    """Vision-only adversarial fine-tuning towards the frozen starting encoder's clean embeddings.

    Args:
        attack: budget and step rule of the inner PGD; its objective is replaced by the embedding distance.
        clean_weight: ``cw`` of RobustVLM's ``--clean_weight``: the loss is ``cw·clean + (1 − cw)·adversarial``
            (a convex mix, unlike the other defenses' ``adversarial + cw·clean``); in [0, 1].
        eps_255: if set, the training attack's ε (1/255 units), its step scaled with it (the suite-level rule of
            README "Budgets"); None keeps the attack's own.
    """

    name = "fare"
    default_parts = {"attack": (PGD, {"eps_255": 2, "steps": 10, "step_255": 1, "momentum": 0.9})}
    trains = ("vision",)

    def __init__(
        self, attack: PGD | None = None, clean_weight: float = 0.0, eps_255: float | None = None
    ) -> None:
        super().__init__(clean_weight)
        if clean_weight > 1:
            raise ConfigError(
                f"FARE clean_weight={clean_weight}: RobustVLM's convex mix needs a value in [0, 1]"
            )
        self.attack = self.part("attack", attack)
        self.override_budgets(eps_255)
        self.reference: VLEncoder | None = None

    def attach(self, encoder: VLEncoder) -> None:
        self.reference = copy.deepcopy(encoder)
        self.reference.requires_grad_(False)
        self.reference.eval()

    def train(self, mode: bool = True) -> FARE:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never changes mode
        return self

    def forward(self, encoder: VLEncoder, batch: RetrievalBatch) -> DefenseOutput:
        if self.reference is None:
            raise RuntimeError("FARE.attach(encoder) must run before training (MatModule does it)")
        with torch.no_grad():
            reference = encode_image_unnormalised(self.reference, batch.images)
        logs: dict[str, float] = {}
        with timed(logs), attacking(encoder), self.attack.keyed(batch.image_ids, batch.sample_keys):
            adv = self.attack.perturb(
                encoder, batch.images, embedding_l2, Guidance(reference_emb=reference), normalize=False
            )
        loss_adv = fare_loss(encode_image_unnormalised(encoder, adv), reference)
        logs["loss_adv"] = loss_adv.item()
        if self.clean_weight == 0:
            return DefenseOutput(loss_adv, logs)
        # RobustVLM's --clean_weight is a convex mix: cw * clean + (1 - cw) * adversarial.
        loss_clean = fare_loss(encode_image_unnormalised(encoder, batch.images), reference)
        logs["loss_clean"] = loss_clean.item()
        return DefenseOutput(self.clean_weight * loss_clean + (1 - self.clean_weight) * loss_adv, logs)
