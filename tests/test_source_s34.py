"""What a broken proxy or gateway in front of the API server can answer (session 34, item 279).

A list item nested deeper than the parser takes failed its page whole, and the relist failed on it for
ever: nothing of the cluster was delivered. An error answer's body was read whole: a 300 MB error page
took the router past its memory limit at every watch open."""

from __future__ import annotations

import asyncio
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from source_helpers import list_pages as _list_pages
from source_helpers import memory_router as _router
from source_helpers import memory_sink as _mem
from source_helpers import names as _names

from eventrouter.app import Router
from eventrouter.source import kube, list_page
from eventrouter.source.list_page import loads_page
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

DEEP = 5000  # orjson takes 1,024 levels, json.loads ~1,000


def _deep(depth: int = DEEP) -> bytes:
    return b'{"metadata":{"uid":"deep","name":"d","namespace":"a"},"x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


def _dropped(router: Router, reason: str) -> float:
    value: float = router.metrics.source_dropped.labels(reason)._value.get()
    return value


# ---- F1: one item too deep to parse costs that item, not the page ----------------------------------


async def test_an_item_too_deep_to_parse_is_counted_and_the_rest_of_every_page_is_listed(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """First on every page (a proxy that keeps answering so): the initial list never completed, 0 of
    20 delivered, a WARNING "500 InvalidList" per attempt. A broken string in another item of the same
    page is still repaired, item by item."""
    for i in range(20):
        api.create_event(event_object(namespace="a", name=f"e{i:03d}", object_name=f"o{i}"))
    broken = orjson.dumps(event_object(namespace="a", name="broken", object_name="broken", message="BROKEN"))
    broken = broken.replace(b'"BROKEN"', b'"bro\\ud800ken"', 1)
    api.faults.malformed_next_list(_deep(), broken, count=1000)
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: len(_mem(router).received) == 21)
        pages = _list_pages(api)
        assert pages == 2  # 16 items, then the 4 left (FIRST_PAGE)
        assert _names(router) == {f"o{i}" for i in range(20)} | {"broken"}
        assert {o.record["message"] for o in _mem(router).received} >= {"bro\ufffdken"}
        assert _dropped(router, "malformed") == pages
        assert router.metrics.source_repaired.labels("invalid_unicode")._value.get() == pages
        assert router.metrics.watch_restarts.labels("http_500")._value.get() == 0
    skipped = [r.getMessage() for r in caplog.records if "skipped a list item" in r.getMessage()]
    assert len(skipped) == pages
    assert "from all namespaces that cannot be parsed (depth limit exceeded" in skipped[0]
    assert '{"metadata":{"uid":"deep"' in skipped[0]


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(_deep(1025), id="just_too_deep"),
    ],
)
async def test_any_item_the_parser_refuses_in_a_page_that_is_json_around_it_costs_that_item(
    api: FakeApiServer, tmp_path: Path, item: bytes
) -> None:
    """An item nested deeper than orjson parses, in a page that is JSON, costs that item only."""
    api.create_event(event_object(object_name="kept"))
    api.faults.malformed_next_list(item)
    router = _router(api, tmp_path)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: "kept" in _names(router))
        assert _dropped(router, "malformed") == 1
        assert router.metrics.watch_restarts.labels("http_500")._value.get() == 0


@pytest.mark.parametrize(
    "item",
    [
        b'{"a":',
        b'"a string that never ends',
        _deep() + b"}",
        b'{"a":1} {"b":2}',
        b"<html>",
        b'{"metadata":{"uid":"n"},"count":NaN}',
    ],
    ids=["unbalanced", "unterminated_string", "deep_then_unbalanced", "no_comma", "html", "nan"],
)
async def test_a_page_whose_structure_is_not_json_still_fails_whole_with_the_parsers_error(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, item: bytes
) -> None:
    """Nothing is taken from a page that is not JSON around its items: refused as before (a 500
    InvalidList quoting orjson's error), and listed again."""
    api.create_event(event_object(object_name="kept"))
    page = b'{"kind":"EventList","apiVersion":"v1","metadata":{},"items":[' + item + b',{"a":1}]}'
    with pytest.raises(orjson.JSONDecodeError) as direct:
        orjson.loads(page)
    api.faults.malformed_next_list(item)
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: "kept" in _names(router))
        assert router.metrics.watch_restarts.labels("http_500")._value.get() == 1
        assert _dropped(router, "malformed") == 0
    refused = [r.getMessage() for r in caplog.records if "InvalidList" in r.getMessage()]
    assert len(refused) == 1
    assert "500 InvalidList: list answer is not an EventList: " in refused[0]
    assert direct.value.msg in refused[0]  # orjson's own error (its column is the served page's)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html><body>502 Bad Gateway</body></html>", id="html"),
        pytest.param(b'{"kind":"EventList","items":[' + _deep() + b",", id="cut_short"),
        pytest.param(b"[" + _deep() + b"]", id="not_an_object"),
        pytest.param(b'{"items":[' + _deep() + b"]} trailing", id="trailing"),
        pytest.param(b'{"items":[' + _deep() + b'],"metadata":}', id="no_value"),
        pytest.param(b'{"items" [' + _deep() + b"]}", id="no_colon"),
        pytest.param(b"{items:[" + _deep() + b"]}", id="bare_key"),
        # Item 293: a scalar holding a quote or a bracket made the walk's items and the array's end
        # disagree. Taken, the Events after it (or the metadata after items, its continue token with
        # it: the relist ended there) were left out, neither delivered nor counted.
        pytest.param(b'{"items":[' + _deep() + b',x"]",{"a":1}]}', id="quote_in_a_scalar"),
        pytest.param(
            b'{"items":[' + _deep() + b',x"],"metadata":{"continue":"c"},"z":"]}', id="continue_swallowed"
        ),
        pytest.param(b'{"items":[' + _deep() + b',e[[[1]]],{"a":1},{"b":2}]}', id="letter_before_bracket"),
    ],
)
def test_a_body_that_is_not_json_around_its_items_is_refused_with_orjsons_own_error(body: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError) as caught:
        loads_page(body)
    with pytest.raises(orjson.JSONDecodeError) as direct:
        orjson.loads(body)
    assert str(caught.value) == str(direct.value)


_item = st.dictionaries(
    st.text(max_size=5),
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    max_size=4,
)


@given(
    items=st.lists(st.tuples(_item, st.booleans()), max_size=8),
    indent=st.sampled_from([None, 1]),
)
def test_a_page_read_item_by_item_has_every_item_that_parses_in_order(
    items: list[tuple[dict[str, Any], bool]], indent: int | None
) -> None:
    """Any page with items too deep among others, compact or indented as a proxy may re-encode it."""
    import json

    deep = "[" * DEEP + "]" * DEEP
    texts = [deep if too_deep else json.dumps(item, indent=indent) for item, too_deep in items]
    page = json.dumps(
        {"kind": "EventList", "metadata": {"resourceVersion": "7"}, "items": ["__I__"]}, indent=indent
    )
    body = page.replace('"__I__"', ", ".join(texts)).encode()
    got = loads_page(body)
    assert got.doc["items"] == [item for item, too_deep in items if not too_deep]
    assert got.doc["metadata"] == {"resourceVersion": "7"} and got.doc["kind"] == "EventList"
    assert len(got.refused) == sum(too_deep for _, too_deep in items)
    assert not got.broken


# ---- item 293: the walk finds the refused items; orjson reads the page without them ----------------


async def test_a_page_the_walk_misreads_fails_whole_and_is_listed_again(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A quote in a scalar after an item too deep (a page that is not JSON): the walk took it, 0 of
    20 Events were delivered and none counted, and the initial list said done. It now fails whole,
    loudly, as before item 279, and the next list (the proxy answering well again) delivers all."""
    for i in range(20):
        api.create_event(event_object(namespace="a", name=f"e{i:03d}", object_name=f"o{i}"))
    api.faults.malformed_next_list(_deep(), b'x"]"', count=2)
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: len(_mem(router).received) == 20)
        assert _names(router) == {f"o{i}" for i in range(20)}
        assert router.metrics.watch_restarts.labels("http_500")._value.get() == 2
        assert _dropped(router, "malformed") == 0
    refused = [r.getMessage() for r in caplog.records if "InvalidList" in r.getMessage()]
    assert len(refused) == 2 and "depth limit exceeded" in refused[0]


def test_metadata_after_the_items_is_orjsons_own_with_its_continue_token() -> None:
    """Members in any order (a re-encoding proxy's): the continue token is read by orjson itself."""
    body = (
        b'{"kind":"EventList","items":[{"a":"]"},' + _deep() + b',{"b":"}"}],'
        b'"metadata":{"continue":"NEXT\\"]}","resourceVersion":"9"}}'
    )
    page = loads_page(body)
    assert page.doc == {
        "kind": "EventList",
        "items": [{"a": "]"}, {"b": "}"}],
        "metadata": {"continue": 'NEXT"]}', "resourceVersion": "9"},
    }
    assert [(r[-2][:13], r[-1].split(":")[0]) for r in page.refused] == [  # its quote, and why
        (b'{"metadata":{', "depth limit exceeded")
    ]


_DEEP_ITEM = b"[" * DEEP + b"]" * DEEP  # deeper than json.loads goes, under hypothesis too
_MUTANTS = b'"[]{},: \\x1-e'
_ANY = object()  # an item the corrupted byte fell in or next to: read as it may be


@dataclass
class _Sent:
    page: bytes
    spans: list[tuple[int, int]]  # each item's place, the deep one's included
    zones: list[tuple[int, int]]  # each item with the separators around it
    deep_at: int
    doc: dict[str, Any]  # the page as a JSON parser reads it, the deep item left out


def _fuzz_page(items: list[dict[str, Any]], deep_at: int, metadata_last: bool, indent: int | None) -> _Sent:
    """A page (members in either order) with an item too deep at ``deep_at``."""
    texts = [json.dumps(item, indent=indent, ensure_ascii=False).encode() for item in items]
    texts.insert(deep_at, _DEEP_ITEM)
    meta = {"continue": 'c"\\', "resourceVersion": "7"}
    ws = b"\n " if indent else b""
    kind, metadata = b'"kind":"EventList"', b'"metadata":' + orjson.dumps(meta)
    page = bytearray(
        b"{" + ws + kind + b"," + ws + (b"" if metadata_last else metadata + b"," + ws) + b'"items":['
    )
    edges, spans = [len(page) - 1], []
    for i, text in enumerate(texts):
        page += (b"," if i else b"") + ws
        spans.append((len(page), len(page) + len(text)))
        page += text
    page += ws + b"]"
    edges += [s for s, _ in spans[1:]] + [len(page) - 1]
    page += (b"," + ws + metadata if metadata_last else b"") + ws + b"}"
    zones = [(edges[i] if i == 0 else spans[i - 1][1], edges[i + 1]) for i in range(len(spans))]
    return _Sent(bytes(page), spans, zones, deep_at, {"kind": "EventList", "metadata": meta, "items": items})


def _mutate(sent: _Sent, op: str, where: int, char: int) -> tuple[bytes, int]:
    """The page with one byte deleted, inserted (before ``at``) or replaced, never in the deep item;
    and ``at``. ``where`` -1: just before the deep item."""
    page, (d0, d1) = sent.page, sent.spans[sent.deep_at]
    if where == -1:
        at = d0
    else:
        inside = range(d0 + 1, d1) if op == "insert" else range(d0, d1)
        places = [i for i in range(len(page) + (op == "insert")) if i not in inside]
        at = places[where % len(places)]
    if op == "delete":
        return page[:at] + page[at + 1 :], at
    if op == "insert":
        return page[:at] + bytes([char]) + page[at:], at
    return page[:at] + bytes([char]) + page[at + 1 :], at


@settings(max_examples=400, deadline=None)
@given(
    items=st.lists(_item, min_size=1, max_size=5),
    deep_at=st.integers(0, 5),
    metadata_last=st.booleans(),
    indent=st.sampled_from([None, 1]),
    op=st.sampled_from(["delete", "insert", "replace"]),
    where=st.integers(0, 2**32),
    char=st.sampled_from(list(_MUTANTS)),
)
# The review's find: a letter before an item's bracket; taken, the Events after it were left out.
@example(
    items=[{"a": 1}, {"b": 2}],
    deep_at=0,
    metadata_last=False,
    indent=None,
    op="insert",
    where=-1,
    char=ord("e"),
)
def test_a_corrupted_page_never_loses_an_item_silently(
    items: list[dict[str, Any]],
    deep_at: int,
    metadata_last: bool,
    indent: int | None,
    op: str,
    where: int,
    char: int,
) -> None:
    """One byte of a page with an item too deep deleted, inserted or replaced (outside that item):
    the page fails whole (orjson's error), or it is taken with exactly what a JSON parser reads in it
    but the refused items. Still JSON but for the deep item: orjson's own parse of it, one refused.
    Not JSON: every item not in a refused one is there, as it was (one the byte fell in or next to
    may read otherwise), in order, with the rest of the page (``metadata``, its continue token) as it
    was. An item corrupted so that where it ends cannot be told fails the page whole (item 300: each
    refused item must be exactly one JSON value), to be listed again."""
    sent = _fuzz_page(items, min(deep_at, len(items)), metadata_last, indent)
    body, at = _mutate(sent, op, where, char)
    try:
        got = loads_page(body)
    except orjson.JSONDecodeError:
        return  # failed whole, loudly, as a page that is not JSON
    moved = {"delete": -1, "insert": 1, "replace": 0}[op]
    d0, d1 = sent.spans[sent.deep_at]
    if at < d0 or (op == "insert" and at == d0):
        d0, d1 = d0 + moved, d1 + moved
    try:
        read = orjson.loads(body[:d0] + b"null" + body[d1:])
    except orjson.JSONDecodeError:
        read = None
    if read is not None:
        read["items"] = [item for item in read["items"] if item is not None]
        assert got.doc == read
        assert len(got.refused) == 1
        return

    def sent_place(q: int) -> int:  # a place in the corrupted page, in the page sent
        return q if q < at else q - moved if q > at or op != "insert" else q

    refused = [(sent_place(r.start), sent_place(r.end)) for r in got.refused]
    assert {k: v for k, v in got.doc.items() if k != "items"} == {
        k: v for k, v in sent.doc.items() if k != "items"
    }
    d0, d1 = sent.spans[sent.deep_at]
    assert any(s <= d0 and d1 <= e for s, e in refused)  # the deep item is refused
    expected: list[Any] = []
    real = iter(sent.doc["items"])
    for i, ((s, e), (zs, ze)) in enumerate(zip(sent.spans, sent.zones, strict=True)):
        if i == sent.deep_at:
            continue
        item = next(real)
        if any(rs < e and s < re for rs, re in refused):
            continue  # in a refused item: counted
        expected.append(_ANY if zs <= at <= ze else item)
    assert len(got.doc["items"]) == len(expected), (got.doc["items"], expected)
    assert all(want is _ANY or have == want for have, want in zip(got.doc["items"], expected, strict=True))


# ---- item 293: the page read again off the event loop ---------------------------------------------


def _small_items_page(items: int) -> bytearray:
    return bytearray(b'{"kind":"EventList","items":[' + _deep() + b"," + b"{}," * (items - 1) + b"{}]}")


async def test_a_page_read_again_leaves_the_event_loop_its_turns() -> None:
    """What follows orjson's refusal (the Unicode fallback's json.loads, the walk, the second parse)
    ran on the event loop: 14-29 s for a 16 MiB page of small items, every sink, /healthz and
    /readyz frozen meanwhile. It runs in a thread: the loop turns before the page is read."""
    reading = asyncio.ensure_future(list_page.read_page(_small_items_page(20_000)))
    await asyncio.sleep(0)  # the read starts
    assert not reading.done()
    page = await reading
    assert len(page.doc["items"]) == 20_000 and len(page.refused) == 1


def test_a_page_of_small_items_read_again_holds_about_what_orjson_does() -> None:
    """The walk kept a tuple of two ints per item, ~1.85 times what orjson's own parse of the same
    page holds at its peak (1.2 GiB for 16 MiB of ``{}``): now only the refused items' places."""
    body = _small_items_page(300_000)
    valid = body.replace(_deep() + b",", b"", 1)
    tracemalloc.start()
    try:
        orjson.loads(valid)
        _, parsed = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        page = loads_page(body)
        _, read_again = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(page.doc["items"]) == 300_000
    assert read_again < 1.4 * parsed, (read_again, parsed)


# ---- item 293: an error answer whose body cannot be read keeps its status -------------------------


@pytest.mark.parametrize("status", [410, 401])
async def test_an_error_answer_whose_body_is_cut_off_keeps_its_status(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """A gateway cutting the body of a 410 made it a broken connection: the watch went back to its
    expired resourceVersion, never relisted; a 401 was a WARNING "broke", not an ERROR."""
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        # A watch that handled a line: ended without one, it would be relisted anyway (#104171).
        await until(lambda: router.metrics.watch_events.labels("BOOKMARK")._value.get() > 0)
        api.faults.unreadable_error_next(status, verbs=("watch",))
        api.disconnect_watches()
        await until(lambda: router.metrics.watch_restarts.labels(f"http_{status}")._value.get() == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
        assert router.metrics.watch_restarts.labels("connection")._value.get() == 0
        relisted = router.metrics.relists.labels("expired")._value.get()
        assert relisted == (1 if status == 410 else 0)
    said = [
        r
        for r in caplog.records
        if f"{status} " in r.getMessage() and "body could not be read" in r.getMessage()
    ]
    assert len(said) == 1
    assert said[0].levelno == (logging.ERROR if status == 401 else logging.WARNING)
    assert (
        said[0].getMessage().endswith(": its body could not be read: cut off after 40 bytes before its end")
    )


async def test_an_error_body_that_stalls_is_read_for_a_bounded_time(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that stops after its first bytes held the watcher for the watch's read timeout (330 s)
    a chunk, a trickling one for ever (64 KiB of them)."""
    monkeypatch.setattr(kube, "ERROR_BODY_SECONDS", 0.2, raising=False)  # 10 s in production; absent before
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.metrics.watch_events.labels("BOOKMARK")._value.get() > 0)
        api.faults.unreadable_error_next(503, stall=60, verbs=("watch",))
        api.disconnect_watches()
        await until(lambda: router.metrics.watch_restarts.labels("http_503")._value.get() == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
    said = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
    assert said and said[0].endswith(
        "503 Service Unavailable: its body could not be read: stalled after 40 bytes, no more within 0.2s"
    )


# ---- F2: an error answer is read no further than its start -----------------------------------------

PAGE = 64 * 1024 * 1024


async def test_a_huge_error_page_on_the_watch_is_quoted_from_its_start_and_not_read_on(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway's 503 with a 64 MiB page on every watch open was read whole each time (300 MB: the
    router went from 57 to 751 MiB, past its chart's 256 MiB limit)."""
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        api.faults.error_page_next(PAGE, status=503, count=2, verbs=("watch",))
        api.disconnect_watches()
        await until(lambda: len(api.faults.pages_sent) == 2)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))  # the watcher retried and goes on
        assert router.metrics.watch_restarts.labels("http_503")._value.get() == 2
    # The connection was closed after the start of the page: most of it was never sent.
    assert all(sent < PAGE // 2 for sent in api.faults.pages_sent), api.faults.pages_sent
    errors = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
    assert errors and errors[0].startswith(
        "kubernetes API error for all namespaces: 503 Service Unavailable: <html><body><h1>503 Service"
    )
    assert errors[0].endswith("(the first 300 bytes of a body over 64 KiB, not read on)")


async def test_a_huge_error_page_on_the_check_of_the_store_is_not_read_on(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The check that the store is not behind the router's resourceVersion (after a watch the server
    ended early) read every non-2xx body whole too."""
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
        await until(lambda: api.active_watches == 1)
        api.faults.error_page_next(PAGE, status=502, verbs=("list",))
        api.disconnect_watches(reset=True)  # broken: the store is checked, and the check gets the page
        await until(lambda: len(api.faults.pages_sent) == 1)
        api.create_event(event_object(object_name="after"))
        await until(lambda: "after" in _names(router))
    assert api.faults.pages_sent[0] < PAGE // 2
    errors = [r.getMessage() for r in caplog.records if "502" in r.getMessage()]
    assert errors and errors[0].startswith(
        "kubernetes API error for all namespaces: 502 Bad Gateway: checking that the store is not"
        " behind our resourceVersion: <html>"
    )
    assert errors[0].endswith("(the first 300 bytes of a body over 64 KiB, not read on)")


async def test_a_small_error_page_is_quoted_as_before(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under the bound nothing changes: the first 300 bytes of a body that is not a Status."""
    router = _router(api, tmp_path)
    caplog.set_level(logging.WARNING)
    api.faults.error_page_next(1000, status=503, verbs=("list",))
    async with router.running():
        await until(lambda: router.watchers[0].initial_list_done.is_set())
    assert api.faults.pages_sent == [1000]
    from eventrouter.testing.apiserver import ERROR_PAGE

    quoted = ERROR_PAGE[:300].decode()
    errors = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
    assert errors == [f"kubernetes API error for all namespaces: 503 Service Unavailable: {quoted}"]
