"""Loki's per-stream rate limit (pkg/ingester/stream.go validateEntries: per_stream_rate_limit, 3 MiB/s,
burst 15 MiB; with shard_streams on, Loki 3.x's default, a stream's entries of a push are refused all
together). Loki answers a push for its last stream only, so a stream refused for its rate and followed
by a stored one gets a 2xx: the sink keeps each stream within the same budget, and reads Loki's 429
when it names the stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from eventrouter import OK, Occurrence, Outcome, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
PUSH = "/loki/api/v1/push"


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


def _stored(loki: LokiReceiver) -> Counter[str]:
    """Distinct entries Loki holds per involved object (a re-sent identical entry is one)."""
    distinct = {(e.labels, e.ts_ns, e.line) for e in loki.entries}
    return Counter(orjson.loads(line)["involved_object"]["name"] for _, _, line in distinct)


def _name(occurrence: Occurrence) -> str:
    return str(occurrence.record["involved_object"]["name"])


async def _deliver(sink: LokiSink, loki: LokiReceiver, batch: list[Occurrence]) -> list[list[Outcome]]:
    """Send as the engine does: what is answered retry comes back after its retry_after, until every
    item is answered. After each send, no item answered OK may be missing from Loki."""
    rounds: list[list[Outcome]] = []
    pending = batch
    while pending:
        assert len(rounds) < 50, [o.reason for o in rounds[-1]]
        outcomes = await sink.send(pending)
        rounds.append([OK] * len(pending) if outcomes is None else list(outcomes))
        kinds = [o.kind for o in rounds[-1]]
        stored = _stored(loki)
        lost = [
            _name(o)
            for o, k in zip(pending, kinds, strict=True)
            if k is OutcomeKind.OK and not stored[_name(o)]
        ]
        assert lost == [], f"answered OK, not in Loki: {lost}"
        again = [
            (o, out) for o, out in zip(pending, rounds[-1], strict=True) if out.kind is OutcomeKind.RETRY
        ]
        assert all(out.defer for _, out in again)
        if again:
            await asyncio.sleep(max(out.retry_after or 0.0 for _, out in again))
        pending = [o for o, _ in again]
    return rounds


# ---- the receiver keeps Loki's contract -----------------------------------------------------------


@pytest.mark.parametrize("whole", [True, False], ids=["whole-stream", "entry-by-entry"])
async def test_the_receiver_refuses_a_stream_over_its_rate_as_lokis_ingester_does(whole: bool) -> None:
    """Over its bucket, a stream is refused (whole: all its entries of the push; else those the bucket
    has no room for), 429 with Loki's text for the push's last stream only; a refused stream followed
    by a stored one gets 204."""
    now = time.time_ns()

    def push(*streams: tuple[str, int]) -> dict[str, Any]:
        return {
            "streams": [
                {
                    "stream": {"namespace": ns},
                    "values": [[str(now + i), f"{ns}-{i:03d}-" + "x" * 91] for i in range(n)],
                }
                for ns, n in streams
            ]
        }

    answers: list[tuple[int, str]] = []
    async with (
        LokiReceiver(per_stream_rate=1, per_stream_burst=1000, per_stream_whole=whole) as loki,
        aiohttp.ClientSession() as http,
    ):
        for body in (
            push(("busy", 12), ("quiet", 1)),  # busy: 1,200 bytes over its 1,000; quiet stored: 204
            push(("quiet", 1), ("busy", 12)),  # the last stream's refusal: 429
        ):
            async with http.post(loki.url + PUSH, json=body) as response:
                answers.append((response.status, (await response.text()).strip()))
        names = Counter(e.line.split("-")[0] for e in loki.entries)
        loki.refill_stream_rate_limits()
        async with http.post(loki.url + PUSH, json=push(("busy", 5))) as response:
            assert response.status == 204
    assert [status for status, _ in answers] == [204, 429]
    lines = answers[1][1].split("\n")
    assert len(lines) == 11  # at most max_returned_stream_errors (10) listed, then the total
    assert lines[0].startswith("entry with timestamp ") and lines[0].endswith(
        "ignored, reason: 'Per stream rate limit exceeded (limit: 1B/sec) while attempting to ingest for "
        'stream \'{namespace="busy", service_name="unknown_service"}\' totaling 100B, consider splitting a '
        "stream via additional labels or contact your Loki administrator to see if the limit can be "
        "increased',"
    )
    assert lines[-1] == (
        'user \'fake\', total ignored: 12 out of 12 for stream: {namespace="busy", service_name="unknown_service"}'
    )
    # Entry by entry, the first push's busy entries went in while its bucket (1,000 bytes) had room.
    assert names == ({"quiet": 2} if whole else {"quiet": 2, "busy": 10})
    assert loki.stream_rate_limited == (24 if whole else 14)


# ---- the sink -------------------------------------------------------------------------------------


async def test_a_stream_over_its_rate_is_held_back_never_answered_ok_unstored() -> None:
    """The review's case: "busy" (12 entries, ~8 KB) before "quiet" in one push, both known to
    Loki, and Loki's per-stream bucket 6,000 bytes. Before, Loki refused busy whole and answered 204
    for quiet: all 13 answered OK, 12 lost. Kept within the same budget here, what does not fit waits
    (held back, set aside) and goes in once the bucket has refilled: each stored once."""
    async with LokiReceiver(per_stream_rate=20_000, per_stream_burst=6_000) as loki:
        sink = _sink(loki.url, max_line_bytes=4096, per_stream_rate=20_000, per_stream_burst=6_000)
        try:
            warm = [_at(60, namespace="busy", object_name="w0"), _at(59, namespace="quiet", object_name="w1")]
            await _deliver(sink, loki, warm)
            batch = [_at(50 - i * 0.01, namespace="busy", object_name=f"b{i}") for i in range(12)]
            batch.append(_at(10, namespace="quiet", object_name="q1"))
            rounds = await _deliver(sink, loki, batch)
        finally:
            await sink.aclose()
    # Quiet went at once; of busy, what its bucket held (the oldest), the rest waited (held: no attempt).
    assert rounds[0][-1].kind is OutcomeKind.OK
    waited = [o for o in rounds[0] if o.kind is OutcomeKind.RETRY]
    assert 0 < len(waited) < 12 and all(o.held for o in waited)
    assert (
        waited[0].reason.startswith("loki: held back ")
        and "over 20000 bytes/s (per_stream_rate" in waited[0].reason
    )
    assert loki.stream_rate_limited == 0  # never over Loki's limit
    assert _stored(loki) == Counter({_name(o): 1 for o in [*warm, *batch]})


@pytest.mark.parametrize("whole", [True, False], ids=["whole-stream", "entry-by-entry"])
async def test_lokis_429_for_a_streams_rate_sets_aside_that_stream_only_and_lowers_the_budget(
    whole: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Loki's limits lower than the sink's budget (its defaults here): the stream over it is the
    push's last, so Loki's 429 names it. Before, not recognised: the whole push retried in place (the
    stored stream with it, all the sink's traffic held up). Now only its items are retried, set aside,
    and the budget takes Loki's rate and a smaller burst: they go in, each once."""
    caplog.set_level(logging.WARNING, logger="test.loki")
    async with LokiReceiver(per_stream_rate=20_000, per_stream_burst=6_000, per_stream_whole=whole) as loki:
        sink = _sink(loki.url)
        try:
            warm = [_at(60, namespace="quiet", object_name="w1"), _at(59, namespace="busy", object_name="w0")]
            await _deliver(sink, loki, warm)
            batch = [_at(10, namespace="quiet", object_name="q1")]
            batch += [_at(50 - i * 0.01, namespace="busy", object_name=f"b{i}") for i in range(12)]
            first = await sink.send(batch)
            assert first is not None
            assert [o.kind for o in first] == [OutcomeKind.OK] + [OutcomeKind.RETRY] * 12
            assert all(o.defer and not o.held for o in first[1:])
            assert first[1].reason.startswith(f"loki: {loki.url} answered 429: entry with timestamp ")
            assert "Per stream rate limit exceeded (limit: 20000B/sec)" in first[1].reason
            assert first[1].retry_after is not None and 0.2 < first[1].retry_after < 1.0
            refused = loki.stream_rate_limited  # whole: the 12; else those over its bucket
            assert refused == 12 if whole else 0 < refused < 12
            rounds = await _deliver(sink, loki, batch[1:])
        finally:
            await sink.aclose()
    assert _stored(loki) == Counter({_name(o): 1 for o in [*warm, *batch]})
    assert len(rounds) >= 2  # held back by the lowered budget, not refused again
    assert loki.stream_rate_limited == refused  # never refused again: held back by the lowered budget
    learned = [r.getMessage() for r in caplog.records if "per-stream rate limit" in r.getMessage()]
    assert len(learned) == 1 and "now at most 20000 bytes/s" in learned[0], learned


def test_a_per_stream_burst_below_the_largest_line_is_refused() -> None:
    with pytest.raises(ValueError, match=r"per_stream_burst=100000 is below max_line_bytes=256000"):
        LokiOptions.model_validate({"url": "http://loki:3100", "per_stream_burst": 100_000})
    LokiOptions.model_validate({"url": "http://loki:3100", "per_stream_burst": 100_000, "per_stream_rate": 0})
