"""Hugging Face ``transformers`` encoders behind :class:`~mat_lightning.models.encoder.VLEncoder`.

* :class:`HFClipEncoder` — ``CLIPModel`` (OpenAI/LAION CLIP as published on the hub, or a ``save_pretrained``
  folder), with the mean/std of its image processor and its own tokenizer.
* :class:`BlipRetrievalEncoder` — ``BlipForImageTextRetrieval`` (``Salesforce/blip-itm-base-coco``, ...): its ITC
  embeddings (``vision_proj``/``text_proj`` of the [CLS] states) for ``encode_image``/``encode_text``, which is what
  attacks and training use (the reference attacks do the same for ALBEF), and optionally the ITM re-ranking of each
  query's top-k at evaluation, as BLIP's and ALBEF's retrieval evaluation does (k = 128 Flickr30K, 256 COCO); the
  encoder scores pairs (``itm_image_states``, ``itm_scores``), :mod:`mat_lightning.eval.rerank` shards the work.

Both take images in [0, 1]; resizing (bicubic, differentiable, only when the input is not ``image_size``) and the
mean/std normalisation happen inside, so budgets stay in pixel space. A hub name requested while
``HF_HUB_OFFLINE=1`` fails at once with one message (no retries), unless it is already in the local HF cache.

Deliberate differences from BLIP's own code (salesforce/BLIP ``train_retrieval.py::evaluation``): the ITM score is
``itm_logit[:, 1] + itc_similarity`` as there, but entries outside the top-k keep their ITC order below the
re-ranked ones (BLIP sets them to -100), which changes no recall@K for K <= k; the HF port has no trained ITC
temperature, so ``logit_scale`` is fixed at ``exp(config.logit_scale_init_value)`` (1/0.07, BLIP's initial value).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder, local_model, require_local_or_online

log = logging.getLogger(__name__)

# CLIP's (OpenAI) statistics: the default of CLIP and BLIP image processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _load(loader, source: str, what: str, key: str, **kwargs):
    """``loader.from_pretrained(source)`` with offline and missing-file errors turned into one ConfigError."""
    how = (
        f"Give a local folder written by save_pretrained (config.json + weights + tokenizer files) as {key}; "
        "on a machine with network: huggingface-cli download <name> --local-dir <folder>."
    )
    source = local_model(source)
    require_local_or_online(source, what, how)
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"could not load {what} {source!r} ({first}). {how}") from None


def _image_stats(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the model's image processor, CLIP's when the folder has no ``preprocessor_config.json``."""
    from transformers import AutoImageProcessor

    source = local_model(source)
    try:
        proc = AutoImageProcessor.from_pretrained(source)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError):
        log.info("%s has no image processor config: using CLIP's mean/std", source)
        return CLIP_MEAN, CLIP_STD


class _HFEncoder(VLEncoder):
    """Shared pixel handling and tokenisation of the HF encoders."""

    image_size: int
    max_length: int

    def _init_pixels(self, source: str, image_size: int) -> None:
        mean, std = _image_stats(source)
        self.image_size = int(image_size)
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def pixels(self, images: Tensor) -> Tensor:
        """[0, 1] images of any size -> normalised ``float[B, 3, S, S]`` (S = ``image_size``), differentiably."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
            ).clamp(0, 1)
        return (images - self.image_mean) / self.image_std

    def tokenize(self, texts: Sequence[str], pad_to_max_length: bool = False) -> dict[str, Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding="max_length" if pad_to_max_length else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            k: v.to(self.image_mean.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")
        }


class HFClipEncoder(_HFEncoder):
    """A transformers ``CLIPModel``.

    Args:
        source: hub name (``openai/clip-vit-base-patch16``) or a local ``save_pretrained`` folder (model, tokenizer
            and, optionally, ``preprocessor_config.json`` for the mean/std; CLIP's otherwise).
        max_length: token limit of the text tower (CLIP: 77).
    """

    def __init__(self, source: str = "openai/clip-vit-base-patch16", max_length: int = 77) -> None:
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        key = "--model.encoder.init_args.source"
        self.model_name, self.pretrained = source, "hf"
        self.model = _load(
            CLIPModel, source, "HF CLIP weights", key
        ).train()  # from_pretrained leaves eval mode
        self.tokenizer = _load(AutoTokenizer, source, "the HF CLIP tokenizer", key)
        self.max_length = min(max_length, self.model.config.text_config.max_position_embeddings)
        self._init_pixels(source, self.model.config.vision_config.image_size)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        out = self.model.vision_model(pixel_values=self.pixels(images))
        emb = self.model.visual_projection(out.pooler_output)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        out = self.model.text_model(**self.tokenize(texts))
        emb = self.model.text_projection(out.pooler_output)
        return F.normalize(emb, dim=-1) if normalize else emb

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.vision_model.parameters()
        yield from self.model.visual_projection.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.text_model.parameters()
        yield from self.model.text_projection.parameters()

    def towers(self) -> list[nn.Module]:
        return [self.model.vision_model, self.model.text_model]


class BlipRetrievalEncoder(_HFEncoder):
    """A transformers ``BlipForImageTextRetrieval``: ITC embeddings, optional ITM re-ranking at evaluation.

    Args:
        source: hub name (``Salesforce/blip-itm-base-coco``, ``Salesforce/blip-itm-base-flickr``) or a local
            ``save_pretrained`` folder.
        rerank: re-rank each query's top ``rerank_k`` by the ITM head when recall is computed (BLIP's protocol);
            False reports ITC recall.
        rerank_k: candidates re-ranked per query (BLIP/ALBEF: 128 on Flickr30K, 256 on COCO).
        itm_batch_size: (image, caption) pairs per ITM forward.
        max_length: token limit (BLIP's retrieval code: 35).
    """

    def __init__(
        self,
        source: str = "Salesforce/blip-itm-base-coco",
        rerank: bool = True,
        rerank_k: int = 128,
        itm_batch_size: int = 128,
        max_length: int = 35,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        if rerank_k < 1 or itm_batch_size < 1:
            raise ConfigError(f"rerank_k={rerank_k}, itm_batch_size={itm_batch_size}: both must be >= 1")
        key = "--model.encoder.init_args.source"
        self.model_name, self.pretrained = source, "hf"
        self.model = _load(BlipForImageTextRetrieval, source, "BLIP retrieval weights", key).train()
        self.tokenizer = _load(AutoTokenizer, source, "the BLIP tokenizer", key)
        self.rerank_enabled, self.rerank_k, self.itm_batch_size = rerank, rerank_k, itm_batch_size
        self.max_length = max_length
        self._init_pixels(source, self.model.config.vision_config.image_size)
        scale = torch.tensor(float(getattr(self.model.config, "logit_scale_init_value", 2.6592))).exp()
        self.register_buffer("_logit_scale", scale, persistent=False)

    def _vision_states(self, images: Tensor) -> Tensor:
        return self.model.vision_model(pixel_values=self.pixels(images)).last_hidden_state

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        emb = self.model.vision_proj(self._vision_states(images)[:, 0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        states = self.model.text_encoder(**self.tokenize(texts)).last_hidden_state
        emb = self.model.text_proj(states[:, 0])
        return F.normalize(emb, dim=-1) if normalize else emb

    @property
    def logit_scale(self) -> Tensor:
        return self._logit_scale

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.vision_model.parameters()
        yield from self.model.vision_proj.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        vision = {id(p) for p in self.vision_parameters()}
        yield from (p for p in self.model.parameters() if id(p) not in vision)

    def towers(self) -> list[nn.Module]:
        return [self.model.vision_model, self.model.text_encoder]

    # -- ITM re-ranking (driven by mat_lightning.eval.rerank) ---------------------------------------------------------

    @torch.no_grad()
    def itm_image_states(self, images: Tensor) -> Tensor:
        """What ITM needs of each image: vision states float[B, N, C] (N = patches + 1), in the compute dtype."""
        return self._vision_states(images)

    @torch.no_grad()
    def itm_scores(self, vision_states: Tensor, captions: Sequence[str]) -> Tensor:
        """ITM logit of "match" for aligned pairs: vision_states [P, N, C], P captions -> float[P].

        Captions are padded to ``max_length``, as BLIP's evaluation does, so a pair's score does not depend on the
        other pairs of its batch (nor, then, on how many processes share the re-ranking).
        """
        tokens = self.tokenize(captions, pad_to_max_length=True)
        states = vision_states.to(self.image_mean.device, next(self.model.itm_head.parameters()).dtype)
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        out = self.model.text_encoder(
            **tokens, encoder_hidden_states=states, encoder_attention_mask=mask
        ).last_hidden_state
        return self.model.itm_head(out[:, 0])[:, 1].float()

    @staticmethod
    def rerank_score(itm: Tensor, itc: Tensor) -> Tensor:
        """A re-ranked entry: ITM logit + ITC similarity, as BLIP's evaluation."""
        return itm + itc
