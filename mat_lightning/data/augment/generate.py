"""``mat augment rewrite|i2t``: write the precomputed caption files of MAT+ with local Hugging Face models.

The paper rewrites captions with LLaMA and captions images with BLIP (DESIGN §2 "1:N"). Both are slow, so they run
once, on a GPU, and write the JSON files :class:`~mat_lightning.data.augment.providers.PrecomputedCaptions` reads
(``{image_id: [caption, ...]}``, ``image_id`` as the annotation file names the image):

* ``mat augment rewrite --model <causal LM folder> --annotations <file> --out rewrite.json [--n 5]``: prompts the LM
  with a rewriting prompt per ground-truth caption (cycling through an image's captions) and samples one rewrite
  each; the prompt is stripped, the first line of the continuation kept, empty outputs dropped (and re-drawn up to
  ``--max_rounds`` times). Instruction-tuned models get their chat template.
* ``mat augment i2t --model <image-to-text model folder> --annotations <file> --out i2t.json [--n 5]``: samples
  ``n`` captions per image from a captioner (BLIP, a ``VisionEncoderDecoderModel``, ...), loaded with
  ``AutoProcessor`` and ``AutoModelForImageTextToText``.

Text-to-image generation (Stable Diffusion) is not provided: write ``{image_id: [path, ...]}`` with your own
pipeline and read it with :class:`~mat_lightning.data.augment.providers.PrecomputedImages`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from tqdm.auto import tqdm

from mat_lightning.data.formats import Format, ImageCaptions, check_images_exist, read_annotations
from mat_lightning.errors import ConfigError

log = logging.getLogger(__name__)

REWRITE_PROMPT = (
    "Rewrite the following image caption with different words and word order, keeping its meaning.\n"
    "Caption: {caption}\nRewritten caption:"
)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_model(model: str) -> None:
    """A path that names a folder (absolute, ``./``, ``../`` or ``~``) must exist; hub names go to transformers."""
    looks_local = model.startswith(("/", ".", "~")) or model.count("/") > 1
    if looks_local and not Path(model).expanduser().is_dir():
        raise ConfigError(f"--model {model}: folder not found (give the folder save_pretrained wrote)")


def _load(kind: str, folder: str, loader: Callable[[], Any]) -> Any:
    """Call a ``from_pretrained`` loader, turning its many failure types into one ConfigError naming the folder."""
    try:
        return loader()
    # Broad on purpose: transformers fails on a wrong folder with OSError, ValueError, KeyError or even
    # AttributeError (a tokenizer folder without vocabulary files), all meaning "not a loadable model here".
    except Exception as e:
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise ConfigError(
            f"--model {folder}: cannot load a {kind} ({first}). Pass a folder written by save_pretrained "
            "(config.json, weights, tokenizer/processor files) or a hub name with HF_HUB_OFFLINE unset."
        ) from None


def check_prompt(prompt: str) -> None:
    """The rewrite prompt fills with ``str.format(caption=...)``: one ``{caption}`` slot, other braces doubled."""
    if "{caption}" not in prompt:
        raise ConfigError(f"--prompt {prompt!r}: needs a {{caption}} placeholder")
    try:
        prompt.format(caption="")
    except (IndexError, KeyError, ValueError) as e:
        raise ConfigError(
            f"--prompt {prompt!r}: only {{caption}} may stand in braces ({type(e).__name__}: {e}); write a "
            "literal brace as {{ or }}"
        ) from None


def _check_causal(model: str) -> None:
    """Refuse a masked LM (BERT) for rewriting before loading it: it has no left-to-right generation, and
    transformers would load it as a causal LM with random weights in place."""
    from transformers import AutoConfig

    config = _load("model config", model, lambda: AutoConfig.from_pretrained(model))
    archs = list(getattr(config, "architectures", None) or [])
    if archs and all("MaskedLM" in a for a in archs):
        raise ConfigError(
            f"--model {model} is a masked LM ({', '.join(archs)}): rewrite needs a causal (left-to-right) LM such "
            "as GPT-2, Qwen or Llama; BERT-style models are the text attacks' --robust_eval.mlm"
        )


def _clean(text: str) -> str:
    """The first line of a generation, without surrounding quotes and blanks."""
    lines = text.strip().splitlines()
    return lines[0].strip().strip("\"'").strip() if lines else ""


def _fill(
    records: Sequence[ImageCaptions],
    n: int,
    max_rounds: int,
    generate: Callable[[list[tuple[int, int]]], list[str]],
    batch_size: int,
    desc: str,
) -> dict[str, list[str]]:
    """Collect ``n`` non-empty outputs per record: ``generate`` maps (record index, draw index) jobs to texts.

    Jobs whose output is empty are drawn again, up to ``max_rounds`` rounds in all; records still short are logged.
    """
    out: dict[int, list[str]] = {i: [] for i in range(len(records))}
    draws = dict.fromkeys(out, 0)
    for _round in range(max_rounds):
        jobs = []
        for i, texts in out.items():
            for _ in range(n - len(texts)):
                jobs.append((i, draws[i]))
                draws[i] += 1
        if not jobs:
            break
        with tqdm(
            total=len(jobs), desc=desc if _round == 0 else f"{desc} (retry {_round})", unit="caption"
        ) as bar:
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                for (i, _), text in zip(batch, generate(batch), strict=True):
                    text = _clean(text)
                    if text and len(out[i]) < n:
                        out[i].append(text)
                bar.update(len(batch))
    short = [records[i].image_id for i, texts in out.items() if len(texts) < n]
    if short:
        log.warning(
            "%d images got fewer than %d non-empty outputs after %d rounds, e.g. %s",
            len(short),
            n,
            max_rounds,
            short[:3],
        )
    return {records[i].image_id: texts for i, texts in out.items()}


def rewrite_captions(
    model: str,
    records: Sequence[ImageCaptions],
    n: int = 5,
    prompt: str = REWRITE_PROMPT,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.9,
    chat_template: bool | None = None,
    max_rounds: int = 3,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
) -> dict[str, list[str]]:
    """``n`` rewrites per image of its ground-truth captions by a causal LM.

    Args:
        model: folder (or hub name) of a ``AutoModelForCausalLM`` with its tokenizer.
        records: the images and their captions.
        n: rewrites per image; draw ``j`` rewrites caption ``j mod (number of captions)``.
        prompt: the prompt, with ``{caption}`` where the caption goes.
        max_new_tokens: generation length limit in tokens.
        batch_size: prompts per ``generate`` call.
        temperature, top_p: sampling parameters.
        chat_template: wrap the prompt in the tokenizer's chat template (None: when the tokenizer has one).
        max_rounds: rounds of re-drawing empty outputs.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda:0``, ...
        dtype: weights' dtype: ``auto`` (the checkpoint's), ``float32``, ``float16``, ``bfloat16``.
        seed: torch seed of the sampling.

    Returns:
        ``{image_id: [rewrite, ...]}`` with up to ``n`` non-empty rewrites each.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_prompt(prompt)
    _check_causal(model)
    dev = _device(device)
    tokenizer = _load("tokenizer", model, lambda: AutoTokenizer.from_pretrained(model))
    lm = _load(
        "causal language model", model, lambda: AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    )
    lm.to(dev).eval()
    tokenizer.padding_side = "left"  # decoder-only: prompts end where generation starts
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"--model {model}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    use_chat = (
        getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    )

    def text_of(caption: str) -> str:
        text = prompt.format(caption=caption)
        if use_chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def generate(jobs: list[tuple[int, int]]) -> list[str]:
        prompts = [text_of(records[i].captions[j % len(records[i].captions)]) for i, j in jobs]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not use_chat).to(dev)
        with torch.no_grad():
            ids = lm.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    torch.manual_seed(seed)
    return _fill(records, n, max_rounds, generate, batch_size, "rewriting")


def i2t_captions(
    model: str,
    records: Sequence[ImageCaptions],
    n: int = 5,
    max_new_tokens: int = 30,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.9,
    max_rounds: int = 3,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
) -> dict[str, list[str]]:
    """``n`` sampled captions per image by an image-to-text model.

    Args:
        model: folder (or hub name) of an ``AutoModelForImageTextToText`` (BLIP, ``VisionEncoderDecoderModel``)
            with its processor (or image processor and tokenizer).
        records: the images.
        n: captions per image.
        max_new_tokens: generation length limit in tokens.
        batch_size: captions per ``generate`` call.
        temperature, top_p: sampling parameters.
        max_rounds: rounds of re-drawing empty outputs.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda:0``, ...
        dtype: weights' dtype: ``auto`` (the checkpoint's), ``float32``, ``float16``, ``bfloat16``.
        seed: torch seed of the sampling.

    Returns:
        ``{image_id: [caption, ...]}`` with up to ``n`` non-empty captions each.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    dev = _device(device)
    processor = _load("processor", model, lambda: AutoProcessor.from_pretrained(model))
    # A BLIP folder has one processor; a VisionEncoderDecoderModel folder often has an image processor and a tokenizer.
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        image_processor = _load("image processor", model, lambda: AutoImageProcessor.from_pretrained(model))
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        tokenizer = _load("tokenizer", model, lambda: AutoTokenizer.from_pretrained(model))
    captioner = _load(
        "image-to-text model", model, lambda: AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
    )
    captioner.to(dev).eval()
    weight_dtype = next(captioner.parameters()).dtype

    def generate(jobs: list[tuple[int, int]]) -> list[str]:
        images = []
        for i, _ in jobs:
            with Image.open(records[i].image_path) as im:
                images.append(im.convert("RGB"))
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(dev, weight_dtype)
        with torch.no_grad():
            ids = captioner.generate(
                pixel_values=pixels,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
            )
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    torch.manual_seed(seed)
    return _fill(records, n, max_rounds, generate, batch_size, "captioning")


# ---------------------------------------------------------------------------------------------------------------------
# The command


def _parser(kind: str) -> ArgumentParser:
    what = {
        "rewrite": "rewrite each image's captions with a causal LM",
        "i2t": "caption each image with an image-to-text model",
    }[kind]
    parser = ArgumentParser(prog=f"mat augment {kind}", description=f"Write {kind}.json: {what}.")
    parser.add_argument(
        "--model", type=str, required=True, help="Local HF model folder (save_pretrained layout)."
    )
    parser.add_argument(
        "--annotations", type=str, required=True, help="Annotation file (Karpathy or ALBEF JSON)."
    )
    parser.add_argument(
        "--image_root",
        type=str,
        default=None,
        help="Folder image paths are relative to (default: its folder).",
    )
    parser.add_argument("--split", type=str, default="train", help="Karpathy split to augment.")
    parser.add_argument("--format", type=Format, default="auto", help="Annotation layout.")
    parser.add_argument("--n", type=int, default=5, help="Outputs per image.")
    parser.add_argument("--out", type=str, default=f"{kind}.json", help="Output JSON file.")
    parser.add_argument("--batch_size", type=int, default=16, help="Generations per model call.")
    parser.add_argument("--max_new_tokens", type=int, default=40 if kind == "rewrite" else 30)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--max_rounds", type=int, default=3, help="Rounds of re-drawing empty outputs.")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", type=str, default="auto", help="auto, float32, float16, bfloat16.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--limit", type=int | None, default=None, help="Only the first N images (a trial run)."
    )
    if kind == "rewrite":
        parser.add_argument(
            "--prompt", type=str, default=REWRITE_PROMPT, help="Prompt with a {caption} slot."
        )
        parser.add_argument(
            "--chat_template", type=bool | None, default=None, help="Use the chat template (default: if any)."
        )
    return parser


USAGE = "usage: mat augment {rewrite,i2t} --model <folder> --annotations <file> [--out FILE] [--n 5] (-h for more)"


def main(argv: list[str]) -> None:
    """``mat augment rewrite|i2t ...``."""
    from mat_lightning.files import atomic_write

    if not argv or argv[0] not in ("rewrite", "i2t"):
        if argv[:1] in (["-h"], ["--help"]):
            print(USAGE)
            return
        raise ConfigError(f"unknown augment command {argv[:1]}; {USAGE}")
    kind = argv[0]
    cfg = _parser(kind).parse_args(argv[1:])
    if cfg.n < 1:
        raise ConfigError(f"--n {cfg.n}: must be >= 1")
    _check_model(cfg.model)
    if kind == "rewrite":
        check_prompt(cfg.prompt)
    records = read_annotations(cfg.annotations, cfg.image_root, cfg.split, cfg.format)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    common = {
        "n": cfg.n,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_rounds": cfg.max_rounds,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
    }
    if kind == "rewrite":
        out = rewrite_captions(
            cfg.model, records, prompt=cfg.prompt, chat_template=cfg.chat_template, **common
        )
    else:
        check_images_exist(records, cfg.annotations)
        out = i2t_captions(cfg.model, records, **common)
    atomic_write(cfg.out, json.dumps(out, indent=1, ensure_ascii=False))
    total = sum(len(v) for v in out.values())
    print(f"wrote {cfg.out}: {total} captions for {len(out)} images")
