"""Robust retrieval evaluation: clean and attacked recall@K over a list of attacks and an ε grid.

One implementation, two entry points:

* :func:`robust_retrieval` — a plain function over an encoder and a loader of eval batches (Python API);
* :class:`RobustRetrievalEval` — a Lightning callback that runs it at the end of ``test`` (after ``fit``, in
  ``mat test`` and ``mat robust-eval``), logs ``test/<attack>/<metric>``, a W&B table and line charts, and writes
  ``results.json``, ``results.csv`` and ``curves.png`` into the run directory.

Protocol (DESIGN §3; SGA's, not Co-Attack's script): every image of the split is attacked **once**, together with
all of its captions; recall is computed on the whole attacked split; each row carries both ASR definitions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from tqdm.auto import tqdm

from mat_lightning.attacks.base import Attack
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.errors import ConfigError
from mat_lightning.eval.embeddings import EmbeddingBank
from mat_lightning.eval.report import atomic_write, write_results
from mat_lightning.eval.retrieval import RetrievalRanks, attack_success, recall_from_ranks, retrieval_ranks
from mat_lightning.models.encoder import VLEncoder

log = logging.getLogger(__name__)


def _encode_split(
    encoder: VLEncoder,
    loader: Iterable[RetrievalBatch],
    attack: Attack | None,
    device: torch.device,
    desc: str,
    progress: bool,
    export: Path | None = None,
) -> tuple[RetrievalRanks, float, int, int]:
    bank = EmbeddingBank()
    t0 = time.perf_counter()
    exported: list[dict] = []
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, desc=desc, total=total, disable=not progress, leave=False):
        images, txt2img = batch.images.to(device), batch.txt2img.to(device)
        captions = batch.captions
        if attack is not None:
            result = attack(encoder, images, captions, txt2img)
            images, captions = result.images, result.captions
            if export is not None:
                exported += _export_batch(export, batch, images, captions)
        with torch.no_grad():
            bank.add(
                encoder.encode_image(images), batch.image_ids, encoder.encode_text(captions), batch.txt2img
            )
    seconds = time.perf_counter() - t0
    img, txt, txt2img, _ = bank.compute()
    if export is not None and exported:
        atomic_write(export / "captions.json", json.dumps(exported, indent=1))
    return retrieval_ranks(img @ txt.T, txt2img), seconds, img.shape[0], txt.shape[0]


def _export_batch(
    folder: Path, batch: RetrievalBatch, images: torch.Tensor, captions: list[str]
) -> list[dict]:
    """Adversarial images as lossless PNG (8-bit) plus exact float tensors, captions in ALBEF layout."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for b, image_id in enumerate(batch.image_ids.tolist()):
        name = f"images/{image_id:06d}.png"
        pixels = (images[b].detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        Image.fromarray(pixels).save(folder / name)
        torch.save(images[b].detach().cpu().clone(), folder / "images" / f"{image_id:06d}.pt")
        caps = [c for c, i in zip(captions, batch.txt2img.tolist(), strict=True) if i == b]
        entries.append({"image": name, "caption": caps, "image_index": image_id})
    return entries


def robust_retrieval(
    encoder: VLEncoder,
    loader: Iterable[RetrievalBatch],
    attacks: Sequence[Attack] = (),
    eps_255_grid: Sequence[float] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    device: torch.device | str | None = None,
    progress: bool = True,
    export_dir: str | Path | None = None,
) -> list[dict]:
    """Clean and attacked recall rows.

    Args:
        encoder: the model under evaluation.
        loader: eval batches (each image once, with all of its captions); iterated once per attack and budget.
        attacks: attacks to run; ``eps_255_grid`` re-runs each attack with an image budget at every ε of the grid
            (text-only attacks run once).
        ks: recall cut-offs.
        device: where to run (default: the encoder's).
        progress: a progress bar per attack.
        export_dir: write each attacked split there (``<attack>_eps<ε>/images/*.png|.pt`` + ``captions.json``).

    Returns:
        Rows ``{"attack", "eps_255", "tr_r1", ..., "r_mean", "asr_drop_*", "asr_flip_*", "seconds"}``: first
        ``clean``, then per attack its configured budget, then the other budgets of the grid.
    """
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    if torch.is_inference_mode_enabled():
        raise ConfigError("robust evaluation needs autograd: call it outside torch.inference_mode()")
    check_distinct_names(attacks)
    check_budgets(attacks, eps_255_grid)
    was_training = encoder.training
    encoder.eval()
    try:
        return _robust_rows(encoder, loader, attacks, eps_255_grid, ks, device, progress, export_dir)
    finally:
        encoder.train(was_training)


def check_distinct_names(attacks: Sequence[Attack]) -> None:
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"robust_eval.attacks must have distinct names (results are keyed by name): {names}"
        )


def check_budgets(attacks: Sequence[Attack], eps_255_grid: Sequence[float] | None = None) -> None:
    """Refuse attacks that cannot change anything: their rows would equal clean recall, labelled as an attack.

    Checks the budget fields of each attack and of its parts (``image_attack``/``text_attack`` of the multimodal
    attacks): ``eps_255``, ``steps`` and ``step_255`` of image attacks, ``max_words`` and ``top_k`` of text
    attacks; and every ε of the grid.
    """
    for e in eps_255_grid or []:
        if not float(e) > 0:
            raise ConfigError(
                f"robust_eval.eps_255_grid={list(eps_255_grid)}: every ε must be > 0 (an ε of {e} attacks nothing)"
            )
    for attack in attacks:
        parts = [attack] + [getattr(attack, k) for k in ("image_attack", "text_attack") if hasattr(attack, k)]
        for part in parts:
            for key in ("eps_255", "steps", "step_255", "max_words", "top_k"):
                value = getattr(part, key, None)
                if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
                    where = attack.name if part is attack else f"{attack.name} ({part.name})"
                    raise ConfigError(
                        f"robust_eval attack {where} has {key}={value}: it would leave its inputs unchanged and "
                        f"report clean recall as an attack. Give {key} > 0 or remove the attack"
                    )


def _robust_rows(encoder, loader, attacks, eps_255_grid, ks, device, progress, export_dir) -> list[dict]:
    clean_ranks, seconds, _, _ = _encode_split(encoder, loader, None, device, "clean", progress)
    rows = [
        {
            "attack": "clean",
            "eps_255": 0.0,
            **recall_from_ranks(clean_ranks, ks),
            "seconds": round(seconds, 3),
        }
    ]
    for attack in attacks:
        variants = [attack]
        if eps_255_grid and attack.eps_255 is not None:
            # the configured budget first: it is the attack's headline row
            variants += [attack.with_eps(float(e)) for e in eps_255_grid if float(e) != attack.eps_255]
        for variant in variants:
            tag = f"{variant.name}_eps{variant.eps_255:g}" if variant.eps_255 is not None else variant.name
            export = Path(export_dir) / tag if export_dir is not None else None
            variant = variant.clone()
            variant.prepare(device)  # load models (the MLM) outside the timed loop
            ranks, seconds, _, _ = _encode_split(encoder, loader, variant, device, tag, progress, export)
            rows.append(
                {
                    "attack": variant.name,
                    "eps_255": variant.eps_255,
                    **recall_from_ranks(ranks, ks),
                    **attack_success(clean_ranks, ranks, ks),
                    "seconds": round(seconds, 3),
                }
            )
            log.info("%s: TR@1 %.1f IR@1 %.1f (%.1fs)", tag, rows[-1]["tr_r1"], rows[-1]["ir_r1"], seconds)
    return rows


class RobustRetrievalEval(L.Callback):
    """Runs :func:`robust_retrieval` at the end of every ``test`` and reports it.

    Args:
        attacks: attacks to evaluate (``class_path`` + ``init_args`` each); empty = clean only.
        eps_255_grid: optional ε grid (1/255 units) for the attacks with an image budget, e.g. ``[1, 2, 4, 8]``.
        ks: recall cut-offs.
        experiment: the run's name in ``results.json`` (linked from the top-level ``experiment``).
        export_dir: write the adversarial test set there (images + captions) for reuse.
        progress: a progress bar per attack.
        seed: the run's seed, recorded in ``results.json`` (the ``mat`` CLI sets it from ``seed_everything``).
    """

    def __init__(
        self,
        attacks: list[Attack] | None = None,
        eps_255_grid: list[float] | None = None,
        ks: list[int] | None = None,
        experiment: str = "default",
        export_dir: str | None = None,
        progress: bool = True,
        seed: int | None = None,
    ) -> None:
        self.attacks = list(attacks or [])
        self.seed = seed
        self.eps_255_grid = eps_255_grid
        self.ks = list(ks or [1, 5, 10])
        self.experiment = experiment
        self.export_dir = export_dir
        self.progress = progress
        self.rows: list[dict] = []
        # What results.json says was tested; the mat CLI sets them (defaults: read from the trainer).
        self.subcommand: str | None = None  # fit, test, validate or robust-eval
        self.weights: str | None = None  # "start", "final", "best" or the --ckpt_path tested
        self.resumed_from: str | None = None  # the checkpoint a resumed fit started from

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.attacks and trainer.test_loop.inference_mode:
            raise ConfigError(
                "RobustRetrievalEval needs gradients at test time: set trainer.inference_mode: false "
                "(conf/base.yaml does; did a config override it?)"
            )
        if self.export_dir is not None and trainer.world_size > 1:
            raise ConfigError(
                "robust_eval.export_dir works on one process: run mat robust-eval with --trainer.devices=1"
            )
        check_distinct_names(self.attacks)  # before training, not after it
        check_budgets(self.attacks, self.eps_255_grid)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.test_dataloaders
        if isinstance(loader, list | tuple):
            loader = loader[0]
        self.rows = robust_retrieval(
            pl_module.encoder,
            loader,
            self.attacks,
            self.eps_255_grid,
            self.ks,
            pl_module.device,
            self.progress and trainer.is_global_zero,
            self.export_dir if trainer.is_global_zero else None,
        )
        base = {}
        for row in self.rows[
            1:
        ]:  # scalars: each attack at its configured budget (the first row of that attack);
            base.setdefault(row["attack"], row)  # the clean row is MatModule's test/clean/* already
        for name, row in base.items():
            for key, value in row.items():
                if key not in ("attack", "eps_255"):
                    pl_module.log(f"test/{name}/{key}", float(value), rank_zero_only=True)
        from mat_lightning.logging import log_robust_rows

        log_robust_rows(trainer, "test", self.rows, self.ks)
        self._write(trainer, pl_module)
        if self.progress:
            self._print()

    @rank_zero_only
    def _print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"robust retrieval — {self.experiment}")
        cols = [
            "attack",
            "eps_255",
            *[f"{d}_r{k}" for d in ("tr", "ir") for k in self.ks],
            "asr_flip_tr_r1",
            "asr_flip_ir_r1",
            "seconds",
        ]
        for c in cols:
            table.add_column(c, justify="left" if c == "attack" else "right")
        for row in self.rows:
            cells = []
            for c in cols:
                v = row.get(c)
                cells.append("–" if v is None else v if isinstance(v, str) else f"{v:.1f}")
            table.add_row(*cells)
        Console(stderr=True).print(table)

    def _weights(self, trainer: L.Trainer) -> str:
        if self.weights is not None:
            return str(self.weights)
        if getattr(trainer, "ckpt_path", None):
            return str(trainer.ckpt_path)
        return "final" if trainer.global_step > 0 else "start"

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        eval_set = dm.eval_set("test") if dm is not None and hasattr(dm, "eval_set") else None
        encoder = pl_module.encoder
        payload = {
            "experiment": self.experiment,
            "model": f"{getattr(encoder, 'model_name', type(encoder).__name__)}"
            f"/{getattr(encoder, 'pretrained', None)}",
            "defense": getattr(getattr(pl_module, "defense", None), "name", None),
            "dataset": getattr(dm, "dataset", None),
            "split": dm.splits["test"] if dm is not None and hasattr(dm, "splits") else None,
            "n_images": len(eval_set) if eval_set is not None else None,
            "n_captions": len(eval_set.captions) if eval_set is not None else None,
            # batch composition matters to the supervised (contrastive) attacks: negatives come from the batch
            "eval_batch_size": getattr(dm, "eval_batch_size", None),
            "checkpoint": getattr(trainer, "ckpt_path", None),
            "weights": self._weights(trainer),
            "subcommand": self.subcommand or (trainer.state.fn.value if trainer.state.fn else None),
            "resumed_from": self.resumed_from,
            "seed": self.seed,
            "rows": self.rows,
        }
        write_results(trainer.default_root_dir, payload)
        log.info("results written to %s", Path(trainer.default_root_dir) / "results.json")
