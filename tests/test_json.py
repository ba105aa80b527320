"""csrc/json.cc against Python's json module (made strict: no NaN, no duplicate keys, no lone surrogates):
values, error positions, and a randomized differential fuzz on valid and broken documents."""
from __future__ import annotations

import json
import math
import random

import pytest

import fastchat_ft._native as native
from conftest import shared_path


class Rejected(Exception):
    pass


def _no_constants(name):
    raise Rejected(f"constant {name}")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise Rejected("duplicate key")
    return dict(pairs)


def _check_unicode(value):
    if isinstance(value, str):
        value.encode("utf-8")  # lone surrogates from \\ud800 escapes fail here
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k)
            _check_unicode(v)


def strict_reference(data: bytes):
    """Python's json with RFC 8259 strictness; raises Rejected (or a json/Unicode error) when invalid."""
    text = data.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    value = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    _check_unicode(value)
    return value


def same(a, b) -> bool:
    """Type-aware equality (True != 1 here); floats compare by value, including inf."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        # Integers beyond int64 come back as floats from the native parser.
        if isinstance(b, int) and not (-2**63 <= b < 2**63):
            return isinstance(a, float) and a == float(b)
        if isinstance(a, float) and isinstance(b, float):
            return a == b or (math.isnan(a) and math.isnan(b))
        return False
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    return a is None and b is None


def check_against_reference(data: bytes):
    try:
        expected = strict_reference(data)
    except (Rejected, ValueError, UnicodeError, RecursionError):
        error = native.json_check(data)
        assert error is not None, f"native accepted what strict Python rejects: {data[:200]!r}"
        line, column, reason = error
        assert line >= 1 and column >= 1 and reason
        return False
    assert native.json_check(data) is None, f"native rejected valid JSON {data[:200]!r}: {native.json_check(data)}"
    got = native.json_loads(data)
    assert same(got, expected), f"value differs for {data[:200]!r}: {got!r} vs {expected!r}"
    return True


VALID = [
    b'{}', b'[]', b'0', b'-0', b'1.5e-3', b'-12.25E+2', b'"a"', b'true', b'false', b'null',
    b' \t\r\n{"a" : [1, 2, {"b": null}] }\n',
    b'"\\u00e9\\u20ac\\ud83d\\ude00 \\"q\\" \\\\ \\/ \\b\\f\\n\\r\\t"',
    '"héllo wörld 你好 😀"'.encode(),
    b'9223372036854775807', b'-9223372036854775808', b'9223372036854775808', b'123456789012345678901234567890',
    b'1e400', b'[1e-400]', b'0.1', b'"\x7f"',
    b'\xef\xbb\xbf{"bom": 1}',
]

INVALID = [
    b'', b' ', b'{', b'[1,]', b'{"a":1,}', b'{"a" 1}', b'{a:1}', b"{'a':1}", b'[01]', b'[1.]', b'[.5]',
    b'[-]', b'[1e]', b'[+1]', b'NaN', b'Infinity', b'-Infinity', b'[tru]', b'nul', b'"abc', b'"a\nb"',
    b'"\\x"', b'"\\u12"', b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"', b'"\xff"', b'"\xc0\xaf"',
    b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'{"a":1,"a":2}', b'[1] [2]', b'{}x',
    b'"\x01"', b'[1,,2]', b'\xef\xbb', b'\xef\xbb\xbf',
]


@pytest.mark.parametrize("data", VALID)
def test_valid_documents_match_python(data):
    assert check_against_reference(data)


@pytest.mark.parametrize("data", INVALID)
def test_invalid_documents_are_rejected_with_a_position(data):
    assert not check_against_reference(data)


def test_integers_and_floats_keep_their_kind():
    assert native.json_loads(b"[1, -7, 1.0, 2e3]") == [1, -7, 1.0, 2000.0]
    kinds = [type(x) for x in native.json_loads(b"[1, -7, 1.0, 2e3]")]
    assert kinds == [int, int, float, float]


@pytest.mark.parametrize("data, line, column, words", [
    (b'{"a": 1,\n "b": [1, 2,, 3]}', 2, 13, "expected a value"),
    (b'{"a": 1,\n "a": 2}', 2, 2, 'duplicate member name "a"'),
    (b'[\n\n  tru ]', 3, 6, "expected 'true'"),
    (b'{"k": "caf\xc3"}', 1, 11, "UTF-8"),
    (b'\xef\xbb\xbf[1,]', 1, 4, "trailing comma"),
    (b'{"x": "\\ud800"}', 1, 8, "lone high surrogate"),
    (b'{"x": 1} {"y": 2}', 1, 10, "after the JSON value"),
    (b'{"x": "a\n"}', 1, 9, "newline"),
    (b'{"x": NaN}', 1, 7, "NaN"),
    (b'[1,\r\n 2,\r\n 03]', 3, 2, "leading zeros"),
])
def test_error_names_line_column_and_reason(data, line, column, words):
    error = native.json_check(data)
    assert error is not None
    assert error[:2] == (line, column), error
    assert words in error[2]


def test_first_line_offsets_jsonl_records():
    assert native.json_check(b'{"a": }', first_line=120)[:2] == (120, 7)


def test_depth_limit_is_an_error_not_a_crash():
    deep_ok = b"[" * 100 + b"]" * 100
    assert native.json_check(deep_ok, max_depth=100) is None
    error = native.json_check(b"[" * 101 + b"]" * 101, max_depth=100)
    assert error is not None and "nesting deeper than 100" in error[2]
    # Far past any stack: still a clean error.
    assert native.json_check(b"[" * 1_000_000) is not None
    assert native.json_check(b'{"a":' * 100_000) is not None


def test_large_object_duplicate_detection():
    members = ",".join(f'"k{i}": {i}' for i in range(5000))
    assert native.json_check(("{" + members + "}").encode()) is None
    error = native.json_check(("{" + members + ', "k1234": 0}').encode())
    assert error is not None and 'duplicate member name "k1234"' in error[2]


def test_real_tokenizer_json_parses_to_the_same_value():
    path = shared_path("tokenizers", "smollm2", "tokenizer.json")
    data = path.read_bytes()
    assert same(native.json_loads(data), json.loads(data))


# ------------------------------------------------------------------------------------------ fuzz

def _random_string(rng: random.Random) -> str:
    alphabet = ['a', 'Z', ' ', '"', '\\', '/', '\n', '\t', '\x00', '\x1f', '\x7f', 'é', '€', '😀', '\u2028', '你']
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randint(0, 7 if depth < 4 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 7, 2**31, -2**63, 2**63 - 1, 2**64, rng.randint(-10**6, 10**6)])
    if kind == 3:
        return rng.choice([0.5, -1e-7, 1e300, 3.141592653589793, rng.uniform(-1e6, 1e6), 1e-320])
    if kind == 4:
        return _random_string(rng)
    if kind in (5, 6):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_string(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _serialize(rng: random.Random, value) -> bytes:
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 0, 2]),
                      separators=rng.choice([None, (",", ":"), (" , ", " : ")]))
    return text.encode("utf-8")


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randint(0, 3)
        pos = rng.randint(0, len(b))
        if op == 0 and b:
            del b[min(pos, len(b) - 1)]
        elif op == 1:
            b[pos:pos] = bytes([rng.choice(b'{}[]",:\\-+.eE0123456789 \ntrufalsn\x00\x80\xc3\xed\xff')])
        elif op == 2 and b:
            b[min(pos, len(b) - 1)] = rng.randint(0, 255)
        else:
            b[pos:pos] = rng.choice([b'\\ud800', b'\\udc00', b'"a":1,', b'NaN', b'\xef\xbb\xbf', b'01', b',]'])
    return bytes(b)


def test_differential_fuzz_against_python_json():
    rng = random.Random(20261125)
    accepted = rejected = 0
    for _ in range(3000):
        doc = _serialize(rng, _random_value(rng))
        assert check_against_reference(doc)
        for _ in range(3):
            if check_against_reference(_mutate(rng, doc)):
                accepted += 1
            else:
                rejected += 1
    # Both kinds of mutant must occur, or the fuzz is not exercising the error paths.
    assert accepted > 100 and rejected > 1000, (accepted, rejected)
