"""What a restart with another configuration, or a stop whose last write meets a busy API server, keeps
for the next start (session 29's reviews of high availability and of the spool):

- the ConfigMap checkpoint keeps the entries of a sink the running configuration lacks (a rollback, a
  sink enabled again), pruned to the events the API server holds, for a bounded time, left out
  first when over 1 MiB;
- the stop's last ConfigMap write is tried again within the grace period before the lease is
  released;
- a sink whose spool is turned off at a restart has what its spool folder holds said and counted.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.checkpoint import SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import DATA_KEY, ConfigMapCheckpointStore, decode_state
from eventrouter.engine.spool import Spool
from eventrouter.source.kube import KubeClient, connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "er-checkpoint"
TOKEN = "t0ken"
KEEP = 2 * 3600  # UNCONFIGURED_KEEP, as documented


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        server.bookmark_interval = 0.5
        yield server


@pytest.fixture
async def kube(api: FakeApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    client = await connect(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig-store"))
    yield client
    await client.close()


def stored(api: FakeApiServer) -> dict[str, Any]:
    return api.get_object("configmaps", NS, NAME)


def stored_states(api: FakeApiServer) -> dict[str, dict[str, int]]:
    return decode_state(base64.b64decode(stored(api)["binaryData"][DATA_KEY]))[0]


def sink_spec(name: str, **opts: Any) -> Any:
    return spec_for_class(MemorySink, {"name": name, "batch_max_wait": 0.01, **opts}, type_="memory")


def configmap_router(api: FakeApiServer, tmp_path: Path, sinks: list[str], **settings: Any) -> Router:
    """The chart's default mode: the checkpoint in the ConfigMap, a data dir of its own per pod."""
    options = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        checkpoint_configmap=NAME,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.1,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        **settings,
    )
    return Router(options, [sink_spec(name) for name in sinks])


def received(router: Router, sink: str) -> list[tuple[str, int]]:
    got = router.sinks[sink]
    assert isinstance(got, MemorySink)
    return got.keys


async def run_once(router: Router, body: Callable[[], Awaitable[None]] | None = None) -> None:
    """Start, deliver what the relist brings, run ``body``, stop (SIGTERM)."""
    task = asyncio.create_task(router.run())
    try:
        await until(lambda: router.ready()[0], timeout=20)
        for p in router.pipelines:
            await p.wait_idle(20)
        if body is not None:
            await body()
    finally:
        router.request_stop()
        await asyncio.wait_for(task, 30)


async def replace_configmap(api: FakeApiServer, obj: dict[str, Any]) -> None:
    """Write the ConfigMap as another router would (a PUT over HTTP)."""
    async with (
        aiohttp.ClientSession(api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.put(f"/api/v1/namespaces/{NS}/configmaps/{NAME}", json=obj) as resp,
    ):
        assert resp.status == 200, await resp.text()


# ---- the entries of a sink not configured ----------------------------------------------------------


async def test_a_sink_taken_out_of_the_configuration_and_back_gets_nothing_twice(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ConfigMap checkpoint wrote back only the sinks configured: one start without sink `robot`
    (a `helm upgrade` that removed it) erased its entries, and the rollback sent it again everything
    the API server held (40 of 40 here; an alert robot pages again)."""
    events = [api.create_event(event_object(namespace=NS, object_name=f"e-{i}")) for i in range(40)]
    uids = {e["metadata"]["uid"] for e in events}
    first = configmap_router(api, tmp_path, ["loki", "robot"])
    await run_once(first)
    assert len(received(first, "robot")) == 40 and first.exit_code == 0

    caplog.set_level(logging.INFO, logger="eventrouter")
    upgraded = configmap_router(api, tmp_path, ["loki"])
    await run_once(upgraded)
    assert upgraded.exit_code == 0
    assert stored_states(api)["robot"].keys() == uids  # written back by the router without it
    assert any(
        f"checkpoint ConfigMap {NS}/{NAME}: keeping the entries of sink 'robot', which is not configured (40 events"
        in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]

    new = api.create_event(event_object(namespace=NS, object_name="new"))
    rollback = configmap_router(api, tmp_path, ["loki", "robot"])
    await run_once(rollback, lambda: rollback.sinks["robot"].wait_for(1))  # type: ignore[attr-defined]
    assert [uid for uid, _ in received(rollback, "robot")] == [new["metadata"]["uid"]]
    assert received(rollback, "loki") == received(rollback, "robot")
    assert "unconfigured" not in stored(api)["data"]  # configured again


async def test_the_kept_entries_are_pruned_to_the_events_the_api_server_holds_and_dropped_after_two_hours(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kept, they must not grow without bound: pruned at each complete list (an unscoped watch) as
    the configured sinks' entries are, and dropped once not configured for UNCONFIGURED_KEEP (2 h),
    counted from the time the ConfigMap carries, so restarts do not renew it."""
    events = [api.create_event(event_object(namespace=NS, object_name=f"p-{i}")) for i in range(30)]
    await run_once(configmap_router(api, tmp_path, ["loki", "robot"]))
    for e in events[:10]:  # their TTL passes
        api.delete_event(NS, e["metadata"]["name"])
    live = {e["metadata"]["uid"] for e in events[10:]}
    before = time.time()
    await run_once(configmap_router(api, tmp_path, ["loki"]))
    assert stored_states(api)["robot"].keys() == live  # pruned as loki's are
    since = orjson.loads(stored(api)["data"]["unconfigured"])
    assert since.keys() == {"robot"} and before - 1 <= since["robot"] <= time.time()

    # Written without it more than two hours ago (as a router then wrote it): dropped at the next write.
    cm = stored(api)
    cm["data"]["unconfigured"] = orjson.dumps({"robot": int(time.time()) - KEEP - 60}).decode()
    await replace_configmap(api, cm)
    caplog.set_level(logging.INFO, logger="eventrouter")
    api.create_event(event_object(namespace=NS, object_name="later"))
    later = configmap_router(api, tmp_path, ["loki"])
    await run_once(later, lambda: later.sinks["loki"].wait_for(1))  # type: ignore[attr-defined]
    assert set(stored_states(api)) == {"loki"} and "unconfigured" not in stored(api)["data"]
    assert any(
        "dropped the 20 entries of sink 'robot', not configured since" in r.getMessage()
        for r in caplog.records
    )


async def test_a_merge_keeps_another_writers_entries_of_a_sink_not_configured_here(
    api: FakeApiServer, kube: KubeClient
) -> None:
    """During a rollout the old leader (with `robot`) may write after the new one (without it) read the
    ConfigMap: the new leader's 409 merge took only its own sinks, and erased what robot accepted."""

    def store() -> ConfigMapCheckpointStore:
        return ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)

    seed = store()
    await seed.load()
    for name in ("loki", "robot"):
        SinkCheckpoint(seed.backend(name)).ack({"u1": 1})
    assert await seed.flush()
    new, old = store(), store()
    await new.load()
    await old.load()
    SinkCheckpoint(old.backend("loki")).ack({"u2": 1})
    SinkCheckpoint(old.backend("robot")).ack({"u2": 1, "u1": 2})
    assert await old.flush()
    SinkCheckpoint(new.backend("loki")).ack({"u3": 1})  # new has no robot
    assert await new.flush()  # 409: merged
    assert new.conflicts == 1
    assert stored_states(api) == {"loki": {"u1": 1, "u2": 1, "u3": 1}, "robot": {"u1": 2, "u2": 1}}


async def test_a_sink_not_configured_is_left_out_first_when_the_configmap_is_full(
    api: FakeApiServer, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Written back while they fit; over the limit its entries go before any configured sink's, said
    once at WARNING, and not counted as truncated (no error, the stop exits 0)."""
    rng = random.Random(7)
    live = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(200)]  # incompressible
    seed = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await seed.load()
    SinkCheckpoint(seed.backend("loki")).ack(dict.fromkeys(live[:100], 1))
    SinkCheckpoint(seed.backend("robot")).ack(dict.fromkeys(live[100:], 1))  # another filter
    assert await seed.flush()

    store = ConfigMapCheckpointStore(kube, namespace=NS, name=NAME)
    await store.load()
    loki = SinkCheckpoint(store.backend("loki"))
    loki.ack({"one-more": 1})
    assert await store.flush()
    assert stored_states(api)["robot"] == dict.fromkeys(live[100:], 1)  # fits: kept

    store.limit = store.last_size - 200  # robot's entries no longer fit, loki's do
    loki.ack({"two-more": 1})
    with caplog.at_level(logging.WARNING):
        assert await store.flush()
    assert stored_states(api) == {"loki": {**dict.fromkeys(live[:100], 1), "one-more": 1, "two-more": 1}}
    assert store.unconfigured_left_out == 100 and store.truncated == 0
    assert orjson.loads(stored(api)["data"]["summary"])["unconfigured_left_out"] == 100
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "sinks that are not configured (robot: 100)" in m], messages
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# ---- the stop's last ConfigMap write ---------------------------------------------------------------


def elected(api: FakeApiServer, tmp_path: Path, identity: str) -> Router:
    settings = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / f"kubeconfig-{identity}")),
        metrics_addr=None,
        leader_elect=True,
        leader_name="er",
        leader_identity=identity,
        lease_duration=4.0,
        renew_deadline=3.0,
        retry_period=0.3,
        shutdown_timeout=5.0,
        checkpoint_configmap=NAME,
        checkpoint_namespace=NS,
        # No periodic write while the test runs: the stop's write is the only one.
        checkpoint_flush_interval=60.0,
        data_dir=tmp_path / f"data-{identity}",
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.2),
    )
    return Router(settings, [sink_spec("mem", batch_max_events=10)])


def holder(api: FakeApiServer) -> str | None:
    try:
        return (api.get_object("leases", "default", "er").get("spec") or {}).get("holderIdentity") or None
    except Exception:
        return None


async def lead_then_stop(
    api: FakeApiServer, tmp_path: Path, fault: Callable[[], None]
) -> tuple[Router, Router, asyncio.Task[None], float]:
    """Leader `a` delivers 50 events, standby `b` waits; ``fault`` is set, then `a` gets SIGTERM and
    `b` takes over. Returns both, b's task and how long a's stop took."""
    for i in range(50):
        api.create_event(event_object(namespace=NS, object_name=f"s-{i}"))
    a, b = elected(api, tmp_path, "a"), elected(api, tmp_path, "b")
    ra = asyncio.create_task(a.run())
    await until(lambda: holder(api) == "a" and bool(a.watchers) and a.ready()[0], timeout=20)
    rb = asyncio.create_task(b.run())
    await a.sinks["mem"].wait_for(50)  # type: ignore[attr-defined]
    await until(
        lambda: b.elector is not None and b.elector.standby_reason().startswith("'a' holds"), timeout=10
    )
    assert api.objects("configmaps") == []
    fault()
    stopping = time.monotonic()
    a.request_stop()
    await asyncio.wait_for(ra, 30)
    took = time.monotonic() - stopping
    await until(lambda: holder(api) == "b" and bool(b.watchers) and b.ready()[0], timeout=20)
    await b.pipelines[0].wait_idle(20)
    return a, b, rb, took


@pytest.mark.parametrize("status", [429, 503])
async def test_the_stops_last_configmap_write_is_tried_again_before_the_lease_is_released(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    """One 429 (priority and fairness) or 503 on the stop's write: the lease was released at once, the
    stop exited 1, and the standby sent again everything accepted since the previous write (here all
    50: there was none)."""
    caplog.set_level(logging.INFO, logger="eventrouter")

    def fault() -> None:
        retry_after = 1 if status == 429 else None
        api.faults.fail_next(
            status, verbs=("update", "create"), resource="configmaps", retry_after=retry_after
        )

    a, b, rb, _ = await lead_then_stop(api, tmp_path, fault)
    try:
        assert api.faults.applied == ["fail"]
        assert received(b, "mem") == []  # nothing sent twice
        assert len(stored_states(api)["mem"]) == 50
        assert a.exit_code == 0
        messages = [r.getMessage() for r in caplog.records]
        assert any(
            f"checkpoint ConfigMap {NS}/{NAME} written at the stop's attempt 2; releasing the lease" in m
            for m in messages
        ), messages
    finally:
        b.request_stop()
        await asyncio.wait_for(rb, 30)


async def test_a_stop_whose_configmap_write_keeps_failing_releases_the_lease_within_the_grace_period(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tried again for at most the renew deadline (3 s here), then the lease is released and the stop
    says so and exits 1."""
    caplog.set_level(logging.INFO, logger="eventrouter")

    def fault() -> None:
        api.faults.fail_next(503, count=1000, verbs=("update", "create"), resource="configmaps")

    a, b, rb, took = await lead_then_stop(api, tmp_path, fault)
    try:
        tries = len(api.faults.applied)
        assert a.exit_code == 1 and tries > 2
        assert took < a.settings.renew_deadline + 2.5  # the drain, the retries, the release
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(
            f"checkpoint ConfigMap {NS}/{NAME} not written at the stop after {tries} attempts (no time left"
            in m
            and "releasing the lease: the next leader delivers again" in m
            for m in errors
        ), errors
    finally:
        api.faults.clear()
        b.request_stop()
        await asyncio.wait_for(rb, 30)


# ---- a spool turned off at a restart ---------------------------------------------------------------


@pytest.mark.parametrize("off", ["spool_max_bytes", "data_dir_max_bytes"])
async def test_a_spool_turned_off_at_a_restart_is_reported_with_what_it_holds(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, off: str
) -> None:
    """spool_max_bytes=0 (or --data-dir-max-bytes leaving no room) at a restart: the spool the last run
    kept was not opened and not reported (a configured sink's folder is no orphan): its records of
    events expired meanwhile were lost without a word, a metric or an exit code."""
    data = tmp_path / "data"
    opts: dict[str, Any] = {"queue_max_events": 10, "batch_max_events": 5, "fail": True}
    settings = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        data_dir=data,
        shutdown_timeout=0.5,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    down = Router(settings, [sink_spec("mem", **opts)])
    task = asyncio.create_task(down.run())
    try:
        await until(lambda: down.ready()[0], timeout=20)
        for i in range(40):
            api.create_event(event_object(object_name=f"o-{i}"))
        await until(lambda: down.pipelines[0].depth == 40, timeout=20)
    finally:
        down.request_stop()
        await asyncio.wait_for(task, 30)
    kept = Spool(data / "spool" / "mem", max_bytes=1 << 40)
    held = len(kept) + kept.parked_count
    kept.close()
    assert held == 40

    caplog.set_level(logging.WARNING, logger="eventrouter")
    again = Router(
        dataclasses.replace(settings, data_dir_max_bytes=1 if off == "data_dir_max_bytes" else None),
        [sink_spec("mem", **({"spool_max_bytes": 0} if off == "spool_max_bytes" else {}))],
    )
    async with again.running(watch=False):
        assert again.pipelines[0].spool is None
    assert again.metrics.orphaned.labels("mem")._value.get() == 40
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "sink mem runs without a spool" in m
        and f"{data / 'spool' / 'mem'} holds 40 occurrences (0 of them parked" in m
        for m in warnings
    ), warnings
