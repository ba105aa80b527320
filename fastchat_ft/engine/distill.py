"""`fastchat-ft distill`: train a student on a teacher's token distributions. Reuses the train engine's setup
(student, LoRA, data, optimizer, schedule, checkpoints, metrics, run directory) and swaps in the chunked
distillation loss (engine/distill_loss.py). The teacher (a model folder, run directory or LoRA checkpoint)
runs frozen in eval mode under no_grad; it must share the student's tokenizer. Under torchrun each rank
holds the teacher, takes its share of every step's micro-batches and trains the student through DDP (as
`train` does for LoRA); rank 0 logs, evaluates and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastchat_ft.atomic import write_json_atomic
from fastchat_ft import config as config_mod
from fastchat_ft import flags
from fastchat_ft.engine import checkpoint as ckpt
from fastchat_ft.engine import data as data_mod
from fastchat_ft.engine import diagnostics as diag
from fastchat_ft.engine import distributed as dist_mod
from fastchat_ft.engine import train as train_mod
from fastchat_ft.engine.distill_loss import KINDS, Head, distill_loss
from fastchat_ft.engine.loss import hidden_states, lm_head_of, to_device
from fastchat_ft.engine.metrics import append_samples
from fastchat_ft.engine.rundir import generate_samples, last_measured
from fastchat_ft.engine.schedule import build_scheduler
from fastchat_ft.errors import ConfigError, ModelError
from fastchat_ft.kernels import fused_linear_cross_entropy
from fastchat_ft.model import load as load_mod

# Distillation usually trains a small student whole; a validation share is held out so val KL exists.
DEFAULTS = {"adapter": None, "val_set_size": 0.05}


@dataclass
class DistillOptions:
    teacher: str
    loss: str = "forward_kl"      # forward_kl | reverse_kl | jsd
    alpha: float = 0.5            # weight of the divergence; 1 - alpha weighs the label cross-entropy
    temperature: float = 1.0
    jsd_beta: float = 0.5
    chunk_size: int | None = None  # label tokens per loss chunk (default: a memory budget)

    def check(self) -> None:
        if self.loss not in KINDS:
            raise ConfigError(f"unknown loss {self.loss!r}", field="--loss", fix=f"one of {', '.join(KINDS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.alpha}", field="--alpha",
                              fix="1 = divergence only, 0 = label loss only (plain fine-tuning)")
        if not self.temperature > 0:
            raise ConfigError(f"must be > 0, got {self.temperature}", field="--temperature", fix="e.g. 1 or 2")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError(f"must be in (0, 1), got {self.jsd_beta}", field="--jsd-beta", fix="0.5 is the symmetric JSD")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ConfigError(f"must be > 0, got {self.chunk_size}", field="--chunk-size", fix="omit it for the default")


def run_distill(args) -> int:
    flags.at_least(args, {"nproc": 1})
    cfg, opts = config_from_args(args)
    # as train: --resume PATH of another folder's checkpoint starts a new run here, so it gets the same check
    if not cfg.overwrite_output_dir:  # before torchrun starts N processes
        train_mod.refuse_to_overwrite(Path(cfg.output_dir), getattr(args, "resume", None))
    nproc = getattr(args, "nproc", None)
    if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
        return dist_mod.relaunch_with_torchrun(nproc, sys.argv[1:])
    try:
        summary = distill(cfg, opts, resume=getattr(args, "resume", None))
    except BaseException:
        dist_mod.shutdown(failed=True)
        raise
    dist_mod.shutdown()
    return train_mod.stopped_status(summary)


def config_from_args(args) -> tuple[config_mod.TrainConfig, DistillOptions]:
    """The student's training config (YAML or the distill defaults, --set, then the flags) and the options."""
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "config", None):
        cfg = config_mod.load(args.config, overrides)
    else:
        cfg = config_mod.from_dict_with_overrides(dict(DEFAULTS), overrides)
    cfg.base_model = args.student
    flags.input_file(args.data, "--data")
    cfg.datasets = [{"path": str(Path(args.data).resolve()), "type": "chat_template"}]
    if getattr(args, "val_data", None):
        flags.input_file(args.val_data, "--val-data")
        cfg.test_datasets = [{"path": str(Path(args.val_data).resolve()), "type": "chat_template"}]
    if getattr(args, "adapter", None):
        cfg.adapter = None if args.adapter == "full" else args.adapter
    for flag, key in (("learning_rate", "learning_rate"), ("max_steps", "max_steps"), ("output_dir", "output_dir")):
        if getattr(args, flag, None) is not None:
            setattr(cfg, key, getattr(args, flag))
    config_mod.validate(cfg)
    flags.output_folder(cfg.output_dir, "--output-dir")
    if cfg.loss_normalization != "token":
        raise ConfigError("distillation normalises per label token", field="loss_normalization",
                          fix="remove loss_normalization (or set it to token)")
    opts = DistillOptions(teacher=args.teacher, loss=args.loss, alpha=args.alpha,
                          temperature=getattr(args, "temperature", 1.0), jsd_beta=getattr(args, "jsd_beta", 0.5),
                          chunk_size=getattr(args, "chunk_size", None))
    opts.check()
    return cfg, opts


# ----------------------------------------------------------------------------------------------- teacher

def check_same_tokenizer(student_tok, student_dir: Path, teacher_tok, teacher_dir: Path) -> None:
    """Same token -> id map and same special tokens, else a ModelError naming both folders (bos/eos roles
    that differ only warn: the token ids, and so the distributions, are the same)."""
    problems = []
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:3]
        only_t = sorted(set(tv) - set(sv))[:3]
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])[:3]
        detail = f"{len(sv)} vs {len(tv)} tokens"
        if only_s:
            detail += f"; only the student has {only_s}"
        if only_t:
            detail += f"; only the teacher has {only_t}"
        if moved:
            detail += f"; different ids for {moved}"
        problems.append(f"vocabularies differ ({detail})")

    def specials(tok):
        return {i: (t.content, bool(t.special)) for i, t in tok.added_tokens_decoder.items() if t.special}

    if specials(student_tok) != specials(teacher_tok):
        diff = sorted(set(specials(student_tok).items()) ^ set(specials(teacher_tok).items()))[:4]
        problems.append(f"special tokens differ ({diff})")
    for name in ("bos_token", "eos_token"):  # a different role for the same token leaves distributions alike
        a, b = getattr(student_tok, name), getattr(teacher_tok, name)
        if a != b:
            print(f"warning: {name} differs (student {a!r}, teacher {b!r}); the student keeps its own")
    if problems:
        raise ModelError(f"teacher and student tokenizers differ: {'; '.join(problems)}. "
                         f"Student: {student_dir}. Teacher: {teacher_dir}.",
                         fix="distil between models that share one tokenizer (same family), or use a teacher "
                             "trained on the student's tokenizer")


def load_teacher(path: str, device: torch.device, dtype: torch.dtype):
    """The teacher (LoRA merged in float32 first), frozen, in eval mode, plus where its tokenizer is."""
    from fastchat_ft import inference

    source = inference.resolve_model(path)
    if source.kind == "lora":
        model = load_mod.load_model(source.base, dtype=torch.float32)
        inference.merge_lora(model, inference.read_adapter_config(source.path),
                             inference.load_adapter_tensors(source.path))
        model.to(dtype)
    else:
        model = load_mod.load_model(source.path, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model, source


# ----------------------------------------------------------------------------------------------- loss

def heads(student, teacher) -> tuple[Head, Head]:
    return Head(*lm_head_of(student)), Head(*lm_head_of(teacher))


def batch_loss(student, teacher, batch: dict, opts: DistillOptions, vocab: int, num_items):
    """Divergence + CE of one micro-batch at its label positions; the teacher runs under no_grad."""
    t = batch["targets"]
    with torch.no_grad():
        h_t = hidden_states(teacher, batch)[t.rows, t.cols]
    h_s = hidden_states(student, batch)[t.rows, t.cols]
    s_head, t_head = heads(student, teacher)
    return distill_loss(h_s, s_head, h_t, t_head, t.labels, kind=opts.loss, temperature=opts.temperature,
                        alpha=opts.alpha, beta=opts.jsd_beta, vocab=vocab, num_items=num_items,
                        chunk_size=opts.chunk_size)


def distill_step(student, teacher, batches: list[dict], opts: DistillOptions, vocab: int, amp,
                 replicated: dist_mod.Replicated | None = None) -> dict:
    """Forward + backward over this rank's micro-batches of one optimizer step; the loss is normalised by the
    label tokens of the whole step on all ranks. With `replicated` (DDP) the student runs through the wrapper:
    gradients sync on the last micro-batch only, each loss is scaled by the world size (DDP averages), and a
    rank whose last micro-batch has no labels (or that has none) still runs a zero-loss backward so it joins
    the all-reduce."""
    size = dist_mod.world()[1]
    n_label = int(dist_mod.sum_over_ranks(sum(int(b["targets"].labels.numel()) for b in batches)))
    denominator = max(1, n_label)
    model = replicated.view if replicated else student
    work = list(batches)
    if replicated and not work:
        blank = {"input_ids": [[0]], "labels": [[-100]], "position_ids": [[0]]}
        work = [to_device(blank, next(student.parameters()).device)]
    sums = torch.zeros(3, dtype=torch.float64)  # loss, divergence, ce
    for i, b in enumerate(work):
        last = i == len(work) - 1
        with contextlib.nullcontext() if (replicated is None or last) else replicated.ddp.no_sync():
            if not b["targets"].labels.numel():
                if replicated and last:
                    with amp:
                        (hidden_states(model, b).sum() * 0.0).backward()
                continue
            with amp:
                out = batch_loss(model, teacher, b, opts, vocab, denominator)
            (out.loss * size if replicated else out.loss).backward()
        sums += torch.tensor([float(out.loss.detach()), float(out.divergence), float(out.ce)], dtype=torch.float64)
    if replicated:
        dist_mod.sum_gradients(replicated.outside)
        if size > 1:
            sums = dist_mod.sum_tensor_over_ranks(sums)
    loss, div, ce = sums.tolist()
    return {"loss": loss, "kl": div / denominator, "ce": ce / denominator, "n_label": n_label}


@torch.no_grad()
def evaluate(student, teacher, rows, micro_batch_size: int, opts: DistillOptions, vocab: int, device, amp,
             teacher_ce: bool = False) -> dict:
    """Validation: the divergence to the teacher (val_kl), the student's CE / ppl / token accuracy, and
    optionally the teacher's own CE on the same tokens (a floor to read the student's against)."""
    was = student.training
    student.eval()
    div = ce = t_ce = 0.0
    n = correct = 0
    try:
        for raw in data_mod.eval_batches(rows, micro_batch_size):
            b = to_device(raw, device)
            if not b["targets"].labels.numel():
                continue
            with amp:
                out = batch_loss(student, teacher, b, opts, vocab, None)
                if teacher_ce:
                    t = b["targets"]
                    h_t = hidden_states(teacher, b)[t.rows, t.cols]
                    w, bias, cap = lm_head_of(teacher)
                    t_ce += float(fused_linear_cross_entropy(h_t, w[:vocab], t.labels, reduction="sum",
                                                             bias=None if bias is None else bias[:vocab], softcap=cap))
            div, ce, n, correct = div + float(out.divergence), ce + float(out.ce), n + out.n_tokens, correct + int(out.n_correct)
    finally:
        student.train(was)
    if not n:
        return {}
    loss = ce / n
    result = {"val_kl": div / n, "val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)), "val_token_acc": correct / n}
    if teacher_ce:
        result["teacher_val_loss"] = t_ce / n
    return result


# ----------------------------------------------------------------------------------------------- run

def _setup(cfg, opts: DistillOptions, run_dir: Path):
    """Tokenizers first (a mismatch must fail before any data is packed or weights are loaded), then the
    student's tokenizer and data as `train` prepares them (its model comes after the finished check). Returns
    them and the compared vocabulary size."""
    from fastchat_ft import inference

    student_dir = load_mod.resolve_base_model(cfg.base_model)
    student_tok = load_mod.load_hf_tokenizer(student_dir, cfg.trust_remote_code)
    tok_dir, _ = train_mod.settle_tokenizer(student_tok, cfg.chat_template, student_dir, run_dir)
    source = inference.resolve_model(opts.teacher)
    teacher_tok = load_mod.load_hf_tokenizer(source.tokenizer_dir)
    check_same_tokenizer(student_tok, tok_dir, teacher_tok, source.tokenizer_dir)
    return train_mod.prepare(cfg, run_dir), len(student_tok)


def distill(cfg, opts: DistillOptions, *, resume: str | None = None, show_bar: bool = True) -> dict:
    """Distil opts.teacher into cfg.base_model on cfg.datasets; returns train's summary plus val_kl."""
    rank, world = dist_mod.init_from_env()
    torch.manual_seed(cfg.seed + rank)  # ranks draw different dropout masks
    random.seed(cfg.seed + rank)
    run_dir = Path(cfg.output_dir)
    if not cfg.overwrite_output_dir:  # as train: an earlier run's final/ and metrics stay
        train_mod.refuse_to_overwrite(run_dir, resume)
    with train_mod.removed_if_setup_fails(run_dir, rank) as undo_setup:  # up to a loaded resume checkpoint
        # rank 0 first (tokenizer, data cache), the others then reuse its files; see dist_mod.rank_zero_first
        prep, vocab = dist_mod.rank_zero_first(lambda: _setup(cfg, opts, run_dir))
        per_step, steps_epoch, total_steps = train_mod.run_length(cfg, len(prep.data.train), world)
        if resume:  # as in train: a finished run has nothing to train, said before any model is loaded
            done = ckpt.finished_at(run_dir, resume, total_steps)
            if done is not None:
                return train_mod.finished_already(run_dir, done, undo_setup)
        s = dist_mod.rank_zero_first(lambda: train_mod.build(cfg, prep))
        student = s.model
        teacher, _ = load_teacher(opts.teacher, s.device, s.amp_dtype or torch.float32)
        for name, m in (("student", student), ("teacher", teacher)):
            rows = m.get_output_embeddings().weight.shape[0]
            if rows < vocab:
                raise ModelError(f"the {name}'s lm_head has {rows} rows, the tokenizer {vocab} tokens",
                                 fix="use the model saved with this tokenizer")

        dist_mod.broadcast_parameters(student)  # ranks seeded differently: start from rank 0's trained weights
        replicated = dist_mod.replicate(student)  # DDP when world > 1 (the teacher is frozen: each rank keeps one)
        optimizer = train_mod.build_optimizer(cfg, student)
        scheduler = build_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.lr_scheduler)
        fingerprint = ckpt.data_fingerprint(len(s.data.train), [s.data.digest(f) for f in s.data.train_files])
        state = ckpt.TrainState(config_hash=cfg.config_hash(), data_fingerprint=fingerprint)
        if resume:
            state = ckpt.resume_checked(
                run_dir, resume, lambda path: ckpt.load_checkpoint(path, student, s.model_info, optimizer, scheduler,
                                                                   cfg.config_hash()),
                steps_epoch=steps_epoch, fingerprint=fingerprint, overwrite=cfg.overwrite_output_dir)
    amp = torch.autocast(s.device.type, dtype=s.amp_dtype) if s.amp_dtype else contextlib.nullcontext()
    params = [p for p in student.parameters() if p.requires_grad]
    clip = cfg.max_grad_norm or float("inf")
    report = DistillReporter(cfg, s, run_dir, state, optimizer, scheduler, total_steps, steps_epoch, show_bar,
                             bool(resume), active=rank == 0, teacher=teacher, opts=opts, vocab=vocab, amp=amp)
    rows = s.data.train
    # as train: act on the stop request as read once after each step (agreed over ranks, and saved for by after_step);
    # one landing in after_step's logging, evaluation or save is seen after the next step, which is saved
    stopping = None
    with ckpt.StopFlag() as stop:
        while state.step < total_steps and not stopping:
            t0 = time.perf_counter()
            idx, mine = data_mod.rank_step(rows, cfg, per_step, state.epoch, state.batch_in_epoch, rank)
            if not any(idx):  # as in train: an optimizer step on no data would still move the weights
                raise ConfigError(f"no training batch at step {state.step + 1} (epoch {state.epoch}, batch "
                                  f"{state.batch_in_epoch} of {steps_epoch})", field="datasets",
                                  fix="restore the data the run started with, or start a new run")
            batches = [to_device(b, s.device) for b in mine]
            t_data = time.perf_counter() - t0
            parts = distill_step(student, teacher, batches, opts, vocab, amp, replicated)
            grad_norm, lr = float("nan"), optimizer.param_groups[0]["lr"]  # the lr this step used (as train logs)
            if math.isfinite(parts["loss"]):
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                optimizer.step()
            else:
                report.message(diag.bad_loss(state.step + 1, parts["loss"], batches, False))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            train_mod._advance(state, steps_epoch, sum(data_mod.row_tokens(rows[i]) for m in idx for i in m))
            stopping = train_mod.agreed_stop(stop.requested)
            report.parts = parts
            report.after_step(parts["loss"], grad_norm, lr, t_data, time.perf_counter() - t0, stopping)
    # as train: a stop seen after the last step stops nothing: the run finished (final/ saved, exit 0), else a
    # resume would find it finished with no final/ ever written
    return report.finish(stopping if state.step < total_steps else None)


class DistillReporter(train_mod.Reporter):
    """The train loop's reporter with kl/ce in each logged step, val KL at each evaluation, and the manifest
    naming the teacher and the distillation settings. Rank 0 alone evaluates (the student's plain forward)."""

    SPLITS_EVAL = False

    def __init__(self, *args, teacher, opts: DistillOptions, vocab: int, amp, **kw):
        self.teacher, self.opts, self.vocab, self.amp, self.parts = teacher, opts, vocab, amp, {}
        super().__init__(*args, **kw)
        if not self.active:
            return
        manifest_path = self.run_dir / "run_manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest.update(command="fastchat-ft distill", student=manifest.get("base_model"),
                        teacher=str(Path(opts.teacher).resolve()), distillation=asdict(opts))
        write_json_atomic(manifest_path, manifest, indent=2, default=str)
        write_json_atomic(self.run_dir / "distill_config.json", asdict(opts), indent=2, default=str)

    def after_step(self, loss, grad_norm, lr, t_data, t_step, stopping) -> None:
        """As the train loop's, with the step's divergence (kl) and label CE (ce) in its metrics record."""
        st, cfg = self.state, self.cfg
        self.losses.append(loss)
        if self.active:  # rank 0 alone logs and evaluates (the student's plain forward: no collective)
            self.waits, self.busy = self.waits + t_data, self.busy + t_step
            self.tokens = st.tokens_seen - self._tokens_at_start
            last = st.step == self.total_steps
            if st.step % cfg.logging_steps == 0 or last:
                self.log.log({"step": st.step, "epoch": round(st.epoch + st.batch_in_epoch / self.steps_epoch, 4),
                              "loss": loss, "kl": self.parts.get("kl"), "ce": self.parts.get("ce"),
                              "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": self.tokens / self.busy}, advance=cfg.logging_steps)
            if st.step % self.eval_every == 0 or last:
                self.evaluate()
        if st.step % self.save_every == 0 or stopping:
            self.save()  # every rank: rank 0 writes its RNG state and the others' beside the weights

    def evaluate(self) -> None:
        s, st = self.s, self.state
        if not len(s.data.val):
            return
        result = evaluate(s.model, self.teacher, s.data.val, self.cfg.micro_batch_size, self.opts, self.vocab,
                          s.device, self.amp, teacher_ce=st.step == 0 and not self.val_history)
        if not result:
            return
        if st.best_val_loss is None or result["val_loss"] < st.best_val_loss:
            st.best_val_loss = result["val_loss"]
        self.val_history.append(result["val_loss"])
        self.log.log({"step": st.step, **result})
        teacher = f"  (teacher val_loss {result['teacher_val_loss']:.4f})" if "teacher_val_loss" in result else ""
        self.message(f"step {st.step}: val_kl {result['val_kl']:.4f}  val_loss {result['val_loss']:.4f}  "
                     f"val_token_acc {result['val_token_acc']:.3f}{teacher}")
        if self.prompts:
            append_samples(self.run_dir, st.step, generate_samples(s, self.prompts, self.cfg.sample_max_new_tokens))

    def finish(self, stopped) -> dict:
        summary = super().finish(stopped)
        if not self.active:
            return summary
        records = [r for r in self.log.records if "val_kl" in r]
        kls = [r["val_kl"] for r in records]
        if kls:
            path = self.run_dir / "run_manifest.json"
            manifest = json.loads(path.read_text())
            if stopped:  # no final evaluation: the last measured KL, not a before/after pair (see finish_report)
                print(last_measured(records, "val_kl", f"validation {self.opts.loss} to the teacher"))
                manifest.setdefault("result", {}).update(val_kl_last=kls[-1], val_kl_last_step=records[-1]["step"])
            else:
                print(f"validation {self.opts.loss} to the teacher: {kls[0]:.4f} -> {kls[-1]:.4f}")
                manifest.setdefault("result", {}).update(val_kl_before=kls[0], val_kl_after=kls[-1])
            write_json_atomic(path, manifest, indent=2, default=str)
        summary["val_kl"] = kls
        return summary


