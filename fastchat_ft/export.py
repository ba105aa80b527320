"""`fastchat-ft export`: from a run directory (or a checkpoint) to a folder people deploy.

Writes the merged model (LoRA merged in float32) or the PEFT adapter, optional GGUF / nf4 copies, the run's
artifacts and a model card, into a staging folder; runs the self-check on what was written and only then
renames it into place. GGUF, artifacts, the self-check and the card live in their own modules.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from fastchat_ft import flags
from fastchat_ft.atomic import readable_by_all, write_text_atomic
from fastchat_ft.errors import ConfigError, FastchatError, ModelError
from fastchat_ft.inference import (ADAPTER_CONFIG, LoadedModel, load_adapter_tensors, load_hf_model, load_model,
                                   merge_lora, read_adapter_config, resolve_model, split_adapter_tensors,
                                   stop_token_ids)

MAX_SHARD_SIZE = "2GB"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


# written into a failed export's kept folder: only a folder carrying it may be replaced by a later failure
FAILED_MARKER = ".fastchat-ft-failed-export"


def check_export_flags(args) -> None:
    """Values that cannot work, refused before the model loads and merges (minutes on a large model)."""
    flags.at_least(args, {"check_max_new_tokens": 1})
    flags.output_folder(Path(args.out).expanduser(), "--out")  # not a file, nor a path under one
    requested = getattr(args, "dtype", None)
    if requested not in (None, "auto") and requested not in DTYPES:
        raise ConfigError(f"unknown dtype {requested!r}", field="--dtype",
                          fix="auto (the base model's), float32, bfloat16 or float16")
    notes = getattr(args, "notes", None)
    if notes is not None:
        path = flags.input_file(notes, "--notes", "pass a text or Markdown file (or leave --notes out)")
        try:
            path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read it as UTF-8 text: {e}", file=str(path), field="--notes",
                              fix="pass a UTF-8 text or Markdown file") from None


def run_export(args) -> int:
    check_export_flags(args)
    run_path = Path(args.run_dir).expanduser()
    out = Path(args.out).expanduser()
    source = resolve_model(run_path)
    _check_out_dir(out, run_path, source)
    mode = "adapter" if getattr(args, "adapter", False) else "merge"
    if mode == "adapter" and source.kind != "lora":
        raise ModelError("this run is a full fine-tune: it has no adapter to export", file=str(source.path),
                         fix="export it without --adapter (the merged model is the model itself)")
    if getattr(args, "four_bit", False):
        from fastchat_ft.export_4bit import check_4bit_available
        check_4bit_available()

    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    print(f"exporting {source.describe()}")
    try:
        loaded = load_model(run_path, device="cpu")
        summary = {"mode": mode, "source": str(source.path), "files": []}
        if mode == "merge":
            dtype = export_dtype(getattr(args, "dtype", None), loaded, source)
            write_merged(loaded, stage, dtype=dtype)
            summary["dtype"] = str(dtype).removeprefix("torch.")
        else:
            summary["adapter"] = write_adapter(source.path, source.base, loaded.tokenizer, stage)
        if getattr(args, "gguf", None):
            from fastchat_ft.export_gguf import write_gguf
            gguf_path = write_gguf(loaded.model, loaded.tokenizer, stage / f"model-{args.gguf}.gguf", args.gguf)
            summary["gguf"] = gguf_path.name
        if getattr(args, "four_bit", False):
            from fastchat_ft.export_4bit import write_4bit
            summary["four_bit"] = write_4bit(stage if mode == "merge" else None, loaded, stage / "nf4")
        from fastchat_ft.export_artifacts import write_artifacts
        artifacts = write_artifacts(source, loaded.tokenizer, stage, notes_file=getattr(args, "notes", None))
        from fastchat_ft.export_selfcheck import self_check
        check = self_check(stage, mode, loaded, artifacts.get("check_prompts"),
                           max_new_tokens=getattr(args, "check_max_new_tokens", None))
        from fastchat_ft.model_card import write_model_card
        write_model_card(stage, source, summary, artifacts, check)
    except BaseException as e:
        if stage.exists():
            failed = _failed_folder(out)
            with contextlib.suppress(OSError):  # e.g. a full disk: the export's own error is the one to report
                (stage / FAILED_MARKER).write_text("kept by a failed `fastchat-ft export`; the next failed export "
                                                   "of the same --out replaces this folder\n")
            stage_abs = stage.resolve()
            stage.rename(failed)
            stage_paths_relocate(failed, stage_abs)
            print(f"export failed; what was written is kept in {failed} for inspection")
            if isinstance(e, FastchatError) and e.file and str(e.file).startswith(str(stage)):
                # the error must name the folder the user can open, not the staging folder just renamed
                e.file = str(failed) + str(e.file)[len(str(stage)):]
                e.args = (e._format(),)
        raise
    readable_by_all(stage)
    stage_abs = stage.resolve()
    stage.rename(out)
    stage_paths_relocate(out, stage_abs)
    print(f"wrote {out}")
    return 0


def _failed_folder(out: Path) -> Path:
    """Where a failed export's files are kept: <out>.failed. An earlier failed export there (it carries
    FAILED_MARKER) is replaced; a folder or file of that name without the marker is the user's and is left
    alone: the next <out>.failed-N is used instead."""
    candidate, n = out.with_name(out.name + ".failed"), 1
    while candidate.exists() or candidate.is_symlink():
        if not candidate.is_symlink() and (candidate / FAILED_MARKER).is_file():
            shutil.rmtree(candidate)
            break
        n += 1
        candidate = out.with_name(f"{out.name}.failed-{n}")
    return candidate


def _check_out_dir(out: Path, run_path: Path, source) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FastchatError("the output folder already exists and is not empty", file=str(out),
                            fix="choose a new --out (export never overwrites)")
    out_r = out.resolve()
    for p in (run_path, source.path, source.base):
        if p is not None and (out_r == p.resolve() or p.resolve() in out_r.parents):
            raise FastchatError("--out must not be inside the run or model being exported", file=str(out),
                                fix="write the export next to the run directory, not inside it")
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)


def export_dtype(requested: str | None, loaded: LoadedModel, source):
    """The dtype to save in: the user's choice, else the base model's own dtype (merging happened in float32
    either way; a bf16 base saved as fp32 would double the size for no gain)."""
    import torch

    if requested and requested != "auto":  # a name check_export_flags accepted
        return getattr(torch, DTYPES[requested])
    folder = source.base if source.kind == "lora" else source.path
    conf = json.loads((folder / "config.json").read_text())
    name = conf.get("dtype") or conf.get("torch_dtype") or "float32"
    return getattr(torch, DTYPES.get(name, "float32"))


def write_merged(loaded: LoadedModel, out: Path, *, dtype=None, max_shard_size: str = MAX_SHARD_SIZE) -> None:
    """config.json, generation_config.json (eos includes the end-of-turn token), sharded safetensors,
    tokenizer files with the chat template in both tokenizer_config.json and chat_template.jinja."""
    import copy

    import torch

    model = loaded.model
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)  # keep the float32 merged model for the self-check
    set_stop_tokens(model, loaded.tokenizer)
    model.config.dtype = dtype or torch.float32
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    save_tokenizer(loaded.tokenizer, out)


def set_stop_tokens(model, tokenizer) -> list[int]:
    """generation_config (what vLLM and transformers' generate read) and config.json stop on the end-of-turn
    token as well as on eos."""
    ids = stop_token_ids(tokenizer, model)
    _fill_generation_config(model.generation_config, tokenizer, ids)
    model.config.eos_token_id = model.generation_config.eos_token_id
    return ids


def _fill_generation_config(gen, tokenizer, ids: list[int]) -> None:
    gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[-1]
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id


def adapter_generation_config(base: Path, tokenizer):
    """An adapter folder's generation_config.json: the base's, with the end-of-turn stop added. vLLM reads it
    with `--generation-config ADAPTER_DIR`; the base's own file may not know the chat template's stop token."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:
        gen = GenerationConfig()
    ids = stop_token_ids(tokenizer)
    for i in ([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id or []):
        if i not in ids:
            ids.append(i)
    _fill_generation_config(gen, tokenizer, ids)
    return gen


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    # Some loaders (older transformers, vLLM's tokenizer paths, hand-written scripts) read the template only
    # from tokenizer_config.json; newer transformers writes it to chat_template.jinja. Write both.
    conf_path = out / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text())
    conf["chat_template"] = tokenizer.chat_template
    write_text_atomic(conf_path, json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


def write_adapter(ckpt: Path, base: Path, tokenizer, out: Path) -> dict:
    """The PEFT adapter: lora_A/lora_B only, in PEFT key names, which both peft and vLLM load. When training
    replaced whole tensors (added tokens resized the vocabulary, or modules_to_save), vLLM refuses those inside
    an adapter, so they go into a base copy in out/base/ and the adapter points there."""
    import torch
    from safetensors.torch import save_file

    conf = read_adapter_config(ckpt)
    lora, full = split_adapter_tensors(load_adapter_tensors(ckpt))
    tensors = {}
    for mod, ab in sorted(lora.items()):
        for which in ("A", "B"):
            tensors[f"base_model.model.{mod}.lora_{which}.weight"] = ab[which].contiguous()
    info = {"lora_modules": len(lora), "base_copy": None}
    base_for_adapter = base.resolve()
    if full:
        base_copy = out / "base"
        model = load_hf_model(base, dtype=torch.float32)
        merge_lora(model, {"r": 1, "lora_alpha": 1}, {f"base_model.model.{k}.weight": v for k, v in full.items()})
        set_stop_tokens(model, tokenizer)
        model.save_pretrained(base_copy, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        save_tokenizer(tokenizer, base_copy)
        info["base_copy"] = "base"
        info["full_tensors"] = sorted(full)
        base_for_adapter = base_copy.resolve()
    conf = {k: v for k, v in conf.items() if k not in ("modules_to_save", "trainable_token_indices")}
    conf.update(peft_type="LORA", task_type="CAUSAL_LM", inference_mode=True,
                base_model_name_or_path=str(base_for_adapter))
    conf.setdefault("bias", "none")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_generation_config(base_for_adapter, tokenizer).save_pretrained(out)
    write_text_atomic(out / ADAPTER_CONFIG, json.dumps(conf, indent=2) + "\n")
    save_tokenizer(tokenizer, out)
    return info


def stage_paths_relocate(out: Path, stage: Path) -> None:
    """After the staging folder is renamed, absolute paths written into it must point at the final place."""
    conf_path = out / ADAPTER_CONFIG
    if conf_path.is_file():
        conf = json.loads(conf_path.read_text())
        base = conf.get("base_model_name_or_path", "")
        if base.startswith(str(stage)):
            conf["base_model_name_or_path"] = str(out.resolve()) + base[len(str(stage)):]
            write_text_atomic(conf_path, json.dumps(conf, indent=2) + "\n")

