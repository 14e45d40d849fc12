"""Lease-based leader election against the test API server over real HTTP: one leader at a time, takeover
after the leader stops renewing (and only after it stopped leading), 409 races, release on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrouter.leader import LEASE_DURATION_MAX, LeaderElector, check_timings
from eventrouter.metrics import Metrics
from eventrouter.source.kube import KubeClient, connect
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

NS, NAME = "kube-system", "eventrouter"
LEASE = 1.0
RENEW = 0.6
RETRY = 0.1
SLACK = 0.6  # scheduling and request latency allowance for timing bounds
MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
TOKENS = {"a": "token-a", "b": "token-b"}
ADMIN = "token-admin"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{NAME}"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(tokens=[*TOKENS.values(), ADMIN]) as server:
        yield server


class Replica:
    """One elector with its own client (own token) and a monotonic record of its callbacks."""

    def __init__(self, identity: str, kube: KubeClient, **durations: float) -> None:
        self.identity = identity
        self.kube = kube
        self.metrics = Metrics()
        self.elector = LeaderElector(
            kube,
            namespace=NS,
            name=NAME,
            identity=identity,
            lease_duration=durations.get("lease_duration", LEASE),
            renew_deadline=durations.get("renew_deadline", RENEW),
            retry_period=durations.get("retry_period", RETRY),
            metrics=self.metrics,
        )
        self.log: list[tuple[str, float]] = []
        self.task: asyncio.Task[None] | None = None

    async def started(self) -> None:
        self.log.append(("started", time.monotonic()))

    async def stopped(self) -> None:
        self.log.append(("stopped", time.monotonic()))

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run(self.started, self.stopped))

    def when(self, what: str) -> list[float]:
        return [t for kind, t in self.log if kind == what]

    def gauge(self) -> float | None:
        return self.metrics.registry.get_sample_value("eventrouter_leader")

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.kube.close()


@pytest.fixture
async def replicas(api: FakeApiServer, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    made: list[Replica] = []

    async def make(identity: str, **durations: float) -> Replica:
        path = api.kubeconfig(tmp_path / f"{identity}.kubeconfig", token=TOKENS[identity])
        replica = Replica(identity, await connect(kubeconfig=path), **durations)
        made.append(replica)
        return replica

    yield make
    for r in made:
        await r.stop()


async def admin_put(api: FakeApiServer, body: dict[str, Any]) -> int:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        aiohttp.ClientSession(api.url, headers=headers) as http,
        http.put(LEASE_PATH, json=body) as resp,
    ):
        return resp.status


def lease_spec(api: FakeApiServer) -> dict[str, Any]:
    spec: dict[str, Any] = api.get_object("leases", NS, NAME)["spec"]
    return spec


async def test_two_electors_exactly_one_leader(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    # A renew deadline of seconds: at RENEW's 0.6 s a renewal slower than ~0.5 s on a loaded machine
    # made the leader step down, as it must (not what this test is about).
    durations = {"lease_duration": 3.0, "renew_deadline": 2.0}
    a, b = await replicas("a", **durations), await replicas("b", **durations)
    a.start()
    b.start()
    await until(lambda: a.elector.is_leader or b.elector.is_leader)
    leader, standby = (a, b) if a.elector.is_leader else (b, a)
    renewals = api.count_requests(path=LEASE_PATH, method="PUT")
    both = 0
    # Several renewal rounds (and more than a lease duration), checking at every step.
    deadline = time.monotonic() + durations["lease_duration"] * 1.5
    while time.monotonic() < deadline or api.count_requests(path=LEASE_PATH, method="PUT") < renewals + 10:
        both += a.elector.is_leader and b.elector.is_leader
        assert leader.elector.is_leader
        await asyncio.sleep(0.01)
    assert both == 0
    assert len(leader.when("started")) == 1 and leader.when("stopped") == []
    assert standby.log == []
    assert (leader.gauge(), standby.gauge()) == (1.0, 0.0)
    spec = lease_spec(api)
    assert spec["holderIdentity"] == leader.identity
    assert spec["leaseDurationSeconds"] == 3
    assert spec["leaseTransitions"] == 0  # created by the leader: no transition yet
    assert MICRO_TIME.fullmatch(spec["renewTime"]) and MICRO_TIME.fullmatch(spec["acquireTime"])
    assert spec["renewTime"] > spec["acquireTime"]


async def test_standby_takes_over_only_after_the_leader_stopped(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    a = await replicas("a")
    a.start()
    await until(lambda: a.elector.is_leader)
    b = await replicas("b")
    b.start()
    await until(lambda: b.elector._observed_holder == "a")  # the standby sees the lease held
    # The leader can no longer write: its token is refused from now on (RBAC revoked).
    api.forbid(TOKENS["a"], "system:serviceaccount:kube-system:eventrouter-a")
    revoked = time.monotonic()
    await until(lambda: b.when("started"), timeout=LEASE + RENEW + 5)
    taken = b.when("started")[0]
    stopped = a.when("stopped")
    assert len(stopped) == 1 and not a.elector.is_leader
    # The old leader stopped delivering before the new one started, within its renew deadline.
    assert stopped[0] < taken
    assert stopped[0] - revoked <= RENEW + SLACK
    # Takeover within the lease duration (+ a retry period to see the last renewal, + one to act on
    # expiry; retries have up to 20 % jitter), plus request latency on a shared 2-CPU machine.
    assert taken - revoked <= LEASE + 2 * RETRY * 1.2 + SLACK
    assert taken - revoked >= LEASE - RETRY  # not before the lease could expire for b
    spec = lease_spec(api)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert (a.gauge(), b.gauge()) == (0.0, 1.0)


async def test_leader_steps_down_at_once_when_another_writer_holds_the_lease(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    a = await replicas("a", lease_duration=5.0, renew_deadline=3.0, retry_period=0.1)
    a.start()
    await until(lambda: a.elector.is_leader)
    current = api.get_object("leases", NS, NAME)
    current["spec"] = {**current["spec"], "holderIdentity": "intruder", "leaseDurationSeconds": 30}
    assert await admin_put(api, current) == 200
    changed = time.monotonic()
    await until(lambda: a.when("stopped"), timeout=5)
    # At its next renewal attempt, not when its 3 s renew deadline runs out.
    assert a.when("stopped")[0] - changed < 1.0
    assert not a.elector.is_leader and a.gauge() == 0.0
    assert lease_spec(api)["holderIdentity"] == "intruder"


async def test_simultaneous_takeover_one_wins_the_other_gets_409(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    api.create_object(
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 1, "leaseTransitions": 3},
        },
    )
    a, b = await replicas("a"), await replicas("b")
    assert await a.elector.try_acquire_or_renew() is False  # held, just observed: wait for expiry
    assert await b.elector.try_acquire_or_renew() is False
    observed = time.monotonic()
    await until(lambda: time.monotonic() > observed + 1.0, timeout=3)
    # Both read the expired Lease before either writes: left to the scheduler, a loaded machine
    # sometimes served one replica's read and write before the other's read, which then saw the
    # winner and rightly wrote nothing (no 409 to count).
    reads = api.hold_answers("GET", "leases")
    attempts = asyncio.gather(a.elector.try_acquire_or_renew(), b.elector.try_acquire_or_renew())
    await until(lambda: api.held == 2, timeout=5)
    reads.set()
    results = await attempts
    assert sorted(results) == [False, True]
    winner, loser = (a, b) if results[0] else (b, a)
    assert loser.elector.conflicts == 1 and winner.elector.conflicts == 0
    spec = lease_spec(api)
    assert spec["holderIdentity"] == winner.identity and spec["leaseTransitions"] == 4


async def test_release_hands_over_at_once(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    durations = {"lease_duration": 10.0, "renew_deadline": 6.0, "retry_period": 0.1}
    a = await replicas("a", **durations)
    a.start()
    await until(lambda: a.elector.is_leader)
    b = await replicas("b", **durations)
    b.start()
    await until(lambda: b.elector._observed_holder == "a")
    released = time.monotonic()
    await a.elector.release()
    assert a.task is not None and a.task.done()  # release() ended a's election loop
    assert not a.elector.is_leader and a.gauge() == 0.0
    await until(lambda: b.when("started"), timeout=3)
    assert b.when("started")[0] - released < 1.0  # far below the 10 s lease duration
    spec = lease_spec(api)
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert a.when("stopped") == []  # shutdown path: the caller stopped delivery itself


async def test_renew_deadline_must_be_shorter_than_the_lease(
    replicas: Callable[..., Awaitable[Replica]],
) -> None:
    kube = (await replicas("a")).kube
    with pytest.raises(ValueError, match=r"renew deadline .* must be shorter than the lease duration"):
        LeaderElector(kube, namespace=NS, name=NAME, identity="x", lease_duration=10, renew_deadline=10)
    with pytest.raises(ValueError, match=r"renew deadline .* must be longer than 1.2 x the .*retry period"):
        LeaderElector(kube, namespace=NS, name=NAME, identity="x", renew_deadline=2, retry_period=2)


def test_leader_timings_are_refused_as_client_go_and_the_api_server_refuse_them() -> None:
    """leaseDurationSeconds is an int32: 1e10 was written to the Lease, the API server refused every
    write, and every replica stood by for ever. client-go also wants renewDeadline > 1.2 x retryPeriod
    (the jitter of a retry); 2.2 s against 2 s was taken."""
    check_timings(15, 10, 2)
    check_timings(LEASE_DURATION_MAX, 10, 2)
    with pytest.raises(ValueError, match=r"lease duration \(1e\+10s\) must be at most 2147483647 s: .*int32"):
        check_timings(1e10, 10, 2)
    with pytest.raises(ValueError, match=r"must be at most 2147483647"):
        check_timings(LEASE_DURATION_MAX + 0.5, 10, 2)  # written rounded up
    with pytest.raises(ValueError, match=r"renew deadline \(2.2s\) must be longer than 1.2 x the .*\(2s\)"):
        check_timings(15, 2.2, 2)
    with pytest.raises(ValueError, match=r"retry period \(nans\) must be a positive number"):
        check_timings(15, 10, math.nan)
    with pytest.raises(
        ValueError, match=r"^leader election: --renew \(20s\) must be shorter than the --lease \(15s\)"
    ):
        check_timings(15, 20, 2, ("--lease", "--renew", "--retry"))


async def test_a_standby_refused_the_lease_says_why_and_logs_it_once(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]], caplog: pytest.LogCaptureFixture
) -> None:
    """A free Lease that this replica may read but not update: the reason was cleared by each read,
    so the same 403 was logged at every retry (10 lines a second here), and /readyz said that another
    replica held the lease."""
    api.create_object(
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1},
        },
    )
    api.forbid(TOKENS["a"], verbs=["update", "create"], resources=["leases"])
    a = await replicas("a")
    caplog.set_level(logging.INFO, logger="eventrouter.leader")
    a.start()
    await until(lambda: _attempts(api) >= 10, timeout=5)  # ten refused updates
    refused = [r for r in caplog.records if r.levelno >= logging.WARNING and "403" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]
    assert a.elector.standby_reason().startswith(f"cannot read or write the lease {NS}/{NAME}: 403 Forbidden")
    assert not a.elector.is_leader
    api.permit(TOKENS["a"])
    await until(lambda: a.elector.is_leader, timeout=LEASE + SLACK)
    b = await replicas("b")
    b.start()
    await until(lambda: b.elector._observed_holder == "a")
    assert b.elector.standby_reason() == f"'a' holds the lease {NS}/{NAME}"


def _attempts(api: FakeApiServer) -> int:
    return sum(1 for r in api.requests if r.method == "PUT" and r.path == LEASE_PATH)


async def test_failing_leader_work_steps_down_releases_and_raises(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    a = await replicas("a")

    async def broken() -> None:
        raise RuntimeError("cannot start the source")

    with pytest.raises(RuntimeError, match="cannot start the source"):
        await a.elector.run(broken, a.stopped)
    assert len(a.when("stopped")) == 1 and not a.elector.is_leader
    assert lease_spec(api)["holderIdentity"] == ""  # released: a standby need not wait for expiry


async def test_stop_from_on_stopped_leading_ends_the_election_loop(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    a = await replicas("a")

    async def stopped() -> None:
        await a.stopped()
        a.elector.stop()  # the process exits instead of standing by again

    a.task = asyncio.create_task(a.elector.run(a.started, stopped))
    await until(lambda: a.when("started"))
    api.forbid(TOKENS["a"])
    await until(lambda: a.task is not None and a.task.done(), timeout=LEASE + SLACK)
    assert a.task.result() is None
    assert len(a.when("started")) == len(a.when("stopped")) == 1 and not a.elector.is_leader


async def test_a_lease_request_that_timed_out_is_named_so_in_readyz(
    api: FakeApiServer, replicas: Callable[..., Awaitable[Replica]]
) -> None:
    """asyncio's TimeoutError has no text: /readyz said "cannot read or write the lease …: TimeoutError: "."""
    api.create_object(
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15},
        },
    )
    a = await replicas("a")
    api.hold_answers("GET", "leases")  # read, never answered
    assert await a.elector.try_acquire_or_renew(timeout=0.3) is False
    assert a.elector.standby_reason().endswith(": TimeoutError: timed out"), a.elector.standby_reason()
