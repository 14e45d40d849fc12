"""Every built-in sink's destination at once on loopback (Loki, SLS and webhook receivers, a Tansu
Kafka broker, and an OpenSearch-compatible server the caller runs), with the ``--sink`` flags that
reach them and what each destination received: for tests that route one traffic to all of them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .loki import KEEP_OLD_SAMPLES, LokiReceiver
from .sls import AccessKey, SLSReceiver
from .tansu import TansuBroker
from .webhook import WebhookReceiver

__all__ = ["Destinations", "destinations"]

Key = tuple[str, int]
"""(event uid, occurrence)."""


@dataclass
class Destinations:
    loki: LokiReceiver
    sls: SLSReceiver
    hook: WebhookReceiver
    kafka: TansuBroker
    es_url: str

    def flags(self, file_path: str) -> list[str]:
        """One ``--sink`` flag per destination; the file sink writes ``file_path``."""
        return [
            f"loki:{self.loki.url}?tenant=e2e&max_age={KEEP_OLD_SAMPLES:.0f}",
            f"kafka:?brokers={self.kafka.bootstrap}&topic=k8s-events&idempotence=false",
            f"elasticsearch:{self.es_url}?index=e2e-{{yyyy.MM.dd}}",
            f"sls:{self.sls.url}?project=p&logStore=k8s-event&accessKeyId=AK&accessKeySecret=SK",
            f"webhook:{self.hook.url}/events?batch_max_events=50",
            f"file:{file_path}",
        ]

    async def received(self, file: Path, expected: int) -> dict[str, list[Key]]:
        """What each destination holds, read back the way its users read it (Loki's query_range, a
        Kafka consumer, Elasticsearch's _search, SLS's stored logs, the webhook's requests, the file)."""
        loki = [
            (doc["uid"], doc["occurrence"])
            for stream in self.loki.query_range()
            for doc in (json.loads(line) for _, line, _ in stream.values)
        ]
        kafka = [
            json.loads(r.value) for r in await self.kafka.consume("k8s-events", expected=expected, timeout=30)
        ]
        query = {"size": expected * 2, "query": {"match_all": {}}}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{self.es_url}/e2e-*/_search", json=query) as resp,
        ):
            hits = (await resp.json())["hits"]["hits"]
        return {
            "loki": loki,
            "kafka": [(d["uid"], d["occurrence"]) for d in kafka],
            "elasticsearch": [(h["_source"]["uid"], h["_source"]["occurrence"]) for h in hits],
            "sls": [
                (json.loads(log.fields["eventId"])["metadata"]["uid"], int(log.fields["occurrence"]))
                for log in self.sls.logs()
            ],
            "webhook": [(d["uid"], d["occurrence"]) for req in self.hook.accepted for d in req.json()],
            "file": [(d["uid"], d["occurrence"]) for d in map(json.loads, file.read_text().splitlines())],
        }


@contextlib.asynccontextmanager
async def destinations(es_url: str) -> AsyncIterator[Destinations]:
    """Loki (keeping old samples, so the recorded events keep their time in it), SLS, webhook and Kafka,
    started and stopped around the block; ``es_url``: a running OpenSearch-compatible server."""
    async with (
        LokiReceiver(reject_old_samples_max_age=KEEP_OLD_SAMPLES) as loki,
        SLSReceiver(projects={"p": ["k8s-event"]}, keys=[AccessKey("AK", "SK")], default_project="p") as sls,
        WebhookReceiver() as hook,
        TansuBroker() as kafka,
    ):
        yield Destinations(loki, sls, hook, kafka, es_url)
