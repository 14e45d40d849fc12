"""An event from a node whose clock is ahead of the API server's, delivered again by a relist (after a
SIGKILL, or the ConfigMap checkpoint mode's next leader): stamped at its receipt (``clamp_time``), it
got another timestamp at each delivery, and Loki, which de-duplicates identical (timestamp, labels,
line) only, kept a copy of each. It is now stamped by the API server's clock, from the object alone."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.engine.spool import Spool
from eventrouter.record import normalise
from eventrouter.testing import event_object
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
NS = 1_000_000_000
AHEAD = 3600.0  # the node's clock


def _text(at: float, *, micro: bool = False) -> str:
    when = datetime.fromtimestamp(at, tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _skewed(name: str, created: int, bumped: int, **kwargs: Any) -> dict[str, Any]:
    """An Event a node ``AHEAD`` seconds ahead recorded: created (by the API server's clock) at
    ``created``, raised for the third time ``bumped`` seconds later, both stamped by the node."""
    obj = event_object(
        object_name=name,
        count=3,
        first_timestamp=_text(created + AHEAD),
        last_timestamp=_text(created + bumped + AHEAD),
        **kwargs,
    )
    obj["metadata"]["creationTimestamp"] = _text(created)  # the API server's own clock
    return obj


def _sink(url: str) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url}), CONTEXT)


async def _deliver(loki: LokiReceiver, occurrence: Occurrence) -> None:
    """By a sink of its own: a restarted router has no memory of what the one before sent."""
    sink = _sink(loki.url)
    try:
        outcomes = await sink.send([occurrence])
    finally:
        await sink.aclose()
    assert outcomes is None or [o.kind for o in outcomes] == [OutcomeKind.OK]


def _copies(loki: LokiReceiver, name: str) -> list[tuple[int, bool, str]]:
    """Entries of ``name`` as a query of Loki returns them (identical ones de-duplicated):
    (timestamp, time_adjusted, the line's own time)."""
    out = []
    for stream in loki.query_range():
        for ts, line, _ in stream.values:
            doc = orjson.loads(line)
            if doc["involved_object"]["name"] == name:
                out.append((ts, bool(doc.get("time_adjusted")), doc["time"]))
    return out


@pytest.mark.parametrize("later", [30, 3600], ids=["relist-30s-later", "relist-an-hour-later"])
async def test_an_event_from_a_node_clock_an_hour_ahead_is_one_entry_however_often_delivered(
    later: int, tmp_path: Path
) -> None:
    """Created 20 s before its third occurrence, received a second after it, by a router SIGKILLed
    then: the next one's relist ``later`` seconds on, and the spool's copy of that, each by a sink
    of its own. Before: stamped at each receipt (30 s later) or, an hour later, at the first receipt
    and then at its own time (within Loki's grace by then): two entries. Now every delivery stamps it
    at its creation + 20 s (the API server's time of the occurrence): one entry, its real time in the
    line. An events.k8s.io event (eventTime, series) the same; and one whose stamp so would be too old
    for Loki is stamped at its receipt, as before."""
    now = int(time.time())
    created = now - later - 21
    obj = _skewed("skewed", created, 20)
    series = event_object(
        object_name="series",
        count=None,
        series_count=4,
        event_time=_text(created + AHEAD + 0.25, micro=True),
    )
    series["series"]["lastObservedTime"] = _text(created + 20 + AHEAD + 0.5, micro=True)
    series["metadata"]["creationTimestamp"] = _text(created)
    stale = _skewed("stale", now - 8 * 86400, 20)  # a week and a day ago: outside Loki's window
    first = [normalise(o, cluster="test", received_at=created + 21) for o in (obj, series, stale)]
    async with LokiReceiver() as loki:
        for occurrence in first:
            await _deliver(loki, occurrence)
        # The relist: the same objects (the API server's JSON, as the spool keeps it), another receipt.
        again = [
            normalise(orjson.loads(occurrence.raw_json), cluster="test", received_at=now)
            for occurrence in first[:2]
        ]
        for occurrence in again:
            await _deliver(loki, occurrence)
        spool = Spool(tmp_path / "spool", max_bytes=1 << 20, cluster="test")
        try:
            for occurrence in again:
                spool.append(occurrence)
            spooled = spool.pop(10)
        finally:
            spool.close()
        assert [(o.key, o.received_at) for o in spooled] == [(o.key, o.received_at) for o in again]
        for occurrence in spooled:
            await _deliver(loki, occurrence)
    assert len(loki.entries) == 2 * 3 + 1  # stored as pushed; a query de-duplicates
    own = [occurrence.record["time"] for occurrence in first]
    assert own[0] == _text(created + 20 + AHEAD)
    assert _copies(loki, "skewed") == [((created + 20) * NS, True, own[0])]
    assert _copies(loki, "series") == [((created + 20) * NS + 250_000_000, True, own[1])]
    assert _copies(loki, "stale") == [(int(first[2].received_at * NS), True, own[2])]
