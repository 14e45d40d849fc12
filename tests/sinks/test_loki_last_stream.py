"""Loki's ingester answers for the last stream of a push only (pkg/ingester/instance.go ``Push``): a
stream it refused, followed by one it stored, gets a 2xx. Against the project's Loki-compatible
receiver, which answers the same way; the sink must never put a stream Loki could refuse where its
refusal cannot be seen, and one refused stream must hold up no other."""

from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks import loki as loki_sink
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
PUSH = "/loki/api/v1/push"


def _when(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    return make_occurrence(first_timestamp=_when(seconds_ago), **kwargs)


def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


def _names(loki: LokiReceiver) -> Counter[str]:
    """How many distinct entries of each involved object Loki holds (a re-sent identical entry is one:
    Loki de-duplicates it)."""
    distinct = {(e.labels, e.ts_ns, e.line) for e in loki.entries}
    return Counter(orjson.loads(line)["involved_object"]["name"] for _, _, line in distinct)


def _kinds(outcomes: Any, count: int) -> list[OutcomeKind]:
    return [OutcomeKind.OK] * count if outcomes is None else [o.kind for o in outcomes]


# ---- the receiver keeps Loki's contract ---------------------------------------------------------


async def test_the_receiver_answers_for_the_last_stream_of_a_push_as_lokis_ingester_does() -> None:
    """A refused stream followed by a stored one: 2xx (Loki's ``_, appendErr = s.Push(...)``
    overwrites the error); the other way round: the refusal. A stream whose every entry the
    distributor refused never reaches the ingester and changes nothing."""
    now = time.time_ns()
    old = now - 2 * 3600 * 10**9  # over an hour behind the stream's newest

    def push(*streams: tuple[str, int]) -> dict[str, Any]:
        return {
            "streams": [
                {"stream": {"namespace": ns}, "values": [[str(ts), f"{ns} {ts}"]]} for ns, ts in streams
            ]
        }

    answers: list[tuple[int, str]] = []
    async with LokiReceiver(max_streams=2) as loki, aiohttp.ClientSession() as http:
        for body in (
            push(("a", now), ("x", now)),
            push(("b", now), ("a", now + 1)),  # b refused for the stream limit, then a stored: 204
            push(("a", now + 2), ("b", now)),  # the last stream's refusal: 429
            push(("a", old), ("x", now + 1)),  # a's entry too far behind, then x stored: 204
            push(("x", now + 2), ("a", old)),  # the last stream's refusal: 400
            push(("a", old), ("b", 1)),  # b refused by the distributor (too old): a's answer
        ):
            async with http.post(loki.url + PUSH, json=body) as response:
                answers.append((response.status, (await response.text()).strip()))
    assert [status for status, _ in answers] == [204, 204, 429, 204, 400, 400]
    assert answers[2][1].startswith("Maximum active stream limit exceeded when trying to create stream")
    assert answers[5][1].startswith("entry with timestamp") and "total ignored: 1 out of 1" in answers[5][1]
    assert sorted(e.line for e in loki.entries) == sorted(
        f"{ns} {ts}"
        for ns, ts in [("a", now), ("x", now), ("a", now + 1), ("a", now + 2), ("x", now + 1), ("x", now + 2)]
    )


# ---- the sink -------------------------------------------------------------------------------------


async def test_a_stream_new_to_the_sink_is_pushed_last_so_its_refusal_for_the_stream_limit_is_seen() -> None:
    """Before, the new stream went first in the push and a stored stream after it made Loki answer
    204: the refused occurrence was acknowledged OK and lost."""
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url)
        try:
            assert _kinds(await sink.send([_at(30, namespace="a", object_name="a-0")]), 1) == [OutcomeKind.OK]
            batch = [
                _at(20, namespace="b", object_name="b-0"),  # a new stream, over the limit
                _at(10, namespace="a", object_name="a-1"),
                _at(5, namespace="c", object_name="c-0"),  # another one
            ]
            outcomes = await sink.send(batch)
            assert _kinds(outcomes, 3) == [OutcomeKind.RETRY, OutcomeKind.OK, OutcomeKind.RETRY]
            assert outcomes is not None and all(outcomes[i].defer for i in (0, 2))
            assert 'create stream {cluster="test", kind="Pod", namespace="b"' in outcomes[0].reason
            assert _names(loki) == {"a-0": 1, "a-1": 1}
            loki.max_streams = 3  # idle streams flushed, or the limit raised
            again = await sink.send([batch[0], batch[2]])
        finally:
            await sink.aclose()
    assert _kinds(again, 2) == [OutcomeKind.OK] * 2
    assert _names(loki) == {"a-0": 1, "a-1": 1, "b-0": 1, "c-0": 1}


async def test_without_new_stream_pushes_a_batch_is_one_push_with_its_new_streams_last() -> None:
    """``new_stream_pushes=false`` (throughput): one push per batch, the streams new to the sink at its
    end, so a stream the limit refuses, followed only by other new streams it refuses too, is seen."""
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url, new_stream_pushes=False)
        try:
            await sink.send([_at(30, namespace="a", object_name="a-0")])
            before = len(loki.pushes)
            batch = [
                _at(20, namespace="b", object_name="b-0"),  # new, over the limit
                _at(10, namespace="a", object_name="a-1"),
                _at(5, namespace="c", object_name="c-0"),  # new, over the limit
            ]
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
    assert _kinds(outcomes, 3) == [OutcomeKind.RETRY, OutcomeKind.OK, OutcomeKind.RETRY]
    # One push for the batch, then one per stream the limit named (the rest pushed again each time).
    assert len(loki.pushes) - before == 3
    assert _names(loki) == {"a-0": 1, "a-1": 1}


async def test_each_of_many_streams_is_pushed_as_new_once_and_then_rides_in_one_push() -> None:
    """The sink remembered the streams Loki took in a direct-mapped table: of 1,500 streams about 70
    shared a slot with another and pushed it out, so both went as new streams (a push each) in every
    later batch: twice the pushes of a relist."""
    streams = 1500
    batch = [_at(60, namespace=f"ns-{i}", object_name=f"o-{i}") for i in range(streams)]
    later = [_at(30, namespace=f"ns-{i}", object_name=f"p-{i}") for i in range(streams)]
    async with LokiReceiver() as loki:
        sink = _sink(loki.url)
        try:
            assert _kinds(await sink.send(batch), streams) == [OutcomeKind.OK] * streams
            first = len(loki.pushes)
            assert _kinds(await sink.send(later), streams) == [OutcomeKind.OK] * streams
        finally:
            await sink.aclose()
    assert first == streams  # each new stream last in a push of its own
    assert len(loki.pushes) - first == 1  # all taken within STREAM_KNOWN_FOR: one push
    assert len(_names(loki)) == 2 * streams


async def test_a_stream_not_pushed_for_longer_than_loki_keeps_an_idle_stream_counts_as_new_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loki forgets a stream idle for chunk_idle_period (30 min), and then may refuse it as new. A
    stream Loki has not taken from the sink within STREAM_KNOWN_FOR (20 min; here 0 s, so every
    stream is past it) is pushed last again, so that refusal is seen."""
    monkeypatch.setattr(loki_sink, "STREAM_KNOWN_FOR", 0.0)
    async with LokiReceiver(max_streams=1) as loki:
        sink, other = _sink(loki.url), _sink(loki.url)
        try:
            await sink.send([_at(40, namespace="a", object_name="a-0")])
            await sink.send([_at(35, namespace="b", object_name="b-0")])  # refused: a is active
            loki.forget_streams()  # a and b idle for 30 min
            await other.send([_at(30, namespace="c", object_name="c-0")])  # another writer's stream
            outcomes = await sink.send(
                [_at(20, namespace="a", object_name="a-1"), _at(10, namespace="c", object_name="c-1")]
            )
        finally:
            await sink.aclose()
            await other.aclose()
    assert _kinds(outcomes, 2) == [OutcomeKind.RETRY, OutcomeKind.OK]
    assert _names(loki) == {"a-0": 1, "c-0": 1, "c-1": 1}


async def test_a_stream_missing_one_label_of_the_refused_one_is_not_taken_for_it() -> None:
    """Loki names the stream it refused; a stream of ours whose labels were all in it (one fewer: an
    empty reporting_component is dropped) was taken for it: retried although stored, and later
    stamped at receipt, a second copy in Loki."""
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url)
        try:
            await sink.send([_at(3 * 3600, component="", object_name="a0")])
            outcomes = await sink.send(
                [
                    _at(2 * 3600, component="", object_name="a1"),
                    _at(2 * 3600, component="kubelet", object_name="b1"),
                ]
            )
            assert _kinds(outcomes, 2) == [OutcomeKind.OK, OutcomeKind.RETRY]
            assert outcomes is not None and 'reporting_component="kubelet"' in outcomes[1].reason
            await sink.send([_at(60, component="", object_name="a2")])
            loki.max_streams = 2
            again = await sink.send([_at(2 * 3600, component="kubelet", object_name="b1")])
        finally:
            await sink.aclose()
    assert _kinds(again, 1) == [OutcomeKind.OK]
    assert _names(loki) == {"a0": 1, "a1": 1, "a2": 1, "b1": 1}
    assert not any('"time_adjusted":true' in e.line for e in loki.entries)


async def test_a_stream_over_the_stream_limit_holds_up_no_other_stream_and_goes_in_once_it_is_free() -> None:
    """Through the engine: the refused stream's items wait aside (defer) while later batches of other
    streams are delivered; once the limit frees up they are delivered, every entry exactly once.
    Before, the engine retried them in place and nothing newer reached Loki."""
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import build_specs

    async with LokiReceiver(max_streams=1) as loki:
        router = Router(
            RouterSettings(cluster_name="test", metrics_addr=None),
            build_specs(
                [f"loki:{loki.url}?batch_max_wait=0.05&retry_initial_backoff=0.05&retry_max_backoff=0.3"]
            ),
        )
        await router.start_pipelines()
        try:
            await router.replay(
                [("ADDED", event_object(namespace="a", object_name="a-0", first_timestamp=_when(100)))]
            )
            await loki.wait_for_entries(1)
            await router.replay(
                [("ADDED", event_object(namespace="b", object_name="b-0", first_timestamp=_when(90)))]
            )
            await until(lambda: loki.stream_limited > 0)
            later = [
                ("ADDED", event_object(namespace="a", object_name=f"a-{i}", first_timestamp=_when(80 - i)))
                for i in range(1, 21)
            ]
            await router.replay(later)
            await loki.wait_for_entries(21)  # every later occurrence, while b is still refused
            assert "b-0" not in _names(loki) and loki.max_streams == 1
            refused = loki.stream_limited
            await until(lambda: loki.stream_limited > refused)  # b-0 is still being retried, aside
            loki.max_streams = 2
            assert await router.drain(10)
        finally:
            await router.stop()
    raw = Counter(orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries)
    assert raw == {f"a-{i}": 1 for i in range(21)} | {"b-0": 1}  # each stored once, not only queried once
    assert {p.status for p in loki.pushes} <= {204, 429}


@pytest.mark.parametrize(
    "reason",
    ["R" * 1900, '"\n' * 1000],  # plain; quote-dense (Loki prints each as two characters: ~4,000)
    ids=["long", "escaped"],
)
async def test_a_stream_limit_answer_naming_a_long_stream_sets_aside_that_stream_only(reason: str) -> None:
    """Loki 3.x names the stream it refused for the active stream limit; a stream printed longer than
    ~1,850 characters (a free-text reason of ~2 KB) was looked for in the answer's first 2,000
    characters only, not found, and the whole send raised: retried in place, every stream of the
    sink held up while the tenant stayed at its limit. Now read to its end: only that stream waits."""
    async with LokiReceiver(max_streams=3) as loki:
        sink = _sink(loki.url)
        try:
            first = [_at(60, namespace=ns, object_name=f"{ns}-0") for ns in ("prod", "a", "b")]
            assert _kinds(await sink.send(first), 3) == [OutcomeKind.OK] * 3  # the tenant at its limit
            batch = [_at(50 - i, namespace="prod", object_name=f"prod-{i + 1}") for i in range(5)]
            batch.append(_at(40, namespace="noisy", object_name="noisy-0", reason=reason))
            outcomes = await sink.send(batch)
        finally:
            await sink.aclose()
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * 5 + [OutcomeKind.RETRY]
    assert outcomes[-1].defer and "Maximum active stream limit exceeded" in outcomes[-1].reason
    assert len(outcomes[-1].reason) < 2200  # the answer quoted short
    assert _names(loki) == {f"prod-{i}": 1 for i in range(6)} | {"a-0": 1, "b-0": 1}
