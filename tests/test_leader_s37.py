"""Leader election, session 37 (review-b): a Lease or checkpoint ConfigMap name the API server refuses is
refused at start, naming the flag (F1); a stopping leader gives the lease up right after its last
checkpoint write, not after its sinks closed (F2); a failed lead is not logged as a lost lease (N1);
leadership changes and failed renewals are counted (N2); the durations' error says what they take (N3)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_ha import _elected, _mem, checkpoint_version, holder
from test_leader_s33 import _router_settings

from eventrouter.app import Router
from eventrouter.cli import main
from eventrouter.config import build_specs, spec_for_class
from eventrouter.leader import LeaderElector
from eventrouter.metrics import LEADER_TRANSITION_REASONS, LEASE_RENEW_FAILURE_REASONS, Metrics
from eventrouter.source.kube import connect
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t0ken") as server:  # as test_ha's: its helpers use this token
        server.bookmark_interval = 0.5
        yield server


# ---- F1 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--leader-elect-name", "EventRouter", "is not a Lease name"),
        ("--leader-elect-name", "a/b", "is not a Lease name"),
        ("--leader-elect-namespace", "Default", "is not a namespace name"),
        ("--leader-elect-namespace", "a" * 64, "is not a namespace name"),
        ("--checkpoint-configmap", "Er_Checkpoint", "is not a ConfigMap name"),
    ],
)
async def test_a_name_the_api_server_refuses_is_refused_at_start_naming_the_flag(
    api: FakeApiServer, tmp_path: Path, flag: str, value: str, says: str
) -> None:
    """Accepted, `--leader-elect-name=EventRouter` got 422 at every create of the Lease: every replica
    stood by for ever, Ready, and nothing was delivered; a bad ConfigMap name was never written (every
    failover delivered everything again). The real process, against the test API server."""
    api.create_event(event_object(object_name="e1"))
    out = tmp_path / "events.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventrouter.cli", "run", "--kubeconfig", api.kubeconfig(tmp_path / "kc"),
        f"--sink=file:{out}?batch_max_wait=0.05", "--metrics-addr", "127.0.0.1:0", "--leader-elect",
        f"{flag}={value}",
        env={**os.environ, "POD_NAME": "er-0", "POD_UID": "u0", "POD_NAMESPACE": "default"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 10)  # before: still running, standing by
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
    assert proc.returncode == 2
    text = err.decode()
    assert f"argument {flag}:" in text and says in text, text
    assert api.objects("leases") == [] and api.objects("configmaps") == []


def test_the_leader_durations_error_says_they_take_more_than_0(capsys: pytest.CaptureFixture[str]) -> None:
    """N3: `-1`, `inf` and `nan` were told "0 or more", which 0 is not either ("must be more than 0")."""
    for flag, value in (
        ("--leader-elect-renew-deadline", "-1"),
        ("--leader-elect-retry-period", "inf"),
        ("--leader-elect-lease-duration", "nan"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(["run", "--sink=stdout:", "--leader-elect", flag, value])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: {value!r}: expected a finite number of seconds, more than 0" in err, err
        assert "0 or more" not in err


# ---- F2 -----------------------------------------------------------------------------------------


class HangingClose(MemorySink):
    """Delivers as a MemorySink does; its close waits for ``gate`` (a broker gone at the stop)."""

    gate: asyncio.Event | None = None

    async def aclose(self) -> None:
        self.closed += 1
        assert HangingClose.gate is not None
        await HangingClose.gate.wait()


async def test_a_stopping_leader_gives_the_lease_up_after_its_checkpoint_write_not_after_its_sinks_close(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """review-b F2: the lease was released only once every sink had closed, so one hung close kept it
    renewed and every replica off it until the close budget ran out (shutdown_timeout + 4 s; 12 s
    here, 29 s with the chart's values) while nobody delivered. Now the standby takes over at its next
    retry; the checkpoint the leader wrote at its stop comes first, so the standby sends nothing the
    leader delivered and skips nothing it did not."""
    HangingClose.gate = gate = asyncio.Event()
    spec = spec_for_class(
        HangingClose, {"name": "mem", "batch_max_events": 10, "batch_max_wait": 0.01}, type_="memory"
    )
    a = Router(_elected(api, tmp_path, "a").settings, [spec])  # test_ha's settings, this sink
    b = _elected(api, tmp_path, "b")
    running_a = asyncio.create_task(a.run())
    running_b: asyncio.Task[None] | None = None
    try:
        await until(lambda: holder(api) == "a" and bool(a.pipelines), timeout=10)
        running_b = asyncio.create_task(b.run())
        for i in range(20):
            api.create_event(event_object(object_name=f"e-{i}"))
        await _mem(a).wait_for(20)
        await until(lambda: b.elector is not None and b.elector.standby_reason().startswith("'a'"))
        written = checkpoint_version(api)
        a.request_stop()  # what SIGTERM does
        await until(lambda: checkpoint_version(api) != written, timeout=10)  # the stop's last write
        last_write = int(checkpoint_version(api) or 0)
        # Before: 12 s (the close budget), then b. A close still hangs: a has not stopped.
        await until(lambda: holder(api) == "b" and bool(b.pipelines), timeout=4)
        assert not a.stopped.is_set() and _mem(a).closed == 1
        lease = api.get_object("leases", "default", "er")
        assert int(lease["metadata"]["resourceVersion"]) > last_write  # written, then released
        during = api.create_event(event_object(object_name="during-hand-over"))["metadata"]["uid"]
        await _mem(b).wait_for(1)
        gate.set()
        await asyncio.wait_for(running_a, 10)
        assert a.exit_code == 0
        # Each occurrence once: a's 20 (covered by its last write), the one after the hand-over b's.
        assert len(_mem(a).received) == 20 and len(set(_mem(a).keys)) == 20
        assert [o.uid for o in _mem(b).received] == [during]
        assert {(e["metadata"]["uid"], 1) for e in api.events()} == set(_mem(a).keys) | set(_mem(b).keys)
    finally:
        gate.set()
        a.request_stop()
        if running_b is not None:
            b.request_stop()
        await asyncio.wait_for(asyncio.gather(running_a, *([running_b] if running_b else [])), 30)


# ---- N1 -----------------------------------------------------------------------------------------


async def test_a_lead_that_fails_is_not_logged_as_a_lost_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """review-b N1: a lead that failed (the data dir under a regular file) logged "lost the lease" at
    ERROR while the lease was still held (the stop releases it): an alert on that line fired for a
    start failure."""
    (tmp_path / "file").write_text("not a directory")
    caplog.set_level(logging.INFO)
    async with FakeApiServer(tokens=["ta"]) as server:
        settings = _router_settings(
            server,
            tmp_path,
            data_dir=tmp_path / "file" / "data",
            checkpoint_configmap="cp",
            checkpoint_namespace="default",
        )
        router = Router(settings, build_specs(["stdout:"]))
        await asyncio.wait_for(router.run(), 30)
        assert server.get_object("leases", "default", "er")["spec"]["holderIdentity"] == ""
    assert router.exit_code == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "eventrouter"]
    assert not any("lost the lease" in m for m in messages), messages
    assert any(m.startswith("could not start leading") for m in messages), messages
    assert (
        router.metrics.registry.get_sample_value(
            "eventrouter_leader_transitions_total", {"reason": "released"}
        )
        == 1
        and router.metrics.registry.get_sample_value(
            "eventrouter_leader_transitions_total", {"reason": "lost"}
        )
        == 0
    )


# ---- N2 -----------------------------------------------------------------------------------------


def _count(metrics: Metrics, name: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(f"{name}_total", {"reason": reason})
    assert value is not None, (name, reason)
    return value


async def test_leadership_changes_and_failed_renewals_are_counted(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """review-b N2: only the gauge eventrouter_leader said anything: a renewal that failed and
    recovered within the deadline, or leadership that flapped between two scrapes, left no trace in
    /metrics. Every reason is exported at 0 from the start, as the project's other counters."""
    caplog.set_level(logging.INFO, logger="eventrouter.leader")
    kube = await connect(kubeconfig=api.kubeconfig(tmp_path / "kc"))
    metrics = Metrics()
    for reason in LEADER_TRANSITION_REASONS:
        assert _count(metrics, "eventrouter_leader_transitions", reason) == 0
    for reason in LEASE_RENEW_FAILURE_REASONS:
        assert _count(metrics, "eventrouter_lease_renew_failures", reason) == 0
    elector = LeaderElector(
        kube, namespace="default", name="er", identity="a", lease_duration=3, renew_deadline=2,
        retry_period=0.1, metrics=metrics,
    )  # fmt: skip
    stopped = asyncio.Event()

    async def lead() -> None:
        await asyncio.Event().wait()

    async def lost() -> None:
        elector.stop()
        stopped.set()

    running = asyncio.create_task(elector.run(lead, lost))
    try:
        await until(lambda: elector.is_leader)
        assert _count(metrics, "eventrouter_leader_transitions", "acquired") == 1
        # Two renewals fail (a 409, then an etcd timeout), the third succeeds: still leading.
        api.faults.fail_next(409, verbs=("update",), resource="leases")
        api.faults.fail_next(503, verbs=("update",), resource="leases")
        await until(lambda: _count(metrics, "eventrouter_lease_renew_failures", "server_error") == 1)
        assert _count(metrics, "eventrouter_lease_renew_failures", "conflict") == 1
        await until(lambda: any("renewed again" in r.getMessage() for r in caplog.records))
        assert elector.is_leader and _count(metrics, "eventrouter_leader_transitions", "lost") == 0
        # RBAC revoked: every renewal is refused until the deadline, and the lease is lost.
        api.forbid("t0ken")
        await asyncio.wait_for(stopped.wait(), 10)
        assert _count(metrics, "eventrouter_lease_renew_failures", "forbidden") >= 1
        assert _count(metrics, "eventrouter_leader_transitions", "lost") == 1
        await asyncio.wait_for(running, 10)
        await elector.release()  # not the holder any more as far as it knows: nothing to release
        assert _count(metrics, "eventrouter_leader_transitions", "released") == 0
        assert _count(metrics, "eventrouter_leader_transitions", "release_failed") == 0
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await kube.close()


async def _idle() -> None:
    await asyncio.Event().wait()


async def test_a_released_lease_is_counted(api: FakeApiServer, tmp_path: Path) -> None:
    """The clean stop's release, and one the API server refuses (a standby then waits the lease out)."""
    for refused in (False, True):
        kube = await connect(kubeconfig=api.kubeconfig(tmp_path / "kc"))
        metrics = Metrics()
        elector = LeaderElector(
            kube, namespace="default", name="er", identity=f"x{refused}", lease_duration=3,
            renew_deadline=2, retry_period=0.1, metrics=metrics,
        )  # fmt: skip
        running = asyncio.create_task(elector.run(_idle, _idle))
        try:
            await until(lambda e=elector: e.is_leader)  # type: ignore[misc]
            if refused:
                api.faults.fail_next(500, verbs=("update",), resource="leases")
            await elector.release()
            released = _count(metrics, "eventrouter_leader_transitions", "released")
            failed = _count(metrics, "eventrouter_leader_transitions", "release_failed")
            assert (released, failed) == ((0, 1) if refused else (1, 0))
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await kube.close()
