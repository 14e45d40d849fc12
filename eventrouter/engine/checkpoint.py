"""Per-sink record of accepted occurrences: event uid → highest occurrence number accepted.

On start the source relists and each sink gets only what this says it has not accepted yet.
The file backend appends every acknowledged batch to a journal (one write, no fsync: a SIGKILL
keeps the page cache, so a crash re-delivers at most what was in flight) and compacts it into a
snapshot now and then. Entries for events the API server no longer holds are pruned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Container, Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from eventrouter.appendfile import append_to
from eventrouter.options import safe_name

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointBackend",
    "CheckpointTable",
    "FileCheckpoint",
    "MemoryCheckpoint",
    "SinkCheckpoint",
    "TableBackend",
    "put_folder_in_place",
    "safe_name",
]


class CheckpointBackend(Protocol):
    def load(self) -> dict[str, int]: ...
    def record(self, acks: Mapping[str, int]) -> None: ...
    def remove(self, uids: Iterable[str]) -> None: ...
    def compact(self, state: Mapping[str, int]) -> None: ...
    def close(self, state: Mapping[str, int]) -> None: ...


@runtime_checkable
class TableBackend(CheckpointBackend, Protocol):
    """A backend that reads its sink's column of the CheckpointTable when it writes instead of keeping
    a copy of its own (the ConfigMap store: seven copies of 50,000 entries were ~16.5 MiB). SinkCheckpoint
    binds it once loaded, and tells it of the entries a prune drops (``remove``), which it no longer
    has a copy of to compare with."""

    def bind(self, table: CheckpointTable, index: int) -> None: ...


class MemoryCheckpoint:
    """No persistence (no --data-dir): a restart re-delivers what the API server still holds."""

    def load(self) -> dict[str, int]:
        return {}

    def record(self, acks: Mapping[str, int]) -> None:
        pass

    def remove(self, uids: Iterable[str]) -> None:
        pass

    def compact(self, state: Mapping[str, int]) -> None:
        pass

    def close(self, state: Mapping[str, int]) -> None:
        pass


class FileCheckpoint:
    """``<dir>/<sink>.snapshot`` (``uid count`` lines) plus ``<dir>/<sink>.journal``
    (``+ uid count`` / ``- uid`` lines appended in ack order)."""

    def __init__(self, directory: Path, sink: str, *, fsync: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        base = safe_name(sink)
        self.snapshot = directory / f"{base}.snapshot"
        self.journal = directory / f"{base}.journal"
        self.fsync = fsync
        self._journal_lines = 0
        # Removals (DELETED events) are held and written with the next append: one journal append
        # per deleted event would be a file open per event. A crash only leaves stale entries,
        # which the next complete list prunes.
        self._removals = ""
        # The journal read at load ended in part of a line (a kill mid-append): the next append ends
        # it first, or its first line would be glued onto the fragment and that ack lost.
        self._torn = False

    def __str__(self) -> str:
        return str(self.snapshot.with_suffix(""))

    def load(self) -> dict[str, int]:
        # Lines that cannot be read (a damaged disk, a hand edit) are skipped, counted and named: a
        # missing entry only means that event is delivered again, while refusing the file stopped
        # every start (a crash loop of every sink).
        state: dict[str, int] = {}
        skipped = 0
        if self.snapshot.exists():
            for line in self.snapshot.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 2 and _number(parts[1]):
                    state[parts[0]] = int(parts[1])
                elif parts:
                    skipped += 1
        if skipped:
            log.warning("checkpoint %s: skipped %d unreadable snapshot lines", self.snapshot, skipped)
        if self.journal.exists():
            # A torn last line (crash mid-write) is ignored: that batch is re-delivered, never lost.
            text = self.journal.read_text(encoding="utf-8", errors="replace")
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "+" and _number(parts[2]):
                    n = int(parts[2])
                    if n > state.get(parts[1], 0):
                        state[parts[1]] = n
                elif len(parts) == 2 and parts[0] == "-":
                    state.pop(parts[1], None)
                self._journal_lines += 1
        return state

    def _append(self, text: str) -> None:
        text, self._removals = self._removals + text, ""
        torn = "\n" if self._torn else ""
        append_to(self.journal, (torn + text).encode(), fsync=self.fsync)
        self._torn = False
        self._journal_lines += text.count("\n")

    def record(self, acks: Mapping[str, int]) -> None:
        if acks:
            self._append("".join(f"+ {uid} {n}\n" for uid, n in acks.items()))

    def remove(self, uids: Iterable[str]) -> None:
        self._removals += "".join(f"- {uid}\n" for uid in uids)
        if self._removals.count("\n") >= 256:
            self._append("")

    @property
    def journal_lines(self) -> int:
        return self._journal_lines

    def compact(self, state: Mapping[str, int]) -> None:
        self._removals = ""  # the snapshot is written without them
        tmp = self.snapshot.with_suffix(".snapshot.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("".join(f"{uid} {n}\n" for uid, n in state.items()))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.snapshot)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a half-written snapshot must not keep a full disk full
            raise
        # The snapshot holds everything the journal said; replaying an old journal on top is harmless.
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.journal, 0)
        self._journal_lines = 0
        self._torn = False

    def close(self, state: Mapping[str, int]) -> None:
        self.compact(state)


def sync_folder(path: Path) -> None:
    """fsync a folder: a file created or renamed in it survives a power cut only once this is done."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def put_folder_in_place(side: Path, folder: Path) -> None:
    """Make ``side``, written in full with its files fsynced, ``folder`` (missing or empty) in one
    rename: a kill before it leaves ``folder`` without a file, one after it leaves every file there.
    On OSError ``side`` is left where it is."""
    sync_folder(side)
    os.rename(side, folder)  # over an empty folder too (POSIX); ENOTEMPTY over one holding a file
    sync_folder(folder.parent)


def _number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() then refuses."""
    return text.isascii() and text.isdigit()


def _level(behind: dict[str, int], uid: str) -> None:
    """The sink is level with the highest again: forget its own number for ``uid``."""
    if behind.pop(uid, None) is not None and not behind:
        behind.clear()  # frees the emptied dict's table (a pop never shrinks it)


class CheckpointTable:
    """The accepted occurrence numbers of every sink of a router, without a Python object per entry.

    ``entries``: uid → the highest ``n`` any sink accepted (the usual state once an occurrence is
    delivered everywhere: every sink holds it). ``behind[i]``: uid → sink ``i``'s own ``n`` where it is
    lower. A sink lagging far behind (Elasticsearch draining 50,000 relisted events from its spool)
    costs one slot in its ``behind`` dict per entry, not a list per event: 50,000 seven-number rows
    were 100,000 small objects (~6 MiB) spread over the pymalloc arenas the relist used, and kept
    those arenas from being returned once the rows were gone."""

    def __init__(self, width: int) -> None:
        if width < 1:
            raise ValueError("a checkpoint table needs at least one sink")
        self.width = width
        # Never rebound: readers keep their .get.
        self.entries: dict[str, int] = {}
        self.behind: tuple[dict[str, int], ...] = tuple({} for _ in range(width))
        self.on_share_keys: list[Callable[[Mapping[str, str]], None]] = []
        """Told of each ``share_keys`` (uid → the string now keying its entry): a reader keeping uids of
        its own (the ConfigMap store's order) keys them on the same strings."""

    def get(self, index: int, uid: str) -> int:
        behind = self.behind[index]
        if behind:
            n = behind.get(uid)
            if n is not None:
                return n
        return self.entries.get(uid, 0)

    def set(self, index: int, uid: str, n: int) -> None:
        entries, behind = self.entries, self.behind
        top = entries.get(uid, 0)
        own = behind[index]
        if n == top:
            # The hot path of a lagging sink: it catches up with the others.
            if own:
                _level(own, uid)
            return
        if n > top:
            # The first sink to accept a new occurrence: the others, where they were level, fall behind.
            for j, lag in enumerate(behind):
                if j == index:
                    if lag:
                        _level(lag, uid)
                elif uid not in lag:
                    lag[uid] = top
            entries[uid] = n
            return
        # Lower than the highest (a forget): recompute the row.
        row = [self.get(j, uid) for j in range(self.width)]
        if row[index] == n:
            return
        row[index] = n
        top = max(row)
        if not top:
            entries.pop(uid, None)
        else:
            entries[uid] = top
        for j, value in enumerate(row):
            lag = behind[j]
            if value == top:
                if lag:
                    _level(lag, uid)
            else:
                lag[uid] = value

    def remove(self, uids: Iterable[str]) -> list[list[str]]:
        """Drop these uids from every column at once (a prune by every sink of the table). Returns each
        column's uids that it held (a number above 0), in the order given. A column's forget each
        (``set(i, uid, 0)``) recomputes the row: O(width) per column, O(width²) per uid; 50,000 expired
        events at 7 sinks held the loop ~2 s."""
        entries, behind = self.entries, self.behind
        held: list[list[str]] = [[] for _ in behind]
        lagging = [(lag, out) for lag, out in zip(behind, held, strict=True) if lag]
        level = [out for lag, out in zip(behind, held, strict=True) if not lag]
        for uid in uids:
            top = entries.pop(uid, 0)
            for lag, out in lagging:
                if lag.pop(uid, top):
                    out.append(uid)
            if top:
                for out in level:
                    out.append(uid)
        for lag, _ in lagging:
            if not lag:
                lag.clear()  # frees the emptied dict's table (a pop never shrinks it)
        return held

    def share_keys(self, uids: Iterable[str]) -> int:
        """Key the entries of these uids on these very strings (the tracker's). Entries read from a
        backend after a restart are keyed on strings of their own: one more copy per event (~100
        bytes) for as long as the event lives. Returns the number of entries re-keyed."""
        entries = self.entries
        keys = {uid: uid for uid in uids if uid in entries}
        if keys:
            # Rebuilt, not popped and re-inserted one by one (that doubles the dict's table); the
            # same dict objects, as readers keep their .get.
            for table in (entries, *self.behind):
                if table:
                    fresh = {keys.get(uid, uid): value for uid, value in table.items()}
                    table.clear()
                    table.update(fresh)
            for hook in self.on_share_keys:
                hook(keys)
        return len(keys)

    def view(self, index: int) -> dict[str, int]:
        """One sink's entries (for its backend's snapshot and for tests)."""
        behind = self.behind[index]
        if not behind:
            return dict(self.entries)
        out: dict[str, int] = {}
        for uid, top in self.entries.items():
            n = behind.get(uid, top)
            if n:
                out[uid] = n
        return out


class SinkCheckpoint:
    """The in-memory view used by a pipeline (its column of a CheckpointTable, shared with the other
    sinks of the router, or a table of its own), persisted through a backend.

    A backend write that fails (a full disk) never stops delivery: the table in memory stays right,
    ``durable`` turns False, and from then on, at most every ``retry_interval`` seconds, a whole
    snapshot is tried instead of journal lines (the journal now misses some). Until one succeeds, a
    restart re-delivers what was accepted meanwhile; nothing is lost."""

    retry_interval = 5.0

    def __init__(
        self,
        backend: CheckpointBackend,
        *,
        compact_every: int = 50_000,
        table: CheckpointTable | None = None,
        index: int = 0,
    ) -> None:
        self.backend = backend
        self.table = table if table is not None else CheckpointTable(1)
        self.index = index
        # accepted(uid): the highest occurrence number this sink accepted (0: none). Called per
        # occurrence and sink (offer, batch): one call, not a method calling the table's.
        get = self.table.entries.get
        behind = self.table.behind[index]

        def accepted(uid: str) -> int:
            if behind:  # empty but while this sink lags behind another
                n = behind.get(uid)
                if n is not None:
                    return n
            return get(uid, 0)

        self.accepted = accepted
        for uid, n in backend.load().items():
            if n > 0:
                self.table.set(index, uid, n)
        self._reads_table = isinstance(backend, TableBackend)
        if isinstance(backend, TableBackend):
            backend.bind(self.table, index)
        self.compact_every = compact_every
        self._since_compact = 0
        self.durable = True
        self.write_errors = 0
        self._retry_at = 0.0
        self.on_write: Callable[[OSError | None], None] | None = None
        """Told of each failed write (the error) and of the first write that succeeds after one (None)."""

    @property
    def state(self) -> dict[str, int]:
        """This sink's entries, as a new dict."""
        return self.table.view(self.index)

    def ack(self, acks: Mapping[str, int]) -> None:
        fresh: dict[str, int] = {}
        table, index = self.table, self.index
        for uid, n in acks.items():
            if n > table.get(index, uid):
                table.set(index, uid, n)
                fresh[uid] = n
        if fresh:
            self._persist(lambda: self.backend.record(fresh))
            self._note(len(fresh))

    def forget(self, uids: Iterable[str]) -> None:
        table, index = self.table, self.index
        gone = []
        for uid in uids:
            if table.get(index, uid):
                table.set(index, uid, 0)
                gone.append(uid)
        if gone:
            self._persist(lambda: self.backend.remove(gone))
            self._note(len(gone))

    def prune(self, live: Container[str]) -> int:
        """Drop entries for events the API server no longer holds (after a complete list)."""
        table, index = self.table, self.index
        if table.width == 1:
            return self.pruned(table.remove([uid for uid in table.entries if uid not in live])[0])
        gone = [uid for uid in table.entries if uid not in live and table.get(index, uid)]
        for uid in gone:
            table.set(index, uid, 0)
        return self.pruned(gone)

    def pruned(self, gone: list[str]) -> int:
        """The table dropped ``gone`` (this sink's entries of a prune, ``CheckpointTable.remove``): the
        rest of ``prune``."""
        if gone:
            if self._reads_table:
                self.backend.remove(gone)  # no copy of its own to find them in
            self._compact()
        return len(gone)

    def _note(self, lines: int) -> None:
        self._since_compact += lines
        if self._since_compact >= self.compact_every:
            self._compact()

    def _compact(self) -> None:
        self._since_compact = 0
        self._persist(lambda: self.backend.compact(self.state))

    def retry(self) -> None:
        """Try to make the state durable again now, if it is not (a periodic call: a quiet cluster
        may send no ack for a long time after the disk has room again)."""
        if not self.durable:
            self._persist(lambda: None)

    def _persist(self, write: Callable[[], None]) -> None:
        if not self.durable:
            if time.monotonic() < self._retry_at:
                return
            write = lambda: self.backend.compact(self.state)  # noqa: E731 - the journal misses lines
        try:
            write()
        except OSError as exc:
            self.write_errors += 1
            self._retry_at = time.monotonic() + self.retry_interval
            if self.durable:
                self.durable = False
                log.error(
                    "checkpoint %s cannot be written (%s): delivery goes on; until it can, a restart "
                    "re-delivers what is accepted meanwhile (retried every %gs)",
                    self.backend,
                    exc.strerror or exc,
                    self.retry_interval,
                )
            if self.on_write is not None:
                self.on_write(exc)
            return
        if not self.durable:
            self.durable = True
            self._since_compact = 0
            log.warning("checkpoint %s written again after %d failed writes", self.backend, self.write_errors)
            if self.on_write is not None:
                self.on_write(None)

    def close(self) -> None:
        self.backend.close(self.state)
