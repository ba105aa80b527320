"""Bad training configs from a user sweep: each is a ConfigError naming the file (or the `--set` item), not a
traceback or a silently different config."""
import pytest

from fastchat_ft import config
from fastchat_ft.cli import main
from fastchat_ft.errors import ConfigError


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("hello\n", "str"), ("42\n", "int")])
def test_a_top_level_that_is_not_a_mapping_names_the_file(tmp_path, text, kind):
    # was `ValueError: dictionary update sequence element #0` from apply_overrides
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"mapping of keys to values, not a {kind}") as e:
        config.load(path, ["max_steps=1"])
    assert e.value.file == str(path) and e.value.fix


def test_an_empty_file_is_every_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert config.load(path).lora_r == config.TrainConfig().lora_r


def test_non_utf8_bytes_name_the_file_line_and_offset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"max_steps: 1\n\xff\xfe: 1\n")
    with pytest.raises(ConfigError, match="not UTF-8.*0xff at offset 13") as e:
        config.load(path)
    assert e.value.file == str(path) and e.value.line == 2 and e.value.fix


def test_the_cli_prints_non_utf8_and_non_mapping_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"\xff\n")
    assert main(["train", str(bad), "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert "not UTF-8" in err and "Traceback" not in err


def test_duplicate_keys_are_refused_with_the_key_and_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 1\nlora_r: 4\nmax_steps: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'max_steps' \\(first set on line 1\\)") as e:
        config.load(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 3, "max_steps") and e.value.fix


def test_duplicate_keys_inside_a_dataset_entry_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets:\n  - path: a.jsonl\n    path: b.jsonl\n")
    with pytest.raises(ConfigError, match="duplicate key 'path'") as e:
        config.load(path)
    assert e.value.line == 3


def test_a_merge_key_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets:\n  - &b {path: a.jsonl, train_on: all}\n  - <<: *b\n    path: b.jsonl\n")
    cfg = config.load(path)
    assert [e["path"].rsplit("/", 1)[-1] for e in cfg.datasets] == ["a.jsonl", "b.jsonl"]


def test_an_error_in_a_set_override_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'max_steps'") as e:
        config.load(path, ["max_step=3"])
    assert e.value.file == "--set max_step=3" and e.value.field == "max_step"
    assert str(e.value).startswith("--set max_step=3: ") and str(path) not in str(e.value)
    with pytest.raises(ConfigError) as e:  # the last --set of a key is the one used and blamed
        config.load(path, ["lora_r=4", "lora_r=0"])
    assert e.value.file == "--set lora_r=0"


def test_an_error_from_the_file_still_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 0\n")
    with pytest.raises(ConfigError) as e:
        config.load(path, ["max_steps=3"])
    assert e.value.file == str(path) and e.value.field == "lora_r"


@pytest.mark.parametrize("item, shown", [("system_prompt=Note: be brief", "--set 'system_prompt=\"Note: be brief\"'"),
                                         ("system_prompt=[a]", "--set 'system_prompt=\"[a]\"'")])
def test_a_set_value_that_yaml_reads_as_a_mapping_or_list_suggests_quoting(tmp_path, item, shown):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 1\n")
    with pytest.raises(ConfigError, match="expected str or null") as e:
        config.load(path, [item])
    assert e.value.file == f"--set {item}" and shown in e.value.fix
    assert config.load(path, [shown[len("--set '"):-1]]).system_prompt == item.split("=", 1)[1]


@pytest.mark.parametrize("text, field, line", [
    ("lora_r: 8\n\nlearning_rat: 1.0e-4\n", "learning_rat", 3),   # a typo'd key
    ("# comment\nmax_steps: 5\nadapter: lorra\n", "adapter", 3),   # a bad choice
    ("lora_r: 0\nmax_steps: 5\n", "lora_r", 1),                   # a bad number
    ("lora_r: 8\ndatasets:\n  - path: a.jsonl\n    typ: chat_template\n", "datasets", 2),  # inside an entry: its key
])
def test_an_error_from_the_file_names_the_line_of_its_key(tmp_path, capsys, text, field, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), line, field) and e.value.fix
    assert main(["train", str(path), "--dry-run"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {path}:{line}: field '{field}'")


def test_an_error_from_a_set_override_gets_no_line_of_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 5\nlora_r: 8\n")
    with pytest.raises(ConfigError) as e:
        config.load(path, ["lora_r=0"])
    assert e.value.file == "--set lora_r=0" and e.value.line is None
