"""RecordStore: append/resume, torn lines, sharding and merging, fingerprints, datasets."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from backtrack.errors import UserError
from backtrack.store import RecordStore, parse_shard, select_shard, shard_of

FP = {"model": "m", "temperature": 0.8}


def rec(pid: str, idx: int, **extra) -> dict:
    return {"problem_id": pid, "sample_idx": idx, "round": 0, "completion": f"{pid}:{idx}", **extra}


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_append_resume_and_dedupe(tmp_path):
    with RecordStore(tmp_path / "s", FP) as store:
        assert store.append([rec("p2", 0), rec("p1", 1)]) == 2
        assert store.append([rec("p1", 1), rec("p1", 0)]) == 1  # known key skipped
    store = RecordStore(tmp_path / "s", FP)
    assert store.done_keys() == {("p1", 0, 0), ("p1", 1, 0), ("p2", 0, 0)}
    assert store.append([rec("p1", 0)]) == 0
    store.close()
    assert len(lines(store.shard_file)) == 3
    assert [(r["problem_id"], r["sample_idx"]) for r in store.records()] == [
        ("p1", 0), ("p1", 1), ("p2", 0)]


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    with RecordStore(tmp_path, FP) as store:
        store.append([rec("a", 0), rec("a", 1)])
    good = store.shard_file.read_bytes()
    with open(store.shard_file, "ab") as handle:
        handle.write(b'{"problem_id": "a", "sample_idx": 2, "rou')  # killed mid-write
    reader = RecordStore.read(tmp_path)
    assert {r["sample_idx"] for r in reader.records()} == {0, 1}  # readers ignore the tail
    with RecordStore(tmp_path, FP) as store:
        assert store.shard_file.read_bytes() == good  # writer truncates to the last newline
        store.append([rec("a", 2)])
    assert [r["sample_idx"] for r in lines(store.shard_file)] == [0, 1, 2]


def test_trailing_garbage_after_newline_is_dropped(tmp_path):
    with RecordStore(tmp_path, FP) as store:
        store.append([rec("a", 0)])
    with open(store.shard_file, "ab") as handle:
        handle.write(b"\x00\x00\x00\n")  # zero-filled block after a crash
    with RecordStore(tmp_path, FP) as store:
        assert store.done_keys() == {("a", 0, 0)}
    assert lines(store.shard_file) == [rec("a", 0)]


def test_corrupt_middle_line_is_an_error(tmp_path):
    with RecordStore(tmp_path, FP) as store:
        store.append([rec("a", 0)])
    with open(store.shard_file, "ab") as handle:
        handle.write(b"not json\n" + json.dumps(rec("a", 1)).encode() + b"\n")
    with pytest.raises(UserError, match=r"records-0-of-1.jsonl: line 2"):
        RecordStore(tmp_path, FP)


def test_fingerprint_mismatch_leaves_records_untouched(tmp_path):
    with RecordStore(tmp_path, FP) as store:
        store.append([rec("a", 0)])
    with open(store.shard_file, "ab") as handle:
        handle.write(b'{"torn')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match=r"store.json.*temperature: 0.8 -> 1.0"):
        RecordStore(tmp_path, {**FP, "temperature": 1.0})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_second_writer_of_a_shard_is_refused(tmp_path):
    with RecordStore(tmp_path, FP):
        with pytest.raises(UserError, match="another process"):
            RecordStore(tmp_path, FP)
        RecordStore(tmp_path, FP, shard="1/2").close()  # another shard is fine


@pytest.mark.parametrize("spec", ["2/2", "1/0", "a/b", "1", "-1/2", ""])
def test_bad_shard_specs(spec):
    with pytest.raises(UserError, match="expected i/N"):
        parse_shard(spec)


def test_shards_partition_problems_and_merge(tmp_path):
    problems = [SimpleNamespace(id=f"p{i}") for i in range(40)]
    parts = [select_shard(problems, f"{i}/3") for i in range(3)]
    ids = [p.id for part in parts for p in part]
    assert sorted(ids) == sorted(p.id for p in problems) and len(ids) == 40
    assert all(parts)  # every shard gets work
    assert select_shard(list(reversed(problems)), "1/3") == list(reversed(parts[1]))
    assert all(shard_of(p.id, 3) == 1 for p in parts[1])
    for i, part in enumerate(parts):  # three writers, e.g. a cluster job array
        with RecordStore(tmp_path, FP, shard=f"{i}/3") as store:
            store.append([rec(p.id, j) for p in part for j in range(2)])
    merged = RecordStore.read(tmp_path)
    assert len(merged.records()) == 80
    assert len({(r["problem_id"], r["sample_idx"]) for r in merged.records()}) == 80
    # A later run with another split sees every finished key and writes nothing twice.
    with RecordStore(tmp_path, FP, shard="0/1") as store:
        assert len(store.done_keys()) == 80
        assert store.append([rec("p0", 0), rec("p0", 5)]) == 1
    assert len(RecordStore.read(tmp_path).records()) == 81


def test_custom_keys_and_dataset(tmp_path):
    key = ("problem_id", "sample_idx", "continuation_idx")
    with RecordStore(tmp_path, FP, key_fields=key) as store:
        store.append([{**rec("a", 0), "continuation_idx": c, "chain": [{"round": 0}]}
                      for c in range(3)])
    reader = RecordStore.read(tmp_path)
    assert reader.key_fields == key and len(reader.records()) == 3
    dataset = reader.to_dataset()
    assert dataset.num_rows == 3 and dataset[2]["continuation_idx"] == 2
    assert dataset[0]["chain"] == [{"round": 0}]


def test_read_requires_a_store(tmp_path):
    with pytest.raises(UserError, match="not a record store"):
        RecordStore.read(tmp_path / "missing")
