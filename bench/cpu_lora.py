"""What the native CPU LoRA kernels (csrc/cpu_lora.cc via kernels/lora_cpu.py) buy over torch's skinny GEMMs, on
the LoRA layers of one SmolLM2-135M decoder layer at rank 16 (q/k/v on one input, o, gate/up on one input, down)
with a step's ~980 tokens: forward + backward of every layer, in one process, alternating rounds of
  torch    FASTCHAT_FT_CPU_LORA=0: one lora_linear per layer, torch GEMMs for the rank-r products
  native   one lora_linear per layer, the rank-r products in one native call each way
  grouped  q/k/v and gate/up as lora_linear_group (the engine's path): their A stacked, one pass over x and dx
  base     the frozen linears alone (F.linear, no LoRA): what every mode spends outside the rank-r products
The base GEMMs (x W^T, dy W) are torch's in all modes. Prints medians, the LoRA share (mode - base) and ratios side
by side; writes bench/results/cpu_lora.json.

Run: OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_lora.py [--rounds 7] [--tokens 980] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name, write_results  # noqa: E402

from fastchat_ft.kernels import lora_linear, lora_linear_group  # noqa: E402

HIDDEN, KV, INTERMEDIATE, RANK = 576, 192, 1536, 16  # SmolLM2-135M
GROUPS = [[(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV)], [(HIDDEN, HIDDEN)], [(HIDDEN, INTERMEDIATE)] * 2,
          [(INTERMEDIATE, HIDDEN)]]  # (in, out) of q/k/v, o, gate/up, down


def make_groups(tokens: int):
    groups = []
    for members in GROUPS:
        x = torch.randn(tokens, members[0][0], requires_grad=True)
        layers = [(torch.randn(n, k) * k ** -0.5, (torch.randn(RANK, k) * 0.02).requires_grad_(),
                   (torch.randn(n, RANK) * 0.02).requires_grad_(), 2.0, None) for k, n in members]
        groups.append((x, layers, [torch.randn(tokens, n) for _k, n in members]))
    return groups


def layer_step(groups, mode: str) -> None:
    for x, layers, dys in groups:
        if mode == "base":
            ys = [torch.nn.functional.linear(x, w) for w, *_ in layers]
        elif mode == "grouped":
            ys = lora_linear_group(x, layers)
        else:
            ys = [lora_linear(x, *layer) for layer in layers]
        torch.autograd.backward(ys, dys)


def timed(groups, mode: str, repeats: int) -> float:
    os.environ["FASTCHAT_FT_CPU_LORA"] = "0" if mode == "torch" else "1"
    layer_step(groups, mode)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        layer_step(groups, mode)
    return (time.perf_counter() - t0) / repeats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5, help="decoder layers timed per round and mode")
    ap.add_argument("--tokens", type=int, default=980, help="rows per forward (the bench's merged step: ~980)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu_lora.json"))
    args = ap.parse_args()
    from fastchat_ft.engine.cpu_allocator import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    groups = make_groups(args.tokens)
    modes = ("torch", "native", "grouped", "base")
    seconds = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            seconds[mode].append(timed(groups, mode, args.repeats))
    median = {mode: statistics.median(v) for mode, v in seconds.items()}
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; one SmolLM2-135M layer's LoRA linears "
          f"(rank {RANK}), {args.tokens} tokens, forward + backward, median of {args.rounds} alternating rounds")
    lora = {mode: median[mode] - median["base"] for mode in modes[:3]}
    for mode in modes:
        share = f"  LoRA part {1e3 * lora[mode]:6.2f} ms" if mode in lora else " " * 23
        print(f"  {mode:8s} {1e3 * median[mode]:7.2f} ms{share}   rounds "
              f"{' '.join(f'{1e3 * s:.2f}' for s in seconds[mode])}")
    print(f"  whole layer: torch / native {median['torch'] / median['native']:.2f}x, torch / grouped "
          f"{median['torch'] / median['grouped']:.2f}x; LoRA part: torch / native "
          f"{lora['torch'] / lora['native']:.2f}x, torch / grouped {lora['torch'] / lora['grouped']:.2f}x")
    doc = {"benchmark": "cpu_lora", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpu": cpu_name(), "threads": args.threads}, "torch": torch.__version__,
           "load_average": os.getloadavg(), "tokens": args.tokens, "rank": RANK, "rounds": args.rounds,
           "seconds_per_layer": seconds, "median_seconds": median,
           "lora_part_seconds": lora,
           "ratios": {"torch_over_native": median["torch"] / median["native"],
                      "torch_over_grouped": median["torch"] / median["grouped"],
                      "lora_part_torch_over_native": lora["torch"] / lora["native"],
                      "lora_part_torch_over_grouped": lora["torch"] / lora["grouped"]}}
    write_results(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
