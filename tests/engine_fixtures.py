"""A tiny engine run for end-to-end tests: a random tiny Llama with the SmolLM2 tokenizer, the first lines of the
bundled demo data as train/val files, and a training YAML; plus a subprocess runner for CLI/torchrun runs."""
from __future__ import annotations

import hashlib
import subprocess
import types
from pathlib import Path

import torch
import yaml

from conftest import shared_path
from fastchat_ft import config
from fastchat_ft.engine.rundir import write_run_files
from fastchat_ft.model.tiny import build_tiny_model

DEMO = Path(config.__file__).parent / "assets" / "demo"


def tiny_run_config(folder: Path, train_lines: int, val_lines: int, **settings) -> tuple[Path, Path]:
    """Write folder/tiny (the model), folder/{train,val}.jsonl and folder/c.yaml (settings over the data keys);
    returns (config path, model folder)."""
    model = build_tiny_model(folder / "tiny", shared_path("tokenizers", "smollm2"))
    for name, lines in (("train.jsonl", train_lines), ("val.jsonl", val_lines)):
        (folder / name).write_text("".join((DEMO / name).read_text().splitlines(keepends=True)[:lines]))
    cfg = folder / "c.yaml"
    # system_prompt "": the end-to-end tests size their rows without the SmolLM2 template's default system turn
    # (tests/test_engine_system_prompt.py covers that default)
    cfg.write_text(yaml.safe_dump({
        "base_model": str(model), "datasets": [{"path": "train.jsonl", "type": "chat_template"}],
        "test_datasets": [{"path": "val.jsonl"}], "output_dir": "unused", "system_prompt": "", **settings}))
    return cfg, model


def run_ok(cmd: list[str], env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def write_run(tmp_path: Path, cfg, run_data, tok_dir: Path) -> Path:
    """tmp_path/run as the engine lays it out before training (data/, splits.json, config), for tests of the
    data split and the export's statistics without training anything."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    s = types.SimpleNamespace(data=run_data, device=torch.device("cpu"), model_info={"base_dir": tok_dir},
                              tokenizer_dir=tok_dir)
    write_run_files(run_dir, cfg, s, resumed=False)
    return run_dir


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder with its content hash: a run or input that a command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def enter_root(root: Path, monkeypatch) -> None:
    """A test's working folder and data cache: the module's scratch root (the CLI reads relative paths there)."""
    monkeypatch.setenv("FASTCHAT_FT_CACHE", str(root / "cache"))
    monkeypatch.chdir(root)


def fails_cleanly(capsys, argv: list[str], *words: str) -> str:
    """cli.main(argv) exits 1 with an error naming every word, a fix and no traceback; returns stderr."""
    from fastchat_ft import cli

    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err and "fix:" in err, err
    for w in words:
        assert w in err, (w, err)
    return err
