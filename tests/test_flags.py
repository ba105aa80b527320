"""The shared command-line checks (fastchat_ft/flags.py): each names the flag and gives a fix."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fastchat_ft import flags
from fastchat_ft.errors import ConfigError


def test_at_least_and_positive_name_the_flag_and_let_defaults_through():
    args = argparse.Namespace(max_new_tokens=0, steps=None, lr=float("nan"), top_p=0.5)
    with pytest.raises(ConfigError, match="--max-new-tokens") as err:
        flags.at_least(args, {"max_new_tokens": 1, "steps": 2})
    assert "got 0" in str(err.value) and "fix:" in str(err.value)
    flags.at_least(args, {"steps": 2})  # None: the default, not checked
    with pytest.raises(ConfigError, match="--lr"):
        flags.positive(args, ["lr"])
    flags.positive(args, ["top_p"])
    with pytest.raises(ConfigError, match="--seed"):
        flags.at_least(argparse.Namespace(seed=float("nan")), {"seed": 0})


def test_output_file_refuses_an_input_a_folder_and_a_missing_parent(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError, match="destroy that input"):
        flags.output_file(data, "--plot", inputs=[data])
    with pytest.raises(ConfigError, match="destroy that input"):  # the same file by another spelling
        flags.output_file(tmp_path / "." / "train.jsonl", "--plot", inputs=[str(data)])
    with pytest.raises(ConfigError, match="is a folder"):
        flags.output_file(tmp_path, "--plot", inputs=[data])
    with pytest.raises(ConfigError, match="does not exist"):
        flags.output_file(tmp_path / "nodir" / "x.png", "--plot")
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="destroy that input"):  # a file of an input folder
        flags.output_file(model / "tokenizer.json", "--plot", inputs=[model])
    assert flags.output_file(tmp_path / "x.png", "--plot", inputs=[data, None, model]) == tmp_path / "x.png"
    assert data.read_text() == "{}\n"


def test_output_folder_refuses_a_file_or_a_path_under_one(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    for bad in (f, f / "sub"):
        with pytest.raises(ConfigError, match="is a file"):
            flags.output_folder(bad, "--out")
    assert flags.output_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"


def test_an_output_in_a_folder_without_write_permission_is_refused_first(tmp_path, monkeypatch):
    # tests may run as root, for whom every folder is writable: the permission answer is what os.access says
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = flags.os.access
    monkeypatch.setattr(flags.os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(ConfigError, match="cannot write into the folder .*locked.*no write permission") as e:
        flags.output_file(locked / "out.jsonl", "--fix")
    assert e.value.field == "--fix" and e.value.fix
    with pytest.raises(ConfigError, match="no write permission") as e:  # a folder still to be created in it
        flags.output_folder(locked / "new" / "deeper", "--out-dir")
    assert e.value.field == "--out-dir"
    flags.output_file(tmp_path / "ok.jsonl", "--fix")  # elsewhere: fine
    flags.output_folder(tmp_path / "new", "--out-dir")


def test_input_file_names_standard_input_or_a_pipe(tmp_path):
    import os
    from fastchat_ft.errors import DataError
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for path in ("-", str(fifo)):
        with pytest.raises(DataError, match="not a regular file") as e:
            flags.input_file(path, "--data")
        assert e.value.field == "--data" and e.value.file == path
    with pytest.raises(DataError, match="file not found"):
        flags.input_file(tmp_path / "missing.jsonl", "--data")
