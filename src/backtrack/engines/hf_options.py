"""The hf engine's option checks and model loading, apart from its generation (`hf`): each bad
option is a one-line `UserError` naming it."""

from __future__ import annotations

from backtrack.errors import UserError

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
DECODERS = ("generate", "compact")
KV_CACHE_DTYPES = (None, "auto", "float16")


def check_options(*, cache: str, attn_implementation: str | None, attend_filled: bool,
                  compile: bool, decode: str, shared_prefix: bool, group_prefixes: bool,
                  cpu_kernel: bool, kv_cache_dtype: str | None, model_attention: str) -> None:
    """Raise on an option the engine does not take, or one without the options it needs
    (`model_attention`: the model's own attention implementation)."""
    if cache not in ("static", "dynamic"):
        raise UserError(f"engine 'hf': option 'cache' must be static or dynamic, got {cache!r}")
    _check_attention(attn_implementation, attend_filled, cache, model_attention)
    if not isinstance(compile, bool):
        raise UserError(f"engine 'hf': option 'compile' must be true or false, got {compile!r}")
    if decode not in DECODERS:
        raise UserError(f"engine 'hf': option 'decode' must be one of {list(DECODERS)}, "
                        f"got {decode!r}")
    if not isinstance(shared_prefix, bool):
        raise UserError(f"engine 'hf': option 'shared_prefix' must be true or false, "
                        f"got {shared_prefix!r}")
    if shared_prefix and (decode != "compact" or attn_implementation is not None
                          or attend_filled):
        raise UserError("engine 'hf': option 'shared_prefix' needs decode: compact and no "
                        "attn_implementation / attend_filled (it brings its own attention)")
    if not isinstance(group_prefixes, bool) or (group_prefixes and not shared_prefix):
        raise UserError(f"engine 'hf': option 'group_prefixes' must be true or false and "
                        f"needs shared_prefix: true, got {group_prefixes!r}")
    if not isinstance(cpu_kernel, bool) or (cpu_kernel and not shared_prefix):
        raise UserError(f"engine 'hf': option 'cpu_kernel' must be true or false and needs "
                        f"shared_prefix: true, got {cpu_kernel!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES or (kv_cache_dtype == "float16" and not cpu_kernel):
        raise UserError(f"engine 'hf': option 'kv_cache_dtype' must be one of "
                        f"{[d for d in KV_CACHE_DTYPES if d]} (float16 needs cpu_kernel: "
                        f"true), got {kv_cache_dtype!r}")


def _check_attention(implementation: str | None, attend_filled: bool, cache: str,
                     model_attention: str) -> None:
    """`attn_implementation` and `attend_filled` (a static cache and an eager or sdpa base
    attention)."""
    if implementation is not None and implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"engine 'hf': option 'attn_implementation' must be one of "
                        f"{', '.join(ATTENTION_IMPLEMENTATIONS)} or null, got {implementation!r}")
    if not isinstance(attend_filled, bool):
        raise UserError(f"engine 'hf': option 'attend_filled' must be true or false, "
                        f"got {attend_filled!r}")
    if not attend_filled:
        return
    if cache != "static":
        raise UserError("engine 'hf': option 'attend_filled' needs cache: static")
    if (implementation or model_attention) not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"engine 'hf': option 'attend_filled' works with eager or sdpa "
                        f"attention; the model uses {model_attention!r} (set attn_implementation)")


def load_model_and_tokenizer(model_path: str, device: str, dtype: str | None):
    """Model (eval mode, on `device`) and tokenizer of a local folder or hub id."""
    import torch

    from backtrack.models import load_model, load_tokenizer

    torch_dtype = getattr(torch, str(dtype), None) if dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if not isinstance(torch_dtype, torch.dtype):
        raise UserError(f"engine 'hf': option 'dtype' must be a torch dtype name, got {dtype!r}")
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype=torch_dtype)
    return model.to(device).eval(), tokenizer
