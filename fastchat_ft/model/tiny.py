"""A tiny random Llama saved as a HF folder, built from a config (no download): for tests and for trying
the pipeline end to end in seconds. Its weights are random; only the shapes and the tokenizer are real.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, tie: bool = True, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=tie, rms_norm_eps=1e-5, **extra)


def build_tiny_model(folder: Path, tokenizer_dir: Path, seed: int = 0, **config_kw) -> Path:
    """Write a random tiny Llama sized to the tokenizer in tokenizer_dir, plus that tokenizer, to folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("eos_token_id", tok.eos_token), ("bos_token_id", tok.bos_token))
           if v is not None}
    model = LlamaForCausalLM(tiny_llama_config(len(tok), **ids, **config_kw))
    with torch.no_grad():  # larger-than-default init so the random model's logits are not all flat
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, folder / name)
    return folder


def random_conversation(rng, length: int, vocab: int, prompt_share: float = 0.5) -> tuple:
    """Random token ids whose first part is prompt (label -100) and the rest answer (label = token)."""
    import numpy as np

    ids = rng.integers(3, vocab, length)
    labels = ids.copy()
    labels[: max(1, int(length * prompt_share))] = -100
    return ids.astype(np.int64), labels.astype(np.int64)


def pack_conversations(convs: list[tuple]) -> dict:
    """One packed row in the loader's layout: concatenated ids/labels, position ids restarting per conversation."""
    import numpy as np

    return {"input_ids": np.concatenate([c[0] for c in convs]), "labels": np.concatenate([c[1] for c in convs]),
            "position_ids": np.concatenate([np.arange(len(c[0])) for c in convs]),
            "seq_lens": np.array([len(c[0]) for c in convs])}


def random_packed_rows(n_rows: int, vocab: int, seed: int = 0, max_convs: int = 3, min_len: int = 5,
                       max_len: int = 40) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [pack_conversations([random_conversation(rng, int(rng.integers(min_len, max_len)), vocab)
                                for _ in range(int(rng.integers(1, max_convs + 1)))]) for _ in range(n_rows)]
