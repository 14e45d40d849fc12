"""A watch limited to namespaces or by a selector sees only part of the retained events: the
checkpoint entries of the others are kept (for ``UNSEEN_KEEP``), not dropped at the next list."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import eventrouter.fanout as fanout_mod
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


async def test_restarts_more_often_than_the_keep_period_still_drop_the_entries_of_deleted_events(
    api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first-unseen times lived in memory only: every start noted them again at its own time, so
    a router restarted more often than the keep period (rollouts, OOM kills, failovers) never dropped
    the entries of deleted events, and its checkpoint grew without bound. They are kept in the data
    dir, in wall-clock seconds, and a time whose entry is gone is not kept."""
    keep = 4.0  # stands for UNSEEN_KEEP = 2 h
    monkeypatch.setattr(fanout_mod, "UNSEEN_KEEP", keep)
    data = tmp_path / "data"
    times = data / "checkpoints" / "unseen.times"
    settings = router_settings(
        api, tmp_path, data_dir=data, watch={"field_selector": "type=Warning"}, checkpoint_prune_interval=0.1
    )
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    objs = [api.create_event(event_object(object_name=f"w{i}", type="Warning")) for i in range(5)]
    deleted = {o["metadata"]["uid"] for o in objs}
    router = Router(settings, [spec])
    async with router.running():
        await router.sinks["mem"].wait_for(5)  # type: ignore[attr-defined]
        await until(lambda: len(router.pipelines[0].checkpoint.state) == 5)
        before = time.time()
        for o in objs:  # their TTL: DELETED, which under a selector may mean "no longer selected"
            api.delete_event(o["metadata"]["namespace"], o["metadata"]["name"])
        await until(lambda: times.exists() and len(times.read_text().splitlines()) == 5)
    noted = {uid: float(t) for uid, t in (line.split() for line in times.read_text().splitlines())}
    assert noted.keys() == deleted and all(before - 1 <= t <= time.time() for t in noted.values())
    # A time of an entry no checkpoint holds any more (a scope widened, then narrowed again) goes.
    times.write_text(times.read_text() + f"no-longer-in-any-checkpoint {time.time():.0f}\n")

    # Down for the keep period (or restarted several times within it: the clock is the same).
    await asyncio.sleep(keep)
    router = Router(settings, [spec])
    async with router.running():
        # Dropped at the first prune, not one keep period after this start.
        await until(lambda: not router.pipelines[0].checkpoint.state.keys() & deleted, timeout=keep / 2)
    assert not times.exists()
