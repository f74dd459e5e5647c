"""Run metadata: every stage writes `run.json` beside its outputs.

It records what is needed to reproduce or audit a stage: the resolved config, the seed, the
versions of the packages that shape results, the git commit and hashes of the input files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

TRACKED_PACKAGES = (
    "backtrack", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
    "tokenizers", "math-verify", "vllm", "numpy",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def hash_path(path: str | os.PathLike) -> str | None:
    """sha256 of a file, or of every file under a directory (names and bytes, sorted)."""
    path = Path(path)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def write_run_info(
    out_dir: str | os.PathLike,
    config: Any,
    stage: str,
    inputs: Iterable[str | os.PathLike] = (),
    extra: dict | None = None,
) -> Path:
    """Write `run.json` into `out_dir` atomically and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = config_to_dict(config)
    info = {
        "stage": stage,
        "config": resolved,
        "seed": resolved.get("seed"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "input_hashes": {str(p): hash_path(p) for p in inputs},
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    from backtrack.fileio import write_json

    return write_json(out_dir / "run.json", info)
