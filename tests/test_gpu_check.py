"""`make gpu-check` runs end to end on the CPU with the tiny architecture (the GPU run differs only in size)."""

from __future__ import annotations

import json

import pytest


def test_gpu_check_measures_every_stage_and_projects_the_grid(tmp_path, capsys):
    from benchmarks.gpu_check import FLICKR_EPOCHS, FLICKR_TRAIN_IMAGES, TRAINED_DEFENSES, main

    result = main(["--tiny", "--batch", "8", "--eval-images", "8", "--steps", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "PROJECTION" in out and "images/s" in out
    rates = result["images_per_second"]
    assert set(rates) == {
        "train_clean",
        "train_mat",
        "train_mat_store",
        "eval_clean",
        "eval_pgd",
        "eval_bert_attack",
        "eval_sga",
    }
    assert all(r > 0 for r in rates.values())
    hours = result["projected_hours"]
    assert set(hours) == {*TRAINED_DEFENSES, "zeroshot"}
    # the projection is the measured rates times the grid's work
    train_mat = FLICKR_EPOCHS * FLICKR_TRAIN_IMAGES / rates["train_mat_store"] / 3600
    assert hours["mat"] - hours["zeroshot"] == pytest.approx(
        train_mat + 10 * 1000 / rates["eval_clean"] / 3600
    )
    assert result["projected_total_hours"] == pytest.approx(
        sum(hours.values()) + result["projected_store_seconds"] / 3600
    )
    assert result["projected_grid_hours_on_8_gpus"] >= max(hours.values())
    assert (
        result["text_attack_host_ms_per_caption"]["with_store"]
        < (result["text_attack_host_ms_per_caption"]["without_store"])
    )
    assert json.loads((tmp_path / "gpu_check.json").read_text())["model"] == "mat-tiny"


def test_gpu_check_without_a_gpu_projects_from_counted_flops(tmp_path, capsys):
    """--assume-tflops: rates from FLOP counts; more work per image (attacks) means a lower rate."""
    from benchmarks.gpu_check import main

    args = ["--tiny", "--batch", "4", "--eval-images", "4", "--steps", "1", "--out", str(tmp_path)]
    result = main([*args, "--assume-tflops", "100"])
    assert "FLOP-COUNT MODE" in capsys.readouterr().out
    assert result["assumed_tflops"] == 100
    rates = result["images_per_second"]
    assert rates["train_mat"] < rates["train_clean"]
    assert rates["eval_sga"] < rates["eval_pgd"] < rates["eval_clean"]
    assert rates["eval_bert_attack"] < rates["eval_clean"]
