"""A prompt prefill whose last decoder layer works at the last position only.

A prefill needs, from the model's last layer, every position's keys and values (for the cache)
and the last position's output (for the first token's logits), not every position's output:
the layer's query, attention, output projection and MLP at the other positions are thrown
away. On the toy model that is ~21 % of a prompt prefill's linears, ~15 ms of a 32 x 4
sampling call (docs/SPEED.md). `last_position_only` runs the last layer that way for the
forwards in its block: its keys and values exactly as the full layer computes them, the last
position's output in another float order (logits within ~3e-6). transformers' forward has no
option for it (`logits_to_keep` trims only the head), hence the layer's arithmetic here, for
layers of transformers' Llama form (`hf_step.plain_decoder_layers`); any other model runs its
forward unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import sys


@contextlib.contextmanager
def last_position_only(model):
    """Within the block, the model's forward computes its last decoder layer at the last
    position only (its output has one position; every position's keys and values reach the
    cache as usual), where the layers are of Llama form; else the block changes nothing."""
    layer = _last_plain_layer(model)
    if layer is None:
        yield
        return
    layer.forward = functools.partial(_last_position_forward, layer)  # shadows the class's
    try:
        yield
    finally:
        del layer.forward


def _last_plain_layer(model):
    """The last decoder layer, if `_last_position_forward` computes it: Llama form, no hooks,
    not training, an attention that reads a 4D mask or none (sdpa, eager, the engine's own)."""
    from backtrack.engines.hf_prefix import NAME
    from backtrack.engines.hf_step import LLAMA_LAYOUT, plain_decoder_layers

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if (getattr(model.config, "model_type", None) not in LLAMA_LAYOUT or layers is None
            or model.config._attn_implementation not in ("sdpa", "eager", NAME)):
        return None
    last = layers[model.config.num_hidden_layers - 1]
    if model.training or "forward" in vars(last) or not plain_decoder_layers([last]):
        return None
    return last


def _last_position_forward(layer, hidden_states, attention_mask=None, position_embeddings=None,
                           past_key_values=None, **kwargs):
    """transformers' Llama decoder layer (attention and MLP) with queries and outputs at the
    last position only: the same operations as its forward, its keys and values bit for bit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[type(layer).__module__]  # its rotate_half and eager attention
    attention, rows = layer.self_attn, hidden_states.shape[0]
    states = layer.input_layernorm(hidden_states)
    shape = (*states.shape[:-1], -1, attention.head_dim)
    key = attention.k_proj(states).view(shape).transpose(1, 2)
    value = attention.v_proj(states).view(shape).transpose(1, 2)
    query = attention.q_proj(states[:, -1:]).view(rows, 1, -1, attention.head_dim).transpose(1, 2)
    cos, sin = (part.unsqueeze(1) for part in position_embeddings)  # apply_rotary_pos_emb's
    key = key * cos + modeling.rotate_half(key) * sin
    query = query * cos[:, :, -1:] + modeling.rotate_half(query) * sin[:, :, -1:]
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, attention.layer_idx)
    if attention_mask is not None and attention_mask.dim() == 4:  # [rows, 1, queries, keys]
        attention_mask = attention_mask[:, :, -1:]
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation,
                                                      modeling.eager_attention_forward)
    out, _ = interface(attention, query, key, value, attention_mask, dropout=0.0,
                       scaling=attention.scaling, **kwargs)
    hidden = hidden_states[:, -1:] + attention.o_proj(out.reshape(rows, 1, -1).contiguous())
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
