"""Another writer of the same Loki streams (an ``eventrouter replay`` of a dead-letter file while the
router runs, or the router just restarted): Loki holds a newer entry than this sink knows, refuses
the entries more than an hour behind it and stores the rest (a partial 400). Against the project's
Loki-compatible receiver, which answers that 400 as Loki 3.x's ingester does."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink, _parse_go_time

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
PUSH = "/loki/api/v1/push"
NS = 1_000_000_000


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _at(epoch: float, **kwargs: Any) -> Occurrence:
    return make_occurrence(first_timestamp=_iso(epoch), **kwargs)


def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


def _names(loki: LokiReceiver) -> Counter[str]:
    """How many times each involved object's entry was stored (re-sent identical entries included)."""
    return Counter(orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries)


# ---- the receiver keeps Loki's contract ---------------------------------------------------------


async def test_the_receiver_answers_entries_too_far_behind_as_lokis_ingester_does() -> None:
    """pkg/ingester/stream.go errorForFailedEntries: at most max_returned_stream_errors (10) lines
    "entry with timestamp <Go time.String()> ignored, reason: '<chunkenc errTooFarBehind>'," and a
    total for the stream as the distributor made it (service_name added); the ingester's error is
    the whole answer (the distributor's "timestamp too old" of the same push is not in it), and the
    other entries are stored. Before, one line per entry ending "for stream: …," joined with "; "."""
    now = 1_800_000_000  # 2027-01-15T08:00:00Z
    behind = [(now - 7200 + i) * NS + 500_000_000 for i in range(12)]
    behind[0] = (now - 7200) * NS  # no fraction: Go prints none
    behind[1] = (now - 7199) * NS + 854_444_845
    values = [[str(ts), f"late-{i}"] for i, ts in enumerate(behind)]
    values.append([str((now - 60) * NS), "fine"])
    values.append([str((now - 8 * 86400) * NS), "too-old"])  # the distributor's refusal
    async with LokiReceiver(now=lambda: now) as loki, aiohttp.ClientSession() as http:
        first = {"streams": [{"stream": {"a": "b"}, "values": [[str(now * NS), "newest"]]}]}
        async with http.post(loki.url + PUSH, json=first) as response:
            assert response.status == 204
        async with http.post(
            loki.url + PUSH, json={"streams": [{"stream": {"a": "b"}, "values": values}]}
        ) as response:
            status, body = response.status, await response.text()
    fractions = ["", ".854444845"] + [".5"] * 8
    expected = "".join(
        f"entry with timestamp 2027-01-15 06:00:{i:02d}{fractions[i]} +0000 UTC ignored, reason: 'entry too far "
        f"behind, entry timestamp is: 2027-01-15T06:00:{i:02d}Z, oldest acceptable timestamp is: "
        "2027-01-15T07:00:00Z',\n"
        for i in range(10)
    )
    expected += (
        'user \'fake\', total ignored: 12 out of 13 for stream: {a="b", service_name="unknown_service"}\n'
    )
    assert (status, body) == (400, expected)
    assert [e.line for e in loki.entries] == ["newest", "fine"]
    assert loki.pushes[-1].accepted == 1


# ---- the sink -------------------------------------------------------------------------------------


async def test_a_second_writer_s_entries_loki_refused_are_retried_and_the_stored_ones_are_not() -> None:
    """The reproduction: the running router pushed a fresh entry; a second process (a replay) pushes
    two entries hours old and two fresh ones to the same stream. Loki stores the fresh ones and refuses
    the old ones. Before, all four were dead-lettered with Loki's 400; now the fresh ones are
    delivered, the old ones retried, stamped at receipt and stored; each entry once."""
    now = time.time()
    async with LokiReceiver() as loki:
        live, replay = _sink(loki.url), _sink(loki.url)
        try:
            assert [o.kind for o in await live.send([_at(now - 30, object_name="a")]) or []] in (
                [],
                [OutcomeKind.OK],
            )
            batch = [
                _at(now - 3 * 3600, object_name="old-1"),
                _at(now - 2 * 3600, object_name="old-2"),
                _at(now - 20, object_name="fresh-1"),
                _at(now - 10, object_name="fresh-2"),
            ]
            outcomes = await replay.send(batch)
            assert outcomes is not None
            assert [o.kind for o in outcomes] == [OutcomeKind.RETRY] * 2 + [OutcomeKind.OK] * 2
            assert "entry too far behind" in outcomes[0].reason and "another writer" in outcomes[0].reason
            again = await replay.send(batch[:2])  # what the engine does with the two
        finally:
            await live.aclose()
            await replay.aclose()
    assert again is None or [o.kind for o in again] == [OutcomeKind.OK] * 2
    assert _names(loki) == {name: 1 for name in ("a", "old-1", "old-2", "fresh-1", "fresh-2")}
    for entry in loki.entries:
        record = orjson.loads(entry.line)
        assert ("time_adjusted" in record) is record["involved_object"]["name"].startswith("old")
    assert [p.status for p in loki.pushes] == [204, 400, 204]


async def test_more_refused_entries_than_loki_lists_are_all_found_by_its_cutoff() -> None:
    """Loki lists 10 refused entries per stream; the other 5 are found by the cutoff it names."""
    now = time.time()
    async with LokiReceiver() as loki:
        live, replay = _sink(loki.url), _sink(loki.url)
        try:
            await live.send([_at(now - 30, object_name="a")])
            old = [_at(now - 3 * 3600 + i, object_name=f"old-{i}") for i in range(15)]
            fresh = [_at(now - 20 + i, object_name=f"fresh-{i}") for i in range(3)]
            outcomes = await replay.send(old + fresh)
            assert outcomes is not None
            assert [o.kind for o in outcomes] == [OutcomeKind.RETRY] * 15 + [OutcomeKind.OK] * 3
            assert loki.pushes[-1].message.count("\n") == 10  # 10 listed, then the total
            assert "total ignored: 15 out of 18" in loki.pushes[-1].message
            again = await replay.send(old)
        finally:
            await live.aclose()
            await replay.aclose()
    assert again is None or all(o.kind is OutcomeKind.OK for o in again)
    assert _names(loki) == {"a": 1} | {o.record["involved_object"]["name"]: 1 for o in old + fresh}


async def test_an_entry_loki_stored_within_the_cutoff_s_second_is_not_sent_again() -> None:
    """Go prints the cutoff in whole seconds. Of two entries in that second, Loki refused the earlier
    and stored the later; its count (1 of 2) tells them apart, so the stored one is not re-sent (it
    would be stored again, stamped at receipt: a second copy)."""
    newest = math.floor(time.time()) - 30 + 0.7
    async with LokiReceiver() as loki:
        live, replay = _sink(loki.url), _sink(loki.url)
        try:
            await live.send([_at(newest, object_name="a")])
            batch = [
                _at(newest - 3600 - 0.4, object_name="refused"),
                _at(newest - 3600 + 0.2, object_name="stored"),
            ]
            outcomes = await replay.send(batch)
            assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.RETRY, OutcomeKind.OK]
            assert "total ignored: 1 out of 2" in loki.pushes[-1].message
            again = await replay.send(batch[:1])
        finally:
            await live.aclose()
            await replay.aclose()
    assert again is None or [o.kind for o in again] == [OutcomeKind.OK]
    assert _names(loki) == {"a": 1, "refused": 1, "stored": 1}


async def test_an_entry_stored_in_the_cutoff_s_second_beside_one_the_distributor_dropped_is_not_sent_again() -> (
    None
):
    """The reviewer's reproduction: an entry over this Loki's max_line_size is dropped by the
    distributor, so Loki's total (3) is not the push's count (4) and does not say which entries it
    refused. Before, every entry before the printed cutoff + 1 s was taken as refused: one Loki
    stored in that second was stamped at receipt and stored a second time. Now the refused entries are
    the ones whose exact timestamps Loki lists."""
    n = math.floor(time.time()) - 60  # the other writer's newest, a whole second: Loki's exact cutoff
    async with LokiReceiver(max_line_size=2000) as loki:
        live, replay = _sink(loki.url), _sink(loki.url)
        try:
            await live.send([_at(n, object_name="other")])
            batch = [
                _at(n - 3600 - 10, object_name="a"),  # too far behind
                _at(n - 3600 + 0.4, object_name="b"),  # stored: in the second after the printed cutoff
                _at(n - 1800, object_name="c", message="x" * 3000),  # dropped by the distributor
                _at(n - 1200, object_name="d"),
            ]
            outcomes = await replay.send(batch)
            assert outcomes is not None
            assert "total ignored: 1 out of 3" in loki.pushes[1].message
            rest = [occ for occ, o in zip(batch, outcomes, strict=True) if o.kind is OutcomeKind.RETRY]
            again = await replay.send(rest)
        finally:
            await live.aclose()
            await replay.aclose()
    queried = Counter(
        orjson.loads(line)["involved_object"]["name"] for s in loki.query_range() for _, line, _ in s.values
    )
    assert queried == {"other": 1, "a": 1, "b": 1, "d": 1}
    assert rest == batch[:1] and (again is None or [o.kind for o in again] == [OutcomeKind.OK])
    assert outcomes[2].kind is OutcomeKind.REJECT and "Max entry size" in outcomes[2].reason


def _refused_and_unsure(n: int, newest_of_push: float) -> list[Occurrence]:
    """Twelve entries too far behind (Loki lists ten), one dropped by the distributor among them, one
    stored in the second after the printed cutoff ("b"), and the push's newest."""
    batch = [_at(n - 3600 - 100 + i, object_name=f"a-{i}") for i in range(12)]
    batch.append(_at(n - 3600 - 50, object_name="c", message="x" * 3000))
    batch.append(_at(n - 3600 + 0.4, object_name="b"))
    batch.append(_at(newest_of_push, object_name="d"))
    return batch


async def test_an_unsure_entry_is_pushed_again_with_its_own_time_and_loki_tells_whether_it_was_stored() -> (
    None
):
    """More refused entries than Loki lists, and one dropped by the distributor: the entry in the
    second after the printed cutoff cannot be told from Loki's counts. It is pushed again with its own
    timestamp; nothing of the push was newer than Loki's newest, so the same cutoff judges it again:
    Loki takes it as the copy it holds (delivered), where before it was stamped at receipt and stored
    twice."""
    n = math.floor(time.time()) - 60
    async with LokiReceiver(max_line_size=2000) as loki:
        live, replay = _sink(loki.url), _sink(loki.url)
        try:
            await live.send([_at(n, object_name="other")])
            batch = _refused_and_unsure(n, n - 1200)
            outcomes = await replay.send(batch)
        finally:
            await live.aclose()
            await replay.aclose()
    assert outcomes is not None
    assert "total ignored: 12 out of 14" in loki.pushes[1].message
    kinds = {o.record["involved_object"]["name"]: out.kind for o, out in zip(batch, outcomes, strict=True)}
    assert kinds == {f"a-{i}": OutcomeKind.RETRY for i in range(12)} | {
        "c": OutcomeKind.RETRY,  # taken for refused: stamped anew, the distributor will answer its error
        "b": OutcomeKind.OK,
        "d": OutcomeKind.OK,
    }
    assert [p.status for p in loki.pushes] == [204, 400, 204]  # b and d pushed again: both de-duplicated
    assert sorted(_names(loki).items()) == [("b", 2), ("d", 2), ("other", 1)]  # identical: one in queries
    assert not any('"time_adjusted":true' in e.line for e in loki.entries)


async def test_an_unsure_entry_loki_refuses_again_behind_a_newest_the_push_raised_is_rejected_not_stamped_anew() -> (
    None
):
    """As above, but the push's newest entry is newer than Loki's newest: pushed again, the unsure
    entry is refused behind the newest that entry raised, whether Loki stored it or not. It is
    rejected with the reason (here it was stored), not stamped at receipt (a second copy)."""
    n = math.floor(time.time()) - 60
    async with LokiReceiver(max_line_size=2000) as loki:
        live, replay = _sink(loki.url), _sink(loki.url)
        try:
            await live.send([_at(n, object_name="other")])
            batch = _refused_and_unsure(n, n + 30)
            outcomes = await replay.send(batch)
            assert outcomes is not None
            if outcomes[13].kind is OutcomeKind.RETRY:
                await replay.send(batch[13:14])  # what the engine does with "b"
        finally:
            await live.aclose()
            await replay.aclose()
    queried = Counter(
        orjson.loads(line)["involved_object"]["name"] for s in loki.query_range() for _, line, _ in s.values
    )
    assert queried == {"other": 1, "b": 1, "d": 1}
    out = {o.record["involved_object"]["name"]: out for o, out in zip(batch, outcomes, strict=True)}
    assert out["b"].kind is OutcomeKind.REJECT and "may be stored" in out["b"].reason
    assert out["d"].kind is OutcomeKind.OK


def test_the_refused_entries_timestamps_are_read_exactly_in_any_zone() -> None:
    """Go's time.Time.String() in Loki's local zone, fraction trimmed; the nanoseconds must be exact."""
    assert _parse_go_time("2027-01-15 06:00:01.854444845 +0000 UTC") == 1_799_992_801_854_444_845
    assert _parse_go_time("2027-01-15 07:00:01.5 +0100 CET") == 1_799_992_801_500_000_000
    assert _parse_go_time("2027-01-15 00:30:01 -0530 -0530") == 1_799_992_801_000_000_000
    assert _parse_go_time("2027-01-15T06:00:01Z") is None


async def test_without_clamp_time_a_refused_entry_is_retried_once_then_rejected_with_lokis_reason() -> None:
    now = time.time()
    async with LokiReceiver() as loki:
        live, replay = _sink(loki.url), _sink(loki.url, clamp_time="false")
        try:
            await live.send([_at(now - 30, object_name="a")])
            batch = [_at(now - 3 * 3600, object_name="old"), _at(now - 20, object_name="fresh")]
            first = await replay.send(batch)
            assert first is not None and [o.kind for o in first] == [OutcomeKind.RETRY, OutcomeKind.OK]
            # Now predicted refused, it is sent alone as it is, and Loki's refusal is final.
            second = await replay.send(batch[:1])
        finally:
            await live.aclose()
            await replay.aclose()
    assert second is not None and [o.kind for o in second] == [OutcomeKind.REJECT]
    assert "entry too far behind" in second[0].reason and "400" in second[0].reason
    assert _names(loki) == {"a": 1, "fresh": 1}
    assert [p.status for p in loki.pushes] == [204, 400, 400]


async def test_the_push_s_other_streams_are_pushed_again_at_once() -> None:
    """Loki's answer names one stream (the push's last); the push's other streams (stored, or refused
    without a word) are pushed again at once and judged on their own: Loki de-duplicates what it
    stored."""
    now = time.time()
    async with LokiReceiver() as loki:
        live, replay = _sink(loki.url), _sink(loki.url)
        try:
            await live.send([_at(now - 30, namespace="shop", object_name="a")])
            # Loki took the web stream from the replay just now: it goes before the shop stream, new
            # to the replay, which goes last in the same push.
            await replay.send([_at(now - 3 * 3600 - 60, namespace="web", object_name="web-first")])
            batch = [
                _at(now - 3 * 3600, namespace="web", object_name="web-old"),
                _at(now - 3 * 3600, namespace="shop", object_name="shop-old"),
                _at(now - 20, namespace="shop", object_name="shop-fresh"),
            ]
            outcomes = await replay.send(batch)
        finally:
            await live.aclose()
            await replay.aclose()
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.RETRY, OutcomeKind.OK]
    assert outcomes[1].defer  # the shop stream's own cause: it holds up no other stream
    assert [p.status for p in loki.pushes] == [204, 204, 400, 204]
    # web-old: identical, one in queries
    assert _names(loki) == {"a": 1, "web-first": 1, "web-old": 2, "shop-fresh": 1}
    assert sum(len(s.values) for s in loki.query_range()) == 4


async def test_an_answer_with_a_line_the_sink_does_not_understand_is_not_read_as_too_far_behind() -> None:
    """The third answer has a line more than Loki's "too far behind" one: not read as it (before:
    the push rejected whole). Split instead (item 243), each half answered on its own: the fresh
    entry is stored; the old one, which the push itself may have put over an hour behind its
    stream's newest (and so stored, then refused as behind), is rejected, not stamped anew."""
    now = time.time()
    batch = [_at(now - 3 * 3600, object_name="old"), _at(now - 20, object_name="fresh")]
    answers: list[list[OutcomeKind]] = []
    async with LokiReceiver() as loki:
        live = _sink(loki.url)
        try:
            await live.send([_at(now - 30, object_name="a")])
        finally:
            await live.aclose()
        understood = ""
        for extra in ("", "", "\nentry for stream '{a=\"b\"}' has timestamp too new: 2027-01-15T08:00:00Z"):
            if understood:  # Loki's own answer to the first push, again with a line added or not
                loki.fail_next(400, message=understood + extra, store=True)
            replay = _sink(loki.url)  # a new writer each time: it does not know the stream's newest
            try:
                outcomes = await replay.send(batch)
            finally:
                await replay.aclose()
            assert outcomes is not None
            answers.append([o.kind for o in outcomes])
            understood = understood or loki.pushes[-1].message
            if extra:
                assert "an identical one was sent in a push whose outcome is unknown" in outcomes[0].reason
    assert answers == [[OutcomeKind.RETRY, OutcomeKind.OK]] * 2 + [[OutcomeKind.REJECT, OutcomeKind.OK]]


async def test_a_replay_while_the_router_runs_stores_every_entry_once_and_dead_letters_nothing() -> None:
    """The second writer through the engine: ``eventrouter replay`` of events hours old and fresh into
    a stream the running router writes. Before, the whole push was dead-lettered."""
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import build_specs

    now = time.time()
    objects = [
        event_object(object_name=name, first_timestamp=_iso(now - ago))
        for name, ago in (("old-1", 3 * 3600), ("old-2", 2 * 3600), ("fresh-1", 20), ("fresh-2", 10))
    ]
    async with LokiReceiver() as loki:
        live = _sink(loki.url)
        try:
            await live.send([_at(now - 30, object_name="a")])
        finally:
            await live.aclose()
        router = Router(
            RouterSettings(cluster_name="test", metrics_addr=None),
            build_specs(
                [f"loki:{loki.url}?batch_max_wait=0.2&retry_initial_backoff=0.05&retry_max_backoff=0.1"]
            ),
        )
        await router.start_pipelines()
        try:
            assert await router.replay(("ADDED", obj) for obj in objects) == (4, 0)
            assert await router.drain(20)
        finally:
            await router.stop()
        metrics = router.metrics
    assert metrics.dead_lettered.labels("loki", "rejected")._value.get() == 0
    assert metrics.delivered.labels("loki")._value.get() == 4
    assert _names(loki) == {name: 1 for name in ("a", "old-1", "old-2", "fresh-1", "fresh-2")}
    assert 400 in {p.status for p in loki.pushes}  # Loki did refuse the old ones at first
