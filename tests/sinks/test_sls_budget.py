"""SLS sink: a send keeps within the engine's send budget, against the project's SLS receiver held slow.

The engine cuts a send off after ``send_timeout`` and sends its whole batch again. A batch the sink
splits into several PutLogs requests (30 s ``request_timeout`` each by default) outlasted it at a slow
service: the parts stored before the cutoff were stored again at every attempt, and the rest never.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter import RetryableError, SinkContext, SinkError
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.sls import SLSOptions, SLSSink

PROJECT = "k8s-log-c1"
LOGSTORE = "k8s-event"
KEY_ID = "LTAI5tTestKeyId"
SECRET = "s3cr3t-Value-9f8e7d"
LOGGER = "test.sls.budget"


@pytest.fixture
async def receiver() -> AsyncIterator[SLSReceiver]:
    async with SLSReceiver(projects={PROJECT: [LOGSTORE]}, keys=[AccessKey(KEY_ID, SECRET)]) as r:
        yield r


def sls(receiver: SLSReceiver, send_timeout: float, **overrides: Any) -> SLSSink:
    values: dict[str, Any] = {
        "url": receiver.url,
        "project": PROJECT,
        "logStore": LOGSTORE,
        "accessKeyId": KEY_ID,
        "accessKeySecret": SECRET,
        **overrides,
    }
    context = SinkContext(
        name="sls", cluster="c1", data_dir=None, logger=logging.getLogger(LOGGER), send_timeout=send_timeout
    )
    return SLSSink(SLSOptions.model_validate(values), context)


def count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@pytest.mark.parametrize("split", ["by_the_sink", "halved_for_the_service"])
async def test_a_slow_sls_with_a_short_send_timeout_stores_every_event_exactly_once(
    receiver: SLSReceiver, tmp_path: Path, split: str
) -> None:
    """One batch of 200 at an SLS answering each request 0.1 s after storing it, with the engine's
    send_timeout at 1 s. by_the_sink: 20 logs a request (the sink's own bound lowered), 10 requests;
    halved_for_the_service: a 64 KiB body limit (a proxy's) halves the batch down to 8 requests taken
    and 7 refused. Either way 1.5 s or more: the engine cut the send off and sent the whole batch again,
    the stored parts stored again at every attempt, the rest never. Now a send starts no request that
    could outlast its budget, and the engine sends what it did not start again, at once."""
    occs = [
        make_occurrence(cluster="c1", object_name=f"pod-{i}", message=f"event {i} " + "x" * 300)
        for i in range(200)
    ]
    sink = sls(receiver, send_timeout=1.0, request_timeout=0.5)
    if split == "by_the_sink":
        sink.max_logs = 20
    else:
        receiver.max_raw_body = 64 * 1024
    receiver.delay = 0.1
    metrics = Metrics()
    pipeline = pipeline_for(
        "sls",
        sink,
        metrics,
        tmp_path / "dl",
        send_timeout=1.0,
        batch_max_events=500,
        retry_initial_backoff=0.01,
        retry_max_backoff=0.05,
    )
    task = asyncio.create_task(pipeline.run())
    try:
        for occ in occs:
            pipeline.offer(occ)  # one batch of 200
        # Before, every send was cut off (a timeout) and sent again whole: two show the copies.
        await until(
            lambda: (
                count(metrics.delivered, "sls") >= len(occs)
                or count(metrics.send_errors, "sls", "timeout") >= 2
            ),
            timeout=30,
        )
    finally:
        if count(metrics.delivered, "sls") < len(occs):
            pipeline.stop_now()  # it cannot drain: no waiting for it
        pipeline.close()
        await asyncio.wait_for(task, 10)
        await pipeline.close_sink()
    stored = Counter((log.fields["uid"], log.fields["occurrence"]) for log in receiver.logs())
    assert stored == {(occ.uid, str(occ.number)): 1 for occ in occs}  # each exactly once
    assert count(metrics.send_errors, "sls", "timeout") == 0
    assert count(metrics.delivered, "sls") == len(occs)
    assert sum(count(metrics.dead_lettered, "sls", why) for why in ("rejected", "retries_exhausted")) == 0
    if split == "halved_for_the_service":
        assert {r.error_code for r in receiver.requests if r.method == "POST"} == {None, "PostBodyTooLarge"}


async def test_a_request_timeout_longer_than_the_budget_is_cut_to_what_is_left(
    receiver: SLSReceiver,
) -> None:
    """request_timeout (30 s by default) over the engine's send_timeout: the request waited for an
    answer the engine no longer did (it cut the send off at send_timeout). It now ends with the send's
    budget (five sixths of send_timeout), as a retry naming what was left."""
    sink = sls(receiver, send_timeout=1.2)  # request_timeout: 30 s
    try:
        await sink.start()
        receiver.delay = 2.0
        began = time.monotonic()
        with pytest.raises(RetryableError, match=r"no answer within 1s?, what was left of the send's 1s"):
            await sink.send([make_occurrence(cluster="c1")])
        took = time.monotonic() - began
    finally:
        receiver.delay = 0.0
        await sink.aclose()
    assert 0.9 <= took < 1.2  # the budget, 1 s: before the engine's cutoff


async def test_a_request_timeout_over_send_timeout_is_warned_of_once(
    receiver: SLSReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning was said at every start, and the engine tries a failed start again and again (a
    logstore missing at start: once each backoff)."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    sink = sls(receiver, send_timeout=2.0, request_timeout=5, logStore="not-yet")
    try:
        for _ in range(3):
            with pytest.raises(SinkError, match="LogStoreNotExist"):
                await sink.start()
    finally:
        await sink.aclose()
    warnings = [r.getMessage() for r in caplog.records if "request_timeout=5s" in r.getMessage()]
    assert len(warnings) == 1
    assert "send_timeout=2s" in warnings[0] and "at most 1.66667s" in warnings[0]
