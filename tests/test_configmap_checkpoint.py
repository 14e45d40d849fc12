"""Checkpoints in a ConfigMap, through the test API server over real HTTP: round trip, 404 at start,
merge after 409, the size for tens of thousands of events, and the explicit over-limit degradation."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.checkpoint import SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import (
    CONFIGMAP_LIMIT,
    DATA_KEY,
    UNSEEN_KEY,
    CheckpointFormatError,
    ConfigMapCheckpointStore,
    configmap_size,
    decode_state,
    decode_unseen,
    encode_state,
)
from eventrouter.metrics import SINK_DROP_REASONS
from eventrouter.sink import OK, reject
from eventrouter.source.kube import KubeClient, connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import Gate, gated
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "eventrouter-checkpoint"
TOKEN = "t0ken"
# A ConfigMap near the 1 MiB limit is a ~1.4 MB JSON body (binaryData is base64): aiohttp then warns that
# a large bytes body "might lock the event loop" (ResourceWarning, ignored outside tests). KubeClient.request
# takes a JSON-serialisable body only, so the store cannot hand aiohttp a stream; see the report.
LARGE_BODY = pytest.mark.filterwarnings("ignore:Sending a large body directly with raw bytes:ResourceWarning")


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        yield server


@pytest.fixture
async def kube(api: FakeApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    client = await connect(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"))
    yield client
    await client.close()


@pytest.fixture
def store_factory(kube: KubeClient) -> Callable[..., ConfigMapCheckpointStore]:
    def make(**kwargs: Any) -> ConfigMapCheckpointStore:
        return ConfigMapCheckpointStore(kube, namespace=NS, name=NAME, **kwargs)

    return make


def uids(n: int, seed: int = 1) -> list[str]:
    """Event uids as the API server assigns them (random version-4 UUIDs)."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def stored(api: FakeApiServer) -> dict[str, Any]:
    return api.get_object("configmaps", NS, NAME)


def stored_states(api: FakeApiServer) -> dict[str, dict[str, int]]:
    return decode_state(base64.b64decode(stored(api)["binaryData"][DATA_KEY]))[0]


async def test_missing_configmap_at_start_is_empty_then_created(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore]
) -> None:
    store = store_factory()
    await store.load()  # 404
    ckpt = SinkCheckpoint(store.backend("loki"))
    assert ckpt.state == {}
    assert await store.flush()  # nothing recorded yet: nothing to write
    assert api.objects("configmaps") == []
    ckpt.ack({"a": 1})
    assert await store.flush()
    cm = stored(api)
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "eventrouter"}
    assert orjson.loads(cm["data"]["summary"])["sinks"] == {"loki": 1}
    assert stored_states(api) == {"loki": {"a": 1}}


async def test_round_trip_of_several_sinks(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore]
) -> None:
    ids = uids(300)
    odd = ["not-a-uuid", "UPPER-CASE-" + ids[0], "ünïcode/uid", ""]  # stored as strings
    store = store_factory()
    await store.load()
    loki, es, alerts = (SinkCheckpoint(store.backend(n)) for n in ("loki", "es:prod", "dingtalk/warnings"))
    for i, uid in enumerate([*ids, *odd]):
        loki.ack({uid: i % 7 + 1})
        if i % 10:  # a lagging sink: one event in ten is behind
            es.ack({uid: i % 7 + 1})
        else:
            es.ack({uid: 1})
        if i % 3 == 0:  # a filtered sink holds only some events
            alerts.ack({uid: 300_000 + i})  # multi-byte occurrence numbers
    loki.forget([ids[5]])
    es.prune(set(ids[100:]) | set(odd))  # the API server no longer holds the first hundred
    assert await store.flush()

    again = store_factory()
    await again.load()
    for name, ckpt in (("loki", loki), ("es:prod", es), ("dingtalk/warnings", alerts)):
        assert SinkCheckpoint(again.backend(name)).state == ckpt.state
    assert ids[5] not in SinkCheckpoint(again.backend("loki")).state
    # Oldest first is kept (the order the degradation path drops by).
    order = decode_state(base64.b64decode(stored(api)["binaryData"][DATA_KEY]))[1]
    assert order[:3] == ids[:3] and order[-len(odd) :] == odd


async def test_conflict_merges_by_max_per_uid(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore]
) -> None:
    seed = store_factory()
    await seed.load()
    SinkCheckpoint(seed.backend("loki")).ack({"u1": 1, "u3": 1})
    assert await seed.flush()

    old_leader, new_leader = store_factory(), store_factory()
    await old_leader.load()
    await new_leader.load()
    old = SinkCheckpoint(old_leader.backend("loki"))
    new = SinkCheckpoint(new_leader.backend("loki"))
    old.ack({"u1": 3, "u4": 1})  # the old leader delivered more before it stopped
    assert await old_leader.flush()
    new.ack({"u1": 2, "u2": 1})
    new.forget(["u3"])  # the event was deleted: a merge must not bring it back
    assert await new_leader.flush()  # 409 (stale resourceVersion) → re-read, merge, write
    assert new_leader.conflicts == 1
    assert stored_states(api) == {"loki": {"u1": 3, "u2": 1, "u4": 1}}
    # The merged numbers stay when the pipeline later compacts with its own (lower) view.
    new.prune({"u1", "u2", "u4"})
    assert await new_leader.flush()
    assert stored_states(api)["loki"]["u1"] == 3


@pytest.mark.parametrize("given_up", ["timed out", "cancelled"])
async def test_a_merge_given_up_in_its_decode_leaves_the_next_write_to_merge_again(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore], given_up: str
) -> None:
    """A 409's merge given up while it decoded the other writer's ConfigMap (the stop's bounded attempt,
    the stop's cancel of run()) had taken its resourceVersion already: the next write then succeeded
    without a 409 and replaced the other leader's higher numbers and its uids with this one's."""
    store = store_factory()
    await store.load()
    mine = SinkCheckpoint(store.backend("loki"))
    mine.ack({"a": 1})
    assert await store.flush()
    other = store_factory()
    await other.load()
    SinkCheckpoint(other.backend("loki")).ack({"a": 5, "b": 3})  # the other leader delivered more
    assert await other.flush()
    mine.ack({"c": 1})

    entered, go = threading.Event(), threading.Event()
    parse = store._parse

    def slow_parse(obj: Any) -> Any:  # a large ConfigMap decoded on a CPU-starved node
        entered.set()
        go.wait(30)
        return parse(obj)

    store._parse = slow_parse  # type: ignore[method-assign]
    try:
        if given_up == "timed out":
            assert not await store.flush(timeout=2.0)
            assert entered.is_set()  # it was the decode that ran out of time
        else:
            attempt = asyncio.create_task(store.flush())
            await until(entered.is_set)
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
    finally:
        go.set()
        store._parse = parse  # type: ignore[method-assign]
    assert await store.flush(timeout=10)  # the stop's next attempt: meets the 409 again and merges
    assert stored_states(api) == {"loki": {"a": 5, "b": 3, "c": 1}}


def _three_sinks(n: int, *, filtered: bool) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Three sinks over ``n`` live events: occurrence numbers mostly 1, a few high; one sink lags by
    200 events; with ``filtered`` the third sink keeps only a fifth of the events (Warnings)."""
    rng = random.Random(n)
    order = uids(n, seed=n)
    counts = {uid: (rng.randint(2, 5000) if rng.random() < 0.1 else 1) for uid in order}
    behind = set(order[-200:])
    lagging = {uid: c for uid, c in counts.items() if uid not in behind}
    third = {uid: c for uid, c in counts.items() if not filtered or rng.random() < 0.2}
    return {"loki": dict(counts), "elasticsearch": lagging, "dingtalk": third}, order


async def test_size_for_tens_of_thousands_of_events_across_three_sinks(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore], caplog: Any
) -> None:
    caplog.set_level(logging.INFO)
    sizes: dict[tuple[int, bool], int] = {}
    for n in (10_000, 30_000, 50_000):
        for filtered in (False, True):
            states, order = _three_sinks(n, filtered=filtered)
            sizes[(n, filtered)] = len(encode_state(states, order))
            assert decode_state(encode_state(states, order))[0] == states
    logging.getLogger(__name__).info("ConfigMap checkpoint bytes (3 sinks): %s", sizes)
    assert sizes[(30_000, True)] < CONFIGMAP_LIMIT // 2
    assert sizes[(50_000, True)] < CONFIGMAP_LIMIT
    # 30k events x 3 sinks end to end: written under the real limit, nothing left out, read back.
    states, order = _three_sinks(30_000, filtered=True)
    store = store_factory()
    await store.load()
    for name, state in states.items():
        SinkCheckpoint(store.backend(name)).ack({uid: state[uid] for uid in order if uid in state})
    assert await store.flush()
    assert store.truncated == 0 and store.truncations == 0
    assert configmap_size(stored(api)) == store.last_size < CONFIGMAP_LIMIT
    again = store_factory()
    await again.load()
    assert {name: SinkCheckpoint(again.backend(name)).state for name in states} == states


@LARGE_BODY
async def test_over_the_limit_keeps_the_newest_and_counts_what_it_left_out(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore], caplog: Any
) -> None:
    n = 70_000
    order = uids(n, seed=7)
    everything = {"loki": dict.fromkeys(order, 1), "elasticsearch": dict.fromkeys(order, 1)}
    assert len(encode_state(everything, order)) > CONFIGMAP_LIMIT  # would be refused with 422
    store = store_factory()
    await store.load()
    sinks = [SinkCheckpoint(store.backend(name)) for name in everything]
    for start in range(0, n, 1000):  # acknowledged oldest first, in batches as pipelines do
        for ckpt in sinks:
            ckpt.ack(dict.fromkeys(order[start : start + 1000], 1))
    with caplog.at_level(logging.ERROR):
        assert await store.flush()
    assert 0 < store.truncated < n // 5 and store.truncations == 1
    assert any("do not fit" in r.getMessage() for r in caplog.records)
    assert configmap_size(stored(api)) <= CONFIGMAP_LIMIT
    kept = stored_states(api)
    assert kept["loki"] == kept["elasticsearch"] == dict.fromkeys(order[store.truncated :], 1)
    assert orjson.loads(stored(api)["data"]["summary"])["truncated"] == store.truncated
    # Memory still has everything: only a restart would re-deliver the oldest, nothing is lost.
    assert all(len(c.state) == n for c in sinks)


@LARGE_BODY
async def test_server_refuses_more_than_one_mebibyte_with_422(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore], caplog: Any
) -> None:
    # A store told a wrong (larger) limit shows that the real limit is what the server enforces.
    store = store_factory(limit=2 * CONFIGMAP_LIMIT)
    await store.load()
    SinkCheckpoint(store.backend("loki")).ack(dict.fromkeys(uids(70_000, seed=3), 1))
    with caplog.at_level(logging.ERROR):
        assert not await store.flush()
    assert store.errors == 1 and store.dirty
    assert any("must have at most 1048576 bytes" in r.getMessage() for r in caplog.records)
    assert api.objects("configmaps") == []


async def test_run_writes_changes_once_per_interval(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore]
) -> None:
    store = store_factory(flush_interval=0.05)
    await store.load()
    ckpt = SinkCheckpoint(store.backend("loki"))
    task = asyncio.create_task(store.run())
    try:
        ckpt.ack({"a": 1})
        await until(lambda: bool(api.objects("configmaps")) and not store.dirty)
        assert store.flushes == 1
        for i in range(200):  # many acknowledged batches within one interval: one write
            ckpt.ack({f"u{i}": 1})
        ckpt.ack({"a": 2})
        await until(lambda: not store.dirty)
        assert store.flushes == 2
        assert stored_states(api)["loki"] == {"a": 2, **{f"u{i}": 1 for i in range(200)}}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_encoding_rejects_garbage() -> None:
    for blob in (b"", b"\x07abc", b"\x00NOPE", b"\x01not zlib"):
        with pytest.raises(CheckpointFormatError):
            decode_state(blob)
    # Raw encoding of one sink "s" announcing 5 uids that are not there.
    with pytest.raises(CheckpointFormatError, match="truncated"):
        decode_state(b"\x00ERCK\x01\x01\x01s\x05")


async def test_unreadable_configmap_starts_empty(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore]
) -> None:
    api.create_object(
        "configmaps",
        {
            "metadata": {"name": NAME, "namespace": NS},
            "binaryData": {DATA_KEY: base64.b64encode(b"\x01garbage").decode()},
        },
    )
    store = store_factory()
    await store.load()
    assert SinkCheckpoint(store.backend("loki")).state == {}
    SinkCheckpoint(store.backend("loki")).ack({"a": 1})
    assert await store.flush()  # overwrites the unreadable one (with its resourceVersion)
    assert stored_states(api) == {"loki": {"a": 1}}


async def test_a_time_out_of_range_in_unconfigured_is_unreadable_not_a_failed_start(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore], caplog: Any
) -> None:
    """``data["unconfigured"]`` in milliseconds (a hand edit, another tool) is out of datetime's range:
    the leader's start failed ("year 55840 is out of range"), and so did every replica that took the
    lease next, until someone edited the ConfigMap; a time far in the past failed every write. Each
    such time is unreadable as a malformed one is: said, and that sink's keep period starts now; the
    readable ones are kept."""
    ids = uids(3, seed=4)
    now = int(time.time())
    kept = {"ms": {ids[0]: 1}, "neg": {ids[1]: 1}, "text": {ids[2]: 1}, "old": {ids[0]: 2}}
    blob = encode_state({"loki": dict.fromkeys(ids, 1), **kept}, ids)
    since = {"ms": 1_700_000_000_000, "neg": -1e13, "text": "yesterday", "old": now - 600}
    api.create_object(
        "configmaps",
        {
            "metadata": {"name": NAME, "namespace": NS},
            "data": {"unconfigured": orjson.dumps(since).decode()},
            "binaryData": {DATA_KEY: base64.b64encode(blob).decode()},
        },
    )
    caplog.set_level(logging.INFO)
    store = store_factory()
    await store.load()
    loki = SinkCheckpoint(store.backend("loki"))
    store.report_unconfigured()  # the router's start: raised ValueError
    loki.ack({ids[0]: 3})
    assert await store.flush()
    written = orjson.loads(stored(api)["data"]["unconfigured"])
    assert written["old"] == now - 600
    assert all(now - 1 <= written[s] <= time.time() + 1 for s in ("ms", "neg", "text")), written
    assert stored_states(api) == {"loki": {ids[0]: 3, ids[1]: 1, ids[2]: 1}, **kept}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [
        m
        for m in warned
        if "'unconfigured' has no usable time for ms: 1700000000000, neg: -10000000000000.0, text: \"yesterday\""
        in m
    ], warned


async def test_configmap_deleted_while_running_is_created_again(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore]
) -> None:
    store = store_factory()
    await store.load()
    ckpt = SinkCheckpoint(store.backend("loki"))
    ckpt.ack({"a": 1})
    assert await store.flush()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(api.url, headers=headers) as http,
        http.delete(f"/api/v1/namespaces/{NS}/configmaps/{NAME}") as resp,
    ):
        assert resp.status == 200
    ckpt.ack({"b": 1})
    assert await store.flush()  # PUT answers 404: created again with everything
    assert stored_states(api) == {"loki": {"a": 1, "b": 1}}


def _configmap_router(
    api: FakeApiServer,
    tmp_path: Path,
    *,
    data_dir: Path | None = None,
    watch: dict[str, Any] | None = None,
    **opts: Any,
) -> Router:
    """A router with the checkpoint in the ConfigMap (and ``data_dir`` for the rest), one memory sink;
    ``watch``: more WatchSettings (a selector)."""
    settings = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        data_dir=data_dir,
        checkpoint_configmap=NAME,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.1,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5, **(watch or {})),
    )
    sink = {"name": "mem", "batch_max_wait": 0.01, **opts}
    return Router(settings, [spec_for_class(MemorySink, sink, type_="memory")])


async def test_beside_a_configmap_checkpoint_a_data_dir_holds_the_spool_and_the_dead_letters(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """What the chart's configMap mode (two replicas, leader election) runs: the checkpoint in the
    ConfigMap, shared by the replicas, and a local data dir for the rest. A sink down for longer than
    its memory queue holds spills to disk instead of dropping, what it refuses goes to its dead-letter
    file, and no checkpoint is written to the data dir (a standby's would be stale)."""
    events = [api.create_event(event_object(namespace=NS, object_name=f"r-{i}")) for i in range(300)]
    data = tmp_path / "data"
    opts: dict[str, Any] = {
        "batch_max_wait": 0.02,
        "queue_max_events": 50,
        "batch_max_events": 20,
        "fail": True,
    }
    router = _configmap_router(api, tmp_path, data_dir=data, **opts)
    running = asyncio.create_task(router.run())
    try:
        await until(lambda: bool(router.pipelines), timeout=10)
        pipeline, sink = router.pipelines[0], router.sinks["mem"]
        assert isinstance(sink, MemorySink) and pipeline.spool is not None
        await until(lambda: pipeline.depth == 300, timeout=20)
        assert len(pipeline.spool) >= 300 - 50 - 20  # beyond the memory queue: on disk, not dropped
        refused = events[7]["metadata"]["uid"]
        sink.decide = lambda occ: reject("refused by the test") if occ.uid == refused else OK
        sink.down = False
        await sink.wait_for(299, timeout=30)
        await until(lambda: bool(api.objects("configmaps")), timeout=10)
        await until(lambda: len(stored_states(api).get("mem", {})) == 300, timeout=10)
    finally:
        router.request_stop()
        await asyncio.wait_for(running, 30)
    assert sorted(occ.uid for occ in sink.received) == sorted(
        e["metadata"]["uid"] for e in events if e is not events[7]
    )
    for reason in SINK_DROP_REASONS:
        assert router.metrics.dropped.labels("mem", reason)._value.get() == 0
    (line,) = (data / "deadletter" / "mem.jsonl").read_bytes().splitlines()
    letter = orjson.loads(line)
    assert (letter["reason"], letter["event"]["metadata"]["uid"]) == ("refused by the test", refused)
    assert not (data / "checkpoints").exists()


async def test_a_configmap_checkpoint_that_cannot_be_written_is_counted_and_exits_1(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """RBAC without update/create on configmaps (or an admission webhook): only a log line said so,
    eventrouter_checkpoint_durable stayed 1, and the stop exited 0, while a restart re-delivered all."""
    api.forbid(TOKEN, verbs=["create", "update"], resources=["configmaps"])
    for i in range(20):
        api.create_event(event_object(namespace=NS, object_name=f"w-{i}"))
    router = _configmap_router(api, tmp_path)
    running = asyncio.create_task(router.run())
    await until(lambda: bool(router.pipelines) and len(router.sinks["mem"].received) == 20, timeout=10)  # type: ignore[attr-defined]
    m = router.metrics
    await until(lambda: m.checkpoint_configmap_errors.labels("write")._value.get() >= 1, timeout=10)
    assert m.checkpoint_durable.labels("mem")._value.get() == 0
    api.permit(TOKEN)  # the role is fixed: the next write goes through
    await until(lambda: m.checkpoint_durable.labels("mem")._value.get() == 1, timeout=10)
    assert len(stored_states(api).get("mem", {})) == 20
    api.forbid(TOKEN, verbs=["create", "update"], resources=["configmaps"])
    api.create_event(event_object(namespace=NS, object_name="late"))
    await until(lambda: len(router.sinks["mem"].received) == 21, timeout=10)  # type: ignore[attr-defined]
    router.request_stop()
    await asyncio.wait_for(running, 10)
    assert router.exit_code == 1  # the last write failed: the restart re-delivers "late"


async def test_a_checkpoint_configmap_that_cannot_be_read_once_is_read_again(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A failover is when the API server answers 5xx or 429 once: the load gave up, the router exited
    1, and both replicas could crash-loop."""
    api.faults.fail_next(500, verbs=("get",), resource="configmaps")
    api.create_event(event_object(namespace=NS, object_name="after-takeover"))
    router = _configmap_router(api, tmp_path)
    running = asyncio.create_task(router.run())
    await until(lambda: bool(router.pipelines) and len(router.sinks["mem"].received) == 1, timeout=10)  # type: ignore[attr-defined]
    assert api.faults.applied == ["fail"]
    assert router.metrics.checkpoint_configmap_errors.labels("read")._value.get() == 1
    router.request_stop()
    await asyncio.wait_for(running, 10)
    assert router.exit_code == 0


async def test_a_stop_while_the_checkpoint_configmap_cannot_be_read_exits_0(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Without leader election, a SIGTERM while the ConfigMap could not be read (RBAC without `get`,
    a 5xx): the stop closed the kube client under the read's retry, whose next attempt raised
    "Session is closed" out of run(), a traceback and exit 1."""
    api.forbid(TOKEN, verbs=["get"], resources=["configmaps"])
    router = _configmap_router(api, tmp_path)
    running = asyncio.create_task(router.run())
    reads = router.metrics.checkpoint_configmap_errors.labels("read")
    await until(lambda: reads._value.get() >= 1, timeout=10)
    router.request_stop()
    await asyncio.wait_for(running, 10)  # returns, raises nothing
    assert router.exit_code == 0 and router.stopped.is_set()
    assert reads._value.get() == 1  # no read after the stop
    assert not router.pipelines  # it never got to lead


async def test_a_stop_whose_last_checkpoint_write_left_entries_out_exits_1(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over 1 MiB, the checkpoint is written without its least recently acknowledged entries, and the
    next leader delivers those events again; that stop exited 0, where one whose write failed exits 1
    (items 35, 45)."""
    for i in range(300):
        api.create_event(event_object(namespace=NS, object_name=f"t-{i}"))
    router = _configmap_router(api, tmp_path)
    running = asyncio.create_task(router.run())
    await until(lambda: router.checkpoint_store is not None, timeout=10)
    store = router.checkpoint_store
    assert store is not None
    store.limit = 2_000  # what 1 MiB is for ~60,000 events: 300 do not fit
    await until(lambda: bool(router.pipelines) and len(router.sinks["mem"].received) == 300, timeout=20)  # type: ignore[attr-defined]
    caplog.set_level(logging.ERROR, logger="eventrouter")
    router.request_stop()
    await asyncio.wait_for(running, 10)
    left_out = store.truncated
    assert 0 < left_out < 300 and len(stored_states(api)["mem"]) == 300 - left_out
    assert router.exit_code == 1
    assert any(
        f"checkpoint ConfigMap {NS}/{NAME} left out {left_out} entries" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


async def test_copies_of_deleted_events_still_spooled_at_a_clean_stop_are_not_delivered_again(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """As with a data dir checkpoint (tests/test_router.py): the relisted copies of the spooled
    occurrences wait behind newer events, the originals are delivered and their events deleted, and
    the drain deadline passes before the copies drain. The stop's last ConfigMap write lacked what
    the pipeline had accepted of the deleted events, and after the restart (the same pod, its data
    dir kept) the copies were delivered again."""

    gate = Gate()  # the sink takes a batch only when the test allows one
    allow = gate.allow

    async def stop(router: Router, running: asyncio.Task[None]) -> None:
        router.request_stop()
        await asyncio.wait_for(running, 10)
        assert router.exit_code == 0

    data = tmp_path / "data"
    opts: dict[str, Any] = {"batch_max_wait": 0.02, "queue_max_events": 10, "batch_max_events": 5}
    down = _configmap_router(api, tmp_path, data_dir=data, fail=True, **opts)
    down.settings.shutdown_timeout = 0.5
    running = asyncio.create_task(down.run())
    await until(lambda: down.ready()[0], timeout=10)
    for i in range(5):
        api.create_event(event_object(namespace=NS, object_name=f"z{i}"))  # listed last
    await until(lambda: down.pipelines[0].depth == 5, timeout=10)
    await stop(down, running)
    for i in range(10):
        api.create_event(event_object(namespace=NS, object_name=f"a{i}"))
    up = Router(down.settings, [spec_for_class(gated(gate), {"name": "mem", **opts}, type_="memory")])
    running = asyncio.create_task(up.run())
    try:
        # The 5 spooled read back before the relist came, 10 new ones, and the relisted copies.
        await until(lambda: bool(up.pipelines) and up.pipelines[0].depth == 20, timeout=20)
        await until(lambda: up.ready()[0], timeout=10)
        await allow(1)
        sink = up.sinks["mem"]
        assert isinstance(sink, MemorySink)
        await sink.wait_for(5)
        first = sink.received[:5]
        assert sorted(occ.record["involved_object"]["name"] for occ in first) == [f"z{i}" for i in range(5)]
        for occ in first:
            [gone] = [e["metadata"] for e in api.events() if e["metadata"]["uid"] == occ.uid]
            api.delete_event(gone["namespace"], gone["name"])
        await until(lambda: all(occ.uid not in up.watchers[0].tracker.seen for occ in first), timeout=10)
    finally:
        await stop(up, running)  # the drain deadline passes with the copies still waiting
        await allow(10**6)
    again = _configmap_router(api, tmp_path, data_dir=data, **opts)
    running = asyncio.create_task(again.run())
    try:
        await until(lambda: again.ready()[0], timeout=10)
        await again.pipelines[0].wait_idle(30)
    finally:
        await stop(again, running)
    got = collections.Counter(sink.keys + again.sinks["mem"].keys)  # type: ignore[attr-defined]
    assert [k for k, n in got.items() if n > 1] == []
    assert len(got) == 15


def test_a_large_checkpoint_configmap_is_written_less_often(
    store_factory: Callable[..., ConfigMapCheckpointStore],
) -> None:
    """Each write is a whole new revision in etcd, kept until compaction: a 1 MiB ConfigMap every
    second is ~300 MiB of history. At most ~64 KiB/s on average: 1 MiB every 16 s."""
    from eventrouter.cli import _parser, _settings
    from eventrouter.config import RouterConfig

    args = _parser().parse_args(["run", "--checkpoint-flush-interval", "3"])
    assert _settings(args, RouterConfig()).checkpoint_flush_interval == 3.0
    store = store_factory(flush_interval=1.0)
    assert store.write_interval == 1.0
    store.last_size = 1024 * 1024
    assert store.write_interval == 16.0


def _received(router: Router) -> int:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return len(sink.received)


def stored_unseen(api: FakeApiServer) -> dict[str, float]:
    binary = stored(api)["binaryData"]
    order = decode_state(base64.b64decode(binary[DATA_KEY]))[1]
    return decode_unseen(base64.b64decode(binary[UNSEEN_KEY]), order) if UNSEEN_KEY in binary else {}


async def test_a_scoped_watchs_first_unseen_times_go_to_the_next_leader_with_the_checkpoint(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """They lived in the leader's memory only: each new leader (a failover, a rollout) noted the
    entries of deleted events again at its own start, and with leaders changing more often than
    UNSEEN_KEEP they never went. They are written beside the checkpoint and read by the next leader."""
    selector = {"field_selector": "type=Warning"}
    objs = [api.create_event(event_object(namespace=NS, object_name=f"w-{i}")) for i in range(3)]
    uids = {o["metadata"]["uid"] for o in objs}
    router = _configmap_router(api, tmp_path, watch=selector)
    running = asyncio.create_task(router.run())
    await until(lambda: bool(router.pipelines) and _received(router) == 3, timeout=10)
    before = time.time()
    for o in objs:  # their TTL (or no longer selected: a selector cannot tell)
        api.delete_event(NS, o["metadata"]["name"])
    await until(lambda: not router.watchers[0].tracker.seen, timeout=10)
    router.request_stop()
    await asyncio.wait_for(running, 10)
    assert router.exit_code == 0
    noted = stored_unseen(api)
    assert noted.keys() == uids and all(before - 1 <= t <= time.time() for t in noted.values())

    nxt = _configmap_router(api, tmp_path, watch=selector)
    running = asyncio.create_task(nxt.run())
    try:
        await until(lambda: bool(nxt.pipelines) and nxt.ready()[0], timeout=10)
        assert nxt.fanout._unseen == noted  # not noted again at this leader's start
    finally:
        nxt.request_stop()
        await asyncio.wait_for(running, 10)
    assert stored_unseen(api) == noted


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_entries_of_events_a_selector_does_not_see_are_left_out_first_and_are_no_error(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a selector, the entries kept for deleted events counted against the 1 MiB: live entries
    were left out for them, and the stop exited 1 saying "the next leader delivers those events
    again", counting live 140 events where 60 were. They are left out first, and that alone is
    neither counted in ``truncated`` nor an error."""
    router = _configmap_router(api, tmp_path, watch={"field_selector": "type=Warning"})
    running = asyncio.create_task(router.run())
    await until(lambda: router.checkpoint_store is not None, timeout=10)
    store = router.checkpoint_store
    assert store is not None
    store.limit = 2_000  # what 1 MiB is for ~60,000 events: about 100 entries fit
    old = [api.create_event(event_object(namespace="x", object_name=f"old-{i}")) for i in range(80)]
    await until(lambda: bool(router.pipelines) and _received(router) == 80, timeout=20)
    for o in old:  # their TTL passed: DELETED
        api.delete_event("x", o["metadata"]["name"])
    live = [api.create_event(event_object(namespace="x", object_name=f"new-{i}")) for i in range(60)]
    await until(lambda: _received(router) == 140, timeout=20)
    await until(lambda: len(router.fanout._unseen) == 80, timeout=10)
    caplog.set_level(logging.WARNING, logger="eventrouter")
    router.request_stop()
    await asyncio.wait_for(running, 10)
    kept = stored_states(api)["mem"]
    assert {o["metadata"]["uid"] for o in live} <= kept.keys()
    assert store.truncated == 0 and 0 < store.unseen_left_out == 140 - len(kept)
    assert router.exit_code == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(
        f"left out the entries of {store.unseen_left_out} events" in r.getMessage() for r in caplog.records
    )
    # The times of the entries kept went with them.
    assert stored_unseen(api).keys() == kept.keys() - {o["metadata"]["uid"] for o in live}


async def test_over_the_limit_unseen_entries_go_first_and_the_error_counts_live_events_only(
    api: FakeApiServer, store_factory: Callable[..., ConfigMapCheckpointStore], caplog: Any
) -> None:
    """The error said "140 live events do not fit" for 60 live ones and 80 kept for deleted events,
    and left out live entries, the least recently acknowledged, before those."""
    live, unseen = uids(60, seed=5), uids(80, seed=6)
    store = store_factory(limit=1_000)  # ~50 entries fit
    await store.load()
    ckpt = SinkCheckpoint(store.backend("mem"))
    for part in (live[:30], unseen, live[30:]):  # the unseen ones are not the oldest
        ckpt.ack(dict.fromkeys(part, 1))
    store.save_unseen(dict.fromkeys(unseen, 1.7e9))
    with caplog.at_level(logging.WARNING):
        assert await store.flush()
    assert store.unseen_left_out == 80 and 0 < store.truncated < 30
    assert stored_states(api) == {"mem": dict.fromkeys(live[store.truncated :], 1)}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(
        f"checkpoint ConfigMap {NS}/{NAME}: 60 live events do not fit"
    )
    assert stored_unseen(api) == {}


async def test_marks_kept_at_a_stop_mid_drain_push_no_live_event_out_of_a_full_configmap(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Item 124 kept at a stop what was accepted of events deleted during a backlog's drain, all of
    them (nearly the whole drain), as the most recently acknowledged entries. Past the ConfigMap's
    limit the write leaves out the least recently acknowledged first: the live events' entries. The
    stop exited 1 and the next start delivered every live event again. Only the marks of events the
    spool still holds records of are kept now."""
    data = tmp_path / "data"
    settings = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        data_dir=data,
        checkpoint_configmap=NAME,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.1,
        checkpoint_prune_interval=0.3,  # the entries of deleted events go while the drain runs
        shutdown_timeout=0.3,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    opts = {"name": "mem", "batch_max_wait": 0.01, "queue_max_events": 10, "batch_max_events": 10}

    async def run(router: Router, body: Callable[[], Any]) -> None:
        task = asyncio.create_task(router.run())
        try:
            await until(lambda: router.ready()[0], timeout=30)
            if router.checkpoint_store is not None:
                router.checkpoint_store.limit = 6_000  # what 1 MiB is for ~60,000 events: ~350 fit
            await body()
        finally:
            router.request_stop()
            await asyncio.wait_for(task, 60)

    first = Router(settings, [spec_for_class(MemorySink, opts, type_="memory")])
    live = [api.create_event(event_object(namespace=NS, object_name=f"live{i}")) for i in range(100)]
    old: list[dict[str, Any]] = []

    async def outage() -> None:
        sink = first.sinks["mem"]
        assert isinstance(sink, MemorySink)
        await sink.wait_for(100)
        sink.down = True
        old.extend(api.create_event(event_object(namespace=NS, object_name=f"old{i}")) for i in range(300))
        await until(lambda: first.pipelines[0].depth == 300, timeout=60)

    await run(first, outage)
    for obj in old:  # their TTL passes while the sink is down
        api.delete_event(NS, obj["metadata"]["name"])
    gate = Gate()
    second = Router(settings, [spec_for_class(gated(gate), opts, type_="memory")])

    async def drain_part() -> None:
        sink = second.sinks["mem"]
        assert isinstance(sink, MemorySink)
        while len(sink.received) < 260:  # the sink is back; a rolling update comes mid-drain
            await gate.allow(1)
            await sink.wait_for(len(sink.received) + 1)
        # A prune (every 0.3 s) has moved the drained deleted events' entries to what is kept in memory.
        await until(lambda: len(second.pipelines[0]._gone) >= 250)

    await run(second, drain_part)
    await gate.allow(10**6)
    assert second.exit_code == 0
    third = Router(settings, [spec_for_class(MemorySink, opts, type_="memory")])

    async def rest() -> None:
        await third.pipelines[0].wait_idle(60)

    await run(third, rest)
    again = {(o["metadata"]["uid"], 1) for o in live} & set(third.sinks["mem"].keys)  # type: ignore[attr-defined]
    assert again == set()
