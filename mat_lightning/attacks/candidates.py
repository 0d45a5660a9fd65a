"""Substitute generators for :class:`~mat_lightning.attacks.bert_attack.BertAttack`'s search (``candidate_generator``).

:class:`ThesaurusCandidates` proposes a word's thesaurus synonyms only: a **meaning-preserving** substitution, so the
attack measures whether a model keeps its recall when a caption is reworded, not when its content changes (an MLM
proposes any fitting word: "red" -> "blue"). It is the "synonym-only" attack of the synthetic suite, in the spirit of
the synonym-swap attacks of Alzantot et al. (2018) and TextFooler (Jin et al., 2020), with the thesaurus as the only
constraint (no embedding or part-of-speech filter: a curated thesaurus needs none).
"""

from __future__ import annotations

import string

from mat_lightning.data.thesaurus import load_thesaurus
from mat_lightning.errors import is_synthetic_name, unresolved_synthetic_name


def _match_case(template: str, word: str) -> str:
    """``word`` capitalised like ``template`` (``Red`` -> ``Crimson``, ``RED`` -> ``CRIMSON``)."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class ThesaurusCandidates:
    """Candidates for word ``j``: its synonyms in a thesaurus, in the thesaurus's order, at most ``k``.

    The word is looked up lower-cased without the punctuation around it; each synonym keeps that punctuation and the
    word's capitalisation (``"Red,"`` -> ``"Crimson,"``). A word the thesaurus does not know gets no candidates, so
    the attack leaves it alone.

    Args:
        thesaurus: a JSON file ``{word: [synonym, ...]}`` or ``wordnet`` (in a ``mat`` config also ``synthetic``,
            the data's world's ``thesaurus.json``, which the CLI resolves to that file).

    Raises:
        ConfigError: an unresolved ``synthetic`` name, or ``wordnet`` without NLTK's corpus.
        DataError: the file is missing or not a ``{word: [synonyms]}`` object.
    """

    def __init__(self, thesaurus: str) -> None:
        if is_synthetic_name(thesaurus):
            raise unresolved_synthetic_name(
                "ThesaurusCandidates thesaurus", thesaurus, "ensure_thesaurus(<preset>)"
            )
        self.thesaurus = thesaurus
        self._table = load_thesaurus(
            thesaurus, "ThesaurusCandidates thesaurus"
        )  # fails now, not mid-evaluation

    def __repr__(self) -> str:
        return f"ThesaurusCandidates({self.thesaurus!r})"

    def candidates(self, words: list[str], j: int, k: int) -> list[str]:
        token = words[j]
        core = token.strip(string.punctuation)
        if not core:
            return []
        start = token.index(core)
        before, after = token[:start], token[start + len(core) :]
        synonyms = self._table.synonyms(core.lower())
        return [before + _match_case(core, s) + after for s in synonyms[:k]]
