"""A credential rotated between reading the options and building the sink (item 264): a standby builds
its sinks when it takes the lease, maybe weeks after its options were read at start. The rotation must
be seen at the first check (or a SIGHUP) after the build, not recorded as already applied."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import build_specs
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.reload import SinkReloader, watched_state
from eventrouter.metrics import Metrics
from eventrouter.sink import SinkContext
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiSink

OLD, NEW = "old-token-7d1c", "new-token-93fa"
NS, LEASE = "default", "er"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _flag(loki: LokiReceiver, token: Path) -> str:
    return f"loki:{loki.url}?bearer_token=file:{token}&batch_max_wait=0.02"


def _settings(api: FakeApiServer, tmp_path: Path, **kw: Any) -> RouterSettings:
    return RouterSettings(
        cluster_name="test",
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        **kw,
    )


def _standby_settings(api: FakeApiServer, tmp_path: Path, reload_interval: float) -> RouterSettings:
    # Another replica holds the lease and stops renewing (it is being replaced): ours takes it once
    # the record has not changed for 2 s.
    api.create_object(
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE, "namespace": NS},
            "spec": {"holderIdentity": "old-pod", "leaseDurationSeconds": 2, "leaseTransitions": 0},
        },
    )
    return _settings(
        api,
        tmp_path,
        reload_interval=reload_interval,
        leader_elect=True,
        leader_namespace=NS,
        leader_name=LEASE,
        leader_identity="new-pod_uid",
        lease_duration=2,
        renew_deadline=1.5,
        retry_period=0.2,
    )


def _reloads(router: Router, result: str) -> float:
    value = router.metrics.registry.get_sample_value(
        "eventrouter_sink_reloads_total", {"sink": "loki", "result": result}
    )
    return value or 0.0


def _stored(loki: LokiReceiver) -> collections.Counter[str]:
    return collections.Counter(json.loads(e.line)["uid"] for e in loki.entries)


@contextlib.asynccontextmanager
async def _rotated_while_standing_by(
    router: Router, loki: LokiReceiver, volume: SecretVolume
) -> AsyncIterator[Router]:
    """Run ``router`` (its options read when it was made), rotate the token at Loki and in the
    volume while it stands by, and yield once it leads and has built its sinks."""
    run = asyncio.create_task(router.run())
    try:
        await _take_over_after_rotation(router, loki, volume)
        yield router
    finally:
        router.request_stop()
        await asyncio.wait_for(run, 30)


async def _take_over_after_rotation(router: Router, loki: LokiReceiver, volume: SecretVolume) -> None:
    await until(lambda: router.elector is not None and router.elector._observed_holder == "old-pod")
    assert not router.pipelines  # standing by: nothing built yet
    loki.bearer_token = NEW
    volume.update({"loki-token": NEW})
    await until(lambda: router.elector is not None and router.elector.is_leader, timeout=15)
    await until(lambda: bool(router.pipelines))


async def test_a_token_rotated_while_standing_by_is_applied_after_the_takeover(
    api: FakeApiServer, tmp_path: Path
) -> None:
    volume = SecretVolume(tmp_path / "secrets", {"loki-token": OLD})
    async with LokiReceiver(bearer_token=OLD) as loki:
        settings = _standby_settings(api, tmp_path, reload_interval=0.2)
        router = Router(settings, build_specs([_flag(loki, volume.file("loki-token"))]))
        async with _rotated_while_standing_by(router, loki, volume):
            for i in range(5):
                api.create_event(event_object(object_name=f"ev-{i}"))
            # Before: the sink kept the old token, every start refused 401, 0 of 5 stored for ever.
            await until(lambda: len(_stored(loki)) == 5, timeout=15)
            assert _reloads(router, "applied") == 1 and _reloads(router, "invalid") == 0
            sink = router.sinks["loki"]
            assert isinstance(sink, LokiSink) and sink.options.bearer_token is not None
            assert sink.options.bearer_token.get_secret_value() == NEW
    assert set(_stored(loki).values()) == {1}  # each once
    assert loki.pushes and all(p.status == 204 for p in loki.pushes)


async def test_a_sighup_after_the_takeover_applies_a_token_rotated_while_standing_by(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """With the periodic check off (reload_interval 0), a SIGHUP is the operator's way; it said "no
    sink's files changed"."""
    volume = SecretVolume(tmp_path / "secrets", {"loki-token": OLD})
    async with LokiReceiver(bearer_token=OLD) as loki:
        settings = _standby_settings(api, tmp_path, reload_interval=0)
        router = Router(settings, build_specs([_flag(loki, volume.file("loki-token"))]))
        async with _rotated_while_standing_by(router, loki, volume):
            router.reload_files()
            assert _reloads(router, "applied") == 1
            api.create_event(event_object(object_name="after-sighup"))
            await until(lambda: len(_stored(loki)) == 1, timeout=15)


async def test_a_file_rotated_after_the_options_were_read_and_before_the_build_is_seen_at_the_first_check(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without leader election the same gap, shorter: the spools opened at start (item 223)."""
    caplog.set_level(logging.INFO)
    token = tmp_path / "token"
    token.write_text(OLD)
    async with LokiReceiver(bearer_token=NEW) as loki:
        router = Router(_settings(api, tmp_path, reload_interval=0), build_specs([_flag(loki, token)]))
        token.write_text(NEW)
        async with router.running(watch=False):
            (reloader,) = router.reloaders
            assert reloader.settling  # changed since the options were read
            assert reloader.check()  # unchanged since the build: settled, applied at once
            assert not reloader.check()
            assert _reloads(router, "applied") == 1
    assert (
        f"sink loki: {token} (bearer_token) changed (bearer_token); the sink is rebuilt with it before its "
        "next send"
    ) in caplog.messages
    assert OLD not in caplog.text and NEW not in caplog.text


def _pipeline(spec: Any, metrics: Metrics) -> Pipeline:
    context = SinkContext(name=spec.name, cluster="t", data_dir=None, logger=logging.getLogger(spec.name))
    return Pipeline(
        name=spec.name,
        sink=spec.build(context),
        options=spec.pipeline,
        predicate=compile_filter(spec.filter),
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(None, sink=spec.name),
        metrics=metrics,
    )


async def test_every_sink_built_from_the_options_read_at_start_sees_a_rotation_since(tmp_path: Path) -> None:
    """A sink built again from the same start options (a later takeover in one process) starts from
    the files as those options read them, not from what an earlier instance's reloader applied."""
    token = tmp_path / "token"
    token.write_text(OLD)
    (spec,) = build_specs([f"loki:http://127.0.0.1:9?bearer_token=file:{token}"])
    read = watched_state(spec)
    token.write_text(NEW)
    metrics = Metrics()
    first = SinkReloader(spec, _pipeline(spec, metrics), metrics, read)
    assert first.check() and not first.check()
    later = SinkReloader(spec, _pipeline(spec, metrics), metrics, read)
    assert later.check()
    # Built from options read after the rotation: nothing to apply.
    (fresh,) = build_specs([f"loki:http://127.0.0.1:9?bearer_token=file:{token}"])
    current = SinkReloader(fresh, _pipeline(fresh, metrics), metrics, watched_state(fresh))
    assert not current.settling and not current.check()
    applied = metrics.registry.get_sample_value(
        "eventrouter_sink_reloads_total", {"sink": "loki", "result": "applied"}
    )
    assert applied == 2
