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

from fastchat_ft import config as config_mod
from fastchat_ft.engine.data import file_digest

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
    files = {"train": s.data.train_files, "val": s.data.val_files}
    splits = {k: [{"path": str(Path(p).resolve()), "sha256": file_digest(p), "bytes": Path(p).stat().st_size}
                  for p in v] for k, v in files.items()}
    for kind, paths in files.items():
        if len(paths) == 1 and Path(paths[0]).stat().st_size <= COPY_LIMIT:
            shutil.copyfile(paths[0], data_dir / f"{kind}.jsonl")
    (data_dir / "splits.json").write_text(json.dumps(splits, indent=2))
    device = torch.cuda.get_device_name() if s.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    manifest_path = run_dir / "run_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if resumed and manifest_path.is_file() else {}
    manifest.update({
        "command": "fastchat-ft train", "base_model": str(s.model_info["base_dir"]), "tokenizer": str(s.tokenizer_dir),
        "data": splits, "packed_rows": {"train": len(s.data.train), "val": len(s.data.val)},
        "loader_stats": {k: v for k, v in (s.data.stats or {}).items() if isinstance(v, (int, float, str))},
        "versions": package_versions(), "git_revision": _git_revision(), "device": device,
        "python": platform.python_version(), "config_hash": cfg.config_hash(),
        "start_time": manifest.get("start_time") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    if resumed:
        manifest.setdefault("resumed_at", []).append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_json(manifest_path, manifest)


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
    """Print the result (validation before/after, samples before/after, diagnostics); stamp the manifest."""
    val = summary["val"]
    lines = [f"\nrun directory: {run_dir}",
             f"trained {summary['steps']} steps at {summary['tokens_per_s']:.0f} non-padding tokens/s"]
    if val:
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
            after = [r for r in recs if r["step"] == last_step]
            for b, a in zip(before, after):
                lines.append(f"\nprompt: {b['prompt']}\n--- before (step {first_step}):\n{b['output']}\n"
                             f"--- after (step {last_step}):\n{a['output']}")
    for key in ("underfitting",):
        if summary.get(key):
            lines.append("warning: " + summary[key])
    if summary.get("throughput"):
        lines.append(summary["throughput"])
    if summary.get("stopped"):
        lines.append(f"stopped early ({summary['stopped']}); continue with: fastchat-ft train ... --resume")
    print("\n".join(lines))
    path = run_dir / "run_manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    manifest["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest["result"] = {k: summary[k] for k in ("steps", "tokens_per_s", "stopped")}
    if val:
        manifest["result"].update(val_loss_before=val[0]["val_loss"], val_loss_after=val[-1]["val_loss"])
    _write_json(path, manifest)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
