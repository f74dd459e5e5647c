"""Run metadata: every stage writes `run.json` beside its outputs.

It records what is needed to reproduce or audit a stage: the resolved config, the seed, the
versions of the packages that shape results, the machine (CPU model and torch's CPU kernels: a
tiny model trained on two CPUs can land elsewhere from floating-point differences alone), the git
commit and hashes of the input files.
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


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch's CPU kernel level (e.g. AVX2, AVX512) and threads, GPUs."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(), "gpus": None,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info


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
        "machine": machine_info(),
        "git_commit": git_commit(),
        "input_hashes": {str(p): hash_path(p) for p in inputs},
        "command": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    from backtrack.fileio import write_json

    return write_json(out_dir / "run.json", info)
