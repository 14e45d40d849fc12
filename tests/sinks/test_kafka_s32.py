"""Kafka: the sink's own metadata lookup for the topics its producer has no partitions for (item 247),
against brokers that answer it as Kafka does: a missing topic this client may write but not create on a
broker with auto-create on (TOPIC_AUTHORIZATION_FAILED, then UNKNOWN_TOPIC_OR_PARTITION without
creation), a topic it may not even describe, and a cluster of 12 brokers each answering 0.3 s late.
Tansu behind the project's relay (``receivers.kafka_autocreate``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.kafka_autocreate import (
    TOPIC_AUTHORIZATION_FAILED,
    UNKNOWN_TOPIC_OR_PARTITION,
    broker_with_auto_create,
)
from eventrouter.testing.waiting import until
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink

LOGGER = "test.kafka.s32"


def sink_at(port: int, *, send_timeout: float = 10.0, **options: Any) -> KafkaSink:
    model = KafkaOptions.model_validate(
        {"brokers": f"127.0.0.1:{port}", "idempotence": False, "request_timeout_ms": 1000, **options}
    )
    context = SinkContext(
        name="kafka", cluster="c", data_dir=None, logger=logging.getLogger(LOGGER), send_timeout=send_timeout
    )
    return KafkaSink(model, context)


def occurrences(namespace: str, count: int) -> list[Occurrence]:
    return [make_occurrence(namespace=namespace, object_name=f"{namespace}-{i}") for i in range(count)]


async def _codes(port: int, topic: str) -> tuple[int, int]:
    """``topic``'s answer to a Metadata request allowing its creation, then to one not allowing it."""
    conn = await create_conn("127.0.0.1", port)
    try:
        allowing = await conn.send(MetadataRequest([topic]))
        not_allowing = await conn.send(MetadataRequest([topic], allow_auto_topic_creation=False))
    finally:
        conn.close()
    return allowing.topics[0][0], not_allowing.topics[0][0]


async def test_a_missing_topic_the_client_may_not_create_is_set_aside_naming_create_then_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka with auto-create on (its default) answers a missing topic that the client may write and
    describe but not create (no CREATE on the cluster nor on the topic) TOPIC_AUTHORIZATION_FAILED, and
    UNKNOWN_TOPIC_OR_PARTITION to a request that does not allow creation. The sink rejected its records
    at once as "not authorised to write" (dead-lettered even with retry_max_attempts=0, never give up),
    and creating the topic, as the log said, brought nothing back. Now they are set aside naming the
    CREATE permission, and go in once the topic is created."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with broker_with_auto_create(codes={"x-dev": TOPIC_AUTHORIZATION_FAILED}) as (broker, relay):
        await broker.create_topics("x-shop")
        # The relay answers as Kafka does for such a client.
        assert await _codes(relay.listen_port, "x-dev") == (
            TOPIC_AUTHORIZATION_FAILED,
            UNKNOWN_TOPIC_OR_PARTITION,
        )

        sink = sink_at(relay.listen_port, topic="x-{namespace}")
        await sink.start()
        try:
            dev, shop = occurrences("dev", 2), occurrences("shop", 2)
            outcomes = await sink.send([dev[0], shop[0], dev[1], shop[1]])
        finally:
            await sink.aclose()
        assert outcomes is not None
        assert [outcomes[1].kind, outcomes[3].kind] == [OutcomeKind.OK] * 2, outcomes
        for outcome in (outcomes[0], outcomes[2]):
            assert outcome.kind is OutcomeKind.RETRY and outcome.defer, outcome
            assert "kafka topic 'x-dev' does not exist on the broker, and this client may not create it" in (
                outcome.reason
            )
            assert "no CREATE permission" in outcome.reason and "grant this client CREATE" in outcome.reason
        said = [r for r in caplog.records if "'x-dev'" in r.getMessage()]
        assert said and said[0].levelno == logging.WARNING and "CREATE" in said[0].getMessage()

        # Through the engine, never giving up: nothing dead-lettered, all in once the topic exists.
        metrics = Metrics()
        pipeline = pipeline_for(
            "kafka",
            sink_at(relay.listen_port, topic="x-{namespace}"),
            metrics,
            tmp_path / "dl",
            send_timeout=10,
            retry_max_attempts=0,
            retry_initial_backoff=0.2,
            retry_max_backoff=0.5,
        )
        delivered = metrics.delivered.labels("kafka")
        aside = metrics.retries.labels("kafka")
        dev, shop = occurrences("dev", 2), occurrences("shop", 3)
        async with drained(pipeline):
            for occurrence in [shop[0], dev[0], shop[1], dev[1], shop[2]]:
                pipeline.offer(occurrence)
            await until(lambda: delivered._value.get() == 3 and aside._value.get() >= 2, timeout=8)
            await broker.create_topics("x-dev")
            await until(lambda: delivered._value.get() == 5, timeout=8)
        written = await broker.consume("x-dev", expected=2)
    for reason in ("rejected", "retries_exhausted"):
        assert metrics.dead_lettered.labels("kafka", reason)._value.get() == 0
    assert not (tmp_path / "dl").exists() or not (tmp_path / "dl").read_bytes().strip()
    assert {dict(r.headers)["occurrence"].decode() for r in written} == {o.key for o in dev}


async def test_a_topic_the_client_may_not_describe_is_still_rejected_naming_describe(
    tmp_path: Path,
) -> None:
    """A topic the client may not describe is answered TOPIC_AUTHORIZATION_FAILED to both kinds of
    request (Kafka does not disclose whether it exists): rejected, naming DESCRIBE, while the other
    topics go in."""
    async with broker_with_auto_create(denied={"y-dev"}) as (broker, relay):
        await broker.create_topics("y-shop", "y-dev")
        assert await _codes(relay.listen_port, "y-dev") == (TOPIC_AUTHORIZATION_FAILED,) * 2

        metrics = Metrics()
        pipeline = pipeline_for(
            "kafka",
            sink_at(relay.listen_port, topic="y-{namespace}"),
            metrics,
            tmp_path / "dl",
            send_timeout=10,
            retry_max_attempts=0,
        )
        dev, shop = occurrences("dev", 2), occurrences("shop", 2)
        rejected = metrics.dead_lettered.labels("kafka", "rejected")
        async with drained(pipeline):
            for occurrence in [dev[0], shop[0], dev[1], shop[1]]:
                pipeline.offer(occurrence)
            await until(lambda: metrics.delivered.labels("kafka")._value.get() == 2, timeout=8)
            await until(lambda: rejected._value.get() == 2, timeout=8)
    lines = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert sorted(line["key"] for line in lines) == sorted(o.key for o in dev)
    for line in lines:
        assert line["reason"].startswith("not authorised to describe and write kafka topic 'y-dev'"), line
        assert "TOPIC_AUTHORIZATION_FAILED (29)" in line["reason"]


@pytest.mark.parametrize(("brokers", "delay"), [(12, 0.3), (2, 0.9)])
async def test_a_cluster_whose_every_broker_answers_slower_than_its_share_still_answers_a_lookup(
    brokers: int, delay: float
) -> None:
    """Every broker answering ``delay`` seconds late (a loaded or distant cluster), request_timeout_ms
    3000. Each broker's share of the sink's topic lookup was the timeout over the brokers, and it was
    cut off at its end: with 12 brokers 0.25 s, less than making a connection takes (its ApiVersions
    answer alone); with 2, 1.5 s, less than a connection and a Metadata answer (1.8 s). Every broker was
    cut off, and every send holding a topic the producer had no partitions for was retried as "kafka
    brokers ... unreachable", at every attempt, though a plain aiokafka producer delivers. Now a broker's
    turn is at least 2 s or half what is left (12 brokers: 1.5 s), and one whose connection is made is
    still waited for after its turn while the next is asked (2 brokers: answered at 1.8 s): delivered in
    the first send."""
    async with broker_with_auto_create(create_delay=None, more_brokers=brokers - 1, answer_delay=delay) as (
        broker,
        relay,
    ):
        client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{relay.listen_port}", request_timeout_ms=3000)
        await client.bootstrap()
        try:
            assert len(client.cluster.brokers()) == brokers
        finally:
            await client.close()
        sink = sink_at(relay.listen_port, topic="s-{namespace}", request_timeout_ms=3000, send_timeout=20)
        await sink.start()
        try:
            await broker.create_topics("s-shop")  # after the start: unknown to the producer
            first = await sink.send(occurrences("shop", 3))
        finally:
            await sink.aclose()
        assert first is not None and [o.kind for o in first] == [OutcomeKind.OK] * 3, first
        assert len(await broker.consume("s-shop", expected=3)) == 3
