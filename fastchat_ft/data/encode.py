"""Rendered batches -> per-conversation (input_ids, labels): tokenization (native in C++, or HF here),
over-length handling at turn boundaries, the mask self-check, and the counters users see (LoaderStats).
`encode_chat` is the one-conversation entry point."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from fastchat_ft import _native
from fastchat_ft.errors import DataError
from fastchat_ft.data.tokenize import LoaderTokenizer

BUILTIN_TEMPLATES = ("chatml", "llama3", "llama2", "mistral", "alpaca")
NO_LABEL = -100


@dataclass(frozen=True)
class ChatOptions:
    template: str = "chatml"
    train_on: str = "assistant"            # assistant | all | last_assistant
    think: str = "keep"                    # keep | strip_history (drop <think> blocks of past assistant turns)
    system_prompt: str = ""                # default system turn when a conversation has none
    allow_special_in_content: bool = False  # True: HF behaviour, special-token text in content is a control token
    max_seq_len: int = 2048
    overlong: str = "drop"                 # drop | truncate (at the last turn boundary that fits)

    def __post_init__(self):
        if self.train_on not in ("assistant", "all", "last_assistant"):
            raise ValueError(f"train_on must be assistant, all or last_assistant, not {self.train_on!r}")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', not {self.overlong!r}")
        if self.think not in ("keep", "strip_history"):
            raise ValueError(f"think must be 'keep' or 'strip_history', not {self.think!r}")
        if self.template not in BUILTIN_TEMPLATES + ("tokenizer",):
            raise ValueError(f"unknown template {self.template!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}, "
                             "or 'tokenizer' for the model's own chat_template")

    def native_kwargs(self, tok: LoaderTokenizer, limit_length: bool = True) -> dict:
        """Arguments for _native.ChatReader / process_records; BOS/EOS strings come from the tokenizer."""
        bos = eos = ""
        if self.template in ("llama2", "mistral", "llama3") and tok.bos_token:
            bos = tok.bos_token
        if self.template in ("llama2", "mistral", "alpaca") and tok.eos_token:
            eos = tok.eos_token
        if self.template == "tokenizer":  # natively: parse + validate only; jinja.py renders in Python
            return dict(template="chatml", keep_raw=True)
        kwargs = dict(template=self.template, train_on=self.train_on, think=self.think,
                      default_system=self.system_prompt, bos=bos, eos=eos,
                      allow_special=self.allow_special_in_content)
        if limit_length:  # text that cannot fit is cut (truncate) or dropped before it is tokenized
            kwargs["max_text_bytes"] = self.max_seq_len * tok.max_token_bytes
            kwargs["truncate_overlong"] = self.overlong == "truncate"
        if tok.native is not None:  # the C++ side tokenizes and labels; otherwise it only renders
            kwargs["tokenizer"] = tok.native
        return kwargs


@dataclass
class LoaderStats:
    """What happened to every record: nothing is dropped or masked without being counted here."""
    records: int = 0
    conversations: int = 0              # kept
    errors: int = 0                     # bad records skipped (on_error="skip")
    dropped_overlong: int = 0
    truncated: int = 0
    dropped_no_trainable: int = 0       # no trainable token (e.g. no assistant turn, or all weight 0)
    inexact: int = 0                    # a token straddles a trainable-span boundary (trained, but reported)
    self_checked: int = 0
    self_check_failed: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    bins: int = 0
    packing_efficiency: float = 0.0
    dropped_for_ranks: int = 0          # bins left out so every rank gets the same count
    examples: list = field(default_factory=list)  # a few messages about inexact / failed conversations

    def add(self, other: "LoaderStats") -> None:
        for k, v in asdict(other).items():
            if isinstance(v, int) and k not in ("bins",):
                setattr(self, k, getattr(self, k) + v)
        self.examples.extend(other.examples[: max(0, 10 - len(self.examples))])

    def summary(self) -> str:
        return (f"{self.conversations} conversations kept of {self.records} records "
                f"({self.errors} bad, {self.dropped_overlong} over-long dropped, {self.truncated} truncated, "
                f"{self.dropped_no_trainable} with nothing to train, {self.inexact} inexact masks); "
                f"{self.tokens} tokens, {self.trainable_tokens} trainable; self-check "
                f"{self.self_checked - self.self_check_failed}/{self.self_checked} ok")


def encode_batch(batch: dict, tok: LoaderTokenizer, opts: ChatOptions):
    """One processed batch (from _native) -> list, per ok record, of (ids, labels, turn_token_ends, flags)."""
    ok = np.flatnonzero(batch["ok"])
    cc = np.concatenate([[0], np.cumsum(batch["control_counts"])])
    tc = np.concatenate([[0], np.cumsum(batch["train_counts"])])
    uc = np.concatenate([[0], np.cumsum(batch["turn_counts"])])
    out = []
    if "ids" in batch:  # tokenized natively (over-long ones come back with no tokens and flag 4)
        kc = np.concatenate([[0], np.cumsum(batch["token_counts"])])
        for i in ok:
            out.append((batch["ids"][kc[i]:kc[i + 1]], batch["labels"][kc[i]:kc[i + 1]],
                        batch["turn_token_ends"][uc[i]:uc[i + 1]], int(batch["flags"][i])))
        return out
    ok = [i for i in ok if not batch["flags"][i] & 4]  # certainly over-long: not worth tokenizing
    texts = [batch["texts"][i] for i in ok]
    controls = [batch["control"][cc[i]:cc[i + 1]] for i in ok]
    encs = tok.encode_rendered_hf(texts, controls, opts.allow_special_in_content)
    for i, (ids, starts, ends) in zip(ok, encs):
        labels, flags = _native.label_tokens(ids, starts, ends, batch["train"][tc[i]:tc[i + 1]])
        tte = _native.turn_token_ends(ends, batch["turn_ends"][uc[i]:uc[i + 1]])
        out.append((ids, labels, tte, int(flags)))
    return out


def finalize(ids, labels, turn_token_ends, flags, opts: ChatOptions, stats: LoaderStats):
    """Applies the over-length policy and the nothing-to-train rule; returns (ids, labels) or None (dropped)."""
    if flags & 4:
        stats.dropped_overlong += 1
        return None
    if flags & 2 or not (labels != NO_LABEL).any():
        stats.dropped_no_trainable += 1
        return None
    if len(ids) > opts.max_seq_len:
        if opts.overlong == "drop":
            stats.dropped_overlong += 1
            return None
        # Whole turns up to the last one that fits and trains: the C++ rule validate and analyze use too.
        cut = _native.truncation_cut(labels, turn_token_ends, opts.max_seq_len)
        if cut == 0:
            stats.dropped_overlong += 1
            return None
        ids, labels = ids[:cut], labels[:cut]
        stats.truncated += 1
    if flags & 1:
        stats.inexact += 1
    return np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(labels, dtype=np.int32)


def self_check(ids, labels, text: str, spans, tok: LoaderTokenizer) -> str | None:
    """Decoded runs of trainable tokens must equal the trainable spans of the rendered text (assistant content
    plus end-of-turn), whitespace-normalised; returns a message on mismatch."""
    mask = labels != NO_LABEL
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    raw = text.encode("utf-8")
    wanted = [raw[int(b):int(e)].decode("utf-8", "replace") for b, e, _ in spans]
    # Adjacent spans with no untrained token between them decode as one run.
    if len(runs) != len(wanted):
        joined = "".join(wanted)
        got = "".join(tok.decode(ids[a:b]) for a, b in runs)
        if " ".join(got.split()) == " ".join(joined.split()):
            return None
        return f"{len(runs)} trained runs for {len(wanted)} trainable spans"
    for (a, b), want in zip(runs, wanted):
        got = tok.decode(ids[a:b])
        if " ".join(got.split()) != " ".join(want.split()):
            return f"trained tokens decode to {got[:80]!r}, expected {want[:80]!r}"
    return None


def process_batch(batch: dict, tok: LoaderTokenizer, opts: ChatOptions, stats: LoaderStats, *, check_budget: int = 0,
                  kept_lines: list | None = None):
    """encode_batch + finalize + self-check on the first `check_budget` conversations; returns kept pairs (and
    appends each kept one's source line to `kept_lines` when given)."""
    kept = []
    ok = np.flatnonzero(batch["ok"])
    tc = np.concatenate([[0], np.cumsum(batch["train_counts"])])
    encoded = encode_batch(batch, tok, opts)
    if "ids" not in batch:  # HF path: over-long records were not encoded; count them here
        for i in ok:
            if batch["flags"][i] & 4:
                stats.records += 1
                stats.dropped_overlong += 1
        ok = [i for i in ok if not batch["flags"][i] & 4]
    for i, (ids, labels, tte, flags) in zip(ok, encoded):
        stats.records += 1
        if check_budget > 0 and not flags & 5 and batch["texts"][i] is not None:
            check_budget -= 1
            stats.self_checked += 1
            problem = self_check(ids, labels, batch["texts"][i], batch["train"][tc[i]:tc[i + 1]], tok)
            if problem:
                stats.self_check_failed += 1
                if len(stats.examples) < 10:
                    stats.examples.append(f"line {int(batch['lines'][i])}: {problem}")
        elif flags & 1 and len(stats.examples) < 10:
            stats.examples.append(f"line {int(batch['lines'][i])}: a token straddles a trainable-span boundary")
        result = finalize(ids, labels, tte, flags, opts, stats)
        if result is None:
            continue
        stats.conversations += 1
        stats.tokens += len(result[0])
        stats.trainable_tokens += int((result[1] != NO_LABEL).sum())
        kept.append(result)
        if kept_lines is not None:
            kept_lines.append(int(batch["lines"][i]))
    return kept, check_budget


def record_error(err: dict, file: str | None) -> DataError:
    return DataError(err["reason"], file=file, line=err["line"], column=err["column"] or None,
                     field=err["field"] or None, fix=err["fix"] or None)


def encode_chat(messages, tokenizer, template: str = "chatml", tools=None, **options):
    """One conversation -> (input_ids int32, labels int32) with -100 on untrained tokens. `messages` is an
    OpenAI-style list of {"role", "content"} dicts (ShareGPT {"from", "value"} works too); options as
    ChatOptions (train_on, think, system_prompt, allow_special_in_content)."""
    tok = LoaderTokenizer.from_any(tokenizer)
    opts = ChatOptions(template=template, **options)
    record = {"messages": messages}
    if tools:
        record["tools"] = tools
    if template == "tokenizer":
        from fastchat_ft.data.jinja import encode_with_chat_template
        return encode_with_chat_template(record, tok, opts)
    kwargs = opts.native_kwargs(tok, limit_length=False)
    batch = _native.process_records([json.dumps(record, ensure_ascii=False)], threads=1, **kwargs)
    if batch["errors"]:
        raise record_error(batch["errors"][0], None)
    (ids, labels, _, flags), = encode_batch(batch, tok, opts)
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)
