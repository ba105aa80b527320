"""export --gguf: the file is read back by transformers' own GGUF loader (the reference) with logits close to
the merged model's, the tokenizer it describes encodes like the original, and it stops on the end-of-turn token."""
from argparse import Namespace

import pytest
import torch

from fastchat_ft.errors import ModelError
from fastchat_ft.export import run_export
from fastchat_ft.export_gguf import _rotary_permute, write_gguf
from fastchat_ft.inference import load_model
from test_export_fixtures import tiny_run  # noqa: F401 (fixture)


def _args(run, out, **kw):
    base = dict(run_dir=str(run), out=str(out), merge=False, adapter=False, gguf=None, four_bit=False, notes=None)
    base.update(kw)
    return Namespace(**base)


@pytest.mark.parametrize("qtype,min_cos", [("f16", 0.99999), ("q8_0", 0.9995)])
def test_gguf_read_back_by_transformers(tiny_run, tmp_path, qtype, min_cos):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / qtype
    run_export(_args(tiny_run["run"], out, gguf=qtype))
    name = f"model-{qtype}.gguf"
    assert (out / name).is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    gg = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, gg(ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > min_cos
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    if qtype == "f16":
        assert (a - b).abs().max() / a.abs().max() < 2e-2
    # the tokenizer stored in the GGUF encodes a rendered conversation exactly like the original
    tok = AutoTokenizer.from_pretrained(out)
    gtok = AutoTokenizer.from_pretrained(out, gguf_file=name)
    conv = tiny_run["val"][0]["messages"]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert gtok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    import gguf
    fields = gguf.GGUFReader(str(out / name)).fields
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):  # llama.cpp stops at reply end
        assert fields[key].contents() == im_end
    assert fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    card = (out / "README.md").read_text()
    assert name in card and "llama-cli" in card


def test_rotary_permute_is_a_row_permutation():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3).numpy()
    p = _rotary_permute(w, 2)
    assert sorted(map(tuple, p.tolist())) == sorted(map(tuple, w.tolist()))
    # head 0 rows [0,1,2,3] (halves [0,1] and [2,3]) interleave to [0,2,1,3]
    assert p[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]


def test_gguf_refuses_other_architectures(tiny_run, tmp_path):
    loaded = load_model(tiny_run["run"], device="cpu")
    loaded.model.config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ModelError, match="llama-architecture"):
        write_gguf(loaded.model, loaded.tokenizer, tmp_path / "x.gguf", "f16")


def test_gguf_real_tokenizer_encodes_like_hf(tmp_path):
    """SmolLM2's 49k byte-level BPE (the default model's) through GGUF and back: same ids on real text."""
    from transformers import AutoTokenizer
    from conftest import shared_path
    from test_export_fixtures import make_base_model
    folder = shared_path("tokenizers", "smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = (folder / "chat_template.jinja").read_text()
    make_base_model(tmp_path / "m", tok)
    out = tmp_path / "out"
    run_export(_args(tmp_path / "m", out, gguf="f16"))  # a plain model folder, not a run dir
    gtok = AutoTokenizer.from_pretrained(out, gguf_file="model-f16.gguf")
    text = shared_path("corpora", "war-and-peace.txt").read_text()[:20000]
    text += "\n<|im_start|>user\nWhat is 1234 + 56?<|im_end|>\n  tabs\tand   spaces  "
    assert gtok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
