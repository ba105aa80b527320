"""Warmup + cosine/linear/constant: the multiplier the optimizer's lr follows, step by step."""
import math

import pytest
import torch

from fastchat_ft.engine.schedule import build_scheduler, lr_factor, warmup_steps_for


def test_warmup_then_cosine_to_zero():
    total, warm = 20, warmup_steps_for(20, 0.1)
    assert warm == 2
    f = [lr_factor(s, total, warm) for s in range(total)]
    assert f[:2] == [0.5, 1.0]  # linear warmup; the first step already moves
    assert f[2] == 1.0 and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert lr_factor(total, total, warm) == pytest.approx(0.0)
    assert lr_factor(7, total, warm, "linear") == pytest.approx(1 - 5 / 18)
    assert lr_factor(7, total, warm, "constant") == 1.0


def test_scheduler_state_round_trips():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_scheduler(opt, 10, 0.1, "cosine")
    for _ in range(4):
        opt.step()
        sched.step()
    lr = opt.param_groups[0]["lr"]
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = build_scheduler(opt2, 10, 0.1, "cosine")
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != lr
