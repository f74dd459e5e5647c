"""The toy base's checkpoints and locks: Trainer callbacks that save every few minutes and cap
the training time, the resume point a killed run continues from, an exclusive lock per config,
and an atomic save of the finished model (`toy_base` trains; this keeps its runs resumable)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def time_cap_callback(max_minutes: float):
    from transformers import TrainerCallback

    class TimeCap(TrainerCallback):
        """Stops training when the time cap is reached (a safety net, not the schedule)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.start > 60 * max_minutes:
                log.warning("toy-base: time cap of %.1f min reached at step %d",
                            max_minutes, state.global_step)
                control.should_training_stop = True

    return TimeCap()


def periodic_save_callback(minutes: float):
    from transformers import TrainerCallback

    class SaveEvery(TrainerCallback):
        """Asks Trainer for a checkpoint every `minutes` of training (Trainer saves only by
        steps or epochs; time suits a model whose step time varies with the machine)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.last > 60 * minutes and state.global_step < state.max_steps:
                control.should_save = True
                self.last = time.monotonic()

    return SaveEvery()


def save_atomically(model, tokenizer, target: Path) -> None:
    """Save to a temporary folder beside `target`, then rename (no half-written model)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another run finished the same config first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def identity(corpus, tokenizer) -> dict:
    """Hashes of the corpus and tokenizer: a checkpoint only fits the ones it was trained on."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    return {"corpus": digest(json.dumps(corpus)),
            "tokenizer": digest(tokenizer.backend_tokenizer.to_str())}


def resume_point(work: Path, identity: dict) -> Path | None:
    """The last complete checkpoint in `work` made with this corpus and tokenizer, or None.

    Checkpoints of another corpus or tokenizer (code changed in between) are removed, as are
    half-written ones (a kill while saving)."""
    from backtrack.fileio import read_json, write_json
    from backtrack.train import complete_checkpoints

    previous = read_json(work / "identity.json")
    if previous is not None and previous != identity:
        log.warning("toy-base: corpus or tokenizer differ from the interrupted run's; "
                    "starting over")
        shutil.rmtree(work)
    write_json(work / "identity.json", identity)
    complete, incomplete = complete_checkpoints(work / "trainer")
    for path in incomplete:
        shutil.rmtree(path, ignore_errors=True)
    if complete:
        log.info("toy-base: resuming from %s", complete[-1])
    return complete[-1] if complete else None


@contextlib.contextmanager
def exclusive(lock_file: Path):
    """Hold an exclusive lock: two runs of one config must not train into one work folder
    (the second waits, then finds the model cached). No lock where fcntl is missing."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
