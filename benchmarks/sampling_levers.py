"""benchmarks/sampling.py's levers: the hf engine options it times (`LEVERS`), and the compact
decode as it was before each of its later changes (the former levers, `former_decode`): each
undoes its change, and every newer one, by setting the engine modules' attributes back for one
call, so today's and the former decode are timed in one run on one machine."""

from __future__ import annotations

from contextlib import contextmanager

# name: hf engine options (compile pays its compile in an untimed first call, reported apart)
LEVERS = {
    "baseline": {},
    "dynamic": {"cache": "dynamic"},
    "eager": {"attn_implementation": "eager"},
    "attend_filled": {"attend_filled": True},
    "eager+attend_filled": {"attn_implementation": "eager", "attend_filled": True},
    "attend_filled+compile": {"attend_filled": True, "compile": True},
    "compact": {"cache": "dynamic", "decode": "compact"},
    "compact+eager": {"cache": "dynamic", "decode": "compact", "attn_implementation": "eager"},
    "compact+shared_prefix": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
    "compact+shared_prefix+compile": {"cache": "dynamic", "decode": "compact",
                                      "shared_prefix": True, "compile": True},
    # the toy recipe's engine: the decode attention in C++ (`engines/cpu_attention`; built in
    # the untimed first call when not cached)
    "compact+shared_prefix+cpu_kernel": {"cache": "dynamic", "decode": "compact",
                                         "shared_prefix": True, "cpu_kernel": True},
    # ... with the decode's keys and values held as float16 (half the memory the kernel
    # reads; rounded keys and values, so it reports how many sequences are the same)
    "compact+shared_prefix+cpu_kernel+float16_kv": {"cache": "dynamic", "decode": "compact",
                                                    "shared_prefix": True, "cpu_kernel": True,
                                                    "kv_cache_dtype": "float16"},
    # bf16 weights (fast where the CPU has bf16 instructions, e.g. AVX512_BF16); its share is
    # also given of its own bound, at the bf16 matmul rate (`share_of_own_bound`)
    "compact+shared_prefix+bf16": {"cache": "dynamic", "decode": "compact",
                                   "shared_prefix": True, "dtype": "bfloat16"},
    # The default as it was (`former_decode`), newest first; the C++ attention is always
    # today's (the kernel before its dim-major keys, 2026-12-07, is not kept). The recipe's
    # engine with the decode step's linears by F.linear (before `cpu_linear`, 2026-12-07; the
    # same floats on the Zen 4 machine)
    "float16_kv_mkl_linears": {"cache": "dynamic", "decode": "compact", "shared_prefix": True,
                               "cpu_kernel": True, "kv_cache_dtype": "float16"},
    # ... and the prompt prefill's last layer at every position (before
    # `hf_last_layer.last_position_only`, 2026-12-07; the last logits in another float order)
    "float16_kv_whole_last_layer": {"cache": "dynamic", "decode": "compact",
                                    "shared_prefix": True, "cpu_kernel": True,
                                    "kv_cache_dtype": "float16"},
    # ... and drawing torch.multinomial's tokens (`hf_decode.multinomial_one_cpu`, the CPU draw
    # before `inverse_cdf_draw`, 2026-12-07; other tokens, the same distribution)
    "float16_kv+multinomial": {"cache": "dynamic", "decode": "compact", "shared_prefix": True,
                               "cpu_kernel": True, "kv_cache_dtype": "float16"},
    # ... in float32 (its keys and values as the model computes them), as of bd5bf7f
    # (2026-12-07) but for the kernel: decoder layers called whole (before
    # `hf_step.plain_decoder_layers` and its C++ rotary) and each row's last prompt token run
    # by a decode step (before `hf.PREFILL_GIVES_FIRST_TOKEN`; the same tokens up to float
    # order)
    "cpu_kernel_as_of_bd5bf7f": {"cache": "dynamic", "decode": "compact",
                                 "shared_prefix": True, "cpu_kernel": True},
    # ... and without the C++ attention; each prompt prefilled whole (as
    # before `hf_prefill.common_start`, 2026-12-07; another float summation order, so other
    # tokens; the levers below give its tokens)
    "shared_prefix_whole_prompts": {"cache": "dynamic", "decode": "compact",
                                    "shared_prefix": True},
    # ... and each row's own cache sized for the whole generation, the rows always grouped by
    # scatter and gather (as before `hf_decode.CACHE_SLACK` and `SharedPrefix.full`,
    # 2026-12-07; the same tokens as the lever above)
    "shared_prefix_loose_cache": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
    # ... and the prompts prefilled in one batch, padded to the longest (as before
    # `hf_prefill.prefill_in_chunks`, 2026-12-03)
    "shared_prefix_one_prefill": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
    # ... and torch.multinomial, the model's full forward per step, fresh cache memory per
    # call (as before 2026-12-03)
    "shared_prefix_before": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
}
# The toy recipe's engine, and the share of its compute bound the toy world targets at batch 128
RECIPE_LEVER, TARGET_SHARE = "compact+shared_prefix+cpu_kernel+float16_kv", 0.30
DEFAULT_LEVERS = [name for name in LEVERS if "compile" not in name]

# The compact decode as it was (FORMER), newest first; each former lever undoes its own change
# and every newer one (the tokens of `shared_prefix_whole_prompts` and older differ from the
# default's in float summation order only; among themselves they are the same)
FORMER_ORDER = ["float16_kv_mkl_linears", "float16_kv_whole_last_layer", "float16_kv+multinomial", "cpu_kernel_as_of_bd5bf7f",
                "shared_prefix_whole_prompts", "shared_prefix_loose_cache",
                "shared_prefix_one_prefill", "shared_prefix_before"]
FORMER = set(FORMER_ORDER)


def _undo(former: str, engine) -> dict:
    """(module, attribute) -> the value it had before `former`'s change."""
    from backtrack.engines import hf, hf_decode, hf_last_layer, hf_prefill, hf_prefix, hf_step

    index_rows = hf_prefix.SharedPrefix._index_rows

    def never_full(prefix):
        index_rows(prefix)
        prefix.full = False

    return {
        # 2026-12-07: the step's linears packed once (`cpu_linear`)
        "float16_kv_mkl_linears": {(hf_step, "PACKED_LINEARS"): False},
        # 2026-12-07: the prefill's last layer at the last position only
        "float16_kv_whole_last_layer": {(hf_last_layer, "_last_plain_layer"): lambda model: None},
        # 2026-12-07: one uniform per row (`hf_decode.inverse_cdf_draw`)
        "float16_kv+multinomial": {(hf_decode, "CPU_DRAW"): hf_decode.multinomial_one_cpu},
        # 2026-12-07: decoder layers' arithmetic in the step (`hf_step.plain_decoder_layers`),
        # the first token drawn from the prefill's logits (`hf.PREFILL_GIVES_FIRST_TOKEN`)
        "cpu_kernel_as_of_bd5bf7f": {(hf_step, "plain_decoder_layers"): lambda layers: False,
                                     (hf, "PREFILL_GIVES_FIRST_TOKEN"): False},
        # 2026-12-07: prompts' common start prefilled once (`hf_prefill.common_start`)
        "shared_prefix_whole_prompts": {(hf_prefill, "MIN_COMMON_START"): 1 << 30},
        # 2026-12-07: own cache kept near tight (`CACHE_SLACK`), rows grouped by reshape
        "shared_prefix_loose_cache": {(hf_decode, "CACHE_SLACK"): None,
                                      (hf_prefix.SharedPrefix, "_index_rows"): never_full},
        # 2026-12-03: prompts prefilled in chunks (`hf_prefill.prefill_in_chunks`)
        "shared_prefix_one_prefill": {(hf_prefill, "PREFILL_ROWS"): 1 << 30},
        # 2026-12-03: CPU sampler, the lean step, kept cache memory
        "shared_prefix_before": {
            (hf_step, "shared_prefix_step"): lambda model, **kwargs: None,
            (hf_decode, "CPU_DRAW"): lambda probs, generator: probs.multinomial(
                1, generator=generator).squeeze(1),
            (engine.buffers, "keep"): False},
    }[former]


@contextmanager
def former_decode(engine, former: str | None):
    """The compact decode as it was before `former`'s change and every newer one (FORMER)."""
    if former not in FORMER:
        yield
        return
    changes: dict = {}
    for older in FORMER_ORDER[:FORMER_ORDER.index(former) + 1]:
        changes.update(_undo(older, engine))
    saved = {key: getattr(*key) for key in changes}
    for (owner, name), value in changes.items():
        setattr(owner, name, value)
    if not engine.buffers.keep:
        engine.buffers.clear()
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
