"""The rich synthetic world's generator: deterministic, captions true to the drawn scene, a meaning-keeping thesaurus.

Checked against independent readings of the scene (a word-level parser of the captions, pixel statistics of the
image), not against the generator's own bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics

import numpy as np

from mat_lightning.data.formats import read_annotations
from mat_lightning.synthetic import dataset as D
from mat_lightning.synthetic import rich as R


def _cfg(**kw):
    return D.WorldConfig(generator="rich", n_train=8, n_val=2, n_test=4, max_objects=3, **kw)


def test_same_config_writes_the_same_files(tmp_path):
    a = D.write_world(_cfg(seed=3), tmp_path / "a")
    b = D.write_world(_cfg(seed=3), tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / D.THESAURUS_FILE).read_bytes() == (
        tmp_path / "b" / D.THESAURUS_FILE
    ).read_bytes()
    for png in sorted((tmp_path / "a" / "images").glob("*.png")):
        other = tmp_path / "b" / "images" / png.name
        assert hashlib.sha256(png.read_bytes()).digest() == hashlib.sha256(other.read_bytes()).digest()
    c = D.write_world(_cfg(seed=4), tmp_path / "c")
    assert c.read_bytes() != a.read_bytes()


def test_the_rich_world_has_its_own_cache_names():
    rich, classic = _cfg(), D.WorldConfig(n_train=8, n_val=2, n_test=4, max_objects=3)
    assert rich.digest() != classic.digest()
    assert rich.identity()["generator_version"] == R.VERSION  # a changed generator never reuses old caches
    assert "generator_version" not in classic.identity()


def _parse(caption: str) -> tuple[list[dict], dict]:
    """Noun phrases ``[size] [pattern] colour shape`` and context phrases, read from the words alone."""
    inv = lambda groups: {w: k for k, ws in groups.items() for w in ws}  # noqa: E731
    sizes, patterns, colours, shapes = (
        inv(R.SIZE_WORDS),
        inv(R.PATTERN_WORDS),
        inv(R.COLOUR_WORDS),
        inv(R.SHAPE_WORDS),
    )
    objects, current = [], {}
    for w in caption.replace(",", " ").replace(":", " ").split():
        for table, key in ((sizes, "size"), (patterns, "pattern"), (colours, "colour")):
            if w in table:
                current[key] = table[w]
                break
        else:
            if w in shapes:
                objects.append({**current, "shape": shapes[w]})
            current = current if w in ("a", "an") else {}
    context = {}
    for key, phrases in (
        ("ground", R.GROUND_PHRASES),
        ("light", R.LIGHT_PHRASES),
        ("weather", R.WEATHER_PHRASES),
    ):
        for value, texts in phrases.items():
            if any(t in caption for t in texts):
                context.setdefault(key, set()).add(value)
    for m in re.finditer(r"(?:against a|by a) (\w+) (?:background|backdrop|wall)", caption):
        context.setdefault("backdrop", set()).add(inv(R.BACKDROP_WORDS)[m.group(1)])
    return objects, context


def test_captions_describe_the_drawn_scene():
    rng = random.Random(0)
    lengths = []
    for _ in range(300):
        scene = R.sample_scene(rng, _cfg())
        caption = R.describe(scene, rng)
        lengths.append(len(caption.split()))
        objects, context = _parse(caption)
        assert len(objects) >= 2, caption  # every caption names at least two objects
        for o in objects:  # ... each of which is in the scene, with the attributes the caption gives it
            assert any(all(getattr(s, k) == v for k, v in o.items()) for s in scene.objects), (scene, caption)
        for key, values in context.items():
            assert values == {getattr(scene, key)}, (scene, caption)
        assert context, caption  # and at least one thing about the scene's context
        assert not re.search(r"\ba [aeiou]", caption), caption
    # Longer than the classic world's 5-8 words, in Flickr30K's range (mean ~12 words, most 8-20).
    assert 11 <= statistics.mean(lengths) <= 17 and max(lengths) <= 30


def test_the_image_shows_the_context_and_the_patterns():
    base = R.RichScene(
        "black", "none", "bright", "clear", (R.RichObject("square", "red", "plain", "large", 0.5, 0.4),)
    )
    pixels = lambda s: np.asarray(R.render(s, 64), dtype=np.float32)  # noqa: E731
    plain = pixels(base)
    centre = plain[22:29, 29:36]
    assert np.allclose(centre, R.COLOURS["red"], atol=1)  # the object's colour, exact without jitter
    striped = pixels(
        R.RichScene(
            "black", "none", "bright", "clear", (R.RichObject("square", "red", "striped", "large", 0.5, 0.4),)
        )
    )
    assert len({tuple(p) for p in striped[22:29, 29:36].reshape(-1, 3)}) == 2  # two tones: colour and stripes
    grass = pixels(R.RichScene("black", "grass", "bright", "clear", base.objects))
    assert grass[60].mean(axis=0)[1] > grass[60].mean(axis=0)[0]  # a green strip at the bottom
    dim = pixels(R.RichScene("black", "none", "dim", "clear", base.objects))
    assert dim[25, 32, 0] < 0.6 * plain[25, 32, 0]  # dim light darkens everything
    fog = pixels(R.RichScene("black", "none", "bright", "fog", base.objects))
    assert fog[5, 5].mean() > plain[5, 5].mean() + 50  # fog lifts the black backdrop


def test_thesaurus_keeps_meaning():
    """Synonyms stay within one concept: a colour word's synonyms name the same colour, and so on."""
    th = R.thesaurus()
    groups = [R.COLOUR_WORDS, R.SHAPE_WORDS, R.PATTERN_WORDS, R.SIZE_WORDS, R.BACKDROP_WORDS]
    concept = {w: (i, k) for i, g in enumerate(groups) for k, ws in g.items() for w in ws}
    for word, syns in th.items():
        assert syns and word not in syns
        for s in syns:
            if word in concept:
                assert concept[s] == concept[word], (word, s)
            assert word in th.get(s, []) or word not in concept, (word, s)  # symmetric inside the vocabulary
        assert all(" " not in s for s in syns)


def test_written_world_reads_back_with_its_scenes(tmp_path):
    ann = D.write_world(_cfg(seed=0), tmp_path / "w")
    recs = read_annotations(ann, ann.parent, "test")
    assert len(recs) == 4
    for r in recs:
        assert len(set(r.captions)) == 5
        scene = R.scene_from_json(r.meta["scene"])
        assert 2 <= len(scene.objects) <= 3
        assert R.scene_from_json(json.loads(json.dumps(scene.to_json()))) == scene


def test_a_careless_annotator_changes_exactly_one_attribute():
    rng = random.Random(5)
    changed_fields = set()
    for _ in range(300):
        scene = R.sample_scene(rng, _cfg())
        wrong = R.misdescribe(scene, rng)
        a, b = scene.to_json(), wrong.to_json()
        diffs = [k for k in ("backdrop", "ground", "light", "weather") if a[k] != b[k]]
        for o, p in zip(a["objects"], b["objects"], strict=True):
            assert (o["size"], o["x"], o["y"]) == (p["size"], p["x"], p["y"])
            diffs += [k for k in ("shape", "colour", "pattern") if o[k] != p[k]]
        assert len(diffs) == 1, (a, b)
        changed_fields.update(diffs)
        kinds = [(o["shape"], o["colour"], o["pattern"]) for o in b["objects"]]
        assert len(set(kinds)) == len(kinds)  # still distinct objects
    assert changed_fields == {"backdrop", "ground", "light", "weather", "shape", "colour", "pattern"}
