"""template="tokenizer": the model's own Jinja chat_template. Ids equal apply_chat_template; masks equal the
built-in templates' (themselves checked against HF) on templates without {% generation %}, equal HF's
return_assistant_tokens_mask on templates with it; a reasoning template's history policy is followed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_path
from fastchat_ft.data import ChatDataset, encode_chat
from fastchat_ft.data.tokenize import LoaderTokenizer
from test_data_parity import load_conversations, reference, reference_ids

FILES = ["openai_toy_chat_fine_tuning_copy_mlteam.jsonl", "fastchat_dummy_conversation_sharegpt.json",
         "llamafactory_v1_sft_demo_messages.jsonl"]


@pytest.mark.parametrize("folder, builtin, options", [
    ("smollm2", "chatml", {"system_prompt": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}),
    ("gpt2", "chatml", {}),
    ("llama3", "llama3", {}),
    ("mistral-v0.3", "mistral", {}),
])
def test_model_template_ids_match_hf_and_masks_match_builtin(folder, builtin, options):
    tok = str(shared_path("tokenizers", folder))
    ref = reference(folder)
    checked = 0
    for name in FILES:
        for messages in load_conversations(name)[:60]:
            try:
                expected = reference_ids(ref, messages)
            except Exception:
                continue
            ids, labels = encode_chat(messages, tok, template="tokenizer")
            assert ids.tolist() == expected
            b_ids, b_labels = encode_chat(messages, tok, template=builtin, **options)
            assert np.array_equal(ids, b_ids) and np.array_equal(labels, b_labels), messages
            checked += 1
    assert checked >= 100


def test_generation_tags_give_hf_assistant_mask(tmp_path):
    from test_data_parity import TAGGED
    base = shared_path("tokenizers", "llama3")
    folder = tmp_path / "tagged"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_bytes((base / "tokenizer_config.json").read_bytes())
    (folder / "chat_template.jinja").write_text(TAGGED["llama3"])
    ref = reference("llama3")
    for messages in load_conversations(FILES[0])[:8]:
        out = ref.apply_chat_template(messages, chat_template=TAGGED["llama3"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, labels = encode_chat(messages, str(folder), template="tokenizer")
        assert ids.tolist() == list(out["input_ids"])
        assert np.array_equal(labels != -100, np.asarray(out["assistant_masks"], dtype=bool))


QWEN3_LIKE = (
    "{%- set ns = namespace(last_query=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- set i = (messages|length - 1) - loop.index0 %}"
    "{%- if m.role == 'user' and ns.last_query == messages|length - 1 %}{%- set ns.last_query = i %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{%- set c = m.content %}"
    "{%- if loop.index0 < ns.last_query and '</think>' in c %}{%- set c = c.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{{- '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)


def test_reasoning_template_history_policy_and_generation_prompt_untrained(tmp_path):
    base = shared_path("tokenizers", "smollm2")
    folder = tmp_path / "qwen3ish"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    (folder / "chat_template.jinja").write_text(QWEN3_LIKE)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r1</think>\nA1"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>r2</think>\nA2"}]
    ids, labels = encode_chat(msgs, str(folder), template="tokenizer")
    tok = LoaderTokenizer.from_any(str(folder))
    text = tok.decode(ids)
    assert "r1" not in text and "<think>r2</think>" in text  # as the template renders it at inference
    assert tok.decode(ids[labels != -100]) == "A1<|im_end|><think>r2</think>\nA2<|im_end|>"
    # A conversation whose last assistant turn has no reasoning: the generation prompt's empty think block
    # is supplied at inference, so it is not in the trained span (it is not in the rendered history either).
    ids, labels = encode_chat(msgs[:2], str(folder), template="tokenizer")
    assert tok.decode(ids[labels != -100]) == "<think>r1</think>\nA1<|im_end|>"


def test_dataset_with_model_template(tmp_path):
    tok = str(shared_path("tokenizers", "smollm2"))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in load_conversations(FILES[0])) + "\n")
    ds = ChatDataset(path, tok, template="tokenizer", cache=False, verbose=False)
    builtin = ChatDataset(path, tok, template="chatml", system_prompt="You are a helpful AI assistant named SmolLM, "
                          "trained by Hugging Face", cache=False, verbose=False)
    assert ds.stats.conversations == builtin.stats.conversations and ds.stats.self_check_failed == 0
    assert np.array_equal(ds.ids, builtin.ids) and np.array_equal(ds.labels, builtin.labels)
