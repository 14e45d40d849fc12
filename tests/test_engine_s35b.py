"""A stop on a nearly full disk, after item 302 (item 311).

Item 302 made a stop that cannot write leave what it read since the durable read position in place
(``Spool._keep_in_place``): read again after the restart. A record the stop had appended before the
failed write (X/2, memory only) then sat behind a newer occurrence of its event the rewind put back
in front (X/3): skipped as a copy after the restart, though counted kept. And when the stop's
``prepend`` failed, what waited behind the spool was counted not kept without a write attempt.

The disk is nearly full where the spool's appends (``append_all``) and its file writes of more than
4 KiB answer ENOSPC, as tests/test_engine_s35.py does."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.appendfile import append_all as append_all_on_disk
from eventrouter.config import spec_for_class
from eventrouter.engine import spool as spool_module
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import Pipeline, _numbers_rising
from eventrouter.engine.spool import Spool
from eventrouter.metrics import Metrics
from eventrouter.options import QUEUE_DEFAULT_SPOOLED, PipelineOptions
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, SinkContext, retry
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import MemorySinkOptions
from eventrouter.testing.waiting import until

Key = tuple[str, int]
LIMIT = 4096
"""Bytes a write may still take on the nearly full disk (single small records and the cursor fit)."""


def _keys(occs: Sequence[Occurrence]) -> list[Key]:
    return [(o.uid, o.number) for o in occs]


def _occ(uid: str, number: int, size: int) -> Occurrence:
    return make_occurrence(object_name=uid, uid=uid, count=number, message="m" * size)


def _small_writes_only(monkeypatch: pytest.MonkeyPatch, under: Path) -> list[bool]:
    """A switch: while on, every write under ``under`` of more than ``LIMIT`` bytes fails with ENOSPC."""
    full = [False]
    append_all = append_all_on_disk
    write_bytes = Path.write_bytes

    def no_space() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device")

    def small_append(fd: int, data: bytes, *args: Any) -> None:
        if full[0] and len(data) > LIMIT:
            raise no_space()
        append_all(fd, data, *args)

    def small_write(self: Path, data: Any) -> int:
        if full[0] and str(self).startswith(str(under)) and len(data) > LIMIT:
            raise no_space()
        return write_bytes(self, data)

    monkeypatch.setattr(spool_module, "append_all", small_append)
    monkeypatch.setattr(Path, "write_bytes", small_write)
    return full


def _append_each(spool: Spool, left: list[Occurrence], owed: set[Key]) -> int:
    """The stop's appends when the spool was read to its end (the router's stop: no prepend then,
    ``extend`` per leftover, going on after one fails); returns how many it counts kept."""
    kept = 0
    for occ in left:
        try:
            spool.extend([occ], owed)
        except OSError:
            continue
        kept += 1
    return kept


def _delivered_after_the_restart(directory: Path, done: dict[str, int] | None = None) -> list[Key]:
    """Read the spool as a restart does, the checkpoint (``done``, what was delivered of each event)
    skipping copies (at or below it) unless owed."""
    again = Spool(directory, max_bytes=64 * 1024 * 1024)
    newest: dict[str, int] = {} if done is None else done
    delivered: list[Key] = []
    for occ in again.pop(1000):
        key = (occ.uid, occ.number)
        if occ.number > newest.get(occ.uid, 0) or key in again.owed:
            delivered.append(key)
            newest[occ.uid] = max(occ.number, newest.get(occ.uid, 0))
    return delivered


def test_a_stop_that_appended_an_older_occurrence_before_a_write_failed_still_delivers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X/3 (8 KB) and Y/1 spooled, read back to the end (in flight); X/2 held only in memory. The
    stop appends X/2, then X/3's write fails and the read position goes back before X/3: X/2 is
    behind it, so it is marked owed and delivered after the restart, after X/3. Before: X/2 was
    read unmarked behind X/3, skipped as a copy, though the stop counted it kept."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    x2, x3, y1 = _occ("X", 2, 100), _occ("X", 3, 8000), _occ("Y", 1, 100)
    spool.extend([x3, y1])
    spool.commit()
    popped = spool.pop(100)
    assert not len(spool)
    left = _numbers_rising([x2, *popped])
    full = _small_writes_only(monkeypatch, directory)
    full[0] = True
    kept = _append_each(spool, left, set())
    spool.commit()  # as the stop does last
    spool.close()
    full[0] = False
    assert kept == 3
    assert sorted(_delivered_after_the_restart(directory)) == [("X", 2), ("X", 3), ("Y", 1)]


def test_a_stop_that_writes_everything_marks_only_what_a_failure_would_have_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same stop on a disk with room: every leftover is appended in order, X/2 owed (the mark
    sends an undelivered leftover whatever the checkpoint says: no copy), X/3 and Y/1 not; the last
    commit passes the originals. After the restart each is delivered once, in order."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    x2, x3, y1 = _occ("X", 2, 100), _occ("X", 3, 8000), _occ("Y", 1, 100)
    spool.extend([x3, y1])
    spool.commit()
    popped = spool.pop(100)
    left = _numbers_rising([x2, *popped])
    assert _append_each(spool, left, set()) == 3
    spool.commit()
    spool.close()
    again = Spool(directory, max_bytes=64 * 1024 * 1024)
    assert _keys(again.pop(100)) == [("X", 2), ("X", 3), ("Y", 1)]
    assert again.owed == {("X", 2)}


def test_a_stop_that_put_back_parked_records_already_delivered_does_not_mark_them_owed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X/3 parked, read back and delivered; Z/2 read back and parked again (behind an older one of
    its event); the parked read position not made durable since. At the stop a failed write (Y/1,
    read back, in place) puts both back, and the stop records X and Z past them (``owe_parked``).
    X/3, delivered, is not marked owed (the checkpoint skips it after the restart); Z/2 is owed
    once, its unread copy marked. Before: the rebuilt floors marked X/3 owed, and it was delivered
    twice, which a crash at the same moment would not do."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    x3, z2, y1 = _occ("X", 3, 100), _occ("Z", 2, 100), _occ("Y", 1, 8000)
    spool.park(x3)
    spool.park(z2)
    spool.extend([y1])
    spool.commit()
    assert _keys([occ for occ, _, _ in spool.unpark(10)]) == [("X", 3), ("Z", 2)]
    spool.park(z2)  # parked again (an older Z still parked in the run): X/3 delivered
    assert _keys(spool.pop(10)) == [("Y", 1)]  # in flight at the stop
    full = _small_writes_only(monkeypatch, directory)
    full[0] = True
    assert spool.extend([y1]) == []  # left where it was: the read positions go back
    assert spool.owe_parked({"X": 5, "Z": 3}) == {"X", "Z"}
    spool.commit()
    spool.close()
    full[0] = False
    again = Spool(directory, max_bytes=64 * 1024 * 1024)
    assert _keys(again.pop(10)) == [("Y", 1)]
    parked = [occ for occ, _, _ in again.unpark(10)]
    assert _keys(parked) == [("X", 3), ("Z", 2), ("Z", 2)]
    assert again.owed == {("Z", 2)}


class _DefersX(MemorySink):
    """Refuses event X for a while (a cause of its own: Loki's stream limit), takes the rest."""

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        outcomes: list[Outcome] = []
        for occ in batch:
            if occ.uid == "X":
                outcomes.append(retry("stream limit", defer=True, retry_after=60))
            else:
                outcomes.append(OK)
                self.received.append(occ)
        return outcomes


def _pipeline(sink: MemorySink, directory: Path, checkpoint: MemoryCheckpoint, **options: Any) -> Pipeline:
    return Pipeline(
        name="mem",
        sink=sink,
        options=PipelineOptions.model_validate({"batch_max_wait": 0.0, **options}),
        predicate=None,
        checkpoint=SinkCheckpoint(checkpoint),
        deadletter=DeadLetter(None, sink="mem"),
        metrics=Metrics(),
        spool=Spool(directory, max_bytes=64 * 1024 * 1024),
    )


def _context() -> SinkContext:
    return SinkContext(name="mem", cluster="t", data_dir=None, logger=logging.getLogger("mem"))


async def test_an_older_occurrence_set_aside_in_memory_is_delivered_after_a_stop_on_a_nearly_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real pipeline: X/2 offered into the memory queue and refused (set aside), X/3 (8 KB) spilled
    behind a full queue, read back and held behind X/2; the disk then takes only small writes, so
    X/3 cannot go to the aside file and the read position stays before it. The stop (as the router
    runs it) keeps both; a restarted pipeline on the same spool and checkpoint, one occurrence a
    batch, delivers X/2. Before: X/3 went first and X/2 was skipped as a copy (lost, counted kept)."""
    directory = tmp_path / "spool"
    checkpoint = MemoryCheckpoint()
    full = _small_writes_only(monkeypatch, directory)
    sink = _DefersX(MemorySinkOptions.model_validate({}), _context())
    p = _pipeline(sink, directory, checkpoint, queue_max_events=4)
    task = asyncio.create_task(p.run())
    await p.started.wait()
    for occ in (_occ("X", 2, 100), _occ("Z", 1, 100), _occ("W", 1, 100), _occ("V", 1, 100)):
        p.offer(occ)  # into the memory queue: the spool is empty
    p.offer(_occ("X", 3, 8000))  # the queue is full: spilled
    full[0] = True
    assert p.spool is not None
    spool = p.spool
    await until(lambda: len(sink.received) == 3 and len(p._deferred) == 2 and not len(spool))
    p.close()
    p.stop_now()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    older, newer = p.leftovers()
    left = older + newer
    assert _keys(left) == [("X", 2), ("X", 3)]
    assert _append_each(spool, left, p.owed_at_stop(left)) == 2
    spool.keep_aside([])
    spool.commit()
    spool.close()
    full[0] = False

    again = MemorySink(MemorySinkOptions.model_validate({}), _context())  # takes everything now
    restarted = _pipeline(again, directory, checkpoint, batch_max_events=1)
    task = asyncio.create_task(restarted.run())
    try:
        await until(lambda: ("X", 2) in again.keys, timeout=5)
        assert sorted(again.keys) == [("X", 2), ("X", 3)]
    finally:
        restarted.close()
        await asyncio.wait_for(task, 5)


# ---- through the router's stop ---------------------------------------------------------------------


def _router(api: FakeApiServer, tmp: Path, **sink_options: Any) -> Router:
    settings = RouterSettings(
        cluster_name="test",
        kubeconfig=str(api.kubeconfig(tmp / "kubeconfig")),
        metrics_addr=None,
        shutdown_timeout=0.5,
        data_dir=tmp / "data",
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    options = {
        "name": "mem",
        "batch_max_wait": 0.02,
        "queue_max_events": 2,
        "batch_max_events": 2,
        "retry_initial_backoff": 0.05,
        **sink_options,
    }
    return Router(settings, [spec_for_class(MemorySink, options, type_="memory")])


def _sink(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


@contextlib.asynccontextmanager
async def _running_held(
    api: FakeApiServer, tmp: Path, decide: Callable[[Occurrence], Outcome]
) -> AsyncIterator[tuple[Router, MemorySink, asyncio.Event]]:
    """A router (a queue of 4, batches of 8) running on ``api`` for the block, its sink answering each
    occurrence by ``decide`` and holding its first batch until the event yielded is set: what follows
    fills the queue."""
    router = _router(api, tmp, queue_max_events=4, batch_max_events=8)
    async with router.running():
        await until(lambda: router.ready()[0])
        sink = _sink(router)
        sink.blocked = held = asyncio.Event()
        sink.decide = decide
        yield router, sink, held


async def test_a_stop_whose_prepend_fails_still_appends_what_waited_behind_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink is down: the first batch in flight was never spooled, a backlog is spooled behind
    it. The disk then takes only small writes: a large event and a small one wait behind the spool
    in memory. The stop's prepend (the leftovers older than the backlog, with the head's rest)
    cannot be written; the small one still fits and is appended, so after the restart (the events
    deleted: only the spool can deliver them) it is delivered, and every other occurrence is
    delivered or counted ``spool_error``. Before: the small one was counted not kept, never tried."""
    full = _small_writes_only(monkeypatch, tmp_path / "data")
    async with FakeApiServer(token="t", watch_cache=False) as api:
        router = _router(api, tmp_path)
        async with router.running():
            await until(lambda: router.ready()[0])
            sink = _sink(router)
            sink.down = True
            for i in range(10):
                api.create_event(event_object(object_name=f"e-{i}"))
            p = router.pipelines[0]
            assert p.spool is not None
            spool = p.spool
            await until(lambda: len(spool) >= 4 and router.metrics.retries.labels("mem")._value.get() >= 1)
            full[0] = True
            large = api.create_event(event_object(object_name="large", message="l" * 8000))
            await until(lambda: len(p._overflow) == 1)
            small = api.create_event(event_object(object_name="small"))
            await until(lambda: len(p._overflow) == 2)
        given_up = router.metrics.dropped.labels("mem", "spool_error")._value.get()
        full[0] = False
        for event in api.events():
            api.delete_event(event["metadata"]["namespace"], event["metadata"]["name"])
        again = _router(api, tmp_path)
        async with again.running():
            await until(lambda: again.ready()[0])
            second = _sink(again)
            await until(lambda: any(uid == small["metadata"]["uid"] for uid, _ in second.keys), timeout=10)
            await again.pipelines[0].wait_idle(timeout=10)
            delivered = {uid for uid, _ in second.keys}
        assert large["metadata"]["uid"] not in delivered
        assert len(delivered) + given_up == 12  # each delivered after the restart or counted


async def test_a_router_stopped_on_a_nearly_full_disk_delivers_an_older_occurrence_set_aside_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router's own stop. The sink refuses event X for a while (set aside); X/2 came into the
    memory queue, X/3 (8 KB) was spilled behind a full queue, then read back and held behind X/2;
    the disk takes only small writes from then on. The stop keeps both (X/2 appended, X/3 left
    where it was spooled); the restart, one occurrence a batch, delivers X/2 too. Before: X/3 went
    first and X/2 was skipped as a copy, while the stop counted nothing given up."""
    full = _small_writes_only(monkeypatch, tmp_path / "data")
    async with FakeApiServer(token="t", watch_cache=False) as api:
        async with _running_held(
            api,
            tmp_path,
            lambda occ: retry("stream limit", defer=True, retry_after=60) if occ.uid == "X" else OK,
        ) as (router, sink, held):
            api.create_event(event_object(name="x", uid="X", object_name="x", count=2))
            p = router.pipelines[0]
            assert p.spool is not None
            spool = p.spool
            await until(lambda: _keys(p._in_flight) == [("X", 2)])
            for i in range(4):
                api.create_event(event_object(object_name=f"e-{i}"))
            await until(lambda: len(p._queue) == 4)

            def larger(obj: dict[str, Any]) -> None:
                obj["count"] = 3
                obj["message"] = "m" * 8000

            api.update_event("default", "x", larger)
            await until(lambda: len(spool) == 1)  # spilled
            full[0] = True
            held.set()
            await until(lambda: len(sink.received) == 4 and len(p._deferred) == 2 and not len(spool))
        assert router.metrics.dropped.labels("mem", "spool_error")._value.get() == 0
        full[0] = False
        again = _router(api, tmp_path, batch_max_events=1)
        async with again.running():
            await until(lambda: again.ready()[0])
            second = _sink(again)
            await until(lambda: ("X", 2) in second.keys, timeout=10)


def test_an_owed_leftover_whose_own_append_fails_first_keeps_its_event_unrecorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X/1 (8 KB) spooled, committed, read back (the batch in flight); X/2 accepted meanwhile, so
    the stop owes X/1. Its append is the first write to fail: X/1 stays where it was spooled,
    unmarked, so X must be in ``owed_unmarked`` (``settle_at_stop`` does not record X at 2) and the
    restart delivers X/1. Before: ``owed_unmarked`` stayed empty, X was recorded at 2 and X/1 was
    skipped as a copy, though the stop counted it kept."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    spool.append(_occ("X", 1, 8000))
    spool.commit()
    in_flight = spool.pop(10)
    assert _keys(in_flight) == [("X", 1)]
    full = _small_writes_only(monkeypatch, directory)
    full[0] = True
    owed = {("X", 1)}  # owed_at_stop: accepted(X) = 0 < 1 < done(X) = 2
    assert spool.extend(in_flight, owed) == []  # kept: left in place, nothing raised
    assert spool.owed_unmarked == {"X"}
    done = {uid: n for uid, n in {"X": 2}.items() if uid not in spool.owed_unmarked}  # settle_at_stop
    spool.commit()  # as the stop does last
    spool.close()
    full[0] = False
    assert _delivered_after_the_restart(directory, done) == [("X", 1)]


async def test_a_router_stopped_on_a_nearly_full_disk_delivers_an_owed_occurrence_left_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router's own stop. X/1 (8 KB) and X/2 were spilled behind a full queue, then read back
    in one batch; the sink refuses X/1 (retried in a minute) and takes X/2; the disk takes only
    small writes from then on. The stop's append of X/1 fails first: X/1 stays where it was
    spooled, and the checkpoint does not record X past it, so the restart (the API server holds
    only X/2 now) delivers X/1. Before: X was recorded at 2 and X/1 skipped as a copy, while the
    stop counted nothing given up."""
    full = _small_writes_only(monkeypatch, tmp_path / "data")
    async with FakeApiServer(token="t", watch_cache=False) as api:
        async with _running_held(
            api,
            tmp_path,
            lambda occ: retry("refused", retry_after=60) if (occ.uid, occ.number) == ("X", 1) else OK,
        ) as (router, sink, held):
            api.create_event(event_object(object_name="e-0"))
            p = router.pipelines[0]
            assert p.spool is not None
            spool = p.spool
            await until(lambda: len(p._in_flight) == 1)
            for i in range(1, 5):
                api.create_event(event_object(object_name=f"e-{i}"))
            await until(lambda: len(p._queue) == 4)
            api.create_event(event_object(name="x", uid="X", object_name="x", count=1, message="m" * 8000))
            api.update_event("default", "x", lambda obj: obj.update(count=2, message="small"))
            await until(lambda: len(spool) == 2)  # spilled
            full[0] = True
            held.set()
            await until(lambda: ("X", 2) in sink.keys and len(sink.received) == 6 and not len(spool))
        assert router.metrics.dropped.labels("mem", "spool_error")._value.get() == 0
        full[0] = False
        again = _router(api, tmp_path, batch_max_events=1, queue_max_events=QUEUE_DEFAULT_SPOOLED)
        async with again.running():
            await until(lambda: again.ready()[0])
            await until(lambda: ("X", 1) in _sink(again).keys, timeout=10)
