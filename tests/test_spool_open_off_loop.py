"""Opening the spools at start does not freeze the event loop (a review of the Helm chart, F1).

``Spool(...)`` reads every unread record of its folder. The router built its spools inside the event
loop: with a full 256 MiB spool and the chart's 50m CPU request on a saturated node that froze the
loop for ~30 s, /healthz went unanswered, and the liveness probe killed the container, at every
restart again (the emptyDir keeps the spool). With leader election the frozen loop also missed the
lease's renewals. The spools are now opened in a worker thread while the loop serves /healthz.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.spool import Spool
from eventrouter.record import normalise
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

RECORDS = 3000
GATE_TIMEOUT = 15.0  # only how long the old code's test takes to fail: the new code never waits for it


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _fill(folder: Path, count: int) -> list[tuple[str, int]]:
    """A backlog left by a sink that was down, written through the Spool API in small segments."""
    spool = Spool(folder, max_bytes=1 << 40, segment_bytes=64 * 1024, cluster="test")
    keys = []
    for i in range(count):
        occ = normalise(event_object(object_name=f"backlog-{i}"), cluster="test", received_at=time.time())
        spool.append(occ)
        keys.append((occ.uid, occ.number))
    spool.close()
    return keys


class SegmentGate:
    """Holds the spool's open in the middle of its backlog, on the real file system: one segment is
    swapped for a FIFO, so the open blocks reading it. ``reading`` is set once the open has it open
    (a writer can then open it without blocking); the bytes go down the FIFO on ``release()`` or
    after the timeout, with a regular file of the same bytes put in its place first (later reads
    find the segment as it was)."""

    def __init__(self, segment: Path) -> None:
        self.segment = segment
        self.data = segment.read_bytes()
        segment.unlink()
        os.mkfifo(segment)
        self.reading = threading.Event()
        self.released = threading.Event()
        self.by_timeout = False
        self.thread = threading.Thread(target=self._feed, name="segment-gate", daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.released.set()

    def _feed(self) -> None:
        deadline = time.monotonic() + GATE_TIMEOUT * 4
        while True:
            try:  # ENXIO until a reader has the FIFO open: the spool's open got to this segment
                fd = os.open(self.segment, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
        self.reading.set()
        self.by_timeout = not self.released.wait(GATE_TIMEOUT)
        copy = self.segment.with_suffix(".copy")
        copy.write_bytes(self.data)
        os.replace(copy, self.segment)  # the open holds the FIFO itself
        os.set_blocking(fd, True)
        with open(fd, "wb") as fifo:
            fifo.write(self.data)


async def _healthz(port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as r:
        return r.status


async def test_healthz_is_answered_while_a_spool_with_a_backlog_is_opened(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eventrouter")
    data = tmp_path / "data"
    keys = _fill(data / "spool" / "mem", RECORDS)
    segments = sorted((data / "spool" / "mem").glob("*.seg"), key=lambda p: int(p.stem))
    assert len(segments) >= 3
    gate = SegmentGate(segments[1])  # with records of the backlog before it and after it
    settings = RouterSettings(
        cluster_name="test",
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr="127.0.0.1:0",
        data_dir=data,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    router = Router(settings, [spec])
    running = asyncio.create_task(router.run())
    answered_while_opening = False
    try:
        await until(lambda: router.http_port is not None, timeout=10)
        port = router.http_port
        assert port is not None
        # As the kubelet probes: the spool's open is held at the gate meanwhile.
        # As the kubelet probes, until an answer comes while the spool's open is held at the gate.
        async with asyncio.timeout(GATE_TIMEOUT * 4):
            while not gate.by_timeout:
                status = await _healthz(port)
                if gate.reading.is_set() and not gate.by_timeout and not router.pipelines:
                    answered_while_opening = status == 200
                    break
                await asyncio.sleep(0.05)  # a probe over HTTP has no event to await
        gate.release()
        await until(lambda: bool(router.pipelines), timeout=GATE_TIMEOUT * 2)
        sink = router.sinks["mem"]
        assert isinstance(sink, MemorySink)
        # The whole backlog, the gated segment's records included, as it was written.
        await sink.wait_for(RECORDS, timeout=30)
    finally:
        gate.release()
        router.request_stop()
        await asyncio.wait_for(running, 30)
        gate.thread.join(GATE_TIMEOUT * 2)
    assert answered_while_opening, "/healthz was not answered while the spool was opened"
    assert sorted(sink.keys) == sorted(keys)
    # The open itself ran off the event loop's thread (which is this test's).
    (opened,) = [r for r in caplog.records if "waiting from before the restart" in r.getMessage()]
    assert f"{RECORDS} occurrences" in opened.getMessage()
    assert opened.thread != threading.get_ident()
