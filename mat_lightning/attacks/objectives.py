"""What image attacks maximise: one function per objective, selected by name (a plain dict, DiT's registry style).

Every objective maps the adversarial image embeddings and a :class:`Guidance` (what is fixed during the attack,
computed once without gradients) to a scalar **to maximise**:

* ``contrastive`` — the CLIP contrastive loss of the batch (adversarial images vs. their captions): supervised PGD,
  MAT's training-time image attack ("SupPGD" in the paper).
* ``caption_cosine`` — minus the summed cosine between each image and all of its (guiding) captions, averaged over
  images: SGA's set-level image loss (Zoky-2020/SGA ``attacker.py::loss_func``).
* ``embedding_kl`` — KL between softmax-ed adversarial and clean image embeddings, Co-Attack's image term
  (``KLDivLoss(batchmean)(log_softmax(adv), softmax(clean))``; the softmax runs over embedding dimensions).
* ``embedding_l2`` — FARE: squared L2 of *unnormalised* embeddings to a reference, sum over dims, mean over batch.
* ``cross_entropy`` — CE of ``logit_scale * cos(image, class_emb)`` against labels: TeCoA, and the objective that
  lets us compare with ``torchattacks.PGD`` exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mat_lightning.losses import contrastive_loss, fare_loss


@dataclass
class Guidance:
    """Everything an objective may read; fields an objective does not need stay None.

    Attributes:
        txt2img: long[T], the image row of each guiding caption.
        text_emb: float[T, D], L2-normalised embeddings of the guiding captions (clean or adversarial).
        clean_emb: float[B, D], L2-normalised embeddings of the clean images.
        reference_emb: float[B, D], unnormalised reference embeddings (FARE: the frozen encoder on clean images).
        class_emb: float[C, D] and labels: long[B] for ``cross_entropy``.
        logit_scale: the encoder's temperature (contrastive, cross_entropy).
    """

    txt2img: Tensor | None = None
    text_emb: Tensor | None = None
    clean_emb: Tensor | None = None
    reference_emb: Tensor | None = None
    class_emb: Tensor | None = None
    labels: Tensor | None = None
    logit_scale: Tensor | None = None

    def float(self) -> Guidance:
        """A copy with every floating tensor in float32 (embeddings computed under a bf16 autocast)."""
        return dataclasses.replace(
            self,
            **{
                f.name: v.float()
                for f in dataclasses.fields(self)
                if isinstance(v := getattr(self, f.name), torch.Tensor) and v.is_floating_point()
            },
        )


def kl_from(adv: Tensor, target: Tensor) -> Tensor:
    """Co-Attack's KL term: ``KLDivLoss(reduction='batchmean')(log_softmax(adv), softmax(target))``."""
    return F.kl_div(F.log_softmax(adv, dim=-1), F.softmax(target, dim=-1), reduction="batchmean")


def contrastive(emb: Tensor, g: Guidance) -> Tensor:
    return contrastive_loss(emb, g.text_emb, g.logit_scale, g.txt2img)


def caption_cosine(emb: Tensor, g: Guidance) -> Tensor:
    cos = (emb[g.txt2img] * g.text_emb).sum(dim=-1)  # (T,) cosine of each caption with its image
    per_image = emb.new_zeros(emb.shape[0]).index_add(0, g.txt2img, cos)  # sum over the image's captions
    return -per_image.mean()


def embedding_kl(emb: Tensor, g: Guidance) -> Tensor:
    return kl_from(emb, g.clean_emb)


def embedding_l2(emb: Tensor, g: Guidance) -> Tensor:
    return fare_loss(emb, g.reference_emb)


def cross_entropy(emb: Tensor, g: Guidance) -> Tensor:
    return F.cross_entropy(g.logit_scale * emb @ g.class_emb.T, g.labels)


def caption_prototypes(
    text_emb: Tensor, txt2img: Tensor, n_rows: int, image_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Classes of a retrieval batch for the cross-entropy objectives (TeCoA, torchattacks adapters).

    Each distinct image is a class, represented by the L2-normalised mean of its captions' embeddings.

    Args:
        text_emb: float[T, D] caption embeddings; txt2img: long[T] row of each caption's image.
        n_rows: B, the number of image rows.
        image_ids: long[B] image identities (rows with equal ids form one class); default: every row its own.

    Returns:
        (class_emb float[C, D], labels long[B]) with labels[b] the class of row b.
    """
    if image_ids is None:
        image_ids = torch.arange(n_rows, device=text_emb.device)
    ids, labels = torch.unique(image_ids, return_inverse=True)
    proto = text_emb.new_zeros(len(ids), text_emb.shape[1]).index_add(0, labels[txt2img], text_emb)
    return F.normalize(proto, dim=-1), labels


ImageObjective = Callable[[Tensor, Guidance], Tensor]

IMAGE_OBJECTIVES: dict[str, ImageObjective] = {
    "contrastive": contrastive,
    "caption_cosine": caption_cosine,
    "embedding_kl": embedding_kl,
    "embedding_l2": embedding_l2,
    "cross_entropy": cross_entropy,
}
# Objectives computed on unnormalised embeddings (FARE); the others use L2-normalised ones.
UNNORMALISED = {"embedding_l2"}
