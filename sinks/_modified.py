"""What a sink delivered changed (a message cut, a time stamped otherwise than the event's): counted
in ``Sink.modified`` at once, and logged at most every ``every`` seconds with the counts since the
last line (and at close), each sink in its own words. Loki, Kafka and SLS keep one each."""

from __future__ import annotations

import math
import time
from collections import Counter

__all__ = ["ModifiedLog"]


class ModifiedLog:
    def __init__(self, every: float) -> None:
        self.every = every
        self.unlogged: Counter[str] = Counter()
        self.logged_at = -math.inf

    def count(
        self, modified: Counter[str], found: Counter[str], *, flush: bool = False
    ) -> tuple[Counter[str], str] | None:
        """``found`` (counts by reason, of records the destination took) into the sink's total and
        the counts not logged yet; then what to log now (``due``)."""
        modified.update(found)
        self.unlogged.update(found)
        return self.due(flush=flush)

    def due(self, *, flush: bool = False) -> tuple[Counter[str], str] | None:
        """The counts to log now and since when ("start", "42s ago"), taken out; None when there is
        nothing to log or a line went out less than ``every`` seconds ago (``flush``: at close)."""
        now = time.monotonic()
        if not +self.unlogged or (not flush and now - self.logged_at < self.every):
            return None
        since = "start" if self.logged_at == -math.inf else f"{now - self.logged_at:.0f}s ago"
        counts, self.unlogged, self.logged_at = self.unlogged, Counter(), now
        return counts, since
