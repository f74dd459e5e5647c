"""requirements/lock.txt and pyproject.toml agree: what pyproject declares is locked (at a version
its floor allows), and the lock pins nothing that neither pyproject nor a dependency asks for."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the lock is resolved on 3.11

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
NO_DEPS = REPO / "requirements" / "no-deps.txt"  # installed by `make install` with --no-deps


def read_lock(text: str) -> dict[str, Version]:
    """{canonical name: pinned version} from `name==version` lines; anything else is an error."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and ";" not in line, f"lock line {number} is not name==version"
        key = canonicalize_name(name)
        assert key not in pins, f"lock line {number}: {name} pinned twice"
        pins[key] = Version(version)
    return pins


def declared() -> list[Requirement]:
    """pyproject's dependencies, its test extra, and the packages `make install` adds --no-deps."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    lines += [n.strip() for n in NO_DEPS.read_text().splitlines() if n.strip()]
    return [Requirement(line) for line in lines]


def _requires(name: str, extras: tuple[str, ...]) -> list[Requirement]:
    """The installed distribution's requirements that apply here (with `extras` requested)."""
    try:
        lines = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    wanted = [Requirement(line) for line in lines]
    return [r for r in wanted if r.marker is None
            or any(r.marker.evaluate({"extra": e}) for e in ("", *extras))]


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def transitive(roots: list[Requirement], skip: set[str]) -> set[str]:
    """Canonical names of everything the installed `roots` require, recursively (roots not
    included unless required by another); `skip` names are not followed (installed --no-deps)."""
    seen: set[str] = set()
    stack = [(r.name, tuple(r.extras)) for r in roots if canonicalize_name(r.name) not in skip]
    while stack:
        name, extras = stack.pop()
        for req in _requires(name, extras):
            key = canonicalize_name(req.name)
            if key not in seen:
                seen.add(key)
                stack.append((req.name, tuple(req.extras)))
    return seen


def disagreements(lock_text: str) -> list[str]:
    """Every way the lock and pyproject disagree, as one line each (empty when they agree)."""
    pins = read_lock(lock_text)
    roots = declared()
    problems = []
    for req in roots:
        key = canonicalize_name(req.name)
        if key not in pins:
            problems.append(f"{req.name}: declared but not locked")
        elif not req.specifier.contains(pins[key], prereleases=True):
            problems.append(f"{req.name}: locked {pins[key]} outside the declared {req.specifier}")
    no_deps = {canonicalize_name(n) for n in NO_DEPS.read_text().split()}
    missing = [r.name for r in roots if not _installed(r.name) and canonicalize_name(r.name)
               not in no_deps]
    if missing:  # their dependencies cannot be read, so strays cannot be told apart
        return problems + [f"{name}: not installed here; run `make install`" for name in missing]
    allowed = {canonicalize_name(r.name) for r in roots} | transitive(roots, no_deps)
    problems += [f"{name}: locked but neither declared nor required by a declared package"
                 for name in sorted(set(pins) - allowed)]
    return problems


def test_lock_and_pyproject_agree():
    assert disagreements(LOCK.read_text()) == []


def test_torch_is_pinned_without_a_local_build_label():
    """`torch==2.13.0` matches the CPU build here and the CUDA build on a GPU machine."""
    pins = read_lock(LOCK.read_text())
    assert pins["torch"] == Version("2.13.0") and not pins["torch"].local


def test_a_missing_or_stray_pin_is_caught():
    lines = LOCK.read_text().splitlines()
    without_trl = "\n".join(line for line in lines if not line.startswith("trl=="))
    assert disagreements(without_trl) == ["trl: declared but not locked"]
    stray = LOCK.read_text() + "leftpad==1.0\n"
    assert disagreements(stray) == [
        "leftpad: locked but neither declared nor required by a declared package"]
    too_old = LOCK.read_text().replace("\ntrl==", "\ntrl==0.1.0\n#trl==")
    assert disagreements(too_old) == ["trl: locked 0.1.0 outside the declared >=0.19"]
