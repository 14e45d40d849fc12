"""The wait behind a spool that cannot be written (a full disk) and a stop on such a disk (item 302).

Item 276 made that wait (``_overflow``) share ``queue_max_bytes`` with the queue, and a refill read
only what fit beside it: between batches the queue is empty, so the wait filled the whole bound and
each refill read one record, while the disk stayed full and after it freed (only an offer moved the
wait into the spool). The wait was in no gauge. And a stop whose ``prepend`` could not write let its
last ``commit`` move the read position past the records it had read back, still on disk: lost.

The disk is full where the spool's append (``append_all``) and its file writes answer ENOSPC, as a
full disk's write does."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.appendfile import append_all as append_all_on_disk
from eventrouter.config import spec_for_class
from eventrouter.engine import spool as spool_module
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.metrics import Metrics
from eventrouter.options import PipelineOptions
from eventrouter.record import Occurrence
from eventrouter.sink import Outcome, SinkContext
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import Gate, Listening, MemorySinkOptions
from eventrouter.testing.waiting import until

Key = tuple[str, int]

BOUND = 4 * 1024 * 1024
"""``queue_max_bytes``: room for about a hundred of these occurrences (each counts ~41 KB)."""
MESSAGE = 20_000


def _occs(n: int, prefix: str) -> list[Occurrence]:
    return [
        make_occurrence(object_name=f"{prefix}-{i}", message=f"{i:06d}" + "x" * MESSAGE) for i in range(n)
    ]


def _small(n: int) -> list[Occurrence]:
    return [make_occurrence(object_name=f"s-{i}") for i in range(n)]


def _cost(occ: Occurrence) -> int:
    return 2 * len(occ.raw_json)


def _keys(occs: Sequence[Occurrence]) -> list[Key]:
    return [(o.uid, o.number) for o in occs]


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class _Gated(Listening):
    """Takes a batch only when the test allows one; notes what the engine gives up."""

    gate: Gate

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        await self.gate.take()
        return await super().send(batch)


class _Held(Pipeline):
    """Notes the most memory held (queue, items set aside, the wait) after each refill."""

    most = 0

    def _refill(self) -> None:
        super()._refill()
        self.most = max(self.most, self._queue_bytes + self._aside.bytes + self._overflow_bytes)


def _pipeline(tmp_path: Path, metrics: Metrics) -> tuple[_Held, _Gated]:
    sink = _Gated(MemorySinkOptions.model_validate({}), _context())
    sink.gate = Gate()
    # A batch takes the whole queue (its bytes bound is above the queue's): between batches the queue
    # is empty and new occurrences find the whole bound free beside it, as under a live stream.
    options = {"batch_max_wait": 0.01, "batch_max_bytes": 8 * 1024 * 1024, "queue_max_bytes": BOUND}
    p = _Held(
        name="mem",
        sink=sink,
        options=PipelineOptions.model_validate(options),
        predicate=None,
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(None, sink="mem"),
        metrics=metrics,
        spool=Spool(tmp_path / "spool", max_bytes=256 * 1024 * 1024),
    )
    return p, sink


def _context(name: str = "mem") -> SinkContext:
    return SinkContext(name=name, cluster="t", data_dir=None, logger=logging.getLogger(name))


def _disk(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A switch: while its one item is True, the spool's appends fail with ENOSPC."""
    full = [False]
    real = append_all_on_disk

    def append_all(fd: int, data: bytes, *args: Any) -> None:
        if full[0]:
            raise _no_space()
        real(fd, data, *args)

    monkeypatch.setattr(spool_module, "append_all", append_all)
    return full


async def _fill_the_wait(
    p: _Held, sink: _Gated, full: list[bool]
) -> tuple[list[Occurrence], list[Occurrence]]:
    """A backlog spilled, the first batch in flight (the queue empty), then the disk full and a live
    stream's occurrences offered: they wait behind the spool, up to what the bound lets them."""
    backlog = _occs(300, "a")
    for occ in backlog:
        p.offer(occ)
    assert p.spool is not None and len(p.spool) > 150
    await until(lambda: not p._queue and p._in_flight)
    full[0] = True
    live = _occs(150, "b")
    for occ in live:
        p.offer(occ)
    assert p._overflow and sink.given  # the oldest of the wait given up: it is at its bound
    return backlog, live


async def test_a_refill_beside_a_full_wait_still_reads_about_a_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk stays full and a live stream keeps the wait behind the spool at its bound: each
    refill still reads a share of the bound (a batch's bytes, at most a quarter of the bound), not
    one record; memory stays within the bound plus one record (item 276); nothing is lost uncounted.
    Before: every batch after the wait filled held one record."""
    metrics = Metrics()
    p, sink = _pipeline(tmp_path, metrics)
    full = _disk(monkeypatch)
    task = asyncio.create_task(p.run())
    await p.started.wait()
    backlog, live = await _fill_the_wait(p, sink, full)
    more = _occs(120, "c")
    share = (BOUND // 4) // _cost(backlog[0])  # records of a refill's share (here a quarter of the bound)
    for i in range(6):
        sent = len(sink.batches)
        await sink.gate.allow(1)
        await until(lambda: len(sink.batches) > sent and bool(p._in_flight))  # noqa: B023 - awaited here
        for occ in more[i * 20 : (i + 1) * 20]:  # the live stream goes on: the wait stays at its bound
            p.offer(occ)
    sizes = sink.batches[1:]
    assert min(sizes) >= share - 1, (sizes, share)
    assert p.most <= BOUND + _cost(backlog[0]), (p.most, BOUND)
    await sink.gate.allow(1000)
    await p.wait_idle(timeout=30)
    p.close()
    await asyncio.wait_for(task, 10)
    # In order: the backlog, then what was kept of the wait; what was given up counted.
    given = set(sink.given)
    assert sink.keys == [k for k in _keys(backlog + live + more) if k not in given]
    assert metrics.dropped.labels("mem", "spool_error")._value.get() == len(given)


async def test_the_wait_behind_a_full_disk_spills_at_the_first_refill_after_the_disk_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait at its bound, then the disk frees and nothing more is offered (a quiet cluster): the
    first refill puts the wait into the spool behind the backlog and reads a whole batch, so the rest
    drains in as few sends as the bound allows. Before: only an offer moved the wait into the spool,
    and the backlog drained one record a send (~200 here)."""
    metrics = Metrics()
    p, sink = _pipeline(tmp_path, metrics)
    full = _disk(monkeypatch)
    monkeypatch.setattr(spool_module, "RETRY_SECONDS", 0.0)  # the disk is tried again at once
    task = asyncio.create_task(p.run())
    await p.started.wait()
    backlog, live = await _fill_the_wait(p, sink, full)
    full[0] = False
    sent = len(sink.batches) + 1  # the batch in flight when the disk freed: read before
    await sink.gate.allow(1000)
    await p.wait_idle(timeout=60)
    p.close()
    await asyncio.wait_for(task, 10)
    after = sink.batches[sent:]
    fits = BOUND // _cost(backlog[0])
    assert len(after) <= math.ceil(sum(after) / fits) + 1, (after, fits)
    given = set(sink.given)
    assert sink.keys == [k for k in _keys(backlog + live) if k not in given]
    assert metrics.dropped.labels("mem", "spool_error")._value.get() == len(given)


async def test_the_queue_gauges_count_what_waits_behind_an_unwritable_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk the wait holds most of the bound: the queue gauges (what the documented
    EventrouterQueueFilling alert reads) say so. Before: they left it out and read ~0 here."""
    metrics = Metrics()
    p, sink = _pipeline(tmp_path, metrics)
    full = _disk(monkeypatch)
    task = asyncio.create_task(p.run())
    await p.started.wait()
    _, live = await _fill_the_wait(p, sink, full)
    given = set(sink.given)
    waiting = [occ for occ in live if (occ.uid, occ.number) not in given]
    p.flush_metrics()
    held = metrics.queue_bytes.labels("mem")._value.get()
    assert held == sum(map(_cost, waiting)) > BOUND // 2
    assert p.queued == len(waiting)  # the depth gauge's value (app.py sets it on every scrape)
    await sink.gate.allow(1000)
    p.close()
    await asyncio.wait_for(task, 30)


# ---- a stop on a nearly full disk -----------------------------------------------------------------


def _small_writes_only(monkeypatch: pytest.MonkeyPatch, under: Path, limit: int = 4096) -> list[bool]:
    """A switch: while on, every write under ``under`` of more than ``limit`` bytes fails with ENOSPC
    (a disk with a few KB left: single small appends and the cursor still fit)."""
    full = [False]
    append_all = append_all_on_disk
    write_bytes = Path.write_bytes

    def small_append(fd: int, data: bytes, *args: Any) -> None:
        if full[0] and len(data) > limit:
            raise _no_space()
        append_all(fd, data, *args)

    def small_write(self: Path, data: Any) -> int:
        if full[0] and str(self).startswith(str(under)) and len(data) > limit:
            raise _no_space()
        return write_bytes(self, data)

    monkeypatch.setattr(spool_module, "append_all", small_append)
    monkeypatch.setattr(Path, "write_bytes", small_write)
    return full


def test_a_prepend_that_cannot_write_leaves_what_was_read_from_the_spool_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records read back from the spool (in flight at a stop) and one offered into memory only: the
    prepend's file cannot be written. Those read back stay where they were, the read position not
    moved past them by the last commit, and are counted as kept (``kept_in_place``); the other is
    not, and the prepend says so (raises). Before: all counted as not kept, and the commit passed
    the records read back: gone after the restart."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    occs = _small(10)
    spool.extend(occs)
    spool.commit()
    read = spool.pop(4)
    memory_only = make_occurrence(object_name="m")
    full = _small_writes_only(monkeypatch, directory, limit=1000)  # one record (~650 bytes) fits
    full[0] = True
    with pytest.raises(OSError):
        spool.prepend([memory_only, *read])
    spool.commit()  # as the stop does last
    spool.close()
    full[0] = False
    again = Spool(directory, max_bytes=64 * 1024 * 1024)
    assert _keys(again.pop(100)) == _keys(occs)
    assert spool.kept_in_place == 4


def test_a_prepend_of_records_all_read_from_the_spool_keeps_them_where_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything left at the stop was read back from the spool: a prepend that cannot write leaves
    them in place and returns (kept), an owed one's event marked not to be recorded past it.
    Before: it raised, and the last commit passed them."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    occs = _small(10)
    spool.extend(occs[:6])
    spool.commit()
    spool.pop(2)
    spool.commit()  # two finished
    read = spool.pop(3)
    full = _small_writes_only(monkeypatch, directory, limit=1000)  # one record (~650 bytes) fits
    full[0] = True
    owed = {(read[0].uid, read[0].number)}
    assert spool.prepend(read, owed) == []
    assert spool.owed_unmarked == {read[0].uid}
    assert spool.keep_aside([]) is False  # the aside file is left as it is
    spool.extend(occs[6:])  # what waited behind the spool: small appends still fit
    spool.commit()
    spool.close()
    full[0] = False
    again = Spool(directory, max_bytes=64 * 1024 * 1024)
    assert _keys(again.pop(100)) == _keys(occs[2:])


def test_a_stop_that_cannot_append_what_it_read_from_a_drained_spool_leaves_it_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool read to its end (its last records in flight), then a disk with no room at all: the
    stop's appends (``extend``, as the router's stop calls it when nothing is unread) fail. What was
    read back stays where it was, counted as kept (returned, not raised); one offered into memory
    only raises. Before: each raised, and the last commit passed the records read back."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    occs = _small(6)
    spool.extend(occs)
    spool.commit()
    read = spool.pop(100)
    assert not len(spool)
    full = _small_writes_only(monkeypatch, directory, limit=0)
    full[0] = True
    for occ in read:
        assert spool.extend([occ]) == []
    with pytest.raises(OSError):
        spool.extend([make_occurrence(object_name="m")])
    spool.commit()
    spool.close()
    full[0] = False
    again = Spool(directory, max_bytes=64 * 1024 * 1024)
    assert _keys(again.pop(100)) == _keys(occs)


def _router(api: FakeApiServer, tmp: Path) -> Router:
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
    }
    return Router(settings, [spec_for_class(MemorySink, options, type_="memory")])


def _sink(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


async def test_a_stop_on_a_full_disk_keeps_the_records_read_back_from_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink goes down while sending a batch read back from the spool; the disk then has only a
    few KB left; the router stops; the events are deleted from the API server (only the spool can
    deliver them); a restart with a working sink delivers every one, and the stop counted none of
    them as given up. Before: the stop counted the batch ``spool_error`` ("not kept") and its last
    commit moved the read position past it: the two were never delivered."""
    full = _small_writes_only(monkeypatch, tmp_path / "data")
    async with FakeApiServer(token="t", watch_cache=False) as api:
        router = _router(api, tmp_path)
        async with router.running():
            await until(lambda: router.ready()[0])
            sink = _sink(router)
            sink.delay = 0.05
            for i in range(20):
                api.create_event(event_object(object_name=f"e-{i}"))
            await until(lambda: len(sink.received) >= 4, timeout=10)
            sink.down = True
            await until(lambda: router.metrics.retries.labels("mem")._value.get() >= 1, timeout=10)
            p = router.pipelines[0]
            in_flight = _keys(p._in_flight)
            assert in_flight and p.spool is not None and len(p.spool)  # read back: a backlog behind it
            full[0] = True
            first = sink.keys
        given_up = router.metrics.dropped.labels("mem", "spool_error")._value.get()
        full[0] = False
        for event in api.events():
            api.delete_event(event["metadata"]["namespace"], event["metadata"]["name"])
        again = _router(api, tmp_path)
        async with again.running():
            await until(lambda: again.ready()[0])
            second = _sink(again)
            await until(lambda: set(in_flight) <= set(second.keys), timeout=20)
            await until(lambda: len(set(first) | set(second.keys)) == 20)
        assert given_up == 0
