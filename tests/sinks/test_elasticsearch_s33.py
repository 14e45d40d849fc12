"""Elasticsearch sink, session 33 (items 265, 266): answers whose page the transport cannot decode,
the index template's name, its neighbours and `check`, old event years, index names of dots, the
index-name cache's memory, and an odd `version` in `GET /`'s answer. Against osmem, and loopback
fronts answering as proxies do."""

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
    _meet,
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


async def raw_labels(cluster: Cluster, prefix: str, occ: Occurrence) -> dict[str, str]:
    """The labels of the ``raw`` object the cluster holds for ``occ``, sent to ``prefix-{yyyy.MM.dd}``."""
    index = prefix + occ.record["time"][:10].replace("-", ".")
    status, doc = await cluster.call("GET", f"/{index}/_doc/{occ.uid}-{occ.number}")
    assert status == 200, doc
    labels: dict[str, str] = doc["_source"]["raw"]["metadata"]["labels"]
    return labels


DOTTED = {"app.kubernetes.io/name": "web"}


async def test_check_does_not_install_the_index_template(cluster: Cluster) -> None:
    """`check` ran `start`, which PUT the template: a check of a candidate configuration replaced the
    running router's template in the production cluster (its next indices lost their mappings)."""
    async with running_sink(cluster.url, index="k8s-events-{yyyy.MM.dd}", index_template=True):
        pass
    before = await templates(cluster)
    assert [t["index_patterns"] for t in before.values()] == [["k8s-events-*"]]
    flag = (
        f"--sink=elasticsearch:{cluster.url}?index=k8s-events-{{yyyy.MM.dd}}&index_template=true"
        "&template_priority=50"
    )
    code, output = await check(flag)
    assert code == 0, output
    assert "index template 'eventrouter-k8s-events': there, start updates it" in output, output
    assert await templates(cluster) == before


@pytest.mark.parametrize("name", [{}, {"template_name": "events"}], ids=["default", "shared"])
async def test_a_router_with_another_prefix_leaves_the_first_routers_template_warns_and_delivers(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, name: dict[str, str]
) -> None:
    """Both installed one template name whatever their `index`: the later start replaced the other's
    pattern, whose next indices were made without mappings while it sent `raw` verbatim. The second
    now leaves it, says so, and sends `raw` dot-replaced (item 265's per-pattern names, which made
    overlapping prefixes refuse each other, are gone: item 266)."""
    a = make_sink(cluster.url, index="k8s-a-{yyyy.MM.dd}", index_template=True, include_raw=True, **name)
    await a.start()
    try:
        before = await templates(cluster)
        b_options = {"index": "k8s-b-{yyyy.MM.dd}", "index_template": True, "include_raw": True, **name}
        with caplog.at_level(logging.WARNING, logger=LOG):
            async with running_sink(cluster.url, **b_options) as b:
                occ = occurrence(labels=DOTTED, name="b")
                outcomes = await b.send([occ])
        assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
        assert await raw_labels(cluster, "k8s-b-", occ) == {"app_kubernetes_io/name": "web"}
        template = name.get("template_name", "eventrouter-k8s-events")
        assert any(
            f"index template '{template}' is eventrouter's for ['k8s-a-*']" in r.getMessage()
            and "not for ['k8s-b-*']" in r.getMessage()
            and r.getMessage().endswith("set template_name to install this router's own")
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        flag = "&".join(f"{k}={v}" for k, v in {**b_options, "index_template": "true"}.items())
        code, output = await check(f"--sink=elasticsearch:{cluster.url}?{flag}")
        assert code == 0 and "is eventrouter's for ['k8s-a-*']" in output, output
        assert await templates(cluster) == before
        batch = [
            occurrence(labels=labels, name=f"o{i}", last_timestamp="2026-12-08T00:00:01Z")
            for i, labels in enumerate(
                [{"app": "web"}, DOTTED, {"release-date": "2026-12-08"}, {"release-date": "soon"}]
            )
        ]
        for occ in batch:  # one at a time: each may map a field the next one needs another way
            outcomes = await a.send([occ])
            assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
        assert await raw_labels(cluster, "k8s-a-", batch[1]) == DOTTED  # a's mappings still apply
    finally:
        await a.aclose()


async def test_two_routers_with_overlapping_prefixes_both_start(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 265 named each pattern's template apart, at one priority: the cluster refuses a second
    template matching indices that another of that priority matches, so the router writing
    `k8s-events-prod-*` beside one writing `k8s-events-*` failed every start."""
    for index in ("k8s-events-{yyyy.MM.dd}", "k8s-events-prod-{yyyy.MM.dd}"):
        with caplog.at_level(logging.WARNING, logger=LOG):
            async with running_sink(cluster.url, index=index, index_template=True, include_raw=True) as sink:
                outcomes = await sink.send([occurrence(labels=DOTTED, name=index[:15])])
        assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
    # Its own name alone would be refused beside the first's: the warning says what else to set.
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.endswith(
        "set template_name to install this router's own, and template_priority to another value"
    )
    found = await templates(cluster)
    assert {n: t["index_patterns"] for n, t in found.items()} == {"eventrouter-k8s-events": ["k8s-events-*"]}


async def test_a_rolled_back_versions_put_of_the_template_is_accepted(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Every version before item 265 PUT `eventrouter-k8s-events`. After 265 installed its per-pattern
    name, a rolled-back router's PUT of the old name, for the same pattern at the same priority, was
    refused by the cluster at every start."""
    a: dict[str, Any] = {"index": "k8s-a-{yyyy.MM.dd}", "index_template": True}
    b = {**a, "index": "k8s-b-{yyyy.MM.dd}"}
    body_a, body_b = (
        index_template_body(ElasticsearchOptions.model_validate({"url": cluster.url, **o})) for o in (a, b)
    )
    path = "/_index_template/eventrouter-k8s-events"
    # This version installs it first, then rolled back: the old version's start PUTs it again.
    async with running_sink(cluster.url, **a):
        pass
    status, said = await cluster.call("PUT", path, body_a)
    assert status == 200, said
    async with running_sink(cluster.url, **{**a, "template_priority": 150}):
        pass  # ours for the same pattern: updated in place
    assert {n: t["priority"] for n, t in (await templates(cluster)).items()} == {
        "eventrouter-k8s-events": 150
    }
    status, said = await cluster.call("DELETE", path)
    assert status == 200, said

    # Routers a and b of the old version (b started last, its pattern holds the name); a upgraded,
    # then rolled back.
    status, said = await cluster.call("PUT", path, body_b)
    assert status == 200, said
    with caplog.at_level(logging.WARNING, logger=LOG):
        async with running_sink(cluster.url, **a):
            pass
    assert any("is eventrouter's for ['k8s-b-*']" in r.getMessage() for r in caplog.records)
    status, said = await cluster.call("PUT", path, body_a)
    assert status == 200, said
    assert {n: t["index_patterns"] for n, t in (await templates(cluster)).items()} == {
        "eventrouter-k8s-events": ["k8s-a-*"]
    }


async def test_an_explicit_template_name_overlapping_another_at_its_priority_fails_start_and_check(
    cluster: Cluster,
) -> None:
    """The cluster refuses a template matching indices another of the same priority matches: start
    failed quoting that, and `check` said "not there, start installs it" and passed."""
    async with running_sink(cluster.url, index="k8s-events-{yyyy.MM.dd}", index_template=True):
        pass
    before = await templates(cluster)
    prod = {"index": "k8s-events-prod-{yyyy.MM.dd}", "index_template": True, "template_name": "prod-events"}
    said = (
        r"'prod-events' for \['k8s-events-prod-\*'\] would match indices that 'eventrouter-k8s-events' "
        r"for \['k8s-events-\*'\] also matches, at the same priority 200, .* give template_priority "
        "another value"
    )
    sink = make_sink(cluster.url, **prod)
    try:
        with pytest.raises(SinkError, match=said):
            await sink.start()
    finally:
        await sink.aclose()
    code, output = await check(
        f"--sink=elasticsearch:{cluster.url}?index=k8s-events-prod-{{yyyy.MM.dd}}&index_template=true"
        "&template_name=prod-events"
    )
    assert code != 0 and "'eventrouter-k8s-events' for ['k8s-events-*'] also matches" in output, output
    assert await templates(cluster) == before
    # As it says: at another priority, the more specific applies to its indices.
    async with running_sink(cluster.url, **prod, template_priority=201, include_raw=True) as sink:
        occ = occurrence(labels=DOTTED)
        outcomes = await sink.send([occ])
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
    assert await raw_labels(cluster, "k8s-events-prod-", occ) == DOTTED


@pytest.mark.parametrize(
    ("other", "options", "refused"),
    [
        ("k8s-events-*", {"index": "k8s-events-prod-{yyyy.MM.dd}"}, True),
        ("k8s-a*", {"index": "k8s-b-{yyyy.MM.dd}"}, False),
        ("k8s-*-x", {"index": "k8s-{namespace}-y"}, False),
        ("k8s-*-events-*", {"index": "k8s-{namespace}-events-prod-{yyyy.MM.dd}"}, True),
        ("events-*", {"data_stream": "events-ds"}, True),
    ],
    ids=["prefixes-meet", "prefixes-apart", "suffixes-apart", "two-wildcards", "data-stream"],
)
async def test_check_foresees_whether_the_cluster_refuses_a_template_beside_another(
    cluster: Cluster, other: str, options: dict[str, str], refused: bool
) -> None:
    """`check` said "not there, start installs it" where the cluster then refused the template
    (patterns matching one index at one priority); its answer now agrees with the cluster's, and a
    refused start says what to change."""
    ops = {"index_patterns": [other], "priority": 200}
    status, said = await cluster.call("PUT", "/_index_template/ops", ops)
    assert status == 200, said
    clash = r"'ops' for \['[^']+'\] also matches, at the same priority 200, .*give template_priority"
    for run in ("check", "start"):
        sink = make_sink(cluster.url, index_template=True, template_name="mine", **options)
        try:
            if refused:
                with pytest.raises(SinkError, match=clash):
                    await getattr(sink, run)()
            else:
                await getattr(sink, run)()
        finally:
            await sink.aclose()
    found = await templates(cluster)
    assert sorted(found) == (["ops"] if refused else ["mine", "ops"])


@pytest.mark.parametrize(
    ("a", "b", "meet"),
    [
        ("k8s-events-*", "k8s-events-prod-*", True),
        ("k8s-a-*", "k8s-b-*", False),
        ("k8s-*-x", "k8s-*-y", False),
        ("k8s-*-x", "k8s-*-x-*", True),  # k8s-a-x-b-x
        ("k8s-*-events-*", "k8s-prod-*", True),  # k8s-prod-events-1
        ("a*b", "a*c", False),
        ("events-ds", "events-*", True),
        ("events-ds", "events-dt", False),
        ("*a", "b*", True),
    ],
)
def test_patterns_meet_where_some_index_name_matches_both(a: str, b: str, meet: bool) -> None:
    """The clusters' rule (MetadataIndexTemplateService: the intersection of both patterns' automata
    is not empty), also where osmem, which compares a pattern with the other's text, is laxer."""
    assert _meet(a, b) is meet and _meet(b, a) is meet


@pytest.mark.parametrize("name", ["ops-events", "eventrouter-k8s-events"], ids=["explicit", "default"])
async def test_a_template_of_that_name_that_is_not_ours_is_left_as_it_is_with_a_warning(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """Also under the default name (an operator's copy of ours without `_meta`, at our priority):
    item 265 left it but PUT its per-pattern name beside it, which the cluster refused for ever."""
    mine = {
        "index_patterns": ["k8s-events-*"],
        "priority": 200,
        "template": {"settings": {"number_of_replicas": 0}},
    }
    status, said = await cluster.call("PUT", f"/_index_template/{name}", mine)
    assert status == 200, said
    before = await templates(cluster)
    options = {"index": "k8s-events-{yyyy.MM.dd}", "index_template": True}
    if name == "ops-events":
        options["template_name"] = name  # else the default
    with caplog.at_level(logging.WARNING, logger=LOG):
        async with running_sink(cluster.url, include_raw=True, **options) as sink:
            outcomes = await sink.send([occurrence(labels=DOTTED)])
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
    assert await templates(cluster) == before
    assert any(
        f"index template '{name}'" in r.getMessage() and "not eventrouter's" in r.getMessage()
        for r in caplog.records
    )


async def test_a_v1_template_of_our_name_does_not_make_raw_dot_replaced(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """`_simulate_index` lists a legacy (`_template`) template it passed over, of a namespace of its
    own: given its name as template_name (a migration), ours applied, yet the sink warned that another
    of a higher priority did and sent `raw` dot-replaced. Decided now from the mappings it says apply."""
    legacy = {"index_patterns": ["k8s-events-*"], "order": 0, "settings": {"number_of_replicas": 0}}
    status, said = await cluster.call("PUT", "/_template/k8s-events", legacy)
    assert status == 200, said
    options = {"index": "k8s-events-{yyyy.MM.dd}", "index_template": True, "template_name": "k8s-events"}
    with caplog.at_level(logging.WARNING, logger=LOG):
        async with running_sink(cluster.url, include_raw=True, **options) as sink:
            occ = occurrence(labels=DOTTED)
            outcomes = await sink.send([occ])
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]
    assert await raw_labels(cluster, "k8s-events-", occ) == DOTTED
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


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
