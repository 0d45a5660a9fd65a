"""Weights & Biases helpers and the saved ``config.yaml``. W&B calls are no-ops for other loggers, so CSV and
logger-less runs work unchanged.

* :func:`log_robust_results`: the run's results on its W&B dashboard: ``{stage}/results`` (a wide table, one row per
  attack and ε, one column per metric), ``{stage}/curves`` (the ``curves.png`` figure), line charts of recall vs ε
  and vs K, ``{stage}/adversarial_examples`` (clean vs adversarial image-caption pairs) and ``results.json`` /
  ``config.yaml`` as a ``results`` artifact;
* :class:`WandbLogger`: Lightning's, without an argument W&B warns about (the default logger of ``conf/base.yaml``);
* :class:`SaveConfigToWandb`: writes a **portable** ``config.yaml`` into the run directory (without the paths that
  point into this run folder, so re-running it starts a new run) and pushes the nested resolved config to the W&B
  run once (Lightning issue #19728: ``save_hyperparameters`` alone sends a flattened copy), with tags.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

from mat_lightning.files import atomic_write

log = logging.getLogger(__name__)

#: W&B config keys that are jsonargparse bookkeeping, not settings of the run.
JUNK_CONFIG_KEYS = ("config", "__default_config__", "__path__")


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger without its ``anonymous=None`` argument, which recent W&B versions warn about."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def wandb_loggers(trainer: L.Trainer) -> list[LightningWandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, LightningWandbLogger)]


@rank_zero_only
def log_robust_results(
    trainer: L.Trainer,
    stage: str,
    payload: dict[str, Any],
    ks: Sequence[int],
    examples: list[list[Any]] | None = None,
) -> None:
    """Log a run's robust evaluation (``payload`` = the content of ``results.json``) to every W&B logger."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    rows = payload["rows"]
    metrics = list(dict.fromkeys(k for row in rows for k in row if k not in ("attack", "eps_255")))
    wide = wandb.Table(
        columns=["attack", "eps_255", *metrics],
        data=[[row["attack"], row.get("eps_255"), *(row.get(m) for m in metrics)] for row in rows],
    )
    run_dir = Path(trainer.default_root_dir)
    for lg in loggers:
        run = lg.experiment
        logged: dict[str, Any] = {f"{stage}/results": wide}
        if (run_dir / "curves.png").is_file():
            logged[f"{stage}/curves"] = wandb.Image(str(run_dir / "curves.png"))
        if examples:
            logged[f"{stage}/adversarial_examples"] = wandb.Table(
                columns=[
                    "attack",
                    "clean image",
                    "adversarial image",
                    "clean caption",
                    "adversarial caption",
                ],
                data=[[a, wandb.Image(ci), wandb.Image(ai), cc, ac] for a, ci, ai, cc, ac in examples],
            )
        logged.update(_line_charts(wandb, stage, rows, ks))
        run.log(logged)
        artifact = wandb.Artifact(f"results-{run.id}", type="results")
        for name in ("results.json", "results.csv", "config.yaml", "curves.pdf"):
            if (run_dir / name).is_file():
                artifact.add_file(str(run_dir / name))
        run.log_artifact(artifact)


def _line_charts(wandb: Any, stage: str, rows: Sequence[dict], ks: Sequence[int]) -> dict[str, Any]:
    charts: dict[str, Any] = {}
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    for direction in ("tr", "ir"):
        xs, ys, names = [], [], []
        for name in attacks:
            pts = sorted(
                (r for r in rows if r["attack"] == name and r.get("eps_255") is not None),
                key=lambda r: r["eps_255"],
            )
            if len(pts) > 1:  # measured points only: one ε is no curve
                xs.append([r["eps_255"] for r in pts])
                ys.append([r[f"{direction}_r1"] for r in pts])
                names.append(name)
        if names:
            charts[f"{stage}/recall_vs_eps_{direction}_r1"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=names, title=f"{direction.upper()} R@1 vs eps (/255)", xname="eps_255"
            )
        first: dict[str, dict] = {}
        for r in rows:
            first.setdefault(r["attack"], r)
        charts[f"{stage}/recall_vs_k_{direction}"] = wandb.plot.line_series(
            xs=[list(ks)] * len(first),
            ys=[[r[f"{direction}_r{k}"] for k in ks] for r in first.values()],
            keys=list(first),
            title=f"{direction.upper()} R@K vs K",
            xname="K",
        )
    return charts


#: W&B's folders outside the run folder: the environment variable that moves each, and its default.
WANDB_HOME_DIRS = {
    "WANDB_DATA_DIR": "~/.local/share/wandb",  # artifact staging (results.json, config.yaml are copied there)
    "WANDB_CACHE_DIR": "~/.cache/wandb",
    "WANDB_CONFIG_DIR": "~/.config/wandb",
}


def ensure_wandb_dirs(run_dir: str | Path) -> list[str]:
    """Point W&B's folders that cannot be written (an unwritable or missing ``HOME``, a read-only variable's folder)
    into ``run_dir/wandb/``, before the run: W&B would otherwise fail after the evaluation, staging its artifact.

    Returns:
        The variables that were redirected.
    """
    moved = []
    for var, default in WANDB_HOME_DIRS.items():
        folder = Path(os.environ.get(var) or default).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".mat-write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            os.environ[var] = str(
                Path(run_dir) / "wandb" / var.lower().removeprefix("wandb_").removesuffix("_dir")
            )
            moved.append(var)
    if moved:
        log.info(
            "W&B's folders %s are not writable (HOME?): using %s", ", ".join(moved), Path(run_dir) / "wandb"
        )
    return moved


def portable_config(config: Any, run_dir: str | Path) -> Any:
    """A copy of the resolved config without the values the CLI derived from this run's folder.

    ``trainer.default_root_dir``, a logger's ``save_dir`` and W&B ``name``, and a checkpoint callback's ``dirpath``
    that point into ``run_dir`` are reset to null: ``mat fit --config <run>/config.yaml`` then starts a new run
    folder instead of overwriting this one (resuming is explicit: ``--ckpt_path``).
    """
    cfg = copy.deepcopy(config)
    run_dir = str(run_dir)
    trainer = cfg.get("trainer")
    if trainer is None:
        return cfg
    if str(trainer.get("default_root_dir")) == run_dir:
        trainer.default_root_dir = None
    loggers = trainer.get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        args = getattr(lg, "init_args", None)
        if args is None:
            continue
        if str(args.get("save_dir")) == run_dir:
            args.save_dir = None
        if str(args.get("name")).endswith("/" + Path(run_dir).name):
            args.name = None
    for cb in trainer.get("callbacks") or []:
        args = getattr(cb, "init_args", None)
        if args is not None and str(args.get("dirpath")).startswith(run_dir):
            args.dirpath = None
    return cfg


class SaveConfigToWandb(SaveConfigCallback):
    """A portable ``config.yaml`` in the run directory plus the nested config and tags in every W&B run."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's, with ``config.yaml`` written atomically (a full disk leaves no half file) and portable."""
        if self.already_saved:
            return
        if self.save_to_log_dir:
            log_dir = trainer.log_dir  # this broadcasts the directory
            if trainer.is_global_zero and log_dir is not None:
                portable = portable_config(self.config, trainer.default_root_dir)
                atomic_write(
                    Path(log_dir) / self.config_filename, self.parser.dump(portable, skip_unset=False)
                )
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        # every rank agrees that the config was saved (Lightning's own synchronisation)
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        config = {k: v for k, v in self.config.as_dict().items() if k not in JUNK_CONFIG_KEYS}
        for lg in wandb_loggers(trainer):
            run = lg.experiment
            run.config.update(config, allow_val_change=True)
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *run_tags(trainer, pl_module)]))


def run_tags(trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
    """W&B tags of a run: its defense, data set and model (``defense:mat``, ``dataset:synthetic``, ...)."""
    encoder = getattr(pl_module, "encoder", None)
    values = {
        "defense": getattr(getattr(pl_module, "defense", None), "name", None),
        "dataset": getattr(trainer.datamodule, "dataset", None),
        "model": getattr(encoder, "model_name", None),
    }
    return [f"{k}:{v}" for k, v in values.items() if v]
