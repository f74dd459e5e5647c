"""The vLLM engine (optional extra `backtrack[vllm]`; needs a GPU, so not exercised in CI).

Kept thin: request building and output conversion are pure functions (unit-tested without
vLLM); the class only wires them to `vllm.LLM`. Prefix caching is on because backtracking
continuations share long prefixes with their original samples.
"""

from __future__ import annotations

from backtrack.engines import Completion, Engine, GenerationParams, derive_seed
from backtrack.errors import UserError


def llm_kwargs(model_path: str, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
               gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
               dtype: str = "auto", seed: int = 0, enforce_eager: bool = False) -> dict:
    """Arguments of `vllm.LLM`."""
    kwargs = {"model": model_path, "enable_prefix_caching": True,
              "tensor_parallel_size": int(tensor_parallel_size),
              "gpu_memory_utilization": float(gpu_memory_utilization), "dtype": dtype,
              "seed": int(seed), "enforce_eager": bool(enforce_eager)}
    if int(data_parallel_size) > 1:
        kwargs["data_parallel_size"] = int(data_parallel_size)
    if max_model_len:
        kwargs["max_model_len"] = int(max_model_len)
    return kwargs


def sampling_kwargs(params: GenerationParams, prompt: str, stop_token_ids: list[int]) -> dict:
    """Arguments of `vllm.SamplingParams` for one prompt.

    The seed is derived from the prompt so results do not depend on batching. Special tokens
    are kept in the text because `<think>` may be one.
    """
    params.validate()
    return {"n": params.n, "temperature": params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_new_tokens, "seed": derive_seed(params.seed, prompt),
            "stop": list(params.stop) or None, "stop_token_ids": list(stop_token_ids),
            "skip_special_tokens": False, "spaces_between_special_tokens": False}


def token_prompt(token_ids: list[int]) -> dict:
    """A pre-tokenised prompt, so vLLM adds no second BOS to a template that has one."""
    return {"prompt_token_ids": list(token_ids)}


def to_completions(request_output, end_texts: tuple[str, ...] = ()) -> list[Completion]:
    """Completions of one `vllm.RequestOutput` (duck-typed), in sample order."""
    results = []
    for out in sorted(request_output.outputs, key=lambda o: o.index):
        text = out.text
        for end in end_texts:  # vLLM strips EOS text; be safe with extra end-of-turn ids
            if end and text.endswith(end):
                text = text[: -len(end)]
        results.append(Completion(
            text=text, new_tokens=len(out.token_ids),
            finish_reason="length" if out.finish_reason == "length" else "stop",
            token_ids=list(out.token_ids)))
    return results


class VLLMEngine(Engine):
    def __init__(self, model_path: str, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0,
                 enforce_eager: bool = False):
        try:
            import vllm
        except ImportError as exc:
            raise UserError("engine 'vllm' needs vLLM: pip install 'backtrack[vllm]' "
                            "(or use engine hf / openai)") from exc
        from backtrack.chat import end_of_turn_ids

        self._vllm = vllm
        self.llm = vllm.LLM(**llm_kwargs(model_path, tensor_parallel_size, data_parallel_size,
                                         gpu_memory_utilization, max_model_len, dtype, seed,
                                         enforce_eager))
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.end_texts = tuple(self.tokenizer.convert_ids_to_tokens(self.stop_ids))

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        inputs = [token_prompt(self.tokenizer(p, add_special_tokens=False)["input_ids"])
                  for p in prompts]
        sampling = [self._vllm.SamplingParams(**sampling_kwargs(params, p, self.stop_ids))
                    for p in prompts]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        return [to_completions(o, self.end_texts) for o in outputs]

    def close(self) -> None:
        self.llm = None
