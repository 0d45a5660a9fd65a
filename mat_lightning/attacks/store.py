"""BERT-Attack's model-independent work, done once per data set: the candidate store.

Of BERT-Attack's work on a caption (:mod:`~mat_lightning.attacks.bert_attack`) only two stages read the model being
attacked or trained: word importance (the text encoder on the ``[UNK]`` variants) and candidate scoring. Everything
else is fixed by the caption, the masked LM, the text encoder's tokenizer and the attack's settings: the words, which
of them are attackable, their substitutes (the MLM's top-k at every position, the threshold, the perplexity-ranked
multi-sub-word combinations, the stop-word and ``##`` filters) and the token ids of every text the search may encode
(the caption, each ``[UNK]`` variant, each one-word-changed candidate caption; in reference mode of the text the
references' CLIP reads, :func:`~mat_lightning.attacks.reference.text_view`). A store holds exactly that for a set of
captions, so that every epoch, seed, defense and evaluation on the same data reuses it instead of running the MLM and
the tokenizers again.

Files (``<cache>/candidate-stores/<key>/``, written to a temporary folder and renamed into place, read memory-mapped):
``meta.json`` (what was stored and how it was built), ``captions.bin``/``caption_ptr.npy`` (the captions, UTF-8),
``caption_hash.npy``/``caption_order.npy`` (sorted 64-bit hashes for lookup), ``var_ptr.npy``/``var_word.npy`` (per
caption, the words whose ``[UNK]`` variant is ranked), ``cand_ptr.npy``/``subs.bin``/``subs_ptr.npy`` (per such word,
its substitutes in rank order) and, when the encoder can take token ids (``encode_text_ids``), ``tokens.npy``/
``tok_ptr.npy``: the ids of sequence ``r`` (caption ``r``), ``N + v`` (variant ``v``) and ``N + V + c``
(candidate ``c``), without the padding.

The key hashes every input: the captions (sorted, unique), the masked LM (its files' contents, or hub name and
revision), the tokenizer (:attr:`text_tokenizer_key` of the encoder) and the attack's settings
(:meth:`BertAttack.store_settings`), so a change to any of them builds a new store rather than reading a stale one.

Why written here: no library caches an MLM attack's candidates. The layout is numpy arrays so a store of the 145,000
Flickr30K training captions is memory-mapped by every DataLoader worker and process instead of copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mat_lightning.cache import cache_dir, corrupt_cache_hint
from mat_lightning.errors import ConfigError, WriteError

if TYPE_CHECKING:
    from mat_lightning.attacks.bert_attack import BertAttack

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: captions a build step handles at once (bounded memory; the MLM still runs in ``mlm_batch_size`` chunks)
BUILD_CHUNK = 512


def caption_hashes(captions: Sequence[str]) -> np.ndarray:
    """uint64[n] hashes of the captions (BLAKE2b, 8 bytes): the store's lookup keys."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") for c in captions],
        dtype=np.uint64,
    )


def store_key(attack: BertAttack, captions: Sequence[str], tokenizer_key: str | None) -> str | None:
    """The cache key of a store (None when the masked LM cannot be identified: an in-memory model)."""
    mlm = attack.mlm_identity()
    if mlm is None:
        return None
    h = hashlib.sha256()
    for c in sorted(set(captions)):
        h.update(c.encode())
        h.update(b"\0")
    inputs = {
        "format": FORMAT_VERSION,
        "captions": h.hexdigest(),
        "mlm": mlm,
        "tokenizer": tokenizer_key,
        "settings": attack.store_settings(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class CaptionPlan:
    """A batch's captions as the store holds them (what a DataLoader worker hands the training step).

    Attributes:
        captions: the T captions of the batch.
        found: bool per caption: whether the store holds it (the others are prepared on the fly).
        variant_words: per caption, the words whose ``[UNK]`` variant is ranked (empty when not found).
        candidates: per caption, word -> substitutes in rank order (for the words of ``variant_words``).
        ids: long[S, L] zero-padded token ids of the texts (None without ids in the store); rows:
            ``caption_row[t]``, ``variant_row[(t, j)]``, and ``candidate_row[(t, j)] + k`` for the k-th substitute.
    """

    captions: list[str]
    found: list[bool]
    variant_words: list[list[int]]
    candidates: list[dict[int, list[str]]]
    ids: Tensor | None
    caption_row: dict[int, int]
    variant_row: dict[tuple[int, int], int]
    candidate_row: dict[tuple[int, int], int]
    context_length: int = 0
    key: str | None = None

    def pin_memory(self) -> CaptionPlan:
        if self.ids is not None:
            self.ids = self.ids.pin_memory()
        return self


class CandidateStore:
    """A built store, memory-mapped (:func:`ensure_store` builds or opens one).

    Picklable: a DataLoader worker re-opens the files (``__getstate__`` keeps only the folder).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            if self.meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {self.meta.get('format')}, expected {FORMAT_VERSION}")
            self._arrays: dict[str, np.ndarray] = {
                name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in self.meta["arrays"]
            }
            self._blobs = {
                name: np.memmap(self.folder / f"{name}.bin", dtype=np.uint8, mode="r")
                if (self.folder / f"{name}.bin").stat().st_size
                else np.zeros(0, np.uint8)
                for name in ("captions", "subs")
            }
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"{corrupt_cache_hint(self.folder)} (candidate store of BERT-Attack: {e.__class__.__name__}: {e})"
            ) from None
        self.key = self.meta["key"]
        self.has_ids = bool(self.meta["has_ids"])

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def __len__(self) -> int:
        return int(self.meta["n_captions"])

    def __repr__(self) -> str:
        return f"CandidateStore({str(self.folder)!r}, {len(self)} captions)"

    def _text(self, blob: str, ptr: str, i: int) -> str:
        p = self._arrays[ptr]
        return bytes(self._blobs[blob][p[i] : p[i + 1]]).decode()

    def rows(self, captions: Sequence[str]) -> list[int | None]:
        """The store's row of each caption, None where it holds no such caption."""
        hashes = self._arrays["caption_hash"]
        order = self._arrays["caption_order"]
        wanted = caption_hashes(captions)
        at = np.searchsorted(hashes, wanted)
        out: list[int | None] = []
        for c, h, i in zip(captions, wanted.tolist(), at.tolist(), strict=True):
            row = int(order[i]) if i < len(hashes) and int(hashes[i]) == h else None
            out.append(row if row is not None and self._text("captions", "caption_ptr", row) == c else None)
        return out

    def plan(self, captions: Sequence[str]) -> CaptionPlan:
        """The store's entries for ``captions`` (T strings) in one :class:`CaptionPlan`."""
        a = self._arrays
        rows = self.rows(captions)
        n_cap, n_var = int(self.meta["n_captions"]), int(self.meta["n_variants"])
        variant_words: list[list[int]] = []
        candidates: list[dict[int, list[str]]] = []
        seqs: list[int] = []
        caption_row: dict[int, int] = {}
        variant_row: dict[tuple[int, int], int] = {}
        candidate_row: dict[tuple[int, int], int] = {}
        for t, row in enumerate(rows):
            if row is None:
                variant_words.append([])
                candidates.append({})
                continue
            v0, v1 = int(a["var_ptr"][row]), int(a["var_ptr"][row + 1])
            words = [int(j) for j in a["var_word"][v0:v1]]
            variant_words.append(words)
            cands: dict[int, list[str]] = {}
            caption_row[t] = len(seqs)
            seqs.append(row)
            for v, j in zip(range(v0, v1), words, strict=True):
                c0, c1 = int(a["cand_ptr"][v]), int(a["cand_ptr"][v + 1])
                cands[j] = [self._text("subs", "subs_ptr", c) for c in range(c0, c1)]
                variant_row[(t, j)] = len(seqs)
                seqs.append(n_cap + v)
                candidate_row[(t, j)] = len(seqs)
                seqs.extend(range(n_cap + n_var + c0, n_cap + n_var + c1))
            candidates.append(cands)
        ids = self._ids(seqs) if self.has_ids else None
        return CaptionPlan(
            list(captions),
            [r is not None for r in rows],
            variant_words,
            candidates,
            ids,
            caption_row,
            variant_row,
            candidate_row,
            int(self.meta.get("context_length") or 0),
            self.key,
        )

    def _ids(self, seqs: list[int]) -> Tensor:
        """long[len(seqs), longest] zero-padded ids of the stored sequences ``seqs``."""
        ptr, tokens = self._arrays["tok_ptr"], self._arrays["tokens"]
        if not seqs:
            return torch.zeros(0, 1, dtype=torch.long)
        idx = np.asarray(seqs)
        starts, ends = ptr[idx], ptr[idx + 1]
        lengths = ends - starts
        out = np.zeros((len(seqs), int(lengths.max())), dtype=np.int64)
        mask = np.arange(out.shape[1])[None, :] < lengths[:, None]
        out[mask] = np.concatenate([tokens[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])
        # (uint16 ids widen to int64 here: torch takes long ids)
        return torch.from_numpy(out)


def default_folder() -> Path:
    return cache_dir() / "candidate-stores"


def ensure_store(
    attack: BertAttack,
    captions: Sequence[str],
    encoder: Any = None,
    device: torch.device | str = "cpu",
    folder: str | Path | None = None,
    progress: bool = True,
) -> CandidateStore | None:
    """The store of ``captions`` for ``attack`` (and ``encoder``'s tokenizer when it takes token ids): opened when
    built before, built (and cached) otherwise. None when the attack cannot use one (a ``candidate_generator``, or
    an in-memory masked LM that has no identity to key a cache by).

    Args:
        encoder: the text encoder whose tokenizer's ids are stored: it needs ``tokenize`` (zero-padded long ids),
            ``encode_text_ids`` and ``text_tokenizer_key``; any other encoder (DESIGN §4's minimal contract) gets a
            store of substitutes only, and tokenises at run time.
    """
    if attack.candidate_generator is not None:
        return None
    captions = list(dict.fromkeys(captions))
    tokenizer = encoder if takes_token_ids(encoder) else None
    key = store_key(attack, captions, tokenizer.text_tokenizer_key if tokenizer is not None else None)
    if key is None:
        return None
    root = Path(folder) if folder is not None else default_folder()
    target = root / key
    if (target / "meta.json").is_file():
        return CandidateStore(target)
    build_store(attack, captions, tokenizer, target, device, progress)
    return CandidateStore(target)


def takes_token_ids(encoder: Any) -> bool:
    """Whether ``encoder`` offers the optional token-id path (``tokenize``, ``encode_text_ids``,
    ``text_tokenizer_key``): the store then holds its ids of every text."""
    return all(hasattr(encoder, name) for name in ("tokenize", "encode_text_ids", "text_tokenizer_key"))


def build_store(
    attack: BertAttack,
    captions: Sequence[str],
    tokenizer: Any,
    target: Path,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> None:
    """Compute and write the store of ``captions`` to ``target`` (atomically: a temporary folder renamed).

    Raises:
        WriteError: the folder cannot be written (nothing is left half-written).
    """
    from mat_lightning.progress import progress as progress_of

    t0 = time.perf_counter()
    device = torch.device(device)
    captions = list(captions)
    var_word: list[int] = []
    var_count: list[int] = []
    cand_count: list[int] = []
    subs: list[str] = []
    # per kind of text, chunks of (flat ids without padding, length of each text)
    token_seqs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
        "caption": [],
        "variant": [],
        "candidate": [],
    }
    context_length = 0
    chunks = range(0, len(captions), BUILD_CHUNK)
    for start in progress_of(
        chunks, "building BERT-Attack's candidate store", enabled=progress, unit="chunks"
    ):
        part = captions[start : start + BUILD_CHUNK]
        words, variants, candidates = attack.candidate_entries(part, device)
        texts: dict[str, list[str]] = {"caption": list(part), "variant": [], "candidate": []}
        for t, ws in enumerate(words):
            var_count.append(len(variants[t]))
            for j in variants[t]:
                var_word.append(j)
                cand_count.append(len(candidates[t][j]))
                subs.extend(candidates[t][j])
                texts["variant"].append(attack.variant_text(ws, j))
                texts["candidate"].extend(attack.candidate_text(ws, j, c) for c in candidates[t][j])
        if tokenizer is not None:
            for kind, kind_texts in texts.items():
                flat, lengths, width = _token_ids(attack, tokenizer, kind_texts, device)
                token_seqs[kind].append((flat, lengths))
                context_length = max(context_length, width)
    arrays: dict[str, np.ndarray] = {}
    hashes = caption_hashes(captions)
    order = np.argsort(hashes, kind="stable")
    arrays["caption_hash"], arrays["caption_order"] = hashes[order], order.astype(np.int64)
    arrays["caption_ptr"], captions_blob = _blob(captions)
    arrays["var_ptr"] = _ptr(var_count)
    arrays["var_word"] = np.asarray(var_word, dtype=np.int32)
    arrays["cand_ptr"] = _ptr(cand_count)
    arrays["subs_ptr"], subs_blob = _blob(subs)
    if tokenizer is not None:
        parts = token_seqs["caption"] + token_seqs["variant"] + token_seqs["candidate"]
        tokens = np.concatenate([f for f, _ in parts]) if parts else np.zeros(0, np.int64)
        arrays["tok_ptr"] = _ptr(np.concatenate([n for _, n in parts]) if parts else [])
        # CLIP's 49,408 ids fit 16 bits: half the bytes of int32
        arrays["tokens"] = tokens.astype(np.uint16 if tokens.size == 0 or tokens.max() < 2**16 else np.int32)
    meta = {
        "format": FORMAT_VERSION,
        "key": target.name,
        "n_captions": len(captions),
        "n_variants": len(var_word),
        "n_candidates": len(subs),
        "has_ids": tokenizer is not None,
        "context_length": context_length,
        "tokenizer": tokenizer.text_tokenizer_key if tokenizer is not None else None,
        "mlm": attack.mlm_identity(),
        "settings": attack.store_settings(),
        "arrays": sorted(arrays),
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    _write_folder(target, arrays, {"captions": captions_blob, "subs": subs_blob}, meta)
    log.info(
        "candidate store: %d captions, %d words, %d substitutes in %.1f s -> %s",
        len(captions),
        len(var_word),
        len(subs),
        meta["build_seconds"],
        target,
    )


def _token_ids(
    attack: BertAttack, tokenizer: Any, texts: list[str], device: torch.device
) -> tuple[np.ndarray, np.ndarray, int]:
    """The encoder's ids of ``texts`` as the attack would feed them (reference mode: their ``text_view``): all
    texts' ids without their zero padding, one after the other; each text's length; the padded width the tokenizer
    gives (its context length)."""
    flats, lengths = [], []
    width = 0
    step = attack.text_batch_size
    for i in range(0, len(texts), step):
        ids = tokenizer.tokenize(attack.encoder_view(texts[i : i + step], device)).cpu()
        width = ids.shape[1]
        n = (ids != 0).long().cumsum(1).argmax(1) + 1  # through the last non-zero id (EOT)
        keep = torch.arange(width)[None, :] < n[:, None]
        flats.append(ids[keep].numpy())
        lengths.append(n.numpy())
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), width
    return np.concatenate(flats), np.concatenate(lengths), width


def _ptr(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def _blob(texts: Sequence[str]) -> tuple[np.ndarray, bytes]:
    encoded = [t.encode() for t in texts]
    return _ptr([len(b) for b in encoded]), b"".join(encoded)


def _write_folder(target: Path, arrays: dict[str, np.ndarray], blobs: dict[str, bytes], meta: dict) -> None:
    """Write every file into a temporary sibling folder, then rename it to ``target`` (another process that
    finished first wins; ours is dropped)."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        for name, blob in blobs.items():
            (tmp / f"{name}.bin").write_bytes(blob)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(
            f"cannot write BERT-Attack's candidate store to {target} ({e.strerror or e}): free disk space or set "
            "MAT_CACHE_DIR to a writable folder"
        ) from e


def bert_attacks(*roots: Any) -> list[BertAttack]:
    """The BERT-Attacks held by ``roots`` (attacks, defenses) and their parts (a multimodal attack's
    ``text_attack``), each once."""
    from mat_lightning.attacks.base import Attack
    from mat_lightning.attacks.bert_attack import BertAttack

    found: dict[int, BertAttack] = {}
    todo = list(roots)
    while todo:
        obj = todo.pop(0)
        if isinstance(obj, BertAttack):
            found.setdefault(id(obj), obj)
            continue
        todo.extend(v for v in vars(obj).values() if isinstance(v, Attack))
    return list(found.values())


def attach_stores(
    attacks: Sequence[BertAttack],
    captions: Sequence[str],
    encoder: Any,
    device: torch.device | str = "cpu",
    progress: bool = True,
    folder: str | Path | None = None,
) -> list[CandidateStore]:
    """Attach to every attack the store of ``captions`` (one per distinct settings, built where missing, in
    ``folder``, default the cache's) and return the stores. Under ``torch.distributed`` the first process builds
    while the others wait, then they open it."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    first = not distributed or dist.get_rank() == 0
    usable = [a for a in attacks if a.candidate_generator is None and a.mlm_identity() is not None]
    if distributed and not first:
        dist.barrier()  # the first process builds the stores; the others open them after
    stores = {
        id(a): ensure_store(a, captions, encoder, device, folder, progress=progress and first) for a in usable
    }
    if distributed and first:
        dist.barrier()
    for attack in usable:
        attack.attach_store(stores[id(attack)])
    return list({s.key: s for s in stores.values()}.values())


def store_size_bytes(store: CandidateStore) -> int:
    """Bytes on disk of a store's files."""
    return sum(p.stat().st_size for p in store.folder.iterdir())
