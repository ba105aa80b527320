"""`fastchat-ft eval`: loss, perplexity and token accuracy on the trainable (assistant) tokens of a ChatML file,
optionally beside a baseline model, and a Markdown report of sample generations with a memorisation check.

Metrics come from the engine's own validation code (`engine.validation.evaluate`, the fused CE that never
builds full-vocab logits) on rows tokenized and masked by the native loader (`fastchat_ft.data`), so eval
measures exactly what training optimised. This module owns the command, the comparison and the report.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from fastchat_ft import flags
from fastchat_ft.atomic import write_text_atomic
from fastchat_ft.config import TEMPLATES
from fastchat_ft.errors import ConfigError, DataError
from fastchat_ft.export_artifacts import prompts_from, read_conversations, split_files
from fastchat_ft.inference import ChatStream, LoadedModel, ModelSource, load_model, resolve_model

EVAL_ROWS_PER_BATCH = 4


def run_eval(args) -> int:
    data = flags.input_file(Path(args.data).expanduser(), "--data")
    source = resolve_model(args.model)  # no weights read yet: the checks below need only where the run is
    if args.baseline:
        resolve_model(args.baseline)  # a wrong --baseline path is reported before the model's metrics are computed
    run_dir = source.run_dir or _run_of(source.path)
    train_file, report = check_eval_args(args, data, run_dir, source)
    model = load_model(args.model)
    template = eval_template(args, model)
    options = eval_loader_options(model)  # the run's, for the baseline too: both read the same conversations
    max_seq_len, max_seq_len_from = eval_max_seq_len(args, model)
    results = {"data": str(data), "template": template, "max_seq_len": max_seq_len,
               "max_seq_len_from": max_seq_len_from,
               "model": {"path": str(model.source.path),
                         **metrics_of(model, data, template, max_seq_len, options)}}
    baseline = None
    if args.baseline:
        baseline = load_model(args.baseline)
        results["baseline"] = {"path": str(baseline.source.path),
                               **metrics_of(baseline, data, template, max_seq_len, options)}
        results["improvement"] = improvement(results["model"], results["baseline"])
    if args.samples:
        write_samples_report(report, model, baseline, data, args.samples, results, train_file=train_file,
                             max_new_tokens=getattr(args, "max_new_tokens", 256), run_dir=run_dir)
        results["samples_report"] = str(report)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    return 0


def check_eval_args(args, data: Path, run_dir: Path | None, source: ModelSource) -> tuple[Path | None, Path | None]:
    """The flag values, before any model loads or sample is generated: (training file of the memorisation check,
    report path; None without --samples)."""
    flags.at_least(args, {"max_seq_len": 1, "samples": 0, "max_new_tokens": 1})
    if args.template is not None and args.template not in TEMPLATES:  # else a ValueError after the model loaded
        raise ConfigError(f"unknown template {args.template!r}", field="--template",
                          fix=f"pass one of {', '.join(TEMPLATES)}, or leave it out for the run's own template")
    given = getattr(args, "train_data", None)
    if given is not None:  # a silent "no training file found" would read as a check that found nothing
        flags.input_file(Path(given).expanduser(), "--train-data",
                         "give the ChatML file the model was trained on, or leave --train-data out for the run's "
                         "own train split")
    if not args.samples:  # the memorisation check and the report belong to --samples alone
        return None, None
    train_file = Path(given).expanduser() if given else split_files(run_dir).get("train")
    if given:  # the reader is lenient (it skips lines it cannot parse): a file it gets nothing from is no help
        try:
            readable = bool(read_conversations(train_file, limit=1))
        except (ValueError, UnicodeDecodeError):  # a broken JSON array, or not text at all
            readable = False
        if not readable:
            raise DataError("no conversation could be read from the training data file", file=str(given),
                            field="--train-data", fix="give the ChatML .jsonl/.json file the model was trained on "
                                                      "(check it with `fastchat-ft validate`)")
    report = Path(getattr(args, "report", None) or f"eval-samples-{_slug(source)}.md")
    flags.output_file(report, "--report", inputs=[data, train_file])
    return train_file, report


def eval_template(args, model: LoadedModel) -> str:
    """--template, else the run's training template, else the model's own chat template."""
    if args.template:
        return args.template
    conf = _training_config(model)
    if conf is not None:
        return conf.get("chat_template") or "chatml"  # the training config's default template
    return "tokenizer"


def _training_config(model: LoadedModel) -> dict | None:
    """The training_config.yaml of the run the model comes from, or None for a model that is not a run."""
    run_dir = model.source.run_dir or _run_of(model.source.path)
    if run_dir and (run_dir / "training_config.yaml").is_file():
        import yaml
        return yaml.safe_load((run_dir / "training_config.yaml").read_text()) or {}
    return None


def _run_of(path: Path) -> Path | None:
    for parent in (path.parent, path.parent.parent):
        if (parent / "training_config.yaml").is_file():
            return parent
    return None


def _slug(source: ModelSource) -> str:
    p = source.run_dir or source.path
    return p.name or "model"


# training config key -> ChatDataset keyword, for the loader options that change how a conversation is tokenized
# or whether it is kept; train_on is not one of them: eval measures the assistant turns, whatever training trained
RUN_LOADER_OPTIONS = {"think": "think", "allow_special_in_content": "allow_special_in_content",
                      "excess_length_strategy": "overlong"}


def eval_max_seq_len(args, model: LoadedModel) -> tuple[int, str]:
    """(length, where it came from): --max-seq-len, else the run's sequence_len (its validation left out the
    conversations over it, so eval keeping them reported another loss than the run's), else 2048."""
    if args.max_seq_len is not None:
        return args.max_seq_len, "--max-seq-len"
    conf = _training_config(model) or {}
    if conf.get("sequence_len") is not None:
        return int(conf["sequence_len"]), "the run's sequence_len"
    return 2048, "default"


def eval_loader_options(model: LoadedModel) -> dict:
    """The run's loader options, so eval reads the file as the run's validation did (a `think: strip_history` run
    is not measured on the <think> blocks it never saw; a `truncate` run keeps what it truncated)."""
    conf = _training_config(model) or {}
    return {kw: conf[key] for key, kw in RUN_LOADER_OPTIONS.items() if conf.get(key) is not None}


def eval_system_prompt(model: LoadedModel, template: str) -> str | None:
    """The system prompt conversations without one are evaluated with: the training run's `system_prompt` when it
    set one, else the default of the model's own template (what training and inference add; template_defaults)."""
    conf = _training_config(model) or {}
    if conf.get("system_prompt") is not None:
        return conf["system_prompt"]
    from fastchat_ft.data.template_defaults import model_default_system

    return model_default_system(str(model.source.tokenizer_dir), template)


def encode_rows(data: Path, tokenizer_dir: Path, template: str, max_seq_len: int,
                system_prompt: str | None = None, options: dict | None = None) -> tuple[list[dict], dict]:
    """Tokenized, masked rows of the eval file from the native loader (the training data path, unpacked so a
    row is one conversation)."""
    from fastchat_ft.data import ChatDataset

    # cache=False: eval files are small and an eval should not write into the user's cache
    try:
        ds = ChatDataset([str(data)], str(tokenizer_dir), template=template, max_seq_len=max_seq_len,
                         packing=False, seed=0, cache=False, system_prompt=system_prompt, **(options or {}))
    except ImportError as e:  # a template whose renderer is not available in this install
        raise DataError(f"cannot render template {template!r} here ({e})", field="--template",
                        fix="pass --template with a built-in template: chatml, llama3, llama2, mistral, alpaca") from None
    rows = [dict(r) for r in ds]
    stats = getattr(ds, "stats", None)
    stats = stats if isinstance(stats, dict) else (vars(stats) if stats is not None and hasattr(stats, "__dict__")
                                                   else {})
    if not rows:
        raise DataError("no conversation of the eval file could be used", file=str(data),
                        fix="check it with `fastchat-ft validate` (and --max-seq-len)")
    return rows, stats


def metrics_of(loaded: LoadedModel, data: Path, template: str, max_seq_len: int,
               options: dict | None = None) -> dict:
    """Token-weighted loss / ppl / accuracy over every trainable token, one small batch in memory at a time."""
    from fastchat_ft.engine.data import eval_batches
    from fastchat_ft.engine.validation import evaluate

    rows, stats = encode_rows(data, loaded.source.tokenizer_dir, template, max_seq_len,
                              eval_system_prompt(loaded, template), options)
    result = evaluate(loaded.model, eval_batches(rows, EVAL_ROWS_PER_BATCH))
    if result.n_tokens == 0:
        raise DataError("the eval file has no trainable (assistant) tokens", file=str(data),
                        fix="eval measures the assistant turns: check the roles with `fastchat-ft validate`")
    out = {k: v for k, v in asdict(result).items()}
    dropped = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and v and any(
        w in k for w in ("drop", "truncat", "inexact", "skip", "reject", "bad"))}
    if dropped:
        out["loader"] = dropped
    return out


def improvement(model: dict, base: dict) -> dict:
    return {"loss": model["loss"] - base["loss"],
            "loss_relative": (model["loss"] - base["loss"]) / base["loss"] if base["loss"] else float("nan"),
            "ppl_relative": (model["ppl"] - base["ppl"]) / base["ppl"] if base["ppl"] else float("nan"),
            "token_acc_points": 100.0 * (model["token_acc"] - base["token_acc"])}


def format_table(results: dict) -> str:
    m, b, imp = results["model"], results.get("baseline"), results.get("improvement")
    head = f"{'':16}{'model':>14}" + (f"{'baseline':>14}{'change':>22}" if b else "")
    lines = [f"eval on {results['data']} ({m['n_sequences']} conversations, {m['n_tokens']} trainable tokens, "
             f"template {results['template']}, max_seq_len {results['max_seq_len']} "
             f"({results['max_seq_len_from']}))", head]

    def row(label, key, fmt, change=""):
        line = f"{label:16}{fmt(m[key]):>14}"
        return line + (f"{fmt(b[key]):>14}{change:>22}" if b else "")

    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    lines.append(row("loss", "loss", lambda v: f"{v:.4f}",
                     f"{imp['loss']:+.4f} ({100 * imp['loss_relative']:+.1f}%)" if b else ""))
    lines.append(row("perplexity", "ppl", lambda v: f"{v:.3f}", f"{100 * imp['ppl_relative']:+.1f}%" if b else ""))
    lines.append(row("token accuracy", "token_acc", pct, f"{imp['token_acc_points']:+.2f} pts" if b else ""))
    if b and b["n_tokens"] != m["n_tokens"]:
        lines.append(f"note: the baseline's tokenizer gives {b['n_tokens']} trainable tokens, the model's "
                     f"{m['n_tokens']}: per-token numbers are not strictly comparable")
    for name in ("model", "baseline"):
        if results.get(name, {}).get("loader"):
            lines.append(f"{name}: loader left out conversations: {results[name]['loader']}")
    if results.get("samples_report"):
        lines.append(f"samples: {results['samples_report']}")
    return "\n".join(lines)


# ---- samples report and memorisation check -------------------------------------------------------------

def _words(text: str) -> list[str]:
    return text.lower().split()


class TrainingAnswers:
    """Word sequences of the training answers with a bigram index, so the longest shared n-gram of a reply is
    found by comparing it only with answers that share at least one bigram with it."""

    def __init__(self, answers: list[str]):
        self.answers = [_words(a) for a in answers]
        self.prompts: set[str] = set()
        self.vocab = {w for a in self.answers for w in a}
        self.index: dict[tuple, set[int]] = {}
        for i, words in enumerate(self.answers):
            for bg in zip(words, words[1:]):
                self.index.setdefault(bg, set()).add(i)

    @classmethod
    def from_file(cls, path: Path, run_dir: Path | None = None) -> "TrainingAnswers":
        from fastchat_ft.engine.rundir import training_conversations

        held_out_removed = training_conversations(run_dir, path)  # the run's val_set_size split is not training data
        convs = read_conversations(path) if held_out_removed is None else held_out_removed
        obj = cls([m["content"] for c in convs for m in c if m["role"] == "assistant"])
        obj.prompts = {" ".join(_words(m["content"])) for c in convs for m in c if m["role"] == "user"}
        return obj

    def longest_shared(self, text: str) -> tuple[int, str]:
        words = _words(text)
        if not words:
            return 0, ""
        candidates = set()
        for bg in zip(words, words[1:]):
            candidates |= self.index.get(bg, set())
        best, best_at = 0, 0
        if not candidates and any(w in self.vocab for w in words):
            best, best_at = 1, next(i for i, w in enumerate(words) if w in self.vocab)
        for i in candidates:
            n, end = _longest_common_run(words, self.answers[i])
            if n > best:
                best, best_at = n, end - n
        return best, " ".join(words[best_at:best_at + best])


def _longest_common_run(a: list[str], b: list[str]) -> tuple[int, int]:
    """Longest common contiguous word run of a and b: (length, end index in a). O(len(a) * len(b))."""
    best, end = 0, 0
    prev = [0] * (len(b) + 1)
    for i, wa in enumerate(a, 1):
        cur = [0] * (len(b) + 1)
        for j, wb in enumerate(b, 1):
            if wa == wb:
                cur[j] = prev[j - 1] + 1
                if cur[j] > best:
                    best, end = cur[j], i
        prev = cur
    return best, end


def write_samples_report(path: Path, model: LoadedModel, baseline: LoadedModel | None, data: Path, n: int,
                         results: dict, *, train_file: Path | None, max_new_tokens: int = 256,
                         run_dir: Path | None = None) -> None:
    prompts = prompts_from(read_conversations(data), n)
    if not prompts:
        raise DataError("no conversation with an assistant reply to sample from", file=str(data))
    train = TrainingAnswers.from_file(train_file, run_dir) if train_file and train_file.is_file() else None
    lines = [f"# Eval samples: {model.source.path}", "",
             f"Data: `{data}`. Greedy decoding, at most {max_new_tokens} new tokens."]
    if baseline is not None:
        lines.append(f"Baseline: `{baseline.source.path}`.")
    lines.append("Memorisation check: the longest run of words a reply shares with any training answer "
                 + (f"(`{train_file}`)." if train else "(no training file found: pass --train-data)."))
    lines += ["", "| metric | model | baseline |" if baseline else "| metric | model |",
              "|---|---|---|" if baseline else "|---|---|"]
    for key in ("loss", "ppl", "token_acc"):
        m = results["model"][key]
        lines.append(f"| {key} | {m:.4f} |" + (f" {results['baseline'][key]:.4f} |" if baseline else ""))
    lines.append("")
    for i, p in enumerate(prompts, 1):
        user = p["messages"][-1]["content"]
        seen = train is not None and " ".join(_words(user)) in train.prompts
        lines += [f"## {i}. {_one_line(user, 80)}", ""]
        if len(p["messages"]) > 1:
            lines += ["<details><summary>earlier turns</summary>", ""]
            lines += [f"- **{m['role']}**: {_one_line(m['content'], 300)}" for m in p["messages"][:-1]]
            lines += ["", "</details>", ""]
        lines += [f"**Prompt**{' (this prompt is in the training data)' if seen else ''}:", "", _quote(user), "",
                  "**Reference answer**:", "", _quote(p["reference"]), ""]
        for label, loaded in (("Fine-tuned", model), ("Baseline", baseline)):
            if loaded is None:
                continue
            stream = ChatStream(loaded.model, loaded.tokenizer, p["messages"], max_new_tokens=max_new_tokens)
            text = stream.run()
            end = "ended its turn" if stream.finish_reason == "stop" else "hit the token limit"
            lines += [f"**{label} answer** ({len(stream.token_ids)} tokens, {end}):", "", _quote(text), ""]
            if train is not None and label == "Fine-tuned":
                n_words, ngram = train.longest_shared(text)
                flag = " (possible memorisation)" if n_words >= 12 else ""
                lines += [f"Longest n-gram shared with a training answer: {n_words} word{'s' if n_words != 1 else ''}{flag}"
                          + (f": \"{_one_line(ngram, 200)}\"" if n_words else ""), ""]
        print(f"sample {i}/{len(prompts)} done", file=sys.stderr)
    write_text_atomic(path, "\n".join(lines) + "\n")


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text or "(empty)").splitlines()) or "> (empty)"


def _one_line(text: str, n: int) -> str:
    t = " ".join(text.split())
    return t if len(t) <= n else t[: n - 1] + "…"

