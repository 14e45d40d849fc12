"""Hands each occurrence to every sink pipeline. Never blocks: each pipeline queues on its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container, Iterable, Sequence

from eventrouter.engine.pipeline import Pipeline
from eventrouter.record import Occurrence

__all__ = ["Fanout"]

log = logging.getLogger(__name__)


class Fanout:
    def __init__(self, pipelines: Sequence[Pipeline]) -> None:
        self.pipelines = list(pipelines)

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
        uids = list(uids)
        for pipeline in self.pipelines:
            pipeline.forget(uids)

    def share_keys(self, uids: Iterable[str]) -> None:
        """Key the checkpoint tables on the tracker's uid strings (once, after the first lists)."""
        for table in {id(p.checkpoint.table): p.checkpoint.table for p in self.pipelines}.values():
            table.share_keys(uids)

    def prune(self, live: Container[str]) -> None:
        """After a complete list: drop checkpoint entries of events the API server no longer holds."""
        for pipeline in self.pipelines:
            pipeline.prune(live)
