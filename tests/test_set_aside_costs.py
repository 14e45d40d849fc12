"""What items set aside cost (items 82, 151): the engine's work per offer and per occurrence must not
grow with how many wait aside, and a plugin's odd Retry-After must not stop them.

Before, without a disk spool and with memory full, each offer dropped the oldest item set aside by
sorting and rebuilding the whole heap of them (5,000 offers blocked the event loop for 6.3 s), and
each newer occurrence waiting behind an older one of its event scanned the whole heap for its due
time (4,000 blocked it for 0.8 s): both quadratic. The work is compared at two sizes four times
apart, in CPU time of this process (what other processes on the host take is not counted), the
best of three: linear work takes about four times as long, quadratic about sixteen; the bound is
ten. The same runs check that the engine does the same as before (what is dropped, counted, told)."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, Unpack

import pytest

from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, RetryableError, SinkContext, retry
from eventrouter.testing import MemorySink, MemorySinkOptions, make_occurrence
from eventrouter.testing.memory import Listening
from eventrouter.testing.pipelines import Knobs, pipeline_for, sends_while_refused
from eventrouter.testing.waiting import until

Key = tuple[str, int]


def _context() -> SinkContext:
    return SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))


def _refusing_b() -> Listening:
    """The destination refuses the objects named b-* for a cause of their own and takes the rest."""
    sink = Listening(MemorySinkOptions.model_validate({}), _context())

    def decide(occ: Occurrence) -> Outcome:
        if occ.record["involved_object"]["name"].startswith("b"):
            return retry("index refused", defer=True)
        return OK

    sink.decide = decide
    return sink


_SLOW: Knobs = {"batch_max_events": 500, "retry_initial_backoff": 600.0, "retry_max_backoff": 600.0}
"""Items set aside wait for longer than a test: what is measured is the work of setting them aside."""


def _pipeline(sink: MemorySink, metrics: Metrics, **opts: Unpack[Knobs]) -> Pipeline:
    return pipeline_for("mem", sink, metrics, None, **(_SLOW | opts))


def _keys(occs: Sequence[Occurrence]) -> list[Key]:
    return [(o.uid, o.number) for o in occs]


async def _grows_linearly(measure: Callable[[int], Awaitable[float]], n: int) -> None:
    small = min([await measure(n) for _ in range(3)])
    large = min([await measure(4 * n) for _ in range(3)])
    assert large < 10 * max(small, 0.001), (small, large)


async def _drops(n: int) -> float:
    """Memory (a queue of 2n, no spool) full of 2n items of a refused key set aside, the sink busy:
    n offers of other keys each push out the oldest item set aside. Checks that those n are the ones
    dropped, oldest first, counted and told to the sink, the other keys all kept; returns the CPU
    time of the n offers."""
    metrics = Metrics()
    sink = _refusing_b()
    p = _pipeline(sink, metrics, queue_max_events=2 * n)
    task = asyncio.create_task(p.run())
    refused = [make_occurrence(object_name=f"b-{i}") for i in range(2 * n)]
    for occ in refused:
        p.offer(occ)
    await until(lambda: len(p._deferred) == 2 * n, timeout=60)
    sink.blocked = asyncio.Event()  # busy: nothing leaves memory meanwhile
    others = [make_occurrence(object_name=f"a-{i}") for i in range(n)]
    gc.collect()  # not a collection of what came before in the time measured
    started = time.process_time()
    for occ in others:
        p.offer(occ)
    spent = time.process_time() - started
    # By receipt, then in the order they were set aside (the order offered).
    oldest = [refused[i] for i in sorted(range(2 * n), key=lambda i: (refused[i].received_at, i))[:n]]
    assert sink.given == _keys(oldest)
    assert metrics.dropped.labels("mem", "queue_full")._value.get() == n
    assert {(e[2].uid, e[2].number) for e in p._deferred} == set(_keys(refused)) - set(_keys(oldest))
    assert list(p._queue) == others
    sink.blocked.set()
    p.stop_now()
    await asyncio.wait_for(task, 10)
    return spent


async def test_dropping_the_oldest_item_set_aside_at_each_offer_does_not_grow_with_their_number() -> None:
    """1,000 offers against 2,000 set aside, then 4,000 against 8,000 (see the module's docstring).
    Before: about 20 times the CPU time (0.30 s, then 6.0 s)."""
    await _grows_linearly(_drops, 1000)


async def _behind(n: int) -> float:
    """n events' first occurrences set aside (refused), then their second ones offered: each waits
    behind its event's first, with its due time (held, no attempt). Checks that, and returns the
    CPU time from the first offer until all n are set aside."""
    metrics = Metrics()
    sink = _refusing_b()
    p = _pipeline(sink, metrics, queue_max_events=4 * n)
    task = asyncio.create_task(p.run())
    firsts = [make_occurrence(object_name=f"b-{i}") for i in range(n)]
    for occ in firsts:
        p.offer(occ)
    await until(lambda: len(p._deferred) == n, timeout=60)
    seconds = [make_occurrence(object_name=f"b-{i}", uid=o.uid, count=2) for i, o in enumerate(firsts)]
    gc.collect()
    started = time.process_time()
    for occ in seconds:
        p.offer(occ)
    await until(lambda: len(p._deferred) == 2 * n, timeout=60, interval=0.001)
    spent = time.process_time() - started
    due: dict[str, set[float]] = collections.defaultdict(set)
    for when, _, occ in p._deferred:
        due[occ.uid].add(when)
    assert all(len(d) == 1 for d in due.values()) and len(due) == n  # the second waits with the first
    assert p._held == {o.uid: {1, 2} for o in firsts} and sink.received == []
    assert len(sink.batches) == n // 500 + (n % 500 > 0)  # the first ones' sends only
    p.stop_now()
    await asyncio.wait_for(task, 10)
    return spent


async def test_newer_occurrences_waiting_behind_older_ones_set_aside_cost_no_more_with_their_number() -> None:
    """1,000 second occurrences behind 1,000 first ones set aside, then 4,000 behind 4,000. Before:
    about 23 times the CPU time (0.036 s, then 0.84 s)."""
    await _grows_linearly(_behind, 1000)


# ---- a plugin's odd Retry-After ------------------------------------------------------------------


class Odd(Listening):
    """A plugin sink whose first send raises ``RetryableError`` with Retry-After ``raising`` (unless
    None); ``sent`` notes when each occurrence was sent."""

    raising: float | None = None

    def __init__(self, options: MemorySinkOptions, context: object) -> None:
        super().__init__(options, context)
        self.sent: dict[Key, list[float]] = collections.defaultdict(list)

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        if self.raising is not None and not self.sent:
            for occ in batch:
                self.sent[(occ.uid, occ.number)].append(time.monotonic())
            raise RetryableError("robot unreachable", retry_after=self.raising)
        return await super().send(batch)


class Robot(Odd):
    """Its retries all wait aside, as an alert robot's (``defer_retries``)."""

    defer_retries: ClassVar[bool] = True


@pytest.mark.parametrize("value", [math.nan, -5.0, math.inf], ids=["nan", "negative", "inf"])
@pytest.mark.parametrize("how", ["outcome", "exception"])
async def test_an_odd_retry_after_from_a_plugin_is_a_backoff_and_stops_nothing(
    value: float, how: str
) -> None:
    """x is refused once with Retry-After NaN, negative or infinite (a plugin's arithmetic): as an
    outcome set aside (``defer``), or raised for the whole send by a sink whose retries all wait
    aside. y, refused twice with no Retry-After, waits aside beside it. Before, NaN became x's due
    time: heading the heap, it broke its order and nothing set aside came due until a stop (y
    never delivered); a negative one retried x at once, without a backoff. Now a Retry-After that
    is no delay is none (the backoff applies) and infinity is bounded (`retry_wait_max`)."""
    sink = (Robot if how == "exception" else Odd)(MemorySinkOptions.model_validate({}), _context())
    if how == "exception":
        sink.raising = value
    x, y = make_occurrence(object_name="x"), make_occurrence(object_name="y")
    sent = sink.sent

    def decide(occ: Occurrence) -> Outcome:
        key = (occ.uid, occ.number)
        sent[key].append(time.monotonic())
        if occ is x and len(sent[key]) == 1:
            return retry("odd", retry_after=value, defer=True)
        if occ is y and len(sent[key]) <= 2:
            return retry("refused", defer=True)
        return OK

    sink.decide = decide
    # retry_wait_max: 4 s; the first backoff at least 0.1 s (equal jitter).
    p = pipeline_for("mem", sink, Metrics(), None, retry_initial_backoff=0.2, retry_max_backoff=0.4)
    task = asyncio.create_task(p.run())
    p.offer(x)
    p.offer(y)
    await sink.wait_for(2, timeout=15)
    assert sorted(sink.keys) == sorted(_keys([x, y]))
    first, second = sent[(x.uid, x.number)][:2]
    assert second - first >= 0.1  # a backoff, not at once
    p.close()
    await asyncio.wait_for(task, 10)


async def test_a_retry_after_of_zero_on_an_item_set_aside_still_backs_off() -> None:
    """A failure set aside with Retry-After 0 was due at once: ~90 sends a second where the backoff
    (0.2-0.4 s) allows about 5. Now it backs off at least as a retry in place does."""
    refused = retry("refused", retry_after=0.0, defer=True)  # what Retry-After: 0 or a past date parse to
    sends = await sends_while_refused(
        refused,
        [make_occurrence(object_name="b-x")],
        queue_max_events=20,
        batch_max_events=3,
        retry_initial_backoff=0.2,
        retry_max_backoff=0.4,
    )
    assert 1 <= sends <= 7, f"{sends} sends in 1 s"
