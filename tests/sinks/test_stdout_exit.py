"""`eventrouter run --sink=stdout` whose stdout nobody reads (a hung log shipper) still exits after
SIGTERM once its shutdown is done: the write blocked on the full pipe is left behind, and its batch
is kept in the spool or counted as not delivered, never as delivered."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from eventrouter.record import occurrence_number
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

DEADLINE = 2.0  # --shutdown-timeout
# After the deadline: the engine's moment for a send in progress (1 s), the sink's close (1 s) and the
# rest of the teardown, with room for a loaded machine. The old code never exited at all.
MARGIN = 6.0
EVENTS = 300  # ~200 KB of JSON lines: far more than a pipe holds


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t0ken") as server:
        yield server


def in_pipe(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)


def read_all(fd: int) -> bytes:
    """What the pipe holds, once every writer has closed its end."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def occurrences(out: bytes) -> set[tuple[str, int]]:
    """(uid, occurrence) of every complete line (the write left behind may have torn the last)."""
    rows = set()
    for line in out[: out.rfind(b"\n") + 1].splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(line)
            rows.add((doc["uid"], doc["occurrence"]))
    return rows


def environment(unbuffered: bool) -> dict[str, str]:
    """The router's environment, with or without PYTHONUNBUFFERED (set in the image, not by `pip
    install` or a systemd unit): without it stdout's buffer is a BufferedWriter, whose lock a write
    left blocked held at exit, and the interpreter's last flush aborted the process on it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_router(
    api: FakeApiServer, tmp_path: Path, stdout: int, *extra: str, unbuffered: bool
) -> asyncio.subprocess.Process:
    log = (tmp_path / "router.log").open("ab")  # handed to the child
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventrouter.cli", "run",
            "--kubeconfig", api.kubeconfig(tmp_path / "kubeconfig"), "--sink=stdout:?batch_max_events=20",
            "--metrics-addr", "127.0.0.1:0", "--watch-timeout", "30",
            "--shutdown-timeout", str(DEADLINE), *extra,
            stdout=stdout, stderr=log, env=environment(unbuffered),
        )  # fmt: skip
    finally:
        log.close()


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize("spool", [False, True], ids=["no-data-dir", "data-dir"])
async def test_a_stalled_stdout_reader_does_not_keep_the_router_from_exiting_after_sigterm(
    api: FakeApiServer, tmp_path: Path, spool: bool, unbuffered: bool
) -> None:
    """Python joined the sink's ThreadPoolExecutor thread at exit, blocked for ever on the full pipe:
    the process never exited and the kubelet had to SIGKILL it. Without PYTHONUNBUFFERED it then
    exited, but with `Fatal Python error: _enter_buffered_busy` (SIGABRT, -6)."""
    for i in range(EVENTS):
        api.create_event(event_object(object_name=f"p-{i}", message=f"m{i} " + "x" * 300))
    want = {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}
    log = tmp_path / "router.log"
    extra = ("--data-dir", str(tmp_path / "data")) if spool else ()
    read_end, write_end = os.pipe()  # the test never reads it while the router runs
    proc = None
    try:
        proc = await run_router(api, tmp_path, write_end, *extra, unbuffered=unbuffered)
        os.close(write_end)
        write_end = -1
        # Every event handed to the sink, and the pipe full (each of its page-sized slots in use; the
        # last one need not be full): a write is blocked on it.
        full = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) - os.sysconf("SC_PAGE_SIZE")
        await until(lambda: "initial list of" in log.read_text(), timeout=30)
        await until(lambda: in_pipe(read_end) > full, timeout=30)
        proc.send_signal(signal.SIGTERM)
        sent = asyncio.get_running_loop().time()
        async with asyncio.timeout(DEADLINE + MARGIN):
            code = await proc.wait()
        took = asyncio.get_running_loop().time() - sent
        text = log.read_text()
        assert code == 0, text[-2000:]
        assert "stopped after draining" in text
        # What the blocked write carried was not acknowledged: kept, or counted and said.
        if spool:
            said = re.search(r"sink stdout: (\d+) undelivered occurrences kept in the spool", text)
        else:
            said = re.search(
                rf"sink stdout: (\d+) occurrences not delivered within the {DEADLINE:g}s drain deadline", text
            )
        assert said is not None, text[-2000:]
        not_delivered = int(said.group(1))
        printed = occurrences(read_all(read_end))
        # Nothing counted as delivered that is not on stdout: what was printed and what was said to
        # be left cover every event (the blocked write's lines that made it in count twice).
        assert printed <= want
        assert len(printed) + not_delivered >= len(want), (len(printed), not_delivered, len(want))
        assert 0 < not_delivered < len(want)  # some batches were written whole
        print(f"exited {took:.2f}s after SIGTERM; printed {len(printed)}, not delivered {not_delivered}")
    finally:
        if proc is not None and proc.returncode is None:  # the old code: it hangs, and fails above
            proc.kill()
            await proc.wait()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if spool:
        # A restart with a reader delivers what was kept: nothing lost.
        proc = await run_router(api, tmp_path, asyncio.subprocess.PIPE, *extra, unbuffered=unbuffered)
        assert proc.stdout is not None
        got = b""
        try:
            async with asyncio.timeout(30):
                while not want <= printed | occurrences(got):
                    chunk = await proc.stdout.read(1 << 20)
                    assert chunk, "the router exited before delivering what was kept"
                    got += chunk
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), DEADLINE + MARGIN)
            assert proc.returncode == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
