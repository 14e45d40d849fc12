"""Leader election, session 33 (item 267): a standby whose acquiring write was answered 5xx (it may
have taken effect) and which then saw another replica lead kept that mark for good: at its stop it
read the Lease, and when the API server did not answer it waited the whole renew deadline and logged
that it could not release a lease it never held. A record changed since that write, and not to us,
clears the mark: the write (conditional on the version it read) can no longer apply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.leader import LeaderElector
from eventrouter.source.kube import KubeClient, connect
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

NS, NAME = "default", "er"
# A short renew deadline: what a stop that reads an unanswered Lease waits before giving up. The
# lease outlasts the test's steps, so no standby takes over meanwhile.
LEASE, RENEW, RETRY = 30.0, 2.0, 0.2


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tokens=["ta", "tb"]) as server:
        yield server


async def _client(api: FakeApiServer, tmp_path: Path, who: str) -> KubeClient:
    return await connect(kubeconfig=api.kubeconfig(tmp_path / who, token=f"t{who}"))


def _free_lease(api: FakeApiServer) -> None:
    api.create_object(
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 0},
        },
    )


def _holder(api: FakeApiServer) -> Any:
    return api.get_object("leases", NS, NAME)["spec"].get("holderIdentity")


def _elector(kube: KubeClient, identity: str, renew: float = RENEW, retry: float = RETRY) -> LeaderElector:
    return LeaderElector(
        kube,
        namespace=NS,
        name=NAME,
        identity=identity,
        lease_duration=LEASE,
        renew_deadline=renew,
        retry_period=retry,
    )


async def _idle() -> None:
    await asyncio.Event().wait()


async def _nothing() -> None:
    pass


async def test_a_standby_that_lost_the_race_after_a_5xx_stops_without_reading_the_lease(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _free_lease(api)
    ka, kb = await _client(api, tmp_path, "a"), await _client(api, tmp_path, "b")
    # a renews only after the test's steps: every request from its lead on is b's.
    a, b = _elector(ka, "a", renew=20.0, retry=10.0), _elector(kb, "b")
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
        b = _elector(kb, "b")
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
