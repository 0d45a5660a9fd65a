"""Hostile and careless inputs through the `mat` CLI and `make`: each gives exit status 2 (or 130/143 for signals)
and one `error:` line naming the thing at fault, never a traceback, nothing run or written where it must not be.

Most cases call `mat_lightning.cli.main` (the function behind the `mat` script) in this process: they fail at parse
or validation time, before any training, so the table stays fast; `test_real_command_*` run real processes.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mat_lightning import cli
from mat_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--data.world=tiny",
    "--model.encoder.init_args.pretrained=synthetic:tiny",
    "--trainer.enable_progress_bar=false",
    "--robust_eval.progress=false",
]
FAST_FIT = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--data.batch_size=32",
    "--data.max_eval_images=8",
    "--robust_eval.attacks=[]",
]


def run_main(argv: list[str], capfd) -> tuple[int, str]:
    """Exit status and all output (stdout + stderr, file-descriptor level) of one `mat` command."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return code, out + err


def assert_one_error(code: int, output: str, *names: str, status: int = 2) -> None:
    assert code == status, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-2000:]
    for name in names:
        assert name in output, (name, output[-2000:])


# -- shell injection through make --------------------------------------------------------------------------------------

INJECTIONS = [
    "x;touch pwned;#",
    "$(touch pwned)",
    "`touch pwned`",
    ";id",
    "$(shell touch pwned)",
    "a'b;touch pwned",
]


@pytest.mark.parametrize(
    "assignment",
    [*(f"NAME={v}" for v in INJECTIONS), "NAME=../conf/base", "NAME=does_not_exist"]
    + [f"CKPT={v}" for v in ("a;touch pwned;#", "$(shell touch pwned)")],
)
def test_make_refuses_injection_before_anything_runs(tmp_path, assignment):
    target = "eval" if assignment.startswith("CKPT") else "experiment"
    # VENV points to a mat that records its own invocation: it must never be reached
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "mat").write_text(f"#!/bin/sh\ntouch {tmp_path}/mat-ran\n")
    (fake / "mat").chmod(0o755)
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), target, assignment, f"VENV={tmp_path / 'venv'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "error:" in proc.stderr
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()
    assert not (tmp_path / "mat-ran").exists()


def test_make_passes_args_as_words_never_as_shell(tmp_path):
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    (fake / "mat").write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path}/argv\n')
    (fake / "mat").chmod(0o755)
    args = "--model.lr=1e-4 ;touch pwned $(touch pwned) `touch pwned` *"
    proc = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(REPO),
            "experiment",
            "NAME=smoke",
            f"ARGS={args}",
            f"VENV={tmp_path / 'venv'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:4] == ["fit", "--config", "experiments/smoke.yaml", "--experiment=smoke"]
    assert argv[4:] == args.split()  # split on blanks only: no globbing, no substitution


# -- names, parse errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../../x", "a/b", ".hidden", *(pytest.param(n, marks=pytest.mark.slow) for n in ("..", "a\\b", ""))],
)
def test_experiment_names_cannot_leave_the_run_root(tmp_path, capfd, name):
    code, out = run_main(["fit", *TINY, f"--run_root={tmp_path / 'runs'}", f"--experiment={name}"], capfd)
    assert_one_error(code, out, "is not a run name")
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == []


def test_abbreviated_option_is_refused_and_the_error_is_last(tmp_path, capfd):
    code, out = run_main(["fit", *TINY, f"--run_root={tmp_path}", "--trainer.max_epoch=3"], capfd)
    assert code == 2 and "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) <= 3, out
    assert any("--trainer.max_epoch" in line for line in lines if line.startswith("error:"))
    assert "--help" in lines[-1]


# -- attacks and defenses: validation errors, no budget -----------------------------------------------------------------

PGD = "mat_lightning.attacks.PGD"
SLOW = pytest.mark.slow  # more cases of a kind the fast suite already covers
BERT = "mat_lightning.attacks.BertAttack"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (
            [f"--robust_eval.attacks=[{{class_path: {PGD}, init_args: {{objective: nosuch}}}}]"],
            ["objective='nosuch'"],
        ),
        pytest.param(
            [f"--robust_eval.attacks=[{{class_path: {PGD}, init_args: {{momentum: 2}}}}]"],
            ["momentum=2"],
            marks=SLOW,
        ),
        (
            ["--model.defense=mat_lightning.defenses.TeCoA", "--model.defense.init_args.clean_weight=-1"],
            ["-1"],
        ),
        ([f"--robust_eval.attacks=[{{class_path: {PGD}, init_args: {{steps: 0}}}}]"], ["pgd", "steps=0"]),
        pytest.param(
            [f"--robust_eval.attacks=[{{class_path: {PGD}, init_args: {{eps_255: 0}}}}]"],
            ["eps_255=0"],
            marks=SLOW,
        ),
        ([f"--robust_eval.attacks=[{{class_path: {BERT}, init_args: {{max_words: 0}}}}]"], ["max_words=0"]),
        (
            [f"--robust_eval.attacks=[{{class_path: {PGD}}}]", "--robust_eval.eps_255_grid=[2, 0]"],
            ["eps_255_grid", "> 0"],
        ),
        pytest.param(
            [f"--robust_eval.attacks=[{{class_path: {PGD}}}]", "--robust_eval.eps_255_grid=[-1]"],
            ["eps_255_grid"],
            marks=SLOW,
        ),
    ],
    ids=["objective", "momentum", "defense", "steps0", "eps0", "max_words0", "grid0", "grid_negative"],
)
def test_attack_and_defense_errors_are_one_line(tmp_path, capfd, args, names):
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path / 'runs'}", *args], capfd)
    assert_one_error(code, out, *names)
    assert not list((tmp_path / "runs").glob("*/*")), "a failed run left its folder"


# -- checkpoints --------------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command: a checkpoint must never be loaded with weights_only=False."""

    def __init__(self, mark: Path) -> None:
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    files = {}

    def put(name, obj=None, raw=None):
        files[name] = folder / f"{name}.ckpt"
        if raw is not None:
            files[name].write_bytes(raw)
        else:
            torch.save(obj, files[name])

    put("empty", raw=b"")
    put("random", raw=np.random.default_rng(0).bytes(4096))
    put("tensor", torch.zeros(3))
    put("list", [1, 2, 3])
    put("no_state_dict", {"epoch": 1})
    put("other_shapes", {"state_dict": {"encoder.model.visual.conv1.weight": torch.zeros(1, 2, 3)}})
    put("good_for_truncation", {"state_dict": {"x": torch.zeros(1000)}})
    files["truncated"] = folder / "truncated.ckpt"
    files["truncated"].write_bytes(files.pop("good_for_truncation").read_bytes()[:700])
    put("code_payload", {"state_dict": {}, "evil": Payload(folder / "payload-ran")})
    return files


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    return _bad_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "empty file"),
        ("random", "cannot be read"),
        ("truncated", "cannot be read"),
        ("tensor", "holds a Tensor"),
        ("list", "holds a list"),
        ("no_state_dict", "without 'state_dict'"),
        ("other_shapes", "does not fit the configured model"),
        ("code_payload", "cannot be read"),
    ],
)
def test_bad_checkpoints_are_refused_before_lightning_loads_them(
    tmp_path, capfd, bad_checkpoints, kind, message
):
    mark = bad_checkpoints["code_payload"].parent / "payload-ran"
    path = bad_checkpoints[kind]
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path / 'runs'}", f"--ckpt_path={path}"], capfd)
    assert_one_error(code, out, str(path), message)
    assert not mark.exists()
    assert not list((tmp_path / "runs").glob("*/*")), "a failed run left its folder"


def test_ckpt_path_last_without_a_run_fails_clearly(tmp_path, capfd):
    code, out = run_main(
        ["fit", *TINY, f"--run_root={tmp_path}", "--experiment=nothing_yet", "--ckpt_path=last"], capfd
    )
    assert_one_error(code, out, "--ckpt_path=last", "nothing_yet")


# -- data: field types, image sizes, caches -----------------------------------------------------------------------------


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels (Pillow checks the size before decoding anything)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


@pytest.fixture()
def custom_data(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img" / "a.png")
    _png_header_only(tmp_path / "img" / "bomb.png", 30000, 30000)
    return tmp_path


ENTRY_CASES = {
    "image_number": ([{"image": 5, "caption": "a red square"}], "'image' must be a non-empty string"),
    "image_null": ([{"image": None, "caption": "a red square"}], "'image' must be a non-empty string"),
    "image_list": ([{"image": ["img/a.png"], "caption": "x"}], "'image' must be a non-empty string"),
    "caption_number": ([{"image": "img/a.png", "caption": 5}], "captions must be a string or a list"),
    "caption_dict": (
        [{"image": "img/a.png", "caption": {"raw": "x"}}],
        "captions must be a string or a list",
    ),
    "karpathy_filename": ({"images": [{"filename": 7, "split": "test", "sentences": []}]}, "'filename'"),
    "karpathy_split": ({"images": [{"filename": "a.png", "split": 1, "sentences": []}]}, "'split'"),
    "karpathy_raw": (
        {"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": 3}]}]},
        "captions",
    ),
    "bomb": ([{"image": "img/bomb.png", "caption": "a huge picture"}], "image too large"),
}


FAST_ENTRY_CASES = ("image_number", "caption_dict", "karpathy_filename", "bomb")


@pytest.mark.parametrize(
    "case", [c if c in FAST_ENTRY_CASES else pytest.param(c, marks=SLOW) for c in sorted(ENTRY_CASES)]
)
def test_bad_entries_and_images_name_the_file(custom_data, capfd, case):
    data, message = ENTRY_CASES[case]
    ann = custom_data / "ann.json"
    ann.write_text(json.dumps(data))
    args = [
        "--data.dataset=custom",
        f"--data.root={custom_data}",
        f"--data.annotations={ann}",
        "--data.preload=true",
    ]
    if isinstance(data, dict):
        args.append(f"--data.image_root={custom_data / 'img'}")
    code, out = run_main(["test", *TINY, f"--run_root={custom_data / 'runs'}", *args], capfd)
    assert_one_error(code, out, message)
    assert "ann.json" in out or "bomb.png" in out
    assert not list((custom_data / "runs").glob("*/*")), "a failed run left its folder"


def test_cache_folder_that_is_a_file(tmp_path, capfd, monkeypatch):
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("MAT_CACHE_DIR", str(tmp_path / "cache"))
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path / 'runs'}"], capfd)
    assert_one_error(code, out, str(tmp_path / "cache"), "MAT_CACHE_DIR")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder(tmp_path, capfd, monkeypatch):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o500)
    monkeypatch.setenv("MAT_CACHE_DIR", str(tmp_path / "cache"))
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path / 'runs'}"], capfd)
    assert_one_error(code, out, "MAT_CACHE_DIR")


def test_corrupt_cached_clip_names_the_file(tmp_path, capfd, monkeypatch, tiny_clip_path):
    from mat_lightning.synthetic.assets import world_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    shared = world_dir("tiny")
    (cache / shared.name).symlink_to(shared)  # the world itself is fine (and shared, read-only here)
    (cache / tiny_clip_path.name).write_bytes(tiny_clip_path.read_bytes()[:1000])
    monkeypatch.setenv("MAT_CACHE_DIR", str(cache))
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path / 'runs'}"], capfd)
    assert_one_error(code, out, tiny_clip_path.name, "delete it")


def test_lightning_misconfiguration_is_one_line(tmp_path, capfd):
    code, out = run_main(
        ["fit", *TINY, *FAST_FIT, f"--run_root={tmp_path / 'runs'}", "--trainer.limit_val_batches=0.0001"],
        capfd,
    )
    assert_one_error(code, out, "limit_val_batches")


# -- image modes --------------------------------------------------------------------------------------------------------


def _rgb_reference(rng) -> np.ndarray:
    return rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)


def _image(mode: str, pixels: np.ndarray) -> Image.Image:
    """A PIL image of ``mode`` holding exactly these pixel values (native byte order)."""
    return Image.frombytes(mode, (pixels.shape[1], pixels.shape[0]), np.ascontiguousarray(pixels).tobytes())


def _mode_cases():
    """(PIL image of one mode, the RGB uint8 picture it shows), the expected picture computed with NumPy."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgb = _rgb_reference(rng)
    grey16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    over_white = lambda v, a: np.round(v * (a / 255.0) + 255.0 * (1 - a / 255.0))  # noqa: E731
    cases = {
        "1": (
            _image("L", ((grey > 127) * 255).astype(np.uint8)).convert("1"),
            np.repeat(((grey > 127) * 255)[..., None], 3, 2),
        ),
        "L": (_image("L", grey), np.repeat(grey[..., None], 3, 2)),
        "LA": (
            _image("LA", np.stack([grey, alpha], -1)),
            np.repeat(over_white(grey.astype(float), alpha)[..., None], 3, 2),
        ),
        "RGB": (_image("RGB", rgb), rgb),
        "RGBA": (
            _image("RGBA", np.dstack([rgb, alpha])),
            over_white(rgb.astype(float), alpha[..., None]),
        ),
        "I;16": (_image("I;16", grey16), np.repeat(np.round(grey16 / 65535 * 255)[..., None], 3, 2)),
        "I": (
            _image("I", grey16.astype(np.int32)),
            np.repeat(np.round(grey16 / 65535 * 255)[..., None], 3, 2),
        ),
        "F": (
            _image("F", (grey16 / 65535).astype(np.float32)),
            np.repeat(np.round((grey16 / 65535).astype(np.float32) * 255.0)[..., None], 3, 2),
        ),
    }
    cmyk = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    cases["CMYK"] = (_image("CMYK", cmyk), np.round((255 - c) * (255 - k) / 255))
    ycc = rng.integers(16, 240, (8, 8, 3), dtype=np.uint8).astype(float)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    jfif = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    cases["YCbCr"] = (_image("YCbCr", ycc.astype(np.uint8)), np.clip(np.round(jfif), 0, 255))
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    p = _image("P", idx)
    p.putpalette(palette.flatten().tolist())
    cases["P"] = (p, palette[idx])
    pt = p.copy()
    pt.info["transparency"] = int(idx[0, 0])
    expected = palette[idx].copy()
    expected[idx == idx[0, 0]] = 255
    cases["P_transparent"] = (pt, expected)
    return cases


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("mode", sorted(MODE_CASES))
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_every_image_mode_decodes_to_the_picture_it_shows(tmp_path, mode, fmt):
    from mat_lightning.data.datamodule import load_image

    image, expected = MODE_CASES[mode]
    path = tmp_path / f"x.{fmt}"
    try:
        image.save(path)
    except (OSError, KeyError, ValueError):
        pytest.skip(f"Pillow cannot write mode {mode} as {fmt}")
    with Image.open(path) as check:
        if check.mode != image.mode or ("transparency" in image.info) != ("transparency" in check.info):
            pytest.skip(f"{fmt} does not store mode {mode} as such")
    got = load_image(path, 8).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1, (mode, fmt)


# -- repeated images, copies across splits -----------------------------------------------------------------------------


def test_repeated_images_are_merged_and_reported_by_data_check(tmp_path, capfd):
    from mat_lightning.data.formats import read_annotations

    for name, colour in (("a.png", 10), ("b.png", 120), ("c.png", 250)):
        Image.new("RGB", (16, 16), (colour, 0, 0)).save(tmp_path / name)
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    entries = [
        {"filename": "a.png", "split": "train", "sentences": [{"raw": "one"}]},
        {"filename": "b.png", "split": "test", "sentences": [{"raw": "two"}]},
        {"filename": "./b.png", "split": "test", "sentences": [{"raw": "three"}]},
        {"filename": "c.png", "split": "val", "sentences": [{"raw": "four"}]},
        {"filename": "copy.png", "split": "val", "sentences": [{"raw": "five"}]},
    ]
    (tmp_path / "ann.json").write_text(json.dumps({"images": entries}))
    test = read_annotations(tmp_path / "ann.json", tmp_path, "test")
    assert [(r.image_id, r.captions, r.entries) for r in test] == [("b.png", ["two", "three"], 2)]
    code, out = run_main(
        ["data", "check", "--data.dataset=custom", f"--data.annotations={tmp_path / 'ann.json'}"], capfd
    )
    assert code == 2 and "Traceback" not in out
    assert "listed more than once" in out and "b.png" in out
    assert "copy.png has the same content as" in out and "a.png" in out and "split 'train'" in out


# -- signals and resumption ---------------------------------------------------------------------------------------------


class SignalAtStep(L.Callback):
    """Sends ``signum`` to this process after training step ``step`` (a deterministic stand-in for a scheduler)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _with_signal(monkeypatch, signum: int, step: int) -> None:
    original = cli.MatCLI.instantiate_trainer

    def instantiate_trainer(self, **kwargs):
        trainer = original(self, **kwargs)
        trainer.callbacks.append(SignalAtStep(signum, step))
        return trainer

    monkeypatch.setattr(cli.MatCLI, "instantiate_trainer", instantiate_trainer)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


def test_sigterm_mid_fit_then_resume_ends_at_the_uninterrupted_weights(tmp_path, capfd, monkeypatch):
    base = ["fit", *TINY, *FAST_FIT, "--experiment=resume"]
    code, out = run_main([*base, f"--run_root={tmp_path / 'straight'}"], capfd)
    assert code == 0, out[-2000:]
    (straight,) = (tmp_path / "straight" / "resume").glob("*/checkpoints/last.ckpt")

    with monkeypatch.context() as m:
        _with_signal(m, signal.SIGTERM, step=4)  # in the second epoch (3 steps per epoch)
        code, out = run_main([*base, f"--run_root={tmp_path / 'cut'}"], capfd)
    assert_one_error(code, out, "SIGTERM", "--ckpt_path=last", "interrupted.ckpt", status=143)
    (run,) = (tmp_path / "cut" / "resume").glob("*")
    assert (run / "checkpoints" / "interrupted.ckpt").is_file() and not (run / "results.json").exists()
    partial = torch.load(run / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert partial["global_step"] == 4

    code, out = run_main([*base, f"--run_root={tmp_path / 'cut'}", "--ckpt_path=last"], capfd)
    assert code == 0, out[-2000:]
    resumed = sorted((tmp_path / "cut" / "resume").glob("*/checkpoints/last.ckpt"))[-1]
    assert resumed.parent.parent != run
    theirs, ours = _weights(straight), _weights(resumed)
    assert theirs.keys() == ours.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)
    results = json.loads((resumed.parent.parent / "results.json").read_text())
    assert results["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert results["weights"] == "final" and results["subcommand"] == "fit"

    # the same weights evaluated alone, and the starting weights: results.json says which were tested
    for ckpt, weights in ((resumed, str(resumed)), (None, "start")):
        extra = [f"--ckpt_path={ckpt}"] if ckpt else []
        code, out = run_main(["robust-eval", *TINY, f"--run_root={tmp_path / 'eval'}", *extra], capfd)
        assert code == 0, out[-2000:]
        (results,) = (tmp_path / "eval").glob("*/*/results.json")
        payload = json.loads(results.read_text())
        assert payload["weights"] == weights and payload["subcommand"] == "robust-eval"
        results.unlink()


def test_sigint_mid_fit_exits_130_with_a_checkpoint(tmp_path, capfd, monkeypatch):
    _with_signal(monkeypatch, signal.SIGINT, step=1)
    code, out = run_main(["fit", *TINY, *FAST_FIT, f"--run_root={tmp_path}"], capfd)
    assert_one_error(code, out, "SIGINT", status=130)
    assert list(tmp_path.glob("*/*/checkpoints/interrupted.ckpt"))


# -- real processes -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_command_bad_checkpoint(tmp_path, bad_checkpoints):
    proc = subprocess.run(
        [sys.executable, "-m", "mat_lightning", "robust-eval", *TINY, f"--run_root={tmp_path}"]
        + [f"--ckpt_path={bad_checkpoints['random']}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --ckpt_path")
    assert not list(tmp_path.glob("*/*"))


@pytest.mark.slow
def test_real_command_sigterm_exits_143_and_resumes(tmp_path):
    """A real `mat fit` process, SIGTERM after its first epoch: status 143, one message, a resumable run."""
    cmd = [
        sys.executable,
        "-m",
        "mat_lightning",
        "fit",
        *TINY,
        f"--run_root={tmp_path}",
        "--data.batch_size=32",
    ]
    cmd += ["--robust_eval.attacks=[]", "--data.max_eval_images=8"]
    with (
        open(tmp_path / "out", "w") as out,
        open(tmp_path / "err", "w") as err,
    ):  # files: a full pipe would block
        proc = subprocess.Popen([*cmd, "--trainer.max_epochs=50"], stdout=out, stderr=err)
        t0 = time.time()
        while not list(tmp_path.glob("*/*/checkpoints/last.ckpt")) and time.time() - t0 < 300:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    output = (tmp_path / "out").read_text() + (tmp_path / "err").read_text()
    assert proc.returncode == 143, output[-2000:]
    assert "Traceback" not in output and "--ckpt_path=last" in output.splitlines()[-1]
    assert list(tmp_path.glob("*/*/checkpoints/interrupted.ckpt"))
    resumed = subprocess.run(
        [*cmd, "--trainer.max_epochs=2", "--ckpt_path=last"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (results,) = [p for p in tmp_path.glob("*/*/results.json")]
    assert json.loads(results.read_text())["resumed_from"].endswith("last.ckpt")


def test_a_copy_of_a_training_image_in_the_val_split_is_refused(tmp_path, capfd):
    for name, colour in (("a.png", 10), ("b.png", 120)):
        Image.new("RGB", (16, 16), (colour, 0, 0)).save(tmp_path / name)
    (tmp_path / "copy_of_a.png").write_bytes((tmp_path / "a.png").read_bytes())
    files = {}
    for split, images in (("train", ["a.png", "b.png"]), ("val", ["copy_of_a.png"])):
        files[split] = tmp_path / f"{split}.json"
        files[split].write_text(json.dumps([{"image": i, "caption": f"picture {i}"} for i in images]))
    annotations = f"--data.annotations={{train: {files['train']}, val: {files['val']}, test: {files['val']}}}"
    code, out = run_main(
        ["fit", *TINY, *FAST_FIT, f"--run_root={tmp_path / 'runs'}", "--data.dataset=custom", annotations]
        + [f"--data.root={tmp_path}", "--data.batch_size=2"],
        capfd,
    )
    assert_one_error(code, out, "copy_of_a.png", "a.png", "'train' split")
    assert not list((tmp_path / "runs").glob("*/*")), "a failed run left its folder"
