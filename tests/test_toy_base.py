"""toy-base: corpus with self-corrections, loss masking, and a tiny end-to-end training run."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import BACKTRACK_CMD

from backtrack.errors import UserError
from backtrack.tasks import get_task
from backtrack.tasks.arith import apply_op, parse_step
from backtrack.toy_base import ToyBaseConfig, config_hash, main, resume_point, train_tokenizer
from backtrack.toy_corpus import (RETRY_PHRASES, TranscriptDataset, build_corpus, corpus_problems,
                                  loss_kinds)

TINY = dict(threads=1, layers=1, hidden=32, heads=2, intermediate=64, steps=40, batch_size=16, lr=1e-2,
            warmup_steps=4, eval_problems=8, task_args={"steps": 2, "test_size": 20})


def _kinds(segments) -> str:
    """'clean', 'immediate' or 'late', read off the shape of an assistant turn."""
    texts = [text for text, _ in segments]
    phrase = [i for i, t in enumerate(texts) if t.strip() in RETRY_PHRASES]
    if not phrase:
        return "clean"
    wrong = [t for t, kind in segments if kind == "error"]
    return "late" if len(wrong) == 1 and wrong[0].count("\n") > 1 else "immediate"


def _check_redo(segments) -> None:
    """After the phrase the solution restarts at the first wrong step, done right."""
    wrong_lines = [t for t, kind in segments if kind == "error"][0].splitlines()
    first_wrong = parse_step(wrong_lines[0])
    i = next(i for i, (t, _) in enumerate(segments) if t.strip() in RETRY_PHRASES)
    assert segments[i + 1] == ("\n", "ok")
    redo = parse_step(segments[i + 2][0])
    assert redo[:2] == first_wrong[:2] and redo[2:] != first_wrong[2:]
    assert redo[3] == apply_op(*redo[:3])


def test_correction_rate_zero_gives_clean_transcripts():
    corpus = build_corpus(get_task("arith"), ToyBaseConfig(correction_rate=0.0), 400)  # knob off
    text = "".join(t for _m, segs in corpus for t, _ in segs)
    assert not any(phrase in text for phrase in RETRY_PHRASES)
    assert {kind for _m, segs in corpus for _t, kind in segs} == {"ok"}


@pytest.mark.parametrize("slip_kinds", [["result"], ["result", "operand"]])
def test_correction_rate_gives_both_kinds_at_the_rate(slip_kinds):
    config = ToyBaseConfig(correction_rate=0.3, late_share=0.5, slip_kinds=slip_kinds,
                           redo_from="first_wrong")
    corpus = build_corpus(get_task("arith"), config, 1000)
    kinds = [_kinds(segs) for _m, segs in corpus]
    assert 0.25 < 1 - kinds.count("clean") / len(kinds) < 0.35
    assert kinds.count("late") > 50 and kinds.count("immediate") > 50
    for _m, segs in corpus:
        if _kinds(segs) != "clean":
            _check_redo(segs)
            assert segs[-1][0].startswith("</think>\nThe answer is ")
    wrong = [parse_step([t for t, kind in segs if kind == "error"][0].splitlines()[0])
             for _m, segs in corpus if _kinds(segs) != "clean"]
    operand_slips = sum(c == apply_op(a, op, b) for a, op, b, c in wrong)  # consistent arithmetic
    assert (operand_slips > 50) == ("operand" in slip_kinds)


@pytest.mark.parametrize("on_errors,on_phrases", [(False, False), (True, False), (False, True)])
def test_loss_only_on_the_assistant_turn_and_chosen_pieces(on_errors, on_phrases):
    task = get_task("arith")
    config = ToyBaseConfig(correction_rate=1.0, loss_on_errors=on_errors,
                           loss_on_phrases=on_phrases)
    corpus = build_corpus(task, config, 200)
    tokenizer = train_tokenizer(task, corpus, 400)
    dataset = TranscriptDataset(tokenizer, corpus, loss_kinds(config))
    trained_kinds = {"ok"} | ({"error"} if on_errors else set()) | (
        {"phrase"} if on_phrases else set())
    for index in range(20):
        item = dataset[index]
        trained = tokenizer.decode([t for t in item["labels"] if t != -100])
        segments = corpus[index][1]
        assert trained == "".join(t for t, k in segments if k in trained_kinds) + "<|im_end|>"
        assert trained != "".join(t for t, _k in segments) + "<|im_end|>"


def test_config_hash_ignores_output_dir_only():
    base = ToyBaseConfig()
    assert config_hash(base) == config_hash(ToyBaseConfig(output_dir="elsewhere"))
    assert config_hash(base) != config_hash(ToyBaseConfig(correction_rate=0.1))
    assert config_hash(base) != config_hash(ToyBaseConfig(task_args={"steps": 2}))


def test_later_fields_enter_the_hash_only_when_set():
    """Caches made before pack_length/torch_compile existed stay valid for configs without them."""
    base = ToyBaseConfig()
    assert config_hash(ToyBaseConfig(save_minutes=0.5, threads=1)) == config_hash(base)
    for field, value in (("pack_length", 256), ("torch_compile", True), ("length_grouped", True),
                         ("micro_batches", 2), ("optimizer", "adamw")):
        assert config_hash(ToyBaseConfig(**{field: value})) != config_hash(base)


def test_the_hash_keys_the_newton_schulz_dtype_muon_resolves_to(monkeypatch):
    """auto where bf16 is fast = bfloat16 = the key before the option existed; auto where it
    is not = float32 (other weights), a key of its own."""
    from backtrack import optimizers

    monkeypatch.setattr(optimizers, "fast_bf16_matmul", lambda: True)
    base = config_hash(ToyBaseConfig())
    assert config_hash(ToyBaseConfig(newton_schulz="bfloat16")) == base
    float32 = config_hash(ToyBaseConfig(newton_schulz="float32"))
    assert float32 != base
    monkeypatch.setattr(optimizers, "fast_bf16_matmul", lambda: False)
    assert config_hash(ToyBaseConfig()) == float32
    assert config_hash(ToyBaseConfig(newton_schulz="bfloat16")) == base
    adamw = ToyBaseConfig(optimizer="adamw")  # no Muon: no orthogonalisation to key
    assert config_hash(adamw) == config_hash(ToyBaseConfig(optimizer="adamw",
                                                           newton_schulz="bfloat16"))


@pytest.mark.parametrize("bad", [dict(correction_rate=1.5), dict(hidden=30, heads=4),
                                 dict(steps=0), dict(retry_phrases=[]), dict(micro_batches=3),
                                 dict(micro_batches=2, pack_length=256)])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        ToyBaseConfig(**bad).validate()


def test_non_generated_task_is_a_user_error(tmp_path, gsm8k_dir):
    config = ToyBaseConfig(task="gsm8k", task_args={"path": str(gsm8k_dir)},
                           output_dir=str(tmp_path))
    with pytest.raises(UserError, match="cannot generate a training corpus"):
        main(config)


@pytest.mark.slow
def test_tiny_config_trains_saves_reloads_and_is_cached(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    config = ToyBaseConfig(output_dir=str(tmp_path / "run"), correction_rate=0.1, **TINY)
    start = time.monotonic()
    model_dir = main(config)
    assert time.monotonic() - start < 60
    info = json.loads((tmp_path / "run" / "toy_base" / "run.json").read_text())
    assert info["model_dir"] == str(model_dir) and model_dir.parent == tmp_path / "cache" / "toy"
    losses = [loss for _step, loss in info["losses"]]
    assert info["steps_done"] == TINY["steps"] and losses[-1] < 0.7 * losses[0]
    assert 0.0 <= info["greedy_accuracy"] <= 1.0
    assert not list(model_dir.parent.glob("*.tmp*"))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    task = get_task("arith", TINY["task_args"])
    prompt = tokenizer.apply_chat_template(task.messages(task.problems("test", 1)[0]),
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=12)
    assert out.shape[1] > batch["input_ids"].shape[1]

    mtime = (model_dir / "model.safetensors").stat().st_mtime
    main(ToyBaseConfig(output_dir=str(tmp_path / "run2"), correction_rate=0.1, **TINY))
    info2 = json.loads((tmp_path / "run2" / "toy_base" / "run.json").read_text())
    assert info2["cached"] and info2["model_dir"] == str(model_dir)
    assert (model_dir / "model.safetensors").stat().st_mtime == mtime


def test_late_corrections_can_redo_from_the_start():
    task = get_task("arith")
    config = ToyBaseConfig(correction_rate=1.0, late_share=1.0, redo_from="start")
    corpus = build_corpus(task, config, 200)
    restarts = 0
    for (_messages, segments), problem in zip(corpus, itertools.islice(
            corpus_problems(task), 200)):
        texts = [t for t, _ in segments]
        i = next(i for i, t in enumerate(texts) if t.strip() in RETRY_PHRASES)
        if "".join(texts[i + 2:-1]) == problem.solution + "\n":
            restarts += 1
    assert restarts > 180  # all but the rare slips that fall back to an immediate fix


def test_corpus_never_holds_the_problems_the_pipeline_samples():
    """The sample stage draws from the train split: those problems must be new to the base
    model in any wording, as test problems are."""
    task = get_task("arith", {"steps": 2, "train_size": 300})
    sampled = {p.solution for p in task.problems("train")}
    corpus_solutions = [p.solution for p in itertools.islice(corpus_problems(task), 3000)]
    assert not sampled & set(corpus_solutions)
    # Without the exclusion the stream would hold them (2-step chains repeat often).
    stream = [p.solution for p in itertools.islice(task.iter_problems("train"), 3000)]
    assert sampled & set(stream)


def test_corpus_refuses_a_train_split_that_covers_every_problem():
    task = get_task("arith", {"steps": 1, "max_start": 3, "max_operand": 2, "ops": "+",
                              "train_size": 5, "test_size": 1})
    with pytest.raises(UserError, match="lower train_size"):
        next(corpus_problems(task))


def _run_killed_after_first_checkpoint(recipe, cache, env) -> None:
    """Start `backtrack toy-base`, SIGKILL it once a complete checkpoint is on disk."""
    proc = subprocess.Popen(BACKTRACK_CMD + ["toy-base", "-c", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list((cache / "toy").glob("*.work/trainer/checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sigkill_then_rerun_resumes_and_ends_at_the_uninterrupted_weights(tmp_path, monkeypatch,
                                                                          cli_env, optimizer):
    from safetensors.torch import load_file

    settings = {**TINY, "steps": 30, "eval_problems": 0, "optimizer": optimizer}
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "whole"))
    whole = main(ToyBaseConfig(output_dir=str(tmp_path / "run0"), save_minutes=0.0, **settings))

    cache = tmp_path / "killed"
    shared = {k: settings.pop(k) for k in ("task_args",)}
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({**shared, "output_dir": str(tmp_path / "run"), "toy_base": {
        **settings, "save_minutes": 0.0005}}))  # a checkpoint every few steps
    env = {**cli_env, "BACKTRACK_CACHE": str(cache)}
    _run_killed_after_first_checkpoint(recipe, cache, env)
    assert not (cache / "toy" / whole.name / "config.json").exists()
    done = subprocess.run(BACKTRACK_CMD + ["toy-base", "-c", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    info = json.loads((tmp_path / "run" / "toy_base" / "run.json").read_text())
    first = info["resumed_from_step"]
    assert info["model_dir"] == str(cache / "toy" / whole.name)  # same config hash
    assert 0 < first < 30 and info["steps_this_run"] == 30 - first and info["steps_done"] == 30
    assert [step for step, _loss in info["losses"]] == list(range(1, 31))  # history kept
    assert not list((cache / "toy").glob("*.work"))  # work folder removed once saved
    expected, resumed = (load_file(d / "model.safetensors") for d in (whole, Path(info["model_dir"])))
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert (expected[name] == resumed[name]).all(), name  # bitwise: same machine, 1 thread


def test_resume_point_skips_torn_checkpoints_and_drops_another_corpus(tmp_path):
    work = tmp_path / "abc.work"
    for step, state in ((4, "{}"), (8, "{}"), (12, '{"global_st')):  # 12: killed while saving
        (work / "trainer" / f"checkpoint-{step}").mkdir(parents=True)
        (work / "trainer" / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (work / "identity.json").write_text(json.dumps({"corpus": "c1", "tokenizer": "t1"}))
    assert resume_point(work, {"corpus": "c1", "tokenizer": "t1"}) == (
        work / "trainer" / "checkpoint-8")
    assert not (work / "trainer" / "checkpoint-12").exists()
    assert resume_point(work, {"corpus": "c2", "tokenizer": "t1"}) is None
    assert not (work / "trainer").exists()
    assert json.loads((work / "identity.json").read_text()) == {"corpus": "c2", "tokenizer": "t1"}


def test_micro_batches_split_each_random_batch_and_keep_its_gradient(tmp_path):
    """micro_batches > 1: every optimizer step still sees one random batch of batch_size
    distinct transcripts (the epoch once each, shuffled with the run's seed), split by length
    so less is padded, and the accumulated gradient is the whole batch's."""
    import torch

    from backtrack.toy_base import build_model, make_trainer

    config = ToyBaseConfig(**{**TINY, "micro_batches": 4, "save_minutes": 0.0, "seed": 3})
    task = get_task("arith", TINY["task_args"])
    corpus = build_corpus(task, config, config.steps * config.batch_size)
    tokenizer = train_tokenizer(task, corpus, config.vocab_size)
    model = build_model(tokenizer, config)
    trainer = make_trainer(model, tokenizer, corpus, config, tmp_path)
    sampler = trainer._get_train_sampler()
    assert sampler.seed == 3
    groups = list(sampler)
    steps = [sum(groups[i:i + 4], []) for i in range(0, len(groups), 4)]
    assert len(steps) == config.steps and all(len(set(s)) == config.batch_size for s in steps)
    assert sorted(sum(steps, [])) == list(range(len(corpus)))
    assert steps[0] != list(range(config.batch_size))  # shuffled
    dataset, collate = trainer.train_dataset, trainer.data_collator
    micro = [collate([dataset[i] for i in group]) for group in groups[:4]]
    whole = collate([dataset[i] for i in steps[0]])
    assert sum(b["input_ids"].numel() for b in micro) < whole["input_ids"].numel()
    # the default shared_prefix: each micro-batch runs its common system turn once
    from backtrack.shared_prefix_training import MIN_SHARED, shared_prefix_length
    assert all(shared_prefix_length(b["input_ids"], b["attention_mask"], b["labels"])
               >= MIN_SHARED for b in micro)

    model.train()
    model(**whole).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    samples, items = trainer.get_batch_samples(iter(micro), 4, torch.device("cpu"))
    for batch in samples:
        trainer.training_step(model, batch, items)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-7), name
