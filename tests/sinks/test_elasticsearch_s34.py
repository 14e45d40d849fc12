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

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, normalise
from eventrouter.memory import clear_caches
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


def make_sink(
    url: str,
    name: str = "es",
    *,
    send_timeout: float = 30.0,
    kind: type[ElasticsearchSink] = ElasticsearchSink,
    **options: Any,
) -> ElasticsearchSink:
    opts = ElasticsearchOptions.model_validate({"url": url, **options})
    return kind(opts, SinkContext(name, "test", None, logging.getLogger(LOG), send_timeout))


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


def index_read(request: web.Request) -> bool:
    """A read of indices (their mappings), not of the cluster's root or its APIs."""
    return request.method == "GET" and request.path != "/" and not request.path.startswith("/_")


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
        if index_read(request):
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
    assert "answered 403 to a read of the mappings of k8s-events-ns-0" in warning, warning
    assert "view_index_metadata" in warning, warning


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


# ------------------------------------------------------------------ item 287: judging, a review of 282

AT = {"last_timestamp": "2026-12-07T10:00:00Z"}


async def test_several_documents_of_one_bulk_refused_for_raws_keys_are_all_sent_again(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Of several documents of one bulk refused for raw's keys (an index found missing, then made
    without our mappings), only the first was held and sent again dot-replaced: the refusal of the
    first turned the index's judgment, which the rest were then read by, and they were dead-lettered."""
    async with running_sink(
        cluster.url, index="k8s-events-{yyyy.MM.dd}", index_template=True, include_raw=True
    ) as sink:
        old = {"index_patterns": ["k8s-old-*"], "priority": 200, "_meta": {"managed_by": "eventrouter"}}
        status, said = await cluster.call("PUT", "/_index_template/eventrouter-k8s-events", old)
        assert status == 200, said
        await delivered(sink, occurrence(labels={"app": "web"}, name="first", **AT))
        batch = [occurrence(labels=DOTTED, name=f"dotted-{i}", **AT) for i in range(3)]
        with caplog.at_level(logging.WARNING, logger=LOG):
            outcomes = await sink.send(batch) or []
            assert [(o.kind, o.held, o.retry_after) for o in outcomes] == [(OutcomeKind.RETRY, True, 0.0)] * 3
            again = await sink.send(batch)  # as the engine sends them again
            assert [o.kind for o in again or []] == [OutcomeKind.OK] * 3
    for occ in batch:
        assert await raw_labels(cluster, "k8s-events-2026.12.07", occ) == REPLACED
    (warning,) = warnings(caplog)
    assert "index k8s-events-2026.12.07 refused raw's keys as they are" in warning, warning


class Front(Relay):
    """A front counting the requests and the reads of indices, and answering as ``answer`` says
    once ``on`` (None: relayed, after ``delay``)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.on = False
        self.requests = 0
        self.reads = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not self.on:
            return await self.relay(request, body)
        self.requests += 1
        self.reads += index_read(request)
        answer = await self.answer(request)
        return answer if answer is not None else await self.relay(request, body)

    async def answer(self, request: web.Request) -> web.StreamResponse | None:
        return None


class Slow(Front):
    """Every answer a little later than the probe time (an overloaded cluster, a congested link),
    a bulk's later than half the send budget, or not until ``release`` with ``hold``."""

    def __init__(self, upstream: str, *, read: float, bulk: float = 0.0, hold: bool = False) -> None:
        super().__init__(upstream)
        self.read, self.bulk, self.hold = read, bulk, hold
        self.release = asyncio.Event()

    async def answer(self, request: web.Request) -> web.StreamResponse | None:
        if not request.path.startswith("/_bulk"):
            await asyncio.sleep(self.read)
        elif self.hold:
            await asyncio.wait_for(self.release.wait(), 60)
            return web.Response(status=503)  # long after the sink gave up
        else:
            await asyncio.sleep(self.bulk)
        return None


async def test_a_slow_cluster_gets_its_batch_in_one_send_with_raw_of_names_not_judged_dot_replaced(
    cluster: Cluster,
) -> None:
    """Each new index name's mapping was read in turn, each read given a tenth of the budget, until
    half of it was gone: on a cluster answering a little later than that, nothing was judged, and the
    bulk, left half its time where it had had all of it, timed out at every send. Scaled: a 5 s
    budget (reads get 0.5 s), 0.6 s per answer, 3 s for a bulk."""
    async with (
        Slow(cluster.url, read=0.6, bulk=3.0) as front,
        running_sink(
            front.url,
            send_timeout=6.0,
            index="k8s-{namespace}-{yyyy.MM.dd}",
            index_template=True,
            include_raw=True,
        ) as sink,
    ):
        front.on = True
        batch = [occurrence(labels=DOTTED, name=f"e{i}", namespace=f"ns-{i % 20}", **AT) for i in range(40)]
        outcomes = await sink.send(batch)
        assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 40, [o.reason for o in outcomes or []]
        assert front.reads == 1  # not answered in time: the reads pause
        later = occurrence(labels=DOTTED, name="later", namespace="ns-0", **AT)
        await delivered(sink, later)
        assert front.reads == 1
    assert await raw_labels(cluster, "k8s-ns-0-2026.12.07", batch[0]) == REPLACED
    assert await raw_labels(cluster, "k8s-ns-0-2026.12.07", later) == REPLACED


async def test_a_bulk_after_reads_that_took_part_of_its_time_is_cut_short_and_marks_no_node_dead(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The bulk after the mapping reads was the send's first request, so its timeout, cut by the
    reads, was taken for a node's failure: with several nodes a working one was marked dead."""
    async with (
        Slow(cluster.url, read=0.3, hold=True) as front,
        running_sink(
            f"{front.url},{front.url.replace('127.0.0.1', 'localhost')}",
            send_timeout=3.0,
            index="k8s-{namespace}-{yyyy.MM.dd}",
            index_template=True,
            include_raw=True,
        ) as sink,
    ):
        front.on = True
        batch = [occurrence(labels=DOTTED, name=f"e{i}", namespace=f"ns-{i}", **AT) for i in range(5)]
        with caplog.at_level(logging.WARNING), pytest.raises(RetryableError) as failed:
            await sink.send(batch)
        front.release.set()
    assert "bulk request cut short" in failed.value.reason, failed.value.reason
    assert not [r for r in caplog.records if r.name.startswith("elastic_transport")], caplog.records


async def test_many_new_index_names_are_judged_in_few_reads(cluster: Cluster) -> None:
    """A read per new index name: 500 namespaces took 386 sequential reads (14 s behind 30 ms) at
    every day's rollover of k8s-{namespace}-{yyyy.MM.dd}; now one read per 3,000 bytes of names."""
    async with (
        Front(cluster.url) as front,
        running_sink(
            front.url, index="k8s-{namespace}-{yyyy.MM.dd}", index_template=True, include_raw=True
        ) as sink,
    ):
        front.on = True
        batch = [occurrence(labels=DOTTED, name=f"e{i}", namespace=f"ns-{i}", **AT) for i in range(300)]
        outcomes = await sink.send(batch)
        assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 300
    assert front.reads <= 3, front.reads  # 300 names of 20 bytes
    for occ in (batch[0], batch[-1]):  # all judged not there yet: made from the template
        assert await raw_labels(cluster, f"k8s-{occ.record['namespace']}-2026.12.07", occ) == DOTTED


class Shedding(Front):
    """A cluster shedding load: every request answered 429 (a tripped parent circuit breaker)."""

    async def answer(self, request: web.Request) -> web.StreamResponse | None:
        error = {"type": "circuit_breaking_exception", "reason": "[parent] Data too large"}
        return web.json_response({"error": error, "status": 429}, status=429)


async def test_a_cluster_shedding_load_gets_no_read_per_index_name_at_every_retry(cluster: Cluster) -> None:
    """Every not-judged name was read at every attempt (each answered 429 at once): 101 requests an
    attempt for 100 namespaces, into the cluster that asked for less. Now a read answered 429 ends the
    judging, and the reads pause."""
    async with (
        Shedding(cluster.url) as front,
        running_sink(
            front.url, index="k8s-{namespace}-{yyyy.MM.dd}", index_template=True, include_raw=True
        ) as sink,
    ):
        front.on = True
        batch = [occurrence(labels=DOTTED, name=f"e{i}", namespace=f"ns-{i}", **AT) for i in range(100)]
        counts = []
        for _ in range(2):
            before = front.requests
            with pytest.raises(RetryableError, match="bulk answered 429"):
                await sink.send(batch)
            counts.append(front.requests - before)
    assert counts == [2, 1], counts  # one read, then the bulk alone


class Portal(Front):
    """A gateway's sign-in page, 200 text/html, to whatever it does not route (the reads of indices)."""

    async def answer(self, request: web.Request) -> web.StreamResponse | None:
        if index_read(request):
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")
        return None


async def test_a_page_answered_200_to_a_mapping_read_names_the_gateway_once(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 that is not the cluster's JSON was read as "no mappings": a warning per index name that
    it "exists without the mappings", about indices that need not exist, and not a word of the
    gateway."""
    async with Portal(cluster.url) as front:
        with caplog.at_level(logging.WARNING, logger=LOG):
            async with running_sink(
                front.url, index="k8s-{namespace}-{yyyy.MM.dd}", index_template=True, include_raw=True
            ) as sink:
                front.on = True
                batch = [occurrence(labels=DOTTED, name=f"e{i}", namespace=f"ns-{i}", **AT) for i in range(3)]
                outcomes = await sink.send(batch)
                assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 3
    assert await raw_labels(cluster, "k8s-ns-0-2026.12.07", batch[0]) == REPLACED
    (warning,) = warnings(caplog)
    assert "not the cluster's answer" in warning and "text/html: <html><body>Sign in" in warning, warning
    assert "a read of the mappings of k8s-ns-0-2026.12.07 and 2 more" in warning, warning


async def test_judgments_outlive_a_relist_burst_and_warn_once_per_index(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The judgments were a BoundedCache, which the router empties after every relist burst
    (clear_caches): each index was read again and one without our mappings warned about again."""
    for ns in range(3):  # made before index_template was on
        status, said = await cluster.call("PUT", f"/k8s-events-ns-{ns}", {})
        assert status == 200, said
    async with Front(cluster.url) as front:
        with caplog.at_level(logging.WARNING, logger=LOG):
            async with running_sink(
                front.url, index="k8s-events-{namespace}", index_template=True, include_raw=True
            ) as sink:
                front.on = True
                batch = [occurrence(labels=DOTTED, name=f"e{i}", namespace=f"ns-{i % 3}") for i in range(6)]
                for _ in range(3):
                    outcomes = await sink.send(batch)
                    assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 6
                    clear_caches()  # as the router does after a burst
    assert front.reads == 1
    said = sorted(warnings(caplog))
    assert len(said) == 3 and all("exists without the mappings" in w for w in said), said


class SmallMemory(ElasticsearchSink):
    judged_max = 2


async def test_judgments_past_their_bound_are_forgotten_oldest_first(cluster: Cluster) -> None:
    """Past its bound the cache of judgments was emptied whole: every active index read again."""
    async with (
        Front(cluster.url) as front,
        running_sink(
            front.url, kind=SmallMemory, index="k8s-{namespace}", index_template=True, include_raw=True
        ) as sink,
    ):
        front.on = True
        occs = [occurrence(labels=DOTTED, name=f"e{i}", namespace=f"ns-{i}") for i in range(3)]
        for occ in occs:
            await delivered(sink, occ)
        assert front.reads == 3
        for occ in occs[1:]:
            await delivered(sink, occ)
        assert front.reads == 3  # the two latest kept
        await delivered(sink, occs[0])
        assert front.reads == 4


async def test_names_read_together_are_judged_by_the_indices_their_aliases_hold(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """One read judges many names: an alias by every index it holds, a name not there as one the
    template makes (kept as before the names were read together)."""
    ours = {"mappings": {"properties": {"raw": {"type": "object", "enabled": False}}}}
    for index, body in (("k8s-a-1", ours), ("k8s-b-1", {})):
        status, said = await cluster.call("PUT", f"/{index}", body)
        assert status == 200, said
    actions = [
        {"add": {"index": "k8s-a-1", "alias": "k8s-ours", "is_write_index": True}},
        {"add": {"index": "k8s-b-1", "alias": "k8s-theirs", "is_write_index": True}},
    ]
    status, said = await cluster.call("POST", "/_aliases", {"actions": actions})
    assert status == 200, said
    async with Front(cluster.url) as front:
        with caplog.at_level(logging.WARNING, logger=LOG):
            async with running_sink(
                front.url, index="k8s-{namespace}", index_template=True, include_raw=True
            ) as sink:
                front.on = True
                batch = [occurrence(labels=DOTTED, name=ns, namespace=ns) for ns in ("ours", "theirs", "new")]
                outcomes = await sink.send(batch)
                assert [o.kind for o in outcomes or []] == [OutcomeKind.OK] * 3
    assert front.reads == 1
    assert await raw_labels(cluster, "k8s-a-1", batch[0]) == DOTTED
    assert await raw_labels(cluster, "k8s-b-1", batch[1]) == REPLACED
    assert await raw_labels(cluster, "k8s-new", batch[2]) == DOTTED
    (warning,) = warnings(caplog)
    assert "index k8s-theirs exists without the mappings" in warning, warning
