"""The training loss: next-token cross-entropy from the decoder's hidden states through the fused
linear+CE kernel, only at positions that carry a label (the full [tokens x vocab] logits never exist).

Normalisation is fixed per optimizer step, not per micro-batch, so micro-batch size, accumulation and
packing do not change the loss or the gradients:
  token:    sum of token losses / label tokens in the whole global batch (HF's num_items_in_batch rule)
  sequence: each conversation's mean token loss, summed / conversations in the whole global batch
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastchat_ft.engine.distributed import sum_gradients, sum_over_ranks
from fastchat_ft.kernels import fused_linear_cross_entropy
from fastchat_ft.model.attention import cuda_varlen_ready, use_packed_attention

IGNORE = -100


@dataclass
class Targets:
    """Where to read hidden states and what to predict there (the causal shift is done once, here)."""
    rows: torch.Tensor      # [N] batch row of each labelled position
    cols: torch.Tensor      # [N] position whose hidden state predicts the label
    labels: torch.Tensor    # [N] the token to predict
    doc: torch.Tensor       # [N] conversation id, unique within the micro-batch
    doc_tokens: torch.Tensor  # [N] label tokens of that conversation


def shift_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> Targets:
    """Position t predicts labels[t+1]; never across a conversation boundary (position id back to 0)."""
    nxt = labels[:, 1:]
    same_doc = position_ids[:, 1:] != 0
    valid = (nxt != IGNORE) & same_doc
    rows, cols = valid.nonzero(as_tuple=True)
    starts = (position_ids == 0).cumsum(dim=1)  # conversation index inside each row
    doc = rows * (position_ids.shape[1] + 1) + starts[rows, cols]
    _, inverse, counts = torch.unique(doc, return_inverse=True, return_counts=True)
    return Targets(rows, cols, nxt[rows, cols], inverse, counts[inverse])


def count_units(batch: dict, mode: str) -> int:
    """The denominator contributed by one micro-batch: label tokens, or conversations with any label."""
    t = batch["targets"]
    return int(t.labels.numel()) if mode == "token" else int(torch.unique(t.doc).numel())


def lm_head_of(model):
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), softcap


def packed_attention_wanted(model, device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    opted_out = os.environ.get("FASTCHAT_FT_VARLEN", "1").strip().lower() in ("0", "false", "off", "no")
    return device.type == "cuda" and not opted_out and cuda_varlen_ready(model)


def hidden_states(model, batch: dict) -> torch.Tensor:
    """The decoder's last hidden state, each packed conversation attending only to itself. An sdpa model switches
    (once) to per-conversation attention (fastchat_ft.model.attention: no [L x L] document mask): on CPU causal SDPA
    per conversation; on CUDA when the step runs in bf16/fp16 and this torch has varlen flash attention, one varlen
    call per layer for the whole batch. Otherwise on CUDA, or with FASTCHAT_FT_VARLEN=0, transformers' own path
    (sdpa with the document mask it builds from position ids that restart at 0). tests/test_engine_loss.py and
    tests/test_model_attention.py check both against unpacked forwards."""
    # On an H200 (bench/results/h200-lease2-logs/profile_engine.log, llama-1b, ~11k-token rows of 16 conversations)
    # the varlen path took 0.33 s per step against 1.0 s with the document mask, whose attention is quadratic in the
    # row. The per-conversation SDPA loop was not timed on a GPU, so CUDA without varlen keeps transformers' path.
    if packed_attention_wanted(model, batch["input_ids"].device):
        use_packed_attention(model)
    out = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return out.last_hidden_state


def loss_sum(model, batch: dict, mode: str, denominator: int | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one micro-batch already divided by the global-batch denominator (so backward of each
    micro-batch adds the right share), and the plain token-loss sum for logging."""
    t: Targets = batch["targets"]
    weight, bias, softcap = lm_head_of(model)
    hidden = hidden_states(model, batch)
    if t.labels.numel() == 0:  # keeps the graph (and DDP) consistent when a micro-batch has no labels
        zero = hidden.sum() * 0.0
        return zero, zero.detach()
    h = hidden[t.rows, t.cols]
    if mode == "token":
        total = fused_linear_cross_entropy(h, weight, t.labels, bias=bias, reduction="sum", softcap=softcap)
        return total / denominator, total.detach()
    # sequence mode: weight 1/len(conversation); one kernel call per distinct length keeps the kernel's API
    loss = h.new_zeros((), dtype=torch.float32)
    logged = h.new_zeros((), dtype=torch.float32)
    for n in torch.unique(t.doc_tokens).tolist():
        sel = t.doc_tokens == n
        part = fused_linear_cross_entropy(h[sel], weight, t.labels[sel], bias=bias, reduction="sum", softcap=softcap)
        loss = loss + part / n
        logged = logged + part.detach()
    return loss / denominator, logged


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to the device and the shifted targets computed once per micro-batch."""
    out = {k: (torch.as_tensor(v).to(device, non_blocking=True) if k in ("input_ids", "labels", "position_ids") else v)
           for k, v in batch.items()}
    for k in ("input_ids", "labels", "position_ids"):
        out[k] = out[k].long()
    out["targets"] = shift_targets(out["labels"], out["position_ids"])
    return out


def backward_step(model, batches: list[dict], mode: str, amp) -> tuple[float, int]:
    """Forward and backward over this rank's micro-batches of one optimizer step; gradients end up in .grad,
    summed over ranks. Returns the step's mean token loss (for logging) and its label-token count."""
    # Each micro-batch's summed loss is divided by the label tokens (or conversations) of the WHOLE step on
    # all ranks, so micro-batch size, accumulation, packing and world size leave loss and gradients unchanged.
    denominator = max(1, sum_over_ranks(sum(count_units(b, mode) for b in batches)))
    token_loss = 0.0
    for b in batches:
        with amp:
            loss, logged = loss_sum(model, b, mode, denominator)
        loss.backward()
        token_loss += float(logged)
    sum_gradients([p for p in model.parameters() if p.requires_grad])
    n_label = int(sum_over_ranks(sum(int(b["targets"].labels.numel()) for b in batches)))
    return sum_over_ranks(token_loss) / max(1, n_label), n_label
