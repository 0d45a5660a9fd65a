"""Robust retrieval evaluation: clean and attacked recall@K over a list of attacks and an ε grid.

One implementation, two entry points:

* :func:`robust_retrieval` — a plain function over an encoder and a loader of eval batches (Python API);
* :class:`RobustRetrievalEval` — a Lightning callback that runs it at the end of ``test`` (after ``fit``, in
  ``mat test`` and ``mat robust-eval``), logs ``test/<attack>/<metric>`` and the W&B results (``logging.py``), and
  writes ``results.json`` and ``results.csv`` into the run directory after every attack (a late failure loses
  nothing), then ``curves.png``/``.pdf``. Its ``setup`` checks, before ``fit`` trains, everything the evaluation
  will need: the attacks' masked LMs are loaded, the export and run folders are writable, the test split's files
  exist.

Protocol (DESIGN §3; SGA's, not Co-Attack's script): every image of the split is attacked **once**, together with
all of its captions; recall is computed on the whole attacked split; each row carries both ASR definitions.

Invariance: attacks get each row's split index (``image_ids``), which keys their random draws per image, and the
clean split's embeddings (a :class:`~mat_lightning.attacks.objectives.Gallery`) for ``split_contrastive``; so a row
is the same at any ``eval_batch_size`` and number of processes, unless an attack's objective reads the rest of its
batch (``contrastive``, ``cross_entropy``). Under DDP each rank attacks its shard of the split
(:class:`~mat_lightning.data.sampling.EvalShards`), embeddings are gathered, and rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mat_lightning.attacks.base import Attack, check_budget_override, with_budgets
from mat_lightning.attacks.objectives import Gallery
from mat_lightning.attacks.reference import pre_caption
from mat_lightning.attacks.store import attach_stores, bert_attacks
from mat_lightning.data.datamodule import RetrievalBatch
from mat_lightning.errors import (
    ConfigError,
    NonFiniteError,
    check_eps_255,
    is_synthetic_name,
    non_finite_tensors,
    non_finite_weights_message,
    unresolved_synthetic_name,
)
from mat_lightning.eval import provenance, rerank
from mat_lightning.eval.embeddings import EmbeddingBank
from mat_lightning.eval.report import write_results
from mat_lightning.eval.retrieval import RetrievalRanks, attack_success, recall_from_ranks
from mat_lightning.faults import Interruption
from mat_lightning.files import atomic_write
from mat_lightning.models.encoder import VLEncoder, encoder_device
from mat_lightning.progress import progress as progress_of

log = logging.getLogger(__name__)

#: The checkout whose git commit results.json records (None outside a git checkout, e.g. an installed package).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: ``robust_eval.mlm: required`` in a config: the user must name the masked LM of the text attacks.
MLM_REQUIRED = "required"


def _encode_split(
    encoder: VLEncoder,
    loader: Iterable[RetrievalBatch],
    attack: Attack | None,
    device: torch.device,
    desc: str,
    progress: bool,
    export: Path | None = None,
) -> tuple[RetrievalRanks, float, Gallery]:
    bank = EmbeddingBank()
    itm = rerank.ItmBank(encoder) if rerank.wants_rerank(encoder) else None  # fusion models: ITM re-ranking
    t0 = time.perf_counter()
    exported: list[dict] = []
    staging = _staging(export) if export is not None else None
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in progress_of(loader, desc, total=total, enabled=progress):
        images, txt2img = batch.images.to(device), batch.txt2img.to(device)
        captions = batch.captions
        if attack is not None:
            result = attack(encoder, images, captions, txt2img, image_ids=batch.image_ids.to(device))
            images, captions = result.images, result.captions
            if staging is not None:
                exported += _export_batch(staging, batch, images, captions)
        with torch.no_grad():
            bank.add(
                encoder.encode_image(images), batch.image_ids, encoder.encode_text(captions), batch.txt2img
            )
        if itm is not None:
            itm.add(images, batch.image_ids, captions, batch.txt2img)
    img, txt, txt2img, ids = bank.compute()
    try:
        ranks = rerank.ranks(encoder, img, txt, txt2img, itm)  # fusion models: ITM re-ranking of the top-k
    except NonFiniteError as e:
        raise NonFiniteError(f"robust evaluation, {desc} split: {e}") from None
    seconds = time.perf_counter() - t0  # after the gather: the wall time of the whole split on all ranks
    if export is not None:
        _write_export_index(export, exported)  # and the staged folder replaces an earlier export
    gallery = Gallery(img, ids, txt, ids[txt2img])
    return ranks, seconds, gallery


def _staging(folder: Path) -> Path:
    """Where an attacked split is exported before it replaces ``folder`` (the same name on every rank)."""
    return folder.with_name(f".{folder.name}.partial")


def _write_export_index(folder: Path, entries: list[dict]) -> None:
    """``captions.json`` of an exported set, once, by rank 0, with every rank's images in split order; then the
    staged folder replaces ``folder``: an export of 4 images over one of 16 leaves 4 images, not 16 beside a 4-entry
    ``captions.json``, and a failed export leaves the previous one whole."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, entries)  # also: every rank has written its images
        if dist.get_rank() != 0:
            return
        entries = list({e["image_index"]: e for part in parts for e in part}.values())
    entries = sorted(entries, key=lambda e: e["image_index"])
    if not entries:
        return
    staging = _staging(folder)
    atomic_write(staging / "captions.json", json.dumps(entries, indent=1))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def check_export_folder(folder: Path) -> None:
    """``--export`` names a new or empty folder, or one that holds only earlier exports (``<attack>_eps<ε>/``
    folders with a ``captions.json``), which this run replaces; leftovers of an interrupted export are removed.

    Raises:
        ConfigError: the folder is a file, or holds anything else (it would mix with the export).
    """
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"robust_eval.export_dir (--export) {folder} is a file; give a folder")
    if not folder.is_dir():
        return
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") and entry.name.endswith((".partial", ".old")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif not (entry.is_dir() and (entry / "captions.json").is_file()):
            foreign.append(entry.name)
    if foreign:
        raise ConfigError(
            f"robust_eval.export_dir (--export) {folder} holds {len(foreign)} entries that are not an earlier "
            f"export (e.g. {foreign[0]}): give a new or empty folder (an earlier export there is replaced)"
        )


def _write_set_manifest(folder: Path, attack: Attack) -> None:
    """``set.json`` of an exported set: the attack that made it (what ``Transferred`` rows report), rank 0."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    manifest = {
        "attack": attack.name,
        "eps_255": attack.eps_255,
        "modality": attack.modality,
        "settings": attack_config(attack),
    }
    atomic_write(folder / "set.json", json.dumps(manifest, indent=1))


def _export_batch(
    folder: Path, batch: RetrievalBatch, images: torch.Tensor, captions: list[str]
) -> list[dict]:
    """Adversarial images as lossless PNG (8-bit) plus exact float tensors, captions in ALBEF layout."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for b, image_id in enumerate(batch.image_ids.tolist()):
        name = f"images/{image_id:06d}.png"
        pixels = (images[b].detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        Image.fromarray(pixels).save(folder / name)
        torch.save(images[b].detach().cpu().clone(), folder / "images" / f"{image_id:06d}.pt")
        caps = [c for c, i in zip(captions, batch.txt2img.tolist(), strict=True) if i == b]
        entries.append({"image": name, "caption": caps, "image_index": image_id})
    return entries


#: Caption cleaning applied to every caption a robust evaluation sees (the clean row and every attack), by name
#: (``robust_eval.caption_preprocess``): ``pre_caption`` is ALBEF's, which the Co-Attack and SGA data sets apply.
CAPTION_PREPROCESS: dict[str, Callable[[str], str]] = {"pre_caption": pre_caption}


def caption_preprocessor(name: str | None) -> Callable[[str], str] | None:
    if name is None:
        return None
    if name not in CAPTION_PREPROCESS:
        raise ConfigError(
            f"robust_eval.caption_preprocess={name!r}; choose one of {sorted(CAPTION_PREPROCESS)} or null"
        )
    return CAPTION_PREPROCESS[name]


class _PreprocessedCaptions:
    """A loader whose batches carry cleaned captions (everything downstream, the clean row included, sees them)."""

    def __init__(self, loader: Iterable[RetrievalBatch], fn: Callable[[str], str]) -> None:
        self.loader, self.fn = loader, fn

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield dataclasses.replace(batch, captions=[self.fn(c) for c in batch.captions])


def robust_retrieval(
    encoder: VLEncoder,
    loader: Iterable[RetrievalBatch],
    attacks: Sequence[Attack] = (),
    eps_255_grid: Sequence[float] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    device: torch.device | str | None = None,
    progress: bool = True,
    export_dir: str | Path | None = None,
    on_row: Callable[[list[dict]], None] | None = None,
    on_gallery: Callable[[Gallery], None] | None = None,
    caption_preprocess: str | None = None,
    candidate_store: bool = False,
) -> list[dict]:
    """Clean and attacked recall rows.

    Args:
        encoder: the model under evaluation.
        loader: eval batches (each image once, with all of its captions); iterated once per attack and budget.
        attacks: attacks to run; ``eps_255_grid`` re-runs each attack with an image budget at every ε of the grid
            (text-only attacks run once).
        ks: recall cut-offs.
        device: where to run (default: the encoder's).
        progress: a progress bar per attack.
        export_dir: write each attacked split there (``<attack>_eps<ε>/images/*.png|.pt`` + ``captions.json``).
        on_row: called with the rows so far after each row (the callback rewrites its result files with it).
        on_gallery: called once with the split's clean embeddings (the negatives of ``split_contrastive``).
        caption_preprocess: clean every caption first (:data:`CAPTION_PREPROCESS`; reference suites:
            ``pre_caption``), for the clean row and every attack alike.
        candidate_store: attach to the text attacks a candidate store of the split's captions (the loader's
            ``dataset.captions``), built where missing (``attacks/store.py``).

    Returns:
        Rows ``{"attack", "eps_255", "tr_r1", ..., "r_mean", "asr_drop_*", "asr_flip_*", "seconds"}``: first
        ``clean``, then per attack its configured budget, then the other budgets of the grid.
    """
    device = torch.device(device) if device is not None else encoder_device(encoder)
    if torch.is_inference_mode_enabled():
        raise ConfigError("robust evaluation needs autograd: call it outside torch.inference_mode()")
    check_distinct_names(attacks)
    check_budgets(attacks, eps_255_grid)
    check_finite_encoder(encoder)
    check_ks(ks, "ks")
    clean_caption = caption_preprocessor(caption_preprocess)
    store_captions = _split_captions(loader, clean_caption) if candidate_store else None
    if clean_caption is not None:
        loader = _PreprocessedCaptions(loader, clean_caption)
    was_training = getattr(encoder, "training", None)  # None: a duck-typed encoder without modes
    if was_training is not None:
        encoder.train(False)
    try:
        return _robust_rows(
            encoder,
            loader,
            attacks,
            eps_255_grid,
            ks,
            device,
            progress,
            export_dir,
            on_row,
            on_gallery,
            store_captions,
        )
    finally:
        if was_training is not None:
            encoder.train(was_training)


def check_finite_encoder(encoder: VLEncoder) -> None:
    """Refuse an encoder with NaN/inf weights before the first batch (a duck-typed one without weights passes)."""
    named = list(encoder.state_dict().items()) if callable(getattr(encoder, "state_dict", None)) else []
    bad = non_finite_tensors(named)
    if bad:
        total = sum(1 for _, t in named if t.is_floating_point())
        raise NonFiniteError(
            non_finite_weights_message(f"the encoder ({type(encoder).__name__})", bad, total)
        )


def check_distinct_names(attacks: Sequence[Attack]) -> None:
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"robust_eval.attacks must have distinct names (results are keyed by name): {names}"
        )


def check_budgets(attacks: Sequence[Attack], eps_255_grid: Sequence[float] | None = None) -> None:
    """Refuse attacks that cannot change anything: their rows would equal clean recall, labelled as an attack.

    Checks the budget fields of each attack and of its parts (``image_attack``/``text_attack`` of the multimodal
    attacks): ``eps_255``, ``steps`` and ``step_255`` of image attacks, ``max_words`` and ``top_k`` of text
    attacks; and every ε of the grid.
    """
    check_eps_255(list(eps_255_grid or []), "robust_eval.eps_255_grid")
    for attack in attacks:
        parts = [attack] + [getattr(attack, k) for k in ("image_attack", "text_attack") if hasattr(attack, k)]
        for part in parts:
            for key in ("eps_255", "steps", "step_255", "max_words", "top_k"):
                value = getattr(part, key, None)
                if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
                    where = attack.name if part is attack else f"{attack.name} ({part.name})"
                    raise ConfigError(
                        f"robust_eval attack {where} has {key}={value}: it would leave its inputs unchanged and "
                        f"report clean recall as an attack. Give {key} > 0 or remove the attack"
                    )


def check_ks(ks: Sequence[int], option: str = "robust_eval.ks") -> list[int]:
    """Recall cut-offs: distinct integers >= 1, including 1 (R@1 heads the results table, the log lines, the ε
    curves and ``mat report``)."""
    values = list(ks)
    if (
        not values
        or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values)
        or len(set(values)) != len(values)
        or 1 not in values
    ):
        raise ConfigError(
            f"{option}={values}: give distinct integers >= 1 that include 1 (R@1 heads every table and figure), "
            "e.g. [1, 5, 10]"
        )
    return values


def _split_captions(loader: Any, clean: Callable[[str], str] | None) -> list[str] | None:
    """Every caption of the split a loader walks (its ``dataset.captions``, through wrappers' ``loader``), cleaned
    as the attacks will see them; None when the loader does not say."""
    while not hasattr(loader, "dataset") and hasattr(loader, "loader"):
        loader = loader.loader
    captions = getattr(getattr(loader, "dataset", None), "captions", None)
    if captions is None:
        return None
    return [clean(c) for c in captions] if clean is not None else list(captions)


def _robust_rows(
    encoder,
    loader,
    attacks,
    eps_255_grid,
    ks,
    device,
    progress,
    export_dir,
    on_row=None,
    on_gallery=None,
    store_captions=None,
) -> list[dict]:
    on_row = on_row or (lambda rows: None)
    clean_ranks, seconds, gallery = _encode_split(encoder, loader, None, device, "clean", progress)
    if on_gallery is not None:
        on_gallery(gallery)
    rows = [
        {
            "attack": "clean",
            "eps_255": 0.0,
            **recall_from_ranks(clean_ranks, ks),
            "seconds": round(seconds, 3),
        }
    ]
    on_row(rows)
    for attack in attacks:
        variants = [attack]
        if eps_255_grid and attack.eps_255 is not None:
            # the configured budget first: it is the attack's headline row
            variants += [attack.with_eps(float(e)) for e in eps_255_grid if float(e) != attack.eps_255]
        for variant in variants:
            tag = f"{variant.name}_eps{variant.eps_255:g}" if variant.eps_255 is not None else variant.name
            export = Path(export_dir) / tag if export_dir is not None else None
            variant = variant.clone().with_gallery(gallery)  # the clean split: split_contrastive's negatives
            variant.prepare(device)  # load models (the MLM) outside the timed loop
            if store_captions:  # built once per split and settings (the first attack that needs it pays)
                text_attacks = [a for a in bert_attacks(variant) if a.max_words > 0]
                attach_stores(text_attacks, store_captions, encoder, device, progress=progress)
            ranks, seconds, _ = _encode_split(encoder, loader, variant, device, tag, progress, export)
            if export is not None:
                _write_set_manifest(export, variant)
            rows.append(
                {
                    "attack": variant.name,
                    "eps_255": variant.eps_255,
                    **recall_from_ranks(ranks, ks),
                    **attack_success(clean_ranks, ranks, ks),
                    "seconds": round(seconds, 3),
                }
            )
            log.info("%s: TR@1 %.1f IR@1 %.1f (%.1fs)", tag, rows[-1]["tr_r1"], rows[-1]["ir_r1"], seconds)
            on_row(rows)
    return rows


class RobustRetrievalEval(L.Callback):
    """Runs :func:`robust_retrieval` at the end of every ``test`` and reports it.

    Args:
        attacks: attacks to evaluate (``class_path`` + ``init_args`` each); empty = clean only.
        eps_255_grid: optional ε grid (1/255 units) for the attacks with an image budget, e.g. ``[1, 2, 4, 8]``.
        ks: recall cut-offs.
        experiment: the run's name in ``results.json`` (linked from the top-level ``experiment``).
        export_dir: write the adversarial test set there (images + captions) for reuse.
        progress: a progress bar per attack.
        seed: the run's seed, recorded in ``results.json`` (the ``mat`` CLI sets it from ``seed_everything``).
        caption_preprocess: clean every caption before the clean row and the attacks see it: ``pre_caption``
            (ALBEF's, as the Co-Attack and SGA data sets do; the reference suites set it) or null.
        mlm: if set, the masked LM of every text attack of the list (BERT-Attack, the text part of Sep-Attack,
            Co-Attack and SGA): a hub name, a local folder written by ``save_pretrained``, or (in a ``mat`` config,
            resolved by the CLI) ``synthetic``. A config
            may set it to ``required`` to make the user give one.
        eps_255: if set, the image budget (1/255 units) of every attack of the list with one (PGD, the image parts
            of Sep-Attack, Co-Attack and SGA, torchattacks adapters); each one's step scales with it
            (:func:`~mat_lightning.attacks.base.with_budgets`: the ε grid's rule). A per-attack ``eps_255`` in
            ``attacks`` keeps its own step instead.
        max_words: if set, the word budget of every text attack of the list (BERT-Attack and the text parts).
        output: also write ``results.json`` to this file (``mat eval --output``, as CLIP_benchmark's).
        candidate_store: give the text attacks a candidate store of the split's captions (``attacks/store.py``:
            built once per split, masked LM, tokenizer and settings, then read from the cache by every attack,
            defense and run; the same adversarial captions). False: prepared on the fly per batch.
    """

    def __init__(
        self,
        attacks: list[Attack] | None = None,
        eps_255_grid: list[float] | None = None,
        ks: list[int] | None = None,
        experiment: str = "default",
        export_dir: str | None = None,
        progress: bool = True,
        seed: int | None = None,
        mlm: str | None = None,
        caption_preprocess: str | None = None,
        eps_255: float | None = None,
        max_words: int | None = None,
        output: str | None = None,
        candidate_store: bool = True,
    ) -> None:
        check_budget_override(eps_255, max_words, "robust_eval")
        self.candidate_store = candidate_store
        self.eps_255, self.max_words, self.output = eps_255, max_words, output
        self.attacks = [with_budgets(a, eps_255, max_words) for a in attacks or []]
        caption_preprocessor(caption_preprocess)  # a bad name fails at construction, before any training
        self.caption_preprocess = caption_preprocess
        if is_synthetic_name(mlm):
            raise unresolved_synthetic_name("robust_eval.mlm", mlm, "ensure_mlm(<preset>)")
        self.mlm = mlm
        if mlm is not None and mlm != MLM_REQUIRED:
            for attack in self.attacks:
                for part in _text_attacks(attack):
                    if hasattr(part, "mlm"):
                        part.mlm, part._mlm = mlm, None
        self.seed = seed
        self.eps_255_grid = eps_255_grid
        self.ks = check_ks(ks if ks is not None else [1, 5, 10])
        self.experiment = experiment
        self.export_dir = export_dir
        self.progress = progress
        self.rows: list[dict] = []
        # What results.json says was tested; the mat CLI sets them (defaults: read from the trainer).
        self.subcommand: str | None = None  # fit, test, validate or robust-eval
        self.weights: str | None = None  # "start", "final", "best" or the --ckpt_path tested
        self.resumed_from: str | None = None  # the checkpoint a resumed fit started from
        # Provenance (eval/provenance.py): the run's config (the mat CLI sets it), the model's name and the content
        # hashes of its starting and of its tested weights, the start time.
        self.run_config: dict | None = None
        self.model_sha256: str | None = None
        self.weights_sha256: str | None = None
        self.started_utc = provenance.utc_now()
        self._gallery = None  # the clean split of the last evaluation (for the W&B examples)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.attacks and trainer.test_loop.inference_mode:
            raise ConfigError(
                "RobustRetrievalEval needs gradients at test time: set trainer.inference_mode: false "
                "(conf/base.yaml does; did a config override it?)"
            )
        check_distinct_names(self.attacks)  # before training, not after it
        check_budgets(self.attacks, self.eps_255_grid)
        if self.model_sha256 is None and trainer.is_global_zero:
            # the first setup sees the starting weights: a checkpoint (resumed fit, --ckpt_path) loads after it
            self.model_sha256 = provenance.weights_sha256(pl_module.encoder.state_dict())
        self._preflight(trainer, pl_module, stage)

    # -- fail fast: everything the evaluation needs, before the first training or attack step ------------------------

    def _preflight(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load the attacks' models, check the export folder and the test split's files, warn on mismatches.

        Runs in ``setup``, i.e. before ``fit`` trains: a missing masked LM or data file fails in seconds, not after
        hours of training and the first attacks.
        """
        if self.mlm == MLM_REQUIRED:
            raise ConfigError(
                "this config needs the masked LM of its text attacks: --robust_eval.mlm=<folder written by "
                "save_pretrained, or a hub name such as bert-base-uncased>"
            )
        dm = trainer.datamodule
        if stage == "fit" and dm is not None and hasattr(dm, "read_split"):
            dm.read_split(dm.splits["test"])  # annotation file and image files of the test split exist
            if hasattr(dm, "probe_eval_images"):
                for eval_stage in ("validate", "test"):  # and open as images (headers, not a full decode)
                    dm.probe_eval_images(eval_stage)
        for attack in self.attacks:
            # loads the masked LMs (cached, shared by the suite); on the CPU: no accelerator memory while training
            attack.prepare(torch.device("cpu"))
        if self.export_dir is not None and trainer.is_global_zero:
            check_export_folder(Path(self.export_dir))
            _check_writable(Path(self.export_dir), "robust_eval.export_dir (--export)")
        if trainer.is_global_zero:
            _check_writable(Path(trainer.default_root_dir), "the run folder (trainer.default_root_dir)")
            if self.output is not None:
                _check_writable(Path(self.output).parent, "the folder of robust_eval.output (--output)")
        if stage == "fit":
            n = sum(p.numel() for p in pl_module.parameters())
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            log.info("model: %.1f M parameters (%.1f M trainable)", n / 1e6, trainable / 1e6)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.test_dataloaders
        if isinstance(loader, list | tuple):
            loader = loader[0]
        if (
            trainer.is_global_zero
        ):  # the weights under test (trained, or a checkpoint's), whatever file held them
            self.weights_sha256 = provenance.weights_sha256(pl_module.encoder.state_dict())
        self.rows = robust_retrieval(
            pl_module.encoder,
            _StopBetweenBatches(loader, lambda: self._stop_on_sigterm(trainer)),
            self.attacks,
            self.eps_255_grid,
            self.ks,
            pl_module.device,
            self.progress and trainer.is_global_zero,
            self.export_dir,  # every rank writes its shard's images, rank 0 the index
            on_row=lambda rows: self._write_partial(trainer, pl_module, rows),
            on_gallery=lambda gallery: setattr(self, "_gallery", gallery),
            caption_preprocess=self.caption_preprocess,
            candidate_store=self.candidate_store,
        )
        base = {}
        # scalars: each attack at its configured budget (the first row of that attack); the clean row is
        # MatModule's test/clean/* already
        for row in self.rows[1:]:
            base.setdefault(row["attack"], row)
        for name, row in base.items():
            for key, value in row.items():
                if key not in ("attack", "eps_255"):
                    # every rank holds the same gathered rows: the mean over ranks is the value itself
                    pl_module.log(f"test/{name}/{key}", float(value), sync_dist=True)
        self._write(trainer, pl_module, self.rows, complete=True)
        if self.export_dir is not None and trainer.is_global_zero:
            # who crafted the exported sets: the rows of `mat transfer` name their source from it
            payload = self.payload(trainer, pl_module, self.rows, True)
            source = {
                k: payload[k] for k in ("experiment", "model", "dataset", "split", "n_images", "weights")
            }
            atomic_write(Path(self.export_dir) / "source.json", json.dumps(source, indent=1))
        from mat_lightning.logging import log_robust_results, wandb_loggers

        if trainer.is_global_zero and wandb_loggers(trainer):
            payload = self.payload(trainer, pl_module, self.rows, True)
            log_robust_results(trainer, "test", payload, self.ks, self._examples(pl_module, loader))

    def _write_partial(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict]) -> None:
        self.rows = list(rows)
        self._write(trainer, pl_module, rows, complete=False)

    def _stop_on_sigterm(self, trainer: L.Trainer) -> None:
        """Before each batch: after a SIGTERM, stop (every rank at the same batch) keeping the finished rows.

        Lightning checks for SIGTERM only between its own loop's batches, and the whole robust evaluation runs in
        ``on_test_epoch_end``: without this a SIGTERM waited for every remaining attack.
        """
        received = bool(
            getattr(trainer, "received_sigterm", False)
        )  # Lightning's handler, reset by every run
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        run = Path(trainer.default_root_dir)
        kept = f"{run / 'results.json'} keeps its {len(self.rows)} finished rows (complete: false)"
        if self.subcommand == "fit":
            again = (
                f"training had finished: evaluate its weights with mat robust-eval --config {run / 'config.yaml'} "
                f"--ckpt_path {run / 'checkpoints' / 'last.ckpt'}"
            )
        else:
            again = (
                "re-run the same command to evaluate again (a new run folder; it starts at the clean pass)"
            )
        Interruption.evaluation = f"{kept}; {again}" if self.rows else again
        raise SIGTERMException()

    def _examples(self, pl_module: L.LightningModule, loader, n: int = 4) -> list[list]:
        """A few clean vs adversarial image-caption pairs per attack (first images of the split, first caption)."""
        clean_caption = caption_preprocessor(self.caption_preprocess)
        batch = next(iter(_PreprocessedCaptions(loader, clean_caption) if clean_caption else loader))
        n = min(n, len(batch.image_ids))
        keep = batch.txt2img < n
        images = batch.images[:n].to(pl_module.device)
        captions = [c for c, k in zip(batch.captions, keep.tolist(), strict=True) if k]
        txt2img = batch.txt2img[keep].to(pl_module.device)
        first = [int((txt2img == i).nonzero()[0]) for i in range(n)]  # first caption of each image
        out = []
        for attack in self.attacks:
            attack = attack.clone().with_gallery(self._gallery)
            result = attack(pl_module.encoder, images, captions, txt2img, image_ids=batch.image_ids[:n])
            for i in range(n):
                out.append(
                    [
                        attack.name,
                        _to_hwc(images[i]),
                        _to_hwc(result.images[i]),
                        captions[first[i]],
                        result.captions[first[i]],
                    ]
                )
        return out

    # -- result files ------------------------------------------------------------------------------------------------

    def _weights(self, trainer: L.Trainer) -> str:
        if self.weights is not None:
            return str(self.weights)
        if getattr(trainer, "ckpt_path", None):
            return str(trainer.ckpt_path)
        return "final" if trainer.global_step > 0 else "start"

    def _model_label(self, encoder) -> str:
        """``<model name>/<pretrained>``: the name given in the config (``synthetic``, not its cache path), a
        weights file by its name only (what it holds is ``model_sha256``)."""
        config = (self.run_config or {}).get("model") or {}
        args = (config.get("encoder") or {}).get("init_args") or {} if isinstance(config, dict) else {}
        pretrained = args.get("pretrained", getattr(encoder, "pretrained", None))
        if isinstance(pretrained, str) and os.sep in pretrained:
            pretrained = Path(pretrained).name
        return f"{getattr(encoder, 'model_name', type(encoder).__name__)}/{pretrained}"

    def payload(
        self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict], complete: bool
    ) -> dict:
        """The content of ``results.json``."""
        dm = trainer.datamodule
        eval_set = dm.eval_set("test") if dm is not None and hasattr(dm, "eval_set") else None
        encoder = pl_module.encoder
        settings = (
            provenance.run_settings(self.run_config, self.model_sha256)
            if self.run_config is not None
            else None
        )
        return {
            "experiment": self.experiment,
            "model": self._model_label(encoder),
            "model_sha256": self.model_sha256,  # content hash of the starting weights (eval/provenance.py)
            "weights_sha256": self.weights_sha256,  # ... and of the weights tested
            "defense": getattr(getattr(pl_module, "defense", None), "name", None),
            "dataset": getattr(dm, "dataset", None),
            "split": dm.splits["test"] if dm is not None and hasattr(dm, "splits") else None,
            "n_images": len(eval_set) if eval_set is not None else None,
            "n_captions": len(eval_set.captions) if eval_set is not None else None,
            # batch composition matters to the supervised (contrastive) attacks: negatives come from the batch
            "eval_batch_size": getattr(dm, "eval_batch_size", None),
            "checkpoint": getattr(trainer, "ckpt_path", None),
            "weights": self._weights(trainer),
            "subcommand": self.subcommand or (trainer.state.fn.value if trainer.state.fn else None),
            "resumed_from": self.resumed_from,
            "seed": self.seed,
            # the run's settings without the seed: runs with the same hash are replicates (`mat report`)
            "config_hash": provenance.config_hash(settings) if settings is not None else None,
            # the attacks of the run and their eps grid: `mat report` averages only runs evaluated alike
            "attacks": {a.name: attack_config(a) for a in self.attacks},
            "eps_255_grid": self.eps_255_grid,
            "caption_preprocess": self.caption_preprocess,
            "modalities": {a.name: a.modality for a in self.attacks},
            "git": provenance.git_state(str(REPO_ROOT)),
            "versions": provenance.package_versions(),
            "started_utc": self.started_utc,
            "written_utc": provenance.utc_now(),
            # false while the attacks run, or when the run stopped before the last one; `mat report` skips such runs
            "complete": complete,
            "rows": list(rows),
            "config": settings,
        }

    @rank_zero_only
    def _write(
        self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[dict], complete: bool
    ) -> None:
        """Rewrite the result files: after every attack (a late failure loses nothing), then with the figures."""
        write_results(
            trainer.default_root_dir, self.payload(trainer, pl_module, rows, complete), figures=complete
        )
        if complete:
            written = Path(trainer.default_root_dir) / "results.json"
            if self.output is not None:
                atomic_write(Path(self.output), written.read_text())
                written = Path(self.output)
            log.info("results written to %s", written)


class _StopBetweenBatches:
    """An evaluation loader that calls ``check()`` before handing out each batch (``check`` may raise to stop)."""

    def __init__(self, loader, check: Callable[[], None]) -> None:
        self.loader, self.check = loader, check

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.check()
            yield batch


def attack_config(attack: Attack) -> dict:
    """A JSON-able, process-independent description of an attack's settings (class, ε, public attributes).

    Only the settings the attack uses (``unused_settings()`` drops the others, e.g. a thesaurus BERT-Attack's MLM
    settings). Local files and folders (a masked LM, a thesaurus) become their name and content hash; sets (stop
    words) their size and a content hash; the package's own helper objects (a candidate generator) their class
    and public attributes; other objects their class name.
    """

    def value(v):
        if isinstance(v, Attack):
            return attack_config(v)
        if type(v).__module__.startswith("mat_lightning.") and hasattr(v, "__dict__"):
            public = {k: value(x) for k, x in vars(v).items() if not k.startswith("_")}
            return {"class": type(v).__name__, **public}
        if isinstance(v, str):
            return provenance.path_identity(v)
        if v is None or isinstance(v, bool | int | float):
            return v
        if isinstance(v, list | tuple):
            return [value(x) for x in v]
        if isinstance(v, set | frozenset):
            digest = hashlib.sha1("\n".join(sorted(map(str, v))).encode()).hexdigest()[:12]
            return f"<{len(v)} items {digest}>"
        return f"<{type(v).__name__}>"

    unused = set(attack.unused_settings()) if hasattr(attack, "unused_settings") else set()
    public = {k: value(v) for k, v in vars(attack).items() if not k.startswith("_") and k not in unused}
    return {"class": type(attack).__name__, "eps_255": attack.eps_255, **public}  # ε is a property


def _to_hwc(image: torch.Tensor):
    """float[3, H, W] in [0, 1] -> uint8[H, W, 3] (numpy), for image loggers."""
    return (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _text_attacks(attack: Attack) -> list[Attack]:
    """The attack and its parts (a multimodal attack's ``text_attack``): where an ``mlm`` setting may sit."""
    parts = [attack]
    for name in ("text_attack", "image_attack"):
        part = getattr(attack, name, None)
        if isinstance(part, Attack):
            parts.append(part)
    return parts


def _check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write a probe file into it; raise one ConfigError naming it otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".mat-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{what} {folder} is not writable ({e.strerror or e}); choose another folder"
        ) from None
