"""The engine's side of the data: packed rows from `fastchat_ft.data.ChatDataset`, the held-out split, and
which rows form each optimizer step. The order is a pure function of (seed, epoch, step), so a resume
jumps straight to its position without replaying batches. Tokenizing and packing live in fastchat_ft.data.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastchat_ft import flags
from fastchat_ft.config import LOADER_KEYS
from fastchat_ft.data.collate import collate
from fastchat_ft.data.dataset import file_digest
from fastchat_ft.errors import ConfigError, DataError


@dataclass
class RunData:
    train: object                    # indexable packed rows: dicts of 1-D arrays input_ids, labels, position_ids, seq_lens
    val: object
    train_files: list[Path] = field(default_factory=list)
    val_files: list[Path] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    held_out: dict = field(default_factory=dict)  # val_set_size: {training file: held-out conversations' lines}
    digests: dict = field(default_factory=dict)   # {file: sha256}, filled by digest()

    def digest(self, path) -> str:
        """The sha256 of one of the run's data files, read once however often it is asked for: the loader's cache
        key, the run manifest and the resume data fingerprint all need it (large files take seconds to hash)."""
        return cached_digest(self.digests, path)


def cached_digest(digests: dict, path) -> str:
    """The sha256 of `path` from `digests` ({file: sha256}), hashed and added there the first time."""
    key = str(path)
    if key not in digests:
        digests[key] = file_digest(path)
    return digests[key]


def row_tokens(row: dict) -> int:
    lens = row.get("seq_lens")
    return int(np.sum(lens)) if lens is not None else int(len(row["input_ids"]))


def row_label_tokens(row: dict) -> int:
    return int((np.asarray(row["labels"]) != -100).sum())


class Rows:
    """A subset of a dataset's packed rows by index, without copying them (the dataset is memory-mapped)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[self.indices[i]]


def loader_options(cfg, entry: dict | None = None) -> dict:
    """ChatDataset keywords for one datasets / test_datasets entry: the config's, with the entry's own loader
    keys (train_on, system_prompt, ...) on top."""
    options = dict(template=cfg.chat_template, max_seq_len=cfg.sequence_len, packing=cfg.sample_packing,
                   seed=cfg.seed, train_on=cfg.resolved_train_on(), overlong=cfg.excess_length_strategy,
                   think=cfg.think, system_prompt=cfg.system_prompt,
                   allow_special_in_content=cfg.allow_special_in_content, on_error=cfg.on_error)
    for key in LOADER_KEYS:
        if entry and entry.get(key) is not None:
            options[key] = entry[key]
    return options


_told: set = set()


def inherited_system_prompt(tokenizer_dir: Path, template: str) -> str | None:
    """The default system prompt of the model's own template when the built-in `template` renders like it
    (conversations without a system turn then get it, as they will at inference); said once per run."""
    from fastchat_ft.data.template_defaults import model_default_system

    system = model_default_system(str(tokenizer_dir), template)
    if system and (str(tokenizer_dir), template) not in _told:
        _told.add((str(tokenizer_dir), template))
        print(f"fastchat-ft data: any conversation without a system turn gets the model's default system prompt "
              f"{system[:80]!r}{'...' if len(system) > 80 else ''}, as its own chat template adds it at inference "
              f"(generate, serve, HF, vLLM); set system_prompt: \"\" to train without it", file=sys.stderr)
    return system


class Concat:
    """The rows of several packed datasets one after another (files whose loader options differ are packed
    apart: one ChatDataset renders all its files with one option set)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


def pack_entries(entries: list[dict], tokenizer_dir: Path, cfg, digest=None) -> tuple[object, dict]:
    """The files of `entries` packed per distinct loader option set (usually one: every file together).
    digest: path -> sha256 for the loader's cache key (see pack_files)."""
    groups: dict[tuple, tuple[dict, list[Path]]] = {}
    inherited = None
    for entry in entries:
        options = loader_options(cfg, entry)
        if options["system_prompt"] is None:  # unset: follow the model's own template (see template_defaults)
            options["system_prompt"] = inherited_system_prompt(tokenizer_dir, options["template"])
            inherited = inherited or options["system_prompt"]
        groups.setdefault(tuple(sorted(options.items())), (options, []))[1].append(Path(entry["path"]))
    parts = [pack_files(paths, tokenizer_dir, options, digest) for options, paths in groups.values()]
    if len(parts) == 1:
        stats = parts[0][1]
    else:
        stats = _combined_stats([p[1] for p in parts])
    if inherited:  # the run manifest's loader_stats then say which system turn training added
        stats["inherited_system_prompt"] = inherited
    return (parts[0][0] if len(parts) == 1 else Concat([p[0] for p in parts])), stats


def _combined_stats(parts: list[dict]) -> dict:
    stats = {k: sum(p.get(k, 0) for p in parts) for k, v in parts[0].items() if isinstance(v, int)}
    bins = sum(p.get("bins", 0) for p in parts)
    stats["packing_efficiency"] = sum(p.get("packing_efficiency", 0) * p.get("bins", 0)
                                      for p in parts) / bins if bins else 0.0
    rejects = [p["rejects_file"] for p in parts if p.get("rejects_file")]
    if rejects:
        stats["rejects_file"] = os.pathsep.join(rejects)
    return stats


def pack_files(paths: list[Path], tokenizer_dir: Path, options: dict, digest=None) -> tuple[object, dict]:
    """Tokenize, mask and pack files with the native loader and one option set (cached on disk; the cache key
    covers every option and each file's sha256, from `digest(path)` when given, e.g. RunData.digest); rows are
    indexable. With on_error: skip, says how many records were left out and where they are."""
    from fastchat_ft.data import ChatDataset
    from fastchat_ft.data.dataset import default_cache_dir

    default_cache_dir().mkdir(parents=True, exist_ok=True)  # the loader expects its cache folder to exist
    ds = ChatDataset([str(p) for p in paths], str(tokenizer_dir), digest=digest, **options)
    stats = {k: v for k, v in vars(ds.stats).items() if isinstance(v, (int, float))}
    if ds.stats.errors:
        if not Path(ds.rejects_path).is_file():
            # a cache entry from before the loader kept its rejects: build once more (not cached) to list them
            # again rather than point the user at a file that is gone
            ds = ChatDataset([str(p) for p in paths], str(tokenizer_dir), cache=False, **options)
        # beside the first input, or where the loader put them when that folder is read-only (it never needs
        # to be writable); the run folder keeps a copy as data/rejects.jsonl (rundir.py)
        rejects = Path(ds.rejects_path)
        print(f"fastchat-ft data: on_error: skip left out {ds.stats.errors} bad record(s) of "
              f"{', '.join(map(str, paths))}; each is listed with its file:line and reason in {rejects} "
              f"(a training run copies them to its data/rejects.jsonl)", file=sys.stderr)
        stats["rejects_file"] = str(rejects)
    return ds, stats


def held_out_conversations(rows) -> dict[str, list[int]]:
    """{source file: sorted lines} of every conversation packed into `rows` (the loader's "file:line" sources;
    line is a JSONL record's line, or where a JSON array element starts)."""
    out: dict[str, list[int]] = {}
    for i in range(len(rows)):
        for src in rows[i].get("sources") or []:
            path, _, line = str(src).rpartition(":")
            out.setdefault(path, []).append(int(line))
    return {path: sorted(lines) for path, lines in out.items()}


CONFIG_FIX = "check the path (in a config file a relative path is relative to that file; in --set, to the current folder)"


def build_run_data(cfg, tokenizer_dir: Path) -> RunData:
    """Training rows and validation rows (test_datasets, else a val_set_size share of the packed rows)."""
    train_files = [Path(d["path"]) for d in cfg.datasets]
    val_files = [Path(d["path"]) for d in cfg.test_datasets]
    if not train_files:
        raise ConfigError("no training data", field="datasets", fix="add datasets: [{path: your.jsonl}] or pass --data FILE")
    for p in train_files + val_files:
        flags.input_file(p, "datasets" if p in train_files else "test_datasets", CONFIG_FIX)  # direct callers
    digests: dict = {}  # each file hashed once a start: the loader's cache key here, the manifest and resume later
    digest = functools.partial(cached_digest, digests)
    train, stats = pack_entries(cfg.datasets, tokenizer_dir, cfg, digest)
    val = pack_entries(cfg.test_datasets, tokenizer_dir, cfg, digest)[0] if val_files else []
    held_out = {}
    if not val_files and cfg.val_set_size > 0:
        # rows hold whole conversations, so holding out rows never splits a conversation
        n_val = int(cfg.val_set_size) if cfg.val_set_size >= 1 else max(1, round(cfg.val_set_size * len(train)))
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        val, train = Rows(train, sorted(order[:n_val])), Rows(train, sorted(order[n_val:]))
        held_out = held_out_conversations(val)  # the run folder records these as the validation split
    if len(train) == 0 or stats.get("trainable_tokens", 1) == 0:
        raise DataError("no trainable tokens in the training data", file=str(train_files[0]),
                        fix="check the roles (assistant turns are what is learned) with `fastchat-ft validate`")
    return RunData(train, val, train_files, val_files, stats, held_out, digests)


def steps_per_epoch(n_rows: int, micro_batch_size: int, accum: int) -> int:
    return math.ceil(math.ceil(n_rows / micro_batch_size) / accum)


def step_rows(n_rows: int, micro_batch_size: int, accum: int, seed: int, epoch: int, step_in_epoch: int) -> list[list[int]]:
    """Row indices of each micro-batch of one optimizer step. The global batch of a step is the same set
    of rows for any micro_batch_size x accum with the same product (the accumulation-equivalence tests)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    per_step = micro_batch_size * accum
    chunk = order[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]
    return [chunk[i:i + micro_batch_size].tolist() for i in range(0, len(chunk), micro_batch_size)]


def rank_step(rows, cfg, per_step: int, epoch: int, step_in_epoch: int, rank: int,
              merge_tokens: int = 0) -> tuple[list[list[int]], list[dict]]:
    """The whole step's micro-batch row indices (every rank's) and this rank's collated micro-batches: rank r
    takes the r-th run of gradient_accumulation_steps micro-batches. merge_tokens > 0 (one CPU process, see
    config.cpu_merge_tokens) joins consecutive micro-batches into one packed row while within that many tokens."""
    idx = step_rows(len(rows), cfg.micro_batch_size, per_step, cfg.seed, epoch, step_in_epoch)
    accum = cfg.gradient_accumulation_steps
    mine = idx[rank * accum:(rank + 1) * accum]
    if merge_tokens > 0:
        return idx, micro_batches(rows, merge_micro_batches(rows, mine, merge_tokens), join=True)
    return idx, micro_batches(rows, mine)


def merge_budget(cfg, device, world: int) -> int:
    """The cpu_merge_tokens a run applies: one CPU process only (ranks must run matching forwards for their
    collectives, and on a GPU memory is the scarcer resource)."""
    return cfg.cpu_merge_tokens if device.type == "cpu" and world == 1 else 0


def merge_micro_batches(rows, indices: list[list[int]], budget: int) -> list[list[int]]:
    """Consecutive micro-batches' row indices taken together while their tokens stay within budget (a micro-batch
    larger than budget stays alone). The loss is normalised per optimizer step, so grouping them differently
    changes neither the loss nor the gradients, only how many forwards compute them."""
    groups: list[list[int]] = []
    tokens = 0
    for mb in indices:
        n = sum(row_tokens(rows[i]) for i in mb)
        if groups and tokens + n <= budget:
            groups[-1] = groups[-1] + list(mb)
            tokens += n
        else:
            groups.append(list(mb))
            tokens = n
    return groups


def join_rows(items: list[dict]) -> dict:
    """Packed rows laid end to end as one: every conversation keeps its positions (restarting at 0), so attention
    and the shifted labels stay within each conversation exactly as in the separate rows."""
    out = {k: np.concatenate([np.asarray(it[k]) for it in items]) for k in ("input_ids", "labels", "position_ids")}
    out["seq_lens"] = np.concatenate([np.asarray(it["seq_lens"]) if it.get("seq_lens") is not None
                                      else np.asarray([len(it["input_ids"])]) for it in items])
    return out


def micro_batches(rows, indices: list[list[int]], join: bool = False) -> list[dict]:
    """One collated batch per list of row indices; join=True lays each list's rows end to end as one packed row."""
    out = []
    for idx in indices:
        items = [rows[i] for i in idx]
        batch = collate([join_rows(items)] if join else items)
        batch["row_ids"] = idx
        sources = [s for it in items for s in (it.get("sources") or [])]
        if sources:
            batch["sources"] = sources
        out.append(batch)
    return out


def eval_batches(rows, micro_batch_size: int):
    for i in range(0, len(rows), micro_batch_size):
        yield collate([rows[j] for j in range(i, min(i + micro_batch_size, len(rows)))])


def sample_prompts(files: list[Path], n: int, held_out: dict | None = None) -> list[dict]:
    """The first n conversations of the validation files (with held_out, {file: lines}, only the conversations
    val_set_size held out of them), cut before their last assistant turn: [{messages, reference}], reference
    being the held-out assistant reply."""
    prompts = []
    if n <= 0:
        return prompts
    for path in files:
        keep = set(held_out.get(str(path), [])) if held_out else None
        for line, record in records_with_lines(Path(path)):
            if len(prompts) >= n:
                return prompts
            if keep is not None and line not in keep:
                continue
            try:
                messages = json.loads(record).get("messages") or []
            except (ValueError, AttributeError):
                continue
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last:
                prompts.append({"messages": messages[:last], "reference": messages[last].get("content", "")})
    return prompts


def records_with_lines(path: Path):
    """(line, record bytes) of a .jsonl file (its non-blank lines as they are, streamed) or a .json array (each
    element, at the line where it starts): the same line numbers the loader gives its conversations."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not head.startswith("["):
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = (raw[3:] if number == 1 and raw.startswith(b"\xef\xbb\xbf") else raw).rstrip(b"\r\n")
                if line.strip():
                    yield number, line
        return
    text = path.read_text(encoding="utf-8-sig")
    decoder, i, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        line += text.count("\n", counted, i)  # newlines between the last element's start and this one's
        counted = i
        obj, end = decoder.raw_decode(text, i)
        yield line, json.dumps(obj, ensure_ascii=False).encode("utf-8")
        i = end

