"""A relist's new occurrences, handed on oldest-first.

The API server lists Events in key order (namespace/name), so a relist after downtime hands the sinks
up to ``--event-ttl`` worth of events in random time order. Loki refuses entries more than an hour
behind the newest entry of their stream: sent in key order, a relist spanning more than an hour is
largely refused. Sorted by event time it is not, and every other sink sees events in the order they
happened.

A relist can hold the whole cluster's events, so beyond a small number they wait in an anonymous
temporary file (their raw JSON, as the spool keeps them, written 256 KiB at a time); memory holds
~60 bytes per occurrence for the sort (all of it, from the first write that fails, if the temporary
directory cannot be written or fills up). They are rebuilt from the raw JSON exactly as the source
built them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from array import array
from collections.abc import Generator
from typing import IO

import orjson

from eventrouter.record import Occurrence, normalise

__all__ = ["RelistBudget", "RelistOrder"]

log = logging.getLogger(__name__)

_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)

WRITE_CHUNK = 256 * 1024
"""Raw JSON gathered before one write to the temporary file: a write per occurrence was a system
call per relisted event, ~10% of the router's busy samples in a start-up relist of 50,000."""


HELD_BYTES = 8 * 1024 * 1024
"""Raw JSON of the relisted occurrences held in memory at once, and of a chunk handed on: an Event's
message has no bound (etcd's ~1.5 MiB an object), and 500 rows of 1 MB are half a gigabyte."""


class RelistBudget:
    """How many relisted occurrences the orders sharing it hold in memory at once, in all (the rest
    wait in their temporary files), and how many bytes of raw JSON. One per router: with an order per
    namespace and a bound per order, 120 namespaces relisting at start-up held 60,000 occurrences
    (~250 MiB), not 500."""

    def __init__(self, limit: int = 500, max_bytes: int = HELD_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.held = 0
        self.held_bytes = 0

    @property
    def full(self) -> bool:
        return self.held >= self.limit or self.held_bytes >= self.max_bytes


class RelistOrder:
    def __init__(
        self,
        *,
        cluster: str,
        directory: str | None = None,
        in_memory: int = 500,
        budget: RelistBudget | None = None,
    ) -> None:
        self.cluster = cluster
        self.directory = directory
        self.budget = budget if budget is not None else RelistBudget(in_memory)
        # Parallel columns, one row per occurrence in list order: ~60 bytes a row (a tuple per row
        # would be ~300). A row's occurrence is in memory (offset -1 - its index in _held) or its raw
        # JSON is in the file at (offset, length).
        self._times = array("q")
        self._received = array("d")
        self._offsets = array("q")
        self._lengths = array("q")
        self._uids: list[str] = []
        self._held: list[Occurrence | None] = []  # None: a discarded row's
        self._held_count = 0  # occurrences of _held counted in the budget
        self._held_bytes = 0  # and their raw JSON
        # Rows of several lists in one order (namespaces relisting together): each row's member, set
        # once a second member adds; a member whose list failed is discarded (its rows never drained).
        self._members: array[int] | None = None
        self._discarded: set[int] = set()
        self._live = 0  # rows not discarded
        self._file: IO[bytes] | None = None
        self._file_failed = False
        self._end = 0  # where the next row's raw JSON goes in the file (written or pending)
        self._pending: list[tuple[int, bytes]] = []  # (row, raw JSON) not yet written
        self._pending_bytes = 0
        self._order = array("q")  # rows sorted by time, set by drain()
        self._handed = 0  # rows of _order already yielded by drain()
        # Rows not handed on, by member, for the rows and hand-on of _by_member_at: every member of a
        # failed round (or each one a stop discards) asks for its own; a scan of all rows each took
        # rows x members (5 s at 200,000 x 400, the event loop stalled).
        self._by_member: dict[int, array[int]] = {}
        self._by_member_at: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        """Rows added and not discarded."""
        return self._live

    @property
    def left(self) -> int:
        """Rows of the sorted order that ``drain`` has not yielded yet."""
        return len(self._order) - self._handed

    def tag_members(self) -> None:
        """From now on rows belong to the member given to ``add``; the rows so far to member 0."""
        if self._members is None:
            self._members = array("I", [0]) * len(self._uids)

    def add(self, occ: Occurrence, member: int = 0) -> None:
        row = len(self._uids)
        self._live += 1
        if self._members is not None:
            self._members.append(member)
        try:
            self._times.append(occ.time_ns)
        except OverflowError:
            # Beyond a signed 64-bit count of nanoseconds (before 1678 or after 2262: a year-9999
            # eventTime): first or last. Raising here would fail every relist of the cluster.
            self._times.append(_I64_MAX if occ.time_ns > 0 else _I64_MIN)
        self._received.append(occ.received_at)
        self._uids.append(occ.uid)
        if self.budget.full and not self._file_failed:
            # Only the raw JSON waits for the write (the occurrence is rebuilt from it when drained).
            raw = occ.raw_json
            self._offsets.append(self._end)
            self._lengths.append(len(raw))
            self._end += len(raw)
            self._pending.append((row, raw))
            self._pending_bytes += len(raw)
            if self._pending_bytes >= WRITE_CHUNK:
                self._write_pending()
            return
        self._offsets.append(0)
        self._lengths.append(0)
        self._hold(row, occ)

    def _hold(self, row: int, occ: Occurrence) -> None:
        """Keep ``row``'s occurrence in memory (a new row, or one whose write failed)."""
        self._offsets[row] = -1 - len(self._held)
        self._lengths[row] = 0
        self._held.append(occ)
        self._held_count += 1
        self.budget.held += 1
        self._held_bytes += len(occ.raw_json)
        self.budget.held_bytes += len(occ.raw_json)

    def _write_pending(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return
        try:
            if self._file is None:
                # Deleted once closed (or when the process dies): nothing to clean up after a crash.
                # Unbuffered: a full disk shows at this chunk's write, whose rows can still fall back.
                self._file = tempfile.TemporaryFile(  # noqa: SIM115 - lives across add/drain; close() ends it
                    prefix="eventrouter-relist-", dir=self.directory, buffering=0
                )
            fd, offset = self._file.fileno(), self._offsets[pending[0][0]]
            data = memoryview(b"".join(raw for _, raw in pending))
            while data:
                # A short write (the disk filled up midway) is retried for the rest, which then
                # fails with the reason (ENOSPC, EFBIG) for the log.
                written = os.pwrite(fd, data, offset)
                if not written:
                    raise OSError("the temporary file takes no more data")
                data, offset = data[written:], offset + written
        except OSError as exc:
            # A full or read-only temp dir must not stop the source: keep the rest in memory.
            self._file_failed = True
            # Not gettempdir() here: with no usable temp dir at all (a read-only root without a
            # writable /tmp) it raises again, and the relist would fail instead of falling back.
            log.warning(
                "relist: cannot use a temporary file in %s (%s); sorting the rest in memory",
                self.directory or tempfile.tempdir or "the temp dir",
                exc,
            )
            for row, raw in pending:
                self._hold(row, self._rebuild(row, raw))

    def _rebuild(self, row: int, raw: bytes) -> Occurrence:
        """The occurrence again from its raw JSON, exactly as the source built it."""
        occ = normalise(
            orjson.loads(raw), cluster=self.cluster, received_at=self._received[row], raw_json=raw
        )
        uid = self._uids[row]
        if occ.uid == uid:
            # The tracker's string: the checkpoints then share it, not one copy more per event.
            occ.uid = uid
        return occ

    def _rows_not_handed(self, member: int | None) -> list[int] | range | array[int]:
        rows: list[int] | range | array[int] = (
            self._order[self._handed :] if self._order else range(len(self._uids))
        )
        members = self._members
        if member is not None and members is not None:
            return self._rows_of(member, rows, members)
        elif self._discarded and members is not None:
            rows = [row for row in rows if members[row] not in self._discarded]
        return rows

    def _rows_of(self, member: int, rows: list[int] | range | array[int], members: array[int]) -> array[int]:
        at = (len(self._uids), len(self._order), self._handed)
        if self._by_member_at != at:
            groups: dict[int, array[int]] = {}  # 8 bytes a row
            for row in rows:
                m = members[row]
                group = groups.get(m)
                if group is None:
                    groups[m] = array("q", (row,))
                else:
                    group.append(row)
            self._by_member, self._by_member_at = groups, at
        return self._by_member.get(member, array("q"))

    def not_handed_on(self, member: int | None = None) -> list[str]:
        """Event uids added (by ``member``) but not yet yielded by ``drain``: a relist that fails must
        forget them in the tracker, or the next relist would not see them as new."""
        return [self._uids[row] for row in self._rows_not_handed(member)]

    def discard(self, member: int) -> list[str]:
        """``member``'s rows not handed on yet are never handed on (its list failed, or its watcher
        stopped): their occurrences leave memory, and their uids are returned, to be forgotten."""
        if member in self._discarded:
            return []
        self.tag_members()
        rows = self._rows_not_handed(member)
        self._discarded.add(member)
        held, offsets, freed, freed_bytes = self._held, self._offsets, 0, 0
        for row in rows:
            offset = offsets[row]
            occ = held[-1 - offset] if offset < 0 else None
            if occ is not None:
                held[-1 - offset] = None
                freed += 1
                freed_bytes += len(occ.raw_json)
        self._held_count -= freed
        self.budget.held -= freed
        self._held_bytes -= freed_bytes
        self.budget.held_bytes -= freed_bytes
        self._live -= len(rows)
        # Rows still in the file or the pending writes are skipped when drained (or in pending raw
        # JSON, written with the rest: dropping them from a chunk would shift the offsets).
        return [self._uids[row] for row in rows]

    def drain(self, page: int) -> Generator[list[Occurrence], None, None]:
        """Everything added (and not discarded), oldest first (event time, then list order: the sort
        is stable), ``page`` at a time, or fewer once a chunk holds the budget's ``max_bytes`` of raw
        JSON. Sorted at once, so ``left`` counts the rows to come."""
        # An array, not the sorted list: that list's 50,000 row ints would live, interleaved with the
        # drain's own objects, until the last row is handed on, raising pymalloc's arena high-water
        # and keeping arenas that other survivors then pin; sorted in one step (nothing else runs
        # meanwhile), its ints are freed together, the pools they took are free again at once.
        self._write_pending()
        rows: range | list[int] = range(len(self._uids))
        if self._discarded and self._members is not None:
            members, gone = self._members, self._discarded
            rows = [row for row in rows if members[row] not in gone]
        self._order = array("q", sorted(rows, key=self._times.__getitem__))
        self._handed = 0
        return self._pages(page)

    def _pages(self, page: int) -> Generator[list[Occurrence], None, None]:
        order = self._order
        fd = self._file.fileno() if self._file is not None else -1
        held, offsets, lengths, rebuild = self._held, self._offsets, self._lengths, self._rebuild
        members, gone = self._members, self._discarded
        max_bytes = self.budget.max_bytes
        try:
            pos, end = 0, len(order)
            while pos < end:
                chunk: list[Occurrence] = []
                size = 0
                while pos < end and len(chunk) < page and size < max_bytes:
                    row = order[pos]
                    pos += 1
                    if gone and members is not None and members[row] in gone:
                        continue  # its member stopped while this order was drained
                    offset = offsets[row]
                    if offset < 0:
                        occ = held[-1 - offset]
                        assert occ is not None  # only a discarded row's is
                    else:
                        # One system call per row (a seek and a read were two).
                        raw = os.pread(fd, lengths[row], offset)
                        if len(raw) != lengths[row]:
                            raise OSError(
                                f"relist: temporary file shorter than written ({offset} + {lengths[row]})"
                            )
                        occ = rebuild(row, raw)
                    chunk.append(occ)
                    size += len(occ.raw_json)
                self._handed = pos
                yield chunk
        finally:
            if self._handed >= len(order):
                self.close()

    def close(self) -> None:
        self.budget.held -= self._held_count
        self.budget.held_bytes -= self._held_bytes
        self._held_count = self._held_bytes = 0
        self._members = None
        self._discarded = set()
        self._live = 0
        self._times = array("q")
        self._received = array("d")
        self._offsets = array("q")
        self._lengths = array("q")
        self._uids = []
        self._held = []
        self._order = array("q")
        self._handed = 0
        self._by_member, self._by_member_at = {}, None
        self._end = 0
        self._pending = []
        self._pending_bytes = 0
        if self._file is not None:
            self._file.close()
            self._file = None
