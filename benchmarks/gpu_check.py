"""`make gpu-check`: is this machine ready for the paper grid, and how long would the grid take on it?

No downloads: a random-weight open_clip ViT-B/16 (the grid's architecture, with its text tower), a randomly initialised
BERT-base-sized masked LM (12 layers, 768 wide, 30,522 word pieces) for BERT-Attack, and generated images and
captions. It runs, on the first GPU (the CPU when there is none):

1. training steps at batch 128: clean fine-tuning and MAT (BERT-Attack 1 word, then 2-step PGD);
2. a robust evaluation of 256 generated images with 5 captions each: clean, PGD (10 steps), BERT-Attack, SGA;

and prints images/s per stage, the peak GPU memory, and the **projected** wall time of the full Flickr30K grid
(experiments/flickr30k_clip_b16_*.yaml: 8 trained defenses x 10 epochs x 29,000 images, each followed by a robust
evaluation of the 1,000 test images with 5 attacks, plus the zero-shot evaluation) from those rates. Projections are
rates times work; they ignore data loading (decode with DataLoader workers to keep up), per-defense differences in
attack cost beyond the two training rates measured, and warm-up. ``--tiny`` runs the same code with the tiny
synthetic-world architecture (what the test suite does on the CPU). Results also go to ``runs/gpu_check/``.

``--assume-tflops T`` is for machines without a GPU: every stage runs (on the CPU, small ``--batch`` and
``--eval-images`` suffice) under torch's ``FlopCounterMode``, and its rate becomes ``T * 1e12 / FLOPs per image``:
a projection from counted FLOPs at an assumed sustained throughput, which ignores host-side work (tokenising, the
text attack's Python) and memory-bound kernels, so it is a lower bound on the wall time.
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


def train_rate(encoder, defense, images, captions, device, precision: str, steps: int) -> float:
    """Images per second of ``steps`` optimiser steps (after one untimed warm-up step)."""
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
        with autocast:
            loss = defense(encoder, batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step > 0:
            elapsed += time.perf_counter() - t0
    return steps * len(images) / elapsed


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
    rates: dict[str, float] = {}
    for name, defense in (
        ("train_clean", Clean()),
        ("train_mat", MAT(text_attack=text_attack, image_attack=PGD(eps_255=2, steps=2, step_255=1))),
    ):

        def run(d=defense) -> float:
            return train_rate(encoder, d, train_images, train_captions, device, args.precision, args.steps)

        tflops = args.assume_tflops
        rates[name] = run() if tflops is None else counted_rate(run, args.batch * (args.steps + 1), tflops)
        print(f"  {name:<18} {rates[name]:9.1f} images/s  (batch {args.batch})")

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
    per_experiment = {}
    for defense in TRAINED_DEFENSES:
        rate = rates["train_clean"] if defense == "clean" else rates["train_mat"]
        per_experiment[defense] = FLICKR_EPOCHS * FLICKR_TRAIN_IMAGES / rate + val_seconds + eval_seconds
    per_experiment["zeroshot"] = eval_seconds
    total_hours = sum(per_experiment.values()) / 3600
    basis = (
        "this machine" if args.assume_tflops is None else f"{args.assume_tflops:g} TFLOP/s from FLOP counts"
    )
    print(f"PROJECTION (rates x work, not a measured run) of the Flickr30K grid at {basis}:")
    for name, seconds in per_experiment.items():
        print(f"  flickr30k_clip_b16_{name:<9} {seconds / 3600:7.2f} h")
    print(f"  total                         {total_hours:7.2f} h   (flickr30k_blip_zeroshot not included)")
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
        "wall_seconds": wall,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
