"""Bad flag values of eval, generate and serve: a clean error (no traceback) that names the flag or file and
gives a fix, raised before any model loads, with every input left as it was."""
import hashlib

import pytest

from fastchat_ft.cli import main
from test_export_fixtures import tiny_run, write_jsonl  # noqa: F401 (fixtures)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def no_model_load(monkeypatch):
    """Every check must run before a model loads: loading one fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    for module in ("fastchat_ft.engine.evaluate", "fastchat_ft.generate", "fastchat_ft.serve"):
        monkeypatch.setattr(f"{module}.load_model", refuse)


def _clean_error(capsys, *names) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and "fix: " in err, err
    for name in names:
        assert name in err, err
    return err


@pytest.fixture()
def eval_data(tiny_run, tmp_path):
    return write_jsonl(tmp_path / "ev.jsonl", tiny_run["val"][:2])


def _eval(tiny_run, data, *extra) -> int:
    return main(["eval", "--model", str(tiny_run["run"]), "--data", str(data), *extra])


def test_eval_report_that_is_an_input_is_refused(tiny_run, eval_data, no_model_load, capsys):
    train = tiny_run["run"] / "data" / "train.jsonl"
    before = {p: _digest(p) for p in (eval_data, train)}
    assert _eval(tiny_run, eval_data, "--samples", "1", "--report", str(eval_data)) == 1
    _clean_error(capsys, "--report", str(eval_data), "destroy that input")
    # the run's own train split (the memorisation check reads it) is an input too, and so is a given --train-data
    assert _eval(tiny_run, eval_data, "--samples", "1", "--report", str(train)) == 1
    _clean_error(capsys, "--report", str(train))
    assert _eval(tiny_run, eval_data, "--samples", "1", "--train-data", str(train), "--report",
                 str(train.parent / "." / train.name)) == 1
    _clean_error(capsys, "--report")
    assert before == {p: _digest(p) for p in before}


def test_eval_report_in_a_folder_or_a_missing_folder_is_refused_up_front(tiny_run, eval_data, tmp_path,
                                                                         no_model_load, capsys):
    folder = tmp_path / "afolder"
    folder.mkdir()
    assert _eval(tiny_run, eval_data, "--samples", "1", "--report", str(folder)) == 1
    _clean_error(capsys, "--report", "is a folder")
    assert not (tmp_path / "afolder.tmp").exists() and not any(folder.iterdir())
    assert _eval(tiny_run, eval_data, "--samples", "1", "--report", str(tmp_path / "nodir" / "r.md")) == 1
    _clean_error(capsys, "--report", "does not exist")
    assert not (tmp_path / "nodir").exists()


def test_eval_unknown_template_is_a_config_error(tiny_run, eval_data, no_model_load, capsys):
    assert _eval(tiny_run, eval_data, "--template", "bogus") == 1
    err = _clean_error(capsys, "--template", "'bogus'")
    assert "chatml" in err  # the fix lists the names that work


def test_eval_missing_train_data_is_an_error_naming_the_file(tiny_run, eval_data, tmp_path, no_model_load, capsys):
    missing = tmp_path / "nonexist.jsonl"
    assert _eval(tiny_run, eval_data, "--samples", "1", "--train-data", str(missing),
                 "--report", str(tmp_path / "r.md")) == 1
    _clean_error(capsys, "--train-data", str(missing), "not found")
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("flag, value", [("--samples", "-2"), ("--max-new-tokens", "-1"), ("--max-new-tokens", "0"),
                                         ("--max-seq-len", "0")])
def test_eval_impossible_numbers_are_refused(tiny_run, eval_data, tmp_path, no_model_load, capsys, flag, value):
    report = tmp_path / "r.md"
    args = ["--samples", "1", "--report", str(report)] if flag != "--samples" else ["--report", str(report)]
    assert _eval(tiny_run, eval_data, *args, flag, value) == 1
    _clean_error(capsys, flag, f"got {value}")
    assert not report.exists()


def test_eval_good_flags_still_write_the_report(tiny_run, eval_data, tmp_path, capsys):
    report, train = tmp_path / "r.md", tiny_run["run"] / "data" / "train.jsonl"
    before = _digest(eval_data)
    assert _eval(tiny_run, eval_data, "--samples", "1", "--max-new-tokens", "3", "--report", str(report),
                 "--train-data", str(train)) == 0
    assert f"(`{train}`)" in report.read_text() and not (tmp_path / "r.md.tmp").exists()
    assert _digest(eval_data) == before


def test_eval_missing_baseline_is_reported_before_the_model_loads(tiny_run, eval_data, tmp_path, no_model_load,
                                                                  capsys):
    assert _eval(tiny_run, eval_data, "--baseline", str(tmp_path / "nope")) == 1
    _clean_error(capsys, str(tmp_path / "nope"), "no such model folder")


@pytest.mark.parametrize("flags, named", [(["--temperature", "1", "--top-p", "0"], "--top-p"),
                                          (["--top-p", "1.5"], "--top-p"),
                                          (["--temperature", "-1"], "--temperature"),
                                          (["--temperature", "nan"], "--temperature"),
                                          (["--max-new-tokens", "-1"], "--max-new-tokens"),
                                          (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_generate_impossible_values_are_refused_before_the_model_loads(tiny_run, no_model_load, capsys, flags, named):
    # --top-p 0 was a RuntimeError (invalid multinomial distribution), --temperature -1 decoded greedily and
    # --max-new-tokens -1 printed "[stopped at --max-new-tokens -1 ...]"
    assert main(["generate", "--model", str(tiny_run["run"]), "--prompt", "hi?", *flags]) == 1
    _clean_error(capsys, named, "got ")


def test_generate_greedy_and_sampling_values_in_range_still_work(tiny_run, capsys):
    for opts in (["--temperature", "0", "--top-p", "1"], ["--temperature", "2", "--top-p", "0.01", "--seed", "3"]):
        assert main(["generate", "--model", str(tiny_run["run"]), "--prompt", "hi?", "--max-new-tokens", "2",
                     *opts]) == 0
    capsys.readouterr()


def _serve(tiny_run, *extra) -> int:
    return main(["serve", str(tiny_run["run"]), "--backend", "transformers", *extra])


@pytest.mark.parametrize("flags, named", [(["--port", "99999"], "--port"), (["--port", "-1"], "--port"),
                                          (["--max-new-tokens", "-3"], "--max-new-tokens"),
                                          (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_serve_impossible_values_are_refused_at_start_up(tiny_run, no_model_load, capsys, flags, named):
    # --port 99999 was an OverflowError plus an AttributeError ('_open_lock'); --max-new-tokens -3 started and
    # then answered every request without max_tokens with a 400 about a field the client never sent
    assert _serve(tiny_run, *flags) == 1
    _clean_error(capsys, named, flags[1])


def test_serve_busy_port_and_bad_host_are_clean_errors_before_the_model_loads(tiny_run, no_model_load, capsys):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert _serve(tiny_run, "--port", port) == 1
    _clean_error(capsys, "--port", port, "in use")
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): no machine has it, so binding it fails
    assert _serve(tiny_run, "--host", "192.0.2.1", "--port", "0") == 1
    _clean_error(capsys, "--host", "192.0.2.1")


def test_eval_train_data_with_no_conversation_is_an_error(tiny_run, eval_data, tmp_path, no_model_load, capsys):
    # the lenient reader skipped every line and the memorisation check compared the replies with nothing
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [bad\n')
    assert _eval(tiny_run, eval_data, "--samples", "1", "--train-data", str(bad), "--report", str(tmp_path / "r.md")) == 1
    _clean_error(capsys, "--train-data", str(bad), "no conversation")
    assert bad.read_text() == '{"messages": [bad\n' and not (tmp_path / "r.md").exists()
    for content in (b'[{"messages": [', b"\xff\xfe\x00binary"):  # a broken JSON array; not text at all
        bad.write_bytes(content)
        assert _eval(tiny_run, eval_data, "--samples", "1", "--train-data", str(bad)) == 1
        _clean_error(capsys, "--train-data", str(bad), "no conversation")
