"""Elasticsearch sink, session 33 (item 265): answers whose page the transport cannot decode, the index
template's name and `check`, old event years, index names of dots, the index-name cache's memory, and
an odd `version` in `GET /`'s answer. Against osmem, and loopback fronts answering as proxies do."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, SinkError, normalise
from eventrouter.testing import event_object
from eventrouter.testing.receivers._server import LoopbackServer
from eventrouter.testing.receivers.osmem import Cluster
from eventrouter.testing.receivers.relay import Relay
from eventrouter_sinks.elasticsearch import (
    ElasticsearchOptions,
    ElasticsearchSink,
    index_template_body,
)

LOG = "test.es33"


def occurrence(*, labels: dict[str, str] | None = None, **kwargs: Any) -> Occurrence:
    obj = event_object(**kwargs)
    if labels is not None:
        obj["metadata"]["labels"] = labels
    return normalise(obj, cluster="test")


def make_sink(url: str, **options: Any) -> ElasticsearchSink:
    opts = ElasticsearchOptions.model_validate({"url": url, **options})
    return ElasticsearchSink(opts, SinkContext("es", "test", None, logging.getLogger(LOG)))


@asynccontextmanager
async def running_sink(url: str, **options: Any) -> AsyncIterator[ElasticsearchSink]:
    sink = make_sink(url, **options)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.aclose()


async def check(flag: str) -> tuple[int | None, str]:
    """``eventrouter check`` of one sink, as an operator runs it: its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventrouter.cli",
        "check",
        flag,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    return proc.returncode, output


async def templates(cluster: Cluster) -> dict[str, dict[str, Any]]:
    status, body = await cluster.call("GET", "/_index_template")
    assert status == 200, body
    return {t["name"]: t["index_template"] for t in body["index_templates"]}


# ------------------------------------------------------------------ pages the transport cannot decode


class PageFront(Relay):
    """A gateway before the cluster answering ``status`` with a page of its own (of media type
    ``ctype``) to a bulk body over ``limit`` bytes, and to ``GET /`` when ``answer_root``."""

    def __init__(self, upstream: str, status: int, ctype: str, page: bytes, limit: int = 0) -> None:
        super().__init__(upstream)
        self.status, self.ctype, self.page, self.limit = status, ctype, page, limit
        self.bulks: list[int] = []
        self.answer_root = False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        bulk = request.path.endswith("/_bulk")
        if bulk:
            self.bulks.append(len(body))
        if (bulk and len(body) > self.limit) or (self.answer_root and request.path == "/"):
            return web.Response(status=self.status, body=self.page, headers={"Content-Type": self.ctype})
        return await self.relay(request, body)


class BareFront:
    """A server answering ``GET /`` as a cluster and every other request with a bare HTTP/1.1 answer
    whose head is ``head`` (aiohttp's server always adds a Content-Type to a body; some do not)."""

    def __init__(self, head: str, page: bytes) -> None:
        self.head, self.page = head, page
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> BareFront:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    (int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length:")), 0
                )
                await reader.readexactly(length)
                if lines[0].startswith("GET / "):
                    root = b'{"version":{"number":"8.15.0"}}'
                    answer = (
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    )
                    writer.write(answer % (len(root), root))
                else:
                    writer.write(
                        b"%s\r\nContent-Length: %d\r\n\r\n%s"
                        % (self.head.encode(), len(self.page), self.page)
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


PAGES = [
    ("application/problem+json", b'{"type":"about:blank","title":"Payload Too Large","status":413}'),
    ("application/octet-stream", b"Payload Too Large"),
    ("application/json", b"<html>413 Request Entity Too Large</html>"),
]


@pytest.mark.parametrize(("ctype", "page"), PAGES, ids=["problem+json", "octet-stream", "html-as-json"])
async def test_a_413_page_of_any_media_type_is_halved(cluster: Cluster, ctype: str, page: bytes) -> None:
    """The transport decoded a page by its Content-Type before the sink saw the status: a gateway's
    413 in a media type it does not read (RFC 9457 problem+json, octet-stream, none, HTML labelled
    JSON) raised SerializationError, and the batch was sent whole again at every retry, for ever."""
    batch = [occurrence(name=f"web-{i}") for i in range(6)]
    async with (
        PageFront(cluster.url, 413, ctype, page, limit=2500) as front,
        running_sink(front.url, index="limit") as sink,
    ):
        outcomes = await sink.send(batch)
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 6, [o.reason for o in outcomes or []]
    full = front.bulks[0]
    assert full > 2500 and front.bulks[1:] == [full // 2, full // 2], front.bulks
    assert await cluster.count("limit") == 6


@pytest.mark.parametrize(
    ("content_type", "page"),
    [
        ("\r\nContent-Type: application/problem+json", b'{"title":"Too Many Requests","status":429}'),
        ("", b"429 Too Many Requests"),
    ],
    ids=["problem+json", "none"],
)
async def test_a_429_page_the_transport_cannot_decode_keeps_its_retry_after(
    content_type: str, page: bytes
) -> None:
    head = f"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7{content_type}"
    async with BareFront(head, page) as front, running_sink(front.url, index="busy") as sink:
        with pytest.raises(RetryableError) as raised:
            await sink.send([occurrence()])
    assert raised.value.retry_after == 7
    assert "429" in raised.value.reason and "Too Many Requests" in raised.value.reason


async def test_a_401_page_the_transport_cannot_decode_fails_start_as_a_401(cluster: Cluster) -> None:
    page = b'{"type":"about:blank","title":"Unauthorized","status":401}'
    async with PageFront(cluster.url, 401, "application/problem+json", page) as front:
        front.answer_root = True
        with pytest.raises(SinkError, match=r"credentials rejected by .* \(401 .*Unauthorized"):
            await make_sink(front.url).start()


# ------------------------------------------------------------------ the index template


async def test_check_does_not_install_the_index_template(cluster: Cluster) -> None:
    """`check` ran `start`, which PUT the template: a check of a candidate configuration replaced the
    running router's template in the production cluster (its next indices lost their mappings)."""
    async with running_sink(cluster.url, index="k8s-events-{yyyy.MM.dd}", index_template=True):
        pass
    before = await templates(cluster)
    assert [t["index_patterns"] for t in before.values()] == [["k8s-events-*"]]
    flag = (
        f"--sink=elasticsearch:{cluster.url}?index=events-v2-{{yyyy.MM.dd}}&index_template=true"
        "&template_priority=50"
    )
    code, output = await check(flag)
    assert code == 0, output
    assert "index template 'eventrouter-events-v2-" in output and "not there, start installs it" in output
    assert await templates(cluster) == before


async def test_two_routers_with_other_index_prefixes_keep_their_own_templates(cluster: Cluster) -> None:
    """Both installed `eventrouter-k8s-events` whatever their `index`: the later start replaced the
    other's pattern, whose next indices were made without mappings while it sent `raw` verbatim."""
    a = make_sink(cluster.url, index="k8s-a-{yyyy.MM.dd}", index_template=True, include_raw=True)
    b = make_sink(cluster.url, index="k8s-b-{yyyy.MM.dd}", index_template=True, include_raw=True)
    await a.start()
    try:
        await b.start()
        await b.aclose()
        found = await templates(cluster)
        assert sorted(t["index_patterns"][0] for t in found.values()) == ["k8s-a-*", "k8s-b-*"]
        batch = [
            occurrence(labels=labels, name=f"o{i}", last_timestamp="2026-12-08T00:00:01Z")
            for i, labels in enumerate(
                [
                    {"app": "web"},
                    {"app.kubernetes.io/name": "web"},
                    {"release-date": "2026-12-08"},
                    {"release-date": "soon"},
                ]
            )
        ]
        for occ in batch:  # one at a time: each may map a field the next one needs another way
            outcomes = await a.send([occ])
            assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
    finally:
        await a.aclose()


async def test_an_upgrade_keeps_the_former_template_name_of_its_pattern_and_leaves_another_routers(
    cluster: Cluster,
) -> None:
    """Versions before item 265 installed `eventrouter-k8s-events` for every pattern. An upgraded
    router keeps using that name for its own pattern (a second name for one pattern and priority would
    be refused by the cluster, and a rolled-back version's PUT of the old name with it), and leaves one
    of another pattern, which another router still uses."""
    old: dict[str, Any] = {"index": "k8s-events-{yyyy.MM.dd}", "index_template": True}
    body = index_template_body(ElasticsearchOptions.model_validate({"url": cluster.url, **old}))
    status, said = await cluster.call("PUT", "/_index_template/eventrouter-k8s-events", body)
    assert status == 200, said
    async with running_sink(cluster.url, **old) as sink:
        outcomes = await sink.send([occurrence(labels={"app.kubernetes.io/name": "web"})])
        assert [o.kind for o in outcomes or []] == [OutcomeKind.OK]
    ((name, template),) = (await templates(cluster)).items()
    assert name == "eventrouter-k8s-events" and template["index_patterns"] == ["k8s-events-*"]
    # A rolled-back version's start: the same PUT as before the upgrade, accepted.
    status, said = await cluster.call("PUT", "/_index_template/eventrouter-k8s-events", body)
    assert status == 200, said
    status, said = await cluster.call("DELETE", "/_index_template/eventrouter-k8s-events")
    assert status == 200, said

    # Another router, not upgraded, had it for its own pattern: left alone.
    other = {**old, "index": "k8s-b-{yyyy.MM.dd}"}
    body = index_template_body(ElasticsearchOptions.model_validate({"url": cluster.url, **other}))
    status, said = await cluster.call("PUT", "/_index_template/eventrouter-k8s-events", body)
    assert status == 200, said
    async with running_sink(cluster.url, **{**old, "index": "k8s-c-{yyyy.MM.dd}"}):
        pass
    found = await templates(cluster)
    assert found["eventrouter-k8s-events"]["index_patterns"] == ["k8s-b-*"]
    assert sorted(t["index_patterns"][0] for t in found.values()) == ["k8s-b-*", "k8s-c-*"]


async def test_a_template_of_that_name_that_is_not_ours_is_left_as_it_is_with_a_warning(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    mine = {
        "index_patterns": ["k8s-events-*"],
        "priority": 10,
        "template": {"settings": {"number_of_replicas": 0}},
    }
    status, said = await cluster.call("PUT", "/_index_template/ops-events", mine)
    assert status == 200, said
    before = await templates(cluster)
    options = {"index": "k8s-events-{yyyy.MM.dd}", "index_template": True, "template_name": "ops-events"}
    with caplog.at_level(logging.WARNING, logger=LOG):
        async with running_sink(cluster.url, include_raw=True, **options) as sink:
            outcomes = await sink.send([occurrence(labels={"app.kubernetes.io/name": "web"})])
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
    assert await templates(cluster) == before
    assert any(
        "index template 'ops-events' exists and is not eventrouter's" in r.getMessage()
        for r in caplog.records
    )


async def test_our_template_name_given_to_another_pattern_fails_start_and_check_naming_both(
    cluster: Cluster,
) -> None:
    shared = {"index_template": True, "template_name": "events"}
    async with running_sink(cluster.url, index="k8s-a-{yyyy.MM.dd}", **shared):
        pass
    before = await templates(cluster)
    second = make_sink(cluster.url, index="k8s-b-{yyyy.MM.dd}", **shared)
    try:
        with pytest.raises(
            SinkError, match=r"'events' is eventrouter's for \['k8s-a-\*'\].*\['k8s-b-\*'\].*template_name"
        ):
            await second.start()
    finally:
        await second.aclose()
    code, output = await check(
        f"--sink=elasticsearch:{cluster.url}?index=k8s-b-{{yyyy.MM.dd}}&index_template=true&template_name=events"
    )
    assert code != 0 and "is eventrouter's for ['k8s-a-*']" in output, output
    assert await templates(cluster) == before


async def test_an_operators_template_of_a_higher_priority_gets_raw_keys_dot_replaced(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Composable templates do not merge: an operator's own for the same indices at a higher priority
    (for ILM or shard settings) applies instead of ours, and `raw`, sent verbatim because ours does
    not index it, had its dotted keys refused."""
    ops = {
        "index_patterns": ["k8s-events-*"],
        "priority": 300,
        "template": {"settings": {"number_of_replicas": 0}},
    }
    status, said = await cluster.call("PUT", "/_index_template/k8s-events-ilm", ops)
    assert status == 200, said
    with caplog.at_level(logging.WARNING, logger=LOG):
        async with running_sink(
            cluster.url, index="k8s-events-{yyyy.MM.dd}", index_template=True, include_raw=True
        ) as sink:
            first = await sink.send([occurrence(labels={"app": "web"}, name="a")])
            second = await sink.send([occurrence(labels={"app.kubernetes.io/name": "web"}, name="b")])
    assert [o.kind for o in [*(first or []), *(second or [])]] == [OutcomeKind.OK] * 2, [
        o.reason for o in second or []
    ]
    assert any("another of a higher priority applies" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ times, names, memory, GET /


async def test_an_event_time_before_year_1000_has_a_four_digit_year_in_timestamp_and_index(
    cluster: Cluster,
) -> None:
    """glibc's %Y writes year 2 as "2": `@timestamp` "2-01-02T…", refused by the template's date
    mapping (dead-lettered for the sink's own encoding), and the index `old-2.01.02`."""
    batch = [
        occurrence(last_timestamp=t, first_timestamp=t, name=f"o{i}")
        for i, t in enumerate(["0002-01-02T00:00:00Z", "0999-05-01T00:00:00Z"])
    ]
    async with running_sink(cluster.url, index="old-{yyyy.MM.dd}", index_template=True) as sink:
        outcomes = await sink.send(batch)
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 2, [o.reason for o in outcomes or []]
    status, doc = await cluster.call("GET", f"/old-0002.01.02/_doc/{batch[0].uid}-{batch[0].number}")
    assert status == 200, doc
    assert doc["_source"]["@timestamp"] == "0002-01-02T00:00:00.000Z"
    assert await cluster.count("old-0999.05.01") == 1


async def test_index_names_from_a_value_of_dots_are_ones_the_cluster_takes(cluster: Cluster) -> None:
    batch = [occurrence(reason=reason, name=f"o{i}") for i, reason in enumerate([".", ".."])]
    async with running_sink(cluster.url, index="{reason}") as sink:
        outcomes = await sink.send(batch)
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 2, [o.reason for o in outcomes or []]
    for index in (".", ".."):
        with pytest.raises(ValidationError, match=r"refuse the names \. and \.\."):
            ElasticsearchOptions.model_validate({"url": "http://es", "index": index})


def test_the_index_name_cache_holds_no_whole_long_field_value() -> None:
    """Keyed by whole field values, 1,000 legacy events with a 64 KB reason left ~62 MiB held after
    they were sent and gone, for index names of at most 255 bytes."""
    sink = make_sink("http://127.0.0.1:9", index="k8s-{reason}-{yyyy.MM.dd}")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            sink._encode(occurrence(reason=f"R{i}-" + "x" * 64_000))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * 2**20, f"{held / 2**20:.1f} MiB held"


class Root(LoopbackServer):
    """Whatever answers at the URL (a gateway's root, an ES-compatible product): ``body`` for GET /."""

    def __init__(self, body: object) -> None:
        super().__init__()
        self.body = body

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.body)


@pytest.mark.parametrize("version", [None, "8.15.0", 8], ids=["null", "string", "number"])
async def test_a_root_answer_with_an_odd_version_still_connects(
    version: object, caplog: pytest.LogCaptureFixture
) -> None:
    """`version` that is no object raised AttributeError at every start, naming neither node nor answer."""
    async with Root({"version": version, "tagline": "x"}) as root:
        with caplog.at_level(logging.INFO, logger=LOG):
            async with running_sink(f"http://127.0.0.1:{root.port}"):
                pass
    assert any(
        f"connected to elasticsearch ? at http://127.0.0.1:{root.port}" in r.getMessage()
        for r in caplog.records
    )
