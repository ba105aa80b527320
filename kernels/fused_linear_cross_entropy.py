"""Fused linear + cross-entropy: the LM-head loss from hidden states and the head weight without ever holding
the [tokens x vocab] logits. Owns the Triton row kernel, the chunked launcher, the autograd Function, the CPU
path in torch ops (same design, gradients formed in forward) and the checkpointed torch reference (the float64
path and the tests' oracle). Patching models to use it lives in fastchat_ft/model/.

Design (see ../shared/notes/kernels.md): rows whose label is ignore_index are dropped up front; the kept rows
are processed in large token chunks (a memory budget, not a fixed chunk count, so cost scales with tokens and
a small batch is one chunk). Per chunk: logits = x W^T (+b) by cuBLAS, one Triton program per row computes
loss, lse and accuracy with an online softmax and overwrites the logits with dLoss/dlogits (target-class term
formed in fp32), then dx = g W and dW += g^T x into an fp32 accumulator. Gradients are computed in forward;
backward scales them by grad_output and casts (one pass).
"""
from typing import NamedTuple

import threading

import torch
from torch.utils.checkpoint import checkpoint

from ._triton import autocast_input, cdiv, kernel, next_power_of_2, no_autocast, tl, use_triton

# Largest chunk of logits (bytes) held at once on the Triton path. Big chunks keep the [V, H] fp32 gradient
# read-modify-write rare (one per chunk); 1 GiB is 4096 tokens at V=128256 in bf16.
DEFAULT_CHUNK_BYTES = 1 << 30
# Chunk of tokens for the CPU reference (bounds the fp32 logits held on CPU).
REFERENCE_CHUNK_TOKENS = 1024


class CrossEntropyStats(NamedTuple):
    """Returned with return_stats=True. n_valid and n_correct are int64 tensors on the input's device (no host
    sync); token accuracy is n_correct / n_valid. A token is correct when its label's logit is the row maximum."""
    loss: torch.Tensor
    n_valid: torch.Tensor
    n_correct: torch.Tensor


# ----------------------------------------------------------------------------------------------- kernels

@kernel
def _ce_rows_kernel(
    logits_ptr, logits_stride, labels_ptr, loss_ptr, correct_ptr, grad_scale_ptr,
    n_cols, softcap, z_loss, smoothing,
    HAS_SOFTCAP: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # One program per row; int64 row offset because rows * V passes 2^31 at realistic sizes.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    # Scalars are cast here: a Python float can arrive as fp64 (torch.compile), which breaks the fp32 loop.
    cap = tl.cast(softcap, tl.float32)
    inv_cap = 1.0 / cap
    zl = tl.cast(z_loss, tl.float32)
    ls = tl.cast(smoothing, tl.float32)
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: online max / sum-exp, and the label's logit taken from the same computed values as the max so
    # the accuracy test (label logit == row max) compares identical numbers.
    # d_other (the sum without the label) gives p_y - 1 = -d_other / d without cancellation as p_y -> 1.
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.zeros([], tl.float32)
    d_other = tl.zeros([], tl.float32)
    x_label = tl.zeros([], tl.float32)
    x_sum = tl.zeros([], tl.float32)  # for label smoothing's uniform term
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            # tanh from exp: libdevice tanh does not run under the interpreter.
            x = cap * (1.0 - 2.0 / (tl.exp(2.0 * x * inv_cap) + 1.0))
        x = tl.where(mask, x, float("-inf"))
        is_label = cols == label
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        d = d * alpha + tl.sum(e, 0)
        d_other = d_other * alpha + tl.sum(tl.where(is_label, 0.0, e), 0)
        m = m_new
        x_label += tl.sum(tl.where(is_label, x, 0.0), 0)
        if HAS_SMOOTHING:
            x_sum += tl.sum(tl.where(mask, x, 0.0), 0)
    # Keep lse split as m + log_d: near p_y -> 1 the gradient p_y - 1 is ~log_d, which m + log_d rounded at
    # the magnitude of m (fp32 spacing ~2e-6 at 16) would lose.
    log_d = tl.log(d)
    lse = m + log_d
    loss = (m - x_label) + log_d
    if HAS_SMOOTHING:
        # (1 - ls) * (lse - x_y) + ls * (lse - mean(x)), as torch's cross_entropy(label_smoothing=ls)
        loss = (1.0 - ls) * loss + ls * (lse - x_sum / n_cols)
    if HAS_Z_LOSS:
        loss += zl * lse * lse
    tl.store(loss_ptr + row, loss)
    tl.store(correct_ptr + row, (x_label >= m).to(tl.int32))

    if WRITE_GRAD:
        # Pass 2: dLoss/dlogit = p * (1 + 2 z lse) - onehot, times the softcap derivative, times the
        # reduction scale, all in fp32 and rounded once at the store (the target term never sees bf16;
        # at the label it is -d_other/d + 2 z lse p_y, which equals p_y (1 + 2 z lse) - 1; label smoothing
        # subtracts ls/V everywhere and adds ls back at the label).
        scale = tl.load(grad_scale_ptr).to(tl.float32)
        p_factor = 1.0
        if HAS_Z_LOSS:
            p_factor = 1.0 + 2.0 * zl * lse
        p_label = tl.exp((x_label - m) - log_d)
        g_label = -d_other / d + (p_factor - 1.0) * p_label
        uniform = 0.0
        if HAS_SMOOTHING:
            # targets (1 - ls) onehot + ls / V: every column loses ls / V, the label gets ls back
            uniform = ls / n_cols
            g_label += ls
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = 1.0 - 2.0 / (tl.exp(2.0 * x * inv_cap) + 1.0)
                x = cap * t
            g = tl.exp((x - m) - log_d) * p_factor - uniform
            g = tl.where(cols == label, g_label - uniform, g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(row_ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


@kernel
def _scale_cast_kernel(src_ptr, dst_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    # dst = (src * scale) in dst's dtype: the backward's one pass over the fp32 weight-gradient accumulator.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr).to(tl.float32)
    v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (v * scale).to(dst_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- launchers

def _launch_ce_rows(logits, labels, loss_out, correct_out, grad_scale, softcap, z_loss, write_grad, block_v,
                    label_smoothing=0.0):
    n_rows, n_cols = logits.shape
    if block_v is None:
        block_v = min(8192, next_power_of_2(n_cols))
    _ce_rows_kernel.on(logits.device)[(n_rows,)](
        logits, logits.stride(0), labels, loss_out, correct_out, grad_scale,
        n_cols, float(softcap or 1.0), float(z_loss), float(label_smoothing),
        HAS_SOFTCAP=softcap is not None, HAS_Z_LOSS=z_loss != 0.0, HAS_SMOOTHING=label_smoothing != 0.0,
        WRITE_GRAD=write_grad, BLOCK_V=block_v,
        num_warps=16 if block_v >= 4096 else 8,
    )


def _scale_cast(src, scale, dtype):
    """(src * scale).to(dtype), scale a 0-d tensor (no host sync)."""
    dst = torch.empty(src.shape, dtype=dtype, device=src.device)
    n = src.numel()
    if n:
        block = 4096
        _scale_cast_kernel.on(src.device)[(cdiv(n, block),)](
            src, dst, scale.to(torch.float32).reshape(1), n, BLOCK=block, num_warps=8)
    return dst


_OUT_DTYPE_MODE: dict = {}


def _accumulate_fp32(acc, a, b, first):
    """acc (fp32) = [acc +] a @ b, with the product accumulated in fp32 even for bf16/fp16 a, b.
    On CUDA this uses addmm's out_dtype (torch>=2.8) straight into acc; the mode is probed once per device."""
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, beta=0.0 if first else 1.0, out=acc)
        return
    if acc.is_cuda:
        mode = _OUT_DTYPE_MODE.get(acc.device)
        if mode is None:
            mode = _OUT_DTYPE_MODE[acc.device] = _probe_out_dtype(acc.device, a.dtype)
        if mode == "addmm_out":
            torch.addmm(acc, a, b, out_dtype=torch.float32, beta=0.0 if first else 1.0, out=acc)
            return
        if mode == "mm":
            prod = torch.mm(a, b, out_dtype=torch.float32)
            if first:
                acc.copy_(prod)
            else:
                acc.add_(prod)
            return
    torch.addmm(acc, a.float(), b.float(), beta=0.0 if first else 1.0, out=acc)


def _probe_out_dtype(device, dtype):
    a = torch.randn(64, 32, device=device).to(dtype)
    b = torch.randn(32, 48, device=device).to(dtype)
    want = a.float() @ b.float()
    try:
        acc = torch.full((64, 48), float("nan"), device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=0.0, out=acc)
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=1.0, out=acc)
        if torch.allclose(acc, 2 * want, rtol=1e-3, atol=1e-3):
            return "addmm_out"
    except (RuntimeError, TypeError):
        pass
    try:
        if torch.allclose(torch.mm(a, b, out_dtype=torch.float32), want, rtol=1e-3, atol=1e-3):
            return "mm"
    except (RuntimeError, TypeError):
        pass
    return "upcast"


def _default_chunk_rows(n_rows, n_cols, dtype):
    rows = DEFAULT_CHUNK_BYTES // max(1, n_cols * torch.finfo(dtype).bits // 8)
    rows = max(256, rows // 256 * 256)
    return max(1, min(n_rows, rows))


def _flce_chunks(x, weight, bias, labels, grad_scale, softcap, z_loss, label_smoothing, want_dx, want_dw, want_db,
                 chunk_rows, block_v):
    """Loss per row, correctness per row and (if asked) dx, fp32 dW, fp32 db for the kept rows `x`."""
    n, _ = x.shape
    vocab = weight.shape[0]
    device = x.device
    loss_rows = torch.empty(n, dtype=torch.float32, device=device)
    correct = torch.empty(n, dtype=torch.int32, device=device)
    write_grad = want_dx or want_dw or want_db
    dx = torch.empty_like(x) if want_dx else None
    dw32 = torch.empty(weight.shape, dtype=torch.float32, device=device) if want_dw else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=device) if want_db else None
    if n == 0:
        if dw32 is not None:
            dw32.zero_()
        return loss_rows, correct, dx, dw32, db32
    chunk = chunk_rows or _default_chunk_rows(n, vocab, x.dtype)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        xc = x[start:end]
        logits = torch.addmm(bias, xc, weight.t()) if bias is not None else torch.mm(xc, weight.t())
        _launch_ce_rows(logits, labels[start:end], loss_rows[start:end], correct[start:end], grad_scale,
                        softcap, z_loss, write_grad, block_v, label_smoothing)
        if want_dx:
            torch.mm(logits, weight, out=dx[start:end])
        if want_dw:
            _accumulate_fp32(dw32, logits.t(), xc, first=start == 0)
        if want_db:
            db32 += logits.sum(0, dtype=torch.float32)
        del logits
    return loss_rows, correct, dx, dw32, db32


# ----------------------------------------------------------------------------------------------- autograd

class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, grad_scale, softcap, z_loss, label_smoothing, chunk_rows, block_v):
        want_dx, want_dw, want_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        w = weight if weight.dtype == x.dtype else weight.to(x.dtype)  # autocast: fp32 master, bf16 activations
        b = None if bias is None else (bias if bias.dtype == x.dtype else bias.to(x.dtype))
        # fp16 has no exponent range below ~6e-8: dLoss/dlogit ~ p / n_tokens (p ~ 1/V) would flush to zero if the
        # reduction scale were applied before the fp16 store, so fp16 stores p - onehot unscaled (|g| <= 1) and
        # the scale is applied in fp32 in backward (seen on an H200: fp16 grads off by >5e-3 of their max)
        deferred = grad_scale if x.dtype == torch.float16 else None
        kernel_scale = torch.ones_like(grad_scale) if deferred is not None else grad_scale
        with no_autocast(x.device):
            loss_rows, correct, dx, dw32, db32 = _flce_chunks(
                x, w, b, labels, kernel_scale, softcap, z_loss, label_smoothing, want_dx, want_dw, want_db,
                chunk_rows, block_v)
        loss = loss_rows.sum() * grad_scale
        ctx.save_for_backward(dx, dw32, db32, deferred)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        n_correct = correct.sum(dtype=torch.int64)
        ctx.mark_non_differentiable(n_correct)
        return loss, n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        dx, dw32, db32, deferred = ctx.saved_tensors
        g = grad_loss.reshape(()).float()
        if deferred is not None:
            g = g * deferred
        grad_x = grad_w = grad_b = None
        if dx is not None:
            grad_x = _scale_cast(dx, g, dx.dtype)
        if dw32 is not None:
            grad_w = _scale_cast(dw32, g, ctx.weight_dtype)
        if db32 is not None:
            grad_b = (db32 * g).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------- public API

def _validate(hidden, weight, labels, bias, reduction, softcap, z_loss, num_items, label_smoothing):
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}] does not match weight {tuple(weight.shape)} "
                         "(expected weight [vocab, hidden])")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}: one label per "
                         "hidden row (shift labels before calling)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items is not None and reduction != "sum":
        raise ValueError("num_items divides a summed loss: pass reduction='sum' with num_items")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _keep_labelled_rows(hidden, labels, ignore_index, vocab):
    """Flatten and drop rows whose label is ignore_index (they cost nothing after this). One host sync."""
    x = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(device=x.device)
    idx = (y != ignore_index).nonzero().squeeze(1)
    if idx.numel() != y.numel():  # index_select's backward scatters the gradient back, zeros elsewhere
        x = x.index_select(0, idx)
        y = y.index_select(0, idx)
    if y.numel():
        bad = ((y < 0) | (y >= vocab)).any()
        if bool(bad):
            raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
    return x, y.to(torch.int64).contiguous()


def _grad_scale(n_valid, reduction, num_items, device, dtype=torch.float32):
    """1/denominator as a 0-d tensor: n_valid for 'mean', num_items for 'sum' with an external count,
    1 for a plain sum. A zero denominator gives scale 0 (loss 0, grads 0), never NaN."""
    if reduction == "mean":
        return torch.tensor(1.0 / max(n_valid, 1), dtype=dtype, device=device)
    if num_items is None:
        return torch.ones((), dtype=dtype, device=device)
    count = torch.as_tensor(num_items, dtype=dtype, device=device).reshape(())
    return torch.where(count > 0, 1.0 / count.clamp_min(1e-30), torch.zeros_like(count))


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                               softcap=None, z_loss=0.0, num_items=None, return_stats=False, label_smoothing=0.0,
                               chunk_size=None, block_size=None):
    """Cross-entropy of softmax(hidden @ weight.T + bias) against labels, without the full logits.

    hidden [..., H]; weight [V, H]; labels [...] (already shifted), ignore_index rows skipped; bias [V] or None.
    reduction='mean' averages over labelled tokens; reduction='sum' sums, and with num_items (int or 0-d tensor:
    the labelled-token count over the whole accumulated batch) returns sum / num_items, which is the correct
    loss for gradient accumulation. softcap=c applies c*tanh(logit/c) first (Gemma-2). z_loss=s adds
    s * logsumexp^2 per token. label_smoothing=e mixes the target with the uniform distribution as torch's
    cross_entropy(label_smoothing=e) and HF's label_smoothing_factor do. All tokens ignored: loss 0, zero grads.
    The loss is an fp32 scalar.
    return_stats=True returns CrossEntropyStats(loss, n_valid, n_correct) instead of the loss.
    chunk_size: tokens per chunk (default: a memory budget); block_size: vocab block of the Triton row kernel.
    CUDA tensors (or CPU ones with TRITON_INTERPRET=1) run the Triton path; other fp16/bf16/fp32 tensors the torch
    path with gradients formed in forward (fused_linear_cross_entropy_torch), float64 the checkpointed reference.
    """
    if not use_triton(hidden):
        path = fused_linear_cross_entropy_reference if hidden.dtype == torch.float64 else fused_linear_cross_entropy_torch
        return path(hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                    z_loss=z_loss, num_items=num_items, return_stats=return_stats, label_smoothing=label_smoothing,
                    chunk_size=chunk_size)
    _validate(hidden, weight, labels, bias, reduction, softcap, z_loss, num_items, label_smoothing)
    # under autocast only the activations are cast; the head weight keeps its dtype and gets its gradient
    # straight from the fp32 accumulator
    x, y = _keep_labelled_rows(autocast_input(hidden), labels, ignore_index, weight.shape[0])
    if not x.is_contiguous():
        x = x.contiguous()
    grad_scale = _grad_scale(y.numel(), reduction, num_items, x.device)
    loss, n_correct = _FusedLinearCrossEntropy.apply(
        x, weight, bias, y, grad_scale, softcap, float(z_loss), float(label_smoothing), chunk_size, block_size)
    if not return_stats:
        return loss
    return CrossEntropyStats(loss, torch.tensor(y.numel(), device=x.device), n_correct)


# ------------------------------------------------------------------------------------ torch path (CPU)
# The Triton design in plain torch ops: per chunk, logits by one GEMM, then the same buffer becomes dLoss/dlogits
# in place, dx = g W and dW += g^T x; backward only scales. Against the checkpointed reference below this drops
# the recomputed logits GEMM, the recomputed softmax passes and autograd's logsumexp/gather backward; the row max
# (accuracy) is taken only when stats are asked for.

# CPU: the logits GEMM x @ W^T runs in slices of this many vocab rows, each written into its columns of the chunk's
# logits. One GEMM with a [H x V] right operand of V ~ 50k-150k runs at ~105 GFLOP/s on the 2-core bench machine,
# slices of 2048 at ~150-170 (their weights stay in cache while all of the chunk's rows pass).
CPU_VOCAB_BLOCK = 2048


# One [chunk x V] CPU logits buffer, reused from call to call: at 100+ MB it is past glibc's largest mmap threshold
# (32 MB), so a fresh one is a fresh mapping every chunk, ~25k zero-filled pages to fault in (~20% of the CE's
# non-GEMM time at 517 x 49152 on the 2-core bench machine). The buffer only lives inside one _torch_chunks loop
# (its gradient alias g is consumed there), so reuse is safe within a thread; each thread keeps its own.
_buffers = threading.local()


def _cpu_logits_buffer(rows: int, cols: int, dtype) -> torch.Tensor:
    buf = getattr(_buffers, "logits", None)
    if buf is None or buf.dtype != dtype or buf.numel() < rows * cols:
        # rows rounded up to 256: a step with a few more labelled tokens than the last reuses it too
        buf = _buffers.logits = None
        buf = _buffers.logits = torch.empty(-(-rows // 256) * 256 * cols, dtype=dtype)
    return buf[:rows * cols].view(rows, cols)


def _logits(x, w, b):
    if x.device.type != "cpu" or w.shape[0] <= CPU_VOCAB_BLOCK:
        return torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())
    out = _cpu_logits_buffer(x.shape[0], w.shape[0], torch.promote_types(x.dtype, w.dtype))
    for v in range(0, w.shape[0], CPU_VOCAB_BLOCK):
        cols = slice(v, v + CPU_VOCAB_BLOCK)
        if b is None:
            torch.mm(x, w[cols].t(), out=out[:, cols])
        else:
            torch.addmm(b[cols], x, w[cols].t(), out=out[:, cols])
    return out


def _token_losses(logits, y, ls, z_loss, want_correct):
    """Per-row loss from (soft-capped) logits, correct count (or None) and logsumexp; out-of-place, so the
    checkpointed reference can differentiate it and the torch path can reuse the logits buffer afterwards."""
    lse = torch.logsumexp(logits, dim=-1)
    label_logit = logits.gather(1, y[:, None]).squeeze(1)
    loss = lse - label_logit
    if ls:
        loss = (1.0 - ls) * loss + ls * (lse - logits.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    correct = (label_logit >= logits.max(dim=-1).values).sum() if want_correct else None
    return loss, correct, lse


def _token_losses_in_place(logits, y, ls, z_loss, want_correct):
    """_token_losses for the torch path, leaving softmax(logits) in the logits buffer. torch.logsumexp would
    allocate a second [chunk x V] buffer for logits - max (101 MB at 517 x 49152, past malloc's mmap threshold, so
    fresh zeroed pages every call) and exponentiate it once more than the gradient needs."""
    label_logit = logits.gather(1, y[:, None]).squeeze(1)
    mean = logits.mean(dim=-1) if ls else None
    row_max = logits.amax(dim=-1)
    correct = (label_logit >= row_max).sum() if want_correct else None
    exp_sum = logits.sub_(row_max[:, None]).exp_().sum(dim=-1)
    lse = row_max + exp_sum.log()
    loss = lse - label_logit
    if ls:
        loss = (1.0 - ls) * loss + ls * (lse - mean)
    if z_loss:
        loss = loss + z_loss * lse * lse
    return loss, correct, lse, logits.div_(exp_sum[:, None])


def _torch_chunk(x, w, b, y, softcap, z_loss, ls, want_grad, want_stats):
    """Per-row loss (acc dtype), correct count (or None) and dLoss/dlogits (unscaled, or None) of one chunk."""
    logits = _logits(x, w, b)
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()  # kept for the chain rule's 1 - tanh^2
        logits = tanh * softcap
    loss, correct, lse, g = _token_losses_in_place(logits, y, ls, z_loss, want_stats)
    if not want_grad:
        return loss, correct, None
    # g = softmax; dLoss/dlogits = p * (1 + 2 z lse) - (1 - ls) onehot - ls / V, then the softcap derivative
    if z_loss:
        g.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    if ls:
        g.sub_(ls / g.shape[1])
    rows = torch.arange(g.shape[0], device=g.device)
    g[rows, y] -= 1.0 - ls
    if tanh is not None:
        g.mul_(1.0 - tanh * tanh)
    return loss, correct, g


class _TorchFusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, grad_scale, softcap, z_loss, label_smoothing, chunk, want_stats):
        want_dx, want_dw, want_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with no_autocast(x.device):
            loss, n_correct, dx, dw, db = _torch_chunks(x, weight, bias, labels, softcap, z_loss, label_smoothing,
                                                        chunk, want_stats, want_dx, want_dw, want_db)
        ctx.save_for_backward(dx, dw, db, grad_scale)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(n_correct)
        return loss * grad_scale, n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        # the gradients were formed for d(sum of token losses); a non-unit upstream grad (a loss scaled or
        # divided after this call) and the reduction's 1/denominator are applied here, once
        dx, dw, db, grad_scale = ctx.saved_tensors
        factor = grad_loss.reshape(()).to(grad_scale.dtype) * grad_scale
        grads = [None if g is None else (g * factor).to(dt) for g, dt in zip((dx, dw, db), ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None)


def _torch_chunks(x, weight, bias, labels, softcap, z_loss, ls, chunk, want_stats, want_dx, want_dw, want_db):
    acc = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    n = labels.numel()
    want_grad = want_dx or want_dw or want_db
    dx = torch.empty((n, x.shape[1]), dtype=acc, device=x.device) if want_dx else None
    dw = torch.zeros(w.shape, dtype=acc, device=x.device) if want_dw else None
    db = torch.zeros(w.shape[0], dtype=acc, device=x.device) if want_db else None
    total = torch.zeros((), dtype=acc, device=x.device)
    n_correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, n, chunk):
        xc = x[start:start + chunk].to(acc)
        loss, correct, g = _torch_chunk(xc, w, b, labels[start:start + chunk], softcap, z_loss, ls, want_grad,
                                        want_stats)
        total += loss.sum()
        if correct is not None:
            n_correct += correct
        if want_dx:
            torch.mm(g, w, out=dx[start:start + chunk])
        if want_dw:
            dw.addmm_(g.t(), xc)
        if want_db:
            db += g.sum(0)
    return total, n_correct, dx, dw, db


def fused_linear_cross_entropy_torch(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                                     softcap=None, z_loss=0.0, num_items=None, return_stats=False,
                                     label_smoothing=0.0, chunk_size=None):
    """Same API and semantics as fused_linear_cross_entropy, in torch ops with the gradients formed in forward
    (the CPU path). Accumulates in fp32 (or the inputs' wider dtype); holds one chunk of logits at a time."""
    _validate(hidden, weight, labels, bias, reduction, softcap, z_loss, num_items, label_smoothing)
    x, y = _keep_labelled_rows(hidden, labels, ignore_index, weight.shape[0])
    acc = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    grad_scale = _grad_scale(y.numel(), reduction, num_items, x.device, acc)
    chunk = chunk_size or REFERENCE_CHUNK_TOKENS
    if not torch.is_grad_enabled():  # evaluation: no gradient work in forward
        with no_autocast(x.device):
            total, n_correct, *_ = _torch_chunks(x, weight, bias, y, softcap, float(z_loss), float(label_smoothing),
                                                 chunk, return_stats, False, False, False)
        loss = total * grad_scale
    else:
        loss, n_correct = _TorchFusedLinearCrossEntropy.apply(
            x, weight, bias, y, grad_scale, softcap, float(z_loss), float(label_smoothing), chunk, return_stats)
    if not return_stats:
        return loss
    return CrossEntropyStats(loss, torch.tensor(y.numel(), device=x.device), n_correct)


# ----------------------------------------------------------------------------------------------- reference

def _reference_chunk_loss(x, weight32, bias32, labels, softcap, z_loss, label_smoothing):
    logits = x.to(weight32.dtype) @ weight32.t()
    if bias32 is not None:
        logits = logits + bias32
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss, correct, _ = _token_losses(logits, labels, label_smoothing, z_loss, True)
    return loss.sum(), correct


def fused_linear_cross_entropy_reference(hidden, weight, labels, bias=None, ignore_index=-100,
                                         reduction="mean", softcap=None, z_loss=0.0, num_items=None,
                                         return_stats=False, label_smoothing=0.0, chunk_size=None):
    """Plain torch, same API and semantics as fused_linear_cross_entropy (float64 inputs, tests). Logits are
    computed in fp32 one token chunk at a time under activation checkpointing, so backward also holds one chunk; the
    weight is upcast once, so its gradient accumulates across chunks in fp32 before the final cast."""
    _validate(hidden, weight, labels, bias, reduction, softcap, z_loss, num_items, label_smoothing)
    x, y = _keep_labelled_rows(hidden, labels, ignore_index, weight.shape[0])
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    weight32 = weight.to(acc_dtype)
    bias32 = None if bias is None else bias.to(acc_dtype)
    grad_scale = _grad_scale(y.numel(), reduction, num_items, x.device, acc_dtype)
    chunk = chunk_size or REFERENCE_CHUNK_TOKENS
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    total = torch.zeros((), dtype=acc_dtype, device=x.device)
    n_correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, y.numel(), chunk):
        args = (x[start:start + chunk], weight32, bias32, y[start:start + chunk], softcap, float(z_loss),
                float(label_smoothing))
        if needs_grad:
            loss_sum, correct = checkpoint(_reference_chunk_loss, *args, use_reentrant=False)
        else:
            loss_sum, correct = _reference_chunk_loss(*args)
        total = total + loss_sum
        n_correct = n_correct + correct
    if needs_grad and y.numel() == 0:
        # keep the graph connected so backward gives zero grads instead of None
        total = total + 0.0 * (x.sum() + weight32.sum() + (0.0 if bias32 is None else bias32.sum()))
    loss = total * grad_scale
    if not return_stats:
        return loss
    return CrossEntropyStats(loss, torch.tensor(y.numel(), device=x.device), n_correct)
