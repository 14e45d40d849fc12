"""The marks of deleted events (``Pipeline._gone``, items 50/124; item 244).

A mark says what was accepted of an event whose checkpoint entry went (TTL, prune), so that a copy
of it still waiting (spooled before a restart, relisted after it) is skipped. Marks are noted only
while such a copy can come: from the queue, the overflow or the main FIFO, or, for events with
parked records, the parked FIFO. One item set aside for hours (an index refused) kept every deleted
event's mark meanwhile: memory without bound. The stop keeps the marks of events the spool still
holds, reading it until a deadline: past it, every mark is kept."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest

from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.metrics import Metrics
from eventrouter.record import Occurrence
from eventrouter.sink import OK, SinkContext, retry
from eventrouter.testing import MemorySink, MemorySinkOptions, make_occurrence
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.waiting import until


def _pipeline(spool: Spool | None, stuck: Occurrence | None = None) -> tuple[Pipeline, MemorySink]:
    """A memory sink that refuses ``stuck`` for a cause of its own (``defer``: a red index) for good."""
    ctx = SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))
    sink = MemorySink(MemorySinkOptions.model_validate({}), ctx)
    if stuck is not None:
        sink.decide = lambda occ: retry("index red", defer=True) if occ.uid == stuck.uid else OK
    p = pipeline_for(
        "mem",
        sink,
        Metrics(),
        None,
        spool=spool,
        queue_max_events=200,
        batch_max_events=10,
        retry_initial_backoff=0.2,
        retry_max_backoff=0.4,
    )
    return p, sink


def _idle_but_aside(p: Pipeline) -> bool:
    spool_empty = p.spool is None or len(p.spool) == 0
    return (
        spool_empty and not (p._queue or p._in_flight or p._filling or p._overflow) and len(p._deferred) == 1
    )


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spool"])
async def test_events_deleted_while_only_an_item_set_aside_waits_leave_no_mark(
    tmp_path: Path, spooled: bool
) -> None:
    """One item refused ``defer`` waits aside throughout; 300 others are delivered, then deleted
    (``forget``) or pruned (``prune``, the next complete list). No mark is kept: no copy of them can
    come. Before, ``_gone`` held all 300 until the item set aside was finished (hours: ~130 bytes
    per deleted event, without bound)."""
    stuck = make_occurrence(object_name="red-index")
    p, sink = _pipeline(
        Spool(tmp_path / "spool", max_bytes=10**7, cluster="test") if spooled else None, stuck
    )
    async with drained(p):
        p.offer(stuck)
        batches = [[make_occurrence(object_name=f"o-{r}-{i}") for i in range(100)] for r in range(3)]
        for r, batch in enumerate(batches):
            for occ in batch:
                p.offer(occ)
            await sink.wait_for(100 * (r + 1))
            await until(lambda: _idle_but_aside(p))
            if r < 2:
                p.forget([occ.uid for occ in batch])  # the watch's DELETED (TTL)
            else:
                p.prune({stuck.uid})  # a complete list: none of them is listed any more
            assert p._gone == {}
            assert not any(p.checkpoint.accepted(occ.uid) for occ in batch)
        assert len(p._deferred) == 1
        p.stop_now()


async def test_marks_noted_while_a_backlog_drains_go_once_it_has_drained_though_an_item_waits_aside(
    tmp_path: Path,
) -> None:
    """50 records spooled before the start; an event delivered earlier (``dead``) is deleted while
    they wait: its mark is kept (a copy of it may be among them: item 50). Once the main FIFO and the
    queue have drained the mark goes, while the item refused ``defer`` still waits aside. Before, it
    stayed until that item finished."""
    directory = tmp_path / "spool"
    stuck = make_occurrence(object_name="red-index")
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    backlog = [stuck, *(make_occurrence(object_name=f"b-{i}") for i in range(50))]
    spool.extend(backlog)
    p, sink = _pipeline(spool, stuck)
    p.checkpoint.ack({"dead": 3})
    p.forget(["dead"])
    assert p._gone == {"dead": 3}
    async with drained(p):
        await sink.wait_for(50)
        await until(lambda: _idle_but_aside(p) and not p._gone)
        p.stop_now()


def test_with_only_parked_records_left_marks_are_noted_for_their_events_only(tmp_path: Path) -> None:
    """The main FIFO empty, the parked FIFO holding X/1 (an older version's original beside its owed
    copy needs X's mark: item 207): of X and Y deleted, only X's mark is noted. Before, Y's too, and
    every deleted event's for as long as anything was parked."""
    directory = tmp_path / "spool"
    x, y = make_occurrence(object_name="x"), make_occurrence(object_name="y")
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    spool.park(x, tries=1)
    spool.commit()
    spool.close()
    p, _ = _pipeline(Spool(directory, max_bytes=10**7, cluster="test"))
    p.checkpoint.ack({x.uid: 2, y.uid: 1})
    p.forget([x.uid, y.uid])
    assert p._gone == {x.uid: 2}
    assert p.spool is not None
    p.spool.close()


def _stopping(tmp_path: Path) -> tuple[Pipeline, Occurrence, Occurrence, Occurrence]:
    """A stop with A's record in the main FIFO and C's parked, and the marks of A, B (no record
    left) and C, all deleted while the backlog waited."""
    directory = tmp_path / "spool"
    a, b, c = (make_occurrence(object_name=name) for name in "abc")
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    spool.append(a)
    spool.park(c, tries=1)
    p, _ = _pipeline(spool)
    p.checkpoint.ack({a.uid: 1, b.uid: 1, c.uid: 1})
    p.forget([a.uid, b.uid, c.uid])
    assert p._gone == {a.uid: 1, b.uid: 1, c.uid: 1}
    return p, a, b, c


def test_a_stop_keeps_the_marks_of_the_events_the_spool_holds(tmp_path: Path) -> None:
    """Read in time: A's mark (its record in the main FIFO) and C's (parked: known without reading
    the parked FIFO) go into the checkpoint, B's does not (a full ConfigMap: item 124's review)."""
    p, a, b, c = _stopping(tmp_path)
    p.keep_gone(math.inf)
    assert (p.checkpoint.accepted(a.uid), p.checkpoint.accepted(b.uid), p.checkpoint.accepted(c.uid)) == (
        1,
        0,
        1,
    )


def test_a_stop_with_no_time_left_to_read_the_spool_keeps_every_mark(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past its deadline the stop reads none of the spool (unbounded, a full one took ~1 CPU-second
    on the event loop, before the checkpoint and the ConfigMap's last write): a mark not checked may
    stand for a copy, so every one is kept, and said. Before, ``keep_gone`` took no deadline."""
    p, a, b, c = _stopping(tmp_path)
    with caplog.at_level(logging.INFO, logger="eventrouter.sink.mem"):
        p.keep_gone(time.monotonic() - 1)
    assert (p.checkpoint.accepted(a.uid), p.checkpoint.accepted(b.uid), p.checkpoint.accepted(c.uid)) == (
        1,
        1,
        1,
    )
    assert "kept the marks of 3 deleted events without reading the whole spool" in caplog.text


def test_a_stop_that_cannot_read_a_spool_segment_keeps_every_mark(tmp_path: Path) -> None:
    """A segment the stop cannot read (here a folder where the file was: EISDIR) is not known to
    hold nothing: every mark stays, as when time ran out. Before, the read error was an empty
    answer, A's mark (its record in that segment) was dropped, and a restart that could read the
    file again sent A's copy again (a review of items 244/255)."""
    p, a, b, c = _stopping(tmp_path)
    (segment,) = (tmp_path / "spool").glob("*.seg")
    held = segment.with_name("held-aside")
    segment.rename(held)
    segment.mkdir()
    p.keep_gone(math.inf)
    assert (p.checkpoint.accepted(a.uid), p.checkpoint.accepted(b.uid), p.checkpoint.accepted(c.uid)) == (
        1,
        1,
        1,
    )
    segment.rmdir()
    held.rename(segment)
