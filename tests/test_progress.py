"""Progress in a terminal and in a log (issue 21 item 5): one bar per stage on stderr in a terminal, plain periodic
lines without ``\\r`` in a log, stdout only the results table."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from mat_lightning.progress import Progress, note, part, progress, step

REPO = Path(__file__).resolve().parents[1]


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


def test_a_long_item_moves_its_bar_by_parts_and_steps():
    """SGA's passes and PGD's steps move the bar inside one batch (hand-computed shares: text pass 1/12, image
    pass 10/12 in 10 steps, text pass 1/12). Bug caught: a bar over 2 batches of SGA that sits at 50 % for half a
    minute, or a part's share taken from the whole bar instead of the current batch."""
    log = io.StringIO()
    bar = Progress("sga", total=2, every_s=0.0, stream=log)
    bar.advance()  # batch 0 done; batch 1 runs
    with part(0, 1 / 12, "text pass 1/2"):
        pass
    with part(1 / 12, 11 / 12, "image pass"):
        for k in (1, 5, 10):
            step(k, 10, "PGD step")
    with part(11 / 12, 1, "text pass 2/2"):
        pass
    bar.advance()
    bar.close()
    percents = [float(m) for m in re.findall(r"\((\d+) %\)", log.getvalue())]
    lines = log.getvalue().splitlines()
    # batch 1 of 2: 50 % + half of each share reached
    expected = [50, 50, 50 + 50 / 12, 50 + 50 * (1 + 1) / 12, 50 + 50 * (1 + 5) / 12] + [
        50 + 50 * 11 / 12
    ] * 2
    assert percents == [round(e) for e in expected], lines
    assert lines[1].endswith("text pass 1/2") and lines[3].endswith("image pass: PGD step 1/10"), lines
    assert lines[-1] == "sga: 2 batches done in 0 s"  # the part labels end with their batch
    assert "\r" not in log.getvalue()


def test_reports_go_to_the_innermost_bar_and_nowhere_without_one():
    """``note``/``part``/``step`` with no bar open (a Python API call with progress off) do nothing; with a bar open
    inside another, only the inner one shows them. Bug caught: a training bar picking up a nested build's values."""
    note(loss=1.0)
    with part(0, 0.5, "text"):
        step(1, 2)
    outer_log, inner_log = io.StringIO(), io.StringIO()
    with Progress("epoch 0", total=1, every_s=0.0, stream=outer_log) as outer:
        with Progress("store", total=1, every_s=0.0, stream=inner_log) as inner:
            note(loss=0.5)
            inner.advance()
        outer.advance()
    assert inner_log.getvalue() == "store: 1 batch done in 0 s, loss 0.5\n"
    assert outer_log.getvalue() == "epoch 0: 1 batch done in 0 s\n"


def test_the_world_pretraining_logs_its_running_loss(random_encoder, capsys):
    """The synthetic world's CLIP pretraining shows its running loss in the log (bug caught: the loss display lost
    when its bar became plain lines). The value is the moving average of the step losses, recomputed here from the
    losses the loss function returned."""
    from mat_lightning.models import pretrain

    losses = []
    loss_fn = pretrain.contrastive_loss

    def recording(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        losses.append(loss.item())
        return loss

    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    captions = [[f"a red square number {i}"] for i in range(6)]
    cfg = pretrain.PretrainConfig(steps=3, batch_size=4)
    pretrain.contrastive_loss = recording
    try:
        pretrain.pretrain_clip(random_encoder, images, captions, cfg, progress=True)
    finally:
        pretrain.contrastive_loss = loss_fn
    running = losses[0]
    for value in losses[1:]:
        running = 0.95 * running + 0.05 * value
    err = capsys.readouterr().err
    line = next(
        x for x in err.splitlines() if x.startswith("pretraining the synthetic world's CLIP: 3 steps done")
    )
    shown = float(line.rsplit("loss ", 1)[1])
    assert math.isclose(shown, running, rel_tol=5e-3), (line, losses)


# -- through the real command ------------------------------------------------------------------------------------

SGA = (
    "{class_path: mat_lightning.attacks.SGA, init_args: {image_attack: {class_path: mat_lightning.attacks.PGD, "
    "init_args: {eps_255: 2, steps: 2, step_255: 0.5}}, text_attack: {class_path: mat_lightning.attacks.BertAttack, "
    "init_args: {mlm: synthetic, top_k: 3, max_words: 1}}}}"
)


def fit_command(run_root: Path) -> list[str]:
    """A 2-epoch fit on the tiny world (2 training batches, 1 validation batch) tested with PGD and SGA."""
    return [
        sys.executable,
        "-m",
        "mat_lightning",
        "fit",
        "--config",
        str(REPO / "experiments" / "smoke.yaml"),
        "--data.world=tiny",
        "--model.encoder.init_args.pretrained=synthetic:tiny",
        "--data.max_eval_images=8",
        "--data.batch_size=16",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        f"--robust_eval.attacks=[{{class_path: mat_lightning.attacks.PGD, init_args: {{steps: 2}}}}, {SGA}]",
        "--run_root",
        str(run_root),
    ]


def command_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def assert_stdout_is_the_table(stdout: str) -> None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[0].startswith("robust retrieval") and lines[-1].startswith("run folder: "), lines
    assert all(line.startswith(("robust retrieval", "|", "run folder: ")) for line in lines), lines
    assert "\r" not in stdout and "\x1b" not in stdout


def test_a_piped_fit_logs_one_plain_line_per_stage_and_stdout_holds_only_the_table(tmp_path, tiny_clip_path):
    """Output to pipes (a log file, nohup, SLURM): no ``\\r`` from any source (Lightning's bars included), one plain
    line per finished stage in order (each epoch with its loss and validation recall, the test's clean pass before
    the attacks), and stdout only the results table. Bugs caught: Lightning's rich/tqdm bars in the log or on
    stdout, tqdm redraws in the log, a log silent about training."""
    proc = subprocess.run(
        fit_command(tmp_path), capture_output=True, text=True, env=command_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    assert_stdout_is_the_table(proc.stdout)
    stages = [
        line
        for line in proc.stderr.splitlines()
        if re.match(r"(epoch \d+|validation|testing|clean|pgd_eps2|sga_eps2): ", line)
    ]
    names = [line.split(":")[0] for line in stages]
    assert names == [
        "validation",
        "epoch 0",
        "validation",
        "epoch 1",
        "testing",
        "clean",
        "pgd_eps2",
        "sga_eps2",
    ], stages
    assert re.fullmatch(
        r"epoch 1: 2 batches done in \d+ s, train/loss [\d.]+, val/clean/r_mean [\d.]+", stages[3]
    )


def render(raw: str) -> list[str]:
    """The screen a terminal shows after ``raw``: ``\\r``, ``\\n``, cursor up (``ESC[nA``) and erase line
    (``ESC[K``, ``ESC[2K``); other escape sequences dropped."""
    screen, row, col = [""], 0, 0
    i = 0
    while i < len(raw):
        m = re.match(r"\x1b\[(\??)(\d*)([A-Za-z])", raw[i:])
        if m:
            n = int(m.group(2) or 1)
            if m.group(3) == "A":
                row = max(0, row - n)
            elif m.group(3) == "K":
                screen[row] = screen[row][:col] if m.group(2) in ("", "0") else ""
            i += len(m.group(0))
            continue
        c = raw[i]
        if c == "\r":
            col = 0
        elif c == "\n":
            row, col = row + 1, 0
            if row == len(screen):
                screen.append("")
        else:
            line = screen[row].ljust(col)
            screen[row] = line[:col] + c + line[col + 1 :]
            col += 1
        i += 1
    return [line.rstrip() for line in screen]


def run_on_a_terminal(cmd: list[str], columns: int = 100, rows: int = 40) -> tuple[int, str, str]:
    """Run ``cmd`` with stderr on a pseudo-terminal of ``columns`` x ``rows`` (stdout a pipe): status, stdout,
    and the raw bytes the terminal received."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=command_env()
    )
    os.close(slave)
    raw, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            raw += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.communicate(timeout=60)[0]
    return proc.returncode, stdout.decode(), raw.decode(errors="replace")


def test_a_terminal_shows_each_stage_once_and_attacks_leave_one_line(tmp_path, tiny_clip_path):
    """Under a terminal (as tmux): one line per finished epoch, the test's bar gone before the attacks start, each
    attack's bar cleared and replaced by its one result line, no bar in stdout. Bugs caught: rich's ``Epoch 1/1``
    drawn twice, ``Testing 2/2`` shown finished while the attacks ran, a ``0%`` and a ``100%`` line left per attack
    (rich's live display and tqdm bars interleaved), a terminal of 0 rows hiding every bar."""
    status, stdout, raw = run_on_a_terminal(fit_command(tmp_path))
    assert status == 0, raw[-2000:]
    assert_stdout_is_the_table(stdout)
    assert "\r" in raw  # bars were drawn in place
    screen = render(raw.replace("\r\n", "\n"))
    for epoch in (0, 1):
        finished = [line for line in screen if re.match(rf"epoch {epoch}\b", line, re.IGNORECASE)]
        assert len(finished) == 1 and "2/2" in finished[0] and "train/loss" in finished[0], screen
    assert not [line for line in screen if re.match(r"(testing|clean|pgd_eps2|sga_eps2)\b", line, re.I)], (
        screen
    )
    assert sum(line.startswith("[mat] pgd_eps2: TR@1") for line in screen) == 1, screen
    assert sum(line.startswith("[mat] sga_eps2: TR@1") for line in screen) == 1, screen
    # the test's bar is drawn, then erased, before the robust evaluation's first bar
    assert raw.rindex("testing:") < raw.index("clean:"), raw


def test_warnings_and_log_lines_start_their_own_line_above_a_bar(monkeypatch):
    """A warning, one of our log lines or one of Lightning's written while a terminal bar is open clears the bar and
    is written on its own line, the bar redrawn after it. Bug caught: ``epoch 0:  33%|███ | 1/3 batches/path.py:8: UserWarning: ...``,
    one line of bar and warning. (pytest records warnings instead of printing them: the hook ``_quiet_console``
    installs is called here with Python's own formatter.)"""
    import logging
    import warnings

    from mat_lightning import cli

    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    lightning_log = logging.getLogger("lightning.pytorch")  # Lightning's own handler, here on the terminal
    monkeypatch.setattr(lightning_log, "handlers", [logging.StreamHandler(tty)])
    cli._setup_logging()
    cli._quiet_console()
    assert getattr(warnings.showwarning, "above_bars", False)

    def python_show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line=""))

    show = cli._above_bars(python_show)
    for i in progress(range(3), "epoch 0", stream=tty):
        if i == 1:
            show(UserWarning("something odd"), UserWarning, "/x/fit_loop.py", 8)
            logging.getLogger("mat_lightning.tests").info("a log line")
            lightning_log.info("Detected KeyboardInterrupt, attempting graceful shutdown ...")
    screen = render(tty.getvalue())
    assert "Detected KeyboardInterrupt, attempting graceful shutdown ..." in screen, screen
    assert "/x/fit_loop.py:8: UserWarning: something odd" in screen, screen
    assert "[mat] a log line" in screen, screen
