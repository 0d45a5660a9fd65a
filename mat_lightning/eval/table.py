"""``mat report``: gather ``results.json`` files into a paper-style table.

Rows are groups of **replicates**: runs of the same experiment, data set, split, number of test images, attack
configuration (and ε grid), tested weights (``weights``: start, final, best or a checkpoint, by content hash),
command and model (by the content hash of its weights) when the results record them (older files lack some fields:
those count as unknown, equal to each other), and the same ``config_hash`` (the settings without the seed and the
output-only settings, :mod:`~mat_lightning.eval.provenance`; older files: the ``config.yaml`` beside them). Within a
group one run per seed counts, the newest complete one; incomplete runs (``"complete": false``) never count; a file
reached twice counts once. Cells are ``mean ± std`` over the seeds (``n-1`` denominator; one seed shows its value
alone). Groups of one experiment are separate rows, labelled by what differs, and the command says on stderr what
it separated and which runs it skipped. Columns are ``n`` (seeds), ``seeds``, ``n_images`` and attacks x metrics
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
from mat_lightning.eval import provenance
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
    """``results.json`` files under the given run folders (searched recursively) or given directly, each file once
    (by its real path: ``F F``, a folder and a file in it, a symlink and its target count once)."""
    found: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".json":
            candidates = [p]
        elif p.is_dir():
            candidates = sorted(p.rglob("results.json"))
        else:
            raise DataError(f"{p}: neither a results.json file nor a folder")
        for f in candidates:
            real = f.resolve()
            if real not in seen:
                seen.add(real)
                found.append(f)
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
    if not payload["rows"]:
        raise DataError(
            f"{f}: 'rows' is empty (the run stopped before its clean evaluation ended?); re-run it or leave it out"
        )
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("attack"), str):
            raise DataError(f"{f}: rows[{i}] has no 'attack' name; is this a mat results.json?")
        for key, value in row.items():
            if key not in ("attack", "eps_255") and not (_is_number(value) or value is None):
                raise DataError(f"{f}: rows[{i}] ({row['attack']}): {key} = {value!r} is not a number")
        if row.get("eps_255") is not None and not _is_number(row["eps_255"]):
            raise DataError(f"{f}: rows[{i}] ({row['attack']}): eps_255 = {row['eps_255']!r} is not a number")
    payload["_path"] = str(f)
    return _with_provenance(payload)


def _with_provenance(run: dict) -> dict:
    """``_time`` (when written, else the file's mtime), ``_config_hash`` and ``_config`` (recorded, else from the
    ``config.yaml`` beside the file, else None) of a loaded run."""
    if "_config_hash" in run:
        return run
    path = Path(run["_path"])
    written = run.get("written_utc")
    run["_time"] = written if isinstance(written, str) else provenance.utc_of_mtime(path)
    if isinstance(run.get("config_hash"), str):
        run["_config_hash"] = run["config_hash"]
        run["_config"] = run.get("config") if isinstance(run.get("config"), dict) else None
    else:  # written before the hash was recorded
        fallback = provenance.config_file_hash(path.parent / "config.yaml")
        run["_config_hash"], run["_config"] = fallback or (None, None)
    return run


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


#: ``weights`` values that name what was tested without a file (a checkpoint path is grouped by its content hash).
NAMED_WEIGHTS = (None, "start", "final", "best")


def _key_value(run: dict, field: str) -> str:
    """What a run's ``field`` is compared by: weights by their content hash where it is recorded (the same weights
    under another path, a symlinked cache, are one model), a weights file of an older run by its name."""
    value = run.get(field)
    if field == "model" and run.get("model_sha256"):
        return f"sha256:{run['model_sha256']}"
    if field == "weights" and value not in NAMED_WEIGHTS and run.get("weights_sha256"):
        return f"sha256:{run['weights_sha256']}"
    if field == "model" and isinstance(value, str) and "//" in value:  # older files: "<name>/<cache path>"
        name, _, path = value.partition("/")
        value = f"{name}/{Path(path).name}"
    return "unknown" if value is None else json.dumps(value, sort_keys=True)


def _field_label(run: dict, field: str) -> str:
    value = run.get(field, "unknown")
    digest = run.get("model_sha256") if field == "model" else run.get("weights_sha256")
    if field in ("model", "weights") and digest and value not in NAMED_WEIGHTS:
        return f"{field}={value}@{digest[:8]}"
    return f"{field}={value}"


def _seeds_text(seeds: list) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``; unknown seeds as ``?``."""
    known = sorted(s for s in seeds if isinstance(s, int))
    parts: list[str] = []
    i = 0
    while i < len(known):
        j = i
        while j + 1 < len(known) and known[j + 1] == known[j] + 1:
            j += 1
        parts.append(str(known[i]) if j == i else f"{known[i]}-{known[j]}")
        i = j + 1
    parts += ["?"] * (len(seeds) - len(known))
    return ",".join(parts)


def _value_text(value) -> str:
    if isinstance(value, float):
        return format(value, "g")
    return "unset" if value is _UNSET else str(value)


_UNSET = object()
#: Settings the ``attacks``, ``eps_255_grid`` and ``model`` fields already label: not repeated in the label.
_LABELLED_BY_FIELDS = ("robust_eval.attacks", "robust_eval.eps_255_grid", provenance.MODEL_HASH_KEY)


def _setting_labels(keys: list[tuple], by_key: dict[tuple, list[dict]]) -> tuple[dict[tuple, str], list[str]]:
    """Per group key, ``lr=0.001, max_steps=2``: the settings in which the groups differ (shortest unambiguous
    dotted suffix as the name); and the full names of those settings. A group without recorded settings is
    ``config=unknown``; groups whose settings are not all known are told apart by their hash."""
    configs = [by_key[k][0].get("_config") for k in keys]
    if len({k[-1] for k in keys}) == 1:
        return {k: "" for k in keys}, []
    if any(c is None for c in configs):
        return {k: f"config={k[-1][:8] if k[-1] != 'unknown' else 'unknown'}" for k in keys}, ["config"]
    names = sorted({n for c in configs for n in c})
    differing = [
        n
        for n in names
        if not n.startswith(_LABELLED_BY_FIELDS)
        and len({json.dumps(c.get(n, "<unset>")) for c in configs}) > 1
    ]
    short = {}
    for n in differing:
        parts = n.split(".")
        for size in range(1, len(parts) + 1):
            suffix = ".".join(parts[-size:])
            if sum(1 for m in differing if m == suffix or m.endswith("." + suffix)) == 1:
                short[n] = suffix
                break
    shown = differing[:4]
    labels = {}
    for k, c in zip(keys, configs, strict=True):
        text = ", ".join(f"{short[n]}={_value_text(c.get(n, _UNSET))}" for n in shown)
        if len(differing) > len(shown):
            text += f", +{len(differing) - len(shown)} more"
        labels[k] = text
    return labels, differing


def _one_per_seed(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(replicates, skipped): the newest complete run of each seed, in seed order (runs without a seed each
    count, last); the older runs of a seed already counted."""
    by_seed: dict[int, list[dict]] = {}
    unknown = []
    for run in runs:
        seed = run.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            by_seed.setdefault(seed, []).append(run)
        else:
            unknown.append(run)
    kept, skipped = [], []
    for seed in sorted(by_seed):
        ordered = sorted(by_seed[seed], key=lambda r: (r["_time"], r["_path"]))
        kept.append(ordered[-1])
        skipped += ordered[:-1]
    return kept + unknown, skipped


def select_runs(runs: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """The complete runs, and a note naming the incomplete ones (a killed run never counts)."""
    complete = [run for run in runs if run.get("complete") is not False]  # files before the flag: complete
    incomplete = [run["_path"] for run in runs if run.get("complete") is False]
    notes = []
    if incomplete:
        shown = ", ".join(incomplete[:3]) + (", ..." if len(incomplete) > 3 else "")
        notes.append(
            f"{len(incomplete)} incomplete run(s) skipped (stopped before their last attack; "
            f"results.json says complete: false): {shown}"
        )
    return complete, notes


def group_runs(runs: Sequence[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """Groups of replicates, labelled, and the notes that explain the grouping.

    Runs are comparable when their experiment, :data:`GROUP_FIELDS` and config hash (the settings without the
    seed, ``eval/provenance.py``) are equal; of comparable runs one per seed counts (the newest complete one);
    incomplete runs never count. An experiment whose runs fall into several groups gets one row per group,
    labelled by what differs: ``smoke [lr=0.001, max_steps=2]``.
    """
    runs, notes = select_runs([_with_provenance(run) for run in runs])
    by_key: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (
            _experiment(run),
            *(_key_value(run, f) for f in GROUP_FIELDS),
            run["_config_hash"] or "unknown",
        )
        by_key.setdefault(key, []).append(run)
    no_config = [run["_path"] for run in runs if run["_config_hash"] is None]
    if no_config:
        notes.append(
            f"{len(no_config)} run(s) record no config hash and have no config.yaml beside them (e.g. "
            f"{no_config[0]}): grouped by the fields they record only"
        )
    labelled: dict[str, list[dict]] = {}
    per_experiment: dict[str, list[tuple]] = {}
    for key in by_key:
        per_experiment.setdefault(key[0], []).append(key)
    for name, keys in per_experiment.items():
        labels = {keys[0]: name}
        if len(keys) > 1:
            differing = [i for i, f in enumerate(GROUP_FIELDS, 1) if len({k[i] for k in keys}) > 1]
            fields = [GROUP_FIELDS[i - 1] for i in differing]
            settings, setting_names = _setting_labels(keys, by_key)
            what = fields + ([f"settings ({', '.join(setting_names)})"] if setting_names else [])
            notes.append(
                f"{name}: {sum(len(by_key[k]) for k in keys)} runs in {len(keys)} groups, not averaged "
                f"together: they differ in {', '.join(what) or 'settings'}"
            )
            for key in keys:
                parts = []
                for i in differing:
                    field = GROUP_FIELDS[i - 1]
                    if field in ("attacks", "eps_255_grid"):  # long: numbered, the note says they differ
                        parts.append(f"{field} #{1 + sorted({k[i] for k in keys}).index(key[i])}")
                    else:
                        parts.append(_field_label(by_key[key][0], field))
                label = name + (f" ({', '.join(parts)})" if parts else "")
                labels[key] = label + (f" [{settings[key]}]" if settings[key] else "")
        for j, key in enumerate(keys, 1):
            replicates, skipped = _one_per_seed(by_key[key])
            label = labels[key] if labels[key] not in labelled else f"{labels[key]} [{j}]"
            labelled[label] = replicates
            if skipped:
                shown = ", ".join(f"{r['_path']} (seed {r['seed']})" for r in skipped[:3])
                notes.append(
                    f"{label}: {len(skipped)} run(s) skipped, each an older run of a seed already counted "
                    f"(one run per seed: the newest complete one): {shown}"
                    + (", ..." if len(skipped) > 3 else "")
                )
            unknown = sum(1 for r in replicates if not isinstance(r.get("seed"), int))
            if unknown:
                notes.append(f"{label}: {unknown} run(s) record no seed: each counted as one replicate")
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
    runs = [run for group in groups.values() for run in group]
    if not runs:
        raise DataError(
            "no complete run to report: every results.json given says complete: false (killed or failed runs); "
            "re-run them"
        )
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
    header = ["experiment", "n", "seeds", "n_images"] + [
        f"{a} {METRIC_LABELS.get(m, m)}" for a in attacks for m in metrics
    ]
    rows, records = [], []
    for name, group in groups.items():
        n_images = sorted({str(run.get("n_images", "?")) for run in group})
        seeds = _seeds_text([run.get("seed") for run in group])
        cells = [name, str(len(group)), seeds, "/".join(n_images)]
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
                            "seeds": seeds,
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
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(
            f"--out {args.out} is a file: give a folder (table.md, table.tex and table.csv go there)"
        )
    runs = load_runs(find_results(args.paths))
    _, notes = group_runs(runs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    header, rows, records = build_table(runs, _names(args.metrics), _names(args.attacks), args.eps)
    formats = {"md": to_markdown, "csv": to_csv, "latex": to_latex}
    print(formats[args.format](header, rows), end="")
    if args.out:
        out = Path(args.out)
        atomic_write(out / "table.md", to_markdown(header, rows))
        atomic_write(out / "table.tex", to_latex(header, rows))
        buf = io.StringIO()
        fields = ["experiment", "n_images", "attack", "eps_255", "metric", "n", "seeds", "mean", "std"]
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
