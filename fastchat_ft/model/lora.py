"""Our LoRA: a wrapper module on chosen linear layers (fused `lora_linear` kernel), QLoRA base weights,
and save/load in PEFT's layout and key names so `peft` (and vLLM) load our adapters unchanged.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from fastchat_ft.errors import ModelError
from fastchat_ft.kernels import lora_linear, lora_linear_group

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


class LoraLinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))). Attribute names (base_layer, lora_A, lora_B) give
    PEFT's state-dict keys. B starts at zero so the wrapped model starts equal to the base model."""

    def __init__(self, base: nn.Module, r: int, alpha: int, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base.requires_grad_(False)  # LoRA trains A and B only; the kernel relies on it
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        weight = getattr(base, "weight", None)
        device = weight.device if weight is not None else None
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = float(dropout)  # PEFT's lora_dropout: on the LoRA input only
        self.quantized = type(base) is not nn.Linear  # bitsandbytes Linear4bit subclasses nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LoRA weights stay fp32 (the optimizer's master copy); the matmuls run in the autocast dtype if any
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else self.lora_A.weight.dtype
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        dropout = self.dropout if self.training else 0.0
        if self.quantized or dropout:  # 4-bit base, or dropout on the LoRA input only: two separate paths
            base = self.base_layer(x)
            lora_in = nn.functional.dropout(x, dropout) if dropout else x
            lora = nn.functional.linear(nn.functional.linear(lora_in.to(dtype), a), b)
            return base + self.scale * lora.to(base.dtype)
        bias = self.base_layer.bias
        return lora_linear(x.to(dtype), self.base_layer.weight.to(dtype), a, b, self.scale,
                           None if bias is None else bias.to(dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight + self.scale * (self.lora_B.weight @ self.lora_A.weight).to(self.base_layer.weight.dtype)


def project_group(x: torch.Tensor, modules) -> list[torch.Tensor]:
    """[module(x) for module in modules], for linears that read the same input (q/k/v, gate/up). When all are our
    LoraLinear on dense weights with one rank, no dropout in play, no autocast and no hooks, their LoRA products
    run as one group (lora_linear_group: on CPU fp32, one native call each way for the group)."""
    if (all(type(m) is LoraLinear and not m.quantized and not (m.dropout and m.training) and not _hooked(m)
            for m in modules) and not torch.is_autocast_enabled(x.device.type) and not _global_hooks()):
        dtype = modules[0].lora_A.weight.dtype
        layers = [(m.base_layer.weight, m.lora_A.weight, m.lora_B.weight, m.scale, m.base_layer.bias)
                  for m in modules]
        if x.dtype == dtype and all(w.dtype == dtype for layer in layers for w in layer[:3]):
            return lora_linear_group(x, layers)
    return [m(x) for m in modules]


def _hooked(module: nn.Module) -> bool:
    """Hooks or a replaced forward (accelerate's hooks, tracers): calling the group would skip them."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _global_hooks() -> bool:
    """torch's process-wide module hooks (FLOP counters, module trackers) expect one call per module."""
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _matches(name: str, targets: list[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(last == t or re.fullmatch(t, name) for t in targets)


def add_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]) -> list[str]:
    """Freeze the model and wrap every linear layer named in target_modules; return the wrapped paths."""
    for p in model.parameters():
        p.requires_grad_(False)
    lm_head = model.get_output_embeddings()
    wrapped = []
    for name, module in list(model.named_modules()):
        if module is lm_head or not _matches(name, target_modules) or not hasattr(module, "in_features"):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(module, r, alpha, dropout))
        wrapped.append(name)
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"no module matches lora_target_modules={target_modules}", field="lora_target_modules",
                         fix=f"this model's linear layers are: {', '.join(names)}")
    return wrapped


def lora_state_dict(model: nn.Module, extra_modules: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's key names; extra_modules (resized embeddings) saved whole, modules_to_save style."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
    for name, module in (extra_modules or {}).items():
        out[f"{PEFT_PREFIX}{name}.weight"] = module.weight.detach().contiguous()
    return out


def adapter_config(model: nn.Module, base_path: str, r: int, alpha: int, dropout: float,
                   target_modules: list[str], modules_to_save: list[str] | None = None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(set(target_modules)), "modules_to_save": modules_to_save or None,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
    }


def save_adapter(model: nn.Module, folder: Path, config: dict, extra_modules: dict[str, nn.Module] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.to(torch.float32).cpu() for k, v in lora_state_dict(model, extra_modules).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def shape_mismatches(saved: dict, own: dict) -> list[str]:
    """'name saved-shape vs model-shape' for tensors both hold with different shapes (another base model's hidden
    size, another lora_r), so a load can refuse before copy_ or load_state_dict fails half-way."""
    return [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in saved.items()
            if k in own and v.shape != own[k].shape]


def load_adapter(model: nn.Module, folder: Path) -> None:
    """Load PEFT-layout LoRA weights into a model that already has our LoraLinear wrappers."""
    from safetensors.torch import load_file

    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():  # e.g. a full fine-tune's checkpoint
        raise ModelError(f"no {ADAPTER_WEIGHTS} here: not a LoRA adapter", file=str(folder),
                         fix="load a LoRA checkpoint (to resume a run, use the adapter setting it started with)")
    tensors = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    own = {f"{PEFT_PREFIX}{n}": p for n, p in model.named_parameters()}
    missing = [k for k in tensors if k not in own]
    if missing:
        raise ModelError(f"adapter has weights this model lacks: {missing[:3]}", file=str(folder),
                         fix="load the adapter onto the base model and target modules it was trained with")
    # same names, other shapes: another base model (hidden size) or lora_r; copy_ would fail mid-way
    wrong = shape_mismatches(tensors, own)
    if wrong:
        raise ModelError(f"adapter weights do not fit this model (saved vs model shape): {'; '.join(wrong[:2])}",
                         file=str(folder), fix="load the adapter onto the base model and lora_r it was trained with "
                                               "(to resume a run, use the base_model and config it started with)")
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


def quantize_config():
    """QLoRA's base weights: bitsandbytes nf4 with double quantisation, bf16 compute."""
    if not torch.cuda.is_available():
        raise ModelError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels)", field="adapter",
                         fix="use adapter: lora on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("QLoRA needs bitsandbytes", field="adapter",
                         fix="pip install 'fastchat-ft[qlora]' (or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)
