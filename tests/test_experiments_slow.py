"""Every experiment runs end to end on the tiny world for a couple of batches (slow: `make test-full`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mat_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = sorted(
    p
    for p in (REPO / "experiments").glob("*.yaml")
    if not any(real in p.stem for real in ("flickr", "coco", "custom"))  # these need the user's data
)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", SYNTHETIC, ids=lambda p: p.stem)
def test_experiment_runs_on_the_tiny_world(experiment, tmp_path, tiny_clip_path, monkeypatch):
    # The default world's assets take minutes to build; the tiny world stands in for them (data, CLIP and MLM).
    from mat_lightning.synthetic import PRESETS

    monkeypatch.setitem(PRESETS, "default", PRESETS["tiny"])
    main(
        [
            "fit",
            "--config",
            str(experiment),
            "--run_root",
            str(tmp_path),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--data.batch_size=16",
            "--trainer.enable_progress_bar=false",
            "--robust_eval.progress=false",
        ]
    )
    results = json.loads(next(tmp_path.glob("*/*/results.json")).read_text())
    attacks = [r["attack"] for r in results["rows"]]
    assert attacks[0] == "clean" and len(attacks) >= 2
    for row in results["rows"][1:]:
        assert row["r_mean"] <= results["rows"][0]["r_mean"] + 1e-9, row["attack"]
