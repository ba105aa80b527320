"""fastchat-ft generate: one prompt and an interactive session on a LoRA run dir (merged in memory), streaming
the same tokens as transformers' greedy generate (reference) and stopping at the end-of-turn token."""
import io

import torch

from fastchat_ft.cli import main
from fastchat_ft.inference import chat_prompt_ids, load_model
from test_export_fixtures import chatty_run, tiny_run  # noqa: F401 (fixtures)


def _hf_greedy(loaded, messages, n):
    prompt = torch.tensor([chat_prompt_ids(loaded.tokenizer, messages)])
    with torch.no_grad():
        out = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                    eos_token_id=[loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")], pad_token_id=0)
    return loaded.tokenizer.decode(out[0, prompt.shape[1]:])


def test_one_prompt_streams_hf_greedy_tokens(chatty_run, capsys):
    assert main(["generate", "--model", str(chatty_run["run"]), "--prompt", "two dogs ran?", "--system", "Be brief.",
                 "--max-new-tokens", "9"]) == 0
    out, err = capsys.readouterr()
    loaded = load_model(chatty_run["run"], device="cpu")
    expected = _hf_greedy(loaded, [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "two dogs ran?"}], 9)
    assert out == expected + "\n" and len(expected) > 5
    assert "merged" in err and "max-new-tokens 9" in err


def test_interactive_keeps_history_and_resets(chatty_run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat?\nquiet hills?\n/reset\nthe cat?\n/exit\nnever read\n"))
    assert main(["generate", "--model", str(chatty_run["run"]), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    loaded = load_model(chatty_run["run"], device="cpu")
    first = _hf_greedy(loaded, [{"role": "user", "content": "the cat?"}], 5)
    second = _hf_greedy(loaded, [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": first},
                                 {"role": "user", "content": "quiet hills?"}], 5)
    assert out == f"{first}\n{second}\n{first}\n"  # the third reply starts from a reset history
    assert first != second


def test_top_p_0_is_accepted_with_greedy_decoding_and_refused_when_sampling(chatty_run, capsys):
    # the shared sampling rule refused --top-p 0 under greedy decoding (the default temperature 0), which uses no top_p
    argv = ["generate", "--model", str(chatty_run["run"]), "--prompt", "two dogs ran?", "--max-new-tokens", "6"]
    assert main(argv) == 0
    greedy = capsys.readouterr().out
    assert main(argv + ["--top-p", "0"]) == 0 and capsys.readouterr().out == greedy
    assert main(argv + ["--top-p", "0", "--temperature", "0.7"]) == 1
    err = capsys.readouterr().err
    assert "--top-p" in err and "sampling" in err and "Traceback" not in err


def test_stops_at_end_of_turn_without_warning(tiny_run, capsys):
    assert main(["generate", "--model", str(tiny_run["run"]), "--prompt", "hi?", "--max-new-tokens", "30"]) == 0
    out, err = capsys.readouterr()
    assert "<|im_end|>" not in out and "max-new-tokens" not in err


def test_bad_model_path_is_a_clean_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    assert "no such model folder" in capsys.readouterr().err
