"""Two replicas with --leader-elect and the checkpoint in a ConfigMap, as real processes against the
test API server: one delivers at a time, a standby takes over and resumes from the checkpoint."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.cli import leader_identity
from eventrouter.config import spec_for_class
from eventrouter.record import occurrence_number
from eventrouter.sink import OK, retry
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t0ken") as server:
        server.bookmark_interval = 0.5
        yield server


class Replica:
    def __init__(self, api: FakeApiServer, tmp: Path, name: str, pod: tuple[str, str] | None = None) -> None:
        self.name = name
        # POD_NAME and POD_UID, as the chart gives them: the pod "name" with uid "uid-name" by default.
        self.pod = pod or (name, f"uid-{name}")
        self.kubeconfig = api.kubeconfig(tmp / f"kubeconfig-{name}")
        self.out = tmp / f"events-{name}.jsonl"
        self.log = tmp / f"{name}.log"
        self.data = tmp / f"data-{name}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as log:  # noqa: ASYNC230 - tiny, once per start
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "eventrouter.cli", "run",
                "--kubeconfig", self.kubeconfig, "--metrics-addr", "127.0.0.1:0",
                f"--sink=file:{self.out}?batch_max_events=20&batch_max_wait=0.05",
                "--leader-elect", "--leader-elect-name", "er",
                "--leader-elect-lease-duration", "2", "--leader-elect-renew-deadline", "1.5",
                "--leader-elect-retry-period", "0.2", "--checkpoint-configmap", "er-checkpoint",
                # As the chart runs them: each replica's own spool and dead letters.
                "--data-dir", self.data, "--data-dir-max-bytes", "64Mi",
                env={**os.environ, "POD_NAME": self.pod[0], "POD_UID": self.pod[1], "POD_NAMESPACE": "default"},
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

    def delivered(self) -> list[tuple[str, int]]:
        if not self.out.exists():
            return []
        return [(d["uid"], d["occurrence"]) for d in map(json.loads, self.out.read_text().splitlines())]

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 30)


def holder(api: FakeApiServer) -> str | None:
    """The pod holding the lease (its identity is the pod's name, "_", its uid)."""
    try:
        lease = api.get_object("leases", "default", "er")
    except Exception:
        return None
    identity = (lease.get("spec") or {}).get("holderIdentity") or ""
    return identity.split("_", 1)[0] or None


def _renewed(api: FakeApiServer) -> Any:
    return (api.get_object("leases", "default", "er").get("spec") or {}).get("renewTime")


async def _next_renewal(api: FakeApiServer) -> None:
    renewed = _renewed(api)
    await until(lambda: _renewed(api) != renewed, timeout=10)


def checkpoint_version(api: FakeApiServer) -> str | None:
    try:
        return str(api.get_object("configmaps", "default", "er-checkpoint")["metadata"]["resourceVersion"])
    except Exception:
        return None


def expected(api: FakeApiServer) -> set[tuple[str, int]]:
    return {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_standby_takes_over_and_nothing_is_lost(api: FakeApiServer, tmp_path: Path, kill: int) -> None:
    a, b = Replica(api, tmp_path, "a"), Replica(api, tmp_path, "b")
    for i in range(50):
        api.create_event(event_object(object_name=f"before-{i}"))
    await a.start()
    await until(lambda: holder(api) == "a", timeout=20)
    await b.start()
    await until(lambda: len(a.delivered()) >= 50, timeout=20)
    async with api.steady_events():
        await until(lambda: len(a.delivered()) >= 100, timeout=20)
        assert b.delivered() == []  # the standby delivers nothing while a leads
        # Kill only after a checkpoint write that covers most of what a delivered so far.
        written = checkpoint_version(api)
        await until(lambda: checkpoint_version(api) not in (None, written), timeout=20)
        await a.signal(kill)
        await until(lambda: holder(api) == "b", timeout=20)
        await until(lambda: len(b.delivered()) >= 20, timeout=20)
    want = expected(api)
    await until(lambda: want <= set(a.delivered()) | set(b.delivered()), timeout=30)
    assert await b.signal(signal.SIGTERM) == 0
    both = collections.Counter(a.delivered()) + collections.Counter(b.delivered())
    dup = sum(n - 1 for n in both.values())
    print(
        f"{signal.Signals(kill).name}: expected={len(want)} a={len(a.delivered())} b={len(b.delivered())} duplicates={dup}"
    )
    assert want <= set(both)  # lost = 0
    assert not (a.data / "checkpoints").exists() and not (b.data / "checkpoints").exists()  # the ConfigMap's
    if kill == signal.SIGTERM:
        assert dup == 0  # a clean hand-over: nothing delivered by both
    else:
        # After SIGKILL, at most what a delivered since its last checkpoint write (flushed every
        # second; ~100 occurrences/s here) plus its in-flight batch can come again from b.
        assert dup <= 2 * 100 + 20
        assert dup < len(a.delivered())  # the checkpoint written by a was honoured


async def test_a_leader_that_cannot_renew_stops_delivering_and_exits_1(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """In-process: once the lease cannot be renewed the router stops its pipelines before the lease
    could expire for another replica, and `run` ends with exit code 1 (restart as a standby)."""
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import spec_for_class
    from eventrouter.source.watcher import WatchSettings
    from eventrouter.testing import MemorySink

    settings = RouterSettings(
        kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"),
        metrics_addr=None,
        leader_elect=True,
        leader_name="er",
        leader_identity="solo",
        lease_duration=1.0,
        renew_deadline=0.6,
        retry_period=0.1,
        shutdown_timeout=1.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.2),
    )
    router = Router(
        settings, [spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.01}, type_="memory")]
    )
    running = asyncio.create_task(router.run())
    await until(lambda: holder(api) == "solo" and bool(router.pipelines), timeout=10)
    api.create_event(event_object(object_name="while-leading"))
    await router.sinks["mem"].wait_for(1)
    api.forbid("t0ken")  # RBAC revoked: renewals (and everything else) are refused
    async with asyncio.timeout(10):
        await running
    assert router.exit_code == 1
    assert router.metrics.leader._value.get() == 0
    assert all(p.started.is_set() and p._stop_now.is_set() for p in router.pipelines)


def _elected(api: FakeApiServer, tmp_path: Path, identity: str, **kw: Any) -> Router:
    """An in-process replica with leader election and the ConfigMap checkpoint, on short timings."""
    sink = {"batch_max_wait": kw.pop("batch_max_wait", 0.01)}
    settings = RouterSettings(
        kubeconfig=api.kubeconfig(tmp_path / f"kubeconfig-{identity}"),
        metrics_addr=kw.pop("metrics_addr", None),
        leader_elect=True,
        leader_name="er",
        leader_identity=identity,
        lease_duration=2.0,
        renew_deadline=1.5,
        retry_period=0.2,
        shutdown_timeout=kw.pop("shutdown_timeout", 8.0),
        checkpoint_configmap="er-checkpoint",
        checkpoint_flush_interval=0.2,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.2),
        **kw,
    )
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_events": 10, **sink}, type_="memory")
    return Router(settings, [spec])


async def test_a_leader_watching_over_a_hundred_namespaces_keeps_its_lease_and_writes_its_checkpoint(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """One watch per namespace, each holding a pooled connection for as long as it lasts; the lease and
    the checkpoint ConfigMap shared kubernetes-asyncio's pool of 100: with 120 namespaces the 101st
    watch never started, the renewals waited behind the watches until the leader lost its lease and
    exited 1 (a crash loop), and the ConfigMap was never written (item 186). Now the pool fits the
    watches, and the lease and the ConfigMap have connections of their own."""
    namespaces = [f"team-{i:03d}" for i in range(120)]
    router = _elected(api, tmp_path, "a", namespaces=namespaces)
    running = asyncio.create_task(router.run())
    try:
        await until(lambda: api.active_watches == 120, timeout=30)
        for ns in namespaces:
            api.create_event(event_object(namespace=ns, object_name="x"))
        await _mem(router).wait_for(120, timeout=30)
        # Renewed all along: still leading five lease durations (2 s each) after every watch opened.
        first = _renewed(api)
        await until(lambda: _renewed(api) != first)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the time under test: the lease must hold throughout
            assert holder(api) == "a" and not running.done(), router.exit_code
            await asyncio.sleep(0.5)
        summary = json.loads(api.get_object("configmaps", "default", "er-checkpoint")["data"]["summary"])
        assert summary["sinks"] == {"mem": 120}
    finally:
        router.request_stop()
        await asyncio.wait_for(running, 30)
    assert router.exit_code == 0


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


async def test_a_leader_draining_after_sigterm_keeps_its_lease_so_no_standby_delivers_beside_it(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """The drain of a slow sink outlasts the lease (the chart: shutdown 25 s, lease 15 s; here 8 s and
    2 s). Renewals stopped at SIGTERM, so the standby took over 2 s later from a checkpoint without
    the drain's acknowledgements and sent 180 of 200 again."""
    a, b = _elected(api, tmp_path, "a"), _elected(api, tmp_path, "b")
    running_a = asyncio.create_task(a.run())
    await until(lambda: holder(api) == "a" and bool(a.pipelines), timeout=10)
    _mem(a).delay = 0.2  # a slow destination: 10 every 0.2 s
    for i in range(200):
        api.create_event(event_object(object_name=f"e-{i}"))
    running_b = asyncio.create_task(b.run())
    await until(lambda: len(_mem(a).received) >= 30, timeout=10)
    a.request_stop()  # what SIGTERM does
    await until(lambda: holder(api) == "b" and bool(b.pipelines), timeout=30)
    assert a.stopped.is_set()  # b leads only once a has drained and let go
    assert a.exit_code == 0 and len(_mem(a).received) == 200
    await asyncio.wait_for(running_a, 10)
    want = {(e["metadata"]["uid"], 1) for e in api.events()}
    assert want == set(_mem(a).keys)
    b.request_stop()
    await asyncio.wait_for(running_b, 30)
    assert _mem(b).keys == []  # everything was a's, and b knew it from the checkpoint


async def test_a_leader_that_loses_its_lease_abandons_the_send_in_progress(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Cut off from the API server but not from its sink, the old leader's send in progress went on
    for up to send_timeout (30 s) while the new leader delivered: now it is abandoned at once."""
    a = _elected(api, tmp_path, "a")
    running = asyncio.create_task(a.run())
    await until(lambda: holder(api) == "a" and bool(a.pipelines), timeout=10)
    sink = _mem(a)
    sink.blocked = asyncio.Event()  # the destination takes its time with the next batch
    api.create_event(event_object(object_name="slow"))
    await until(lambda: bool(a.pipelines[0]._in_flight), timeout=10)
    api.forbid("t0ken")  # the lease cannot be renewed
    async with asyncio.timeout(10):
        await running
    sink.blocked.set()
    await asyncio.sleep(0)
    assert a.exit_code == 1 and sink.received == []  # the send was abandoned, not completed later


async def test_a_leader_stopping_with_x4_waiting_leaves_the_shared_checkpoint_before_it(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """X/2 refused and X/3 accepted when the drain deadline passes, each replica with a data dir of its
    own (the chart's configMap mode). Kept in a's spool, X/2 is not the next leader's to send: had a
    recorded X/3 in the shared checkpoint (item 79, for a checkpoint of its own), b would skip the
    event and X/2 would stay on a's volume. b's relist sends X/3 again instead (a duplicate, no loss)."""
    a = _elected(api, tmp_path, "a", data_dir=tmp_path / "data-a", shutdown_timeout=0.3, batch_max_wait=0.5)
    obj = api.create_event(event_object(object_name="web"))
    ns, name, uid = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["metadata"]["uid"]
    running_a = asyncio.create_task(a.run())
    await until(lambda: holder(api) == "a" and bool(a.pipelines), timeout=10)
    await _mem(a).wait_for(1)
    _mem(a).decide = lambda occ: retry("refused") if occ.number == 2 else OK
    api.bump(ns, name)
    api.bump(ns, name)  # within the batch wait: X/2 and X/3 go together
    await _mem(a).wait_for(2)
    await until(lambda: a.metrics.retries.labels("mem")._value.get() >= 1)
    b = _elected(api, tmp_path, "b", data_dir=tmp_path / "data-b")
    running_b = asyncio.create_task(b.run())
    a.request_stop()
    await asyncio.wait_for(running_a, 20)
    await until(lambda: holder(api) == "b" and bool(b.pipelines), timeout=20)
    await _mem(b).wait_for(1)
    b.request_stop()
    await asyncio.wait_for(running_b, 20)
    assert _mem(a).keys == [(uid, 1), (uid, 3)]
    assert _mem(b).keys == [(uid, 3)]


async def _probe(router: Router, path: str) -> tuple[int, str]:
    assert router.http_port is not None
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{router.http_port}{path}") as r:
        return r.status, (await r.text()).strip()


async def _probe_until(router: Router, path: str, status: int, timeout: float, saying: str = "") -> str:
    """The probe's body once it answers ``status`` with ``saying`` in it (polled: a probe's answer is
    computed when it is asked)."""
    async with asyncio.timeout(timeout):
        while True:
            got, text = await _probe(router, path)
            if got == status and saying in text:
                return text
            await asyncio.sleep(0.05)


async def _last_progress(router: Router) -> float:
    _, text = await _probe(router, "/metrics")
    [line] = [
        x for x in text.splitlines() if x.startswith("eventrouter_watch_last_progress_timestamp_seconds ")
    ]
    return float(line.split()[1])


async def test_a_leader_that_cannot_read_the_checkpoint_configmap_is_counted_and_fails_liveness(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """RBAC without `get` on configmaps (or a persistent 5xx): the leader retried the read for ever and
    held the lease; /healthz said 200, the last-progress gauge read the scrape time (no
    EventrouterWatchStalled), no error was counted. Reads are now counted, and from taking the lease
    it is judged as a stalled watch: /healthz fails after --stall-timeout, so the liveness probe
    restarts it and the standby gets the lease. Once readable again, it goes on."""
    api.forbid("t0ken", verbs=["get"], resources=["configmaps"])
    api.create_event(event_object(object_name="e1"))
    before = time.time()
    a = _elected(
        api, tmp_path, "a", metrics_addr="127.0.0.1:0", stall_timeout=3.0, allow_short_stall_timeout=True
    )
    running = asyncio.create_task(a.run())
    await until(lambda: a.metrics.leader._value.get() == 1, timeout=10)

    def reads() -> float:
        value = a.metrics.registry.get_sample_value(
            "eventrouter_checkpoint_configmap_errors_total", {"op": "read"}
        )
        return value or 0.0

    await until(lambda: reads() >= 1, timeout=5)
    status, text = await _probe(a, "/readyz")
    assert status == 503 and "cannot read the checkpoint ConfigMap default/er-checkpoint" in text, text
    text = await _probe_until(a, "/healthz", 503, timeout=3.0 + 3)
    assert "the watch has not begun: cannot read the checkpoint ConfigMap" in text, text
    assert "403" in text and "--stall-timeout 3s" in text, text
    progress = await _last_progress(a)
    assert before <= progress <= before + 3.0 and time.time() - progress > 3.0  # the stall alert fires
    assert reads() >= 3
    api.permit("t0ken")  # the role is fixed: the next read goes through, no restart needed
    await until(lambda: bool(a.pipelines), timeout=10)
    await _mem(a).wait_for(1)
    assert (await _probe(a, "/healthz"))[0] == 200
    a.request_stop()
    await asyncio.wait_for(running, 10)
    assert a.exit_code == 0


async def test_a_replica_refused_the_lease_is_ready_and_says_so(api: FakeApiServer, tmp_path: Path) -> None:
    """RBAC without rights on leases: nobody leads, and every replica's /readyz said "standby:
    another replica holds the lease". It stays 200 (a standby must be Ready for a rollout to go on and
    its /metrics to be scraped), with the true reason."""
    api.forbid("t0ken", resources=["leases"])
    a = _elected(api, tmp_path, "a", metrics_addr="127.0.0.1:0")
    running = asyncio.create_task(a.run())
    await until(lambda: a.http_port is not None, timeout=10)
    text = await _probe_until(a, "/readyz", 200, timeout=5, saying="403")
    assert text.startswith("standby: cannot read or write the lease default/er: 403 Forbidden"), text
    assert holder(api) is None and a.metrics.leader._value.get() == 0
    api.permit("t0ken")
    await until(lambda: holder(api) == "a" and bool(a.pipelines), timeout=10)
    a.request_stop()
    await asyncio.wait_for(running, 10)


async def test_a_replacement_pod_with_its_predecessors_name_stands_by_while_that_one_still_leads(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A StatefulSet's replacement pod has its predecessor's name (the chart's persistence.perReplica),
    and the old pod may still run (force-deleted on a lost node). The lease identity was the pod's name
    alone, so the replacement took the lease as its own at once and both delivered every event. The
    pod's uid is now part of the identity: the replacement stands by."""
    old = Replica(api, tmp_path, "old", pod=("eventrouter-0", "uid-1"))
    new = Replica(api, tmp_path, "new", pod=("eventrouter-0", "uid-2"))
    await old.start()
    await until(lambda: holder(api) == "eventrouter-0", timeout=20)
    await new.start()
    await until(lambda: b"standing by for the lease" in new.log.read_bytes(), timeout=20)
    for i in range(30):
        api.create_event(event_object(object_name=f"e-{i}"))
    await until(lambda: len(old.delivered()) >= 30, timeout=20)
    # Several of the replacement's tries (every 0.2 s) against the lease the old pod renews meanwhile.
    for _ in range(3):
        await _next_renewal(api)
    assert new.delivered() == []  # before, all 30 (and the old pod's 30 as well)
    lease = api.get_object("leases", "default", "er")["spec"]
    assert lease["holderIdentity"] == "eventrouter-0_uid-1", lease
    assert await old.signal(signal.SIGTERM) == 0
    # Then it leads, from the shared checkpoint: only what comes after.
    await until(
        lambda: (
            api.get_object("leases", "default", "er")["spec"].get("holderIdentity") == "eventrouter-0_uid-2"
        )
    )
    api.create_event(event_object(object_name="after"))
    await until(lambda: len(new.delivered()) >= 1, timeout=30)
    assert await new.signal(signal.SIGTERM) == 0
    assert len(new.delivered()) == 1 and len(old.delivered()) == 30


def test_the_lease_identity_is_the_pods_name_and_uid_or_unique_per_process_without_a_uid() -> None:
    """A container restarted in its pod (same uid) takes its own lease back at once; without POD_UID
    (manifests older than the chart's) each process is its own, as client-go makes it."""
    pod = {"POD_NAME": "eventrouter-0", "POD_UID": "u1"}
    assert leader_identity(pod) == leader_identity(dict(pod)) == "eventrouter-0_u1"
    assert leader_identity({**pod, "POD_UID": "u2"}) == "eventrouter-0_u2"
    alone = [leader_identity({"POD_NAME": "eventrouter-0"}) for _ in range(2)]
    assert alone[0] != alone[1] and all(a.startswith("eventrouter-0_") for a in alone)
