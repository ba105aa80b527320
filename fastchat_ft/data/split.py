"""`fastchat-ft split`: a deterministic train/validation split with no exact or near duplicate across it.

Records are grouped first (union-find over exact hashes and verified MinHash/LSH matches, csrc/dedup.*), and
whole groups are assigned to one side, so near-identical conversations never straddle the split. Records
with validation errors are left out of both files (and counted).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from fastchat_ft import flags
from fastchat_ft.data.validate import _records_raw, check_near_threshold, iter_batches, make_usual_mode, open_scanner
from fastchat_ft.errors import ConfigError, DataError


def assign_groups(groups: np.ndarray, usable: np.ndarray, val_ratio: float, seed: int) -> np.ndarray:
    """Boolean mask (per record) of the validation side: whole groups, in a seeded random order, until the
    validation side holds round(val_ratio * usable records); groups that would overshoot are skipped."""
    n_usable = int(usable.sum())
    target = int(round(val_ratio * n_usable))
    val = np.zeros(groups.size, dtype=bool)
    if target == 0 or n_usable == 0:
        return val
    roots, inverse, sizes = np.unique(groups[usable], return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(roots.size)
    chosen = np.zeros(roots.size, dtype=bool)
    filled = 0
    for g in order:
        if filled + sizes[g] <= target:
            chosen[g] = True
            filled += int(sizes[g])
            if filled == target:
                break
    val[np.flatnonzero(usable)] = chosen[inverse]
    return val


def output_paths(src: Path, out_dir: str | os.PathLike | None) -> tuple[Path, Path, Path]:
    """(folder, train file, val file), refused before the scan when they cannot be written or would replace the
    input."""
    out = flags.output_folder(out_dir, "--out-dir") if out_dir else src.parent
    if not out_dir:  # beside the input, e.g. in a read-only dataset folder: say so before the scan
        flags.writable_folder(out, "--out-dir", fix="pass --out-dir with a folder you can write to")
    stem = src.name
    for suffix in (".jsonl", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    train_path, val_path = out / f"{stem}.train.jsonl", out / f"{stem}.val.jsonl"
    # Not flags.output_file: it refuses a file whose folder does not exist yet, and split creates --out-dir.
    if any(flags._same_file(p, src) for p in (train_path, val_path)):
        raise DataError("the split would overwrite its input", file=str(src), fix="pass --out-dir")
    for p in (train_path, val_path):
        if p.is_dir():
            raise ConfigError(f"{p} is a folder, and the split writes a file of that name", field="--out-dir",
                              fix="move that folder away, or pass another --out-dir")
    return out, train_path, val_path


def split_file(path: str | os.PathLike, *, val_ratio: float = 0.1, seed: int = 0, out_dir: str | os.PathLike | None = None,
               near_threshold: float = 0.8, threads: int = 0) -> dict:
    """Write <name>.train.jsonl and <name>.val.jsonl; returns counts and paths, and `warnings` (a list of
    sentences) when a side came out empty."""
    if not 0.0 <= val_ratio < 1.0:  # not flags.check_range, which has no open upper bound (1: an empty train file)
        raise ConfigError(f"must be at least 0 and below 1, got {val_ratio}", field="--val-ratio",
                          fix="pass a share such as 0.1 (0: no validation file content)")
    flags.check_range(seed, "--seed", low=0)  # numpy's seeded generator takes no negative seed
    check_near_threshold(near_threshold)
    src = Path(path)
    out, train_path, val_path = output_paths(src, out_dir)
    scanner = open_scanner(src, near_threshold=near_threshold, threads=threads)
    usable_parts = []
    for batch in iter_batches(scanner):
        usable_parts.append(~batch["has_error"])
    usable = np.concatenate(usable_parts) if usable_parts else np.zeros(0, dtype=bool)
    groups = scanner.groups()
    if not usable.any():  # two empty files are no split
        what = "no records" if usable.size == 0 else f"no valid records ({usable.size} with errors)"
        raise DataError(f"the file holds {what}", file=str(src), fix="see `fastchat-ft validate` for what is wrong")
    val = assign_groups(groups, usable, val_ratio, seed)
    fds = []
    counts = [0, 0]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fds = [tempfile.mkstemp(dir=str(out), prefix=f".{p.name}.", suffix=".tmp") for p in (train_path, val_path)]
        with os.fdopen(fds[0][0], "wb") as ft, os.fdopen(fds[1][0], "wb") as fv:
            for ordinal, (_, raw) in enumerate(_records_raw(src)):
                if ordinal >= usable.size or not usable[ordinal]:
                    continue
                side = int(val[ordinal])
                (fv if side else ft).write(raw + b"\n")
                counts[side] += 1
        for _, tmp in fds:
            make_usual_mode(tmp)
        os.replace(fds[0][1], train_path)
        os.replace(fds[1][1], val_path)
    except OSError as e:  # a read-only or full disk: the input was read fine, the outputs cannot be written
        if e.filename is not None and Path(e.filename).resolve() == src.resolve():
            raise
        raise flags.write_failed(e, train_path, "--out-dir") from None
    finally:
        for _, tmp in fds:
            if os.path.exists(tmp):
                os.unlink(tmp)
    n_groups = int(np.unique(groups[usable]).size) if usable.any() else 0
    warnings = []
    if val_ratio > 0 and counts[1] == 0:
        warnings.append(f"{val_path} is empty: {val_ratio} of {counts[0]} valid records rounds to none, or every "
                        f"duplicate group is larger than that; pass a larger --val-ratio or add data")
    return {
        "file": str(src), "seed": seed, "val_ratio": val_ratio, "warnings": warnings,
        "train": {"path": str(train_path), "records": counts[0]},
        "val": {"path": str(val_path), "records": counts[1]},
        "skipped_invalid": int((~usable).sum()),
        "groups": n_groups,
        "grouped_records": int(usable.sum()) - n_groups,  # records that joined an earlier record's group
    }


def run_split(args) -> int:
    result = split_file(args.file, val_ratio=args.val_ratio, seed=args.seed, out_dir=args.out_dir,
                        near_threshold=getattr(args, "near_threshold", 0.8))
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(f"train {result['train']['records']:>8}  {result['train']['path']}")
        print(f"val   {result['val']['records']:>8}  {result['val']['path']}")
        print(f"{result['grouped_records']} duplicate or near-duplicate records kept on the side of their group "
              f"({result['groups']} groups); {result['skipped_invalid']} invalid records left out "
              f"(see `fastchat-ft validate`)")
    sys.stdout.flush()  # the warnings come after the report they are about
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
