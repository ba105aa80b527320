"""`fastchat-ft train`: setup (data, model, loss, optimizer, schedule, resume state, in that order) and the
training loop. Checkpoint files, metrics, validation and diagnostics live in their own modules here.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastchat_ft import config as config_mod
from fastchat_ft import flags
from fastchat_ft.engine import checkpoint as ckpt
from fastchat_ft.engine import data as data_mod
from fastchat_ft.engine import diagnostics as diag
from fastchat_ft.engine import distributed as dist_mod
from fastchat_ft.engine import fsdp
from fastchat_ft.engine.cpu_allocator import tune_cpu_allocator
from fastchat_ft.engine.loss import backward_step, to_device
from fastchat_ft.engine.metrics import MetricsLogger, append_samples
from fastchat_ft.engine.rundir import clear_earlier_run, generate_samples, write_run_files
from fastchat_ft.engine.schedule import build_scheduler
from fastchat_ft.engine.validation import EvalResult, evaluate
from fastchat_ft.errors import ConfigError, ModelError
from fastchat_ft.model import load as load_mod
from fastchat_ft.model import lora as lora_mod


def train_config(args):
    """The run's config: the YAML (or the bundled demo's) with --set, then the flags."""
    cfg = config_mod.load(args.config, args.set)
    if args.base_model:
        cfg.base_model = args.base_model
    if args.data:
        for p in args.data:
            flags.input_file(p, "--data")
        cfg.datasets = [{"path": str(Path(p).resolve()), "type": "chat_template"} for p in args.data]
        if not args.config and not getattr(args, "val_data", None):
            # the bundled config's test_datasets are the demo's validation file, which says nothing about your
            # data: hold out a share of --data instead (val_set_size, 5% unless set)
            cfg.test_datasets = []
            cfg.val_set_size = cfg.val_set_size or 0.05
    if getattr(args, "val_data", None):
        for p in args.val_data:
            flags.input_file(p, "--val-data")
        cfg.test_datasets = [{"path": str(Path(p).resolve()), "type": "chat_template"} for p in args.val_data]
    if getattr(args, "max_steps", None) is not None:
        cfg.max_steps = args.max_steps
    if args.output_dir:
        cfg.output_dir = args.output_dir
    return cfg


def run_train(args) -> int:
    flags.at_least(args, {"nproc": 1, "max_steps": 1})  # --nproc 0 used to mean one process, silently
    cfg = train_config(args)
    config_mod.validate(cfg)
    check_config_data_files(cfg)
    flags.output_folder(cfg.output_dir, "--output-dir" if args.output_dir else "output_dir")
    if not (args.dry_run or cfg.overwrite_output_dir):  # before torchrun starts N processes
        refuse_to_overwrite(Path(cfg.output_dir), args.resume)
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return dist_mod.relaunch_with_torchrun(args.nproc, sys.argv[1:])
    try:
        summary = train(cfg, dry_run=args.dry_run, resume=args.resume, skip_bad_batches=args.skip_bad_batches)
    except BaseException:
        dist_mod.shutdown(failed=True)
        raise
    dist_mod.shutdown()
    return stopped_status(summary)


def finished_already(run_dir: Path, steps: int, undo_setup) -> dict:
    """train's (and distill's) summary for a resumed run that had already finished (at `steps`): nothing trained.
    What setup wrote to the output folder goes again (undo_setup, from removed_if_setup_fails): a finished
    checkpoint resumed into a new --output-dir left that folder behind with only a tokenizer/ in it."""
    dist_mod.barrier()  # every rank has read rank 0's tokenizer/ there before it goes
    undo_setup()
    ckpt.final_from_last_checkpoint(run_dir, steps)  # after the undo, which removes what it finds new
    return {"run_dir": str(run_dir), "steps": steps, "stopped": None, "finished": True, "train_losses": []}


def agreed_stop(requested):
    """This rank's stop reason after a step (None: go on), made the same on every rank: all stop after the same
    step. Read once per step, so a signal landing in the step's logging or save is acted on after the next one."""
    if dist_mod.any_rank(bool(requested)):
        return requested or "stop on another rank"
    return None


def stopped_status(summary) -> int:
    """The exit status: 0 for a finished run; 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM) for one
    stopped early, checkpoint saved, so that `train && export` does not go on with a half-trained model."""
    stopped = summary.get("stopped") if isinstance(summary, dict) else None
    sig = getattr(signal, str(stopped), None) if stopped else None
    return 128 + int(sig) if sig is not None else 0


def check_config_data_files(cfg) -> None:
    """The datasets / test_datasets of the config (already resolved against the config file's folder)."""
    for key in ("datasets", "test_datasets"):
        for entry in getattr(cfg, key):
            flags.input_file(entry["path"], key, data_mod.CONFIG_FIX)


@contextlib.contextmanager
def removed_if_setup_fails(run_dir: Path, rank: int):
    """Create run_dir; if setup then fails (a bad base model, data or checkpoint), remove what it wrote: run_dir
    when this run created it, so no run folder is left behind, else only the entries setup added to it (nothing
    that was there before is touched). Yields that undo for a setup that finds nothing to train."""
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    existed = set() if created else set(run_dir.iterdir())
    run_dir.mkdir(parents=True, exist_ok=True)

    def undo():
        if rank:  # rank 0 alone: the other ranks may have seen rank 0's folder already
            return
        if not created:
            for p in set(run_dir.iterdir()) - existed:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            return
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in created[1:]:  # parent folders go only if empty: another run may have started there
            with contextlib.suppress(OSError):
                parent.rmdir()

    try:
        yield undo
    except BaseException:
        undo()
        raise


@dataclass
class Prepared:
    """Setup up to the model: the device, the settled tokenizer and the packed data."""
    device: torch.device
    amp_dtype: torch.dtype | None
    base_dir: Path
    tokenizer: object            # HF tokenizer, for sample generations
    tokenizer_dir: Path
    new_ids: list[int]           # tokens the chat template added to the vocabulary
    data: data_mod.RunData


@dataclass
class Setup:
    device: torch.device
    amp_dtype: torch.dtype | None
    model: torch.nn.Module
    model_info: dict
    tokenizer: object            # HF tokenizer, for sample generations
    tokenizer_dir: Path
    data: data_mod.RunData


def pick_device(cfg) -> tuple[torch.device, torch.dtype | None]:
    if torch.cuda.is_available():
        bf16 = cfg.bf16 is True or (cfg.bf16 == "auto" and torch.cuda.is_bf16_supported())
        return torch.device("cuda"), torch.bfloat16 if bf16 else None
    if cfg.bf16 is True:  # asked for explicitly: say it is not honoured rather than train in another precision silently
        print("fastchat-ft: bf16: true applies on a GPU; this run is on the CPU and trains in fp32 (bf16 matmuls are "
              "slower than fp32 on most CPUs)", file=sys.stderr)
    return torch.device("cpu"), None  # CPU: fp32 (bf16 matmuls are slower than fp32 on most CPUs)


def use_norm_and_mlp_kernels(model) -> None:
    """Our RMSNorm and SwiGLU in the decoder (the fused CE and LoRA kernels are the engine's own already), for
    the model types fastchat_ft.patch knows. SwiGLU keeps one [tokens x intermediate] activation less per layer
    (one native pass each way on CPU in fp32), two on CUDA (the down projection's input is recomputed in backward); RMSNorm is Triton on CUDA and, on CPU in fp32, HF's forward with a closed-form
    backward (half the time of autograd's)."""
    from fastchat_ft.model.patch import FAMILIES, patch

    if model.config.model_type in FAMILIES:
        patch(model, loss=False, lora=False)


def prepare(cfg, run_dir: Path, data: data_mod.RunData | None = None) -> Prepared:
    """Device, tokenizer and data: what sizes the run (its steps) before any model is loaded."""
    device, amp_dtype = pick_device(cfg)
    if device.type == "cpu":  # before the model and the first step allocate: reuse freed activations
        tune_cpu_allocator()
    base_dir = load_mod.resolve_base_model(cfg.base_model)
    tokenizer = load_mod.load_hf_tokenizer(base_dir, cfg.trust_remote_code)
    # the tokenizer is settled first: the data is tokenized with it and the embeddings are sized to it
    tokenizer_dir, new_ids = settle_tokenizer(tokenizer, cfg.chat_template, base_dir, run_dir)
    data = data or data_mod.build_run_data(cfg, tokenizer_dir)
    return Prepared(device, amp_dtype, base_dir, tokenizer, tokenizer_dir, new_ids, data)


def run_length(cfg, n_rows: int, world: int) -> tuple[int, int, int]:
    """(micro-batches per optimizer step over all ranks, optimizer steps per epoch, the run's total steps)."""
    per_step = cfg.gradient_accumulation_steps * world
    steps_epoch = data_mod.steps_per_epoch(n_rows, cfg.micro_batch_size, per_step)
    return per_step, steps_epoch, cfg.max_steps or max(1, math.ceil(steps_epoch * cfg.num_epochs))


def build(cfg, p: Prepared) -> Setup:
    """The model on p's device, resized to p's tokenizer, with LoRA / kernels / checkpointing as configured."""
    device, amp_dtype, base_dir, tokenizer, new_ids = p.device, p.amp_dtype, p.base_dir, p.tokenizer, p.new_ids
    quant = lora_mod.quantize_config() if cfg.adapter == "qlora" else None
    # frozen base weights may live in bf16 on GPU; trained weights stay fp32 (the optimizer's master copy)
    dtype = torch.bfloat16 if (cfg.adapter and amp_dtype is not None) else torch.float32
    model = load_mod.load_model(base_dir, dtype=dtype, trust_remote_code=cfg.trust_remote_code, quantization_config=quant)
    load_mod.resize_for_tokenizer(model, tokenizer)
    if quant is None:  # a 4-bit model is already on its GPU and refuses .to()
        model.to(device)
    info = {"adapter": cfg.adapter, "base_dir": base_dir}
    if cfg.adapter:
        lora_mod.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        info["extra_modules"] = load_mod.train_new_rows_only(model, new_ids)
        info["adapter_config"] = lora_mod.adapter_config(model, base_dir, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                                         cfg.lora_target_modules, list(info["extra_modules"]) or None)
    use_norm_and_mlp_kernels(model)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.torch_compile:
        for layer in model.base_model.layers:
            layer.compile()
    model.train()
    return Setup(device, amp_dtype, model, info, tokenizer, p.tokenizer_dir, p.data)


def settle_tokenizer(tokenizer, template: str, base_dir: Path, run_dir: Path) -> tuple[Path, list[int]]:
    """Rank 0 saves the extended tokenizer to run_dir/tokenizer. Other ranks (which run after it) extend theirs
    in memory the same way but save into a private scratch folder, not over the files rank 0 wrote (ranks 1..N
    would otherwise rewrite them while another reads them), then use rank 0's folder, so every rank's data
    cache key is the same."""
    shared = run_dir / "tokenizer"
    rank = dist_mod.world()[0]
    if not rank:
        return load_mod.extend_tokenizer(tokenizer, template, base_dir, shared)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=f".tokenizer-rank{rank}-") as scratch:
        tokenizer_dir, new_ids = load_mod.extend_tokenizer(tokenizer, template, base_dir, Path(scratch))
    return (shared if new_ids else tokenizer_dir), new_ids


def use_fsdp(cfg) -> bool:
    """FSDP2 for full fine-tuning (weights + AdamW state of the whole model would otherwise sit on every rank),
    DDP for LoRA/QLoRA (a few trained weights: sharding buys nothing); `parallelism` forces either."""
    return cfg.parallelism == "fsdp" or (cfg.parallelism == "auto" and not cfg.adapter)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward. Non-reentrant, so frozen embeddings (LoRA) need no hook."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # no decay on norms, biases and embeddings (whose frozen rows must not move)
            (no_decay if p.ndim < 2 or "embed" in name or "lm_head" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.resolved_learning_rate(),
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=fused or None)


def refuse_to_overwrite(run_dir: Path, resume: str | None = None) -> None:
    """A new run never silently replaces an earlier run's checkpoints, final model and metrics (a run stopped
    before its first checkpoint has only its logged steps). `resume`: --resume of a checkpoint of run_dir's own run
    goes on (the resume's own checks follow); --resume PATH of another folder's checkpoint starts a new run here,
    which would have taken over the earlier run's metrics, manifest and checkpoints."""
    if resume and (resume == "latest" or Path(resume).resolve().parent in (run_dir.resolve(),
                                                                           (run_dir / "checkpoints").resolve())):
        return
    earlier = ["final"] if (run_dir / "final").is_dir() and any((run_dir / "final").iterdir()) else []
    if ckpt.list_checkpoints(run_dir):  # not a killed save's staging folder alone: --resume finds nothing there
        earlier.append("checkpoints")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        earlier.append(metrics.name)
    if earlier:
        resume = "continue it with --resume, " if "checkpoints" in earlier else ""  # nothing to resume from else
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(earlier)})", field="output_dir",
                          fix=f"{resume}train into a new --output-dir, or replace it with --set overwrite_output_dir=true")


def train(cfg, *, dry_run: bool = False, resume: str | None = None, skip_bad_batches: bool = False,
          data: data_mod.RunData | None = None, show_bar: bool = True, stop_after: int | None = None) -> dict:
    """Run (or with dry_run, check and estimate) one training run described by `cfg`. `data` injects
    packed rows (tests, other tools); `stop_after` ends early after that many steps, as a Ctrl-C would."""
    rank, world = dist_mod.init_from_env()
    torch.manual_seed(cfg.seed + rank)  # ranks draw different dropout masks
    random.seed(cfg.seed + rank)
    run_dir = Path(cfg.output_dir)
    if not (dry_run or cfg.overwrite_output_dir):
        refuse_to_overwrite(run_dir, resume)
    # A one-process dry run builds (the extended tokenizer) in scratch space: it writes nothing into the output
    # folder, where it would replace an earlier run's tokenizer/. Ranks of a torchrun share run_dir to build.
    # The dry-run report needs nothing from that folder once the model is built.
    build_place = (tempfile.TemporaryDirectory(prefix="fastchat-ft-dry-run-") if dry_run and world == 1
                   else contextlib.nullcontext(str(run_dir)))
    with build_place as build_name, removed_if_setup_fails(Path(build_name), rank) as undo_setup:
        # up to a loaded resume checkpoint: nothing trained yet
        # rank 0 extends the tokenizer, fills the data cache and converts the model; the others then reuse them
        prep = dist_mod.rank_zero_first(lambda: prepare(cfg, Path(build_name), data))
        per_step, steps_epoch, total_steps = run_length(cfg, len(prep.data.train), world)
        if resume and not dry_run:  # a finished run has nothing to train: said before any model is loaded
            done = ckpt.finished_at(run_dir, resume, total_steps)
            if done is not None:
                return finished_already(run_dir, done, undo_setup)
        s = dist_mod.rank_zero_first(lambda: build(cfg, prep))
        dist_mod.broadcast_parameters(s.model)  # ranks seeded differently: start from rank 0's weights
        model, mode, rows = s.model, cfg.loss_normalization, s.data.train
        replicated = sharded = None
        if world > 1 and use_fsdp(cfg):
            if dry_run:  # the timed steps run unsharded: their memory is an upper bound for the sharded run
                print("dry run under FSDP: timing an unsharded replica per rank (memory below is an upper bound)")
            else:
                sharded = fsdp.shard(model)  # FSDP2: full fine-tuning, parameters and optimizer state sharded
        else:
            replicated = dist_mod.replicate(model)  # DDP over the decoder when world > 1
        optimizer = build_optimizer(cfg, model)  # after sharding: it steps on the shards
        scheduler = build_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.lr_scheduler)
        fingerprint = ckpt.data_fingerprint(len(rows), [s.data.digest(f) for f in s.data.train_files])
        state = ckpt.TrainState(config_hash=cfg.config_hash(), data_fingerprint=fingerprint)
        if resume:
            state = ckpt.resume_checked(
                run_dir, resume, lambda path: ckpt.load_checkpoint(path, model, s.model_info, optimizer, scheduler,
                                                                   cfg.config_hash(), sharded),
                steps_epoch=steps_epoch, fingerprint=fingerprint, overwrite=cfg.overwrite_output_dir)
    if dry_run:
        from fastchat_ft.engine.dryrun import report
        return report(cfg, s, optimizer, total_steps, steps_epoch)

    amp = torch.autocast(s.device.type, dtype=s.amp_dtype) if s.amp_dtype else contextlib.nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    clip = cfg.max_grad_norm or float("inf")
    report = Reporter(cfg, s, run_dir, state, optimizer, scheduler, total_steps, steps_epoch, show_bar, bool(resume),
                      active=rank == 0, sharded=sharded)

    merge_tokens = data_mod.merge_budget(cfg, s.device, world)  # fewer, larger forwards on one CPU process
    # stopping: the stop request as read once after each step, which every rank agrees on and after_step saves
    # for. A signal that lands later (in after_step's logging, evaluation or save) is seen after the next step:
    # ending the loop on it directly skipped the checkpoint, and on one rank alone left the others waiting
    stopping = None
    with ckpt.StopFlag() as stop, _oom_advice(cfg):
        while state.step < total_steps and not stopping:
            t0 = time.perf_counter()
            idx, mine = data_mod.rank_step(rows, cfg, per_step, state.epoch, state.batch_in_epoch, rank, merge_tokens)
            if not any(idx):  # an optimizer step on no data would still move the weights (AdamW momentum, decay)
                raise ConfigError(f"no training batch at step {state.step + 1} (epoch {state.epoch}, batch "
                                  f"{state.batch_in_epoch} of {steps_epoch})", field="datasets",
                                  fix="restore the data the run started with, or start a new run")
            batches = [to_device(b, s.device) for b in mine]
            t_data = time.perf_counter() - t0
            if sharded:
                n_forwards = fsdp.micro_batches_per_rank(len(idx), cfg.gradient_accumulation_steps)
                step_loss, _ = fsdp.backward_step(sharded, batches, mode, amp, n_forwards)
            elif replicated:
                step_loss, _ = dist_mod.ddp_backward_step(replicated, batches, mode, amp)
            else:
                step_loss, _ = backward_step(model, batches, mode, amp)
            grad_norm, lr = float("nan"), optimizer.param_groups[0]["lr"]  # the lr this step used
            if math.isfinite(step_loss):
                grad_norm = fsdp.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, clip))
                optimizer.step()
            else:  # raises unless --skip-bad-batches; a skipped batch still counts as a step of the schedule
                report.message(diag.bad_loss(state.step + 1, step_loss, batches, skip_bad_batches))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _advance(state, steps_epoch, sum(data_mod.row_tokens(rows[i]) for m in idx for i in m))
            stopping = agreed_stop(stop.requested or ("stop_after" if stop_after and state.step >= stop_after else None))
            report.after_step(step_loss, grad_norm, lr, t_data, time.perf_counter() - t0, stopping)
    # a stop seen after the last step stops nothing: the run finished (final/ saved, exit 0), else a resume
    # would find it finished with no final/ ever written
    return report.finish(stopping if state.step < total_steps else None)


@contextlib.contextmanager
def _oom_advice(cfg):
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise ModelError(diag.oom_advice(cfg, None)) from None
    except RuntimeError as e:  # CPU allocations fail with a plain RuntimeError from DefaultCPUAllocator
        if "can't allocate memory" not in str(e):
            raise
        raise ModelError(diag.oom_advice(cfg, None)) from None


class Reporter:
    """Everything the loop does between steps besides training: log, evaluate + sample, checkpoint, finish."""

    SPLITS_EVAL = True  # a subclass whose evaluate() runs on rank 0 alone sets False

    def __init__(self, cfg, s: Setup, run_dir: Path, state, optimizer, scheduler, total_steps, steps_epoch,
                 show_bar: bool, resumed: bool, active: bool = True, sharded: fsdp.Sharded | None = None):
        self.cfg, self.s, self.run_dir, self.state, self.active = cfg, s, run_dir, state, active
        self.losses = []
        self.optimizer, self.scheduler, self.steps_epoch, self.total_steps = optimizer, scheduler, steps_epoch, total_steps
        self.eval_every = cfg.eval_steps or max(1, steps_epoch // cfg.evals_per_epoch)
        self.save_every = cfg.save_steps or self.eval_every
        # under FSDP every forward and every checkpoint is collective: all ranks evaluate, generate and save
        self.sharded = sharded
        # evaluation is a collective when world > 1 (FSDP: every forward; DDP: the batches are split over ranks)
        self.collective_eval = self.SPLITS_EVAL and dist_mod.world()[1] > 1
        self.eval_model = sharded.view if sharded else s.model
        self.prompts = data_mod.sample_prompts(s.data.val_files or s.data.train_files, cfg.sample_prompts,
                                               s.data.held_out)
        if not active:  # ranks other than 0 train silently and write nothing (they hand rank 0 their RNG state)
            if self.collective_eval and state.step == 0:
                self.evaluate()
            return
        if not resumed:  # a new run: anything of an earlier one here goes (overwrite_output_dir said replace it)
            clear_earlier_run(run_dir)
        write_run_files(run_dir, cfg, s, resumed=resumed)
        self.log = MetricsLogger(run_dir, total_steps, state.step, show_bar)
        self.val_history = [r["val_loss"] for r in self.log.records if "val_loss" in r]
        self.waits, self.busy, self.tokens = 0.0, 0.0, 0
        self._tokens_at_start = state.tokens_seen
        if state.step == 0:
            self.evaluate()

    def message(self, text: str) -> None:
        self.log.message(text) if self.active else None

    def after_step(self, loss: float, grad_norm: float, lr: float, t_data: float, t_step: float, stopping) -> None:
        st, cfg = self.state, self.cfg
        self.losses.append(loss)
        if not self.active:
            if self.collective_eval and (st.step % self.eval_every == 0 or st.step == self.total_steps):
                self.evaluate()
            if st.step % self.save_every == 0 or stopping:
                self.save()  # rank 0 saves this rank's RNG state beside its own (and under FSDP its shards)
            return
        self.waits, self.busy = self.waits + t_data, self.busy + t_step
        self.tokens = st.tokens_seen - self._tokens_at_start
        last = st.step == self.total_steps
        if st.step % cfg.logging_steps == 0 or last:
            self.log.log({"step": st.step, "epoch": round(st.epoch + st.batch_in_epoch / self.steps_epoch, 4),
                          "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": self.tokens / self.busy, **({} if math.isfinite(loss) else {"skipped": True})},
                         advance=cfg.logging_steps)
        if st.step % self.eval_every == 0 or last:
            self.evaluate()
            warning = diag.overfitting([v for v in self.val_history if v is not None])
            if warning:
                self.message("warning: " + warning)
        if st.step % self.save_every == 0 or stopping:
            self.save()

    def save(self, name: str | None = None, rng_states=None) -> None:
        """A checkpoint (or `name`, e.g. final/). A collective: every rank calls it; rank 0 writes the files."""
        rng_states = rng_states or ckpt.gather_rng_states()
        if self.active or self.sharded:
            ckpt.save_checkpoint(self.run_dir, self.state, self.s.model, self.s.model_info, self.s.tokenizer_dir,
                                 self.optimizer, self.scheduler, self.cfg.save_total_limit, name=name,
                                 rng_states=rng_states, sharded=self.sharded)

    def evaluate(self) -> None:
        """Validation metrics (and sample generations) at this step, into metrics.jsonl / samples.jsonl. With
        world > 1 every rank takes part (see val_metrics); rank 0 alone records the results and, under DDP,
        generates the samples. Under FSDP every rank generates too (collective forwards): greedy decoding from
        identical weights, so every rank stops after the same number of tokens."""
        s, st = self.s, self.state
        if not len(s.data.val):
            return
        with fsdp.gathered(self.sharded):
            result = self.val_metrics()
            make_samples = self.prompts and (self.active or self.sharded)  # FSDP: generation forwards are collective
            samples = generate_samples(s, self.prompts, self.cfg.sample_max_new_tokens) if make_samples else None
        if not self.active:
            return
        if st.best_val_loss is None or result.loss < st.best_val_loss:
            st.best_val_loss = result.loss
        self.val_history.append(result.loss)
        self.log.log({"step": st.step, **result.as_metrics()})
        self.message(f"step {st.step}: val_loss {result.loss:.4f}  val_ppl {result.ppl:.2f}  "
                     f"val_token_acc {result.token_acc:.3f}")
        if samples is not None:
            append_samples(self.run_dir, st.step, samples)

    def val_metrics(self) -> EvalResult:
        """Validation over every batch. Under DDP each rank evaluates every world-th batch with the plain model
        and the sums meet on all ranks: world-times faster, and no rank idles in a collective (whose timeout a
        long evaluation on rank 0 alone could hit). Under FSDP every rank runs every batch (each forward
        all-gathers, and ranks must agree on which batches they skip)."""
        s = self.s
        batches = data_mod.eval_batches(s.data.val, self.cfg.micro_batch_size)
        rank, size = dist_mod.world()
        if size == 1 or self.sharded:
            return evaluate(self.eval_model, batches, s.device, s.amp_dtype)
        part = evaluate(s.model, itertools.islice(batches, rank, None, size), s.device, s.amp_dtype)
        n = part.n_tokens
        mine = [part.loss * n, part.token_acc * n, n, part.n_sequences] if n else [0.0, 0.0, 0, part.n_sequences]
        loss_sum, correct, n_tok, n_seq = dist_mod.sum_tensor_over_ranks(torch.tensor(mine, dtype=torch.float64)).tolist()
        loss = loss_sum / n_tok if n_tok else float("nan")
        return EvalResult(loss=loss, ppl=math.exp(min(loss, 80.0)) if n_tok else float("nan"),
                          token_acc=round(correct) / n_tok if n_tok else float("nan"), n_tokens=int(n_tok),
                          n_sequences=int(n_seq))

    def finish(self, stopped) -> dict:
        from fastchat_ft.engine.rundir import finish_report

        s = self.s
        if not stopped:
            self.save(name="final")
        # steps: the run's optimizer steps (after a resume, the earlier sessions' too); train_losses: this session's
        if not self.active:
            return {"steps": self.state.step, "stopped": stopped, "train_losses": self.losses}
        self.log.close()
        n_params = sum(p.numel() for p in s.model.parameters())
        n_train = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
        device_name = torch.cuda.get_device_name() if s.device.type == "cuda" else "CPU"
        summary = {
            "run_dir": str(self.run_dir), "steps": self.state.step, "session_steps": len(self.losses),
            "total_steps": self.total_steps, "stopped": stopped,
            "tokens_per_s": self.tokens / self.busy if self.busy else 0.0, "train_losses": self.losses,
            "throughput": diag.throughput_report(self.busy, self.waits, self.tokens, n_params, n_train, device_name),
            "underfitting": diag.underfitting(self.losses),
            "val": [r for r in self.log.records if "val_loss" in r],
        }
        finish_report(self.run_dir, summary)
        return summary


def _advance(state: ckpt.TrainState, steps_epoch: int, tokens: int) -> None:
    state.step += 1
    state.tokens_seen += tokens
    state.batch_in_epoch += 1
    if state.batch_in_epoch >= steps_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
