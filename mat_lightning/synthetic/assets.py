"""The synthetic world's assets, built once and cached: our stand-in for dataset downloads and weight hubs.

Real runs download Flickr30K, OpenAI CLIP weights and ``bert-base-uncased``; none of these can be fetched on our
machines, so the synthetic world provides a counterpart of each, generated deterministically and cached under
``$MAT_CACHE_DIR`` (default ``~/.cache/mat_lightning``) in a folder named by the hash of everything that determines it:

* ``ensure_world(preset)``  -> the Karpathy-layout annotation file of the generated data set;
* ``ensure_clip(preset)``   -> a tiny open_clip checkpoint pretrained on the world's train split;
* ``ensure_mlm(preset)``    -> a tiny ``BertForMaskedLM`` folder trained on the world's captions (for BERT-Attack);
* ``ensure_augmentations(preset)`` -> a folder of precomputed 1:N augmentations of the train split (rewrite, I2T,
  T2I), in the file formats real users produce with LLaMA, BLIP and Stable Diffusion;
* ``ensure_thesaurus(preset)`` -> the world's ``thesaurus.json`` (``{word: [synonyms]}``).

Configs name them by strings (``--data.dataset=synthetic``, ``pretrained: synthetic``, ``mlm: synthetic``), which
the ``mat`` CLI turns into these paths (:mod:`mat_lightning.synthetic.resolve`), so data readers, encoders and
attacks see paths, as on real data. Builds hold a file lock, so parallel processes (DDP ranks, parallel tests)
build once and the others wait; results are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from mat_lightning.cache import cache_dir
from mat_lightning.errors import ConfigError
from mat_lightning.synthetic.dataset import (
    ANNOTATION_FILE,
    FORMAT_VERSION,
    THESAURUS_FILE,
    WorldConfig,
    generator_of,
    write_thesaurus,
    write_world,
)
from mat_lightning.synthetic.presets import preset

log = logging.getLogger(__name__)


@contextmanager
def _locked(name: str) -> Iterator[None]:
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        fh = open(cache_dir() / f".{name}.lock", "w")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ConfigError(
            f"the asset cache {cache_dir()} is not a writable folder ({e.strerror}): set MAT_CACHE_DIR to one "
            "(the synthetic world, its CLIP and its masked LM are built there)"
        ) from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _own_random_streams() -> Iterator[None]:
    """Build an asset without advancing the caller's random streams (Python, NumPy, torch).

    A cold run builds the assets inside the process that then trains under ``seed_everything``; a warm run loads
    them. Without this, building would consume the seeded streams and the two runs would train differently.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):  # assets are built on the CPU
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


# 2: the CLIP and the masked LM are trained in one thread (:func:`_one_thread`); 1: in the machine's thread count
BUILD_VERSION = 2


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train an asset in one torch thread, whatever the machine's (or ``OMP_NUM_THREADS``'s) count.

    With several threads, a CPU matmul, convolution or reduction splits its sums across threads, and the split (so
    the order of the float additions) follows the thread count: the weights of a 700-step pretraining then drift
    apart, and the same cache key named different models on different machines (the ``cnn`` world's CLIP: clean
    TR@1 / IR@1 81.0 / 81.6 built with 2 threads, 84.0 / 81.9 with 1). One thread fixes the order. It does not make
    builds identical across CPU instruction sets (AVX2 vs AVX-512 kernels sum differently).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fields(part: object) -> object:
    """What of ``part`` is hashed: a world config's identity, a dataclass's fields, else the value itself."""
    if isinstance(part, WorldConfig):
        return part.identity()
    return asdict(part) if hasattr(part, "__dataclass_fields__") else part


def _digest(*parts: object) -> str:
    import hashlib

    blob = json.dumps([_fields(p) for p in parts], sort_keys=True)
    return hashlib.sha256(f"{blob}|{FORMAT_VERSION}".encode()).hexdigest()[:12]


def world_dir(name: str = "default") -> Path:
    return cache_dir() / f"world-{preset(name).world.digest()}"


def ensure_world(name: str = "default") -> Path:
    """Path of the world's annotation file, generating the data set on first use."""
    root = world_dir(name)
    ann = root / ANNOTATION_FILE
    if ann.is_file():
        return ann
    with _locked(root.name), _own_random_streams():
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
    return cache_dir() / f"clip-{_digest(p.world, p.clip, BUILD_VERSION)}.pt"


def ensure_clip(name: str = "default") -> Path:
    """Path of the world's pretrained tiny CLIP (an open_clip state dict), training it on first use.

    A JSON beside the checkpoint records its clean test recall, the configuration and the training time.
    """
    path = clip_path(name)
    if path.is_file():
        return path
    with _locked(path.stem), _own_random_streams(), _one_thread():
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
                "world": p.world.identity(),
                "pretrain": asdict(p.clip),
                "seconds": round(seconds, 1),
                "test_recall": metrics,
            }
            path.with_suffix(".json").write_text(json.dumps(info, indent=2))
            os.replace(tmp, path)
    return path


def mlm_dir(name: str = "default") -> Path:
    p = preset(name)
    return cache_dir() / f"mlm-{_digest(p.world, p.mlm_steps, BUILD_VERSION)}"


def ensure_mlm(name: str = "default") -> Path:
    """Folder of the world's tiny masked LM (``save_pretrained`` layout), training it on first use."""
    path = mlm_dir(name)
    if (path / "config.json").is_file():
        return path
    with _locked(path.name), _own_random_streams(), _one_thread():
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


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed 1:N augmentations (MAT+), simulated by the world's generators

# Per train image: grammar re-samples (rewrite), oracle captions (I2T), re-rendered layouts (T2I).
AUGMENT_COUNTS = {"rewrite": 5, "i2t": 5, "t2i": 2}
AUGMENT_VERSION = 1  # bump when the files below change for the same world
AUGMENT_KINDS = ("rewrite", "i2t", "t2i")


def augmentations_dir(name: str = "default") -> Path:
    p = preset(name)
    return cache_dir() / f"augment-{_digest(p.world, AUGMENT_COUNTS, AUGMENT_VERSION)}"


def _distinct(draw: Callable[[], str], n: int, avoid: set[str], max_tries: int = 50) -> list[str]:
    """``n`` draws, distinct and outside ``avoid`` when the generator allows it within ``max_tries``."""
    out: list[str] = []
    for _ in range(max_tries):
        c = draw()
        if c not in avoid and c not in out:
            out.append(c)
        if len(out) == n:
            return out
    while len(out) < n:  # a one-object scene has few phrasings: repeat rather than return fewer
        out.append(draw())
    return out


def ensure_augmentations(name: str = "default") -> Path:
    """Folder of the world's precomputed 1:N augmentations of its **train** split, generating it on first use.

    Files, keyed by ``ImageCaptions.image_id`` (``images/000123.png``), the formats of
    :mod:`mat_lightning.data.augment.providers`:

    * ``rewrite.json``: ``{image_id: [5 captions]}``, the grammar re-sampled (the simulated LM rewrite), different
      from the ground-truth captions where the grammar allows;
    * ``i2t.json``: ``{image_id: [5 captions]}`` by the oracle captioner (the simulated BLIP);
    * ``t2i.json``: ``{image_id: [2 paths]}`` relative to the folder, ``t2i/<stem>_<k>.png``: the scene re-rendered
      in a new layout (the simulated Stable Diffusion): same objects and colours, new positions;
    * ``manifest.json``: the preset, the world's digest and the counts (written last).

    Deterministic: image ``i``'s augmentations depend only on the world seed and its id.
    """
    root = augmentations_dir(name)
    if (root / "manifest.json").is_file():
        return root
    ann = ensure_world(name)
    with _locked(root.name), _own_random_streams():
        if not (root / "manifest.json").is_file():
            import shutil
            from functools import partial

            from mat_lightning.data.formats import read_annotations

            t0 = time.time()
            cfg = preset(name).world
            gen = generator_of(cfg)
            records = read_annotations(ann, ann.parent, "train")
            tmp = root.with_name(root.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "t2i").mkdir(parents=True)
            files: dict[str, dict[str, list[str]]] = {kind: {} for kind in AUGMENT_KINDS}
            for r in records:
                scene = gen.scene_from_json(r.meta["scene"])
                rng = random.Random(f"augment|{cfg.seed}|{r.image_id}")  # str seeds hash stably across runs
                files["rewrite"][r.image_id] = _distinct(
                    partial(gen.describe, scene, rng), AUGMENT_COUNTS["rewrite"], set(r.captions)
                )
                files["i2t"][r.image_id] = _distinct(
                    partial(gen.oracle_caption, scene, rng), AUGMENT_COUNTS["i2t"], set()
                )
                paths = []
                for k in range(AUGMENT_COUNTS["t2i"]):
                    rel = f"t2i/{Path(r.image_id).stem}_{k}.png"
                    gen.render(gen.relayout(scene, rng), cfg.image_size, rng).save(tmp / rel)
                    paths.append(rel)
                files["t2i"][r.image_id] = paths
            for kind, data in files.items():
                (tmp / f"{kind}.json").write_text(json.dumps(data, indent=0))
            manifest = {
                "preset": name,
                "world_digest": cfg.digest(),
                "split": "train",
                "n_images": len(records),
                "counts": AUGMENT_COUNTS,
                "version": AUGMENT_VERSION,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
            log.info("synthetic 1:N augmentations of %r ready in %.1fs at %s", name, time.time() - t0, root)
    return root


def ensure_thesaurus(name: str = "default") -> Path:
    """The world's ``thesaurus.json`` (``{word: [synonyms]}``), generating the world on first use.

    Worlds cached before the file existed get it written beside their annotations on first use (atomically, under
    the world's lock).
    """
    root = ensure_world(name).parent
    path = root / THESAURUS_FILE
    if not path.is_file():
        with _locked(root.name):
            if not path.is_file():
                write_thesaurus(preset(name).world, root)
    return path
