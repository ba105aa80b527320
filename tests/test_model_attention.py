"""Per-conversation attention (fastchat_ft.model.attention) against transformers' sdpa with the document mask it
builds from packed position ids: same hidden states and LoRA gradients on packed rows of odd lengths (a
one-token conversation included), same outputs where it must defer (a padding mask, generation with a KV cache),
and models it must not touch (sliding window) stay on sdpa."""
import numpy as np
import pytest
import torch

from fastchat_ft.engine.loss import backward_step, hidden_states, to_device
from fastchat_ft.model.attention import NAME, segments, use_packed_attention
from fastchat_ft.model.lora import add_lora
from fastchat_ft.model.tiny import pack_conversations, random_conversation, tiny_llama_config

VOCAB = 193


def tiny(seed=0, kv_heads=2, lora_r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), **extra):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(VOCAB, hidden=48, layers=2, heads=6, kv_heads=kv_heads, intermediate=72, **extra)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    add_lora(model, r=lora_r, alpha=2 * lora_r, dropout=0.0, target_modules=list(targets))
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


def assert_engine_matches_sdpa(results, ref, batch, n_grads, switch):
    """Each engine result (loss, LoRA grads) per setting of `switch` equals transformers' sdpa model `ref` with its
    own mask from the position ids, loss and CE on the label positions, to float rounding."""
    states = ref.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    t = batch["targets"]
    want = torch.nn.functional.cross_entropy(ref.lm_head(states[t.rows, t.cols]), t.labels)
    want.backward()
    want_grads = lora_grads(ref)
    for setting, (loss, grads) in results.items():
        torch.testing.assert_close(torch.as_tensor(float(loss)), want.detach(), rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys() and len(grads) == n_grads
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{switch}={setting} {name}: {m}")


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


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_fused_rotary_on_cpu_matches_hf_rotary_and_sdpa(monkeypatch, kv_heads):
    """On the packed CPU path Llama attention modules get the fused-rotary forward: the native kernel receives the
    raw q and k with cos/sin. Loss and LoRA gradients equal, to float rounding, those with HF's rotary first
    (FASTCHAT_FT_CPU_ROTARY=0) and those of transformers' sdpa with its document mask, with and without GQA."""
    from fastchat_ft.model import cpu_attention

    batch = packed_batch(np.random.default_rng(3), [[13, 1, 40, 7]])
    fused = []
    real = cpu_attention.packed_causal_attention
    monkeypatch.setattr(cpu_attention, "packed_causal_attention",
                        lambda *a, **kw: fused.append(len(a) > 6 and a[6] is not None) or real(*a, **kw))
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("FASTCHAT_FT_CPU_ROTARY", setting)
        model = tiny(seed=3, kv_heads=kv_heads)
        loss, _ = backward_step(model, [batch], "token", torch.autocast("cpu", enabled=False))
        results[setting] = (loss, lora_grads(model))
    assert fused == [True, True, False, False]  # 2 layers fused, then 2 layers rotated by HF first
    assert sum("forward" in m.__dict__ for m in model.modules()) == 2  # installed on the two attention modules
    assert_engine_matches_sdpa(results, tiny(seed=3, kv_heads=kv_heads), batch, 16, "FASTCHAT_FT_CPU_ROTARY")


def test_lora_groups_on_cpu_match_one_layer_at_a_time_and_sdpa(monkeypatch):
    """Rank-16 LoRA on every linear, the engine's CPU patches (fused-rotary attention, SwiGLU MLP): q/k/v and
    gate/up run as LoRA groups (one native call each way per group); loss and LoRA gradients equal those of one
    lora_linear per layer with torch's GEMMs (FASTCHAT_FT_CPU_LORA=0) and of transformers' sdpa model."""
    from fastchat_ft.engine.train import use_norm_and_mlp_kernels
    from fastchat_ft.kernels import lora_cpu

    groups = []
    real_apply = lora_cpu.LoRAGroup.apply
    monkeypatch.setattr(lora_cpu.LoRAGroup, "apply", lambda *a: groups.append(len(a[1])) or real_apply(*a))
    batch = packed_batch(np.random.default_rng(5), [[21, 3, 30, 9]])
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("FASTCHAT_FT_CPU_LORA", setting)
        model = tiny(seed=5, lora_r=16, targets=targets)
        use_norm_and_mlp_kernels(model)
        loss, _ = backward_step(model, [batch], "token", torch.autocast("cpu", enabled=False))
        results[setting] = (loss, lora_grads(model))
    assert sorted(groups) == [2, 2, 3, 3]  # per layer one q/k/v group and one gate/up group, native only
    assert_engine_matches_sdpa(results, tiny(seed=5, lora_r=16, targets=targets), batch, 28, "FASTCHAT_FT_CPU_LORA")


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


# ------------------------------------------------------------------------------- one varlen call (CUDA path)

def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=None, enable_gqa=False, scale=None):
    """torch's varlen_attn contract ([T, H, D] tokens, int32 cumulative starts, causal by window (-1, 0)) written
    as plain SDPA per conversation: lets the CPU tests check the flattening and offsets the CUDA path relies on."""
    assert window_size == (-1, 0) and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
    bounds = cu_q.tolist()
    assert max(e - s for s, e in zip(bounds, bounds[1:])) == max_q
    outs = []
    for s, e in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(outs)


def _loop_reference(q, k, v, segs, scale):
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype)
    for b, row in enumerate(segs):
        for s, e in row:
            out[b, s:e] = torch.nn.functional.scaled_dot_product_attention(
                q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], is_causal=True, scale=scale,
                enable_gqa=True)[0].transpose(0, 1)
    return out


def test_varlen_flattening_matches_per_conversation_attention():
    from fastchat_ft.model.attention import cu_seqlens, varlen_attention

    torch.manual_seed(11)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4],       # 5, 1, 5
                        [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]])      # 8, 3
    segs = segments(pos)
    cu, longest = cu_seqlens(segs, pos.shape[1], torch.device("cpu"))
    assert cu.tolist() == [0, 5, 6, 11, 19, 22] and longest == 8
    for has_gqa in (True, False):  # with enable_gqa, and an older varlen where KV heads are repeated by us
        q = torch.randn(2, 6, 11, 8, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, 2, 11, 8, dtype=torch.float64, requires_grad=True)
        v = torch.randn(2, 2, 11, 8, dtype=torch.float64, requires_grad=True)
        out = varlen_attention(q, k, v, cu, longest, 0.3, kernel=(_fake_varlen, {"window_size": (-1, 0)}, has_gqa, True))
        want = _loop_reference(q, k, v, segs, 0.3)
        torch.testing.assert_close(out, want)
        g = torch.randn_like(out)
        got_grads = torch.autograd.grad(out, (q, k, v), g)
        want_grads = torch.autograd.grad(want, (q, k, v), g)
        for got, ref in zip(got_grads, want_grads):
            torch.testing.assert_close(got, ref)


@pytest.mark.cuda
def test_cuda_varlen_path_matches_sdpa_loop_bf16():
    """The real flash varlen kernel against the per-conversation SDPA loop it replaces, forward and backward,
    on packed rows with a one-token conversation; bf16 tolerances (two different kernels round differently)."""
    from fastchat_ft.model import attention

    assert attention._varlen_kernel() is not None, "this torch has no torch.nn.attention.varlen"
    torch.manual_seed(3)
    pos = torch.tensor([[0, 1, 2, 0, *range(60), 0, *range(190)], [*range(128), *range(127)]], device="cuda")
    segs = segments(pos)
    width = pos.shape[1]
    q = torch.randn(2, 8, width, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, width, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, width, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert attention.varlen_enabled(q, 0.0)
    cu, longest = attention.cu_seqlens(segs, width, q.device)
    out = attention.varlen_attention(q, k, v, cu, longest, None)
    want = _loop_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), segs, None)
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(_loop_reference(qd, kd, vd, segs, None), (qd, kd, vd), g.double().cpu())
    for a, b in zip(got, ref):
        rel = (a.double().cpu() - b).norm() / b.norm()
        assert rel < 2e-2, rel
