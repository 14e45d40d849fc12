"""Kafka: what a send had no time for, beside a record the same send set aside (a refused partition),
through the engine and as answered: the exposure item 192 found in the webhook sink.

Tansu behind the project's broker checks relay (``kafka_faults.FaultyBroker``): one topic refused with
NOT_ENOUGH_REPLICAS, every produce answer 0.3 s late (acks=all with a slow follower), and produce
batches of two records (``max_request_size=2048``), so a partition's records take several batches, one
after the other, and a 2.5 s budget sends only part of them. For a missing topic, the relay that
turns auto-create off (``kafka_no_autocreate``) in front of that one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson

from eventrouter import Occurrence, OutcomeKind
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
from eventrouter.testing.receivers.kafka_faults import API_PRODUCE, NOT_ENOUGH_REPLICAS, FaultyBroker
from eventrouter.testing.receivers.kafka_no_autocreate import NoAutoCreate
from eventrouter.testing.receivers.tansu import TansuBroker, free_port
from eventrouter.testing.waiting import until
from eventrouter_sinks.kafka import KafkaSink

SLOW_ACKS = {API_PRODUCE: 0.3}
SMALL_BATCHES = 2048  # max_request_size: two of these records a produce batch


def records(namespace: str, count: int, objects: int = 8) -> list[Occurrence]:
    """``count`` events of ``objects`` objects (so one key has several, in order) in ``namespace``."""
    return [
        make_occurrence(namespace=namespace, object_name=f"{namespace}-{i % objects}", message=f"m{i:03d}")
        for i in range(count)
    ]


async def test_records_a_send_had_no_time_for_wait_aside_beside_a_refused_partition_not_in_place(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path
) -> None:
    """One record of a refused partition and 64 healthy ones, a send sending ~16 of them in its budget.
    The rest was answered a hold in place, and the engine retries a whole batch in place when any of it
    is: the refused record came back at the head of every resend, each an attempt, and at
    ``retry_max_attempts=3`` the healthy records never sent were dead-lettered with its reason (20 of
    these 64 on the code before). What a send had no time for now waits aside too (due at once, no attempt
    counted): the 64 go in once each and in order, only the refused record is dead-lettered, and only
    its attempts are counted."""
    async with relayed("o-good", "o-bad", idempotence=True, api_delays=SLOW_ACKS) as (broker, relay):
        relay.refuse["o-bad"] = NOT_ENOUGH_REPLICAS
        sink = kafka_sink(
            relay,
            send_timeout=3.0,
            retry_wait_max=10.0,
            topic="o-{namespace}",
            max_request_size=SMALL_BATCHES,
        )
        pipeline, metrics = engine(
            sink,
            tmp_path,
            retry_max_attempts=3,
            retry_initial_backoff=0.2,
            retry_max_backoff=1.0,
            batch_max_events=100,
        )
        bad = make_occurrence(namespace="bad", object_name="bad-0")
        good = records("good", 64)
        delivered = metrics.delivered.labels("kafka")
        exhausted = metrics.dead_lettered.labels("kafka", "retries_exhausted")
        task = started(pipeline, [bad, *good])  # one batch, the refused record first
        try:
            # Each one delivered or dead-lettered (asserted below: which, and how).
            await until(lambda: delivered._value.get() + exhausted._value.get() == 65, timeout=60)
        finally:
            await stopped(pipeline, task)
        dead = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
        assert [line["key"] for line in dead] == [bad.key], f"{len(dead)} dead-lettered: {dead[-1]['reason']}"
        written = await log_of(broker.bootstrap, "o-good", "o-bad", at_least=64)
    assert dead[0]["reason"].startswith(
        "retries exhausted after 3 attempts: kafka: topic 'o-bad' partition 0"
    )
    assert copies(written) == {("o-good", o.key): 1 for o in good}  # nothing of o-bad
    assert [occurrence_of(r) for r in written] == [o.key for o in good]  # the partition's order
    assert delivered._value.get() == 64
    assert metrics.retries.labels("kafka")._value.get() == 2  # the refused record's, before its third
    assert metrics.send_errors.labels("kafka", "timeout")._value.get() == 0


async def test_what_a_send_had_no_time_for_waits_aside_only_beside_a_record_set_aside(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """The sink's answers. A send that set nothing aside keeps what it had no time for in place (a
    plain hold: sent next, at once, no attempt). Beside a record set aside (its partition refused),
    what it had no time for is a hold set aside too (``defer``), due at once, and noted in its
    partition's place: a newer record of that partition offered before it is held back behind it, and
    sent with it once it comes back, after it."""
    async with relayed("a-other", "a-good", "a-bad", idempotence=True, api_delays=SLOW_ACKS) as (
        broker,
        relay,
    ):
        relay.refuse["a-bad"] = NOT_ENOUGH_REPLICAS
        sink = kafka_sink(
            relay,
            send_timeout=3.0,
            retry_wait_max=10.0,
            topic="a-{namespace}",
            max_request_size=SMALL_BATCHES,
        )
        await sink.start()
        try:
            alone = await as_the_engine_does(sink, records("other", 30))
            bad = make_occurrence(namespace="bad", object_name="bad-0")
            good = records("good", 20)
            beside = await as_the_engine_does(sink, [bad, *good])
            unsent = [
                o for o, outcome in zip(good, beside[1:], strict=True) if outcome.kind is not OutcomeKind.OK
            ]
            newer = records("good", 1)
            before_them = await as_the_engine_does(sink, newer)
            with_them = await as_the_engine_does(sink, [*unsent, *newer])
        finally:
            await sink.aclose()
        written = await log_of(broker.bootstrap, "a-good", at_least=len(good) + 1)
    for outcomes, aside in ((alone, False), (beside[1:], True)):
        late = [o for o in outcomes if o.kind is not OutcomeKind.OK]
        assert 0 < len(late) < len(outcomes), [o.reason for o in outcomes]
        for o in late:
            assert o.kind is OutcomeKind.RETRY and o.held, o
            assert o.reason.startswith("kafka: not sent within this send's time budget"), o.reason
            assert o.defer is aside and o.retry_after == (0.0 if aside else None), o
    assert beside[0].kind is OutcomeKind.RETRY and beside[0].defer and not beside[0].held, beside[0]
    assert "refused the batch (NOT_ENOUGH_REPLICAS (19): nothing written)" in beside[0].reason
    [held] = before_them
    assert held.kind is OutcomeKind.RETRY and held.held and held.defer, held
    assert held.reason.startswith("kafka: held back while older records of its partition"), held.reason
    assert [o.kind for o in with_them] == [OutcomeKind.OK] * len(with_them), [o.reason for o in with_them]
    # Once each, in order: the newer record after those the first send had no time for.
    assert [occurrence_of(r) for r in written] == [o.key for o in [*good, *newer]]


async def test_what_a_send_had_no_time_for_waits_aside_beside_a_missing_topic(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """The same beside a topic the broker does not create (auto-create off), the sink having set
    nothing aside before (no partition refused, none waiting): what the send had no time for is set
    aside, due at once, and noted in its partition's place, so a newer record of it waits behind."""
    # The client -> auto-create off -> slow acknowledgements -> Tansu, which advertises the first.
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        FaultyBroker(
            listen_port=free_port(), target_port=broker.port, idempotence=True, api_delays=SLOW_ACKS
        ) as slow,
        NoAutoCreate(listen_port=port, target_port=slow.listen_port) as relay,
    ):
        await broker.create_topics("m-good", partitions=1)
        sink = kafka_sink(
            relay,
            send_timeout=3.0,
            retry_wait_max=10.0,
            topic="m-{namespace}",
            max_request_size=SMALL_BATCHES,
        )
        await sink.start()
        try:
            gone = make_occurrence(namespace="gone", object_name="gone-0")
            good = records("good", 24)  # ~16 sent in the budget: the rest and one more fit in the next
            beside = await as_the_engine_does(sink, [gone, *good])
            unsent = [
                o for o, outcome in zip(good, beside[1:], strict=True) if outcome.kind is not OutcomeKind.OK
            ]
            newer = records("good", 1)
            before_them = await as_the_engine_does(sink, newer)
            with_them = await as_the_engine_does(sink, [*unsent, *newer])
        finally:
            await sink.aclose()
        written = await log_of(broker.bootstrap, "m-good", at_least=len(good) + 1)
    assert beside[0].kind is OutcomeKind.RETRY and beside[0].defer and not beside[0].held, beside[0]
    assert beside[0].reason.startswith("kafka topic 'm-gone' does not exist"), beside[0].reason
    late = [o for o in beside[1:] if o.kind is not OutcomeKind.OK]
    assert 0 < len(late) < len(good), [o.reason for o in beside]
    for o in late:
        assert o.kind is OutcomeKind.RETRY and o.held and o.defer and o.retry_after == 0.0, o
    [held] = before_them
    assert held.kind is OutcomeKind.RETRY and held.held and held.defer, held
    assert [o.kind for o in with_them] == [OutcomeKind.OK] * len(with_them), [o.reason for o in with_them]
    assert [occurrence_of(r) for r in written] == [o.key for o in [*good, *newer]]
