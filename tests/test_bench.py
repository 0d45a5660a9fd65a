"""The `make bench` rows added for the MAT step and TextAttack run end to end on tiny inputs (no timings asserted)."""

import pytest

from benchmarks.run import bench_mat_step, bench_textattack, changed_word
from mat_lightning.attacks.bert_attack import load_mlm
from mat_lightning.models.encoder import OpenClipEncoder
from mat_lightning.synthetic import ensure_clip, ensure_mlm, load_split


def test_changed_word():
    assert changed_word("a red box", "a red box") is None
    assert changed_word("a red box", "a blue box") == 1
    assert changed_word("a red box", "a red box top") == 3


@pytest.fixture(scope="module")
def tiny():
    images, captions = load_split("default", "test")
    encoder = OpenClipEncoder("mat-tiny", pretrained=str(ensure_clip("default"))).eval()
    return encoder, images[:6].float() / 255, [c[0] for c in captions[:6]]


def test_bench_mat_step_runs(tiny):
    encoder, images, captions = tiny
    out = bench_mat_step(encoder, images, captions, str(ensure_mlm("default")), reps=1)
    assert out["batch"] == 6 and out["texts_encoded"] > 6
    assert out["floor_units"] > 1 and out["mat_step_ratio"] > 0


def test_bench_textattack_runs(tiny):
    encoder, images, captions = tiny
    mlm, tok = load_mlm(str(ensure_mlm("default")))
    out = bench_textattack(encoder.eval(), mlm, tok, images, captions, reps=1)
    assert out["captions"] == 6 and out["speed_ratio"] > 0
    assert 0 <= out["same_word_changed_pct"] <= min(out["ours_changed_pct"], out["textattack_changed_pct"])
    # both attacks lower the caption-image cosine they minimise
    assert out["mean_cosine"]["ours"] < out["mean_cosine"]["clean"]
    assert out["mean_cosine"]["textattack"] < out["mean_cosine"]["clean"]
