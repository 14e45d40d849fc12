"""Every built-in sink at once, configured by --sink flags, through the real engine: the recorded
traffic reaches each destination exactly once per occurrence (real Kafka and OpenSearch-compatible
servers, and the project's Loki-, SLS- and webhook-compatible receivers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer

from eventrouter.app import Router, RouterSettings
from eventrouter.config import build_specs
from eventrouter.record import parse_time_ns
from eventrouter.testing import recorded_watch
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.osmem import OsmemServer, osmem_fixture_server
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.receivers.tansu import TansuBroker
from eventrouter.testing.receivers.webhook import WebhookReceiver

OCCURRENCES = 126


@pytest.fixture(scope="module")
def osmem_server() -> Iterator[OsmemServer]:
    yield from osmem_fixture_server()


def _recording_end() -> float:
    times = [parse_time_ns(line["object"]["metadata"]["creationTimestamp"]) or 0 for line in recorded_watch()]
    return max(times) / 1e9


async def _kafka_keys(bootstrap: str) -> list[tuple[str, int]]:
    consumer = AIOKafkaConsumer(
        "k8s-events", bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        got: list[tuple[str, int]] = []
        async with asyncio.timeout(30):
            while len(got) < OCCURRENCES:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        doc = json.loads(r.value)
                        got.append((doc["uid"], doc["occurrence"]))
        return got
    finally:
        await consumer.stop()


async def test_recorded_traffic_reaches_every_sink_once(osmem_clone: Any, tmp_path: Path) -> None:
    end = _recording_end()
    async with (
        LokiReceiver(now=lambda: end + 3600) as loki,
        SLSReceiver(projects={"p": ["k8s-event"]}, keys=[AccessKey("AK", "SK")], default_project="p") as sls,
        WebhookReceiver() as hook,
        TansuBroker() as kafka,
    ):
        flags = [
            f"loki:{loki.url}?tenant=e2e",
            f"kafka:?brokers={kafka.bootstrap}&topic=k8s-events&idempotence=false",
            f"elasticsearch:{osmem_clone.url}?index=e2e-{{yyyy.MM.dd}}",
            f"sls:{sls.url}?project=p&logStore=k8s-event&accessKeyId=AK&accessKeySecret=SK",
            f"webhook:{hook.url}/events?batch_max_events=50",
            f"file:{tmp_path / 'events.jsonl'}",
        ]
        router = Router(RouterSettings(cluster_name="e2e", metrics_addr=None), build_specs(flags))
        await router.start_pipelines()
        occurrences, malformed = await router.replay(
            (line["type"], line["object"]) for line in recorded_watch()
        )
        assert (occurrences, malformed) == (OCCURRENCES, 0)
        assert await router.drain(60)
        await router.stop()
        delivered = {p.name: router.metrics.delivered.labels(p.name)._value.get() for p in router.pipelines}
        assert delivered == dict.fromkeys(
            ["loki", "kafka", "elasticsearch", "sls", "webhook", "file"], OCCURRENCES
        )

        def unique(keys: list[tuple[Any, Any]]) -> int:
            assert len(keys) == len(set(keys)), "delivered twice"
            return len(keys)

        loki_keys = [
            (doc["uid"], doc["occurrence"])
            for stream in loki.query_range()
            for doc in (json.loads(line) for _, line, _ in stream.values)
        ]
        assert unique(loki_keys) == OCCURRENCES
        assert unique(await _kafka_keys(kafka.bootstrap)) == OCCURRENCES
        async with aiohttp.ClientSession() as http, http.post(f"{osmem_clone.url}/e2e-*/_count") as resp:
            assert (await resp.json())["count"] == OCCURRENCES
        sls_keys = [
            (json.loads(log.fields["eventId"])["metadata"]["uid"], log.fields["occurrence"])
            for log in sls.logs()
        ]
        assert unique(sls_keys) == OCCURRENCES
        hook_keys = [(d["uid"], d["occurrence"]) for req in hook.accepted for d in req.json()]
        assert unique(hook_keys) == OCCURRENCES
        file_keys = [
            (d["uid"], d["occurrence"])
            for d in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())
        ]
        assert unique(file_keys) == OCCURRENCES
