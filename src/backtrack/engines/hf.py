"""The transformers engine: batched sampling with `model.generate` on CPU or GPU.

Prompts are sorted by token length and left-padded into batches so little compute goes to
padding. When n > 1, each prompt is prefilled once and its KV cache is repeated n times before
decoding (transformers' `num_return_sequences` copies the prompt first and prefills every copy).
Generation stops at EOS / end-of-turn tokens and at optional stop strings.

Speed options, all off by default (off = the same tokens as before for a seed):
`attn_implementation` picks transformers' attention for generation, `attend_filled` reads only
the filled part of the static cache (see `hf_attention`), `compile` compiles the decode step
off CUDA too (transformers already compiles it on CUDA when the cache is static).
`decode: compact` replaces `generate` by a loop that drops finished rows from the batch and
its cache (`hf_decode`): other tokens for a seed than `generate`'s, same distribution.
`shared_prefix` (with `decode: compact`) keeps each prompt's cached keys and values once for
its n samples instead of n copies (`hf_prefix`), and prefills the tokens all prompts of a call
start with once (`hf_prefill.common_start`): the same attention, summed in another order;
with it, `compile` compiles that decode step (`hf_step.compiled_step`), and
`group_prefixes` holds the leading tokens n = 1 prompts share once (`hf_prefix.prefix_groups`):
greedy, the same tokens; sampled, other draws (another batching order), same distribution.
`cpu_kernel` (with `shared_prefix`) runs that decode attention in C++ (`cpu_attention`).
"""

from __future__ import annotations

from contextlib import contextmanager

from backtrack.engines import Completion, Engine, GenerationParams, cut_at_stop, derive_seed

# With shared_prefix, the prompt prefill runs every prompt token and its last logits give the
# first sampled token (as generate's prefill does), instead of a decode step over all n rows
# per prompt for the last prompt token (benchmarks/sampling.py turns it off for a former lever).
PREFILL_GIVES_FIRST_TOKEN = True


class HFEngine(Engine):
    """`batch_size` is the number of sequences decoded together (prompts x n); `num_threads`
    sets torch's CPU threads (1 is often fastest for small models on a busy machine).
    `attn_implementation` ("eager" | "sdpa"; None keeps the model's) applies during generation
    only, so a model shared with a trainer keeps its own. `attend_filled` (static cache only)
    makes attention read the filled cache slots only: reading the whole static cache is the
    largest cost of a small model's decode step on CPU. `compile` compiles the decode step with
    transformers' CompileConfig off CUDA too (on CUDA transformers already compiles a static-
    cache decode); it pays about a minute per process on the toy model. With `decode: compact`
    and `shared_prefix` it compiles the shared-prefix decode step instead
    (`hf_step.compiled_step`, once per engine; n = 1 calls keep the model's forward unless
    `group_prefixes` gives them a shared prefix too).
    `shared_prefix` (`decode: compact` only) holds a prompt's KV cache once for its n samples
    (`hf_prefix`). `group_prefixes` (with `shared_prefix`) does the same across n = 1 prompts
    that share leading tokens, as the continuations of one problem do: prompts are batched in
    token order instead of by length, and each group's shared part is prefilled once.
    With `decode: compact` on CPU the engine keeps its KV cache memory between calls, at the
    largest call's size (`hf_decode.DecodeBuffers`; `close()` frees it), and on CPU it asks
    glibc to keep freed memory for reuse (`hf_decode.hold_freed_memory`, process-wide).
    `cpu_kernel` (with `shared_prefix`, not `compile`; float32 on CPU) runs the decode steps'
    attention in a C++ kernel built on first use, over a token-major own-token cache
    (`cpu_attention`), and their linears against weights packed once (`cpu_linear`), or warns
    and keeps torch's matmuls where it cannot build.
    `kv_cache_dtype: float16` (with `cpu_kernel`) holds the decode's keys and values as float16
    for that kernel, which widens them to float as it reads: half the memory its steps wait
    on, rounded keys and values (other tokens than float32's, as vLLM's `kv_cache_dtype`)."""

    def __init__(self, model_path: str, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 64, share_prefill: bool = True, num_threads: int | None = None,
                 cache: str = "static", attn_implementation: str | None = None,
                 attend_filled: bool = False, compile: bool = False, decode: str = "generate",
                 shared_prefix: bool = False, group_prefixes: bool = False,
                 cpu_kernel: bool = False, kv_cache_dtype: str | None = None, model=None,
                 tokenizer=None):
        import torch
        from transformers import GenerationConfig

        from backtrack.chat import end_of_turn_ids
        from backtrack.engines.cpu_attention import load_kernels, supports
        from backtrack.engines.hf_attention import filled_attention
        from backtrack.engines.hf_decode import DecodeBuffers, hold_freed_memory
        from backtrack.engines.hf_options import check_options, load_model_and_tokenizer

        if num_threads:
            torch.set_num_threads(int(num_threads))

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None or tokenizer is None:
            model, tokenizer = load_model_and_tokenizer(model_path, self.device, dtype)
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = end_of_turn_ids(tokenizer)
        self._eos_set = set(self.eos_ids)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]
        # A clean generation config: no hub defaults (top_k, repetition penalty...) leak in.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        self.batch_size = max(1, int(batch_size))
        self.share_prefill = share_prefill
        check_options(cache=cache, attn_implementation=attn_implementation,
                      attend_filled=attend_filled, compile=compile, decode=decode,
                      shared_prefix=shared_prefix, group_prefixes=group_prefixes,
                      cpu_kernel=cpu_kernel, kv_cache_dtype=kv_cache_dtype,
                      model_attention=self.model.config._attn_implementation)
        self.cache, self.compile, self.decode = cache, compile, decode
        self.shared_prefix, self.group_prefixes = shared_prefix, group_prefixes
        self.attention = (filled_attention(attn_implementation
                                           or self.model.config._attn_implementation)
                          if attend_filled else attn_implementation)
        self.kernels = (load_kernels() if cpu_kernel and not compile
                        and supports(self.model, self.device) else None)
        # float16 keys and values only where the kernel runs (it alone reads them)
        self.kv_dtype = (torch.float16 if kv_cache_dtype == "float16" and self.kernels is not None
                         else None)
        self.buffers = DecodeBuffers(keep=not self.device.startswith("cuda"))
        if self.buffers.keep:  # the same policy for the rest of a call's memory
            hold_freed_memory()
        self._compiled_step = None

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids; the chat template already holds any BOS, so none is added."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        params.validate()
        # one batch call (the fast tokenizer's encode_batch): ~1-2 ms less a 32-prompt call
        encoded = (self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
                   if prompts else [])
        if self._grouping(params):  # prompts sharing leading tokens side by side
            order = sorted(range(len(prompts)), key=lambda i: (encoded[i], prompts[i]))
        else:
            order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), prompts[i]))
        per_batch = max(1, self.batch_size // params.n)
        results: list[list[Completion]] = [[] for _ in prompts]
        for start in range(0, len(order), per_batch):
            chunk = order[start:start + per_batch]
            seed = derive_seed(params.seed, *(prompts[i] for i in chunk))
            outputs = self._generate_batch([encoded[i] for i in chunk], params, seed)
            for j, i in enumerate(chunk):
                results[i] = outputs[j * params.n:(j + 1) * params.n]
        return results

    def _grouping(self, params: GenerationParams) -> bool:
        return self.group_prefixes and params.n == 1 and not params.stop

    def _generate_batch(self, batch: list[list[int]], params: GenerationParams,
                        seed: int) -> list[Completion]:
        import torch

        if self._grouping(params):
            return self._grouped_batch(batch, params, seed)
        input_ids, mask = self._left_padded(batch)
        width = input_ids.shape[1]
        kwargs = dict(
            max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if self.pad_id not in self._eos_set:  # padding is not text; it also marks finished rows
            kwargs["suppress_tokens"] = [self.pad_id]
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if self.decode == "compact" and not params.stop:
            return self._compact_batch(input_ids, mask, params, seed)
        kwargs.update(self._compile_kwargs())
        torch.manual_seed(seed)
        with torch.inference_mode(), self._attention_scope():
            if params.n > 1 and self.share_prefill and width > 1:
                input_ids, mask, cache = self._shared_prefill(
                    input_ids, mask, params.n, width + params.max_new_tokens)
                kwargs["past_key_values"] = cache
            else:
                kwargs["num_return_sequences"] = params.n
                if self.cache == "static":
                    kwargs["cache_implementation"] = "static"
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        generated = out[:, width:].tolist()
        return [self._to_completion(ids, params.stop) for ids in generated]

    def _compact_batch(self, input_ids, mask, params: GenerationParams,
                       seed: int) -> list[Completion]:
        """`hf_decode.compact_decode` over the batch (its n copies per prompt sharing one
        prefill when `share_prefill`)."""
        import torch

        from backtrack.engines.hf_decode import compact_decode

        width, cache, prefix = input_ids.shape[1], None, None
        suppress = [] if self.pad_id in self._eos_set else [self.pad_id]
        shared = self.shared_prefix and params.n > 1 and width > 1
        first_logits = None
        with torch.inference_mode(), self._attention_scope(shared):
            if shared:
                input_ids, mask, prefix, first_logits = self._prefix_prefill(input_ids, mask,
                                                                             params.n)
            elif params.n > 1 and self.share_prefill and width > 1:
                input_ids, mask, cache = self._shared_prefill(input_ids, mask, params.n, 0,
                                                              dynamic=True)
            elif params.n > 1:
                input_ids = input_ids.repeat_interleave(params.n, dim=0)
                mask = mask.repeat_interleave(params.n, dim=0)
            generated = compact_decode(self.model, input_ids, mask, cache,
                                       params.max_new_tokens, self.eos_ids, params.temperature,
                                       params.top_p, suppress, seed, prefix=prefix,
                                       buffers=self.buffers,
                                       step=self._decode_step() if shared else None,
                                       first_logits=first_logits)
        return [self._to_completion(ids, []) for ids in generated]

    def _grouped_batch(self, batch: list[list[int]], params: GenerationParams,
                       seed: int) -> list[Completion]:
        """n = 1 prompts (sorted) whose leading tokens several share, as continuations of one
        problem do (budget forcing, second attempts, backtracking): each group's shared part
        runs once into a `SharedPrefix`, then each row's rest into its own cache, so the
        problem's prompt is prefilled once, not once per continuation."""
        import torch

        from backtrack.engines.hf_decode import compact_decode
        from backtrack.engines.hf_prefix import SharedPrefix, prefix_groups

        groups = prefix_groups(batch)
        if any(shared == 0 for _, _, shared in groups):  # a one-token prompt: nothing to share
            input_ids, mask = self._left_padded(batch)
            return self._compact_batch(input_ids, mask, params, seed)
        lead_ids, lead_mask = self._left_padded([batch[first][:shared]
                                                 for first, _, shared in groups])
        row_group, row_shared = zip(*[(g, shared) for g, (first, end, shared) in enumerate(groups)
                                      for _ in range(first, end)])
        rest_ids, rest_mask = self._left_padded([ids[s:] for ids, s in zip(batch, row_shared)])
        group = torch.tensor(row_group, device=self.device)
        shared = torch.tensor(row_shared, device=self.device)
        positions = shared[:, None] + (rest_mask.cumsum(-1) - 1).clamp(min=0)
        suppress = [] if self.pad_id in self._eos_set else [self.pad_id]
        with torch.inference_mode(), self._attention_scope(True):
            prefill, prefill_mask = self._prefill(lead_ids, lead_mask, keep_last=True,
                                                  share_start=True)
            prefix = SharedPrefix(prefill, prefill_mask, 1, self.model.dtype, group=group,
                                  kernels=self.kernels, kv_dtype=self.kv_dtype)
            generated = compact_decode(self.model, rest_ids, rest_mask, None,
                                       params.max_new_tokens, self.eos_ids, params.temperature,
                                       params.top_p, suppress, seed, prefix=prefix,
                                       buffers=self.buffers, step=self._decode_step(),
                                       positions=positions)
        return [self._to_completion(ids, []) for ids in generated]

    def _left_padded(self, rows: list[list[int]]):
        """Token ids [rows, longest] left-padded with the pad id, and their mask."""
        import torch

        width = max(1, max(len(ids) for ids in rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _decode_step(self):
        """The compiled shared-prefix decode step with `compile` (compiled on first use and
        kept: a new torch.compile wrapper would compile again), else None (the plain one)."""
        from backtrack.engines.hf_step import compiled_step

        if self.compile and self._compiled_step is None:
            self._compiled_step = compiled_step(self.model)
        return self._compiled_step

    def _prefix_prefill(self, input_ids, mask, n: int):
        """The prompts run once into a `SharedPrefix` (not repeated); the rows (n per prompt)
        for the decode loop, and their first token's logits (`PREFILL_GIVES_FIRST_TOKEN`: the
        prompts' last ones, from the prefill, which then holds every prompt token; else None:
        the decode's first step runs each row's last prompt token)."""
        import torch

        from backtrack.engines.hf_prefix import SharedPrefix

        logits = [] if PREFILL_GIVES_FIRST_TOKEN else None
        prefill, prefill_mask = self._prefill(input_ids, mask, keep_last=logits is not None,
                                              share_start=True, logits=logits)
        prefix = SharedPrefix(prefill, prefill_mask, n, self.model.dtype, kernels=self.kernels,
                              kv_dtype=self.kv_dtype)
        first = None if logits is None else torch.cat(logits).repeat_interleave(n, dim=0)
        return (input_ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), prefix,
                first)

    def _prefill(self, input_ids, mask, keep_last: bool = False, share_start: bool = False,
                 logits: list | None = None):
        """A DynamicCache of the prompt batch, all but its last token (the decode's first), or
        all of it with `keep_last`, and the mask of its columns; run `PREFILL_ROWS` prompts at
        a time (`hf_prefill.prefill_in_chunks`: less padding, smaller intermediates), with
        `share_start` the tokens every prompt starts with once (`hf_prefill.prompt_prefill`;
        the cache's columns then differ from the prompts'). With `logits`, the prefill's
        last-position logits are appended to it, a chunk of prompts at a time."""
        from backtrack.engines.hf_prefill import prompt_prefill

        end = input_ids.shape[1] if keep_last else -1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return prompt_prefill(self.model, input_ids[:, :end], mask[:, :end],
                              position_ids[:, :end], share_start, self.buffers, logits)

    def _compile_kwargs(self) -> dict:
        """generate() options for compiling the decode step (or keeping it uncompiled)."""
        from transformers import CompileConfig

        if self.compile and not self.device.startswith("cuda"):
            config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
            # transformers compiles only on accelerators unless this flag (its switch "to
            # compile on e.g. CPU") is set; it has no public argument for it.
            config._compile_all_devices = True
            return {"compile_config": config}
        if self.attention and self.attention.startswith("backtrack_filled") and not self.compile:
            # The filled-cache attention changes shape every step: CUDA's automatic compile
            # (CUDA graphs) would re-record every step.
            return {"disable_compile": True}
        return {}

    @contextmanager
    def _attention_scope(self, shared_prefix: bool = False):
        """Generate with `self.attention` (or the shared-prefix attention), then give the
        model back its own implementation."""
        from backtrack.engines.hf_prefix import register

        own = self.model.config._attn_implementation
        attention = register() if shared_prefix else self.attention
        if attention is None or attention == own:
            yield
            return
        self.model.set_attn_implementation(attention)
        try:
            yield
        finally:
            self.model.set_attn_implementation(own)

    def _shared_prefill(self, input_ids, mask, n: int, max_len: int, dynamic: bool = False):
        """Run the prompt batch once (all but its last token), then repeat the cache n times.

        `generate` resumes from a cache that covers all but the last prompt token, so only the
        last token of each copy is recomputed. With `cache="static"` the repeated prefill is
        written into a preallocated cache: on CPU, growing a dynamic cache by concatenation
        every step costs more than the small model's matmuls.
        """
        from transformers import StaticCache

        prefill, _ = self._prefill(input_ids, mask)
        if self.cache == "static" and not dynamic:
            cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            for index, layer in enumerate(prefill.layers):
                cache.update(layer.keys.repeat_interleave(n, dim=0),
                             layer.values.repeat_interleave(n, dim=0), index)
        else:
            cache = prefill
            cache.batch_repeat_interleave(n)
        return input_ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0), cache

    def _to_completion(self, ids: list[int], stops: list[str]) -> Completion:
        end = next((i for i, t in enumerate(ids) if t in self._eos_set), None)
        if end is not None:
            kept = ids[:end]
        else:  # rows finished by a stop string are padded afterwards
            kept = list(ids)
            while kept and kept[-1] == self.pad_id:
                kept.pop()
        text = self.tokenizer.decode(kept, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
        text, hit_stop = cut_at_stop(text, stops)
        finished = end is not None or hit_stop
        return Completion(text=text, new_tokens=end + 1 if end is not None else len(kept),
                          finish_reason="stop" if finished else "length", token_ids=kept)

    def describe(self) -> dict:
        dtype = str(self.model.dtype).removeprefix("torch.")
        return {"device": self.device, "dtype": dtype, "cpu_kernel": self.kernels is not None,
                "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch.") if self.kv_dtype
                else dtype}

    def close(self) -> None:
        self.model = None
        self.buffers.clear()
