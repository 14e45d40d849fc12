"""What the engine tells a sink about the memory it keeps set aside (``SinkContext.aside_max_events``,
item 298): a sink that sets items aside on purpose (the example HEC sink's events waiting for Splunk's
confirmation) could not see the pipeline's ``queue_max_events``, and past half of it without a spool
the engine dropped what the sink awaited."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest

from eventrouter import PipelineOptions, SinkContext
from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.pipeline import Pipeline
from eventrouter.options import QUEUE_DEFAULT
from eventrouter.testing.memory import MemorySink


class DeferringSink(MemorySink):
    """A sink that defers its retries (as the alert robots do): its holds are its whole queue."""

    defer_retries: ClassVar[bool] = True


async def built(tmp_path: Path | None, sink: type[MemorySink] = MemorySink, **options: Any) -> Pipeline:
    """The pipeline the router builds for one sink (its context as the engine makes it)."""
    spec = spec_for_class(sink, options, type_="memory")
    router = Router(RouterSettings(metrics_addr=None, data_dir=tmp_path), [spec])
    await router.start_pipelines()
    try:
        return router.pipelines[0]
    finally:
        await router.stop()


@pytest.mark.parametrize("queue", [None, 40, 4_000])
async def test_the_context_carries_what_the_pipeline_keeps_aside_without_a_spool(queue: int | None) -> None:
    """Without a spool the pipeline drops the oldest set aside past half its queue: the sink is told
    that bound, the pipeline's own (4,000 → 2,000; the default 10,000 → 5,000)."""
    options: dict[str, Any] = {} if queue is None else {"queue_max_events": queue}
    pipeline = await built(None, **options)
    context = pipeline.sink.context
    assert context.aside_max_events == pipeline._aside_max == (queue or QUEUE_DEFAULT) // 2


async def test_with_a_spool_nothing_set_aside_is_dropped_for_it(tmp_path: Path) -> None:
    """With a disk spool what is over the share is parked there: no bound (None)."""
    pipeline = await built(tmp_path, queue_max_events=40)
    assert pipeline.spool is not None and pipeline.sink.context.aside_max_events is None


async def test_a_data_dir_without_a_spool_keeps_the_bound(tmp_path: Path) -> None:
    """``spool_max_bytes=0``: a data dir (dead letters, checkpoints) but no spool: the bound stays."""
    pipeline = await built(tmp_path, queue_max_events=40, spool_max_bytes=0)
    assert pipeline.spool is None and pipeline.sink.context.aside_max_events == 20


async def test_a_sink_deferring_its_retries_is_told_its_whole_queue() -> None:
    pipeline = await built(None, DeferringSink, queue_max_events=40)
    assert pipeline._aside_max is None and pipeline.sink.context.aside_max_events == pipeline.queue_max == 40


def test_a_context_built_without_it_says_the_engines_default() -> None:
    """Plugins' own tests build SinkContext without it: the default is the engine's at its defaults."""
    context = SinkContext(name="s", cluster="c", data_dir=None, logger=logging.getLogger("test"))
    default = PipelineOptions.model_validate({}).queue_bound(spooled=False)
    assert context.aside_max_events == default // 2
