"""`mat eval`, the experiment files and the budget flags mean one thing; defaults follow the world (issue 21).

Every test goes through the real ``mat`` entry point (:func:`mat_lightning.cli.main`) on the tiny world.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from mat_lightning.attacks import PGD, BertAttack
from mat_lightning.cli import MatCLI
from mat_lightning.eval.robust import RobustRetrievalEval
from mat_lightning.main import PAPERS_FIVE, main

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--robust_eval.progress=false"]
TINY = ["--data.world=tiny", "--model.encoder.init_args.pretrained=synthetic:tiny", *QUIET]
SYNTHETIC_SUITE = "pgd,bert_attack,bert_attack_synonym,bert_attack_strong,sep_attack,co_attack,sga"


def rows_without_time(run: Path) -> list[dict]:
    rows = json.loads((run / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_custom_eval_yaml_and_mat_eval_give_identical_rows(tmp_path, tiny_world, tiny_clip_path, tiny_mlm):
    """`mat robust-eval --config experiments/custom_eval.yaml` == `mat eval --dataset custom` on the same images and
    weights. Catches the two drifting apart (issue 21.2: the YAML attacked with in-batch `contrastive` at batch 16
    and another Co-Attack start, so PGD TR@1 read 40.0 there and 45.0 in `mat eval`)."""
    data = [f"--data.root={tiny_world.parent}", f"--data.annotations={tiny_world}"]
    main(
        [
            "robust-eval",
            "--config",
            str(REPO / "experiments" / "custom_eval.yaml"),
            *data,
            "--model.encoder.init_args.model_name=mat-tiny",
            f"--model.encoder.init_args.pretrained={tiny_clip_path}",
            f"--robust_eval.mlm={tiny_mlm}",
            "--data.max_eval_images=4",
            f"--run_root={tmp_path / 'yaml'}",
            *QUIET,
        ]
    )
    main(
        [
            "eval",
            "--model=mat-tiny",
            f"--pretrained={tiny_clip_path}",
            "--dataset=custom",
            f"--dataset_root={tiny_world.parent}",
            f"--annotations={tiny_world}",
            f"--mlm={tiny_mlm}",
            "--max_images=4",
            "--batch_size=4",  # another batch size: the rows must not depend on it
            f"--run_root={tmp_path / 'eval'}",
            *QUIET,
        ]
    )
    (yaml_run,) = (tmp_path / "yaml" / "custom_eval").glob("*")
    (eval_run,) = (tmp_path / "eval" / "eval_mat-tiny_custom").glob("*")
    from_yaml, from_eval = rows_without_time(yaml_run), rows_without_time(eval_run)
    assert [r["attack"] for r in from_yaml] == ["clean", *PAPERS_FIVE.split(",")]
    assert from_yaml == from_eval
    settings = [json.loads((run / "results.json").read_text())["attacks"] for run in (yaml_run, eval_run)]
    assert settings[0] == settings[1]
    assert settings[0]["co_attack"]["image_attack"]["random_start"] == "one_sided"  # bert_base_suite.yaml's


def budgets(attacks) -> list[tuple]:
    """(row, part, ε, step, words) of every attack and part: what the budget flags change."""
    out = []
    for a in attacks:
        for part in (a, getattr(a, "image_attack", None), getattr(a, "text_attack", None)):
            if part is None or part.modality == "multimodal":
                continue
            out.append(
                (
                    a.name,
                    part.name,
                    part.eps_255,
                    getattr(part, "step_255", None),
                    part.__dict__.get("max_words"),
                )
            )
    return out


@pytest.fixture()
def built(monkeypatch):
    """Run ``mat <command>`` up to the built objects (config parsed, classes instantiated), then stop."""
    seen: list[MatCLI] = []
    monkeypatch.setattr(MatCLI, "_run_subcommand", lambda self, subcommand: seen.append(self))

    def run(argv: list[str]) -> MatCLI:
        main(argv)
        return seen[-1]

    return run


def eval_attacks_of(cli: MatCLI):
    return next(c for c in cli.trainer.callbacks if isinstance(c, RobustRetrievalEval)).attacks


def test_budget_flags_build_the_same_attacks_in_every_command(tmp_path, tiny_clip_path, built):
    """`--robust_eval.eps_255=4 --robust_eval.max_words=2` (robust-eval, fit) and `mat eval --eps_255 4 --max_words 2`
    build the same attacks: every image part at ε = 4 with its step scaled by 4/2, every text part at 2 words; fit's
    `--model.defense.eps_255/max_words` change the training attacks by the same rule. Catches a flag that reaches
    only some parts, a command that scales the step and another that keeps it (issue 21.3), and a per-attack
    setting that the suite-level flag no longer overrides."""
    flags = ["--robust_eval.eps_255=4", "--robust_eval.max_words=2"]
    root = [f"--run_root={tmp_path}"]
    robust_eval = built(["robust-eval", "--config", SMOKE, *TINY, *flags, *root])
    fit = built(
        ["fit", "--config", SMOKE, *TINY, *flags, *root, "--model.defense=MAT"]
        + ["--model.defense.eps_255=4", "--model.defense.max_words=2"]
    )
    one_call = ["eval", "--dataset=synthetic", "--world=tiny", f"--attacks={SYNTHETIC_SUITE}", *QUIET, *root]
    mat_eval = built([*one_call, "--eps_255=4", "--max_words=2"])
    # conf/attack/synthetic_suite.yaml, by hand: PGD 10 x 0.5/255 at 2/255 (Co-Attack's part 10 x 0.25/255) becomes
    # 10 x 1/255 (0.5/255) at 4/255; BERT-Attack 1, 3 (synonyms) and 2 (strong) words all become 2
    expected = [
        ("pgd", "pgd", 4.0, 1.0, None),
        ("bert_attack", "bert_attack", None, None, 2),
        ("bert_attack_synonym", "bert_attack_synonym", None, None, 2),
        ("bert_attack_strong", "bert_attack_strong", None, None, 2),
        ("sep_attack", "pgd", 4.0, 1.0, None),
        ("sep_attack", "bert_attack", None, None, 2),
        ("co_attack", "pgd", 4.0, 0.5, None),
        ("co_attack", "bert_attack", None, None, 2),
        ("sga", "pgd", 4.0, 1.0, None),
        ("sga", "bert_attack", None, None, 2),
    ]
    for cli in (robust_eval, fit, mat_eval):
        assert budgets(eval_attacks_of(cli)) == expected
    defense = fit.model.defense
    # the paper's training attack, PGD 2 x 1/255 at 2/255 -> 2 x 2/255 at 4/255; BERT-Attack 1 -> 2 words
    assert (defense.image_attack.eps_255, defense.image_attack.step_255, defense.image_attack.steps) == (
        4,
        2,
        2,
    )
    assert defense.text_attack.max_words == 2
    # without the flags: the suite as written
    plain = budgets(eval_attacks_of(built([*one_call])))
    assert plain[0] == ("pgd", "pgd", 2.0, 0.5, None) and plain[2][-1] == 3
    # a per-attack setting is still possible, and sets exactly what it says (no step rule)
    own = "[{class_path: PGD, init_args: {eps_255: 4, step_255: 0.5}}]"
    per_attack = built(["robust-eval", *TINY, *root, f"--robust_eval.attacks={own}"])
    assert budgets(eval_attacks_of(per_attack)) == [("pgd", "pgd", 4.0, 0.5, None)]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_budget_flag_is_one_line_naming_it(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "robust-eval",
                "--config",
                SMOKE,
                *TINY,
                f"--run_root={tmp_path}",
                f"--robust_eval.eps_255={value}",
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "robust_eval.eps_255" in err and "Traceback" not in err


def test_mat_eval_speaks_clip_benchmark(tmp_path, tiny_clip_path, capsys):
    """CLIP_benchmark's option names, the world's CLIP by default on synthetic data, a run name per data set,
    `--output`, old spellings with one deprecation line; a wrong option is named, not its value."""
    out_file = tmp_path / "metrics" / "tiny.json"
    main(
        [
            "eval",
            "--dataset",
            "synthetic",
            "--world",
            "tiny",
            "--task",
            "zeroshot_retrieval",
            "--attacks",
            "pgd,bert_attack",
            "--eps_255",
            "1",
            "--max-images",  # the old spelling
            "8",
            "--batch_size",
            "4",
            "--run_root",
            str(tmp_path),
            "--output",
            str(out_file),
            *QUIET,
        ]
    )
    (run,) = (tmp_path / "eval_mat-tiny_synthetic-tiny").glob("*")
    results = json.loads((run / "results.json").read_text())
    assert [(r["attack"], r["eps_255"]) for r in results["rows"]] == [
        ("clean", 0.0),
        ("pgd", 1.0),
        ("bert_attack", None),
    ]
    assert results["attacks"]["pgd"]["step_255"] == 0.25  # 0.5/255 at 2/255, scaled to ε = 1/255
    assert results["n_images"] == 8 and results["eval_batch_size"] == 4 and results["complete"] is True
    assert json.loads(out_file.read_text()) == results
    cfg = yaml.safe_load((run / "config.yaml").read_text())  # the same config an experiment file gives
    assert cfg["robust_eval"]["attacks"][1]["init_args"]["mlm"] == "synthetic"
    assert cfg["model"]["encoder"]["init_args"]["pretrained"] == "synthetic"
    captured = capsys.readouterr()
    assert (
        captured.err.count("deprecated") == 1
        and "--max-images is deprecated, use --max_images" in captured.err
    )
    lines = captured.out.rstrip().splitlines()
    assert lines[-1] == f"run folder: {run}" and "| pgd" in captured.out
    for argv, named in (
        (["--dataset_rot", "/tmp"], "unknown option --dataset_rot"),
        (["--dataset_root", "/tmp", "/tmp/b"], "unexpected argument '/tmp/b'"),
        (["--dataset_root", "/tmp"], "needs --model and --pretrained"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--dataset", "custom", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and named in err, err


def test_print_config_shows_the_defaults_that_follow_the_world(capsys):
    """`--model.defense=MAT` with its attacks unset: --print_config spells them out, with the world's masked LM
    on synthetic data and bert-base-uncased on real data (issue 21.10: it printed `text_attack: null`, and the run
    failed to download bert-base-uncased on the synthetic world)."""
    shown = {}
    for dataset in ("synthetic", "flickr30k"):
        with pytest.raises(SystemExit) as e:
            main(
                ["fit", "--config", SMOKE, "--model.defense=MAT", f"--data.dataset={dataset}"]
                + ["--robust_eval.attacks=[{class_path: SGA}]", "--print_config"]
            )
        assert e.value.code == 0
        shown[dataset] = yaml.safe_load(capsys.readouterr().out)
    defense = shown["synthetic"]["model"]["defense"]["init_args"]
    text, image = defense["text_attack"], defense["image_attack"]
    assert text["class_path"].endswith("BertAttack") and text["init_args"]["mlm"] == "synthetic"
    assert text["init_args"]["max_words"] == 1 and text["init_args"]["top_k"] == 10
    assert image["class_path"].endswith("PGD")
    assert [image["init_args"][k] for k in ("eps_255", "steps", "step_255")] == [2, 2, 1]
    sga = shown["synthetic"]["robust_eval"]["attacks"][0]["init_args"]
    assert (
        sga["text_attack"]["init_args"]["mlm"] == "synthetic"
        and sga["image_attack"]["init_args"]["steps"] == 10
    )
    real = shown["flickr30k"]["model"]["defense"]["init_args"]["text_attack"]["init_args"]
    assert real["mlm"] == "bert-base-uncased"
    # the Python defaults are the ones printed
    assert isinstance(defense_default := BertAttack(max_words=1), BertAttack) and defense_default.top_k == 10
    assert PGD(eps_255=2, steps=2, step_255=1).step_255 == image["init_args"]["step_255"]


def test_short_runs_keep_one_checkpoint_and_warn_nothing(tmp_path, tiny_clip_path):
    """A 1-step MAT run (the MLM default follows the world: no download) stops before any validation: no warning
    about the monitored key, and only last.ckpt. A 1-epoch run ends on its best epoch: last.ckpt is a link to the
    best file (one 40 MB file on the default world, not two identical ones), which --test_ckpt=best tests."""
    common = ["fit", *TINY, "--data.max_eval_images=8", "--robust_eval.attacks=[]"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(
            [*common, "--model.defense=MAT", "--trainer.max_steps=1", "--data.batch_size=8"]
            + [f"--run_root={tmp_path / 'step'}"]
        )
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "monitored key" in m], messages
    (folder,) = (tmp_path / "step").glob("*/*/checkpoints")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]

    main(
        [*common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--test_ckpt=best"]
        + [f"--run_root={tmp_path / 'epoch'}"]
    )
    (folder,) = (tmp_path / "epoch").glob("*/*/checkpoints")
    (best,) = folder.glob("epoch00-step2.ckpt")
    last = folder / "last.ckpt"
    assert last.is_symlink() and not best.is_symlink() and os.readlink(last) == best.name
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    results = json.loads((folder.parent / "results.json").read_text())
    assert results["weights"] == "best"
