"""The hf engine's speed options: off reproduces the engine's earlier tokens exactly, on gives the
same tokens on a tiny model, the model keeps its own attention, bad values are UserErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backtrack.engines import GenerationParams, make_engine
from backtrack.errors import UserError

GOLDEN = json.loads((Path(__file__).parent / "golden" / "hf_engine_tokens.json").read_text())
QUESTIONS = ["Tom has 3 apples.", "Ann has 12 coins. Ann gets 4 more. How many coins now?",
             "Ben has 5 pens.", "Mia has 7 cards. Mia gets 2 more."]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    import torch

    threads = torch.get_num_threads()
    yield lambda **options: make_engine("hf", str(tiny_model_dir), batch_size=16, num_threads=1,
                                        **options)
    torch.set_num_threads(threads)


def token_ids(engine, name: str) -> list:
    from backtrack.chat import render_prompt

    prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": q}])
               for q in QUESTIONS]
    params = GenerationParams(**GOLDEN["params"][name])
    return [[c.token_ids for c in row] for row in engine.generate(prompts, params)]


@pytest.mark.parametrize("name", ["shared_prefill", "single", "greedy"])
def test_options_off_reproduce_the_earlier_tokens(engines, name):
    engine = engines(attn_implementation=None, attend_filled=False, compile=False)
    assert engine._compile_kwargs() == {}
    assert token_ids(engine, name) == GOLDEN["token_ids"][name]


@pytest.mark.parametrize("options", [{"attend_filled": True}, {"attn_implementation": "eager"},
                                     {"attn_implementation": "eager", "attend_filled": True}])
def test_options_on_give_the_same_tokens_and_leave_the_model_as_it_was(engines, options):
    engine = engines(**options)
    own = engine.model.config._attn_implementation
    for name in ("shared_prefill", "single"):  # shared prefill, and transformers' static cache
        assert token_ids(engine, name) == GOLDEN["token_ids"][name]
    assert engine.model.config._attn_implementation == own  # a trainer sharing it is unaffected


@pytest.mark.parametrize("chunk", [1, 3])
def test_prompts_prefilled_in_chunks_give_the_same_tokens(engines, monkeypatch, chunk):
    """The 4 prompts (of different lengths) prefilled 1 or 3 at a time, each chunk without its
    padding-only columns: generate's shared prefill still gives the golden tokens, and the
    compact shared-prefix decode the tokens of one chunk."""
    from backtrack.engines import hf_prefill

    compact = engines(cache="dynamic", decode="compact", shared_prefix=True)
    whole = token_ids(compact, "shared_prefill")
    monkeypatch.setattr(hf_prefill, "PREFILL_ROWS", chunk)
    assert token_ids(engines(), "shared_prefill") == GOLDEN["token_ids"]["shared_prefill"]
    assert token_ids(compact, "shared_prefill") == whole


def test_a_cache_with_sliding_window_layers_is_prefilled_in_one_chunk(engines):
    """Whole-width tensors would not fit a sliding-window layer: one call with every row."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from backtrack.engines.hf_prefill import prefill_in_chunks

    model = engines().model
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9], [0, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    calls = []

    def sliding_setup(start, end, first):
        calls.append((start, end, first))
        cache = DynamicCache(config=model.config)
        cache.layers[0] = DynamicSlidingWindowLayer(sliding_window=64)
        return cache, {}

    with torch.inference_mode():
        cache = prefill_in_chunks(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), 1,
                                  sliding_setup)
    assert calls[-1] == (0, 3, 0) and cache.get_seq_length() == 5


def test_filled_attention_reads_only_the_filled_slots_with_equal_logits(engines):
    """One decode step on a static cache of 64 slots with 9 filled (row 2 left-padded): the
    filled mask has 10 columns and the logits equal those of attention over all 64."""
    import torch
    from transformers import StaticCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from backtrack.engines.hf_attention import filled_attention

    engine = engines()
    model, name = engine.model, filled_attention("sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [0, 0, 0, 8, 9, 10, 11, 12, 13, 9]])
    mask = ids != 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for implementation in ("sdpa", name):
        model.set_attn_implementation(implementation)
        cache = StaticCache(config=model.config, max_cache_len=64)
        with torch.inference_mode():
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                  position_ids=positions[:, :-1], past_key_values=cache)
            logits[implementation] = model(input_ids=ids[:, -1:], attention_mask=mask,
                                           position_ids=positions[:, -1:],
                                           past_key_values=cache).logits
    model.set_attn_implementation("sdpa")
    built = ALL_MASK_ATTENTION_FUNCTIONS[name](batch_size=2, q_length=1, kv_length=64, q_offset=9,
                                               attention_mask=mask, allow_is_causal_skip=False)
    assert built.shape == (2, 1, 1, 10) and built[:, 0, 0].tolist() == mask.tolist()
    torch.testing.assert_close(logits[name], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_compile_and_filled_attention_build_the_generate_options(engines):
    compiled = engines(compile=True)._compile_kwargs()["compile_config"]
    assert compiled.mode == "default" and compiled._compile_all_devices
    # Without compile, the filled attention keeps CUDA's automatic compile off (shapes change).
    assert engines(attend_filled=True)._compile_kwargs() == {"disable_compile": True}
    assert "compile_config" in engines(attend_filled=True, compile=True)._compile_kwargs()


@pytest.mark.parametrize("options, message", [
    ({"attn_implementation": "flash"}, "option 'attn_implementation' must be one of eager, sdpa"),
    ({"attend_filled": "yes"}, "option 'attend_filled' must be true or false"),
    ({"attend_filled": True, "cache": "dynamic"}, "'attend_filled' needs cache: static"),
    ({"compile": 1}, "option 'compile' must be true or false"),
    ({"decode": "fast"}, "option 'decode' must be one of"),
    ({"shared_prefix": 1, "decode": "compact"}, "option 'shared_prefix' must be true or false"),
    ({"shared_prefix": True}, "option 'shared_prefix' needs decode: compact"),
    ({"shared_prefix": True, "decode": "compact", "attn_implementation": "eager"},
     "option 'shared_prefix' needs decode: compact and no attn_implementation"),
])
def test_bad_option_values_are_user_errors(engines, options, message):
    with pytest.raises(UserError, match=message):
        engines(**options)


def test_compact_decode_greedy_gives_generates_tokens(engines):
    """Finished rows leaving the batch and its cache change nothing a row sees: greedy tokens
    equal generate's (golden), with one prefill shared by n copies and without."""
    engine = engines(decode="compact")
    assert token_ids(engine, "greedy") == GOLDEN["token_ids"]["greedy"]
    engine.share_prefill = False
    assert token_ids(engine, "greedy") == GOLDEN["token_ids"]["greedy"]


def _varied(engine):
    """The tiny random model's greedy output is one token repeated; larger weights make it
    vary (same scaling for every engine, so they still share one model function)."""
    import torch

    with torch.no_grad():
        for module in engine.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(18)
    return engine


def _ending_at(engine, token: int):
    """The engine with `token` as an extra end-of-turn id, so rows end at different steps."""
    engine.eos_ids = [*engine.eos_ids, token]
    engine._eos_set = set(engine.eos_ids)
    return engine


def test_compact_decode_drops_finished_rows_without_changing_the_others(engines):
    """Rows ending at different steps leave the batch; greedy, every row still gets exactly
    generate's tokens, and sampling repeats for a seed."""
    from collections import Counter

    from backtrack.chat import render_prompt

    free = token_ids(_varied(engines()), "greedy")
    token = Counter(t for row in free for ids in row for t in ids[1:]).most_common(1)[0][0]
    compact, reference = (_ending_at(_varied(engines(**o)), token)
                          for o in ({"decode": "compact"}, {}))
    ended = token_ids(compact, "greedy")
    assert ended == token_ids(reference, "greedy")
    assert len({len(ids) for row in ended for ids in row}) > 2  # rows ended at different steps
    prompts = [render_prompt(compact.tokenizer, [{"role": "user", "content": q}])
               for q in QUESTIONS]
    params = GenerationParams(n=4, temperature=1.0, max_new_tokens=12, seed=3)
    flat = [c for row in compact.generate(prompts, params) for c in row]
    assert [c.token_ids for c in flat] == [c.token_ids for row in compact.generate(prompts, params)
                                           for c in row]
    assert len({tuple(c.token_ids) for c in flat}) > 4  # the n copies sample apart
    assert len({c.new_tokens for c in flat}) > 1
    for c in flat:
        assert token not in c.token_ids and compact.pad_id not in c.token_ids
        assert c.finish_reason == ("length" if c.new_tokens == 12 == len(c.token_ids) else "stop")


def test_shared_prefix_gives_the_tokens_of_n_prompt_copies(engines):
    """A prompt's cache held once for its n samples (grouped-query attention: the tiny model
    has 4 heads on 2 KV heads), rows ending at different steps and prompts of different
    lengths leaving the batch: the same sampled tokens as n cache copies, and the model keeps
    its own attention."""
    from collections import Counter

    from backtrack.chat import render_prompt

    free = token_ids(_varied(engines()), "greedy")
    token = Counter(t for row in free for ids in row for t in ids[1:]).most_common(1)[0][0]
    shared, copies = (_ending_at(_varied(engines(decode="compact", **o)), token)
                      for o in ({"shared_prefix": True}, {}))
    own = shared.model.config._attn_implementation
    prompts = [render_prompt(shared.tokenizer, [{"role": "user", "content": q}])
               for q in QUESTIONS]
    for seed in (3, 4):
        params = GenerationParams(n=4, temperature=1.0, max_new_tokens=12, seed=seed)
        got = [[c.token_ids for c in row] for row in shared.generate(prompts, params)]
        assert got == [[c.token_ids for c in row] for row in copies.generate(prompts, params)]
        assert len({len(ids) for row in got for ids in row}) > 2  # rows ended apart
    assert shared.model.config._attn_implementation == own


@pytest.mark.parametrize("plain", [True, False])
def test_shared_prefix_step_gives_the_models_logits_bit_for_bit(engines, monkeypatch, plain):
    """Decode steps through the model's own modules (no mask building, no output bookkeeping;
    with `plain`, the decoder layers' arithmetic run by `hf_step` around their norms,
    projections and MLPs, else the layers called whole) give exactly the full forward's
    logits, over three steps of 8 rows on a shared prefix (4 prompts, one left-padded), each
    step writing the per-row cache once."""
    from types import SimpleNamespace

    import torch
    from transformers import DynamicCache

    from backtrack.engines import hf_step
    from backtrack.engines.hf_decode import PreallocatedLayer
    from backtrack.engines.hf_prefill import own_tokens_cache
    from backtrack.engines.hf_prefix import SharedPrefix, register

    model = engines().model
    assert hf_step.plain_decoder_layers(model.model.layers)  # a Llama's
    if not plain:
        monkeypatch.setattr(hf_step, "plain_decoder_layers", lambda layers: False)
    step = hf_step.shared_prefix_step(model)
    assert step is not None  # a Llama
    ids = torch.randint(3, model.config.vocab_size, (4, 6),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    own = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        with torch.inference_mode():
            prefill = DynamicCache(config=model.config)
            model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=prefill,
                  use_cache=True)
            prefix = SharedPrefix(prefill, mask[:, :-1], 2, model.dtype)
            caches = [own_tokens_cache(model, prefix, 8) for _ in range(2)]
            for cache in caches:
                cache.layers = [PreallocatedLayer(layer, 4) for layer in cache.layers]
            current = ids[:, -1:].repeat_interleave(2, dim=0)
            position = (mask.cumsum(-1) - 1)[:, -1:].repeat_interleave(2, dim=0)
            for _ in range(3):
                full = model(input_ids=current, attention_mask=torch.ones_like(current),
                             position_ids=position, past_key_values=caches[0], use_cache=True,
                             shared_prefix=prefix).logits[:, -1, :]
                lean = step(current, position, caches[1], prefix)
                assert torch.equal(full, lean)
                current, position = full.argmax(-1, keepdim=True), position + 1
    finally:
        model.set_attn_implementation(own)
    other = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"), model=model.model)
    assert hf_step.shared_prefix_step(other) is None  # another layout keeps the model's forward


def test_decoder_layers_with_more_than_the_llama_parts_are_called_whole(engines):
    """The step runs a layer's arithmetic itself only for the plain Llama form: a Qwen3 layer
    (q_norm / k_norm in its attention), a hooked one or one with LoRA linears is called whole,
    so its extra parts, the hooks and the adapters still run."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from backtrack.engines.hf_step import plain_decoder_layers

    layers = engines().model.model.layers
    assert plain_decoder_layers(layers)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=8))
    assert not plain_decoder_layers(qwen3.model.layers)
    for module in (layers[0].self_attn, layers[1].mlp.down_proj):
        handle = module.register_forward_hook(lambda *args: None)
        assert not plain_decoder_layers(layers)
        handle.remove()
    assert plain_decoder_layers(layers)
    lora = get_peft_model(engines().model, LoraConfig(r=2, target_modules=["v_proj"]))
    assert not plain_decoder_layers(lora.base_model.model.model.layers)


def test_compile_with_shared_prefix_compiles_the_decode_step_once(engines, monkeypatch):
    """`compile` with `shared_prefix` hands the lean decode step to torch.compile once per
    engine, decodes every n > 1 call through what it returned, and leaves n = 1 calls (no
    shared prefix) alone. torch.compile is swapped for a recorder (a real compile takes a
    minute); the benchmark checks the compiled step's tokens (benchmarks/sampling.py)."""
    import torch

    from backtrack.chat import render_prompt

    compiled, stepped = [], []

    def recorder(step, **options):
        compiled.append(options)

        def run(*args):
            stepped.append(args[0].shape[0])
            return step(*args)
        return run

    monkeypatch.setattr(torch, "compile", recorder)
    engine, plain = (engines(decode="compact", shared_prefix=True, **o)
                     for o in ({"compile": True}, {}))
    prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": q}])
               for q in QUESTIONS]
    for n in (3, 3, 1):
        params = GenerationParams(n=n, temperature=1.0, max_new_tokens=6, seed=n)
        assert ([[c.token_ids for c in row] for row in engine.generate(prompts, params)]
                == [[c.token_ids for c in row] for row in plain.generate(prompts, params)])
        if n == 3:
            assert stepped and stepped[0] == 3 * len(QUESTIONS)
            steps_so_far = len(stepped)
    assert compiled == [{"dynamic": True}]  # once, for every call
    assert len(stepped) == steps_so_far  # the n = 1 call ran the model's forward


def test_decode_buffers_are_reused_between_calls_with_the_same_tokens(engines):
    """The engine keeps its cache memory on CPU: a second call decodes into the same storage
    and gives the tokens of a call that takes fresh memory."""
    from backtrack.chat import render_prompt

    kept, fresh = engines(decode="compact", shared_prefix=True), engines(
        decode="compact", shared_prefix=True)
    fresh.buffers.keep = False
    prompts = [render_prompt(kept.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    params = GenerationParams(n=3, temperature=1.0, max_new_tokens=10, seed=5)
    first = kept.generate(prompts, params)
    storage = {name: t.data_ptr() for name, t in kept.buffers._storage.items()}
    assert storage and not fresh.buffers._storage
    again = kept.generate(prompts, params)
    assert {name: t.data_ptr() for name, t in kept.buffers._storage.items()} == storage
    expected = [[c.token_ids for c in row] for row in fresh.generate(prompts, params)]
    assert [[c.token_ids for c in row] for row in first] == expected
    assert [[c.token_ids for c in row] for row in again] == expected
    assert not fresh.buffers._storage


def test_shared_prefix_drops_prompts_left_without_rows():
    """Rows 0-5 are prompts 0-2 x 2 samples; keeping rows 1, 4, 5 drops prompt 1's keys,
    values and padding mask and renumbers prompt 2 as 1."""
    import torch
    from transformers import DynamicCache

    from backtrack.engines.hf_prefix import SharedPrefix

    cache = DynamicCache()
    keys = torch.arange(3.0)[:, None, None, None].expand(3, 2, 4, 5).contiguous()
    cache.update(keys, keys + 10, 0)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    prefix = SharedPrefix(cache, mask, 2, torch.float32)
    assert prefix.group.tolist() == [0, 0, 1, 1, 2, 2] and prefix.slot.tolist() == [0, 1] * 3
    prefix.keep(torch.tensor([1, 4, 5]))
    assert prefix.group.tolist() == [0, 1, 1] and prefix.slot.tolist() == [1, 0, 1]
    assert prefix.keys[0][:, 0, 0, 0].tolist() == [0.0, 2.0]  # prompts 0 and 2
    assert prefix.values[0][:, 0, 0, 0].tolist() == [10.0, 12.0]
    assert (prefix.bias[:, 0, 0] < 0).tolist() == [[True, False, False, False],
                                                  [True, True, False, False]]


def test_cache_with_slack_moves_when_full_and_keeps_its_rows_close():
    """With `slack` 2 the own-token cache has room for 2 more tokens: the third update moves
    the filled part into the other kept buffer, the next row-head's keys always start at most
    2 slots after a row-head's last one, and every view holds what was written, after a move
    and after rows are dropped too. Without slack a cache that is full refuses more."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from backtrack.engines.hf_decode import DecodeBuffers, PreallocatedLayer

    start = torch.randn(3, 2, 1, 4)
    layer = DynamicLayer()
    layer.update(start, -start)
    buffers = DecodeBuffers()
    cache = PreallocatedLayer(layer, 100, buffers, index=0, slack=2)
    written, pointers = [start], set()
    for step in range(5):
        new = torch.randn(3, 2, 1, 4)
        keys, values = cache.update(new, -new)
        written.append(new)
        expected = torch.cat(written, dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        gap = keys.stride(1) // 4 - keys.shape[2]  # free slots between two row-heads' keys
        assert 0 <= gap <= 2, (step, gap)
        pointers.add(keys.data_ptr())
    assert len(pointers) == 2  # moved (twice): between the two kept buffers, no fresh memory
    assert {name[2] for name in buffers._storage} == {0, 1}
    cache.batch_select_indices(torch.tensor([0, 2]))
    expected = torch.cat(written, dim=2)[[0, 2]]
    assert torch.equal(cache.keys, expected) and torch.equal(cache.values, -expected)
    new = torch.randn(2, 2, 1, 4)
    keys, _ = cache.update(new, -new)
    assert torch.equal(keys, torch.cat([expected, new], dim=2))

    full = PreallocatedLayer(layer, 1)  # no slack: room for the prefill's one token only
    with pytest.raises(ValueError, match="exceed its capacity"):
        full.update(start, start)


def test_a_full_batch_groups_rows_by_reshape_with_the_same_attention():
    """While every prompt has its n rows in order, the shared-prefix attention groups rows by
    reshaping; once a row is dropped, by scatter and gather. Both give the same output, bit for
    bit, for the full batch (forced through the gather) and a batch that lost rows."""
    from types import SimpleNamespace

    import torch
    from transformers import DynamicCache

    from backtrack.engines.hf_prefix import SharedPrefix, shared_prefix_attention

    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    cache.update(torch.randn(3, 2, 5, 8, generator=generator),
                 torch.randn(3, 2, 5, 8, generator=generator), 0)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    prefix = SharedPrefix(cache, mask, 2, torch.float32)
    module = SimpleNamespace(layer_idx=0)

    query = torch.randn(6, 4, 1, 8, generator=generator)
    own = torch.randn(6, 2, 3, 8, generator=generator)

    def attend(rows, full: bool):
        prefix.full = full
        return shared_prefix_attention(module, query[rows], own[rows], -own[rows], None, 0.3,
                                       shared_prefix=prefix)[0]

    assert prefix.full
    by_reshape = attend(slice(None), True)
    assert torch.equal(by_reshape, attend(slice(None), False))
    prefix.keep(torch.arange(6))  # nothing dropped: still full
    assert prefix.full
    kept = [0, 1, 2, 4, 5]
    prefix.keep(torch.tensor(kept))
    assert not prefix.full and prefix.slot.tolist() == [0, 1, 0, 0, 1]
    assert torch.allclose(attend(kept, False), by_reshape[kept], rtol=0, atol=1e-6)
