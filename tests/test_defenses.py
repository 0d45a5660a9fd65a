"""Every defense trains: finite loss, the right towers move, attacks leave no gradients; MMCoA by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mat_lightning.attacks import PGD, BertAttack
from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.defenses import FARE, MAT, MAT1N, Clean, ImageAT, MMCoA, TeCoA, TextAT
from mat_lightning.defenses.base import batch_keys
from mat_lightning.module import MatModule
from mat_lightning.synthetic import data_args, ensure_mlm


def bert(**kw):
    return BertAttack(mlm=str(ensure_mlm("tiny")), top_k=5, **kw)


def pgd(**kw):
    return PGD(eps_255=2, steps=2, step_255=1, **kw)


DEFENSES = {
    "clean": lambda: Clean(),
    "image_at": lambda: ImageAT(pgd(), clean_weight=0.5),
    "tecoa": lambda: TeCoA(pgd()),
    "fare": lambda: FARE(pgd()),
    "text_at": lambda: TextAT(bert()),
    "mmcoa": lambda: MMCoA(bert(objective="embedding_kl"), pgd()),
    "mat": lambda: MAT(bert(), pgd()),
    "mat_1n": lambda: MAT1N(bert(), pgd()),
}


def batch_of(k: int, n: int = 8):
    dm = RetrievalDataModule(**data_args("tiny"), image_size=64, batch_size=n, captions_per_image=k)
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("name", list(DEFENSES))
def test_defense_trains_the_right_towers(name, tiny_encoder):
    defense = DEFENSES[name]()
    module = MatModule(tiny_encoder, defense, lr=1e-3)
    module.defense.prepare("cpu")
    batch = batch_of(k=2 if name == "mat_1n" else 1)
    vision = [p.detach().clone() for p in tiny_encoder.vision_parameters()]
    text = [p.detach().clone() for p in tiny_encoder.text_parameters()]
    reference = [p.detach().clone() for p in defense.reference.parameters()] if name == "fare" else []
    opt = torch.optim.AdamW([p for p in tiny_encoder.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        out = defense(tiny_encoder, batch)
        # the forward pass (attacks included) has not touched any parameter gradient
        assert all(p.grad is None for p in tiny_encoder.parameters())
        assert torch.isfinite(out.loss) and out.loss.requires_grad
        out.loss.backward()
        opt.step()
    assert tiny_encoder.training
    moved = lambda before, params: any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))  # noqa: E731
    assert moved(vision, tiny_encoder.vision_parameters())
    if defense.trains == ("vision",):
        assert not moved(text, tiny_encoder.text_parameters())
        assert all(not p.requires_grad for p in tiny_encoder.text_parameters())
    else:
        assert moved(text, tiny_encoder.text_parameters())
    if name == "fare":
        assert not moved(reference, defense.reference.parameters())
        assert not defense.reference.training


def test_mmcoa_loss_equals_hand_computation(tiny_encoder):
    batch = batch_of(k=1, n=6)
    defense = MMCoA(bert(objective="embedding_kl"), pgd(), lambda_text=0.7, lambda_image=1.3)
    out = defense(tiny_encoder, batch)
    # the same adversarial examples from identically seeded attacks
    adv_text = bert(objective="embedding_kl")(
        tiny_encoder, batch.images, batch.captions, batch.txt2img
    ).captions
    adv_img = pgd()(tiny_encoder, batch.images, batch.captions, batch.txt2img, **batch_keys(batch)).images
    scale = tiny_encoder.logit_scale
    labels = torch.arange(6)

    def clip(img, txt):
        logits = scale * tiny_encoder.encode_image(img) @ tiny_encoder.encode_text(txt).T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    expected = 0.7 * clip(batch.images, adv_text) + 1.3 * clip(adv_img, batch.captions)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_encoder.vision_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_encoder.text_parameters())


def test_mat_attacks_text_first_then_image_against_it(tiny_encoder):
    batch = batch_of(k=1, n=6)
    mat = MAT(bert(), pgd())
    images, captions = mat.adversarial_pair(tiny_encoder, batch)
    ref_captions = bert()(tiny_encoder, batch.images, batch.captions, batch.txt2img).captions
    ref_images = pgd()(
        tiny_encoder, batch.images, ref_captions, batch.txt2img, **batch_keys(batch)
    ).images  # against the adversarial text, per-sample keyed noise
    assert captions == ref_captions and torch.equal(images, ref_images)
    assert sum(a != b for a, b in zip(captions, batch.captions, strict=True)) >= 3
    assert (images - batch.images).abs().max() <= 2 / 255 + 1e-6
