"""Hands each occurrence to every sink pipeline. Never blocks: each pipeline queues on its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container, Iterable, Sequence

from eventrouter.engine.pipeline import Pipeline
from eventrouter.record import Occurrence

__all__ = ["UNSEEN_KEEP", "Fanout"]

log = logging.getLogger(__name__)

UNSEEN_KEEP = 2 * 3600.0
"""Seconds the checkpoint entry of an event a scoped watch no longer sees is kept. Twice the API
server's default ``--event-ttl`` (1 h): an event still alive after that was written again since, with
a higher count (a new occurrence), unless the cluster keeps Events longer."""


class Fanout:
    def __init__(
        self, pipelines: Sequence[Pipeline], *, scoped: bool = False, selective: bool = False
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
        self._unseen: dict[str, float] = {}  # uid → when it was first not seen

    def publish(self, occ: Occurrence) -> None:
        for pipeline in self.pipelines:
            pipeline.offer(occ)

    def needed(self, occ: Occurrence) -> bool:
        """False when every sink's checkpoint already holds this occurrence (a relist after a restart)."""
        return any(occ.number > p.checkpoint.accepted(occ.uid) for p in self.pipelines)

    async def wait_for_room(self, *, high_water: float = 0.5, max_wait: float = 60.0) -> bool:
        """Bulk intake (a relist, a replay) pauses here while a *working* sink's memory queue is past
        ``high_water``: catching up at the sinks' pace instead of dropping what does not fit. A failing
        sink never holds it up (it spills or drops, counted), and the live watch never waits here.
        A sink with a disk spool holds it up for ``INTAKE_PATIENCE`` seconds in all; after that the
        rest of the intake waits in its spool (until it has caught up once more).
        Returns False when ``max_wait`` ran out (the intake goes on; the queues bound memory)."""
        busy = [p for p in self.pipelines if p.backlogged(high_water)]
        if not busy:
            return True
        deadline = time.monotonic() + max_wait
        for p in busy:
            patient = p.can_spill
            limit = deadline - time.monotonic()
            if patient:
                limit = min(limit, p.intake_patience)
            if limit <= 0 and patient:
                continue
            started = time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, limit)):
                    await p.wait_for_room(high_water)
            except TimeoutError:
                if not patient:
                    log.warning("sink %s still backlogged after %.0fs; relist goes on", p.name, max_wait)
                    return False
                log.info("sink %s is slower than the relist: the rest of it waits in its disk spool", p.name)
            finally:
                if patient:
                    p.intake_patience = max(0.0, p.intake_patience - (time.monotonic() - started))
        return True

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
        if not self.scoped:
            for pipeline in self.pipelines:
                pipeline.prune(live)
            return
        tables = {id(p.checkpoint.table): p.checkpoint.table for p in self.pipelines}.values()
        self._note_unseen(uid for table in tables for uid in table.entries if uid not in live)
        self.sweep(live)

    def _note_unseen(self, uids: Iterable[str]) -> None:
        now = time.monotonic()
        unseen = self._unseen
        for uid in uids:
            unseen.setdefault(uid, now)

    def sweep(self, live: Container[str]) -> None:
        """Drop the entries of events not seen for ``unseen_keep`` (a scoped watch; periodic)."""
        if not self._unseen:
            return
        cutoff = time.monotonic() - self.unseen_keep
        back = [uid for uid in self._unseen if uid in live]
        expired = [uid for uid, since in self._unseen.items() if since <= cutoff and uid not in live]
        for uid in back + expired:
            del self._unseen[uid]
        if expired:
            for pipeline in self.pipelines:
                pipeline.forget(expired)
