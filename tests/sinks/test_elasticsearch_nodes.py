"""Elasticsearch sink with several nodes, one of them hung or slow: the transport's node pool (dead,
then tried again after 1, 2, 4 … s), a probe before a node not known to answer takes a request, and a
request cut short by the send's budget, which marks no node dead. Against osmem-server and
``SilentServer`` (accepts, never answers) on loopback."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, normalise
from eventrouter.testing import event_object
from eventrouter.testing.receivers.silent import SilentServer
from eventrouter_sinks.elasticsearch import ElasticsearchOptions, ElasticsearchSink

# The engine's send_timeout: the sink's budget is 1 s, its probe a tenth of that (`timeout` stays 30 s).
SEND_TIMEOUT = 1.2


def occurrence() -> Occurrence:
    return normalise(event_object(), cluster="test")


async def started(url: str, hosts: str) -> ElasticsearchSink:
    context = SinkContext("es", "test", None, logging.getLogger("test.es"), send_timeout=SEND_TIMEOUT)
    options = ElasticsearchOptions.model_validate({"url": url, "hosts": hosts, "index": "events"})
    sink = ElasticsearchSink(options, context)
    async with asyncio.timeout(SEND_TIMEOUT):  # as the engine bounds start()
        await sink.start()
    return sink


async def count(url: str, index: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/_refresh"):
            pass
        async with session.post(f"{url}/{index}/_count") as resp:
            return int((await resp.json())["count"])


class SlowFront:
    """A reverse proxy before the cluster, as a node of it: it answers 413 itself to a bulk request of
    more than ``max_documents`` (as ``http.max_content_length`` does by size), and holds the others
    while it is ``hold()``: a node busy indexing, slow but working (what it held goes in once
    released). ``requests`` holds "METHOD path" of each request that reached it, a bulk request
    followed by "413" or "held" when it was so."""

    def __init__(self, upstream: str, *, max_documents: int) -> None:
        self.upstream = upstream
        self.max_documents = max_documents
        self.url = ""
        self.requests: list[str] = []
        self._go = asyncio.Event()
        self._go.set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    async def __aenter__(self) -> SlowFront:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = f"{request.method} {request.path}"
        if request.path == "/_bulk" and body.count(b"\n") > 2 * self.max_documents:
            self.requests.append(f"{seen} 413")
            return web.Response(status=413)
        if request.path == "/_bulk" and not self._go.is_set():
            self.requests.append(f"{seen} held")
            await self._go.wait()
        else:
            self.requests.append(seen)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        url = self.upstream + request.path_qs
        async with self._session.request(request.method, url, data=body, headers=headers) as resp:
            data = await resp.read()
            hop = ("content-length", "transfer-encoding", "connection")
            back = {k: v for k, v in resp.headers.items() if k.lower() not in hop}
            return web.Response(status=resp.status, body=data, headers=back)


async def test_a_hung_node_costs_later_sends_a_short_probe_not_their_budget(osmem_clone: Any) -> None:
    """Nodes [one that accepts and never answers, a live one]: the hung node was marked dead after a
    timeout, but each time it came back from its dead time (1, 2, 4 … s) the round-robin gave it a
    bulk request with the send's whole budget, and that send failed, 25 s later by default: every
    other send while the pool tried it again. Now a node back from its dead time (or whose request was
    cut short) is first sent HEAD / with a tenth of that (when another node is alive); with no answer
    it is marked dead again and the live node takes the request in the same send. Only the first
    request to reach the hung node may be another (start's GET /, or a send's bulk: that send fails)."""
    good = osmem_clone.url
    async with SilentServer() as hung:
        sink = await started(hung.url, good)
        sends = failed = 0
        try:
            # Until the hung node was reached three times: its first request, then tries after its
            # dead time. Sends paced at 50 ms, as batches come in.
            async with asyncio.timeout(20):
                while len(hung.requests) < 3:
                    sends += 1
                    try:
                        outcomes = await sink.send([occurrence()])
                    except RetryableError:
                        failed += 1
                    else:
                        assert [o.kind for o in outcomes or ()] == [OutcomeKind.OK]
                    await asyncio.sleep(0.05)
        finally:
            await sink.aclose()
    assert hung.requests[0] == "GET /" or hung.requests[0].startswith("POST /_bulk?"), hung.requests
    assert hung.requests[1:] == ["HEAD /", "HEAD /"], hung.requests
    # Only a send whose first request went to it before it was known hung failed; the rest went to
    # the live node within their budget.
    assert failed == (hung.requests[0] != "GET /"), (failed, hung.requests)
    # Not probed at every turn of the round-robin: only back from a dead time (1 s at least here).
    assert sends >= 8, sends
    assert await count(good, "events") == sends - failed


async def test_a_slow_node_cut_short_by_the_send_budget_is_not_marked_dead(
    osmem_clone: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A request given less than its time because earlier requests of the send used the rest (here a
    413's half, after the whole request was refused), cut short by the send's budget while a slow but
    working node held it, timed out in the transport, which marked that node dead: out of the
    round-robin for 1, 2, 4 … s, though it answers. Now it marks no node dead; the node is probed
    (HEAD /) before its next request and keeps its turn when it answers. Two nodes, each refusing
    more than two documents with a 413 (which marks no node dead either) and holding smaller
    requests: the round-robin sends the half to the other, which holds it."""
    caplog.set_level(logging.WARNING, logger="elastic_transport")
    cluster = osmem_clone.url
    async with (
        SlowFront(cluster, max_documents=2) as one,
        SlowFront(cluster, max_documents=2) as two,
    ):
        sink = await started(one.url, two.url)
        try:
            one.hold()
            two.hold()
            with pytest.raises(RetryableError) as cut:
                await sink.send([occurrence() for _ in range(4)])
            one.release()  # it was slow, not hung: what it held goes in
            two.release()
            refused, slow = (one, two) if "POST /_bulk 413" in one.requests else (two, one)
            assert slow.requests[-1] == "POST /_bulk held", (one.requests, two.requests)
            held = len(slow.requests)
            # At once, within the dead time it would have had: the next two sends, one each.
            for _ in range(2):
                outcomes = await sink.send([occurrence()])
                assert [o.kind for o in outcomes or ()] == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    assert "POST /_bulk" in slow.requests[held:], slow.requests
    assert "POST /_bulk" in refused.requests, refused.requests  # the 413 left it its turn
    assert "cut short" in cut.value.reason and "not marked dead" in cut.value.reason, cut.value.reason
    failed = [m for m in caplog.messages if "has failed" in m]
    assert not failed, failed  # neither the request cut short nor the 413 marked its node dead
