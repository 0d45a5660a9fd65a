"""BERT-Attack on captions, batched over the whole batch (Li et al., EMNLP 2020; as adapted by Co-Attack and SGA).

The algorithm of the VLP attack papers (reference-implementations.md §1-2, §6):

1. one masked-LM forward on the **unmasked** captions gives the top-k substitutes at every sub-word position;
2. word importance: each word replaced by ``[UNK]``, importance = KL(softmax(e(caption)) ‖ softmax(e(variant)))
   of the *target* text encoder's embeddings;
3. greedy by importance (stop words skipped): the candidates of the word (top-k MLM tokens; for words of several
   sub-words, combinations of the top ``bpe_top`` tokens per sub-word ranked by MLM perplexity, capped) minus
   sub-words, special tokens, stop words and the word itself are scored together with the current caption;
   the best one is kept if it beats the current caption; stop after ``max_words`` changes.

Candidate scores (``objective``): ``image_cosine`` — lowest cosine to the caption's image embedding (SGA's
``img_guided_attack``), or ``embedding_kl`` — largest KL from the original caption's embedding (Co-Attack).

Why written here rather than taken from TextAttack: the reference code and TextAttack's recipe run one caption at a
time (>= 2 text-encoder forwards per caption plus MLM forwards per multi-sub-word word). Here every stage is
batched across captions: one MLM pass for all captions (chunked), one pass for all perplexity combinations, one
text-encoder pass for all [UNK] variants, one per greedy round for all candidates.

Offsets: HF tokenisers put ``[CLS]`` at position 0, so word ``j``'s sub-words sit one position after their index in
the word's sub-word list. We shift (as the original BERT-Attack does); ``legacy_offset=True`` reproduces the
off-by-one of Co-Attack/SGA (candidates of word ``j`` read at the *previous* token) for comparison with published
numbers.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mat_lightning.attacks.base import Attack, AttackResult
from mat_lightning.attacks.stopwords import STOP_WORDS
from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder

log = logging.getLogger(__name__)

TextObjective = Literal["image_cosine", "embedding_kl"]


class CandidateGenerator(Protocol):
    """Proposes substitutes for word ``j`` of a caption (e.g. a TextAttack transformation, see ``adapters``)."""

    def candidates(self, words: list[str], j: int, k: int) -> list[str]: ...


def resolve_mlm(spec: str) -> str:
    """``synthetic[:<preset>]`` -> the synthetic world's tiny MLM folder; anything else passes through."""
    if not spec.startswith("synthetic"):
        return spec
    from mat_lightning import world

    return str(world.ensure_mlm(spec.split(":", 1)[1] if ":" in spec else "default"))


@functools.lru_cache(maxsize=4)
def load_mlm(spec: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a HF masked LM given by hub name, local folder, or ``synthetic``.

    Cached by spec: the attacks of a suite (BERT-Attack, Sep-Attack, Co-Attack, SGA) share one model in memory.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = resolve_mlm(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForMaskedLM.from_pretrained(path)
    except (OSError, ValueError) as e:  # missing folder, unknown hub id, offline hub
        from mat_lightning import world

        if world.is_cached(path):
            raise ConfigError(world.corrupt_cache_hint(path)) from None
        raise ConfigError(
            f"could not load the masked LM {spec!r} ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
            "Offline? Give a local folder written by save_pretrained, or 'synthetic' for the synthetic world's MLM."
        ) from None
    return model.eval(), tokenizer


@dataclass
class _Caption:
    words: list[str]
    keys: list[tuple[int, int]]  # sub-word span [start, end) of each word in the caption's sub-word list
    candidates: list[list[str]]  # per word
    order: list[int]  # eligible words, most important first
    changes: int = 0
    cursor: int = 0


class BertAttack(Attack):
    """Batched BERT-Attack.

    Args:
        mlm: masked LM: a hub name (``bert-base-uncased``), a local folder, or ``synthetic`` (the synthetic world's).
        top_k: substitutes per word (10 in Co-Attack/SGA).
        max_words: words changed at most per caption (1 in Co-Attack/SGA).
        objective: ``image_cosine`` (SGA) or ``embedding_kl`` (Co-Attack).
        max_length: sub-words given to the MLM (words beyond are not attacked).
        legacy_offset: reproduce the Co-Attack/SGA off-by-one (candidates from the previous token's position).
        bpe_top, bpe_max_combinations, max_subwords: multi-sub-word words: top tokens per sub-word, combinations
            kept (in product order) before perplexity ranking, and the longest word attempted.
        stop_words: words never replaced nor proposed (default: :data:`~mat_lightning.attacks.stopwords.STOP_WORDS`).
        unk_token: the string that replaces a word when measuring its importance.
        candidate_generator: propose substitutes another way (a TextAttack transformation) instead of the MLM.
        text_batch_size, mlm_batch_size: chunk sizes of the batched forwards.
    """

    name = "bert_attack"
    modality = "text"

    def __init__(
        self,
        mlm: str = "bert-base-uncased",
        top_k: int = 10,
        max_words: int = 1,
        objective: TextObjective = "image_cosine",
        max_length: int = 40,
        legacy_offset: bool = False,
        bpe_top: int = 4,
        bpe_max_combinations: int = 24,
        max_subwords: int = 12,
        stop_words: list[str] | None = None,
        unk_token: str = "[UNK]",
        candidate_generator: CandidateGenerator | None = None,
        text_batch_size: int = 1024,
        mlm_batch_size: int = 128,
        seed: int | None = 0,
    ) -> None:
        super().__init__(seed)
        if objective not in ("image_cosine", "embedding_kl"):
            raise ConfigError(f"BertAttack objective={objective!r}; choose image_cosine or embedding_kl")
        if top_k < 1 or max_words < 0 or max_length < 3 or bpe_top < 1:
            raise ConfigError(
                f"BertAttack needs top_k >= 1, max_words >= 0, max_length >= 3, bpe_top >= 1 "
                f"(got {top_k}, {max_words}, {max_length}, {bpe_top})"
            )
        self.mlm, self.top_k, self.max_words, self.objective = mlm, top_k, max_words, objective
        self.max_length, self.legacy_offset = max_length, legacy_offset
        self.bpe_top, self.bpe_max_combinations, self.max_subwords = (
            bpe_top,
            bpe_max_combinations,
            max_subwords,
        )
        self.stop_words = frozenset(w.lower() for w in stop_words) if stop_words is not None else STOP_WORDS
        self.unk_token = unk_token
        self.candidate_generator = candidate_generator
        self.text_batch_size, self.mlm_batch_size = text_batch_size, mlm_batch_size
        self._mlm: tuple[Any, Any] | None = None

    @classmethod
    def from_mlm(cls, model: Any, tokenizer: Any, **kwargs: Any) -> BertAttack:
        """An attack around an already loaded masked LM (tests, notebooks)."""
        attack = cls(mlm="<in-memory>", **kwargs)
        attack._mlm = (model.eval(), tokenizer)
        return attack

    def prepare(self, device: torch.device | str) -> None:
        if self.candidate_generator is None:
            self.mlm_and_tokenizer(torch.device(device))

    def mlm_and_tokenizer(self, device: torch.device) -> tuple[Any, Any]:
        if self._mlm is None:
            self._mlm = load_mlm(self.mlm)
        model, tok = self._mlm
        if next(model.parameters()).device != device:
            model.to(device)
        return model, tok

    # -- contract -----------------------------------------------------------------------------------------------------

    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        image_emb = None
        if self.objective == "image_cosine":
            with torch.no_grad():
                image_emb = encoder.encode_image(images)
        return AttackResult(images, self.perturb(encoder, captions, txt2img, self.objective, image_emb))

    # -- the batched algorithm ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, encoder: VLEncoder, texts: Sequence[str]) -> Tensor:
        if not texts:
            return torch.empty(0)
        return torch.cat(
            [
                encoder.encode_text(texts[i : i + self.text_batch_size])
                for i in range(0, len(texts), self.text_batch_size)
            ]
        )

    @torch.no_grad()
    def perturb(
        self,
        encoder: VLEncoder,
        captions: list[str],
        txt2img: Tensor,
        objective: TextObjective,
        image_emb: Tensor | None = None,
    ) -> list[str]:
        """Adversarial versions of ``captions``.

        Args:
            captions: T strings; txt2img: long[T] row of each caption's image in ``image_emb``.
            objective: how candidates are scored (``image_cosine`` needs ``image_emb``).
            image_emb: float[B, D] L2-normalised embeddings of the guiding images (clean or adversarial).
        """
        if self.max_words == 0 or not captions:
            return list(captions)
        device = next(encoder.parameters()).device
        orig_emb = self.encode(encoder, captions)  # (T, D)
        states = self._prepare(captions, device)
        self._rank_words(encoder, states, orig_emb)
        guide = image_emb[txt2img.to(image_emb.device)] if objective == "image_cosine" else None

        current = list(captions)
        while True:
            # One greedy round for every caption that still has budget and words: its next word's candidates.
            texts, owners, subs = [], [], []
            for t, st in enumerate(states):
                if st.changes >= self.max_words or st.cursor >= len(st.order):
                    continue
                j = st.order[st.cursor]
                texts.append(current[t])  # candidate 0: keep the current caption
                owners.append(t)
                subs.append((j, None))
                for cand in st.candidates[j]:
                    texts.append(" ".join(st.words[:j] + [cand] + st.words[j + 1 :]))
                    owners.append(t)
                    subs.append((j, cand))
            if not texts:
                break
            emb = self.encode(encoder, texts)
            owner = torch.tensor(owners, device=emb.device)
            if objective == "image_cosine":
                score = -(emb * guide[owner]).sum(dim=-1)
            else:
                score = F.kl_div(
                    F.log_softmax(emb, -1), F.softmax(orig_emb[owner], -1), reduction="none"
                ).sum(-1)
            for t, idx in _segment_argmax(score, owner, len(captions)).items():
                st = states[t]
                j, cand = subs[idx]
                if cand is not None:
                    st.words = st.words[:j] + [cand] + st.words[j + 1 :]
                    current[t] = " ".join(st.words)
                    st.changes += 1
                st.cursor += 1
        return current

    def _prepare(self, captions: list[str], device: torch.device) -> list[_Caption]:
        """Split into words and sub-words; candidates for every word from one batched MLM pass."""
        model, tok = (None, None) if self.candidate_generator is not None else self.mlm_and_tokenizer(device)
        split = [c.split(" ") for c in captions]
        if tok is not None:  # all words of all captions through the tokenizer at once
            flat = [w for words in split for w in words]
            pieces_flat = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        states, ids, pos = [], [], 0
        for words in split:
            keys, sub_ids = [], []
            for _ in words:
                pieces = pieces_flat[pos] if tok is not None else [0]
                pos += 1
                keys.append((len(sub_ids), len(sub_ids) + len(pieces)))
                sub_ids += pieces
            if tok is not None:
                ids.append([tok.cls_token_id] + sub_ids[: self.max_length - 2] + [tok.sep_token_id])
            states.append(_Caption(words=words, keys=keys, candidates=[[] for _ in words], order=[]))
        if self.candidate_generator is not None:
            for st in states:
                for j, w in enumerate(st.words):
                    if self._attackable(w):
                        st.candidates[j] = self._filter(
                            w, self.candidate_generator.candidates(st.words, j, self.top_k)
                        )
            return states

        # One MLM forward (in chunks) over the unmasked captions: top-k ids at every position.
        n_top = max(self.top_k, self.bpe_top)
        top_ids = _mlm_topk(model, tok, ids, n_top, self.mlm_batch_size, device)  # list of long[L_t, n_top]
        offset = 0 if self.legacy_offset else 1
        bpe_requests: list[tuple[int, int, list[tuple[int, ...]]]] = []
        for t, st in enumerate(states):
            for j, (start, end) in enumerate(st.keys):
                if (
                    not self._attackable(st.words[j])
                    or end > self.max_length - 2
                    or end - start > self.max_subwords
                ):
                    continue
                rows = top_ids[t][
                    start + offset : end + offset
                ]  # predictions at the word's sub-word positions
                if end - start == 1:
                    tokens = tok.convert_ids_to_tokens(rows[0, : self.top_k].tolist())
                    st.candidates[j] = self._filter(st.words[j], tokens, tok)
                else:
                    per_position = [r[: self.bpe_top].tolist() for r in rows]
                    combos = list(
                        itertools.islice(itertools.product(*per_position), self.bpe_max_combinations)
                    )
                    bpe_requests.append((t, j, combos))
        if bpe_requests:  # multi-sub-word words: rank all combinations by MLM perplexity in one batched pass
            flat = [c for _, _, combos in bpe_requests for c in combos]
            ppl = _perplexity(model, flat, self.mlm_batch_size, device)
            pos = 0
            for t, j, combos in bpe_requests:
                scores = ppl[pos : pos + len(combos)]
                pos += len(combos)
                ranked = [combos[i] for i in torch.argsort(scores).tolist()][: self.top_k]
                words = [
                    tok.convert_tokens_to_string(tok.convert_ids_to_tokens(list(c))).replace(" ", "")
                    for c in ranked
                ]
                states[t].candidates[j] = self._filter(states[t].words[j], words, tok)
        return states

    def _attackable(self, word: str) -> bool:
        return bool(word) and word.lower() not in self.stop_words

    def _filter(self, word: str, candidates: list[str], tok: Any = None) -> list[str]:
        special = set(getattr(tok, "all_special_tokens", [])) if tok is not None else set()
        out: list[str] = []
        for c in candidates:
            if (
                not c
                or "##" in c
                or c in special
                or c.lower() == word.lower()
                or c.lower() in self.stop_words
                or " " in c
            ):
                continue
            if c not in out:
                out.append(c)
        return out

    def _rank_words(self, encoder: VLEncoder, states: list[_Caption], orig_emb: Tensor) -> None:
        """Importance of every attackable word with candidates: KL of the embedding when it becomes ``[UNK]``."""
        variants, where = [], []
        for t, st in enumerate(states):
            for j in range(len(st.words)):
                if st.candidates[j]:
                    variants.append(" ".join(st.words[:j] + [self.unk_token] + st.words[j + 1 :]))
                    where.append((t, j))
        if not variants:
            return
        emb = self.encode(encoder, variants)
        rows = torch.tensor([t for t, _ in where], device=emb.device)
        importance = F.kl_div(F.log_softmax(emb, -1), F.softmax(orig_emb[rows], -1), reduction="none").sum(-1)
        by_caption: dict[int, list[tuple[float, int]]] = {}
        for (t, j), s in zip(where, importance.tolist(), strict=True):
            by_caption.setdefault(t, []).append((s, j))
        for t, scored in by_caption.items():
            states[t].order = [j for _, j in sorted(scored, key=lambda x: (-x[0], x[1]))]


def _segment_argmax(score: Tensor, owner: Tensor, n: int) -> dict[int, int]:
    """For every owner present, the flat index of its highest score (the first one on ties)."""
    best_score = torch.full((n,), float("-inf"), device=score.device).scatter_reduce(0, owner, score, "amax")
    index = torch.arange(len(score), device=score.device)
    candidates = torch.where(score == best_score[owner], index, torch.full_like(index, len(score)))
    first = torch.full((n,), len(score), device=score.device, dtype=torch.long).scatter_reduce(
        0, owner, candidates, "amin"
    )
    return {t: int(first[t]) for t in torch.unique(owner).tolist()}


def _pad(ids: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def _mlm_topk(
    model: Any, tok: Any, ids: list[list[int]], k: int, chunk: int, device: torch.device
) -> list[Tensor]:
    """Top-k token ids at every position of every sequence: a list of long[len(seq), k] (CPU)."""
    out: list[Tensor] = []
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        input_ids, mask = _pad(part, pad_id, device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # (b, L, V)
        top = logits.topk(k, dim=-1).indices.cpu()
        out += [top[b, : len(x)] for b, x in enumerate(part)]
    return out


@torch.no_grad()
def _perplexity(model: Any, seqs: list[tuple[int, ...]], chunk: int, device: torch.device) -> Tensor:
    """MLM perplexity of each short token sequence, scored on its own (as the BPE ranking of BERT-Attack)."""
    out = []
    for i in range(0, len(seqs), chunk):
        part = [list(s) for s in seqs[i : i + chunk]]
        input_ids, mask = _pad(part, 0, device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        nll = F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")  # (b, L)
        out.append(torch.exp((nll * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out)
