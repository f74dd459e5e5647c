"""The prompt prefill's last decoder layer at the last position only
(`hf_last_layer.last_position_only`): the cache bit for bit, the last logits up to float order,
the layer's query and MLP run on one position, and nothing changed where it does not apply."""

from __future__ import annotations

import pytest


def tiny(kind: str, attention: str = "sdpa"):
    """A random 3-layer model of transformers' Llama form (Qwen2: biases on q/k/v and
    grouped-query attention), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if kind == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**shape)))
    return model.eval()


def left_padded_batch():
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    for row, padding in enumerate((0, 3, 5, 1)):
        mask[row, :padding] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def prefill(model, ids, mask, positions):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1], cache


def query_inputs(layer) -> list:
    """Record the shapes the layer's q_proj is called with (an instance `forward`, not a
    hook: a hook would make the layer one the block leaves alone)."""
    shapes, forward = [], layer.self_attn.q_proj.forward
    layer.self_attn.q_proj.forward = lambda x: shapes.append(tuple(x.shape)) or forward(x)
    return shapes


@pytest.mark.parametrize("kind, attention", [("llama", "sdpa"), ("qwen2", "sdpa"),
                                             ("llama", "eager")])
def test_last_layer_at_last_position_keeps_the_cache_and_the_last_logits(kind, attention):
    """Left-padded rows: every layer's keys and values equal the full forward's bit for bit,
    the last logits agree to 1e-5 (another float order), and the last layer's query ran on
    one position per row (the others' on every position). Without the mask's last row the
    padded rows' logits would differ."""
    import torch

    from backtrack.engines.hf_last_layer import last_position_only

    model = tiny(kind, attention)
    ids, mask, positions = left_padded_batch()
    full_logits, full_cache = prefill(model, ids, mask, positions)
    last_queries, first_queries = query_inputs(model.model.layers[-1]), query_inputs(
        model.model.layers[0])
    with last_position_only(model):
        logits, cache = prefill(model, ids, mask, positions)
    assert last_queries == [(4, 1, 32)] and first_queries == [(4, 9, 32)]
    for full, short in zip(full_cache.layers, cache.layers):
        assert torch.equal(full.keys, short.keys) and torch.equal(full.values, short.values)
    assert torch.allclose(logits, full_logits, atol=1e-5)
    assert (logits - full_logits).abs().max() < 1e-3 * full_logits.abs().max()


def test_the_block_leaves_the_layer_as_it_was_even_on_an_error():
    from backtrack.engines.hf_last_layer import last_position_only

    model = tiny("llama")
    last = model.model.layers[-1]
    with last_position_only(model):
        assert "forward" in vars(last)
    assert "forward" not in vars(last)
    with pytest.raises(RuntimeError), last_position_only(model):
        raise RuntimeError("inside")
    assert "forward" not in vars(last)


@pytest.mark.parametrize("why", ["hook", "training", "flash"])
def test_layers_it_cannot_compute_run_whole(why):
    """A hook on the last layer (its output must be the full one), training, or an attention
    that reads a 2D mask (flash attention 2): the block changes nothing."""
    import torch

    from backtrack.engines.hf_last_layer import last_position_only

    model = tiny("llama")
    last = model.model.layers[-1]
    if why == "hook":
        last.register_forward_hook(lambda *args: None)
    elif why == "training":
        model.train()
    else:
        model.config._attn_implementation = "flash_attention_2"
    with last_position_only(model):
        assert "forward" not in vars(last)
    if why != "flash":  # (flash attention 2 is not installed here to run the forward)
        queries = query_inputs(last)
        ids, mask, positions = left_padded_batch()
        with torch.no_grad(), last_position_only(model):
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert queries == [(4, 9, 32)]
