"""A real engine Pipeline around a sink under test, and occurrences driven through it until its
dead-letter file holds them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypedDict, Unpack

import orjson

from eventrouter import Occurrence, Outcome, Sink, SinkContext
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.spool import Spool
from eventrouter.metrics import Metrics
from eventrouter.options import PipelineOptions
from eventrouter.testing.memory import MemorySink, MemorySinkOptions
from eventrouter.testing.waiting import until

__all__ = ["Knobs", "dead_letter", "drained", "pipeline_for", "sends_while_refused"]


class Knobs(TypedDict, total=False):
    """The PipelineOptions a test sets, typed one by one: with ``**options: Any`` beside ``spool=``
    a caller's ``**dict[str, float]`` would be checked against ``Spool | None`` (and refused)."""

    queue_max_events: int
    queue_max_bytes: int
    spool_max_bytes: int
    batch_max_events: int
    batch_max_bytes: int
    batch_max_wait: float
    retry_initial_backoff: float
    retry_max_backoff: float
    retry_max_attempts: int
    send_timeout: float


def pipeline_for(
    name: str,
    sink: Sink[Any],
    metrics: Metrics,
    deadletter: Path | None,
    *,
    spool: Spool | None = None,
    **options: Unpack[Knobs],
) -> Pipeline:
    """``sink`` behind the engine's own pipeline (its backoff, set-aside retries and dead letters in
    ``deadletter``, overflow in ``spool``), a batch taken at once, a memory checkpoint."""
    return Pipeline(
        name=name,
        sink=sink,
        options=PipelineOptions.model_validate({"batch_max_wait": 0.01, **options}),
        predicate=None,
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(deadletter, sink=name),
        metrics=metrics,
        spool=spool,
    )


@asynccontextmanager
async def drained(pipeline: Pipeline, timeout: float = 10.0) -> AsyncIterator[Pipeline]:
    """``pipeline`` running; on the way out drained within ``timeout`` seconds (else, a test failing,
    stopped at once) and its sink closed."""
    task = asyncio.create_task(pipeline.run())
    try:
        yield pipeline
    finally:
        pipeline.close()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        finally:
            if not task.done():
                pipeline.stop_now()
                await asyncio.wait_for(task, 5)
            await pipeline.close_sink()


async def dead_letter(
    name: str, sink: Sink[Any], directory: Path, steps: Sequence[tuple[Occurrence, str]]
) -> list[dict[str, Any]]:
    """Offer each occurrence of ``steps`` in turn to a Pipeline of ``sink`` (one attempt, no
    waiting for a batch) and await its dead-lettering for the reason given (``retries_exhausted``,
    ``rejected``); then stop and close the sink. Returns the dead-letter file's records."""
    metrics = Metrics()
    pipeline = pipeline_for(name, sink, metrics, directory, retry_max_attempts=1)
    task = asyncio.create_task(pipeline.run())
    expected: dict[str, int] = {}
    for occurrence, reason in steps:
        expected[reason] = expected.get(reason, 0) + 1
        pipeline.offer(occurrence)
        # Each dead-lettered before the next is offered: the file keeps the order of ``steps``.
        await until(_counted(metrics.dead_lettered.labels(name, reason), expected[reason]))
    pipeline.close()
    await asyncio.wait_for(task, 10)
    await pipeline.close_sink()
    return [orjson.loads(line) for line in directory.read_bytes().splitlines()]


def _counted(counter: Any, want: int) -> Callable[[], bool]:
    return lambda: bool(counter._value.get() == want)


async def sends_while_refused(
    outcome: Outcome, occurrences: Sequence[Occurrence], seconds: float = 1.0, **knobs: Unpack[Knobs]
) -> int:
    """The sends a pipeline makes in ``seconds`` to a memory sink answering ``outcome`` for every item,
    each send suspending as I/O does (a sink whose send never suspends froze the loop in a retry
    storm): a resend without its backoff shows as many more sends than the backoff allows."""
    context = SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("mem"))
    sink = MemorySink(MemorySinkOptions.model_validate({}), context)
    sink.decide = lambda _: outcome
    sink.delay = 1e-6
    pipeline = pipeline_for("mem", sink, Metrics(), None, **knobs)
    task = asyncio.create_task(pipeline.run())
    for occurrence in occurrences:
        pipeline.offer(occurrence)
    await asyncio.sleep(seconds)  # the time under test: the sends within it are counted
    sends = len(sink.batches)
    pipeline.stop_now()
    await asyncio.wait_for(task, 10)
    return sends
