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
    """The MAT-step row is made of what it says: the floor is the sum of its parts, the ratio is the MAT step over
    the floor, and the replayed work is what the batched attack did (one MLM top-k pass for the 6 captions; every
    caption, and at least one [UNK] variant per caption, encoded).

    Bugs caught: a part left out of the floor (or counted twice), the ratio taken against the clean step, the
    recorder missing the attack's calls (the floor then replays nothing), a text attack that runs the MLM per
    caption. No timing is asserted.
    """
    encoder, images, captions = tiny
    out = bench_mat_step(encoder, images, captions, str(ensure_mlm("default")), reps=1)
    assert out["batch"] == 6
    assert out["floor_units"] == pytest.approx(sum(out["floor_parts_units"].values()), abs=0.03)
    assert out["floor_parts_units"]["clean_step"] == 1.0
    assert out["mat_step_ratio"] == pytest.approx(
        out["mat_step_units"] / out["floor_units"], rel=0.02, abs=0.01
    )
    assert out["mlm_topk_passes"] == 1
    assert out["texts_encoded"] >= 6 + 6


def test_bench_textattack_runs(tiny):
    encoder, images, captions = tiny
    mlm, tok = load_mlm(str(ensure_mlm("default")))
    out = bench_textattack(encoder.eval(), mlm, tok, images, captions, reps=1)
    assert out["captions"] == 6 and out["speed_ratio"] > 0
    assert 0 <= out["same_word_changed_pct"] <= min(out["ours_changed_pct"], out["textattack_changed_pct"])
    # both attacks lower the caption-image cosine they minimise
    assert out["mean_cosine"]["ours"] < out["mean_cosine"]["clean"]
    assert out["mean_cosine"]["textattack"] < out["mean_cosine"]["clean"]
