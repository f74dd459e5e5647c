"""Generation engines: n completions per raw prompt string, from transformers, vLLM or a server.

Every stage talks to one small interface so the same code samples on a laptop CPU (`hf`), a GPU
node (`vllm`) or a fleet of inference servers (`openai`). Prompts are raw strings (the chat
template already applied) so continuing a partial assistant message is just a longer prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from backtrack.errors import UserError

ENGINES = ("hf", "vllm", "openai")


@dataclass
class GenerationParams:
    n: int = 1
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.n < 1:
            raise UserError(f"generation: n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise UserError(f"generation: temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"generation: top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise UserError(f"generation: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n > 1 and self.temperature == 0:
            raise UserError(f"generation: n={self.n} samples at temperature 0 would be identical; "
                            "use temperature > 0 or n = 1")


@dataclass
class Completion:
    text: str  # generated text without EOS / end-of-turn and without the matched stop string
    new_tokens: int  # tokens generated, counting the token that ended the turn
    finish_reason: str  # "stop" (EOS, end of turn or stop string) | "length"
    token_ids: list[int] | None = None  # generated ids, when the engine knows them
    extra: dict | None = None  # fields an evaluation protocol adds to the record (attempt 1)


class Engine:
    """Generate `params.n` completions for each prompt; results are in prompt order."""

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release model memory or connections."""

    def describe(self) -> dict:
        """What the engine settled on at run time that its options do not say (kept in stage
        summaries beside the figures): e.g. whether a kernel built on this machine."""
        return {}


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from `seed` and `parts`, stable across processes (unlike `hash`)."""
    text = "\x1f".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def make_engine(name: str, model_path: str, **options) -> Engine:
    """Build engine `name` ("hf" | "vllm" | "openai") for the model at `model_path`."""
    if name == "hf":
        from backtrack.engines.hf import HFEngine as cls
    elif name == "vllm":
        from backtrack.engines.vllm import VLLMEngine as cls
    elif name == "openai":
        from backtrack.engines.openai import OpenAIEngine as cls
    else:
        raise UserError(f"unknown engine '{name}' (available: {', '.join(ENGINES)})")
    check_options(name, cls, options)
    return cls(model_path, **options)


def check_options(name: str, cls: type, options: dict) -> None:
    """Unknown engine options are a user error (a typo would otherwise be ignored or crash)."""
    import inspect

    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model_path")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"option 'engine_args': unknown option(s) {unknown} for engine "
                        f"'{name}' (known: {known})")
