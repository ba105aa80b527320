"""Python face of the native tokenizer (csrc/tokenizer.*): HF tokenizer.json in, HF-identical ids out.

When the native loader cannot reproduce a tokenizer.json exactly (an unsupported normalizer, regex, model...),
`Tokenizer.from_file` falls back to HF `tokenizers` with a one-line warning naming the component; the API
is the same either way. Text is str (UTF-8); offsets are byte offsets into the UTF-8 encoding of the text.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from fastchat_ft import _native
from fastchat_ft.errors import TokenizerError

__all__ = ["Tokenizer"]


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerError("tokenizer.json not found", file=str(p),
                             fix="pass a tokenizer.json file or the model folder that contains one")
    return p


class Tokenizer:
    """Encode/decode with a HF tokenizer.json. Use `Tokenizer.from_file(path)`."""

    def __init__(self, native: "_native.Tokenizer | None" = None, hf=None, path: str | None = None):
        if (native is None) == (hf is None):
            raise ValueError("give exactly one of native / hf")
        self.native = native      # the C++ object (the loader's bindings take it), None after a fallback
        self._hf = hf
        self.path = path

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | os.PathLike, *, native_only: bool = False) -> "Tokenizer":
        """Load `path` (a tokenizer.json or a folder with one). `native_only` raises instead of falling back."""
        p = _resolve(path)
        try:
            return cls(native=_native.Tokenizer.from_file(str(p)), path=str(p))
        except _native.TokenizerError as e:
            component, _, reason = str(e).partition(": ")
            if native_only:
                raise TokenizerError(reason or str(e), file=str(p), field=component,
                                     fix="use a supported component or drop native_only to fall back to HF") from None
            warnings.warn(f"fastchat-ft: native tokenizer does not support {component} in {p}; "
                          f"falling back to HF tokenizers (slower)", RuntimeWarning, stacklevel=2)
        except ValueError as e:  # JSON syntax: "<path>:<line>:<column>: reason"
            m = re.match(r".*?:(\d+):(\d+): (.*)", str(e), re.S)
            if m:
                raise TokenizerError(m.group(3), file=str(p), line=int(m.group(1)), column=int(m.group(2)),
                                     fix="the file is not valid JSON; re-save it with save_pretrained") from None
            raise TokenizerError(str(e), file=str(p)) from None
        import tokenizers
        return cls(hf=tokenizers.Tokenizer.from_file(str(p)), path=str(p))

    @property
    def is_native(self) -> bool:
        return self.native is not None

    # ----------------------------------------------------------------------------------- encoding
    def encode_ids(self, text: str, allow_special: bool = False, *, add_special_tokens: bool = False) -> np.ndarray:
        """Token ids as an int32 numpy array (the fast path)."""
        if self.native is not None:
            return self.native.encode(text, allow_special, add_special_tokens)
        return np.asarray(self._hf_encode(text, allow_special, add_special_tokens).ids, dtype=np.int32)

    def encode(self, text: str, allow_special: bool = False, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids. allow_special=False encodes special tokens in `text` as plain text (safe for user
        data); non-special added tokens are always recognised, as in HF. add_special_tokens adds BOS etc."""
        return self.encode_ids(text, allow_special, add_special_tokens=add_special_tokens).tolist()

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False, threads: int | None = None, *,
                     add_special_tokens: bool = False, as_numpy: bool = False) -> list:
        """Encode many texts on `threads` threads (None: all cores), results in input order."""
        if self.native is not None:
            arrays = self.native.encode_batch(list(texts), allow_special, add_special_tokens, threads or 0)
            return arrays if as_numpy else [a.tolist() for a in arrays]
        self._hf.encode_special_tokens = not allow_special
        encs = self._hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encs]
        return [np.asarray(i, dtype=np.int32) for i in ids] if as_numpy else ids

    def encode_with_offsets(self, text: str, allow_special: bool = False, *, add_special_tokens: bool = False,
                            control_spans: Iterable[tuple[int, int]] | None = None):
        """(ids, starts, ends) as numpy arrays; token i covers UTF-8 bytes [starts[i], ends[i]) of `text`.
        control_spans: sorted byte ranges, each exactly one added token's text, matched as that token even
        when allow_special is False (chat templates mark their control tokens this way)."""
        spans = [(int(a), int(b)) for a, b in (control_spans or ())]
        if self.native is not None:
            return self.native.encode_with_offsets(text, allow_special, add_special_tokens, spans)
        return self._hf_encode_with_offsets(text, allow_special, add_special_tokens, spans)

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        if self.native is not None:
            return self.native.decode(np.asarray(ids, dtype=np.int32), skip_special_tokens)
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.native.token_to_id(token) if self.native is not None else self._hf.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.native.id_to_token(int(id)) if self.native is not None else self._hf.id_to_token(int(id))

    def is_special(self, id: int) -> bool:
        if self.native is not None:
            return self.native.is_special(int(id))
        tok = self._hf.get_added_tokens_decoder().get(int(id))
        return bool(tok is not None and tok.special)

    @property
    def vocab_size(self) -> int:
        return self.native.vocab_size if self.native is not None else self._hf.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        kind = "native" if self.native is not None else "HF fallback"
        return f"Tokenizer({self.path!r}, {kind}, vocab_size={self.vocab_size})"

    # --------------------------------------------------------------------------- HF fallback path
    def _hf_encode(self, text: str, allow_special: bool, add_special_tokens: bool):
        self._hf.encode_special_tokens = not allow_special
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def _hf_encode_with_offsets(self, text: str, allow_special: bool, add_special_tokens: bool,
                                spans: list[tuple[int, int]]):
        """HF char offsets -> byte offsets; control spans by encoding the text between them separately
        (close to, but not exactly, the native lstrip/rstrip handling)."""
        raw = text.encode("utf-8")
        ids: list[int] = []
        starts: list[int] = []
        ends: list[int] = []

        def run(segment_bytes: bytes, base: int, special: bool):
            seg = segment_bytes.decode("utf-8")
            char_to_byte = np.zeros(len(seg) + 1, dtype=np.int64)
            acc = 0
            for k, ch in enumerate(seg):
                char_to_byte[k] = acc
                acc += len(ch.encode("utf-8"))
            char_to_byte[len(seg)] = acc
            enc = self._hf_encode(seg, allow_special, special)
            for tid, (a, b) in zip(enc.ids, enc.offsets):
                ids.append(tid)
                starts.append(base + int(char_to_byte[a]))
                ends.append(base + int(char_to_byte[b]))

        prev = 0
        for a, b in spans:
            if a > prev:
                run(raw[prev:a], prev, False)
            tid = self.token_to_id(raw[a:b].decode("utf-8"))
            if tid is None:
                raise ValueError(f"control span [{a}, {b}) is not an added token of this tokenizer")
            ids.append(tid)
            starts.append(a)
            ends.append(b)
            prev = b
        if prev < len(raw) or not spans:
            run(raw[prev:], prev, False)
        if add_special_tokens:  # the post-processor's prefix/suffix around the whole text, found by probing
            plain = self._hf_encode("a", allow_special, False).ids
            full = self._hf_encode("a", allow_special, True).ids
            at = next(k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain)
            pre, post = full[:at], full[at + len(plain):]
            ids[:0], starts[:0], ends[:0] = pre, [0] * len(pre), [0] * len(pre)
            ids += post
            starts += [len(raw)] * len(post)
            ends += [len(raw)] * len(post)
        return (np.asarray(ids, dtype=np.int32), np.asarray(starts, dtype=np.uint32), np.asarray(ends, dtype=np.uint32))
