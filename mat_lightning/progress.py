"""Progress of a long loop on stderr: a bar with an ETA in a terminal, periodic plain lines in a log.

tqdm redraws its bar with ``\\r``; written to a file or a pipe (``nohup``, SLURM, ``| tee``) every redraw lands on one
``\\r``-joined line. When stderr is not a terminal, :func:`progress` prints a plain line instead every ``every_s``
seconds (``pgd: 3/7 batches (43 %), 12 s, ~16 s left``) and one when the loop ends. Never stdout: it holds only
the run's results table.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    every_s: float = 30.0,
    unit: str = "batches",
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Iterate ``items``, reporting progress on ``stream`` (default: the current ``sys.stderr``)."""
    stream = stream or sys.stderr
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if stream.isatty():
        from tqdm.auto import tqdm

        # one column short of the terminal: a bar exactly as wide wraps (tmux), and each redraw then lands on a new line
        width = min(100, shutil.get_terminal_size((80, 24)).columns - 1)
        yield from tqdm(
            items, desc=desc, total=total, leave=False, file=stream, unit=unit.rstrip("es"), ncols=width
        )
        return
    t0 = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s and (total is None or done < total):
            last = now
            print(_line(desc, done, total, now - t0, unit), file=stream, flush=True)
    print(_line(desc, done, total, time.monotonic() - t0, unit, finished=True), file=stream, flush=True)


def _line(desc: str, done: int, total: int | None, seconds: float, unit: str, finished: bool = False) -> str:
    if finished:
        return f"{desc}: {done} {unit} done in {seconds:.0f} s"
    if not total:
        return f"{desc}: {done} {unit}, {seconds:.0f} s"
    left = seconds / done * (total - done)
    return f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f} %), {seconds:.0f} s, ~{left:.0f} s left"
