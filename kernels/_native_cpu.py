"""The native CPU builds of the kernels (csrc/cpu_*.cc, compiled into fastchat_ft._native), for contiguous fp32 CPU
tensors: each kernel module asks for its function here, and each has an environment switch to turn it off."""
import os


def native_cpu(function: str, switch: str):
    """fastchat_ft._native when it exports `function` and the environment variable `switch` is not "0"; else None
    (also for kernels/ imported from a source tree without the built extension)."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        from fastchat_ft import _native
    except ImportError:
        return None
    return _native if hasattr(_native, function) else None
