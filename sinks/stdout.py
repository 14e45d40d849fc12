"""``stdout`` sink: one JSON line (or one human-readable line) per occurrence on stdout or stderr.

``--sink=stdout`` or ``--sink=stdout:?stream=stderr&format=text``. The JSON line is the normalised
record exactly as every sink sees it (``include_raw=true`` adds the raw Event object).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO, Literal

import orjson
from pydantic import Field, field_validator

from eventrouter import OK, Occurrence, Outcome, RetryableError, Sink, SinkContext, SinkOptions, reject
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
        with contextlib.suppress(RetryableError):  # no stream yet: the first send says so
            self._make_blocking(self._stream())

    def _stream(self) -> BinaryIO:
        # Looked up at every send so a replaced sys.stdout (tests, daemon wrappers) is honoured.
        text = sys.stdout if self.options.stream == "stdout" else sys.stderr
        buffer: BinaryIO | None = getattr(text, "buffer", None)
        if buffer is None:
            raise RetryableError(f"{self.options.stream} is closed or has no binary buffer")
        return buffer

    def _make_blocking(self, stream: BinaryIO) -> None:
        # O_NONBLOCK set by whoever shares the pipe (node, some supervisors) makes a full pipe take
        # part of a batch and raise BlockingIOError: torn lines, and the retry writes copies.
        try:
            fd = stream.fileno()
            if os.get_blocking(fd):
                return
            os.set_blocking(fd, True)
        except (OSError, ValueError):  # no descriptor (an in-memory stream): nothing to set
            return
        self.log.warning(
            "sink %s: %s (fd %d) was in non-blocking mode; set it blocking so that every write is "
            "whole (the mode is shared with whoever else holds that pipe or terminal)",
            self.context.name,
            self.options.stream,
            fd,
        )

    def _encode(self, occ: Occurrence) -> bytes:
        if self.options.format == "text":
            return text_line(occ)
        return occ.encode(include_raw=self.options.include_raw) + b"\n"

    def _write(self, stream: BinaryIO, data: bytes) -> None:
        self._make_blocking(stream)  # also when it was switched after start
        stream.write(data)
        stream.flush()

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
            stream = self._stream()
            future = asyncio.get_running_loop().run_in_executor(
                self._executor(), self._write, stream, b"".join(chunks)
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
