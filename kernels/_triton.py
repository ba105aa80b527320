"""Triton plumbing shared by the kernels: an optional import (the CPU path needs no triton), the dispatch
rule (CUDA -> Triton, CPU -> torch reference unless TRITON_INTERPRET=1), and a kernel wrapper that picks
the compiled or the interpreted form by the device of the launch, not by import order."""
from __future__ import annotations

import os
import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: kernels are defined but never launched
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # only the annotations are evaluated at definition time
    HAS_TRITON = False


def interpret_requested() -> bool:
    """TRITON_INTERPRET=1 routes CPU tensors through the Triton kernels (run by the interpreter), for tests."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(tensor) -> bool:
    """Whether a call on `tensor` runs the Triton kernels (True) or the torch reference (False). The kernels
    take fp16/bf16/fp32; float64 (reference checks) always runs the torch reference."""
    import torch

    if not HAS_TRITON or tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and interpret_requested()


def autocast_input(x):
    """Under torch.autocast an activation enters the kernels in the autocast dtype, as it would enter a
    matmul; the kernels' own torch calls then run with autocast off (see no_autocast)."""
    import torch

    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if x.dtype != dtype:
            return x.to(dtype)
    return x


def no_autocast(device):
    """Context for an autograd Function body: its matmuls must keep the dtypes the kernels were given."""
    import torch

    return torch.autocast(device_type=device.type, enabled=False)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class Kernel:
    """A @triton.jit function built on first launch: JITFunction for GPU tensors, InterpretedFunction for
    CPU tensors. triton.jit decides once at decoration from TRITON_INTERPRET, which would make the result
    depend on which module imported the kernels first; deciding per device keeps both paths usable in one
    process. `autotune` (kwargs for triton.autotune) applies to the GPU form only."""

    def __init__(self, fn, autotune: dict | None = None):
        self.fn = fn
        self.autotune = autotune
        self._compiled = None
        self._interpreted = None
        self._untuned = None
        self.__name__ = fn.__name__

    def on(self, device, tuned: bool = True):
        """The launchable kernel for tensors on `device`; tuned=False skips the autotuner (explicit tiles)."""
        if not HAS_TRITON:
            raise RuntimeError("triton is not installed; the Triton kernels cannot run")
        if device.type == "cpu":
            if self._interpreted is None:
                self._interpreted = _Interpreted(self.fn)
            return self._interpreted
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            self._untuned = JITFunction(self.fn)
            self._compiled = self._untuned
            if self.autotune is not None:
                self._compiled = triton.autotune(**self.autotune)(self._untuned)
        return self._compiled if tuned else self._untuned


_INDEX_SHIM: list = []


def _fix_interpreter_scalar_index():
    """Triton's interpreter up to at least 3.6 turns a scalar tensor into a loop bound with int() of its 1-element
    array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"; seen on
    the GPU image's triton 3.6 + numpy 2.5, fixed in later triton). Where NumPy refuses, every interpreter
    launch gets an __index__ that reads the one element instead; its patch scope restores the original after."""
    if _INDEX_SHIM:
        return
    import numpy as np
    import triton.runtime.interpreter as interpreter

    _INDEX_SHIM.append(True)
    try:
        int(np.zeros(1))
        return  # this NumPy still converts 1-element arrays: nothing to fix
    except TypeError:
        pass
    original = interpreter._patch_lang

    def patch_lang(fn):
        scope = original(fn)
        scope.set_attr(tl.core.tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        return scope

    interpreter._patch_lang = patch_lang


class _Interpreted:
    """Interpreter launch that also works when triton was imported without TRITON_INTERPRET=1. Then triton's
    own @jit library functions (tl.sum, tl.max, tl.zeros, ...) are compiled-only JITFunctions and refuse to be
    called from Python; for the duration of the launch they are run through the interpreter instead. Each such
    nested call patches triton.language.core for the interpreter and restores it afterwards: triton's own
    nested-call path never restores, which would leave later real compilations in this process broken."""

    def __init__(self, fn):
        from triton.runtime.interpreter import InterpretedFunction

        _fix_interpreter_scalar_index()
        self._fn = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.interpreter import InterpretedFunction, InterpreterError, _patch_lang
            from triton.runtime.jit import JITFunction

            rewritten: dict = {}

            def call_interpreted(jit_fn, *a, **k):
                fn = rewritten.get(id(jit_fn))  # by id: hashing a JITFunction compiles its cache key
                if fn is None:
                    fn = rewritten[id(jit_fn)] = InterpretedFunction(jit_fn.fn).rewrite()
                scope = _patch_lang(jit_fn.fn)
                try:
                    return fn(*a, **k)
                except InterpreterError:
                    raise
                except Exception as exc:
                    raise InterpreterError(repr(exc)) from exc
                finally:
                    scope.restore()

            original = JITFunction.__call__
            JITFunction.__call__ = call_interpreted
            try:
                return self._fn[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = original

        return launch


def kernel(fn=None, *, autotune: dict | None = None):
    """Decorator form of Kernel: `@kernel` or `@kernel(autotune=dict(configs=..., key=...))`."""
    if fn is None:
        return lambda f: Kernel(f, autotune=autotune)
    return Kernel(fn)
