"""S²R data and metrics against hand-written golden cases (tests/golden/s2r.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backtrack.config import resolve
from backtrack.errors import UserError
from backtrack.methods import s2r_data, s2r_metrics
from backtrack.methods.s2r_data import S2RDataConfig, build_s2r_examples, task_verifier
from backtrack.metrics import bootstrap_ci, group_by_problem
from backtrack.tasks import Problem, get_task

GOLDEN = json.loads((Path(__file__).parent / "golden" / "s2r.json").read_text())
ARITH = get_task("arith")


def _problem(case: dict) -> Problem:
    return Problem(**case)


# ------------------------------------------------------------------ the arith verification


@pytest.mark.parametrize("case", GOLDEN["verification"], ids=lambda c: c["name"])
def test_arith_verification_golden(case):
    phrases = {k: case[k] for k in ("verdict_correct", "verdict_wrong") if k in case}
    text = ARITH.verification(_problem(case["problem"]), case["attempt"], **phrases)
    assert text == case["expected"]


@pytest.mark.parametrize("case", [c for c in GOLDEN["verification"] if c["expected"]
                                  and "verdict_wrong" not in c], ids=lambda c: c["name"])
def test_arith_verdict_agrees_with_the_checker(case):
    """The re-solve says wrong exactly when the checker does, on every golden attempt."""
    problem = _problem(case["problem"])
    verdict = s2r_data.parse_verdict(ARITH.verification(problem, case["attempt"]))
    assert (verdict == "correct") == ARITH.check(case["attempt"], problem.answer).correct


def test_task_without_verification_hook_is_a_one_line_error():
    gsm8k = get_task("gsm8k")
    assert ARITH.writes_verification and not gsm8k.writes_verification
    assert not get_task("jsonl", {"path": "unused.jsonl"}).writes_verification
    problem = Problem("g1", "How many?", "3", None)
    with pytest.raises(UserError, match=r"^task 'gsm8k' has no verification hook; use verify"
                                        r"\.source 'model' \(or 'auto'\) to have the model "
                                        r"write its own verifications$"):
        gsm8k.verification(problem, "The answer is 3.")
    with pytest.raises(UserError, match="no verification hook"):
        task_verifier(gsm8k, [problem], S2RDataConfig())


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("case", GOLDEN["verdicts"], ids=lambda c: c["text"][:40])
def test_parse_verdict_golden(case):
    phrases = {k: case[k] for k in ("verdict_correct", "verdict_wrong") if k in case}
    assert s2r_data.parse_verdict(case["text"], **phrases) == case["expected"]


@pytest.mark.parametrize("case", GOLDEN["traces"], ids=lambda c: c["name"])
def test_parse_trace_golden(case):
    segments = s2r_data.parse_trace(case["text"])
    assert [[s.kind, case["text"][s.start:s.end]] for s in segments] == case["expected"]
    assert segments[0].start == 0 and segments[-1].end == len(case["text"])
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))  # they tile the text
    assert {s.kind for s in segments} <= set(s2r_data.KINDS)


# ------------------------------------------------------------------ trajectories


def _build(case: dict, **overrides):
    config = S2RDataConfig(**{**case["config"], **overrides})
    problems = [_problem(p) for p in case["problems"]]
    return build_s2r_examples(case["samples"], [], task_verifier(ARITH, problems, config), config)


@pytest.mark.parametrize("case", GOLDEN["trajectories"], ids=lambda c: c["name"])
def test_trajectory_golden(case):
    examples, stats = _build(case)
    assert len(examples) == len(case["expected"])
    for example, expected in zip(examples, case["expected"]):
        assert (example.problem_id, example.source, example.prompt, example.loss_from) == \
            (expected["problem_id"], "s2r", expected["prompt"], 0)
        assert example.completion == "".join(text for _, text, _ in expected["segments"])
        got = [[s.kind, example.completion[s.start:s.end], s.correct] for s in example.segments]
        assert got == expected["segments"]
        # the evaluation-side parser finds the same segments in the built text
        assert [s[:3] for s in s2r_data.parse_trace(example.completion)] == \
            [s[:3] for s in example.segments]
    for key, value in case["stats"].items():
        got = stats[key]
        assert ({str(k): v for k, v in got.items()} if isinstance(got, dict) else got) == value


@pytest.mark.parametrize("case", GOLDEN["wrong_attempts_for"], ids=lambda c: str(c))
def test_wrong_attempts_grow_with_difficulty(case):
    assert s2r_data.wrong_attempts_for(case["accuracy"], case["max_wrong"]) == case["expected"]


def _wrong(i: int) -> str:
    return f"<think>\n6 + 12 = 18\n18 - 3 = {16 + i}\n</think>\nThe answer is {16 + i}."


P2 = GOLDEN["trajectories"][0]["problems"][0]
R2 = GOLDEN["trajectories"][0]["samples"][1]["completion"]


def _records(pid: str, n_wrong: int, n_right: int) -> list[dict]:
    texts = [(_wrong(i), False) for i in range(n_wrong)] + [(R2, True)] * n_right
    return [{"problem_id": pid, "sample_idx": i, "prompt": "P", "completion": t, "correct": ok}
            for i, (t, ok) in enumerate(texts)]


def test_harder_problems_get_more_wrong_attempts():
    """Sample accuracy 1/4, 2/4, 3/4 -> 3, 2, 1 wrong attempts before the right one."""
    samples = _records("hard", 3, 1) + _records("mid", 2, 2) + _records("easy", 1, 3)
    problems = [Problem(pid, "q", "15", P2["solution"]) for pid in ("hard", "mid", "easy")]
    config = S2RDataConfig(right_first_share=0.0, max_wrong_attempts=3)
    examples, stats = build_s2r_examples(samples, [], task_verifier(ARITH, problems, config),
                                         config)
    attempts = {e.problem_id: sum(s.kind == "attempt" for s in e.segments) for e in examples}
    assert attempts == {"hard": 4, "mid": 3, "easy": 2}
    assert stats["wrong_attempts_histogram"] == {1: 1, 2: 1, 3: 1}
    for example in examples:  # distinct wrong attempts, each verified wrong, then one right
        kinds = [(s.kind, s.correct) for s in example.segments if s.kind == "attempt"]
        assert kinds == [("attempt", False)] * (len(kinds) - 1) + [("attempt", True)]
        texts = [example.completion[s.start:s.end] for s in example.segments
                 if s.kind == "attempt"]
        assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("share,right_first,wrong_first", [(0.0, 0, 10), (0.25, 3, 10),
                                                            (0.5, 10, 10), (1.0, 10, 0)])
def test_right_first_share(share, right_first, wrong_first):
    """10 problems with a wrong and a right attempt: share s adds round(s/(1-s) x 10) right-
    first trajectories to the 10 wrong-first ones (share 1: right-first only)."""
    samples = [r for i in range(10) for r in _records(f"q{i}", 1, 1)]
    problems = [Problem(f"q{i}", "q", "15", P2["solution"]) for i in range(10)]
    config = S2RDataConfig(right_first_share=share, max_wrong_attempts=1, seed=3)
    examples, stats = build_s2r_examples(samples, [], task_verifier(ARITH, problems, config),
                                         config)
    n_attempts = [sum(s.kind == "attempt" for s in e.segments) for e in examples]
    assert (n_attempts.count(1), n_attempts.count(2)) == (right_first, wrong_first)
    assert stats["right_first"] == right_first
    assert len({e.problem_id for e in examples if len(e.segments) == 3}) == right_first
    again, _ = build_s2r_examples(samples, [], task_verifier(ARITH, problems, config), config)
    assert [e.completion for e in again] == [e.completion for e in examples]  # seeded


@pytest.mark.parametrize("cap,right_first,wrong_first", [(0, 10, 10), (8, 4, 4), (5, 2, 3),
                                                          (20, 10, 10)])
def test_max_trajectories_keeps_the_right_first_share(cap, right_first, wrong_first):
    """20 trajectories (share 0.5): a cap keeps that many, right-first in their share (5 ->
    round(2.5) = 2 right-first), seeded; 0 or a cap above the count keeps all."""
    samples = [r for i in range(10) for r in _records(f"q{i}", 1, 1)]
    problems = [Problem(f"q{i}", "q", "15", P2["solution"]) for i in range(10)]
    config = S2RDataConfig(right_first_share=0.5, max_wrong_attempts=1, max_trajectories=cap)
    runs = [build_s2r_examples(samples, [], task_verifier(ARITH, problems, config), config)
            for _ in range(2)]
    (examples, stats), (again, _) = runs
    n_attempts = [sum(s.kind == "attempt" for s in e.segments) for e in examples]
    assert (n_attempts.count(1), n_attempts.count(2)) == (right_first, wrong_first)
    assert stats["trajectories"] == right_first + wrong_first
    assert [e.completion for e in again] == [e.completion for e in examples]


def test_model_verifications_that_disagree_are_dropped():
    """A `Verifier` need not be the task's (GSM8K's will be the model's own checks): a check
    that calls a wrong attempt correct is dropped like one that calls a right attempt wrong."""
    case = GOLDEN["trajectories"][0]
    wrong, right = case["samples"][0]["completion"], case["samples"][1]["completion"]
    extra = _wrong(5)
    checks = {wrong: "Looks fine. So the answer is correct.",  # disagrees: dropped
              extra: "18 - 3 is 15. So the answer is wrong.",
              right: "18 - 3 is 15. So the answer is correct."}
    samples = case["samples"] + [{**case["samples"][0], "sample_idx": 2, "completion": extra}]
    config = S2RDataConfig(right_first_share=0.0, max_wrong_attempts=3)
    examples, stats = build_s2r_examples(samples, [], lambda pid, text: checks[text], config)
    assert stats["verdict_disagrees"] == 1
    (example,) = examples
    assert example.completion.startswith(extra + "\nWait, let me recheck my solution.\n18 - 3")
    assert wrong not in example.completion


def test_backtrack_traces_as_attempts():
    """With `backtrack_attempts`, a backtrack trace that ended right can end a trajectory
    for a problem none of whose samples was right."""
    wrong = _wrong(0)
    samples = [{"problem_id": "b", "sample_idx": 0, "prompt": "P", "completion": wrong,
                "correct": False}]
    prefix = "<think>\n6 + 12 = 18\n18 - 3 = 16"
    retried = "\n18 - 3 = 15\n</think>\nThe answer is 15."
    trace = {"problem_id": "b", "sample_idx": 0, "continuation_idx": 0, "prompt": "P",
             "chain": [{"round": 0, "prefix": "", "phrase": "", "completion": wrong,
                        "correct": False},
                       {"round": 1, "prefix": prefix, "phrase": "\nWait, that's not right...",
                        "completion": retried, "correct": True}]}
    problems = [Problem("b", "q", "15", P2["solution"])]
    for use, count in ((False, 0), (True, 1)):
        config = S2RDataConfig(right_first_share=0.0, backtrack_attempts=use)
        examples, _ = build_s2r_examples(samples, [trace], task_verifier(ARITH, problems, config),
                                         config)
        assert len(examples) == count
    assert examples[0].completion.endswith(
        "Let me try again.\n" + prefix + "\nWait, that's not right..." + retried
        + "\nWait, let me recheck my solution.\n6 + 12 = 18\n18 - 3 = 15\n"
        "So the answer is correct.")


def test_tokenisation_matches_the_other_arms(tiny_model_dir):
    from backtrack.build import end_of_turn_text, tokenize_example
    from backtrack.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    eot = end_of_turn_text(tokenizer)
    examples, _ = _build(GOLDEN["trajectories"][0])
    example = examples[0]
    row = s2r_data.tokenize_s2r_example(tokenizer, example, eot)
    plain = tokenize_example(tokenizer, example, eot)
    assert {k: row[k] for k in plain} == plain
    completion_ids = row["input_ids"][row["prompt_length"]:]
    assert row["completion_mask"][row["prompt_length"]:] == [1] * len(completion_ids)
    assert len(row["token_segments"]) == len(completion_ids)
    assert row["token_segments"] == sorted(row["token_segments"])
    assert row["token_segments"][-1] == len(example.segments) - 1
    kinds = [s["kind"] for s in row["segments"]]
    for index, segment in enumerate(example.segments):  # each segment's tokens spell it
        ids = [t for t, s in zip(completion_ids, row["token_segments"]) if s == index]
        text = tokenizer.decode(ids)
        assert example.completion[segment.start:segment.end].strip() in text
        assert kinds[index] == segment.kind


# ------------------------------------------------------------------ metrics


def test_metrics_golden():
    case = GOLDEN["metrics"]
    table = s2r_metrics.problem_metrics(group_by_problem(case["records"]), ARITH.check)
    assert table["problems"] == ["A", "B"]
    got = {name: [[float(n), float(d)] for n, d in zip(num, den)]
           for name, (num, den) in table["arrays"].items()}
    assert got == case["expected"]
    summary = s2r_metrics.summarize(case["records"], ARITH.check, n_boot=200)
    for name, value in case["pooled"].items():
        assert summary["metrics"][name]["value"] == pytest.approx(value)
        num, den = table["arrays"][name]
        assert bootstrap_ci(num, den, n_boot=200)[0] == pytest.approx(value)
    assert summary["per_problem"]["verdict_accuracy"] == [0.5, None]


def test_final_attempt_is_the_last_one():
    case = GOLDEN["metrics"]
    finals = [s2r_metrics.final_attempt_text(r["completion"]) for r in case["records"]]
    assert finals == case["final_attempts"]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("section,message", [
    ({"verify_cue": ""}, r"^option 'verify_cue': must not be empty$"),
    ({"retry_cue": "  "}, r"^option 'retry_cue': must not be empty$"),
    ({"verdict_wrong": ""}, r"^option 'verdict_wrong': must not be empty$"),
    ({"right_first_share": 1.5}, r"^option 'right_first_share': must be in \[0, 1\], got 1.5$"),
    ({"right_first_share": -0.1}, r"^option 'right_first_share': must be in \[0, 1\]"),
    ({"max_wrong_attempts": 0}, r"^option 'max_wrong_attempts': must be 1 or more"),
    ({"max_trajectories": -1}, r"^option 'max_trajectories': must be 0 \(all\) or more"),
    ({"retry_cue": "wait, let me recheck my solution."}, r"'verify_cue' and 'retry_cue' must"),
])
def test_bad_config_is_a_one_line_error(section, message):
    with pytest.raises(UserError, match=message):
        resolve(S2RDataConfig, {"s2r": section}, "s2r")
    case = GOLDEN["trajectories"][0]
    with pytest.raises(UserError, match=message):  # also when built directly
        build_s2r_examples(case["samples"], [], lambda pid, text: None,
                           S2RDataConfig(**section))


def test_bad_records_are_one_line_errors():
    case = GOLDEN["trajectories"][0]
    config = S2RDataConfig()
    verify = task_verifier(ARITH, [_problem(p) for p in case["problems"]], config)
    broken = [{k: v for k, v in case["samples"][0].items() if k != "correct"}]
    with pytest.raises(UserError, match=r"samples: record 'p2'/0 lacks key\(s\) \['correct'\]"):
        build_s2r_examples(broken, [], verify, config)
    stranger = [{**case["samples"][0], "problem_id": "elsewhere"}]
    with pytest.raises(UserError, match="problem 'elsewhere': not a problem of task 'arith'"):
        build_s2r_examples(stranger, [], verify, config)


def test_arith_verdict_matches_checker_on_toy_format_slips():
    """On real arith problems in the toy model's format (`<think>` steps `</think>` "The
    answer is N."), the re-solve's verdict is the checker's for every right solution and for
    a slip at each step that the later steps run on from (unless the slip washes out)."""
    from backtrack.tasks.arith import apply_op, parse_step

    agree = washed_out = 0
    for problem in ARITH.problems("test", 60):
        steps = [parse_step(line) for line in problem.solution.splitlines()]
        for slip_at in [None] + list(range(len(steps))):
            x, lines = steps[0][0], []
            for i, (_a, op, b, _c) in enumerate(steps):
                y = apply_op(x, op, b) + (1 if i == slip_at else 0)
                lines.append(f"{x} {op} {b} = {y}")
                x = y
            attempt = "<think>\n" + "\n".join(lines) + f"\n</think>\nThe answer is {x}."
            verdict = s2r_data.parse_verdict(ARITH.verification(problem, attempt))
            right = ARITH.check(attempt, problem.answer).correct
            assert verdict == ("wrong" if slip_at is not None else "correct")
            agree += (verdict == "correct") == right
            washed_out += slip_at is not None and right  # e.g. 7 / 2 and 8 / 2 floor alike
    assert agree > 0.9 * (agree + washed_out) and agree >= 150
