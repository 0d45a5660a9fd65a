"""Every defense trains: finite loss, the right towers move, attacks leave no gradients; MMCoA by hand."""

from __future__ import annotations

import pytest
import torch

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


class FixedAdversary:
    """An attack that returns hand-made adversarial inputs (images and/or captions), whatever it is given."""

    def __init__(self, images=None, captions=None):
        self.images, self.captions = images, captions

    def __call__(self, encoder, images, captions, txt2img, **keys):
        from mat_lightning.attacks.base import AttackResult

        return AttackResult(
            self.images if self.images is not None else images,
            self.captions if self.captions is not None else captions,
        )


def test_mmcoa_loss_equals_hand_computation(tiny_encoder):
    """λ_t·CLIP(clean image, adversarial text) + λ_i·CLIP(adversarial image, clean text) on fixed hand-made
    adversarial inputs, against the CLIP loss written out (log-sum-exp per row and per column).

    Bugs caught: the terms paired as MAT's (adversarial image with adversarial text), the weights swapped, one
    direction of the CLIP loss dropped, the logit scale left out.
    """
    batch = batch_of(k=1, n=6)
    g = torch.Generator().manual_seed(3)
    adv_img = (batch.images + (2 / 255) * torch.randint(-1, 2, batch.images.shape, generator=g)).clamp(0, 1)
    swaps = {"a ": "one ", "left": "right", "above": "below"}
    adv_text = []
    for caption in batch.captions:  # one word changed by hand
        old = next(w for w in swaps if w in caption + " ")
        adv_text.append((caption + " ").replace(old, swaps[old], 1).strip())
    assert adv_text != batch.captions
    defense = MMCoA(FixedAdversary(captions=adv_text), FixedAdversary(images=adv_img), 0.7, 1.3)
    out = defense(tiny_encoder, batch)

    def clip(images, captions):
        img, txt = tiny_encoder.encode_image(images), tiny_encoder.encode_text(captions)
        logits = tiny_encoder.logit_scale * img @ txt.T
        n = len(captions)
        i2t = sum(logits[i].logsumexp(0) - logits[i, i] for i in range(n)) / n
        t2i = sum(logits[:, j].logsumexp(0) - logits[j, j] for j in range(n)) / n
        return (i2t + t2i) / 2

    expected = 0.7 * clip(batch.images, adv_text) + 1.3 * clip(adv_img, batch.captions)
    torch.testing.assert_close(out.loss, expected)
    # ... and not MAT's pairing, which a buggy MMCoA would compute
    assert not torch.allclose(out.loss, 0.7 * clip(adv_img, adv_text) + 1.3 * clip(adv_img, batch.captions))
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
