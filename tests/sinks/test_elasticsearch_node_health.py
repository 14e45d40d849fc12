"""Elasticsearch sink with several nodes: which answers take a node out of the round-robin.

elastic-transport marks a node dead for any status but 2xx and 400-404/409; a 413 is about our
request (a batch over ``http.max_content_length``, or a proxy's body limit, which the sink halves),
so it marks none. Against osmem-server behind one ``Front`` per node on loopback."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, SinkContext, normalise
from eventrouter.testing import event_object
from eventrouter.testing.receivers.osmem import Cluster
from eventrouter.testing.receivers.relay import Relay
from eventrouter_sinks.elasticsearch import ElasticsearchOptions, ElasticsearchSink


class Front(Relay):
    """A node of the cluster, as a proxy before osmem: a bulk request of more than ``max_documents``
    documents is answered 413 (as a body over ``http.max_content_length``), anything else passed on.
    ``requests`` holds "METHOD path" of each request, a bulk request answered 413 followed by "413"."""

    def __init__(self, upstream: str, *, max_documents: int) -> None:
        super().__init__(upstream)
        self.max_documents = max_documents
        self.requests: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = f"{request.method} {request.path}"
        if request.path == "/_bulk" and body.count(b"\n") > 2 * self.max_documents:
            self.requests.append(f"{seen} 413")
            return web.Response(status=413)
        self.requests.append(seen)
        return await self.relay(request, body)


def occurrence() -> Occurrence:
    return normalise(event_object(), cluster="test")


async def test_a_batch_halved_by_413s_marks_no_node_dead_and_leaves_each_its_turn(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Three nodes taking two documents a request, a batch of eight: its 413s (8, then 4, and the
    other 4) marked each node that answered one dead, "has failed for 1 times in a row, putting on 1
    second timeout" each time, until no node was alive and the pool took one back by force; the next
    sends then went to the one node left, or probed the others first (HEAD /) once back. Now the
    transport logs nothing, and the next three sends go one to each node, none probed."""
    caplog.set_level(logging.INFO, logger="elastic_transport")
    async with (
        Front(cluster.url, max_documents=2) as a,
        Front(cluster.url, max_documents=2) as b,
        Front(cluster.url, max_documents=2) as c,
    ):
        fronts = (a, b, c)
        context = SinkContext("es", "test", None, logging.getLogger("test.es"))
        options = ElasticsearchOptions.model_validate(
            {"url": a.url, "hosts": f"{b.url},{c.url}", "index": "events"}
        )
        sink = ElasticsearchSink(options, context)
        await sink.start()
        try:
            outcomes = await sink.send([occurrence() for _ in range(8)])
            assert [o.kind for o in outcomes or ()] == [OutcomeKind.OK] * 8
            split = [list(f.requests) for f in fronts]
            for front in fronts:
                front.requests.clear()
            for _ in range(3):
                outcomes = await sink.send([occurrence()])
                assert [o.kind for o in outcomes or ()] == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    assert sum(r.endswith(" 413") for requests in split for r in requests) == 3, split
    assert [f.requests for f in fronts] == [["POST /_bulk"]] * 3, split
    transport = [
        f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name.startswith("elastic_transport")
    ]
    assert not [m for m in transport if "has failed" in m or "marked alive" in m or "Resurrected" in m], (
        transport
    )
    assert await cluster.count("events") == 11
