"""LoRA's native CPU path (csrc/cpu_lora.cc, fp32): the rank-r products of one LoRA linear, or of a group of them
reading one input (q/k/v, gate/up), in one native call per forward and one per backward, beside torch's GEMM for
the frozen x W^T / dy W. kernels/lora_linear.py dispatches here; FASTCHAT_FT_CPU_LORA=0 keeps torch's GEMMs."""
import torch

from ._native_cpu import native_cpu
from ._triton import no_autocast

MAX_STACKED_RANK = 64  # the layers' ranks of a group added up (csrc/cpu_lora.h)


def native_module():
    return native_cpu("lora_forward", "FASTCHAT_FT_CPU_LORA")


def native_for(x2d, lora_a, lora_b, x_drop, weight):
    """The native module for one layer: contiguous fp32 CPU tensors, a dense weight, no LoRA dropout, rank 16/32/
    48/64, not under torch.compile, switch on; else None (torch's GEMMs). Kept in ctx by forward, so a backward
    runs the path of its forward."""
    return native_module() if x_drop is None and _takes_layer(x2d, lora_a, lora_b, weight) else None


def _takes_layer(x2d, lora_a, lora_b, weight) -> bool:
    r = lora_a.shape[0]
    return not (getattr(weight, "quant_state", None) is not None or r == 0 or r % 16 or r > MAX_STACKED_RANK
                or not all(_fp32_cpu(t) for t in (x2d, lora_a, lora_b, weight))
                or not (x2d.is_contiguous() and lora_a.is_contiguous() and lora_b.is_contiguous())
                or torch.compiler.is_compiling())


def group_native_for(x, layers):
    """The native module for a group (weight, lora_a, lora_b, scale, bias) sharing input x: every layer takes the
    one-layer path, one rank, stacked rank <= 64, no autocast; else None (one lora_linear per layer)."""
    if not 1 <= len(layers) <= 4 or torch.is_autocast_enabled(x.device.type):
        return None
    r = layers[0][1].shape[0]
    if len(layers) * r > MAX_STACKED_RANK or any(layer[1].shape[0] != r for layer in layers):
        return None
    x2d = x.reshape(-1, x.shape[-1])
    if all(_takes_layer(x2d, a, b, w) and w.is_contiguous() and (bias is None or _fp32_cpu(bias))
           for w, a, b, _scale, bias in layers):
        return native_module()  # looked up once for the group, not once per layer
    return None


def _fp32_cpu(t) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


def _pointers(*tensors):
    """data_ptr() of each, after checking the kernel can read it: fp32, CPU, contiguous. A saved-tensor hook may
    hand back another layout or dtype; the C++ side trusts these pointers."""
    for t in tensors:
        if not (_fp32_cpu(t) and t.is_contiguous()):
            raise RuntimeError(f"native LoRA kernel: got a {t.dtype} {t.device} tensor (contiguous: "
                               f"{t.is_contiguous()}), needs contiguous float32 on CPU; set FASTCHAT_FT_CPU_LORA=0 "
                               "to use torch's GEMMs")
    return [t.data_ptr() for t in tensors]


def _refuse_double_backward():
    if torch.is_grad_enabled():  # backward(create_graph=True): the native kernel records no graph
        raise RuntimeError("the native CPU LoRA backward is not differentiable (create_graph=True); set "
                           "FASTCHAT_FT_CPU_LORA=0 to use torch's GEMMs")


def forward(native, x2d, weights, lora_as, lora_bs, scales, biases):
    """y_g = x W_g^T (+ bias_g) by torch's GEMM, then the group's rank-r terms in one native call; returns the
    y_g and s = x [A_0; A_1; ...]^T, kept for backward."""
    ys = [torch.mm(x2d, w.t()) if bias is None else torch.addmm(bias, x2d, w.t()) for w, bias in zip(weights, biases)]
    m, r = x2d.shape[0], lora_as[0].shape[0]
    s = torch.empty((m, len(ys) * r), dtype=x2d.dtype)
    (x_ptr, s_ptr), a_ptrs, b_ptrs, y_ptrs = _pointers(x2d, s), _pointers(*lora_as), _pointers(*lora_bs), _pointers(*ys)
    native.lora_forward(x_ptr, a_ptrs, b_ptrs, s_ptr, y_ptrs, m, x2d.shape[1], [y.shape[1] for y in ys], r,
                        list(scales), torch.get_num_threads())
    return ys, s


def backward(native, dys, x2d, s, weights, lora_as, lora_bs, scales, want_x):
    """dx = sum_g dy_g W_g by torch's GEMM (if wanted; accumulated in place), then the rank-r terms of dx and
    every layer's dA, dB in one native call. Returns dx, the stacked dA [layers*r x in] and the dBs."""
    _refuse_double_backward()
    dys = [dy.contiguous() for dy in dys]
    x2d, s = x2d.contiguous(), s.contiguous()  # no-ops unless saved-tensor hooks relaid them
    grad_x = None
    if want_x:
        grad_x = torch.mm(dys[0], weights[0])
        for dy, w in zip(dys[1:], weights[1:]):
            grad_x.addmm_(dy, w)
    r = lora_as[0].shape[0]
    grad_a = torch.empty((len(dys) * r, x2d.shape[1]), dtype=x2d.dtype)
    grad_bs = [torch.empty_like(b) for b in lora_bs]
    x_ptr, s_ptr, grad_a_ptr = _pointers(x2d, s, grad_a)
    native.lora_backward(_pointers(*dys), x_ptr, s_ptr, _pointers(*lora_as), _pointers(*lora_bs),
                         _pointers(grad_x)[0] if want_x else 0, grad_a_ptr, _pointers(*grad_bs), x2d.shape[0],
                         x2d.shape[1], [dy.shape[1] for dy in dys], r, list(scales), torch.get_num_threads())
    return grad_x, grad_a, grad_bs


class LoRAGroup(torch.autograd.Function):
    """Several LoRA linears on one input x: the layers' A are stacked in the native call (one pass over x and dx
    for the group), and dx = sum_g dy_g W_g is accumulated in place instead of autograd adding per-layer dx.
    apply(native, scales, x2d, *weights, *lora_as, *lora_bs, *biases) -> (y_0, y_1, ...)."""

    @staticmethod
    def forward(ctx, native, scales, x2d, *params):
        n = len(scales)
        weights, lora_as, lora_bs, biases = params[:n], params[n:2 * n], params[2 * n:3 * n], params[3 * n:]
        with no_autocast(x2d.device):
            ys, s = forward(native, x2d, weights, lora_as, lora_bs, scales, biases)
        ctx.save_for_backward(x2d, s, *lora_as, *lora_bs)
        ctx.native, ctx.scales, ctx.weights = native, scales, weights
        ctx.has_bias = [bias is not None for bias in biases]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        n = len(ctx.scales)
        x2d, s, *ab = ctx.saved_tensors
        with no_autocast(x2d.device):
            grad_x, grad_a, grad_bs = backward(ctx.native, dys, x2d, s, ctx.weights, ab[:n], ab[n:], ctx.scales,
                                               ctx.needs_input_grad[2])
        r = ab[0].shape[0]
        wanted = ctx.needs_input_grad[3:]  # weights, then As, Bs, biases
        grad_as = [grad_a[g * r:(g + 1) * r] if wanted[n + g] else None for g in range(n)]
        grad_bs = [grad if wanted[2 * n + g] else None for g, grad in enumerate(grad_bs)]
        grad_biases = [dy.sum(0) if has and wanted[3 * n + g] else None
                       for g, (dy, has) in enumerate(zip(dys, ctx.has_bias))]
        return (None, None, grad_x, *([None] * n), *grad_as, *grad_bs, *grad_biases)
