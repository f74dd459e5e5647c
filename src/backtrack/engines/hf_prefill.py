"""Prefills for the hf engine's compact decode: prompts, and rows' own leading tokens, run a few
rows at a time into the KV cache the decode loop (`hf_decode.compact_decode`) continues.

`prefill_in_chunks` runs left-padded rows in chunks without their all-padding columns;
`prompt_prefill` runs the prompts, with `share_start` the tokens all of them start with (a
system turn) only once (`common_start`); `own_prefill_in_chunks` runs rows' first own tokens
through the shared-prefix attention (`hf_prefix`).
"""

from __future__ import annotations

from transformers.cache_utils import DynamicLayer

from backtrack.engines.hf_decode import DecodeBuffers
from backtrack.engines.hf_last_layer import last_position_only

# Fewer leading tokens than this in common: `prompt_prefill` runs the prompts whole.
MIN_COMMON_START = 4

# Rows per chunk of `prefill_in_chunks` on CPU (benchmarks/sampling.py; on CUDA one chunk)
OWN_PREFILL_ROWS = 32  # `own_prefill_in_chunks`
PREFILL_ROWS = 16  # the engine's prompt prefill


def prefill_in_chunks(model, input_ids, mask, positions, rows_per_chunk: int, chunk_setup,
                      lead: int = 0, buffers=None, logits: list | None = None):
    """Left-padded `input_ids` (padding 0 in `mask`) run `rows_per_chunk` rows at a time, each
    chunk without the columns that are padding in all of its rows; returns the first chunk's
    cache holding every row's keys and values, zeros in the dropped columns (padding, which the
    caller's attention masks). `chunk_setup(start, end, first)` gives a chunk's empty cache and
    extra forward kwargs (`first`: its first column). Off the CPU the batch is one chunk (a
    GPU computes padding almost for free, while each chunk costs kernel launches), and so it
    is when the cache has other layers than DynamicLayer (sliding-window ones). With `lead`,
    each chunk's cache already holds `lead` columns every row attends to (a shared start),
    and the returned cache has them first. With `buffers` (`hf_decode.DecodeBuffers`) the
    assembled cache lives in memory kept between calls: 8 fresh 1.6 MB tensors cost 5.8 ms of
    a 32-prompt call in page faults and zeroing. With `logits`, each chunk's last-position
    logits ([chunk rows, vocab]) are appended to it.

    The rows of a batch are sorted by length (or share a prompt), so a chunk of neighbours
    needs little padding where the whole batch needs the longest row's (17 % of the toy
    recipe's prompt prefill, 61 % of budget forcing's continuations). Small chunks also keep a
    forward's intermediates small: in one batch of 512 continuations the shared-prefix
    attention's scores reach ~100 MB per layer, fresh memory each call (docs/SPEED.md). 32 prompts
    of the toy recipe's sampling prefill in 90-95 ms instead of 123 ms in chunks of 8-16, 128
    prompts in 410-440 instead of 658 ms."""
    import torch

    rows, width = input_ids.shape
    whole = input_ids.device.type != "cpu"
    first_cache, full, start = None, [], 0
    while start < rows:
        end = rows if whole else min(rows, start + rows_per_chunk)
        real = mask[start:end].any(0).nonzero()
        first = 0 if whole else max(0, min(int(real[0]) if len(real) else width, width - 1))
        cache, kwargs = chunk_setup(start, end, first)
        if not whole and not all(type(layer) is DynamicLayer for layer in cache.layers):
            whole = True  # sliding-window (or other) layers: assembled tensors would not fit
            continue
        chunk_mask = mask[start:end, first:]
        if lead:
            chunk_mask = torch.cat([chunk_mask.new_ones((end - start, lead)), chunk_mask], dim=1)
        out = model(input_ids=input_ids[start:end, first:], attention_mask=chunk_mask,
                    position_ids=positions[start:end, first:], past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **kwargs)
        if logits is not None:
            logits.append(out.logits[:, -1, :])
        if end == rows and start == first == 0:  # one chunk, nothing dropped
            return cache
        if first_cache is None:
            first_cache = cache
            take = (buffers or DecodeBuffers(keep=False)).take
            full = [tuple(take(("prefill", index, part), (rows, t.shape[1], lead + width,
                                                          t.shape[3]), t)
                          for part, t in (("keys", layer.keys), ("values", layer.values)))
                    for index, layer in enumerate(cache.layers)]
        for (keys, values), layer in zip(full, cache.layers):
            for whole_part, part in ((keys, layer.keys), (values, layer.values)):
                whole_part[start:end, :, :lead] = part[:, :, :lead]
                whole_part[start:end, :, lead:lead + first] = 0  # dropped padding columns
                whole_part[start:end, :, lead + first:] = part[:, :, lead:]
        start = end
    for layer, (keys, values) in zip(first_cache.layers, full):
        layer.keys, layer.values = keys, values
    return first_cache


def prompt_prefill(model, input_ids, mask, positions, share_start: bool = False, buffers=None,
                   logits: list | None = None):
    """A DynamicCache of left-padded prompts, `PREFILL_ROWS` at a time (`prefill_in_chunks`),
    and the mask of its columns (with `logits`, the chunks' last-position logits appended).
    With `share_start`, the tokens every prompt starts with (`common_start`) run once, as one
    row, and every prompt's rest against them: the cache then has those tokens first, each
    row's padding after them (in the mask).

    A task's prompts share their system turn: 26 of the toy prompts' ~67 tokens, 39 % of the
    prompt prefill (32 prompts of the sampling shape: 124-134 ms whole, 79 ms with the start
    run once, docs/SPEED.md). The rest's keys are the same up to float summation order (~2e-6).
    Its forwards run the last layer at the last position only (`last_position_only`: every
    key and value, the last position's output). `buffers`: as `prefill_in_chunks`'."""
    with last_position_only(model):
        return _prompt_prefill(model, input_ids, mask, positions, share_start, buffers, logits)


def _prompt_prefill(model, input_ids, mask, positions, share_start: bool, buffers, logits):
    import torch
    from transformers import DynamicCache

    lead = common_start(input_ids, mask) if share_start else 0
    if lead and not all(type(layer) is DynamicLayer
                        for layer in DynamicCache(config=model.config).layers):
        lead = 0  # sliding-window layers: keep the plain prefill
    if not lead:
        return prefill_in_chunks(model, input_ids, mask, positions, PREFILL_ROWS,
                                 lambda *_: (DynamicCache(config=model.config), {}),
                                 buffers=buffers, logits=logits), mask
    rows, width = input_ids.shape
    lengths = mask.sum(1)
    lead_columns = slice(width - int(lengths[0]), width - int(lengths[0]) + lead)  # row 0's
    common = DynamicCache(config=model.config)
    model(input_ids=input_ids[:1, lead_columns], position_ids=positions[:1, lead_columns],
          past_key_values=common, use_cache=True, logits_to_keep=1)
    rest = int(lengths.max()) - lead
    rest_mask = (torch.arange(rest, device=mask.device) >= rest - (lengths - lead)[:, None])
    rest_mask = rest_mask.to(mask.dtype)

    def chunk_setup(start, end, first):
        shared = [(layer.keys.expand(end - start, -1, -1, -1),
                   layer.values.expand(end - start, -1, -1, -1)) for layer in common.layers]
        return DynamicCache(shared, config=model.config), {}

    cache = prefill_in_chunks(model, input_ids[:, width - rest:], rest_mask,
                              positions[:, width - rest:], PREFILL_ROWS, chunk_setup, lead=lead,
                              buffers=buffers, logits=logits)
    return cache, torch.cat([mask.new_ones((rows, lead)), rest_mask], dim=1)


def common_start(input_ids, mask) -> int:
    """Leading tokens all left-padded rows share, at least `MIN_COMMON_START` (else 0), each
    row keeping one token after them; 0 for one row or a mask that is not left padding."""
    import torch

    rows, width = input_ids.shape
    lengths = mask.sum(1)
    shortest = int(lengths.min()) - 1
    if rows < 2 or shortest < MIN_COMMON_START:
        return 0
    starts = width - lengths
    columns = torch.arange(width, device=mask.device)
    if not bool((mask.bool() == (columns >= starts[:, None])).all()):
        return 0
    leading = input_ids.gather(1, starts[:, None] + columns[:shortest])
    same = (leading == leading[:1]).all(0).long().cumprod(0)
    lead = int(same.sum())
    return lead if lead >= MIN_COMMON_START else 0


def own_prefill_in_chunks(model, input_ids, mask, positions, prefix):
    """Rows' first own tokens into their own cache (returned) through the shared-prefix
    attention, `OWN_PREFILL_ROWS` rows at a time (`prefill_in_chunks`); `prefix` masks their
    padding from then on. In one batch, this prefill took 2.65 s of a 5.1 s budget-forcing
    continuation call (512 rows), the decode 1.6 s; in chunks 0.4 s (docs/SPEED.md)."""
    prefix.mask_own(mask)

    def chunk_setup(start, end, first):
        part = prefix.rows(start, end)
        part.mask_own(mask[start:end, first:])
        return own_tokens_cache(model, part, end - start), {"shared_prefix": part}

    return prefill_in_chunks(model, input_ids, mask, positions, OWN_PREFILL_ROWS, chunk_setup)



def own_tokens_cache(model, prefix, rows: int):
    """An empty per-row cache beside a shared prompt prefix (its layers become
    `hf_decode.PreallocatedLayer`s in the decode, like a prefilled cache's)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache.layers = [_empty_layer(keys, rows) for keys in prefix.keys]
    return cache


def _empty_layer(like, rows: int) -> DynamicLayer:
    layer = DynamicLayer()
    layer.lazy_initialization(like, like)
    layer.keys = like.new_empty((rows, like.shape[1], 0, like.shape[3]))
    layer.values = like.new_empty((rows, like.shape[1], 0, like.shape[3]))
    return layer


