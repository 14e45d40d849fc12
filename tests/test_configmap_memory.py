"""What a ConfigMap checkpoint write copies: sinks level with each other share one snapshot of their
state (seven copies of 50,000 entries were ~13 MiB of glibc heap per write), and sharing it changes
nothing of what is written or of what memory holds, a write that has to leave entries out included."""

from __future__ import annotations

import base64
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrouter.engine.checkpoint import SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import DATA_KEY, ConfigMapCheckpointStore, decode_state
from eventrouter.source.kube import KubeClient, connect
from eventrouter.testing.apiserver import FakeApiServer

NS, NAME = "monitoring", "eventrouter-checkpoint"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t0ken") as server:
        yield server


@pytest.fixture
async def kube(api: FakeApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    client = await connect(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"))
    yield client
    await client.close()


def uids(n: int) -> list[str]:
    rng = random.Random(n)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


async def test_level_sinks_share_one_snapshot_and_a_truncated_write_stays_right(
    api: FakeApiServer, kube: KubeClient
) -> None:
    order = uids(3000)
    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME, limit=20_000)  # ~1,100 entries fit
    await store.load()
    level = ["elasticsearch", "kafka", "loki", "webhook"]
    sinks = {name: SinkCheckpoint(store.backend(name)) for name in [*level, "dingtalk"]}
    for start in range(0, len(order), 500):
        batch = dict.fromkeys(order[start : start + 500], 1)
        for name, ckpt in sinks.items():
            if name != "dingtalk" or start < 2500:  # one sink lags by the last 500
                ckpt.ack(batch)

    states, _, _, _ = store._snapshot()
    assert all(states[name] is states["loki"] for name in level)  # one copy for the four
    assert states["dingtalk"] is not states["loki"]
    assert states["loki"] == dict.fromkeys(order, 1)
    assert states["dingtalk"] == dict.fromkeys(order[:2500], 1)

    assert await store.flush()
    assert store.truncated > 0
    written = decode_state(base64.b64decode(api.get_object("configmaps", NS, NAME)["binaryData"][DATA_KEY]))
    kept = written[0]
    assert all(kept[name] == kept["loki"] for name in level)
    assert kept["loki"] == dict.fromkeys(order[store.truncated :], 1)
    assert kept["dingtalk"] == {uid: 1 for uid in order[store.truncated : 2500]}
    # The shared copy was cut once for all, never the store's own states.
    assert {name: len(ckpt.state) for name, ckpt in sinks.items()} == {
        **dict.fromkeys(level, 3000),
        "dingtalk": 2500,
    }
    assert all(len(store._states[name]) == 3000 for name in level)
