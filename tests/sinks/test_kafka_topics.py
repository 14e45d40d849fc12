"""Kafka topic names: templates cut with a hash, names Kafka refuses, and topics missing on a broker that
does not create them (against the Tansu broker)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.conn import create_conn
from aiokafka.errors import UnknownTopicOrPartitionError
from aiokafka.protocol.metadata import MetadataRequest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from eventrouter import OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.kafka_no_autocreate import broker_without_auto_create
from eventrouter.testing.receivers.tansu import TansuBroker
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink, topic_problem

CLUSTER = "test-cluster"
# Two object names of the legal 253 characters that differ only after their 245th.
STEM = "job-" + "a" * 241
LONG_A, LONG_B = STEM + "-shard-1", STEM + "-shard-2"


def sink_for(options: KafkaOptions) -> KafkaSink:
    logger = logging.getLogger("test.kafka")
    return KafkaSink(options, SinkContext(name="kafka", cluster=CLUSTER, data_dir=None, logger=logger))


def rendered(template: str, **event: Any) -> str:
    """The topic the sink gives an event's record."""
    sink = sink_for(KafkaOptions.model_validate({"brokers": "k:9092", "topic": template}))
    return sink.encode(make_occurrence(cluster=CLUSTER, **event)).topic


@pytest.fixture
async def broker() -> AsyncIterator[TansuBroker]:
    async with TansuBroker() as tansu:
        yield tansu


def test_long_rendered_topic_names_are_cut_with_a_hash_and_stay_distinct() -> None:
    full_a = f"k8s-events-{LONG_A}"
    a, b = (
        rendered("k8s-events-{object_name}", object_name=LONG_A),
        rendered("k8s-events-{object_name}", object_name=LONG_B),
    )
    assert a != b  # cut at 249 alone, both were k8s-events-job-aaa…: one topic for two objects
    assert len(a) == len(b) == 249 and topic_problem(a) is None and topic_problem(b) is None
    assert a == f"{full_a[:240]}-{hashlib.sha256(full_a.encode()).hexdigest()[:8]}"
    assert rendered("k8s-events-{object_name}", object_name=LONG_A) == a  # stable across calls
    # A name of exactly 249 characters is kept whole; one more and it is cut.
    exact = "x" * (249 - len("k8s-events-"))
    assert rendered("k8s-events-{object_name}", object_name=exact) == f"k8s-events-{exact}"
    cut = rendered("k8s-events-{object_name}", object_name=exact + "y")
    assert len(cut) == 249 and cut != f"k8s-events-{exact}"
    # Fixed text over 249 characters is cut the same way: what a template renders is always valid.
    long_literal = rendered("." + "e" * 250 + "-{namespace}", namespace="default")
    assert len(long_literal) == 249 and topic_problem(long_literal) is None


@settings(max_examples=300, deadline=None)
@given(
    literal=st.text(alphabet="abz09._-", max_size=260),
    namespace=st.text(max_size=300),
    name=st.text(max_size=300),
)
def test_every_rendered_topic_name_is_one_kafka_accepts(literal: str, namespace: str, name: str) -> None:
    topic = rendered(f"{literal}{{namespace}}{{object_name}}", namespace=namespace, object_name=name)
    assert topic_problem(topic) is None, topic


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        (".", "is not a valid topic name"),
        ("..", "is not a valid topic name"),
        ("e" * 250, "250 characters long, over Kafka's limit of 249"),
        ("k8s-events\n", "characters Kafka does not allow"),  # a YAML block scalar's newline
        ("k8s-events-{namespace}\n", "characters Kafka does not allow"),
    ],
)
def test_a_topic_kafka_refuses_is_a_configuration_error_naming_it(topic: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        KafkaOptions.model_validate({"brokers": "k:9092", "topic": topic})
    assert message in str(info.value) and repr(topic)[:40] in str(info.value)


async def test_a_topic_name_kafka_refuses_is_rejected_at_once_naming_it_not_retried(
    broker: TansuBroker,
) -> None:
    """The broker answers INVALID_TOPIC_EXCEPTION for such a name in its metadata, which aiokafka only
    logs: it asked again until request_timeout_ms and raised UnknownTopicOrPartitionError, a retry, for
    ever (before the fix a template ending in a newline rendered such names). Options that skipped
    validation (built in code) stand in for a name the sink cannot render any more."""
    invalid = "e" * 250
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, enable_idempotence=False, request_timeout_ms=500
    )
    await producer.start()
    try:
        with pytest.raises(UnknownTopicOrPartitionError):  # the test server refuses it, as Kafka does
            await producer.partitions_for(invalid)
    finally:
        await producer.stop()

    options = KafkaOptions.model_construct(
        brokers=[broker.bootstrap], topic=invalid, idempotence=False, request_timeout_ms=3000
    )
    sink = sink_for(options)
    await sink.start()
    try:
        started = time.monotonic()
        outcomes = await sink.send(
            [make_occurrence(cluster=CLUSTER, object_name=f"web-{i}") for i in range(3)]
        )
        elapsed = time.monotonic() - started
    finally:
        await sink.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 3, outcomes
    assert f"kafka refuses topic {invalid!r}: it is 250 characters long" in outcomes[0].reason
    assert elapsed < 1.0  # never asked the broker: no wait for request_timeout_ms


async def test_events_of_two_long_object_names_land_in_two_topics(broker: TansuBroker) -> None:
    sink = sink_for(
        KafkaOptions.model_validate(
            {"brokers": broker.bootstrap, "topic": "k8s-events-{object_name}", "idempotence": False}
        )
    )
    events = {name: make_occurrence(cluster=CLUSTER, object_name=name) for name in (LONG_A, LONG_B)}
    await sink.start()
    try:
        outcomes = await sink.send(list(events.values()))
    finally:
        await sink.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 2
    for name, occurrence in events.items():
        topic = rendered("k8s-events-{object_name}", object_name=name)
        records = await broker.consume(topic, expected=1)
        # Only that object's record: before, both went into one topic cut at 249 characters.
        assert [dict(r.headers)["occurrence"].decode() for r in records] == [occurrence.key]
        assert {r.topic for r in records} == {topic}
        with pytest.raises(TimeoutError):
            await broker.consume(topic, expected=2, timeout=1.0)


async def test_the_no_auto_create_relay_makes_tansu_answer_as_a_broker_with_auto_create_off() -> None:
    """The test server's contract: through the relay a plain aiokafka producer finds a created topic,
    and for a missing one gets UnknownTopicOrPartitionError after request_timeout_ms, the topic never
    created; without the relay Tansu creates it."""
    async with broker_without_auto_create() as (broker, relay):
        port = relay.listen_port
        await broker.create_topics("there")
        producer = AIOKafkaProducer(
            bootstrap_servers=f"127.0.0.1:{port}", enable_idempotence=False, request_timeout_ms=500
        )
        await producer.start()
        try:
            assert len(await producer.partitions_for("there")) == 4
            with pytest.raises(UnknownTopicOrPartitionError):
                await producer.partitions_for("not-there")
            await (await producer.send("there", b"one"))
        finally:
            await producer.stop()
        assert ["not-there"] in relay.asked
        # Straight to Tansu (it advertises the relay: one connection, no client), the same request with
        # the flag as aiokafka sets it creates the topic: not-there was creatable, the relay kept it so.
        direct = await create_conn(broker.host, broker.port)
        try:
            for flag, code in ((False, 3), (True, 0)):  # 3: UNKNOWN_TOPIC_OR_PARTITION
                answer = await direct.send(MetadataRequest(["not-there"], allow_auto_topic_creation=flag))
                assert [(t[0], t[1]) for t in answer.topics] == [(code, "not-there")]
        finally:
            direct.close()
        assert [r.value for r in await broker.consume("there", expected=1)] == [b"one"]


async def test_a_missing_topic_is_set_aside_while_other_topics_are_delivered_and_goes_in_once_created(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With auto-create off, a namespace whose topic nobody created made aiokafka wait
    request_timeout_ms and raise UnknownTopicOrPartitionError (as for a broker outage): every record of
    the batch was retried, the other namespaces' too, for as long as the topic was missing. Now the
    missing topic's records are set aside (a deferred retry) and logged once, the others delivered in
    the same send, and once the topic exists its records go in at their retry."""
    caplog.set_level(logging.INFO, logger="test.kafka")
    async with broker_without_auto_create() as (broker, relay):
        port = relay.listen_port
        await broker.create_topics("k8s-events-shop")
        sink = sink_for(
            KafkaOptions.model_validate(
                {
                    "brokers": f"127.0.0.1:{port}",
                    "topic": "k8s-events-{namespace}",
                    "idempotence": False,
                    "request_timeout_ms": 5000,
                }
            )
        )
        shop = [make_occurrence(cluster=CLUSTER, namespace="shop", object_name=f"web-{i}") for i in range(3)]
        dev = [make_occurrence(cluster=CLUSTER, namespace="dev", object_name=f"api-{i}") for i in range(3)]
        batch = [dev[0], shop[0], dev[1], shop[1], shop[2], dev[2]]
        await sink.start()
        try:
            started = time.monotonic()
            outcomes = await sink.send(batch)
            elapsed = time.monotonic() - started
            assert outcomes is not None
            by_key = {occ.key: out for occ, out in zip(batch, outcomes, strict=True)}
            assert [by_key[o.key].kind for o in shop] == [OutcomeKind.OK] * 3, outcomes
            for occurrence in dev:
                outcome = by_key[occurrence.key]
                assert outcome.kind is OutcomeKind.RETRY and outcome.defer, outcome
                assert "kafka topic 'k8s-events-dev' does not exist" in outcome.reason
                assert "create the topic, or enable auto-create" in outcome.reason
            # No wait of request_timeout_ms for the missing topic: asked about again for 2 s (a broker
            # with auto-create on answers it so while creating it), then set aside.
            assert elapsed < 3.5
            records = await broker.consume("k8s-events-shop", expected=3)
            assert {dict(r.headers)["occurrence"].decode() for r in records} == {o.key for o in shop}

            # Their retry (and new records for it): asked about again, still missing, set aside at once.
            asked = sum("k8s-events-dev" in topics for topics in relay.asked)
            again = await sink.send(dev)
            assert sum("k8s-events-dev" in topics for topics in relay.asked) == asked + 1
            assert again is not None
            assert all(o.kind is OutcomeKind.RETRY and o.defer for o in again), again
            said = [r for r in caplog.records if "k8s-events-dev" in r.getMessage()]
            # At WARNING: the broker may have auto-create on and be slow (ERROR when still missing 10 s on).
            assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]
            assert "topic 'k8s-events-dev' does not exist on the broker" in said[0].getMessage()

            await broker.create_topics("k8s-events-dev")
            # The engine sends the set-aside records again after their backoff: now they go in.
            delivered = await sink.send(dev)
            assert delivered is not None and [o.kind for o in delivered] == [OutcomeKind.OK] * 3, delivered
        finally:
            await sink.aclose()
        records = await broker.consume("k8s-events-dev", expected=3)
        assert {dict(r.headers)["occurrence"].decode() for r in records} == {o.key for o in dev}
        assert any("'k8s-events-dev' exists now" in r.getMessage() for r in caplog.records)


async def test_a_new_topic_while_the_broker_is_down_is_retried_with_the_batch_at_once_not_set_aside(
    broker: TansuBroker,
) -> None:
    """Missing topic or outage: with no broker answering, the batch is retried as a whole (nothing set
    aside as missing), without first waiting request_timeout_ms for the topic's metadata."""
    sink = sink_for(
        KafkaOptions.model_validate(
            {
                "brokers": broker.bootstrap,
                "topic": "k8s-events-{namespace}",
                "idempotence": False,
                "request_timeout_ms": 3000,
            }
        )
    )
    await sink.start()
    try:
        first = await sink.send([make_occurrence(cluster=CLUSTER, namespace="a")])
        assert first is not None and [o.kind for o in first] == [OutcomeKind.OK]  # k8s-events-a is known
        await broker.stop()
        batch = [make_occurrence(cluster=CLUSTER, namespace=ns, object_name="x") for ns in ("a", "b", "c")]
        started = time.monotonic()
        outcomes = await sink.send(batch)
        elapsed = time.monotonic() - started
    finally:
        await sink.aclose()
    assert outcomes is not None
    assert all(o.kind is OutcomeKind.RETRY and not o.defer for o in outcomes), outcomes
    assert all("unreachable" in o.reason for o in outcomes), outcomes
    assert elapsed < 2.0  # before: request_timeout_ms waiting for the metadata of k8s-events-b
