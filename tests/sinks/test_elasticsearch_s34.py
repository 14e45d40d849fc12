"""Elasticsearch sink, session 34 (item 282): `raw` judged per index, from the mapping an index that
exists has, not only from what the template gives a new one; the template created only if absent, so
that of two routers starting at once the later leaves the other's; and a simulation in which no
template applies read as "ours does not". Against osmem, and loopback fronts before it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, SinkContext, normalise
from eventrouter.testing import event_object
from eventrouter.testing.receivers.osmem import Cluster
from eventrouter.testing.receivers.relay import Relay
from eventrouter_sinks.elasticsearch import ElasticsearchOptions, ElasticsearchSink

LOG = "test.es34"
DOTTED = {"app.kubernetes.io/name": "web"}
REPLACED = {"app_kubernetes_io/name": "web"}


def occurrence(*, labels: dict[str, str], **kwargs: Any) -> Occurrence:
    obj = event_object(**kwargs)
    obj["metadata"]["labels"] = labels
    return normalise(obj, cluster="test")


def make_sink(url: str, name: str = "es", **options: Any) -> ElasticsearchSink:
    opts = ElasticsearchOptions.model_validate({"url": url, **options})
    return ElasticsearchSink(opts, SinkContext(name, "test", None, logging.getLogger(LOG)))


@asynccontextmanager
async def running_sink(url: str, **options: Any) -> AsyncIterator[ElasticsearchSink]:
    sink = make_sink(url, **options)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.aclose()


async def delivered(sink: ElasticsearchSink, occ: Occurrence) -> None:
    outcomes = await sink.send([occ])
    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK], [o.reason for o in outcomes or []]


async def raw_labels(cluster: Cluster, index: str, occ: Occurrence) -> dict[str, str]:
    """The labels of the ``raw`` object the cluster holds for ``occ`` in ``index``."""
    status, doc = await cluster.call("GET", f"/{index}/_doc/{occ.uid}-{occ.number}")
    assert status == 200, doc
    labels: dict[str, str] = doc["_source"]["raw"]["metadata"]["labels"]
    return labels


async def templates(cluster: Cluster) -> dict[str, list[str]]:
    status, body = await cluster.call("GET", "/_index_template")
    assert status == 200, body
    return {t["name"]: t["index_template"]["index_patterns"] for t in body["index_templates"]}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ an index that exists


@pytest.mark.parametrize(
    ("index", "made", "other", "new_index"),
    [
        (
            "k8s-events-{yyyy.MM.dd}",
            "k8s-events-2026.12.07",
            {"last_timestamp": "2026-12-08T00:00:01Z"},
            "k8s-events-2026.12.08",
        ),
        ("k8s-events", "k8s-events", None, None),
        (
            "k8s-events-{namespace}",
            "k8s-events-default",
            {"namespace": "kube-system"},
            "k8s-events-kube-system",
        ),
    ],
    ids=["dated", "fixed", "per-namespace"],
)
async def test_an_index_made_before_the_template_gets_raw_dot_replaced(
    cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
    index: str,
    made: str,
    other: dict[str, str] | None,
    new_index: str | None,
) -> None:
    """`raw` went verbatim wherever the template would give a new index our mappings, also into the
    index that existed already without them (index_template turned on for a running router, a fixed
    or undated name): a dotted label key was refused there (object vs text at
    `raw.metadata.labels.app`) and dead-lettered for the rest of the day, or for ever. An index not
    there yet still gets it verbatim."""
    at = {"last_timestamp": "2026-12-07T10:00:00Z"}
    async with running_sink(cluster.url, index=index, include_raw=True) as before:
        await delivered(before, occurrence(labels={"app": "web"}, name="first", **at))
    with caplog.at_level(logging.WARNING, logger=LOG):
        async with running_sink(cluster.url, index=index, include_raw=True, index_template=True) as sink:
            occ = occurrence(labels=DOTTED, name="second", **at)
            await delivered(sink, occ)
            await delivered(sink, occurrence(labels={"app": "api"}, name="third", **at))
            new = occurrence(labels=DOTTED, name="fourth", **{**at, **(other or {})})
            if new_index is not None:  # not there yet: made from the template, raw kept as it is
                await delivered(sink, new)
    assert await raw_labels(cluster, made, occ) == REPLACED
    if new_index is not None:
        assert await raw_labels(cluster, new_index, new) == DOTTED
    (warning,) = warnings(caplog)
    assert f"index {made} exists without the mappings of index template 'eventrouter-k8s-events'" in warning


class Replacer(Relay):
    """A front through which, right after each PUT of an index template, a router of an older version
    puts its own patterns under that name (item 266's "Left": versions before it replace the shared
    template with their own pattern)."""

    def __init__(self, upstream: str, patterns: list[str]) -> None:
        super().__init__(upstream)
        self.patterns = patterns

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = await self.relay(request, body)
        if request.method == "PUT" and request.path.startswith("/_index_template/") and answer.status == 200:
            old = {"index_patterns": self.patterns, "priority": 200, "_meta": {"managed_by": "eventrouter"}}
            assert self._session is not None
            async with self._session.put(self.upstream + request.path, json=old) as resp:
                assert resp.status == 200, await resp.text()
        return answer


async def test_a_simulation_in_which_no_template_applies_gets_raw_dot_replaced(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The cluster answers `_simulate_index` `{}` when no template matches the name (Elasticsearch's
    SimulateIndexTemplateResponse(null, null), OpenSearch, osmem); the sink took an answer without
    `template` as "ours applies" and sent `raw` verbatim into indices made without mappings."""
    async with Replacer(cluster.url, ["k8s-old-*"]) as front:
        with caplog.at_level(logging.WARNING, logger=LOG):
            async with running_sink(
                front.url, index="k8s-new-{yyyy.MM.dd}", index_template=True, include_raw=True
            ) as sink:
                at = {"last_timestamp": "2026-12-07T10:00:00Z"}
                await delivered(sink, occurrence(labels={"app": "web"}, name="first", **at))
                occ = occurrence(labels=DOTTED, name="second", **at)
                await delivered(sink, occ)
    assert await raw_labels(cluster, "k8s-new-2026.12.07", occ) == REPLACED
    assert any(
        "the cluster says no index template applies to new indices such as k8s-new-" in w
        for w in warnings(caplog)
    )


async def test_an_index_made_without_our_mappings_after_it_was_judged_gets_raw_dot_replaced(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An index not there when judged is made from whatever template applies when the first document
    arrives: another start (an older version) may have replaced ours since. Its refusal of `raw`'s keys
    is answered "send again" (held, no attempt counted), not dead-lettered, and that index gets raw
    dot-replaced from then on."""
    async with running_sink(
        cluster.url, index="k8s-events-{yyyy.MM.dd}", index_template=True, include_raw=True
    ) as sink:
        old = {"index_patterns": ["k8s-old-*"], "priority": 200, "_meta": {"managed_by": "eventrouter"}}
        status, said = await cluster.call("PUT", "/_index_template/eventrouter-k8s-events", old)
        assert status == 200, said
        at = {"last_timestamp": "2026-12-07T10:00:00Z"}
        await delivered(sink, occurrence(labels={"app": "web"}, name="first", **at))
        occ = occurrence(labels=DOTTED, name="second", **at)
        with caplog.at_level(logging.WARNING, logger=LOG):
            (outcome,) = await sink.send([occ]) or []
            assert outcome.kind is OutcomeKind.RETRY and outcome.held and outcome.retry_after == 0, outcome
            await delivered(sink, occ)  # as the engine sends it again
    assert await raw_labels(cluster, "k8s-events-2026.12.07", occ) == REPLACED
    (warning,) = warnings(caplog)
    assert "index k8s-events-2026.12.07 refused raw's keys as they are" in warning, warning


class MappingRefused(Relay):
    """A front answering 403 to mapping reads, as the cluster does to a role without
    `view_index_metadata` on the index."""

    PAGE: ClassVar[dict[str, Any]] = {
        "error": {
            "type": "security_exception",
            "reason": "action [indices:admin/mappings/get] is unauthorized for user [writer]",
        },
        "status": 403,
    }

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.reads = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/_mapping"):
            self.reads += 1
            return web.json_response(self.PAGE, status=403)
        return await self.relay(request, body)


async def test_an_index_whose_mapping_the_role_cannot_read_gets_raw_dot_replaced_with_one_warning(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer's role may lack `view_index_metadata`: its mapping unknown, an index gets raw
    dot-replaced (safe whatever its mapping), each index name is asked once, and one warning says why."""
    async with running_sink(cluster.url, index="k8s-events-{namespace}", include_raw=True) as before:
        await delivered(before, occurrence(labels={"app": "web"}, name="first"))
    async with MappingRefused(cluster.url) as front:
        with caplog.at_level(logging.WARNING, logger=LOG):
            async with running_sink(
                front.url, index="k8s-events-{namespace}", index_template=True, include_raw=True
            ) as sink:
                occs = [occurrence(labels=DOTTED, name=f"o{i}", namespace=f"ns-{i % 2}") for i in range(4)]
                for occ in [*occs, *occs]:
                    await delivered(sink, occ)
                await delivered(sink, (dotted := occurrence(labels=DOTTED, name="second")))
    assert front.reads == 3  # once per index name
    assert await raw_labels(cluster, "k8s-events-default", dotted) == REPLACED
    (warning,) = warnings(caplog)
    assert "answered 403 to GET k8s-events-ns-0/_mapping" in warning and "view_index_metadata" in warning, (
        warning
    )


# ------------------------------------------------------------------ two routers starting at once


class ListingBarrier(Relay):
    """A front holding the answers to the first ``count`` listings of the index templates until all
    were read from the cluster: routers started together each read them before any of them writes."""

    def __init__(self, upstream: str, count: int) -> None:
        super().__init__(upstream)
        self.count = count
        self.arrived = 0
        self.all_in = asyncio.Event()
        self.puts: list[str] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "PUT":
            self.puts.append(request.path_qs)
        answer = await self.relay(request, body)
        if request.method == "GET" and request.path == "/_index_template" and self.arrived < self.count:
            self.arrived += 1
            if self.arrived == self.count:
                self.all_in.set()
            await asyncio.wait_for(self.all_in.wait(), 30)
        return answer


async def test_two_routers_starting_at_once_keep_one_template_and_the_other_warns(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 266's protection of another router's template was a read then a write: two routers with
    other prefixes and the default template_name, rolled out together, both found no template and both
    PUT it, the later replacing the other's pattern (item 265's fault), and the earlier then sent raw
    verbatim into indices made without mappings. Now the PUT may only create: the later is refused,
    reads whose template holds the name, and leaves it with the warning of item 266."""
    async with ListingBarrier(cluster.url, 2) as front:
        a = make_sink(
            front.url, "router-a", index="k8s-a-{yyyy.MM.dd}", index_template=True, include_raw=True
        )
        b = make_sink(
            front.url, "router-b", index="k8s-b-{yyyy.MM.dd}", index_template=True, include_raw=True
        )
        try:
            with caplog.at_level(logging.WARNING, logger=LOG):
                await asyncio.gather(a.start(), b.start())
            ((name, patterns),) = (await templates(cluster)).items()
            assert name == "eventrouter-k8s-events"
            winner, loser = (a, b) if patterns == ["k8s-a-*"] else (b, a)
            (warning,) = warnings(caplog)
            said = f"{loser.context.name}: index template 'eventrouter-k8s-events' is eventrouter's for"
            assert warning.startswith(f"{said} {patterns}"), warning
            assert warning.endswith("set template_name to install this router's own")
            at = {"last_timestamp": "2026-12-07T10:00:00Z"}
            sent: dict[ElasticsearchSink, Occurrence] = {}
            for sink in (winner, loser):
                await delivered(sink, occurrence(labels={"app": "web"}, name=f"{sink.context.name}-1", **at))
                sent[sink] = occurrence(labels=DOTTED, name=f"{sink.context.name}-2", **at)
                await delivered(sink, sent[sink])
        finally:
            await a.aclose()
            await b.aclose()
    assert front.puts == ["/_index_template/eventrouter-k8s-events?create=true"] * 2
    prefix = {a: "k8s-a-", b: "k8s-b-"}
    assert await raw_labels(cluster, f"{prefix[winner]}2026.12.07", sent[winner]) == DOTTED
    assert await raw_labels(cluster, f"{prefix[loser]}2026.12.07", sent[loser]) == REPLACED
