"""`make bench` row ``rerank_scaling``: ITM re-ranking of a tiny BLIP sharded over 1 and 2 CPU processes (gloo).

For each number of test images (5 captions each) and each number of processes, one process per rank runs
:func:`~mat_lightning.eval.robust.robust_retrieval` (clean rows, ITM re-ranking of the top ``rerank_k``) on its
shard (rank r: images r, r + W, ...) and reports: its peak host memory (``VmHWM``) and the peak's growth during the
evaluation, the images whose ITM states it kept and their bytes, and the ITM pairs it scored and forwards it ran.
The same code is the worker of ``tests/test_rerank_sharded.py`` (rows of 1 vs 2 processes).

Data: image ``i`` is uniform noise drawn from a generator seeded with ``i``; its captions are 6 words of the tiny
world's vocabulary drawn from ``random.Random(i)``, so every rank builds the same split without reading files.
The tiny BLIP (1 layer, 32 wide, random weights, the tiny world's WordPiece tokenizer) is built by
:func:`save_tiny_blip`.

``python -m benchmarks.rerank_scaling`` runs this row alone and merges it into ``runs/bench/bench.json``;
``--worker`` is one rank of it (started by :func:`run_world`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CAPTIONS_PER_IMAGE = 5


def save_tiny_blip(folder: Path, tokenizer, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight ``BlipForImageTextRetrieval`` (one layer, 32 wide, patches of 8) and ``tokenizer``, saved.

    Weights are drawn wider than HF's defaults (std 0.2 vision, 0.5 text, instead of 1e-10 and 0.02): with those,
    every image gets the same embedding and captions nearly so, and rankings are decided by float rounding (gaps of
    ~1e-7 between similarities); with these, the gaps are ~1e-5 or more on the generated split.
    """
    from transformers import BlipConfig, BlipForImageTextRetrieval

    def tower(**extra) -> dict:
        return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **extra)

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=tower(
            vocab_size=len(tokenizer),
            encoder_hidden_size=32,
            max_position_embeddings=40,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=0.5,
        ),
        vision_config=tower(image_size=image_size, patch_size=8, initializer_range=0.2),
        image_text_hidden_size=16,
    )
    BlipForImageTextRetrieval(config).save_pretrained(folder)
    return folder


def world_words(tokenizer) -> list[str]:
    """The whole words of a WordPiece vocabulary (no specials, no ``##`` pieces), in vocabulary order."""
    vocab = tokenizer.get_vocab()  # a fast tokenizer's dict comes in a different order in every process
    return [w for w in sorted(vocab, key=vocab.get) if w.isalpha()]


def shard_batches(
    n_images: int, image_size: int, words: list[str], world: int, rank: int, batch_size: int = 16
) -> list:
    """Rank ``rank``'s evaluation batches: images ``rank, rank + world, ...`` of the generated split."""
    from mat_lightning.data.datamodule import RetrievalBatch

    ids = list(range(rank, n_images, world))
    batches = []
    for s in range(0, len(ids), batch_size):
        chunk = ids[s : s + batch_size]
        images = torch.stack(
            [torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(i)) for i in chunk]
        )
        captions = [
            " ".join(rng.choices(words, k=6))
            for i in chunk
            for rng in [random.Random(i)]
            for _ in range(CAPTIONS_PER_IMAGE)
        ]
        txt2img = torch.arange(len(chunk)).repeat_interleave(CAPTIONS_PER_IMAGE)
        batches.append(RetrievalBatch(images, captions, txt2img, torch.tensor(chunk)))
    return batches


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def evaluate(
    blip_dir: str, n_images: int, rerank_k: int, world: int = 1, rank: int = 0, suite: bool = False
) -> dict:
    """One rank's evaluation (a process group of ``world`` must be initialised when ``world > 1``): the rows and
    what this rank did. ``suite``: also PGD (split_contrastive) and BERT-Attack rows."""
    from transformers import AutoTokenizer

    from mat_lightning.attacks import PGD, BertAttack
    from mat_lightning.eval.robust import robust_retrieval
    from mat_lightning.models.hf import BlipRetrievalEncoder
    from mat_lightning.synthetic import ensure_mlm

    encoder = BlipRetrievalEncoder(blip_dir, rerank_k=rerank_k).eval()
    counts = {"pairs": 0, "forwards": 0, "images_with_states": 0, "states_bytes": 0}
    itm_scores, itm_image_states = encoder.itm_scores, encoder.itm_image_states

    def counted_scores(states, captions):
        counts["pairs"] += len(captions)
        counts["forwards"] += 1
        return itm_scores(states, captions)

    def counted_states(images):
        out = itm_image_states(images)
        counts["images_with_states"] += len(out)
        counts["states_bytes"] += out.numel() * out.element_size()
        return out

    encoder.itm_scores, encoder.itm_image_states = counted_scores, counted_states
    attacks = (
        [
            PGD(eps_255=2, steps=2, step_255=1, objective="split_contrastive"),
            BertAttack(mlm=str(ensure_mlm("tiny")), top_k=3, max_words=1),
        ]
        if suite
        else []
    )
    batches = shard_batches(
        n_images, encoder.image_size, world_words(AutoTokenizer.from_pretrained(blip_dir)), world, rank
    )
    rss_before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    rows = robust_retrieval(encoder, batches, attacks, progress=False)
    return {
        "rank": rank,
        "rows": [{k: v for k, v in r.items() if k != "seconds"} for r in rows],
        "itm_pairs": counts["pairs"],
        "itm_forwards": counts["forwards"],
        "images_with_states": counts["images_with_states"],
        "states_mb": round(counts["states_bytes"] / 2**20, 3),
        "peak_rss_mb": round(_rss_mb("VmHWM"), 1),
        "eval_peak_growth_mb": round(_rss_mb("VmHWM") - rss_before, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(
    blip_dir: Path, n_images: int, rerank_k: int, processes: int, out_dir: Path, suite: bool = False
) -> list[dict]:
    """:func:`evaluate` on ``processes`` fresh processes (gloo, one thread each): every rank's result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = []
    for rank in range(processes):
        cmd = [
            *(sys.executable, "-m", "benchmarks.rerank_scaling", "--worker", str(blip_dir)),
            *("--images", str(n_images), "--rerank-k", str(rerank_k), "--port", str(port)),
            *("--world", str(processes), "--rank", str(rank), "--out", str(out_dir / f"rank{rank}.json")),
            *(["--suite"] if suite else []),
        ]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=900)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"a rank failed (exit {p.returncode}):\n{err[-3000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(processes)]


def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{args.port}", world_size=args.world, rank=args.rank
        )
    try:
        result = evaluate(args.blip_dir, args.images, args.rerank_k, args.world, args.rank, args.suite)
    finally:
        if args.world > 1:
            dist.destroy_process_group()
    Path(args.out).write_text(json.dumps(result))


def tiny_blip_for_bench(folder: Path) -> Path:
    """The bench's tiny BLIP at 64 px (65 vision tokens), with the tiny world's tokenizer, built once."""
    from transformers import AutoTokenizer

    from mat_lightning.synthetic import ensure_mlm

    if not (folder / "config.json").is_file():
        save_tiny_blip(folder, AutoTokenizer.from_pretrained(ensure_mlm("tiny")), image_size=64)
    return folder


def bench_rerank_scaling(
    sizes: tuple[int, ...] = (64, 256, 1024),
    processes: tuple[int, ...] = (1, 2),
    rerank_k: int = 16,
    reps: int = 3,
) -> dict:
    """Per number of images and of processes: each rank's ITM pairs and forwards, its peak memory (the median of
    ``reps`` runs: the allocator's peak varies by tens of MB from run to run), and the ratios from the first to the
    last process count (the busiest rank's pairs, the largest peak)."""
    root = REPO / "runs" / "bench" / "rerank"
    blip = tiny_blip_for_bench(root / "tiny_blip")
    out: dict = {"rerank_k": rerank_k, "captions_per_image": CAPTIONS_PER_IMAGE, "image_px": 64, "reps": reps}
    for n in sizes:
        row: dict = {}
        for w in processes:
            runs = [run_world(blip, n, rerank_k, w, root / f"images{n}_processes{w}") for _ in range(reps)]
            ranks = runs[0]

            def median(key: str, runs=runs, w=w) -> list[float]:
                return [statistics.median(run[r][key] for run in runs) for r in range(w)]

            row[f"processes_{w}"] = {
                "itm_pairs_per_rank": [r["itm_pairs"] for r in ranks],
                "itm_forwards_per_rank": [r["itm_forwards"] for r in ranks],
                "states_mb_per_rank": [r["states_mb"] for r in ranks],
                "peak_rss_mb_per_rank": median("peak_rss_mb"),
                "eval_peak_growth_mb_per_rank": median("eval_peak_growth_mb"),
                "seconds": statistics.median(max(r["seconds"] for r in run) for run in runs),
                "tr_r1": ranks[0]["rows"][0]["tr_r1"],
                "ir_r1": ranks[0]["rows"][0]["ir_r1"],
            }
        a, b = row[f"processes_{processes[0]}"], row[f"processes_{processes[-1]}"]
        row["busiest_rank_itm_pairs_ratio"] = round(
            max(b["itm_pairs_per_rank"]) / max(a["itm_pairs_per_rank"]), 3
        )
        row["peak_rss_ratio"] = round(max(b["peak_rss_mb_per_rank"]) / max(a["peak_rss_mb_per_rank"]), 3)
        row["same_rows"] = (a["tr_r1"], a["ir_r1"]) == (b["tr_r1"], b["ir_r1"])
        out[f"images_{n}"] = row
    return out


def blip_base_gflops() -> dict:
    """FLOPs of BLIP-base (``BlipConfig()``: ViT-B/16 at 384 px, 12-layer BERT-base text encoder) counted by
    ``torch.utils.flop_counter`` on the meta device: one image's vision forward and one ITM pair (35 tokens,
    cross-attending to the 577 vision states), in GFLOP; and the model's parameter count."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BlipConfig, BlipForImageTextRetrieval

    config = BlipConfig()
    with torch.device("meta"), torch.no_grad():
        model = BlipForImageTextRetrieval(config).eval()
        size = config.vision_config.image_size
        with FlopCounterMode(display=False) as vision:
            states = model.vision_model(pixel_values=torch.zeros(1, 3, size, size)).last_hidden_state
        tokens = torch.zeros(1, 35, dtype=torch.long)
        with FlopCounterMode(display=False) as itm:
            out = model.text_encoder(
                input_ids=tokens,
                attention_mask=torch.ones_like(tokens),
                encoder_hidden_states=states,
                encoder_attention_mask=torch.ones(states.shape[:2], dtype=torch.long),
            ).last_hidden_state
            model.itm_head(out[:, 0])
    return {
        "image_px": size,
        "vision_tokens": states.shape[1],
        "width": states.shape[2],
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "vision_gflop_per_image": round(vision.get_total_flops() / 1e9, 2),
        "itm_gflop_per_pair": round(itm.get_total_flops() / 1e9, 2),
    }


def coco_projection(flops: dict, gpus: int = 8, k: int = 256, assume_tflops: float = 200.0) -> dict:
    """A projection (not a measurement) for COCO's 5k test split (25,010 captions) re-ranked at k on ``gpus`` GPUs:
    the ITM pairs of a rank (the upper bound: no pair in both an image's and a caption's top-k, ranks evenly
    loaded), its FLOPs and time at ``assume_tflops`` sustained, and its memory for vision states in float32,
    against the replaced design (every rank gathered all pixels and re-ranked every query)."""
    n_img, n_txt = 5000, 25010
    tokens, width, px = flops["vision_tokens"], flops["width"], flops["image_px"]
    pairs = (n_img + n_txt) * k
    per_rank = pairs / gpus
    seconds = per_rank * flops["itm_gflop_per_pair"] * 1e9 / (assume_tflops * 1e12)
    return {
        "projection": True,
        "gpus": gpus,
        "rerank_k": k,
        "assumed_tflops": assume_tflops,
        "itm_pairs_total_at_most": pairs,
        "itm_pairs_per_gpu_at_most": round(per_rank),
        "itm_seconds_per_gpu_per_row": round(seconds, 1),
        "vision_states_gb_per_gpu": round(n_img / gpus * tokens * width * 4 / 1e9, 2),
        "model_gb": round(flops["parameters_m"] * 4e6 / 1e9, 2),
        "scores_all_reduce_mb": round(pairs * 4 / 1e6, 1),
        "before_itm_seconds_per_gpu_per_row": round(seconds * gpus, 1),
        "before_pixels_gb_per_rank": round(n_img * 3 * px * px * 4 / 1e9, 2),
        "before_vision_states_gb_per_gpu": round(n_img * tokens * width * 4 / 1e9, 2),
    }


def full_row(sizes: tuple[int, ...] = (64, 256, 1024)) -> dict:
    """The bench.json row: the measured scaling, BLIP-base's FLOPs and the COCO projection from them."""
    result = bench_rerank_scaling(sizes)
    result["blip_base"] = blip_base_gflops()
    result["coco_projection"] = coco_projection(result["blip_base"])
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """The README speed table's rows of this bench: per size, the busiest rank's ITM pairs and peak memory."""
    rows = []
    for key, row in r.items():
        if not key.startswith("images_"):
            continue
        one, two = row["processes_1"], row["processes_2"]
        rows.append(
            (
                f"ITM re-ranking, tiny BLIP, {key.split('_')[1]} images (k={r['rerank_k']}), 1 vs 2 processes",
                f"ITM pairs per rank {max(one['itm_pairs_per_rank'])} vs {max(two['itm_pairs_per_rank'])}; "
                f"peak memory per rank {max(one['peak_rss_mb_per_rank'])} vs {max(two['peak_rss_mb_per_rank'])} MB",
                f"{row['busiest_rank_itm_pairs_ratio']}x the pairs, {row['peak_rss_ratio']}x the memory",
                "0.5x, <= 1x",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", dest="blip_dir", help="run one rank with this BLIP folder")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rerank-k", type=int, default=16)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out")
    parser.add_argument("--suite", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    args = parser.parse_args()
    if args.blip_dir:
        _worker(args)
        return
    from benchmarks.run import write_results

    result = full_row(tuple(args.sizes))
    previous = REPO / "runs" / "bench" / "bench.json"
    results = {**(json.loads(previous.read_text()) if previous.is_file() else {}), "rerank_scaling": result}
    print(json.dumps(result, indent=2))
    print(f"written to {write_results(results)}")


if __name__ == "__main__":
    main()
