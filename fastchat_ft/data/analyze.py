"""`fastchat-ft analyze`: dataset statistics before training: conversations, turns, roles, tokens (all and
trainable, with the training template and tokenizer), lengths against max_seq_len, diversity, the packing
estimate and steps per epoch, and a token budget check. `analyze_file` returns the dict that export's
dataset_info and generation_notes.md reuse. One native pass (csrc/validate.*); memory is a length histogram
plus the duplicate index, not the records.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from fastchat_ft import _native, flags
from fastchat_ft.data.validate import (SEVERITIES, iter_batches, load_tokenizer, open_scanner, resolve_template,
                                       print_system_prompt_note, tokenizer_special_strings,
                                       training_system_prompt)
from fastchat_ft.errors import DataError

PERCENTILES = (50, 90, 95, 99)
# The error of a conversation over max_seq_len that training drops under either overlong policy. A record with no
# other error still counts in the length percentiles and the share over max_seq_len: those numbers are how a user
# picks max_seq_len, and leaving out the over-long records made single-turn data read "0 over max_seq_len".
LENGTH_ONLY = "length.truncated_no_trainable"


def _grow_add(hist: np.ndarray, values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return hist
    counts = np.bincount(values)
    if counts.size > hist.size:
        hist = np.concatenate([hist, np.zeros(counts.size - hist.size, dtype=np.int64)])
    hist[: counts.size] += counts
    return hist


def _percentile(hist: np.ndarray, q: float) -> int:
    """Lowest value v with at least q% of the mass at or below v (nearest-rank percentile)."""
    total = int(hist.sum())
    if total == 0:
        return 0
    rank = max(1, math.ceil(q / 100 * total))
    return int(np.searchsorted(np.cumsum(hist), rank))


def _pack_estimate(hist: np.ndarray, capacity: int) -> tuple[int, float]:
    """Bins from the loader's best-fit-decreasing packer (csrc/pack.*) over the lengths: (bins, efficiency)."""
    lengths = np.repeat(np.arange(hist.size, dtype=np.uint32), hist.astype(np.int64))
    if lengths.size == 0:
        return 0, 0.0
    _, offsets = _native.pack_bfd(lengths, capacity, 0)
    bins = int(offsets.size - 1)
    return bins, float(lengths.sum(dtype=np.int64)) / (bins * capacity)


def analyze_file(path: str | os.PathLike, tokenizer, *, template: str = "chatml", max_seq_len: int = 2048,
                 budget: int | None = None, micro_batch_size: int = 1, gradient_accumulation_steps: int = 1,
                 world_size: int = 1, overlong: str = "drop", near_threshold: float = 0.8, threads: int = 0,
                 plot: str | os.PathLike | None = None, system_prompt: str = "") -> dict:
    """Statistics of a chat file under a tokenizer (path or object) and template; see the module docstring.

    Records with validation errors are counted but left out of every other number (they do not train).
    `overlong` follows the loader: "drop" leaves conversations over max_seq_len out of the packing estimate,
    "truncate" keeps their whole turns up to the last one that trains and fits (as ChatDataset does).
    """
    if overlong not in ("drop", "truncate"):
        raise DataError(f"overlong must be 'drop' or 'truncate', not {overlong!r}", field="overlong")
    if max_seq_len <= 0:
        raise DataError("max_seq_len must be positive", field="max_seq_len")
    tok_path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else getattr(tokenizer, "path", None)
    if plot:  # before the scan: the PNG must never replace the dataset, nor fail after the whole analysis
        flags.output_file(plot, "--plot", inputs=[path, tok_path])
    tmpl = resolve_template(template, tok_path)
    tok = load_tokenizer(tokenizer)
    scanner = open_scanner(path, tokenizer=tok, template=tmpl, max_seq_len=max_seq_len, system_prompt=system_prompt,
                           special_strings=tokenizer_special_strings(tok_path), near_threshold=near_threshold,
                           count_bigrams=True, threads=threads)
    records = invalid = conversations = multi_turn = messages = max_turns = 0
    roles = np.zeros(4, dtype=np.int64)
    tokens = trainable = trained_tokens = trained_trainable = 0
    over = measured = exact_dups = near_dups = 0
    hist = np.zeros(1, dtype=np.int64)       # token length of every valid conversation (and LENGTH_ONLY ones)
    kept_hist = np.zeros(1, dtype=np.int64)  # lengths that reach training under `overlong`
    issue_counts: dict[str, int] = {}
    for batch in iter_batches(scanner):
        records += len(batch["lines"])
        too_long, other_error = set(), set()
        for (idx, _, _, sev, code, _, _) in batch["issues"]:
            key = f"{SEVERITIES[sev]}:{code}"
            issue_counts[key] = issue_counts.get(key, 0) + 1
            if SEVERITIES[sev] == "error":
                (too_long if code == LENGTH_ONLY else other_error).add(idx)
        ok = ~batch["has_error"]
        only_long = np.zeros(ok.size, dtype=bool)
        only_long[list(too_long - other_error)] = True
        invalid += int((~ok).sum())
        n_tok = batch["tokens"][ok].astype(np.int64)
        n_train = batch["trainable"][ok].astype(np.int64)
        n_kept_train = batch["trainable_kept"][ok].astype(np.int64)
        r = batch["roles"][ok].astype(np.int64)
        conversations += int(ok.sum())
        multi_turn += int((r[:, 1] >= 2).sum())
        msgs = batch["messages"][ok]
        messages += int(msgs.sum())
        max_turns = max(max_turns, int(msgs.max(initial=0)))
        roles += r.sum(axis=0)
        tokens += int(n_tok.sum())
        trainable += int(n_train.sum())
        is_over = n_tok > max_seq_len
        over += int(is_over.sum()) + int(only_long.sum())
        measured += int(ok.sum()) + int(only_long.sum())
        exact_dups += int((batch["duplicate_of"][ok] > 0).sum())
        near_dups += int((batch["near_duplicate_of"][ok] > 0).sum())
        hist = _grow_add(hist, np.concatenate([n_tok, batch["tokens"][only_long].astype(np.int64)]))
        if overlong == "drop":
            kept = n_tok[~is_over]
            trained_trainable += int(n_train[~is_over].sum())
        else:  # the loader's cut: whole turns up to the last one that trains and fits (0: dropped)
            cut = batch["truncated_tokens"][ok].astype(np.int64)
            kept = cut[cut > 0]
            trained_trainable += int(n_kept_train[cut > 0].sum())
        trained_tokens += int(kept.sum())
        kept_hist = _grow_add(kept_hist, kept)

    packed, efficiency = _pack_estimate(kept_hist, max_seq_len)
    trained_conversations = int(kept_hist.sum())
    per_step = max(1, micro_batch_size) * max(1, gradient_accumulation_steps) * max(1, world_size)
    distinct_2 = scanner.distinct_bigrams / scanner.total_bigrams if scanner.total_bigrams else 0.0
    distinct_2 = min(1.0, distinct_2)
    dup_share = (exact_dups + near_dups) / conversations if conversations else 0.0
    result = {
        "file": str(path),
        "tokenizer": None if tok_path is None else str(tok_path),
        "template": tmpl,
        "max_seq_len": max_seq_len,
        "overlong": overlong,
        "records": records,
        "invalid_records": invalid,
        "conversations": conversations,
        "turns": {"total": messages, "mean": messages / conversations if conversations else 0.0, "max": max_turns},
        "multi_turn_ratio": multi_turn / conversations if conversations else 0.0,
        "role_counts": {name: int(c) for name, c in zip(("system", "user", "assistant", "tool"), roles)},
        "tokens": {
            "total": tokens,
            "trainable": trainable,
            "trainable_share": trainable / tokens if tokens else 0.0,
            "mean_per_conversation": tokens / conversations if conversations else 0.0,
            "trained_total": trained_tokens,          # after the overlong policy: what one epoch reads
            "trained_trainable": trained_trainable,   # ... and the tokens it learns from
        },
        "lengths": {
            **{f"p{q}": _percentile(hist, q) for q in PERCENTILES},
            "max": int(np.flatnonzero(hist).max()) if hist.any() else 0,
            "conversations": measured,  # the valid ones and those over max_seq_len with no other error
            "mean": float(np.arange(hist.size) @ hist) / measured if measured else 0.0,
            "over_max_seq_len": over,
            "over_max_seq_len_share": over / measured if measured else 0.0,
        },
        "diversity": {
            "distinct_2": distinct_2,
            "exact_duplicates": exact_dups,
            "near_duplicates": near_dups,
            "duplicate_share": dup_share,
            "score": distinct_2 * (1.0 - dup_share),
        },
        "packing": {
            "capacity": max_seq_len,
            "conversations": trained_conversations,
            "packed_sequences": packed,
            "efficiency": efficiency,
            "micro_batch_size": micro_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "world_size": world_size,
            "steps_per_epoch": math.ceil(packed / per_step) if packed else 0,
            "steps_per_epoch_unpacked": math.ceil(trained_conversations / per_step) if trained_conversations else 0,
        },
        "budget": None,
        "issues": issue_counts,
    }
    if budget is not None:
        result["budget"] = {
            "tokens": int(budget),
            "met": trained_tokens >= budget,
            "trained_tokens_per_epoch": trained_tokens,
            "epochs_to_meet": budget / trained_tokens if trained_tokens else None,
            "missing_tokens": max(0, int(budget) - trained_tokens),
        }
    if plot:
        if not conversations:  # a histogram of nothing: refuse it before the file is written
            raise no_conversations(path, records)
        result["plot"] = str(plot_lengths(hist, max_seq_len, plot, title=Path(path).name))
    return result


def no_conversations(path, records: int) -> DataError:
    """A file with nothing to analyze (as validate and split refuse it): a report of zeros with exit status 0 reads
    as a dataset that passed."""
    if records == 0:
        return DataError("the file holds no records", file=str(path),
                         fix='add records: one JSON object per line, {"messages": [{"role": "user", ...}, ...]}')
    return DataError(f"the file holds no valid records ({records} with errors)", file=str(path),
                     fix=f"run `fastchat-ft validate {path}` to see what is wrong with each")


def plot_lengths(hist: np.ndarray, max_seq_len: int, out: str | os.PathLike, title: str = "") -> Path:
    """A token-length histogram PNG with max_seq_len and the percentiles marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("--plot needs matplotlib", fix="pip install 'fastchat-ft[plots]'") from None
    top = max(int(np.flatnonzero(hist).max()) if hist.any() else 1, max_seq_len) + 1
    edges = np.linspace(0, top, 61).astype(np.int64)
    edges[-1] = top
    h = np.pad(hist, (0, max(0, top - hist.size)))[:top]
    counts = np.add.reduceat(h, edges[:-1]) if h.size else np.zeros(60)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4472c4")
    ax.axvline(max_seq_len, color="#c00000", linestyle="--", label=f"max_seq_len {max_seq_len}")
    for q, style in zip(PERCENTILES, (":", "-.", "-.", ":")):
        ax.axvline(_percentile(hist, q), color="#555555", linestyle=style, linewidth=1, label=f"p{q} {_percentile(hist, q)}")
    ax.set_xlabel("tokens per conversation (template + content)")
    ax.set_ylabel("conversations")
    ax.set_title(f"token lengths: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    except OSError as e:  # a read-only or full disk, after the whole scan: a user error, not a traceback
        raise flags.write_failed(e, out, "--plot") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def format_report(r: dict) -> str:
    t, ln, d, p = r["tokens"], r["lengths"], r["diversity"], r["packing"]
    lines = [
        f"{r['file']}  (template {r['template']}, tokenizer {r['tokenizer']}, max_seq_len {r['max_seq_len']})",
        f"  records            {r['records']}  ({r['invalid_records']} invalid: run `fastchat-ft validate`)",
        f"  conversations      {r['conversations']}   turns {r['turns']['total']} (mean {r['turns']['mean']:.2f}, "
        f"max {r['turns']['max']})   multi-turn {r['multi_turn_ratio']:.1%}",
        "  roles              " + ", ".join(f"{k} {v}" for k, v in r["role_counts"].items()),
        f"  tokens             {t['total']} total, {t['trainable']} trainable ({t['trainable_share']:.1%}); "
        f"one epoch reads {t['trained_total']} ({t['trained_trainable']} trainable)",
        "  length             " + "  ".join(f"p{q} {ln[f'p{q}']}" for q in PERCENTILES) +
        f"  max {ln['max']};  {ln['over_max_seq_len']} of {ln['conversations']} over max_seq_len ({ln['over_max_seq_len_share']:.1%}, "
        f"overlong={r['overlong']})",
        f"  diversity          score {d['score']:.3f} = distinct-2 {d['distinct_2']:.3f} x (1 - duplicate share "
        f"{d['duplicate_share']:.1%}: {d['exact_duplicates']} exact, {d['near_duplicates']} near)",
        f"  packing            {p['conversations']} conversations -> {p['packed_sequences']} sequences of "
        f"{p['capacity']} ({p['efficiency']:.1%} full); steps/epoch {p['steps_per_epoch']} packed, "
        f"{p['steps_per_epoch_unpacked']} unpacked (batch {p['micro_batch_size']} x accum "
        f"{p['gradient_accumulation_steps']} x world {p['world_size']})",
    ]
    b = r.get("budget")
    if b:
        verdict = "met" if b["met"] else f"NOT met ({b['missing_tokens']} tokens short"
        if not b["met"] and b["epochs_to_meet"]:
            verdict += f"; {b['epochs_to_meet']:.2f} epochs would reach it"
        verdict += "" if b["met"] else ")"
        lines.append(f"  budget             {b['tokens']} tokens: {verdict}")
    if r.get("plot"):
        lines.append(f"  plot               {r['plot']}")
    return "\n".join(lines)


def run_analyze(args) -> int:
    # Flag values first: a default tokenizer may need converting (seconds) and the scan reads the whole file.
    flags.positive(args, ["max_seq_len", "micro_batch_size", "grad_accum", "world_size"])
    flags.at_least(args, {"budget": 1})
    if args.plot:  # here too: analyze_file checks it only after a default tokenizer's conversion
        flags.output_file(args.plot, "--plot", inputs=[args.file, args.tokenizer])
    tokenizer = args.tokenizer
    if tokenizer is None:
        from fastchat_ft.model.default_model import default_model_dir
        tokenizer = str(default_model_dir())
    system = training_system_prompt(getattr(args, "system_prompt", None), tokenizer, args.template)
    result = analyze_file(args.file, tokenizer, template=args.template, max_seq_len=args.max_seq_len,
                          system_prompt=system,
                          budget=args.budget, micro_batch_size=getattr(args, "micro_batch_size", 1),
                          gradient_accumulation_steps=getattr(args, "grad_accum", 1),
                          world_size=getattr(args, "world_size", 1), overlong=getattr(args, "overlong", "drop"),
                          plot=args.plot)
    if result["conversations"] == 0:
        raise no_conversations(args.file, result["records"])
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(format_report(result))
    if result["role_counts"]["system"] < result["conversations"]:  # some conversation took the default
        print_system_prompt_note(getattr(args, "system_prompt", None), system)
    return 0
