"""Turns Event objects into occurrences: each raise of the occurrence number is delivered once."""

from __future__ import annotations

import collections
import logging
from typing import Any

from eventrouter.logs import Throttled
from eventrouter.record import MalformedEvent, Occurrence, normalise, normalise_checked, occurrence_number

__all__ = ["OccurrenceTracker"]

log = logging.getLogger(__name__)


THROTTLE_PERIOD = 10.0
"""Seconds between two warnings of one kind: a relist may hold thousands of events a writer lowered."""


class OccurrenceTracker:
    """Remembers the highest occurrence number handed on per live event uid.

    Bounded by the number of live Event objects: entries go on DELETED and after a complete list.

    A write whose number is below the highest handed on (a writer lowered its count), or one whose
    ``series.lastObservedTime`` moved on without a higher number, is not delivered: it is counted in
    ``dropped`` (drained by the watcher into ``eventrouter_source_dropped_total``) and logged,
    throttled. The same object delivered again (a relist, a write that changed nothing counted)
    stays silent.

    ``exact`` (the replay of a dead-letter file): every distinct (uid, number) is handed on once, in
    whatever order they come. Such a file is in the order the sink gave up on them, not in number
    order ((uid, 5) refused at once, (uid, 3) retried and given up later): remembering only the
    highest number skipped 3, a dead letter lost on replay, and called it a lowered count."""

    def __init__(self, *, cluster: str = "", exact: bool = False) -> None:
        self.cluster = cluster
        self.exact = exact
        self.seen: dict[str, int] = {}
        # Only with ``exact``, only for uids handed on with more than one number: the numbers below
        # the highest (in ``seen``) handed on.
        self.below: dict[str, set[int]] = {}
        # Only for the few events a writer lowered: the number last seen below `seen`, so the same
        # lowered object listed again is not a new decrease.
        self.lowered: dict[str, int] = {}
        # For events with a series: the lastObservedTime last handed on or seen, to tell a new
        # occurrence that did not raise the number (old client-go numbering started a series at
        # count 1) from the same object delivered again.
        self.observed: dict[str, object] = {}
        self.dropped: collections.Counter[str] = collections.Counter()
        self._throttled = Throttled(log, THROTTLE_PERIOD)

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
        if self.exact:
            return self._observe_exact(obj, uid, number, received_at)
        series = obj.get("series")
        highest = self.seen.get(uid, 0)
        if number <= highest:
            if number < highest:
                self._lowered(uid, meta, highest, number)
            else:
                if self.lowered:
                    self.lowered.pop(uid, None)
                if type(series) is dict:
                    self._series_unraised(uid, meta, number, series.get("lastObservedTime"))
            return None
        if type(obj) is dict and type(meta) is dict and type(uid) is str:
            # What normalise would check first, checked above: build at once (once per event).
            occ = normalise_checked(obj, meta, uid, self.cluster, received_at, None, True, number)
        else:
            occ = normalise(obj, cluster=self.cluster, received_at=received_at, owned=True, number=number)
        self.seen[uid] = number
        if self.lowered:
            self.lowered.pop(uid, None)
        if type(series) is dict:
            self.observed[uid] = series.get("lastObservedTime")
        elif self.observed:
            self.observed.pop(uid, None)
        return occ

    def _observe_exact(self, obj: Any, uid: str, number: int, received_at: float | None) -> Occurrence | None:
        highest = self.seen.get(uid, 0)
        if number == highest or (number < highest and number in self.below.get(uid, ())):
            return None  # this very occurrence again (dead-lettered twice)
        occ = normalise(obj, cluster=self.cluster, received_at=received_at, owned=True, number=number)
        if number < highest:
            self.below.setdefault(uid, set()).add(number)
        else:
            if highest:
                self.below.setdefault(uid, set()).add(highest)
            self.seen[uid] = number
        return occ

    def _lowered(self, uid: str, meta: Any, highest: int, number: int) -> None:
        if self.lowered.get(uid) == number:
            return  # the same lowered object again (a relist, a write that changed no count)
        self.lowered[uid] = number
        self.dropped["count_decreased"] += 1
        self._throttled.warning(
            "count_decreased",
            "event %s (uid %s): occurrence number %d is below %d, already handed on: its writer lowered "
            "the count; not delivered, nor will be the numbers up to %d (counted in "
            'eventrouter_source_dropped_total{reason="count_decreased"})',
            _name(meta),
            uid,
            number,
            highest,
            highest,
        )

    def _series_unraised(self, uid: str, meta: Any, number: int, observed: object) -> None:
        before = self.observed.get(uid, _NONE)
        if before == observed:
            return  # the same series object again
        self.observed[uid] = observed
        self.dropped["series_not_raised"] += 1
        self._throttled.warning(
            "series_not_raised",
            "event %s (uid %s): series.lastObservedTime moved from %s to %s while the occurrence number "
            "stayed %d: its writer did not raise series.count (old client-go started a series at count 1), "
            "so that occurrence has no number of its own and is not delivered (counted in "
            'eventrouter_source_dropped_total{reason="series_not_raised"})',
            _name(meta),
            uid,
            "no series" if before is _NONE else before,
            observed,
            number,
        )

    def take_dropped(self) -> collections.Counter[str]:
        """What was not delivered since the last call, by reason (for the metrics)."""
        dropped, self.dropped = self.dropped, collections.Counter()
        return dropped

    def deleted(self, obj: Any) -> str | None:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        uid = meta.get("uid") if isinstance(meta, dict) else None
        if isinstance(uid, str):
            self.seen.pop(uid, None)
            self.lowered.pop(uid, None)
            self.observed.pop(uid, None)
            self.below.pop(uid, None)
            return uid
        return None

    def prune(self, live: set[str]) -> int:
        gone = [uid for uid in self.seen if uid not in live]
        for uid in gone:
            del self.seen[uid]
        for side in (self.lowered, self.observed, self.below):
            for uid in [uid for uid in side if uid not in live]:
                del side[uid]
        return len(gone)

    def __len__(self) -> int:
        return len(self.seen)


_NONE = object()


def _name(meta: Any) -> str:
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"
