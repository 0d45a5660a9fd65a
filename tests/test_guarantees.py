"""README guarantees that had no test: atomic result files, exit 1 with a traceback on a bug, --test_ckpt=best."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from references import encoder_from_checkpoint, split_recall

from mat_lightning import files
from mat_lightning.cli import main
from mat_lightning.eval.report import write_results

REPO = Path(__file__).resolve().parents[1]


def test_a_crash_mid_write_leaves_the_old_results_whole(tmp_path, monkeypatch):
    """A write that dies half-way (disk full, kill) leaves the previous results.json as it was, readable.

    Bug caught: writing results in place (``Path.write_text``/``open(path, "w")``): the crash leaves half a file
    that ``mat report`` cannot read, and the finished run's results are lost.
    """
    rows = [{"attack": "clean", "eps_255": 0.0, "tr_r1": 50.0}]
    write_results(tmp_path, {"experiment": "x", "rows": rows, "complete": True}, figures=False)
    before = (tmp_path / "results.json").read_bytes()
    real_open = open

    class HalfWrite:
        """A file whose write puts half the data on disk, then fails, when it is (a temporary of) results.json."""

        def __init__(self, file, *args, **kwargs):
            self.f, self.fail = real_open(file, *args, **kwargs), "results.json" in str(file)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            if not self.fail:
                return self.f.write(data)
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "open", HalfWrite, raising=False)
    monkeypatch.setattr("builtins.open", HalfWrite)  # also catches a write that bypasses files.atomic_write
    longer = {"experiment": "x", "rows": rows * 50, "complete": True}
    with pytest.raises(OSError, match="No space"):
        write_results(tmp_path, longer, figures=False)
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_bytes() == before
    assert json.loads(before)["rows"] == rows


def test_an_internal_error_exits_1_with_a_traceback(tmp_path):
    """A bug (here an injected RuntimeError inside `mat data check`) is not dressed up as a user error: exit 1 and
    the traceback, so that it gets reported; user errors (MatError) are exit 2 with one line (tested elsewhere).

    Bug caught: a catch-all ``except Exception`` that prints ``error: ...`` and exits 2 (or 0), hiding bugs.
    """
    code = (
        "import sys\n"
        "from mat_lightning.data.datamodule import RetrievalDataModule\n"
        "def fault(self, *a, **k):\n"
        "    raise RuntimeError('injected fault')\n"
        "RetrievalDataModule.prepare_data = fault\n"
        "from mat_lightning.main import main\n"
        "sys.argv = ['mat', 'data', 'check', '--data.world=tiny']\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == "RuntimeError: injected fault"


def test_test_ckpt_best_tests_the_best_checkpoint(tmp_path, tiny_clip_path, tiny_test_split):
    """`mat fit --test_ckpt=best` tests the checkpoint with the best clean validation recall and says so.

    Bug caught: the option ignored (the final weights tested and labelled "final"), or the best checkpoint's path
    recorded while the final weights are tested.
    """
    main(
        [
            "fit",
            "--config",
            str(REPO / "experiments" / "smoke.yaml"),
            "--data.world=tiny",
            "--model.encoder.init_args.pretrained=synthetic:tiny",
            "--trainer.enable_progress_bar=false",
            "--run_root",
            str(tmp_path),
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=1",
            "--model.lr=1e-3",
            "--robust_eval.attacks=[]",
            "--test_ckpt=best",
        ]
    )
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    results = json.loads((run / "results.json").read_text())
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    best = next(v["best_model_path"] for k, v in last["callbacks"].items() if "val/clean/r_mean" in k)
    assert results["weights"] == "best" and results["checkpoint"] == best
    assert Path(best).name.startswith("epoch") and Path(best).is_file()
    expected = split_recall(encoder_from_checkpoint(best, tiny_clip_path), *tiny_test_split)
    assert {k: results["rows"][0][k] for k in expected} == pytest.approx(expected)
