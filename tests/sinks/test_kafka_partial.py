"""Kafka: sends that partly fail. A partition whose batches the broker keeps refusing with a retriable
error, produce batches refused as a whole and sent again in pieces (slowly, over a slow network), slow
acknowledgements and a slow new producer, and one object's order through all of it. Tansu behind the
project's broker checks relay (faults added by ``kafka_faults.FaultyBroker``), records read back with
aiokafka."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from eventrouter import Occurrence, OutcomeKind, RetryableError
from eventrouter.testing import make_occurrence
from eventrouter.testing.kafka_relay import (
    as_the_engine_does,
    copies,
    engine,
    log_of,
    occurrence_of,
    relayed,
    started,
    stopped,
)
from eventrouter.testing.receivers.kafka_faults import (
    API_INIT_PRODUCER_ID,
    API_METADATA,
    API_PRODUCE,
    NOT_ENOUGH_REPLICAS,
    NOT_LEADER_OR_FOLLOWER,
    FaultyBroker,
)
from eventrouter.testing.receivers.tansu import TansuBroker
from eventrouter.testing.waiting import until
from eventrouter_sinks.kafka import KafkaSink


def every_fourth_too_old() -> list[Occurrence]:
    """200 records of one object, every 4th older than a topic with before_max_ms=600000 allows."""
    now = time.time()
    return [
        make_occurrence(
            object_name="web-0",
            message=f"m{i:04d} " + "x" * 2000,
            first_timestamp=iso(now - (1200 if i % 4 == 0 else 5)),
        )
        for i in range(200)
    ]


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.asynccontextmanager
async def renewing(
    kafka_sink: Callable[..., KafkaSink], prefix: str, *, send_timeout: float, request_timeout_ms: int
) -> AsyncIterator[tuple[KafkaSink, FaultyBroker, TansuBroker]]:
    """An idempotent sink (topics ``<prefix>-good`` and ``<prefix>-bad``, one partition each) whose
    first send was refused after taking a sequence number (a compacted topic needs keys): its next
    send starts a new producer."""
    async with relayed(
        f"{prefix}-good", f"{prefix}-bad", idempotence=True, compacted_topics=(f"{prefix}-bad",)
    ) as (broker, relay):
        sink = kafka_sink(
            relay,
            send_timeout=send_timeout,
            topic=f"{prefix}-{{namespace}}",
            key_by="none",
            request_timeout_ms=request_timeout_ms,
        )
        await sink.start()
        [refused] = await as_the_engine_does(sink, [make_occurrence(namespace="bad")])
        assert refused.kind is OutcomeKind.REJECT
        yield sink, relay, broker


def coroutine_of(task: asyncio.Task[Any]) -> str:
    return getattr(getattr(task.get_coro(), "cr_code", None), "co_qualname", "")


def aiokafka_tasks() -> list[str]:
    """The coroutines of aiokafka's own tasks still running."""
    return sorted(
        coroutine_of(task)
        for task in asyncio.all_tasks()
        if not task.done()
        and "aiokafka" in getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
    )


def two_topics() -> list[Occurrence]:
    return [
        make_occurrence(namespace=ns, object_name=f"{ns}-{i}") for i in range(10) for ns in ("good", "bad")
    ]


async def test_a_partition_answering_not_enough_replicas_writes_the_other_topics_records_once(
    kafka_sink: Callable[..., KafkaSink],
    tmp_path: Path,
) -> None:
    """The idempotent producer (the default) never expires a batch the broker answers with a retriable
    error: the send waited until the engine's send_timeout cut it off, and the engine sent the whole
    batch again, so the healthy topic's records, already acknowledged, were written at every attempt
    (3 copies each after 12 s). The send now ends within its budget: the acknowledged records OK, the
    refused partition's retried, its producer discarded unflushed."""
    refused = {"k8s-bad": NOT_ENOUGH_REPLICAS}
    async with relayed("k8s-good", "k8s-bad", idempotence=True, refuse=refused) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=2.0, topic="k8s-{namespace}")
        pipeline, metrics = engine(sink, tmp_path, retry_initial_backoff=0.1, retry_max_backoff=0.2)
        batch = two_topics()
        task = started(pipeline, batch)
        # Two failed attempts of the refused partition's ten records (since item 171 its retries keep
        # the producer: the sequence number is given back).
        await until(lambda: metrics.retries.labels("kafka")._value.get() >= 20, timeout=20)
        relay.refuse.clear()
        await pipeline.wait_idle(timeout=20)
        await stopped(pipeline, task)
        records = await log_of(broker.bootstrap, "k8s-good", "k8s-bad", at_least=20)
    assert copies(records) == {(f"k8s-{o.record['namespace']}", o.key): 1 for o in batch}
    assert metrics.send_errors.labels("kafka", "timeout")._value.get() == 0  # each send ended by itself
    assert metrics.delivered.labels("kafka")._value.get() == 20


async def test_a_stop_while_a_partition_is_refused_keeps_only_that_partitions_records(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path
) -> None:
    """A stop whose drain deadline ends the send (App.stop: stop_now, 1 s, cancel): the pipeline's
    leftovers, spooled and sent again after the restart, held the healthy topic's records too, although
    Kafka had them."""
    refused = {"k8s-bad": NOT_ENOUGH_REPLICAS}
    async with relayed("k8s-good", "k8s-bad", idempotence=True, refuse=refused) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=2.0, topic="k8s-{namespace}")
        pipeline, metrics = engine(sink, tmp_path, retry_initial_backoff=0.1)
        task = started(pipeline, two_topics())
        await until(lambda: metrics.delivered.labels("kafka")._value.get() == 10, timeout=10)
        # The refused records set aside and offered again (each send ends at the broker's refusal).
        await until(lambda: len(relay.refused) >= 2)
        pipeline.close()
        pipeline.stop_now()
        await asyncio.wait([task], timeout=1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        older, newer = pipeline.leftovers()
        await pipeline.close_sink()
        good = await log_of(broker.bootstrap, "k8s-good", at_least=10)
    assert len(good) == 10
    assert sorted(o.record["namespace"] for o in older + newer) == ["bad"] * 10


async def test_a_batch_refused_for_its_size_goes_again_in_halves_within_the_send(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path
) -> None:
    """A produce batch over the topic's max.message.bytes was sent again one record per batch: one round
    trip per record, a few hundred of them took longer than send_timeout over a 70 ms network; the
    engine sent the whole batch again and the same happened, each attempt writing ~400 more copies and
    never getting further. Halves: two more requests."""
    over_a_slow_network = {"max_message_bytes": 300_000, "answer_delay": 0.07}
    async with relayed("t", idempotence=True, **over_a_slow_network) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=3.0, topic="t")
        await sink.start()
        batch = [make_occurrence(object_name="web-0", message=f"m{i:04d} " + "x" * 1500) for i in range(500)]
        outcomes = await as_the_engine_does(sink, batch)
        await sink.aclose()
        records = await log_of(broker.bootstrap, "t", at_least=len(batch))
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * len(batch)
    assert [occurrence_of(r) for r in records] == [o.key for o in batch]  # once each, in order
    # Both produce batches (512 KiB and the rest, ~330 KiB) once each; their halves fit.
    assert [message.split(":")[0] for _, _, message in relay.refused] == [
        "The request included a message larger than the max message size the server will accept"
    ] * 2


async def test_a_slow_fallback_ends_each_send_in_its_budget_and_every_record_goes_in_once(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Many records the topic refuses (older than its log.message.timestamp.before.max.ms) in one
    object's relist: each is found and sent again with the send time, one round trip at a time, longer
    than send_timeout. Each send now stops in its budget: what went in is OK, the rest comes back as a
    hold (sent again at once, no failed attempt), so every attempt gets further and nothing is written
    twice; with ``retry_max_attempts=1`` nothing is dead-lettered."""
    caplog.set_level(logging.INFO, logger="test.kafka")
    async with relayed("t", before_max_ms=600_000, answer_delay=0.02) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=2.0, topic="t", idempotence=False)
        pipeline, metrics = engine(sink, tmp_path, retry_max_attempts=1, retry_initial_backoff=0.05)
        batch = every_fourth_too_old()
        task = started(pipeline, batch)
        await pipeline.wait_idle(timeout=60)
        await stopped(pipeline, task)
        records = await log_of(broker.bootstrap, "t", at_least=len(batch))
    assert [occurrence_of(r) for r in records] == [o.key for o in batch]  # once each, in order
    assert metrics.dead_lettered.labels("kafka", "retries_exhausted")._value.get() == 0
    assert metrics.send_errors.labels("kafka", "timeout")._value.get() == 0
    assert metrics.retries.labels("kafka")._value.get() == 0  # holds, no failed attempt
    assert "records not sent within this send's time budget" in caplog.text  # more than one send
    adjusted = [r for r in records if dict(r.headers).get("time_adjusted") == b"true"]
    assert len(adjusted) == 50


@pytest.mark.parametrize("idempotence", [True, False], ids=["idempotent", "plain"])
@pytest.mark.parametrize("refusal", ["size", "timestamp"])
async def test_records_sent_again_after_a_refused_batch_keep_one_objects_order(
    kafka_sink: Callable[..., KafkaSink], idempotence: bool, refusal: str
) -> None:
    """Two produce batches of one partition refused as a whole (over max.message.bytes, or holding
    records older than the topic allows): their records went again in one lane per refused batch,
    and the lanes were interleaved (batch index 0, 137, 1, 138, ...); a re-stamped record went after
    the records that followed it. Now a partition's batches go one after the other, each refused one
    replaced in its place by its pieces."""
    checks: dict[str, Any] = (
        {"max_message_bytes": 300_000} if refusal == "size" else {"before_max_ms": 600_000}
    )
    async with relayed("order", idempotence=idempotence, **checks) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=30.0, topic="order", idempotence=idempotence)
        await sink.start()
        now = time.time()
        batch = [
            make_occurrence(
                object_name="web-0",
                message=f"m{i:04d} " + "x" * 3000,
                first_timestamp=iso(now - (1200 if refusal == "timestamp" and i % 40 == 0 else 5)),
            )
            for i in range(330)
        ]
        outcomes = await as_the_engine_does(sink, batch)
        await sink.aclose()
        records = await log_of(broker.bootstrap, "order", at_least=len(batch))
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * len(batch)
    assert [occurrence_of(r) for r in records] == [o.key for o in batch]
    assert len(relay.refused) >= 2


async def test_a_send_that_settles_nothing_in_its_budget_counts_as_a_failed_attempt(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path
) -> None:
    """The same refusals at a broker answering after 0.2 s with the idempotent producer: a refusal
    costs a new producer, and no record settles within a 2 s send_timeout. Everything came back as a
    hold (sent again at once, no failed attempt): the sink stuck for good, reported up, no retry
    counted, retry_max_attempts never reached. Now such a send is a failed attempt."""
    async with relayed("t", idempotence=True, before_max_ms=600_000, answer_delay=0.2) as (_, relay):
        sink = kafka_sink(relay, send_timeout=2.0, topic="t")
        pipeline, metrics = engine(sink, tmp_path, retry_max_attempts=2, retry_initial_backoff=0.05)
        task = started(pipeline, every_fourth_too_old())
        exhausted = metrics.dead_lettered.labels("kafka", "retries_exhausted")
        delivered = metrics.delivered.labels("kafka")
        await until(lambda: exhausted._value.get() + delivered._value.get() == 200, timeout=60)
        assert metrics.retries.labels("kafka")._value.get() > 0
        await stopped(pipeline, task)


async def test_a_batch_handed_over_late_is_waited_for_past_the_budget_and_written_once(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """A new producer slow to get its id (after a refusal took the old one's sequence numbers) left the
    send's batch handed over at ~4 s of its 6.7 s budget (``send_timeout=8``), and acks=all with a slow
    follower acknowledged it 3 s later. It was given up at the budget's end, written all the same, and
    sent again: every record twice. Its produce request may be answered up to request_timeout_ms after
    it went: it is now waited for past the budget, within send_timeout."""
    async with renewing(kafka_sink, "ka", send_timeout=8.0, request_timeout_ms=6000) as (sink, relay, broker):
        relay.api_delays.update({API_INIT_PRODUCER_ID: 4.0, API_PRODUCE: 3.0})
        batch = [make_occurrence(namespace="good", object_name=f"web-{i}") for i in range(10)]
        outcomes = await as_the_engine_does(sink, batch)
        relay.api_delays.clear()
        retried = [o for o, outcome in zip(batch, outcomes, strict=True) if outcome.kind is OutcomeKind.RETRY]
        if retried:  # as the engine does: the same records again
            await as_the_engine_does(sink, retried)
        await sink.aclose()
        records = await log_of(broker.bootstrap, "ka-good", at_least=len(batch))
    assert copies(records) == {("ka-good", o.key): 1 for o in batch}
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * len(batch)


async def test_a_batch_whose_acknowledgement_would_come_too_late_is_not_handed_over(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """acks=all with a slow follower: every acknowledgement 2 s late, and a partition's three produce
    batches going one after the other in a 5 s budget (``send_timeout=6``). The third, handed over at
    ~4 s, was acknowledged at ~6 s: given up before, written all the same, and sent again. Now a batch
    whose answer, as slow as the send's slowest, would come after the send must end is not handed
    over: sent again at once (a hold), and every record is written once."""
    async with relayed("t", idempotence=True, api_delays={API_PRODUCE: 2.0}) as (broker, relay):
        # Produce batches of up to 8 KiB: three records of ~2.2 KB each.
        sink = kafka_sink(relay, send_timeout=6.0, topic="t", request_timeout_ms=3000, max_request_size=8192)
        await sink.start()
        batch = [make_occurrence(object_name="web-0", message=f"m{i:04d} " + "x" * 1500) for i in range(9)]
        first = await as_the_engine_does(sink, batch)
        pending = [o for o, outcome in zip(batch, first, strict=True) if outcome.kind is OutcomeKind.RETRY]
        for _ in range(3):  # as the engine does: what was held goes again at once
            if not pending:
                break
            outcomes = await as_the_engine_does(sink, pending)
            pending = [
                o for o, outcome in zip(pending, outcomes, strict=True) if outcome.kind is OutcomeKind.RETRY
            ]
        await sink.aclose()
        records = await log_of(broker.bootstrap, "t", at_least=len(batch))
    assert [occurrence_of(r) for r in records] == [o.key for o in batch]  # once each, in order
    assert [o.kind for o in first] == [OutcomeKind.OK] * 6 + [OutcomeKind.RETRY] * 3
    assert all(o.held for o in first[6:])


async def test_a_new_producer_slow_to_start_ends_the_send_within_its_budget(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path
) -> None:
    """After a refusal took the idempotent producer's sequence numbers, the next send starts a new
    producer, which waits for its producer id as long as the broker takes (aiokafka asks again after
    each request_timeout_ms): the send outlasted the engine's send_timeout at every attempt. The start
    now counts in the send's budget: the send ends by itself, nothing sent, as a failed attempt; once
    the broker hands out ids again every record goes in once."""
    compacted = ("kc-bad",)
    async with relayed("kc-good", "kc-bad", idempotence=True, compacted_topics=compacted) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=2.0, topic="kc-{namespace}", key_by="none")
        pipeline, metrics = engine(sink, tmp_path, retry_initial_backoff=0.1, retry_max_backoff=0.2)
        task = started(pipeline, [make_occurrence(namespace="bad")])
        await until(lambda: metrics.dead_lettered.labels("kafka", "rejected")._value.get() == 1)
        relay.api_delays[API_INIT_PRODUCER_ID] = 5.0
        batch = [make_occurrence(namespace="good", object_name=f"web-{i}") for i in range(10)]
        for occurrence in batch:
            pipeline.offer(occurrence)
        retryable = metrics.send_errors.labels("kafka", "retryable")
        timeout = metrics.send_errors.labels("kafka", "timeout")
        await until(lambda: retryable._value.get() + timeout._value.get() >= 2, timeout=20)
        relay.api_delays.clear()
        await pipeline.wait_idle(timeout=20)
        await stopped(pipeline, task)
        records = await log_of(broker.bootstrap, "kc-good", at_least=len(batch))
    assert copies(records) == {("kc-good", o.key): 1 for o in batch}
    assert timeout._value.get() == 0  # each send ended by itself
    assert metrics.delivered.labels("kafka")._value.get() == len(batch)


async def test_a_sink_closed_while_a_new_producer_bootstraps_leaves_no_connection_open(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """A new producer whose bootstrap metadata comes late (3 s): the send ends within its budget, the
    start going on for the next send. Closing the sink then cancels that start: aiokafka, cancelled in
    its bootstrap's metadata request, leaves that connection open (a ResourceWarning once collected);
    the bootstrap is let end first. Before, the send itself waited past the engine's send_timeout."""
    async with renewing(kafka_sink, "kd", send_timeout=2.0, request_timeout_ms=5000) as (sink, relay, _):
        relay.api_delays[API_METADATA] = 3.0
        with pytest.raises(RetryableError, match="a new producer did not start"):
            await as_the_engine_does(sink, [make_occurrence(namespace="good")])
        await sink.aclose()
    gc.collect()  # a connection left open warns here


async def test_a_batch_given_up_while_a_late_one_is_waited_for_is_written_once(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """A partition answering a retriable error that leaves the write open (NOT_LEADER_OR_FOLLOWER: its
    leader moving in a rolling restart; a NOT_ENOUGH_REPLICAS is given up at once) given up at the
    budget's end, while another partition's batch handed over late (acknowledgements 1.9 s apart, its
    fifth batch at ~7.6 s of a 10 s budget) was still waited for past it. Its producer, halted only when
    that wait ended, went on retrying the given-up batch: both partitions recovered at 9.5 s, the broker
    wrote it, and the engine, told retry, sent it again: two copies. A given-up batch is now judged
    again when the send ends, just before its producer is halted: acknowledged by then, it is OK."""
    faults: dict[str, Any] = {"refuse": {"g-bad": NOT_LEADER_OR_FOLLOWER}, "api_delays": {API_PRODUCE: 1.9}}
    async with relayed("g-good", "g-bad", idempotence=True, **faults) as (broker, relay):
        # Produce batches of up to 8 KiB: three records of ~2.2 KB each, five for "good".
        sink = kafka_sink(
            relay, send_timeout=12.0, topic="g-{namespace}", request_timeout_ms=6000, max_request_size=8192
        )
        await sink.start()
        batch = [make_occurrence(namespace="bad", object_name="a-0", message="a " + "x" * 1500)] + [
            make_occurrence(namespace="good", object_name="web-0", message=f"m{i:04d} " + "x" * 1500)
            for i in range(15)
        ]

        def worse() -> None:  # the request carrying "good"'s fifth batch meets the fault too
            relay.refuse["g-good"] = NOT_LEADER_OR_FOLLOWER
            relay.api_delays[API_PRODUCE] = 2.5

        def recovered() -> None:  # after that request went, before the budget ends
            relay.refuse.clear()
            relay.api_delays[API_PRODUCE] = 0.1

        loop = asyncio.get_running_loop()
        began = loop.time()
        loop.call_at(began + 7.0, worse)
        loop.call_at(began + 9.5, recovered)
        first = await as_the_engine_does(sink, batch)
        pending = [o for o, outcome in zip(batch, first, strict=True) if outcome.kind is not OutcomeKind.OK]
        for _ in range(3):  # as the engine does: what was not OK goes again
            if not pending:
                break
            outcomes = await as_the_engine_does(sink, pending)
            pending = [
                o for o, outcome in zip(pending, outcomes, strict=True) if outcome.kind is not OutcomeKind.OK
            ]
        await sink.aclose()
        records = await log_of(broker.bootstrap, "g-good", "g-bad", at_least=len(batch))
    assert copies(records) == {(f"g-{o.record['namespace']}", o.key): 1 for o in batch}
    assert [o.kind for o in first] == [OutcomeKind.OK] * len(batch)


async def test_a_stuck_partition_ends_the_send_at_its_budget_when_request_timeout_exceeds_it(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """Item 120's partition answering a retriable error for ever (NOT_LEADER_OR_FOLLOWER, which aiokafka
    retries; a NOT_ENOUGH_REPLICAS is given up at once), with request_timeout_ms over the send's budget
    (6 s, send_timeout=6: budget 5 s). Its batch, handed over at the send's start, was waited for as one
    handed over late, until send_timeout less the margin (5.5 s): at every send of the outage only 0.5 s
    was left before the engine's send_timeout, and a loop slow for that long had the engine send the
    whole batch again (the acknowledged records twice). A batch handed over in the budget's first half
    and unanswered at its end is now given up there."""
    refused = {"s-bad": NOT_LEADER_OR_FOLLOWER}
    async with relayed("s-good", "s-bad", idempotence=True, refuse=refused) as (_, relay):
        sink = kafka_sink(relay, send_timeout=6.0, topic="s-{namespace}", request_timeout_ms=6000)
        await sink.start()
        batch = two_topics()
        loop = asyncio.get_running_loop()
        began = loop.time()
        outcomes = await as_the_engine_does(sink, batch)
        took = loop.time() - began
        await sink.aclose()
    assert [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.RETRY] * 10
    assert took < sink.context.send_budget + 0.25  # before: send_timeout less the margin (5.5 s)


async def test_a_close_cut_off_while_a_new_producer_bootstraps_leaves_no_task_running(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """The sink closed as the engine closes it (``Pipeline._close_quietly``: ``aclose`` bounded by
    send_timeout) while a new producer's bootstrap metadata comes late (6 s, request_timeout_ms=8000).
    The bound cancelled ``aclose`` while the start let the bootstrap end, and ``gather`` cancelled the
    start again: the bootstrap, neither cancelled nor awaited, went on against the closed client, and
    its late answer started aiokafka's metadata synchronizer there, running for ever (reconnecting every
    metadata_max_age_ms). The start now ends in the background and always cancels its bootstrap."""
    async with renewing(kafka_sink, "ke", send_timeout=2.0, request_timeout_ms=8000) as (sink, relay, _):
        relay.api_delays[API_METADATA] = 6.0
        with pytest.raises(RetryableError, match="a new producer did not start"):
            await as_the_engine_does(sink, [make_occurrence(namespace="good")])
        relay.api_delays.clear()  # the bootstrap's answer stays late; later ones come at once
        starting = sink._starting
        bootstrap = [t for t in asyncio.all_tasks() if coroutine_of(t) == "AIOKafkaClient.bootstrap"]
        assert starting is not None and len(bootstrap) == 1
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(sink.context.send_timeout):  # as Pipeline._close_quietly
                await sink.aclose()
        await asyncio.wait([starting, *bootstrap], timeout=10)  # the bootstrap's late answer came
        with contextlib.suppress(TimeoutError):
            await until(lambda: not aiokafka_tasks(), timeout=1)
        assert aiokafka_tasks() == []
