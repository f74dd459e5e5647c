"""A decode loop that drops finished rows: the hf engine's `decode: compact` option.

transformers' `generate` steps every row of a batch until the batch's longest row ends. On the
toy model a typical row ends after ~30 of 160 tokens while one looping row runs to the limit,
so most decode compute goes to rows that are done (`occupancy` in benchmarks/sampling.py).
This loop removes finished rows from the batch and from the KV cache as it goes
(`batch_select_indices`); no transformers API does that for a static batch (its continuous
batching, `generate_batch`, was 10x slower on CPU here), which is why it is written by hand.
It calls the model's own forward, so any causal LM with a DynamicCache works. The cache's
layers are swapped for `PreallocatedLayer`s sized for the whole generation: a DynamicLayer
copies its whole cache at every step (`torch.cat`), 56 % of the decode time on the toy model.

Sampling is generate's (temperature, then top-p over the sorted distribution, the pad token
suppressed; on CPU drawn by inverse transform sampling), from a generator seeded by the
caller: the same seed and batch give the same tokens, but not the tokens `generate` would
draw (it consumes the global RNG differently).
"""

from __future__ import annotations

import math

from transformers.cache_utils import DynamicLayer


class DecodeBuffers:
    """Key/value cache memory kept from one engine call to the next (`keep`, on CPU).

    A fresh tensor of tens of MB is new memory from the OS on every call (glibc maps
    allocations over 32 MB freshly), so each decode step's cache write faults in new pages and
    the attention reads of the new pages are slow too: 36 steps' cache writes at 512 rows of
    the toy model took 11-69 ms into fresh memory against 2 ms into kept memory
    (docs/SPEED.md). CUDA's caching allocator already reuses memory, so there `keep` is off.
    Contents are garbage until written, like `new_empty`'s."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._storage: dict = {}

    def take(self, name, shape: tuple[int, ...], like):
        """An uninitialised tensor of `shape` (dtype and device of `like`) for `name`, in the
        memory `name` had before when it is large enough."""
        numel = math.prod(shape)
        storage = self._storage.get(name)
        if (storage is None or storage.numel() < numel or storage.dtype != like.dtype
                or storage.device != like.device):
            storage = like.new_empty(numel)
            if self.keep:
                self._storage[name] = storage
        return storage[:numel].view(shape)

    def clear(self) -> None:
        self._storage.clear()


def hold_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (this process; True if it took the settings).

    By default glibc gives the top of its heap back to the OS once more than ~2x its mmap
    threshold is free, and maps some blocks freshly: a call's MB-sized intermediates (the
    prefill's [16 x 54 x 432] activations) then fault in new zeroed pages each time, 4-8 k
    page faults a call at 32 prompts x 4 on the toy model. Keeping up to 256 MB free in the
    heap and serving blocks under 32 MB from it: 0 faults, the prefill 62-66 ms against 73-76
    and a call 374-390 against 395-410 ms (3 alternating process pairs, docs/SPEED.md). torch has no
    CPU caching allocator to ask instead (PyTorch's CPU tuning guide suggests preloading
    jemalloc or tcmalloc for the same reason). No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    kept = bool(mallopt(m_trim_threshold, 256 << 20))
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and kept


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for more tokens:
    `update` writes in place and returns views of the filled part, so most steps copy nothing.
    Keeps the layer's existing content (the prefill).

    With `slack` None the buffer has room for `capacity` tokens (the whole generation). With
    `slack` s it has room for s tokens past the filled part, and a step that overflows it moves
    the cache into a buffer with s free slots again (two kept buffers, used in turn): each
    (row, head)'s keys then sit at most s slots apart from the next one's. On a CPU that gap
    decides the attention's speed: the own-token matmuls over a [128 x 4 x 30 x 40] cache read
    at most 2 slots apart took 258-298 us, 3 or more slots apart 670-790 us out of cache
    (`benchmarks/cache_gaps.py`, docs/SPEED.md). Moving costs a copy of the filled part every s + 1
    steps."""

    def __init__(self, layer: DynamicLayer, capacity: int, buffers: DecodeBuffers | None = None,
                 index: int = 0, slack: int | None = None):
        super().__init__()
        keys, values = layer.keys, layer.values
        rows, heads, length, dim = keys.shape
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._buffers = buffers or DecodeBuffers(keep=False)
        self._index, self._slack, self._side = index, slack, 0
        room = max(capacity, length) if slack is None else length + slack
        self._keys, self._values = self._take(rows, room, keys)
        self._keys[:, :, :length], self._values[:, :, :length] = keys, values
        self.length = length
        self._views()

    def _take(self, rows: int, room: int, like):
        shape = (rows, like.shape[1], room, like.shape[3])
        return tuple(self._buffers.take((self._index, part, self._side), shape, like)
                     for part in ("keys", "values"))

    def _views(self) -> None:
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            if self._slack is None:
                raise ValueError(f"PreallocatedLayer: {end} tokens exceed its capacity "
                                 f"{self._keys.shape[2]}")
            self._move(end + self._slack)
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _move(self, room: int) -> None:
        """The filled part into the other kept buffer, with room for `room` tokens."""
        self._side ^= 1
        keys, values = self._take(self._keys.shape[0], room, self._keys)
        keys[:, :, :self.length], values[:, :, :self.length] = self.keys, self.values
        self._keys, self._values = keys, values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices) -> None:
        """Keep rows `indices` (ascending): moved to the front of the same buffers, copying
        only their filled part."""
        kept = len(indices)
        for buffer in (self._keys, self._values):
            buffer[:kept, :, :self.length] = buffer[indices, :, :self.length]
        self._keys, self._values = self._keys[:kept], self._values[:kept]
        self._views()


def sample_tokens(logits, temperature: float, top_p: float, generator, suppress: list[int]):
    """Next token per row from last-position logits [rows, vocab] (generate's warpers)."""
    import torch

    logits = logits.float()
    if suppress:
        logits[:, suppress] = float("-inf")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.div_(temperature)  # the step's own logits: no copy needed
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    if probs.device.type == "cpu":
        return CPU_DRAW(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def inverse_cdf_draw(probs, generator):
    """One token per row of `probs` [rows, vocab] on CPU, by inverse transform sampling: a
    float64 uniform per row, scaled to the row's total, looked up in its float64 running sums.

    torch.multinomial draws one sample as argmax(probs / q) over one Exp(1) draw q per
    vocabulary entry; on CPU those random numbers were most of a draw (a toy step's [128 x
    501]: ~0.55 of 0.8 ms, docs/SPEED.md), and one uniform per row needs none of them. Each token
    comes with its probability up to float64 rounding, as multinomial's; the tokens for a seed
    are others (`multinomial_one_cpu` gives multinomial's). A zero-probability token (a
    suppressed one, or past top-p) is never drawn: its running sum equals the one before it,
    and the lookup takes the first sum above the target, which is below the total (a uniform
    is at most 1 - 2^-53, and x * (1 - 2^-53) rounds below x for any positive double x)."""
    import torch

    sums = probs.cumsum(-1, dtype=torch.float64)
    uniform = torch.rand((len(sums), 1), dtype=torch.float64, generator=generator)
    return torch.searchsorted(sums, uniform * sums[:, -1:], right=True).squeeze(1)


def multinomial_one_cpu(probs, generator):
    """`torch.multinomial(probs, 1, generator=generator).squeeze(1)` on CPU, draw for draw.

    torch draws one sample as argmax(probs / q), q ~ Exp(1) from `exponential_`, whose CPU
    kernel is a scalar loop: 1.1 ms of a 9 ms decode step at batch 128 on the toy model. The
    same q is -log1p(-u) for u = the float64 uniforms `torch.rand` draws from the same
    generator, in vectorized kernels (2.8x faster here). Same tokens and generator state
    after, for any shape (tests/test_engines_speed.py checks both). The CPU draw before
    `inverse_cdf_draw` (benchmarks/sampling.py's former levers use it)."""
    import torch

    uniform = torch.rand(probs.shape, dtype=torch.float64, generator=generator)
    exponential = uniform.neg_().log1p_().neg_().to(probs.dtype)  # in place: the same floats
    return (probs / exponential).argmax(-1)


# The CPU sampler's draw from the probabilities (CUDA keeps torch.multinomial)
CPU_DRAW = inverse_cdf_draw


# `compact_decode` drops finished rows once 1 / DEAD_SHARE of its batch has finished.
DEAD_SHARE = 8

# Free slots past a row's cached tokens on CPU (`PreallocatedLayer`'s `slack`; on CUDA and with
# a compiled step the buffer holds the whole generation). None: the whole generation always.
CACHE_SLACK = 2


def _decode_layer(layer, capacity: int, buffers, index: int, slack, kernels, dtype=None):
    """The decode's cache layer: token-major for the C++ kernel (`cpu_attention`; its keys
    and values in `dtype`, None: the layer's), else `PreallocatedLayer`."""
    if kernels is None:
        return PreallocatedLayer(layer, capacity, buffers, index, slack)
    from backtrack.engines.cpu_attention import TokenMajorLayer

    return TokenMajorLayer(layer, capacity, buffers or DecodeBuffers(keep=False), index,
                           kernels, dtype)


def compact_decode(model, input_ids, mask, cache, max_new_tokens: int, eos_ids: list[int],
                   temperature: float, top_p: float, suppress: list[int], seed: int,
                   prefix=None, buffers: DecodeBuffers | None = None,
                   step=None, positions=None, first_logits=None) -> list[list[int]]:
    """New token ids per row (the ending EOS included) for left-padded `input_ids`.

    `cache` is a DynamicCache holding every prompt token but the last (as the engine's shared
    prefill leaves it), or None to prefill here. With `prefix` (`hf_prefix.SharedPrefix`) the
    prompts' tokens but the last are held there once per prompt instead, `cache` is None, and
    the model must run `hf_prefix`'s attention. Rows leave the batch when they emit an EOS id
    or reach `max_new_tokens`. `buffers` holds the cache memory (kept between calls). `step`
    replaces `hf_step.shared_prefix_step(model)` as the decode step with `prefix`
    (`hf_step.compiled_step`).
    With `positions` (their position ids), `prefix` holds only the rows' leading tokens and
    `input_ids` / `mask` are the rest, left-padded: all but the last run into the rows' own
    cache first (`hf_prefix.prefix_groups`). With `first_logits` ([rows, vocab], the logits
    of each row's last prompt token, which `prefix` then holds too) the first token is drawn
    from them, without a decode step (a prefill computes them anyway)."""
    import torch

    from backtrack.engines.hf_step import shared_prefix_step

    own_prefill = positions is not None and input_ids.shape[1] > 1
    if positions is None:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache, mask = _starting_cache(model, input_ids, mask, positions, cache, prefix, own_prefill)
    # a compiled `step` keeps one buffer: each move to the other would change the cache's
    # strides, and torch.compile would compile the step again
    slack = CACHE_SLACK if input_ids.device.type == "cpu" and step is None else None
    _to_decode_layers(cache, max_new_tokens, buffers, slack, prefix)
    forward = ((step or shared_prefix_step(model, kernels=getattr(prefix, "kernels", None)))
               if prefix is not None else None)
    extra = {} if prefix is None else {"shared_prefix": prefix}
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    eos = torch.tensor(eos_ids, device=input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # original row of each
    done = torch.zeros_like(rows, dtype=torch.bool)  # rows that ended but are still stepped
    current, position = input_ids[:, -1:], positions[:, -1:]
    for drawn in range(max_new_tokens):
        if drawn == 0 and first_logits is not None:
            logits = first_logits
        elif forward is not None:
            logits = forward(current, position, cache, prefix)
        else:
            logits = model(input_ids=current, attention_mask=mask, position_ids=position,
                           past_key_values=cache, use_cache=True, **extra).logits[:, -1, :]
        chosen = sample_tokens(logits, temperature, top_p, generator, suppress)
        for row, token, ended in zip(rows.tolist(), chosen.tolist(), done.tolist()):
            if not ended:
                tokens[row].append(token)
        done = done | torch.isin(chosen, eos)
        if drawn + 1 == max_new_tokens or bool(done.all()):
            break
        if forward is None:  # the model's forward reads the 2D mask; the lean step does not
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        current, position = chosen[:, None], position + 1
        # Dropping rows copies the cache's filled part; stepping a dead row costs its share of
        # one step: compact once a `DEAD_SHARE` of the batch is dead.
        if int(done.sum()) * DEAD_SHARE >= len(rows):
            rows, mask, current, position, done = _drop_rows(
                ~done, cache, prefix, rows, mask, current, position, done)
    return tokens


def _drop_rows(alive, cache, prefix, *per_row):
    """Only the `alive` rows of the decode's cache, `prefix` and each of `per_row`."""
    keep = alive.nonzero().squeeze(1)
    cache.batch_select_indices(keep)
    if prefix is not None:
        prefix.keep(keep)
    return [tensor[keep] for tensor in per_row]


def _starting_cache(model, input_ids, mask, positions, cache, prefix, own_prefill: bool):
    """`compact_decode`'s cache before its first step, and the 2D mask its model forward reads:
    with `prefix`, the rows' own cache (their leading tokens prefilled when `own_prefill`) and a
    mask of ones (padding is in `prefix`'s own_bias); else `cache`, the prompts prefilled here
    when it is None."""
    from transformers import DynamicCache

    from backtrack.engines.hf_prefill import (own_prefill_in_chunks, own_tokens_cache,
                                              prompt_prefill)

    if prefix is not None:
        if own_prefill:
            cache = own_prefill_in_chunks(model, input_ids[:, :-1], mask[:, :-1],
                                          positions[:, :-1], prefix)
        else:
            cache = own_tokens_cache(model, prefix, input_ids.shape[0])
        # the model's forward reads a 2D mask as long as the own cache + 1
        return cache, mask.new_ones((input_ids.shape[0], input_ids.shape[1] if own_prefill else 1))
    if cache is None and input_ids.shape[1] > 1:
        cache, _ = prompt_prefill(model, input_ids[:, :-1], mask[:, :-1], positions[:, :-1])
    elif cache is None:
        cache = DynamicCache(config=model.config)
    return cache, mask


def _to_decode_layers(cache, max_new_tokens: int, buffers, slack, prefix) -> None:
    """`cache`'s filled layers as the decode's (`_decode_layer`), sized for `max_new_tokens`
    more; with `prefix`, its prompt keys and values stored as the decode reads them."""
    if prefix is not None:
        prefix.store_for_decode()
    cache.layers = [_decode_layer(layer, layer.get_seq_length() + max_new_tokens + 1, buffers,
                                  index, slack, getattr(prefix, "kernels", None),
                                  getattr(prefix, "kv_dtype", None))
                    if layer.is_initialized else layer for index, layer in enumerate(cache.layers)]
