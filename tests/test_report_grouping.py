"""`mat report`: which runs are replicates (issue 21 items 1 and 9, issue 23 item 3, issue 25 item 3).

Every expected number is computed by hand from the values the test writes: mean and sample std (n-1) of two
values a and b are (a+b)/2 and |a-b|/sqrt(2).
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from mat_lightning.eval import provenance
from mat_lightning.eval.table import GROUP_FIELDS, find_results
from mat_lightning.main import main

#: A config as the CLI records it (flattened settings), before the seed and the run folder are taken out.
CONFIG = {
    "seed_everything": 0,
    "experiment": "smoke",
    "run_root": "runs",
    "trainer": {
        "max_steps": -1,
        "max_epochs": 2,
        "default_root_dir": "runs/smoke/x",
        "logger": {"offline": True},
    },
    "model": {"lr": 1e-4, "encoder": {"init_args": {"model_name": "mat-tiny", "pretrained": "synthetic"}}},
    "data": {"dataset": "synthetic", "num_workers": 0},
    "robust_eval": {"seed": 0, "progress": True, "experiment": "smoke"},
}


def settings(seed=0, run_dir="runs/smoke/x", **changes) -> dict:
    config = json.loads(json.dumps(CONFIG))
    config["seed_everything"] = config["robust_eval"]["seed"] = seed
    config["trainer"]["default_root_dir"] = run_dir
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def write(
    folder, seed, tr1, *, time="2026-12-05T08:00:00.000000Z", config=None, experiment="smoke", **fields
):
    """A run folder holding results.json: clean TR@1 = tr1, PGD TR@1 = tr1 - 30; recorded the way the CLI
    records it (config hash of the settings without the seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = settings(seed, str(folder)) if config is None else config
    run_settings = provenance.run_settings(config, fields.get("model_sha256"))
    payload = {
        "experiment": experiment,
        "seed": seed,
        "n_images": 100,
        "complete": True,
        "written_utc": time,
        "config_hash": provenance.config_hash(run_settings),
        "config": run_settings,
        **fields,
        "rows": [
            {"attack": "clean", "eps_255": 0.0, "tr_r1": tr1, "ir_r1": tr1 - 10},
            {"attack": "pgd", "eps_255": 2.0, "tr_r1": tr1 - 30, "ir_r1": tr1 - 40},
        ],
    }
    (folder / "results.json").write_text(json.dumps(payload))
    return folder / "results.json"


def report(capsys, *paths, extra=()) -> tuple[dict[str, list[str]], str]:
    """{row label: cells after the label} of the Markdown table, and stderr (the notes)."""
    main(["report", *map(str, paths), "--metrics", "tr_r1", *extra])
    captured = capsys.readouterr()
    rows = {}
    for line in captured.out.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows, captured.err


def test_make_seeds_after_earlier_seed0_runs_gives_n2_of_the_two_seeds(tmp_path, capsys):
    """Issue 21's sequence: earlier seed-0 runs, then `make seeds SEEDS="0 1"`: n = 2, the newest seed-0 run and
    the seed-1 run. Bugs caught: averaging every run (n = 5: 64.8 ± 1.1), keeping the oldest run of a seed
    (65.0, 66.0 -> 65.5 ± 0.7), the last by folder name, not saying which runs were skipped."""
    for i, tr1 in enumerate((65.0, 64.0, 66.0)):  # earlier runs of the same experiment, seed 0
        write(tmp_path / f"old{i}", 0, tr1, time=f"2026-12-05T07:0{i}:00.000000Z")
    # the newest seed-0 run sorts first by path: newest means by the time it was written, not by folder name
    write(tmp_path / "a_s0", 0, 63.0, time="2026-12-05T08:00:00.000000Z")
    write(tmp_path / "s1", 1, 66.0, time="2026-12-05T08:05:00.000000Z")
    rows, err = report(capsys, tmp_path)
    # seeds 63.0 and 66.0: mean 64.5, std 3/sqrt(2) = 2.12; PGD 33.0 and 36.0
    assert rows == {"smoke": ["2", "0-1", "100", "64.5 ± 2.1", "34.5 ± 2.1"]}
    assert "smoke: 3 run(s) skipped, each an older run of a seed already counted" in err
    for i in range(3):
        assert str(tmp_path / f"old{i}" / "results.json") in err


def test_runs_whose_training_settings_differ_are_rows_labelled_by_what_differs(tmp_path, capsys):
    """Issue 21: one more run with `--trainer.max_steps=2 --model.lr=1e-3` is its own row, labelled by those two
    settings, never averaged into the seeds (the bug: n = 3). Run folders, seeds, W&B and progress settings differ
    between the seeds and do not split them (the bug: one row per seed)."""
    write(tmp_path / "a", 0, 60.0)
    config_b = settings(1, "elsewhere", trainer__logger={"offline": False}, robust_eval__progress=False)
    write(tmp_path / "b", 1, 64.0, config=config_b)
    write(tmp_path / "c", 0, 20.0, config=settings(0, "c", trainer__max_steps=2, model__lr=1e-3))
    rows, err = report(capsys, tmp_path)
    assert rows == {
        "smoke [lr=0.0001, max_steps=-1]": ["2", "0-1", "100", "62.0 ± 2.8", "32.0 ± 2.8"],
        "smoke [lr=0.001, max_steps=2]": ["1", "0", "100", "20.0", "-10.0"],
    }
    assert "they differ in settings (model.lr, trainer.max_steps)" in err


def test_the_same_file_never_counts_twice(tmp_path, capsys):
    """Issue 23: `mat report F F`, a folder plus a file in it, and a symlink to a run folder count one run (the
    bug: n = 2 with std 0.0)."""
    f = write(tmp_path / "runs" / "a", 0, 60.0)
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "a")
    # the file list itself, not only the one-run-per-seed rule behind it
    assert find_results([f, f, tmp_path / "runs", tmp_path / "link" / "results.json"]) == [f]
    for paths in ((f, f), (tmp_path / "runs", f), (tmp_path / "runs", tmp_path / "link" / "results.json")):
        rows, _ = report(capsys, *paths)
        assert rows == {"smoke": ["1", "0", "100", "60.0", "30.0"]}


def test_two_runs_of_one_seed_are_one_replicate_the_newest(tmp_path, capsys):
    """Issue 23: a concurrent pair (`make seeds SEEDS="0 0"`) or a re-run of one seed is n = 1, the newer run,
    not n = 2 ± 0.0 (or the mean of both, 61.0 ± 1.4)."""
    write(tmp_path / "z_first", 0, 60.0, time="2026-12-05T08:00:00.000000Z")
    write(tmp_path / "a_rerun", 0, 62.0, time="2026-12-05T08:00:01.000000Z")
    rows, err = report(capsys, tmp_path)
    assert rows == {"smoke": ["1", "0", "100", "62.0", "32.0"]}
    assert f"{tmp_path / 'z_first' / 'results.json'} (seed 0)" in err


def test_a_killed_run_never_counts(tmp_path, capsys):
    """Issue 23: results.json with complete: false (killed mid-evaluation) is skipped, even when it is the newest
    run of its seed (the bug: its partial rows averaged in, or it replacing the complete run)."""
    write(tmp_path / "done", 0, 60.0, time="2026-12-05T08:00:00.000000Z")
    write(tmp_path / "s1", 1, 64.0)
    killed = write(tmp_path / "killed", 0, 10.0, time="2026-12-05T09:00:00.000000Z", complete=False)
    write(tmp_path / "killed1", 2, 10.0, complete=False)
    rows, err = report(capsys, tmp_path)
    assert rows == {"smoke": ["2", "0-1", "100", "62.0 ± 2.8", "32.0 ± 2.8"]}
    assert "2 incomplete run(s) skipped" in err and str(killed) in err
    with pytest.raises(SystemExit) as e:
        report(capsys, killed)
    assert e.value.code == 2


def test_identical_weights_through_another_cache_path_are_one_model(tmp_path, capsys):
    """Issues 21.9 and 23: the model is grouped by the content hash of its weights; the same hash under two cache
    paths (a symlinked cache) is one row, another hash another row (labelled by name and hash). The bug: grouping
    by the recorded path (two rows), or by the name only (different weights averaged)."""
    for name, seed, path, digest, tr1 in (
        ("a", 0, "/cache/clip-1.pt", "a" * 16, 60.0),
        ("b", 1, "/link/cache/clip-1.pt", "a" * 16, 64.0),
        ("c", 0, "/cache/clip-1.pt", "b" * 16, 30.0),
    ):
        config = settings(
            seed, name, model__encoder={"init_args": {"model_name": "mat-tiny", "pretrained": path}}
        )
        write(tmp_path / name, seed, tr1, config=config, model="mat-tiny/clip-1.pt", model_sha256=digest)
    rows, err = report(capsys, tmp_path)
    assert rows == {
        "smoke (model=mat-tiny/clip-1.pt@aaaaaaaa)": ["2", "0-1", "100", "62.0 ± 2.8", "32.0 ± 2.8"],
        "smoke (model=mat-tiny/clip-1.pt@bbbbbbbb)": ["1", "0", "100", "30.0", "0.0"],
    }


def test_old_results_without_a_hash_group_by_their_config_yaml(tmp_path, capsys):
    """Results written before config_hash: the config.yaml beside each decides (its seed and run folder do not);
    without one, the recorded fields alone, with a note. Bug caught: old runs of different lr averaged."""
    for name, seed, lr, tr1 in (("a", 0, 1e-4, 60.0), ("b", 1, 1e-4, 66.0), ("c", 0, 1e-3, 10.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps(
                {
                    "experiment": "smoke",
                    "seed": seed,
                    "n_images": 100,
                    "rows": [{"attack": "clean", "eps_255": 0.0, "tr_r1": tr1, "ir_r1": tr1}],
                }
            )
        )
        config = settings(seed, f"runs/smoke/{name}", model__lr=lr)
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    rows, _ = report(capsys, tmp_path)
    assert rows == {
        "smoke [lr=0.0001]": ["2", "0-1", "100", "63.0 ± 4.2"],
        "smoke [lr=0.001]": ["1", "0", "100", "10.0"],
    }
    for name in "abc":
        (tmp_path / name / "config.yaml").unlink()
    # one group; seed 0's newer file (c, written last; ties broken by path) and seed 1: 10.0 and 66.0
    rows, err = report(capsys, tmp_path)
    assert rows == {"smoke": ["2", "0-1", "100", "38.0 ± 39.6"]}
    assert "record no config hash and have no config.yaml" in err


#: One value per grouping field for run A and one for run B (README "mat report": the eight fields).
FIELD_VALUES = {
    "dataset": ("synthetic", "flickr30k"),
    "split": ("test", "val"),
    "n_images": (100, 64),
    "weights": ("final", "best"),
    "subcommand": ("fit", "robust-eval"),
    "attacks": ({"pgd": {"eps_255": 2.0}}, {"pgd": {"eps_255": 4.0}}),
    "eps_255_grid": ([1.0, 2.0], [2.0, 4.0]),
    "model": ("mat-tiny/synthetic", "ViT-B-32/openai"),
}


def test_every_grouping_field_is_tested():
    assert set(FIELD_VALUES) == set(GROUP_FIELDS) and len(GROUP_FIELDS) == 8


@pytest.mark.parametrize("field", list(FIELD_VALUES))
def test_each_grouping_field_separates_and_labels_rows(tmp_path, capsys, field):
    """Issue 25: two seeds alike in `field` average (n = 2); a third run that differs only in `field` is its own
    row, labelled by that field, and the note names it. Bug caught: a field left out of the key (n = 3, mean
    44.7), or labelled by another field."""
    a, b = FIELD_VALUES[field]
    write(tmp_path / "s0", 0, 60.0, **{field: a})
    write(tmp_path / "s1", 1, 64.0, **{field: a})
    write(tmp_path / "other", 0, 10.0, **{field: b})
    rows, err = report(capsys, tmp_path)
    if field in ("attacks", "eps_255_grid"):  # long values: numbered in sorted order of their JSON
        first, second = sorted([json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True)])
        label_a = f"smoke ({field} #{1 + [first, second].index(json.dumps(a, sort_keys=True))})"
        label_b = f"smoke ({field} #{1 + [first, second].index(json.dumps(b, sort_keys=True))})"
    else:
        label_a, label_b = f"smoke ({field}={a})", f"smoke ({field}={b})"
    n_images = {"n_images": (str(a), str(b))}.get(field, ("100", "100"))
    assert rows == {
        label_a: ["2", "0-1", n_images[0], "62.0 ± 2.8", "32.0 ± 2.8"],
        label_b: ["1", "0", n_images[1], "10.0", "-20.0"],
    }
    assert f"smoke: 3 runs in 2 groups, not averaged together: they differ in {field}" in err


def test_run_settings_leave_out_only_the_seed_and_output_settings():
    """The hash is over everything but the seed and output/logging settings; the weights' paths become their
    content hash. Bugs caught: a training setting excluded (lr), the seed or the run folder included."""
    base = provenance.run_settings(settings(0, "runs/a"))
    assert provenance.run_settings(settings(7, "runs/b", trainer__logger={"x": 1})) == base
    assert "model.lr" in base and "seed_everything" not in base and "trainer.default_root_dir" not in base
    lr = provenance.run_settings(settings(0, "runs/a", model__lr=1e-3))
    assert provenance.config_hash(lr) != provenance.config_hash(base)
    hashed = provenance.run_settings(settings(0, "runs/a"), model_sha256="ab" * 8)
    assert "model.encoder.init_args.pretrained" not in hashed
    assert hashed["model.encoder.weights_sha256"] == "ab" * 8


def test_weights_hash_is_of_the_content_not_the_file(tmp_path):
    """Same tensors (another dict, another key order, saved and loaded through a symlink) -> same hash; one
    changed value, dtype or name -> another. Bug caught: hashing a path or only shapes."""
    import torch

    w = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(w, tmp_path / "w.pt")
    os.symlink(tmp_path / "w.pt", tmp_path / "link.pt")
    loaded = torch.load(tmp_path / "link.pt", weights_only=True)
    digest = provenance.weights_sha256(w)
    assert provenance.weights_sha256({"b": loaded["b"], "a": loaded["a"]}) == digest
    changed = {"a": w["a"].clone(), "b": w["b"]}
    changed["a"][1, 2] = 5.5
    assert provenance.weights_sha256(changed) != digest
    assert provenance.weights_sha256({"a": w["a"].double(), "b": w["b"]}) != digest
    assert provenance.weights_sha256({"c": w["a"], "b": w["b"]}) != digest


def test_git_state_outside_a_checkout_is_none(tmp_path):
    assert provenance.git_state(str(tmp_path)) is None


ATTACKS_YAML = """
robust_eval:
  attacks:
    - class_path: mat_lightning.attacks.BertAttack
      init_args:
        name: bert_attack_synonym
        max_words: 1
        candidate_generator:
          class_path: mat_lightning.attacks.ThesaurusCandidates
          init_args: {thesaurus: synthetic}
"""


def test_results_record_provenance_that_travels_and_seeds_group(
    tmp_path, tiny_clip_path, monkeypatch, capsys
):
    """Through the real CLI: two `mat robust-eval` runs, seeds 0 and 1, the second through a symlink to the
    asset cache. results.json records the model's name (not its cache path) and its weights' content hash, the
    same config hash for both seeds, git commit, versions and UTC times, and the thesaurus BERT-Attack's real
    settings (no MLM; the thesaurus by name and content hash). `mat report` makes them one row, n = 2.
    Bugs caught: cache paths recorded (two rows), the seed in the hash, `mlm: bert-base-uncased` recorded for a
    thesaurus attack."""
    import subprocess

    import torch

    cache = os.path.realpath(os.environ["MAT_CACHE_DIR"])
    (tmp_path / "cache-link").symlink_to(cache)
    (tmp_path / "attacks.yaml").write_text(ATTACKS_YAML)
    tiny = [
        "--data.world=tiny",
        "--model.encoder.init_args.pretrained=synthetic:tiny",
        "--data.max_eval_images=8",
    ]
    quiet = ["--trainer.enable_progress_bar=false", "--robust_eval.progress=false"]
    for seed, cache_dir in ((0, cache), (1, str(tmp_path / "cache-link"))):
        monkeypatch.setenv("MAT_CACHE_DIR", cache_dir)
        main(
            [
                "robust-eval",
                *tiny,
                *quiet,
                f"--config={tmp_path / 'attacks.yaml'}",
                f"--seed_everything={seed}",
            ]
            + ["--experiment=prov", f"--run_root={tmp_path / 'runs'}"]
        )
    files = sorted((tmp_path / "runs" / "prov").glob("*/results.json"))
    text = [f.read_text() for f in files]
    a, b = map(json.loads, text)
    assert (a["seed"], b["seed"]) == (0, 1) and a["complete"] and b["complete"]
    assert a["model"] == b["model"] == "mat-tiny/synthetic:tiny"
    assert a["model_sha256"] == b["model_sha256"] and len(a["model_sha256"]) == 16
    assert (
        a["weights_sha256"] == a["model_sha256"]
    )  # robust-eval without a checkpoint tests the start weights
    assert a["config_hash"] == b["config_hash"] == provenance.config_hash(a["config"])
    assert "model.encoder.init_args.pretrained" not in a["config"] and "seed_everything" not in a["config"]
    assert all(cache not in t and str(tmp_path / "cache-link") not in t for t in text)
    synonym = a["attacks"]["bert_attack_synonym"]
    assert "mlm" not in synonym and "threshold_pred_score" not in synonym and synonym["max_words"] == 1
    thesaurus = synonym["candidate_generator"]["thesaurus"]
    assert thesaurus == b["attacks"]["bert_attack_synonym"]["candidate_generator"]["thesaurus"]
    assert thesaurus.startswith("thesaurus") and " sha256:" in thesaurus and "/" not in thesaurus
    assert (
        a["versions"]["torch"] == torch.__version__.split("+")[0]
        or a["versions"]["torch"] == torch.__version__
    )
    assert a["versions"]["mat-lightning"] and a["versions"]["lightning"]
    assert a["started_utc"] <= a["written_utc"] < b["started_utc"] <= b["written_utc"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert a["git"]["commit"] == head.stdout.strip() and isinstance(a["git"]["dirty"], bool)
    capsys.readouterr()  # the runs' own tables
    rows, _ = report(capsys, tmp_path / "runs")
    assert list(rows) == ["prov"] and rows["prov"][:3] == ["2", "0-1", "8"]
