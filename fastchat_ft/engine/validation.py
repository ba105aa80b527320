"""Validation metrics on trainable tokens: loss, perplexity, token accuracy, through the fused CE (no full
logits). `evaluate(model, batches)` is the API; `fastchat-ft eval` and the train loop both call it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from fastchat_ft.engine.loss import hidden_states, lm_head_of, to_device
from fastchat_ft.kernels import fused_linear_cross_entropy


@dataclass
class EvalResult:
    loss: float          # mean next-token cross-entropy over label tokens (nats)
    ppl: float           # exp(loss)
    token_acc: float     # share of label tokens where the argmax is the label
    n_tokens: int        # label tokens evaluated
    n_sequences: int     # conversations evaluated

    def as_metrics(self, prefix: str = "val_") -> dict:
        return {f"{prefix}loss": self.loss, f"{prefix}ppl": self.ppl, f"{prefix}token_acc": self.token_acc}


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], device: torch.device | str | None = None,
             autocast_dtype: torch.dtype | None = None) -> EvalResult:
    """Token-weighted metrics over every label token of `batches` (dicts of input_ids, labels,
    position_ids [B, T]). The model is put in eval mode for the call and restored afterwards."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tok, n_correct, n_seq = 0.0, 0, 0, 0
    weight, bias, softcap = lm_head_of(model)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext())
    try:
        for raw in batches:
            batch = to_device(raw, device)
            t = batch["targets"]
            if t.labels.numel() == 0:
                continue
            with amp:
                hidden = hidden_states(model, batch)
                stats = fused_linear_cross_entropy(hidden[t.rows, t.cols], weight, t.labels, bias=bias,
                                                   reduction="sum", softcap=softcap, return_stats=True)
            total += float(stats.loss)
            n_tok += int(stats.n_valid)
            n_correct += int(stats.n_correct)
            n_seq += int(torch.unique(t.doc).numel())
    finally:
        model.train(was_training)
    loss = total / n_tok if n_tok else float("nan")
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 80.0)) if n_tok else float("nan"),
                      token_acc=n_correct / n_tok if n_tok else float("nan"), n_tokens=n_tok, n_sequences=n_seq)
