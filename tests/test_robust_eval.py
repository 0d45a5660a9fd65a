"""RobustRetrievalEval: rows and keys, the inference-mode guard, export, and `mat robust-eval`."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from references import brute_force, encoder_from_checkpoint, hand_pgd_caption_cosine, split_recall, tr_r1_hits

from mat_lightning.attacks import PGD, BertAttack
from mat_lightning.cli import main
from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.errors import ConfigError
from mat_lightning.eval.robust import RobustRetrievalEval, robust_retrieval
from mat_lightning.module import MatModule
from mat_lightning.synthetic import data_args, ensure_mlm

REPO = Path(__file__).resolve().parents[1]


def loader(n=16, batch=6):
    dm = RetrievalDataModule(**data_args("tiny"), image_size=64, eval_batch_size=batch, max_eval_images=n)
    dm.setup("test")
    return dm.test_dataloader(), dm.eval_set("test")


def test_rows_match_a_direct_computation(tiny_encoder):
    """The clean and PGD rows against a hand-written PGD (sign ascent on the caption cosine, no random start) and
    recall by explicit loops over the whole split, including both attack-success definitions.

    Bugs caught: rows computed per batch and averaged (not on the whole split), images and captions misaligned across
    batches, the attack's budget or steps not applied, recall that counts ties as hits, asr_flip counted over the
    wrong queries.
    """
    dl, eval_set = loader()
    attack = PGD(eps_255=2, steps=3, step_255=1, random_start=False, objective="caption_cosine")
    rows = robust_retrieval(tiny_encoder, dl, [attack], progress=False)
    assert [r["attack"] for r in rows] == ["clean", "pgd"]
    adv = torch.cat(
        [
            hand_pgd_caption_cosine(tiny_encoder, b.images, b.captions, b.txt2img, 2 / 255, 1 / 255, 3)
            for b in dl
        ]
    )
    clean = torch.cat([b.images for b in dl])
    txt2img = eval_set.txt2img
    with torch.no_grad():
        text = tiny_encoder.encode_text(eval_set.captions)
        sim_clean, sim_adv = (
            tiny_encoder.encode_image(clean) @ text.T,
            tiny_encoder.encode_image(adv) @ text.T,
        )
    expected_clean, expected = brute_force(sim_clean, txt2img), brute_force(sim_adv, txt2img)
    assert expected["r_mean"] < expected_clean["r_mean"]  # the attack does something
    for k, v in expected_clean.items():
        assert rows[0][k] == pytest.approx(v), k
    for k, v in expected.items():
        assert rows[1][k] == pytest.approx(v), k
        assert rows[1][f"asr_drop_{k}"] == pytest.approx(expected_clean[k] - v), k
    hit_clean, hit_adv = tr_r1_hits(sim_clean, txt2img), tr_r1_hits(sim_adv, txt2img)
    flipped = sum(c and not a for c, a in zip(hit_clean, hit_adv, strict=True))
    assert rows[1]["asr_flip_tr_r1"] == pytest.approx(
        100 * flipped / sum(hit_clean)
    )  # share of the clean hits
    assert "seconds" in rows[1]


def test_eps_grid_and_text_attacks(tiny_encoder):
    dl, _ = loader(n=8, batch=8)
    rows = robust_retrieval(
        tiny_encoder,
        dl,
        [PGD(steps=2), BertAttack(mlm=str(ensure_mlm("tiny")), top_k=3)],
        [1, 4],
        progress=False,
    )
    # the configured budget (2) comes first: it is the attack's headline row; then the grid
    assert [(r["attack"], r["eps_255"]) for r in rows] == [
        ("clean", 0.0),
        ("pgd", 2.0),
        ("pgd", 1.0),
        ("pgd", 4.0),
        ("bert_attack", None),
    ]
    assert rows[3]["r_mean"] <= rows[2]["r_mean"] + 1e-9  # a larger budget never helps the model here


def test_export_writes_a_reusable_adversarial_set(tiny_encoder, tmp_path):
    dl, eval_set = loader(n=6, batch=4)
    robust_retrieval(tiny_encoder, dl, [PGD(eps_255=2, steps=2)], progress=False, export_dir=tmp_path)
    folder = tmp_path / "pgd_eps2"
    entries = json.loads((folder / "captions.json").read_text())
    assert len(entries) == 6 and entries[0]["caption"] == eval_set.records[0].captions
    x = torch.load(folder / "images" / "000000.pt", weights_only=True)
    assert x.shape == (3, 64, 64) and (folder / entries[0]["image"]).is_file()
    clean = eval_set[0][0].float() / 255
    assert (x - clean).abs().max() <= 2 / 255 + 1e-6


def test_guard_against_inference_mode(tiny_encoder, tmp_path):
    cb = RobustRetrievalEval(attacks=[PGD(steps=1)], progress=False)
    trainer = L.Trainer(
        inference_mode=True,
        callbacks=[cb],
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=1,
    )
    with pytest.raises(ConfigError, match="inference_mode: false"):
        trainer.test(MatModule(tiny_encoder), RetrievalDataModule(**data_args("tiny"), max_eval_images=4))


def test_callback_logs_keys_and_writes_files(tiny_encoder, tmp_path):
    cb = RobustRetrievalEval(attacks=[PGD(steps=2)], experiment="unit", progress=False)
    trainer = L.Trainer(
        inference_mode=False,
        callbacks=[cb],
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(MatModule(tiny_encoder), RetrievalDataModule(**data_args("tiny"), max_eval_images=8))
    for key in ("test/clean/tr_r1", "test/pgd/tr_r1", "test/pgd/asr_flip_ir_r1", "test/pgd/seconds"):
        assert key in trainer.callback_metrics
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["experiment"] == "unit" and results["n_images"] == 8 and len(results["rows"]) == 2


def test_mat_robust_eval_on_a_checkpoint(tmp_path, tiny_clip_path):
    tiny = [
        "--data.world=tiny",
        "--model.encoder.init_args.pretrained=synthetic:tiny",
        "--trainer.enable_progress_bar=false",
        "--data.max_eval_images=8",
    ]
    main(
        [
            "fit",
            *tiny,
            "--experiment=ft",
            "--run_root",
            str(tmp_path),
            "--trainer.max_epochs=3",
            # lr 0: validation recall never improves after epoch 0, the case where Lightning's save_last kept
            # the first epoch as last.ckpt
            "--model.lr=0",
        ]
    )
    ckpt = next((tmp_path / "ft").glob("*/checkpoints/last.ckpt"))
    (best,) = ckpt.parent.glob("epoch00-step*.ckpt")  # the best by clean recall, kept beside last.ckpt
    steps = [torch.load(f, map_location="cpu", weights_only=True)["global_step"] for f in (best, ckpt)]
    assert steps[1] == 3 * steps[0] > 0  # last.ckpt holds the final weights, after epoch 3
    main(
        [
            "robust-eval",
            *tiny,
            "--experiment=ev",
            "--run_root",
            str(tmp_path),
            "--ckpt_path",
            str(ckpt),
            "--robust_eval.attacks+=mat_lightning.attacks.PGD",
            "--robust_eval.attacks.steps=2",
            "--export",
            str(tmp_path / "adv"),
        ]
    )
    results = json.loads(next((tmp_path / "ev").glob("*/results.json")).read_text())
    assert [r["attack"] for r in results["rows"]] == ["clean", "pgd"]
    assert results["checkpoint"] == str(ckpt)
    assert (tmp_path / "adv" / "pgd_eps2" / "captions.json").is_file()


def test_any_checkpoint_under_any_defense_and_clear_errors(tmp_path, tiny_clip_path, tiny_test_split, capsys):
    """`mat robust-eval` on a FARE run's checkpoint evaluates that checkpoint's weights: its clean row equals recall
    computed by hand from the weights in the file (moved far from the start, so that the start weights would show).

    Bug caught: the checkpoint's hyperparameters read but the weights not loaded (or the FARE frozen copy's loaded
    into the encoder), the wrong split or number of images; a plain file named with exit 2.
    """
    tiny = [
        "--data.world=tiny",
        "--model.encoder.init_args.pretrained=synthetic:tiny",
        "--trainer.enable_progress_bar=false",
        "--data.max_eval_images=8",
    ]
    fare = [
        "--model.defense=mat_lightning.defenses.FARE",
        "--model.defense.attack=mat_lightning.attacks.PGD",
        "--model.defense.attack.steps=1",
    ]
    main(
        [
            "fit",
            *tiny,
            *fare,
            "--experiment=fare",
            "--run_root",
            str(tmp_path),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
        ]
    )
    # The checkpoint's encoder weights moved far from the start (noise), so that evaluating any other weights shows.
    trained = torch.load(next((tmp_path / "fare").glob("*/checkpoints/last.ckpt")), weights_only=False)
    g = torch.Generator().manual_seed(0)
    for key, value in trained["state_dict"].items():
        if key.startswith("encoder.") and value.is_floating_point() and value.dim() > 1:
            value.add_(0.02 * torch.randn(value.shape, generator=g))
    ckpt = tmp_path / "moved.ckpt"
    torch.save(trained, ckpt)
    main(
        ["robust-eval", *tiny, "--experiment=ev", "--run_root", str(tmp_path), "--ckpt_path", str(ckpt)]
    )  # clean config
    results = json.loads(next((tmp_path / "ev").glob("*/results.json")).read_text())
    images, captions = tiny_test_split
    expected = split_recall(encoder_from_checkpoint(ckpt, tiny_clip_path), images[:8], captions[:8])
    start = split_recall(encoder_from_checkpoint(None, tiny_clip_path), images[:8], captions[:8])
    assert expected != start  # the test tells the checkpoint's weights from the start weights
    assert {k: results["rows"][0][k] for k in expected} == pytest.approx(expected)
    assert results["weights"] == str(ckpt) and results["n_images"] == 8
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "robust-eval",
                *tiny,
                "--experiment=ev2",
                "--run_root",
                str(tmp_path),
                "--ckpt_path",
                str(tmp_path / "plain.pt"),
            ]
        )
    assert e.value.code == 2 and "not a Lightning checkpoint" in capsys.readouterr().err
