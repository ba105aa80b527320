"""Claim: on CPU, running a step's consecutive micro-batches as one forward (the engine's cpu_merge_tokens, their
rows joined into one packed row) trains faster than one forward per micro-batch, with the same losses.

The bench's engine runner (c) (fastchat_ft.bench_runners) on `fastchat-ft bench`'s CPU plan (SmolLM2-135M-Instruct,
LoRA r=16, the bundled demo data, 4 conversations x 4 accumulation), once with cpu_merge_tokens 0 and once with the
budget under test, each in its own process, in pairs whose order alternates (a slow spell of a shared machine hits
both alike). Prints every pair's tokens/s and ratio and the medians; the losses of the two must agree; writes
bench/results/cpu_merge.json.

Run: OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_merge.py [--pairs 4] [--budget 1024] [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, write_results  # noqa: E402

from fastchat_ft import bench  # noqa: E402
from fastchat_ft.cli import build_parser  # noqa: E402
from fastchat_ft.model.load import resolve_base_model  # noqa: E402


def run(plan: dict, budget: int, workdir: Path) -> dict:
    """One engine run of the plan with cpu_merge_tokens = budget: tokens/s over the timed steps, losses, peak RSS."""
    plan_path, out_path = workdir / f"plan{budget}.json", workdir / f"out{budget}.json"
    plan_path.write_text(json.dumps({**plan, "cpu_merge_tokens": budget}))
    env = dict(os.environ, OMP_NUM_THREADS=str(plan["threads"]), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "fastchat_ft.bench_runners", "fastchat_ft", str(plan_path), str(out_path)],
                   env=env, check=True, capture_output=True, text=True)
    r = json.loads(out_path.read_text())
    per_step, sched = plan["micro_batch"] * plan["grad_accum"], plan["schedule"]
    tokens = sum(r["lengths"][i] for s in range(1, plan["steps"]) for i in sched[s * per_step:(s + 1) * per_step])
    return {"tokens_per_s": tokens / (r["step_ends"][-1] - r["step_ends"][0]), "losses": r["losses"],
            "peak_memory_mb": r["peak_memory_mb"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--budget", type=int, default=1024, help="cpu_merge_tokens under test (against 0)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_merge.json"))
    args = ap.parse_args()
    base = resolve_base_model(None)
    bench_args = build_parser().parse_args(["bench", "--steps", str(args.steps), "--threads", str(args.threads)])
    plan = bench.build_plan(bench_args, str(base), str(base), "cpu", "float32", bench.CPU_DEFAULTS)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="fastchat-cpu-merge-") as tmp:
        for k in range(args.pairs):
            order = (0, args.budget) if k % 2 == 0 else (args.budget, 0)
            got = {b: run(plan, b, Path(tmp)) for b in order}
            pairs.append({"order": list(order), "off": got[0], "merged": got[args.budget]})
            ratio = got[args.budget]["tokens_per_s"] / got[0]["tokens_per_s"]
            print(f"pair {k + 1}: off {got[0]['tokens_per_s']:.1f} tok/s, cpu_merge_tokens {args.budget} "
                  f"{got[args.budget]['tokens_per_s']:.1f} tok/s: {ratio:.3f}x", flush=True)
    off = [p["off"]["tokens_per_s"] for p in pairs]
    merged = [p["merged"]["tokens_per_s"] for p in pairs]
    ratios = [m / o for m, o in zip(merged, off)]
    worst_loss_gap = max(abs(a - b) / abs(b) for p in pairs for a, b in zip(p["merged"]["losses"], p["off"]["losses"]))
    print(f"\n{cpu_name()}, {args.threads} threads, {args.steps} steps x {plan['grad_accum']} micro-batches x "
          f"{plan['micro_batch']} conversations (SmolLM2-135M-Instruct, LoRA r={plan['lora']['r']}, fp32)")
    print(f"median tokens/s: off {statistics.median(off):.1f}, merged {statistics.median(merged):.1f} "
          f"({statistics.median(merged) / statistics.median(off):.2f}x); paired ratios "
          + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"peak RSS (MB): off {max(p['off']['peak_memory_mb'] for p in pairs):.0f}, merged "
          f"{max(p['merged']['peak_memory_mb'] for p in pairs):.0f}; largest relative loss difference {worst_loss_gap:.1e}")
    doc = {"benchmark": "cpu_merge", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": cpu_name(), "threads": args.threads, "budget": args.budget,
           "plan": {k: v for k, v in plan.items() if k != "schedule"}, "pairs": pairs,
           "median_tokens_per_s": {"off": statistics.median(off), "merged": statistics.median(merged)},
           "paired_ratios": ratios, "largest_relative_loss_difference": worst_loss_gap,
           "load_average_after": list(os.getloadavg())}
    write_results(doc, args.out)
    return 0 if worst_loss_gap < 2e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
