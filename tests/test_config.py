"""The training config: defaults, YAML load/save, overrides, and errors that name the key and a fix."""
import pytest
import yaml

from fastchat_ft import config
from fastchat_ft.errors import ConfigError


def test_defaults_follow_common_chat_finetuning_practice():
    cfg = config.TrainConfig()
    assert cfg.adapter == "lora" and cfg.resolved_learning_rate() == 2e-4
    assert cfg.num_epochs == 3
    assert cfg.micro_batch_size * cfg.gradient_accumulation_steps == 16
    assert (cfg.warmup_ratio, cfg.lr_scheduler, cfg.max_grad_norm) == (0.1, "cosine", 1.0)
    cfg.adapter = None
    assert cfg.resolved_learning_rate() == 2e-5


def test_bundled_default_config_loads_and_points_at_the_demo_data():
    cfg = config.load()
    assert cfg.datasets and cfg.test_datasets
    for entry in cfg.datasets + cfg.test_datasets:
        assert entry["path"].endswith(".jsonl")
        with open(entry["path"]) as f:
            assert f.readline().startswith("{")


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rte: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    msg = str(e.value)
    assert "learning_rte" in msg and "did you mean 'learning_rate'" in msg and str(path) in msg


@pytest.mark.parametrize("key, value, words", [
    ("adapter", "lorra", ["adapter", "did you mean 'lora'"]),
    ("micro_batch_size", 0, ["micro_batch_size", "> 0"]),
    ("micro_batch_size", "four", ["micro_batch_size", "expected int"]),
    ("sample_packing", "yes please", ["sample_packing", "expected bool"]),
    ("warmup_ratio", 1.5, ["warmup_ratio", "< 1"]),
    ("learning_rate", -1.0, ["learning_rate", ">= 0"]),
    ("lr_scheduler", "cosin", ["lr_scheduler", "did you mean 'cosine'"]),
    ("loss_normalization", "tokens", ["loss_normalization", "did you mean 'token'"]),
    ("lora_target_modules", [], ["lora_target_modules", "non-empty"]),
    # NaN passes `value <= 0`; inf passes every bound: both used to reach training (or a ValueError in it)
    ("num_epochs", float("nan"), ["num_epochs", "finite"]),
    ("learning_rate", float("inf"), ["learning_rate", "finite"]),
    ("learning_rate", float("nan"), ["learning_rate", "finite"]),
    ("warmup_ratio", float("nan"), ["warmup_ratio", "finite"]),
    ("max_grad_norm", float("-inf"), ["max_grad_norm", "finite"]),
    ("seed", -1, ["seed", "non-negative"]),  # was a TypeError from the native packer
    ("seed", 2**70, ["seed", "non-negative"]),
])
def test_bad_values_name_the_key_and_the_fix(key, value, words):
    with pytest.raises(ConfigError) as e:
        config.from_dict({key: value})
    for w in words:
        assert w in str(e.value)
    assert e.value.field == key and e.value.fix


def test_dataset_entries_are_checked():
    with pytest.raises(ConfigError, match="did you mean 'path'"):
        config.from_dict({"datasets": [{"pth": "a.jsonl"}]})
    with pytest.raises(ConfigError, match="chat_template"):
        config.from_dict({"datasets": [{"path": "a.jsonl", "chat_template": "chatmll"}]})
    with pytest.raises(ConfigError, match="not supported"):
        config.from_dict({"datasets": [{"path": "a.jsonl", "type": "alpaca_instruct"}]})
    cfg = config.from_dict({"datasets": ["a.jsonl"]})
    assert cfg.datasets == [{"path": "a.jsonl", "type": "chat_template"}]


def test_overrides_parse_values_as_yaml_and_are_validated():
    cfg = config.load(None, ["learning_rate=1e-4", "sample_packing=false", "adapter=null", "lora_r=8",
                             "lora_target_modules=[q_proj, v_proj]"])
    assert cfg.learning_rate == 1e-4 and cfg.sample_packing is False and cfg.adapter is None
    assert cfg.lora_r == 8 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config.load(None, ["learning_rate"])
    with pytest.raises(ConfigError, match="did you mean 'num_epochs'"):
        config.load(None, ["num_epoch=2"])


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 8\nlora_alpha: [16\nseed: 1\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.file == str(path) and e.value.line is not None


def test_save_then_load_round_trips_and_relative_paths_follow_the_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    src = tmp_path / "c.yaml"
    src.write_text("datasets:\n  - path: d.jsonl\n    type: chat_template\nlora_r: 4\nnum_epochs: 1\n")
    cfg = config.load(src)
    assert cfg.datasets[0]["path"] == str(tmp_path / "d.jsonl")
    assert cfg.num_epochs == 1.0 and isinstance(cfg.num_epochs, float)
    out = tmp_path / "sub" / "saved.yaml"
    out.parent.mkdir()
    config.save(cfg, out)
    again = config.load(out)
    assert again.to_dict() == cfg.to_dict() and again.config_hash() == cfg.config_hash()
    assert yaml.safe_load(out.read_text())["lora_r"] == 4


def test_a_dataset_level_chat_template_applies_when_no_top_level_one_is_given():
    cfg = config.from_dict({"datasets": [{"path": "a.jsonl", "type": "chat_template", "chat_template": "llama3"}]})
    assert cfg.chat_template == "llama3"  # Axolotl's per-dataset key, not silently chatml
    both = {"datasets": [{"path": "a.jsonl", "chat_template": "llama3"}],
            "test_datasets": [{"path": "b.jsonl", "chat_template": "llama3"}]}
    assert config.from_dict(both).chat_template == "llama3"
    top = config.from_dict({"chat_template": "tokenizer", "datasets": [{"path": "a.jsonl", "chat_template": "chatml"}]})
    assert top.chat_template == "tokenizer"  # an explicit top-level value (or --set) decides for every file
    with pytest.raises(ConfigError, match="different chat_templates") as e:
        config.from_dict({"datasets": [{"path": "a.jsonl", "chat_template": "llama3"},
                                       {"path": "b.jsonl", "chat_template": "mistral"}]})
    assert e.value.field == "datasets" and "top-level chat_template" in e.value.fix
    assert config.from_dict({"datasets": ["a.jsonl"]}).chat_template == "chatml"


def test_nan_and_inf_overrides_are_refused(tmp_path):
    for item, key in (("num_epochs=.nan", "num_epochs"), ("learning_rate=.inf", "learning_rate"),
                      ("lora_dropout=.nan", "lora_dropout"), ("max_steps=.nan", "max_steps")):
        with pytest.raises(ConfigError) as e:
            config.load(None, [item])
        assert e.value.field == key and e.value.fix, item


def test_a_folder_given_as_the_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder") as e:
        config.load(tmp_path)
    assert e.value.file == str(tmp_path) and e.value.fix
