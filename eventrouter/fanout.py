"""Hands each occurrence to every sink pipeline. Never blocks: each pipeline queues on its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

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
        Returns False when ``max_wait`` ran out (the intake goes on; the queues bound memory)."""
        busy = [p for p in self.pipelines if p.backlogged(high_water)]
        if not busy:
            return True
        try:
            async with asyncio.timeout(max_wait):
                for p in busy:
                    await p.wait_for_room(high_water)
        except TimeoutError:
            log.warning(
                "sinks %s still backlogged after %.0fs; relist goes on",
                ", ".join(p.name for p in busy),
                max_wait,
            )
            return False
        return True

    def forget(self, uids: Iterable[str]) -> None:
        """The events were deleted (TTL): their checkpoint entries are no longer needed."""
        uids = list(uids)
        for pipeline in self.pipelines:
            pipeline.checkpoint.forget(uids)

    def prune(self, live: set[str]) -> None:
        """After a complete list: drop checkpoint entries of events the API server no longer holds."""
        for pipeline in self.pipelines:
            pipeline.checkpoint.prune(live)
