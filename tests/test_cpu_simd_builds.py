"""The native CPU kernels (csrc/cpu_*.cc) are built three times (AVX-512, AVX2+FMA, baseline) and the CPU picks
one at run time, so a machine runs only its own in the other tests. FASTCHAT_FT_CPU_SIMD caps the choice: here the
native kernels' parity tests run again, in a fresh process, on the AVX2 and the baseline builds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NATIVE_TESTS = ["tests/test_kernels_lora.py", "tests/test_cpu_attention.py", "tests/test_kernels_swiglu.py",
                "tests/test_kernels_rms_norm.py"]


def _level(env) -> int:
    out = subprocess.run([sys.executable, "-c", "from fastchat_ft import _native; print(_native.cpu_simd_level())"],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.parametrize("build,level", [("avx2", 1), ("baseline", 0)])
def test_native_kernels_match_their_references_in_the_other_simd_builds(build, level):
    env = {**os.environ, "FASTCHAT_FT_CPU_SIMD": build}
    got = _level(env)
    if got != level and not (build == "avx2" and got == 0):  # a CPU without AVX2 runs the baseline for both
        pytest.fail(f"FASTCHAT_FT_CPU_SIMD={build} gave level {got}")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NATIVE_TESTS,
                          "-k", "native or group or cpu_attention"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_an_unknown_simd_setting_is_an_error_naming_the_choices():
    """A typo must not silently run (and test) another build than asked; the case of the name does not matter."""
    env = {**os.environ, "FASTCHAT_FT_CPU_SIMD": "AVX2"}
    assert _level(env) in (0, 1)
    code = ("import torch\nfrom fastchat_ft.kernels import swiglu\n"
            "try:\n    swiglu(torch.randn(4, 32), torch.randn(4, 32))\nexcept ValueError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTCHAT_FT_CPU_SIMD": "avx-512"},
                         capture_output=True, text=True, check=True)
    assert "FASTCHAT_FT_CPU_SIMD=avx-512" in run.stdout and "avx512, avx2 or baseline" in run.stdout
