"""README.md model card for an exported model: what it is, how to load it (transformers, peft, vLLM,
llama.cpp), the data statistics, the hyperparameters, the evaluation metrics and the self-check results.
"""
from __future__ import annotations

import json
from pathlib import Path

HYPERPARAMETERS = ("base_model", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "learning_rate", "lr_scheduler", "warmup_ratio", "num_epochs", "max_steps", "micro_batch_size",
                   "gradient_accumulation_steps", "sequence_len", "sample_packing", "optimizer", "weight_decay",
                   "max_grad_norm", "seed", "bf16")


def write_model_card(out: Path, source, summary: dict, artifacts: dict, check: dict) -> None:
    (out / "README.md").write_text(model_card(out, source, summary, artifacts, check))


def model_card(out: Path, source, summary: dict, artifacts: dict, check: dict) -> str:
    config = artifacts.get("config") or {}
    base = config.get("base_model") or (str(source.base) if source.base else str(source.path))
    mode = summary["mode"]
    front = ["---", "library_name: " + ("peft" if mode == "adapter" else "transformers"),
             f"base_model: {base}", "tags:", "- fastchat-ft", "- chat", "- " + ("lora" if source.kind == "lora" else "full-finetune")]
    if summary.get("gguf"):
        front.append("- gguf")
    front += ["---", ""]
    lines = front + [f"# Fine-tuned chat model ({'PEFT adapter' if mode == 'adapter' else 'merged weights'})", "",
                     f"Fine-tuned from `{base}` with fastchat-ft ({_kind(source)}), exported from `{source.path}`.",
                     "Replies use the model's chat template (saved with the tokenizer) and end with the "
                     f"end-of-turn token `{check.get('end_of_turn', {}).get('token', '?')}`, which "
                     "`generation_config.json` lists as a stop token.", ""]
    rank = None
    if mode == "adapter" and (Path(source.path) / "adapter_config.json").is_file():
        from fastchat_ft.inference import read_adapter_config
        from fastchat_ft.serve import vllm_max_lora_rank
        rank = vllm_max_lora_rank(read_adapter_config(Path(source.path)))
    lines += ["## Use it", ""] + _usage(mode, summary, rank) + [""]
    lines += _data_section(artifacts)
    lines += _hyperparameter_section(config)
    lines += _metrics_section(artifacts)
    lines += _check_section(check)
    files = ["config.json + model*.safetensors + generation_config.json" if mode == "merge"
             else "adapter_config.json + adapter_model.safetensors",
             "tokenizer.json, tokenizer_config.json (with chat_template), chat_template.jinja"]
    if summary.get("adapter", {}).get("base_copy"):
        files.append("base/: the base model with the trained embedding rows (added tokens) the adapter needs")
    if summary.get("gguf"):
        merged = " (merged weights, runs without the adapter)" if mode == "adapter" else ""
        files.append(f"{summary['gguf']}: GGUF for llama.cpp / Ollama{merged}")
    if summary.get("four_bit"):
        files.append("nf4/: bitsandbytes 4-bit (nf4, double quantization) copy")
    files += [f for f in artifacts.get("files", [])]
    lines += ["## Files", ""] + [f"- {f}" for f in files] + [""]
    return "\n".join(lines)


def _kind(source) -> str:
    return "LoRA, merged in float32" if source.kind == "lora" else "full fine-tune"


def _usage(mode: str, summary: dict, max_lora_rank: int | None = None) -> list[str]:
    if mode == "merge":
        lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                 "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
                 # return_dict: transformers 5 returns a dict (BatchEncoding) here anyway; 4.x a bare tensor
                 "inputs = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi!\"}], "
                 "add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
                 "out = model.generate(**inputs, max_new_tokens=256)",
                 "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", "",
                 "```bash", "vllm serve PATH            # or: fastchat-ft serve PATH", "```"]
    else:
        base = "PATH/base" if summary.get("adapter", {}).get("base_copy") else "BASE_MODEL"
        lines = ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                 f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), PATH)", "```",
                 "", "```bash", f"vllm serve {base} --enable-lora --lora-modules finetuned=PATH"
                 + (f" --max-lora-rank {max_lora_rank}" if max_lora_rank else "") + " --generation-config PATH",
                 "```", "", "`--generation-config PATH` gives vLLM this folder's stop tokens (the end-of-turn token "
                 "included), which the base model's own generation_config.json may lack; `--max-lora-rank` admits "
                 "the adapter's rank (vLLM's default, 16, refuses a larger one)."]
    if summary.get("gguf"):
        lines += ["", "```bash", f"llama-cli -m PATH/{summary['gguf']} -cnv", "```"]
    return lines


def _data_section(artifacts: dict) -> list[str]:
    from fastchat_ft.export_artifacts import split_summary

    ds = artifacts.get("dataset_info") or {}
    rows = [(n, split_summary(d)) for n, d in ds.items() if n in ("train", "val")]
    rows = [(n, s) for n, s in rows if s["examples"]]
    if not rows:
        return ["## Data", "", "No training splits were found in the run directory.", ""]
    lines = ["## Data", "", "| split | conversations | tokens | trainable tokens | tokens/conversation (mean, max) "
             "| multi-turn | distinct-2 |", "|---|---|---|---|---|---|---|"]
    na = lambda v: "n/a" if v is None else v  # noqa: E731
    for name, s in rows:
        lines.append(f"| {name} | {s['examples']} | {na(s['tokens'])} | {na(s['trainable_tokens'])} | "
                     f"{na(s['tokens_mean'])}, {na(s['tokens_max'])} | {s['multi_turn_ratio']:.1%} | "
                     f"{s['distinct_2']:.3f} |")
    lines += ["", "How the data was made: see `generation_notes.md`; statistics in `dataset_info.json`.", ""]
    return lines


def _hyperparameter_section(config: dict) -> list[str]:
    if not config:
        return []
    lines = ["## Training hyperparameters", "", "| key | value |", "|---|---|"]
    for key in HYPERPARAMETERS:
        if key in config:
            lines.append(f"| {key} | {json.dumps(config[key]) if not isinstance(config[key], str) else config[key]} |")
    lines += ["", "The full resolved config is in `training_config.yaml`.", ""]
    return lines


def _metrics_section(artifacts: dict) -> list[str]:
    losses = artifacts.get("losses") or {}
    if not losses:
        return ["## Evaluation", "", "The run recorded no metrics.", ""]
    from fastchat_ft.export_artifacts import stopped_run_last_validation

    keys = (("val_loss", "loss"), ("val_ppl", "perplexity"), ("val_token_acc", "token accuracy"))
    after = {key: losses.get(key + "_after") for key, _ in keys}
    column, stop_note = "after training", []
    # a stopped run skipped its final evaluation: its last metrics row is no "after training" (with one
    # measurement it is step 0's again), so the card shows the last measurement, as generation_notes.md does
    stopped = stopped_run_last_validation(losses)
    if stopped:
        if stopped["only"]:
            after = dict.fromkeys(after)
            stop_note = ["", f"Not measured after training: {stopped['why']}; the first measurement is the only one."]
        else:
            column = f"last measured (step {stopped['step']})"
            same_row = losses["eval_steps"][1] == stopped["step"]  # ppl/accuracy come from the metrics' last row
            after = {key: v if same_row else None for key, v in after.items()} | {"val_loss": stopped["val_loss"]}
            stop_note = ["", f"The last column is the last measurement, not one after training: {stopped['why']}."]
    lines = ["## Evaluation", "", "Validation metrics on trainable (assistant) tokens, as logged by training:", "",
             f"| metric | before training | {column} |", "|---|---|---|"]
    for key, label in keys:
        if f"{key}_before" in losses or f"{key}_after" in losses:
            lines.append(f"| {label} | {_fmt(losses.get(key + '_before'))} | {_fmt(after[key])} |")
    lines += stop_note
    if "steps" in losses:
        lines += ["", f"Trained for {losses['steps']} steps; training loss {_fmt(losses.get('train_loss_first'))} "
                      f"at the first step, {_fmt(losses.get('train_loss_last'))} at the last."]
    lines += ["", "Re-measure with `fastchat-ft eval --model PATH --data VAL_FILE --baseline BASE`.", ""]
    return lines


def _check_section(check: dict) -> list[str]:
    if not check:
        return []
    lines = ["## Export self-check", "", f"Passed: {'yes' if check.get('passed') else 'no'}.", ""]
    rl = check.get("reload_logits")
    if rl:
        lines.append(f"- reloaded with transformers: logits max relative difference {rl['max_rel_diff']:.2e} "
                     f"({rl['dtype']})")
    lines.append(f"- chat template round-trips: {'yes' if check.get('template_roundtrip') else 'no'}")
    for p in check.get("prompts", []):
        lines.append(f"- {p['prompt'][:60]!r}: stopped after {p['tokens']} tokens" if p["stopped"]
                     else f"- {p['prompt'][:60]!r}: did not stop")
    for name, g in (check.get("gguf") or {}).items():
        lines.append(f"- {name}: logits cosine {g['cosine']:.5f}, top-1 agreement {g['top1_agreement']:.0%}")
    return lines + [""]


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
