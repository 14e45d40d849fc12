"""JSON orjson refuses only for its Unicode: repaired with U+FFFD, otherwise as strict as orjson."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventrouter.source.unicode_repair import REPLACEMENT, loads

R = REPLACEMENT


@pytest.mark.parametrize(
    ("text", "doc", "strings"),
    [
        (b'{"m":"caf\xe9!"}', {"m": f"caf{R}!"}, 1),  # a lead byte without its continuation
        (b'{"m":"\xff\xfe"}', {"m": R + R}, 1),  # one U+FFFD per invalid byte, as Go's decoder
        (b'{"m":"\xed\xa0\x80"}', {"m": R * 3}, 1),  # a surrogate encoded in UTF-8 (CESU) is invalid
        (b'{"m":"a\\ud800b"}', {"m": f"a{R}b"}, 1),  # lone high surrogate escape
        (b'{"m":"\\udc00"}', {"m": R}, 1),  # lone low surrogate escape
        (b'{"m":"\\ud800\\ud83d\\ude00"}', {"m": R + "\U0001f600"}, 1),  # a pair after a lone one
        (b'{"k\x80":["ok","\\ud800"]}', {f"k{R}": ["ok", R]}, 2),  # keys and nested values
        (b'{"m":"\\ud83d\\ude00 \xf0\x9f\x98\x80"}', {"m": "\U0001f600 \U0001f600"}, 0),  # valid: orjson
    ],
)
def test_broken_characters_become_u_fffd_and_the_rest_is_kept(text: bytes, doc: Any, strings: int) -> None:
    assert loads(text) == (doc, strings)


@pytest.mark.parametrize(
    "text",
    [
        b"not json",
        b'{"m":"\\ud800",}',  # a trailing comma: not JSON, whatever its Unicode
        b'{"m":"\\ud800","n":NaN}',  # NaN and Infinity are not JSON (orjson refuses them too)
        b'{"m":"\\ud800","n":-Infinity}',
        b'{"m":"\\ud800","n":1e400}',  # overflows a double: orjson refuses it
        b'{"m":"\\ud800\x01"}',  # a raw control character in a string
        b'{"m":"ok","n":NaN}',  # refused for something else, with valid Unicode
    ],
)
def test_text_orjson_refuses_for_another_reason_is_still_refused(text: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError) as caught:
        loads(text)
    with pytest.raises(orjson.JSONDecodeError) as direct:
        orjson.loads(text)
    assert str(caught.value) == str(direct.value)  # orjson's own message, naming where it stopped


def test_integers_beyond_64_bits_become_floats_as_orjson_makes_them() -> None:
    big = b"123456789012345678901234567890"
    doc, _ = loads(b'{"m":"\\ud800","n":' + big + b',"u":18446744073709551615,"i":-9223372036854775808}')
    clean = orjson.loads(b'{"n":' + big + b',"u":18446744073709551615,"i":-9223372036854775808}')
    assert {k: doc[k] for k in clean} == clean
    assert [type(doc[k]) for k in clean] == [float, int, int]


# Strings with lone surrogates, as a broken encoder writes them: json.dumps escapes each one alone.
_text = st.text(st.characters(codec=None, categories=("Cs", "Lu", "Ll", "Nd", "So", "Zs", "Cc")))
_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


def _expected(value: Any) -> Any:
    if isinstance(value, str):
        return re.sub("[\ud800-\udfff]", R, value)
    if isinstance(value, dict):
        return {_expected(k): _expected(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expected(v) for v in value]
    return value


@given(_value)
def test_any_document_with_lone_surrogate_escapes_is_the_same_document_repaired(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=True).encode()
    decoded = json.loads(text)  # what the text says: escaped pairs decode to one character
    doc, strings = loads(text)
    want = _expected(decoded)
    assert doc == want
    assert (strings == 0) == (want == decoded)
    orjson.dumps(doc)  # every string is valid Unicode now: orjson can write it again


def test_describe_names_the_event_of_an_object_or_of_a_watch_event() -> None:
    from eventrouter.source.unicode_repair import describe

    event = {"metadata": {"namespace": "ns", "name": "pod.1", "uid": "u-1"}}
    assert describe(event) == describe({"type": "ADDED", "object": event}) == "ns/pod.1 (uid u-1)"
    assert describe({"metadata": "broken"}) == describe([1]) == "?/? (uid ?)"
