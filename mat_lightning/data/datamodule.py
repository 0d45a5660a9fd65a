"""RetrievalDataModule: 1:N training batches and evaluation sets for image-text retrieval.

* **Train batches** hold ``B`` images and ``k`` captions per image, sampled from that image's caption pool (its
  ground-truth captions plus, with MAT+, augmented ones). Captions of one image are positives of each other; the
  loss reads that from ``txt2img``/``image_ids``.
* **Eval batches** hold ``B`` images with *all* their captions (ragged: COCO has images with 6), so that an attack
  sees each image once together with all of its captions (SGA's protocol) and recall is computed over the split.

Images reach the model as ``float[B, 3, S, S]`` in [0, 1]: shorter side resized to ``S`` (bicubic, antialiased),
centre crop, no normalisation (the encoder normalises). ``S`` is the encoder's ``image_size`` unless given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mat_lightning.cache import corrupt_cache_hint, is_cached
from mat_lightning.data.augment.pairs import OneToMany
from mat_lightning.data.formats import (
    Format,
    ImageCaptions,
    SplitNotFound,
    check_images_exist,
    read_annotations,
    shared_images,
)
from mat_lightning.data.sampling import EvalShards, TrainShards
from mat_lightning.errors import ConfigError, DataError, unresolved_synthetic_name

log = logging.getLogger(__name__)

DEFAULT_ANNOTATIONS = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
# The file names each layout uses inside a data set's folder, tried in this order when data.annotations is not set:
# Karpathy's one file; ALBEF/SGA's one file per split; CLIP_benchmark's one file per split.
LAYOUT_FILES = {
    "karpathy": "dataset_{dataset}.json",
    "albef": "{dataset}_{split}.json",
    "clip_benchmark": {"flickr30k": "flickr30k_{split}_karpathy.txt", "coco": "coco_{split}_karpathy.json"},
}


def find_annotation_file(root: Path, dataset: str, split: str) -> tuple[str, Path]:
    """(layout, file) of ``split`` of a Flickr30K/COCO folder: the first layout whose file exists."""
    tried = []
    for layout, pattern in LAYOUT_FILES.items():
        if isinstance(pattern, dict):
            pattern = pattern[dataset]
        path = root / pattern.format(dataset=dataset, split=split)
        if path.is_file():
            return layout, path
        tried.append(path.name)
    raise DataError(
        f"no annotation file for split {split!r} of {dataset} in {root}: looked for {', '.join(tried)} "
        "(Karpathy, ALBEF/SGA and CLIP_benchmark layouts). Put one there or pass --data.annotations=<file>."
    )


@dataclass
class RetrievalBatch:
    """Images with their captions, flattened image-major.

    Attributes:
        images: float[B, 3, H, W] in [0, 1].
        captions: T strings.
        txt2img: long[T], the row of ``images`` each caption belongs to.
        image_ids: long[B], the image's index in its split; equal ids mean the same underlying image (positives).
        sample_keys: long[B] keys of each row's random draws in training attacks (a hash of seed, epoch and index,
            :class:`~mat_lightning.data.sampling.TrainShards`); None for evaluation batches, whose attacks key
            their draws by ``image_ids``.
        caption_plans: the text attacks' stored work on these captions, looked up by the DataLoader worker
            (:class:`Collate`): store key -> plan (``mat_lightning.attacks.store.CaptionPlan``); None without a
            store.
    """

    images: Tensor
    captions: list[str]
    txt2img: Tensor
    image_ids: Tensor
    sample_keys: Tensor | None = None
    caption_plans: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> RetrievalBatch:
        """Called by the DataLoader with ``pin_memory=True`` (custom batch types must pin themselves)."""
        plans = {k: p.pin_memory() for k, p in self.caption_plans.items()} if self.caption_plans else None
        return dataclasses.replace(self, images=self.images.pin_memory(), caption_plans=plans)


TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as the 8-bit RGB picture it shows.

    * transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparent colour) is composited over white:
      the colour stored under a transparent pixel is not part of the picture (often black);
    * 16- and 32-bit integer greys (``I;16*``, ``I``: 16-bit PNG and TIFF) are scaled from [0, 65535], float greys
      (``F``) from [0, 1]; ``Image.convert`` would clip both at 255, showing a white or black picture;
    * the rest (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX`` ...) through Pillow's own conversion.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = np.asarray(im, dtype=np.float64)
        grey = grey if mode == "F" else grey / 65535.0
        grey = np.nan_to_num(grey, nan=0.0).clip(0.0, 1.0)
        return Image.fromarray((grey * 255.0).round().astype(np.uint8), "L").convert("RGB")
    if mode in TRANSPARENT_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:  # LAB, HSV: Pillow has no conversion to RGB
        raise DataError(
            f"image mode {mode} cannot be converted to RGB ({e}); save the image as RGB"
        ) from None


#: Largest resized image (in multiples of the output's size**2) made whole before the centre crop.
MAX_RESIZED_AREA = 16


def _resize_centre_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic, antialiased), then the centre ``size`` x ``size`` crop.

    As torchvision's ``Resize`` + ``CenterCrop`` (the references' pipeline): the whole image is resized, then
    cropped. An extreme aspect ratio would make that resized image huge (a 1 x 20000 px PNG of 157 bytes became
    224 x 4,480,000 px, 3 GB, then 5 GB of peak memory), so beyond ``MAX_RESIZED_AREA`` x ``size**2`` pixels only
    the crop's region of the source is resampled (Pillow's ``box``; its filter still reads the pixels around the
    box): the same picture within 1-3 grey levels (Pillow's fixed-point rounding), memory bounded by the output.
    """
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (rw - size) // 2, (rh - size) // 2
    if rw * rh <= MAX_RESIZED_AREA * size * size:
        return im.resize((rw, rh), Image.BICUBIC).crop((left, top, left + size, top + size))
    box = (left * w / rw, top * h / rh, (left + size) * w / rw, (top + size) * h / rh)
    return im.resize((size, size), Image.BICUBIC, box=box)


@contextmanager
def _image_errors(path: Path, size: int) -> Iterator[None]:
    """Pillow's failures on ``path`` as one DataError each, naming the file and what to do."""
    try:
        # Pillow's decompression-bomb guard: a warning above MAX_IMAGE_PIXELS, an error above twice that. Both refuse.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise DataError(
            f"image not found: {path}. Check --data.image_root or re-create the data set."
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(
            f"image too large: {path} ({e}). Downscale it (the model sees it at {size} px), or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image cannot be decoded: {path} ({e}). Replace or remove the file.") from None


def load_image(path: Path, size: int) -> Tensor:
    """Decode, resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop: uint8[3, size, size].

    The EXIF orientation tag of a JPEG is not applied (no ``ImageOps.exif_transpose``), as in the reference
    implementations, whose numbers we reproduce: such a photo is read as stored (``mat data check`` lists them).
    """
    with _image_errors(path, size):
        im = Image.open(path)
        with im:
            im = _resize_centre_crop(to_rgb(im), size)
            arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def probe_image(path: Path, size: int) -> None:
    """Check ``path`` without decoding its pixels: the header (format, size, the decompression-bomb guard) and the
    file's structure (Pillow's ``verify``: a PNG's chunk checksums). Milliseconds per file; raises the DataError
    :func:`load_image` would raise for a file that is not an image, truncated in its header, or too large."""
    with _image_errors(path, size), Image.open(path) as im:
        im.verify()


class ImageStore:
    """Decoded, resized images of one split, optionally preloaded into memory as uint8."""

    def __init__(self, paths: Sequence[Path], size: int, preload: bool) -> None:
        self.paths, self.size = list(paths), size
        self.cache: Tensor | None = None
        if preload:
            self.cache = torch.stack([load_image(p, size) for p in self.paths]) if self.paths else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self.cache[i] if self.cache is not None else load_image(self.paths[i], self.size)


CaptionSampler = Callable[[int], list[str]]


def _ground_truth(records: Sequence[ImageCaptions], i: int) -> list[str]:
    return records[i].captions


class TrainSet(Dataset):
    """Item ``i`` or ``(i, key)``: (image[3, S, S], k captions of image ``i``, i, key).

    ``caption_pool(i)`` gives all captions eligible as positives of image ``i``; ``k`` are drawn without replacement
    when the pool is large enough, with replacement otherwise. The item's randomness comes from a generator seeded by
    ``key`` (:class:`~mat_lightning.data.sampling.TrainShards` derives it from seed, epoch and index, so it does not
    depend on the number of processes); a bare index draws the key from torch's global generator.

    With ``one_to_many`` (MAT+), the pool and the image variant come from it instead: the image is then uint8, or
    float in [0, 1] when augmented (``collate`` takes both); the item keeps index ``i`` either way, so a generated
    image counts as the same image as its source.
    """

    def __init__(
        self, store: ImageStore, caption_pool: CaptionSampler, k: int, one_to_many: OneToMany | None = None
    ) -> None:
        self.store, self.caption_pool, self.k = store, caption_pool, k
        self.one_to_many = one_to_many

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, list[str], int, int]:
        i, key = index if isinstance(index, tuple) else (index, int(torch.randint(2**62, ())))
        image = self.store[i]
        # One key seeds this item's text and image randomness, independent of how many numbers EDA or the image
        # augmentation consume.
        gen = torch.Generator().manual_seed(key)
        if self.one_to_many is None:
            pool = self.caption_pool(i)
        else:
            pool = self.one_to_many.caption_pool(i, random.Random(key))
            image = self.one_to_many.image(i, image, torch.Generator().manual_seed(key))
        if len(pool) >= self.k:
            idx = torch.randperm(len(pool), generator=gen)[: self.k].tolist()
        else:
            idx = torch.randint(len(pool), (self.k,), generator=gen).tolist()
        return image, [pool[j] for j in idx], i, key


class EvalSet(Dataset):
    """Item ``i``: (uint8 image[3, S, S], all captions of image ``i``, i)."""

    def __init__(self, store: ImageStore, records: Sequence[ImageCaptions]) -> None:
        self.store, self.records = store, records

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[Tensor, list[str], int]:
        return self.store[i], self.records[i].captions, i

    @property
    def captions(self) -> list[str]:
        return [c for r in self.records for c in r.captions]

    @property
    def txt2img(self) -> Tensor:
        return torch.tensor([i for i, r in enumerate(self.records) for _ in r.captions], dtype=torch.long)


class CaptionPlanner(Protocol):
    """What :class:`Collate` asks of a text attack's store (``mat_lightning.attacks.store.CandidateStore``)."""

    key: str

    def plan(self, captions: Sequence[str]) -> Any: ...


class Collate:
    """:func:`collate`, plus each planner's plan of the batch's captions (``RetrievalBatch.caption_plans``).

    It runs in the DataLoader's workers: the store lookups, strings and token-id tensors of the text attacks are
    ready when the batch reaches the training step, which keeps only model work. Pickled to the workers with the
    planners (a store pickles as its folder and re-opens its memory-mapped files there).
    """

    def __init__(self, planners: Sequence[CaptionPlanner] = ()) -> None:
        self.planners = list(planners)

    def __call__(self, items: list[tuple]) -> RetrievalBatch:
        batch = collate(items)
        if self.planners:
            batch.caption_plans = {p.key: p.plan(batch.captions) for p in self.planners}
        return batch


def collate(items: list[tuple]) -> RetrievalBatch:
    """Items ``(image, captions, index[, key])`` of uint8 images (decoded) or float images in [0, 1] (augmented) ->
    a batch of float images in [0, 1] (``sample_keys`` when the items carry keys)."""
    if all(item[0].dtype == torch.uint8 for item in items):
        images = torch.stack([item[0] for item in items]).float().div_(255)
    else:
        images = torch.stack([im.float().div(255) if im.dtype == torch.uint8 else im for im, *_ in items])
    captions = [c for item in items for c in item[1]]
    txt2img = torch.tensor([b for b, item in enumerate(items) for _ in item[1]], dtype=torch.long)
    image_ids = torch.tensor([item[2] for item in items], dtype=torch.long)
    keys = torch.tensor([item[3] for item in items], dtype=torch.long) if len(items[0]) > 3 else None
    return RetrievalBatch(images, captions, txt2img, image_ids, keys)


class RetrievalDataModule(L.LightningDataModule):
    """Image-caption retrieval data: the synthetic world, Flickr30K or COCO (Karpathy splits), or your own files.

    Args:
        dataset: ``synthetic`` (a generated world's Karpathy file), ``flickr30k``, ``coco``, or ``custom``.
        root: data folder (real data sets). Annotation and image paths default to files inside it.
        world: the synthetic world's preset (``default``, ``tiny``) the ``mat`` CLI generates ``annotations`` from
            when ``dataset=synthetic`` (:func:`mat_lightning.synthetic.resolve_config`); recorded here only.
        annotations: the annotation file: one Karpathy file for all splits, or a mapping
            ``{train: ..., val: ..., test: ...}`` of ALBEF-style files. Default: ``root/dataset_<name>.json``.
            With ``dataset=synthetic``, required: the CLI sets it; from Python, give
            ``mat_lightning.synthetic.ensure_world(<preset>)``.
        image_root: folder the annotation's image paths are relative to (default: ``root``; for Karpathy Flickr30K,
            ``root/flickr30k-images`` when it exists).
        format: annotation layout, ``auto`` detects it.
        train_split, val_split, test_split: Karpathy split names.
        batch_size: training images per batch (each with ``captions_per_image`` captions).
        captions_per_image: ``k``, positives sampled per image per training batch.
        eval_batch_size: images per evaluation batch (each with all its captions).
        max_eval_images: evaluate on the first N images of val/test only (a quick look; full splits otherwise).
        image_size: side in pixels; default: the encoder's ``image_size`` (read at ``setup``).
        preload: decode all images into memory at setup (default: on for the synthetic world).
        num_workers: DataLoader workers; images are decoded and resized in them (8 or more feed a GPU).
        pin_memory: page-locked batches for faster host-to-GPU copies; default: on when CUDA is available.
        persistent_workers: keep the workers alive between epochs and evaluations (only with ``num_workers > 0``).
        one_to_many: MAT+'s 1:N augmentation of training pairs (extra captions from EDA, LM rewrites and I2T files;
            generated images and image augmentation), see :class:`~mat_lightning.data.augment.pairs.OneToMany`.
            None: train on the ground-truth pairs only. Used for the train split only.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        world: str = "default",
        annotations: str | dict[str, str] | None = None,
        image_root: str | None = None,
        format: Format = "auto",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        batch_size: int = 128,
        captions_per_image: int = 1,
        eval_batch_size: int = 128,
        max_eval_images: int | None = None,
        image_size: int | None = None,
        preload: bool | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        one_to_many: OneToMany | None = None,
    ) -> None:
        super().__init__()
        if dataset not in ("synthetic", "flickr30k", "coco", "custom"):
            raise ConfigError(f"data.dataset={dataset!r}: use synthetic, flickr30k, coco or custom")
        if dataset != "synthetic" and root is None and annotations is None:
            raise ConfigError(
                f"data.dataset={dataset!r} needs --data.root=<folder> (or --data.annotations=<file>)"
            )
        for key, value in (
            ("captions_per_image", captions_per_image),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_eval_images", max_eval_images or 1),
        ):
            if value < 1:
                raise ConfigError(f"data.{key}={value}: must be >= 1")
        if dataset == "synthetic" and annotations is None:
            raise unresolved_synthetic_name(
                "data.dataset", dataset, f"ensure_world({world!r}) as annotations= (with dataset='synthetic')"
            )
        # one_to_many is an object (its configuration is in the CLI's config.yaml), not a hyperparameter value.
        self.save_hyperparameters(logger=False, ignore=["one_to_many"])
        self.one_to_many = one_to_many
        self.dataset, self.root, self.world = dataset, root, world
        self.annotations, self.image_root, self.format = annotations, image_root, format
        self.splits = {"fit": train_split, "validate": val_split, "test": test_split}
        self.batch_size, self.captions_per_image = batch_size, captions_per_image
        self.eval_batch_size, self.max_eval_images = eval_batch_size, max_eval_images
        self.image_size, self.num_workers = image_size, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.preload = dataset == "synthetic" if preload is None else preload
        self.records: dict[str, list[ImageCaptions]] = {}
        self._split_files: dict[Path, str] = {}
        self.train_set: TrainSet | None = None
        self.eval_sets: dict[str, EvalSet] = {}
        self.caption_planners: list[CaptionPlanner] = []  # attach_caption_planners()

    # -- where the files are --------------------------------------------------------------------------------------

    def annotation_file(self, split: str) -> Path:
        if isinstance(self.annotations, dict):
            if split not in self.annotations:
                raise ConfigError(
                    f"data.annotations has no file for split {split!r} (keys: {sorted(self.annotations)})"
                )
            return Path(self.annotations[split])
        if self.annotations is not None:
            return Path(self.annotations)
        if self.dataset not in DEFAULT_ANNOTATIONS:
            raise ConfigError("data.dataset=custom needs --data.annotations=<file or {split: file}>")
        return find_annotation_file(Path(self.root), self.dataset, split)[1]

    def layout(self, split: str) -> str:
        """The annotation layout of ``split`` (``karpathy``, ``albef``, ``clip_benchmark``; ``synthetic``)."""
        if self.dataset == "synthetic":
            return "karpathy (synthetic world)"
        if self.annotations is None and self.dataset in DEFAULT_ANNOTATIONS:
            return find_annotation_file(Path(self.root), self.dataset, split)[0]
        path = self.annotation_file(split)
        if path.suffix == ".txt":
            return "clip_benchmark"
        from mat_lightning.data.formats import detect_format, load_json

        return detect_format(load_json(path), path)

    def _image_roots(self, annotation: Path) -> list[Path]:
        """Folders the image paths may be relative to, most likely first."""
        if self.image_root is not None:
            return [Path(self.image_root)]
        base = Path(self.root) if self.root is not None else annotation.parent
        # Karpathy's Flickr30K file names carry no folder; the images usually sit in flickr30k-images/. CLIP_benchmark's
        # COCO file names carry none either: they sit in val2014/ (train2014/ for train).
        if self.dataset == "flickr30k":
            return [base, base / "flickr30k-images"]
        if self.dataset == "coco":
            return [base, base / "val2014", base / "train2014"]
        return [base]

    def read_split(self, split: str) -> list[ImageCaptions]:
        """Records of one split (cached); raises DataError when a file or image is missing."""
        if split not in self.records:
            if self.root is not None and self.dataset != "synthetic" and not Path(self.root).is_dir():
                raise DataError(f"data folder not found: {self.root}. Check --data.root.")
            path = self.annotation_file(split)
            roots = self._image_roots(path)
            try:
                records = read_annotations(path, roots[0], split, self.format)
            except SplitNotFound as e:
                options = [
                    f"--data.{k}_split"
                    for k, v in zip(("train", "val", "test"), self.splits.values(), strict=True)
                    if v == split
                ]
                raise SplitNotFound(f"{e}; check {' / '.join(options) or 'the split name'}") from None
            except DataError as e:
                if is_cached(path):
                    raise DataError(f"{e}\n{corrupt_cache_hint(path.parent)}") from None
                raise
            if all(r.split is None for r in records):  # an ALBEF-style file: one split per file
                other = self._split_files.setdefault(path.resolve(), split)
                if other != split:
                    raise ConfigError(
                        f"{path} has no split field (ALBEF layout), so it cannot serve both the {other!r} and the "
                        f"{split!r} split: training would see the evaluation images. Give one file per split: "
                        "--data.annotations='{train: ..., val: ..., test: ...}'"
                    )
            for alt in roots[1:]:
                if not records[0].image_path.is_file() and (alt / records[0].image_id).is_file():
                    for r in records:
                        r.image_path = alt / r.image_id
            check_images_exist(records, path)
            self.records[split] = records
        return self.records[split]

    # -- datasets ---------------------------------------------------------------------------------------------------

    def _resolve_image_size(self) -> int:
        if self.image_size is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            encoder = getattr(module, "encoder", None)
            if encoder is None:
                raise ConfigError("data.image_size is not set and there is no encoder to take it from")
            self.image_size = int(encoder.image_size)
        return self.image_size

    def caption_pool(self, records: Sequence[ImageCaptions]) -> CaptionSampler:
        """Captions eligible as positives of image ``i``: the ground truth (``one_to_many`` replaces it in MAT+)."""
        # A partial, not a lambda: spawned DataLoader workers (macOS, Windows) pickle the data set.
        return partial(_ground_truth, records)

    def eval_set(self, stage: str) -> EvalSet:
        """The evaluation set of ``validate`` or ``test`` (limited to ``max_eval_images``)."""
        if stage not in self.eval_sets:
            records = self.read_split(self.splits[stage])
            if self.max_eval_images is not None:
                records = records[: self.max_eval_images]
            if not records:
                raise DataError(
                    f"no evaluation images in split {self.splits[stage]!r} (max_eval_images={self.max_eval_images})"
                )
            store = ImageStore([r.image_path for r in records], self._resolve_image_size(), self.preload)
            self.eval_sets[stage] = EvalSet(store, records)
        return self.eval_sets[stage]

    def probe_eval_images(self, stage: str) -> None:
        """Every image the ``stage`` evaluation will read opens (:func:`probe_image`): before ``fit`` trains, a
        broken validation or test image fails in seconds instead of after training."""
        records = self.read_split(self.splits[stage])[: self.max_eval_images]
        for r in records:
            probe_image(r.image_path, self.image_size or 224)

    def check_disjoint(self, stage: str) -> None:
        """The ``stage`` split shares no image (path or content) with the train split, if training has read it."""
        train, split = self.splits["fit"], self.splits[stage]
        if train not in self.records or split == train:
            return
        pairs = shared_images(self.records[train], self.read_split(split))
        if pairs:
            a, b = pairs[0]
            raise DataError(
                f"{len(pairs)} images of the {split!r} split are also in the {train!r} split (the same file or the "
                f"same content), e.g. {b.image_path} and {a.image_path}: evaluation on training images inflates "
                "recall. Remove them from one split (mat data check lists them)"
            )

    def setup(self, stage: str) -> None:
        size = self._resolve_image_size()
        if stage == "fit" and self.train_set is None:
            records = self.read_split(self.splits["fit"])
            store = ImageStore([r.image_path for r in records], size, self.preload)
            if self.one_to_many is not None:
                self.one_to_many.bind(records, size, cache=self.preload)
                log.info("train pairs augmented 1:N by %r", self.one_to_many)
            self.train_set = TrainSet(
                store, self.caption_pool(records), self.captions_per_image, self.one_to_many
            )
            log.info("train split %r: %d images", self.splits["fit"], len(records))
        if stage in ("fit", "validate"):
            self.eval_set("validate")
            self.check_disjoint("validate")
        if stage == "test":
            self.eval_set("test")
            self.check_disjoint("test")

    def _processes(self) -> tuple[int, int]:
        """(world size, global rank) of the attached trainer; (1, 0) without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Our own samplers on one process and under DDP (Lightning keeps DistributedSampler subclasses): the same
        # global batches and keys for any number of processes (data.sampling). batch_size is per process.
        world_size, rank = self._processes()
        if shuffle:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything, the same on every rank
            sampler = TrainShards(ds, world_size, rank, seed)
        else:
            if len(ds) < world_size:  # a process without images would wait forever for the others' embeddings
                raise ConfigError(
                    f"{len(ds)} evaluation images for {world_size} processes: each process needs at least one "
                    "(raise data.max_eval_images or use fewer devices)"
                )
            sampler = EvalShards(ds, world_size, rank)
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle and len(sampler) > batch_size,
            num_workers=self.num_workers,
            collate_fn=Collate(self.caption_planners) if shuffle else collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_captions(self) -> list[str]:
        """Every caption a training batch can hold that is known before training (ground truth, and the 1:N
        augmentation's caption files; not EDA's random edits): what a text attack's candidate store covers."""
        if self.train_set is None:
            self.setup("fit")
        if self.one_to_many is not None:
            return list(
                dict.fromkeys(
                    c for i in range(len(self.train_set)) for c in self.one_to_many.fixed_captions(i)
                )
            )
        records = self.read_split(self.splits["fit"])
        return list(dict.fromkeys(c for r in records for c in r.captions))

    def attach_caption_planners(self, planners: Sequence[CaptionPlanner]) -> None:
        """Training batches carry each planner's plan of their captions (:class:`Collate`)."""
        self.caption_planners = list(planners)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("validate"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set("test"), self.eval_batch_size, shuffle=False)
