"""Causal attention within each conversation of packed rows, fp32 on CPU, through the native kernel
(csrc/cpu_attention.cc): one call per layer for all conversations and heads, forward and backward, instead of one
torch SDPA call per conversation (which on 50-300-token conversations runs at a few percent of the CPU's GEMM rate,
bench/profile_step.py). The model's attention function (model/attention.py) routes here; FASTCHAT_FT_CPU_ATTENTION=0
turns it off (torch's SDPA per conversation again).

Inputs and output are token-major ([tokens, heads, head_dim]), the layout the q/k/v projections write and the
output projection reads, so no transposes are copied either way.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fastchat_ft import _native

# Longer conversations go to torch's SDPA: the kernel keeps a [length x length] score matrix per thread, which
# beyond ~1k tokens no longer sits in cache, where torch's flash kernel works in blocks.
MAX_LENGTH = 1024
MAX_HEAD_DIM = 256


def enabled() -> bool:
    return os.environ.get("FASTCHAT_FT_CPU_ATTENTION", "1") != "0" and hasattr(_native, "attention_forward")


def usable(query: torch.Tensor, key: torch.Tensor, dropout: float, longest: int) -> bool:
    """Whether this call can run natively: CPU fp32 without attention dropout, a head size and conversation length
    within the kernel's limits, query heads a multiple of kv heads. query [B, H, L, D], key [B, KV, L, D]."""
    return key.dtype == torch.float32 and key.device == query.device and usable_for(
        query.device, query.dtype, query.shape[1], key.shape[1], query.shape[-1], dropout, longest)


def usable_for(device, dtype, heads: int, kv_heads: int, head_dim: int, dropout: float, longest: int) -> bool:
    """usable() from the sizes alone, before any projection has run."""
    return (device.type == "cpu" and dtype == torch.float32 and not dropout and head_dim <= MAX_HEAD_DIM
            and longest <= MAX_LENGTH and heads % kv_heads == 0 and enabled())


def _pointers(cos, sin):
    return (0, 0) if cos is None else (cos.data_ptr(), sin.data_ptr())


class _PackedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, starts, lengths, scale, cos, sin):
        tokens, heads, head_dim = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(tokens, heads, dtype=torch.float32, device=q.device)
        _native.attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), starts,
                                  lengths, heads, k.shape[1], head_dim, scale, torch.get_num_threads(),
                                  *_pointers(cos, sin))
        ctx.save_for_backward(q, k, v, out, lse, cos, sin)
        ctx.segments, ctx.scale = (starts, lengths), scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        # contiguous(): a no-op, unless saved-tensor hooks hand back another layout than the one saved
        saved = ctx.saved_tensors  # once: activation checkpointing allows one unpack
        q, k, v, out, lse = (t.contiguous() for t in saved[:5])
        cos, sin = (None, None) if saved[5] is None else (t.contiguous() for t in saved[5:])
        tokens, heads, head_dim = q.shape
        kv_heads = k.shape[1]
        dout = dout.contiguous()
        dq, dk_h, dv_h = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
        _native.attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                   dout.data_ptr(), dq.data_ptr(), dk_h.data_ptr(), dv_h.data_ptr(), *ctx.segments,
                                   heads, kv_heads, head_dim, ctx.scale, torch.get_num_threads(), *_pointers(cos, sin))
        if heads != kv_heads:  # the query heads sharing a kv head each wrote their own part: sum them
            group = heads // kv_heads
            dk_h = dk_h.view(tokens, kv_heads, group, head_dim).sum(2)
            dv_h = dv_h.view(tokens, kv_heads, group, head_dim).sum(2)
        return dq, dk_h, dv_h, None, None, None, None, None


def packed_causal_attention(q, k, v, starts, lengths, scale: float, cos=None, sin=None) -> torch.Tensor:
    """q [tokens, heads, D], k and v [tokens, kv_heads, D] (fp32, CPU); conversation i is tokens
    starts[i] .. starts[i] + lengths[i], and the conversations cover every token. Returns [tokens, heads, D]:
    softmax(scale q k^T) v, causal within each conversation. Differentiable in q, k, v. With cos and sin
    ([tokens, D], no gradient) q and k are first rotated as HF's Llama apply_rotary_pos_emb does, inside the
    kernel: no rotated copies of q and k are made or kept."""
    starts = np.ascontiguousarray(starts, dtype=np.int64).reshape(-1)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64).reshape(-1)
    tokens = q.shape[0]
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != q.shape[2] \
            or q.shape[1] % k.shape[1]:
        raise ValueError(f"shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for t in (q, k, v) + (() if cos is None else (cos, sin)):  # the kernel reads and writes fp32 CPU memory
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"the native CPU attention takes fp32 CPU tensors, got {t.dtype} on {t.device}")
    if starts.shape != lengths.shape:
        raise ValueError(f"{starts.size} conversation starts but {lengths.size} lengths")
    order = np.argsort(starts, kind="stable")
    ends = starts[order] + lengths[order]
    if (lengths <= 0).any() or (starts.size == 0 and tokens) or (starts.size and (
            starts[order[0]] != 0 or ends[-1] != tokens or (starts[order[1:]] != ends[:-1]).any())):
        raise ValueError(f"conversations (starts, lengths) must cover the {tokens} tokens once each")
    if (cos is None) != (sin is None):
        raise ValueError("rotary needs both cos and sin")
    if cos is not None:
        if cos.shape != (tokens, q.shape[2]) or sin.shape != cos.shape or q.shape[2] % 2:
            raise ValueError(f"cos and sin must be [{tokens}, {q.shape[2]}] (even head size), "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
        cos, sin = cos.detach().contiguous(), sin.detach().contiguous()
    return _PackedCausalAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), starts, lengths, float(scale),
                                        cos, sin)


# ----------------------------------------------------------------------------------------------- reference

def packed_causal_attention_reference(q, k, v, starts, lengths, scale: float, cos=None, sin=None) -> torch.Tensor:
    """Plain torch, any dtype: what packed_causal_attention computes, as HF does it. q and k rotated as Llama's
    apply_rotary_pos_emb does (x * cos + rotate_half(x) * sin) when cos and sin are given, then causal SDPA on each
    conversation alone."""
    if cos is not None:
        half = q.shape[-1] // 2
        q, k = ((x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]) for x in (q, k))
    out = torch.empty_like(q)
    for s, n in zip(starts, lengths):
        part = [t[s:s + n].transpose(0, 1)[None] for t in (q, k, v)]
        out[s:s + n] = torch.nn.functional.scaled_dot_product_attention(
            *part, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])[0].transpose(0, 1)
    return out
