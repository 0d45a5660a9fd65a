"""`make gpu-check`: is this machine ready for the paper grid, and how long would the grid take on it?

No downloads: a random-weight open_clip ViT-B/16 (the grid's architecture, with its text tower), a randomly initialised
BERT-base-sized masked LM (12 layers, 768 wide, 30,522 word pieces) for BERT-Attack, and generated images and
captions. It runs, on the first GPU (the CPU when there is none):

0. BERT-Attack's candidate store (``attacks/store.py``) of the training batch's captions: captions/s of the build,
   done once per data set (``mat prepare-attacks``);
1. training steps at batch 128: clean fine-tuning and MAT (BERT-Attack 1 word, then 2-step PGD), MAT without and
   with the store's entries for the batch (as the DataLoader workers hand them over); the text attack's host time
   per caption (main process, outside model work, device synchronised) without and with the store;
2. a robust evaluation of 256 generated images with 5 captions each: clean, PGD (10 steps), BERT-Attack, SGA (their
   stores built first);

and prints images/s per stage, the host share of the MAT step, the peak GPU memory, and the **projected** wall time
of the full Flickr30K grid, on one GPU and on 8 (longest run first onto the least loaded GPU; target 2 h), and of a
Flickr30K SGA evaluation (target 60 s on one H200)
(experiments/flickr30k_clip_b16_*.yaml: 8 trained defenses x 10 epochs x 29,000 images, each followed by a robust
evaluation of the 1,000 test images with 5 attacks, plus the zero-shot evaluation) from those rates. Projections are
rates times work; they ignore data loading (decode with DataLoader workers to keep up), per-defense differences in
attack cost beyond the two training rates measured, and warm-up. ``--tiny`` runs the same code with the tiny
synthetic-world architecture (what the test suite does on the CPU). Results also go to ``runs/gpu_check/``.

``--assume-tflops T`` is for machines without a GPU: every stage runs (on the CPU, small ``--batch`` and
``--eval-images`` suffice) under torch's ``FlopCounterMode``, and its rate becomes ``T * 1e12 / FLOPs per image``:
a projection from counted FLOPs at an assumed sustained throughput, plus the text attack's host time with the store
as measured on this CPU (10 epochs x 29,000 captions per text-attacking run); it ignores memory-bound kernels, so it
is a lower bound on the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLICKR_TRAIN_IMAGES, FLICKR_TEST_IMAGES, FLICKR_EPOCHS = 29_000, 1_000, 10
FLICKR_TRAIN_CAPTIONS = 5 * FLICKR_TRAIN_IMAGES
TRAINED_DEFENSES = ("clean", "image_at", "tecoa", "fare", "text_at", "mmcoa", "mat", "mat_1n")
WORDS = (
    "a an the man woman child dog cat bike car street park beach red blue green small large young old runs sits "
    "stands walks plays rides holds looks near on in with under next to front of while wearing shirt hat ball"
).split()


def captions_for(n_images: int, per_image: int, rng: random.Random) -> list[str]:
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(7, 12))) for _ in range(n_images * per_image)
    ]


def random_mlm(folder: Path, tiny: bool) -> str:
    """A randomly initialised BERT masked LM (BERT-base size unless ``tiny``) with a WordPiece vocabulary of our words,
    padded with unused pieces to BERT's 30,522, saved with save_pretrained."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(
        dict.fromkeys(specials + sorted(set(WORDS)) + [chr(c) for c in range(ord("a"), ord("z") + 1)])
    )
    size = 512 if tiny else 30_522
    vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    dims = (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        if tiny
        else {}
    )
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), **dims)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_rate(fn, n_images: int, tflops: float) -> float:
    """Images/s of ``fn`` (a stage over ``n_images`` images) from its FLOPs at ``tflops`` sustained."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return tflops * 1e12 * n_images / max(counter.get_total_flops(), 1)


def host_ms_per_caption(attack, encoder, images, captions, device, plan=None) -> float:
    """Milliseconds per caption the text attack spends on the main process outside model work: its wall time
    minus the time inside the text and image towers and the MLM passes, each timed with the device synchronised
    (on a GPU the host work runs while nothing else would; this is the part a faster GPU does not shorten)."""
    from contextlib import nullcontext

    from mat_lightning.attacks import bert_attack as ba

    inside = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync(device)
                inside[0] += time.perf_counter() - t0

        return wrapper

    saved = ba._mlm_topk, ba._perplexity
    ba._mlm_topk, ba._perplexity = timed(ba._mlm_topk), timed(ba._perplexity)
    for name in ("encode_text_ids", "encode_image"):
        setattr(encoder, name, timed(getattr(encoder, name)))
    ids = torch.arange(len(captions), device=device)
    try:
        sync(device)
        t0 = time.perf_counter()
        with attack.planned(plan) if plan is not None else nullcontext():
            attack(encoder, images.to(device), captions, ids, ids)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        ba._mlm_topk, ba._perplexity = saved
        for name in ("encode_text_ids", "encode_image"):
            delattr(encoder, name)
    return 1000 * (total - inside[0]) / len(captions)


def makespan_hours(seconds: list[float], gpus: int) -> float:
    """Wall hours of independent jobs on ``gpus`` GPUs, longest first onto the least loaded GPU (LPT)."""
    loads = [0.0] * gpus
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads) / 3600


def train_rate(encoder, defense, images, captions, device, precision: str, steps: int, plan=None) -> float:
    """Images per second of ``steps`` optimiser steps (after one untimed warm-up step); with ``plan``, the text
    attack reads the batch's candidate-store entries, as the DataLoader workers hand them over."""
    from mat_lightning.data.datamodule import RetrievalBatch

    batch = RetrievalBatch(
        images.to(device), captions, torch.arange(len(images), device=device), torch.arange(len(images))
    )
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-5)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    )
    encoder.train()
    elapsed = 0.0
    for step in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        with autocast, plans_of(defense, plan):
            loss = defense(encoder, batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step > 0:
            elapsed += time.perf_counter() - t0
    return steps * len(images) / elapsed


def plans_of(defense, plan):
    """The defense's text attacks read ``plan`` (no-op without one)."""
    from contextlib import ExitStack

    from mat_lightning.attacks.store import bert_attacks

    stack = ExitStack()
    if plan is not None:
        for attack in bert_attacks(defense):
            stack.enter_context(attack.planned(plan))
    return stack


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny architecture (CPU test), not ViT-B/16")
    parser.add_argument("--batch", type=int, default=128, help="training batch (the grid's: 128)")
    parser.add_argument(
        "--eval-images", type=int, default=256, help="generated images evaluated under attack"
    )
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per defense")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json")
    parser.add_argument(
        "--assume-tflops",
        type=float,
        default=None,
        help="no GPU: count FLOPs per stage and project rates at this sustained TFLOP/s (module docstring)",
    )
    args = parser.parse_args(argv)

    from mat_lightning.attacks import PGD, SGA, BertAttack
    from mat_lightning.attacks.store import CandidateStore, attach_stores, bert_attacks, build_store
    from mat_lightning.data.datamodule import RetrievalBatch
    from mat_lightning.defenses import MAT, Clean
    from mat_lightning.eval.robust import robust_retrieval
    from mat_lightning.models.encoder import OpenClipEncoder

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    if args.assume_tflops is not None:
        print(
            f"FLOP-COUNT MODE: rates are counted FLOPs at an assumed {args.assume_tflops:g} TFLOP/s, not timings"
        )
    torch.manual_seed(0)
    rng = random.Random(0)
    model_name = "mat-tiny" if args.tiny else "ViT-B-16"
    encoder = OpenClipEncoder(model_name, pretrained=None).to(device)
    size = encoder.image_size
    mlm = random_mlm(Path(tempfile.mkdtemp(prefix="gpu_check_mlm_")), args.tiny)
    print(
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); model "
        f"{model_name} (random weights, {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f} M parameters), "
        f"{size}px; MLM {'tiny' if args.tiny else 'BERT-base size'} (random); precision {args.precision}"
    )

    # 1. training steps
    train_images = torch.rand(args.batch, 3, size, size)
    train_captions = captions_for(args.batch, 1, rng)
    text_attack = BertAttack(mlm=mlm, top_k=10, max_words=1)
    text_attack.prepare(device)
    # 0. the candidate store (attacks/store.py): built once per data set, then read by every run
    store_dir = Path(tempfile.mkdtemp(prefix="gpu_check_store_"))
    sync(device)
    t0 = time.perf_counter()
    build_store(text_attack, train_captions, encoder, store_dir / "train", device, progress=False)
    sync(device)
    store_rate = len(train_captions) / (time.perf_counter() - t0)
    plan = CandidateStore(store_dir / "train").plan(train_captions)  # what a DataLoader worker hands the step
    print(f"  {'store_build':<18} {store_rate:9.1f} captions/s  (once per data set)")
    rates: dict[str, float] = {}
    mat = MAT(text_attack=text_attack, image_attack=PGD(eps_255=2, steps=2, step_255=1))
    for name, defense, batch_plan in (
        ("train_clean", Clean(), None),
        ("train_mat", mat, None),
        ("train_mat_store", mat, plan),
    ):

        def run(d=defense, p=batch_plan) -> float:
            return train_rate(encoder, d, train_images, train_captions, device, args.precision, args.steps, p)

        tflops = args.assume_tflops
        rates[name] = run() if tflops is None else counted_rate(run, args.batch * (args.steps + 1), tflops)
        print(f"  {name:<18} {rates[name]:9.1f} images/s  (batch {args.batch})")
    host_ms = {
        "without_store": host_ms_per_caption(text_attack, encoder, train_images, train_captions, device),
        "with_store": host_ms_per_caption(text_attack, encoder, train_images, train_captions, device, plan),
    }
    print(
        f"  text attack host   {host_ms['without_store']:.3f} -> {host_ms['with_store']:.3f} ms per caption "
        "(main process, outside model work; without -> with the store)"
    )

    # 2. robust evaluation of generated images
    n = args.eval_images
    eval_images = torch.rand(n, 3, size, size)
    eval_captions = captions_for(n, 5, rng)
    loader = []
    for start in range(0, n, 64):
        b = min(64, n - start)
        loader.append(
            RetrievalBatch(
                eval_images[start : start + b],
                eval_captions[5 * start : 5 * (start + b)],
                torch.arange(b).repeat_interleave(5),
                torch.arange(start, start + b),
            )
        )
    attacks = [
        PGD(eps_255=2, steps=10, step_255=0.5),
        BertAttack(mlm=mlm, top_k=10, max_words=1),
        SGA(PGD(eps_255=2, steps=10, step_255=0.5), BertAttack(mlm=mlm, top_k=10, max_words=1)),
    ]
    sync(device)
    t0 = time.perf_counter()
    attach_stores(bert_attacks(*attacks), eval_captions, encoder, device, False, store_dir / "eval")
    sync(device)
    eval_store_rate = len(eval_captions) / (time.perf_counter() - t0)
    if args.assume_tflops is None:
        rows = robust_retrieval(encoder, loader, attacks, device=device, progress=False)
        for row in rows:
            rates[f"eval_{row['attack']}"] = n / max(row["seconds"], 1e-9)
    else:  # one attack at a time, its clean pass's FLOPs subtracted

        def evaluate(attack_list) -> None:
            robust_retrieval(encoder, loader, attack_list, device=device, progress=False)

        clean = counted_rate(lambda: evaluate([]), n, args.assume_tflops)
        rates["eval_clean"] = clean
        for attack in attacks:
            both = counted_rate(lambda a=attack: evaluate([a]), n, args.assume_tflops)
            rates[f"eval_{attack.name}"] = 1 / max(1 / both - 1 / clean, 1e-12)
        rows = [{"attack": name[len("eval_") :]} for name in rates if name.startswith("eval_")]
    for row in rows:
        print(
            f"  eval_{row['attack']:<13} {rates['eval_' + row['attack']]:9.1f} images/s  ({n} images x 5 captions)"
        )
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    # 3. projection of the Flickr30K grid from the measured rates
    def per_image(*names: str) -> float:
        return sum(1 / rates[f"eval_{a}"] for a in names)

    # the suite: clean, pgd, bert_attack, sep_attack (= pgd + bert), co_attack (~ pgd + bert), sga
    eval_seconds = FLICKR_TEST_IMAGES * (
        per_image("clean", "pgd", "bert_attack", "sga") + 2 * per_image("pgd", "bert_attack")
    )
    val_seconds = FLICKR_EPOCHS * FLICKR_TEST_IMAGES * per_image("clean")
    # FLOP counts leave the host-side work out: add the text attack's, measured on this machine's CPU
    train_captions_per_run = FLICKR_EPOCHS * FLICKR_TRAIN_IMAGES  # one caption per image per step
    host_s = 0.0 if args.assume_tflops is None else host_ms["with_store"] / 1000 * train_captions_per_run
    per_experiment = {}
    for defense in TRAINED_DEFENSES:
        rate = rates["train_clean"] if defense == "clean" else rates["train_mat_store"]
        extra = 0.0 if defense in ("clean", "image_at", "tecoa", "fare") else host_s
        per_experiment[defense] = train_captions_per_run / rate + extra + val_seconds + eval_seconds
    per_experiment["zeroshot"] = eval_seconds
    # built once for the whole grid: the train captions' store (every text-attacking defense) and the test split's
    stores_seconds = FLICKR_TRAIN_CAPTIONS / store_rate + 5 * FLICKR_TEST_IMAGES / eval_store_rate
    total_hours = (sum(per_experiment.values()) + stores_seconds) / 3600
    grid_on_8 = makespan_hours(list(per_experiment.values()), 8) + stores_seconds / 3600
    sga_seconds = FLICKR_TEST_IMAGES / rates["eval_sga"]
    basis = (
        "this machine" if args.assume_tflops is None else f"{args.assume_tflops:g} TFLOP/s from FLOP counts"
    )
    print(f"PROJECTION (rates x work, not a measured run) of the Flickr30K grid at {basis}:")
    print(
        f"  candidate stores (once)       {stores_seconds / 3600:7.2f} h   (145,000 train + 5,000 test captions)"
    )
    for name, seconds in per_experiment.items():
        print(f"  flickr30k_clip_b16_{name:<9} {seconds / 3600:7.2f} h")
    print(f"  total                         {total_hours:7.2f} h   (flickr30k_blip_zeroshot not included)")
    print(
        f"  on 8 such GPUs (one run each) {grid_on_8:7.2f} h   target 2 h: {'met' if grid_on_8 <= 2 else 'NOT met'}"
    )
    print(
        f"  SGA eval, 1,000 test images   {sga_seconds:7.0f} s   target 60 s on one H200 "
        f"({'met' if sga_seconds <= 60 else 'NOT met'} on this device)"
    )
    step_share = host_ms["with_store"] / 1000 * rates["train_mat_store"]  # host seconds per second of step
    if args.assume_tflops is None:
        print(f"  host share of the MAT step    {100 * step_share:7.1f} %   (text attack outside model work)")
    else:
        print(f"  host-side text work per run   {host_s / 3600:7.2f} h   (measured on this CPU, added above)")
    print(f"peak GPU memory: {'n/a (CPU)' if peak_gib is None else f'{peak_gib:.1f} GiB'}")
    wall = time.perf_counter() - t_start
    print(f"gpu-check wall time: {wall:.0f} s")
    result = {
        "device": str(device),
        "model": model_name,
        "precision": args.precision,
        "assumed_tflops": args.assume_tflops,
        "batch": args.batch,
        "eval_images": n,
        "images_per_second": rates,
        "peak_gpu_memory_gib": peak_gib,
        "projected_hours": {k: v / 3600 for k, v in per_experiment.items()},
        "projected_total_hours": total_hours,
        "projected_grid_hours_on_8_gpus": grid_on_8,
        "projected_sga_eval_seconds": sga_seconds,
        "store_build_captions_per_second": {"train": store_rate, "eval": eval_store_rate},
        "projected_store_seconds": stores_seconds,
        "text_attack_host_ms_per_caption": host_ms,
        "host_share_of_mat_step": step_share if args.assume_tflops is None else None,
        "wall_seconds": wall,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
