"""The compiled (GPU) form of every Triton kernel, built ahead of time for sm_90 / sm_80 with triton's bundled
ptxas: no GPU needed. The interpreter tests check the math; this checks that the same source passes the real
compiler (types, layouts, shared memory) and that the GEMM gets Hopper wgmma with pipelined async loads."""
import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastchat_ft.kernels.fused_linear_cross_entropy import _ce_rows_kernel, _scale_cast_kernel  # noqa: E402
from fastchat_ft.kernels.lora_linear import _lora_matmul_kernel  # noqa: E402
from fastchat_ft.kernels.rms_norm import _rms_norm_bwd_kernel, _rms_norm_fwd_kernel  # noqa: E402
from fastchat_ft.kernels.swiglu import BLOCK as SWIGLU_BLOCK  # noqa: E402
from fastchat_ft.kernels.swiglu import _swiglu_bwd_kernel, _swiglu_fwd_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
AMPERE = GPUTarget("cuda", 80, 32)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """A private compile cache: no stale or concurrently written entries from other runs on this machine."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))


def compile_for(kernel, target, signature, constexprs, aligned=(), **options):
    """Compile like a launch would after specialisation: `constexprs` include strides equal to 1 and
    `aligned` names the arguments triton would see as multiples of 16."""
    names = list(signature)
    sig = {n: ("constexpr" if n in constexprs else t) for n, t in signature.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    try:
        compiled = triton.compile(ASTSource(JITFunction(kernel.fn), sig, constexprs, attrs), target=target,
                                  options=options)
    except FileNotFoundError as exc:  # a triton build without its bundled ptxas
        pytest.skip(f"no ptxas: {exc}")
    assert compiled.asm.get("cubin"), f"{kernel.fn.__name__}: no machine code for sm_{target.arch}"
    return compiled


@pytest.mark.parametrize("softcap,z_loss", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_cross_entropy_row_kernel_compiles(softcap, z_loss, dtype):
    signature = {"logits_ptr": f"*{dtype}", "logits_stride": "i64", "labels_ptr": "*i64", "loss_ptr": "*fp32",
                 "correct_ptr": "*i32", "grad_scale_ptr": "*fp32", "n_cols": "i32", "softcap": "fp32",
                 "z_loss": "fp32", "smoothing": "fp32", "HAS_SOFTCAP": "", "HAS_Z_LOSS": "", "HAS_SMOOTHING": "",
                 "WRITE_GRAD": "", "BLOCK_V": ""}
    out = compile_for(_ce_rows_kernel, HOPPER, signature,
                      {"HAS_SOFTCAP": softcap, "HAS_Z_LOSS": z_loss, "HAS_SMOOTHING": softcap, "WRITE_GRAD": True,
                       "BLOCK_V": 8192},
                      aligned=("logits_ptr", "logits_stride", "n_cols"), num_warps=16)
    assert "st.global" in out.asm["ptx"]
    compile_for(_scale_cast_kernel, HOPPER,
                {"src_ptr": "*fp32", "dst_ptr": f"*{dtype}", "scale_ptr": "*fp32", "n": "i64", "BLOCK": ""},
                {"BLOCK": 4096}, num_warps=8)


@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_kernels_compile(gemma):
    common = {"GEMMA": gemma, "BLOCK": 4096}
    compile_for(_rms_norm_fwd_kernel, HOPPER,
                {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "rstd_ptr": "*fp32", "x_stride": "i32",
                 "y_stride": "i32", "n_cols": "i32", "eps": "fp32", "offset": "fp32", "GEMMA": "", "BLOCK": ""},
                common, aligned=("x_ptr", "y_ptr", "x_stride", "y_stride"), num_warps=8)
    compile_for(_rms_norm_bwd_kernel, HOPPER,
                {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
                 "dw_partial_ptr": "*fp32", "dy_stride": "i32", "x_stride": "i32", "dx_stride": "i32",
                 "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32", "offset": "fp32", "GEMMA": "",
                 "WANT_DW": "", "BLOCK": ""},
                dict(common, WANT_DW=True), aligned=("dy_ptr", "x_ptr", "dx_ptr"), num_warps=8)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_swiglu_kernels_compile_to_vector_loads(dtype):
    # n aligned too: tokens x intermediate is a multiple of 16 for every model we know, and launches specialise on it
    aligned = ("gate_ptr", "up_ptr", "out_ptr", "n")
    fwd = compile_for(_swiglu_fwd_kernel, HOPPER, {"gate_ptr": f"*{dtype}", "up_ptr": f"*{dtype}",
                                                   "out_ptr": f"*{dtype}", "n": "i64", "BLOCK": ""},
                      {"BLOCK": SWIGLU_BLOCK}, aligned=aligned, num_warps=4)
    assert "ld.global.v4" in fwd.asm["ptx"]  # 16-byte loads: the kernel is bandwidth-bound
    bwd = compile_for(_swiglu_bwd_kernel, HOPPER,
                      {"dh_ptr": f"*{dtype}", "gate_ptr": f"*{dtype}", "up_ptr": f"*{dtype}",
                       "dgate_ptr": f"*{dtype}", "dup_ptr": f"*{dtype}", "n": "i64", "BLOCK": ""},
                      {"BLOCK": SWIGLU_BLOCK}, aligned=("dh_ptr", "gate_ptr", "up_ptr", "dgate_ptr", "dup_ptr", "n"),
                      num_warps=4)
    assert "ld.global.v4" in bwd.asm["ptx"] and "st.global.v4" in bwd.asm["ptx"]


@pytest.mark.parametrize("target,dtype,has_lora", [(HOPPER, "bf16", True), (AMPERE, "bf16", True),
                                                   (HOPPER, "fp32", False)], ids=["sm90", "sm80", "sm90-fp32"])
def test_lora_gemm_compiles_to_tensor_core_pipeline(target, dtype, has_lora):
    signature = {n: f"*{dtype}" for n in ("a_ptr", "b_ptr", "s_ptr", "l_ptr", "bias_ptr", "c_ptr")}
    signature.update({n: "i32" for n in ("M", "N", "K", "R", "M_BUCKET", "stride_am", "stride_ak", "stride_bk",
                                         "stride_bn", "stride_sm", "stride_sr", "stride_lr", "stride_ln",
                                         "stride_cm", "stride_cn")})
    signature["scale"] = "fp32"
    signature.update({n: "" for n in ("HAS_LORA", "HAS_BIAS", "BLOCK_R", "PRECISION", "BLOCK_M", "BLOCK_N",
                                      "BLOCK_K", "GROUP_M")})
    # forward layout: x row-major (stride_ak = 1), W^T read as [K, N] with stride_bk = 1; fp32 without
    # allow_tf32 asks for exact ("ieee") products
    constexprs = {"HAS_LORA": has_lora, "HAS_BIAS": True, "BLOCK_R": 16,
                  "PRECISION": "tf32" if dtype != "fp32" else "ieee", "BLOCK_M": 128, "BLOCK_N": 128,
                  "BLOCK_K": 64 if dtype != "fp32" else 32, "GROUP_M": 8, "stride_ak": 1, "stride_bk": 1,
                  "stride_cn": 1, "stride_sr": 1, "stride_lr": 1}
    aligned = ("a_ptr", "b_ptr", "s_ptr", "l_ptr", "bias_ptr", "c_ptr", "stride_am", "stride_bn", "stride_sm",
               "stride_ln", "stride_cm", "K", "N")
    out = compile_for(_lora_matmul_kernel, target, signature, constexprs, aligned, num_warps=4, num_stages=4)
    ttgir = out.asm["ttgir"]
    assert "async_copy_global_to_local" in ttgir  # K loop is software-pipelined
    if dtype == "bf16":
        if target.arch == 90:
            assert "warp_group_dot" in ttgir  # Hopper wgmma
        else:
            assert "mma" in out.asm["ptx"]


def test_compiler_still_works_after_interpreted_launches(monkeypatch):
    """Interpreted launches (CPU tests) patch triton.language for the interpreter; every patch must be undone,
    or any later real compilation in the same process (a GPU run after a CPU check) breaks."""
    import torch

    from fastchat_ft.kernels import fused_linear_cross_entropy, rms_norm

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 40, requires_grad=True)
    rms_norm(x, torch.ones(40), 1e-6).sum().backward()  # tl.sum inside: a nested library jit call
    fused_linear_cross_entropy(x, torch.randn(50, 40), torch.tensor([1, -100, 7]), block_size=16).backward()
    monkeypatch.delenv("TRITON_INTERPRET")
    test_rms_norm_kernels_compile(gemma=False)
    test_cross_entropy_row_kernel_compiles(softcap=True, z_loss=True, dtype="bf16")
