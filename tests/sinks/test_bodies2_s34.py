"""Loki and Elasticsearch, session 34's review (r2bodies F1, F3, F5, F7, F8; item 294): an answer
whose body cannot be read (stalled after the head, cut off, or not in its Content-Encoding) is judged
by its status, not taken for no answer. Before, the failed read threw the status and its Retry-After
away: a final 400 was retried for ever, a 413 never halved (and, in Elasticsearch, every node marked
dead in turn), a 429's Retry-After lost; and Elasticsearch read an error page whole (a 150 MB page
took the router from 57 to 357 MB).

Loki against the project's test Loki (``unreadable_next(n, how)``); Elasticsearch against osmem
behind a loopback front answering the next bulk requests so (``answer_unreadable``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from eventrouter import Occurrence, Outcome, OutcomeKind, RetryableError, SinkContext, SinkError
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.front_page import FrontPage, answer_page
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.osmem import Cluster
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.receivers.unreadable import Unreadable, answer_late, answer_unreadable
from eventrouter.testing.waiting import until
from eventrouter_sinks.elasticsearch import ElasticsearchOptions, ElasticsearchSink
from eventrouter_sinks.loki import LokiOptions, LokiSink

LOG = "test.bodies2.s34"
HOWS: list[Unreadable] = ["stall", "cut", "gzip"]
PAGE = 64 << 20
"""Bytes of a front's page: far more than the kernel buffers of a loopback connection hold."""
TIMEOUT = 3
"""The sinks' request timeout: a stalled error body is waited for 2 s of it (a 2xx's, all of it), and
the head has it all to come on a loaded machine."""


def context(name: str, send_timeout: float = 30.0) -> SinkContext:
    return SinkContext(name, "c1", None, logging.getLogger(LOG), send_timeout)


# -- Loki -----------------------------------------------------------------------------------------


def recent(n: int, **fields: Any) -> list[Occurrence]:
    """``n`` occurrences of one stream, half a minute old (within any Loki's limits)."""
    when = datetime.fromtimestamp(time.time() - 30, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return [
        make_occurrence(cluster="c1", object_name=f"pod-{i}", first_timestamp=when, **fields)
        for i in range(n)
    ]


@asynccontextmanager
async def loki_sink(loki: LokiReceiver, **options: Any) -> AsyncIterator[LokiSink]:
    opts = {"url": loki.url, "timeout": TIMEOUT, **options}
    sink = LokiSink(LokiOptions.model_validate(opts), context("loki"))
    await sink.start()
    try:
        yield sink
    finally:
        await sink.aclose()


def all_ok(outcomes: Sequence[Outcome] | None) -> bool:
    return outcomes is None or {o.kind for o in outcomes} == {OutcomeKind.OK}


def pushes(loki: LokiReceiver) -> list[int]:
    return [push.status for push in loki.pushes]


@pytest.mark.parametrize("how", HOWS)
async def test_loki_a_final_400_whose_body_cannot_be_read_is_rejected(how: Unreadable) -> None:
    """Before: "cannot reach … timed out" (or the parser's text), retried for ever at the default
    retry_max_attempts=0, the sink sitting on that batch."""
    async with LokiReceiver() as loki, loki_sink(loki) as sink:
        loki.fail_next(400, message="entry too long")
        loki.unreadable_next(1, how)
        outcomes = await sink.send(recent(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert outcome.reason.startswith(
        "loki: 400 (push of 1 entries refused, possibly partly stored): Bad Request (its body unreadable: "
    )
    assert pushes(loki) == [400]


@pytest.mark.parametrize("how", HOWS)
async def test_loki_a_push_answered_413_with_an_unreadable_body_is_halved(how: Unreadable) -> None:
    """A proxy's body limit at the head: before, the same push was sent whole at every attempt."""
    async with LokiReceiver() as loki, loki_sink(loki) as sink:
        loki.fail_next(413, message="<html>413 Request Entity Too Large</html>")
        loki.unreadable_next(1, how)
        outcomes = await sink.send(recent(4))
    assert all_ok(outcomes)
    assert pushes(loki) == [413, 204, 204]
    assert len(loki.entries) == 4


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("status", [429, 503])
async def test_loki_retry_after_is_honoured_when_the_body_cannot_be_read(
    status: int, how: Unreadable
) -> None:
    """Before, retry_after was None: the engine's backoff hammered a Loki that asked for 2 minutes."""
    async with LokiReceiver() as loki, loki_sink(loki) as sink:
        loki.fail_next(status, retry_after=120)
        loki.unreadable_next(1, how)
        with pytest.raises(RetryableError) as failed:
            await sink.send(recent(1))
    assert failed.value.retry_after == 120
    assert f"answered {status}: " in failed.value.reason
    assert "(its body unreadable: " in failed.value.reason


@pytest.mark.parametrize("how", HOWS)
async def test_loki_a_stream_refusal_whose_body_cannot_be_read_is_a_429_naming_no_stream(
    how: Unreadable,
) -> None:
    """Loki's stream-limit 429 names the refused stream in its body; unread, the sink does what it
    does for a 429 naming none: the push is retried. Before: "cannot reach"."""
    async with LokiReceiver(max_streams=1) as loki, loki_sink(loki) as sink:
        assert all_ok(await sink.send(recent(1, namespace="a")))
        loki.unreadable_next(1, how)
        with pytest.raises(RetryableError) as failed:
            await sink.send(recent(1, namespace="b"))
    assert pushes(loki) == [204, 429]
    assert "answered 429: Too Many Requests (its body unreadable: " in failed.value.reason


@pytest.mark.parametrize("how", HOWS)
async def test_loki_a_partial_400_whose_body_cannot_be_read_is_judged_as_one_naming_no_stream(
    how: Unreadable,
) -> None:
    """Loki's 400 naming the stream of an entry it refused is split to keep the others; unread, it
    is what a 400 naming no stream is: every entry of the push rejected "possibly partly stored", not
    pushed again. Before: "cannot reach", the push retried for ever."""
    async with LokiReceiver(max_line_size=2000) as loki, loki_sink(loki, max_line_bytes=100_000) as sink:
        batch = [*recent(1), *recent(1, message="x" * 3000)]
        loki.unreadable_next(1, how)
        outcomes = await sink.send(batch)
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 2
    assert "(its body unreadable: " in outcomes[0].reason
    assert pushes(loki) == [400]


@pytest.mark.parametrize("how", HOWS)
async def test_loki_a_2xx_whose_body_cannot_be_read_is_pushed_again_saying_so(how: Unreadable) -> None:
    """A 2xx with a body (a front's 200; Loki's own is a 204 without one) lost on the way: whether
    the push was stored is unknown, so it is pushed again, saying so (Loki keeps one copy). Before:
    "cannot reach … timed out", though something answered."""
    async with LokiReceiver() as loki, loki_sink(loki) as sink:
        loki.fail_next(200, message="ok", store=True)
        loki.unreadable_next(1, how)
        batch = recent(1)
        with pytest.raises(RetryableError) as failed:
            await sink.send(batch)
        assert all_ok(await sink.send(batch))
    assert failed.value.reason.startswith(f"loki: {loki.url} answered 200 but its body could not be read (")
    assert failed.value.reason.endswith("): whether the push was stored is unknown; pushed again")
    assert [len(stream.values) for stream in loki.query_range()] == [1]


async def test_loki_a_stalled_body_only_quoted_is_waited_for_two_seconds_not_the_whole_timeout() -> None:
    """A 503's body is only quoted: at the default timeout (10 s) it gets 2 s (the webhook's wait,
    item 277); before, the whole timeout ran out and the 503 was "cannot reach … timed out"."""
    async with LokiReceiver() as loki, loki_sink(loki, timeout=10) as sink:
        loki.fail_next(503, retry_after=120)
        loki.unreadable_next(1, "stall")
        with pytest.raises(RetryableError) as failed:
            await sink.send(recent(1))
    assert failed.value.retry_after == 120
    assert (
        "answered 503: Service Unavailable (its body unreadable: none of it within 2s)" in failed.value.reason
    )


async def test_loki_a_400_naming_an_entry_is_read_past_two_seconds() -> None:
    """Guard: a 400's body decides (the entry Loki names is split off, the others kept), so it is
    waited for as long as the request's timeout allows, not the 2 s of a body only quoted
    (body_prefix's rule): one arriving 2.5 s after its head still keeps the good entry."""
    async with (
        LokiReceiver(max_line_size=2000) as loki,
        loki_sink(loki, timeout=6, max_line_bytes=100_000) as sink,
    ):
        loki.late_next(1, 2.5)
        outcomes = await sink.send([*recent(1), *recent(1, message="x" * 3000)])
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.REJECT]
    assert pushes(loki)[0] == 400


@pytest.mark.parametrize("how", HOWS)
async def test_loki_start_refused_with_an_unreadable_body_names_the_refusal(how: Unreadable) -> None:
    """``/ready`` answered 401 by a front whose page cannot be read: the credentials are named, not
    "cannot reach"."""
    async with LokiReceiver(username="u", password="right") as loki:
        loki.unreadable_next(1, how, ready=True)
        sink = LokiSink(
            LokiOptions.model_validate(
                {"url": loki.url, "username": "u", "password": "wrong", "timeout": TIMEOUT}
            ),
            context("loki"),
        )
        try:
            with pytest.raises(SinkError) as failed:
                await sink.start()
        finally:
            await sink.aclose()
    assert str(failed.value).startswith(
        f"loki: {loki.url} refused our credentials (401 'its body unreadable: "
    )


# -- Elasticsearch --------------------------------------------------------------------------------


@dataclass
class Fault:
    status: int
    how: Unreadable | None
    """None: a page of ``page`` bytes (``answer_page``)."""
    headers: dict[str, str]
    relayed: bool = False
    """Relayed to the cluster first (it stored the documents), its answer then sent so."""
    page: int = 0
    late: float = 0.0
    """The cluster's answer (relayed), its body this many seconds after its head."""


class BodyFaults(Relay):
    """Before osmem: the next bulk requests answered as ``faults`` say (shared by every front of a
    test, whichever node a request goes to); the rest relayed."""

    def __init__(self, upstream: str, faults: deque[Fault]) -> None:
        super().__init__(upstream)
        self.faults = faults
        self.bulks: list[int] = []
        self.pages: list[FrontPage] = []
        self._release = asyncio.Event()

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # a stalled answer ends: its connection is dropped
        await super().__aexit__(*exc)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not request.path.startswith("/_bulk"):
            return await self.relay(request, body)
        fault = self.faults.popleft() if self.faults else None
        if fault is None:
            answer = await self.relay(request, body)
            self.bulks.append(answer.status)
            return answer
        self.bulks.append(fault.status)
        if fault.late:
            return await answer_late(request, await self.relay(request, body), fault.late)
        if fault.how is None:
            self.pages.append(FrontPage(fault.status, fault.page))
            return await answer_page(request, self.pages[-1], fault.headers)
        if fault.relayed:
            answer = await self.relay(request, body)
            assert answer.status == fault.status, answer.text
        else:
            page = (
                b'{"error":{"type":"illegal_argument_exception","reason":"refused"},"status":%d}'
                % fault.status
            )
            answer = web.Response(status=fault.status, body=page, content_type="application/json")
        answer.headers.update(fault.headers)
        return await answer_unreadable(request, answer, fault.how, self._release)


@dataclass
class Fronted:
    sink: ElasticsearchSink
    fronts: list[BodyFaults]
    faults: deque[Fault]

    def fail_next(
        self,
        status: int,
        how: Unreadable | None,
        *,
        relayed: bool = False,
        page: int = 0,
        late: float = 0.0,
        **headers: str,
    ) -> None:
        shown = {k.replace("_", "-"): v for k, v in headers.items()}
        self.faults.append(Fault(status, how, shown, relayed, page, late))

    @property
    def bulks(self) -> list[int]:
        return [status for front in self.fronts for status in front.bulks]


@asynccontextmanager
async def es_sink(cluster: Cluster, *, nodes: int = 1, **options: Any) -> AsyncIterator[Fronted]:
    """A started sink on ``nodes`` fronts before osmem (sharing their faults)."""
    faults: deque[Fault] = deque()
    fronts = [BodyFaults(cluster.url, faults) for _ in range(nodes)]
    for front in fronts:
        await front.__aenter__()
    try:
        opts = {"hosts": [front.url for front in fronts], "index": "ev", "timeout": TIMEOUT, **options}
        sink = ElasticsearchSink(ElasticsearchOptions.model_validate(opts), context("es"))
        await sink.start()
        try:
            yield Fronted(sink, fronts, faults)
        finally:
            await sink.aclose()
    finally:
        for front in fronts:
            await front.__aexit__(None, None, None)


def docs(n: int) -> list[Occurrence]:
    return [make_occurrence(cluster="c1", object_name=f"pod-{i}") for i in range(n)]


@pytest.mark.parametrize("how", HOWS)
async def test_es_a_final_400_whose_body_cannot_be_read_is_rejected(
    cluster: Cluster, how: Unreadable
) -> None:
    """Before: "bulk request failed: ConnectionError" (or timed out), retried for ever."""
    async with es_sink(cluster) as es:
        es.fail_next(400, how)
        outcomes = await es.sink.send(docs(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert outcome.reason.startswith("bulk request refused: 400 its body unreadable: ")
    assert es.bulks == [400]


@pytest.mark.parametrize("how", HOWS)
async def test_es_a_bulk_answered_413_with_an_unreadable_body_is_halved_and_marks_no_node_dead(
    cluster: Cluster, how: Unreadable, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy's body limit at the head, before two nodes: before, the same bulk at every attempt
    (never halved) and each node marked dead in turn by the transport's ConnectionError."""
    with caplog.at_level(logging.WARNING):
        async with es_sink(cluster, nodes=2) as es:
            es.fail_next(413, how)
            outcomes = await es.sink.send(docs(4))
    assert all_ok(outcomes)
    assert sorted(es.bulks) == [200, 200, 413]
    assert await cluster.count("ev") == 4
    assert not [r for r in caplog.records if r.name.startswith("elastic_transport")], caplog.records


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("status", [429, 503])
async def test_es_retry_after_is_honoured_when_the_body_cannot_be_read(
    cluster: Cluster, status: int, how: Unreadable
) -> None:
    """Before, retry_after was None and the reason "bulk request failed/timed out"."""
    async with es_sink(cluster) as es:
        es.fail_next(status, how, Retry_After="120")
        with pytest.raises(RetryableError) as failed:
            await es.sink.send(docs(1))
    assert failed.value.retry_after == 120
    assert failed.value.reason.startswith(f"elasticsearch: bulk answered {status}: its body unreadable: ")


@pytest.mark.parametrize("how", HOWS)
async def test_es_a_2xx_whose_body_cannot_be_read_is_sent_again_without_a_second_copy(
    cluster: Cluster, how: Unreadable
) -> None:
    """The cluster stored the documents and its answer was lost on the way: which went in is unknown,
    so they are sent again (each under its _id), saying so. Before: "bulk request failed:
    ConnectionError …" or "timed out", as if no node had answered."""
    async with es_sink(cluster) as es:
        es.fail_next(200, how, relayed=True)
        batch = docs(3)
        with pytest.raises(RetryableError) as failed:
            await es.sink.send(batch)
        assert all_ok(await es.sink.send(batch))
    assert " answered 200 but its body could not be read (" in failed.value.reason
    assert failed.value.reason.endswith(
        "): which documents went in is unknown; sent again (each under its own _id: no second copy)"
    )
    assert await cluster.count("ev") == 3


async def test_es_a_stalled_error_body_is_waited_for_two_seconds_not_the_whole_timeout(
    cluster: Cluster,
) -> None:
    """At the default timeout (30 s) an error's body gets 2 s; before, the request's whole time ran
    out (a ConnectionTimeout: the node marked dead, the 400 retried)."""
    async with es_sink(cluster, timeout=30) as es:
        es.fail_next(400, "stall")
        outcomes = await es.sink.send(docs(1))
    assert outcomes is not None
    assert outcomes[0].kind is OutcomeKind.REJECT
    assert outcomes[0].reason == "bulk request refused: 400 its body unreadable: none of it within 2s"


async def test_es_a_bulk_answer_is_read_past_two_seconds(cluster: Cluster) -> None:
    """Guard: a 2xx bulk answer is the documents' outcomes, so it is waited for as long as the
    request's timeout allows, not the 2 s of an error's body (body_prefix's rule)."""
    async with es_sink(cluster, timeout=6) as es:
        es.fail_next(200, None, late=2.5)
        assert all_ok(await es.sink.send(docs(2)))
    assert await cluster.count("ev") == 2


async def _not_read_whole(pages: list[FrontPage]) -> None:
    await until(lambda: len(pages) == 1 and pages[0].done)
    assert pages[0].written < pages[0].size, "the page was read whole"


async def test_es_a_huge_error_page_is_read_in_part(cluster: Cluster) -> None:
    """A proxy's 64 MiB 502 page: retried from its first bytes, the rest never read. Before, it was
    read whole (with its copies) at every retry: 150 MB took the router from 57 to 357 MB."""
    async with es_sink(cluster) as es:
        es.fail_next(502, None, page=PAGE)
        with pytest.raises(RetryableError) as failed:
            await es.sink.send(docs(1))
        await _not_read_whole(es.fronts[0].pages)
        assert all_ok(await es.sink.send(docs(1)))
    assert failed.value.reason.startswith("elasticsearch: bulk answered 502: <!DOCTYPE html>")


async def test_es_a_2xx_page_longer_than_any_bulk_answer_is_not_read_past_its_bound(cluster: Cluster) -> None:
    """A 200 of 64 MiB to a bulk of one document (a front's page, a misrouted file): no bulk answer
    is that long, so it is read up to 32 MiB and the documents sent again. Before, read whole."""
    async with es_sink(cluster) as es:
        es.fail_next(200, None, page=PAGE)
        with pytest.raises(RetryableError) as failed:
            await es.sink.send(docs(1))
        await _not_read_whole(es.fronts[0].pages)
    assert f"answered 200 but its body could not be read (longer than {32 << 20} bytes" in failed.value.reason
