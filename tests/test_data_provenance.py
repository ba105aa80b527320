"""Every conversation of a ChatDataset knows its source ("file:line"): each packed row lists them, in seq_lens
order, and decoding a row's conversations finds the text of the record at that file:line (native, HF and
Jinja paths; JSONL with skipped lines and JSON arrays; cached or not); collate carries them per row; the
loader's inexact-mask report names file:line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from fastchat_ft.data import ChatDataset
from fastchat_ft.data.collate import collate


@pytest.fixture(scope="module")
def smollm():
    return str(shared_path("tokenizers", "smollm2"))


@pytest.fixture(scope="module")
def hf_tok(smollm):
    import tokenizers
    return tokenizers.Tokenizer.from_file(f"{smollm}/tokenizer.json")


def conv(marker: str, assistant: bool = True) -> dict:
    msgs = [{"role": "user", "content": f"question {marker}"}]
    if assistant:
        msgs.append({"role": "assistant", "content": f"answer {marker}"})
    return {"messages": msgs}


def write_files(tmp_path, seed: int):
    """A JSONL file with blank lines, a broken line and a record with nothing to train (so line != index + 1),
    and a JSON array file with one element per line. Returns the paths and {(file, line): marker} of every
    record that must be kept."""
    rng = np.random.default_rng(seed)
    lines, expected = [], {}
    jsonl = tmp_path / "chat.jsonl"
    for i in range(int(rng.integers(25, 40))):
        kind = rng.integers(0, 6)
        if kind == 0:
            lines.append("")
        elif kind == 1:
            lines.append('{"messages": [broken')
        elif kind == 2:
            lines.append(json.dumps(conv(f"u{i}", assistant=False)))
        else:
            marker = f"m{seed}x{i}z"
            lines.append(json.dumps(conv(marker)))
            expected[(str(jsonl), len(lines))] = marker
    jsonl.write_text("\n".join(lines) + "\n")
    array = tmp_path / "chat.json"
    records = [conv(f"a{seed}y{i}z") for i in range(int(rng.integers(3, 9)))]
    array.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    for i, r in enumerate(records):
        expected[(str(array), i + 2)] = r["messages"][1]["content"].split()[1]
    return [jsonl, array], expected


def check_rows(ds, expected, decode):
    seen = []
    for row in ds:
        assert len(row["sources"]) == len(row["seq_lens"])
        start = 0
        for source, n in zip(row["sources"], row["seq_lens"]):
            file, _, line = source.rpartition(":")
            text = decode(row["input_ids"][start:start + int(n)].tolist())
            assert expected[(file, int(line))] in text, (source, text)
            start += int(n)
        seen.extend(row["sources"])
    assert sorted(seen) == sorted(f"{file}:{line}" for file, line in expected)  # each one exactly once


@pytest.mark.parametrize("path", ["native", "hf", "jinja"])
@pytest.mark.parametrize("packing", [True, False])
def test_every_row_names_the_lines_its_conversations_came_from(tmp_path, smollm, hf_tok, path, packing):
    files, expected = write_files(tmp_path, seed=len(path) * 7 + packing)
    tok = hf_tok if path == "hf" else smollm
    ds = ChatDataset(files, tok, template="tokenizer" if path == "jinja" else "chatml", max_seq_len=97,
                     packing=packing, seed=3, on_error="skip", rejects_path=tmp_path / "rejects.jsonl",
                     cache=False, verbose=False)
    assert ds.stats.conversations == len(expected)
    check_rows(ds, expected, hf_tok.decode)
    if packing:
        assert any(len(row["sources"]) > 1 for row in ds)  # rows really hold several conversations


def test_sources_survive_the_cache_and_follow_the_file_when_it_moves(tmp_path, smollm, hf_tok):
    files, expected = write_files(tmp_path, seed=11)
    cache = tmp_path / "cache"
    kw = dict(max_seq_len=128, on_error="skip", rejects_path=tmp_path / "r.jsonl", cache_dir=cache, verbose=False)
    built = ChatDataset(files, smollm, **kw)
    loaded = ChatDataset(files, smollm, **kw)
    assert loaded.cache_entry == built.cache_entry and isinstance(loaded.sources, np.memmap)
    assert [r["sources"] for r in loaded] == [r["sources"] for r in built]
    check_rows(loaded, expected, hf_tok.decode)
    assert sorted(loaded.source(i) for i in range(len(loaded.sources))) == sorted(f"{f}:{n}" for f, n in expected)
    # Same contents and names elsewhere: the cache entry is reused, and the sources name the new paths.
    moved = tmp_path / "moved"
    moved.mkdir()
    new_files = [shutil.copy(f, moved / f.name) for f in files]
    again = ChatDataset(new_files, smollm, **kw)
    assert again.cache_entry == built.cache_entry
    check_rows(again, {(str(moved / Path(f).name), line): m for (f, line), m in expected.items()}, hf_tok.decode)


def test_collate_carries_sources_per_row_and_no_tensor_of_them(tmp_path, smollm):
    files, _ = write_files(tmp_path, seed=5)
    ds = ChatDataset(files, smollm, max_seq_len=64, on_error="skip", rejects_path=tmp_path / "r.jsonl",
                     cache=False, verbose=False)
    items = [ds[i] for i in range(min(3, len(ds)))]
    batch = collate(items)
    assert batch["sources"] == [it["sources"] for it in items]
    assert all(isinstance(s, str) for row in batch["sources"] for s in row)
    assert batch["input_ids"].shape[0] == len(items)
    plain = collate([{k: v for k, v in it.items() if k != "sources"} for it in items])
    assert "sources" not in plain  # rows from elsewhere (synthetic, other tools) still collate


def test_inexact_masks_are_reported_with_file_and_line(tmp_path, smollm, capsys):
    path = tmp_path / "inexact.jsonl"
    contents = ["plain answer", "fine", "\n\nstarts with blank lines", "also fine"]
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": c}]}) for c in contents) + "\n")
    # "assistant\n" + "\n\n..." merges into one token across the span boundary: line 3 is inexact
    ds = ChatDataset(path, smollm, cache=False, verbose=True)
    assert ds.stats.inexact == 1
    assert ds.stats.examples == [f"{path}:3: a token straddles a trainable-span boundary"]
    assert f"{path}:3: a token straddles" in capsys.readouterr().err


def test_failed_self_checks_are_reported_with_file_and_line(tmp_path, smollm, monkeypatch):
    """The self-check compares decoded trained tokens with the rendered answers; plant a failure on one record
    (the real check passes on clean data) and the report must point at that record's file:line."""
    from fastchat_ft.data import encode

    real = encode.self_check
    monkeypatch.setattr(encode, "self_check", lambda ids, labels, text, spans, tok:
                        "planted mismatch" if "PLANTED" in text else real(ids, labels, text, spans, tok))
    path = tmp_path / "check.jsonl"
    lines = [json.dumps(conv("PLANTED" if i == 6 else f"ok{i}")) if i != 3 else "" for i in range(1, 9)]
    path.write_text("\n".join(lines) + "\n")
    ds = ChatDataset(path, smollm, cache=False, verbose=False)
    assert ds.stats.self_check_failed == 1
    assert ds.stats.examples == [f"{path}:6: planted mismatch"]
