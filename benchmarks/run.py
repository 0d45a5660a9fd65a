"""`make bench`: speed measured side by side in one run and reported as ratios (never asserted in tests).

1. BERT-Attack, batched (ours) vs. the same attack driven one caption at a time (the loop structure of the
   Co-Attack/SGA reference code): captions per second and the ratio. On the synthetic world's test captions with
   its tiny MLM and tiny CLIP, and on real Flickr30K captions (``../shared/data``) with a tiny MLM whose WordPiece
   vocabulary comes from those captions, so multi-sub-word words occur as with BERT.
2. Image attack protocol: each image attacked once with all its captions (ours, SGA's protocol) vs. once per caption
   (Co-Attack's script), same PGD: seconds and ratio.
3. recall@K at COCO-5k size (5,000 x 25,010): our chunked ranks vs. a full-sort reference: seconds and ratio.
4. Robust evaluation under DDP: ``mat robust-eval`` (PGD, 10 steps, ``split_contrastive``) on the synthetic test split
   with the tiny CLIP, on 1 and on 2 CPU processes (gloo, one thread each): images per second of the attacked pass
   (its ``seconds`` in results.json, which include gathering the embeddings) and the speed-up.

Results are printed and written to ``runs/bench/bench.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr30k" / "flickr30k_test.json"


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_bert_attack(encoder, captions: list[str], mlm: str, n_loop: int) -> dict:
    from mat_lightning.attacks import BertAttack

    attack = BertAttack(mlm=mlm, top_k=10, max_words=1, objective="embedding_kl")
    attack.perturb(encoder, captions[:4], torch.arange(4), "embedding_kl")  # load the MLM outside the timing
    t2i = torch.arange(len(captions))
    batched = timed(lambda: attack.perturb(encoder, captions, t2i, "embedding_kl"))
    subset = captions[:n_loop]
    loop = timed(lambda: [attack.perturb(encoder, [c], torch.tensor([0]), "embedding_kl") for c in subset])
    batched_cps, loop_cps = len(captions) / batched, len(subset) / loop
    return {
        "captions": len(captions),
        "batched_captions_per_s": round(batched_cps, 1),
        "per_caption_loop_captions_per_s": round(loop_cps, 1),
        "speedup": round(batched_cps / loop_cps, 1),
    }


def bench_protocol(encoder, images, captions, txt2img) -> dict:
    from mat_lightning.attacks import PGD

    attack = PGD(eps_255=2, steps=10, step_255=0.5)
    once = timed(lambda: attack.clone()(encoder, images, captions, txt2img))

    def per_caption():  # Co-Attack's script: one (image, caption) pair at a time, batched by pairs
        pair_images = images[txt2img]
        attack.clone()(encoder, pair_images, captions, torch.arange(len(captions)))

    per_pair = timed(per_caption)
    return {
        "images": len(images),
        "captions": len(captions),
        "once_per_image_s": round(once, 2),
        "once_per_caption_s": round(per_pair, 2),
        "speedup": round(per_pair / once, 1),
    }


def bench_recall() -> dict:
    from mat_lightning.eval.retrieval import recall_at_k

    g = torch.Generator().manual_seed(0)
    n_img, per = 5000, 5
    txt2img = torch.arange(n_img).repeat_interleave(per)
    txt2img = torch.cat([txt2img, torch.arange(10)])  # COCO: 10 images have a 6th caption -> 25,010
    sim = torch.randn(n_img, len(txt2img), generator=g)

    def full_sort():  # the reference pattern: argsort every row and column of the whole matrix
        order = sim.argsort(dim=1, descending=True)
        pos = txt2img[order] == torch.arange(n_img)[:, None]
        tr_rank = pos.float().argmax(dim=1)
        order_t = sim.T.argsort(dim=1, descending=True)
        ir_rank = (order_t == txt2img[:, None]).float().argmax(dim=1)
        return {k: (tr_rank < k).float().mean() for k in (1, 5, 10)}, {
            k: (ir_rank < k).float().mean() for k in (1, 5, 10)
        }

    ours = timed(lambda: recall_at_k(sim, txt2img), 2)
    ref = timed(full_sort, 1)
    return {
        "shape": [n_img, len(txt2img)],
        "chunked_s": round(ours, 2),
        "full_sort_s": round(ref, 2),
        "speedup": round(ref / ours, 1),
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
    out["speedup"] = round(last["images_per_s"] / first["images_per_s"], 2)
    out["same_rows"] = len({v["tr_r1"] for k, v in out.items() if k.startswith("processes")}) == 1
    return out


def main() -> None:
    from mat_lightning import world
    from mat_lightning.models.encoder import OpenClipEncoder

    torch.manual_seed(0)
    results: dict = {"torch_threads": torch.get_num_threads()}
    encoder = OpenClipEncoder("mat-tiny", pretrained=str(world.ensure_clip("default"))).eval()
    images, caps = world.load_split("default", "test")
    captions = [c for cs in caps for c in cs]
    txt2img = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    results["bert_attack_synthetic"] = bench_bert_attack(encoder, captions, "synthetic", n_loop=100)
    if FLICKR.is_file():
        from mat_lightning.data.formats import read_annotations
        from mat_lightning.models.mlm import train_tiny_mlm

        flickr = [c for r in read_annotations(FLICKR, "/") for c in r.captions]
        folder = REPO / "runs" / "bench" / "flickr_mlm"
        if not (folder / "config.json").is_file():
            train_tiny_mlm(flickr, folder, steps=200, progress=False)
        results["bert_attack_flickr_captions"] = bench_bert_attack(
            encoder, flickr[:1000], str(folder), n_loop=100
        )
    x = images[:64].float() / 255
    sel = txt2img < 64
    results["image_attack_protocol"] = bench_protocol(
        encoder, x, [c for c, s in zip(captions, sel, strict=True) if s], txt2img[sel]
    )
    results["recall_coco_size"] = bench_recall()
    results["robust_eval_ddp_cpu"] = bench_ddp_robust_eval()
    out = REPO / "runs" / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
