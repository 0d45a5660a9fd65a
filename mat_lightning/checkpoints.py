"""The run's checkpoints: the best epoch by clean validation recall, and ``last.ckpt`` (the final weights), one file
when they are the same.

``conf/base.yaml`` configures two callbacks. The first, Lightning's ``ModelCheckpoint`` monitoring
``val/clean/r_mean`` with ``save_on_train_epoch_end: false``, keeps the best epoch (what ``--test_ckpt=best`` tests,
``trainer.checkpoint_callback.best_model_path``); it saves only after a validation, so a run that stops before its
first validation (``--trainer.max_steps=2``) keeps no "best" and prints no warning about the missing key.
:class:`LastModelCheckpoint` writes ``last.ckpt`` at the end of every epoch (what ``--ckpt_path=last`` resumes
from). Lightning's own ``save_last`` is not used: since Lightning 2.2 it rewrites ``last.ckpt`` only when a new best
is saved, so a defense whose clean recall falls while it learns robustness would be left with its first epoch as
"last"; and ``save_last="link"`` links to the newest *best*, not to the final weights.

When training ends and the best checkpoint holds the same step as ``last.ckpt`` (the final epoch was the best, the
usual case of a short run), ``last.ckpt`` becomes a relative symbolic link to it: one file instead of two identical
ones (40 MB each for the 3.4 M-parameter synthetic CLIP; 1.7 GB for ViT-B/16 with its optimiser state). ``cp -r``
and ``rsync -a`` copy the link as a link; where links cannot be made the copy stays.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` a Lightning checkpoint was saved at (read without loading the weights), or None."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not the same checkpoint
        return None
    return ckpt.get("global_step") if isinstance(ckpt, dict) else None


class LastModelCheckpoint(ModelCheckpoint):
    """``last.ckpt``, the final weights, rewritten at the end of every epoch; a link to the best checkpoint when
    that holds the same step (module docstring).

    Args:
        dirpath: the folder (the ``mat`` CLI sets ``<run folder>/checkpoints``).
        filename: the file's name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last") -> None:
        super().__init__(dirpath=dirpath, filename=filename, enable_version_counter=False)

    def on_train_start(self, trainer, pl_module) -> None:
        # Writing a checkpoint through a link would overwrite the best file it points to (a resumed run in the
        # same folder): drop the link, the next epoch writes a file.
        last = Path(self.dirpath or "", f"{self.filename}{self.FILE_EXTENSION}")
        if trainer.is_global_zero and self.dirpath and last.is_symlink():
            last.unlink()
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        best = trainer.checkpoint_callback
        if best is self or not isinstance(best, ModelCheckpoint):
            return
        if trainer.is_global_zero:
            link_if_same(Path(self.best_model_path), Path(best.best_model_path or ""))
        trainer.strategy.barrier()


def link_if_same(last: Path, best: Path) -> bool:
    """Replace the file ``last`` by a relative link to ``best`` when both are checkpoints of the same step."""
    if not last.name or not best.name or last.is_symlink() or not last.is_file() or not best.is_file():
        return False
    if last.resolve() == best.resolve():
        return False
    step = checkpoint_step(last)
    if step is None or step != checkpoint_step(best):
        return False
    tmp = last.with_name(f".{last.name}.link{os.getpid()}")
    try:
        os.symlink(os.path.relpath(best, last.parent), tmp)
        os.replace(tmp, last)
    except OSError:  # no links here (some file systems): keep the copy
        tmp.unlink(missing_ok=True)
        return False
    return True
