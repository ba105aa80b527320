"""The training config: one dataclass with Axolotl's key names, YAML load/save, `KEY=VALUE` overrides and
validation that names the bad key and suggests a fix. It does not load models or data.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastchat_ft.atomic import write_text_atomic
from fastchat_ft.errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CONFIG = ASSETS / "default.yaml"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEMPLATES = ("chatml", "llama3", "llama2", "mistral", "alpaca", "tokenizer")


@dataclass
class TrainConfig:
    # --- model ---
    base_model: str | None = None          # local HF folder; None = the default SmolLM2-135M-Instruct (converted once)
    trust_remote_code: bool = False        # run code shipped inside the model folder: only for folders you trust
    # --- data ---
    datasets: list = field(default_factory=list)       # [{path, type: chat_template, chat_template, train_on, ...}]
    test_datasets: list = field(default_factory=list)  # held-out files; otherwise val_set_size splits datasets
    val_set_size: float = 0.0              # fraction (<1) or count (>=1) of conversations held out for validation
    chat_template: str = "chatml"          # chatml | llama3 | llama2 | mistral | alpaca | tokenizer (model's Jinja)
    sequence_len: int = 2048               # tokens per packed row; longer conversations follow excess_length_strategy
    sample_packing: bool = True            # pack conversations into rows; attention never crosses conversations
    excess_length_strategy: str = "drop"   # drop | truncate (at a turn boundary)
    train_on_inputs: bool = False          # True: also learn the prompt tokens (rarely what you want for chat)
    # loader options; a datasets / test_datasets entry may override them for its file (files are packed per option set)
    train_on: str | None = None            # assistant | all | last_assistant; null: from train_on_inputs
    # system turn given to conversations that have none (theirs is kept); null: the model's own template's default
    # system prompt when it adds one (what inference will prompt with; data/template_defaults.py); "": none
    system_prompt: str | None = None
    think: str = "keep"                    # keep | strip_history (drop <think> blocks of earlier assistant turns)
    allow_special_in_content: bool = False  # True: special-token text in content acts as a control token (HF's way)
    on_error: str = "raise"                # raise: stop at file:line | skip: leave out, list in <file>.rejects.jsonl
    # --- adapter ---
    adapter: str | None = "lora"           # lora | qlora (CUDA + bitsandbytes) | null (full fine-tuning)
    lora_r: int = 16                       # rank: 8-64 covers most chat tuning; memory grows linearly
    lora_alpha: int = 32                   # scale = alpha / r; alpha = 2r is the common choice
    lora_dropout: float = 0.0              # 0 keeps the fused LoRA kernel path; 0.05 is Axolotl's usual value
    lora_target_modules: list = field(default_factory=lambda: list(ALL_LINEAR))  # module names to adapt
    # --- optimisation ---
    learning_rate: float | None = None     # None = 2e-4 with an adapter, 2e-5 for full fine-tuning
    num_epochs: float = 3                  # passes over the training data
    max_steps: int | None = None           # stop after this many optimizer steps (overrides num_epochs)
    micro_batch_size: int = 2              # rows per forward pass
    gradient_accumulation_steps: int = 8   # micro-batches per optimizer step (effective batch 16 rows)
    loss_normalization: str = "token"      # token: every label token weighs the same in the global batch; sequence: every conversation does
    optimizer: str = "adamw"               # AdamW (fused kernel on CUDA)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"           # cosine | linear | constant (all after warmup)
    warmup_ratio: float = 0.1              # share of the steps spent warming up linearly from 0
    max_grad_norm: float = 1.0             # clip the global gradient norm; 0 turns clipping off
    seed: int = 42
    # --- speed and memory ---
    bf16: str | bool = "auto"              # auto: bf16 autocast on a GPU that supports it, fp32 on CPU
    gradient_checkpointing: bool = False   # recompute activations in backward: ~30% slower, far less memory
    # CPU, one process: a step's consecutive micro-batches run as ONE forward (their rows joined into one packed row)
    # while together at most this many tokens; same loss and gradients (normalised per optimizer step), fewer and
    # larger matmuls; activation memory grows with it. 0: one forward per micro-batch. GPU: not applied.
    cpu_merge_tokens: int = 1024
    torch_compile: bool = False            # compile the decoder layers (slow first steps, faster after)
    parallelism: str = "auto"              # under torchrun: auto (FSDP2 for full fine-tuning, DDP for LoRA/QLoRA) | ddp | fsdp
    # --- evaluation, logging, checkpoints ---
    output_dir: str = "runs/fastchat-ft"
    overwrite_output_dir: bool = False     # allow a new run over a finished or checkpointed one in output_dir
    logging_steps: int = 1
    eval_steps: int | None = None          # evaluate every N optimizer steps; None = evals_per_epoch
    evals_per_epoch: int = 2
    sample_prompts: int = 2                # validation prompts whose generations go to samples.jsonl
    sample_max_new_tokens: int = 64
    save_steps: int | None = None          # checkpoint every N steps; None = at each evaluation
    save_total_limit: int = 2              # keep the last K checkpoints
    dry_run_steps: int = 3                 # timed steps in --dry-run

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 2e-4 if self.adapter else 2e-5

    def resolved_train_on(self) -> str:
        """What the loader trains on: train_on, else Axolotl's train_on_inputs mapped to all / assistant."""
        return self.train_on or ("all" if self.train_on_inputs else "assistant")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
CHOICES = {
    "adapter": ("lora", "qlora", None),
    "chat_template": TEMPLATES,
    "excess_length_strategy": ("drop", "truncate"),
    "loss_normalization": ("token", "sequence"),
    "optimizer": ("adamw", "adamw_torch", "adamw_torch_fused"),
    "lr_scheduler": ("cosine", "linear", "constant"),
    "bf16": ("auto", True, False),
    "parallelism": ("auto", "ddp", "fsdp"),
    "train_on": ("assistant", "all", "last_assistant", None),
    "think": ("keep", "strip_history"),
    "on_error": ("raise", "skip"),
}
LOADER_KEYS = ("train_on", "system_prompt", "think", "allow_special_in_content", "on_error")
POSITIVE = ("sequence_len", "micro_batch_size", "gradient_accumulation_steps", "lora_r", "lora_alpha",
            "num_epochs", "logging_steps", "evals_per_epoch", "save_total_limit", "dry_run_steps")


def _suggest(name: str, choices) -> str | None:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return close[0] if close else None


def _check_type(key: str, value: Any, source: str | None) -> Any:
    """Coerce ints to floats where a float is expected; reject anything else of the wrong type."""
    hint = _HINTS[key]
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    for t in allowed:
        origin = typing.get_origin(t) or t
        if t is type(None):
            continue
        if origin is int and isinstance(value, bool):
            continue
        if isinstance(value, origin):
            return value
    names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"expected {names}, got {value!r}", file=source, field=key,
                      fix=f"set {key} to a {names} value")


def _check_datasets(key: str, entries: list, source: str | None) -> list:
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"entry {i} must be a mapping with a 'path'", file=source, field=key,
                              fix=f"write {key}: [{{path: data.jsonl, type: chat_template}}]")
        allowed = ("path", "type", "chat_template", "split") + LOADER_KEYS
        for k in entry:
            if k not in allowed:
                hint = _suggest(k, allowed)
                raise ConfigError(f"unknown key '{k}' in entry {i}", file=source, field=key,
                                  fix=f"did you mean '{hint}'?" if hint else f"allowed: {', '.join(allowed)}")
        _check_loader_overrides(key, i, entry, source)
        if not isinstance(entry.get("path"), str):
            raise ConfigError(f"entry {i} needs a 'path'", file=source, field=key,
                              fix=f"write {key}: [{{path: data.jsonl, type: chat_template}}]")
        kind = entry.get("type", "chat_template")
        if kind not in ("chat_template", "chatml"):
            raise ConfigError(f"dataset type '{kind}' is not supported", file=source, field=key,
                              fix="use type: chat_template (ChatML/OpenAI messages or ShareGPT records)")
        template = entry.get("chat_template")
        if template is not None and template not in TEMPLATES:
            hint = _suggest(template, TEMPLATES)
            raise ConfigError(f"unknown chat_template '{template}' in entry {i}", file=source, field=key,
                              fix=f"did you mean '{hint}'?" if hint else f"one of {', '.join(TEMPLATES)}")
        out.append(dict(entry, type="chat_template"))
    return out


def _check_loader_overrides(key: str, i: int, entry: dict, source: str | None) -> None:
    """A dataset entry may override the top-level loader options for its file (its files are packed apart)."""
    for k in LOADER_KEYS:
        value = entry.get(k)
        if value is None:
            continue  # not set (or null): the top-level value applies
        if k in CHOICES and value not in CHOICES[k]:
            shown = ", ".join(str(c) for c in CHOICES[k] if c is not None)
            raise ConfigError(f"{k} '{value}' in entry {i} is not one of: {shown}", file=source, field=key,
                              fix=f"set {k} to one of: {shown} (or leave it out for the top-level value)")
        expected = bool if k == "allow_special_in_content" else str
        if not isinstance(value, expected):
            raise ConfigError(f"{k} in entry {i} must be a {expected.__name__}, got {value!r}", file=source,
                              field=key, fix=f"write {k}: {'true' if expected is bool else 'some text'}")


def validate(cfg: TrainConfig, source: str | None = None) -> TrainConfig:
    """Check every value; raise ConfigError naming the first bad key and how to fix it."""
    for key in FIELDS:
        value = getattr(cfg, key)
        value = _check_type(key, value, source)
        setattr(cfg, key, value)
        if key in CHOICES and value not in CHOICES[key]:
            hint = _suggest(value, [c for c in CHOICES[key] if c is not None])
            shown = ", ".join("null" if c is None else str(c) for c in CHOICES[key])
            raise ConfigError(f"'{value}' is not one of: {shown}", file=source, field=key,
                              fix=f"did you mean '{hint}'? (allowed: {shown})" if hint else f"use one of: {shown}")
        # `--set x=.nan` / `.inf` read as floats; NaN passes every comparison, so test finiteness first
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"must be a finite number, got {value}", file=source, field=key,
                              fix=f"set {key} to a finite number (or leave it out for the default)")
        if key in POSITIVE and not value > 0:
            raise ConfigError(f"must be > 0, got {value}", file=source, field=key, fix=f"set {key} to a positive value")
    for key in ("learning_rate", "lora_dropout", "warmup_ratio", "val_set_size", "weight_decay", "max_grad_norm",
                "cpu_merge_tokens"):
        value = getattr(cfg, key)
        if value is not None and not value >= 0:
            raise ConfigError(f"must be >= 0, got {value}", file=source, field=key, fix=f"set {key} to 0 or more")
    if not 0 <= cfg.seed < 2**63:  # torch, numpy and the native packer take a non-negative 64-bit seed
        raise ConfigError(f"must be a non-negative integer, got {cfg.seed}", file=source, field="seed",
                          fix="set seed to 0 or more, e.g. 42")
    if not cfg.lora_dropout < 1 or not cfg.warmup_ratio < 1:
        bad = "lora_dropout" if not cfg.lora_dropout < 1 else "warmup_ratio"
        raise ConfigError(f"must be < 1, got {getattr(cfg, bad)}", file=source, field=bad, fix="use a fraction such as 0.1")
    for key in ("max_steps", "eval_steps", "save_steps"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"must be a positive step count or null, got {value}", file=source, field=key,
                              fix=f"remove {key} or set it to a positive integer")
    if not all(isinstance(m, str) for m in cfg.lora_target_modules) or not cfg.lora_target_modules:
        raise ConfigError("must be a non-empty list of module names", file=source, field="lora_target_modules",
                          fix=f"e.g. {ALL_LINEAR}")
    if cfg.parallelism == "fsdp" and cfg.adapter:
        raise ConfigError("FSDP2 shards full fine-tuning; LoRA/QLoRA train a few weights and use DDP", file=source,
                          field="parallelism", fix="set parallelism: auto (or ddp), or adapter: null for full fine-tuning")
    if cfg.train_on is not None and cfg.train_on_inputs and cfg.train_on != "all":
        raise ConfigError(f"train_on: {cfg.train_on} contradicts train_on_inputs: true (which means train_on: all)",
                          file=source, field="train_on", fix="remove train_on_inputs (train_on replaces it), "
                          "or set train_on: all")
    cfg.datasets = _check_datasets("datasets", cfg.datasets, source)
    cfg.test_datasets = _check_datasets("test_datasets", cfg.test_datasets, source)
    return cfg


def from_dict(data: dict, source: str | None = None) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of keys to values", file=source,
                          fix="write one `key: value` per line (see fastchat_ft/assets/default.yaml)")
    for key in data:
        if key not in FIELDS:
            hint = _suggest(key, FIELDS)
            raise ConfigError(f"unknown key '{key}'", file=source, field=str(key),
                              fix=f"did you mean '{hint}'?" if hint else "see fastchat_ft/assets/default.yaml for the keys")
    cfg = validate(TrainConfig(**data), source)
    if cfg.train_on is not None:
        if "train_on_inputs" in data and cfg.train_on_inputs != (cfg.train_on == "all"):
            inputs = str(cfg.train_on_inputs).lower()
            raise ConfigError(f"train_on: {cfg.train_on} contradicts train_on_inputs: {inputs}", file=source,
                              field="train_on",
                              fix="remove train_on_inputs (train_on replaces it), or make them agree "
                                  "(train_on_inputs: true is train_on: all)")
        cfg.train_on_inputs = cfg.train_on == "all"  # the saved config reads back without a contradiction
    if "chat_template" not in data:
        # Axolotl-style configs name the template per dataset; every file is packed with one template, so the
        # datasets' own choice applies when no top-level chat_template is given (it was silently ignored before)
        named = sorted({e["chat_template"] for e in cfg.datasets + cfg.test_datasets if e.get("chat_template")})
        if len(named) > 1:
            raise ConfigError(f"the datasets name different chat_templates ({', '.join(named)})", file=source,
                              field="datasets", fix="every file is rendered with one template: set a top-level "
                              "chat_template, or the same chat_template on every dataset")
        if named:
            cfg.chat_template = named[0]
    return cfg


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (the bundled demo when path is None), apply KEY=VALUE overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if path.is_dir():
        raise ConfigError("is a folder, not a config file", file=str(path),
                          fix="pass the path of a YAML file (e.g. fastchat_ft/assets/default.yaml)")
    if not path.is_file():
        raise ConfigError("config file not found", file=str(path), fix="pass the path of a YAML file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}", file=str(path),
                          line=raw.count(b"\n", 0, e.start) + 1,
                          fix="save the file as UTF-8 (or remove the stray bytes on that line)") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(e.problem, file=str(path), line=e.problem_mark.line + 1, field=e.key,
                          fix=f"keep one '{e.key}' (YAML would silently use the last)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"not valid YAML: {getattr(e, 'problem', e)}", file=str(path),
                          line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
                          fix="check indentation and quoting on that line") from None
    if data is None:  # an empty file: every default
        data = {}
    if not isinstance(data, dict):  # a list or a plain string would fail later in apply_overrides
        raise ConfigError(f"the file must hold a mapping of keys to values, not a {type(data).__name__}",
                          file=str(path), fix="write one `key: value` per line (see fastchat_ft/assets/default.yaml)")
    data = _resolve_relative_paths(data, path.parent)
    try:
        return from_dict_with_overrides(data, overrides or [], str(path))
    except ConfigError as e:  # a key or value from this file: name its line, as a YAML syntax error does
        line = _key_lines(text).get(e.field) if e.file == str(path) and e.line is None else None
        if line is None:
            raise
        raise type(e)(e.reason, file=e.file, line=line, field=e.field, fix=e.fix) from None


def _key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key of a YAML mapping (the text has loaded already, so it composes)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


class _DuplicateKey(yaml.constructor.ConstructorError):
    def __init__(self, key: str, first_line: int, mark):
        super().__init__(None, None, f"duplicate key '{key}' (first set on line {first_line})", mark)
        self.key = key


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=False)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(str(key), first, key_node.start_mark)
        return super().construct_mapping(node, deep)


def from_dict_with_overrides(data: dict, overrides: list[str], source: str | None = None) -> TrainConfig:
    """from_dict(apply_overrides(...)), with an error about an overridden key blamed on its `--set`, not the file."""
    data = apply_overrides(data, overrides)
    try:
        return from_dict(data, source)
    except ConfigError as e:
        item = _override_for(overrides, e.field)
        if item is None:
            raise
        key, _, raw = item.partition("=")
        key, fix = key.strip(), e.fix
        hint = _HINTS.get(key)
        wants_str = hint is str or str in typing.get_args(hint)
        if wants_str and isinstance(data[key], (dict, list)):  # `a: b` or `[x]` in a value reads as YAML, not text
            quoted = raw.replace('"', '\\"')
            fix = f"quote the value so it stays text: --set '{key}=\"{quoted}\"'"
        raise ConfigError(e.reason, file=f"--set {item}", field=e.field, fix=fix) from None


def _override_for(overrides: list[str], field: str | None) -> str | None:
    """The last `--set` item that set this key (the one whose value was used), or None."""
    for item in reversed(overrides):
        if field is not None and item.partition("=")[0].strip() == field:
            return item
    return None


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Dataset paths in a YAML file are relative to that file, so a config works from any directory."""
    for key in ("datasets", "test_datasets"):
        entries = data.get(key)
        if isinstance(entries, list):
            data[key] = [dict(e, path=str((base / e["path"]).resolve()))
                         if isinstance(e, dict) and isinstance(e.get("path"), str) and not os.path.isabs(e["path"])
                         else e for e in entries]
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set key=value`: the value is parsed as YAML, so numbers, booleans, null and lists work."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not KEY=VALUE", field="--set", fix="e.g. --set learning_rate=1e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        data[key] = value
    return data


def save(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (tmp file + rename)."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
