"""`make bench`: speed measured side by side in one run and reported as ratios (never asserted in tests).

One torch thread, interleaved repetitions, medians (the machine is shared):

1. BERT-Attack, batched (ours, ``reference=True``) vs a per-caption loop of the published algorithm
   (:mod:`benchmarks.reference_bert_attack`, which reproduces the published code's outputs: tests/
   test_reference_attacks.py), SGA's image-guided text attack at max_length 77, on ``pre_caption``-ed Flickr30K
   test captions (``../shared/data``): at tiny size (tiny CLIP, a tiny MLM with a Flickr WordPiece vocabulary) and at
   BERT-base / ViT-B/16 size (random weights, 10 captions): captions per second, their ratio, % identical
   adversarial captions, and host (non-forward) milliseconds per caption. Plus ``published_agreement``: both modes
   against the outputs of the published code itself (the fixture in tests/fixtures/reference_attacks).
2. CLIP text forwards at ViT-B/16 size: context cut to the tokens in use vs the full 77-token context.
3. SGA vs a 10-step PGD on 32 synthetic-world images (tiny CLIP): the cost ratio.
4. recall@K at COCO-5k size (5,000 x 25,010) vs a plain ``torch.topk``: time and peak memory beyond the matrix.
5. Robust evaluation under DDP: ``mat robust-eval`` (PGD, 10 steps, ``split_contrastive``) on the synthetic test split
   with the tiny CLIP, on 1 and on 2 CPU processes (gloo, one thread each): images per second of the attacked pass
   (its ``seconds`` in results.json, which include gathering the embeddings) and the speed-up.

6. The MAT training step (tiny CLIP, batch 128 of the synthetic world) in clean-step units against its floor
   (:func:`bench_mat_step` says what the floor holds): ``mat_step_ratio``.
7. Batched BertAttack vs the same attack assembled from TextAttack's components (50 synthetic-world captions): speed,
   % of captions where both changed the same word, and R@1 after each attack.
8. ``mat`` start-up: ``mat fit --help``, an unknown option and ``mat eval`` without its required ``--dataset``,
   each a fresh process,
   against importing the training stack (``import mat_lightning.cli``), which the front door no longer does for them:
   best and median seconds of each, and the ratio of the medians (``cli_startup``).
9. ITM re-ranking sharded over processes (:mod:`benchmarks.rerank_scaling`, ``rerank_scaling``): a tiny BLIP on 64,
   256 and 1,024 generated images, 1 and 2 CPU processes (gloo): ITM pairs and peak host memory per rank; with the
   FLOPs of BLIP-base and the COCO-5k projection on 8 GPUs derived from them.

``python -m benchmarks.run --world-rows`` runs only rows 6 and 7 and merges them into an existing bench.json;
``--cli-rows`` runs only row 8, also merged.
Every ratio sits under a key containing ``ratio``; results go to ``runs/bench/bench.json``. ``BENCH_QUICK=1``
shortens the tiny-size text attack run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import rerank_scaling

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


CLI_COMMANDS = {
    "fit_help": ["fit", "--help"],
    "unknown_option": ["fit", "--config", "experiments/smoke.yaml", "--nope=1"],
    "eval_missing_dataset": ["eval"],
}


def accumulating(total: list[float]):
    """A wrapper maker: each wrapped call adds its wall seconds to ``total[0]`` (model time inside an attack)."""

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                total[0] += time.perf_counter() - t0

        return wrapper

    return timed


def bench_cli_startup(reps: int = 3) -> dict:
    """Wall seconds of ``python -m mat_lightning <args>`` for each of :data:`CLI_COMMANDS`, and of importing the
    training stack the way every other command does (``import mat_lightning.cli``), interleaved, ``reps`` times:
    best, median, and each command's median over the stack's (the front door's saving)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {name: [sys.executable, "-m", "mat_lightning", *argv] for name, argv in CLI_COMMANDS.items()}
    runs["import_training_stack"] = [sys.executable, "-c", "import mat_lightning.cli"]
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=False)
            times[name].append(time.perf_counter() - t0)
    out = {
        name: {"best_s": round(min(t), 3), "median_s": round(statistics.median(t), 3)}
        for name, t in times.items()
    }
    stack = out["import_training_stack"]["median_s"]
    for name in CLI_COMMANDS:
        out[name]["over_stack_import_ratio"] = round(out[name]["median_s"] / stack, 3)
    return {"reps": reps, **out}


def bench_bert_attack(encoder, mlm_model, tok, captions: list[str], reps: int) -> dict:
    """Batched BertAttack in reference mode vs the per-caption loop of the published algorithm (SGA's image-guided
    TextAttacker: 1 word, top-10, max_length 77), same models and captions: speed ratio and % identical adversarial
    captions; host ms per caption."""
    from benchmarks.reference_bert_attack import reference_attack
    from mat_lightning.attacks import BertAttack

    g = torch.Generator().manual_seed(0)
    images = torch.rand(len(captions), 3, encoder.image_size, encoder.image_size, generator=g)
    with torch.no_grad():
        image_emb = encoder.encode_image(images)
    t2i = torch.arange(len(captions))
    attack = BertAttack.from_mlm(mlm_model, tok, top_k=10, max_words=1, max_length=77, reference=True)
    out: dict = {}

    def ours():
        out["ours"] = attack.perturb(encoder, captions, t2i, "image_cosine", image_emb)

    def reference():
        out["ref"] = [
            reference_attack(encoder, mlm_model, tok, c, image_emb[i], attack.stop_words)
            for i, c in enumerate(captions)
        ]

    store, build_s = temporary_store(attack, encoder, captions)
    plan = store.plan(captions)  # what a DataLoader worker hands the step

    def with_store():
        with attack.planned(plan):
            out["store"] = attack.perturb(encoder, captions, t2i, "image_cosine", image_emb)

    t = interleaved({"ours": ours, "reference": reference, "store": with_store}, reps)
    same = sum(a == b for a, b in zip(out["ours"], out["ref"], strict=True))
    same_store = sum(a == b for a, b in zip(out["ours"], out["store"], strict=True))
    return {
        "captions": len(captions),
        "ours_captions_per_s": round(len(captions) / t["ours"], 2),
        "reference_captions_per_s": round(len(captions) / t["reference"], 2),
        "speed_ratio": round(t["reference"] / t["ours"], 2),
        "identical_adversarial_captions_pct": round(100 * same / len(captions), 1),
        "host_ms_per_caption": round(host_ms_per_caption(attack, encoder, captions, image_emb), 3),
        "with_store_captions_per_s": round(len(captions) / t["store"], 2),
        "store_speed_ratio": round(t["ours"] / t["store"], 2),
        "store_identical_pct": round(100 * same_store / len(captions), 1),
        "store_build_s": round(build_s, 2),
        "host_ms_per_caption_with_store": round(
            host_ms_per_caption(attack, encoder, captions, image_emb, plan), 3
        ),
    }


def temporary_store(attack, encoder, captions: list[str]):
    """A candidate store of ``captions`` for ``attack`` in a temporary folder (the bench's models are in memory,
    so not keyed into the cache; not attached: the attack reads it only through ``planned``) and its build
    seconds."""
    import tempfile

    from mat_lightning.attacks.store import CandidateStore, build_store

    folder = Path(tempfile.mkdtemp(prefix="bench_store_")) / "store"
    t0 = time.perf_counter()
    build_store(attack, captions, encoder, folder, progress=False)
    seconds = time.perf_counter() - t0
    return CandidateStore(folder), seconds


def host_ms_per_caption(attack, encoder, captions, image_emb, plan=None) -> float:
    """Wall time of the attack minus the time in model work (the text transformer, the MLM forwards with the top-k
    and perplexity reductions of their logits), per caption: tokenisation, candidates, strings and bookkeeping.
    With ``plan`` (a candidate store's entries for the captions, as a DataLoader worker prepares them): what is
    left on the main process."""
    from contextlib import nullcontext

    from mat_lightning.attacks import bert_attack

    inside = [0.0]
    timed_call = accumulating(inside)
    patched = {"_mlm_topk": bert_attack._mlm_topk, "_perplexity": bert_attack._perplexity}
    encoder._encode_cut = timed_call(encoder._encode_cut)
    for name, fn in patched.items():
        setattr(bert_attack, name, timed_call(fn))
    try:
        t0 = time.perf_counter()
        with attack.planned(plan) if plan is not None else nullcontext():
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


FLICKR_TRAIN_CAPTIONS = 145_000  # 29,000 Karpathy training images x 5


def bench_store_build(encoder, mlm_model, tok, captions: list[str]) -> dict:
    """Building the candidate store of ``captions`` at BERT-base / ViT-B/16 size (default mode, top-10): seconds,
    of which in the MLM's forwards, captions per second and bytes per 1,000 captions; extrapolated (linearly) to
    Flickr30K's 145,000 training captions.

    The MLM has random weights (``bert-base-uncased`` cannot be downloaded here), so ``threshold_pred_score`` is 0:
    a trained BERT's top-10 raw logits stand far above the 0.3 cut, while a random one's hover around it and would
    keep fewer candidates than the real model; with 0 every word gets its 10, the real store's size."""
    from mat_lightning.attacks import BertAttack
    from mat_lightning.attacks import bert_attack as ba
    from mat_lightning.attacks.store import store_size_bytes

    attack = BertAttack.from_mlm(mlm_model, tok, top_k=10, max_words=1, threshold_pred_score=0)
    inside = [0.0]
    originals = ba._mlm_topk, ba._perplexity
    timed = accumulating(inside)
    ba._mlm_topk, ba._perplexity = timed(ba._mlm_topk), timed(ba._perplexity)
    try:
        store, seconds = temporary_store(attack, encoder, captions)
    finally:
        ba._mlm_topk, ba._perplexity = originals
    size = store_size_bytes(store)
    per_k = 1000 / len(captions)
    # the main process's host time on a training batch (128 captions), without and with the batch's plan
    batch = captions[:128]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        image_emb = encoder.encode_image(
            torch.rand(len(batch), 3, encoder.image_size, encoder.image_size, generator=g)
        )
    host = {
        "captions": len(batch),
        "without_store": round(host_ms_per_caption(attack, encoder, batch, image_emb), 3),
        "with_store": round(host_ms_per_caption(attack, encoder, batch, image_emb, store.plan(batch)), 3),
    }
    return {
        "host_ms_per_caption_batch": host,
        "captions": len(captions),
        "seconds": round(seconds, 1),
        "mlm_seconds": round(inside[0], 1),
        "captions_per_s": round(len(captions) / seconds, 2),
        "substitutes": int(store.meta["n_candidates"]),
        "bytes_per_1000_captions": int(size * per_k),
        "seconds_per_1000_captions": round(seconds * per_k, 1),
        "extrapolated_flickr30k_train": {
            "captions": FLICKR_TRAIN_CAPTIONS,
            "seconds": round(seconds * FLICKR_TRAIN_CAPTIONS / len(captions)),
            "host_seconds": round((seconds - inside[0]) * FLICKR_TRAIN_CAPTIONS / len(captions)),
            "gigabytes": round(size * FLICKR_TRAIN_CAPTIONS / len(captions) / 1e9, 2),
        },
    }


def bench_sga_store(encoder, images, captions, txt2img, mlm: str, reps: int) -> dict:
    """SGA (its two text passes) with the split's candidate store built beforehand vs without: the cost ratio,
    and whether the adversarial captions are the same."""
    from mat_lightning.attacks import PGD, SGA, BertAttack

    def sga():
        attack = SGA(PGD(eps_255=2, steps=10, step_255=0.5), BertAttack(mlm=mlm, top_k=10, max_words=1))
        attack.prepare("cpu")
        return attack

    plain, stored = sga(), sga()
    store, build_s = temporary_store(stored.text_attack, encoder, captions)
    stored.text_attack.attach_store(store)
    out = {}

    def run(key, attack):
        def fn():
            out[key] = attack.clone()(encoder, images, captions, txt2img).captions

        return fn

    t = interleaved({"without": run("without", plain), "with": run("with", stored)}, reps)
    return {
        "images": len(images),
        "captions": len(captions),
        "without_store_s": round(t["without"], 2),
        "with_store_s": round(t["with"], 2),
        "store_build_s": round(build_s, 2),
        "sga_store_speedup_ratio": round(t["without"] / t["with"], 2),
        "identical_adversarial_captions": out["with"] == out["without"],
    }


def bench_mat_step(encoder, images, captions, mlm: str, reps: int) -> dict:
    """One MAT training step (loss and backward; text first: BERT-Attack, then 2-step PGD) in clean-step units
    (the clean CLIP loss and backward on the same batch), without and with the candidate store, against floors.

    With the store (``attacks/store.py``) the step gets the batch's plan as a DataLoader worker prepares it (built
    here outside the timing, as the workers do it off the main process). Its **floor** is the clean step plus the
    model work the attack cannot avoid, each part replayed alone from what the store step's text attack asked of
    the text encoder on this batch: one text-encoder pass over the token ids it encoded (captions, [UNK] variants,
    the candidates scored), one image forward for the guiding embeddings, and PGD's 2 image forward/backward
    passes (its text targets given). Without the store the old floor adds the MLM forwards (the top-k pass over
    the captions and the perplexity passes of the multi-sub-word words reached), which the store removes. Not in
    either floor: host-side Python and PGD's encoding of the adversarial captions.
    """
    from mat_lightning.attacks import PGD, BertAttack
    from mat_lightning.attacks import bert_attack as ba
    from mat_lightning.attacks.base import attacking
    from mat_lightning.attacks.objectives import IMAGE_OBJECTIVES
    from mat_lightning.data.datamodule import RetrievalBatch
    from mat_lightning.defenses.base import batch_keys, clip_loss
    from mat_lightning.defenses.mat import MAT

    n = len(images)
    ids = torch.arange(n)
    batch = RetrievalBatch(images, captions, ids, ids, ids)
    mat = MAT(BertAttack(mlm=mlm, top_k=10, max_words=1), PGD(eps_255=2, steps=2, step_255=1))
    mat.prepare("cpu")
    text_attack, pgd = mat.text_attack, mat.image_attack
    encoder.train()
    store, build_s = temporary_store(text_attack, encoder, captions)
    plan = store.plan(captions)
    t0 = time.perf_counter()
    store.plan(captions)
    plan_ms = 1000 * (time.perf_counter() - t0)

    # what one text attack on this batch asks of the models, without and with the store
    calls: dict[str, list] = {"mlm": [], "ppl": [], "texts": [], "ids": []}
    originals = {"_mlm_topk": ba._mlm_topk, "_perplexity": ba._perplexity}

    def recorder(key, fn):
        def wrapper(*a, **k):
            calls[key].append((a, k))
            return fn(*a, **k)

        return wrapper

    ba._mlm_topk, ba._perplexity = recorder("mlm", ba._mlm_topk), recorder("ppl", ba._perplexity)
    text_attack.encode = lambda enc, texts, view_length=None: (
        calls["texts"].extend(texts),
        BertAttack.encode(text_attack, enc, texts, view_length),
    )[1]
    try:
        adv_captions = text_attack(encoder, images, captions, ids, **batch_keys(batch)).captions
    finally:
        ba._mlm_topk, ba._perplexity = originals["_mlm_topk"], originals["_perplexity"]
        del text_attack.encode
    encode_ids = encoder.encode_text_ids
    encoder.encode_text_ids = lambda x, normalize=True: (calls["ids"].append(x), encode_ids(x, normalize))[1]
    try:
        with text_attack.planned(plan):
            stored_captions = text_attack(encoder, images, captions, ids, **batch_keys(batch)).captions
    finally:
        del encoder.encode_text_ids
    assert stored_captions == adv_captions, "the store changed the adversarial captions"
    with attacking(encoder):
        guidance = pgd.guidance(encoder, images, adv_captions, ids)

    def backward(loss):
        loss.backward()
        encoder.zero_grad(set_to_none=True)

    def mlm_work():
        for a, k in calls["mlm"]:
            originals["_mlm_topk"](*a, **k)
        for a, k in calls["ppl"]:
            originals["_perplexity"](*a, **k)

    def encode_work():
        with attacking(encoder), torch.no_grad():
            text_attack.encode(encoder, calls["texts"])
            encoder.encode_image(images)

    def ids_encode_work():
        with attacking(encoder), torch.no_grad():
            for x in calls["ids"]:
                encoder.encode_text_ids(x)
            encoder.encode_image(images)

    def pgd_work():
        with attacking(encoder), pgd.keyed(ids, ids):
            pgd.perturb(encoder, images, IMAGE_OBJECTIVES[pgd.objective], guidance)

    def mat_with_store():
        with text_attack.planned(plan):
            backward(mat(encoder, batch).loss)

    t = interleaved(
        {
            "clean": lambda: backward(clip_loss(encoder, images, captions, batch)),
            "mat": lambda: backward(mat(encoder, batch).loss),
            "mat_store": mat_with_store,
            "text_attack": lambda: text_attack(encoder, images, captions, ids, **batch_keys(batch)),
            "mlm": mlm_work,
            "encodes": encode_work,
            "ids_encodes": ids_encode_work,
            "pgd_passes": pgd_work,
        },
        reps,
    )
    unit = t["clean"]
    floor = unit + t["mlm"] + t["encodes"] + t["pgd_passes"]
    floor_store = unit + t["ids_encodes"] + t["pgd_passes"]
    return {
        "batch": n,
        "clean_step_s": round(unit, 3),
        "mat_step_units": round(t["mat"] / unit, 2),
        "floor_units": round(floor / unit, 2),
        "floor_parts_units": {
            "clean_step": 1.0,
            "mlm_forwards": round(t["mlm"] / unit, 2),
            "text_and_guide_encodes": round(t["encodes"] / unit, 2),
            "pgd_2_passes": round(t["pgd_passes"] / unit, 2),
        },
        "text_attack_units": round(t["text_attack"] / unit, 2),
        "texts_encoded": len(calls["texts"]),
        "mlm_topk_passes": len(calls["mlm"]),  # one per chunk of captions: the attack is batched
        "mat_step_ratio": round(t["mat"] / floor, 2),
        "store": {
            "mat_step_units": round(t["mat_store"] / unit, 2),
            "floor_units": round(floor_store / unit, 2),
            "floor_parts_units": {
                "clean_step": 1.0,
                "text_and_guide_encodes": round(t["ids_encodes"] / unit, 2),
                "pgd_2_passes": round(t["pgd_passes"] / unit, 2),
            },
            "store_build_s": round(build_s, 2),
            "loader_plan_ms_per_batch": round(plan_ms, 2),
            "texts_encoded": sum(len(x) for x in calls["ids"]),
        },
        "mat_step_store_over_floor_ratio": round(t["mat_store"] / floor_store, 3),
        "mat_step_store_speedup_ratio": round(t["mat"] / t["mat_store"], 2),
    }


def changed_word(before: str, after: str) -> int | None:
    """Index of the first word (split on spaces) that differs; None when the caption is unchanged."""
    if before == after:
        return None
    a, b = before.split(" "), after.split(" ")
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def bench_textattack(encoder, mlm_model, tok, images, captions: list[str], reps: int) -> dict:
    """Batched BertAttack vs the same attack assembled from TextAttack's components
    (:mod:`benchmarks.textattack_bert_attack`), image-guided, 1 word, top-10, on one caption per image: speed, the
    share of captions where both changed the same word, and strength (text-to-image R@1 among these images, and the
    mean caption-image cosine, after each attack)."""
    from benchmarks.textattack_bert_attack import build_textattack_attack, textattack_captions
    from mat_lightning.attacks import BertAttack
    from mat_lightning.eval.retrieval import recall_at_k

    with torch.no_grad():
        image_emb = encoder.encode_image(images)
    t2i = torch.arange(len(captions))
    attack = BertAttack.from_mlm(mlm_model, tok, top_k=10, max_words=1)
    ta_attack, wrapper = build_textattack_attack(encoder, mlm_model, tok, attack.stop_words)
    out: dict = {}

    def ours():
        out["ours"] = attack.perturb(encoder, captions, t2i, "image_cosine", image_emb)

    def textattack():
        out["textattack"] = textattack_captions(ta_attack, wrapper, captions, image_emb)

    t = interleaved({"ours": ours, "textattack": textattack}, reps)

    def strength(texts: list[str]) -> tuple[float, float]:
        with torch.no_grad():
            text_emb = encoder.encode_text(texts).float()
        r1 = recall_at_k(image_emb.float() @ text_emb.T, t2i, ks=(1,))["ir_r1"]
        return round(float(r1), 1), round(float((text_emb * image_emb.float()).sum(-1).mean()), 4)

    ours_where = [changed_word(c, a) for c, a in zip(captions, out["ours"], strict=True)]
    ta_where = [changed_word(c, a) for c, a in zip(captions, out["textattack"], strict=True)]
    same = sum(a is not None and a == b for a, b in zip(ours_where, ta_where, strict=True))
    pct = lambda k: round(100 * k / len(captions), 1)  # noqa: E731
    (clean_r1, clean_cos), (ours_r1, ours_cos), (ta_r1, ta_cos) = map(
        strength, (captions, out["ours"], out["textattack"])
    )
    return {
        "captions": len(captions),
        "ours_captions_per_s": round(len(captions) / t["ours"], 2),
        "textattack_captions_per_s": round(len(captions) / t["textattack"], 2),
        "speed_ratio": round(t["textattack"] / t["ours"], 2),
        "same_word_changed_pct": pct(same),
        "ours_changed_pct": pct(sum(w is not None for w in ours_where)),
        "textattack_changed_pct": pct(sum(w is not None for w in ta_where)),
        "t2i_r1": {"clean": clean_r1, "ours": ours_r1, "textattack": ta_r1},
        "mean_cosine": {"clean": clean_cos, "ours": ours_cos, "textattack": ta_cos},
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
    """The README's speed table from the results (the rows whose measurements are present)."""
    rows = []
    if all(k in r for k in ("bert_attack_tiny", "bert_attack_base", "text_context_base", "sga_vs_pgd_tiny")):
        rows += main_rows(r)
    if "recall_coco_size" in r:
        rec = r["recall_coco_size"]
        rows.append(
            (
                "recall@K at 5,000 x 25,010 vs torch.topk",
                f"{rec['ours_s']} vs {rec['topk_s']} s; "
                f"+{rec['ours_extra_peak_mb']} vs +{rec['topk_extra_peak_mb']} MB peak",
                f"{rec['ours_over_topk_time_ratio']}x the time",
                "<= 1.1x, <= 50 MB",
            )
        )
    if "mat_step_tiny" in r:
        m = r["mat_step_tiny"]
        p = m["floor_parts_units"]
        rows.append(
            (
                f"MAT training step vs its floor (tiny CLIP, batch {m['batch']}), in clean-step units",
                f"{m['mat_step_units']} vs floor {m['floor_units']} (1 + MLM {p['mlm_forwards']} + encodes "
                f"{p['text_and_guide_encodes']} + PGD {p['pgd_2_passes']}); text attack {m['text_attack_units']}",
                f"{m['mat_step_ratio']}x",
                "<= 1.15x",
            )
        )
    rows += store_table_rows(r)
    if "textattack_tiny" in r:
        ta = r["textattack_tiny"]
        rows.append(
            (
                f"BertAttack vs TextAttack's components (tiny, {ta['captions']} synthetic-world captions)",
                f"{ta['ours_captions_per_s']} vs {ta['textattack_captions_per_s']} captions/s; "
                f"T2I R@1 after {ta['t2i_r1']['ours']} vs {ta['t2i_r1']['textattack']} "
                f"(clean {ta['t2i_r1']['clean']})",
                f"{ta['speed_ratio']}x, same word changed in {ta['same_word_changed_pct']} %",
                "",
            )
        )
    if "cli_startup" in r:
        c = r["cli_startup"]
        stack = c["import_training_stack"]["median_s"]
        for name in CLI_COMMANDS:
            rows.append(
                (
                    f"`mat {' '.join(CLI_COMMANDS[name])}` start-up (median of {c['reps']} fresh processes)",
                    f"{c[name]['median_s']} s (best {c[name]['best_s']}) vs {stack} s to import the stack",
                    f"{c[name]['over_stack_import_ratio']}x",
                    "< 2 s",
                )
            )
    if "rerank_scaling" in r:
        rows += rerank_scaling.table_rows(r["rerank_scaling"])
    lines = ["| measurement | figures | ratio | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def store_table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """The candidate store's rows (issue 22), where measured."""
    rows = []
    bt, bb = r.get("bert_attack_tiny", {}), r.get("bert_attack_base", {})
    if "store_speed_ratio" in bt and "store_speed_ratio" in bb:
        rows.append(
            (
                f"BertAttack (reference mode) with the candidate store vs without, tiny ({bt['captions']} "
                f"captions) / base ({bb['captions']})",
                f"{bt['with_store_captions_per_s']} vs {bt['ours_captions_per_s']} / {bb['with_store_captions_per_s']} "
                f"vs {bb['ours_captions_per_s']} captions/s",
                f"{bt['store_speed_ratio']}x / {bb['store_speed_ratio']}x, {bt['store_identical_pct']} / "
                f"{bb['store_identical_pct']} % identical",
                "100 % identical",
            )
        )
    sb = r.get("store_build_base")
    if sb:
        h = sb.get("host_ms_per_caption_batch", {"captions": "?", "without_store": 0, "with_store": 0})
        rows.append(
            (
                f"Text attack host time per caption on the main process, base size, batch of {h['captions']} "
                "Flickr30K captions (default mode)",
                f"{h['without_store']} ms without the store, {h['with_store']} ms with it",
                f"{round(h['without_store'] / max(h['with_store'], 1e-9), 1)}x less",
                "<= 0.1 ms",
            )
        )
        x = sb["extrapolated_flickr30k_train"]
        rows.append(
            (
                f"Store build, BERT-base-size MLM + ViT-B/16 tokenizer, {sb['captions']} Flickr30K test captions "
                "(1 CPU thread)",
                f"{sb['seconds_per_1000_captions']} s and {sb['bytes_per_1000_captions'] / 1e6:.1f} MB per 1,000 "
                f"captions (MLM {sb['mlm_seconds']} of {sb['seconds']} s); extrapolated to {x['captions']:,}: "
                f"{x['seconds'] / 3600:.1f} h here, of which {x['host_seconds'] / 60:.0f} min outside the MLM, "
                f"{x['gigabytes']} GB",
                "",
                "",
            )
        )
    sg = r.get("sga_store_tiny")
    if sg:
        rows.append(
            (
                f"SGA with a prebuilt store vs without ({sg['images']} images, tiny CLIP)",
                f"{sg['with_store_s']} vs {sg['without_store_s']} s (build {sg['store_build_s']} s); "
                f"identical: {sg['identical_adversarial_captions']}",
                f"{sg['sga_store_speedup_ratio']}x",
                "",
            )
        )
    m = r.get("mat_step_tiny", {})
    if "mat_step_store_over_floor_ratio" in m:
        st = m["store"]
        p = st["floor_parts_units"]
        rows.append(
            (
                f"MAT step with the store vs its floor without MLM (tiny CLIP, batch {m['batch']}), clean-step units",
                f"{st['mat_step_units']} vs floor {st['floor_units']} (1 + encodes {p['text_and_guide_encodes']} + "
                f"PGD {p['pgd_2_passes']}); without the store {m['mat_step_units']}; loader plan "
                f"{st['loader_plan_ms_per_batch']} ms per batch (in a worker)",
                f"{m['mat_step_store_over_floor_ratio']}x; {m['mat_step_store_speedup_ratio']}x faster",
                "<= 1.05x",
            )
        )
    return rows


def main_rows(r: dict) -> list[tuple[str, str, str, str]]:
    bt, bb, tc, sga = (
        r["bert_attack_tiny"],
        r["bert_attack_base"],
        r["text_context_base"],
        r["sga_vs_pgd_tiny"],
    )
    return [
        (
            "BertAttack (reference mode) vs the published algorithm's per-caption loop, tiny (500 Flickr30K captions)",
            f"{bt['ours_captions_per_s']} vs {bt['reference_captions_per_s']} captions/s",
            f"{bt['speed_ratio']}x, {bt['identical_adversarial_captions_pct']} % identical",
            ">= 5x, >= 95 %",
        ),
        (
            "BertAttack (reference mode) vs the published loop, BERT-base / ViT-B/16 (10 captions)",
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
            "Reference mode vs the published code's outputs (fixture: 100 captions / 8 images)",
            ", ".join(
                f"{row} {v['captions_identical_pct']} %"
                + (f" / {v['pixels_identical_pct']} % px" if v["pixels_identical_pct"] is not None else "")
                for row, v in r["published_agreement"].items()
                if row.endswith("_reference")
            ),
            "",
            "100 % captions, >= 99.9 % pixels",
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
    ]


def flickr_captions(clean: bool = True) -> list[str]:
    """The Flickr30K test captions (5,000), cleaned by ``pre_caption`` as the references' data sets do before their
    text attack, or as written (what default-mode training reads)."""
    from mat_lightning.attacks.reference import pre_caption
    from mat_lightning.data.formats import read_annotations

    raw = [c for r in read_annotations(FLICKR, "/") for c in r.captions]
    return [pre_caption(c) for c in raw] if clean else raw


def bench_published_agreement() -> dict:
    """Reference and default mode against the outputs of the published Co-Attack / SGA code (the fixture of
    tests/fixtures/reference_attacks, 100 Flickr30K captions, 8 images): % of adversarial captions and of
    adversarial pixels identical, per row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "reference_inputs", REPO / "tests" / "fixtures" / "reference_attacks" / "inputs.py"
    )
    inputs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inputs)
    world = inputs.build_world(FLICKR)
    out: dict = {}
    for row in inputs.ROWS:
        for mode, reference in (("reference", True), ("default", False)):
            captions, pixels = inputs.agreement_row(world, row, reference)
            out[f"{row}_{mode}"] = {
                "captions_identical_pct": round(100 * captions, 2),
                "pixels_identical_pct": None if pixels is None else round(100 * pixels, 3),
            }
    return out


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


def mat_step_row(tiny) -> dict:
    """The MAT step against its floors on batch 128 of the default world's train split (its tiny CLIP and MLM)."""
    from mat_lightning.synthetic import ensure_mlm, load_split

    images, caps = load_split("default", "train")
    return bench_mat_step(
        tiny, images[:128].float() / 255, [c[0] for c in caps[:128]], str(ensure_mlm("default")), reps=5
    )


def world_rows(tiny) -> dict:
    """The rows on the synthetic world (tiny CLIP and its MLM): the MAT step against its floor (batch 128 of the
    train split) and BertAttack vs TextAttack's components (50 test images, one caption each)."""
    from mat_lightning.attacks.bert_attack import load_mlm
    from mat_lightning.synthetic import ensure_mlm, load_split

    mlm_folder = str(ensure_mlm("default"))
    mat = mat_step_row(tiny)
    images, caps = load_split("default", "test")
    mlm, tok = load_mlm(mlm_folder)
    ta = bench_textattack(tiny.eval(), mlm, tok, images[:50].float() / 255, [c[0] for c in caps[:50]], reps=2)
    return {"mat_step_tiny": mat, "textattack_tiny": ta}


STORE_ROWS = ("bert_attack_tiny", "bert_attack_base", "store_build_base", "sga_store_tiny", "mat_step_tiny")


def store_rows(tiny, folder: Path, captions: list[str], quick: bool) -> dict:
    """The rows that measure the candidate store (``--store-rows``)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mat_lightning import synthetic

    tok, mlm = AutoTokenizer.from_pretrained(folder), AutoModelForMaskedLM.from_pretrained(folder).eval()
    out = {"bert_attack_tiny": bench_bert_attack(tiny, mlm, tok, captions[: 200 if quick else 500], reps=3)}
    base_encoder, base_mlm, base_tok = base_size_models(folder)
    out["bert_attack_base"] = bench_bert_attack(base_encoder, base_mlm, base_tok, captions[:10], reps=2)
    out["store_build_base"] = bench_store_build(
        base_encoder, base_mlm, base_tok, flickr_captions(clean=False)[: 200 if quick else 1000]
    )
    del base_encoder, base_mlm
    images, caps = synthetic.load_split("default", "test")
    x = images[:32].float() / 255
    sel = [c for cs in caps[:32] for c in cs]
    t2i = torch.tensor([i for i, cs in enumerate(caps[:32]) for _ in cs])
    out["sga_store_tiny"] = bench_sga_store(tiny, x, sel, t2i, str(synthetic.ensure_mlm("default")), reps=3)
    out["mat_step_tiny"] = mat_step_row(tiny)
    return out


def write_results(results: dict) -> Path:
    out = REPO / "runs" / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    return out


def main() -> None:
    if "--cli-rows" in sys.argv:  # only the start-up rows, merged into an existing bench.json
        previous = REPO / "runs" / "bench" / "bench.json"
        results = {
            **(json.loads(previous.read_text()) if previous.is_file() else {}),
            "cli_startup": bench_cli_startup(),
        }
        out = write_results(results)
        print(json.dumps(results["cli_startup"], indent=2))
        print(markdown_table(results))
        print(f"written to {out}")
        return
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from mat_lightning import synthetic
    from mat_lightning.models.encoder import OpenClipEncoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    quick = os.environ.get("BENCH_QUICK") == "1"
    results: dict = {"torch_threads": torch.get_num_threads()}
    tiny = OpenClipEncoder("mat-tiny", pretrained=str(synthetic.ensure_clip("default"))).eval()
    if "--world-rows" in sys.argv:  # only the synthetic-world rows, merged into an existing bench.json
        previous = REPO / "runs" / "bench" / "bench.json"
        results = {
            **(json.loads(previous.read_text()) if previous.is_file() else results),
            **world_rows(tiny),
        }
        out = write_results(results)
        print(json.dumps({k: results[k] for k in ("mat_step_tiny", "textattack_tiny")}, indent=2))
        print(markdown_table(results))
        print(f"written to {out}")
        return
    captions = flickr_captions()
    folder = flickr_mlm_folder(captions)
    if (
        "--store-rows" in sys.argv
    ):  # only the candidate-store rows (issue 22), merged into an existing bench.json
        previous = REPO / "runs" / "bench" / "bench.json"
        results = {
            **(json.loads(previous.read_text()) if previous.is_file() else results),
            **store_rows(tiny, folder, captions, quick),
        }
        out = write_results(results)
        print(json.dumps({k: results[k] for k in STORE_ROWS}, indent=2))
        print(markdown_table(results))
        print(f"written to {out}")
        return
    tok, mlm = AutoTokenizer.from_pretrained(folder), AutoModelForMaskedLM.from_pretrained(folder).eval()
    results["published_agreement"] = bench_published_agreement()
    print(json.dumps(results, indent=2), flush=True)
    results["bert_attack_tiny"] = bench_bert_attack(tiny, mlm, tok, captions[: 200 if quick else 500], reps=3)
    print(json.dumps(results, indent=2), flush=True)
    base_encoder, base_mlm, base_tok = base_size_models(folder)
    results["text_context_base"] = bench_text_context(base_encoder, captions[:64], reps=3)
    results["bert_attack_base"] = bench_bert_attack(base_encoder, base_mlm, base_tok, captions[:10], reps=2)
    results["store_build_base"] = bench_store_build(
        base_encoder, base_mlm, base_tok, flickr_captions(clean=False)[: 200 if quick else 1000]
    )
    del base_encoder, base_mlm
    print(json.dumps(results, indent=2), flush=True)

    images, caps = synthetic.load_split("default", "test")
    x = images[:32].float() / 255
    sel = [c for cs in caps[:32] for c in cs]
    t2i = torch.tensor([i for i, cs in enumerate(caps[:32]) for _ in cs])
    results["sga_vs_pgd_tiny"] = bench_sga_vs_pgd(
        tiny, x, sel, t2i, str(synthetic.ensure_mlm("default")), reps=3
    )
    results["sga_store_tiny"] = bench_sga_store(
        tiny, x, sel, t2i, str(synthetic.ensure_mlm("default")), reps=3
    )
    results.update(world_rows(tiny))
    results["recall_coco_size"] = bench_recall(reps=3)
    results["robust_eval_ddp_cpu"] = bench_ddp_robust_eval()
    results["cli_startup"] = bench_cli_startup()
    results["rerank_scaling"] = rerank_scaling.full_row()
    out = write_results(results)
    print(json.dumps(results, indent=2))
    print(markdown_table(results))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
