"""Structured metadata kept within Loki's limit, and a 400 the sink cannot explain split so that only
the entry Loki refuses is dead-lettered (item 243). Before, one entry whose ``involvedObject.name``
(free text in a core/v1 Event) put its metadata over Loki's max_structured_metadata_size made Loki
refuse it and store the rest of the push, answered 400: the sink dead-lettered every entry of the
push, and the refused one could never be delivered (a replay sends the same metadata)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks import loki as loki_sink
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, context: SinkContext = CONTEXT, **options: Any) -> LokiSink:
    return LokiSink(
        LokiOptions.model_validate({"url": url, "structured_metadata": "true", **options}), context
    )


def _stored(loki: LokiReceiver) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """Per involved object name (from the line), the line's record and the entry's metadata, as a
    query returns them (identical entries once)."""
    out: dict[str, tuple[dict[str, Any], dict[str, str]]] = {}
    for stream in loki.query_range():
        for _, line, metadata in stream.values:
            record = orjson.loads(line)
            name = record["involved_object"]["name"]
            assert name not in out, name  # one entry each
            out[name] = (record, metadata)
    return out


# Loki takes 65,536 bytes of metadata: 70,000 bytes, 90,000 bytes of three-byte characters.
@pytest.mark.parametrize("long_name", ["x" * 70_000, "名" * 30_000], ids=["ascii", "cjk"])
@pytest.mark.parametrize("body", ["protobuf", "json"])
async def test_structured_metadata_over_lokis_limit_is_cut_and_the_push_delivered(
    body: str, long_name: str
) -> None:
    batch = [_at(60 - i, object_name=f"web-{i}") for i in range(19)]
    batch.append(_at(30, object_name=long_name))
    async with LokiReceiver() as loki:
        sink = _sink(loki.url, format=body)
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        stored = _stored(loki)
        pushes = [(p.status, p.accepted) for p in loki.pushes]
    assert outcomes is None or [o.kind for o in outcomes] == [OutcomeKind.OK] * 20
    assert pushes == [(204, 20)]
    assert len(stored) == 20
    record, metadata = stored[long_name]
    assert record["involved_object"]["name"] == long_name  # the line keeps it whole
    cut = metadata["involved_object_name"]
    assert long_name.startswith(cut) and 1021 <= len(cut.encode()) <= 1024  # whole characters
    assert metadata["event_uid"] == batch[-1].uid
    assert sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items()) < 65_536
    assert sink.modified["truncated"] == 1


async def test_a_400_the_sink_cannot_explain_is_split_so_only_the_refused_entry_is_dead_lettered() -> None:
    """A Loki configured stricter than the sink knows (metadata over 600 bytes refused): the push is
    pushed again in halves down to the one entry Loki refuses alone; the others are answered OK and
    kept once (Loki de-duplicates what it stored with the first push)."""
    batch = [_at(60 - i, object_name=f"web-{i}") for i in range(20)]
    batch[13] = _at(47, object_name="n" * 600)  # within the sink's cut, over this Loki's limit
    async with LokiReceiver(max_structured_metadata_size=600) as loki:
        sink = _sink(loki.url)
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        stored = _stored(loki)
        statuses = [p.status for p in loki.pushes]
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * 13 + [OutcomeKind.REJECT] + [OutcomeKind.OK] * 6
    assert "structured metadata too large" in outcomes[13].reason and "400" in outcomes[13].reason
    assert sorted(stored) == sorted(f"web-{i}" for i in range(20) if i != 13)
    # The push, then two halves a level down to one entry (20 → 10 → 5 → 3 → 2 → 1): 11 at most.
    assert statuses[0] == 400 and len(statuses) <= 11
    assert sink.modified["truncated"] == 0


async def test_splitting_a_refused_push_is_bounded_per_send() -> None:
    """Every entry refused on its own (each entry's metadata over this Loki's 100 bytes): the halving
    stops after _SPLIT_PUSHES pushes, and what was not split further is rejected whole, as before.
    (Metadata disallowed for the tenant is not split at all: tests/sinks/test_loki_s32.py.)"""
    batch = [_at(100 - i, object_name=f"web-{i}") for i in range(100)]
    async with LokiReceiver(max_structured_metadata_size=100) as loki:
        sink = _sink(loki.url)
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        statuses = [p.status for p in loki.pushes]
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 100
    assert all("has structured metadata too large" in o.reason for o in outcomes)
    assert statuses == [400] * (1 + loki_sink._SPLIT_PUSHES)
    assert loki.entries == []


async def test_a_send_past_its_deadline_does_not_split_a_refused_push() -> None:
    """A send with no time left to push (send_timeout 6 s: its budget, 5 s, less a request's timeout)
    starts no push again: the refused push is rejected whole, as before, and the engine's send is not
    cut off midway."""
    context = SinkContext(
        name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"), send_timeout=6.0
    )
    batch = [_at(60 - i, object_name=f"web-{i}") for i in range(20)]
    batch[7] = _at(53, object_name="n" * 600)
    async with LokiReceiver(max_structured_metadata_size=600) as loki:
        sink = _sink(loki.url, context)
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        pushes = [(p.status, p.accepted) for p in loki.pushes]
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 20
    assert "possibly partly stored" in outcomes[0].reason
    assert pushes == [(400, 19)]
