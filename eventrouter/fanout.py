"""Hands each occurrence to every sink pipeline. Never blocks: each pipeline queues on its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from eventrouter.engine.checkpoint import CheckpointTable
from eventrouter.engine.pipeline import Pipeline
from eventrouter.record import Occurrence

__all__ = ["ROOM_WAIT", "UNSEEN_KEEP", "Fanout", "UnseenFile", "UnseenStore"]

log = logging.getLogger(__name__)

UNSEEN_KEEP = 2 * 3600.0
"""Seconds the checkpoint entry of an event a scoped watch no longer sees is kept. Twice the API
server's default ``--event-ttl`` (1 h): an event still alive after that was written again since, with
a higher count (a new occurrence), unless the cluster keeps Events longer."""

ROOM_WAIT = 60.0
"""Seconds a bulk intake waits for a working sink that takes nothing from its queue meanwhile
(``Fanout.wait_for_room``); a sink that keeps taking batches is waited for as long as it takes."""


class UnseenStore(Protocol):
    """Where a scoped watch keeps, across restarts, when it first missed each event (wall-clock
    seconds). Kept in memory only, every restart noted them all again at its own start: a router
    restarted more often than UNSEEN_KEEP (rollouts, OOM kills, failovers) never dropped the entries
    of deleted events, and its checkpoint grew without bound."""

    def load_unseen(self) -> dict[str, float]: ...

    def save_unseen(self, unseen: Mapping[str, float]) -> None: ...


class UnseenFile:
    """``<data-dir>/checkpoints/unseen.times``: ``uid seconds`` lines, replaced atomically, written at
    each prune (when changed) and at stop. Losing it (unreadable, a full disk) only makes the entries
    of unseen events wait one more keep period from the next start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: dict[str, float] | None = None  # what the file holds, when known
        self._failing = False

    def load_unseen(self) -> dict[str, float]:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning(
                "cannot read %s (%s): the entries of events the scoped watch does not see are kept for "
                "%s from now",
                self.path,
                exc.strerror or exc,
                _duration(UNSEEN_KEEP),
            )
            return {}
        unseen: dict[str, float] = {}
        skipped = 0
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isascii() and parts[1].isdigit():
                unseen[parts[0]] = float(parts[1])
            elif parts:
                skipped += 1
        if skipped:
            log.warning("%s: skipped %d unreadable lines", self.path, skipped)
        self._saved = dict(unseen)
        return unseen

    def save_unseen(self, unseen: Mapping[str, float]) -> None:
        if unseen == self._saved:
            return
        snapshot = dict(unseen)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            if not snapshot:  # an unscoped watch, or every entry gone: no file
                self.path.unlink(missing_ok=True)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write("".join(f"{uid} {int(since)}\n" for uid, since in snapshot.items()))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._failing:  # once per episode: retried at every prune
                log.warning(
                    "cannot write %s (%s): after a restart the entries of events the scoped watch does "
                    "not see are kept for %s more",
                    self.path,
                    exc.strerror or exc,
                    _duration(UNSEEN_KEEP),
                )
            self._failing = True
            return
        self._failing = False
        self._saved = snapshot


class Fanout:
    def __init__(
        self,
        pipelines: Sequence[Pipeline],
        *,
        scoped: bool = False,
        selective: bool = False,
        unseen_store: UnseenStore | None = None,
    ) -> None:
        self.pipelines = list(pipelines)
        # A watch limited to namespaces or by a selector lists only part of the events: those it
        # does not list may be alive (another namespace; a scope narrowed by an upgrade that is
        # rolled back). Their entries are kept for UNSEEN_KEEP instead of dropped at the next list,
        # which delivered them all again once the scope was widened. With a selector, a DELETED may
        # only mean "no longer selected" (a label changed): the entry is kept likewise.
        self.scoped = scoped or selective
        self.selective = selective
        self.unseen_keep = UNSEEN_KEEP
        self.room_wait = ROOM_WAIT
        # uid → when it was first not seen, in wall-clock seconds: the times outlive a restart
        # (``unseen_store``). A clock set back keeps entries longer; set forward, it drops them
        # earlier (an event that comes back into scope then is delivered again, not lost).
        # Never rebound: a ConfigMap store reads this very map at each write.
        self._unseen: dict[str, float] = {}
        self.unseen_store = unseen_store
        # Nothing is saved before the first prune: until then the store keeps what it holds (a
        # replay, which never prunes, must not rewrite it for its own sinks).
        self._saving = False
        if unseen_store is not None and self.scoped:
            now = time.time()
            tables = self._tables()
            for uid, since in unseen_store.load_unseen().items():
                # Entries gone meanwhile (an unscoped run, a prune) are not kept; a time in the
                # future (a clock set back) would keep its entry for ever.
                if any(uid in table.entries for table in tables):
                    self._unseen[uid] = min(since, now)

    def publish(self, occ: Occurrence) -> None:
        for pipeline in self.pipelines:
            pipeline.offer(occ)

    def needed(self, occ: Occurrence) -> bool:
        """False when no sink would take this occurrence: each has accepted it already (a relist after
        a restart) or filters it out. A sink filtering it never records it, so with a robot taking
        only Warnings beside Loki every Normal event was "needed" at every restart, and the sorted
        relist held ~90% of the retained events back (memory, its temporary file) once more."""
        for p in self.pipelines:
            if occ.number > p.checkpoint.accepted(occ.uid) and (p.predicate is None or p.predicate(occ)):
                return True
        return False

    async def wait_for_room(
        self,
        *,
        high_water: float = 0.5,
        max_wait: float | None = None,
        progress: Callable[[], object] | None = None,
    ) -> bool:
        """Bulk intake (a relist, a replay) pauses here while a *working* sink's memory queue is past
        ``high_water``, by count or by bytes (``Pipeline.backlogged``): catching up at the sinks' pace
        instead of dropping what does not fit. A failing
        sink never holds it up (it spills or drops, counted), and the live watch never waits here.
        A sink with a disk spool holds it up for ``INTAKE_PATIENCE`` seconds in all; after that the
        rest of the intake waits in its spool (until it has caught up once more).
        Returns False when a sink it waits for took nothing from its queue for ``max_wait``
        (``room_wait``): the intake goes on, the queues bound memory. A sink that keeps taking batches
        is waited for however long that takes: ``max_wait`` in all, intakes taking turns (a watcher per
        namespace) each waited longer than that for a slow sink, went on unchecked, and the queue
        overflowed. ``progress`` is called each time a sink waited for takes a batch.

        Returns True only from a pass that found no sink to wait for, with no await after it: the
        caller's next (synchronous) hand-on is then admitted atomically. Several intakes (a watcher per
        namespace, relisting together) wake together when a queue falls below ``high_water``; returning
        after one wait per sink, each handed on a page and the queue overflowed."""
        quiet_max = self.room_wait if max_wait is None else max_wait
        while True:
            # A sink with a spool whose patience is spent is not waited for: its overflow spills.
            busy = [
                p
                for p in self.pipelines
                if p.backlogged(high_water) and not (p.can_spill and p.intake_patience <= 0)
            ]
            if not busy:
                return True
            for p in busy:
                # Each wait is for the sink's next batch, not for all the room: one slow sink in a
                # turn of several intakes is waited for as long as it keeps taking batches.
                limit = quiet_max
                patient = p.can_spill
                if patient:
                    if p.intake_patience <= 0:
                        continue
                    limit = min(limit, p.intake_patience)
                started = time.monotonic()
                try:
                    async with asyncio.timeout(limit):
                        await p.room_or_batch(high_water)
                except TimeoutError:
                    if limit >= quiet_max:
                        log.warning(
                            "sink %s took nothing from its queue for %.0fs; relist goes on", p.name, quiet_max
                        )
                        return False
                    log.info(
                        "sink %s is slower than the relist: the rest of it waits in its disk spool", p.name
                    )
                else:
                    if progress is not None:
                        progress()
                finally:
                    if patient:
                        p.intake_patience = max(0.0, p.intake_patience - (time.monotonic() - started))

    def forget(self, uids: Iterable[str]) -> None:
        """The events were deleted (TTL): their checkpoint entries are no longer needed."""
        if self.selective:
            self._note_unseen(uids)
            return
        uids = list(uids)
        for pipeline in self.pipelines:
            pipeline.forget(uids)

    def share_keys(self, uids: Iterable[str]) -> None:
        """Key the checkpoint tables on the tracker's uid strings (once, after the first lists)."""
        for table in {id(p.checkpoint.table): p.checkpoint.table for p in self.pipelines}.values():
            table.share_keys(uids)

    def prune(self, live: Container[str]) -> None:
        """After a complete list: drop checkpoint entries of events the API server no longer holds
        (a scoped watch: of events not seen for ``unseen_keep``)."""
        self._saving = True
        for pipeline in self.pipelines:
            pipeline.listed()  # nothing listed before can be offered as new again
        if not self.scoped:
            for pipeline in self._prune_tables(live):
                pipeline.prune(live)
            self.save_unseen()  # empty: clears what a scoped run before this one kept
            return
        tables = self._tables()
        self._note_unseen(uid for table in tables for uid in table.entries if uid not in live)
        self.sweep(live)
        self.save_unseen()

    def _prune_tables(self, live: Container[str]) -> list[Pipeline]:
        """Prune each table whose every column is a pipeline's in one pass (``CheckpointTable.remove``:
        O(width) per uid, where a forget per sink recomputed the row each time). Returns the other
        pipelines, to prune one by one."""
        rest: list[Pipeline] = []
        by_table: dict[int, list[Pipeline]] = {}
        for pipeline in self.pipelines:
            by_table.setdefault(id(pipeline.checkpoint.table), []).append(pipeline)
        for members in by_table.values():
            table = members[0].checkpoint.table
            if sorted(p.checkpoint.index for p in members) != list(range(table.width)):
                rest.extend(members)
                continue
            dead = [uid for uid in table.entries if uid not in live]
            for pipeline in members:
                pipeline.note_pruned(dead)  # while the table still holds their numbers
            gone = table.remove(dead)
            for pipeline in members:
                pipeline.checkpoint.pruned(gone[pipeline.checkpoint.index])
        return rest

    def save_unseen(self) -> None:
        """Hand the first-unseen times to ``unseen_store`` (at each prune, and at stop), without the
        uids no checkpoint holds any more (a DELETED of a scoped watch without a selector)."""
        if self.unseen_store is None or not self._saving:
            return
        unseen = self._unseen
        if unseen:
            tables = self._tables()
            for uid in [uid for uid in unseen if not any(uid in table.entries for table in tables)]:
                del unseen[uid]
        self.unseen_store.save_unseen(unseen)

    def _tables(self) -> list[CheckpointTable]:
        return list({id(p.checkpoint.table): p.checkpoint.table for p in self.pipelines}.values())

    def _note_unseen(self, uids: Iterable[str]) -> None:
        now = time.time()
        unseen = self._unseen
        for uid in uids:
            unseen.setdefault(uid, now)

    def sweep(self, live: Container[str]) -> None:
        """Drop the entries of events not seen for ``unseen_keep`` (a scoped watch; periodic)."""
        if not self._unseen:
            return
        cutoff = time.time() - self.unseen_keep
        back = [uid for uid in self._unseen if uid in live]
        expired = [uid for uid, since in self._unseen.items() if since <= cutoff and uid not in live]
        for uid in back + expired:
            del self._unseen[uid]
        if expired:
            for pipeline in self.pipelines:
                pipeline.forget(expired)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"
