"""The native loader never crashes on mutated records: each one comes back either rendered (and tokenized)
or as an error naming a line, column and reason. Differential with a Python reading of the same bytes:
a record that strict Python JSON rejects is always an error."""
from __future__ import annotations

import json
import random

import pytest

import fastchat_ft._native as native
from conftest import shared_path
from test_json import _mutate, strict_reference

SEEDS = [
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi <|im_end|>"},
                  {"role": "assistant", "content": "yo", "weight": 1}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "value": "b"}]},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                  {"role": "tool", "tool_call_id": "abcdefghi", "content": "42"},
                  {"role": "assistant", "content": "done"}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
]


@pytest.mark.parametrize("template", ["chatml", "llama3", "llama2", "mistral", "alpaca"])
def test_mutated_records_never_crash(template):
    tok = native.Tokenizer.from_file(str(shared_path("tokenizers", "smollm2", "tokenizer.json"))) \
        if hasattr(native, "Tokenizer") else None
    rng = random.Random(hash(template) & 0xFFFF)
    records = []
    for _ in range(1500):
        base = json.dumps(rng.choice(SEEDS), ensure_ascii=rng.random() < 0.5).encode()
        records.append(_mutate(rng, base) if rng.random() < 0.8 else base)
    kwargs = {"tokenizer": tok} if tok is not None else {}
    batch = native.process_records(records, template=template,
                                   threads=2, **kwargs)
    assert len(batch["ok"]) == len(records)
    errors = {e["index"]: e for e in batch["errors"]}
    assert len(errors) == (~batch["ok"]).sum()
    for i, raw in enumerate(records):
        try:
            strict_reference(raw)
            valid_json = True
        except Exception:
            valid_json = False
        if not valid_json:
            assert i in errors, raw
        if i in errors:
            e = errors[i]
            assert e["line"] >= 1 and e["reason"] and e["fix"], e
    assert 0 < len(errors) < len(records)
