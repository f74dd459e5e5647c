"""Shared-prefix attention for `decode: compact`: a prompt's keys and values held once for its
n samples (the hf engine's `shared_prefix` option).

With n samples per prompt the KV cache holds every prompt n times, and each decode step reads
all of it: on a CPU that read, not the matmuls, is most of a small model's attention time
(eval decodes 16 samples of each 50-token prompt, so ~60 % of the cache is prompt copies).
Here the prompt part stays one copy per prompt ([prompts, kv heads, prompt length, dim]) and
each row's own tokens go in the usual per-row cache. A decode step scores a row's query against
its prompt's keys (the n queries of one prompt in one matmul) and against its own keys, takes
one softmax over both, and adds the two weighted sums: the same attention, summed in another
order. This is cascade attention (FlashInfer, vLLM); transformers has no such attention for a
batch, so it is registered through its `AttentionInterface` and fed through the model's forward
kwargs (`shared_prefix=`), which transformers passes on to the attention function.

The same holds for n = 1 prompts that share leading tokens (`prefix_groups`, the engine's
`group_prefixes`): a problem's continuations share its prompt. Then a group's shared part is
the prefix, and each row's rest is prefilled into its own cache through this attention too
(several queries per row: causal among them, padding masked by `own_bias`).
"""

from __future__ import annotations

NAME = "backtrack_shared_prefix"


class SharedPrefix:
    """The prompts' cached keys and values (all prompt tokens but the last, as the engine's
    shared prefill leaves them), their padding as an additive mask, and which prompt (`group`)
    and which of its n samples (`slot`) each decoded row is."""

    def __init__(self, prefill_cache, prompt_mask, n: int, dtype, group=None, kernels=None,
                 kv_dtype=None):
        import torch

        self.keys = [layer.keys for layer in prefill_cache.layers]
        self.values = [layer.values for layer in prefill_cache.layers]
        prompts = prompt_mask.shape[0]
        self.bias = _padding_bias(prompt_mask, dtype)[:, None, None, :]  # [P, 1, 1, length]
        self.padding = _padding_run(prompt_mask)  # [P, 2]: the kernel skips these columns
        self.own_bias = None  # [rows, 1, 1, T] over a row's first own tokens (`mask_own`)
        self.kernels = kernels  # `cpu_attention.load_kernels()`: decode steps use its attention
        # the decode's keys and values in this dtype (`store_for_decode`; the kernel's float16)
        self.kv_dtype = kv_dtype if kernels is not None else None
        self._scores_bias = None  # (shape key, bias): one step's own-token mask, all layers
        if group is None:  # n rows per prompt, in prompt order
            rows = torch.arange(prompts * n, device=prompt_mask.device)
            self.n, self.group, self.slot = n, rows // n, rows % n
        else:  # rows of one prompt are adjacent, any number of them
            self.group = group
            starts = torch.searchsorted(group, group)  # each row's prompt's first row
            self.slot = torch.arange(len(group), device=group.device) - starts
            self.n = int(self.slot.max()) + 1
        self._index_rows()

    def _index_rows(self) -> None:
        """Each prompt's first row (`starts`, one more for the end: the rows of a prompt are
        adjacent), and whether the rows are every prompt's n slots in order (the batch before a
        row ends): then grouping rows by prompt is a reshape, not a scatter and a gather."""
        import torch

        rows = len(self.group)
        self.starts = torch.searchsorted(
            self.group, torch.arange(len(self.bias) + 1, device=self.group.device))
        self.full = rows == len(self.bias) * self.n and bool(
            (self.slot == torch.arange(rows, device=self.slot.device) % self.n).all())

    def store_for_decode(self) -> None:
        """The prompts' keys and values as the decode steps' kernel reads them (the prefill
        and the rows' own prefill computed them): in `kv_dtype`, the keys dim-major
        (`cpu_attention.dim_major`: the same tensors, another memory layout)."""
        if self.kernels is None:
            return
        from backtrack.engines.cpu_attention import dim_major

        self.keys = [dim_major(keys, self.kernels.key_block, self.kv_dtype) for keys in self.keys]
        if self.kv_dtype is not None:
            self.values = [values.to(self.kv_dtype) for values in self.values]

    def mask_own(self, own_mask) -> None:
        """Rows' first own tokens include padding (0 in `own_mask` [rows, T]): attention skips
        it at every later step."""
        self.own_bias = _padding_bias(own_mask, self.bias.dtype)[:, None, None, :]
        self._scores_bias = None

    def rows(self, start: int, end: int) -> "SharedPrefix":
        """The same prefix for rows [start, end) alone: their prompts' keys, values and
        padding, their groups and slots, their own-token padding."""
        import copy

        part = copy.copy(self)
        first, last = int(self.group[start]), int(self.group[end - 1]) + 1
        part.keys = [k[first:last] for k in self.keys]
        part.values = [v[first:last] for v in self.values]
        part.bias, part.group = self.bias[first:last], self.group[start:end] - first
        part.padding = self.padding[first:last]
        part.slot = self.slot[start:end].clone()
        part.slot[part.group == 0] -= int(part.slot[0])  # a group cut at `start`: slots from 0
        part.n = int(part.slot.max()) + 1
        part.own_bias = None if self.own_bias is None else self.own_bias[start:end]
        part._scores_bias = None
        part._index_rows()
        return part

    def own_scores_bias(self, length: int, per_kv_head: int, scores):
        """`_own_bias` for this step's own-token scores, built by the first layer and reused
        by the others (the same rows, queries and cache length)."""
        key = (scores.shape, length)
        if self._scores_bias is None or self._scores_bias[0] != key:
            self._scores_bias = key, _own_bias(self.own_bias, length, per_kv_head, scores)
        return self._scores_bias[1]

    def keep(self, indices) -> None:
        """Keep rows `indices` (ascending); prompts left without a row are dropped too (the
        kernel skips them instead: their keys and values need not move)."""
        import torch

        group = self.group[indices]
        alive = torch.unique(group) if self.kernels is None else None  # sorted
        if alive is not None and len(alive) < len(self.bias):
            self.keys = [k[alive] for k in self.keys]
            self.values = [v[alive] for v in self.values]
            self.bias, self.padding = self.bias[alive], self.padding[alive]
            group = torch.searchsorted(alive, group)
        self.group, self.slot = group, self.slot[indices]
        if self.own_bias is not None:
            self.own_bias = self.own_bias[indices]
            self._scores_bias = None
        self._index_rows()

    def _grouped(self, per_row):
        """[rows, ...] -> [prompts, n, ...] (rows in their prompt's slots; empty slots 0)."""
        if self.full:
            return per_row.reshape(len(self.bias), self.n, *per_row.shape[1:])
        out = per_row.new_zeros((len(self.bias), self.n, *per_row.shape[1:]))
        out[self.group, self.slot] = per_row
        return out

    def _per_row(self, grouped):
        """[prompts, n, ...] -> [rows, ...] (`_grouped`'s inverse)."""
        if self.full:
            return grouped.reshape(len(self.group), *grouped.shape[2:])
        return grouped[self.group, self.slot]


def _padding_bias(mask, dtype):
    """0 where `mask` is 1, the dtype's lowest value where it is 0 (an additive mask)."""
    import torch

    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(mask == 0, torch.finfo(dtype).min)


def _padding_run(mask):
    """[from, to) per row of `mask`: its padding columns when they are one run (left padding,
    or after a common start), else [0, 0)."""
    import torch

    zeros = mask == 0
    first, count = zeros.long().argmax(1), zeros.sum(1)
    columns = torch.arange(mask.shape[1], device=mask.device)
    run = (columns >= first[:, None]) & (columns < (first + count)[:, None])
    one_run = (run == zeros).all(1)
    return torch.stack([first, first + count], 1) * one_run[:, None]


def prefix_groups(rows: list[list[int]]) -> list[tuple[int, int, int]]:
    """(first row, end row, shared length) per group of adjacent `rows` (token ids, sorted)
    whose leading tokens are held once: a row joins the group before it when that saves
    prefill tokens (its shared tokens outnumber those the group's rows would lose from the
    shorter shared part). Every row keeps at least its last token out of the shared part."""
    groups: list[tuple[int, int, int]] = []
    for index, ids in enumerate(rows):
        if groups:
            first, end, shared = groups[-1]
            common = min(_common_length(rows[first], ids), shared, len(ids) - 1)
            if common > (end - first) * (shared - common):
                groups[-1] = (first, index + 1, common)
                continue
        groups.append((index, index + 1, len(ids) - 1))
    return groups


def _common_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def register() -> str:
    """Register (once) the attention and its mask function with transformers; return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        AttentionInterface.register(NAME, shared_prefix_attention)
    return NAME


def shared_prefix_attention(module, query, key, value, attention_mask, scaling: float,
                            dropout: float = 0.0, shared_prefix: SharedPrefix | None = None,
                            **kwargs):
    """Attention of one decode step over the row's prompt (shared) and its own tokens (`key`,
    `value`: the per-row cache). Without `shared_prefix` (a prefill) it is sdpa."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if shared_prefix is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               scaling=scaling, dropout=dropout, **kwargs)
    prefix, layer = shared_prefix, module.layer_idx
    rows, heads, length, dim = query.shape
    if prefix.kernels is not None and length == 1:
        from backtrack.engines.cpu_attention import cascade_attention

        return cascade_attention(prefix.kernels, query, key, value, prefix, layer, scaling), None
    kv_heads = key.shape[1]
    q = query.reshape(rows, kv_heads, heads // kv_heads * length, dim)  # per kv head: (g, Q)
    # scores against the prompt: the n queries of a prompt against its keys in one matmul
    grouped = prefix._grouped(q).permute(0, 2, 1, 3, 4)  # [P, kv, n, g, dim]
    grouped = grouped.reshape(len(prefix.bias), kv_heads, -1, dim)
    on_prompt = torch.matmul(grouped, prefix.keys[layer].transpose(2, 3)) * scaling
    on_prompt = on_prompt + prefix.bias  # [P, kv, n * g, Tp]
    on_prompt = on_prompt.reshape(len(prefix.bias), kv_heads, prefix.n, -1, on_prompt.shape[-1])
    on_prompt = prefix._per_row(on_prompt.permute(0, 2, 1, 3, 4))  # [rows, kv, g, Tp]
    on_own = torch.matmul(q, key.transpose(2, 3)) * scaling  # [rows, kv, g * Q, T own]
    if prefix.own_bias is not None or length > 1:
        on_own = on_own + prefix.own_scores_bias(length, heads // kv_heads, on_own)
    weights = torch.cat([on_prompt, on_own], dim=-1).softmax(-1, dtype=torch.float32)
    weights = weights.to(query.dtype)
    w_prompt, w_own = weights.split([on_prompt.shape[-1], on_own.shape[-1]], dim=-1)
    grouped_w = prefix._grouped(w_prompt).permute(0, 2, 1, 3, 4)
    grouped_w = grouped_w.reshape(len(prefix.bias), kv_heads, -1, w_prompt.shape[-1])
    from_prompt = torch.matmul(grouped_w, prefix.values[layer])  # [P, kv, n * g, dim]
    from_prompt = from_prompt.reshape(len(prefix.bias), kv_heads, prefix.n, -1, dim)
    from_prompt = prefix._per_row(from_prompt.permute(0, 2, 1, 3, 4))
    out = from_prompt + torch.matmul(w_own, value)  # [rows, kv, g * Q, dim]
    if length == 1:
        return out.reshape(rows, 1, heads, dim), None
    return out.reshape(rows, heads, length, dim).transpose(1, 2), None


def _own_bias(own_bias, length: int, per_kv_head: int, scores):
    """Additive mask over a row's own tokens for `length` new queries per head (`scores`:
    [rows, kv, g * Q, T own]): causal among the new ones, and `own_bias`'s padding over the
    first ones. Finite everywhere: a padding query that sees nothing gets uniform weights, not
    NaNs that would reach the real rows through its keys and values."""
    import torch

    own_length, lowest = scores.shape[-1], torch.finfo(scores.dtype).min
    bias = scores.new_zeros((length, own_length))
    if length > 1:
        future = torch.ones((length, length), dtype=torch.bool, device=scores.device).triu(1)
        bias[:, own_length - length:].masked_fill_(future, lowest)
    bias = bias.repeat(per_kv_head, 1)[None, None]  # [1, 1, g * Q, T own]
    if own_bias is not None:
        padded = own_bias.shape[-1]
        bias = bias.expand(own_bias.shape[0], 1, -1, -1).clone()
        bias[..., :padded] = (bias[..., :padded] + own_bias).clamp_(min=lowest)
    return bias
