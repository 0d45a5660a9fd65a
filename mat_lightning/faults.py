"""Interrupted runs: a checkpoint on SIGTERM/SIGINT, exact resumption, and the exit codes 143 and 130.

Lightning turns SIGTERM into a ``SIGTERMException`` at the next batch boundary (a ``SystemExit`` whose status is 0)
and Ctrl-C into ``sys.exit(1)``, after calling every callback's ``on_exception``. :class:`ResumableFit` hooks in
there: it writes ``checkpoints/interrupted.ckpt`` (the partial epoch, what Lightning's ``OnExceptionCheckpoint``
saves) and records the signal, so that ``mat`` exits with the shell's conventional status (128 + signal number).

Exact resumption: ``--ckpt_path=last`` resumes from the experiment's newest ``last.ckpt``, written at the end of
every epoch. Lightning restores weights, optimiser, scheduler and loop counters but not the random streams, which
draw the next epoch's shuffle and caption sampling; :class:`ResumableFit` saves and restores them, so a resumed run
ends at the weights of an uninterrupted one. It does not resume mid-epoch from ``interrupted.ckpt``: Lightning
restarts a non-stateful data loader from the epoch's first batch, so that would repeat batches (Lightning warns).
The attacks' own generators (adversarial training) are not saved: a resumed adversarial run draws new random starts.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mat_lightning.errors import ConfigError

EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143
INTERRUPTED_CKPT = "interrupted.ckpt"


class Interruption:
    """What stopped this process, if a signal did (set by the handlers and :class:`ResumableFit`)."""

    signal: str | None = None  # "SIGTERM" or "SIGINT"
    checkpoint: str | None = None  # the interrupted.ckpt written, if any
    evaluation: str | None = None  # set when a robust evaluation stopped: what was kept and how to finish it

    @classmethod
    def reset(cls) -> None:
        cls.signal, cls.checkpoint, cls.evaluation = None, None, None


class Terminated(SystemExit):
    """SIGTERM outside a trainer loop (Lightning defers it to the next batch inside one)."""


def install_sigterm_handler():
    """Record SIGTERM, and stop at once unless a Lightning loop is running (it stops at its next batch).

    Lightning composes its own SIGTERM handler with this one while it runs, so both see the signal. Returns the
    handler it replaces.
    """

    def handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        Interruption.signal = "SIGTERM"
        if not ResumableFit.running:
            raise Terminated(EXIT_SIGTERM)

    return signal.signal(signal.SIGTERM, handler)


class ResumableFit(L.Callback):
    """Random streams in every checkpoint (restored on resume); ``interrupted.ckpt`` on SIGTERM/SIGINT during fit."""

    running = (
        False  # a trainer loop runs in this process (it turns SIGTERM into an exception at a batch boundary)
    )

    @property
    def state_key(self) -> str:
        return "ResumableFit"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ResumableFit.running = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ResumableFit.running = False

    def state_dict(self) -> dict:
        # plain tensors and tuples only: checkpoints are loaded with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        ResumableFit.running = False
        if isinstance(exception, KeyboardInterrupt):
            Interruption.signal = "SIGINT"
        elif isinstance(exception, SIGTERMException):
            Interruption.signal = "SIGTERM"
        else:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / INTERRUPTED_CKPT
        trainer.save_checkpoint(path, weights_only=False)  # resumable: optimiser, loops and callbacks too
        Interruption.checkpoint = str(path)


def interruption_message() -> str:
    """One line for the user after a signal stopped the run."""
    name = Interruption.signal or "a signal"
    if Interruption.evaluation is not None:
        return f"interrupted by {name} during the robust evaluation: {Interruption.evaluation}"
    saved = f"; the partial epoch is in {Interruption.checkpoint}" if Interruption.checkpoint else ""
    return (
        f"interrupted by {name}{saved}. Files written so far are complete; continue training from the last "
        "completed epoch with the same command plus --ckpt_path=last"
    )


def resolve_last_checkpoint(run_root: str | Path, experiment: str) -> str:
    """The newest ``<run_root>/<experiment>/*/checkpoints/last.ckpt`` (by modification time).

    Raises:
        ConfigError: the experiment has no run with a completed epoch.
    """
    folder = Path(run_root) / experiment
    candidates = sorted(folder.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        interrupted = sorted(folder.glob(f"*/checkpoints/{INTERRUPTED_CKPT}"))
        hint = (
            f" (only a partial epoch: --ckpt_path={interrupted[-1]} resumes it, repeating that epoch's batches)"
            if interrupted
            else ""
        )
        raise ConfigError(
            f"--ckpt_path=last: no last.ckpt under {folder}/*/checkpoints/ (no completed epoch of experiment "
            f"{experiment!r} under --run_root={run_root}){hint}. Check --experiment and --run_root, or drop "
            "--ckpt_path to start from scratch"
        )
    return str(candidates[-1])
