"""The arith task: seeded, disjoint splits, reference solutions that check out."""

from __future__ import annotations

import pytest

from backtrack.errors import UserError
from backtrack.tasks import get_task
from backtrack.tasks.arith import Chain, parse_step, valid_step


def _chain_key(problem) -> str:
    """The arithmetic of a problem, recovered from its reference solution."""
    steps = [parse_step(line) for line in problem.solution.splitlines()]
    return Chain(steps[0][0], tuple((op, b) for _a, op, b, _c in steps)).key()


def test_generator_is_deterministic_for_a_seed():
    first = get_task("arith", {"seed": 3}).problems("train", 50)
    second = get_task("arith", {"seed": 3}).problems("train", 50)
    other = get_task("arith", {"seed": 4}).problems("train", 50)
    assert first == second
    assert [p.question for p in first] != [p.question for p in other]


def test_train_and_test_never_share_a_problem_or_a_chain():
    task = get_task("arith", {"steps": 2, "max_start": 6, "max_operand": 4, "test_size": 100,
                              "train_size": 3000})
    test = task.problems("test")
    train = task.problems("train", 3000)
    assert len(test) == 100 and len(train) == 3000
    assert not {p.question for p in test} & {p.question for p in train}
    assert not {_chain_key(p) for p in test} & {_chain_key(p) for p in train}
    assert len({p.id for p in train}) == len(train)


def test_test_split_is_fixed_and_limit_takes_a_prefix():
    task = get_task("arith", {"test_size": 40})
    assert task.problems("test", 10) == task.problems("test")[:10]
    assert len(task.problems("test")) == 40
    assert len(get_task("arith", {"train_size": 7}).problems("train")) == 7


def test_train_split_has_train_size_problems_and_the_limit_option_caps_both_splits():
    task = get_task("arith", {"train_size": 7})
    assert task.problems("train", 50) == task.problems("train")  # the toy corpus skips only 7
    assert task.problems("train", 3) == task.problems("train")[:3]
    capped = get_task("arith", {"limit": 5})
    assert len(capped.problems("train")) == len(capped.problems("test")) == 5


@pytest.mark.parametrize("options", [{}, {"steps": [1, 4], "ops": "*/", "max_value": 50}])
def test_reference_solutions_are_correct_and_follow_the_options(options):
    task = get_task("arith", options)
    max_value = options.get("max_value", 100)
    for problem in task.problems("train", 300):
        steps = [parse_step(line) for line in problem.solution.splitlines()]
        assert all(steps), problem.solution
        lo, hi = task.min_steps, task.max_steps
        assert lo <= len(steps) <= hi
        for i, (a, op, b, c) in enumerate(steps):
            assert op in task.ops
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert op != "/" or a % b == 0
            assert 1 <= c <= max_value
            if i:
                assert a == steps[i - 1][3]
        assert problem.answer == str(steps[-1][3])
        assert str(steps[0][0]) in problem.question


def test_prompt_and_check():
    task = get_task("arith")
    problem = task.problems("test", 1)[0]
    messages = task.messages(problem)
    assert messages[-1] == {"role": "user", "content": problem.question}
    assert "<think>" in messages[0]["content"]


@pytest.mark.parametrize("options", [{"steps": 0}, {"steps": [3, 2]}, {"ops": "+%"},
                                     {"max_factor": 1}, {"test_size": "x"}, {"colour": 1}])
def test_bad_options_are_user_errors(options):
    with pytest.raises(UserError):
        get_task("arith", options)


def test_valid_step_keeps_counts_whole_and_non_negative():
    assert valid_step(6, "+", 12) and valid_step(12, "-", 3) and valid_step(12, "/", 3)
    assert not valid_step(3, "-", 3)        # a count never reaches zero or below
    assert not valid_step(10, "/", 3)       # division is exact
    assert not valid_step(10, "*", 1)       # x1 and /1 are no steps
    assert not valid_step(10, "+", 0)
