"""Precomputed 1:N augmentations, read from the files users produce with their generators (DESIGN §2 "1:N").

MAT+ trains on captions rewritten by a language model (the paper: LLaMA), captions generated from the image by a
captioner (I2T, the paper: BLIP) and images generated from the captions (T2I, the paper: Stable Diffusion). These
are expensive, so they are generated once (``mat augment rewrite|i2t``, or any script of yours) and read here:

* captions (rewrite, I2T): a JSON object ``{image_id: [caption, ...]}``;
* images (T2I): a JSON object ``{image_id: [image path, ...]}``, paths relative to the JSON file's folder.

``image_id`` is :attr:`~mat_lightning.data.formats.ImageCaptions.image_id`, the image's path relative to the image
root as the annotation file writes it (``flickr30k-images/1000092795.jpg``; ``images/000001.png`` in the synthetic
world).

In a ``mat`` config, ``path`` may also name the synthetic world's simulated generators, ``synthetic:<kind>`` or
``synthetic:<kind>:<preset>`` (kind ``rewrite`` or ``i2t`` for captions, ``t2i`` for images): the CLI replaces the
name by the file :func:`mat_lightning.synthetic.ensure_augmentations` builds (:mod:`mat_lightning.synthetic.resolve`),
so this module only reads files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mat_lightning.errors import DataError, is_synthetic_name, unresolved_synthetic_name


def _read_mapping(path: Path, what: str) -> dict[str, list[str]]:
    """Parse ``{str: [str, ...]}``, raising DataError that names the file and the first bad entry."""
    if not path.is_file():
        raise DataError(
            f"{what} file not found: {path}. Generate it (e.g. `mat augment rewrite ... --out {path}`) or fix the path."
        )
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} file {path}: not valid JSON ({e}). Re-generate the file.") from None
    if not isinstance(data, dict):
        raise DataError(
            f'{what} file {path}: expected an object {{"<image_id>": ["...", ...]}}, got a {type(data).__name__}'
        )
    for key, value in data.items():
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{what} file {path}: entry {key!r} must be a list of strings, got {value!r:.80}")
    return data


class _Precomputed:
    what = ""
    example = ""  # the synthetic-world name of this kind of source, for the error message

    def __init__(self, path: str, strict: bool = True) -> None:
        self.spec, self.strict = str(path), strict
        if is_synthetic_name(self.spec):
            raise unresolved_synthetic_name(
                f"{type(self).__name__} path",
                self.spec,
                f"ensure_augmentations(<preset>) / '{self.example}.json'",
            )
        self._path = Path(self.spec)
        self._data: dict[str, list[str]] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, strict={self.strict})"

    @property
    def path(self) -> Path:
        return self._path

    @property
    def data(self) -> dict[str, list[str]]:
        """The file's mapping, read once."""
        if self._data is None:
            self._data = self._load(self.path)
        return self._data

    def _load(self, path: Path) -> dict[str, list[str]]:
        return _read_mapping(path, self.what)

    def _entry(self, image_id: str) -> list[str] | None:
        entry = self.data.get(image_id)
        if entry is None and self.strict:
            example = next(iter(self.data), None)
            raise DataError(
                f"{self.what} file {self.path} has no entry for image {image_id!r} "
                f"(its keys look like {example!r}; keys are image paths relative to the image root). "
                "Re-generate the file for this split or set strict: false to skip such images."
            )
        return entry

    def check_covers(self, image_ids: Sequence[str], limit: int = 5) -> None:
        """In strict mode, raise one DataError listing the first ids the file lacks (before training starts)."""
        if not self.strict:
            return
        missing = [i for i in image_ids if i not in self.data]
        if missing:
            example = next(iter(self.data), None)
            raise DataError(
                f"{self.what} file {self.path} lacks {len(missing)} of {len(image_ids)} images, e.g. "
                f"{missing[:limit]} (its keys look like {example!r}). Re-generate it for this split, or set "
                "strict: false to train those images without it."
            )


class PrecomputedCaptions(_Precomputed):
    """Captions per image from a JSON file ``{image_id: [caption, ...]}`` (LM rewrites, I2T captions).

    Args:
        path: the JSON file (in a ``mat`` config also ``synthetic:rewrite``/``synthetic:i2t`` (``[:<preset>]``), the
            synthetic world's simulated generators, which the CLI resolves to their file).
        strict: an image missing from the file is an error (default); otherwise it gets no extra captions.

    Raises:
        ConfigError: an unresolved ``synthetic:`` name.
        DataError: (on first use) the file is missing or malformed, or lacks an image in strict mode.
    """

    what = "caption augmentation"
    example = "i2t"

    def __init__(self, path: str, strict: bool = True) -> None:
        super().__init__(path, strict)

    def _load(self, path: Path) -> dict[str, list[str]]:
        # Blank captions (a generator's empty outputs) carry no text: drop them here rather than train on "".
        return {k: [c.strip() for c in v if c.strip()] for k, v in _read_mapping(path, self.what).items()}

    def captions(self, image_id: str) -> list[str]:
        """The captions of ``image_id`` ([] when absent and not strict)."""
        return list(self._entry(image_id) or [])


class PrecomputedImages(_Precomputed):
    """Generated images per image from a JSON file ``{image_id: [relative image path, ...]}`` (T2I).

    Args:
        path: the JSON file (image paths are relative to its folder; in a ``mat`` config also
            ``synthetic:t2i[:<preset>]``, the synthetic world's re-rendered scenes, which the CLI resolves).
        strict: an image missing from the file is an error (default); otherwise it keeps its original only.

    Raises:
        ConfigError: an unresolved ``synthetic:`` name.
        DataError: (on first use) the file is missing or malformed, lacks an image in strict mode, or lists an
            image file that does not exist.
    """

    what = "image augmentation"
    example = "t2i"

    def __init__(self, path: str, strict: bool = True) -> None:
        super().__init__(path, strict)

    def image_paths(self, image_id: str) -> list[Path]:
        """The generated images of ``image_id`` ([] when absent and not strict)."""
        base = self.path.parent
        paths = [base / p for p in self._entry(image_id) or []]
        for p in paths:
            if not p.is_file():
                raise DataError(
                    f"{self.what} file {self.path} lists {p} for image {image_id!r}, but it does not exist "
                    "(paths are relative to the JSON file's folder)"
                )
        return paths

    def check_covers(self, image_ids: Sequence[str], limit: int = 5) -> None:
        """Also check that every listed image file exists, so a missing one fails before training, not mid-epoch."""
        super().check_covers(image_ids, limit)
        base = self.path.parent
        missing = [base / p for i in image_ids for p in self.data.get(i, []) if not (base / p).is_file()]
        if missing:
            raise DataError(
                f"{self.what} file {self.path}: {len(missing)} listed images do not exist, e.g. "
                f"{[str(p) for p in missing[:limit]]} (paths are relative to the JSON file's folder)"
            )
