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
import re
from collections.abc import Container, Iterable, Mapping
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointBackend",
    "CheckpointTable",
    "FileCheckpoint",
    "MemoryCheckpoint",
    "SinkCheckpoint",
    "safe_name",
]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


class CheckpointBackend(Protocol):
    def load(self) -> dict[str, int]: ...
    def record(self, acks: Mapping[str, int]) -> None: ...
    def remove(self, uids: Iterable[str]) -> None: ...
    def compact(self, state: Mapping[str, int]) -> None: ...
    def close(self, state: Mapping[str, int]) -> None: ...


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

    def load(self) -> dict[str, int]:
        state: dict[str, int] = {}
        if self.snapshot.exists():
            for line in self.snapshot.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    state[parts[0]] = int(parts[1])
        if self.journal.exists():
            # A torn last line (crash mid-write) is ignored: that batch is re-delivered, never lost.
            for line in self.journal.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "+" and parts[2].isdigit():
                    n = int(parts[2])
                    if n > state.get(parts[1], 0):
                        state[parts[1]] = n
                elif len(parts) == 2 and parts[0] == "-":
                    state.pop(parts[1], None)
                self._journal_lines += 1
        return state

    def _append(self, text: str) -> None:
        text, self._removals = self._removals + text, ""
        with open(self.journal, "a", encoding="utf-8") as fh:
            fh.write(text)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
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
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{uid} {n}\n" for uid, n in state.items()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snapshot)
        # The snapshot holds everything the journal said; replaying an old journal on top is harmless.
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.journal, 0)
        self._journal_lines = 0

    def close(self, state: Mapping[str, int]) -> None:
        self.compact(state)


class CheckpointTable:
    """The accepted occurrence numbers of every sink of a router in one dict.

    ``uid → n`` while every sink has accepted the same ``n`` (the usual state once an occurrence is
    delivered everywhere), else ``uid → [n per sink]``. Seven per-sink dicts of 50,000 events were
    ~13 MiB; this is ~2 MiB in the usual state, ~7 MiB while a sink lags far behind."""

    def __init__(self, width: int) -> None:
        if width < 1:
            raise ValueError("a checkpoint table needs at least one sink")
        self.width = width
        self.entries: dict[str, int | list[int]] = {}  # never rebound: readers keep its .get

    def get(self, index: int, uid: str) -> int:
        value = self.entries.get(uid, 0)
        return value if type(value) is int else value[index]  # type: ignore[index]

    def set(self, index: int, uid: str, n: int) -> None:
        entries = self.entries
        value = entries.get(uid)
        if isinstance(value, list):
            value[index] = n
            if value.count(n) == self.width:  # every sink agrees again: one int
                if n:
                    entries[uid] = n
                else:
                    del entries[uid]
        elif value == n or (value is None and not n):
            return
        elif self.width == 1:
            if n:
                entries[uid] = n
            else:
                del entries[uid]
        else:
            row = [value or 0] * self.width
            row[index] = n
            entries[uid] = row

    def share_keys(self, uids: Iterable[str]) -> int:
        """Key the entries of these uids on these very strings (the tracker's). Entries read from a
        backend after a restart are keyed on strings of their own: one more copy per event (~100
        bytes) for as long as the event lives. Returns the number of entries re-keyed."""
        entries = self.entries
        rekeyed = {uid: value for uid in uids if (value := entries.get(uid)) is not None}
        if rekeyed:
            # Rebuilt, not popped and re-inserted one by one (that doubles the dict's table); the
            # same dict object, as readers keep its .get.
            rest = [(uid, value) for uid, value in entries.items() if uid not in rekeyed]
            entries.clear()
            entries.update(rekeyed)
            entries.update(rest)
        return len(rekeyed)

    def view(self, index: int) -> dict[str, int]:
        """One sink's entries (for its backend's snapshot and for tests)."""
        out: dict[str, int] = {}
        for uid, value in self.entries.items():
            n = value if type(value) is int else value[index]  # type: ignore[index]
            if n:
                out[uid] = n
        return out


class SinkCheckpoint:
    """The in-memory view used by a pipeline (its column of a CheckpointTable, shared with the other
    sinks of the router, or a table of its own), persisted through a backend."""

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

        def accepted(uid: str) -> int:
            value = get(uid, 0)
            return value if type(value) is int else value[index]  # type: ignore[index]

        self.accepted = accepted
        for uid, n in backend.load().items():
            if n > 0:
                self.table.set(index, uid, n)
        self.compact_every = compact_every
        self._since_compact = 0

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
            self.backend.record(fresh)
            self._note(len(fresh))

    def forget(self, uids: Iterable[str]) -> None:
        table, index = self.table, self.index
        gone = []
        for uid in uids:
            if table.get(index, uid):
                table.set(index, uid, 0)
                gone.append(uid)
        if gone:
            self.backend.remove(gone)
            self._note(len(gone))

    def prune(self, live: Container[str]) -> int:
        """Drop entries for events the API server no longer holds (after a complete list)."""
        table, index = self.table, self.index
        gone = [uid for uid in table.entries if uid not in live and table.get(index, uid)]
        for uid in gone:
            table.set(index, uid, 0)
        if gone:
            self.backend.compact(self.state)
            self._since_compact = 0
        return len(gone)

    def _note(self, lines: int) -> None:
        self._since_compact += lines
        if self._since_compact >= self.compact_every:
            try:
                self.backend.compact(self.state)
            except OSError as exc:  # the journal still holds everything; try again later
                log.error("checkpoint compaction failed: %s", exc)
            self._since_compact = 0

    def close(self) -> None:
        self.backend.close(self.state)
