"""Shared fixtures: the tiny synthetic world and its tiny CLIP (built once, cached), offline settings."""

from __future__ import annotations

import os
from pathlib import Path

# Offline before anything imports transformers or wandb (the Makefile sets them too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MAT_CACHE_DIR", str(REPO / ".cache" / "test-assets"))

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
FLICKR_TEST = SHARED_DATA / "flickr30k" / "flickr30k_test.json"


@pytest.fixture(scope="session")
def tiny_world() -> Path:
    """Annotation file of the 'tiny' synthetic world (384/32/32 images)."""
    from mat_lightning import synthetic

    return synthetic.ensure_world("tiny")


@pytest.fixture(scope="session")
def tiny_data(tiny_world) -> dict:
    """RetrievalDataModule arguments of the tiny world, as the mat CLI resolves ``--data.world=tiny``."""
    return {"dataset": "synthetic", "world": "tiny", "annotations": str(tiny_world)}


@pytest.fixture(scope="session")
def tiny_clip_path(tiny_world) -> Path:
    from mat_lightning import synthetic

    return synthetic.ensure_clip("tiny")


@pytest.fixture(scope="session")
def tiny_mlm(tiny_world) -> str:
    """Folder of the tiny world's masked LM (what ``mlm: synthetic:tiny`` resolves to)."""
    from mat_lightning import synthetic

    return str(synthetic.ensure_mlm("tiny"))


@pytest.fixture()
def tiny_encoder(tiny_clip_path):
    """A fresh copy of the pretrained tiny CLIP (tests may train it)."""
    from mat_lightning.models.encoder import OpenClipEncoder

    return OpenClipEncoder("mat-tiny", pretrained=str(tiny_clip_path))


@pytest.fixture()
def random_encoder():
    from mat_lightning.models.encoder import OpenClipEncoder

    torch.manual_seed(0)
    return OpenClipEncoder("mat-tiny", pretrained=None)


@pytest.fixture(scope="session")
def tiny_test_split(tiny_world):
    """(uint8 images [32, 3, 64, 64], caption lists) of the tiny world's test split."""
    from mat_lightning import synthetic

    return synthetic.load_split("tiny", "test")


# Captions written for these tests in the Flickr30K style (people and scenes, capitals, commas, hyphens, words of
# several WordPiece sub-words), in the ALBEF/SGA layout: 14 images x 5 captions. Not taken from Flickr30K.
COMMITTED_CAPTIONS = REPO / "tests" / "data" / "captions" / "flickr_style_test.json"


@pytest.fixture(scope="session", params=["committed", "flickr30k"])
def flickr_test_json(request) -> Path:
    """A Flickr30K-style test annotation file (ALBEF layout): the committed captions, and the real Flickr30K test
    split as an extra where the project's shared folder holds it (CI); a clone without it runs the first only."""
    if request.param == "committed":
        return COMMITTED_CAPTIONS
    if not FLICKR_TEST.is_file():
        pytest.skip(
            f"real Flickr30K annotations not present at {FLICKR_TEST} (only in the project's shared folder); "
            "the same test ran on the committed captions"
        )
    return FLICKR_TEST


@pytest.fixture(scope="session")
def flickr_mlm(flickr_test_json, tmp_path_factory):
    """A tiny MLM with a WordPiece vocabulary from real Flickr30K captions (multi-sub-word words occur)."""
    from mat_lightning.data.formats import read_annotations
    from mat_lightning.models.mlm import train_tiny_mlm

    captions = [c for r in read_annotations(flickr_test_json, "/") for c in r.captions]
    return train_tiny_mlm(
        captions, tmp_path_factory.mktemp("flickr_mlm"), steps=20, batch_size=32, progress=False
    ), captions
