"""Elasticsearch/OpenSearch: what a send split by 413s had no time for, beside a document the same
send set aside (the exposure item 192 found in the webhook sink), through the engine and as answered.

Against osmem-server (its own flood-stage block answers the set-aside document), behind
``SlowFront``: a proxy that takes ``delay`` a bulk request and answers 413 to a body over
``max_content_length``, as an ingress with a small ``client_max_body_size`` before a busy cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, SinkContext, normalise
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import event_object
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.osmem import Cluster
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.waiting import until
from eventrouter_sinks.elasticsearch import ElasticsearchOptions, ElasticsearchSink

NAME = "es"


class SlowFront(Relay):
    """Before osmem: each bulk request takes ``delay`` seconds, and one larger than
    ``max_content_length`` bytes is answered 413 (not passed on). ``accepted`` holds the ``_id`` of
    each document osmem answered 2xx, in order; anything else is passed on as is."""

    def __init__(self, upstream: str, *, delay: float, max_content_length: int) -> None:
        super().__init__(upstream)
        self.delay = delay
        self.max_content_length = max_content_length
        self.accepted: list[str] = []
        self.too_large = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        bulk = request.path == "/_bulk"
        if bulk:
            await asyncio.sleep(self.delay)
            if len(body) > self.max_content_length:
                self.too_large += 1
                return web.Response(status=413)
        answer = await self.relay(request, body)
        if bulk and answer.status == 200:
            assert isinstance(answer.body, bytes)
            for item in orjson.loads(answer.body)["items"]:
                ((_, result),) = item.items()
                if 200 <= result["status"] < 300:
                    self.accepted.append(result["_id"])
        return answer


def occurrence(namespace: str, name: str) -> Occurrence:
    # ~1.4 kB as a bulk entry: two fit in the front's 3,000 bytes.
    obj = event_object(namespace=namespace, object_name=name, message="m" * 600)
    return normalise(obj, cluster="test")


def doc_id(occ: Occurrence) -> str:
    return f"{occ.uid}-{occ.number}"


def sink_for(url: str, send_timeout: float) -> ElasticsearchSink:
    """The sink, its budget from the engine's send_timeout (as the router gives it)."""
    context = SinkContext(NAME, "test", None, logging.getLogger("test.es"), send_timeout=send_timeout)
    return ElasticsearchSink(
        ElasticsearchOptions.model_validate({"url": url, "index": "events-{namespace}"}), context
    )


@asynccontextmanager
async def running(url: str, metrics: Metrics, dead: Path, **knobs: Any) -> AsyncIterator[Pipeline]:
    """The sink behind the engine's own pipeline; drained and stopped on the way out."""
    pipeline = pipeline_for(NAME, sink_for(url, knobs["send_timeout"]), metrics, dead, **knobs)
    async with drained(pipeline):
        yield pipeline


async def test_documents_a_send_had_no_time_for_wait_aside_with_the_one_set_aside_not_in_place(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A batch of 41, the first for an index past the flood-stage watermark (set aside, item 185),
    through a front taking 0.1 s a request that fits two documents: each send halves it down to
    pairs and runs out of its 1.25 s after a few. What it had no time for was answered a retry in
    place (held), and the engine retries the whole batch in place when any of it is: the document
    just set aside came back at the head of every resend, each counted an attempt, and at
    ``retry_max_attempts=3`` the good documents not yet in went to the dead letters with it. What a
    send had no time for now waits aside too (due at once, no attempt counted): the 40 others go in
    once each and in order, and only the blocked one is dead-lettered."""
    await cluster.flood("events-full", True)
    blocked = occurrence("full", "f-0")
    good = [occurrence("a", f"a-{i}") for i in range(40)]
    metrics = Metrics()
    counters = [
        metrics.delivered.labels(NAME),
        metrics.dead_lettered.labels(NAME, "retries_exhausted"),
        metrics.dead_lettered.labels(NAME, "rejected"),
    ]
    knobs: dict[str, Any] = {
        "batch_max_events": 64,
        "send_timeout": 1.5,
        "retry_max_attempts": 3,
        "retry_initial_backoff": 0.05,
        "retry_max_backoff": 0.1,
    }
    async with SlowFront(cluster.url, delay=0.1, max_content_length=3000) as front:
        async with running(front.url, metrics, tmp_path / "dl", **knobs) as p:
            for occ in [blocked, *good]:  # offered before the pipeline runs again: one batch
                p.offer(occ)
            # Each one delivered or dead-lettered (asserted below: which, and how).
            await until(lambda: sum(c._value.get() for c in counters) == 41, timeout=60)
        assert front.too_large > 0  # the sends were split
    lines = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert [line["key"] for line in lines] == [blocked.key], [line["key"] for line in lines]
    assert lines[0]["reason"].startswith("retries exhausted after 3 attempts: 429 cluster_block_exception")
    assert front.accepted == [doc_id(occ) for occ in good]  # once each, in order
    assert metrics.delivered.labels(NAME)._value.get() == 40
    assert await cluster.count("events-a") == 40


async def test_what_a_send_had_no_time_for_waits_aside_only_when_it_set_a_document_aside(
    cluster: Cluster,
) -> None:
    """The sink's answers themselves. Beside a document set aside, what the send did not start is a
    hold set aside too (``defer``), due at once; a send that set nothing aside keeps it in place (a
    plain hold: sent next, at once, before anything newer, no attempt counted)."""
    await cluster.flood("events-full", True)
    blocked = occurrence("full", "f-0")
    async with SlowFront(cluster.url, delay=0.1, max_content_length=3000) as front:
        sink = sink_for(front.url, send_timeout=1.2)
        await sink.start()
        try:
            first = list(await sink.send([blocked, *(occurrence("a", f"a-{i}") for i in range(20))]) or [])
            second = list(await sink.send([occurrence("b", f"b-{i}") for i in range(20)]) or [])
        finally:
            await sink.aclose()
    assert first[0].kind is OutcomeKind.RETRY and first[0].defer and not first[0].held
    assert first[0].reason.startswith("429 cluster_block_exception")
    for outcomes, aside in ((first[1:], True), (second, False)):
        unsent = [o for o in outcomes if o.kind is not OutcomeKind.OK]
        assert 0 < len(unsent) < len(outcomes), [o.reason for o in outcomes]
        for o in unsent:
            assert o.kind is OutcomeKind.RETRY and o.held, o
            assert o.reason.startswith("not sent: the send had run for "), o.reason
            assert o.defer is aside and o.retry_after == (0.0 if aside else None), o
