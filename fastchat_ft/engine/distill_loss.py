"""The distillation loss: a divergence between the teacher's and the student's next-token distributions
(forward KL, reverse KL or JSD, at a temperature) mixed with the label cross-entropy, computed in token chunks
so the [tokens x vocab] logits of the two models never exist for the whole batch. Plus its plain reference.

How (our choice, like the fused linear-CE kernel): a custom autograd Function computes, per chunk, both
models' logits from their hidden states and lm_heads, the divergence and CE, and the gradient with respect to
the student's logits in closed form; it turns that into d(student hidden) and d(student head) right away and
drops the chunk. Backward only scales the stored gradients. One student head matmul per chunk in forward plus
the two gradient matmuls, versus one more for checkpoint-style recomputation. Gradients w.r.t. the student's
logits z, with q = softmax(z/T), p = softmax(teacher/T):
  forward KL(p||q): (q - p) / T
  reverse KL(q||p): q * (f - KL) / T, f = log q - log p
  JSD_b = b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q: q * (g - E_q g) / T, g = (1-b)(log q - log m)
  CE at T=1: softmax(z) - onehot(label)
The loss is alpha * T^2 * divergence + (1 - alpha) * CE (T^2 keeps the soft gradient's size independent of T,
as in Hinton et al.); the divergence and CE sums are returned apart for logging.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")
# Working set of one chunk (about eight fp32 [tokens x vocab] buffers) when no chunk size is given.
DEFAULT_CHUNK_BYTES = 512 << 20


class DistillLoss(NamedTuple):
    loss: torch.Tensor        # differentiable: (alpha T^2 divergence + (1-alpha) CE) summed / num_items
    divergence: torch.Tensor  # detached sum over label tokens of the divergence at temperature T
    ce: torch.Tensor          # detached sum over label tokens of the student's CE at T=1
    n_tokens: int             # label tokens used
    n_correct: torch.Tensor   # label tokens where the student's argmax is the label


class Head(NamedTuple):
    weight: torch.Tensor      # [V, H]
    bias: torch.Tensor | None = None
    softcap: float | None = None


def _logits(x, head: Head, acc_dtype):
    """Logits of one chunk in acc_dtype (and tanh for the softcap's chain rule); head is already sliced/cast."""
    z = x @ head.weight.t()
    if head.bias is not None:
        z = z + head.bias
    z = z.to(acc_dtype)
    tanh = None
    if head.softcap is not None:
        tanh = torch.tanh(z / head.softcap)
        z = head.softcap * tanh
    return z, tanh


def _chunk(xs, s_head, xt, t_head, labels, kind, temperature, alpha, beta, acc_dtype, want_grad):
    """Divergence rows, CE rows, correct count and d(loss)/d(student raw logits) (None without want_grad)."""
    zs, tanh = _logits(xs, s_head, acc_dtype)
    with torch.no_grad():
        zt, _ = _logits(xt, t_head, acc_dtype)
        logp = torch.log_softmax(zt / temperature, dim=-1)
    del zt
    logq1 = torch.log_softmax(zs, dim=-1)
    ce = -logq1.gather(1, labels[:, None]).squeeze(1)
    correct = (zs.gather(1, labels[:, None]).squeeze(1) >= zs.max(dim=-1).values).sum()
    logq = logq1 if temperature == 1.0 else torch.log_softmax(zs / temperature, dim=-1)
    q = logq.exp()
    if kind == "forward_kl":
        p = logp.exp()
        div = (p * (logp - logq)).sum(-1)
        g = q - p if want_grad else None
    elif kind == "reverse_kl":
        f = logq - logp
        div = (q * f).sum(-1)
        g = q * (f - div[:, None]) if want_grad else None
    else:
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        div = beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)
        if want_grad:
            gq = (1 - beta) * (logq - logm)
            g = q * (gq - (q * gq).sum(-1, keepdim=True))
    if not want_grad:
        return div, ce, correct, None
    # d/dz of alpha T^2 D(z/T) is alpha T g; CE's is softmax(z) - onehot
    dz = g.mul_(alpha * temperature)
    soft1 = q if logq is logq1 else logq1.exp_()
    dz.add_(soft1, alpha=1 - alpha)
    dz[torch.arange(len(labels), device=dz.device), labels] -= 1 - alpha
    if tanh is not None:
        dz.mul_(1 - tanh * tanh)
    return div, ce, correct, dz


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, labels, grad_scale, opts):
        kind, temperature, alpha, beta, vocab, chunk, s_cap, t_cap, want_grad = opts
        ctx.grad_scale = grad_scale
        # heads sliced to the compared vocabulary and cast to the activations' dtype once, not per chunk
        s_head = Head(ws[:vocab].to(xs.dtype), None if bs is None else bs[:vocab].to(xs.dtype), s_cap)
        t_head = Head(wt[:vocab].to(xt.dtype), None if bt is None else bt[:vocab].to(xt.dtype), t_cap)
        acc_dtype = torch.promote_types(xs.dtype, torch.float32)
        n = len(labels)
        want_dx = want_grad and ctx.needs_input_grad[0]
        want_dw = want_grad and ctx.needs_input_grad[1]
        want_db = want_grad and bs is not None and ctx.needs_input_grad[2]
        div_sum = torch.zeros((), dtype=acc_dtype, device=xs.device)
        ce_sum = torch.zeros((), dtype=acc_dtype, device=xs.device)
        n_correct = torch.zeros((), dtype=torch.int64, device=xs.device)
        dx = torch.zeros_like(xs) if want_dx else None
        dw = torch.zeros((vocab, ws.shape[1]), dtype=acc_dtype, device=ws.device) if want_dw else None
        db = torch.zeros(vocab, dtype=acc_dtype, device=ws.device) if want_db else None
        with torch.autocast(device_type=xs.device.type, enabled=False):
            for start in range(0, n, chunk):
                sl = slice(start, min(n, start + chunk))
                div, ce, correct, dz = _chunk(xs[sl], s_head, xt[sl], t_head, labels[sl], kind, temperature, alpha,
                                              beta, acc_dtype, want_dx or want_dw or want_db)
                div_sum += div.sum()
                ce_sum += ce.sum()
                n_correct += correct
                if dz is None:
                    continue
                if want_dx:
                    dx[sl] = dz.to(xs.dtype) @ s_head.weight
                if want_dw:
                    # per-chunk product in the activation dtype, summed over chunks in fp32 (or fp64)
                    dw += (dz.t().to(xs.dtype) @ xs[sl]).to(acc_dtype)
                if want_db:
                    db += dz.sum(0)
                del dz
        loss = (alpha * temperature ** 2 * div_sum + (1 - alpha) * ce_sum) * grad_scale
        ctx.save_for_backward(dx, dw, db)
        ctx.shapes = (ws.shape[0], ws.dtype, None if bs is None else bs.dtype)
        ctx.mark_non_differentiable(div_sum, ce_sum, n_correct)
        return loss, div_sum, ce_sum, n_correct

    @staticmethod
    def backward(ctx, grad_loss, *_):
        dx, dw, db = ctx.saved_tensors
        rows, w_dtype, b_dtype = ctx.shapes
        scale = ctx.grad_scale * grad_loss
        grad_x = None if dx is None else (dx.to(scale.dtype) * scale).to(dx.dtype)
        grad_w = grad_b = None
        if dw is not None:
            grad_w = F.pad(dw * scale, (0, 0, 0, rows - dw.shape[0])).to(w_dtype)
        if db is not None:
            grad_b = F.pad(db * scale, (0, rows - db.shape[0])).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _check(kind, temperature, alpha, beta):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")


def _keep_labelled(student_hidden, teacher_hidden, labels, ignore_index):
    xs = student_hidden.reshape(-1, student_hidden.shape[-1])
    xt = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    y = labels.reshape(-1).to(xs.device)
    if len(y) != len(xs) or len(y) != len(xt):
        raise ValueError(f"one label per hidden row: labels {len(y)}, student rows {len(xs)}, teacher rows {len(xt)}")
    idx = (y != ignore_index).nonzero().squeeze(1)
    if idx.numel() != y.numel():
        xs, xt, y = xs.index_select(0, idx), xt.index_select(0, idx), y.index_select(0, idx)
    return xs, xt, y.long()


def default_chunk(vocab: int) -> int:
    return max(16, DEFAULT_CHUNK_BYTES // (8 * 4 * max(1, vocab)))


def distill_loss(student_hidden, student_head: Head, teacher_hidden, teacher_head: Head, labels, *,
                 kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
                 vocab: int | None = None, ignore_index: int = -100, num_items=None,
                 chunk_size: int | None = None) -> DistillLoss:
    """Chunked distillation loss at the rows whose label is not ignore_index (labels already shifted).

    student_hidden [..., Hs] with student_head.weight [Vs, Hs]; teacher_hidden [..., Ht] (no gradient) with
    teacher_head.weight [Vt, Ht]. Distributions are compared over the first `vocab` tokens (default: the
    smaller head), so a head padded past the tokenizer does not matter. loss = (alpha T^2 D + (1-alpha) CE)
    summed over label tokens, divided by num_items (default: the label-token count). Gradients reach the
    student hidden states, head weight and bias; the teacher gets none."""
    _check(kind, temperature, alpha, beta)
    vocab = vocab or min(student_head.weight.shape[0], teacher_head.weight.shape[0])
    if vocab > min(student_head.weight.shape[0], teacher_head.weight.shape[0]):
        raise ValueError(f"vocab {vocab} is larger than a head ({student_head.weight.shape[0]}, "
                         f"{teacher_head.weight.shape[0]} rows)")
    if torch.is_autocast_enabled(student_hidden.device.type):
        student_hidden = student_hidden.to(torch.get_autocast_dtype(student_hidden.device.type))
    xs, xt, y = _keep_labelled(student_hidden, teacher_hidden.detach(), labels, ignore_index)
    if y.numel() and bool(((y < 0) | (y >= vocab)).any()):
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    n = y.numel()
    denominator = float(num_items) if num_items is not None else float(max(n, 1))
    grad_scale = 1.0 / denominator if denominator > 0 else 0.0
    want_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.weight.requires_grad or (
        student_head.bias is not None and student_head.bias.requires_grad))
    opts = (kind, float(temperature), float(alpha), float(beta), vocab, chunk_size or default_chunk(vocab),
            student_head.softcap, teacher_head.softcap, want_grad)
    t_bias = None if teacher_head.bias is None else teacher_head.bias.detach()
    loss, div, ce, n_correct = _ChunkedDistill.apply(
        xs.contiguous(), student_head.weight, student_head.bias, xt.contiguous(), teacher_head.weight.detach(),
        t_bias, y, grad_scale, opts)
    if want_grad and n == 0:  # keep the graph connected: zero gradients, not None
        loss = loss + 0.0 * xs.sum()
    return DistillLoss(loss, div.detach(), ce.detach(), n, n_correct)


# ----------------------------------------------------------------------------------------------- reference

def distill_loss_reference(student_hidden, student_head: Head, teacher_hidden, teacher_head: Head, labels, *,
                           kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5,
                           beta: float = 0.5, vocab: int | None = None, ignore_index: int = -100,
                           num_items=None) -> DistillLoss:
    """The same loss from full logits with torch's own kl_div / cross_entropy and autograd (the test oracle)."""
    _check(kind, temperature, alpha, beta)
    vocab = vocab or min(student_head.weight.shape[0], teacher_head.weight.shape[0])
    xs, xt, y = _keep_labelled(student_hidden, teacher_hidden.detach(), labels, ignore_index)
    acc = torch.promote_types(xs.dtype, torch.float32)

    def logits(x, head):
        z = (x.to(acc) @ head.weight[:vocab].to(acc).t())
        if head.bias is not None:
            z = z + head.bias[:vocab].to(acc)
        return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)

    zs = logits(xs, student_head)
    with torch.no_grad():
        zt = logits(xt, Head(teacher_head.weight.detach(), teacher_head.bias, teacher_head.softcap))
    logq = F.log_softmax(zs / temperature, -1)
    logp = F.log_softmax(zt / temperature, -1)
    if kind == "forward_kl":
        div = F.kl_div(logq, logp, log_target=True, reduction="sum")
    elif kind == "reverse_kl":
        div = F.kl_div(logp, logq, log_target=True, reduction="sum")
    else:
        logm = torch.log(beta * logp.exp() + (1 - beta) * logq.exp())
        div = (beta * F.kl_div(logm, logp, log_target=True, reduction="sum")
               + (1 - beta) * F.kl_div(logm, logq, log_target=True, reduction="sum"))
    ce = F.cross_entropy(zs, y, reduction="sum")
    denominator = float(num_items) if num_items is not None else float(max(y.numel(), 1))
    loss = (alpha * temperature ** 2 * div + (1 - alpha) * ce) / denominator
    correct = (zs.gather(1, y[:, None]).squeeze(1) >= zs.max(-1).values).sum()
    return DistillLoss(loss, div.detach(), ce.detach(), int(y.numel()), correct)
