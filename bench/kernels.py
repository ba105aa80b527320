"""Kernel benchmark (GPU): forward+backward time and peak memory of fastchat_ft.kernels against torch eager,
torch.compile, torch's chunked F.linear_cross_entropy, Liger Kernel and Cut Cross-Entropy (when installed).

  fused linear + CE at Llama-3-8B (H=4096, V=128256), Qwen2.5-7B (H=3584, V=152064), Llama-2-7B (H=4096,
  V=32000) heads, 2k-16k tokens, beside the GEMM lower bound 3 x 2NHV FLOPs at the bf16 matmul rate measured
  in the same run; RMSNorm against the copy bandwidth measured in the same run; LoRA r=16 against the base
  matmul; SwiGLU against eager, torch.compile and Liger (time, bandwidth, memory kept for backward). Writes bench/results/kernels-<device>.json.

  .venv/bin/python bench/kernels.py                 # everything (a few minutes on an H100)
  .venv/bin/python bench/kernels.py --quick         # one size per model, no torch.compile
  .venv/bin/python bench/kernels.py --dry-run       # CPU, toy sizes: checks this script, measures nothing
On a machine without a GPU it says so, runs a tiny CPU sanity check of the references and exits 0.
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastchat_ft.kernels import (fused_linear_cross_entropy, fused_linear_cross_entropy_reference,  # noqa: E402
                                 lora_linear, lora_linear_reference, rms_norm, rms_norm_reference, swiglu,
                                 swiglu_reference)

HEADS = {"llama3-8b": (4096, 128256), "qwen2.5-7b": (3584, 152064), "llama2-7b": (4096, 32000)}
TOKENS = [2048, 4096, 8192, 16384]
COMPILE_TOKENS = {8192}  # torch.compile recompiles per shape (~1 min each): time it at one size per head
LORA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out): attention proj, MLP up, MLP down
RMS_SHAPES = [(16384, 4096), (16384, 8192)]
SWIGLU_SHAPES = [(16384, 14336), (16384, 8192)]  # tokens x intermediate: Llama-3-8B, Llama-3.2-1B


# ----------------------------------------------------------------------------------------------- timing

# The device and dtype of every benchmark tensor: CUDA bf16, or CPU fp32 for --dry-run (a check of this script
# at toy sizes, not a measurement).
DEV, DTYPE = "cuda", torch.bfloat16


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _free():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def measure(step, warmup=2, iters=7):
    """Median ms of step() over iters (CUDA events) and the peak memory it adds (MB) above what was live."""
    for _ in range(warmup):
        step()
    _sync()
    times = []
    for _ in range(iters):
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    if DEV != "cuda":
        return statistics.median(times), 0.0
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def safe_measure(step, **kw):
    try:
        ms, mb = measure(step, **kw)
        return {"ms": round(ms, 3), "peak_mb": round(mb, 1)}
    except torch.cuda.OutOfMemoryError:
        _free()
        return {"error": "OOM"}
    except Exception as exc:  # a baseline that cannot run this case is reported, not fatal
        _free()
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}


def matmul_tflops(n, dtype):
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    ms, _ = measure(lambda: a @ b, warmup=3, iters=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(nbytes):
    src = torch.empty(nbytes // 2, device=DEV, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms, _ = measure(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------- fused CE

def flce_impls(use_compile):
    impls = {"ours": lambda h, w, y: fused_linear_cross_entropy(h, w, y)}

    def eager(h, w, y):  # what HF does: bf16 logits, upcast to fp32, cross_entropy
        return F.cross_entropy((h @ w.t()).float(), y)

    impls["torch_eager"] = eager
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        impls["torch_chunked"] = lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)
    if use_compile:
        impls["torch_compile"] = torch.compile(eager, dynamic=False)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        impls["liger"] = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        impls["cce"] = lambda h, w, y: linear_cross_entropy(h, w, y)
    except ImportError:
        pass
    return impls


def bench_flce(tflops, tokens, use_compile, masked_frac=0.0, models=None):
    rows = []
    impls = flce_impls(use_compile)
    for model in models or HEADS:
        hidden, vocab = HEADS[model]
        for n in tokens:
            torch.manual_seed(0)
            h = (torch.randn(n, hidden, device=DEV) * 0.5).to(DTYPE).requires_grad_()
            w = (torch.randn(vocab, hidden, device=DEV) * hidden ** -0.5).to(DTYPE).requires_grad_()
            y = torch.randint(0, vocab, (n,), device=DEV)
            if masked_frac:
                y[torch.rand(n, device=DEV) < masked_frac] = -100
            bound_ms = 3 * 2 * n * hidden * vocab / (tflops * 1e12) * 1e3
            row = {"model": model, "tokens": n, "hidden": hidden, "vocab": vocab, "masked": masked_frac,
                   "gemm_bound_ms": round(bound_ms, 3), "impls": {}}
            ref_loss = None
            for name, fn in impls.items():
                if name == "torch_compile" and n not in COMPILE_TOKENS:
                    continue

                def step(fn=fn):
                    loss = fn(h, w, y)
                    torch.autograd.grad(loss, (h, w))
                    return loss
                result = safe_measure(step)
                if "ms" in result:
                    with torch.no_grad():
                        loss = float(fn(h, w, y))
                    ref_loss = loss if ref_loss is None else ref_loss
                    result["loss"] = round(loss, 5)
                    result["x_bound"] = round(result["ms"] / bound_ms, 2)
                row["impls"][name] = result
            del h, w, y
            _free()
            print_flce_row(row)
            rows.append(row)
    return rows


def print_flce_row(row):
    head = (f"\n{row['model']}  N={row['tokens']}  H={row['hidden']}  V={row['vocab']}"
            f"{'  masked=' + str(row['masked']) if row['masked'] else ''}  GEMM bound {row['gemm_bound_ms']:.2f} ms")
    print(head)
    ours = row["impls"].get("ours", {})
    for name, r in row["impls"].items():
        if "ms" not in r:
            print(f"  {name:14s} {r['error']}")
            continue
        vs = f"  ours/this {ours['ms'] / r['ms']:.2f}x" if "ms" in ours and name != "ours" else ""
        print(f"  {name:14s} {r['ms']:9.2f} ms  {r['x_bound']:5.2f}x bound  peak {r['peak_mb']:9.1f} MB"
              f"  loss {r['loss']:.4f}{vs}")


# ----------------------------------------------------------------------------------------------- RMSNorm

def bench_rms_norm(bandwidth, use_compile):
    rows = []

    def hf_llama(x, w, eps=1e-6):  # HF LlamaRMSNorm.forward in plain torch ops
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    impls = {"ours": lambda x, w: rms_norm(x, w, 1e-6), "hf_eager": hf_llama}
    if use_compile:
        impls["torch_compile"] = torch.compile(hf_llama, dynamic=False)
    for n, hidden in RMS_SHAPES:
        x = torch.randn(n, hidden, device=DEV).to(DTYPE).requires_grad_()
        w = (torch.randn(hidden, device=DEV) * 0.1 + 1).to(DTYPE).requires_grad_()
        dy = torch.randn(n, hidden, device=DEV).to(DTYPE)
        row = {"rows": n, "hidden": hidden, "impls": {}}
        elt = torch.finfo(DTYPE).bits // 8
        fwd_bytes = 2 * n * hidden * elt
        full_bytes = 5 * n * hidden * elt  # fwd: read x, write y; bwd: read dy, x, write dx
        for name, fn in impls.items():
            fwd = safe_measure(lambda fn=fn: fn(x, w))
            full = safe_measure(lambda fn=fn: torch.autograd.grad(fn(x, w), (x, w), dy))
            for r, nbytes in ((fwd, fwd_bytes), (full, full_bytes)):
                if "ms" in r:
                    r["gbs"] = round(nbytes / (r["ms"] * 1e-3) / 1e9, 1)
                    r["of_copy_bw"] = round(r["gbs"] / bandwidth, 3)
            row["impls"][name] = {"fwd": fwd, "fwd_bwd": full}
        print(f"\nRMSNorm {n}x{hidden} {DTYPE} (copy bandwidth {bandwidth:.0f} GB/s)")
        for name, r in row["impls"].items():
            cells = []
            for phase in ("fwd", "fwd_bwd"):
                p = r[phase]
                cells.append(f"{phase} {p['ms']:.3f} ms {p['gbs']:.0f} GB/s ({100 * p['of_copy_bw']:.0f}%)"
                             if "ms" in p else f"{phase} {p['error']}")
            print(f"  {name:14s} " + "   ".join(cells))
        rows.append(row)
        del x, w, dy
    return rows


# ----------------------------------------------------------------------------------------------- SwiGLU

def kept_mb(fn, *inputs):
    """MB a forward leaves allocated for backward (its output and what autograd saved), inputs excluded."""
    if DEV != "cuda":
        return 0.0
    _sync()
    before = torch.cuda.memory_allocated()
    out = fn(*inputs)
    _sync()
    kept = (torch.cuda.memory_allocated() - before) / 2**20
    del out
    return round(kept, 1)


def bench_swiglu(bandwidth, use_compile):
    impls = {"ours": swiglu, "hf_eager": swiglu_reference}
    if use_compile:
        impls["torch_compile"] = torch.compile(swiglu_reference, dynamic=False)
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        impls["liger"] = LigerSiLUMulFunction.apply
    except ImportError:
        pass
    rows = []
    for n, inter in SWIGLU_SHAPES:
        gate = torch.randn(n, inter, device=DEV).to(DTYPE).requires_grad_()
        up = torch.randn(n, inter, device=DEV).to(DTYPE).requires_grad_()
        dh = torch.randn(n, inter, device=DEV).to(DTYPE)
        elt = torch.finfo(DTYPE).bits // 8
        moved = {"fwd": 3 * n * inter * elt, "fwd_bwd": 8 * n * inter * elt}  # fwd r2 w1; bwd r3 w2
        row = {"tokens": n, "intermediate": inter, "impls": {}}
        for name, fn in impls.items():
            r = {"fwd": safe_measure(lambda fn=fn: fn(gate, up)),
                 "fwd_bwd": safe_measure(lambda fn=fn: torch.autograd.grad(fn(gate, up), (gate, up), dh))}
            for phase, p in r.items():
                if "ms" in p:
                    p["gbs"] = round(moved[phase] / (p["ms"] * 1e-3) / 1e9, 1)
                    p["of_copy_bw"] = round(p["gbs"] / bandwidth, 3)
            try:
                r["kept_for_backward_mb"] = kept_mb(fn, gate, up)
            except Exception as exc:  # reported, not fatal
                r["kept_for_backward_mb"] = f"{type(exc).__name__}"
            row["impls"][name] = r
        print(f"\nSwiGLU {n}x{inter} {DTYPE} (copy bandwidth {bandwidth:.0f} GB/s)")
        for name, r in row["impls"].items():
            cells = [f"{phase} {r[phase]['ms']:.3f} ms ({100 * r[phase]['of_copy_bw']:.0f}% bw)" if "ms" in r[phase]
                     else f"{phase} {r[phase]['error']}" for phase in ("fwd", "fwd_bwd")]
            print(f"  {name:14s} " + "   ".join(cells) + f"   kept {r['kept_for_backward_mb']} MB")
        rows.append(row)
        del gate, up, dh
        _free()
    return rows


# ----------------------------------------------------------------------------------------------- LoRA

def bench_lora(tokens=8192, rank=16):
    rows = []
    for fan_in, fan_out in LORA_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(tokens, fan_in, device=DEV).to(DTYPE).requires_grad_()
        w = (torch.randn(fan_out, fan_in, device=DEV) * fan_in ** -0.5).to(DTYPE)
        a = (torch.randn(rank, fan_in, device=DEV) * 0.01).to(DTYPE).requires_grad_()
        b = (torch.randn(fan_out, rank, device=DEV) * 0.01).to(DTYPE).requires_grad_()
        dy = torch.randn(tokens, fan_out, device=DEV).to(DTYPE)
        cases = {
            "base_matmul": (lambda: F.linear(x, w), (x,)),
            "ours_fused": (lambda: lora_linear(x, w, a, b, 2.0), (x, a, b)),  # with FASTCHAT_LORA_GEMM=triton
            "ours_cublas": (lambda: lora_linear(x, w, a, b, 2.0), (x, a, b)),  # with FASTCHAT_LORA_GEMM=cublas
            "torch_unfused": (lambda: lora_linear_reference(x, w, a, b, 2.0), (x, a, b)),
        }
        row = {"tokens": tokens, "in": fan_in, "out": fan_out, "rank": rank, "impls": {}}
        for name, (fwd, wrt) in cases.items():
            if name.startswith("ours_"):
                os.environ["FASTCHAT_LORA_GEMM"] = "cublas" if name == "ours_cublas" else "triton"
            try:
                row["impls"][name] = {
                    "fwd": safe_measure(fwd),
                    "fwd_bwd": safe_measure(lambda fwd=fwd, wrt=wrt: torch.autograd.grad(fwd(), wrt, dy)),
                }
            finally:
                os.environ.pop("FASTCHAT_LORA_GEMM", None)
        base = row["impls"]["base_matmul"]
        print(f"\nLoRA r={rank} M={tokens} {fan_in}->{fan_out} {DTYPE}")
        for name, r in row["impls"].items():
            cells = []
            for phase in ("fwd", "fwd_bwd"):
                p = r[phase]
                if "ms" not in p:
                    cells.append(f"{phase} {p['error']}")
                    continue
                over = f" (+{100 * (p['ms'] / base[phase]['ms'] - 1):.1f}% vs base)" if "ms" in base[phase] else ""
                p["vs_base"] = round(p["ms"] / base[phase]["ms"], 3) if "ms" in base[phase] else None
                cells.append(f"{phase} {p['ms']:.3f} ms{over}")
            print(f"  {name:14s} " + "   ".join(cells))
        rows.append(row)
        del x, w, a, b, dy
        _free()
    return rows


# ----------------------------------------------------------------------------------------------- main

def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "liger_kernel", "cut_cross_entropy", "transformers"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except ImportError:
            out[name] = None
    return out


def cpu_sanity():
    print("bench/kernels.py needs a CUDA GPU for timings; none found. Running a tiny CPU sanity check instead.")
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    y = torch.randint(0, 100, (64,))
    y[::3] = -100
    ours = fused_linear_cross_entropy_reference(h, w, y, chunk_size=16)
    eager = F.cross_entropy(h @ w.t(), y)
    x = torch.randn(8, 48)
    g = torch.randn(48)
    want_norm = g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    norm_err = (rms_norm_reference(x, g, 1e-6) - want_norm).abs().max()
    a, b = torch.randn(4, 48), torch.randn(24, 4)
    wl = torch.randn(24, 48)
    lora_err = (lora_linear_reference(x, wl, a, b, 0.5) - (x @ wl.t() + 0.5 * x @ a.t() @ b.t())).abs().max()
    print(f"  fused CE reference {ours.item():.6f} vs eager {eager.item():.6f}; "
          f"RMSNorm max err {norm_err:.2e}; LoRA max err {lora_err:.2e}")
    ok = abs(ours.item() - eager.item()) < 1e-4 and norm_err < 1e-5 and lora_err < 1e-4
    print("  sanity", "ok" if ok else "FAILED")
    return 0 if ok else 1


def write_json(payload, device):
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = out_dir / f"kernels-{slug}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)  # atomic: a crashed run never leaves half a results file
    return path


def dry_run_sizes():
    """--dry-run: every code path of this script on CPU at toy sizes (numbers meaningless, not written)."""
    global DEV, DTYPE, TOKENS, COMPILE_TOKENS, LORA_SHAPES, RMS_SHAPES, SWIGLU_SHAPES
    DEV, DTYPE = "cpu", torch.float32
    for model, (hidden, vocab) in list(HEADS.items()):
        HEADS[model] = (hidden // 64, vocab // 256)
    TOKENS, COMPILE_TOKENS = [64, 128], set()
    LORA_SHAPES, RMS_SHAPES, SWIGLU_SHAPES = [(64, 96)], [(128, 64)], [(128, 96)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one token count (8192), no torch.compile")
    parser.add_argument("--tokens", type=int, nargs="*", help=f"token counts (default {TOKENS})")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--only", choices=["flce", "rms_norm", "lora", "swiglu"], nargs="*", help="run only these parts")
    parser.add_argument("--dry-run", action="store_true", help="exercise this script on CPU at toy sizes")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run_sizes()
    elif not torch.cuda.is_available():
        return cpu_sanity()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu-dry-run"
    tokens = args.tokens or ([8192] if args.quick else TOKENS)
    use_compile = not (args.quick or args.no_compile or args.dry_run)
    parts = set(args.only or ["flce", "rms_norm", "lora", "swiglu"])
    tflops = matmul_tflops(8192 if DEV == "cuda" else 256, DTYPE)
    bandwidth = copy_bandwidth_gbs(2 << 30 if DEV == "cuda" else 8 << 20)
    print(f"device {device}; {DTYPE} matmul {tflops:.1f} TFLOPS; copy bandwidth {bandwidth:.0f} GB/s")
    print("versions", versions())
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = {"device": device, "date": now, "versions": versions(), "matmul_tflops": round(tflops, 1),
               "copy_bandwidth_gbs": round(bandwidth, 1),
               "command": " ".join(["bench/kernels.py"] + (argv if argv is not None else sys.argv[1:]))}
    # each part's results are written as soon as it ends ("complete" false until the last), so a run cut short
    # by a GPU lease's time limit still leaves what it measured
    def save(complete=False):
        payload["complete"] = complete
        if args.dry_run:
            json.dumps(payload)  # the payload must serialise; a dry run writes nothing
            return None
        return write_json(payload, device)

    if "flce" in parts:
        payload["fused_linear_cross_entropy"] = bench_flce(tflops, tokens, use_compile)
        save()
        # SFT batches: half the tokens are prompt (ignored); ours skips those rows entirely
        payload["fused_linear_cross_entropy_masked"] = bench_flce(tflops, [max(tokens)], False, masked_frac=0.5,
                                                                 models=["llama3-8b"])
        save()
    if "lora" in parts:
        payload["lora"] = bench_lora(tokens=8192 if DEV == "cuda" else 128)
        save()
    if "swiglu" in parts:
        payload["swiglu"] = bench_swiglu(bandwidth, use_compile)
        save()
    if "rms_norm" in parts:
        payload["rms_norm"] = bench_rms_norm(bandwidth, use_compile)
    path = save(complete=True)
    if args.dry_run:
        print("\ndry run ok (nothing written)")
        return 0
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
