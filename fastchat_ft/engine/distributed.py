"""Data parallelism without a wrapper: each rank runs its share of the optimizer step's micro-batches, the
label-token count is summed over ranks first (so every rank divides by the global count), and gradients are
summed with one all-reduce per bucket. Identical updates on every rank; only rank 0 writes files.
`--nproc N` re-launches the command under torchrun.
"""
from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_initialized()):
        return world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world()


def is_main() -> bool:
    return world()[0] == 0


def sum_over_ranks(value: float | int, device: torch.device | None = None) -> float:
    if world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t)
    return t.item()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any (a stop request on one rank stops all at the same step)."""
    return bool(sum_over_ranks(1 if flag else 0)) if world()[1] > 1 else flag


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum .grad over ranks in flat buckets (each rank's loss is already divided by the global count)."""
    if world()[1] == 1:
        return
    for p in params:  # a rank without micro-batches this step still joins every all-reduce
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= BUCKET_BYTES):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy rank 0's trained parameters to every rank. Needed because ranks seed differently (distinct dropout
    masks), so randomly initialised weights such as LoRA A would otherwise start different per rank. Frozen
    weights are read from the same files on every rank and are not sent (a 7B base would cost 14+ GB)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def gather_on_main(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others (picklable objects, CPU tensors)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """`fastchat-ft train ... --nproc N` -> `torchrun --nproc-per-node N -m fastchat_ft train ...`."""
    args = [a for i, a in enumerate(argv) if a != "--nproc" and not (i and argv[i - 1] == "--nproc")
            and not a.startswith("--nproc=")]
    torchrun = shutil.which("torchrun") or ""
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", f"--nproc-per-node={nproc}", "-m", "fastchat_ft", *args]
    print("launching: " + " ".join(cmd), file=sys.stderr)
    import subprocess
    return subprocess.call(cmd)
