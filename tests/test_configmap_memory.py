"""What a ConfigMap checkpoint write copies: sinks level with each other share one snapshot of their
state (seven copies of 50,000 entries were ~13 MiB of glibc heap per write), and sharing it changes
nothing of what is written or of what memory holds, a write that has to leave entries out included.
What the store holds (item 242): no copy of the sinks' entries beside their CheckpointTable, writes
encoded in a thread of its own, and the trim after a large write counted with the router's."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import sys
import threading
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine import configmap_checkpoint
from eventrouter.engine.checkpoint import CheckpointBackend, CheckpointTable, SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import DATA_KEY, ConfigMapCheckpointStore, decode_state
from eventrouter.source.kube import KubeClient, connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

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
    assert all(len(store._state(name)) == 3000 for name in level)


def _held_here(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still allocated by lines of configmap_checkpoint.py."""
    here = tracemalloc.Filter(True, configmap_checkpoint.__file__)
    return sum(stat.size for stat in snapshot.filter_traces([here]).statistics("filename"))


async def test_the_store_reads_the_sinks_shared_table_and_keeps_no_copy_of_their_entries(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """As in the router: five sinks of one CheckpointTable, one lagging. The store used to keep a dict of
    every sink's entries beside the table (~16.5 MiB at 50,000 events and 7 sinks); it now holds the
    order of the uids only, and writes what it wrote before."""
    names = ["elasticsearch", "kafka", "loki", "stdout", "webhook"]
    ids = uids(20_000)
    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await store.load()
    table = CheckpointTable(len(names))
    sinks = {n: SinkCheckpoint(store.backend(n), table=table, index=i) for i, n in enumerate(names)}
    tracemalloc.start()
    try:
        before = _held_here(tracemalloc.take_snapshot())
        for start in range(0, len(ids), 500):
            batch = dict.fromkeys(ids[start : start + 500], 1)
            for name, ckpt in sinks.items():
                if name != "elasticsearch" or start < 15_000:  # behind by the last 5,000
                    ckpt.ack(batch)
        held = _held_here(tracemalloc.take_snapshot()) - before
    finally:
        tracemalloc.stop()
    # Besides the order of the uids (one dict), less than one sink's copy; was a copy per sink.
    besides_order = held - sys.getsizeof(store._order)
    assert besides_order < sys.getsizeof(dict.fromkeys(ids, 1)), (held, sys.getsizeof(store._order))
    assert await store.flush()
    expected = {n: dict.fromkeys(ids, 1) for n in names}
    expected["elasticsearch"] = dict.fromkeys(ids[:15_000], 1)
    assert decode_state(base64.b64decode(_stored(api, store)["binaryData"][DATA_KEY])) == (expected, ids)


class _OwnCopy:
    """The store's backend without ``bind``: the store keeps a copy of the sink's entries of its own,
    as it did for every sink before item 242 (the reference the shared table is checked against)."""

    def __init__(self, backend: CheckpointBackend) -> None:
        self.backend = backend

    def load(self) -> dict[str, int]:
        return self.backend.load()

    def record(self, acks: Mapping[str, int]) -> None:
        self.backend.record(acks)

    def remove(self, uids: Iterable[str]) -> None:
        self.backend.remove(uids)

    def compact(self, state: Mapping[str, int]) -> None:
        self.backend.compact(state)

    def close(self, state: Mapping[str, int]) -> None:
        self.backend.close(state)


def _stored(api: FakeApiServer, store: ConfigMapCheckpointStore) -> dict[str, Any]:
    return api.get_object("configmaps", store.namespace, store.name)


async def test_a_store_reading_the_table_writes_what_one_keeping_its_own_copy_writes(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """The same acks, forgets, prunes, compactions, a 409 merged (numbers above the table's, uids
    removed meanwhile), a second SinkCheckpoint of one sink and the stop's close, through two stores
    of two ConfigMaps: one read from the sinks' shared table, one with a copy of its own (the code
    before). Every write holds the same entries, in the same order."""
    names = ["es", "kafka", "loki"]
    ids = uids(3000)
    stores: list[ConfigMapCheckpointStore] = []
    pipelines: list[dict[str, SinkCheckpoint]] = []
    for shared in (True, False):
        store = ConfigMapCheckpointStore(kube, namespace=NS, name=f"{NAME}-{shared}".lower())
        await store.load()
        table = CheckpointTable(len(names))
        pipelines.append(
            {
                n: SinkCheckpoint(
                    store.backend(n) if shared else _OwnCopy(store.backend(n)),
                    table=table,
                    index=i,
                    compact_every=1200,
                )
                for i, n in enumerate(names)
            }
        )
        stores.append(store)
    assert stores[0]._columns.keys() == set(names) and not stores[1]._columns

    async def written_alike() -> None:
        for store in stores:
            assert await store.flush()
        mine, reference = (_stored(api, store) for store in stores)
        assert decode_state(base64.b64decode(mine["binaryData"][DATA_KEY])) == decode_state(
            base64.b64decode(reference["binaryData"][DATA_KEY])
        )
        assert [orjson.loads(c["data"]["summary"])["sinks"] for c in (mine, reference)] == [
            orjson.loads(reference["data"]["summary"])["sinks"]
        ] * 2

    for start in range(0, 2000, 250):
        batch = dict.fromkeys(ids[start : start + 250], 1)
        for s in pipelines:
            s["loki"].ack(batch)
            s["kafka"].ack(batch)
            if start < 1000:
                s["es"].ack(batch)  # es behind
    await written_alike()
    # Acknowledged again (a new count): these move to the end of the order.
    for s in pipelines:
        s["kafka"].ack(dict.fromkeys(ids[10:20], 2))
        s["loki"].forget(ids[20:30])  # deleted events
    await written_alike()

    # Another writer (an old leader) raises numbers, adds uids, and holds some the pipelines drop
    # before the merge: a merge keeps the higher number and brings no removed uid back.
    for store in stores:
        other = ConfigMapCheckpointStore(kube, namespace=NS, name=store.name)
        await other.load()
        SinkCheckpoint(other.backend("loki")).ack({**dict.fromkeys(ids[0:5], 7), ids[2500]: 3})
        SinkCheckpoint(other.backend("es")).ack(dict.fromkeys(ids[1000:1010], 2))
        SinkCheckpoint(other.backend("gone")).ack({ids[2600]: 1})  # not configured here: kept
        assert await other.flush()
    for s in pipelines:
        s["loki"].prune(set(ids[3:2000]))  # ids[0:3] go
    await written_alike()
    assert [store.conflicts for store in stores] == [1, 1]
    # The merged numbers stay above the table's until the sink acknowledges more.
    for s in pipelines:
        s["loki"].ack({ids[3]: 8, ids[4]: 2, ids[2500]: 4})
        s["es"].ack(dict.fromkeys(ids[1000:1400], 1))  # 1,400 notes in all: compacts at 1,200
        s["kafka"].ack(dict.fromkeys(ids[2000:3000], 1))
    await written_alike()
    # A second SinkCheckpoint of one sink (a test's, never the router's): both still write into it.
    for store, sinks in zip(stores, pipelines, strict=True):
        backend = store.backend("kafka")
        second = SinkCheckpoint(backend if store is stores[0] else _OwnCopy(backend))
        second.ack({ids[2999]: 5})
        sinks["kafka"].ack({ids[2998]: 6})
    await written_alike()
    for s in pipelines:
        for ckpt in s.values():
            ckpt.close()  # the stop
    await written_alike()


async def test_a_large_write_hands_its_freed_memory_back_and_says_so(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """From 256 KiB on, a periodic write trims the heap (its copies and buffers, a worker thread's
    among them, would stay until the router's next trim) and tells ``on_trim``; a small one does not."""
    trimmed: list[str] = []
    for name, count in (("small", 100), ("large", 20_000)):  # 17 bytes an event: ~340 KB
        store = ConfigMapCheckpointStore(kube, namespace=NS, name=f"{NAME}-{name}", flush_interval=0.01)
        store.on_trim = lambda name=name: trimmed.append(name)
        await store.load()
        SinkCheckpoint(store.backend("loki")).ack(dict.fromkeys(uids(count), 1))
        running = asyncio.create_task(store.run())
        try:
            # The trim, if any, is decided when the round is counted.
            await until(lambda: store.rounds >= 1 and not store.dirty, timeout=30)  # noqa: B023 - awaited here
            if name == "large":
                await until(lambda: store.trims == 1, timeout=30)  # noqa: B023
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        assert (store.last_size >= 256 * 1024) == (name == "large")
    assert trimmed == ["large"]


async def test_the_router_counts_the_configmap_stores_trims_with_its_own(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """``Router.memory_trims`` counts the trims after a large ConfigMap write too: here one forced by
    an old leader's 20,000 entries, merged after a 409, long after the relist's own trim."""
    api.create_event(event_object(namespace=NS, object_name="first"))
    settings = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        checkpoint_configmap=NAME,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.05,
        memory_trim_interval=3600,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.01}, type_="memory")
    router = Router(settings, [spec])
    running = asyncio.create_task(router.run())
    try:
        await until(lambda: bool(router.pipelines) and bool(api.objects("configmaps")), timeout=20)
        store = router.checkpoint_store
        assert store is not None
        await until(lambda: router._trim_task is not None and router._trim_task.done() and not store.dirty)
        own = router.memory_trims
        assert own >= 1 and store.last_size < 256 * 1024  # the relist's; nothing large written yet
        client = await connect(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"))
        try:
            other = ConfigMapCheckpointStore(client, namespace=NS, name=NAME)
            await other.load()
            SinkCheckpoint(other.backend("mem")).ack(dict.fromkeys(uids(20_000), 1))
            assert await other.flush()
        finally:
            await client.close()
        api.create_event(event_object(namespace=NS, object_name="second"))  # a write: 409, merge, ~340 KB
        await until(lambda: store.conflicts == 1 and store.last_size >= 256 * 1024, timeout=30)
        await until(lambda: router.memory_trims == own + 1, timeout=30)
    finally:
        router.request_stop()
        await asyncio.wait_for(running, 30)


async def test_every_write_is_encoded_in_the_checkpoints_own_thread(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """Not in whichever thread of the loop's default pool is free: glibc keeps what a write's buffers
    used in a heap of each thread that encoded one (~9 MiB each at 50,000 events and 7 sinks)."""
    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await store.load()
    ckpt = SinkCheckpoint(store.backend("loki"))
    threads: list[str] = []
    build = store._build

    def recording_build(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return build(*args)

    store._build = recording_build  # type: ignore[method-assign,assignment]
    busy = threading.Event()
    for batch in range(4):
        # A default-pool thread is busy meanwhile, as the router's spools and DNS lookups keep them.
        held = asyncio.create_task(asyncio.to_thread(busy.wait, 5))
        ckpt.ack(dict.fromkeys(uids(10 + batch)[-1:], 1))
        assert await store.flush()
        busy.set()
        await held
        busy.clear()
    # Its own (at most two, the second for work that comes while the first is busy: earlier tests').
    assert len(threads) == 4 and all(name.startswith("checkpoint-configmap_") for name in threads), threads


@pytest.mark.parametrize("then", ["prune", "close"])
async def test_a_merged_entry_of_an_event_the_table_never_held_goes_at_the_next_compaction(
    api: FakeApiServer, kube: KubeClient, then: str
) -> None:
    """After a 409, an old leader's entry of an event this leader never saw (deleted since) was kept by
    a store reading the table through every prune, compaction and the stop's close: nothing of the
    table names it. A copy of the column (the code before) dropped it at the first compaction: the same
    content now, the merge done before the prune or close."""
    ids = uids(100)
    written = []
    for shared in (True, False):
        store = ConfigMapCheckpointStore(kube, namespace=NS, name=f"{NAME}-{shared}".lower())
        await store.load()
        table = CheckpointTable(2)
        sinks = [
            SinkCheckpoint(store.backend(n) if shared else _OwnCopy(store.backend(n)), table=table, index=i)
            for i, n in enumerate(["loki", "kafka"])
        ]
        for ckpt in sinks:
            ckpt.ack(dict.fromkeys(ids[:50], 1))
        assert await store.flush()
        other = ConfigMapCheckpointStore(kube, namespace=NS, name=store.name)
        await other.load()
        SinkCheckpoint(other.backend("loki")).ack({ids[90]: 4, ids[1]: 3})  # ids[90]: never seen here
        assert await other.flush()
        for ckpt in sinks:
            ckpt.ack({ids[0]: 2})
        assert await store.flush()  # 409: merged
        assert store.conflicts == 1
        for ckpt in sinks:
            if then == "prune":
                ckpt.prune(set(ids[1:50]))  # ids[0] and ids[90] are no longer held by the API server
            else:
                ckpt.close()
        assert await store.flush()
        written.append(decode_state(base64.b64decode(_stored(api, store)["binaryData"][DATA_KEY])))
    assert written[0] == written[1]
    assert ids[90] not in written[0][0]["loki"] and written[0][0]["loki"][ids[1]] == 3


async def test_a_write_builds_the_states_of_lagging_sinks_off_the_loop(
    api: FakeApiServer, kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sinks behind the fastest (a relist's drain): each one's state was built on the loop from the
    table, row by row (~6 ms of loop per lagging sink at 50,000 events, at every write). The loop now
    copies the table's dicts only; what is written is still each sink's column with the merged numbers
    above it, and lagging sinks alike share one copy."""
    names = [f"s{i}" for i in range(7)]
    ids = uids(3000)
    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await store.load()
    table = CheckpointTable(len(names))
    sinks = [SinkCheckpoint(store.backend(n), table=table, index=i) for i, n in enumerate(names)]
    for ckpt in sinks:
        ckpt.ack(dict.fromkeys(ids[:2000], 1))
    assert await store.flush()
    other = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await other.load()
    SinkCheckpoint(other.backend("s2")).ack({ids[10]: 7})  # above the table's
    SinkCheckpoint(other.backend("s1")).ack({ids[2999]: 4})  # one s1 has not accepted yet
    assert await other.flush()
    # s6 the fastest; s0 behind by 1,000, s4 and s5 alike; s3 forgot one event the others hold.
    lag = [0, 300, 500, 600, 800, 800, 1000]
    for ckpt, accepted in zip(sinks, lag, strict=True):
        ckpt.ack(dict.fromkeys(ids[2000 : 2000 + accepted], 1))
    sinks[3].forget([ids[5]])
    assert await store.flush()  # 409: merged
    assert store.conflicts == 1
    expected = {n: ckpt.state for n, ckpt in zip(names, sinks, strict=True)}
    expected["s2"][ids[10]] = 7
    expected["s1"][ids[2999]] = 4

    loop_thread = threading.current_thread()
    viewed: list[threading.Thread] = []
    view = CheckpointTable.view

    def recording_view(self: CheckpointTable, index: int) -> dict[str, int]:
        viewed.append(threading.current_thread())
        return view(self, index)

    monkeypatch.setattr(CheckpointTable, "view", recording_view)
    for ckpt in sinks:
        ckpt.ack({ids[2]: 2})  # a change to write
    for state in expected.values():
        state[ids[2]] = 2
    assert await store.flush()
    assert loop_thread not in viewed
    assert decode_state(base64.b64decode(_stored(api, store)["binaryData"][DATA_KEY]))[0] == expected
    states, _, _, _ = store._snapshot()
    built = configmap_checkpoint._built(states, None)
    assert built == expected
    assert built["s4"] is built["s5"]
