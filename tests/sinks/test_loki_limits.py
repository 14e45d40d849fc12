"""Loki's tenant limits (ingestion rate, active streams) and option values Loki can never take, against
the project's Loki-compatible receiver, which enforces those limits as Loki's distributor and ingester do."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.config import ConfigError, spec_for_class
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
PUSH = "/loki/api/v1/push"


def _when(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    return make_occurrence(first_timestamp=_when(seconds_ago), **kwargs)


def _sink(url: str, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), CONTEXT)


def _json_push(namespace: str, lines: list[str]) -> dict[str, Any]:
    now = time.time_ns()
    values = [[str(now), line] for line in lines]
    return {"streams": [{"stream": {"namespace": namespace}, "values": values}]}


# ---- the receiver keeps Loki's contract ---------------------------------------------------------


async def test_the_receiver_limits_a_tenants_ingestion_rate_as_lokis_distributor_does() -> None:
    """A token bucket of ``ingestion_burst`` bytes (lines and structured metadata) refilled at
    ``ingestion_rate`` bytes/s; a push that does not fit is refused whole with Loki's message, and one
    larger than the bucket never fits."""
    async with (
        LokiReceiver(auth_enabled=True, ingestion_rate=1000, ingestion_burst=1500) as loki,
        aiohttp.ClientSession(headers={"X-Scope-OrgID": "ops"}) as http,
    ):
        big = _json_push("a", ["x" * 800, "y" * 800])  # 1,600 bytes: over the burst
        for _ in range(2):  # for ever, not only while the bucket is low
            async with http.post(loki.url + PUSH, json=big) as response:
                assert response.status == 429
                assert (await response.text()).strip() == (
                    "Ingestion rate limit exceeded for user ops (limit: 1000 bytes/sec) while attempting to "
                    "ingest '2' lines totaling '1600' bytes, reduce log volume or contact your Loki "
                    "administrator to see if the limit can be increased"
                )
        async with http.post(loki.url + PUSH, json=_json_push("a", ["z" * 1400])) as response:
            assert response.status == 204  # the bucket starts full
        async with http.post(loki.url + PUSH, json=_json_push("a", ["w" * 1000])) as response:
            assert response.status == 429  # 100 bytes left, refilled at 1,000 bytes/s
        assert [e.line[:1] for e in loki.entries] == ["z"] and loki.rate_limited == 3


async def test_the_receiver_refuses_a_new_stream_beyond_the_stream_limit_and_stores_the_others() -> None:
    """The ingester refuses a new stream beyond ``max_global_streams_per_user`` (429) and stores the
    push's other streams; like the ingester, it answers for the push's last stream (refused here),
    naming it as the distributor made it (with service_name)."""
    async with LokiReceiver(max_streams=2) as loki, aiohttp.ClientSession() as http:
        async with http.post(loki.url + PUSH, json=_json_push("a", ["1"])) as response:
            assert response.status == 204
        now = str(time.time_ns())
        push = {
            "streams": [
                {"stream": {"namespace": ns}, "values": [[now, f"line-{ns}"]]} for ns in ("c", "a", "b", "d")
            ]
        }
        async with http.post(loki.url + PUSH, json=push) as response:
            assert response.status == 429
            assert (await response.text()).strip() == (
                'Maximum active stream limit exceeded when trying to create stream {namespace="d", '
                'service_name="unknown_service"}, reduce the number of active streams (reduce labels or '
                "reduce label values), or contact your Loki administrator to see if the limit can be "
                "increased, user: 'fake'"
            )
    assert sorted(e.line for e in loki.entries) == ["1", "line-a", "line-c"]
    assert loki.stream_limited == 2 and loki.pushes[-1].accepted == 2


# ---- the sink -------------------------------------------------------------------------------------


async def test_a_push_over_the_tenants_rate_limit_is_halved_and_a_stored_half_is_not_sent_again() -> None:
    """Before, the whole push was retried for ever (one larger than the burst never fits). Now it is
    halved down to the limit Loki names; what was stored stays OK while the rest waits for the bucket
    (a retried whole push would spend the bucket on the stored part again), and later pushes are split
    before they are sent."""
    batch = [_at(60 - i, namespace="shop", object_name=f"p-{i:02}", message="m" * 900) for i in range(16)]
    size = len(batch[0].json)  # each line: no structured metadata
    limit = int(size * 7.5)
    async with LokiReceiver(ingestion_rate=limit, ingestion_burst=13 * size) as loki:
        sink = _sink(loki.url)
        try:
            outcomes = await sink.send(batch)  # 16 lines: over the burst
            assert outcomes is not None
            kinds = [o.kind for o in outcomes]
            # Parts of 4 lines: three fit the bucket (13 lines), the fourth waits.
            assert kinds == [OutcomeKind.OK] * 12 + [OutcomeKind.RETRY] * 4, kinds
            assert "Ingestion rate limit exceeded" in outcomes[-1].reason
            assert len(loki.entries) == 12
            loki.refill_rate_limit()  # as after the engine's backoff
            outcomes = await sink.send(batch[12:])
            assert outcomes is None or all(o.kind is OutcomeKind.OK for o in outcomes)
            loki.refill_rate_limit()
            later = [_at(30 - i, object_name=f"q-{i:02}", message="n" * 900) for i in range(12)]
            outcomes = await sink.send(later)  # within the burst, over the rate: split before it is sent
        finally:
            await sink.aclose()
    assert outcomes is None or all(o.kind is OutcomeKind.OK for o in outcomes)
    assert len(loki.entries) == 28 and len({(e.labels, e.ts_ns, e.line) for e in loki.entries}) == 28
    refused = [p.message for p in loki.pushes if p.status == 429]
    assert len(refused) == 2 and "ingest '16' lines" in refused[0] and "ingest '4' lines" in refused[1]
    assert all(p.accepted * size <= limit for p in loki.pushes if p.status == 204)


async def test_a_backlog_through_a_tenant_with_a_small_burst_delivers_every_entry() -> None:
    """A relist or a replay hands Loki a backlog in full batches; with a burst smaller than one batch
    every push was answered 429 for ever and nothing was delivered (the drain timed out)."""
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import build_specs

    objects = [
        event_object(
            namespace=f"ns-{i % 3}",
            object_name=f"pod-{i}",
            first_timestamp=_when(300 - i),
            message="x" * 1500,
        )
        for i in range(150)
    ]
    async with LokiReceiver(ingestion_rate=96 * 1024, ingestion_burst=96 * 1024) as loki:
        router = Router(
            RouterSettings(cluster_name="test", metrics_addr=None),
            build_specs([f"loki:{loki.url}?retry_max_backoff=0.5&structured_metadata=true"]),
        )
        await router.start_pipelines()
        try:
            assert await router.replay(("ADDED", obj) for obj in objects) == (150, 0)
            assert await router.drain(20)
        finally:
            await router.stop()
    stored = {orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries}
    assert stored == {f"pod-{i}" for i in range(150)}
    assert loki.rate_limited > 0  # the limit was met
    assert {p.status for p in loki.pushes} <= {204, 429}  # nothing refused for good


async def test_the_stream_limit_retries_only_the_refused_streams_items() -> None:
    """Loki's ingester refuses a new stream over the tenant's active stream limit and stores the other
    streams of the push. Before, the whole push was retried (re-storing the others each time). Now only
    the named stream's items wait, set aside; Loki answers for a push's last stream only, so each
    stream new to the sink goes last in a push of its own (c after a, d alone)."""
    async with LokiReceiver(max_streams=1) as loki:
        sink = _sink(loki.url)
        try:
            first = await sink.send([_at(60, namespace="a", object_name="a-0")])
            assert first is None or all(o.kind is OutcomeKind.OK for o in first)
            batch = [
                _at(50, namespace="c", object_name="c-1"),
                _at(40, namespace="a", object_name="a-1"),
                _at(30, namespace="d", object_name="d-1"),
                _at(20, namespace="a", object_name="a-2"),
            ]
            outcomes = await sink.send(batch)
            assert outcomes is not None
            assert [o.kind for o in outcomes] == [
                OutcomeKind.RETRY,
                OutcomeKind.OK,
                OutcomeKind.RETRY,
                OutcomeKind.OK,
            ]
            assert 'create stream {cluster="test", kind="Pod", namespace="c"' in outcomes[0].reason
            assert 'create stream {cluster="test", kind="Pod", namespace="d"' in outcomes[2].reason
            assert outcomes[0].defer and outcomes[2].defer
            loki.max_streams = 3  # idle streams flushed, or the limit raised
            again = await sink.send([batch[0], batch[2]])
        finally:
            await sink.aclose()
    assert again is None or all(o.kind is OutcomeKind.OK for o in again)
    names = sorted({orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries})
    assert names == ["a-0", "a-1", "a-2", "c-1", "d-1"]


# ---- options Loki can never take -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "option", "value"),
    [
        ({"labels": {"a" * 1100: "x"}}, "labels", "a" * 1100),
        ({"tenant": "team\na"}, "tenant", "team"),
        ({"tenant": "team a"}, "tenant", "team"),
        ({"tenant": "t" * 151}, "tenant", "t" * 151),
        ({"headers": ["X-Foo:bar\r\nX-Injected: 1"]}, "headers", "X-Injected"),
        ({"bearer_token": "s3cr\nxyz"}, "bearer_token", "s3cr"),
    ],
    ids=[
        "label-name-over-1024-bytes",
        "tenant-newline",
        "tenant-space",
        "tenant-151-chars",
        "header-crlf",
        "token-lf",
    ],
)
def test_values_loki_can_never_take_are_refused_at_configuration_naming_the_option_not_the_value(
    options: dict[str, Any], option: str, value: str
) -> None:
    """Before, a label name over Loki's max_label_name_length was accepted and every push refused
    (dead-lettered); a tenant or header value with a line break failed every start and send with
    aiohttp's "Forbidden control character detected in headers" (retried for ever)."""
    with pytest.raises(ConfigError) as caught:
        spec_for_class(LokiSink, {"url": "http://loki:3100", **options}, type_="loki")
    message = str(caught.value)
    assert f"option {option!r}" in message
    assert value not in message


def test_tenant_ids_loki_takes_are_accepted() -> None:
    for tenant in ("ops", "team-a_1.(prod)*!'", "t" * 150, ""):
        spec_for_class(LokiSink, {"url": "http://loki:3100", "tenant": tenant}, type_="loki")
