"""Thesauri: word -> synonyms that keep a sentence's meaning, for EDA's synonym operations and synonym-only attacks.

Two sources: NLTK's WordNet (``wordnet``; every lemma of every synset, as the EDA reference uses it) or a JSON file
``{word: [synonym, ...]}`` (such as the synthetic world's ``thesaurus.json``, which a ``mat`` config names
``synthetic``). Words and synonyms are lower-cased; multi-word synonyms are dropped, so a substitution keeps the word
count.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from mat_lightning.errors import ConfigError, DataError, is_synthetic_name, unresolved_synthetic_name


class Thesaurus:
    """word -> synonyms (single words, never the word itself). Picklable, so DataLoader workers can use it."""

    def synonyms(self, word: str) -> list[str]:
        raise NotImplementedError


class _DictThesaurus(Thesaurus):
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    def synonyms(self, word: str) -> list[str]:
        return self.table.get(word, [])


class _WordNetThesaurus(Thesaurus):
    """Synonyms from the lemmas of every WordNet synset of the word (as the EDA reference does)."""

    def __init__(self) -> None:
        try:
            from nltk.corpus import wordnet
        except ImportError:
            raise ConfigError(
                "thesaurus 'wordnet' needs NLTK: `pip install nltk`, then "
                "`python -m nltk.downloader wordnet` (or use a JSON file {word: [synonyms]}, e.g. thesaurus: synthetic)"
            ) from None
        try:
            wordnet.ensure_loaded()
        except LookupError:
            raise ConfigError(
                "thesaurus 'wordnet': the NLTK WordNet corpus is not installed. Install it with "
                "`python -m nltk.downloader wordnet` (or copy it into a folder on $NLTK_DATA), or set "
                "thesaurus to 'synthetic' or to a JSON file {word: [synonyms]}"
            ) from None

    def synonyms(self, word: str) -> list[str]:
        return list(_wordnet_synonyms(word))


@lru_cache(maxsize=65536)
def _wordnet_synonyms(word: str) -> tuple[str, ...]:
    from nltk.corpus import wordnet

    found = {
        lemma.name().lower()
        for synset in wordnet.synsets(word)
        for lemma in synset.lemmas()
        if "_" not in lemma.name() and "-" not in lemma.name()
    }
    found.discard(word)
    # Sorted: the draw must not depend on set order, which differs between processes (hash seeds).
    return tuple(sorted(found))


def load_thesaurus(spec: str, what: str = "thesaurus") -> Thesaurus:
    """``wordnet`` | path of a JSON file ``{word: [synonym, ...]}``; ``what`` names the setting in messages.

    Raises:
        ConfigError: ``wordnet`` without NLTK or its corpus; an unresolved ``synthetic`` name.
        DataError: the JSON file is missing or not a ``{str: [str]}`` object.
    """
    if is_synthetic_name(spec):
        raise unresolved_synthetic_name(what, spec, "ensure_thesaurus(<preset>)")
    if spec == "wordnet":
        return _WordNetThesaurus()
    path = Path(spec)
    if not path.is_file():
        raise DataError(
            f"{what} file not found: {path}. Use 'wordnet' or a JSON file {{word: [synonyms]}} ('synthetic' in a "
            "mat config)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} file {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v)
        for k, v in data.items()
    ):
        raise DataError(f'{what} file {path}: expected an object {{"word": ["synonym", ...]}}')
    table: dict[str, list[str]] = {}
    for word, syns in data.items():
        key = word.strip().lower()
        clean = [s.strip().lower() for s in syns if s.strip() and " " not in s.strip()]
        table[key] = [s for s in dict.fromkeys(clean) if s != key]
    return _DictThesaurus(table)
