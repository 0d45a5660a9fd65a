"""Issue 23, items 1 and 2: non-finite numbers are errors, never results; unsafe inputs and faults are bounded.

* NaN/inf similarities, losses and weights: refused with one error naming the row, step or checkpoint (a NaN model
  scored 100 % recall, clean and under attack, before).
* A 1 x 20000 px image decodes within a small memory bound; SIGTERM stops a robust evaluation between batches;
  a finished run folder is never written into; ``MAT_CACHE_DIR=`` is unset; ``class_path`` imports are checked
  against the allowed prefixes before the module runs.

CLI cases call ``mat_lightning.cli.main`` in this process (as tests/test_bad_inputs.py does); fits are 1-2 epochs of
a few steps on the tiny world.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from test_bad_inputs import FAST_FIT, TINY, assert_one_error, run_main

from mat_lightning import cli
from mat_lightning.errors import NonFiniteError
from mat_lightning.eval.retrieval import recall_at_k

PGD = "--robust_eval.attacks=[{class_path: mat_lightning.attacks.PGD, init_args: {eps_255: 2, steps: 2}}]"


# -- 1. non-finite similarities -----------------------------------------------------------------------------------------


def _loop_recall_at_1(sim: torch.Tensor, txt2img: torch.Tensor) -> float:
    """TR R@1 by explicit loops with Python floats, as a ranking that trusts comparisons would compute it."""
    hits = 0
    for i in range(sim.shape[0]):
        pos = [t for t in range(sim.shape[1]) if int(txt2img[t]) == i]
        best = max(float(sim[i, t]) for t in pos)
        hits += not any(float(sim[i, t]) >= best for t in range(sim.shape[1]) if t not in pos)
    return 100.0 * hits / sim.shape[0]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_non_finite_similarity_is_refused_not_ranked(value, chunk):
    """Bug caught: NaN compares false with every score, so a pessimistic ranking finds no negative above it and counts
    a hit (an all-NaN model read as 100 % recall); the check must also see entries of every row block."""
    g = torch.Generator().manual_seed(0)
    txt2img = torch.arange(7).repeat_interleave(2)
    sim = torch.randn(7, 14, generator=g)
    assert recall_at_k(sim, txt2img, chunk_size=chunk)["tr_r1"] == pytest.approx(
        _loop_recall_at_1(sim, txt2img)
    )
    for row, col in [(0, 0), (4, 9), (6, 13)]:
        bad = sim.clone()
        bad[row, col] = value
        bad[2, 5] = value  # a second entry in another row: the first row is named, both are counted
        first = min(row, 2)
        expected = rf"2 of 98 similarities .* in 2 of 7 image rows \(first: row {first}\)"
        with pytest.raises(NonFiniteError, match=expected):
            recall_at_k(bad, txt2img, chunk_size=chunk)
    nan_model = torch.full((7, 14), math.nan)
    assert _loop_recall_at_1(nan_model, txt2img) == 100.0  # what an unchecked ranking reports for a NaN model
    with pytest.raises(NonFiniteError, match="98 of 98"):
        recall_at_k(nan_model, txt2img, chunk_size=chunk)


# -- 1. non-finite weights: refused before evaluation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_clip_path) -> dict[str, Path]:
    """MatModule checkpoints of the tiny CLIP (all weights NaN / inf / one tensor NaN), and an open_clip file of NaN."""
    folder = tmp_path_factory.mktemp("poisoned")
    clip = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    files = {}
    for name, fill in (("nan", math.nan), ("inf", math.inf), ("one_nan", None)):
        state = {}
        for i, (k, v) in enumerate(clip.items()):
            poison = fill is not None or i == 0
            state[f"encoder.model.{k}"] = (
                torch.full_like(v, fill if fill is not None else math.nan) if poison else v
            )
        files[name] = folder / f"{name}.ckpt"
        torch.save({"state_dict": state}, files[name])
    files["pretrained_nan"] = folder / "clip_nan.pt"
    torch.save({k: torch.full_like(v, math.nan) for k, v in clip.items()}, files["pretrained_nan"])
    files["n_tensors"] = len(clip)
    return files


@pytest.mark.parametrize(("kind", "count"), [("nan", None), ("inf", None), ("one_nan", 1)])
def test_non_finite_checkpoint_is_refused_before_evaluation(tmp_path, capfd, poisoned, kind, count):
    """Bug caught: a checkpoint of NaN (or inf) weights scored R@1 = 100 clean and under PGD, exit 0 (issue 23)."""
    path = poisoned[kind]
    total = poisoned["n_tensors"]
    code, out = run_main(
        [
            "robust-eval",
            *TINY,
            PGD,
            f"--run_root={tmp_path}",
            f"--ckpt_path={path}",
            "--data.max_eval_images=8",
        ],
        capfd,
    )
    assert_one_error(code, out, str(path), f"{count or total} of {total} weight tensors", "NaN or inf")
    assert not list(tmp_path.glob("*/*/results.json"))


def test_non_finite_starting_weights_are_refused(tmp_path, capfd, poisoned):
    """The configured pretrained file (no --ckpt_path) is what `mat test` / `mat eval` evaluate: checked the same."""
    code, out = run_main(
        [
            "test",
            *TINY,
            f"--model.encoder.init_args.pretrained={poisoned['pretrained_nan']}",
            f"--run_root={tmp_path}",
        ],
        capfd,
    )
    assert_one_error(code, out, "starting weights", str(poisoned["pretrained_nan"]), "weight tensors")


def test_python_api_refuses_a_nan_encoder_and_bert_attack_never_indexes_past_its_candidates(
    tiny_encoder, tiny_mlm, tiny_test_split
):
    """robust_retrieval refuses the encoder before its first batch; BertAttack itself, called on the NaN encoder,
    raises NonFiniteError (it raised IndexError: a NaN score never equals the row maximum, so no candidate won)."""
    from mat_lightning.attacks.bert_attack import BertAttack
    from mat_lightning.eval.robust import robust_retrieval

    with torch.no_grad():
        for p in tiny_encoder.parameters():
            p.fill_(math.nan)
    with pytest.raises(NonFiniteError, match="the encoder .* weight tensors contain NaN or inf"):
        robust_retrieval(tiny_encoder, [], progress=False)
    images, captions = tiny_test_split
    x = images[:2].float() / 255
    caps = [captions[0][0], captions[1][0]]
    with pytest.raises(NonFiniteError, match="bert_attack: candidate scores are NaN"):
        BertAttack(mlm=tiny_mlm)(tiny_encoder, x, caps, torch.tensor([0, 1]))


def test_report_refuses_non_finite_values(tmp_path, capfd):
    """A results.json with a NaN or infinite recall (written by hand or by an old version) is not averaged."""
    row = {"attack": "clean", "eps_255": 0.0, "tr_r1": math.nan, "ir_r1": 50.0}
    for name, value in (("nan", "NaN"), ("inf", "Infinity")):
        f = tmp_path / name / "results.json"
        f.parent.mkdir()
        f.write_text(json.dumps({"experiment": "x", "rows": [row]}).replace("NaN", value))
        code, out = run_main(["report", str(f)], capfd)
        assert_one_error(code, out, str(f), "tr_r1", "not a number")


# -- 1. divergence during fit -------------------------------------------------------------------------------------------


def test_fit_with_a_huge_learning_rate_stops_at_the_step_it_diverged(tmp_path, capfd):
    """`mat fit --model.lr=1e6` made all 62 weight tensors NaN and then reported 100 % recall with exit 0."""
    code, out = run_main(["fit", *TINY, *FAST_FIT, f"--run_root={tmp_path}", "--model.lr=1e6"], capfd)
    assert_one_error(code, out, "training diverged at optimiser step", "--model.lr (now 1e+06)")
    assert not list(tmp_path.glob("*/*/results.json")) and not list(tmp_path.glob("**/*.ckpt"))


class PoisonAt(L.Callback):
    """Fills one weight with NaN before training step ``step`` (a stand-in for a diverging update)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.encoder.parameters()).fill_(math.inf)


def test_divergence_in_epoch_two_names_the_last_finite_checkpoint(tmp_path, capfd, monkeypatch):
    """The error names the step and the newest checkpoint; every checkpoint on disk is finite (none written after)."""
    original = cli.MatCLI.instantiate_trainer

    def instantiate_trainer(self, **kwargs):
        trainer = original(self, **kwargs)
        trainer.callbacks.append(PoisonAt(step=4))  # the second step of epoch 1 (3 steps per epoch)
        return trainer

    monkeypatch.setattr(cli.MatCLI, "instantiate_trainer", instantiate_trainer)
    code, out = run_main(["fit", *TINY, *FAST_FIT, f"--run_root={tmp_path}"], capfd)
    (last,) = tmp_path.glob("*/*/checkpoints/last.ckpt")
    assert_one_error(code, out, "optimiser step 5 (epoch 1, batch 1)", "the training loss is", str(last))
    for ckpt in tmp_path.glob("**/*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] == 3
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not list(tmp_path.glob("*/*/results.json"))


# -- 2a. extreme aspect ratios: memory bounded by the output size -------------------------------------------------------

PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
from mat_lightning.data.datamodule import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = load_image(Path(sys.argv[1]), 224)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(tuple(x.shape), (after - before) // 1024)
"""


def test_a_1_by_20000_px_image_loads_in_little_memory(tmp_path):
    """A 157-byte PNG, 1 px wide and 20000 px tall, passes the decompression-bomb guard (20,000 pixels); resizing its
    shorter side to 224 made a 224 x 4,480,000 px image first: +4.2 GB of peak memory (ru_maxrss of a fresh process,
    not time). Now the growth of the peak stays under 64 MB."""
    from PIL import Image

    path = tmp_path / "tall.png"
    Image.new("RGB", (1, 20000), (10, 200, 30)).save(path)
    assert path.stat().st_size < 1000
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, grown_mb = proc.stdout.split(") ")
    assert shape == "(3, 224, 224"
    assert int(grown_mb) < 64, f"peak memory grew by {grown_mb} MB"


@pytest.mark.parametrize(("w", "h", "size"), [(2, 3000, 32), (3000, 5, 32), (9, 700, 8)])
def test_extreme_aspect_ratio_shows_the_centre_of_the_whole_resize(tmp_path, w, h, size):
    """Against the references' pipeline (whole image resized, then centre-cropped; PIL directly): the bounded path
    must show the same centre (a box at the wrong offset or scale would show another part of the gradients). On
    random noise upscaled 16x the two differ by up to 6 grey levels (Pillow's rounding); on pictures by 1-2."""
    import numpy as np
    from PIL import Image

    from mat_lightning.data.datamodule import MAX_RESIZED_AREA, load_image

    # smooth content (gradients along both sides, a wave): a box at the wrong offset or scale shows other values
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    pixels = np.stack([yy, xx, 0.5 + 0.5 * np.sin(40 * (yy + xx))], -1)
    pixels = (pixels * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    assert rw * rh > MAX_RESIZED_AREA * size * size  # the bounded path runs
    left, top = (rw - size) // 2, (rh - size) // 2
    whole = Image.fromarray(pixels).resize((rw, rh), Image.BICUBIC).crop((left, top, left + size, top + size))
    got = load_image(tmp_path / "x.png", size).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - np.asarray(whole).astype(int)).max() <= 2  # Pillow's fixed-point rounding


DATA_CHECK_PEAK = """
import resource, sys
from mat_lightning.cli import main
import mat_lightning.data.check  # the command's modules imported before the first measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    main(["data", "check", "--data.dataset=custom", "--data.annotations=" + sys.argv[1]])
finally:
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("grown_mb", (after - before) // 1024)
"""


def test_data_check_reads_a_1_by_20000_px_image_in_little_memory(tmp_path):
    """`mat data check` on it: MemoryError under an 8 GB cap before (5.5 GB peak); now ok, peak grows < 128 MB."""
    from PIL import Image

    Image.new("RGB", (1, 20000), (10, 200, 30)).save(tmp_path / "tall.png")
    ann = tmp_path / "ann.json"
    entry = {"filename": "tall.png", "split": "test", "sentences": [{"raw": "a very tall green line"}]}
    ann.write_text(json.dumps({"images": [entry]}))
    proc = subprocess.run(
        [sys.executable, "-c", DATA_CHECK_PEAK, str(ann)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    grown_mb = int(proc.stdout.split("grown_mb")[-1])
    assert grown_mb < 128, f"peak memory grew by {grown_mb} MB"


# -- 2c. a finished run folder is never written into --------------------------------------------------------------------


def test_default_root_dir_naming_a_finished_run_is_refused(tmp_path, capfd):
    """`--trainer.default_root_dir=<a finished run>` overwrote its results.json and config.yaml (exit 0)."""
    run = tmp_path / "finished"
    (run / "checkpoints").mkdir(parents=True)
    files = {"config.yaml": "experiment: old\n", "results.json": '{"experiment": "old", "rows": []}'}
    for name, text in files.items():
        (run / name).write_text(text)
    code, out = run_main(
        ["test", *TINY, "--data.max_eval_images=4", f"--trainer.default_root_dir={run}"], capfd
    )
    assert_one_error(code, out, f"--trainer.default_root_dir={run}", "existing run folder", "config.yaml")
    assert {name: (run / name).read_text() for name in files} == files
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "results.json"]


def test_default_root_dir_may_name_a_new_or_empty_folder(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    code, out = run_main(
        ["test", *TINY, "--data.max_eval_images=4", f"--trainer.default_root_dir={tmp_path / 'empty'}"], capfd
    )
    assert code == 0, out[-2000:]
    assert (tmp_path / "empty" / "results.json").is_file() and (tmp_path / "empty" / "config.yaml").is_file()


# -- 2d. MAT_CACHE_DIR set but empty ------------------------------------------------------------------------------------


def test_empty_mat_cache_dir_means_the_default_cache_not_the_working_directory(tmp_path, capfd, monkeypatch):
    """`MAT_CACHE_DIR= mat ...` built the world into the working directory (Path("") is ".")."""
    shared = Path(__import__("os").environ["MAT_CACHE_DIR"]).resolve()
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    (home / ".cache" / "mat_lightning").symlink_to(shared)  # the default cache: the already built tiny world
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MAT_CACHE_DIR", "")
    monkeypatch.chdir(work)
    from mat_lightning.cache import cache_dir

    assert cache_dir() == home / ".cache" / "mat_lightning"
    code, out = run_main(
        ["test", *TINY, "--data.max_eval_images=4", f"--run_root={tmp_path / 'runs'}"], capfd
    )
    assert code == 0, out[-2000:]
    assert list(work.iterdir()) == []


# -- 2e. class_path imports: trusted packages only ----------------------------------------------------------------------

USER_MODULE = """
from pathlib import Path
Path({mark!r}).write_text("import-time code ran")
from mat_lightning.defenses import Clean


class MyClean(Clean):
    pass
"""


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A module with import-time code (it writes a file), on sys.path, holding a valid Defense subclass."""
    mark = tmp_path / "imported"
    name = f"mylab_{tmp_path.name.replace('-', '_')}"  # a fresh name per test: Python caches imported modules
    (tmp_path / f"{name}.py").write_text(USER_MODULE.format(mark=str(mark)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, mark


@pytest.mark.parametrize("form", ["{name}.MyClean", "{{class_path: {name}.MyClean}}", "config"])
def test_class_path_outside_trusted_packages_is_refused_before_import(
    tmp_path, capfd, monkeypatch, user_module, form
):
    """Bug caught: jsonargparse imported the module (running its code: `this.Foo` printed the Zen of Python) before
    it checked the type. Refused on the command line and in a --config file; nothing imported, one line."""
    name, mark = user_module
    monkeypatch.delenv("MAT_TRUSTED_MODULES", raising=False)
    if form == "config":
        (tmp_path / "c.yaml").write_text(f"model:\n  defense:\n    class_path: {name}.MyClean\n")
        args = [f"--config={tmp_path / 'c.yaml'}"]
    else:
        args = ["--model.defense=" + form.format(name=name)]
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path / 'runs'}", *args], capfd)
    assert_one_error(code, out, "--model.defense", f"{name}.MyClean", f"MAT_TRUSTED_MODULES={name}")
    assert not mark.exists(), "the module's import-time code ran"


def test_trusted_modules_opt_in_allows_a_users_module(tmp_path, capfd, monkeypatch, user_module):
    name, mark = user_module
    monkeypatch.setenv("MAT_TRUSTED_MODULES", f"other_lab, {name}")
    code, out = run_main(["test", *TINY, f"--model.defense={name}.MyClean", "--print_config"], capfd)
    assert code == 0, out[-2000:]
    assert f"class_path: {name}.MyClean" in out and mark.exists()
    monkeypatch.delenv("MAT_TRUSTED_MODULES")  # withdrawn again: the setting is process-wide in jsonargparse
    code, out = run_main(["test", *TINY, f"--model.defense={name}.MyClean", "--print_config"], capfd)
    assert_one_error(code, out, f"{name}.MyClean", "not in a trusted package")


@pytest.mark.parametrize(
    ("value", "message"), [("os.system", "never importable"), ("this.Foo", "trusted package")]
)
def test_dangerous_and_import_time_modules_are_never_imported(tmp_path, capfd, value, message):
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path}", f"--model.defense={value}"], capfd)
    assert_one_error(code, out, value, message)
    assert "Zen of Python" not in out


# -- 2b. SIGTERM during a robust evaluation -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["robust-eval", "fit"])
def test_sigterm_during_robust_eval_stops_between_batches_and_keeps_the_finished_rows(
    tmp_path, capfd, monkeypatch, command
):
    """Bug caught: the robust evaluation runs inside Lightning's on_test_epoch_end, where Lightning never checks for
    SIGTERM: the signal waited until every remaining attack had run (54 s, 6 more rows) and the message said
    "continue training ... --ckpt_path=last". PGD over an ε grid (3 rows) on 2 batches of 4 images; SIGTERM in the
    third attacked batch (the first of ε = 1): status 143 at the next batch, results.json keeps clean + ε = 2."""
    import os
    import signal

    from mat_lightning.attacks.base import Attack

    calls = []
    original = Attack.__call__

    def call(self, *args, **kwargs):
        calls.append(self.eps_255)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Attack, "__call__", call)
    args = [command, *TINY, PGD, "--robust_eval.eps_255_grid=[1, 2, 4]", f"--run_root={tmp_path}"]
    args += ["--data.max_eval_images=8", "--data.eval_batch_size=4"]
    if command == "fit":
        args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--data.batch_size=32"]
    code, out = run_main(args, capfd)
    (results,) = tmp_path.glob("*/*/results.json")
    run = results.parent
    hint = (
        f"mat robust-eval --config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints' / 'last.ckpt'}"
        if command == "fit"
        else "re-run the same command"
    )
    assert_one_error(
        code, out, "SIGTERM", "robust evaluation", str(results), "2 finished rows", hint, status=143
    )
    assert "--ckpt_path=last" not in out
    assert calls == [2, 2, 1]  # stopped before the second batch of ε = 1, not after ε = 4
    payload = json.loads(results.read_text())
    assert payload["complete"] is False
    assert [(r["attack"], r["eps_255"]) for r in payload["rows"]] == [("clean", 0.0), ("pgd", 2.0)]
