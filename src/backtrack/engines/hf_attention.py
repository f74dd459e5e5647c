"""Attention that reads only the filled part of a static KV cache, registered with transformers.

A static cache is allocated for the longest possible output (prompt width + max_new_tokens) and
transformers' eager and sdpa attention read all of it on every decode step, masking the unfilled
slots. On a CPU this read is the largest cost of decoding a small model (the cache is tens of MB
per layer at batch 128, the weights a few MB). The mask function below builds the 4D mask for
the filled slots only (the length of the 2D attention mask, which grows by one column per step,
or the cache's query offset + 1) and the attention function slices keys and values to the
mask's length (a view, no copy). Masked slots contribute exp(-inf) = 0 either way, so the
outputs equal the full read up to float summation order. Transformers has no such option; its
`AttentionInterface` / `AttentionMaskInterface` registries are the public way to add one.
"""

from __future__ import annotations

import sys

BASES = ("eager", "sdpa")


def filled_attention(base: str) -> str:
    """Register (once) the filled-cache variant of attention `base`; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"backtrack_filled_{base}"
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, _filled_mask(ALL_MASK_ATTENTION_FUNCTIONS[base]))
        AttentionInterface.register(name, _filled_attention(base))
    return name


def _filled_mask(base_mask):
    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
             **kwargs):
        if kv_offset == 0:
            kv_length = min(kv_length, _filled_length(q_length, q_offset, attention_mask))
        return base_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask,
                         **kwargs)
    return mask


def _filled_length(q_length: int, q_offset, attention_mask) -> int:
    """Cache slots filled after this step: the 2D mask's length, or (when `generate` dropped an
    all-ones mask) the tokens seen before plus this step's (a host read of a 0-d tensor)."""
    if attention_mask is not None and attention_mask.ndim == 2:
        return attention_mask.shape[-1]
    return int(q_offset) + q_length


def _filled_attention(base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.shape[-1] < key.shape[2]:
            filled = attention_mask.shape[-1]
            key, value = key[:, :, :filled], value[:, :, :filled]
        if base == "eager":  # each model file defines its own eager attention
            forward = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        else:
            forward = ALL_ATTENTION_FUNCTIONS[base]
        return forward(module, query, key, value, attention_mask, **kwargs)
    return attention
