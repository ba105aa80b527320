"""Our LoRA against PEFT: the same forward, and a checkpoint PEFT loads (keys, config) giving the same
logits; adapters on the chosen modules only; added template tokens train only their new rows."""
import json

import pytest
import torch

from conftest import shared_path
from fastchat_ft.errors import ModelError
from fastchat_ft.model import load as load_mod
from fastchat_ft.model.lora import LoraLinear, add_lora, adapter_config, load_adapter, save_adapter
from fastchat_ft.model.tiny import build_tiny_model, tiny_llama_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(seed=0, vocab=301):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab, hidden=40, layers=2, heads=4, kv_heads=2, intermediate=72)).eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_lora_linear_matches_the_formula_and_trains_only_a_and_b():
    base = torch.nn.Linear(19, 23, bias=True)
    layer = LoraLinear(base, r=5, alpha=10, dropout=0.0)
    randomize_lora(layer)
    x = torch.randn(3, 7, 19, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    ref = base(x) + 2.0 * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    torch.testing.assert_close(layer.merged_weight(), base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight)


def test_add_lora_wraps_only_targets_and_freezes_the_rest():
    model = llama()
    wrapped = add_lora(model, 4, 8, 0.0, ["q_proj", "down_proj"])
    assert sorted(wrapped) == sorted([f"model.layers.{i}.{m}" for i in range(2)
                                      for m in ("self_attn.q_proj", "mlp.down_proj")])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    with pytest.raises(ModelError, match="q_proj"):
        add_lora(llama(), 4, 8, 0.0, ["qkv"])


def test_fresh_adapter_leaves_the_model_unchanged():
    model = llama()
    ids = torch.randint(0, 301, (2, 11))
    before = model(ids).logits
    add_lora(model, 8, 16, 0.0, TARGETS)
    torch.testing.assert_close(model(ids).logits, before)


def test_peft_loads_our_checkpoint_and_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = tmp_path / "base"
    llama(seed=3).save_pretrained(base_dir)
    ours = llama(seed=3)
    add_lora(ours, 8, 16, 0.0, TARGETS)
    randomize_lora(ours)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_adapter(ours, ckpt, adapter_config(ours, base_dir, 8, 16, 0.0, TARGETS))
    conf = json.loads((ckpt / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["base_model_name_or_path"] == str(base_dir)

    from transformers import AutoModelForCausalLM
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ckpt).eval()
    ids = torch.randint(0, 301, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
        # and back: a PEFT-saved adapter loads into ours (key names agree both ways)
        peft_dir = tmp_path / "peft"
        theirs.save_pretrained(peft_dir)
        again = llama(seed=3)
        add_lora(again, 8, 16, 0.0, TARGETS)
        load_adapter(again, peft_dir)
        torch.testing.assert_close(again(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_missing_template_tokens_are_added_and_only_their_rows_train(tmp_path):
    tok_src = shared_path("tokenizers", "gpt2")
    folder = build_tiny_model(tmp_path / "m", tok_src)
    tok = load_mod.load_hf_tokenizer(folder)
    if "<|im_start|>" in tok.get_vocab():
        pytest.skip("this tokenizer already has the ChatML tokens")
    tok_dir, new_ids = load_mod.extend_tokenizer(tok, "chatml", folder, tmp_path / "run" / "tokenizer")
    assert tok_dir == tmp_path / "run" / "tokenizer" and len(new_ids) == 2
    assert (tok_dir / "tokenizer.json").is_file()
    model = load_mod.load_model(folder)
    old_rows = model.get_input_embeddings().weight.shape[0]
    load_mod.resize_for_tokenizer(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > old_rows
    add_lora(model, 4, 8, 0.0, TARGETS)
    extra = load_mod.train_new_rows_only(model, new_ids)
    assert list(extra) == ["model.embed_tokens"]
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([[new_ids[0], 5, 6, new_ids[1], 7, 8]])
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    changed = (emb.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(new_ids)


def test_an_adapter_of_another_model_shape_is_a_model_error_naming_it(tmp_path):
    """Same key names, other hidden size (a checkpoint of another base model): was a RuntimeError from copy_."""
    from transformers import LlamaForCausalLM

    small = llama()
    add_lora(small, 8, 16, 0.0, TARGETS)
    save_adapter(small, tmp_path, adapter_config(small, "base", 8, 16, 0.0, TARGETS))
    wider = LlamaForCausalLM(tiny_llama_config(301, hidden=48, layers=2, heads=4, kv_heads=2, intermediate=72))
    add_lora(wider, 8, 16, 0.0, TARGETS)
    before = {n: p.clone() for n, p in wider.named_parameters()}
    with pytest.raises(ModelError, match="do not fit") as e:
        load_adapter(wider, tmp_path)
    assert e.value.file == str(tmp_path) and "base model" in e.value.fix
    assert all(torch.equal(p, before[n]) for n, p in wider.named_parameters())  # nothing half-loaded
    with pytest.raises(ModelError, match="not a LoRA adapter"):
        load_adapter(wider, tmp_path / "nothing")
