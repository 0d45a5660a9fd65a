"""MatModule with the clean defense; the evaluation embedding bank."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from references import split_recall

from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.eval.embeddings import EmbeddingBank
from mat_lightning.module import MatModule
from mat_lightning.synthetic import data_args, load_split


def snapshot(params):
    return [p.detach().clone() for p in params]


def test_clean_fine_tuning_moves_both_towers(tiny_encoder, tmp_path):
    """Both towers move, the loss is finite, and the logged validation recall is the trained weights' recall on
    the first 16 val images, computed by explicit loops.

    Bug caught: validation recall from one batch or one rank's shard, on the wrong split, with captions
    misaligned to their images, or from the weights before the last step; the old range check (0..100) passed them.
    """
    module = MatModule(tiny_encoder, lr=1e-3)
    vision, text = snapshot(tiny_encoder.vision_parameters()), snapshot(tiny_encoder.text_parameters())
    dm = RetrievalDataModule(**data_args("tiny"), batch_size=16, captions_per_image=2, max_eval_images=16)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # val recall of the trained weights (the epoch's validation ran after its last step) against explicit loops
    images, captions = load_split("tiny", "val")
    expected = split_recall(tiny_encoder.eval(), images[:16], captions[:16])
    for key in ("tr_r1", "tr_r5", "ir_r1", "ir_r10", "r_mean"):
        assert trainer.callback_metrics[f"val/clean/{key}"].item() == pytest.approx(
            expected[key], abs=1e-4
        ), key
    assert any(not torch.equal(a, b) for a, b in zip(vision, tiny_encoder.vision_parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(text, tiny_encoder.text_parameters(), strict=True))
    assert tiny_encoder.logit_scale.item() <= 100 + 1e-4


def test_embedding_bank_dedupes_and_orders_like_the_split():
    # Two "ranks" worth of batches in scrambled order, image 1 repeated (DistributedSampler padding).
    emb = {i: torch.full((2,), float(i)) for i in range(3)}
    bank = EmbeddingBank()
    bank.add(
        torch.stack([emb[2], emb[0]]),
        torch.tensor([2, 0]),
        torch.tensor([[2.0, 0], [2.1, 0], [0.0, 0]]),
        torch.tensor([0, 0, 1]),
    )
    bank.add(
        torch.stack([emb[1], emb[1]]),
        torch.tensor([1, 1]),
        torch.tensor([[1.0, 0], [1.1, 0], [1.0, 0], [1.1, 0]]),
        torch.tensor([0, 0, 1, 1]),
    )
    img, txt, txt2img, ids = bank.compute()
    assert ids.tolist() == [0, 1, 2]
    assert img[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert txt[:, 0].tolist() == pytest.approx([0.0, 1.0, 1.1, 2.0, 2.1])
    assert txt2img.tolist() == [0, 1, 1, 2, 2]
