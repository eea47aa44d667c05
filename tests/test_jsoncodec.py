"""The fast JSON path must read and write exactly what the standard library would."""

from __future__ import annotations

import json

import pytest

from relay import jsoncodec


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "b": [true, false, null], "c": "\\u00e9\\u2028"}',
        b'{"size": 123456789012345678901234567890}',  # beyond 64 bits: kept exact
        b'{"size": -9223372036854775809}',
        b'{"size": 18446744073709551616}',
        b"\xef\xbb\xbf" + b'{"bom": true}',
        b'{"pair": "\\ud83d\\ude00"}',
        b'{"dup": 1, "dup": 2}',
        b'  {"padded": 1.5e3}  ',
    ],
)
def test_loads_agrees_with_the_standard_library(body: bytes) -> None:
    ours = jsoncodec.loads(body)
    assert ours == json.loads(body)
    assert type(ours) is dict


@pytest.mark.parametrize(
    "body",
    [b'{"lone": "\\ud800"}', b'{"\\udfff": 1}', b'{"deep": [["x\\udc00y"]]}', b'["\\ud83d"]'],
)
def test_loads_refuses_a_lone_surrogate_escape_anywhere(body: bytes) -> None:
    # Valid JSON syntax, but no Unicode text: nothing relay stores or sends could hold it.
    with pytest.raises(jsoncodec.LoneSurrogate):
        jsoncodec.loads(body)


@pytest.mark.parametrize(
    "body",
    [b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -1e999}', b'{"a": 1', b"\xff", b"[" * 100_000],
)
def test_loads_refuses_what_relay_refuses(body: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)):
        jsoncodec.loads(body)


@pytest.mark.parametrize(
    "value",
    [
        {"a": "é\u2028", "n": None, "l": [1, 2.5, True]},
        {"big": 2**70, "neg": -(2**65)},
        {"nested": {"k": [{"x": "y"}]}},
    ],
)
def test_dumps_is_compact_utf8_json_that_reads_back_the_same(value: object) -> None:
    text = jsoncodec.dumps(value)
    assert json.loads(text) == value
    assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_dumps_refuses_a_lone_surrogate() -> None:
    with pytest.raises(UnicodeEncodeError):
        jsoncodec.dumps({"lone": "\ud800"})
