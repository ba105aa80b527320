"""The GPU bench's chat data: multi-turn conversations with a realistic spread of lengths, built from the bundled
demo's exchanges.

The demo's conversations are one exchange of ~60 tokens each: on a GPU a micro-batch of them is a few hundred
tokens, so every runner only measures kernel-launch overhead and padding costs nothing. Fine-tuning sets people
run on GPUs hold conversations of a few hundred to a few thousand tokens with a long tail, so each conversation
here chains k of the demo's (user, assistant) exchanges under one system prompt, with k drawn from a seeded
log-normal (median MULTI_TURN_MEDIAN exchanges, ~550 tokens with the default model's tokenizer, capped at
MULTI_TURN_MAX, ~2000 tokens). Deterministic for a seed; the model weights are random in GPU mode, so what the
text says does not matter, only its lengths and the assistant share of the tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastchat_ft.atomic import write_text_atomic

MULTI_TURN_MEDIAN = 10
MULTI_TURN_SIGMA = 0.8
MULTI_TURN_MAX = 36
DESCRIPTION = (f"multi-turn conversations chaining k exchanges of the bundled demo, k ~ lognormal(median "
               f"{MULTI_TURN_MEDIAN}, sigma {MULTI_TURN_SIGMA}) clipped to [1, {MULTI_TURN_MAX}]")


def demo_exchanges(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """The demo file's system prompt and its (user, assistant) pairs, in file order."""
    system, pairs = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        if msgs[0]["role"] == "system":
            system = system or msgs[0]["content"]
            msgs = msgs[1:]
        pairs += [(u["content"], a["content"]) for u, a in zip(msgs[::2], msgs[1::2])
                  if u["role"] == "user" and a["role"] == "assistant"]
    if not pairs:
        raise ValueError(f"{path}: no (user, assistant) exchanges to build multi-turn conversations from")
    return system or "", pairs


def multi_turn(source: Path, n: int, seed: int) -> list[dict]:
    import numpy as np

    system, pairs = demo_exchanges(source)
    rng = np.random.default_rng(seed)
    turns = np.clip(np.rint(rng.lognormal(np.log(MULTI_TURN_MEDIAN), MULTI_TURN_SIGMA, n)), 1, MULTI_TURN_MAX)
    out = []
    for k in turns.astype(int).tolist():
        msgs = [{"role": "system", "content": system}] if system else []
        for i in rng.integers(0, len(pairs), k).tolist():
            msgs += [{"role": "user", "content": pairs[i][0]}, {"role": "assistant", "content": pairs[i][1]}]
        out.append({"messages": msgs})
    return out


def write_multi_turn(source: Path, folder: Path, n_train: int, n_val: int, seed: int) -> tuple[Path, Path]:
    """train.jsonl and val.jsonl of multi-turn conversations in `folder` (val from another seed stream)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, stream in (("train", n_train, 0), ("val", n_val, 1)):
        path = folder / f"{name}.jsonl"
        write_text_atomic(path, "".join(json.dumps(c) + "\n" for c in multi_turn(source, n, seed * 1000 + stream)))
        paths.append(path)
    return paths[0], paths[1]
