"""The asset cache folder, ``$MAT_CACHE_DIR`` (default ``~/.cache/mat_lightning``).

The synthetic world (:mod:`mat_lightning.synthetic`) builds its data set, CLIP and masked LM there; lower layers
keep small helper files there too (the TextAttack adapter's NLTK stop-word list). This module only says where the
folder is and how to talk about a broken file in it: it imports nothing of the package.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created). ``MAT_CACHE_DIR`` set but empty (``MAT_CACHE_DIR= mat ...``, an unset shell
    variable in a script) counts as unset: it would otherwise name the working directory."""
    value = os.environ.get("MAT_CACHE_DIR", "").strip()
    return Path(value or Path.home() / ".cache" / "mat_lightning").expanduser()


def is_cached(path: str | Path) -> bool:
    """Whether ``path`` lies inside the cache folder (a built asset, which deleting rebuilds)."""
    try:
        return Path(path).resolve().is_relative_to(cache_dir().resolve())
    except OSError:
        return False


def corrupt_cache_hint(path: str | Path) -> str:
    """What to say when a cached asset cannot be read: which file, and that deleting it rebuilds it."""
    return (
        f"{path} is a cached asset of the synthetic world and is corrupt (an interrupted copy or a full disk?): "
        f"delete it (rm -r '{path}') and it is rebuilt on the next run"
    )
