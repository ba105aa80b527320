"""Test inputs for tokenizer parity: the tokenizer families (shared files plus ones built from them in the
layout their model family ships) and a seeded generator of prose slices and adversarial strings."""
from __future__ import annotations

import json
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TOKENIZERS = SHARED / "tokenizers"
WAR_AND_PEACE = SHARED / "corpora" / "war-and-peace.txt"

SHIPPED = ["gpt2", "llama3", "smollm2", "tiny-bpe", "tiny-bpe-nfc", "phi2", "llama2", "mistral-v0.3"]
BUILT = ["qwen2", "phi3", "metaspace-split", "digits-literal"]
FAMILIES = SHIPPED + BUILT

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _load(name: str) -> dict:
    return json.loads((TOKENIZERS / name / "tokenizer.json").read_text(encoding="utf-8"))


def _added(content, id_, special=True, lstrip=False, rstrip=False, normalized=None, single_word=False):
    return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


def family_json(name: str) -> str:
    """tokenizer.json text of a family; the built ones start from a shipped vocabulary."""
    if name in SHIPPED:
        return (TOKENIZERS / name / "tokenizer.json").read_text(encoding="utf-8")
    if name == "qwen2":
        # Qwen2/2.5/3 layout: NFC, the single-digit split regex, ByteLevel without regex, ChatML specials.
        j = _load("smollm2")
        j["normalizer"] = {"type": "NFC"}
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        j["model"]["ignore_merges"] = False
        j["model"]["continuing_subword_prefix"] = ""
        j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                               "use_regex": False}
    elif name == "phi3":
        # Phi-3 / legacy Llama-2 layout: Prepend + Replace normalizer, no pre-tokenizer, byte fallback,
        # added tokens with rstrip/lstrip like Phi-3's chat tokens.
        j = _load("llama2")
        j["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
        j["pre_tokenizer"] = None
        n = len(j["model"]["vocab"])
        j["added_tokens"] += [_added("<|endoftext|>", n), _added("<|assistant|>", n + 1, rstrip=True),
                              _added("<|user|>", n + 2, rstrip=True), _added("<|end|>", n + 3, rstrip=True),
                              _added("<|placeholder1|>", n + 4, lstrip=True),
                              _added("hello", n + 5, special=False, normalized=False, single_word=True)]
    elif name == "metaspace-split":
        # Metaspace(split=true, prepend_scheme=first) over the llama2 vocab, unk instead of byte fallback.
        j = _load("llama2")
        j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                              "split": True}
        j["model"]["byte_fallback"] = False
        j["model"]["unk_token"] = "<unk>"
        j["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}
    elif name == "digits-literal":
        # Digits + a literal Split + ByteLevel with its own regex and prefix space (GPT-2 vocab).
        j = _load("gpt2")
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "Split", "pattern": {"String": "--"}, "behavior": "MergedWithPrevious", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
        j["added_tokens"] += [_added("<|im_start|>", 50257), _added("<|im_end|>", 50258),
                              _added(" [x]", 50259, special=False, normalized=True)]
    else:
        raise KeyError(name)
    return json.dumps(j, ensure_ascii=False)


# ------------------------------------------------------------------------------------ the generator
_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", " \n ",
    ".,;:!?()[]{}<>\"'`~@#$%^&*-_=+/\\|",
    "'s", "'S", "'t", "'re", "'ve", "'M", "'ll", "'LL", "'d", "'\u017f", "'x",
    "éèêëàâäôöûüçñßÉÀÇ",
    "\u0300\u0301\u0302\u0303\u0308\u0327\u0345\u0334\u05b0\u093c",  # combining marks
    "日本語中文字漢字テキストカタカナひらがな",
    "한국어텍스트\u1100\u1161\u11a8",  # syllables and conjoining jamo
    "العربيةשלוםहिन्दीไทยΕλληνικάРусский",
    "😀👍🏽👨‍👩‍👧🇫🇷❤️✨\u200d\ufe0f",
    "\u00a0\u2000\u2003\u200a\u3000\u0085\u2028\u2029\u202f\u205f\u1680",
    "\u001c\u001d\u001e\u001f\u200b\ufeff\u180e\u00ad",
    "ⅫⅣ²³¼０１２٣४",
    "ﬁﬂ\u212b\u2126Å\u1e9b\u0323",  # compatibility/singleton/NFC-sensitive
    "\U00011935\U00011930",  # composes in Unicode 13 but not in HF's Unicode 9.0 NFC
]
_LOOKALIKES = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]",
               "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|im_", "|>", "<|", "<<s>>",
               "<|assistant|>", "<|user|>", "<|end|>", "hello", " [x]", "<0x41>", "\u2581", "Ġ"]


def _random_codepoint(rng: random.Random) -> str:
    while True:
        cp = rng.choice([rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= cp < 0xE000:
            return chr(cp)


def adversarial(rng: random.Random, added: list[str]) -> str:
    parts = []
    for _ in range(rng.randrange(1, 24)):
        r = rng.random()
        if r < 0.55:
            pool = rng.choice(_POOLS)
            parts.append("".join(rng.choice(pool) for _ in range(rng.randrange(1, 8))) if len(pool) > 12
                         else pool)
        elif r < 0.65:
            parts.append(rng.choice(_LOOKALIKES))
        elif r < 0.72 and added:
            parts.append(rng.choice(added))
        elif r < 0.80:
            parts.append(_random_codepoint(rng))
        elif r < 0.87:
            parts.append(rng.choice(" \t\n\u00a0") * rng.randrange(2, 60))
        elif r < 0.93:
            parts.append("".join(rng.choice("0123456789") for _ in range(rng.randrange(2, 40))))
        else:
            parts.append(rng.choice(["don't", "I'M", "they're", "WE'VE", "it's", "x'y", "''", "'"]))
    return "".join(parts)


def strings(n: int, seed: int, added: list[str] = (), max_prose: int = 3000) -> list[str]:
    """n test strings: half prose slices of War and Peace (random cut points, up to `max_prose` chars),
    half adversarial."""
    rng = random.Random(seed)
    prose = WAR_AND_PEACE.read_text(encoding="utf-8") if WAR_AND_PEACE.exists() else ""
    out = ["", " ", "  ", "\n", "a", "  hi", "x   ", "\u00a0\u00a0a", "ab\r\n  cd", "don'\u017f x", "DON'T",
           "Ⅻ12", "a\u0301b", "..x", "(x", "\ta", "1234567", "   \n\n  \t x"]
    while len(out) < n:
        if prose and rng.random() < 0.5:
            start = rng.randrange(len(prose))
            length = rng.choice([rng.randrange(1, 40), rng.randrange(40, 400), rng.randrange(400, 3000)])
            out.append(prose[start:start + min(length, max_prose)])
        else:
            out.append(adversarial(rng, list(added)))
    return out[:n]


def added_contents(tokenizer_json: str) -> list[str]:
    return [t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])][:64]

