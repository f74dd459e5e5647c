"""The hf engine's `group_prefixes` option: n = 1 prompts that share leading tokens (the
continuations of one problem) hold them once, with the tokens of the plain engine."""

from __future__ import annotations

from collections import Counter

import pytest

from backtrack.engines import GenerationParams, make_engine
from backtrack.engines.hf_prefix import prefix_groups
from backtrack.errors import UserError

QUESTIONS = ["Tom has 3 apples.", "Ann has 12 coins. Ann gets 4 more. How many coins now?",
             "Ben has 5 pens.", "Mia has 7 cards. Mia gets 2 more."]
# continuations of different lengths after each prompt, as budget forcing's are
PARTIALS = ["<think> Tom", "<think> 3 + 4 = 7. Wait", "<think> 12 - 4 = 8, so 8 Wait, no"]


def test_prefix_groups_join_rows_when_that_saves_prefill_tokens():
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7], [1, 2, 9, 9, 9, 9, 9], [5]]
    # row 1 shares 4 tokens and costs row 0 one; row 2 shares 2 but would cost 2 x 2; row 3
    # shares nothing (and keeps its only token for the decode)
    assert prefix_groups(rows) == [(0, 2, 4), (2, 3, 6), (3, 4, 0)]
    assert prefix_groups([[1, 2, 3], [1, 2, 3]]) == [(0, 2, 2)]  # each keeps its last token
    assert prefix_groups([[4, 4], [4, 5], [4, 6]]) == [(0, 3, 1)]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """A plain shared-prefix engine and a grouping one on one model, its weights scaled so
    greedy output varies, one more end-of-turn id so rows end at different steps."""
    import torch

    threads = torch.get_num_threads()
    options = dict(batch_size=64, num_threads=1, decode="compact", shared_prefix=True)
    plain = make_engine("hf", str(tiny_model_dir), **options)
    with torch.no_grad():
        for module in plain.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(18)
    grouped = make_engine("hf", str(tiny_model_dir), model=plain.model,
                          tokenizer=plain.tokenizer, group_prefixes=True, **options)
    free = ids(plain, continuations(plain), GenerationParams(n=1, temperature=0,
                                                            max_new_tokens=12))
    token = Counter(t for row in free for got in row for t in got[1:]).most_common(1)[0][0]
    for engine in (plain, grouped):
        engine.eos_ids = [*engine.eos_ids, token]
        engine._eos_set = set(engine.eos_ids)
    yield plain, grouped
    torch.set_num_threads(threads)


def continuations(engine) -> list[str]:
    from backtrack.chat import render_prompt

    prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": q}])
               for q in QUESTIONS]
    return [prompt + partial for prompt in prompts for partial in PARTIALS]


def ids(engine, prompts, params) -> list:
    return [[c.token_ids for c in row] for row in engine.generate(prompts, params)]


def test_grouped_prefixes_give_the_plain_engines_greedy_tokens(pair, monkeypatch):
    """12 continuations (3 per prompt, left-padded leads and rests): the groups hold the
    prompts once and every row gets the plain engine's greedy tokens, rows ending apart."""
    from backtrack.engines import hf_prefix

    plain, grouped = pair
    seen = []
    monkeypatch.setattr(hf_prefix, "prefix_groups",
                        lambda rows: seen.append(prefix_groups(rows)) or seen[-1])
    prompts = continuations(plain)
    params = GenerationParams(n=1, temperature=0, max_new_tokens=12, seed=0)
    expected = ids(plain, prompts, params)
    assert not seen  # the plain engine never groups
    assert ids(grouped, prompts, params) == expected
    assert len({len(row[0]) for row in expected}) > 2  # rows ended at different steps
    (groups,) = seen
    assert len(groups) == len(QUESTIONS)  # one per prompt, its 3 continuations in it
    assert all(end - first == len(PARTIALS) for first, end, _ in groups)


def test_grouped_sampling_draws_the_plain_decodes_tokens_on_the_same_batches(pair, monkeypatch):
    """Sampled, the only change is the batching order: the plain decode given the grouping
    engine's batches (token order) and seeds draws exactly its tokens."""
    plain, grouped = pair
    prompts = continuations(plain)

    def plain_decode(batch, params, seed):
        input_ids, mask = plain._left_padded(batch)
        return plain._compact_batch(input_ids, mask, params, seed)

    monkeypatch.setattr(plain, "group_prefixes", True)  # token order...
    monkeypatch.setattr(plain, "_grouped_batch", plain_decode)  # ...and the plain decode
    for seed in (1, 2):
        params = GenerationParams(n=1, temperature=1.0, max_new_tokens=12, seed=seed)
        assert ids(plain, prompts, params) == ids(grouped, prompts, params)


@pytest.mark.parametrize("chunk", [1, 5])
def test_the_rests_prefilled_in_chunks_give_the_same_tokens(pair, monkeypatch, chunk):
    """The rows' own tokens prefilled a few rows at a time (chunks of 5 split the groups of
    3; chunks of 1 drop each row's padding columns): the plain engine's greedy tokens, and the
    sampled tokens of one chunk for all rows."""
    from backtrack.engines import hf_prefill

    plain, grouped = pair
    prompts = continuations(plain)
    greedy = GenerationParams(n=1, temperature=0, max_new_tokens=12, seed=0)
    sampled = [GenerationParams(n=1, temperature=1.0, max_new_tokens=12, seed=s) for s in (1, 2)]
    whole = [ids(grouped, prompts, params) for params in sampled]  # 12 rows in one chunk
    monkeypatch.setattr(hf_prefill, "OWN_PREFILL_ROWS", chunk)
    assert ids(grouped, prompts, greedy) == ids(plain, prompts, greedy)
    assert [ids(grouped, prompts, params) for params in sampled] == whole


def test_grouped_sampling_repeats_for_a_seed_and_differs_across_seeds(pair):
    _, grouped = pair
    prompts = continuations(grouped)
    draws = [ids(grouped, prompts, GenerationParams(n=1, temperature=1.0, max_new_tokens=8,
                                                    seed=seed)) for seed in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]


def test_a_one_token_prompt_falls_back_to_the_plain_decode(pair):
    plain, grouped = pair
    prompts = continuations(plain)[:3] + ["7"]
    assert len(plain.encode("7")) == 1
    params = GenerationParams(n=1, temperature=0, max_new_tokens=6, seed=0)
    assert ids(grouped, prompts, params) == ids(plain, prompts, params)


def test_group_prefixes_needs_shared_prefix(tiny_model_dir):
    with pytest.raises(UserError, match="option 'group_prefixes'"):
        make_engine("hf", str(tiny_model_dir), decode="compact", group_prefixes=True)
    with pytest.raises(UserError, match="option 'group_prefixes'"):
        make_engine("hf", str(tiny_model_dir), decode="compact", shared_prefix=True,
                    group_prefixes="yes")
