"""Small file helpers every stage uses: atomic writes, folder swaps, JSON reads, the cache root.

Stages must never leave a half-written file or folder behind (a killed run is re-run, and a
reader must not mistake a torn file for a finished one), so writes go to a temporary name and
are renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write `data` as JSON atomically; values JSON cannot hold are written with `str`."""
    return write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when it is missing or not valid JSON (e.g. torn)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished temp folder into place; an older folder is removed only afterwards."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cache_root() -> Path:
    """Where cached models live: `$BACKTRACK_CACHE`, else `~/.cache/backtrack`."""
    return Path(os.environ.get("BACKTRACK_CACHE", Path.home() / ".cache" / "backtrack"))
