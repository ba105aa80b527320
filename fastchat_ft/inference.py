"""Turn what training wrote (an HF model folder, a run directory, a full or LoRA checkpoint) into a ready
transformers model + tokenizer, and stream chat replies that stop at the template's end-of-turn token.

LoRA is applied without peft: the base named in adapter_config.json is loaded and each delta B @ A is
merged in float32 in memory. Loading is safe by default (safetensors, no remote code). `ChatStream` is the
one generation loop that generate, eval samples, export's self-check and serve all share.
"""
from __future__ import annotations

import inspect
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

from fastchat_ft.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class ModelSource:
    """Where the weights of one model come from. kind is "model" (a plain HF folder) or "lora"."""
    kind: str
    path: Path                      # the HF folder, or the LoRA checkpoint folder
    base: Path | None = None        # LoRA only: the base model folder from adapter_config.json
    run_dir: Path | None = None     # set when the user gave a run directory
    tokenizer_dir: Path | None = None

    def describe(self) -> str:
        if self.kind == "lora":
            return f"LoRA checkpoint {self.path} on base {self.base}"
        return f"model {self.path}"


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: ModelSource
    notes: list[str] = field(default_factory=list)


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        folder.glob(pat) for pat in ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in ckpts.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def resolve_model(path: str | Path) -> ModelSource:
    """Find the weights behind PATH: a run dir (its final/, else its latest checkpoint), a LoRA checkpoint
    (adapter_config.json) or an HF model folder (config.json + weights)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError("no such model folder", file=str(p), fix="give a model folder, a run directory or a checkpoint")
    run_dir = None
    if p.is_dir() and not (p / ADAPTER_CONFIG).exists() and not _has_weights(p):
        run_dir = p
        chosen = p / "final" if (p / "final").is_dir() else latest_checkpoint(p)
        if chosen is None:
            raise ModelError("not a model folder, LoRA checkpoint or run directory (no config.json, "
                             "adapter_config.json, final/ or checkpoints/step-*)", file=str(p),
                             fix="point at the run's output_dir, one of its checkpoints, or an HF model folder")
        p = chosen
    if (p / ADAPTER_CONFIG).is_file():
        conf = read_adapter_config(p)
        base = conf.get("base_model_name_or_path")
        if not base:
            raise ModelError("adapter_config.json has no base_model_name_or_path", file=str(p / ADAPTER_CONFIG),
                             field="base_model_name_or_path", fix="set it to the base model's folder")
        base_path = Path(base).expanduser()
        if not base_path.is_absolute():
            base_path = (p / base_path).resolve()
        if not _has_weights(base_path):
            raise ModelError(f"the adapter's base model folder {base_path} has no config.json + weights",
                             file=str(p / ADAPTER_CONFIG), field="base_model_name_or_path",
                             fix="point base_model_name_or_path at a local HF model folder (nothing is downloaded)")
        tok_dir = p if (p / "tokenizer_config.json").is_file() else base_path
        return ModelSource("lora", p, base=base_path, run_dir=run_dir, tokenizer_dir=tok_dir)
    if not _has_weights(p):
        raise ModelError("folder has no config.json + model weights", file=str(p),
                         fix="give an HF model folder, a run directory or a checkpoint")
    return ModelSource("model", p, run_dir=run_dir, tokenizer_dir=p)


def read_adapter_config(folder: Path) -> dict:
    try:
        conf = json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"invalid JSON: {e.msg}", file=str(folder / ADAPTER_CONFIG), line=e.lineno,
                         column=e.colno) from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"peft_type {conf.get('peft_type')!r} is not supported", file=str(folder / ADAPTER_CONFIG),
                         field="peft_type", fix="only LoRA adapters can be merged")
    for unsupported in ("use_dora", "lora_bias"):
        if conf.get(unsupported):
            raise ModelError(f"{unsupported}=true is not supported", file=str(folder / ADAPTER_CONFIG),
                             field=unsupported, fix="merge it with peft's merge_and_unload() first")
    return conf


def load_adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"no {ADAPTER_WEIGHTS}", file=str(folder),
                         fix="the checkpoint must hold the adapter in safetensors (pickled .bin is not loaded)")
    return load_file(str(weights))


def split_adapter_tensors(tensors: dict) -> tuple[dict, dict]:
    """PEFT keys -> ({module path: {"A": t, "B": t}}, {module path: full weight}). Full weights are the
    modules_to_save / resized-embedding tensors; both of PEFT's spellings are accepted."""
    lora, full, trained_copy = {}, {}, {}
    for key, t in tensors.items():
        name = key.removeprefix("base_model.model.")
        m = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".original_module." in name:  # peft keeps the frozen original beside the trained copy
            continue
        elif re.search(r"\.modules_to_save(\.[^.]+)?\.weight$", name):
            trained_copy[re.sub(r"\.modules_to_save(\.[^.]+)?\.weight$", "", name)] = t
        elif name.endswith(".weight"):
            full[name.removesuffix(".weight")] = t
        else:
            raise ModelError(f"unexpected tensor {key!r} in the adapter", fix="re-save the adapter with peft")
    full.update(trained_copy)  # the trained modules_to_save copy wins over any plain saved layer
    for mod, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(f"module {mod} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return lora, full


def lora_scale(conf: dict, module: str) -> float:
    r = conf.get("r", 8)
    alpha = conf.get("lora_alpha", r)
    for pattern, value in (conf.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            r = value
    for pattern, value in (conf.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r


def merge_lora(model, conf: dict, tensors: dict) -> dict:
    """Merge LoRA deltas (and whole modules_to_save tensors) into `model` in place, in float32.
    Returns {"merged": n_modules, "full": [names], "resized_to": vocab or None}."""
    import torch

    lora, full = split_adapter_tensors(tensors)
    modules = dict(model.named_modules())
    resized_to = None
    emb = full.get("model.embed_tokens")
    if emb is not None and emb.shape[0] != model.get_input_embeddings().weight.shape[0]:
        resized_to = emb.shape[0]
        model.resize_token_embeddings(resized_to, mean_resizing=False)
        modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in full.items():
            target = modules.get(name)
            if target is None or tuple(target.weight.shape) != tuple(weight.shape):
                have = None if target is None else tuple(target.weight.shape)
                raise ModelError(f"adapter tensor {name} {tuple(weight.shape)} does not fit the base model ({have})",
                                 fix="use the base model the adapter was trained on")
            target.weight.copy_(weight.to(target.weight.dtype))
        for name, ab in lora.items():
            target = modules.get(name)
            if target is None or not hasattr(target, "weight"):
                raise ModelError(f"the adapter targets {name}, which the base model does not have",
                                 fix="use the base model the adapter was trained on")
            delta = (ab["B"].float() @ ab["A"].float()) * lora_scale(conf, name)
            if conf.get("fan_in_fan_out"):
                delta = delta.T
            if tuple(delta.shape) != tuple(target.weight.shape):
                raise ModelError(f"LoRA delta for {name} has shape {tuple(delta.shape)}, weight is "
                                 f"{tuple(target.weight.shape)}", fix="use the base model the adapter was trained on")
            target.weight.copy_((target.weight.float() + delta).to(target.weight.dtype))
    return {"merged": len(lora), "full": sorted(full), "resized_to": resized_to}


def _use_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists()


def load_hf_model(folder: Path, *, dtype=None, trust_remote_code: bool = False, device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            use_safetensors=_use_safetensors(folder), low_cpu_mem_usage=True)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused an object in a pickle weights file
        raise ModelError("a pickle weights file in this folder holds more than tensors (it could run code on load); "
                         f"refused: {str(e).splitlines()[0]}", file=str(folder),
                         fix="use a folder with .safetensors weights (convert it where you trust its origin)") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError("this model needs its own Python code (trust_remote_code)", file=str(folder),
                             fix="pass --trust-remote-code only if you trust this folder's code") from None
        raise
    if device:
        model.to(device)
    return model.eval()


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from fastchat_ft.model.load import TOKENIZER_FILES

    # without this check transformers ends in a long ValueError about sentencepiece/tiktoken that names no folder
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError("the model folder has no tokenizer (" + ", ".join(TOKENIZER_FILES) + ")", file=str(folder),
                         fix="copy the model's tokenizer files into this folder (tokenizer.save_pretrained(folder))")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        if "trust_remote_code" in str(e):
            raise ModelError("this tokenizer needs its own Python code (trust_remote_code)", file=str(folder),
                             fix="pass --trust-remote-code only if you trust this folder's code") from None
        raise ModelError(f"transformers could not load the tokenizer: {str(e).splitlines()[0]}", file=str(folder),
                         fix="check that tokenizer.json / tokenizer_config.json are complete and readable") from e
    if not getattr(tok, "chat_template", None):
        raise ModelError("the tokenizer has no chat template", file=str(folder),
                         fix="save the tokenizer with its chat_template (tokenizer_config.json or chat_template.jinja)")
    return tok


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, *, dtype=None, device: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load a model folder, run dir or checkpoint for inference. LoRA is merged in float32 before any cast."""
    import torch

    source = resolve_model(path)
    tokenizer = load_tokenizer(source.tokenizer_dir, trust_remote_code=trust_remote_code)
    notes = []
    if source.kind == "lora":
        conf = read_adapter_config(source.path)
        model = load_hf_model(source.base, dtype=torch.float32, trust_remote_code=trust_remote_code)
        info = merge_lora(model, conf, load_adapter_tensors(source.path))
        notes.append(f"merged {info['merged']} LoRA modules in float32"
                     + (f"; embeddings resized to {info['resized_to']}" if info["resized_to"] else ""))
        if dtype is not None and dtype != torch.float32:
            model.to(dtype)
    else:
        model = load_hf_model(source.path, dtype=dtype, trust_remote_code=trust_remote_code)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}",
                         file=str(source.tokenizer_dir), fix="use the tokenizer saved with this checkpoint")
    model.to(device or default_device())
    return LoadedModel(model, tokenizer, source, notes)


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in this tokenizer's chat template (e.g. <|im_end|>,
    <|eot_id|>, </s>), found by rendering a sentinel reply and reading what the template puts after it."""
    sentinel = "FASTCHAT_SENTINEL_REPLY"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # templates that reject this shape: fall back to eos
        text = ""
    after = text.split(sentinel, 1)[1].lstrip(" \t\n") if sentinel in text else ""
    candidates = sorted((t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t),
                        key=len, reverse=True)
    for tok in candidates:
        if after.startswith(tok):
            return tok
    if tokenizer.eos_token:
        return tokenizer.eos_token
    raise ModelError("cannot tell which token ends an assistant turn (template adds none and there is no eos_token)",
                     fix="set eos_token in tokenizer_config.json")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """End-of-turn token first, then eos ids from the tokenizer and generation_config, without duplicates."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))]
    extra = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        extra += gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    for i in extra:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


class ChatStream:
    """Stream one assistant reply: iterate for text pieces; afterwards `.text`, `.token_ids`,
    `.finish_reason` ("stop" when an end-of-turn/eos token or one of the `stop` strings ended it, "length" at
    max_new_tokens) and `.prompt_tokens` are set. A stop string is left out of the text, as OpenAI does. Hand-written (a KV-cache loop rather than `model.generate` + a streamer
    thread) so the caller gets text as it is decoded, without a thread, and knows exactly why it stopped."""

    def __init__(self, model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop_ids=None,
                 stop: list[str] | tuple[str, ...] = ()):
        problem = sampling_problem(temperature, top_p)
        if problem:  # callers check their own flags; this keeps torch's "invalid multinomial distribution" away
            raise ValueError(problem[1])
        self.model, self.tokenizer = model, tokenizer
        self.messages, self.max_new_tokens = messages, max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
        self.stop = [s for s in stop if s]
        self.prompt_ids = chat_prompt_ids(tokenizer, messages)
        self.prompt_tokens = len(self.prompt_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def __iter__(self):
        import torch

        device = next(self.model.parameters()).device
        gen = None
        if self.temperature > 0:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        ids = torch.tensor([self.prompt_ids], device=device)
        # transformers 5.x renamed past_key_values to cache; older releases (>=4.51 is supported) lack it
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        past, emitted, cut = None, 0, None
        with torch.inference_mode():
            for _ in range(self.max_new_tokens):
                out = self.model(input_ids=ids, use_cache=True, **{cache_kw: past})
                past = out.get(cache_kw)
                next_id = _pick(out.logits[0, -1].float(), self.temperature, self.top_p, gen)
                if next_id in self.stop_ids:
                    self.finish_reason = "stop"
                    break
                self.token_ids.append(next_id)
                text = self.tokenizer.decode(self.token_ids, skip_special_tokens=False)
                cut = _stop_at(text, self.stop)
                if cut is not None:
                    self.finish_reason = "stop"
                    break
                # a trailing U+FFFD may be half a UTF-8 character that the next token completes, and a tail that
                # begins a stop string may be completed by the next tokens: hold both back
                stable = _without_stop_prefix(text.rstrip("\ufffd"), self.stop)
                if len(stable) > emitted:
                    yield stable[emitted:]
                    emitted = len(stable)
                ids = torch.tensor([[next_id]], device=device)
            else:
                self.finish_reason = "length"
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=False)[:cut]
        if len(self.text) > emitted:
            yield self.text[emitted:]

    def run(self) -> str:
        for _ in self:
            pass
        return self.text


def _stop_at(text: str, stop: list[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _without_stop_prefix(text: str, stop: list[str]) -> str:
    """text less its longest tail that is the start of a stop string."""
    for n in range(min(len(text), max((len(s) for s in stop), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return text[:-n]
    return text


def sampling_problem(temperature: float, top_p: float) -> tuple[str, str] | None:
    """(name, reason) of a sampling value outside OpenAI's ranges, or None. One rule for generate's flags and
    serve's requests: a negative temperature is not the greedy decoding that 0 means, and sampling with top_p 0
    keeps no token (torch.multinomial fails on the empty distribution). Greedy decoding (temperature 0) uses no
    top_p, so there 0 is as good as any value in OpenAI's [0, 1]."""
    if not 0 <= temperature <= 2:  # written so that NaN fails too
        return "temperature", f"temperature must be in [0, 2] (0: greedy), got {temperature}"
    if not 0 <= top_p <= 1:
        return "top_p", f"top_p must be in [0, 1] (above 0 when sampling), got {top_p}"
    if top_p == 0 and temperature > 0:
        return "top_p", (f"top_p must be above 0 when sampling (temperature {temperature}), got 0: it keeps no "
                         "token")
    return None


def _pick(logits, temperature: float, top_p: float, gen) -> int:
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation rendered by the model's own template, ending with the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the template writes any bos itself; adding special tokens again would double it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat(loaded: LoadedModel, messages: list[dict], **kw) -> ChatStream:
    return ChatStream(loaded.model, loaded.tokenizer, messages, **kw)
