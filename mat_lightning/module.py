"""MatModule: a VL encoder trained by a defense, evaluated by clean retrieval recall every epoch.

The training path is explicit (style anchor: Lightning's "callbacks for cross-cutting evaluation, explicit calls for
the training path"): ``training_step`` calls ``self.defense(self.encoder, batch)``, which may call attacks. Robust
evaluation lives in the :class:`~mat_lightning.eval.robust.RobustRetrievalEval` callback.

Optimisation follows the papers' CLIP fine-tuning defaults (DESIGN §2): AdamW (lr 1e-5, weight decay 0.1 on
matrices only), linear warm-up then cosine decay per step, CLIP's temperature clamped at 100.

A diverged run stops at once (:class:`~mat_lightning.errors.NonFiniteError`, naming the step): a non-finite loss
before its backward pass (all ranks agree), non-finite weights right after the optimiser step, before any callback
could save them. Checkpoints written earlier hold finite weights; the error names the newest one.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import lightning as L
import torch

from mat_lightning.attacks.store import attach_stores, bert_attacks
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.defenses.base import Defense
from mat_lightning.defenses.clean import Clean
from mat_lightning.errors import ConfigError, NonFiniteError, non_finite_tensors
from mat_lightning.eval.embeddings import EmbeddingBank
from mat_lightning.eval.rerank import ItmBank, wants_rerank
from mat_lightning.eval.rerank import ranks as rerank_ranks
from mat_lightning.eval.retrieval import recall_from_ranks
from mat_lightning.models.encoder import VLEncoder
from mat_lightning.models.pretrain import param_groups, warmup_cosine

NOT_A_MAT_CHECKPOINT = (
    "is not a Lightning checkpoint of MatModule (no 'state_dict'). To evaluate open_clip weights, pass the file as "
    "--model.encoder.init_args.pretrained (a vision tower: vision_checkpoint)."
)


class MatModule(L.LightningModule):
    """Fine-tunes ``encoder`` with ``defense``.

    Args:
        encoder: the dual encoder (``class_path`` + ``init_args``), e.g. ``OpenClipEncoder``.
        defense: the training objective (``Clean``, ``MAT``, ...); default ``Clean``.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on weight matrices (not on gains, biases or the temperature).
        warmup_fraction: share of the optimiser steps spent in linear warm-up before the cosine decay.
        ks: recall cut-offs logged at validation/test.
        compile: ``torch.compile`` the encoder's towers (``encoder.towers()``, compiled in place, so checkpoint keys
            do not change). Pays off on GPUs for long runs; the first steps are slow while it compiles.
        candidate_store: give the training text attacks (BERT-Attack) a candidate store of the train captions,
            read by the DataLoader workers (``attacks/store.py``; the same adversarial captions, less work per
            step). False: every caption is prepared on the fly in the training step.
    """

    def __init__(
        self,
        encoder: VLEncoder,
        defense: Defense | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_fraction: float = 0.1,
        ks: list[int] | None = None,
        compile: bool = False,
        candidate_store: bool = True,
    ) -> None:
        super().__init__()
        for key, value, ok, rule in (
            ("lr", lr, lambda v: 0 <= v < math.inf, "a finite number >= 0, e.g. 1e-5"),
            ("weight_decay", weight_decay, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
            ("warmup_fraction", warmup_fraction, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ):
            if not ok(float(value)):
                raise ConfigError(f"--model.{key}={value}: must be {rule}")
        self.save_hyperparameters(logger=False, ignore=["encoder", "defense"])
        self.encoder = encoder
        self.defense = defense if defense is not None else Clean()
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.ks = list(ks or [1, 5, 10])
        self.candidate_store = candidate_store
        self.defense.attach(self.encoder)  # before compiling: FARE deep-copies the encoder
        if compile:
            towers = self.encoder.towers() if hasattr(self.encoder, "towers") else []
            if not towers:
                raise ConfigError(
                    f"model.compile=true: {type(self.encoder).__name__}.towers() names no module"
                )
            for tower in towers:
                tower.compile()
        self._freeze_untrained_towers()
        self._bank: EmbeddingBank | None = None
        self._itm: ItmBank | None = None

    def _freeze_untrained_towers(self) -> None:
        """TeCoA and FARE train the vision tower only: everything else stops receiving gradients."""
        trained = set()
        if "vision" in self.defense.trains:
            trained |= {id(p) for p in self.encoder.vision_parameters()}
        if "text" in self.defense.trains:
            trained |= {id(p) for p in self.encoder.text_parameters()}
        if set(self.defense.trains) >= {"vision", "text"}:
            trained |= {id(p) for p in self.encoder.parameters()}  # the temperature too
        for p in self.encoder.parameters():
            if id(p) not in trained:
                p.requires_grad_(False)

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Let any MatModule checkpoint be evaluated under any defense's config.

        The encoder's weights must match; the defense's own state (FARE's frozen reference) is taken from the
        checkpoint when the configured defense has it, and left as configured otherwise.
        """
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            raise ConfigError(f"--ckpt_path {NOT_A_MAT_CHECKPOINT}")
        own = self.state_dict()
        for key in [k for k in state if k.startswith("defense.") and k not in own]:
            del state[key]
        for key in (k for k in own if k.startswith("defense.") and k not in state):
            state[key] = own[key]
        missing = [k for k in own if k.startswith("encoder.") and k not in state]
        if missing:
            raise ConfigError(
                f"the checkpoint's encoder does not match the configured one ({len(missing)} missing weights, "
                f"e.g. {missing[:3]}); check --model.encoder"
            )

    # -- training -----------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Before fitting: the training text attacks' candidate store of the train captions (built once per data
        set, masked LM, tokenizer and settings, then read from the cache); the DataLoader workers look each batch
        up in it (``attacks/store.py``)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if stage != "fit" or not self.candidate_store or not hasattr(dm, "attach_caption_planners"):
            return
        attacks = [a for a in bert_attacks(self.defense) if a.max_words > 0]
        if not attacks:
            return
        stores = attach_stores(
            attacks,
            dm.train_captions(),
            self.encoder,
            self.trainer.strategy.root_device,
            progress=self.trainer.is_global_zero,
        )
        dm.attach_caption_planners(stores)

    def on_fit_start(self) -> None:
        self.defense.prepare(self.device)  # load the training attacks' models before the first timed step

    def training_step(self, batch: RetrievalBatch, batch_idx: int) -> torch.Tensor:
        t0 = time.perf_counter()
        store_hits = []
        with contextlib.ExitStack() as plans:  # the batch's stored text-attack work, looked up by the loader
            for attack in bert_attacks(self.defense):
                plan = (
                    batch.caption_plans.get(attack.store.key)
                    if attack.store and batch.caption_plans
                    else None
                )
                if plan is not None:
                    plans.enter_context(attack.planned(plan))
                    store_hits.append(sum(plan.found) / max(1, len(plan.found)))
            out = self.defense(self.encoder, batch)
        self._check_finite_loss(out.loss, batch_idx)
        logs = {f"train/{k}": float(v) for k, v in out.logs.items()}
        logs["train/step_seconds"] = time.perf_counter() - t0
        if store_hits:  # share of the captions the text attack found in its store (EDA edits are never there)
            logs["train/caption_store_hits"] = sum(store_hits) / len(store_hits)
        logs["train/logit_scale"] = float(self.encoder.logit_scale.detach())
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch))
        self.log_dict(logs, batch_size=len(batch))
        return out.loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._check_finite_weights(batch_idx)

    # -- divergence: stop at the first non-finite loss or weight --------------------------------------------------------

    def _check_finite_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # every rank raises at the same step, none hangs
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteError(self._diverged(f"the training loss is {float(loss.detach())}", batch_idx))

    def _check_finite_weights(self, batch_idx: int) -> None:
        """After the optimiser step (the weights are the same on every rank): one device sync for all tensors."""
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        if not params or bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
            return
        bad = non_finite_tensors(
            (n, p.detach()) for n, p in self.encoder.named_parameters() if p.requires_grad
        )
        raise NonFiniteError(
            self._diverged(
                f"{len(bad)} of {len(params)} trained weight tensors became NaN or infinite in the optimiser "
                f"step (e.g. encoder.{bad[0]})",
                batch_idx,
            )
        )

    def _diverged(self, what: str, batch_idx: int) -> str:
        step = self.global_step + 1  # the step being taken (global_step counts completed steps)
        return (
            f"training diverged at optimiser step {step} (epoch {self.current_epoch}, batch {batch_idx}): {what}. "
            f"Nothing non-finite was saved; the last finite weights: {self._last_checkpoint()}. Lower --model.lr "
            f"(now {self.lr:g}) or check the defense's settings"
        )

    def _last_checkpoint(self) -> str:
        """The newest checkpoint file this run wrote (all are finite: each step was checked), or a note."""
        trainer = self._trainer
        paths = []
        for cb in getattr(trainer, "checkpoint_callbacks", None) or []:
            paths += [Path(p) for p in (cb.best_model_path, cb.last_model_path) if p and Path(p).is_file()]
        if not paths:
            return "none (no checkpoint was written before this step)"
        return str(max(paths, key=lambda p: p.stat().st_mtime))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        logit_scale = getattr(getattr(self.encoder, "model", None), "logit_scale", None)
        if logit_scale is not None and logit_scale.requires_grad:
            with torch.no_grad():
                logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self):
        groups = param_groups(list(self.encoder.named_parameters()), self.weight_decay)
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.warmup_fraction * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- clean evaluation ---------------------------------------------------------------------------------------------

    def _eval_step(self, batch: RetrievalBatch) -> None:
        if self._bank is None:
            self._bank = EmbeddingBank()
            self._itm = ItmBank(self.encoder) if wants_rerank(self.encoder) else None  # fusion models re-rank
        if self._itm is not None:
            self._itm.add(batch.images, batch.image_ids, batch.captions, batch.txt2img)
        with torch.no_grad():
            self._bank.add(
                self.encoder.encode_image(batch.images),
                batch.image_ids,
                self.encoder.encode_text(batch.captions),
                batch.txt2img,
            )

    def _eval_epoch_end(self, stage: str) -> None:
        if self._bank is None:
            return
        img, txt, txt2img, _ = self._bank.compute()
        self._bank, itm, self._itm = None, self._itm, None
        metrics = recall_from_ranks(rerank_ranks(self.encoder, img, txt, txt2img, itm), self.ks)
        # Every rank holds the same gathered embeddings, hence the same values; sync_dist (a mean of equal values)
        # only tells Lightning so, instead of a warning per metric under DDP.
        self.log_dict({f"{stage}/clean/{k}": v for k, v in metrics.items() if k != "r_mean"}, sync_dist=True)
        self.log(f"{stage}/clean/r_mean", metrics["r_mean"], prog_bar=True, sync_dist=True)

    def validation_step(self, batch: RetrievalBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: RetrievalBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
