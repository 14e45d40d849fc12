"""Shortening an occurrence's message so that its encoded form fits a destination's size limit.

Events are small, but nothing stops a controller writing a message of a megabyte (the API server takes
objects up to ~1.5 MiB): Loki refuses lines over 256 KB, Kafka records over its message.max.bytes. A
shortened event that says so is more use than a dead letter that can never be re-sent as it is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eventrouter.record import Occurrence

__all__ = ["cut_utf8", "shorten_message"]

_ROUNDS = 4  # escaping (JSON, logfmt) makes a cut message longer than its bytes: a few rounds converge


def cut_utf8(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes, not splitting a UTF-8 character."""
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")


def shorten_message(
    occurrence: Occurrence, size: int, limit: int, render: Callable[[dict[str, Any]], bytes]
) -> bytes | None:
    """``render(marks)`` of the occurrence with its message cut so that it is at most ``limit`` bytes;
    ``marks`` holds the shortened ``message`` (ending in "…"), ``"truncated": True`` and
    ``"original_bytes": size``, for the sink to merge into its record. None when even an empty message
    does not fit (the rest of the event is too large). Deterministic: a retried entry is identical,
    so a destination that de-duplicates still does."""
    message = str(occurrence.record.get("message") or "").encode("utf-8")

    def cut(keep: int) -> bytes:
        shortened = cut_utf8(message, keep).decode("utf-8") + "…"
        return render({"message": shortened, "truncated": True, "original_bytes": size})

    # The rest of the event first: what the render leaves out (a raw copy) is not counted against the
    # message, which then gets all the room there is.
    empty = cut(0)
    if len(empty) > limit:
        return None
    room = keep = limit - len(empty)
    for _ in range(_ROUNDS):
        candidate = cut(keep)
        if len(candidate) <= limit:
            return candidate
        # Escaped characters (quotes, control characters) take more room than their bytes: scale down
        # by what the kept part took.
        keep = keep * room // (len(candidate) - len(empty))
        if keep <= 0:
            break
    return empty
