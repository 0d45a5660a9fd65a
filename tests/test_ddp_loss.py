"""The DDP contrastive loss (2 CPU processes, gloo) gives the single-process gradient after DDP's averaging."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mat_lightning.losses import contrastive_loss, distributed_contrastive_loss

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, img, txt, txt2img, ids, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        b, t = img.shape[0] // WORLD, txt.shape[0] // WORLD
        local_img = img[rank * b : (rank + 1) * b].clone().requires_grad_()
        local_txt = txt[rank * t : (rank + 1) * t].clone().requires_grad_()
        loss = distributed_contrastive_loss(
            local_img,
            local_txt,
            torch.tensor(7.0),
            txt2img[rank * t : (rank + 1) * t] - rank * b,
            ids[rank * b : (rank + 1) * b],
        )
        loss.backward()
        # DDP averages gradients over ranks; the features' share of that average is grad / WORLD.
        results[rank] = (loss.detach(), local_img.grad / WORLD, local_txt.grad / WORLD)
    finally:
        dist.destroy_process_group()


def test_ddp_loss_matches_single_process():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    txt = F.normalize(torch.randn(16, 6, generator=g), dim=-1)
    # 2 captions per image, each rank holds 4 images + 8 captions
    txt2img = torch.arange(8).repeat_interleave(2)
    ids = torch.tensor([10, 11, 12, 13, 20, 11, 22, 23])  # image 11 on both ranks: a positive across ranks
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), img, txt, txt2img, ids, results), nprocs=WORLD, join=True)

    full_img, full_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    full = contrastive_loss(full_img, full_txt, torch.tensor(7.0), txt2img, ids)
    full.backward()
    mean_loss = sum(results[r][0] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(mean_loss, full.detach())
    torch.testing.assert_close(torch.cat([results[r][1] for r in range(WORLD)]), full_img.grad)
    torch.testing.assert_close(torch.cat([results[r][2] for r in range(WORLD)]), full_txt.grad)
