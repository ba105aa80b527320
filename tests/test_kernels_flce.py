"""fused_linear_cross_entropy (Triton path under the interpreter, and the chunked torch reference) against an
unchunked float64 cross-entropy on fresh random inputs: odd sizes, heavy label masking, all-ignored batches,
mean vs sum + external count (gradient accumulation), softcap, z-loss, token accuracy."""
import importlib
import subprocess
import sys

import pytest
import torch

from fastchat_ft.kernels import CrossEntropyStats, fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from fastchat_ft.kernels._triton import HAS_TRITON
from kernel_impls import IMPLS, one_thread, select_impl  # noqa: F401 (one_thread is an autouse fixture)

IGNORE = -100
# "torch": the public dispatcher on CPU without the interpreter, i.e. fused_linear_cross_entropy_torch (gradients
# formed in forward); "reference": the checkpointed torch reference called directly
FLCE_IMPLS = IMPLS + ["torch"]
# (loss rtol, grad atol relative to the largest reference grad) per input dtype
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 5e-3), torch.bfloat16: (2e-2, 3e-2)}


def run(impl, monkeypatch, *args, **kwargs):
    """Call the public dispatcher on the Triton path (interpreter on CPU), on the CPU torch path, or the reference."""
    select_impl("reference" if impl == "torch" else impl, monkeypatch)
    if impl == "triton":
        kwargs.setdefault("block_size", 128)  # several vocab blocks per row, the last one partial
        out = fused_linear_cross_entropy(*args, **kwargs)
        monkeypatch.delenv("TRITON_INTERPRET")
        return out
    if impl == "torch":
        return fused_linear_cross_entropy(*args, **kwargs)
    return fused_linear_cross_entropy_reference(*args, **kwargs)


def float64_loss(hidden, weight, labels, bias=None, reduction="mean", softcap=None, z_loss=0.0, num_items=None,
                 label_smoothing=0.0):
    """Unchunked float64 reference: full logits, torch's own logsumexp."""
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    y = labels.reshape(-1)
    keep = y != IGNORE
    lse = torch.logsumexp(logits[keep], -1)
    nll = lse - logits[keep].gather(1, y[keep][:, None]).squeeze(1)
    smooth = lse - logits[keep].mean(-1)
    per_token = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse * lse
    total = per_token.sum()
    if reduction == "mean":
        return total / max(int(keep.sum()), 1)
    return total / num_items if num_items is not None else total


def make_inputs(dtype, tokens=(3, 29), hidden=40, vocab=301, ignore_frac=0.7, bias=True, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    h = torch.randn(*tokens, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, tokens, generator=gen)
    labels[torch.rand(tokens, generator=gen) < ignore_frac] = IGNORE
    labels.view(-1)[0] = 5  # at least one labelled token
    return h, w, b, labels


def leaf64(t):
    return None if t is None else t.detach().double().requires_grad_()


def assert_close_grads(got, want, dtype):
    rtol, gtol = TOL[dtype]
    for g, r in zip(got, want):
        if r is None:
            continue
        assert g is not None and g.dtype != torch.float64
        scale = r.grad.abs().max().item() or 1.0
        err = (g.grad.double() - r.grad).abs().max().item()
        assert err <= gtol * scale, f"grad error {err:.3g} > {gtol * scale:.3g}"


@pytest.mark.parametrize("impl", FLCE_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_mean_matches_float64(impl, dtype, with_bias, monkeypatch):
    h, w, b, y = make_inputs(dtype, bias=with_bias)
    loss = run(impl, monkeypatch, h, w, y, bias=b, chunk_size=16)
    loss.backward()
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    ref = float64_loss(h64, w64, y, b64)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - ref.item()) <= TOL[dtype][0] * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), dtype)
    # ignored rows get exactly zero gradient
    assert torch.all(h.grad.reshape(-1, h.shape[-1])[y.reshape(-1) == IGNORE] == 0)


@pytest.mark.parametrize("impl", FLCE_IMPLS)
def test_softcap_and_z_loss_grads(impl, monkeypatch):
    h, w, b, y = make_inputs(torch.float32, tokens=(2, 23), vocab=257, ignore_frac=0.4)
    with torch.no_grad():
        w.mul_(8.0)  # logits well beyond the cap so tanh's curvature matters
    loss = run(impl, monkeypatch, h, w, y, bias=b, softcap=3.0, z_loss=1e-2, chunk_size=8)
    loss.backward()
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    ref = float64_loss(h64, w64, y, b64, softcap=3.0, z_loss=1e-2)
    ref.backward()
    plain = float64_loss(h64.detach(), w64.detach(), y, b64.detach())
    assert abs(ref.item() - plain.item()) > 1e-2, "softcap/z-loss must change the loss for this test to mean anything"
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), torch.float32)


@pytest.mark.parametrize("impl", FLCE_IMPLS)
def test_label_smoothing_matches_torch_cross_entropy(impl, monkeypatch):
    h, w, b, y = make_inputs(torch.float32, tokens=(2, 21), vocab=163, ignore_frac=0.4)
    loss = run(impl, monkeypatch, h, w, y, bias=b, label_smoothing=0.1, chunk_size=9)
    loss.backward()
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    logits = h64.reshape(-1, h64.shape[-1]) @ w64.t() + b64
    ref = torch.nn.functional.cross_entropy(logits, y.reshape(-1), ignore_index=IGNORE, label_smoothing=0.1)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), torch.float32)
    # with softcap and z-loss as well, against the float64 formula
    for t in (h, w, b):
        t.grad = None
    loss = run(impl, monkeypatch, h, w, y, bias=b, label_smoothing=0.2, softcap=4.0, z_loss=1e-3, chunk_size=9)
    loss.backward()
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    ref = float64_loss(h64, w64, y, b64, softcap=4.0, z_loss=1e-3, label_smoothing=0.2)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), torch.float32)


@pytest.mark.parametrize("impl", FLCE_IMPLS)
def test_sum_with_external_count_equals_mean_over_accumulated_batch(impl, monkeypatch):
    """Gradient accumulation: micro-batches summed and divided by the whole batch's token count give the same
    loss and gradients as one big batch averaged, even though micro-batches hold different token counts."""
    h, w, b, y = make_inputs(torch.float32, tokens=(4, 17), vocab=199, ignore_frac=0.5)
    y[:2, 3:] = IGNORE  # the first micro-batch keeps far fewer tokens than the second
    full = run(impl, monkeypatch, h, w, y, bias=b)
    g_full = torch.autograd.grad(full, (h, w, b))
    num_items = torch.tensor(int((y != IGNORE).sum()))
    total = 0.0
    for part in (slice(0, 2), slice(2, 4)):
        micro = run(impl, monkeypatch, h[part], w, y[part], bias=b, reduction="sum", num_items=num_items)
        micro.backward()
        total += micro.item()
    assert abs(total - full.item()) <= 1e-5 * abs(full.item())
    for acc, ref in zip((h.grad, w.grad, b.grad), g_full):
        torch.testing.assert_close(acc, ref, rtol=1e-5, atol=1e-7)
    # a wrong scheme (mean per micro-batch) would differ here, so the check above has teeth
    per_micro_mean = sum(run(impl, monkeypatch, h[p], w, y[p], bias=b).item() for p in (slice(0, 2), slice(2, 4)))
    assert abs(per_micro_mean / 2 - full.item()) > 1e-3


@pytest.mark.parametrize("impl", FLCE_IMPLS)
@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("sum", None), ("sum", 0)])
def test_all_ignored_gives_zero_loss_and_zero_grads(impl, reduction, num_items, monkeypatch):
    h, w, b, y = make_inputs(torch.float32, tokens=(2, 11), vocab=133)
    y[:] = IGNORE
    out = run(impl, monkeypatch, h, w, y, bias=b, reduction=reduction, num_items=num_items, return_stats=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and int(out.n_valid) == 0 and int(out.n_correct) == 0
    for t in (h, w, b):
        assert t.grad is not None and torch.all(t.grad == 0)


@pytest.mark.parametrize("impl", FLCE_IMPLS)
def test_stats_count_valid_tokens_and_argmax_hits(impl, monkeypatch):
    h, w, _, y = make_inputs(torch.float32, tokens=(3, 21), vocab=211, ignore_frac=0.3, bias=False)
    logits = h.detach().double().reshape(-1, h.shape[-1]) @ w.detach().double().t()
    flat = y.view(-1)
    hit_rows = torch.arange(0, flat.numel(), 3)
    flat[hit_rows] = logits[hit_rows].argmax(-1)  # every third token is a correct prediction
    keep = flat != IGNORE
    want_correct = int(((logits.argmax(-1) == flat) & keep).sum())
    out = run(impl, monkeypatch, h, w, y, return_stats=True, chunk_size=10)
    assert isinstance(out, CrossEntropyStats)
    assert int(out.n_valid) == int(keep.sum())
    assert int(out.n_correct) == want_correct and want_correct >= hit_rows.numel()
    torch.testing.assert_close(out.loss.double(), float64_loss(h, w, y).detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunking_does_not_change_the_result(chunk, monkeypatch):
    h, w, b, y = make_inputs(torch.float32, tokens=(2, 19), vocab=150, ignore_frac=0.2)
    a = run("triton", monkeypatch, h, w, y, bias=b, chunk_size=chunk)
    ga = torch.autograd.grad(a, (h, w, b))
    r = run("reference", monkeypatch, h, w, y, bias=b, chunk_size=chunk)
    gr = torch.autograd.grad(r, (h, w, b))
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    for x, z in zip(ga, gr):
        torch.testing.assert_close(x, z, rtol=1e-4, atol=1e-6)


def test_target_class_gradient_keeps_precision_when_confident(monkeypatch):
    """dlogit at the label is p_y - 1: formed in fp32 before the fp16 store, it stays accurate as p_y -> 1
    (rounding p_y first and subtracting 1 afterwards loses most digits, Liger PR #1329)."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from fastchat_ft.kernels.fused_linear_cross_entropy import _launch_ce_rows

    vocab, rows = 517, 6
    logits = torch.randn(rows, vocab, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,))
    logits[torch.arange(rows), labels] = torch.tensor([9.0, 11.0, 13.0, 14.0, 15.0, 16.0], dtype=torch.float64)
    buf = logits.to(torch.float16)
    want = torch.softmax(buf.double(), -1)  # from the same fp16 logits the kernel sees
    want[torch.arange(rows), labels] -= 1.0
    loss = torch.empty(rows, dtype=torch.float32)
    correct = torch.empty(rows, dtype=torch.int32)
    scale = torch.ones((), dtype=torch.float32)
    _launch_ce_rows(buf, labels, loss, correct, scale, None, 0.0, True, 128)
    got = buf.double()[torch.arange(rows), labels]
    ref = want[torch.arange(rows), labels]
    assert torch.all(ref < 0) and ref.abs().min() < 2e-4
    rel = ((got - ref) / ref).abs()
    assert rel.max() < 2e-3, rel  # fp16 storage alone costs ~5e-4; a rounded p_y would cost ~100% here
    assert torch.all(correct == 1)
    torch.testing.assert_close(buf.double(), want, rtol=5e-3, atol=1e-6)


def test_mixed_dtypes_fp32_weight_fp16_hidden(monkeypatch):
    h, _, _, y = make_inputs(torch.float16, vocab=160)
    w = (torch.randn(160, h.shape[-1]) * 0.15).requires_grad_()
    loss = run("triton", monkeypatch, h, w, y)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float16
    h64, w64 = leaf64(h), leaf64(w)
    float64_loss(h64, w64, y).backward()
    assert_close_grads((h, w), (h64, w64), torch.float16)


def test_bad_inputs_raise_clear_errors(monkeypatch):
    h, w, b, y = make_inputs(torch.float32, vocab=50)
    y.view(-1)[1] = 50
    for impl in FLCE_IMPLS:
        with pytest.raises(ValueError, match="labels must be in"):
            run(impl, monkeypatch, h, w, y)
    with pytest.raises(ValueError, match="num_items"):
        fused_linear_cross_entropy_reference(h, w, y.clamp(max=1), num_items=3)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy_reference(h, w, y.clamp(max=1), reduction="none")
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy_reference(h, w, y.clamp(max=1), label_smoothing=1.5)
    with pytest.raises(ValueError, match="does not match weight"):
        fused_linear_cross_entropy_reference(h, w[:, :-1], y.clamp(max=1))


def test_no_grad_call_computes_no_gradients(monkeypatch):
    h, w, b, y = make_inputs(torch.float32, vocab=120)
    with torch.no_grad():
        a = run("triton", monkeypatch, h, w, y, bias=b)
        r = run("reference", monkeypatch, h, w, y, bias=b)
    assert not a.requires_grad and not r.requires_grad
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_import_and_cpu_path_work_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fastchat_ft.kernels import fused_linear_cross_entropy as f, rms_norm, lora_linear\n"
        "h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8)\n"
        "f(h, w, torch.tensor([1, 2, -100, 3, 4])).backward()\n"
        "rms_norm(h, torch.ones(8), 1e-6)\n"
        "lora_linear(h, w, torch.randn(2, 8), torch.randn(11, 2), 0.5)\n"
        "assert h.grad is not None\n"
    )
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}  # even with the flag: no triton, reference path
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_float64(dtype):
    """GPU: bf16/fp16 at LM-head-like sizes. Tolerances: loss rtol 2e-2 (bf16) / 3e-3 (fp16); grads within
    3e-2 / 5e-3 of the largest reference gradient."""
    torch.manual_seed(0)
    h, w, b, y = make_inputs(dtype, tokens=(4, 511), hidden=512, vocab=32003, ignore_frac=0.5)
    h, w, b = (t.detach().cuda().requires_grad_() for t in (h, w, b))
    y = y.cuda()
    out = fused_linear_cross_entropy(h, w, y, bias=b, softcap=30.0, z_loss=1e-4, chunk_size=512,
                                     return_stats=True)
    out.loss.backward()
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    ref = float64_loss(h64, w64, y, b64, softcap=30.0, z_loss=1e-4)
    ref.backward()
    assert abs(out.loss.item() - ref.item()) <= TOL[dtype][0] * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), dtype)


def test_autocast_casts_activations_and_keeps_fp32_weight_grads(monkeypatch):
    """HF Trainer's bf16/fp16 mode: fp32 master weights under torch.autocast. Activations enter in the autocast
    dtype; the head weight's gradient comes back in fp32 from the fp32 accumulator."""
    h, w, b, y = make_inputs(torch.float32, vocab=173)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = run("triton", monkeypatch, h, w, y, bias=b)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    ref = float64_loss(h64, w64, y, b64)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= TOL[torch.float16][0] * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), torch.float16)
    # the fp16 rounding really happened (so autocast was honoured, not ignored)
    exact = run("triton", monkeypatch, h, w, y, bias=b)
    assert loss.item() != exact.item()


@pytest.mark.parametrize("impl", FLCE_IMPLS)
def test_logits_are_only_ever_built_one_chunk_at_a_time(impl, monkeypatch):
    # the module, not the function of the same name that the package exports
    flce = importlib.import_module("fastchat_ft.kernels.fused_linear_cross_entropy")
    seen = []
    name = {"triton": "_launch_ce_rows", "reference": "_reference_chunk_loss", "torch": "_torch_chunk"}[impl]
    original = getattr(flce, name)

    def spy(first, *args):
        seen.append(first.shape)  # the chunk's logits (Triton) or its hidden rows (reference)
        return original(first, *args)

    monkeypatch.setattr(flce, name, spy)
    h, w, b, y = make_inputs(torch.float32, tokens=(4, 20), vocab=97, ignore_frac=0.5)
    run(impl, monkeypatch, h, w, y, bias=b, chunk_size=7).backward()
    n_valid = int((y != IGNORE).sum())
    assert seen and max(s[0] for s in seen) <= 7
    # the reference recomputes each chunk in backward; the Triton and torch paths form gradients in forward
    assert sum(s[0] for s in seen) == (2 * n_valid if impl == "reference" else n_valid)
    assert h.grad is not None


def test_default_chunking_scales_with_tokens():
    """A small batch is one chunk (one pass over the [V, H] gradient); big batches use ~1 GiB logit chunks."""
    from fastchat_ft.kernels.fused_linear_cross_entropy import _default_chunk_rows

    assert _default_chunk_rows(2048, 128256, torch.bfloat16) == 2048
    assert _default_chunk_rows(16384, 32000, torch.bfloat16) == 16384
    rows = _default_chunk_rows(16384, 128256, torch.bfloat16)
    assert rows % 256 == 0 and rows * 128256 * 2 <= 1 << 30 and -(-16384 // rows) == 4


def test_bf16_plumbing_under_the_interpreter(monkeypatch):
    """bf16 end to end on the Triton path (the interpreter casts to bf16 by truncation, so tolerances allow a few
    bf16 ulps; the GPU test below holds bf16 to the stated tolerances with round-to-nearest)."""
    h, w, b, y = make_inputs(torch.bfloat16, vocab=211, ignore_frac=0.5)
    loss = run("triton", monkeypatch, h, w, y, bias=b, chunk_size=8, softcap=20.0)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.bfloat16
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    ref = float64_loss(h64, w64, y, b64, softcap=20.0)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= TOL[torch.bfloat16][0] * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), torch.bfloat16)


def test_float64_inputs_take_the_reference_path(monkeypatch):
    h, w, b, y = make_inputs(torch.float64, vocab=90)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    loss = fused_linear_cross_entropy(h, w, y, bias=b)
    assert loss.dtype == torch.float64  # the reference accumulates in float64 for float64 inputs
    torch.testing.assert_close(loss, float64_loss(h, w, y, b), rtol=1e-12, atol=1e-12)


def test_torch_path_is_the_cpu_dispatch_and_float64_stays_on_the_reference(monkeypatch):
    flce = importlib.import_module("fastchat_ft.kernels.fused_linear_cross_entropy")
    calls = []
    original = flce._torch_chunks
    monkeypatch.setattr(flce, "_torch_chunks", lambda *a: calls.append(a[0].dtype) or original(*a))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, b, y = make_inputs(torch.float32, vocab=70)
    fused_linear_cross_entropy(h, w, y, bias=b)
    fused_linear_cross_entropy(leaf64(h), leaf64(w), y, bias=leaf64(b))
    assert calls == [torch.float32]


def test_torch_path_scales_gradients_by_the_upstream_grad_over_two_accumulated_calls(monkeypatch):
    """Gradients formed in forward are only right if backward applies grad_output: two micro-batches, each loss
    multiplied by a different factor after the call, accumulate into .grad exactly as float64 autograd does."""
    h, w, b, y = make_inputs(torch.float32, tokens=(4, 13), vocab=181, ignore_frac=0.4)
    h64, w64, b64 = leaf64(h), leaf64(w), leaf64(b)
    for part, factor in ((slice(0, 1), 3.5), (slice(1, 4), -0.25)):
        loss = run("torch", monkeypatch, h[part], w, y[part], bias=b, reduction="sum", num_items=19, softcap=5.0,
                   z_loss=1e-3, label_smoothing=0.05, chunk_size=6)
        (loss * factor).backward()
        ref = float64_loss(h64[part], w64, y[part], b64, reduction="sum", num_items=19, softcap=5.0, z_loss=1e-3,
                           label_smoothing=0.05)
        (ref * factor).backward()
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert_close_grads((h, w, b), (h64, w64, b64), torch.float32)
    # a backward that ignored the factor would be far off (the factors differ in sign)
    h.grad = None
    run("torch", monkeypatch, h, w, y, bias=b, reduction="sum", num_items=19).backward()
    assert (h.grad.double() - h64.grad).abs().max() > 1e-3 * h64.grad.abs().max()


def test_torch_path_frozen_head_gets_no_weight_gradient_work(monkeypatch):
    """A frozen (tied, LoRA) head: no [V, H] gradient accumulator is built; the hidden-state gradient still matches."""
    flce = importlib.import_module("fastchat_ft.kernels.fused_linear_cross_entropy")
    wants = []
    original = flce._torch_chunks
    monkeypatch.setattr(flce, "_torch_chunks", lambda *a: wants.append(a[-3:]) or original(*a))
    h, w, _, y = make_inputs(torch.float32, vocab=97, bias=False)
    w.requires_grad_(False)
    run("torch", monkeypatch, h, w, y).backward()
    assert wants == [(True, False, False)] and w.grad is None
    h64 = leaf64(h)
    float64_loss(h64, w.double(), y).backward()
    assert_close_grads((h,), (h64,), torch.float32)
    with torch.no_grad():
        run("torch", monkeypatch, h, w, y)
    assert wants[-1] == (False, False, False)  # evaluation does no gradient work


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_torch_path_vocab_sliced_logits_match_float64(with_bias, softcap, monkeypatch):
    # the CPU path computes the logits GEMM in vocab slices (CPU_VOCAB_BLOCK); a small block makes a 301-row head
    # run 7 slices, the last one partial, and the result must not change
    flce = importlib.import_module("fastchat_ft.kernels.fused_linear_cross_entropy")

    monkeypatch.setattr(flce, "CPU_VOCAB_BLOCK", 48)
    slices = []
    original = flce._logits
    monkeypatch.setattr(flce, "_logits", lambda x, w, b: slices.append(w.shape[0]) or original(x, w, b))
    h, w, b, y = make_inputs(torch.float32, bias=with_bias)
    w.requires_grad_(False)
    loss = run("torch", monkeypatch, h, w, y, bias=b, softcap=softcap, chunk_size=16)
    loss.backward()
    assert slices and all(v == 301 for v in slices)
    h64, w64, b64 = leaf64(h), leaf64(w).requires_grad_(False), leaf64(b)
    ref = float64_loss(h64, w64, y, b64, softcap=softcap)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= TOL[torch.float32][0] * abs(ref.item())
    assert_close_grads((h, b), (h64, b64), torch.float32)


def test_torch_path_reuses_one_logits_buffer_per_thread_and_stays_exact(monkeypatch):
    # the CPU logits buffer outlives each call (a fresh 100+ MB one is a fresh mmap every chunk); reusing it for
    # calls with fewer, equal or more rows, and from another thread, must not change any result
    import threading

    flce = importlib.import_module("fastchat_ft.kernels.fused_linear_cross_entropy")
    monkeypatch.setattr(flce, "CPU_VOCAB_BLOCK", 48)
    monkeypatch.setattr(flce._buffers, "logits", None, raising=False)
    torch.manual_seed(5)
    w = torch.randn(301, 24, dtype=torch.float64).float() * 0.3

    def check(rows):
        h = torch.randn(rows, 24, requires_grad=True)
        y = torch.randint(0, 301, (rows,))
        y[::5] = -100
        loss = run("torch", monkeypatch, h, w, y, label_smoothing=0.05, z_loss=1e-3, chunk_size=64)
        loss.backward()
        h64 = leaf64(h)
        ref = float64_loss(h64, w.double(), y, label_smoothing=0.05, z_loss=1e-3)
        ref.backward()
        assert abs(loss.item() - ref.item()) <= TOL[torch.float32][0] * abs(ref.item())
        assert_close_grads((h,), (h64,), torch.float32)

    check(40)
    first = flce._buffers.logits
    assert first is not None and first.numel() >= 40 * 301
    check(23)
    check(40)
    assert flce._buffers.logits is first  # fewer or equal rows: the same buffer, nothing allocated
    check(300)  # more rows than it holds: a larger one replaces it
    assert flce._buffers.logits.numel() >= 64 * 301

    seen = []
    thread = threading.Thread(target=lambda: (check(31), seen.append(flce._buffers.logits)))
    thread.start()
    thread.join()
    assert seen and seen[0] is not None and seen[0] is not flce._buffers.logits  # its own buffer
