"""Files on disk: atomic writes, shared by every layer that writes files (data generators, results, assets)."""

from __future__ import annotations

import os
from pathlib import Path

from mat_lightning.errors import WriteError


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see half a file.

    Raises:
        WriteError: the write failed (a full disk, no permission): ``path`` is untouched (the previous content, or
            no file) and the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError(
            f"cannot write {path} ({e.strerror or e}); it was left as it was: free disk space or choose a "
            "writable folder, then re-run"
        ) from e
