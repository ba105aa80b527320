#!/usr/bin/env python3
"""Generates csrc/unicode_tables.cc: the Unicode classes and NFC data the native tokenizer needs.

Every table is probed from the installed HF `tokenizers` (the reference we must match), not from Python's
`unicodedata`: HF's regex engine (onig) and its NFC crate (Unicode 9.0) disagree with Python's Unicode
version on hundreds of code points. `unicodedata` is used only for facts that are stable across Unicode
versions once a character exists (canonical combining class values, one-level decompositions).

Run: .venv/bin/python tools/gen_unicode_tables.py   (then rebuild; the output is committed, never hand-edited)
"""
from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import tokenizers
from tokenizers import Regex, normalizers
from tokenizers.pre_tokenizers import Split

OUT = Path(__file__).resolve().parent.parent / "csrc" / "unicode_tables.cc"
N_CODE_POINTS = 0x110000
# Flag bits; must match csrc/unicode.h.
LETTER, NUMBER, MARK, SPACE, NFC_MAYBE, WORD = 1, 2, 4, 8, 16, 32


def all_scalars() -> list[int]:
    return [c for c in range(N_CODE_POINTS) if not 0xD800 <= c < 0xE000]


def probe_class(regex_class: str, chars: str) -> set[int]:
    """Code points HF's regex engine puts in `regex_class` (e.g. \\p{L}): split off everything else."""
    split = Split(Regex(f"[^{regex_class}]"), behavior="removed")
    return {ord(ch) for piece, _ in split.pre_tokenize_str(chars) for ch in piece}


def probe_nfd(cps: list[int]) -> dict[int, str]:
    """HF's NFD of each single code point, for those it changes (NUL separates: it never decomposes)."""
    nfd = normalizers.NFD()
    joined = "\x00".join(chr(c) for c in cps)
    parts = nfd.normalize_str(joined).split("\x00")
    assert len(parts) == len(cps)
    return {c: p for c, p in zip(cps, parts) if p != chr(c)}


def probe_ccc(cps: list[int]) -> dict[int, int]:
    """Non-zero combining classes HF knows: a mark with class k moves across U+0334 (1) or U+0345 (240)."""
    nfd = normalizers.NFD()
    known = {}
    for c in cps:
        k = unicodedata.combining(chr(c))
        if k == 0:
            continue
        ch = chr(c)
        after_low = nfd.normalize_str("a" + ch + "\u0334")   # reorders when ccc(ch) > 1
        before_high = nfd.normalize_str("a\u0345" + ch)      # reorders when ccc(ch) < 240
        if after_low.endswith(ch) or before_high.endswith("\u0345") or c in (0x0334, 0x0345):
            known[c] = k
    return known


def probe_word_chars(scalars: list[int]) -> set[int]:
    """Code points HF's single_word check treats as word characters (Rust regex \\w: more than L|N)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE
    tok = Tokenizer(BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.add_tokens([AddedToken("ab", single_word=True)])
    word_id = tok.token_to_id("ab")
    encs = tok.encode_batch([chr(c) + "ab" for c in scalars], add_special_tokens=False)
    return {c for c, e in zip(scalars, encs) if word_id not in e.ids}


def two_stage(values: list[int]) -> tuple[list[int], list[list[int]]]:
    blocks: dict[tuple, int] = {}
    stage1, stage2 = [], []
    for hi in range(N_CODE_POINTS >> 8):
        block = tuple(values[hi << 8:(hi + 1) << 8])
        if block not in blocks:
            blocks[block] = len(stage2)
            stage2.append(list(block))
        stage1.append(blocks[block])
    return stage1, stage2


def c_array(ctype: str, name: str, values, per_line: int = 24) -> str:
    vals = list(values)
    lines = [", ".join(str(v) for v in vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return f"extern const {ctype} {name}[{len(vals)}] = {{\n  " + ",\n  ".join(lines) + "\n};\n"


def main() -> int:
    scalars = all_scalars()
    chars = "".join(chr(c) for c in scalars)
    letters = probe_class(r"\p{L}", chars)
    numbers = probe_class(r"\p{N}", chars)
    marks = probe_class(r"\p{M}", chars)
    spaces = probe_class(r"\s", chars)
    words = probe_word_chars(scalars)

    decomp = probe_nfd(scalars[1:])  # U+0000 is the separator and never decomposes
    ccc = probe_ccc(scalars)
    nfc = normalizers.NFC()
    # Primary composites: a two-char one-level canonical decomposition that HF's NFC recomposes.
    compositions = []
    for c in sorted(decomp):
        if 0xAC00 <= c <= 0xD7A3:
            continue  # Hangul syllables are algorithmic (csrc/unicode.cc)
        d = unicodedata.decomposition(chr(c))
        if not d or d.startswith("<"):
            continue
        parts = [int(x, 16) for x in d.split()]
        if len(parts) == 2 and nfc.normalize_str(chr(parts[0]) + chr(parts[1])) == chr(c):
            compositions.append((parts[0], parts[1], c))
    second_elements = {b for _, b, _ in compositions} | set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))

    flags = [0] * N_CODE_POINTS
    for c in letters:
        flags[c] |= LETTER
    for c in numbers:
        flags[c] |= NUMBER
    for c in words:
        flags[c] |= WORD
    for c in marks:
        flags[c] |= MARK
    for c in spaces:
        flags[c] |= SPACE
    for c in set(decomp) | set(ccc) | second_elements:
        flags[c] |= NFC_MAYBE

    stage1, stage2 = two_stage(flags)
    decomp_index, decomp_data = [], []
    for c in sorted(decomp):
        if 0xAC00 <= c <= 0xD7A3:
            continue
        decomp_index += [c, len(decomp_data), len(decomp[c])]
        decomp_data += [ord(ch) for ch in decomp[c]]
    ccc_pairs = [v for c in sorted(ccc) for v in (c, ccc[c])]
    comp_flat = [v for triple in sorted(compositions) for v in triple]

    out = [
        "// GENERATED by tools/gen_unicode_tables.py from HF tokenizers "
        f"{tokenizers.__version__} (Python {sys.version.split()[0]}); do not edit by hand.\n"
        "// Code point flags (two-stage table) and the NFC data HF's normalizer uses (Unicode 9.0).\n",
        "#include <cstdint>\n\nnamespace fastchat::unicode::tables {\n\n",
        c_array("uint16_t", "kFlagStage1", stage1),
        c_array("uint8_t", "kFlagStage2", [v for b in stage2 for v in b], 32),
        f"extern const uint32_t kDecompCount = {len(decomp_index) // 3};\n",
        c_array("uint32_t", "kDecompIndex", decomp_index, 12),
        c_array("uint32_t", "kDecompData", decomp_data, 12),
        f"extern const uint32_t kCccCount = {len(ccc_pairs) // 2};\n",
        c_array("uint32_t", "kCcc", ccc_pairs, 16),
        f"extern const uint32_t kCompositionCount = {len(comp_flat) // 3};\n",
        c_array("uint32_t", "kComposition", comp_flat, 12),
        "\n}  // namespace fastchat::unicode::tables\n",
    ]
    OUT.write_text("".join(out))
    print(f"wrote {OUT}: {len(letters)} L, {len(numbers)} N, {len(marks)} M, {len(spaces)} White_Space, {len(words)} word, "
          f"{len(decomp_index) // 3} decompositions, {len(ccc)} ccc, {len(compositions)} compositions, "
          f"{len(stage2)} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
