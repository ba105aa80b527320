"""Command-line parsing only. Each subcommand names one function elsewhere that does the work.

Handlers are imported lazily (by "module:function") so `fastchat-ft --help` stays fast and a
subcommand whose implementation has not landed says so instead of printing fake output.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from fastchat_ft import __version__
from fastchat_ft.errors import ConfigError, FastchatError, NotBuiltYet

# subcommand -> (implementing "module:function", one-line help). The function takes the parsed args
# and returns an exit code (None means 0).
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("fastchat_ft.data.validate:run_validate", "check a ChatML JSONL dataset; list every problem with file:line"),
    "analyze": ("fastchat_ft.data.analyze:run_analyze", "dataset statistics: turns, tokens, lengths, diversity, packing estimate"),
    "split": ("fastchat_ft.data.split:run_split", "deterministic train/validation split with no near-duplicates across it"),
    "train": ("fastchat_ft.engine.train:run_train", "fine-tune a model (LoRA, QLoRA or full) on ChatML data"),
    "eval": ("fastchat_ft.engine.evaluate:run_eval", "loss, perplexity and token accuracy, optionally against a baseline"),
    "generate": ("fastchat_ft.generate:run_generate", "chat with a model or a LoRA checkpoint"),
    "export": ("fastchat_ft.export:run_export", "write a merged model, a PEFT adapter, GGUF and the run's artifacts"),
    "serve": ("fastchat_ft.serve:run_serve", "a quick OpenAI-compatible endpoint for local testing"),
    "bench": ("fastchat_ft.bench:run_bench", "train side by side with HF Trainer and print the ratios"),
    "distill": ("fastchat_ft.engine.distill:run_distill", "knowledge distillation from a teacher to a student model"),
}


TEMPLATES = "chatml, llama3, llama2, mistral, alpaca, tokenizer"  # the names data/encode.py knows


def _add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="ChatML .jsonl or .json file")
    p.add_argument("--tokenizer", help="model or tokenizer folder, for length and trainable-token checks")
    p.add_argument("--template", default="chatml", help=f"chat template ({TEMPLATES})")
    p.add_argument("--max-seq-len", type=int, default=None, help="flag conversations longer than this")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--fix", metavar="OUT", help="write a cleaned copy to OUT and the rejects beside it (input untouched)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="near duplicate: estimated Jaccard of word 3-grams")
    p.add_argument("--no-near-duplicates", action="store_true", help="skip the MinHash near-duplicate check")
    p.add_argument("--max-issues", type=int, default=200, help="issues printed (0: all; --json lists all)")
    p.add_argument("--system-prompt", default=None, help="system turn for conversations without one, as the config's "
                   "system_prompt (default, as training: the model's own template's default system prompt, if any; "
                   "'': none)")


def _add_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="ChatML .jsonl or .json file")
    p.add_argument("--tokenizer", help="model or tokenizer folder (default: the default model's)")
    p.add_argument("--template", default="chatml", help=f"chat template ({TEMPLATES})")
    p.add_argument("--max-seq-len", type=int, default=2048, help="training sequence length: longer conversations "
                   "count as over-long (see --overlong)")
    p.add_argument("--budget", type=int, default=None, help="token budget to check against")
    p.add_argument("--plot", metavar="PNG", help="write a length histogram")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch (steps estimate)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (steps estimate)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (steps estimate)")
    p.add_argument("--overlong", choices=["drop", "truncate"], default="drop", help="as training treats over-long conversations")
    p.add_argument("--system-prompt", default=None, help="system turn for conversations without one, as the config's "
                   "system_prompt (default, as training: the model's own template's default system prompt, if any; "
                   "'': none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="ChatML .jsonl or .json file (left untouched)")
    p.add_argument("--val-ratio", type=float, default=0.1, help="share of conversations for validation, 0 to 1")
    p.add_argument("--seed", type=int, default=0, help="which conversations go to validation (same seed, same split)")
    p.add_argument("--out-dir", default=None, help="where to write <name>.train.jsonl and <name>.val.jsonl")
    p.add_argument("--near-threshold", type=float, default=0.8, help="near duplicate: estimated Jaccard of word 3-grams")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (Axolotl key names); default: the bundled demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--base-model", help="HF model folder (overrides base_model)")
    p.add_argument("--data", action="append", help="ChatML file (overrides datasets; without a config, validation "
                   "holds out val_set_size of it, 5%% unless set, instead of the demo's validation file)")
    p.add_argument("--val-data", action="append", help="ChatML validation file (overrides test_datasets)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides max_steps)")
    p.add_argument("--output-dir", help="run directory (overrides output_dir)")
    p.add_argument("--dry-run", action="store_true", help="check everything, estimate memory and time, and exit")
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest (or a given) checkpoint")
    p.add_argument("--skip-bad-batches", action="store_true", help="skip a batch whose loss is NaN/inf instead of stopping")
    p.add_argument("--nproc", type=int, default=None, help="shortcut for torchrun --nproc-per-node N")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder, run directory or checkpoint")
    p.add_argument("--data", required=True, help="ChatML file")
    p.add_argument("--baseline", help="model folder to compare against")
    p.add_argument("--template", default=None, help=f"chat template ({TEMPLATES}; default: the run's training "
                   "template, else the model's own)")
    p.add_argument("--max-seq-len", type=int, default=None, help="longer conversations are left out of the metrics "
                   "(default: the run's sequence_len when --model is a run or its checkpoint, else 2048)")
    p.add_argument("--samples", type=int, default=0, help="write a side-by-side report of N generations (0: none)")
    p.add_argument("--report", help="where --samples writes its Markdown (default: eval-samples-<model>.md)")
    p.add_argument("--train-data", help="training file for the memorisation check (default: the run's train split)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation limit for --samples")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder, run directory or LoRA checkpoint")
    p.add_argument("--prompt", help="one user message; omit for an interactive chat")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop a reply after this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above 0, up to 2: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to this "
                   "probability mass (0 < p <= 1; with --temperature above 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own Python code")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (its final model) or one of its checkpoints")
    p.add_argument("--out", required=True, help="new (or empty) folder to write the export into")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="merged full-precision model (default)")
    mode.add_argument("--adapter", action="store_true", help="PEFT adapter only")
    p.add_argument("--gguf", choices=["q8_0", "f16"], help="also write a GGUF file")
    p.add_argument("--4bit", dest="four_bit", action="store_true", help="also write a bitsandbytes nf4 copy")
    p.add_argument("--notes", help="your notes on how the data was made (for generation_notes.md)")
    p.add_argument("--dtype", default="auto", help="merged weights dtype: auto (the base's), float32, bfloat16, float16")
    p.add_argument("--check-max-new-tokens", type=int, default=None,
                   help="self-check: a reply must end within this many tokens (default: from the validation answers)")


def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, run directory or LoRA checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM when installed, else the built-in transformers server")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default max_tokens of a request")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own Python code")


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run, at least 2 (the first is warm-up, "
                   "not timed; default: 12 on CPU, 20 on GPU)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON report and the loss-curve PNG")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when a GPU is visible (Llama 1B/8B shapes, bf16), else cpu (the default model, fp32)")
    p.add_argument("--base-model", help="HF model folder (default: SmolLM2-135M-Instruct on CPU, random Llama 1B/8B on GPU)")
    p.add_argument("--models", help="GPU mode: comma-separated subset of llama-1b,llama-8b")
    p.add_argument("--tokenizer", help="GPU mode: folder with the tokenizer files of the random-weight models "
                   "(default: the default model's; a GPU machine without it can carry just these files)")
    p.add_argument("--data", help="ChatML training file (default: the bundled demo on CPU, --gpu-data on GPU)")
    p.add_argument("--val-data", help="ChatML validation file (default: the one that goes with the training data)")
    p.add_argument("--gpu-data", choices=["multi-turn", "demo"], default="multi-turn",
                   help="GPU mode without --data: multi-turn conversations built from the demo's exchanges (a few "
                        "hundred to ~2000 tokens, fastchat_ft/bench_data.py), or the demo itself (~60 tokens each)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="conversations per micro-batch (default: 4 on CPU; on GPU sized by model and GPU memory)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimizer step (default: 4 on CPU; on GPU sized with --micro-batch)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine decay (default: 1e-3 CPU, 2e-4 GPU)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="longer conversations are dropped by all three (default: 256 CPU, 2048 GPU)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on all linear layers; alpha is twice the rank")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: all cores on CPU)")
    p.add_argument("--seed", type=int, default=42, help="LoRA init, data order and the GPU mode's data and weights")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of (a), (b), (c) in turn; each is reported by its median round (shared machines are noisy)")
    p.add_argument("--engine-rows", choices=["micro_batch", "step"], default="micro_batch",
                   help="(c)'s layout: one packed row per micro-batch (default, as HF), or each optimizer step's "
                        "conversations as one packed row (same effective batch, one forward per step)")
    p.add_argument("--cpu-merge-tokens", type=int, default=None,
                   help="(c) on CPU: the engine's cpu_merge_tokens (consecutive micro-batches run as one forward up "
                        "to this many tokens; default: the engine's default, 1024; 0: one forward per micro-batch)")


def _add_distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher: model folder, run directory or LoRA checkpoint")
    p.add_argument("--student", required=True, help="student HF model folder (same tokenizer as the teacher)")
    p.add_argument("--data", required=True, help="ChatML training file")
    p.add_argument("--val-data", help="ChatML validation file (default: hold out val_set_size of --data)")
    p.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl",
                   help="divergence between teacher and student token distributions")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation loss vs the label loss")
    p.add_argument("--temperature", type=float, default=1.0, help="softens both distributions (loss scaled by T^2)")
    p.add_argument("--jsd-beta", type=float, default=0.5, help="JSD mixture weight of the teacher")
    p.add_argument("--chunk-size", type=int, default=None, help="label tokens per loss chunk (default: memory budget)")
    p.add_argument("--adapter", choices=["full", "lora"], default=None, help="train the student whole (default) or LoRA")
    p.add_argument("--learning-rate", type=float, default=None, help="peak learning rate (overrides learning_rate)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides max_steps; default: "
                   "num_epochs over the data)")
    p.add_argument("--config", help="YAML training config for the student (Axolotl keys), default: distill defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest (or a given) checkpoint")
    p.add_argument("--output-dir", default="runs/distill", help="run directory for the student (default: runs/distill)")
    p.add_argument("--nproc", type=int, default=None, help="shortcut for torchrun --nproc-per-node N")


ARGUMENTS = {
    "validate": _add_validate, "analyze": _add_analyze, "split": _add_split, "train": _add_train,
    "eval": _add_eval, "generate": _add_generate, "export": _add_export, "serve": _add_serve,
    "bench": _add_bench, "distill": _add_distill,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastchat-ft", description="Fast, exact fine-tuning for chat datasets.")
    parser.add_argument("--version", action="version", version=f"fastchat-ft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](p)
        # `fastchat-ft validate x.jsonl --debug` is where users add it; SUPPRESS keeps an earlier `--debug` set
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    return parser


def resolve_handler(command: str):
    """Import the function behind a subcommand, or raise NotBuiltYet if it has not landed."""
    target, _ = COMMANDS[command]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise NotBuiltYet(f"`fastchat-ft {command}` is not built yet ({target} does not exist).") from None
        raise
    func = getattr(module, func_name, None)
    if func is None:
        raise NotBuiltYet(f"`fastchat-ft {command}` is not built yet ({target} does not exist).")
    return func


def check_resume_value(args) -> None:
    """`fastchat-ft train --resume my.yaml`: --resume takes an optional checkpoint, so argparse hands it the config
    and the run would start on the bundled demo config, failing only after its data and model load."""
    resume = getattr(args, "resume", None)
    if args.command == "train" and args.config is None and resume and resume.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"--resume took {resume} as the checkpoint to resume (its value is optional), so no config "
                          "was given", field="--resume",
                          fix=f"put the config first: fastchat-ft train {resume} --resume")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (their text starts "fastchat-ft: ") print as `warning: ...`: the default format adds our
    source file, line and code, which reads like a traceback to a user. Others keep Python's format."""
    text = str(message)
    if text.startswith("fastchat-ft: "):
        return f"warning: {text[len('fastchat-ft: '):]}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    formatwarning = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _format_warning
    try:
        check_resume_value(args)
        return resolve_handler(args.command)(args) or 0
    except FastchatError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fastchat-ft validate x.jsonl | head` closed the pipe: not an error of ours. Python would also report
        # the pipe again when it flushes stdout at exit, so stdout goes to devnull first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell tool killed by the closed pipe exits with
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    raise SystemExit(main())
