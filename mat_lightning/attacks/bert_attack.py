"""BERT-Attack on captions, batched over the whole batch (Li et al., EMNLP 2020; as adapted by Co-Attack and SGA).

The algorithm of the VLP attack papers (reference-implementations.md §1-2, §6):

1. one masked-LM forward on the **unmasked** captions gives the top-k substitutes at every sub-word position;
2. word importance: each word replaced by ``[UNK]``, importance = KL(softmax(e(caption)) ‖ softmax(e(variant)))
   of the *target* text encoder's embeddings;
3. greedy by importance (stop words skipped): the candidates of the word are scored together with the current
   caption; the best one is kept if it beats the current caption; stop after ``max_words`` changes.

Candidates, as the references' ``get_substitues``: a one-sub-word word gets the MLM's top-k tokens at its position,
cut at the first whose raw logit is below ``threshold_pred_score`` (0.3; 0 disables); a word of several sub-words
gets the first 24 combinations (in product order) of the top-4 tokens per sub-word, ranked by MLM perplexity, each
turned back into text by the tokenizer (``tang ##erine`` -> ``tangerine``; ``top of`` keeps its space, so a
candidate may be two words, as in the references). Filtered out: the word itself, anything holding ``##``, stop
words and special tokens. Perplexity ranking is lazy: it runs only for the words the greedy search reaches (with one
word changed per caption, most captions stop at their first word), batched across captions.

Candidate scores (``objective``): ``image_cosine`` — lowest cosine to the caption's image embedding (SGA's
``img_guided_attack``), or ``embedding_kl`` — largest KL from the original caption's embedding (Co-Attack).

Why written here rather than taken from TextAttack: the reference code and TextAttack's recipe run one caption at a
time (>= 2 text-encoder forwards per caption plus MLM forwards per multi-sub-word word). Here every stage is
batched across captions: one MLM pass for all captions (chunked, sorted by length), one text-encoder pass for all
[UNK] variants, one perplexity pass and one text-encoder pass per greedy round for all captions. The
image-independent part (:meth:`BertAttack.prepare_captions`: tokenisation, MLM candidates, word ranking) is
computed once and shared when the same captions are attacked twice (SGA).

Offsets: HF tokenisers put ``[CLS]`` at position 0, so word ``j``'s sub-words sit one position after their index in
the word's sub-word list. We shift (as the original BERT-Attack does); ``legacy_offset=True`` reproduces only the
off-by-one of Co-Attack/SGA (candidates of word ``j`` read at the *previous* token).

``reference=True`` reproduces the published text attackers (Co-Attack's ``BertAttack.attack``, SGA's
``TextAttacker.img_guided_attack``) output for output, proven against their code by
``tests/fixtures/reference_attacks``: the off-by-one; the MLM reads ``[CLS] X`` with no ``[SEP]``, truncated to
``max_length`` tokens; words are skipped only when their first sub-word lies past ``max_length - 2`` (a word cut by
the truncation keeps the positions that remain); multi-sub-word words use their first 12 sub-words; their stop list
(:data:`~mat_lightning.attacks.reference.REFERENCE_STOP_WORDS`), matched exactly; candidates filtered only for the
word itself (exact), ``##`` and stop words (special tokens such as ``[UNK]`` stay candidates); word pieces joined as
their slow tokenizer does; and every text the text encoder reads during the attack is
:func:`~mat_lightning.attacks.reference.text_view` (BERT-tokenised at ``max_length``, decoded). Captions are taken
as given: the references clean them with ``pre_caption`` first, which the suites do for every row
(``robust_eval.caption_preprocess: pre_caption``).

Deliberate differences: candidates equal to the word up to case, and duplicates, are dropped (they cannot beat the
current caption under CLIP's lower-casing tokenizer); stop words are matched case-insensitively (the references
lower-case captions beforehand); words whose sub-words run past ``max_length`` are not attacked.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mat_lightning import progress
from mat_lightning.attacks.base import Attack, AttackResult
from mat_lightning.attacks.reference import REFERENCE_STOP_WORDS, join_pieces, text_view
from mat_lightning.attacks.stopwords import STOP_WORDS
from mat_lightning.attacks.store import CandidateStore, CaptionPlan, takes_token_ids
from mat_lightning.cache import corrupt_cache_hint, is_cached
from mat_lightning.errors import ConfigError, NonFiniteError, is_synthetic_name, unresolved_synthetic_name
from mat_lightning.models.encoder import VLEncoder, encoder_device, local_model, require_local_or_online

log = logging.getLogger(__name__)

TextObjective = Literal["image_cosine", "embedding_kl"]


class CandidateGenerator(Protocol):
    """Proposes substitutes for word ``j`` of a caption (e.g. a TextAttack transformation, see ``adapters``)."""

    def candidates(self, words: list[str], j: int, k: int) -> list[str]: ...


def resolve_mlm(spec: str) -> str:
    """A name in ``local_models`` -> its local copy; anything else (a hub name, a folder) passes through.

    ``synthetic[:<preset>]`` (the synthetic world's masked LM) is resolved to its folder by the ``mat`` CLI
    (:func:`mat_lightning.synthetic.resolve_config`); here it is an error.
    """
    spec = local_model(spec)
    if is_synthetic_name(spec):
        raise unresolved_synthetic_name("BertAttack mlm", spec, "ensure_mlm(<preset>)")
    return spec


@functools.lru_cache(maxsize=4)
def load_mlm(spec: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a HF masked LM given by hub name or local folder.

    Cached by spec: the attacks of a suite (BERT-Attack, Sep-Attack, Co-Attack, SGA) share one model in memory.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = resolve_mlm(spec)
    require_local_or_online(
        path,
        "the masked LM of BERT-Attack",
        "Give a local folder written by save_pretrained (e.g. huggingface-cli download bert-base-uncased "
        "--local-dir <folder> on a machine with network) as the attack's mlm, or 'synthetic' (in a mat config) for "
        "the synthetic world's MLM.",
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForMaskedLM.from_pretrained(path)
    # Broad on purpose: a missing folder, an unknown hub id or an offline hub raise OSError or ValueError, a
    # truncated weights file raises the safetensors or torch error of its format.
    except Exception as e:  # noqa: BLE001
        if is_cached(path):
            raise ConfigError(corrupt_cache_hint(path)) from None
        raise ConfigError(
            f"could not load the masked LM {spec!r} ({e.__class__.__name__}: {(str(e).splitlines() or [''])[0]}). "
            "Offline, or an incomplete folder? Give a complete local folder written by save_pretrained, or "
            "'synthetic' (in a mat config) for the synthetic world's MLM."
        ) from None
    return model.eval(), tokenizer


@dataclass
class PreparedCaptions:
    """The image-independent part of the attack on a batch of captions (reusable: SGA attacks the same captions
    twice, guided by different images).

    Attributes:
        captions: the T original captions.
        orig_emb: float[T, D] their embeddings.
        words: per caption, its words (split on single spaces, as the references do).
        order: per caption, the attackable words, most important first.
        candidates: per caption, word index -> substitutes; filled lazily for multi-sub-word words.
        combos: per caption, word index -> sub-word id combinations awaiting perplexity ranking.
        variant_words: per caption, the words whose importance is measured (their ``[UNK]`` variant encoded).
        plan: the candidate store's entries of these captions (:mod:`~mat_lightning.attacks.store`), if any.
        use_ids: whether texts are encoded from the plan's token ids (the encoder takes them).
    """

    captions: list[str]
    orig_emb: Tensor
    words: list[list[str]]
    order: list[list[int]]
    candidates: list[dict[int, list[str]]]
    combos: list[dict[int, list[tuple[int, ...]]]]
    variant_words: list[list[int]] = field(default_factory=list)
    plan: CaptionPlan | None = None
    use_ids: bool = False

    def row(self, table: dict, key: Any) -> int | None:
        """The plan's row of ``key`` in ``table`` when the encoder reads the plan's token ids, else None."""
        return table.get(key) if self.use_ids else None


class BertAttack(Attack):
    """Batched BERT-Attack.

    Args:
        mlm: masked LM: a hub name (``bert-base-uncased``) or a local folder (in a ``mat`` config also ``synthetic``,
            the synthetic world's, which the CLI resolves to its folder).
        top_k: substitutes per one-sub-word word (10 in Co-Attack/SGA).
        max_words: words changed at most per caption (1 in Co-Attack/SGA).
        objective: ``image_cosine`` (SGA) or ``embedding_kl`` (Co-Attack).
        max_length: sub-words given to the MLM, ``[CLS]``/``[SEP]`` included (77 as the CLIP references; words
            beyond are not attacked).
        threshold_pred_score: one-sub-word candidates stop at the first raw MLM logit below it (references: 0.3;
            0 disables).
        legacy_offset: reproduce the Co-Attack/SGA off-by-one (candidates from the previous token's position).
        reference: reproduce the published Co-Attack/SGA text attack exactly (module docstring); implies
            ``legacy_offset``, and the references' stop list unless ``stop_words`` is given. Co-Attack runs it at
            ``max_length=30``, SGA at 77.
        bpe_top, bpe_max_combinations, max_subwords: multi-sub-word words: top tokens per sub-word, combinations
            kept (in product order) and ranked by perplexity, all proposed (references: 4, 24), and the longest
            word attempted.
        stop_words: words never replaced nor proposed (default: :data:`~mat_lightning.attacks.stopwords.STOP_WORDS`).
        unk_token: the string that replaces a word when measuring its importance.
        candidate_generator: propose substitutes another way instead of the MLM: a thesaurus's synonyms
            (:class:`~mat_lightning.attacks.candidates.ThesaurusCandidates`) or a TextAttack transformation.
        text_batch_size, mlm_batch_size: chunk sizes of the batched forwards.
        name: the row label (default ``bert_attack``; see :class:`~mat_lightning.attacks.base.Attack`).
    """

    name = "bert_attack"
    modality = "text"

    def __init__(
        self,
        mlm: str = "bert-base-uncased",
        top_k: int = 10,
        max_words: int = 1,
        objective: TextObjective = "image_cosine",
        max_length: int = 77,
        threshold_pred_score: float = 0.3,
        legacy_offset: bool = False,
        reference: bool = False,
        bpe_top: int = 4,
        bpe_max_combinations: int = 24,
        max_subwords: int = 12,
        stop_words: list[str] | None = None,
        unk_token: str = "[UNK]",
        candidate_generator: CandidateGenerator | None = None,
        text_batch_size: int = 1024,
        mlm_batch_size: int = 128,
        seed: int | None = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(seed, name)
        if is_synthetic_name(mlm):
            raise unresolved_synthetic_name("BertAttack mlm", mlm, "ensure_mlm(<preset>)")
        if objective not in ("image_cosine", "embedding_kl"):
            raise ConfigError(f"BertAttack objective={objective!r}; choose image_cosine or embedding_kl")
        if top_k < 1 or max_words < 0 or max_length < 3 or bpe_top < 1 or bpe_max_combinations < 1:
            raise ConfigError(
                f"BertAttack needs top_k >= 1, max_words >= 0, max_length >= 3, bpe_top >= 1, "
                f"bpe_max_combinations >= 1 (got {top_k}, {max_words}, {max_length}, {bpe_top}, "
                f"{bpe_max_combinations})"
            )
        self.mlm, self.top_k, self.max_words, self.objective = mlm, top_k, max_words, objective
        if reference and candidate_generator is not None:
            raise ConfigError(
                "BertAttack reference=True reproduces the MLM attack: it takes no candidate_generator"
            )
        self.max_length, self.legacy_offset, self.reference = (
            max_length,
            legacy_offset or reference,
            reference,
        )
        self.threshold_pred_score = float(threshold_pred_score)
        self.bpe_top, self.bpe_max_combinations, self.max_subwords = (
            bpe_top,
            bpe_max_combinations,
            max_subwords,
        )
        if stop_words is not None:
            self.stop_words = frozenset(w if reference else w.lower() for w in stop_words)
        else:
            self.stop_words = REFERENCE_STOP_WORDS if reference else STOP_WORDS
        self.unk_token = unk_token
        self.candidate_generator = candidate_generator
        self.text_batch_size, self.mlm_batch_size = text_batch_size, mlm_batch_size
        self._mlm: tuple[Any, Any] | None = None
        self._special: frozenset[str] = frozenset()
        self._store: CandidateStore | None = None  # attach_store(); looked up for every batch
        self._plan: CaptionPlan | None = None  # a batch's entries prepared by the DataLoader (planned())

    def as_reference(self, max_length: int) -> BertAttack:
        """A copy in reference mode at ``max_length`` (the references' stop list unless custom stop words were set)."""
        other = copy.copy(self)
        other.reference = other.legacy_offset = True
        other.max_length = max_length
        if self.stop_words is STOP_WORDS:
            other.stop_words = REFERENCE_STOP_WORDS
        if self.candidate_generator is not None:
            raise ConfigError(
                "reference mode reproduces the MLM attack: its text attack takes no candidate_generator"
            )
        return other

    def with_max_words(self, max_words: int) -> BertAttack:
        other = self.clone()
        other.max_words = int(max_words)
        return other

    @classmethod
    def from_mlm(cls, model: Any, tokenizer: Any, **kwargs: Any) -> BertAttack:
        """An attack around an already loaded masked LM (tests, notebooks)."""
        attack = cls(mlm="<in-memory>", **kwargs)
        attack._mlm = (model.eval(), tokenizer)
        return attack

    #: Settings read only when the masked LM proposes the substitutes.
    MLM_SETTINGS = (
        "mlm",
        "max_length",
        "threshold_pred_score",
        "legacy_offset",
        "bpe_top",
        "bpe_max_combinations",
        "max_subwords",
        "mlm_batch_size",
    )

    def unused_settings(self) -> tuple[str, ...]:
        """The settings this attack never reads: the MLM's when a ``candidate_generator`` proposes substitutes
        (``results.json`` records the settings an attack really used)."""
        return self.MLM_SETTINGS if self.candidate_generator is not None else ()

    # -- the candidate store (attacks/store.py) ------------------------------------------------------------------------

    def store_settings(self) -> dict[str, Any]:
        """The settings that shape the model-independent work (a candidate store's key): not ``max_words``,
        ``objective`` or the batch sizes, which a store serves whatever their values."""
        stop = hashlib.sha256("\n".join(sorted(self.stop_words)).encode()).hexdigest()[:16]
        return {
            "top_k": self.top_k,
            "max_length": self.max_length,
            "threshold_pred_score": self.threshold_pred_score,
            "legacy_offset": self.legacy_offset,
            "reference": self.reference,
            "bpe_top": self.bpe_top,
            "bpe_max_combinations": self.bpe_max_combinations,
            "max_subwords": self.max_subwords,
            "stop_words": stop,
            "unk_token": self.unk_token,
        }

    def mlm_identity(self) -> str | None:
        """What identifies the masked LM: the content hash of a local folder's files, or a hub name with the
        revision loaded; None for a model given in memory (:meth:`from_mlm`)."""
        if self.mlm == "<in-memory>":
            return None
        path = resolve_mlm(self.mlm)
        if Path(path).is_dir():
            return _folder_sha256(str(Path(path).resolve()))
        model, _ = self.mlm_and_tokenizer(torch.device("cpu"))
        return f"{self.mlm}@{getattr(model.config, '_commit_hash', None)}"

    def attach_store(self, store: CandidateStore | None) -> None:
        """Look captions up in ``store`` (built for this attack's settings) instead of running the MLM on them."""
        if store is not None and store.meta["settings"] != self.store_settings():
            raise ConfigError(f"{self.name}: {store} was built for other attack settings")
        self._store = store

    @property
    def store(self) -> CandidateStore | None:
        """The attached candidate store (None: every caption is prepared on the fly)."""
        return self._store

    @contextmanager
    def planned(self, plan: CaptionPlan | None) -> Iterator[None]:
        """Within the block, captions are prepared from ``plan`` (the store's entries a DataLoader worker looked
        up for this batch) when it holds them."""
        previous, self._plan = self._plan, plan
        try:
            yield
        finally:
            self._plan = previous

    def _plan_for(self, captions: list[str]) -> CaptionPlan | None:
        if (
            self._plan is not None
            and self._plan.captions == captions
            and (self.store is None or self._plan.key == self.store.key)
        ):
            return self._plan
        return self.store.plan(captions) if self.store is not None else None

    def variant_text(self, words: list[str], j: int) -> str:
        """The caption with word ``j`` replaced by the unknown token (its importance probe)."""
        return " ".join(words[:j] + [self.unk_token] + words[j + 1 :])

    @staticmethod
    def candidate_text(words: list[str], j: int, substitute: str) -> str:
        """The caption with word ``j`` replaced by ``substitute``."""
        left, right = " ".join(words[:j]), " ".join(words[j + 1 :])
        return " ".join(p for p in (left, substitute, right) if p)

    def encoder_view(self, texts: Sequence[str], device: torch.device | str = "cpu") -> list[str]:
        """The texts as the text encoder reads them: as given, or in reference mode their
        :func:`~mat_lightning.attacks.reference.text_view`."""
        if not self.reference:
            return list(texts)
        return text_view(self.mlm_and_tokenizer(torch.device(device))[1], texts, self.max_length)

    def candidate_entries(
        self, captions: list[str], device: torch.device | str
    ) -> tuple[list[list[str]], list[list[int]], list[dict[int, list[str]]]]:
        """The model-independent work on ``captions``, done eagerly (a store's build): per caption its words, the
        words whose importance is measured, and each such word's substitutes in rank order."""
        words = [c.split(" ") for c in captions]
        candidates: list[dict[int, list[str]]] = [{} for _ in captions]
        combos: list[dict[int, list[tuple[int, ...]]]] = [{} for _ in captions]
        self._mlm_candidates(words, candidates, combos, torch.device(device))
        variants = [_variant_words(c, k, len(ws)) for c, k, ws in zip(candidates, combos, words, strict=True)]
        pending = [(t, j) for t, k in enumerate(combos) for j in sorted(k)]
        if pending:
            self._rank_combinations(words, candidates, combos, pending)
        return (
            words,
            variants,
            [{j: c.get(j, []) for j in v} for c, v in zip(candidates, variants, strict=True)],
        )

    def prepare(self, device: torch.device | str) -> None:
        if self.candidate_generator is None:
            self.mlm_and_tokenizer(torch.device(device))

    def mlm_and_tokenizer(self, device: torch.device) -> tuple[Any, Any]:
        if self._mlm is None:
            self._mlm = load_mlm(self.mlm)
        model, tok = self._mlm
        if not self._special:  # computed once: a tokenizer's all_special_tokens is rebuilt on every access
            self._special = frozenset(tok.all_special_tokens)
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
    def encode(self, encoder: VLEncoder, texts: Sequence[str], view_length: int | None = None) -> Tensor:
        """float32[T, D] text embeddings in chunks of ``text_batch_size`` (fp32 even under a bf16 autocast).

        In reference mode the encoder reads the references' :func:`~mat_lightning.attacks.reference.text_view` of
        the texts at ``view_length`` BERT tokens (default ``max_length``).
        """
        if not texts:
            return torch.empty(0)
        if self.reference:
            texts = text_view(
                self.mlm_and_tokenizer(encoder_device(encoder))[1], texts, view_length or self.max_length
            )
        return torch.cat(
            [
                encoder.encode_text(texts[i : i + self.text_batch_size]).float()
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
        prepared: PreparedCaptions | None = None,
    ) -> list[str]:
        """Adversarial versions of ``captions``.

        Args:
            captions: T strings; txt2img: long[T] row of each caption's image in ``image_emb``.
            objective: how candidates are scored (``image_cosine`` needs ``image_emb``).
            image_emb: float[B, D] L2-normalised embeddings of the guiding images (clean or adversarial).
            prepared: :meth:`prepare_captions` of these captions with this encoder, to reuse it.
        """
        if self.max_words == 0 or not captions:
            return list(captions)
        prep = prepared if prepared is not None else self.prepare_captions(encoder, captions)
        if prep.captions != list(captions):
            raise ValueError("BertAttack.perturb: `prepared` was computed for other captions")
        orig_emb = prep.orig_emb
        guide = image_emb[txt2img.to(image_emb.device)].float() if objective == "image_cosine" else None

        words = [list(w) for w in prep.words]
        current = list(captions)
        current_emb = orig_emb.clone()  # embedding of each current caption: candidate 0 is never re-encoded
        changes, cursor = [0] * len(captions), [0] * len(captions)
        while True:
            active = [t for t in range(len(captions)) if changes[t] < self.max_words]
            # a caption is done when its budget is spent or its words run out (a bar over long batches moves)
            done = len(captions) - sum(cursor[t] < len(prep.order[t]) for t in active)
            progress.step(done, len(captions), "captions")
            self._advance_to_words_with_candidates(prep, active, cursor)
            # One greedy round for every caption that still has budget and words: its next word's candidates.
            texts: list[str | None] = []
            rows: list[int | None] = []
            owners, subs, keep_rows = [], [], []
            for t in active:
                if cursor[t] >= len(prep.order[t]):
                    continue
                j = prep.order[t][cursor[t]]
                keep_rows.append(len(owners))  # candidate 0: keep the current caption
                owners.append(t)
                subs.append((j, None))
                # stored ids hold the one-word changes of the original caption
                start = prep.row(prep.plan.candidate_row, (t, j)) if changes[t] == 0 and prep.plan else None
                for k, cand in enumerate(prep.candidates[t][j]):
                    if start is None:
                        texts.append(self.candidate_text(words[t], j, cand))
                        rows.append(None)
                    else:
                        texts.append(None)
                        rows.append(start + k)
                    owners.append(t)
                    subs.append((j, cand))
            if not owners:
                break
            owner = torch.tensor(owners, device=current_emb.device)
            is_keep = torch.zeros(len(owners), dtype=torch.bool, device=owner.device)
            is_keep[keep_rows] = True
            emb = current_emb[owner]
            if texts:
                emb[~is_keep] = self._encode(encoder, prep, texts, rows).to(emb.device)
            if objective == "image_cosine":
                score = -(emb * guide.to(emb.device)[owner]).sum(dim=-1)
            else:
                score = _kl_rows(emb, orig_emb.to(emb.device)[owner])
            if not bool(
                torch.isfinite(score).all()
            ):  # NaN never wins an argmax: no candidate could be chosen
                raise NonFiniteError(
                    f"{self.name}: candidate scores are NaN or infinite (the encoder's embeddings are not finite); "
                    "check the model's weights"
                )
            for t, idx in _segment_argmax(score, owner, len(captions)).items():
                j, cand = subs[idx]
                if cand is not None:
                    words[t][j] = cand
                    current[t] = " ".join(words[t])
                    current_emb[t] = emb[idx]
                    changes[t] += 1
                cursor[t] += 1
        return current

    @torch.no_grad()
    def prepare_captions(self, encoder: VLEncoder, captions: list[str]) -> PreparedCaptions:
        """Words, candidates and word importance of ``captions``.

        Captions the candidate store holds (a DataLoader worker's plan of the batch, or the attached store) take
        their words' substitutes and token ids from it; the others are split into words and sub-words and get MLM
        candidates (one batched pass). Then the embeddings of the captions and of their ``[UNK]`` variants (word
        importance, one encoder pass).
        """
        device = encoder_device(encoder)  # a duck-typed encoder may have no parameters (DESIGN §4)
        plan = self._plan_for(captions)
        words = [c.split(" ") for c in captions]
        candidates: list[dict[int, list[str]]] = [{} for _ in captions]
        combos: list[dict[int, list[tuple[int, ...]]]] = [{} for _ in captions]
        variant_words: list[list[int]] = [[] for _ in captions]
        found = plan.found if plan is not None else [False] * len(captions)
        for t in range(len(captions)):
            if found[t]:
                candidates[t] = dict(plan.candidates[t])
                variant_words[t] = plan.variant_words[t]
        missing = [t for t in range(len(captions)) if not found[t]]
        if missing:
            sub_words = [words[t] for t in missing]
            sub_cands: list[dict[int, list[str]]] = [{} for _ in missing]
            sub_combos: list[dict[int, list[tuple[int, ...]]]] = [{} for _ in missing]
            if self.candidate_generator is not None:
                for i, ws in enumerate(sub_words):
                    for j, w in enumerate(ws):
                        if self._attackable(w):
                            sub_cands[i][j] = self._filter(
                                w, self.candidate_generator.candidates(ws, j, self.top_k)
                            )
            else:
                self._mlm_candidates(sub_words, sub_cands, sub_combos, device)
            for i, t in enumerate(missing):
                candidates[t], combos[t] = sub_cands[i], sub_combos[i]
                variant_words[t] = _variant_words(sub_cands[i], sub_combos[i], len(words[t]))
        use_ids = plan is not None and plan.ids is not None and takes_token_ids(encoder)
        prep = PreparedCaptions(
            list(captions),
            torch.empty(0),
            words,
            [[] for _ in captions],
            candidates,
            combos,
            variant_words,
            plan,
            use_ids,
        )
        prep.orig_emb = self._encode(
            encoder,
            prep,
            list(captions),
            [prep.row(plan.caption_row, t) if plan else None for t in range(len(captions))],
        )
        self._rank_words(encoder, prep)
        return prep

    def _encode(
        self, encoder: VLEncoder, prep: PreparedCaptions, texts: list[str | None], rows: list[int | None]
    ) -> Tensor:
        """float32[T, D] embeddings of ``texts``; a text given as None is row ``rows[i]`` of the plan's token ids.

        With token ids the encoder gets, chunk by chunk, exactly the ids ``encode`` would tokenise (the store holds
        the tokenizer's output), so the embeddings are the same.
        """
        if not prep.use_ids or all(r is None for r in rows):
            return self.encode(encoder, texts)
        plan = prep.plan
        width = plan.context_length
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        stored = [i for i, r in enumerate(rows) if r is not None]
        part = plan.ids[torch.tensor([rows[i] for i in stored])]
        ids[torch.tensor(stored), : part.shape[1]] = part
        fresh = [i for i, r in enumerate(rows) if r is None]
        if fresh:
            view = self.encoder_view([texts[i] for i in fresh], encoder_device(encoder))
            ids[torch.tensor(fresh)] = encoder.tokenize(view).cpu()
        device = encoder_device(encoder)
        return torch.cat(
            [
                encoder.encode_text_ids(ids[i : i + self.text_batch_size].to(device)).float()
                for i in range(0, len(texts), self.text_batch_size)
            ]
        )

    def _mlm_candidates(
        self,
        words: list[list[str]],
        candidates: list[dict[int, list[str]]],
        combos: list[dict[int, list[tuple[int, ...]]]],
        device: torch.device,
    ) -> None:
        """One-sub-word words' candidates now; multi-sub-word words' combinations for lazy perplexity ranking."""
        model, tok = self.mlm_and_tokenizer(device)
        flat = [w for ws in words for w in ws]
        pieces_flat = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        ids, spans, pos = [], [], 0
        for ws in words:
            sub_ids: list[int] = []
            keys = []
            for pieces in pieces_flat[pos : pos + len(ws)]:
                keys.append((len(sub_ids), len(sub_ids) + len(pieces)))
                sub_ids += pieces
            pos += len(ws)
            if self.reference:  # the ALBEF tokenizer of the references: [CLS] X, no [SEP]
                ids.append([tok.cls_token_id] + sub_ids[: self.max_length - 1])
            else:
                ids.append([tok.cls_token_id] + sub_ids[: self.max_length - 2] + [tok.sep_token_id])
            spans.append(keys)
        n_top = max(self.top_k, self.bpe_top)
        top_ids, top_logits = _mlm_topk(model, tok, ids, n_top, self.mlm_batch_size, device)  # (T, L, n_top)
        offset = 0 if self.legacy_offset else 1
        single: list[tuple[int, int, int]] = []  # (caption, word, position) of one-sub-word words
        for t, keys in enumerate(spans):
            for j, (start, end) in enumerate(keys):
                if not self._attackable(words[t][j]):
                    continue
                if (
                    self.reference
                ):  # skipped only past max_length - 2; cut at the sequence end; first 12 pieces
                    if start > self.max_length - 2 or start == end:
                        continue
                    end = min(end, self.max_length, start + self.max_subwords)
                elif end > self.max_length - 2 or end - start > self.max_subwords:
                    continue
                if end - start == 1:
                    single.append((t, j, start + offset))
                else:  # predictions at the word's sub-word positions; combinations in product order
                    per_position = top_ids[t, start + offset : end + offset, : self.bpe_top].tolist()
                    combos[t][j] = list(
                        itertools.islice(itertools.product(*per_position), self.bpe_max_combinations)
                    )
        if not single:
            return
        where = torch.tensor(single)
        rows = top_ids[where[:, 0], where[:, 2], : self.top_k]  # (n, top_k)
        if self.threshold_pred_score != 0:  # cut each list at its first logit below the threshold
            above = top_logits[where[:, 0], where[:, 2], : self.top_k] >= self.threshold_pred_score
            keep = above.long().cumprod(dim=1).sum(dim=1).tolist()
        else:
            keep = [self.top_k] * len(single)
        tokens = tok.convert_ids_to_tokens(rows.flatten().tolist())
        for i, ((t, j, _), n) in enumerate(zip(single, keep, strict=True)):
            candidates[t][j] = self._filter(words[t][j], tokens[i * self.top_k : i * self.top_k + n])

    def _advance_to_words_with_candidates(
        self, prep: PreparedCaptions, active: list[int], cursor: list[int]
    ) -> None:
        """Move each active caption's cursor to its next word with candidates, ranking combinations on the way.

        Words without candidates are skipped (as the references ``continue``); the perplexity ranking of the
        multi-sub-word words reached runs batched across captions.
        """
        while True:
            pending: list[tuple[int, int]] = []
            for t in active:
                while cursor[t] < len(prep.order[t]):
                    j = prep.order[t][cursor[t]]
                    found = prep.candidates[t].get(j)
                    if found is None:
                        pending.append((t, j))
                        break
                    if found:
                        break
                    cursor[t] += 1
            if not pending:
                return
            self._rank_combinations(prep.words, prep.candidates, prep.combos, pending)

    def _rank_combinations(
        self,
        words: list[list[str]],
        candidates: list[dict[int, list[str]]],
        combos: list[dict[int, list[tuple[int, ...]]]],
        pending: list[tuple[int, int]],
    ) -> None:
        """Candidates of multi-sub-word words: their combinations ranked by MLM perplexity (one batched pass)."""
        model, tok = self._mlm
        device = next(model.parameters()).device
        flat = [c for t, j in pending for c in combos[t][j]]
        ppl = _perplexity(model, flat, self.mlm_batch_size, device)
        pos = 0
        for t, j in pending:
            word_combos = combos[t].pop(j)
            scores = ppl[pos : pos + len(word_combos)]
            pos += len(word_combos)
            ranked = [word_combos[i] for i in torch.argsort(scores, stable=True).tolist()]
            tokens = tok.convert_ids_to_tokens([i for c in ranked for i in c])  # one call for the word
            width = len(ranked[0])  # every combination of a word has one token per sub-word
            join = join_pieces if self.reference else tok.convert_tokens_to_string
            texts = [join(tokens[k : k + width]) for k in range(0, len(tokens), width)]
            candidates[t][j] = self._filter(words[t][j], texts)

    def _attackable(self, word: str) -> bool:
        if self.reference:
            return word not in self.stop_words
        return bool(word) and word.lower() not in self.stop_words

    def _filter(self, word: str, candidates: list[str]) -> list[str]:
        """Drop empty strings, sub-word pieces, special tokens, stop words, the word itself and duplicates.

        Reference mode drops only the word itself (exact), anything holding ``##`` and stop words (exact).
        """
        if self.reference:
            return [c for c in candidates if c != word and "##" not in c and c not in self.stop_words]
        special, stop, lowered = self._special, self.stop_words, word.lower()
        out: list[str] = []
        for c in candidates:
            c = c.strip()
            if not c or "##" in c or c in special or c.lower() == lowered or c.lower() in stop or c in out:
                continue
            out.append(c)
        return out

    def _rank_words(self, encoder: VLEncoder, prep: PreparedCaptions) -> None:
        """Importance of every attackable word with (possible) candidates: KL of the embedding when it becomes
        ``[UNK]``. Sets ``prep.order``."""
        variants: list[str | None] = []
        rows: list[int | None] = []
        where = []
        for t, ws in enumerate(prep.words):
            for j in prep.variant_words[t]:
                row = prep.row(prep.plan.variant_row, (t, j)) if prep.plan else None
                variants.append(self.variant_text(ws, j) if row is None else None)
                rows.append(row)
                where.append((t, j))
        if not variants:
            return
        emb = self._encode(encoder, prep, variants, rows)
        rows = torch.tensor([t for t, _ in where], device=emb.device)
        importance = _kl_rows(emb, prep.orig_emb.to(emb.device)[rows])
        by_caption: dict[int, list[tuple[float, int]]] = {}
        for (t, j), s in zip(where, importance.tolist(), strict=True):
            by_caption.setdefault(t, []).append((s, j))
        for t, scored in by_caption.items():
            prep.order[t] = [j for _, j in sorted(scored, key=lambda x: (-x[0], x[1]))]


def _variant_words(candidates: dict[int, list[str]], combos: dict[int, Any], n_words: int) -> list[int]:
    """The words whose importance is measured: those with substitutes or with combinations still to rank."""
    return [j for j in range(n_words) if candidates.get(j) or j in combos]


@functools.lru_cache(maxsize=8)
def _folder_sha256(folder: str) -> str:
    """Content hash of the files of a model folder (names and bytes, hidden files skipped)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            h.update(str(path.relative_to(folder)).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def _kl_rows(emb: Tensor, target: Tensor) -> Tensor:
    """Per row KL(softmax(target) ‖ softmax(emb)), the references' ``KLDivLoss(log_softmax(emb), softmax(tgt))``."""
    return F.kl_div(F.log_softmax(emb.float(), -1), F.softmax(target.float(), -1), reduction="none").sum(-1)


def _segment_argmax(score: Tensor, owner: Tensor, n: int) -> dict[int, int]:
    """For every owner present, the flat index of its highest score (the first one on ties)."""
    best_score = torch.full((n,), float("-inf"), device=score.device).scatter_reduce(0, owner, score, "amax")
    index = torch.arange(len(score), device=score.device)
    candidates = torch.where(score == best_score[owner], index, torch.full_like(index, len(score)))
    first = torch.full((n,), len(score), device=score.device, dtype=torch.long).scatter_reduce(
        0, owner, candidates, "amin"
    )
    present = torch.unique(owner)
    return dict(zip(present.tolist(), first[present].tolist(), strict=True))


def _pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """long[n, width] ids right-padded with ``pad_id`` and their attention mask, built with one tensor copy."""
    lengths = torch.tensor([len(x) for x in ids])
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] < lengths[:, None]
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    input_ids[mask] = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)
    return input_ids, mask.long()


@torch.no_grad()
def _mlm_topk(
    model: Any, tok: Any, ids: list[list[int]], k: int, chunk: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Top-k token ids and their raw logits at every position: long[n, L, k] and float[n, L, k] on the CPU
    (``L`` the longest sequence; rows past a sequence's end are padding). Sequences run sorted by length, so the
    chunks carry little padding."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(x) for x in ids)
    top_ids = torch.zeros(len(ids), width, k, dtype=torch.long)
    top_logits = torch.zeros(len(ids), width, k)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for i in range(0, len(ids), chunk):
        rows = order[i : i + chunk]
        input_ids, mask = _pad([ids[r] for r in rows], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (b, l, V)
        top = logits.float().topk(k, dim=-1)
        rows_t = torch.tensor(rows)
        top_ids[rows_t, : input_ids.shape[1]] = top.indices.cpu()
        top_logits[rows_t, : input_ids.shape[1]] = top.values.cpu()
    return top_ids, top_logits


@torch.no_grad()
def _perplexity(model: Any, seqs: list[tuple[int, ...]], chunk: int, device: torch.device) -> Tensor:
    """MLM perplexity of each short token sequence, scored on its own (as the BPE ranking of BERT-Attack): float[n]."""
    out = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for i in range(0, len(seqs), chunk):
        rows = order[i : i + chunk]
        input_ids, mask = _pad([seqs[r] for r in rows], 0)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (b, L, V)
        nll = F.cross_entropy(logits.flatten(0, 1), input_ids.flatten(), reduction="none").view(
            input_ids.shape
        )
        out[torch.tensor(rows)] = torch.exp((nll * mask).sum(1) / mask.sum(1)).cpu()
    return out
