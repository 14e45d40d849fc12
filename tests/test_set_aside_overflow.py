"""A key the sink refuses for long (``retry(..., defer=True)``: a Loki stream over the stream limit, an
Elasticsearch index the role may not write) with more items than the memory queue holds. Before, the
items set aside counted against the whole bound (item 97's Left): the queue filled with them, and the
other keys' new occurrences were dropped (no spool) or spilled and never read back (a spool). Now they
take at most half the bound: beyond it they are parked in the spool, or without one the oldest set
aside give way, counted and told to the sink."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Unpack

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
from eventrouter.testing.pipelines import Knobs, pipeline_for
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

Key = tuple[str, int]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def _sink() -> Listening:
    ctx = SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))
    return Listening(MemorySinkOptions.model_validate({}), ctx)


_KNOBS: Knobs = {
    "retry_initial_backoff": 0.02,
    "retry_max_backoff": 0.1,
    "queue_max_events": 20,
    "batch_max_events": 10,
}


def _pipeline(
    sink: MemorySink, metrics: Metrics, spool: Spool | None = None, **opts: Unpack[Knobs]
) -> Pipeline:
    return pipeline_for("mem", sink, metrics, None, spool=spool, **(_KNOBS | opts))


def _refusing(sink: MemorySink, refused: set[str]) -> None:
    """The destination refuses the keys (first letter of the object's name) in ``refused`` for a
    cause of their own, and takes the rest."""

    def decide(occ: Occurrence) -> Outcome:
        if occ.record["involved_object"]["name"][0] in refused:
            return retry("stream over the stream limit", defer=True)
        return OK

    sink.decide = decide


def _occurrences(prefix: str, events: int, each: int) -> list[Occurrence]:
    """``events`` events of ``each`` occurrences, in the order a watch hands them on (X/1 before X/2)."""
    firsts = [make_occurrence(object_name=f"{prefix}-{e}") for e in range(events)]
    return [
        make_occurrence(object_name=f"{prefix}-{e}", uid=firsts[e].uid, count=n)
        for n in range(1, each + 1)
        for e in range(events)
    ]


def _keys(occs: Sequence[Occurrence]) -> list[Key]:
    return [(o.uid, o.number) for o in occs]


def _drops(metrics: Metrics) -> dict[str, float]:
    return {r: metrics.dropped.labels("mem", r)._value.get() for r in SINK_DROP_REASONS}


async def _offer_in_pages(
    p: Pipeline, sink: MemorySink, refused: list[Occurrence], others: list[Occurrence]
) -> None:
    """Pages of six of each, as a watch hands them on; each page's other keys are awaited delivered."""
    for i in range(0, len(others), 6):
        for occ in refused[i : i + 6] + others[i : i + 6]:
            p.offer(occ)
        await sink.wait_for(i + 6)  # only the other keys are accepted meanwhile


async def test_without_a_spool_a_key_refused_for_long_gives_way_to_the_other_keys(metrics: Metrics) -> None:
    """60 items of a refused key and 60 of others through a queue of 20. Before, once the set-aside
    items filled the queue each new occurrence pushed out the oldest one queued, another key's too,
    and the others were lost. Now the set-aside items give way past half the bound: every other item
    is delivered, and each refused one is delivered once the key is taken again or dropped, counted
    `queue_full` and told to the sink, never both, never silently."""
    sink = _sink()
    _refusing(sink, {"b"})
    p = _pipeline(sink, metrics)
    task = asyncio.create_task(p.run())
    refused, others = _occurrences("b", 6, 10), _occurrences("a", 60, 1)
    await _offer_in_pages(p, sink, refused, others)
    assert sorted(sink.keys) == sorted(_keys(others))
    assert p.queued <= 20 and len(p._deferred) <= 20
    _refusing(sink, set())  # the key is taken again
    wanted = set(_keys(refused))

    def got() -> set[Key]:
        return {k for k in sink.keys if k in wanted}

    await until(lambda: len(got()) + len(sink.given) == len(refused))
    await p.wait_idle(5)
    assert sorted(got() | set(sink.given)) == sorted(_keys(refused)) and not got() & set(sink.given)
    assert len(sink.given) >= len(refused) - 20  # memory could not hold the rest
    drops = _drops(metrics)
    assert drops.pop("queue_full") == len(sink.given) and set(drops.values()) == {0}
    assert [k for k, n in collections.Counter(sink.keys).items() if n > 1] == []
    for uid in {o.uid for o in refused}:
        numbers = [n for u, n in sink.keys if u == uid]
        assert numbers == sorted(numbers), numbers  # each event's in number order
        assert p.checkpoint.accepted(uid) == max(numbers, default=0)
    p.close()
    await asyncio.wait_for(task, 10)


async def test_with_a_spool_set_aside_items_past_half_the_queue_are_parked_on_disk_and_read_back_in_turn(
    metrics: Metrics, tmp_path: Path
) -> None:
    """The same through a queue of 20 with a disk spool. Before, once the set-aside items filled the
    queue nothing more was read back from the spool: every other key's occurrences stayed there until
    the refused key was taken again. Now what is over half the bound waits in the spool's parked FIFO
    (kept across a crash), the other keys flow, nothing is dropped; a second key refused for a while
    gets its turn at once it is taken again, while the first is still refused; then everything is
    delivered once."""
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    sink = _sink()
    _refusing(sink, {"b", "c"})
    p = _pipeline(sink, metrics, spool=spool)
    task = asyncio.create_task(p.run())
    refused, briefly = _occurrences("b", 6, 10), _occurrences("c", 3, 4)
    others = _occurrences("a", 72, 1)
    await _offer_in_pages(p, sink, refused + briefly, others)
    assert sorted(sink.keys) == sorted(_keys(others))
    assert len(p._deferred) <= 10 and spool.parked_count > 0
    gauge = metrics.spool_depth.labels("mem")._value.get()
    assert gauge == len(spool) + spool.parked_count
    # A SIGKILL now: what is parked is on disk (the rest waits in memory or the aside file).
    crashed = Spool(tmp_path / "spool", max_bytes=10_000_000)
    on_disk = {(u.occ.uid, u.occ.number) for u in crashed.unpark(10**6)} | set(_keys(crashed.pop(10**6)))
    crashed.close()
    held = {(uid, n) for uid, numbers in p._held.items() for n in numbers}
    assert set(_keys(refused + briefly)) <= on_disk | held
    _refusing(sink, {"b"})  # c is taken again: its items come back in turn while b is still refused
    await until(lambda: set(_keys(briefly)) <= set(sink.keys), timeout=20)
    assert not set(_keys(refused)) & set(sink.keys)
    _refusing(sink, set())
    await until(lambda: set(_keys(refused)) <= set(sink.keys), timeout=20)
    await p.wait_idle(5)
    assert sorted(sink.keys) == sorted(_keys(others + refused + briefly))  # each once
    assert set(_drops(metrics).values()) == {0} and sink.given == []
    for uid in {o.uid for o in refused + briefly}:
        numbers = [n for u, n in sink.keys if u == uid]
        assert numbers == sorted(numbers), numbers  # each event's in number order
        assert p.checkpoint.accepted(uid) == numbers[-1]
    p._refill()
    assert spool.parked_count == 0 and len(spool) == 0
    assert not list((tmp_path / "spool" / "parked").glob("*.seg"))
    p.close()
    await asyncio.wait_for(task, 10)


async def test_parked_items_keep_their_failed_attempts_and_still_end_at_retry_max_attempts(
    metrics: Metrics, tmp_path: Path
) -> None:
    """20 items of a refused key through a queue of 10 with `retry_max_attempts=4`: the others go on
    while they wait (before, they waited until the refused ones were given up), and each refused one
    is sent exactly 4 times, parked or not, then dead-lettered and told to the sink."""
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    sink = _sink()
    sent: collections.Counter[Key] = collections.Counter()

    def decide(occ: Occurrence) -> Outcome:
        if occ.record["involved_object"]["name"].startswith("b"):
            sent[(occ.uid, occ.number)] += 1
            return retry("index refused", defer=True)
        return OK

    sink.decide = decide
    p = _pipeline(
        sink,
        metrics,
        spool=spool,
        queue_max_events=10,
        batch_max_events=5,
        retry_max_attempts=4,
        retry_initial_backoff=0.2,
        retry_max_backoff=0.4,
    )
    task = asyncio.create_task(p.run())
    refused, others = _occurrences("b", 24, 1), _occurrences("a", 24, 1)
    await _offer_in_pages(p, sink, refused, others)
    assert sink.given == [] and spool.parked_count > 0  # the others went by while these wait
    dead = metrics.dead_lettered.labels("mem", "retries_exhausted")
    await until(lambda: dead._value.get() == len(refused), timeout=30)
    await p.wait_idle(5)
    assert sent == {key: 4 for key in _keys(refused)}
    assert sorted(sink.given) == sorted(_keys(refused))
    assert spool.parked_count == 0 and not p._deferred and not p._held
    p.close()
    await asyncio.wait_for(task, 10)


def test_the_parked_fifo_shares_the_spools_bound_and_is_read_back_after_a_restart(tmp_path: Path) -> None:
    """Parked records take at most half the spool's bound (their oldest dropped past it, and the
    main FIFO's appends drop theirs first), keep their failed attempts and owed marks, are held
    against relisted copies, and their floors (the checkpoint's bar) are rebuilt at open."""
    spool = Spool(tmp_path, max_bytes=40_000, segment_bytes=4_000)
    spool.decode_dropped = True
    x = make_occurrence(object_name="b-x", count=3)
    parked = [make_occurrence(object_name=f"b-{i}") for i in range(40)] + [x]
    dropped: list[str] = []
    for i, occ in enumerate(parked):
        dropped += spool.park(occ, tries=i % 3, owed=occ is x, not_before=1e9 + i if occ is x else 0.0)
    assert spool.bytes <= 20_000 and dropped == [occ.key for occ in parked[: len(dropped)]]
    assert [o.key for o in spool.dropped_occurrences] == dropped  # rebuilt for ``given_up``
    assert spool.parked_floor(x.uid) == 3 and spool.parked_floor(parked[0].uid) is None
    still = spool.parked_count
    for _ in range(60):
        assert spool.append(make_occurrence(object_name="a-0")) == [] or spool.parked_count == still
    assert spool.bytes <= 40_000 and spool.parked_count == still  # the main FIFO gave way to itself
    spool.commit()
    spool.close()
    reopened = Spool(tmp_path, max_bytes=40_000, segment_bytes=4_000)
    assert reopened.parked_floor(x.uid) == 3 and reopened.holds(x)
    back = reopened.unpark(10**6)
    assert [u.occ.key for u in back] == [o.key for o in parked if o.key not in set(dropped)]
    assert {u.occ.key: u.tries for u in back}[x.key] == (len(parked) - 1) % 3 and reopened.owed == {
        (x.uid, 3)
    }
    # The end of its backoff too (item 181); a record parked with none has none.
    assert {u.occ.key: u.not_before for u in back} == {
        o.key: 1e9 + 40 if o is x else 0.0 for o in parked[-len(back) :]
    }
    assert reopened.parked_floor(x.uid) is None and reopened.parked_count == 0
    reopened.close()


# ---- through the router: a clean stop with occurrences parked --------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _router(
    api: FakeApiServer, tmp_path: Path, sink_class: type[MemorySink] = MemorySink, /, **opts: Any
) -> Router:
    settings = router_settings(api, tmp_path, data_dir=tmp_path / "data")
    spec = spec_for_class(sink_class, {"name": "mem", "batch_max_wait": 0.02, **opts}, type_="memory")
    return Router(settings, [spec])


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


async def test_a_clean_stop_with_occurrences_parked_keeps_them_and_delivers_each_once_after_the_restart(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """13 events of a refused key (db-*) through a queue of 10, 20 others behind them, and X whose
    first occurrence is refused (its day's index) while its second is accepted. Before, the set-aside
    items filled the queue and the others never left the spool. Now they flow; X/2 goes out with X/1
    (after it) and is taken, X/1 is parked; the checkpoint stays before X/1. At a clean stop the stop
    keeps X/1 owed and records X/2. After the restart (everything taken) each occurrence is delivered
    exactly once, X/1 too, nothing lost as a copy."""
    opts = {
        "queue_max_events": 10,
        "batch_max_events": 5,
        "retry_initial_backoff": 0.2,
        "retry_max_backoff": 0.4,
    }

    def decide(occ: Occurrence) -> Outcome:
        name = occ.record["involved_object"]["name"]
        if name.startswith("db-") and not (name == "db-x" and occ.number >= 2):
            return retry("index refused", defer=True)
        return OK

    first = _router(api, tmp_path, **opts)
    async with first.running():
        await until(lambda: first.ready()[0])
        _mem(first).decide = decide
        pipeline, spool = first.pipelines[0], first.pipelines[0].spool
        assert spool is not None
        x = api.create_event(event_object(object_name="db-x", name="db-x"))
        uid = x["metadata"]["uid"]
        for i in range(12):
            api.create_event(event_object(object_name=f"db-{i}", name=f"db-{i}"))
        for i in range(20):
            api.create_event(event_object(object_name=f"a-{i}", name=f"a-{i}"))
        await _mem(first).wait_for(20, timeout=20)  # the others, past every refused one
        assert spool.parked_count
        api.bump("default", "db-x")
        await until(lambda: (uid, 2) in _mem(first).keys, timeout=20)
        # X/1 goes round with the others: stop while it is parked, X/2 accepted.
        await until(lambda: spool.parked_floor(uid) == 1 and uid not in pipeline._held, timeout=20)
        assert pipeline.checkpoint.accepted(uid) == 0
    assert first.exit_code == 0
    # X/1 stayed parked, one record, marked owed: delivered though the checkpoint records X/2.
    kept = Spool(tmp_path / "data" / "spool" / "mem", max_bytes=10**9, cluster="test")
    assert [key for key in _keys([u.occ for u in kept.unpark(10**6)]) if key[0] == uid] == [(uid, 1)]
    assert kept.owed == {(uid, 1)}
    kept.close()
    second = _router(api, tmp_path, **opts)
    async with second.running():
        await until(lambda: second.ready()[0])
        await _mem(second).wait_for(13)
        await second.pipelines[0].wait_idle(10)
    both = collections.Counter(_mem(first).keys + _mem(second).keys)
    assert [k for k, n in both.items() if n > 1] == []
    assert set(both) == {(e["metadata"]["uid"], 1) for e in api.events()} | {(uid, 2)}
    assert (uid, 1) in _mem(second).keys
    numbers = [n for u, n in _mem(first).keys + _mem(second).keys if u == uid]
    assert numbers == [2, 1]  # X/2 (another index) was taken first: X/1 was not lost for it


@pytest.mark.parametrize("kept", ["main-fifo", "aside-file"])
async def test_a_parked_occurrence_waits_until_its_events_older_ones_spooled_before_the_start_were_sent(
    api: FakeApiServer, tmp_path: Path, kept: str
) -> None:
    """At the start the spool holds b-0..b-3 and X/1 from before it (kept at a clean stop in the
    main FIFO, or in the aside file at a crash) and X/2 parked. Before, parked records came back as
    soon as those were *read*: X/2, due at once, went first in a batch of five, X/1 followed in the
    next, and was skipped there as a copy (the checkpoint had passed it): lost, counted nowhere. Now
    the parked records wait until the records read from before the start have left memory."""
    x = api.create_event(event_object(object_name="db-x", name="db-x"))
    uid = x["metadata"]["uid"]
    before = [
        make_occurrence(
            object_name=f"b-{i}",
            uid=api.create_event(event_object(object_name=f"b-{i}", name=f"b-{i}"))["metadata"]["uid"],
        )
        for i in range(4)
    ]
    api.bump("default", "db-x")
    x1, x2 = (make_occurrence(object_name="db-x", uid=uid, count=n) for n in (1, 2))
    spool = Spool(tmp_path / "data" / "spool" / "mem", max_bytes=10**9, cluster="test")
    for occ in [*before, x1]:
        spool.append(occ)
    if kept == "aside-file":  # popped, set aside, then SIGKILLed: read back from the aside file first
        assert spool.keep_aside(spool.pop(5))
    spool.park(x2)
    spool.commit()
    spool.close()
    router = _router(api, tmp_path, queue_max_events=10, batch_max_events=5)
    async with router.running():
        await until(lambda: router.ready()[0])
        await router.pipelines[0].wait_idle(10)
        got = _mem(router).keys
        assert router.pipelines[0].checkpoint.accepted(uid) == 2
    assert router.exit_code == 0
    assert sorted(got) == sorted(_keys([*before, x1, x2]))  # each once, X/1 too
    assert [n for u, n in got if u == uid] == [1, 2]
    assert router.metrics.skipped.labels("mem")._value.get() == 5  # the relisted copies, no more


async def test_a_key_refused_briefly_keeps_its_own_backoff_while_another_has_many_parked(
    metrics: Metrics, tmp_path: Path
) -> None:
    """150 events of a key refused all along (b) through a queue of 20 (a share of 10): about 140
    parked, going round. Then c (one event, two occurrences) is refused for its first three sends,
    and d (one event) all along. Before, each event refused went behind every parked record at once,
    so each of c's retries waited a whole round of b (about 140 sends of b each). Now an event never
    parked keeps its own short backoff in memory: c is delivered after fewer sends of b than one
    round, in number order, once; and the round goes on meanwhile (d in memory all along holds it
    up for none of b's records). Counted in sends, not seconds: a loaded host stretches both."""
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    sink = _sink()
    sends: collections.Counter[Key] = collections.Counter()
    b_sends = 0
    c_log: list[tuple[Key, int]] = []  # each send of c, with the sends of b so far

    def decide(occ: Occurrence) -> Outcome:
        nonlocal b_sends
        key = (occ.uid, occ.number)
        sends[key] += 1
        name = occ.record["involved_object"]["name"]
        if name.startswith("b"):
            b_sends += 1
            return retry("stream over the stream limit", defer=True)
        if name.startswith("c"):
            c_log.append((key, b_sends))
            if sends[key] <= 3:
                return retry("index refused for a while", defer=True)
        if name.startswith("d"):
            return retry("index refused", defer=True)
        return OK

    sink.decide = decide
    p = _pipeline(sink, metrics, spool=spool)
    task = asyncio.create_task(p.run())
    refused = _occurrences("b", 150, 1)
    for occ in refused:
        p.offer(occ)
    # Every b sent at least twice: the records parked have come back and gone behind again.
    await until(lambda: all(sends[key] >= 2 for key in _keys(refused)), timeout=60)
    parked = spool.parked_count
    assert parked >= 120
    c, d = _occurrences("c", 1, 2), _occurrences("d", 1, 1)
    turns = {key: sends[key] for key in _keys(refused)}
    for occ in c + d:
        p.offer(occ)
    await until(lambda: set(_keys(c)) <= set(sink.keys), timeout=30)
    b_meanwhile = c_log[-1][1] - c_log[0][1]
    assert b_meanwhile < parked, (b_meanwhile, parked, c_log)  # before: more than three rounds
    assert all(sends[key] == 4 for key in _keys(c))  # three refused, then taken once
    assert [n for u, n in sink.keys if u == c[0].uid] == [1, 2]
    # The round goes on with d set aside all along: every b record gets another turn.
    await until(lambda: all(sends[key] > turns[key] for key in turns), timeout=60)
    assert not set(_keys(d)) & set(sink.keys) and sink.given == []
    assert set(_drops(metrics).values()) == {0}
    p.close()
    p.stop_now()
    await asyncio.wait_for(task, 10)


async def test_an_event_parked_behind_its_own_records_is_not_read_back_before_its_backoff(
    metrics: Metrics, tmp_path: Path
) -> None:
    """Y (4 occurrences, refused) waits in memory at half the share; X's 8 records are parked (as a
    restart leaves them). 4 of X come back into the share, are refused with Y and, at the share, go
    behind X's other parked records; the room left reads those first and parks them again behind, so
    X's refused ones were next, read back at the next refill due at once: ~600 sends in 2 s, with a
    backoff of at least 0.2 s (item 181). A parked record now keeps the end of its backoff. Counted
    over a fixed time: a loaded host only lowers the count."""
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    sink = _sink()
    sends: collections.Counter[Key] = collections.Counter()

    def decide(occ: Occurrence) -> Outcome:
        sends[(occ.uid, occ.number)] += 1
        return retry("stream over the stream limit", defer=True)

    sink.decide = decide
    p = _pipeline(
        sink,
        metrics,
        spool=spool,
        queue_max_events=16,
        batch_max_events=8,
        retry_initial_backoff=0.2,
        retry_max_backoff=0.4,
    )
    task = asyncio.create_task(p.run())
    y = _occurrences("y", 1, 4)
    for occ in y:
        p.offer(occ)
    await until(lambda: all(sends[key] for key in _keys(y)))
    x = _occurrences("x", 1, 8)
    for occ in x:
        spool.park(occ, tries=1)
    await asyncio.sleep(2)  # the time under test: the sends within it are counted
    p.stop_now()
    await asyncio.wait_for(task, 10)
    # Each at most once at once and then once per 0.2 s: 11 sends of each of the 12 in 2 s at most.
    assert sum(sends.values()) <= 12 * 11, sends
    assert max(sends[key] for key in _keys(x)) > 1  # X did come back and was refused again


async def test_items_set_aside_are_left_over_at_a_stop_in_the_order_received_not_due(
    metrics: Metrics,
) -> None:
    """Three events of one object refused for a cause of their own, the first with the longest wait.
    A stop keeps what waits aside (the spool, then the sink after the restart) in the order received:
    before, in due-time order, so the object's events went out newest first after the restart (a
    Kafka partition, keyed by the object, keeps them so)."""
    sink = _sink()
    waits = {1: 3.0, 2: 2.0, 3: 1.0}
    occs = [make_occurrence(object_name="x", name=f"x.{i}") for i in waits]
    wait_of = {occ.uid: waits[i] for i, occ in zip(waits, occs, strict=True)}
    sink.decide = lambda occ: retry("partition refused", defer=True, retry_after=wait_of[occ.uid])
    p = _pipeline(sink, metrics, retry_max_backoff=1.0)  # Retry-After up to 10 s taken as given
    task = asyncio.create_task(p.run())
    for occ in occs:
        p.offer(occ)
    await until(lambda: len(p._deferred) == 3)
    assert sorted(p._deferred)[0][2].uid == occs[2].uid  # the last received is due first
    older, newer = p.leftovers()
    assert [o.uid for o in older] == [o.uid for o in occs] and newer == []
    p.stop_now()
    await asyncio.wait_for(task, 10)


async def test_the_aside_file_read_back_after_a_crash_keeps_each_events_number_order(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """The spool holds x/1 y/1 y/2 x/2 y/3 from before the start; the sink refuses both keys for a
    cause of their own (Retry-After 5 s and 6 s: nothing comes due), so the pipeline keeps them in
    the spool's aside file; then it dies (its task cancelled: no stop). After a crash the aside file
    is read back first, in its order. Written in the heap's list order (x/1 x/2 y/2 y/1 y/3), y/2 went
    out in a batch before y/1, and y/1 was skipped as a copy: lost, counted only as skipped."""
    x = api.create_event(event_object(object_name="x", name="x"))
    y = api.create_event(event_object(object_name="y", name="y"))
    api.bump("default", "x")
    api.bump("default", "y")
    api.bump("default", "y")
    occ = {
        f"{n}/{c}": make_occurrence(object_name=n, uid=e["metadata"]["uid"], count=c)
        for n, e, top in (("x", x, 2), ("y", y, 3))
        for c in range(1, top + 1)
    }
    folder = tmp_path / "data" / "spool" / "mem"
    spool = Spool(folder, max_bytes=10**9, cluster="test")
    for key in ["x/1", "y/1", "y/2", "x/2", "y/3"]:
        spool.append(occ[key])
    spool.commit()
    spool.close()
    sink = _sink()
    waits = {x["metadata"]["uid"]: 5.0, y["metadata"]["uid"]: 6.0}
    sink.decide = lambda o: retry("refused", defer=True, retry_after=waits[o.uid])
    spool = Spool(folder, max_bytes=10**9, cluster="test")
    p = _pipeline(
        sink, metrics=Metrics(), spool=spool, queue_max_events=10, batch_max_events=3, retry_max_backoff=1
    )
    task = asyncio.create_task(p.run())
    await until(
        lambda: (folder / "aside").exists() and len((folder / "aside").read_bytes().splitlines()) == 5
    )
    task.cancel()  # the crash: no stop, no leftovers
    await asyncio.gather(task, return_exceptions=True)
    spool.close()
    router = _router(api, tmp_path, queue_max_events=10, batch_max_events=3)
    async with router.running():
        await until(lambda: router.ready()[0])
        await router.pipelines[0].wait_idle(10)
        got = _mem(router).keys
    assert sorted(got) == sorted(_keys(list(occ.values())))  # y/1 too
    for e in (x, y):
        assert [n for u, n in got if u == e["metadata"]["uid"]] == sorted(
            n for u, n in got if u == e["metadata"]["uid"]
        )


class _Slow(Listening):
    """Takes everything, each send suspending as a real destination's I/O does."""

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        await asyncio.sleep(0.001)
        return await super().send(batch)


async def test_records_read_back_from_the_parked_fifo_are_not_read_again_after_a_crash_under_steady_traffic(
    metrics: Metrics, tmp_path: Path
) -> None:
    """Five records parked, 300 others queued (steady traffic: the memory queue is not empty between
    batches). The parked ones come back and are delivered; then the pipeline dies. Before, the parked
    FIFO's read position was made durable only at a refill with an empty queue, so all five were
    still parked on disk: read again after the restart (a copy still parked holds its event's
    checkpoint back, and its later occurrences went out again)."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9, cluster="test")
    parked = [make_occurrence(object_name=f"p-{i}") for i in range(5)]
    for occ in parked:
        spool.park(occ)
    spool.commit()
    sink = _Slow(
        MemorySinkOptions.model_validate({}),
        SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem")),
    )
    p = _pipeline(sink, metrics, spool=spool, queue_max_events=1000, batch_max_events=5)
    for i in range(300):
        p.offer(make_occurrence(object_name=f"q-{i}"))
    task = asyncio.create_task(p.run())
    await until(lambda: set(_keys(parked)) <= set(sink.keys))
    assert len(p._queue) > 100  # never empty meanwhile
    task.cancel()  # the crash
    await asyncio.gather(task, return_exceptions=True)
    spool.close()
    reopened = Spool(tmp_path / "spool", max_bytes=10**9, cluster="test")
    assert reopened.parked_count == 0
    reopened.close()


class _RefusingC(MemorySink):
    """Refuses the events of key c (the object's first letter) for a cause of their own, from its
    first send, until ``refused`` is emptied."""

    def __init__(self, options: MemorySinkOptions, context: object) -> None:
        super().__init__(options, context)
        self.refused = {"c"}
        self.decide = self._decide

    def _decide(self, occ: Occurrence) -> Outcome:
        if occ.record["involved_object"]["name"][0] in self.refused:
            return retry("over its limit", defer=True)
        return OK


async def test_a_relisted_copy_of_a_parked_occurrence_is_not_sent_beside_it(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """At the start the main spool holds 10 events of a refused key (c) and 5 others, kept at a stop.
    The first lists fail (an API hiccup), so the relist comes after the pipeline has read the backlog
    (the spool's keys from before the start freed) and parked c's over the share. Its copies of the
    parked occurrences were taken as new: sent beside the originals once c was taken again, stored
    twice in one run."""
    names = [f"c-{i}" for i in range(10)] + [f"a-{i}" for i in range(5)]
    occs = [
        make_occurrence(
            object_name=n, uid=api.create_event(event_object(object_name=n, name=n))["metadata"]["uid"]
        )
        for n in names
    ]
    spool = Spool(tmp_path / "data" / "spool" / "mem", max_bytes=10**9, cluster="test")
    for occ in occs:
        spool.append(occ)
    spool.commit()
    spool.close()
    api.faults.fail_next(500, count=8, verbs=("list",))
    router = _router(
        api,
        tmp_path,
        _RefusingC,
        queue_max_events=10,
        batch_max_events=4,
        retry_initial_backoff=0.05,
        retry_max_backoff=0.1,
    )
    async with router.running():
        sink = _mem(router)
        assert isinstance(sink, _RefusingC)
        p = router.pipelines[0]
        assert p.spool is not None
        await until(lambda: router.watchers[0].initial_list_done.is_set(), timeout=30)
        parked = p.spool.parked_count
        sink.refused.clear()  # the key is taken again
        await until(lambda: set(_keys(occs)) <= set(sink.keys), timeout=20)
        await p.wait_idle(10)
    assert parked  # c's over the share were parked when the relist's copies came
    assert [k for k, n in collections.Counter(sink.keys).items() if n > 1] == []
