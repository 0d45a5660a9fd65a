"""The synthetic data set on disk: its configuration, the scene generators, and the writer of a Karpathy-layout set.

A world is written in Karpathy layout (``dataset_synthetic.json`` + ``images/``) so the same reader as Flickr30K
loads it; each image entry also keeps its ``scene`` so the simulated 1:N generators can be run on it later, and the
folder holds the generator's ``thesaurus.json`` (``{word: [synonyms]}``, for EDA and synonym-only attacks).

Generators. :data:`GENERATORS` maps ``WorldConfig.generator`` to a module that provides

* ``sample_scene(rng: random.Random, cfg: WorldConfig) -> scene`` (scenes have ``.to_json() -> dict``);
* ``render(scene, size: int, rng: random.Random) -> PIL.Image`` (RGB, ``size`` x ``size``);
* ``describe(scene, rng) -> str``: one ground-truth caption (sampled from the grammar);
* ``oracle_caption(scene, rng) -> str``: the simulated I2T captioner;
* ``relayout(scene, rng) -> scene``: the simulated T2I (the caption's scene in a new layout);
* ``scene_from_json(d: dict) -> scene``;
* ``thesaurus() -> dict[str, list[str]]``: word -> synonyms that keep the caption's meaning;
* optionally ``check_config(cfg: WorldConfig) -> None``, raising ConfigError for a config it cannot generate;
* optionally ``misdescribe(scene, rng, cfg) -> scene``: the scene with one attribute wrong, for ``caption_noise``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

from mat_lightning.errors import ConfigError
from mat_lightning.synthetic import classic, rich

# Bump when a generator changes in a way that changes its output, so stale caches are not reused.
FORMAT_VERSION = 1
ANNOTATION_FILE = "dataset_synthetic.json"
THESAURUS_FILE = "thesaurus.json"

#: Scene generators by name (``WorldConfig.generator``); the module docstring lists what each provides.
GENERATORS: dict[str, ModuleType] = {"classic": classic, "rich": rich}

# Fields added after worlds were first cached, with the value that reproduces the worlds of before: at that value
# a field is left out of the config's identity, so the digests (cache folder names) of existing worlds, and of the
# CLIPs and masked LMs trained on them, do not change. A new field with a default joins this table.
_IDENTITY_DEFAULTS: dict[str, object] = {"generator": "classic", "caption_noise": 0.0}


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the generated data set; its hash names the cache folder.

    Attributes:
        seed: master seed; the same config always writes the same files.
        n_train, n_val, n_test: images per Karpathy split.
        image_size: rendered side in pixels.
        min_objects, max_objects: objects per scene are drawn from min_objects..max_objects.
        n_colours, n_shapes: how many of the colours and shapes (in the order of ``COLOURS``/``SHAPE_WORDS``) occur
            (the classic generator's inventories).
        captions_per_image: ground-truth captions per image (5, as Flickr30K).
        generator: the scene generator, a key of :data:`GENERATORS`.
        caption_noise: probability that a *training* caption is written by a careless annotator: it describes the
            scene with one attribute changed (the generator's ``misdescribe``: an object's, or the context's), as
            real captions sometimes name a wrong colour or object. Drawn from its own random stream, so the images
            and every other caption are those of the noise-free world; validation and test captions stay correct.
    """

    seed: int = 0
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 200
    image_size: int = 64
    max_objects: int = 4
    min_objects: int = 2
    n_colours: int = 6
    n_shapes: int = 6
    captions_per_image: int = 5
    generator: str = "classic"
    caption_noise: float = 0.0

    def identity(self) -> dict:
        """The fields as hashed and recorded: those at their ``_IDENTITY_DEFAULTS`` value are left out; a generator
        with a ``VERSION`` adds it (so a changed generator never reuses the caches of its previous output)."""
        out = {
            k: v
            for k, v in asdict(self).items()
            if not (k in _IDENTITY_DEFAULTS and v == _IDENTITY_DEFAULTS[k])
        }
        version = getattr(GENERATORS.get(self.generator), "VERSION", None)
        if version is not None:
            out["generator_version"] = version
        return out

    def digest(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True) + f"|format={FORMAT_VERSION}"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def generator_of(cfg: WorldConfig) -> ModuleType:
    """The scene generator module of ``cfg`` (ConfigError for an unknown name)."""
    if cfg.generator not in GENERATORS:
        raise ConfigError(f"WorldConfig.generator={cfg.generator!r}: unknown; known: {sorted(GENERATORS)}")
    return GENERATORS[cfg.generator]


def unique_captions(describe, scene, rng: random.Random, n: int, max_tries: int = 50) -> list[str]:
    """``n`` captions of ``scene`` by ``describe(scene, rng)``, distinct where the grammar allows it."""
    caps: list[str] = []
    for _ in range(max_tries):
        c = describe(scene, rng)
        if c not in caps:
            caps.append(c)
        if len(caps) == n:
            break
    while len(caps) < n:  # a one-object scene may have fewer than n distinct phrasings
        caps.append(describe(scene, rng))
    return caps


def write_thesaurus(cfg: WorldConfig, root: str | Path) -> Path:
    """Write the generator's ``thesaurus.json`` into ``root`` (atomically) and return its path."""
    from mat_lightning.files import atomic_write

    path = Path(root) / THESAURUS_FILE
    atomic_write(path, json.dumps(generator_of(cfg).thesaurus(), indent=0))
    return path


def write_world(cfg: WorldConfig, root: str | Path) -> Path:
    """Generate the data set into ``root`` (Karpathy JSON + PNGs + thesaurus) and return the annotation file's path.

    Files are written to a temporary folder and renamed into place, so an interrupted run leaves no half world.
    """
    gen = generator_of(cfg)
    check = getattr(gen, "check_config", None)
    if check is not None:
        check(cfg)
    if not 0.0 <= cfg.caption_noise < 1.0:
        raise ConfigError(f"WorldConfig.caption_noise={cfg.caption_noise}: must be in [0, 1)")
    if cfg.caption_noise > 0 and not hasattr(gen, "misdescribe"):
        raise ConfigError(f"WorldConfig.caption_noise: the {cfg.generator!r} generator has no misdescribe()")
    root = Path(root)
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    rng = random.Random(cfg.seed)
    # Caption noise draws from its own stream, so the images and the other captions match the noise-free world's.
    noise_rng = random.Random(f"{cfg.seed}/caption_noise")
    images = []
    sentid = 0
    splits = ["train"] * cfg.n_train + ["val"] * cfg.n_val + ["test"] * cfg.n_test
    for imgid, split in enumerate(splits):
        scene = gen.sample_scene(rng, cfg)
        filename = f"{imgid:06d}.png"
        gen.render(scene, cfg.image_size, rng).save(tmp / "images" / filename)
        sentences = []
        captions = unique_captions(gen.describe, scene, rng, cfg.captions_per_image)
        if split == "train" and cfg.caption_noise > 0:
            captions = [
                gen.describe(gen.misdescribe(scene, noise_rng, cfg), noise_rng)
                if noise_rng.random() < cfg.caption_noise
                else c
                for c in captions
            ]
        for raw in captions:
            sentences.append({"raw": raw, "tokens": raw.split(), "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": "images",
                "filename": filename,
                "split": split,
                "imgid": imgid,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "scene": scene.to_json(),
            }
        )
    meta = {
        "dataset": "synthetic",
        "world_config": cfg.identity(),
        "format_version": FORMAT_VERSION,
        "images": images,
    }
    (tmp / ANNOTATION_FILE).write_text(json.dumps(meta))
    write_thesaurus(cfg, tmp)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root / ANNOTATION_FILE
