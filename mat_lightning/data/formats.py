"""Readers for the three annotation layouts of the field, into one record type.

* **Karpathy** (``dataset_flickr30k.json``, ``dataset_coco.json``, and our synthetic world):
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...], ...}]}``.
* **ALBEF/SGA** (``flickr30k_test.json``, ``coco_test.json``, ``*_train.json``): a list of
  ``{"image": "<relative path>", "caption": [str, ...] | str}``. The train files have one caption per entry and repeat
  the image; entries of the same image are merged, in file order.
* **CLIP_benchmark** (LAION-AI/CLIP_benchmark, files from ``mehdidc/retrieval_annotations`` release 1.0.0), one file
  per split: ``flickr30k_<split>_karpathy.txt``, a header line then one ``<image>.jpg,<caption>`` row per caption
  (the caption may hold commas: a row splits at the first ``.jpg,``, as CLIP_benchmark's ``flickr.py`` does); and
  ``coco_<split>_karpathy.json`` in COCO-captions format, ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}``, with ``file_name`` relative to ``val2014/`` (``train2014/`` for train).

Every problem is reported as :class:`~mat_lightning.errors.DataError` naming the file and the entry, never as a
``KeyError`` from deep inside a loop.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mat_lightning.errors import DataError

log = logging.getLogger(__name__)

Format = Literal["auto", "karpathy", "albef", "clip_benchmark"]


class SplitNotFound(DataError):
    """A well-formed annotation file without any image of the requested split (a typo in the split's name?)."""


@dataclass
class ImageCaptions:
    """One image and all of its captions.

    Attributes:
        image_path: path of the image file (``image_root`` joined with the annotation's relative path).
        captions: the captions, at least one.
        image_id: the image's key for augmentation providers: its path relative to ``image_root``.
        split: ``train``/``val``/``test`` (Karpathy's ``restval`` is reported as is) or None when the file has none.
        meta: extra fields of the entry (the synthetic world keeps its ``scene`` here).
        entries: how many annotation entries were merged into this record (a Karpathy file lists each image once;
            ALBEF train files list it once per caption).
    """

    image_path: Path
    captions: list[str]
    image_id: str
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    entries: int = 1


def load_json(path: str | Path) -> Any:
    """Parse a JSON file, turning every failure into a DataError that names the file."""
    path = Path(path)
    if not path.is_file():
        hint = "it is a folder; point to the .json file inside it" if path.is_dir() else "check the path"
        raise DataError(f"annotation file not found: {path} ({hint})")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). "
            "Re-download or re-generate the file."
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); is this really the annotation JSON?") from None
    except RecursionError:
        raise DataError(
            f"{path}: nested too deeply to be an annotation file (lists or objects inside each other thousands of "
            "levels deep); re-generate the file"
        ) from None


def detect_format(data: Any, path: Path) -> Literal["karpathy", "albef", "clip_benchmark"]:
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "clip_benchmark"  # COCO-captions format (CLIP_benchmark's coco_<split>_karpathy.json)
    if isinstance(data, dict) and "images" in data:
        return "karpathy"
    if isinstance(data, list):
        return "albef"
    raise DataError(
        f"{path}: unknown annotation layout (top level is a {type(data).__name__}"
        f"{' with keys ' + str(sorted(data)[:5]) if isinstance(data, dict) else ''}). Expected Karpathy's "
        '{"images": [...]} or an ALBEF-style list of {"image", "caption"} entries.'
    )


def _clean_captions(raw: Any, where: str) -> list[str]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise DataError(f"{where}: captions must be a string or a list of strings, got {type(raw).__name__}")
    caps = [c.strip() for c in raw if c.strip()]
    if not caps:
        raise DataError(f"{where}: has no captions. Remove the entry or add at least one caption.")
    return caps


def _string_field(entry: dict, key: str, where: str, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{where}: {key!r} must be a non-empty string, got {type(value).__name__} {str(value)[:40]!r}"
        )
    return value


def _image_key(rel: str) -> str:
    """The image's identity in a file: its relative path, normalised (``./a.jpg`` and ``a.jpg`` are one image)."""
    return posixpath.normpath(rel.replace("\\", "/"))


def read_karpathy(path: Path, data: dict, image_root: Path, split: str | None) -> list[ImageCaptions]:
    images = data["images"]
    if not isinstance(images, list):
        raise DataError(f"{path}: 'images' must be a list, got {type(images).__name__}")
    out: dict[str, ImageCaptions] = {}
    repeated = 0
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where} is a {type(entry).__name__}, expected an object")
        if "filename" not in entry:
            raise DataError(f"{where} has no 'filename' (keys: {sorted(entry)})")
        _string_field(entry, "filename", where)
        _string_field(entry, "filepath", where, required=False)
        entry_split = _string_field(entry, "split", where, required=False)
        if split is not None and entry_split != split and not (split == "train" and entry_split == "restval"):
            continue
        sentences = entry.get("sentences")
        if sentences is None:
            raise DataError(f"{where} ({entry['filename']}) has no 'sentences'")
        if not isinstance(sentences, list) or not all(isinstance(s, dict) and "raw" in s for s in sentences):
            raise DataError(f"{where} ({entry['filename']}): 'sentences' must be a list of {{'raw': str}}")
        rel = _image_key((Path(entry.get("filepath") or "") / entry["filename"]).as_posix())
        meta = {
            k: v
            for k, v in entry.items()
            if k not in ("filename", "filepath", "split", "sentences", "sentids")
        }
        captions = _clean_captions([s["raw"] for s in sentences], f"{where} ({rel})")
        if rel in out:  # one image listed twice: one image with the captions of both entries
            if out[rel].split != entry_split:
                raise DataError(
                    f"{where}: image {rel} is listed in split {out[rel].split!r} and again in {entry_split!r}; "
                    "an image must belong to one split (train images in the test split inflate recall)"
                )
            out[rel].captions.extend(captions)
            out[rel].entries += 1
            repeated += 1
            continue
        out[rel] = ImageCaptions(
            image_path=image_root / rel, captions=captions, image_id=rel, split=entry_split, meta=meta
        )
    if repeated:
        log.warning("%s: %d repeated image entries merged (their captions joined)", path, repeated)
    return list(out.values())


def read_albef(path: Path, data: list, image_root: Path) -> list[ImageCaptions]:
    by_image: dict[str, ImageCaptions] = {}
    for i, entry in enumerate(data):
        where = f"{path}: entry [{i}]"
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{where} must have 'image' and 'caption' (got {keys})")
        rel = _image_key(_string_field(entry, "image", where))
        caps = _clean_captions(entry["caption"], f"{where} ({rel})")
        if rel in by_image:
            by_image[rel].captions.extend(caps)
            by_image[rel].entries += 1
        else:
            by_image[rel] = ImageCaptions(image_path=image_root / rel, captions=caps, image_id=rel)
    return list(by_image.values())


def read_clip_benchmark_flickr(path: Path, image_root: Path) -> list[ImageCaptions]:
    """CLIP_benchmark's ``flickr30k_<split>_karpathy.txt``: header, then ``<image>.jpg,<caption>`` per caption."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); is this really the annotation file?") from None
    by_image: dict[str, ImageCaptions] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        image, sep, caption = line.strip().partition(".jpg,")
        if not sep:
            raise DataError(
                f"{path}: line {n} is not '<image>.jpg,<caption>' (got {line[:60]!r}). CLIP_benchmark's Flickr "
                "files have a header line, then one row per caption."
            )
        rel = image + ".jpg"
        caps = _clean_captions(caption.strip().strip('"'), f"{path}: line {n} ({rel})")
        if rel in by_image:
            by_image[rel].captions.extend(caps)
        else:
            by_image[rel] = ImageCaptions(image_path=image_root / rel, captions=caps, image_id=rel)
    return list(by_image.values())


def read_coco_captions(path: Path, data: dict, image_root: Path) -> list[ImageCaptions]:
    """COCO-captions format (CLIP_benchmark's ``coco_<split>_karpathy.json``), images in file order."""
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{path}: 'images' and 'annotations' must be lists (COCO-captions format)")
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError(f"{path}: annotations[{i}] must have 'image_id' and 'caption'")
        captions.setdefault(_coco_id(ann["image_id"], f"{path}: annotations[{i}]['image_id']"), []).append(
            ann["caption"]
        )
    out = []
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DataError(f"{path}: images[{i}] must have 'id' and 'file_name'")
        _coco_id(entry["id"], f"{path}: images[{i}]['id']")
        rel = _string_field(entry, "file_name", f"{path}: images[{i}]")
        caps = _clean_captions(captions.get(entry["id"], []), f"{path}: images[{i}] ({rel})")
        out.append(ImageCaptions(image_path=image_root / rel, captions=caps, image_id=rel))
    return out


def _coco_id(value: Any, where: str) -> int | str:
    """A COCO image id: an integer or a string (a list or an object cannot key the captions to their image)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(
            f"{where} must be an integer or a string, got {type(value).__name__} {str(value)[:40]}"
        )
    return value


def read_annotations(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    format: Format = "auto",
) -> list[ImageCaptions]:
    """Read an annotation file into records, in file order.

    Args:
        path: the JSON file.
        image_root: folder the image paths are relative to (default: the file's folder).
        split: keep only this Karpathy split (``train`` also keeps ``restval``). Ignored for ALBEF files, which
            hold one split per file.
        format: ``auto`` detects the layout from the top-level type.

    Raises:
        DataError: missing or malformed file, an entry without image or captions.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix == ".txt":  # CLIP_benchmark's Flickr CSV, the one non-JSON layout
        if not path.is_file():
            raise DataError(f"annotation file not found: {path} (check the path)")
        records = read_clip_benchmark_flickr(path, root)
        if not records:
            raise DataError(f"{path}: no images (only a header line?)")
        return records
    data = load_json(path)
    fmt = detect_format(data, path) if format == "auto" else format
    if fmt == "clip_benchmark":
        if not isinstance(data, dict) or "annotations" not in data:
            raise DataError(f'{path}: format=clip_benchmark needs {{"images": [...], "annotations": [...]}}')
        records = read_coco_captions(path, data, root)
    elif fmt == "karpathy":
        if not isinstance(data, dict) or "images" not in data:
            raise DataError(f'{path}: format=karpathy needs a top-level {{"images": [...]}}')
        records = read_karpathy(path, data, root, split)
    else:
        if not isinstance(data, list):
            raise DataError(f"{path}: format=albef needs a top-level list of entries")
        records = read_albef(path, data, root)
    if not records and fmt != "clip_benchmark":
        found = (
            sorted({e.get("split") for e in data["images"] if isinstance(e, dict)})
            if fmt == "karpathy"
            else []
        )
        raise SplitNotFound(
            f"{path}: no images{f' in split {split!r} (splits present: {found})' if split else ''}"
        )
    return records


def shared_images(
    first: list[ImageCaptions], second: list[ImageCaptions]
) -> list[tuple[ImageCaptions, ImageCaptions]]:
    """Pairs of records of two splits that are the same image: the same file, or files with the same bytes.

    Only files of equal size are hashed, so checking two large splits costs little more than a ``stat`` per file.
    """
    import hashlib

    def size(r: ImageCaptions) -> int:
        try:
            return r.image_path.stat().st_size
        except OSError:
            return -1

    by_size: dict[int, list[ImageCaptions]] = {}
    for r in first:
        by_size.setdefault(size(r), []).append(r)
    digests: dict[Path, str] = {}

    def digest(r: ImageCaptions) -> str:
        if r.image_path not in digests:
            digests[r.image_path] = hashlib.sha256(r.image_path.read_bytes()).hexdigest()
        return digests[r.image_path]

    pairs = []
    for r in second:
        for other in by_size.get(size(r), []) if size(r) >= 0 else []:
            if other.image_path == r.image_path or digest(other) == digest(r):
                pairs.append((other, r))
                break
    return pairs


def missing_reason(record: ImageCaptions) -> str | None:
    """Why ``record``'s image file cannot be read (None: it is a regular file): a symbolic-link loop, a link to a
    missing file, an absolute path that does not exist, a folder, or not found."""
    path = record.image_path
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic-link loop (the link points back to itself); fix or remove the link"
        if path.is_symlink():
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        if Path(record.image_id).is_absolute():
            return (
                "an absolute path in the annotation file, and no such file (image paths are usually relative)"
            )
        return "not found" if e.errno == errno.ENOENT else (e.strerror or str(e))
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not an image file"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def check_images_exist(records: list[ImageCaptions], annotation: str | Path, limit: int = 20) -> None:
    """Raise one DataError listing the first ``limit`` unreadable image files by name, each with why, then how many
    more."""
    missing = [(r.image_path, why) for r in records if (why := missing_reason(r)) is not None]
    if missing:
        shown = "\n  ".join(f"{p} ({why})" for p, why in missing[:limit])
        more = f"\n  ... and {len(missing) - limit} more" if len(missing) > limit else ""
        hint = (
            "\nCheck --data.image_root (the folder the annotation's image paths are relative to)."
            if any(why == "not found" for _, why in missing)
            else ""
        )
        raise DataError(
            f"{len(missing)} of {len(records)} images listed in {annotation} are missing:\n  {shown}{more}{hint}"
        )
