"""``mat data check``: read every split of a data set, decode every image, and print a summary.

Run it once after downloading Flickr30K or COCO: it finds missing or corrupt files before a training run does.
Exits with status 2 and one message per kind of problem (naming the files) when something is wrong. A test-only
set is fine: splits the annotations do not have (``--data.annotations='{test: file}'``, or a Karpathy file with only
``test`` entries) are listed as absent, and missing images are reported once, not once per split.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from mat_lightning.data.datamodule import RetrievalDataModule, load_image
from mat_lightning.errors import DataError


def main(argv: list[str], resolve: Callable[[Namespace], Namespace] | None = None) -> None:
    """``mat data check`` with ``argv``; ``resolve`` rewrites the parsed config before the data module is built
    (the CLI passes :func:`mat_lightning.synthetic.resolve_config`, which turns ``dataset: synthetic`` into the
    world's annotation file)."""
    parser = ArgumentParser(
        prog="mat data check",
        description=__doc__.splitlines()[0],
        parser_mode="omegaconf",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-c", "--config", action="config", help="A config file with a data: section (an experiment)."
    )
    parser.add_class_arguments(RetrievalDataModule, "data")
    parser.add_argument(
        "--decode", type=bool, default=True, help="Decode every image (slower, finds corrupt files)."
    )
    parser.add_argument(
        "--image_size", type=int, default=224, help="Size the images are decoded to when checking."
    )
    cfg = parser.parse_args(argv, defaults=True)
    if resolve is not None:
        cfg = resolve(cfg)
    dm: RetrievalDataModule = parser.instantiate(cfg).data
    dm.prepare_data()
    console = Console()
    table = Table(title=f"{dm.dataset} ({dm.root or 'synthetic world'})")
    for col in ("split", "layout", "images", "captions", "captions/image", "status"):
        table.add_column(col)
    problems: list[str] = []
    owners: dict[str, tuple[str, Path]] = {}  # content hash -> (split, first file with that content)
    missing: list[tuple[str, str]] = []  # (split, message) of the splits whose images are missing
    present = 0
    rotated: list[str] = []  # images whose EXIF orientation a viewer would apply
    for _stage, split in dm.splits.items():
        if isinstance(dm.annotations, dict) and split not in dm.annotations:
            table.add_row(split, "-", "-", "-", "-", "absent (no annotation file given)")
            continue
        try:
            layout = dm.layout(split)
        except DataError:
            layout = "-"
        try:
            records = dm.read_split(split)
        except DataError as e:
            if "no images in split" in str(e):
                table.add_row(split, layout, "-", "-", "-", "absent from the annotations")
            elif "are missing" in str(e):
                table.add_row(split, layout, "-", "-", "-", "[red]images missing")
                missing.append((split, str(e)))
            else:
                table.add_row(split, layout, "-", "-", "-", "[red]error")
                problems.append(str(e))
            continue
        present += 1
        bad: list[str] = []
        if cfg.decode:
            for r in tqdm(records, desc=f"decoding {split}", leave=False):
                try:
                    load_image(r.image_path, cfg.image_size)
                except DataError as e:
                    bad.append(str(e))
                    continue
                orientation = exif_orientation(r.image_path)
                if orientation in ORIENTATIONS:
                    rotated.append(f"{r.image_path} ({ORIENTATIONS[orientation]})")
        repeated = [
            r for r in records if r.entries > 1 and r.split is not None
        ]  # Karpathy: one entry per image
        if repeated:
            problems.append(
                f"{len(repeated)} images of split {split!r} are listed more than once (their captions were merged), "
                f"e.g. {repeated[0].image_id}; list each image once"
            )
        copies = _content_duplicates(records, split, owners)
        bad += copies
        per = [len(r.captions) for r in records]
        status = "[green]ok" if not bad else f"[red]{len(bad)} bad images"
        table.add_row(split, layout, f"{len(records):,}", f"{sum(per):,}", caption_counts(per), status)
        if bad:
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            problems.append(
                f"{len(bad)} images of split {split!r} cannot be used:\n  " + "\n  ".join(bad[:20]) + more
            )
    console.print(table)
    if rotated:
        more = f"\n  ... and {len(rotated) - 5} more" if len(rotated) > 5 else ""
        print(
            f"note: {len(rotated)} images carry an EXIF orientation other than 'as stored'; they are read as stored, "
            "not rotated, as the reference implementations read them (README: Data):\n  "
            + "\n  ".join(rotated[:5])
            + more
        )
    if missing:  # one message: the splits usually share the image folder
        others = ", ".join(split for split, _ in missing[1:])
        problems.insert(
            0, f"split {missing[0][0]!r}: {missing[0][1]}" + (f"\n(likewise in: {others})" if others else "")
        )
    if not present and not problems:
        problems.append(f"no split of {', '.join(dm.splits.values())} is in the annotations")
    if problems:
        raise DataError("\n".join(problems))


#: EXIF orientation tag values (TIFF 6.0), as the transform a viewer applies before showing the image.
ORIENTATIONS = {
    2: "orientation 2: mirrored",
    3: "orientation 3: rotated 180°",
    4: "orientation 4: flipped upside down",
    5: "orientation 5: mirrored and rotated 90°",
    6: "orientation 6: rotated 90° clockwise",
    7: "orientation 7: mirrored and rotated 270°",
    8: "orientation 8: rotated 90° counter-clockwise",
}


def exif_orientation(path: Path) -> int:
    """The EXIF orientation tag (0x0112) of an image file, 1 ("as stored") when it has none or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation (the pixels decoded fine)
        return 1
    return value if isinstance(value, int) else 1


def caption_counts(per_image: list[int]) -> str:
    """``[5, 5, 6]`` -> ``"5 x2, 6 x1"``: how many images have each number of captions (COCO test: ten with 6)."""
    counts = Counter(per_image)
    return ", ".join(f"{n} x{counts[n]:,}" for n in sorted(counts))


def _content_duplicates(records, split: str, owners: dict[str, tuple[str, Path]]) -> list[str]:
    """Files whose bytes equal an earlier file's, in this split or another (a copy under another name).

    A copy inside one split makes two "different" images of one picture (recall counts a hit on the copy as a
    miss); across splits it leaks evaluation images into training.
    """
    found = []
    for r in records:
        try:
            digest = hashlib.sha256(Path(r.image_path).read_bytes()).hexdigest()
        except OSError:
            continue  # reported as missing or unreadable elsewhere
        if digest in owners:
            other_split, other = owners[digest]
            where = "the same split" if other_split == split else f"split {other_split!r}"
            found.append(f"{r.image_path} has the same content as {other} ({where})")
        else:
            owners.setdefault(digest, (split, r.image_path))
    return found
