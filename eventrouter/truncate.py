"""Shortening an occurrence's message so that its encoded form fits a destination's size limit.

Events are small, but nothing stops a controller writing a message of a megabyte (the API server takes
objects up to ~1.5 MiB): Loki refuses lines over 256 KB, Kafka records over its message.max.bytes. A
shortened event that says so is more use than a dead letter that can never be re-sent as it is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from eventrouter.record import Occurrence

__all__ = ["cut_utf8", "shorten_message"]

# Interpolation rounds before bisecting: escaping (JSON, logfmt) makes a cut message longer than its
# bytes, by a density that can change along the message (a quoted JSON head, then plain text).
_ROUNDS = 8
# Close enough: a kept prefix within 1/4096 of the longest that fits saves a render or two.
_CLOSE = 12


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
    ``"original_bytes": size``, for the sink to merge into its record. The message kept is the longest
    prefix that fits, to within 1/4096, when ``render`` writes each of its bytes as one byte or more
    (escaped); what is returned fits in any case. None when even an empty message does not fit (the
    rest of the event is too large). Deterministic: a retried entry is identical, so a destination
    that de-duplicates still does."""
    message = str(occurrence.record.get("message") or "").encode("utf-8")
    end = len(message)

    def cut(keep: int) -> bytes:  # ``keep`` is on a character boundary
        shortened = message[:keep].decode("utf-8") + "…"
        return render({"message": shortened, "truncated": True, "original_bytes": size})

    # The rest of the event first: what the render leaves out (a raw copy) is not counted against the
    # message, which then gets all the room there is.
    empty = cut(0)
    if len(empty) > limit:
        return None
    # The longest prefix that fits, by a search over its length in bytes. Every byte of the message
    # takes at least one byte of the line, which bounds it: a prefix that fits with ``slack`` bytes to
    # spare has no fitting one longer by more than that (``hi``), and one over by ``excess`` has a
    # fitting one shorter by that (``floor``). The first guess, the whole room or the whole message,
    # is the answer for plain text; then the line's excess over the limit is interpolated between the
    # nearest prefixes known to fit (``lo``) and not to (``up``), halving a stale end's weight
    # ("Illinois") so that a message escaping more densely at its head than at the cut still converges,
    # and after _ROUNDS bisected, until lo is within 1/4096 of hi. Deterministic: the same event and
    # limit give the same guesses.
    lo, best, over_lo = 0, empty, float(len(empty) - limit)  # over_*: the line's length - limit
    hi = min(limit - len(empty), end)
    up, over_up, floor, last = -1, 0.0, 0, 0
    keep, rounds = hi, 0
    while hi - lo > lo >> _CLOSE:
        keep = _boundary(message, keep, lo, hi)
        if keep < 0:
            break  # no character ends between lo and hi
        candidate = cut(keep)
        over = len(candidate) - limit
        if over <= 0:
            lo, best, over_lo = keep, candidate, over
            hi = min(hi, keep - over)
            if last > 0:
                over_up /= 2
            last = 1
        else:
            up, over_up = keep, over
            hi, floor = keep - 1, max(floor, keep - over)
            if last < 0:
                over_lo /= 2
            last = -1
        rounds += 1
        if last < 0 and over <= floor >> _CLOSE:
            keep = floor
        elif up >= 0 and rounds <= _ROUNDS:
            keep = lo + int(-over_lo * (up - lo) // (over_up - over_lo))
        else:
            keep = (lo + hi + 1) // 2
        keep = min(hi, max(lo + 1, floor, keep))
    return best


def _boundary(data: bytes, keep: int, lo: int, hi: int) -> int:
    """A character boundary in ``data`` in (lo, hi], the nearest at or below ``keep`` if there is one;
    -1 when there is none. ``lo`` is a boundary and lo < keep <= hi."""
    at = keep
    while at > lo and at < len(data) and data[at] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        at -= 1
    if at > lo:
        return at
    at = keep
    while at < len(data) and data[at] & 0xC0 == 0x80:
        at += 1
    return at if at <= hi else -1
