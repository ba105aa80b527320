"""Datasets and dataset tools: the Python face of the native loader (csrc/json, chat, pack)."""
