"""``mat data check``: read every split of a data set, decode every image, and print a summary.

Run it once after downloading Flickr30K or COCO: it finds missing or corrupt files before a training run does.
Exits with status 2 and one message per kind of problem (naming the files) when something is wrong.
"""

from __future__ import annotations

from collections import Counter

from jsonargparse import ArgumentParser
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from mat_lightning.data.datamodule import RetrievalDataModule, load_image
from mat_lightning.errors import DataError


def main(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="mat data check", description=__doc__.splitlines()[0], parser_mode="omegaconf"
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
    dm: RetrievalDataModule = parser.instantiate_classes(cfg).data
    dm.prepare_data()
    console = Console()
    table = Table(title=f"{dm.dataset} ({dm.root or 'synthetic world'})")
    for col in ("split", "layout", "images", "captions", "captions/image", "status"):
        table.add_column(col)
    problems: list[str] = []
    for _stage, split in dm.splits.items():
        try:
            layout = dm.layout(split)
        except DataError:
            layout = "-"
        try:
            records = dm.read_split(split)
        except DataError as e:
            table.add_row(split, layout, "-", "-", "-", "[red]error")
            problems.append(str(e))
            continue
        bad: list[str] = []
        if cfg.decode:
            for r in tqdm(records, desc=f"decoding {split}", leave=False):
                try:
                    load_image(r.image_path, cfg.image_size)
                except DataError as e:
                    bad.append(str(e))
        per = [len(r.captions) for r in records]
        status = "[green]ok" if not bad else f"[red]{len(bad)} bad images"
        table.add_row(split, layout, f"{len(records):,}", f"{sum(per):,}", caption_counts(per), status)
        if bad:
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            problems.append(
                f"{len(bad)} images of split {split!r} cannot be used:\n  " + "\n  ".join(bad[:20]) + more
            )
    console.print(table)
    if problems:
        raise DataError("\n".join(problems))


def caption_counts(per_image: list[int]) -> str:
    """``[5, 5, 6]`` -> ``"5 x2, 6 x1"``: how many images have each number of captions (COCO test: ten with 6)."""
    counts = Counter(per_image)
    return ", ".join(f"{n} x{counts[n]:,}" for n in sorted(counts))
