"""Progress of long loops on stderr: a bar with an ETA in a terminal, periodic plain lines in a log.

tqdm redraws its bar with ``\\r``; written to a file or a pipe (``nohup``, SLURM, ``| tee``) every redraw lands on one
``\\r``-joined line. When stderr is not a terminal, a :class:`Progress` prints a plain line instead every ``every_s``
seconds (``pgd: 3/7 batches (43 %), 12 s, ~16 s left``) and one when the loop ends. Never stdout: it holds only
the run's results table.

* :func:`progress` wraps an iterable (the robust evaluation's attacks, the asset builds);
* :class:`StageProgressBar` is Lightning's progress bar made of the same bars: one per stage (an epoch, a
  validation, the test's clean pass), on stderr, a line per finished epoch in a terminal;
* code deep inside an item reports to the innermost open bar without holding it: :func:`note` (values shown beside
  the bar, e.g. the running loss), :func:`part` and :func:`step` (how far the current item is, e.g. SGA's passes and
  PGD's steps inside one batch), so a bar over few long items still moves. With no bar open they do nothing.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm

T = TypeVar("T")

#: Open bars, innermost last: where :func:`note`, :func:`part` and :func:`step` report.
_OPEN: list[Progress] = []


class _Bar(tqdm):
    """tqdm whose count shows whole items (``3/7``) while the bar, the percentage (rounded down) and the ETA also
    count the current item's part,
    and whose postfix is read when a redraw happens (``describe``), not at every update."""

    describe = staticmethod(lambda: "")

    @property
    def format_dict(self):
        d = super().format_dict
        d["postfix"] = self.describe()
        d["done"] = f"{math.floor(d['n'] + 1e-9)}/{d['total']}" if d["total"] else f"{math.floor(d['n'])}"
        d["pct"] = (
            f"{math.floor(100 * d['n'] / d['total'] + 1e-9):3d}" if d["total"] else ""
        )  # 100 only when done
        return d


class Progress:
    """One bar over ``total`` items (``None``: unknown) on ``stream`` (default: the current ``sys.stderr``).

    In a terminal: a tqdm bar one column narrower than the terminal (a bar exactly as wide wraps under tmux and each
    redraw lands on a new line), left on screen when closed only if ``leave``. Otherwise: a plain line every
    ``every_s`` seconds while it runs and one when it closes (``<desc>: 7 batches done in 12 s, loss 0.71``).
    ``enabled=False`` prints nothing.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "batches",
        enabled: bool = True,
        every_s: float = 30.0,
        leave: bool = False,
        stream: IO[str] | None = None,
    ) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0  # finished items
        self.fraction = 0.0  # of the current item, from part()/step()
        self.values: dict[str, Any] = {}
        self._parts: list[tuple[float, float, str]] = []  # (start, width, label) of nested parts of the item
        self._step_label = ""
        self._bar: _Bar | None = None
        self._closed = not enabled
        self.t0 = self._last = time.monotonic()
        if not enabled:
            return
        if self.stream.isatty():
            columns, lines = shutil.get_terminal_size((80, 24))
            width = min(100, columns - 1)
            counted = "{done} " + unit
            self._bar = _Bar(
                total=total,
                desc=desc,
                leave=leave,
                file=self.stream,
                ncols=width,
                nrows=max(lines, 2),  # tqdm hides every bar of a terminal that reports 0 lines (a fresh pty)
                bar_format=(
                    "{desc}: {pct}%|{bar}| " + counted + " [{elapsed}<{remaining}{postfix}]"
                    if total
                    else "{desc}: " + counted + " [{elapsed}{postfix}]"
                ),
            )
            self._bar.describe = self._postfix
        _OPEN.append(self)

    # -- reporting -------------------------------------------------------------------------------------------------

    def advance(self, items: int = 1) -> None:
        """``items`` more finished (the current item's part resets)."""
        self.set_done(self.done + items)

    def set_done(self, done: int) -> None:
        """``done`` items finished in all (the current item's part resets)."""
        self.done, self.fraction, self._step_label = done, 0.0, ""
        self._parts.clear()
        self._show()

    def set_values(self, **values: Any) -> None:
        """Shown beside the bar and in the plain lines (numbers as 3 significant digits; a tensor is read only when
        a line is drawn: no device sync per step)."""
        self.values.update(values)
        self._show(force=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self in _OPEN:
            _OPEN.remove(self)
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.close()
        else:
            unit = _singular(self.unit) if self.done == 1 else self.unit
            line = f"{self.desc}: {self.done} {unit} done in {time.monotonic() - self.t0:.0f} s"
            print(line + _joined(self._postfix()), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- drawing ---------------------------------------------------------------------------------------------------

    def _postfix(self) -> str:
        shown = [f"{k} {_number(v)}" for k, v in self.values.items()]
        labels = [label for _, _, label in self._parts] + ([self._step_label] if self._step_label else [])
        if labels:
            shown.append(": ".join(labels))
        return ", ".join(shown)

    def _show(self, force: bool = True) -> None:
        if self._closed:
            return
        position = self.done + min(self.fraction, 0.999)
        if self._bar is not None:
            self._bar.update(position - self._bar.n)  # redraws at most every 0.1 s
            return
        now = time.monotonic()
        if not force or now - self._last < self.every_s or (self.total and self.done >= self.total):
            return
        self._last = now
        seconds = now - self.t0
        if not self.total:
            line = f"{self.desc}: {self.done} {self.unit}, {seconds:.0f} s"
        else:
            left = seconds / position * (self.total - position) if position else math.inf
            line = (
                f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * position / self.total:.0f} %), "
                f"{seconds:.0f} s, ~{left:.0f} s left"
            )
        print(line + _joined(self._postfix()), file=self.stream, flush=True)


def _singular(unit: str) -> str:
    """``batches`` -> ``batch``, ``steps`` -> ``step``."""
    return unit[:-2] if unit.endswith(("ches", "shes", "xes", "sses")) else unit.removesuffix("s")


def _number(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _joined(postfix: str) -> str:
    return f", {postfix}" if postfix else ""


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    every_s: float = 30.0,
    unit: str = "batches",
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (closed without being left on screen: the caller logs a result)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, enabled, every_s, stream=stream) as bar:
        for item in items:
            yield item
            bar.advance()


# -- reporting from inside an item, to the innermost open bar ------------------------------------------------------


def note(**values: Any) -> None:
    """Show ``values`` beside the innermost open bar (e.g. ``note(loss=loss)``)."""
    if _OPEN:
        _OPEN[-1].set_values(**values)


@contextlib.contextmanager
def part(begin: float, end: float, label: str) -> Iterator[None]:
    """The share ``[begin, end)`` (fractions) of the current item, or of the enclosing part: the bar moves to
    ``begin``, shows ``label`` until the part ends, then moves to ``end``; parts nest, and :func:`step` divides the
    innermost one."""
    bar = _OPEN[-1] if _OPEN else None
    if bar is None:
        yield
        return
    start, width = (bar._parts[-1][0], bar._parts[-1][1]) if bar._parts else (0.0, 1.0)
    frame = (start + width * begin, width * (end - begin), label)
    bar._parts.append(frame)
    bar.fraction, bar._step_label = frame[0], ""
    bar._show()
    try:
        yield
    finally:
        if bar._parts and bar._parts[-1] is frame:
            bar._parts.pop()
            bar.fraction, bar._step_label = frame[0] + frame[1], ""


def step(done: int, total: int, label: str = "step") -> None:
    """``done`` of ``total`` steps of the innermost part of the current item (``PGD step 3/10``)."""
    if not _OPEN:
        return
    bar = _OPEN[-1]
    start, width = (bar._parts[-1][0], bar._parts[-1][1]) if bar._parts else (0.0, 1.0)
    bar.fraction = start + width * done / max(1, total)
    bar._step_label = f"{label} {done}/{total}"
    bar._show()


@contextlib.contextmanager
def quiet_bars() -> Iterator[None]:
    """Write to stderr without breaking the open terminal bars (they are cleared, then redrawn below)."""
    with tqdm.external_write_mode(file=sys.stderr):
        yield


# -- Lightning ---------------------------------------------------------------------------------------------------


class StageProgressBar(ProgressBar):
    """Lightning's progress bar (replacing its rich and tqdm ones), made of :class:`Progress` bars on stderr.

    One bar per stage: ``epoch N`` (left on screen in a terminal: one line per finished epoch, with the last
    training loss and validation metrics; in a log, the same as a plain line), ``validation`` and ``test`` (cleared
    when they end). The test bar closes at the end of the test epoch, before the robust evaluation's attacks start
    (a callback after this one in the trainer's list, each with its own bar): it never shows "finished" while
    attacks still run. Disabled on every rank but the first (Lightning's ``setup``).

    Args:
        every_s: seconds between the plain lines when stderr is not a terminal.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._bars: dict[str, Progress] = {}

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's run id: not progress
        return metrics

    def _open(self, stage: str, desc: str, total: float | int | None, leave: bool = False) -> None:
        self._close(stage)
        total = int(total) if total is not None and math.isfinite(total) else None
        self._bars[stage] = Progress(desc, total, enabled=self.is_enabled, every_s=self.every_s, leave=leave)

    def _close(self, stage: str) -> None:
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()

    def _count(self, stage: str, batch_idx: int, dataloader_idx: int = 0) -> None:
        bar = self._bars.get(stage)
        if bar is not None:
            bar.set_done(batch_idx + 1)

    # sanity check

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._open("validation", self.sanity_check_description, self.total_val_batches)

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self._close("validation")

    # training

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._open("train", f"epoch {trainer.current_epoch}", self.total_train_batches, leave=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count("train", batch_idx)
        if "train" in self._bars:
            self._bars["train"].set_values(**self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if "train" in self._bars:
            self._bars["train"].set_values(**self.get_metrics(trainer, pl_module))
        self._close("train")

    def on_train_end(self, trainer, pl_module) -> None:
        self._close("train")

    # validation (inside an epoch, or `mat validate`)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not self.has_dataloader_changed(dataloader_idx):
            return
        desc = self.validation_description.lower() + (f" {dataloader_idx}" if dataloader_idx else "")
        self._open("validation", desc, self.total_val_batches_current_dataloader)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._count("validation", batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._close("validation")
        self.reset_dataloader_idx_tracker()
        if "train" in self._bars:
            self._bars["train"].set_values(**self.get_metrics(trainer, pl_module))

    # test: the clean pass of the test loop; the robust evaluation's attacks follow with their own bars

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            desc = self.test_description.lower() + (f" {dataloader_idx}" if dataloader_idx else "")
            self._open("test", desc, self.total_test_batches_current_dataloader)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("test", batch_idx)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._close("test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._close("test")
        self.reset_dataloader_idx_tracker()

    # predict

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            self._open(
                "predict", self.predict_description.lower(), self.total_predict_batches_current_dataloader
            )

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("predict", batch_idx)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close("predict")
        self.reset_dataloader_idx_tracker()

    def on_exception(self, trainer, pl_module, exception) -> None:
        for stage in list(self._bars):  # the error line starts on a line of its own
            self._close(stage)
