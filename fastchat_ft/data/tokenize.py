"""The tokenizer as the loader sees it: the native C++ tokenizer when it loads, else HF `tokenizers`.

Accepts what users hold (a path, `fastchat_ft.tokenizer.Tokenizer`, `tokenizers.Tokenizer`, a transformers
tokenizer) and gives the loader one thing: rendered text + control spans -> ids with byte offsets. The HF
path encodes the text between template control tokens piece by piece, which is what HF does internally
(added tokens split the text first), so special-token strings inside content stay plain text.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastchat_ft import _native
from fastchat_ft.errors import TokenizerError


@dataclass
class LoaderTokenizer:
    native: object | None = None          # _native.Tokenizer (shared_ptr held by pybind)
    hf: object | None = None              # tokenizers.Tokenizer
    path: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    fingerprint: str = ""                 # identifies the vocabulary for the cache key
    _pieces: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_any(cls, tok) -> "LoaderTokenizer":
        if isinstance(tok, LoaderTokenizer):
            return tok
        if isinstance(tok, (str, os.PathLike)):
            return cls._from_path(Path(tok))
        if hasattr(tok, "native") and hasattr(tok, "_hf"):  # fastchat_ft.tokenizer.Tokenizer
            out = cls(native=tok.native, hf=tok._hf, path=getattr(tok, "path", None))
            if out.path:
                out._read_config(Path(out.path).parent)
            if out.native is None and out.hf is None:
                raise TokenizerError("the tokenizer object holds neither a native nor an HF tokenizer")
            out._set_fingerprint()
            return out
        native_type = getattr(_native, "Tokenizer", None)
        if native_type is not None and isinstance(tok, native_type):
            out = cls(native=tok)
            out._set_fingerprint()
            return out
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # transformers PreTrainedTokenizerFast
            out = cls(hf=backend, path=getattr(tok, "name_or_path", None), bos_token=tok.bos_token,
                      eos_token=tok.eos_token, chat_template=getattr(tok, "chat_template", None))
            out._set_fingerprint()
            return out
        if type(tok).__module__.startswith("tokenizers"):
            out = cls(hf=tok)
            out._set_fingerprint()
            return out
        raise TokenizerError(f"cannot use a {type(tok).__name__} as a tokenizer",
                             fix="pass a tokenizer.json path, a model folder, fastchat_ft.tokenizer.Tokenizer, "
                                 "tokenizers.Tokenizer or a transformers fast tokenizer")

    @classmethod
    def _from_path(cls, p: Path) -> "LoaderTokenizer":
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise TokenizerError("tokenizer.json not found", file=str(file),
                                 fix="pass a tokenizer.json file or the model folder that contains one")
        # Loading (and fingerprinting) costs milliseconds: reuse it for repeated encode_chat calls on a path.
        stat = file.stat()
        key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _LOADED:
            if len(_LOADED) > 8:
                _LOADED.clear()
            _LOADED[key] = cls._load_path(file)
        return _LOADED[key]

    @classmethod
    def _load_path(cls, file: Path) -> "LoaderTokenizer":
        out = cls(path=str(file))
        try:
            out.native = _native.Tokenizer.from_file(str(file))
        except (AttributeError, ValueError) as e:  # not built yet, or a component the native tokenizer lacks
            import tokenizers
            try:
                out.hf = tokenizers.Tokenizer.from_file(str(file))
            except Exception as hf_error:  # tokenizers raises a bare Exception: not a tokenizer.json at all
                # The native loader's message says more (a JSON error's line:column, the missing component).
                if isinstance(e, ValueError):
                    m = re.match(r".*?:(\d+):(\d+): (.*)", str(e), re.S)
                    reason = m.group(3) if m else e
                else:  # AttributeError (the native module is not built): the tokenizers library's reason
                    m, reason = None, hf_error
                raise TokenizerError(f"cannot load this tokenizer.json: {reason}",
                                     file=str(file), line=int(m.group(1)) if m else None,
                                     column=int(m.group(2)) if m else None,
                                     fix="pass a model folder (or its tokenizer.json) saved with save_pretrained; "
                                         "a truncated file needs copying again") from None
        out._read_config(file.parent)
        out._set_fingerprint()
        return out

    def _read_config(self, folder: Path) -> None:
        cfg_path = folder / "tokenizer_config.json"
        cfg = {}
        if cfg_path.is_file():
            with open(cfg_path, encoding="utf-8") as f:
                try:
                    cfg = json.load(f)
                except ValueError as e:
                    raise TokenizerError(f"not valid JSON: {e}", file=str(cfg_path),
                                         fix="copy the model folder's tokenizer_config.json again") from None

        def token_text(v):
            return v.get("content") if isinstance(v, dict) else v

        self.bos_token = self.bos_token or token_text(cfg.get("bos_token"))
        self.eos_token = self.eos_token or token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = self.chat_template or template

    def _set_fingerprint(self) -> None:
        import hashlib
        h = hashlib.blake2b(digest_size=16)
        if self.path and os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        elif self.hf is not None:
            h.update(self.hf.to_str().encode())
        else:
            h.update(repr(self.native).encode())
        h.update(f"{self.bos_token}|{self.eos_token}|{self.chat_template}".encode())
        self.fingerprint = h.hexdigest()

    # ------------------------------------------------------------------------------------ queries
    @property
    def is_native(self) -> bool:
        return self.native is not None

    def token_to_id(self, token: str) -> int | None:
        if self.native is not None:
            i = self.native.token_to_id(token)
            return None if i is None or i < 0 else int(i)
        return self.hf.token_to_id(token)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if self.native is not None:
            return self.native.decode(np.asarray(ids, dtype=np.int32), skip_special_tokens)
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token covers (token strings as stored, e.g. byte-level 'Ġ'
        counted as 2 bytes, overestimate, which keeps the bound safe)."""
        if "max_bytes" not in self._pieces:
            if self.hf is not None:
                longest = max(len(t.encode("utf-8")) for t in self.hf.get_vocab(with_added_tokens=True))
            else:
                n = self.native.vocab_size
                n = n() if callable(n) else n
                longest = max(len(self.native.id_to_token(i).encode("utf-8")) for i in range(n))
            self._pieces["max_bytes"] = longest + 8  # slack for normalizer-added prefixes
        return self._pieces["max_bytes"]

    # ----------------------------------------------------------------------------- HF encode path
    def _added(self) -> dict:
        if "added" not in self._pieces:
            self._pieces["added"] = {t.content: (i, t) for i, t in self.hf.get_added_tokens_decoder().items()}
        return self._pieces["added"]

    def _plain(self, first: bool):
        """HF tokenizers that encode special tokens as text; the `rest` one never prepends a Metaspace
        prefix, because HF only prepends it to the piece at offset 0 of the whole text."""
        key = "first" if first else "rest"
        if key not in self._pieces:
            import tokenizers
            spec = json.loads(self.hf.to_str())
            if not first:
                _never_prepend(spec.get("pre_tokenizer"))
            t = tokenizers.Tokenizer.from_str(json.dumps(spec))
            t.encode_special_tokens = True
            self._pieces[key] = t
        return self._pieces[key]

    def encode_rendered_hf(self, texts: list[str], controls: list[np.ndarray], allow_special: bool):
        """[(ids, starts, ends)] with UTF-8 byte offsets, for rendered texts and their control byte spans."""
        if allow_special:  # HF's own behaviour: the whole text in one go, specials recognised anywhere
            self.hf.encode_special_tokens = False
            encs = self.hf.encode_batch(texts, add_special_tokens=False)
            out = []
            for text, enc in zip(texts, encs):
                offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                to_bytes = _char_to_byte(text)
                out.append((np.asarray(enc.ids, dtype=np.int32), to_bytes(offs[:, 0]), to_bytes(offs[:, 1])))
            return out
        added = self._added()
        firsts, rests, plan = [], [], []
        for text, ctrl in zip(texts, controls):
            raw = text.encode("utf-8")
            byte_to_char = _byte_to_char(text, raw)
            pieces = []  # (kind, payload): ("ctrl", (id, b0, b1)) or ("text", (group, index, byte_start))
            prev = 0
            for b0, b1 in ctrl:
                b0, b1 = int(b0), int(b1)
                hit = added.get(raw[b0:b1].decode("utf-8"))
                if hit is None:
                    continue  # not a token of this tokenizer: stays text, as in HF
                tid, tok = hit
                # HF folds whitespace next to an lstrip/rstrip token into the token's match.
                if tok.lstrip:
                    while b0 > prev and raw[b0 - 1:b0].isspace():
                        b0 -= 1
                if tok.rstrip:
                    while b1 < len(raw) and raw[b1:b1 + 1].isspace():
                        b1 += 1
                if b0 > prev:
                    self._queue(text, byte_to_char, prev, b0, firsts, rests, pieces)
                pieces.append(("ctrl", (tid, b0, b1)))
                prev = b1
            if prev < len(raw):
                self._queue(text, byte_to_char, prev, len(raw), firsts, rests, pieces)
            plan.append((text, pieces))
        enc_first = self._plain(True).encode_batch([p[0] for p in firsts], add_special_tokens=False) if firsts else []
        enc_rest = self._plain(False).encode_batch([p[0] for p in rests], add_special_tokens=False) if rests else []
        out = []
        for text, pieces in plan:
            ids, starts, ends = [], [], []
            for kind, payload in pieces:
                if kind == "ctrl":
                    tid, b0, b1 = payload
                    ids.append(np.array([tid], np.int32))
                    starts.append(np.array([b0], np.int64))
                    ends.append(np.array([b1], np.int64))
                    continue
                group, index, b_start = payload
                piece_text = (firsts if group == 0 else rests)[index][0]
                enc = (enc_first if group == 0 else enc_rest)[index]
                offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                to_bytes = _char_to_byte(piece_text)
                ids.append(np.asarray(enc.ids, dtype=np.int32))
                starts.append(b_start + to_bytes(offs[:, 0]))
                ends.append(b_start + to_bytes(offs[:, 1]))
            if ids:
                out.append((np.concatenate(ids), np.concatenate(starts).astype(np.uint32),
                            np.concatenate(ends).astype(np.uint32)))
            else:
                out.append((np.zeros(0, np.int32), np.zeros(0, np.uint32), np.zeros(0, np.uint32)))
        return out

    @staticmethod
    def _queue(text, byte_to_char, b0, b1, firsts, rests, pieces):
        piece = text[byte_to_char(b0):byte_to_char(b1)]
        group = firsts if b0 == 0 else rests
        group.append((piece,))
        pieces.append(("text", (0 if b0 == 0 else 1, len(group) - 1, b0)))


_LOADED: dict = {}


def _never_prepend(pre) -> None:
    if not isinstance(pre, dict):
        return
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
        pre["prepend_scheme"] = "never"
    for sub in pre.get("pretokenizers", []) or []:
        _never_prepend(sub)


def _char_to_byte(text: str):
    """Maps char offsets of `text` to UTF-8 byte offsets (identity for ASCII)."""
    if text.isascii():
        return lambda a: np.asarray(a, dtype=np.int64)
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    sizes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    cum = np.concatenate([[0], np.cumsum(sizes)])
    return lambda a: cum[np.asarray(a, dtype=np.int64)]


def _byte_to_char(text: str, raw: bytes):
    if len(raw) == len(text):
        return lambda b: b
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    sizes = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    cum = np.concatenate([[0], np.cumsum(sizes)])
    return lambda b: int(np.searchsorted(cum, b))
