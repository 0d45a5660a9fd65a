"""The three annotation layouts of Flickr30K/COCO (Karpathy, ALBEF/SGA, CLIP_benchmark) found in a data folder, read
into the same records (ragged caption counts kept), missing images reported by name, and `mat data check`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mat_lightning.cli import main
from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.errors import DataError

# split -> [(image file name, captions)]; ragged: 1, 5 and 6 captions, one caption with commas
SPLITS = {
    "train": [("100.jpg", ["a dog runs", "a dog, brown, runs fast"]), ("101.jpg", ["a cat sleeps"])],
    "val": [("200.jpg", ["a red car", "a car on a road"])],
    "test": [
        ("300.jpg", [f"a man rides a bike {i}" for i in range(5)]),
        ("301.jpg", [f"two kids, smiling, play {i}" for i in range(6)]),
        ("302.jpg", ["a boat"]),
    ],
}


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for records in SPLITS.values():
        for name, _ in records:
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                folder / name, format="JPEG"
            )


def write_layout(root: Path, layout: str, dataset: str = "flickr30k") -> Path:
    """A data folder in ``layout``; returns the folder the images are in."""
    images = root / ("val2014" if dataset == "coco" else "flickr30k-images")
    _write_images(images)
    if layout == "karpathy":
        entries = [
            {"filename": n, "split": s, "sentences": [{"raw": c} for c in caps], "filepath": "val2014"}
            if dataset == "coco"
            else {"filename": n, "split": s, "sentences": [{"raw": c} for c in caps]}
            for s, recs in SPLITS.items()
            for n, caps in recs
        ]
        (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": entries}))
    elif layout == "albef":
        folder = "val2014" if dataset == "coco" else "flickr30k-images"
        for s, recs in SPLITS.items():
            if s == "train":  # ALBEF's train file: one caption per entry, the image repeated
                data = [{"image": f"{folder}/{n}", "caption": c} for n, caps in recs for c in caps]
            else:
                data = [{"image": f"{folder}/{n}", "caption": caps} for n, caps in recs]
            (root / f"{dataset}_{s}.json").write_text(json.dumps(data))
    elif dataset == "flickr30k":
        for s, recs in SPLITS.items():
            rows = ["image,caption"] + [f"flickr30k-images/{n},{c}" for n, caps in recs for c in caps]
            (root / f"flickr30k_{s}_karpathy.txt").write_text("\n".join(rows) + "\n")
    else:
        for s, recs in SPLITS.items():
            imgs = [{"id": 7 + i, "file_name": n} for i, (n, _) in enumerate(recs)]
            anns = [
                {"image_id": 7 + i, "caption": c, "id": 0} for i, (_, caps) in enumerate(recs) for c in caps
            ]
            (root / f"coco_{s}_karpathy.json").write_text(json.dumps({"images": imgs, "annotations": anns}))
    return images


def data_check_rows(out: str) -> dict[str, list[str]]:
    """The split rows of ``mat data check``'s table: split -> [layout, images, captions, captions/image, status]."""
    rows = {}
    for line in out.replace("│", "|").splitlines():
        cells = [c.strip() for c in line.strip("|┃ ").split("|")]
        if len(cells) == 6 and cells[0] in ("train", "val", "test"):
            rows[cells[0]] = cells[1:]
    return rows


CASES = [
    ("karpathy", "flickr30k"),
    ("albef", "flickr30k"),
    ("clip_benchmark", "flickr30k"),
    ("karpathy", "coco"),
    ("clip_benchmark", "coco"),
]


@pytest.mark.parametrize("layout, dataset", CASES, ids=[f"{d}-{la}" for la, d in CASES])
def test_every_layout_reads_the_same_records(layout, dataset, tmp_path):
    write_layout(tmp_path, layout, dataset)
    dm = RetrievalDataModule(dataset=dataset, root=str(tmp_path), image_size=16)
    for split, expected in SPLITS.items():
        assert dm.layout(split) == layout
        records = dm.read_split(split)
        assert [(r.image_path.name, r.captions) for r in records] == expected
        assert all(r.image_path.is_file() for r in records)


@pytest.mark.parametrize("layout, dataset", CASES, ids=[f"{d}-{la}" for la, d in CASES])
def test_a_missing_image_is_named(layout, dataset, tmp_path):
    images = write_layout(tmp_path, layout, dataset)
    (images / "301.jpg").unlink()
    dm = RetrievalDataModule(dataset=dataset, root=str(tmp_path), image_size=16)
    with pytest.raises(DataError, match=r"1 of 3 images .* missing:\n  .*301\.jpg"):
        dm.read_split("test")


def test_no_annotation_file_says_what_was_looked_for(tmp_path):
    dm = RetrievalDataModule(dataset="coco", root=str(tmp_path), image_size=16)
    with pytest.raises(DataError, match="dataset_coco.json, coco_test.json, coco_test_karpathy.json"):
        dm.read_split("test")


def test_missing_images_list_the_first_20_then_a_count(tmp_path):
    from mat_lightning.data.formats import ImageCaptions, check_images_exist

    records = [ImageCaptions(tmp_path / f"{i:03d}.jpg", ["x"], f"{i:03d}.jpg") for i in range(25)]
    with pytest.raises(DataError) as err:
        check_images_exist(records, "ann.json")
    message = str(err.value)
    assert "019.jpg" in message and "020.jpg" not in message and "... and 5 more" in message


def test_data_check_reports_layout_counts_and_bad_files(tmp_path, capsys):
    """Every split's row, cell for cell (as SPLITS writes them), then a bad image named with exit 2.

    Bug caught: counts of one split shown under another, images counted as captions, a ragged split's caption
    counts collapsed, a layout misnamed; a substring test (``"12" in out``) passes any of them.
    """
    images = write_layout(tmp_path, "clip_benchmark", "flickr30k")
    main(["data", "check", "--data.dataset=flickr30k", f"--data.root={tmp_path}", "--image_size=16"])
    assert data_check_rows(capsys.readouterr().out) == {
        "train": ["clip_benchmark", "2", "3", "1 x1, 2 x1", "ok"],
        "val": ["clip_benchmark", "1", "2", "2 x1", "ok"],
        "test": ["clip_benchmark", "3", "12", "1 x1, 5 x1, 6 x1", "ok"],  # ragged test split
    }
    (images / "302.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", "--data.dataset=flickr30k", f"--data.root={tmp_path}", "--image_size=16"])
    assert exit_.value.code == 2
    assert "302.jpg" in capsys.readouterr().err


def test_worker_processes_decode_the_same_batches(tmp_path):
    write_layout(tmp_path, "karpathy", "flickr30k")
    batches = []
    for workers in (0, 2):
        dm = RetrievalDataModule(
            dataset="flickr30k", root=str(tmp_path), image_size=16, eval_batch_size=2, num_workers=workers
        )
        dm.setup("test")
        batches.append(list(dm.test_dataloader()))
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a.images, b.images) and a.captions == b.captions
