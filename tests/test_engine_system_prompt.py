"""Training renders what inference will prompt: with a built-in template and no `system_prompt` set, conversations
without a system turn get the default system prompt of the model's own chat template (SmolLM2's "You are a
helpful AI assistant named SmolLM, ..."), because generate, serve, HF and vLLM prompt through that template. Only
when the built-in renders the rest identically (token ids checked); `system_prompt: ""` turns it off; eval
follows the run."""
import json

import pytest
import yaml

from conftest import shared_path
from fastchat_ft import config
from fastchat_ft.data.template_defaults import model_default_system
from fastchat_ft.engine import data as data_mod
from test_export_fixtures import CHATML_TEMPLATE, make_tokenizer

pytestmark = pytest.mark.usefixtures("private_data_cache")

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# ChatML that adds a system turn of its own when the conversation has none (as SmolLM2's and Qwen2.5's do)
DEFAULTING = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou answer in one line.<|im_end|>\n' }}"
              "{% endif %}" + CHATML_TEMPLATE)
# the same, but its turns end with a blank line: not what the built-in chatml renders, so no default is taken
DIFFERENT = DEFAULTING.replace("<|im_end|>\n' }}{% endfor %}", "<|im_end|>\n\n' }}{% endfor %}")


def tokenizer_with(folder, template):
    tok = make_tokenizer(folder)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def test_default_system_is_taken_only_when_the_builtin_renders_the_same(tmp_path):
    assert DIFFERENT != DEFAULTING
    assert model_default_system(str(tokenizer_with(tmp_path / "d", DEFAULTING)), "chatml") == "You answer in one line."
    assert model_default_system(str(tokenizer_with(tmp_path / "p", CHATML_TEMPLATE)), "chatml") is None
    assert model_default_system(str(tokenizer_with(tmp_path / "x", DIFFERENT)), "chatml") is None
    assert model_default_system(str(tmp_path / "d"), "alpaca") is None  # a template without system turns


def test_real_tokenizers():
    assert model_default_system(str(shared_path("tokenizers", "smollm2")), "chatml") == SMOLLM_SYSTEM
    assert model_default_system(str(shared_path("tokenizers", "llama3")), "llama3") is None  # Llama 3.0 adds none


def _rows_text(run_data, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return [tok.decode([int(t) for t in run_data.train[i]["input_ids"]]) for i in range(len(run_data.train))]


def test_training_rows_carry_the_default_and_match_the_inference_prompt(tmp_path):
    from transformers import AutoTokenizer

    from fastchat_ft.inference import chat_prompt_ids

    tok_dir = tokenizer_with(tmp_path / "tok", DEFAULTING)
    convs = [{"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]},
             {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "four"},
                           {"role": "assistant", "content": "five six"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    cfg = config.from_dict({"datasets": [{"path": str(path)}], "sequence_len": 128, "sample_packing": False})
    run = data_mod.build_run_data(cfg, tok_dir)
    row = run.train[0] if len(run.train[0]["input_ids"]) > len(run.train[1]["input_ids"]) else run.train[1]
    ids, labels = [int(t) for t in row["input_ids"]], [int(t) for t in row["labels"]]
    # the conversation without a system turn: its prompt is token for token what generate would feed the model
    prompt = chat_prompt_ids(AutoTokenizer.from_pretrained(str(tok_dir)), convs[0]["messages"][:1])
    assert ids[:len(prompt)] == prompt
    assert all(x == -100 for x in labels[:len(prompt) - 1])  # the inherited system turn is never trained on
    assert run.stats["inherited_system_prompt"] == "You answer in one line."  # recorded in the run manifest
    texts = _rows_text(run, tok_dir)
    assert sum("You answer in one line." in t for t in texts) == 1  # the conversation with its own keeps it
    assert any("Be terse." in t for t in texts)

    off = config.from_dict({"datasets": [{"path": str(path)}], "sequence_len": 128, "sample_packing": False,
                            "system_prompt": ""})
    run_off = data_mod.build_run_data(off, tok_dir)
    assert not any("You answer in one line." in t for t in _rows_text(run_off, tok_dir))
    assert "inherited_system_prompt" not in run_off.stats


def test_eval_follows_the_run(tmp_path):
    import types

    from fastchat_ft.engine.evaluate import eval_system_prompt

    tok_dir = tokenizer_with(tmp_path / "tok", DEFAULTING)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    model = types.SimpleNamespace(source=types.SimpleNamespace(run_dir=run, path=run / "final", tokenizer_dir=tok_dir))
    (run / "training_config.yaml").write_text(yaml.safe_dump({"chat_template": "chatml"}))
    assert eval_system_prompt(model, "chatml") == "You answer in one line."
    (run / "training_config.yaml").write_text(yaml.safe_dump({"chat_template": "chatml", "system_prompt": ""}))
    assert eval_system_prompt(model, "chatml") == ""
