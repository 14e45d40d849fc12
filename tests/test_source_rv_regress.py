"""An etcd restore takes the store's revision back below the router's resourceVersion (session 32).

The API servers restart, the watch breaks, and a watch reopened at the kept resourceVersion is not
refused: etcd and the watch cache send only changes after it, so every event written until the
store passes it again would never come. After such a break the router asks whether the store is
behind (a one-item list "not older than" its resourceVersion answers 504 ResourceVersionTooLarge),
and relists: counted, logged, nothing lost and nothing twice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


def _relists(router: Router, reason: str) -> float:
    value: float = router.metrics.relists.labels(reason)._value.get()
    return value


def _names(sink: MemorySink, prefix: str) -> list[str]:
    return sorted(
        r.record["involved_object"]["name"]
        for r in sink.received
        if r.record["involved_object"]["name"].startswith(prefix)
    )


async def _move_revision(api: FakeApiServer, to: int) -> None:
    """Other resources (Leases, ConfigMaps) move the one revision etcd shares between them all."""
    while api.resource_version < to:
        api.create_object("configmaps", {"metadata": {"generateName": "x-", "namespace": "kube-system"}})


@pytest.mark.parametrize("watch_cache", [False, True])
@pytest.mark.parametrize("reset", [True, False], ids=["watch_reset", "watch_ended"])
async def test_after_an_etcd_restore_the_router_relists_and_delivers_what_was_written_below_its_rv(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, watch_cache: bool, reset: bool
) -> None:
    """The restart breaks the watch (kube-apiserver 1.24 exits with it open), or ends it early (as a
    server that ends its watches on shutdown does)."""
    await _restore(tmp_path, caplog, watch_cache=watch_cache, reset=reset)


@pytest.mark.parametrize(
    ("status", "count", "verbs"),
    [
        (429, 1, ("list",)),
        (500, 1, ("list",)),
        (503, 1, ("list",)),
        (504, 1, ("list",)),  # a gateway's timeout: no ResourceVersionTooLarge cause
        (429, 2, ("list", "watch")),
        (403, 1, ("list",)),
    ],
    ids=["429", "500", "503", "gateway_504", "429_twice", "403"],
)
async def test_a_check_that_fails_after_an_etcd_restore_is_asked_again_before_the_watch_reopens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, status: int, count: int, verbs: tuple[str, ...]
) -> None:
    """The first checks after the restart are refused (priority and fairness while every client
    relists, a server or load balancer still warming up): the check stays armed, fails as a watch
    would (logged, counted by its status), and is asked again after the backoff, with no watch at the
    kept resourceVersion meanwhile. Cleared at the first refusal, the watch was reopened at the
    future resourceVersion and 0 of 5 came."""
    restored = await _restore(tmp_path, caplog, fault=(status, count, verbs))
    assert restored.faults.applied == ["fail"] * count
    probes = [r for r in restored.requests if r.query.get("resourceVersionMatch") == "NotOlderThan"]
    assert len(probes) == count + 1  # every refusal asked again, then answered 504
    failed = [
        r.getMessage() for r in caplog.records if "checking that the store is not behind" in r.getMessage()
    ]
    assert len(failed) == count and all(f" {status} " in m or f": {status} " in m for m in failed), failed


async def _restore(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    watch_cache: bool = False,
    reset: bool = True,
    fault: tuple[int, int, tuple[str, ...]] | None = None,
) -> FakeApiServer:
    """An etcd restore under a running router; ``fault``: the restored server's first ``count``
    requests of ``verbs`` answered ``status``. All 5 events written below the router's rv come, once.
    Returns the restored server (closed)."""
    api = FakeApiServer(token="t", watch_cache=watch_cache)
    await api.start()
    port = int(api.url.rsplit(":", 1)[1])
    for i in range(3):
        api.create_event(event_object(object_name=f"before-{i}"))
    backup, backup_rv = api.events(), api.resource_version  # the etcd snapshot
    for i in range(3):
        api.create_event(event_object(object_name=f"after-backup-{i}"))
    await _move_revision(api, api.resource_version + 200)
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    router = Router(router_settings(api, tmp_path), [spec])
    restored: FakeApiServer | None = None
    try:
        async with router.running():
            sink = _mem(router)
            await until(lambda: len(sink.keys) == 6, timeout=20)
            api.create_event(event_object(object_name="watched"))  # the router's rv is the newest
            await until(lambda: len(sink.keys) == 7, timeout=10)
            router_rv = router.watchers[0].resource_version
            assert router_rv is not None
            # etcd is restored from the snapshot; the API server restarts on the same address.
            await api.close(reset=reset)
            restored = FakeApiServer(token="t", watch_cache=watch_cache, port=port)
            for obj in backup:
                restored.create_event(obj)
            await _move_revision(restored, backup_rv)
            if fault is not None:
                status, count, verbs = fault
                restored.faults.fail_next(status, count, verbs=verbs)
            await restored.start()
            caplog.set_level(logging.WARNING, logger="eventrouter.source.watcher")
            for i in range(5):
                restored.create_event(event_object(object_name=f"after-restore-{i}"))
            assert restored.resource_version < int(router_rv)  # all written below the router's rv
            expected = [f"after-restore-{i}" for i in range(5)]
            await until(lambda: _names(sink, "after-restore") == expected, timeout=20)
            assert _relists(router, "rv_regressed") == 1
            assert len(sink.keys) == len(set(sink.keys)) == 7 + 5  # the restored 3 not again
            warned = [r.getMessage() for r in caplog.records if "store is behind" in r.getMessage()]
            assert len(warned) == 1 and f"resourceVersion {router_rv}" in warned[0]
            assert f"Too large resource version: {router_rv}" in warned[0]
            # No watch at the kept resourceVersion: the store below it never sends what it missed.
            watches = [r for r in restored.requests if r.query.get("watch") == "true"]
            assert watches and all(r.query.get("resourceVersion") != router_rv for r in watches)
            if fault is not None:
                restarts = router.metrics.watch_restarts.labels(f"http_{fault[0]}")._value.get()
                assert restarts == fault[1]  # counted as the watch's own failures are
            # The watch goes on from the relist: a later event comes through it.
            restored.create_event(event_object(object_name="after-relist"))
            await until(lambda: _names(sink, "after-relist") == ["after-relist"], timeout=10)
        return restored
    finally:
        await api.close()
        if restored is not None:
            await restored.close()


async def test_a_restart_without_a_restore_does_not_relist(tmp_path: Path) -> None:
    """The same break with the store where it was: the check answers 200 and the watch goes on at
    its resourceVersion, with no relist."""
    async with FakeApiServer(token="t", watch_cache=False) as api:
        spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
        router = Router(router_settings(api, tmp_path), [spec])
        async with router.running():
            sink = _mem(router)
            api.create_event(event_object(object_name="a"))
            await until(lambda: len(sink.keys) == 1, timeout=20)
            checks = _probes(api)
            api.disconnect_watches(reset=True)
            api.create_event(event_object(object_name="b"))
            await until(lambda: len(sink.keys) == 2, timeout=10)
            assert _probes(api) == checks + 1
            assert _relists(router, "rv_regressed") == 0 and _relists(router, "expired") == 0


@pytest.mark.parametrize("answer", [403, 500, 503])
async def test_a_check_that_fails_does_not_stop_the_watch(tmp_path: Path, answer: int) -> None:
    """The check answered with anything but a 2xx or the 504 (RBAC, an API server still starting):
    it is asked again after the backoff, and once answered 200 the watch is reopened at its
    resourceVersion, with no relist."""
    async with FakeApiServer(token="t", watch_cache=False) as api:
        spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
        router = Router(router_settings(api, tmp_path), [spec])
        async with router.running():
            sink = _mem(router)
            api.create_event(event_object(object_name="a"))
            await until(lambda: len(sink.keys) == 1, timeout=20)
            checks = _probes(api)
            api.faults.fail_next(answer, verbs=("list",))
            api.disconnect_watches(reset=True)
            api.create_event(event_object(object_name="b"))
            await until(lambda: len(sink.keys) == 2, timeout=10)
            assert api.faults.pending == 0  # the check met the fault
            assert _probes(api) == checks + 2  # refused, then asked again
            assert _relists(router, "rv_regressed") == 0 and _relists(router, "expired") == 0


async def test_a_check_that_keeps_failing_fails_the_watch_and_health(tmp_path: Path) -> None:
    """A check refused again and again is a watch that fails: no watch reopened unchecked, every
    refusal counted in watch_restarts by its status, no progress, so /healthz fails after
    --stall-timeout (the liveness probe restarts the router, which lists anew). Once answered, the
    watch goes on and the router is healthy again. (A watch with bookmarks every 0.2 s: healthy while
    it runs.)"""
    async with FakeApiServer(token="t", watch_cache=True, bookmark_interval=0.2) as api:
        spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
        settings = router_settings(api, tmp_path, stall_timeout=2.0, allow_short_stall_timeout=True)
        router = Router(settings, [spec])
        async with router.running():
            sink = _mem(router)
            api.create_event(event_object(object_name="a"))
            await until(lambda: len(sink.keys) == 1, timeout=20)
            assert router.healthy() == (True, "ok")
            api.faults.fail_next(503, count=100_000, verbs=("list",))
            watches = _watches(api)
            api.disconnect_watches(reset=True)
            await until(lambda: not router.healthy()[0], timeout=20, interval=0.1)
            assert "watch made no progress within 2s" in router.healthy()[1]
            assert _watches(api) == watches  # none reopened at a resourceVersion nobody vouched for
            assert router.metrics.watch_restarts.labels("http_503")._value.get() >= 2
            api.faults.clear()
            api.create_event(event_object(object_name="b"))
            await until(lambda: len(sink.keys) == 2, timeout=20)
            await until(lambda: router.healthy()[0], timeout=10, interval=0.1)
            assert _relists(router, "rv_regressed") == 0 and _relists(router, "expired") == 0


def _watches(api: FakeApiServer) -> int:
    return sum(1 for r in api.requests if r.query.get("watch") == "true")


def _probes(api: FakeApiServer) -> int:
    return sum(1 for r in api.requests if r.query.get("resourceVersionMatch") == "NotOlderThan")
