"""`fastchat-ft bench`: one LoRA fine-tuning run through (a) HF Trainer as its docs write it (padded batches),
(b) HF Trainer with padding-free DataCollatorWithFlattening and (c) fastchat-ft's engine, each in its own
process on the same weights, conversations, order and hyper-parameters. Prints speed, memory, MFU and losses
side by side, writes JSON and a loss-curve PNG, and fails (exit 1) when the loss curves disagree.

Apples to apples: the conversations are tokenized by each side (token streams are checked identical), then a
seeded schedule lists the conversations of every micro-batch. (a) pads each micro-batch, (b) flattens it into
one row, (c) receives it as one packed row (the engine's layout). Every step's loss is the mean over the label
tokens of the whole optimizer step on all three; LoRA A starts from the same values; cosine lr without warmup
(HF's warmup starts at lr 0 and the engine's at lr/W, so warmup would make the curves differ by design).
The runs themselves live in fastchat_ft.bench_runners.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from fastchat_ft.atomic import write_json_atomic
from fastchat_ft.bench_runners import RUNNERS, matmul_rate
from fastchat_ft.config import ALL_LINEAR, ASSETS, TrainConfig
from fastchat_ft.engine.rundir import package_versions
from fastchat_ft.errors import ConfigError

LABELS = {"hf_padded": "(a) HF Trainer, padded", "hf_flat": "(b) HF Trainer, flattened", "fastchat_ft": "(c) fastchat-ft"}
# Llama-shaped configs for the GPU mode (random weights): Llama-3.2-1B and Llama-3.1-8B shapes
GPU_MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# (c)'s layout. "step" keeps the effective batch and the per-step loss normalisation (loss and gradients equal up
# to float reassociation) but runs one forward per optimizer step: bigger GEMMs, a quarter of the per-op overhead
ENGINE_ROWS = {"micro_batch": "the same micro-batches as packed rows (on CPU the engine runs consecutive ones as one "
                               "forward up to cpu_merge_tokens tokens, its default; on GPU one forward each, as HF)",
               "step": "each optimizer step's conversations as ONE packed row (grad_accum 1; same effective batch)"}
CPU_DEFAULTS = dict(steps=12, micro_batch=4, grad_accum=4, lr=1e-3, seq_len=256)
GPU_DEFAULTS = dict(steps=20, micro_batch=16, grad_accum=2, lr=2e-4, seq_len=2048)
GPU_CONVERSATIONS = 1024  # multi-turn training conversations written for GPU mode (fastchat_ft.bench_data)
# Conversations per micro-batch x accumulation in GPU mode, by model and GPU memory, same effective batch (32 per
# step). Sized by (a), whose padded batches and full logits dominate: llama-1b at 16 x 2 peaked at 110 GiB on an H200
# (bench/results/vs_hf_trainer-h200.json), so halving the micro-batch per halving of memory keeps it in bounds. The
# llama-8b rows are that scaling's estimate (~9 MB of activations per padded token), not yet measured.
GPU_MICRO_BATCHES = {"llama-1b": ((120, 16, 2), (60, 8, 4), (0, 4, 8)),
                     "llama-8b": ((120, 4, 8), (60, 2, 16), (0, 1, 32))}


def gpu_micro_batch(label: str, memory_gib: float) -> dict:
    """{micro_batch, grad_accum} for a GPU-mode model on a GPU with this much memory (first row that fits)."""
    for least_gib, micro, accum in GPU_MICRO_BATCHES.get(label, ()):
        if memory_gib >= least_gib:
            return {"micro_batch": micro, "grad_accum": accum}
    return {}
# loss agreement per logged step: |x - a| <= ATOL + RTOL * |a|. fp32: kernels differ only in summation order;
# bf16: rounding of activations in different places (fused kernels vs eager) moves the loss by ~1e-2.
TOLERANCE = {"float32": (2e-3, 2e-3), "bfloat16": (3e-2, 3e-2)}


# ------------------------------------------------------------------------------------------------- plan
BENCH_PACKAGES = ("fastchat-ft", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "triton")

def schedule(n_conversations: int, per_step: int, steps: int, seed: int) -> list[int]:
    """Conversation indices for every step, in order: seeded permutations of the data, one after another."""
    import numpy as np

    out: list[int] = []
    epoch = 0
    while len(out) < per_step * steps:
        out.extend(np.random.default_rng([seed, epoch]).permutation(n_conversations).tolist())
        epoch += 1
    return out[:per_step * steps]


def data_files(args, device: str, workdir: Path) -> tuple[str, str, str]:
    """(train file, validation file, description): --data / --val-data when given; on CUDA without --data the
    multi-turn conversations of fastchat_ft.bench_data (written into workdir), unless --gpu-data demo; else the
    bundled demo. A given --val-data is always kept."""
    demo_train, demo_val = ASSETS / "demo" / "train.jsonl", ASSETS / "demo" / "val.jsonl"
    if getattr(args, "data", None):
        return args.data, getattr(args, "val_data", None) or str(demo_val), "given files"
    if device == "cuda" and getattr(args, "gpu_data", "multi-turn") == "multi-turn":
        from fastchat_ft import bench_data

        train, val = bench_data.write_multi_turn(demo_train, workdir / "multi-turn", GPU_CONVERSATIONS, 64, args.seed)
        return str(train), getattr(args, "val_data", None) or str(val), bench_data.DESCRIPTION
    return str(demo_train), getattr(args, "val_data", None) or str(demo_val), "the bundled demo"


def build_plan(args, base_model: str, tokenizer: str, device: str, dtype: str, defaults: dict,
               data: tuple[str, str, str] | None = None) -> dict:
    from fastchat_ft.bench_runners import engine_conversations

    pick = lambda name: getattr(args, name, None) or defaults[name]  # noqa: E731
    # without `data` (scripts calling this directly): the files args names, else the bundled demo; nothing written
    train_file, val_file, description = data or data_files(args, "cpu", Path(tempfile.gettempdir()))
    plan = {"base_model": base_model, "tokenizer": tokenizer, "device": device, "dtype": dtype,
            "train_file": str(Path(train_file).resolve()), "data": description,
            "val_file": str(Path(val_file).resolve()),
            "steps": pick("steps"), "micro_batch": pick("micro_batch"), "grad_accum": pick("grad_accum"),
            "lr": pick("lr"), "seq_len": pick("seq_len"), "seed": args.seed, "threads": args.threads,
            "engine_rows": getattr(args, "engine_rows", None) or "micro_batch",
            "cpu_merge_tokens": (args.cpu_merge_tokens if getattr(args, "cpu_merge_tokens", None) is not None
                                 else TrainConfig.cpu_merge_tokens),
            "repeats": max(1, getattr(args, "repeats", None) or 1),
            "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "target_modules": list(ALL_LINEAR)},
            "optimizer": "AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay=0)", "lr_schedule": "cosine, no warmup",
            "max_grad_norm": 1.0, "loss": "mean over label tokens of the whole optimizer step (HF num_items_in_batch)"}
    if plan["steps"] < 2:
        raise SystemExit("--steps must be at least 2 (the first step is warm-up and is not timed)")
    convs = engine_conversations(plan, plan["train_file"])
    plan["conversations"] = len(convs)
    plan["schedule"] = schedule(len(convs), plan["micro_batch"] * plan["grad_accum"], plan["steps"], plan["seed"])
    return plan


# --------------------------------------------------------------------------------------- measurements
def flop_parts(model_cfg: dict, lora: dict, lengths: list[int], label_tokens: int) -> dict:
    """Model FLOPs a step needs, counted once whatever the implementation does: decoder matmuls forward (2 per
    weight per token, LoRA A and B included), backward to activations (2, through frozen weights too), weight
    gradients of trained weights only (2 per LoRA weight), causal attention within each conversation (forward
    4 * width * n(n+1)/2, backward twice that), and the lm_head only at label positions (forward + gradient to
    the hidden state; the head is frozen). Padding and logits at unlabelled positions are not useful work."""
    d, inter, layers = model_cfg["hidden_size"], model_cfg["intermediate_size"], model_cfg["num_hidden_layers"]
    heads = model_cfg["num_attention_heads"]
    hd = model_cfg.get("head_dim") or d // heads
    kv = model_cfg.get("num_key_value_heads") or heads
    shapes = {"q_proj": (d, heads * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (heads * hd, d),
              "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    frozen = layers * sum(i * o for i, o in shapes.values())
    trained = layers * sum(lora["r"] * (i + o) for name, (i, o) in shapes.items() if name in lora["target_modules"])
    tokens = sum(lengths)
    attention_fwd = 4.0 * layers * heads * hd * sum(n * (n + 1) / 2 for n in lengths)
    head_fwd = 2.0 * label_tokens * model_cfg["vocab_size"] * d
    return {"forward": 2.0 * tokens * (frozen + trained) + attention_fwd + head_fwd,
            "backward": 2.0 * tokens * (frozen + trained) + 2 * attention_fwd + head_fwd + 2.0 * tokens * trained,
            "attention_forward": attention_fwd, "lm_head_forward": head_fwd}


def useful_flops(model_cfg: dict, lora: dict, lengths: list[int], label_tokens: int) -> float:
    parts = flop_parts(model_cfg, lora, lengths, label_tokens)
    return parts["forward"] + parts["backward"]


def lora_params(model_cfg: dict, lora: dict) -> int:
    d, inter, heads = model_cfg["hidden_size"], model_cfg["intermediate_size"], model_cfg["num_attention_heads"]
    hd = model_cfg.get("head_dim") or d // heads
    kv = model_cfg.get("num_key_value_heads") or heads
    dims = {"q_proj": d + heads * hd, "k_proj": d + kv * hd, "v_proj": d + kv * hd, "o_proj": heads * hd + d,
            "gate_proj": d + inter, "up_proj": d + inter, "down_proj": inter + d}
    return model_cfg["num_hidden_layers"] * sum(lora["r"] * dims[m] for m in lora["target_modules"])


def summarise(plan: dict, raw: dict, model_cfg: dict, peak_flops: float) -> dict:
    """Per runner: timed steps (all but the first), non-padding tokens/s, step time, MFU, memory, losses."""
    per_step, b = plan["micro_batch"] * plan["grad_accum"], plan["micro_batch"]
    lengths, labels = raw["fastchat_ft"]["lengths"], raw["fastchat_ft"]["label_tokens"]
    sched = plan["schedule"]
    timed = range(1, plan["steps"])  # step 0 is warm-up (first allocations, lazy imports)
    step_convs = [sched[s * per_step:(s + 1) * per_step] for s in timed]
    tokens = sum(lengths[i] for c in step_convs for i in c)
    trained = sum(labels[i] for c in step_convs for i in c)
    padded = sum(b * max(lengths[i] for i in c[k:k + b]) for c in step_convs for k in range(0, per_step, b))
    step_flops = [useful_flops(model_cfg, plan["lora"], [lengths[i] for i in c], sum(labels[i] for i in c))
                  for c in step_convs]
    flops = sum(step_flops)
    out = {}
    for name, r in raw.items():
        ends = r["step_ends"]
        if len(ends) != plan["steps"]:
            raise RuntimeError(f"{name} reported {len(ends)} step ends for {plan['steps']} steps")
        # a step runs from the previous step's end, or from the end of the matmul probe taken there
        resumes = r.get("step_resumes") or ends
        steps_s = [end - resume for resume, end in zip(resumes, ends[1:])]
        seconds = sum(steps_s)
        # CPU seconds of the whole process over the same steps: on a shared machine wall time mostly measures
        # waiting for a core, CPU time does not (the run's own threads are fixed and equal for all three).
        cpu = r.get("step_cpu_ends") or []
        cpu_resumes = r.get("step_cpu_resumes") or cpu
        cpu_seconds = (sum(e - s for s, e in zip(cpu_resumes, cpu[1:])) if len(cpu) == len(ends) == len(cpu_resumes)
                       else float("nan"))
        mfu_best = flops / seconds / peak_flops
        out[name] = {
            "data_prep_s": r["prep_s"], "timed_steps": len(timed), "timed_s": seconds,
            "step_time_s": seconds / len(timed), "step_time_median_s": statistics.median(steps_s),
            "tokens_per_s": tokens / seconds, "cpu_s": cpu_seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "trainable_tokens_per_s": trained / seconds, "mfu": mfu_best, "mfu_vs_best_rate": mfu_best,
            "model_tflops_per_s": flops / seconds / 1e12, "peak_memory_mb": r["peak_memory_mb"],
            "attention": r.get("attention"), "final_train_loss": r["losses"][-1], "val_loss_start": r["val_loss_start"],
            "val_loss_end": r["val_loss_end"], "losses": r["losses"]}
        rates = r.get("probe_rates")
        if rates:  # MFU against the matmul rate measured at both ends of each step: flops over what the GEMM
            # could have done in those same seconds (the mean of the two probes times the step's time)
            possible = sum(s * (lo + hi) / 2 for s, lo, hi in zip(steps_s, rates, rates[1:]))
            out[name].update(mfu=flops / possible, probe_rates=rates,
                             step_mfu=[f / (s * (lo + hi) / 2) for f, s, lo, hi in zip(step_flops, steps_s, rates, rates[1:])])
    out["tokens"] = {"timed_non_padding": tokens, "timed_trainable": trained, "timed_padded_batches": padded,
                     "padding_share_a": 1 - tokens / padded, "useful_flops_timed": flops}
    return out


def check_agreement(runs: dict, dtype: str) -> list[str]:
    """Every logged train loss and both validation losses of (b) and (c) against (a); returns the failures."""
    atol, rtol = TOLERANCE[dtype]
    ref = runs["hf_padded"]
    problems = []
    for name in ("hf_flat", "fastchat_ft"):
        r = runs[name]
        if len(r["losses"]) != len(ref["losses"]):
            problems.append(f"{name}: {len(r['losses'])} logged losses vs {len(ref['losses'])} for hf_padded")
        pairs = [(f"step {i + 1}", x, y) for i, (x, y) in enumerate(zip(r["losses"], ref["losses"]))]
        pairs += [("val start", r["val_loss_start"], ref["val_loss_start"]), ("val end", r["val_loss_end"], ref["val_loss_end"])]
        for where, x, y in pairs:
            if not abs(x - y) <= atol + rtol * abs(y):
                problems.append(f"{name} {where}: loss {x:.6f} vs hf_padded {y:.6f} (|diff| {abs(x - y):.2e} > "
                                f"{atol:g} + {rtol:g}*|loss|)")
    return problems


# ---------------------------------------------------------------------------------------------- running
def out_of_memory(name: str, plan: dict):
    """The error for a runner that ran out of GPU memory, with flags that use less (same effective batch)."""
    micro, accum = plan["micro_batch"], plan["grad_accum"]
    whole_step = name == "fastchat_ft" and plan.get("engine_rows") == "step"
    if micro > 1 and not whole_step:
        fix = (f"halve the micro-batch and double the accumulation (same effective batch): --micro-batch "
               f"{micro // 2} --grad-accum {accum * 2}")
    elif whole_step:
        fix = "leave --engine-rows step out (it packs the whole step into one row), or use a GPU with more memory"
    else:
        fix = "lower --seq-len (drops the longest conversations for all three), or use a GPU with more memory"
    return ConfigError(f"{LABELS[name]} ran out of GPU memory with {micro} conversation(s) per micro-batch",
                       field="--micro-batch", fix=fix)


def run_worker(name: str, plan: dict, workdir: Path, threads: int) -> dict:
    plan_path, out_path = workdir / "plan.json", workdir / f"{name}.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    print(f"  running {LABELS[name]} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastchat_ft.bench_runners", name, str(plan_path), str(out_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        if "OutOfMemoryError" in tail or "CUDA out of memory" in tail:
            raise out_of_memory(name, plan)
        raise RuntimeError(f"runner {name} failed (exit {proc.returncode}):\n{tail}")
    print(f"  {LABELS[name]} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(out_path.read_text())


def bench_one(plan: dict, model_cfg: dict, workdir: Path, label: str) -> dict:
    """plan["repeats"] rounds, each running (a), (b), (c) in turn (so a slow spell of a shared machine hits all
    three alike); each runner is reported by its median round (by tokens/s), every round's figure kept beside it.
    The matmul rate is measured before every round. On CPU each runner also measures it at every optimizer step's
    end (StepClock): MFU there divides each step's useful FLOPs by the rate around it; mfu_vs_best_rate divides by
    the best rate of the whole run (rounds and probes), the stricter figure on a machine whose rate swings."""
    if plan["device"] == "cpu":
        plan = {**plan, "matmul_probe": {"device": "cpu", "dtype": plan["dtype"], "threads": plan["threads"],
                                         "model_cfg": {k: model_cfg[k] for k in ("hidden_size", "intermediate_size")}}}
    rates, rounds = [], []
    for i in range(plan.get("repeats", 1)):
        if plan.get("repeats", 1) > 1:
            print(f"  round {i + 1} of {plan['repeats']}", flush=True)
        rates.append(matmul_rate(plan["device"], plan["dtype"], plan["threads"], model_cfg))
        raw = {name: run_worker(name, plan, workdir, plan["threads"]) for name in RUNNERS}
        digests = {n: (r["conversations"], r["data_digest"], r["val_digest"]) for n, r in raw.items()}
        if len(set(digests.values())) != 1:
            raise RuntimeError(f"the runners tokenized the data differently: {digests}")
        rounds.append(raw)
    rate = max(rates, key=lambda r: r["peak"])
    best = max([rate["peak"]] + [p for raw in rounds for r in raw.values() for p in r.get("probe_rates", [])])
    summaries = [summarise(plan, raw, model_cfg, best) for raw in rounds]
    runs = combine_rounds(summaries)
    problems = [p for s in summaries for p in check_agreement(s, plan["dtype"])]
    return {"model": label, "model_config": model_cfg, "lora_params": lora_params(model_cfg, plan["lora"]),
            "plan": {k: v for k, v in plan.items() if k != "schedule"}, "schedule": plan["schedule"],
            "matmul_flops_per_s": rate, "matmul_flops_per_s_rounds": [r["peak"] for r in rates],
            "matmul_flops_per_s_best": best,
            "tolerance": dict(zip(("atol", "rtol"), TOLERANCE[plan["dtype"]])),
            "losses_agree": not problems, "disagreements": sorted(set(problems)), "runs": runs}


def combine_rounds(summaries: list[dict]) -> dict:
    """Each runner's median round by tokens/s (the lower middle for an even count), with every round's tokens/s
    and peak memory listed beside it."""
    runs = {"tokens": summaries[0]["tokens"]}
    for name in RUNNERS:
        per_round = [s[name] for s in summaries]
        ranked = sorted(range(len(per_round)), key=lambda k: per_round[k]["tokens_per_s"])
        runs[name] = {**per_round[ranked[(len(ranked) - 1) // 2]], "median_of_rounds": len(per_round),
                      "tokens_per_s_rounds": [r["tokens_per_s"] for r in per_round],
                      "mfu_rounds": [r["mfu"] for r in per_round],
                      "peak_memory_mb_rounds": [r["peak_memory_mb"] for r in per_round]}
    return runs


# ---------------------------------------------------------------------------------------------- report
def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y else "-"


def format_table(result: dict) -> str:
    runs = result["runs"]
    a, b, c = (runs[n] for n in RUNNERS)
    rows = [("data prep (s)", "data_prep_s", "{:.2f}"), ("tokens/s (non-padding)", "tokens_per_s", "{:.1f}"),
            ("tokens per CPU-second", "tokens_per_cpu_s", "{:.2f}"),
            ("trainable tokens/s", "trainable_tokens_per_s", "{:.1f}"), ("step time (s)", "step_time_s", "{:.3f}"),
            ("MFU (%)", "mfu", "{:.1f}"), ("MFU vs best rate (%)", "mfu_vs_best_rate", "{:.1f}"),
            ("peak memory (MB)", "peak_memory_mb", "{:.0f}"),
            ("final train loss", "final_train_loss", "{:.4f}"), ("val loss (start)", "val_loss_start", "{:.4f}"),
            ("val loss (end)", "val_loss_end", "{:.4f}")]
    head = f"{'':26}{LABELS['hf_padded']:>26}{LABELS['hf_flat']:>28}{LABELS['fastchat_ft']:>18}{'c/a':>8}{'c/b':>8}"
    lines = [head, "-" * len(head)]
    for title, key, fmt in rows:
        if key == "mfu_vs_best_rate" and "probe_rates" not in c:
            continue  # without per-step probes (GPU) the two are one figure
        vals = [fmt.format(100 * r[key] if key.startswith("mfu") else r[key]) for r in (a, b, c)]
        ratios = [ratio(c[key], a[key]), ratio(c[key], b[key])] if "loss" not in key else ["", ""]
        lines.append(f"{title:26}{vals[0]:>26}{vals[1]:>28}{vals[2]:>18}{ratios[0]:>8}{ratios[1]:>8}")
        if key == "tokens_per_s" and len(c.get("tokens_per_s_rounds", [])) > 1:  # the spread behind the median
            vals = ["/".join(f"{v:.0f}" for v in r["tokens_per_s_rounds"]) for r in (a, b, c)]
            lines.append(f"{'  every round':26}{vals[0]:>26}{vals[1]:>28}{vals[2]:>18}")
        if key == "mfu" and len(c.get("mfu_rounds", [])) > 1:
            vals = ["/".join(f"{100 * v:.1f}" for v in r["mfu_rounds"]) for r in (a, b, c)]
            lines.append(f"{'  every round':26}{vals[0]:>26}{vals[1]:>28}{vals[2]:>18}")
    tok = runs["tokens"]
    if "probe_rates" in c and result.get("matmul_flops_per_s_best"):
        lines.append(f"MFU: each step's useful FLOPs over the GEMM rate measured at its two ends; vs best rate: over "
                     f"the best GEMM rate of the whole run, {result['matmul_flops_per_s_best'] / 1e9:.0f} GFLOP/s")
    lines.append("attention: " + "; ".join(f"({k}) {r.get('attention')}" for k, r in zip("abc", (a, b, c))))
    if "padding_share_a" in tok:
        lines.append(f"padding: {100 * tok['padding_share_a']:.0f}% of (a)'s batch tokens; "
                     f"{tok['timed_non_padding'] / max(1, c['timed_steps']):.0f} non-padding tokens per optimizer step")
    return "\n".join(lines)


def machine_info(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        for name, style in zip(RUNNERS, ("o-", "s--", "x:")):
            r = res["runs"][name]
            steps = range(1, len(r["losses"]) + 1)
            ax.plot(steps, r["losses"], style, label=f"{LABELS[name]} train", markersize=4)
            ax.plot([0, len(r["losses"])], [r["val_loss_start"], r["val_loss_end"]], style[0], markersize=9,
                    fillstyle="none", label=f"{LABELS[name]} val")
        ax.set_title(f"{res['model']}: loss per optimizer step")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per label token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _device_slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100", "l40s", "a10g", "l4", "4090", "t4"):
        if key in name:
            return key
    return "cuda"


def random_llama_model(shape: dict, **kwargs):
    """A Llama-shaped model with seeded random bf16 weights on the GPU (kwargs: e.g. attn_implementation)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM._from_config(LlamaConfig(max_position_embeddings=8192, rms_norm_eps=1e-5, **shape),
                                             dtype=torch.bfloat16, **kwargs)


def _random_llama(folder: Path, shape: dict, tokenizer_dir: Path) -> Path:
    """A Llama-shaped model with random bf16 weights saved as a HF folder, with the default model's tokenizer."""
    import shutil

    import torch

    from fastchat_ft.model.tiny import TOKENIZER_FILES

    folder.mkdir(parents=True, exist_ok=True)
    model = random_llama_model(shape)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, folder / name)
    return folder


# the least value each numeric flag takes (None: its default); the first step is warm-up, so two or more
_LEAST = {"steps": 2, "micro_batch": 1, "grad_accum": 1, "seq_len": 2, "lora_r": 1, "threads": 1, "repeats": 1,
          "cpu_merge_tokens": 0, "seed": 0}


def check_args(args) -> None:
    """Impossible flag values and unusable paths, refused before any model loads (they would fail minutes later,
    deep in a runner, or after every run had finished)."""
    from fastchat_ft import flags

    flags.at_least(args, _LEAST)
    flags.positive(args, ["lr"])
    unknown = [m for m in (getattr(args, "models", None) or "").split(",") if m and m not in GPU_MODELS]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}", field="--models",
                          fix=f"a comma-separated subset of {','.join(GPU_MODELS)}")
    for name in ("data", "val_data"):
        if getattr(args, name, None):
            flags.input_file(getattr(args, name), flags.flag_name(name))
    flags.output_folder(args.out, "--out")


def run_bench(args) -> int:
    import torch

    from fastchat_ft.model.load import resolve_base_model

    check_args(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"no CUDA GPU is visible to this torch ({torch.__version__})", field="--device",
                          fix="leave --device out (auto: the CPU mode here) or run on a machine with a GPU and a CUDA "
                              "build of torch")
    args.threads = args.threads or (os.cpu_count() if device == "cpu" else 4)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="fastchat-bench-") as tmp:
        workdir = Path(tmp)
        if device == "cpu" or args.base_model:
            base = resolve_base_model(args.base_model)
            models = [(base.name, base)]
            dtype, defaults = ("float32", CPU_DEFAULTS) if device == "cpu" else ("bfloat16", GPU_DEFAULTS)
        else:
            dtype, defaults = "bfloat16", GPU_DEFAULTS
            tok_dir = Path(args.tokenizer) if getattr(args, "tokenizer", None) else resolve_base_model(None)
            names = args.models.split(",") if args.models else list(GPU_MODELS)
            models = [(n, None) for n in names]
        data = data_files(args, device, workdir)
        for label, base in models:
            sized = defaults
            if base is None:
                base = _random_llama(workdir / label, GPU_MODELS[label], tok_dir)
                memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
                sized = {**defaults, **gpu_micro_batch(label, memory_gib)}
            model_cfg = json.loads((Path(base) / "config.json").read_text())
            plan = build_plan(args, str(base), str(base), device, dtype, sized, data)
            print(f"bench {label}: {plan['steps']} steps x {plan['micro_batch']} conversations x "
                  f"{plan['grad_accum']} accumulation, LoRA r={plan['lora']['r']}, {dtype} on {device}, "
                  f"{plan['threads']} threads; (c) {ENGINE_ROWS[plan['engine_rows']]}, cpu_merge_tokens "
                  f"{plan['cpu_merge_tokens']}; {plan['repeats']} round(s); data: {plan['data']}", flush=True)
            res = bench_one(plan, model_cfg, workdir, label)
            results.append(res)
            print(format_table(res))
            if base is not None and str(base).startswith(str(workdir)):
                import shutil
                shutil.rmtree(base, ignore_errors=True)

    return write_report(results, Path(args.out), device, load_before)


def write_report(results: list[dict], out_dir: Path, device: str, load_before) -> int:
    """JSON (atomically) and the loss-curve PNG; exit code 1, with every disagreement named, if the losses differ."""
    slug = _device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "vs_hf_trainer", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": slug, "machine": machine_info(device), "versions": package_versions(BENCH_PACKAGES),
           "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
           "command": " ".join(["fastchat-ft", "bench"] + sys.argv[2:]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
           "baselines": {"hf_padded": "transformers Trainer + PEFT LoraConfig, apply_chat_template(return_assistant_tokens_mask) "
                                      "labels, DataCollatorForSeq2Seq(padding=True), train_sampling_strategy=sequential",
                         "hf_flat": "as hf_padded with DataCollatorWithFlattening (padding-free rows, position_ids)",
                         "fastchat_ft": "fastchat_ft.engine.train.train: "
                                        + "; ".join(sorted({ENGINE_ROWS[r["plan"]["engine_rows"]] for r in results}))},
           "results": results}
    json_path = out_dir / f"vs_hf_trainer-{slug}.json"
    write_json_atomic(json_path, doc, indent=1)
    png = out_dir / f"vs_hf_trainer-{slug}.png"
    plot(results, png)
    print(f"wrote {json_path} and {png}")
    failed = [p for r in results for p in r["disagreements"]]
    if failed:
        print("FAIL: the loss curves disagree beyond the tolerance; speed numbers are not comparable:", file=sys.stderr)
        for p in failed:
            print("  " + p, file=sys.stderr)
        return 1
    return 0
