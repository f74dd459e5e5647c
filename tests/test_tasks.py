"""The gsm8k and jsonl tasks: loading, ids, gold values, disjoint splits, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backtrack.errors import UserError
from backtrack.tasks import SYSTEM_PROMPT, get_task, task_names


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_registered():
    assert {"gsm8k", "jsonl", "arith"} <= set(task_names())


def test_gsm8k_local_folder(gsm8k_dir):
    task = get_task("gsm8k", {"path": str(gsm8k_dir)})
    train, test = task.problems("train"), task.problems("test")
    first = json.loads((gsm8k_dir / "train.jsonl").read_text().splitlines()[0])
    assert len(test) == 1319 and 7400 <= len(train) <= 7473
    assert train[0].id == "gsm8k-train-00000" and train[0].question == first["question"]
    assert train[0].answer == first["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    assert "<<" not in train[0].solution and "####" not in train[0].solution
    assert train[0].solution.splitlines()[0] == "Natalia sold 48/2 = 24 clips in May."
    assert len({p.id for p in train + test}) == len(train) + len(test)
    assert not {p.question for p in train} & {p.question for p in test}


def test_gsm8k_ids_stable_and_limit(gsm8k_dir):
    a = get_task("gsm8k", {"path": str(gsm8k_dir), "limit": 5}).problems("test")
    b = get_task("gsm8k", {"path": str(gsm8k_dir)}).problems("test", limit=5)
    assert [p.id for p in a] == [p.id for p in b] == [f"gsm8k-test-{i:05d}" for i in range(5)]


def test_gsm8k_messages_and_check(gsm8k_dir):
    task = get_task("gsm8k", {"path": str(gsm8k_dir), "limit": 1})
    problem = task.problems("test")[0]
    messages = task.messages(problem)
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[1]["content"] == problem.question and len(messages) == 2
    assert task.check(f"<think>..</think>The answer is {problem.answer}.", problem.answer).correct
    assert task.reward("The answer is -1.", problem.answer) == 0.0


def test_gsm8k_bad_rows(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write_jsonl(folder / "test.jsonl", [{"question": "q1", "answer": "#### 1"}])
    cases = {
        "line 2: malformed JSON": [{"question": "q", "answer": "#### 2"}, "{not json"],
        "line 1: missing field 'answer'": [{"question": "q"}],
        "line 2: cannot read a gold answer": [{"question": "a", "answer": "#### 2"},
                                              {"question": "b", "answer": "#### lots"}],
    }
    for message, rows in cases.items():
        _write_jsonl(folder / "train.jsonl", rows)
        with pytest.raises(UserError, match=f"train.jsonl: {message}"):
            get_task("gsm8k", {"path": str(folder)}).problems("train")


def test_gsm8k_missing_files(tmp_path):
    with pytest.raises(UserError, match="test.jsonl: file not found"):
        get_task("gsm8k", {"path": str(tmp_path)}).problems("test")
    with pytest.raises(UserError, match="not a folder"):
        get_task("gsm8k", {"path": str(tmp_path / "nope")}).problems("test")
    with pytest.raises(UserError, match="unknown option"):
        get_task("gsm8k", {"pth": "x"})


def test_jsonl_two_files_disjoint(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"q": "What is 2+2?", "a": 4, "key": "t1"}, {"q": "What is 3+3?", "a": "6", "key": "t2"},
        {"q": "what is  5+5?", "a": "10", "key": "t3"}])
    test = _write_jsonl(tmp_path / "test.jsonl", [{"q": "What is 5+5?", "a": "#### 10",
                                                   "key": "s1"}])
    task = get_task("jsonl", {"train_path": str(train), "test_path": str(test),
                              "question_field": "q", "answer_field": "a", "id_field": "key"})
    assert [(p.id, p.answer) for p in task.problems("train")] == [("t1", "4"), ("t2", "6")]
    assert [(p.id, p.answer) for p in task.problems("test")] == [("s1", "10")]


def test_jsonl_one_file_hash_split(tmp_path):
    rows = [{"question": f"Problem number {i}?", "answer": str(i)} for i in range(200)]
    path = _write_jsonl(tmp_path / "all.jsonl", rows)
    task = get_task("jsonl", {"path": str(path), "test_fraction": 0.25})
    train, test = task.problems("train"), task.problems("test")
    assert len(train) + len(test) == 200 and 25 <= len(test) <= 75
    assert not {p.question for p in train} & {p.question for p in test}
    again = get_task("jsonl", {"path": str(path), "test_fraction": 0.25}).problems("test")
    assert [p.id for p in again] == [p.id for p in test]
    assert test[0].id.startswith("jsonl-test-")


def test_jsonl_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"question": f"q{i}", "answer": i} for i in range(20)]))
    task = get_task("jsonl", {"path": str(path)})
    assert len(task.problems("train")) + len(task.problems("test")) == 20
    path.write_text(json.dumps([{"question": "q"}, {"answer": 1}]))
    with pytest.raises(UserError, match="data.json: row 1: missing field 'answer'"):
        get_task("jsonl", {"path": str(path)}).problems("train")


@pytest.mark.parametrize("options, message", [
    ({}, "option 'path'"),
    ({"path": "a.jsonl", "train_path": "b.jsonl"}, "either 'path'"),
    ({"path": "missing.jsonl"}, "missing.jsonl: file not found"),
    ({"path": "x.jsonl", "test_fraction": 1.5}, "test_fraction"),
    ({"path": "x.jsonl", "limit": 0}, "limit"),
])
def test_jsonl_bad_options(tmp_path, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        get_task("jsonl", options).problems("test")


def test_jsonl_bad_rows(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"question": "a", "answer": "1", "id": "x"}, {"question": "b", "answer": "2", "id": "x"}])
    with pytest.raises(UserError, match=r"d.jsonl: line 2: duplicate id 'x'"):
        get_task("jsonl", {"path": str(path), "id_field": "id"}).problems("test")
    _write_jsonl(path, [{"question": "a", "answer": "1"}, "", "[1, 2]"])
    with pytest.raises(UserError, match="d.jsonl: line 3: expected a JSON object"):
        get_task("jsonl", {"path": str(path)}).problems("test")
    _write_jsonl(path, [{"question": "a", "answer": "one or two"}])
    with pytest.raises(UserError, match="d.jsonl: line 1: cannot read a gold answer"):
        get_task("jsonl", {"path": str(path)}).problems("test")
