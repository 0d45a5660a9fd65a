"""The ``mat`` command's front door: the list of commands, short help, ``mat report`` and the one-call ``mat eval``.

It imports no training stack: ``mat --help``, ``mat help <cmd>`` and ``mat report`` answer at once; every other
command is handed to :func:`mat_lightning.cli.main` (the LightningCLI). ``mat eval`` translates its few options into
the same ``mat test`` configuration an experiment file gives (in the spirit of CLIP_benchmark's and RobustBench's
one-call evaluations), so it writes the same run folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mat_lightning import options
from mat_lightning.errors import ConfigError, MatError, check_eps_255

REPO_ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "fit": "train with a defense, then robust evaluation of the final weights",
    "validate": "clean validation recall of a checkpoint or the starting weights",
    "test": "clean recall + robust evaluation of a checkpoint or start weights",
    "robust-eval": "the robust evaluation (mat test by its name; --export DIR)",
    "eval": "one call, no YAML: --model --pretrained --dataset --attacks ...",
    "data": "data check: read every split, decode every image, list problems",
    "report": "a paper-style table across runs (only comparable runs averaged)",
    "augment": "write MAT+ 1:N augmentation files (rewrite | i2t), local model",
    "transfer": "evaluate target models on adversarial sets exported elsewhere",
}

HELP = (
    "usage: mat <command> [options]\n\n"
    "Multimodal adversarial training and robust image-text retrieval (README.md).\n\ncommands:\n"
    + "".join(f"  {name:<12} {line}\n" for name, line in COMMANDS.items())
    + "\nmat help <command>: its main options.  mat <command> --help: all of them.\n"
)


def _options(pairs: list[tuple[str, str]], width: int = 80) -> str:
    """Option lines: ``  --opt  description``, the description on its own line when both do not fit."""
    lines = []
    for opt, text in pairs:
        one = f"  {opt:<24} {text}"
        lines += [one] if len(one) <= width and len(opt) <= 24 else [f"  {opt}", f"{'':<8}{text}"]
    return "\n".join(lines) + "\n"


_COMMON = [
    ("--config FILE", "an experiment (experiments/*.yaml); options after it override it"),
    ("--experiment NAME", "run name: the run folder is <run_root>/<experiment>/<time>/"),
    ("--run_root DIR", "where run folders go (default: runs)"),
    ("--seed_everything N", "the seed (default 0)"),
    ("--model.encoder.init_args.model_name NAME", "the open_clip model, e.g. ViT-B-16"),
    ("--model.encoder.init_args.pretrained TAG|FILE", "its weights: an open_clip tag or a checkpoint file"),
    ("--model.defense CLASS", "Clean, ImageAT, TeCoA, FARE, TextAT, MMCoA, MAT, MAT1N"),
    ("--data.dataset NAME", "synthetic, flickr30k, coco or custom"),
    ("--data.root DIR", "the data set's folder (annotations and images)"),
    ("--data.annotations FILE", "an annotation file, or '{test: file, ...}' per split"),
    ("--data.max_eval_images N", "evaluate on the first N test images only (a quick look)"),
    ("--robust_eval FILE", "the evaluation attacks (conf/attack/*.yaml)"),
    ("--robust_eval.eps_255_grid [1,2,4,8]", "every image attack over an ε grid as well"),
    ("--robust_eval.mlm FOLDER|NAME", "the masked LM of every text attack"),
    ("--trainer.accelerator cpu|gpu|auto", "and --trainer.devices N"),
    ("--print_config", "print the fully resolved config (a valid config file) and exit"),
]
_CKPT = [("--ckpt_path FILE", "the checkpoint to load (default: the configured starting weights)")]

SHORT_HELP = {
    "fit": "usage: mat fit --config experiments/<name>.yaml [options]\n\n"
    + COMMANDS["fit"]
    + ".\n\n"
    + _options(
        _COMMON
        + [
            ("--trainer.max_epochs N", "training length"),
            ("--model.lr LR", "and --model.weight_decay"),
            ("--test_ckpt last|best", "test the final weights (default) or the best by clean recall"),
        ]
    ),
    "validate": "usage: mat validate --config <experiment.yaml> [--ckpt_path FILE] [options]\n\n"
    + COMMANDS["validate"]
    + ".\n\n"
    + _options(_COMMON + _CKPT),
    "test": "usage: mat test --config <experiment.yaml> [--ckpt_path FILE] [options]\n\n"
    + COMMANDS["test"]
    + ".\n\n"
    + _options(_COMMON + _CKPT),
    "robust-eval": "usage: mat robust-eval --config <experiment.yaml> [--ckpt_path FILE]\n"
    "                       [--export DIR] [options]\n\n"
    + COMMANDS["robust-eval"]
    + ".\n\n"
    + _options(
        _COMMON + _CKPT + [("--export DIR", "also write the adversarial test sets (PNG, .pt, captions)")]
    )
    + "\nAll options: the same as `mat test --help`.\n",
    "data": "usage: mat data check [--config FILE] --data.dataset=NAME --data.root=DIR\n\n"
    + COMMANDS["data"]
    + ".\nA test-only set: --data.annotations='{test: file.json}' checks just that split.\n",
    "report": "usage: mat report RUNS... [--metrics ...] [--attacks ...] [--eps E]\n"
    "                  [--format md|csv|latex] [--out DIR]\n\n"
    + COMMANDS["report"]
    + ".\nDetails: mat report --help\n",
    "augment": "usage: mat augment rewrite|i2t --model <local HF model> --annotations FILE --out FILE\n\n"
    + COMMANDS["augment"]
    + ".\nDetails: mat augment --help\n",
    "transfer": "usage: mat transfer --sets DIR --target CONFIG[@CKPT] [--target ...]\n"
    "                    [--run_root DIR] [-- <options for every target>]\n\n"
    + COMMANDS["transfer"]
    + "\n(mat robust-eval --export DIR writes them): rows = source sets, columns = targets,\nR@1 flip rate and recall.\n"
    "Details: mat transfer --help\n",
}

# -- mat eval -----------------------------------------------------------------------------------------------------------

ATTACK_NAMES = {
    "PGD": "pgd",
    "BertAttack": "bert_attack",
    "SepAttack": "sep_attack",
    "CoAttack": "co_attack",
    "SGA": "sga",
}
SUITE = REPO_ROOT / "conf" / "attack" / "synthetic_suite.yaml"


def suite_names() -> list[str]:
    """The row labels of the suite ``mat eval`` picks its attacks from, in order."""
    import yaml

    return [row_name(a) for a in yaml.safe_load(SUITE.read_text())["attacks"]]


def row_name(spec: dict) -> str:
    """An attack spec's row label: its ``name`` init arg, else its class's (``BertAttack`` -> ``bert_attack``)."""
    return spec.get("init_args", {}).get("name") or ATTACK_NAMES[spec["class_path"].rsplit(".", 1)[-1]]


def _set_in(spec: dict, cls: str, key: str, value) -> None:
    """Set ``init_args[key]`` of every ``cls`` in an attack spec, including a multimodal attack's parts."""
    if spec.get("class_path", "").rsplit(".", 1)[-1] == cls:
        spec.setdefault("init_args", {})[key] = value
    for part in ("image_attack", "text_attack"):
        if isinstance(spec.get("init_args", {}).get(part), dict):
            _set_in(spec["init_args"][part], cls, key, value)


def eval_attacks(names: str, mlm: str, eps_255: float | None) -> list[dict]:
    """The attacks of ``conf/attack/*_suite.yaml`` named in ``names`` (comma-separated), with ``mlm`` and ε set."""
    import yaml

    suite = yaml.safe_load(SUITE.read_text())["attacks"]
    by_name = {row_name(a): a for a in suite}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown or not wanted:
        raise ConfigError(f"--attacks {names!r}: unknown {unknown}; choose from {','.join(by_name)}")
    out = []
    for name in wanted:
        spec = json.loads(json.dumps(by_name[name]))
        _set_in(spec, "BertAttack", "mlm", mlm)
        if eps_255 is not None:
            _set_eps(spec, eps_255)
        out.append(spec)
    return out


def _set_eps(spec: dict, eps_255: float) -> None:
    """ε of every PGD in a spec; its step scales with it (as ``Attack.with_eps`` does)."""
    args = spec.get("init_args", {})
    if spec["class_path"].endswith(".PGD"):
        old = float(args.get("eps_255", 2.0))
        args["step_255"] = float(args.get("step_255", 0.5)) * eps_255 / old
        args["eps_255"] = eps_255
    for part in ("image_attack", "text_attack"):
        if isinstance(args.get(part), dict):
            _set_eps(args[part], eps_255)


def eval_args(argv: list[str]) -> list[str]:
    """``mat eval`` options -> the equivalent ``mat test`` arguments (unknown ``--a.b=c`` options pass through)."""
    p = argparse.ArgumentParser(
        prog="mat eval",
        description="Robust retrieval evaluation of a CLIP model in one call; writes the usual run folder "
        "(<run-root>/<experiment>/<time>/: config.yaml, results.json/.csv, curves.png/.pdf). Any `mat test` "
        "option (e.g. --trainer.devices=2) may follow.",
    )
    p.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-16 (mat-tiny: synthetic)")
    p.add_argument(
        "--pretrained", required=True, help="open_clip tag (openai), a checkpoint file, or synthetic"
    )
    p.add_argument("--dataset", required=True, choices=["flickr30k", "coco", "custom", "synthetic"])
    p.add_argument(
        "--data-root", default=None, help="folder with the annotations and images (real data sets)"
    )
    p.add_argument("--annotations", default=None, help="annotation file (custom; default: in --data-root)")
    p.add_argument("--world", default=None, help="synthetic world preset (default, rich, tiny)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument(
        "--attacks",
        default="pgd,bert_attack,sep_attack,co_attack,sga",
        help="comma-separated rows of conf/attack/synthetic_suite.yaml (default: the papers' five): "
        + ",".join(suite_names()),
    )
    p.add_argument("--eps", type=float, default=None, help="image budget in 1/255 (default 2, the papers')")
    p.add_argument(
        "--mlm",
        default=None,
        help="masked LM of the text attacks (default: bert-base-uncased; synthetic data: synthetic)",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=None, help="images per evaluation batch")
    p.add_argument("--experiment", default=None, help="run name (default: eval_<model>)")
    p.add_argument("--run-root", default="runs", help="where run folders go (default runs)")
    p.add_argument("--export", default=None, help="also write the adversarial test sets to this folder")
    args, rest = p.parse_known_args(argv)
    for extra in rest:
        if not extra.startswith("--"):
            raise ConfigError(f"mat eval: unexpected argument {extra!r} (options are --name value)")
    if args.eps is not None:
        check_eps_255(args.eps, "mat eval --eps")
    if args.dataset != "synthetic" and args.data_root is None and args.annotations is None:
        raise ConfigError(
            f"mat eval --dataset {args.dataset} needs --data-root <folder> (or --annotations <file>)"
        )
    mlm = args.mlm or (
        "synthetic" + (f":{args.world}" if args.world else "")
        if args.dataset == "synthetic"
        else "bert-base-uncased"
    )
    experiment = args.experiment or "eval_" + "".join(
        c if c.isalnum() or c in "-_." else "_" for c in args.model
    )
    out = [
        "test",
        f"--experiment={experiment}",
        f"--run_root={args.run_root}",
        f"--model.encoder.init_args.model_name={args.model}",
        f"--model.encoder.init_args.pretrained={args.pretrained}",
        f"--data.dataset={args.dataset}",
        f"--data.test_split={args.split}",
        f"--robust_eval.attacks={json.dumps(eval_attacks(args.attacks, mlm, args.eps))}",
    ]
    optional = {
        "--data.root": args.data_root,
        "--data.annotations": args.annotations,
        "--data.world": args.world,
        "--data.max_eval_images": args.max_images,
        "--data.eval_batch_size": args.batch_size,
        "--robust_eval.export_dir": args.export,
    }
    out += [f"{k}={v}" for k, v in optional.items() if v is not None]
    return out + rest


# -- dispatch -----------------------------------------------------------------------------------------------------------


def _wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def front_door(argv: list[str]) -> list[str] | None:
    """Answer what needs no training stack (help, report); return the arguments for the LightningCLI otherwise."""
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return None
    if argv[0] == "help":
        name = argv[1] if len(argv) > 1 else ""
        if name == "eval":
            eval_args(["--help"])
        if name not in SHORT_HELP:
            raise ConfigError(f"mat help {name!r}: no such command; commands: {', '.join(COMMANDS)}")
        print(SHORT_HELP[name], end="")
        return None
    if argv[0] == "report":
        from mat_lightning.eval.table import main as report

        report(argv[1:])
        return None
    if argv[0] == "data" and argv[1:2] != ["check"]:
        if _wants_help(argv):
            print(SHORT_HELP["data"], end="")
            return None
        raise ConfigError("usage: mat data check --data.dataset=NAME --data.root=DIR (see: mat help data)")
    if argv[0] == "robust-eval" and _wants_help(argv):
        print(SHORT_HELP["robust-eval"], end="")
        return None
    if argv[0] in ("fit", "validate", "test") and _wants_help(argv):
        print(SHORT_HELP[argv[0]] + "\n== all options ==\n", flush=True)
        if not _has_config(argv):  # without a config, the options read from the source answer at once
            print(_FULL_HELP_NOTE + options.help_text(argv[0]), end="")
            return None
    if argv[0] == "eval":
        return eval_args(argv[1:])
    return argv


def _has_config(argv: list[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)


_FULL_HELP_NOTE = (
    "Defaults as in the code; conf/base.yaml and --config files override them (--print_config shows the result).\n"
    "jsonargparse's complete help, with a config's values: mat <command> --config FILE --help.\n"
    "A class's own options: --model.defense.help MAT, --model.encoder.help OpenClipEncoder.\n\n"
)


def needs_no_training_stack(argv: list[str]) -> bool:
    """Whether :func:`front_door` answers ``argv`` by itself (help, report, a ``mat data`` usage error)."""
    return (
        not argv
        or argv[0] in ("-h", "--help", "help", "report")
        or (argv[0] == "data" and argv[1:2] != ["check"])
        or (argv[0] == "robust-eval" and _wants_help(argv))
        or (argv[0] in ("fit", "validate", "test") and _wants_help(argv) and not _has_config(argv))
    )


def check_before_import(argv: list[str]) -> None:
    """Argument errors the front door can find before the training stack is imported (10-20 s on a busy machine):
    an unknown command, ``mat eval``'s own options, and unknown options on the command line or in ``--config``
    files (:mod:`mat_lightning.options`). Anything subtler is left to jsonargparse."""
    command = argv[0]
    if command.startswith("-"):
        return  # options before the command: LightningCLI's own parser decides
    if command not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(command[:2])]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown command {command!r}{hint}; commands: {', '.join(COMMANDS)}")
    if command == "eval":
        options.check_args("test", eval_args(argv[1:])[1:])
    elif command in ("fit", "validate", "test", "robust-eval"):
        options.check_args(command, argv[1:])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if needs_no_training_stack(args):
            front_door(args)
            return
        check_before_import(args)
    except MatError as e:
        print(f"error: {e}", file=sys.stderr)
        if args and args[0] in ("fit", "validate", "test", "robust-eval", "eval"):
            print(f"(options: mat {args[0]} --help)", file=sys.stderr)
        sys.exit(2)
    from mat_lightning.cli import (
        main as cli_main,
    )  # calls front_door too (mat eval, short help before --help)

    cli_main(argv)


if __name__ == "__main__":
    main()
