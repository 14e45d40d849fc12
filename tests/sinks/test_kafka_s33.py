"""Kafka, session 33 (item 262): a new topic one broker lists and the broker aiokafka's own metadata
request reaches has not learnt yet, for a client that may write it but not create it (Tansu behind the
project's relay ``receivers.kafka_autocreate``); a record under max_request_size but over the topic's
max.message.bytes (Tansu behind ``receivers.kafka_checks``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.kafka_autocreate import (
    TOPIC_AUTHORIZATION_FAILED,
    asks,
    broker_with_auto_create,
)
from eventrouter.testing.receivers.kafka_checks import BrokerChecksProxy
from eventrouter.testing.receivers.tansu import TansuBroker, free_port
from eventrouter.testing.waiting import until
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink

LOGGER = "test.kafka.s33"


def sink_at(port: int, **options: Any) -> KafkaSink:
    model = KafkaOptions.model_validate(
        {"brokers": f"127.0.0.1:{port}", "idempotence": False, "request_timeout_ms": 1000, **options}
    )
    context = SinkContext(
        name="kafka", cluster="c", data_dir=None, logger=logging.getLogger(LOGGER), send_timeout=10.0
    )
    return KafkaSink(model, context)


def assert_listed_then_denied(reason: str, topic: str) -> None:
    """A broker listed the topic and the next one refused it: the reason says so, not that the topic is
    missing or that the client needs CREATE on a topic that exists (item 269)."""
    assert f"topic {topic!r} was listed by a broker" in reason, reason
    assert "TOPIC_AUTHORIZATION_FAILED" in reason and "do not agree on it yet" in reason, reason
    assert "does not exist" not in reason and "grant this client CREATE" not in reason, reason


def occurrences(namespace: str, count: int) -> list[Occurrence]:
    return [make_occurrence(namespace=namespace, object_name=f"{namespace}-{i}") for i in range(count)]


async def test_a_topic_a_broker_listed_and_another_answered_not_authorised_to_create_is_set_aside_not_rejected(
    tmp_path: Path,
) -> None:
    """A client that may write and describe topics but not create them, auto-create on: the sink's own
    lookup reached a broker that has the new topic (0), aiokafka's metadata request then one that has
    not learnt it yet, which answers a request allowing creation TOPIC_AUTHORIZATION_FAILED (the relay's
    ``stale`` with ``codes``). aiokafka raised TopicAuthorizationFailedError, and every record of the
    topic was dead-lettered as "not authorised to write", even with retry_max_attempts=0, though the
    next send delivered. Now they wait aside and go in once the brokers agree."""
    no_create = {"r-dev": TOPIC_AUTHORIZATION_FAILED, "r-ops": TOPIC_AUTHORIZATION_FAILED}
    async with broker_with_auto_create(create_delay=None, codes=no_create) as (broker, relay):
        sink = sink_at(relay.listen_port, topic="r-{namespace}")
        await sink.start()
        try:
            await broker.create_topics("r-dev", "r-shop")  # after the start: unknown to the producer
            relay.stale["r-dev"] = asks(relay.answered, "r-dev") + 1  # the sink's own ask sees it
            dev, shop = occurrences("dev", 2), occurrences("shop", 2)
            outcomes = await sink.send([dev[0], shop[0], dev[1], shop[1]])
        finally:
            await sink.aclose()
        assert outcomes is not None
        assert ("r-dev", 0) in relay.answered and ("r-dev", TOPIC_AUTHORIZATION_FAILED) in relay.answered
        assert [outcomes[1].kind, outcomes[3].kind] == [OutcomeKind.OK] * 2, outcomes
        for outcome in (outcomes[0], outcomes[2]):
            assert outcome.kind is OutcomeKind.RETRY and outcome.defer, outcome
            assert_listed_then_denied(outcome.reason, "r-dev")

        # Through the engine, never giving up: nothing dead-lettered, all in once the brokers agree.
        metrics = Metrics()
        sink = sink_at(relay.listen_port, topic="r-{namespace}")
        await sink.start()  # (idempotent) before the topic exists: a bootstrap lists every topic
        await broker.create_topics("r-ops")
        relay.stale["r-ops"] = asks(relay.answered, "r-ops") + 1
        pipeline = pipeline_for(
            "kafka",
            sink,
            metrics,
            tmp_path / "dl",
            send_timeout=10,
            retry_max_attempts=0,
            retry_initial_backoff=0.2,
            retry_max_backoff=0.5,
        )
        delivered, aside = metrics.delivered.labels("kafka"), metrics.retries.labels("kafka")
        ops, shop = occurrences("ops", 2), occurrences("shop", 1)
        async with drained(pipeline):
            for occurrence in [ops[0], shop[0], ops[1]]:
                pipeline.offer(occurrence)
            await until(lambda: delivered._value.get() == 1 and aside._value.get() >= 2, timeout=8)
            del relay.stale["r-ops"]  # every broker has learnt it
            await until(lambda: delivered._value.get() == 3, timeout=8)
        written = await broker.consume("r-ops", expected=2)
    for reason in ("rejected", "retries_exhausted"):
        assert metrics.dead_lettered.labels("kafka", reason)._value.get() == 0
    assert not (tmp_path / "dl").exists() or not (tmp_path / "dl").read_bytes().strip()
    assert {dict(r.headers)["occurrence"].decode() for r in written} == {o.key for o in ops}


async def test_a_topic_aiokafka_lost_between_its_lookup_and_the_produce_is_set_aside_not_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same, one step later: aiokafka found the topic's partitions, then its metadata request for
    another new topic of the send reached the broker that has not learnt the first (it answered
    TOPIC_AUTHORIZATION_FAILED for it, and aiokafka dropped its partitions), and ``send_batch`` raised
    TopicAuthorizationFailedError: rejected as "not authorised to write". Now set aside."""
    caplog.set_level(logging.WARNING, LOGGER)
    async with broker_with_auto_create(create_delay=None, codes={"s-dev": TOPIC_AUTHORIZATION_FAILED}) as (
        broker,
        relay,
    ):
        sink = sink_at(relay.listen_port, topic="s-{namespace}")
        await sink.start()
        try:
            await broker.create_topics("s-dev", "s-shop")
            # Listed to the sink's lookup and to aiokafka's lookup of s-dev; not to the next requests.
            relay.stale["s-dev"] = asks(relay.answered, "s-dev") + 2
            dev, shop = occurrences("dev", 2), occurrences("shop", 2)
            outcomes = await sink.send([dev[0], shop[0], dev[1], shop[1]])
        finally:
            await sink.aclose()
    assert outcomes is not None
    assert [outcomes[1].kind, outcomes[3].kind] == [OutcomeKind.OK] * 2, outcomes
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.kind is OutcomeKind.RETRY and outcome.defer, outcome
        assert_listed_then_denied(outcome.reason, "s-dev")
    (logged,) = [r.getMessage() for r in caplog.records if "'s-dev'" in r.getMessage()]
    assert_listed_then_denied(logged, "s-dev")


async def test_a_record_over_the_topics_max_message_bytes_is_cut_to_fit_or_rejected_naming_that_limit() -> (
    None
):
    """A topic whose max.message.bytes (3,000 here) is below max_request_size (1 MiB): the broker refuses
    a 5 KB record MESSAGE_TOO_LARGE. It was dead-lettered with a reason naming max_request_size=1048576,
    and oversize=truncate (the default) never cut it. Now it is cut to fit (halved while refused); with
    oversize=reject, or when even an empty message does not fit, the reason names the topic's limit."""
    big = make_occurrence(object_name="big", message="x" * 5000)
    small = make_occurrence(object_name="small")
    huge_rest = make_occurrence(object_name="rest", reason="R" * 4000, message="y" * 100)
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        BrokerChecksProxy(listen_port=port, target_port=broker.port, max_message_bytes=3000) as proxy,
    ):
        cutting = sink_at(port, topic="lim")
        await cutting.start()
        try:
            outcomes = await cutting.send([big, small, huge_rest])
        finally:
            await cutting.aclose()
        refusing = sink_at(port, topic="lim", oversize="reject")
        await refusing.start()
        try:
            refused = await refusing.send([big])
        finally:
            await refusing.aclose()
        records = {r.key: r for r in await broker.consume("lim", expected=2)}
    assert outcomes is not None and refused is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.OK, OutcomeKind.REJECT], outcomes
    cut = records[b"Pod/default/big"]
    value = json.loads(cut.value)
    assert value["truncated"] is True and value["original_bytes"] == len(big.encode(include_raw=False))
    assert value["message"].startswith("xxx") and value["message"].endswith("…")
    assert dict(cut.headers)["truncated"] == b"true"
    assert cutting.modified["truncated"] == 1
    for outcome in (outcomes[2], refused[0]):
        assert outcome.kind is OutcomeKind.REJECT
        assert (
            "the topic's max.message.bytes (or the broker's message.max.bytes) is below it" in outcome.reason
        )
        assert "max_request_size=" not in outcome.reason
    assert "refused a 5" in refused[0].reason  # the record's size (about 5.9 KB), not the client's limit
    assert proxy.refused  # the broker's check, not the client's
