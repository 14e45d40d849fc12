"""The sink engine: batching, retries, dead letters, bounded queues, isolation, checkpoints, spool."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter.engine.checkpoint import FileCheckpoint, MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.fanout import Fanout
from eventrouter.metrics import Metrics
from eventrouter.options import FilterOptions, PipelineOptions
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, SinkContext, SinkError, reject, retry
from eventrouter.testing import MemorySink, MemorySinkOptions, make_occurrence
from eventrouter.testing.waiting import until


def _sink(name: str = "mem") -> MemorySink:
    ctx = SinkContext(name=name, cluster="t", data_dir=None, logger=logging.getLogger(name))
    return MemorySink(MemorySinkOptions.model_validate({}), ctx)


def _pipeline(
    sink: MemorySink,
    metrics: Metrics,
    *,
    name: str = "mem",
    checkpoint: SinkCheckpoint | None = None,
    deadletter: Path | None = None,
    spool: Spool | None = None,
    filter: dict[str, Any] | None = None,
    **opts: Any,
) -> Pipeline:
    options = PipelineOptions.model_validate(
        {"batch_max_wait": 0.01, "retry_initial_backoff": 0.01, "retry_max_backoff": 0.05, **opts}
    )
    return Pipeline(
        name=name,
        sink=sink,
        options=options,
        predicate=compile_filter(FilterOptions.model_validate(filter or {})),
        checkpoint=checkpoint or SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(deadletter, sink=name),
        metrics=metrics,
        spool=spool,
    )


def value(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


async def _run(p: Pipeline) -> asyncio.Task[None]:
    return asyncio.create_task(p.run())


async def _finish(p: Pipeline, task: asyncio.Task[None]) -> None:
    p.close()
    await asyncio.wait_for(task, 10)


async def test_a_filling_batch_goes_out_once_full_and_takes_late_arrivals_at_its_deadline(
    metrics: Metrics,
) -> None:
    """Offers wake the batcher only when they can fill its batch; what arrived without waking it
    goes out with the batch at its deadline."""
    sink = _sink()
    p = _pipeline(sink, metrics, batch_max_events=10, batch_max_wait=60)
    task = await _run(p)
    p.offer(make_occurrence())
    await until(lambda: p._wake_at == 9)  # a batch of one is waiting up to 60 s for nine more
    for _ in range(9):
        p.offer(make_occurrence())
        await asyncio.sleep(0)
    await sink.wait_for(10, timeout=10)  # full long before its 60 s deadline
    assert sink.batches == [10]
    await _finish(p, task)

    sink = _sink()
    p = _pipeline(sink, metrics, name="late", batch_max_events=10, batch_max_wait=0.2)
    task = await _run(p)
    p.offer(make_occurrence())
    await until(lambda: p._wake_at == 9)
    p.offer(make_occurrence())
    p.offer(make_occurrence())  # two that do not fill the batch: no wake-up, taken at the deadline
    await sink.wait_for(3, timeout=10)
    assert sink.batches == [3]
    await _finish(p, task)


async def test_a_batch_full_by_bytes_goes_out_without_waiting_for_its_deadline(metrics: Metrics) -> None:
    """Large occurrences fill a batch by bytes long before its event count: the offer that fills it
    wakes the batcher, the batch does not wait out batch_max_wait."""
    big = [make_occurrence(message="m" * 3000) for _ in range(5)]
    sink = _sink()
    p = _pipeline(sink, metrics, batch_max_events=100, batch_max_bytes=8000, batch_max_wait=60)
    task = await _run(p)
    p.offer(big[0])
    await until(lambda: p._wake_at == 99)  # one taken; waiting up to 60 s for more
    p.offer(big[1])
    await asyncio.sleep(0)
    assert sink.batches == []  # 2 × 3.7 kB still fit in 8 kB: no wake-up yet
    p.offer(big[2])  # the third does not fit: the batch is full
    await sink.wait_for(2, timeout=10)  # long before its 60 s deadline
    assert sink.batches == [2]
    await until(lambda: p._wake_at == 99)  # the third taken, waiting again
    p.offer(big[3])
    p.offer(big[4])  # fills the second batch by bytes
    await sink.wait_for(4, timeout=10)
    assert sink.batches == [2, 2]
    await _finish(p, task)
    assert sink.batches == [2, 2, 1]


async def test_relist_patience_is_renewed_once_the_sink_has_caught_up(metrics: Metrics) -> None:
    from eventrouter.engine.pipeline import INTAKE_PATIENCE

    sink = _sink()
    p = _pipeline(sink, metrics, batch_max_wait=0.01)
    p.intake_patience = 0.0  # spent by a relist
    p.offer(make_occurrence())
    task = await _run(p)
    await sink.wait_for(1)
    await until(lambda: p.intake_patience == INTAKE_PATIENCE)  # idle again: the next relist may wait
    await _finish(p, task)


async def test_batches_respect_max_events_and_bytes(metrics: Metrics) -> None:
    sink = _sink()
    occs = [make_occurrence() for _ in range(25)]
    size = occs[0].size
    p = _pipeline(sink, metrics, batch_max_events=10, batch_max_bytes=size * 4 + 1, batch_max_wait=0.5)
    for o in occs:
        p.offer(o)
    task = await _run(p)
    await sink.wait_for(25)
    await _finish(p, task)
    assert max(sink.batches) <= 4
    assert sink.keys == [(o.uid, o.number) for o in occs]


async def test_batch_waits_for_more_then_sends_on_max_wait(metrics: Metrics) -> None:
    sink = _sink()
    p = _pipeline(sink, metrics, batch_max_events=100, batch_max_wait=0.3)
    task = await _run(p)
    p.offer(make_occurrence())
    await asyncio.sleep(0)
    p.offer(make_occurrence())
    await sink.wait_for(2)
    assert sink.batches == [2]  # both in one batch: the first waited for the second
    await _finish(p, task)


async def test_retryable_failures_are_retried_until_accepted(metrics: Metrics) -> None:
    sink = _sink()
    calls = 0

    def flaky(occ: Occurrence) -> Outcome:
        nonlocal calls
        calls += 1
        return retry("503 from destination") if calls <= 3 else OK

    sink.decide = flaky
    p = _pipeline(sink, metrics)
    task = await _run(p)
    occ = make_occurrence()
    p.offer(occ)
    await sink.wait_for(1)
    await _finish(p, task)
    assert sink.keys == [(occ.uid, occ.number)]
    assert value(metrics.retries, "mem") == 3
    assert value(metrics.delivered, "mem") == 1


async def test_retry_after_is_honoured(metrics: Metrics) -> None:
    sink = _sink()
    first = True
    seen: list[float] = []

    def once(occ: Occurrence) -> Outcome:
        nonlocal first
        seen.append(time.monotonic())
        if first:
            first = False
            return retry("429", retry_after=0.5)
        return OK

    sink.decide = once
    p = _pipeline(sink, metrics)
    task = await _run(p)
    p.offer(make_occurrence())
    await sink.wait_for(1)
    await _finish(p, task)
    assert seen[1] - seen[0] >= 0.5


async def test_a_wild_retry_after_for_one_item_is_bounded_as_for_a_whole_batch(metrics: Metrics) -> None:
    """One item set aside with `Retry-After: 86400` while the rest of its batch was taken (a webhook in
    mode=event answering 403): it was set aside for exactly that, unbounded, held until a restart with
    nothing more logged. It now waits at most `retry_wait_max`, as a whole batch does."""
    sink = _sink()
    bad = make_occurrence(reason="Refused")
    answers = {"bad": 0}

    def decide(occ: Occurrence) -> Outcome:
        if occ is bad and answers["bad"] == 0:
            answers["bad"] += 1
            return retry("403 (a gateway's policy)", retry_after=86_400.0, defer=True)
        return OK

    sink.decide = decide
    p = _pipeline(sink, metrics)  # retry_max_backoff 0.05: retry_wait_max 0.5 s
    task = await _run(p)
    good = [make_occurrence() for _ in range(3)]
    for o in [good[0], bad, *good[1:]]:
        p.offer(o)
    await sink.wait_for(4, timeout=5)
    await _finish(p, task)
    assert sorted(sink.keys) == sorted((o.uid, o.number) for o in [*good, bad])


async def test_what_a_sink_delivered_changed_is_exported_by_reason(metrics: Metrics) -> None:
    """A sink counts what it delivered changed (Loki: truncated, stamped at receipt) in ``modified``;
    the engine exports the increase after each send, an unknown reason as ``other``."""
    sink = _sink()

    odd = make_occurrence(reason="Odd")

    def decide(occ: Occurrence) -> Outcome:
        sink.modified["truncated"] += 1
        if occ is odd:
            sink.modified["shortened-name"] += 1
        return OK

    sink.decide = decide
    p = _pipeline(sink, metrics)
    task = await _run(p)
    assert value(metrics.modified, "mem", "time_adjusted") == 0  # exported at 0 from the start
    for o in [make_occurrence(), odd, make_occurrence()]:
        p.offer(o)
    await p.wait_idle(5)
    await _finish(p, task)
    assert value(metrics.modified, "mem", "truncated") == 3
    assert value(metrics.modified, "mem", "other") == 1


async def test_rejected_items_go_to_the_dead_letter_file_with_reason(
    metrics: Metrics, tmp_path: Path
) -> None:
    sink = _sink()
    bad = make_occurrence(reason="Bad")
    sink.decide = lambda o: reject("400 mapper_parsing_exception: field [reason]") if o is bad else OK
    dl = tmp_path / "dl.jsonl"
    p = _pipeline(sink, metrics, deadletter=dl)
    task = await _run(p)
    good = [make_occurrence() for _ in range(3)]
    for o in [good[0], bad, *good[1:]]:
        p.offer(o)
    await p.wait_idle(5)
    await _finish(p, task)
    assert sink.keys == [(o.uid, o.number) for o in good]
    lines = [orjson.loads(x) for x in dl.read_bytes().splitlines()]
    assert [x["key"] for x in lines] == [bad.key]
    assert lines[0]["reason"].startswith("400 mapper_parsing_exception")
    assert lines[0]["record"]["reason"] == "Bad"
    assert lines[0]["event"] == bad.raw  # what `eventrouter replay` needs to send it again
    assert value(metrics.dead_lettered, "mem", "rejected") == 1


async def test_a_dead_letter_file_that_cannot_be_written_is_counted_and_its_keys_logged(
    metrics: Metrics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    sink = _sink()
    sink.decide = lambda o: reject("400 bad")
    p = _pipeline(sink, metrics, deadletter=tmp_path / "dl" / "mem.jsonl")
    shutil.rmtree(tmp_path / "dl")  # the folder is gone: the write fails (ENOENT)
    task = await _run(p)
    bad = make_occurrence()
    p.offer(bad)
    await p.wait_idle(5)
    await _finish(p, task)
    assert value(metrics.dead_lettered, "mem", "rejected") == 1
    assert value(metrics.data_dir_errors, "mem", "deadletter") == 1
    assert f"not kept: {bad.key} (400 bad)" in caplog.text


def test_dead_letter_rotation_says_what_it_discards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "dl.jsonl"
    dl = DeadLetter(path, sink="mem", max_bytes=3000)
    batches = [[(make_occurrence(message=f"m{n}-{i}"), "400") for i in range(2)] for n in range(3)]
    with caplog.at_level(logging.WARNING):
        dl.write(batches[0])
        first = path.stat().st_size
        for batch in batches[1:]:
            dl.write(batch)
    rotations = [r.getMessage() for r in caplog.records if "rotated" in r.getMessage()]
    assert len(rotations) == 2
    assert "is gone" not in rotations[0]  # nothing older to discard yet
    assert f"(the previous dl.jsonl.1, {first} bytes of older dead letters, is gone)" in rotations[1]
    kept = [
        orjson.loads(x)["key"]
        for f in (path.with_suffix(".jsonl.1"), path)
        for x in f.read_bytes().splitlines()
    ]
    assert kept == [occ.key for occ, _ in batches[1] + batches[2]]  # the newest two batches


async def test_retries_exhausted_are_dead_lettered_not_lost(metrics: Metrics, tmp_path: Path) -> None:
    sink = _sink()
    sink.down = True
    p = _pipeline(sink, metrics, retry_max_attempts=3, deadletter=tmp_path / "dl.jsonl")
    task = await _run(p)
    occ = make_occurrence()
    p.offer(occ)
    await p.wait_idle(5)
    await _finish(p, task)
    lines = [orjson.loads(x) for x in (tmp_path / "dl.jsonl").read_bytes().splitlines()]
    assert lines[0]["key"] == occ.key and "retries exhausted after 3 attempts" in lines[0]["reason"]
    assert value(metrics.dead_lettered, "mem", "retries_exhausted") == 1


async def test_sink_exceptions_and_broken_contracts_are_retried(metrics: Metrics) -> None:
    sink = _sink()
    calls = 0

    async def broken(batch: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("bug in sink")
        if calls == 2:
            return []  # wrong number of outcomes
        return None

    sink.send = broken  # type: ignore[method-assign]
    p = _pipeline(sink, metrics)
    task = await _run(p)
    p.offer(make_occurrence())
    await p.wait_idle(5)
    await _finish(p, task)
    assert calls == 3
    assert value(metrics.send_errors, "mem", "exception") == 1
    assert value(metrics.send_errors, "mem", "contract") == 1
    assert value(metrics.delivered, "mem") == 1


async def test_full_queue_drops_oldest_and_counts_it(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    sink = _sink()
    p = _pipeline(sink, metrics, queue_max_events=5)
    occs = [make_occurrence() for _ in range(8)]
    for o in occs:
        p.offer(o)
    assert value(metrics.dropped, "mem", "queue_full") == 3
    assert "memory queue full" in caplog.text and occs[0].key in caplog.text
    task = await _run(p)
    await sink.wait_for(5)
    await _finish(p, task)
    assert sink.keys == [(o.uid, o.number) for o in occs[3:]]


async def test_filters_are_counted(metrics: Metrics) -> None:
    sink = _sink()
    p = _pipeline(sink, metrics, filter={"level": "Warning", "exclude_namespaces": "kube-*"})
    task = await _run(p)
    p.offer(make_occurrence(type="Normal"))
    p.offer(make_occurrence(namespace="kube-system"))
    keep = make_occurrence(namespace="shop")
    p.offer(keep)
    await sink.wait_for(1)
    await _finish(p, task)
    assert sink.keys == [(keep.uid, keep.number)]
    assert value(metrics.filtered, "mem") == 2


async def test_checkpoint_skips_what_the_sink_already_accepted(metrics: Metrics, tmp_path: Path) -> None:
    cp = SinkCheckpoint(FileCheckpoint(tmp_path, "mem"))
    sink = _sink()
    p = _pipeline(sink, metrics, checkpoint=cp)
    task = await _run(p)
    occ = make_occurrence(count=3)
    p.offer(occ)
    await sink.wait_for(1)
    await _finish(p, task)
    cp.close()
    # A new pipeline over the persisted checkpoint skips occurrence 3 but takes 4.
    cp2 = SinkCheckpoint(FileCheckpoint(tmp_path, "mem"))
    assert cp2.accepted(occ.uid) == 3
    sink2 = _sink()
    p2 = _pipeline(sink2, metrics, checkpoint=cp2)
    task2 = await _run(p2)
    p2.offer(occ)
    raised = make_occurrence(uid=occ.uid, count=4)
    p2.offer(raised)
    await sink2.wait_for(1)
    await _finish(p2, task2)
    assert sink2.keys == [(occ.uid, 4)]
    assert value(metrics.skipped, "mem") == 1


async def test_checkpoint_never_records_a_higher_occurrence_while_a_lower_one_is_pending(
    metrics: Metrics, tmp_path: Path
) -> None:
    cp = SinkCheckpoint(FileCheckpoint(tmp_path, "mem"))
    sink = _sink()
    uid = "u-1"
    first, second = make_occurrence(uid=uid, count=1), make_occurrence(uid=uid, count=2)
    release = asyncio.Event()
    attempts = 0

    def decide(o: Occurrence) -> Outcome:
        nonlocal attempts
        if o is first:
            attempts += 1
            return OK if release.is_set() else retry("busy")
        return OK

    sink.decide = decide
    p = _pipeline(sink, metrics, checkpoint=cp, batch_max_wait=1)
    p.offer(first)
    p.offer(second)
    task = await _run(p)
    await until(lambda: attempts >= 2)
    # 2 was accepted but 1 is still retrying: a crash now must not skip 1 on restart.
    assert FileCheckpoint(tmp_path, "mem").load().get(uid, 0) == 0
    release.set()
    await sink.wait_for(2)
    await _finish(p, task)
    assert FileCheckpoint(tmp_path, "mem").load()[uid] == 2


async def test_a_blocked_sink_never_delays_another(metrics: Metrics) -> None:
    """One sink blocked for 30 s; the other keeps its delivery latency meanwhile."""
    blocked, fast = _sink("blocked"), _sink("fast")
    blocked.blocked = asyncio.Event()
    pb = _pipeline(blocked, metrics, name="blocked", queue_max_events=100)
    pf = _pipeline(fast, metrics, name="fast", batch_max_wait=0.05)
    fanout = Fanout([pb, pf])
    tasks = [await _run(pb), await _run(pf)]
    latencies: list[float] = []
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < 30:
        occ = make_occurrence()
        sent = time.monotonic()
        fanout.publish(occ)
        n += 1
        await fast.wait_for(n, timeout=5)
        latencies.append(time.monotonic() - sent)
        await asyncio.sleep(0.1)
    assert not blocked.received  # still blocked all along
    assert value(metrics.dropped, "blocked", "queue_full") == n - 100 - 1  # one batch is in flight
    latencies.sort()
    # The fast sink's p99 stays at its own batch wait, never near the other's 30 s stall.
    assert latencies[int(len(latencies) * 0.99)] < 1.0, latencies[-5:]
    blocked.blocked.set()
    await blocked.wait_for(101)
    for p, t in zip((pb, pf), tasks, strict=True):
        await _finish(p, t)


async def test_spool_takes_overflow_in_order_and_survives_restart(metrics: Metrics, tmp_path: Path) -> None:
    sink = _sink()
    sink.down = True
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    cp_dir = tmp_path / "cp"
    p = _pipeline(
        sink,
        metrics,
        spool=spool,
        queue_max_events=10,
        checkpoint=SinkCheckpoint(FileCheckpoint(cp_dir, "m")),
    )
    occs = [make_occurrence() for _ in range(100)]
    for o in occs:
        p.offer(o)
    assert len(spool) == 90 and value(metrics.dropped, "mem", "queue_full") == 0
    task = await _run(p)
    # Shut down while the sink is down: leftovers go to the spool, nothing is lost.
    p.stop_now()
    await asyncio.wait_for(task, 5)
    older, newer = p.leftovers()
    assert newer == []  # nothing waited behind the spool: it could always be written
    spool.prepend(older)  # older than the spool's backlog: first
    spool.commit()
    p.checkpoint.close()
    reopened = Spool(tmp_path / "spool", max_bytes=10_000_000)
    assert len(reopened) == 100
    sink2 = _sink()
    p2 = _pipeline(
        sink2,
        metrics,
        spool=reopened,
        queue_max_events=10,
        checkpoint=SinkCheckpoint(FileCheckpoint(cp_dir, "m")),
    )
    task2 = await _run(p2)
    await sink2.wait_for(100)
    await _finish(p2, task2)
    assert sink2.keys == [(o.uid, o.number) for o in occs]  # each once, in the order offered


def test_owed_marks_go_on_the_first_copy_only_survive_a_reopen_and_are_read_by_a_bound_drop(
    tmp_path: Path,
) -> None:
    """What a stop keeps as owed (prepended before a backlog or appended to an empty spool) is read
    back as owed once; a second copy of the same occurrence is a plain record."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=10_000_000)
    a, b, c = (make_occurrence() for _ in range(3))
    spool.extend([a, a, b], {(a.uid, a.number)})
    spool.close()
    reopened = Spool(directory, max_bytes=10_000_000)
    assert [(o.uid, o.number) for o in reopened.pop(1)] == [(a.uid, a.number)]
    assert reopened.owed == {(a.uid, a.number)}
    reopened.owed.clear()
    reopened.pop(10)
    assert reopened.owed == set()  # the copy of a, and b
    reopened.append(b)
    owed = {(c.uid, c.number)}
    reopened.prepend([c], owed)
    assert owed == set()  # taken out as written
    again = Spool(directory, max_bytes=10_000_000)
    assert [(o.uid, o.number) for o in again.pop(1)] == [(c.uid, c.number)] and again.owed == {
        (c.uid, c.number)
    }
    # The bound reads owed records like any other to name what it drops.
    bounded = Spool(tmp_path / "small", max_bytes=10_000_000)
    bounded.extend([a, b], {(a.uid, a.number)})
    bounded.max_bytes = 1
    assert bounded.append(c) == [f"{a.uid}/{a.number}", f"{b.uid}/{b.number}"]
    for s in (reopened, again, bounded):
        s.close()


class _Crash(BaseException):
    """The process dies here: nothing after it runs, and the files stay as they are."""


@pytest.mark.parametrize("committed", [True, False])  # the cursor names the head segment, or is "0 0"
@pytest.mark.parametrize("at", ["segment", "cursor", "unlink", "none"])
def test_a_crash_anywhere_inside_prepend_loses_nothing_that_was_spooled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, committed: bool
) -> None:
    """A stop puts what was in flight and in memory before the spool's backlog, then dies (SIGKILL)
    at any point of it: before the new segment is in place, before the cursor moves to it, or while
    the old segments are deleted. Reopened, the spool holds every spooled record (a few twice, which
    the checkpoint skips), in the intended order; the memory ones once the new segment counts (before
    that the stop had kept nothing: the relist sends them again, their checkpoint never moved)."""
    import os  # the spool's own (os.replace puts a segment and the cursor in place)

    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=10_000_000, segment_bytes=1024)
    backlog = [make_occurrence() for _ in range(12)]
    spool.extend(backlog)
    if committed:
        spool.commit()
    in_flight = spool.pop(3)
    memory = [make_occurrence() for _ in range(2)]
    calls = {"replace": 0}
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        calls["replace"] += 1
        if at == "cursor" and calls["replace"] == 2:  # the new segment is in place, the cursor not moved
            raise _Crash
        real_replace(src, dst)

    def unlink(self: Spool, seg: Any) -> None:
        raise _Crash

    if at == "segment":
        monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(_Crash()))
    elif at == "cursor":
        monkeypatch.setattr(os, "replace", replace)
    elif at == "unlink":
        monkeypatch.setattr(Spool, "_unlink", unlink)
    if at == "none":
        spool.prepend(in_flight + memory)
    else:
        with pytest.raises(_Crash):
            spool.prepend(in_flight + memory)
    monkeypatch.undo()
    reopened = Spool(directory, max_bytes=10_000_000)
    read = [(o.uid, o.number) for o in reopened.pop(100)]
    reopened.close()
    intended = [(o.uid, o.number) for o in in_flight + memory + backlog[3:]]
    kept = [k for k in intended if k in read]
    # With a cursor of "0 0" the new segment, in place, is read at open even though the cursor did not
    # move: the memory records are kept, and the old segments are read again after it.
    moved = at in ("unlink", "none") or (at == "cursor" and not committed)
    assert set(kept) >= {(o.uid, o.number) for o in backlog}
    assert ((memory[0].uid, memory[0].number) in read) is moved
    first_seen = list(dict.fromkeys(read))
    assert first_seen == kept  # every record in order; copies come after the first of each
    assert len(read) - len(first_seen) <= 12  # copies: at most the old segments read again


def test_spool_appends_reach_the_file_at_once_and_never_a_deleted_segment(tmp_path: Path) -> None:
    """The tail segment stays open between appends; each append is on disk when it returns (a
    SIGKILL, i.e. no close, loses nothing), and a drained segment that was deleted is never written
    on: the next append starts a new file."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=10_000_000)
    first = [make_occurrence() for _ in range(5)]
    for o in first:
        spool.append(o)
    assert len(Spool(directory, max_bytes=10_000_000)) == 5  # read back without closing the writer
    assert [(o.uid, o.number) for o in spool.pop(10)] == [(o.uid, o.number) for o in first]
    spool.commit()  # everything read: the segment is deleted
    assert not list(directory.glob("*.seg"))
    second = [make_occurrence() for _ in range(3)]
    for o in second:
        spool.append(o)
    reopened = Spool(directory, max_bytes=10_000_000)
    assert [(o.uid, o.number) for o in reopened.pop(10)] == [(o.uid, o.number) for o in second]
    spool.close()
    spool.append(first[0])  # usable after close: reopens
    assert len(Spool(directory, max_bytes=10_000_000)) == 4
    spool.close()
    reopened.close()


@pytest.mark.parametrize("popped", [2, 3, 5])  # within a segment (its tail dropped), or whole ones
def test_the_spool_bound_never_deletes_records_in_flight_so_a_crash_reads_them_again(
    tmp_path: Path, popped: int
) -> None:
    """Over the bound, the oldest segment was deleted even when records popped from it were still
    being sent: a SIGKILL then lost them, counted as neither delivered nor dropped."""
    directory = tmp_path / "spool"
    first = [make_occurrence() for _ in range(10)]
    size = max(len(Spool.encode(o)) for o in first)
    spool = Spool(directory, max_bytes=12 * size, segment_bytes=10 * size)
    for o in first:
        spool.append(o)
    in_flight = [f"{o.uid}/{o.number}" for o in spool.pop(popped)]  # being sent; not committed
    dropped: list[str] = []
    for _ in range(20):  # new ones push the bound again and again
        dropped += spool.append(make_occurrence())
    assert dropped and not set(dropped) & set(in_flight)
    assert len(spool) + len(dropped) + len(in_flight) == 30  # every record accounted for
    # SIGKILL now: no commit, no close. The records in flight are read again after the restart.
    reopened = Spool(directory, max_bytes=100 * size)
    assert [f"{o.uid}/{o.number}" for o in reopened.pop(popped)] == in_flight
    reopened.close()
    spool.close()


def test_a_read_position_that_cannot_be_written_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An inode-full volume failed every batch's cursor write: an unthrottled error line per batch
    and no metric (the alert on eventrouter_data_dir_errors_total never fired)."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=10_000_000)
    for _ in range(6):
        spool.append(make_occurrence())
    (directory / "cursor.tmp").mkdir()  # the cursor cannot be replaced, as on a full volume
    for _ in range(3):
        spool.pop(1)
        spool.commit()
    assert spool.read_errors == 3
    assert caplog.text.count("cannot persist read position") == 1
    (directory / "cursor.tmp").rmdir()
    spool.pop(1)
    spool.commit()
    assert "read position written again after 3 failed writes" in caplog.text
    assert len(Spool(directory, max_bytes=10_000_000)) == 2
    spool.close()


async def test_a_spool_that_cannot_be_written_keeps_occurrences_in_memory_and_never_raises(
    metrics: Metrics, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    p = _pipeline(_sink(), metrics, spool=spool, queue_max_events=3)
    occs = [make_occurrence() for _ in range(8)]
    p.offer(occs[0])
    p.offer(occs[1])
    p.offer(occs[2])
    p.offer(occs[3])  # the memory queue is full: spilled to disk
    assert len(spool) == 1
    p._queue.popleft()  # room in memory again (as after a batch was taken)
    spool.close()
    shutil.rmtree(tmp_path / "spool")  # the disk is gone (as full or read-only would be)
    # Must not raise into the source. Older ones are spooled: it waits behind them, in memory.
    p.offer(occs[4])
    assert list(p._overflow) == [occs[4]] and list(p._queue) == occs[1:3]
    assert value(metrics.data_dir_errors, "mem", "spool") == 1
    assert value(metrics.dropped, "mem", "spool_error") == 0
    assert "cannot write the disk spool" in caplog.text
    # For a while the disk is not tried again, and a relist must not count on the spool.
    assert not spool.writable and not p.can_spill
    for occ in occs[5:8]:  # what waits behind the spool is bounded as memory is: the oldest goes
        p.offer(occ)
    assert value(metrics.data_dir_errors, "mem", "spool") == 1
    assert value(metrics.dropped, "mem", "spool_error") == 1
    assert list(p._overflow) == occs[5:8]
    assert p.depth == 2 + 1 + 3


async def test_a_spool_that_cannot_be_written_and_holds_nothing_drops_the_oldest_in_memory(
    metrics: Metrics, tmp_path: Path
) -> None:
    import shutil

    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    p = _pipeline(_sink(), metrics, spool=spool, queue_max_events=2)
    shutil.rmtree(tmp_path / "spool")
    occs = [make_occurrence() for _ in range(3)]
    for occ in occs:
        p.offer(occ)  # nothing is spooled: memory alone keeps the order
    assert list(p._queue) == occs[1:] and not p._overflow
    assert value(metrics.dropped, "mem", "spool_error") == 1


def _spilled(
    metrics: Metrics, tmp_path: Path, n: int, max_bytes: int
) -> tuple[MemorySink, list[Occurrence], Spool, Pipeline]:
    """``n`` occurrences of ~2 KB offered to a pipeline whose memory queue holds 10: the rest spilled
    into spool segments of ~10 occurrences each."""
    sink = _sink()
    occs = [make_occurrence(message="x" * 2000) for _ in range(n)]
    spool = Spool(tmp_path / "spool", max_bytes=max_bytes, segment_bytes=20_000)
    p = _pipeline(sink, metrics, spool=spool, queue_max_events=10)
    for o in occs:
        p.offer(o)
    return sink, occs, spool, p


async def test_spool_bound_drops_oldest_and_counts(metrics: Metrics, tmp_path: Path) -> None:
    sink, occs, spool, p = _spilled(metrics, tmp_path, 200, 100_000)
    dropped = value(metrics.dropped, "mem", "spool_full")
    assert dropped > 0
    assert spool.bytes <= 100_000
    task = await _run(p)
    await p.wait_idle(10)
    await _finish(p, task)
    # Everything is either delivered or counted as dropped; the newest survive.
    assert len(sink.received) + dropped == 200
    assert sink.received[-1] is not occs[-1] or sink.keys[-1] == (occs[-1].uid, occs[-1].number)


async def test_a_spool_segment_removed_under_the_router_is_counted_and_the_rest_delivered(
    metrics: Metrics, tmp_path: Path
) -> None:
    sink, occs, _, p = _spilled(metrics, tmp_path, 60, 10_000_000)
    segments = sorted((tmp_path / "spool").glob("*.seg"), key=lambda f: int(f.stem))
    assert len(segments) >= 3
    first = segments[0].read_bytes().count(b"\n")
    segments[0].unlink()  # a data dir cleaned by hand under the running router
    task = await _run(p)
    await p.wait_idle(10)
    await _finish(p, task)
    # Before, opening the missing file raised out of the pipeline task and stopped the router.
    assert value(metrics.dropped, "mem", "spool_unreadable") == first
    assert len(sink.received) + first == 60
    assert set(sink.keys) == {(o.uid, o.number) for o in occs[:10] + occs[10 + first :]}


async def test_a_spool_segment_that_cannot_be_read_is_counted_and_read_again_later(
    metrics: Metrics, tmp_path: Path
) -> None:
    _, _, spool, p = _spilled(metrics, tmp_path, 30, 10_000_000)
    p._queue.clear()  # as if the memory queue had been delivered: the next batch comes from the spool
    waiting = len(spool)
    segment = min((tmp_path / "spool").glob("*.seg"), key=lambda f: int(f.stem))
    data = segment.read_bytes()
    segment.unlink()
    segment.mkdir()  # opening it now fails with a real I/O error (EISDIR), not "gone"
    p._refill()  # never raises into the pipeline task
    assert value(metrics.data_dir_errors, "mem", "spool") == 1
    assert len(spool) == waiting and not p._queue  # nothing lost: the records wait
    p._refill()  # not tried again for 5 s: one log line per period, not one per offer
    assert value(metrics.data_dir_errors, "mem", "spool") == 1
    segment.rmdir()
    segment.write_bytes(data)  # readable again
    # With nothing new offered, the pipeline tries the spool again by itself (it waited for the
    # next offer before, which in a quiet cluster may not come for a long time).
    sink = p.sink
    assert isinstance(sink, MemorySink)
    task = await _run(p)
    await sink.wait_for(waiting, timeout=15)
    assert value(metrics.data_dir_errors, "mem", "spool") == 1
    assert value(metrics.dropped, "mem", "spool_unreadable") == 0
    await _finish(p, task)


def _segmented_spool(path: Path, count: int, **kw: Any) -> tuple[Spool, list[Occurrence], list[Path]]:
    occs = [make_occurrence(object_name=f"web-{i}") for i in range(count)]
    spool = Spool(path, max_bytes=10_000_000, segment_bytes=4096, **kw)  # a few records per segment
    spool.extend(occs)
    spool.commit()
    return spool, occs, sorted(path.glob("*.seg"), key=lambda f: int(f.stem))


def test_a_segment_read_to_its_end_stays_until_commit_so_a_crash_reads_its_popped_records_again(
    tmp_path: Path,
) -> None:
    """A refill that crosses a segment's end pops records that are not delivered yet; the durable
    cursor still points into that segment. Deleting it at the pop lost those records to a SIGKILL."""
    spool, occs, segments = _segmented_spool(tmp_path / "spool", 30)
    in_head = segments[0].read_bytes().count(b"\n")
    popped = spool.pop(in_head + 2)  # the head and two records of the next segment
    assert len(popped) == in_head + 2
    assert segments[0].exists()
    # SIGKILL now (nothing committed): the next start reads every popped record again.
    again = Spool(tmp_path / "spool", max_bytes=10_000_000, segment_bytes=4096)
    assert [o.key for o in again.pop(100)] == [o.key for o in occs]
    # Delivered and committed: the segment read to its end goes.
    spool.commit()
    assert not segments[0].exists() and segments[1].exists()
    assert len(Spool(tmp_path / "spool", max_bytes=10_000_000, segment_bytes=4096)) == 30 - in_head - 2
    spool.close()
    again.close()


def test_the_aside_file_read_at_open_stays_until_its_records_are_popped(tmp_path: Path) -> None:
    """Occurrences set aside (item 97) wait in the spool's aside file, past its read position. After a
    restart the pipeline's first refill, with nothing of its own set aside yet, removed that file
    before popping its records: a second crash before they were delivered lost them (those of
    events deleted meanwhile for good), counted nowhere."""
    occs = [make_occurrence(object_name=f"aside-{i}") for i in range(3)]
    first = Spool(tmp_path / "spool", max_bytes=1 << 20)
    assert first.keep_aside(occs)
    first.close()
    started = Spool(tmp_path / "spool", max_bytes=1 << 20)  # a restart
    assert started.keep_aside([])  # the first refill: may commit, nothing new to keep
    assert not started.keep_aside(occs[:1])  # something new set aside: no commit while the file waits
    # A crash now: the next start still finds them.
    again = Spool(tmp_path / "spool", max_bytes=1 << 20)
    assert [o.key for o in again.pop(10)] == [o.key for o in occs]
    assert again.keep_aside([])  # popped (and finished by the next refill): the file may go
    assert not (tmp_path / "spool" / "aside").exists()


def test_a_segment_unreadable_for_the_quarantine_period_is_set_aside_and_the_rest_goes_on(
    tmp_path: Path,
) -> None:
    spool, occs, segments = _segmented_spool(tmp_path / "spool", 30, quarantine_after=0.0)
    assert len(segments) >= 3
    head = segments[0]
    in_head = head.read_bytes().count(b"\n")
    head.unlink()
    head.mkdir()  # opening it fails with a real I/O error (EISDIR)
    assert spool.pop(100) == []  # the failing read: set aside at once with a period of 0
    assert spool.unreadable == in_head and spool.read_errors == 1
    assert (tmp_path / "spool" / "unreadable" / head.name).is_dir() and not head.exists()
    rest = spool.pop(100)
    assert [o.key for o in rest] == [o.key for o in occs[in_head:]]
    assert len(spool) == 0


def test_a_segment_unreadable_at_start_is_set_aside_instead_of_stopping_the_router(tmp_path: Path) -> None:
    spool, occs, segments = _segmented_spool(tmp_path / "spool", 30)
    spool.close()
    head = segments[0]
    in_head = head.read_bytes().count(b"\n")
    head.unlink()
    head.mkdir()
    again = Spool(tmp_path / "spool", max_bytes=10_000_000, segment_bytes=4096)  # raised before
    assert (tmp_path / "spool" / "unreadable" / head.name).exists()
    metrics = Metrics()
    sink = _sink()
    p = _pipeline(sink, metrics, spool=again, batch_max_events=100)
    p._refill()
    assert [o.key for o in p._queue] == [o.key for o in occs[in_head:]]
    assert value(metrics.data_dir_errors, "mem", "spool") == 1  # counted, the records it held unknown


async def test_spool_replay_after_crash_skips_what_was_accepted(metrics: Metrics, tmp_path: Path) -> None:
    occs = [make_occurrence() for _ in range(30)]
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    for o in occs:
        spool.append(o)
    spool.commit()
    cp = SinkCheckpoint(FileCheckpoint(tmp_path / "cp", "m"))
    sink = _sink()
    p = _pipeline(sink, metrics, spool=spool, checkpoint=cp, batch_max_events=10)
    task = await _run(p)
    await sink.wait_for(30)
    await _finish(p, task)
    # Simulate a crash before the last read position was committed: the spool replays from there,
    # the checkpoint skips everything already accepted.
    (tmp_path / "spool" / "cursor").write_text("0 0")
    for seg in (tmp_path / "spool").glob("*.seg"):
        seg.unlink()
    again = Spool(tmp_path / "spool", max_bytes=10_000_000)
    for o in occs:
        again.append(o)
    sink2 = _sink()
    p2 = _pipeline(
        sink2, metrics, spool=again, checkpoint=SinkCheckpoint(FileCheckpoint(tmp_path / "cp", "m"))
    )
    task2 = await _run(p2)
    await p2.wait_idle(5)
    await _finish(p2, task2)
    assert sink2.received == []


async def test_deferred_retries_do_not_block_new_batches(metrics: Metrics, tmp_path: Path) -> None:
    """Sinks that hold items on purpose (alert digests) get them back when due while new ones flow."""
    sink = _sink()
    sink.defer_retries = True  # type: ignore[attr-defined]
    held = make_occurrence(uid="u-held", count=1)
    later_same_event = make_occurrence(uid="u-held", count=2)
    released = asyncio.Event()

    def decide(o: Occurrence) -> Outcome:
        if o is held and not released.is_set():
            return retry("held for the digest", retry_after=0.5)
        return OK

    sink.decide = decide
    cp = SinkCheckpoint(FileCheckpoint(tmp_path, "mem"))
    p = _pipeline(sink, metrics, checkpoint=cp)
    task = await _run(p)
    p.offer(held)
    p.offer(later_same_event)
    fresh = make_occurrence()
    p.offer(fresh)
    await sink.wait_for(2)
    # The held one waits aside; the others went through, but occurrence 2 is not checkpointed
    # while 1 of the same event is still pending.
    assert sink.keys == [(later_same_event.uid, 2), (fresh.uid, fresh.number)]
    assert cp.accepted("u-held") == 0
    released.set()
    await sink.wait_for(3)
    await _finish(p, task)
    assert sink.keys[-1] == ("u-held", 1)
    assert cp.accepted("u-held") == 2


async def test_on_close_deferred_items_are_offered_once_more_so_one_already_carried_is_acknowledged(
    metrics: Metrics,
) -> None:
    """An alert robot held X for its digest window, then carried it in a message it sent for another
    batch. Its OK for X lives in its memory only; left over at a stop, X was spooled and, after the
    restart, paged a second time."""
    sink = _sink()
    sink.defer_retries = True  # type: ignore[attr-defined]
    held, other = make_occurrence(uid="u-held"), make_occurrence(uid="u-other")
    carried: set[str] = set()

    def decide(o: Occurrence) -> Outcome:
        if o.uid == held.uid:
            return OK if held.uid in carried else retry("held for the digest", retry_after=60, held=True)
        carried.add(held.uid)  # the message for `other` took the held one along
        return OK

    sink.decide = decide
    p = _pipeline(sink, metrics)
    task = await _run(p)
    p.offer(held)
    await until(lambda: p.depth == 1 and not p._in_flight)  # set aside for 60 s
    p.offer(other)
    await sink.wait_for(1)
    await _finish(p, task)
    assert p.leftovers() == ([], [])
    assert p.checkpoint.accepted(held.uid) == held.number


async def test_deferred_failures_count_towards_retry_max_attempts_but_holds_do_not(
    metrics: Metrics, tmp_path: Path
) -> None:
    """An alert robot that keeps failing an item: with retry_max_attempts it was retried for ever
    (each deferral restarted at attempt 1). Holds for a digest window are no failures."""
    sink = _sink()
    sink.defer_retries = True  # type: ignore[attr-defined]
    failing, waiting = make_occurrence(uid="u-fail"), make_occurrence(uid="u-wait")
    holds = tries = 0

    def decide(o: Occurrence) -> Outcome:
        nonlocal holds, tries
        if o.uid == failing.uid:
            tries += 1
            return retry("robot answered 502")
        holds += 1
        return OK if holds > 5 else retry("held for the digest", retry_after=0.01, held=True)

    sink.decide = decide
    p = _pipeline(sink, metrics, deadletter=tmp_path / "dl", retry_max_attempts=3)
    task = await _run(p)
    p.offer(failing)
    p.offer(waiting)
    await until(lambda: value(metrics.dead_lettered, "mem", "retries_exhausted") == 1)
    await sink.wait_for(1)
    await _finish(p, task)
    assert sink.keys == [(waiting.uid, waiting.number)]  # held five times, then sent: not exhausted
    assert tries == 3
    [line] = (tmp_path / "dl").read_text().splitlines()
    assert orjson.loads(line)["reason"] == "retries exhausted after 3 attempts: robot answered 502"
    assert value(metrics.retries, "mem") == 2  # the two failures that were tried again; no holds


async def test_a_robot_that_fails_is_down_and_says_so_but_one_that_holds_is_up(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """A deferring sink's failed sends set its items aside and reported it up, with no log line:
    paging had stopped and EventrouterSinkFailing (sink_up == 0) never fired."""
    sink = _sink()
    sink.defer_retries = True  # type: ignore[attr-defined]
    mode = "hold"

    def decide(o: Occurrence) -> Outcome:
        if mode == "hold":
            return retry("held for the digest", retry_after=0.05, held=True)
        return retry("robot answered HTTP 502") if mode == "fail" else OK

    sink.decide = decide
    p = _pipeline(sink, metrics)
    task = await _run(p)
    p.offer(make_occurrence())
    await until(lambda: sink.batches)
    assert value(metrics.sink_up, "mem") == 1 and "not accepted" not in caplog.text
    mode = "fail"
    await until(lambda: value(metrics.sink_up, "mem") == 0)
    assert (
        "sink mem: 1 occurrences not accepted (robot answered HTTP 502); set aside for a retry" in caplog.text
    )
    mode = "ok"
    await sink.wait_for(1)
    await until(lambda: value(metrics.sink_up, "mem") == 1)
    await _finish(p, task)


def test_throttled_warnings_say_how_many_they_held_back_once_the_period_is_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a burst of drops the log said one, and the count of the rest never came."""
    from eventrouter.logs import Throttled

    throttled = Throttled(logging.getLogger("t"), period=3600)
    for i in range(95):
        throttled.warning("queue_full", "dropped oldest occurrence %s", i)
    throttled.report()  # the period is not over: nothing yet
    assert caplog.text.count("dropped oldest") == 1 and "more" not in caplog.text
    throttled.report(now=True)  # a stop
    assert "94 more 'queue_full' conditions since the last report" in caplog.text


@pytest.mark.parametrize("answer", ["cancelled", "bools", "generator"])
async def test_a_sink_that_breaks_the_send_contract_is_retried_and_its_pipeline_goes_on(
    metrics: Metrics, answer: str
) -> None:
    """A stray CancelledError from a plugin's send ended the pipeline task unseen (health and
    metrics said all was well); outcomes of the wrong type crashed it and stopped the router."""
    calls = 0

    class Broken(MemorySink):
        async def send(self, batch: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                return await super().send(batch)
            if answer == "cancelled":
                raise asyncio.CancelledError
            if answer == "generator":  # any iterable of outcomes will do
                return (outcome for outcome in await super().send(batch) or [])
            return [True] * len(batch)

    ctx = SinkContext(name="mem", cluster="t", data_dir=None, logger=logging.getLogger("mem"))
    sink = Broken(MemorySinkOptions.model_validate({}), ctx)
    p = _pipeline(sink, metrics)
    task = await _run(p)
    p.offer(make_occurrence())
    await sink.wait_for(1)
    assert not task.done()
    await _finish(p, task)
    errors = {"cancelled": ("exception", 1), "bools": ("contract", 1), "generator": ("contract", 0)}
    kind, count = errors[answer]
    assert value(metrics.send_errors, "mem", kind) == count


async def test_a_stop_during_a_sink_swap_still_closes_the_previous_instance(metrics: Metrics) -> None:
    """Cancelled while the previous instance was closing, it was dropped unclosed (its connections
    leaked: a Kafka producer could go on writing)."""

    class SlowClose(MemorySink):
        closing = asyncio.Event()

        async def aclose(self) -> None:
            if not self.closed:
                self.closed += 1
                SlowClose.closing.set()
                await asyncio.sleep(3600)  # a close that hangs, cancelled by the stop
            self.closed += 1

    ctx = SinkContext(name="mem", cluster="t", data_dir=None, logger=logging.getLogger("mem"))
    old = SlowClose(MemorySinkOptions.model_validate({}), ctx)
    p = _pipeline(old, metrics, send_timeout=3600)
    task = await _run(p)
    await until(lambda: old.started)
    p.replace_sink(_sink())
    p.offer(make_occurrence())  # the next send swaps
    await SlowClose.closing.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await p.close_sink()
    assert old.closed == 2  # the close was tried again at the stop


async def test_a_held_retry_is_no_attempt_for_an_in_line_sink_either(
    metrics: Metrics, tmp_path: Path
) -> None:
    sink = _sink()
    holds = 0

    def decide(o: Occurrence) -> Outcome:
        nonlocal holds
        holds += 1
        return OK if holds > 3 else retry("waiting for its own rate limit", retry_after=0.01, held=True)

    sink.decide = decide
    p = _pipeline(sink, metrics, deadletter=tmp_path / "dl", retry_max_attempts=1)
    task = await _run(p)
    p.offer(make_occurrence())
    await sink.wait_for(1)
    await _finish(p, task)
    assert value(metrics.dead_lettered, "mem", "retries_exhausted") == 0
    assert value(metrics.retries, "mem") == 0


async def test_a_sink_failing_for_hours_keeps_retrying_without_crashing_its_pipeline(
    metrics: Metrics,
) -> None:
    """After 1,024 failed attempts 2**n overflowed the float: the pipeline task crashed and the
    router stopped (about 6 hours of outage at the defaults)."""
    sink = _sink()
    sink.decide = lambda o: retry("down")
    p = _pipeline(sink, metrics, retry_initial_backoff=0.0001, retry_max_backoff=0.0001)
    task = await _run(p)
    p.offer(make_occurrence())
    await until(lambda: value(metrics.retries, "mem") > 1100 or task.done(), timeout=30)
    assert not task.done()
    p.stop_now()
    await asyncio.wait_for(task, 10)


def test_a_damaged_checkpoint_file_is_read_line_by_line_and_its_bad_lines_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Invalid UTF-8 or a '²' for a number stopped every start with a message naming no file."""
    cp = FileCheckpoint(tmp_path, "mem")
    cp.snapshot.write_bytes(b"u1 3\nu2 \xff\xfe\nu3 \xc2\xb2\nu4 7\n")
    cp.journal.write_bytes(b"+ u5 \xc2\xb2\n+ u6 2\n")
    assert cp.load() == {"u1": 3, "u4": 7, "u6": 2}
    assert f"checkpoint {cp.snapshot}: skipped 2 unreadable snapshot lines" in caplog.text


def test_checkpoint_forgets_deleted_events_in_groups_and_on_close(tmp_path: Path) -> None:
    cp = SinkCheckpoint(FileCheckpoint(tmp_path, "mem"))
    cp.ack({f"u{i}": 1 for i in range(400)})
    cp.forget(f"u{i}" for i in range(300))  # over the group size: written at once
    journal = (tmp_path / "mem.journal").read_text().splitlines()
    assert sum(line.startswith("- ") for line in journal) == 300
    assert len(FileCheckpoint(tmp_path, "mem").load()) == 100
    cp.forget(["u300", "u301", "not-there"])  # held back, then covered by the closing snapshot
    cp.close()
    state = FileCheckpoint(tmp_path, "mem").load()
    assert len(state) == 98 and "u300" not in state and "u399" in state


@pytest.mark.parametrize(
    ("options", "kept", "dropped"),
    [
        ({"types": "Warning"}, {"type": "Warning"}, {"type": "Normal"}),
        ({"types": "warning"}, {"type": "Warning"}, {"type": "Normal"}),  # kept nothing before
        ({"level": "Normal"}, {"type": "Normal"}, None),
        ({"level": "warning", "types": "Normal,Warning"}, {"type": "Warning"}, {"type": "Normal"}),
        ({"namespaces": "shop,pay-*"}, {"namespace": "pay-eu"}, {"namespace": "default"}),
        ({"exclude_namespaces": "kube-*"}, {"namespace": "shop"}, {"namespace": "kube-system"}),
        ({"kinds": "Pod"}, {"kind": "Pod"}, {"kind": "Node"}),
        ({"exclude_kinds": "Node"}, {"kind": "Pod"}, {"kind": "Node"}),
        ({"reasons": "BackOff,OOM*"}, {"reason": "OOMKilling"}, {"reason": "Pulled"}),
        ({"exclude_reasons": "Pulled"}, {"reason": "BackOff"}, {"reason": "Pulled"}),
        ({"message": "refused|timeout"}, {"message": "connect: connection refused"}, {"message": "ok"}),
        ({"exclude_message": "^Successfully"}, {"message": "failed"}, {"message": "Successfully pulled"}),
        ({"components": "kubelet"}, {"component": "kubelet"}, {"component": "default-scheduler"}),
        ({"min_count": "3"}, {"count": 3}, {"count": 2}),
    ],
)
def test_every_filter_option_keeps_and_drops(
    options: dict[str, Any], kept: dict[str, Any], dropped: dict[str, Any] | None
) -> None:
    predicate = compile_filter(FilterOptions.model_validate(options))
    if dropped is None:
        assert predicate is None or predicate(make_occurrence(**kept))
        return
    assert predicate is not None
    assert predicate(make_occurrence(**kept))
    assert not predicate(make_occurrence(**dropped))


def test_level_warning_with_types_without_warning_is_refused() -> None:
    """Together they keep nothing; the filter used to keep everything (a robot paged Normal events)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="level=Warning keeps Warning events only and types=Normal"):
        FilterOptions.model_validate({"level": "Warning", "types": "Normal"})


async def test_memory_queue_bound_is_smaller_when_the_disk_spool_takes_the_backlog(tmp_path: Path) -> None:
    metrics = Metrics()
    assert _pipeline(_sink(), metrics, name="a").queue_max == 10_000
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    assert _pipeline(_sink(), metrics, name="b", spool=spool).queue_max == 1_000
    assert _pipeline(_sink(), metrics, name="c", spool=spool, queue_size=50).queue_max == 50
    # The bound is what decides spilling (the pipeline is not running: everything waits).
    p = _pipeline(_sink(), metrics, name="d", spool=spool)
    for i in range(1_001):
        p.offer(make_occurrence(uid=f"u{i}"))
    assert len(p._queue) == 1_000 and len(spool) == 1


async def test_an_idle_pipeline_keeps_no_occurrence_it_delivered(metrics: Metrics) -> None:
    """The last batch is not kept while the pipeline waits for the next one (memory of an idle
    router: a relist's last batch, records and encodings, stayed in every pipeline)."""
    sink = _sink()
    p = _pipeline(sink, metrics)
    task = await _run(p)
    for _ in range(5):
        p.offer(make_occurrence())
    await sink.wait_for(5)
    uids = {occ.uid for occ in sink.received}
    sink.received.clear()
    await p.wait_idle(10)
    gc.collect()
    kept = [o for o in gc.get_objects() if isinstance(o, Occurrence) and o.uid in uids]
    assert kept == []
    await _finish(p, task)


async def test_a_batch_still_being_filled_when_the_task_is_cancelled_is_left_over_not_lost(
    metrics: Metrics,
) -> None:
    """A stop gives the pipelines 1 s, then cancels them. A batch taken from the queue and waiting
    for more lived only in the task's frame: cancelled there, it was gone, counted nowhere."""
    sink = _sink()
    p = _pipeline(sink, metrics, batch_max_events=10, batch_max_wait=60)
    task = await _run(p)
    occs = [make_occurrence() for _ in range(3)]
    for occ in occs:
        p.offer(occ)
    await until(lambda: len(p._filling) == 3 and not p._queue)
    assert p.depth == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    older, newer = p.leftovers()
    assert older == occs and newer == [] and sink.received == []


async def test_a_sink_that_cannot_start_yet_is_still_tried_while_draining(metrics: Metrics) -> None:
    """A drain (SIGTERM, the end of a replay) gives a sink that has not started yet the same chance as
    one that started and then failed: it is tried until the deadline, and what it then accepts is
    delivered. Before, a failed start during a drain gave up at once and dropped the whole queue."""

    class LateSink(MemorySink):
        attempts = 0

        async def start(self) -> None:
            self.attempts += 1
            if self.attempts <= 3:
                raise SinkError("destination not up yet")
            await super().start()

    ctx = SinkContext(name="late", cluster="t", data_dir=None, logger=logging.getLogger("late"))
    sink = LateSink(MemorySinkOptions.model_validate({}), ctx)
    p = _pipeline(sink, metrics, name="late")
    occs = [make_occurrence(object_name=f"late-{i}") for i in range(5)]
    for occ in occs:
        p.offer(occ)
    task = await _run(p)
    p.close()  # the drain begins before the sink could start
    await asyncio.wait_for(task, 10)
    assert sink.attempts == 4
    assert sink.keys == [(o.uid, o.number) for o in occs]
    assert value(metrics.send_errors, "late", "start") == 3


# ---- a sink replaced by one built from re-read options (engine/reload.py) -----------------------


def _ctx(name: str = "mem") -> SinkContext:
    return SinkContext(name=name, cluster="t", data_dir=None, logger=logging.getLogger(name))


async def test_a_replaced_sink_finishes_its_send_and_the_next_batch_goes_to_the_new_one(
    metrics: Metrics,
) -> None:
    old, new = _sink(), _sink()
    old.blocked = asyncio.Event()
    p = _pipeline(old, metrics)
    task = await _run(p)
    first = make_occurrence(object_name="first")
    p.offer(first)
    await until(lambda: bool(p._in_flight))  # the old instance holds the batch
    p.replace_sink(new)
    second = make_occurrence(object_name="second")
    p.offer(second)
    old.blocked.set()
    await new.wait_for(1)
    assert old.keys == [(first.uid, first.number)]
    assert new.keys == [(second.uid, second.number)]
    assert p.sink is new and new.started and old.closed == 1
    await _finish(p, task)
    await p.close_sink()  # the router's last step
    assert new.closed == 1 and old.closed == 1


async def test_a_replacement_ends_a_wait_between_retries_at_once(metrics: Metrics) -> None:
    """The old credential is refused and the next retry is a minute away: the new one sends now."""
    old, new = _sink(), _sink()
    old.down = True
    p = _pipeline(old, metrics, retry_initial_backoff=60, retry_max_backoff=60)
    task = await _run(p)
    occ = make_occurrence()
    p.offer(occ)
    await until(lambda: value(metrics.send_errors, "mem", "retryable") == 1)
    p.replace_sink(new)
    await new.wait_for(1, timeout=10)
    assert new.keys == [(occ.uid, occ.number)] and old.keys == []
    await _finish(p, task)


async def test_closing_a_replaced_sink_is_bounded_by_send_timeout_and_a_failing_take_over_is_logged(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """A close that hangs on a broken connection, or a plugin's take_over that raises, must not stop
    the pipeline: both are logged and the new instance sends."""
    never = asyncio.Event()

    class HangingClose(MemorySink):
        async def aclose(self) -> None:
            await never.wait()

    class BadTakeOver(MemorySink):
        def take_over(self, previous: Any) -> None:
            raise RuntimeError("cannot carry over")

    old = HangingClose(MemorySinkOptions.model_validate({}), _ctx())
    new = BadTakeOver(MemorySinkOptions.model_validate({}), _ctx())
    p = _pipeline(old, metrics, send_timeout=0.2)
    task = await _run(p)
    p.offer(make_occurrence(object_name="before"))
    await old.wait_for(1)
    p.replace_sink(new)
    occ = make_occurrence(object_name="after")
    p.offer(occ)
    await new.wait_for(1, timeout=10)
    assert new.keys == [(occ.uid, occ.number)]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, "sink mem: closing the previous instance raised TimeoutError: ") in messages
    assert (logging.ERROR, "sink mem: take_over from the previous instance raised") in messages
    await _finish(p, task)


async def test_replacements_made_while_the_previous_instance_closes_are_closed_too(metrics: Metrics) -> None:
    """Two more rotations while the replaced instance is still closing: the first of them is
    superseded before it was used, and was dropped without being closed (its connections leaked)."""
    closing, may_close = asyncio.Event(), asyncio.Event()

    class SlowClose(MemorySink):
        async def aclose(self) -> None:
            closing.set()
            await may_close.wait()
            await super().aclose()

    old = SlowClose(MemorySinkOptions.model_validate({}), _ctx())
    first, unused, newest = _sink(), _sink(), _sink()
    p = _pipeline(old, metrics)
    task = await _run(p)
    p.replace_sink(first)
    p.offer(make_occurrence())
    await closing.wait()  # the swap to `first` is closing `old`
    p.replace_sink(unused)
    p.replace_sink(newest)
    may_close.set()
    await newest.wait_for(1)  # the newest is taken before the batch is sent
    assert unused.closed == 1 and not unused.started
    assert first.closed == 1 and first.keys == []
    await _finish(p, task)


async def test_a_replacement_replaced_before_its_first_send_is_closed_and_never_used(
    metrics: Metrics,
) -> None:
    old, unused, newest = _sink(), _sink(), _sink()
    old.blocked = asyncio.Event()
    p = _pipeline(old, metrics)
    task = await _run(p)
    p.offer(make_occurrence())
    await until(lambda: bool(p._in_flight))
    p.replace_sink(unused)
    p.replace_sink(newest)  # the file changed again before the pipeline's next send
    old.blocked.set()
    occ = make_occurrence(object_name="next")
    p.offer(occ)
    await newest.wait_for(1)
    assert newest.keys == [(occ.uid, occ.number)]
    assert unused.closed == 1 and not unused.started and unused.keys == []
    await _finish(p, task)


# ---- deferred retries (alert robots: `defer_retries`) -------------------------------------------


def _robot(name: str = "robot") -> MemorySink:
    """A sink that holds items back on purpose: everything it does not take comes back later."""
    sink = _sink(name)
    sink.defer_retries = True  # type: ignore[attr-defined]
    sink.decide = lambda occ: retry("robot unreachable", retry_after=60)
    return sink


async def test_deferred_retries_count_against_the_memory_bound(metrics: Metrics, tmp_path: Path) -> None:
    """A robot that is down answers RETRY for everything: deferred aside, the items never filled the
    memory queue, so nothing spilled and nothing was dropped while memory grew without bound."""
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    p = _pipeline(_robot(), metrics, name="robot", spool=spool, queue_max_events=20, batch_max_events=10)
    bare = _pipeline(_robot("bare"), metrics, name="bare", queue_max_events=20, batch_max_events=10)
    tasks = [await _run(p), await _run(bare)]
    for _ in range(200):
        p.offer(make_occurrence())
        bare.offer(make_occurrence())
        await asyncio.sleep(0)
    await until(lambda: len(p._deferred) == 20 and not bare._in_flight)
    assert len(p._queue) == 0 and len(spool) == 180  # the rest waits on disk
    assert value(metrics.dropped, "robot", "spool_error") == 0
    # Without a disk: bounded (a batch sent meanwhile comes back on top), the oldest dropped, counted.
    held = len(bare._queue) + len(bare._deferred)
    assert held <= 20 + 10
    assert value(metrics.dropped, "bare", "queue_full") >= 200 - 30
    for task, pipeline in zip(tasks, (p, bare), strict=True):
        pipeline.stop_now()
        await asyncio.wait_for(task, 5)


async def test_the_spool_read_position_stays_before_deferred_items_it_gave(
    metrics: Metrics, tmp_path: Path
) -> None:
    """Items taken from the spool and deferred are in memory only: the durable read position must
    not pass them, or a SIGKILL loses them (their events may be gone from the API server)."""
    occs = [make_occurrence(object_name=f"w-{i}") for i in range(15)]
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    spool.extend(occs)
    spool.commit()
    sink = _robot()
    taking = False
    sink.decide = lambda occ: OK if taking else retry("robot unreachable", retry_after=0.2)
    p = _pipeline(sink, metrics, name="robot", spool=spool, batch_max_events=10)
    task = await _run(p)
    await until(lambda: len(p._deferred) == 15)  # both refills taken and deferred
    # SIGKILL now: the next start reads all 15 again.
    assert [o.key for o in Spool(tmp_path / "spool", max_bytes=10_000_000).pop(100)] == [o.key for o in occs]
    taking = True  # the robot takes them when they next come due
    await sink.wait_for(15)
    await until(lambda: not p._spooled_deferred)
    p._refill()  # the next refill may pass them now
    assert len(Spool(tmp_path / "spool", max_bytes=10_000_000)) == 0
    await _finish(p, task)


# ---- items set aside by the sink (`retry(..., defer=True)`) -------------------------------------


def _refusing_b(sink: MemorySink, state: dict[str, bool]) -> None:
    """A destination that refuses one key of its own (a Loki stream over the stream limit, an
    Elasticsearch index without the privilege) while it takes the rest."""

    def decide(occ: Occurrence) -> Outcome:
        if state["refusing"] and occ.record["involved_object"]["name"].startswith("b"):
            return retry("stream b is over the stream limit", defer=True)
        return OK

    sink.decide = decide


async def test_items_refused_for_a_cause_of_their_own_wait_aside_while_later_batches_go_on(
    metrics: Metrics,
) -> None:
    """Retried in place, b-0 held up every later batch for as long as its stream was refused."""
    sink = _sink()
    state = {"refusing": True}
    _refusing_b(sink, state)
    p = _pipeline(sink, metrics, batch_max_events=5)
    task = await _run(p)
    b = make_occurrence(object_name="b-0")
    p.offer(b)
    later = [make_occurrence(object_name=f"a-{i}") for i in range(20)]
    for occ in later:
        await until(lambda: not p._queue)  # one batch at a time: each after b-0 was refused
        p.offer(occ)
    await sink.wait_for(20)
    assert (b.uid, b.number) not in sink.keys and b.uid in p._held  # aside, or in a batch of its own
    assert value(metrics.retries, "mem") >= 1
    state["refusing"] = False
    await sink.wait_for(21)
    await p.wait_idle(5)
    assert sorted(sink.keys) == sorted((o.uid, o.number) for o in [b, *later])
    assert p.checkpoint.accepted(b.uid) == b.number
    await _finish(p, task)


async def test_items_set_aside_still_end_at_retry_max_attempts_and_a_plain_retry_blocks(
    metrics: Metrics, tmp_path: Path
) -> None:
    """Set aside, an item still counts its failed attempts: dead-lettered after retry_max_attempts.
    A send with any plain retry (the destination failing, not one key) is retried in place."""
    sink = _sink()
    state = {"refusing": True}
    _refusing_b(sink, state)
    p = _pipeline(sink, metrics, retry_max_attempts=3, deadletter=tmp_path / "dl")
    task = await _run(p)
    p.offer(make_occurrence(object_name="b-0"))
    await until(lambda: value(metrics.dead_lettered, "mem", "retries_exhausted") == 1)
    assert not p._deferred and "retries exhausted after 3 attempts" in (tmp_path / "dl").read_text()
    plain = make_occurrence(object_name="c-0")
    sink.decide = lambda occ: retry("503") if occ is plain else retry("refused", defer=True)
    p.offer(plain)
    p.offer(make_occurrence(object_name="b-1"))
    await until(lambda: value(metrics.retries, "mem") >= 5)
    assert p._in_flight and not p._deferred  # both retried in place
    sink.decide = None
    await sink.wait_for(2)
    await _finish(p, task)


async def test_an_item_from_the_spool_set_aside_is_kept_apart_and_the_read_position_passes_it(
    metrics: Metrics, tmp_path: Path
) -> None:
    """Set aside, a spooled item is in memory only. Before, the durable read position stayed before it
    for as long as it waited (hours, for a refused Loki stream): every segment read since stayed on
    disk, counted towards the bound, and new spills were dropped. It is now kept in the spool's file of
    its own: a crash reads it back (and only it), and the segments go."""
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    occs = [make_occurrence(object_name=n) for n in ("a-0", "b-0", "a-1")]
    spool.extend(occs)
    spool.commit()
    sink = _sink()
    state = {"refusing": True}
    _refusing_b(sink, state)
    p = _pipeline(sink, metrics, spool=spool, retry_initial_backoff=0.2, retry_max_backoff=0.2)
    task = await _run(p)
    await sink.wait_for(2)
    await until(lambda: len(p._deferred) == 1)
    p._refill()
    assert not list((tmp_path / "spool").glob("*.seg"))  # read past, deleted
    crashed = Spool(tmp_path / "spool", max_bytes=10_000_000)  # SIGKILL now: only b-0 is read back
    assert [o.key for o in crashed.pop(10)] == [occs[1].key]
    state["refusing"] = False
    await sink.wait_for(3)
    await p.wait_idle(5)
    p._refill()
    assert p._popped == []  # nothing delivered is kept referenced once idle
    assert len(Spool(tmp_path / "spool", max_bytes=10_000_000)) == 0
    assert not (tmp_path / "spool" / "aside").exists()
    await _finish(p, task)


async def test_a_copy_of_an_occurrence_waiting_aside_is_skipped_not_sent_beside_it(metrics: Metrics) -> None:
    """A robot holds X/2 for its digest window; a second copy of X/2 offered meanwhile (a restart's
    spool copy beside its relisted one) was taken as new and paged beside the first."""
    sink = _sink("robot")
    sink.defer_retries = True  # type: ignore[attr-defined]
    seen: set[tuple[str, int]] = set()

    def decide(occ: Occurrence) -> Outcome:
        key = (occ.uid, occ.number)
        if key in seen:
            return OK
        seen.add(key)
        return retry("digest window", retry_after=0.3, held=True)

    sink.decide = decide
    p = _pipeline(sink, metrics, name="robot")
    task = await _run(p)
    occ = make_occurrence()
    p.offer(occ)
    await until(lambda: len(p._deferred) == 1)
    p.offer(make_occurrence(uid=occ.uid))  # the same uid and count: a copy
    await sink.wait_for(1)
    await p.wait_idle(5)
    assert sink.keys == [(occ.uid, occ.number)]
    assert value(metrics.skipped, "robot") == 1
    await _finish(p, task)


async def test_an_item_set_aside_then_given_up_in_place_is_let_go(metrics: Metrics, tmp_path: Path) -> None:
    """X/1 set aside, then due in a batch the destination failed as a whole until retry_max_attempts:
    dead-lettered, but still held, so X/2 accepted later was never recorded and a clean restart's
    relist sent it again."""
    sink = _sink()
    x1 = make_occurrence(object_name="b-0", count=1)
    x2 = make_occurrence(object_name="b-0", uid=x1.uid, count=2)
    sink.decide = lambda occ: retry("stream b over the limit", defer=True) if occ.number == 1 else OK
    p = _pipeline(sink, metrics, retry_max_attempts=3, deadletter=tmp_path / "dl", retry_initial_backoff=0.05)
    task = await _run(p)
    p.offer(x1)
    await until(lambda: len(p._deferred) == 1)
    sink.down = True  # the whole destination fails while X/1 is due: retried in place, given up
    await until(lambda: value(metrics.dead_lettered, "mem", "retries_exhausted") == 1)
    sink.down = False
    assert not p._held and not p._failures
    p.offer(x2)
    await sink.wait_for(1)
    await p.wait_idle(5)
    assert p.checkpoint.accepted(x1.uid) == 2
    await _finish(p, task)


async def test_a_spooled_item_set_aside_for_long_does_not_make_the_spool_drop_new_spills(
    metrics: Metrics, tmp_path: Path
) -> None:
    """One spooled item refused for a cause of its own for as long as the test runs: before, the read
    position stayed before it, every segment read since counted towards the bound, and new spills
    were dropped as `spool_full` though the unread backlog was small."""
    spool = Spool(tmp_path / "spool", max_bytes=300_000, segment_bytes=20_000)
    b = make_occurrence(object_name="b-0")
    spool.extend([b] + [make_occurrence(object_name="a-x") for _ in range(5)])
    spool.commit()
    sink = _sink()
    _refusing_b(sink, {"refusing": True})
    p = _pipeline(
        sink,
        metrics,
        spool=spool,
        queue_max_events=20,
        batch_max_events=20,
        retry_initial_backoff=0.5,
        retry_max_backoff=1.0,
    )
    task = await _run(p)
    for _ in range(40):  # about 2.4 MB spilled and read in all, 8 times the bound
        for _ in range(60):
            p.offer(make_occurrence(object_name="a-y"))
        await until(lambda: len(spool) == 0 and not p._queue, timeout=20)
    await until(lambda: len(sink.received) == 5 + 40 * 60)  # the last batch, in flight a moment ago
    assert value(metrics.dropped, "mem", "spool_full") == 0 and b.uid in p._held
    p._refill()
    assert sum(f.stat().st_size for f in (tmp_path / "spool").glob("*.seg")) < 300_000
    p.stop_now()
    await asyncio.wait_for(task, 5)


async def test_a_key_refused_on_its_own_leaves_the_sink_up_while_the_rest_goes_in(metrics: Metrics) -> None:
    """One index refused, others taken: sink_up flipped to 0 at each retry of the refused item and
    back at the next batch. It stays 1 now; with nothing else taken (all traffic to that index) it is 0."""
    sink = _sink()
    state = {"refusing": True}
    _refusing_b(sink, state)
    # b-0 due again at once: every later batch carries it beside an a-*.
    p = _pipeline(sink, metrics, retry_initial_backoff=0.001, retry_max_backoff=0.001)
    task = await _run(p)
    up = metrics.sink_up.labels("mem")
    p.offer(make_occurrence(object_name="b-0"))
    await until(lambda: up._value.get() == 0)  # nothing else taken: down
    samples = []
    for i in range(20):
        p.offer(make_occurrence(object_name=f"a-{i}"))
        await sink.wait_for(i + 1)
        samples.append(up._value.get())
    assert samples == [1] * 20
    state["refusing"] = False
    await p.wait_idle(5)
    await _finish(p, task)


async def test_a_set_aside_item_retried_alone_in_a_quiet_sink_leaves_it_up(metrics: Metrics) -> None:
    """b-0 refused for its own cause while a-0 beside it went in, then nothing else to send: each retry
    of b-0 alone marked the sink down until the next batch. A send of set-aside items only says
    nothing of the rest: sink_up stays 1. A new item for the refused key alone still marks it down."""
    sink = _sink()
    state = {"refusing": True}
    _refusing_b(sink, state)
    p = _pipeline(sink, metrics, retry_initial_backoff=0.05, retry_max_backoff=0.05)
    task = await _run(p)
    up = metrics.sink_up.labels("mem")
    p.offer(make_occurrence(object_name="b-0"))
    p.offer(make_occurrence(object_name="a-0"))  # one batch: a-0 taken, b-0 set aside
    await sink.wait_for(1)
    assert up._value.get() == 1 and value(metrics.retries, "mem") == 1
    assert p.queued == 1  # b-0 waits aside: in memory, so in the queue-depth gauge
    for n in range(1, 5):
        tries = n + 1  # b-0 retried alone, refused again
        await until(lambda: value(metrics.retries, "mem") >= tries)  # noqa: B023 - awaited at once
        assert up._value.get() == 1, f"down after retry {n} of the set-aside item alone"
    p.offer(make_occurrence(object_name="b-1"))  # new traffic, and all of it to the refused key
    await until(lambda: up._value.get() == 0)
    state["refusing"] = False
    await sink.wait_for(3)
    await p.wait_idle(5)
    assert up._value.get() == 1
    await _finish(p, task)
