"""Learning-rate schedule: linear warmup (the first step at peak/W, the peak at step W), then cosine or linear
to 0 at the end, or constant. A plain function of the step, so resume needs only the step number (scheduler.pt is
saved too, for tools that expect it)."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str = "cosine") -> float:
    """Multiplier on the peak learning rate for optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps  # step 0 already moves: a zero-lr first step wastes a batch
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, kind: str):
    warmup = warmup_steps_for(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, kind))
