"""Loki: session 35 (item 297), the regression item 289 left, against the project's Loki receiver.

Loki 3.x limits a stream's rate whole by default (shard_streams on): refused, the stream is stored
not at all, and its 429 lists only the entries refused for the rate, leaving out those too far
behind its newest (another writer's). Item 289 could not tell that answer from an entry-by-entry
one (2.x, shard_streams off) that stored the entries it left out, so a left-out entry more than
max_behind behind another was rejected "may be stored" when Loki later refused it as too far
behind, though Loki never had it (before item 289 it was stamped at receipt and delivered once).
Loki's cutoff at that later refusal now tells them apart: after the newest entry the first push may
have stored, and after every entry this sink pushed since (or sent in a push of unknown outcome), it
proves that push stored none of them (item 306: whatever Loki's window, this sink's pushes between
the two, or the marks it forgot; item 312: a second rate refusal in a row, the marks of entries the
engine gave up, a 5xx'd push over more streams than the sink notes no longer deny it needlessly)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import pytest

from eventrouter import Occurrence, Outcome, OutcomeKind, RetryableError, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink, _Lost

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


async def _deliver(
    sink: LokiSink, batch: Sequence[Occurrence], between: Callable[[], Awaitable[None] | None] = lambda: None
) -> dict[tuple[str, int], Outcome | None]:
    """Send, then send again what is answered retry (as the engine does, at once here), until
    nothing is: each occurrence's final outcome (None: OK). ``between`` runs after each send."""
    pending = list(batch)
    final: dict[tuple[str, int], Outcome | None] = {}
    for _ in range(6):
        if not pending:
            break
        outcomes: Sequence[Outcome | None] = (await sink.send(pending)) or [None] * len(pending)
        again = []
        for occurrence, outcome in zip(pending, outcomes, strict=True):
            if outcome is not None and outcome.kind is OutcomeKind.RETRY:
                again.append(occurrence)
            else:
                final[occurrence.uid, occurrence.number] = outcome
        pending = again
        waiting = between()
        if waiting is not None:
            await waiting
    assert not pending, "still retried after 6 sends"
    return final


def _copies(loki: LokiReceiver) -> dict[str, int]:
    """Per involved object, how many timestamps Loki holds it at (two: a second copy)."""
    stamps: dict[str, set[int]] = defaultdict(set)
    for entry in loki.entries:
        stamps[orjson.loads(entry.line)["involved_object"]["name"]].add(entry.ts_ns)
    return {name: len(at) for name, at in stamps.items()}


async def _size_of_one_entry(occurrence: Occurrence) -> int:
    """What Loki's per-stream limiter counts of this occurrence's entry (line bytes, no metadata)."""
    async with LokiReceiver() as probe:
        sink = _sink(probe.url)
        try:
            await sink.send([occurrence])
        finally:
            await sink.aclose()
        return len(probe.entries[0].line.encode())


def _ok(outcome: Outcome | None) -> bool:
    return outcome is None or outcome.kind is OutcomeKind.OK


def _may_be_stored(outcome: Outcome | None) -> bool:
    return outcome is not None and outcome.kind is OutcomeKind.REJECT and "may be stored" in outcome.reason


@pytest.mark.parametrize("listed", [10, 1], ids=["every-refused-entry-listed", "one-listed"])
@pytest.mark.parametrize("mode", ["whole-3.x", "entry-by-entry-2.x"])
async def test_entries_left_out_of_a_rate_refusal_are_stamped_anew_only_when_loki_proves_them_unstored(
    mode: Literal["whole-3.x", "entry-by-entry-2.x"], listed: int
) -> None:
    """A batch of stream S: x8000 and x4200 (8,000 s and 4,200 s old, more than max_behind apart),
    y20 and y10. Both Lokis answer its first push the same: 429 "total ignored: 2 out of 4", listing
    y20 and y10 (or only y20: max_returned_stream_errors) for the per-stream rate.

    ``whole-3.x``: another writer made S's newest now, so x8000 and x4200 were too far behind and
    Loki stored nothing. Pushed again, Loki refuses both as too far behind, its cutoff (an hour before
    now) after x4200's time: no push of ours could have put it there. Each is stamped at receipt and
    delivered once; before, x8000 was dead-lettered "may be stored" though never stored.

    ``entry-by-entry-2.x`` (a guard, as before): Loki's bucket stored x8000 and x4200. Pushed again,
    x8000 is refused as too far behind x4200, its cutoff x4200's time less max_behind: the first push
    may have put it there, so x8000 is not stamped anew (a second copy) but rejected "may be stored"
    (item 289's Left: no other left-out entry proves it stored)."""
    whole = mode == "whole-3.x"
    batch = [
        _at(8000, reason="S", object_name="x8000"),
        _at(4200, reason="S", object_name="x4200"),
        _at(20, reason="S", object_name="y20"),
        _at(10, reason="S", object_name="y10"),
    ]
    size = await _size_of_one_entry(batch[0])
    async with LokiReceiver(
        per_stream_rate=1,
        per_stream_burst=1 if whole else 2 * size + 50,
        per_stream_whole=whole,
        max_returned_stream_errors=listed,
    ) as loki:
        sink, other = _sink(loki.url, per_stream_rate=0), _sink(loki.url, per_stream_rate=0)

        def lift() -> None:
            loki.per_stream_burst = 10_000_000
            loki.refill_stream_rate_limits()

        try:
            if whole:
                lift()
                await _deliver(other, [_at(1, reason="S", object_name="other-now")])
                loki.per_stream_burst = 1
                loki.refill_stream_rate_limits()
            first = len(loki.pushes)
            final = await _deliver(sink, batch, lift)
        finally:
            await sink.aclose()
            await other.aclose()
        refusal = loki.pushes[first]
        assert refusal.status == 429 and "total ignored: 2 out of 4 for stream" in refusal.message
        assert refusal.accepted == (0 if whole else 2)
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        if whole:
            assert all(_ok(outcome) for outcome in outcomes), outcomes
        else:
            assert _may_be_stored(outcomes[0]) and all(_ok(outcome) for outcome in outcomes[1:]), outcomes
        expected = {"x8000": 1, "x4200": 1, "y20": 1, "y10": 1}
        assert _copies(loki) == ({"other-now": 1, **expected} if whole else expected)


async def test_an_entry_also_sent_in_a_push_of_unknown_outcome_is_never_proved_unstored() -> None:
    """A guard of the proof's bounds: x8000 was stored by a push answered 503 (outcome unknown) before
    another writer made S's newest now. Left out of a whole-stream rate refusal and refused as too far
    behind after it, the cutoff proves only that the rate-refused push stored nothing: x8000 is
    rejected "may be stored", not stamped anew (a second copy)."""
    batch = [
        _at(8000, reason="S", object_name="x8000"),
        _at(4200, reason="S", object_name="x4200"),
        _at(20, reason="S", object_name="y20"),
        _at(10, reason="S", object_name="y10"),
    ]
    async with LokiReceiver(per_stream_rate=1, per_stream_burst=10_000_000) as loki:
        sink, other = _sink(loki.url, per_stream_rate=0), _sink(loki.url, per_stream_rate=0)

        def lift() -> None:
            loki.per_stream_burst = 10_000_000
            loki.refill_stream_rate_limits()

        try:
            loki.fail_next(503, store=True)
            with pytest.raises(RetryableError):  # the engine sends it again
                await sink.send(batch[:1])
            await _deliver(other, [_at(1, reason="S", object_name="other-now")])
            loki.per_stream_burst = 1
            loki.refill_stream_rate_limits()
            first = len(loki.pushes)
            final = await _deliver(sink, batch, lift)
        finally:
            await sink.aclose()
            await other.aclose()
        assert loki.pushes[first].status == 429 and loki.pushes[first].accepted == 0
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        assert _may_be_stored(outcomes[0]) and all(_ok(outcome) for outcome in outcomes[1:]), outcomes
        assert _copies(loki) == {
            "x8000": 1,
            "other-now": 1,
            "x4200": 1,
            "y20": 1,
            "y10": 1,
        }


# Item 306: the proof made sound against a Loki limiting entry by entry (2.x, 3.x with shard_streams
# off), where the entries a rate refusal leaves out were stored. Each of these gave x8000 a second copy.


def _batch() -> list[Occurrence]:
    return [
        _at(8000, reason="S", object_name="x8000"),
        _at(4200, reason="S", object_name="x4200"),
        _at(20, reason="S", object_name="y20"),
        _at(10, reason="S", object_name="y10", message="m" * 2000),
    ]


async def test_an_entry_refused_after_this_sinks_own_newer_entries_were_stored_is_never_proved_unstored() -> (
    None
):
    """Loki (entry by entry) stores x8000 and x4200 and refuses y20 and y10 for the rate. Pushed again
    with room for two entries: x8000 is refused as too far behind x4200, x4200 is Loki's last line, y20
    is stored, y10 (2 KB) refused for the rate. Then y10 is refused again, and x8000, pushed alone, is
    refused as too far behind y20, stored by this sink since: that cutoff (y20 - an hour) is after
    everything the first push may have stored, but this sink's own push raised Loki's newest there.
    x8000 is rejected "may be stored", never stamped anew (before: a second copy)."""
    batch = _batch()
    size = await _size_of_one_entry(batch[0])
    async with LokiReceiver(
        per_stream_rate=1, per_stream_burst=2 * size + 50, per_stream_whole=False
    ) as loki:
        sink = _sink(loki.url, per_stream_rate=0)
        bursts = iter([2 * size + 50, size + 50])

        def between() -> None:
            loki.per_stream_burst = next(bursts, 10_000_000)
            loki.refill_stream_rate_limits()

        try:
            final = await _deliver(sink, batch, between)
        finally:
            await sink.aclose()
        behind = [push for push in loki.pushes if push.status == 400]
        assert len(behind) == 1 and "entry too far behind" in behind[0].message
        assert behind[0].accepted == 0  # x8000 alone, refused behind y20 (stored in between)
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        assert _may_be_stored(outcomes[0]) and all(_ok(outcome) for outcome in outcomes[1:]), outcomes
        assert _copies(loki) == {"x8000": 1, "x4200": 1, "y20": 1, "y10": 1}


async def test_an_entry_whose_mark_was_forgotten_is_never_proved_unstored() -> None:
    """x8000 is stored by a push answered 503 (outcome unknown); then 20,500 other entries go unanswered
    (503, given up), so the sink forgets x8000's mark (it keeps 20,000). The whole-stream refusal after
    another writer, and the cutoff then, would prove only that the rate-refused push stored nothing:
    x8000 is rejected "may be stored", not stamped anew (before: a second copy)."""
    batch = _batch()
    async with LokiReceiver(per_stream_rate=1, per_stream_burst=10_000_000) as loki:
        sink, other = _sink(loki.url, per_stream_rate=0), _sink(loki.url, per_stream_rate=0)

        def lift() -> None:
            loki.per_stream_burst = 10_000_000
            loki.refill_stream_rate_limits()

        try:
            loki.fail_next(503, store=True)
            with pytest.raises(RetryableError):
                await sink.send(batch[:1])
            loki.fail_next(503, count=41)
            for start in range(0, 20_500, 500):
                outage = [make_occurrence(reason="F", object_name=f"f{i}") for i in range(start, start + 500)]
                with pytest.raises(RetryableError):
                    await sink.send(outage)
            await _deliver(other, [_at(1, reason="S", object_name="other-now")])
            loki.per_stream_burst = 1
            loki.refill_stream_rate_limits()
            first = len(loki.pushes)
            final = await _deliver(sink, batch, lift)
        finally:
            await sink.aclose()
            await other.aclose()
        assert loki.pushes[first].status == 429 and loki.pushes[first].accepted == 0
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        assert _may_be_stored(outcomes[0]) and all(_ok(outcome) for outcome in outcomes[1:]), outcomes
        assert _copies(loki) == {"x8000": 1, "other-now": 1, "x4200": 1, "y20": 1, "y10": 1}


async def test_an_entry_is_never_proved_unstored_by_a_cutoff_of_a_window_smaller_than_max_behind() -> None:
    """Loki's max_chunk_age is 1 h (it refuses entries more than 30 min behind), the sink's max_behind
    left at 3,600 s. Loki (entry by entry) stores x8000 and x4200 and refuses y20 and y10 for the rate;
    pushed again, x8000 is refused with a cutoff of x4200 - 30 min. The proof no longer takes
    max_behind for Loki's window: x8000 is rejected "may be stored" (before: a second copy)."""
    batch = _batch()
    size = await _size_of_one_entry(batch[0])
    async with LokiReceiver(
        per_stream_rate=1, per_stream_burst=2 * size + 50, per_stream_whole=False, max_chunk_age=3600
    ) as loki:
        sink = _sink(loki.url, per_stream_rate=0)

        def lift() -> None:
            loki.per_stream_burst = 10_000_000
            loki.refill_stream_rate_limits()

        try:
            final = await _deliver(sink, batch, lift)
        finally:
            await sink.aclose()
        assert loki.pushes[0].status == 429 and loki.pushes[0].accepted == 2
        assert loki.pushes[1].status == 400 and "total ignored: 1 out of 4" in loki.pushes[1].message
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        assert _may_be_stored(outcomes[0]) and all(_ok(outcome) for outcome in outcomes[1:]), outcomes
        assert _copies(loki) == {"x8000": 1, "x4200": 1, "y20": 1, "y10": 1}


async def test_an_entry_is_never_proved_unstored_when_a_push_of_unknown_outcome_may_be_stored_since() -> None:
    """A push of z0 (now) is answered 503: Loki may still store it later (a gateway's answer while the
    ingester works), here after the rate refusal, which ``other`` pushing the identical entry stands
    for. Loki (entry by entry) stores x8000 and x4200 and refuses y4100 and y4050 for the rate; then
    lists x8000 as too far behind x4200 and y4050 for the rate (x4200 is its last line, y4100 stored);
    z0 is stored; x8000, pushed alone, is refused with a cutoff of z0 - an hour, after every entry this
    sink pushed since the refusal and every one it may have stored with it. The push of unknown
    outcome raised Loki's newest: x8000 is rejected "may be stored" (before: a second copy)."""
    batch = [
        _at(8000, reason="S", object_name="x8000"),
        _at(4200, reason="S", object_name="x4200"),
        _at(4100, reason="S", object_name="y4100"),
        _at(4050, reason="S", object_name="y4050", message="m" * 2000),
    ]
    late = _at(0, reason="S", object_name="z0")
    size = await _size_of_one_entry(batch[0])
    async with LokiReceiver(
        per_stream_rate=1, per_stream_burst=2 * size + 50, per_stream_whole=False
    ) as loki:
        sink, other = _sink(loki.url, per_stream_rate=0), _sink(loki.url, per_stream_rate=0)
        sends = 0

        async def between() -> None:
            nonlocal sends
            sends += 1
            loki.per_stream_burst = 10_000_000
            loki.refill_stream_rate_limits()
            if sends == 2:  # Loki stores the 503'd push now
                await _deliver(other, [late])
            elif sends == 1:
                loki.per_stream_burst = 2 * size + 50

        try:
            loki.fail_next(503)
            with pytest.raises(RetryableError):
                await sink.send([late])
            final = await _deliver(sink, batch, between)
        finally:
            await sink.aclose()
            await other.aclose()
        assert [push.status for push in loki.pushes[:3]] == [503, 429, 429]
        assert "entry too far behind" in loki.pushes[2].message
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        assert _may_be_stored(outcomes[0]) and all(_ok(outcome) for outcome in outcomes[1:]), outcomes
        assert _copies(loki) == {"x8000": 1, "x4200": 1, "y4100": 1, "y4050": 1, "z0": 1}


# Item 312 (review r306): item 306's proof kept from needless dead letters: a second rate refusal in a
# row, marks of entries the engine gave up, a 5xx'd push over more streams than the sink notes.


def _whole_case() -> list[Occurrence]:
    return [
        _at(8000, reason="S", object_name="x8000"),
        _at(4200, reason="S", object_name="x4200"),
        _at(20, reason="S", object_name="y20"),
        _at(10, reason="S", object_name="y10"),
    ]


async def _whole_case_after_another_writer(
    loki: LokiReceiver,
    sink: LokiSink,
    batch: Sequence[Occurrence],
    between: Callable[[], Awaitable[None] | None],
) -> dict[tuple[str, int], Outcome | None]:
    """Item 297's case: another writer makes S's newest now, then Loki (whole-stream limiting, burst
    1) refuses ``batch`` for the rate, leaving x8000 and x4200 (too far behind) out of its listing."""
    other = _sink(loki.url, per_stream_rate=0)
    try:
        loki.per_stream_burst = 10_000_000
        loki.refill_stream_rate_limits()
        await _deliver(other, [_at(1, reason="S", object_name="other-now")])
    finally:
        await other.aclose()
    loki.per_stream_burst = 1
    loki.refill_stream_rate_limits()
    return await _deliver(sink, batch, between)


def _lift(loki: LokiReceiver) -> None:
    loki.per_stream_burst = 10_000_000
    loki.refill_stream_rate_limits()


@pytest.mark.parametrize("refusals", [2, 3])
async def test_an_entry_left_out_of_two_whole_stream_rate_refusals_in_a_row_is_delivered_once(
    refusals: int,
) -> None:
    """Loki (whole-stream limiting) refuses the batch for the rate, and its retry again (its bucket
    still short: another sink of the tenant spent it), storing nothing either time; then refuses
    x8000 and x4200 as too far behind another writer's newest. The second refusal's push carried
    y20 and y10 (now): counted whole, it made the cutoff (now - an hour) prove nothing, and x8000,
    never stored, was dead-lettered "may be stored" (before: r306 F1). A rate refusal whose listing
    fits stored at most what it left open: x8000 is stamped anew and delivered once."""
    batch = _whole_case()
    async with LokiReceiver(per_stream_rate=1, per_stream_burst=1, per_stream_whole=True) as loki:
        sink = _sink(loki.url, per_stream_rate=0)
        sends = 0

        def between() -> None:
            nonlocal sends
            sends += 1
            if sends >= refusals:
                _lift(loki)
            else:
                loki.refill_stream_rate_limits()

        try:
            first = len(loki.pushes) + 1
            final = await _whole_case_after_another_writer(loki, sink, batch, between)
        finally:
            await sink.aclose()
        statuses = [push.status for push in loki.pushes[first:]]
        assert statuses[:refusals] == [429] * refusals and statuses[refusals] == 400, statuses
        assert all(push.accepted == 0 for push in loki.pushes[first : first + refusals])
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        assert all(_ok(outcome) for outcome in outcomes), outcomes
        assert _copies(loki) == {"other-now": 1, "x8000": 1, "x4200": 1, "y20": 1, "y10": 1}


async def test_an_entry_left_out_of_a_rate_refusal_keeps_its_mark_while_the_engine_gives_up_an_outage() -> (
    None
):
    """Item 297's whole-stream case, with 20,500 other entries pushed between the two refusals, each
    answered 503 and given up by the engine (``retry_max_attempts`` spent): their marks took x8000's
    out of the 20,000 the sink keeps, into the filter of forgotten ones, and x8000 (never stored) was
    dead-lettered "may be stored"; the filter never forgot, so a long outage filled it until a share
    of every new entry refused as behind was dead-lettered too (before: r306 F2). Given up, an entry
    is never pushed again, and its mark goes: x8000 is stamped anew and delivered once."""
    batch = _whole_case()
    async with LokiReceiver(per_stream_rate=1, per_stream_burst=1, per_stream_whole=True) as loki:
        sink = _sink(loki.url, per_stream_rate=0)

        async def outage() -> None:
            loki.fail_next(503, count=41)
            for start in range(0, 20_500, 500):
                given = [make_occurrence(reason="F", object_name=f"f{i}") for i in range(start, start + 500)]
                with pytest.raises(RetryableError):
                    await sink.send(given)
                sink.given_up(given)  # as the engine does once their attempts are spent
            _lift(loki)

        try:
            final = await _whole_case_after_another_writer(loki, sink, batch, outage)
        finally:
            await sink.aclose()
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        assert all(_ok(outcome) for outcome in outcomes), outcomes
        assert _copies(loki) == {"other-now": 1, "x8000": 1, "x4200": 1, "y20": 1, "y10": 1}


def test_forgotten_marks_age_out_once_older_than_lokis_window_and_never_within_it() -> None:
    """The filter of forgotten marks (r306 F2): 600,000 keys of entries older than Loki's time window
    by the time the next generation fills leave it holding a key it was never given less than once in
    100 (the one filter before: 55 in 100); every key of an entry still within the window is
    held."""
    lost = _Lost()
    expired, hour = 0, 3600 * 10**9
    for i in range(600_000):
        if i % _Lost.LOAD == 0:
            lost.marked += hour  # this generation's entries: an hour newer than the last's
            expired = lost.marked - 3 * hour  # Loki's window: three generations
        lost.add(hash((b'{a="b"}', i, f"line {i}")), expired)
    probes = 20_000
    held = sum(hash((b'{c="d"}', j, f"other {j}")) in lost for j in range(probes))
    assert held < probes / 100, held
    within = range(600_000 - 3 * _Lost.LOAD, 600_000)
    assert all(hash((b'{a="b"}', i, f"line {i}")) in lost for i in within)


@pytest.mark.parametrize("own", [False, True], ids=["unrelated-stream", "its-own-entry-forgotten-guard"])
async def test_a_5xx_over_more_streams_than_noted_leaves_an_unrelated_streams_proof_alone(own: bool) -> None:
    """A push of 4,200 other streams (more than the 4,096 whose newest entry sent in a push of unknown
    outcome the sink notes) is answered 503, then item 297's whole-stream case on stream S, which was
    in no such push. The streams beyond 4,096 gave their newest (now) to one floor for every stream,
    so x8000, never stored, was dead-lettered "may be stored" for about Loki's window afterwards
    (before: r306 F3); it now goes to a floor of their bucket of 16,384: x8000 is delivered once.

    ``its-own-entry-forgotten-guard``: an entry of S (5 s old) was sent first in a push answered 503,
    so S is the first stream the sink forgets: Loki may store that push late, after the refusal, and
    the cutoff then proves nothing. x8000 is rejected "may be stored", never stamped anew."""
    batch = _whole_case()
    streams = 4200
    async with LokiReceiver(per_stream_rate=1, per_stream_burst=10_000_000, per_stream_whole=True) as loki:
        sink = _sink(loki.url, per_stream_rate=0)
        try:
            # Loki takes the streams first (the sink pushes few new streams at a time), so that one
            # push carries them all.
            known = [_at(6, reason=f"R{i}", object_name=f"r{i}") for i in range(streams)]
            await _deliver(sink, known)
            if own:
                loki.fail_next(503)
                with pytest.raises(RetryableError):
                    await sink.send([_at(5, reason="S", object_name="s5")])
            # Every push of the send answered 503: mostly one push of every stream, but the sink's
            # table of known streams may have lost some of them to shared slots (it depends on the
            # hash seed) and push them apart; either way more than 4,096 went in pushes of unknown outcome.
            loki.fail_next(503, count=64)
            blip = len(loki.pushes)
            with pytest.raises(RetryableError):
                await sink.send([_at(5, reason=f"R{i}", object_name=f"q{i}") for i in range(streams)])
            assert {push.status for push in loki.pushes[blip:]} == {503}
            loki.clear_faults()
            final = await _whole_case_after_another_writer(loki, sink, batch, lambda: _lift(loki))
        finally:
            await sink.aclose()
        outcomes = [final[occurrence.uid, occurrence.number] for occurrence in batch]
        if own:
            assert _may_be_stored(outcomes[0]) and all(_ok(outcome) for outcome in outcomes[1:]), outcomes
        else:
            assert all(_ok(outcome) for outcome in outcomes), outcomes
        copies = {name: count for name, count in _copies(loki).items() if name[0] not in "rq"}
        expected = {"other-now": 1, "x4200": 1, "y20": 1, "y10": 1}
        assert copies == (expected if own else {**expected, "x8000": 1})  # never stored, or once


async def test_an_entry_given_up_while_aside_no_longer_holds_its_stream_back() -> None:
    """b-old and c-old (two hours old) are refused for the stream limit and wait aside; the engine
    gives b-old up (dead-lettered, ``retry_max_attempts`` spent). The limit frees, and b-new and c-new
    of the same streams arrive. b-new is pushed at once: its stream's record aside went with b-old,
    where before it was held back for ``stream_hold`` + Retry-After (up to 10 minutes) "while older
    entries of its stream wait aside", though none did (r312 F1). c-new is still held behind c-old,
    which the engine has not given up."""
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url)
        try:
            first = await sink.send([_at(30, namespace="a", object_name="a-0")])
            assert first is None or _ok(first[0]), first
            b_old = _at(7205, namespace="b", object_name="b-old")
            c_old = _at(7205, namespace="c", object_name="c-old")
            refused = await sink.send([b_old, c_old])
            assert refused is not None, "both refused for the stream limit"
            assert all(o.kind is OutcomeKind.RETRY and o.defer for o in refused), refused
            sink.given_up([b_old])  # as the engine does when it dead-letters or drops it
            loki.max_streams = 3
            b_new = _at(5, namespace="b", object_name="b-new")
            c_new = _at(5, namespace="c", object_name="c-new")
            outcomes = await sink.send([b_new, c_new])
        finally:
            await sink.aclose()
        assert outcomes is not None
        assert _ok(outcomes[0]), outcomes[0]
        assert outcomes[1].kind is OutcomeKind.RETRY and outcomes[1].held, outcomes[1]
        assert _copies(loki) == {"a-0": 1, "b-new": 1}
