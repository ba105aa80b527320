"""ChatDataset's build streams: tokens go to disk batch by batch and come back through memory maps, so the
Python heap holds one reader batch plus a few bytes per conversation, never every token array of the file."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from conftest import shared_path
from fastchat_ft.data import ChatDataset
from fastchat_ft.data import dataset as dataset_module


@pytest.fixture(scope="module")
def smollm():
    return str(shared_path("tokenizers", "smollm2"))


def write_conversations(path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("etaoinshrdlu"), size=int(k))) for k in rng.integers(2, 9, size=3000)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            user = " ".join(rng.choice(words, size=int(rng.integers(5, 20))))
            answer = " ".join(rng.choice(words, size=int(rng.integers(60, 140))))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")


@pytest.mark.parametrize("cache", [False, True])
def test_build_never_holds_all_token_arrays(tmp_path, smollm, monkeypatch, cache):
    data = tmp_path / "chat.jsonl"
    write_conversations(data, 2500, seed=cache)
    # Warm-up on a tiny file: the tokenizer load and its one-time tables are not part of the build's window.
    warm = tmp_path / "warm.jsonl"
    write_conversations(warm, 3, seed=99)
    ChatDataset(warm, smollm, cache=False, verbose=False)
    monkeypatch.setattr(dataset_module, "BATCH_RECORDS", 32)  # a small window makes the bound sharp

    tracemalloc.start()
    try:
        ds = ChatDataset(data, smollm, cache=cache, cache_dir=tmp_path / "cache", verbose=False, self_check=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    token_bytes = 8 * ds.stats.tokens  # ids + labels, int32 each
    assert ds.stats.conversations == 2500 and ds.stats.tokens > 300_000
    # One batch of 32 conversations is ~1% of the file; holding every array would be >= 100% (200% with a concat).
    assert peak < 0.2 * token_bytes, f"build peaked at {peak} traced bytes for {token_bytes} bytes of tokens"
    assert isinstance(ds.ids, np.memmap) and isinstance(ds.labels, np.memmap)
    # Batches read back through the maps are the conversations in order of their offsets.
    item = ds[0]
    assert item["input_ids"].sum() > 0 and len(item["input_ids"]) == item["seq_lens"].sum()
    if not cache:  # the private build folder is gone; the mapping alone keeps the tokens reachable
        assert not list((tmp_path / "cache").iterdir())
        assert int(ds.ids[-1]) == int(np.asarray(ds.ids)[-1])


def test_build_then_reload_from_cache_gives_equal_batches(tmp_path, smollm):
    data = tmp_path / "chat.jsonl"
    write_conversations(data, 300, seed=3)
    built = ChatDataset(data, smollm, cache=True, cache_dir=tmp_path / "c", verbose=False, seed=5, max_seq_len=1024)
    again = ChatDataset(data, smollm, cache=True, cache_dir=tmp_path / "c", verbose=False, seed=5, max_seq_len=1024)
    fresh = ChatDataset(data, smollm, cache=False, verbose=False, seed=5, max_seq_len=1024)
    assert again.cache_entry == built.cache_entry and len(built) == len(again) == len(fresh)
    for i in range(len(built)):
        for key in ("input_ids", "labels", "position_ids", "seq_lens"):
            np.testing.assert_array_equal(built[i][key], again[i][key])
            np.testing.assert_array_equal(built[i][key], fresh[i][key])
