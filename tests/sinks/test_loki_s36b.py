"""Loki: session 36 (item 329), the records aside of an entry answered otherwise go under every label
set, and the index of records aside (``_aside_at``, item 327) keeps no copy of a stream's bytes.

After a reload A→B an entry waiting aside has a record under each label set; delivered under B, its
record under A stayed and, after a reload back to A, held A's newer entries back behind an entry Loki
had stored, until it expired (review-g N1). The index kept each entry's own bytes of its stream,
a separate copy per record when the label cache missed (review-g N2)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from eventrouter import Occurrence, Outcome, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, **options: Any) -> LokiSink:
    context = SinkContext(
        name="loki",
        cluster="test",
        data_dir=None,
        logger=logging.getLogger("test.loki"),
        retry_wait_max=300.0,
    )
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), context)


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
