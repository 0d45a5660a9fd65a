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
    "eval": "one call, no YAML: --dataset --dataset_root --model --attacks ...",
    "data": "data check: read every split, decode every image, list problems",
    "report": "a paper-style table across runs (only comparable runs averaged)",
    "augment": "write MAT+ 1:N augmentation files (rewrite | i2t), local model",
    "transfer": "evaluate target models on adversarial sets exported elsewhere",
    "prepare-attacks": "build an experiment's text-attack candidate stores ahead",
}

HELP = (
    "usage: mat <command> [options]\n\n"
    "Multimodal adversarial training and robust image-text retrieval (README.md).\n\ncommands:\n"
    + "".join(
        f"  {name:<12} {line}\n" if len(name) <= 12 else f"  {name}\n  {'':<12} {line}\n"
        for name, line in COMMANDS.items()
    )
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
    ("--robust_eval.eps_255 E", "ε of every image attack (steps scale with it; README Budgets)"),
    ("--robust_eval.max_words N", "the word budget of every text attack"),
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
            ("--model.defense.eps_255 E", "ε of the training attack (and .max_words N: its words)"),
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
    "prepare-attacks": "usage: mat prepare-attacks --config <experiment.yaml> [options of mat fit]\n\n"
    + COMMANDS["prepare-attacks"]
    + ":\nBERT-Attack's substitutes and token ids of every train caption (the defense's text attack) and\n"
    "test caption (each text attack of the evaluation), computed once and cached; runs find them there.\n"
    "Takes the options of mat fit (the same config builds the same stores); trains nothing.\n",
}

# -- mat eval -----------------------------------------------------------------------------------------------------------

ATTACK_NAMES = {
    "PGD": "pgd",
    "BertAttack": "bert_attack",
    "SepAttack": "sep_attack",
    "CoAttack": "co_attack",
    "SGA": "sga",
}
#: The one definition of each evaluation suite: ``mat eval`` picks its rows from it and experiments load it
#: (``robust_eval: ../conf/attack/<suite>.yaml``), so both give the same rows on the same data and weights.
SUITE = REPO_ROOT / "conf" / "attack" / "synthetic_suite.yaml"
REAL_DATA_SUITE = REPO_ROOT / "conf" / "attack" / "bert_base_suite.yaml"
PAPERS_FIVE = "pgd,bert_attack,sep_attack,co_attack,sga"
DATASETS = ("synthetic", "flickr30k", "coco", "custom")
#: ``mat test`` options without a dot that ``mat eval`` passes through (dotted ones always pass).
PASS_THROUGH = ("--config", "--seed_everything", "--ckpt_path", "--print_config", "--local_models")


def suite_file(dataset: str) -> Path:
    """The suite ``mat eval`` evaluates with: the world's MLM on synthetic data, bert-base-uncased otherwise."""
    return SUITE if dataset == "synthetic" else REAL_DATA_SUITE


def suite_names(dataset: str = "synthetic") -> list[str]:
    """The row labels of the suite ``mat eval`` picks its attacks from, in order."""
    import yaml

    return [row_name(a) for a in yaml.safe_load(suite_file(dataset).read_text())["attacks"]]


def row_name(spec: dict) -> str:
    """An attack spec's row label: its ``name`` init arg, else its class's (``BertAttack`` -> ``bert_attack``)."""
    return spec.get("init_args", {}).get("name") or ATTACK_NAMES[spec["class_path"].rsplit(".", 1)[-1]]


def eval_attacks(names: str, dataset: str = "synthetic") -> list[dict]:
    """The attack specs of the data set's suite (:func:`suite_file`) named in ``names`` (comma-separated), as
    written there: budgets, MLM and ε are changed by ``robust_eval`` options, never here."""
    import yaml

    suite = yaml.safe_load(suite_file(dataset).read_text())["attacks"]
    by_name = {row_name(a): a for a in suite}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown or not wanted:
        raise ConfigError(
            f"--attacks {names!r}: unknown {unknown}; the {dataset} suite "
            f"({suite_file(dataset).relative_to(REPO_ROOT)}) has {','.join(by_name)}"
        )
    return [by_name[name] for name in wanted]


class _Renamed(argparse.Action):
    """An option's old spelling (``--data-root``), hidden from the help: it still works, with one deprecation line."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    # the front door parses mat eval's options twice (a check, then the run): say it once
    said: set[str] = set()

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string not in self.said:
            self.said.add(option_string)
            print(f"mat eval: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_renamed(p: argparse.ArgumentParser, new: str, old: str, **kwargs) -> None:
    p.add_argument(new, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k == "type"}
    p.add_argument(old, dest=new[2:], action=_Renamed, new=new, help=argparse.SUPPRESS, **kwargs)


def eval_parser() -> argparse.ArgumentParser:
    """``mat eval``'s options: CLIP_benchmark's names where it has one (``--dataset_root``, ``--output``,
    ``--task``, ``--batch_size``), underscores like every ``mat`` option."""
    p = argparse.ArgumentParser(
        prog="mat eval",
        allow_abbrev=False,
        description="Robust retrieval evaluation of a CLIP model in one call (CLIP_benchmark's option names); "
        "writes the usual run folder (<run_root>/<experiment>/<time>/: config.yaml, results.json/.csv, "
        "curves.png/.pdf). Attacks: conf/attack/synthetic_suite.yaml on synthetic data, bert_base_suite.yaml "
        "on real data, the files experiments load. Any dotted `mat test` option (e.g. --trainer.devices=2) may "
        "follow.",
    )
    p.add_argument(
        "--model", default=None, help="open_clip model name, e.g. ViT-B-16 (synthetic: the world's CLIP)"
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag (openai), a checkpoint file, or synthetic (default on --dataset synthetic)",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    _add_renamed(
        p,
        "--dataset_root",
        "--data-root",
        default=None,
        help="folder with the annotations and images (real data sets)",
    )
    p.add_argument("--annotations", default=None, help="annotation file (custom; default: in --dataset_root)")
    p.add_argument("--world", default=None, help="synthetic world preset (default, rich, tiny, cnn)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument(
        "--task",
        default="zeroshot_retrieval",
        choices=["zeroshot_retrieval"],
        help="CLIP_benchmark's task name; image-text retrieval is the only one",
    )
    p.add_argument(
        "--attacks",
        default=PAPERS_FIVE,
        help=f"comma-separated rows of the data's suite (default: the papers' five); synthetic also has "
        f"{','.join(n for n in suite_names() if n not in PAPERS_FIVE.split(','))}",
    )
    _add_renamed(
        p,
        "--eps_255",
        "--eps",
        type=float,
        default=None,
        help="image budget of every attack in 1/255 (default: the suite's, 2); steps scale with it",
    )
    p.add_argument(
        "--max_words",
        type=int,
        default=None,
        help="word budget of every text attack (default: the suite's, 1)",
    )
    p.add_argument(
        "--mlm",
        default=None,
        help="masked LM of the text attacks (default: the suite's: synthetic, or bert-base-uncased)",
    )
    _add_renamed(
        p,
        "--max_images",
        "--max-images",
        type=int,
        default=None,
        help="the first N images only",
    )
    _add_renamed(p, "--batch_size", "--batch-size", type=int, default=None, help="images per batch")
    p.add_argument("--experiment", default=None, help="run name (default: eval_<model>_<dataset>[-<world>])")
    _add_renamed(
        p,
        "--run_root",
        "--run-root",
        default="runs",
        help="where run folders go (default runs)",
    )
    p.add_argument("--output", default=None, help="also write results.json to this file (CLIP_benchmark's)")
    p.add_argument("--export", default=None, help="also write the adversarial test sets to this folder")
    return p


def _pass_through(rest: list[str]) -> list[str]:
    """The ``mat test`` options among ``mat eval``'s unknown arguments; anything else is an error naming it."""
    out, i = [], 0
    while i < len(rest):
        token = rest[i]
        name = token.split("=", 1)[0]
        if not token.startswith("--"):
            raise ConfigError(f"mat eval: unexpected argument {token!r} (options are --name value)")
        if "." not in name and name not in PASS_THROUGH:
            raise ConfigError(
                f"mat eval: unknown option {name} (mat eval --help lists them; `mat test` options pass "
                "through dotted, e.g. --trainer.devices=2)"
            )
        out.append(token)
        if "=" not in token and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            out.append(rest[i + 1])  # its value
            i += 1
        i += 1
    return out


def eval_args(argv: list[str]) -> list[str]:
    """``mat eval`` options -> the equivalent ``mat test`` arguments (dotted ``mat test`` options pass through)."""
    args, rest = eval_parser().parse_known_args(argv)
    rest = _pass_through(rest)
    if args.eps_255 is not None:
        check_eps_255(args.eps_255, "mat eval --eps_255")
    synthetic = args.dataset == "synthetic"
    if not synthetic and (args.model is None or args.pretrained is None):
        raise ConfigError(
            f"mat eval --dataset {args.dataset} needs --model and --pretrained (e.g. --model ViT-B-16 "
            "--pretrained openai); only --dataset synthetic has defaults (the world's CLIP)"
        )
    if not synthetic and args.dataset_root is None and args.annotations is None:
        raise ConfigError(
            f"mat eval --dataset {args.dataset} needs --dataset_root <folder> (or --annotations <file>)"
        )
    if args.world is not None and not synthetic:
        raise ConfigError(f"mat eval --world {args.world}: a synthetic world preset; use --dataset synthetic")
    model = (
        args.model or "mat-tiny"
    )  # synthetic: the preset's CLIP architecture replaces it (name_architectures)
    data_name = args.dataset + (f"-{args.world}" if args.world else "")
    experiment = args.experiment or "".join(
        c if c.isalnum() or c in "-_." else "_" for c in f"eval_{model}_{data_name}"
    )
    out = [
        "test",
        f"--experiment={experiment}",
        f"--run_root={args.run_root}",
        f"--model.encoder.init_args.model_name={model}",
        f"--model.encoder.init_args.pretrained={args.pretrained or 'synthetic'}",
        f"--data.dataset={args.dataset}",
        f"--data.test_split={args.split}",
        f"--robust_eval.attacks={json.dumps(eval_attacks(args.attacks, args.dataset))}",
    ]
    optional = {
        "--data.root": args.dataset_root,
        "--data.annotations": args.annotations,
        "--data.world": args.world,
        "--data.max_eval_images": args.max_images,
        "--data.eval_batch_size": args.batch_size,
        "--robust_eval.eps_255": args.eps_255,
        "--robust_eval.max_words": args.max_words,
        "--robust_eval.mlm": args.mlm,
        "--robust_eval.export_dir": args.export,
        "--robust_eval.output": args.output,
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
    if argv[0] in ("robust-eval", "prepare-attacks") and _wants_help(argv):
        print(SHORT_HELP[argv[0]], end="")
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
        or (argv[0] in ("robust-eval", "prepare-attacks") and _wants_help(argv))
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
    elif command == "prepare-attacks":
        options.check_args("fit", argv[1:])


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
