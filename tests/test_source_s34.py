"""What a broken proxy or gateway in front of the API server can answer (session 34, item 279).

A list item nested deeper than the parser takes failed its page whole, and the relist failed on it for
ever: nothing of the cluster was delivered. An error answer's body was read whole: a 300 MB error page
took the router past its memory limit at every watch open."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.source.list_page import loads_page
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

DEEP = 5000  # orjson takes 1,024 levels, json.loads ~1,000


def _deep(depth: int = DEEP) -> bytes:
    return b'{"metadata":{"uid":"deep","name":"d","namespace":"a"},"x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path) -> Router:
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    return Router(router_settings(api, tmp_path), [spec])


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


def _names(router: Router) -> set[str]:
    return {o.record["involved_object"]["name"] for o in _mem(router).received}


def _list_pages(api: FakeApiServer) -> int:
    return sum(1 for r in api.requests if r.path == "/api/v1/events" and r.query.get("watch") != "true")


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
        pytest.param(b"<html>", id="html"),
        pytest.param(b'{"metadata":{"uid":"n"},"count":NaN}', id="nan"),
        pytest.param(_deep(1025), id="just_too_deep"),
    ],
)
async def test_any_item_the_parser_refuses_in_a_page_that_is_json_around_it_costs_that_item(
    api: FakeApiServer, tmp_path: Path, item: bytes
) -> None:
    """Not only depth: an item that is not JSON at all failed its page whole as well."""
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
    [b'{"a":', b'"a string that never ends', _deep() + b"}", b'{"a":1} {"b":2}'],
    ids=["unbalanced", "unterminated_string", "deep_then_unbalanced", "no_comma"],
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
