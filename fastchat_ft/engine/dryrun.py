"""`fastchat-ft train --dry-run`: config, model and data already checked by setup; print what the run
would do (packed rows, steps, trainable parameters) with peak-memory and time estimates from a few
timed optimizer steps, then exit. Writes nothing to the run directory except the extended tokenizer.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time

import numpy as np
import torch

from fastchat_ft.engine import data as data_mod
from fastchat_ft.engine import distributed as dist_mod
from fastchat_ft.engine.loss import backward_step, to_device
from fastchat_ft.model.load import trainable_parameters


def _peak_memory_gb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9, "peak GPU memory allocated"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, "peak process RSS"


def _show_row(tokenizer, row: dict, width: int = 300) -> str:
    ids = np.asarray(row["input_ids"])
    labels = np.asarray(row["labels"])
    text = tokenizer.decode(ids.tolist())
    text = text if len(text) <= width else text[:width] + f" ... [{len(text) - width} more chars]"
    return (f"  {len(ids)} tokens, {len(row.get('seq_lens', [1]))} conversation(s), "
            f"{int((labels != -100).sum())} label tokens:\n    {text!r}")


def report(cfg, s, optimizer, total_steps: int, steps_epoch: int) -> dict:
    rows = s.data.train
    n_tok = sum(data_mod.row_tokens(r) for r in rows)
    n_lab = sum(data_mod.row_label_tokens(r) for r in rows)
    fill = n_tok / (len(rows) * cfg.sequence_len) if rows and cfg.sample_packing else float("nan")
    trainable, total = trainable_parameters(s.model)
    print(f"model: {s.model_info['base_dir']} ({total / 1e6:.1f}M parameters, adapter: {cfg.adapter or 'full'})")
    print(f"trainable parameters: {trainable:,} ({100 * trainable / total:.2f}%)")
    print(f"train: {len(rows)} packed rows, {n_tok:,} tokens, {n_lab:,} label tokens"
          + (f", packing fill {100 * fill:.1f}% of sequence_len {cfg.sequence_len}" if cfg.sample_packing else ""))
    print(f"validation: {len(s.data.val)} packed rows")
    print(f"steps: {steps_epoch} per epoch x {cfg.num_epochs} epochs = {total_steps} optimizer steps "
          f"(micro_batch_size {cfg.micro_batch_size} x gradient_accumulation_steps {cfg.gradient_accumulation_steps})")
    print("first packed rows:")
    for row in (rows[i] for i in range(min(2, len(rows)))):
        print(_show_row(s.tokenizer, row))

    amp = torch.autocast(s.device.type, dtype=s.amp_dtype) if s.amp_dtype else contextlib.nullcontext()
    times = []
    n = min(cfg.dry_run_steps, total_steps)
    merge = data_mod.merge_budget(cfg, s.device, dist_mod.world()[1])  # the forwards training will run
    for step in range(n):
        t0 = time.perf_counter()
        _, mine = data_mod.rank_step(rows, cfg, cfg.gradient_accumulation_steps, 0, step % steps_epoch, 0, merge)
        batches = [to_device(b, s.device) for b in mine]
        backward_step(s.model, batches, cfg.loss_normalization, amp)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # the first step pays one-off costs (allocations, kernel compiles): estimate from the others
    per_step = float(np.mean(times[1:] if len(times) > 1 else times)) if times else float("nan")
    peak, what = _peak_memory_gb(s.device)
    est = per_step * total_steps
    print(f"timed {n} steps: {per_step:.2f} s/step -> about {est / 60:.1f} min for {total_steps} steps "
          f"(+ evaluation and checkpoints)")
    print(f"memory: {peak:.2f} GB {what} during the timed steps")
    print("dry run: nothing trained or saved")
    return {"dry_run": True, "steps": total_steps, "sec_per_step": per_step, "est_seconds": est,
            "peak_memory_gb": peak, "trainable_params": trainable, "train_rows": len(rows)}
