"""An entry sent again after a push Loki may have stored (a 5xx after the write, no answer, a send cut
off) must carry the timestamp it was sent with, or Loki keeps both: it de-duplicates identical
(timestamp, line) only. The choice between an entry's own time and its receipt (``clamp_time``) was
taken against each attempt's clock, so near an edge of Loki's window it flipped between attempts."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
NS = 1_000_000_000


def _occurrence(at: float, name: str) -> Occurrence:
    when = datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, object_name=name)


def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


def _copies(loki: LokiReceiver, name: str) -> list[tuple[int, bool]]:
    """The entries of ``name`` Loki holds once it de-duplicated them: (timestamp, time_adjusted)."""
    return [
        (ts, bool(orjson.loads(line).get("time_adjusted")))
        for stream in loki.query_range()
        for ts, line, _ in stream.values
        if orjson.loads(line)["involved_object"]["name"] == name
    ]


async def _clock_past(when: float) -> None:
    """Until the wall clock is past ``when`` (the sink reads it: it cannot be injected)."""
    await asyncio.sleep(max(0.0, when - time.time()) + 0.01)
    assert time.time() > when


async def _stored_unanswered(loki: LokiReceiver, sink: LokiSink, occurrence: Occurrence) -> None:
    loki.fail_next(503, store=True)  # a distributor's 5xx after the write: the answer is lost
    with pytest.raises(RetryableError, match="503"):
        await sink.send([occurrence])
    assert len(loki.entries) == 1


@pytest.mark.parametrize("restart", [False, True], ids=["same-sink", "after-restart"])
async def test_an_entry_just_past_the_future_edge_is_stamped_alike_on_every_attempt(restart: bool) -> None:
    """A node clock ~9 min ahead: 540.5 s ahead of its receipt, past ``future_grace`` less the 60 s
    margin, so stamped at receipt. Before, judged by each attempt's clock, the retry 0.6 s later kept
    its own time (inside the edge by then): two entries in Loki. Judged against the receipt (kept in
    the spool) it is stamped the same on every attempt, also by a sink that never saw the first."""
    start = time.time()
    occurrence = _occurrence(start + 540.5, "skewed")
    async with LokiReceiver() as loki:
        sink = _sink(loki.url)
        try:
            await _stored_unanswered(loki, sink, occurrence)
            if restart:
                await sink.aclose()
                sink = _sink(loki.url)
            await _clock_past(start + 0.6)
            again = await sink.send([occurrence])
        finally:
            await sink.aclose()
        assert again is None or [o.kind for o in again] == [OutcomeKind.OK]
        assert _copies(loki, "skewed") == [(int(occurrence.received_at * NS), True)]


async def test_an_entry_at_the_old_edge_is_sent_again_with_the_timestamp_it_was_sent_with() -> None:
    """The mirror at ``max_age`` (100 s here; 25 s margin): inside the window at the first attempt,
    so sent with its own time; by the retry 0.6 s later past the sink's edge. Before, stamped at
    receipt then: a second entry. Now sent as it was (apart, for Loki to judge): Loki takes it and
    de-duplicates it."""
    start = time.time()
    occurrence = _occurrence(start - 75 + 0.5, "old")
    async with LokiReceiver(reject_old_samples_max_age=100) as loki:
        sink = _sink(loki.url, max_age=100)
        try:
            await _stored_unanswered(loki, sink, occurrence)
            await _clock_past(start + 0.6)
            again = await sink.send([occurrence])
        finally:
            await sink.aclose()
        assert again is None or [o.kind for o in again] == [OutcomeKind.OK]
        assert _copies(loki, "old") == [(occurrence.time_ns, False)]


async def test_an_entry_its_stream_outran_meanwhile_is_not_sent_again_stamped_anew() -> None:
    """Sent with its own time (1.5 h old), stored unanswered; then a newer entry of its stream is
    stored, so by the retry it is predicted over ``max_behind`` behind. Before, stamped at receipt: a
    second entry. Now sent as it was; Loki refuses it as too far behind, and as it may be stored it
    is rejected, not stamped anew: one entry."""
    now = time.time()
    old = _occurrence(now - 5400, "behind")
    async with LokiReceiver() as loki:
        sink = _sink(loki.url)
        try:
            await _stored_unanswered(loki, sink, old)
            newer = await sink.send([_occurrence(now - 10, "newer")])
            assert newer is None or [o.kind for o in newer] == [OutcomeKind.OK]
            again = await sink.send([old])
        finally:
            await sink.aclose()
        assert again is not None and [o.kind for o in again] == [OutcomeKind.REJECT]
        assert "not sent again with a new timestamp" in again[0].reason
        assert _copies(loki, "behind") == [(old.time_ns, False)]
