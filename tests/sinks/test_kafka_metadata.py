"""Kafka: the sink's own metadata request for the topics its producer has no partitions for (item 105),
against brokers that answer it as Kafka does and Tansu does not: a broker with auto-create on answering a
new topic UNKNOWN_TOPIC_OR_PARTITION while its controller creates it, or with the creation's error
(INVALID_REPLICATION_FACTOR, POLICY_VIOLATION), or LEADER_NOT_AVAILABLE; and a broker listed in the
cluster that accepts connections and never answers. Tansu behind the project's relay
(``receivers.kafka_autocreate``), through the engine's own Pipeline. Also the start error of a TLS
certificate naming another host."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import UnknownTopicOrPartitionError
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import BrokerMetadata

from eventrouter import Occurrence, OutcomeKind, SinkContext, SinkError
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.kafka_autocreate import (
    INVALID_REPLICATION_FACTOR,
    LEADER_NOT_AVAILABLE,
    POLICY_VIOLATION,
    UNKNOWN_TOPIC_OR_PARTITION,
    asks,
    broker_with_auto_create,
)
from eventrouter.testing.receivers.silent import SilentServer
from eventrouter.testing.receivers.tansu import TansuBroker, free_port
from eventrouter.testing.receivers.tls_proxy import TLSProxy
from eventrouter.testing.tls import server_context
from eventrouter.testing.waiting import until
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink

LOGGER = "test.kafka.metadata"


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


async def test_the_auto_create_relay_answers_metadata_as_kafka_with_auto_create_on() -> None:
    """The test server's contract (Kafka's ``DefaultAutoTopicCreationManager``): a new topic is answered
    UNKNOWN_TOPIC_OR_PARTITION while it is created and exists afterwards, so a plain aiokafka producer
    waits and writes; a topic whose creation fails is answered the failure's code and never created; a
    request that does not allow creation gets 3 and creates nothing; the brokers listed are Tansu and
    the extra ones; ZooKeeper mode's LEADER_NOT_AVAILABLE while creating."""
    async with (
        SilentServer() as silent,
        broker_with_auto_create(create_delay=0.3, codes={"refused": INVALID_REPLICATION_FACTOR}) as (
            broker,
            relay,
        ),
    ):
        port = relay.listen_port
        producer = AIOKafkaProducer(
            bootstrap_servers=f"127.0.0.1:{port}", enable_idempotence=False, request_timeout_ms=800
        )
        await producer.start()
        try:
            await (await producer.send("new", b"one"))
            with pytest.raises(UnknownTopicOrPartitionError):
                await producer.partitions_for("refused")
        finally:
            await producer.stop()
        new = [code for name, code in relay.answered if name == "new"]
        assert new[0] == UNKNOWN_TOPIC_OR_PARTITION and new[-1] == 0, new
        assert {code for name, code in relay.answered if name == "refused"} == {INVALID_REPLICATION_FACTOR}
        assert [r.value for r in await broker.consume("new", expected=1)] == [b"one"]

        relay.extra_brokers.append((7, silent.port))
        conn = await create_conn("127.0.0.1", port)
        try:
            answer = await conn.send(MetadataRequest(["kept-out"], allow_auto_topic_creation=False))
            assert [(t[0], t[1]) for t in answer.topics] == [(UNKNOWN_TOPIC_OR_PARTITION, "kept-out")]
            assert (7, "127.0.0.1", silent.port) in [tuple(b[:3]) for b in answer.brokers]
            assert len(answer.brokers) == 2
            relay.creating_code = LEADER_NOT_AVAILABLE
            codes: list[int] = []
            async with asyncio.timeout(5):
                while not codes or codes[-1]:  # asked as a client asks, until created
                    if codes:
                        await asyncio.sleep(0.1)
                    answer = await conn.send(MetadataRequest(["zk"]))
                    codes.append(answer.topics[0][0])
            assert codes[0] == LEADER_NOT_AVAILABLE and set(codes) == {LEADER_NOT_AVAILABLE, 0}, codes
        finally:
            conn.close()
        assert "kept-out" not in relay.creating and "refused" not in relay.creating
        # Straight to Tansu: the topics the relay never created do not exist (Tansu asked not to create).
        direct = await create_conn(broker.host, broker.port)
        try:
            answer = await direct.send(
                MetadataRequest(["refused", "kept-out"], allow_auto_topic_creation=False)
            )
            assert sorted((t[1], t[0]) for t in answer.topics) == [
                ("kept-out", UNKNOWN_TOPIC_OR_PARTITION),
                ("refused", UNKNOWN_TOPIC_OR_PARTITION),
            ]
        finally:
            direct.close()


@pytest.mark.parametrize(
    ("code", "named"),
    [
        (INVALID_REPLICATION_FACTOR, "INVALID_REPLICATION_FACTOR (38)"),
        (POLICY_VIOLATION, "POLICY_VIOLATION (44)"),
    ],
)
async def test_a_topic_the_broker_cannot_create_is_set_aside_naming_its_code_while_the_others_go_in(
    code: int, named: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ZooKeeper-mode broker with auto-create on answers a topic it cannot create with the creation's
    error: INVALID_REPLICATION_FACTOR while fewer brokers are alive than default.replication.factor (a
    rolling restart), POLICY_VIOLATION under a create-topic policy. The sink took only 3 as missing:
    such a topic went on to aiokafka, which asked for it ~10 times a second for request_timeout_ms and
    raised UnknownTopicOrPartitionError; that stopped the send, every other topic's records were retried
    with it, and at retry_max_attempts=2 they were dead-lettered with its reason ("[Error 3] ...
    auto-create off"). Now its records are set aside naming the code while the others go in at once,
    and it is asked about once an attempt."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with broker_with_auto_create(codes={"c-dev": code}) as (broker, relay):
        await broker.create_topics("c-shop")
        sink = sink_at(relay.listen_port, topic="c-{namespace}")
        metrics = Metrics()
        pipeline = pipeline_for(
            "kafka",
            sink,
            metrics,
            tmp_path / "dl",
            send_timeout=10,
            retry_max_attempts=2,
            retry_initial_backoff=0.2,
            retry_max_backoff=0.5,
        )
        shop, dev = occurrences("shop", 3), occurrences("dev", 2)
        delivered = metrics.delivered.labels("kafka")
        dead = metrics.dead_lettered.labels("kafka", "retries_exhausted")
        task = asyncio.create_task(pipeline.run())
        try:
            began = time.monotonic()
            for occurrence in [shop[0], dev[0], shop[1], dev[1], shop[2]]:
                pipeline.offer(occurrence)
            await until(lambda: delivered._value.get() == 3, timeout=5)
            took = time.monotonic() - began
            await until(lambda: dead._value.get() == 2, timeout=10)
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 10)
            await pipeline.close_sink()
        written = await broker.consume("c-shop", expected=3)
    lines = [orjson.loads(line) for line in (tmp_path / "dl").read_bytes().splitlines()]
    assert sorted(line["key"] for line in lines) == sorted(o.key for o in dev)  # none of c-shop's
    for line in lines:
        assert f"kafka topic 'c-dev' is not created by the broker: {named}" in line["reason"], line
    assert {dict(r.headers)["occurrence"].decode() for r in written} == {o.key for o in shop}
    assert took < 3.0  # in the first send: no wait of request_timeout_ms, no retry
    # Once a send holding its records: at most once an attempt of each (before: ~10 times a second).
    assert asks(relay.answered, "c-dev") <= len(dev) * 2
    said = [r for r in caplog.records if "'c-dev'" in r.getMessage()]
    assert said and said[0].levelno == logging.WARNING and named in said[0].getMessage()


async def test_a_topic_without_a_leader_is_set_aside_after_a_grace_and_at_once_once_known() -> None:
    """A topic-level LEADER_NOT_AVAILABLE that does not clear (a ZooKeeper-mode broker whose new topic
    gets no leader) counted as present: the send waited request_timeout_ms for its partitions and then
    stopped, the other topics' records retried with it, at every attempt. It is now asked about again
    for a while (at most a fifth of the send's budget: 1.7 s here, under request_timeout_ms of 3 s),
    then set aside naming the code; at its retry, known missing, it is set aside at its first answer."""
    async with broker_with_auto_create(codes={"l-dev": LEADER_NOT_AVAILABLE}) as (broker, relay):
        await broker.create_topics("l-shop")
        sink = sink_at(relay.listen_port, topic="l-{namespace}", request_timeout_ms=3000)
        await sink.start()
        try:
            dev, shop = occurrences("dev", 2), occurrences("shop", 2)
            began = time.monotonic()
            first = await sink.send([dev[0], shop[0], dev[1], shop[1]])
            took = time.monotonic() - began
            asked = asks(relay.answered, "l-dev")
            began = time.monotonic()
            again = await sink.send(dev)
            took_again = time.monotonic() - began
        finally:
            await sink.aclose()
    assert first is not None and again is not None
    assert [first[1].kind, first[3].kind] == [OutcomeKind.OK] * 2, first
    for outcome in [first[0], first[2], *again]:
        assert outcome.kind is OutcomeKind.RETRY and outcome.defer, outcome
        assert "kafka topic 'l-dev' has no leader (LEADER_NOT_AVAILABLE (5)" in outcome.reason
    assert 1.4 < took < 2.5 and asked > 3  # asked again meanwhile, then set aside
    assert took_again < 0.5 and asks(relay.answered, "l-dev") == asked + 1


async def test_a_topic_a_broker_listed_and_aiokafka_then_did_not_find_is_set_aside_not_a_stop() -> None:
    """Kafka's brokers learn of a topic each at its own time: the broker that answered the sink listed
    it, the one aiokafka's own metadata update asked then did not, and aiokafka raised
    UnknownTopicOrPartitionError after request_timeout_ms. Taken as an outage, that stopped the send and
    the other topics' records were retried with it; a broker had just answered, so its records are set
    aside and the others go in."""
    async with broker_with_auto_create(create_delay=None) as (broker, relay):
        sink = sink_at(relay.listen_port, topic="v-{namespace}")
        await sink.start()
        try:
            await broker.create_topics("v-gone", "v-shop")  # after the start: unknown to the producer
            relay.stale["v-gone"] = asks(relay.answered, "v-gone") + 1  # the sink's own ask sees it
            gone, shop = occurrences("gone", 2), occurrences("shop", 2)
            outcomes = await sink.send([gone[0], shop[0], gone[1], shop[1]])
        finally:
            await sink.aclose()
    assert outcomes is not None
    assert [outcomes[1].kind, outcomes[3].kind] == [OutcomeKind.OK] * 2, outcomes
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.kind is OutcomeKind.RETRY and outcome.defer, outcome
        assert "kafka topic 'v-gone' does not exist on the broker (UNKNOWN_TOPIC_OR_PARTITION (3)" in (
            outcome.reason
        )


async def _brokers_listed(port: int) -> list[BrokerMetadata]:
    """The brokers as an aiokafka client lists them (its ``cluster.brokers()``) after bootstrapping at
    ``port``."""
    client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=1000)
    await client.bootstrap()
    try:
        return list(client.cluster.brokers())
    finally:
        await client.close()


async def test_a_silent_broker_listed_first_holds_up_no_topic_lookup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One broker of the cluster accepts connections and never answers (a stall, a network partition
    between the router and it). The sink asked the brokers for the topics its producer has no partitions
    for one after another under one request_timeout_ms, in the order of the client's broker set: listed
    first, the silent one took it all, the batch was retried as "brokers unreachable", and so at every
    attempt: nothing was delivered for as long as it was silent. Its node id is chosen so that it is
    listed first here (checked with a plain aiokafka client), and the topics are created after the
    sink started."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with SilentServer() as silent, broker_with_auto_create(create_delay=None) as (broker, relay):
        [healthy] = await _brokers_listed(relay.listen_port)
        # A client's cluster.brokers() is a set made from the answer's list (the relay's extra broker
        # first): the node id puts the silent broker first in it (always possible: a first slot).
        node = next(
            n
            for n in range(1000, 2000)
            if next(iter({BrokerMetadata(n, relay.host, silent.port, None), healthy})).nodeId == n
        )
        relay.extra_brokers.append((node, silent.port))
        assert [b.nodeId for b in await _brokers_listed(relay.listen_port)] == [node, healthy.nodeId]
        sink = sink_at(relay.listen_port, topic="s-{namespace}")
        metrics = Metrics()
        pipeline = pipeline_for(
            "kafka", sink, metrics, tmp_path / "dl", send_timeout=10, retry_max_backoff=1.0
        )
        delivered = metrics.delivered.labels("kafka")
        task = asyncio.create_task(pipeline.run())
        try:
            await asyncio.wait_for(pipeline.started.wait(), 5)
            # Created after the producer started (its bootstrap learnt every topic there was): topics
            # it has no partitions for, as a new namespace's topic, or a static one created later.
            await broker.create_topics("s-a", "s-b")
            for i in range(10):
                pipeline.offer(make_occurrence(namespace="ab"[i % 2], object_name=f"web-{i}"))
            # aiokafka's own metadata updates (shuffled, each broker its own request_timeout_ms of
            # 1 s) may meet the silent broker once per topic: a few seconds at most.
            await until(lambda: delivered._value.get() == 10, timeout=8)
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 10)
            await pipeline.close_sink()
    assert metrics.retries.labels("kafka")._value.get() == 0
    assert not any("unreachable" in r.getMessage() for r in caplog.records)
    assert silent.connections >= 1  # it was asked


async def test_a_new_topic_that_a_broker_with_auto_create_on_is_creating_is_delivered_not_dead_lettered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka 2.8+ with auto-create on (KRaft: 3.x, all of 4.x) answers a new topic
    UNKNOWN_TOPIC_OR_PARTITION while its controller creates it. The sink took that first answer as
    "auto-create off": an ERROR saying auto.create.topics.enable=false, the records set aside with an
    attempt counted, and at retry_max_attempts=1 every new namespace's first records dead-lettered. The
    topic is now asked about again for a short while, and its records go in within the first send."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with broker_with_auto_create(create_delay=0.3) as (broker, relay):
        await broker.create_topics("n-shop")
        sink = sink_at(relay.listen_port, topic="n-{namespace}")
        metrics = Metrics()
        pipeline = pipeline_for(
            "kafka", sink, metrics, tmp_path / "dl", send_timeout=10, retry_max_attempts=1
        )
        dev, shop = occurrences("dev", 3), occurrences("shop", 3)
        delivered = metrics.delivered.labels("kafka")
        task = asyncio.create_task(pipeline.run())
        try:
            for occurrence in [dev[0], shop[0], dev[1], shop[1], shop[2], dev[2]]:
                pipeline.offer(occurrence)
            await until(lambda: delivered._value.get() == 6, timeout=8)
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 10)
            await pipeline.close_sink()
        written = await broker.consume("n-dev", expected=3)
    assert {dict(r.headers)["occurrence"].decode() for r in written} == {o.key for o in dev}
    assert metrics.dead_lettered.labels("kafka", "retries_exhausted")._value.get() == 0
    assert metrics.retries.labels("kafka")._value.get() == 0
    dev_answers = [code for name, code in relay.answered if name == "n-dev"]
    assert dev_answers[0] == UNKNOWN_TOPIC_OR_PARTITION and 0 in dev_answers, dev_answers
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "auto.create.topics.enable=false" in m or "does not create it" in m], said
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING], said


def _certificate_for(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) naming only the DNS name ``name``, and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize(
    ("address", "mismatch"), [("127.0.0.1", "IP address mismatch"), ("localhost", "Hostname mismatch")]
)
async def test_a_certificate_naming_another_host_says_so_at_start_not_set_ca_file(
    tmp_path: Path, address: str, mismatch: str
) -> None:
    """The CA is right and the certificate names kafka-0.example, the router connecting to 127.0.0.1
    (or localhost): the start error said the certificate was not trusted and to set ca_file, and an
    operator went to change a CA that was right."""
    cert, key = await asyncio.to_thread(_certificate_for, tmp_path, "kafka-0.example")
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        TLSProxy(listen_port=port, target_port=broker.port, ssl_context=server_context(cert, key)),
    ):
        sink = KafkaSink(
            KafkaOptions.model_validate(
                {"brokers": f"{address}:{port}", "ca_file": str(cert), "request_timeout_ms": 2000}
            ),
            SinkContext(name="kafka", cluster="c", data_dir=None, logger=logging.getLogger(LOGGER)),
        )
        with pytest.raises(SinkError) as info:
            await sink.start()
    text = str(info.value)
    assert text.startswith(
        f"cannot connect to Kafka brokers {address}:{port}: TLS: the broker's certificate does not name "
        f"this broker address ({mismatch}"
    ), text
    assert "subjectAltName" in text and "set ca_file" not in text
