"""Calibration of the synthetic world against CLIP ViT-B/16 on Flickr30K: ``make calibrate``.

The synthetic benchmark stands in for Flickr30K only if an undefended model fares there as CLIP does on Flickr30K.
This evaluates the world's pretrained tiny CLIP (no fine-tuning) under the synthetic suite's attacks, through the
same ``mat robust-eval`` as every experiment (``experiments/synthetic_zeroshot.yaml``), plus a one-word synonym-only
substitution, and prints, per attack, the flip attack-success rate at R@1 (``asr_flip_tr_r1`` / ``asr_flip_ir_r1``:
% of the clean R@1 hits lost under attack) beside the reference figures, and whether each target holds:

* flip-ASR within ±10 points of the reference for the five attacks of the papers, both directions;
* clean TR@1 ≥ 70 and IR@1 ≥ 55 (CLIP ViT-B/16 zero-shot on Flickr30K: 81.5 / 62.1);
* a synonym-only one-word substitution costs ≤ 5 points of R@1 (the world's thesaurus keeps meaning).

Reference: SGA (Lu et al., ICCV 2023), Table 2, CLIP ViT-B/16 source = target, Flickr30K, ε = 2/255, 1 word; the
same figures as SGA's README. ``python -m benchmarks.calibrate --results <results.json>`` re-prints a finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# attack row -> reference flip-ASR at R@1 (TR, IR), percent
REFERENCE = {
    "pgd": (70.9, 78.6),
    "bert_attack": (28.3, 39.1),
    "sep_attack": (79.8, 86.8),
    "co_attack": (93.3, 95.9),
    "sga": (99.1, 98.9),
}
TOLERANCE = 10.0
CLEAN_TARGET = (70.0, 55.0)
SYNONYM_MAX_DROP = 5.0
SYNONYM_ROW = "synonym_1w"

# The one-word synonym-only substitution, added to the suite for this check (BERT-Attack's search, the world's
# thesaurus as its only source of candidates).
SYNONYM_ATTACK = (
    "{class_path: mat_lightning.attacks.BertAttack, init_args: {name: " + SYNONYM_ROW + ", mlm: synthetic, "
    "max_words: 1, top_k: 10, objective: image_cosine, candidate_generator: "
    "{class_path: mat_lightning.attacks.ThesaurusCandidates, init_args: {thesaurus: synthetic}}}}"
)


def run_eval(run_root: Path, extra: list[str]) -> Path:
    """``mat robust-eval`` of the pretrained world CLIP; returns its results.json."""
    cmd = [
        sys.executable,
        "-m",
        "mat_lightning",
        "robust-eval",
        "--config",
        "experiments/synthetic_zeroshot.yaml",
        "--experiment=calibrate",
        f"--run_root={run_root}",
        f"--robust_eval.attacks+={SYNONYM_ATTACK}",
        "--trainer.enable_progress_bar=false",
        "--robust_eval.progress=false",
        *extra,
    ]
    print("$", " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    found = sorted((run_root / "calibrate").glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"error: no results.json under {run_root / 'calibrate'}")
    return found[-1]


def table(results: dict) -> tuple[str, dict]:
    """The calibration table (Markdown, < 80 columns) and a verdict per target."""
    rows = {
        r["attack"]: r
        for r in results["rows"]
        if r.get("eps_255") in (None, 2, 2.0) or r["attack"] == "clean"
    }
    clean = rows["clean"]
    verdict: dict[str, bool] = {}
    lines = [
        "| attack | flip-ASR TR@1 | ref | flip-ASR IR@1 | ref | within ±10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, (ref_tr, ref_ir) in REFERENCE.items():
        if name not in rows:
            lines.append(f"| {name} | – | {ref_tr} | – | {ref_ir} | not run |")
            verdict[name] = False
            continue
        tr, ir = rows[name]["asr_flip_tr_r1"], rows[name]["asr_flip_ir_r1"]
        ok = abs(tr - ref_tr) <= TOLERANCE and abs(ir - ref_ir) <= TOLERANCE
        verdict[name] = ok
        lines.append(f"| {name} | {tr:.1f} | {ref_tr} | {ir:.1f} | {ref_ir} | {'yes' if ok else 'NO'} |")
    ok = clean["tr_r1"] >= CLEAN_TARGET[0] and clean["ir_r1"] >= CLEAN_TARGET[1]
    verdict["clean"] = ok
    lines += [
        "",
        f"clean TR@1 {clean['tr_r1']:.1f} (target >= {CLEAN_TARGET[0]:g}), IR@1 {clean['ir_r1']:.1f} "
        f"(target >= {CLEAN_TARGET[1]:g}): {'yes' if ok else 'NO'}",
    ]
    if SYNONYM_ROW in rows:
        syn = rows[SYNONYM_ROW]
        d_tr, d_ir = clean["tr_r1"] - syn["tr_r1"], clean["ir_r1"] - syn["ir_r1"]
        ok = max(d_tr, d_ir) <= SYNONYM_MAX_DROP
        verdict["synonym"] = ok
        lines.append(
            f"synonym-only, 1 word: R@1 drop TR {d_tr:.1f}, IR {d_ir:.1f} points "
            f"(target <= {SYNONYM_MAX_DROP:g}): {'yes' if ok else 'NO'}"
        )
    n = results.get("n_images") or results.get("data", {}).get("n_images")
    lines.append(f"({n} test images; reference: SGA, CLIP ViT-B/16 on Flickr30K, eps 2/255, 1 word)")
    return "\n".join(lines), verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="print the table of a finished run's results.json")
    parser.add_argument("--run-root", type=Path, default=Path("runs/calibrate"))
    args, extra = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    path = args.results or run_eval(args.run_root, extra)
    results = json.loads(path.read_text())
    text, verdict = table(results)
    print(text)
    print(f"targets met: {sum(verdict.values())}/{len(verdict)}  ({path})")
    out = path.parent / "calibration.md"
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
