"""RMSNorm forward and backward with HF's casting (Llama: normalise in fp32, cast back, multiply by the weight;
Gemma: multiply by (offset + w) in fp32, cast last). Owns the Triton kernels, the autograd Function and the
torch reference (also the CPU path); the nn.Module wrapper and model patching live in fastchat_ft/model/."""
from typing import Optional

import torch

from ._native_cpu import native_cpu
from ._triton import kernel, next_power_of_2, tl, use_triton

MAX_HIDDEN = 65536  # one row must fit one program's block


# ----------------------------------------------------------------------------------------------- kernels

@kernel
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, n_cols, eps, offset,
    GEMMA: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * H passes 2^31 at ~1M tokens x 4096
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    # 1/sqrt rather than rsqrt: libdevice rsqrt does not run under the interpreter.
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + tl.cast(eps, tl.float32))
    tl.store(rstd_ptr + row, rstd)
    xhat = x * rstd
    if GEMMA:
        y = xhat * w
    else:
        # Llama: round the normalised value to the input dtype before the weight multiply, as HF does.
        y = xhat.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@kernel
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    dy_stride, x_stride, dx_stride, n_rows, n_cols, rows_per_program, offset,
    GEMMA: tl.constexpr, WANT_DW: tl.constexpr, BLOCK: tl.constexpr,
):
    # Each program owns a contiguous run of rows and writes one fp32 row of partial dW sums: the host adds
    # the partials in a fixed order, so dW is deterministic (no atomics).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + tl.cast(offset, tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        r = tl.cast(row, tl.int64)
        dy = tl.load(dy_ptr + r * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + r * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xhat = x * rstd
        if WANT_DW:
            if GEMMA:
                dw_acc += dy * xhat
            else:
                dw_acc += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        m = dy * w
        dx = rstd * (m - xhat * (tl.sum(m * xhat, 0) / n_cols))
        tl.store(dx_ptr + r * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WANT_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


# ----------------------------------------------------------------------------------------------- launchers

def _warps(block):
    return 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


def _programs_for_backward(n_rows, device):
    if device.type == "cuda":
        return max(1, min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count * 2))
    return max(1, min(n_rows, 4))  # interpreter: few programs, each loops over its rows


def _forward(x2d, weight, eps, offset, gemma, out_dtype):
    n_rows, n_cols = x2d.shape
    block = next_power_of_2(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    if n_rows:
        _rms_norm_fwd_kernel.on(x2d.device)[(n_rows,)](
            x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n_cols, float(eps), float(offset),
            GEMMA=gemma, BLOCK=block, num_warps=_warps(block))
    return y, rstd


def _backward(dy2d, x2d, weight, rstd, offset, gemma, want_dw):
    n_rows, n_cols = x2d.shape
    block = next_power_of_2(n_cols)
    dx = torch.empty_like(x2d)
    programs = _programs_for_backward(n_rows, x2d.device)
    rows_per_program = -(-n_rows // programs) if n_rows else 0
    dw_partial = torch.zeros((programs, n_cols) if want_dw else (1, 1), dtype=torch.float32, device=x2d.device)
    if n_rows:
        _rms_norm_bwd_kernel.on(x2d.device)[(programs,)](
            dy2d, x2d, weight, rstd, dx, dw_partial, dy2d.stride(0), x2d.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program, float(offset),
            GEMMA=gemma, WANT_DW=want_dw, BLOCK=block, num_warps=_warps(block))
    dw = dw_partial.sum(0).to(weight.dtype) if want_dw else None
    return dx, dw


# ----------------------------------------------------------------------------------------------- autograd

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, gemma):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
        y, rstd = _forward(x2d, weight, eps, offset, gemma, out_dtype)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.gemma, ctx.shape = offset, gemma, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = _backward(dy2d, x2d, weight, rstd, ctx.offset, ctx.gemma, ctx.needs_input_grad[1])
        return dx.reshape(ctx.shape), dw, None, None, None


def _native_module():
    return native_cpu("rms_norm_forward", "FASTCHAT_FT_CPU_RMSNORM")


def _native_for(x, weight):
    """The native module for these tensors (contiguous, on CPU, switch on), else None; kept in ctx by forward."""
    if x.device.type == "cpu" and weight.device == x.device and x.is_contiguous() and weight.is_contiguous():
        return _native_module()
    return None


class _RMSNormFp32Torch(torch.autograd.Function):
    """The fp32 Llama-casting norm for tensors the Triton kernels do not take (CPU training). Contiguous tensors
    run one native pass each way (csrc/cpu_rms_norm.cc; FASTCHAT_FT_CPU_RMSNORM=0 turns it off); others HF's
    forward ops (bit-identical) and the closed-form backward rstd * (m - xhat * mean(m * xhat)) with m = dy * w,
    about half the time of autograd through pow/mean/rsqrt/mul (0.54 vs 1.16 ms forward+backward for 1000 x 576
    on 2 cores). Both keep x and rstd only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.native = _native_for(x, weight)
        if ctx.native is not None:
            y = torch.empty_like(x)
            rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
            cols = x.shape[-1]
            ctx.native.rms_norm_forward(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                                              x.numel() // max(cols, 1), cols, eps, torch.get_num_threads())
            ctx.save_for_backward(x, weight, rstd)
            return y
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error, not a wrong graph
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if ctx.native is not None and ctx.needs_input_grad[0]:
            dy, x, weight, rstd = dy.contiguous(), x.contiguous(), weight.contiguous(), rstd.contiguous()
            cols, threads = x.shape[-1], torch.get_num_threads()
            dx = torch.empty_like(x)
            dw_partial = torch.zeros(threads, cols, dtype=torch.float32, device=x.device) \
                if ctx.needs_input_grad[1] else None
            ctx.native.rms_norm_backward(dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                                               dx.data_ptr(), 0 if dw_partial is None else dw_partial.data_ptr(),
                                               x.numel() // max(cols, 1), cols, threads)
            return dx, None if dw_partial is None else dw_partial.sum(0), None
        xhat = x * rstd
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat).reshape(-1, x.shape[-1]).sum(0)
        dx = None
        if ctx.needs_input_grad[0]:
            m = dy * weight
            dot = (m * xhat).mean(-1, keepdim=True)
            dx = m.sub_(xhat.mul_(dot)).mul_(rstd)
        return dx, dw, None


# ----------------------------------------------------------------------------------------------- public API

def _is_gemma(offset, casting):
    if casting is None:
        return offset != 0.0
    if casting not in ("llama", "gemma"):
        raise ValueError(f"casting must be 'llama', 'gemma' or None, got {casting!r}")
    return casting == "gemma"


def rms_norm(x, weight, eps, offset=0.0, casting: Optional[str] = None):
    """RMSNorm over the last dim of x with weight [H].

    casting='llama' (default when offset == 0): y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the
    product in the promoted dtype of (x, weight) exactly as HF LlamaRMSNorm. casting='gemma' (default when
    offset != 0, e.g. offset=1.0 for Gemma's zero-initialised weight): y = (xhat * (offset + w.float())).to(x.dtype).
    CUDA tensors (or CPU ones with TRITON_INTERPRET=1) run the Triton kernels; others the torch reference, or for
    fp32 Llama casting the same forward with a closed-form backward (_RMSNormFp32Torch).
    """
    gemma = _is_gemma(offset, casting)
    if not use_triton(x):
        if (not gemma and offset == 0.0 and x.dtype == weight.dtype == torch.float32
                and weight.shape == (x.shape[-1],)):
            return _RMSNormFp32Torch.apply(x, weight, float(eps))
        return rms_norm_reference(x, weight, eps, offset=offset, casting="gemma" if gemma else "llama")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} must be [{x.shape[-1]}] for x {tuple(x.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[-1]} exceeds the kernel's limit {MAX_HIDDEN}")
    return _RMSNorm.apply(x, weight, float(eps), float(offset), gemma)


# ----------------------------------------------------------------------------------------------- reference

def rms_norm_reference(x, weight, eps, offset=0.0, casting: Optional[str] = None):
    """Plain torch RMSNorm with the same casting rules as rms_norm (HF Llama / Gemma code paths)."""
    gemma = _is_gemma(offset, casting)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} must be [{x.shape[-1]}] for x {tuple(x.shape)}")
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xhat * (offset + weight.float())).to(x.dtype)
    if offset == 0.0:
        return weight * xhat.to(x.dtype)  # HF LlamaRMSNorm, verbatim in meaning
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return (xhat.to(x.dtype).float() * (weight.float() + offset)).to(out_dtype)
