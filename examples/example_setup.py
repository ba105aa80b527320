"""What the three examples share: their command-line flags, the model and tokenizer (a tiny random Llama with a
byte-level BPE trained on your data in a second, or a real HF folder with --model), the packed ChatDataset and
the optional peft LoRA. Not part of the fastchat_ft package; each example script stays short by importing it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

import fastchat_ft
from fastchat_ft.data import ChatDataset

DEMO_DATA = Path(fastchat_ft.__file__).parent / "assets" / "demo" / "train.jsonl"
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="a local HF causal-LM folder (Llama/SmolLM, Mistral, Qwen2/3, Gemma, ...); "
                                   "default: a tiny random Llama, so the script runs in seconds on a CPU")
    p.add_argument("--data", default=str(DEMO_DATA), help="chat .jsonl/.json (OpenAI messages or ShareGPT)")
    p.add_argument("--template", default="chatml", help="chatml, llama3, ... or 'tokenizer' (the model's own "
                                                        "chat template)")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 for the tiny model, 2e-5 (full) or "
                                                         "2e-4 (LoRA) for a real one")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="peft LoRA rank on every linear layer "
                                                                     "(0: full fine-tuning)")
    p.add_argument("--no-patch", action="store_true", help="train without fastchat_ft.patch (to compare)")
    p.add_argument("--output", default=None, help="output folder (default: runs/<example name>)")
    p.add_argument("--report", default=None, help="write the losses and batch facts to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not Path(args.data).is_file():
        p.error(f"--data {args.data} not found")
    if args.lr is None:
        args.lr = 3e-3 if not args.model else 2e-4 if args.lora else 2e-5
    return args


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer_and_model(args):
    """A real model folder, or a tiny random Llama sized to a BPE tokenizer trained on --data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        # bf16 weights only for a frozen LoRA base: AdamW at full fine-tuning's 2e-5 on bf16 weights rounds most
        # updates away, so those stay fp32 (the trainers' bf16=True autocasts the matmuls on CUDA)
        dtype = torch.bfloat16 if torch.cuda.is_available() and args.lora else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        return tokenizer, model
    tokenizer = _train_tiny_tokenizer(args.data)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.max_seq_len,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer, LlamaForCausalLM(config)


def _train_tiny_tokenizer(data_path: str, vocab_size: int = 512):
    """A byte-level BPE with the ChatML tokens, trained on the file's message texts (well under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for record in _records(data_path):
        for message in record.get("messages") or record.get("conversations") or []:
            content = message.get("content", message.get("value"))
            if isinstance(content, str):
                texts.append(content)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CHATML_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _records(path: str):
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def chat_dataset(args, tokenizer) -> ChatDataset:
    """Tokenized, assistant-only labels, packed into rows of --max-seq-len with position_ids per document."""
    return ChatDataset([args.data], tokenizer, template=args.template, max_seq_len=args.max_seq_len,
                       packing=True, seed=args.seed)


def maybe_lora(model, args):
    """Wrap in a peft LoRA when --lora R is given. Do this before fastchat_ft.patch, so the patch finds the
    LoRA layers and swaps in the fused kernel."""
    if not args.lora:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def write_report(args, name: str, losses: list, first_batch: dict, handle) -> None:
    labels = first_batch["labels"]
    facts = {"example": name, "losses": [float(x) for x in losses], "label_tokens": int((labels != -100).sum()),
             "tokens": int(labels.numel()), "position_ids_restart": int((first_batch["position_ids"] == 0).sum()),
             "patched": handle.summary() if handle else None, "lora_layers": handle.lora_layers if handle else 0}
    print(f"{name}: loss {facts['losses'][0]:.3f} -> {facts['losses'][-1]:.3f} over {len(losses)} steps")
    if args.report:
        Path(args.report).write_text(json.dumps(facts, indent=1))


class KeepLosses(TrainerCallback):
    """Collects every logged training loss (HF Trainer and TRL's SFTTrainer both call on_log)."""

    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
