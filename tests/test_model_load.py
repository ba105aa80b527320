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
