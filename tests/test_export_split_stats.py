"""The exported artifacts never count val_set_size's held-out conversations as training data, also when the
training file was too big for the engine to copy as data/train.jsonl (splits.json then names the whole file
and its held-out lines): dataset_info.json, generation_notes.md and the shipped data/ split hold only the
training records. The size limits are lowered by monkeypatch instead of writing 50 MB."""
from __future__ import annotations

import json
import types

import pytest

from engine_fixtures import write_run
from fastchat_ft import config, export_artifacts
from fastchat_ft.engine import data as data_mod
from fastchat_ft.engine import rundir

pytestmark = pytest.mark.usefixtures("private_data_cache")


def markers(records) -> list[str]:
    """The unique word each conversation's answer starts with."""
    return [r["messages"][1]["content"].split()[0] for r in records]


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def make_run(tmp_path, tok_dir, n: int, fmt: str, **kw):
    """A run folder of a training file of n conversations (blank lines in the JSONL, so a record's line is not
    its index + 1), with the engine's split recorded."""
    records = [{"messages": [{"role": "user", "content": f"say something about item {i}"},
                             {"role": "assistant", "content": f"mark{i}x " + "word " * (i % 5)}]}
               for i in range(n)]
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in records]
        lines[4:4] = ["", ""]
        path = tmp_path / "chat.jsonl"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = tmp_path / "chat.json"
        path.write_text("[\n" + ",\n\n".join(json.dumps(r) for r in records) + "\n]\n")
    cfg = config.from_dict({"datasets": [{"path": str(path)}], "sequence_len": 64, "sample_packing": False,
                            "seed": 5, **kw})
    run_dir = write_run(tmp_path, cfg, data_mod.build_run_data(cfg, tok_dir), tok_dir)
    return path, records, run_dir


def export(tmp_path, run_dir, tok_dir):
    out = tmp_path / "export"
    out.mkdir()
    source = types.SimpleNamespace(run_dir=run_dir, path=run_dir / "final", tokenizer_dir=tok_dir)
    return out, export_artifacts.write_artifacts(source, None, out)


def held_and_trained(run_dir, path, records) -> tuple[list[str], list[str]]:
    val = json.loads((run_dir / "data" / "splits.json").read_text())["val"][0]
    text = path.read_text().split("\n")
    held = [json.loads(text[n - 1].rstrip(","))["messages"][1]["content"].split()[0] for n in val["lines"]]
    return held, [m for m in markers(records) if m not in held]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_train_stats_leave_out_held_out_records_of_a_file_too_big_to_copy(tmp_path, tok_dir, monkeypatch, fmt):
    monkeypatch.setattr(rundir, "COPY_LIMIT", 0)  # as if the training file were over 50 MB
    path, records, run_dir = make_run(tmp_path, tok_dir, 17, fmt, val_set_size=0.3)
    assert not (run_dir / "data" / "train.jsonl").exists()  # the case where export read the whole file
    held, trained = held_and_trained(run_dir, path, records)
    assert len(held) == 5 and len(trained) == 12

    out, info = export(tmp_path, run_dir, tok_dir)
    stats = info["dataset_info"]
    assert stats["train"]["conversations"] == 12 and stats["val"]["conversations"] == 5
    assert "analyze_error" not in stats["train"]
    assert json.loads((out / "dataset_info.json").read_text())["train"]["conversations"] == 12
    assert markers(read_jsonl(out / "data" / "train.jsonl")) == trained  # the shipped split: training records
    assert sorted(markers(read_jsonl(out / "data" / "val.jsonl"))) == sorted(held)
    entry = json.loads((out / "data" / "splits.json").read_text())["train"]
    assert entry["path"] == str(path.resolve()) and entry["copied_as"] == "data/train.jsonl"
    assert len(entry["held_out_lines"]) == 5
    assert "12 train / 5 validation" in (out / "generation_notes.md").read_text()
    assert not list(out.rglob("*.tmp"))


def test_over_the_export_copy_limit_stats_still_leave_them_out(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(rundir, "COPY_LIMIT", 0)
    monkeypatch.setattr(export_artifacts, "COPY_SPLITS_UP_TO", 0)  # nothing shipped: referenced by path only
    path, records, run_dir = make_run(tmp_path, tok_dir, 11, "jsonl", val_set_size=3)
    out, info = export(tmp_path, run_dir, tok_dir)
    assert info["dataset_info"]["train"]["conversations"] == 8 and info["dataset_info"]["val"]["conversations"] == 3
    assert sorted(p.name for p in (out / "data").iterdir()) == ["splits.json"]  # the stats' copy is gone
    entry = json.loads((out / "data" / "splits.json").read_text())["train"]
    assert entry["path"] == str(path.resolve()) and "copied_as" not in entry and len(entry["held_out_lines"]) == 3
    assert entry["sha256"] == data_mod.file_digest(path)


@pytest.mark.parametrize("copy_limit", [0, None])
def test_without_a_split_the_whole_training_file_is_train(tmp_path, tok_dir, monkeypatch, copy_limit):
    if copy_limit is not None:
        monkeypatch.setattr(rundir, "COPY_LIMIT", copy_limit)
    path, records, run_dir = make_run(tmp_path, tok_dir, 9, "jsonl")
    out, info = export(tmp_path, run_dir, tok_dir)
    assert info["dataset_info"]["train"]["conversations"] == 9 and "val" not in info["dataset_info"]
    entry = json.loads((out / "data" / "splits.json").read_text())["train"]
    assert "held_out_lines" not in entry and markers(read_jsonl(out / "data" / entry["copied_as"][5:])) == \
        markers(records)


def test_a_copied_train_split_was_already_right(tmp_path, tok_dir):
    path, records, run_dir = make_run(tmp_path, tok_dir, 13, "jsonl", val_set_size=4)
    assert (run_dir / "data" / "train.jsonl").is_file()
    held, trained = held_and_trained(run_dir, path, records)
    out, info = export(tmp_path, run_dir, tok_dir)
    assert info["dataset_info"]["train"]["conversations"] == 9
    assert markers(read_jsonl(out / "data" / "train.jsonl")) == trained


def test_split_stats_count_the_default_system_prompt_training_added(tmp_path, tok_dir):
    """system_prompt unset: training gave each conversation without a system turn the model's default one
    (SmolLM2's), so the exported statistics count it too; system_prompt "" trains, and counts, none."""
    from fastchat_ft.data.analyze import analyze_file
    from fastchat_ft.data.template_defaults import model_default_system

    path, records, _ = make_run(tmp_path, tok_dir, 6, "jsonl")
    system = model_default_system(str(tok_dir), "chatml")
    assert system  # the premise: SmolLM2's template adds one
    cfg = {"chat_template": "chatml", "sequence_len": 256}
    with_default = export_artifacts.analyze_split(path, tok_dir, None, cfg)
    without = export_artifacts.analyze_split(path, tok_dir, None, {**cfg, "system_prompt": ""})
    assert "analyze_error" not in with_default
    expected = analyze_file(path, str(tok_dir), template="chatml", max_seq_len=256, system_prompt=system)
    assert with_default["tokens"]["total"] == expected["tokens"]["total"]
    assert with_default["tokens"]["total"] > without["tokens"]["total"]
    given = export_artifacts.analyze_split(path, tok_dir, None, {**cfg, "system_prompt": "Be brief."})
    assert without["tokens"]["total"] < given["tokens"]["total"] < with_default["tokens"]["total"]
