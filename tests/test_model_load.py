"""A model folder a user points at by mistake gets an error naming the folder and the fix, not a traceback."""
import json

import pytest

from fastchat_ft.errors import ModelError
from fastchat_ft.model.load import load_hf_tokenizer, resolve_base_model


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(ModelError, match="no config.json") as e:
        resolve_base_model(str(tmp_path))
    assert str(tmp_path) in str(e.value) and e.value.field == "base_model"


def test_folder_without_tokenizer_files_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="has no tokenizer") as e:
        load_hf_tokenizer(tmp_path)
    assert e.value.fix and str(tmp_path) in str(e.value)


def test_unloadable_tokenizer_becomes_a_model_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")  # present but names no usable tokenizer
    with pytest.raises(ModelError, match="could not load the tokenizer"):
        load_hf_tokenizer(tmp_path)


def _pickle_model_folder(folder, tmp_path):
    """A tiny Llama folder whose pytorch_model.bin also pickles a callable that would create a file on load."""
    import os

    import torch
    from transformers import LlamaForCausalLM

    from fastchat_ft.model.tiny import tiny_llama_config

    sentinel = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    model = LlamaForCausalLM(tiny_llama_config(64, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32))
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save({**model.state_dict(), "payload": RunsCode()}, folder / "pytorch_model.bin")
    return sentinel


def test_pickle_weights_that_run_code_are_refused_by_training_and_inference_loaders(tmp_path):
    from fastchat_ft.inference import load_hf_model
    from fastchat_ft.model.load import load_model

    folder = tmp_path / "pickled"
    sentinel = _pickle_model_folder(folder, tmp_path)
    for load in (load_model, load_hf_model):
        with pytest.raises(ModelError, match="pickle weights file") as e:
            load(folder)
        assert e.value.file == str(folder) and "safetensors" in e.value.fix
    assert not sentinel.exists()
