"""Rendering chat prompts to the raw strings that engines consume.

Engines take raw prompt strings (not message lists) so that one code path serves fresh
samples and continuations, and so the OpenAI-compatible engine can use the plain completions
endpoint. A continuation prompt is the generation prompt followed by the model's own partial
text: this gives `continue_final_message=True` semantics on every template, including those
that rewrite assistant content (e.g. strip `<think>` blocks) when re-rendering a message.
"""

from __future__ import annotations

from backtrack.formats import END_OF_TURN_MARKERS


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat prompt up to and including the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_continuation(tokenizer, messages: list[dict], partial: str) -> str:
    """The prompt for continuing a partial assistant message exactly where it stops."""
    return render_prompt(tokenizer, messages) + partial


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus common end-of-turn markers."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return sorted(ids)
