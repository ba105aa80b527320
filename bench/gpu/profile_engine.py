"""Where a GPU training step's time goes, one process, one random Llama-shaped model: the engine's step with its
two CUDA attention paths (transformers' sdpa with a document mask from position ids, and one varlen flash call per
layer) beside PEFT + HF's own forward on the same micro-batches, padded (a) and flattened (b). For each: wall
seconds per optimizer step (CUDA-synchronised, best of --rounds), peak memory, and under torch.profiler the GPU's
busy time over the wall (below ~90%: the host is the bottleneck) and the kernels that take the most GPU time.

Diagnostics for the GPU bench (fastchat-ft bench is the measurement: separate processes, the Trainer itself).
Run on the GPU machine: python bench/gpu/profile_engine.py --tokenizer .gpu/tokenizer [--model llama-1b]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import engine_batches, hf_batches  # noqa: E402 (the same batch layouts as the CPU profile)

from fastchat_ft import bench_data  # noqa: E402
from fastchat_ft.bench import GPU_MODELS, random_llama_model, schedule  # noqa: E402
from fastchat_ft.bench_runners import engine_conversations  # noqa: E402
from fastchat_ft.config import ALL_LINEAR, ASSETS  # noqa: E402
from fastchat_ft.engine.loss import backward_step  # noqa: E402
from fastchat_ft.engine.train import use_norm_and_mlp_kernels  # noqa: E402
from fastchat_ft.model import lora as lora_mod  # noqa: E402
from fastchat_ft.model.attention import use_packed_attention  # noqa: E402
from fastchat_ft.model.tiny import pack_conversations  # noqa: E402


def hf_flat(mbs):
    """DataCollatorWithFlattening's layout: one row, position ids restarting per conversation, no mask."""
    rows = [pack_conversations(mb) for mb in mbs]
    return [{k: torch.as_tensor(r[k])[None].long().cuda() for k in ("input_ids", "labels", "position_ids")} for r in rows]




def run_steps(kind: str, model, steps) -> None:
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    for batches in steps:
        if kind == "engine":
            backward_step(model, batches, "token", amp)
        else:
            n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            for b in batches:
                with amp:
                    loss = model(**b, num_items_in_batch=torch.tensor(n_items, device="cuda")).loss
                loss.backward()
        model.zero_grad(set_to_none=True)


def measure(label: str, kind: str, model, steps, rounds: int, top: int) -> dict:
    run_steps(kind, model, steps[:1])  # warm-up: Triton compiles, cuBLAS heuristics, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    walls = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_steps(kind, model, steps[1:])
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) / len(steps[1:]))
    peak = torch.cuda.max_memory_allocated() / 2**20
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_steps(kind, model, steps[1:2])
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    # kernels only (CPU ops also carry the device time of the kernels they launch: summing those counts it twice)
    per_kernel: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = per_kernel.get(e.name, (0.0, 0))
            per_kernel[e.name] = (t + e.time_range.elapsed_us() / 1e6, n + 1)
    busy = sum(t for t, _ in per_kernel.values())
    kernels = sorted(((t, name, n) for name, (t, n) in per_kernel.items()), reverse=True)[:top]
    print(f"\n{label}: {min(walls):.4f} s/step (rounds {', '.join(f'{w:.4f}' for w in walls)}), peak {peak:.0f} MB; "
          f"profiled step: GPU busy {busy:.4f} s of {wall:.4f} s wall ({100 * busy / wall:.0f}%)")
    for t, name, count in kernels:
        print(f"  {1000 * t:9.2f} ms {count:6d}x  {name[:110]}")
    return {"step_s": min(walls), "rounds": walls, "peak_mb": peak, "gpu_busy_s": busy, "profiled_wall_s": wall,
            "top": kernels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--model", default="llama-1b", choices=list(GPU_MODELS))
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--only", default="engine,engine_varlen,hf_padded,hf_flat")
    ap.add_argument("--out", default=None, help="JSON of the figures")
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        train, _ = bench_data.write_multi_turn(ASSETS / "demo" / "train.jsonl", Path(tmp), 256, 4, 42)
        convs = engine_conversations({"tokenizer": args.tokenizer, "seq_len": 2048, "seed": 42}, str(train))
    per = args.micro_batch * args.grad_accum
    sched = schedule(len(convs), per, args.steps + 1, 42)
    mbs = [[[convs[i] for i in sched[s * per + k:s * per + k + args.micro_batch]] for k in range(0, per, args.micro_batch)]
           for s in range(args.steps + 1)]
    tokens = sum(len(c[0]) for s in mbs for mb in s for c in mb) / len(mbs)
    print(f"{args.model}, {args.grad_accum} x {args.micro_batch} multi-turn conversations per step, ~{tokens:.0f} "
          f"tokens per step; torch {torch.__version__}, {torch.cuda.get_device_name()}")
    results = {}
    wanted = args.only.split(",")
    if any(w.startswith("engine") for w in wanted):
        model = random_llama_model(GPU_MODELS[args.model], attn_implementation="sdpa")
        lora_mod.add_lora(model, 16, 32, 0.0, list(ALL_LINEAR))
        use_norm_and_mlp_kernels(model)
        model.train()
        steps = [engine_batches(s, "cuda") for s in mbs]
        if "engine" in wanted:
            os.environ["FASTCHAT_FT_VARLEN"] = "0"  # transformers' path: its document mask from position ids
            results["engine"] = measure("(c) engine, sdpa + document mask", "engine", model, steps, args.rounds, args.top)
        if "engine_varlen" in wanted:
            os.environ["FASTCHAT_FT_VARLEN"] = "1"
            use_packed_attention(model)
            results["engine_varlen"] = measure("(c) engine, varlen flash attention", "engine", model, steps,
                                               args.rounds, args.top)
        del model, steps
        torch.cuda.empty_cache()
    if any(w.startswith("hf") for w in wanted):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(random_llama_model(GPU_MODELS[args.model], attn_implementation="sdpa"),
                               LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(ALL_LINEAR),
                                          bias="none", task_type="CAUSAL_LM"))
        model.train()
        padded = lambda step: hf_batches(step, 0, "cuda")  # noqa: E731 (padding is masked and unlabelled)
        for name, build in (("hf_padded", padded), ("hf_flat", hf_flat)):
            if name in wanted:
                results[name] = measure(f"({'a' if name == 'hf_padded' else 'b'}) PEFT + HF forward, {name[3:]}",
                                        "hf", model, [build(s) for s in mbs], args.rounds, args.top)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "tokens_per_step": tokens, "results": results},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
