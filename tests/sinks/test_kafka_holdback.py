"""Kafka: a partition the broker refuses holds back none of the sink's other topics or partitions, keeps
its own order, and a send of it ends at the broker's first answer proving nothing was written (its
first refusal too), read from the sink's own producer (whatever the log level, whatever another Kafka
sink of the process is told), and a batch the broker wrote before answering an error is written once.
Tansu behind the project's broker checks relay (``kafka_faults.FaultyBroker``: a topic's batches
refused with NOT_ENOUGH_REPLICAS, a batch written and then answered NOT_LEADER_OR_FOLLOWER, slow
acknowledgements; Kafka's duplicate-batch check), records read back with aiokafka."""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eventrouter import Occurrence, OutcomeKind
from eventrouter.logs import setup_logging
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
from eventrouter.testing.receivers.kafka_checks import OUT_OF_ORDER_SEQUENCE_NUMBER
from eventrouter.testing.receivers.kafka_faults import (
    API_INIT_PRODUCER_ID,
    API_PRODUCE,
    NOT_ENOUGH_REPLICAS,
    NOT_LEADER_OR_FOLLOWER,
    UNKNOWN_TOPIC_OR_PARTITION,
)
from eventrouter.testing.waiting import until
from eventrouter_sinks.kafka import KafkaSink, _produce_partitions


@pytest.fixture
def log_level_error() -> Iterator[None]:
    """The router's ``--log-level=error`` (``setup_logging``: aiokafka's logger at ERROR too), undone
    after the test."""
    root, aiokafka = logging.getLogger(), logging.getLogger("aiokafka")
    saved = (root.level, root.handlers[:], aiokafka.level)
    setup_logging("error")
    try:
        yield
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        aiokafka.setLevel(saved[2])


async def test_a_refused_partition_holds_up_no_other_topic_and_keeps_its_own_order(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path
) -> None:
    """A partition answering NOT_ENOUGH_REPLICAS (a rolling restart) was retried in place: the engine's
    later batches, of every other topic, waited until it took records again. Its records now wait aside
    (defer) while other topics go on, offered again (refused again, in a send that holds up nothing),
    and the partition's later records are held back behind them: after the fault every record is
    written once, in its partition's order. Among them a second occurrence of a refused event (the
    engine keeps it behind the first itself)."""
    refused = {"h-bad": NOT_ENOUGH_REPLICAS}
    async with relayed("h-good", "h-bad", idempotence=True, refuse=refused) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=2.0, retry_wait_max=10.0, topic="h-{namespace}")
        pipeline, metrics = engine(sink, tmp_path, retry_initial_backoff=0.2, retry_max_backoff=1.0)
        offered = [
            make_occurrence(namespace=ns, object_name=f"{ns}-{i}")
            for i in range(10)
            for ns in ("good", "bad")
        ]
        task = started(pipeline, offered)
        delivered = metrics.delivered.labels("kafka")
        await until(lambda: delivered._value.get() == 10, timeout=10)
        first_bad = offered[1].record
        for wave in range(3):  # later batches while the partition still refuses
            again = [make_occurrence(namespace="bad", object_name="bad-0", uid=first_bad["uid"], count=2)]
            fresh = [
                make_occurrence(namespace=ns, object_name=f"{ns}-{i}", message=f"wave {wave}")
                for i in range(5)
                for ns in ("good", "bad")
            ]
            for occurrence in (again if wave == 0 else []) + fresh:
                offered.append(occurrence)
                pipeline.offer(occurrence)
            # Each wave's healthy records are written while the fault is still on (before: never).
            written = 10 + 5 * (wave + 1)
            await until(lambda: delivered._value.get() == written, timeout=10)  # noqa: B023 - awaited here
        assert relay.refuse  # still refusing
        relay.refuse.clear()
        await pipeline.wait_idle(timeout=30)
        await stopped(pipeline, task)
        records = await log_of(broker.bootstrap, "h-good", "h-bad", at_least=len(offered))
    assert copies(records) == {(f"h-{o.record['namespace']}", o.key): 1 for o in offered}
    for topic in ("h-good", "h-bad"):  # each partition in the order its records were offered
        assert [occurrence_of(r) for r in records if r.topic == topic] == [
            o.key for o in offered if f"h-{o.record['namespace']}" == topic
        ]
    assert metrics.send_errors.labels("kafka", "timeout")._value.get() == 0
    assert metrics.delivered.labels("kafka")._value.get() == len(offered)


async def test_records_given_up_while_set_aside_no_longer_hold_their_partition_back(
    kafka_sink: Callable[..., KafkaSink], tmp_path: Path
) -> None:
    """A refused partition's records given up by the engine (``retry_max_attempts``) while set aside: the
    other topic's later records went on meanwhile (before: only after them), and once the partition takes
    records again its later ones are not held back behind the dead-lettered ones (the engine tells the
    sink, ``given_up``; the sink keeps a record's place for as long as the engine holds it)."""
    refused = {"u-bad": NOT_ENOUGH_REPLICAS}
    async with relayed("u-good", "u-bad", idempotence=True, refuse=refused) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=2.0, topic="u-{namespace}")
        pipeline, metrics = engine(
            sink, tmp_path, retry_max_attempts=2, retry_initial_backoff=0.2, retry_max_backoff=30.0
        )
        first = [
            make_occurrence(namespace=ns, object_name=f"{ns}-{i}") for i in range(5) for ns in ("good", "bad")
        ]
        task = started(pipeline, first)
        delivered = metrics.delivered.labels("kafka")
        exhausted = metrics.dead_lettered.labels("kafka", "retries_exhausted")
        await until(lambda: delivered._value.get() == 5, timeout=10)
        good = [make_occurrence(namespace="good", object_name=f"good-{i}", message="later") for i in range(5)]
        for occurrence in good:
            pipeline.offer(occurrence)
        await until(lambda: delivered._value.get() == 10, timeout=10)
        assert exhausted._value.get() == 0  # delivered while the refused records still wait aside
        await until(lambda: exhausted._value.get() == 5, timeout=10)
        relay.refuse.clear()
        bad = [make_occurrence(namespace="bad", object_name=f"bad-{i}", message="later") for i in range(5)]
        for occurrence in bad:
            pipeline.offer(occurrence)
        await until(lambda: delivered._value.get() == 15, timeout=10)
        await stopped(pipeline, task)
        records = await log_of(broker.bootstrap, "u-good", "u-bad", at_least=15)
    assert copies(records) == {(f"u-{o.record['namespace']}", o.key): 1 for o in first[::2] + good + bad}


@pytest.mark.usefixtures("log_level_error")
async def test_a_retry_of_a_refused_partition_ends_at_its_refusal_with_the_log_level_at_error(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """The router's ``--log-level=error`` puts aiokafka's logger at ERROR: its warning for each refused
    answer, which the parked branch read to stop waiting, is never made, and every retry of the refused
    partition took the whole send budget (5 s here), holding up the engine's later batches of every
    other topic. The sink reads its producer's answers: each send, the first too, ends at the broker's
    refusal, the producer goes on (no new producer id), and once the partition takes records again every
    record is written once, in order."""
    refused = {"e-bad": NOT_ENOUGH_REPLICAS}
    async with relayed("e-good", "e-bad", idempotence=True, refuse=refused) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=6.0, topic="e-{namespace}")
        await sink.start()
        try:
            bad = make_occurrence(namespace="bad", object_name="b-0")
            goods = [make_occurrence(namespace="good", object_name=f"g-{i}") for i in range(4)]
            producers: list[int] = []  # the producer ids handed out by the end of each send
            for good in goods[:3]:  # the first refusal, then retries, beside another topic's record
                began = time.monotonic()
                again = await as_the_engine_does(sink, [bad, good])
                took = time.monotonic() - began
                assert [(o.kind, o.defer) for o in again] == [
                    (OutcomeKind.RETRY, True),
                    (OutcomeKind.OK, False),
                ]
                # The first refusal after _CUT_GRACE (2 s: a brief one is aiokafka's), the retries at once.
                limit = 3.5 if good is goods[0] else 1.5
                assert took < limit, f"a send with the refused partition took {took:.2f}s of a 5s budget"
                assert "NOT_ENOUGH_REPLICAS (19)" in again[0].reason
                producers.append(len(relay.producer_ids))
            relay.refuse.clear()
            last = await as_the_engine_does(sink, [bad, goods[3]])
            assert [o.kind for o in last] == [OutcomeKind.OK, OutcomeKind.OK]
            # One producer throughout: its sequence number for the partition given back at each
            # refusal, which the relay checks (before: a new one after the first refusal).
            assert len(relay.producer_ids) == producers[0] == producers[1] == producers[2] == 1
        finally:
            await sink.aclose()
        records = await log_of(broker.bootstrap, "e-good", "e-bad", at_least=5)
    assert copies(records) == {("e-bad", bad.key): 1, **{("e-good", g.key): 1 for g in goods}}


async def test_a_partitions_first_refusal_ends_the_send_when_the_other_topics_are_answered(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """A partition refused with NOT_ENOUGH_REPLICAS from the start of a rolling restart. Its first
    refusal was retried by aiokafka until the send's budget (6.7 s of ``send_timeout=8``; ~25 s at the
    defaults), the other topic's records answered only then, and the producer renewed. That batch is
    now given up at the broker's first refusal, as a retry's is: the send ends when the other topic is
    answered, its records set aside (the partition's first backoff), the producer kept. A send of that
    partition's records alone ends at its refusal too. Once the partition takes records again they are
    written once, in order, before a newer one of their object."""
    refused = {"f-bad": NOT_ENOUGH_REPLICAS}
    async with relayed("f-good", "f-bad", idempotence=True, refuse=refused) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=8.0, topic="f-{namespace}")
        await sink.start()
        loop = asyncio.get_running_loop()
        try:
            bad = [make_occurrence(namespace="bad", object_name="b-0", message=f"b{i}") for i in range(5)]
            good = [make_occurrence(namespace="good", object_name=f"g-{i}") for i in range(5)]
            began = loop.time()
            first = await as_the_engine_does(sink, [o for pair in zip(bad, good, strict=True) for o in pair])
            took = loop.time() - began
            # After _CUT_GRACE (2 s of aiokafka's retries: a brief refusal costs nothing).
            assert took < 3.5, f"the first refusal took {took:.2f}s of a {sink.context.send_budget:g}s budget"
            assert [(o.kind, o.defer, o.retry_after) for o in first] == [
                (OutcomeKind.RETRY, True, 1.0),  # set aside for the partition's first backoff
                (OutcomeKind.OK, False, None),
            ] * 5
            assert "NOT_ENOUGH_REPLICAS (19)" in first[0].reason
            began = loop.time()
            again = await as_the_engine_does(sink, bad)  # the send holds only that partition's records
            took = loop.time() - began
            assert took < 2.0, f"a send of the refused partition alone took {took:.2f}s"
            assert {(o.kind, o.defer, o.retry_after) for o in again} == {(OutcomeKind.RETRY, True, 2.0)}
            relay.refuse.clear()
            newer = make_occurrence(namespace="bad", object_name="b-0", message="b5")
            last = await as_the_engine_does(sink, [*bad, newer])
            assert [o.kind for o in last] == [OutcomeKind.OK] * 6
            assert len(relay.producer_ids) == 1  # before: a new producer after the first send
        finally:
            await sink.aclose()
        records = await log_of(broker.bootstrap, "f-good", "f-bad", at_least=11)
    offered = [*bad, newer, *good]
    assert copies(records) == {(f"f-{o.record['namespace']}", o.key): 1 for o in offered}
    assert [occurrence_of(r) for r in records if r.topic == "f-bad"] == [o.key for o in [*bad, newer]]
    # The first send's batch retried by aiokafka for _CUT_GRACE, the second's cut at its first refusal.
    assert {topic for topic, _, _ in relay.refused} == {"f-bad"}


async def test_a_batch_written_whose_answer_came_too_late_is_not_cut_at_its_retrys_refusal(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """An acks=all batch the broker wrote, its answer later than ``request_timeout_ms`` (the client's
    timer starts first), and a follower falling out of the in-sync replicas meanwhile: aiokafka's retry
    meets NOT_ENOUGH_REPLICAS (Kafka checks the in-sync replicas before its duplicate-batch check).
    The sink marks a partition whose request was lost so "maybe written" and does not cut its batch;
    but it read the request's partitions from ``topics``, which aiokafka 0.14's ProduceRequest does not
    have (``_topics``): nothing was marked, the batch was cut as "nothing written", its records set aside
    and written again by a new producer (the resend is out of sequence). Now the retry waits: once the
    refusal ends it is answered as the duplicate it is, and every record is written once."""
    async with relayed(
        "t-good",
        "t-bad",
        idempotence=True,
        api_delays={API_PRODUCE: 1.6},
        refuse_after_write={"t-bad": NOT_ENOUGH_REPLICAS},
    ) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=8.0, topic="t-{namespace}")  # request_timeout_ms=1000
        await sink.start()
        lifted = asyncio.Event()

        async def lift() -> None:  # the follower back in sync 2 s after the write
            await until(lambda: "t-bad" in relay.refuse)
            relay.api_delays.clear()
            await asyncio.sleep(2.0)
            relay.refuse.clear()
            lifted.set()

        lifting = asyncio.create_task(lift())
        try:
            bad = [make_occurrence(namespace="bad", object_name="b-0", message=f"b{i}") for i in range(3)]
            good = [make_occurrence(namespace="good", object_name="g-0")]
            first = await as_the_engine_does(sink, [*bad, *good])
            # Waited for within the send (before: set aside as "nothing written" in 0.1 s).
            assert [o.kind for o in first] == [OutcomeKind.OK] * 4, [o.reason for o in first]
            await lifted.wait()
            newer = make_occurrence(namespace="bad", object_name="b-0", message="b3")
            assert [o.kind for o in await as_the_engine_does(sink, [newer])] == [OutcomeKind.OK]
            # The retry answered as the duplicate it is; one producer throughout.
            assert len(relay.producer_ids) == 1 and "t-bad" in {t for t, *_ in relay.duplicates}
        finally:
            lifting.cancel()
            await sink.aclose()
        records = await log_of(broker.bootstrap, "t-good", "t-bad", at_least=5)
    assert copies(records) == {(f"t-{o.record['namespace']}", o.key): 1 for o in [*bad, newer, *good]}
    assert [occurrence_of(r) for r in records if r.topic == "t-bad"] == [o.key for o in [*bad, newer]]


async def test_a_brief_refusal_is_left_to_aiokafkas_retries_and_costs_no_attempt(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """A follower briefly out of the in-sync replicas (NOT_ENOUGH_REPLICAS for 0.5 s). Cut at its first
    answer, each such blip cost the partition an attempt and a doubling backoff: a refusal flapping
    every 100 ms held it 11 s and dead-lettered records at retry_max_attempts=3 (a session 28 review).
    A partition not known to refuse is left to aiokafka's retries for _CUT_GRACE (2 s): the send takes
    every record, with the producer it began with."""
    async with relayed("q-good", "q-bad", idempotence=True, refuse={"q-bad": NOT_ENOUGH_REPLICAS}) as (
        broker,
        relay,
    ):
        sink = kafka_sink(relay, send_timeout=8.0, topic="q-{namespace}")
        await sink.start()
        asyncio.get_running_loop().call_later(0.5, relay.refuse.clear)
        try:
            batch = [
                make_occurrence(namespace=ns, object_name=f"{ns}-0", message=f"m{i}")
                for i in range(3)
                for ns in ("bad", "good")
            ]
            outs = await as_the_engine_does(sink, batch)
            assert [o.kind for o in outs] == [OutcomeKind.OK] * 6, [o.reason for o in outs]
            assert len(relay.producer_ids) == 1 and relay.refused  # it was refused, and retried within
        finally:
            await sink.aclose()
        records = await log_of(broker.bootstrap, "q-good", "q-bad", at_least=6)
    assert copies(records) == {(f"q-{o.record['namespace']}", o.key): 1 for o in batch}


async def test_a_refusal_starting_mid_send_sets_the_partitions_later_batches_aside_unsent(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """A partition whose records of one send fill four produce batches, refused from its second batch on
    (the rolling restart begins while the first is acknowledged, 3 s late). The second batch was retried
    until the send's budget (10 s of ``send_timeout=12``) and the producer renewed. It is now given up at
    the broker's first refusal and its sequence numbers given back; the two behind it are never handed
    over (a partition's batches go one after the other), so none can take numbers after the given-back
    ones; all nine records are set aside at once, and the partition is still known refused (its backoff
    doubles, though it took a batch in that send). Once it takes records again the same producer writes
    them, each once, in order (the relay refuses a batch out of sequence)."""
    async with relayed("n-good", "n-bad", idempotence=True, api_delays={API_PRODUCE: 3.0}) as (broker, relay):
        # Produce batches of up to 8 KiB: three records of ~2.2 KB each.
        sink = kafka_sink(
            relay, send_timeout=12.0, topic="n-{namespace}", max_request_size=8192, request_timeout_ms=6000
        )
        await sink.start()
        loop = asyncio.get_running_loop()
        try:
            bad = [
                make_occurrence(namespace="bad", object_name="b-0", message=f"b{i:02d} " + "x" * 1500)
                for i in range(12)
            ]
            good = [make_occurrence(namespace="good", object_name=f"g-{i}") for i in range(3)]
            began = loop.time()
            sending = asyncio.ensure_future(as_the_engine_does(sink, bad + good))
            await log_of(broker.bootstrap, "n-bad", at_least=3)  # the first batch written, not yet answered
            relay.refuse["n-bad"] = NOT_ENOUGH_REPLICAS
            relay.api_delays.clear()
            first = await sending
            took = loop.time() - began
            assert took < 6.5, f"the refusal took {took:.2f}s of a {sink.context.send_budget:g}s budget"
            assert [(o.kind, o.defer, o.retry_after) for o in first] == [
                (OutcomeKind.OK, False, None)
            ] * 3 + [(OutcomeKind.RETRY, True, 1.0)] * 9 + [(OutcomeKind.OK, False, None)] * 3
            # Only its second batch was refused (retried for _CUT_GRACE): its later ones were never sent.
            assert {topic for topic, _, _ in relay.refused} == {"n-bad"}
            again = await as_the_engine_does(sink, bad[3:])
            assert {(o.kind, o.defer, o.retry_after) for o in again} == {(OutcomeKind.RETRY, True, 2.0)}
            relay.refuse.clear()
            last = await as_the_engine_does(sink, bad[3:])
            assert [o.kind for o in last] == [OutcomeKind.OK] * 9
            assert len(relay.producer_ids) == 1
        finally:
            await sink.aclose()
        records = await log_of(broker.bootstrap, "n-good", "n-bad", at_least=15)
    assert copies(records) == {(f"n-{o.record['namespace']}", o.key): 1 for o in bad + good}
    assert [occurrence_of(r) for r in records if r.topic == "n-bad"] == [o.key for o in bad]


async def test_two_kafka_sinks_with_one_topic_name_each_judge_their_own_partition(
    kafka_sink: Callable[..., KafkaSink],
) -> None:
    """Two Kafka sinks of one process, two clusters, one topic name (and one client_id). Sink A's
    partition was refused, has recovered, and acknowledges slowly (acks=all, a slow follower: written
    at once); sink B's partition of that name is refused meanwhile. The parked branch learnt refusals
    from aiokafka's log lines, whoever's producer logged them: A's retry stopped waiting at B's refusal
    and gave up a batch its broker wrote, which the engine's resend wrote again. Each sink now reads
    its own producer's answers: A's retry is acknowledged, written once, not held by B's refusal; B's
    records of its other topic go on while its own partition refuses."""
    refuse = {"p-bad": NOT_ENOUGH_REPLICAS}
    async with (
        relayed("p-good", "p-bad", idempotence=True, refuse=refuse) as (broker_a, relay_a),
        relayed("p-good", "p-bad", idempotence=True, refuse=refuse) as (broker_b, relay_b),
    ):
        a = kafka_sink(relay_a, send_timeout=6.0, name="kafka-a", topic="p-{namespace}")
        b = kafka_sink(relay_b, send_timeout=6.0, name="kafka-b", topic="p-{namespace}")
        await a.start()
        await b.start()
        try:
            a_bad, b_bad = (make_occurrence(namespace="bad", object_name=f"{n}-bad") for n in "ab")
            a_good, b_good = (make_occurrence(namespace="good", object_name=f"{n}-good") for n in "ab")
            first = await as_the_engine_does(a, [a_bad, a_good])  # the first refusal
            assert [(o.kind, o.defer) for o in first] == [(OutcomeKind.RETRY, True), (OutcomeKind.OK, False)]
            relay_a.refuse.clear()  # A's partition recovered; its acknowledgements are slow
            relay_a.api_delays[API_PRODUCE] = 0.5
            # B's first send is refused while A's retry waits for its answer.
            b_first, a_retry = await asyncio.gather(
                as_the_engine_does(b, [b_bad, b_good]), as_the_engine_does(a, [a_bad])
            )
            relay_a.api_delays.clear()
            if a_retry[0].kind is not OutcomeKind.OK:
                await as_the_engine_does(a, [a_bad])  # the engine sends it again
            assert [(o.kind, o.defer) for o in b_first] == [
                (OutcomeKind.RETRY, True),
                (OutcomeKind.OK, False),
            ]
        finally:
            await a.aclose()
            await b.aclose()
        records_a = await log_of(broker_a.bootstrap, "p-good", "p-bad", at_least=2)
        records_b = await log_of(broker_b.bootstrap, "p-good", "p-bad", at_least=1)
    assert copies(records_a) == {("p-bad", a_bad.key): 1, ("p-good", a_good.key): 1}
    assert [o.kind for o in a_retry] == [OutcomeKind.OK], a_retry[0].reason
    assert copies(records_b) == {("p-good", b_good.key): 1}


@pytest.mark.parametrize(
    "code", [NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC_OR_PARTITION], ids=["not_leader", "unknown_partition"]
)
async def test_a_retry_written_and_then_answered_an_error_is_written_once(
    kafka_sink: Callable[..., KafkaSink], code: int
) -> None:
    """A refused partition's retry is written by the leader and then answered NOT_LEADER_OR_FOLLOWER (or
    UNKNOWN_TOPIC_OR_PARTITION): Kafka's ``DelayedProduce`` when an acks=all leader moves after the
    append (a rolling restart). The first version of the early stop cut such a batch short and gave its
    sequence back: the engine's resend, with a newer record of the partition, was refused out of
    sequence and a new producer wrote the batch's records again. The batch is now left to aiokafka,
    whose retry the broker answers as a duplicate: every record written once, in order."""
    refused = {"w-bad": NOT_ENOUGH_REPLICAS}
    async with relayed("w-good", "w-bad", idempotence=True, refuse=refused) as (broker, relay):
        sink = kafka_sink(relay, send_timeout=3.0, topic="w-{namespace}")
        await sink.start()
        offered: list[Occurrence] = []
        outstanding: list[Occurrence] = []

        async def send(*newer: Occurrence) -> None:
            """The engine's next send: what is outstanding, then ``newer``."""
            batch = outstanding + list(newer)
            offered.extend(newer)
            outcomes = await as_the_engine_does(sink, batch)
            outstanding[:] = [o for o, r in zip(batch, outcomes, strict=True) if r.kind is OutcomeKind.RETRY]

        try:
            b1, b2, b3 = (make_occurrence(namespace="bad", object_name=f"b-{i}") for i in range(3))
            g1, g2, g3 = (make_occurrence(namespace="good", object_name=f"g-{i}") for i in range(3))
            await send(b1, b2, g1)  # the partition's first refusal
            assert outstanding == [b1, b2]
            relay.refuse.clear()
            relay.after_append_once["w-bad"] = code  # the leader moves while the retry waits
            await send(g2)
            assert relay.after_append_once == {}  # the retry was written, then answered the error
            await send(b3, g3)  # a newer record of the partition: a resend would differ from the batch
            for _ in range(3):  # anything still outstanding, as the engine sends it again
                if outstanding:
                    await send()
            assert outstanding == []
        finally:
            await sink.aclose()
        records = await log_of(broker.bootstrap, "w-good", "w-bad", at_least=len(offered))
    assert copies(records) == {(f"w-{o.record['namespace']}", o.key): 1 for o in offered}
    for topic in ("w-good", "w-bad"):  # each partition in the order its records were offered
        assert [occurrence_of(r) for r in records if r.topic == topic] == [
            o.key for o in offered if f"w-{o.record['namespace']}" == topic
        ]
    # aiokafka's retry of the batch was answered as a duplicate, not written again.
    assert [(topic, partition) for topic, partition, _, _ in relay.duplicates] == [("w-bad", 0)]


class _Connection:
    """One bare Kafka connection: requests framed by hand (header v1), answers read in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.correlation_id = 0

    async def call(self, api_key: int, version: int, body: bytes) -> bytes:
        """The answer's body (after its correlation id)."""
        self.correlation_id += 1
        header = struct.pack(">hhih", api_key, version, self.correlation_id, 1) + b"t"
        self.writer.write(struct.pack(">i", len(header) + len(body)) + header + body)
        await self.writer.drain()
        (size,) = struct.unpack(">i", await self.reader.readexactly(4))
        frame = await self.reader.readexactly(size)
        assert struct.unpack_from(">i", frame) == (self.correlation_id,)
        return frame[4:]


async def test_the_relay_answers_a_batch_resent_with_its_sequence_as_a_duplicate_not_written() -> None:
    """Kafka's duplicate-batch check, which a test of a resend depends on: a batch whose producer id,
    epoch and (first, last) sequence equal one of the last five written on its partition is answered
    NONE, with the first write's offset, and not appended; one of another range, or older than those
    five, is out of sequence (before: every resend was out of sequence)."""
    from aiokafka.protocol.produce import ProduceRequest_v3, ProduceResponse_v3
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    async with relayed("dup", idempotence=True) as (broker, relay):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.listen_port)
        connection = _Connection(reader, writer)
        try:
            answer = await connection.call(API_INIT_PRODUCER_ID, 0, struct.pack(">hi", -1, 60_000))
            (producer_id,) = struct.unpack_from(">q", answer, 6)

            def batch(sequence: int, *values: str) -> bytes:
                builder = DefaultRecordBatchBuilder(2, 0, 0, producer_id, 0, sequence, 1 << 20)
                for i, value in enumerate(values):
                    builder.append(i, int(time.time() * 1000), None, value.encode(), [])
                return bytes(builder.build())

            async def produce(data: bytes) -> tuple[int, int]:
                """The partition's error code and base offset."""
                request = ProduceRequest_v3(None, -1, 5000, [("dup", [(0, data)])])
                body = await connection.call(API_PRODUCE, 3, request.encode())
                [(_, [(_, error, offset, _)])], _ = ProduceResponse_v3.SCHEMA.decode(io.BytesIO(body))
                return error, offset

            first = batch(0, "a0", "a1")
            assert await produce(first) == (0, 0)
            assert await produce(first) == (0, 0)  # its answer lost, sent again: the first write's offset
            assert relay.duplicates == [("dup", 0, producer_id, 0)]
            assert await produce(batch(2, "a2")) == (0, 2)
            assert (await produce(batch(0, "x0", "x1", "x2")))[0] == OUT_OF_ORDER_SEQUENCE_NUMBER
            for sequence in range(3, 7):  # [0, 1] is no longer among the last five: [2] .. [6]
                assert await produce(batch(sequence, f"a{sequence}")) == (0, sequence)
            assert (await produce(first))[0] == OUT_OF_ORDER_SEQUENCE_NUMBER
            assert await produce(batch(2, "a2")) == (0, 2)
            assert len(relay.duplicates) == 2
        finally:
            writer.close()
            await writer.wait_closed()
        records = await log_of(broker.bootstrap, "dup", at_least=7)
    assert [(r.offset, r.value) for r in records] == [(i, f"a{i}".encode()) for i in range(7)]


def test_a_lost_requests_partitions_are_read_from_the_installed_aiokafkas_request() -> None:
    """What marks a lost request's partitions "maybe written" (item 189): read from the request
    aiokafka builds (0.14 keeps them in ``_topics``; read as ``topics`` only, nothing was ever marked),
    and None for a layout it cannot read, which turns cutting off for that producer."""
    from aiokafka.protocol.produce import ProduceRequest

    request = ProduceRequest(None, -1, 1000, [("a", [(0, b"x"), (2, b"y")]), ("b", [(1, b"z")])])
    assert _produce_partitions(request) == [("a", 0), ("a", 2), ("b", 1)]
    assert _produce_partitions(object()) is None
