"""The `mat` CLI: every experiment parses, a tiny fit writes the run folder, bad input gives one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from references import encoder_from_checkpoint, split_recall

from mat_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
TINY = [
    "--data.world=tiny",
    "--model.encoder.init_args.pretrained=synthetic:tiny",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",  # runs of 2 steps: Lightning warns when an epoch is shorter than the interval
]


# A parse costs seconds; the paper grid's files share their fragments, so the fast suite parses one of each shape
# (tests/test_experiment_grid.py parses flickr30k_clip_b16_mat) and the slow suite all of them.
GRID_FAST = {"flickr30k_clip_b16_zeroshot", "coco_clip_b16_mat_1n"}
PARSED = [
    pytest.param(p, marks=pytest.mark.slow) if "_clip_b16_" in p.stem and p.stem not in GRID_FAST else p
    for p in EXPERIMENTS
]


@pytest.mark.parametrize("experiment", PARSED, ids=lambda p: p.stem)
def test_every_experiment_parses(experiment, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(experiment), "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["inference_mode"] is False
    assert cfg["experiment"] == experiment.stem
    assert cfg["model"]["encoder"]["class_path"].endswith("Encoder")
    header = experiment.read_text().splitlines()[:12]
    for field in ("Hypothesis:", "Command:", "Budget:", "Provenance:"):
        assert any(field in line for line in header), f"{experiment.name} header lacks {field}"


def run_dir_of(root: Path) -> Path:
    dirs = [p for p in root.glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_tiny_fit_writes_the_run_folder(
    tmp_path, tmp_path_factory, tiny_clip_path, tiny_test_split, capsys, monkeypatch
):
    """`mat fit` writes config, checkpoint, results (the clean row equal to recall computed by hand from the saved
    weights on the whole test split), CSV, figure, W&B files; the saved config re-runs into a new folder.

    Bug caught (results): a row evaluated on other weights than the checkpoint's, a partial split, misaligned
    captions; the old range check (0..100) passed them. (W&B files): artifacts staged under
    ~/.local/share/wandb, outside the run folder (issue 21 item 8).
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    main(
        [
            "fit",
            "--config",
            str(REPO / "experiments" / "smoke.yaml"),
            *TINY,
            "--run_root",
            str(tmp_path),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--robust_eval.attacks=[]",
        ]
    )
    run = run_dir_of(tmp_path)
    assert run.parent.name == "smoke"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["encoder"]["init_args"]["pretrained"] == "synthetic:tiny"
    assert list((run / "checkpoints").glob("*.ckpt"))
    results = json.loads((run / "results.json").read_text())
    for key in ("experiment", "model", "dataset", "split", "n_images", "n_captions", "rows"):
        assert key in results
    assert results["n_images"] == 32 and results["n_captions"] == 160
    # the clean row is the trained weights' recall on the whole test split (explicit loops)
    expected = split_recall(
        encoder_from_checkpoint(run / "checkpoints" / "last.ckpt", tiny_clip_path), *tiny_test_split
    )
    assert results["rows"][0]["attack"] == "clean"
    assert {k: results["rows"][0][k] for k in expected} == pytest.approx(expected)
    assert (run / "results.csv").read_text().startswith("attack,eps_255,tr_r1")
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "wandb").glob("offline-run-*"))
    media = next((run / "wandb").glob("offline-run-*")) / "files" / "media"
    assert list(media.glob("images/test/curves_*.png")) and list(
        media.glob("table/test/results_*.table.json")
    )
    # the run folder is self-contained: what W&B staged for the results artifact lies in it, nothing in HOME
    staged = {p.read_bytes() for p in (run / "wandb" / "artifacts" / "staging").iterdir()}
    assert (run / "results.json").read_bytes() in staged and (run / "config.yaml").read_bytes() in staged
    # (an empty ~/.config/wandb, W&B's settings folder, is created by the writability probe of ensure_wandb_dirs)
    assert not [p for p in home.rglob("*") if "wandb" in p.parts and p.is_file()], list(home.rglob("*"))
    out = capsys.readouterr().out.rstrip().splitlines()  # the results table, then only the run folder
    assert out[-1] == f"run folder: {run}" and out[-3].startswith("| clean ")
    # the saved config re-runs into a new folder, leaving this run's files alone
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    main(["fit", "--config", str(run / "config.yaml"), "--trainer.limit_train_batches=2"])
    (rerun,) = [p for p in (tmp_path / "smoke").iterdir() if p != run]
    assert (rerun / "results.json").is_file() and list((rerun / "checkpoints").glob("*.ckpt"))
    assert before == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_user_errors_exit_2_with_one_message(tmp_path, capsys):
    cases = [
        (["--data.dataset=flickr30k", f"--data.root={tmp_path / 'missing'}"], "data folder not found"),
        (
            [
                "--data.dataset=custom",
                f"--data.annotations={tmp_path / 'nope.json'}",
                f"--data.root={tmp_path}",
            ],
            "annotation file not found",
        ),
        ([f"--model.encoder.init_args.pretrained={tmp_path / 'x.pt'}"], "no such checkpoint file"),
    ]
    (tmp_path / "bad.json").write_text("[{")
    cases.append(
        (
            [
                "--data.dataset=custom",
                f"--data.annotations={tmp_path / 'bad.json'}",
                f"--data.root={tmp_path}",
            ],
            "not valid JSON",
        )
    )
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["fit", *TINY, "--run_root", str(tmp_path / "runs"), *args])
        assert e.value.code == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)


def test_real_command_prints_no_traceback(tmp_path):
    env = {**os.environ, "MAT_CACHE_DIR": os.environ["MAT_CACHE_DIR"]}
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "img/a.jpg", "caption": ["a broken image"]}]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mat_lightning",
            "test",
            *TINY,
            "--run_root",
            str(tmp_path / "runs"),
            "--data.dataset=custom",
            f"--data.root={tmp_path}",
            f"--data.annotations={tmp_path / 'ann.json'}",
            "--data.preload=true",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "image cannot be decoded" in proc.stderr and "a.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_experiment_name_via_make():
    proc = subprocess.run(
        ["make", "-s", "experiment", "NAME=does_not_exist", "VENV=/nonexistent"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "no experiment 'does_not_exist'" in proc.stderr and "smoke" in proc.stderr


def test_tf32_on_cuda_only(monkeypatch):
    import torch

    from mat_lightning.cli import allow_tf32

    before, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        allow_tf32()
        assert torch.get_float32_matmul_precision() == "highest"  # CPU: left alone
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        allow_tf32()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = cudnn
