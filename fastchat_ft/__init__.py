"""fastchat-ft: a performance-first fine-tuning engine for chat (ChatML) datasets.

This module is the public surface: the version and the few names other tools import directly.
"""
from importlib.metadata import PackageNotFoundError, version as _pkg_version

try:
    __version__ = _pkg_version("fastchat-ft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
