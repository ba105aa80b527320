"""Torch collate for ChatDataset items: pads to a batch [B, T] (int64 input_ids, labels, position_ids) and
describes the packed documents for attention (seq_lens per row, cu_seqlens over the flattened batch); carries
each row's source lines along as a plain list (never a tensor, never a model input).
Imports torch; `fastchat_ft.data` itself does not."""
from __future__ import annotations

import numpy as np
import torch

from fastchat_ft.data.encode import NO_LABEL


def collate(items: list[dict], pad_id: int = 0, pad_to: int | None = None, pad_to_multiple_of: int = 1) -> dict:
    """Rows padded on the right to the longest row (or `pad_to`), rounded up to `pad_to_multiple_of`.
    Padding has labels -100 and counts as one extra document per row in cu_seqlens, so
    cu_seqlens[-1] == B * T and flash-attention varlen never mixes padding into a real document.
    When the items have `sources` (ChatDataset rows do), the batch's `sources` is, per row, the list of
    "file:line" of its conversations: what a NaN-loss report names."""
    longest = max(len(it["input_ids"]) for it in items)
    t = max(longest, pad_to or 0)
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    b = len(items)
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    labels = np.full((b, t), NO_LABEL, dtype=np.int64)
    position_ids = np.zeros((b, t), dtype=np.int64)
    cu = [0]
    seq_lens = []
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[r, :n] = it["input_ids"]
        labels[r, :n] = it["labels"]
        position_ids[r, :n] = it["position_ids"]
        lens = [int(x) for x in (it["seq_lens"] if "seq_lens" in it else _documents(it["position_ids"]))]
        if n < t:
            position_ids[r, n:] = np.arange(t - n)
            lens = lens + [t - n]
        seq_lens.append(torch.tensor(lens, dtype=torch.int32))
        for length in lens:
            cu.append(cu[-1] + length)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "seq_lens": seq_lens,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(max(int(s.max()) for s in seq_lens)),
    }
    if any("sources" in it for it in items):
        rows = [it.get("sources") for it in items]
        batch["sources"] = [[] if row is None else [str(s) for s in row] for row in rows]
    return batch


def _documents(position_ids) -> np.ndarray:
    """Document lengths of one packed row, from where its position_ids restart at 0: HF Trainer's default
    remove_unused_columns drops the columns forward() does not name (seq_lens among them) before the collate."""
    positions = np.asarray(position_ids)
    starts = np.flatnonzero(positions == 0)
    if not len(starts) or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.diff(np.append(starts, len(positions)))
