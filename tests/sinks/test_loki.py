"""The Loki sink against the project's Loki-compatible receiver (validates like Loki 3.x)."""

from __future__ import annotations

import gzip
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import cramjam
import orjson
import pytest
from pydantic import ValidationError

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, SinkError, normalise
from eventrouter.options import COMMON_KEYS
from eventrouter.protowire import bytes_field, varint_field
from eventrouter.record import occurrence_number, parse_time_ns
from eventrouter.testing import make_occurrence, recorded_watch
from eventrouter.testing.pipelines import dead_letter
from eventrouter.testing.receivers.loki import KEEP_OLD_SAMPLES, LokiReceiver
from eventrouter.testing.tls import certificate, server_context
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
NS = 1_000_000_000


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def recent(seconds_ago: float = 60, **kwargs: Any) -> Occurrence:
    """An occurrence whose time is recent (Loki refuses entries older than 7 days)."""
    return make_occurrence(first_timestamp=_iso(time.time() - seconds_ago), **kwargs)


@pytest.fixture
async def loki() -> AsyncIterator[LokiReceiver]:
    async with LokiReceiver() as receiver:
        yield receiver


async def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


def _entries_by_uid(receiver: LokiReceiver) -> dict[str, list[tuple[dict[str, str], int, dict[str, Any]]]]:
    out: dict[str, list[tuple[dict[str, str], int, dict[str, Any]]]] = {}
    for stream in receiver.query_range():
        for ts, line, _ in stream.values:
            record = orjson.loads(line)
            out.setdefault(record["uid"], []).append((stream.labels, ts, record))
    return out


@pytest.mark.parametrize(
    ("options", "content_type", "content_encoding"),
    [
        ({}, "application/x-protobuf", ""),
        ({"format": "json"}, "application/json", ""),
        ({"format": "json", "gzip": "true"}, "application/json", "gzip"),
    ],
    ids=["protobuf-snappy", "json", "json-gzip"],
)
async def test_push_decodes_to_expected_streams_sorted_with_ns_timestamps(
    loki: LokiReceiver, options: dict[str, Any], content_type: str, content_encoding: str
) -> None:
    newer = recent(10, namespace="shop", object_name="cart-0", reason="BackOff")
    older = recent(20, namespace="shop", object_name="cart-1", reason="BackOff")
    other = recent(15, namespace="default", kind="Node", object_name="node-1", reason="NodeNotReady")
    sink = await _sink(loki.url, **options)
    try:
        await sink.start()
        outcomes = await sink.send([newer, other, older])
    finally:
        await sink.aclose()
    assert outcomes is not None and all(o.kind is OutcomeKind.OK for o in outcomes)
    push = loki.pushes[-1]
    assert (push.status, push.content_type, push.content_encoding) == (204, content_type, content_encoding)
    streams = {s.labels["namespace"]: s for s in loki.query_range()}
    assert streams["shop"].labels == {
        "cluster": "test", "namespace": "shop", "kind": "Pod", "type": "Warning", "reason": "BackOff",
        "reporting_component": "kubelet", "service_name": "unknown_service",
    }  # fmt: skip
    assert streams["default"].labels["kind"] == "Node"
    assert [ts for ts, _, _ in streams["shop"].values] == [older.time_ns, newer.time_ns]
    assert [orjson.loads(line)["uid"] for _, line, _ in streams["shop"].values] == [older.uid, newer.uid]
    assert all(ts % 1000 == 0 and ts % NS != 0 for ts, _, _ in streams["shop"].values)  # sub-second kept
    # The stored entries arrived in the wire order: within a stream, sorted by time.
    shop = [e.ts_ns for e in loki.entries if e.label_dict["namespace"] == "shop"]
    assert shop == sorted(shop)


async def test_replaying_the_recording_delivers_every_occurrence_once_with_labels_and_event_time() -> None:
    expected: dict[tuple[str, int], dict[str, Any]] = {}
    occurrences: list[Occurrence] = []
    last: dict[str, int] = {}
    for watch_event in recorded_watch():
        obj = watch_event["object"]
        if watch_event["type"] not in ("ADDED", "MODIFIED"):
            continue
        uid, number = obj["metadata"]["uid"], occurrence_number(obj)
        if number <= last.get(uid, 0):
            continue
        last[uid] = number
        occurrences.append(normalise(obj, cluster="rec-1"))
        expected[(uid, number)] = obj
    assert len(occurrences) == 126
    # The recording is from 2026-11-22 01:29-01:32 UTC: a Loki that keeps old samples takes it.
    async with LokiReceiver(reject_old_samples_max_age=KEEP_OLD_SAMPLES) as receiver:
        sink = await _sink(receiver.url, structured_metadata="true", max_age=str(KEEP_OLD_SAMPLES))
        try:
            await sink.start()
            for start in range(0, len(occurrences), 20):
                outcomes = await sink.send(occurrences[start : start + 20])
                assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * len(outcomes)
        finally:
            await sink.aclose()
        seen: dict[tuple[str, int], int] = {}
        for stream in receiver.query_range():
            for ts, line, metadata in stream.values:
                record = orjson.loads(line)
                key = (record["uid"], record["occurrence"])
                seen[key] = seen.get(key, 0) + 1
                obj = expected[key]
                involved = obj["involvedObject"]
                component = obj.get("reportingComponent") or (obj.get("source") or {}).get("component", "")
                want = {
                    "cluster": "rec-1",
                    "namespace": obj["metadata"].get("namespace", ""),
                    "kind": involved.get("kind", ""),
                    "type": obj.get("type") or "Normal",
                    "reason": obj.get("reason", ""),
                    "reporting_component": component,
                }
                assert {k: v for k, v in stream.labels.items() if k != "service_name"} == {
                    k: v for k, v in want.items() if v
                }
                # The entry's timestamp is the event's own time, to the nanosecond, never push time.
                series = obj.get("series") or {}
                event_ns = next(
                    ns
                    for ns in (
                        parse_time_ns(series.get("lastObservedTime")),
                        parse_time_ns(obj.get("lastTimestamp")),
                        parse_time_ns(obj.get("eventTime")),
                        parse_time_ns(obj.get("firstTimestamp")),
                    )
                    if ns is not None
                )
                assert ts == event_ns == parse_time_ns(record["time"])
                want_metadata = {
                    "involved_object_name": involved.get("name", ""),
                    "involved_object_uid": involved.get("uid", ""),
                    "event_uid": key[0],
                    "occurrence": str(key[1]),
                }
                assert metadata == {k: v for k, v in want_metadata.items() if v}
    assert seen == dict.fromkeys(expected, 1)
    assert any(k for k, obj in expected.items() if obj.get("eventTime") and not obj.get("lastTimestamp"))


async def test_entries_outside_lokis_time_window_are_stamped_at_receipt_and_marked(
    loki: LokiReceiver,
) -> None:
    # A week-old event (reject_old_samples_max_age) and one from a node whose clock is an hour ahead
    # (creation_grace_period): Loki would refuse both, and with them the push they are in.
    old = make_occurrence(first_timestamp=_iso(time.time() - 8 * 86400), reason="Old")
    ahead = make_occurrence(first_timestamp=_iso(time.time() + 3600), reason="Ahead")
    fresh = recent(5, reason="Fresh")
    for line_format in ("json", "logfmt"):
        sink = await _sink(loki.url, line_format=line_format)
        try:
            for _ in range(2):  # sent twice (a retry): identical entries, which Loki de-duplicates
                outcomes = await sink.send([old, ahead, fresh])
                assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 3
        finally:
            await sink.aclose()
    stored = {(e.label_dict["reason"], e.line[:1]): e for e in loki.entries}
    assert len(loki.entries) == 12 and len(stored) == 6
    for occurrence in (old, ahead):
        reason = occurrence.record["reason"]
        as_json, as_logfmt = stored[(reason, "{")], stored[(reason, "t")]
        assert as_json.ts_ns == as_logfmt.ts_ns == int(occurrence.received_at * NS)
        record = orjson.loads(as_json.line)
        assert record["time_adjusted"] is True and record["time"] == occurrence.record["time"]
        assert as_logfmt.line.startswith("time=") and " time_adjusted=true" in as_logfmt.line
    assert stored[("Fresh", "{")].ts_ns == fresh.time_ns
    assert "time_adjusted" not in orjson.loads(stored[("Fresh", "{")].line)
    assert sum(len(s.values) for s in loki.query_range()) == 6


async def test_an_entry_both_outside_the_window_and_too_long_carries_both_marks(loki: LokiReceiver) -> None:
    """Clamped and truncated at once: stamped at receipt, shortened to the limit, and its line says
    both; sent twice (a retry) it is the same entry, which Loki de-duplicates."""
    old = make_occurrence(first_timestamp=_iso(time.time() - 8 * 86400), reason="Old", message="x" * 5000)
    for line_format in ("json", "logfmt"):
        sink = await _sink(loki.url, line_format=line_format, max_line_bytes="2048")
        try:
            for _ in range(2):
                outcomes = await sink.send([old])
                assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    as_json, again, as_logfmt, _ = loki.entries
    assert as_json == again
    assert as_json.ts_ns == as_logfmt.ts_ns == int(old.received_at * NS)
    assert len(as_json.line.encode()) <= 2048 and len(as_logfmt.line.encode()) <= 2048
    record = orjson.loads(as_json.line)
    assert record["time_adjusted"] is True and record["time"] == old.record["time"]
    assert record["truncated"] is True and record["original_bytes"] > 5000
    assert record["message"].startswith("xxx") and record["message"].endswith("…")
    assert " time_adjusted=true" in as_logfmt.line and " truncated=true" in as_logfmt.line
    assert sum(len(s.values) for s in loki.query_range()) == 2


async def test_a_sink_rebuilt_for_new_credentials_still_knows_each_stream_s_newest_entry(
    loki: LokiReceiver,
) -> None:
    """The router rebuilds the sink when a credential file changes (engine/reload.py); the new
    instance takes over what Loki has accepted per stream, so an entry over an hour behind it is
    still clamped instead of being refused (400 "entry too far behind")."""
    first = await _sink(loki.url)
    try:
        accepted = await first.send([recent(60, reason="Fresh")])
    finally:
        await first.aclose()
    assert accepted is None or [o.kind for o in accepted] == [OutcomeKind.OK]
    second = await _sink(loki.url, bearer_token="rotated")
    second.take_over(first)
    late = recent(2 * 3600 + 60, reason="Fresh", object_name="web-1")
    try:
        outcomes = await second.send([late])
    finally:
        await second.aclose()
    assert outcomes is None or [o.kind for o in outcomes] == [OutcomeKind.OK]
    record = orjson.loads(loki.entries[-1].line)
    assert record["time_adjusted"] is True and record["time"] == late.record["time"]
    assert [p.status for p in loki.pushes] == [204, 204]


async def test_without_clamp_time_only_the_entries_outside_the_window_are_refused(loki: LokiReceiver) -> None:
    old = make_occurrence(first_timestamp=_iso(time.time() - 8 * 86400), reason="Old")
    fresh = recent(5, reason="Fresh")
    sink = await _sink(loki.url, clamp_time="false")
    try:
        outcomes = await sink.send([old, fresh])
    finally:
        await sink.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT, OutcomeKind.OK]
    assert "has timestamp too old" in outcomes[0].reason and "400" in outcomes[0].reason
    assert [e.label_dict["reason"] for e in loki.entries] == ["Fresh"]
    # The old entry went in a push of its own: Loki judged it, and nothing else with it.
    assert [(p.status, p.accepted) for p in loki.pushes] == [(204, 1), (400, 0)]


async def test_a_loki_stricter_than_configured_gives_partial_400_and_only_the_refused_entry_is_rejected() -> (
    None
):
    # Loki keeps one day, the sink expects the default week: the two-day-old entry is not predicted.
    # One stream, so one push (a stream new to the sink is pushed on its own, last).
    old = make_occurrence(first_timestamp=_iso(time.time() - 2 * 86400), object_name="old")
    fresh = recent(5, object_name="fresh")
    async with LokiReceiver(reject_old_samples_max_age=86400) as loki:
        sink = await _sink(loki.url)
        try:
            outcomes = await sink.send([old, fresh])
        finally:
            await sink.aclose()
        assert outcomes is not None
        # Before: both rejected (dead-lettered), the fresh one although Loki held it.
        assert [o.kind for o in outcomes] == [OutcomeKind.REJECT, OutcomeKind.OK]
        assert "has timestamp too old" in outcomes[0].reason and "400" in outcomes[0].reason
        # Loki's partial success, then each half again: the fresh one stored (and kept once).
        assert [(p.status, p.accepted) for p in loki.pushes] == [(400, 1), (400, 0), (204, 1)]
        stored = [
            orjson.loads(line)["involved_object"]["name"]
            for s in loki.query_range()
            for _, line, _ in s.values
        ]
        assert stored == ["fresh"]


async def test_a_gateway_body_limit_below_the_push_halves_it_and_refuses_only_an_entry_too_large_alone() -> (
    None
):
    # A gateway before Loki takes 16 KiB bodies (the Loki chart's nginx gateway: 4M; nginx's default 1m).
    batch = [recent(60 - i, reason="Fine", object_name=f"web-{i}", message="m" * 500) for i in range(40)]
    big = recent(30, reason="Big", object_name="big", message="x" * 20_000)
    batch.insert(17, big)
    async with LokiReceiver(max_body_bytes=16384) as receiver:
        sink = await _sink(receiver.url, format="json")
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        assert outcomes is not None
        assert [o.kind for o in outcomes] == [OutcomeKind.OK] * 17 + [OutcomeKind.REJECT] + [
            OutcomeKind.OK
        ] * 23
        assert "413" in outcomes[17].reason
        stored = [orjson.loads(line)["uid"] for s in receiver.query_range() for _, line, _ in s.values]
        assert sorted(stored) == sorted(o.uid for o in batch if o is not big)
        assert {p.status for p in receiver.pushes} == {204, 413}
        assert all(p.body_size <= 16384 for p in receiver.pushes if p.status == 204)


async def test_injected_400_rejects_items_with_the_message_and_is_not_retried(loki: LokiReceiver) -> None:
    # The push, then each half on its own (a 400 may be one entry's): refused every time.
    loki.fail_next(400, count=3, message="entry for stream '{}' has timestamp too new: 2099-01-01T00:00:00Z")
    batch = [recent(5), recent(6)]
    sink = await _sink(loki.url)
    try:
        outcomes = await sink.send(batch)
    finally:
        await sink.aclose()
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 2
    assert all("timestamp too new" in o.reason for o in outcomes)
    assert len(loki.pushes) == 3 and loki.entries == []


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [(429, "7", 7.0), (500, None, None), (503, "Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
async def test_429_and_5xx_raise_retryable_error_honouring_retry_after(
    loki: LokiReceiver, status: int, retry_after: str | None, expected: float | None
) -> None:
    loki.fail_next(status, retry_after=retry_after)
    sink = await _sink(loki.url)
    try:
        with pytest.raises(RetryableError) as caught:
            await sink.send([recent(5)])
        assert str(status) in caught.value.reason
        assert caught.value.retry_after == expected
        # The next attempt goes through.
        assert await sink.send([recent(5)]) is not None
    finally:
        await sink.aclose()
    assert len(loki.entries) == 1


async def test_a_push_discarded_because_ingestion_is_blocked_is_retried_when_the_block_ends(
    loki: LokiReceiver,
) -> None:
    """An operator's ``block_ingestion_until``: Loki discards the push and answers 260 (a 2xx).
    Counted as delivered, every occurrence would be lost without a trace."""
    loki.block_ingestion_until = time.time() + 120
    sink = await _sink(loki.url)
    batch = [recent(5, object_name="a"), recent(4, object_name="b")]
    try:
        with pytest.raises(RetryableError) as caught:
            await sink.send(batch)
        assert caught.value.reason.startswith(f"loki: {loki.url} answered 260, nothing stored: ")
        assert "ingestion blocked for user fake until '" in caught.value.reason
        assert caught.value.retry_after is not None and 100 < caught.value.retry_after <= 120
        assert loki.entries == [] and loki.discarded_blocked == 2
        loki.block_ingestion_until = time.time() - 1  # the block has ended
        assert await sink.send(batch) is not None
    finally:
        await sink.aclose()
    assert len(loki.entries) == 2


async def test_retried_push_resends_identical_entries_and_query_deduplicates(loki: LokiReceiver) -> None:
    # The push is stored but its answer is a 500 (an ingester wrote, the response was lost).
    loki.fail_next(500, store=True)
    batch = [recent(5, object_name="a"), recent(4, object_name="b"), recent(3, object_name="a", reason="X")]
    sink = await _sink(loki.url)
    loki.fail_next(500, store=True)  # both streams are new to the sink: two pushes, each answered 500
    try:
        with pytest.raises(RetryableError):
            await sink.send(batch)
        await sink.send(batch)
    finally:
        await sink.aclose()
    assert len(loki.entries) == 6
    first, second = loki.entries[:3], loki.entries[3:]
    assert set(first) == set(second) and len(set(first)) == 3  # identical timestamps, labels and lines
    assert sum(len(s.values) for s in loki.query_range()) == 3


async def test_oversize_line_is_truncated_and_marked_by_default(loki: LokiReceiver) -> None:
    big = recent(5, message="x" * 5000 + "尾")
    small = recent(4)
    sink = await _sink(loki.url, max_line_bytes="2048")
    try:
        outcomes = await sink.send([big, small])
    finally:
        await sink.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 2
    lines = {orjson.loads(e.line)["uid"]: e.line for e in loki.entries}
    truncated = orjson.loads(lines[big.uid])
    assert len(lines[big.uid].encode()) <= 2048
    assert truncated["truncated"] is True and truncated["original_bytes"] == len(big.json)
    assert truncated["message"].startswith("xxx") and truncated["message"].endswith("…")
    assert orjson.loads(lines[small.uid]) == small.record


async def test_oversize_line_is_rejected_alone_with_oversize_reject(loki: LokiReceiver) -> None:
    big = recent(5, message="y" * 5000)
    small = recent(4)
    sink = await _sink(loki.url, max_line_bytes="2048", oversize="reject")
    try:
        outcomes = await sink.send([big, small])
    finally:
        await sink.aclose()
    assert outcomes is not None
    assert outcomes[0].kind is OutcomeKind.REJECT and "max_line_bytes=2048" in outcomes[0].reason
    assert outcomes[1].kind is OutcomeKind.OK
    assert [orjson.loads(e.line)["uid"] for e in loki.entries] == [small.uid]


async def test_default_line_limit_matches_loki_so_a_300kb_message_is_stored_truncated(
    loki: LokiReceiver,
) -> None:
    big = recent(5, message="z" * 300_000)
    sink = await _sink(loki.url)
    try:
        outcomes = await sink.send([big])
    finally:
        await sink.aclose()
    assert outcomes is not None and outcomes[0].kind is OutcomeKind.OK
    assert 250_000 < len(loki.entries[0].line.encode()) <= 256_000


def test_cardinality_guard_refuses_per_object_templates_unless_allowed() -> None:
    for template in ("{involved_object.name}", "pod-{involved_object.uid}", "{message}", "{uid}", "{name}"):
        with pytest.raises(ValidationError, match="allow_high_cardinality_labels"):
            LokiOptions.model_validate({"url": "http://loki:3100", "labels": f"x={template}"})
    allowed = LokiOptions.model_validate(
        {
            "url": "http://loki:3100",
            "labels": "pod={involved_object.name}",
            "allow_high_cardinality_labels": True,
        }
    )
    assert allowed.labels == {"pod": "{involved_object.name}"}
    with pytest.raises(ValidationError, match=r"unknown field \{nope\}"):
        LokiOptions.model_validate({"url": "http://loki:3100", "labels": "x={nope}"})
    too_many = ",".join(f"l{i}=v" for i in range(10))
    with pytest.raises(ValidationError, match="at most 15"):
        LokiOptions.model_validate({"url": "http://loki:3100", "labels": too_many})


def test_options_accept_query_string_forms_aliases_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKI_TEST_PW", "s3cret-pw")
    opts = LokiOptions.model_validate(
        {
            "url": "https://loki.example:3100",
            "labels": "team=payments,app={labels.app},app.kubernetes.io/name=shop",
            "orgid": "ops",
            "username": "bob",
            "password": "env:LOKI_TEST_PW",
            "headers": ["X-Api-Key:abc123", "X-Other: two"],
            "default_labels": "namespace,type",
        }
    )
    assert opts.tenant == "ops"
    assert opts.labels == {"team": "payments", "app": "{labels.app}", "app_kubernetes_io_name": "shop"}
    assert opts.password is not None and opts.password.get_secret_value() == "s3cret-pw"
    assert "s3cret-pw" not in repr(opts) and "abc123" not in repr(opts)
    own = set(LokiOptions.model_fields) - {"url"}
    assert not own & COMMON_KEYS
    with pytest.raises(ValidationError, match="gzip=true needs format=json"):
        LokiOptions.model_validate({"url": "http://l:3100", "gzip": True})
    with pytest.raises(ValidationError, match="url is required"):
        LokiOptions.model_validate({})


async def test_label_sanitisation_and_escaping_with_the_recorded_chinese_quote_backslash_newline_event(
    loki: LokiReceiver,
) -> None:
    obj = next(
        line["object"] for line in recorded_watch() if "就绪探针失败" in (line["object"].get("message") or "")
    )
    occurrence = normalise(obj, cluster="rec")
    message = occurrence.record["message"]
    assert '"' in message and "\\" in message and "\n" in message
    async with LokiReceiver(reject_old_samples_max_age=KEEP_OLD_SAMPLES) as receiver:
        sink = await _sink(
            receiver.url,
            max_age=str(KEEP_OLD_SAMPLES),
            labels='msg={message},app.kubernetes.io/name=shop,__internal=x,9lives=y,"quote"=z-{involved_object.kind}',
            allow_high_cardinality_labels="true",
            line_format="logfmt",
        )
        try:
            outcomes = await sink.send([occurrence])
        finally:
            await sink.aclose()
        assert outcomes is not None and outcomes[0].kind is OutcomeKind.OK, outcomes
        (stored,) = receiver.entries
    labels = stored.label_dict
    assert labels["msg"] == message
    assert labels["app_kubernetes_io_name"] == "shop"
    assert labels["_internal"] == "x" and labels["_9lives"] == "y" and labels["_quote_"] == "z-Pod"
    assert all(not name.startswith("__") for name in labels)
    assert stored.line.startswith("time=2026-11-22T01:29:40Z ")
    assert stored.line.endswith(
        'message="就绪探针失败：连接被拒绝 (readiness probe failed) ✓ \\"quoted\\" \\\\ back\\\\slash \\n second line"'
    )


@pytest.mark.parametrize("fmt", ["protobuf", "json"])
async def test_lone_surrogates_in_a_message_are_replaced_never_crash_the_batch(
    loki: LokiReceiver, fmt: str
) -> None:
    broken = recent(5, message="bad \udcff byte and \ud83d half")
    fine = recent(4)
    sink = await _sink(loki.url, format=fmt, labels="m={message}", allow_high_cardinality_labels=True)
    try:
        outcomes = await sink.send([broken, fine])
    finally:
        await sink.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 2
    lines = {orjson.loads(e.line)["uid"]: (e, orjson.loads(e.line)) for e in loki.entries}
    entry, record = lines[broken.uid]
    assert record["message"] == "bad \ufffd byte and \ufffd half"
    # Not U+FFFD in a label: Loki's label parser (Prometheus' lexer) refuses the whole push for it.
    assert entry.label_dict["m"] == "bad ? byte and ? half"
    assert lines[fine.uid][1] == fine.record


async def test_tenant_basic_auth_and_custom_headers_are_sent() -> None:
    async with LokiReceiver(auth_enabled=True, username="bob", password="pw") as receiver:
        sink = await _sink(receiver.url, tenant="team-a", username="bob", password="pw", headers="X-Extra:1")
        try:
            await sink.start()
            assert (await sink.send([recent(5)])) is not None
        finally:
            await sink.aclose()
        assert receiver.entries[0].tenant == "team-a"
        assert receiver.pushes[-1].headers["X-Extra"] == "1"
        assert receiver.pushes[-1].headers["User-Agent"].startswith("eventrouter/")
        assert len(receiver.query_range(tenant="team-a")) == 1 and receiver.query_range(tenant="other") == []
        # Without a tenant Loki answers 401 "no org id": retried (a configuration fix brings it back).
        no_tenant = await _sink(receiver.url, username="bob", password="pw")
        try:
            with pytest.raises(
                RetryableError, match=r"no org id \(this Loki is multi-tenant: set tenant=<org id>\)"
            ):
                await no_tenant.send([recent(5)])
        finally:
            await no_tenant.aclose()


async def test_bearer_token_is_sent() -> None:
    async with LokiReceiver(bearer_token="tok-123") as receiver:
        sink = await _sink(receiver.url, bearer_token="tok-123")
        try:
            await sink.start()
            await sink.send([recent(5)])
        finally:
            await sink.aclose()
        assert receiver.pushes[-1].headers["Authorization"] == "Bearer tok-123"
        assert len(receiver.entries) == 1


async def test_start_fails_clearly_on_wrong_credentials_without_leaking_them() -> None:
    async with LokiReceiver(username="bob", password="right") as receiver:
        url = receiver.url.replace("http://", "http://bob:wrong-secret@")
        sink = await _sink(url)
        try:
            with pytest.raises(SinkError) as caught:
                await sink.start()
        finally:
            await sink.aclose()
    message = str(caught.value)
    assert "401" in message and receiver.url in message and "wrong-secret" not in message


TOKEN = "tok-live-7d6c5b4a3f2e1d0c"
PASSWORD = "pa55/w0rd-9e8d"  # "/" is %2F in a URL's user info
API_KEY = "hdr-key-4f3e2d1c0b"


@pytest.mark.parametrize(
    ("options", "auth", "secret"),
    [
        ({"bearer_token": TOKEN}, {"bearer_token": TOKEN}, TOKEN),
        ({"username": "alice", "password": PASSWORD}, {"username": "alice", "password": PASSWORD}, PASSWORD),
        (
            {"userinfo": f"alice:{quote(PASSWORD, safe='')}"},
            {"username": "alice", "password": PASSWORD},
            PASSWORD,
        ),
        ({"headers": [f"X-Api-Key:{API_KEY}", "X-Team:1"]}, {}, API_KEY),
    ],
    ids=["bearer", "basic", "userinfo", "header"],
)
async def test_an_answer_echoing_the_request_keeps_our_credentials_out_of_reasons_and_logs(
    options: dict[str, Any],
    auth: dict[str, Any],
    secret: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway in front of Loki answers with the request it refused (the Authorization header, the
    custom headers) and the credential it quotes: Loki's answer went into reasons (logged, written to
    the dead-letter file) as it came."""
    caplog.set_level(logging.DEBUG)
    userinfo = options.pop("userinfo", "")
    async with LokiReceiver(**auth) as receiver:
        url = receiver.url.replace("http://", f"http://{userinfo}@") if userinfo else receiver.url
        opts = LokiOptions.model_validate({"url": url, **options})
        receiver.fail_next(400, message=f"invalid credential {secret};", echo=True)
        sink = LokiSink(opts, CONTEXT)
        try:
            (outcome,) = await sink.send([recent(5, object_name="direct")]) or []
        finally:
            await sink.aclose()
        # Through the engine: retried (and given up after one attempt), then refused for good.
        receiver.fail_next(502, message=f"bad gateway for {secret};", echo=True)
        receiver.fail_next(400, message=f"invalid credential {secret};", echo=True)
        records = await dead_letter(
            "loki",
            LokiSink(opts, CONTEXT),
            tmp_path / "dl",
            [(recent(5, object_name="a"), "retries_exhausted"), (recent(5, object_name="b"), "rejected")],
        )
    sent = receiver.pushes[0].headers.get("Authorization", "")
    assert all(
        p.status in (400, 502) and "refused POST /loki/api/v1/push" in p.message for p in receiver.pushes
    )
    assert outcome.kind is OutcomeKind.REJECT and "invalid credential ****;" in outcome.reason
    assert records[0]["reason"].startswith(
        f"retries exhausted after 1 attempts: loki: {receiver.url} answered 502"
    )
    assert records[1]["reason"].startswith("loki: 400 (push of 1 entries refused, possibly partly stored)")
    if "headers" in options:
        assert "X-Team: 1" in outcome.reason  # a value too short to be a secret is left alone
    texts = [outcome.reason, *(r["reason"] for r in records), caplog.text]
    token = sent.partition(" ")[2]  # Basic: base64 of user:password, as sent
    for text in texts:
        assert "****" in text
        for hidden in (secret, quote(secret, safe=""), token):
            assert not hidden or hidden not in text, (hidden, text)


async def test_a_stream_named_in_lokis_answer_is_found_though_its_labels_are_quoted_masked() -> None:
    """Loki's stream-limit answer names the refused stream by its labels, which the sink parses: a
    label value equal to a credential (a custom header's value) is masked in the reason only."""
    async with LokiReceiver(max_streams=1) as receiver:
        sink = await _sink(receiver.url, headers="X-Team:payments-b")
        try:
            assert await sink.send([recent(30, namespace="a", object_name="a-0")]) is not None
            outcomes = await sink.send([recent(20, namespace="payments-b"), recent(10, namespace="a")])
        finally:
            await sink.aclose()
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.RETRY, OutcomeKind.OK]
    assert outcomes[0].defer and 'namespace="****"' in outcomes[0].reason
    assert "payments-b" not in outcomes[0].reason


async def test_start_and_send_when_unreachable(unused_tcp_port: int) -> None:
    sink = await _sink(f"http://user:hunter2@127.0.0.1:{unused_tcp_port}/prefix", timeout="2")
    try:
        with pytest.raises(SinkError) as start_error:
            await sink.start()
        with pytest.raises(RetryableError) as send_error:
            await sink.send([recent(5)])
    finally:
        await sink.aclose()
        await sink.aclose()  # idempotent
    for text in (str(start_error.value), send_error.value.reason):
        assert f"http://127.0.0.1:{unused_tcp_port}/prefix" in text and "hunter2" not in text


async def test_aclose_without_start_is_safe() -> None:
    sink = await _sink("http://127.0.0.1:1")
    await sink.aclose()
    await sink.aclose()


@pytest.fixture
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    return certificate(tmp_path)


async def test_https_with_ca_file_and_insecure_skip_verify(self_signed_cert: tuple[Path, Path]) -> None:
    cert, key = self_signed_cert
    server_ctx = server_context(cert, key)
    async with LokiReceiver(ssl_context=server_ctx) as receiver:
        assert receiver.url.startswith("https://")
        for options in ({"ca_file": str(cert)}, {"insecure_skip_verify": True}):
            sink = await _sink(receiver.url, **options)
            try:
                await sink.start()
                await sink.send([recent(5)])
            finally:
                await sink.aclose()
        untrusted = await _sink(receiver.url)
        try:
            with pytest.raises(SinkError, match="cannot reach"):
                await untrusted.start()
        finally:
            await untrusted.aclose()
    assert len(receiver.entries) == 2


# -- the receiver refuses what Loki refuses -------------------------------------------------------


async def _post(
    url: str, body: bytes, headers: dict[str, str], *, skip: tuple[str, ...] = ()
) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/loki/api/v1/push", data=body, headers=headers, skip_auto_headers=skip
        ) as response,
    ):
        return response.status, await response.text()


def _proto(labels: str, ts_ns: int, line: str) -> bytes:
    seconds, nanos = divmod(ts_ns, NS)
    entry = bytes_field(1, varint_field(1, seconds) + varint_field(2, nanos)) + bytes_field(2, line)
    return bytes(cramjam.snappy.compress_raw(bytes_field(1, bytes_field(1, labels) + bytes_field(2, entry))))


async def test_receiver_rejects_what_loki_rejects(loki: LokiReceiver) -> None:
    now_ns = time.time_ns()
    good_json = orjson.dumps({"streams": [{"stream": {"a": "b"}, "values": [[str(now_ns), "hello"]]}]})
    # Content type decides the body format: JSON bytes sent as (default) protobuf are not snappy.
    status, text = await _post(loki.url, good_json, {"Content-Type": "application/x-protobuf"})
    assert (status, text.strip()) == (400, "snappy: corrupt input")
    status, text = await _post(loki.url, good_json, {})  # aiohttp's default: application/octet-stream
    assert (status, text.strip()) == (400, "snappy: corrupt input")
    # Truly no Content-Type: Loki's mime.ParseMediaType("") fails before choosing a decoder.
    status, text = await _post(loki.url, good_json, {}, skip=("Content-Type",))
    assert (status, text.strip()) == (400, "mime: no media type")
    # A numeric timestamp in JSON.
    numeric = orjson.dumps({"streams": [{"stream": {"a": "b"}, "values": [[now_ns, "hello"]]}]})
    status, text = await _post(loki.url, numeric, {"Content-Type": "application/json"})
    assert status == 400 and "ReadString" in text
    # Bad label syntax / names, in both formats.
    status, text = await _post(
        loki.url, _proto('{foo.bar="x"}', now_ns, "l"), {"Content-Type": "application/x-protobuf"}
    )
    assert status == 400 and text.startswith("couldn't parse labels")
    bad_name = orjson.dumps({"streams": [{"stream": {"app-name": "b"}, "values": [[str(now_ns), "l"]]}]})
    status, text = await _post(loki.url, bad_name, {"Content-Type": "application/json"})
    assert status == 400 and text.startswith("couldn't parse labels")
    status, text = await _post(
        loki.url, _proto('{a="unterminated}', now_ns, "l"), {"Content-Type": "application/x-protobuf"}
    )
    assert status == 400 and text.startswith("couldn't parse labels")
    # No labels, too many labels, too long a line, unsupported encoding.
    status, text = await _post(
        loki.url, _proto("{}", now_ns, "l"), {"Content-Type": "application/x-protobuf"}
    )
    assert (status, text.strip()) == (400, "error at least one label pair is required per stream")
    sixteen = "{" + ",".join(f'l{i}="v"' for i in range(16)) + "}"
    status, text = await _post(
        loki.url, _proto(sixteen, now_ns, "l"), {"Content-Type": "application/x-protobuf"}
    )
    assert status == 400 and "has 16 label names; limit 15" in text
    status, text = await _post(
        loki.url, _proto('{a="b"}', now_ns, "x" * 262_145), {"Content-Type": "application/x-protobuf"}
    )
    # Loki reads its default "256KB" as 262,144 bytes (flagext.ByteSize: binary).
    assert status == 400 and "Max entry size '262144' bytes exceeded" in text
    status, text = await _post(
        loki.url, good_json, {"Content-Type": "application/json", "Content-Encoding": "br"}
    )
    assert (status, text.strip()) == (400, 'Content-Encoding "br" not supported')
    # Too new (beyond the 10 minute grace period).
    status, text = await _post(
        loki.url, _proto('{a="b"}', now_ns + 3600 * NS, "l"), {"Content-Type": "application/x-protobuf"}
    )
    assert status == 400 and "has timestamp too new" in text
    assert loki.entries == []
    # What Loki accepts: JSON, gzip JSON, deflate JSON, snappy protobuf with escaped label values.
    assert (await _post(loki.url, good_json, {"Content-Type": "application/json"}))[0] == 204
    assert (
        await _post(
            loki.url,
            gzip.compress(good_json),
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    )[0] == 204
    escaped = _proto('{a="q\\"uote\\\\back\\nnl", b=`raw`}', now_ns, "l")
    assert (await _post(loki.url, escaped, {"Content-Type": "application/x-protobuf"}))[0] == 204
    assert loki.entries[-1].label_dict == {"a": 'q"uote\\back\nnl', "b": "raw"}
    # Unordered writes still refuse entries more than max_chunk_age/2 (1h) behind the stream's newest.
    behind = _proto('{a="b"}', now_ns - 2 * 3600 * NS, "late")
    status, text = await _post(loki.url, behind, {"Content-Type": "application/x-protobuf"})
    assert status == 400 and "entry too far behind" in text


async def test_receiver_requires_org_id_with_auth_enabled_and_answers_ready_and_query_range() -> None:
    async with LokiReceiver(auth_enabled=True) as receiver:
        body = _proto('{app="web"}', time.time_ns(), "hello")
        status, text = await _post(receiver.url, body, {"Content-Type": "application/x-protobuf"})
        assert (status, text.strip()) == (401, "no org id")
        headers = {"Content-Type": "application/x-protobuf", "X-Scope-OrgID": "t1"}
        assert (await _post(receiver.url, body, headers))[0] == 204
        assert (await _post(receiver.url, body, headers))[0] == 204  # identical entry: stored twice
        async with aiohttp.ClientSession(headers={"X-Scope-OrgID": "t1"}) as session:
            async with session.get(receiver.url + "/ready") as response:
                assert response.status == 200
            params = {"query": '{app="web"} |= "hell"', "limit": "10"}
            async with session.get(receiver.url + "/loki/api/v1/query_range", params=params) as response:
                payload = await response.json()
    assert payload["status"] == "success"
    (stream,) = payload["data"]["result"]
    assert stream["stream"] == {"app": "web", "service_name": "web"}
    assert [line for _, line in stream["values"]] == ["hello"]  # de-duplicated at query time


async def test_dashboard_queries_select_what_the_sink_writes() -> None:
    path = Path(__file__).parents[2] / "examples" / "grafana" / "eventrouter-loki-dashboard.json"
    dashboard = json.loads(path.read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for wanted in (
        "by type",
        "by reason",
        "Warnings by namespace",
        "Latest warnings",
        "Restarts",
        "Pod timeline",
    ):
        assert wanted in titles
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"cluster", "namespace", "pod"}
    occurrences = [
        normalise(line["object"], cluster="rec") for line in recorded_watch() if line["type"] == "ADDED"
    ]
    async with LokiReceiver(reject_old_samples_max_age=KEEP_OLD_SAMPLES) as receiver:
        sink = await _sink(receiver.url, max_age=str(KEEP_OLD_SAMPLES))
        try:
            await sink.send(occurrences)
        finally:
            await sink.aclose()
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$cluster", "rec").replace("$namespace", ".*")
                selector = re.search(r"\{[^{}]*\}", expr)
                assert selector is not None, expr
                streams = receiver.query_range(selector.group())
                assert streams, f"{panel['title']}: {selector.group()} selects nothing"
                for field in re.findall(
                    r'="(involved_object\.[a-z_]+|occurrence|message|reporting_instance)"', expr
                ):
                    head, _, rest = field.partition(".")
                    record = orjson.loads(streams[0].values[0][1])
                    assert head in record and (not rest or rest in record[head]), field


def test_label_quoting_fast_path_matches_the_escaping_rules() -> None:
    from eventrouter_sinks.loki import _quote_label_value, _quote_slow

    for value in ["shop", "就绪", 'a"b', "a\\b", "line\nbreak", "tab\t", "\x00ctl\x7f", "", "é-ü_ok.1"]:
        assert _quote_label_value(value) == _quote_slow(value)
        assert _quote_label_value(value) == _quote_label_value(value)  # cached
    assert _quote_slow('a"b\\c\n') == '"a\\"b\\\\c\\n"'
