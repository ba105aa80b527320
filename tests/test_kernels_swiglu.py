"""swiglu (Triton path under the interpreter, the native CPU path, and the torch path) against a float64 reference and HF's eager
act_fn(gate) * up, on sizes that are not multiples of the block; what backward keeps alive; fallbacks."""
import importlib
import weakref
from contextlib import nullcontext

import pytest
import torch

from fastchat_ft.kernels import swiglu, swiglu_reference
from fastchat_ft.kernels.swiglu import BLOCK, recomputed_for_backward
from kernel_impls import IMPLS, assert_close_relative, one_thread, select_impl  # noqa: F401 (one_thread: autouse)

SWIGLU_IMPLS = IMPLS + ["native"]  # native: csrc/cpu_swiglu.cc, fp32 on CPU (other dtypes take the torch path)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the largest reference value


def eager(gate, up):
    """HF LlamaMLP's activation, on its own leaves: values and gradients to compare against."""
    g, u = (t.detach().clone().requires_grad_() for t in (gate, up))
    return g, u, torch.nn.functional.silu(g) * u


def close(got, want64, dtype):
    assert_close_relative(got, want64, TOL[dtype])


def check_against_float64(gate, up, dtype):
    """swiglu's output and both gradients against the float64 reference, for a fresh upstream gradient."""
    h = swiglu(gate, up)
    assert h.shape == gate.shape and h.dtype == dtype
    dh = torch.randn_like(h)
    h.backward(dh)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    h64 = swiglu_reference(g64, u64)
    h64.backward(dh.double())
    close(h, h64.detach(), dtype)
    close(gate.grad, g64.grad, dtype)
    close(up.grad, u64.grad, dtype)


@pytest.mark.parametrize("impl", SWIGLU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 11, 77), (2 * BLOCK + 5,)])
def test_matches_float64_forward_and_backward(impl, dtype, shape, monkeypatch):
    select_impl(impl, monkeypatch)
    gate = (torch.randn(shape) * 3).to(dtype).requires_grad_()  # wide range: sigmoid saturates both ways
    up = torch.randn(shape).to(dtype).requires_grad_()
    check_against_float64(gate, up, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_path_is_bit_identical_to_eager(dtype, monkeypatch):
    select_impl("reference", monkeypatch)
    gate = torch.randn(5, 37).to(dtype).requires_grad_()
    up = torch.randn(5, 37).to(dtype).requires_grad_()
    g, u, want = eager(gate, up)
    h = swiglu(gate, up)
    dh = torch.randn_like(h)
    h.backward(dh)
    want.backward(dh)
    assert torch.equal(h, want) and torch.equal(gate.grad, g.grad) and torch.equal(up.grad, u.grad)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_path_is_the_one_taken_and_close_to_eager_on_any_thread_count(threads, monkeypatch):
    """fp32 contiguous CPU tensors run csrc/cpu_swiglu.cc (with FASTCHAT_FT_CPU_SWIGLU=0 they do not), on a size
    that splits unevenly over the threads with a tail shorter than one vector; values and gradients within a few
    ulp of eager's, the extremes of the sigmoid included."""
    mod = importlib.import_module("fastchat_ft.kernels.swiglu")  # the package attribute is the function
    calls, backward_calls = [], []
    real, real_backward = mod._native_forward, mod._native_backward
    monkeypatch.setattr(mod, "_native_forward", lambda n, g, u: calls.append(g.shape) or real(n, g, u))
    monkeypatch.setattr(mod, "_native_backward", lambda *a: backward_calls.append(1) or real_backward(*a))
    select_impl("native", monkeypatch)
    torch.set_num_threads(threads)
    gate = (torch.randn(7, 1003) * 4).requires_grad_()
    with torch.no_grad():
        gate[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -30.0])
    up = torch.randn(7, 1003).requires_grad_()
    g, u, want = eager(gate, up)
    h = swiglu(gate, up)
    dh = torch.randn_like(h)
    monkeypatch.setenv("FASTCHAT_FT_CPU_SWIGLU", "0")  # switched off between forward and backward: this backward
    h.backward(dh)                                     # still runs the path of its forward
    want.backward(dh)
    assert calls == [gate.shape] and backward_calls == [1]
    for got, ref in ((h, want), (gate.grad, g.grad), (up.grad, u.grad)):
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-7)
    monkeypatch.setenv("FASTCHAT_FT_CPU_SWIGLU", "0")
    swiglu(gate, up)
    assert len(calls) == 1


def check_rounds_like_eager(gate, up):
    """silu is rounded to the input dtype before the product, as eager does: nearly every element bit-identical
    (a kernel that skips that rounding differs in about a quarter of them)."""
    g, u, want = eager(gate, up)
    h = swiglu(gate, up)
    dh = torch.randn_like(h)
    h.backward(dh)
    want.backward(dh)
    for got, ref in ((h, want), (gate.grad, g.grad), (up.grad, u.grad)):
        assert (got != ref).float().mean() < 0.02
        torch.testing.assert_close(got, ref, rtol=2e-3 if got.dtype == torch.float16 else 1.6e-2, atol=2e-3)


def test_triton_path_rounds_like_eager_in_half_precision(monkeypatch):
    # fp16 only: the interpreter truncates fp32 -> bf16 where GPUs round to nearest (bf16 is the CUDA test's)
    select_impl("triton", monkeypatch)
    check_rounds_like_eager(*(torch.randn(7, 301).half().requires_grad_() for _ in range(2)))


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_keeps_two_activations_where_eager_keeps_three(impl, monkeypatch):
    select_impl(impl, monkeypatch)

    def saved_storages(fn):
        storages = set()

        def pack(t):
            if t.numel() == 6 * 40:  # the activations, not scalars
                storages.add(t.untyped_storage().data_ptr())
            return t

        gate = torch.randn(6, 40).requires_grad_()
        up = torch.randn(6, 40).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate * 1.0, up * 1.0).sum().backward()  # non-leaf inputs, as the projections' outputs are
        return len(storages)

    assert saved_storages(swiglu) == 2
    assert saved_storages(swiglu_reference) == 3


@pytest.mark.parametrize("impl", SWIGLU_IMPLS)
def test_gradient_to_one_input_only(impl, monkeypatch):
    select_impl(impl, monkeypatch)
    gate = torch.randn(4, 33)
    up = torch.randn(4, 33).requires_grad_()
    swiglu(gate, up).sum().backward()
    u64 = up.detach().double().requires_grad_()
    swiglu_reference(gate.double(), u64).sum().backward()
    close(up.grad, u64.grad, torch.float32)


def test_other_inputs_fall_back_to_the_reference(monkeypatch):
    select_impl("triton", monkeypatch)
    gate, up = torch.randn(4, 1, 9), torch.randn(4, 3, 9)  # broadcasting
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=0, atol=0)
    g64 = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(swiglu(g64, g64), swiglu_reference(g64, g64))
    mixed = swiglu(torch.randn(3, 5).half(), torch.randn(3, 5))
    assert mixed.dtype == torch.float32  # promoted, as eager promotes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_rounds_like_eager(dtype):
    check_rounds_like_eager(*(torch.randn(37, 1537, device="cuda").to(dtype).requires_grad_() for _ in range(2)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_float64(dtype):
    gate = (torch.randn(3, 1001, 1537, device="cuda") * 3).to(dtype).requires_grad_()
    up = torch.randn(3, 1001, 1537, device="cuda").to(dtype).requires_grad_()
    check_against_float64(gate, up, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_is_refused_clearly(impl, monkeypatch):
    select_impl(impl, monkeypatch)
    gate, up = (torch.randn(3, 8).requires_grad_() for _ in range(2))
    (dg,) = torch.autograd.grad(swiglu(gate, up).pow(2).sum(), gate, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dg.sum().backward()


def _down_projection_grads(recompute, outer_hooks=False):
    """x -> gate/up projections -> swiglu -> down projection: the gradients of all three weights, and whether h
    was still alive between forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12)
    w_gate, w_up, w_down = (torch.randn(*s).requires_grad_() for s in ((20, 12), (20, 12), (12, 20)))
    outer = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if outer_hooks else nullcontext()
    with outer:
        gate, up = x @ w_gate.t(), x @ w_up.t()
        h = swiglu(gate, up)
        with recomputed_for_backward(h, gate, up) if recompute else nullcontext():
            y = torch.nn.functional.linear(h, w_down)
    h_ref = weakref.ref(h)
    del h
    h_alive = h_ref() is not None
    y.pow(2).sum().backward()
    return [w.grad for w in (w_gate, w_up, w_down)], h_alive


@pytest.mark.parametrize("impl", IMPLS)
def test_recomputing_the_down_input_gives_the_same_gradients(impl, monkeypatch, recompute_recipes):
    select_impl(impl, monkeypatch)
    want, kept = _down_projection_grads(recompute=False)
    assert not recompute_recipes and kept  # linear keeps its input h for its weight gradient...
    got, alive = _down_projection_grads(recompute=True)
    assert len(recompute_recipes) == 1 and not alive  # ...or, inside the block, a recipe for it: h itself is freed
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # the same kernel recomputes h bit for bit


def test_recompute_steps_aside_under_other_saved_tensor_hooks(recompute_recipes):
    grads, _ = _down_projection_grads(recompute=True, outer_hooks=True)
    want, _ = _down_projection_grads(recompute=False)
    assert not recompute_recipes and all(torch.equal(g, w) for g, w in zip(grads, want))
