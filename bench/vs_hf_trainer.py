"""Claim: fastchat-ft trains faster and leaner than HF Trainer (padded, and padding-free with
DataCollatorWithFlattening) on the same model, data, order and hyper-parameters, with the same loss curve.

Thin wrapper around `fastchat-ft bench` (fastchat_ft/bench.py): three runs in separate processes, a side-by-side
table (data prep, non-padding tokens/s, step time, MFU, peak memory, losses, ratios), exit 1 if the losses
disagree, bench/results/vs_hf_trainer-<device>.json and .png. CPU: SmolLM2-135M-Instruct + LoRA on the bundled
demo data; GPU: random Llama-shaped 1B and 8B in bf16.

Run: .venv/bin/python bench/vs_hf_trainer.py [--steps N] [--device cpu|cuda] [--models llama-1b]
"""
from __future__ import annotations

import sys

from fastchat_ft.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
