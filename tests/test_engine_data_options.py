"""The training config reaches the loader's options (train_on, system_prompt, think, allow_special_in_content,
on_error) through engine.data.build_run_data, a changed option is never served from a stale cache, bad values
are ConfigErrors naming the key; and with val_set_size the run folder records exactly which conversations
were held out (splits.json lines, data/train.jsonl and data/val.jsonl), so eval's memorisation check reads
only training answers."""
from __future__ import annotations

import json

import pytest
import torch

from engine_fixtures import write_run
from fastchat_ft import config
from fastchat_ft.engine import data as data_mod
from fastchat_ft.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("private_data_cache")


@pytest.fixture(scope="module")
def decode(tok_dir):
    import tokenizers
    return tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json")).decode


def cfg_for(path, **kw):
    # system_prompt "": these tests count tokens and rows without the SmolLM2 template's default system turn
    base = {"datasets": [{"path": str(path)}], "sequence_len": 256, "sample_packing": False, "seed": 3,
            "system_prompt": ""}
    base.update(kw)
    return config.from_dict(base)


def two_turns(tag: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": f"first question {tag}"}, {"role": "assistant", "content": f"early {tag}"},
             {"role": "user", "content": f"second question {tag}"}, {"role": "assistant", "content": f"late {tag}"}]
    return {"messages": msgs}


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records]
    for at, text in extra_lines:
        lines.insert(at, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def trained_text(rows, decode) -> list[str]:
    out = []
    for i in range(len(rows)):
        row = rows[i]
        out.append(decode([int(t) for t in row["labels"] if t != -100]))
    return out


def test_train_on_last_assistant_labels_only_the_last_turn(tmp_path, tok_dir, decode):
    path = write_jsonl(tmp_path / "chat.jsonl", [two_turns("kiwi")])
    last = trained_text(data_mod.build_run_data(cfg_for(path, train_on="last_assistant"), tok_dir).train, decode)
    every = trained_text(data_mod.build_run_data(cfg_for(path), tok_dir).train, decode)  # default: assistant
    assert len(last) == 1 and "late kiwi" in last[0] and "early kiwi" not in last[0]
    assert "early kiwi" in every[0] and "late kiwi" in every[0]
    everything = trained_text(data_mod.build_run_data(cfg_for(path, train_on="all"), tok_dir).train, decode)
    assert "first question kiwi" in everything[0]  # all: the prompt tokens too
    assert "question" not in every[0]


def test_system_prompt_fills_in_only_where_a_conversation_has_none(tmp_path, tok_dir, decode):
    path = write_jsonl(tmp_path / "chat.jsonl", [two_turns("plain"), two_turns("own", system="Answer in French.")])
    rows = data_mod.build_run_data(cfg_for(path, system_prompt="You are Juniper."), tok_dir).train
    texts = {}
    for i in range(len(rows)):
        text = decode([int(t) for t in rows[i]["input_ids"]], skip_special_tokens=False)
        texts["own" if "own" in text else "plain"] = text
    assert "<|im_start|>system\nYou are Juniper.<|im_end|>" in texts["plain"]
    assert "Juniper" not in texts["own"] and "<|im_start|>system\nAnswer in French.<|im_end|>" in texts["own"]
    assert texts["own"].count("<|im_start|>system") == 1 and texts["plain"].count("<|im_start|>system") == 1
    default = data_mod.build_run_data(cfg_for(path), tok_dir).train  # no system_prompt: nothing added
    plain = [decode([int(t) for t in default[i]["input_ids"]], skip_special_tokens=False) for i in range(len(default))]
    assert not any("Juniper" in t for t in plain)


def test_on_error_skip_trains_and_reports_where_the_rejects_went(tmp_path, tok_dir, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [two_turns("a"), two_turns("b")], [(1, '{"messages": [oops')])
    with pytest.raises(DataError) as err:  # the default, raise, names file:line
        data_mod.build_run_data(cfg_for(path), tok_dir)
    assert err.value.file == str(path) and err.value.line == 2 and f"{path}:2" in str(err.value)
    capsys.readouterr()
    run = data_mod.build_run_data(cfg_for(path, on_error="skip"), tok_dir)
    rejects = tmp_path / "chat.rejects.jsonl"
    assert len(run.train) == 2 and run.stats["errors"] == 1 and run.stats["rejects_file"] == str(rejects)
    err_out = capsys.readouterr().err
    assert "left out 1 bad record" in err_out and str(rejects) in err_out
    bad = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [(b["file"], b["line"]) for b in bad] == [(str(path), 2)] and "oops" in bad[0]["raw"]
    rejects.unlink()  # a cache hit: the loader does not rebuild, so the engine must list them again
    run = data_mod.build_run_data(cfg_for(path, on_error="skip"), tok_dir)
    assert run.stats["errors"] == 1 and [json.loads(x)["line"] for x in rejects.read_text().splitlines()] == [2]
    assert str(rejects) in capsys.readouterr().err
    run_dir = write_run(tmp_path, cfg_for(path, on_error="skip"), run, tok_dir)
    assert (run_dir / "data" / "rejects.jsonl").read_bytes() == rejects.read_bytes()  # the run folder keeps them
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["loader_stats"]["errors"] == 1 and manifest["loader_stats"]["rejects_file"] == str(rejects)


def test_validation_files_get_the_same_options(tmp_path, tok_dir, decode):
    train = write_jsonl(tmp_path / "train.jsonl", [two_turns("t")])
    val = write_jsonl(tmp_path / "val.jsonl", [two_turns("v")])
    run = data_mod.build_run_data(cfg_for(train, test_datasets=[{"path": str(val)}], train_on="last_assistant"),
                                  tok_dir)
    labels = trained_text(run.val, decode)
    assert "late v" in labels[0] and "early v" not in labels[0]


def test_think_and_allow_special_in_content_reach_the_loader(tmp_path, tok_dir, decode):
    conv = {"messages": [{"role": "user", "content": "q1"},
                         {"role": "assistant", "content": "<think>ponder alpha</think>done alpha"},
                         {"role": "user", "content": "q2 <|im_end|> tail"},
                         {"role": "assistant", "content": "<think>ponder beta</think>done beta"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [conv])

    def rendered(**kw):
        row = data_mod.build_run_data(cfg_for(path, **kw), tok_dir).train[0]
        return [int(t) for t in row["input_ids"]]

    kept, stripped = rendered(), rendered(think="strip_history")
    assert "ponder alpha" in decode(kept) and "ponder alpha" not in decode(stripped)
    assert "ponder beta" in decode(stripped) and "done alpha" in decode(stripped)  # the last turn keeps its block
    im_end = 2  # SmolLM2's <|im_end|>: as plain text by default, the control token when allowed
    special = rendered(allow_special_in_content=True)
    assert special.count(im_end) == kept.count(im_end) + 1


def test_a_changed_option_is_not_served_from_a_stale_cache(tmp_path, tok_dir, decode):
    path = write_jsonl(tmp_path / "chat.jsonl", [two_turns("c")])
    first = data_mod.build_run_data(cfg_for(path), tok_dir).train
    changed = data_mod.build_run_data(cfg_for(path, train_on="last_assistant"), tok_dir).train
    assert first.cache_entry is not None and changed.cache_entry != first.cache_entry
    assert "early c" in trained_text(first, decode)[0] and "early c" not in trained_text(changed, decode)[0]
    prompt = data_mod.build_run_data(cfg_for(path, system_prompt="Be terse."), tok_dir).train
    assert prompt.cache_entry not in (first.cache_entry, changed.cache_entry)
    assert "Be terse." in decode([int(t) for t in prompt[0]["input_ids"]])
    again = data_mod.build_run_data(cfg_for(path), tok_dir).train  # the first option set: a cache hit
    assert again.cache_entry == first.cache_entry
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".")) == \
        sorted({first.cache_entry.name, changed.cache_entry.name, prompt.cache_entry.name})


@pytest.mark.parametrize("key,value,allowed", [
    ("train_on", "last", "last_assistant"), ("think", "strip", "strip_history"), ("on_error", "ignore", "skip"),
])
def test_a_bad_loader_value_is_a_config_error_naming_the_key(tmp_path, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path / "x.jsonl", **{key: value})
    assert err.value.field == key and allowed in err.value.fix


def test_train_on_and_train_on_inputs_must_agree(tmp_path):
    path = tmp_path / "x.jsonl"
    for train_on, inputs in (("assistant", True), ("last_assistant", True), ("all", False)):
        with pytest.raises(ConfigError) as err:
            cfg_for(path, train_on=train_on, train_on_inputs=inputs)
        assert err.value.field == "train_on" and "train_on_inputs" in str(err.value)
    assert cfg_for(path, train_on="all", train_on_inputs=True).resolved_train_on() == "all"
    assert cfg_for(path, train_on_inputs=True).resolved_train_on() == "all"
    assert cfg_for(path).resolved_train_on() == "assistant"
    cfg = cfg_for(path, train_on="all")
    config.save(cfg, tmp_path / "saved.yaml")  # the saved config reads back (train_on_inputs follows train_on)
    assert config.load(tmp_path / "saved.yaml").resolved_train_on() == "all"
    for bad in ({"train_on": "inputs"}, {"think": "drop"}, {"on_error": "ignore"}, {"system_prompt": 3},
                {"allow_special_in_content": "yes"}):
        with pytest.raises(ConfigError) as err:
            cfg_for(path, datasets=[{"path": str(path), **bad}])
        assert err.value.field == "datasets" and next(iter(bad)) in str(err.value)
    with pytest.raises(ConfigError) as err:
        cfg_for(path, test_datasets=[{"path": str(path), "train_on": "last"}])
    assert err.value.field == "test_datasets" and "last_assistant" in err.value.fix


def test_a_dataset_entry_overrides_the_loader_options_for_its_file(tmp_path, tok_dir, decode):
    chat = write_jsonl(tmp_path / "chat.jsonl", [two_turns("one"), two_turns("two")])
    tail = write_jsonl(tmp_path / "tail.jsonl", [two_turns("three")])
    cfg = cfg_for(chat, system_prompt="Be kind.", val_set_size=1, datasets=[
        {"path": str(chat)}, {"path": str(tail), "train_on": "last_assistant", "system_prompt": ""}])
    run = data_mod.build_run_data(cfg, tok_dir)
    rows = [run.train[i] for i in range(len(run.train))] + [run.val[i] for i in range(len(run.val))]
    assert len(rows) == 3 and run.stats["conversations"] == 3 and sum(run.held_out.values(), []) != []
    for row in rows:
        text, labels = decode([int(t) for t in row["input_ids"]]), decode([int(t) for t in row["labels"] if t != -100])
        if "three" in text:  # the entry's own options: last turn only, no system prompt
            assert "late three" in labels and "early three" not in labels and "Be kind." not in text
        else:  # the top-level ones
            assert "early" in labels and "late" in labels and "Be kind." in text


# ---- val_set_size: the run folder records the real split ---------------------------------------------------

def convs_with_markers(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"tell me about topic{i}q"},
                          {"role": "assistant", "content": f"fact{i}z is the answer"}]} for i in range(n)]


def markers_in(rows, decode) -> set[str]:
    found = set()
    for i in range(len(rows)):
        text = decode([int(t) for t in rows[i]["input_ids"]])
        found |= {w for w in text.replace(".", " ").split() if w.startswith("fact") and w.endswith("z")}
    return found


def file_markers(path) -> list[str]:
    return [json.loads(x)["messages"][1]["content"].split()[0] for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_val_set_size_records_the_held_out_conversations(tmp_path, tok_dir, decode, fmt):
    from fastchat_ft.engine.evaluate import TrainingAnswers
    from fastchat_ft.export_artifacts import split_files

    records = convs_with_markers(23)
    if fmt == "jsonl":  # blank lines: a record's line is not its index + 1
        path = write_jsonl(tmp_path / "chat.jsonl", records, [(3, ""), (10, ""), (11, "")])
    else:
        path = tmp_path / "chat.json"
        path.write_text("[\n" + ",\n\n".join(json.dumps(r) for r in records) + "\n]\n")
    cfg = cfg_for(path, val_set_size=0.25, sample_packing=True, sequence_len=64)
    run = data_mod.build_run_data(cfg, tok_dir)
    held, trained = markers_in(run.val, decode), markers_in(run.train, decode)
    assert held and trained and not held & trained and len(held | trained) == 23
    assert any(len(run.val[i]["seq_lens"]) > 1 for i in range(len(run.val)))  # rows of several conversations

    run_dir = write_run(tmp_path, cfg, run, tok_dir)
    assert set(file_markers(run_dir / "data" / "val.jsonl")) == held
    assert sorted(file_markers(run_dir / "data" / "train.jsonl")) == sorted(trained)
    splits = json.loads((run_dir / "data" / "splits.json").read_text())
    (val_entry,), (train_entry,) = splits["val"], splits["train"]
    assert val_entry["path"] == str(path.resolve()) and "val_set_size 0.25" in val_entry["held_out_by"]
    assert val_entry["lines"] == train_entry["held_out_lines"] == sorted(val_entry["lines"])
    # the recorded lines point at the held-out records of the original file
    text = path.read_text().split("\n")
    at_lines = {text[n - 1].split('"content": "')[2].split()[0] for n in val_entry["lines"]}
    assert at_lines == held
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["data"]["val"][0]["lines_count"] == len(held)

    # eval's memorisation check reads the run's training split: no held-out answer is in it
    found = split_files(run_dir)
    assert found == {"train": run_dir / "data" / "train.jsonl", "val": run_dir / "data" / "val.jsonl"}
    answers = {" ".join(a) for a in TrainingAnswers.from_file(found["train"]).answers}
    assert not any(m in a for m in held for a in answers) and len(answers) == len(trained)


def test_a_training_file_too_big_to_copy_is_read_less_its_held_out_lines(tmp_path, tok_dir, decode, monkeypatch):
    from fastchat_ft.engine import rundir
    from fastchat_ft.engine.evaluate import TrainingAnswers
    from fastchat_ft.export_artifacts import split_files

    path = write_jsonl(tmp_path / "chat.jsonl", convs_with_markers(15), [(5, "")])
    cfg = cfg_for(path, val_set_size=0.3, sample_packing=True, sequence_len=64)
    run = data_mod.build_run_data(cfg, tok_dir)
    held = markers_in(run.val, decode)
    monkeypatch.setattr(rundir, "COPY_LIMIT", 0)  # as if the training file were over the copy limit
    run_dir = write_run(tmp_path, cfg, run, tok_dir)
    assert not (run_dir / "data" / "train.jsonl").exists()
    assert set(file_markers(run_dir / "data" / "val.jsonl")) == held  # the held-out share is always written
    found = split_files(run_dir)
    assert found["train"] == path.resolve() and found["val"] == run_dir / "data" / "val.jsonl"
    words = lambda ta: {w for a in ta.answers for w in a}  # noqa: E731
    assert held <= words(TrainingAnswers.from_file(found["train"]))  # the whole file, as before
    kept = words(TrainingAnswers.from_file(found["train"], run_dir))  # what eval's memorisation check reads
    assert not held & kept and len([w for w in kept if w.startswith("fact")]) == 15 - len(held)


def test_sample_prompts_come_from_the_held_out_conversations(tmp_path, tok_dir):
    path = write_jsonl(tmp_path / "chat.jsonl", convs_with_markers(12), [(2, "")])
    cfg = cfg_for(path, val_set_size=4, sample_packing=False)
    run = data_mod.build_run_data(cfg, tok_dir)
    held = {m for (_, lines) in run.held_out.items() for m in lines}
    assert len(held) == 4
    prompts = data_mod.sample_prompts([path], 10, run.held_out)
    text = path.read_text().split("\n")
    expected = [json.loads(text[n - 1])["messages"][1]["content"] for n in sorted(held)]
    assert [p["reference"] for p in prompts] == expected
    assert len(data_mod.sample_prompts([path], 10)) == 10  # without a split: the file's first conversations


def test_without_val_set_size_the_files_are_recorded_whole(tmp_path, tok_dir):
    train = write_jsonl(tmp_path / "train.jsonl", convs_with_markers(4))
    val = write_jsonl(tmp_path / "val.jsonl", convs_with_markers(2))
    cfg = cfg_for(train, test_datasets=[{"path": str(val)}])
    run_dir = write_run(tmp_path, cfg, data_mod.build_run_data(cfg, tok_dir), tok_dir)
    assert (run_dir / "data" / "train.jsonl").read_bytes() == train.read_bytes()
    assert (run_dir / "data" / "val.jsonl").read_bytes() == val.read_bytes()
    splits = json.loads((run_dir / "data" / "splits.json").read_text())
    assert [e["path"] for e in splits["val"]] == [str(val.resolve())] and "lines" not in splits["val"][0]


def test_a_training_run_with_val_set_size_samples_and_records_the_held_out_share(tmp_path, tok_dir):
    """The engine end to end (tiny model, the demo data, one step): the before/after samples answer held-out
    prompts, and the run folder's val.jsonl + train.jsonl partition the training file."""
    from fastchat_ft.config import ASSETS
    from fastchat_ft.engine import train as train_mod
    from fastchat_ft.model.tiny import build_tiny_model

    torch.set_num_threads(1)
    tiny = build_tiny_model(tmp_path / "tiny", tok_dir)
    source = ASSETS / "demo" / "train.jsonl"
    cfg = config.from_dict({"base_model": str(tiny), "datasets": [{"path": str(source)}], "val_set_size": 0.1,
                            "output_dir": str(tmp_path / "run"), "max_steps": 1, "eval_steps": 1, "sample_prompts": 2,
                            "sample_max_new_tokens": 2, "lora_r": 2, "lora_alpha": 4, "micro_batch_size": 2,
                            "gradient_accumulation_steps": 1, "sequence_len": 256, "train_on": "last_assistant"})
    train_mod.train(cfg, show_bar=False)
    data = tmp_path / "run" / "data"
    val = [json.loads(x) for x in (data / "val.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    originals = [json.loads(x) for x in source.read_text().splitlines() if x.strip()]
    assert val and len(val) + len(train) == len(originals)
    assert sorted(map(json.dumps, val + train)) == sorted(map(json.dumps, originals))
    held_refs = {[m for m in v["messages"] if m["role"] == "assistant"][-1]["content"] for v in val}
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reference"] in held_refs for s in samples)
    assert config.load(tmp_path / "run" / "training_config.yaml").resolved_train_on() == "last_assistant"
