"""The hf engine's prompt prefill with a common start (`hf_prefill.prompt_prefill`,
`share_start`): the tokens every prompt starts with run once, every prompt's keys and values
are the whole prefill's (up to float summation order), and the engine's shared-prefix decode
gives the tokens it gave with whole prompts."""

from __future__ import annotations

import pytest

from backtrack.engines import GenerationParams, make_engine

QUESTIONS = ["Tom has 3 apples.", "Ann has 12 coins. Ann gets 4 more. How many coins now?",
             "Ben has 5 pens.", "Mia has 7 cards. Mia gets 2 more."]
SYSTEM = "Think step by step, then write the answer."


def left_padded(rows: list[list[int]]):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("rows, expected", [
    ([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 9, 2, 3, 4], [5, 6, 7, 8, 9, 9, 4]], 5),
    ([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 2, 3]], 4),  # the shortest row keeps one token
    ([[5, 6, 7, 8, 9, 1], [5, 6, 7, 3, 9, 2]], 0),  # 3 in common: under MIN_COMMON_START
    ([[5, 6, 7, 8, 9, 1]], 0),  # one row: nothing to share
])
def test_common_start_counts_what_every_row_starts_with(rows, expected):
    from backtrack.engines.hf_prefill import common_start

    assert common_start(*left_padded(rows)) == expected


def test_common_start_is_zero_for_a_mask_that_is_not_left_padding():
    import torch

    from backtrack.engines.hf_prefill import common_start

    ids = torch.tensor([[5, 5, 5, 5, 5, 5, 0], [5, 5, 5, 5, 5, 5, 5]])  # row 0 right-padded
    assert common_start(ids, (ids != 0).long()) == 0
    assert common_start(ids[:, :-1], (ids[:, :-1] != 0).long()) == 5


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model_dir):
    import torch

    from backtrack.chat import render_prompt

    threads = torch.get_num_threads()
    engine = make_engine("hf", str(tiny_model_dir), batch_size=64, num_threads=1,
                         decode="compact", shared_prefix=True)
    with torch.no_grad():  # weights scaled so greedy output varies between prompts
        for module in engine.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(18)
    prompts = [render_prompt(engine.tokenizer, [{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": q}])
               for q in QUESTIONS]
    yield engine, prompts
    torch.set_num_threads(threads)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_prefill_runs_the_common_start_once_with_the_whole_prefills_keys(
        model_and_prompts, monkeypatch, chunk):
    """4 prompts of different lengths sharing a system turn, 1, 3 or all rows per chunk: one
    forward of one row runs the common start, the chunks run only the rests, and every real
    column's keys and values equal the whole prefill's (atol 1e-5), at the columns the
    returned mask marks real; the padding between start and rest is masked."""
    import torch

    from backtrack.engines import hf_prefill

    engine, prompts = model_and_prompts
    model = engine.model
    ids, mask = left_padded([engine.tokenizer(p)["input_ids"] for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lead = hf_prefill.common_start(ids, mask)
    assert lead >= 8
    monkeypatch.setattr(hf_prefill, "PREFILL_ROWS", chunk)
    shapes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: shapes.append(
        tuple(k["input_ids"].shape)) or forward(*a, **k))
    with torch.inference_mode():
        whole, whole_mask = hf_prefill.prompt_prefill(model, ids, mask, positions)
        calls = len(shapes)
        shared, shared_mask = hf_prefill.prompt_prefill(model, ids, mask, positions,
                                                        share_start=True)
    assert torch.equal(whole_mask, mask)
    assert shapes[calls] == (1, lead)  # the start, once
    assert sum(r * w for r, w in shapes[calls + 1:]) < sum(r * w for r, w in shapes[:calls])
    assert all(w <= ids.shape[1] - lead for _, w in shapes[calls + 1:])
    assert torch.equal(shared_mask.sum(1), mask.sum(1))
    assert bool(shared_mask[:, :lead].all())
    for layer, other in zip(whole.layers, shared.layers):
        for row in range(len(prompts)):
            real, kept = mask[row].bool(), shared_mask[row].bool()
            assert torch.allclose(layer.keys[row][:, real], other.keys[row][:, kept], atol=1e-5)
            assert torch.allclose(layer.values[row][:, real], other.values[row][:, kept],
                                  atol=1e-5)


def test_shared_start_decodes_the_tokens_of_whole_prompts(model_and_prompts, monkeypatch):
    """The engine's shared-prefix decode (n = 3 per prompt at temperatures 0.3 and 1) gives
    the same tokens with the common start run once as with each prompt prefilled whole."""
    from backtrack.engines import hf_prefill

    engine, prompts = model_and_prompts
    calls = []
    common_start = hf_prefill.common_start
    monkeypatch.setattr(hf_prefill, "common_start",
                        lambda *a: calls.append(common_start(*a)) or calls[-1])
    runs = {}
    for minimum in (hf_prefill.MIN_COMMON_START, 1 << 30):
        monkeypatch.setattr(hf_prefill, "MIN_COMMON_START", minimum)
        runs[minimum] = [[[c.token_ids for c in row] for row in engine.generate(
            prompts, GenerationParams(n=3, temperature=t, max_new_tokens=12, seed=1))]
            for t in (0.3, 1.0)]
    assert calls[0] >= 8 and calls[-1] == 0  # shared, then not
    shared, whole = runs.values()
    assert shared == whole
    assert len({tuple(ids) for row in shared[0] for ids in row}) > 1  # prompts decode apart
