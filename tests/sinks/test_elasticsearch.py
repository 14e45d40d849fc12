"""Elasticsearch/OpenSearch sink against the real osmem-server (OpenSearch 3.x-compatible, from PyPI).

Whole-request faults (429/5xx/401/413) and the Authorization header are checked against a small
aiohttp server on loopback that answers like Elasticsearch does (osmem has no security or throttling).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web
from elasticsearch import ApiError, AsyncElasticsearch
from pydantic import ValidationError

from eventrouter import Occurrence, Outcome, OutcomeKind, RetryableError, SinkContext, SinkError, normalise
from eventrouter.config import parse_sink_flag, spec_for_class
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import event_object, recorded_watch
from eventrouter.testing.pipelines import dead_letter, pipeline_for
from eventrouter.testing.receivers.osmem import Cluster
from eventrouter.testing.receivers.silent import SilentServer
from eventrouter.testing.tls import certificate, server_context
from eventrouter_sinks.elasticsearch import ElasticsearchOptions, ElasticsearchSink

SECRET = "s3cr3t-Pa55-do-not-log"


# ------------------------------------------------------------------------------------------ helpers


def recorded_occurrences() -> list[Occurrence]:
    """Every occurrence in the recorded watch: ADDED/MODIFIED whose occurrence number rose."""
    seen: dict[str, int] = {}
    out = []
    for event in recorded_watch():
        if event["type"] not in ("ADDED", "MODIFIED"):
            continue
        occ = normalise(event["object"], cluster="rec")
        if occ.number > seen.get(occ.uid, 0):
            seen[occ.uid] = occ.number
            out.append(occ)
    return out


def occurrence(*, labels: dict[str, str] | None = None, **kwargs: Any) -> Occurrence:
    obj = event_object(**kwargs)
    if labels is not None:
        obj["metadata"]["labels"] = labels
    return normalise(obj, cluster="test")


@asynccontextmanager
async def running_sink(url: str, **options: Any) -> AsyncIterator[ElasticsearchSink]:
    opts = ElasticsearchOptions.model_validate({"url": url, **options})
    sink = ElasticsearchSink(opts, SinkContext("es", "test", None, logging.getLogger("test.es")))
    await sink.start()
    try:
        yield sink
    finally:
        await sink.aclose()


async def send(sink: ElasticsearchSink, batch: list[Occurrence]) -> list[Outcome]:
    outcomes = await sink.send(batch)
    assert outcomes is not None and len(outcomes) == len(batch)
    return list(outcomes)


def outcome_kinds(outcomes: Any) -> list[OutcomeKind]:
    return [o.kind for o in outcomes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------ osmem


async def _check(flag: str) -> tuple[int | None, str]:
    """``eventrouter check`` of one sink, as an operator runs it: its exit code and output."""
    check = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "eventrouter.cli",
        "check",
        flag,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(check.communicate(), 60))[0].decode()
    return check.returncode, output


async def test_recorded_occurrences_read_back_by_id_and_by_search(cluster: Cluster) -> None:
    occs = recorded_occurrences()
    assert len(occs) == 126
    async with running_sink(cluster.url, index="k8s-events-{yyyy.MM.dd}", index_template=True) as sink:
        outcomes = await send(sink, occs)
    assert outcome_kinds(outcomes) == [OutcomeKind.OK] * len(occs)

    for occ in occs:
        index = "k8s-events-" + occ.record["time"][:10].replace("-", ".")
        status, doc = await cluster.call("GET", f"/{index}/_doc/{occ.uid}-{occ.number}")
        assert status == 200 and doc["found"], (occ.key, doc)
        source = doc["_source"]
        assert source["@timestamp"][:19] == occ.record["time"][:19]
        assert source["@timestamp"].endswith("Z") and "." in source["@timestamp"]
        assert {k: v for k, v in source.items() if k != "@timestamp"} == occ.record

    assert await cluster.count("k8s-events-*") == len(occs)
    backoffs = sum(1 for o in occs if o.record["reason"] == "BackOff")
    assert backoffs > 0
    assert await cluster.count("k8s-events-*", {"term": {"reason": "BackOff"}}) == backoffs
    # @timestamp is a date: a range query over the recording's span finds every document.
    first, last = min(o.time_ns for o in occs) // 10**9, max(o.time_ns for o in occs) // 10**9 + 1
    span = {"range": {"@timestamp": {"gte": first * 1000, "lte": last * 1000, "format": "epoch_millis"}}}
    assert await cluster.count("k8s-events-*", span) == len(occs)


async def test_high_level_client_bulk_is_refused_which_is_why_the_sink_uses_the_transport(
    cluster: Cluster,
) -> None:
    # The client's compat media type (application/vnd.elasticsearch+x-ndjson; compatible-with=8) → 406.
    client = AsyncElasticsearch(cluster.url)
    try:
        with pytest.raises(ApiError) as info:
            await client.bulk(operations=[{"index": {"_index": "compat"}}, {"a": 1}])
        assert info.value.meta.status == 406
    finally:
        await client.close()
    async with running_sink(cluster.url, index="compat") as sink:
        assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]


async def test_index_template_maps_keywords_text_and_dates(cluster: Cluster) -> None:
    async with running_sink(cluster.url, index="tpl-{yyyy.MM.dd}", index_template=True) as sink:
        assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]
    status, body = await cluster.call("GET", "/_index_template/eventrouter-k8s-events")
    assert status == 200
    assert body["index_templates"][0]["index_template"]["index_patterns"] == ["tpl-*"]
    status, body = await cluster.call("GET", "/tpl-*/_mapping")
    props = next(iter(body.values()))["mappings"]["properties"]
    for name in ("namespace", "reason", "type", "name", "uid", "cluster", "reporting_component"):
        assert props[name]["type"] == "keyword", name
    assert props["involved_object"]["properties"]["kind"]["type"] == "keyword"
    assert props["message"]["type"] == "text" and props["message"]["fields"]["keyword"]["type"] == "keyword"
    for name in ("@timestamp", "first_time", "last_time"):
        assert props[name]["type"] == "date", name


async def test_redelivery_overwrites_instead_of_duplicating(cluster: Cluster) -> None:
    occs = recorded_occurrences()
    async with running_sink(cluster.url, index="redeliver") as sink:
        assert outcome_kinds(await sink.send(occs)) == [OutcomeKind.OK] * len(occs)
        assert outcome_kinds(await sink.send(occs)) == [OutcomeKind.OK] * len(occs)
        assert outcome_kinds(await sink.send(occs[:10])) == [OutcomeKind.OK] * 10
    assert await cluster.count("redeliver") == len(occs)
    # index action: the re-delivered document replaced the first one (_version 3 for the first ten).
    _, doc = await cluster.call("GET", f"/redeliver/_doc/{occs[0].uid}-{occs[0].number}")
    assert doc["_version"] == 3


async def test_create_redelivery_conflicts_count_as_delivered(cluster: Cluster) -> None:
    occs = recorded_occurrences()[:40]
    async with running_sink(cluster.url, index="created", op_type="create") as sink:
        assert outcome_kinds(await sink.send(occs)) == [OutcomeKind.OK] * len(occs)
        # The server answers 409 version_conflict for each: the documents are already there.
        assert outcome_kinds(await sink.send(occs)) == [OutcomeKind.OK] * len(occs)
    assert await cluster.count("created") == len(occs)
    _, doc = await cluster.call("GET", f"/created/_doc/{occs[0].uid}-{occs[0].number}")
    assert doc["_version"] == 1  # untouched by the re-delivery


async def test_document_the_index_rejects_gets_server_reason_rest_ok(cluster: Cluster) -> None:
    status, body = await cluster.call(
        "PUT", "/strict", {"mappings": {"properties": {"reason": {"type": "long"}}}}
    )
    assert status == 200, body
    batch = [occurrence(reason="42"), occurrence(reason="BackOff"), occurrence(reason="7")]
    async with running_sink(cluster.url, index="strict") as sink:
        outcomes = await send(sink, batch)
    assert outcome_kinds(outcomes) == [OutcomeKind.OK, OutcomeKind.REJECT, OutcomeKind.OK]
    reason = outcomes[1].reason
    assert reason.startswith("400 mapper_parsing_exception: failed to parse field [reason] of type [long]")
    assert await cluster.count("strict") == 2


async def test_data_stream_mode_creates_and_redelivery_is_ok(cluster: Cluster) -> None:
    # osmem 0.1.6 has no data streams (PUT /_data_stream → 400 "data streams are not supported by
    # osmem"); without a data_stream template it stores the creates in a plain index of that name,
    # which still exercises the sink's data-stream path: constant target, create actions, 409 → OK.
    occs = recorded_occurrences()[:30]
    async with running_sink(cluster.url, data_stream="k8s-events-ds") as sink:
        assert outcome_kinds(await sink.send(occs)) == [OutcomeKind.OK] * len(occs)
        assert outcome_kinds(await sink.send(occs)) == [OutcomeKind.OK] * len(occs)
    assert await cluster.count("k8s-events-ds") == len(occs)
    _, doc = await cluster.call("GET", f"/k8s-events-ds/_doc/{occs[3].uid}-{occs[3].number}")
    assert doc["_version"] == 1 and doc["_source"]["@timestamp"]


async def test_data_stream_template_installed_and_osmem_refusal_reported_per_item(cluster: Cluster) -> None:
    async with running_sink(cluster.url, data_stream="events-ds", index_template=True) as sink:
        _, body = await cluster.call("GET", "/_index_template/eventrouter-k8s-events")
        template = body["index_templates"][0]["index_template"]
        assert template["index_patterns"] == ["events-ds"] and "data_stream" in template
        outcomes = await send(sink, [occurrence(), occurrence()])
    # A real cluster creates the data stream here; osmem refuses, and the sink passes its reason on.
    assert outcome_kinds(outcomes) == [OutcomeKind.REJECT] * 2
    assert (
        outcomes[0].reason == "400 unsupported_operation_exception: data streams are not supported by osmem"
    )


async def test_dotted_label_keys_indexed_without_mapping_conflicts(cluster: Cluster) -> None:
    batch = [
        occurrence(labels={"app": "web"}),
        occurrence(labels={"app.kubernetes.io/name": "web", "app.kubernetes.io/part-of": "shop"}),
    ]
    async with running_sink(cluster.url, index="dots") as sink:
        assert outcome_kinds(await sink.send(batch)) == [OutcomeKind.OK, OutcomeKind.OK]
    _, doc = await cluster.call("GET", f"/dots/_doc/{batch[1].uid}-1")
    assert doc["_source"]["labels"] == {"app_kubernetes_io/name": "web", "app_kubernetes_io/part-of": "shop"}
    assert await cluster.count("dots", {"term": {"labels.app_kubernetes_io/name": "web"}}) == 1

    # The conflict is real: keeping the dots makes the second document clash with `labels.app`.
    async with running_sink(cluster.url, index="dots-kept", dot_replacement=".") as sink:
        outcomes = await send(sink, batch)
    assert outcome_kinds(outcomes) == [OutcomeKind.OK, OutcomeKind.REJECT]
    assert "labels.app" in outcomes[1].reason


async def test_label_keys_equal_after_dot_replacement_keep_both_values(cluster: Cluster) -> None:
    """`team.io` and `team_io` are both valid label keys; after replacing the dot one value replaced
    the other without a word."""
    labels = {"team.io": "payments", "team_io": "legacy", "a.b": "1", "a_b_2": "2"}
    occ = occurrence(labels=labels)
    async with running_sink(cluster.url, index="dots-twice", include_raw=True) as sink:
        assert outcome_kinds(await sink.send([occ])) == [OutcomeKind.OK]
    _, doc = await cluster.call("GET", f"/dots-twice/_doc/{occ.uid}-1")
    expected = {"team_io_2": "payments", "team_io": "legacy", "a_b": "1", "a_b_2": "2"}
    assert doc["_source"]["labels"] == expected
    assert doc["_source"]["raw"]["metadata"]["labels"] == expected


async def test_daily_index_names_come_from_event_time(cluster: Cluster) -> None:
    late = occurrence(first_timestamp="2024-02-28T23:59:59Z", last_timestamp="2024-02-28T23:59:59Z")
    leap = occurrence(first_timestamp="2024-02-29T00:00:00Z", last_timestamp="2024-02-29T00:00:00Z")
    micro = occurrence(count=None, event_time="2024-03-01T10:20:30.123456Z", namespace="kube-system")
    async with running_sink(cluster.url) as sink:
        assert outcome_kinds(await sink.send([late, leap, micro])) == [OutcomeKind.OK] * 3
    for occ, index, stamp in (
        (late, "k8s-events-2024.02.28", "2024-02-28T23:59:59.000Z"),
        (leap, "k8s-events-2024.02.29", "2024-02-29T00:00:00.000Z"),
        (micro, "k8s-events-2024.03.01", "2024-03-01T10:20:30.123456Z"),
    ):
        status, doc = await cluster.call("GET", f"/{index}/_doc/{occ.uid}-1")
        assert status == 200, (index, doc)
        assert doc["_source"]["@timestamp"] == stamp

    async with running_sink(cluster.url, index="ev-{namespace}-{yyyy.MM}") as sink:
        assert outcome_kinds(await sink.send([micro])) == [OutcomeKind.OK]
    status, doc = await cluster.call("GET", f"/ev-kube-system-2024.03/_doc/{micro.uid}-1")
    assert status == 200


async def test_index_names_from_long_field_values_are_cut_to_255_bytes_and_stay_distinct(
    cluster: Cluster,
) -> None:
    """Elasticsearch and OpenSearch refuse an index name over 255 bytes; an Event name of a
    240-character object (legal in Kubernetes) gave one, and every document of it was dead-lettered."""
    names = ["short.1", "x" * 240 + ".17a2b3c4d5e6f708", "x" * 240 + ".17a2b3c4d5e6f709", "ü" * 120 + ".1"]
    batch = [occurrence(name=name, last_timestamp="2024-03-01T10:00:00Z") for name in names]
    async with running_sink(
        cluster.url, index="k8s-events-{involved_object.kind}-{name}-{yyyy.MM.dd}"
    ) as sink:
        assert outcome_kinds(await send(sink, batch)) == [OutcomeKind.OK] * 4
        indices = [sink._index_name(occ) for occ in batch]
    assert indices[0] == "k8s-events-pod-short.1-2024.03.01"
    assert [len(i.encode()) for i in indices[1:]] == [255, 255, 255]
    assert len(set(indices)) == 4  # the two names that differ only past the cut stay apart
    assert all(i.startswith("k8s-events-pod-") and i.endswith("-2024.03.01") for i in indices)
    for index in indices:
        assert await cluster.count(quote(index, safe="")) == 1


def test_an_index_template_whose_fixed_text_leaves_no_room_is_refused() -> None:
    with pytest.raises(ValidationError, match="over 255 bytes"):
        ElasticsearchOptions.model_validate(
            {"url": "http://a", "index": "e" * 240 + "-{namespace}-{yyyy.MM.dd}"}
        )
    with pytest.raises(ValidationError, match="over 255 bytes"):
        ElasticsearchOptions.model_validate({"url": "http://a", "index": "e" * 256})
    with pytest.raises(ValidationError, match="over 255 bytes"):
        ElasticsearchOptions.model_validate({"url": "http://a", "data_stream": "logs-" + "e" * 251})
    assert ElasticsearchOptions.model_validate({"url": "http://a", "index": "e" * 244 + "-{namespace}"})


@pytest.mark.parametrize(
    ("index", "pattern"), [("{namespace}", "*"), ("{cluster}-events-{yyyy.MM.dd}", "*-events-*")]
)
def test_index_template_with_an_index_beginning_with_a_placeholder_is_refused(
    index: str, pattern: str
) -> None:
    """The installed template's pattern (``*``, ``*-events-*``) at priority 200 matched other
    applications' indices, whose templates it replaced (the built-in logs-*-* is at 100): refused,
    naming both options. Such an index without index_template stays valid."""
    options = {"url": "http://a", "index": index}
    with pytest.raises(ValidationError) as info:
        ElasticsearchOptions.model_validate({**options, "index_template": True})
    assert (
        f"index_template=true with index {index!r}: the template's pattern would be {pattern!r}, which "
        "matches other applications' indices too; at template_priority=200"
    ) in str(info.value)
    assert ElasticsearchOptions.model_validate(options).index == index
    fixed = {"url": "http://a", "index": f"k8s-{index}", "index_template": True}
    assert ElasticsearchOptions.model_validate(fixed).index_template


async def test_unencodable_and_oversized_items_rejected_rest_ok(cluster: Cluster) -> None:
    bad = occurrence(message="broken \udcff surrogate")
    huge = occurrence(message="x" * 20_000)
    good = occurrence()
    async with running_sink(cluster.url, index="bad-input", max_document_bytes=8192) as sink:
        outcomes = await send(sink, [bad, good, huge])
    assert outcome_kinds(outcomes) == [OutcomeKind.REJECT, OutcomeKind.OK, OutcomeKind.REJECT]
    assert "cannot encode as JSON" in outcomes[0].reason
    assert "max_document_bytes=8192" in outcomes[2].reason
    assert await cluster.count("bad-input") == 1


async def test_start_against_dead_port_raises_sink_error() -> None:
    port = free_port()
    opts = ElasticsearchOptions.model_validate({"url": f"http://elastic:{SECRET}@127.0.0.1:{port}"})
    sink = ElasticsearchSink(opts, SinkContext("es", "test", None, logging.getLogger("test.es")))
    with pytest.raises(SinkError) as info:
        await sink.start()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert SECRET not in str(info.value)
    await sink.aclose()
    await sink.aclose()


async def test_send_after_cluster_went_away_is_retryable() -> None:
    server = FakeBulkServer()
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with running_sink(url) as sink:
            await runner.cleanup()
            with pytest.raises(RetryableError, match="bulk request failed: ConnectionError"):
                await sink.send([occurrence()])
    finally:
        await runner.cleanup()


async def test_several_nodes_one_dead(cluster: Cluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_sink(f"{dead},{cluster.url}") as sink:
        # Round-robin may pick the dead node once; it is then marked dead and the live one serves.
        failures = 0
        for _ in range(3):
            try:
                outcomes = await send(sink, [occurrence()])
                break
            except RetryableError:
                failures += 1
        assert failures <= 1
        assert outcome_kinds(outcomes) == [OutcomeKind.OK]


# ------------------------------------------------------------------------------------------ faults/auth


@dataclass
class FakeBulkServer:
    """Answers like Elasticsearch 8: GET /, POST /_bulk (NDJSON), security (401) and content limits."""

    url: str = ""
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    auth: str | None = None
    responses: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    item_status: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    max_content_length: int = 100 * 1024 * 1024
    bulk_sizes: list[int] = field(default_factory=list)
    bulk_times: list[float] = field(default_factory=list)  # time.monotonic() of each POST /_bulk
    monitor: bool = True  # the user holds the `monitor` cluster privilege (GET /)
    auto_create: bool = True  # action.auto_create_index
    indices: set[str] = field(default_factory=set)  # existing indices
    # index → the action the user's role is not granted on it: "indices:data/write/bulk[s]" (no
    # write/create_doc privilege) or "indices:admin/auto_create" (no create_index/auto_configure)
    denied: dict[str, str] = field(default_factory=dict)
    # The error a new index is refused with: the cluster is at cluster.max_shards_per_node (400).
    shard_limit: dict[str, str] | None = None
    red: set[str] = field(default_factory=set)  # indices whose primary shard is not active
    accepted_ids: list[str] = field(default_factory=list)  # _id of each document answered 2xx
    delay: float = 0.0  # seconds each bulk request takes to answer (a busy cluster)
    bulk_indices: list[set[str]] = field(default_factory=list)  # the indices of each request's documents

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_content_length * 2)
        app.router.add_get("/", self.root)
        app.router.add_post("/_bulk", self.bulk)
        return app

    def _denied(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        if self.auth is not None and request.headers.get("authorization") != self.auth:
            error = {"type": "security_exception", "reason": "unable to authenticate user [elastic]"}
            return web.json_response(
                {"error": {**error, "root_cause": [error]}, "status": 401},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="security" charset="UTF-8"'},
            )
        return None

    async def root(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied:
            return denied
        if not self.monitor:
            reason = (
                "action [cluster:monitor/main] is unauthorized for user [writer] with effective roles "
                "[events_writer], this action is granted by the cluster privileges [monitor,manage,all]"
            )
            error = {"type": "security_exception", "reason": reason}
            return web.json_response({"error": {**error, "root_cause": [error]}, "status": 403}, status=403)
        return web.json_response(
            {
                "name": "n1",
                "cluster_name": "c",
                "version": {"number": "8.15.0"},
                "tagline": "You Know, for Search",
            },
            headers={"X-Elastic-Product": "Elasticsearch"},
        )

    async def bulk(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied:
            return denied
        body = await request.read()
        self.bulk_sizes.append(len(body))
        self.bulk_times.append(time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        if len(body) > self.max_content_length:
            return web.Response(status=413)
        if self.responses:
            status, headers, payload = self.responses.pop(0)
            if isinstance(payload, str):  # a proxy in front of the cluster answering with a text page
                return web.Response(text=payload, status=status, headers=headers)
            return web.json_response(payload, status=status, headers=headers)
        if request.content_type not in ("application/x-ndjson", "application/json"):
            return web.json_response({"error": "Content-Type not supported", "status": 406}, status=406)
        lines = body.split(b"\n")
        assert lines[-1] == b"", "bulk body must end with a newline"
        items = []
        self.bulk_indices.append(set())
        for action_line in lines[:-1:2]:
            ((action, meta),) = orjson.loads(action_line).items()
            self.bulk_indices[-1].add(meta["_index"])
            status, error = self.item_status.get(meta["_id"], None) or self._item_answer(meta["_index"])
            item: dict[str, Any] = {"_index": meta["_index"], "_id": meta["_id"], "status": status}
            if 200 <= status < 300:
                self.accepted_ids.append(meta["_id"])
            if error:
                item["error"] = error
            items.append({action: item})
        errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
        return web.json_response({"took": 1, "errors": errors, "items": items})

    def _item_answer(self, index: str) -> tuple[int, dict[str, str]]:
        """Status and error of a write to ``index`` as Elasticsearch 8 answers it in a bulk item."""
        creating = index not in self.indices
        action = self.denied.get(index)
        if action == "indices:admin/auto_create" and not creating:
            action = None
        if action is not None:
            granted = {
                "indices:admin/auto_create": "auto_configure,create_index,manage,all",
                "indices:data/write/bulk[s]": "create_doc,create,index,write,all",
            }[action]
            reason = (
                f"action [{action}] is unauthorized for user [writer] with effective roles "
                f"[events_writer] on indices [{index}], this action is granted by the index "
                f"privileges [{granted}]"
            )
            return 403, {"type": "security_exception", "reason": reason}
        if creating and not self.auto_create:
            reason = f"no such index [{index}] and [action.auto_create_index] is [false]"
            return 404, {
                "type": "index_not_found_exception",
                "reason": reason,
                "index_uuid": "_na_",
                "index": index,
            }
        if creating and self.shard_limit is not None:
            return 400, self.shard_limit
        if index in self.red:  # after the bulk request's `timeout`
            reason = (
                f"[{index}][0] primary shard is not active Timeout: [1m], request: "
                f"[BulkShardRequest [[{index}][0]] containing [1] requests]"
            )
            return 503, {"type": "unavailable_shards_exception", "reason": reason}
        self.indices.add(index)
        return 201, {}


@pytest.fixture
async def fake() -> AsyncIterator[FakeBulkServer]:
    server = FakeBulkServer()
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_whole_request_429_and_5xx_are_retryable_with_retry_after(fake: FakeBulkServer) -> None:
    rejected = {
        "error": {"type": "es_rejected_execution_exception", "reason": "rejected execution"},
        "status": 429,
    }
    fake.responses = [
        (429, {"Retry-After": "7"}, rejected),
        (503, {}, {"error": "unavailable", "status": 503}),
    ]
    async with running_sink(fake.url) as sink:
        with pytest.raises(RetryableError) as info:
            await sink.send([occurrence()])
        assert info.value.retry_after == 7.0
        assert "bulk answered 429: es_rejected_execution_exception: rejected execution" in info.value.reason
        with pytest.raises(RetryableError) as info:
            await sink.send([occurrence()])
        assert "503" in info.value.reason
        assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]
    # One request per send: the transport did not retry behind the engine's back.
    assert [r[0] for r in fake.requests] == ["GET", "POST", "POST", "POST"]


async def test_a_proxy_text_error_page_is_retried_with_its_text(fake: FakeBulkServer) -> None:
    opts = ElasticsearchOptions.model_validate({"url": fake.url})
    sink = ElasticsearchSink(opts, SinkContext("es", "test", None, logging.getLogger("test.es")))
    await sink.start()
    try:
        fake.responses = [(502, {}, "502 Bad Gateway: upstream es-0 unavailable")]
        with pytest.raises(RetryableError) as err:
            await sink.send(recorded_occurrences()[:3])
        # The page is read as text (not a deserialization failure), so the status decides.
        assert (
            err.value.reason == "elasticsearch: bulk answered 502: 502 Bad Gateway: upstream es-0 unavailable"
        )
    finally:
        await sink.aclose()


async def test_item_level_429_retried_5xx_retried_4xx_rejected(fake: FakeBulkServer) -> None:
    batch = [occurrence() for _ in range(4)]
    fake.item_status = {
        f"{batch[0].uid}-1": (429, {"type": "es_rejected_execution_exception", "reason": "queue full"}),
        f"{batch[1].uid}-1": (400, {"type": "document_parsing_exception", "reason": "bad field"}),
        f"{batch[3].uid}-1": (503, {"type": "unavailable_shards_exception", "reason": "primary shard"}),
    }
    async with running_sink(fake.url) as sink:
        outcomes = await send(sink, batch)
    assert outcome_kinds(outcomes) == [
        OutcomeKind.RETRY,
        OutcomeKind.REJECT,
        OutcomeKind.OK,
        OutcomeKind.RETRY,
    ]
    assert outcomes[0].reason == "429 es_rejected_execution_exception: queue full"
    assert not outcomes[0].defer  # a busy node's write queue: passing, retried in place
    assert outcomes[1].reason == "400 document_parsing_exception: bad field"


async def test_the_flood_stage_disk_block_of_elasticsearch_before_7_6_is_retried_a_write_block_rejected(
    fake: FakeBulkServer,
) -> None:
    """Since session 28 the disk block is set aside (the other indices go on, see
    test_elasticsearch_blocks.py); the cluster-wide one is retried in place, and a write block named
    beside the disk block stays a rejection (lifting the disk block leaves it)."""
    batch = [occurrence() for _ in range(4)]
    disk = "index [e] blocked by: [FORBIDDEN/12/index read-only / allow delete (api)];"
    manual = "index [e] blocked by: [FORBIDDEN/8/index write (api)];"
    both = "index [e] blocked by: [FORBIDDEN/8/index write (api), FORBIDDEN/12/index read-only / allow delete (api)];"
    cluster = "blocked by: [FORBIDDEN/13/cluster read-only / allow delete (api)];"
    fake.item_status = {
        f"{occ.uid}-1": (403, {"type": "cluster_block_exception", "reason": reason})
        for occ, reason in zip(batch, (disk, manual, both, cluster), strict=True)
    }
    async with running_sink(fake.url) as sink:
        outcomes = await send(sink, batch)
    assert outcome_kinds(outcomes) == [
        OutcomeKind.RETRY,
        OutcomeKind.REJECT,
        OutcomeKind.REJECT,
        OutcomeKind.RETRY,
    ]
    assert outcomes[0].reason == f"403 cluster_block_exception: {disk}"
    assert outcomes[0].defer and not outcomes[3].defer


async def test_an_operators_block_beside_the_disk_block_is_rejected_though_answered_429(
    fake: FakeBulkServer,
) -> None:
    """Elasticsearch 7.6+ and OpenSearch answer an item the highest status of the blocks named: a
    write-blocked index (ILM's readonly) past the flood-stage watermark is answered 429, so it was
    retried in place, holding up every other index while the disk stayed full, then rejected (403)
    once the disk block was lifted. Rejected at once now; a passing block beside the disk block (no
    master, 503) is still retried."""
    batch = [occurrence() for _ in range(3)]
    flood = "TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete block"
    write = f"index [e] blocked by: [FORBIDDEN/8/index write (api), {flood}];"
    read_only = f"index [e] blocked by: [FORBIDDEN/5/index read-only (api), {flood}];"
    no_master = f"index [e] blocked by: [SERVICE_UNAVAILABLE/2/no master, {flood}];"
    fake.item_status = {
        f"{occ.uid}-1": (status, {"type": "cluster_block_exception", "reason": reason})
        for occ, (status, reason) in zip(
            batch, [(429, write), (429, read_only), (503, no_master)], strict=True
        )
    }
    async with running_sink(fake.url) as sink:
        outcomes = await send(sink, batch)
    assert outcome_kinds(outcomes) == [OutcomeKind.REJECT, OutcomeKind.REJECT, OutcomeKind.RETRY]
    assert outcomes[0].reason == f"429 cluster_block_exception: {write}"
    assert outcomes[1].reason == f"429 cluster_block_exception: {read_only}"


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The sink's error lines about refusals the operator has to put right."""
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "put right" in r.getMessage()
    ]


async def test_an_index_the_cluster_does_not_create_is_retried_until_it_exists(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    """action.auto_create_index=false: Elasticsearch answers each item 404 index_not_found_exception.
    Every document of that index was dead-lettered, though the same documents go in once the
    operator creates the index (as the whole request's 401/403/404 was already retried)."""
    caplog.set_level(logging.INFO)
    fake.auto_create = False
    fake.indices = {"other"}
    batch = [occurrence() for _ in range(3)]
    fake.item_status = {f"{batch[2].uid}-1": (400, {"type": "document_parsing_exception", "reason": "bad"})}
    async with running_sink(fake.url, index="events") as sink:
        outcomes = await send(sink, batch)
        # A document the cluster refuses for its own content is still dead-lettered at once.
        assert outcome_kinds(outcomes) == [OutcomeKind.RETRY, OutcomeKind.RETRY, OutcomeKind.REJECT]
        assert outcomes[0].retry_after is None  # the engine's backoff applies
        assert outcomes[0].reason == (
            "404 index_not_found_exception: no such index [events] and [action.auto_create_index] is [false]"
        )
        for _ in range(2):  # the engine's retries
            assert outcome_kinds(await send(sink, batch[:2])) == [OutcomeKind.RETRY] * 2
        fake.indices.add("events")  # the operator creates the index
        assert outcome_kinds(await send(sink, batch[:2])) == [OutcomeKind.OK] * 2
    assert refusals(caplog) == [
        "es: index events does not exist and the cluster does not create it (index_not_found_exception: "
        "no such index [events] and [action.auto_create_index] is [false]); create it, or allow its "
        "automatic creation (action.auto_create_index, an index template); its documents are retried "
        "(up to retry_max_attempts, if set) until that is put right"
    ]
    assert "es: index events accepts documents again" in caplog.text


async def test_a_role_without_create_index_or_write_privilege_is_retried_until_granted(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A bulk item answered 403 security_exception: the role lacks create_index (auto-creating the
    day's index) or write/create_doc on it. Each was dead-lettered; now retried, logged once per
    cause naming the index and the privileges that would grant it."""
    caplog.set_level(logging.INFO)
    fake.denied = {"events": "indices:admin/auto_create"}
    async with running_sink(fake.url, index="events") as sink:
        for _ in range(2):
            assert outcome_kinds(await send(sink, [occurrence()])) == [OutcomeKind.RETRY]
        fake.indices.add("events")  # an admin created it; the role still may not write to it
        fake.denied = {"events": "indices:data/write/bulk[s]"}
        for _ in range(2):
            outcomes = await send(sink, [occurrence()])
            assert outcome_kinds(outcomes) == [OutcomeKind.RETRY]
        assert outcomes[0].reason.startswith(
            "403 security_exception: action [indices:data/write/bulk[s]] is unauthorized for user [writer]"
        )
        fake.denied = {}  # the privilege is granted
        assert outcome_kinds(await send(sink, [occurrence()])) == [OutcomeKind.OK]
    logged = refusals(caplog)
    assert len(logged) == 2, logged
    assert logged[0].startswith(
        "es: index events does not exist and the user's role may not create it: indices:admin/auto_create "
        "needs one of the index privileges auto_configure,create_index,manage,all (security_exception: "
    )
    assert logged[1].startswith(
        "es: the user's role lacks a privilege on index events: indices:data/write/bulk[s] needs one of "
        "the index privileges create_doc,create,index,write,all (security_exception: "
    )


def _engine(url: str, index: str, metrics: Metrics, deadletter: Path | None, **options: Any) -> Pipeline:
    """The sink behind the engine's own pipeline (its backoff, its set-aside retries)."""

    sink = ElasticsearchSink(
        ElasticsearchOptions.model_validate({"url": url, "index": index}),
        SinkContext("es", "test", None, logging.getLogger("test.es")),
    )
    return pipeline_for("es", sink, metrics, deadletter, **options)


async def test_per_item_refusals_back_off_mark_the_sink_down_and_end_after_retry_max_attempts(
    fake: FakeBulkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the engine: per-item 404s are retried with its backoff (no hot loop), the sink counts
    as down, retry_max_attempts still dead-letters them, and the cause is logged once."""
    from eventrouter.testing.waiting import until

    fake.auto_create = False
    metrics = Metrics()
    options = {"retry_initial_backoff": 0.2, "retry_max_backoff": 0.4, "retry_max_attempts": 3}
    p = _engine(fake.url, "events", metrics, tmp_path / "dl", **options)
    task = asyncio.create_task(p.run())
    p.offer(occurrence())
    exhausted = metrics.dead_lettered.labels("es", "retries_exhausted")
    await until(lambda: exhausted._value.get() == 1)
    assert metrics.sink_up.labels("es")._value.get() == 0
    p.close()
    await asyncio.wait_for(task, 10)
    await p.close_sink()
    assert metrics.dead_lettered.labels("es", "rejected")._value.get() == 0
    assert metrics.retries.labels("es")._value.get() == 2
    # Three attempts, each after the engine's backoff (equal jitter: at least half the base delay).
    times = fake.bulk_times
    assert len(times) == 3
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2
    (record,) = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert record["reason"] == (
        "retries exhausted after 3 attempts: 404 index_not_found_exception: no such index [events] "
        "and [action.auto_create_index] is [false]"
    )
    assert len(refusals(caplog)) == 1


async def test_an_index_the_role_may_not_write_holds_up_no_other_index(fake: FakeBulkServer) -> None:
    """``index=events-{namespace}``: namespace b's index refused (the role lacks the privilege) is set
    aside while a's documents go in, and goes in once the privilege is granted. Before, the engine
    retried b's document in place and sent nothing else meanwhile."""
    from eventrouter.testing.waiting import until

    fake.denied["events-b"] = "indices:data/write/bulk[s]"
    metrics = Metrics()
    p = _engine(
        fake.url, "events-{namespace}", metrics, None, retry_initial_backoff=0.05, retry_max_backoff=0.1
    )
    task = asyncio.create_task(p.run())
    delivered = metrics.delivered.labels("es")
    b = occurrence(namespace="b")
    p.offer(b)
    await until(lambda: metrics.retries.labels("es")._value.get() >= 1)
    for i in range(1, 11):
        p.offer(occurrence(namespace="a", object_name=f"a-{i}"))
        want = float(i)
        await until(lambda: delivered._value.get() == want)  # noqa: B023 - awaited before the next turn
    assert "events-a" in fake.indices and p.checkpoint.accepted(b.uid) == 0
    del fake.denied["events-b"]
    await until(lambda: p.checkpoint.accepted(b.uid) == b.number)
    assert delivered._value.get() == 11
    p.close()
    await asyncio.wait_for(task, 10)
    await p.close_sink()


async def test_a_refusal_set_aside_is_logged_once_while_other_indices_go_on(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Index b is missing (auto-create off): its document is set aside (item 82) and retried while
    batches for index a go in. A batch without a refusal made the sink forget b's, so b's cause was
    logged again at every retry (120-240 ERROR lines an hour at the default backoff). Now once; again
    only after b accepted a document and is refused anew."""
    from eventrouter.testing.waiting import until

    caplog.set_level(logging.INFO)
    fake.auto_create = False
    fake.indices = {"events-a"}
    metrics = Metrics()
    p = _engine(
        fake.url, "events-{namespace}", metrics, None, retry_initial_backoff=0.01, retry_max_backoff=0.02
    )
    task = asyncio.create_task(p.run())
    delivered = metrics.delivered.labels("es")
    retries = metrics.retries.labels("es")
    b = occurrence(namespace="b")
    p.offer(b)
    i = 0
    while retries._value.get() < 6 or i < 6:  # b retried between batches of a that had no refusal
        i += 1
        p.offer(occurrence(namespace="a", object_name=f"a-{i}"))
        want = float(i)
        await until(lambda: delivered._value.get() == want)  # noqa: B023 - awaited before the next turn
    assert len(refusals(caplog)) == 1, refusals(caplog)
    fake.indices.add("events-b")  # the operator creates it
    await until(lambda: p.checkpoint.accepted(b.uid) == b.number)
    await until(lambda: "index events-b accepts documents again" in caplog.text)
    fake.indices.discard("events-b")  # and deletes it again: a new run of failures, said again
    p.offer(occurrence(namespace="b", object_name="b-2"))
    await until(lambda: len(refusals(caplog)) == 2)
    p.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await p.close_sink()


class _ForgetfulSink(ElasticsearchSink):
    refusal_memory = 0.0  # the hour without a refusal, passed at once


async def test_a_refusal_is_remembered_until_its_index_accepts_or_an_hour_passes_without_one(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake.auto_create = False
    fake.indices = {"events-a"}
    async with running_sink(fake.url, index="events-{namespace}") as sink:
        for _ in range(3):
            assert outcome_kinds(await send(sink, [occurrence(namespace="b")])) == [OutcomeKind.RETRY]
            assert outcome_kinds(await send(sink, [occurrence(namespace="a")])) == [OutcomeKind.OK]
    assert len(refusals(caplog)) == 1, refusals(caplog)
    caplog.clear()
    opts = ElasticsearchOptions.model_validate({"url": fake.url, "index": "events-{namespace}"})
    sink = _ForgetfulSink(opts, SinkContext("es", "test", None, logging.getLogger("test.es")))
    await sink.start()
    try:
        for _ in range(2):
            assert outcome_kinds(await send(sink, [occurrence(namespace="b")])) == [OutcomeKind.RETRY]
    finally:
        await sink.aclose()
    assert len(refusals(caplog)) == 2, refusals(caplog)  # the memory stays bounded in time


def _stamp(days_ago: float) -> dict[str, Any]:
    text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days_ago * 86400))
    return {"first_timestamp": text, "last_timestamp": text}


def _daily(days_ago: float, prefix: str = "events-") -> str:
    return prefix + time.strftime("%Y.%m.%d", time.gmtime(time.time() - days_ago * 86400))


async def test_a_late_document_for_a_removed_daily_index_is_dead_lettered_not_retried_for_ever(
    fake: FakeBulkServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Auto-create off, a job creates each day's index, retention (an ILM delete phase) removed the
    one of 10 days ago: a late event for it was set aside and retried every 30 s for ever (default
    retry_max_attempts=0), one ERROR line each time. While today's index accepts documents the old
    one will not come back: the late document is dead-lettered with the reason, replayable."""
    from eventrouter.testing.waiting import until

    fake.auto_create = False
    fake.indices = {_daily(0)}
    metrics = Metrics()
    p = _engine(
        fake.url,
        "events-{yyyy.MM.dd}",
        metrics,
        tmp_path / "dl",
        retry_initial_backoff=0.01,
        retry_max_backoff=0.02,
    )
    task = asyncio.create_task(p.run())
    p.offer(occurrence(object_name="live"))
    await until(lambda: metrics.delivered.labels("es")._value.get() == 1)
    late = occurrence(object_name="late", **_stamp(10))
    p.offer(late)
    rejected = metrics.dead_lettered.labels("es", "rejected")
    await until(lambda: rejected._value.get() == 1)
    p.close()
    await asyncio.wait_for(task, 10)
    await p.close_sink()
    assert metrics.retries.labels("es")._value.get() == 0 and refusals(caplog) == []
    (record,) = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert record["key"] == late.key  # `eventrouter replay` sends it once the index is restored
    assert record["reason"] == (
        f"404 index_not_found_exception: no such index [{_daily(10)}] and [action.auto_create_index] "
        f"is [false]; index {_daily(10)} is older than {_daily(0)}, which accepts documents: removed by "
        "retention (an ILM delete phase, Curator), it is not created again (restore it, then replay this)"
    )


async def test_a_missing_index_is_still_retried_unless_a_newer_one_of_a_date_only_name_accepts(
    fake: FakeBulkServer,
) -> None:
    """Only what the index template tells for sure: a newer index of the same dated series accepted a
    document in this run, and the missing one is of an earlier date than today's."""
    fake.auto_create = False
    fake.indices = {_daily(0), _daily(-1), _daily(0, "ev-a-")}
    old = occurrence(object_name="late", **_stamp(10))
    async with running_sink(fake.url, index="events-{yyyy.MM.dd}") as sink:
        # Nothing accepted yet in this run (a cluster where no index exists yet): retried.
        assert outcome_kinds(await send(sink, [old])) == [OutcomeKind.RETRY]
        # Tomorrow's index (an event stamped ahead) accepted; today's is missing: still retried.
        fake.indices.discard(_daily(0))
        tomorrow, today = occurrence(**_stamp(-1)), occurrence()
        assert outcome_kinds(await send(sink, [tomorrow, today])) == [OutcomeKind.OK, OutcomeKind.RETRY]
        # A role that may not create the removed index (403 on auto_create): the same fact.
        fake.denied[_daily(10)] = "indices:admin/auto_create"
        (gone,) = await send(sink, [old])
        assert gone.kind is OutcomeKind.REJECT and f"older than {_daily(-1)}" in gone.reason
    # Names with a record field: another namespace's index of today says nothing about this one.
    async with running_sink(fake.url, index="ev-{namespace}-{yyyy.MM.dd}") as sink:
        fresh, late = occurrence(namespace="a"), occurrence(namespace="a", **_stamp(10))
        assert outcome_kinds(await send(sink, [fresh, late])) == [OutcomeKind.OK, OutcomeKind.RETRY]
    # A name without the year ({dd} cycles every month): retried.
    fake.indices.add(time.strftime("d-%d", time.gmtime()))
    async with running_sink(fake.url, index="d-{dd}") as sink:
        late = occurrence(**_stamp(1))
        assert outcome_kinds(await send(sink, [occurrence(), late])) == [OutcomeKind.OK, OutcomeKind.RETRY]


async def test_a_cluster_read_only_block_is_retried_an_index_write_block_rejected(cluster: Cluster) -> None:
    """osmem answers as OpenSearch does: 403 cluster_block_exception per item. A cluster-wide
    read-only block (maintenance) is lifted again; the write block ILM puts on an old index is not."""
    await cluster.call("PUT", "/old", {"settings": {"index.blocks.write": True}})
    async with running_sink(cluster.url, index="events") as sink:
        status, _ = await cluster.call(
            "PUT", "/_cluster/settings", {"persistent": {"cluster.blocks.read_only": True}}
        )
        assert status == 200
        outcomes = await send(sink, [occurrence()])
        assert outcome_kinds(outcomes) == [OutcomeKind.RETRY]
        assert (
            outcomes[0].reason
            == "403 cluster_block_exception: blocked by: [FORBIDDEN/6/cluster read-only (api)];"
        )
        await cluster.call("PUT", "/_cluster/settings", {"persistent": {"cluster.blocks.read_only": False}})
        assert outcome_kinds(await send(sink, [occurrence()])) == [OutcomeKind.OK]
    async with running_sink(cluster.url, index="old") as sink:
        assert outcome_kinds(await send(sink, [occurrence()])) == [OutcomeKind.REJECT]


async def test_a_missing_pipeline_or_alias_write_index_is_retried_until_put_right(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Answered 400 per item, but about the target, not the document: a `pipeline=` that does not
    exist (yet), an alias over two indices without a write index. Every document was dead-lettered."""
    caplog.set_level(logging.INFO)
    for name in ("events-1", "events-2"):
        await cluster.call("PUT", f"/{name}", {"aliases": {"events": {}}})
    occ = occurrence()
    async with running_sink(cluster.url, index="events") as sink:
        outcomes = await send(sink, [occ])
        assert outcome_kinds(outcomes) == [OutcomeKind.RETRY]
        assert outcomes[0].reason.startswith(
            "400 illegal_argument_exception: no write index is defined for alias"
        )
        actions = [{"add": {"index": "events-2", "alias": "events", "is_write_index": True}}]
        assert (await cluster.call("POST", "/_aliases", {"actions": actions}))[0] == 200
        assert outcome_kinds(await send(sink, [occ])) == [OutcomeKind.OK]
    assert await cluster.count("events-2") == 1
    async with running_sink(cluster.url, index="other", pipeline="k8s-events") as sink:
        outcomes = await send(sink, [occ])
        assert outcome_kinds(outcomes) == [OutcomeKind.RETRY]
    logged = refusals(caplog)
    assert len(logged) == 2, logged
    assert logged[0].startswith(
        "es: index events: illegal_argument_exception: no write index is defined for alias [events]"
    )
    assert logged[1] == (
        "es: index other: illegal_argument_exception: pipeline with id [k8s-events] does not exist; its "
        "documents are retried (up to retry_max_attempts, if set) until that is put right"
    )


async def test_whole_request_404_and_403_are_logged_once_with_their_cause(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 for the whole request (a proxy in front of the cluster whose path changed) was retried
    without a word; a 403 was logged as "credentials rejected", at every retry."""
    role = (
        "action [indices:data/write/bulk] is unauthorized for user [writer] with effective roles [viewer], "
        "this action is granted by the index privileges [create_doc,create,delete,index,write,all]"
    )
    forbidden = {"error": {"type": "security_exception", "reason": role}, "status": 403}
    async with running_sink(fake.url) as sink:
        fake.responses = [(404, {"Content-Type": "text/html"}, "404 page not found")] * 2 + [
            (403, {}, forbidden)
        ] * 2
        for _ in range(4):
            with pytest.raises(RetryableError):
                await sink.send([occurrence()])
        assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]
    assert refusals(caplog) == [
        f"es: POST {fake.url}/_bulk answered 404 (404 page not found): nothing serves the bulk API there; "
        "is the URL's path right (a proxy's path prefix missing, extra or changed)?; retrying until that "
        "is put right",
        f"es: {fake.url} refused the bulk request (403 security_exception: {role}): the user's role lacks "
        "a privilege the bulk API needs; retrying until that is put right",
    ]


async def test_too_large_request_is_split_and_single_document_rejected(fake: FakeBulkServer) -> None:
    fake.max_content_length = 4000
    batch = [occurrence(message="m" * 600) for _ in range(8)] + [occurrence(message="z" * 5000)]
    async with running_sink(fake.url) as sink:
        outcomes = await send(sink, batch)
    assert outcome_kinds(outcomes) == [OutcomeKind.OK] * 8 + [OutcomeKind.REJECT]
    assert "413" in outcomes[8].reason
    assert max(size for size in fake.bulk_sizes if size <= 4000) <= 4000


@pytest.mark.parametrize(
    ("options", "header"),
    [
        (
            {"username": "elastic", "password": SECRET},
            "Basic " + base64.b64encode(f"elastic:{SECRET}".encode()).decode(),
        ),
        (
            {"esUserName": "elastic", "esUserSecret": SECRET},
            "Basic " + base64.b64encode(f"elastic:{SECRET}".encode()).decode(),
        ),
        ({"api_key": SECRET}, f"ApiKey {SECRET}"),
        ({"api_key": f"key-id:{SECRET}"}, "ApiKey " + base64.b64encode(f"key-id:{SECRET}".encode()).decode()),
        ({"bearer_token": SECRET}, f"Bearer {SECRET}"),
    ],
)
async def test_auth_header_sent_and_secret_never_in_logs_or_reprs(
    fake: FakeBulkServer, options: dict[str, str], header: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake.auth = header
    caplog.set_level(logging.DEBUG)
    async with running_sink(fake.url, **options) as sink:
        assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]
        shown = repr(sink) + repr(sink.options) + str(sink.options) + sink.options.model_dump_json()
    assert [r[2].get("Authorization") for r in fake.requests] == [header, header]
    assert SECRET not in shown
    assert SECRET not in caplog.text


async def test_url_credentials_become_basic_auth_and_are_hidden(fake: FakeBulkServer) -> None:
    fake.auth = "Basic " + base64.b64encode(f"elastic:{SECRET}".encode()).decode()
    url = fake.url.replace("http://", f"http://elastic:{SECRET}@")
    async with running_sink(url) as sink:
        assert SECRET not in repr(sink.options) and SECRET not in sink.options.url
        assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]


@pytest.mark.parametrize("key", ["hosts", "nodes"])
async def test_credentials_in_a_hosts_url_become_basic_auth_and_never_show(
    fake: FakeBulkServer, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Only `url` had its user info moved out: a `hosts=` (kube-eventer `nodes=`) entry kept it, and
    repr, start errors and `eventrouter check` showed the password."""
    caplog.set_level(logging.DEBUG)
    fake.auth = "Basic " + base64.b64encode(f"elastic:{SECRET}".encode()).decode()
    dead, dead2 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    live = fake.url.replace("http://127.0.0.1", f"http://elastic:{SECRET}@localhost")  # a second node
    options = ElasticsearchOptions.model_validate({"url": fake.url, key: live})
    assert options.username == "elastic" and options.password is not None
    assert SECRET not in repr(options) and not any(SECRET in u for u in options.node_urls())
    async with running_sink(fake.url, **{key: live}) as sink:
        assert SECRET not in repr(sink)
        assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]
    assert [r[2].get("Authorization") for r in fake.requests] == [fake.auth, fake.auth]

    sink = ElasticsearchSink(
        ElasticsearchOptions.model_validate(
            {"url": f"http://{dead}", key: f"http://elastic:{SECRET}@{dead2}"}
        ),
        SinkContext("es", "test", None, logging.getLogger("test.es")),
    )
    with pytest.raises(SinkError) as info:
        await sink.start()
    assert f"cannot reach http://{dead}, http://{dead2}" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(sink)
    assert SECRET not in caplog.text


def test_check_with_credentials_in_a_nodes_url_never_prints_them() -> None:
    first, second = free_port(), free_port()
    flag = f"--sink=elasticsearch:http://127.0.0.1:{first}?nodes=http://elastic:{SECRET}@127.0.0.1:{second}"
    result = subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "check", flag], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert f"cannot reach http://127.0.0.1:{first}, http://127.0.0.1:{second}" in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_node_urls_with_different_credentials_are_refused_without_showing_them() -> None:
    with pytest.raises(ValidationError) as info:
        ElasticsearchOptions.model_validate(
            {"url": f"http://elastic:{SECRET}@es1:9200", "hosts": "http://other:pw2@es2:9200"}
        )
    text = str(ValidationError.errors(info.value, include_input=False))
    assert "different credentials" in text and SECRET not in text and "pw2" not in text


async def test_wrong_credentials_fail_start_clearly(fake: FakeBulkServer) -> None:
    fake.auth = "Bearer right-token"
    with pytest.raises(SinkError) as info:
        async with running_sink(fake.url, username="elastic", password=SECRET):
            pass
    assert "credentials rejected" in str(info.value) and "401 security_exception" in str(info.value)
    assert SECRET not in str(info.value)


async def test_whole_request_401_is_retried_until_the_new_credentials_arrive(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A key revoked at the cluster before the rotated Secret reaches the pod (the kubelet takes up
    to a minute): the documents wait and go with the new key; they were dead-lettered before."""
    async with running_sink(fake.url, bearer_token=SECRET) as sink:
        fake.auth = "Bearer rotated"  # credentials revoked while running
        with pytest.raises(RetryableError) as refused:
            await send(sink, [occurrence(), occurrence()])
        assert "401 security_exception: unable to authenticate user" in refused.value.reason
        fake.auth = f"Bearer {SECRET}"  # (as the reloaded sink's new key would be)
        assert outcome_kinds(await send(sink, [occurrence(), occurrence()])) == [OutcomeKind.OK] * 2
    assert "credentials rejected" in caplog.text
    assert SECRET not in caplog.text


async def test_a_writer_without_the_monitor_privilege_starts_and_writes(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    """GET / needs `cluster:monitor/main`; a role with index privileges only is refused there (403)
    but may write: the sink did not start, for ever."""
    fake.auth, fake.monitor = f"Bearer {SECRET}", False
    async with running_sink(fake.url, bearer_token=SECRET) as sink:
        assert outcome_kinds(await send(sink, [occurrence()])) == [OutcomeKind.OK]
    assert (
        "refused GET / (403 security_exception: action [cluster:monitor/main] is unauthorized" in caplog.text
    )


class EchoGateway:
    """A reverse proxy in front of the cluster, as an API gateway: forwards every request, but answers
    the next ones queued in ``refuse`` itself, with that status and a page (JSON or text) quoting the
    request it refused, its Authorization header included, after what it ``says``. With ``prefix``
    it serves the cluster under that path only (a gateway keyed by a path token); with ``redirect``
    set it answers every request so, Location the cluster's own URL (an http → https redirect)."""

    _PLAIN = frozenset({"host", "accept", "accept-encoding", "content-type", "content-length"})

    def __init__(self, upstream: str, prefix: str = "") -> None:
        self.upstream = upstream
        self.prefix = prefix
        self.redirect: int | None = None
        self.redirected: list[str] = []  # "METHOD path" answered with a redirect
        self.refuse: list[tuple[int, bool]] = []  # (status, a JSON page) for the next requests
        self.says = ""
        self.refused: list[tuple[str, dict[str, str]]] = []  # ("METHOD path", headers) answered here
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EchoGateway:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.redirect is not None:
            self.redirected.append(f"{request.method} {request.path}")
            location = f"{self.upstream}{request.path_qs}"
            # A page of a media type the transport does not decode (application/octet-stream).
            return web.Response(status=self.redirect, headers={"Location": location}, body=b"moved")
        path = request.path_qs
        if not path.startswith(self.prefix):
            return web.Response(status=404, text="404 page not found")
        path = path[len(self.prefix) :] or "/"
        if self.refuse:
            status, as_json = self.refuse.pop(0)
            self.refused.append((f"{request.method} {request.path}", dict(request.headers)))
            sent = "; ".join(f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in self._PLAIN)
            echo = f"{self.says} refused {request.method} {request.path_qs} with {sent}"
            if as_json:
                error = {"type": "gateway_exception", "reason": echo}
                return web.json_response({"error": error, "status": status}, status=status)
            return web.Response(status=status, text=echo)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        url = self.upstream + path
        async with self._session.request(request.method, url, data=body, headers=headers) as resp:
            data = await resp.read()
            hop = ("content-length", "transfer-encoding", "connection")
            back = {k: v for k, v in resp.headers.items() if k.lower() not in hop}
            return web.Response(status=resp.status, body=data, headers=back)


ES_KEY_ID, ES_KEY = "VuaCfGcBCdbkQm-e5aOx", "ui2lp2axTNmsyakw9tvNnw"
ES_ENCODED = base64.b64encode(f"{ES_KEY_ID}:{ES_KEY}".encode()).decode()


@pytest.mark.parametrize(
    ("options", "secrets"),
    [
        ({"username": "elastic", "password": SECRET}, [SECRET]),
        ({"api_key": f"{ES_KEY_ID}:{ES_KEY}"}, [f"{ES_KEY_ID}:{ES_KEY}", ES_ENCODED, ES_KEY]),
        ({"api_key": ES_ENCODED}, [ES_ENCODED, f"{ES_KEY_ID}:{ES_KEY}", ES_KEY]),
        ({"bearer_token": SECRET}, [SECRET]),
    ],
    ids=["basic", "api-key-id-key", "api-key-encoded", "bearer"],
)
async def test_a_gateway_echoing_the_request_leaves_no_credential_in_reasons_or_logs(
    cluster: Cluster,
    options: dict[str, str],
    secrets: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API gateway before the cluster answers with the request it refused (the Authorization
    header as sent) and the credential it names: the cluster's error text went into reasons (logged,
    written to the dead-letter file) and start-up errors as it came."""
    caplog.set_level(logging.DEBUG)
    # As eventrouter.logs sets it: the transport's DEBUG trace quotes whole bodies, and is never on.
    caplog.set_level(logging.WARNING, logger="elastic_transport")
    context = SinkContext("es", "test", None, logging.getLogger("test.es"))
    async with EchoGateway(cluster.url) as gateway:
        gateway.says = f"invalid credential {secrets[-1]};"
        opts = ElasticsearchOptions.model_validate({"url": gateway.url, "index": "echoed", **options})
        sink = ElasticsearchSink(opts, context)
        gateway.refuse = [(401, True)]  # GET / at start
        with pytest.raises(SinkError) as start:
            await sink.start()
        try:
            await sink.start()
            gateway.refuse = [(400, False)]  # a text page
            (outcome,) = await send(sink, [occurrence(object_name="direct")])
        finally:
            await sink.aclose()
        # Through the engine: a start that warns (403), bulk requests retried (502, 401: given up
        # after one attempt) and refused for good (400).
        gateway.refuse = [(403, True), (502, False), (401, False), (400, True)]
        records = await dead_letter(
            "es",
            ElasticsearchSink(opts, context),
            tmp_path / "dl",
            [
                (occurrence(object_name="a"), "retries_exhausted"),
                (occurrence(object_name="b"), "retries_exhausted"),
                (occurrence(object_name="c"), "rejected"),
            ],
        )
    assert [what for what, _ in gateway.refused] == ["GET /", "POST /_bulk", "GET /", *["POST /_bulk"] * 3]
    assert "credentials rejected" in str(start.value)
    assert outcome.kind is OutcomeKind.REJECT and "invalid credential ****;" in outcome.reason
    assert [r["reason"].split(":")[:2] for r in records] == [
        ["retries exhausted after 1 attempts", " elasticsearch"],
        ["retries exhausted after 1 attempts", " elasticsearch"],
        ["bulk request refused", " 400 gateway_exception"],
    ]
    assert "refused GET / (403 gateway_exception: invalid credential ****;" in caplog.text
    assert "credentials rejected by" in caplog.text  # the 401's own line
    tokens = {headers["Authorization"].partition(" ")[2] for _, headers in gateway.refused}
    assert len(tokens) == 1
    texts = [str(start.value), outcome.reason, *(r["reason"] for r in records), caplog.text]
    for text in texts:
        assert "****" in text
        for hidden in (*secrets, *(quote(s, safe="") for s in secrets), *tokens):
            assert hidden not in text, (hidden, text)


async def test_tls_ca_file_and_skip_verify(fake: FakeBulkServer, tmp_path: Path) -> None:
    cert, key = certificate(tmp_path)
    context = server_context(cert, key)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with running_sink(url, ca_file=str(cert)) as sink:
            assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]
        async with running_sink(url, insecure_skip_verify=True) as sink:
            assert outcome_kinds(await sink.send([occurrence()])) == [OutcomeKind.OK]
        with pytest.raises(SinkError, match=r"cannot reach .*CERTIFICATE_VERIFY_FAILED"):
            async with running_sink(url):
                pass
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------------ session 24

SHARD_LIMITS = {
    "es7-opensearch": {
        "type": "validation_exception",
        "reason": "Validation Failed: 1: this action would add [2] total shards, but this cluster "
        "currently has [1000]/[1000] maximum shards open;",
    },
    "newer-es": {
        "type": "illegal_argument_exception",
        "reason": "Validation Failed: 1: this action would add [2] shards, but this cluster currently "
        "has [1000]/[1000] maximum normal shards open;",
    },
}


@pytest.mark.parametrize("error", SHARD_LIMITS.values(), ids=SHARD_LIMITS.keys())
async def test_a_new_index_refused_for_the_shard_limit_waits_aside_until_the_limit_is_raised(
    fake: FakeBulkServer, error: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At midnight the sink writes to the day's new index; a cluster at cluster.max_shards_per_node
    refuses to create it and answers each item 400. Every document of the day was dead-lettered."""
    from eventrouter.testing.waiting import until

    fake.shard_limit = error
    fake.indices = {_daily(1)}  # yesterday's index exists; today's must be created
    today, yesterday, old = occurrence(), occurrence(**_stamp(1)), occurrence(**_stamp(10))
    async with running_sink(fake.url, index="events-{yyyy.MM.dd}") as sink:
        outcomes = await send(sink, [today, yesterday, old])
    # A late one for a day whose index is gone is refused alike: not taken for "removed by retention".
    assert outcome_kinds(outcomes) == [OutcomeKind.RETRY, OutcomeKind.OK, OutcomeKind.RETRY]
    assert outcomes[0].defer and outcomes[2].defer and outcomes[0].retry_after is None
    assert outcomes[0].reason == f"400 {error['type']}: {error['reason']}"

    metrics = Metrics()
    options = {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.02}
    p = _engine(fake.url, "events-{yyyy.MM.dd}", metrics, tmp_path / "dl", **options)
    task = asyncio.create_task(p.run())
    day = [occurrence(object_name=f"e-{i}") for i in range(10)]
    for occ in day:
        p.offer(occ)
    retries = metrics.retries.labels("es")
    await until(lambda: retries._value.get() >= 30)  # set aside and retried, three times each
    assert metrics.dead_lettered.labels("es", "rejected")._value.get() == 0
    fake.shard_limit = None  # the operator raises the limit (or deletes old indices)
    await until(lambda: metrics.delivered.labels("es")._value.get() == 10)
    p.close()
    await asyncio.wait_for(task, 10)
    await p.close_sink()
    assert not (tmp_path / "dl").exists()
    ids = [f"{occ.uid}-{occ.number}" for occ in day]
    assert sorted(i for i in fake.accepted_ids if i in ids) == sorted(ids)  # each once
    said = [
        f"es: index {index} cannot be created: the cluster is at its shard limit ({error['type']}: "
        f"{error['reason']}); raise cluster.max_shards_per_node or delete (shrink, merge) old indices; "
        "its documents are retried (up to retry_max_attempts, if set) until that is put right"
        for index in (_daily(0), _daily(10))
    ]
    # Once per index and sink (the direct one: today's and the old one; the engine's: today's).
    assert refusals(caplog) == [said[0], said[1], said[0]]


@pytest.mark.parametrize("kind", ["index_create_block_exception", "cluster_block_exception"])
async def test_a_create_index_block_is_retried_aside_and_named_not_blamed_on_the_role(
    fake: FakeBulkServer, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSearch's cluster.blocks.create_index (set by hand, or by OpenSearch while every node is past
    its high disk watermark) refuses the day's new index 403: the log said the role refused the
    writes (index_create_block_exception), or the documents were dead-lettered (the block as a
    cluster_block_exception)."""
    block = {"type": kind, "reason": "blocked by: [FORBIDDEN/10/cluster create-index blocked (api)];"}
    batch = [occurrence()]
    fake.item_status = {f"{batch[0].uid}-1": (403, block)}
    async with running_sink(fake.url, index="events") as sink:
        (outcome,) = await send(sink, batch)
    assert outcome.kind is OutcomeKind.RETRY and outcome.defer
    assert refusals(caplog) == [
        f"es: index events does not exist and the cluster blocks creating indices ({kind}: "
        "blocked by: [FORBIDDEN/10/cluster create-index blocked (api)];); free disk space or lift "
        "cluster.blocks.create_index, or create the index; its documents are retried (up to "
        "retry_max_attempts, if set) until that is put right"
    ]


def _bulk_waits(fake: FakeBulkServer) -> list[float]:
    """The `timeout` (seconds) each bulk request asked the cluster to wait at most."""
    waits = []
    for method, path, _ in fake.requests:
        if method == "POST":
            query = dict(part.split("=", 1) for part in path.partition("?")[2].split("&"))
            assert query["timeout"].endswith("ms"), path
            waits.append(int(query["timeout"][:-2]) / 1000)
    return waits


async def test_a_red_index_holds_up_no_other_index_and_the_cluster_answers_before_the_request_times_out(
    fake: FakeBulkServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An index whose primary shard is not active (red) gets its items answered 503
    unavailable_shards_exception while the other indices' items go in. It was retried in place, and
    nothing newer was sent meanwhile; the bulk request carried no `timeout`, so a real cluster held
    its answer for its default minute, past the request's own timeout, and every send failed whole."""
    from eventrouter.testing.waiting import until

    caplog.set_level(logging.INFO)
    fake.red.add("events-b")
    metrics = Metrics()
    options = {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.02}
    p = _engine(fake.url, "events-{namespace}", metrics, None, **options)
    task = asyncio.create_task(p.run())
    delivered = metrics.delivered.labels("es")
    retries = metrics.retries.labels("es")
    b = occurrence(namespace="b")
    p.offer(b)
    i = 0
    while retries._value.get() < 6 or i < 6:  # b retried alone between batches of a
        i += 1
        p.offer(occurrence(namespace="a", object_name=f"a-{i}"))
        want = float(i)
        await until(lambda: delivered._value.get() == want)  # noqa: B023 - awaited before the next turn
    assert p.checkpoint.accepted(b.uid) == 0
    fake.red.clear()  # its shards are allocated again
    await until(lambda: p.checkpoint.accepted(b.uid) == b.number)
    await until(lambda: "index events-b accepts documents again" in caplog.text)
    p.close()
    await asyncio.wait_for(task, 10)
    await p.close_sink()
    (line,) = refusals(caplog)
    assert line.startswith(
        "es: index events-b: a primary shard is not active, the index is red (a node left, or its shards "
        "cannot be allocated) (unavailable_shards_exception: [events-b][0] primary shard is not active"
    )
    # Half the request's timeout (30 s, cut to the send's budget: 25 s of send_timeout's 30 s).
    waits = _bulk_waits(fake)
    assert len(waits) == len(fake.bulk_sizes) and all(10 < w <= 12.5 for w in waits), waits


async def test_a_red_index_is_set_aside_even_when_every_index_of_a_request_is_refused(
    fake: FakeBulkServer,
) -> None:
    """A red index's items were set aside only when the cluster took another document of the request
    or the request went to that index alone; documents of several indices all refused were retried
    in place, as a cluster-wide outage, and held up every other index (see the test below)."""
    fake.red = {"events-a", "events-b"}
    a, b, c = occurrence(namespace="a"), occurrence(namespace="b"), occurrence(namespace="c")
    async with running_sink(fake.url, index="events-{namespace}", pipeline="p") as sink:
        both = await send(sink, [a, b])
        mixed = await send(sink, [a, c])
        (alone,) = await send(sink, [b])
    assert outcome_kinds(both) == [OutcomeKind.RETRY] * 2 and all(o.defer for o in both)
    assert outcome_kinds(mixed) == [OutcomeKind.RETRY, OutcomeKind.OK] and mixed[0].defer
    assert alone.kind is OutcomeKind.RETRY and alone.defer
    assert all(path.startswith("/_bulk?pipeline=p&timeout=") for m, path, _ in fake.requests if m == "POST")


async def test_two_red_indices_set_aside_and_due_together_hold_up_no_other_index(
    fake: FakeBulkServer,
) -> None:
    """Set aside beside a document of a green index, the items of two red indices came due together
    (against a real cluster: during a request held for its `timeout`) and went out alone: two
    indices, all refused, nothing taken, read as a cluster-wide outage and retried in place. Every
    document for the green index waited for as long as either stayed red (for good, with
    retry_max_attempts=0 and a primary lost). A cluster where every index is red still marks the
    sink down, and all goes in once the shards are back."""
    from eventrouter.testing.waiting import until

    fake.red = {"events-a", "events-b"}
    fake.delay = 0.6  # a and b, set aside after the first request, come due during the second
    metrics = Metrics()
    options = {"retry_initial_backoff": 0.2, "retry_max_backoff": 0.4}
    p = _engine(fake.url, "events-{namespace}", metrics, None, **options)
    a, b = occurrence(namespace="a"), occurrence(namespace="b")
    for o in (a, b, occurrence(namespace="c", object_name="c0")):
        p.offer(o)
    task = asyncio.create_task(p.run())
    await until(lambda: len(fake.bulk_indices) == 1)
    p.offer(occurrence(namespace="c", object_name="c1"))  # sent once the first request is answered
    await until(lambda: len(fake.bulk_indices) == 2)
    fake.delay = 0.0
    await until(lambda: len(fake.bulk_indices) == 3)
    assert fake.bulk_indices[:3] == [
        {"events-a", "events-b", "events-c"},
        {"events-c"},
        {"events-a", "events-b"},
    ]
    delivered = metrics.delivered.labels("es")
    for i in range(40):
        p.offer(occurrence(namespace="c", object_name=f"live-{i}"))
    await until(lambda: delivered._value.get() == 42, timeout=5)  # was 2: c waited behind a and b
    assert p.checkpoint.accepted(a.uid) == p.checkpoint.accepted(b.uid) == 0
    assert p.healthy
    fake.red.add("events-c")  # every index red: the sink is down, nothing is lost
    late = occurrence(namespace="c", object_name="late")
    p.offer(late)
    await until(lambda: not p.healthy)
    fake.red.clear()
    for o in (a, b, late):
        await until(lambda: p.checkpoint.accepted(o.uid) == o.number)  # noqa: B023 - awaited in turn
    await until(lambda: p.healthy)
    assert delivered._value.get() == 45
    p.close()
    await asyncio.wait_for(task, 10)
    await p.close_sink()


async def test_a_send_split_by_413s_ends_within_its_budget_and_sends_what_is_left_next(
    fake: FakeBulkServer,
) -> None:
    """A batch answered 413 is sent again in halves, one request after another: at a cluster taking
    0.2 s a request, 8 documents of which 2 fit took 6 requests, past the engine's send_timeout
    (1.2 s here), which cut the send off and sent the whole batch again, to be cut off at the same
    point: the head went in again and again, the tail never. A send now starts no further half once
    it is out of time; what it did not send is answered retry (held) and goes next."""
    from eventrouter.testing.waiting import until

    fake.delay = 0.2
    fake.max_content_length = 3000  # two documents of ~1.4 kB
    context = SinkContext("es", "test", None, logging.getLogger("test.es"), send_timeout=1.2)
    sink = ElasticsearchSink(
        ElasticsearchOptions.model_validate({"url": fake.url, "index": "events"}), context
    )
    metrics = Metrics()
    p = pipeline_for(
        "es", sink, metrics, None, send_timeout=1.2, batch_max_events=8, retry_initial_backoff=0.01
    )
    task = asyncio.create_task(p.run())
    batch = [occurrence(message="m" * 600) for _ in range(8)]
    for occ in batch:
        p.offer(occ)
    await until(lambda: metrics.delivered.labels("es")._value.get() == 8)
    p.close()
    await asyncio.wait_for(task, 10)
    await p.close_sink()
    assert metrics.send_errors.labels("es", "timeout")._value.get() == 0
    assert metrics.retries.labels("es")._value.get() == 0  # held, not failed
    assert sorted(fake.accepted_ids) == sorted(f"{occ.uid}-{occ.number}" for occ in batch)  # each once


TOKEN = "k8sEvT0k3nXyZabcdef0123456789"


async def test_a_token_in_the_node_urls_path_shows_in_no_log_start_error_or_check_output(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An API gateway serving the cluster under /gw/<token>/: the sink's own lines (connected, start
    errors and so `eventrouter check`, a refused bulk request) and the transport's (a node marked dead)
    printed the token, which every other URL we show has redacted."""
    caplog.set_level(logging.WARNING, logger="elastic_transport")
    caplog.set_level(logging.INFO)  # last: it sets the capturing handler's level too
    async with EchoGateway(cluster.url, prefix=f"/gw/{TOKEN}") as gateway:
        good, wrong = f"{gateway.url}/gw/{TOKEN}/", f"{gateway.url}/gw/{TOKEN}/wrong/"
        dead = f"http://127.0.0.1:{free_port()}/gw/{TOKEN}/"
        async with running_sink(good, hosts=dead) as sink:
            for _ in range(3):  # the round-robin reaches the dead node; the transport marks it dead
                try:
                    await send(sink, [occurrence()])
                except RetryableError:
                    break
            gateway.refuse = [(404, False)]  # the dead node rests: this one goes to the gateway
            with pytest.raises(RetryableError, match="404"):
                await send(sink, [occurrence()])
        with pytest.raises(SinkError) as start:
            async with running_sink(wrong):
                pass
        code, output = await _check(f"--sink=elasticsearch:{wrong}")
    assert code != 0
    assert f"GET / on {gateway.url}/gw/***/wrong answered 404" in str(start.value)
    assert f"GET / on {gateway.url}/gw/***/wrong answered 404" in output
    assert f"connected to opensearch 3.8.0 at {gateway.url}/gw/***" in caplog.text
    assert f"POST {gateway.url}/gw/***/_bulk answered 404" in caplog.text
    assert f"<ElasticsearchNode(http://127.0.0.1:{dead.split(':')[2].split('/')[0]}/gw/***)>" in caplog.text
    for text in (caplog.text, str(start.value), output):
        assert TOKEN not in text


class UnparseableFront:
    """A front on loopback answering what aiohttp cannot parse, whose error text then ends in the
    request URL: POST a 502 with a header over its 8190 bytes; GET / the cluster's root, or with
    ``bad_root`` a malformed header line. One request per connection."""

    ROOT = orjson.dumps({"name": "n", "cluster_name": "c", "version": {"number": "8.15.0"}})

    def __init__(self) -> None:
        self.bad_root = False
        self.requests: list[str] = []  # "METHOD path"
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> UnparseableFront:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ")
            length = next((int(h.split(":")[1]) for h in head if h.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            self.requests.append(f"{method} {path}")
            if method == "GET" and not self.bad_root:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(self.ROOT), self.ROOT)
                )
            elif method == "GET":
                writer.write(b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n")
            else:
                writer.write(
                    b"HTTP/1.1 502 Bad Gateway\r\ncontent-security-policy: %s\r\nconnection: close\r\n"
                    b"content-length: 0\r\n\r\n" % (b"a" * 9000)
                )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_token_in_the_node_urls_path_shows_in_no_error_text_of_an_unparseable_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's error for an answer it cannot parse (a header over 8190 bytes, a bad header line)
    ends in the request URL: the gateway's path token went into the bulk request's reason (logged,
    dead-lettered), start's error and so `eventrouter check`, and the transport's own warning when
    start tried the next node (its traceback)."""
    caplog.set_level(logging.WARNING, logger="elastic_transport")  # as eventrouter.logs sets it
    caplog.set_level(logging.INFO)
    async with UnparseableFront() as front:
        url = f"{front.url}/gw/{TOKEN}/"
        async with running_sink(url) as sink:
            with pytest.raises(RetryableError) as failed:
                await send(sink, [occurrence()])
        opts = ElasticsearchOptions.model_validate({"url": url})
        context = SinkContext("es", "test", None, logging.getLogger("test.es"))
        records = await dead_letter(
            "es", ElasticsearchSink(opts, context), tmp_path / "dl", [(occurrence(), "retries_exhausted")]
        )
        front.bad_root = True
        with pytest.raises(SinkError) as start:
            async with running_sink(url, hosts=f"{front.url}/gw/{TOKEN}/b/"):
                pass
        code, output = await _check(f"--sink=elasticsearch:{url}")
    assert code != 0
    assert "Got more than 8190 bytes" in failed.value.reason
    assert f"url='{front.url}/gw/****/_bulk?timeout=" in failed.value.reason
    assert f"url='{front.url}/gw/****/_bulk?timeout=" in records[0]["reason"]
    assert "Invalid header token" in str(start.value) and f"url='{front.url}/gw/****/" in str(start.value)
    assert f"url='{front.url}/gw/****/" in output
    assert "Retrying request after failure" in caplog.text  # start went on to the second node
    assert front.requests.count("GET /gw/" + TOKEN + "/b/") == 1
    for text in (failed.value.reason, records[0]["reason"], caplog.text, str(start.value), output):
        assert TOKEN not in text


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_a_url_that_redirects_fails_start_naming_where_to(cluster: Cluster, code: int) -> None:
    """An http:// URL behind an ingress that redirects to https (OpenShift's Redirect, 302): start's
    GET / followed the redirect and said "connected", then every bulk POST came back a GET (301/302,
    405: every document dead-lettered) or went on to the other host (307/308)."""
    async with EchoGateway(f"{cluster.url}/{TOKEN}") as front:
        front.redirect = code
        with pytest.raises(SinkError) as info:
            async with running_sink(front.url):
                pass
    assert str(info.value) == (
        f"elasticsearch: GET / on {front.url} answered {code} (Location: {cluster.url}/***/): a redirect, "
        "which the sink does not follow (a bulk POST would come back a GET, or go on to another host); "
        "give that URL"
    )
    assert front.redirected == ["GET /"]


@pytest.mark.parametrize("code", [301, 302, 308])
async def test_a_redirect_met_while_sending_is_retried_and_logged_once_never_dead_lettered(
    cluster: Cluster, code: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from eventrouter.testing.waiting import until

    async with EchoGateway(cluster.url) as front:
        options = ElasticsearchOptions.model_validate({"url": front.url, "index": "moved"})
        sink = ElasticsearchSink(options, SinkContext("es", "test", None, logging.getLogger("test.es")))
        metrics = Metrics()
        p = pipeline_for(
            "es", sink, metrics, tmp_path / "dl", retry_initial_backoff=0.01, retry_max_backoff=0.02
        )
        task = asyncio.create_task(p.run())
        await p.started.wait()  # through the front while it still forwards
        front.redirect = code  # then the ingress starts redirecting
        for _ in range(5):
            p.offer(occurrence())
        failed = metrics.send_errors.labels("es", "retryable")
        await until(lambda: failed._value.get() >= 3)
        front.redirect = None  # the URL is put right
        await until(lambda: metrics.delivered.labels("es")._value.get() == 5)
        p.close()
        await asyncio.wait_for(task, 10)
        await p.close_sink()
    assert not (tmp_path / "dl").exists()
    assert await cluster.count("moved") == 5
    assert set(front.redirected) == {"POST /_bulk"}  # never followed as a GET
    assert refusals(caplog) == [
        f"es: POST {front.url}/_bulk answered {code} (Location: {cluster.url}/_bulk?timeout=***): a "
        "redirect, which the sink does not follow (the POST would come back a GET, or go on to another "
        "host); give that URL; retrying until that is put right"
    ]


async def test_a_405_for_the_whole_request_is_retried_not_dead_lettered(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Something before the cluster that takes no POST there answered 405: every document was rejected."""
    async with EchoGateway(cluster.url) as gateway, running_sink(gateway.url, index="m") as sink:
        gateway.refuse = [(405, False)]
        with pytest.raises(RetryableError, match="bulk request refused: 405"):
            await send(sink, [occurrence()])
        assert outcome_kinds(await send(sink, [occurrence()])) == [OutcomeKind.OK]
    (line,) = refusals(caplog)
    assert line.startswith(f"es: POST {gateway.url}/_bulk answered 405 (")
    assert line.endswith(
        "): what answers there takes no POST (a proxy before the cluster, or the URL's path); is the URL "
        "right?; retrying until that is put right"
    )


async def test_a_node_that_never_answers_is_marked_dead_and_no_send_is_cut_off_by_the_engine(
    cluster: Cluster,
) -> None:
    """Nodes [one that accepts and never answers, a live one], the request timeout equal to the engine's
    send_timeout (both 30 s by default): the engine's timer, started first (before a batch of 500 is
    encoded), cut each send to the hung node off, and the transport never marked it dead, so every
    other send waited the whole timeout, for as long as it stayed so. Each request now ends within the
    send's budget: the transport's timeout marks the node dead, and it is tried again after 1, 2, 4 … s.
    Scaled to 1 s, with the request timeout 50 ms over it for what that encoding takes: two timers due
    within a millisecond fire together, and then the transport's, inside, wins."""
    from eventrouter.testing.waiting import until

    async with SilentServer() as hung:
        context = SinkContext("es", "test", None, logging.getLogger("test.es"), send_timeout=1.0)
        options = ElasticsearchOptions.model_validate(
            {"url": hung.url, "hosts": cluster.url, "timeout": 1.05}
        )
        metrics = Metrics()
        p = pipeline_for(
            "es",
            ElasticsearchSink(options, context),
            metrics,
            None,
            send_timeout=1.0,
            retry_initial_backoff=0.01,
            retry_max_backoff=0.05,
        )
        task = asyncio.create_task(p.run())
        delivered = metrics.delivered.labels("es")
        began, bursts = time.monotonic(), 0
        while time.monotonic() - began < 4.0:  # a burst every 0.1 s for 4 s, each delivered in turn
            bursts += 1
            for _ in range(5):
                p.offer(occurrence())
            want = 5.0 * bursts
            await until(lambda: delivered._value.get() == want)  # noqa: B023 - awaited before the next turn
            await asyncio.sleep(0.1)
        p.close()
        await asyncio.wait_for(task, 10)
        await p.close_sink()
    assert metrics.send_errors.labels("es", "timeout")._value.get() == 0
    # Dead after each try, for 1, 2, 4 … s (plus start's try): at most 4 tries in ~4 s, of 40 sends.
    assert 1 <= hung.connections <= 4, (hung.connections, bursts)
    assert await cluster.count("k8s-events-*") == 5 * bursts


async def test_start_tries_the_next_node_within_send_timeout_when_one_never_answers(cluster: Cluster) -> None:
    """Start tries every node once; a node that never answers took the whole request timeout (equal
    to send_timeout by default, which bounds start), and start failed at every attempt on which the
    round-robin began with it."""
    async with SilentServer() as hung:
        context = SinkContext("es", "test", None, logging.getLogger("test.es"), send_timeout=1.0)
        options = ElasticsearchOptions.model_validate({"url": hung.url, "hosts": cluster.url, "timeout": 1.0})
        starts = 0
        while not hung.connections:  # the transport orders the nodes at random
            starts += 1
            assert starts <= 30
            sink = ElasticsearchSink(options, context)
            try:
                async with asyncio.timeout(context.send_timeout):  # as the engine bounds start()
                    await sink.start()
            finally:
                await sink.aclose()


# ------------------------------------------------------------------------------------------ options/encoding


def test_options_accept_kube_eventer_names_and_refuse_bad_values() -> None:
    opts = ElasticsearchOptions.model_validate(
        {
            "url": "",
            "nodes": "http://a:9200,http://b:9200",
            "esUserName": "u",
            "esUserSecret": SECRET,
            "ver": "7",
        }
    )
    assert opts.node_urls() == ["http://a:9200", "http://b:9200"]
    assert ElasticsearchOptions.model_validate({"url": "es1:9200,es2:9200"}).node_urls() == [
        "http://es1:9200",
        "http://es2:9200",
    ]
    for bad, message in (
        ({"url": "http://a", "index": "Events-{yyyy}"}, "lower case"),
        ({"url": "http://a", "index": "ev-{yyyy.MM.dd"}, "braces"),
        ({"url": "http://a", "index": "ev-{pod}"}, "neither a date pattern"),
        ({"url": "http://a", "data_stream": "ds", "op_type": "index"}, "only op_type=create"),
        ({"url": "http://a", "api_key": "k", "bearer_token": "t"}, "only one of"),
        ({"url": ""}, "no node URL"),
    ):
        with pytest.raises(ValidationError, match=message):
            ElasticsearchOptions.model_validate(bad)


def test_sink_flag_in_kube_eventer_style_parses() -> None:
    flag = (
        f"elasticsearch:?nodes=http://es1:9200&nodes=http://es2:9200&esUserName=elastic&esUserSecret={SECRET}"
        "&index=heapster-{yyyy.MM.dd}&index_template=true&level=Warning&batch_size=100"
    )
    spec = spec_for_class(ElasticsearchSink, parse_sink_flag(flag), type_="elasticsearch")
    options = spec.options
    assert isinstance(options, ElasticsearchOptions)
    assert options.node_urls() == ["http://es1:9200", "http://es2:9200"]
    assert options.index == "heapster-{yyyy.MM.dd}" and options.index_template is True
    assert spec.filter.level == "Warning" and spec.pipeline.batch_max_events == 100
    assert SECRET not in repr(spec)

    spec = spec_for_class(
        ElasticsearchSink,
        parse_sink_flag(f"opensearch:https://admin:{SECRET}@os:9200,https://os2:9200?data_stream=k8s-events"),
        type_="opensearch",
    )
    assert SECRET not in spec.describe() and SECRET not in repr(spec.options)
    assert spec.options.url == "https://os:9200,https://os2:9200"


def test_encoding_is_valid_ndjson() -> None:
    opts = ElasticsearchOptions.model_validate({"url": "http://127.0.0.1:9"})
    sink = ElasticsearchSink(opts, SinkContext("es", "test", None, logging.getLogger("test.es")))
    occs = recorded_occurrences()
    for occ in occs:
        action, doc, end = sink._encode(occ).split(b"\n")
        assert end == b""
        assert orjson.loads(action) == {
            "index": {
                "_index": "k8s-events-" + occ.record["time"][:10].replace("-", "."),
                "_id": f"{occ.uid}-{occ.number}",
            }
        }
        assert orjson.loads(doc)["uid"] == occ.uid


async def test_aclose_without_start_and_twice() -> None:
    opts = ElasticsearchOptions.model_validate({"url": "http://127.0.0.1:9"})
    sink = ElasticsearchSink(opts, SinkContext("es", "test", None, logging.getLogger("test.es")))
    await sink.aclose()
    await sink.aclose()
