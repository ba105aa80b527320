"""LoRA linear: y = x W^T + scale * (x A^T) B^T (+ bias) with W frozen (dense or bitsandbytes 4-bit), gradients
for x, A, B (and bias). Owns the fused Triton GEMM, the autograd Function and the torch reference (also the
CPU path); PEFT-module patching lives in fastchat_ft/model/.

CPU fp32, rank a multiple of 16: kernels/lora_cpu.py (native rank-r products; groups of layers on one input).

Fusion (after LoRAFusion, see ../shared/notes/kernels.md): the rank-r product S = x A^T is a skinny cuBLAS
GEMM; one Triton GEMM then seeds its fp32 accumulator with scale * S B^T and runs the normal K loop of x W^T,
so the LoRA path adds no extra pass over y. Backward reuses the same kernel for dx = dy W + scale (dy B) A.
"""
import os
from typing import Optional

import torch

from . import lora_cpu
from ._triton import autocast_input, cdiv, kernel, next_power_of_2, no_autocast, tl, use_triton


def _gemm_configs():
    from ._triton import HAS_TRITON, triton

    if not HAS_TRITON:
        return []
    shapes = [  # (BM, BN, BK, stages, warps): the usual Hopper/Ampere bf16 tiles, small ones for skinny M
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 64, 3, 8),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    ]  # kept short: each config is one more compile on first use
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


# ----------------------------------------------------------------------------------------------- kernels

@kernel(autotune=dict(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "R"]))
def _lora_matmul_kernel(
    a_ptr, b_ptr, s_ptr, l_ptr, bias_ptr, c_ptr,
    M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_sm, stride_sr, stride_lr, stride_ln, stride_cm, stride_cn,
    scale,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # C[M, N] = A[M, K] @ B[K, N] + scale * S[M, R] @ L[R, N] + bias[N]; M_BUCKET only keys the autotuner.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: GROUP_M row-blocks share their B columns in L2
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=mask_m[:, None] & (rr[None, :] < R), other=0.0)
        lo = tl.load(l_ptr + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
                     mask=(rr[:, None] < R) & mask_n[None, :], other=0.0)
        acc = tl.dot(s, lo, input_precision=PRECISION) * tl.cast(scale, tl.float32)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (rk[None, :] + k < K), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] + k < K) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------- launchers

# Fixed tiles for the interpreter (CPU tests); the GPU path autotunes.
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)


def _precision(dtype):
    # fp32 follows torch's own matmul setting, so fp32 training never silently drops to tf32; for 16-bit
    # operands the setting is moot and triton's default ("tf32") applies
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def gemm_backend(device=None) -> str:
    """The GEMM behind lora_linear on the Triton path: "cublas" (cuBLAS x W^T, then the rank-r term added in place
    by one addmm) or "triton" (one fused Triton GEMM seeded with the rank-r term). FASTCHAT_LORA_GEMM picks one;
    the default is cublas on CUDA, where bench/kernels.py measured it faster at every Llama-8B shape on an H200
    (fused +50-94% over the base matmul forward, cublas +10-33%), and triton elsewhere (the interpreter tests)."""
    default = "cublas" if device is not None and device.type == "cuda" else "triton"
    backend = os.environ.get("FASTCHAT_LORA_GEMM", default).strip().lower()
    if backend not in ("triton", "cublas"):
        raise ValueError(f"FASTCHAT_LORA_GEMM must be 'triton' or 'cublas', got {backend!r}")
    return backend


def _composed_lora_matmul(a, b, s, lo, scale, bias):
    c = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    if s is not None:
        torch.addmm(c, s, lo, alpha=scale, out=c)  # in place; as addmm (not addmm_) FLOP counters see it
    return c


def fused_lora_matmul(a, b, s=None, lo=None, scale=1.0, bias=None, blocks: Optional[dict] = None):
    """a [M, K] @ b [K, N] + scale * s [M, R] @ lo [R, N] + bias, one Triton GEMM (any strides)."""
    if gemm_backend(a.device) == "cublas":
        return _composed_lora_matmul(a, b, s, lo, scale, bias)
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    has_lora = s is not None
    r = s.shape[1] if has_lora else 0
    s_ = s if has_lora else a
    lo_ = lo if has_lora else b
    launch_args = (
        a, b, s_, lo_, bias if bias is not None else a, c,
        m, n, k, r, next_power_of_2(m),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), s_.stride(0), s_.stride(1 if has_lora else 0),
        lo_.stride(0), lo_.stride(1), c.stride(0), c.stride(1), float(scale),
    )
    meta = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, BLOCK_R=max(16, next_power_of_2(r)),
                PRECISION=_precision(a.dtype))
    if a.device.type == "cpu" or blocks is not None:  # explicit tiles bypass the autotuner
        tiles = blocks or INTERPRETER_BLOCKS
        grid = (cdiv(m, tiles["BLOCK_M"]) * cdiv(n, tiles["BLOCK_N"]),)
        fn = _lora_matmul_kernel.on(a.device, tuned=False)
        fn[grid](*launch_args, **meta, **tiles)
    else:
        def grid(meta_):
            return (cdiv(m, meta_["BLOCK_M"]) * cdiv(n, meta_["BLOCK_N"]),)
        _lora_matmul_kernel.on(a.device)[grid](*launch_args, **meta)
    return c


def _dequantize(weight):
    """A dense view of W: bitsandbytes Params4bit (it carries quant_state) is dequantized, others pass through."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    import bitsandbytes.functional as bnbf  # optional extra (pip install fastchat-ft[qlora])

    return bnbf.dequantize_4bit(weight.data if hasattr(weight, "data") else weight, quant_state)


# ----------------------------------------------------------------------------------------------- autograd

class _LoRALinear(torch.autograd.Function):
    """x_drop is None without LoRA dropout: then the LoRA input is x itself and backward fuses both dx terms
    into one GEMM. With dropout the LoRA term's input gradient goes to x_drop (autograd routes it through
    the dropout mask back to x), so dx from the base GEMM and from the LoRA path are returned apart."""

    @staticmethod
    def forward(ctx, x2d, x_drop, weight, lora_a, lora_b, scale, bias, composed):
        with no_autocast(x2d.device):
            return _LoRALinear._forward(ctx, x2d, x_drop, weight, lora_a, lora_b, scale, bias, composed)

    @staticmethod
    def _forward(ctx, x2d, x_drop, weight, lora_a, lora_b, scale, bias, composed):
        w = _dequantize(weight).to(x2d.dtype)
        lora_in = x2d if x_drop is None else x_drop
        ctx.native = lora_cpu.native_for(x2d, lora_a, lora_b, x_drop, weight) if composed else None
        gemm = _composed_lora_matmul if composed else fused_lora_matmul
        if ctx.native is not None:
            (y,), s = lora_cpu.forward(ctx.native, x2d, [w], [lora_a], [lora_b], [scale], [bias])
        else:
            s = torch.mm(lora_in, lora_a.t())  # [M, r], kept for dB
            y = gemm(x2d, w.t(), s, lora_b.t(), scale, bias)
        ctx.save_for_backward(lora_in, lora_a, lora_b, s)
        ctx.weight, ctx.scale, ctx.has_bias, ctx.dropout = weight, scale, bias is not None, x_drop is not None
        ctx.gemm = gemm
        return y

    @staticmethod
    def backward(ctx, dy):
        with no_autocast(dy.device):
            return _LoRALinear._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        lora_in, lora_a, lora_b, s = ctx.saved_tensors
        scale = ctx.scale
        dy = dy.contiguous()
        grad_x = grad_x_drop = grad_a = grad_b = grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = dy.sum(0)
        if ctx.native is not None:
            grad_x, grad_a, (grad_b,) = lora_cpu.backward(ctx.native, [dy], lora_in, s, [ctx.weight], [lora_a],
                                                          [lora_b], [scale], ctx.needs_input_grad[0])
            return (grad_x, None, None, grad_a if ctx.needs_input_grad[3] else None,
                    grad_b if ctx.needs_input_grad[4] else None, None, grad_bias, None)
        t = torch.mm(dy, lora_b)  # [M, r] = dy B
        if ctx.needs_input_grad[0]:
            w = _dequantize(ctx.weight).to(dy.dtype)  # again, rather than keeping a dense copy alive
            if ctx.dropout:
                grad_x = ctx.gemm(dy, w, None, None, 1.0, None)
            else:
                grad_x = ctx.gemm(dy, w, t, lora_a, scale, None)
        if ctx.dropout and ctx.needs_input_grad[1]:
            grad_x_drop = torch.mm(t, lora_a).mul_(scale)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(t.t(), lora_in).mul_(scale)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(dy.t(), s).mul_(scale)
        return grad_x, grad_x_drop, None, grad_a, grad_b, None, grad_bias, None


# ----------------------------------------------------------------------------------------------- public API

def _check(x, weight, lora_a, lora_b, bias):
    out_features, in_features = _weight_shape(weight)
    r = lora_a.shape[0]
    if x.shape[-1] != in_features or lora_a.shape != (r, in_features) or lora_b.shape != (out_features, r):
        raise ValueError(f"shape mismatch: x [..., {x.shape[-1]}], W {(out_features, in_features)}, "
                         f"A {tuple(lora_a.shape)} (want [r, {in_features}]), B {tuple(lora_b.shape)} "
                         f"(want [{out_features}, r])")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias {tuple(bias.shape)} must be [{out_features}]")
    if getattr(weight, "requires_grad", False) and torch.is_grad_enabled():
        raise ValueError("lora_linear treats W as frozen but weight.requires_grad is True: "
                         "set requires_grad=False on the base weight (or train it without LoRA)")


def _weight_shape(weight):
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        return tuple(quant_state.shape)
    return tuple(weight.shape)


def lora_linear(x, weight, lora_a, lora_b, scale, bias=None, dropout=0.0):
    """y = x W^T + scale * (dropout(x) A^T) B^T + bias. x [..., in]; W [out, in] frozen (dense, or a
    bitsandbytes Params4bit, dequantized on the fly); A [r, in]; B [out, r]. Gradients flow to x, A, B and
    bias. dropout is PEFT's lora_dropout on the LoRA input (pass 0.0 in eval). A, B and W are computed in
    x's dtype (A/B gradients come back in their own dtype, e.g. fp32 adapters).
    CUDA tensors (or CPU ones with TRITON_INTERPRET=1) run the fused Triton GEMM; other fp16/bf16/fp32 tensors the
    same autograd Function with torch GEMMs (the LoRA term added into the base output in place, addmm_, rather
    than PEFT's separate scale and add passes); float64 the reference. On CPU in fp32 with rank 16/32/48/64 and no
    dropout, the rank-r products run natively (csrc/cpu_lora.cc: one call each way beside torch's base GEMM;
    FASTCHAT_FT_CPU_LORA=0 keeps torch's)."""
    composed = not use_triton(x)
    if composed and x.dtype == torch.float64:
        return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias, dropout)
    _check(x, weight, lora_a, lora_b, bias)
    x = autocast_input(x)
    x2d = x.reshape(-1, x.shape[-1])
    x_drop = torch.nn.functional.dropout(x2d, dropout) if dropout > 0 else None
    dtype = x.dtype
    a = lora_a if lora_a.dtype == dtype else lora_a.to(dtype)  # differentiable casts, outside the Function
    b = lora_b if lora_b.dtype == dtype else lora_b.to(dtype)
    bias_ = None if bias is None else (bias if bias.dtype == dtype else bias.to(dtype))
    y = _LoRALinear.apply(x2d, x_drop, weight, a, b, float(scale), bias_, composed)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def lora_linear_group(x, layers):
    """[lora_linear(x, *layer) for layer in layers], layers = (weight, lora_a, lora_b, scale, bias) each, without
    dropout. On CPU in fp32 with one rank (16, 32, ...; stacked at most 64) and dense weights, the group's rank-r
    products run in one native call each way (lora_cpu.LoRAGroup); otherwise one lora_linear per layer, with the
    same results up to float reassociation."""
    native = None if use_triton(x) else lora_cpu.group_native_for(x, layers)
    if native is None:
        return [lora_linear(x, *layer) for layer in layers]
    for weight, lora_a, lora_b, _scale, bias in layers:
        _check(x, weight, lora_a, lora_b, bias)
    x2d = x.reshape(-1, x.shape[-1])
    weights, lora_as, lora_bs, scales, biases = zip(*layers)
    ys = lora_cpu.LoRAGroup.apply(native, tuple(float(v) for v in scales), x2d, *weights, *lora_as, *lora_bs,
                                  *biases)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


# ----------------------------------------------------------------------------------------------- reference

def lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None, dropout=0.0):
    """Plain torch, as PEFT computes it: F.linear(x, W, bias) + scale * B(A(dropout(x))), in x's dtype."""
    _check(x, weight, lora_a, lora_b, bias)
    dtype = x.dtype
    w = _dequantize(weight).to(dtype)
    base = torch.nn.functional.linear(x, w, None if bias is None else bias.to(dtype))
    lora_in = torch.nn.functional.dropout(x, dropout) if dropout > 0 else x
    low_rank = torch.nn.functional.linear(torch.nn.functional.linear(lora_in, lora_a.to(dtype)), lora_b.to(dtype))
    return base + scale * low_rank
