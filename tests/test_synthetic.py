"""The synthetic world: deterministic, 1:N captions that describe what is drawn, Karpathy layout on disk."""

from __future__ import annotations

import hashlib
import json
import random
import re

import numpy as np

from mat_lightning.data import synthetic as S
from mat_lightning.data.formats import read_annotations


def test_same_config_writes_the_same_files(tmp_path):
    cfg = S.WorldConfig(seed=3, n_train=6, n_val=2, n_test=2)
    a = S.write_world(cfg, tmp_path / "a")
    b = S.write_world(cfg, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    for png in sorted((tmp_path / "a" / "images").glob("*.png")):
        other = tmp_path / "b" / "images" / png.name
        assert hashlib.sha256(png.read_bytes()).digest() == hashlib.sha256(other.read_bytes()).digest()
    c = S.write_world(S.WorldConfig(seed=4, n_train=6, n_val=2, n_test=2), tmp_path / "c")
    assert c.read_bytes() != a.read_bytes()
    assert cfg.digest() != S.WorldConfig(seed=4, n_train=6, n_val=2, n_test=2).digest()


def test_karpathy_layout_with_five_distinct_captions_and_scene(tmp_path):
    cfg = S.WorldConfig(seed=0, n_train=20, n_val=5, n_test=5)
    ann = S.write_world(cfg, tmp_path / "w")
    recs = read_annotations(ann, ann.parent, "test")
    assert len(recs) == 5
    data = json.loads(ann.read_text())
    assert [im["split"] for im in data["images"]].count("train") == 20
    for r in recs:
        assert len(r.captions) == 5
        scene = S.Scene.from_json(r.meta["scene"])
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        assert r.image_path.is_file()


def test_captions_name_what_is_drawn():
    rng = random.Random(0)
    for _ in range(200):
        scene = S.sample_scene(rng)
        caption = S.describe(scene, rng)
        words = caption.replace(",", " ").replace(":", " ").split()
        # Every caption names at least two objects' colour by a synonym of the drawn colour, or the only object.
        mentioned = [o for o in scene.objects if any(w in words for w in S.COLOUR_WORDS[o.colour])]
        assert len(mentioned) >= min(2, len(scene.objects)), (scene, caption)
        for o in mentioned:
            assert any(w in words for w in S.SHAPE_WORDS[o.shape]), (scene, caption)
        assert not re.search(r"\ba [aeiou]", caption), caption  # "an amber disc", never "a amber disc"


def test_inventories_limit_colours_and_shapes(tmp_path):
    ann = S.write_world(
        S.WorldConfig(seed=2, n_train=30, n_val=1, n_test=1, n_colours=2, n_shapes=3), tmp_path / "w"
    )
    scenes = [S.Scene.from_json(im["scene"]) for im in json.loads(ann.read_text())["images"]]
    assert {o.colour for s in scenes for o in s.objects} == {"red", "green"}
    assert {o.shape for s in scenes for o in s.objects} == {"circle", "square", "triangle"}


def test_relations_follow_positions():
    left = S.SceneObject("circle", "red", "small", 0.2, 0.5)
    right = S.SceneObject("square", "blue", "small", 0.8, 0.45)
    top = S.SceneObject("star", "green", "small", 0.25, 0.1)
    assert S.relation(left, right) == "left of" and S.relation(right, left) == "right of"
    assert S.relation(top, left) == "above" and S.relation(left, top) == "below"


def test_renderer_draws_the_scene_colours():
    scene = S.Scene(
        "black",
        (
            S.SceneObject("square", "red", "large", 0.3, 0.3),
            S.SceneObject("circle", "blue", "large", 0.7, 0.7),
        ),
    )
    img = np.asarray(S.render(scene, 64))
    assert tuple(img[int(0.3 * 64), int(0.3 * 64)]) == S.COLOURS["red"]
    assert tuple(img[int(0.7 * 64), int(0.7 * 64)]) == S.COLOURS["blue"]
    assert tuple(img[2, 62]) == S.BACKGROUNDS["black"]


def test_relayout_keeps_objects_and_moves_them():
    rng = random.Random(1)
    scene = S.sample_scene(rng, 3)
    other = S.relayout(scene, rng)
    assert [(o.shape, o.colour, o.size) for o in other.objects] == [
        (o.shape, o.colour, o.size) for o in scene.objects
    ]
    assert [(o.x, o.y) for o in other.objects] != [(o.x, o.y) for o in scene.objects]


def test_thesaurus_is_symmetric():
    th = S.thesaurus()
    assert "crimson" in th["red"] and "red" in th["crimson"]
    for w, syns in th.items():
        assert w not in syns


def test_building_the_cached_assets_leaves_the_seeded_streams_alone(tmp_path, monkeypatch):
    """A cold run (which builds world, CLIP and MLM in-process) must train like a warm run under the same seed."""
    import torch

    from mat_lightning import world
    from mat_lightning.models.pretrain import PretrainConfig

    monkeypatch.setenv("MAT_CACHE_DIR", str(tmp_path))
    small = world.Preset(
        S.WorldConfig(seed=3, n_train=24, n_val=4, n_test=8),
        PretrainConfig(steps=2, batch_size=8),
        mlm_steps=2,
    )
    monkeypatch.setitem(world.PRESETS, "rng-test", small)

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    built = [world.ensure_world("rng-test"), world.ensure_clip("rng-test"), world.ensure_mlm("rng-test")]
    assert all(str(p).startswith(str(tmp_path)) and p.exists() for p in built)  # built here, not loaded
    assert draws() == expected
