"""An occurrence delivered by the watch and again by a relist (a SIGKILL before the checkpoint, the
ConfigMap mode's next leader) has the same ``raw``: kube-apiserver writes ``kind``/``apiVersion`` on
watch objects but not on list items, and the router kept each as it came, so the two records
differed and Loki, with ``include_raw``, kept both copies. Against the project's API test server, which
answers as kube-apiserver does (checked here too), and its Loki-compatible receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from eventrouter.app import Router
from eventrouter.config import SinkSpec, spec_for_class
from eventrouter.record import Occurrence, list_item
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiSink


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _memory(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


async def _watched_then_relisted(
    api: FakeApiServer, tmp_path: Path, spec: SinkSpec, watch: dict[str, Any]
) -> tuple[Router, Router]:
    """Run 1 watches while the event is created; run 2, with a fresh data dir (its checkpoint lacks
    that delivery), relists it. Each run ends once its sink has taken it."""
    first = Router(router_settings(api, tmp_path, data_dir=tmp_path / "one", watch=watch), [spec])
    async with first.running():
        await until(lambda: first.ready()[0])  # the initial list is done: the watch delivers it
        api.create_event(event_object(object_name="web-0", count=3))
        await until(lambda: _delivered(first, spec.name) == 1)
    second = Router(router_settings(api, tmp_path, data_dir=tmp_path / "two", watch=watch), [spec])
    async with second.running():
        await until(lambda: _delivered(second, spec.name) == 1)
    return first, second


def _delivered(router: Router, sink: str) -> float:
    value = router.metrics.registry.get_sample_value("eventrouter_sink_delivered_total", {"sink": sink})
    return value or 0.0


@pytest.mark.parametrize("relist_sorted", [False, True], ids=["relist", "sorted-relist"])
async def test_a_relisted_occurrence_has_the_watched_ones_raw_bytes(
    api: FakeApiServer, tmp_path: Path, relist_sorted: bool
) -> None:
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    first, second = await _watched_then_relisted(api, tmp_path, spec, {"relist_sorted": relist_sorted})
    watched: list[Occurrence] = _memory(first).received
    relisted: list[Occurrence] = _memory(second).received
    assert len(watched) == len(relisted) == 1
    assert (watched[0].uid, watched[0].number) == (relisted[0].uid, relisted[0].number)
    assert relisted[0].raw_json == watched[0].raw_json
    assert relisted[0].raw_json.startswith(b'{"kind":"Event","apiVersion":"v1","metadata":')
    assert relisted[0].encode(include_raw=True) == watched[0].encode(include_raw=True)


async def test_loki_with_include_raw_keeps_one_copy_of_a_relisted_occurrence(
    api: FakeApiServer, tmp_path: Path
) -> None:
    async with LokiReceiver() as loki:
        options = {"name": "loki", "url": loki.url, "batch_max_wait": 0.02, "include_raw": True}
        spec = spec_for_class(LokiSink, options, type_="loki")
        await _watched_then_relisted(api, tmp_path, spec, {})
        # Both runs pushed it (Loki takes an identical second entry without storing it again).
        assert [push.status // 100 for push in loki.pushes] == [2, 2]
        queried = [line for stream in loki.query_range() for _, line, _ in stream.values]
    assert len(queried) == 1
    raw = orjson.loads(queried[0])["raw"]
    assert (raw["kind"], raw["apiVersion"]) == ("Event", "v1")


async def test_a_list_item_given_the_lists_kind_is_the_watch_objects_bytes(api: FakeApiServer) -> None:
    """The test API server answers as kube-apiserver does (tests/test_apiserver.py: items omit kind),
    and ``list_item`` makes an item the very bytes the watch sends of it."""
    api.create_event(event_object(object_name="web-0"))
    async with aiohttp.ClientSession(api.url, headers={"Authorization": "Bearer secret-token"}) as http:
        async with http.get("/api/v1/events") as resp:
            listing = orjson.loads(await resp.read())
        async with http.get("/api/v1/events", params={"watch": "1", "resourceVersion": "0"}) as resp:
            watched = orjson.loads(await resp.content.readline())["object"]
    (item,) = listing["items"]
    assert "kind" not in item and "apiVersion" not in item
    assert orjson.dumps(list_item(item, listing)) == orjson.dumps(watched)
    events_v1 = {"kind": "EventList", "apiVersion": "events.k8s.io/v1", "items": []}
    assert list(list_item({"metadata": {}}, events_v1)) == ["kind", "apiVersion", "metadata"]
    assert list_item({"metadata": {}}, events_v1)["kind"] == "Event"
    assert list_item({"metadata": {}}, {"items": []}) == {"metadata": {}}  # not an API list: as it is
    assert list_item({"metadata": {}}, {"items": []}, "v1")["apiVersion"] == "v1"


def test_a_replayed_api_list_gives_the_recorded_watchs_objects() -> None:
    """`eventrouter replay` of a raw API list (`kubectl get --raw`: items without kind/apiVersion, as
    kube-apiserver writes them) reads its items as the live relist does: the recorded 1.24 watch's
    very bytes for each object."""
    import io

    from eventrouter.source.recording import read_recording

    data = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"
    with (data / "watch-core-v1.jsonl").open("rb") as stream:
        watched = [obj for kind, obj in read_recording(stream) if kind in ("ADDED", "MODIFIED")]
    items = [{k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for obj in watched]
    listing = orjson.dumps({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})
    replayed = [obj for kind, obj in read_recording(io.BytesIO(listing)) if kind == "LIST"]
    assert [orjson.dumps(obj) for obj in replayed] == [orjson.dumps(obj) for obj in watched]
