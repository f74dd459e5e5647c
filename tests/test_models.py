"""Model name resolution and loading, including the SmolLM2 GGUF conversion."""

from __future__ import annotations

import json
import time

import pytest

from backtrack.errors import UserError
from backtrack.models import load_model, load_tokenizer, resolve_model_path, smollm2_dir


def test_local_folder_and_hub_id(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "smollm2", "a/b/c"])
def test_unknown_names(name):
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_path(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_toy_alias(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="toy_base"):
        resolve_model_path("toy", str(tmp_path))
    (tmp_path / "toy_base").mkdir()
    (tmp_path / "toy_base" / "run.json").write_text(json.dumps({"model_dir": str(tiny_model_dir)}))
    assert resolve_model_path("toy", str(tmp_path)) == str(tiny_model_dir)
    (tmp_path / "toy_base" / "run.json").write_text(json.dumps({"model_dir": "/gone"}))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path("toy", str(tmp_path))


def test_load_tiny_model(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), dtype="float32")
    assert tokenizer.pad_token is not None
    assert model.config.vocab_size == len(tokenizer)


def test_load_missing_model_is_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load"):
        load_model(str(tmp_path / "nothing"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot load"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_smollm2_converted_once_and_generates():
    """First call converts the GGUF (~30 s) into the cache; later calls reuse the folder."""
    import torch

    from backtrack.chat import end_of_turn_ids, render_prompt

    folder = smollm2_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    start = time.time()
    assert resolve_model_path("smollm2-135m") == str(folder)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder))
    assert time.time() - start < 20
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "What is 2 + 3?"}])
    assert "<|im_start|>assistant" in prompt
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             eos_token_id=end_of_turn_ids(tokenizer))
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in text
