"""The hf engine's `cpu_kernel`: the C++ decode attention gives torch's attention (up to float
summation order) for full and thinned batches, grouped-query heads, strided own caches and
padded own tokens, float16 keys and values, and its token-major cache keeps rows in place; the
engine gives the same tokens with it; where it cannot build, the engine warns and decodes with
torch. Also the CPU engine's memory setting (`hold_freed_memory`): freed memory is reused
without page faults."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from backtrack.engines import GenerationParams, make_engine
from backtrack.errors import UserError


def _prefix(prompts: int, n: int, kv_heads: int, length: int, dim: int, generator,
            kernels=None):
    import torch
    from transformers import DynamicCache

    from backtrack.engines.hf_prefix import SharedPrefix

    cache = DynamicCache()
    for layer in range(2):
        cache.update(torch.randn(prompts, kv_heads, length, dim, generator=generator),
                     torch.randn(prompts, kv_heads, length, dim, generator=generator), layer)
    lengths = torch.randint(1, length + 1, (prompts,), generator=generator)
    mask = (torch.arange(length) >= length - lengths[:, None]).long()  # left padding
    return SharedPrefix(cache, mask, n, torch.float32, kernels=kernels)


def _attend(prefix, layer, query, own_keys, own_values, kernels):
    from backtrack.engines.hf_prefix import shared_prefix_attention

    prefix.kernels = kernels
    if kernels is not None:  # as compact_decode does before its steps (keys dim-major)
        prefix.store_for_decode()
    return shared_prefix_attention(SimpleNamespace(layer_idx=layer), query, own_keys, own_values,
                                   None, 0.3, shared_prefix=prefix)[0]


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 40), (4, 2, 8), (6, 2, 16)])
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("length, own_length", [(9, 6), (37, 19)])
def test_kernel_attention_equals_torch_attention(kernels, heads, kv_heads, dim, token_major,
                                                 length, own_length):
    """5 prompts x 3 samples, an own cache with room for 2 more tokens per row, or stored
    token-major: equal outputs in every layer, before and after rows leave (prompt 1 loses all
    of its rows, which the kernel skips while torch drops its keys). Prompts shorter than one
    block of the kernel's prompt scores (16 tokens) and over two, with a block of padding
    alone; own tokens in 8-token sums and a tail."""
    import torch

    generator = torch.Generator().manual_seed(heads * dim)
    prefix = _prefix(5, 3, kv_heads, length, dim, generator)
    if length > 32:
        assert (prefix.padding[:, 1] >= 16).any()  # a block of padding, skipped
    rows = 15
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    if token_major:
        room = torch.randn(own_length + 2, rows, kv_heads, dim, generator=generator)
        room = room[:own_length].permute(1, 2, 0, 3)
    else:
        room = torch.randn(rows, kv_heads, own_length + 2, dim, generator=generator)
    own_keys, own_values = room[:, :, :own_length], -room[:, :, :own_length]
    for layer in (0, 1):
        expected = _attend(prefix, layer, query, own_keys, own_values, None)
        got = _attend(prefix, layer, query, own_keys, own_values, kernels)
        assert got.shape == expected.shape == (rows, 1, heads, dim)
        assert torch.allclose(got, expected, rtol=0, atol=2e-6)
        skipped = prefix.padding.clone()
        assert (skipped[:, 1] > 0).any()  # some prompts are padded: their columns are skipped
        prefix.padding = torch.zeros_like(skipped)  # ... and computed: bit for bit the same
        assert torch.equal(_attend(prefix, layer, query, own_keys, own_values, kernels), got)
        prefix.padding = skipped
    kept = torch.tensor([0, 2, 6, 7, 8, 10, 14])  # prompt 1 (rows 3-5) has none left
    thinned = _prefix(5, 3, kv_heads, length, dim, torch.Generator().manual_seed(heads * dim))
    thinned.keep(kept)
    with_kernel = _prefix(5, 3, kv_heads, length, dim,
                          torch.Generator().manual_seed(heads * dim), kernels)
    with_kernel.keep(kept)
    assert len(with_kernel.bias) == 5 and len(thinned.bias) == 4  # the kernel's prompts stay
    assert with_kernel.starts.tolist() == [0, 2, 2, 5, 6, 7]
    args = (query[kept], own_keys[kept], own_values[kept])
    assert torch.allclose(_attend(with_kernel, 1, *args, kernels),
                          _attend(thinned, 1, *args, None), rtol=0, atol=2e-6)


def test_padding_run_is_the_one_run_of_padding_columns_or_nothing():
    import torch

    from backtrack.engines.hf_prefix import _padding_run

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 1], [0, 1, 0, 1, 1]])
    assert _padding_run(mask).tolist() == [[0, 2], [0, 0], [2, 4], [0, 0]]


def test_kernel_masks_padding_among_a_rows_first_own_tokens(kernels):
    """Rows whose first own tokens include padding (`mask_own`, as `group_prefixes` leaves
    them): the kernel skips the padded keys as torch's attention does."""
    import torch

    generator = torch.Generator().manual_seed(1)
    prefix = _prefix(2, 2, 2, 7, 8, generator)
    own_mask = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])
    prefix.mask_own(own_mask)
    query = torch.randn(4, 4, 1, 8, generator=generator)
    own = torch.randn(4, 2, 5, 8, generator=generator)  # 3 prefilled + 2 decoded
    expected = _attend(prefix, 0, query, own, own * 2, None)
    assert torch.allclose(_attend(prefix, 0, query, own, own * 2, kernels), expected,
                          rtol=0, atol=2e-6)
    changed = own.clone()
    changed[0, :, :2] = 1e3  # row 0's padded keys: no effect on its output
    assert torch.allclose(_attend(prefix, 0, query, changed, changed * 2, kernels)[0],
                          expected[0], rtol=0, atol=2e-6)


def test_kernel_refuses_inconsistent_inputs_instead_of_reading_past_them(kernels):
    import torch

    from backtrack.engines.cpu_attention import dim_major

    q, plain, own = torch.randn(4, 2, 8), torch.randn(2, 2, 5, 8), torch.randn(4, 2, 3, 8)
    keys = dim_major(plain, kernels.key_block)
    bias, starts = torch.zeros(2, 5), torch.tensor([0, 2, 4])
    ok = kernels.cascade_scores(q, keys, bias, torch.tensor([[0, 1], [0, 0]]), own, starts, 0.3)
    assert ok.shape == (4, 2, 8)
    assert dim_major(keys, kernels.key_block) is keys  # already laid out: no copy
    short = torch.zeros(2 * 2 * 8 * 16 - 1)  # one float short of the last (prompt, head)'s room
    for layout, message in ((plain, "dim-major"), (plain.transpose(2, 3).contiguous()
                                                   .transpose(2, 3), "dim-major"),
                            (short.as_strided((2, 2, 5, 8), (256, 128, 1, 16)), "storage")):
        with pytest.raises(RuntimeError, match=message):
            kernels.cascade_scores(q, layout, bias, torch.tensor([[0, 1], [0, 0]]), own, starts,
                                   0.3)
    for bad, message in (((bias, torch.tensor([[0, 6], [0, 0]]), starts), "out of range"),
                         ((bias, torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 2, 5])),
                          "span the rows"),
                         ((torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.long), starts),
                          "shapes")):
        with pytest.raises(RuntimeError, match=message):
            kernels.cascade_scores(q, keys, bad[0], bad[1], own, bad[2], 0.3)


def test_kernel_reads_float16_keys_and_values_as_the_floats_they_round_to(kernels):
    """`kv_cache_dtype: float16`: prompt and own keys and values stored as float16, the kernel
    gives torch's attention over those values widened to float32."""
    import torch

    prefix = _prefix(3, 2, 2, 7, 16, torch.Generator().manual_seed(5))
    rounded = _prefix(3, 2, 2, 7, 16, torch.Generator().manual_seed(5))
    rounded.keys = [keys.half().float() for keys in rounded.keys]
    rounded.values = [values.half().float() for values in rounded.values]
    generator = torch.Generator().manual_seed(6)
    query = torch.randn(6, 4, 1, 16, generator=generator)
    own = torch.randn(5, 6, 2, 16, generator=generator).half().permute(1, 2, 0, 3)
    expected = _attend(rounded, 1, query, own.float(), -own.float(), None)
    prefix.kernels, prefix.kv_dtype = kernels, torch.float16
    prefix.store_for_decode()
    assert prefix.keys[1].dtype == prefix.values[1].dtype == torch.float16
    got = _attend(prefix, 1, query, own, -own, kernels)
    assert torch.allclose(got, expected, rtol=0, atol=2e-6)
    float32 = _attend(_prefix(3, 2, 2, 7, 16, torch.Generator().manual_seed(5)), 1, query,
                      own.float(), -own.float(), None)
    assert not torch.equal(got, float32)  # the prompts' rounding shows
    with pytest.raises(RuntimeError, match="keys: a Half CPU tensor"):  # one dtype for both
        _attend(prefix, 1, query, own.float(), -own.float(), kernels)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rotary_append_gives_transformers_rotary_and_writes_the_slab(kernels, dtype):
    """The decode step's rotary in C++ (`TokenMajorLayer.append_rotated`): queries and keys
    bit for bit transformers' apply_rotary_pos_emb (no fused multiply-add), keys and values
    written into the next slab as torch's copy rounds them."""
    import torch
    from transformers.cache_utils import DynamicLayer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from backtrack.engines.cpu_attention import TokenMajorLayer
    from backtrack.engines.hf_decode import DecodeBuffers

    generator = torch.Generator().manual_seed(7)
    rows, heads, kv_heads, dim = 5, 4, 2, 16
    query, key, value = (torch.randn(rows, 1, h * dim, generator=generator) * 3
                         for h in (heads, kv_heads, kv_heads))
    angles = torch.rand(rows, 1, dim // 2, generator=generator) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    layer = DynamicLayer()
    layer.update(torch.zeros(rows, kv_heads, 2, dim), torch.zeros(rows, kv_heads, 2, dim))
    cache = TokenMajorLayer(layer, 4, DecodeBuffers(), 0, kernels, getattr(torch, dtype))
    rotated, keys, values = cache.append_rotated(query, key, value, cos, sin)
    expected_q, expected_k = apply_rotary_pos_emb(
        query.view(rows, 1, heads, dim).transpose(1, 2),
        key.view(rows, 1, kv_heads, dim).transpose(1, 2), cos, sin)
    assert torch.equal(rotated, expected_q)
    stored = getattr(torch, dtype)
    assert torch.equal(keys[:, :, 2:], expected_k.to(stored))
    assert torch.equal(values[:, :, 2:], value.view(rows, 1, kv_heads, dim).transpose(1, 2)
                       .to(stored))
    assert cache.get_seq_length() == 3 and keys.dtype == stored


def test_token_major_cache_appends_slabs_and_keeps_rows_in_place(kernels):
    """The kernel's own-token cache: every view holds what was written (as [rows, heads,
    tokens, dim]), in one kept buffer that never moves; dropping rows moves the kept ones to
    the front of each token's slab (one copy each), after which appends still fit."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from backtrack.engines.cpu_attention import TokenMajorLayer
    from backtrack.engines.hf_decode import DecodeBuffers

    start = torch.randn(5, 2, 3, 8)
    layer = DynamicLayer()
    layer.update(start, -start)
    cache = TokenMajorLayer(layer, 9, DecodeBuffers(), 0, kernels)
    written, pointers = [start], set()
    for _ in range(3):
        new = torch.randn(5, 2, 1, 8)
        keys, values = cache.update(new, -new)
        written.append(new)
        assert torch.equal(keys, torch.cat(written, 2)) and torch.equal(values, -keys)
        assert keys.stride(2) > keys.stride(0)  # token-major: the kernel's loop order
        pointers.add(keys.data_ptr())
    assert len(pointers) == 1 and cache.get_seq_length() == 6
    kept = torch.tensor([1, 2, 4])
    cache.batch_select_indices(kept)
    expected = torch.cat(written, 2)[kept]
    assert torch.equal(cache.keys, expected) and torch.equal(cache.values, -expected)
    new = torch.randn(3, 2, 1, 8)
    assert torch.equal(cache.update(new, -new)[0], torch.cat([expected, new], 2))
    with pytest.raises(RuntimeError, match="ascend"):
        kernels.compact_token_rows(cache._keys, torch.tensor([1, 0]), 2)
    with pytest.raises(ValueError, match="exceed its capacity"):
        cache.update(torch.randn(3, 2, 3, 8), torch.randn(3, 2, 3, 8))


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    import torch

    threads = torch.get_num_threads()
    yield lambda **options: make_engine("hf", str(tiny_model_dir), batch_size=16, num_threads=1,
                                        cache="dynamic", decode="compact", shared_prefix=True,
                                        **options)
    torch.set_num_threads(threads)


def _completions(engine, prompts, **params):
    return [[c.token_ids for c in row]
            for row in engine.generate(prompts, GenerationParams(**params))]


def _varied(engine, end: int | None = None):
    """The tiny random model with larger weights (its greedy output then varies) and, with
    `end`, one more end-of-turn id, so that rows end at different steps."""
    import torch

    with torch.no_grad():
        for module in engine.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(18)
    if end is not None:
        engine.eos_ids = [*engine.eos_ids, end]
        engine._eos_set = set(engine.eos_ids)
    return engine


def test_engine_gives_the_same_tokens_with_the_kernel(kernels, engines):
    """n = 4 samples per prompt (rows ending apart, so rows and prompts leave the batch) and
    n = 1 continuations sharing their problem's prompt (`group_prefixes`: padded own
    tokens): the same tokens with and without the kernel."""
    from collections import Counter

    from backtrack.chat import render_prompt

    prompts = [render_prompt(engines().tokenizer, [{"role": "user", "content": q}])
               for q in ("Tom has 3 apples.", "Ann has 12 coins. Ann gets 4 more.",
                         "Ben has 5 pens.")]
    free = _completions(_varied(engines()), prompts, n=4, temperature=1.0, max_new_tokens=12)
    end = Counter(t for row in free for ids in row for t in ids[1:]).most_common(1)[0][0]
    plain, fast = _varied(engines(), end), _varied(engines(cpu_kernel=True), end)
    assert fast.kernels is kernels and plain.kernels is None
    assert fast.describe()["cpu_kernel"] and not plain.describe()["cpu_kernel"]  # in summaries
    for seed in (0, 1):
        params = dict(n=4, temperature=1.0, max_new_tokens=12, seed=seed)
        got = _completions(fast, prompts, **params)
        assert got == _completions(plain, prompts, **params)
        assert len({len(ids) for row in got for ids in row}) > 2
    continuations = [p + ending for p in prompts for ending in ("<think>", "<think>3 +")]
    grouped = (_varied(engines(group_prefixes=True, cpu_kernel=True), end),
               _varied(engines(group_prefixes=True), end))
    params = dict(n=1, temperature=1.0, max_new_tokens=10, seed=2)
    assert (_completions(grouped[0], continuations, **params)
            == _completions(grouped[1], continuations, **params))
    # two own tokens a row after the shared prompt: the rows' own prefill is one token a row,
    # so it reaches the kernel before the decode has laid the prompts' keys out
    two_own = [prompts[0] + "<think>" + digits for digits in ("12", "34", "56")]
    ids = [grouped[0].encode(text) for text in two_own]
    assert len({tuple(row[:-2]) for row in ids}) == 1 and len({row[-2] for row in ids}) == 3
    assert (_completions(grouped[0], two_own, **params)
            == _completions(grouped[1], two_own, **params))


def test_float16_kv_cache_holds_the_decodes_keys_and_values_as_float16(kernels, engines):
    import torch

    from backtrack.chat import render_prompt

    engine = engines(cpu_kernel=True, kv_cache_dtype="float16")
    assert engine.describe()["kv_cache_dtype"] == "float16"
    assert engines(cpu_kernel=True).describe()["kv_cache_dtype"] == "float32"
    prompts = [render_prompt(engine.tokenizer, [{"role": "user", "content": q}])
               for q in ("Tom has 3 apples.", "Ben has 5 pens.")]
    got = _completions(engine, prompts, n=3, temperature=1.0, max_new_tokens=6)
    assert [len(row) for row in got] == [3, 3] and all(ids for row in got for ids in row)
    own = [t for name, t in engine.buffers._storage.items() if name[-1] == "tokens"]
    assert own and all(t.dtype == torch.float16 for t in own)  # the rows' own cache
    for options in ({"kv_cache_dtype": "float16"}, {"cpu_kernel": True, "kv_cache_dtype": "int8"}):
        with pytest.raises(UserError, match="option 'kv_cache_dtype'"):
            engines(**options)


def test_without_a_compiler_the_engine_warns_and_decodes_with_torch(engines, monkeypatch):
    import torch.utils.cpp_extension

    from backtrack.engines import cpu_attention

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    cpu_attention.load_kernels.cache_clear()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    try:
        with pytest.warns(RuntimeWarning, match="did not build .Ninja is required"):
            engine = engines(cpu_kernel=True)
        assert engine.kernels is None and engine.describe()["cpu_kernel"] is False
        assert len(_completions(engine, ["Tom has 3 apples."], n=2, max_new_tokens=4)[0]) == 2
    finally:
        cpu_attention.load_kernels.cache_clear()


@pytest.mark.timeout(300)
def test_a_build_killed_midway_does_not_block_the_next_load(kernels):
    """A build killed while it held torch's lock file leaves that file behind; the next load
    must not wait on it forever (pytest-timeout fails this test if it does)."""
    from backtrack.engines import cpu_attention

    stale = cpu_attention.build_directory() / "lock"
    stale.write_text("")  # as a SIGKILLed build leaves it
    cpu_attention.load_kernels.cache_clear()
    try:
        assert cpu_attention.load_kernels() is not None
        assert not stale.exists()
    finally:
        cpu_attention.load_kernels.cache_clear()


def test_cpu_kernel_needs_shared_prefix_and_applies_to_float32_on_cpu(tiny_model_dir):
    import torch

    from backtrack.engines.cpu_attention import supports

    with pytest.raises(UserError, match="option 'cpu_kernel' .* needs shared_prefix: true"):
        make_engine("hf", str(tiny_model_dir), decode="compact", cpu_kernel=True)
    engine = make_engine("hf", str(tiny_model_dir), device="cpu")
    assert supports(engine.model, "cpu") and not supports(engine.model, "cuda")
    assert not supports(engine.model.to(torch.bfloat16), "cpu")


FAULTS = """
import resource, sys, torch
if sys.argv[1] == "hold":
    from backtrack.engines.hf_decode import hold_freed_memory
    assert hold_freed_memory()
def allocate_and_free():
    blocks = [torch.empty(1 << 18).fill_(1.0) for _ in range(24)]  # 24 x 1 MB, touched
    del blocks
allocate_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    allocate_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="glibc/Linux page-fault counts")
def test_held_freed_memory_is_reused_without_page_faults():
    """24 MB freed and allocated again: glibc gives the freed heap back to the OS and the
    next round faults every page in again (~6 k faults a round here); once the engine's setting
    holds it, almost none (each in a fresh process: the setting is process-wide)."""
    import subprocess
    import sys

    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("default", "hold")}
    assert faults["default"] > 6000 and faults["hold"] * 10 < faults["default"], faults
