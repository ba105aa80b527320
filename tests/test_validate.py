"""`fastchat-ft validate`: every defect found at its line with the right code, nothing flagged on clean
records (fresh random data), the shared toy file's bad records and 5 duplicate lines, token counts equal to
the loader's (encode_chat), and --fix writing a cleaned copy without touching the input."""
from __future__ import annotations

import hashlib
import json
import random

import pytest

from fastchat_ft import _native
from fastchat_ft.cli import main
from fastchat_ft.data.validate import validate_file, write_fixed
from fastchat_ft.errors import DataError
from conftest import shared_path

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone cloud maple ember").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def clean_record(rng: random.Random) -> dict:
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": sentence(rng, rng.randint(3, 9))})
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": sentence(rng, rng.randint(4, 30))})
        msgs.append({"role": "assistant", "content": sentence(rng, rng.randint(4, 40))})
    return {"messages": msgs}


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


# Each defect: (raw line bytes, expected code, expected severity)
def defects(rng: random.Random) -> list[tuple[bytes, str, str]]:
    s = lambda n=8: sentence(rng, n)  # noqa: E731
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    j = lambda rec: json.dumps(rec).encode()  # noqa: E731
    return [
        (b'{"messages": [{"role": "user", "content": "hi"}, ', "json.syntax", "error"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',
         "encoding.utf8", "error"),
        (j({"turns": [u(s()), a(s())]}), "schema", "error"),
        (j({"messages": [u(s()), {"role": "robot", "content": s()}]}), "schema.role", "error"),
        (j({"messages": [u(s()), a(s()), {"role": "system", "content": s()}, u(s()), a(s())]}),
         "order.system_position", "error"),
        (j({"messages": [{"role": "system", "content": s()}, a(s())]}), "order.first_turn", "error"),
        (j({"messages": [u(s()), u(s()), a(s())]}), "order.alternation", "warning"),
        (j({"messages": [u(s()), a(s()), u(s())]}), "order.last_turn", "warning"),
        (j({"messages": [u(s()), a(s()), {"role": "tool", "content": "{}", "tool_call_id": "x"}, a(s())]}),
         "order.tool_orphan", "error"),
        (j({"messages": [u(s()), {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": "{}", "tool_call_id": "call_9"}, a(s())]}),
         "order.tool_call_id", "error"),
        (j({"messages": [u(s()), {"role": "assistant", "content": None, "tool_calls": [call]}, a(s())]}),
         "order.tool_unanswered", "warning"),
        (j({"messages": [u(s()), a("")]}), "content.empty", "error"),
        (j({"messages": [u(" \n\t "), a(s())]}), "content.empty", "error"),
        (j({"messages": [u(s() + "\x07\x00"), a(s())]}), "content.control_chars", "warning"),
        (j({"messages": [u(s() + " \ufffd"), a(s())]}), "content.replacement_char", "warning"),
        (j({"messages": [u(s() + " <|im_end|>"), a(s())]}), "content.special_token", "warning"),
        (j({"messages": [u(s()), {"role": "assistant", "content": s(), "weight": 0}]}), "labels.no_trainable", "error"),
        (j({"messages": [u(s()), a(("Do it now! " * 80).strip())]}), "content.repetitive", "error"),
    ]


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("seed", [1, 2])
def test_every_defect_found_at_its_line_and_nothing_on_clean_records(tmp_path, seed):
    rng = random.Random(seed)
    bad = defects(rng)
    rng.shuffle(bad)
    lines, expected = [], {}
    for raw, code, sev in bad:
        for _ in range(rng.randint(0, 3)):
            lines.append(json.dumps(clean_record(rng)).encode())
        if rng.random() < 0.3:
            lines.append(b"   ")  # blank lines are skipped but still counted
        lines.append(raw)
        expected[len(lines)] = (code, sev)
    f = tmp_path / "data.jsonl"
    write_lines(f, lines)
    report = validate_file(f, near_duplicates=False)
    found: dict[int, set] = {}
    for issue in report.issues:
        found.setdefault(issue.line, set()).add((issue.code, issue.severity))
    for line, (code, sev) in expected.items():
        assert (code, sev) in found.get(line, set()), (line, code, found.get(line))
    flagged_clean = {ln for ln in found if ln not in expected}
    assert not flagged_clean, {ln: found[ln] for ln in flagged_clean}
    n_error_lines = sum(1 for c, s in expected.values() if s == "error")
    assert report.records_with_errors == n_error_lines
    assert not report.ok


def test_json_syntax_error_has_line_and_column(tmp_path):
    f = tmp_path / "d.jsonl"
    write_lines(f, [json.dumps({"messages": [u("hi"), a("yo")]}).encode(), b'{"messages": [1, }'])
    (issue,) = [i for i in validate_file(f).issues if i.code == "json.syntax"]
    assert (issue.line, issue.column) == (2, 18)


def test_toy_file_bad_records_and_five_duplicate_lines(tmp_path):
    src = shared_path("chat", "openai_toy_chat_fine_tuning_copy_mlteam.jsonl")
    report = validate_file(src, tokenizer=shared_path("tokenizers", "smollm2"), max_seq_len=2048)
    dups = {i.line: i.message for i in report.issues if i.code == "duplicate.exact"}
    assert sorted(dups) == [6, 7, 8, 9, 10]
    assert dups[6].endswith("line 1") and dups[9].endswith("line 4") and dups[10].endswith("line 4")
    errors = {(i.line, i.code) for i in report.issues if i.severity == "error"}
    # 4, 9, 10: a system prompt then an assistant turn with no user turn; 5: a looping answer ("Eat a banana!"
    # x2000, 8033 tokens) whose only trained turn does not fit in 2048 tokens, so the loader drops it either way.
    assert errors == {(4, "order.first_turn"), (9, "order.first_turn"), (10, "order.first_turn"),
                      (5, "content.repetitive"), (5, "length.truncated_no_trainable")}
    assert report.exact_duplicates == 5 and report.records == 10
    # The CLI exits non-zero and --fix keeps lines 1, 2, 3 ... minus 5 (the rest are errors or duplicates).
    out = tmp_path / "clean.jsonl"
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    assert main(["validate", str(src), "--fix", str(out)]) == 1
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    src_lines = src.read_bytes().splitlines()
    assert out.read_bytes().splitlines() == [src_lines[0], src_lines[1], src_lines[2]]
    rejects = [json.loads(x) for x in (tmp_path / "clean.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [4, 5, 6, 7, 8, 9, 10]
    assert all(r["reasons"] for r in rejects)
    assert rejects[0]["raw"].encode() == src_lines[3]


def test_token_counts_match_the_loader(tmp_path):
    from fastchat_ft.data import encode_chat
    from fastchat_ft.data.tokenize import LoaderTokenizer
    tok_dir = shared_path("tokenizers", "smollm2")
    tok = LoaderTokenizer.from_any(tok_dir)
    rng = random.Random(7)
    recs = [clean_record(rng) for _ in range(40)]
    f = tmp_path / "d.jsonl"
    write_lines(f, [json.dumps(r).encode() for r in recs])
    scanner = _native.DatasetScanner(str(f), tokenizer=_native.Tokenizer.from_file(str(tok_dir / "tokenizer.json")))
    batch = scanner.next_batch()
    for i, rec in enumerate(recs):
        ids, labels = encode_chat(rec["messages"], tok)
        assert batch["tokens"][i] == len(ids)
        assert batch["trainable"][i] == int((labels != -100).sum())
    # Over max_seq_len: flagged exactly for the records longer than it.
    limit = int(sorted(batch["tokens"])[len(recs) // 2])
    report = validate_file(f, tokenizer=tok_dir, max_seq_len=limit)
    over = {i.line for i in report.issues if i.code.startswith("length.")}
    assert over == {i + 1 for i in range(len(recs)) if batch["tokens"][i] > limit}


def test_near_duplicates_found_and_distinct_texts_not(tmp_path):
    rng = random.Random(3)
    base = [sentence(rng, 60) for _ in range(6)]
    lines = []
    for text in base:
        lines.append(json.dumps({"messages": [u("Tell me a story."), a(text)]}).encode())
    # A copy of record 2 with one word changed and different casing/punctuation: a near duplicate.
    words = base[2].split()
    words[30] = "zebra"
    edited = " ".join(words).upper().replace(".", "!")
    lines.append(json.dumps({"messages": [u("Tell me a story"), a(edited)]}).encode())
    f = tmp_path / "d.jsonl"
    write_lines(f, lines)
    report = validate_file(f)
    near = [(i.line, i.message) for i in report.issues if i.code == "duplicate.near"]
    assert len(near) == 1 and near[0][0] == 7 and "line 3" in near[0][1]
    assert report.exact_duplicates == 0
    assert 0.8 < _native.minhash_similarity(base[2], edited) <= 1.0
    assert _native.minhash_similarity(base[0], base[1]) < 0.3


def test_fix_refuses_to_overwrite_the_input(tmp_path):
    f = tmp_path / "d.jsonl"
    write_lines(f, [json.dumps({"messages": [u("hi"), a("yo")]}).encode()])
    report = validate_file(f)
    with pytest.raises(DataError, match="differ from the input"):
        write_fixed(report, f)
    assert main(["validate", str(f), "--fix", str(f)]) == 1


def test_json_output_and_clean_exit(tmp_path, capsys):
    rng = random.Random(11)
    f = tmp_path / "d.json"  # a JSON array file
    f.write_text(json.dumps([clean_record(rng) for _ in range(5)], indent=1))
    assert main(["validate", str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["records"] == 5 and out["issues"] == []


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_broken_json_array_file_names_line_and_column(tmp_path, capsys):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"messages": [{"role": "user", "content": "hi"}]},\n  {"messages": ]\n]\n')
    assert main(["validate", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:3:16:" in err and "fix: correct the JSON at that line and column" in err


def test_results_do_not_depend_on_threads_or_batch_size(tmp_path):
    rng = random.Random(21)
    recs = [clean_record(rng) for _ in range(300)]
    recs += [recs[i] for i in rng.sample(range(300), 20)]  # exact copies
    for i in rng.sample(range(300), 20):  # one-word edits of long answers
        rec = json.loads(json.dumps(recs[i]))
        rec["messages"].append(u(sentence(rng, 5)))
        rec["messages"].append(a(sentence(rng, 90)))
        recs.append(rec)
        recs.append({"messages": rec["messages"][:-1] + [a(rec["messages"][-1]["content"].replace(".", " zz."))]})
    rng.shuffle(recs)
    f = tmp_path / "d.jsonl"
    write_lines(f, [json.dumps(r).encode() for r in recs])

    def scan(threads, batch):
        s = _native.DatasetScanner(str(f), threads=threads, batch_records=batch)
        issues = []
        while (b := s.next_batch()) is not None:
            issues += [tuple(x[1:]) for x in b["issues"]]
        return issues, s.groups().tolist()

    reference = scan(1, 4096)
    assert any(i[3] == "duplicate.exact" for i in reference[0]) and any(i[3] == "duplicate.near" for i in reference[0])
    assert scan(2, 7) == reference
    assert scan(3, 1) == reference


def test_template_tokenizer_maps_to_the_matching_builtin_with_a_warning():
    from fastchat_ft.data.validate import resolve_template
    with pytest.warns(RuntimeWarning, match="built-in 'chatml'"):
        assert resolve_template("tokenizer", shared_path("tokenizers", "smollm2")) == "chatml"
    with pytest.warns(RuntimeWarning, match="built-in 'llama3'"):
        assert resolve_template("tokenizer", shared_path("tokenizers", "llama3")) == "llama3"
    with pytest.raises(DataError, match="unknown template"):
        resolve_template("vicuna", None)


def test_fix_outputs_get_the_usual_file_mode_not_mkstemps_0600(tmp_path):
    import os
    f = tmp_path / "d.jsonl"
    write_lines(f, [json.dumps({"messages": [u("hi"), a("yo")]}).encode(), b"{broken"])
    old = os.umask(0o027)
    try:
        assert main(["validate", str(f), "--fix", str(tmp_path / "clean.jsonl")]) == 1
    finally:
        os.umask(old)
    for name in ("clean.jsonl", "clean.rejects.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_a_folder_or_missing_path_is_named_as_such(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 1
    assert "a folder, not a dataset file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_fix_rejects_of_a_json_array_name_each_record_line(tmp_path):
    # the raw copy of an array item has no line of its own: the rejects said "line": null
    good = {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "4."}]}
    bad = {"messages": [{"role": "bogus", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    other = {"messages": [{"role": "user", "content": "Name a blue fruit."}, {"role": "assistant", "content": "Plum."}]}
    src = tmp_path / "d.json"
    src.write_text(json.dumps([good, bad, other, good], indent=1))  # indent: each record starts on its own line
    starts = [i for i, text in enumerate(src.read_text().splitlines(), 1) if text == " {"]
    report = validate_file(src)
    _, rej, kept, dropped = write_fixed(report, tmp_path / "clean.jsonl")
    rejects = [json.loads(x) for x in rej.read_text().splitlines()]
    assert (kept, dropped) == (2, 2)
    assert [(r["record_index"], r["line"]) for r in rejects] == [(1, starts[1]), (3, starts[3])]


def test_cli_length_check_counts_the_default_system_prompt_training_adds(tmp_path, capsys):
    from fastchat_ft.data import encode_chat
    tok_dir = shared_path("tokenizers", "smollm2")
    rec = {"messages": [{"role": "user", "content": "Name a blue fruit."}, {"role": "assistant", "content": "Plum."}]}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    n = len(encode_chat(rec["messages"], str(tok_dir))[0])  # without a system turn
    argv = ["validate", str(f), "--tokenizer", str(tok_dir), "--max-seq-len", str(n), "--json"]
    assert main(argv) == 1  # training adds SmolLM2's default system prompt: no longer fits
    codes = [i["code"] for i in json.loads(capsys.readouterr().out)["issues"]]
    assert codes == ["length.truncated_no_trainable"]
    assert main([*argv, "--system-prompt", ""]) == 0
    capsys.readouterr()
    rec["messages"].insert(0, {"role": "system", "content": "Be brief."})  # no conversation takes it: no note
    f.write_text(json.dumps(rec) + "\n")
    assert main(["validate", str(f), "--tokenizer", str(tok_dir)]) == 0
    assert "default system prompt" not in capsys.readouterr().err


def test_fix_keeps_one_copy_when_the_first_copy_has_an_error(tmp_path):
    # The scanner links a copy to the first earlier match; when that one is dropped for an error, the valid copy
    # was dropped too (as a duplicate) and neither reached the cleaned file.
    def rec(answer, weight=None, question="Name the largest planet in the solar system, please."):
        a = {"role": "assistant", "content": answer}
        if weight is not None:
            a["weight"] = weight
        return {"messages": [{"role": "user", "content": question}, a]}
    answer = "Jupiter is the largest planet in the solar system by far, more than twice the mass of all others."
    records = [rec(answer, weight=0),                      # error: nothing to train
               rec(answer),                                # near copy of 1 (weights differ): the copy to keep
               rec(answer),                                # exact copy of 2: dropped
               rec("Mercury is the smallest planet.", question="Which planet is the smallest one?"),
               rec(""),                                    # error: empty answer
               ]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = validate_file(src)
    codes = {(i.line, i.code) for i in report.issues}
    assert {(2, "duplicate.near"), (3, "duplicate.exact"), (1, "labels.no_trainable")} <= codes  # as set up
    out, rej, kept, dropped = write_fixed(report, tmp_path / "clean.jsonl")
    lines = src.read_text().splitlines()
    assert out.read_text().splitlines() == [lines[1], lines[3]]
    assert [json.loads(x)["line"] for x in rej.read_text().splitlines()] == [1, 3, 5]
    # without errors in the way, the rule is unchanged: the first copy stays, later ones go
    src.write_text("".join(json.dumps(r) + "\n" for r in records[1:4]))
    out, rej, kept, dropped = write_fixed(validate_file(src), tmp_path / "clean.jsonl")
    assert (kept, dropped) == (2, 1) and [json.loads(x)["line"] for x in rej.read_text().splitlines()] == [2]
