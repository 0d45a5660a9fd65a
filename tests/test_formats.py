"""Annotation readers (Karpathy, ALBEF) on made-up files and on the real Flickr30K test annotations."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mat_lightning.data.datamodule import load_image
from mat_lightning.data.formats import check_images_exist, read_annotations
from mat_lightning.errors import DataError


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def karpathy(tmp_path):
    return write(
        tmp_path / "dataset_flickr30k.json",
        {
            "images": [
                {
                    "filename": "a.jpg",
                    "split": "train",
                    "sentences": [{"raw": "a dog"}, {"raw": "a brown dog "}],
                },
                {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "a cat"}]},
                {
                    "filename": "c.jpg",
                    "filepath": "val2014",
                    "split": "test",
                    "sentences": [{"raw": f"c{i}"} for i in range(6)],
                },
            ]
        },
    )


def test_karpathy_splits_and_paths(tmp_path):
    f = karpathy(tmp_path)
    train = read_annotations(f, tmp_path / "imgs", "train")
    assert [r.image_id for r in train] == ["a.jpg", "b.jpg"]  # restval joins train, as in the papers
    assert train[0].captions == ["a dog", "a brown dog"]
    test = read_annotations(f, tmp_path / "imgs", "test")
    assert test[0].image_path == tmp_path / "imgs" / "val2014" / "c.jpg"
    assert len(test[0].captions) == 6  # COCO has images with 6 captions


def test_albef_train_entries_of_one_image_are_merged(tmp_path):
    f = write(
        tmp_path / "train.json",
        [
            {"image": "x/1.jpg", "caption": "one"},
            {"image": "x/2.jpg", "caption": "two"},
            {"image": "x/1.jpg", "caption": "uno"},
        ],
    )
    recs = read_annotations(f)
    assert [(r.image_id, r.captions) for r in recs] == [("x/1.jpg", ["one", "uno"]), ("x/2.jpg", ["two"])]
    assert recs[0].image_path == tmp_path / "x" / "1.jpg"


def test_real_flickr30k_test_annotations(flickr_test_json):
    """The ALBEF-layout test file as users have it: counts, image ids, captions kept whole (punctuation, case)."""
    recs = read_annotations(flickr_test_json, "/nonexistent")
    real = flickr_test_json.name == "flickr30k_test.json"
    n_images = 1000 if real else 14
    assert len(recs) == n_images
    assert sum(len(r.captions) for r in recs) == 5 * n_images
    assert all(len(r.captions) == 5 for r in recs)
    assert recs[0].image_id.startswith("flickr30k-images/" if real else "images/") and recs[
        0
    ].image_id.endswith(".jpg")
    if not real:
        raw = json.loads(flickr_test_json.read_text())
        assert [(r.image_id, r.captions) for r in recs] == [(e["image"], e["caption"]) for e in raw]
    assert all(c and c == c.strip() for r in recs for c in r.captions)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", r"not valid JSON \(line 1"),
        (json.dumps({"foo": 1}), "unknown annotation layout"),
        (
            json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}),
            r"images\[0\] \(a.jpg\): has no captions",
        ),
        (json.dumps({"images": [{"split": "test"}]}), r"images\[0\] has no 'filename'"),
        (json.dumps([{"image": "a.jpg", "caption": ["  "]}]), r"entry \[0\] \(a.jpg\): has no captions"),
        (json.dumps([{"img": "a.jpg"}]), r"entry \[0\] must have 'image' and 'caption'"),
    ],
)
def test_malformed_files_are_named(tmp_path, content, match):
    f = tmp_path / "ann.json"
    f.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        read_annotations(f, split="test")
    assert str(f) in str(e.value)


def test_missing_file_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        read_annotations(tmp_path / "nope.json")
    with pytest.raises(
        DataError, match=r"no images in split 'val' \(splits present: \['restval', 'test', 'train'\]\)"
    ):
        read_annotations(karpathy(tmp_path), split="val")


def test_missing_and_corrupt_images(tmp_path):
    f = karpathy(tmp_path)
    recs = read_annotations(f, tmp_path, "train")
    Image.new("RGB", (10, 20), (255, 0, 0)).save(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=r"1 of 2 images listed in .* are missing") as e:
        check_images_exist(recs, f)
    assert "b.jpg" in str(e.value)
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"image cannot be decoded: .*b.jpg"):
        load_image(tmp_path / "b.jpg", 8)


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 30, 20))  # white centre block, black borders left/right
    im.save(tmp_path / "w.png")
    x = load_image(tmp_path / "w.png", 10)
    assert x.shape == (3, 10, 10) and x.dtype.is_floating_point is False
    assert x[:, :, 1:-1].min() > 200  # the crop keeps the centre
