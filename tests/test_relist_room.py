"""A relist waits for a slow sink instead of dropping, whatever else fills its queue: other watchers
relisting at the same time (several --namespace values at start-up, or all of them given 410 by an
API server restart), or live traffic from before the relist (session 24 review)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.fanout import Fanout
from eventrouter.metrics import Metrics
from eventrouter.sink import SinkContext
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

QUEUE = 1000  # pages of 500: half the queue (Router.start_source)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t", watch_cache=False) as server:
        yield server


def _router(api: FakeApiServer, tmp_path: Path, **kw: Any) -> Router:
    # No --data-dir: no spool takes an overflow, the memory queue drops its oldest.
    spec = spec_for_class(
        MemorySink,
        {"name": "mem", "batch_max_wait": 0.02, "queue_size": QUEUE, "batch_max_events": 100},
        type_="memory",
    )
    return Router(router_settings(api, tmp_path, **kw), [spec])


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


def _queue_full(router: Router) -> float:
    value: float = router.metrics.dropped.labels("mem", "queue_full")._value.get()
    return value


def _retained(api: FakeApiServer, namespaces: list[str], each: int) -> set[tuple[str, int]]:
    """``each`` events retained in every namespace; their keys."""
    return {
        (api.create_event(event_object(namespace=ns, object_name=f"o{i}"))["metadata"]["uid"], 1)
        for ns in namespaces
        for i in range(each)
    }


async def _all_listed_without_drops(router: Router, want: set[tuple[str, int]]) -> None:
    """Start the source; every namespace listed, everything delivered, nothing dropped; stop."""
    await router.start_source()
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(w.initial_list_done.wait() for w in router.watchers))
        await router.pipelines[0].wait_idle(60)
        assert _queue_full(router) == 0
        assert set(_mem(router).keys) == want
    finally:
        await router.stop()


@pytest.mark.parametrize("relist_sorted", [False, True])
async def test_namespaces_relisting_together_lose_nothing_to_a_slow_sink(
    api: FakeApiServer, tmp_path: Path, relist_sorted: bool
) -> None:
    """Three namespace watchers list 1,500 retained events each at start-up into a sink slower than
    the list. Each checked the queue only between its own pages and all woke together: 2,300 of 4,500
    arrived (sorted: 3,600), the rest dropped as queue_full, never offered again."""
    namespaces = ["ns0", "ns1", "ns2"]
    want = _retained(api, namespaces, 1500)
    router = _router(api, tmp_path, namespaces=namespaces, watch={"relist_sorted": relist_sorted})
    await router.start_pipelines()
    _mem(router).delay = 0.05  # 100 per 50 ms: slower than the list
    await _all_listed_without_drops(router, want)


async def test_a_relist_waits_for_a_queue_that_live_traffic_filled_past_half(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """One watcher: live events fill the queue past half while the sink is held up, then a relist
    (410) finds 1,000 events the watch did not see. Its first page went out without a check and
    overflowed the queue."""
    router = _router(api, tmp_path)
    async with router.running():
        await router.watchers[0].initial_list_done.wait()
        pipeline = router.pipelines[0]
        sink = _mem(router)
        sink.blocked = asyncio.Event()  # working, only slow: well within its send timeout
        for i in range(700):
            api.create_event(event_object(object_name=f"live-{i}"))
        await until(lambda: pipeline.queued >= 600)  # the rest in the send it holds up
        # The watch goes quiet (a stall sees no writes) and its history is compacted meanwhile: the
        # next watch gets 410 and the relist lists the 1,000 written during the stall, first in key
        # order ("early" < "live"), so the first page holds 500 new occurrences.
        api.faults.stall_next_watch(1.0)
        api.disconnect_watches()
        await until(lambda: api.faults.pending == 0)
        for i in range(1000):
            api.create_event(event_object(object_name=f"early-{i}"))
        api.compact()
        # Someone waits for the sink's room: the relist (before its first page now; before its
        # second one on the old code, the first having overflowed the queue).
        await until(
            lambda: (
                router.metrics.relists.labels("expired")._value.get() >= 1 and not pipeline._room.is_set()
            ),
            timeout=20,
        )
        assert pipeline.queued <= 700  # the live ones only (the old code: full)
        sink.blocked.set()
        await sink.wait_for(1700, timeout=60)
        await pipeline.wait_idle(30)
        assert _queue_full(router) == 0
        assert len(set(sink.keys)) == len(sink.keys) == 1700


async def test_an_intake_goes_on_only_after_a_pass_that_finds_room_in_every_sink() -> None:
    """Two intakes (watchers) wait for sink b, sink a being below half. Woken together by b, the
    first hands a page on, to a too; the second waited for b once more, then went on without looking
    at a again, and its page overflowed a."""
    metrics = Metrics()
    sinks = {
        name: MemorySink(
            MemorySinkOptions.model_validate({}),
            SinkContext(name=name, cluster="t", data_dir=None, logger=logging.getLogger(name)),
        )
        for name in ("a", "b")
    }
    pa, pb = (
        pipeline_for(name, sink, metrics, None, queue_max_events=QUEUE, batch_max_events=100)
        for name, sink in sinks.items()
    )
    fanout = Fanout([pa, pb])
    release = {name: asyncio.Event() for name in sinks}
    for name, sink in sinks.items():
        sink.blocked = release[name]  # working, only slow
    tasks = [asyncio.create_task(p.run()) for p in (pa, pb)]
    await until(lambda: pa.started.is_set() and pb.started.is_set())
    for p, n in ((pa, 500), (pb, 700)):
        for _ in range(n):
            p.offer(make_occurrence())
    await until(lambda: pa.queued == 400 and pb.queued == 600)  # a batch of 100 in each send

    handed_on: list[int] = []

    async def intake(i: int) -> None:  # what a watcher does with each page
        await fanout.wait_for_room()
        for _ in range(QUEUE // 2):
            fanout.publish(make_occurrence())
        handed_on.append(i)

    intakes = [asyncio.create_task(intake(i)) for i in range(2)]
    await asyncio.sleep(0)  # each intake runs to its first wait: for b (a has room)
    assert handed_on == []
    release["b"].set()
    await pb.wait_idle(10)  # b took everything handed on: one page (the old code: both)
    assert metrics.dropped.labels("a", "queue_full")._value.get() == 0
    assert len(handed_on) == 1
    release["a"].set()
    async with asyncio.timeout(10):
        await asyncio.gather(*intakes)
    await pa.wait_idle(10)
    assert metrics.dropped.labels("a", "queue_full")._value.get() == 0
    assert [len(set(sink.keys)) for sink in sinks.values()] == [1500, 1700]
    for p, task in zip((pa, pb), tasks, strict=True):
        p.close()
        await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("relist_sorted", [False, True])
async def test_a_turn_longer_than_the_room_wait_still_waits_for_a_sink_taking_batches(
    api: FakeApiServer, tmp_path: Path, relist_sorted: bool
) -> None:
    """Six watchers take turns at a sink that takes a batch every 0.1 s: each waits up to 5 pages of
    others, longer than the room wait (60 s in the product, 1 s here: 12 namespaces at ~70 docs/s).
    Timed in all, each then went on unchecked and the queue overflowed (queue_full); a sink that keeps
    taking batches is now waited for, and only one that takes nothing for the room wait is not."""
    namespaces = [f"ns{i}" for i in range(6)]
    want = _retained(api, namespaces, 600)
    router = _router(api, tmp_path, namespaces=namespaces, watch={"relist_sorted": relist_sorted})
    await router.start_pipelines()
    router.fanout.room_wait = 1.0
    _mem(router).delay = 0.1  # 100 per 0.1 s: a page of 500 in 0.5 s, a turn of six in ~3 s
    await _all_listed_without_drops(router, want)


async def test_watchers_waiting_their_turn_behind_a_sink_taking_batches_stay_healthy(
    tmp_path: Path,
) -> None:
    """A watcher waiting for room made no progress for /healthz until its page went: with waits no
    longer cut at the room wait, a turn of many namespaces behind a slow sink outlasted --stall-timeout
    and the liveness probe restarted the router mid-relist. Each batch the sink takes is progress."""
    # Bookmarks every 0.1 s: a watcher done with its list stays healthy on its quiet watch.
    async with FakeApiServer(token="t", bookmark_interval=0.1) as api:
        namespaces = [f"ns{i}" for i in range(3)]
        for ns in namespaces:
            for i in range(1000):
                api.create_event(event_object(namespace=ns, object_name=f"o{i}"))
        router = _router(
            api, tmp_path, namespaces=namespaces, stall_timeout=1.0, allow_short_stall_timeout=True
        )
        await router.start_pipelines()
        _mem(router).delay = 0.2  # a batch every 0.2 s, a page of 500 in 1 s: turns of up to 2 s
        await router.start_source()
        verdicts: list[tuple[bool, str]] = []
        try:

            def listed() -> bool:
                verdicts.append(router.healthy())
                return all(w.initial_list_done.is_set() for w in router.watchers)

            await until(listed, timeout=60, interval=0.05)
            assert [why for ok, why in verdicts if not ok] == []
            await router.pipelines[0].wait_idle(60)
            assert _queue_full(router) == 0
            assert len(set(_mem(router).keys)) == 3000
        finally:
            await router.stop()
