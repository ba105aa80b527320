"""Shared by the kernel tests: run a kernel on its Triton path (the interpreter on CPU) or its torch reference,
on one thread so interpreted runs don't fight the rest of the suite for the 2 CI cores."""
import pytest
import torch

from fastchat_ft.kernels._triton import HAS_TRITON

IMPLS = ["triton", "reference"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def select_impl(impl, monkeypatch):
    """Make the public dispatcher take `impl`: TRITON_INTERPRET=1 routes CPU tensors to the Triton kernels;
    "reference" is the torch path, "native" (kernels with a native CPU build: swiglu, rms_norm, lora_linear) the
    C++ one for fp32."""
    for var in ("FASTCHAT_FT_CPU_SWIGLU", "FASTCHAT_FT_CPU_RMSNORM", "FASTCHAT_FT_CPU_LORA"):
        monkeypatch.setenv(var, "1" if impl == "native" else "0")
    if impl == "triton":
        if not HAS_TRITON:
            pytest.skip("triton not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def assert_close_relative(got, want, tol, what="values"):
    """got within tol x the largest |want| of want (the float64 reference) at every element."""
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want).abs().max().item()
    assert err <= tol * scale, f"{what}: error {err:.3g} > {tol:g} x {scale:.3g}"
