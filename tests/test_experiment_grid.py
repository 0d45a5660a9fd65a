"""The paper's experiment grid: complete, documented, and every experiment file buildable and runnable through the
tiny overlay (``conf/overlay/tiny.yaml``), so that no experiment rots while nobody can run it at full scale here."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import yaml

from mat_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
OVERLAY = REPO / "conf" / "overlay" / "tiny.yaml"
ALBEF_OVERLAY = REPO / "conf" / "overlay" / "tiny_albef.yaml"  # a tiny ALBEF for the ALBEF/TCL files
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
DEFENSES = ("clean", "image_at", "tecoa", "fare", "text_at", "mmcoa", "mat", "mat_1n")
TARGETS = {"flickr30k": ("81.5", "62.1"), "coco": ("52.4", "33.0")}


def _overlays(path: Path) -> list[str]:
    """The tiny overlay, plus the tiny ALBEF for the fusion-model files (built from the same class)."""
    fusion = "_albef_" in path.stem or "_tcl_" in path.stem
    return ["--config", str(OVERLAY), *(["--config", str(ALBEF_OVERLAY)] if fusion else [])]


def _subcommand(path: Path) -> str:
    """Zero-shot files are robust evaluations of the starting weights (``mat robust-eval`` = ``test``)."""
    return "test" if path.stem.endswith("_zeroshot") else "fit"


def test_the_paper_grid_is_complete_and_documented():
    names = {p.stem for p in EXPERIMENTS}
    for data in TARGETS:
        for defense in DEFENSES:
            assert f"{data}_clip_b16_{defense}" in names
        zeroshot = (REPO / "experiments" / f"{data}_clip_b16_zeroshot.yaml").read_text()
        for target in TARGETS[data]:
            assert target in zeroshot.split("\nexperiment:")[0]  # in the header
    assert "flickr30k_blip_zeroshot" in names
    for data in TARGETS:
        for defense in (*DEFENSES, "zeroshot"):
            assert f"{data}_albef_{defense}" in names
        assert f"{data}_tcl_zeroshot" in names
    for data, (tr1, ir1) in {"flickr30k": ("95.9", "85.5"), "coco": ("77.6", "60.7")}.items():
        header = (REPO / "experiments" / f"{data}_albef_zeroshot.yaml").read_text().split("\nexperiment:")[0]
        assert tr1 in header and ir1 in header  # SGA's clean ALBEF figures: the sanity targets
    for path in EXPERIMENTS:
        header = path.read_text().split("\nexperiment:")[0]
        for field in ("Hypothesis:", "Command:", "Budget:", "Provenance:"):
            assert field in header, f"{path.name}: header lacks {field}"
        assert f"experiment: {path.stem}\n" in path.read_text(), f"{path.name}: experiment name differs"


def test_paper_grid_settings_are_the_references(capsys):
    """The resolved config of a real grid file (printed, not instantiated: its weights cannot be downloaded here)."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "experiments" / "flickr30k_clip_b16_mat.yaml"), "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (
        cfg["data"]["batch_size"] == 128 and cfg["model"]["lr"] == 1e-5 and cfg["trainer"]["max_epochs"] == 10
    )
    defense = cfg["model"]["defense"]["init_args"]
    assert defense["text_attack"]["init_args"]["mlm"] == "bert-base-uncased"
    assert defense["text_attack"]["init_args"]["max_words"] == 1
    assert (
        defense["image_attack"]["init_args"]["eps_255"] == 2
        and defense["image_attack"]["init_args"]["steps"] == 2
    )
    assert cfg["model"]["encoder"]["init_args"]["model_name"] == "ViT-B-16"
    assert all(a["init_args"].get("eps_255", 2) == 2 for a in cfg["robust_eval"]["attacks"])


# Building one file costs seconds (the CLI's parser); the fast suite builds one of each kind, the slow test runs all.
BUILD_FAST = [
    REPO / "experiments" / f"{n}.yaml"
    for n in ("coco_clip_b16_mat_1n", "flickr30k_blip_zeroshot", "flickr30k_albef_mat")
]


@pytest.mark.parametrize("experiment", BUILD_FAST, ids=lambda p: p.stem)
def test_experiments_build_through_the_tiny_overlay(experiment, tmp_path, tiny_clip_path, monkeypatch):
    """Parse and instantiate everything (model, defense, attacks, data, trainer); fit/test are not run here."""
    built = {}

    def record(trainer, model, datamodule=None, **kwargs):
        built.update(model=model, datamodule=datamodule)

    monkeypatch.setattr(L.Trainer, "fit", record)
    monkeypatch.setattr(L.Trainer, "test", record)
    main(
        [
            _subcommand(experiment),
            "--config",
            str(experiment),
            *_overlays(experiment),
            "--run_root",
            str(tmp_path),
        ]
    )
    fusion = "_albef_" in experiment.stem
    assert type(built["model"].encoder).__name__ == ("AlbefRetrievalEncoder" if fusion else "OpenClipEncoder")
    assert built["datamodule"].world == "tiny"


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_runs_two_steps_through_the_tiny_overlay(experiment, tmp_path, tiny_clip_path):
    main(
        [
            _subcommand(experiment),
            "--config",
            str(experiment),
            *_overlays(experiment),
            "--run_root",
            str(tmp_path),
        ]
    )
    results = json.loads(next(tmp_path.glob("*/*/results.json")).read_text())
    assert results["experiment"] == experiment.stem
    assert results["rows"][0]["attack"] == "clean"
