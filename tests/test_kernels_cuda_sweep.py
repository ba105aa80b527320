"""CUDA: the three kernels compiled for the GPU (not the interpreter) against float64, over what the interpreter
tests cover on CPU: fp32/fp16/bf16 inputs, shapes that are not multiples of any block size, heavy label masking,
both reductions with an external token count, all-ignored batches, softcap and z-loss, several chunks, Gemma's
RMSNorm offset, deterministic weight gradients, and LoRA over a real bitsandbytes 4-bit weight. Fresh random
inputs each run (the seed is printed on failure). Tolerances are relative to the largest reference value:
fp32 1e-4 (cuBLAS may use TF32-free but reordered sums), fp16 5e-3, bf16 3e-2 (8 mantissa bits)."""
import pytest
import torch

from fastchat_ft.kernels import fused_linear_cross_entropy, lora_linear, lora_linear_reference, rms_norm

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def seed():
    s = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(s)
    return s


def _close(got, want, dtype, what, seed):
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (seed {seed})"
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:g} x {scale:.3g} (seed {seed})"


def _ce64(h, w, b, y, reduction, num_items, softcap, z_loss):
    logits = h.double() @ w.double().t() + (b.double() if b is not None else 0.0)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    keep = y != -100
    lse = torch.logsumexp(logits[keep], -1)
    per_token = lse - logits[keep].gather(1, y[keep][:, None]).squeeze(1) + z_loss * lse * lse
    if reduction == "mean":
        return per_token.sum() / max(int(keep.sum()), 1)
    return per_token.sum() / num_items


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["mean", "sum_external_count", "softcap_zloss_bias_chunks"])
def test_fused_linear_cross_entropy_matches_float64(dtype, case, seed):
    tokens, hidden, vocab = 1537, 264, 50257  # odd everywhere; vocab not a multiple of the row kernel's block
    h = (torch.randn(tokens, hidden, device="cuda") * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * hidden ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device="cuda")
    y[torch.rand(tokens, device="cuda") < 0.7] = -100
    b = (torch.randn(vocab, device="cuda") * 0.1).to(dtype).requires_grad_() if "bias" in case else None
    kw = dict(reduction="mean", num_items=None, softcap=None, z_loss=0.0)
    if case == "sum_external_count":  # the count of a whole accumulated batch, larger than this micro-batch's
        kw.update(reduction="sum", num_items=int((y != -100).sum()) * 3)
    if case == "softcap_zloss_bias_chunks":
        kw.update(softcap=30.0, z_loss=1e-4)
    extra = {"chunk_size": 256} if "chunks" in case else {}
    out = fused_linear_cross_entropy(h, w, y, bias=b, return_stats=True, **kw, **extra)
    out.loss.backward()
    leaves = [t for t in (h, w, b) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _ce64(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None, y, **kw)
    ref.backward()
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.item()) <= TOL[dtype] * abs(ref.item()), (out.loss.item(), ref.item(), seed)
    assert int(out.n_valid) == int((y != -100).sum())
    for name, got, want in zip("hwb", leaves, ref_leaves):
        assert got.grad.dtype == got.dtype
        _close(got.grad, want.grad, dtype, f"grad {name}", seed)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    h = torch.randn(333, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1001, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.full((333,), -100, device="cuda")
    loss = fused_linear_cross_entropy(h, w, y, reduction=reduction, num_items=0 if reduction == "sum" else None)
    loss.backward()
    assert loss.item() == 0.0
    for t in (h, w):
        assert t.grad is not None and torch.isfinite(t.grad).all() and not t.grad.any()


def test_accuracy_counts_argmax_hits():
    h = torch.randn(500, 64, device="cuda")
    w = torch.randn(777, 64, device="cuda")
    y = (h @ w.t()).argmax(-1)
    y[::3] = (y[::3] + 1) % 777  # a third wrong on purpose
    y[1::7] = -100
    out = fused_linear_cross_entropy(h, w, y, return_stats=True)
    keep = y != -100
    want = ((h @ w.t()).argmax(-1) == y)[keep].sum()
    assert int(out.n_valid) == int(keep.sum()) and int(out.n_correct) == int(want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,offset", [(1000, 0.0), (2049, 0.0), (576, 1.0)])
def test_rms_norm_matches_float64_and_is_deterministic(dtype, hidden, offset, seed):
    x = torch.randn(4, 257, hidden, device="cuda").to(dtype).requires_grad_()
    wt = (torch.randn(hidden, device="cuda") * 0.1 + (0.0 if offset else 1.0)).to(dtype).requires_grad_()
    dy = torch.randn(4, 257, hidden, device="cuda").to(dtype)
    y = rms_norm(x, wt, 1e-6, offset=offset)
    dx, dw = torch.autograd.grad(y, (x, wt), dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, wt))
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    _close(y, y64.detach(), dtype, "output", seed)
    _close(dx, dx64, dtype, "grad x", seed)
    _close(dw, dw64, dtype, "grad weight", seed)
    again = torch.autograd.grad(rms_norm(x, wt, 1e-6, offset=offset), (x, wt), dy)
    assert torch.equal(again[1], dw), "weight gradient differs between two identical runs"


@pytest.mark.parametrize("backend,dtype,m,k,n", [
    *(("cublas", dt, *shape) for dt in DTYPES for shape in ((1000, 1000, 3001), (77, 4096, 1024))),
    ("triton", torch.bfloat16, 1000, 1000, 3001), ("triton", torch.float16, 77, 4096, 1024)])  # each autotunes
def test_lora_linear_matches_float64(backend, dtype, m, k, n, seed, monkeypatch):
    monkeypatch.setenv("FASTCHAT_LORA_GEMM", backend)
    x = torch.randn(m, k, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype)
    bias = (torch.randn(n, device="cuda") * 0.1).to(dtype).requires_grad_()
    a = (torch.randn(16, k, device="cuda") * k ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(n, 16, device="cuda") * 0.1).to(dtype).requires_grad_()
    y = lora_linear(x, w, a, b, 2.0, bias=bias)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b, bias), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, b, bias)]
    y64 = lora_linear_reference(leaves64[0], w.double(), leaves64[1], leaves64[2], 2.0, bias=leaves64[3])
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    _close(y, y64.detach(), dtype, "output", seed)
    for name, got, want in zip(("x", "A", "B", "bias"), grads, grads64):
        _close(got, want, dtype, f"grad {name}", seed)


def test_lora_linear_over_a_bitsandbytes_4bit_weight(seed):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    k, n = 1024, 3000
    dense = (torch.randn(n, k) * k ** -0.5).to(torch.bfloat16)
    qweight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4").cuda()
    w_deq = dequantize_4bit(qweight.data, qweight.quant_state).to(torch.bfloat16)
    x = torch.randn(513, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(16, k, device="cuda") * k ** -0.5).requires_grad_()  # fp32 adapters, as PEFT keeps them
    b = (torch.randn(n, 16, device="cuda") * 0.1).requires_grad_()
    y = lora_linear(x, qweight, a, b, 2.0)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, b)]
    y64 = lora_linear_reference(leaves64[0], w_deq.double(), leaves64[1], leaves64[2], 2.0)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    _close(y, y64.detach(), torch.bfloat16, "output", seed)
    for name, got, want in zip(("x", "A", "B"), grads, grads64):
        assert got.dtype == (torch.bfloat16 if name == "x" else torch.float32)
        _close(got, want, torch.bfloat16, f"grad {name}", seed)
