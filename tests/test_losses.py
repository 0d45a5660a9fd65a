"""Contrastive loss: CLIP's CE for 1:1 batches; multi-positive (never negatives) for 1:N batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mat_lightning.losses import contrastive_loss, fare_loss


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_equals_clip_cross_entropy_for_one_caption_per_image():
    img, txt = unit(6, 8, 0), unit(6, 8, 1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    got = contrastive_loss(img, txt, scale, torch.arange(6))
    torch.testing.assert_close(got, ref)


def test_multi_positive_against_hand_computation():
    # Batch rows: images with ids [7, 9, 7] (image 7 appears twice, e.g. a T2I render next to its source);
    # captions: two per row -> txt2img [0,0,1,1,2,2], so captions 0,1,4,5 all belong to image 7.
    img, txt = unit(3, 4, 2), unit(6, 4, 3)
    ids = torch.tensor([7, 9, 7])
    txt2img = torch.tensor([0, 0, 1, 1, 2, 2])
    scale = 5.0
    s = scale * img @ txt.T  # (3, 6)
    owner = [7, 7, 9, 9, 7, 7]
    i2t_rows = []
    for i in range(3):
        pos = [t for t in range(6) if owner[t] == ids[i].item()]
        neg = [t for t in range(6) if owner[t] != ids[i].item()]
        terms = [
            -(s[i, p] - torch.logsumexp(torch.stack([s[i, p]] + [s[i, n] for n in neg]), 0)) for p in pos
        ]
        i2t_rows.append(sum(terms) / len(terms))
    t2i_rows = []
    for t in range(6):
        pos = [i for i in range(3) if ids[i].item() == owner[t]]
        neg = [i for i in range(3) if ids[i].item() != owner[t]]
        terms = [
            -(s[p, t] - torch.logsumexp(torch.stack([s[p, t]] + [s[n, t] for n in neg]), 0)) for p in pos
        ]
        t2i_rows.append(sum(terms) / len(terms))
    ref = (torch.stack(i2t_rows).mean() + torch.stack(t2i_rows).mean()) / 2
    got = contrastive_loss(img, txt, torch.tensor(scale), txt2img, ids)
    torch.testing.assert_close(got, ref)


def test_positives_are_never_negatives():
    # Moving a positive caption's score must not raise another positive's loss term:
    # with all captions of image 0 identical to the image, the loss is at its floor whatever their count.
    img = unit(2, 4, 4)
    one = contrastive_loss(img, img, torch.tensor(50.0), torch.tensor([0, 1]))
    three = contrastive_loss(img, img[[0, 0, 0, 1]], torch.tensor(50.0), torch.tensor([0, 0, 0, 1]))
    assert three.item() == pytest.approx(one.item(), rel=1e-5)
    # SupCon-style (positives in the denominator) would add log(3) for image 0; we do not.
    assert three.item() < one.item() + math.log(3) / 4


def test_gradients_reach_both_towers():
    img = unit(4, 8, 5).requires_grad_()
    txt = unit(8, 8, 6).requires_grad_()
    contrastive_loss(img, txt, torch.tensor(10.0), torch.arange(4).repeat_interleave(2)).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


def test_fare_loss_is_sum_over_dims_mean_over_batch():
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    assert fare_loss(b, a).item() == pytest.approx((9 + 9) / 2)
