"""Hands each occurrence to every sink pipeline. Never blocks: each pipeline queues on its own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from eventrouter.engine.pipeline import Pipeline
from eventrouter.record import Occurrence

__all__ = ["Fanout"]


class Fanout:
    def __init__(self, pipelines: Sequence[Pipeline]) -> None:
        self.pipelines = list(pipelines)

    def publish(self, occ: Occurrence) -> None:
        for pipeline in self.pipelines:
            pipeline.offer(occ)

    def forget(self, uids: Iterable[str]) -> None:
        """The events were deleted (TTL): their checkpoint entries are no longer needed."""
        uids = list(uids)
        for pipeline in self.pipelines:
            pipeline.checkpoint.forget(uids)

    def prune(self, live: set[str]) -> None:
        """After a complete list: drop checkpoint entries of events the API server no longer holds."""
        for pipeline in self.pipelines:
            pipeline.checkpoint.prune(live)
