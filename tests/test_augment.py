"""MAT+'s 1:N augmentations: EDA, image augmentation, precomputed providers, the synthetic world's simulated
generators, and 1:N training pairs in the data module."""

from __future__ import annotations

import json
import pickle
import random
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mat_lightning import synthetic
from mat_lightning.data.augment import EDA, ImageAugment, OneToMany, PrecomputedCaptions, PrecomputedImages
from mat_lightning.data.augment.eda import _split_punct
from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.data.formats import read_annotations
from mat_lightning.errors import ConfigError, DataError
from mat_lightning.synthetic.classic import COLOURS, Scene, thesaurus


@pytest.fixture(scope="module")
def train_captions(tiny_world) -> list[str]:
    return [c for r in read_annotations(tiny_world, None, "train")[:60] for c in r.captions]


def world_eda(**kw) -> EDA:
    """EDA with the tiny world's thesaurus (what ``thesaurus: synthetic`` resolves to in a mat config)."""
    return EDA(**{"thesaurus": str(synthetic.ensure_thesaurus("tiny")), **kw})


def only(**rates) -> EDA:
    """EDA with just the given operations enabled."""
    return world_eda(**{"alpha_sr": 0.0, "alpha_ri": 0.0, "alpha_rs": 0.0, "p_rd": 0.0, **rates})


def augmentation(kind: str) -> str:
    """The tiny world's precomputed ``kind`` file (what ``synthetic:<kind>`` resolves to in a mat config)."""
    return str(synthetic.ensure_augmentations("tiny") / f"{kind}.json")


# -- EDA ----------------------------------------------------------------------------------------------------------------


def test_eda_never_returns_an_empty_caption(train_captions):
    captions = ["dog", "red", "a circle", "the the the", *train_captions[:20]]
    for eda in (world_eda(), only(p_rd=1.0), world_eda(alpha_sr=1.0, alpha_ri=1.0, alpha_rs=1.0, p_rd=1.0)):
        for seed in range(200):
            rng = random.Random(seed)
            for caption in captions:
                out = eda(caption, rng)
                assert out.strip() and out.split(), (eda, caption)


def test_eda_full_deletion_keeps_one_word_of_the_caption():
    eda = only(p_rd=1.0)
    caption = "a small red circle above a big blue square"
    for seed in range(50):
        out = eda(caption, random.Random(seed))
        assert len(out.split()) == 1 and out in caption.split()
    assert eda("dog", random.Random(0)) == "dog"


def test_synonym_replacement_changes_n_words_to_synonyms(train_captions):
    eda, syn = only(alpha_sr=0.3), thesaurus()
    changed_any = 0
    for seed, caption in enumerate(train_captions):
        words = caption.split()
        out = eda(caption, random.Random(seed)).split()
        assert len(out) == len(words)
        candidates = [w for w in words if _split_punct(w)[1].lower() in syn]
        expected = min(EDA.n_changes(0.3, len(words)), len(candidates))
        diffs = [(a, b) for a, b in zip(words, out, strict=True) if a != b]
        assert len(diffs) == expected, (caption, out)
        for a, b in diffs:
            pa, ca, sa = _split_punct(a)
            pb, cb, sb = _split_punct(b)
            assert (pa, sa) == (pb, sb) and cb in syn[ca.lower()]
        changed_any += bool(diffs)
    assert changed_any == len(train_captions)  # every world caption names a colour or a shape


def test_random_swap_keeps_the_words(train_captions):
    eda = only(alpha_rs=0.2)
    n_changed = 0
    for seed, caption in enumerate(train_captions):
        out = eda(caption, random.Random(seed))
        assert Counter(out.split()) == Counter(caption.split())
        moved = sum(a != b for a, b in zip(caption.split(), out.split(), strict=True))
        assert moved <= 2 * EDA.n_changes(0.2, len(caption.split()))
        n_changed += out != caption
    assert n_changed > 0.8 * len(train_captions)


def test_random_insertion_adds_n_synonyms_of_caption_words(train_captions):
    eda, syn = only(alpha_ri=0.2), thesaurus()
    for seed, caption in enumerate(train_captions):
        words = caption.split()
        out = eda(caption, random.Random(seed)).split()
        inserted = Counter(out) - Counter(words)
        assert not Counter(words) - Counter(out)  # nothing removed
        assert sum(inserted.values()) == EDA.n_changes(0.2, len(words))
        sources = {_split_punct(w)[1].lower() for w in words}
        for w in inserted:
            assert any(w in syn.get(s, []) for s in sources), (caption, w)


def test_random_deletion_rate():
    eda = only(p_rd=0.3)
    caption = " ".join(f"w{i}" for i in range(20))
    rng = random.Random(0)
    kept = [len(eda(caption, rng).split()) for _ in range(2000)]
    assert abs(1 - np.mean(kept) / 20 - 0.3) < 0.01


def test_eda_uses_each_enabled_operation(train_captions):
    """One op per sentence, chosen uniformly: SR keeps the length, RI lengthens, RD shortens (mostly)."""
    eda = world_eda(alpha_sr=0.2, alpha_ri=0.2, alpha_rs=0.0, p_rd=0.3)
    caption = train_captions[0]
    rng = random.Random(0)
    lengths = Counter(np.sign(len(eda(caption, rng).split()) - len(caption.split())) for _ in range(600))
    assert all(150 < lengths[s] < 250 for s in (-1, 1))  # ~1/3 each (RD rarely deletes nothing)


def test_thesaurus_from_a_json_file(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"cat": ["feline"], "Dog": ["hound", "dog", "big dog"]}))
    eda = EDA(alpha_sr=1.0, alpha_ri=0, alpha_rs=0, p_rd=0, thesaurus=str(path))
    assert eda("the cat and the Dog.", random.Random(0)) == "the feline and the Hound."


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "thesaurus file not found"), ("{not json", "not valid JSON"), ('["cat"]', "expected an object")],
)
def test_thesaurus_file_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "syn.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        EDA(thesaurus=str(path))
    assert str(path) in str(e.value)


def test_wordnet_missing_is_a_config_error(monkeypatch, tmp_path):
    nltk = pytest.importorskip("nltk")
    from nltk.corpus import wordnet

    if type(wordnet).__name__ != "LazyCorpusLoader":
        pytest.skip("WordNet already loaded in this process")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # no corpus there, whatever this machine has
    with pytest.raises(ConfigError, match=r"WordNet corpus is not installed.*nltk\.downloader wordnet"):
        EDA(thesaurus="wordnet")


def test_eda_rates_are_checked():
    with pytest.raises(ConfigError, match="alpha_sr=1.5"):
        EDA(alpha_sr=1.5)
    with pytest.raises(ConfigError, match="every rate is 0"):
        only()


# -- image augmentation -----------------------------------------------------------------------------------------------


def test_image_augment_is_deterministic_in_range_and_leaves_the_input(tiny_test_split):
    image = tiny_test_split[0][0].float() / 255
    before = image.clone()
    aug = ImageAugment(hue=0.1)
    outs = [aug(image, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    for out in outs:
        assert out.shape == image.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(image, before)


def test_flip_mirrors_a_hand_made_image():
    image = torch.zeros(3, 8, 8)
    image[0, :, :3] = 1.0  # red band on the left
    image[2, 2:4, 6:] = 0.5  # a blue patch on the right
    aug = ImageAugment(scale=(1.0, 1.0), p_flip=1.0, brightness=0, contrast=0, saturation=0)
    out = aug(image, torch.Generator().manual_seed(0))
    assert torch.equal(out, image.flip(-1))
    assert out[0, :, 5:].eq(1).all() and out[2, 2:4, :2].eq(0.5).all()
    identity = ImageAugment(scale=(1.0, 1.0), p_flip=0.0, brightness=0, contrast=0, saturation=0)
    assert torch.equal(identity(image, torch.Generator().manual_seed(0)), image)


def test_crop_box_respects_scale_and_ratio():
    aug = ImageAugment(scale=(0.3, 0.6), ratio=(0.8, 1.25))
    for seed in range(100):
        top, left, h, w = aug.crop_box(64, 48, torch.Generator().manual_seed(seed))
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 48
        assert 0.25 <= h * w / (64 * 48) <= 0.65 and 0.7 <= w / h <= 1.4


def test_brightness_jitter_scales_pixels():
    image = torch.linspace(0.1, 0.8, 48).reshape(3, 4, 4)
    aug = ImageAugment(scale=(1.0, 1.0), p_flip=0, brightness=0.2, contrast=0, saturation=0)
    factors = []
    for seed in range(20):
        ratio = aug(image, torch.Generator().manual_seed(seed)) / image
        torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio))  # one factor for every pixel
        factors.append(ratio.mean().item())
    assert len(set(factors)) == 20 and all(0.8 - 1e-6 <= f <= 1.2 + 1e-6 for f in factors)


# -- providers -------------------------------------------------------------------------------------------------------


def test_precomputed_captions_read_and_fail_clearly(tmp_path):
    path = tmp_path / "rewrite.json"
    path.write_text(json.dumps({"images/1.png": ["a cat", "  ", "a feline"], "images/2.png": []}))
    strict = PrecomputedCaptions(str(path))
    assert strict.captions("images/1.png") == ["a cat", "a feline"]  # blanks dropped
    assert strict.captions("images/2.png") == []
    with pytest.raises(DataError, match=r"rewrite\.json has no entry for image 'images/3\.png'"):
        strict.captions("images/3.png")
    assert PrecomputedCaptions(str(path), strict=False).captions("images/3.png") == []
    with pytest.raises(DataError, match=r"lacks 1 of 2 images, e\.g\. \['images/3\.png'\]"):
        strict.check_covers(["images/1.png", "images/3.png"])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "file not found"),
        ("{oops", "not valid JSON"),
        ('[["a"]]', "expected an object"),
        ('{"images/1.png": "a cat"}', "entry 'images/1.png' must be a list of strings"),
    ],
)
def test_provider_file_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "i2t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        PrecomputedCaptions(str(path)).captions("images/1.png")
    assert str(path) in str(e.value)


def test_precomputed_images_resolve_paths_and_fail_clearly(tmp_path):
    (tmp_path / "gen").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "gen" / "a.png")
    path = tmp_path / "t2i.json"
    path.write_text(json.dumps({"x/1.jpg": ["gen/a.png"], "x/2.jpg": ["gen/missing.png"]}))
    source = PrecomputedImages(str(path))
    assert source.image_paths("x/1.jpg") == [tmp_path / "gen" / "a.png"]
    with pytest.raises(DataError, match="gen/missing.png.*does not exist"):
        source.image_paths("x/2.jpg")
    with pytest.raises(DataError, match="listed images do not exist"):
        source.check_covers(["x/1.jpg", "x/2.jpg"])
    with pytest.raises(DataError, match=r"no entry for image 'x/3\.jpg'"):
        source.image_paths("x/3.jpg")


def test_unresolved_synthetic_names_are_errors():
    # The mat CLI resolves them (tests/test_resolve.py); below the synthetic package they are a clear error.
    with pytest.raises(ConfigError, match=r"synthetic-world names are resolved to paths by the mat CLI"):
        PrecomputedCaptions("synthetic:i2t")
    with pytest.raises(ConfigError, match=r"ensure_augmentations\(<preset>\) / 't2i.json'"):
        PrecomputedImages("synthetic:t2i")
    with pytest.raises(ConfigError, match=r"ensure_thesaurus"):
        EDA()  # the default thesaurus, synthetic, is the CLI's to resolve


# -- the synthetic world's simulated generators -------------------------------------------------------------------------


def _palette_colours(image: np.ndarray, min_pixels: int = 10) -> set[str]:
    """Palette colours with at least ``min_pixels`` pixels within the renderer's ±20 shade jitter."""
    return {
        name
        for name, rgb in COLOURS.items()
        if (np.abs(image.astype(int) - np.array(rgb)).max(-1) <= 20).sum() >= min_pixels
    }


def test_world_augmentations_cover_the_train_split(tiny_world):
    root = synthetic.ensure_augmentations("tiny")
    assert synthetic.ensure_augmentations("tiny") == root  # cached
    records = read_annotations(tiny_world, None, "train")
    ids = [r.image_id for r in records]
    files = {kind: json.loads((root / f"{kind}.json").read_text()) for kind in ("rewrite", "i2t", "t2i")}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["world_digest"] == synthetic.preset("tiny").world.digest()
    for kind, n in (("rewrite", 5), ("i2t", 5), ("t2i", 2)):
        assert sorted(files[kind]) == sorted(ids)
        assert all(len(v) == n and all(isinstance(s, str) and s for s in v) for v in files[kind].values())
    for r in records:
        assert not set(files["rewrite"][r.image_id]) & set(
            r.captions
        )  # a rewrite differs from the ground truth
        assert all(
            c.startswith(("a photo of", "an image of", "a picture showing")) for c in files["i2t"][r.image_id]
        )
    for r in records[:40]:
        scene = Scene.from_json(r.meta["scene"])
        original = np.asarray(Image.open(r.image_path).convert("RGB"))
        for rel in files["t2i"][r.image_id]:
            render = np.asarray(Image.open(root / rel).convert("RGB"))
            assert render.shape == original.shape and not np.array_equal(render, original)
            # Same objects and colours in a new layout: the caption's colour words still hold.
            assert _palette_colours(render) == {o.colour for o in scene.objects} == _palette_colours(original)


# -- 1:N training pairs in the data module ------------------------------------------------------------------------------


def make_dm(one_to_many, **kw):
    kw = {"world": "tiny", "image_size": 64, "batch_size": 16, "captions_per_image": 6, **kw}
    dm = RetrievalDataModule(one_to_many=one_to_many, annotations=str(synthetic.ensure_world("tiny")), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def provider_captions(kind: str) -> dict[str, list[str]]:
    return json.loads(Path(augmentation(kind)).read_text())


def test_train_batches_sample_k_positives_from_the_pool(tiny_world):
    o2m = OneToMany(
        caption_sources=[
            PrecomputedCaptions(augmentation("i2t")),
            PrecomputedCaptions(augmentation("rewrite")),
        ],
        eda=only(alpha_rs=0.3),
    )
    dm = make_dm(o2m)
    records = dm.read_split("train")
    extra = {
        k: set(provider_captions("i2t")[k]) | set(provider_captions("rewrite")[k])
        for k in provider_captions("i2t")
    }
    kinds = Counter()
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (16, 3, 64, 64) and len(batch.captions) == 16 * 6
    for b in range(16):
        record = records[batch.image_ids[b]]
        caps = [c for c, t in zip(batch.captions, batch.txt2img.tolist(), strict=True) if t == b]
        assert len(caps) == 6 and len(set(caps)) == 6  # the pool (>= 15) is large: without replacement
        for c in caps:
            if c in record.captions:
                kinds["gt"] += 1
            elif c in extra[record.image_id]:
                kinds["provider"] += 1
            else:  # an EDA swap of one of its ground-truth captions
                assert any(Counter(c.split()) == Counter(g.split()) for g in record.captions), c
                kinds["eda"] += 1
    assert all(kinds[k] > 5 for k in ("gt", "provider", "eda")), kinds


def test_without_ground_truth_only_source_captions_are_positives(tiny_world):
    dm = make_dm(
        OneToMany([PrecomputedCaptions(augmentation("i2t"))], keep_ground_truth=False), captions_per_image=3
    )
    i2t = provider_captions("i2t")
    batch = next(iter(dm.train_dataloader()))
    records = dm.read_split("train")
    for c, t in zip(batch.captions, batch.txt2img.tolist(), strict=True):
        assert c in i2t[records[batch.image_ids[t]].image_id]


def test_generated_images_replace_the_originals(tiny_world):
    dm = make_dm(OneToMany(image_sources=[PrecomputedImages(augmentation("t2i"))], p_image_source=1.0))
    t2i = json.loads(Path(augmentation("t2i")).read_text())
    root = synthetic.ensure_augmentations("tiny")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.dtype == torch.float32 and 0 <= batch.images.min() and batch.images.max() <= 1
    records = dm.read_split("train")
    for b, i in enumerate(batch.image_ids.tolist()):
        original = dm.train_set.store[i].float() / 255
        assert not torch.equal(batch.images[b], original)
        renders = [
            torch.from_numpy(np.array(Image.open(root / p))).permute(2, 0, 1).float() / 255
            for p in t2i[records[i].image_id]
        ]
        assert any(torch.equal(batch.images[b], r) for r in renders)


def test_augmented_batches_are_reproducible_under_seed(tiny_world):
    def first_batch(seed: int):
        o2m = OneToMany(
            caption_sources=[PrecomputedCaptions(augmentation("rewrite"))],
            eda=world_eda(),
            image_sources=[PrecomputedImages(augmentation("t2i"))],
            image_augment=ImageAugment(),
        )
        dm = make_dm(o2m, captions_per_image=4)
        L.seed_everything(seed, verbose=False)
        return next(iter(dm.train_dataloader()))

    a, b, c = first_batch(5), first_batch(5), first_batch(6)
    assert (
        a.captions == b.captions and torch.equal(a.images, b.images) and torch.equal(a.image_ids, b.image_ids)
    )
    assert a.captions != c.captions and not torch.equal(a.images, c.images)
    # p = 0.5 each: some images are the original decoded ones (uint8 items), some augmented (float items)
    originals = sum(torch.equal(a.images[k], a.images[k].mul(255).round().div(255)) for k in range(len(a)))
    assert 0 < originals < len(a)


def test_sources_are_checked_at_setup(tiny_world, tmp_path):
    records = read_annotations(tiny_world, None, "train")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({r.image_id: ["an extra caption"] for r in records[:10]}))
    with pytest.raises(
        DataError, match=rf"{partial.name} lacks {len(records) - 10} of {len(records)} images"
    ):
        make_dm(OneToMany([PrecomputedCaptions(str(partial))]))
    dm = make_dm(OneToMany([PrecomputedCaptions(str(partial), strict=False)]))
    assert "an extra caption" in dm.one_to_many.caption_pool(0, random.Random(0))
    assert "an extra caption" not in dm.one_to_many.caption_pool(20, random.Random(0))
    dm = make_dm(OneToMany([PrecomputedCaptions(str(partial), strict=False)], keep_ground_truth=False))
    with pytest.raises(DataError, match=rf"image '{records[20].image_id}' .* has no caption to train with"):
        dm.one_to_many.caption_pool(20, random.Random(0))
    with pytest.raises(ConfigError, match="no caption_sources and no eda"):
        OneToMany(keep_ground_truth=False)
    with pytest.raises(ConfigError, match="p_image_source=1.5"):
        OneToMany(p_image_source=1.5)


def test_one_to_many_from_yaml_and_pickles(tiny_world):
    from jsonargparse import ArgumentParser

    from mat_lightning.synthetic import resolve_config

    parser = ArgumentParser()
    parser.add_class_arguments(RetrievalDataModule, "data")
    cfg = parser.parse_string(
        """
data:
  world: tiny
  image_size: 64
  one_to_many:
    class_path: mat_lightning.data.augment.OneToMany
    init_args:
      caption_sources:
        - class_path: mat_lightning.data.augment.PrecomputedCaptions
          init_args: {path: "synthetic:i2t"}
      eda: {class_path: mat_lightning.data.augment.EDA, init_args: {alpha_sr: 0.2, p_rd: 0.0}}
      image_sources:
        - {class_path: mat_lightning.data.augment.PrecomputedImages, init_args: {path: "synthetic:t2i"}}
      image_augment: {class_path: mat_lightning.data.augment.ImageAugment, init_args: {p_flip: 0.0}}
      p_image_source: 0.3
"""
    )
    dm = parser.instantiate(resolve_config(cfg)).data  # as the mat CLI does: synthetic names -> files
    o2m = dm.one_to_many
    assert isinstance(o2m, OneToMany) and o2m.p_image_source == 0.3 and o2m.eda.alpha_sr == 0.2
    assert o2m.image_augment.p_flip == 0.0 and o2m.caption_sources[0].spec == augmentation("i2t")
    assert o2m.eda.thesaurus_name == str(synthetic.ensure_thesaurus("tiny"))
    assert "one_to_many" not in dm.hparams
    dm.prepare_data()
    dm.setup("fit")
    o2m._generated(o2m.image_sources[0].image_paths(dm.read_split("train")[0].image_id)[0])
    clone = pickle.loads(pickle.dumps(o2m))  # spawned DataLoader workers, checkpoints: no decoded images
    assert clone._decoded == {} and o2m._decoded
    assert clone.caption_pool(3, random.Random(1)) == o2m.caption_pool(3, random.Random(1))
