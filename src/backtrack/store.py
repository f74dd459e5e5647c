"""A resumable, shardable record store: append-only JSONL files in one stage folder.

Long sampling jobs get killed (pre-emption, OOM, Ctrl-C). Every batch of records is appended
and fsynced, so a re-run only skips the keys already on disk. Each writer owns one file,
`records-<i>-of-<N>.jsonl`, so N processes or machines (`--shard i/N`) share a run without
conflicts; reading merges every file in the folder and drops duplicate keys. `store.json` keeps
the fingerprint of the config that produced the records: resuming with a different config
would silently mix two experiments, so it is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from backtrack.errors import UserError

SAMPLE_KEY = ("problem_id", "sample_idx", "round")
META_FILE = "store.json"
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_FILE_RE = re.compile(r"^records-(\d+)-of-(\d+)\.jsonl$")


def parse_shard(spec: str) -> tuple[int, int]:
    """`"i/N"` -> (i, N) with 0 <= i < N."""
    match = _SHARD_RE.match(str(spec))
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise UserError(f"option 'shard': expected i/N with 0 <= i < N (e.g. 0/4), got '{spec}'")
    return int(match.group(1)), int(match.group(2))


def shard_of(problem_id: str, count: int) -> int:
    """The shard owning a problem: a stable hash, independent of problem order and limit."""
    digest = hashlib.sha256(str(problem_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(problems: list, shard: str) -> list:
    """The problems (objects with `.id`) that shard `i/N` handles."""
    index, count = parse_shard(shard)
    return [p for p in problems if shard_of(p.id, count) == index]


def _normalize(value) -> object:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _parse_lines(path: Path, data: bytes) -> tuple[list[dict], int]:
    """Records in `data` and the byte length of its valid part (a torn tail is excluded).

    Only the tail can be torn (a crash mid-append); a bad line before a good one is corruption.
    """
    records, good_end, pending_error = [], 0, None
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        end = offset + len(raw) + 1
        complete = end <= len(data)
        offset = end
        if not raw.strip():
            good_end = min(end, len(data)) if pending_error is None else good_end
            continue
        try:
            record = json.loads(raw) if complete else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if record is None or not isinstance(record, dict):
            pending_error = pending_error or number
            continue
        if pending_error is not None:
            raise UserError(f"{path}: line {pending_error} is not a JSON record (file corrupted)")
        records.append(record)
        good_end = end
    return records, good_end


class RecordStore:
    """Records of one stage, keyed by `key_fields`; this process writes shard `shard`."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict | None, shard: str = "0/1",
                 key_fields: Iterable[str] = SAMPLE_KEY, write: bool = True):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.shard = parse_shard(shard)
        self.fingerprint = _normalize(fingerprint) if fingerprint is not None else None
        self._handle = None
        if write:
            self._check_fingerprint()
            self._open_shard()
        self._done = self.done_keys()

    @classmethod
    def read(cls, path: str | os.PathLike, key_fields: Iterable[str] | None = None) -> RecordStore:
        """Open an existing store for reading only (no fingerprint check, nothing written)."""
        path = Path(path)
        meta = path / META_FILE
        if not meta.is_file():
            raise UserError(f"{path}: not a record store (no {META_FILE}); run its stage first")
        stored = json.loads(meta.read_text())
        keys = key_fields or stored.get("key_fields") or SAMPLE_KEY
        return cls(path, stored.get("fingerprint"), key_fields=keys, write=False)

    def _check_fingerprint(self) -> None:
        meta = self.path / META_FILE
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{meta}: not valid JSON ({exc.msg})") from exc
            old = stored.get("fingerprint")
            if old != self.fingerprint:
                raise UserError(f"{meta}: records were written by a different config "
                                f"({_describe_diff(old, self.fingerprint)}); use another "
                                "output_dir or delete this folder")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint,
                                   "key_fields": list(self.key_fields)}, indent=2) + "\n")
        os.replace(tmp, meta)

    @property
    def shard_file(self) -> Path:
        index, count = self.shard
        return self.path / f"records-{index}-of-{count}.jsonl"

    def _open_shard(self) -> None:
        """Lock this shard's file against a second writer and cut any torn last line."""
        import fcntl

        handle = open(self.shard_file, "ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise UserError(f"{self.shard_file}: another process is writing this shard") from exc
        data = self.shard_file.read_bytes()
        _, good_end = _parse_lines(self.shard_file, data)
        if good_end < len(data):
            handle.truncate(good_end)
            os.fsync(handle.fileno())
        self._handle = handle

    def shard_files(self) -> list[Path]:
        files = [p for p in self.path.glob("records-*-of-*.jsonl") if _FILE_RE.match(p.name)]
        return sorted(files, key=lambda p: tuple(int(x) for x in _FILE_RE.match(p.name).groups()))

    def key(self, record: dict) -> tuple:
        try:
            return tuple(record[k] for k in self.key_fields)
        except KeyError as exc:
            raise ValueError(f"record lacks key field {exc}") from exc

    def _iter_records(self):
        for file in self.shard_files():
            records, _ = _parse_lines(file, file.read_bytes())
            yield from records

    def done_keys(self) -> set[tuple]:
        return {self.key(r) for r in self._iter_records()}

    def records(self) -> list[dict]:
        """Every record of every shard, each key once, sorted by key."""
        unique: dict[tuple, dict] = {}
        for record in self._iter_records():
            unique.setdefault(self.key(record), record)
        return [unique[k] for k in sorted(unique, key=_sort_key)]

    def append(self, records: list[dict]) -> int:
        """Append the records whose keys are new, then flush and fsync; returns how many."""
        if self._handle is None:
            raise RuntimeError("store opened read-only")
        lines = []
        for record in records:
            key = self.key(record)
            if key not in self._done:
                self._done.add(key)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if lines:
            self._handle.write("".join(lines).encode())
            self._handle.flush()
            os.fsync(self._handle.fileno())
        return len(lines)

    def to_dataset(self):
        """The records as a `datasets.Dataset`."""
        import datasets

        return datasets.Dataset.from_list(self.records())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sort_key(key: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def _describe_diff(old: object, new: object) -> str:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "fingerprint missing"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
