"""Loki: session 36 (item 327), ``given_up`` lets go of an entry waiting aside in O(1).

Item 316 made ``given_up`` drop the records aside (``_aside``) of the occurrences the engine gave up,
but it built a set of every uid aside on each call, and the engine calls it once per occurrence it
drops in an overload: ~1 ms of event loop per offer with thousands aside (review-b F3). An index,
``_aside_at`` ((uid, number) → the streams whose records hold it), is now kept in step with
``_aside`` wherever a record is added or taken out.

Loki: session 36 (item 329), the records aside of an entry answered otherwise go under every label
set, and the index of records aside (``_aside_at``, item 327) keeps no copy of a stream's bytes.

After a reload A→B an entry waiting aside has a record under each label set; delivered under B, its
record under A stayed and, after a reload back to A, held A's newer entries back behind an entry Loki
had stored, until it expired (review-g N1). The index kept each entry's own bytes of its stream,
a separate copy per record when the label cache missed (review-g N2).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from eventrouter import Occurrence, Outcome, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, retry_wait_max: float = 300.0, **options: Any) -> LokiSink:
    context = SinkContext(
        name="loki",
        cluster="test",
        data_dir=None,
        logger=logging.getLogger("test.loki"),
        retry_wait_max=retry_wait_max,
    )
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), context)


def _assert_in_step(sink: LokiSink) -> None:
    """``_aside_at`` names, for each key, exactly the streams whose records in ``_aside`` hold it."""
    expected: dict[tuple[str, int], set[bytes]] = {}
    for stream, waiting in sink._aside.items():
        assert waiting, "an empty stream's dict stays in _aside"
        for key in waiting:
            expected.setdefault(key, set()).add(stream)
    index = sink._aside_at
    assert all(len(set(streams)) == len(streams) for streams in index.values()), index
    assert {key: set(streams) for key, streams in index.items()} == expected


def _held(loki: LokiReceiver) -> int:
    """How many streams Loki holds (one tenant)."""
    return len({entry.labels for entry in loki.entries})


def _keys_of(occurrences: list[Occurrence]) -> list[tuple[str, int]]:
    return [(o.uid, o.number) for o in occurrences]


def _snapshot(sink: LokiSink) -> dict[bytes, dict[tuple[str, int], tuple[int, int]]]:
    return {stream: dict(waiting) for stream, waiting in sink._aside.items()}


@pytest.mark.parametrize("relabel", [False, True], ids=["same-labels", "reload-changes-labels"])
@pytest.mark.parametrize("retry_wait_max", [300.0, 0.0], ids=["records-kept", "records-expire"])
@pytest.mark.parametrize("seed", range(3))
async def test_the_index_of_records_aside_stays_in_step_through_random_sends_and_given_ups(
    seed: int, retry_wait_max: float, relabel: bool
) -> None:
    """A random run of sends (new entries of ever more streams, recent or two hours old, and those
    answered retry), changes of Loki's stream limit (so entries are set aside for the stream limit, held back
    behind them, and answered otherwise later) and ``given_up`` of random occurrences (waiting aside,
    pending or never sent). After every step the index agrees with ``_aside``, and each ``given_up``
    took out of ``_aside`` exactly the records of those occurrences, in every stream, as item 316's
    scan did. ``records-expire`` (``retry_wait_max`` 0: ``stream_hold`` 0) has ``_hold_back`` expire
    records at each send; ``reload-changes-labels`` has a sink with another label set take over half
    way, so a pending entry gets records in two streams."""
    rng = random.Random(seed)
    added = given_up = otherwise = 0
    two_streams = False
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url, retry_wait_max)
        sinks = [sink]
        pending: list[Occurrence] = []
        made = 0
        try:
            for step in range(80):
                reload = (
                    relabel
                    and step >= 40
                    and len(sinks) == 1
                    and any(k in sink._aside_at for k in _keys_of(pending))
                )
                if reload:
                    second = _sink(loki.url, retry_wait_max, labels={"copy": "b"})
                    second.take_over(sink)
                    sink = second
                    sinks.append(sink)
                    loki.max_streams = _held(loki)  # the new label set's streams are refused: aside anew
                before = _snapshot(sink)
                op = 0.0 if reload else rng.random()  # the pending ones sent at once
                if op < 0.55:
                    fresh = [
                        _at(
                            rng.choice((5, 7205)),
                            namespace=f"ns{rng.randrange(4 + step // 4)}",  # new streams keep coming
                            object_name=f"o{made + i}",
                        )
                        for i in range(rng.randrange(1, 12))
                    ]
                    made += len(fresh)
                    again = rng.sample(pending, min(len(pending), 99 if op == 0.0 else rng.randrange(0, 10)))
                    batch = again + fresh
                    outcomes: Sequence[Outcome | None] = (await sink.send(batch)) or [None] * len(batch)
                    pending = [o for o in pending if o not in again]
                    for occurrence, outcome in zip(batch, outcomes, strict=True):
                        if outcome is not None and outcome.kind is OutcomeKind.RETRY:
                            pending.append(occurrence)
                elif op < 0.7:
                    loki.max_streams = _held(loki) + rng.choice((0, 0, 1, 3))
                else:
                    gone = rng.sample(pending, min(len(pending), rng.randrange(0, 6)))
                    gone += [_at(5, object_name=f"never-{step}")]  # never sent: nothing to let go
                    if before:  # and sometimes one not pending that may still wait aside (given up late)
                        uid, number = rng.choice([key for waiting in before.values() for key in waiting])
                        gone += [dataclasses.replace(gone[-1], uid=uid, number=number)]
                    sink.given_up(gone)
                    keys = {(o.uid, o.number) for o in gone}
                    pending = [o for o in pending if (o.uid, o.number) not in keys]
                    left = {
                        stream: {key: record for key, record in waiting.items() if key not in keys}
                        for stream, waiting in before.items()
                    }
                    assert sink._aside == {stream: waiting for stream, waiting in left.items() if waiting}
                    given_up += sum(len(w) for w in before.values()) - sum(
                        len(w) for w in sink._aside.values()
                    )
                _assert_in_step(sink)
                after = sum(len(w) for w in sink._aside.values())
                was = sum(len(w) for w in before.values())
                if op < 0.55:
                    new_keys = {k for w in sink._aside.values() for k in w} - {
                        k for w in before.values() for k in w
                    }
                    added += len(new_keys)
                    otherwise += max(0, was + len(new_keys) - after)
                two_streams = two_streams or any(len(streams) > 1 for streams in sink._aside_at.values())
        finally:
            for one in sinks:
                await one.aclose()
    # Each way in and out of _aside was taken (the run is random: this checks it covered them).
    assert added > 0 and given_up > 0 and otherwise > 0, (added, given_up, otherwise)
    if relabel and retry_wait_max:  # (with records expiring, the old stream's are gone by then)
        assert len(sinks) == 2, "nothing pending waited aside after step 40"
        assert two_streams, "no entry had records in two streams after the reload"


class _Counted(str):
    """A uid that counts how often it is hashed or compared: each record ``given_up`` looks at."""

    touched = 0

    def __hash__(self) -> int:
        _Counted.touched += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        _Counted.touched += 1
        return str.__eq__(self, other)


async def test_given_up_of_one_occurrence_touches_no_other_record_aside() -> None:
    """Thousands of entries of 200 streams wait aside (Loki's stream limit, real sends), their uids
    counting each hash and compare. The engine gives up one occurrence at a time, as it does for
    each occurrence it drops while the queue is full: each call touches a handful of uids, not every
    record aside (item 316's scan hashed them all: ~1 ms per call with 5,000 aside), and lets go of
    exactly that occurrence's record."""
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url)
        try:
            for round_ in range(5):
                batch = [_at(5, namespace=f"ns{i % 200}", object_name=f"o{round_}-{i}") for i in range(1000)]
                batch = [dataclasses.replace(o, uid=_Counted(o.uid)) for o in batch]
                await sink.send(batch)
            aside = {key: stream for stream, waiting in sink._aside.items() for key in waiting}
            assert len(aside) >= 4000, len(aside)
            waiting = list(aside)[:50]
            dropped = [_at(5, object_name=f"dropped-{i}") for i in range(50)]
            for (uid, number), other in zip(waiting, dropped, strict=True):
                one = dataclasses.replace(other, uid=uid, number=number)
                for gone in (one, dataclasses.replace(other, uid=_Counted(other.uid))):
                    _Counted.touched = 0
                    sink.given_up([gone])
                    assert _Counted.touched <= 6, _Counted.touched
            left = {key for waiting_ in sink._aside.values() for key in waiting_}
            assert left == set(aside) - set(waiting)
            _assert_in_step(sink)
        finally:
            await sink.aclose()


async def _one(sink: LokiSink, occurrence: Occurrence) -> Outcome:
    """The outcome of sending ``occurrence`` alone."""
    outcomes = await sink.send([occurrence])
    assert outcomes is not None
    return outcomes[0]


async def test_an_entry_stored_under_new_labels_frees_its_old_stream_after_a_reload_back() -> None:
    """K is refused for the stream limit under labels A (set aside), then again under labels B after a
    reload: it has a record under each stream. The limit is raised and K is stored under B. Reloaded
    back to A, a new entry of A's stream (two hours newer than K) is pushed and stored at once: K's
    record under A went with its answer, instead of holding A's stream back until it expired."""
    async with LokiReceiver(max_streams=1) as loki:
        a = _sink(loki.url)
        assert (await _one(a, _at(30, namespace="x", object_name="x-0"))).kind is OutcomeKind.OK
        k = _at(7205, namespace="k", object_name="K")
        key = (k.uid, k.number)
        assert (await _one(a, k)).defer  # the stream limit: set aside under A
        b = _sink(loki.url, labels={"copy": "b"})
        b.take_over(a)
        await a.aclose()
        assert (await _one(b, k)).defer  # B's stream is refused too
        assert len(b._aside_at[key]) == 2
        loki.max_streams = 10
        assert (await _one(b, k)).kind is OutcomeKind.OK
        a2 = _sink(loki.url)
        a2.take_over(b)
        await b.aclose()
        try:
            new = _at(5, namespace="k", object_name="K-new")
            outcome = await _one(a2, new)
            assert outcome.kind is OutcomeKind.OK, outcome
            assert any("K-new" in entry.line for entry in loki.entries)
            assert key not in a2._aside_at
            assert not any(key in waiting for waiting in a2._aside.values())
        finally:
            await a2.aclose()


async def test_the_index_of_records_aside_holds_the_streams_own_bytes_for_labels_over_1_kib() -> None:
    """Labels over 1 KiB miss the label cache, so each entry of a stream brings its own bytes of the
    stream. Entries of 20 such streams are set aside over five sends (Loki's stream limit): every
    stream the index names is the very object ``_aside`` is keyed by, so the index keeps no copy."""
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url)
        try:
            for round_ in range(5):
                batch = [
                    _at(5, namespace="n" * 1100 + str(i % 20), object_name=f"o{round_}-{i}")
                    for i in range(40)
                ]
                await sink.send(batch)
            assert len(sink._aside) == 19  # Loki took one stream
            records = sum(map(len, sink._aside.values()))
            assert records >= 150, records
            keys = {id(stream): stream for stream in sink._aside}
            for key, streams in sink._aside_at.items():
                for stream in streams:
                    assert keys.get(id(stream)) is stream, (key, len(stream))
                    assert key in sink._aside[stream]
        finally:
            await sink.aclose()
