"""stdout sink, session 34's review: with stream=stderr a log line waits for the line being written,
not for the whole batch (logging's handler lock was held for all of it, so a slow reader stalled the
event loop); and format=text escapes the control characters an Event's fields may carry.

On a real pipe made the process's stderr, with a logging handler writing to it, as the router logs."""

from __future__ import annotations

import asyncio
import collections
import fcntl
import io
import logging
import os
import sys
import termios
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import orjson
import pytest

from eventrouter import OK, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.waiting import until
from eventrouter_sinks.stdout import StdoutOptions, StdoutSink

PAGE = os.sysconf("SC_PAGE_SIZE")
LOG_LINE = b"a log line"


def sink(**options: object) -> StdoutSink:
    ctx = SinkContext(name="stdout", cluster="test", data_dir=None, logger=logging.getLogger("test.stdout"))
    return StdoutSink(StdoutOptions.model_validate(options), ctx)


def in_pipe(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)


class Drain(threading.Thread):
    """Reads the pipe to its end (once every writer has closed it)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.got = bytearray()
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.fd, 1 << 16):
            self.got += chunk


def held_elsewhere(lock: threading.RLock) -> bool:
    """Another thread holds ``lock`` (the caller never does)."""
    if not lock.acquire(blocking=False):
        return True
    lock.release()
    return False


class Stderr:
    """A pipe as the process's stderr, with a logging handler writing to it, as the router logs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, buffered: bool) -> None:
        self.read_end, write_end = os.pipe()
        raw = io.FileIO(write_end, "w")  # the raw FileIO under PYTHONUNBUFFERED, else buffered
        self.pipe = io.TextIOWrapper(io.BufferedWriter(raw) if buffered else raw, write_through=True)
        monkeypatch.setattr(sys, "stderr", self.pipe)
        self.handler = logging.StreamHandler(self.pipe)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.full = fcntl.fcntl(self.read_end, fcntl.F_GETPIPE_SZ) - PAGE
        self.reader: Drain | None = None

    @property
    def lock(self) -> threading.RLock:
        assert self.handler.lock is not None
        return self.handler.lock

    def lines(self) -> list[bytes]:
        assert self.reader is not None
        return bytes(self.reader.got).split(b"\n")

    @contextmanager
    def logging_to_it(self) -> Iterator[Stderr]:
        root = logging.getLogger()
        root.addHandler(self.handler)
        try:
            yield self
        finally:
            root.removeHandler(self.handler)
            self.pipe.close()
            if self.reader is None:
                os.close(self.read_end)

    def read(self) -> None:
        self.reader = Drain(self.read_end)


def logging_thread(line: bytes = LOG_LINE) -> threading.Thread:
    """Another part of the router logging (from a thread: the loop awaits the send)."""
    return threading.Thread(target=logging.getLogger("test.other").warning, args=(line.decode(),))


def records(lines: list[bytes]) -> tuple[dict[str, int], list[bytes]]:
    """Copies of each record by message, and the lines that are no record (torn, glued, a log line)."""
    copies: collections.Counter[str] = collections.Counter()
    other = []
    for line in lines[:-1]:
        try:
            copies[orjson.loads(line)["message"]] += 1
        except (orjson.JSONDecodeError, KeyError, TypeError):
            other.append(line)
    if lines[-1]:
        other.append(lines[-1])
    return dict(copies), other


# -- F3: logging waits for a line, not for the batch ------------------------------------------------


@pytest.mark.parametrize("log_line", [LOG_LINE, b"L" * PAGE], ids=["short", "a-page"])
@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
async def test_a_log_line_waits_for_the_line_being_written_not_for_the_whole_batch(
    monkeypatch: pytest.MonkeyPatch, buffered: bool, log_line: bytes
) -> None:
    """The batch is blocked on a full pipe between two whole lines; a log call then takes logging's
    lock and goes out at once (room left in the pipe's last page) or as soon as the reader makes
    room (a page long), before the rest of the batch. Before, the batch held that lock to its end:
    the log call (from the event loop: the watch, another sink, /healthz's) waited for the whole
    batch, seconds at a slow reader."""
    err = Stderr(monkeypatch, buffered)
    s = sink(stream="stderr")
    occs = [make_occurrence(message=f"{i}:" + "z" * 3000) for i in range(100)]  # 300 KB, lines < PIPE_BUF
    logger = logging_thread(log_line)
    with err.logging_to_it():
        try:
            await s.start()
            send = asyncio.create_task(s.send(occs))
            await until(lambda: in_pipe(err.read_end) > err.full)  # blocked, waiting for room
            logger.start()
            # Written at once (room left in the pipe's last page), or waiting for room with the lock;
            # before, it waited for the lock, held by the batch.
            await until(lambda: not logger.is_alive() or held_elsewhere(err.lock))
            err.read()
            async with asyncio.timeout(10):
                assert await send == [OK] * 100
            await until(lambda: not logger.is_alive())
        finally:
            await s.aclose()
    await until(lambda: err.reader is not None and not err.reader.is_alive())
    os.close(err.read_end)
    lines = err.lines()
    copies, other = records(lines)
    assert other == [log_line]
    assert copies == {o.record["message"]: 1 for o in occs}
    assert 0 < lines.index(log_line) < len(occs)  # records of the batch came after it


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
async def test_a_log_line_never_lands_inside_a_record_longer_than_the_pipe(
    monkeypatch: pytest.MonkeyPatch, buffered: bool
) -> None:
    """Records longer than the pipe are written in parts: logging's lock is kept from the first part
    of a record to its last, so the log line waits for the record's end (and only for that)."""
    err = Stderr(monkeypatch, buffered)
    s = sink(stream="stderr")
    size = 3 * fcntl.fcntl(err.read_end, fcntl.F_GETPIPE_SZ)
    occs = [make_occurrence(message=f"{i}:" + "z" * size) for i in range(4)]
    logger = logging_thread()
    with err.logging_to_it():
        try:
            await s.start()
            send = asyncio.create_task(s.send(occs))
            await until(lambda: in_pipe(err.read_end) > err.full)  # inside the first record
            logger.start()
            err.read()
            async with asyncio.timeout(10):
                assert await send == [OK] * 4
            await until(lambda: not logger.is_alive())
        finally:
            await s.aclose()
    await until(lambda: err.reader is not None and not err.reader.is_alive())
    os.close(err.read_end)
    copies, other = records(err.lines())
    assert other == [LOG_LINE]
    assert copies == {o.record["message"]: 1 for o in occs}


# -- F4: format=text shows control characters, never runs them --------------------------------------

CONTROLS = (
    "\x1b[8mhidden \x1b[2J\x1b]0;pwned\x07 \x08\x08\x08bs \x0bvt \x0cff \x00nul \x7fdel "
    "\x85nel \x9b31mcsi \u2028ls \u2029ps \x1c\x1d\x1efs \ttab \\back \r\n"
)
ESCAPED = (
    "\\x1b[8mhidden \\x1b[2J\\x1b]0;pwned\\x07 \\x08\\x08\\x08bs \\x0bvt \\x0cff \\x00nul \\x7fdel "
    "\\x85nel \\x9b31mcsi \\u2028ls \\u2029ps \\x1c\\x1d\\x1efs \ttab \\\\back \\r\\n"
)


async def test_text_format_escapes_terminal_controls_in_every_field(
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    """An Event's fields are written by whoever may create Events: ESC sequences cleared the screen,
    hid the rest of the line or set the window title; VT, FF, NEL and U+2028 cut one record into
    several lines for a collector splitting on them. Only tab is left as it is."""
    occ = make_occurrence(
        namespace="ns" + CONTROLS,
        object_name="web" + CONTROLS,
        reason="Bad" + CONTROLS,
        message="m" + CONTROLS,
        first_timestamp="2024-05-01T10:00:00Z",
    )
    s = sink(format="text")
    await s.start()
    assert await s.send([occ]) == [OK]
    await s.aclose()
    out = capfdbinary.readouterr().out
    e = ESCAPED
    assert out.decode() == f"2024-05-01T10:00:00Z Warning ns{e} Pod/web{e} Bad{e}: m{e}\n"
    assert not {b for b in out[:-1] if (b < 0x20 and b != 0x09) or b == 0x7F}
    assert len(out.decode().splitlines()) == 1


async def test_json_format_is_unchanged_by_the_escapes(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    occ = make_occurrence(reason="Bad" + CONTROLS, message="m" + CONTROLS)
    s = sink()
    await s.start()
    assert await s.send([occ]) == [OK]
    await s.aclose()
    out = capfdbinary.readouterr().out
    assert out == occ.encode() + b"\n"
    assert orjson.loads(out)["message"] == "m" + CONTROLS


# -- item 291: a stop while the writer waits for logging's lock -------------------------------------


def waiting_for_logging() -> bool:
    """A sink's thread waits for logging's lock (``_Held.take``: another thread holds it)."""
    for frame in sys._current_frames().values():
        at: FrameType | None = frame
        while at is not None:
            if at.f_code.co_qualname == "_Held.take":
                return True
            at = at.f_back
    return False


async def test_a_stop_while_the_writer_waits_for_logging_begins_no_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another thread holds logging's lock (a log line being written to a slow stderr) while the sink's
    writer waits for it; the router stops meanwhile and the send answers the batch "not written".
    When the lock came free the writer began the next line anyway, after that answer: written to
    stderr, and sent again after the restart (said at the close as written by a send cut off)."""
    err = Stderr(monkeypatch, buffered=False)
    s = sink(stream="stderr")
    occs = [make_occurrence(object_name=f"o{i}") for i in range(3)]
    holding, release = threading.Event(), threading.Event()

    def log_call() -> None:
        with err.lock:
            holding.set()
            release.wait()

    other = threading.Thread(target=log_call, daemon=True)
    with err.logging_to_it():
        try:
            await s.start()
            other.start()
            await until(holding.is_set)
            send = asyncio.create_task(s.send(occs))
            await until(waiting_for_logging)
            s.stop_sending()
            outcomes = await send
            release.set()
            await until(lambda: s._writing is None or s._writing[0].done())
        finally:
            release.set()
            await s.aclose()
        err.read()
    await until(lambda: err.reader is not None and not err.reader.is_alive())
    os.close(err.read_end)
    assert outcomes is not None
    assert [(o.kind, o.reason) for o in outcomes] == [
        (OutcomeKind.RETRY, "not written: the router is stopping")
    ] * 3
    assert err.lines() == [b""]  # no record, and no warning of one written after its answer
    assert s.unsettled == 0
