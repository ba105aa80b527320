"""lora_linear (fused Triton GEMM under the interpreter, the native CPU path for fp32 and ranks 16-64, and the torch
reference) against PEFT's LoRA Linear and a float64 reference: odd sizes (not multiples of the tiles), bias, fp32
adapters on fp16 activations, frozen W, and the 4-bit (bitsandbytes) dequantize path."""
import sys
import types

import pytest
import torch

from fastchat_ft.kernels import lora_linear, lora_linear_reference
from fastchat_ft.kernels._triton import HAS_TRITON
from kernel_impls import IMPLS, assert_close_relative, one_thread, select_impl  # noqa: F401 (one_thread: autouse)

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}  # relative to the largest reference value


def run(impl, monkeypatch, *args, **kwargs):
    select_impl(impl, monkeypatch)
    return lora_linear(*args, **kwargs)


def make(dtype, m=(3, 13), k=45, n=53, r=5, bias=True):
    x = torch.randn(*m, k).to(dtype).requires_grad_()
    w = (torch.randn(n, k) * k ** -0.5).to(dtype)
    a = (torch.randn(r, k) * 0.2).to(dtype).requires_grad_()
    b = (torch.randn(n, r) * 0.2).to(dtype).requires_grad_()
    bias_ = (torch.randn(n) * 0.1).to(dtype) if bias else None
    return x, w, a, b, bias_


def close(got, want, dtype):
    assert_close_relative(got, want, TOL[dtype])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64(impl, dtype, with_bias, monkeypatch):
    x, w, a, b, bias = make(dtype, bias=with_bias)
    y = run(impl, monkeypatch, x, w, a, b, 1.75, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = lora_linear_reference(x64, w.double(), a64, b64, 1.75, None if bias is None else bias.double())
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == (3, 13, 53)
    close(y, y64.detach(), dtype)
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        close(got, want, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_peft_lora_linear(impl, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(37, 29, bias=True))
    peft_model = get_peft_model(model, LoraConfig(r=6, lora_alpha=9, lora_dropout=0.0, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    base = layer.base_layer
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)  # PEFT inits B to zero; make the LoRA path count
    x = torch.randn(2, 17, 37)
    want = layer(x)
    y = run(impl, monkeypatch, x, base.weight.detach(), layer.lora_A["default"].weight,
            layer.lora_B["default"].weight, layer.scaling["default"], base.bias.detach())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert (want - base(x)).abs().max() > 1e-2  # the adapter changes the output


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_matches_peft(impl, monkeypatch):
    """Same RNG state, same mask: PEFT's lora_dropout applies to the LoRA input only."""
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(41, 23, bias=False))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["proj"]))
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    layer.train()
    x = torch.randn(3, 11, 41, requires_grad=True)
    torch.manual_seed(1234)
    want = layer(x)
    want.sum().backward()
    want_grads = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
                  layer.lora_B["default"].weight.grad.clone())
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    x.grad = None
    torch.manual_seed(1234)
    y = run(impl, monkeypatch, x, layer.base_layer.weight.detach(), a, b, layer.scaling["default"], None, 0.3)
    y.sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip((x.grad, a.grad, b.grad), want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # without the mask the answer differs, so the test sees the dropout
    no_drop = lora_linear_reference(x.detach(), layer.base_layer.weight.detach(), a.detach(), b.detach(),
                                    layer.scaling["default"])
    assert (no_drop - want).abs().max() > 1e-3


def test_fp32_adapters_on_fp16_activations_get_fp32_grads(monkeypatch):
    x, w, _, _, bias = make(torch.float16)
    a = (torch.randn(5, 45) * 0.2).requires_grad_()
    b = (torch.randn(53, 5) * 0.2).requires_grad_()
    y = run("triton", monkeypatch, x, w, a, b, 0.5, bias)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    lora_linear_reference(x64, w.double(), a64, b64, 0.5, bias.double()).sum().backward()
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        close(got, want, torch.float16)


def test_fused_gemm_with_transposed_operands_and_ragged_k(monkeypatch):
    """The kernel reads any strides: the backward calls it with W untransposed; K=47 is not a tile multiple."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from fastchat_ft.kernels.lora_linear import fused_lora_matmul

    a = torch.randn(47, 33).t()  # [33, 47], column-major
    b = torch.randn(47, 21)
    s = torch.randn(33, 3)
    lo = torch.randn(21, 3).t()
    bias = torch.randn(21)
    got = fused_lora_matmul(a, b, s, lo, 0.3, bias)
    want = a.double() @ b.double() + 0.3 * s.double() @ lo.double() + bias.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    plain = fused_lora_matmul(a, b)
    torch.testing.assert_close(plain.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-4)


def test_cublas_backend_gives_the_same_result(monkeypatch):
    x, w, a, b, bias = make(torch.float32)
    y = run("triton", monkeypatch, x, w, a, b, 0.7, bias)
    grads = torch.autograd.grad(y.sum(), (x, a, b))
    monkeypatch.setenv("FASTCHAT_LORA_GEMM", "cublas")
    y2 = run("triton", monkeypatch, x, w, a, b, 0.7, bias)
    grads2 = torch.autograd.grad(y2.sum(), (x, a, b))
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    for g2, g in zip(grads2, grads):
        torch.testing.assert_close(g2, g, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FASTCHAT_LORA_GEMM", "cutlass")
    with pytest.raises(ValueError, match="FASTCHAT_LORA_GEMM"):
        run("triton", monkeypatch, x, w, a, b, 0.7, bias)


@pytest.mark.parametrize("impl", IMPLS)
def test_trainable_base_weight_is_rejected(impl, monkeypatch):
    x, w, a, b, _ = make(torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        run(impl, monkeypatch, x, w.requires_grad_(), a, b, 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        run(impl, monkeypatch, x, w, a[:, :-1], b, 1.0)


class _FakeQuantState:
    def __init__(self, shape, absmax):
        self.shape, self.absmax = torch.Size(shape), absmax


class _FakeParams4bit(torch.Tensor):
    """Stands in for bitsandbytes Params4bit: int8 codes plus a quant_state (the real type needs CUDA here)."""


def _fake_bnb(monkeypatch, calls):
    functional = types.ModuleType("bitsandbytes.functional")

    def dequantize_4bit(codes, quant_state):
        calls.append(quant_state)
        return (codes.float() * quant_state.absmax).reshape(quant_state.shape)

    functional.dequantize_4bit = dequantize_4bit
    package = types.ModuleType("bitsandbytes")
    package.functional = functional
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)


@pytest.mark.parametrize("impl", IMPLS)
def test_4bit_weight_is_dequantized_in_forward_and_backward(impl, monkeypatch):
    calls = []
    _fake_bnb(monkeypatch, calls)
    codes = torch.randint(-7, 8, (53 * 45,), dtype=torch.int8)
    qweight = codes.as_subclass(_FakeParams4bit)
    qweight.quant_state = _FakeQuantState((53, 45), 0.02)
    dense = codes.float().reshape(53, 45) * 0.02
    x, _, a, b, bias = make(torch.float32)
    y = run(impl, monkeypatch, x, qweight, a, b, 2.0, bias)
    y.sum().backward()
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    lora_linear_reference(x64, dense.double(), a64, b64, 2.0, bias.double()).sum().backward()
    close(y, lora_linear_reference(x.detach().double(), dense.double(), a64, b64, 2.0, bias.double()).detach(),
          torch.float32)
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        close(got, want, torch.float32)
    assert len(calls) >= 2 if impl == "triton" else len(calls) >= 1  # Triton path dequantizes again in backward


@pytest.mark.cuda
def test_cuda_bf16_matches_float64():
    """GPU bf16 at a 4096-wide projection: output and grads within 2e-2 of the largest float64 value."""
    torch.manual_seed(0)
    x = torch.randn(2, 1000, 4096, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(4096, 4096, device="cuda") * 4096 ** -0.5).bfloat16()
    a = (torch.randn(16, 4096, device="cuda") * 0.01).bfloat16().requires_grad_()
    b = (torch.randn(4096, 16, device="cuda") * 0.01).bfloat16().requires_grad_()
    y = lora_linear(x, w, a, b, 2.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = lora_linear_reference(x64, w.double(), a64, b64, 2.0)
    y64.backward(dy.double())
    for got, want in ((y, y64.detach()), (x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_autocast_runs_the_lora_path_in_the_autocast_dtype(monkeypatch):
    x, w, a, b, bias = make(torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        y = run("triton", monkeypatch, x, w, a, b, 1.5, bias)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == torch.float32
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = lora_linear_reference(x64, w.double(), a64, b64, 1.5, bias.double())
    y64.sum().backward()
    close(y, y64.detach(), torch.float16)
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        close(got, want, torch.float16)


def test_cpu_path_is_the_autograd_function_and_matches_the_peft_style_reference(monkeypatch):
    """CPU (no interpreter): the LoRA term is added into the base GEMM's output in place by the autograd Function;
    the result and the gradients of two accumulated backward passes equal the reference's (F.linear + scale *
    B(A(x)), PEFT's layout) up to float reassociation. float64 keeps the reference."""
    select_impl("reference", monkeypatch)
    x, w, a, b, bias = make(torch.float32, m=(2, 37), k=61, n=43, r=7)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    for _ in range(2):
        dy = torch.randn(2, 37, 43)
        y = lora_linear(x, w, a, b, 1.3, bias)
        assert type(y.grad_fn.next_functions[0][0]).__name__ == "_LoRALinearBackward"  # under the reshape
        y.backward(dy)
        want = lora_linear_reference(ref_leaves[0], w, ref_leaves[1], ref_leaves[2], 1.3, bias)
        want.backward(dy)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for got, ref in zip((x, a, b), ref_leaves):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-5)
    y64 = lora_linear(*(t.detach().double() for t in (x, w, a, b)), 1.3)
    assert y64.dtype == torch.float64 and y64.grad_fn is None


# ---------------------------------------------------------------------------- native CPU path (csrc/cpu_lora.cc)

def _native_backward_node(y):
    node = y.grad_fn.next_functions[0][0]  # under the reshape
    assert type(node).__name__ == "_LoRALinearBackward"
    return node


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,k,n,r,with_bias", [
    ((3, 13), 45, 53, 16, True),     # sizes not multiples of 16 (tails of every loop), bias
    ((2, 71), 96, 40, 32, False),    # rows past a 64-row block
    ((1, 9), 33, 130, 48, True),
    ((1, 1), 16, 17, 64, False),     # one row
])
def test_native_path_matches_float64_on_any_thread_count(rows, k, n, r, with_bias, threads, monkeypatch):
    """The native kernels run (the Function keeps them in ctx) and give y, dx, dA, dB of the float64 reference,
    on 1-3 threads; two backward passes accumulate like torch's."""
    torch.set_num_threads(threads)
    x, w, a, b, bias = make(torch.float32, m=rows, k=k, n=n, r=r, bias=with_bias)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    for _ in range(2):
        y = run("native", monkeypatch, x, w, a, b, 1.75, bias)
        assert _native_backward_node(y).native is not None
        dy = torch.randn_like(y)
        y.backward(dy)
        y64 = lora_linear_reference(x64, w.double(), a64, b64, 1.75, None if bias is None else bias.double())
        y64.backward(dy.double())
        close(y, y64.detach(), torch.float32)
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        close(got, want, torch.float32)


def test_native_path_gives_the_same_bits_twice_and_needs_no_input_grad(monkeypatch):
    """Fixed thread count: the same bits on a rerun (per-thread partials added in thread order). With x frozen the
    backward skips dx and still gives dA, dB."""
    select_impl("native", monkeypatch)
    torch.set_num_threads(2)
    x, w, a, b, _ = make(torch.float32, m=(4, 50), k=64, n=48, r=16, bias=False)
    runs = []
    for _ in range(2):
        a.grad = b.grad = x.grad = None
        y = lora_linear(x, w, a, b, 2.0)
        assert _native_backward_node(y).native is not None
        y.backward(torch.ones_like(y))
        runs.append((y.detach(), x.grad, a.grad, b.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    frozen_x = x.detach()
    y = lora_linear(frozen_x, w, a, b, 2.0)
    ga, gb = torch.autograd.grad(y.sum(), (a, b))
    torch.testing.assert_close(ga, runs[0][2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, runs[0][3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["rank 8", "dropout", "switch off", "float16", "a transposed view"])
def test_native_path_steps_aside_where_it_does_not_apply(case, monkeypatch):
    """Ranks not a multiple of 16, LoRA dropout, FASTCHAT_FT_CPU_LORA=0, other dtypes and non-contiguous inputs
    keep torch's GEMMs, with the same results."""
    select_impl("native" if case != "switch off" else "reference", monkeypatch)
    dtype = torch.float16 if case == "float16" else torch.float32
    x, w, a, b, bias = make(dtype, m=(2, 9), k=32, n=24, r=8 if case == "rank 8" else 16)
    if case == "a transposed view":  # 2-D, so lora_linear's reshape keeps the view
        x = torch.randn(32, 18).t().requires_grad_()
    dropout = 0.5 if case == "dropout" else 0.0
    y = lora_linear(x, w, a, b, 1.5, bias, dropout)
    assert _native_backward_node(y).native is None
    if not dropout:
        want = lora_linear_reference(x.detach().double(), w.double(), a.detach().double(), b.detach().double(), 1.5,
                                     bias.double())
        close(y, want, dtype)


# ---------------------------------------------------------------------------- groups: layers sharing one input

def _group_layers(k, outs, r, bias):
    layers = []
    for n in outs:
        w = torch.randn(n, k) * k ** -0.5
        a = (torch.randn(r, k) * 0.2).requires_grad_()
        b = (torch.randn(n, r) * 0.2).requires_grad_()
        bias_ = (torch.randn(n) * 0.1).requires_grad_() if bias else None
        layers.append((w, a, b, 0.5 + len(layers), bias_))
    return layers


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("outs,r,bias", [
    ((37, 19, 19), 16, False),        # q/k/v-like: three widths, one rank, sizes off the vector width
    ((53, 53), 16, False),            # gate/up-like at rank 16
    ((53, 53), 32, True),             # the same at rank 32, with bias
    ((23, 40, 17, 64), 16, True),     # four layers: stacked rank 64
    ((31,), 16, False),               # a group of one
])
def test_group_matches_float64_per_layer(outs, r, bias, threads, monkeypatch):
    """lora_linear_group = one lora_linear per layer (float64 reference): outputs, dx summed over the layers, each
    layer's dA, dB and bias gradient; on the native group path (one call each way for the group)."""
    from fastchat_ft.kernels import lora_linear_group

    select_impl("native", monkeypatch)
    torch.set_num_threads(threads)
    x = torch.randn(2, 67, 45, requires_grad=True)
    layers = _group_layers(45, outs, r, bias)
    ys = lora_linear_group(x, layers)
    assert type(ys[0].grad_fn.next_functions[0][0]).__name__ == "LoRAGroupBackward"
    dys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    x64 = x.detach().double().requires_grad_()
    leaves = [[t.detach().double().requires_grad_() if t is not None else None for t in (a, b, bias_)]
              for _w, a, b, _s, bias_ in layers]
    for (w, _a, _b, scale, _bias), (a64, b64, bias64), y, dy in zip(layers, leaves, ys, dys):
        want = lora_linear_reference(x64, w.double(), a64, b64, scale, bias64)
        want.backward(dy.double())
        close(y, want.detach(), torch.float32)
    close(x.grad, x64.grad, torch.float32)
    for (_w, a, b, _s, bias_), (a64, b64, bias64) in zip(layers, leaves):
        close(a.grad, a64.grad, torch.float32)
        close(b.grad, b64.grad, torch.float32)
        if bias_ is not None:
            close(bias_.grad, bias64.grad, torch.float32)


@pytest.mark.parametrize("case", ["rank 8", "two ranks", "stacked rank over 64", "switch off", "float16"])
def test_group_falls_back_to_one_call_per_layer(case, monkeypatch):
    """Groups the native kernels do not take run one lora_linear per layer, with the same results."""
    from fastchat_ft.kernels import lora_linear_group

    select_impl("reference" if case == "switch off" else "native", monkeypatch)
    r = {"rank 8": 8, "stacked rank over 64": 32}.get(case, 16)
    outs = (24, 24, 24) if case == "stacked rank over 64" else (24, 24)
    layers = _group_layers(32, outs, r, bias=False)
    if case == "two ranks":
        layers[1] = _group_layers(32, (24,), 32, bias=False)[0]
    dtype = torch.float16 if case == "float16" else torch.float32
    if dtype != torch.float32:
        layers = [(w.to(dtype), a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_(), s, bias)
                  for w, a, b, s, bias in layers]
    x = torch.randn(3, 32).to(dtype)
    ys = lora_linear_group(x, layers)
    for y in ys:  # one autograd node per layer, not a group's
        assert type(y.grad_fn.next_functions[0][0]).__name__ == "_LoRALinearBackward"
    for y, (w, a, b, scale, bias) in zip(ys, layers):
        want = lora_linear_reference(x.double(), w.double(), a.detach().double(), b.detach().double(), scale)
        close(y, want, dtype)


@pytest.mark.parametrize("frozen", ["x", "first A", "last B", "unused output"])
def test_group_gradients_when_part_of_it_is_frozen(frozen, monkeypatch):
    """Each gradient goes to its own input when some inputs need none (x frozen: no dx at all; one layer's A or B
    frozen) or one output is left out of the loss (its dy is zeros)."""
    from fastchat_ft.kernels import lora_linear_group

    select_impl("native", monkeypatch)
    layers = _group_layers(40, (24, 16, 16), 16, bias=True)
    x = torch.randn(3, 9, 40, requires_grad=frozen != "x")
    if frozen == "first A":
        layers[0][1].requires_grad_(False)
    if frozen == "last B":
        layers[2][2].requires_grad_(False)
    ys = lora_linear_group(x, layers)
    used = ys[:2] if frozen == "unused output" else ys
    dys = [torch.randn_like(y) for y in used]
    torch.autograd.backward(used, dys)
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    refs = [[t.detach().double().requires_grad_(t.requires_grad) for t in (a, b, bias)]
            for _w, a, b, _s, bias in layers]
    wants = [lora_linear_reference(x64, w.double(), a64, b64, scale, bias64)
             for (w, _a, _b, scale, _bias), (a64, b64, bias64) in zip(layers, refs)]
    torch.autograd.backward(wants[:len(used)], [dy.double() for dy in dys])
    if frozen == "x":
        assert x.grad is None
    else:
        close(x.grad, x64.grad, torch.float32)
    for (_w, a, b, _s, bias), ref in zip(layers, refs):
        for got, want in zip((a, b, bias), ref):
            if not got.requires_grad:
                assert got.grad is None
            elif want.grad is None:  # the unused layer's
                assert got.grad is None or not got.grad.any()
            else:
                close(got.grad, want.grad, torch.float32)


def test_native_backward_refuses_to_build_a_graph(monkeypatch):
    """create_graph=True through the native kernels would give gradients without a graph: a clear error instead."""
    select_impl("native", monkeypatch)
    x, w, a, b, _ = make(torch.float32, m=(2, 5), k=32, n=16, r=16, bias=False)
    y = lora_linear(x, w, a, b, 2.0)
    with pytest.raises(RuntimeError, match="FASTCHAT_FT_CPU_LORA=0"):
        torch.autograd.grad(y.sum(), (a,), create_graph=True)


def test_project_group_calls_hooked_modules_one_by_one(monkeypatch):
    """A hook on one of the modules (or a forward replaced on it) sends the group back to one call per module, so
    the hook runs; the results are the same either way."""
    from fastchat_ft.kernels import lora_cpu
    from fastchat_ft.model.lora import LoraLinear, project_group

    select_impl("native", monkeypatch)
    torch.manual_seed(0)
    modules = [LoraLinear(torch.nn.Linear(32, n, bias=False), r=16, alpha=32) for n in (32, 16, 16)]
    for m in modules:
        torch.nn.init.normal_(m.lora_B.weight, 0, 0.2)
    groups = []
    real_apply = lora_cpu.LoRAGroup.apply
    monkeypatch.setattr(lora_cpu.LoRAGroup, "apply", lambda *a: groups.append(1) or real_apply(*a))
    x = torch.randn(7, 32)
    grouped = project_group(x, modules)
    assert groups == [1]
    seen = []
    handle = modules[1].register_forward_hook(lambda mod, inp, out: seen.append(mod))
    one_by_one = project_group(x, modules)
    handle.remove()
    assert groups == [1] and seen == [modules[1]]
    for got, want in zip(grouped, one_by_one):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    modules[0].train()
    modules[0].dropout = 0.1  # dropout in training: not the group's
    project_group(x, modules)
    assert groups == [1]
