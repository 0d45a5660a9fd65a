"""`make calibrate`'s table: flip rates beside the reference, and the verdict of each target."""

from __future__ import annotations

import pytest
import torch

from benchmarks.calibrate import REFERENCE, SYNONYM_MAX_DROP, SYNONYM_ROW, table


def row(attack: str, tr: float, ir: float, **extra) -> dict:
    return {"attack": attack, "eps_255": 2.0, "asr_flip_tr_r1": tr, "asr_flip_ir_r1": ir, **extra}


def test_targets_are_judged_against_the_reference():
    rows = [
        {"attack": "clean", "eps_255": 0.0, "tr_r1": 72.0, "ir_r1": 54.9},
        row("pgd", 80.9, 68.6),  # both exactly 10 points off: within
        row("bert_attack", 28.3, 49.2),  # IR 10.1 off: out
        row("sep_attack", 79.8, 86.8),
        row("co_attack", 93.3, 95.9),
        # sga not run
        {"attack": SYNONYM_ROW, "eps_255": None, "tr_r1": 67.0, "ir_r1": 50.0},
    ]
    text, verdict = table({"rows": rows, "n_images": 10})
    assert verdict == {
        "pgd": True,
        "bert_attack": False,
        "sep_attack": True,
        "co_attack": True,
        "sga": False,
        "clean": False,  # IR@1 54.9 < 55
        "synonym": True,  # drops 5.0 and 4.9
    }
    assert "| sga | – | 99.1 | – | 98.9 | not run |" in text
    assert "R@1 drop TR 5.0, IR 4.9" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert set(REFERENCE) == {"pgd", "bert_attack", "sep_attack", "co_attack", "sga"}


# The benchmark's world (`cnn`: its CLIP builds in ~4 min on 2 CPU cores) and the rich one (~12 min; on its first 200
# test images alone TR@1 lost 6.0: the rule holds on the whole split by a small margin on the TR side). Both cached.
@pytest.mark.slow
@pytest.mark.parametrize("world", ["cnn", "rich"])
def test_a_synonym_only_substitution_keeps_recall(world):
    """The calibration rule, checked apart from `make calibrate`'s run: the world's pretrained CLIP under a one-word
    synonym-only BERT-Attack (the world's thesaurus as its only candidates) loses at most 5 points of R@1 on the test
    split, while it substitutes in most captions."""
    from mat_lightning.attacks import BertAttack, ThesaurusCandidates
    from mat_lightning.eval.retrieval import recall_at_k, similarity
    from mat_lightning.models.encoder import OpenClipEncoder
    from mat_lightning.synthetic import assets, presets

    encoder = OpenClipEncoder(
        presets.preset(world).clip.model_name, pretrained=str(assets.ensure_clip(world))
    ).eval()
    images, captions = assets.load_split(world, "test")
    images = images.float() / 255
    flat = [c for caps in captions for c in caps]
    txt2img = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    attack = BertAttack(
        mlm=str(assets.ensure_mlm(world)),
        max_words=1,
        objective="image_cosine",
        candidate_generator=ThesaurusCandidates(str(assets.ensure_thesaurus(world))),
    )
    with torch.no_grad():
        img = encoder.encode_image(images)
        clean = recall_at_k(similarity(img, encoder.encode_text(flat)), txt2img)
    adv = attack(encoder, images, flat, txt2img).captions
    assert sum(a != c for a, c in zip(adv, flat, strict=True)) > len(flat) // 2  # it did substitute
    with torch.no_grad():
        attacked = recall_at_k(similarity(img, encoder.encode_text(adv)), txt2img)
    for key in ("tr_r1", "ir_r1"):
        assert clean[key] - attacked[key] <= SYNONYM_MAX_DROP, (key, clean, attacked)
