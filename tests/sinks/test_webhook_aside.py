"""webhook sink through the engine: a record the receiver fails on (both modes) and redirects.

Against the project's WebhookReceiver, through the engine's own Pipeline (``pipeline_for``): its
backoff, set-aside retries (``defer``) and dead letters."""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from eventrouter import Occurrence, SinkContext
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import Knobs, drained, pipeline_for
from eventrouter.testing.receivers.webhook import RecordedRequest, WebhookReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink

LOG = logging.getLogger("test.webhook.aside")
NAME = "webhook"
FAST: Knobs = {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.05}


@asynccontextmanager
async def engine(
    options: dict[str, Any], metrics: Metrics, dead: Path, **knobs: Any
) -> AsyncIterator[Pipeline]:
    """A running Pipeline of a webhook sink; drained and stopped on the way out."""
    # The sink's budget from the engine's send_timeout, as the router gives it.
    timing = {"send_timeout": knobs["send_timeout"]} if "send_timeout" in knobs else {}
    sink = WebhookSink(WebhookOptions.model_validate(options), SinkContext(NAME, "t", None, LOG, **timing))
    pipeline = pipeline_for(NAME, sink, metrics, dead, **{**FAST, **knobs})
    async with drained(pipeline):
        yield pipeline


def records(request: RecordedRequest) -> list[dict[str, Any]]:
    body = request.json()
    return body if isinstance(body, list) else [body]


def taken(requests: Iterable[RecordedRequest]) -> list[tuple[str, int]]:
    """(uid, occurrence) of every record the receiver accepted, in the order it took them."""
    return [
        (r["uid"], r["occurrence"])
        for request in requests
        if request.status is not None and 200 <= request.status < 300
        for r in records(request)
    ]


def keys(occurrences: Iterable[Occurrence]) -> list[tuple[str, int]]:
    return [(o.uid, o.number) for o in occurrences]


def aside(pipeline: Pipeline) -> set[tuple[str, int]]:
    """What the engine holds set aside (``defer``) now."""
    return {(o.uid, o.number) for _, _, o in pipeline._deferred}


def count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def sends(metrics: Metrics) -> float:
    """The engine's send calls so far (one per attempt)."""
    value = metrics.registry.get_sample_value("eventrouter_sink_send_duration_seconds_count", {"sink": NAME})
    return value or 0.0


@pytest.mark.parametrize("where", [0, 57], ids=["first", "middle"])
async def test_batch_mode_sets_aside_a_record_the_receiver_fails_on_while_the_rest_goes_in_once_in_order(
    tmp_path: Path, where: int
) -> None:
    """mode=batch (the default), a receiver that answers 500 to one payload (a bug of its own) and
    takes the rest. Its batch was answered retry whole and retried in place for ever: 0 of 199
    delivered, every later batch waiting behind it. Now the batch is halved down to that record,
    which waits aside (its own backoff) while the rest goes in, once and in order: first in the
    first batch (every part holding it fails) or in the middle of the third. A receiver down for
    everything costs two requests an attempt and sets nothing aside."""
    occs = [make_occurrence(object_name=f"pod-{i}", message=f"event {i}") for i in range(200)]
    poison = occs[where] = make_occurrence(object_name=f"pod-{where}", message="poison pill")
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        async with engine({"url": hook.url}, metrics, tmp_path / "dead", batch_max_events=20) as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 199)
            assert taken(hook.requests) == keys(o for o in occs if o is not poison)  # once each, in order
            await until(lambda: aside(pipeline) == {(poison.uid, poison.number)})  # (not when it is sent)
            assert count(metrics.sink_up, NAME) == 1

            # Down for everything: two requests an attempt (the batch or its first record, and a
            # probe), nothing else set aside, the sink down.
            hook.fail_matching(lambda body: True, 503)
            later = [make_occurrence(object_name=f"later-{i}") for i in range(20)]
            requests_before, sends_before = len(hook.requests), sends(metrics)
            for occ in later:
                pipeline.offer(occ)
            await until(lambda: sends(metrics) >= sends_before + 6 and count(metrics.sink_up, NAME) == 0)
            down = hook.requests[requests_before:]
            # (At most one send may be under way: its requests are in, its count not yet.)
            assert len(down) <= 2 * (sends(metrics) - sends_before + 1), [len(records(r)) for r in down]
            assert aside(pipeline) <= {(poison.uid, poison.number)}

            hook.fail_matching(lambda body: b"poison" in body, 500)  # up again, but for that one
            await until(lambda: count(metrics.delivered, NAME) == 219)
            assert Counter(taken(hook.requests)[199:]) == Counter(keys(later))
            await until(lambda: aside(pipeline) == {(poison.uid, poison.number)})

            hook.fail_matching(None)  # the receiver's bug fixed
            await until(lambda: count(metrics.delivered, NAME) == 220)
    assert Counter(taken(hook.requests)) == Counter(keys([*occs, *later]))  # each once
    assert count(metrics.dead_lettered, NAME, "rejected") == 0
    assert count(metrics.dead_lettered, NAME, "retries_exhausted") == 0


async def test_batch_mode_holds_later_occurrences_of_an_event_behind_its_record_set_aside(
    tmp_path: Path,
) -> None:
    """The record the receiver fails on is the first occurrence of an event whose second is in the
    same batch: the second waits aside with it (held, no failed attempt), so that the event's
    occurrences go in in order once the first is taken; the others go in meanwhile."""
    uid = str(uuid.uuid4())
    first = make_occurrence(uid=uid, object_name="x", count=1, message="poison pill")
    second = make_occurrence(uid=uid, object_name="x", count=2, message="again")
    others = [make_occurrence(object_name=f"pod-{i}") for i in range(4)]
    occs = [first, *others[:2], second, *others[2:]]
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        async with engine({"url": hook.url}, metrics, tmp_path / "dead") as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 4)
            assert taken(hook.requests) == keys(others)
            await until(lambda: aside(pipeline) == {(uid, 1), (uid, 2)})
            assert (uid, 2) not in taken(hook.requests)
            hook.fail_matching(None)
            await until(lambda: count(metrics.delivered, NAME) == 6)
    assert taken(hook.requests) == [*keys(others), (uid, 1), (uid, 2)]


async def test_event_mode_holds_later_occurrences_of_an_event_behind_its_record_set_aside(
    tmp_path: Path,
) -> None:
    """mode=event, [X/1 poison, a, b, X/2, c]: the probe after X/1 was simply the next event, and X/2
    (same event, later count) went in while X/1 waited aside: the receiver took X/2 before X/1. Now
    the probe is never of X's event and X/2 waits aside with X/1 (held), so X's occurrences go in in
    order once the fault is lifted; a, b and c go in meanwhile, once each and in order."""
    uid = str(uuid.uuid4())
    first = make_occurrence(uid=uid, object_name="x", count=1, message="poison pill")
    second = make_occurrence(uid=uid, object_name="x", count=2, message="again")
    others = [make_occurrence(object_name=f"pod-{i}") for i in range(3)]
    occs = [first, *others[:2], second, others[2]]
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        async with engine({"url": hook.url, "mode": "event"}, metrics, tmp_path / "dead") as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 3)
            await until(lambda: aside(pipeline) == {(uid, 1), (uid, 2)})
            assert taken(hook.requests) == keys(others)
            hook.fail_matching(None)
            await until(lambda: count(metrics.delivered, NAME) == 5)
    assert taken(hook.requests) == [*keys(others), (uid, 1), (uid, 2)]
    assert count(metrics.dead_lettered, NAME, "rejected") == 0


async def test_event_mode_sets_aside_almost_nothing_at_a_receiver_that_flaps(tmp_path: Path) -> None:
    """mode=event, a receiver failing 30% of requests at random (503, seeded): a record failing alone
    once, its probe taken, was set aside, and the flap made that 85-102 of 400 good events a run,
    each waiting its own backoff. Now one is set aside only after failing alone on both sides of a
    request of others taken, and only when every failed request of its send carried one: the rest
    is retried in place. Every event goes in once."""
    occs = [make_occurrence(object_name=f"pod-{i}") for i in range(400)]
    rng = random.Random(20240528)
    seen_aside: set[tuple[str, int]] = set()
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        options = {"url": hook.url, "mode": "event"}
        # A backoff long enough that what is set aside is still there at the next request.
        knobs: dict[str, Any] = {"retry_initial_backoff": 0.05, "retry_max_backoff": 0.1}
        async with engine(options, metrics, tmp_path / "dead", batch_max_events=20, **knobs) as pipeline:

            def flap(body: bytes) -> bool:
                seen_aside.update(aside(pipeline))  # at every request: what waits aside now
                return rng.random() < 0.3

            hook.fail_matching(flap, 503)
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 400, timeout=30)
    assert sum(r.status == 503 for r in hook.requests) > 100  # it did flap
    assert Counter(taken(hook.requests)) == Counter(keys(occs))  # each once
    assert len(seen_aside) <= 12, len(seen_aside)  # (the code before: 85 and more)
    assert count(metrics.dead_lettered, NAME, "rejected") == 0


LOCATION_SECRETS = ("pa55-w0rd-9f", "s3cret-t0ken-q", "sig-7d1e")


@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_redirect_for_a_while_is_retried_never_dead_lettered_and_logged_once_without_secrets(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ingress switched to force-ssl-redirect, or a framework's trailing-slash redirect, for three
    requests. Rejected as a final 3xx, every event sent meanwhile was dead-lettered (batch: all 10;
    event: 3). Now retried (never followed), all 10 go in once, and one warning names the redirect
    and where it points, without the user info or query values of its Location."""
    user, token, sig = LOCATION_SECRETS
    location = f"https://admin:{user}@hook.example/hook/?token={token}&sig={sig}"
    occs = [make_occurrence(object_name=f"pod-{i}") for i in range(10)]
    metrics = Metrics()
    caplog.set_level(logging.WARNING)
    async with WebhookReceiver() as hook:
        hook.fail_next(3, 308, headers={"Location": location})
        async with engine({"url": hook.url, "mode": mode}, metrics, tmp_path / "dead") as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 10)
    assert count(metrics.dead_lettered, NAME, "rejected") == 0
    assert not (tmp_path / "dead").exists()
    assert Counter(taken(hook.requests)) == Counter(keys(occs))  # each once
    assert {r.method for r in hook.requests} == {"POST"}  # never followed as a GET
    # The sink's own warning (the engine's retry lines quote the reason too)
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOG.name and "redirect" in r.getMessage()]
    assert f"HTTP 308 redirect from {hook.url} to 'https://***@hook.example/hook/?token=***&sig=***'" in line
    assert "give url the address it points to" in line
    for secret in LOCATION_SECRETS:
        assert secret not in caplog.text


@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_redirect_that_lasts_is_dead_lettered_only_when_retries_run_out(
    tmp_path: Path, mode: str
) -> None:
    """A redirect that stays (the URL moved for good) is bounded by retry_max_attempts, as any retry:
    dead-lettered as retries exhausted with the redirect as its reason, two requests an attempt."""
    occs = [make_occurrence(object_name=f"pod-{i}") for i in range(5)]
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_next(100, 301, headers={"Location": "https://hook.example/new"})
        options = {"url": hook.url, "mode": mode}
        async with engine(options, metrics, tmp_path / "dead", retry_max_attempts=3) as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.dead_lettered, NAME, "retries_exhausted") == 5)
    assert count(metrics.dead_lettered, NAME, "rejected") == 0
    assert len(hook.requests) <= 2 * 3
    dead = (tmp_path / "dead").read_text()
    assert "retries exhausted after 3 attempts:" in dead
    assert f"HTTP 301 redirect from {hook.url} to 'https://hook.example/new' (not followed)" in dead


async def test_records_a_send_had_no_time_for_wait_aside_with_the_one_set_aside_not_behind_it(
    tmp_path: Path,
) -> None:
    """``mode=event``, 200 events with the record the receiver fails on first, a receiver taking
    0.1 s a request and a 3 s send: each send sets the failing record aside and has no time for most
    of the rest. Those were retried in place, which took the record set aside back in place with
    them, at the head of every resend: at ``retry_max_attempts=3`` 161 records were dead-lettered
    with it, 130 of them never sent (a session 28 review; with no limit, the rest waited a doubling
    backoff). What a send had no time for now waits aside too, due at once, no attempt counted."""
    occs = [make_occurrence(object_name=f"pod-{i}", message=f"event {i}") for i in range(200)]
    occs[0] = make_occurrence(object_name="pod-0", message="poison pill")
    metrics = Metrics()
    async with WebhookReceiver(delay=0.1) as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        options = {"url": hook.url, "mode": "event", "timeout": 1.0}
        knobs = {"batch_max_events": 200, "send_timeout": 3.0, "retry_max_attempts": 3}
        async with engine(options, metrics, tmp_path / "dead", **knobs) as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.delivered, NAME) == 199, timeout=60)
            await until(lambda: count(metrics.dead_lettered, NAME, "retries_exhausted") == 1, timeout=30)
    assert taken(hook.requests) == keys(occs[1:])  # once each, in order
    assert count(metrics.dead_lettered, NAME, "rejected") == 0
