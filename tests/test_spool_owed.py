"""Parked records owed at a stop (item 151): a clean stop that records X/2 past a parked X/1 marks
X/1 owed, so that it is delivered after the restart although the checkpoint is past it.

Before, the stop parked a second, owed copy of X/1 beside the unmarked original. Only X's
checkpoint entry marked the original as a copy, and that entry goes when the event is deleted (TTL)
or pruned: the original was then delivered after the restart, and the owed copy after it (stored
twice). Near the parked FIFO's bound each copy also dropped another parked record, counted and told
to the sink as given up."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.metrics import SINK_DROP_REASONS, Metrics
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, SinkContext, retry
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import Listening
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

Key = tuple[str, int]


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path, rule: Callable[[Occurrence], Outcome]) -> Router:
    """A router whose sink answers each occurrence by ``rule`` from its first send."""

    class Deciding(MemorySink):
        def __init__(self, options: MemorySinkOptions, context: object) -> None:
            super().__init__(options, context)
            self.decide = rule

    settings = router_settings(api, tmp_path, data_dir=tmp_path / "data")
    opts = {
        "name": "mem",
        "batch_max_wait": 0.02,
        "queue_max_events": 10,
        "batch_max_events": 5,
        "retry_initial_backoff": 0.2,
        "retry_max_backoff": 0.4,
    }
    return Router(settings, [spec_for_class(Deciding, opts, type_="memory")])


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


def _drained(p: Pipeline) -> bool:
    """Nothing left in the spool (its parked FIFO included), in memory or set aside."""
    spool = p.spool
    return (
        spool is not None
        and len(spool) == 0
        and spool.parked_count == 0
        and not (p._queue or p._deferred or p._in_flight or p._filling)
    )


def _parked_on_disk(directory: Path) -> list[tuple[str, int, bool]]:
    """The parked FIFO's unread records: (object name, number, owed)."""
    kept = Spool(directory, max_bytes=10**9, cluster="test")
    try:
        back = kept.unpark(10**6)
        return [
            (u.occ.record["involved_object"]["name"], u.occ.number, (u.occ.uid, u.occ.number) in kept.owed)
            for u in back
        ]
    finally:
        kept.close()  # never committed: left as it was


@pytest.mark.parametrize("when", ["deleted-while-stopped", "deleted-after-restart", "and-a-second-stop"])
async def test_a_parked_occurrence_owed_at_a_stop_is_delivered_once_when_its_event_is_deleted(
    api: FakeApiServer, tmp_path: Path, when: str
) -> None:
    """db-* refused (an index per day) with X/2 taken: X/1 parked, X/2 accepted, a clean stop, which
    records X/2 and keeps X/1 owed. Then X is deleted (TTL), while no router runs or after the
    restart, so its checkpoint entry goes (the first list prunes it, or the watch's DELETED), and db
    stays refused a while (parked records go round); with a second clean stop meanwhile in the third
    case. Once db is taken every occurrence is stored once, X/2 then X/1. Before: X/1 twice (the
    original the stop left unmarked, then its owed copy)."""

    def decide(occ: Occurrence) -> Outcome:
        name = occ.record["involved_object"]["name"]
        if name.startswith("db-") and not (name == "db-x" and occ.number >= 2):
            return retry("index refused", defer=True)
        return OK

    first = _router(api, tmp_path, decide)
    async with first.running():
        await until(lambda: first.ready()[0])
        pipeline, spool = first.pipelines[0], first.pipelines[0].spool
        assert spool is not None
        x = api.create_event(event_object(object_name="db-x", name="db-x"))
        uid = x["metadata"]["uid"]
        for i in range(12):
            api.create_event(event_object(object_name=f"db-{i}", name=f"db-{i}"))
        for i in range(20):
            api.create_event(event_object(object_name=f"a-{i}", name=f"a-{i}"))
        await _mem(first).wait_for(20, timeout=20)
        api.bump("default", "db-x")
        await until(lambda: (uid, 2) in _mem(first).keys, timeout=20)
        await until(lambda: spool.parked_floor(uid) == 1 and uid not in pipeline._held, timeout=20)
    assert first.exit_code == 0
    # One record of X/1, marked owed (before: the original unmarked, and an owed copy at the end).
    on_disk = _parked_on_disk(tmp_path / "data" / "spool" / "mem")
    assert [rec for rec in on_disk if rec[0] == "db-x"] == [("db-x", 1, True)]
    assert len(on_disk) == len({rec[:2] for rec in on_disk})
    if when != "deleted-after-restart":
        api.delete_event("default", "db-x")

    refused_after_gone = 0
    refusing = True
    running: list[Pipeline] = []  # the pipeline of the router running now

    def still_refusing(occ: Occurrence) -> Outcome:
        nonlocal refused_after_gone
        if refusing and occ.record["involved_object"]["name"].startswith("db-"):
            if occ.uid == uid and running and not running[-1].checkpoint.accepted(uid):
                refused_after_gone += 1  # read back once X's entry was gone
            return retry("index refused", defer=True)
        return OK

    async def x_gone_and_gone_round(router: Router) -> None:
        """X's checkpoint entry gone, and X/1 read back and refused since (it went round)."""
        nonlocal refused_after_gone
        p = router.pipelines[0]
        await until(lambda: router.watchers[0].initial_list_done.is_set(), timeout=20)
        if when == "deleted-after-restart":
            api.delete_event("default", "db-x")
            await until(lambda: uid not in router.watchers[0].tracker.seen, timeout=20)
        await until(lambda: not p.checkpoint.accepted(uid), timeout=20)
        refused_after_gone = 0
        await until(lambda: refused_after_gone >= 2, timeout=20)

    routers = [first]
    if when == "and-a-second-stop":
        # db still refused throughout: the stop finds only parked records (and what waits aside).
        between = _router(api, tmp_path, still_refusing)
        routers.append(between)
        async with between.running():
            running.append(between.pipelines[0])
            await x_gone_and_gone_round(between)
        assert between.exit_code == 0
    last = _router(api, tmp_path, still_refusing)
    routers.append(last)
    async with last.running():
        p = last.pipelines[0]
        running.append(p)
        await until(lambda: last.ready()[0])
        if when != "and-a-second-stop":
            await x_gone_and_gone_round(last)
        refusing = False
        await until(lambda: (uid, 1) in _mem(last).keys and _drained(p), timeout=20)
        await p.wait_idle(20)
    assert last.exit_code == 0
    stored = [key for r in routers for key in _mem(r).keys]
    assert [k for k, n in collections.Counter(stored).items() if n > 1] == []
    assert [n for u, n in stored if u == uid] == [2, 1]
    assert set(stored) >= {(e["metadata"]["uid"], 1) for e in api.events()}
    for r in routers:
        assert {
            reason: r.metrics.dropped.labels("mem", reason)._value.get() for reason in SINK_DROP_REASONS
        } == {reason: 0 for reason in SINK_DROP_REASONS}


def test_owing_parked_records_at_a_stop_marks_them_in_place_and_drops_nothing(tmp_path: Path) -> None:
    """A parked FIFO filled to about its share of the bound: six X/1 and six other events' records.
    The stop records X/2 of each X: each X/1 is marked owed where it lies (its failed attempts and
    "not before" kept), nothing is dropped, nothing is told as given up, and after a reopen the FIFO
    holds one record per occurrence. Before: a second, owed copy of each X/1 was parked, and each
    dropped the parked FIFO's oldest record, counted `spool_full` and told to the sink."""
    probe = Spool(tmp_path / "probe", max_bytes=10**7, cluster="test")
    probe.park(make_occurrence(object_name="x-0"), tries=2, not_before=2e9 + 11)
    line = probe.bytes  # a parked record's size
    directory = tmp_path / "spool"
    bound = 2 * (12 * line + line // 2)  # the parked FIFO takes half: room for 12 records, not 13
    spool = Spool(directory, max_bytes=bound, cluster="test")
    spool.decode_dropped = True
    xs = [make_occurrence(object_name=f"x-{i}") for i in range(6)]
    others = [make_occurrence(object_name=f"o-{i}") for i in range(6)]
    for i, occ in enumerate(xs + others):
        assert spool.park(occ, tries=i % 3, not_before=2e9 + i) == []
    size, count = spool.bytes, spool.parked_count
    ok = spool.owe_parked({occ.uid: 2 for occ in xs} | {others[0].uid: 1})  # o-0/1 is not below 1
    assert ok == {occ.uid for occ in xs} | {others[0].uid}
    assert (spool.bytes, spool.parked_count, spool.dropped_occurrences) == (size, count, [])
    assert all(spool.parked_floor(occ.uid) == 1 for occ in xs + others)
    # Marked again (a second stop): nothing changes.
    assert spool.owe_parked({occ.uid: 2 for occ in xs}) == {occ.uid for occ in xs}
    spool.commit()
    spool.close()
    reopened = Spool(directory, max_bytes=bound, cluster="test")
    back = reopened.unpark(10**6)
    assert [u.occ.key for u in back] == [occ.key for occ in xs + others]
    assert reopened.owed == {(occ.uid, 1) for occ in xs}
    assert [(u.tries, u.not_before) for u in back] == [(i % 3, 2e9 + i) for i in range(12)]
    reopened.close()


def test_a_parked_record_that_cannot_be_marked_owed_keeps_its_event_unrecorded(tmp_path: Path) -> None:
    """A parked line not as this version writes it (no attempts field) cannot take the mark in place:
    its event is not recorded (the relist sends X/2 again: a duplicate, never a loss), the others are."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    x, y = make_occurrence(object_name="x"), make_occurrence(object_name="y")
    spool.park(x, tries=1)
    spool.park(y, tries=1)
    spool.commit()
    spool.close()
    seg = next((directory / "parked").glob("*.seg"))
    lines = seg.read_bytes().splitlines(keepends=True)
    short = orjson.dumps(orjson.loads(lines[0])[:3]) + b"\n"  # [raw, received_at, 0]
    seg.write_bytes(short + lines[1])
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    assert spool.owe_parked({x.uid: 2, y.uid: 2}) == {y.uid}
    spool.close()


# ---- a parked FIFO as the version before this left it: an owed copy beside its original ----------


def _old_stop_left(directory: Path, x: Occurrence, others: list[Occurrence]) -> None:
    """X/1 parked (refused once), other events' records behind it, and the owed copy of X/1 the stop
    of the version before parked at the end (it recorded X/2)."""
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    spool.park(x, tries=1)
    for occ in others:
        spool.park(occ, tries=1)
    spool.park(x, tries=1, owed=True)
    spool.commit()
    spool.close()


def _marks(directory: Path, name: str) -> list[bool]:
    """The owed mark of each of ``name``'s records in the parked FIFO's files, in order (none read)."""
    lines = (
        orjson.loads(line)
        for seg in sorted((directory / "parked").glob("*.seg"))
        for line in seg.read_bytes().splitlines()
    )
    return [bool(rec[2]) for rec in lines if rec[0]["involvedObject"]["name"] == name]


def test_an_occurrence_owed_already_is_not_marked_again_and_one_with_two_records_is_owed_once(
    tmp_path: Path,
) -> None:
    """The version before left X/1's original beside an owed copy; this one, recording X/3 at a stop,
    marked the original too: both owed, so after a later clean stop X/1 was delivered twice (a review
    of item 207). An occurrence owed already takes no mark, and of two unmarked records of one
    occurrence one is marked; the event may still be recorded."""
    x, others = make_occurrence(object_name="x"), [make_occurrence(object_name=f"o-{i}") for i in range(3)]
    _old_stop_left(tmp_path / "old", x, others)
    spool = Spool(tmp_path / "old", max_bytes=10**7, cluster="test")
    assert spool.owe_parked({x.uid: 3}) == {x.uid}
    spool.close()
    assert _marks(tmp_path / "old", "x") == [False, True]
    twice = Spool(tmp_path / "twice", max_bytes=10**7, cluster="test")
    twice.park(x, tries=1)
    twice.park(others[0], tries=1)
    twice.park(x, tries=1)
    assert twice.owe_parked({x.uid: 3}) == {x.uid}
    twice.commit()
    twice.close()
    assert _marks(tmp_path / "twice", "x") == [True, False]


def _pipeline(directory: Path, recorded: dict[str, int]) -> tuple[Pipeline, MemorySink]:
    ctx = SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))
    sink = Listening(MemorySinkOptions.model_validate({}), ctx)
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    p = pipeline_for("mem", sink, Metrics(), None, spool=spool, queue_max_events=10, batch_max_events=5)
    p.checkpoint.ack(recorded)
    return p, sink


async def _deliver_all(p: Pipeline) -> None:
    task = asyncio.create_task(p.run())
    try:
        await until(lambda: _drained(p), timeout=20)
        await p.wait_idle(20)
    finally:
        p.close()
        await asyncio.wait_for(task, 10)
        assert p.spool is not None
        p.spool.commit()
        p.spool.close()


@pytest.mark.parametrize("stop", [False, True])
async def test_an_owed_copy_beside_its_parked_original_is_delivered_once_after_its_event_was_pruned(
    tmp_path: Path, stop: bool
) -> None:
    """The parked FIFO holds X/1, 12 others, then X/1's owed copy (a stop of the version before,
    which recorded X/2); X is pruned (deleted while no router ran). The original is read back
    separately from the copy (the share of items set aside is 5). Delivered at once: the original is
    a copy of a deleted event (``_gone``), as ``_take`` knew and ``_unpark`` did not. With a clean
    stop first that finds only parked records: the stop keeps X's mark in the checkpoint
    (``keep_gone``), which it skipped when the main FIFO was empty. X/1 stored once either way;
    before, twice."""
    directory = tmp_path / "spool"
    x = make_occurrence(object_name="x")
    others = [make_occurrence(object_name=f"o-{i}") for i in range(12)]
    _old_stop_left(directory, x, others)
    live = {occ.uid for occ in others}
    p, sink = _pipeline(directory, {x.uid: 2})
    p.prune(live)  # the first list after the restart: X is no longer listed
    assert p.checkpoint.accepted(x.uid) == 0
    if stop:
        p.keep_gone()  # the stop, with nothing in the main FIFO
        assert p.checkpoint.accepted(x.uid) == 2
        assert p.spool is not None
        p.spool.commit()
        p.spool.close()
        p, sink = _pipeline(directory, p.checkpoint.state)  # the next start, from that checkpoint
    await _deliver_all(p)
    stored = collections.Counter(sink.keys)
    assert stored == collections.Counter({(occ.uid, 1): 1 for occ in [x, *others]})


def test_a_parked_record_of_an_event_deleted_since_is_a_copy_unless_owed(tmp_path: Path) -> None:
    """Read back from the parked FIFO, a record at or below what was accepted of an event deleted or
    pruned since (``_gone``) is a copy, as ``_take`` has it for the queue; an owed one is not. Before,
    ``_unpark`` looked at the checkpoint only, whose entry went with the event: an unmarked original
    beside an owed copy (the version before's stop) was set aside to be sent, and it was sent within
    this run or (a stop first) the copy in the next."""
    directory = tmp_path / "spool"
    x, y = make_occurrence(object_name="x"), make_occurrence(object_name="y")
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    spool.park(x, tries=1)
    spool.park(y, tries=1, owed=True)
    spool.commit()
    spool.close()
    p, _ = _pipeline(directory, {x.uid: 2, y.uid: 2})
    p.prune(set())  # neither is listed any more
    p._unpark(10, ())
    assert p._held == {y.uid: {1}}
    assert p.metrics.skipped.labels("mem")._value.get() == 1
    assert p.spool is not None
    p.spool.close()
