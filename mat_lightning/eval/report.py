"""Result files of a run: ``results.json``, ``results.csv``, ``curves.png`` + ``curves.pdf`` (DESIGN §4), written
atomically, and the plain-text results table the ``mat`` command prints last.

``results.json`` = ``{"experiment", "model", "model_sha256", "weights_sha256", "dataset", "split", "n_images",
"n_captions", ..., "seed", "config_hash", "attacks", "git", "versions", "started_utc", "written_utc", "complete",
"rows": [...], "config"}`` (provenance: :mod:`mat_lightning.eval.provenance`); a row is ``{"attack", "eps_255", "tr_r1", ..., "r_mean", "asr_drop_tr_r1", ..., "asr_flip_tr_r1",
..., "seconds"}``. ``results.json`` keeps full precision; ``results.csv`` rounds to 2 decimals (for reading).

This module imports no training stack (``mat report`` uses it); matplotlib is imported only to draw.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mat_lightning.files import atomic_write

#: Columns of the console table of a run, in order (the CSV and JSON hold every metric).
CONSOLE_COLUMNS = ("attack", "eps_255", "tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")
CONSOLE_EXTRA = ("asr_flip_tr_r1", "asr_flip_ir_r1", "seconds")


def _round(value: Any, digits: int = 2) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def results_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV, floats rounded to 2 decimals (``31.9``, not ``31.900000000000002``)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _round(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def write_results(run_dir: str | Path, payload: dict[str, Any], figures: bool = True) -> None:
    """``results.json`` and ``results.csv`` in ``run_dir``; with ``figures``, ``curves.png`` and ``curves.pdf``.

    Called after every attack (``figures=False``, so a late failure keeps what was measured) and once at the end.
    ``results.json`` is written last, atomically: its ``"complete": true`` (which ``mat report`` requires) means
    every other file of the run is whole.
    """
    run_dir = Path(run_dir)
    atomic_write(run_dir / "results.csv", results_csv(rows_by_budget(payload["rows"])))
    if figures:
        title = f"{payload.get('experiment', '')} — {payload.get('dataset', '')} {payload.get('split', '')}"
        if payload.get("weights"):  # a starting-weights run and a trained run of one experiment differ here
            title += f" — weights: {_weights_label(payload['weights'])}"
        for fmt in ("png", "pdf"):
            buf = io.BytesIO()
            plot_curves(payload["rows"], buf, title=title, modalities=payload.get("modalities"), fmt=fmt)
            atomic_write(run_dir / f"curves.{fmt}", buf.getvalue())
    atomic_write(run_dir / "results.json", json.dumps(payload, indent=2))


def _weights_label(weights: str) -> str:
    """``start`` -> ``starting (no training)``; a checkpoint path by its file name."""
    labels = {"start": "starting (no training)", "final": "final (trained)", "best": "best (trained)"}
    return labels.get(weights, Path(weights).name)


def rows_by_budget(rows: Sequence[dict]) -> list[dict]:
    """Rows in run order of their attacks, each attack's rows by ascending ε (an ε grid runs the configured budget
    first: 2, 1, 4 would otherwise be printed in that order); a text-only row (no ε) first."""
    order = {name: i for i, name in enumerate(dict.fromkeys(r["attack"] for r in rows))}
    return sorted(
        rows,
        key=lambda r: (order[r["attack"]], r.get("eps_255") is not None, r.get("eps_255") or 0.0),
    )


# -- the console table ------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], width: int = 80, keys: int = 2) -> str:
    """A Markdown-style table that fits ``width`` columns without shortening a header.

    When the whole table is wider, its columns are wrapped into several tables, each repeating the first ``keys``
    columns (which identify a row), as pandas wraps wide frames. Numbers are right-aligned, floats shown to 0.1.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [all(not isinstance(row[i], str) for row in rows) for i in range(len(header))]
    keys = min(keys, len(header))
    blocks: list[list[int]] = []
    used = 4 + sum(widths[:keys]) + 3 * max(keys - 1, 0)  # "| " ... " |" plus " | " between key columns
    for i in range(keys, len(header)):
        if blocks and used + 3 + widths[i] <= width:
            blocks[-1].append(i)
            used += 3 + widths[i]
        else:
            blocks.append(list(range(keys)) + [i])
            used = 4 + sum(widths[:keys]) + 3 * keys + widths[i]
    if not blocks:
        blocks = [list(range(keys))]

    def line(values: Sequence[str], cols: list[int]) -> str:
        parts = [values[i].rjust(widths[i]) if numeric[i] else values[i].ljust(widths[i]) for i in cols]
        return "| " + " | ".join(parts) + " |"

    out = []
    for cols in blocks:
        rule = "|" + "|".join(
            ("-" * (widths[i] + 1) + ":") if numeric[i] else "-" * (widths[i] + 2) for i in cols
        )
        out += [line(list(header), cols), rule + "|", *(line(r, cols) for r in cells), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def format_results(payload: dict[str, Any], width: int = 80) -> str:
    """The results table of one run (title, then :func:`format_table` of its rows); recall in percent."""
    rows = payload.get("rows") or []
    present = {k for row in rows for k in row}
    header = [c for c in (*CONSOLE_COLUMNS, *CONSOLE_EXTRA) if c in present or c in ("attack", "eps_255")]
    facts = [
        str(payload.get(k))
        for k in ("dataset", "split")
        if payload.get(k) is not None  # e.g. "synthetic test"
    ]
    if payload.get("n_images") is not None:
        facts.append(f"{payload['n_images']} images, {payload.get('n_captions')} captions")
    title = f"robust retrieval — {payload.get('experiment', '')}"
    if facts:
        title += f" ({', '.join(facts)})"
    title += "; recall@K in %"
    if payload.get("complete") is False:
        title += " — INCOMPLETE: the run stopped before its last attack"
    table = format_table(header, [[row.get(c) for c in header] for row in rows_by_budget(rows)], width=width)
    return f"{title}\n\n{table}"


# -- the figure -------------------------------------------------------------------------------------------------------


def ks_of(rows: Sequence[dict]) -> list[int]:
    return sorted({int(k[4:]) for row in rows for k in row if k.startswith("tr_r") and k[4:].isdigit()})


def plot_curves(
    rows: Sequence[dict],
    out: Any,
    title: str = "",
    modalities: dict[str, str] | None = None,
    fmt: str = "png",
) -> None:
    """:func:`curves_figure` saved to ``out`` (a path or a binary file object): PNG at 200 dpi, or PDF."""
    import matplotlib.pyplot as plt

    fig = curves_figure(rows, title, modalities)
    fig.savefig(out, format=fmt, dpi=200, bbox_inches="tight")
    plt.close(fig)


def curves_figure(rows: Sequence[dict], title: str = "", modalities: dict[str, str] | None = None) -> Any:
    """Two panels: R@1 vs ε (one line per attack and direction) and R@K vs K (one line per attack, at its base ε).

    Only measured points are drawn: clean recall is a horizontal reference line, not a point at ε = 0; an attack
    measured at one ε is a marker, not a line. A multimodal attack's curve starts at ε = 0 from the text-only
    attack of the run (its text part alone), drawn dotted. When attacks win, several sit at 0-2 %: each attack's
    points are shifted sideways by a small fixed step (the ticks mark the measured ε and K) and the y axis starts
    below 0, so no marker hides another or is cut by the axis. One legend for both panels, outside them: a colour
    per attack plus the line styles (TR solid / circles, IR dashed / squares), not one entry per curve.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    modalities = modalities or {}
    fig, (ax_eps, ax_k) = plt.subplots(1, 2, figsize=(12, 4.4))
    clean = next((r for r in rows if r["attack"] == "clean"), None)
    attacks = list(dict.fromkeys(r["attack"] for r in rows if r["attack"] != "clean"))
    text_only = next((r for r in rows if r["attack"] != "clean" and r.get("eps_255") is None), None)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: colours[i % len(colours)] for i, name in enumerate(attacks)}
    measured = sorted({0.0, *(r["eps_255"] for r in rows if r.get("eps_255") is not None)})
    span = max(measured[-1], 1.0)
    # sideways step of each attack: centred on the measured value, 2.5 % of the axis per attack
    rank = {name: i - (len(attacks) - 1) / 2 for i, name in enumerate(attacks)}
    eps_shift = {name: r * 0.025 * span for name, r in rank.items()}
    styles = {"tr": ("-", "o"), "ir": ("--", "s")}
    if clean is not None:
        ax_eps.axhline(clean["tr_r1"], color="black", lw=1)
        ax_eps.axhline(clean["ir_r1"], color="black", lw=1, ls="--")
    for row in rows:  # text-only attacks perturb no pixel: a measured point at ε = 0
        if row["attack"] != "clean" and row.get("eps_255") is None:
            for direction, (_, marker) in styles.items():
                x = eps_shift[row["attack"]]
                ax_eps.plot(
                    [x],
                    [row[f"{direction}_r1"]],
                    marker=marker,
                    ls="none",
                    color=colour[row["attack"]],
                    label=f"{row['attack']} {direction.upper()}@1 (text only)",  # names the curve, not in the legend
                )
    for name in attacks:
        pts = sorted(
            (r for r in rows if r["attack"] == name and r.get("eps_255") is not None),
            key=lambda r: r["eps_255"],
        )
        if not pts:
            continue
        c, dx = colour[name], eps_shift[name]
        for direction, (style, marker) in styles.items():
            eps = [r["eps_255"] + dx for r in pts]
            values = [r[f"{direction}_r1"] for r in pts]
            ax_eps.plot(eps, values, ls=style, marker=marker, color=c, label=f"{name} {direction.upper()}@1")
            if modalities.get(name) == "multimodal" and text_only is not None and pts[0]["eps_255"] > 0:
                ax_eps.plot(
                    [dx, eps[0]],
                    [text_only[f"{direction}_r1"], values[0]],
                    ls=":",
                    marker=marker,
                    mfc="none",
                    color=c,
                    label=f"{name} {direction.upper()}@1 from ε=0: {text_only['attack']} (text only)",
                )
    ax_eps.set_xlabel("ε (/255)")
    ax_eps.set_ylabel("recall@1 (%)")
    ax_eps.set_title("R@1 vs ε (text-only attacks at ε = 0)")
    ax_eps.set_xticks(measured)  # the budgets that were run
    ax_eps.set_xlim(-0.08 * span, 1.08 * span)
    ks = ks_of(rows)
    k_shift = {name: r * 0.025 * max(ks[-1] - ks[0], 1) for name, r in rank.items()} | {"clean": 0.0}
    seen: set[str] = set()
    for row in rows:
        if row["attack"] in seen:  # first row of an attack is its configured budget
            continue
        seen.add(row["attack"])
        c = "black" if row["attack"] == "clean" else colour[row["attack"]]
        x = [k + k_shift[row["attack"]] for k in ks]
        for direction, (style, marker) in styles.items():
            label = f"{row['attack']} {direction.upper()}"
            ax_k.plot(
                x, [row[f"{direction}_r{k}"] for k in ks], ls=style, marker=marker, color=c, label=label
            )
    ax_k.set_xlabel("K")
    ax_k.set_xticks(ks)
    ax_k.set_ylabel("recall@K (%)")
    ax_k.set_title("R@K vs K (each attack at its configured ε)")
    for ax in (ax_eps, ax_k):
        ax.set_ylim(-4, 104)  # a marker at 0 % whole, not cut in half by the axis
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="black", lw=1, label="clean")]
    handles += [Line2D([], [], color=colour[name], lw=2, label=name) for name in attacks]
    handles += [
        Line2D([], [], color="grey", ls="-", marker="o", label="TR (image→text)"),
        Line2D([], [], color="grey", ls="--", marker="s", label="IR (text→image)"),
    ]
    if any(modalities.get(n) == "multimodal" for n in attacks) and text_only is not None:
        handles.append(
            Line2D([], [], color="grey", ls=":", marker="o", mfc="none", label=f"ε=0: {text_only['attack']}")
        )
    fig.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
