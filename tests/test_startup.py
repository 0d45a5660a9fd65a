"""`mat` answers help and argument errors before it imports the training stack (issue 21 item 4).

Deterministic checks only (which modules were imported, which names are options); the times are measured by
`make bench` (benchmarks/run.py, ``cli_startup``), never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mat_lightning.errors import ConfigError
from mat_lightning.options import check_args, help_text, options

REPO = Path(__file__).resolve().parents[1]

# Runs `mat` in a fresh interpreter and reports its exit status, output and whether a heavy package got imported.
PROBE = """
import io, json, sys, contextlib
from mat_lightning.main import main
out, err = io.StringIO(), io.StringIO()
code = 0
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        main(json.loads(sys.argv[1]))
    except SystemExit as e:
        code = e.code
heavy = sorted(m for m in ("torch", "lightning", "open_clip", "transformers", "jsonargparse") if m in sys.modules)
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy}))
"""


def run_mat(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(argv))],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--help"], 0, "commands:"),
        (["fit", "--help"], 0, "--trainer.max_epochs"),
        (["test", "--help"], 0, "--ckpt_path"),
        (["fit", "--config", "experiments/smoke.yaml", "--nope=1"], 2, "unrecognized arguments: --nope=1"),
        (
            ["fit", "--config", "experiments/smoke.yaml", "--trainer.max_epoch=3"],
            2,
            "did you mean --trainer.max_epochs?",
        ),
        (["robust-eval", "--config", "experiments/smoke.yaml", "--model.lrr", "1"], 2, "--model.lrr"),
        (["fit", "--config", "experiments/nope.yaml"], 2, "experiments/nope.yaml: no such file"),
        (["eval"], 2, "the following arguments are required: --dataset"),
        (
            ["eval", "--model", "mat-tiny", "--pretrained", "synthetic", "--dataset", "synthetic", "--x.y=1"],
            2,
            "--x.y=1",
        ),
        (["fti"], 2, "unknown command 'fti'"),
    ],
)
def test_help_and_argument_errors_import_no_training_stack(argv, code, message):
    """Bug caught: a module-level ``import torch`` (or lightning, jsonargparse) on the front door's path, or a check
    that only happens in the LightningCLI, would make these answers take 10-20 s again."""
    got = run_mat(*argv)
    assert got["code"] == code, got
    assert message in got["out"] + got["err"], got
    assert got["heavy"] == [], got["heavy"]


def test_valid_options_are_not_rejected(tmp_path):
    """Bug caught: the light check rejecting what jsonargparse accepts (class-typed parameters' init_args, ``+=``,
    group config files, every shipped experiment and overlay)."""
    for path in sorted((REPO / "experiments").glob("*.yaml")) + [REPO / "conf" / "overlay" / "tiny.yaml"]:
        check_args("fit", ["--config", str(path)])
    check_args(
        "fit",
        [
            "--model.defense.init_args.text_attack.init_args.max_words=2",
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
            "--robust_eval",
            "conf/attack/synthetic_suite.yaml",
            "--model.lr",
            "1e-4",
            "--print_config=skip_null",
            "-c",
            str(REPO / "experiments" / "smoke.yaml"),
        ],
    )
    check_args("robust-eval", ["--export", str(tmp_path), "--ckpt_path", "x.ckpt"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 2\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer.max_epoch'.*trainer.max_epochs"):
        check_args("fit", ["--config", str(bad)])


def test_option_names_match_the_real_parser():
    """The names read from the source are the LightningCLI parser's, down to a class's parameters, for every
    subcommand. Bug caught: a new Trainer/MatModule/... parameter, a linked argument or a CLI option that the light
    check does not know (it would reject a valid option) or one it invents (it would let a typo through to the
    slow path)."""
    from mat_lightning.cli import MatCLI

    class Built(Exception):
        pass

    class Probe(MatCLI):
        def parse_arguments(self, parser, args):
            raise Built(parser)

    with pytest.raises(Built) as e:
        Probe(args=["fit"])
    subparsers = e.value.args[0]._subcommands_action._name_parser_map
    for sub in ("fit", "validate", "test"):
        real = {
            s[2:].rstrip("+")
            for a in subparsers[sub]._actions
            for s in a.option_strings
            if s.startswith("--") and s != "--help" and not s.endswith(".help") and s.count(".") <= 1
        }
        assert real == set(options(sub)), sub


def test_help_lists_every_option_once():
    text = help_text("fit")
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert len(listed) == len(set(listed))
    assert {f"--{name}" for name in options("fit")} == set(listed) | {
        line.split(":")[0] for line in text.splitlines() if line.startswith("--")
    }
    assert max(map(len, text.splitlines())) <= 80
