"""Loki: what the split of a refused push may take as stored, which 400s are not split, and answers
read in linear time (session 32's review of item 243, item 250).

- A push of one stream spanning more than max_behind answered 400 for one entry: pushed again in
  halves, Loki refuses the entries it stored over an hour behind the stream's newest as too far
  behind, where it would have de-duplicated them. They were dead-lettered though Loki held them.
- A 400 about every entry (metadata disallowed for the tenant, a front's page, a 400 naming no
  stream) cost 1 + 32 pushes a send, to be rejected whole all the same.
- A hostile 429 or 260 answer repeating the start of the sentence the sink looks for blocked the
  event loop (156 s for 128 K characters, and growing cubically)."""

from __future__ import annotations

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


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


def _stored_names(loki: LokiReceiver) -> list[str]:
    return sorted(
        orjson.loads(line)["involved_object"]["name"] for s in loki.query_range() for _, line, _ in s.values
    )


async def test_entries_the_refused_push_stored_are_not_dead_lettered_when_refused_as_behind_later() -> None:
    """20 entries of one stream from 2 h to 1 min old (a relist of its last hours); this Loki refuses
    #15's metadata (over 600 bytes) and stores the rest. Pushed again in halves, the entries over an
    hour behind the newest are refused as too far behind: they are answered OK, for Loki holds them.
    Before, 10 of the 19 stored were dead-lettered."""
    ages = [7200 - i * 375 for i in range(20)]
    batch = [_at(age, object_name=f"web-{i}") for i, age in enumerate(ages)]
    batch[15] = _at(ages[15], object_name="n" * 600)
    async with LokiReceiver(max_structured_metadata_size=600) as loki:
        sink = _sink(loki.url, structured_metadata="true")
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        stored = _stored_names(loki)
        behind = [p for p in loki.pushes if "entry too far behind" in p.message]
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * 15 + [OutcomeKind.REJECT] + [OutcomeKind.OK] * 4
    assert "structured metadata too large" in outcomes[15].reason
    assert stored == sorted(f"web-{i}" for i in range(20) if i != 15)  # each once
    assert behind  # Loki did refuse stored entries as behind when pushed again


async def test_structured_metadata_disallowed_is_rejected_at_once_naming_the_option() -> None:
    """Every entry refused for the tenant (Loki 2.9's default): one push, not 1 + 32, and the reason
    names the option that puts it right."""
    batch = [_at(100 - i, object_name=f"web-{i}") for i in range(100)]
    async with LokiReceiver(allow_structured_metadata=False) as loki:
        sink = _sink(loki.url, structured_metadata="true")
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        statuses = [p.status for p in loki.pushes]
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 100
    assert all("but this feature is disallowed" in o.reason for o in outcomes)
    assert all("structured_metadata=false" in o.reason for o in outcomes)
    assert statuses == [400]
    assert loki.entries == []


PAGE = "<html><head><title>400 Bad Request</title></head><body><center>nginx</center></body></html>"


@pytest.mark.parametrize(
    "answer",
    [PAGE, "400 Bad Request", "loghttp push: couldn't parse push request: unexpected EOF"],
    ids=["web_page", "plain", "unreadable_body"],
)
async def test_a_400_naming_no_stream_is_rejected_whole_at_once(answer: str) -> None:
    """A 400 about the push as a whole (a front's page or text, a body Loki could not read): nothing
    of it stored, and no half would fare better. Rejected at the first push, as before item 243."""
    batch = [_at(60 - i, object_name=f"web-{i}") for i in range(20)]
    async with LokiReceiver() as loki:
        loki.fail_next(400, count=50, message=answer)
        sink = _sink(loki.url)
        try:
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
        statuses = [p.status for p in loki.pushes]
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 20
    assert statuses == [400]


SIZE = 4 << 20  # the old blocked pattern took 37 s on 1 MB, quadratic: past the suite's timeout here


def _repeated(unit: str, size: int = SIZE) -> str:
    return (unit * (size // len(unit) + 1))[:size]


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        (429, _repeated("Ingestion rate limit exceeded for user x ")),
        (
            429,
            "Per stream rate limit exceeded (limit: 3MB/sec) while attempting to ingest for stream\n"
            + _repeated("user 'a', total ignored: 1 out of 2 for stream: {"),
        ),
        (260, _repeated("ingestion blocked for user x ")),
    ],
    ids=["ingestion_rate", "stream_rate", "blocked"],
)
async def test_a_hostile_answer_of_megabytes_is_read_in_linear_time(status: int, answer: str) -> None:
    """Answers repeating the start of the sentence the sink reads (only a broken or hostile front
    sends such): the push is retried whole, as for any 429 or blocked 2xx. The patterns are bounded
    by construction. Before, the stream-rate one took 156 s on 128 K characters (cubic), and the
    blocked one 37 s on 1 MB (quadratic in the whole body), the event loop blocked: neither ended
    within the suite's timeout. (The ingestion-rate one read 128 K of it: 0.4 s, now 0.03 s.)"""
    async with LokiReceiver() as loki:
        loki.fail_next(status, message=answer)
        sink = _sink(loki.url)
        try:
            with pytest.raises(RetryableError) as caught:
                await sink.send([_at(30, object_name="a"), _at(20, object_name="b")])
        finally:
            await sink.aclose()
    assert f"answered {status}" in caught.value.reason
    assert len(caught.value.reason) < 3000  # quoted in part
