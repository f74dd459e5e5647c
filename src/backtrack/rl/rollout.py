"""Rollouts for the RL stage: sample G attempts per problem on the live policy, build the
second attempt, reward both with the task's checker, and lay them out as training rows.

A rollout becomes one row per attempt, each exactly the tokens the policy was conditioned on
and sampled: row 1 = attempt-1 prompt + attempt 1; row 2 = attempt-2 prompt (as the engine
encoded it) + attempt 2. Attempt 2's prompt re-renders attempt 1 as text (a user turn after
it, or its cut prefix + the retry phrase), whose tokens may differ from the sampled ones, so
attempt 1 is trained in its own row and row 2's copy of it is context (segment `carried`).

With process rewards (S²R), a one-attempt rollout is split into steps by the method's trace
reader (`RolloutSettings.split_steps`): each token gets the segment and the index of the step
it is in, and `Rollouts.steps` holds each step's segment and reward.
"""

from __future__ import annotations

import dataclasses
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable

from backtrack.rl.algorithm import PAD_SEGMENT, segment_id


@dataclass
class Row:
    ids: list[int]
    segments: list[int]
    rollout: int  # index of the rollout (problem-major, G per problem) the row belongs to
    steps: list[int] | None = None  # per token: index of its step in the rollout (-1 = none)


@dataclass
class Rollouts:
    """One step's rollouts on this process."""

    rows: list[Row] = field(default_factory=list)
    rewards: dict[str, list[float]] = field(default_factory=dict)
    steps: list[list[tuple[str, float | None]]] = field(default_factory=list)  # per rollout
    new_tokens: int = 0
    generation_seconds: float = 0.0


@dataclass
class RolloutSettings:
    group_size: int
    temperature: float
    top_p: float
    max_new_tokens: int
    form: str  # second attempt: "phrase" | "instruction"
    text: str  # the phrase or instruction
    # process rewards: (text, gold) -> [(end character, segment, reward or None), ...] tiling
    # the text (a method's trace reader, e.g. S²R's); None = no steps
    split_steps: Callable | None = None


def _generate(engine, prompts, params, out: Rollouts):
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    out.generation_seconds += time.perf_counter() - start
    out.new_tokens += sum(c.new_tokens for group in results for c in group)
    return results


def attempt_ids(completion, end_id: int) -> list[int]:
    """The sampled ids, plus the end-of-turn token when the turn ended (the engine drops it;
    the template's end-of-turn stands for it, as in SFT data)."""
    ids = list(completion.token_ids)
    return ids + [end_id] if completion.finish_reason == "stop" else ids


def context_row(tokenizer, prompt: str, spans: list[tuple[int, str]]) -> tuple[list, list]:
    """Ids of `prompt` exactly as the engine encodes it, labelled by character spans
    [(end, segment), ...]: each token takes the segment its first character falls in."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for end, _ in spans]
    names = [segment_id(name) for _, name in spans]
    segments = [names[min(bisect_right(ends, start), len(names) - 1)]
                for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), segments


def second_attempt_spans(prompt1: str, prompt2: str, attempt: str, finish_reason: str,
                         form: str) -> list[tuple[int, str]]:
    """Where the attempt-2 prompt holds the original prompt, attempt-1 text and the bridge."""
    from backtrack.formats import cut_point

    if form == "phrase":  # prompt2 = prompt1 + cut attempt 1 + phrase
        cut = len(prompt1) + cut_point(attempt, finish_reason)
        return [(len(prompt1), "prompt"), (cut, "carried"), (len(prompt2), "bridge")]
    shared = next((i for i, (a, b) in enumerate(zip(prompt1, prompt2)) if a != b),
                  min(len(prompt1), len(prompt2)))
    start = prompt2.find(attempt, shared) if attempt else -1
    if start < 0:
        return [(shared, "prompt"), (len(prompt2), "bridge")]
    return [(shared, "prompt"), (start, "bridge"), (start + len(attempt), "carried"),
            (len(prompt2), "bridge")]


def collect(engine, task, tokenizer, problems, attempts: int, settings: RolloutSettings,
            seed: int, end_id: int) -> Rollouts:
    """G rollouts per problem (problem-major), rewarded `r1` (and `r2` for two attempts)."""
    from backtrack.chat import render_prompt
    from backtrack.engines import GenerationParams, derive_seed

    out = Rollouts()
    params = GenerationParams(n=settings.group_size, temperature=settings.temperature,
                              top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                              seed=seed)
    prompts = [render_prompt(tokenizer, task.messages(p)) for p in problems]
    firsts = _generate(engine, prompts, params, out)
    a1 = segment_id("attempt1")
    flat = []  # (problem, prompt, completion) per rollout
    for problem, prompt, group in zip(problems, prompts, firsts):
        ids, segs = context_row(tokenizer, prompt, [(len(prompt), "prompt")])
        for completion in group:
            new = attempt_ids(completion, end_id)
            out.rows.append(Row(ids + new, segs + [a1] * len(new), len(flat)))
            flat.append((problem, prompt, completion))
    out.rewards["r1"] = [task.reward(c.text, p.answer) for p, _, c in flat]
    if settings.split_steps is not None and attempts == 1:
        for row, (problem, _, completion) in zip(out.rows, flat):
            spans = settings.split_steps(completion.text, problem.answer)
            first = len(row.ids) - len(attempt_ids(completion, end_id))
            label_steps(tokenizer, row, first, completion.token_ids, spans)
            out.steps.append([(segment, reward) for _, segment, reward in spans])
    if attempts == 2:
        _second_attempts(engine, task, tokenizer, flat, settings,
                         dataclasses.replace(params, n=1, seed=derive_seed(seed, "attempt2")),
                         end_id, out)
    return out


def _second_attempts(engine, task, tokenizer, flat, settings, params, end_id, out) -> None:
    from backtrack.formats import second_attempt_prompt

    requests = [second_attempt_prompt(tokenizer, task.messages(p), prompt, c.text,
                                      c.finish_reason, settings.form, settings.text)
                for p, prompt, c in flat]
    seconds = _generate(engine, [prompt2 for prompt2, _ in requests], params, out)
    a2 = segment_id("attempt2")
    out.rewards["r2"] = []
    for k, ((p, prompt, c), (prompt2, carried), (c2,)) in enumerate(zip(flat, requests, seconds)):
        spans = second_attempt_spans(prompt, prompt2, c.text, c.finish_reason, settings.form)
        ids, segs = context_row(tokenizer, prompt2, spans)
        new = attempt_ids(c2, end_id)
        out.rows.append(Row(ids + new, segs + [a2] * len(new), k))
        # in the phrase form the answer is the whole turn: cut attempt 1 + phrase + attempt 2
        out.rewards["r2"].append(task.reward(carried + c2.text, p.answer))


def token_ends(tokenizer, ids: list[int]) -> Callable[[int], int]:
    """end(i): characters in the decoded text of ids[:i + 1] (decoded as the engine does)."""
    def end(i: int) -> int:
        return len(tokenizer.decode(ids[:i + 1], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False))
    return end


def label_steps(tokenizer, row: Row, first: int, sampled: list[int], spans: list[tuple]) -> None:
    """Give the row's generated tokens (from index `first`; `sampled` = the engine's ids) the
    segment and index of the step (`spans` = [(end character, segment, reward), ...]) that
    holds the character before each token's end; tokens past the text (the end-of-turn) go to
    the last step. A binary search per step boundary decodes O(steps x log tokens) prefixes,
    not one per token."""
    end = token_ends(tokenizer, sampled)
    steps = [-1] * first + [0] * (len(row.ids) - first)
    index = 0
    for step, (char_end, segment, _) in enumerate(spans):
        if step == len(spans) - 1:
            stop = len(row.ids) - first
        else:
            lo, hi = index, len(sampled)  # the first token that ends past char_end
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (mid + 1, hi) if end(mid) <= char_end else (lo, mid)
            stop = lo
        row.segments[first + index:first + stop] = [segment_id(segment)] * (stop - index)
        steps[first + index:first + stop] = [step] * (stop - index)
        index = stop
    row.steps = steps


def collate(rows: list[Row], pad_id: int):
    """Right-padded (input_ids, attention_mask, segments, row_rollout, steps) tensors."""
    import torch

    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)
    steps = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row.ids)] = torch.tensor(row.ids)
        mask[i, :len(row.ids)] = 1
        segments[i, :len(row.ids)] = torch.tensor(row.segments)
        if row.steps is not None:
            steps[i, :len(row.ids)] = torch.tensor(row.steps)
    return input_ids, mask, segments, torch.tensor([r.rollout for r in rows]), steps
