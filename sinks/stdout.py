"""``stdout`` sink: one JSON line (or one human-readable line) per occurrence on stdout or stderr.

``--sink=stdout`` or ``--sink=stdout:?stream=stderr&format=text``. The JSON line is the normalised
record exactly as every sink sees it (``include_raw=true`` adds the raw Event object).
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Sequence
from typing import BinaryIO, Literal

import orjson
from pydantic import Field

from eventrouter import OK, Occurrence, Outcome, RetryableError, Sink, SinkContext, SinkOptions, reject

__all__ = ["StdoutOptions", "StdoutSink", "text_line"]


class StdoutOptions(SinkOptions):
    stream: Literal["stdout", "stderr"] = Field("stdout", description="Where to write: stdout or stderr.")
    format: Literal["json", "text"] = Field(
        "json",
        description="json: one record per line; text: `time type namespace kind/name reason: message`.",
    )


def _one_line(text: str) -> str:
    # A text line must stay one line whatever the message holds.
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def text_line(occ: Occurrence) -> bytes:
    """The human summary: ``time type namespace kind/name reason: message`` (newlines escaped)."""
    rec = occ.record
    obj = rec.get("involved_object") or {}
    namespace = rec.get("namespace") or obj.get("namespace") or "-"
    subject = f"{obj.get('kind', '')}/{obj.get('name', '')}"
    line = (
        f"{rec.get('time', '')} {rec.get('type', '')} {namespace} {subject} "
        f"{rec.get('reason', '')}: {_one_line(rec.get('message', ''))}"
    )
    # backslashreplace: a lone surrogate must not fail the whole batch.
    return line.encode("utf-8", "backslashreplace") + b"\n"


class StdoutSink(Sink[StdoutOptions]):
    """Writes each batch to the process's stdout/stderr and flushes it; all items OK once written."""

    options_model = StdoutOptions
    description = "JSON lines (or text lines) on stdout/stderr"

    def __init__(self, options: StdoutOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        # A send abandoned by the engine's timeout may still run in its thread: never interleave writes.
        self._lock = threading.Lock()

    def _stream(self) -> BinaryIO:
        # Looked up at every send so a replaced sys.stdout (tests, daemon wrappers) is honoured.
        text = sys.stdout if self.options.stream == "stdout" else sys.stderr
        buffer: BinaryIO | None = getattr(text, "buffer", None)
        if buffer is None:
            raise RetryableError(f"{self.options.stream} is closed or has no binary buffer")
        return buffer

    def _encode(self, occ: Occurrence) -> bytes:
        if self.options.format == "text":
            return text_line(occ)
        return occ.encode(include_raw=self.options.include_raw) + b"\n"

    def _write(self, stream: BinaryIO, data: bytes) -> None:
        with self._lock:
            stream.write(data)
            stream.flush()

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        outcomes: list[Outcome] = []
        chunks: list[bytes] = []
        for occ in batch:
            try:
                chunks.append(self._encode(occ))
                outcomes.append(OK)
            except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
                outcomes.append(reject(f"cannot encode {occ.key}: {exc}"))
        if chunks:
            stream = self._stream()
            try:
                # A slow reader (a pipe into a pager, a stalled log collector) must not block the loop.
                await asyncio.to_thread(self._write, stream, b"".join(chunks))
            except (BrokenPipeError, OSError, ValueError) as exc:
                # ValueError: "I/O operation on closed file".
                raise RetryableError(f"cannot write to {self.options.stream}: {exc}") from exc
        return outcomes

    def __repr__(self) -> str:
        return f"StdoutSink(stream={self.options.stream!r}, format={self.options.format!r})"
