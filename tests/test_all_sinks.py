"""Every built-in sink at once, configured by --sink flags, through the real engine: the recorded
traffic reaches each destination exactly once per occurrence (real Kafka and OpenSearch-compatible
servers, and the project's Loki-, SLS- and webhook-compatible receivers)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import build_specs
from eventrouter.record import occurrence_number
from eventrouter.testing import event_object, recorded_watch
from eventrouter.testing.hostile import hostile_objects
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


# A bulk body over 1 MiB (a document with a 1 MiB message): aiohttp warns that bytes "might lock the
# event loop" (a ResourceWarning, ignored outside tests). elastic-transport takes bytes only and hands
# them to aiohttp as they are, so the Elasticsearch sink cannot pass a stream.
@pytest.mark.filterwarnings("ignore:Sending a large body directly with raw bytes:ResourceWarning")
async def test_hostile_objects_are_delivered_once_or_dead_lettered_with_a_reason_by_every_sink(
    osmem_clone: Any, tmp_path: Path
) -> None:
    """The fault suite's hostile objects (1 MiB messages, wrong types, missing fields, label keys and
    values that break Loki's and Elasticsearch's naming, times outside Loki's window) through every
    built-in sink at once: each destination holds every occurrence once, or the sink's dead-letter
    file holds it with a reason; nothing is both, nothing is lost, and a normal event still follows."""
    objects = [*hostile_objects(), event_object(object_name="after-hostile")]
    for obj in objects:
        obj["metadata"]["uid"] = str(uuid.uuid4())  # as the API server assigns them
    expected = {(obj["metadata"]["uid"], occurrence_number(obj)) for obj in objects}
    data = tmp_path / "data"
    async with destinations(osmem_clone.url) as dest:
        router = Router(
            RouterSettings(cluster_name="e2e", metrics_addr=None, data_dir=data),
            build_specs(dest.flags(str(tmp_path / "events.jsonl"))),
        )
        await router.start_pipelines()
        assert await router.replay(("ADDED", obj) for obj in objects) == (len(objects), 0)
        assert await router.drain(120)
        await router.stop()
        delivered = {
            p.name: int(router.metrics.delivered.labels(p.name)._value.get()) for p in router.pipelines
        }
        received = await dest.received(tmp_path / "events.jsonl", delivered["kafka"])
    dead_lettered = {}
    for name, keys in received.items():
        letters = [orjson.loads(line) for line in _lines(data / "deadletter" / f"{name}.jsonl")]
        dead = {(uid, int(n)) for uid, _, n in (letter["key"].rpartition("/") for letter in letters)}
        assert all(letter["reason"] for letter in letters), name
        assert len(keys) == len(set(keys)) == delivered[name], f"{name}: delivered once each"
        assert set(keys) | dead == expected and not set(keys) & dead, name
        assert (objects[-1]["metadata"]["uid"], 1) in set(keys), f"{name}: the event after them"
        dead_lettered[name] = sorted(letter["reason"] for letter in letters)
    print(f"{len(expected)} occurrences; dead-lettered: {dead_lettered}")
    # A 1 MiB message is cut to fit, not refused: Kafka (1 MiB records) and Loki (256 KB lines). Loki
    # also takes the times outside its window and an entry behind its stream's newest (stamped at
    # receipt). Elasticsearch refuses only the label with an empty key (which a real API server's
    # validation never lets through), with its own reason.
    assert dead_lettered["kafka"] == dead_lettered["loki"] == dead_lettered["sls"] == []
    assert dead_lettered["webhook"] == dead_lettered["file"] == []
    assert len(dead_lettered["elasticsearch"]) == 1
    assert "field name cannot be an empty string" in dead_lettered["elasticsearch"][0]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []
