"""Two replicas with --leader-elect and the checkpoint in a ConfigMap, as real processes against the
test API server: one delivers at a time, a standby takes over and resumes from the checkpoint."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrouter.record import occurrence_number
from eventrouter.testing import FakeApiServer, event_object
from eventrouter.testing.waiting import until


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t0ken") as server:
        server.bookmark_interval = 0.5
        yield server


class Replica:
    def __init__(self, api: FakeApiServer, tmp: Path, name: str) -> None:
        self.name = name
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
                env={**os.environ, "POD_NAME": self.name, "POD_NAMESPACE": "default"},
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
    try:
        lease = api.get_object("leases", "default", "er")
    except Exception:
        return None
    return (lease.get("spec") or {}).get("holderIdentity") or None


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
