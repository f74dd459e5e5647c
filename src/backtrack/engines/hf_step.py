"""The decode step of the hf engine's `decode: compact` with `shared_prefix`: one step's
last-position logits through the model's own modules, without the forward's per-step extras.

The model's forward adds per step: building a 4D mask, which the shared-prefix attention does
not read at decode (its rows' own tokens are never padding), and transformers' output
bookkeeping (`check_model_inputs`, output capture). Its decoder layers add more: each layer and
attention module's call, keyword plumbing and decorators, the attention function's lookup, and
rotary embedding by slices and a concatenation. On the toy model (4 layers of 160 wide, a step
of ~8 ms at 128 rows) that glue is most of what is neither a matmul nor the attention. So for
decoder layers of transformers' Llama form (`plain_decoder_layers`: plain nn.Linear
projections, RMSNorms, a SiLU MLP, no hooks) the step runs the layer's arithmetic here on the
modules' weights (`PlainLayer`): the same operations in the same order, the same logits bit for
bit (tests/test_engines_speed.py), ~22 ms sooner per 32 x 4 sampling call (6 %, docs/SPEED.md); with
`cpu_kernel` the rotary and the cache write are one C++ call (`TokenMajorLayer.append_rotated`).
Any other layer (LoRA or quantized linears, a Qwen3 attention's q_norm, hooks) is called whole.
No transformers API runs a decoder stack without this glue.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from backtrack.engines.cpu_attention import TokenMajorLayer
from backtrack.engines.hf_prefix import shared_prefix_attention

# With `cpu_kernel`, the step's linears by the packed kernel (`cpu_linear`); False gives
# F.linear's (benchmarks/sampling.py's former lever)
PACKED_LINEARS = True

# Model types whose forward is embed -> rotary -> layers(hidden, mask, position embeddings, cache)
# -> norm -> lm_head, with nothing else per step (transformers' modeling_llama and its copies).
LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")

# Decoder layers this step runs itself: transformers' Llama form (pre-norm attention and a SiLU
# gated MLP, plain nn.Linear projections). A Qwen3 layer's attention also has q_norm / k_norm, a
# LoRA or quantized linear is another class: such layers are called whole.
PLAIN_CLASSES = {prefix + part for prefix in ("Llama", "Mistral", "Qwen2")
                 for part in ("DecoderLayer", "Attention", "MLP", "RMSNorm")}


def plain_decoder_layers(layers) -> bool:
    """Whether `PlainLayer` computes every layer exactly: each is of `PLAIN_CLASSES` with
    plain linears and a SiLU, and no hooks on it or its parts (calling it whole runs them)."""
    for layer in layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            return False
        parts = [layer, attention, mlp, layer.input_layernorm, layer.post_attention_layernorm]
        linears = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj",
                                                               "o_proj")]
        linears += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if (any(type(part).__name__ not in PLAIN_CLASSES for part in parts)
                or any(type(linear) is not torch.nn.Linear for linear in linears)
                or type(mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU")
                or set(dict(attention.named_children())) != {"q_proj", "k_proj", "v_proj",
                                                             "o_proj"}
                or any(module._forward_hooks or module._forward_pre_hooks
                       for module in parts + linears)):
            return False
    return True


def shared_prefix_step(model, plain: bool = True, kernels=None):
    """One decode step's last-position logits (`step(input_ids, position_ids, cache, prefix)`)
    through the model's own modules, or None when the model's forward is not the Llama layout.
    `plain=False` calls every decoder layer whole (for torch.compile, `compiled_step`); with
    `kernels` (`cpu_attention.load_kernels()`), plain layers' linears run packed
    (`cpu_linear`) where `PACKED_LINEARS`."""
    inner = getattr(model, "model", None)
    if (getattr(model.config, "model_type", None) not in LLAMA_LAYOUT or inner is None
            or not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers",
                                                         "norm"))):
        return None
    layers = inner.layers[:model.config.num_hidden_layers]
    packed = kernels if PACKED_LINEARS and hasattr(kernels, "packed_linear") else None
    plain = ([PlainLayer(layer, index, packed) for index, layer in enumerate(layers)]
             if plain and plain_decoder_layers(layers) else None)

    def step(input_ids, position_ids, cache, prefix):
        hidden = inner.embed_tokens(input_ids)
        position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
        if plain:
            rotary = Rotary(*position_embeddings)
            for layer in plain:
                hidden = layer.forward(hidden, rotary, cache, prefix)
        else:
            for layer in layers:
                hidden = layer(hidden, attention_mask=None,
                               position_embeddings=position_embeddings, position_ids=position_ids,
                               past_key_values=cache, use_cache=True, shared_prefix=prefix)
        return model.lm_head(inner.norm(hidden[:, -1, :]))
    return step


class Rotary:
    """transformers' `apply_rotary_pos_emb` for [rows, heads, 1, dim] states, in 3 operations
    instead of 6: rotate_half(x) * sin is x rolled by half the dims times sin with its first
    half negated ((-a) * b is a * (-b) exactly), so the same floats. `cos` and `sin` stay as
    the model's rotary embedding gives them ([rows, 1, dim]) for the kernel's own rotary."""

    def __init__(self, cos, sin):
        self.cos, self.sin = cos, sin
        self._broadcast = None  # (cos, signed sin, half) for [rows, heads, 1, dim] states

    def __call__(self, states):
        if self._broadcast is None:
            half = self.cos.shape[-1] // 2
            signed = torch.cat([-self.sin[..., :half], self.sin[..., half:]], dim=-1)
            self._broadcast = self.cos.unsqueeze(1), signed.unsqueeze(1), half
        cos, sin, half = self._broadcast
        return states * cos + states.roll(half, -1) * sin


class PlainLayer:
    """A Llama-form decoder layer (`plain_decoder_layers`) for one decode step: transformers'
    decoder layer, attention and MLP forward for one new token per row, the attention being the
    shared-prefix one (`hf_prefix`, `cpu_attention`). The same operations in the same order;
    the parameters are read once per decode call, as a module lookup (~0.6 us) costs as much
    as a small operation here. With `kernels`, the linears are `cpu_linear.PackedLinear`s."""

    def __init__(self, layer, index: int, kernels=None):
        attention, mlp = layer.self_attn, layer.mlp
        self.index, self.attention = index, attention
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.norms = [(norm.weight, norm.variance_epsilon)
                      for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        self.q, self.k, self.v, self.o, self.gate, self.up, self.down = (
            _step_linear(linear, kernels) for linear in (
                attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                mlp.gate_proj, mlp.up_proj, mlp.down_proj))

    def forward(self, hidden, rotary: Rotary, cache, prefix):
        rows = hidden.shape[0]
        states = _rms_norm(hidden, *self.norms[0])
        query, key, value = self.q(states), self.k(states), self.v(states)
        own = cache.layers[self.index]
        if isinstance(own, TokenMajorLayer):  # the kernel's cache: rotary and write in C++
            query, key, value = own.append_rotated(query, key, value, rotary.cos, rotary.sin)
        else:
            shape = (rows, 1, -1, self.head_dim)
            query = rotary(query.view(shape).transpose(1, 2))
            key = rotary(key.view(shape).transpose(1, 2))
            key, value = cache.update(key, value.view(shape).transpose(1, 2), self.index)
        out, _ = shared_prefix_attention(self.attention, query, key, value, None,
                                         scaling=self.scaling, shared_prefix=prefix)
        hidden = hidden + self.o(out.reshape(rows, 1, -1))
        states = _rms_norm(hidden, *self.norms[1])
        gated = F.silu(self.gate(states)) * self.up(states)
        return hidden + self.down(gated)


def _step_linear(linear, kernels):
    """`linear`'s product for the step: packed (`cpu_linear`) with `kernels`, else F.linear."""
    from backtrack.engines import cpu_linear

    if kernels is not None and cpu_linear.supports(linear.weight):
        return cpu_linear.PackedLinear(kernels, linear.weight, linear.bias)
    return functools.partial(F.linear, weight=linear.weight, bias=linear.bias)


def _rms_norm(hidden, weight, epsilon: float):
    """LlamaRMSNorm's forward (in float32, back to the input's dtype)."""
    dtype = hidden.dtype
    states = hidden if dtype == torch.float32 else hidden.to(torch.float32)
    states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + epsilon)
    return weight * (states if dtype == torch.float32 else states.to(dtype))


def compiled_step(model):
    """`shared_prefix_step` compiled by torch.compile (inductor) with dynamic shapes, or None.

    Inductor fuses the step's elementwise work (norms, rotary, SiLU, residuals, the cascade
    attention's softmax) around the matmuls; the rows, the prompts and the filled cache length
    change from step to step, hence dynamic shapes: three graphs on the toy model, ~80 s to
    compile in a fresh process (~20 s with inductor's disk cache warm), then 1.2x the
    uncompiled step at batch 128 on a CPU (docs/SPEED.md). The decoder layers are called whole:
    inductor fuses what `PlainLayer` saves, and traced through `PlainLayer` the first call
    compiled for 435 s instead of ~80, then ran slower."""
    step = shared_prefix_step(model, plain=False)
    return None if step is None else torch.compile(step, dynamic=True)
