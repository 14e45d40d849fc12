"""A watch limited to namespaces or by a selector sees only part of the retained events: the
checkpoint entries of the others are kept (for ``UNSEEN_KEEP``), not dropped at the next list."""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.fanout import Fanout
from eventrouter.metrics import Metrics
from eventrouter.options import PipelineOptions
from eventrouter.sink import SinkContext
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t0ken") as server:
        server.bookmark_interval = 0.2
        yield server


async def _run(api: FakeApiServer, tmp_path: Path, **kw: Any) -> collections.Counter[tuple[str, int]]:
    """One clean run on the same data dir until its lists are done and its sink idle."""
    settings = router_settings(
        api, tmp_path, data_dir=tmp_path / "data", namespaces=kw.pop("namespaces", []), watch=kw
    )
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    router = Router(settings, [spec])
    async with router.running():
        await until(lambda: router.ready()[0])
        await router.pipelines[0].wait_idle(10)
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return collections.Counter(sink.keys)


async def test_a_scope_narrowed_then_widened_again_delivers_nothing_twice(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A Helm upgrade that narrows `namespaces` or adds a field selector, then a rollback: the narrow
    run's first list dropped every entry it did not see, and the wide run sent them all again."""
    for i in range(5):
        api.create_event(event_object(namespace="a", object_name=f"a{i}"))
        api.create_event(event_object(namespace="b", object_name=f"b{i}", type="Normal"))
    total = await _run(api, tmp_path)
    assert len(total) == 10
    total += await _run(api, tmp_path, namespaces=["a"])
    total += await _run(api, tmp_path)
    total += await _run(api, tmp_path, field_selector="type=Warning")
    total += await _run(api, tmp_path)
    assert [key for key, n in total.items() if n > 1] == []
    assert len(total) == 10


async def test_an_event_leaving_the_selector_and_coming_back_is_not_sent_again(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A field the selector reads changes: the API server sends DELETED for a live object, then ADDED
    when it matches again. The DELETED cleared its checkpoint entry, and the ADDED sent it again."""
    obj = api.create_event(event_object(object_name="web", type="Warning"))
    settings = router_settings(api, tmp_path, watch={"field_selector": "type=Warning"})
    router = Router(
        settings, [spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")]
    )
    async with router.running():
        sink = router.sinks["mem"]
        assert isinstance(sink, MemorySink)
        await sink.wait_for(1)
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        tracker = router.watchers[0].tracker
        api.update_event(ns, name, lambda e: e.update(type="Normal"))  # leaves the selector: DELETED
        await until(lambda: obj["metadata"]["uid"] not in tracker.seen)
        api.update_event(ns, name, lambda e: e.update(type="Warning"))  # back: ADDED, the same count
        await until(lambda: obj["metadata"]["uid"] in tracker.seen)
        await router.pipelines[0].wait_idle(5)
    assert sink.keys == [(obj["metadata"]["uid"], 1)]


def test_entries_not_seen_go_after_the_keep_period_and_those_seen_again_stay() -> None:
    pipelines = [
        Pipeline(
            name=name,
            sink=MemorySink(
                MemorySinkOptions.model_validate({}),
                SinkContext(name=name, cluster="t", data_dir=None, logger=logging.getLogger(name)),
            ),
            options=PipelineOptions.model_validate({}),
            predicate=None,
            checkpoint=SinkCheckpoint(MemoryCheckpoint()),
            deadletter=DeadLetter(None, sink=name),
            metrics=Metrics(),
        )
        for name in ("one", "two")
    ]
    for p in pipelines:
        p.checkpoint.ack({"gone": 3, "back": 2, "live": 1})
    fanout = Fanout(pipelines, scoped=True)
    fanout.prune({"live"})
    assert all(p.checkpoint.accepted("gone") == 3 for p in pipelines)  # kept for now
    fanout.unseen_keep = 0.0
    fanout.sweep({"live", "back"})
    assert [p.checkpoint.state for p in pipelines] == [{"back": 2, "live": 1}] * 2
