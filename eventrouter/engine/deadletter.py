"""Dead-letter file: every occurrence a sink refused for good, with the reason, as JSON lines.

``<data-dir>/deadletter/<sink>.jsonl``, rotated at a size bound so a misconfigured sink cannot fill
the disk (the rotation itself is counted in the log). Without --data-dir the reason is only logged
and counted.

Each line: ``sink``, ``reason``, ``dead_lettered_at``, ``key`` (``<uid>/<occurrence>``), ``record`` (the
normalised record) and ``event`` (the Event object as the API server sent it), so that, once the cause
is fixed, ``eventrouter replay FILE --sink=...`` delivers the same occurrences again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from eventrouter.appendfile import append_to
from eventrouter.record import Occurrence

__all__ = ["DEADLETTER_MAX", "DeadLetter"]

DEADLETTER_MAX = 100 * 1024 * 1024
"""Bytes per dead-letter file before it is rotated (one rotated file is kept)."""

log = logging.getLogger(__name__)


class DeadLetter:
    def __init__(self, path: Path | None, *, sink: str, max_bytes: int = DEADLETTER_MAX) -> None:
        self.path = path
        self.sink = sink
        self.max_bytes = max_bytes
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, items: Sequence[tuple[Occurrence, str]]) -> bool:
        """Append the items; False (the error logged) when the file cannot be written."""
        if self.path is None or not items:
            return True
        now = time.time()
        # The record and the event are spliced in as the JSON they already are.
        lines = b"".join(
            orjson.dumps({"sink": self.sink, "reason": reason, "dead_lettered_at": now, "key": occ.key})[:-1]
            + b',"record":'
            + occ.json
            + b',"event":'
            + occ.raw_json
            + b"}\n"
            for occ, reason in items
        )
        try:
            if self.path.exists() and self.path.stat().st_size + len(lines) > self.max_bytes:
                older = self.path.with_suffix(self.path.suffix + ".1")
                discarded = older.stat().st_size if older.exists() else 0
                os.replace(self.path, older)
                log.warning(
                    "dead-letter file %s rotated at %d bytes to %s%s; re-send them with `eventrouter replay`",
                    self.path,
                    self.max_bytes,
                    older.name,
                    f" (the previous {older.name}, {discarded} bytes of older dead letters, is gone)"
                    if discarded
                    else "",
                )
            append_to(self.path, lines)
        except OSError as exc:
            log.error(
                "cannot write dead-letter file %s: %s; %d dead-lettered occurrences not kept: %s",
                self.path,
                exc.strerror or exc,
                len(items),
                ", ".join(f"{occ.key} ({reason})" for occ, reason in items[:20])
                + (f" and {len(items) - 20} more" if len(items) > 20 else ""),
            )
            return False
        return True
