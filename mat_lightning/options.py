"""The options of ``mat fit|validate|test|robust-eval``, read from the source of the classes the LightningCLI builds.

jsonargparse builds the ``mat`` parser from the signatures and docstrings of ``Trainer``, ``MatModule``,
``RetrievalDataModule`` and ``RobustRetrievalEval``, which means importing torch, Lightning, open_clip and
transformers (10-20 s on a busy 2-core machine) before it can say that ``--nope=1`` is not an option. This module
reads the same signatures and docstrings with :mod:`ast` (no import, a few milliseconds), so the front door
(:mod:`mat_lightning.main`) answers ``--help`` and rejects unknown options, on the command line and in ``--config``
files, before the training stack is imported. It checks names down to a class's own parameters
(``--model.lr``, ``--trainer.max_epochs``); what lies below a class-typed parameter (``--model.defense.init_args.x``)
depends on the class chosen and is left to jsonargparse. ``tests/test_cli.py`` checks these names against the real
parser's.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from mat_lightning.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Option:
    """One ``--name``: its annotation and default as written in the source, and its docstring line(s)."""

    name: str
    annotation: str = ""
    default: str = ""
    help: str = ""


# Options the CLI adds itself (cli.py's add_arguments_to_parser reads their help from here).
CLI_OPTIONS = {
    "experiment": "Run name: groups runs and names the run folder.",
    "run_root": "Folder that holds <experiment>/<timestamp>/ run folders.",
    "test_ckpt": "After fit, test the final weights (last) or the best checkpoint by clean validation recall (best).",
    "local_models": "Hub names mapped to local copies, e.g. {bert-base-uncased: /models/bert-base-uncased}: "
    "every MLM and HF encoder source of the config named on the left loads from the right.",
}
# Set from another option (cli.py's link_arguments): not an option of its own.
LINKED = {"robust_eval.experiment"}
# LightningCLI's own, in every subcommand
LIGHTNING_OPTIONS = {
    "config": "Path to a configuration file in json or yaml format.",
    "print_config": "Print the configuration after applying all other arguments and exit.",
    "seed_everything": "Set to an int to run seed_everything with this value before classes instantiation.",
}
# Trainer method arguments LightningCLI does not expose (LightningCLI.subcommands())
_SKIPPED = {"model", "train_dataloaders", "val_dataloaders", "dataloaders", "datamodule"}
SUBCOMMANDS = ("fit", "validate", "test")


def _lightning_trainer_file() -> Path:
    spec = importlib.util.find_spec("lightning")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the lightning package is not installed: run make install")
    return Path(list(spec.submodule_search_locations)[0]) / "pytorch" / "trainer" / "trainer.py"


def _groups() -> dict[str, tuple[Path, str, str]]:
    """Option group -> (source file, class, method) whose parameters are the group's options."""
    return {
        "trainer": (_lightning_trainer_file(), "Trainer", "__init__"),
        "model": (PACKAGE / "module.py", "MatModule", "__init__"),
        "data": (PACKAGE / "data" / "datamodule.py", "RetrievalDataModule", "__init__"),
        "robust_eval": (PACKAGE / "eval" / "robust.py", "RobustRetrievalEval", "__init__"),
    }


def _arg_docs(doc: str | None) -> dict[str, str]:
    """Google-style ``Args:`` section -> {parameter: text} (``a, b: text`` documents both)."""
    out: dict[str, str] = {}
    if not doc:
        return out
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return out
    indent, names = None, []
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"\s*([\w, ]+):\s*(.*)", line) if width == indent else None
        if match:
            names = [n.strip() for n in match.group(1).split(",")]
            for n in names:
                out[n] = match.group(2).strip()
        else:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    return out


def _signature(path: Path, cls: str, method: str) -> list[Option]:
    """The keyword parameters of ``cls.method`` in ``path`` (no ``self``, ``*args``, ``**kwargs``), with their docs
    from the method's or the class's docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    docs = {**_arg_docs(ast.get_docstring(node)), **_arg_docs(ast.get_docstring(fn))}
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults, strict=True)) + list(
        zip(args.kwonlyargs, args.kw_defaults, strict=True)
    )
    return [
        Option(
            a.arg,
            ast.unparse(a.annotation) if a.annotation is not None else "",
            ast.unparse(d) if d is not None else "",
            docs.get(a.arg, ""),
        )
        for a, d in pairs
        if a.arg != "self"
    ]


def options(subcommand: str) -> dict[str, Option]:
    """Every option of ``mat <subcommand>`` down to a class's parameters, by dotted name (``trainer.max_epochs``).

    ``robust-eval`` is ``test``. Group names (``model``) are options too: they take a config file of the group.
    """
    subcommand = "test" if subcommand == "robust-eval" else subcommand
    if subcommand not in SUBCOMMANDS:
        raise ConfigError(f"no such command: {subcommand!r}")
    out = {name: Option(name, help=text) for name, text in LIGHTNING_OPTIONS.items()}
    for group, (path, cls, method) in _groups().items():
        out[group] = Option(group, help=f"a config file of the {cls} options below")
        for opt in _signature(path, cls, method):
            name = f"{group}.{opt.name}"
            if name not in LINKED:
                out[name] = Option(name, opt.annotation, opt.default, opt.help)
    out.update({name: Option(name, help=text) for name, text in CLI_OPTIONS.items()})
    trainer_file = _groups()["trainer"][0]
    out.update({o.name: o for o in _signature(trainer_file, "Trainer", subcommand) if o.name not in _SKIPPED})
    return out


def _unknown(name: str, known: dict[str, Option]) -> bool:
    """Whether ``name`` (dotted, ``+`` of ``+=`` stripped) is certainly not an option."""
    parts = name.split(".")
    if parts[0] not in known:
        return True
    # below a class's own parameters (init_args of a class-typed one, keys of a dict) jsonargparse decides
    return len(parts) >= 2 and parts[0] in _GROUP_NAMES and ".".join(parts[:2]) not in known


_GROUP_NAMES = ("trainer", "model", "data", "robust_eval")


def _suggest(name: str, known: dict[str, Option]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean --{close[0]}?)" if close else ""


def check_args(subcommand: str, argv: list[str]) -> None:
    """Raise :class:`ConfigError` naming the first unknown option of ``argv`` (the arguments after the subcommand),
    on the command line or in a ``--config`` file, before anything heavy is imported."""
    known = options(subcommand)
    extra = {"export"} if subcommand == "robust-eval" else set()
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in ("-c", "--config") or token.startswith("--config="):
            if "=" in token:
                path = token.split("=", 1)[1]
            elif i < len(argv):
                path, i = argv[i], i + 1
            else:
                continue  # jsonargparse says that --config needs a value
            check_config_file(subcommand, path, known)
            continue
        if not token.startswith("--") or token == "--":
            continue
        name = token[2:].split("=", 1)[0].rstrip("+")
        if name in extra or not _unknown(name, known):
            continue
        raise ConfigError(f"unrecognized arguments: {token}{_suggest(name, known)}")


def read_config_text(path: str) -> str:
    """The text of a ``--config`` file; a ConfigError for a missing file, a folder, a binary or unreadable file
    (jsonargparse reads these with a traceback)."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"--config {path} is a folder: give a YAML file (experiments/*.yaml)")
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"--config {path} is not a text file (not UTF-8): give a YAML config such as experiments/smoke.yaml"
        ) from None
    except OSError as e:
        raise ConfigError(f"--config {path} cannot be read ({e.strerror or e})") from None


def check_config_file(subcommand: str, path: str, known: dict[str, Option] | None = None) -> None:
    """The keys of a ``--config`` YAML file are options (down to a class's parameters); the file exists."""
    import yaml

    known = known or options(subcommand)
    text = read_config_text(path)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        return  # jsonargparse reports a file that is not a mapping
    for key, value in cfg.items():
        names = [str(key)]
        if str(key) in _GROUP_NAMES and isinstance(value, dict):
            names += [f"{key}.{sub}" for sub in value]
        for name in names:
            if _unknown(name, known):
                raise ConfigError(
                    f"--config {path}: unknown key {name!r}{_suggest(name, known).replace('--', '')}"
                )


def help_text(subcommand: str, width: int = 80) -> str:
    """Every option of ``mat <subcommand>``, one entry each: name, default, the first sentence of its docstring;
    the top-level options first, then one block per class."""
    opts = options(subcommand)
    lines = []
    for group in ("", *_GROUP_NAMES):
        if group:
            lines.append(f"\n--{group}: {opts[group].help}")
        for name, opt in opts.items():
            if (name.split(".")[0] if "." in name else "") != group or name in _GROUP_NAMES:
                continue
            head = f"  --{name}" + (f" (default {opt.default})" if opt.default else "")
            text = re.split(r"(?<=[\w)`'\"]\.)\s+(?=[A-Z])", opt.help, maxsplit=1)[0] if opt.help else ""
            lines.append(head)
            if text:
                lines.append(_wrap(text, width, "        "))
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int, indent: str) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)
