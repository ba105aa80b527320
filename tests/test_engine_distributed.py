"""Data parallelism: 2 gloo processes, each with half of the step's micro-batches, give the same loss and
gradients as 1 process with all of them (the label count is global, gradients are summed)."""
import contextlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastchat_ft.engine.data import micro_batches, step_rows
from fastchat_ft.engine.loss import backward_step, to_device
from fastchat_ft.model.lora import add_lora
from fastchat_ft.model.tiny import random_packed_rows, tiny_llama_config

VOCAB, MICRO, ACCUM = 211, 2, 2


def _model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48))
    add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.train()


def _step(world: int, rank: int):
    rows = random_packed_rows(3, VOCAB, seed=4)  # micro-batches of 2 and 1 rows, all on rank 0: rank 1 has none
    idx = step_rows(len(rows), MICRO, ACCUM * 2, seed=1, epoch=0, step_in_epoch=0)  # the global step: 4 micro-batches
    mine = idx[rank * ACCUM:(rank + 1) * ACCUM] if world > 1 else idx
    model = _model()
    batches = [to_device(b, torch.device("cpu")) for b in micro_batches(rows, mine)]
    loss, n = backward_step(model, batches, "token", contextlib.nullcontext())
    return loss, n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(_step(2, rank), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    loss1, n1, g1 = _step(1, 0)
    for rank in (0, 1):
        loss2, n2, g2 = torch.load(f"{out}.{rank}", weights_only=True)
        assert n2 == n1 > 0 and abs(loss2 - loss1) < 1e-6
        assert g2.keys() == g1.keys()
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7)
