"""Process group, rank-0-first setup and data parallelism (DDP over the decoder, or a bucketed all-reduce):
each rank runs its share of the optimizer step's micro-batches, the label-token count is summed over ranks
first (so every rank divides by the global count), gradients are summed. Identical updates on every rank; only
rank 0 writes files. `--nproc N` re-launches the command under torchrun. FSDP2 lives in engine/fsdp.py.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20
# how long ranks > 0 wait for rank 0's setup (model conversion, tokenizing a large dataset) before giving up
SETUP_TIMEOUT_S = float(os.environ.get("FASTCHAT_FT_SETUP_TIMEOUT", 6 * 3600))
_setup_calls = itertools.count()


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
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:  # NCCL needs one GPU per process; CUDA would say only "invalid device ordinal"
            from fastchat_ft.errors import ConfigError

            per_node = os.environ.get("LOCAL_WORLD_SIZE", "?")
            raise ConfigError(f"{per_node} processes per node but {gpus} GPU(s) visible: each process needs its own GPU",
                              field="--nproc", fix=f"use --nproc {gpus} (torchrun --nproc-per-node {gpus}), or "
                              "CUDA_VISIBLE_DEVICES= to run every process on the CPU with gloo")
        torch.cuda.set_device(local_rank)
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


def sum_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A small tensor summed over ranks (through the backend's device), back on t's device."""
    if world()[1] == 1:
        return t
    buf = t.to(_comm_device())
    dist.all_reduce(buf)
    return buf.to(t.device)


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


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Replicated:
    """The decoder wrapped in DistributedDataParallel, a view of the model that loss.loss_sum reads (its
    `base_model` is the wrapper, so every forward goes through DDP), and the trained parameters outside the
    decoder (an untied lm_head's new rows), whose gradients are summed by hand."""
    ddp: torch.nn.parallel.DistributedDataParallel
    view: object
    outside: list[torch.nn.Parameter]


class _ModelView:
    def __init__(self, model, ddp):
        self.base_model, self.config, self.get_output_embeddings = ddp, model.config, model.get_output_embeddings


def replicate(model) -> Replicated | None:
    """Wrap the decoder in DDP (None in a single process). DDP overlaps each gradient bucket's all-reduce with
    the rest of backward and broadcasts rank 0's weights at construction. The model itself is not changed:
    checkpoints, evaluation and generation keep using it. Buffers (rotary tables) are constants: not re-sent."""
    if world()[1] == 1:
        return None
    decoder = model.base_model
    device_ids = [torch.cuda.current_device()] if next(decoder.parameters()).is_cuda else None
    # static_graph stays off: every step's graph IS static (the same trained parameters, also in a blank
    # micro-batch), but in this torch (2.13) static_graph=True with no_sync() accumulation dies on the first
    # backward ("expect_autograd_hooks_ INTERNAL ASSERT FAILED", reducer.cpp; measured with 2 gloo ranks and 2
    # micro-batches each); pytorch PR #187732 fixes it and notes that the unfixed path also stops all-reducing
    # from the 2nd step. It would only save DDP's per-iteration bookkeeping, not communication.
    ddp = torch.nn.parallel.DistributedDataParallel(decoder, device_ids=device_ids, broadcast_buffers=False,
                                                    find_unused_parameters=False, static_graph=False)
    inside = {id(p) for p in decoder.parameters()}
    outside = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
    return Replicated(ddp, _ModelView(model, ddp), outside)


def ddp_backward_step(rep: Replicated, batches: list[dict], mode: str, amp) -> tuple[float, int]:
    """loss.backward_step through DDP: the label count of the whole step is summed over ranks first; gradients
    sync only on this rank's last micro-batch (no_sync before). DDP AVERAGES over ranks, so each loss is scaled
    by the world size to make the result the summed gradient, as one process with all micro-batches would get.
    A rank without micro-batches this step runs one label-free token so it still joins the all-reduce."""
    from fastchat_ft.engine.loss import count_units, loss_sum, to_device  # loss imports this module

    size = world()[1]
    denominator = max(1, sum_over_ranks(sum(count_units(b, mode) for b in batches)))
    if not batches:
        device = next(rep.ddp.parameters()).device
        blank = {"input_ids": [[0]], "labels": [[-100]], "position_ids": [[0]]}
        work = [to_device(blank, device)]
    else:
        work = batches
    token_loss = 0.0
    for i, b in enumerate(work):
        with contextlib.nullcontext() if i == len(work) - 1 else rep.ddp.no_sync():
            with amp:
                loss, logged = loss_sum(rep.view, b, mode, denominator)
            (loss * size).backward()
        token_loss += float(logged)
    sum_gradients(rep.outside)
    n_label = int(sum_over_ranks(sum(int(b["targets"].labels.numel()) for b in batches)))
    return sum_over_ranks(token_loss) / max(1, n_label), n_label


def rank_zero_first(work, timeout_s: float | None = None):
    """Run `work()` on rank 0, then on every other rank (which then reuse what rank 0 cached: converted model,
    extended tokenizer, tokenized data). The others wait on a key rank 0 sets in the rendezvous store, NOT in
    a collective: a barrier would hit the process group's timeout (30 min on gloo, 10 on nccl) while rank 0
    tokenizes a large dataset. If rank 0's work raises, it sets the key to the error, so the others fail at
    once with that reason instead of waiting out the deadline."""
    rank, size = world()
    if size == 1:
        return work()
    from fastchat_ft.errors import ConfigError

    store = dist.distributed_c10d._get_default_store()
    key = f"fastchat_ft/rank0_setup/{next(_setup_calls)}"  # every rank calls this in the same order
    if rank == 0:
        try:
            result = work()
        except BaseException as e:
            store.set(key, f"failed: {type(e).__name__}: {e}")
            raise
        store.set(key, "ok")
        return result
    timeout = SETUP_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        store.wait([key], timedelta(seconds=timeout))
    except (RuntimeError, dist.DistError) as e:
        raise ConfigError(f"rank {rank} waited {timeout:.0f} s for rank 0 to finish its setup (model, tokenizer, "
                          f"data cache) and gave up ({str(e).splitlines()[0]})",
                          fix="look at rank 0's output; for a very large dataset raise FASTCHAT_FT_SETUP_TIMEOUT "
                              "(seconds) or tokenize it first with one process") from None
    status = store.get(key).decode()
    if status != "ok":
        raise ConfigError(f"rank 0 failed during setup, so rank {rank} stops too: {status[len('failed: '):]}",
                          fix="fix the error rank 0 reported above")
    return work()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def shutdown(failed: bool = False) -> None:
    """Leave the process group. After a clean run all ranks meet first: a rank that tears gloo down while a peer
    is still finishing its last collective can abort that peer ("terminate called without an active
    exception"). After a failure there is no meeting (the peers may be stuck in another collective, and a
    barrier or a collective destroy would hang them): this rank just exits and torchrun stops the others."""
    if not (dist.is_available() and dist.is_initialized()) or failed:
        return
    # DDP wrappers sit in reference cycles with their modules' hooks and hold the process group: collected
    # now, while the interpreter is whole, not at exit, where tearing gloo down can abort the process
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """`fastchat-ft train ... --nproc N` -> `torchrun --nproc-per-node N -m fastchat_ft train ...`, in this process
    (exec): it does not return."""
    args = [a for i, a in enumerate(argv) if a != "--nproc" and not (i and argv[i - 1] == "--nproc")
            and not a.startswith("--nproc=")]
    torchrun = shutil.which("torchrun") or ""
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", f"--nproc-per-node={nproc}", "-m", "fastchat_ft", *args]
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    # This process becomes torchrun (exec, not a child): a signal reaches it as it reaches a torchrun started by
    # hand, which hands it to the ranks once (they finish the step and save). A launcher process in between either
    # kept SIGTERM from torchrun (`kill`, a container stop: it died alone, the ranks trained on), SIGKILLed torchrun
    # on Ctrl-C while the ranks were saving, or, passing signals on, gave torchrun a second one when the terminal or
    # a scheduler had signalled it too, which cut its shutdown short before the ranks saved.
    sys.stdout.flush()  # exec drops what Python has not written yet
    os.execv(cmd[0], cmd)
