"""The native CPU attention (csrc/cpu_attention.cc via fastchat_ft.model.cpu_attention) against its torch reference in
float64 (HF's rotary, then SDPA per conversation): outputs and the gradients of q, k, v, on odd conversation lengths (1 token, not multiples of the
kernel's 4-row / 32-column tiles), GQA, head sizes that are not multiples of 32, fresh random inputs each run; its
guards (bad segments, the limits that send a call back to SDPA, the off switch); and the model path that uses it."""
import numpy as np
import pytest
import torch

from fastchat_ft.model import attention, cpu_attention
from fastchat_ft.model.cpu_attention import packed_causal_attention, packed_causal_attention_reference


def rotary_tables(lengths, head_dim, dtype=torch.float64, random=False):
    """cos and sin per token, positions restarting per conversation (as packed rows have them); random: any values,
    so that the two halves of a row differ (HF's tables repeat one half, which would hide a mixed-up index)."""
    if random:
        tokens = sum(lengths)
        return torch.rand(tokens, head_dim, dtype=dtype) * 2 - 1, torch.rand(tokens, head_dim, dtype=dtype) * 2 - 1
    positions = torch.cat([torch.arange(n) for n in lengths]).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    angles = positions[:, None] * inv_freq[None]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def run_both(lengths, heads, kv_heads, head_dim, seed, order=None, rotary=False):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    q64, k64, v64 = (torch.randn(tokens, h, head_dim, generator=gen, dtype=torch.float64).requires_grad_()
                     for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(tokens, heads, head_dim, generator=gen, dtype=torch.float64)
    scale = head_dim ** -0.5
    cos, sin = rotary_tables(lengths, head_dim, random=rotary == "random") if rotary else (None, None)
    want = packed_causal_attention_reference(q64, k64, v64, starts, lengths, scale, cos, sin)  # float64
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    idx = np.arange(len(lengths)) if order is None else np.asarray(order)
    tables = (cos.float(), sin.float()) if rotary else (None, None)
    got = packed_causal_attention(q, k, v, starts[idx], np.asarray(lengths)[idx], scale, *tables)
    got_grads = torch.autograd.grad(got, (q, k, v), grad.float())
    return (got, want), list(zip(got_grads, want_grads))


@pytest.mark.parametrize("lengths,heads,kv_heads,head_dim", [
    ([1, 2, 5, 17, 33, 64, 100], 9, 3, 64),   # SmolLM2's heads; a 1-token conversation; GQA 3:1
    ([3, 40, 70], 4, 4, 24),                  # no GQA; head size below one 32-column tile
    ([129, 7], 6, 2, 80),                     # head size 80: a padded tile
    ([300], 2, 1, 64),                        # one longer conversation
])
@pytest.mark.parametrize("rotary", [False, True, "random"])
def test_matches_float64_sdpa_forward_and_backward(lengths, heads, kv_heads, head_dim, rotary):
    """With rotary: cos/sin tables given, the kernel rotates q and k itself; the reference rotates first (HF's
    apply_rotary_pos_emb), and gradients are those of the raw q and k."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run; the seed is in the failure message
    (got, want), grads = run_both(lengths, heads, kv_heads, head_dim, seed, rotary=rotary)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5, msg=lambda m: f"seed {seed}: {m}")
    for name, (g, w) in zip("qkv", grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=5e-5, msg=lambda m: f"d{name}, seed {seed}: {m}")


def test_conversation_order_and_thread_count_do_not_change_the_result():
    (a, _), grads_a = run_both([5, 61, 1, 33], 4, 2, 32, seed=3)
    (b, _), grads_b = run_both([5, 61, 1, 33], 4, 2, 32, seed=3, order=[2, 0, 3, 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (c, _), grads_c = run_both([5, 61, 1, 33], 4, 2, 32, seed=3)
    finally:
        torch.set_num_threads(threads)
    for x, y in [(a, b), (a, c)] + [(g[0], h[0]) for g, h in zip(grads_a, grads_b)] + \
            [(g[0], h[0]) for g, h in zip(grads_a, grads_c)]:
        assert torch.equal(x, y)  # each (conversation, head) is computed by one thread, alone: bit-identical


def test_conversations_must_cover_every_token_once():
    q, k = torch.randn(10, 2, 8), torch.randn(10, 1, 8)
    for starts, lengths in [([0, 4], [4, 5]), ([0, 3], [4, 6]), ([0, 4], [4, 0]), ([1], [10]), ([0, 0], [5, 5])]:
        with pytest.raises(ValueError, match="cover the 10 tokens"):
            packed_causal_attention(q, k, k, starts, lengths, 0.3)
    with pytest.raises(ValueError, match="cover the 10 tokens"):
        packed_causal_attention(q, k, k, [], [], 0.3)  # no conversations at all
    with pytest.raises(ValueError, match="2 conversation starts but 1 lengths"):
        packed_causal_attention(q, k, k, [0, 5], [10], 0.3)
    with pytest.raises(ValueError, match="shapes"):
        packed_causal_attention(q, k, torch.randn(10, 2, 8), [0], [10], 0.3)
    for bad in (q.bfloat16(), q.double()):  # the kernel writes 4-byte floats: anything else is refused
        with pytest.raises(ValueError, match="fp32 CPU tensors"):
            packed_causal_attention(bad, k, k, [0], [10], 0.3)
    with pytest.raises(ValueError, match="fp32 CPU tensors"):
        packed_causal_attention(q, k, k, [0], [10], 0.3, torch.ones(10, 8).half(), torch.ones(10, 8).half())


def test_usable_only_within_the_kernels_limits(monkeypatch):
    q, k = torch.randn(1, 4, 10, 64), torch.randn(1, 2, 10, 64)
    assert cpu_attention.usable(q, k, 0.0, longest=10)
    assert not cpu_attention.usable(q, k, 0.1, longest=10)                       # attention dropout
    assert not cpu_attention.usable(q.double(), k.double(), 0.0, longest=10)     # fp32 only
    assert not cpu_attention.usable(q.bfloat16(), k.bfloat16(), 0.0, longest=10)
    assert not cpu_attention.usable(q, k, 0.0, longest=cpu_attention.MAX_LENGTH + 1)
    assert not cpu_attention.usable(torch.randn(1, 4, 10, 320), torch.randn(1, 2, 10, 320), 0.0, longest=10)
    assert not cpu_attention.usable(torch.randn(1, 5, 10, 64), k, 0.0, longest=10)  # 5 heads over 2 kv heads
    monkeypatch.setenv("FASTCHAT_FT_CPU_ATTENTION", "0")
    assert not cpu_attention.usable(q, k, 0.0, longest=10)


def _packed_forward(monkeypatch, setting, position_ids, q, k, v):
    monkeypatch.setenv("FASTCHAT_FT_CPU_ATTENTION", setting)
    attention._last[0] = None  # a fresh forward: segments are cached per position-ids tensor
    module = torch.nn.Module()
    out, _ = attention.packed_attention_forward(module, q, k, v, None, scaling=0.25, position_ids=position_ids)
    return out


def test_model_attention_function_runs_it_and_agrees_with_sdpa_per_conversation(monkeypatch):
    """The transformers attention function ([B, H, L, D] in, [B, L, H, D] out) takes the native path for fp32 on
    CPU and gives what its SDPA loop gives (FASTCHAT_FT_CPU_ATTENTION=0), values and gradients."""
    torch.manual_seed(5)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]])
    base = [torch.randn(2, h, 11, 16) for h in (6, 2, 2)]
    calls = []
    real = cpu_attention.packed_causal_attention
    monkeypatch.setattr(cpu_attention, "packed_causal_attention", lambda *a: calls.append(a[3:5]) or real(*a))
    results = []
    for setting in ("1", "0"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = _packed_forward(monkeypatch, setting, pos, q, k, v)
        out.backward(torch.ones_like(out))
        results.append((out, q.grad, k.grad, v.grad))
    assert len(calls) == 1 and list(calls[0][0]) == [0, 5, 6, 11, 19] and list(calls[0][1]) == [5, 1, 5, 8, 3]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_rotates_as_transformers_llama_does():
    """The reference with cos/sin equals transformers' own apply_rotary_pos_emb followed by the reference without
    them (random tables, GQA, conversations of several tokens so that the rotation changes the scores)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lengths, starts = [5, 3], [0, 5]
    q, k, v = (torch.randn(8, h, 16, dtype=torch.float64) for h in (4, 2, 2))
    cos, sin = rotary_tables(lengths, 16, random=True)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    want = packed_causal_attention_reference(hf_q[0].transpose(0, 1), hf_k[0].transpose(0, 1), v, starts, lengths, 0.25)
    got = packed_causal_attention_reference(q, k, v, starts, lengths, 0.25, cos, sin)
    torch.testing.assert_close(got, want)
    assert (got - packed_causal_attention_reference(q, k, v, starts, lengths, 0.25)).abs().max() > 1e-3
