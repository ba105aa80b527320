"""What fastchat_ft.engine.cpu_allocator (glibc malloc kept from unmapping freed activations) buys on this CPU.

Two child processes per round, interleaved (off, on, off, on, ...), each timing the same work with
FASTCHAT_FT_MALLOC_TUNING=0 or 1: the GEMMs of a SmolLM2-135M LoRA step (fresh output tensors, as autograd makes
them) back to back, reported as GFLOP/s. Prints the ratio on/off side by side and writes
bench/results/cpu_allocator.json.

Run: .venv/bin/python bench/cpu_allocator.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402

# (rows, inner, out) of the step's GEMMs: MLP up/gate, down, attention q/o, and the lm_head chunk
SHAPES = [(245, 576, 1536), (245, 1536, 576), (245, 576, 576), (980, 576, 1536), (980, 1536, 576), (129, 576, 49152)]


def child(threads: int) -> dict:
    from fastchat_ft.engine.cpu_allocator import tune_cpu_allocator

    applied = tune_cpu_allocator()
    import torch

    torch.set_num_threads(threads)
    out = {"applied": applied, "gflops": {}}
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(n, k)
        for _ in range(3):
            a @ b.t()
        reps = max(3, int(4e9 / (2 * m * k * n)))
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b.t()  # a new output tensor each time, freed before the next
        out["gflops"][f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_allocator.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.threads)))
        return 0
    runs: dict[str, list] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for label, flag in (("off", "0"), ("on", "1")):
            env = {**os.environ, "FASTCHAT_FT_MALLOC_TUNING": flag, "OMP_NUM_THREADS": str(args.threads)}
            res = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads)], env=env,
                                 check=True, capture_output=True, text=True)
            runs[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
    if not all(r["applied"] for r in runs["on"]):
        print("malloc tuning could not be applied here (not glibc?): nothing to compare")
        return 1
    print(f"machine: {cpu_name()}, {args.threads} threads; median of {args.rounds} interleaved rounds; GFLOP/s")
    print(f"{'GEMM (rows x inner x out)':28}{'default malloc':>16}{'tuned':>10}{'ratio':>8}")
    table = {}
    for shape in runs["off"][0]["gflops"]:
        off = statistics.median(r["gflops"][shape] for r in runs["off"])
        on = statistics.median(r["gflops"][shape] for r in runs["on"])
        table[shape] = {"default": off, "tuned": on, "ratio": on / off}
        print(f"{shape:28}{off:16.1f}{on:10.1f}{on / off:8.2f}")
    doc = {"benchmark": "cpu_allocator", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": cpu_name(), "threads": args.threads, "load_average": list(os.getloadavg()),
           "rounds": args.rounds, "gemm_gflops": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
