"""A ``Retry-After`` header as seconds from now, for ``retry(..., retry_after=...)``.

One parser for every sink: the copies in the sinks differed (digits only, dates read as local
time) and some raised on a date they could not represent, out of ``send`` (the engine then sent
the whole batch again: duplicates of everything already taken in it).
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["parse_retry_after"]

_SECONDS = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""A decimal number: RFC 9110's delta-seconds (digits), also with a fraction, a sign or an exponent
as some servers write it. Not what else ``float`` takes (``inf``, ``nan``, ``1_0``, non-ASCII digits)."""


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 §10.2.3) as seconds from ``now`` (default ``time.time()``).

    delta-seconds, or an HTTP-date (IMF-fixdate, RFC 850 or asctime; a date without a zone is
    GMT). A negative delay or a date in the past is ``0.0``; no header, an empty one, anything
    else (``soon``, ``inf``, ``nan``, a number too large for a float, a date no ``datetime`` can
    hold, such as an 11-digit year) is ``None``: the sink's or engine's own backoff. Never raises:
    a header is the destination's text, and an exception out of ``send`` retries the whole batch.

    No upper bound here: a huge delay is returned as it is, and the engine caps what it waits
    (``retry_wait_max``), which it must do for any sink's value anyway."""
    if not value:
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        seconds = float(text)  # cannot raise for this syntax; a huge one is inf
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delay = when.timestamp() - (time.time() if now is None else now)
    except Exception:  # ValueError, TypeError, IndexError, OverflowError seen: any is garbage
        return None
    return max(0.0, delay) if math.isfinite(delay) else None
