"""Triton kernels (shipped as fastchat_ft.kernels), each with a plain torch reference that is also the CPU path.
One kernel per file: jit functions, launchers, autograd Function, reference. Dispatch: CUDA tensors run the
Triton kernels; CPU tensors run the torch reference, or the Triton kernels under the interpreter when
TRITON_INTERPRET=1. Importing is cheap (torch, plus triton when installed; nothing is compiled, tuned or
launched until a kernel is first called) and works without triton.

    fused_linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                               softcap=None, z_loss=0.0, num_items=None, return_stats=False,
                               label_smoothing=0.0) -> loss, or CrossEntropyStats(loss, n_valid, n_correct)
    rms_norm(x, weight, eps, offset=0.0, casting=None) -> y
    lora_linear(x, weight, lora_a, lora_b, scale, bias=None, dropout=0.0) -> y
    lora_linear_group(x, [(weight, lora_a, lora_b, scale, bias), ...]) -> [y, ...] (layers sharing input x)
    swiglu(gate, up) -> silu(gate) * up, keeping only gate and up for backward
"""
# Eager on purpose: each function shares its module's name, and a lazy import would let the submodule
# shadow the function on the package (`from fastchat_ft.kernels import rms_norm` returning a module).
from .fused_linear_cross_entropy import (CrossEntropyStats, fused_linear_cross_entropy,
                                         fused_linear_cross_entropy_reference)
from .lora_linear import lora_linear, lora_linear_group, lora_linear_reference
from .rms_norm import rms_norm, rms_norm_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "CrossEntropyStats", "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference",
    "lora_linear", "lora_linear_group", "lora_linear_reference", "rms_norm", "rms_norm_reference", "swiglu",
    "swiglu_reference",
]
