"""`fastchat-ft validate`: every problem of a chat dataset with file:line, severity and reason, and `--fix`.

The per-record checks run natively (csrc/validate.*, on the loader's parser, schema and templates); this
module owns the scan driver shared with analyze/split, the reporting, and the cleaned copy.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fastchat_ft import _native, flags
from fastchat_ft.errors import ConfigError, DataError, TokenizerError

SEVERITIES = ("info", "warning", "error")
BUILTIN_TEMPLATES = ("chatml", "llama3", "llama2", "mistral", "alpaca")
# The near-duplicate index finds pairs through LSH (8 bands of 8 MinHash rows, csrc/dedup.h): a pair with Jaccard
# J becomes a candidate with probability 1-(1-J^8)^8, 3% at J=0.5, so a lower threshold would promise matches the
# index does not look for.
NEAR_THRESHOLD_RANGE = (0.5, 1.0)
# Control-token text of the built-in templates: flagged in content even without a tokenizer.
TEMPLATE_CONTROL_STRINGS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "</s>",
)


@dataclass
class Issue:
    line: int
    column: int
    severity: str
    code: str
    field: str
    message: str

    def format(self, file: str) -> str:
        where = f"{file}:{self.line}" + (f":{self.column}" if self.column else "")
        fld = f" {self.field}:" if self.field else ""
        return f"{where}: {self.severity} [{self.code}]{fld} {self.message}"


@dataclass
class ValidationReport:
    file: str
    records: int = 0
    records_with_errors: int = 0
    records_with_warnings: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    issues: list[Issue] = field(default_factory=list)
    rejected: dict[int, list[str]] = field(default_factory=dict)  # record ordinal -> reasons (for --fix)
    rejected_lines: dict[int, int] = field(default_factory=dict)  # record ordinal -> its first line (for --fix)
    without_system: int = 0  # parsed records with no system turn (they get the --system-prompt)
    tokenizer: str | None = None
    template: str = "chatml"
    max_seq_len: int | None = None

    @property
    def ok(self) -> bool:
        return self.records_with_errors == 0

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(f"{i.severity}:{i.code}" for i in self.issues).items()))

    def to_dict(self) -> dict:
        return {
            "file": self.file, "ok": self.ok, "records": self.records,
            "records_with_errors": self.records_with_errors, "records_with_warnings": self.records_with_warnings,
            "exact_duplicates": self.exact_duplicates, "near_duplicates": self.near_duplicates,
            "template": self.template, "tokenizer": self.tokenizer, "max_seq_len": self.max_seq_len,
            "counts": self.counts(), "issues": [i.__dict__ for i in self.issues],
        }


# ------------------------------------------------------------------------------------ shared scan driver

def load_tokenizer(tokenizer):
    """The loader's view of a tokenizer (path, folder or object), which must be native: token counts and labels
    then match training exactly."""
    from fastchat_ft.data.tokenize import LoaderTokenizer
    tok = LoaderTokenizer.from_any(tokenizer)
    if tok.native is None:
        raise TokenizerError("the dataset tools need the native tokenizer, which cannot load this tokenizer.json",
                             file=str(tok.path), fix="use a tokenizer the native loader supports")
    return tok


def tokenizer_special_strings(path: str | os.PathLike | None) -> list[str]:
    """Special added tokens of a tokenizer.json (their text must not appear inside content)."""
    strings = set(TEMPLATE_CONTROL_STRINGS)
    if path is not None:
        p = Path(path)
        p = p / "tokenizer.json" if p.is_dir() else p
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            strings.update(t["content"] for t in data.get("added_tokens", []) if t.get("special") and t.get("content"))
        except (OSError, ValueError):
            pass  # the tokenizer loader reports a broken file; here it only narrows a warning
    # "<s>" alone is too common in HTML/markdown-ish text to flag unless the tokenizer declares it.
    return sorted(s for s in strings if len(s) >= 3)


def resolve_template(name: str, tokenizer_path: str | os.PathLike | None) -> str:
    """A built-in template name; "tokenizer"/"auto" picks the built-in that matches the tokenizer's own template."""
    if name in BUILTIN_TEMPLATES:
        return name
    if name not in ("tokenizer", "auto"):
        raise DataError(f"unknown template '{name}'", field="template",
                        fix=f"use one of {', '.join(BUILTIN_TEMPLATES)} or 'tokenizer'")
    if tokenizer_path is None:
        raise ConfigError(f"--template {name} needs --tokenizer: it picks the template from the tokenizer's own",
                          field="--template", fix=f"pass --tokenizer MODEL_FOLDER, or a built-in --template "
                                                  f"({', '.join(BUILTIN_TEMPLATES)})")
    text = ""
    folder = Path(tokenizer_path)
    folder = folder if folder.is_dir() else folder.parent
    if (folder / "chat_template.jinja").is_file():
        text = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        try:
            text = str(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template") or "")
        except (ValueError, AttributeError):  # the tokenizer loader names a broken file; here it is just no template
            text = ""
    for marker, tmpl in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"),
                         ("[AVAILABLE_TOOLS]", "mistral"), ("<<SYS>>", "llama2"), ("[INST]", "mistral")):
        if marker in text:
            # The tools render natively; the model's Jinja template may add text of its own (a default system
            # prompt, date lines), so token counts can differ slightly from training with template="tokenizer".
            warnings.warn(f"fastchat-ft: the dataset tools check template='{name}' with the built-in '{tmpl}' "
                          "template it matches; token counts can differ slightly from the model's own Jinja "
                          "template (e.g. a default system prompt)", RuntimeWarning, stacklevel=2)
            return tmpl
    raise DataError("cannot tell which built-in template matches the tokenizer's chat template",
                    file=str(tokenizer_path), field="template", fix=f"pass --template ({', '.join(BUILTIN_TEMPLATES)})")


def check_near_threshold(value: float, flag: str = "--near-threshold", *, skip_flag: str | None = None) -> None:
    """Within NEAR_THRESHOLD_RANGE (shared by validate and split); `skip_flag`: the flag that turns the check off,
    where the command has one. Not flags.check_range: the message says why a low threshold is refused."""
    low, high = NEAR_THRESHOLD_RANGE
    if not low <= value <= high:  # written so that NaN fails
        skip = f", or {skip_flag} to skip the check" if skip_flag else ""
        raise ConfigError(f"must be between {low} and {high}, got {value}: it is an estimated Jaccard similarity, "
                          f"and below {low} the near-duplicate index would miss most of the pairs it asks for",
                          field=flag, fix=f"pass {flag} between {low} and {high} (default 0.8; 1.0: identical "
                                          f"words only){skip}")


def check_max_seq_len(value: int | None, flag: str = "--max-seq-len") -> None:
    """A length in tokens, 1 or more; None (the flag left out) means no length check. 0 is refused, as analyze
    and training refuse it: "no length check" is what leaving the flag out already says."""
    if value is not None:
        flags.check_range(value, flag, low=1)


def reader_error(path: Path, line: int, column: int, reason: str) -> DataError:
    """A file the reader cannot read as records at all. The reader takes any file whose first byte is '[' for one
    JSON array (csrc/jsonl.cc), whatever its name, so a .jsonl file of bare message lists, one per line, fails
    at line 2 as a second JSON value: name the real problem there."""
    if path.suffix.lower() == ".jsonl" and line >= 2:
        try:
            with open(path, "rb") as f:
                first = json.loads(next((raw for raw in f if raw.strip()), b"null"))
        except ValueError:
            first = None
        if isinstance(first, list):
            bare = all(isinstance(m, dict) and "role" in m for m in first) and first
            return DataError("each line of a .jsonl file must be one record, a JSON object with \"messages\" (or a "
                             "ShareGPT \"conversations\" list); " + ("this line is a bare list of messages" if bare else
                             "this line is a JSON list, so the file was read as one JSON array, which ends on line 1"),
                             file=str(path), line=1,
                             fix='write each line as {"messages": [{"role": "user", "content": "..."}, ...]}')
    # The reader fails here only on a file read as one JSON array: JSONL lines are checked one by one as records.
    return DataError(reason, file=str(path), line=line or None, column=column or None,
                     fix="correct the JSON at that line and column: a file that starts with '[' is read as one JSON "
                         "list of records, so one mistake stops the whole file (in .jsonl, one record per line, "
                         "each line is checked on its own)")


def open_scanner(path: str | os.PathLike, *, tokenizer=None, template: str = "chatml", max_seq_len: int | None = None,
                 system_prompt: str = "",
                 special_strings: list[str] | None = None, near_duplicates: bool = True, near_threshold: float = 0.8,
                 count_bigrams: bool = False, threads: int = 0, batch_records: int = 4096):
    """The native DatasetScanner over `path` (file errors become DataError)."""
    p = Path(path)
    if p.is_dir():
        raise DataError("this is a folder, not a dataset file", file=str(p), fix="give one .jsonl or .json file")
    if not p.is_file():
        if str(path) == "-" or p.exists():  # "-", /dev/stdin, <(cmd): a pipe, which said "no such file"
            raise DataError("not a regular file (standard input, a pipe or a device): the tools read the file "
                            "again to write their outputs", file=str(p), fix="save the data to a file and pass its path")
        raise DataError("no such file", file=str(p), fix="check the path")
    refuse_compressed(p)
    refuse_multiline_records(p)
    check_max_seq_len(max_seq_len, "max_seq_len")
    if near_duplicates:
        check_near_threshold(near_threshold, "near_threshold")
    bos = eos = ""
    if tokenizer is not None:  # the loader's BOS/EOS choice per template, so counts match training
        from fastchat_ft.data.encode import ChatOptions
        kw = ChatOptions(template=template).native_kwargs(tokenizer)
        bos, eos = kw["bos"], kw["eos"]
    try:
        return _native.DatasetScanner(
            str(p), template=template, default_system=system_prompt, bos=bos, eos=eos,
            tokenizer=None if tokenizer is None else tokenizer.native,
            max_seq_len=int(max_seq_len or 0), special_strings=special_strings or [],
            near_duplicates=near_duplicates, near_threshold=near_threshold, count_bigrams=count_bigrams,
            threads=threads, batch_records=batch_records)
    except ValueError as e:  # "<path>:<line>:<column>: reason" from the reader
        msg = str(e)
        m = re.match(r"(\d+):(\d+): (.*)", msg[len(str(p)) + 1:], re.S) if msg.startswith(f"{p}:") else None
        if m:
            raise reader_error(p, int(m.group(1)), int(m.group(2)), m.group(3)) from None
        raise DataError(msg, file=str(p)) from None


# Leading bytes of compressed files: the reader takes plain JSON(L) only, and without this check a .jsonl.gz is
# reported as one "not valid UTF-8" error per compressed line, which hides the one fix.
COMPRESSED_MAGIC = {b"\x1f\x8b": ("gzip", "gunzip -k"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -d"),
                    b"BZh": ("bzip2", "bunzip2 -k"), b"\xfd7zXZ\x00": ("xz", "unxz -k"), b"PK\x03\x04": ("zip", "unzip")}


def refuse_compressed(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, (kind, tool) in COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"this is a {kind}-compressed file; the dataset tools read plain .jsonl / .json",
                            file=str(path), fix=f"decompress it first ({tool} {path}) and pass the plain file")


def refuse_multiline_records(path: Path) -> None:
    """Pretty-printed records (`json.dump(..., indent=2)` or jq without -c): a file that starts with '{' is read as
    JSONL, so every line was its own "invalid JSON" error, hundreds of them, none saying what is wrong. A JSONL
    record cannot be a lone '{' line followed by a member line, so this never refuses a readable file."""
    with open(path, "rb") as f:
        head = f.read(65536)
    lines = [ln.strip() for ln in head.removeprefix(b"\xef\xbb\xbf").splitlines() if ln.strip()]
    if len(lines) >= 2 and lines[0] == b"{" and lines[1].startswith(b'"'):
        raise DataError("the records are spread over several lines (pretty-printed JSON), and a file that starts "
                        "with '{' is read as JSONL: one whole record per line", file=str(path), line=1,
                        fix=f"write one record per line (e.g. jq -c . {path} > data.jsonl), or a .json file that "
                            "holds one JSON list [...] of records")


def iter_batches(scanner) -> Iterator[dict]:
    while (batch := scanner.next_batch()) is not None:
        yield batch


# ------------------------------------------------------------------------------------------ validate

def validate_file(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, template: str = "chatml",
                  max_seq_len: int | None = None, near_duplicates: bool = True, near_threshold: float = 0.8,
                  threads: int = 0, system_prompt: str = "") -> ValidationReport:
    """Check every record of `path`; the report lists each issue and which records --fix would drop.
    `system_prompt`: the system turn of conversations that have none (the loader's option of that name)."""
    tmpl = resolve_template(template, tokenizer)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    report = ValidationReport(file=str(path), tokenizer=None if tokenizer is None else str(tokenizer), template=tmpl,
                              max_seq_len=max_seq_len)
    scanner = open_scanner(path, tokenizer=tok, template=tmpl, max_seq_len=max_seq_len if tok else None,
                           system_prompt=system_prompt,
                           special_strings=tokenizer_special_strings(tokenizer), near_duplicates=near_duplicates,
                           near_threshold=near_threshold, threads=threads)
    offset = 0
    for batch in iter_batches(scanner):
        n = len(batch["lines"])
        warned = set()
        for (idx, line, column, severity, code, fld, message) in batch["issues"]:
            sev = SEVERITIES[severity]
            report.issues.append(Issue(line, column, sev, code, fld, message))
            if sev == "error" or code.startswith("duplicate."):
                # a .json array's records have no line in their raw copy: the rejects give the scanner's
                report.rejected_lines.setdefault(offset + idx, int(batch["lines"][idx]))
            if sev == "error":
                report.rejected.setdefault(offset + idx, []).append(f"{code}: {message}")
            elif sev == "warning":
                warned.add(idx)
            if code == "duplicate.exact":
                report.exact_duplicates += 1
            elif code == "duplicate.near":
                report.near_duplicates += 1
            if code.startswith("duplicate."):
                report.rejected.setdefault(offset + idx, []).append(f"{code}: {message}")
        errors = batch["has_error"]
        report.records_with_errors += int(errors.sum())
        report.records_with_warnings += sum(1 for i in warned if not errors[i])
        report.records += n
        report.without_system += int(((batch["messages"] > 0) & (batch["roles"][:, 0] == 0)).sum())
        offset += n
    if near_duplicates or report.exact_duplicates:
        keep_first_valid_copy(report, scanner.groups())
    return report


def keep_first_valid_copy(report: ValidationReport, groups) -> None:
    """--fix keeps one copy of each duplicate group: its first record without an error. The scanner links a record
    to the first earlier match, which may be a record --fix drops for an error (an empty answer, weight 0), and then
    neither copy reached the cleaned file. `groups`: the union-find group of each record (exact and verified near
    matches, the ones reported)."""
    import numpy as np
    broken = [o for o, reasons in report.rejected.items() if not all(r.startswith("duplicate.") for r in reasons)]
    if not broken or len(broken) == len(report.rejected):
        return  # no record with an error, or none dropped only as a copy: nothing to move
    valid = np.ones(report.records, dtype=bool)
    valid[broken] = False
    ordinals = np.flatnonzero(valid)
    _, first = np.unique(groups[ordinals], return_index=True)  # first valid record of each group
    for o in ordinals[first].tolist():
        report.rejected.pop(o, None)  # a copy only of dropped records: this one is the copy kept


def _records_raw(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line, raw record bytes) in the scanner's record order: JSONL lines (blank ones skipped) or array items."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        records = _native.json_loads(path.read_bytes())
        for rec in records:
            yield 0, json.dumps(rec, ensure_ascii=False).encode("utf-8")
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw.rstrip(b"\r\n")


def rejects_path(out: Path) -> Path:
    return out.with_name(out.name[: -len(out.suffix)] + ".rejects.jsonl" if out.suffix else out.name + ".rejects.jsonl")


def write_fixed(report: ValidationReport, out: str | os.PathLike) -> tuple[Path, Path, int, int]:
    """Write the kept records to `out` (JSONL) and the dropped ones, with reasons, beside it. Never touches
    the input. Returns (out, rejects, kept, dropped)."""
    src, dst = Path(report.file).resolve(), Path(out).resolve()
    rej = rejects_path(dst)
    if flags._same_file(dst, src):
        raise DataError("--fix OUT must differ from the input file (the input is never modified)", file=str(out),
                        fix="write the cleaned copy to a new path, e.g. data.clean.jsonl")
    if flags._same_file(rej, src):
        raise DataError(f"--fix {out} would write its rejects to {rej.name}, which is the input file (the input is "
                        "never modified)", file=str(out), fix="give --fix a name whose .rejects.jsonl is not the "
                                                              "input, e.g. data.clean.jsonl")
    check_fix_paths(out, src, report.tokenizer)  # the rest: a folder in the way, a missing folder, the tokenizer
    kept = dropped = 0

    def split_records():
        nonlocal kept, dropped
        for ordinal, (line, raw) in enumerate(_records_raw(src)):
            reasons = report.rejected.get(ordinal)
            if reasons is None:
                kept += 1
                yield True, raw + b"\n"
            else:
                dropped += 1
                text = raw.decode("utf-8", errors="backslashreplace")
                entry = {"line": line or report.rejected_lines.get(ordinal), "record_index": ordinal, "reasons": reasons, "raw": text}
                yield False, (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")

    # Both outputs stream through temp files, then land atomically.
    tmp_k = tmp_r = ""
    try:
        fd_k, tmp_k = tempfile.mkstemp(dir=str(dst.parent), prefix=f".{dst.name}.", suffix=".tmp")
        fd_r, tmp_r = tempfile.mkstemp(dir=str(rej.parent), prefix=f".{rej.name}.", suffix=".tmp")
        with os.fdopen(fd_k, "wb") as fk, os.fdopen(fd_r, "wb") as fr:
            for keep, chunk in split_records():
                (fk if keep else fr).write(chunk)
        for t in (tmp_k, tmp_r):
            make_usual_mode(t)
        os.replace(tmp_k, dst)
        os.replace(tmp_r, rej)
    except OSError as e:  # a read-only or full disk: the input was read fine, the outputs cannot be written
        if e.filename is not None and Path(e.filename).resolve() == src:
            raise
        raise flags.write_failed(e, out, "--fix") from None
    finally:
        for t in (tmp_k, tmp_r):
            if t and os.path.exists(t):
                os.unlink(t)
    return dst, rej, kept, dropped


def make_usual_mode(path) -> None:
    """mkstemp creates 0600 files: give a written dataset the mode a plain open() would (0666 less the umask), so
    other users and containers can read it like the input."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def print_report(report: ValidationReport, max_issues: int, out=sys.stdout) -> None:
    shown = report.issues if max_issues <= 0 else report.issues[:max_issues]
    for issue in shown:
        print(issue.format(report.file), file=out)
    if len(shown) < len(report.issues):
        print(f"... {len(report.issues) - len(shown)} more issues (use --max-issues 0 or --json to see all)", file=out)
    status = "OK" if report.ok else "FAILED"
    print(f"{status}: {report.records} records, {report.records_with_errors} with errors, "
          f"{report.records_with_warnings} with warnings only; {report.exact_duplicates} exact and "
          f"{report.near_duplicates} near duplicates", file=out)
    for key, n in report.counts().items():
        print(f"  {n:>8}  {key}", file=out)


def training_system_prompt(given: str | None, tokenizer, template: str) -> str:
    """The system turn training gives a conversation without one: `given` (--system-prompt, as the config's
    system_prompt), else (unset) the default system prompt of the model's own chat template, which training adds
    when the built-in template renders like it (SmolLM2's "You are a helpful AI assistant named SmolLM, ...").
    Without it the tools counted a third fewer tokens than training on data without system turns."""
    if given is not None or tokenizer is None:
        return given or ""
    from fastchat_ft.data.template_defaults import model_default_system
    folder = Path(tokenizer)
    folder = folder if folder.is_dir() else folder.parent
    with warnings.catch_warnings():  # validate_file / analyze_file resolve it again and warn there
        warnings.simplefilter("ignore")
        tmpl = resolve_template(template, folder)
    return model_default_system(str(folder), tmpl) or ""


def print_system_prompt_note(given: str | None, system: str) -> None:
    """After the report (an error before it needs no note): the counts include a system prompt the data lacks."""
    if given is None and system:
        print(f"note: conversations without a system turn were counted with the model's default system prompt "
              f"{system[:80]!r}{'...' if len(system) > 80 else ''}, as training adds it (system_prompt unset); "
              "--system-prompt '' counts them without it", file=sys.stderr)


def check_fix_paths(out: str | os.PathLike, src: str | os.PathLike, tokenizer=None) -> None:
    """--fix OUT and the rejects file beside it can both be written, and neither is an input."""
    inputs = [src, tokenizer]
    dst = flags.output_file(out, "--fix", inputs=inputs)
    rej = rejects_path(dst)
    try:
        flags.output_file(rej, "--fix", inputs=inputs)
    except ConfigError as e:  # the user never typed the rejects file's name: say where it comes from
        raise ConfigError(f"--fix {out} writes its rejects beside it, and {e.reason}", field="--fix",
                          fix="give --fix another name, e.g. data.clean.jsonl") from None


def run_validate(args) -> int:
    # Flag values before the tokenizer loads and the file is read.
    check_max_seq_len(args.max_seq_len)
    flags.at_least(args, {"max_issues": 0})  # 0 is "all"; -5 printed all too, which no one means
    if not getattr(args, "no_near_duplicates", False):
        check_near_threshold(getattr(args, "near_threshold", 0.8), skip_flag="--no-near-duplicates")
    if args.fix:
        check_fix_paths(args.fix, args.file, args.tokenizer)
    if args.max_seq_len and not args.tokenizer:
        print("note: --max-seq-len needs --tokenizer to count tokens; lengths are not checked", file=sys.stderr)
    system = training_system_prompt(args.system_prompt, args.tokenizer, args.template)
    report = validate_file(args.file, tokenizer=args.tokenizer, template=args.template, max_seq_len=args.max_seq_len,
                           system_prompt=system,
                           near_duplicates=not getattr(args, "no_near_duplicates", False),
                           near_threshold=getattr(args, "near_threshold", 0.8))
    if report.records == 0:  # nothing to train on is what a validator exists to catch
        raise DataError("the file holds no records", file=str(args.file),
                        fix='add records: one JSON object per line, {"messages": [{"role": "user", ...}, ...]}')
    fixed = None
    if args.fix:
        fixed = write_fixed(report, args.fix)
    if args.json:
        d = report.to_dict()
        if fixed:
            d["fix"] = {"out": str(fixed[0]), "rejects": str(fixed[1]), "kept": fixed[2], "dropped": fixed[3]}
        json.dump(d, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        print_report(report, getattr(args, "max_issues", 200))
        if fixed:
            print(f"wrote {fixed[2]} records to {fixed[0]} and {fixed[3]} rejects (with reasons) to {fixed[1]}")
    if report.without_system:
        print_system_prompt_note(args.system_prompt, system)
    return 0 if report.ok else 1
