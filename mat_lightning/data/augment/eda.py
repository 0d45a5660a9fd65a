"""EDA, Easy Data Augmentation for text (Wei & Zou, EMNLP 2019, arXiv 1901.11196): the text->text augmentation of
MAT+ (DESIGN §2 "1:N").

Four operations, each producing a new sentence from one caption:

* **synonym replacement (SR)**: ``n = max(1, round(alpha_sr * len(words)))`` words that have synonyms (and are no
  stop words) are each replaced by a random synonym;
* **random insertion (RI)**: ``n`` times, a random synonym of a random word is inserted at a random position;
* **random swap (RS)**: ``n`` times, two random words swap places;
* **random deletion (RD)**: each word is removed with probability ``p_rd``.

Like the reference code (``jasonwei20/eda_nlp``), each augmented sentence uses **one** operation. Deliberate
differences: SR changes ``n`` word *positions* (the reference replaces every occurrence of a chosen word, which can
change more than ``n`` words); synonyms are single words only (so a word count means the same before and after);
punctuation stays attached to its word and the caption is not lower-cased (the reference strips both); and deletion
never returns an empty caption (it keeps one random word).

The thesaurus is pluggable: NLTK's WordNet, or a JSON file ``{word: [synonym, ...]}`` such as the synthetic world's
``thesaurus.json`` (in a ``mat`` config ``thesaurus: synthetic``, the default, which the CLI resolves to that file).
"""

from __future__ import annotations

import random
import string

from mat_lightning.data.thesaurus import load_thesaurus
from mat_lightning.errors import ConfigError

# Function words never replaced or used as insertion seeds: WordNet has "synonyms" for some of them ("in" -> "inch",
# "a" -> "angstrom") that would only add noise. Spatial words (above, below, over, under) are left out on purpose:
# their synonyms keep the caption's meaning and the synthetic thesaurus knows them.
STOP_WORDS: frozenset[str] = frozenset(
    """a an the and or but nor so yet of in on at to by for from with without into onto off out up down
    as than then there here this that these those it its is are was were be been being am has have had having do
    does did doing i me my we our you your he him his she her they them their what which who whom whose when where
    why how all any both each few more most other some such no not only own same too very can will just should now
    s t""".split()
)


def _split_punct(token: str) -> tuple[str, str, str]:
    """``"circle,"`` -> ``("", "circle", ",")``: the word and the punctuation around it."""
    core = token.strip(string.punctuation)
    if not core:
        return token, "", ""
    start = token.index(core)
    return token[:start], core, token[start + len(core) :]


class EDA:
    """Easy Data Augmentation of one caption with one randomly chosen operation.

    Args:
        alpha_sr: synonym replacement rate; ``max(1, round(alpha_sr * n_words))`` words are replaced. 0 disables.
        alpha_ri: random insertion rate; that many synonyms are inserted. 0 disables.
        alpha_rs: random swap rate; that many pairs of words are swapped. 0 disables.
        p_rd: random deletion probability of each word. 0 disables.
        thesaurus: ``wordnet`` (NLTK's WordNet; needs ``python -m nltk.downloader wordnet``) or the path of a JSON
            file ``{word: [synonym, ...]}``; in a ``mat`` config also ``synthetic`` (the default: the data's world's
            ``thesaurus.json``, resolved by the CLI).
        stop_words: words never replaced or used to pick an insertion (lower case); default: a short English
            list of function words (:data:`STOP_WORDS`).

    Raises:
        ConfigError: a rate outside [0, 1], all rates zero, or ``wordnet`` without its corpus.
        DataError: the thesaurus file is missing or malformed.
    """

    def __init__(
        self,
        alpha_sr: float = 0.1,
        alpha_ri: float = 0.1,
        alpha_rs: float = 0.1,
        p_rd: float = 0.1,
        thesaurus: str = "synthetic",
        stop_words: list[str] | None = None,
    ) -> None:
        rates = {"alpha_sr": alpha_sr, "alpha_ri": alpha_ri, "alpha_rs": alpha_rs, "p_rd": p_rd}
        for name, value in rates.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"eda.{name}={value}: must be in [0, 1]")
        if not any(rates.values()):
            raise ConfigError("eda: every rate is 0, so EDA would never change a caption; set at least one")
        self.alpha_sr, self.alpha_ri, self.alpha_rs, self.p_rd = alpha_sr, alpha_ri, alpha_rs, p_rd
        self.thesaurus_name = thesaurus
        self.thesaurus = load_thesaurus(thesaurus, "eda thesaurus")
        self.stop_words = STOP_WORDS if stop_words is None else frozenset(w.lower() for w in stop_words)
        ops = [
            (self.alpha_sr, self.synonym_replacement),
            (self.alpha_ri, self.random_insertion),
            (self.alpha_rs, self.random_swap),
            (self.p_rd, self.random_deletion),
        ]
        self._ops = [op for rate, op in ops if rate > 0]

    def __repr__(self) -> str:
        return (
            f"EDA(alpha_sr={self.alpha_sr}, alpha_ri={self.alpha_ri}, alpha_rs={self.alpha_rs}, "
            f"p_rd={self.p_rd}, thesaurus={self.thesaurus_name!r})"
        )

    def __call__(self, caption: str, rng: random.Random) -> str:
        """One augmented variant of ``caption`` by one operation drawn uniformly among the enabled ones.

        An operation that finds nothing to change (no word with synonyms, one word to swap) returns the caption
        unchanged, as in the reference. The result is never empty when ``caption`` is not.
        """
        words = caption.split()
        if not words:
            return caption
        op = self._ops[rng.randrange(len(self._ops))]
        return " ".join(op(words, rng))

    # -- the four operations, on a list of whitespace tokens -------------------------------------------------------

    @staticmethod
    def n_changes(alpha: float, n_words: int) -> int:
        """Words an operation with rate ``alpha`` changes in a sentence of ``n_words`` words."""
        return max(1, round(alpha * n_words))

    def synonyms(self, token: str) -> list[str]:
        """Synonyms of a token's word (punctuation stripped, lower case); none for stop words."""
        word = _split_punct(token)[1].lower()
        if not word or word in self.stop_words:
            return []
        return self.thesaurus.synonyms(word)

    def synonym_replacement(self, words: list[str], rng: random.Random) -> list[str]:
        out = list(words)
        candidates = [i for i, w in enumerate(words) if self.synonyms(w)]
        rng.shuffle(candidates)
        for i in candidates[: self.n_changes(self.alpha_sr, len(words))]:
            pre, core, post = _split_punct(words[i])
            syn = rng.choice(self.synonyms(words[i]))
            out[i] = pre + (syn.capitalize() if core[:1].isupper() else syn) + post
        return out

    def random_insertion(self, words: list[str], rng: random.Random) -> list[str]:
        out = list(words)
        seeds = [w for w in words if self.synonyms(w)]
        if not seeds:
            return out
        for _ in range(self.n_changes(self.alpha_ri, len(words))):
            syn = rng.choice(self.synonyms(rng.choice(seeds)))
            out.insert(rng.randint(0, len(out)), syn)
        return out

    def random_swap(self, words: list[str], rng: random.Random) -> list[str]:
        out = list(words)
        if len(out) < 2:
            return out
        for _ in range(self.n_changes(self.alpha_rs, len(words))):
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        return out

    def random_deletion(self, words: list[str], rng: random.Random) -> list[str]:
        if len(words) == 1:
            return list(words)
        out = [w for w in words if rng.random() >= self.p_rd]
        return out or [rng.choice(words)]  # never an empty caption
