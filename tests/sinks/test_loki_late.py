"""Entries more than an hour behind their stream's newest (a relist in key order) against the project's
Loki-compatible receiver, which refuses them as Loki's ingester does (max_chunk_age 2h / 2)."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink, _NewestPerStream

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, **options: str) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


async def test_an_entry_far_behind_its_streams_newest_is_stamped_at_receipt_and_marked() -> None:
    """A replay or a relist in key order: an entry three hours behind an entry already sent to its
    stream. Loki would refuse it (and with it its push); stamped at receipt it is stored, marked, the
    same on a retry (Loki de-duplicates it)."""
    newest = _at(60, namespace="shop", object_name="a")
    late = _at(3 * 3600, namespace="shop", object_name="b")
    fine_same_stream = _at(1800, namespace="shop", object_name="c")
    async with LokiReceiver() as loki:
        sink = _sink(loki.url)
        try:
            await sink.send([newest])
            for _ in range(2):
                outcomes = await sink.send([late, fine_same_stream])
                assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 2
        finally:
            await sink.aclose()
        assert all(p.status == 204 for p in loki.pushes)
        by_object = {orjson.loads(e.line)["involved_object"]["name"]: e for e in loki.entries}
        assert by_object["b"].ts_ns == int(late.received_at * 1e9)
        record = orjson.loads(by_object["b"].line)
        assert record["time_adjusted"] is True and record["time"] == late.record["time"]
        assert by_object["c"].ts_ns == fine_same_stream.time_ns
        assert "time_adjusted" not in orjson.loads(by_object["c"].line)
        assert sum(len(s.values) for s in loki.query_range()) == 3


async def test_entries_far_behind_a_sent_newer_one_are_pushed_apart_and_only_they_are_rejected() -> None:
    newest = _at(60, namespace="shop", object_name="a")
    late = _at(3 * 3600, namespace="shop", object_name="b")
    fine_same_stream = _at(1800, namespace="shop", object_name="c")
    other_stream = _at(3 * 3600, namespace="web", object_name="d")
    async with LokiReceiver() as loki:
        sink = _sink(loki.url, clamp_time="false")
        try:
            first = await sink.send([newest])
            assert first is not None and [o.kind for o in first] == [OutcomeKind.OK]
            outcomes = await sink.send([late, fine_same_stream, other_stream])
        finally:
            await sink.aclose()
        assert outcomes is not None
        assert [o.kind for o in outcomes] == [OutcomeKind.REJECT, OutcomeKind.OK, OutcomeKind.OK]
        assert "entry too far behind" in outcomes[0].reason
        stored = {e.label_dict["namespace"] + "/" + str(e.ts_ns) for e in loki.entries}
        assert stored == {
            f"{o.record['namespace']}/{o.time_ns}" for o in (newest, fine_same_stream, other_stream)
        }
        # Two pushes for the second batch: the on-time entries (204), then the late one alone (400).
        assert [p.status for p in loki.pushes][-2:] == [204, 400]


async def test_late_entries_are_delivered_when_lokis_window_is_wider() -> None:
    newest = _at(60, namespace="shop", object_name="a")
    late = _at(3 * 3600, namespace="shop", object_name="b")
    async with LokiReceiver(max_chunk_age=12 * 3600) as loki:
        sink = _sink(loki.url, max_behind=str(6 * 3600))
        try:
            await sink.send([newest])
            outcomes = await sink.send([late])
        finally:
            await sink.aclose()
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK]
        assert sorted(e.ts_ns for e in loki.entries) == [late.time_ns, newest.time_ns]


async def test_a_retryable_answer_to_the_late_push_retries_only_the_late_items() -> None:
    newest = _at(60, namespace="shop", object_name="a")
    late = _at(3 * 3600, namespace="shop", object_name="b")
    fresh = _at(30, namespace="shop", object_name="c")
    async with LokiReceiver() as loki:
        sink = _sink(loki.url, clamp_time="false")
        try:
            await sink.send([newest])
            loki.fail_next(204, store=True)  # the on-time push: stored as usual
            loki.fail_next(503, retry_after="3")  # the late push
            outcomes = await sink.send([late, fresh])
        finally:
            await sink.aclose()
        assert outcomes is not None
        assert [o.kind for o in outcomes] == [OutcomeKind.RETRY, OutcomeKind.OK]
        assert "503" in outcomes[0].reason and outcomes[0].retry_after == 3.0
        assert sorted(e.ts_ns for e in loki.entries) == [newest.time_ns, fresh.time_ns]


def test_the_newest_per_stream_table_holds_no_object_per_stream_or_update() -> None:
    # Each update of a dict made a new int that outlived the relist it came from, and each stream's
    # key stayed after the label cache was emptied: thousands of blocks pinning whole pymalloc arenas.
    table = _NewestPerStream()
    streams = [f'{{namespace="ns-{i}"}}'.encode() for i in range(3000)]
    stamps = [1_796_098_874_000_000_000 + i for i in range(3000)]
    before = [sys.getrefcount(x) for x in streams + stamps]
    for stream, ts in zip(streams, stamps, strict=True):
        table.update(stream, ts)
        table.update(stream, ts - 5)  # older: the newest stays
    del stream, ts  # the loop's own references
    assert [sys.getrefcount(x) for x in streams + stamps] == before
    found = [table.get(stream) for stream in streams]
    # A bucket holds several streams: direct-mapped, ~250 of 3,000 lost their slot to another.
    assert sum(got == ts for got, ts in zip(found, stamps, strict=True)) >= 2995
    assert all(got is None or got == ts for got, ts in zip(found, stamps, strict=True))
    assert table.get(b'{namespace="never-sent"}') is None


def test_a_time_beyond_what_the_table_holds_is_not_kept() -> None:
    table = _NewestPerStream()
    year_9999 = 253_402_300_799 * 1_000_000_000  # a valid RFC 3339 time, more than an int64 of ns
    table.update(b'{namespace="a"}', year_9999)
    assert table.get(b'{namespace="a"}') is None


async def test_an_accepted_entry_from_the_year_9999_does_not_fail_the_push() -> None:
    # Loki refuses it by default (creation_grace_period); a server that takes it must not make the sink
    # fail a push it has stored (the newest-per-stream table holds int64 nanoseconds only). Sent as it
    # is (clamp_time=false), in a push of its own.
    far = make_occurrence(first_timestamp="9999-12-31T23:59:59Z", namespace="shop", object_name="a")
    soon = _at(60, namespace="shop", object_name="b")
    async with LokiReceiver(creation_grace_period=9000 * 365 * 86400) as loki:
        sink = _sink(loki.url, clamp_time="false")
        try:
            outcomes = await sink.send([far, soon])
        finally:
            await sink.aclose()
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.OK]
        assert sorted(e.ts_ns for e in loki.entries) == [soon.time_ns, far.time_ns]


def test_a_full_bucket_forgets_its_stalest_stream_only() -> None:
    table = _NewestPerStream(slots=1)
    table.update(b'{namespace="a"}', 100)
    table.update(b'{namespace="b"}', 50)
    assert table.get(b'{namespace="b"}') == 50
    assert table.get(b'{namespace="a"}') is None  # forgotten: its entries are no longer predicted late


async def test_a_replay_is_handed_to_loki_oldest_first_so_every_entry_keeps_its_time() -> None:
    """A recording (or a dead-letter file) is in file order: here an event three hours older than the
    one before it, in the same stream, each pushed on its own. Replayed oldest first, as a relist is,
    Loki takes every entry at its own time: nothing refused, nothing stamped at receipt."""
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import build_specs
    from eventrouter.testing import event_object

    def at(seconds_ago: float, name: str) -> dict[str, Any]:
        when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return event_object(namespace="shop", object_name=name, first_timestamp=when)

    objects = [at(60, "a"), at(3 * 3600, "b"), at(1800, "c")]
    async with LokiReceiver() as loki:
        router = Router(
            RouterSettings(cluster_name="test", metrics_addr=None),
            build_specs([f"loki:{loki.url}?batch_max_events=1&batch_max_wait=0.01"]),
        )
        await router.start_pipelines()
        try:
            assert await router.replay(("ADDED", obj) for obj in objects) == (3, 0)
            assert await router.drain(30)
        finally:
            await router.stop()
    pushed = [orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries]
    assert pushed == ["b", "c", "a"] and all(p.status == 204 for p in loki.pushes)
    assert all("time_adjusted" not in orjson.loads(e.line) for e in loki.entries)
    wanted = sorted(
        int(datetime.strptime(o["firstTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
        for o in objects
    )
    assert sorted(e.ts_ns // 1_000_000_000 for e in loki.entries) == wanted
