"""Datasets and dataset tools: the Python face of the native loader (csrc/json, chat, pack).

encode_chat: one conversation -> (input_ids, labels). ChatDataset: files -> packed training examples.
The torch collate lives in fastchat_ft.data.collate (imported on demand: this package never imports torch).
"""
from fastchat_ft.data.dataset import ChatDataset, ShardView
from fastchat_ft.data.encode import BUILTIN_TEMPLATES, ChatOptions, LoaderStats, encode_chat

__all__ = ["ChatDataset", "ShardView", "ChatOptions", "LoaderStats", "encode_chat", "BUILTIN_TEMPLATES"]
