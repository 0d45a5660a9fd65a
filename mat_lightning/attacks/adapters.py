"""Adapters to the attack libraries of the field, imported lazily (optional dependencies).

* :class:`TorchattacksAttack` runs any ``torchattacks`` image attack (PGD, APGD, FGSM, MIFGSM, AutoAttack, ...) on a
  retrieval objective: the "classes" are the batch's images, each represented by the normalised mean embedding of
  its captions, and the classifier's logits are ``logit_scale · cos(image, class)``; label = the image's own class.
  Results are named ``torchattacks_<name>``.
* :class:`TextAttackCandidates` turns a TextAttack transformation (``WordSwapQWERTY``,
  ``WordSwapNeighboringCharacterSwap``, ``WordSwapWordNet``, ``WordSwapEmbedding``, ...) into a candidate generator
  for :class:`~mat_lightning.attacks.bert_attack.BertAttack`, which keeps its batched importance ranking and search.
  :class:`TextAttackWordSwap` is that combination as one attack, named ``textattack_<transformation>``.

``import textattack`` needs NLTK's stop-word corpus; we write ours (the same list our attacks use) into
``$MAT_CACHE_DIR/nltk_data`` and point ``NLTK_DATA`` there when no corpus is installed. Transformations that need
downloaded resources (WordNet, counter-fitted embeddings) work where those resources are installed.
"""

from __future__ import annotations

import inspect
import os
import zlib
from typing import Any

import torch
from torch import Tensor, nn

from mat_lightning.attacks.base import Attack, AttackResult
from mat_lightning.attacks.bert_attack import BertAttack, TextObjective
from mat_lightning.attacks.objectives import caption_prototypes
from mat_lightning.attacks.stopwords import STOP_WORDS
from mat_lightning.cache import cache_dir
from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"the {module} adapter needs `{extra}` ({e}); `make install` installs it") from None


# -- torchattacks -------------------------------------------------------------------------------------------------------


class _RetrievalClassifier(nn.Module):
    """images in [0,1] -> logits over the batch's images (caption-set prototypes); what torchattacks attacks."""

    def __init__(self, encoder: VLEncoder, prototypes: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("prototypes", prototypes)

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder.logit_scale.detach() * self.encoder.encode_image(images) @ self.prototypes.T


class TorchattacksAttack(Attack):
    """Any torchattacks image attack on the retrieval classifier described in the module doc.

    Args:
        attack: the torchattacks class name (``PGD``, ``APGD``, ``FGSM``, ``MIFGSM``, ``AutoAttack``, ...).
        eps_255: the budget in 1/255 units, passed as ``eps`` (and step sizes ``alpha`` scaled with it when given in
            ``kwargs`` as ``alpha_255``).
        kwargs: other constructor arguments of the torchattacks class (``steps``, ``norm``, ``version``...).
            ``n_classes`` is set to the batch size for attacks that take it.
        name: the row label (default ``torchattacks_<attack>``; see :class:`~mat_lightning.attacks.base.Attack`).
    """

    modality = "image"

    def __init__(
        self,
        attack: str = "PGD",
        eps_255: float = 2.0,
        kwargs: dict[str, Any] | None = None,
        seed: int | None = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(seed, name)
        self.attack, self._eps_255, self.kwargs = attack, float(eps_255), dict(kwargs or {})
        if name is None:
            self.name = f"torchattacks_{attack.lower()}"
        self._attack_class()  # a wrong name or keyword fails when the config is read, not after the clean pass

    def _attack_class(self) -> type:
        """The torchattacks class, after checking that it exists and takes every key of ``kwargs``."""
        torchattacks = _require("torchattacks", "torchattacks")
        cls = getattr(torchattacks, self.attack, None)
        if not isinstance(cls, type):
            raise ConfigError(
                f"TorchattacksAttack attack={self.attack!r}: torchattacks has no such attack class"
            )
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            # set by this adapter: eps (from eps_255), alpha (from alpha_255), n_classes, seed
            taken = set(params) - {"self", "model"} | {"alpha_255"}
            unknown = sorted(set(self.kwargs) - taken)
            if unknown:
                raise ConfigError(
                    f"TorchattacksAttack {self.attack} kwargs {unknown}: not arguments of torchattacks.{self.attack} "
                    f"(it takes: {', '.join(sorted(taken))})"
                )
        return cls

    @property
    def eps_255(self) -> float:
        return self._eps_255

    def with_eps(self, eps_255: float) -> TorchattacksAttack:
        other = self.clone()
        if "alpha_255" in self.kwargs and self._eps_255 > 0:
            other.kwargs = {**self.kwargs, "alpha_255": self.kwargs["alpha_255"] * eps_255 / self._eps_255}
        other._eps_255 = float(eps_255)
        return other

    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        cls = self._attack_class()
        with torch.no_grad():
            prototypes, labels = caption_prototypes(encoder.encode_text(captions), txt2img, images.shape[0])
        model = _RetrievalClassifier(encoder, prototypes)
        kwargs = dict(self.kwargs)
        if "alpha_255" in kwargs:
            kwargs["alpha"] = kwargs.pop("alpha_255") / 255.0
        params = inspect.signature(cls.__init__).parameters
        if "eps" in params:
            kwargs["eps"] = self._eps_255 / 255.0
        if "n_classes" in params:
            kwargs["n_classes"] = images.shape[0]
        if "seed" in params and self.seed is not None:
            kwargs.setdefault("seed", self.seed)
        atk = cls(model, **kwargs)
        # torchattacks draws random starts from torch's global generator: seed it from ours, then restore it.
        with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
            gen = self.generator(images.device)
            if gen is not None:
                torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen, device=images.device)))
            adv = atk(images, labels)
        return AttackResult(adv.detach().clamp(0, 1), captions)


# -- TextAttack ---------------------------------------------------------------------------------------------------------


def ensure_nltk_stopwords() -> None:
    """Give NLTK a stop-word corpus if it has none (``import textattack`` fails without one, and cannot download)."""

    try:
        import nltk

        nltk.data.find("corpora/stopwords")
        return
    except (LookupError, ImportError):
        pass
    root = cache_dir() / "nltk_data"
    corpus = root / "corpora" / "stopwords"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "english").write_text("\n".join(sorted(w for w in STOP_WORDS if w.isalpha())) + "\n")
    os.environ["NLTK_DATA"] = (
        f"{root}{os.pathsep}{os.environ['NLTK_DATA']}" if os.environ.get("NLTK_DATA") else str(root)
    )
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))


def load_textattack() -> Any:
    ensure_nltk_stopwords()
    return _require("textattack", "textattack")


class TextAttackCandidates:
    """Candidates for word ``j`` from a TextAttack transformation applied to that word.

    Args:
        transformation: class name in ``textattack.transformations`` (``WordSwapQWERTY``, ...).
        kwargs: its constructor arguments.
    """

    def __init__(
        self, transformation: str = "WordSwapQWERTY", kwargs: dict[str, Any] | None = None, seed: int = 0
    ) -> None:
        self.transformation, self.kwargs, self.seed = transformation, dict(kwargs or {}), seed
        self._impl: Any = None

    def _build(self) -> Any:
        if self._impl is None:
            ta = load_textattack()
            from textattack import transformations

            if not hasattr(transformations, self.transformation):
                raise ConfigError(f"textattack.transformations has no {self.transformation!r}")
            self._impl = getattr(transformations, self.transformation)(**self.kwargs)
            self._attacked_text = ta.shared.AttackedText
        return self._impl

    def candidates(self, words: list[str], j: int, k: int) -> list[str]:
        impl = self._build()
        text = self._attacked_text(words[j])
        if not text.words:  # punctuation only
            return []
        # Random transformations draw from Python's and NumPy's global generators: seed them per word (so a
        # word gets the same candidates wherever it occurs) and put them back afterwards.
        import random

        import numpy as np

        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(f"{self.seed}:{words[j]}")
        np.random.seed(zlib.crc32(f"{self.seed}:{words[j]}".encode()))
        try:
            transformed = impl(text, indices_to_modify={0})
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        out = []
        for t in transformed:
            w = t.words[0] if t.words else ""
            if w and w not in out:
                out.append(w)
            if len(out) >= k:
                break
        return out


class TextAttackWordSwap(BertAttack):
    """BERT-Attack's batched search with a TextAttack transformation proposing the substitutes.

    Args:
        transformation: class name in ``textattack.transformations``.
        transformation_kwargs: its constructor arguments.
        top_k, max_words, objective, stop_words: as :class:`BertAttack`.
        name: the row label (default ``textattack_<transformation>``; see :class:`~mat_lightning.attacks.base.Attack`).
    """

    def __init__(
        self,
        transformation: str = "WordSwapQWERTY",
        transformation_kwargs: dict[str, Any] | None = None,
        top_k: int = 10,
        max_words: int = 1,
        objective: TextObjective = "image_cosine",
        stop_words: list[str] | None = None,
        seed: int | None = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(
            mlm="<textattack>",
            top_k=top_k,
            max_words=max_words,
            objective=objective,
            stop_words=stop_words,
            candidate_generator=TextAttackCandidates(transformation, transformation_kwargs, seed or 0),
            seed=seed,
            name=name,
        )
        if name is None:
            self.name = f"textattack_{transformation.lower()}"
