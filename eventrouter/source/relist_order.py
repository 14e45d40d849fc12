"""A relist's new occurrences, handed on oldest-first.

The API server lists Events in key order (namespace/name), so a relist after downtime hands the sinks
up to ``--event-ttl`` worth of events in random time order. Loki refuses entries more than an hour
behind the newest entry of their stream: sent in key order, a relist spanning more than an hour is
largely refused. Sorted by event time it is not, and every other sink sees events in the order they
happened.

A relist can hold the whole cluster's events, so beyond a small number they wait in an anonymous
temporary file (their raw JSON, as the spool keeps them); memory holds about 80 bytes per occurrence
for the sort. They are rebuilt from the raw JSON exactly as the source built them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Generator
from typing import IO

import orjson

from eventrouter.record import Occurrence, normalise

__all__ = ["RelistOrder"]


class RelistOrder:
    def __init__(self, *, cluster: str, directory: str | None = None, in_memory: int = 2_000) -> None:
        self.cluster = cluster
        self.directory = directory
        self.in_memory = in_memory
        # (time_ns, seq, uid, occurrence) while few, then (time_ns, seq, uid, (offset, length, received_at)).
        self._kept: list[tuple[int, int, str, Occurrence | tuple[int, int, float]]] = []
        self._file: IO[bytes] | None = None
        self._end = 0
        self._handed = 0  # entries of the sorted list already yielded by drain()

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, occ: Occurrence) -> None:
        seq = len(self._kept)  # ties keep list order
        if seq < self.in_memory:
            self._kept.append((occ.time_ns, seq, occ.uid, occ))
            return
        if self._file is None:
            # Deleted as soon as it is closed (or the process dies): nothing to clean up after a crash.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115 - lives across add/drain; close() ends it
                prefix="eventrouter-relist-", dir=self.directory
            )
        data = occ.raw_json
        self._file.write(data)
        self._kept.append((occ.time_ns, seq, occ.uid, (self._end, len(data), occ.received_at)))
        self._end += len(data)

    def not_handed_on(self) -> list[str]:
        """Event uids added but not yet yielded by ``drain``: a relist that fails must forget them in
        the tracker, or the next relist would not see them as new."""
        return [entry[2] for entry in self._kept[self._handed :]]

    def drain(self, page: int) -> Generator[list[Occurrence], None, None]:
        """Everything added, oldest first (event time, then list order), ``page`` at a time."""
        kept = self._kept
        kept.sort(key=lambda entry: (entry[0], entry[1]))
        self._handed = 0
        f = self._file
        if f is not None:
            f.flush()
        try:
            for start in range(0, len(kept), page):
                chunk: list[Occurrence] = []
                for _, _, _, held in kept[start : start + page]:
                    if isinstance(held, Occurrence):
                        chunk.append(held)
                        continue
                    assert f is not None
                    offset, length, received_at = held
                    f.seek(offset)
                    raw = f.read(length)
                    chunk.append(
                        normalise(
                            orjson.loads(raw), cluster=self.cluster, received_at=received_at, raw_json=raw
                        )
                    )
                self._handed = start + len(chunk)
                yield chunk
        finally:
            if self._handed >= len(kept):
                self.close()

    def close(self) -> None:
        self._kept = []
        self._handed = 0
        self._end = 0
        if self._file is not None:
            self._file.close()
            self._file = None
