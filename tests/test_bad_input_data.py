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


@pytest.mark.parametrize("flag,value", [("--micro-batch-size", "0"), ("--grad-accum", "-2"), ("--world-size", "0"),
                                        ("--budget", "-100"), ("--budget", "0"), ("--max-seq-len", "0")])
def test_analyze_refuses_impossible_numbers(data, tok_dir, capsys, flag, value):
    refused(capsys, ["analyze", str(data), "--tokenizer", tok_dir, flag, value], flag=flag)
