"""ALBEF and TCL retrieval models behind :class:`~mat_lightning.models.encoder.VLEncoder`.

ALBEF (salesforce/ALBEF, ``models/model_retrieval.py``) and TCL (uta-smile/TCL, same architecture, other training
losses) are the fusion models of the attack papers' main rows (Co-Attack, SGA). One class serves both: the public
checkpoints (``ALBEF.pth``, the Flickr30K/COCO retrieval fine-tuned ``*.pth``, TCL's) have the same keys.

* Image tower: ViT-B/16 (``qkv_bias``, LayerNorm eps 1e-6), **timm's** ``VisionTransformer``, whose parameter names
  are ALBEF's ``vit.py`` names. ALBEF's resize (bicubic) and CLIP's mean/std happen inside ``encode_image``, so every
  epsilon is a budget on [0, 1] pixels at any input size.
* Text tower: BERT split in two, as ALBEF's ``xbert.BertModel(mode='text'|'fusion')``: layers
  ``0 .. fusion_layer-1`` encode the caption alone (the ITC text embedding), layers ``fusion_layer ..`` add
  cross-attention to the image tokens (ITM). Both are **transformers'** ``BertEmbeddings``/``BertLayer``; written
  here is only that split (transformers' ``BertModel`` runs every layer or none with cross-attention).
* Tokens: ``[CLS] X`` with **no** ``[SEP]`` (ALBEF's patched tokenizer, ``build_inputs_with_special_tokens``), at
  most ``max_length`` = 30 tokens with the [CLS] (ALBEF's ``Retrieval.py``), lower-cased by the BERT tokenizer.
* ITC: ``normalize(vision_proj(cls_image))`` and ``normalize(text_proj(cls_text))``, 256-d; ``logit_scale`` =
  ``1 / temp`` with ALBEF's clamp of ``temp`` to [0.001, 0.5].
* ITM re-ranking at evaluation: each query's ITC top-k (128 Flickr30K, 256 COCO) is scored by
  ``itm_head(fusion(cls))[:, 1]`` **alone**, as ALBEF's and TCL's ``Retrieval.py::evaluation`` do (BLIP adds the ITC
  similarity; ALBEF does not).

Checkpoints load by path (:func:`load_albef_state`): ``{'model': state_dict, ...}`` or a bare state dict. The
momentum encoders (``*_m.*``) and the queues (``image_queue``, ``text_queue``, ``idx_queue``, ``queue_ptr``) are
training-only state and are dropped with one log line, as are the pre-training MLM head (``text_encoder.cls.*``) and
``position_ids`` buffers; ``text_encoder.bert.`` (pre-training) becomes ``text_encoder.``; a position embedding of
another grid (``ALBEF.pth`` is at 256 px) is resized bicubically, as ALBEF's ``interpolate_pos_embed`` does. Any
other missing or unexpected key is one error naming them.

Training (MAT and the baselines) goes through the ITC embeddings, as the attacks do; the fusion layers and the ITM
head receive no gradient from the contrastive losses, so they stay as loaded (see README "Fusion models").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder, local_model, require_local_or_online
from mat_lightning.models.hf import CLIP_MEAN, CLIP_STD, _HFEncoder

log = logging.getLogger(__name__)

# ALBEF's text tower (its configs/config_bert.json: BERT-base, cross-attention from layer 6 on).
ALBEF_BERT = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "fusion_layer": 6,
}
# ALBEF's image tower: ViT-B/16.
ALBEF_VIT = {"patch_size": 16, "width": 768, "depth": 12, "heads": 12}
DROPPED_PREFIXES = (
    "visual_encoder_m.",
    "vision_proj_m.",
    "text_encoder_m.",
    "text_proj_m.",
    "text_encoder.cls.",
)
DROPPED_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


class AlbefText(nn.Module):
    """ALBEF's BERT: ``embeddings`` + ``encoder.layer[i]``, cross-attention in layers ``>= fusion_layer``."""

    def __init__(self, bert: dict) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

        cfg = dict(bert)
        self.fusion_layer = int(cfg.pop("fusion_layer"))
        text_cfg = BertConfig(**cfg, attn_implementation="eager")
        fusion_cfg = BertConfig(**cfg, is_decoder=True, add_cross_attention=True, attn_implementation="eager")
        if not 0 < self.fusion_layer < text_cfg.num_hidden_layers:
            raise ConfigError(
                f"fusion_layer={self.fusion_layer}: must lie in 1..{text_cfg.num_hidden_layers - 1} "
                "(ALBEF/TCL: 6 of 12)"
            )
        self.embeddings = BertEmbeddings(text_cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(fusion_cfg if i >= self.fusion_layer else text_cfg, layer_idx=i)
            for i in range(text_cfg.num_hidden_layers)
        )

    @staticmethod
    def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
        """long[B, L] of 1 (keep) / 0 (pad) -> float[B, 1, 1, L] added to the attention logits."""
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Caption alone through layers ``0 .. fusion_layer-1``: long[B, L] -> float[B, L, H]."""
        states = self.embeddings(input_ids=input_ids)
        additive = self._additive(attention_mask, states.dtype)
        for layer in self.encoder.layer[: self.fusion_layer]:
            states = layer(states, attention_mask=additive)[0]
        return states

    def fusion(self, text_states: Tensor, attention_mask: Tensor, image_states: Tensor) -> Tensor:
        """Layers ``fusion_layer ..`` with cross-attention to every image token: -> float[B, L, H]."""
        additive = self._additive(attention_mask, text_states.dtype)
        image_mask = torch.zeros(image_states.shape[0], 1, 1, image_states.shape[1], dtype=text_states.dtype)
        states = text_states
        for layer in self.encoder.layer[self.fusion_layer :]:
            states = layer(
                states,
                attention_mask=additive,
                encoder_hidden_states=image_states,
                encoder_attention_mask=image_mask.to(states.device),
            )[0]
        return states


class AlbefRetrievalEncoder(VLEncoder):
    """ALBEF / TCL retrieval model: ITC embeddings for attacks and training, ITM re-ranking at evaluation.

    Args:
        checkpoint: a public ALBEF/TCL checkpoint file (``{'model': state_dict}`` or a state dict), or None for
            random weights (tests, or training from scratch).
        tokenizer: BERT WordPiece tokenizer: hub name (``bert-base-uncased``, what ALBEF uses) or a local
            ``save_pretrained`` folder.
        image_size: input side in pixels (ALBEF retrieval: 384).
        embed_dim: ITC embedding size (256).
        vision: ViT overrides (``patch_size``, ``width``, ``depth``, ``heads``), default ViT-B/16.
        text: BERT config overrides (``hidden_size``, ``num_hidden_layers``, ``fusion_layer``, ``vocab_size``, ...),
            default ALBEF's ``config_bert.json``.
        rerank: re-rank each query's ITC top ``rerank_k`` by the ITM head when recall is computed.
        rerank_k: 128 on Flickr30K, 256 on COCO (ALBEF's ``k_test``).
        itm_batch_size: (image, caption) pairs per ITM forward.
        max_length: tokens including [CLS] (ALBEF: 30).
        temp: ITC temperature of random weights (a checkpoint brings its own).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: str = "bert-base-uncased",
        image_size: int = 384,
        embed_dim: int = 256,
        vision: dict | None = None,
        text: dict | None = None,
        rerank: bool = True,
        rerank_k: int = 128,
        itm_batch_size: int = 128,
        max_length: int = 30,
        temp: float = 0.07,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BertTokenizerFast

        if rerank_k < 1 or itm_batch_size < 1 or max_length < 2:
            raise ConfigError(
                f"rerank_k={rerank_k}, itm_batch_size={itm_batch_size}, max_length={max_length}: the first two "
                "must be >= 1, max_length >= 2 ([CLS] and one word)"
            )
        vit = {**ALBEF_VIT, **(vision or {})}
        bert = {**ALBEF_BERT, **(text or {})}
        unknown = set(vit) - set(ALBEF_VIT)
        if unknown:
            raise ConfigError(f"vision: unknown keys {sorted(unknown)}; known: {sorted(ALBEF_VIT)}")
        if vit["width"] != bert["hidden_size"]:
            raise ConfigError(
                f"vision.width={vit['width']} != text.hidden_size={bert['hidden_size']}: ALBEF's cross-attention "
                "reads image tokens of the text width (both 768 in ALBEF and TCL)"
            )
        if image_size % vit["patch_size"]:
            raise ConfigError(f"image_size={image_size} is not a multiple of patch_size={vit['patch_size']}")
        self.model_name, self.pretrained = "albef", checkpoint
        self.image_size, self.max_length = int(image_size), int(max_length)
        self.rerank_enabled, self.rerank_k, self.itm_batch_size = rerank, rerank_k, itm_batch_size
        self.visual_encoder = VisionTransformer(
            img_size=self.image_size,
            patch_size=vit["patch_size"],
            embed_dim=vit["width"],
            depth=vit["depth"],
            num_heads=vit["heads"],
            mlp_ratio=4,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=0,
            global_pool="token",
        )
        self.text_encoder = AlbefText(bert)
        self.vision_proj = nn.Linear(vit["width"], embed_dim)
        self.text_proj = nn.Linear(bert["hidden_size"], embed_dim)
        self.itm_head = nn.Linear(bert["hidden_size"], 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.register_buffer("image_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        key = "--model.encoder.init_args.tokenizer"
        source = local_model(tokenizer)
        require_local_or_online(
            source,
            "the BERT tokenizer",
            f"Give a local folder with vocab.txt (tokenizer.save_pretrained) as {key}.",
            marker="vocab.txt",
        )
        try:
            self.tokenizer = BertTokenizerFast.from_pretrained(source)
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"could not load the BERT tokenizer {source!r} ({first}); set {key}") from None
        if len(self.tokenizer) > bert["vocab_size"]:
            raise ConfigError(
                f"the tokenizer {source!r} has {len(self.tokenizer)} tokens, more than text.vocab_size="
                f"{bert['vocab_size']}"
            )
        if checkpoint is not None:
            self.load_state_dict(load_albef_state(checkpoint, self), strict=True)
        self.train()

    # -- the VLEncoder contract ---------------------------------------------------------------------------------------

    # [0, 1] images of any size -> normalised float[B, 3, S, S]: the HF encoders' bicubic resize and mean/std
    pixels = _HFEncoder.pixels

    def tokenize(self, texts: Sequence[str], pad_to_max_length: bool = False) -> tuple[Tensor, Tensor]:
        """``[CLS] X`` (no [SEP]), truncated to ``max_length``, padded to the longest (or to ``max_length``, as
        ALBEF's evaluation pads): (ids, mask), both long[T, L]."""
        pieces = self.tokenizer(
            list(texts), add_special_tokens=False, truncation=True, max_length=self.max_length - 1
        )["input_ids"]
        length = self.max_length if pad_to_max_length else 1 + max((len(p) for p in pieces), default=0)
        ids = torch.full((len(pieces), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(pieces), length), dtype=torch.long)
        for row, p in enumerate(pieces):
            ids[row, : 1 + len(p)] = torch.tensor([self.tokenizer.cls_token_id, *p], dtype=torch.long)
            mask[row, : 1 + len(p)] = 1
        device = self.image_mean.device
        return ids.to(device), mask.to(device)

    def vision_states(self, images: Tensor) -> Tensor:
        """[0, 1] images -> image tokens after the final LayerNorm, float[B, 1 + patches, width]."""
        return self.visual_encoder.forward_features(self.pixels(images))

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        emb = self.vision_proj(self.vision_states(images)[:, 0])
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        emb = self.text_proj(self.text_encoder.text(*self.tokenize(texts))[:, 0])
        return F.normalize(emb, dim=-1) if normalize else emb

    @property
    def logit_scale(self) -> Tensor:
        return 1.0 / self.temp.clamp(0.001, 0.5)

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.visual_encoder.parameters()
        yield from self.vision_proj.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.text_encoder.parameters()
        yield from self.text_proj.parameters()
        yield from self.itm_head.parameters()

    def towers(self) -> list[nn.Module]:
        return [self.visual_encoder, self.text_encoder]

    # -- ITM re-ranking (driven by mat_lightning.eval.rerank) ---------------------------------------------------------

    @torch.no_grad()
    def itm_image_states(self, images: Tensor) -> Tensor:
        """What ITM needs of each image: its tokens float[B, 1 + patches, width], in the compute dtype."""
        return self.vision_states(images)

    @torch.no_grad()
    def itm_scores(self, vision_states: Tensor, captions: Sequence[str]) -> Tensor:
        """ITM logit of "match" for aligned pairs: vision_states float[P, N, C], P captions -> float[P].

        Captions are padded to ``max_length`` (ALBEF's evaluation does), so a pair's score does not depend on the
        other pairs of its batch, nor on how many processes share the re-ranking. The text layers run once per
        distinct caption (a caption query's top-k pairs repeat it k times), as ALBEF computes them once per caption.
        """
        unique = list(dict.fromkeys(captions))
        row = {c: i for i, c in enumerate(unique)}
        ids, mask = self.tokenize(unique, pad_to_max_length=True)
        index = torch.tensor([row[c] for c in captions], device=ids.device)
        text = self.text_encoder.text(ids, mask)[index]
        states = vision_states.to(self.image_mean.device, self.itm_head.weight.dtype)
        fused = self.text_encoder.fusion(text, mask[index], states)
        return self.itm_head(fused[:, 0])[:, 1].float()

    @staticmethod
    def rerank_score(itm: Tensor, itc: Tensor) -> Tensor:
        """A re-ranked entry: the ITM logit alone (ALBEF's and TCL's ``Retrieval.py``; BLIP adds the ITC)."""
        return itm


def load_albef_state(path: str, model: nn.Module) -> dict[str, Tensor]:
    """An ALBEF/TCL checkpoint file -> a state dict with exactly ``model``'s keys (see the module docstring).

    Raises:
        ConfigError: the file is missing or unreadable, or keys are missing/unexpected after the mapping.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"checkpoint={path!r}: no such file (an ALBEF/TCL .pth, e.g. ALBEF's flickr30k.pth)"
        )
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ConfigError(f"checkpoint={path!r} cannot be read as a torch checkpoint ({e})") from None
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint={path!r} holds no state dict ('model' entry or a dict of tensors)")
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    dropped = 0
    for key, value in state.items():
        key = key.removeprefix("module.").replace("text_encoder.bert.", "text_encoder.")
        if key.startswith(DROPPED_PREFIXES) or key in DROPPED_KEYS or key.endswith(".position_ids"):
            dropped += 1
            continue
        mapped[key] = value
    pos = mapped.get("visual_encoder.pos_embed")
    if pos is not None and pos.shape != own["visual_encoder.pos_embed"].shape:
        mapped["visual_encoder.pos_embed"] = _resize_pos_embed(pos, own["visual_encoder.pos_embed"].shape[1])
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint={path!r} does not fit ALBEF/TCL at this configuration: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]} (check image_size, vision, text)"
        )
    wrong = [k for k in own if own[k].shape != mapped[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(
            f"checkpoint={path!r}: {len(wrong)} tensors of another shape, e.g. {k} {tuple(mapped[k].shape)} vs "
            f"{tuple(own[k].shape)} (check vision, text, embed_dim)"
        )
    log.info("%s: ignored %d momentum/queue/MLM-head entries (training-only state)", path, dropped)
    return mapped


def _resize_pos_embed(pos: Tensor, tokens: int) -> Tensor:
    """float[1, 1 + g*g, C] -> float[1, tokens, C]: the patch grid resized bicubically, [CLS] kept (ALBEF's rule)."""
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(tokens - 1)
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    log.info("position embedding resized from %dx%d to %dx%d patches", old, old, new, new)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], dim=1)
