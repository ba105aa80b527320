"""fastchat_ft.inference: resolving run dirs/checkpoints, LoRA merged without peft (reference: peft's own
forward on the same checkpoint), end-of-turn detection (reference: the shared real tokenizers) and the
streaming loop (reference: transformers' generate)."""
import shutil

import pytest
import torch

from conftest import shared_path
from fastchat_ft.errors import ModelError
from fastchat_ft.inference import (ChatStream, end_of_turn_token, load_model, resolve_model, stop_token_ids)
from test_export_fixtures import chatty_run, tiny_run, tiny_run_new_tokens  # noqa: F401 (fixtures)


def _ids(n=13, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, n), generator=g)


def test_resolve_run_dir_prefers_final_then_latest(tiny_run, tmp_path):
    src = resolve_model(tiny_run["run"])
    assert src.kind == "lora" and src.path == tiny_run["run"] / "final" and src.base == tiny_run["base"].resolve()
    assert src.run_dir == tiny_run["run"]
    run2 = tmp_path / "run2"
    shutil.copytree(tiny_run["run"], run2)
    shutil.rmtree(run2 / "final")
    shutil.copytree(run2 / "checkpoints" / "step-000006", run2 / "checkpoints" / "step-000010")
    shutil.copytree(run2 / "checkpoints" / "step-000006", run2 / "checkpoints" / "step-000009")
    assert resolve_model(run2).path == run2 / "checkpoints" / "step-000010"
    assert resolve_model(tiny_run["base"]).kind == "model"


def test_resolve_errors_are_user_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="run directory"):
        resolve_model(tmp_path / "empty")
    bad = tmp_path / "badlora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "/nonexistent/x"}')
    with pytest.raises(ModelError, match="base model folder"):
        resolve_model(bad)


@pytest.mark.parametrize("fixture", ["tiny_run", "tiny_run_new_tokens"])
def test_lora_merge_matches_peft_forward(fixture, request):
    run = request.getfixturevalue(fixture)
    loaded = load_model(run["run"], device="cpu")
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    ids = _ids(17, vocab)
    with torch.no_grad():
        ours = loaded.model(ids).logits
        ref = run["peft_model"](input_ids=ids).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # and the adapter really changes the model (a no-op merge would fail here)
    base = load_model(run["base"], device="cpu").model
    if base.get_input_embeddings().weight.shape[0] == vocab:
        with torch.no_grad():
            assert (base(ids).logits - ours).abs().max() > 1e-2


def test_rslora_scale(tmp_path):
    from test_export_fixtures import make_base_model, make_lora_checkpoint, make_tokenizer
    tok = make_tokenizer(tmp_path / "tok")
    make_base_model(tmp_path / "base", tok, seed=3)
    peft_model = make_lora_checkpoint(tmp_path / "ck", tmp_path / "base", tok, use_rslora=True)
    ours = load_model(tmp_path / "ck", device="cpu").model
    ids = _ids(9, len(tok), seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_end_of_turn_from_template(tiny_run):
    assert end_of_turn_token(tiny_run["tokenizer"]) == "<|im_end|>"


@pytest.mark.parametrize("name,expected", [("smollm2", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_end_of_turn_real_tokenizers(name, expected):
    from transformers import AutoTokenizer
    folder = shared_path("tokenizers", name)
    tok = AutoTokenizer.from_pretrained(folder)
    if not tok.chat_template and (folder / "chat_template.jinja").exists():
        tok.chat_template = (folder / "chat_template.jinja").read_text()
    assert end_of_turn_token(tok) == expected
    assert stop_token_ids(tok)[0] == tok.convert_tokens_to_ids(expected)


def test_stream_equals_hf_generate_greedy(chatty_run):
    loaded = load_model(chatty_run["run"], device="cpu")
    msgs = [{"role": "user", "content": "the cat sat?"}]
    stream = ChatStream(loaded.model, loaded.tokenizer, msgs, max_new_tokens=12)
    pieces = list(stream)
    assert "".join(pieces) == stream.text and stream.finish_reason == "length" and len(stream.token_ids) == 12
    prompt = torch.tensor([stream.prompt_ids])
    with torch.no_grad():
        ref = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                    do_sample=False, eos_token_id=stream.stop_ids, pad_token_id=0)
    assert ref[0, prompt.shape[1]:].tolist() == stream.token_ids


def test_stream_stops_at_end_of_turn(tiny_run):
    loaded = load_model(tiny_run["run"], device="cpu")
    stream = ChatStream(loaded.model, loaded.tokenizer, [{"role": "user", "content": "hello?"}], max_new_tokens=20)
    stream.run()
    assert stream.finish_reason == "stop" and len(stream.token_ids) < 20


def test_sampling_is_seeded(chatty_run):
    loaded = load_model(chatty_run["run"], device="cpu")
    msgs = [{"role": "user", "content": "two dogs?"}]
    a = ChatStream(loaded.model, loaded.tokenizer, msgs, max_new_tokens=10, temperature=1.0, seed=5).run()
    b = ChatStream(loaded.model, loaded.tokenizer, msgs, max_new_tokens=10, temperature=1.0, seed=5).run()
    greedy = ChatStream(loaded.model, loaded.tokenizer, msgs, max_new_tokens=10).run()
    assert a == b and a != greedy


@pytest.mark.parametrize("temperature, top_p, bad", [(1.0, 0.0, "top_p"), (-1.0, 1.0, "temperature"),
                                                     (float("nan"), 1.0, "temperature"), (1.0, 1.5, "top_p")])
def test_impossible_sampling_values_are_named_not_a_torch_error(tiny_run, temperature, top_p, bad):
    # top_p 0 kept no token: torch.multinomial's "invalid multinomial distribution"; temperature -1 decoded greedily
    from fastchat_ft.inference import sampling_problem
    assert sampling_problem(temperature, top_p)[0] == bad
    assert sampling_problem(0.0, 1.0) is None and sampling_problem(2.0, 0.01) is None
    loaded = load_model(tiny_run["run"], device="cpu")
    with pytest.raises(ValueError, match=bad):
        ChatStream(loaded.model, loaded.tokenizer, [{"role": "user", "content": "hi"}], temperature=temperature,
                   top_p=top_p).run()


def test_greedy_decoding_takes_any_top_p_in_range():
    # top_p 0 was refused with temperature 0 too, where no top_p is used; sampling with it still keeps no token
    from fastchat_ft.inference import sampling_problem
    assert sampling_problem(0.0, 0.0) is None and sampling_problem(0.0, 0.5) is None
    assert sampling_problem(0.7, 0.0)[0] == "top_p" and "sampling" in sampling_problem(0.7, 0.0)[1]
    for bad in (-0.1, 1.5, float("nan")):  # outside OpenAI's [0, 1] whatever the temperature
        assert sampling_problem(0.0, bad)[0] == "top_p"


def test_model_folder_without_a_usable_tokenizer_is_a_user_error(tiny_run, tmp_path):
    """eval / generate / export / serve load through load_model: a folder with weights but no tokenizer, or a
    broken tokenizer.json, must be a ModelError naming the folder, not transformers' sentencepiece traceback."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(tiny_run["base"] / name, bare / name)
    with pytest.raises(ModelError, match="no tokenizer") as err:
        load_model(bare, device="cpu")
    assert err.value.file == str(bare)
    (bare / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="could not load the tokenizer") as err:
        load_model(bare, device="cpu")
    assert err.value.file == str(bare)


def test_stop_strings_cut_the_reply_and_are_never_streamed(chatty_run):
    # a stop string may span tokens: what was streamed before it completed must not include its first part
    loaded = load_model(chatty_run["run"], device="cpu")
    msgs = [{"role": "user", "content": "two dogs?"}]
    full = ChatStream(loaded.model, loaded.tokenizer, msgs, max_new_tokens=16)
    full.run()
    for stop in (full.text[len(full.text) // 2: len(full.text) // 2 + 6], full.text[-3:]):
        cut = full.text.index(stop)
        stream = ChatStream(loaded.model, loaded.tokenizer, msgs, max_new_tokens=16, stop=["@@@", stop])
        pieces = list(stream)
        assert "".join(pieces) == stream.text == full.text[:cut]
        assert stream.finish_reason == "stop" and stream.token_ids == full.token_ids[:len(stream.token_ids)]
    never = ChatStream(loaded.model, loaded.tokenizer, msgs, max_new_tokens=16, stop=["@@@"])
    assert "".join(never) == full.text and never.finish_reason == "length"
