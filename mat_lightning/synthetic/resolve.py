"""Synthetic-world names -> paths, in one place at the top: what the ``mat`` CLI does before it builds anything.

Configs name the synthetic world's assets by strings, as real configs name hub models and data folders:

==========================================  ======================================================================
in the config                               becomes (built and cached on first use, :mod:`.assets`)
==========================================  ======================================================================
``data.dataset: synthetic``                 ``data.annotations``: the world's Karpathy file (``data.world`` preset)
``pretrained: synthetic[:<preset>]``        the world's tiny CLIP checkpoint (any ``pretrained`` key; a sibling
                                            ``model_name`` becomes the preset's CLIP architecture)
``mlm: synthetic[:<preset>]``               the world's masked LM folder (any ``mlm`` key: ``robust_eval.mlm``,
                                            attacks, nested attacks, defenses' training attacks)
``local_models: {hub name: synthetic...}``  the world's masked LM folder
``thesaurus: synthetic[:<preset>]``         the world's ``thesaurus.json`` (EDA, ``ThesaurusCandidates``)
``path: synthetic:<kind>[:<preset>]``       ``<kind>.json`` of the world's precomputed 1:N augmentations (kind
                                            ``rewrite``/``i2t`` for ``PrecomputedCaptions``, ``t2i`` for
                                            ``PrecomputedImages``); only with ``data.dataset: synthetic``
==========================================  ======================================================================

A bare ``synthetic`` means the data's world, ``data.world`` (``default`` when the config has no data section).
Everything below this package (data readers, encoders, attacks, defenses, evaluation) only ever sees the paths and
rejects a leftover name with a ConfigError that points here (:func:`mat_lightning.errors.unresolved_synthetic_name`).

The CLI resolves a copy of the parsed config, so the run's saved ``config.yaml`` keeps the names and re-runs on
another machine (which builds the assets again).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from mat_lightning.errors import ConfigError, is_synthetic_name
from mat_lightning.synthetic import assets, presets

log = logging.getLogger(__name__)

CAPTION_KINDS = ("rewrite", "i2t")
IMAGE_KINDS = ("t2i",)


def _items(node: Any) -> Iterator[tuple[str, Any]]:
    """The direct children of a jsonargparse Namespace or a dict."""
    children = node if isinstance(node, dict) else vars(node)
    return iter(list(children.items()))


def _is_mapping(node: Any) -> bool:
    return isinstance(node, dict) or type(node).__name__ == "Namespace"


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    return node.get(key) if isinstance(node, dict) else getattr(node, key, None)


def _set(node: Any, key: str, value: Any) -> None:
    if isinstance(node, dict):
        node[key] = value
    else:
        setattr(node, key, value)


def preset_of(name: str, where: str, default: str) -> str:
    """``synthetic`` -> ``default``; ``synthetic:<preset>`` -> ``<preset>`` (ConfigError when malformed)."""
    if name == "synthetic":
        return default
    rest = name.split(":", 1)[1]
    if not rest or ":" in rest:
        raise ConfigError(f"{where}={name!r}: use 'synthetic' (the data's world) or 'synthetic:<preset>'")
    return rest


class _Resolver:
    def __init__(self, world: str, dataset: str | None) -> None:
        self.world, self.dataset = world, dataset

    def walk(self, node: Any, where: str, cls: str | None = None) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                self.walk(item, f"{where}[{i}]", cls)
            return
        if not _is_mapping(node):
            return
        class_path = _get(node, "class_path")
        for key, value in _items(node):
            here = f"{where}.{key}" if where else key
            new = self.value(key, value, here, cls)
            if new is not value:
                _set(node, key, new)
            else:
                self.walk(value, here, class_path if key == "init_args" else None)

    def value(self, key: str, value: Any, where: str, cls: str | None) -> Any:
        """``value`` resolved if ``key`` holds a synthetic-world name, else ``value`` itself."""
        if key == "local_models" and isinstance(value, dict):
            return {k: self.mlm(v, f"{where}.{k}") if is_synthetic_name(v) else v for k, v in value.items()}
        if not is_synthetic_name(value):
            return value
        if key == "mlm":
            return self.mlm(value, where)
        if key == "pretrained":
            return str(assets.ensure_clip(preset_of(value, where, self.world)))
        if key == "thesaurus":
            self.warn_on_real_data(where, value, "thesaurus")
            return str(assets.ensure_thesaurus(preset_of(value, where, self.world)))
        if key == "path":
            return self.augmentation(value, where, cls)
        return value

    def warn_on_real_data(self, where: str, name: str, what: str) -> None:
        """The world's masked LM or thesaurus knows only the world's words: on real captions, say so."""
        if self.dataset in (None, "synthetic"):
            return
        advice = {
            "masked LM": "proposes letters for the rest. Give a real MLM, e.g. bert-base-uncased or a local folder "
            "written by save_pretrained.",
            "thesaurus": "leaves the rest alone. Give thesaurus: wordnet or a JSON file {word: [synonyms]}.",
        }[what]
        log.warning(
            "%s=%r: the synthetic world's %s on %s captions knows only the world's words and %s",
            where,
            name,
            what,
            self.dataset,
            advice,
        )

    def mlm(self, name: str, where: str) -> str:
        self.warn_on_real_data(where, name, "masked LM")
        return str(assets.ensure_mlm(preset_of(name, where, self.world)))

    def augmentation(self, name: str, where: str, cls: str | None) -> str:
        """``synthetic:<kind>[:<preset>]`` of a precomputed source -> the world's ``<kind>.json``."""
        images = (cls or "").endswith("Images")
        kinds = IMAGE_KINDS if images else CAPTION_KINDS if (cls or "").endswith("Captions") else None
        kinds = kinds or CAPTION_KINDS + IMAGE_KINDS
        what = "image augmentation" if images else "caption augmentation"
        parts = name.split(":")
        if len(parts) not in (2, 3) or parts[1] not in kinds or (len(parts) == 3 and not parts[2]):
            raise ConfigError(
                f"{where}: {what} path {name!r}: use 'synthetic:<kind>' or 'synthetic:<kind>:<preset>' with kind "
                f"in {list(kinds)}"
            )
        kind, preset = parts[1], parts[2] if len(parts) == 3 else None
        if self.dataset != "synthetic":
            raise ConfigError(
                f"{where}={name!r}: synthetic augmentations only fit data.dataset=synthetic; for real data set "
                "path to your generated JSON file"
            )
        if preset is not None and preset != self.world:
            raise ConfigError(
                f"{where}={name!r} names world preset {preset!r}, but data.world={self.world!r}: their images "
                f"differ. Use {name.rsplit(':', 1)[0]!r} (follows data.world)."
            )
        return str(assets.ensure_augmentations(self.world) / f"{kind}.json")


def data_args(world: str = "default") -> dict[str, str]:
    """``RetrievalDataModule`` arguments of a synthetic world, as the CLI resolves ``--data.world=<world>``:
    ``RetrievalDataModule(**data_args("tiny"), batch_size=16)`` from Python."""
    return {"dataset": "synthetic", "world": world, "annotations": str(assets.ensure_world(world))}


def resolve_config(cfg: Any) -> Any:
    """Replace every synthetic-world name in a parsed config by the path of its (built or cached) asset.

    Args:
        cfg: one subcommand's parsed config (a jsonargparse Namespace, or a plain dict of the same shape), before
            its classes are instantiated. Modified in place.

    Returns:
        ``cfg``.

    Raises:
        ConfigError: an unknown preset, a malformed name, synthetic augmentations on real data or of another world.
    """
    data = _get(cfg, "data")
    dataset = _get(data, "dataset")
    world = _get(data, "world") or "default"
    if dataset == "synthetic" and _get(data, "annotations") is None:
        _set(data, "annotations", data_args(world)["annotations"])
    name_architectures(cfg)
    _Resolver(world, dataset).walk(cfg, "")
    return cfg


def name_architectures(cfg: Any) -> Any:
    """Set the ``model_name`` beside every ``pretrained: synthetic[:<preset>]`` to that preset's CLIP architecture.

    The world's CLIP is a checkpoint *and* an architecture (a preset may size its CLIP: ``cnn`` -> ``mat-tiny-rn``).
    Builds nothing, so the CLI also applies it to the config it saves: the run's ``config.yaml`` names the model
    that ran while keeping the portable ``synthetic`` names.

    Args:
        cfg: one subcommand's parsed config (Namespace or dict), modified in place.

    Returns:
        ``cfg``.
    """
    world = _get(_get(cfg, "data"), "world") or "default"

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not _is_mapping(node):
            return
        pretrained = _get(node, "pretrained")
        if is_synthetic_name(pretrained) and _get(node, "model_name") is not None:
            name = presets.preset(preset_of(pretrained, f"{where}.pretrained", world)).clip.model_name
            _set(node, "model_name", name)
        for key, value in _items(node):
            walk(value, f"{where}.{key}" if where else key)

    walk(cfg, "")
    return cfg
