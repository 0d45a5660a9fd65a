"""The synthetic world: a seeded, generated stand-in for Flickr30K, OpenAI CLIP weights and ``bert-base-uncased``.

A layer **above** ``data``, ``models``, ``attacks``, ``defenses`` and ``eval``: it generates a Karpathy-layout data
set, pretrains its tiny CLIP (``models.pretrain``) and masked LM (``models.mlm``), and the ``mat`` CLI turns the
``synthetic`` names of a config into the paths of these assets before anything is built (:mod:`.resolve`). Nothing
below imports this package (``tests/test_layers.py`` checks the import graph).

* :mod:`.classic`: the classic world's scenes, renderer, caption grammar, simulated 1:N generators, thesaurus;
* :mod:`.dataset`: :class:`WorldConfig`, the generator registry :data:`GENERATORS`, :func:`write_world`;
* :mod:`.presets`: named worlds (:data:`PRESETS`: ``default``, ``tiny``);
* :mod:`.assets`: the cached assets, ``ensure_world/clip/mlm/augmentations/thesaurus(preset)`` -> path;
* :mod:`.resolve`: :func:`resolve_config`, names -> paths in a parsed config.
"""

from __future__ import annotations

from mat_lightning.synthetic.assets import (
    ensure_augmentations,
    ensure_clip,
    ensure_mlm,
    ensure_thesaurus,
    ensure_world,
    load_split,
)
from mat_lightning.synthetic.dataset import GENERATORS, WorldConfig, write_world
from mat_lightning.synthetic.presets import PRESETS, Preset, preset
from mat_lightning.synthetic.resolve import data_args, name_architectures, resolve_config

__all__ = [
    "GENERATORS",
    "PRESETS",
    "Preset",
    "WorldConfig",
    "data_args",
    "name_architectures",
    "preset",
    "resolve_config",
    "write_world",
]
__all__ += [
    "ensure_augmentations",
    "ensure_clip",
    "ensure_mlm",
    "ensure_thesaurus",
    "ensure_world",
    "load_split",
]
