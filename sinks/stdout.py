"""``stdout`` sink: one JSON line (or one human-readable line) per occurrence on stdout or stderr.

``--sink=stdout`` or ``--sink=stdout:?stream=stderr&format=text``. The JSON line is the normalised
record exactly as every sink sees it (``include_raw=true`` adds the raw Event object).

A write blocked on a slow or absent reader (a log shipper away) never lands after the engine has
decided its batch's fate. On a pipe, terminal or socket the sink writes whole lines as room allows
and, once told to stop, begins no new line: at the end of the send's budget (what went out is OK, the
rest retried), when a send is cut off (the next send answers OK for what it wrote) and at the
router's stop (``stop_sending``, before the leftovers are spooled). A line that does not end within a
moment (longer than the pipe takes at once, a terminal, a pipe shared with stderr) is not waited for:
the send answers at once, the lines before it OK and the rest retried, and the next send (or the close)
settles that line. Only that line can end after its batch was spooled; that is logged, and counted in
the log line, as maybe written twice. On a regular file (``> events.jsonl``) the batch is one write(2),
which cannot be stopped part way: one hung (a stalled disk, NFS) past the stop may yet land whole, and
every line of it is logged and counted so.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import functools
import io
import itertools
import logging
import os
import select
import stat
import sys
import termios
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO, Literal, NamedTuple, TextIO

import orjson
from pydantic import Field, field_validator

from eventrouter import (
    OK,
    Occurrence,
    Outcome,
    RetryableError,
    Sink,
    SinkContext,
    SinkOptions,
    reject,
    retry,
)
from eventrouter.appendfile import append_all
from eventrouter.options import redact_url

from ._worker import CLOSE_GRACE, SinkThread, retrieved

__all__ = ["StdoutOptions", "StdoutSink", "text_line"]


class StdoutOptions(SinkOptions):
    stream: Literal["stdout", "stderr"] = Field("stdout", description="Where to write: stdout or stderr.")
    format: Literal["json", "text"] = Field(
        "json",
        description="json: one record per line; text: `time type namespace kind/name reason: message`.",
    )

    @field_validator("url")
    @classmethod
    def _no_address(cls, value: str) -> str:
        # `stdout:stderr` wrote to stdout as if nothing was said.
        if value.strip():
            raise ValueError(
                f"the stdout sink takes no address ({redact_url(value)!r}); options go after '?': "
                "stdout:?stream=stderr&format=text"
            )
        return value


def _escapes() -> dict[int, str]:
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}
    table.update(
        {ord("\\"): "\\\\", ord("\r"): "\\r", ord("\n"): "\\n", 0x2028: "\\u2028", 0x2029: "\\u2029"}
    )
    return table


_ESCAPES = _escapes()
"""What a text line writes escaped: the backslash (so every escape reads back one way), CR and LF, every
other C0 control but tab, DEL and the C1 controls, and the line and paragraph separators. An Event's
fields are written by whoever may create Events: an ESC sequence cleared the screen, hid the rest of
a line or set the window title, a backspace overwrote what was shown, and VT, FF, NEL or U+2028 cut
the record into lines for a collector splitting on them."""


def _one_line(text: str) -> str:
    # A text line must stay one line whatever the message holds, and show what it holds.
    return text.translate(_ESCAPES)


def text_line(occ: Occurrence) -> bytes:
    """The human summary: ``time type namespace kind/name reason: message`` (controls escaped)."""
    rec = occ.record
    obj = rec.get("involved_object") or {}
    namespace = rec.get("namespace") or obj.get("namespace") or "-"
    # Every field, not only the message: a reason or name holding a newline would otherwise start a
    # second line of the writer's choosing for a line-based collector.
    fields = (
        rec.get("time"),
        rec.get("type"),
        namespace,
        obj.get("kind"),
        obj.get("name"),
        rec.get("reason"),
    )
    time, type_, ns, kind, name, reason = (_one_line(str(f or "")) for f in fields)
    line = f"{time} {type_} {ns} {kind}/{name} {reason}: {_one_line(str(rec.get('message') or ''))}"
    # backslashreplace: a lone surrogate must not fail the whole batch.
    return line.encode("utf-8", "backslashreplace") + b"\n"


class _Target(NamedTuple):
    fd: int | None  # None: an in-memory stream, written through ``buffer``
    buffer: BinaryIO
    locks: tuple[threading.RLock, ...]  # logging's handlers writing to the same descriptor


def _logging_locks(text: TextIO, fd: int) -> tuple[threading.RLock, ...]:
    # A batch larger than a pipe takes several write(2)s: a log line written to the same descriptor
    # (stream=stderr) between them would land inside a record. Logging writes under its handler's
    # lock, so the batch takes the same lock while it is inside a line (``_Held``).
    locks = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if handler.lock is None or stream is None:
            continue
        if stream is not text:
            try:
                if stream.fileno() != fd:
                    continue
            except (OSError, ValueError, AttributeError):  # in memory, closed, or not a file at all
                continue
        locks.append(handler.lock)
    return tuple(locks)


def _write_file(fd: int, data: bytes, size: int) -> None:
    """A regular file (``> file`` or ``>> file``): written whole or cut back to where it was, so a
    full disk or a size limit leaves no torn line for the retry to append after."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        append_all(fd, data, size)
        return
    # `> file`: written at the descriptor's offset, which must go back with the cut.
    start = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        append_all(fd, data, start)
    except OSError:
        with contextlib.suppress(OSError):
            os.lseek(fd, start, os.SEEK_SET)
        raise


_STOPPING = retry("not written: the router is stopping", held=True)

_TICK_MS = 50
"""How long a write waiting for room looks away from its stop flag (a full pipe wakes no one)."""

_STOP_GRACE = 0.2
"""How long a send told to stop waits for the line being written to end (a few ticks): one stuck on
an absent reader is left for the next send, not waited for past the budget or the router's stop."""


class _Held:
    """Logging's handler locks on the descriptor, taken by a write on a stream while it is inside a
    line: a log line then lands between two records, never inside one. Held for the whole batch, as
    before, a slow reader (a batch taking seconds) kept every log call of the event loop waiting that
    long: the watch, every other sink's sends and /healthz stalled with it."""

    def __init__(self, locks: tuple[threading.RLock, ...]) -> None:
        self.locks = locks
        self.held = False

    def take(self) -> None:
        if not self.held:
            for lock in self.locks:
                lock.acquire()
            self.held = True

    def leave(self) -> None:
        if self.held:
            for lock in reversed(self.locks):
                lock.release()
            self.held = False


class _Write:
    """One batch on its way out in the sink's thread. Once ``stop`` is set it begins no new line: what
    it wrote (the lines before ``written``) is then final, and the rest is never written by it."""

    def __init__(self, lines: list[bytes], keys: list[str]) -> None:
        self.data = b"".join(lines)
        self.ends = list(itertools.accumulate(map(len, lines)))
        self.keys = keys
        self.written = 0  # bytes out; set by the thread only
        self.stop = threading.Event()
        self.gone: frozenset[str] = frozenset()  # keys the engine gave up while this write went on
        self.answered = 0  # lines its send answered OK; those after it and written are not said yet
        self.told: set[str] = set()  # lines after ``answered`` that a later send answered OK
        self.whole = False  # set by the thread: one write(2) of all of it (a regular file) begun

    def count(self) -> int:
        """Lines written whole."""
        return bisect.bisect_right(self.ends, self.written)

    def delivered(self) -> list[str]:
        return self.keys[: self.count()]

    def untold(self) -> list[str]:
        """Lines written whole that no send answered OK yet (its send cut off, or answered early)."""
        return [
            key
            for key in self.keys[self.answered : self.count()]
            if key not in self.gone and key not in self.told
        ]

    def torn(self) -> str | None:
        """The key of the line written in part, if the write is stuck inside one."""
        n = self.count()
        return self.keys[n] if n < len(self.keys) and self.written > (self.ends[n - 1] if n else 0) else None

    def in_flight(self) -> list[str]:
        """While the write goes on: the lines it may yet put out, which its send did not answer OK.
        On a stream that is the line it is stuck inside; on a regular file, all it has not written."""
        if self.whole:
            return self.keys[self.count() :]
        torn = self.torn()
        return [torn] if torn is not None else []

    def _next_end(self, room: int) -> int:
        """Where the next write(2) ends: the whole lines that fit ``room``, or part of a line longer
        than that; once stopped, never past the end of the line begun."""
        written = self.written
        target = min(written + room, len(self.data))
        n = self.count()
        if self.stop.is_set():
            return min(target, self.ends[n])
        if target == len(self.data):
            return target
        i = bisect.bisect_right(self.ends, target)
        return self.ends[i - 1] if i and self.ends[i - 1] > written else target

    def out(self, fd: int, mode: int, locks: tuple[threading.RLock, ...]) -> None:
        """Write to a pipe, terminal or socket, never more than it has room for (a write(2) blocked
        on a stalled reader cannot be called back), waiting for room without spinning, also when the
        descriptor is non-blocking (O_NONBLOCK set again by whoever shares it). Logging's ``locks``
        are held per write(2), and between writes only inside a line (``_Held``)."""
        held = _Held(locks)
        try:
            self._out(fd, mode, held)
        finally:
            held.leave()

    def _out(self, fd: int, mode: int, held: _Held) -> None:
        view = memoryview(self.data)
        fifo = stat.S_ISFIFO(mode)
        # /dev/null and the like take everything at once; a terminal or socket a PIPE_BUF at a time.
        whole = stat.S_ISCHR(mode) and not os.isatty(fd)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while self.written < len(view):
            if self.stop.is_set() and self.torn() is None:
                return
            if not poller.poll(_TICK_MS):  # a reader gone or the descriptor closed wakes it too:
                continue  # the write then raises
            held.take()
            # The stop looked at again: taking the locks waits for a log call of another thread, as
            # long as its write to a slow stderr; a stop meanwhile answered the lines not written.
            if self.stop.is_set() and self.torn() is None:
                return
            # Room looked at again under the locks: a log line may have taken it meanwhile, and a
            # write(2) blocked on it would keep logging waiting for the reader.
            if held.locks and not poller.poll(0):
                self._between_lines(held)
                continue
            end = self._next_end(len(view) if whole else _room(fd, fifo))
            with contextlib.suppress(BlockingIOError):  # no room after all: poll again
                self.written += os.write(fd, view[self.written : end])
            self._between_lines(held)

    def _between_lines(self, held: _Held) -> None:
        if self.torn() is None:  # logging may write now: not inside a record
            held.leave()


def _answer(outcomes: list[Outcome | None], done: int, rest: Outcome) -> None:
    """In place, the outcomes of the lines a write carried (those still None, in order): the first
    ``done`` went out (OK), the others ``rest``."""
    line = 0
    for i, out in enumerate(outcomes):
        if out is None:
            outcomes[i] = OK if line < done else rest
            line += 1


def _room(fd: int, fifo: bool) -> int:
    """Bytes one write(2) can take without blocking: the whole pipe when it is empty, else one
    PIPE_BUF (poll's POLLOUT promises that much; a pipe counts its room in pages, not bytes)."""
    if fifo:
        with contextlib.suppress(OSError):
            unread = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)
            if not unread:
                return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    return select.PIPE_BUF


class StdoutSink(Sink[StdoutOptions]):
    """Writes each batch to the process's stdout/stderr and flushes it; all items OK once written."""

    options_model = StdoutOptions
    description = "JSON lines (or text lines) on stdout/stderr"

    def __init__(self, options: StdoutOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        # A thread of its own: a stalled reader (a pager, a log collector away) blocks a write for as
        # long as it likes, and must not take the loop's default pool (file sinks, DNS lookups) with it.
        self._pool: SinkThread | None = None
        # The write of a send cut off before it ended (the engine's timeout, a stop): it begins no new
        # line, and the next send waits for it and answers OK for what it wrote, not writing it again.
        self._writing: tuple[asyncio.Future[None], _Write] | None = None
        # Keys written whose send has not answered them yet (it was cut off): OK at their next send.
        self._written: set[str] = set()
        self._stopping = False  # stop_sending(): the router is stopping, nothing more is begun
        self._wake: asyncio.Future[None] | None = None  # set by stop_sending: the send answers now
        self.unsettled = 0
        """Records written that the engine counts as not delivered (spooled or dead-lettered), or that
        may yet be written after that: each is logged by key; written twice if sent again."""

    def _executor(self) -> SinkThread:
        if self._pool is None:
            self._pool = SinkThread(f"sink-{self.context.name}")
        return self._pool

    async def start(self) -> None:
        self._executor()
        text = self._text()
        # The batches go to the descriptor, not through this buffer: whatever was printed to it before
        # goes out first.
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, or no stdout at all
            text.flush()
        with contextlib.suppress(RetryableError):  # no stream yet: the first send says so
            target = self._target(text)
            if target.fd is not None:
                self._make_blocking(target.fd)

    def _text(self) -> TextIO:
        # Looked up at every send so a replaced sys.stdout (tests, daemon wrappers) is honoured.
        return sys.stdout if self.options.stream == "stdout" else sys.stderr

    def _target(self, text: TextIO) -> _Target:
        buffer: BinaryIO | None = getattr(text, "buffer", None)
        if buffer is None:
            raise RetryableError(f"{self.options.stream} is closed or has no binary buffer")
        try:
            fd = buffer.fileno()
        except (io.UnsupportedOperation, AttributeError):  # in memory (tests, wrappers): written whole
            return _Target(None, buffer, ())
        except ValueError as exc:  # "I/O operation on closed file"
            raise RetryableError(f"cannot write to {self.options.stream}: {exc}") from exc
        return _Target(fd, buffer, _logging_locks(text, fd))

    def _make_blocking(self, fd: int) -> None:
        # O_NONBLOCK set by whoever shares the pipe (node, some supervisors). A write waits for room
        # whatever the mode (`_Write.out`); a blocking descriptor spares it the polling.
        try:
            if os.get_blocking(fd):
                return
            os.set_blocking(fd, True)
        except OSError:
            return
        self.log.warning(
            "sink %s: %s (fd %d) was in non-blocking mode; set it blocking (the mode is shared with "
            "whoever else holds that pipe or terminal)",
            self.context.name,
            self.options.stream,
            fd,
        )

    def _encode(self, occ: Occurrence) -> bytes:
        if self.options.format == "text":
            return text_line(occ)
        return occ.encode(include_raw=self.options.include_raw) + b"\n"

    @staticmethod
    def _write(target: _Target, w: _Write) -> None:
        """All of the batch, the lines before a stop, or an OSError. Runs in the sink's thread."""
        if target.fd is None:
            target.buffer.write(w.data)
            target.buffer.flush()
            w.written = len(w.data)
            return
        # The descriptor, not the stream's buffer. Under PYTHONUNBUFFERED (the image sets it) that is
        # the raw FileIO: one write(2), which may take part of the batch and drop the rest unsaid.
        # Otherwise a BufferedWriter, whose lock this (daemon) thread held while blocked on a stalled
        # reader: the interpreter's last flush then aborted the process.
        info = os.fstat(target.fd)
        if not stat.S_ISREG(info.st_mode):
            w.out(target.fd, info.st_mode, target.locks)
            return
        with contextlib.ExitStack() as held:  # one write(2): logging waits for it, as a line would
            for lock in target.locks:
                held.enter_context(lock)
            w.whole = True  # before the stop is looked at: a stop that misses it finds it said
            if not w.stop.is_set():  # a file takes it at once, or fails it whole
                _write_file(target.fd, w.data, os.fstat(target.fd).st_size)
                w.written = len(w.data)

    async def _settle(self, timeout: float) -> bool:
        """Wait, up to ``timeout``, for the write an earlier send left (it begins no new line) and note
        what it wrote: those lines are OK, not written again. False while it is still inside a line:
        nothing may be written after it yet."""
        if self._writing is None:
            return True
        future, w = self._writing
        await asyncio.wait([future], timeout=timeout)  # a cancelled wait leaves the write remembered
        if not future.done():
            return False
        self._writing = None
        # Also after an error: on a stream the lines before it went out.
        self._written.update(w.untold())
        return True

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        began = time.monotonic()
        budget = self.context.send_budget
        stuck = self._writing[1] if self._writing is not None else None
        before = stuck.written if stuck is not None else 0
        if not await self._settle(budget):
            # A line begun earlier is still not through (the reader away): nothing can follow it.
            # What that write finished since is OK; a reader that took some is slow, not gone.
            assert stuck is not None
            finished = set(stuck.untold())
            busy = retry(
                f"{self.options.stream} is still inside a line begun by an earlier send (its reader "
                "is slow or away)",
                held=stuck.written > before,
            )
            said = [OK if occ.key in finished or occ.key in self._written else busy for occ in batch]
            # Answered OK now: neither the settling of that write nor the close says them again.
            stuck.told.update(finished.intersection(occ.key for occ in batch))
            self._written.difference_update(occ.key for occ in batch)
            return said
        outcomes: list[Outcome | None] = []
        chunks: list[bytes] = []
        keys: list[str] = []
        for occ in batch:
            if occ.key in self._written:
                outcomes.append(OK)  # written by a send cut off before it could say so
                continue
            if self._stopping:
                outcomes.append(_STOPPING)
                continue
            try:
                chunks.append(self._encode(occ))
                keys.append(occ.key)
                outcomes.append(None)
            except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
                outcomes.append(reject(f"cannot encode {occ.key}: {exc}"))
        if chunks:
            target = self._target(self._text())
            w = _Write(chunks, keys)
            future = asyncio.get_running_loop().run_in_executor(self._executor(), self._write, target, w)
            future.add_done_callback(retrieved)
            self._writing = (future, w)
            self._wake = wake = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait(
                    [future, wake],
                    timeout=max(0.0, budget - (time.monotonic() - began)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not future.done():
                    # The reader is slow or away, or the router stops: what went out is said now,
                    # before the engine's timeout (or the stop) leaves the write behind. The line
                    # begun gets a moment to end; one stuck is settled by the next send or the close.
                    w.stop.set()
                    await asyncio.wait([future], timeout=_STOP_GRACE)
            except asyncio.CancelledError:
                w.stop.set()  # nothing more begun; the next send answers what it wrote
                raise
            finally:
                self._wake = None
            if not future.done():
                w.answered = done = w.count()
                _answer(outcomes, done, self._rest(w, None, False, budget))
                self._written.difference_update(occ.key for occ in batch)
                return [OK if out is None else out for out in outcomes]
            self._writing = None
            error = None if future.cancelled() else future.exception()
            if error is not None:
                if not isinstance(error, (OSError, ValueError)):
                    self._written.update(w.delivered())
                    raise error  # a bug: the engine retries the batch, and what went out is OK then
                if not w.count():  # ValueError: "I/O operation on closed file"
                    raise RetryableError(f"cannot write to {self.options.stream}: {error}") from error
            _answer(outcomes, w.count(), self._rest(w, error, future.cancelled(), budget))
        self._written.difference_update(occ.key for occ in batch)
        return [OK if out is None else out for out in outcomes]

    def _rest(self, w: _Write, error: BaseException | None, cancelled: bool, budget: float) -> Outcome:
        """The outcome of a write's lines that did not go out."""
        if error is not None:  # after some lines went out (a pipe's reader gone part way)
            return retry(f"cannot write to {self.options.stream}: {error}")
        if cancelled:
            return retry(f"the write to {self.options.stream} was cancelled")
        if self._stopping:
            return _STOPPING
        # A reader that took some is slow, not gone: the rest goes next without a failed attempt.
        return retry(
            f"{self.options.stream} took {'no more' if w.count() else 'nothing'} within the send's "
            f"{budget:.3g}s (its reader is slow or away)",
            held=w.count() > 0,
        )

    def stop_sending(self) -> None:
        """The router is stopping (its drain deadline passed): the send in progress ends at the end of
        the line being written and answers what went out, before the leftovers are spooled; nothing
        new is begun. Without it, the write went on past the stop and landed after its batch was
        spooled: written again after the restart."""
        self._stopping = True
        if self._writing is not None:
            self._writing[1].stop.set()
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        """Dead-lettered or dropped: what of them is on stdout already, or may yet be (a line stuck
        part way), is said by key, for the dead-letter file to be pruned before a replay."""
        gone = frozenset(occ.key for occ in occurrences)
        out = gone & self._written
        self._written -= gone
        if self._writing is not None and not gone.isdisjoint(self._writing[1].keys):
            future, w = self._writing
            w.stop.set()
            w.gone |= gone
            out |= gone.intersection(w.delivered())
            if not future.done():
                maybe = gone.intersection(w.in_flight())
                if maybe:
                    self._say_unsettled(
                        sorted(maybe),
                        "given up (dead-lettered or dropped) while "
                        + (
                            "a write of them to {stream} (a regular file) went on"
                            if w.whole
                            else "its line was being written to {stream}"
                        ),
                        maybe=True,
                    )
                future.add_done_callback(functools.partial(self._written_late, w, frozenset(out), maybe))
        if out:
            self._say_unsettled(
                sorted(out), "given up (dead-lettered or dropped) but written to {stream} already"
            )

    def _written_late(
        self, w: _Write, said: frozenset[str], maybe: frozenset[str], future: asyncio.Future[None]
    ) -> None:
        late = w.gone.intersection(w.delivered()) - said
        if late:  # those said as maybe delivered are not counted again
            self._say_unsettled(
                sorted(late), "written to {stream} after they were given up", counted=len(late & maybe)
            )

    def _say_unsettled(
        self, keys: Sequence[str], what: str, *, maybe: bool = False, counted: int = 0
    ) -> None:
        self.unsettled += len(keys) - counted
        self.log.warning(
            "sink %s: %d records %s: %s and also counted as not, so written twice if sent again (%d "
            "such records in all): %s",
            self.context.name,
            len(keys),
            what.format(stream=self.options.stream),
            "maybe delivered (if the write ends)" if maybe else "delivered",
            self.unsettled,
            ", ".join(keys[:20]) + (f" and {len(keys) - 20} more" if len(keys) > 20 else ""),
        )

    async def aclose(self) -> None:
        # A write left by a cut-off send begins no new line; the one it is in gets a moment to end.
        # One blocked for good is left in its (daemon) thread and does not keep the process from
        # exiting. What such writes put out was never answered OK: it is said, as it comes again.
        pool, self._pool = self._pool, None
        if pool is None:  # never started, or closed already
            return
        self._stopping = True
        try:
            untold = set(self._written)
            hung: list[str] = []  # may yet be written (those given up were said so already)
            whole = False
            if self._writing is not None:
                future, w = self._writing
                w.stop.set()
                await asyncio.wait([future], timeout=CLOSE_GRACE)
                untold.update(w.untold())
                if not future.done():
                    hung, whole = [key for key in w.in_flight() if key not in w.gone], w.whole
                self._writing = None
            self._written.clear()
            if untold:
                self._say_unsettled(
                    sorted(untold),
                    "written to {stream} by a send cut off before it could say so "
                    "(kept for the next start, or counted as not delivered)",
                )
            if hung and whole:
                self._say_unsettled(
                    hung,
                    "in a write to {stream} (a regular file) still hung at the close (kept for the next "
                    "start): they may yet be written whole if it ends before the process exits",
                    maybe=True,
                )
            elif hung:
                self._say_unsettled(
                    hung,
                    "in a line stuck part way on {stream} at the close (kept for the next start): it "
                    "may yet be written if the reader comes back before the process exits",
                    maybe=True,
                )
        finally:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"StdoutSink(stream={self.options.stream!r}, format={self.options.format!r})"
