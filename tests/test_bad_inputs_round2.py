"""The second red-team round (issue 23, item 4; the --export and EXIF parts of item 3): each bad input gives exit
status 2 and one ``error:`` line naming what to change, before any expensive work (no clean pass, no training step),
through the ``mat`` CLI's main function (helpers of ``test_bad_inputs.py``).

Where "before any work" is the point, the test replaces the expensive step by one that fails the test if reached.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_inputs import FAST_FIT, TINY, assert_one_error, run_main

from mat_lightning.cli import main
from mat_lightning.errors import ConfigError, check_eps_255

PGD = "mat_lightning.attacks.PGD"
TORCHATTACKS = "mat_lightning.attacks.adapters.TorchattacksAttack"


def _no_evaluation(monkeypatch) -> None:
    """The robust evaluation's first split pass (the clean one) fails the test: validation must come before it."""

    def reached(*args, **kwargs):
        raise AssertionError("the evaluation started before the bad input was refused")

    monkeypatch.setattr("mat_lightning.eval.robust._encode_split", reached)


def _no_training(monkeypatch) -> None:
    def reached(*args, **kwargs):
        raise AssertionError("training started before the bad input was refused")

    monkeypatch.setattr("mat_lightning.module.MatModule.training_step", reached)


def _data_check(capfd, annotations: Path, *extra: str) -> tuple[int, str]:
    """``mat data check`` of a test-only custom set."""
    return run_main(
        ["data", "check", "--data.dataset=custom", f"--data.annotations={{test: {annotations}}}", *extra],
        capfd,
    )


# -- annotation files ---------------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_one_error(tmp_path, capfd):
    """200,000 nested lists: Python's JSON parser raised RecursionError (a traceback)."""
    ann = tmp_path / "deep.json"
    ann.write_text("[" * 200_000 + "]" * 200_000)
    code, out = _data_check(capfd, ann)
    assert_one_error(code, out, str(ann), "nested too deeply")


@pytest.mark.parametrize(
    ("field", "data"),
    [
        (
            "annotations[0]['image_id']",
            {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": [1], "caption": "x"}]},
        ),
        ("images[0]['id']", {"images": [{"id": {"n": 1}, "file_name": "a.png"}], "annotations": []}),
    ],
    ids=["image_id_list", "id_object"],
)
def test_coco_ids_must_be_integers_or_strings(tmp_path, capfd, field, data):
    """A list as COCO image_id raised TypeError (unhashable) while keying the captions."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps(data))
    code, out = _data_check(capfd, ann)
    assert_one_error(code, out, field, "must be an integer or a string")


def test_unreadable_image_entries_say_which_and_why(tmp_path, capfd):
    """An absolute path, a symbolic-link loop and a dangling link were all "missing" with the advice to check
    --data.image_root, which fixes none of them: each entry now names its own reason."""
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(img / "ok.png")
    (img / "loop_a.png").symlink_to(img / "loop_b.png")
    (img / "loop_b.png").symlink_to(img / "loop_a.png")
    (img / "dangling.png").symlink_to(tmp_path / "gone.png")
    (img / "folder.png").mkdir()
    entries = {
        "ok.png": None,
        "/nonexistent/abs.png": "an absolute path",
        "loop_a.png": "symbolic-link loop",
        "dangling.png": f"a symbolic link to {tmp_path / 'gone.png'}, which does not exist",
        "folder.png": "a folder",
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": name, "caption": f"picture {i}"} for i, name in enumerate(entries)]))
    code, out = _data_check(capfd, ann, f"--data.image_root={img}")
    assert code == 2 and "Traceback" not in out, out[-2000:]
    assert "4 of 5 images" in out
    for name, reason in entries.items():
        if reason is not None:
            (line,) = [
                line
                for line in out.splitlines()
                if line.strip().startswith(str(img / name) if not name.startswith("/") else name)
            ]
            assert reason in line, (name, line)
    assert "--data.image_root" not in out  # nothing here is fixed by another image root


# -- attacks, evaluation settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (
            [f"--robust_eval.attacks=[{{class_path: {TORCHATTACKS}, init_args: {{kwargs: {{stepz: 3}}}}}}]"],
            ["['stepz']", "torchattacks.PGD", "steps"],
        ),
        (
            [f"--robust_eval.attacks=[{{class_path: {TORCHATTACKS}, init_args: {{attack: NoSuch}}}}]"],
            ["attack='NoSuch'"],
        ),
        (["--robust_eval.ks=[5, 10]"], ["robust_eval.ks=[5, 10]", "[1, 5, 10]"]),
        (["--robust_eval.ks=[1, 0]"], ["robust_eval.ks"]),
        (
            [
                f"--robust_eval.attacks=[{{class_path: {PGD}, init_args: {{steps: 1}}}}]",
                "--robust_eval.eps_255_grid=[2, .inf]",
            ],
            ["robust_eval.eps_255_grid", "finite"],
        ),
        (
            [
                f"--robust_eval.attacks=[{{class_path: {PGD}, init_args: {{steps: 1}}}}]",
                "--robust_eval.eps_255_grid=[.nan]",
            ],
            ["robust_eval.eps_255_grid"],
        ),
        (["--ckpt_path=best"], ["--ckpt_path=best", "robust-eval"]),
    ],
    ids=[
        "torchattacks_kwarg",
        "torchattacks_name",
        "ks_without_1",
        "ks_zero",
        "grid_inf",
        "grid_nan",
        "ckpt_best",
    ],
)
def test_evaluation_settings_are_refused_before_the_clean_pass(tmp_path, capfd, monkeypatch, args, names):
    """Before: a wrong torchattacks kwarg failed after the clean pass (TypeError), ks=[5, 10] after all attacks
    (KeyError 'tr_r1'), an inf in the ε grid after every attack (in the plot), --ckpt_path=best in Lightning."""
    _no_evaluation(monkeypatch)
    code, out = run_main(["robust-eval", *TINY, f"--run_root={tmp_path / 'runs'}", *args], capfd)
    assert_one_error(code, out, *names)
    assert not list((tmp_path / "runs").glob("*/*")), "a failed run left its folder"


def test_torchattacks_kwargs_are_checked_at_construction():
    from mat_lightning.attacks.adapters import TorchattacksAttack

    with pytest.raises(ConfigError, match="stepz"):
        TorchattacksAttack("PGD", kwargs={"stepz": 3})
    attack = TorchattacksAttack("PGD", kwargs={"steps": 3, "alpha_255": 0.5, "random_start": False})
    assert attack.kwargs["steps"] == 3  # real arguments (and our alpha_255) pass


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0, -1, "x", [2, float("inf")]])
def test_check_eps_255_refuses_non_budgets(value):
    with pytest.raises(ConfigError, match="--eps"):
        check_eps_255(value, "--eps")


def test_check_eps_255_keeps_valid_budgets():
    assert check_eps_255([1, 2.5, "4"], "x") == [1.0, 2.5, 4.0]
    assert check_eps_255(8, "x") == [8.0]


@pytest.mark.parametrize("eps", ["inf", "nan", "0"])
def test_mat_eval_eps_is_named_as_the_flag(tmp_path, capfd, eps):
    """--eps inf was blamed on robust_eval.attacks (a key the user never typed)."""
    code, out = run_main(
        ["eval", "--model", "mat-tiny", "--pretrained", "synthetic:tiny", "--dataset", "synthetic"]
        + ["--world", "tiny", "--attacks", "pgd", "--eps", eps, "--run-root", str(tmp_path)],
        capfd,
    )
    assert_one_error(code, out, "mat eval --eps")
    assert "robust_eval.attacks" not in out


def test_truncated_cached_mlm_says_delete_it(tmp_path, capfd, monkeypatch, tiny_mlm):
    """A truncated safetensors file of the cached masked LM raised SafetensorError (a traceback), with no hint."""
    cache = tmp_path / "cache"
    cache.mkdir()
    mlm = Path(tiny_mlm)
    shared = Path(os.environ["MAT_CACHE_DIR"])
    top = next(p for p in shared.iterdir() if mlm.resolve().is_relative_to(p.resolve()))
    for entry in shared.iterdir():
        if entry != top:
            (cache / entry.name).symlink_to(entry)
    shutil.copytree(top, cache / top.name)
    (weights,) = (cache / top.name).rglob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    monkeypatch.setenv("MAT_CACHE_DIR", str(cache))
    from mat_lightning.attacks.bert_attack import load_mlm

    load_mlm.cache_clear()
    _no_evaluation(monkeypatch)
    attacks = "--robust_eval.attacks=[{class_path: mat_lightning.attacks.BertAttack, init_args: {mlm: 'synthetic:tiny'}}]"
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path / 'runs'}", attacks], capfd)
    load_mlm.cache_clear()
    assert_one_error(code, out, "delete it", str(cache / top.name))


# -- config files and options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("model:\n  lr: ${model.nosuch}\n", ["interpolation", "model.lr", "model.nosuch"]),
        ("model:\n  lr: ${oc.env:MAT_TEST_NOT_SET}\n", ["interpolation", "MAT_TEST_NOT_SET"]),
    ],
    ids=["missing_key", "missing_env"],
)
def test_unresolvable_interpolation_is_one_error(tmp_path, capfd, text, names):
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    code, out = run_main(["test", "--config", str(config), *TINY, f"--run_root={tmp_path / 'runs'}"], capfd)
    assert_one_error(code, out, *names)


@pytest.mark.parametrize("command", [["test"], ["robust-eval"], ["data", "check"]])
def test_binary_config_file_is_one_error(tmp_path, capfd, command):
    """jsonargparse (and the front door's key check) read a binary --config with a UnicodeDecodeError traceback.
    Through the `mat` script's entry point (front door first) and the CLI's main function alike."""
    from mat_lightning.main import main as mat

    config = tmp_path / "weights.bin"
    config.write_bytes(bytes(range(256)) * 4)
    for entry in (mat, main):
        try:
            entry([*command, "--config", str(config)])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capfd.readouterr()
        assert_one_error(code, out + err, str(config), "not a text file")


def test_split_typo_is_not_called_a_corrupt_cache(tmp_path, capfd):
    """A wrong split name on the (valid, cached) synthetic world was reported as a corrupt cache to delete."""
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path}", "--data.test_split=tset"], capfd)
    assert_one_error(code, out, "'tset'", "--data.test_split")
    assert "corrupt" not in out and "delete" not in out


@pytest.mark.parametrize("lr", ["-1", ".nan", ".inf"])
def test_learning_rate_must_be_finite_and_not_negative(tmp_path, capfd, monkeypatch, lr):
    """A negative lr failed in torch's AdamW (ValueError traceback) once training set up."""
    _no_training(monkeypatch)
    code, out = run_main(["fit", *TINY, *FAST_FIT, f"--run_root={tmp_path}", f"--model.lr={lr}"], capfd)
    assert_one_error(code, out, "--model.lr=")


# -- checkpoints --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_only_checkpoints(tmp_path_factory):
    """The tiny model's real weights as {'state_dict'} alone (no Lightning keys), and with one value an int."""
    from mat_lightning import synthetic
    from mat_lightning.models.encoder import OpenClipEncoder
    from mat_lightning.module import MatModule

    folder = tmp_path_factory.mktemp("weights_only")
    state = MatModule(OpenClipEncoder("mat-tiny", pretrained=str(synthetic.ensure_clip("tiny")))).state_dict()
    torch.save({"state_dict": state}, folder / "state_dict_only.ckpt")
    with_int = {**state, next(iter(state)): 5}
    torch.save({"state_dict": with_int, "pytorch-lightning_version": "2.6.0"}, folder / "int_value.ckpt")
    return folder


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("state_dict_only", "not written by a Lightning Trainer"),
        ("int_value", "is a int, not a tensor"),
    ],
)
def test_checkpoints_with_bare_weights_are_refused(
    tmp_path, capfd, monkeypatch, weights_only_checkpoints, name, message
):
    """Both failed inside Lightning's restore with KeyError 'pytorch-lightning_version' (a traceback)."""
    _no_evaluation(monkeypatch)
    path = weights_only_checkpoints / f"{name}.ckpt"
    code, out = run_main(["robust-eval", *TINY, f"--run_root={tmp_path}", f"--ckpt_path={path}"], capfd)
    assert_one_error(code, out, str(path), message)


# -- files written: atomic config.yaml, W&B folders, mat report ---------------------------------------------------------


class _FullDisk:
    """``open`` for ``mat_lightning.files``: writes half of the data, then fails as a full disk does."""

    def __init__(self, real_open) -> None:
        self.real_open, self.failed = real_open, []

    def __call__(self, path, mode="r", *args, **kwargs):
        f = self.real_open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        outer = self

        class Half:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                f.write(data[: len(data) // 2])
                outer.failed.append(Path(path))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return Half()


def test_full_disk_leaves_no_truncated_config(tmp_path, capfd, monkeypatch):
    """config.yaml was written in place: a full disk left half a file (and a traceback)."""
    import builtins

    full = _FullDisk(builtins.open)
    monkeypatch.setattr("mat_lightning.files.open", full, raising=False)
    _no_evaluation(monkeypatch)
    code, out = run_main(["test", *TINY, f"--run_root={tmp_path}"], capfd)
    assert_one_error(code, out, "config.yaml", os.strerror(errno.ENOSPC))
    assert full.failed and full.failed[0].name.startswith(".config.yaml.tmp")
    assert not list(tmp_path.rglob("*config.yaml*")), "a half-written config file was left"


def test_atomic_write_keeps_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    import builtins

    from mat_lightning.errors import WriteError
    from mat_lightning.files import atomic_write

    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")
    monkeypatch.setattr("mat_lightning.files.open", _FullDisk(builtins.open), raising=False)
    with pytest.raises(WriteError, match="No space left"):
        atomic_write(target, "new: 2\n" * 100)
    assert target.read_text() == "old: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_unwritable_home_does_not_fail_after_the_results(tmp_path, capfd, monkeypatch):
    """W&B staged its results artifact under ~/.local/share and failed (PermissionError) after the evaluation:
    the folders it cannot write now move into the run folder before the run."""
    home_file = tmp_path / "home-is-a-file"
    home_file.write_text("")
    monkeypatch.setenv("HOME", str(home_file / "home"))  # no folder can be made there, not even by root
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    code, out = run_main(
        ["test", *TINY, f"--run_root={tmp_path / 'runs'}", "--data.max_eval_images=4"], capfd
    )
    assert code == 0, out[-3000:]
    (run,) = (tmp_path / "runs").glob("*/*")
    assert (run / "results.json").is_file()
    assert os.environ["WANDB_DATA_DIR"].startswith(str(run))
    assert "not writable" in out  # said once, before the run


def _results(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"experiment": "x", "rows": rows}))
    return folder


def test_report_out_must_be_a_folder(tmp_path, capfd):
    run = _results(tmp_path / "run", [{"attack": "clean", "eps_255": 0.0, "tr_r1": 50.0, "ir_r1": 40.0}])
    existing = tmp_path / "table.md"
    existing.write_text("mine")
    code, out = run_main(["report", str(run), "--out", str(existing)], capfd)
    assert_one_error(code, out, f"--out {existing} is a file")
    assert existing.read_text() == "mine"


def test_report_of_empty_rows_names_the_file(tmp_path, capfd):
    """Empty rows were reported as '--metrics tr_r1 ir_r1: not in the results; known: ' (nothing)."""
    run = _results(tmp_path / "run", [])
    code, out = run_main(["report", str(run)], capfd)
    assert_one_error(code, out, str(run / "results.json"), "'rows' is empty")


# -- augment ------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def train_ann(tmp_path):
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"image": "a.png", "caption": "a red square"}]))
    return ann


def test_augment_rewrite_refuses_a_masked_lm(tmp_path, capfd, train_ann, tiny_mlm):
    """A BERT masked LM was loaded as a causal LM (random head) and crashed in generate (IndexError)."""
    code, out = run_main(
        [
            "augment",
            "rewrite",
            "--model",
            tiny_mlm,
            "--annotations",
            str(train_ann),
            "--out",
            str(tmp_path / "o.json"),
        ]
        + ["--device", "cpu"],
        capfd,
    )
    assert_one_error(code, out, tiny_mlm, "is a masked LM", "causal")
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("prompt", ["say {0}: {caption}", "{caption} in {style}", "{caption} {"])
def test_augment_rewrite_prompt_with_other_braces(tmp_path, capfd, train_ann, tiny_mlm, prompt):
    """'{0}' in the prompt raised IndexError from str.format after the model had loaded."""
    code, out = run_main(
        ["augment", "rewrite", "--model", tiny_mlm, "--annotations", str(train_ann), "--prompt", prompt]
        + ["--out", str(tmp_path / "o.json")],
        capfd,
    )
    assert_one_error(code, out, "--prompt", "{{")


# -- images: undecodable test image before training, EXIF orientation ---------------------------------------------------


def test_undecodable_test_image_is_found_before_training(tmp_path, capfd, monkeypatch):
    """It was found by the test pass, after training had run."""
    for name, colour in (("a.png", 10), ("b.png", 120), ("c.png", 250)):
        Image.new("RGB", (16, 16), (colour, 0, 0)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    files = {}
    for split, images in (("train", ["a.png", "b.png"]), ("val", ["c.png"]), ("test", ["broken.png"])):
        files[split] = tmp_path / f"{split}.json"
        files[split].write_text(json.dumps([{"image": i, "caption": f"picture {i}"} for i in images]))
    _no_training(monkeypatch)
    annotations = (
        f"--data.annotations={{train: {files['train']}, val: {files['val']}, test: {files['test']}}}"
    )
    code, out = run_main(
        ["fit", *TINY, *FAST_FIT, f"--run_root={tmp_path / 'runs'}", "--data.dataset=custom", annotations]
        + [f"--data.root={tmp_path}", "--data.batch_size=2"],
        capfd,
    )
    assert_one_error(code, out, "broken.png", "cannot be decoded")


def _jpeg_with_orientation(path: Path, orientation: int) -> None:
    """32 x 16 px, left half red, right half blue, with an EXIF orientation tag."""
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = (255, 0, 0)
    pixels[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=100, exif=exif)


def test_exif_orientation_is_not_applied_and_data_check_lists_it(tmp_path, capfd):
    """The references read JPEGs without exif_transpose; we keep that and say so. A bug that applied the tag (rotate
    90° clockwise for orientation 6) would give a red top and a blue bottom."""
    from mat_lightning.data.datamodule import load_image

    _jpeg_with_orientation(tmp_path / "rotated.jpg", 6)
    _jpeg_with_orientation(tmp_path / "upright.jpg", 1)
    image = load_image(tmp_path / "rotated.jpg", 16).permute(1, 2, 0).numpy()  # the centre 16 x 16 crop
    left, right = image[:, :6].reshape(-1, 3).mean(0), image[:, 10:].reshape(-1, 3).mean(0)
    assert left[0] > 200 > 60 > left[2] and right[2] > 200 > 60 > right[0], (
        left,
        right,
    )  # JPEG blurs the edge
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": n, "caption": n} for n in ("rotated.jpg", "upright.jpg")]))
    code, out = _data_check(capfd, ann)
    assert code == 0, out[-2000:]
    (note,) = [line for line in out.splitlines() if "EXIF orientation" in line]
    assert note.startswith("note: 1 images")
    assert "rotated.jpg (orientation 6: rotated 90° clockwise)" in out and "upright.jpg" not in out


# -- --export: one consistent adversarial set per folder ----------------------------------------------------------------


def _export(encoder, folder: Path, n: int) -> None:
    from mat_lightning.attacks import PGD as PGDAttack
    from mat_lightning.data.datamodule import RetrievalDataModule
    from mat_lightning.eval.robust import robust_retrieval
    from mat_lightning.synthetic import data_args

    dm = RetrievalDataModule(**data_args("tiny"), image_size=64, eval_batch_size=8, max_eval_images=n)
    dm.setup("test")
    robust_retrieval(encoder, dm.test_dataloader(), [PGDAttack(steps=1)], progress=False, export_dir=folder)


def test_a_second_export_replaces_the_first(tiny_encoder, tmp_path):
    """16 then 4 images into one --export folder left 32 image files beside a 4-entry captions.json."""
    _export(tiny_encoder, tmp_path, 16)
    _export(tiny_encoder, tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgd_eps2"]  # no staging or old copy left
    folder = tmp_path / "pgd_eps2"
    entries = json.loads((folder / "captions.json").read_text())
    assert [e["image_index"] for e in entries] == [0, 1, 2, 3]
    files = sorted(p.name for p in (folder / "images").iterdir())
    assert files == sorted(f"{i:06d}.{ext}" for i in range(4) for ext in ("png", "pt"))


def test_export_into_a_folder_of_other_files_is_refused(tmp_path, capfd, monkeypatch):
    export = tmp_path / "export"
    (export / "pgd_eps2").mkdir(parents=True)
    (export / "pgd_eps2" / "captions.json").write_text("[]")  # an earlier export: fine, replaced
    (export / ".pgd_eps2.partial").mkdir()  # an interrupted one: removed
    (export / "notes.txt").write_text("mine")
    _no_evaluation(monkeypatch)
    attacks = f"--robust_eval.attacks=[{{class_path: {PGD}, init_args: {{steps: 1}}}}]"
    code, out = run_main(
        ["robust-eval", *TINY, f"--run_root={tmp_path / 'runs'}", attacks, "--export", str(export)], capfd
    )
    assert_one_error(code, out, str(export), "notes.txt", "new or empty folder")
    assert (export / "notes.txt").read_text() == "mine" and (export / "pgd_eps2" / "captions.json").is_file()
