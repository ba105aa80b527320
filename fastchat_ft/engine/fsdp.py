"""FSDP2 for full fine-tuning under torchrun: each decoder layer and then a root holding the rest (embeddings,
final norm, lm_head) are sharded with `torch.distributed.fsdp.fully_shard`; the optimizer steps on the shards.
Every forward all-gathers, so every rank runs the same number of forwards (training, evaluation, generation).
Checkpoints: torch.distributed.checkpoint (DCP) shards of model + optimizer for resume, plus the full weights
gathered on rank 0 in the HF safetensors layout so eval/export read them unchanged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fastchat_ft.engine import distributed as dist_mod

DCP_DIR = "dcp"  # inside a checkpoint folder: model + optimizer shards written by every rank


class DecoderRoot(torch.nn.Module):
    """The FSDP root. Its forward is the decoder's, so the root's pre-forward gathers the parameters outside the
    layers. It wraps the whole model so a tied lm_head shares its all-gathered weight with the embedding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, use_cache=False, **kw):
        return self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, **kw)


class _View:
    """What loss.loss_sum / validation.evaluate read: the model, except that `base_model` is the FSDP root."""

    def __init__(self, model, root):
        self._model, self.base_model = model, root

    def __getattr__(self, name):
        return getattr(self._model, name)


@dataclass
class Sharded:
    model: torch.nn.Module   # the HF model; its parameters are now DTensor shards
    root: torch.nn.Module    # DecoderRoot, an FSDPModule
    view: _View


def shard(model) -> Sharded:
    """fully_shard each decoder layer, then the root. Every rank must hold the same weights before (rank 0's are
    broadcast first). The root keeps its parameters gathered after forward (reshard_after_forward=False): the
    loss reads lm_head's weight after the decoder's forward returns. One blank forward runs FSDP's lazy init, so
    a generation that enters through the HF model's own forward (bypassing the root) finds it done."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.layers:
        fully_shard(layer)
    root = DecoderRoot(model)
    fully_shard(root, reshard_after_forward=False)
    sharded = Sharded(model, root, _View(model, root))
    device = next(model.parameters()).device
    with torch.no_grad():
        root(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
             position_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    root.reshard()
    return sharded


@contextlib.contextmanager
def gathered(sharded: Sharded | None):
    """The root's parameters (embeddings, norm, lm_head) whole on every rank for evaluation / generation; the
    layers gather themselves in their forward. Every rank must run the same forwards inside (collectives)."""
    if sharded is None:
        yield
        return
    sharded.root.unshard()
    try:
        yield
    finally:
        sharded.root.reshard()


def micro_batches_per_rank(n_step_batches: int, accumulation: int) -> int:
    """The most micro-batches any rank gets this step (the last step of an epoch can leave a rank short)."""
    size = dist_mod.world()[1]
    return max(1, max(len(range(n_step_batches)[r * accumulation:(r + 1) * accumulation]) for r in range(size)))


def backward_step(sharded: Sharded, batches: list[dict], mode: str, amp, n_forwards: int) -> tuple[float, int]:
    """loss.loss_sum over this rank's micro-batches through FSDP, with DDP-path semantics: the label count of
    the whole step is summed over ranks first; gradients reduce-scatter only on the last micro-batch
    (set_requires_gradient_sync(False) before); FSDP AVERAGES the reduce-scatter, so each loss is scaled by the
    world size. A rank with fewer micro-batches pads with label-free blank ones up to `n_forwards`: every
    forward all-gathers, so all ranks must run the same number."""
    from fastchat_ft.engine.loss import count_units, lm_head_of, loss_sum, to_device

    size = dist_mod.world()[1]
    denominator = max(1, dist_mod.sum_over_ranks(sum(count_units(b, mode) for b in batches)))
    device = next(sharded.model.parameters()).device
    blank = {"input_ids": [[0]], "labels": [[-100]], "position_ids": [[0]]}
    work = list(batches) + [to_device(blank, device) for _ in range(n_forwards - len(batches))]
    token_loss = 0.0
    for i, b in enumerate(work):
        sharded.root.set_requires_gradient_sync(i == len(work) - 1)
        sharded.root.unshard()  # loss_sum reads the lm_head weight before the root's forward would gather it
        with amp:
            loss, logged = loss_sum(sharded.view, b, mode, denominator)
            if not b["targets"].labels.numel():  # lm_head gets a (zero) gradient too: same reduce-scatter on all ranks
                loss = loss + lm_head_of(sharded.view)[0].sum() * 0.0
        (loss * size).backward()
        token_loss += float(logged)
    n_label = int(dist_mod.sum_over_ranks(sum(int(b["targets"].labels.numel()) for b in batches)))
    return dist_mod.sum_over_ranks(token_loss) / max(1, n_label), n_label


def grad_norm_value(norm) -> float:
    """clip_grad_norm_ over DTensor gradients returns a DTensor: its full value."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# ----------------------------------------------------------------------------------------------- checkpoints

def full_state_dict(sharded: Sharded) -> dict:
    """The HF model's full state dict, gathered to rank 0's CPU memory (empty on the other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(sharded.root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if getattr(sharded.model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: saved once, as the embedding
    return sd


def save_sharded(sharded: Sharded, optimizer, folder: Path) -> None:
    """Model + optimizer shards with torch.distributed.checkpoint into folder/dcp. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(sharded.root, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder / DCP_DIR))


def load_sharded(root: torch.nn.Module, optimizer, folder: Path) -> None:
    """Restore model + optimizer written by save_sharded into `root`: the FSDP root (any world size: DCP
    reshards), or DecoderRoot(model) of an unsharded model (one process, or DDP) for the same names. Collective
    when a process group exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from fastchat_ft.errors import ConfigError

    if not (folder / DCP_DIR / ".metadata").is_file():
        raise ConfigError(f"no {DCP_DIR}/ (FSDP shards) in this checkpoint: it was written without FSDP",
                          file=str(folder), field="--resume",
                          fix="resume it the way it was written (parallelism: ddp, or one process)")
    model_sd, optim_sd = get_state_dict(root, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
