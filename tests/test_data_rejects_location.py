"""on_error: skip never needs a writable input folder: when the default rejects place (beside the first input)
cannot be written, the loader keeps the rejects in its cache entry (or a temporary file with cache=False), the
engine reports that file and the run folder gets its copy (data/rejects.jsonl); an explicit rejects_path that
cannot be written is a DataError naming it."""
from __future__ import annotations

import json
import os
import stat
import tempfile

import pytest

from engine_fixtures import write_run
from fastchat_ft import config
from fastchat_ft.data import ChatDataset
from fastchat_ft.data import dataset as dataset_mod
from fastchat_ft.engine import data as data_mod
from fastchat_ft.errors import DataError

pytestmark = pytest.mark.usefixtures("private_data_cache")


def conv(tag: str) -> dict:
    return {"messages": [{"role": "user", "content": f"question {tag}"},
                         {"role": "assistant", "content": f"answer {tag}"}]}


def data_folder(tmp_path):
    """chat.jsonl: two good records around a broken one (line 2)."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    path = folder / "chat.jsonl"
    path.write_text("\n".join([json.dumps(conv("a")), '{"messages": [broken', json.dumps(conv("b"))]) + "\n")
    return folder, path


def snapshot(folder) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def cfg_for(path):
    return config.from_dict({"datasets": [{"path": str(path)}], "sequence_len": 128, "sample_packing": False,
                             "seed": 1, "on_error": "skip"})


def rejected_lines(path) -> list[tuple[str, int]]:
    return [(r["file"], r["line"]) for r in map(json.loads, open(path).read().splitlines())]


def check_engine_keeps_rejects_out_of(folder, path, tmp_path, tok_dir, capsys):
    before = snapshot(folder)
    cfg = cfg_for(path)
    run = data_mod.build_run_data(cfg, tok_dir)
    assert len(run.train) == 2 and run.stats["errors"] == 1
    rejects = run.stats["rejects_file"]
    assert not rejects.startswith(str(folder)) and rejected_lines(rejects) == [(str(path), 2)]
    err = capsys.readouterr().err
    assert "cannot be written" in err and rejects in err
    run_dir = write_run(tmp_path, cfg, run, tok_dir)
    assert rejected_lines(run_dir / "data" / "rejects.jsonl") == [(str(path), 2)]  # the run folder has them
    again = data_mod.build_run_data(cfg, tok_dir)  # a cache hit lists them again, still outside the folder
    assert again.stats["errors"] == 1 and rejected_lines(again.stats["rejects_file"]) == [(str(path), 2)]
    assert not again.stats["rejects_file"].startswith(str(folder))
    assert snapshot(folder) == before  # the input folder is unchanged


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder anyway")
def test_training_data_in_a_read_only_folder(tmp_path, tok_dir, capsys):
    folder, path = data_folder(tmp_path)
    folder.chmod(0o555)
    try:
        check_engine_keeps_rejects_out_of(folder, path, tmp_path, tok_dir, capsys)
    finally:
        folder.chmod(stat.S_IRWXU)


def test_an_unwritable_default_place_falls_back_to_the_cache_entry(tmp_path, tok_dir, capsys, monkeypatch):
    # a path under a regular file cannot be created, not even by root
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(dataset_mod, "default_rejects_path", lambda paths: blocker / "chat.rejects.jsonl")
    folder, path = data_folder(tmp_path)
    check_engine_keeps_rejects_out_of(folder, path, tmp_path, tok_dir, capsys)
    assert blocker.read_text() == ""


def test_without_a_cache_the_fallback_is_a_temporary_file(tmp_path, tok_dir, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(dataset_mod, "default_rejects_path", lambda paths: blocker / "chat.rejects.jsonl")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    _, path = data_folder(tmp_path)
    ds = ChatDataset(path, str(tok_dir), max_seq_len=128, on_error="skip", cache=False, verbose=False)
    assert ds.stats.errors == 1 and ds.stats.conversations == 2
    assert ds.rejects_path.parent == scratch and rejected_lines(ds.rejects_path) == [(str(path), 2)]


def test_every_record_rejected_still_lists_them(tmp_path, tok_dir, capsys, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(dataset_mod, "default_rejects_path", lambda paths: blocker / "bad.rejects.jsonl")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [oops\n{"messages": []}\n')
    with pytest.raises(DataError, match="no trainable conversation"):
        ChatDataset(path, str(tok_dir), max_seq_len=128, on_error="skip", verbose=False)
    listed = capsys.readouterr().err.split("the rejected records are listed in ")[1].split()[0]
    assert rejected_lines(listed) == [(str(path), 1), (str(path), 2)]


@pytest.mark.parametrize("cache", [True, False])
def test_an_explicit_rejects_path_that_cannot_be_written_is_a_data_error(tmp_path, tok_dir, cache):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    _, path = data_folder(tmp_path)
    wanted = blocker / "rejects.jsonl"
    with pytest.raises(DataError) as info:
        ChatDataset(path, str(tok_dir), max_seq_len=128, on_error="skip", rejects_path=wanted, cache=cache,
                    verbose=False)
    assert info.value.file == str(wanted) and "cannot be written" in info.value.reason
    assert "rejects_path" in info.value.fix and str(wanted) in str(info.value)


def test_a_writable_default_place_is_still_beside_the_input(tmp_path, tok_dir):
    _, path = data_folder(tmp_path)
    ds = ChatDataset(path, str(tok_dir), max_seq_len=128, on_error="skip", verbose=False)
    assert ds.rejects_path == path.with_suffix(".rejects.jsonl")
    assert rejected_lines(ds.rejects_path) == [(str(path), 2)]
    ds.rejects_path.unlink()
    hit = ChatDataset(path, str(tok_dir), max_seq_len=128, on_error="skip", verbose=False)  # from the cache
    assert hit.cache_entry == ds.cache_entry and rejected_lines(hit.rejects_path) == [(str(path), 2)]
