"""Data parallelism: 2 gloo processes, each with half of the step's micro-batches, give the same loss and
gradients as 1 process with all of them (the label count is global, gradients are summed), both through the
hand-written all-reduce and through DistributedDataParallel (which averages: the loss is scaled by the world)."""
import contextlib

import torch
import torch.distributed as dist
import pytest
import torch.multiprocessing as mp

from fastchat_ft.engine.data import micro_batches, step_rows
from fastchat_ft.engine.distributed import ddp_backward_step, replicate, shutdown
from fastchat_ft.engine.loss import backward_step, to_device
from fastchat_ft.model.lora import add_lora
from fastchat_ft.model.tiny import random_packed_rows, tiny_llama_config

pytestmark = pytest.mark.usefixtures("gloo_on_cpu")  # gloo on CPU, also on a GPU machine

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


def _step(world: int, rank: int, n_rows: int = 3, ddp: bool = False, mode: str = "token"):
    # 3 rows: micro-batches of 2 and 1 rows, all on rank 0 (rank 1 has none); 11 rows: 2 micro-batches each
    rows = random_packed_rows(n_rows, VOCAB, seed=4)
    idx = step_rows(len(rows), MICRO, ACCUM * 2, seed=1, epoch=0, step_in_epoch=0)  # the global step: 4 micro-batches
    mine = idx[rank * ACCUM:(rank + 1) * ACCUM] if world > 1 else idx
    model = _model()
    if ddp and rank:  # DDP must start every rank from rank 0's weights, whatever each rank built
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    batches = [to_device(b, torch.device("cpu")) for b in micro_batches(rows, mine)]
    if ddp:
        loss, n = ddp_backward_step(replicate(model), batches, mode, contextlib.nullcontext())
    else:
        loss, n = backward_step(model, batches, mode, contextlib.nullcontext())
    return loss, n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _worker(rank, store, out, kw):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.save(_step(2, rank, **kw), f"{out}.{rank}")
    shutdown()  # the engine's own teardown: every rank meets before gloo is torn down


@pytest.mark.parametrize("kw", [{}, {"ddp": True}, {"ddp": True, "n_rows": 11, "mode": "sequence"}],
                         ids=["allreduce", "ddp-rank-without-batches", "ddp-sequence"])
def test_two_gloo_processes_match_one(tmp_path, kw):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out, kw), nprocs=2, join=True)
    loss1, n1, g1 = _step(1, 0, n_rows=kw.get("n_rows", 3), mode=kw.get("mode", "token"))
    for rank in (0, 1):
        loss2, n2, g2 = torch.load(f"{out}.{rank}", weights_only=True)
        assert n2 == n1 > 0 and abs(loss2 - loss1) < 1e-6
        assert g2.keys() == g1.keys()
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7)


def test_more_processes_per_node_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine: a ConfigError naming both counts and the fixes, not CUDA's
    'invalid device ordinal' from the second process."""
    from fastchat_ft.engine import distributed
    from fastchat_ft.errors import ConfigError

    for key, value in (("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes per node but 1 GPU") as err:
        distributed.init_from_env()
    assert "--nproc 1" in str(err.value) and "CUDA_VISIBLE_DEVICES=" in str(err.value)
    assert not dist.is_initialized()
