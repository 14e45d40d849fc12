"""Kafka topic names: templates cut with a hash, and names Kafka refuses (against the Tansu broker)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import UnknownTopicOrPartitionError
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from eventrouter import OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
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
