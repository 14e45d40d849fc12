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
            # The watch goes on from the relist: a later event comes through it.
            restored.create_event(event_object(object_name="after-relist"))
            await until(lambda: _names(sink, "after-relist") == ["after-relist"], timeout=10)
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
    """The check answered with anything but the 504 (RBAC, an API server still starting): the watch
    is reopened at its resourceVersion as before."""
    async with FakeApiServer(token="t", watch_cache=False) as api:
        spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
        router = Router(router_settings(api, tmp_path), [spec])
        async with router.running():
            sink = _mem(router)
            api.create_event(event_object(object_name="a"))
            await until(lambda: len(sink.keys) == 1, timeout=20)
            api.faults.fail_next(answer, verbs=("list",))
            api.disconnect_watches(reset=True)
            api.create_event(event_object(object_name="b"))
            await until(lambda: len(sink.keys) == 2, timeout=10)
            assert api.faults.pending == 0  # the check met the fault
            assert _relists(router, "rv_regressed") == 0 and _relists(router, "expired") == 0


def _probes(api: FakeApiServer) -> int:
    return sum(1 for r in api.requests if r.query.get("resourceVersionMatch") == "NotOlderThan")
