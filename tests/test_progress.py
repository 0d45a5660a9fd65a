"""Progress in a log file: plain periodic lines, no ``\\r`` (issue 21 item 5)."""

from __future__ import annotations

import io

from mat_lightning.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_an_eta():
    """Bug caught: tqdm's ``\\r`` redraws written to a file or pipe (one ``\\r``-joined line per attack), or a log
    that says nothing until the loop ends."""
    log = io.StringIO()
    assert list(progress(range(4), "pgd", enabled=True, every_s=0.0, stream=log)) == [0, 1, 2, 3]
    text = log.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        "pgd: 1/4 batches (25 %), 0 s, ~0 s left",
        "pgd: 2/4 batches (50 %), 0 s, ~0 s left",
        "pgd: 3/4 batches (75 %), 0 s, ~0 s left",
        "pgd: 4 batches done in 0 s",
    ]


def test_a_terminal_gets_a_bar_and_disabled_prints_nothing():
    tty = Terminal()
    assert list(progress(range(3), "sga", stream=tty)) == [0, 1, 2]
    assert "\r" in tty.getvalue() and "sga" in tty.getvalue()  # tqdm's bar, redrawn in place
    quiet = io.StringIO()
    assert list(progress(range(3), "sga", enabled=False, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_a_piped_run_logs_plain_lines_and_stdout_holds_only_the_table(tmp_path, tiny_clip_path):
    """Through the real command, output to pipes (a log file, nohup, SLURM): no ``\\r`` anywhere, the attack's
    progress as plain lines on stderr, and stdout only the results table and the run folder. Bug caught: Lightning's
    ``Testing`` bar printed on stdout (rich or tqdm), tqdm redraws in the log."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mat_lightning",
            "robust-eval",
            "--config",
            str(repo / "experiments" / "smoke.yaml"),
            "--data.world=tiny",
            "--model.encoder.init_args.pretrained=synthetic:tiny",
            "--data.max_eval_images=8",
            "--robust_eval.attacks=[{class_path: mat_lightning.attacks.PGD, init_args: {steps: 2}}]",
            "--run_root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("robust retrieval") and lines[-1].startswith("run folder: ")
    assert all(line.startswith(("robust retrieval", "|", "run folder: ")) for line in lines), lines
    assert any(line.startswith("clean: 1 batches done in") for line in proc.stderr.splitlines())
