"""S²R process-level RL (`s2r_process`): traces split into rewarded steps, step advantages,
tokens labelled with their step, and the cues a model was trained with reaching RL and eval.
Golden cases in tests/golden/s2r_process.json are hand-computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backtrack.engines import Completion
from backtrack.methods.s2r_data import Cues
from backtrack.methods.s2r_metrics import step_rewards
from backtrack.rl import algorithm as alg
from backtrack.rl.rollout import RolloutSettings, collect, collate
from backtrack.tasks import Problem, get_task

GOLDEN = json.loads((Path(__file__).parent / "golden" / "s2r_process.json").read_text())
ARITH = get_task("arith")
SOLUTION = "6 + 12 = 18\n18 - 3 = 15"


def _cues(case: dict) -> Cues:
    return Cues(**case["cues"]) if "cues" in case else Cues()


@pytest.mark.parametrize("case", GOLDEN["traces"], ids=lambda c: c["name"])
def test_step_rewards_golden(case):
    steps = step_rewards(case["text"], case["gold"], ARITH.check, _cues(case))
    starts = [0] + [end for end, _, _ in steps[:-1]]
    got = [[name, case["text"][start:end], reward]
           for start, (end, name, reward) in zip(starts, steps)]
    assert got == case["expected"]
    assert steps[-1][0] == len(case["text"])  # the steps tile the trace
    assert {name for _, name, _ in steps} <= set(alg.GENERATED)


@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_step_advantages_golden(baseline):
    case = GOLDEN["advantages"]
    traces = GOLDEN["traces"]
    steps = [[(name, reward) for name, _, reward in traces[i]["expected"]] for i in case["traces"]]
    got = (alg.step_advantages(steps[:4], 4, baseline)
           + alg.step_advantages(steps[4:], 2, baseline))
    expected = case["expected"][baseline]
    assert [len(row) for row in got] == [len(row) for row in expected]
    for row, want in zip(got, expected):
        assert row == pytest.approx(want)


def test_step_advantages_bad_input():
    from backtrack.errors import UserError

    with pytest.raises(UserError, match="unknown baseline 'median'"):
        alg.step_advantages([[("attempt1", 1.0)]], 1, "median")
    with pytest.raises(ValueError, match="3 rollouts are not groups of 2"):
        alg.step_advantages([[("attempt1", 1.0)]] * 3, 2)


class ScriptedEngine:
    """Returns the given texts as completions (ids from the tokenizer), as the hf engine would."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts = tokenizer, texts

    def generate(self, prompts, params):
        out = []
        for _ in prompts:
            group = []
            for text in self.texts[:params.n]:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                decoded = self.tokenizer.decode(ids, skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
                group.append(Completion(decoded, len(ids) + 1, "stop", ids))
            out.append(group)
        return out


def test_rollouts_are_split_into_steps_and_weighted_per_step(tiny_model_dir):
    """Through `collect` and the algorithm: each generated token carries the segment and the
    index of the step it is in (the step's text is what its tokens decode to), and its
    advantage is that step's; cue tokens carry loss (KL) with advantage 0."""
    from backtrack.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    traces = [GOLDEN["traces"][i] for i in (0, 1, 2, 3)]
    engine = ScriptedEngine(tokenizer, [t["text"] for t in traces])
    problem = Problem("p", "q", "15", SOLUTION)
    settings = RolloutSettings(4, 1.0, 1.0, 300, "phrase", "",
                               lambda text, gold: step_rewards(text, gold, ARITH.check))
    end_id = tokenizer.eos_token_id
    rollouts = collect(engine, ARITH, tokenizer, [problem], 1, settings, 0, end_id)
    assert rollouts.steps == [[(name, reward) for name, _, reward in t["expected"]]
                              for t in traces]
    for row, trace in zip(rollouts.rows, traces):
        prompt = row.steps.count(-1)
        assert row.segments[:prompt] == [alg.segment_id("prompt")] * prompt
        assert row.steps[prompt:] == sorted(row.steps[prompt:])  # steps in order
        assert row.steps[-1] == len(trace["expected"]) - 1 and row.ids[-1] == end_id
        for index, (name, text, _) in enumerate(trace["expected"]):
            ids = [t for t, s in zip(row.ids, row.steps) if s == index]
            assert set(row.segments[i] for i, s in enumerate(row.steps) if s == index) == \
                {alg.segment_id(name)}
            decoded = tokenizer.decode([t for t in ids if t != end_id])
            assert text.strip() in decoded and len(decoded) <= len(text) + 8

    method = alg.make_methods(0.05, 0.5, 0.05, 1.0)["process"]
    assert method.uses_steps
    ids, mask, segments, row_rollout, steps = collate(rollouts.rows, 0)
    seg_adv = alg.segment_advantages(method, rollouts.rewards, 4, "loo")
    table = alg.step_advantages(rollouts.steps, 4, "loo")
    width = max(len(r) for r in table)
    step_adv = torch.tensor([r + [0.0] * (width - len(r)) for r in table])
    adv, kl, loss_mask = alg.token_weights(method, segments[:, 1:], row_rollout, seg_adv,
                                           steps[:, 1:], step_adv)
    for r, row in enumerate(table):
        for index, value in enumerate(row):
            at = steps[r, 1:] == index
            assert at.any() and torch.allclose(adv[r][at], torch.tensor(value))
            assert bool((loss_mask[r][at] == 1).all()) and bool((kl[r][at] == 0.05).all())
    assert bool((loss_mask[steps[:, 1:] == -1] == 0).all())  # the prompt is never trained
    cue = segments[:, 1:] == alg.segment_id("verify_cue")
    assert cue.any() and bool((adv[cue] == 0).all())


def test_process_method_table():
    methods = alg.make_methods(0.1, 0.5, 0.05, 1.0)
    process = methods["process"]
    assert process.attempts == 1 and not methods["outcome"].uses_steps
    assert {s: r.reward for s, r in process.rules.items()} == {
        "attempt1": {"step": 1.0}, "reattempt": {"step": 1.0}, "verification": {"step": 1.0},
        "verify_cue": {}, "retry_cue": {}}
    with pytest.raises(ValueError, match="needs the rollouts' steps"):
        alg.token_weights(process, torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]),
                          {s: torch.zeros(1) for s in process.rules})


def test_process_rl_trains_the_model(tiny_model_dir, tmp_path):
    """`backtrack rl --method process` end to end on the tiny model (whose traces hold no cue,
    so each rollout is one attempt step): the log and the weights change."""
    from test_rl_stage import FAST, TASK, _weights

    from backtrack.rl.stage import RLConfig, main

    torch.set_num_threads(1)
    final = main(RLConfig(output_dir=str(tmp_path), model=str(tiny_model_dir), arm="s2r_process",
                          method="process", baseline="loo", scale_std=False,
                          reward_on="final_attempt", steps=2, **TASK, **FAST))
    log = json.loads((final / "rl_log.json").read_text())
    assert [e["stage"] for e in log] == ["process", "process"]
    assert any(e["grad_norm"] > 0 for e in log)
    base, tuned = _weights(tiny_model_dir), _weights(final)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


TOY_CUES = {"verify_cue": "Hmm, let me check that again.", "retry_cue": "Wait, let me redo that.",
            "verdict_correct": "That is right.", "verdict_wrong": "That is not right."}


def test_cues_of_the_sft_data_reach_rl_and_eval(tmp_path, tiny_model_dir):
    """The cues set in `build.s2r` are recorded in the build stats and read back for every arm
    descended from s2r_sft (its RL reader and its evaluation), not the defaults."""
    from test_s2r_arm import TASK_ARGS, _verify, _write_samples

    from backtrack.arms import Evaluation, get_arm
    from backtrack.build import BuildConfig, main
    from backtrack.errors import UserError
    from backtrack.evaluate import EvalConfig, protocol_options
    from backtrack.methods.s2r import cues_for
    from backtrack.models import load_tokenizer
    from backtrack.rl.stage import RLConfig, trace_reader

    with pytest.raises(UserError, match=r"sft/stats.json: missing or unreadable, so the S²R "
                                        r"cues arm 's2r_sft' was trained with are unknown"):
        cues_for("s2r", str(tmp_path))
    _write_samples(tmp_path / "samples", load_tokenizer(str(tiny_model_dir)))
    _verify(tmp_path, **TOY_CUES)  # the same cues, as `backtrack run` passes them
    main(BuildConfig(arms=["s2r_sft"], task="arith", task_args=TASK_ARGS,
                     model=str(tiny_model_dir), output_dir=str(tmp_path), s2r=TOY_CUES))
    toy = Cues("Hmm, let me check that again.", "Wait, let me redo that.", "That is right.",
               "That is not right.")
    assert [cues_for(arm, str(tmp_path)) for arm in ("s2r_sft", "s2r", "s2r_process", "base")] \
        == [toy, toy, toy, Cues()]
    trace = GOLDEN["traces"][-1]  # written with the toy cues
    reader = trace_reader(RLConfig(parent="s2r_sft", output_dir=str(tmp_path)), ARITH)
    assert reader.final_text(trace["text"]) == trace["expected"][4][1]
    assert [reward for _, _, reward in reader.split_steps(trace["text"], "15")] == \
        [reward for _, _, reward in trace["expected"]]
    config = EvalConfig(output_dir=str(tmp_path))
    assert protocol_options(config, Evaluation(get_arm("s2r"), "self_verify")) == {"cues": toy}
    assert protocol_options(config, Evaluation(get_arm("base"), "self_verify")) == \
        {"cues": Cues()}
    assert protocol_options(config, Evaluation(get_arm("s2r"), "single")) == {}


def test_report_plots_verdict_accuracy_of_self_verify_evaluations(tmp_path):
    """The self_verify protocol's plot reaches the report through the protocol registry: one
    bar per verdict metric per evaluation under it, none for other evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from backtrack import metrics, report
    from backtrack.methods import s2r_metrics
    from backtrack.protocols import protocol_plots

    records = json.loads((Path(__file__).parent / "golden" / "s2r.json").read_text())[
        "metrics"]["records"]
    records = [{"sample_idx": i, "finish_reason": "stop", **r,
                "correct": ARITH.check(s2r_metrics.final_attempt_text(r["completion"]),
                                       r["answer"]).correct} for i, r in enumerate(records)]
    for name, protocol in (("s2r_sft", "self_verify"), ("base", "single")):
        summary = {"protocol": protocol, **metrics.summarize(records, n_boot=50)}
        if protocol == "self_verify":
            summary["metrics"].update(s2r_metrics.summarize(records, ARITH.check,
                                                            n_boot=50)["metrics"])
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(summary))
    loaded = {n: json.loads((tmp_path / "eval" / n / "metrics.json").read_text())
              for n in ("s2r_sft", "base")}
    ((file, draw),) = protocol_plots(loaded)
    fig, ax = plt.subplots()
    draw(ax)
    heights = [bar.get_height() for bar in ax.patches]
    plt.close(fig)
    want = loaded["s2r_sft"]["metrics"]
    assert file == "verdict_accuracy.png" and len(heights) == 3
    assert heights == pytest.approx([100 * want[m]["value"] for m in
                                     ("verdict_accuracy", "wrong_precision", "wrong_recall")])
    text = report.main(report.ReportConfig(output_dir=str(tmp_path), arms=["s2r_sft", "base"],
                                           n_boot=100)).read_text()
    assert "![verdict_accuracy.png](verdict_accuracy.png)" in text
    assert (tmp_path / "report" / "verdict_accuracy.png").stat().st_size > 1000
