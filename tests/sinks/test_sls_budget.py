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
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, SinkError
from eventrouter.engine.pipeline import Pipeline
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


def events(n: int, first: int = 0) -> list[Occurrence]:
    """``n`` occurrences of about 2 KB each as logs: 200 are 421 KB of protobuf."""
    return [
        make_occurrence(cluster="c1", object_name=f"pod-{i}", message=f"event {i} " + "x" * 300)
        for i in range(first, first + n)
    ]


def slow_pipeline(sink: SLSSink, metrics: Metrics, tmp_path: Path, **options: Any) -> Pipeline:
    """The engine with send_timeout 1 s (a budget of 0.83 s) and short backoffs."""
    return pipeline_for(
        "sls",
        sink,
        metrics,
        tmp_path / "dl",
        send_timeout=1.0,
        batch_max_events=500,
        retry_initial_backoff=0.01,
        retry_max_backoff=0.05,
        **options,
    )


def kinds(outcomes: Any) -> list[OutcomeKind]:
    return [o.kind for o in outcomes]


def refusals(receiver: SLSReceiver) -> list[str | None]:
    return [r.error_code for r in receiver.requests if r.method == "POST" and r.status != 200]


async def stop(pipeline: Pipeline, task: asyncio.Task[None]) -> None:
    pipeline.stop_now()  # what is left (before the fix: all of it) is not waited for
    pipeline.close()
    await asyncio.wait_for(task, 10)
    await pipeline.close_sink()


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


async def test_a_refusal_too_slow_to_split_within_a_send_still_gets_every_event_in_once(
    receiver: SLSReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 64 KiB body limit (a proxy's) refuses the batch of 200 (421 KB) after 0.3 s, with the
    engine's send_timeout at 1 s (a 0.83 s budget; as 9 s answers at the default 30 s): no half could
    start in the same send (twice the slowest answer was no longer left), so the whole batch was
    answered held and sent again at once, refused again, for ever: nothing stored, the sink up, no
    retry counted, nothing logged. Now a send that stores or refuses nothing is a failed attempt, and
    the size refused is remembered: each send starts at half of it, so three failed sends (421, 210,
    105 KB refused), then 25 logs a send. 200 more then: after 16 requests taken the limits double,
    and the larger first request refused at that pace is no failed attempt (the limits go back)."""
    caplog.set_level(logging.WARNING)
    sink = sls(receiver, send_timeout=1.0, request_timeout=0.5)
    receiver.max_raw_body = 64 * 1024
    receiver.delay = 0.3
    metrics = Metrics()
    pipeline = slow_pipeline(sink, metrics, tmp_path)
    occs = events(400)
    down: list[float] = []

    def delivered(n: int) -> Callable[[], bool]:
        def check() -> bool:
            if count(metrics.sink_up, "sls") == 0:
                down.append(time.monotonic())
            return count(metrics.delivered, "sls") >= n

        return check

    task = asyncio.create_task(pipeline.run())
    try:
        for occ in occs[:200]:
            pipeline.offer(occ)  # one batch
        await until(delivered(200), timeout=20)
        assert refusals(receiver) == ["PostBodyTooLarge"] * 3  # each size once, not at every send
        assert count(metrics.retries, "sls") == 3 * 200  # three failed attempts, then progress
        assert down  # the sink said so meanwhile
        for occ in occs[200:]:
            pipeline.offer(occ)
        await until(delivered(400), timeout=20)
    finally:
        await stop(pipeline, task)
    stored = Counter((log.fields["uid"], log.fields["occurrence"]) for log in receiver.logs())
    assert stored == {(occ.uid, str(occ.number)): 1 for occ in occs}  # each exactly once
    assert refusals(receiver) == ["PostBodyTooLarge"] * 4  # the limits raised once, refused once
    assert count(metrics.retries, "sls") == 3 * 200  # and that refusal was no failed attempt
    assert count(metrics.send_errors, "sls", "timeout") == 0
    assert sum(count(metrics.dead_lettered, "sls", why) for why in ("rejected", "retries_exhausted")) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warned if "no log stored or refused within a send's" in w]) == 1  # throttled
    assert len([w for w in warned if "as too large (PostBodyTooLarge)" in w]) == 1


async def test_sends_that_store_or_refuse_nothing_are_failed_attempts_up_to_retry_max_attempts(
    receiver: SLSReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same slow refusals with retry_max_attempts=2: the two sends that do nothing (421 and
    210 KB refused) are failed attempts, so the batch is dead-lettered with the reason, the sink is
    down and the retry is counted. Before, they were holds, sent again at once for ever: none of that
    happened, and nothing was logged."""
    caplog.set_level(logging.WARNING)
    sink = sls(receiver, send_timeout=1.0, request_timeout=0.5)
    receiver.max_raw_body = 64 * 1024
    receiver.delay = 0.3
    metrics = Metrics()
    pipeline = slow_pipeline(sink, metrics, tmp_path, retry_max_attempts=2)
    occs = events(200)
    task = asyncio.create_task(pipeline.run())
    try:
        for occ in occs:
            pipeline.offer(occ)
        await until(lambda: count(metrics.dead_lettered, "sls", "retries_exhausted") >= len(occs), timeout=20)
        up = count(metrics.sink_up, "sls")
    finally:
        await stop(pipeline, task)
    assert refusals(receiver) == ["PostBodyTooLarge"] * 2 and not receiver.logs()
    assert up == 0
    assert count(metrics.retries, "sls") == len(occs)  # the first attempt's; the second is the last
    letters = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert sorted(letter["key"] for letter in letters) == sorted(occ.key for occ in occs)
    assert all(
        letter["reason"].startswith("retries exhausted after 2 attempts: no log stored or refused within")
        and "PostBodyTooLarge" in letter["reason"]
        for letter in letters
    )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warned if "no log stored or refused within a send's 0.833333s budget" in w]) == 1


def at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_log_time_refused_at_a_slow_sls_is_narrowed_down_across_sends_and_stamped(
    receiver: SLSReceiver, tmp_path: Path
) -> None:
    """The service's clock 700 s behind ours: of 50 events, the last, 250 s ahead, is refused
    (InvalidTimestamp), and so is every request carrying it, each after 0.3 s. Halving down to that
    log never got past the first refusal of a send, and the batch was held for ever. Now a request
    refused for its content and not halved down within a send is remembered: the next sends start
    with half as many logs (one send of two fails, the other gets a part in), and the log found, whose
    re-stamped request did not start in time, goes stamped at our now in the next send."""
    receiver.clock_offset = -700.0
    receiver.delay = 0.3
    sink = sls(receiver, send_timeout=1.0, request_timeout=0.5)
    metrics = Metrics()
    pipeline = slow_pipeline(sink, metrics, tmp_path)
    occs = [make_occurrence(cluster="c1", object_name=f"pod-{i}", message=f"fresh{i}") for i in range(49)]
    occs.append(make_occurrence(cluster="c1", last_timestamp=at(time.time() + 250), message="ahead"))
    task = asyncio.create_task(pipeline.run())
    try:
        for occ in occs:
            pipeline.offer(occ)
        await until(lambda: count(metrics.delivered, "sls") >= len(occs), timeout=20)
    finally:
        await stop(pipeline, task)
    stored = Counter(log.fields["message"] for log in receiver.logs())
    assert stored == {occ.record["message"]: 1 for occ in occs}
    assert [
        log.fields.get("time_adjusted") for log in receiver.logs() if log.fields["message"] == "ahead"
    ] == ["true"]
    assert sum(count(metrics.dead_lettered, "sls", why) for why in ("rejected", "retries_exhausted")) == 0


async def test_a_size_refused_is_remembered_across_sends_and_raised_again_after_requests_taken(
    receiver: SLSReceiver,
) -> None:
    """A 64 KiB limit (a proxy's): the first batch is halved down to it, and later batches go in
    pieces that size at once (before, each batch was refused and halved from scratch). The limit
    lifted, requests grow back to one a batch (doubled after every 16 taken), refused no more."""
    sink = sls(receiver, send_timeout=30)
    ours = receiver.max_raw_body
    receiver.max_raw_body = 64 * 1024
    try:
        assert kinds(await sink.send(events(200))) == [OutcomeKind.OK] * 200
        assert refusals(receiver) == ["PostBodyTooLarge"] * 3
        assert kinds(await sink.send(events(200, 200))) == [OutcomeKind.OK] * 200
        assert refusals(receiver) == ["PostBodyTooLarge"] * 3  # not refused again
        receiver.max_raw_body = ours
        requests = []
        for batch in range(40):
            before = len(receiver.requests)
            assert kinds(await sink.send(events(200, 400 + 200 * batch))) == [OutcomeKind.OK] * 200
            requests.append(len(receiver.requests) - before)
            if requests[-1] == 1:
                break
    finally:
        await sink.aclose()
    assert requests[-1] == 1 and requests[0] > 1, requests  # back to one request a batch
    assert refusals(receiver) == ["PostBodyTooLarge"] * 3
