"""Provenance of a run, recorded in ``results.json``: what was run (the config without the seed, and its hash), on
which weights (content hashes, not cache paths), by which code (git commit, package versions) and when (UTC).

``mat report`` groups runs by :func:`config_hash` of :func:`run_settings`: two runs are replicates when everything
but the seed and pure output/logging settings (run folder names, W&B, progress bars, ...) is equal, and the model
they started from has the same weights, wherever those weights sit on disk.

Import-light (no torch at import time): ``mat report`` uses it; :func:`weights_sha256` imports torch when called.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Settings that never change a result: the replicate's seed, names and folders of the output, logging, progress
#: bars, data-loading performance, where checkpoints are read from (what they hold is hashed instead). Patterns
#: over the dotted keys of :func:`flatten` (``*`` also matches dots).
EXCLUDED_SETTINGS = (
    "seed_everything",
    "robust_eval.seed",
    "experiment",
    "robust_eval.experiment",
    "run_root",
    "trainer.default_root_dir",
    "config",
    "config.*",
    "print_config",
    "ckpt_path",
    "weights_only",
    "local_models",
    "local_models.*",
    "trainer.logger",
    "trainer.logger.*",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.callbacks.*.init_args.dirpath",
    "trainer.callbacks.*.init_args.verbose",
    "robust_eval.progress",
    "robust_eval.export_dir",
    "data.num_workers",
    "data.persistent_workers",
    "data.pin_memory",
    "model.encoder.init_args.cache_dir",
    "model.candidate_store",  # the same adversarial captions with and without (tests/test_candidate_store.py)
    "robust_eval.candidate_store",
)
#: Where the encoder's starting weights come from: replaced by their content hash when it is known.
WEIGHT_SOURCES = ("model.encoder.init_args.pretrained", "model.encoder.init_args.vision_checkpoint")
#: The key that holds that hash in the settings.
MODEL_HASH_KEY = "model.encoder.weights_sha256"
#: Packages whose versions results.json records (distribution names).
PACKAGES = ("mat-lightning", "torch", "lightning", "open_clip_torch", "transformers")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> ``{"a.b.0.c": leaf}`` (an empty dict or list is a leaf)."""
    if isinstance(value, Mapping) and value:
        items: Iterable = value.items()
    elif isinstance(value, list | tuple) and value:
        items = enumerate(value)
    else:
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def run_settings(config: Mapping[str, Any], model_sha256: str | None = None) -> dict[str, Any]:
    """The settings that make a run what it is: the flattened config minus :data:`EXCLUDED_SETTINGS`; with
    ``model_sha256``, the weight files' paths become that content hash (the same weights under another path or a
    symlink are the same model). Sorted by key, JSON-able."""
    flat = flatten(dict(config))
    excluded = EXCLUDED_SETTINGS + (WEIGHT_SOURCES if model_sha256 else ())
    settings = {
        k: _jsonable(v) for k, v in flat.items() if not any(fnmatch.fnmatchcase(k, p) for p in excluded)
    }
    if model_sha256:
        settings[MODEL_HASH_KEY] = model_sha256
    return dict(sorted(settings.items()))


def config_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the settings as canonical JSON."""
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_file_hash(path: Path) -> tuple[str, dict[str, Any]] | None:
    """(hash, settings) of a saved ``config.yaml`` (for results.json files written before the hash was recorded),
    or None when it is missing or unreadable. No weights hash is known there: the weight paths stay."""
    try:
        import yaml

        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, ImportError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    settings = run_settings(config)
    return config_hash(settings), settings


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 over the tensors of a state dict (names, dtypes, shapes and bytes, in key
    order): the same weights give the same hash whatever file or path they were loaded from."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _path_sha256(real: str) -> str:
    """A file: ``sha256sum`` of it; a folder: the SHA-256 of its ``<relative path>\\0<file sha256>\\n`` lines in
    path order. 16 hex digits."""
    root = Path(real)
    if root.is_file():
        return _file_sha256(root)[:16]
    lines = "".join(
        f"{f.relative_to(root).as_posix()}\0{_file_sha256(f)}\n"
        for f in sorted(root.rglob("*"))
        if f.is_file()
    )
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def path_identity(value: str) -> str:
    """A local file or folder given to a setting (a masked LM, a thesaurus) as ``<name> sha256:<content hash>``,
    so that the same content under another path (another cache folder, a symlink) records the same; other
    strings (hub names, keywords) unchanged."""
    if os.sep not in value or not os.path.exists(value):
        return value
    real = os.path.realpath(value)
    return f"{Path(real).name} sha256:{_path_sha256(real)}"


@functools.lru_cache(maxsize=4)
def git_state(root: str) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout whose top level is ``root`` (the code that ran), or None: not
    a checkout (an installed package), no git, or any git error. Dirty = tracked files changed."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return None  # e.g. site-packages inside some other repository
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (None where one is not installed), read without importing them."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def utc_now() -> str:
    """``2026-12-05T08:40:00.123456Z``: sorts as it reads."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_of_mtime(path: Path) -> str:
    """A file's modification time in :func:`utc_now`'s format (for results.json files without a timestamp)."""
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
