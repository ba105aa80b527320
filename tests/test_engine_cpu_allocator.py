"""fastchat_ft.engine.cpu_allocator: applied on glibc, off with FASTCHAT_FT_MALLOC_TUNING=0, and training on CPU
applies it. Each check runs in a fresh interpreter: mallopt settings and the module's once-flag are per process."""
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _run(code: str, **env) -> str:
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return res.stdout.strip()


@glibc
def test_applied_on_glibc_and_idempotent():
    out = _run("from fastchat_ft.engine.cpu_allocator import tune_cpu_allocator as t; print(t(), t())",
               FASTCHAT_FT_MALLOC_TUNING="1")
    assert out == "True True"


def test_disabled_by_env():
    out = _run("from fastchat_ft.engine.cpu_allocator import tune_cpu_allocator as t; print(t())",
               FASTCHAT_FT_MALLOC_TUNING="0")
    assert out == "False"


@glibc
def test_large_blocks_are_reused_not_remapped():
    # with the tuning a freed 8 MB block comes back at the same address (heap reuse); glibc's default serves
    # each one with a fresh mmap, so at least one of a few alloc/free pairs lands elsewhere
    code = ("import ctypes, sys\n"
            "from fastchat_ft.engine.cpu_allocator import tune_cpu_allocator\n"
            "if sys.argv[1] == '1': assert tune_cpu_allocator()\n"
            "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "keep = libc.malloc(64)\n"
            "addrs = set()\n"
            "for size in (8 << 20, 9 << 20, 8 << 20, 10 << 20):\n"
            "    p = libc.malloc(size); addrs.add(p); libc.free(p)\n"
            "    q = libc.malloc(1 << 20); addrs.add(('small', q)); libc.free(q)\n"
            "big = [a for a in addrs if not isinstance(a, tuple)]\n"
            "print(len(big))\n")
    tuned = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, check=True).stdout
    assert int(tuned) == 1
