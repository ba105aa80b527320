"""Native tokenizer parity with HF `tokenizers` (pinned 0.23.3): ids with and without special tokens,
decode, offsets, control spans, the HF fallback and errors. Reference: tokenizers.Tokenizer on the same file."""
from __future__ import annotations

import json
import os
import unicodedata
import zlib
import warnings

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from fastchat_ft import _native  # noqa: E402
from fastchat_ft.errors import TokenizerError  # noqa: E402
from fastchat_ft.tokenizer import Tokenizer  # noqa: E402

from tests.conftest import shared_path  # noqa: E402
from tests import tokenizer_corpus as corpus  # noqa: E402

HF_VERSION = "0.23.3"
N_STRINGS = int(os.environ.get("FASTCHAT_TOKENIZER_PARITY_N", "3000"))


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    """Tests marked slow run only under `-m slow` (the suite's default run must stay fast)."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")


def test_reference_version_is_pinned():
    assert tokenizers.__version__ == HF_VERSION, "parity is only claimed against this HF version"


def _pair(family: str, tmp_path):
    shared_path("tokenizers")
    text = corpus.family_json(family)
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    return Tokenizer.from_file(path, native_only=True), tokenizers.Tokenizer.from_file(str(path)), text


def _hf_ids(hf, texts, allow_special, add_special_tokens=False):
    hf.encode_special_tokens = not allow_special
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=add_special_tokens)]


def _first_mismatch(ours, ref, texts):
    for s, a, b in zip(texts, ours, ref):
        if list(a) != list(b):
            return f"{s!r}\n ours {list(a)}\n hf   {list(b)}"
    return None


@pytest.mark.parametrize("family", corpus.FAMILIES)
def test_ids_match_hf(family, tmp_path):
    ours, hf, text = _pair(family, tmp_path)
    texts = corpus.strings(N_STRINGS, seed=zlib.crc32(family.encode()) % 1000 + 7, added=corpus.added_contents(text))
    for allow in (False, True):
        got = ours.encode_batch(texts, allow_special=allow, threads=2)
        ref = _hf_ids(hf, texts, allow)
        bad = sum(list(a) != list(b) for a, b in zip(got, ref))
        assert bad == 0, f"{family} allow_special={allow}: {bad}/{len(texts)} differ; first:\n" + \
            _first_mismatch(got, ref, texts)
    # Single encode agrees with the batch, and add_special_tokens applies the post-processor as HF does.
    for s in texts[:300]:
        assert ours.encode(s) == _hf_ids(hf, [s], False)[0]
        assert ours.encode(s, True, add_special_tokens=True) == _hf_ids(hf, [s], True, True)[0]
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)


@pytest.mark.parametrize("family", corpus.FAMILIES)
def test_decode_matches_hf(family, tmp_path):
    ours, hf, text = _pair(family, tmp_path)
    texts = corpus.strings(400, seed=11, added=corpus.added_contents(text))
    rng = np.random.default_rng(5)
    for s in texts:
        ids = ours.encode(s, allow_special=True)
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (s, ids)
    for _ in range(200):  # random id sequences: partial UTF-8, byte-fallback runs, added tokens anywhere
        ids = rng.integers(0, ours.vocab_size, size=int(rng.integers(1, 12))).tolist()
        for skip in (False, True):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("family", ["llama3", "gpt2", "qwen2", "phi2", "tiny-bpe-nfc"])
def test_byte_level_offsets_cover_each_token_exactly(family, tmp_path):
    ours, hf, text = _pair(family, tmp_path)
    for s in corpus.strings(300, seed=3, added=corpus.added_contents(text)):
        raw = s.encode("utf-8")
        ids, starts, ends = ours.encode_with_offsets(s, allow_special=True)
        assert ids.tolist() == _hf_ids(hf, [s], True)[0]
        if family in ("qwen2", "tiny-bpe-nfc") and s != unicodedata.normalize("NFC", s):
            continue  # NFC changes bytes: spans still cover the source chars, checked below
        pieces = [ours.decode([i]).encode("utf-8", "surrogatepass") for i in ids]
        for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            if ours.is_special(int(ids[i])) or "\ufffd" in pieces[i].decode("utf-8", "replace"):
                continue
            if raw[a:b] != pieces[i]:
                # Only where the vocabulary lacks a byte: HF drops that char and merges across the gap,
                # so the token spans the gap too.
                assert family in ("qwen2", "tiny-bpe-nfc"), (s, i)
                assert raw[a:a + 1] == pieces[i][:1] and raw[b - 1:b] == pieces[i][-1:], (s, i)
        assert list(starts) == sorted(starts) and (len(ends) == 0 or ends[-1] <= len(raw))


@pytest.mark.parametrize("family", ["llama2", "mistral-v0.3", "phi3", "qwen2"])
def test_offsets_map_to_hf_offsets(family, tmp_path):
    """Through Metaspace/Prepend/Replace/NFC, our byte spans equal HF's char spans converted to bytes
    (except tokens holding part of a char, which HF widens to the whole char and we keep per byte)."""
    ours, hf, text = _pair(family, tmp_path)
    hf.encode_special_tokens = False
    for s in corpus.strings(300, seed=4, added=corpus.added_contents(text)):
        c2b = np.cumsum([0] + [len(ch.encode("utf-8")) for ch in s])
        ids, starts, ends = ours.encode_with_offsets(s, allow_special=True)
        enc = hf.encode(s, add_special_tokens=False)
        assert ids.tolist() == enc.ids
        if family == "qwen2" and (ours.decode(ids) != s or unicodedata.normalize("NFC", s) != s):
            # NFC changed the text (composed/reordered chars map to all their source bytes here, to the
            # first source char in HF) or a byte missing from the vocab was dropped (HF's later offsets
            # shift left, ours don't): only bounds are comparable.
            assert all(0 <= a <= b <= len(s.encode()) for a, b in zip(starts.tolist(), ends.tolist()))
            continue
        for k, (tok, (a, b)) in enumerate(zip(enc.tokens, enc.offsets)):
            if tok.startswith("<0x") or "\ufffd" in ours.decode([enc.ids[k]]):
                # Part of a char (byte fallback / byte-level): HF widens to the whole char, we keep bytes.
                assert c2b[a] <= starts[k] <= ends[k] <= c2b[b], (s, k, tok)
                continue
            if family == "qwen2" and unicodedata.normalize("NFC", s) != s:
                # NFC composition: HF keeps only the first source char's span, ours covers every source char.
                assert starts[k] <= c2b[a] and c2b[b] <= ends[k], (s, k, tok)
                continue
            assert (starts[k], ends[k]) == (c2b[a], c2b[b]), (s, k, tok)


def test_control_spans_force_added_tokens_without_allow_special(tmp_path):
    ours, hf, _ = _pair("llama3", tmp_path)
    text = "<|start_header_id|>user<|end_header_id|>\n\nsay <|eot_id|> please<|eot_id|>"
    raw = text.encode()
    # The template produced the header tokens and the final eot; the user typed the middle "<|eot_id|>".
    spans = [(0, 19), (23, 40), (raw.rindex(b"<|eot_id|>"), len(raw))]
    ids, starts, ends = ours.encode_with_offsets(text, allow_special=False, control_spans=spans)
    eot = ours.token_to_id("<|eot_id|>")
    assert ids[0] == ours.token_to_id("<|start_header_id|>") and ids[-1] == eot
    assert ids.tolist().count(eot) == 1, "user-typed special text must not become a control token"
    user_part = ours.encode("\n\nsay <|eot_id|> please")
    assert ids.tolist() == [ids[0], ours.encode("user")[0], ours.token_to_id("<|end_header_id|>")] + user_part + [eot]
    assert (starts[-1], ends[-1]) == spans[-1]
    with pytest.raises(ValueError, match="not an added token"):
        ours.encode_with_offsets(text, control_spans=[(3, 8)])


def test_control_spans_follow_hf_lstrip_rstrip(tmp_path):
    ours, hf, _ = _pair("phi3", tmp_path)
    text = "<|user|>  \n hi there <|end|>\n  <|assistant|> ok"
    raw = text.encode()
    spans = [(raw.index(t.encode()), raw.index(t.encode()) + len(t)) for t in ("<|user|>", "<|end|>", "<|assistant|>")]
    ids, _, _ = ours.encode_with_offsets(text, allow_special=False, control_spans=spans)
    assert ids.tolist() == _hf_ids(hf, [text], True)[0]


def test_unsupported_component_falls_back_to_hf_with_one_warning(tmp_path):
    shared_path("tokenizers")
    j = json.loads(corpus.family_json("tiny-bpe"))
    j["normalizer"] = {"type": "Lowercase"}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(j), encoding="utf-8")
    with pytest.raises(_native.TokenizerError, match="normalizer.Lowercase"):
        _native.Tokenizer.from_file(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = Tokenizer.from_file(tmp_path)
    assert len(caught) == 1 and "normalizer.Lowercase" in str(caught[0].message)
    assert not tok.is_native
    hf = tokenizers.Tokenizer.from_file(str(path))
    for s in ["Hello World", "ABC def <|x|>"]:
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False).ids
    with pytest.raises(TokenizerError, match="normalizer.Lowercase"):
        Tokenizer.from_file(path, native_only=True)


@pytest.mark.parametrize("component, patch", [
    ("pre_tokenizer.Split.pattern", lambda j: j["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": r"\w+"})),
    ("model.WordPiece", lambda j: j["model"].update(type="WordPiece")),
    ("decoder.CTC", lambda j: j.update(decoder={"type": "CTC"})),
    ("model.BPE.dropout", lambda j: j["model"].update(dropout=0.1)),
])
def test_unsupported_components_are_named(component, patch, tmp_path):
    shared_path("tokenizers")
    j = json.loads(corpus.family_json("tiny-bpe"))
    patch(j)
    with pytest.raises(_native.TokenizerError, match=component.replace(".", r"\.")):
        _native.Tokenizer.from_json(json.dumps(j))


def test_bad_json_and_missing_file_are_user_errors(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE",\n  "vocab": {"a": 0,}}}')
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_file(bad)
    assert e.value.line == 2 and e.value.file == str(bad)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing")


def _code_points(step: int) -> list[int]:
    dense = range(1, 0x3400)  # Latin, Greek, Cyrillic, Indic, combining marks, spaces, punctuation
    return sorted(set(dense) | {c for c in range(1, 0x110000, step) if not 0xD800 <= c < 0xE000})


@pytest.mark.parametrize("step", [pytest.param(1, marks=pytest.mark.slow), 97])
def test_code_points_are_classified_as_hf_does(step, tmp_path):
    """The Unicode tables (L, N, White_Space via the Llama-3 and GPT-2 scanners; NFC via Qwen2) over the
    code points (all of them in the slow run), each surrounded by context that exposes its class."""
    cps = _code_points(step)
    chunks = []
    for k in range(0, len(cps), 4096):
        chunks.append("".join(f"a{chr(c)}1 {chr(c)}{chr(c)}'s" for c in cps[k:k + 4096]))
    for family in ("tiny-bpe", "gpt2", "qwen2"):
        ours, hf, _ = _pair(family, tmp_path)
        got = ours.encode_batch(chunks, threads=2)
        ref = _hf_ids(hf, chunks, False)
        assert got == ref, f"{family}: " + (_first_mismatch(got, ref, chunks) or "")[:400]


def test_bytes_input_and_surrogates():
    """Documented choice: str must be valid Unicode (lone surrogates raise, as HF rejects them too);
    bytes are accepted natively and invalid UTF-8 bytes are kept as single-byte symbols."""
    tok = Tokenizer.from_file(shared_path("tokenizers", "gpt2"))
    with pytest.raises(UnicodeEncodeError):
        tok.encode("a\udc80b")
    ids = tok.native.encode(b"ab\xff\xc3 cd", False, False).tolist()
    assert tok.decode(ids) == "ab\ufffd\ufffd cd"
    assert tok.native.encode("ab cd".encode(), False, False).tolist() == tok.encode("ab cd")


def test_python_api_shapes():
    tok = Tokenizer.from_file(shared_path("tokenizers", "llama3"))
    assert tok.is_native and isinstance(tok.encode("hi"), list)
    assert tok.encode_ids("hi").dtype == np.int32
    assert tok.encode_batch(["a b", "", "c"]) == [tok.encode("a b"), [], tok.encode("c")]
    assert tok.token_to_id("<|eot_id|>") == 128009 and tok.token_to_id("no such token") is None
    assert tok.id_to_token(128009) == "<|eot_id|>" and tok.is_special(128009) and not tok.is_special(5)
    assert tok.encode("<|eot_id|>", allow_special=True) == [128009]
    assert 128009 not in tok.encode("<|eot_id|>")
    assert tok.encode("hi", add_special_tokens=True)[0] == 128000


@pytest.mark.slow
@pytest.mark.parametrize("family", corpus.FAMILIES)
def test_ids_match_hf_100k(family, tmp_path):
    """The issue's bar: zero mismatches over >= 100k strings per family, with and without special tokens.
    Run: pytest -m slow tests/test_tokenizer.py -k 100k -s (prints the counts; ~2-5 min per family)."""
    ours, hf, text = _pair(family, tmp_path)
    n = max(100_000, N_STRINGS)
    texts = corpus.strings(n, seed=zlib.crc32(family.encode()) % 1000 + 100_003, added=corpus.added_contents(text),
                           max_prose=400)  # shorter prose than the default run keeps 100k x 12 families in CI-hours
    total = 0
    for allow in (False, True):
        for k in range(0, n, 10_000):
            chunk = texts[k:k + 10_000]
            got = ours.encode_batch(chunk, allow_special=allow)
            ref = _hf_ids(hf, chunk, allow)
            bad = sum(list(a) != list(b) for a, b in zip(got, ref))
            assert bad == 0, f"{family} allow_special={allow}: {bad} differ; first:\n" + _first_mismatch(got, ref, chunk)
            total += len(chunk)
    print(f"\n{family}: {n} strings x allow_special in (False, True): {total} encodings, 0 mismatches")


def test_hf_fallback_offsets_and_control_spans_match_native(tmp_path):
    """The fallback path (used for unsupported files) gives the native results on a supported file."""
    native, hf, _ = _pair("llama3", tmp_path)
    fallback = Tokenizer(hf=hf, path="llama3")
    text = "<|start_header_id|>user<|end_header_id|>\n\nhé llo <|eot_id|>"
    raw = text.encode()
    spans = [(0, 19), (23, 40), (raw.rindex(b"<|eot_id|>"), len(raw))]
    for kwargs in ({}, {"control_spans": spans}, {"add_special_tokens": True, "control_spans": spans}):
        a = [x.tolist() for x in native.encode_with_offsets(text, **kwargs)]
        b = [x.tolist() for x in fallback.encode_with_offsets(text, **kwargs)]
        assert a == b, kwargs
    assert fallback.encode_batch(["a b", "<|eot_id|>"]) == native.encode_batch(["a b", "<|eot_id|>"])
