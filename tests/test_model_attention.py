"""Per-conversation attention (fastchat_ft.model.attention) against transformers' sdpa with the document mask it
builds from packed position ids: same hidden states and LoRA gradients on packed rows of odd lengths (a
one-token conversation included), same outputs where it must defer (a padding mask, generation with a KV cache),
and models it must not touch (sliding window) stay on sdpa."""
import numpy as np
import torch

from fastchat_ft.engine.loss import backward_step, hidden_states, to_device
from fastchat_ft.model.attention import NAME, segments, use_packed_attention
from fastchat_ft.model.lora import add_lora
from fastchat_ft.model.tiny import pack_conversations, random_conversation, tiny_llama_config

VOCAB = 193


def tiny(seed=0, **extra):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(VOCAB, hidden=48, layers=2, heads=6, kv_heads=2, intermediate=72, **extra)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def packed_batch(rng, lengths_per_row):
    rows = [pack_conversations([random_conversation(rng, n, VOCAB) for n in lengths]) for lengths in lengths_per_row]
    width = max(len(r["input_ids"]) for r in rows)
    for r in rows:  # equal widths: pad the tail with one more conversation
        extra = width - len(r["input_ids"])
        if extra:
            tail = random_conversation(rng, extra, VOCAB)
            r["input_ids"] = np.concatenate([r["input_ids"], tail[0]])
            r["labels"] = np.concatenate([r["labels"], tail[1]])
            r["position_ids"] = np.concatenate([r["position_ids"], np.arange(extra)])
    return to_device({k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in ("input_ids", "labels", "position_ids")},
                     torch.device("cpu"))


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_segments_follow_transformers_packing_rule():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 5, 6], [3, 4, 5, 6, 7, 8, 9, 10]])
    assert segments(pos) == [[(0, 3), (3, 4), (4, 6), (6, 8)], [(0, 8)]]


def test_packed_rows_match_sdpa_document_mask_forward_and_backward():
    rng = np.random.default_rng(7)
    batch = packed_batch(rng, [[13, 1, 29, 6], [31, 17]])
    ref_model, model = tiny(seed=3), tiny(seed=3)
    out_ref = ref_model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              use_cache=False).last_hidden_state  # transformers' sdpa + document mask
    backward_step(model, [batch], "token", torch.autocast("cpu", enabled=False))  # switches on first use
    assert model.config._attn_implementation == NAME
    out = hidden_states(model, batch)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    t = batch["targets"]  # reference loss: HF's lm_head + torch cross-entropy on the sdpa states
    logits = ref_model.lm_head(out_ref[t.rows, t.cols])
    (torch.nn.functional.cross_entropy(logits, t.labels, reduction="sum") / t.labels.numel()).backward()
    assert ref_model.config._attn_implementation == "sdpa"
    got, want = lora_grads(model), lora_grads(ref_model)
    assert got.keys() == want.keys() and len(got) == 16  # 2 layers x 4 projections x (A, B)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    # the document mask matters here: plain causal attention over the row gives other states
    plain = ref_model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).last_hidden_state
    assert (plain - out_ref).abs().max() > 1e-3


def test_padding_mask_and_generation_defer_to_sdpa():
    ref_model, model = tiny(seed=5).eval(), tiny(seed=5).eval()
    assert use_packed_attention(model)
    ids = torch.randint(3, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   ref_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, attention_mask=mask, **kw), ref_model.generate(ids, attention_mask=mask, **kw))


def test_sliding_window_models_keep_sdpa():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    cfg._attn_implementation = "sdpa"
    model = MistralForCausalLM(cfg)
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "sdpa"
