"""The stop's last write of the ConfigMap checkpoint (session 31's review of leader election): the
periodic write the stop cancels, and what one write of a large checkpoint costs.

On a CPU-starved node (the chart's 100m request) the last write of 50,000 events x 7 sinks missed its
time budget, and the stop exited 1: every write encoded the whole state uid by uid in Python
(0.3-0.6 CPU-s), the cancelled write's thread went on encoding beside the last one, and a write
cancelled after its PUT was applied made the last write meet it as a 409 from "another writer"
(a GET, a decode, a merge and one more PUT).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.checkpoint import SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import (
    DATA_KEY,
    CheckpointAbandoned,
    ConfigMapCheckpointStore,
    decode_state,
)
from eventrouter.source.kube import KubeClient, connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until

NS, NAME = "default", "er-checkpoint"
TOKEN = "t0ken"
PATH = f"/api/v1/namespaces/{NS}/configmaps/{NAME}"
STORE_LOG = "eventrouter.engine.configmap_checkpoint"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        server.bookmark_interval = 0.5
        yield server


@pytest.fixture
async def kube(api: FakeApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    client = await connect(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"))
    yield client
    await client.close()


def uids(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def stored_states(api: FakeApiServer) -> dict[str, dict[str, int]]:
    cm = api.get_object("configmaps", NS, NAME)
    return decode_state(base64.b64decode(cm["binaryData"][DATA_KEY]))[0]


def requests_of(api: FakeApiServer, method: str, since: int = 0) -> int:
    return sum(1 for r in api.requests[since:] if r.method == method and r.path == PATH)


def said(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def _written_once(
    kube: KubeClient, first: dict[str, int]
) -> tuple[ConfigMapCheckpointStore, SinkCheckpoint]:
    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME, flush_interval=0.0)
    await store.load()
    ckpt = SinkCheckpoint(store.backend("mem"))
    ckpt.ack(first)
    assert await store.flush()  # created (POST): the writes below are PUTs
    return store, ckpt


async def test_the_stop_lets_a_write_whose_put_is_out_finish_and_writes_after_it(
    api: FakeApiServer, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The periodic write's PUT is applied, its answer slow: cancelled there, the last write met our
    own write as a 409, logged "changed by another writer; merging", and read, decoded and merged
    the whole ConfigMap before writing again. Now the request finishes on its own, the last write
    waits for it and then writes once."""
    ids = uids(30)
    store, ckpt = await _written_once(kube, dict.fromkeys(ids[:10], 1))
    caplog.set_level(logging.DEBUG, logger=STORE_LOG)
    answers = api.hold_answers("PUT", "configmaps")
    ckpt.ack(dict.fromkeys(ids[10:20], 1))
    periodic = asyncio.create_task(store.run())
    await api.wait_until(lambda: api.held == 1)  # applied, its answer held back
    mark = len(api.requests)
    periodic.cancel()  # what stop() does, wherever the write is
    await asyncio.gather(periodic, return_exceptions=True)
    ckpt.ack(dict.fromkeys(ids[20:], 2))  # the drain's last acks
    last = asyncio.create_task(store.flush(timeout=10))
    # It waits for that write (before: it wrote at once, met it as a 409 and read the ConfigMap).
    await until(
        lambda: said(caplog, "waiting for the write in progress") or requests_of(api, "GET", mark) > 0
    )
    answers.set()
    assert await last
    assert store.conflicts == 0 and store.errors == 0
    assert not said(caplog, "another writer")
    assert (requests_of(api, "PUT", mark), requests_of(api, "GET", mark)) == (1, 0)  # the last write only
    assert stored_states(api) == {"mem": {**dict.fromkeys(ids[:20], 1), **dict.fromkeys(ids[20:], 2)}}
    assert not store.dirty


async def test_a_write_of_ours_applied_without_an_answer_is_not_merged_as_another_writers(
    api: FakeApiServer, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer of the write in progress does not come within half the last write's bound (a dead
    connection): it is given up, and the 409 that follows is our own write, recognised by its
    content: no decode and merge of the whole ConfigMap, no "another writer"."""
    ids = uids(30, seed=2)
    store, ckpt = await _written_once(kube, dict.fromkeys(ids[:10], 1))
    caplog.set_level(logging.INFO, logger=STORE_LOG)
    answers = api.hold_answers("PUT", "configmaps")
    ckpt.ack(dict.fromkeys(ids[10:20], 1))
    periodic = asyncio.create_task(store.run())
    await api.wait_until(lambda: api.held == 1)
    periodic.cancel()
    await asyncio.gather(periodic, return_exceptions=True)
    mark = len(api.requests)
    ckpt.forget(ids[:5])  # removed since (events gone): they stay removed
    last = asyncio.create_task(store.flush(timeout=4))  # waits 2 s for the write in progress
    await until(lambda: requests_of(api, "GET", mark) == 1, timeout=10)  # after the 409
    answers.set()  # the last write's own PUT is answered
    assert await last
    assert store.conflicts == 0
    assert said(caplog, "a write of ours whose answer did not come was applied")
    assert not said(caplog, "another writer")
    assert stored_states(api) == {"mem": dict.fromkeys(ids[5:20], 1)}


async def test_a_write_cancelled_while_it_encodes_stops_its_thread(kube: KubeClient) -> None:
    """Cancelled while it encoded (in a worker thread), the write's thread went on encoding the whole
    state beside the last write's own encoding: on one CPU it doubled the last write's time."""
    store, ckpt = await _written_once(kube, dict.fromkeys(uids(10), 1))
    entered, go = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []
    build = store._build

    def observed(*args: Any) -> Any:  # the store's own _build, held at its start until the cancel
        entered.set()
        go.wait(10)
        try:
            result = build(*args)
        except BaseException as exc:
            outcome.append(exc)
            raise
        outcome.append(None)
        return result

    store._build = observed  # type: ignore[method-assign,assignment]
    ckpt.ack(dict.fromkeys(uids(2000, seed=3), 1))
    periodic = asyncio.create_task(store.run())
    await until(entered.is_set)
    periodic.cancel()
    await asyncio.gather(periodic, return_exceptions=True)
    go.set()
    await until(lambda: bool(outcome))
    assert isinstance(outcome[0], CheckpointAbandoned)


def _elected(api: FakeApiServer, tmp_path: Path) -> Router:
    settings = RouterSettings(
        kubeconfig=api.kubeconfig(tmp_path / "kubeconfig-router"),
        metrics_addr=None,
        leader_elect=True,
        leader_name="er",
        leader_identity="a",
        lease_duration=2.0,
        renew_deadline=1.5,
        retry_period=0.2,
        shutdown_timeout=8.0,
        checkpoint_configmap=NAME,
        checkpoint_flush_interval=0.1,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.2),
    )
    spec = spec_for_class(
        MemorySink, {"name": "mem", "batch_max_events": 10, "batch_max_wait": 0.01}, type_="memory"
    )
    return Router(settings, [spec])


async def test_a_leader_stopped_while_its_configmap_write_is_answered_late_writes_once_and_exits_0(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A leader stopped while its periodic ConfigMap write is applied and not yet answered: the stop's
    cancel made its last write meet that write as a 409 ("changed by another writer; merging")."""
    for i in range(20):
        api.create_event(event_object(namespace=NS, object_name=f"e-{i}"))
    router = _elected(api, tmp_path)
    running = asyncio.create_task(router.run())
    try:
        await until(lambda: bool(router.pipelines), timeout=10)
        sink = router.sinks["mem"]
        assert isinstance(sink, MemorySink)
        await sink.wait_for(20, timeout=10)
        store = router.checkpoint_store
        assert store is not None
        await until(lambda: not store.dirty and len(stored_states(api).get("mem", {})) == 20)
        caplog.set_level(logging.DEBUG, logger=STORE_LOG)
        answers = api.hold_answers("PUT", "configmaps")
        api.create_event(event_object(namespace=NS, object_name="late"))
        await api.wait_until(lambda: api.held == 1)  # its write is applied, the answer held back
        mark = len(api.requests)
        router.request_stop()
        await until(
            lambda: said(caplog, "waiting for the write in progress") or requests_of(api, "GET", mark) > 0
        )
        answers.set()
        await asyncio.wait_for(running, 20)
    finally:
        router.request_stop()
        await asyncio.wait_for(running, 20)
    assert router.exit_code == 0
    assert store.conflicts == 0 and not said(caplog, "another writer")
    assert requests_of(api, "PUT", mark) <= 1 and requests_of(api, "GET", mark) == 0
    assert len(stored_states(api)["mem"]) == 21
