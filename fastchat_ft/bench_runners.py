"""The three training runs that `fastchat-ft bench` compares, each executed in its own process from a plan (JSON):
(a) HF Trainer with padded batches, (b) HF Trainer with DataCollatorWithFlattening, (c) fastchat-ft's engine.
Each prepares its own data, trains on the plan's conversation schedule and reports timings, losses and memory.
The comparison, FLOP counting and the report live in fastchat_ft.bench.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import resource
import sys
import tempfile
import time
import zlib
from pathlib import Path

from fastchat_ft.atomic import write_json_atomic

RUNNERS = ("hf_padded", "hf_flat", "fastchat_ft")

# ChatML with {% generation %} around what the assistant says, so apply_chat_template(return_assistant_tokens_mask=True)
# marks the trained tokens (the transformers chat-templating docs' recipe for assistant-only labels).
TAGGED_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
                 "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                 "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
                 "{% endfor %}")


# ------------------------------------------------------------------------------------------- shared helpers
def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def data_digest(convs: list[tuple]) -> str:
    """Hash of every conversation's ids and labels, in order: the runners must train on identical tokens."""
    import numpy as np

    h = hashlib.sha256()
    for ids, labels in convs:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def seeded_lora_init(model, seed: int) -> int:
    """Give every LoRA A matrix the same values in PEFT and in our LoRA (PEFT's kaiming-uniform bound 1/sqrt(in),
    drawn from a generator keyed by the module path); B stays zero. Without this the two libraries draw A from
    different random streams and the loss curves could not be compared step by step."""
    import torch

    count = 0
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None:
            continue
        linear = lora_a["default"] if isinstance(lora_a, torch.nn.ModuleDict) else lora_a
        path = name.removeprefix("base_model.model.")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
        bound = 1.0 / math.sqrt(linear.weight.shape[1])
        values = (torch.rand(linear.weight.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        with torch.no_grad():
            linear.weight.copy_(values.to(linear.weight.dtype))
        count += 1
    if not count:
        raise RuntimeError("no LoRA layers found to initialise")
    return count


def _threads(plan: dict) -> None:
    import torch

    torch.set_num_threads(plan["threads"])
    torch.manual_seed(plan["seed"])


def matmul_rate(device: str, dtype: str, threads: int, model_cfg: dict) -> dict:
    """Best FLOP/s of a large square GEMM and of the model's MLP-shaped GEMM, on this device, now."""
    import torch

    torch.set_num_threads(threads)
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    n = 8192 if device == "cuda" else 2048
    d, inter = model_cfg["hidden_size"], model_cfg["intermediate_size"]
    shapes = {"square": (n, n, n), "mlp": (4096 if device == "cuda" else 1024, d, inter)}
    out = {}
    for name, (m, k, nn) in shapes.items():
        a = torch.randn(m, k, device=device, dtype=dt)
        b = torch.randn(k, nn, device=device, dtype=dt)
        best = float("inf")
        for _ in range(8 if device == "cuda" else 4):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10 if device == "cuda" else 1):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / (10 if device == "cuda" else 1))
        out[name] = 2.0 * m * k * nn / best
    out["peak"] = max(out.values())
    return out


# -------------------------------------------------------------------------------------------- HF Trainer
def hf_prepare(plan: dict):
    """Tokenize as the transformers docs do: datasets + apply_chat_template with the assistant mask -> labels."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(plan["tokenizer"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = TAGGED_CHATML

    def tokenize(example):
        out = tok.apply_chat_template(example["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]}

    def load(path):
        ds = datasets.load_dataset("json", data_files=path, split="train")
        ds = ds.map(tokenize, remove_columns=ds.column_names)
        return ds.filter(lambda e: len(e["input_ids"]) <= plan["seq_len"])

    return tok, load(plan["train_file"]), load(plan["val_file"])


class StepClock:
    """Wall and CPU time at each optimizer step's end. With plan["matmul_probe"] (CPU mode) the matmul rate is
    measured right there too, and the time the probe finished, so every timed step is bracketed by two measurements
    of what the GEMM could do at that moment (a shared VM's rate swings by a quarter within minutes) and the probes'
    own time is left out of the step's."""

    def __init__(self, plan: dict):
        self.probe = plan.get("matmul_probe")
        self.ends, self.cpu_ends, self.resumes, self.cpu_resumes, self.rates = [], [], [], [], []

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.probe:
            self.rates.append(matmul_rate(**self.probe)["peak"])
            self.resumes.append(time.perf_counter())
            self.cpu_resumes.append(time.process_time())

    def report(self) -> dict:
        out = {"step_ends": self.ends, "step_cpu_ends": self.cpu_ends}
        if self.probe:
            out.update(step_resumes=self.resumes, step_cpu_resumes=self.cpu_resumes, probe_rates=self.rates)
        return out


class _StepRecorder:
    """TrainerCallback keeping a StepClock at each optimizer step's end and recording each logged loss."""

    def __init__(self, plan: dict):
        from transformers import TrainerCallback

        rec = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                rec.clock.step_end()

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    rec.losses.append(float(logs["loss"]))

        self.clock, self.losses, self.callback = StepClock(plan), [], Callback()


def hf_val_loss(model, convs: list[tuple], device: str, amp) -> float:
    """Token-weighted validation loss, one conversation per forward (no padding): the same sum / count the
    engine's evaluation computes, so (a), (b) and (c) are compared on one definition."""
    import torch

    total, count = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad(), amp():
        for ids, labels in convs:
            n = sum(1 for x in labels[1:] if x != -100)
            if not n:
                continue
            out = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device))
            total += float(out.loss) * n
            count += n
    model.train(was)
    return total / max(1, count)


def run_hf(plan: dict, flat: bool) -> dict:
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer,
                              TrainingArguments)

    _threads(plan)
    t0 = time.perf_counter()
    tok, train_ds, val_ds = hf_prepare(plan)
    prep_s = time.perf_counter() - t0
    convs = list(zip(train_ds["input_ids"], train_ds["labels"]))
    val_convs = list(zip(val_ds["input_ids"], val_ds["labels"]))
    ordered = train_ds.select(plan["schedule"])  # the plan's conversation order, read sequentially
    if flat:
        ordered = ordered.remove_columns(["attention_mask"])
        collator = DataCollatorWithFlattening()
    else:
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    device, bf16 = plan["device"], plan["dtype"] == "bfloat16"
    # padding-free as the transformers docs pair it with DataCollatorWithFlattening: flash_attention_2 where the
    # flash-attn package is installed (GPU, half precision); otherwise transformers' default (sdpa)
    flash = flat and bf16 and device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    model = AutoModelForCausalLM.from_pretrained(plan["base_model"], dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 **({"attn_implementation": "flash_attention_2"} if flash else {}))
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise RuntimeError("the tokenizer is larger than the model's vocabulary")
    lora = plan["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM"))
    seeded_lora_init(model, plan["seed"])
    model.to(device)
    amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    val_start = hf_val_loss(model, val_convs, device, amp)

    out_dir = tempfile.mkdtemp(prefix="bench-hf-")
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=plan["micro_batch"],
        gradient_accumulation_steps=plan["grad_accum"], max_steps=plan["steps"], learning_rate=plan["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", seed=plan["seed"], bf16=bf16, use_cpu=device == "cpu",
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True)
    rec = _StepRecorder(plan)
    trainer = Trainer(model=model, args=args, train_dataset=ordered, data_collator=collator, callbacks=[rec.callback])
    start = time.perf_counter()
    trainer.train()
    val_end = hf_val_loss(model, val_convs, device, amp)
    from fastchat_ft.model.attention import describe

    base = model.get_base_model()
    attention = describe(base, device=device, half=bf16) if flat else base.config._attn_implementation
    if flat and device == "cuda" and not flash:
        attention += " (flash-attn not installed, so no flash_attention_2)"
    return {"prep_s": prep_s, "attention": attention, "train_start": start, **rec.clock.report(), "losses": rec.losses,
            "val_loss_start": val_start, "val_loss_end": val_end, "peak_memory_mb": peak_memory_mb(device),
            "conversations": len(convs), "data_digest": data_digest(convs), "val_digest": data_digest(val_convs),
            "lengths": [len(c[0]) for c in convs], "label_tokens": [sum(1 for x in c[1][1:] if x != -100) for c in convs]}


# ----------------------------------------------------------------------------------------- fastchat-ft engine
def engine_conversations(plan: dict, path: str):
    """Tokenize, mask (and pack) with the native loader, cache off: the data preparation `fastchat-ft train` does."""
    import numpy as np

    from fastchat_ft.data import ChatDataset

    ds = ChatDataset([path], plan["tokenizer"], template="chatml", max_seq_len=plan["seq_len"], packing=True,
                     seed=plan["seed"], overlong="drop", cache=False, verbose=False)
    out = []
    for i in range(len(ds.offsets) - 1):
        a, b = int(ds.offsets[i]), int(ds.offsets[i + 1])
        labels = np.array(ds.labels[a:b], dtype=np.int64)
        labels[0] = -100  # as ChatDataset rows: a conversation's first token is never a target
        out.append((np.asarray(ds.ids[a:b], dtype=np.int64), labels))
    return out


def rows_in_engine_order(micro_batches: list[dict], grad_accum: int, seed: int) -> list[dict]:
    """Place the plan's micro-batches (one packed row each) so that the engine's seeded step order
    (fastchat_ft.engine.data.step_rows, micro_batch_size 1) reads them back in plan order."""
    from fastchat_ft.engine.data import step_rows

    n = len(micro_batches)
    steps = math.ceil(n / grad_accum)
    order = [i for s in range(steps) for mb in step_rows(n, 1, grad_accum, seed, 0, s) for i in mb]
    rows = [None] * n
    for position, row_index in enumerate(order):
        rows[row_index] = micro_batches[position]
    return rows


def run_engine(plan: dict) -> dict:
    import torch

    from fastchat_ft import config as config_mod
    from fastchat_ft.engine import data as data_mod
    from fastchat_ft.engine import train as train_mod
    from fastchat_ft.model.tiny import pack_conversations

    _threads(plan)
    t0 = time.perf_counter()
    convs = engine_conversations(plan, plan["train_file"])
    val_convs = engine_conversations(plan, plan["val_file"])
    prep_s = time.perf_counter() - t0

    b = plan["micro_batch"]
    sched = plan["schedule"]
    # one row per micro-batch, or (engine_rows "step") one row per optimizer step, i.e. grad_accum 1
    whole_step = plan.get("engine_rows") == "step"
    accum = 1 if whole_step else plan["grad_accum"]
    group = b * plan["grad_accum"] if whole_step else b
    micro = [pack_conversations([convs[i] for i in sched[k:k + group]]) for k in range(0, len(sched), group)]
    val_rows = [pack_conversations(val_convs[k:k + b]) for k in range(0, len(val_convs), b)]
    rows = rows_in_engine_order(micro, accum, plan["seed"])
    data = data_mod.RunData(rows, val_rows, [Path(plan["train_file"])], [Path(plan["val_file"])], {})

    lora = plan["lora"]
    out_dir = tempfile.mkdtemp(prefix="bench-engine-")
    cfg = config_mod.from_dict({
        "base_model": plan["base_model"], "datasets": [{"path": plan["train_file"]}], "chat_template": "chatml",
        "sequence_len": max(len(r["input_ids"]) for r in rows), "adapter": "lora", "lora_r": lora["r"],
        "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"], "lora_target_modules": lora["target_modules"],
        "learning_rate": plan["lr"], "max_steps": plan["steps"], "micro_batch_size": 1,
        "gradient_accumulation_steps": accum, "warmup_ratio": 0.0, "lr_scheduler": "cosine",
        "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": plan["seed"], "output_dir": out_dir,
        "eval_steps": plan["steps"], "save_steps": plan["steps"], "sample_prompts": 0, "logging_steps": 1,
        "bf16": plan["dtype"] == "bfloat16", "cpu_merge_tokens": plan.get("cpu_merge_tokens", 0)})

    clock, starts, setups = StepClock(plan), [], []
    original_build, original_after = train_mod.build, train_mod.Reporter.after_step

    def build(*a, **k):  # same starting LoRA weights as PEFT's (see seeded_lora_init)
        s = original_build(*a, **k)
        seeded_lora_init(s.model, plan["seed"])
        starts.append(time.perf_counter())
        setups.append(s)
        return s

    def after_step(self, *a, **k):
        clock.step_end()
        return original_after(self, *a, **k)

    train_mod.build, train_mod.Reporter.after_step = build, after_step
    try:
        summary = train_mod.train(cfg, data=data, show_bar=False)
    finally:
        train_mod.build, train_mod.Reporter.after_step = original_build, original_after
    vals = [r["val_loss"] for r in summary["val"]]
    from fastchat_ft.model.attention import describe

    attention = describe(setups[0].model, device=plan["device"], half=plan["dtype"] == "bfloat16")
    return {"prep_s": prep_s, "attention": attention, "train_start": starts[0] if starts else None,
            **clock.report(), "losses": [float(x) for x in summary["train_losses"]], "val_loss_start": vals[0], "val_loss_end": vals[-1],
            "peak_memory_mb": peak_memory_mb(plan["device"]), "conversations": len(convs),
            "data_digest": data_digest(convs), "val_digest": data_digest(val_convs),
            "lengths": [len(c[0]) for c in convs], "label_tokens": [int((c[1][1:] != -100).sum()) for c in convs]}


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: list[str]) -> int:
    name, plan_path, out_path = argv
    plan = json.loads(Path(plan_path).read_text())
    if name == "fastchat_ft":
        result = run_engine(plan)
    elif name in ("hf_padded", "hf_flat"):
        result = run_hf(plan, flat=name == "hf_flat")
    else:
        raise SystemExit(f"unknown runner {name!r}; one of {RUNNERS}")
    result["runner"] = name
    write_json_atomic(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
