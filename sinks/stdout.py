"""``stdout`` sink: one JSON line (or one human-readable line) per occurrence on stdout or stderr.

``--sink=stdout`` or ``--sink=stdout:?stream=stderr&format=text``. The JSON line is the normalised
record exactly as every sink sees it (``include_raw=true`` adds the raw Event object).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import logging
import os
import select
import stat
import sys
import threading
from collections.abc import Sequence
from typing import BinaryIO, Literal, NamedTuple, TextIO

import orjson
from pydantic import Field, field_validator

from eventrouter import OK, Occurrence, Outcome, RetryableError, Sink, SinkContext, SinkOptions, reject
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


def _one_line(text: str) -> str:
    # A text line must stay one line whatever the message holds.
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def text_line(occ: Occurrence) -> bytes:
    """The human summary: ``time type namespace kind/name reason: message`` (newlines escaped)."""
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
    # lock, so the batch takes the same lock.
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


def _write_stream(fd: int, data: bytes) -> None:
    """A pipe, terminal or socket: write until all is written, waiting for room (without spinning)
    when the descriptor is non-blocking (O_NONBLOCK set again by whoever shares it)."""
    view = memoryview(data)
    poller: select.poll | None = None
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            written = 0
        if written:  # all, or a short write: the rest may go at once, or raise EAGAIN
            view = view[written:]
            continue
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
        poller.poll()  # a reader gone or the descriptor closed wakes it too: the write then raises


class StdoutSink(Sink[StdoutOptions]):
    """Writes each batch to the process's stdout/stderr and flushes it; all items OK once written."""

    options_model = StdoutOptions
    description = "JSON lines (or text lines) on stdout/stderr"

    def __init__(self, options: StdoutOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        # A thread of its own: a stalled reader (a pager, a log collector away) blocks a write for as
        # long as it likes, and must not take the loop's default pool (file sinks, DNS lookups) with it.
        self._pool: SinkThread | None = None
        # The write in progress and the keys it carries. A send the engine abandoned at its timeout
        # goes on in the worker; the next send waits for it instead of writing the same lines again.
        self._writing: tuple[asyncio.Future[None], frozenset[str]] | None = None

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
        # whatever the mode (`_write_stream`); a blocking descriptor spares it the polling.
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
    def _write(target: _Target, data: bytes) -> None:
        """All of ``data``, or an OSError. Runs in the sink's thread."""
        if target.fd is None:
            target.buffer.write(data)
            target.buffer.flush()
            return
        # The descriptor, not the stream's buffer. Under PYTHONUNBUFFERED (the image sets it) that is
        # the raw FileIO: one write(2), which may take part of the batch and drop the rest unsaid.
        # Otherwise a BufferedWriter, whose lock this (daemon) thread held while blocked on a stalled
        # reader: the interpreter's last flush then aborted the process.
        with contextlib.ExitStack() as held:
            for lock in target.locks:
                held.enter_context(lock)
            info = os.fstat(target.fd)
            if stat.S_ISREG(info.st_mode):
                _write_file(target.fd, data, info.st_size)
            else:
                _write_stream(target.fd, data)

    async def _settle(self) -> frozenset[str]:
        """Wait for the write in progress (the engine's send timeout bounds the wait); the keys it
        delivered, none if it failed."""
        if self._writing is None:
            return frozenset()
        future, keys = self._writing
        await asyncio.wait([future])  # a cancelled wait leaves the write running, and remembered
        self._writing = None
        return keys if not future.cancelled() and future.exception() is None else frozenset()

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        # What a write abandoned at the engine's timeout delivered is OK now, not written again.
        delivered = await self._settle()
        outcomes: list[Outcome] = []
        chunks: list[bytes] = []
        keys: list[str] = []
        for occ in batch:
            if occ.key in delivered:
                outcomes.append(OK)
                continue
            try:
                chunks.append(self._encode(occ))
                keys.append(occ.key)
                outcomes.append(OK)
            except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
                outcomes.append(reject(f"cannot encode {occ.key}: {exc}"))
        if chunks:
            target = self._target(self._text())
            future = asyncio.get_running_loop().run_in_executor(
                self._executor(), self._write, target, b"".join(chunks)
            )
            future.add_done_callback(retrieved)
            self._writing = (future, frozenset(keys))
            await self._settle()
            if future.cancelled():
                raise RetryableError(f"the write to {self.options.stream} was cancelled")
            if (error := future.exception()) is not None:
                if isinstance(error, (OSError, ValueError)):  # ValueError: "I/O operation on closed file"
                    raise RetryableError(f"cannot write to {self.options.stream}: {error}") from error
                raise error
        return outcomes

    async def aclose(self) -> None:
        # A write in progress ends first, if it does within a moment; one blocked on a stalled reader
        # is left in its (daemon) thread, and no longer keeps the process from exiting.
        pool, self._pool = self._pool, None
        if pool is None:  # never started, or closed already
            return
        try:
            if self._writing is not None:
                await asyncio.wait([self._writing[0]], timeout=CLOSE_GRACE)
        finally:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"StdoutSink(stream={self.options.stream!r}, format={self.options.format!r})"
