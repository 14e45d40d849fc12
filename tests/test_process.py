"""The router as a real process: SIGTERM drains and exits 0 with nothing delivered twice after a
restart; SIGKILL under load loses nothing and duplicates at most the in-flight batch per kill."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import pytest

from eventrouter.record import occurrence_number
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

BATCH = 50


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t0ken") as server:
        server.bookmark_interval = 0.5
        yield server


class RouterProcess:
    def __init__(self, api: FakeApiServer, tmp: Path) -> None:
        self.kubeconfig = api.kubeconfig(tmp / "kubeconfig")
        self.out = tmp / "events.jsonl"
        self.data = tmp / "data"
        self.proc: asyncio.subprocess.Process | None = None
        self.log = tmp / "router.log"
        self._log_fh: IO[bytes] | None = None
        self.torn: list[bytes] = []

    def close(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()

    async def start(self) -> None:
        sink = f"file:{self.out}?batch_max_events={BATCH}&batch_max_wait=0.05"
        if self._log_fh is None:
            self._log_fh = open(self.log, "ab")  # noqa: SIM115, ASYNC230 - shared with each child
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventrouter.cli", "run",
            "--kubeconfig", str(self.kubeconfig), f"--sink={sink}", "--data-dir", str(self.data),
            "--metrics-addr", "127.0.0.1:0", "--watch-timeout", "30", "--shutdown-timeout", "10",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log_fh,
        )  # fmt: skip

    def delivered(self) -> list[tuple[str, int]]:
        """(uid, occurrence) of every complete line; fragments of writes cut by SIGKILL in ``torn``."""
        if not self.out.exists():
            return []
        text = self.out.read_bytes()
        # A line without its newline is a write in progress (this runs while the router writes).
        complete = text[: text.rfind(b"\n") + 1]
        rows = []
        self.torn = []
        for line in complete.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                self.torn.append(line)
                continue
            rows.append((doc["uid"], doc["occurrence"]))
        return rows

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 30)


@pytest.fixture
async def router(api: FakeApiServer, tmp_path: Path) -> AsyncIterator[RouterProcess]:
    rp = RouterProcess(api, tmp_path)
    try:
        yield rp
    finally:  # a failed test must not leave the child running or its log open
        if rp.proc is not None and rp.proc.returncode is None:
            rp.proc.kill()
            await rp.proc.wait()
        rp.close()


def expected(api: FakeApiServer) -> set[tuple[str, int]]:
    return {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}


async def test_sigterm_drains_exits_0_and_a_restart_delivers_nothing_twice(
    api: FakeApiServer, router: RouterProcess
) -> None:
    objs = [api.create_event(event_object(object_name=f"p-{i}")) for i in range(100)]
    await router.start()
    await until(lambda: len(router.delivered()) >= 100, timeout=30)
    for o in objs[:40]:
        api.bump(o["metadata"]["namespace"], o["metadata"]["name"])
    await until(lambda: len(router.delivered()) >= 140, timeout=30)
    assert await router.signal(signal.SIGTERM) == 0
    assert "stopped after draining" in router.log.read_text()
    # More while stopped, then a restart.
    for i in range(30):
        api.create_event(event_object(object_name=f"q-{i}"))
    await router.start()
    await until(lambda: len(router.delivered()) >= 170, timeout=30)
    await asyncio.sleep(1.0)  # settle: anything delivered twice would show up now
    assert await router.signal(signal.SIGTERM) == 0
    router.close()
    got = collections.Counter(router.delivered())
    assert expected(api) <= set(got), "lost occurrences"
    assert [k for k, n in got.items() if n > 1] == [], "duplicates after a clean restart"


async def test_sighup_re_reads_files_and_the_router_goes_on(
    api: FakeApiServer, router: RouterProcess
) -> None:
    """SIGHUP had its default action: the process ended at once, with no drain and no checkpoint."""
    api.create_event(event_object(object_name="before"))
    await router.start()
    await until(lambda: len(router.delivered()) >= 1, timeout=30)
    assert router.proc is not None
    router.proc.send_signal(signal.SIGHUP)
    await until(lambda: "SIGHUP: no sink's files changed" in router.log.read_text(), timeout=10)
    api.create_event(event_object(object_name="after"))
    await until(lambda: len(router.delivered()) >= 2, timeout=30)
    assert await router.signal(signal.SIGTERM) == 0
    assert "stopped after draining" in router.log.read_text()


async def test_sigkill_under_load_loses_nothing_and_duplicates_are_bounded(
    api: FakeApiServer, router: RouterProcess
) -> None:
    created: list[dict[str, object]] = []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            created.append(api.create_event(event_object(object_name=f"k-{i}")))
            if i % 3 == 0 and created:
                o = created[i // 2]
                api.bump(o["metadata"]["namespace"], o["metadata"]["name"])  # type: ignore[index]
            i += 1
            await asyncio.sleep(0.005)

    loader = asyncio.create_task(load())
    kills = 5
    for _ in range(kills):
        await router.start()
        before = len(router.delivered())
        await until(lambda b=before: len(router.delivered()) >= b + 100, timeout=30)  # type: ignore[misc]
        assert await router.signal(signal.SIGKILL) == -signal.SIGKILL
    stop.set()
    await loader
    await router.start()
    # One event only this process can deliver: SIGTERM below then reaches a router that has installed
    # its handler (sent while Python starts up, it would kill it with -15, not drain it).
    api.create_event(event_object(object_name="after-the-kills"))
    want = expected(api)
    await until(lambda: want <= set(router.delivered()), timeout=60)
    assert await router.signal(signal.SIGTERM) == 0
    router.close()
    got = collections.Counter(router.delivered())
    duplicates = sum(n - 1 for n in got.values())
    print(
        f"occurrences expected={len(want)} delivered={len(got)} lost={len(want - set(got))} duplicates={duplicates}"
    )
    assert want <= set(got)
    # At most the in-flight batch per kill (one batch in flight per sink).
    assert duplicates <= kills * BATCH
    # A kill mid-write leaves at most one partial line, ended by the next start, never merged with a
    # whole record (every other line parses).
    assert len(router.torn) <= kills
    assert all(not line.endswith(b"}") for line in router.torn)


async def _demo(cwd: Path) -> tuple[list[dict[str, object]], str]:
    """`eventrouter run --demo` in ``cwd`` until the recording's 126 occurrences are on stdout, then
    SIGTERM: (records printed, what it logged); it must exit 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventrouter.cli", "run", "--demo", "--metrics-addr", "127.0.0.1:0",
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = [await asyncio.wait_for(proc.stdout.readline(), 30) for _ in range(126)]
    proc.send_signal(signal.SIGTERM)
    rest, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    records = [json.loads(x) for x in lines + rest.splitlines()]
    assert len({(r["uid"], r["occurrence"]) for r in records[:126]}) == 126
    return records, err.decode()


async def test_demo_runs_without_a_cluster_and_delivers_every_recorded_occurrence(tmp_path: Path) -> None:
    """The README's first command: the embedded API server replays the recording into stdout and a file."""
    await _demo(tmp_path)
    out = tmp_path / "eventrouter-demo" / "events.jsonl"
    assert len(out.read_text().splitlines()) >= 126


async def test_demo_where_it_cannot_write_says_so_and_still_prints_everything(tmp_path: Path) -> None:
    """As in a container with a read-only root: no ./eventrouter-demo/ can be made (here a file is in
    its way, since root may write anywhere); the demo names it, and stdout still gets every occurrence."""
    (tmp_path / "eventrouter-demo").write_text("in the way")
    _, log = await _demo(tmp_path)
    assert f"cannot create {tmp_path / 'eventrouter-demo'}" in log and "writing to stdout only" in log


async def test_demo_with_a_destination_that_is_down_still_delivers_to_the_others(tmp_path: Path) -> None:
    """The demo's traffic starts after the initial list, not once every sink has started: a Loki that
    is not running holds up only its own pipeline."""
    out = tmp_path / "events.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventrouter.cli", "run", "--demo", "--metrics-addr", "127.0.0.1:0",
        f"--sink=file:{out}", "--sink=loki:http://127.0.0.1:1", "--shutdown-timeout", "1",
        cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await until(lambda: out.exists() and len(out.read_text().splitlines()) >= 126, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "sink loki cannot start" in err.decode()
