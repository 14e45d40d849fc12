"""Leader election, session 33 (item 264): a standby stopped while its acquiring write was applied but
not answered gives the lease back; a router whose lead fails releases the lease from its stop, after
the stop's last checkpoint write, not before it. Item 267: that mark clears once the Lease changed to
another holder."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import build_specs
from eventrouter.leader import LeaderElector
from eventrouter.source.kube import KubeClient, connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

NS, NAME = "default", "er"
# Long: a stopped process left named in the Lease holds every standby off for this long, far
# beyond the waits below; the release makes a standby take over at its next try instead.
LONG = {"lease_duration": 60.0, "renew_deadline": 40.0, "retry_period": 0.2}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tokens=["ta", "tb"]) as server:
        yield server


async def _client(api: FakeApiServer, tmp_path: Path, who: str) -> KubeClient:
    return await connect(kubeconfig=api.kubeconfig(tmp_path / who, token=f"t{who}"))


def _free_lease(api: FakeApiServer) -> None:
    """Released by a previous leader at its clean stop."""
    api.create_object(
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 2},
        },
    )


def _holder(api: FakeApiServer) -> Any:
    return api.get_object("leases", NS, NAME)["spec"].get("holderIdentity")


def _elector(
    kube: KubeClient,
    identity: str,
    *,
    lease: float = LONG["lease_duration"],
    renew: float = LONG["renew_deadline"],
    retry: float = LONG["retry_period"],
) -> LeaderElector:
    return LeaderElector(
        kube,
        namespace=NS,
        name=NAME,
        identity=identity,
        lease_duration=lease,
        renew_deadline=renew,
        retry_period=retry,
    )


async def _idle() -> None:
    await asyncio.Event().wait()


async def _nothing() -> None:
    pass


async def test_a_standby_stopped_while_its_acquiring_write_is_unanswered_gives_the_lease_back(
    api: FakeApiServer, tmp_path: Path
) -> None:
    _free_lease(api)
    ka, kb = await _client(api, tmp_path, "a"), await _client(api, tmp_path, "b")
    try:
        b = _elector(kb, "b")
        gate = api.hold_answers("PUT", "leases")
        tb = asyncio.create_task(b.run(_idle, _nothing))
        await until(lambda: api.held == 1)  # b's PUT took effect; its answer is on its way
        assert _holder(api) == "b" and not b.is_leader
        # SIGTERM on b now: the router cancels the standby's election task, then calls release().
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)
        gate.set()
        await b.release()
        # Before: release() never looked (b never saw itself as the holder); 'b' stayed named
        # for the whole lease duration, and nobody watched meanwhile.
        spec = api.get_object("leases", NS, NAME)["spec"]
        assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
        a = _elector(ka, "a")
        ta = asyncio.create_task(a.run(_idle, _nothing))
        await until(lambda: a.is_leader)
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
    finally:
        await ka.close()
        await kb.close()


@pytest.mark.parametrize(("status", "looks"), [(409, False), (422, False), (500, True)])
async def test_release_looks_at_the_lease_only_when_an_acquiring_write_may_have_taken_effect(
    api: FakeApiServer, tmp_path: Path, status: int, looks: bool
) -> None:
    """A 4xx is a definite "not applied" (409: another replica was quicker); a 5xx may come after the
    write took effect (an etcd timeout), as an unanswered write may."""
    _free_lease(api)
    kb = await _client(api, tmp_path, "b")
    try:
        b = _elector(kb, "b")
        api.faults.fail_next(status, verbs=("update",), resource="leases")
        assert not await b.try_acquire_or_renew()
        asked = len(api.requests)
        await b.release()
        assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in api.requests[asked:]] == (
            [("GET", NAME)] if looks else []
        )
        assert _holder(api) == ""  # nothing was written: not ours to clear
    finally:
        await kb.close()


async def test_failing_leader_work_can_leave_the_release_to_the_caller(
    api: FakeApiServer, tmp_path: Path
) -> None:
    ka = await _client(api, tmp_path, "a")
    try:
        a = _elector(ka, "a")
        stopped: list[bool] = []

        async def broken() -> None:
            raise RuntimeError("cannot open the data dir")

        async def on_stopped() -> None:
            stopped.append(True)

        with pytest.raises(RuntimeError, match="cannot open the data dir"):
            await a.run(broken, on_stopped, release_on_failure=False)
        assert stopped == [True] and not a.is_leader
        assert _holder(api) == "a"  # held until the caller's stop has written what it must
        await a.release()
        assert _holder(api) == ""
    finally:
        await ka.close()


def _router_settings(api: FakeApiServer, tmp_path: Path, **kw: Any) -> RouterSettings:
    return RouterSettings(
        cluster_name="test",
        kubeconfig=str(api.kubeconfig(tmp_path / "kc", token="ta")),
        metrics_addr=None,
        shutdown_timeout=3.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        leader_elect=True,
        leader_namespace=NS,
        leader_name=NAME,
        leader_identity="router_uid",
        **{**LONG, **kw},
    )


async def test_a_router_stopped_while_its_acquiring_write_is_unanswered_gives_the_lease_back(
    api: FakeApiServer, tmp_path: Path
) -> None:
    _free_lease(api)
    router = Router(_router_settings(api, tmp_path), build_specs(["stdout:"]))
    gate = api.hold_answers("PUT", "leases")
    run = asyncio.create_task(router.run())
    try:
        await until(lambda: api.held == 1)
        assert _holder(api) == "router_uid"
        router.request_stop()  # SIGTERM
        # The stop's release: its GET finds us named, its PUT clears the record (then answered).
        await until(lambda: api.held == 2)  # before: never; the Lease kept naming a stopped process
        gate.set()
        await asyncio.wait_for(run, 30)
    finally:
        gate.set()
        router.request_stop()
        await asyncio.gather(run, return_exceptions=True)
    assert _holder(api) == "" and not router.pipelines


async def test_a_router_whose_lead_fails_releases_the_lease_from_its_stop(
    api: FakeApiServer, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a directory")
    settings = _router_settings(
        api,
        tmp_path,
        data_dir=tmp_path / "file" / "data",
        checkpoint_configmap="cp",
        checkpoint_namespace=NS,
    )
    router = Router(settings, build_specs(["stdout:"]))
    await asyncio.wait_for(router.run(), 30)
    assert router.exit_code == 1
    assert _holder(api) == ""  # released, by the stop (LONG: not by expiry)


# Item 267: a standby whose acquiring write was answered 5xx (it may have taken effect) and which then
# saw another replica lead kept that mark for good: at its stop it read the Lease, and when the API
# server did not answer it waited the whole renew deadline and logged that it could not release a
# lease it never held. A record changed since that write, and not to us, clears the mark: the write
# (conditional on the version it read) can no longer apply. A short renew deadline: what a stop that
# reads an unanswered Lease waits before giving up; the lease outlasts the test's steps.
LEASE = 30.0
SHORT = {"lease": LEASE, "renew": 2.0, "retry": 0.2}


async def test_a_standby_that_lost_the_race_after_a_5xx_stops_without_reading_the_lease(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _free_lease(api)
    ka, kb = await _client(api, tmp_path, "a"), await _client(api, tmp_path, "b")
    # a renews only after the test's steps: every request from its lead on is b's.
    a, b = _elector(ka, "a", lease=LEASE, renew=20.0, retry=10.0), _elector(kb, "b", **SHORT)
    api.faults.fail_next(500, verbs=("update",), resource="leases")  # an etcd timeout: not applied
    assert not await b.try_acquire_or_renew()
    ta = asyncio.create_task(a.run(_idle, _nothing))
    tb: asyncio.Task[None] | None = None
    try:
        await until(lambda: a.is_leader)
        tb = asyncio.create_task(b.run(_idle, _nothing))
        await until(lambda: b.standby_reason().startswith("'a' holds"))  # read after a's write
        # SIGTERM on b while the API server answers no read of the Lease (a control plane draining):
        # b's standby loop is waiting on one; the router then calls release().
        gate = api.hold_answers("GET", "leases")
        await until(lambda: api.held == 1)
        asked = len(api.requests)
        with caplog.at_level(logging.INFO, logger="eventrouter.leader"):
            await b.release()
        gate.set()
        # Before: b read the Lease, waited renew_deadline for the answer, and logged "could not
        # release lease default/er (timed out)" though it never held it.
        assert api.requests[asked:] == []
        assert not [r for r in caplog.records if "could not" in r.getMessage()]
        assert _holder(api) == "a" and not b.is_leader
    finally:
        ta.cancel()
        if tb is not None:
            tb.cancel()
        await asyncio.gather(ta, *([tb] if tb else []), return_exceptions=True)
        await ka.close()
        await kb.close()


async def test_a_stop_that_cannot_check_an_unanswered_claim_says_so_not_that_it_held_the_lease(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing changed since b's claim was answered 500: it may have applied, so the stop looks (item
    264). That read unanswered, the warning said "could not release" of a lease b never saw as its."""
    _free_lease(api)
    kb = await _client(api, tmp_path, "b")
    try:
        b = _elector(kb, "b", **SHORT)
        api.faults.fail_next(500, verbs=("update",), resource="leases")
        assert not await b.try_acquire_or_renew()
        gate = api.hold_answers("GET", "leases")
        asked = len(api.requests)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="eventrouter.leader"):
            await b.release()  # gives up after renew_deadline
        gate.set()
        assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in api.requests[asked:]] == [("GET", NAME)]
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(said) == 1 and "could not release" not in said[0]
        assert "could not check whether our unanswered claim of lease default/er took effect" in said[0]
        assert _holder(api) == ""
    finally:
        await kb.close()
