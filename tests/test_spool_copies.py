"""What the spool holds at open is not spooled again when the relist after a restart offers it.

Before, each restart during a sink outage added a copy of the backlog behind it: k restarts, k + 1
records per occurrence, and the byte bound then dropped the oldest records, the originals (those of
events deleted meanwhile were the only ones left)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.metrics import SINK_DROP_REASONS, Metrics
from eventrouter.options import PipelineOptions
from eventrouter.record import Occurrence, normalise
from eventrouter.sink import OK, Outcome, SinkContext, retry
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, MemorySinkOptions, event_object, make_occurrence
from eventrouter.testing.memory import Listening
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.waiting import until

TOKEN = "t0ken"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path, mode: str, *, up: bool) -> Router:
    extra: dict[str, Any] = {}
    if mode == "configmap":  # the chart's two-replica mode: the checkpoint shared, the spool local
        extra = {"checkpoint_configmap": "er-checkpoint", "checkpoint_namespace": "default"}
    settings = RouterSettings(
        cluster_name="t",
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        data_dir=tmp_path / "data",
        checkpoint_flush_interval=0.1,
        shutdown_timeout=0.3,  # the sink is down: the drain deadline passes, the rest goes to the spool
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        **extra,
    )
    opts = {
        "name": "mem",
        "batch_max_wait": 0.02,
        "queue_max_events": 10,
        "batch_max_events": 5,
        # 30 records are ~18 KB: room for them, not for a second copy of each.
        "spool_max_bytes": 28_000,
        "fail": not up,
    }
    return Router(settings, [spec_for_class(MemorySink, opts, type_="memory")])


def _value(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@contextlib.asynccontextmanager
async def _listed(router: Router) -> AsyncIterator[Pipeline]:
    """The router running (as its container does: ``run``) until its first list is complete."""
    task = asyncio.create_task(router.run())
    try:
        await until(lambda: bool(router.watchers) and router.watchers[0].initial_list_done.is_set())
        yield router.pipelines[0]
    finally:
        router.request_stop()
        await asyncio.wait_for(task, 30)


def _no_drops(router: Router) -> None:
    assert router.exit_code == 0
    for reason in SINK_DROP_REASONS:
        assert _value(router.metrics.dropped, "mem", reason) == 0, reason


@pytest.mark.parametrize("mode", ["file", "configmap"])
async def test_restarts_during_an_outage_keep_one_spooled_record_per_occurrence_and_lose_nothing(
    api: FakeApiServer, tmp_path: Path, mode: str
) -> None:
    """A sink down; 30 events; 10 of them deleted (TTL) during the outage; three clean restarts
    (rolling updates): the spool keeps one record of each occurrence, drops nothing, and once the
    sink is back each of the 30 is received once. Before: 55 and 80 records after the restarts, the
    bound dropped the oldest (spool_full), and 8 of the 10 deleted events were never delivered."""
    objs = [api.create_event(event_object(object_name=f"o{i}")) for i in range(30)]
    router = _router(api, tmp_path, mode, up=False)
    async with _listed(router) as p:
        await until(lambda: p.depth == 30)
        for o in objs[:10]:
            api.delete_event(o["metadata"]["namespace"], o["metadata"]["name"])
        await until(lambda: len(router.watchers[0].tracker.seen) == 20)
    _no_drops(router)
    for _ in range(3):
        router = _router(api, tmp_path, mode, up=False)
        async with _listed(router) as p:
            # The relist offered the 20 events still listed: each is in the spool already.
            assert (p.depth, _value(router.metrics.spilled, "mem")) == (30, 0)
            assert _value(router.metrics.skipped, "mem") == 20
            assert p.spool is not None and p.spool.held_at_open is None  # freed: the list is complete
        _no_drops(router)
    router = _router(api, tmp_path, mode, up=True)
    async with _listed(router) as p:
        await p.wait_idle(30)
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    got = collections.Counter(sink.keys)
    assert set(got) == {(o["metadata"]["uid"], 1) for o in objs} and max(got.values()) == 1


def _pipeline(spool: Spool, metrics: Metrics) -> Pipeline:
    ctx = SinkContext(name="mem", cluster="t", data_dir=None, logger=logging.getLogger("mem"))
    return Pipeline(
        name="mem",
        sink=MemorySink(MemorySinkOptions.model_validate({}), ctx),
        options=PipelineOptions.model_validate({"queue_max_events": 10}),
        predicate=None,
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(None, sink="mem"),
        metrics=metrics,
        spool=spool,
    )


def _occurrence(name: str) -> Occurrence:
    """Records of one length (``received_at`` written in full), so that the segments split evenly."""
    return normalise(event_object(object_name=name), cluster="t", received_at=1000.0)


def _spooled(directory: Path, segments: int, per_segment: int) -> list[list[Occurrence]]:
    """A spool of ``segments`` full segments, closed as a clean stop leaves it."""
    occs = [[_occurrence(f"s{s}-{i}") for i in range(per_segment)] for s in range(segments)]
    line = len(Spool.encode(occs[0][0]))
    spool = Spool(directory, max_bytes=10_000_000, segment_bytes=line * per_segment)
    for group in occs:
        spool.extend(group)
    assert len(list(directory.glob("*.seg"))) == segments
    spool.commit()
    spool.close()
    return occs


def test_a_relisted_occurrence_whose_spooled_record_was_dropped_or_lost_is_spooled_again(
    tmp_path: Path,
) -> None:
    """Only what the spool still holds is kept out: the records of a segment the bound dropped, or of
    one removed under the router, have no copy left but the relisted one."""
    directory = tmp_path / "spool"
    dropped, removed, kept = _spooled(directory, 3, 4)
    line = len(Spool.encode(dropped[0]))
    spool = Spool(directory, max_bytes=12 * line, segment_bytes=4 * line)
    p = _pipeline(spool, Metrics())
    assert spool.append(_occurrence("new-")) == [o.key for o in dropped]  # the bound
    spool.max_bytes = 10_000_000
    min(directory.glob("*.seg"), key=lambda path: int(path.stem)).unlink()  # a data dir cleaned by hand
    assert len(spool.pop(2)) == 2 and spool.unreadable == 4  # the lost segment, and two of the last
    for occ in dropped + removed + kept:
        p.offer(occ)
    # The last segment's records are still spooled (or popped, in the pipeline's hands): only their
    # copies are kept out.
    assert (_value(p.metrics.spilled, "mem"), _value(p.metrics.skipped, "mem")) == (8, 4)
    spool.close()


def test_the_keys_held_at_open_survive_a_crash_and_are_freed_once_read(tmp_path: Path) -> None:
    """Popped and not committed (a crash): read again, so held again. Once every record there was
    at open has been popped, the keys are freed (a copy offered then is a copy the checkpoint
    skips once the first is accepted)."""
    directory = tmp_path / "spool"
    groups = _spooled(directory, 2, 3)
    spool = Spool(directory, max_bytes=10_000_000)
    assert all(spool.holds(o) for g in groups for o in g) and len(spool.held_at_open or ()) == 6
    assert not spool.holds(_occurrence("other"))
    assert len(spool.pop(4)) == 4
    spool.close()  # killed: the read position was never committed
    spool = Spool(directory, max_bytes=10_000_000)
    assert all(spool.holds(o) for g in groups for o in g)
    spool.pop(5)
    assert spool.held_at_open is not None and spool.holds(groups[1][2])
    spool.pop(1)
    assert spool.held_at_open is None and not spool.holds(groups[0][0])
    spool.close()


# ---- a relisted copy of an occurrence finished while an older one of its event waits aside --------


class _RefusingDayOne(MemorySink):
    """An index per day: X/1's day is refused (``defer``) while ``refusing``; X/2's is taken."""

    def __init__(self, options: MemorySinkOptions, context: object) -> None:
        super().__init__(options, context)
        self.refusing = True
        self.decide = self._decide

    def _decide(self, occ: Occurrence) -> Outcome:
        if self.refusing and occ.record["involved_object"]["name"] == "x" and occ.number == 1:
            return retry("index of day 1 refused", defer=True)
        return OK


@pytest.mark.parametrize("lists_failing", [0, 8])
async def test_a_relisted_copy_of_an_occurrence_accepted_while_an_older_one_waits_aside_is_not_sent_again(
    api: FakeApiServer, tmp_path: Path, lists_failing: int
) -> None:
    """A clean stop kept X/1, X/2 and three others in the spool. After the restart the pipeline reads
    them before the relist comes (at once, or after 8 failed lists); the sink refuses X/1's day and
    takes X/2, whose checkpoint entry then waits below X/1. The relist offers X/2 again. Before, the
    spool's keys from before the start were freed once all was read, and nothing else knew X/2 was
    finished: the copy went aside behind X/1 and out again with it (X stored 2, 1, 2 in each run)."""
    x = api.create_event(event_object(object_name="x", name="x"))
    uid = x["metadata"]["uid"]
    assert int(api.bump("default", "x")["count"]) == 2
    others = [api.create_event(event_object(object_name=f"a-{i}", name=f"a-{i}")) for i in range(3)]
    spool = Spool(tmp_path / "data" / "spool" / "mem", max_bytes=10**9, cluster="t")
    kept = [_occurrence_of("x", uid, 1), _occurrence_of("x", uid, 2)]
    kept += [_occurrence_of(o["metadata"]["name"], o["metadata"]["uid"], 1) for o in others]
    for occ in kept:
        spool.append(occ)
    spool.commit()
    spool.close()
    if lists_failing:
        api.faults.fail_next(500, count=lists_failing, verbs=("list",))
    router = Router(
        RouterSettings(
            cluster_name="t",
            kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
            metrics_addr=None,
            data_dir=tmp_path / "data",
            watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        ),
        [
            spec_for_class(
                _RefusingDayOne,
                {
                    "name": "mem",
                    "batch_max_wait": 0.02,
                    "queue_max_events": 10,
                    "batch_max_events": 5,
                    "retry_initial_backoff": 0.05,
                    "retry_max_backoff": 0.1,
                },
                type_="memory",
            )
        ],
    )
    async with router.running():
        sink = router.sinks["mem"]
        assert isinstance(sink, _RefusingDayOne)
        p = router.pipelines[0]
        await until(lambda: router.watchers[0].initial_list_done.is_set(), timeout=30)
        await until(lambda: (uid, 2) in sink.keys, timeout=10)
        assert p.checkpoint.accepted(uid) == 0  # held below X/1, which waits aside
        sink.refusing = False
        assert p.spool is not None
        spooled = p.spool
        await until(lambda: (uid, 1) in sink.keys and not (p._queue or p._deferred or len(spooled)))
        await p.wait_idle(10)
    got = collections.Counter(sink.keys)
    assert [k for k, n in got.items() if n > 1] == []
    assert set(got) == {(occ.uid, occ.number) for occ in kept}
    assert [n for u, n in sink.keys if u == uid] == [2, 1]
    assert router.exit_code == 0


def _occurrence_of(name: str, uid: str, count: int) -> Occurrence:
    return normalise(event_object(object_name=name, name=name, uid=uid, count=count), cluster="t")


async def test_a_copy_of_an_occurrence_finished_while_an_older_one_waits_aside_is_not_sent_again() -> None:
    """X/1 refused for a cause of its own (its day's index) and set aside, X/2 taken: X's checkpoint
    entry waits below X/1, X/2 finished and not recorded. A copy of X/2 then offered (the relist
    after a restart, once the spool's keys from before the start were freed: its backlog was read
    before the relist came) is a copy. Before, it went aside behind X/1 and out again with it."""
    ctx = SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))
    sink = Listening(MemorySinkOptions.model_validate({}), ctx)
    refusing = True

    def decide(occ: Occurrence) -> Outcome:
        if refusing and occ.number == 1 and occ.record["involved_object"]["name"] == "x":
            return retry("index of day 1 refused", defer=True)
        return OK

    sink.decide = decide
    p = pipeline_for(
        "mem", sink, Metrics(), None, queue_max_events=10, batch_max_events=5, retry_initial_backoff=0.05
    )
    x1 = make_occurrence(object_name="x")
    x2 = make_occurrence(object_name="x", uid=x1.uid, count=2)
    task = asyncio.create_task(p.run())
    try:
        p.offer(x1)
        p.offer(x2)
        await until(lambda: (x2.uid, 2) in sink.keys)
        assert p.checkpoint.accepted(x1.uid) == 0 and p._done == {x1.uid: 2}
        p.offer(make_occurrence(object_name="x", uid=x1.uid, count=2))  # the copy
        other = make_occurrence(object_name="a")
        p.offer(other)
        await until(lambda: (other.uid, 1) in sink.keys)  # the copy was taken from the queue before it
        refusing = False
        await until(lambda: (x1.uid, 1) in sink.keys)
        await p.wait_idle(10)
    finally:
        p.close()
        await asyncio.wait_for(task, 10)
    assert [n for u, n in sink.keys if u == x1.uid] == [2, 1]
    assert p.checkpoint.accepted(x1.uid) == 2
