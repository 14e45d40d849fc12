"""What the engine gives up (drops or dead-letters) is told to the sink (``Sink.given_up``): an alert
robot keeps occurrences pooled between digests and must forget one the metrics count as lost."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Unpack

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.metrics import Metrics
from eventrouter.record import Occurrence
from eventrouter.sink import Outcome, SinkContext, retry
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import Gate
from eventrouter.testing.pipelines import Knobs, pipeline_for
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


class Listening(MemorySink):
    """A memory sink that notes each occurrence the engine says it gave up; with ``gate`` set, each
    send waits for the gate to allow a batch."""

    def __init__(self, options: MemorySinkOptions, context: object) -> None:
        super().__init__(options, context)
        self.given: list[Occurrence] = []
        self.gate: Gate | None = None

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        if self.gate is not None:
            await self.gate.take()
        return await super().send(batch)

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        self.given.extend(occurrences)

    @property
    def given_keys(self) -> list[str]:
        return [occ.key for occ in self.given]


def _context() -> SinkContext:
    return SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))


_FAST: Knobs = {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.05}


def _pipeline(
    sink: MemorySink, metrics: Metrics, spool: Spool | None = None, **opts: Unpack[Knobs]
) -> Pipeline:
    return pipeline_for("mem", sink, metrics, None, spool=spool, **(_FAST | opts))


def _dropped(metrics: Metrics, reason: str) -> float:
    return float(metrics.dropped.labels("mem", reason)._value.get())


def _set_aside(p: Pipeline, n: int) -> Callable[[], bool]:
    return lambda: len(p._deferred) == n


def _keys(occs: Sequence[Occurrence]) -> list[str]:
    return [occ.key for occ in occs]


async def _deliver(p: Pipeline) -> None:
    """Run the pipeline until what it holds is delivered, then close it."""
    task = asyncio.create_task(p.run())
    await p.wait_idle(10)
    p.close()
    await asyncio.wait_for(task, 10)


async def test_occurrences_dropped_from_a_full_memory_queue_are_told_to_the_sink(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow sink holds a batch; what overflows the memory queue meanwhile is dropped, counted
    `queue_full`, logged, and told to the sink; the rest is delivered."""
    sink = Listening(MemorySinkOptions.model_validate({}), _context())
    sink.gate = Gate()
    p = _pipeline(sink, metrics, queue_max_events=4, batch_max_events=4)
    occs = [make_occurrence() for _ in range(10)]
    task = asyncio.create_task(p.run())
    for occ in occs[:4]:
        p.offer(occ)
    await until(lambda: len(p._in_flight) == 4)  # the first batch waits at the gate
    for occ in occs[4:]:
        p.offer(occ)  # 4 fit in the queue: 4 and 5, the oldest, are dropped
    assert _dropped(metrics, "queue_full") == 2
    assert sink.given_keys == _keys(occs[4:6])
    assert occs[4].key in caplog.text and "memory queue full" in caplog.text
    await sink.gate.allow(10)
    await p.wait_idle(10)
    assert sink.keys == [(o.uid, o.number) for o in occs[:4] + occs[6:]]
    assert sink.given_keys == _keys(occs[4:6])  # nothing delivered was told as given up
    p.close()
    await asyncio.wait_for(task, 10)


async def test_an_occurrence_set_aside_and_dropped_from_a_full_memory_queue_is_told_to_the_sink(
    metrics: Metrics,
) -> None:
    """A robot holds alerts for its digest: the engine sets them aside (in memory, against the
    queue's bound). A new one finds memory full of them: the first due is dropped, counted
    `queue_full`, and the sink told, so that it does not page it with the next digest."""
    sink = Listening(MemorySinkOptions.model_validate({}), _context())
    held = [make_occurrence(object_name=f"held-{i}") for i in range(3)]
    sink.decide = lambda occ: retry("held for a digest", retry_after=300, held=True, defer=True)
    p = _pipeline(sink, metrics, queue_max_events=3)
    task = asyncio.create_task(p.run())
    for n, occ in enumerate(held, 1):
        p.offer(occ)
        await until(_set_aside(p, n))  # one by one: due in that order
    fresh = make_occurrence(object_name="fresh")
    sink.decide = None  # everything accepted from now on
    p.offer(fresh)  # memory holds 3 set-aside items, its bound: the first due goes
    assert _dropped(metrics, "queue_full") == 1
    assert sink.given_keys == [held[0].key]
    assert held[0].uid not in p._held  # let go, not waited for
    await sink.wait_for(1)
    assert sink.keys == [(fresh.uid, fresh.number)]
    p.close()  # set-aside items are offered once more at close: accepted now
    await asyncio.wait_for(task, 10)
    assert sorted(sink.keys) == sorted((o.uid, o.number) for o in [*held[1:], fresh])
    assert sink.given_keys == [held[0].key]


async def test_occurrences_dropped_behind_a_spool_that_cannot_be_written_are_told_to_the_sink(
    metrics: Metrics, tmp_path: Path
) -> None:
    """The spool holds older occurrences and its disk cannot be written: newer ones wait behind it in
    memory, bounded; the oldest of them is dropped, counted `spool_error`, and told to the sink."""
    sink = Listening(MemorySinkOptions.model_validate({}), _context())
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000, cluster="test")
    p = _pipeline(sink, metrics, spool=spool, queue_max_events=2)
    occs = [make_occurrence() for _ in range(6)]
    for occ in occs[:3]:
        p.offer(occ)  # two in memory, the third spilled
    assert len(spool) == 1
    spool.close()
    shutil.rmtree(tmp_path / "spool")  # the disk is gone (as full or read-only would be)
    for occ in occs[3:]:
        p.offer(occ)  # behind the spool, in memory: at most 2 there, the oldest dropped
    assert list(p._overflow) == occs[4:]
    assert _dropped(metrics, "spool_error") == 1
    assert sink.given_keys == [occs[3].key]


async def test_records_the_spool_drops_over_its_bound_are_told_to_the_sink(
    metrics: Metrics, tmp_path: Path
) -> None:
    """A sink down long enough for the disk spool to reach its bound: the oldest records are dropped,
    counted `spool_full` and logged by key as before, and now told to the sink as well, rebuilt from
    the spool (an owed one among them not taken for owed). Everything offered is then delivered or
    was told as given up, never both."""
    sink = Listening(MemorySinkOptions.model_validate({}), _context())
    spool = Spool(tmp_path / "spool", max_bytes=100_000, segment_bytes=20_000, cluster="test")
    owed = make_occurrence(object_name="owed", message="x" * 2000)
    spool.extend([owed], {(owed.uid, owed.number)})  # kept at a stop, owed: the oldest record
    p = _pipeline(sink, metrics, spool=spool, queue_max_events=10)
    occs = [make_occurrence(message="x" * 2000) for _ in range(200)]
    for occ in occs:
        p.offer(occ)
    dropped = _dropped(metrics, "spool_full")
    assert dropped > 0 and spool.bytes <= 100_000
    # With a record spooled, every offer goes to the spool behind it: the oldest dropped, in order.
    assert sink.given_keys == _keys([owed, *occs])[: int(dropped)]
    by_key = {occ.key: occ for occ in [owed, *occs]}
    assert all(given.record == by_key[given.key].record for given in sink.given)
    assert not spool.dropped_occurrences and not spool.owed
    await _deliver(p)
    assert not p._owed
    delivered = [f"{uid}/{number}" for uid, number in sink.keys]
    assert len(delivered) + len(sink.given) == 201
    assert not set(delivered) & set(sink.given_keys)


async def test_a_sink_that_does_not_listen_costs_the_spool_no_rebuilt_records(
    metrics: Metrics, tmp_path: Path
) -> None:
    """Rebuilding a dropped record (~8 µs) costs more than twice reading its key: done only for a
    sink that overrides ``given_up``."""
    sink = MemorySink(MemorySinkOptions.model_validate({}), _context())
    spool = Spool(tmp_path / "spool", max_bytes=100_000, segment_bytes=20_000, cluster="test")
    p = _pipeline(sink, metrics, spool=spool, queue_max_events=10)
    assert not spool.decode_dropped
    for _ in range(200):
        p.offer(make_occurrence(message="x" * 2000))
    assert _dropped(metrics, "spool_full") > 0 and not spool.dropped_occurrences


async def test_records_the_spool_drops_over_its_bound_at_a_stop_are_told_to_the_sink(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop while the sink is down: what memory held goes into the spool, and past its bound the
    oldest are dropped, counted `spool_full` and logged by the router's stop; told to the sink too."""
    async with FakeApiServer(token="t") as api:
        events = [event_object(object_name=f"o{i}", message="m" * 1000) for i in range(30)]
        for obj in events:
            api.create_event(obj)
        opts = {"name": "mem", "fail": True, "spool_max_bytes": 10_000, "batch_max_events": 5}
        settings = router_settings(api, tmp_path, data_dir=tmp_path / "data", shutdown_timeout=0.3)
        router = Router(settings, [spec_for_class(Listening, opts, type_="memory")])
        async with router.running():
            await until(lambda: router.pipelines[0].depth == 30)  # all in memory: nothing spooled yet
            sink = router.sinks["mem"]
            assert isinstance(sink, Listening) and not router.pipelines[0].spool
    at_stop = "sink %s: spool full at shutdown, dropped %s"
    logged = [str(r.args[1]) for r in caplog.records if r.msg == at_stop and isinstance(r.args, tuple)]
    assert logged and router.metrics.dropped.labels("mem", "spool_full")._value.get() == len(logged)
    assert sink.given_keys == logged


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()
