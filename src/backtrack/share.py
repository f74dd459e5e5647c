"""Steps shared between the runs of a study: computed once, linked into every run that has them.

A step's digest (`pipeline.config_hash`: its hashed config fields and its upstream digests)
says what it produces wherever it runs, so runs whose step has the same digest can read one
copy. The copy lives in `<root>/<step>-<digest>/`, each output at the path it has under a
run's output_dir, and a run gets one relative symlink per output folder.

A share is published whole: the run's outputs move into a hidden staging folder, `share.json`
is written there, and one rename makes it the share; a share folder without its marker never
exists. A kill before that rename leaves the step to run again (outputs already moved into
the staging folder are lost; `.<step>-<digest>.tmp-*` folders left behind may be deleted); a
kill after it leaves a complete share that the next attempt links. A share is never written
through: a run's symlinks are removed before its step runs in the run itself.

A study may also read other studies' share folders (`reuse_shares`): a step complete there,
with the same digest, is imported (hard links, or copies across file systems) into this
study's own share before it is linked, so the study stays whole if the other one is deleted.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from backtrack.errors import UserError
from backtrack.fileio import write_json
from backtrack.layout import RunLayout

# Stages whose outputs are folders under output_dir with nothing run-specific in them. Not the
# toy base (its model is shared through its own cache) and not the report (one per run).
SHARED_STAGES = frozenset({"sample", "backtrack", "verify", "build", "train", "rl", "eval"})
MARKER = "share.json"


@dataclass(frozen=True)
class StepShare:
    """The share folder of a study (`<study output_dir>/shared/`), and other studies' share
    folders it reads from (`others`, never written)."""

    root: Path
    others: tuple[Path, ...] = ()

    def folder(self, name: str, digest: str) -> Path:
        return self.root / f"{name}-{digest}"

    def complete(self, name: str, digest: str) -> bool:
        """Whether the step is in this share, importing it first from another study's share
        that has it complete."""
        if (self.folder(name, digest) / MARKER).is_file():
            return True
        source = self.elsewhere(f"{name}-{digest}")
        if source is not None:
            self._import(source, self.folder(name, digest))
        return source is not None

    def elsewhere(self, folder_name: str) -> Path | None:
        """The first of `others`' complete copies of share `folder_name` (`<step>-<digest>`)."""
        return next((other / folder_name for other in self.others
                     if (other / folder_name / MARKER).is_file()), None)

    def _import(self, source: Path, final: Path) -> None:
        """Copy another study's complete share into this one, published by one rename."""
        staging = self.root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(source, staging, symlinks=True, copy_function=_link_or_copy)
        try:
            os.rename(staging, final)
        except OSError:
            shutil.rmtree(staging)  # published meanwhile by another process
            if not (final / MARKER).is_file():
                raise UserError(f"{final}: exists without {MARKER} (not made by backtrack); "
                                "move it away") from None
        print(f"[run] imported the share {source} into {final}", flush=True)

    def link(self, step, digest: str, layout: RunLayout) -> Path:
        """Point the run's outputs of `step` at the share; an output the share lacks (e.g.
        checkpoints it never kept) is left out, and a real folder in the way is set aside to
        `run/stale/`."""
        share = self.folder(step.name, digest)
        for out in step.outputs():
            target = share / out.relative_to(layout.output_dir)
            if os.path.lexists(out) and not out.is_symlink():
                _set_aside(out, layout, step.name)
            if target.exists():
                _symlink(target, out)
            elif out.is_symlink():
                out.unlink()
        return share

    def detach(self, step) -> None:
        """Remove the run's symlinks to shares before the step runs in the run."""
        for out in step.outputs():
            if out.is_symlink():
                out.unlink()

    def publish(self, step, digest: str, layout: RunLayout, info: dict) -> Path | None:
        """Move the outputs the step just wrote into its share and link them back. When the
        share exists already (a forced re-run), the run keeps its own outputs (None)."""
        final = self.folder(step.name, digest)
        if self.complete(step.name, digest):
            return None
        staging = self.root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        for out in step.outputs():
            if out.exists() and not out.is_symlink():
                dest = staging / out.relative_to(layout.output_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(out, dest)
        write_json(staging / MARKER, {**info, "step": step.name, "digest": digest,
                                      "computed_in": str(layout.output_dir)})
        try:
            os.rename(staging, final)
        except OSError as exc:
            if not self.complete(step.name, digest):
                raise UserError(f"{final}: exists without {MARKER} (not made by backtrack); "
                                "move it away") from exc
            shutil.rmtree(staging)  # another process published the same step first
        self.link(step, digest, layout)
        return final


def _link_or_copy(source: str, dest: str) -> None:
    """A hard link (no bytes copied; the share's files are never written again), or a copy
    where the two folders are on different file systems."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _symlink(target: Path, link: Path) -> None:
    """Make `link` a relative symlink to `target`, replacing an older link in one rename."""
    link.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(os.path.abspath(target), os.path.abspath(link.parent))
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(relative, tmp, target_is_directory=True)
    os.replace(tmp, link)


def _set_aside(path: Path, layout: RunLayout, step_name: str) -> None:
    stale = layout.stale / time.strftime("%Y%m%d-%H%M%S")
    stale.mkdir(parents=True, exist_ok=True)
    name = str(path.relative_to(layout.output_dir)).replace(os.sep, "-")
    os.replace(path, stale / f"{step_name}-{name}-{uuid.uuid4().hex[:6]}")
    print(f"[run] {step_name}: moved {path} to {stale} (a shared copy replaces it)")
