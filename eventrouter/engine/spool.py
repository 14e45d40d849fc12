"""Bounded on-disk FIFO per sink, for occurrences that do not fit in the memory queue.

Segments of JSON lines (``<n>.seg``) plus a ``cursor`` file holding the durable read position.
``pop`` moves the read position in memory only; ``commit`` makes it durable once the popped
occurrences have finished. After a crash the uncommitted part is read again and the pipeline skips
what the checkpoint says was accepted. When the byte bound is reached, the oldest segment is
dropped and each occurrence in it is reported to the caller to be counted.

A record written at shutdown may be *owed* (a third element, ``1``): it is delivered even though the
checkpoint is past it. A stop whose drain deadline passed while X/4 of an event waited for a retry
and X/5 had been accepted records X/5 in the checkpoint (so that the relist after the restart does not
send X/5 again) and keeps X/4 in the spool, owed. A parked X/4 is marked owed where it lies
(``owe_parked``): one record per occurrence, whatever becomes of the event's checkpoint entry.

At open the spool notes the (uid, number) of its unread records (``holds``): the relist after a
restart offers each of them again, and a second record of each, behind the backlog, filled the bound
after a few restarts, which then dropped the oldest records, the originals.

Items a sink refuses for a key of its own (``defer``: one Loki stream, one Elasticsearch index) beyond
the pipeline's share of memory wait in a second FIFO, ``parked/`` (``park``, ``unpark``), read back
as the pipeline has room for them: a key refused for long must not crowd the memory queue, nor the
main FIFO, which every other key's backlog goes through. Both share the byte bound.
"""

from __future__ import annotations

import bisect
import builtins
import collections
import contextlib
import hashlib
import itertools
import logging
import os
import re
import sys
import time
import weakref
from array import array
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from eventrouter.appendfile import append_all
from eventrouter.record import MalformedEvent, Occurrence, normalise, occurrence_number

__all__ = ["Spool", "Unparked"]

RETRY_SECONDS = 5.0
"""After a failed write (a full disk) the spool takes nothing for this long: the pipeline keeps
occurrences in memory meanwhile, instead of trying the disk again for each one. After a failed read
``pop`` returns nothing for as long (one try and one log line per period, not one per offer)."""

QUARANTINE_SECONDS = 600.0
"""A segment that cannot be read for this long (an I/O error on its blocks) is set aside in
``unreadable/`` and its occurrences counted as given up, so that it does not hold back everything
spooled after it for good; the file stays there for whoever can recover it."""

log = logging.getLogger(__name__)

_SEGMENT_NAME = re.compile(r"-?[0-9]+")


def _owed_once(owed: set[tuple[str, int]] | None, occ: Occurrence) -> bool:
    """True for the first record of a key in ``owed``, which is taken out of the set: a second copy
    of the same occurrence is a copy, skipped by the checkpoint."""
    if not owed:
        return False
    key = (occ.uid, occ.number)
    if key in owed:
        owed.remove(key)
        return True
    return False


def _record(rec: Any) -> list[Any]:
    """``rec`` (a spooled line, parsed) as ``encode`` (or ``_Parked.add``) writes it: ``[event,
    received_at, ...]``. Other JSON (a line damaged into ``{}``, ``[]``, a string ``received_at``) is
    ``MalformedEvent``: skipped and counted as any unreadable line. Before, ``{}`` raised ``KeyError``
    out of ``pop`` and ended the pipeline, and a string ``received_at`` failed only after the sink
    had taken the batch (the task ended, and the next start sent it again: a crash loop)."""
    if type(rec) is not list or len(rec) < 2:
        raise MalformedEvent(
            f"spooled record is {type(rec).__name__} {str(rec)[:40]}, not [event, received_at]"
        )
    if type(rec[1]) not in (int, float):
        raise MalformedEvent(f"spooled record's received_at is {type(rec[1]).__name__}, not a number")
    if not _RECEIVED_MIN <= rec[1] <= _RECEIVED_MAX:  # NaN too: no time of the years 1-9999
        raise MalformedEvent(f"spooled record's received_at {rec[1]!r} is no time")
    return rec


_RECEIVED_MIN = -62_135_596_800.0
"""0001-01-01T00:00:00Z as Unix seconds: a ``received_at`` out of the years 1-9999 (``1e300``) made
``normalise`` raise OverflowError out of ``pop`` once the event had no time of its own."""
_RECEIVED_MAX = 253_402_300_799.0
"""9999-12-31T23:59:59Z as Unix seconds."""


_UNREADABLE = (
    orjson.JSONDecodeError,
    OverflowError,
    MalformedEvent,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
)
"""What reading or rebuilding a damaged record may raise (``occurrence_number`` of a list: an
``AttributeError``): the record is skipped and counted (``unreadable``), or has no key. A line
``"garbage"`` in the oldest segment raised out of ``append`` when the bound dropped it."""


def _line_key(line: bytes) -> tuple[str, int] | None:
    """A record's (uid, number); None if it cannot be read."""
    try:
        raw = orjson.loads(line)[0]
        return raw["metadata"]["uid"], occurrence_number(raw)
    except _UNREADABLE:
        return None


def _add_uids(uids: set[str], lines: Iterable[bytes]) -> None:
    for line in lines:
        with contextlib.suppress(*_UNREADABLE):  # unreadable: no key, counted when it is read
            uid = orjson.loads(line)[0]["metadata"]["uid"]
            if type(uid) is str and uid:
                uids.add(uid)


def _digest(uid: str, number: int) -> int:
    """96 bits of the occurrence's key. A relist of 10^6 against a spool of 10^6 records finds a
    digest alike by chance (a copy kept out that was not one: lost) with a chance of ~10^-17; with
    64 bits it would be ~5 * 10^-8 per such restart."""
    return int.from_bytes(hashlib.blake2b(f"{uid}/{number}".encode(), digest_size=12).digest(), "little")


class Unparked(NamedTuple):
    """A record read back from the parked FIFO."""

    occ: Occurrence
    tries: int  # failed attempts so far
    not_before: float  # wall-clock time its backoff ends (0: none)


class _HeldAtOpen:
    """The keys of the records unread at open, 16 bytes each: a sorted array of the digests' high 64
    bits, beside their low 32 bits and the ordinal of the segment that holds the record (0: the aside
    file). A set of (uid, number) tuples cost ~200 bytes a key. ``alive[ordinal]`` goes to 0 when
    the unread records of that segment are dropped (the bound), set aside as unreadable, or gone:
    then a relisted occurrence of it is the only copy left and must be spooled."""

    __slots__ = ("alive", "hi", "lo", "ordinal")

    def __init__(self, keys: list[int], segments: int) -> None:
        keys.sort()  # each key: digest << 32 | ordinal
        self.hi = array("Q", (k >> 64 for k in keys))
        self.lo = array("I", ((k >> 32) & 0xFFFFFFFF for k in keys))
        self.ordinal = array("I", (k & 0xFFFFFFFF for k in keys))
        self.alive = bytearray(b"\x01") * (segments + 1)

    def __len__(self) -> int:
        return len(self.hi)

    def holds(self, uid: str, number: int) -> bool:
        digest = _digest(uid, number)
        hi, lo = digest >> 32, digest & 0xFFFFFFFF
        i = bisect.bisect_left(self.hi, hi)
        while i < len(self.hi) and self.hi[i] == hi:
            if self.lo[i] == lo and self.alive[self.ordinal[i]]:
                return True
            i += 1
        return False


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    records: int = 0
    size: int = 0
    read_records: int = 0  # durable + in-memory read position within this segment
    read_offset: int = 0
    sealed: bool = False  # its unread tail was dropped: nothing more is written to it
    ordinal: int = 0  # in ``_HeldAtOpen`` (from 1): it held unread records at open


class Spool:
    """One sink's spool in ``directory``. Built, it has read every unread record (``_open``: a full
    256 MiB spool is ~2.4 CPU-seconds, ~30 s on a 5% share of a CPU), so the router builds its
    spools in a worker thread, off the event loop that answers /healthz and renews the lease
    (``Router._open_data_dir``): the constructor must stay file work only, making no event-loop
    object (no task, future, lock or loop call). Everything else runs on the loop."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int = 4 * 1024 * 1024,
        cluster: str = "",
        decode: Callable[[bytes], Occurrence] | None = None,
        quarantine_after: float = QUARANTINE_SECONDS,
    ) -> None:
        self.directory = directory
        self.quarantine_after = quarantine_after
        self._failing: _Segment | None = None  # the head segment whose reads fail, since when
        self._failing_since = 0.0
        self.max_bytes = max_bytes
        self.segment_bytes = max(1024, min(segment_bytes, max_bytes // 4 or 1024))
        self.cluster = cluster
        self._decode = decode or self._default_decode
        directory.mkdir(parents=True, exist_ok=True)
        self._segments: collections.deque[_Segment] = collections.deque()
        self._count = 0
        self._bytes = 0
        # The tail segment stays open for appends: opening it per occurrence was ~40% of the router's
        # CPU while a slow sink spilled a relist. Unbuffered, so each append is one write(2) and in
        # the page cache when it returns (a SIGKILL keeps it), exactly as with open-write-close.
        self._fd = -1
        self._fd_seg: _Segment | None = None
        # Closes the fd if the spool is dropped unclosed (no ResourceWarning: a raw descriptor).
        self._fd_closer: weakref.finalize[[int], Spool] | None = None
        self._retry_at = 0.0
        self._read_retry_at = 0.0
        self.unreadable = 0
        """Records skipped by ``pop`` because they could not be read back; the pipeline counts them."""
        self.read_errors = 0
        # Keys dropped over the bound by an append whose own write then failed (it raised, so it
        # could not return them): for the caller to count and take out.
        self.lost_on_error: list[str] = []
        """Reads by ``pop`` that failed (the records wait for the next pop) and read positions that
        could not be written; the pipeline counts them."""
        self.decode_dropped = False
        """Set by a pipeline whose sink hears of what the engine gives up (``Sink.given_up``): the
        records dropped over the bound are then rebuilt into ``dropped_occurrences`` for it. Only
        then: rebuilding one (~8 µs) costs more than twice reading its key, on each spill into a
        full spool."""
        self.dropped_occurrences: list[Occurrence] = []
        """Records dropped over the bound (with ``decode_dropped``), for the caller to take out."""
        self._cursor_failures = 0  # in a row
        # Segments a stop's scan could not read (``_scan_read``): number → its unread records then.
        self._scan_failed: dict[int, int] = {}
        self.owed: set[tuple[str, int]] = set()
        """(uid, number) of owed records read by ``pop`` since the pipeline last took them."""
        # Records popped and then set aside by the pipeline (an item a sink refuses for a cause of its
        # own may wait for hours): kept in a file of their own so that the read position can pass
        # them. Read back first after a crash. `_aside_keys`: what the file holds now.
        self._aside_path = directory / "aside"
        self._aside_keys: frozenset[tuple[str, int]] = frozenset()
        self._aside_lines: collections.deque[bytes] = collections.deque()
        self._aside_failed = False
        self.held_at_open: _HeldAtOpen | None = None
        """See ``holds``; None once nothing unread at open can still be offered as new (freed)."""
        self._parked: _Parked | None = None
        self._open_tail: tuple[int, int] | None = None  # the FIFO's end at open (``behind_open``)
        # The read position on disk (segment, records read), as last read or written: a stop that cannot
        # keep what was read since goes back to it (``_keep_in_place``).
        self._durable = (0, 0)
        # Once gone back, the keys of what is read again after the restart (the aside file's included),
        # each event's highest of them, and what a stop appended (``extend``).
        self._kept: set[tuple[str, int]] | None = None
        self._kept_newest: dict[str, int] = {}
        self._appended: dict[tuple[str, int], bool] = {}  # appended by a stop: marked owed or not
        # Before any failed write: the durable read position, and each event's highest number among
        # what ``_keep_in_place`` would leave to be read again from it (``_newest_read_again``).
        self._read_again: tuple[tuple[int, int], dict[str, int]] | None = None
        self._uncounted = False  # gone back, and no caller told of the failed write (``_say_failed``)
        self.kept_in_place = 0
        """Of the occurrences a failed ``prepend`` was given, those left in their segment or the aside
        file (read again after the restart): the caller counts only the rest as not kept."""
        self.owed_unmarked: set[str] = set()
        """Events of which an occurrence owed at the stop stayed in place, not marked owed: a newer
        one accepted must not be recorded past it (the relist sends it again: no loss)."""
        # The highest segment number known (on disk at open, made since, in a cursor read or
        # written): a new segment is numbered above it, whatever the clock says (``_new_segment``).
        self._highest = 0
        self._open()
        if not isinstance(self, _Parked) and (directory / "parked").is_dir():
            self._parked = _Parked(self)
            if self._parked.held_at_open is not None and self.held_at_open is None:
                self.held_at_open = _HeldAtOpen([], 0)  # the gate of ``holds``: parked records are held

    # ---- persistence format -------------------------------------------------------------------

    @staticmethod
    def encode(occ: Occurrence, owed: bool = False) -> bytes:
        # The raw object is enough: the record is rebuilt from it exactly as the source built it.
        tail = b",1]\n" if owed else b"]\n"
        return b"[" + occ.raw_json + b"," + orjson.dumps(occ.received_at) + tail

    def _default_decode(self, line: bytes) -> Occurrence:
        rec = _record(orjson.loads(line))
        occ = normalise(rec[0], cluster=self.cluster, received_at=rec[1])
        if len(rec) > 2 and rec[2]:
            self.owed.add((occ.uid, occ.number))
        return occ

    def _open(self) -> None:
        cursor_seg, cursor_records = 0, 0
        cursor = self.directory / "cursor"
        if cursor.exists():
            with contextlib.suppress(ValueError):
                a, b = cursor.read_text().split()
                cursor_seg, cursor_records = int(a), int(b)
        self._highest = cursor_seg
        self._durable = (cursor_seg, cursor_records)
        for stale in self.directory.glob("*.tmp"):  # a prepend interrupted before its swap
            with contextlib.suppress(OSError):
                stale.unlink()
        self._load_aside()
        keys: list[int] = []
        for line in self._aside_lines:
            self._note_key(keys, line, 0)
        ordinals = 0
        for number, path in self._segment_files():
            self._highest = max(self._highest, number)
            try:
                data = path.read_bytes()
            except OSError as exc:  # not a reason to keep the router from starting: set aside
                self.read_errors += 1
                where = self._set_aside(path)
                log.error(
                    "spool %s: cannot read %s at start (%s): an unknown number of spooled occurrences "
                    "given up, the segment %s",
                    self.directory,
                    path.name,
                    exc.strerror or exc,
                    where,
                )
                continue
            if data and not data.endswith(b"\n"):
                # Torn last write (crash): keep the complete lines only.
                data = data[: data.rfind(b"\n") + 1]
                with open(path, "r+b") as fh:
                    fh.truncate(len(data))
            seg = _Segment(number, path, records=data.count(b"\n"), size=len(data))
            if number < cursor_seg:
                path.unlink()
                continue
            if number == cursor_seg and cursor_records:
                offset = 0
                for _ in range(min(cursor_records, seg.records)):
                    offset = data.index(b"\n", offset) + 1
                seg.read_records = min(cursor_records, seg.records)
                seg.read_offset = offset
            if seg.read_records < seg.records:
                ordinals += 1
                seg.ordinal = ordinals
                view, start = memoryview(data), seg.read_offset
                while (end := data.find(b"\n", start)) >= 0:  # no copy of the lines (4 MiB a segment)
                    self._note_key(keys, view[start:end], ordinals)
                    start = end + 1
                view.release()
            del data
            self._segments.append(seg)
            self._count += seg.records - seg.read_records
            self._bytes += seg.size
        if keys:
            self.held_at_open = _HeldAtOpen(keys, ordinals)
            keys.clear()  # ~52 bytes a key while it is built
        if self._segments:
            last = self._segments[-1]
            self._open_tail = (last.number, last.records)
        if len(self):
            log.info("spool %s: %d occurrences waiting from before the restart", self.directory, len(self))

    def _segment_files(self) -> list[tuple[int, Path]]:
        """The segments on disk, in order. A ``.seg`` file whose name is not a number was not written
        by the spool (a copy made by hand, ``1700000000000 (1).seg``): set aside in ``unreadable/``,
        counted and named. Before, ``int()`` of its name raised and the router could not start."""
        found: list[tuple[int, Path]] = []
        for path in self.directory.glob("*.seg"):
            if _SEGMENT_NAME.fullmatch(path.stem):
                found.append((int(path.stem), path))
                continue
            self.read_errors += 1
            log.error(
                "spool %s: %s is not a spool segment (its name is not a number): not read, the file %s",
                self.directory,
                path.name,
                self._set_aside(path),
            )
        found.sort()
        return found

    def _note_key(self, keys: list[int], line: bytes | memoryview, ordinal: int) -> None:
        """Adds the key of one record (an unreadable one has none: its relisted copy is spooled)."""
        try:
            raw = orjson.loads(line)[0]
            uid = raw["metadata"]["uid"]
            if type(uid) is str and uid:
                number = occurrence_number(raw)
                keys.append(_digest(uid, number) << 32 | ordinal)
                if ordinal:
                    self._noted(uid, number)
        except _UNREADABLE:
            pass

    def _noted(self, uid: str, number: int) -> None:
        """A record unread at open (``_Parked`` keeps its floors)."""

    def unread_uids(self, deadline: float) -> set[str] | None:
        """The uids of the main FIFO's records not read yet, and of the aside file's (the parked
        FIFO's: ``parked_floor``): at a stop the marks of deleted events are kept for these only
        (``Pipeline.keep_gone``). A scan of the unread part, one segment at a time (all its lines at
        once took a 250 MiB spool's worth of memory at the stop, 65 → 319 MiB, past the chart's
        limit), each started only before ``deadline`` (``time.monotonic()``): None when some were
        not read by then, or one could not be read. Unbounded, a full spool took ~1 CPU-second on the event loop at a stop
        with little of the grace period left, before the checkpoint was written."""
        uids: set[str] = set()
        _add_uids(uids, self._aside_lines)  # in memory
        for seg in [seg for seg in self._segments if seg.read_records < seg.records]:
            if time.monotonic() >= deadline:
                return None
            data = self._scan_read(seg)
            if data is None:
                # Not known either: every mark is kept (an empty answer dropped the marks of the
                # events whose copies the file holds, and the restart sent those copies again).
                return None
            _add_uids(uids, data[seg.read_offset :].splitlines())
        return uids

    def unread_keys(self, deadline: float) -> Iterator[tuple[str, int]]:
        """For a stop's report: the (uid, number) of each record not read yet, the aside file's and
        the parked FIFO's included (``("", 0)``: not readable). A segment (~4 MiB, ~15 ms) is started
        only before ``deadline`` (``time.monotonic()``), and one that cannot be read is passed: those
        not given are ``len + parked_count`` less the keys given."""
        chunks = itertools.chain(
            [list(self._aside_lines)],
            (self._unread_lines(seg) for seg in self._segments if seg.read_records < seg.records),
        )
        for lines in chunks:
            for line in lines:
                try:
                    raw = orjson.loads(line)[0]
                    uid = raw["metadata"]["uid"]
                    key = (uid, occurrence_number(raw)) if type(uid) is str else ("", 0)
                except _UNREADABLE:
                    key = ("", 0)
                yield key
            if time.monotonic() >= deadline:
                return
        parked = self._parked
        if parked is not None:
            yield from parked.unread_keys(deadline)
            self.read_errors += parked.read_errors  # counted as the main FIFO's, as ``_took_from`` does
            parked.read_errors = 0

    def scan_failed(self) -> tuple[int, int]:
        """(segments, their unread records) a stop's reads could not read, the parked FIFO's included:
        a stop's report tells them from those its time bound left unread."""
        segments, records = len(self._scan_failed), sum(self._scan_failed.values())
        if self._parked is not None:
            more, held = self._parked.scan_failed()
            segments, records = segments + more, records + held
        return segments, records

    def _unread_lines(self, seg: _Segment) -> list[bytes]:
        data = self._scan_read(seg)
        return [] if data is None else data[seg.read_offset :].splitlines()

    def _scan_read(self, seg: _Segment) -> bytes | None:
        """A stop's read of ``seg`` (``unread_uids``, ``unread_keys``); None when it cannot be read:
        counted in ``read_errors`` (eventrouter_data_dir_errors_total{file="spool"}) and named, once a
        segment (the stop's two scans read the same files). No pop follows the stop to count it."""
        try:
            return seg.path.read_bytes()
        except OSError as exc:
            if seg.number not in self._scan_failed:
                self._scan_failed[seg.number] = seg.records - seg.read_records
                self.read_errors += 1
                log.error(
                    "spool %s: cannot read %s at the stop (%s): its %d unread occurrences stay in the "
                    "spool, not checked by the stop",
                    self.directory,
                    seg.path.name,
                    exc.strerror or exc,
                    seg.records - seg.read_records,
                )
            return None

    def holds(self, occ: Occurrence) -> bool:
        """True when a record of ``occ`` was unread at open and is still in the spool, or popped from
        it and in the pipeline's hands: the relist after a restart offers it again, and that copy
        need not be spooled. Within a run the source never offers an occurrence twice, so only what
        was here at open can be offered again; records dropped or set aside since are not held."""
        held = self.held_at_open
        if held is None:
            return False
        if held.holds(occ.uid, occ.number):
            return True
        parked = self._parked.held_at_open if self._parked is not None else None
        return parked is not None and parked.holds(occ.uid, occ.number)

    def release_held_at_open(self) -> None:
        """Free ``holds``'s keys: the first list after the start is complete, so nothing that was
        here at open can be offered as new any more."""
        self.held_at_open = None
        if self._parked is not None:
            self._parked.held_at_open = None

    def _lost_at_open(self, seg: _Segment) -> None:
        """``seg``'s unread records are no longer in the spool (dropped, set aside, gone)."""
        if self.held_at_open is not None and seg.ordinal:
            self.held_at_open.alive[seg.ordinal] = 0
        seg.ordinal = 0

    def _check_read_at_open(self) -> None:
        """Once every record unread at open has been popped, the keys are freed: what the pipeline
        holds of them is delivered, kept at a stop, or counted; a copy offered after that is spooled
        and skipped by the checkpoint once the first is accepted (a batch in flight, at most), or by
        the pipeline's ``_done`` while the checkpoint waits below an older occurrence set aside."""
        if self.held_at_open is None or self._aside_lines:
            return
        if self._parked is not None and self._parked.held_at_open is not None:
            return  # the gate of ``holds`` for the parked records too
        if not any(seg.ordinal and seg.read_records < seg.records for seg in self._segments):
            self.held_at_open = None

    def _load_aside(self) -> None:
        try:
            data = self._aside_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.read_errors += 1
            log.error(
                "spool %s: cannot read %s (%s): the occurrences set aside there are given up",
                self.directory,
                self._aside_path.name,
                exc,
            )
            return
        self._aside_lines.extend(line + b"\n" for line in data.splitlines() if line)
        # Unknown keys until read: the first ``keep_aside`` rewrites the file whatever it is given.
        self._aside_keys = frozenset({("", -1)}) if self._aside_lines else frozenset()

    def __len__(self) -> int:
        return self._count + len(self._aside_lines)

    @property
    def bytes(self) -> int:
        """On disk, the parked records included (they share the bound)."""
        return self._bytes + (self._parked._bytes if self._parked is not None else 0)

    # ---- writing ------------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """False for a while after a write failed."""
        return not self._retry_at or time.monotonic() >= self._retry_at

    def append(self, occ: Occurrence, owed: bool = False) -> list[str]:
        """Append one occurrence; returns the keys of occurrences dropped to stay within the bound.
        On a write error (``OSError``) nothing of it stays in the file and ``writable`` turns False."""
        parked = self._parked
        if parked is None or not parked._bytes:
            return self._append_line(self.encode(occ, owed), ())
        try:
            return self._append_line(self.encode(occ, owed), (parked,), self._bytes_with(parked))
        finally:
            self._took_from(parked)

    def _bytes_with(self, other: Spool) -> Callable[[], int]:
        return lambda: self._bytes + other._bytes

    def _append_line(
        self,
        line: builtins.bytes,
        others: tuple[Spool, ...],
        total: Callable[[], int] | None = None,
        bound: int = 0,
    ) -> list[str]:
        """Append one encoded record. Over the bound (``total()`` against ``bound or max_bytes``, with
        the FIFO sharing it), this FIFO's oldest unread records are dropped first, then the other's."""
        dropped: list[str] = []
        size = len(line)
        limit = bound or self.max_bytes
        while self._segments and (
            self._bytes + size > self.max_bytes or (total is not None and total() + size > limit)
        ):
            keys = self._drop_oldest()
            if keys is None:
                break  # only records in flight are left: they go at the next commit
            dropped.extend(keys)
        for other in others:
            while total is not None and total() + size > limit:
                keys = other._drop_oldest()
                if keys is None:
                    break
                dropped.extend(keys)
        seg = self._segments[-1] if self._segments else None
        if seg is None or seg.sealed or (seg.size + len(line) > self.segment_bytes and seg.size):
            seg = self._new_segment()
        try:
            if self._fd_seg is not seg:
                self._open_writer(seg)
            append_all(self._fd, line, seg.size)
        except OSError:
            self._close_writer()
            self._retry_at = time.monotonic() + RETRY_SECONDS
            self.lost_on_error.extend(dropped)  # gone from the disk all the same: the caller counts them
            raise
        self._retry_at = 0.0
        seg.records += 1
        seg.size += len(line)
        self._count += 1
        self._bytes += len(line)
        return dropped

    def _new_segment(self) -> _Segment:
        """A segment after every other, numbered by the clock (ms) when there is none. Never at or
        below a number known (``_highest``): a clock stepped back numbered it below the durable
        cursor, left on an older segment when its last write failed, and the next open deleted it
        unread (at the cursor's number, its first records were taken as read)."""
        last = self._segments[-1].number if self._segments else int(time.time() * 1000) - 1
        number = self._highest = max(last, self._highest) + 1
        seg = _Segment(number, self.directory / f"{number}.seg")
        self._segments.append(seg)
        return seg

    def _open_writer(self, seg: _Segment) -> None:
        self._close_writer()
        fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fd = fd
        self._fd_seg = seg
        self._fd_closer = weakref.finalize(self, os.close, fd)
        if os.fstat(fd).st_size > seg.size:
            os.ftruncate(fd, seg.size)  # the torn tail of a failed write, if cutting it back failed then

    def _close_writer(self) -> None:
        if self._fd_closer is not None:
            with contextlib.suppress(OSError):
                self._fd_closer()  # runs os.close once; a finalizer never runs twice
            self._fd_closer = None
        self._fd = -1
        self._fd_seg = None

    def _unlink(self, seg: _Segment) -> None:
        if seg is self._fd_seg:
            self._close_writer()  # never write on into a deleted file
        try:
            seg.path.unlink(missing_ok=True)
        except OSError as exc:  # a volume remounted read-only: read again after a restart, not lost
            log.error("spool %s: cannot delete %s: %s", self.directory, seg.path.name, exc)

    def close(self) -> None:
        """Close the append descriptor (the spool stays usable: the next append reopens)."""
        self._close_writer()
        if self._parked is not None:
            self._parked.close()

    def keep_aside(self, occs: list[Occurrence], owed: Container[tuple[str, int]] = ()) -> bool:
        """Keep ``occs`` (popped, then set aside by the pipeline) in a file of their own, in place of
        what it held; an empty list removes it. Then ``commit`` may move the read position past them:
        before, one item set aside for hours held the read position, every segment read since stayed
        on disk and counted towards the bound, and new spills were dropped as over it. False when the
        file cannot be written (counted in ``read_errors``, logged once per run of failures): the
        caller must not commit then. After ``_keep_in_place`` the file is left as it is: what it holds
        is read again after the restart, not among what a stop wrote."""
        if self._kept is not None:
            return False
        if self._aside_lines:
            # The file read at open still holds records not popped: it is their only copy on disk (the
            # cursor passed them in the run that wrote it). Replaced or removed at the first refill, a
            # crash before they were delivered lost them. New ones wait for it: no commit meanwhile.
            return not occs
        keys = frozenset((occ.uid, occ.number) for occ in occs)
        if keys == self._aside_keys:
            return True
        try:
            if occs:
                tmp = self._aside_path.with_suffix(".tmp")
                tmp.write_bytes(b"".join(self.encode(occ, (occ.uid, occ.number) in owed) for occ in occs))
                os.replace(tmp, self._aside_path)
            else:
                self._aside_path.unlink(missing_ok=True)
        except OSError as exc:
            self.read_errors += 1
            if not self._aside_failed:
                log.error(
                    "spool %s: cannot keep the occurrences set aside in %s: %s",
                    self.directory,
                    self._aside_path.name,
                    exc,
                )
            self._aside_failed = True
            return False
        self._aside_failed = False
        self._aside_keys = keys
        return True

    def prepend(self, occs: list[Occurrence], owed: set[tuple[str, int]] | None = None) -> list[str]:
        """Put ``occs`` before everything not read yet; returns the keys dropped to stay within the
        bound (only when the spool was empty: put first, they exceed it by at most their own size).

        At shutdown the batch in flight and the memory queue are older than what was spilled behind
        them. Appended after it, a newer occurrence of an event would be delivered first, and the
        checkpoint would then skip the older one as a copy. ``occs`` and the unread rest of the first
        segment with unread records go to a new segment numbered below every other; then the durable
        cursor moves to it; only then do the segments before it go. A crash before the cursor moves
        finds everything as it was (the new file, below the cursor, is deleted at open); after it, a
        few records are read twice (skipped by the checkpoint). None is lost. (Moving the cursor
        first, as ``commit`` does, lost the records in flight, which it passes.)
        A first segment that cannot be read (counted and named once, as the stop's scans do:
        ``_scan_read``) stays where it is: ``occs`` alone go to the new segment, and after the restart
        that segment is read from its start (its records read before, again: skipped by the checkpoint)
        or set aside by ``pop``'s own retries. Before, the read's error dropped ``occs`` as a failed write.
        A write that fails (a nearly full disk: the new file is the head's rest, up to a segment)
        leaves what ``occs`` read from the spool in place (``_keep_in_place``): it returns if all of
        them are, else raises ``OSError`` (``kept_in_place`` of them are kept: left in place or
        appended). Before, the stop's last ``commit`` moved the read position past them: lost, though
        still on disk. ``owed``: as for ``extend``."""
        if not occs:
            return []
        self.release_held_at_open()  # a stop: nothing more is offered (and the segments change below)
        owing = set(owed or ())  # taken out of ``owed`` as the records are encoded
        try:
            return self._prepend(occs, owed)
        except OSError as exc:
            self._keep_in_place(exc)
            self._owed_in_place(owing, occs)
            self.kept_in_place = kept = sum(map(self._in_place, occs))
            if kept < len(occs):
                self._uncounted = False  # raised: the caller counts the error and what is not kept
                raise
            self._say_failed()
            return []

    def _prepend(self, occs: list[Occurrence], owed: set[tuple[str, int]] | None) -> list[str]:
        head = next((seg for seg in self._segments if seg.read_records < seg.records), None)
        if head is None:
            return self.extend(occs, owed)
        read = self._scan_read(head)
        rest = b"" if read is None else read[head.read_offset : head.size]
        data = b"".join(self.encode(occ, _owed_once(owed, occ)) for occ in occs) + rest
        cursor_seg = self._cursor_segment()
        number = min(self._segments[0].number, cursor_seg or self._segments[0].number) - 1
        records = len(occs) + (0 if read is None else head.records - head.read_records)
        seg = _Segment(number, self.directory / f"{number}.seg", records=records)
        seg.size = len(data)
        tmp = seg.path.with_suffix(".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, seg.path)
            self._write_cursor(f"{number} 0")
        except OSError:
            for path in (tmp, seg.path):  # below the cursor: deleted at open, but not left for it
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            raise
        while self._segments and self._segments[0] is not head:
            old = self._segments.popleft()
            self._bytes -= old.size
            self._count -= old.records - old.read_records
            self._unlink(old)
        if read is not None:
            self._segments.popleft()  # the head: its rest is in the new segment
            self._bytes -= head.size
            self._count -= head.records - head.read_records
            self._unlink(head)
        self._segments.appendleft(seg)
        self._count += seg.records
        self._bytes += seg.size
        return []

    def _keep_in_place(self, exc: OSError) -> None:
        """A stop could not write (``prepend``, ``extend``). What was read since the durable read
        position is still in its segment: the read position goes back to it (the parked FIFO's too),
        so that the stop's last ``commit`` does not pass those records, and the aside file stays as
        it is (``keep_aside``). After the restart they are read again, as after a crash: those
        delivered meanwhile are skipped by the checkpoint as copies. Once only."""
        if self._kept is not None:
            return
        self._uncounted = True
        self._kept = kept = self._read_again_keys(move=True)
        for uid, number in kept:
            self._kept_newest[uid] = max(number, self._kept_newest.get(uid, 0))
        log.error(
            "spool %s: cannot write at the stop (%s): the %d records read since the read position was "
            "last made durable stay where they were spooled (it is not moved past them), read again "
            "after the restart",
            self.directory,
            exc.strerror or exc,
            len(kept),
        )

    def _read_again_keys(self, move: bool) -> set[tuple[str, int]]:
        """The keys of what a stop that cannot write leaves to be read again after the restart: read
        since the durable read positions (main and parked FIFOs; ``move``: put back to them) and the
        aside file's."""
        keys = self._rewind(move)
        if self._parked is not None:
            keys |= self._parked._rewind(move)
        return keys | self._aside_file_keys()

    def _newest_read_again(self) -> dict[str, int]:
        """Each event's highest number among what a failed stop write leaves (or would leave) to be read
        again, before the stop's appends. Known only after the first failure, a record appended
        before it (X/2, memory only) landed behind a newer one the rewind then put back in front
        (X/3, read since the durable position): skipped as a copy after the restart, though counted
        kept. Computed before the first append, each append below it is marked owed: if no write
        fails, the mark only sends an undelivered leftover whatever the checkpoint says."""
        if self._kept is not None:
            return self._kept_newest
        if self._read_again is None or self._read_again[0] != self._durable:
            newest: dict[str, int] = {}
            for uid, number in self._read_again_keys(move=False):
                newest[uid] = max(number, newest.get(uid, 0))
            self._read_again = (self._durable, newest)
        return self._read_again[1]

    def _say_failed(self) -> None:
        """A stop's write failed and nothing was raised: counted as a failed read position's is
        (``read_errors``: eventrouter_data_dir_errors_total{file="spool"})."""
        if self._uncounted:
            self._uncounted = False
            self.read_errors += 1

    def _in_place(self, occ: Occurrence) -> bool:
        """``occ`` is read again after the restart, in its order: left where it was, or appended by
        the stop and no newer occurrence of its event left before it unmarked (the checkpoint would
        skip it as a copy)."""
        assert self._kept is not None
        key = (occ.uid, occ.number)
        if key in self._kept:
            return True
        marked = self._appended.get(key)
        return marked is not None and (marked or self._kept_newest.get(occ.uid, 0) <= occ.number)

    def _owed_in_place(self, owed: Container[tuple[str, int]] | None, occs: Iterable[Occurrence]) -> None:
        """Owed ones left in place are not marked owed: their events must not be recorded past them."""
        if owed:
            self.owed_unmarked.update(occ.uid for occ in occs if (occ.uid, occ.number) in owed)

    def _rewind(self, move: bool = True) -> set[tuple[str, int]]:
        """Put the read position back to the durable one (``move``; else only look); returns the keys
        of the records so read again (a segment that cannot be read stays as it is: none of its keys)."""
        number, records = self._durable
        keys: set[tuple[str, int]] = set()
        for seg in self._segments:
            start = records if seg.number == number else 0
            if seg.number < number or seg.read_records <= start:
                continue
            try:
                with open(seg.path, "rb") as fh:
                    data = fh.read(seg.read_offset)
                offset = 0
                for _ in range(start):
                    offset = data.index(b"\n", offset) + 1
            except (OSError, ValueError) as exc:
                log.error("spool %s: cannot read %s again: %s", self.directory, seg.path.name, exc)
                continue
            keys.update(key for line in data[offset:].splitlines() if (key := _line_key(line)))
            if move:
                self._count += seg.read_records - start
                seg.read_records, seg.read_offset = start, offset
        return keys

    def _aside_file_keys(self) -> set[tuple[str, int]]:
        """The keys of what the aside file holds now (read first after the restart)."""
        try:
            data = self._aside_path.read_bytes()
        except OSError:
            return set()
        return {key for line in data.splitlines() if (key := _line_key(line))}

    def _cursor_segment(self) -> int:
        try:
            return int((self.directory / "cursor").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def extend(self, occs: list[Occurrence], owed: set[tuple[str, int]] | None = None) -> list[str]:
        """Append each of ``occs`` (a stop); the first record of each (uid, number) in ``owed`` is
        marked owed and its key taken out of the set. A write that fails leaves what was read from
        the spool in place (``_keep_in_place``): those of ``occs`` are then not written, counted as
        kept; an owed one among them puts its event in ``owed_unmarked`` (its key already taken out of
        ``owed``: before, it did not, and the stop recorded the event past it). One below a newer
        occurrence of its event that such a failure leaves, or would leave, in place is marked owed
        (sent though the checkpoint is past it), whether appended before or after the failure
        (``_newest_read_again``). Raises ``OSError`` for the first that is neither written nor in
        place."""
        dropped: list[str] = []
        for occ in occs:
            if self._kept is not None and (occ.uid, occ.number) in self._kept:
                self._owed_in_place(owed, [occ])
                continue
            behind = self._newest_read_again().get(occ.uid, 0) > occ.number
            owed_key = _owed_once(owed, occ)  # out of ``owed`` now: a failure below must still know
            marked = owed_key or behind
            try:
                dropped.extend(self.append(occ, marked))
            except OSError as exc:
                self.lost_on_error.extend(dropped)  # gone all the same: the caller counts them
                self._keep_in_place(exc)
                if not self._in_place(occ):
                    self._uncounted = False  # raised: the caller counts it
                    raise
                if owed_key:  # left in place unmarked: its event must not be recorded past it
                    self.owed_unmarked.add(occ.uid)
                dropped = []
                continue
            self._appended[occ.uid, occ.number] = marked
        self._say_failed()
        return dropped

    def _drop_oldest(self) -> list[str] | None:
        """Drop the unread records of the oldest segment that has any (None: there is none)."""
        seg = next((s for s in self._segments if s.read_records < s.records), None)
        if seg is None:
            return None
        try:
            data = seg.path.read_bytes()[seg.read_offset : seg.size]
        except OSError as exc:
            # Dropped all the same, and counted: only their keys are unknown.
            log.error("spool %s: cannot read segment %s to drop it: %s", self.directory, seg.path.name, exc)
            data = b""
        keys: list[str] = []
        for line in data.splitlines():
            try:
                rec = orjson.loads(line)
                raw = rec[0]
                number = occurrence_number(raw)
                keys.append(f"{raw['metadata']['uid']}/{number}")
            except _UNREADABLE:
                keys.append("?")
                continue
            if self.decode_dropped and len(rec) > 1 and type(rec[1]) in (int, float):
                # Not with ``_decode``: an owed record must not be noted as owed (``self.owed``).
                with contextlib.suppress(*_UNREADABLE):
                    self.dropped_occurrences.append(
                        normalise(raw, cluster=self.cluster, received_at=rec[1], owned=True, number=number)
                    )
        keys.extend(["?"] * max(0, seg.records - seg.read_records - len(keys)))
        self._count -= seg.records - seg.read_records
        self._lost_at_open(seg)
        if seg.read_records:
            # Records popped from it are in flight, and the durable cursor points into it: deleted
            # now, a crash before they finish lost them, counted nowhere. The file stays until
            # ``commit`` (read again after a crash, dropped ones too: delivered, not lost).
            if seg is self._fd_seg:
                self._close_writer()
            self._bytes -= seg.size - seg.read_offset
            seg.records, seg.size, seg.sealed = seg.read_records, seg.read_offset, True
        else:
            self._segments.remove(seg)
            self._unlink(seg)
            self._bytes -= seg.size
        return keys

    # ---- reading ------------------------------------------------------------------------------

    def pop(self, limit: int, max_bytes: int | None = None) -> list[Occurrence]:
        """Up to ``limit`` records, oldest first. With ``max_bytes``, stops before the record whose
        line would take the lines read past it, the first too (a line is its raw JSON and a few bytes
        more: its size is known before it is decoded): a caller bounding memory by bytes reads only
        what fits, whatever the order of sizes in the spool."""
        out: list[Occurrence] = []
        budget = sys.maxsize if max_bytes is None else max_bytes
        while self._aside_lines and len(out) < limit:  # set aside before a crash: the oldest
            if len(self._aside_lines[0]) > budget:
                return out  # the records behind it wait for it: order is kept
            line = self._aside_lines.popleft()
            budget -= len(line)
            try:
                out.append(self._decode(line))
            except _UNREADABLE as exc:
                self.unreadable += 1
                log.error("spool %s: unreadable record skipped: %s", self.directory, exc)
        if self._read_retry_at and time.monotonic() < self._read_retry_at:
            return out
        self._read_retry_at = 0.0
        # A segment read to its end stays until ``commit``: what was popped from it is not delivered
        # yet, and the durable cursor still points into it (a crash reads it again).
        segments = iter(list(self._segments))
        seg = next(segments, None)
        while seg is not None and len(out) < limit:
            if seg.read_records >= seg.records:
                seg = next(segments, None)
                continue
            try:
                fh = open(seg.path, "rb")  # noqa: SIM115 - closed below; its errors are handled apart
            except FileNotFoundError:
                # Removed under the router (a data dir cleaned by hand): those records are gone, counted.
                missing = seg.records - seg.read_records
                log.error(
                    "spool %s: %s is gone: %d spooled occurrences lost",
                    self.directory,
                    seg.path.name,
                    missing,
                )
                self.unreadable += missing
                self._count -= missing
                seg.read_records, seg.read_offset = seg.records, seg.size
                self._lost_at_open(seg)
                continue
            except OSError as exc:
                self._read_failed(seg, exc)
                break
            with fh:
                try:
                    fh.seek(seg.read_offset)
                    while len(out) < limit and seg.read_records < seg.records:
                        line = fh.readline()
                        if len(line) > budget:
                            limit = len(out)  # left unread: the next pop reads it again
                            break
                        budget -= len(line)
                        seg.read_offset += len(line)
                        seg.read_records += 1
                        self._count -= 1
                        try:
                            out.append(self._decode(line))
                        except _UNREADABLE as exc:
                            self.unreadable += 1
                            log.error("spool %s: unreadable record skipped: %s", self.directory, exc)
                except OSError as exc:  # an I/O error: what was read is handed on, the rest waits
                    self._read_failed(seg, exc)
                    break
                if self._failing is seg:
                    self._failing = None  # readable again
        if self.held_at_open is not None:
            self._check_read_at_open()
        return out

    def _read_failed(self, seg: _Segment, exc: OSError) -> None:
        self.read_errors += 1
        now = time.monotonic()
        if self._failing is not seg:
            self._failing, self._failing_since = seg, now
        if now - self._failing_since >= self.quarantine_after and seg in self._segments:
            self._segments.remove(seg)
            if seg is self._fd_seg:
                self._close_writer()
            missing = seg.records - seg.read_records
            self.unreadable += missing
            self._count -= missing
            self._bytes -= seg.size
            self._failing = None
            self._lost_at_open(seg)
            log.error(
                "spool %s: %s unreadable for %.0fs (%s): its %d occurrences are given up and counted, the "
                "segment %s; the rest of the spool goes on",
                self.directory,
                seg.path.name,
                now - self._failing_since,
                exc.strerror or exc,
                missing,
                self._set_aside(seg.path),
            )
            return
        self._read_retry_at = now + RETRY_SECONDS
        log.error("spool %s: cannot read %s (%s); tried again later", self.directory, seg.path.name, exc)

    def _set_aside(self, path: Path) -> str:
        """Move an unreadable segment to ``unreadable/`` (never read again); says where it is."""
        target = self.directory / "unreadable" / path.name
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
        except OSError as exc:
            # Left in place, it is tried again at the next start, and set aside then.
            return f"left in place ({exc.strerror or exc})"
        return f"moved to {target}"

    def commit_parked(self) -> None:
        """Make the parked FIFO's read position durable alone: the main FIFO's records read may not
        be finished yet (queued in memory), those read back from the parked FIFO are (finished, or in
        the aside file: ``keep_aside`` first)."""
        parked = self._parked
        if parked is not None:
            parked.commit()
            self._took_from(parked)

    def commit(self) -> None:
        """Make the read position durable and delete fully read segments (of the parked FIFO too)."""
        parked = self._parked
        if parked is not None:
            parked.commit()
            self._took_from(parked)
        while len(self._segments) > 1 and self._segments[0].read_records >= self._segments[0].records:
            seg = self._segments.popleft()
            self._bytes -= seg.size
            self._unlink(seg)
        if not self._segments:
            text = "0 0"
        else:
            head = self._segments[0]
            if head.read_records >= head.records and len(self._segments) == 1 and head.records:
                # Everything read: start afresh instead of keeping an exhausted segment around.
                self._segments.clear()
                self._bytes -= head.size
                self._unlink(head)
                text = "0 0"
            else:
                text = f"{head.number} {head.read_records}"
        try:
            self._write_cursor(text)
        except OSError as exc:
            # Counted (eventrouter_data_dir_errors_total{file="spool"}) and logged once per run of
            # failures: an inode-full volume failed every batch's cursor write, seen by no metric.
            # After a crash the records read since are read again, and skipped by the checkpoint.
            self.read_errors += 1
            self._cursor_failures += 1
            if self._cursor_failures == 1:
                log.error("spool %s: cannot persist read position: %s", self.directory, exc)
            return
        if self._cursor_failures:
            log.warning(
                "spool %s: read position written again after %d failed writes",
                self.directory,
                self._cursor_failures,
            )
            self._cursor_failures = 0

    def _write_cursor(self, text: str) -> None:
        # Before the write: one that fails may still have left it on disk.
        self._highest = max(self._highest, int(text.split()[0]))
        cursor = self.directory / "cursor"
        if not (cursor.exists() and cursor.read_text() == text):
            tmp = self.directory / "cursor.tmp"
            tmp.write_text(text)
            os.replace(tmp, cursor)
        a, b = text.split()
        self._durable = (int(a), int(b))

    # ---- the parked FIFO ----------------------------------------------------------------------

    @property
    def parked_count(self) -> int:
        """Records waiting in the parked FIFO (not in ``len``: the main FIFO's backlog decides whether
        new occurrences go through the disk, and a key refused for hours must not send every other
        key's traffic through it)."""
        parked = self._parked
        return len(parked) if parked is not None else 0

    @property
    def behind_open(self) -> bool:
        """True while records spooled before the start (the aside file's, the FIFO's up to its end at
        open) are not all read: the parked records wait for them (``Pipeline._unpark``)."""
        if self._aside_lines:
            return True
        tail = self._open_tail
        if tail is None:
            return False
        for seg in self._segments:
            if seg.read_records < seg.records:
                if seg.number < tail[0] or (seg.number == tail[0] and seg.read_records < tail[1]):
                    return True
                break
        self._open_tail = None
        return False

    @property
    def parking(self) -> bool:
        """False for a while after a write to the parked FIFO failed."""
        return self._parked is None or self._parked.writable

    def park(self, occ: Occurrence, tries: int = 0, owed: bool = False, not_before: float = 0.0) -> list[str]:
        """Append ``occ`` (set aside by the pipeline, ``tries`` failed attempts so far, not to be sent
        again before ``not_before``, a wall-clock time; 0: at once) to the parked FIFO; returns the
        keys dropped to stay within the bound: the parked FIFO's oldest first (it takes at most half
        the bound), then the main FIFO's. Raises ``OSError`` as ``append`` does."""
        parked = self._parked
        if parked is None:
            parked = self._parked = _Parked(self)
        parked.decode_dropped = self.decode_dropped
        try:
            return parked.add(occ, tries, owed, not_before)
        finally:
            self._took_from(parked)

    def unpark(self, limit: int, max_bytes: int | None = None) -> list[Unparked]:
        """The next ``limit`` parked records, oldest first, within ``max_bytes`` of lines as ``pop``
        reads them, with their failed attempts so far and their "not before" time; their owed marks
        go to ``owed``. Like ``pop``: the read position is durable only at ``commit``."""
        parked = self._parked
        if parked is None or not len(parked):
            return []
        try:
            occs = parked.pop(limit, max_bytes)
        finally:
            self._took_from(parked)
        tries, waits = parked.tries, parked.not_before
        out = [
            Unparked(occ, tries.pop((occ.uid, occ.number), 0), waits.pop((occ.uid, occ.number), 0.0))
            for occ in occs
        ]
        if self.held_at_open is not None and parked.held_at_open is None:
            self._check_read_at_open()
        return out

    def parked_floor(self, uid: str) -> int | None:
        """The lowest number of ``uid`` parked (None: none is): the checkpoint must not pass it, or a
        crash or a restart would skip it as a copy once a newer occurrence was accepted; and a newer
        one read back before it waits behind it (``Pipeline._unpark``)."""
        parked = self._parked
        return parked.floor(uid) if parked is not None else None

    def parked_holds(self, uid: str, number: int) -> bool:
        """``uid``'s occurrence ``number`` is parked: a queued one is a copy (a relist's, offered once
        ``held_at_open`` was freed, i.e. before the relist ended)."""
        parked = self._parked
        return parked is not None and parked.holds_number(uid, number)

    def owe_parked(self, behind: Mapping[str, int]) -> set[str]:
        """A stop records accepted occurrences past parked ones of their events (``behind``: uid →
        the number it records). Recorded so, a parked record would be skipped as a copy after the
        restart; not recorded, the relist would send the accepted one again. So each parked record
        of those events below that number is marked owed, in place (delivered though the checkpoint
        is past it), as item 79 keeps leftovers. Only at a stop that records them: a record owed
        that another leader then delivered would be sent twice. Returns the uids that may be
        recorded (all their records marked).

        Before, an owed copy was parked beside the unmarked original: the original was delivered
        after the restart once the event's checkpoint entry was gone (deleted, pruned), then the
        copy too; and near the bound each copy dropped another parked record."""
        parked = self._parked
        if parked is None:
            return set(behind)
        try:
            failed = parked.mark_owed(behind)
        except OSError as exc:
            log.error("spool %s: cannot read the parked records at the stop: %s", self.directory, exc)
            return set()
        return set(behind) - failed

    def _took_from(self, parked: Spool) -> None:
        """What the parked FIFO dropped, could not read or write is counted and told as the main one's."""
        if parked.dropped_occurrences:
            self.dropped_occurrences.extend(parked.dropped_occurrences)
            parked.dropped_occurrences = []
        if parked.lost_on_error:
            self.lost_on_error.extend(parked.lost_on_error)
            parked.lost_on_error = []
        if parked.owed:
            self.owed |= parked.owed
            parked.owed.clear()
        self.unreadable += parked.unreadable
        self.read_errors += parked.read_errors
        parked.unreadable = parked.read_errors = 0
        parked.decode_dropped = self.decode_dropped


class _Parked(Spool):
    """The parked FIFO in ``<spool>/parked/``: segments, cursor, bound and reading as the main one's.
    A record carries its failed attempts (``[raw, received_at, owed, tries, not_before]``:
    ``retry_max_attempts`` still ends it) and the wall-clock time its backoff ends (an event refused
    a moment ago and parked behind its own records was read back due at once: a burst of resends). ``floor`` answers per event from a table of its parked numbers, keyed by a
    64-bit hash of the uid (~120 bytes an event with one record parked, ~100 more with several, then
    8 a record: 100,000 events, 12 MiB), rebuilt at open; the records themselves are not in memory."""

    def __init__(self, main: Spool) -> None:
        self._main = main
        self.tries: dict[tuple[str, int], int] = {}
        self.not_before: dict[tuple[str, int], float] = {}
        self._floors: dict[int, int | list[int]] = {}
        self._moved = True
        # Per segment, where the read position was before ``_rewind`` put it back: what lies before
        # it was read and finished (or is a leftover in memory, kept by the stop) — not to be marked.
        self._read_to: dict[int, int] = {}
        super().__init__(
            main.directory / "parked",
            max_bytes=max(1, main.max_bytes // 2),
            segment_bytes=main.segment_bytes,
            cluster=main.cluster,
        )
        self.decode_dropped = main.decode_dropped

    def _noted(self, uid: str, number: int) -> None:
        self._floor_add(uid, number)

    def _floor_add(self, uid: str, number: int) -> None:
        key = hash(uid)
        had = self._floors.get(key)
        if had is None:
            self._floors[key] = number
        elif type(had) is int:
            self._floors[key] = [had, number] if had <= number else [number, had]
        else:
            assert isinstance(had, list)
            bisect.insort(had, number)

    def _floor_remove(self, uid: str, number: int) -> None:
        key = hash(uid)
        had = self._floors.get(key)
        if had is None:
            return
        if type(had) is int:
            if had == number:
                del self._floors[key]
            return
        assert isinstance(had, list)
        i = bisect.bisect_left(had, number)
        if i < len(had) and had[i] == number:
            del had[i]
            if len(had) == 1:
                self._floors[key] = had[0]

    def holds_number(self, uid: str, number: int) -> bool:
        had = self._floors.get(hash(uid))
        if had is None or type(had) is int:
            return had == number
        assert isinstance(had, list)
        i = bisect.bisect_left(had, number)
        return i < len(had) and had[i] == number

    def floor(self, uid: str) -> int | None:
        had = self._floors.get(hash(uid))
        if had is None or type(had) is int:
            return had
        assert isinstance(had, list)
        return had[0]

    def _forget_floors_if_empty(self) -> None:
        if not len(self):
            self._floors.clear()

    def _rebuild_floors(self) -> None:
        """Records given up unread (a segment gone or set aside, a record that cannot be read) left
        their numbers behind: a phantom floor would keep its event's newer occurrences parked for
        good. Rebuilt from what is left (an error path: one read of the unread part)."""
        self._floors = {}
        for seg in self._segments:
            if seg.read_records >= seg.records:
                continue
            try:
                with open(seg.path, "rb") as fh:
                    fh.seek(seg.read_offset)
                    data = fh.read(seg.size - seg.read_offset)
            except OSError:
                continue  # unreadable: given up when it is read, not waited for
            for line in data.splitlines():
                self._note_key([], line, 1)

    def _rewind(self, move: bool = True) -> set[tuple[str, int]]:
        read_to = {seg.number: seg.read_offset for seg in self._segments}
        keys = super()._rewind(move)
        if keys and move:
            self._moved = True
            self._rebuild_floors()  # parked again: their floors hold the checkpoint back once more
            self._read_to = {
                seg.number: read_to[seg.number]
                for seg in self._segments
                if seg.read_offset < read_to[seg.number]
            }
        return keys

    def commit(self) -> None:
        if self._moved:  # nothing read or dropped since: the read position on disk is right
            self._moved = False
            super().commit()

    def add(self, occ: Occurrence, tries: int, owed: bool, not_before: float = 0.0) -> list[str]:
        line = (
            b"["
            + occ.raw_json
            + b","
            + orjson.dumps(occ.received_at)
            + (b",1," if owed else b",0,")
            + str(tries).encode()
            + (b"," + orjson.dumps(round(not_before, 3)) if not_before > 0 else b"")
            + b"]\n"
        )
        main = self._main
        dropped = self._append_line(line, (main,), self._bytes_with(main), main.max_bytes)
        self._floor_add(occ.uid, occ.number)
        return dropped

    def _default_decode(self, line: bytes) -> Occurrence:
        rec = orjson.loads(line)
        with contextlib.suppress(*_UNREADABLE):  # read back: no longer parked
            self._floor_remove(rec[0]["metadata"]["uid"], occurrence_number(rec[0]))
        rec = _record(rec)
        occ = normalise(rec[0], cluster=self.cluster, received_at=rec[1])
        # Read before any is noted: a record that fails here is skipped whole.
        tries = int(rec[3]) if len(rec) > 3 and rec[3] else 0
        not_before = float(rec[4]) if len(rec) > 4 and rec[4] else 0.0
        key = (occ.uid, occ.number)
        if len(rec) > 2 and rec[2]:
            self.owed.add(key)
        if tries:
            self.tries[key] = tries
        if not_before:
            self.not_before[key] = not_before
        return occ

    def pop(self, limit: int, max_bytes: int | None = None) -> list[Occurrence]:
        self._moved = True
        unreadable = self.unreadable
        out = super().pop(limit, max_bytes)
        if self.unreadable != unreadable:
            self._rebuild_floors()
        self._forget_floors_if_empty()
        return out

    def _drop_oldest(self) -> list[str] | None:
        self._moved = True
        keys = super()._drop_oldest()
        for key in keys or ():
            uid, _, number = key.rpartition("/")
            if uid:
                self._floor_remove(uid, int(number))
        if keys and "?" in keys:
            self._rebuild_floors()
        self._forget_floors_if_empty()
        return keys

    def _read_failed(self, seg: _Segment, exc: OSError) -> None:
        unreadable = self.unreadable
        super()._read_failed(seg, exc)
        if self.unreadable != unreadable:  # a segment set aside
            self._moved = True
            self._rebuild_floors()
        self._forget_floors_if_empty()

    def mark_owed(self, behind: Mapping[str, int]) -> set[str]:
        """Set the owed mark of each unread record of the events in ``behind`` below its number, in
        the file: the mark is one byte (``0`` → ``1``), so nothing moves, the read positions and
        sizes stay right and each occurrence keeps one record. The segments marked are synced
        before the stop records the numbers past them. Returns the uids of which a record could not
        be marked (logged): those must not be recorded. Raises ``OSError`` when a segment cannot be
        read (nothing may be recorded then)."""
        failed: set[str] = set()
        # Marks to set, per segment: (offset in the file, uid, number). Chosen once all unread
        # records are read: an occurrence with an owed record already (a FIFO an older version left
        # with the original and its owed copy) gets no second mark, and one with two unmarked
        # records gets one, so that it is owed once.
        found: list[tuple[_Segment, list[tuple[int, str, int]]]] = []
        owed: set[tuple[str, int]] = set()
        for seg in list(self._segments):
            if seg.read_records >= seg.records:
                continue
            with open(seg.path, "rb") as fh:
                fh.seek(seg.read_offset)
                data = fh.read(seg.size - seg.read_offset)
            candidates: list[tuple[int, str, int]] = []
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                line, at = data[start:end], start
                start = end + 1
                try:
                    rec = orjson.loads(line)
                    uid = rec[0]["metadata"]["uid"]
                    number = occurrence_number(rec[0])
                    if len(rec) > 2 and rec[2]:
                        owed.add((uid, number))
                        continue  # owed already
                    upto = behind.get(uid)
                    if upto is None or number >= upto:
                        continue  # not below what is recorded
                except _UNREADABLE:
                    continue  # unreadable: counted when it is read
                if seg.read_offset + at < self._read_to.get(seg.number, 0):
                    # Read before the stop, then put back by ``_rewind``: delivered (or given up, or
                    # parked again behind), or a leftover kept where it is, its event then not
                    # recorded (``owed_unmarked``). Marked, a delivered one was sent twice.
                    continue
                where = _owed_mark_at(line, rec)
                if where is None:
                    failed.add(uid)
                    continue
                candidates.append((seg.read_offset + at + where, uid, number))
            found.append((seg, candidates))
        for seg, candidates in found:
            marks: list[int] = []  # offsets in the file of the marks to set
            uids: set[str] = set()
            for offset, uid, number in candidates:
                if (uid, number) in owed:
                    continue
                owed.add((uid, number))
                marks.append(offset)
                uids.add(uid)
            if not marks:
                continue
            try:
                # Not the append descriptor: with O_APPEND a pwrite goes to the end.
                fd = os.open(seg.path, os.O_WRONLY)
                try:
                    for offset in marks:
                        if os.pwrite(fd, b"1", offset) != 1:
                            raise OSError(f"short write at {offset}")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                # A mark set on an event not recorded is harmless (owed: delivered whatever the
                # checkpoint says, which stays before it).
                log.error("spool %s: cannot mark parked records owed at the stop: %s", self.directory, exc)
                failed |= uids
        if failed:
            log.error(
                "spool %s: %d events' parked records could not be marked owed at the stop: their newer "
                "accepted occurrences are not recorded (sent again after the restart)",
                self.directory,
                len(failed),
            )
        return failed


def _owed_mark_at(line: bytes, rec: list[object]) -> int | None:
    """Where in a parked record's ``line`` (decoded as ``rec``) its owed mark ``0`` is: the elements
    after ``received_at`` (mark, tries, not before) are numbers, so the mark follows the comma that
    many from the end. None if the line is not as ``_Parked.add`` writes it."""
    if len(rec) < 4 or not line.endswith(b"]"):
        return None
    parts = line[:-1].rsplit(b",", len(rec) - 2)
    if len(parts) != len(rec) - 1 or parts[1] != b"0":
        return None
    where = len(parts[0]) + 1
    try:
        marked = orjson.loads(line[:where] + b"1" + line[where + 1 :])
    except orjson.JSONDecodeError:
        return None
    return where if marked == [*rec[:2], 1, *rec[3:]] else None
