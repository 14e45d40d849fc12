"""JSON orjson refuses only for its Unicode: repaired with U+FFFD, otherwise as strict as orjson, at
any depth json.loads takes."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.source.unicode_repair import REPLACEMENT, loads, repair
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

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


# ---- deep documents -----------------------------------------------------------------------------
# Built and checked without recursion: == on a chain 1,000 deep raises RecursionError itself.


def _chain(kinds: list[str], leaf: Any, broken_siblings: set[int]) -> Any:
    """Containers nested len(kinds) deep ("d": a dict, "l": a list), ``leaf`` innermost; the levels
    in ``broken_siblings`` also hold a string with a lone surrogate next to the deeper level."""
    value = leaf
    for level in reversed(range(len(kinds))):
        sibling = "x\udc00y" if level in broken_siblings else "ok"
        value = {"k": value, "s": sibling} if kinds[level] == "d" else [value, sibling]
    return value


def _walk(value: Any, kinds: list[str]) -> tuple[Any, list[Any]]:
    """The innermost value, and the sibling string of each level."""
    siblings = []
    for kind in kinds:
        if kind == "d":
            assert isinstance(value, dict) and list(value) == ["k", "s"]
            value, sibling = value["k"], value["s"]
        else:
            assert isinstance(value, list) and len(value) == 2
            value, sibling = value
        siblings.append(sibling)
    return value, siblings


@pytest.mark.parametrize(
    ("pattern", "leaf_broken", "broken"),
    [("dl", True, {0, 999}), ("d", False, {500}), ("l", True, set()), ("lld", False, set())],
)
def test_repair_takes_the_deepest_document_json_loads_gives(
    pattern: str, leaf_broken: bool, broken: set[int]
) -> None:
    """1,000 levels of objects ("d") and lists ("l"): repair recursed one or two frames a level, and a
    broken string ~500 deep raised RecursionError."""
    kinds = list(pattern * 1000)[:1000]
    value = _chain(kinds, "a\ud800b" if leaf_broken else "clean", broken)
    fixed, strings = repair(value)
    assert strings == len(broken) + leaf_broken
    if not strings:
        assert fixed is value  # nothing broken: the very same containers
        return
    leaf, siblings = _walk(fixed, kinds)
    assert leaf == (f"a{R}b" if leaf_broken else "clean")
    assert siblings == [f"x{R}y" if i in broken else "ok" for i in range(1000)]


@pytest.mark.parametrize("levels", [500, 800])
def test_a_broken_string_deep_in_a_document_is_repaired(levels: int) -> None:
    """Through loads (as a list page, a watch line, a replayed recording): the old code raised
    RecursionError, which no caller caught: the router stopped, and at every start again. (orjson
    takes 1,024 levels, json.loads ~1,000 less the stack in use: deeper is refused, as malformed.)"""
    pairs = levels // 2  # an object and a list each
    text = b'{"a":[' * pairs + b'"\\ud800"' + b"]}" * pairs
    doc, strings = loads(text)
    assert strings == 1
    for _ in range(pairs):
        doc = doc["a"][0]
    assert doc == R


def _deep_event(name: str, depth: int) -> bytes:
    """An Event whose ``related`` nests ``depth`` deep around a lone surrogate escape."""
    obj = event_object(object_name=name)
    obj["related"] = "__DEEP__"
    deep = b'{"a":' * depth + b'"\\ud800"' + b"}" * depth
    return orjson.dumps(obj).replace(b'"__DEEP__"', deep)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


async def test_a_deeply_nested_broken_event_costs_no_more_than_itself(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A list item and a watch line nested 500 deep with a lone surrogate escape (a broken proxy):
    the RecursionError ended the watch task and the router (exit 1), on the same page at every start."""
    api.create_event(event_object(object_name="clean-listed"))
    api.faults.malformed_next_list(_deep_event("deep-listed", 500))
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    router = Router(router_settings(api, tmp_path), [spec])
    async with router.running():
        async with asyncio.timeout(10):
            await router.watchers[0].initial_list_done.wait()
        api.faults.malformed_next_watch_line(
            line=b'{"type":"ADDED","object":' + _deep_event("deep-watched", 500) + b"}"
        )
        api.disconnect_watches()  # the next watch gets the line first
        api.create_event(event_object(object_name="clean-watched"))
        sink = router.sinks["mem"]
        assert isinstance(sink, MemorySink)
        want = {"clean-listed", "clean-watched", "deep-listed", "deep-watched"}
        await until(lambda: want <= {o.record["involved_object"]["name"] for o in sink.received})
        assert not router.stopped.is_set()
        assert router.metrics.source_repaired.labels("invalid_unicode")._value.get() == 2
        assert router.metrics.source_dropped.labels("malformed")._value.get() == 0
