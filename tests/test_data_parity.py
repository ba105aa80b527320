"""Parity of the built-in templates with transformers' apply_chat_template (the reference), on every
conversation of ../shared/data/chat, through the native tokenizer and through the HF fallback; and masks
equal to HF's return_assistant_tokens_mask on the same template with {% generation %} tags added."""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest

from conftest import shared_path
from fastchat_ft.data import encode_chat
from fastchat_ft.errors import DataError

# The Llama-2 chat template as Meta's HF repos ship it (the shared llama2 folder has none).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# (built-in template, shared tokenizer folder, extra encode_chat options)
CASES = [
    ("chatml", "smollm2", {"system_prompt": SMOLLM_SYSTEM}),
    ("chatml", "gpt2", {}),
    ("llama3", "llama3", {}),
    ("llama2", "llama2", {}),
    ("mistral", "mistral-v0.3", {}),
]
CHAT_FILES = [
    "openai_toy_chat_fine_tuning_copy_mlteam.jsonl",
    "mlteam_weather_chat_fine_tuning_toolcalls.jsonl",
    "llamafactory_v1_sft_demo_messages.jsonl",
    "torchtune_chat_tiny_sharegpt.json",
    "fastchat_dummy_conversation_sharegpt.json",
    "axolotl_fixtures/conversation.json",
]
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def load_conversations(name: str) -> list[list[dict]]:
    """All conversations of a shared file as OpenAI messages (ShareGPT converted, text parts joined)."""
    path = shared_path("chat", name)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    elif name.endswith(".json"):
        records = [json.loads(text)]
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for r in records:
        if "conversations" in r:
            out.append([{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]])
            continue
        msgs = []
        for m in r["messages"]:
            m = dict(m)
            if isinstance(m.get("content"), list):
                m["content"] = "".join(p.get("text", p.get("value", "")) for p in m["content"])
            msgs.append(m)
        out.append(msgs)
    return out


@lru_cache(maxsize=None)
def reference(folder: str):
    """transformers' tokenizer for a shared folder, with its chat template (or the known one)."""
    from transformers import PreTrainedTokenizerFast
    base = shared_path("tokenizers", folder)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"),
                                  bos_token=cfg.get("bos_token"), eos_token=cfg.get("eos_token"))
    if (base / "chat_template.jinja").is_file():
        tok.chat_template = (base / "chat_template.jinja").read_text()
    elif cfg.get("chat_template"):
        tok.chat_template = cfg["chat_template"]
    else:
        tok.chat_template = LLAMA2_TEMPLATE
    return tok


def reference_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@lru_cache(maxsize=None)
def hf_fallback(folder: str):
    import tokenizers
    from fastchat_ft.data.tokenize import LoaderTokenizer
    base = shared_path("tokenizers", folder)
    t = LoaderTokenizer(hf=tokenizers.Tokenizer.from_file(str(base / "tokenizer.json")), path=str(base / "tokenizer.json"))
    t._read_config(base)
    t._set_fingerprint()
    return t


def ours(folder: str, backend: str):
    if backend == "native":
        from fastchat_ft import _native
        if not hasattr(_native, "Tokenizer"):
            pytest.skip("native tokenizer not built")
        return str(shared_path("tokenizers", folder))
    return hf_fallback(folder)


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("template, folder, options", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_input_ids_equal_apply_chat_template_on_every_shared_conversation(template, folder, options, backend):
    ref = reference(folder)
    tok = ours(folder, backend)
    compared = refused_both = 0
    for name in CHAT_FILES:
        for messages in load_conversations(name):
            uses_tools = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
            try:
                expected = reference_ids(ref, messages)
            except Exception:  # the reference template refuses (roles, None content, tool-call ids)
                expected = None
            try:
                ids, labels = encode_chat(messages, tok, template=template, **options)
            except DataError:
                # We may refuse only what the reference refuses too.
                assert expected is None, f"{name}: refused a conversation the reference renders: {messages!r:.300}"
                refused_both += 1
                continue
            if expected is None or uses_tools:
                # The reference cannot render it (or renders tool calls as 'None'): our tool rendering is ours.
                continue
            assert ids.tolist() == expected, f"{name}: ids differ for {messages!r:.300}"
            assert labels.shape == ids.shape and (labels != -100).any()
            compared += 1
    assert compared >= 500, (compared, refused_both)


# The same templates with {% generation %} around what should be trained, for HF's assistant mask.
TAGGED = {
    "gpt2": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
             "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
             "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"),
    "llama3": ("{{- bos_token }}{% for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
               "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
               "{{- message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"),
    "llama2": LLAMA2_TEMPLATE.replace(
        "{{ ' '  + content.strip() + ' ' + eos_token }}",
        "{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endgeneration %}"),
}


@pytest.mark.parametrize("template, folder", [("chatml", "gpt2"), ("llama3", "llama3"), ("llama2", "llama2")])
def test_labels_equal_hf_assistant_tokens_mask(template, folder):
    ref = reference(folder)
    tagged = TAGGED[folder]
    checked = 0
    for name in ["openai_toy_chat_fine_tuning_copy_mlteam.jsonl", "fastchat_dummy_conversation_sharegpt.json",
                 "llamafactory_v1_sft_demo_messages.jsonl"]:
        for messages in load_conversations(name)[:120]:
            try:
                out = ref.apply_chat_template(messages, chat_template=tagged, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
            except Exception:
                continue
            ids, labels = encode_chat(messages, ours(folder, "native"), template=template)
            assert ids.tolist() == list(out["input_ids"])
            mask = np.asarray(out["assistant_masks"], dtype=bool)
            assert np.array_equal(labels != -100, mask), f"{name}: mask differs for {messages!r:.200}"
            assert np.array_equal(labels[mask], ids[mask])
            checked += 1
    assert checked >= 200
