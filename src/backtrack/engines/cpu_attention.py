"""A compiled decode attention for CPU: the hf engine's `cpu_kernel` option.

With `shared_prefix`, one decode step's attention is, per prompt and kv head, an [n x dim] x
[dim x prompt length] product, and per row a [1 x dim] x [dim x own length] one: hundreds of
tiny matrices per layer. torch sends them to MKL's batched gemm, which spends about a
microsecond per matrix (and, under 400 multiply-adds a matrix, ATen's scalar loop: the first
~10 own tokens), so on the toy model the attention read its keys and values at ~5 GB/s of the
~17.5 GB/s this CPU streams (docs/SPEED.md). The two loops in `cpu_attention.cpp` read each prompt's
keys and values once for all its rows, 8 floats at a time: the same attention, summed in
another order. The prompts' keys are held dim-major (`dim_major`), so a query's scores over 16
tokens are vector multiply-adds without horizontal sums, and the values' sums stay in
registers (1.1x the kernels before inside the engine, up to 2x on one layer's cache-warm
data, docs/SPEED.md). The rows' own tokens live token-major (`TokenMajorLayer`): appending a token
writes one slab, so that cache never moves (`cpu_cache.cpp`). torch and transformers have no
such CPU kernel, and vLLM's CPU attention comes only with a vLLM CPU build, hence this one.
It is built on first use for this machine's CPU (`-march=native`, ~30 s, cached by torch
under ~/.cache/torch_extensions); where it cannot build (no C++ compiler or ninja) the engine
warns once and keeps torch's matmuls. One thread. With the engine's `kv_cache_dtype: float16` it
reads float16 keys and values (prompts' and own), widened to float as they load: the steps
wait on memory, and that halves it (1.05-1.10x a call on the toy model, docs/SPEED.md).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

from transformers.cache_utils import DynamicLayer

# the module's sources (cpu_attention.cpp binds them all) and their shared header
SOURCES = [Path(__file__).with_name(name) for name in ("cpu_attention.cpp", "cpu_cache.cpp",
                                                      "cpu_linear.cpp")]
HEADERS = [Path(__file__).with_name("cpu_checks.h")]


def _build_tag() -> str:
    """Hash of the sources and header (their bytes and paths) and of this CPU's model and
    instruction-set flags: a -march=native build cached under one home directory must not be
    loaded on another CPU, and two checkouts must not rebuild over each other (torch rebuilds
    a module whose source path changed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        text = platform.processor() + platform.machine()
    lines = sorted({line for line in text.splitlines()
                    if line.split(":")[0].strip() in ("model name", "flags", "Features")})
    files = SOURCES + HEADERS
    described = "\n".join([*(str(path.resolve()) for path in files), *lines]).encode()
    contents = b"".join(path.read_bytes() for path in files)
    return hashlib.sha256(contents + described).hexdigest()[:12]


def build_directory() -> Path:
    """Where this checkout's build for this CPU lives (under torch's extensions root)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / f"backtrack_cpu_attention_{_build_tag()}"


def _load_locked(folder: Path):
    """torch's `load`, under a lock the OS drops when its process dies.

    torch serialises builds with a lock file that only the building process removes: killed
    mid-build (SIGKILL, OOM), it stays, and every later `load` waits on it forever. Holding an
    flock on our own file, no other process of ours is building, so a torch lock file there is
    a dead build's and is removed."""
    from torch.utils.cpp_extension import load

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "backtrack.flock", "w") as handle:
        try:
            import fcntl
            fcntl.flock(handle, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
        except ImportError:  # no flock (Windows): torch's lock alone
            pass
        return load(name=folder.name, sources=[str(path) for path in SOURCES],
                    build_directory=str(folder), extra_cflags=["-O3", "-march=native"],
                    verbose=False)


@functools.lru_cache(maxsize=None)
def load_kernels():
    """The compiled module (`cascade_scores`, `cascade_values`, `key_block`;
    `compact_token_rows`, `rotary_append` from cpu_cache.cpp; `pack_linear`, `packed_linear`
    from cpu_linear.cpp), or None with a warning when it
    does not build here."""
    try:
        return _load_locked(build_directory())
    except Exception as error:  # a missing compiler or ninja, an unsupported flag
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        warnings.warn(f"hf engine: cpu_kernel: the C++ decode attention did not build ({reason}); "
                      f"decoding with torch's matmuls", RuntimeWarning, stacklevel=2)
        return None


def supports(model, device: str) -> bool:
    """Whether the kernel applies to `model` on `device`: float32 on CPU, head dim a multiple
    of 8 (its vectors' width)."""
    import torch

    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads)
    return device == "cpu" and model.dtype == torch.float32 and head_dim % 8 == 0


def cascade_attention(kernels, query, key, value, prefix, layer: int, scaling: float):
    """One decode step's attention ([rows, 1, heads, dim], as the model's attention returns
    it) over the rows' prompts (`prefix`: `hf_prefix.SharedPrefix`) and their own tokens
    (`key`, `value`: [rows, kv heads, own length, dim]; `prefix.own_bias` masks padding among
    the first ones)."""
    rows, heads, _, dim = query.shape
    q = query.reshape(rows, heads, dim)
    bias = prefix.bias.reshape(prefix.bias.shape[0], -1)
    own_bias = None if prefix.own_bias is None else prefix.own_bias.reshape(rows, -1)
    # the keys dim-major: as `SharedPrefix.store_for_decode` left them (then this returns
    # them as they are), or laid out here for a prefill of rows' own tokens one a row, which
    # runs before it (a chunk of rows with two own tokens each)
    keys = dim_major(prefix.keys[layer], kernels.key_block)
    scores = kernels.cascade_scores(q, keys, bias, prefix.padding, key, prefix.starts, scaling,
                                    own_bias)
    weights = scores.softmax(-1)
    out = kernels.cascade_values(weights, prefix.values[layer], prefix.padding, value,
                                 prefix.starts)
    return out.reshape(rows, 1, heads, dim)


def dim_major(keys, block: int, dtype=None):
    """Prompt keys [prompts, kv heads, length, dim] as the kernel reads them: the same tensor
    (in `dtype`, None: theirs) in dim-major memory, each (prompt, head, dim)'s tokens adjacent
    with room up to a multiple of `block` (zeros), so a query scores `block` tokens with
    vector multiply-adds and no horizontal sums (`prompt_scores` in cpu_attention.cpp).
    Returned as is when already so."""
    length = keys.shape[2]
    room = -(-length // block) * block
    dtype = dtype or keys.dtype
    if keys.dtype == dtype and keys.stride(2) == 1 and keys.stride(3) >= room:
        return keys  # (the kernel checks that the room lies within their storage)
    memory = keys.new_zeros((*keys.shape[:2], keys.shape[3], room), dtype=dtype)
    memory[..., :length] = keys.transpose(2, 3)
    return memory[..., :length].transpose(2, 3)


class TokenMajorLayer(DynamicLayer):
    """The rows' own-token cache for the kernel, stored token-major ([tokens, rows, kv heads,
    dim] in a kept buffer with room for `capacity` tokens): a step appends one contiguous slab,
    so rows need no free slots between them and the cache never moves (`hf_decode.
    PreallocatedLayer` keeps 2 free slots and moves every 3 steps), and the kernel streams each
    token's keys for all rows at once. `keys` / `values` are [rows, kv heads, tokens, dim]
    views, as transformers expects; only the kernel reads them (torch's matmuls would copy).
    `dtype`: the stored keys' and values' (float16 for `kv_cache_dtype`; None: the layer's)."""

    def __init__(self, layer: DynamicLayer, capacity: int, buffers, index: int, kernels,
                 dtype=None):
        super().__init__()
        keys, values = layer.keys, layer.values
        rows, heads, length, dim = keys.shape
        like = keys if dtype is None else keys.new_empty((), dtype=dtype)
        self.dtype, self.device, self.is_initialized = like.dtype, keys.device, True
        shape = (max(capacity, length), rows, heads, dim)
        self._keys, self._values = (buffers.take((index, part, "tokens"), shape, like)
                                    for part in ("keys", "values"))
        self._keys[:length] = keys.permute(2, 0, 1, 3)
        self._values[:length] = values.permute(2, 0, 1, 3)
        self._kernels, self.length = kernels, length
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[:self.length].permute(1, 2, 0, 3)
        self.values = self._values[:self.length].permute(1, 2, 0, 3)

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[0]:
            raise ValueError(f"TokenMajorLayer: {end} tokens exceed its capacity "
                             f"{self._keys.shape[0]}")
        self._keys[self.length:end] = key_states.permute(2, 0, 1, 3)
        self._values[self.length:end] = value_states.permute(2, 0, 1, 3)
        self.length = end
        self._views()
        return self.keys, self.values

    def append_rotated(self, query, key, value, cos, sin):
        """A decode step's queries, keys and values as the projections give them ([rows, 1,
        heads * dim]; cos and sin [rows, 1, dim]): transformers' rotary embedding on the
        queries and keys, and the keys and values written into the next token's slab, in one
        C++ call (`rotary_append`: the same floats as the ~12 torch operations it replaces).
        Returns the rotated queries [rows, heads, 1, dim] and the cache's keys and values."""
        if self.length + 1 > self._keys.shape[0]:
            raise ValueError(f"TokenMajorLayer: {self.length + 1} tokens exceed its capacity "
                             f"{self._keys.shape[0]}")
        rows = key.shape[0]
        rotated = self._kernels.rotary_append(
            query.view(rows, -1), key.view(rows, -1), value.view(rows, -1), cos.view(rows, -1),
            sin.view(rows, -1), self._keys[self.length], self._values[self.length])
        self.length += 1
        self._views()
        return rotated.unsqueeze(2), self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices) -> None:
        """Keep rows `indices` (ascending), moved to the front of each token's slab."""
        for buffer in (self._keys, self._values):
            self._kernels.compact_token_rows(buffer, indices, self.length)
        self._keys, self._values = self._keys[:, :len(indices)], self._values[:, :len(indices)]
        self._views()
