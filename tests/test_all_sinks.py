"""Every built-in sink at once, configured by --sink flags, through the real engine: the recorded
traffic reaches each destination exactly once per occurrence (real Kafka and OpenSearch-compatible
servers, and the project's Loki-, SLS- and webhook-compatible receivers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import build_specs
from eventrouter.testing import recorded_watch
from eventrouter.testing.receivers.everything import destinations
from eventrouter.testing.receivers.osmem import OsmemServer, osmem_fixture_server

OCCURRENCES = 126


@pytest.fixture(scope="module")
def osmem_server() -> Iterator[OsmemServer]:
    yield from osmem_fixture_server()


async def test_recorded_traffic_reaches_every_sink_once(osmem_clone: Any, tmp_path: Path) -> None:
    async with destinations(osmem_clone.url) as dest:
        router = Router(
            RouterSettings(cluster_name="e2e", metrics_addr=None),
            build_specs(dest.flags(str(tmp_path / "events.jsonl"))),
        )
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
        received = await dest.received(tmp_path / "events.jsonl", OCCURRENCES)
    for name, keys in received.items():
        assert len(keys) == len(set(keys)) == OCCURRENCES, (
            f"{name}: {len(keys)} received, {len(set(keys))} distinct"
        )
