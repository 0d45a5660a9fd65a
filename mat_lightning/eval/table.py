"""``mat report``: gather ``results.json`` files into a paper-style table.

Rows are runs grouped by experiment (one group per defense / ablation; seeds are averaged), columns are attacks x
metrics (default TR R@1 and IR R@1), cells ``mean ± std`` over the runs of a group (std over seeds, ``n-1``
denominator; a single run shows its value alone). Written as Markdown and CSV; optionally logged to W&B as a table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from mat_lightning.errors import DataError
from mat_lightning.eval.report import atomic_write

METRIC_LABELS = {
    "tr_r1": "TR@1",
    "tr_r5": "TR@5",
    "tr_r10": "TR@10",
    "ir_r1": "IR@1",
    "ir_r5": "IR@5",
    "ir_r10": "IR@10",
    "r_mean": "RSUM/6",
}


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


def load_runs(files: Sequence[Path]) -> list[dict]:
    runs = []
    for f in files:
        try:
            payload = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DataError(
                f"{f}: not valid JSON ({e.msg} at line {e.lineno}); the run may have been interrupted"
            ) from None
        if "rows" not in payload:
            raise DataError(f"{f}: no 'rows' key; is this a mat results.json?")
        payload["_path"] = str(f)
        runs.append(payload)
    return runs


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def build_table(
    runs: Sequence[dict], metrics: Sequence[str] = ("tr_r1", "ir_r1"), attacks: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, Markdown rows, long-format records) of the table.

    Each attack contributes its row at the attack's configured budget (the first row of that attack in a run).
    """
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run.get("experiment") or Path(run["_path"]).parent.name, []).append(run)
    if attacks is None:
        attacks = list(dict.fromkeys(r["attack"] for run in runs for r in run["rows"]))
    header = ["experiment", "n"] + [f"{a} {METRIC_LABELS.get(m, m)}" for a in attacks for m in metrics]
    rows, records = [], []
    for name, group in groups.items():
        cells = [name, str(len(group))]
        for a in attacks:
            for m in metrics:
                values = []
                for run in group:
                    row = next((r for r in run["rows"] if r["attack"] == a), None)
                    if row is not None and m in row:
                        values.append(float(row[m]))
                cells.append(_cell(values))
                if values:
                    records.append(
                        {
                            "experiment": name,
                            "attack": a,
                            "metric": m,
                            "n": len(values),
                            "mean": statistics.mean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        }
                    )
        rows.append(cells)
    return header, rows, records


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="mat report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders (searched recursively) or results.json files")
    parser.add_argument("--metrics", nargs="+", default=["tr_r1", "ir_r1"], help="columns per attack")
    parser.add_argument("--attacks", nargs="+", default=None, help="attacks to show, in order (default: all)")
    parser.add_argument("--out", default=None, help="folder for table.md and table.csv")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the table to a W&B run (offline by default)"
    )
    args = parser.parse_args(argv)
    runs = load_runs(find_results(args.paths))
    header, rows, records = build_table(runs, args.metrics, args.attacks)
    markdown = to_markdown(header, rows)
    print(markdown)
    if args.out:
        out = Path(args.out)
        atomic_write(out / "table.md", markdown)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["experiment", "attack", "metric", "n", "mean", "std"])
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
