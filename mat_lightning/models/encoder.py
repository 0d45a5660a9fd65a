"""Vision-language dual encoders behind one contract (DESIGN §4).

``VLEncoder`` is what every attack, defense and metric talks to:

* ``encode_image(images)``: ``float[B, 3, H, W]`` pixels **in [0, 1]** -> ``float[B, D]`` (L2-normalised by default);
* ``encode_text(texts)``: ``list[str]`` of length ``T`` -> ``float[T, D]``; tokenisation happens inside;
* ``logit_scale`` (the exponentiated CLIP temperature) and ``image_size`` (side in pixels).

That is the whole contract for attacks and evaluation (DESIGN §4); a third-party encoder need not subclass
``VLEncoder``. Optional parts, used only when present:

* ``encode_image(images, normalize=False)``: unnormalised embeddings. Only FARE and the ``embedding_l2`` PGD
  objective ask for it (:func:`encode_image_unnormalised`); everything else calls ``encode_image(images)``.
* ``parameters()``, ``train(mode)``/``eval()`` and ``training`` (any ``nn.Module`` has them): attacks freeze the
  parameters and switch to eval mode for their duration, then restore both; without them there is nothing to
  freeze and the encoder is used as it is. Training (``MatModule``) needs an ``nn.Module`` with
  ``vision_parameters()``/``text_parameters()``, i.e. a ``VLEncoder``.
* ``itm_image_states``, ``itm_scores``, ``rerank_score``, ``rerank_k``: fusion models (BLIP's ITM head) re-order
  each query's top-k of the similarity matrix at evaluation (:mod:`mat_lightning.eval.rerank`).

Normalisation with the model's mean/std happens *inside* ``encode_image`` (as RobustVLM's ``ClipVisionModel`` and
TeCoA's ``clip_img_preprocessing`` do), so every epsilon is a budget in [0, 1] pixel space, as the papers state it.

``OpenClipEncoder`` wraps any open_clip model: a built-in name with a ``pretrained`` tag (``'openai'``), a local
checkpoint file (such as the synthetic world's cached tiny CLIP, which the ``mat`` CLI puts in place of
``'synthetic'``), or ``local-dir:``/``hf-hub:`` schemas.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from mat_lightning.cache import corrupt_cache_hint, is_cached
from mat_lightning.errors import ConfigError, is_synthetic_name, unresolved_synthetic_name

log = logging.getLogger(__name__)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(active: bool) -> Iterator[None]:
    """Drop open_clip's root-logger warning that no weights were loaded when random weights were asked for
    (``pretrained=None``: the synthetic world's CLIP before its pretraining); every other message passes."""
    if not active:
        yield
        return
    root, flt = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)  # makes the tiny configs (``mat-tiny``) known to open_clip by name

# Text length buckets of ``OpenClipEncoder.encode_text``: at most this many forwards, of at least MIN_BUCKET_ROWS rows.
TEXT_BUCKETS = 4
MIN_BUCKET_ROWS = 16


class VLEncoder(nn.Module, ABC):
    """Dual encoder contract. Subclasses own preprocessing: pixels in [0, 1] in, embeddings out."""

    image_size: int

    @abstractmethod
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``float[B, 3, H, W]`` in [0, 1] (H = W = ``image_size``) -> ``float[B, D]``.

        ``normalize=False`` returns the embeddings before L2 normalisation (FARE's loss is on those). Callers pass
        it only when they need it, so third-party encoders may omit the keyword (see the module docstring).
        """

    @abstractmethod
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        """``T`` strings -> ``float[T, D]`` (``normalize=False``: before L2 normalisation)."""

    @property
    @abstractmethod
    def logit_scale(self) -> Tensor:
        """Scalar tensor, the multiplicative temperature of the contrastive logits (``exp`` already applied)."""

    @abstractmethod
    def vision_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the image tower (what TeCoA and FARE train)."""

    @abstractmethod
    def text_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the text tower."""

    def towers(self) -> list[nn.Module]:
        """The submodules that do the heavy lifting (what ``--model.compile=true`` compiles); default: none."""
        return []


def encode_image_unnormalised(encoder: VLEncoder, images: Tensor) -> Tensor:
    """``encoder.encode_image(images, normalize=False)``, or one clear error when the encoder has no such keyword."""
    try:
        params = inspect.signature(encoder.encode_image).parameters
    except (TypeError, ValueError):  # a builtin or C extension: let the call decide
        params = {"normalize": None}
    if "normalize" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(
            f"{type(encoder).__name__}.encode_image(images) has no 'normalize' keyword, but FARE and the "
            "embedding_l2 objective need unnormalised image embeddings: add encode_image(images, normalize=True) "
            "to the encoder, or use another defense/objective."
        )
    return encoder.encode_image(images, normalize=False)


def encoder_device(encoder: object) -> torch.device:
    """The device of an encoder's first parameter (``encoder.device`` for duck-typed encoders without any)."""
    parameters = getattr(encoder, "parameters", None)
    if callable(parameters):
        for p in parameters():
            return p.device
    return torch.device(getattr(encoder, "device", "cpu"))


# Hub names mapped to local copies for this process (``local_models:`` in a config; the CLI fills it).
LOCAL_MODELS: dict[str, str] = {}


def local_model(name: str) -> str:
    """``name``'s local replacement from :data:`LOCAL_MODELS`, or ``name`` itself."""
    return LOCAL_MODELS.get(name, name)


def hub_offline() -> bool:
    """True when Hugging Face downloads are switched off (``HF_HUB_OFFLINE=1``, as on our machines and in tests)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def require_local_or_online(source: str, what: str, how: str, marker: str = "config.json") -> None:
    """Fail at once, with one message, when ``source`` is a hub name but downloads are off.

    Args:
        source: a hub name or a local path.
        what: what the weights are, for the message (``"HF CLIP weights"``).
        how: how to give a local copy instead (the config key and the expected file or folder).

    A hub name whose ``marker`` file is already in the local Hugging Face cache is allowed (loading it needs no
    network).
    """
    if Path(source).exists() or not hub_offline() or _looks_like_path(source):
        return  # a local path that does not exist is the loader's "not found", not a download
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, marker), str):
            return
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        pass
    raise ConfigError(
        f"{what} {source!r} must be downloaded, but HF_HUB_OFFLINE=1 (no network) and it is not in the local "
        f"cache. {how}"
    )


def resolve_pretrained(spec: str | None) -> str | None:
    """A ``pretrained`` setting as open_clip understands it: an open_clip tag or a file path, passed through.

    ``'synthetic'`` / ``'synthetic:<preset>'`` (the synthetic world's tiny CLIP, our stand-in for a weights hub) are
    resolved to the cached checkpoint by the ``mat`` CLI (:func:`mat_lightning.synthetic.resolve_config`); here they
    are an error.
    """
    if is_synthetic_name(spec):
        raise unresolved_synthetic_name("pretrained", spec, "ensure_clip(<preset>)")
    return spec


class OpenClipEncoder(VLEncoder):
    """An open_clip CLIP model with pixel-space inputs and string inputs.

    Args:
        model_name: open_clip architecture (``ViT-B-32``, ``ViT-L-14``, the bundled ``mat-tiny``), or a
            ``local-dir:``/``hf-hub:`` source.
        pretrained: weights: an open_clip tag (``openai``, ``laion2b_s34b_b79k``; downloaded by open_clip), a local
            checkpoint file (a CLIP state dict; in a ``mat`` config also ``synthetic[:<preset>]``, the synthetic
            world's tiny CLIP, which the CLI builds, caches and replaces by its file), or ``None`` for random
            initialisation.
        vision_checkpoint: optional file with vision-tower weights loaded after creation (RobustVLM publishes its
            FARE/TeCoA checkpoints this way).
        cache_dir: open_clip's download cache.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        vision_checkpoint: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.pretrained = pretrained
        resolved = resolve_pretrained(pretrained)
        if resolved is not None and not _looks_like_tag(resolved) and not Path(resolved).is_file():
            raise ConfigError(
                f"pretrained={pretrained!r}: no such checkpoint file. Give an open_clip tag (e.g. 'openai'), an "
                f"existing file, 'synthetic' (in a mat config), or null for random weights."
            )
        if model_name not in open_clip.list_models() and ":" not in model_name:
            raise ConfigError(
                f"model_name={model_name!r} is not an open_clip architecture. Known tiny configs: "
                f"{sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}; full list: open_clip.list_models()."
            )
        if hub_offline():
            _check_open_clip_offline(model_name, resolved, cache_dir)
        try:
            with _quiet_random_init(resolved is None):
                self.model = open_clip.create_model(
                    model_name,
                    pretrained=resolved,
                    cache_dir=cache_dir,
                    pretrained_text=False,
                )
        except (RuntimeError, OSError, ValueError) as e:
            if resolved is not None and is_cached(resolved):
                raise ConfigError(corrupt_cache_hint(resolved)) from None
            raise ConfigError(
                f"could not create open_clip model {model_name!r} with pretrained={pretrained!r}: {e}\n"
                "Offline? Weights cannot be downloaded here: pass a local checkpoint file as "
                "--model.encoder.init_args.pretrained, or 'synthetic' (in a mat config) for the synthetic world."
            ) from e
        if vision_checkpoint is not None:
            load_vision_checkpoint(self.model.visual, vision_checkpoint)
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        self._word_ids: dict[str, list[int]] = {}
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp.get("size", self.model.visual.image_size)
        self.image_size = int(size[0] if isinstance(size, list | tuple) else size)
        self.register_buffer("image_mean", torch.tensor(pp["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(pp["std"]).view(1, 3, 1, 1), persistent=False)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ConfigError(
                f"{self.model_name} expects {self.image_size}x{self.image_size} images, got {tuple(images.shape)}; "
                "the data module resizes to encoder.image_size"
            )
        pixels = (images - self.image_mean) / self.image_std
        return self.model.encode_image(pixels, normalize=normalize)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """``long[T, context_length]`` token ids on the model's device.

        For CLIP's BPE tokenizer, words are tokenised once and cached: its pre-tokenisation never crosses
        whitespace, so a caption's ids are its words' ids joined (tests check this against open_clip on real
        captions). Text attacks encode tens of thousands of one-word variants, where open_clip's per-string
        cleaning (ftfy) would otherwise dominate the cost.
        """
        tok = self.tokenizer
        if not isinstance(tok, SimpleTokenizer) or tok.reduction_fn is not None:
            return tok(list(texts)).to(self.image_mean.device)
        n = tok.context_length
        cache, flat, lengths = self._word_ids, [], []
        for text in texts:
            ids = [tok.sot_token_id]
            for word in text.split():
                word_ids = cache.get(word)
                if word_ids is None:
                    word_ids = cache[word] = tok.encode(word)
                ids += word_ids
            # truncate as open_clip does: the last slot is end-of-text
            ids = ids[: n - 1]
            ids.append(tok.eot_token_id)
            flat += ids
            lengths.append(len(ids))
        # one copy of the used ids into the zero-padded rows (not T x context_length Python ints)
        used = torch.arange(n)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
        rows = torch.zeros(len(lengths), n, dtype=torch.long)
        rows[used] = torch.tensor(flat, dtype=torch.long)
        return rows.to(self.image_mean.device)

    @property
    def text_tokenizer_key(self) -> str:
        """What identifies this encoder's tokenizer (the key of a text attack's stored token ids, ``attacks/store``):
        its class, context length and a hash of its vocabulary and merges."""
        key = getattr(self, "_tokenizer_key", None)
        if key is None:
            tok = self.tokenizer
            h = hashlib.sha256(f"{type(tok).__qualname__}:{tok.context_length}".encode())
            for table in ("encoder", "bpe_ranks"):  # SimpleTokenizer; other tokenizers hash their repr
                h.update(repr(sorted(getattr(tok, table, {}).items())).encode())
            if not hasattr(tok, "encoder"):
                h.update(repr(tok).encode())
            key = self._tokenizer_key = h.hexdigest()[:16]
        return key

    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> Tensor:
        return self.encode_text_ids(self.tokenize(texts), normalize)

    def encode_text_ids(self, ids: Tensor, normalize: bool = True) -> Tensor:
        """:meth:`encode_text` of already tokenised texts: ``ids`` long[T, context_length] as :meth:`tokenize`
        returns them (zero-padded). A text attack's candidate store keeps its texts as ids (``attacks/store``)."""
        ids = ids.to(self.image_mean.device)
        if not self._can_cut_context():
            return self.model.encode_text(ids, normalize=normalize)
        return self._encode_text_bucketed(ids, normalize)

    def _can_cut_context(self) -> bool:
        """Whether cutting the context to the tokens in use is exact for this text tower.

        It is for open_clip's ``CLIP`` with a causal mask and EOT (``argmax``) pooling: a position attends only to
        earlier ones, and the pooled EOT feature sits inside the cut. Other towers (``CustomTextCLIP``, HF text
        towers, bidirectional masks) take open_clip's full-context path.
        """
        m = self.model
        return (
            isinstance(m, open_clip.CLIP)
            and getattr(m, "attn_mask", None) is not None
            and getattr(m, "text_pool_type", "argmax") == "argmax"
        )

    def _encode_text_bucketed(self, ids: Tensor, normalize: bool) -> Tensor:
        """open_clip's ``CLIP.encode_text`` on ids cut to the tokens in use, in length buckets.

        Captions are sorted by length (position of EOT, the highest id, + 1) and split into at most
        ``TEXT_BUCKETS`` groups of equal size, each cut to its longest member; results return in input order.
        CLIP pads every caption to 77 tokens, while Flickr30K captions average ~17: the text transformer's cost
        falls 3-4x and the embeddings are those of the full context to float tolerance (tests check it).
        """
        n = ids.shape[0]
        if n == 0:
            return self.model.encode_text(ids, normalize=normalize)
        eot = ids.argmax(dim=-1)
        lengths = eot + 1
        n_buckets = max(1, min(TEXT_BUCKETS, n // MIN_BUCKET_ROWS))
        if n_buckets == 1:
            return self._encode_cut(ids[:, : int(lengths.max())], eot, normalize)
        order = torch.argsort(lengths, stable=True)
        parts = []
        for rows in order.tensor_split(n_buckets):
            width = int(lengths[rows].max())
            parts.append(self._encode_cut(ids[rows, :width], eot[rows], normalize))
        out = torch.cat(parts)
        return out[torch.argsort(order)]

    def _encode_cut(self, ids: Tensor, eot: Tensor, normalize: bool) -> Tensor:
        """``CLIP.encode_text`` (open_clip 2.2x-3.x) for ids whose context is cut to ``ids.shape[1]`` tokens."""
        m = self.model
        width = ids.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(ids).to(cast_dtype)
        x = x + m.positional_embedding[:width].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:width, :width])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    def vision_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.visual.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        vision = {id(p) for p in self.model.visual.parameters()}
        return (p for n, p in self.model.named_parameters() if id(p) not in vision and n != "logit_scale")

    def towers(self) -> list[nn.Module]:
        return [m for m in (self.model.visual, getattr(self.model, "transformer", None)) if m is not None]


def load_vision_checkpoint(visual: nn.Module, path: str) -> None:
    """Load image-tower weights strictly (open_clip's own loader only warns on a missing file or wrong keys).

    Accepts a plain state dict of the tower, RobustVLM/TeCoA files (``vision_encoder_state_dict``), Lightning-style
    wrappers (``state_dict``/``model``), and keys prefixed with ``module.``, ``visual.`` or ``model.visual.``.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"vision_checkpoint={path!r}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ConfigError(f"vision_checkpoint={path!r} cannot be read as a torch checkpoint ({e})") from None
    for key in ("vision_encoder_state_dict", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"vision_checkpoint={path!r} holds a {type(state).__name__}, not a state dict")
    prefixes = ("module.", "encoder.model.visual.", "model.visual.", "visual.")
    cleaned = {}
    for k, v in state.items():
        for prefix in prefixes:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        cleaned[k] = v
    missing, unexpected = visual.load_state_dict(cleaned, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"vision_checkpoint={path!r} does not fit this model's image tower: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is model_name right?"
        )


def _check_open_clip_offline(model_name: str, pretrained: str | None, cache_dir: str | None) -> None:
    """With downloads off, fail before building the model when the weights are neither local nor cached."""
    how = (
        "Give a local file instead: --model.encoder.init_args.pretrained=/path/to/open_clip_pytorch_model.bin "
        "(any CLIP state dict), or a folder with open_clip_config.json + weights as "
        "--model.encoder.init_args.model_name=local-dir:/path/to/folder (pretrained: null)."
    )
    if model_name.startswith("hf-hub:"):
        require_local_or_online(
            model_name.removeprefix("hf-hub:"), "open_clip model", how, "open_clip_config.json"
        )
        return
    if pretrained is None or not _looks_like_tag(pretrained) or model_name.startswith("local-dir:"):
        return
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ConfigError(
            f"pretrained={pretrained!r} is not an open_clip tag of {model_name!r} "
            f"(known: {open_clip.list_pretrained_tags_by_model(model_name)}). {how}"
        )
    try:  # offline this only looks in the cache: it returns at once
        open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - every failure here means "not cached"
        raise ConfigError(
            f"open_clip weights {model_name}/{pretrained} must be downloaded, but HF_HUB_OFFLINE=1 (no network) and "
            f"they are not in the local cache. {how}"
        ) from None


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything absolute, relative-dotted or deeper is a path."""
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def _looks_like_tag(spec: str) -> bool:
    """An open_clip pretrained tag has no path separator and no file suffix."""
    return "/" not in spec and "\\" not in spec and not spec.endswith((".pt", ".pth", ".bin", ".safetensors"))
