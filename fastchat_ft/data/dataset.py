"""ChatDataset: files -> tokenized conversations (cached on disk, memory-mapped, each with its source file and
line) -> best-fit-decreasing packed examples, deterministic by seed and epoch, with a sharded view that gives
every rank the same count. Does not know about torch (see collate.py)."""
from __future__ import annotations

import hashlib
from array import array
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from fastchat_ft import _native
from fastchat_ft.errors import ConfigError, DataError
from fastchat_ft.data.encode import NO_LABEL, ChatOptions, LoaderStats, process_batch, record_error
from fastchat_ft.data.tokenize import LoaderTokenizer
from fastchat_ft.data.validate import reader_error

CACHE_VERSION = "chat-v4"  # bump when the on-disk layout, the encoding rules or the key's inputs change
BATCH_RECORDS = 1024  # records per native reader batch: the window that bounds the build's memory
REJECTS_FILE = "rejects.jsonl"  # on_error: skip: a build writes its rejects here, in the build (cache) folder


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTCHAT_FT_CACHE", Path.home() / ".cache" / "fastchat-ft")) / "data"


def default_rejects_path(paths: list[Path]) -> Path:
    """Where on_error: skip lists the bad records unless told otherwise: beside the first input."""
    return paths[0].with_suffix(".rejects.jsonl")


class ChatDataset:
    """Iterates dicts of numpy arrays: input_ids, labels (-100 = not trained), position_ids (restart at 0 for
    each packed conversation) and seq_lens, plus `sources`: a list of "file:line" strings, one per packed
    conversation in seq_lens order (line: 1-based line of a JSONL record, or where a JSON array element starts;
    strings, not tuples, so rows still convert to Arrow for `datasets` / TRL).
    With packing=False each item is one conversation.

    paths: .jsonl / .json files (OpenAI messages or ShareGPT, detected per record). tokenizer: a path, a
    fastchat_ft.tokenizer.Tokenizer, tokenizers.Tokenizer or a transformers fast tokenizer.
    on_error: "raise" (default; the error names file:line:column and a fix) or "skip" (bad records are written
    with their reasons to `rejects_path`, default <first file>.rejects.jsonl, and counted in stats; a cache hit
    writes them again from the cache entry). When the default place cannot be written (a read-only dataset
    folder), they stay in the cache entry (or a temporary file with cache=False), `rejects_path` names where,
    and stderr says so; an explicit `rejects_path` that cannot be written is a DataError.
    digest: path -> the file's sha256, for the cache key (default: file_digest). The engine passes one that keeps
    each hash (RunData.digests) for its run manifest and resume fingerprint: one read of each file a start.
    """

    def __init__(self, paths, tokenizer, template: str = "chatml", max_seq_len: int = 2048, packing: bool = True,
                 seed: int = 0, *, train_on: str = "assistant", overlong: str = "drop", think: str = "keep",
                 system_prompt: str | None = None, allow_special_in_content: bool = False, on_error: str = "raise",
                 rejects_path: str | os.PathLike | None = None, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None, threads: int = 0, self_check: int = 1000,
                 verbose: bool = True, digest=None):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        if not max_seq_len >= 1:  # the native reader's byte cap is max_seq_len * bytes per token: a TypeError below 0
            raise ConfigError(f"max_seq_len must be at least 1 token, got {max_seq_len}", field="max_seq_len",
                              fix="pass max_seq_len (sequence_len in a config, --max-seq-len on the command line) "
                                  "of 1 or more, e.g. 2048")
        self.tokenizer = LoaderTokenizer.from_any(tokenizer)
        self.options = ChatOptions(template=template, train_on=train_on, think=think,
                                   system_prompt=system_prompt or "",
                                   allow_special_in_content=allow_special_in_content,
                                   max_seq_len=max_seq_len, overlong=overlong)
        self.packing, self.seed, self.epoch = packing, seed, 0
        self.on_error, self.threads, self.self_check_budget = on_error, threads, self_check
        self._rejects_explicit = bool(rejects_path)
        self.rejects_path = Path(rejects_path) if rejects_path else default_rejects_path(self.paths)
        self.stats = LoaderStats()
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        entry = None
        if cache:  # hashing reads every input file once; worth it only when the cache is used
            entry = folder / self._cache_key(digest or file_digest)
        if entry is not None and (entry / "stats.json").is_file():
            self._load(entry)
            if self.on_error == "skip" and self.stats.errors:
                self._publish_rejects(entry, keep=True)
        else:
            self._build(entry, folder)
        self._pack()
        if verbose:
            layout = (f"packed into {self.stats.bins} sequences of {max_seq_len}, efficiency "
                      f"{self.stats.packing_efficiency:.2%}" if packing else
                      f"not packed: {self.stats.bins} sequences, one conversation each")
            print(f"fastchat-ft data: {self.stats.summary()}; {layout}", file=sys.stderr)
            if self.stats.self_check_failed or self.stats.inexact:
                for line in self.stats.examples:
                    print(f"  {line}", file=sys.stderr)

    # ------------------------------------------------------------------------------------- build
    def _cache_key(self, digest) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(CACHE_VERSION.encode())
        h.update(_native.__version__.encode())
        for p in self.paths:
            # the file's sha256, not its bytes: a training run needs that hash anyway (its manifest, the resume
            # fingerprint), so it reads each file once. chat-v3 keys hashed the bytes; the new version makes
            # every earlier entry a miss (rebuilt, never misread).
            h.update(f"{p.name}\0sha256:{digest(p)}".encode())
        h.update(self.tokenizer.fingerprint.encode())
        h.update(repr(self.options).encode())
        h.update(f"{self.on_error}".encode())
        return h.hexdigest()

    def _build(self, entry: Path | None, folder: Path) -> None:
        """Streams every batch's tokens straight to ids.bin / labels.bin (in the cache entry being built, or in
        a private temporary folder when cache=False), so memory holds one reader batch plus 12 bytes per kept
        conversation (its length and offset), never the token arrays of the whole file."""
        opts, tok = self.options, self.tokenizer
        kwargs = opts.native_kwargs(tok)
        jinja = None
        if opts.template == "tokenizer":
            from fastchat_ft.data.jinja import JinjaBatchEncoder
            jinja = JinjaBatchEncoder(tok, opts)
        # Built beside the cache even when cache=False (/tmp is often a RAM-backed tmpfs); the system temporary
        # folder only when the cache folder cannot be written.
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder))
        except OSError:
            if entry is not None:
                raise
            tmp = Path(tempfile.mkdtemp(prefix="fastchat-ft-building-"))
        lengths = array("I")  # 4 bytes per conversation, not a Python int each
        source_files, source_lines = array("i"), array("i")  # where each kept conversation came from
        ids_file = open(tmp / "ids.bin", "wb")
        labels_file = open(tmp / "labels.bin", "wb")
        rejects = None
        budget = self.self_check_budget

        def reject(path, line, column, field, reason, fix, raw):
            nonlocal rejects
            self.stats.errors += 1
            self.stats.records += 1
            if rejects is None:  # in the build folder (always writable); published to rejects_path at the end
                rejects = open(tmp / REJECTS_FILE, "w", encoding="utf-8")
            rejects.write(json.dumps({"file": str(path), "line": line, "column": column, "field": field,
                                      "reason": reason, "fix": fix, "raw": raw.decode("utf-8", "replace")},
                                     ensure_ascii=False) + "\n")

        try:
            for file_index, path in enumerate(self.paths):
                try:
                    reader = _native.ChatReader(str(path), threads=self.threads, batch_records=BATCH_RECORDS,
                                                **kwargs)
                except ValueError as e:  # "line:column: reason": a broken JSON array file, or line 0: unreadable
                    line, col, reason = _split_position(str(e))
                    if not line:  # the file itself (missing, a folder, no permission), not a place in it
                        raise DataError(reason, file=str(path), fix="check the path (a relative one is read from the "
                                        "current folder) and that the file is readable") from None
                    raise reader_error(path, line, col, reason) from None
                while (batch := reader.next_batch()) is not None:
                    for err in batch["errors"]:
                        if self.on_error == "raise":
                            raise record_error(err, str(path))
                        reject(path, err["line"], err["column"], err["field"], err["reason"], err["fix"], err["raw"])
                    kept_lines = []
                    reported = len(self.stats.examples)
                    if jinja is not None:
                        kept, budget = jinja.process(
                            batch, self.stats, budget, str(path), self.on_error,
                            lambda line, e, raw, path=path: reject(path, line, None, e.field, e.reason, e.fix, raw),
                            kept_lines=kept_lines)
                    else:
                        kept, budget = process_batch(batch, tok, opts, self.stats, check_budget=budget,
                                                     kept_lines=kept_lines)
                    _name_file(self.stats.examples, reported, path)
                    source_lines.extend(kept_lines)
                    source_files.extend([file_index] * len(kept_lines))
                    for ids, labels in kept:
                        lengths.append(len(ids))
                        ids.tofile(ids_file)
                        labels.tofile(labels_file)
                    del batch, kept
        except BaseException:
            ids_file.close()  # a failed build leaves nothing half-written behind
            labels_file.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if rejects:
                rejects.close()
        ids_file.close()
        labels_file.close()
        if self.stats.conversations == 0:
            try:  # every record may have been rejected: the list says why
                self._publish_rejects(tmp, keep=False)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"no trainable conversation in {', '.join(map(str, self.paths))}: {self.stats.summary()}",
                            fix="check the roles (assistant turns are trained), weights and max_seq_len")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(lengths, dtype=np.uint32), out=offsets[1:])
        del lengths
        np.save(tmp / "offsets.npy", offsets)
        sources = np.empty((len(source_lines), 2), dtype=np.int32)
        sources[:, 0], sources[:, 1] = np.frombuffer(source_files, np.int32), np.frombuffer(source_lines, np.int32)
        del source_files, source_lines
        np.save(tmp / "sources.npy", sources)  # row i: (index into paths, line) of conversation i
        del sources
        (tmp / "stats.json").write_text(json.dumps({k: v for k, v in self.stats.__dict__.items()}))
        if entry is None:
            # Map the files, then unlink them: the mapping keeps the data reachable and nothing is left on disk.
            self._load(tmp, keep_stats=True)
            try:
                self._publish_rejects(tmp, keep=False)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self.cache_entry = None
            return
        try:
            os.replace(tmp, entry)  # atomic publish; a concurrent builder may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        self._load(entry if (entry / "stats.json").is_file() else tmp, keep_stats=True)
        self._publish_rejects(self.cache_entry, keep=True)

    def _publish_rejects(self, folder: Path, keep: bool) -> None:
        """Copies the rejects a build left in `folder` to rejects_path (atomically). Input folders need not be
        writable: when the default place beside the first input is not, the rejects stay where they are (keep:
        the cache entry, which lasts) or go to a temporary file, and rejects_path is updated to say where."""
        src = folder / REJECTS_FILE
        if not src.is_file():
            return
        try:
            _copy_atomically(src, self.rejects_path)
            return
        except OSError as e:
            why = f"{self.rejects_path} cannot be written ({e.strerror or e})"
        if self._rejects_explicit:
            raise DataError(f"on_error: skip: {why}", file=str(self.rejects_path),
                            fix="pass a rejects_path in a writable folder") from None
        dest = src
        if not keep:
            try:
                fd, name = tempfile.mkstemp(prefix="fastchat-ft-", suffix=".rejects.jsonl")
                os.close(fd)
                _copy_atomically(src, Path(name))
                dest = Path(name)
            except OSError as e:
                raise DataError(f"on_error: skip: {why}, nor can a temporary file ({e.strerror or e})",
                                file=str(self.rejects_path),
                                fix="make the data folder or TMPDIR writable, or pass a writable rejects_path") from None
        print(f"fastchat-ft data: {why}; the rejected records are listed in {dest}", file=sys.stderr)
        self.rejects_path = dest

    def _load(self, entry: Path, keep_stats: bool = False) -> None:
        self.offsets = np.load(entry / "offsets.npy")
        total = int(self.offsets[-1])
        # Raw int32 files read through memory maps: the OS pages in only what a batch touches.
        self.ids = np.memmap(entry / "ids.bin", dtype=np.int32, mode="r", shape=(total,))
        self.labels = np.memmap(entry / "labels.bin", dtype=np.int32, mode="r", shape=(total,))
        self.sources = np.load(entry / "sources.npy", mmap_mode="r")
        if len(self.sources) != len(self.offsets) - 1:
            raise DataError(f"the cache entry {entry} is inconsistent ({len(self.sources)} sources for "
                            f"{len(self.offsets) - 1} conversations)", fix=f"delete {entry} (it is rebuilt)")
        if not keep_stats:
            saved = json.loads((entry / "stats.json").read_text())
            self.stats = LoaderStats(**{k: v for k, v in saved.items() if k in LoaderStats.__dataclass_fields__})
        self.cache_entry = entry

    # ------------------------------------------------------------------------------------ packing
    def _pack(self) -> None:
        """Packs from the lengths alone; bins are two flat arrays (members, bin offsets), not one object each."""
        lengths = np.diff(self.offsets)
        if self.packing:
            members, bin_offsets = _native.pack_bfd(lengths.astype(np.uint32), self.options.max_seq_len, self.seed)
            self._members = np.asarray(members, dtype=np.uint32)
            self._bin_offsets = np.asarray(bin_offsets, dtype=np.int64)
        else:
            self._members = np.arange(len(lengths), dtype=np.uint32)
            self._bin_offsets = np.arange(len(lengths) + 1, dtype=np.int64)
        n_bins = len(self._bin_offsets) - 1
        self.stats.bins = n_bins
        slots = n_bins * self.options.max_seq_len
        self.stats.packing_efficiency = float(lengths.sum()) / slots if self.packing and slots else 0.0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self))

    def set_epoch(self, epoch: int) -> None:
        """Reshuffles the packed sequences deterministically for this (seed, epoch)."""
        self.epoch = epoch
        self._order = self._epoch_order()

    # ---------------------------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return len(self._bin_offsets) - 1

    def source(self, conversation: int) -> str:
        """"file:line" of conversation `conversation` (in build order, as in offsets)."""
        file_index, line = self.sources[conversation]
        return f"{self.paths[int(file_index)]}:{int(line)}"

    def _row_sources(self, members: np.ndarray) -> list[str]:
        names = [str(p) for p in self.paths]
        return [f"{names[f]}:{line}" for f, line in self.sources[members].tolist()]

    def __getitem__(self, index: int) -> dict:
        b = int(self._order[index])
        members = self._members[self._bin_offsets[b]:self._bin_offsets[b + 1]]
        ids, labels, positions, seq_lens = [], [], [], []
        sources = self._row_sources(members)
        for m in members:
            a, b = int(self.offsets[m]), int(self.offsets[m + 1])
            ids.append(self.ids[a:b])
            lab = np.array(self.labels[a:b], dtype=np.int32)
            lab[0] = NO_LABEL  # never train a conversation's first token to follow the previous one
            labels.append(lab)
            positions.append(np.arange(b - a, dtype=np.int32))
            seq_lens.append(b - a)
        return {"input_ids": np.concatenate(ids).astype(np.int32), "labels": np.concatenate(labels),
                "position_ids": np.concatenate(positions), "seq_lens": np.asarray(seq_lens, dtype=np.int32),
                "sources": sources}

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def shard(self, rank: int, world_size: int) -> "ShardView":
        return ShardView(self, rank, world_size)


class ShardView:
    """Rank `rank` of `world_size`: items rank, rank + world_size, ... of the epoch order, cut to the same
    count on every rank (the few leftover sequences are skipped this epoch and counted in stats)."""

    def __init__(self, dataset: ChatDataset, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(dataset) < world_size:
            raise DataError(f"only {len(dataset)} packed sequences for {world_size} ranks",
                            fix="add data, lower max_seq_len, or use fewer ranks")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        dataset.stats.dropped_for_ranks = len(dataset) % world_size

    def __len__(self) -> int:
        return len(self.dataset) // self.world_size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[index * self.world_size + self.rank]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    @property
    def stats(self) -> LoaderStats:
        return self.dataset.stats


def _name_file(examples: list, start: int, path: Path) -> None:
    """The loader's report lines from `start` on say "line N: ..."; name the file too ("file:N: ...")."""
    for i in range(start, len(examples)):
        if examples[i].startswith("line "):
            line, _, rest = examples[i][5:].partition(": ")
            examples[i] = f"{path}:{line}: {rest}"


def _copy_atomically(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:  # never created (e.g. the folder is not writable)
            pass
        raise


def file_digest(path) -> str:
    """The sha256 of a file (hex), read in 256 KiB blocks: the loader's memory bound (about one reader batch)
    holds while it hashes its inputs for the cache key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 18), b""):
            h.update(block)
    return h.hexdigest()


def _split_position(message: str):
    head, _, reason = message.partition(": ")
    line, _, col = head.partition(":")
    try:
        return int(line), int(col), reason
    except ValueError:
        return None, None, message
