"""Transfer: replay adversarial examples crafted on another model (an exported set) against this one.

``mat robust-eval --export DIR`` writes each attacked test split as a set: ``DIR/<attack>_eps<ε>/`` with
``captions.json`` (ALBEF layout plus each entry's split ``image_index``), ``images/<index>.png`` (8-bit) and
``set.json`` (the attack's name, budget and settings; ``DIR/source.json`` names the model that crafted it).
:class:`Transferred` is an attack whose "perturbation" is a lookup: for every image of the batch (by its split
index) it returns the exported image and that image's exported captions. Evaluated through the usual robust
evaluation, a target model then gets its own clean row on its own inputs, the transferred rows, and both ASR
definitions against **its own** clean hits, as SGA's transfer evaluation computes them.

As the references' transfer scripts do, images are read back at 8 bits (the PNG) and resized bicubically to the
target's input size when it differs; captions are plain strings, so each target tokenises them itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mat_lightning.attacks.base import Attack, AttackResult
from mat_lightning.errors import ConfigError
from mat_lightning.models.encoder import VLEncoder


def load_set_index(folder: Path) -> tuple[dict[int, dict], dict]:
    """``captions.json`` keyed by ``image_index``, and ``set.json`` ({} when absent) of one exported set."""
    index_file = folder / "captions.json"
    if not index_file.is_file():
        raise ConfigError(
            f"{folder}: no captions.json, not an exported adversarial set (write one with mat robust-eval "
            "--export DIR; a set is one of DIR's <attack>_eps<ε> folders)"
        )
    try:
        entries = json.loads(index_file.read_text())
        by_index = {
            int(e["image_index"]): {"image": str(e["image"]), "caption": list(e["caption"])} for e in entries
        }
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{index_file}: not an exported set's index ({type(e).__name__}: {e})") from None
    manifest_file = folder / "set.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    return by_index, manifest


def find_sets(folder: str | Path) -> list[Path]:
    """The exported sets in ``folder``: itself if it holds ``captions.json``, else its subfolders that do."""
    root = Path(folder)
    if (root / "captions.json").is_file():
        return [root]
    sets = sorted(p.parent for p in root.glob("*/captions.json"))
    if not sets:
        raise ConfigError(
            f"{root}: no exported sets (folders with captions.json); write them with mat robust-eval --export {root}"
        )
    return sets


class Transferred(Attack):
    """The adversarial images and captions of an exported set, looked up by split index.

    Args:
        path: one exported set (a folder with ``captions.json``).
        name: row label (default ``transfer_<folder name>``, e.g. ``transfer_sga_eps2``).
        seed: unused (no randomness); kept for the common signature.
    """

    name = "transfer"
    modality = "multimodal"

    def __init__(self, path: str, name: str | None = None, seed: int | None = 0) -> None:
        folder = Path(path)
        super().__init__(seed=seed, name=name or f"transfer_{folder.name}")
        self.path = str(folder)
        self._entries, manifest = load_set_index(folder)
        self.source_attack = manifest.get("attack")
        self.source_eps_255 = manifest.get("eps_255")
        self.modality = manifest.get("modality", "multimodal")
        source = folder.parent / "source.json"
        self.source = json.loads(source.read_text()) if source.is_file() else None

    def forward(
        self, encoder: VLEncoder, images: Tensor, captions: list[str], txt2img: Tensor
    ) -> AttackResult:
        if self.image_ids is None:
            raise ConfigError(
                f"{self.name}: replaying {self.path} needs each image's split index (image_ids)"
            )
        size = tuple(images.shape[-2:])
        out_images, out_captions = [], list(captions)
        rows = txt2img.tolist()
        for b, image_id in enumerate(self.image_ids.tolist()):
            entry = self._entries.get(int(image_id))
            if entry is None:
                raise ConfigError(
                    f"{self.path} has no adversarial image for test image {image_id}: it was crafted on another "
                    f"split or on fewer images ({len(self._entries)}); evaluate the same test split"
                )
            positions = [t for t, row in enumerate(rows) if row == b]
            if len(positions) != len(entry["caption"]):
                raise ConfigError(
                    f"{self.path}: test image {image_id} has {len(positions)} captions here but "
                    f"{len(entry['caption'])} in the exported set: not the same data set"
                )
            for t, caption in zip(positions, entry["caption"], strict=True):
                out_captions[t] = caption
            out_images.append(self._image(entry["image"], size))
        return AttackResult(torch.stack(out_images).to(images), out_captions)

    def _image(self, relative: str, size: tuple[int, int]) -> Tensor:
        """The exported 8-bit image as float[3, H, W] in [0, 1], resized bicubically to ``size`` if needed."""
        from PIL import Image

        with Image.open(Path(self.path) / relative) as im:
            pixels = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            image = pixels.view(im.height, im.width, 3).permute(2, 0, 1).float() / 255
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
        return image
