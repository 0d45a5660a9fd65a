"""Result files of a run: ``results.json``, ``results.csv``, ``curves.png`` (DESIGN §4), written atomically.

``results.json`` = ``{"experiment", "model", "dataset", "split", "n_images", "n_captions", "rows": [...]}``; a row is
``{"attack", "eps_255", "tr_r1", ..., "r_mean", "asr_drop_tr_r1", ..., "asr_flip_tr_r1", ..., "seconds"}``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
    os.replace(tmp, path)


def write_results(run_dir: str | Path, payload: dict[str, Any]) -> None:
    """``results.json``, ``results.csv`` and ``curves.png`` in ``run_dir``."""
    run_dir = Path(run_dir)
    atomic_write(run_dir / "results.json", json.dumps(payload, indent=2))
    rows = payload["rows"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "results.csv", buf.getvalue())
    png = io.BytesIO()
    plot_curves(
        rows,
        png,
        title=f"{payload.get('experiment', '')} — {payload.get('dataset', '')} {payload.get('split', '')}",
    )
    atomic_write(run_dir / "curves.png", png.getvalue())


def ks_of(rows: Sequence[dict]) -> list[int]:
    return sorted({int(k[4:]) for row in rows for k in row if k.startswith("tr_r") and k[4:].isdigit()})


def plot_curves(rows: Sequence[dict], out: Any, title: str = "") -> None:
    """Two panels: R@1 vs ε (one line per attack and direction) and R@K vs K (one line per attack, at its base ε).

    ``out`` is a path or a binary file object.
    """
    fig, (ax_eps, ax_k) = plt.subplots(1, 2, figsize=(11, 4.2))
    clean = next((r for r in rows if r["attack"] == "clean"), None)
    attacks = list(dict.fromkeys(r["attack"] for r in rows if r["attack"] != "clean"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(attacks):
        pts = sorted(
            (r for r in rows if r["attack"] == name and r.get("eps_255") is not None),
            key=lambda r: r["eps_255"],
        )
        if not pts:
            continue
        if clean is not None and pts[0]["eps_255"] > 0:
            pts = [{**clean, "eps_255": 0.0}, *pts]
        eps = [r["eps_255"] for r in pts]
        c = colours[i % len(colours)]
        ax_eps.plot(eps, [r["tr_r1"] for r in pts], "-o", color=c, label=f"{name} TR@1")
        ax_eps.plot(eps, [r["ir_r1"] for r in pts], "--s", color=c, label=f"{name} IR@1")
    ax_eps.set_xlabel("ε (/255)")
    ax_eps.set_ylabel("recall (%)")
    ax_eps.set_title("R@1 vs ε")
    ax_eps.set_ylim(0, 100)
    ks = ks_of(rows)
    seen: set[str] = set()
    for row in rows:
        if row["attack"] in seen:  # first row of an attack is its configured budget
            continue
        seen.add(row["attack"])
        c = "black" if row["attack"] == "clean" else colours[(attacks.index(row["attack"])) % len(colours)]
        ax_k.plot(ks, [row[f"tr_r{k}"] for k in ks], "-o", color=c, label=f"{row['attack']} TR")
        ax_k.plot(ks, [row[f"ir_r{k}"] for k in ks], "--s", color=c, label=f"{row['attack']} IR")
    ax_k.set_xlabel("K")
    ax_k.set_ylabel("recall@K (%)")
    ax_k.set_title("R@K vs K")
    ax_k.set_ylim(0, 100)
    for ax in (ax_eps, ax_k):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
