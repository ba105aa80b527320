"""The CLI surface: every subcommand is listed, --version works, unbuilt commands fail loudly."""
import subprocess
import sys

import pytest

from fastchat_ft import __version__, cli
from fastchat_ft.errors import NotBuiltYet

EXPECTED = ["validate", "analyze", "split", "train", "eval", "generate", "export", "serve", "bench", "distill"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastchat_ft", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in EXPECTED:
        assert f"    {name}" in out.stdout, name


def test_version_matches_package():
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"fastchat-ft {__version__}"


def test_every_command_has_arguments_and_a_handler_path():
    assert sorted(cli.COMMANDS) == sorted(EXPECTED)
    assert sorted(cli.ARGUMENTS) == sorted(EXPECTED)
    for target, _ in cli.COMMANDS.values():
        module, func = target.split(":")
        assert module.startswith("fastchat_ft.") and func


def test_unbuilt_command_says_so_and_exits_nonzero(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "serve", ("fastchat_ft.does_not_exist:run", "x"))
    with pytest.raises(NotBuiltYet, match="not built yet"):
        cli.resolve_handler("serve")
    assert cli.main(["serve", "some-model"]) == 1


def test_no_command_prints_help_and_fails():
    out = run_cli()
    assert out.returncode == 2
    assert "COMMAND" in out.stdout


def test_every_argument_of_every_command_has_help_text():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse keeps subparsers here
    missing = [f"{name} {action.option_strings[0] if action.option_strings else action.dest}"
               for name, p in sub.choices.items() for action in p._actions
               if action.dest != "help" and not action.help]
    assert missing == []


def test_the_template_names_in_help_are_the_ones_the_encoder_knows():
    from fastchat_ft.data.encode import BUILTIN_TEMPLATES

    assert cli.TEMPLATES.split(", ") == [*BUILTIN_TEMPLATES, "tokenizer"]


def test_debug_is_taken_after_the_subcommand_too(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    for argv in (["validate", missing, "--debug"], ["--debug", "validate", missing]):
        out = run_cli(*argv)
        assert out.returncode == 1, (argv, out.stderr)
        assert "Traceback" in out.stderr and "no such file" in out.stderr, argv
    out = run_cli("validate", missing)  # and without it, none
    assert out.returncode == 1 and "Traceback" not in out.stderr and "no such file" in out.stderr


def test_output_piped_into_head_ends_without_a_traceback(tmp_path):
    # --json lists every issue: far more than a pipe buffer, so the write after `head` exits hits a closed pipe
    bad = '{"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n'
    data = tmp_path / "bad.jsonl"
    data.write_text(bad * 3000)
    out = subprocess.run(f'"{sys.executable}" -m fastchat_ft validate "{data}" --json | head -c 10',
                         shell=True, capture_output=True, text=True, timeout=120)
    assert out.stdout == '{\n  "file"'
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_our_warnings_print_without_our_source_lines(tmp_path):
    from conftest import shared_path
    tok = shared_path("tokenizers", "smollm2")
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    out = run_cli("validate", str(data), "--tokenizer", str(tok), "--template", "tokenizer")
    assert out.returncode == 0
    assert out.stderr.startswith("warning: the dataset tools check template='tokenizer' with the built-in 'chatml'")
    assert "validate.py" not in out.stderr and "RuntimeWarning" not in out.stderr, out.stderr
    debug = run_cli("--debug", "validate", str(data), "--tokenizer", str(tok), "--template", "tokenizer")
    assert "RuntimeWarning: fastchat-ft: the dataset tools" in debug.stderr  # --debug: Python's format, with where


def test_train_resume_before_the_config_is_named_before_anything_loads(tmp_path, monkeypatch, capsys):
    # `train --resume my.yaml` gave my.yaml to --resume and ran the bundled demo config, failing after its model load
    import fastchat_ft.engine.train as train_mod
    monkeypatch.setattr(train_mod, "run_train", lambda args: pytest.fail("reached the training command"))
    cfg = tmp_path / "my.yaml"
    cfg.write_text("max_steps: 2\n")
    assert cli.main(["train", "--resume", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "'--resume'" in err and f"fix: put the config first: fastchat-ft train {cfg} --resume" in err
