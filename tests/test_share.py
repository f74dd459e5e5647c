"""Step sharing between runs (share.py through pipeline.run_steps): publish, link, skip, kills."""

from __future__ import annotations

import json
import os

import pytest

from backtrack import pipeline
from backtrack.sample import SampleConfig
from backtrack.share import MARKER, StepShare


class Counter:
    """A stand-in stage main that writes the sample stage's output folder (what a real sample
    step leaves: a folder of files); counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, config):
        self.calls += 1
        folder = os.path.join(config.output_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "records.jsonl"), "a") as handle:
            handle.write(json.dumps({"temperature": config.temperature}) + "\n")


def run(tmp_path, name: str, counter: Counter, share: StepShare | None, **config):
    out = tmp_path / name
    step = pipeline.Step("sample", "sample", SampleConfig(output_dir=str(out), **config),
                         counter, [])
    timings = pipeline.run_steps(pipeline.RunConfig(output_dir=str(out)), [step], share)
    marker = json.loads((out / "run" / "stages" / "sample.json").read_text())
    return timings["sample"]["status"], marker, out / "samples"


def test_identical_step_runs_once_and_is_linked_into_the_other_run(tmp_path):
    share, counter = StepShare(tmp_path / "shared"), Counter()
    status_a, marker_a, samples_a = run(tmp_path, "a", counter, share)
    status_b, marker_b, samples_b = run(tmp_path, "b", counter, share)
    assert (status_a, status_b, counter.calls) == ("ran", "linked", 1)
    assert marker_a["config_hash"] == marker_b["config_hash"] and marker_b["linked"] is True
    folder = tmp_path / "shared" / f"sample-{marker_a['config_hash']}"
    assert marker_a["shared"] == marker_b["shared"] == str(folder)
    for link in (samples_a, samples_b):  # relative links into the share, the records read back
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (folder / "samples").resolve()
        assert (link / "records.jsonl").read_text() == '{"temperature": 0.8}\n'
    info = json.loads((folder / MARKER).read_text())
    assert info["computed_in"] == str(tmp_path / "a") and info["step"] == "sample"
    assert run(tmp_path, "b", counter, share)[0] == "skipped" and counter.calls == 1
    # another config is another share; without a share a run keeps its own folder
    assert run(tmp_path, "c", counter, share, temperature=0.5)[0] == "ran"
    status, marker, samples = run(tmp_path, "d", counter, None)
    assert status == "ran" and "shared" not in marker and not samples.is_symlink()
    assert counter.calls == 3 and len(list((tmp_path / "shared").iterdir())) == 2


def test_a_kill_before_the_share_is_complete_leaves_the_step_to_run_again(tmp_path, monkeypatch):
    share, counter = StepShare(tmp_path / "shared"), Counter()
    real_rename = os.rename

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between staging and publishing

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "a", counter, share)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "a" / "run" / "stages" / "sample.json").exists()
    assert not [p for p in (tmp_path / "shared").iterdir() if not p.name.startswith(".")]
    status, marker, samples = run(tmp_path, "a", counter, share)  # runs again, then shares
    assert (status, counter.calls) == ("ran", 2) and samples.is_symlink()
    assert (samples / "records.jsonl").read_text().count("\n") == 1  # a fresh output, not torn


def test_a_complete_share_wins_over_a_runs_unfinished_output(tmp_path):
    """A run killed mid-step (its output half-written, no marker) links the share another run
    completed meanwhile and sets its own partial output aside."""
    share, counter = StepShare(tmp_path / "shared"), Counter()
    run(tmp_path, "a", counter, share)
    partial = tmp_path / "b" / "samples"
    partial.mkdir(parents=True)
    (partial / "records.jsonl").write_text("torn")
    status, _, samples = run(tmp_path, "b", counter, share)
    assert status == "linked" and samples.is_symlink() and counter.calls == 1
    (aside,) = (tmp_path / "b" / "run" / "stale").glob("*/sample-samples-*")
    assert (aside / "records.jsonl").read_text() == "torn"


def test_a_changed_step_never_writes_into_the_share_it_was_linked_to(tmp_path):
    share, counter = StepShare(tmp_path / "shared"), Counter()
    run(tmp_path, "a", counter, share)
    run(tmp_path, "b", counter, share)
    before = {p: p.read_text() for p in (tmp_path / "shared").rglob("records.jsonl")}
    status, _, samples = run(tmp_path, "b", counter, share, temperature=0.3)
    assert status == "ran" and counter.calls == 2
    assert {p: p.read_text() for p in before} == before  # the old share is untouched
    assert (samples / "records.jsonl").read_text() == '{"temperature": 0.3}\n'


def test_a_step_in_another_studys_share_is_imported_not_recomputed(tmp_path):
    counter = Counter()
    first = StepShare(tmp_path / "first" / "shared")
    assert run(tmp_path, "a", counter, first)[0] == "ran"
    second = StepShare(tmp_path / "second" / "shared", others=(first.root,))
    status, marker, samples = run(tmp_path, "b", counter, second)
    assert status == "linked" and counter.calls == 1
    own = second.folder("sample", marker["config_hash"])
    assert marker["shared"] == str(own) and (own / MARKER).is_file()
    source = first.folder("sample", marker["config_hash"]) / "samples" / "records.jsonl"
    imported = own / "samples" / "records.jsonl"
    assert os.path.samefile(source, imported)  # hard links: no bytes copied
    info = json.loads((own / MARKER).read_text())
    assert info["computed_in"] == str(tmp_path / "a")  # provenance kept
    import shutil
    shutil.rmtree(first.root)  # the second study stands on its own
    assert (samples / "records.jsonl").read_text() == '{"temperature": 0.8}\n'
    # another config is not in the other share: computed here, the other share untouched
    assert run(tmp_path, "c", counter, second, temperature=0.5)[0] == "ran"
    assert counter.calls == 2 and not first.root.exists()
