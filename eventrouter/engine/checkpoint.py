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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

__all__ = ["CheckpointBackend", "FileCheckpoint", "MemoryCheckpoint", "SinkCheckpoint", "safe_name"]


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


class SinkCheckpoint:
    """The in-memory view used by a pipeline, persisted through a backend."""

    def __init__(self, backend: CheckpointBackend, *, compact_every: int = 50_000) -> None:
        self.backend = backend
        self.state = backend.load()
        self.compact_every = compact_every
        self._since_compact = 0

    def accepted(self, uid: str) -> int:
        return self.state.get(uid, 0)

    def ack(self, acks: Mapping[str, int]) -> None:
        fresh: dict[str, int] = {}
        for uid, n in acks.items():
            if n > self.state.get(uid, 0):
                self.state[uid] = n
                fresh[uid] = n
        if fresh:
            self.backend.record(fresh)
            self._note(len(fresh))

    def forget(self, uids: Iterable[str]) -> None:
        gone = [uid for uid in uids if self.state.pop(uid, None) is not None]
        if gone:
            self.backend.remove(gone)
            self._note(len(gone))

    def prune(self, live: set[str]) -> int:
        """Drop entries for events the API server no longer holds (after a complete list)."""
        gone = [uid for uid in self.state if uid not in live]
        for uid in gone:
            del self.state[uid]
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
