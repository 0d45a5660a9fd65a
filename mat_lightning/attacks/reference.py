"""What the published Co-Attack and SGA code does to text, for the attacks' ``reference=True`` modes.

Both repositories (adversarial-for-goodness/Co-Attack @ 96f2c0eb, Zoky-2020/SGA @ f49e6926) share three text
conventions that our default mode does not follow (README "Reference mode"):

* :func:`pre_caption` — ALBEF's caption cleaning, applied by their data sets to every caption the attack and the
  recall see: lower-case, ``,.'!?"()*#:;~`` removed, ``-`` and ``/`` to spaces, spaces collapsed, at most 30 words;
* :data:`REFERENCE_STOP_WORDS` — their stop list (292 entries, matched exactly), shipped as a plain word list
  (``reference_stopwords.txt``, data, with its source in its header);
* :func:`text_view` — the text their CLIP text encoder actually reads during an attack: the caption tokenised by
  the attack's BERT tokenizer (``[CLS] X``, no ``[SEP]``, truncated to ``max_length`` tokens), decoded back to a
  string and stripped of ``[PAD]``/``[CLS]``/``[SEP]`` (their CLIP wrapper's ``inference_text``), so a caption
  longer than ``max_length`` word pieces loses its tail and text the BERT tokenizer normalises (accents, unknown
  characters -> ``[UNK]``) reaches CLIP normalised.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_STOP_FILE = Path(__file__).with_name("reference_stopwords.txt")

#: Co-Attack's and SGA's ``filter_words`` (exact, case-sensitive matching, as theirs).
REFERENCE_STOP_WORDS: frozenset[str] = frozenset(
    line.rstrip("\n")
    for line in _STOP_FILE.read_text(encoding="utf-8").splitlines()
    if line and not line.startswith("# ")
)

_PUNCTUATION = re.compile(r"""([,.'!?"()*#:;~])""")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's ``pre_caption`` (as in Co-Attack's ``dataset/utils.py`` and SGA's ``dataset.py``), re-implemented.

    >>> pre_caption("A man's hat-stand, on the floor.")
    'a mans hat stand on the floor'
    """
    caption = (
        _PUNCTUATION.sub("", caption.lower())
        .replace("-", " ")
        .replace("/", " ")
        .replace("<person>", "person")
    )
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def text_view(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[str]:
    """What the references' CLIP text encoder reads for ``texts``: BERT ``[CLS] X`` truncated to ``max_length``
    tokens, decoded (with the tokenizer's clean-up of spaces before punctuation, the default of the transformers
    versions they pin) and stripped of ``[PAD]``, ``[CLS]`` and ``[SEP]``."""
    if not texts:
        return []
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    cls = tokenizer.cls_token_id
    decoded = tokenizer.batch_decode(
        [[cls] + row[: max_length - 1] for row in rows], clean_up_tokenization_spaces=True
    )
    return [d.replace("[PAD]", "").replace("[CLS]", "").replace("[SEP]", "").strip() for d in decoded]


def join_pieces(tokens: Sequence[str]) -> str:
    """Word pieces to text as the references' (slow) BERT tokenizer does it: ``'tang ##erine' -> 'tangerine'``,
    no other clean-up."""
    return " ".join(tokens).replace(" ##", "").strip()
