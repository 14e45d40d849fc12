"""What the ConfigMap checkpoint store holds once the events expire, and after a restart (item 261):
the uids removed since the last write are one map for every sink, not a set per sink (7 sets of 50,000
were ~21 MiB of heap after the expiry); the write that follows a large removal trims, however small;
and the order read from the ConfigMap is keyed on the tracker's uid strings once the table is."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import sys
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine import configmap_checkpoint
from eventrouter.engine.checkpoint import CheckpointTable, SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import DATA_KEY, ConfigMapCheckpointStore, decode_state
from eventrouter.source.kube import KubeClient, connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "eventrouter-checkpoint"
SINKS = ["elasticsearch", "file", "kafka", "loki", "sls", "stdout", "webhook"]


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


def _held_here(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still allocated by lines of configmap_checkpoint.py."""
    here = tracemalloc.Filter(True, configmap_checkpoint.__file__)
    return sum(stat.size for stat in snapshot.filter_traces([here]).statistics("filename"))


async def _router_store(
    kube: KubeClient, ids: list[str], **kwargs: Any
) -> tuple[ConfigMapCheckpointStore, list[SinkCheckpoint]]:
    """As in the router: seven sinks of one CheckpointTable, every one holding ``ids``."""
    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME, **kwargs)
    await store.load()
    table = CheckpointTable(len(SINKS))
    sinks = [SinkCheckpoint(store.backend(n), table=table, index=i) for i, n in enumerate(SINKS)]
    for start in range(0, len(ids), 500):
        batch = dict.fromkeys(ids[start : start + 500], 1)
        for ckpt in sinks:
            ckpt.ack(batch)
    return store, sinks


async def test_the_uids_removed_at_every_sink_cost_one_map_not_one_set_per_sink(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """Every event expires (the watch's DELETED, each sink's forget): until the next write the store
    keeps what was removed, so that a 409 merge brings none of it back. A set per sink was seven sets
    of every uid (~21 MiB of heap at 50,000 events); now less than one dict of them."""
    ids = uids(20_000)
    store, sinks = await _router_store(kube, ids)
    assert await store.flush()
    tracemalloc.start()
    try:
        before = _held_here(tracemalloc.take_snapshot())
        for start in range(0, len(ids), 1000):  # as the fanout hands them on, to every pipeline
            gone = ids[start : start + 1000]
            for ckpt in sinks:
                ckpt.forget(gone)
        held = _held_here(tracemalloc.take_snapshot()) - before
    finally:
        tracemalloc.stop()
    one_map = sys.getsizeof(dict.fromkeys(ids, 1))
    assert held < 2 * one_map, (held, one_map)  # one map and a little; seven sets were ~10 maps
    assert await store.flush()
    assert not store._removed and not store._order
    stored = api.get_object("configmaps", NS, NAME)
    assert decode_state(base64.b64decode(stored["binaryData"][DATA_KEY])) == (
        {sink: {} for sink in SINKS},
        [],
    )


async def test_a_merge_brings_back_no_uid_removed_from_a_sink_and_raises_the_others(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """What was removed is told per sink: an old leader's higher number of an event one sink forgot
    (and another pruned) is not brought back for those sinks; for the sink that still holds the event,
    and for an event no sink here removed, the higher number is kept (the merge rules, unchanged)."""
    ids = uids(10)
    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await store.load()
    table = CheckpointTable(3)
    a, b, c = (SinkCheckpoint(store.backend(n), table=table, index=i) for i, n in enumerate("abc"))
    for ckpt in (a, b, c):
        ckpt.ack(dict.fromkeys(ids, 1))
    assert await store.flush()
    other = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await other.load()
    for sink in "abc":
        SinkCheckpoint(other.backend(sink)).ack({ids[0]: 5, ids[1]: 5})
    assert await other.flush()
    a.forget([ids[0]])
    c.prune(set(ids[1:]))  # ids[0] no longer held by the API server, as c sees it
    assert await store.flush()  # 409: merged
    assert store.conflicts == 1
    written, _ = decode_state(
        base64.b64decode(api.get_object("configmaps", NS, NAME)["binaryData"][DATA_KEY])
    )
    assert ids[0] not in written["a"] and ids[0] not in written["c"]
    assert written["b"][ids[0]] == 5
    assert [written[s][ids[1]] for s in "abc"] == [5, 5, 5]
    assert not store._removed  # written: nothing left to keep out of a merge


async def test_the_write_after_the_events_expire_hands_the_freed_memory_back(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """The write after a large removal is small (nothing or little left), so it did not trim: what the
    removed uids, the order's stale entries and their strings held stayed in glibc's heap until the
    router's next periodic trim (~21 MiB at 50,000 events and 7 sinks). It trims now, and is counted."""
    store, sinks = await _router_store(kube, uids(20_000), flush_interval=0.01)  # ~340 KB: trims
    trimmed: list[int] = []
    store.on_trim = lambda: trimmed.append(store.last_size)
    running = asyncio.create_task(store.run())
    try:
        await until(lambda: store.trims == 1 and not store.dirty, timeout=30)
        live = uids(20_000)[:1000]  # the rest expire
        for ckpt in sinks:
            ckpt.prune(set(live))
        await until(lambda: store.trims == 2 and not store.dirty, timeout=30)
        # A small removal (a few events deleted) does not trim.
        for ckpt in sinks:
            ckpt.forget(live[:10])
        flushes = store.flushes
        await until(lambda: store.flushes > flushes and store.rounds >= 3 and not store.dirty, timeout=30)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert store.trims == 2
    assert trimmed[0] >= 256 * 1024 > trimmed[1]  # the second after a small write (~17 KB)


async def test_the_order_read_at_the_start_is_keyed_on_the_trackers_strings_once_the_table_is(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """After a restart the store's order held the uid strings decoded from the ConfigMap (~5 MiB at
    50,000 events) while the table was keyed on the tracker's (``share_keys``, after the first list).
    The order now keys on the same strings; the next write is the same."""
    ids = uids(2000)
    first, _ = await _router_store(kube, ids)
    assert await first.flush()
    store, sinks = await _router_store(kube, [])  # a restart: read from the ConfigMap
    assert list(store._order) == ids
    tracker = [str(uuid.UUID(uid)) for uid in ids]  # equal strings, other objects
    assert not any(a is b for a, b in zip(store._order, tracker, strict=True))
    assert sinks[0].table.share_keys(tracker) == len(ids)
    assert all(a is b for a, b in zip(store._order, tracker, strict=True))
    sinks[0].ack({ids[0]: 2})
    assert await store.flush()
    states, order = decode_state(
        base64.b64decode(api.get_object("configmaps", NS, NAME)["binaryData"][DATA_KEY])
    )
    assert order == [*ids[1:], ids[0]]
    assert states["elasticsearch"] == {**dict.fromkeys(ids[1:], 1), ids[0]: 2}


async def test_a_restarted_routers_store_holds_no_uid_strings_of_its_own(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """End to end: the second router reads the first one's ConfigMap; once its first list is complete
    the store's order is keyed on the very strings its tracker holds."""
    for i in range(50):
        api.create_event(event_object(namespace=NS, object_name=f"e{i}"))
    settings = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        checkpoint_configmap=NAME,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.05,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.01}, type_="memory")
    for run in ("first", "second"):
        router = Router(settings, [spec])
        running = asyncio.create_task(router.run())
        try:
            await until(lambda: router.ready()[0], timeout=30)  # noqa: B023 - awaited here
            if run == "first":
                await router.sinks["mem"].wait_for(50)
                continue
            store = router.checkpoint_store
            assert store is not None
            await until(lambda: router._keys_shared, timeout=30)  # noqa: B023
            tracked = {id(uid) for uid in router.watchers[0].tracker.seen}
            assert len(store._order) == 50 and {id(uid) for uid in store._order} <= tracked
            assert router.sinks["mem"].received == []  # nothing delivered again
        finally:
            router.request_stop()
            await asyncio.wait_for(running, 30)
