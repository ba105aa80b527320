"""The run's artifacts beside an exported model: training_config.yaml, the splits used (copied, or by path and
sha256 when large), dataset_info.json, training_logs/ (TensorBoard events, metrics.jsonl), the loss curve and
generation_notes.md. Reads the run directory (runlayout.md); never writes into it.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from fastchat_ft.engine.data import file_digest

COPY_SPLITS_UP_TO = 200 * 1024 * 1024  # bytes; larger splits are referenced by path + sha256 instead
SPLIT_NAMES = ("train", "val")


def read_conversations(path: Path, limit: int | None = None) -> list[list[dict]]:
    """Message lists from a ChatML JSONL/JSON file (OpenAI `messages` or ShareGPT `conversations`).
    Lenient on purpose: it only feeds statistics and prompts; `fastchat-ft validate` is the strict reader."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for line in text.splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    convs = []
    for row in rows:
        msgs = _messages(row)
        if msgs:
            convs.append(msgs)
        if limit and len(convs) >= limit:
            break
    return convs


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


def _messages(row) -> list[dict]:
    if not isinstance(row, dict):
        return []
    if isinstance(row.get("messages"), list):
        out = []
        for m in row["messages"]:
            if isinstance(m, dict) and "role" in m:
                content = m.get("content") or ""
                if isinstance(content, list):  # content parts
                    content = "".join(p.get("text") or p.get("value") or "" for p in content if isinstance(p, dict))
                out.append({"role": m["role"], "content": str(content)})
        return out
    if isinstance(row.get("conversations"), list):
        system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] else []
        return system + [{"role": _SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": str(m.get("value", ""))}
                         for m in row["conversations"] if isinstance(m, dict)]
    return []


def split_files(run_dir: Path | None) -> dict[str, Path]:
    """{"train": path, "val": path} from run_dir/data/ (copied files or splits.json with paths)."""
    if run_dir is None:
        return {}
    data = run_dir / "data"
    found = {}
    for name in SPLIT_NAMES:
        for ext in (".jsonl", ".json"):
            if (data / f"{name}{ext}").is_file():
                found[name] = data / f"{name}{ext}"
                break
    splits_json = data / "splits.json"
    if splits_json.is_file():
        for name, entry in json.loads(splits_json.read_text()).items():
            # an entry is a path, {path, sha256, ...}, or a list of those (several files make one split);
            # with several, statistics and prompts use the first (the engine copies small splits whole anyway)
            entries = entry if isinstance(entry, list) else [entry]
            paths = [Path(e["path"] if isinstance(e, dict) else e) for e in entries]
            paths = [p for p in paths if p.is_file()]
            if name in SPLIT_NAMES and name not in found and paths:
                found[name] = paths[0]
    return found


def prompts_from(convs: list[list[dict]], n: int) -> list[dict]:
    """Prompts for generation checks: each conversation cut before its last assistant turn, with that turn
    kept as the reference answer."""
    out = []
    for msgs in convs:
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            continue
        out.append({"messages": msgs[:last], "reference": msgs[last]["content"]})
        if len(out) >= n:
            break
    return out


def dataset_stats(convs: list[list[dict]], tokenizer=None) -> dict:
    """Examples, turns, multi-turn ratio, tokens (template-rendered) and answer diversity (distinct bigrams)."""
    n = len(convs)
    if n == 0:
        return {"examples": 0}
    assistant_turns = [sum(m["role"] == "assistant" for m in c) for c in convs]
    answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    words = [w for a in answers for w in a.lower().split()]
    bigrams = list(zip(words, words[1:]))
    stats = {
        "examples": n,
        "messages_per_example": round(sum(map(len, convs)) / n, 2),
        "multi_turn_ratio": round(sum(t > 1 for t in assistant_turns) / n, 4),
        "with_system_prompt": round(sum(c[0]["role"] == "system" for c in convs if c) / n, 4),
        "assistant_answers": len(answers),
        "distinct_answer_ratio": round(len(set(answers)) / max(1, len(answers)), 4),
        "distinct_2": round(len(set(bigrams)) / max(1, len(bigrams)), 4),
    }
    if tokenizer is not None:
        lengths = []
        for c in convs:
            try:
                lengths.append(len(tokenizer(tokenizer.apply_chat_template(c, tokenize=False),
                                             add_special_tokens=False)["input_ids"]))
            except Exception:  # a conversation the template rejects: validate reports it, stats skip it
                continue
        if lengths:
            lengths.sort()
            stats.update(tokens=sum(lengths), tokens_per_example_mean=round(sum(lengths) / len(lengths), 1),
                         tokens_per_example_p50=lengths[len(lengths) // 2],
                         tokens_per_example_max=lengths[-1])
    return stats


def analyze_split(path: Path, tokenizer_dir: Path, tokenizer, config: dict) -> dict:
    """`fastchat-ft analyze`'s statistics of one split with the training template and tokenizer; the small
    Python count above when the analyzer cannot run (e.g. a template it does not know)."""
    try:
        from fastchat_ft.data.analyze import analyze_file
        from fastchat_ft.data.validate import training_system_prompt
        template = config.get("chat_template") or "chatml"
        # the system turn training gave conversations without one (the model's default when system_prompt is
        # unset): without it the statistics undercount the tokens the run trained on
        system = training_system_prompt(config.get("system_prompt"), str(tokenizer_dir), template)
        return analyze_file(path, str(tokenizer_dir), template=template,
                            max_seq_len=int(config.get("sequence_len") or 2048), system_prompt=system)
    except Exception as e:  # noqa: BLE001 - statistics must not stop an export; the fallback says why
        stats = dataset_stats(read_conversations(path), tokenizer)
        stats["analyze_error"] = f"{type(e).__name__}: {e}"
        return stats


def split_summary(d: dict) -> dict:
    """The few numbers the card and notes show, from analyze's dict or from dataset_stats'."""
    if "conversations" in d:  # analyze_file
        tok, div = d.get("tokens", {}), d.get("diversity", {})
        return {"examples": d["conversations"], "multi_turn_ratio": d.get("multi_turn_ratio", 0.0),
                "tokens": tok.get("total"), "trainable_tokens": tok.get("trainable"),
                "tokens_mean": round(tok.get("mean_per_conversation", 0.0), 1),
                "tokens_max": d.get("lengths", {}).get("max"), "distinct_2": div.get("distinct_2", 0.0),
                "duplicates": div.get("exact_duplicates", 0) + div.get("near_duplicates", 0),
                "invalid_records": d.get("invalid_records", 0)}
    return {"examples": d.get("examples", 0), "multi_turn_ratio": d.get("multi_turn_ratio", 0.0),
            "tokens": d.get("tokens"), "trainable_tokens": None, "tokens_mean": d.get("tokens_per_example_mean"),
            "tokens_max": d.get("tokens_per_example_max"), "distinct_2": d.get("distinct_2", 0.0),
            "duplicates": None, "invalid_records": None}


def read_metrics(run_dir: Path | None) -> list[dict]:
    path = run_dir / "metrics.jsonl" if run_dir else None
    if not path or not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def loss_before_after(metrics: list[dict], result: dict | None = None) -> dict:
    """The first and last validation metrics and the training loss. `result`: the run manifest's. A run stopped
    early (Ctrl-C, SIGTERM) skipped its final evaluation: its last measured validation loss and step are the
    manifest's val_loss_last / val_loss_last_step, the ones its summary printed (engine.rundir.finish_report)."""
    evals = [m for m in metrics if "val_loss" in m]
    out = {}
    if evals:
        first, last = evals[0], evals[-1]
        for key in ("val_loss", "val_ppl", "val_token_acc"):
            if key in first:
                out[f"{key}_before"] = first[key]
            if key in last:
                out[f"{key}_after"] = last[key]
        out["eval_steps"] = [first.get("step"), last.get("step")]
        if result and result.get("stopped"):
            out.update(stopped=result["stopped"], stopped_at_step=result.get("steps"),
                       val_loss_last=result.get("val_loss_last", last["val_loss"]),
                       val_loss_last_step=result.get("val_loss_last_step", last.get("step")))
    train = [m for m in metrics if "loss" in m]
    if train:
        out["train_loss_first"], out["train_loss_last"] = train[0]["loss"], train[-1]["loss"]
        out["steps"] = train[-1].get("step")
    return out


def write_artifacts(source, tokenizer, out: Path, *, notes_file: str | None = None) -> dict:
    """Copy or summarise everything the run left; return what the model card and self-check need."""
    run_dir = source.run_dir or _run_dir_of_checkpoint(source.path)
    info: dict = {"run_dir": str(run_dir) if run_dir else None, "files": []}
    if run_dir is not None:
        for name in ("training_config.yaml", "run_manifest.json", "loss_curve.png", "samples.jsonl"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out / name)
                info["files"].append(name)
        logs = out / "training_logs"
        if (run_dir / "training_logs").is_dir():
            shutil.copytree(run_dir / "training_logs", logs)
        if (run_dir / "metrics.jsonl").is_file():
            logs.mkdir(exist_ok=True)
            shutil.copy2(run_dir / "metrics.jsonl", logs / "metrics.jsonl")
        if logs.is_dir():
            info["files"].append("training_logs/")
    splits = split_files(run_dir)
    held_out = _train_less_held_out(run_dir, splits, out)
    info["splits"] = _write_splits(splits, out, held_out)
    if splits:
        info["files"].append("data/")
    info["config"] = _read_yaml(run_dir / "training_config.yaml") if run_dir else {}
    info["dataset_info"] = {name: analyze_split(path, source.tokenizer_dir, tokenizer, info["config"])
                            for name, path in splits.items()}
    info["dataset_info"]["validate"] = _validate_summary(run_dir)
    (out / "dataset_info.json").write_text(json.dumps(info["dataset_info"], indent=2) + "\n")
    info["files"].append("dataset_info.json")
    metrics = read_metrics(run_dir)
    info["losses"] = loss_before_after(metrics, _read_manifest(run_dir).get("result"))
    if metrics and not (out / "loss_curve.png").exists() and _plot_loss(metrics, out / "loss_curve.png"):
        info["files"].append("loss_curve.png")
    val = splits.get("val") or splits.get("train")
    info["check_prompts"] = prompts_from(read_conversations(val, limit=50), 3) if val else []
    if held_out and "copied_as" not in info["splits"]["train"]:
        splits["train"].unlink()  # too big to ship: splits.json names the file and its held-out lines
    notes = Path(notes_file).read_text(encoding="utf-8") if notes_file else None
    (out / "generation_notes.md").write_text(generation_notes(notes, info))
    info["files"].append("generation_notes.md")
    return info


def _run_dir_of_checkpoint(ckpt: Path) -> Path | None:
    """A checkpoint inside a run dir (final/ or checkpoints/step-N/) belongs to that run."""
    for parent in (ckpt.parent, ckpt.parent.parent):
        if (parent / "training_config.yaml").is_file() or (parent / "metrics.jsonl").is_file():
            return parent
    return None


def _train_less_held_out(run_dir: Path | None, splits: dict[str, Path], out: Path) -> dict | None:
    """When the train split is a training file the run held val_set_size conversations out of (it was too big
    for the engine to copy as data/train.jsonl), writes its other records to out/data/train.jsonl and points
    splits["train"] there, so the statistics and the shipped split never count held-out records as training
    data. Returns {path, sha256, bytes, held_out_lines} of the original file, or None when nothing was held out."""
    from fastchat_ft.engine.rundir import held_out_lines, write_training_records

    original = splits.get("train")
    held = held_out_lines(run_dir, original) if original else set()
    if not held:
        return None
    (out / "data").mkdir(exist_ok=True)
    splits["train"] = write_training_records(original, held, out / "data" / "train.jsonl")
    return {"path": str(original.resolve()), "sha256": file_digest(original), "bytes": original.stat().st_size,
            "held_out_lines": sorted(held)}


def _write_splits(splits: dict[str, Path], out: Path, train_held_out: dict | None = None) -> dict:
    """Copies the splits into out/data/ (or, over COPY_SPLITS_UP_TO in all, names them by path and sha256) and
    writes out/data/splits.json. train_held_out: the train split is already out/data/train.jsonl, the file
    train_held_out["path"] less its held_out_lines."""
    total = sum(p.stat().st_size for p in splits.values())
    entries = {}
    if not splits:
        return entries
    (out / "data").mkdir(exist_ok=True)
    for name, path in splits.items():
        if name == "train" and train_held_out:
            entry = dict(train_held_out)
            if total <= COPY_SPLITS_UP_TO:
                entry["copied_as"] = "data/train.jsonl"
            entries[name] = entry
            continue
        entry = {"path": str(path.resolve()), "sha256": file_digest(path), "bytes": path.stat().st_size}
        if total <= COPY_SPLITS_UP_TO:
            shutil.copy2(path, out / "data" / path.name)
            entry["copied_as"] = f"data/{path.name}"
        entries[name] = entry
    (out / "data" / "splits.json").write_text(json.dumps(entries, indent=2) + "\n")
    return entries


def _read_manifest(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "run_manifest.json").is_file():
        return {}
    try:
        manifest = json.loads((run_dir / "run_manifest.json").read_text())
    except json.JSONDecodeError:
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _validate_summary(run_dir: Path | None) -> dict:
    """What validation removed, as the engine recorded it in run_manifest.json (keys vary; pass them on)."""
    manifest = _read_manifest(run_dir)
    found = {}

    def walk(obj, prefix=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                key = f"{prefix}{k}"
                if re.search(r"drop|removed|reject|skipp|truncat|inexact|invalid", k, re.I) and \
                        isinstance(v, (int, float, str)):
                    found[key] = v
                else:
                    walk(v, key + ".")
    walk(manifest)
    return found


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _plot_loss(metrics: list[dict], png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m and "step" in m]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def generation_notes(user_notes: str | None, info: dict) -> str:
    lines = ["# How the training data was made", ""]
    if user_notes:
        lines += ["## Notes from the author", "", user_notes.strip(), ""]
    else:
        lines += ["_No notes were given (`fastchat-ft export --notes FILE` adds them here)._", ""]
    lines += ["## Measured statistics", ""]
    ds = info.get("dataset_info", {})
    sums = {name: split_summary(ds[name]) for name in SPLIT_NAMES if name in ds}
    for name, s in sums.items():
        if s["examples"]:
            extra = f", {s['trainable_tokens']} trainable" if s["trainable_tokens"] is not None else ""
            dups = f", {s['duplicates']} duplicates" if s["duplicates"] is not None else ""
            lines.append(f"- **{name}**: {s['examples']} conversations, multi-turn ratio {s['multi_turn_ratio']:.1%}, "
                         f"{s['tokens'] if s['tokens'] is not None else 'n/a'} tokens{extra}, "
                         f"distinct-2 {s['distinct_2']:.3f}{dups}")
            if s["invalid_records"]:
                lines.append(f"  - {s['invalid_records']} invalid records in this file were left out of training")
    if sums.get("train", {}).get("examples") and sums.get("val", {}).get("examples"):
        n_tr, n_va = sums["train"]["examples"], sums["val"]["examples"]
        lines.append(f"- split: {n_tr} train / {n_va} validation ({n_va / (n_tr + n_va):.1%} held out)")
    removed = ds.get("validate") or {}
    lines.append("- removed by validation: " + (", ".join(f"{k} = {v}" for k, v in removed.items())
                                                if removed else "nothing recorded in run_manifest.json"))
    lines += _validation_loss_line(info.get("losses", {}))
    return "\n".join(lines) + "\n"


def _validation_loss_line(losses: dict) -> list[str]:
    """The first validation loss against the last one measured. A stopped run has no final evaluation: its last
    is the one before the stop, and with none since the first there is nothing to compare the first with."""
    if "val_loss_before" not in losses:
        return []
    before = f"- validation loss: {losses['val_loss_before']:.4f} before training"
    stopped = stopped_run_last_validation(losses)
    if stopped:
        if stopped["only"]:
            return [f"{before}, the only measurement ({stopped['why']})"]
        return [f"{before}, {stopped['val_loss']:.4f} at step {stopped['step']}, the last measurement "
                f"({stopped['why']})"]
    first_step, last_step = losses["eval_steps"]
    if last_step == first_step:
        return [f"{before}, the only measurement"]
    return [f"{before}, {losses['val_loss_after']:.4f} after"]


def stopped_run_last_validation(losses: dict) -> dict | None:
    """For a stopped run (loss_before_after's `losses`): its last measured validation loss, that step, whether it
    is the first measurement itself, and why there is no final one. None for a run not stopped, whose last
    evaluation is its final one. Shared by generation_notes.md and the model card so both say the same."""
    if not losses.get("stopped") or "val_loss_before" not in losses:
        return None
    step = losses["val_loss_last_step"]
    return {"step": step, "val_loss": losses["val_loss_last"], "only": step == losses["eval_steps"][0],
            "why": f"the run was stopped ({losses['stopped']}) at step {losses.get('stopped_at_step')}, before its "
                   "final evaluation"}
