"""Damaged spool files (item 244): a record that is valid JSON of the wrong shape, a ``.seg`` file
not named by the spool, a new segment numbered below a cursor left by a clock that was ahead.

Each is skipped or set aside, counted and named; the records around it are delivered. Before, the
first ended the pipeline task (the router stopped, exit 1) after ``pop`` had moved the read position
past the good records before it, which the stop's commit then made durable: lost, counted nowhere;
the second kept the router from starting; the third was deleted unread at the next open."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import orjson
import pytest

from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.metrics import Metrics
from eventrouter.record import Occurrence
from eventrouter.sink import SinkContext
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object, make_occurrence
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.waiting import until

# Valid JSON, not a record: each used to raise out of ``pop`` (KeyError, IndexError), or (a string
# ``received_at``) out of ``_deliver`` once the sink had taken the batch. ``"garbage"`` was handled
# before (a control).
_NO_TIME = {"metadata": {"uid": "bad-uid", "name": "b", "namespace": "ns"}, "reason": "X"}
WRONG_SHAPES = {
    "object": b"{}",
    "empty-list": b"[]",
    "event-only": orjson.dumps([event_object()]),
    "string-received-at": orjson.dumps([event_object(), "x"]),
    "bool-received-at": orjson.dumps([event_object(), True]),
    "string": b'"garbage"',
    # A number that is no time, on an event with no time of its own: ``normalise`` raised
    # OverflowError out of ``pop`` (a review of item 244).
    "received-at-1e300": orjson.dumps([_NO_TIME, 1e300]),
    "received-at--1e300": orjson.dumps([_NO_TIME, -1e300]),
    "received-at-year-33658": orjson.dumps([_NO_TIME, 1e12]),
}


def _pipeline(spool: Spool, metrics: Metrics) -> tuple[Pipeline, MemorySink]:
    ctx = SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))
    sink = MemorySink(MemorySinkOptions.model_validate({}), ctx)
    return pipeline_for("mem", sink, metrics, None, spool=spool), sink


def _damage_middle(segment: Path, bad: bytes) -> None:
    lines = segment.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    segment.write_bytes(lines[0] + bad + b"\n" + lines[2])


def _spooled(directory: Path, where: str, bad: bytes) -> list[Occurrence]:
    """Three records in the main FIFO, the parked FIFO or the aside file (read first after a
    crash), the middle one replaced by ``bad``; returns the two good ones."""
    occs = [make_occurrence(object_name=f"o-{i}") for i in range(3)]
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    if where == "aside":
        (directory / "aside").write_bytes(Spool.encode(occs[0]) + bad + b"\n" + Spool.encode(occs[2]))
    else:
        for occ in occs:
            if where == "parked":
                spool.park(occ, tries=1)
            else:
                spool.append(occ)
        spool.commit()
        _damage_middle(next((directory / "parked" if where == "parked" else directory).glob("*.seg")), bad)
    spool.close()
    return [occs[0], occs[2]]


@pytest.mark.parametrize("bad", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
@pytest.mark.parametrize("where", ["main", "parked", "aside"])
async def test_a_spooled_record_of_the_wrong_shape_is_skipped_counted_and_the_others_delivered(
    tmp_path: Path, where: str, bad: bytes
) -> None:
    """The pipeline keeps running, both good records are delivered once, the damaged one is counted
    ``spool_unreadable``; after the stop the spool holds nothing (the read position passed only
    what finished). Before: the task ended with ``KeyError``/``IndexError``/``TypeError``, and for
    the main FIFO the stop's commit passed the good records, lost and counted nowhere."""
    directory = tmp_path / "spool"
    good = _spooled(directory, where, bad)
    metrics = Metrics()
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    p, sink = _pipeline(spool, metrics)
    unreadable = metrics.dropped.labels("mem", "spool_unreadable")
    async with drained(p):
        await until(lambda: len(sink.received) >= 2 and unreadable._value.get() == 1)
        await p.wait_idle(10)
    assert sorted(sink.keys) == sorted((occ.uid, occ.number) for occ in good)
    assert unreadable._value.get() == 1
    spool.commit()  # as the stop does
    spool.close()
    again = Spool(directory, max_bytes=10**7, cluster="test")
    assert len(again) + again.parked_count == 0


@pytest.mark.parametrize("decode_dropped", [False, True])
def test_damaged_records_dropped_over_the_bound_are_counted_not_raised(
    tmp_path: Path, decode_dropped: bool
) -> None:
    """The bound drops the oldest segment, damaged lines and all: each is a key ``?`` (or its key,
    when only ``received_at`` is wrong, not rebuilt for ``given_up``). Before, ``"garbage"`` raised
    ``AttributeError`` out of ``append``, into the pipeline's intake."""
    directory = tmp_path / "spool"
    first = make_occurrence(object_name="first")
    line = len(Spool.encode(first))
    spool = Spool(directory, max_bytes=40 * line, segment_bytes=10 * line, cluster="test")
    spool.append(first)
    spool.close()
    segment = next(directory.glob("*.seg"))
    damaged = [b'"garbage"', b"[[],1.5]", WRONG_SHAPES["event-only"], WRONG_SHAPES["string-received-at"]]
    segment.write_bytes(b"\n".join(damaged) + b"\n" + segment.read_bytes())
    spool = Spool(directory, max_bytes=40 * line, segment_bytes=10 * line, cluster="test")
    spool.decode_dropped = decode_dropped
    dropped: list[str] = []
    for i in range(60):
        dropped.extend(spool.append(make_occurrence(object_name=f"new-{i}")))
    spool.close()
    readable = [f"{orjson.loads(line)[0]['metadata']['uid']}/1" for line in damaged[2:]]
    assert dropped[:5] == ["?", "?", *readable, f"{first.uid}/{first.number}"]
    rebuilt = [f"{occ.uid}/{occ.number}" for occ in spool.dropped_occurrences]
    assert rebuilt == (dropped[4:] if decode_dropped else [])  # the damaged four: not rebuilt


async def test_a_segment_file_whose_name_is_not_a_number_is_set_aside_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy made by hand (``<n> (1).seg``) and a stray ``notes.seg``, in the main and the parked
    FIFO: each is moved to ``unreadable/``, counted (``data_dir_errors{file="spool"}``) and named in
    an ERROR; the spool's own records are all delivered. Before, ``int()`` of the name raised
    ``ValueError`` at open and the router could not start."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    occs = [make_occurrence(object_name=f"o-{i}") for i in range(3)]
    spool.extend(occs)
    parked = make_occurrence(object_name="parked")
    spool.park(parked)
    spool.close()
    segment = next(directory.glob("*.seg"))
    (directory / f"{segment.stem} (1).seg").write_bytes(segment.read_bytes())
    (directory / "parked" / "notes.seg").write_bytes(b"not a record\n")
    metrics = Metrics()
    with caplog.at_level(logging.ERROR, logger="eventrouter.engine.spool"):
        again = Spool(directory, max_bytes=10**7, cluster="test")
    assert len(again) == 3 and again.parked_count == 1
    p, sink = _pipeline(again, metrics)
    async with drained(p):
        await sink.wait_for(4)
        await p.wait_idle(10)
    assert sorted(sink.keys) == sorted((occ.uid, occ.number) for occ in [*occs, parked])
    assert metrics.data_dir_errors.labels("mem", "spool")._value.get() == 2
    assert metrics.dropped.labels("mem", "spool_unreadable")._value.get() == 0
    assert sorted(f.name for f in directory.glob("**/unreadable/*")) == [
        f"{segment.stem} (1).seg",
        "notes.seg",
    ]
    said = caplog.text
    assert (
        f"{segment.stem} (1).seg is not a spool segment" in said
        and "notes.seg is not a spool segment" in said
    )


def test_a_new_segment_is_numbered_above_a_cursor_left_by_a_clock_that_was_ahead(tmp_path: Path) -> None:
    """Segments written while the clock was a day ahead, read to the end; the cursor's last write
    ("0 0") fails, so the durable cursor stays on the last of them; the clock is right again. A new
    segment is numbered above that cursor, and the next open reads its records. Before, it was
    numbered by the clock, below the cursor, and the next open deleted it unread."""
    directory = tmp_path / "spool"
    directory.mkdir()
    ahead = int(time.time() * 1000) + 86_400_000
    old = [make_occurrence(object_name=f"old-{i}") for i in range(2)]
    (directory / f"{ahead}.seg").write_bytes(b"".join(Spool.encode(occ) for occ in old))
    (directory / "cursor").write_text(f"{ahead} 0")
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    assert [occ.uid for occ in spool.pop(10)] == [occ.uid for occ in old]
    (directory / "cursor.tmp").mkdir()  # the next cursor write fails (EISDIR)
    spool.commit()
    assert spool.read_errors == 1
    assert (directory / "cursor").read_text() == f"{ahead} 0"
    new = [make_occurrence(object_name=f"new-{i}") for i in range(3)]
    spool.extend(new)
    spool.close()
    again = Spool(directory, max_bytes=10**7, cluster="test")
    assert [occ.uid for occ in again.pop(10)] == [occ.uid for occ in new]
    again.close()


def test_a_new_segment_is_numbered_above_a_cursor_with_no_segment_left(tmp_path: Path) -> None:
    """The same from the open: a cursor on a segment numbered ahead of the clock, the segment gone.
    Before, the first new segment was numbered below the cursor and deleted at the next open."""
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "cursor").write_text(f"{int(time.time() * 1000) + 86_400_000} 2")
    spool = Spool(directory, max_bytes=10**7, cluster="test")
    new = [make_occurrence(object_name=f"new-{i}") for i in range(3)]
    spool.extend(new)
    spool.close()
    again = Spool(directory, max_bytes=10**7, cluster="test")
    assert len(again) == 3
    assert [occ.uid for occ in again.pop(10)] == [occ.uid for occ in new]
    again.close()
