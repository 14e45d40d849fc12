"""stdout sink: a write that takes part of a batch (a full disk or a size limit under a file, a pipe
made non-blocking by whoever shares it) loses nothing, writes nothing twice and tears no line.

Under PYTHONUNBUFFERED (the image sets it) stdout's buffer is the raw FileIO, whose write is one
write(2) that may take part of the batch: the rest was dropped and every item answered OK."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import io
import json
import logging
import os
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path

import orjson
import pytest

from eventrouter import OK, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.waiting import until
from eventrouter_sinks.stdout import StdoutOptions, StdoutSink

PAGE = os.sysconf("SC_PAGE_SIZE")


def sink(**options: object) -> StdoutSink:
    ctx = SinkContext(name="stdout", cluster="test", data_dir=None, logger=logging.getLogger("test.stdout"))
    return StdoutSink(StdoutOptions.model_validate(options), ctx)


def lines(data: bytes) -> tuple[dict[str, int], list[bytes]]:
    """Copies of each record by message, and the lines that are no record (torn, glued, a hole)."""
    copies: collections.Counter[str] = collections.Counter()
    other = []
    for line in data.split(b"\n")[:-1]:
        try:
            copies[orjson.loads(line)["message"]] += 1
        except (orjson.JSONDecodeError, KeyError, TypeError):
            other.append(line)
    if data and not data.endswith(b"\n"):
        other.append(data[data.rfind(b"\n") + 1 :])
    return dict(copies), other


# -- stdout a file, the disk full ------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, logging, os, resource, sys
    from eventrouter import RetryableError, SinkContext
    from eventrouter.testing import make_occurrence
    from eventrouter_sinks.stdout import StdoutOptions, StdoutSink

    async def main():
        report = {"buffer": type(sys.stdout.buffer).__name__}
        ctx = SinkContext(name="stdout", cluster="c", data_dir=None, logger=logging.getLogger("x"))
        s = StdoutSink(StdoutOptions(), ctx)
        await s.start()
        first, second = ([make_occurrence(message=f"{b}{i}:" + "y" * 300) for i in range(20)] for b in "ab")
        report["first"] = [o.kind.value for o in await s.send(first)]
        size = os.fstat(1).st_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, hard))  # full inside the second batch
        try:
            report["full"] = [o.kind.value for o in await s.send(second)]
        except RetryableError as exc:
            report["full"] = exc.reason
        report["grown"] = os.fstat(1).st_size - size
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again: the engine's retry
        report["retry"] = [o.kind.value for o in await s.send(second)]
        await s.aclose()
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("mode", ["wb", "ab"], ids=["truncate", "append"])  # `> file`, `>> file`
@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_a_file_filling_up_under_stdout_loses_no_record_and_tears_no_line(
    tmp_path: Path, unbuffered: bool, mode: str
) -> None:
    """A size limit (RLIMIT_FSIZE: a short write, then EFBIG, as a filling disk gives) inside a batch:
    the batch is answered retry and cut back whole, and the retry writes it once. Before, under
    PYTHONUNBUFFERED 19 of its 20 records were dropped and all answered OK; without it the batch was
    retried after a torn line, which spoiled one record."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    out = tmp_path / "out.jsonl"
    with out.open(mode) as stdout:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / "report.json")],
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["buffer"] == ("FileIO" if unbuffered else "BufferedWriter")
    assert report["first"] == ["ok"] * 20
    assert isinstance(report["full"], str) and "File too large" in report["full"], report["full"]
    assert report["grown"] == 0  # cut back: no part of the failed batch is left
    assert report["retry"] == ["ok"] * 20
    copies, other = lines(out.read_bytes())
    assert other == []
    assert copies == {f"{b}{i}:" + "y" * 300: 1 for b in "ab" for i in range(20)}


# -- stdout a pipe made non-blocking, a slow reader ------------------------------------------------


def in_pipe(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)


class SlowReader(threading.Thread):
    """Reads a page at a time, and only while the pipe is more than half full; after ``drain()``
    everything, to the end (once the writer has closed its end)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.half = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) // 2
        self.got = bytearray()
        self.draining = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.draining.is_set():
            if in_pipe(self.fd) > self.half:
                self.got += os.read(self.fd, PAGE)
            else:
                self.draining.wait(0.001)
        while chunk := os.read(self.fd, 1 << 20):
            self.got += chunk

    def drain(self) -> None:
        self.draining.set()


def stdout_pipe(write_end: int, buffered: bool) -> io.TextIOWrapper:
    """sys.stdout as Python makes it on a pipe: the raw FileIO under PYTHONUNBUFFERED, else buffered."""
    raw = io.FileIO(write_end, "w")
    return io.TextIOWrapper(io.BufferedWriter(raw) if buffered else raw, write_through=True)


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
async def test_a_pipe_made_non_blocking_during_a_write_gets_every_line_once(
    monkeypatch: pytest.MonkeyPatch, buffered: bool
) -> None:
    """O_NONBLOCK set by whoever shares the pipe while a batch is blocked on it (item 61 made it
    blocking before each write, not during one): the kernel returns a short write, and then EAGAIN.
    The sink waits for room and writes the rest. Before, the raw FileIO dropped the rest of the
    batch and answered OK; the BufferedWriter raised, and the retry wrote the first part again."""
    read_end, write_end = os.pipe()
    pipe = stdout_pipe(write_end, buffered)
    monkeypatch.setattr(sys, "stdout", pipe)
    s = sink()
    occs = [make_occurrence(message=f"{i}:" + "z" * 3000) for i in range(100)]  # 300 KB
    full = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) - PAGE
    reader = None
    try:
        await s.start()
        send = asyncio.create_task(s.send(occs))
        await until(lambda: in_pipe(read_end) > full)  # the write is blocked on the full pipe
        os.set_blocking(write_end, False)
        reader = SlowReader(read_end)  # a page of room at a time: the write fills it, then finds no room
        async with asyncio.timeout(10):
            assert await send == [OK] * 100
        assert not os.get_blocking(write_end)  # not the sink's business during a write
    finally:
        await s.aclose()
        with contextlib.suppress(OSError):  # what a failed non-blocking write left in the buffer
            pipe.close()
        if reader is None:
            os.close(read_end)
    assert reader is not None
    reader.drain()
    await until(lambda: not reader.is_alive())
    os.close(read_end)
    copies, other = lines(bytes(reader.got))
    assert other == []
    assert copies == {o.record["message"]: 1 for o in occs}


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
async def test_a_log_line_on_the_same_stderr_never_lands_inside_a_record(
    monkeypatch: pytest.MonkeyPatch, buffered: bool
) -> None:
    """stream=stderr shares the descriptor with the logs. A batch larger than the pipe takes several
    write(2)s; a log line written between them tore a record in two. The batch now holds logging's
    handler lock, as the BufferedWriter's lock (shared by the two without PYTHONUNBUFFERED) did."""
    read_end, write_end = os.pipe()
    pipe = stdout_pipe(write_end, buffered)
    monkeypatch.setattr(sys, "stderr", pipe)
    handler = logging.StreamHandler(pipe)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    s = sink(stream="stderr")
    occs = [make_occurrence(message=f"{i}:" + "z" * 3000) for i in range(100)]  # 300 KB
    full = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) - PAGE
    logger = threading.Thread(target=logging.getLogger("test.other").warning, args=("a log line",))
    reader = None
    try:
        await s.start()
        send = asyncio.create_task(s.send(occs))
        await until(lambda: in_pipe(read_end) > full)  # the batch is part written, blocked on the pipe
        logger.start()  # from a thread: the loop must go on, it awaits the send
        reader = SlowReader(read_end)
        async with asyncio.timeout(10):
            assert await send == [OK] * 100
        await until(lambda: not logger.is_alive())
    finally:
        root.removeHandler(handler)
        await s.aclose()
        pipe.close()
        if reader is None:
            os.close(read_end)
    assert reader is not None
    reader.drain()
    await until(lambda: not reader.is_alive())
    os.close(read_end)
    copies, other = lines(bytes(reader.got))
    assert other == [b"a log line"]
    assert copies == {o.record["message"]: 1 for o in occs}
