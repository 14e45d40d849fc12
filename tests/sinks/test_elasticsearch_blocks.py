"""Elasticsearch/OpenSearch: per-item answers about one index or one document that held up the whole
sink, and the installed template's date detection. Against osmem-server (OpenSearch 3.x-compatible):
the flood-stage disk block and dynamic mappings are osmem's own. osmem has no ingest API, so
``IngestFront``, a front before it, plays the ingest node for ``?pipeline=``: it answers the
documents its pipeline fails as Elasticsearch does and passes the rest on to osmem unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, SinkContext, normalise
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import event_object
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.osmem import Cluster
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.waiting import until
from eventrouter_sinks.elasticsearch import ElasticsearchOptions, ElasticsearchSink, index_template_body

FLOOD = (
    "index [events-full] blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, "
    "index has read-only-allow-delete block];"
)


def occurrence(namespace: str = "default", name: str = "web-0", reason: str = "BackOff") -> Occurrence:
    return normalise(event_object(namespace=namespace, object_name=name, reason=reason), cluster="test")


def doc_id(occ: Occurrence) -> str:
    return f"{occ.uid}-{occ.number}"


def engine(
    url: str,
    metrics: Metrics,
    deadletter: Path | None,
    index: str,
    *,
    sink: dict[str, Any] | None = None,
    **knobs: Any,
) -> Pipeline:
    """The sink (``sink``: more of its options) behind the engine's own pipeline (``knobs``)."""
    es = ElasticsearchSink(
        ElasticsearchOptions.model_validate({"url": url, "index": index, **(sink or {})}),
        SinkContext("es", "test", None, logging.getLogger("test.es")),
    )
    knobs = {"retry_initial_backoff": 0.05, "retry_max_backoff": 0.1, **knobs}
    return pipeline_for("es", es, metrics, deadletter, **knobs)


@asynccontextmanager
async def running(p: Pipeline) -> AsyncIterator[Pipeline]:
    """The pipeline running; stopped, and its sink closed, however the test ends."""
    task = asyncio.create_task(p.run())
    try:
        yield p
    finally:
        p.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await p.close_sink()


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The sink's error lines about refusals the operator has to put right."""
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "put right" in r.getMessage()
    ]


async def offer_and_deliver(p: Pipeline, metrics: Metrics, batch: list[Occurrence]) -> None:
    """Offer in tens, each ten delivered before the next (the memory queue never overflows here)."""
    delivered = metrics.delivered.labels("es")
    start = delivered._value.get()
    for i in range(0, len(batch), 10):
        for occ in batch[i : i + 10]:
            p.offer(occ)
        want = start + min(i + 10, len(batch))
        await until(lambda: delivered._value.get() == want, timeout=5)  # noqa: B023 - awaited here


# ------------------------------------------------------------------------------ flood-stage disk block


async def test_an_index_past_the_flood_stage_watermark_holds_up_no_other_index(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """``index=events-{namespace}``: a node past its flood-stage disk watermark blocks events-full,
    and each of its documents is answered 429 cluster_block_exception. It was retried in place, so no
    other index got a document for as long as the disk stayed full (hours; for ever before 7.4), and
    without a spool the memory queue dropped them: 0 of 100 for events-a in the review's run, 50
    dropped. Now it waits aside, its cause logged once, and goes in once the block is lifted."""
    caplog.set_level(logging.INFO)
    await cluster.flood("events-full", True)
    metrics = Metrics()
    full = occurrence("full", "f-1")
    async with running(engine(cluster.url, metrics, None, "events-{namespace}", queue_max_events=50)) as p:
        p.offer(full)
        retries = metrics.retries.labels("es")
        await until(lambda: retries._value.get() >= 1)
        await until(lambda: not p.healthy)  # its only traffic refused: down, as for a red index
        await offer_and_deliver(p, metrics, [occurrence("a", f"a-{i}") for i in range(100)])
        assert await cluster.count("events-a") == 100
        assert metrics.dropped.labels("es", "queue_full")._value.get() == 0
        assert p.checkpoint.accepted(full.uid) == 0 and await cluster.count("events-full") == 0
        assert p.healthy  # the cluster takes the rest
        await until(lambda: retries._value.get() >= 3)  # still refused, and not logged again
        (line,) = refusals(caplog)
        assert line == (
            f"es: index events-full is read-only: a node holding one of its shards is past the "
            f"flood-stage disk watermark (cluster_block_exception: {FLOOD}); free disk space there "
            "(Elasticsearch 7.4+ and OpenSearch lift the block once the node is below the high "
            "watermark; before 7.4 remove index.blocks.read_only_allow_delete by hand); its documents "
            "are retried (up to retry_max_attempts, if set) until that is put right"
        )
        await cluster.flood("events-full", False)  # disk space is back
        await until(lambda: p.checkpoint.accepted(full.uid) == full.number)
        await until(lambda: "index events-full accepts documents again" in caplog.text)
    assert await cluster.count("events-full") == 1
    assert metrics.delivered.labels("es")._value.get() == 101


async def test_a_flood_stage_blocked_document_ends_at_retry_max_attempts_after_the_others_went_in(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Set aside, it still counts its attempts: dead-lettered with the cluster's reason at
    retry_max_attempts, and the other index's documents, offered after it, went in before (in
    place, they waited for its three attempts)."""
    await cluster.flood("events-full", True)
    metrics = Metrics()
    knobs: dict[str, Any] = {"retry_initial_backoff": 0.5, "retry_max_backoff": 1.0, "retry_max_attempts": 3}
    full = occurrence("full", "f-1")
    exhausted = metrics.dead_lettered.labels("es", "retries_exhausted")
    async with running(engine(cluster.url, metrics, tmp_path / "dl", "events-{namespace}", **knobs)) as p:
        p.offer(full)
        await until(lambda: metrics.retries.labels("es")._value.get() >= 1)
        await offer_and_deliver(p, metrics, [occurrence("a", f"a-{i}") for i in range(10)])
        assert exhausted._value.get() == 0  # its last attempt comes 0.75 s or more after its first
        await until(lambda: exhausted._value.get() == 1)
    (record,) = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert record["key"] == full.key
    assert record["reason"] == f"retries exhausted after 3 attempts: 429 cluster_block_exception: {FLOOD}"
    assert await cluster.count("events-a") == 10


async def test_a_write_blocked_index_past_the_flood_stage_watermark_holds_up_no_other_index(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An old daily index made read-only by ILM (index.blocks.write) on a node past its flood-stage
    watermark: its items are answered 429 naming both blocks (the highest status), and one late
    document for it was retried in place for as long as the disk stayed full: 19 of 100 for the
    other index in the review's run, and then it was rejected anyway, once the disk block was
    lifted. It is rejected at once now, with the cluster's reason, while the disk block stays."""
    settings = {"index.blocks.write": True, "index.blocks.read_only_allow_delete": True}
    assert (await cluster.call("PUT", "/events-old", {"settings": settings}))[0] == 200
    metrics = Metrics()
    late = occurrence("old", "late")
    async with running(engine(cluster.url, metrics, tmp_path / "dl", "events-{namespace}")) as p:
        p.offer(late)
        await offer_and_deliver(p, metrics, [occurrence("new", f"n-{i}") for i in range(100)])
        await until(lambda: metrics.dead_lettered.labels("es", "rejected")._value.get() == 1)
    assert await cluster.count("events-new") == 100
    _, body = await cluster.call("GET", "/events-old/_settings")
    blocks = body["events-old"]["settings"]["index"]["blocks"]
    assert str(blocks["read_only_allow_delete"]).lower() == "true"  # the disk is still full
    (record,) = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert record["key"] == late.key
    assert record["reason"] == (
        "429 cluster_block_exception: index [events-old] blocked by: [FORBIDDEN/8/index write (api), "
        "TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete "
        "block];"
    )


async def test_the_disk_block_of_one_index_is_set_aside_a_cluster_wide_one_retried_in_place(
    cluster: Cluster,
) -> None:
    """A cluster-wide read-only-allow-delete block refuses every index alike (nothing to go on
    with): it stays a retry in place, as a busy node's rejected execution (429) does."""
    await cluster.flood("events-full", True)
    full, other = occurrence("full"), occurrence("a")
    sink = ElasticsearchSink(
        ElasticsearchOptions.model_validate({"url": cluster.url, "index": "events-{namespace}"}),
        SinkContext("es", "test", None, logging.getLogger("test.es")),
    )
    await sink.start()
    try:
        blocked, taken = await sink.send([full, other]) or []
        assert blocked.kind is OutcomeKind.RETRY and blocked.defer
        assert blocked.reason == f"429 cluster_block_exception: {FLOOD}"
        assert taken.kind is OutcomeKind.OK
        body = {"persistent": {"cluster.blocks.read_only_allow_delete": True}}
        assert (await cluster.call("PUT", "/_cluster/settings", body))[0] == 200
        (everywhere,) = await sink.send([occurrence("a", "a-2")]) or []
        assert everywhere.kind is OutcomeKind.RETRY and not everywhere.defer
        assert everywhere.reason == (
            "403 cluster_block_exception: blocked by: [FORBIDDEN/13/cluster read-only / allow delete (api)];"
        )
    finally:
        await sink.aclose()


# ------------------------------------------------------------------------------ ingest pipelines


class IngestFront(Relay):
    """Before osmem, the ingest node for ``?pipeline=``: ``fails(document)`` gives the error of a
    document the pipeline fails (answered with ``status``, not passed on), or None. ``answered``
    holds the ``_id`` of each document it failed, ``requests`` the ``_id``s of each bulk request."""

    def __init__(self, upstream: str, fails: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        super().__init__(upstream)
        self.fails: Callable[[dict[str, Any]], dict[str, Any] | None] | None = fails
        self.status = 500
        self.answered: list[str] = []
        self.requests: list[list[str]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        query = {k: v for k, v in request.query.items() if k != "pipeline"}  # osmem: no such pipeline
        if request.path != "/_bulk" or "pipeline" not in request.query:
            return await self.relay(request, body, str(request.rel_url.with_query(query)))
        lines = body.split(b"\n")[:-1]
        keep: list[bytes] = []
        slots: list[dict[str, Any] | None] = []
        self.requests.append([])
        for action, doc in zip(lines[0::2], lines[1::2], strict=True):
            ((op, meta),) = orjson.loads(action).items()
            self.requests[-1].append(meta["_id"])
            error = self.fails(orjson.loads(doc)) if self.fails is not None else None
            if error is None:
                keep.append(action + b"\n" + doc + b"\n")
                slots.append(None)
                continue
            self.answered.append(meta["_id"])
            slots.append(
                {op: {"_index": meta["_index"], "_id": meta["_id"], "status": self.status, "error": error}}
            )
        items: list[Any] = []
        if keep:
            headers = {"content-type": "application/x-ndjson"}
            async with self._session.post(
                self.upstream + "/_bulk", params=query, data=b"".join(keep), headers=headers
            ) as resp:
                items = (await resp.json())["items"]
        taken = iter(items)
        out = [slot if slot is not None else next(taken) for slot in slots]
        errors = any(next(iter(i.values()))["status"] >= 300 for i in out)
        return web.json_response({"took": 1, "errors": errors, "items": out})


def poison(error: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """The pipeline fails the documents of reason Poison: {"fail": {"if": "ctx.reason == 'Poison'"}}."""
    return lambda doc: error if doc.get("reason") == "Poison" else None


# What Elasticsearch answers (status 500) for a document a processor throws a RuntimeException on.
INGEST_FAILURES: dict[str, tuple[dict[str, Any], str]] = {
    # 7.5+ and OpenSearch: the processor's exception itself (the wrapper with its header unwrapped).
    "fail": ({"type": "fail_processor_exception", "reason": "refused Poison"}, "fail"),
    "dissect": (
        {
            "type": "find_match",
            "reason": "Unable to find match for dissect pattern: %{a} %{b} against source: Poison",
        },
        "dissect",
    ),
    # 7.0-7.4: every processor failure, wrapped, with the processor's type in its header (#48803).
    "es-7.4": (
        {
            "type": "exception",
            "reason": "java.lang.IllegalArgumentException: field [client.ip] is not an IP string",
            "caused_by": {
                "type": "illegal_argument_exception",
                "reason": "field [client.ip] is not an IP string",
            },
            "header": {"processor_type": "geoip"},
        },
        "geoip",
    ),
}


@pytest.mark.parametrize(("error", "processor"), INGEST_FAILURES.values(), ids=INGEST_FAILURES.keys())
async def test_a_document_an_ingest_pipeline_fails_is_set_aside_while_the_rest_go_in(
    cluster: Cluster, caplog: pytest.LogCaptureFixture, error: dict[str, Any], processor: str
) -> None:
    """A processor that throws a plain RuntimeException (the `fail` processor, dissect finding no
    match; before 7.5 any) gets that document a per-item 500, at every try. It was retried in place
    for ever: 0 of 30 good documents went in in the review's run. Now it waits aside, the pipeline
    and processor named once, and goes in once the pipeline is fixed."""
    caplog.set_level(logging.INFO)
    async with IngestFront(cluster.url, poison(error)) as front:
        metrics = Metrics()
        bad = occurrence(name="bad", reason="Poison")
        async with running(engine(front.url, metrics, None, "events", sink={"pipeline": "k8s"})) as p:
            p.offer(bad)
            await until(lambda: len(front.answered) >= 1)
            await offer_and_deliver(p, metrics, [occurrence(name=f"ok-{i}") for i in range(30)])
            assert await cluster.count("events") == 30
            await until(lambda: len(front.answered) >= 3)  # retried aside, and logged once
            assert p.checkpoint.accepted(bad.uid) == 0 and p.healthy
            text = error["type"] + ": " + error["reason"]
            if "caused_by" in error:
                text += f" (caused by {error['caused_by']['type']}: {error['caused_by']['reason']})"
            assert refusals(caplog) == [
                f"es: index events: ingest pipeline k8s (or the index's final_pipeline) failed a document "
                f"in its {processor} processor ({text}); fix the pipeline, or give it an on_failure "
                "handler; its documents are retried (up to retry_max_attempts, if set) until that is put "
                "right"
            ]
            front.fails = None  # the pipeline is fixed
            await until(lambda: p.checkpoint.accepted(bad.uid) == bad.number)
    assert await cluster.count("events") == 31
    assert metrics.delivered.labels("es")._value.get() == 31


async def test_a_document_an_ingest_pipeline_fails_ends_at_retry_max_attempts_with_its_reason(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with IngestFront(cluster.url, poison(INGEST_FAILURES["fail"][0])) as front:
        metrics = Metrics()
        knobs: dict[str, Any] = {
            "retry_initial_backoff": 1.0,
            "retry_max_backoff": 2.0,
            "retry_max_attempts": 2,
        }
        p = engine(front.url, metrics, tmp_path / "dl", "events", sink={"pipeline": "k8s"}, **knobs)
        bad = occurrence(name="bad", reason="Poison")
        exhausted = metrics.dead_lettered.labels("es", "retries_exhausted")
        async with running(p):
            p.offer(bad)
            await until(lambda: len(front.answered) == 1)
            await offer_and_deliver(p, metrics, [occurrence(name=f"ok-{i}") for i in range(10)])
            assert exhausted._value.get() == 0  # its second attempt comes 0.5 s or more after its first
            await until(lambda: exhausted._value.get() == 1)
    (record,) = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert record["key"] == bad.key
    assert record["reason"] == (
        "retries exhausted after 2 attempts: 500 fail_processor_exception: refused Poison"
    )
    assert front.answered == [doc_id(bad)] * 2 and await cluster.count("events") == 10


async def test_a_document_answered_500_three_times_in_a_row_is_set_aside(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Any other per-item 500 (Elasticsearch's status for what it maps to none: a processor's bug,
    a shard's fault) is retried in place, as a passing fault is, three times; a document answered so
    every time was then retried in place for ever. Now it is set aside after the third answer, and
    the others go in. One that goes in by its third try stays in order."""
    caplog.set_level(logging.INFO)
    npe = {
        "type": "null_pointer_exception",
        "reason": 'Cannot invoke "Object.toString()" because "value" is null',
    }
    async with IngestFront(cluster.url, poison(npe)) as front:
        metrics = Metrics()
        bad = occurrence(name="bad", reason="Poison")
        async with running(engine(front.url, metrics, None, "events", sink={"pipeline": "k8s"})) as p:
            p.offer(bad)
            await until(lambda: len(front.answered) == 1)
            await offer_and_deliver(p, metrics, [occurrence(name=f"ok-{i}") for i in range(20)])
            # Three requests of it alone (in place, the others waiting), then set aside.
            assert front.requests[:3] == [[doc_id(bad)]] * 3
            assert refusals(caplog) == [
                "es: index events: a document was answered 500 3 times in a row (null_pointer_exception: "
                'Cannot invoke "Object.toString()" because "value" is null); set aside while the others '
                "go in (a fault of that document, or of its shard); its documents are retried (up to "
                "retry_max_attempts, if set) until that is put right"
            ]
            front.fails = None
            await until(lambda: p.checkpoint.accepted(bad.uid) == bad.number)

            # A fault that passes by the third try: in place (what came after waits), nothing logged.
            answers = iter([npe, npe])
            front.fails = lambda doc: next(answers, None) if doc.get("reason") == "Flaky" else None
            flaky, after = occurrence(name="flaky", reason="Flaky"), occurrence(name="after")
            p.offer(flaky)
            await until(lambda: front.answered[-1:] == [doc_id(flaky)])
            p.offer(after)
            await until(lambda: p.checkpoint.accepted(after.uid) == after.number)
            assert p.checkpoint.accepted(flaky.uid) == flaky.number
    assert front.requests[-4:] == [[doc_id(flaky)]] * 3 + [[doc_id(after)]]
    assert len(refusals(caplog)) == 1
    assert await cluster.count("events") == 23


# ------------------------------------------------------------------------------ date detection


def annotated(value: str, name: str) -> Occurrence:
    obj = event_object(object_name=name)
    obj["metadata"]["annotations"] = {"backup.example.com/date": value}
    obj["metadata"]["labels"] = {"release": value}
    return normalise(obj, cluster="test")


async def test_the_installed_template_turns_date_detection_off_and_maps_the_time_fields_as_dates(
    cluster: Cluster,
) -> None:
    """The first date-shaped label or annotation value of a day (2024-05-01) made that field a date
    in the day's index, also with index_template=true (its keyword dynamic templates match strings,
    and a detected date is none), so each later document with another value there was refused 400
    mapper_parsing_exception and dead-lettered for the rest of the day."""
    values = ["2024-05-01", "weekly", "2024-05-02", "n/a"]
    options = {"url": cluster.url, "index": "ev-{yyyy.MM.dd}", "index_template": True}
    sink = ElasticsearchSink(
        ElasticsearchOptions.model_validate(options),
        SinkContext("es", "test", None, logging.getLogger("test.es")),
    )
    await sink.start()
    try:
        first = await sink.send([annotated(values[0], "a")]) or []
        rest = await sink.send([annotated(v, f"n-{i}") for i, v in enumerate(values[1:])]) or []
    finally:
        await sink.aclose()
    assert [o.kind for o in [*first, *rest]] == [OutcomeKind.OK] * 4, [o.reason for o in rest]
    assert (
        index_template_body(ElasticsearchOptions.model_validate(options))["template"]["mappings"][
            "date_detection"
        ]
        is False
    )
    _, body = await cluster.call("GET", "/ev-*/_mapping")
    mappings = next(iter(body.values()))["mappings"]
    assert mappings["date_detection"] is False
    props = mappings["properties"]
    assert props["annotations"]["properties"]["backup_example_com/date"]["type"] == "keyword"
    assert props["labels"]["properties"]["release"]["type"] == "keyword"
    # The documents' own times are dates still: mapped by name, not detected.
    for name in ("@timestamp", "time", "first_time", "last_time"):
        assert props[name]["type"] == "date", name
