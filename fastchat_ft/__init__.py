"""fastchat-ft: a performance-first fine-tuning engine for chat (ChatML) datasets.

This module is the public surface: the version and the few names other tools import directly.
"""
from importlib.metadata import PackageNotFoundError, version as _pkg_version

try:
    __version__ = _pkg_version("fastchat-ft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__", "patch", "unpatch"]


def __getattr__(name):
    # Lazy: `import fastchat_ft` stays cheap (no torch); patch/unpatch load fastchat_ft.model.patch on first use.
    if name in ("patch", "unpatch"):
        from fastchat_ft.model import patch as _patch_module

        return getattr(_patch_module, name)
    raise AttributeError(f"module 'fastchat_ft' has no attribute {name!r}")
