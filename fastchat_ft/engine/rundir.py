"""The run directory's descriptive files (see the run directory contract): training_config.yaml,
run_manifest.json, data/, sample generations, and the end-of-run report printed to the user.
Checkpoints are in checkpoint.py, metrics in metrics.py.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from fastchat_ft.atomic import write_json_atomic
from fastchat_ft import config as config_mod
from fastchat_ft.engine.data import records_with_lines

COPY_LIMIT = 50 << 20  # data files up to this size are copied into data/; larger ones are named by hash


RUN_PACKAGES = ("fastchat-ft", "torch", "transformers", "tokenizers", "safetensors", "triton", "peft", "bitsandbytes")


def package_versions(names=RUN_PACKAGES) -> dict:
    """Installed versions of `names` (missing packages are left out), for manifests and bench results."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_files(run_dir: Path, cfg, s, resumed: bool) -> None:
    config_mod.save(cfg, run_dir / "training_config.yaml")
    data_dir = run_dir / "data"
    data_dir.mkdir(exist_ok=True)
    held_out = getattr(s.data, "held_out", None) or {}
    digest = s.data.digest  # the files' hashes, shared with the resume data fingerprint
    splits = (record_held_out_split(data_dir, s.data.train_files, held_out, cfg, digest) if held_out
              else record_file_splits(data_dir, {"train": s.data.train_files, "val": s.data.val_files}, digest))
    _copy_rejects(str((s.data.stats or {}).get("rejects_file") or ""), data_dir / "rejects.jsonl")
    device = torch.cuda.get_device_name() if s.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    manifest_path = run_dir / "run_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if resumed and manifest_path.is_file() else {}
    manifest.update({
        "command": "fastchat-ft train", "base_model": str(s.model_info["base_dir"]), "tokenizer": str(s.tokenizer_dir),
        "data": _without_lines(splits), "packed_rows": {"train": len(s.data.train), "val": len(s.data.val)},
        "loader_stats": {k: v for k, v in (s.data.stats or {}).items() if isinstance(v, (int, float, str))},
        "versions": package_versions(), "git_revision": _git_revision(), "device": device,
        "python": platform.python_version(), "config_hash": cfg.config_hash(),
        "start_time": manifest.get("start_time") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    if resumed:
        manifest.setdefault("resumed_at", []).append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_json(manifest_path, manifest)


# data/ itself stays (write_run_files rewrites its files): a new run's input may be an earlier run's data/train.jsonl
EARLIER_RUN = ("checkpoints", "final", "samples.jsonl", "loss_curve.png", "training_logs", "data/rejects.jsonl")


def clear_earlier_run(run_dir: Path) -> None:
    """What an earlier run left in run_dir, before a new run starts there (overwrite_output_dir; without it the
    start refuses a folder holding a run): its checkpoints outnumbered the new run's and were kept over them
    (save_total_limit prunes by step), its final/ made --resume report the new run finished, and its sample
    generations were read as the new run's "before"."""
    for name in EARLIER_RUN:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _copy_rejects(names: str, dest: Path) -> None:
    """on_error: skip: the records left out, with their reasons (one rejects file per loader option set,
    os.pathsep-separated), gathered into the run folder when small."""
    files = [Path(n) for n in names.split(os.pathsep) if n and Path(n).is_file()]
    if files and sum(f.stat().st_size for f in files) <= COPY_LIMIT:
        tmp = dest.with_name(dest.name + ".tmp")
        with open(tmp, "wb") as out:
            for f in files:
                out.write(f.read_bytes())
        os.replace(tmp, dest)


def _file_entry(path, digest) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": digest(path), "bytes": Path(path).stat().st_size}


def record_file_splits(data_dir: Path, files: dict, digest) -> dict:
    """Whole files per split (test_datasets, or no validation): splits.json names them; one small file per split
    is copied as data/<split>.jsonl. `digest(path)` gives a file's sha256 (RunData.digest: hashed once a run)."""
    splits = {k: [_file_entry(p, digest) for p in v] for k, v in files.items()}
    for kind, paths in files.items():
        if len(paths) == 1 and Path(paths[0]).stat().st_size <= COPY_LIMIT:
            shutil.copyfile(paths[0], data_dir / f"{kind}.jsonl")
    _write_json(data_dir / "splits.json", splits)
    return splits


def record_held_out_split(data_dir: Path, train_files: list, held_out: dict, cfg, digest) -> dict:
    """val_set_size held out some conversations of the training files: splits.json gives, per file, the lines
    of the held-out conversations (val: `lines`; train: the file less `held_out_lines`); data/val.jsonl holds the
    held-out records and data/train.jsonl the rest (when the files total at most COPY_LIMIT), so eval's
    memorisation check and the export, which read those first, never count a held-out answer as training data."""
    by = f"val_set_size {cfg.val_set_size:g}, seed {cfg.seed}"
    train, val = [], []
    for p in train_files:
        lines = held_out.get(str(p), [])
        entry = _file_entry(p, digest)
        train.append(dict(entry, held_out_lines=lines))
        if lines:
            val.append(dict(entry, lines=lines, held_out_by=by))
    for name in ("train.jsonl", "val.jsonl"):  # a resumed run rewrites them: never leave a stale copy behind
        (data_dir / name).unlink(missing_ok=True)
    # the held-out share is always written out (the files' own path would mean the whole training file);
    # the training side only within COPY_LIMIT, else splits.json's path + held_out_lines describe it
    _write_split_records(data_dir, train_files, held_out,
                         with_train=sum(Path(p).stat().st_size for p in train_files) <= COPY_LIMIT)
    splits = {"train": train, "val": val}
    _write_json(data_dir / "splits.json", splits)
    return splits


def _write_split_records(data_dir: Path, files: list, held_out: dict, with_train: bool) -> None:
    """data/val.jsonl (and data/train.jsonl when with_train): every record of `files`, one JSON object a line,
    on the side its (file, line) belongs to. Written to temporary names, then renamed."""
    kinds = ("train", "val") if with_train else ("val",)
    outs = {k: open(data_dir / f"{k}.jsonl.tmp", "wb") for k in kinds}
    try:
        for p in files:
            lines = set(held_out.get(str(p), []))
            for line, record in records_with_lines(Path(p)):
                side = "val" if line in lines else "train"
                if side in outs:
                    outs[side].write(record + b"\n")
    finally:
        for f in outs.values():
            f.close()
    for k in outs:
        os.replace(data_dir / f"{k}.jsonl.tmp", data_dir / f"{k}.jsonl")


def held_out_lines(run_dir: Path | None, path: Path) -> set[int]:
    """The lines of the run's training file `path` that val_set_size held out (splits.json); empty when none
    (no split, another file, or not a run folder)."""
    splits = run_dir / "data" / "splits.json" if run_dir else None
    if splits is None or not splits.is_file():
        return set()
    target = str(Path(path).resolve())
    entries = json.loads(splits.read_text()).get("train")
    return next((set(e.get("held_out_lines") or []) for e in (entries if isinstance(entries, list) else [])
                 if isinstance(e, dict) and e.get("path") == target), set())


def write_training_records(path: Path, held: set[int], dest: Path) -> Path:
    """`path`'s records less the held-out lines `held`, one JSON object a line, written atomically to `dest`
    (what data/train.jsonl holds for a file small enough to copy)."""
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        for line, record in records_with_lines(Path(path)):
            if line not in held:
                out.write(record + b"\n")
    os.replace(tmp, dest)
    return dest


def training_conversations(run_dir: Path | None, path: Path) -> list[list[dict]] | None:
    """The conversations of the run's training file `path` less those val_set_size held out (from splits.json),
    for readers of the whole file when it was too big to copy as data/train.jsonl; None when the run held
    nothing out of `path` (read it whole)."""
    held = held_out_lines(run_dir, path)
    if not held:
        return None
    from fastchat_ft.export_artifacts import _messages  # the lenient record -> messages reader export uses

    convs = []
    for line, record in records_with_lines(Path(path)):
        if line in held:
            continue
        try:
            messages = _messages(json.loads(record))
        except ValueError:
            continue
        if messages:
            convs.append(messages)
    return convs


def _without_lines(splits: dict) -> dict:
    """The manifest names the files and counts the held-out conversations; splits.json has the lines."""
    return {k: [{(f"{key}_count" if isinstance(v, list) else key): (len(v) if isinstance(v, list) else v)
                 for key, v in e.items()} for e in entries]
            for k, entries in splits.items()}


def generate_samples(s, prompts: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy replies to a few validation prompts with the model as it is now (LoRA applied unmerged)."""
    from fastchat_ft.inference import ChatStream

    model = s.model
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for p in prompts:
                stream = ChatStream(model, s.tokenizer, p["messages"], max_new_tokens=max_new_tokens)
                for _ in stream:
                    pass
                out.append({"prompt": p["messages"][-1].get("content", ""), "output": stream.text,
                            "reference": p["reference"]})
    finally:
        model.train(was_training)
    return out


def finish_report(run_dir: Path, summary: dict) -> None:
    """Print the result (validation before/after, samples before/after, diagnostics); stamp the manifest. A run
    stopped early (Ctrl-C, SIGTERM) skipped its final evaluation: it reports its last measured validation loss
    instead, as a before/after pair would compare an earlier measurement (often step 0's) with itself."""
    val, stopped = summary["val"], summary.get("stopped")
    steps, session = summary["steps"], summary.get("session_steps", summary["steps"])
    lines = [f"\nrun directory: {run_dir}",
             f"trained {steps} steps{f' ({session} in this session)' if session != steps else ''} at "
             f"{summary['tokens_per_s']:.0f} non-padding tokens/s"]
    if val and stopped:
        lines.append(last_measured(val, "val_loss", "validation loss"))
    elif val:
        first, last = val[0], val[-1]
        lines.append(f"validation loss {first['val_loss']:.4f} -> {last['val_loss']:.4f} "
                     f"(ppl {first['val_ppl']:.2f} -> {last['val_ppl']:.2f}, token accuracy "
                     f"{first['val_token_acc']:.3f} -> {last['val_token_acc']:.3f})")
    samples = run_dir / "samples.jsonl"
    if samples.is_file():
        recs = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
        if recs:
            first_step, last_step = recs[0]["step"], recs[-1]["step"]
            before = [r for r in recs if r["step"] == first_step]
            # none since the first (a run stopped before its next evaluation): nothing to compare them with
            after = [r for r in recs if r["step"] == last_step] if last_step != first_step else []
            for b, a in zip(before, after):
                lines.append(f"\nprompt: {b['prompt']}\n--- before (step {first_step}):\n{b['output']}\n"
                             f"--- after (step {last_step}):\n{a['output']}")
    for key in ("underfitting",):
        if summary.get(key):
            lines.append("warning: " + summary[key])
    if summary.get("throughput"):
        lines.append(summary["throughput"])
    if stopped:
        lines.append(f"stopped early ({stopped}) at step {summary['steps']} of {summary['total_steps']}; continue "
                     "with: fastchat-ft train ... --resume")
    print("\n".join(lines))
    path = run_dir / "run_manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest["result"] = {k: summary[k] for k in ("steps", "tokens_per_s", "stopped")}
    if val and stopped:
        manifest["result"].update(val_loss_last=val[-1]["val_loss"], val_loss_last_step=val[-1]["step"])
    elif val:
        manifest["result"].update(val_loss_before=val[0]["val_loss"], val_loss_after=val[-1]["val_loss"])
    _write_json(path, manifest)


def last_measured(records: list[dict], key: str, what: str) -> str:
    """The line a stopped run prints for `key` (its records, oldest first): the last value measured and its step,
    or that nothing was measured since the first evaluation (the start)."""
    first, last = records[0], records[-1]
    if last["step"] == first["step"]:
        return f"{what}: none measured since the start (step {first['step']}: {first[key]:.4f})"
    return f"last {what}: {last[key]:.4f} at step {last['step']} (a stopped run skips the final evaluation)"


def _write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj, indent=2, default=str)
