"""DDP on 2 CPU processes (gloo) against one process, small enough for the fast suite.

Lightning's ``ddp_fork`` strategy forks this process (no re-import, no ``mat`` start-up), so two processes cost
little more than one. Checked: the weights after a few training steps at the same global batch, and every robust
evaluation row at other per-process evaluation batch sizes. The ``mat fit`` command under DDP (one run folder, one
W&B run, exports, avoidable warnings) is ``test_distributed.py`` (slow).
"""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from test_distributed import assert_same_update

from mat_lightning.attacks import PGD, SGA, BertAttack
from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.eval.robust import RobustRetrievalEval
from mat_lightning.models.encoder import OpenClipEncoder
from mat_lightning.module import MatModule
from mat_lightning.synthetic import data_args, ensure_mlm

STEPS, GLOBAL_BATCH, EVAL_IMAGES = 3, 8, 8


def run(tmp_path, clip_path, processes: int, eval_batch: int) -> tuple[dict, list[dict]]:
    """Fit ``STEPS`` clean steps, then test with a PGD + SGA suite: (encoder weights, results.json rows)."""
    torch.manual_seed(0)
    encoder = OpenClipEncoder("mat-tiny", pretrained=str(clip_path))
    module = MatModule(encoder, lr=1e-3)
    dm = RetrievalDataModule(
        **data_args("tiny"),
        batch_size=GLOBAL_BATCH // processes,
        eval_batch_size=eval_batch,
        max_eval_images=EVAL_IMAGES,
    )
    suite = RobustRetrievalEval(
        [
            PGD(eps_255=2, steps=2, step_255=1, objective="split_contrastive"),
            SGA(PGD(steps=2, step_255=1), BertAttack(mlm=str(ensure_mlm("tiny")), top_k=3)),
        ],
        progress=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy="ddp_fork" if processes > 1 else "auto",
        max_epochs=1,
        limit_train_batches=STEPS,
        limit_val_batches=0,
        callbacks=[suite],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=tmp_path / f"p{processes}",
    )
    trainer.fit(module, dm)  # ddp_fork hands rank 0's trained weights back to this process
    trainer.test(module, datamodule=dm, verbose=False)
    rows = json.loads((tmp_path / f"p{processes}" / "results.json").read_text())["rows"]
    weights = {f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items() if v.is_floating_point()}
    return weights, rows


def test_two_processes_train_and_evaluate_as_one(tmp_path, tiny_clip_path, monkeypatch, request):
    """Bugs caught: gradients not averaged across processes (each rank steps on its half batch), a sampler whose
    global batch depends on the process count, evaluation rows from one rank's shard only (no gather), attack
    randomness keyed by the position in the batch or the rank, duplicated images counted twice (padding)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per process (the forks inherit it): 2 processes on 2 cores
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    start = {
        f"encoder.{k}": v.clone()
        for k, v in OpenClipEncoder("mat-tiny", pretrained=str(tiny_clip_path)).state_dict().items()
        if v.is_floating_point()
    }
    one_weights, one_rows = run(tmp_path, tiny_clip_path, 1, EVAL_IMAGES)
    two_weights, two_rows = run(tmp_path, tiny_clip_path, 2, 3)  # 3 per rank: batches straddle the shards
    assert_same_update(one_weights, two_weights, start)
    assert [r["attack"] for r in two_rows] == ["clean", "pgd", "sga"]
    assert all(r["r_mean"] < two_rows[0]["r_mean"] for r in two_rows[1:])  # the attacks do something
    for r1, r2 in zip(one_rows, two_rows, strict=True):
        assert {k: v for k, v in r2.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in r1.items() if k != "seconds"}, abs=1e-6
        ), r1["attack"]
    assert (
        os.environ.get("LOCAL_RANK") is None
    )  # the children's DDP environment did not leak into this process


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
