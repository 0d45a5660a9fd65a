"""Weights & Biases helpers. Every call is a no-op for other loggers, so CSV and logger-less runs work unchanged.

* :func:`log_robust_rows`: one table ``{stage}/robust_recall`` (attack, eps_255, metric, value) and line charts of
  recall vs ε (``{stage}/recall_vs_eps``) and recall vs K (``{stage}/recall_vs_k``);
* :class:`SaveConfigToWandb`: writes ``config.yaml`` into the run directory and pushes the **nested** resolved
  config to the W&B run once (Lightning issue #19728: ``save_hyperparameters`` alone sends a flattened copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


@rank_zero_only
def log_robust_rows(trainer: L.Trainer, stage: str, rows: Sequence[dict], ks: Sequence[int]) -> None:
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    table_rows = [
        [row["attack"], row["eps_255"], key, float(value)]
        for row in rows
        for key, value in row.items()
        if key not in ("attack", "eps_255")
    ]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    for lg in loggers:
        run = lg.experiment
        run.log(
            {
                f"{stage}/robust_recall": wandb.Table(
                    columns=["attack", "eps_255", "metric", "value"], data=table_rows
                )
            }
        )
        for direction in ("tr", "ir"):
            xs, ys, names = [], [], []
            for name in attacks:
                pts = sorted(
                    (r for r in rows if r["attack"] == name and r["eps_255"] is not None),
                    key=lambda r: r["eps_255"],
                )
                if len(pts) > 1:
                    xs.append([r["eps_255"] for r in pts])
                    ys.append([r[f"{direction}_r1"] for r in pts])
                    names.append(name)
            if names:
                run.log(
                    {
                        f"{stage}/recall_vs_eps_{direction}_r1": wandb.plot.line_series(
                            xs=xs,
                            ys=ys,
                            keys=names,
                            title=f"{direction.upper()} R@1 vs eps (/255)",
                            xname="eps_255",
                        )
                    }
                )
            first = {}
            for r in rows:
                first.setdefault(r["attack"], r)
            run.log(
                {
                    f"{stage}/recall_vs_k_{direction}": wandb.plot.line_series(
                        xs=[list(ks)] * len(first),
                        ys=[[r[f"{direction}_r{k}"] for k in ks] for r in first.values()],
                        keys=list(first),
                        title=f"{direction.upper()} R@K vs K",
                        xname="K",
                    )
                }
            )


class SaveConfigToWandb(SaveConfigCallback):
    """``config.yaml`` in the run directory (Lightning's behaviour) plus the nested config in every W&B run."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for lg in wandb_loggers(trainer):
            lg.experiment.config.update(self.config.as_dict(), allow_val_change=True)
