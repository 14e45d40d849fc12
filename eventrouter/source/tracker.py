"""Turns Event objects into occurrences: each raise of the occurrence number is delivered once."""

from __future__ import annotations

import logging
from typing import Any

from eventrouter.record import MalformedEvent, Occurrence, normalise, occurrence_number

__all__ = ["OccurrenceTracker"]

log = logging.getLogger(__name__)


class OccurrenceTracker:
    """Remembers the highest occurrence number handed on per live event uid.

    Bounded by the number of live Event objects: entries go on DELETED and after a complete list.
    """

    def __init__(self, *, cluster: str = "") -> None:
        self.cluster = cluster
        self.seen: dict[str, int] = {}

    def observe(self, obj: Any, *, received_at: float | None = None) -> Occurrence | None:
        """ADDED, MODIFIED or a listed item → a new occurrence, or None when the number did not rise.

        Raises MalformedEvent for objects without a usable identity."""
        if not isinstance(obj, dict):
            raise MalformedEvent(f"watch object is {type(obj).__name__}, not an object")
        meta = obj.get("metadata")
        uid = meta.get("uid") if isinstance(meta, dict) else None
        if not isinstance(uid, str) or not uid:
            return normalise(obj, cluster=self.cluster)  # raises with a precise message
        number = occurrence_number(obj)
        if number <= self.seen.get(uid, 0):
            return None
        occ = normalise(obj, cluster=self.cluster, received_at=received_at, owned=True, number=number)
        self.seen[uid] = number
        return occ

    def deleted(self, obj: Any) -> str | None:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        uid = meta.get("uid") if isinstance(meta, dict) else None
        if isinstance(uid, str):
            self.seen.pop(uid, None)
            return uid
        return None

    def prune(self, live: set[str]) -> int:
        gone = [uid for uid in self.seen if uid not in live]
        for uid in gone:
            del self.seen[uid]
        return len(gone)

    def __len__(self) -> int:
        return len(self.seen)
