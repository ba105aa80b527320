"""Bad input to the dataset tools (validate, analyze, split) and the loader: each is refused with a clean error
(no traceback) that names the flag or file and says what to do, before any work is done, and the input file
is never changed."""
from __future__ import annotations

import json
import shutil

import pytest

from fastchat_ft.cli import main
from fastchat_ft.errors import ConfigError, FastchatError
from conftest import shared_path

RECORD = {"messages": [{"role": "user", "content": "Add 3 and 4."}, {"role": "assistant", "content": "7."}]}


def write_records(path, n=20):
    lines = []
    for i in range(n):
        rec = json.loads(json.dumps(RECORD))
        rec["messages"][0]["content"] = f"Question number {i}: what is {i} plus {i * 7 % 13}?"
        rec["messages"][1]["content"] = f"It is {i + i * 7 % 13}, since adding {i} and {i * 7 % 13} gives that."
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    return write_records(tmp_path / "small.jsonl")


@pytest.fixture(scope="module")
def tok_dir():
    return str(shared_path("tokenizers", "smollm2"))


def refused(capsys, argv, flag=None, file=None) -> str:
    """Runs the CLI, which must fail cleanly (rc 1, one `error:` message with a fix, no traceback)."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "fix: " in err, err
    if flag:
        assert f"'{flag}'" in err, err
    if file:
        assert str(file) in err, err
    return err


# ------------------------------------------------------------------------------------------------ analyze

def test_analyze_plot_never_overwrites_the_dataset(data, tok_dir, capsys):
    before = data.read_bytes()
    err = refused(capsys, ["analyze", str(data), "--tokenizer", tok_dir, "--plot", str(data)], flag="--plot")
    assert "input" in err
    assert data.read_bytes() == before


def test_analyze_plot_to_a_folder_or_a_missing_folder(data, tok_dir, tmp_path, capsys):
    (tmp_path / "afolder").mkdir()
    refused(capsys, ["analyze", str(data), "--tokenizer", tok_dir, "--plot", str(tmp_path / "afolder")], flag="--plot")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afolder", "small.jsonl"]  # no temporary PNG left
    refused(capsys, ["analyze", str(data), "--tokenizer", tok_dir, "--plot", str(tmp_path / "nodir" / "x.png")],
            flag="--plot")


def test_analyze_plot_refused_before_the_scan(data, monkeypatch):
    from fastchat_ft.data import analyze
    monkeypatch.setattr(analyze, "open_scanner", lambda *a, **k: pytest.fail("scanned before checking --plot"))
    with pytest.raises(ConfigError, match="also an input"):
        analyze.analyze_file(data, None, plot=data)


def test_analyze_plot_never_overwrites_a_tokenizer_object_file(data, tmp_path):
    # A tokenizer given as an object is read from its .path: --plot must not replace that file either.
    from fastchat_ft.data import analyze
    from fastchat_ft.data.tokenize import LoaderTokenizer
    tok_file = tmp_path / "tokenizer.json"
    shutil.copy(shared_path("tokenizers", "smollm2") / "tokenizer.json", tok_file)
    before = tok_file.read_bytes()
    with pytest.raises(ConfigError, match="also an input"):
        analyze.analyze_file(data, LoaderTokenizer.from_any(tok_file), plot=tok_file)
    assert tok_file.read_bytes() == before


@pytest.mark.parametrize("flag,value", [("--micro-batch-size", "0"), ("--grad-accum", "-2"), ("--world-size", "0"),
                                        ("--budget", "-100"), ("--budget", "0"), ("--max-seq-len", "0")])
def test_analyze_refuses_impossible_numbers(data, tok_dir, capsys, flag, value):
    refused(capsys, ["analyze", str(data), "--tokenizer", tok_dir, flag, value], flag=flag)


# ----------------------------------------------------------------------------------------------- validate

def test_validate_fix_to_a_folder_or_a_missing_folder(data, tmp_path, capsys):
    (tmp_path / "afolder").mkdir()
    refused(capsys, ["validate", str(data), "--fix", str(tmp_path / "afolder")], flag="--fix")
    refused(capsys, ["validate", str(data), "--fix", str(tmp_path / "nodir" / "out.jsonl")], flag="--fix")
    (tmp_path / "x.rejects.jsonl").mkdir()  # where the rejects of --fix x.jsonl would go
    err = refused(capsys, ["validate", str(data), "--fix", str(tmp_path / "x.jsonl")], flag="--fix")
    assert "x.rejects.jsonl" in err and "folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afolder", "small.jsonl", "x.rejects.jsonl"]


def test_validate_fix_names_the_rejects_clash(tmp_path, capsys):
    src = write_records(tmp_path / "in.rejects.jsonl")
    before = src.read_bytes()
    err = refused(capsys, ["validate", str(src), "--fix", str(tmp_path / "in.jsonl")], flag="--fix")
    assert "rejects" in err and "input" in err and "must differ" not in err
    assert src.read_bytes() == before and not (tmp_path / "in.jsonl").exists()
    from fastchat_ft.data.validate import validate_file, write_fixed
    with pytest.raises(FastchatError, match="rejects to in.rejects.jsonl, which is the input"):
        write_fixed(validate_file(src), tmp_path / "in.jsonl")


def test_write_fixed_checks_its_outputs_too(data, tmp_path):
    # The API path refuses what the CLI refuses before the scan, rather than failing inside mkstemp.
    from fastchat_ft.data.validate import validate_file, write_fixed
    report = validate_file(data)
    with pytest.raises(ConfigError, match="does not exist") as info:
        write_fixed(report, tmp_path / "nodir" / "out.jsonl")
    assert info.value.field == "--fix"
    (tmp_path / "y.rejects.jsonl").mkdir()
    with pytest.raises(ConfigError, match="writes its rejects beside it.*y.rejects.jsonl is a folder"):
        write_fixed(report, tmp_path / "y.jsonl")
    assert not (tmp_path / "nodir").exists() and not (tmp_path / "y.jsonl").exists()


@pytest.mark.parametrize("tokenizer", ["truncated", "dataset"])
def test_validate_broken_tokenizer_file_is_named(data, tmp_path, tok_dir, capsys, tokenizer):
    if tokenizer == "truncated":
        (tmp_path / "brokentok").mkdir()
        full = (shared_path("tokenizers", "smollm2") / "tokenizer.json").read_bytes()
        (tmp_path / "brokentok" / "tokenizer.json").write_bytes(full[:5000])
        arg, named = tmp_path / "brokentok", tmp_path / "brokentok" / "tokenizer.json"
    else:
        arg = named = data  # not a tokenizer at all
    err = refused(capsys, ["validate", str(data), "--tokenizer", str(arg)], file=named)
    assert "tokenizer.json" in err


def test_broken_tokenizer_config_is_named(data, tmp_path, capsys):
    folder = tmp_path / "tok"
    shutil.copytree(shared_path("tokenizers", "smollm2"), folder)
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<|im')
    refused(capsys, ["validate", str(data), "--tokenizer", str(folder)], file=folder / "tokenizer_config.json")


@pytest.mark.parametrize("value", ["-5", "0"])
def test_validate_max_seq_len_must_be_positive(data, tok_dir, capsys, value):
    # 0 used to switch the length check off silently; analyze refuses it too. Leaving the flag out is "no check".
    err = refused(capsys, ["validate", str(data), "--tokenizer", tok_dir, "--max-seq-len", value],
                  flag="--max-seq-len")
    assert "at least 1" in err and "no length check" not in err


def test_validate_max_issues_must_not_be_negative(data, capsys):
    err = refused(capsys, ["validate", str(data), "--max-issues", "-5"], flag="--max-issues")
    assert "at least 0" in err
    assert main(["validate", str(data), "--max-issues", "0"]) == 0  # 0: all issues


@pytest.mark.parametrize("value", [-5, 0])
def test_validate_file_max_seq_len_one_rule(data, tok_dir, value):
    # The API follows the CLI's rule: 0 is refused, None is no length check.
    from fastchat_ft.data.validate import validate_file
    with pytest.raises(ConfigError, match="at least 1") as info:
        validate_file(data, tokenizer=tok_dir, max_seq_len=value)
    assert info.value.field == "max_seq_len"
    assert validate_file(data, tokenizer=tok_dir, max_seq_len=None).ok
    assert validate_file(data, tokenizer=tok_dir, max_seq_len=1).issues  # every record is over 1 token


@pytest.mark.parametrize("value", ["5", "-1", "0", "0.3", "nan"])
def test_near_threshold_range(data, tmp_path, capsys, value):
    err = refused(capsys, ["validate", str(data), "--near-threshold", value], flag="--near-threshold")
    assert "0.5" in err and "Jaccard" in err and "--no-near-duplicates" in err
    err = refused(capsys, ["split", str(data), "--near-threshold", value, "--out-dir", str(tmp_path / "o")],
                  flag="--near-threshold")
    assert "0.5" in err and "--no-near-duplicates" not in err  # split has no such flag
    assert not (tmp_path / "o").exists()


def test_near_threshold_bounds_are_accepted(data):
    from fastchat_ft.data.validate import validate_file
    for value in (0.5, 1.0):
        assert validate_file(data, near_threshold=value).ok


def test_validate_template_tokenizer_needs_a_tokenizer(data, capsys):
    err = refused(capsys, ["validate", str(data), "--template", "tokenizer"], flag="--template")
    assert "--tokenizer" in err and "None" not in err


@pytest.mark.parametrize("content", [b"", b"\n  \n", b"[]"])
def test_validate_an_empty_dataset_fails(tmp_path, capsys, content):
    f = tmp_path / ("empty.json" if content == b"[]" else "empty.jsonl")
    f.write_bytes(content)
    refused(capsys, ["validate", str(f)], file=f)


@pytest.mark.parametrize("content,reason", [(b"", "no records"), (b"\n  \n", "no records"),
                                            (b'{"messages": []}\n{"foo": 1}\n', "no valid records (2 with errors)")])
def test_analyze_of_a_file_with_nothing_to_analyze_fails(tmp_path, tok_dir, capsys, content, reason):
    # as validate and split: a report of zeros with status 0 read as a dataset that passed
    f = tmp_path / "empty.jsonl"
    f.write_bytes(content)
    png = tmp_path / "len.png"
    for extra in ([], ["--json"], ["--plot", str(png)]):
        err = refused(capsys, ["analyze", str(f), "--tokenizer", tok_dir, *extra], file=f)
        assert reason in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # no PNG of nothing


@pytest.mark.parametrize("command", ["validate", "analyze", "split"])
@pytest.mark.parametrize("compress, kind", [("gzip", "gzip"), ("bz2", "bzip2"), ("lzma", "xz")])
def test_a_compressed_file_is_named_as_one(data, tok_dir, tmp_path, capsys, command, compress, kind):
    # was one "not valid UTF-8" error per compressed line, which hid the fix
    import importlib
    packed = tmp_path / "small.jsonl.z"
    packed.write_bytes(importlib.import_module(compress).compress(data.read_bytes()))
    extra = ["--tokenizer", tok_dir] if command == "analyze" else []
    err = refused(capsys, [command, str(packed), *extra], file=packed)
    assert f"{kind}-compressed" in err and "UTF-8" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.jsonl", "small.jsonl.z"]


@pytest.mark.parametrize("command", ["validate", "analyze", "split"])
def test_an_output_that_cannot_be_written_is_a_clean_error(data, tok_dir, tmp_path, capsys, monkeypatch, command):
    # a full or read-only disk found while writing (after the scan) was an OSError traceback
    import os
    import tempfile

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", no_space)  # validate --fix and split
    monkeypatch.setattr(os, "replace", no_space)  # analyze --plot lands its PNG with os.replace
    argv = {"validate": ["validate", str(data), "--fix", str(out / "clean.jsonl")],
            "analyze": ["analyze", str(data), "--tokenizer", tok_dir, "--plot", str(out / "len.png")],
            "split": ["split", str(data), "--out-dir", str(out)]}[command]
    flag = {"validate": "--fix", "analyze": "--plot", "split": "--out-dir"}[command]
    err = refused(capsys, argv, flag=flag)
    assert "could not write" in err and "No space left on device" in err
    assert list(out.iterdir()) == []  # no partial file or temp file left


def test_split_beside_an_input_in_a_read_only_folder_is_refused_before_the_scan(data, capsys, monkeypatch):
    from fastchat_ft import flags
    from fastchat_ft.data import split
    real_access = flags.os.access
    monkeypatch.setattr(flags.os, "access", lambda p, mode: p != data.parent and real_access(p, mode))
    monkeypatch.setattr(split, "open_scanner", lambda *a, **k: pytest.fail("scanned"))
    err = refused(capsys, ["split", str(data)], flag="--out-dir")
    assert "no write permission" in err and "pass --out-dir" in err


@pytest.mark.parametrize("command", ["validate", "analyze", "split"])
def test_pretty_printed_records_are_named_as_such(data, tok_dir, tmp_path, capsys, command):
    # was one "invalid JSON" error per line of every record
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text("\n".join(json.dumps(json.loads(x), indent=2) for x in data.read_text().splitlines()) + "\n")
    extra = ["--tokenizer", tok_dir] if command == "analyze" else []
    err = refused(capsys, [command, str(pretty), *extra], file=f"{pretty}:1")
    assert "pretty-printed" in err and "one record per line" in err and "invalid JSON" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretty.jsonl", "small.jsonl"]


@pytest.mark.parametrize("command", ["validate", "analyze", "split"])
def test_standard_input_or_a_pipe_is_named_as_such(data, tok_dir, tmp_path, capsys, command):
    import os
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # what /dev/stdin or <(cmd) is when fed by a pipe; never opened here, so never blocks
    extra = ["--tokenizer", tok_dir] if command == "analyze" else []
    for path in ("-", str(fifo)):
        err = refused(capsys, [command, path, *extra], file=path)
        assert "not a regular file" in err and "no such file" not in err


# -------------------------------------------------------------------------- .jsonl of bare message lists

def bare_lists(path):
    lines = [json.dumps(r["messages"]) for r in (RECORD, RECORD | {"x": 1})]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("command", ["validate", "analyze"])
def test_jsonl_of_bare_message_lists_says_so(tmp_path, tok_dir, capsys, command):
    f = bare_lists(tmp_path / "lists.jsonl")
    argv = [command, str(f)] + (["--tokenizer", tok_dir] if command == "analyze" else [])
    err = refused(capsys, argv, file=f"{f}:1")
    assert '"messages"' in err and "bare list of messages" in err and ".json file must" not in err


def test_loader_names_a_jsonl_of_bare_message_lists(tmp_path, tok_dir):
    from fastchat_ft.data import ChatDataset
    f = bare_lists(tmp_path / "lists.jsonl")
    with pytest.raises(FastchatError, match="bare list of messages") as info:
        ChatDataset([f], tok_dir, max_seq_len=64, cache=False, verbose=False)
    assert info.value.file == str(f) and info.value.line == 1 and '"messages"' in info.value.fix


def test_a_json_array_in_a_jsonl_file_still_loads(tmp_path):
    from fastchat_ft.data.validate import validate_file
    f = tmp_path / "arr.jsonl"
    f.write_text(json.dumps([RECORD, RECORD | {"id": 2}], indent=1))
    assert validate_file(f).records == 2


# ------------------------------------------------------------------------------------------------- loader

@pytest.mark.parametrize("value", [-3, 0])
def test_loader_max_seq_len_must_be_positive(data, tok_dir, value):
    from fastchat_ft.data import ChatDataset
    with pytest.raises(ConfigError, match="at least 1") as info:
        ChatDataset([data], tok_dir, max_seq_len=value, cache=False, verbose=False)
    assert info.value.field == "max_seq_len" and info.value.fix


# -------------------------------------------------------------------------------------------------- split

def test_split_out_dir_that_is_a_file(data, capsys):
    before = data.read_bytes()
    refused(capsys, ["split", str(data), "--out-dir", str(data)], flag="--out-dir")
    refused(capsys, ["split", str(data), "--out-dir", str(data / "sub")], flag="--out-dir")
    assert data.read_bytes() == before


def test_split_output_file_that_is_a_folder(data, tmp_path, capsys, monkeypatch):
    (tmp_path / "g" / "small.train.jsonl").mkdir(parents=True)
    from fastchat_ft.data import split
    monkeypatch.setattr(split, "open_scanner", lambda *a, **k: pytest.fail("scanned before checking --out-dir"))
    err = refused(capsys, ["split", str(data), "--out-dir", str(tmp_path / "g")], flag="--out-dir")
    assert "small.train.jsonl" in err
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["small.train.jsonl"]


@pytest.mark.parametrize("flag,value", [("--seed", "-1"), ("--val-ratio", "1"), ("--val-ratio", "-0.1")])
def test_split_refuses_impossible_numbers(data, tmp_path, capsys, flag, value):
    refused(capsys, ["split", str(data), flag, value, "--out-dir", str(tmp_path / "o")], flag=flag)
    assert not (tmp_path / "o").exists()


def test_split_warns_when_the_validation_file_is_empty(tmp_path, capsys):
    f = write_records(tmp_path / "five.jsonl", n=5)
    assert main(["split", str(f)]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "five.val.jsonl is empty" in err and "--val-ratio" in err
    assert (tmp_path / "five.val.jsonl").read_bytes() == b""
    assert main(["split", str(f), "--val-ratio", "0"]) == 0  # asked for: no warning
    assert "warning" not in capsys.readouterr().err


def test_split_of_an_empty_file_fails(tmp_path, capsys):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    refused(capsys, ["split", str(f)], file=f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_outputs_never_overwrite_a_tokenizer_file(data, tmp_path, capsys):
    tok = tmp_path / "tokenizer.json"
    shutil.copy(shared_path("tokenizers", "smollm2") / "tokenizer.json", tok)
    before = tok.read_bytes()
    refused(capsys, ["analyze", str(data), "--tokenizer", str(tok), "--plot", str(tok)], flag="--plot")
    refused(capsys, ["validate", str(data), "--tokenizer", str(tok), "--fix", str(tok)], flag="--fix")
    assert tok.read_bytes() == before


def test_a_missing_input_with_outputs_is_named(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    refused(capsys, ["validate", str(missing), "--fix", str(tmp_path / "out.jsonl")], file=missing)
    refused(capsys, ["split", str(missing), "--out-dir", str(tmp_path / "o")], file=missing)
    assert list(tmp_path.iterdir()) == []
