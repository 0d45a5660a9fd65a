"""`make bench`: speed measured side by side in one run and reported as ratios (never asserted in tests).

One torch thread, interleaved repetitions, medians (the machine is shared):

1. BERT-Attack, batched (ours) vs a per-caption loop written from the reference algorithm
   (:mod:`benchmarks.reference_bert_attack`), image-guided, on lower-cased Flickr30K test captions
   (``../shared/data``): at tiny size (tiny CLIP, a tiny MLM with a Flickr WordPiece vocabulary) and at BERT-base /
   ViT-B/16 size (random weights, 10 captions): captions per second, their ratio, % identical adversarial captions,
   and host (non-forward) milliseconds per caption.
2. CLIP text forwards at ViT-B/16 size: context cut to the tokens in use vs the full 77-token context.
3. SGA vs a 10-step PGD on 32 synthetic-world images (tiny CLIP): the cost ratio.
4. recall@K at COCO-5k size (5,000 x 25,010) vs a plain ``torch.topk``: time and peak memory beyond the matrix.
5. Robust evaluation under DDP: ``mat robust-eval`` (PGD, 10 steps, ``split_contrastive``) on the synthetic test split
   with the tiny CLIP, on 1 and on 2 CPU processes (gloo, one thread each): images per second of the attacked pass
   (its ``seconds`` in results.json, which include gathering the embeddings) and the speed-up.

Every ratio sits under a key containing ``ratio``; results go to ``runs/bench/bench.json``. ``BENCH_QUICK=1``
shortens the tiny-size text attack run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr30k" / "flickr30k_test.json"


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``reps`` times (noise on a shared machine hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_bert_attack(encoder, mlm_model, tok, captions: list[str], reps: int) -> dict:
    """Batched BertAttack vs the per-caption reference loop (image-guided, 1 word, top-10, legacy offset as the
    reference), same models and captions: speed ratio and % identical adversarial captions; host ms per caption."""
    from benchmarks.reference_bert_attack import reference_attack
    from mat_lightning.attacks import BertAttack

    g = torch.Generator().manual_seed(0)
    images = torch.rand(len(captions), 3, encoder.image_size, encoder.image_size, generator=g)
    with torch.no_grad():
        image_emb = encoder.encode_image(images)
    t2i = torch.arange(len(captions))
    attack = BertAttack.from_mlm(mlm_model, tok, top_k=10, max_words=1, legacy_offset=True)
    out: dict = {}

    def ours():
        out["ours"] = attack.perturb(encoder, captions, t2i, "image_cosine", image_emb)

    def reference():
        out["ref"] = [
            reference_attack(encoder, mlm_model, tok, c, image_emb[i], attack.stop_words)
            for i, c in enumerate(captions)
        ]

    t = interleaved({"ours": ours, "reference": reference}, reps)
    same = sum(a == b for a, b in zip(out["ours"], out["ref"], strict=True))
    return {
        "captions": len(captions),
        "ours_captions_per_s": round(len(captions) / t["ours"], 2),
        "reference_captions_per_s": round(len(captions) / t["reference"], 2),
        "speed_ratio": round(t["reference"] / t["ours"], 2),
        "identical_adversarial_captions_pct": round(100 * same / len(captions), 1),
        "host_ms_per_caption": round(host_ms_per_caption(attack, encoder, mlm_model, captions, image_emb), 2),
    }


def host_ms_per_caption(attack, encoder, mlm_model, captions, image_emb) -> float:
    """Wall time of the attack minus the time in model work (the text transformer, the MLM forwards with the top-k
    and perplexity reductions of their logits), per caption: tokenisation, candidates, strings and bookkeeping."""
    from mat_lightning.attacks import bert_attack

    inside = [0.0]

    def timed_call(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t0

        return wrapper

    patched = {"_mlm_topk": bert_attack._mlm_topk, "_perplexity": bert_attack._perplexity}
    encoder._encode_cut = timed_call(encoder._encode_cut)
    for name, fn in patched.items():
        setattr(bert_attack, name, timed_call(fn))
    try:
        t0 = time.perf_counter()
        attack.perturb(encoder, captions, torch.arange(len(captions)), "image_cosine", image_emb)
        total = time.perf_counter() - t0
    finally:
        del encoder._encode_cut
        for name, fn in patched.items():
            setattr(bert_attack, name, fn)
    return 1000 * (total - inside[0]) / len(captions)


def bench_text_context(encoder, captions: list[str], reps: int) -> dict:
    """CLIP text forwards: context cut to the tokens in use (length buckets) vs the full context."""
    with torch.no_grad():
        ids = encoder.tokenize(captions)
        t = interleaved(
            {
                "cut": lambda: encoder.encode_text(captions),
                "full": lambda: encoder.model.encode_text(ids, normalize=True),
            },
            reps,
        )
    return {
        "captions": len(captions),
        "cut_s": round(t["cut"], 3),
        "full_s": round(t["full"], 3),
        "speed_ratio": round(t["full"] / t["cut"], 2),
    }


def bench_sga_vs_pgd(encoder, images, captions, txt2img, mlm: str, reps: int) -> dict:
    """SGA (4 scaled views, two text passes) vs a 10-step PGD on the same batch: the cost ratio (target <= 8)."""
    from mat_lightning.attacks import PGD, SGA, BertAttack

    pgd = PGD(eps_255=2, steps=10, step_255=0.5)
    sga = SGA(PGD(eps_255=2, steps=10, step_255=0.5), BertAttack(mlm=mlm, top_k=10, max_words=1))
    sga.prepare("cpu")
    t = interleaved(
        {
            "pgd": lambda: pgd.clone()(encoder, images, captions, txt2img),
            "sga": lambda: sga.clone()(encoder, images, captions, txt2img),
        },
        reps,
    )
    return {
        "images": len(images),
        "pgd_s": round(t["pgd"], 2),
        "sga_s": round(t["sga"], 2),
        "sga_over_pgd_ratio": round(t["sga"] / t["pgd"], 2),
    }


_RECALL_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from mat_lightning.eval.retrieval import recall_at_k
g = torch.Generator().manual_seed(0)
n = 5000
t2i = torch.cat([torch.arange(n).repeat_interleave(5), torch.arange(10)])  # COCO: 10 images have 6 captions
sim = torch.randn(n, len(t2i), generator=g)
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
def topk():  # the plain torch.topk implementation: top-10 of every row and column
    return sim.topk(10, dim=1).indices, sim.T.topk(10, dim=1).indices
fn = recall_at_k if sys.argv[1] == "ours" else topk
base = hwm(); t0 = time.perf_counter()
fn(sim, t2i) if sys.argv[1] == "ours" else fn()
print(time.perf_counter() - t0, hwm() - base)
"""


def bench_recall(reps: int = 3) -> dict:
    """recall@K at COCO-5k size (5,000 x 25,010), each run in a fresh process for its peak memory beyond ``sim``."""
    import subprocess
    import sys

    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "topk": []}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for _ in range(reps):
        for which in runs:
            out = subprocess.run(
                [sys.executable, "-c", _RECALL_CHILD, which],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout.split()
            runs[which].append((float(out[0]), float(out[1])))
    med = {
        k: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()
    }
    return {
        "shape": [5000, 25010],
        "ours_s": round(med["ours"][0], 2),
        "topk_s": round(med["topk"][0], 2),
        "ours_over_topk_time_ratio": round(med["ours"][0] / med["topk"][0], 2),
        "ours_extra_peak_mb": round(med["ours"][1], 1),
        "topk_extra_peak_mb": round(med["topk"][1], 1),
    }


DDP_SUITE = """
attacks:
  - class_path: mat_lightning.attacks.PGD
    init_args: {eps_255: 2, steps: 10, step_255: 0.5, objective: split_contrastive}
"""


def bench_ddp_robust_eval(processes: tuple[int, ...] = (1, 2)) -> dict:
    import subprocess
    import sys

    root = REPO / "runs" / "bench" / "ddp"
    root.mkdir(parents=True, exist_ok=True)
    suite = root / "suite.yaml"
    suite.write_text(DDP_SUITE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("MAT_RUN_DIR", None)
    out: dict = {}
    for n in processes:
        run_dir = root / f"processes{n}"
        cmd = [
            *(sys.executable, "-m", "mat_lightning", "robust-eval", f"--robust_eval={suite}"),
            *("--trainer.accelerator=cpu", f"--trainer.devices={n}", "--trainer.logger=false"),
            *(["--trainer.strategy=ddp"] if n > 1 else []),
            *("--trainer.enable_progress_bar=false", "--robust_eval.progress=false"),
            f"--trainer.default_root_dir={run_dir}",
        ]
        subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
        result = json.loads((run_dir / "results.json").read_text())
        pgd = next(r for r in result["rows"] if r["attack"] == "pgd")
        out[f"processes_{n}"] = {
            "images": result["n_images"],
            "seconds": pgd["seconds"],
            "images_per_s": round(result["n_images"] / pgd["seconds"], 1),
            "tr_r1": pgd["tr_r1"],
        }
    first, last = out[f"processes_{processes[0]}"], out[f"processes_{processes[-1]}"]
    out["speedup_ratio"] = round(last["images_per_s"] / first["images_per_s"], 2)
    out["same_rows"] = len({v["tr_r1"] for k, v in out.items() if k.startswith("processes")}) == 1
    return out


def markdown_table(r: dict) -> str:
    """The README's speed table from the results."""
    bt, bb, tc = r["bert_attack_tiny"], r["bert_attack_base"], r["text_context_base"]
    sga, rec = r["sga_vs_pgd_tiny"], r["recall_coco_size"]
    rows = [
        (
            "BertAttack vs the reference per-caption loop, tiny (500 Flickr30K captions)",
            f"{bt['ours_captions_per_s']} vs {bt['reference_captions_per_s']} captions/s",
            f"{bt['speed_ratio']}x, {bt['identical_adversarial_captions_pct']} % identical",
            ">= 5x, >= 95 %",
        ),
        (
            "BertAttack vs the reference loop, BERT-base / ViT-B/16 (10 captions)",
            f"{bb['ours_captions_per_s']} vs {bb['reference_captions_per_s']} captions/s",
            f"{bb['speed_ratio']}x, {bb['identical_adversarial_captions_pct']} % identical",
            ">= 5x, >= 95 %",
        ),
        (
            "BertAttack host time per caption (tiny / base)",
            f"{bt['host_ms_per_caption']} / {bb['host_ms_per_caption']} ms",
            "",
            "<= 1.5 ms",
        ),
        (
            "ViT-B/16 text forwards, context cut vs 77 tokens (64 captions)",
            f"{tc['cut_s']} vs {tc['full_s']} s",
            f"{tc['speed_ratio']}x",
            "",
        ),
        (
            "SGA vs 10-step PGD (32 images, tiny CLIP)",
            f"{sga['sga_s']} vs {sga['pgd_s']} s",
            f"{sga['sga_over_pgd_ratio']}x",
            "<= 8x",
        ),
        (
            "recall@K at 5,000 x 25,010 vs torch.topk",
            f"{rec['ours_s']} vs {rec['topk_s']} s; "
            f"+{rec['ours_extra_peak_mb']} vs +{rec['topk_extra_peak_mb']} MB peak",
            f"{rec['ours_over_topk_time_ratio']}x the time",
            "<= 1.1x, <= 50 MB",
        ),
    ]
    lines = ["| measurement | figures | ratio | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def flickr_captions() -> list[str]:
    from mat_lightning.data.formats import read_annotations

    # lower-cased, as the references' pre_caption does before their text attack
    return [c.lower() for r in read_annotations(FLICKR, "/") for c in r.captions]


def flickr_mlm_folder(captions: list[str]) -> Path:
    """A tiny BERT MLM with a WordPiece vocabulary from the Flickr30K test captions (built once under runs/)."""
    from mat_lightning.models.mlm import train_tiny_mlm

    folder = REPO / "runs" / "bench" / "flickr_mlm"
    if not (folder / "config.json").is_file():
        train_tiny_mlm(captions, folder, steps=100, batch_size=64, progress=False)
    return folder


def base_size_models(mlm_folder: Path):
    """Random-weight ViT-B/16 CLIP and a BERT-base-size MLM (12 x 768; the Flickr WordPiece vocabulary, as
    bert-base-uncased's cannot be downloaded here)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from mat_lightning.models.encoder import OpenClipEncoder

    torch.manual_seed(0)
    encoder = OpenClipEncoder("ViT-B-16", pretrained=None).eval()
    tok = AutoTokenizer.from_pretrained(mlm_folder)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok))).eval()
    return encoder, mlm, tok


def main() -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mat_lightning import world
    from mat_lightning.models.encoder import OpenClipEncoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    quick = os.environ.get("BENCH_QUICK") == "1"
    results: dict = {"torch_threads": torch.get_num_threads()}
    tiny = OpenClipEncoder("mat-tiny", pretrained=str(world.ensure_clip("default"))).eval()
    captions = flickr_captions()
    folder = flickr_mlm_folder(captions)
    tok, mlm = AutoTokenizer.from_pretrained(folder), AutoModelForMaskedLM.from_pretrained(folder).eval()
    results["bert_attack_tiny"] = bench_bert_attack(tiny, mlm, tok, captions[: 200 if quick else 500], reps=3)
    print(json.dumps(results, indent=2), flush=True)
    base_encoder, base_mlm, base_tok = base_size_models(folder)
    results["text_context_base"] = bench_text_context(base_encoder, captions[:64], reps=3)
    results["bert_attack_base"] = bench_bert_attack(base_encoder, base_mlm, base_tok, captions[:10], reps=2)
    del base_encoder, base_mlm
    print(json.dumps(results, indent=2), flush=True)

    images, caps = world.load_split("default", "test")
    x = images[:32].float() / 255
    sel = [c for cs in caps[:32] for c in cs]
    t2i = torch.tensor([i for i, cs in enumerate(caps[:32]) for _ in cs])
    results["sga_vs_pgd_tiny"] = bench_sga_vs_pgd(tiny, x, sel, t2i, "synthetic", reps=3)
    results["recall_coco_size"] = bench_recall(reps=3)
    results["robust_eval_ddp_cpu"] = bench_ddp_robust_eval()
    out = REPO / "runs" / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(json.dumps(results, indent=2))
    print(markdown_table(results))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
