"""Multimodal attacks, composed from the unimodal ones (no copied loops): Sep-Attack, Co-Attack, SGA.

A multimodal attack holds an image attack (:class:`~mat_lightning.attacks.pgd.PGD`, for its budget and step rule)
and a text attack (:class:`~mat_lightning.attacks.bert_attack.BertAttack`, for its search), and supplies the
objectives that couple them, as Co-Attack's ``MultiModalAttacker`` composes its attackers, without its mode
integers:

* ``sep_attack`` — text and image attacked independently, each with its own configured objective
  (the structure of Co-Attack's ``--adv 3``; its defaults here are contrastive PGD and image-guided BERT-Attack, where
  Co-Attack used KL objectives for both).
* ``co_attack`` — text first (BERT-Attack maximising the KL from the clean caption embedding), then image PGD
  maximising ``KL(softmax(e_img) ‖ softmax(e_adv)) + α·KL(softmax(e_txt_adv) ‖ softmax(e_adv))``, i.e. Co-Attack's
  ``KLDivLoss(batchmean)(log_softmax(adv), softmax(target))`` terms (``run_before_fusion``, α = 3).
* ``sga`` — text guided by the clean image; image guided by the *set* of its adversarial captions on the image and 4
  rescaled, noised copies; text again from the original captions, guided by the adversarial image
  (Zoky-2020/SGA ``SGAttacker.attack``).

``seed`` of a multimodal attack re-seeds its parts (so ``SGA(seed=1)`` and ``SGA(seed=0)`` differ); the sample keys
and the evaluation gallery of a call reach the parts too (per-image random starts and SGA noise).

Deliberate difference from the reference scripts: each image is attacked once with all of its captions (Co-Attack's
script attacks every image once per caption and keeps the last).

``reference=True`` on ``CoAttack`` / ``SGA`` reproduces the published code (Co-Attack @ 96f2c0eb
``RetrievalCLIPEval.py --adv 4``; SGA @ f49e6926 ``SGAttacker.attack`` as its CLIP scripts call it), proven against
it by ``tests/fixtures/reference_attacks``; the text part runs in
:class:`~mat_lightning.attacks.bert_attack.BertAttack` reference mode at the references' ``max_length``. Whatever the
parts are configured with, reference mode fixes:

* Co-Attack: text attack at ``max_length`` 30; each image attacked against its **last** caption only (the script's
  per-pair attack, where the last pair's image overwrites the others); start ``x + U(0, ε)`` not clamped to [0, 1];
  the adversarial caption's embedding for the image loss read at 77 BERT tokens;
* SGA: text attacks at ``max_length`` 77; the guiding adversarial captions of the image attack read at 30 BERT
  tokens (the script's ``max_lemgth=77`` keyword is misspelt, so the default 30 applies); the scaled views clamped to
  [0, 1] *after* the downscale (noise added unclamped).

The budget (ε, steps, step size), α and the scales stay configurable. The random draws remain ours (per image,
keyed): the fixture injects them into the published code, which otherwise draws from numpy's / torch's global
generators.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from mat_lightning import progress
from mat_lightning.attacks.base import Attack, AttackResult, SampleRandomness
from mat_lightning.attacks.bert_attack import BertAttack
from mat_lightning.attacks.objectives import Gallery, Guidance, caption_cosine, kl_from
from mat_lightning.attacks.pgd import PGD
from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder


class _Composed(Attack):
    modality = "multimodal"
    #: the part each argument left unset gets: ``{argument: (class, keyword arguments)}``; the ``mat`` CLI writes
    #: them into the config (with the data's masked LM), so ``--print_config`` and config.yaml show them
    default_parts: dict[str, tuple[type, dict]] = {
        "image_attack": (PGD, {"eps_255": 2.0, "steps": 10, "step_255": 0.5}),
        "text_attack": (BertAttack, {}),
    }

    def __init__(
        self,
        image_attack: PGD | None,
        text_attack: BertAttack | None,
        seed: int | None,
        name: str | None = None,
    ) -> None:
        super().__init__(seed, name)
        parts = {"image_attack": image_attack, "text_attack": text_attack}
        for key, given in parts.items():
            setattr(self, key, (given if given is not None else _build(self.default_parts[key])).clone())
        if seed is not None:  # the composite's seed governs its parts' randomness (random start, SGA noise)
            self.image_attack.seed = self.text_attack.seed = seed

    @property
    def eps_255(self) -> float:
        return self.image_attack.eps_255

    def prepare(self, device: torch.device | str) -> None:
        self.image_attack.prepare(device)
        self.text_attack.prepare(device)

    def with_eps(self, eps_255: float) -> Attack:
        other = self.clone()
        other.image_attack = self.image_attack.with_eps(eps_255)
        return other

    def with_max_words(self, max_words: int) -> Attack:
        other = self.clone()
        other.text_attack = self.text_attack.with_max_words(max_words)
        return other

    def clone(self) -> Attack:
        other = copy.copy(self)
        other._generator = None
        other.image_attack = self.image_attack.clone()
        other.text_attack = self.text_attack.clone()
        return other

    def with_gallery(self, gallery: Gallery) -> Attack:
        other = copy.copy(self)
        other.image_attack = self.image_attack.with_gallery(gallery)
        other.text_attack = self.text_attack.with_gallery(gallery)
        return other

    @contextmanager
    def keyed(self, image_ids: Tensor | None, sample_keys: Tensor | None = None) -> Iterator[None]:
        with (
            super().keyed(image_ids, sample_keys),
            self.image_attack.keyed(image_ids, sample_keys),
            self.text_attack.keyed(image_ids, sample_keys),
        ):
            yield


def _build(part: tuple[type, dict]) -> Attack:
    cls, kwargs = part
    return cls(**kwargs)


class SepAttack(_Composed):
    """Image and text attacked independently (each against the clean other modality).

    Args:
        image_attack: the image attack with its own objective (default: PGD ε = 2/255, 10 x 0.5/255, contrastive).
        text_attack: the text attack with its own objective (default: BERT-Attack, image-guided).
        name: the row label (default ``sep_attack``; see :class:`~mat_lightning.attacks.base.Attack`).
    """

    name = "sep_attack"

    def __init__(
        self,
        image_attack: PGD | None = None,
        text_attack: BertAttack | None = None,
        seed: int | None = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(image_attack, text_attack, seed, name)

    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        text_share = _text_share(self.image_attack)
        with progress.part(0, text_share, "text"):
            adv_captions = self.text_attack.forward(encoder, images, captions, txt2img).captions
        with progress.part(text_share, 1, "image"):
            adv_images = self.image_attack.forward(encoder, images, captions, txt2img).images
        return AttackResult(adv_images, adv_captions)


class CoAttack(_Composed):
    """Co-Attack (Zhang et al., ACM MM 2022), unimodal-embedding (CLIP) variant.

    Args:
        image_attack: budget and step rule of the image part (default ε = 2/255, 10 steps of 1.25·ε/10 = 0.25/255,
            Co-Attack's setting); its own objective is replaced by Co-Attack's.
        text_attack: the text part; its objective is replaced by ``embedding_kl``.
        alpha: weight of the image-text KL term (Co-Attack's ``--alpha``, 3.0).
        reference: reproduce the published code (module docstring).
        name: the row label (default ``co_attack``; see :class:`~mat_lightning.attacks.base.Attack`).
    """

    name = "co_attack"
    default_parts = {
        **_Composed.default_parts,
        "image_attack": (PGD, {"eps_255": 2.0, "steps": 10, "step_255": 0.25}),
    }

    def __init__(
        self,
        image_attack: PGD | None = None,
        text_attack: BertAttack | None = None,
        alpha: float = 3.0,
        reference: bool = False,
        seed: int | None = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(image_attack, text_attack, seed, name)
        if alpha < 0:
            raise ConfigError(f"CoAttack alpha={alpha}: must be >= 0")
        self.alpha, self.reference = alpha, reference
        if reference:
            self.text_attack = self.text_attack.as_reference(max_length=30)
            self.image_attack.random_start, self.image_attack.clamp_start = "one_sided", False

    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        text_share = _text_share(self.image_attack)
        with progress.part(0, text_share, "text"):
            adv_captions = self.text_attack.perturb(encoder, captions, txt2img, "embedding_kl")
        if self.reference:
            with progress.part(text_share, 1, "image"):
                adv_images = self._reference_images(encoder, images, adv_captions, txt2img)
            return AttackResult(adv_images, adv_captions)
        with torch.no_grad():
            guidance = Guidance(
                txt2img=txt2img,
                text_emb=encoder.encode_text(adv_captions),
                clean_emb=encoder.encode_image(images),
            )
        alpha = self.alpha

        def objective(emb: Tensor, g: Guidance) -> Tensor:
            return kl_from(emb, g.clean_emb) + alpha * kl_from(emb[g.txt2img], g.text_emb)

        with progress.part(text_share, 1, "image"):
            adv_images = self.image_attack.perturb(encoder, images, objective, guidance)
        return AttackResult(adv_images, adv_captions)

    def _reference_images(
        self, encoder: VLEncoder, images: Tensor, adv_captions: list[str], txt2img: Tensor
    ) -> Tensor:
        """The script's per-(image, caption) attack, of which each image keeps the last pair's result: each image
        attacked against its last caption (an image without captions is never attacked, as in the script)."""
        n = images.shape[0]
        order = torch.arange(len(adv_captions), device=txt2img.device)
        last = torch.full((n,), -1, dtype=torch.long, device=txt2img.device).scatter_reduce(
            0, txt2img, order, "amax"
        )
        has_caption = last >= 0
        with torch.no_grad():
            clean_emb = encoder.encode_image(images)
            text_emb = clean_emb.clone()  # rows without a caption: any target (their result is discarded)
            if bool(has_caption.any()):
                rows = last[has_caption].tolist()
                text_emb[has_caption] = self.text_attack.encode(
                    encoder, [adv_captions[t] for t in rows], view_length=77
                ).to(text_emb)
        guidance = Guidance(
            txt2img=torch.arange(n, device=images.device), text_emb=text_emb, clean_emb=clean_emb
        )
        alpha = self.alpha

        def objective(emb: Tensor, g: Guidance) -> Tensor:
            return kl_from(emb, g.clean_emb) + alpha * kl_from(emb, g.text_emb)

        adv = self.image_attack.perturb(encoder, images, objective, guidance)
        return torch.where(has_caption.view(-1, 1, 1, 1).to(adv.device), adv, images)


def _text_share(image_attack: Attack, text_passes: int = 1) -> float:
    """The share of a batch's progress bar given to each text pass: as much as one step of the image attack."""
    return 1 / (text_passes + max(1, int(getattr(image_attack, "steps", 1) or 1)))


class ScaledViews:
    """SGA's scale-invariant copies: ``x + N(0, σ²)`` clamped, resized to ``s·H`` and back (bicubic), per scale.

    ``clamp_after_downscale=True`` is SGA's code: the noisy image is downscaled unclamped and clamped to [0, 1]
    after the downscale (ours clamps the noisy image, so the downscale never sees pixels outside [0, 1]).
    """

    def __init__(
        self, scales: Sequence[float], noise_std: float, clamp_after_downscale: bool = False
    ) -> None:
        self.scales, self.noise_std = list(scales), noise_std
        self.clamp_after_downscale = clamp_after_downscale

    def __call__(self, x: Tensor, rng: SampleRandomness) -> list[Tensor]:
        size = x.shape[-2:]
        views = []
        for s in self.scales:
            noise = rng.normal(x.shape, x.dtype) * self.noise_std
            noisy = x + noise
            if not self.clamp_after_downscale:
                noisy = noisy.clamp(0, 1)
            small = F.interpolate(
                noisy,
                size=(max(1, int(size[0] * s)), max(1, int(size[1] * s))),
                mode="bicubic",
                align_corners=False,
            )
            if self.clamp_after_downscale:
                small = small.clamp(0, 1)
            views.append(F.interpolate(small, size=size, mode="bicubic", align_corners=False))
        return views


class SGA(_Composed):
    """Set-level Guidance Attack (Lu et al., ICCV 2023).

    Args:
        image_attack: budget and step rule of the image part (default ε = 2/255, 10 x 0.5/255, SGA's setting); its
            objective is replaced by the set-level caption cosine over the image and its rescaled copies.
        text_attack: the text part; its objective is replaced by ``image_cosine`` (guided by the clean, then the
            adversarial, image).
        scales: rescaling factors of the image copies (SGA: 0.5, 0.75, 1.25, 1.5).
        noise_std: Gaussian noise added to each copy (SGA: 0.05).
        reference: reproduce the published code (module docstring).
        name: the row label (default ``sga``; see :class:`~mat_lightning.attacks.base.Attack`).
    """

    name = "sga"

    def __init__(
        self,
        image_attack: PGD | None = None,
        text_attack: BertAttack | None = None,
        scales: list[float] | None = None,
        noise_std: float = 0.05,
        reference: bool = False,
        seed: int | None = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(image_attack, text_attack, seed, name)
        self.scales = list(scales) if scales is not None else [0.5, 0.75, 1.25, 1.5]
        if any(s <= 0 for s in self.scales) or noise_std < 0:
            raise ConfigError(f"SGA scales={self.scales} must be > 0 and noise_std={noise_std} >= 0")
        self.noise_std, self.reference = noise_std, reference
        if reference:
            self.text_attack = self.text_attack.as_reference(max_length=77)

    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        # three passes on the progress bar (a batch of SGA can take half a minute), each text pass counted as one
        # image step (on a CPU, 128 images: ~2 s and ~1 s against ~1.2 s per step)
        text_share = _text_share(self.image_attack, text_passes=2)
        with progress.part(0, text_share, "text pass 1/2"):
            with torch.no_grad():
                clean_img = encoder.encode_image(images)
            # MLM candidates and word ranking do not depend on the guiding image: prepared once for both passes
            prepared = self.text_attack.prepare_captions(encoder, captions)
            guide_captions = self.text_attack.perturb(
                encoder, captions, txt2img, "image_cosine", clean_img, prepared=prepared
            )
        with progress.part(text_share, 1 - text_share, "image pass"):
            with torch.no_grad():
                if (
                    self.reference
                ):  # SGAttacker.attack tokenises the guiding captions at its default max_length 30
                    text_emb = self.text_attack.encode(encoder, guide_captions, view_length=30)
                else:
                    text_emb = encoder.encode_text(guide_captions)
                guidance = Guidance(txt2img=txt2img, text_emb=text_emb.to(images.device))
            views = ScaledViews(self.scales, self.noise_std, clamp_after_downscale=self.reference)
            adv_images = self.image_attack.perturb(encoder, images, caption_cosine, guidance, views=views)
        with progress.part(1 - text_share, 1, "text pass 2/2"):
            with torch.no_grad():
                adv_img = encoder.encode_image(adv_images)
            adv_captions = self.text_attack.perturb(
                encoder, captions, txt2img, "image_cosine", adv_img, prepared=prepared
            )
        return AttackResult(adv_images, adv_captions)
