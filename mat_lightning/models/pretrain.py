"""Contrastive pretraining from scratch: how the synthetic world gets its "pretrained" CLIP.

Real runs start from OpenAI/LAION weights; the synthetic world has no such weights, so we train its tiny CLIP on the
world's train split once (cached by :mod:`mat_lightning.synthetic.assets`). A plain loop, not a Lightning Trainer:
it runs inside other commands (``mat fit`` builds it on first use) and must not touch their loggers or checkpoints.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mat_lightning.eval.retrieval import recall_at_k, similarity
from mat_lightning.losses import contrastive_loss
from mat_lightning.models.encoder import VLEncoder
from mat_lightning.progress import note
from mat_lightning.progress import progress as progress_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of the from-scratch contrastive pretraining (part of the cache key).

    Attributes:
        model_name: open_clip architecture.
        steps: optimiser steps; batch_size: images per step (one random caption each).
        lr: peak AdamW learning rate (linear warm-up over ``warmup_fraction`` of the steps, then cosine to 0).
        weight_decay: AdamW weight decay on matrices (not on gains, biases or the temperature).
        seed: initialisation and sampling seed.
    """

    model_name: str = "mat-tiny"
    steps: int = 700
    batch_size: int = 128
    lr: float = 1e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0


def param_groups(params: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on >=2-D weights only (open_clip's exclusion of gains, biases and logit_scale)."""
    decay = [p for n, p in params if p.requires_grad and p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in params if p.requires_grad and (p.ndim < 2 or "logit_scale" in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain_clip(
    encoder: VLEncoder,
    images: Tensor,
    captions: Sequence[Sequence[str]],
    cfg: PretrainConfig,
    progress: bool = True,
) -> None:
    """Train ``encoder`` in place with the symmetric contrastive loss.

    Args:
        encoder: the model to train (random initialisation, typically).
        images: uint8[N, 3, S, S], the training images.
        captions: N lists of captions; each step pairs every image with one of its captions at random.
        cfg: hyper-parameters.
        progress: show a progress bar.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(param_groups(list(encoder.named_parameters()), cfg.weight_decay), lr=cfg.lr)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, warmup))
    encoder.train()
    running = None  # the loss's moving average over ~20 steps, shown beside the bar (read only when drawn)
    for _ in progress_of(
        range(cfg.steps), "pretraining the synthetic world's CLIP", enabled=progress, unit="steps"
    ):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        batch = images[idx].float().div_(255)
        texts = [rng.choice(captions[i]) for i in idx.tolist()]
        img_emb, txt_emb = encoder.encode_image(batch), encoder.encode_text(texts)
        # Duplicate draws of one image are positives of each other, not negatives.
        loss = contrastive_loss(img_emb, txt_emb, encoder.logit_scale, torch.arange(len(idx)), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            encoder.model.logit_scale.clamp_(0, math.log(100))
            running = loss.detach() if running is None else 0.95 * running + 0.05 * loss.detach()
        note(loss=running)
    encoder.eval()


@torch.no_grad()
def clean_recall(
    encoder: VLEncoder, images: Tensor, captions: Sequence[Sequence[str]], batch_size: int = 256
) -> dict[str, float]:
    """Clean retrieval recall@K of ``encoder`` on uint8 images with their caption lists."""
    was_training = encoder.training
    encoder.eval()
    img = torch.cat(
        [
            encoder.encode_image(images[i : i + batch_size].float() / 255)
            for i in range(0, len(images), batch_size)
        ]
    )
    flat = [c for caps in captions for c in caps]
    txt = torch.cat([encoder.encode_text(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)])
    txt2img = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    encoder.train(was_training)
    return recall_at_k(similarity(img, txt), txt2img)
