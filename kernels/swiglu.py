"""SwiGLU, silu(gate) * up: the gated MLP activation of Llama-family models, with a leaner backward.

Eager autograd keeps three [tokens x intermediate] tensors per layer for it (gate for silu, silu(gate) and up for
the product); this Function keeps gate and up, which the projections made anyway, and recomputes silu in backward:
one activation of the model's widest shape less per layer (on SmolLM2-135M about an eighth of a LoRA step's saved
activations). CUDA tensors (or CPU ones with TRITON_INTERPRET=1) run one Triton kernel each way (forward reads 2
tensors and writes 1, backward reads 3 and writes 2; eager makes 5 and 8 passes). Contiguous fp32 CPU tensors run
the same two passes natively (csrc/cpu_swiglu.cc, ~1e-7 relative from eager: its own exp;
FASTCHAT_FT_CPU_SWIGLU=0 turns it off). Other tensors run the same Function on torch ops in eager's order, so their
values and gradients are bit-identical to eager's; float64 runs the reference. Rounding follows eager too: silu is
rounded to the input dtype before the product.

`recomputed_for_backward(h, gate, up)` goes one step further for the layer that consumes h = swiglu(gate, up) (the
down projection): inside it autograd keeps no copy of h, backward recomputes it from gate and up.
"""
import contextlib

import torch

from ._native_cpu import native_cpu
from ._triton import cdiv, kernel, no_autocast, tl, use_triton

BLOCK = 1024


# ----------------------------------------------------------------------------------------------- kernels

@kernel
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)  # eager rounds silu(gate) first
    tl.store(out_ptr + offs, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def _swiglu_bwd_kernel(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(dup_ptr.dtype.element_ty).to(tl.float32)
    dsilu = (dh * u).to(dgate_ptr.dtype.element_ty).to(tl.float32)  # eager's grad of silu(gate), in the dtype
    tl.store(dup_ptr + offs, (dh * silu).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offs, (dsilu * sig * (1.0 + g * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=mask)


def _launch_forward(gate, up):
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel.on(gate.device)[(cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out


def _native_module():
    return native_cpu("swiglu_forward", "FASTCHAT_FT_CPU_SWIGLU")


def _native_for(gate, up):
    """The native module for these tensors (contiguous fp32 on CPU, switch on), else None. Kept in ctx by forward,
    so a backward runs the same path as its forward even if the switch changes in between."""
    if gate.device.type == "cpu" and gate.dtype == torch.float32 and gate.is_contiguous() and up.is_contiguous():
        return _native_module()
    return None


def _native_forward(native, gate, up):
    out = torch.empty_like(gate)
    native.swiglu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


def _native_backward(native, dh, gate, up, want_gate, want_up):
    dh, gate, up = dh.contiguous(), gate.contiguous(), up.contiguous()  # no-ops unless saved-tensor hooks relaid them
    dgate = torch.empty_like(gate) if want_gate else None
    dup = torch.empty_like(up) if want_up else None
    native.swiglu_backward(dh.data_ptr(), gate.data_ptr(), up.data_ptr(),
                                     dgate.data_ptr() if want_gate else 0, dup.data_ptr() if want_up else 0,
                                     gate.numel(), torch.get_num_threads())
    return dgate, dup


def _launch_backward(dh, gate, up):
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel.on(gate.device)[(cdiv(n, BLOCK),)](dh, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=4)
    return dgate, dup


# ----------------------------------------------------------------------------------------------- autograd

class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, triton_path):
        ctx.save_for_backward(gate, up)
        ctx.triton_path = triton_path
        ctx.native = None if triton_path else _native_for(gate, up)
        if triton_path:
            return _launch_forward(gate, up)
        if ctx.native is not None:
            return _native_forward(ctx.native, gate, up)
        with no_autocast(gate.device):
            return torch.nn.functional.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error, not a wrong graph
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        if ctx.triton_path:
            dgate, dup = _launch_backward(dh.contiguous(), gate, up)
            return dgate, dup, None
        if ctx.native is not None:
            dgate, dup = _native_backward(ctx.native, dh, gate, up, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            return dgate, dup, None
        # eager's ops in eager's order (MulBackward0 then SiluBackward0): bit-identical gradients
        with no_autocast(gate.device):
            dup = dh * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
            dgate = torch.ops.aten.silu_backward(dh * up, gate) if ctx.needs_input_grad[0] else None
        return dgate, dup, None


# ----------------------------------------------------------------------------------------------- public API

def swiglu(gate, up):
    """silu(gate) * up for gate and up of one shape and dtype (anything else, float64 included, runs the
    reference). Gradients flow to both. On the Triton path non-contiguous inputs (e.g. halves of a fused gate_up
    output) are copied, and the copies are what backward keeps."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device or gate.dtype == torch.float64:
        return swiglu_reference(gate, up)
    triton_path = use_triton(gate)
    if triton_path:
        gate, up = gate.contiguous(), up.contiguous()
    return _SwiGLU.apply(gate, up, triton_path)


class _Recompute:
    """What a saved h becomes: the recipe (gate, up, kept by swiglu anyway) and the saved view's geometry."""

    def __init__(self, gate, up, saved):
        self.gate, self.up = gate, up
        self.size, self.stride, self.offset = saved.size(), saved.stride(), saved.storage_offset()


def _outer_saved_tensors_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private; absent: assume active
    return top is None or top(False) is not None


@contextlib.contextmanager
def recomputed_for_backward(h, gate, up):
    """Within the block, tensors autograd saves that share h's storage (h = swiglu(gate, up), and views of it, e.g.
    the input a down projection keeps for its weight gradient) are not kept: backward recomputes them with swiglu,
    the same kernel and rounding, so bit-identical. One [tokens x intermediate] activation less per layer for one
    swiglu forward more in backward. A no-op under other saved-tensor hooks (activation checkpointing, offloading),
    which own every saved tensor themselves, under torch.compile, and without grad."""
    # compiled code: AOTAutograd's partitioner decides what is saved or recomputed there
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _outer_saved_tensors_hooks_active():
        yield
        return
    # only h's address, size and device: autograd keeps these hooks as long as the graph, and a reference to h
    # itself here would keep h alive after all
    storage = h.untyped_storage()
    ptr, nbytes, device = storage.data_ptr(), storage.nbytes(), h.device

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() == ptr and st.nbytes() == nbytes and t.device == device:
            return _Recompute(gate, up, t)
        return t

    def unpack(p):
        if not isinstance(p, _Recompute):
            return p
        with torch.no_grad():
            full = swiglu(p.gate.detach(), p.up.detach())
        return full.as_strided(p.size, p.stride, p.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def swiglu_reference(gate, up):
    """Plain torch, as HF's MLP computes it: act_fn(gate) * up with act_fn silu."""
    return torch.nn.functional.silu(gate) * up
