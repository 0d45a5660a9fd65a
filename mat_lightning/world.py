"""The synthetic world's assets, built once and cached: our stand-in for dataset downloads and weight hubs.

Real runs download Flickr30K, OpenAI CLIP weights and ``bert-base-uncased``; none of these can be fetched on our
machines, so the synthetic world provides a counterpart of each, generated deterministically and cached under
``$MAT_CACHE_DIR`` (default ``~/.cache/mat_lightning``) in a folder named by the hash of everything that determines it:

* ``ensure_world(preset)``  -> the Karpathy-layout annotation file of the generated data set;
* ``ensure_clip(preset)``   -> a tiny open_clip checkpoint pretrained on the world's train split;
* ``ensure_mlm(preset)``    -> a tiny ``BertForMaskedLM`` folder trained on the world's captions (for BERT-Attack).

Consumers name them by strings (``--data.dataset=synthetic``, ``pretrained: synthetic``, ``mlm: synthetic``), so
the same code path serves real and synthetic runs. Builds hold a file lock, so parallel processes (DDP ranks,
parallel tests) build once and the others wait; results are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mat_lightning.data.synthetic import ANNOTATION_FILE, FORMAT_VERSION, WorldConfig, write_world
from mat_lightning.errors import ConfigError
from mat_lightning.models.pretrain import PretrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    world: WorldConfig
    clip: PretrainConfig
    mlm_steps: int = 600
    notes: str = ""
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # The embedded default: smoke runs and the synthetic benchmark.
    "default": Preset(
        WorldConfig(),
        PretrainConfig(),
        notes="3000/200/200 images of 2-4 objects, 64 px, tiny CLIP 700 steps",
    ),
    # Tests: small enough to build in seconds, good enough that attacks visibly lower recall.
    "tiny": Preset(
        WorldConfig(seed=1, n_train=384, n_val=32, n_test=32),
        PretrainConfig(steps=160, batch_size=64, lr=2e-3),
        mlm_steps=200,
        notes="384/32/32 images for tests",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MAT_CACHE_DIR", Path.home() / ".cache" / "mat_lightning")).expanduser()


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown synthetic world preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


@contextmanager
def _locked(name: str) -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _digest(*parts: object) -> str:
    import hashlib

    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(f"{blob}|{FORMAT_VERSION}".encode()).hexdigest()[:12]


def world_dir(name: str = "default") -> Path:
    return cache_dir() / f"world-{preset(name).world.digest()}"


def ensure_world(name: str = "default") -> Path:
    """Path of the world's annotation file, generating the data set on first use."""
    root = world_dir(name)
    ann = root / ANNOTATION_FILE
    if ann.is_file():
        return ann
    with _locked(root.name):
        if not ann.is_file():
            t0 = time.time()
            log.info("generating the synthetic world %r into %s", name, root)
            write_world(preset(name).world, root)
            log.info("synthetic world ready in %.1fs", time.time() - t0)
    return ann


def load_split(name: str, split: str) -> tuple[torch.Tensor, list[list[str]]]:
    """uint8 images [N, 3, S, S] and caption lists of one split of the world."""
    from mat_lightning.data.datamodule import load_image
    from mat_lightning.data.formats import read_annotations

    ann = ensure_world(name)
    records = read_annotations(ann, ann.parent, split)
    size = preset(name).world.image_size
    return torch.stack([load_image(r.image_path, size) for r in records]), [r.captions for r in records]


def clip_path(name: str = "default") -> Path:
    p = preset(name)
    return cache_dir() / f"clip-{_digest(p.world, p.clip)}.pt"


def ensure_clip(name: str = "default") -> Path:
    """Path of the world's pretrained tiny CLIP (an open_clip state dict), training it on first use.

    A JSON beside the checkpoint records its clean test recall, the configuration and the training time.
    """
    path = clip_path(name)
    if path.is_file():
        return path
    with _locked(path.stem):
        if not path.is_file():
            from mat_lightning.models.encoder import OpenClipEncoder
            from mat_lightning.models.pretrain import clean_recall, pretrain_clip

            p = preset(name)
            images, captions = load_split(name, "train")
            torch.manual_seed(p.clip.seed)
            encoder = OpenClipEncoder(p.clip.model_name, pretrained=None)
            t0 = time.time()
            log.info(
                "pretraining the synthetic world's CLIP (%s, %d steps); cached at %s",
                p.clip.model_name,
                p.clip.steps,
                path,
            )
            with torch.inference_mode(False), torch.enable_grad():  # may be first needed inside an eval loop
                pretrain_clip(encoder, images, captions, p.clip)
            seconds = time.time() - t0
            test_images, test_captions = load_split(name, "test")
            metrics = clean_recall(encoder, test_images, test_captions)
            log.info(
                "synthetic CLIP ready in %.0fs: test TR@1 %.1f IR@1 %.1f",
                seconds,
                metrics["tr_r1"],
                metrics["ir_r1"],
            )
            tmp = path.with_suffix(".tmp")
            torch.save(encoder.model.state_dict(), tmp)
            info = {
                "preset": name,
                "world": asdict(p.world),
                "pretrain": asdict(p.clip),
                "seconds": round(seconds, 1),
                "test_recall": metrics,
            }
            path.with_suffix(".json").write_text(json.dumps(info, indent=2))
            os.replace(tmp, path)
    return path


def mlm_dir(name: str = "default") -> Path:
    p = preset(name)
    return cache_dir() / f"mlm-{_digest(p.world, p.mlm_steps)}"


def ensure_mlm(name: str = "default") -> Path:
    """Folder of the world's tiny masked LM (``save_pretrained`` layout), training it on first use."""
    path = mlm_dir(name)
    if (path / "config.json").is_file():
        return path
    with _locked(path.name):
        if not (path / "config.json").is_file():
            import shutil

            from mat_lightning.models.mlm import train_tiny_mlm

            _, captions = load_split(name, "train")
            tmp = path.with_name(path.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.time()
            log.info(
                "training the synthetic world's masked LM (%d steps); cached at %s",
                preset(name).mlm_steps,
                path,
            )
            with torch.inference_mode(False), torch.enable_grad():  # first use is often inside an attack
                train_tiny_mlm([c for caps in captions for c in caps], tmp, steps=preset(name).mlm_steps)
            tmp.rename(path)
            log.info("masked LM ready in %.0fs", time.time() - t0)
    return path
