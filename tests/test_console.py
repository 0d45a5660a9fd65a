"""The researcher's console and files: fail fast, one readable table last, portable configs, help (`mat eval`:
test_eval_cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from test_data_layouts import data_check_rows

from mat_lightning.attacks import PGD
from mat_lightning.attacks.base import Attack
from mat_lightning.cli import main
from mat_lightning.data.datamodule import RetrievalDataModule
from mat_lightning.eval.report import format_results, format_table, results_csv
from mat_lightning.eval.robust import RobustRetrievalEval
from mat_lightning.main import COMMANDS
from mat_lightning.module import MatModule
from mat_lightning.synthetic import data_args

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--data.world=tiny",
    "--model.encoder.init_args.pretrained=synthetic:tiny",
    "--trainer.enable_progress_bar=false",
    "--robust_eval.progress=false",
    "--data.max_eval_images=8",
]


def test_a_missing_mlm_fails_before_training(tmp_path, tiny_clip_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "fit",
                *TINY,
                "--run_root",
                str(tmp_path),
                "--trainer.max_epochs=1",
                "--robust_eval.attacks+=mat_lightning.attacks.BertAttack",
                f"--robust_eval.attacks.mlm={tmp_path / 'no-such-mlm'}",
            ]
        )
    assert e.value.code == 2
    assert "could not load the masked LM" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))  # not one training step was taken


def test_an_unwritable_export_folder_fails_before_the_evaluation(tmp_path, tiny_clip_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["robust-eval", *TINY, "--run_root", str(tmp_path), "--export", str(tmp_path / "file" / "adv")])
    assert e.value.code == 2 and "export_dir (--export)" in capsys.readouterr().err
    assert not list(tmp_path.rglob("results.json"))


class Broken(Attack):
    name = "broken"

    def forward(self, encoder, images, captions, txt2img):
        raise RuntimeError("out of memory (simulated)")


def test_results_survive_a_failure_in_the_last_attack(tiny_encoder, tmp_path):
    cb = RobustRetrievalEval(attacks=[PGD(steps=1), Broken()], experiment="unit", progress=False)
    trainer = L.Trainer(
        inference_mode=False,
        callbacks=[cb],
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.test(MatModule(tiny_encoder), RetrievalDataModule(**data_args("tiny"), max_eval_images=8))
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["attack"] for r in results["rows"]] == ["clean", "pgd"] and results["complete"] is False
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    assert "INCOMPLETE" in format_results(results)


def test_the_final_table_fits_80_columns_with_full_headers():
    metrics = [
        "tr_r1",
        "tr_r5",
        "tr_r10",
        "ir_r1",
        "ir_r5",
        "ir_r10",
        "r_mean",
        "asr_flip_tr_r1",
        "asr_flip_ir_r1",
    ]
    rows = [{"attack": "clean", "eps_255": 0.0, **{m: 100.0 for m in metrics[:7]}, "seconds": 0.1}]
    rows += [{"attack": "bert_attack", "eps_255": None, **{m: 12.345 for m in metrics}, "seconds": 123.4}]
    text = format_results({"experiment": "x", "n_images": 200, "n_captions": 1000, "rows": rows}, width=80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    header_cells = {
        c.strip() for line in lines if line.startswith("| attack") for c in line.strip("|").split("|")
    }
    assert set(metrics) | {"attack", "eps_255", "seconds"} <= header_cells
    assert "| bert_attack |       - |  12.3 |" in text
    assert all(
        len(line) <= 40 for line in format_table(["a", "b", "ccc"], [["x", 1.0, 2.0]], width=40).splitlines()
    )


def test_csv_rounds_json_keeps_precision():
    assert results_csv([{"attack": "pgd", "tr_r1": 31.900000000000002}]) == "attack,tr_r1\npgd,31.9\n"


def test_mat_help_lists_every_subcommand():
    proc = subprocess.run(
        [sys.executable, "-m", "mat_lightning", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    names = ("fit", "validate", "test", "robust-eval", "eval", "data", "report", "augment", "transfer")
    for name in (*names, "prepare-attacks"):
        assert any(line.split()[:1] == [name] for line in proc.stdout.splitlines()), name
    assert set(COMMANDS) == {
        "fit",
        "validate",
        "test",
        "robust-eval",
        "eval",
        "data",
        "report",
        "augment",
        "transfer",
        "prepare-attacks",
    }
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())
    proc = subprocess.run(
        [sys.executable, "-m", "mat_lightning", "robust-eval", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.startswith("usage: mat robust-eval") and "--export" in proc.stdout


@pytest.mark.slow  # a cold `mat` process through make: ~30 s on a loaded 2-core machine
def test_make_print_config_is_a_valid_config():
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        ["make", "print-config", "NAME=smoke", f"VENV={venv}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["experiment"] == "smoke" and "trainer" in cfg


def test_report_imports_no_training_stack(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(
        json.dumps({"experiment": "e", "rows": [{"attack": "clean", "tr_r1": 1.0, "ir_r1": 2.0}]})
    )
    code = (
        "import sys; from mat_lightning.main import main; main(['report', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'lightning', 'matplotlib', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "| e | 1 | ? | ? | 1.0 | 2.0 |" in proc.stdout


def test_data_check_on_a_test_only_set(tmp_path, capsys):
    """A custom set with only a test file: its row counts the 2 images and captions, train and val are absent.

    Bug caught: a missing split reported as ok (or as an error), counts from the wrong split; the old check
    ("absent" and "ok" somewhere in the output) passed both.
    """
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")
    ann = [{"image": f"img/{i}.jpg", "caption": [f"a picture number {i}"]} for i in range(2)]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    main(
        [
            "data",
            "check",
            "--data.dataset=custom",
            f"--data.root={tmp_path}",
            f"--data.annotations={{test: {tmp_path / 'test.json'}}}",
            "--image_size=8",
        ]
    )
    rows = data_check_rows(capsys.readouterr().out)
    assert rows["test"][1:] == ["2", "2", "1 x2", "ok"]
    assert rows["train"][-1].startswith("absent") and rows["val"][-1].startswith("absent")
    assert rows["train"][1:3] == rows["val"][1:3] == ["-", "-"]


def test_required_mlm_and_missing_images_reported_once(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "robust-eval",
                "--config",
                str(REPO / "experiments" / "custom_eval.yaml"),
                *TINY[:3],
                "--model.encoder.init_args.model_name=mat-tiny",
                "--data.dataset=synthetic",
                "--robust_eval.mlm=required",  # a config may make the user name the masked LM
            ]
        )
    assert e.value.code == 2 and "--robust_eval.mlm=" in capsys.readouterr().err
    images = [
        {"filename": f"{i}.jpg", "split": s, "sentences": [{"raw": "a dog."}]}
        for i, s in enumerate(["train", "val", "test"])
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    with pytest.raises(SystemExit):
        main(["data", "check", "--data.dataset=flickr30k", f"--data.root={tmp_path}"])
    err = capsys.readouterr().err
    assert (
        err.count("are missing") == 1
        and "likewise in: 'val', 'test'" not in err
        and "likewise in: val, test" in err
    )


def test_curves_show_only_measured_points():
    import matplotlib.pyplot as plt

    from mat_lightning.eval.report import curves_figure

    def row(attack, eps, r1):
        return {
            "attack": attack,
            "eps_255": eps,
            **{f"{d}_r{k}": r1 + k for d in ("tr", "ir") for k in (1, 5, 10)},
        }

    rows = [row("clean", 0.0, 60), row("pgd", 2.0, 30), row("bert_attack", None, 5), row("sga", 2.0, 1)]
    fig = curves_figure(rows, modalities={"pgd": "image", "bert_attack": "text", "sga": "multimodal"})
    ax_eps, ax_k = fig.axes
    lines = {line.get_label(): line for line in ax_eps.lines}
    # one ε: a point, no line from ε = 0 (each attack shifted sideways by a small step, so equal values stay visible)
    (pgd_x,) = lines["pgd TR@1"].get_xdata()
    (sga_x,) = lines["sga TR@1"].get_xdata()
    assert pgd_x == pytest.approx(2.0, abs=0.2) and sga_x == pytest.approx(2.0, abs=0.2) and pgd_x != sga_x
    dotted = next(label for label in lines if label.startswith("sga TR@1 from ε=0"))
    assert list(lines[dotted].get_ydata()) == [6, 2]  # from the text-only attack's TR@1 (5 + 1) to SGA's
    assert list(ax_k.get_xticks()) == [1, 5, 10]
    for ax in (ax_eps, ax_k):
        assert ax.get_ylim()[0] < 0  # a marker at 0 % is drawn whole, not cut by the axis
    # one legend, outside both panels, one entry per attack (not per curve) plus the line styles
    (legend,) = fig.legends
    fig.canvas.draw()
    assert legend.get_window_extent().x0 >= ax_k.get_window_extent().x1
    assert [t.get_text() for t in legend.get_texts()][:4] == ["clean", "pgd", "bert_attack", "sga"]
    assert len(legend.get_texts()) <= 3 + 1 + 3  # clean, 3 attacks, TR, IR, the ε = 0 key
    plt.close(fig)


def test_grid_rows_in_budget_order_and_title_names_the_weights(tmp_path, monkeypatch):
    """Bug caught: an ε-grid run printing its configured budget first (ε = 2, 1, 4), and a starting-weights run
    titled like a trained run of the same experiment (issue 21 item 7)."""
    from mat_lightning.eval.report import format_results, rows_by_budget, write_results

    def row(attack, eps):
        return {
            "attack": attack,
            "eps_255": eps,
            **{f"{d}_r{k}": 1.0 for d in ("tr", "ir") for k in (1, 5, 10)},
        }

    rows = [row("clean", 0.0), row("pgd", 2.0), row("pgd", 1.0), row("pgd", 4.0), row("bert_attack", None)]
    assert [(r["attack"], r["eps_255"]) for r in rows_by_budget(rows)] == [
        ("clean", 0.0),
        ("pgd", 1.0),
        ("pgd", 2.0),
        ("pgd", 4.0),
        ("bert_attack", None),
    ]
    table = format_results({"experiment": "x", "rows": rows})
    assert [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| pgd")] == [
        "1.0",
        "2.0",
        "4.0",
    ]
    write_results(tmp_path, {"experiment": "x", "rows": rows, "weights": "start"})
    assert [line.split(",")[1] for line in (tmp_path / "results.csv").read_text().splitlines()[2:5]] == [
        "1.0",
        "2.0",
        "4.0",
    ]
    from mat_lightning.eval import report

    titles = []
    monkeypatch.setattr(report, "plot_curves", lambda rows, out, title="", **kw: titles.append(title))
    write_results(tmp_path, {"experiment": "x", "rows": rows, "weights": "start"})
    write_results(tmp_path, {"experiment": "x", "rows": rows, "weights": "final"})
    assert "starting" in titles[0] and "trained" in titles[-1]


def test_wandb_config_has_no_junk_keys_and_the_run_gets_tags(tmp_path):
    from types import SimpleNamespace

    from jsonargparse import Namespace

    from mat_lightning.logging import SaveConfigToWandb, WandbLogger

    run = SimpleNamespace(tags=("mine",), config=SimpleNamespace(values={}))
    run.config.update = lambda values, allow_val_change: run.config.values.update(values)

    class FakeWandb(WandbLogger):
        @property
        def experiment(self):
            return run

    logger = FakeWandb(offline=True, save_dir=str(tmp_path))
    assert "anonymous" not in logger._wandb_init  # the argument W&B warns about
    callback = SaveConfigToWandb.__new__(SaveConfigToWandb)
    callback.config = Namespace(
        config=["x.yaml"], __default_config__="base.yaml", experiment="e", seed_everything=0
    )
    encoder = SimpleNamespace(model_name="ViT-B-16")
    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[logger], datamodule=SimpleNamespace(dataset="flickr30k")
    )
    module = SimpleNamespace(encoder=encoder, defense=SimpleNamespace(name="mat"))
    callback.save_config(trainer, module, "fit")
    assert run.config.values == {"experiment": "e", "seed_everything": 0}
    assert run.tags == ("mine", "defense:mat", "dataset:flickr30k", "model:ViT-B-16")


def test_attack_config_tells_attacks_apart():
    from mat_lightning.attacks import SGA, BertAttack
    from mat_lightning.eval.robust import attack_config

    assert attack_config(SGA()) == json.loads(json.dumps(attack_config(SGA())))  # JSON-able, reproducible
    assert attack_config(PGD(eps_255=2)) != attack_config(PGD(eps_255=4))
    assert attack_config(BertAttack(mlm="a")) != attack_config(BertAttack(mlm="b"))
