"""Checkpoints: written atomically (tmp dir + rename), last K kept, loaded back for an exact resume
(weights, optimizer, scheduler, RNG, data position), and the Ctrl-C / SIGTERM stop flag.
Everything read back uses safetensors or torch.load(weights_only=True): a checkpoint cannot run code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastchat_ft.atomic import readable_by_all
from fastchat_ft.engine import distributed as dist_mod
from fastchat_ft.errors import ConfigError, ModelError
from fastchat_ft.model import lora as lora_mod

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
STEP_DIR = re.compile(r"^step-(\d{6,})$")
STAGED = re.compile(r"^\.(step-\d{6,}|final)\.(tmp|old)-")  # save_checkpoint's staging and set-aside folders
RESUME_FIX = "resume with the same base_model and adapter settings (lora_r, target modules) the run started with"


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # data position: epoch ...
    batch_in_epoch: int = 0       # ... and optimizer step inside it; resume jumps here, no replay
    tokens_seen: int = 0          # non-padding tokens fed to the model
    best_val_loss: float | None = None
    config_hash: str = ""
    data_fingerprint: str = ""    # the packed training rows the data position indexes (empty: older checkpoint)


def data_fingerprint(n_rows: int, digests: list[str]) -> str:
    """The training rows' count and the training files' contents (their sha256 `digests`, in order): a resume's
    data position means the same batches only if both are unchanged (config_hash covers the dataset paths, not
    what the files hold)."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
    return f"{n_rows} rows, files {h.hexdigest()[:16]}"


def save_model_files(folder: Path, model, model_info: dict, tokenizer_dir: Path, state_dict: dict | None = None) -> None:
    """The servable part: PEFT adapter or full weights (`state_dict`: weights gathered from FSDP shards), plus
    the tokenizer with its chat template."""
    if model_info["adapter"]:
        lora_mod.save_adapter(model, folder, model_info["adapter_config"], model_info.get("extra_modules"))
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, folder / name)


def save_checkpoint(run_dir: Path, state: TrainState, model, model_info: dict, tokenizer_dir: Path,
                    optimizer, scheduler, keep: int, name: str | None = None,
                    rng_states: list[dict] | None = None, sharded=None) -> Path:
    """Write checkpoints/step-NNNNNN (or `name` directly under run_dir) atomically; prune to the last `keep`.
    `rng_states` holds every rank's RNG state (from `gather_rng_states`): rank r > 0 goes to rng-rank{r}.pt.
    With `sharded` (FSDP) every rank calls this: each writes its model + optimizer shards to dcp/ (instead of
    optimizer.pt), the full weights are gathered to rank 0, and rank 0 alone writes the rest and renames."""
    from fastchat_ft.engine import fsdp

    rank = dist_mod.world()[0]
    parent = run_dir if name else run_dir / "checkpoints"
    final = parent / (name or f"step-{state.step:06d}")
    tmp = None
    if not rank:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    full = None
    if sharded is not None:
        try:
            tmp = Path(dist_mod.broadcast_object(str(tmp) if tmp else None))
            fsdp.save_sharded(sharded, optimizer, tmp)
            full = fsdp.full_state_dict(sharded)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True) if not rank else None
            raise
        if rank:
            return final
    try:
        save_model_files(tmp, model, model_info, tokenizer_dir, state_dict=full)
        (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
        if sharded is None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for r, rng in enumerate(rng_states or [_rng_state()]):
            torch.save(rng, tmp / rng_file_name(r))
        readable_by_all(tmp)  # mkdtemp's 0700 would keep the model from anyone but this user
        replaced = _set_aside(final) if final.exists() else None  # a re-save (a run into its folder again)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)
    if not name:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(_set_aside(old), ignore_errors=True)
    _remove_staged(parent)
    return final


def _remove_staged(parent: Path) -> None:
    """The staging and set-aside folders a killed save left in parent (saves are collective: none is under way)."""
    for stale in parent.iterdir():
        if STAGED.match(stale.name) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _set_aside(folder: Path) -> Path:
    """Rename `folder` to a hidden name before it is removed: removing it in place, a kill part way left a
    half-deleted step-NNNNNN (or final/) under the name --resume and export look for."""
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)  # left by a killed save of this process id: a rename needs the name free
    os.replace(folder, aside)
    return aside


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """--resume (latest in run_dir) or --resume PATH (a checkpoint folder)."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError("not a checkpoint folder (no trainer_state.json)", file=str(path), field="--resume",
                              fix=f"pass one of {run_dir}/checkpoints/step-NNNNNN, or --resume alone for the latest")
        return path
    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"no checkpoint to resume in {run_dir}/checkpoints", field="--resume",
                          fix="check output_dir, or start without --resume")
    return found[-1]


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((Path(path) / "trainer_state.json").read_text()))


def finished_step(run_dir: Path, resume: str, state: TrainState) -> int:
    """The step the run has reached: the resumed checkpoint's, or for --resume alone (latest) final/'s when the
    run finished past its last checkpoint (save_steps not dividing the total)."""
    final = Path(run_dir) / "final" / "trainer_state.json"
    if resume == "latest" and final.is_file():
        return max(state.step, read_state(final.parent).step)
    return state.step


def refuse_to_replace_newer(run_dir: Path, path: Path, state: TrainState) -> None:
    """Training on from an older checkpoint would save over the run's later checkpoints and its final/ model."""
    newer = [p.name for p in list_checkpoints(run_dir) if int(STEP_DIR.match(p.name).group(1)) > state.step]
    if (Path(run_dir) / "final").is_dir():
        newer.append("final/")
    if newer:
        raise ConfigError(f"{run_dir} holds a later state of the run than {path} (step {state.step}): "
                          f"{', '.join(newer)}; resuming there would replace it", field="--resume",
                          fix="resume into a new --output-dir (--resume PATH may name a checkpoint of another "
                              "folder), or replace them with --set overwrite_output_dir=true")


def check_data_position(path: Path, state: TrainState, steps_epoch: int, fingerprint: str) -> None:
    """The checkpoint's data position must index the same packed rows, else the resume trains on other batches
    (or, past the epoch's end, on none)."""
    changed = state.data_fingerprint and fingerprint and state.data_fingerprint != fingerprint
    if changed or state.batch_in_epoch >= steps_epoch:
        was = f" (checkpoint: {state.data_fingerprint}; now: {fingerprint})" if changed else (
            f" (checkpoint at batch {state.batch_in_epoch} of an epoch that now has {steps_epoch})")
        raise ConfigError(f"the training data (or its batching) changed since {path} was saved{was}",
                          file=str(path), field="--resume",
                          fix="restore the data files and batch settings the run started with, or start a new run "
                              "without --resume")


def finished_at(run_dir: Path, resume: str, total_steps: int) -> int | None:
    """--resume for train and distill, first: the step a run already finished at (said so; nothing to do), else
    None. It reads trainer_state.json alone, so that a finished run is told before any model is loaded."""
    done = finished_step(run_dir, resume, read_state(resolve_resume(run_dir, resume)))
    if done < total_steps:
        return None
    print(f"{run_dir}: the run already finished at step {done} (of {total_steps}): nothing to do. To train "
          "further, raise max_steps / num_epochs and resume into a new --output-dir (or set "
          "overwrite_output_dir=true)")
    return done


def final_from_last_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """final/ as a copy of the run's last checkpoint (the same layout) when that is at the run's last step `steps`
    and final/ is missing: a run killed while it wrote final/ is finished, so a resume trains nothing, and without
    this the model export reads never came. Rank 0 writes it."""
    found = list_checkpoints(run_dir)
    final = Path(run_dir) / "final"
    if dist_mod.world()[0] or final.exists() or not found or read_state(found[-1]).step != steps:
        return None
    tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=run_dir))
    try:
        shutil.copytree(found[-1], tmp, dirs_exist_ok=True)
        readable_by_all(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_staged(Path(run_dir))  # the killed final/ write's
    print(f"{final}: copied from {found[-1]} (the run stopped before it wrote final/)")
    return final


def resume_checked(run_dir: Path, resume: str, load, *, steps_epoch: int, fingerprint: str,
                   overwrite: bool) -> TrainState:
    """--resume for train and distill, once the model is built (and finished_at has said there is training left):
    the checkpoint loaded by load(path), then checked before anything is written into the run folder."""
    path = resolve_resume(run_dir, resume)
    state = load(path)
    if not overwrite:
        refuse_to_replace_newer(run_dir, path, state)
    check_data_position(path, state, steps_epoch, fingerprint)
    state.data_fingerprint = fingerprint  # an older checkpoint had none: the next ones carry it
    print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    return state


def load_checkpoint(path: Path, model, model_info: dict, optimizer, scheduler, config_hash: str,
                    sharded=None) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG; return the state holding the data position. With
    `sharded` (FSDP; every rank calls this) model and optimizer come from the checkpoint's dcp/ shards."""
    state = read_state(path)
    if state.config_hash and state.config_hash != config_hash:
        print(f"warning: {path} was written with a different config; resuming with the current one")
    if sharded is not None:
        from fastchat_ft.engine import fsdp

        fsdp.load_sharded(sharded.root, optimizer, path)
    elif model_info["adapter"]:
        lora_mod.load_adapter(model, path)
        extra = model_info.get("extra_modules") or {}
        if extra:
            from safetensors.torch import load_file
            tensors = load_file(str(path / lora_mod.ADAPTER_WEIGHTS))
            own = {f"{lora_mod.PEFT_PREFIX}{name}.weight": module.weight for name, module in extra.items()}
            wrong = [f"{k} missing" for k in own if k not in tensors] + lora_mod.shape_mismatches(tensors, own)
            if wrong:
                raise ModelError(f"checkpoint weights do not fit this model (saved vs model shape): "
                                 f"{'; '.join(wrong[:2])}", file=str(path), field="--resume", fix=RESUME_FIX)
            with torch.no_grad():
                for mod_name, module in extra.items():
                    module.weight.copy_(tensors[f"{lora_mod.PEFT_PREFIX}{mod_name}.weight"])
    else:
        _load_full_weights(model, path)
    if sharded is None and not (path / "optimizer.pt").is_file() and (path / "dcp").is_dir():
        from fastchat_ft.engine import fsdp  # written under FSDP, resumed without it: its shards, gathered whole

        fsdp.load_sharded(fsdp.DecoderRoot(model), optimizer, path)
    elif sharded is None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank = dist_mod.world()[0]
    rng = path / rng_file_name(rank)
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:  # resumed with more processes than saved it: this rank keeps its fresh seed (dropout masks differ)
        print(f"warning: {path} has no {rng.name}; rank {rank} resumes with a fresh RNG state", file=sys.stderr)
    return state


def _load_full_weights(model, path: Path) -> None:
    """model.safetensors, or the shards named by model.safetensors.index.json (tied weights are absent)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    if not all((path / name).is_file() for name in files):  # e.g. a LoRA checkpoint resumed as full fine-tuning
        raise ModelError("checkpoint has no full model weights (model.safetensors)", file=str(path), field="--resume",
                         fix=RESUME_FIX)
    state = {}
    for name in files:
        state.update(load_file(str(path / name)))
    wrong = lora_mod.shape_mismatches(state, model.state_dict())
    if wrong:  # load_state_dict would raise a RuntimeError listing every tensor
        raise ModelError(f"checkpoint weights do not fit this model (saved vs model shape): {'; '.join(wrong[:2])}",
                         file=str(path), field="--resume", fix=RESUME_FIX)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if model.get_output_embeddings() is not None else set()
    if unexpected or set(missing) - tied:
        raise ConfigError(f"checkpoint does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}", file=str(path), field="--resume",
                          fix=RESUME_FIX)


def rng_file_name(rank: int) -> str:
    """rng.pt for rank 0 (the single-process layout), rng-rank{r}.pt for the other ranks."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def gather_rng_states() -> list[dict] | None:
    """Every rank's RNG state, in rank order, on rank 0 (None elsewhere). A collective: all ranks call it."""
    return dist_mod.gather_on_main(_rng_state())


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop finishes the step, saves and exits. A second Ctrl-C aborts."""

    # Under torchrun a rank can get one stop twice within moments: from a scheduler that signals every process of
    # the job (Slurm, systemd) and again from torchrun passing it on. Aborting on that copy lost the checkpoint.
    COPY_WINDOW_S = 5.0

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        self._at = 0.0

    def _handle(self, signum, frame):
        if self.requested:  # second signal: the user really wants out now
            if "TORCHELASTIC_RUN_ID" in os.environ and time.monotonic() - self._at < self.COPY_WINDOW_S:
                return
            raise KeyboardInterrupt
        self.requested, self._at = signal.Signals(signum).name, time.monotonic()
        print(f"\n{self.requested} received: finishing this step, saving a checkpoint, then exiting "
              "(press Ctrl-C again to abort without saving)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker): no handler
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
