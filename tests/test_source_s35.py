"""A list page with an item too deep, judged where the item is (session 35, item 300); the credentials a
gateway in front of the API server quotes.

Item 279 made an item nested too deep for orjson cost that item, not its page, and item 293 made the
page fail whole when it is not JSON. But an item was judged alone: 1,023 or 1,024 levels deep it
parsed alone and not in its page (two levels more), and the page failed for ever; so did one too deep
with broken Unicode (orjson said Unicode, the fallback's json.loads recursed out). A stray quote in an
item too deep put the walk out of step: the Events after it went with that item as one, lost, counted
as one. And the API server's or a gateway's error answer quoting the request's Authorization header
put the bearer token in the log."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from source_helpers import count as _count
from source_helpers import list_pages as _list_pages
from source_helpers import memory_router as _router
from source_helpers import memory_sink as _mem
from source_helpers import names as _names
from source_helpers import said as _said

from eventrouter.source import list_page
from eventrouter.source.list_page import loads_page
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2VydmljZS1hY2NvdW50.SERVICE-ACCOUNT-SIGNATURE"


def _deep(depth: int, tail: bytes = b"") -> bytes:
    """An item nested ``depth`` + 1 levels (its ``{`` and ``depth`` arrays), ``tail`` after them."""
    return (
        b'{"metadata":{"uid":"deep","name":"d","namespace":"a"},"x":'
        + b"[" * depth
        + b"]" * depth
        + tail
        + b"}"
    )


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        server.bookmark_interval = 0.2
        yield server


def _twenty(api: FakeApiServer) -> None:
    for i in range(20):
        api.create_event(event_object(namespace="a", name=f"e{i:03d}", object_name=f"o{i:02d}"))


# ---- F1, F2: an item too deep where it is costs that item, on every page -----------------------------


@pytest.mark.parametrize(
    "item",
    [
        # Alone 1,023 / 1,024 levels: orjson takes it; in the page it is 1,025 / 1,026.
        pytest.param(_deep(1022), id="1023_levels"),
        pytest.param(_deep(1023), id="1024_levels"),
        # orjson says "not valid UTF-8" (it checks the whole text first), json.loads recurses out.
        pytest.param(_deep(5000, b',"m":"bad\xffbyte"'), id="too_deep_and_invalid_utf8"),
        # orjson takes the depth, the fallback's json.loads does not (~990 levels in the page).
        pytest.param(_deep(990, b',"m":"bad\xffbyte"'), id="too_deep_to_repair_invalid_utf8"),
        pytest.param(_deep(998, b',"m":"\\ud800"'), id="too_deep_to_repair_lone_surrogate"),
    ],
)
async def test_an_item_too_deep_where_it_is_in_the_page_costs_that_item_on_every_page(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, item: bytes
) -> None:
    """On every page (a proxy that keeps answering so): the page failed whole, 500 InvalidList at
    every relist, 0 of 20 delivered and the initial list never done. Now the item is counted
    malformed and logged once a page, the rest delivered."""
    _twenty(api)
    api.faults.malformed_next_list(item, count=1000)
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: len(_mem(router).received) == 20)
        pages = _list_pages(api)
        assert _names(router) == {f"o{i:02d}" for i in range(20)}
        assert _count(router, "source_dropped", "malformed") == pages
        assert _count(router, "watch_restarts", "http_500") == 0
    skipped = [r.getMessage() for r in caplog.records if "skipped a list item" in r.getMessage()]
    assert len(skipped) == pages
    assert '{"metadata":{"uid":"deep"' in skipped[0]
    if b"bad" not in item and b"ud800" not in item:
        assert "depth limit exceeded at its depth in the page (orjson takes 1024 levels)" in skipped[0]
    else:
        assert "levels, too deep to repair" in skipped[0]


async def test_a_broken_item_after_one_too_deep_for_the_fallback_is_repaired_and_the_page_taken(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An item ~1,000 levels deep in its page (orjson takes it, json.loads does not) and an Event with a
    lone surrogate escape after it: orjson stopped at the escape, the fallback's json.loads of the
    whole page recursed out on the deep item, and the walk found "every item parses alone": the page
    failed for ever. Each item is now taken from its own parse: the deep one, no Event, is counted as
    such (not refused), the broken Event repaired and delivered with the 20."""
    _twenty(api)
    broken = orjson.dumps(event_object(namespace="a", name="broken", object_name="broken", message="BROKEN"))
    broken = broken.replace(b'"BROKEN"', b'"bro\\ud800ken"', 1)
    api.faults.malformed_next_list(_deep(993), broken, count=1000)
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: len(_mem(router).received) == 21)
        pages = _list_pages(api)
        assert _names(router) == {f"o{i:02d}" for i in range(20)} | {"broken"}
        assert {o.record["message"] for o in _mem(router).received} >= {"bro\ufffdken"}
        assert _count(router, "source_repaired", "invalid_unicode") == pages
        assert _count(router, "source_dropped", "malformed") == pages  # the deep item: no Event
        assert _count(router, "watch_restarts", "http_500") == 0
    assert not _said(caplog, "skipped a list item")  # taken from the page, not refused


# ---- F3: a stray quote in an item too deep --------------------------------------------------------


async def test_a_stray_quote_in_an_item_too_deep_fails_the_page_and_loses_no_event(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``"5\\"disk"`` that lost its backslash, in an item too deep: the walk went out of step at the
    stray quote and back in step at the next escaped quote (``Pulling image \\"nginx\\"``, Event
    e012's), and the 13 Events up to it went with the deep item as one refused item: 7 of 20 delivered,
    the initial list reported done, ``malformed`` 1. The page is not JSON: it fails whole, as any
    such page, and the next list delivers all."""
    for i in range(20):
        message = 'Pulling image "nginx"' if i == 12 else "m"
        api.create_event(
            event_object(namespace="a", name=f"e{i:03d}", object_name=f"o{i:02d}", message=message)
        )
    api.faults.malformed_next_list(_deep(5000, b',"m":"5"disk"'))
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: len(_mem(router).received) == 20)
        assert _names(router) == {f"o{i:02d}" for i in range(20)}
        assert _count(router, "source_dropped", "malformed") == 0
        assert _count(router, "watch_restarts", "http_500") == 1
    refused = [r.getMessage() for r in caplog.records if "InvalidList" in r.getMessage()]
    assert len(refused) == 1 and "depth limit exceeded" in refused[0]


DEEP = 5000
_RUN = b"[" * DEEP + b"]" * DEEP
_DEEP_ITEM = b'{"deep":' + _RUN + b',"m":"Pulling image \\"nginx\\"","n":[1,{"a":"]"},"5\\"disk"]}'
_MUTANTS = b'"\\[]{},: x1-e'
_text = st.text(alphabet='ab"\\]}[{, ', max_size=8)
_item = st.dictionaries(_text, st.none() | st.booleans() | st.integers(-9, 9) | _text, max_size=4)


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    return isinstance(value, list) and any(_has_float(v) for v in value)


def _page(items: list[dict[str, Any]], deep_at: int) -> tuple[bytes, int]:
    """A page with the deep item at ``deep_at``; where its run of brackets starts."""
    texts = [json.dumps(item).encode() for item in items]
    texts.insert(deep_at, _DEEP_ITEM)
    head = b'{"kind":"EventList","metadata":{"continue":"c\\"]","resourceVersion":"7"},"items":['
    page = head + b",".join(texts) + b"]}"
    return page, page.index(_RUN)


@settings(max_examples=500, deadline=None)
@given(
    items=st.lists(_item, min_size=1, max_size=4),
    deep_at=st.integers(0, 4),
    op=st.sampled_from(["delete", "insert", "replace"]),
    where=st.integers(0, 2**32),
    char=st.sampled_from(list(_MUTANTS)),
)
# The review's find: the backslash of "5\"disk" lost; the items after it up to an escaped quote went
# with the deep item, as one refused item.
@example(items=[{"a": 'x"y'}, {"b": 1}], deep_at=0, op="delete", where=-1, char=0)
def test_one_byte_corrupted_in_or_around_an_item_too_deep_never_loses_an_item_silently(
    items: list[dict[str, Any]], deep_at: int, op: str, where: int, char: int
) -> None:
    """One byte of such a page deleted, inserted or replaced anywhere but in the deep item's brackets
    (its strings and tail too): the page is taken only if it is JSON, and then with exactly what a
    parser without a depth limit reads, the deep item refused alone; otherwise it fails whole. The
    page read with the brackets collapsed to ``[-0.0]`` (no item holds a float) is what it must be."""
    page, r0 = _page(items, min(deep_at, len(items)))
    r1 = r0 + len(_RUN)
    if where == -1:
        at = page.index(b'\\"disk') if op == "delete" else r1
    else:
        places = [
            i for i in range(len(page) + (op == "insert")) if not r0 < i < r1 and (op == "insert" or i != r0)
        ]
        at = places[where % len(places)]
    if op == "delete":
        body = page[:at] + page[at + 1 :]
    elif op == "insert":
        body = page[:at] + bytes([char]) + page[at:]
    else:
        body = page[:at] + bytes([char]) + page[at + 1 :]
    moved = {"delete": -1, "insert": 1, "replace": 0}[op] if at <= r0 else 0
    run0 = r0 + moved
    assert body[run0 : run0 + len(_RUN)] == _RUN
    try:
        got = loads_page(body)
    except orjson.JSONDecodeError:
        got = None
    try:
        direct = orjson.loads(body)  # the run inside a string: nothing too deep
    except orjson.JSONDecodeError:
        pass
    else:
        assert got is not None and got.doc == direct and not got.refused
        return
    try:
        read = orjson.loads(body[:run0] + b"[-0.0]" + body[run0 + len(_RUN) :])
    except orjson.JSONDecodeError:
        read = None
    listed = isinstance(read, dict) and isinstance(read.get("items"), list)
    if not listed:
        assert got is None, "taken, and not JSON"
        return
    assert isinstance(read, dict)
    kept = [item for item in read["items"] if not _has_float(item)]
    deep = len(read["items"]) - len(kept)
    if deep == 1 and not _has_float({k: v for k, v in read.items() if k != "items"}):
        assert got is not None, "JSON with one item too deep, and failed whole"
    if got is not None:
        assert got.doc == {**read, "items": kept}
        assert len(got.refused) == deep == 1


# ---- the grammar check that proves a refused item is one value --------------------------------------


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=' \t"\\/[]{},:01-.eE+tfnrulasNIy\x01u00', max_size=14))
def test_the_walks_grammar_check_takes_what_a_json_parser_takes(text: str) -> None:
    """``_one_value`` (a loop, any depth) says "one JSON value" exactly when json.loads does (NaN and
    Infinity as json.loads takes them; control characters refused as by orjson)."""
    try:
        json.loads(text)
        taken = True
    except ValueError:
        taken = False
    assert (list_page._one_value(text.encode()) is not None) == taken, text


# ---- F4: a gateway quoting the request's Authorization header -------------------------------------


def _no_token(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage()
        assert TOKEN[:12] not in text and TOKEN[-12:] not in text, text


@pytest.mark.parametrize("status", [401, 503])
async def test_a_list_answer_quoting_the_authorization_header_never_puts_the_token_in_the_log(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """An auth proxy's (kube-oidc-proxy, Pinniped, Teleport) Status quoting the header it refused: the
    watcher logged it at every attempt, the service account's token with it."""
    api.create_event(event_object(object_name="kept"))
    api.faults.fail_next(status, count=2, verbs=("list",), echo="Authorization")
    router = _router(api, tmp_path)
    caplog.set_level(logging.INFO)
    async with router.running():
        await until(lambda: "kept" in _names(router))
    said = _said(caplog, f"{status} ")
    assert len(said) == 2 and all("(refused Authorization: ****)" in s for s in said), said
    _no_token(caplog)


async def test_a_watch_answer_quoting_the_authorization_header_never_puts_the_token_in_the_log(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    router = _router(api, tmp_path)
    caplog.set_level(logging.INFO)
    async with router.running():
        await until(lambda: _count(router, "watch_events", "BOOKMARK") > 0)
        api.faults.fail_next(503, verbs=("watch",), echo="Authorization")
        api.disconnect_watches()
        await until(lambda: _count(router, "watch_restarts", "http_503") == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
    said = _said(caplog, "503 ")
    assert len(said) == 1 and said[0].endswith("(refused Authorization: ****)"), said
    _no_token(caplog)


async def test_the_check_of_the_store_quoting_the_authorization_header_never_logs_the_token(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The check that the store is not behind (after a broken watch) quoted a 504's message itself."""
    router = _router(api, tmp_path)
    caplog.set_level(logging.INFO)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: api.active_watches == 1)
        api.faults.fail_next(504, verbs=("list",), echo="Authorization")
        api.disconnect_watches(reset=True)  # broken: the store is checked, and the check gets the 504
        await until(lambda: _count(router, "watch_restarts", "http_504") == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
    said = _said(caplog, "504 ")
    assert len(said) == 1 and "checking that the store is not behind" in said[0], said
    assert said[0].endswith("(refused Authorization: ****)"), said
    _no_token(caplog)


async def test_a_token_cut_off_by_the_quoted_start_of_a_huge_error_page_is_hidden_too(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A page over 64 KiB is quoted by its first 300 bytes: a token they cut off is masked from its
    first characters on, as the sinks do (item 88)."""
    quote = b"<p>Authorization: Bearer "
    router = _router(api, tmp_path)
    caplog.set_level(logging.INFO)
    async with router.running():
        await until(lambda: _count(router, "watch_events", "BOOKMARK") > 0)
        at = 300 - len(quote) - 10  # the first 10 characters of the token quoted
        api.faults.error_page_next(100_000, verbs=("watch",), echo="Authorization", echo_at=at)
        api.disconnect_watches()
        await until(lambda: _count(router, "watch_restarts", "http_503") == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
    said = _said(caplog, "503 ")
    assert len(said) == 1, said
    assert said[0].endswith("<p>Authorization: **** (the first 300 bytes of a body over 64 KiB, not read on)")
    assert TOKEN[:10] not in said[0]
