"""Shared fixtures: a tiny random Llama with a real (trained) tokenizer and chat template."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"
if not GSM8K_DIR.exists():  # CI runs on a clone beside ../shared as well
    GSM8K_DIR = Path(os.environ.get("BACKTRACK_GSM8K_DIR", "/work/shared/data/gsm8k"))

NAMES = ["Tom", "Ann", "Sara", "Ben", "Mia", "Leo"]
OBJECTS = ["apples", "coins", "books", "pens", "cards"]


def _corpus(n: int = 300) -> list[str]:
    texts = []
    for i in range(n):
        a, b = 3 + i % 17, 1 + i % 5
        name, obj = NAMES[i % len(NAMES)], OBJECTS[i % len(OBJECTS)]
        texts.append(
            f"{name} has {a} {obj}. {name} gets {b} more. How many {obj} now? "
            f"<think>{a} + {b} = {a + b}\n{a + b} * 2 = {2 * (a + b)}</think>\n"
            f"The answer is {a + b}. Wait, that's not right... Hmm, let me check that again."
        )
    return texts


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """A ~100k-parameter LlamaForCausalLM with a trained toy tokenizer, saved as an HF folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from backtrack.toy_tokenizer import train_toy_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_toy_tokenizer(_corpus(), vocab_size=400)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def kernels():
    """The hf engine's C++ kernels (`cpu_attention.load_kernels`), built on first use."""
    import shutil

    from backtrack.engines.cpu_attention import load_kernels

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler here: cpu_kernel falls back to torch (tested apart)")
    built = load_kernels()
    assert built is not None, "a C++ compiler is here, yet the kernel did not build"
    return built


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.fail(f"GSM8K data not found at {GSM8K_DIR}")
    return GSM8K_DIR


@pytest.fixture
def cli_env() -> dict:
    """Environment for `backtrack` subprocesses: offline, quiet, the venv's interpreter."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


BACKTRACK_CMD = [sys.executable, "-m", "backtrack.cli"]
