"""What image attacks maximise: one function per objective, selected by name (a plain dict, DiT's registry style).

Every objective maps the adversarial image embeddings and a :class:`Guidance` (what is fixed during the attack,
computed once without gradients) to a scalar **to maximise**:

* ``contrastive`` — the CLIP contrastive loss of the batch (adversarial images vs. their captions): supervised PGD,
  MAT's training-time image attack ("SupPGD" in the paper). Its negatives are the other images and captions of the
  batch, so the result depends on how the data is batched.
* ``split_contrastive`` — the same loss with the whole evaluation split's clean embeddings (a :class:`Gallery`, which
  robust evaluation supplies) as negatives: each image's loss no longer depends on the rest of its batch, so the
  row is the same at any batch size and number of processes. The headline ``pgd`` row of the attack suites.
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
class Gallery:
    """The clean embeddings of a whole evaluation split: fixed negatives for ``split_contrastive``.

    Attributes:
        image_emb: float[N, D], L2-normalised; image_ids: long[N], their split indices.
        text_emb: float[M, D], L2-normalised; text_owner: long[M], the split index of each caption's image.
    """

    image_emb: Tensor
    image_ids: Tensor
    text_emb: Tensor
    text_owner: Tensor

    def to(self, device: torch.device | str) -> Gallery:
        return Gallery(
            *(t.to(device) for t in (self.image_emb, self.image_ids, self.text_emb, self.text_owner))
        )


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
        image_ids: long[B] split indices of the batch's images and gallery: the split's clean embeddings
            (``split_contrastive``).
    """

    txt2img: Tensor | None = None
    text_emb: Tensor | None = None
    clean_emb: Tensor | None = None
    reference_emb: Tensor | None = None
    class_emb: Tensor | None = None
    labels: Tensor | None = None
    logit_scale: Tensor | None = None
    image_ids: Tensor | None = None
    gallery: Gallery | None = None

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


def split_contrastive(emb: Tensor, g: Guidance) -> Tensor:
    """The contrastive loss with the split's clean embeddings as negatives, summed over the batch.

    Image->text: each adversarial image against each of its guiding captions (positive) and every gallery caption of
    another image (negatives); text->image: each guiding caption against its adversarial image and every gallery
    image with another id. A gallery entry of the same image is neither positive nor negative. Summed, not averaged,
    so that an image's gradient does not even scale with the batch size.
    """
    ids, gal = g.image_ids, g.gallery
    pos = g.logit_scale * (emb[g.txt2img] * g.text_emb).sum(dim=-1)  # (T,)
    i2t = (g.logit_scale * emb @ gal.text_emb.T).masked_fill(
        ids[:, None] == gal.text_owner[None, :], -torch.inf
    )
    t2i = (g.logit_scale * g.text_emb @ gal.image_emb.T).masked_fill(
        ids[g.txt2img][:, None] == gal.image_ids[None, :], -torch.inf
    )
    loss_i2t = (
        torch.logaddexp(pos, i2t.logsumexp(dim=1)[g.txt2img]) - pos
    )  # (T,): -log p(caption | its image)
    loss_t2i = torch.logaddexp(pos, t2i.logsumexp(dim=1)) - pos  # (T,): -log p(image | its caption)
    # i2t: mean over each image's captions (as contrastive_loss), summed over images
    n_captions = torch.zeros_like(emb[:, 0]).index_add(0, g.txt2img, torch.ones_like(pos))
    return (loss_i2t / n_captions[g.txt2img]).sum() / 2 + loss_t2i.sum() / 2


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
    "split_contrastive": split_contrastive,
    "embedding_kl": embedding_kl,
    "embedding_l2": embedding_l2,
    "cross_entropy": cross_entropy,
}
# Objectives computed on unnormalised embeddings (FARE); the others use L2-normalised ones.
UNNORMALISED = {"embedding_l2"}
