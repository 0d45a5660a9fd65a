"""GPU readiness on the CPU: bf16-mixed training keeps the losses in float32; --model.compile compiles the towers."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from mat_lightning.attacks import PGD, BertAttack
from mat_lightning.defenses import MAT
from mat_lightning.losses import contrastive_loss, fare_loss
from mat_lightning.module import MatModule
from mat_lightning.synthetic import data_args, ensure_mlm


def test_losses_run_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 16), dim=-1), F.normalize(torch.randn(6, 16), dim=-1)
    scale, t2i = torch.tensor(100.0), torch.arange(6)
    reference = contrastive_loss(img, txt, scale, t2i)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(img.bfloat16(), txt.bfloat16(), scale, t2i)
        fare = fare_loss(img.bfloat16(), txt)
    assert loss.dtype == torch.float32 and fare.dtype == torch.float32
    # only the bf16 rounding of the inputs remains (a bf16 matmul of logits at scale 100 would be off far more)
    expected = contrastive_loss(img.bfloat16().float(), txt.bfloat16().float(), scale, t2i)
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - reference.item()) < 0.05


def test_bf16_mixed_trains_a_mat_step(tiny_encoder, tmp_path):
    from mat_lightning.data.datamodule import RetrievalDataModule

    module = MatModule(
        tiny_encoder,
        MAT(
            text_attack=BertAttack(mlm=str(ensure_mlm("tiny"))),
            image_attack=PGD(eps_255=2, steps=2, step_255=1),
        ),
        lr=1e-4,
    )
    before = [p.detach().clone() for p in tiny_encoder.parameters()]
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=RetrievalDataModule(**data_args("tiny"), batch_size=16))
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in tiny_encoder.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(tiny_encoder.parameters(), before, strict=True))


def test_compile_compiles_the_towers_in_place(tiny_encoder):
    keys = set(tiny_encoder.state_dict())
    MatModule(tiny_encoder, compile=True)
    for tower in tiny_encoder.towers():
        assert tower._compiled_call_impl is not None
    assert set(tiny_encoder.state_dict()) == keys  # checkpoints keep their keys
