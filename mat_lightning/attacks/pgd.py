"""Projected gradient descent on images, with a pluggable objective (torchattacks issue #86 asks for exactly this).

Follows torchattacks' ``PGD`` (random start ``U(-ε, ε)`` clamped to [0, 1], ``x += α·sign(∇)``, projection to the
ε-ball then to [0, 1], last iterate returned) and adds what the VL robustness papers use:

* ``random_start="one_sided"``: Co-Attack's code starts from ``x + U(0, ε)`` (``uniform_(0, 1)·ε``), not from the
  symmetric ball; this reproduces it (the same uniform draws as the symmetric start, scaled by ε). Unlike Co-Attack
  we clamp the start to [0, 1] before the first forward; ``clamp_start=False`` does not (Co-Attack's reference);

* ``norm="l2"`` (step along the L2-normalised gradient, projection onto the L2 ball);
* ``momentum`` as RobustVLM's ``pgd_train.py`` (FARE/TeCoA training): a velocity of normalised gradients,
  re-normalised every step. Under L∞ this is exactly sign-PGD (``sign(0.9·v + sign(g)) = sign(g)``), as in
  RobustVLM; for MI-FGSM-style momentum use ``TorchattacksAttack("MIFGSM")``;
* objectives by name (:mod:`~mat_lightning.attacks.objectives`), or any callable when attacks are composed;
* ``views``: a function giving extra differentiable views of the adversarial image (SGA's rescaled copies); the
  objective is summed over the image and its views, which are encoded in one batch with the image when their shapes
  agree (one forward and one backward per step).

Defaults are the VLP attack papers' evaluation setting: L∞, ε = 2/255, 10 steps of 0.5/255 (SGA).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from mat_lightning import progress
from mat_lightning.attacks.base import Attack, AttackResult, SampleRandomness
from mat_lightning.attacks.objectives import (
    IMAGE_OBJECTIVES,
    UNNORMALISED,
    Gallery,
    Guidance,
    ImageObjective,
    caption_prototypes,
)
from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder, encode_image_unnormalised

log = logging.getLogger(__name__)

Views = Callable[[Tensor, SampleRandomness], list[Tensor]]


class PGD(Attack):
    """Image PGD.

    Args:
        eps_255: budget in 1/255 of the pixel range (L∞: per pixel; L2: radius of the whole image's perturbation).
        steps: iterations.
        step_255: step size in 1/255 units.
        norm: ``linf`` or ``l2``.
        random_start: ``symmetric`` (or ``True``): start from a uniform point of the ε-ball (L∞) / a random point
            of the L2 ball; ``one_sided``: ``x + U(0, ε)`` per pixel, Co-Attack's code (L∞ only); ``none``
            (or ``False``): start at the clean image.
        momentum: RobustVLM-style momentum on normalised gradients (0 = plain PGD; no effect under L∞).
        clamp_start: clamp the random start to [0, 1] before the first forward (False: Co-Attack's code, whose
            first forward may see pixels up to 1 + ε).
        objective: what is maximised: ``contrastive`` (in-batch negatives), ``split_contrastive`` (negatives from
            the evaluation split's clean embeddings; robust evaluation only), ``caption_cosine``, ``embedding_kl``,
            ``embedding_l2``, ``cross_entropy``.
        seed: seed of the random start (per image when the call gives sample keys).
        name: the row label (default ``pgd``; see :class:`~mat_lightning.attacks.base.Attack`).
    """

    name = "pgd"
    modality = "image"

    def __init__(
        self,
        eps_255: float = 2.0,
        steps: int = 10,
        step_255: float = 0.5,
        norm: Literal["linf", "l2"] = "linf",
        random_start: bool | Literal["symmetric", "one_sided", "none"] = "symmetric",
        momentum: float = 0.0,
        objective: str = "contrastive",
        clamp_start: bool = True,
        seed: int | None = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(seed, name)
        self.clamp_start = bool(clamp_start)
        if objective not in IMAGE_OBJECTIVES:
            raise ConfigError(f"PGD objective={objective!r}; choose one of {sorted(IMAGE_OBJECTIVES)}")
        if norm not in ("linf", "l2"):
            raise ConfigError(f"PGD norm={norm!r}; choose linf or l2")
        if eps_255 < 0 or steps < 0 or step_255 < 0:
            raise ConfigError(
                f"PGD budgets must be >= 0 (eps_255={eps_255}, steps={steps}, step_255={step_255})"
            )
        self._eps_255, self.steps, self.step_255 = float(eps_255), steps, float(step_255)
        if not 0 <= momentum < 1:
            raise ConfigError(f"PGD momentum={momentum}: must be in [0, 1)")
        if random_start is True or random_start is False:
            random_start = "symmetric" if random_start else "none"
        if random_start not in ("symmetric", "one_sided", "none"):
            raise ConfigError(f"PGD random_start={random_start!r}; choose symmetric, one_sided or none")
        if random_start == "one_sided" and norm != "linf":
            raise ConfigError(
                "PGD random_start=one_sided (Co-Attack's U(0, eps) start) is defined for norm=linf only"
            )
        self.norm, self.random_start, self.momentum, self.objective = norm, random_start, momentum, objective
        self._gallery: Gallery | None = None

    @property
    def eps_255(self) -> float:
        return self._eps_255

    def with_eps(self, eps_255: float) -> PGD:
        other = copy.copy(self)
        other._generator = None
        other._eps_255 = float(eps_255)
        if self._eps_255 > 0:  # keep the steps covering the same share of the ball
            other.step_255 = self.step_255 * eps_255 / self._eps_255
        return other

    def with_gallery(self, gallery: Gallery) -> PGD:
        other = copy.copy(self)
        other._gallery = gallery
        return other

    # -- the attack ---------------------------------------------------------------------------------------------------

    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        guidance = self.guidance(encoder, images, captions, txt2img)
        adv = self.perturb(
            encoder, images, IMAGE_OBJECTIVES[self.objective], guidance, self.objective not in UNNORMALISED
        )
        return AttackResult(adv, captions)

    @torch.no_grad()
    def guidance(self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor) -> Guidance:
        """What the configured objective needs, from the clean inputs."""
        g = Guidance(txt2img=txt2img, logit_scale=encoder.logit_scale.detach())
        if self.objective == "split_contrastive":
            if self._gallery is None or self.image_ids is None:
                raise ConfigError(
                    "PGD objective=split_contrastive needs the evaluation split's clean embeddings and the images' "
                    "ids: it runs inside robust evaluation (robust_eval.attacks); to attack a batch on its own or "
                    "in training use objective=contrastive (in-batch negatives)"
                )
            g.gallery, g.image_ids = self._gallery.to(images.device), self.image_ids.to(images.device)
        if self.objective in ("contrastive", "split_contrastive", "caption_cosine", "cross_entropy"):
            g.text_emb = encoder.encode_text(captions)
        if self.objective in ("contrastive", "cross_entropy") and images.shape[0] < 2:
            # with one image there is no negative: the loss is constant and PGD keeps only its random start
            log.warning(
                "PGD objective=%s on a batch of 1 image has no negatives (zero gradient)", self.objective
            )
        if self.objective == "embedding_kl":
            g.clean_emb = encoder.encode_image(images)
        if self.objective == "embedding_l2":
            g.reference_emb = encode_image_unnormalised(encoder, images)
        if self.objective == "cross_entropy":  # classes = the batch's images, each the mean of its captions
            g.class_emb, g.labels = caption_prototypes(g.text_emb, txt2img, images.shape[0])
        return g

    def perturb(
        self,
        encoder: VLEncoder,
        images: Tensor,
        objective: ImageObjective,
        guidance: Guidance,
        normalize: bool = True,
        views: Views | None = None,
    ) -> Tensor:
        """The PGD loop: maximise ``objective(encode(x_adv), guidance)`` (summed over ``views``) in the budget.

        Args:
            images: float[B, 3, H, W] in [0, 1], the clean images (the centre of the ball).
            normalize: whether the objective reads L2-normalised embeddings.
            views: optional extra views of the adversarial image, each encoded and added to the objective.

        Returns:
            float[B, 3, H, W] in [0, 1] with ``‖x_adv - images‖ <= eps``.
        """
        eps, alpha = self.eps_255 / 255.0, self.step_255 / 255.0
        rng = self.randomness(images.device, self.sample_keys)  # per image when the call gave sample keys
        x0 = images.detach()
        adv = x0.clone()
        if self.random_start != "none" and eps > 0:
            if self.norm == "linf":
                u = rng.uniform(adv.shape, adv.dtype)
                # U(0, ε) as Co-Attack's uniform_(0, 1) * ε, else U(-ε, ε)
                noise = u * eps if self.random_start == "one_sided" else (2 * u - 1) * eps
                adv = adv + noise
            else:
                direction = rng.normal(adv.shape, adv.dtype)
                radius = rng.uniform((adv.shape[0], 1, 1, 1), adv.dtype)
                adv = adv + eps * radius * direction / _l2(direction)
            if self.clamp_start:
                adv = adv.clamp(0, 1)
        velocity = torch.zeros_like(adv)
        guidance = guidance.float()
        # DESIGN §4: the keyword is passed only where it is needed (FARE), so DESIGN's encode_image(images) works
        encode = encoder.encode_image if normalize else partial(encode_image_unnormalised, encoder)
        for done in range(1, self.steps + 1):
            adv.requires_grad_(True)
            inputs = [adv] + (views(adv, rng) if views is not None else [])
            if all(v.shape == adv.shape for v in inputs[1:]):  # SGA's views come back at the image's size:
                embs = encode(torch.cat(inputs)).chunk(len(inputs))  # one pass
            else:
                embs = [encode(v) for v in inputs]
            # the encoder may run under a bf16 autocast; the objective (softmaxes, KLs) runs in float32
            with torch.autocast(adv.device.type, enabled=False):
                loss = sum(objective(e.float(), guidance) for e in embs)
            (grad,) = torch.autograd.grad(loss, adv)
            grad = torch.nan_to_num(grad)
            adv = adv.detach()
            step = _unit(grad, self.norm)
            if self.momentum > 0:  # RobustVLM: velocity of normalised gradients, re-normalised every step
                velocity = _unit(self.momentum * velocity + step, self.norm)
                step = velocity
            adv = adv + alpha * step
            delta = adv - x0
            delta = (
                delta.clamp(-eps, eps) if self.norm == "linf" else delta * (eps / _l2(delta)).clamp(max=1.0)
            )
            adv = (x0 + delta).clamp(0, 1)
            progress.step(done, self.steps, "PGD step")  # a bar over few long batches still moves
        return adv.detach()


def _unit(x: Tensor, norm: str) -> Tensor:
    return x.sign() if norm == "linf" else x / _l2(x)


def _l2(x: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast over [B, C, H, W]."""
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
