"""Per-conversation attention for packed rows: a transformers attention function ("fastchat_packed") that reads the
conversation boundaries from position ids (a restart at 0 starts a conversation) and attends within each
conversation only, instead of SDPA over the whole row with a [L x L] document mask (which costs the full score
matrix and the mask build). On CUDA in fp16/bf16 all conversations of the batch go through one variable-length
flash-attention call (torch.nn.attention.varlen); elsewhere, causal SDPA per conversation. Anything else (a
padding mask, a KV cache, q_len != kv_len) goes to transformers' sdpa.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch

from fastchat_ft.model import cpu_attention
from fastchat_ft.model.lora import project_group

NAME = "fastchat_packed"
_registered = False
# (position_ids tensor, its segments): every layer of one forward gets the same tensor, so the host sync that
# reads the boundaries happens once per forward, not once per layer
_last: list = [None, None]


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[(start, end)] per batch row. A new sequence starts wherever the position id does not step by +1, the
    rule transformers' find_packed_sequence_indices uses, so both agree on every row."""
    rows = []
    for row in position_ids:
        starts = [0] + ((row[1:] - row[:-1]) != 1).nonzero().flatten().add(1).tolist()
        rows.append(list(zip(starts, starts[1:] + [row.numel()])))
    return rows


def _cached_segments(position_ids):
    if _last[0] is not position_ids:
        _last[0], _last[1] = position_ids, segments(position_ids)
        _last_cu[0] = _last_cpu[0] = None
    return _last[1]


# [(cu_seqlens on the device, longest conversation)] for the position ids in _last: built once per forward
_last_cu: list = [None]
# [(starts, lengths, longest)] over the flattened batch, for the CPU kernel: also once per forward
_last_cpu: list = [None]


def flat_segments(segs: list[list[tuple[int, int]]], width: int):
    """Conversation starts and lengths over the batch flattened to [B * L] tokens, and the longest."""
    starts = [b * width + s for b, row in enumerate(segs) for s, _ in row]
    lengths = [e - s for row in segs for s, e in row]
    return starts, lengths, max(lengths)


def _cached_flat_segments(position_ids, width: int):
    """flat_segments of these position ids, once per forward."""
    all_segs = _cached_segments(position_ids)
    if _last_cpu[0] is None:
        _last_cpu[0] = flat_segments(all_segs, width)
    return _last_cpu[0]


def cu_seqlens(segs: list[list[tuple[int, int]]], width: int, device) -> tuple[torch.Tensor, int]:
    """Cumulative conversation starts over the batch flattened to [B * L] tokens (int32, as flash-attention takes
    them), and the longest conversation."""
    bounds = [b * width + s for b, row in enumerate(segs) for s, _ in row] + [len(segs) * width]
    longest = max(e - s for row in segs for s, e in row)
    return torch.tensor(bounds, dtype=torch.int32, device=device), longest


@functools.lru_cache(maxsize=1)
def _varlen_kernel():
    """torch's variable-length flash attention and how to call it causally, or None where this torch lacks it.
    Its keywords moved between releases (2.10: is_causal=True; later: window_size=(-1, 0), enable_gqa), so the
    signature is read rather than the version."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


_HALF = (torch.float16, torch.bfloat16)  # flash attention's dtypes


def varlen_enabled(query: torch.Tensor, dropout: float) -> bool:
    """One varlen call for the whole batch: CUDA, half precision (flash attention's dtypes), no dropout, a head
    size flash attention takes. (The engine routes CUDA models here unless FASTCHAT_FT_VARLEN=0, engine/loss.py.)"""
    return (query.is_cuda and query.dtype in _HALF and not dropout
            and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256 and _varlen_kernel() is not None)


def varlen_attention(query, key, value, cu, longest: int, scaling, kernel=None):
    """query [B, H, L, D], key/value [B, KV, L, D], cu from cu_seqlens -> [B, L, H, D]: every conversation of
    every row attends causally to itself, in one kernel call over the flattened [B * L] tokens. `kernel`
    (tests) replaces _varlen_kernel()."""
    fn, causal, has_gqa, has_scale = kernel or _varlen_kernel()
    b, h, length, d = query.shape
    q = query.transpose(1, 2).reshape(b * length, h, d)
    k = key.transpose(1, 2).reshape(b * length, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * length, value.shape[1], d)
    kw = dict(causal)
    if k.shape[1] != h:
        if has_gqa:
            kw["enable_gqa"] = True
        else:  # an older varlen without GQA: share each KV head explicitly
            k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    if scaling is not None and has_scale:
        kw["scale"] = scaling
    out = fn(q, k, v, cu, cu, longest, longest, **kw)
    return out.view(b, length, h, d)


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """query [B, H, L, D], key/value [B, KV, L, D] -> [B, L, H, D], as transformers' sdpa_attention_forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    if (attention_mask is not None or position_ids is None or q_len != key.shape[2] or q_len < 2
            or is_causal is False or not getattr(module, "is_causal", True) or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or getattr(module, "sliding_window", None)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    all_segs = _cached_segments(position_ids)
    if varlen_enabled(query, dropout) and (scaling is None or _varlen_kernel()[3]):
        if _last_cu[0] is None:
            _last_cu[0] = cu_seqlens(all_segs, q_len, query.device)
        return varlen_attention(query, key, value, *_last_cu[0], scaling), None
    starts, lengths, longest = _cached_flat_segments(position_ids, q_len)
    if cpu_attention.usable(query, key, dropout, longest):
        b, heads, _, d = query.shape
        # [B, H, L, D] views of the projections' [B, L, H, D] outputs: back to token-major, a copy only if needed
        q, k, v = (t.transpose(1, 2).reshape(b * q_len, t.shape[1], d) for t in (query, key, value))
        out = cpu_attention.packed_causal_attention(q, k, v, starts, lengths, d ** -0.5 if scaling is None else scaling)
        return out.view(b, q_len, heads, d), None
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, segs in enumerate(all_segs):
        if len(segs) == 1:  # one conversation: the plain causal kernel over the whole row
            segs_out = [torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1], key[b:b + 1], value[b:b + 1], dropout_p=dropout, scale=scaling, is_causal=True,
                enable_gqa=gqa)]
        else:  # split, not slices: split's backward is one cat, a slice's is a zero-filled full-size buffer each
            sizes = [e - s for s, e in segs]
            parts = zip(*(t[b:b + 1].split(sizes, dim=2) for t in (query, key, value)))
            segs_out = [torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa) for q, k, v in parts]
        rows.append(segs_out[0] if len(segs_out) == 1 else torch.cat(segs_out, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def _packed_mask(*args, **kwargs):
    """No mask for full-length rows without a 2D attention mask: the case where transformers reads packing from
    position ids, which the attention function splits on. Otherwise sdpa's mask, always materialised (no
    is_causal skip), so the attention function sees it and defers to sdpa with transformers' own semantics (an
    explicit 2D mask means plain causal attention over the row, padding aside)."""
    from transformers.masking_utils import sdpa_mask

    packed = (not args and kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
              and not kwargs.get("q_offset", 0) and not kwargs.get("kv_offset", 0))
    return None if packed else sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


def register() -> str:
    """Make NAME known to transformers (attention and mask interfaces); idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, packed_attention_forward)
        AttentionMaskInterface.register(NAME, _packed_mask)
        _registered = True
    return NAME


# decoders whose every layer is plain causal self-attention (no sliding window, softcap, sinks or overlays), so a
# row's only mask is causal-within-conversation; others keep transformers' masks
PLAIN_CAUSAL_MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def supports(config) -> bool:
    layer_types = getattr(config, "layer_types", None) or ()
    return (getattr(config, "model_type", None) in PLAIN_CAUSAL_MODELS
            and getattr(config, "sliding_window", None) is None
            and all(t == "full_attention" for t in layer_types))


def cuda_varlen_ready(model) -> bool:
    """On CUDA, whether the engine's forward would reach the single varlen flash call: this torch has it and the
    model computes in half precision (its weights, or the autocast around the step). Elsewhere per-conversation
    attention is a Python loop of SDPA calls, which on a GPU has not been measured against transformers' path."""
    if _varlen_kernel() is None:
        return False
    param = next(model.parameters(), None)
    return (param is not None and param.dtype in _HALF) or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in _HALF)


def describe(model, *, device: str, half: bool) -> str:
    """What attention a packed forward of this model runs, in words (the bench's table and JSON)."""
    name = getattr(model.config, "_attn_implementation", None)
    if name != NAME:
        return f"{name} with a block-diagonal mask from position ids" if name == "sdpa" else str(name)
    if device == "cuda" and half and _varlen_kernel() is not None:
        return "per conversation: one varlen flash-attention call per layer (torch.nn.attention.varlen)"
    if device == "cpu" and not half and cpu_attention.enabled():
        return (f"per conversation: one native CPU attention call per layer (conversations over "
                f"{cpu_attention.MAX_LENGTH} tokens: causal SDPA)")
    return "per conversation: causal SDPA for each conversation of the row"


def _fused_rotary_classes() -> tuple:
    """Attention classes whose forward is exactly Llama's (q/k/v projections, HF's rotate_half rotary, the attention
    function, o_proj), so the fused-rotary forward below computes what theirs does. The classes themselves, not
    their names: remote-code models reuse the name "LlamaAttention" for other maths."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    return (LlamaAttention,)


def _fused_rotary_forward(module, original, *args, **kwargs):
    """A Llama attention forward that hands the raw q and k with the rotary tables to the native CPU kernel, which
    rotates them as it copies them (model/cpu_attention.py): the ~10 elementwise passes over q and k that rotary
    costs forward and backward (~1% of a SmolLM2 CPU step) are gone. Anything else (a mask, a cache, GPU tensors,
    conversations over the kernel's limit, FASTCHAT_FT_CPU_ROTARY=0) runs the module's own forward."""
    hidden = kwargs.get("hidden_states")
    position_ids = kwargs.get("position_ids")
    embeddings = kwargs.get("position_embeddings")
    if (args or hidden is None or position_ids is None or embeddings is None or hidden.dim() != 3
            or kwargs.get("attention_mask") is not None
            or any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "past_key_value"))
            or module.config._attn_implementation != NAME or (module.training and module.attention_dropout)
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(hidden.device.type)
            or os.environ.get("FASTCHAT_FT_CPU_ROTARY", "1") == "0"):
        return original(*args, **kwargs)
    b, length, _ = hidden.shape
    d = module.head_dim
    cos, sin = embeddings
    config = module.config
    if (position_ids.shape != (b, length) or cos.shape != (b, length, d) or cos.dtype != torch.float32
            or cos.requires_grad or d % 2):
        return original(*args, **kwargs)
    starts, lengths, longest = _cached_flat_segments(position_ids, length)
    if not cpu_attention.usable_for(hidden.device, hidden.dtype, config.num_attention_heads,
                                    config.num_key_value_heads, d, 0.0, longest):
        return original(*args, **kwargs)
    q, k, v = (t.view(b * length, -1, d) for t in project_group(hidden, (module.q_proj, module.k_proj, module.v_proj)))
    if q.dtype != torch.float32 or k.shape[1] != config.num_key_value_heads:
        raise RuntimeError(f"fused rotary attention: unexpected projections q {tuple(q.shape)} {q.dtype}, "
                           f"k {tuple(k.shape)} for the config's {config.num_key_value_heads} kv heads")
    out = cpu_attention.packed_causal_attention(q, k, v, starts, lengths, module.scaling,
                                                cos.reshape(b * length, d), sin.reshape(b * length, d))
    return module.o_proj(out.view(b, length, -1)), None


def use_fused_rotary(model) -> int:
    """Give every Llama attention module of the model the fused-rotary forward (per instance; idempotent).
    Returns how many modules have it."""
    count = 0
    classes = _fused_rotary_classes()
    for module in model.modules():
        if type(module) not in classes:
            continue
        current = module.__dict__.get("forward")
        if not (isinstance(current, functools.partial) and current.func is _fused_rotary_forward):
            module.forward = functools.partial(_fused_rotary_forward, module, module.forward)
        count += 1
    return count


def use_packed_attention(model) -> bool:
    """Switch a model that runs transformers' sdpa to per-conversation attention; other implementations (eager,
    flash, flex), models outside PLAIN_CAUSAL_MODELS and wrappers without set_attn_implementation (DDP views)
    are left alone. Returns whether the model now runs it."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not supports(config) or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        return False
    use_fused_rotary(model)  # it checks per call that the packed CPU path applies, else runs the original forward
    return True
