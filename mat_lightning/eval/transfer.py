"""``mat transfer``: adversarial sets crafted once on a source model, evaluated on target models (SGA's Table 2).

Usage::

    mat robust-eval --config experiments/<source>.yaml --export runs/adv/<source>   # craft once (white-box)
    mat transfer --sets runs/adv/<source> --target experiments/<a>.yaml \\
                 --target experiments/<b>.yaml@runs/<b>/<time>/checkpoints/last.ckpt [-- <options for every target>]

Each target is a normal robust evaluation (``mat robust-eval --config <target> [--ckpt_path <ckpt>]``) whose attack
list is one :class:`~mat_lightning.attacks.transfer.Transferred` row per exported set, so it gets its own clean row
on its own inputs and both ASR definitions against its own clean hits, and writes its usual run folder (results,
W&B, ``mat report``) under the transfer folder ``<run_root>/transfer/<time>/``. This module then gathers the rows
into ``transfer.json``, ``transfer.csv`` and ``transfer.md``: one row per source set, one column per target.
A target that is the source model itself gives the white-box figures after 8-bit quantisation.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from mat_lightning.errors import ConfigError
from mat_lightning.files import atomic_write

METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``mat transfer`` options; what follows ``--`` is passed to every target's robust evaluation."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="mat transfer",
        description="Evaluate target models on adversarial sets exported by mat robust-eval --export.",
    )
    p.add_argument("--sets", required=True, help="an exported folder (--export DIR) or one of its sets")
    p.add_argument(
        "--target",
        action="append",
        required=True,
        help="an experiment config, optionally @ a checkpoint: experiments/x.yaml[@path/last.ckpt]; repeat",
    )
    p.add_argument(
        "--run_root", default="runs", help="the transfer folder goes to <run_root>/transfer/<time>/"
    )
    args = p.parse_args(argv)
    return args, extra


def target_label(spec: str) -> tuple[str, str, str | None]:
    """``config[@ckpt]`` -> (label, config, ckpt); the label is the config's stem (+ the checkpoint's)."""
    config, _, ckpt = spec.partition("@")
    if not Path(config).is_file():
        raise ConfigError(f"--target {spec!r}: no config file {config!r}")
    if ckpt and not Path(ckpt).is_file():
        raise ConfigError(f"--target {spec!r}: no checkpoint file {ckpt!r}")
    label = Path(config).stem + (f"@{Path(ckpt).parent.parent.name or Path(ckpt).stem}" if ckpt else "")
    return label.replace("/", "_"), config, ckpt or None


def run(argv: list[str], evaluate: Callable[[list[str]], None]) -> Path:
    """Evaluate every target on every set (``evaluate`` runs one ``mat robust-eval`` argv) and write the table.

    Returns the transfer folder.
    """
    from mat_lightning.attacks.transfer import find_sets, load_set_index

    args, extra = parse_args(argv)
    sets = find_sets(args.sets)
    for folder in sets:
        load_set_index(folder)  # every index readable before any model is built
    targets = [target_label(spec) for spec in args.target]
    labels = [t[0] for t in targets]
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"--target: two targets share the label of {labels}; give distinct configs/checkpoints"
        )
    out = Path(args.run_root) / "transfer" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    # every init arg explicit: jsonargparse merges a list override item by item into the config's attacks, and a
    # config attack's `name` would otherwise survive into the Transferred at its position
    attacks = [
        {
            "class_path": "mat_lightning.attacks.transfer.Transferred",
            "init_args": {"path": str(s), "name": f"transfer_{s.name}", "seed": 0},
        }
        for s in sets
    ]
    results = {}
    for label, config, ckpt in targets:
        safe = "".join(c if c.isalnum() or c == "_" else "_" for c in label)
        experiment = safe if safe.startswith("transfer_") else f"transfer_{safe}"
        evaluate(
            [
                "robust-eval",
                "--config",
                config,
                *(["--ckpt_path", ckpt] if ckpt else []),
                *extra,
                "--robust_eval.attacks=[]",
                f"--robust_eval.attacks={json.dumps(attacks)}",
                "--robust_eval.eps_255_grid=null",
                f"--experiment={experiment}",
                f"--run_root={out}",
            ]
        )
        found = sorted((out / experiment).glob("*/results.json"))
        if not found:
            raise ConfigError(
                f"target {label}: its robust evaluation wrote no results.json under {out / experiment}"
            )
        results[label] = json.loads(found[-1].read_text())
    table = transfer_table(results, sets)
    write_table(out, table)
    return out


def transfer_table(results: dict[str, dict], sets: list[Path]) -> dict:
    """Per target: its clean row and, per source set, the transferred row (recall and both ASRs)."""
    sources = {}
    for folder in sets:
        manifest_file, source_file = folder / "set.json", folder.parent / "source.json"
        manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        source = json.loads(source_file.read_text()) if source_file.is_file() else {}
        sources[f"transfer_{folder.name}"] = {
            "set": str(folder),
            "attack": manifest.get("attack", folder.name),
            "eps_255": manifest.get("eps_255"),
            "source_experiment": source.get("experiment"),
            "source_model": source.get("model"),
        }
    targets = {}
    for label, res in results.items():
        rows = {r["attack"]: r for r in res["rows"]}
        targets[label] = {
            "model": res.get("model"),
            "experiment": res.get("experiment"),
            "clean": {m: rows["clean"][m] for m in METRICS},
            "rows": {name: rows[name] for name in sources if name in rows},
        }
    return {"sources": sources, "targets": targets}


def write_table(folder: Path, table: dict) -> None:
    """``transfer.json`` (everything), ``transfer.csv`` (long form) and ``transfer.md`` (R@1: flip rate, recall)."""
    atomic_write(folder / "transfer.json", json.dumps(table, indent=1))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["source_set", "attack", "eps_255", "target", "metric", "recall", "asr_drop", "asr_flip"])
    for label, target in table["targets"].items():
        for metric in METRICS:
            w.writerow(["clean", "clean", 0, label, metric, target["clean"][metric], "", ""])
        for name, row in target["rows"].items():
            src = table["sources"][name]
            for metric in METRICS:
                w.writerow(
                    [
                        name,
                        src["attack"],
                        src["eps_255"],
                        label,
                        metric,
                        row[metric],
                        row.get(f"asr_drop_{metric}", ""),
                        row.get(f"asr_flip_{metric}", ""),
                    ]
                )
    atomic_write(folder / "transfer.csv", buf.getvalue())
    atomic_write(folder / "transfer.md", markdown(table))


def markdown(table: dict) -> str:
    """Two source x target tables at R@1, ``TR / IR``: SGA's flip rate (ASR), then recall (clean row first)."""
    targets = list(table["targets"])
    src_models = sorted({s["source_model"] or "?" for s in table["sources"].values()})
    lines = [f"transfer: sets crafted on {', '.join(src_models)}; columns: target models; R@1 TR / IR", ""]
    for title, key in (("flip rate (%, SGA's ASR)", "asr_flip_{}"), ("recall (%)", "{}")):
        lines += [f"{title}", "", "| source set | " + " | ".join(targets) + " |"]
        lines.append("|---|" + "---:|" * len(targets))
        if key == "{}":
            cells = [
                f"{t['clean']['tr_r1']:.1f} / {t['clean']['ir_r1']:.1f}" for t in table["targets"].values()
            ]
            lines.append("| clean | " + " | ".join(cells) + " |")
        for name in table["sources"]:
            cells = []
            for t in table["targets"].values():
                row = t["rows"].get(name)
                cells.append(
                    "-" if row is None else f"{row[key.format('tr_r1')]:.1f} / {row[key.format('ir_r1')]:.1f}"
                )
            lines.append(f"| {name.removeprefix('transfer_')} | " + " | ".join(cells) + " |")
        lines.append("")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(lines) + f"written {stamp}\n"
