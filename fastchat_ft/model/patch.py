"""`fastchat_ft.patch(model)`: swap our kernels into a HF causal LM in place (RMSNorm, the fused linear+CE loss,
the gated MLP's SwiGLU, peft LoRA Linear layers) and hand back a handle that undoes it. One generic patcher driven
by FAMILIES, a small table of model types; the kernels live in fastchat_ft.kernels and the train loop in
fastchat_ft.engine.

Everything is patched per instance (a `forward` in the module's __dict__), never on a transformers class, so
other models in the process are untouched and undo is exact: the instance attribute goes away (or the one it
shadowed comes back) and the modules, parameters and hooks are the very same objects as before.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
import weakref
from dataclasses import dataclass, field

from fastchat_ft.errors import ModelError

log = logging.getLogger("fastchat_ft")


@dataclass(frozen=True)
class Family:
    """How one HF model type differs, as far as the patcher cares."""
    norm_class: str                 # class name of its RMSNorm modules (decoder layers, final norm, q/k norms)
    eps_attr: str = "variance_epsilon"
    offset: float = 0.0             # 1.0 where the weight stores (scale - 1), zero-initialised (Gemma)
    casting: str = "llama"          # "llama": normalise in fp32, cast, then * w; "gemma": * (1 + w) in fp32, cast last
    softcap_attr: str | None = None  # config field of the final-logit tanh softcap, applied before the loss
    mlp_class: str | None = None    # its MLP when that computes down_proj(act_fn(gate_proj(x)) * up_proj(x))


_GEMMA = dict(eps_attr="eps", offset=1.0, casting="gemma")
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaRMSNorm", mlp_class="LlamaMLP"),  # also SmolLM / SmolLM2 (llama architecture)
    "mistral": Family("MistralRMSNorm", mlp_class="MistralMLP"),
    "qwen2": Family("Qwen2RMSNorm", mlp_class="Qwen2MLP"),
    "qwen3": Family("Qwen3RMSNorm", mlp_class="Qwen3MLP"),
    "smollm3": Family("SmolLM3RMSNorm", mlp_class="SmolLM3MLP"),
    "phi3": Family("Phi3RMSNorm"),              # one fused gate_up_proj: left alone
    "gemma": Family("GemmaRMSNorm", **_GEMMA),
    "gemma2": Family("Gemma2RMSNorm", **_GEMMA, softcap_attr="final_logit_softcapping"),
    "gemma3_text": Family("Gemma3RMSNorm", **_GEMMA, softcap_attr="final_logit_softcapping"),
}

_MISSING = object()
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its live PatchHandle


@dataclass
class PatchHandle:
    """What patch() replaced. `undo()` (or fastchat_ft.unpatch(handle)) puts every original forward back."""
    model_type: str
    rms_norms: int = 0          # RMSNorm modules now running fastchat_ft.kernels.rms_norm
    fused_loss: bool = False    # causal-LM forward computes the loss with fused_linear_cross_entropy
    lora_layers: int = 0        # peft LoRA Linear layers now running fastchat_ft.kernels.lora_linear
    swiglu_mlps: int = 0        # gated MLPs now running fastchat_ft.kernels.swiglu between their projections
    skipped: list[str] = field(default_factory=list)   # what was left alone, and why
    replaced: list[str] = field(default_factory=list)  # qualified names of the modules whose forward is ours
    _model: object = field(default=None, repr=False)
    _saved: list = field(default_factory=list, repr=False)  # (module, forward in its __dict__ before, ours)
    _before: dict = field(default_factory=dict, repr=False)  # id(module) -> (weakref to it, forward before)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def summary(self) -> str:
        parts = [f"{self.rms_norms} RMSNorm -> rms_norm"]
        parts.append("loss -> fused_linear_cross_entropy" if self.fused_loss else "loss unchanged")
        parts.append(f"{self.swiglu_mlps} MLP -> swiglu")
        parts.append(f"{self.lora_layers} LoRA Linear -> lora_linear")
        text = f"fastchat_ft.patch({self.model_type}): " + ", ".join(parts)
        return text + ("; skipped: " + "; ".join(self.skipped) if self.skipped else "")

    def undo(self) -> None:
        """Restore every patched forward, newest first. A forward someone replaced after us (e.g. a trainer
        wrapping ours) is left in place with a warning, since removing it would break their wrapper."""
        for module, before, ours in reversed(self._saved):
            if module.__dict__.get("forward") is not ours:
                log.warning("fastchat_ft.unpatch: %s.forward was replaced after patching; left as it is",
                            type(module).__name__)
                continue
            if before is _MISSING:
                del module.forward
            else:
                module.forward = before
        self._saved.clear()
        self.replaced.clear()
        if self._model is not None:
            _ACTIVE.pop(self._model, None)
        self._model = None

    def _install(self, name: str, module, new_forward) -> None:
        new_forward._fastchat_ft_patch = True  # how patch() knows a deep copy of a patched model
        before = module.__dict__.get("forward", _MISSING)
        bound = types.MethodType(new_forward, module)
        module.forward = bound
        self._saved.append((module, before, bound))
        self._before[id(module)] = (weakref.ref(module), before)
        self.replaced.append(name or type(module).__name__)

    def _call_original(self, module, *args, **kwargs):
        """Run the forward `module` had before patching. A deep copy of a patched model (an EMA or reference
        model) carries our forwards bound to the copy; it gets its own class forward, not the original's."""
        ref, before = self._before.get(id(module), (None, _MISSING))
        if ref is not None and ref() is module and before is not _MISSING:
            return before(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)


def patch(model, *, rms_norm: bool = True, loss: bool = True, lora: bool = True, swiglu: bool = True,
          recompute_down_input: bool | None = None) -> PatchHandle:
    """Swap fastchat-ft kernels into a HF causal LM (or a peft model wrapping one), in place.

    rms_norm: every RMSNorm of the model type runs fastchat_ft.kernels.rms_norm (Gemma's (1 + w) included).
    loss: in training mode, a forward given `labels` (or `shift_labels`) computes HF's causal-LM loss from the
      hidden states with fused_linear_cross_entropy, so the [tokens x vocab] logits are never built
      (outputs.logits is None). `num_items_in_batch` (HF Trainer's gradient-accumulation count) gives
      sum / num_items exactly as HF's loss does; without it the loss is the mean over labelled tokens.
      use_cache defaults to False there, so packed rows (position_ids restarting per document) keep HF's
      per-document attention mask even when config.use_cache is True.
      Eval mode, no labels, or a non-plain lm_head (e.g. a LoRA on lm_head) run the original forward.
    swiglu: every gated MLP of the model type (Llama, Mistral, Qwen2/3, SmolLM3 with a SiLU act_fn) runs
      fastchat_ft.kernels.swiglu between its projections: the same values, one [tokens x intermediate]
      activation less kept for backward per layer (bit-identical to eager on CPU).
    recompute_down_input: with swiglu, the down projection's input (swiglu's output) is not kept for backward
      either but recomputed from gate and up there: a second [tokens x intermediate] activation less per layer
      for one more swiglu forward. None (default): on CUDA tensors, where memory is what runs out and the
      recompute is a small elementwise kernel; off on CPU, where it costs ~1% of a step. Off under activation
      checkpointing or other saved-tensor hooks (they manage saved tensors already).
    lora: dense peft LoRA Linear layers run fastchat_ft.kernels.lora_linear whenever one vanilla adapter is
      active with no dropout; anything else (merged, disabled, several adapters, DoRA, dropout > 0 while
      training, lora_bias) falls back to peft's own forward on that call.
    Returns a PatchHandle; `handle.undo()` restores the model exactly. Logs one line saying what it patched.
    """
    lm = _causal_lm(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelError(f"fastchat_ft.patch does not know model type {model_type!r} ({type(lm).__name__})",
                         field="model_type",
                         fix="supported model types: " + ", ".join(sorted(FAMILIES))
                             + " (SmolLM/SmolLM2 load as llama); use the model unpatched otherwise")
    if lm in _ACTIVE:
        raise ModelError("this model is already patched by fastchat_ft.patch",
                         fix="call handle.undo() (or fastchat_ft.unpatch(handle)) before patching it again")
    if any(_runs_ours(m) for m in model.modules()):
        # a deep copy keeps our forwards: patching again would wrap ours in ours, and undo would restore ours
        raise ModelError("this model is a copy of a patched model (copy.deepcopy keeps our forwards): it runs the "
                         "fastchat-ft kernels already, on its own weights",
                         fix="use it as it is, or copy the model before patching and patch each copy")
    handle = PatchHandle(model_type=model_type)
    try:
        if rms_norm:
            _patch_rms_norms(lm, family, handle)
        if loss:
            _patch_loss(lm, family, handle)
        if swiglu:
            _patch_mlps(lm, family, handle, recompute_down_input)
        if lora:
            _patch_lora(model, handle)
    except BaseException:
        handle.undo()
        raise
    handle._model = lm
    _ACTIVE[lm] = handle
    log.info(handle.summary())
    return handle


def unpatch(handle: PatchHandle) -> None:
    """The same as handle.undo()."""
    handle.undo()


def _runs_ours(module) -> bool:
    return getattr(getattr(module.__dict__.get("forward"), "__func__", None), "_fastchat_ft_patch", False)


def _causal_lm(model):
    """The transformers model under a peft wrapper (PeftModel -> LoraModel -> the HF model), else model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# ----------------------------------------------------------------------------------------------- RMSNorm

def _patch_rms_norms(lm, family: Family, handle: PatchHandle) -> None:
    from fastchat_ft.kernels import rms_norm as rms_norm_kernel

    eps_attr, offset, casting = family.eps_attr, family.offset, family.casting

    def rms_norm_forward(self, hidden_states):
        return rms_norm_kernel(hidden_states, self.weight, getattr(self, eps_attr), offset=offset, casting=casting)

    for name, module in lm.named_modules():
        if type(module).__name__ != family.norm_class:
            continue
        if not hasattr(module, eps_attr) or getattr(module, "weight", None) is None:
            handle.skipped.append(f"{name}: {family.norm_class} without weight/{eps_attr}")
            continue
        handle._install(name, module, rms_norm_forward)
        handle.rms_norms += 1
    if handle.rms_norms == 0:
        handle.skipped.append(f"rms_norm: no {family.norm_class} module found")


# ----------------------------------------------------------------------------------------------- MLP

_SILU_CLASSES = ("SiLUActivation", "SiLU")  # transformers' ACT2FN["silu"] / ["swish"], and torch's own


def _patch_mlps(lm, family: Family, handle: PatchHandle, recompute_down_input: bool | None) -> None:
    from fastchat_ft.kernels import swiglu as swiglu_kernel
    from fastchat_ft.kernels.swiglu import recomputed_for_backward
    from fastchat_ft.model.lora import project_group

    def swiglu_forward(self, x):  # the class forward's computation, with the activation and product fused
        gate, up = project_group(x, (self.gate_proj, self.up_proj))  # one LoRA group when both are ours
        h = swiglu_kernel(gate, up)
        if not (h.is_cuda if recompute_down_input is None else recompute_down_input):
            return self.down_proj(h)
        with recomputed_for_backward(h, gate, up):
            return self.down_proj(h)

    if family.mlp_class is None:
        return
    other_acts: dict[str, int] = {}
    for name, module in lm.named_modules():
        if type(module).__name__ != family.mlp_class:
            continue
        # transformers' own class (not remote code reusing the name) with the three projections it computes with
        if not type(module).__module__.startswith("transformers.models.") or not all(
                hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            handle.skipped.append(f"{name}: {type(module).__module__}.{family.mlp_class} is not transformers' "
                                  "gate/up/down MLP")
            continue
        act = type(getattr(module, "act_fn", None)).__name__
        if act not in _SILU_CLASSES:  # e.g. a Llama config with hidden_act gelu: its MLPs stay as they are
            other_acts[act] = other_acts.get(act, 0) + 1
            continue
        handle._install(name, module, swiglu_forward)
        handle.swiglu_mlps += 1
    for act, count in other_acts.items():
        handle.skipped.append(f"swiglu: {count} {family.mlp_class} with act_fn {act}, not SiLU")


# ----------------------------------------------------------------------------------------------- loss

_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _plain_linear(module) -> bool:
    import torch

    return type(module) is torch.nn.Linear and "forward" not in module.__dict__


def _patch_loss(lm, family: Family, handle: PatchHandle) -> None:
    if not callable(getattr(lm, "get_output_embeddings", None)) or lm.get_output_embeddings() is None:
        handle.skipped.append("loss: the model has no lm_head")
        return
    signature = inspect.signature(lm.forward)

    @functools.wraps(type(lm).forward)  # keeps the signature: Trainer and generate() inspect it
    def fused_loss_forward(self, *args, **kwargs):
        if args:  # positional call: name everything, so labels are found wherever they were passed
            kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop(_var_keyword_name(signature), None) or {})
        head = self.get_output_embeddings()
        wants_loss = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
        if not (self.training and wants_loss and _plain_linear(head) and not kwargs.get("logits_to_keep")):
            return handle._call_original(self, **kwargs)
        return _forward_with_fused_loss(self, head, family, kwargs)

    handle._install("", lm, fused_loss_forward)
    handle.fused_loss = True


def _var_keyword_name(signature) -> str | None:
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return p.name
    return None


def _forward_with_fused_loss(lm, head, family: Family, kwargs: dict):
    """HF's causal-LM forward with the loss taken from the hidden states: the same label shift (pad with
    ignore_index, drop the first), the same normalisation (mean over labelled tokens, or sum / num_items)."""
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastchat_ft.kernels import fused_linear_cross_entropy

    labels = kwargs.pop("labels", None)
    kwargs.pop("logits_to_keep", None)
    num_items, ignore_index, shift_labels = (kwargs.pop(k, None) for k in _LOSS_KWARGS)
    ignore_index = -100 if ignore_index is None else ignore_index
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(lm.config, "return_dict", True)

    # A loss forward never needs a KV cache, and a cache switches off HF's block-diagonal mask for packed rows
    # (position_ids restarting at 0): with config.use_cache=True, packed documents would attend to each other.
    kwargs.setdefault("use_cache", False)
    outputs = lm.base_model(**kwargs)
    hidden = outputs[0]
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    softcap = getattr(lm.config, family.softcap_attr, None) if family.softcap_attr else None
    hidden = hidden.to(head.weight.device)
    loss = fused_linear_cross_entropy(
        hidden, head.weight, shift_labels.to(hidden.device), bias=head.bias, ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum", softcap=softcap, num_items=num_items)
    fields = CausalLMOutputWithPast.__dataclass_fields__
    rest = {k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits")}
    out = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
    return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------- LoRA

def _patch_lora(model, handle: PatchHandle) -> None:
    if "peft" not in sys.modules:  # a model with peft layers has imported peft already
        return
    import torch
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from fastchat_ft.kernels import lora_linear

    def lora_forward(self, x, *args, **kwargs):
        adapter = None if args or kwargs else _single_vanilla_adapter(self)
        if adapter is None:
            return handle._call_original(self, x, *args, **kwargs)
        base = self.base_layer
        return lora_linear(x, base.weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                           self.scaling[adapter], bias=base.bias)

    for name, module in model.named_modules():
        if not isinstance(module, PeftLoraLinear):
            continue
        if type(module) is not PeftLoraLinear or type(module.base_layer) is not torch.nn.Linear \
                or getattr(module, "fan_in_fan_out", False):
            handle.skipped.append(f"{name}: {type(module).__name__} over {type(module.base_layer).__name__} "
                                  "(only dense nn.Linear bases use the kernel)")
            continue
        handle._install(name, module, lora_forward)
        handle.lora_layers += 1


def _single_vanilla_adapter(layer):
    """The adapter name when plain y = base(x) + s * B(A(x)) is exactly what peft would compute now, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if dropout.training and getattr(dropout, "p", 0.0) > 0:
        return None
    if layer.base_layer.weight.requires_grad:  # the kernel treats W as frozen
        return None
    return name
