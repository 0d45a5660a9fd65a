"""``mat report``: gather ``results.json`` files into a paper-style table.

Rows are groups of **comparable** runs: the same experiment, data set, split, number of test images, attack
configuration (and ε grid), tested weights (``weights``: start, final, best or a file) and command, when the results
record them (older files lack some fields: those count as unknown, equal to each other). Within a group the seeds
are averaged: cells are ``mean ± std`` (std over runs, ``n-1`` denominator; one run shows its value alone). Runs of
one experiment that differ in any of these are never averaged together: they become separate rows, labelled by what
differs, and the command says what it separated. Columns are ``n`` (runs), ``n_images`` and attacks x metrics
(default TR R@1 and IR R@1), each attack at its configured budget or at ``--eps``.

Output: Markdown (default), CSV or LaTeX on stdout; with ``--out``, ``table.md``, ``table.tex`` and ``table.csv``
(long format: one line per group, attack and metric). Imports no training stack: reading a few hundred files takes
well under a second.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from mat_lightning.errors import ConfigError, DataError
from mat_lightning.files import atomic_write

METRIC_LABELS = {
    "tr_r1": "TR@1",
    "tr_r5": "TR@5",
    "tr_r10": "TR@10",
    "ir_r1": "IR@1",
    "ir_r5": "IR@5",
    "ir_r10": "IR@10",
    "r_mean": "RSUM/6",
}

#: What makes two runs comparable (beyond the experiment name), with the label used when groups differ in it.
GROUP_FIELDS = ("dataset", "split", "n_images", "weights", "subcommand", "attacks", "eps_255_grid", "model")


def find_results(paths: Sequence[str | Path]) -> list[Path]:
    """``results.json`` files under the given run folders (searched recursively) or given directly."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".json":
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("results.json"))
        else:
            raise DataError(f"{p}: neither a results.json file nor a folder")
    if not found:
        raise DataError(f"no results.json under {', '.join(map(str, paths))}; run an experiment first")
    return found


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_run(f: Path) -> dict:
    """One results.json, checked: one DataError naming the file for anything a report cannot use."""
    try:
        payload = json.loads(f.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not UTF-8 text (byte {e.start}); is this a mat results.json?") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{f}: not valid JSON ({e.msg} at line {e.lineno}); the run may have been interrupted"
        ) from None
    except OSError as e:
        raise DataError(f"{f}: cannot be read ({e.strerror or e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise DataError(f"{f}: not a mat results.json (expected an object with a 'rows' list)")
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("attack"), str):
            raise DataError(f"{f}: rows[{i}] has no 'attack' name; is this a mat results.json?")
        for key, value in row.items():
            if key not in ("attack", "eps_255") and not (_is_number(value) or value is None):
                raise DataError(f"{f}: rows[{i}] ({row['attack']}): {key} = {value!r} is not a number")
        if row.get("eps_255") is not None and not _is_number(row["eps_255"]):
            raise DataError(f"{f}: rows[{i}] ({row['attack']}): eps_255 = {row['eps_255']!r} is not a number")
    payload["_path"] = str(f)
    return payload


def load_runs(files: Sequence[Path]) -> list[dict]:
    return [load_run(f) for f in files]


def _cell(values: list[float], n: int) -> str:
    if not values:
        return "–"
    text = (
        f"{values[0]:.1f}"
        if len(values) == 1
        else f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    )
    return text if len(values) == n else f"{text} (n={len(values)})"


def _experiment(run: dict) -> str:
    return run.get("experiment") or Path(run["_path"]).parent.name


def _key_value(run: dict, field: str) -> str:
    value = run.get(field)
    return "unknown" if value is None else json.dumps(value, sort_keys=True)


def group_runs(runs: Sequence[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """Comparable groups, labelled, and one note per experiment whose runs were split into several groups."""
    by_key: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (_experiment(run), *(_key_value(run, f) for f in GROUP_FIELDS))
        by_key.setdefault(key, []).append(run)
    labelled: dict[str, list[dict]] = {}
    notes: list[str] = []
    per_experiment: dict[str, list[tuple]] = {}
    for key in by_key:
        per_experiment.setdefault(key[0], []).append(key)
    for name, keys in per_experiment.items():
        if len(keys) == 1:
            labelled[name] = by_key[keys[0]]
            continue
        differing = [i for i, f in enumerate(GROUP_FIELDS, 1) if len({k[i] for k in keys}) > 1]
        fields = [GROUP_FIELDS[i - 1] for i in differing]
        notes.append(
            f"{name}: {sum(len(by_key[k]) for k in keys)} runs in {len(keys)} groups, not averaged together: "
            f"they differ in {', '.join(fields)}"
        )
        for j, key in enumerate(keys, 1):
            parts = []
            for i in differing:
                field = GROUP_FIELDS[i - 1]
                if field in ("attacks", "eps_255_grid"):  # long: numbered, the note says they differ
                    parts.append(f"{field} #{1 + sorted({k[i] for k in keys}).index(key[i])}")
                else:
                    parts.append(f"{field}={by_key[key][0].get(field, 'unknown')}")
            label = f"{name} ({', '.join(parts)})"
            labelled[label if label not in labelled else f"{label} [{j}]"] = by_key[key]
    return labelled, notes


def _pick_row(run: dict, attack: str, eps: float | None) -> dict | None:
    rows = [r for r in run["rows"] if r["attack"] == attack]
    if eps is None or not rows or rows[0].get("eps_255") is None or attack == "clean":
        return rows[0] if rows else None  # the configured budget; clean and text-only attacks have no ε
    return next((r for r in rows if r.get("eps_255") == eps), None)


def build_table(
    runs: Sequence[dict],
    metrics: Sequence[str] = ("tr_r1", "ir_r1"),
    attacks: Sequence[str] | None = None,
    eps: float | None = None,
) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, rows of cells, long-format records) of the table; see the module doc for the grouping.

    Raises ConfigError for a metric or attack that no run has.
    """
    groups, _ = group_runs(runs)
    present_attacks = list(dict.fromkeys(r["attack"] for run in runs for r in run["rows"]))
    present_metrics = {k for run in runs for r in run["rows"] for k in r if k not in ("attack", "eps_255")}
    unknown = [m for m in metrics if m not in present_metrics]
    if unknown:
        raise ConfigError(
            f"--metrics {' '.join(unknown)}: not in the results; known: {' '.join(sorted(present_metrics))}"
        )
    if attacks is None:
        attacks = present_attacks
    unknown = [a for a in attacks if a not in present_attacks]
    if unknown:
        raise ConfigError(
            f"--attacks {' '.join(unknown)}: not in the results; known: {' '.join(present_attacks)}"
        )
    header = ["experiment", "n", "n_images"] + [
        f"{a} {METRIC_LABELS.get(m, m)}" for a in attacks for m in metrics
    ]
    rows, records = [], []
    for name, group in groups.items():
        n_images = sorted({str(run.get("n_images", "?")) for run in group})
        cells = [name, str(len(group)), "/".join(n_images)]
        for a in attacks:
            for m in metrics:
                values = []
                for run in group:
                    row = _pick_row(run, a, eps)
                    if row is not None and row.get(m) is not None:
                        values.append(float(row[m]))
                cells.append(_cell(values, len(group)))
                if values:
                    records.append(
                        {
                            "experiment": name,
                            "n_images": "/".join(n_images),
                            "attack": a,
                            "eps_255": eps,
                            "metric": m,
                            "n": len(values),
                            "mean": round(statistics.mean(values), 4),
                            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                        }
                    )
        rows.append(cells)
    return header, rows, records


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
        text = text.replace(a, b)
    return text.replace("±", r"$\pm$")


def to_latex(header: list[str], rows: list[list[str]]) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    lines = [
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(_latex_escape(c) for c in row) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def _names(values: list[str] | None) -> list[str] | None:
    """``--attacks pgd sga`` and ``--attacks pgd,sga`` alike."""
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="mat report", description=__doc__.split("\n\n")[1].replace("\n", " ")
    )
    parser.add_argument("paths", nargs="+", help="run folders (searched recursively) or results.json files")
    parser.add_argument("--metrics", nargs="+", default=["tr_r1", "ir_r1"], help="columns per attack")
    parser.add_argument("--attacks", nargs="+", default=None, help="attacks to show, in order (default: all)")
    parser.add_argument(
        "--eps",
        type=float,
        default=None,
        help="show each image attack at this ε (1/255) of its grid (default: its configured one)",
    )
    parser.add_argument("--format", choices=["md", "csv", "latex"], default="md", help="what to print")
    parser.add_argument("--out", default=None, help="folder for table.md, table.tex and table.csv")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the table to a W&B run (offline by default)"
    )
    args = parser.parse_args(argv)
    runs = load_runs(find_results(args.paths))
    _, notes = group_runs(runs)
    header, rows, records = build_table(runs, _names(args.metrics), _names(args.attacks), args.eps)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    incomplete = [run["_path"] for run in runs if run.get("complete") is False]
    if incomplete:
        print(
            f"note: {len(incomplete)} run(s) stopped before their last attack, e.g. {incomplete[0]}",
            file=sys.stderr,
        )
    formats = {"md": to_markdown, "csv": to_csv, "latex": to_latex}
    print(formats[args.format](header, rows), end="")
    if args.out:
        out = Path(args.out)
        atomic_write(out / "table.md", to_markdown(header, rows))
        atomic_write(out / "table.tex", to_latex(header, rows))
        buf = io.StringIO()
        fields = ["experiment", "n_images", "attack", "eps_255", "metric", "n", "mean", "std"]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(records)
        atomic_write(out / "table.csv", buf.getvalue())
    if args.wandb:
        import os

        import wandb

        run = wandb.init(
            project="mat-lightning",
            job_type="report",
            mode=os.environ.get("WANDB_MODE", "offline"),
            dir=args.out or ".",
        )
        run.log({"report/table": wandb.Table(columns=header, data=rows)})
        run.finish()
