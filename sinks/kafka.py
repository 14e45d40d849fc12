"""Kafka sink: one record per occurrence, produced with aiokafka.

``--sink=kafka:?brokers=kafka-0:9092,kafka-1:9092&topic=k8s-events&compression=zstd``

Record layout
    value    the normalised record as compact JSON (``include_raw=true`` adds the Event object as ``raw``).
    key      the involved object, ``<kind>/<namespace>/<name>`` (namespace empty for cluster-scoped
             objects, e.g. ``Node//node-1``), so the default murmur2 partitioner keeps every event of one
             object on one partition, in order. ``key_by=object_uid`` uses the object's uid instead,
             ``key_by=event`` the Event uid, ``key_by=none`` sends no key (spread over partitions).
             The key is *not* unique per record: never enable log compaction on the topic.
    headers  ``cluster``, ``namespace``, ``type``, ``reason`` and ``occurrence`` (``<event uid>/<n>``, the
             identity consumers de-duplicate on after an at-least-once re-delivery), UTF-8 bytes.
    timestamp the event's normalised time (``timestamp=event``, default) or the send time (``send``). An
             event time more than ``future_grace`` (1 h) ahead — a node whose clock runs ahead — is
             replaced by the time the router received the event, with a ``time_adjusted: true`` header:
             Kafka 4 refuses it (``log.message.timestamp.after.max.ms``), and a far-future timestamp
             would keep its segment from ever expiring by time. So is an event time before 1970: a
             negative timestamp is invalid to Kafka's clients (Kafka Streams' default extractor fails
             on it). A broker that still refuses a record's
             timestamp (a stricter topic) gets it again with the send time and that header, in its
             place among its object's records.

Topic: a literal name or a template over record fields, e.g. ``topic=k8s-events-{namespace}``. Fields:
cluster, namespace, name, uid, type, reason, action, reporting_component, reporting_instance,
source_component, source_host, kind/object_kind, object_name, object_namespace. Substituted values are
mapped to Kafka's topic charset ``[a-zA-Z0-9._-]`` (others become ``_``, empty becomes ``_``; so values
that differ only in such characters share a topic). A rendered name over Kafka's limit of 249 characters
(``{object_name}`` may hold 253) keeps its first 240 and ends in ``-`` and the first 8 hex digits of the
SHA-256 of the whole rendered name, so two long names that share a beginning still name two topics.
A literal topic Kafka refuses (``.``, ``..``, over 249 characters) is a configuration error; a record
whose topic Kafka's naming rules refuse is never sent, but rejected (dead-lettered) naming the topic.

Delivery: the batch's records are partitioned as ``AIOKafkaProducer.send`` would (murmur2 of the key),
packed in order into produce batches per topic-partition (aiokafka's batch API; up to
min(max_request_size, 512 KiB) each, compressed per batch) and an item is OK only once its produce batch
was acknowledged by the broker (``acks=all`` by default; idempotence on by default). A record over
``max_request_size`` gets its message cut to fit (``oversize=truncate``, the default: the value then says
``"truncated": true`` and ``original_bytes``, without ``raw``, and a ``truncated: true`` header is added);
so does a lone record the broker refuses MESSAGE_TOO_LARGE (the topic's ``max.message.bytes`` below
``max_request_size``), cut to half its size, and again while refused, in its place.
Records the broker took truncated or with a timestamp other than their event time are counted
(``KafkaSink.modified``: ``eventrouter_sink_modified_total``) and logged with their counts, at once, then at
most once a minute, and what is left at close.
Records still too large and authorisation failures are rejected (dead-lettered) per item; a produce batch
the broker refuses as a whole (too large for the topic, a timestamp in it out of range) is sent again in
halves (up to 8 records: one record per batch), so each record gets its own outcome. A topic-partition's
produce batches go one after the other, each once the one before was acknowledged, and a refused batch's
pieces go in its place: one object's records are written in batch order. Broker outages, timeouts and
other errors give retry outcomes, and the rest of the batch is not enqueued once the broker is known
unreachable (nor later batches of a partition whose batch is retried), so per-object order survives.
A topic the broker does not have and does not create (``auto.create.topics.enable=false``, a client not
allowed to create topics, a creation the broker refuses) holds back no other topic. aiokafka alone waits
``request_timeout_ms`` for such a topic and raises UnknownTopicOrPartition, as it does when the broker is
down, so the topics of a send that the producer has no partitions for yet are first asked about in one
metadata request (the brokers asked one after another, each in its turn: its share of
``request_timeout_ms``, at least 2 s or half what is left; a broker whose connection is made is still
waited for after its turn while the next one is asked, and the first answer is taken; one whose
connection is still being made at its turn's end, as one that never answers, costs its turn). Kafka 2.8+
with auto-create on answers a new topic UNKNOWN_TOPIC_OR_PARTITION while its controller creates it (a
ZooKeeper-mode broker LEADER_NOT_AVAILABLE), so a topic first answered so is asked about again every
0.15 s for up to 2 s (at most a fifth of the send's budget). The records of a topic still unknown then,
without a leader, or answered with a creation error (INVALID_REPLICATION_FACTOR while brokers are down,
POLICY_VIOLATION under a create-topic policy, …) are set aside, naming that answer (a retry each with its
own backoff, still counted towards ``retry_max_attempts``) while the send's other topics are delivered; a
topic known missing is set aside at its first answer, and so is one a broker listed whose partitions
aiokafka then did not find. Each topic is logged once at WARNING (again after an hour without it), at
ERROR once when still missing 10 s later, and asked about again at each retry, so the records go in once
it exists. With auto-create on, Kafka answers a missing topic this client may not create (no CREATE
permission on the cluster or the topic) TOPIC_AUTHORIZATION_FAILED: it is asked about again without
allowing creation, and answered UNKNOWN_TOPIC_OR_PARTITION then, its records are set aside as a missing
topic's, naming the CREATE permission; a topic not authorised either way (no DESCRIBE) is rejected. When
no broker answers, the whole batch is retried.
A send ends by itself within ``send_budget`` (five sixths of the pipeline's ``send_timeout``, from
``SinkContext``): aiokafka never expires an idempotent producer's batches, and retries a batch the broker
answers with a retriable error (NOT_ENOUGH_REPLICAS while a partition lacks in-sync replicas,
REQUEST_TIMED_OUT) for ever. What was acknowledged by then is OK; a batch not acknowledged is retried (with
what follows it on its partition) and its producer discarded without flushing; what was not sent yet
(refused batches going again in pieces, slowly) comes back as a hold, sent again at once without counting
as a failed attempt; beside records the same send set aside (a refused partition, a missing topic) it
waits aside too, due at once and in its partition's place (in place, it took them back with it, each resend
an attempt). No batch is handed over in the budget's last tenth, nor one whose answer, if as slow
as the slowest of the send, would come too late. A batch handed over late (in the budget's last
``request_timeout_ms`` and its second half) is waited for until ``request_timeout_ms`` after that (its
produce request answered or timed out), past the budget if need be but not past ``send_timeout`` less a
margin (1 s, at most a twelfth): a slow acknowledgement (``acks=all`` with a slow follower) is not given up
and then sent again beside what the broker wrote. One handed over earlier and unanswered at the budget's
end is given up then (a partition answering a retriable error). A batch given up whose answer still comes
before the send ends (another batch waited for past the budget) counts as answered. A new producer
(after an idempotence refusal or a discarded one) is waited for until the budget's last tenth; one still
starting then (the broker slow to hand out a producer id) goes on starting for the next send, and this
send is retried with nothing sent. A send the engine gives up on all
the same (its ``send_timeout``, a stop) discards its producer without flushing it, so what that send
queued is not written beside the engine's retry of the same records. The next send starts a new producer;
``aclose`` does not flush either (after a send returns nothing of it is queued; anything still queued
belongs to a send the engine retries). A produce request already on its way to the broker when the send
was given up may still be written: at least once, never lost.

A partition the broker refuses (a batch not acknowledged at the budget's end, or answered a retriable error)
holds back no other: when the broker took another batch of the send, answered that partition with an error,
or refused it before, its records are set aside (a retry each, still counted towards
``retry_max_attempts``) and later batches go on. They are offered again together, after the partition's own
backoff (1 s, doubled at each refusal up to the pipeline's ``retry_max_backoff``). A partition's batch is
given up at the broker's first answer that proves nothing was written (NOT_ENOUGH_REPLICAS: refused before
the append) when the partition is known to refuse, and after 2 s of such answers when not (a brief one is
aiokafka's to retry), read from this producer's own produce answers (never from log lines:
another sink's, or a log level above WARNING); its producer goes on, and the send ends when the other
partitions' batches are answered. Answers that leave the write open (NOT_LEADER_OR_FOLLOWER,
UNKNOWN_TOPIC_OR_PARTITION, REQUEST_TIMED_OUT, NOT_ENOUGH_REPLICAS_AFTER_APPEND, a lost connection), and a
NOT_ENOUGH_REPLICAS to a batch one of them answered before, are waited for as before. A later record of the
partition goes only after every one before it (by when the router received it) was written or given up by
the engine (``given_up``), however long they wait (parked in the spool); the others wait aside too (held:
no attempt), offered again just after them. Nothing the broker acknowledged is sent again. With no answer
from the broker at all (it is away) the records are retried in place, as the others.

kube-eventer names accepted: ``brokers`` (repeatable), ``eventstopic``, ``compression``, ``user``,
``password``, ``cacert``, ``cert``, ``key``, ``insecuressl``. As in kube-eventer, giving a CA or a client
certificate turns TLS on, and ``user`` + ``password`` turn SASL PLAIN on. A broker is ``host``,
``host:port`` or an IPv6 address (``[2001:db8::1]:9092``); one written with user info
(``user:password@host:9092``) or a scheme (``sasl_ssl://``) is a configuration error naming its
position (``brokers[1]``), never its text: SASL credentials go in ``user`` and ``password=env:NAME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
import itertools
import logging
import math
import random
import re
import ssl
import string
import struct
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from pydantic import AliasChoices, Field, field_validator, model_validator

from eventrouter import (
    OK,
    Occurrence,
    Outcome,
    OutcomeKind,
    RetryableError,
    Secret,
    Sink,
    SinkContext,
    SinkError,
    SinkOptions,
    reject,
    retry,
)
from eventrouter.logs import Throttled
from eventrouter.options import FilePath, shown_address
from eventrouter.truncate import shorten_message

from ._modified import ModifiedLog

__all__ = ["KafkaOptions", "KafkaSink", "render_topic", "ssl_context", "topic_fields", "topic_problem"]

_MAX_TOPIC_LEN = 249  # Kafka's Topic.MAX_NAME_LENGTH
_UNKNOWN_TOPIC_OR_PARTITION = 3
_LEADER_NOT_AVAILABLE = 5  # in a metadata answer: being created (auto-create on)
_INVALID_TOPIC = 17
_TOPIC_AUTHORIZATION_FAILED = 29
_LISTED_THEN_DENIED = -_TOPIC_AUTHORIZATION_FAILED
"""Not Kafka's: the code ``_missing_text`` knows a 29 by, raised by aiokafka's own metadata request for a
topic a broker listed (``_metadata_denied``): not known missing, so not named so."""
_BEING_CREATED = frozenset({_UNKNOWN_TOPIC_OR_PARTITION, _LEADER_NOT_AVAILABLE})
"""A topic's answers while a broker with auto-create on creates it: Kafka 2.8+ sends the creation to its
controller and answers 3 until the topic is there (``DefaultAutoTopicCreationManager``: KRaft, all of
4.x), a ZooKeeper-mode broker 5 until it has leaders."""
_CREATE_GRACE = 2.0
"""Seconds a topic first answered one of _BEING_CREATED is asked about again (every _CREATE_POLL) before
its records are set aside: taken at once as "auto-create off", every new topic of a broker with
auto-create on was set aside, logged as never created, and dead-lettered at retry_max_attempts=1."""
_CREATE_POLL = 0.15
_TURN = 2.0
"""Seconds a broker is asked alone in a topic lookup at least (or half what is left of
``request_timeout_ms``, if less), however many brokers there are: see ``KafkaSink._topic_errors``."""
_CREATE_SHARE = 0.2
"""The share of the send's budget (from its start) that asking again for new topics may take."""
_CREATE_HINTS = {
    _UNKNOWN_TOPIC_OR_PARTITION: "auto.create.topics.enable off, or a creation still under way",
    _LEADER_NOT_AVAILABLE: "still being created, or its brokers are down",
    38: "fewer brokers alive than default.replication.factor, e.g. during a rolling restart",
    44: "refused by the broker's create.topic.policy: create the topic yourself",
}
"""Why a topic is missing, by the broker's answer (38: INVALID_REPLICATION_FACTOR, 44: POLICY_VIOLATION,
the creation errors of a ZooKeeper-mode broker)."""
_NAME_MISMATCH = frozenset({62, 64})
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""
_MISSING_MEMORY = 3600.0  # seconds: a missing topic not seen missing for this long is logged again
_MISSING_LOUD = 10.0  # seconds: a topic still missing this long after its first sighting is an ERROR
_MISSING_KEPT = 4096  # missing topics remembered (names may come from field values)
_TOPIC_HASH_LEN = 8  # hex digits of the suffix that keeps long names apart (as the Elasticsearch sink's)
# fullmatch, never match with ^…$: "$" also matches before a final newline, and "k8s-events\n" (a YAML
# block scalar) passed as a valid name, then was retried for ever.
_TOPIC_CHARS = re.compile(r"[a-zA-Z0-9._-]*")
_TOPIC_BAD = re.compile(r"[^a-zA-Z0-9._-]")

TOPIC_FIELDS = frozenset(
    {
        "cluster",
        "namespace",
        "name",
        "uid",
        "type",
        "reason",
        "action",
        "reporting_component",
        "reporting_instance",
        "source_component",
        "source_host",
        "kind",
        "object_kind",
        "object_name",
        "object_namespace",
    }
)


def _flatten(value: Any) -> Any:
    """``a,b`` and repeated keys (a list, each maybe ``a,b``) both give one flat list."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
    return value


def _parse_template(template: str) -> list[tuple[str, str | None]]:
    """Split a topic template into (literal, field) pairs; raise ValueError on anything but ``{field}``."""
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"topic template {template!r}: {exc}") from None
    for literal, field, spec, conversion in parsed:
        if not _TOPIC_CHARS.fullmatch(literal):
            raise ValueError(
                f"topic {template!r}: {literal!r} has characters Kafka does not allow (use a-z A-Z 0-9 . _ -)"
            )
        if field is not None:
            if field not in TOPIC_FIELDS:
                raise ValueError(
                    f"topic template {template!r}: unknown field {{{field}}}; "
                    f"use one of {', '.join(sorted(TOPIC_FIELDS))}"
                )
            if spec or conversion:
                raise ValueError(f"topic template {template!r}: format specs and conversions are not allowed")
        parts.append((literal, field))
    return parts


def topic_fields(record: dict[str, Any]) -> dict[str, str]:
    """The values a topic template can use, from one normalised record."""
    involved = record.get("involved_object") or {}
    values = {name: str(record.get(name) or "") for name in TOPIC_FIELDS}
    values["kind"] = values["object_kind"] = str(involved.get("kind") or "")
    values["object_name"] = str(involved.get("name") or "")
    values["object_namespace"] = str(involved.get("namespace") or "")
    return values


def _sanitise(value: str) -> str:
    return _TOPIC_BAD.sub("_", value) or "_"


def topic_problem(name: str) -> str | None:
    """Why Kafka refuses ``name`` as a topic (its ``Topic.validate`` rules), or None. The broker says
    INVALID_TOPIC_EXCEPTION in its metadata answer, which aiokafka only logs: it asks again until
    ``request_timeout_ms`` and raises UnknownTopicOrPartitionError, which reads as "retry"."""
    if name in ("", ".", ".."):
        return "is not a valid topic name ('', '.' and '..' are not allowed)"
    if len(name) > _MAX_TOPIC_LEN:
        return f"is {len(name)} characters long, over Kafka's limit of {_MAX_TOPIC_LEN}"
    if not _TOPIC_CHARS.fullmatch(name):
        return "has characters Kafka does not allow (use a-z A-Z 0-9 . _ -)"
    return None


def render_topic(parts: Sequence[tuple[str, str | None]], record: dict[str, Any]) -> str:
    """Fill a parsed template from a record; substituted values are made topic-safe, and a name over
    249 characters is cut and ends in a hash of the whole name."""
    values = topic_fields(record)
    topic = "".join(literal + (_sanitise(values[field]) if field else "") for literal, field in parts)
    if len(topic) > _MAX_TOPIC_LEN:
        # Cut alone, two names sharing their first 249 characters (long object names with one
        # prefix) wrote into one topic, each object's events mixed into the other's. ASCII only here.
        digest = hashlib.sha256(topic.encode()).hexdigest()[:_TOPIC_HASH_LEN]
        topic = f"{topic[: _MAX_TOPIC_LEN - 1 - _TOPIC_HASH_LEN]}-{digest}"
    return "_" if topic in ("", ".", "..") else topic


_CREDENTIALS_HINT = (
    "a broker is host or host:port (e.g. kafka-0:9092), without user info or a scheme: give SASL "
    "credentials as user= and password=env:NAME (or file:/path), and TLS as tls=true or ca_file"
)


def _without_user_info(brokers: Sequence[str]) -> None:
    """ValueError naming the positions of the brokers holding an ``@``, never their text: it is user
    info (``user:password@host:9092``, the form other sinks take in their URL), which aiokafka reads
    as a host name and then printed in every start retry, its own log lines and ``check``. All are
    looked at before any is shown: a comma in the password splits it into two brokers, the first
    (``user:pa``) holding no ``@``."""
    held = [f"brokers[{i}]" for i, broker in enumerate(brokers) if "@" in broker]
    if held:
        raise ValueError(
            f"{', '.join(held)} {'holds' if len(held) == 1 else 'hold'} an @ (user info, not shown): "
            f"{_CREDENTIALS_HINT}"
        )


def _broker_address(text: str, position: str) -> None:
    """A bootstrap address as aiokafka reads it (``host``, ``host:port``, ``[v6]:port``, a bare IPv6
    address; port 9092 when left out), or ValueError naming it (``position``: ``brokers[1]``): a typo
    is a configuration error at start, not a producer that cannot connect. ``text`` holds no ``@``
    (``_without_user_info``); it is shown as URLs are all the same (no user info, path or query)."""
    shown = shown_address(text)
    if "://" in text:
        raise ValueError(
            f"broker {shown!r} must be host or host:port, without a scheme ({position}): the security "
            "protocol follows from the options (user= and password=env:NAME for SASL, tls=true or "
            "ca_file for TLS)"
        )
    try:
        from aiokafka.conn import get_ip_port_afi
    except ImportError:  # the kafka extra is not installed: the sink's start says so
        return
    try:
        host, port, _ = get_ip_port_afi(text)
    except ValueError:
        host, port = "", 0
    if not host or "/" in host or not 0 < port < 65536:
        raise ValueError(
            f"broker {shown!r} must be host or host:port with a port in 1-65535 ({position}; e.g. "
            "kafka-0:9092)"
        )
    if ":" in host and not _ipv6(host):
        # aiokafka splits at the last ':' only: `a:b:9092` gave the host `a:b`, never resolved.
        where = "its host in brackets is no IPv6 address" if text.startswith("[") else "its host holds a ':'"
        raise ValueError(
            f"broker {shown!r} must be host or host:port: {where} ({position}; an IPv6 address goes in "
            "brackets, e.g. [2001:db8::1]:9092)"
        )


def _ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


class KafkaOptions(SinkOptions):
    brokers: list[str] = Field(
        default_factory=list,
        description="Bootstrap brokers host:port (comma-separated or repeated). Also taken from the URL.",
    )
    topic: str = Field(
        "k8s-events",
        validation_alias=AliasChoices("topic", "eventstopic"),
        description="Topic name or template over record fields, e.g. k8s-events-{namespace}. A rendered "
        "name over 249 characters keeps its first 240, then - and 8 hex digits of its SHA-256. Records "
        "of a topic the broker does not have or create (auto-create off or refused; a new topic is asked "
        "about again for up to 2 s first) are set aside and retried while other topics go on.",
    )
    key_by: Literal["object", "object_uid", "event", "none"] = Field(
        "object", description="Record key: involved object kind/namespace/name (default), its uid, event uid."
    )
    timestamp: Literal["event", "send"] = Field(
        "event", description="Kafka record timestamp: the event's normalised time, or the send time."
    )
    future_grace: float = Field(
        3600.0,
        gt=0,
        allow_inf_nan=False,  # inf: int(inf * 1000) raised OverflowError out of the sink's construction
        description="Seconds: an event time further ahead (a node's clock off) is not used as the record "
        "timestamp (Kafka 4 refuses it: log.message.timestamp.after.max.ms, 1 h); the time the router "
        "received it is, with a time_adjusted header.",
    )
    acks: Literal["all", "1", "0"] = Field("all", description="Broker acknowledgements: all (-1), 1 or 0.")
    idempotence: bool = Field(
        True,
        validation_alias=AliasChoices("idempotence", "enable_idempotence"),
        description="Idempotent producer (needs acks=all; turn off for brokers without support).",
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none",
        validation_alias=AliasChoices("compression", "compression_type"),
        description="Batch compression codec.",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (default PLAIN when user and password are set)."
    )
    user: str | None = Field(
        None, validation_alias=AliasChoices("user", "username"), description="SASL user name."
    )
    password: Secret | None = Field(None, description="SASL password (literal, env:NAME or file:/path).")
    tls: bool = Field(
        False, description="Connect with TLS (implied by ca_file, cert_file or insecure_skip_verify)."
    )
    ca_file: FilePath | None = Field(
        None, validation_alias=AliasChoices("ca_file", "cacert"), description="CA bundle for the brokers."
    )
    cert_file: FilePath | None = Field(
        None, validation_alias=AliasChoices("cert_file", "cert"), description="Client certificate (mTLS)."
    )
    key_file: FilePath | None = Field(
        None, validation_alias=AliasChoices("key_file", "key"), description="Client private key (mTLS)."
    )
    key_password: Secret | None = Field(
        None,
        description="Pass phrase of an encrypted key_file (literal, env:NAME or file:/path; never asked "
        "for on a terminal).",
    )
    insecure_skip_verify: bool = Field(
        False,
        validation_alias=AliasChoices("insecure_skip_verify", "insecuressl"),
        description="Do not verify the brokers' certificates (testing only).",
    )
    client_id: str = Field("eventrouter", description="Kafka client id.")
    request_timeout_ms: int = Field(
        10_000, ge=100, description="Produce request and batch expiry timeout; keep below send_timeout."
    )
    max_request_size: int = Field(
        1_048_576,
        ge=1024,
        description="Largest record in bytes (keep it at most the topic's max.message.bytes); see oversize.",
    )
    oversize: Literal["truncate", "reject"] = Field(
        "truncate",
        description="Records over max_request_size (or refused by the broker as over the topic's "
        "max.message.bytes): the message cut to fit (the value says truncated, with a truncated header) "
        "or reject to the dead-letter file.",
    )

    @field_validator("brokers", mode="before")
    @classmethod
    def _brokers_list(cls, value: Any) -> Any:
        return _flatten(value)

    @field_validator("brokers")
    @classmethod
    def _brokers_addresses(cls, value: list[str]) -> list[str]:
        _without_user_info(value)
        for i, broker in enumerate(value):
            _broker_address(broker, f"brokers[{i}]")
        return value

    @field_validator("url")
    @classmethod
    def _url_without_user_info(cls, value: str) -> str:
        # `kafka:user:pw@k:9092` (the brokers' shorthand) is refused as brokers= is, and never shown:
        # the check's "valid kafka (kafka URL)" line prints the URL.
        if "@" in value:
            raise ValueError(f"the sink's URL holds an @ (user info, not shown): {_CREDENTIALS_HINT}")
        return value

    @field_validator("acks", mode="before")
    @classmethod
    def _acks(cls, value: Any) -> Any:
        text = str(value).strip().lower()
        return "all" if text in ("-1", "all") else text

    @field_validator("compression", mode="before")
    @classmethod
    def _compression(cls, value: Any) -> Any:
        return "none" if value in (None, "") else str(value).lower()

    @field_validator("sasl_mechanism", mode="before")
    @classmethod
    def _mechanism(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) and value else (value or None)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not value:
            raise ValueError("topic must not be empty")
        parts = _parse_template(value)
        if all(field is None for _, field in parts):  # a template's names are made valid as rendered
            problem = topic_problem(value)
            if problem is not None:
                raise ValueError(f"topic {value!r} {problem}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _brokers_from_url(cls, data: Any) -> Any:
        # `--sink=kafka:host:9092,host2:9092` as a shorthand for brokers=...
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            url = data["url"].removeprefix("kafka://").strip("/")
            if url and "@" not in url:  # refused as the url alone (_url_without_user_info), said once
                if data.get("brokers"):
                    # The url's were ignored while `check` and the logs showed them as the address.
                    raise ValueError("give the brokers in the url or in brokers=, not both")
                data = {**data, "brokers": url}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> KafkaOptions:
        if not self.brokers:
            raise ValueError("brokers is required (brokers=host:9092,host2:9092)")
        if self.idempotence and self.acks != "all":
            raise ValueError("idempotence needs acks=all (or set idempotence=false)")
        if (self.user is None) != (self.password is None):
            raise ValueError("SASL needs both user and password")
        if self.sasl_mechanism is not None and self.user is None:
            raise ValueError(f"sasl_mechanism={self.sasl_mechanism} needs user and password")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        if self.key_password is not None and not self.cert_file:
            raise ValueError("key_password needs cert_file and the encrypted key (key_file or in cert_file)")
        return self

    @property
    def use_tls(self) -> bool:
        return bool(self.tls or self.ca_file or self.cert_file or self.insecure_skip_verify)

    @property
    def use_sasl(self) -> bool:
        return self.user is not None


_ENCRYPTED_KEY = (
    "the client key (key_file, or cert_file when it holds it) is encrypted: give a decrypted key, or its "
    "pass phrase in key_password"
)


def ssl_context(options: KafkaOptions) -> ssl.SSLContext:
    """The TLS context for the brokers; OSError/ssl.SSLError name the file that failed, never the pass
    phrase (OpenSSL's texts do not hold it)."""
    context = ssl.create_default_context(cafile=options.ca_file)
    if options.cert_file:
        _load_client_key(context, options.cert_file, options)
    if options.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _load_client_key(context: ssl.SSLContext, cert_file: str, options: KafkaOptions) -> None:
    """The client certificate and its key, opened with ``key_password`` when OpenSSL asks for one."""
    phrase = options.key_password
    asked = False

    def pass_phrase() -> str:
        # Always given: without it OpenSSL asks for an encrypted key's pass phrase on the terminal (the
        # event loop waits for someone to type) or fails with "[Errno 22] Invalid argument".
        nonlocal asked
        asked = True
        if phrase is None:
            raise ssl.SSLError(0, _ENCRYPTED_KEY)
        return phrase.get_secret_value()

    try:
        context.load_cert_chain(cert_file, options.key_file, password=pass_phrase)
    except (ssl.SSLError, ValueError) as exc:
        # Asked and given, the pass phrase did not open the key (OpenSSL says only "[SSL] PEM lib"), or
        # is over OpenSSL's 1024 bytes (ValueError). A key it opened that does not match the
        # certificate is said as OpenSSL says it.
        if not asked or phrase is None or getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise
        where = f"key_file {options.key_file}" if options.key_file else f"cert_file {cert_file}"
        detail = f": {exc}" if isinstance(exc, ValueError) else ""
        raise ssl.SSLError(0, f"key_password does not decrypt the client key ({where}){detail}") from None


class _BootstrapErrors(logging.Handler):
    """Why each bootstrap connection failed. aiokafka logs it ('Unable connect to "%s:%s": %s', its
    client.bootstrap) and raises only "Unable to bootstrap", which names no cause: a wrong password,
    a mechanism the listener does not offer, TLS against a plaintext port all read the same."""

    _MESSAGES = ("Unable connect to", "Unable to request metadata from")

    def __init__(self, brokers: Sequence[str]) -> None:
        super().__init__(logging.DEBUG)
        from aiokafka.conn import get_ip_port_afi

        self._brokers = {get_ip_port_afi(b)[:2] for b in brokers}
        self.errors: list[tuple[str, BaseException]] = []  # (which step, the error)

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if (
            isinstance(record.msg, str)
            and record.msg.startswith(self._MESSAGES)
            and isinstance(args, tuple)
            and len(args) == 3
            and isinstance(args[2], BaseException)
            and (args[0], args[1]) in self._brokers
        ):
            self.errors.append((record.msg.split('"')[0].strip(), args[2]))


def _header(value: Any) -> bytes:
    if type(value) is str:
        return value.encode("utf-8", "replace")
    return str(value or "").encode("utf-8", "replace")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~3x per record
class _Message:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None


@dataclass(slots=True)
class _Batch:
    """One produce batch: an aiokafka BatchBuilder and the (batch index, message) pairs it holds."""

    topic: str
    partition: int
    builder: Any
    items: list[tuple[int, _Message]]


_TIME_ADJUSTED = ("time_adjusted", b"true")
_TRUNCATED = ("truncated", b"true")
_CLOCK_MARGIN_MS = 60_000
"""Kept inside the broker's window (at most a quarter of it): it judges by its own clock."""
_STAMPED = 1
"""Sink._changed: sent with a timestamp other than its event time (the ``time_adjusted`` header)."""
_CUT = 2
"""Sink._changed: sent with its message cut to fit max_request_size or the topic's limit (``truncated``)."""
_MODIFIED_LOG_EVERY = 60.0
"""Seconds between two logs of the records delivered changed (and of the broker refusing a timestamp or
a record's size)."""


def _halt(producer: Any) -> None:
    """Stop an aiokafka producer's sender before it drains another batch, without flushing; its
    ``stop()`` (which would flush) does nothing afterwards."""
    producer._closed = True
    # aiokafka internals (as of 0.14): read defensively, so another version degrades to a plain close.
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if isinstance(task, asyncio.Task) and not task.done():
        task.cancel()


async def _start(producer: Any, patience: float) -> None:
    """``producer.start()``; cancelled during its bootstrap, the bootstrap may first end for up to
    ``patience`` seconds (its metadata request's own bound): cancelled in that request, aiokafka (as of
    0.14) leaves the connection open. The producer id wait after the bootstrap is safe to cancel."""
    # aiokafka internals (producer.start() is the bootstrap, then this), read defensively as in _halt.
    start_sender: Any = getattr(getattr(producer, "_sender", None), "start", None)
    if patience <= 0 or not callable(start_sender):
        await producer.start()
        return
    bootstrap = asyncio.ensure_future(producer.client.bootstrap())
    try:
        await asyncio.shield(bootstrap)
    except asyncio.CancelledError:
        try:
            await asyncio.wait([bootstrap], timeout=patience)
        finally:
            # Even when cancelled again in that wait: left running, the bootstrap went on against the
            # client closed under it and, answered, started a metadata synchronizer that ran for ever.
            bootstrap.cancel()
            await asyncio.wait([bootstrap])  # a cancelled connect closes its connection at once
            if not bootstrap.cancelled():
                bootstrap.exception()  # retrieved: the cancellation is what is raised
        raise
    await start_sender()


def _whole_batch_errors() -> tuple[type[BaseException], ...]:
    from aiokafka import errors as kerr

    return (
        kerr.MessageSizeTooLargeError,
        kerr.RecordListTooLargeError,
        kerr.RecordTooLargeError,
        kerr.InvalidTimestampError,
        kerr.UnknownError,  # INVALID_RECORD (87) among them: one record's fault, e.g. a missing key
    )


def _partition_errors() -> tuple[type[BaseException], ...]:
    """A broker's answer for one partition (not a lost connection, nor the client's own timeout)."""
    from aiokafka.errors import BrokerResponseError

    return (BrokerResponseError,)


def _error_name(code: int) -> str:
    """Kafka's name of a protocol error code, e.g. NOT_ENOUGH_REPLICAS (19)."""
    from aiokafka.errors import for_code

    name = getattr(for_code(code), "message", "") or "error"
    return f"{name} ({code})"


def _give_back_sequence(producer: Any, job: _Batch) -> bool:
    """Set ``producer``'s next sequence number for the batch's partition back to the batch's own, as
    the broker, which did not write it, still expects. aiokafka internals (as of 0.14: the transaction
    manager's numbers; the batch as sent, whose v2 header holds its producer id, base sequence and
    record count), read defensively: False when they differ or another batch of the partition took
    numbers since (the caller then makes a new producer, as for any lost sequence)."""
    from aiokafka.structs import TopicPartition

    manager = getattr(producer, "_txn_manager", None)
    numbers = getattr(manager, "_sequence_numbers", None)
    sent = getattr(job.builder, "_buffer", None)
    if (
        not isinstance(numbers, dict)
        or not isinstance(sent, bytes | bytearray | memoryview)
        or len(sent) < 61
    ):
        return False
    producer_id, _epoch, base, count = struct.unpack_from(">qhii", sent, 43)
    tp = TopicPartition(job.topic, job.partition)
    taken = numbers.get(tp)
    if (
        producer_id != getattr(manager, "producer_id", None)
        or count != len(job.items)
        or not isinstance(taken, int)
        or (taken - base) % 2**32 != count
    ):
        return False
    numbers[tp] = base
    return True


_ONE_BY_ONE = 8
"""A refused produce batch of up to this many records is sent again one record per batch, a larger one
in halves: for a few records halving costs more round trips (and, with idempotence, new producers)."""


_SUBMIT_SHARE = 0.9
"""No batch is handed to the producer (nor a new producer started) after this share of the budget."""
_ANSWER_MARGIN = 1.0
"""Seconds (at most a twelfth of ``send_timeout``) a send keeps between the last acknowledgement it
waits for and the engine's ``send_timeout``: to answer, and for an event loop late in waking it."""
_API_PRODUCE = 0
_NOTHING_WRITTEN = frozenset({19})
"""Produce answers for a partition that prove its batch was not appended: NOT_ENOUGH_REPLICAS, refused
before the append (Kafka's ``Partition.appendRecordsToLeader``). Not NOT_LEADER_OR_FOLLOWER (6) nor
UNKNOWN_TOPIC_OR_PARTITION (3): an acks=all batch is appended to the leader's log first, and a leader
that moves (or a replica removed) while it waits for the followers answers those (``DelayedProduce``),
the new leader usually holding the batch; nor REQUEST_TIMED_OUT (7), NOT_ENOUGH_REPLICAS_AFTER_APPEND
(20). Cut short there, the sequence given back, a resent batch of other records was written beside it
(a session 27 review). aiokafka retries those with the same sequence: the broker drops a copy. A retry
of a batch one of those answered may be refused with 19 all the same (Kafka checks the in-sync replicas
before its duplicate-batch check), so such a batch is never cut short (``_open``)."""


def _produce_partitions(request: Any) -> list[tuple[str, int]] | None:
    """The (topic, partition) pairs a produce request carries, or None when its layout is unknown.
    aiokafka 0.14's ``ProduceRequest`` keeps them in ``_topics`` (earlier versions, the request struct
    itself, in ``topics``): read as ``topics`` only, a request lost on its way back marked nothing
    open, and a batch the broker had written was cut at its retry's NOT_ENOUGH_REPLICAS and written
    again (a session 28 review)."""
    for name in ("_topics", "topics"):
        topics = getattr(request, name, None)
        if isinstance(topics, list | tuple):
            try:
                return [(topic, entry[0]) for topic, partitions in topics for entry in partitions]
            except (TypeError, ValueError, IndexError):
                return None
    return None


_CUT_GRACE = 2.0
"""Seconds a partition not known to refuse is left to aiokafka's retries (every 100 ms) after its first
NOT_ENOUGH_REPLICAS of a send before its batch is cut: a follower briefly out of the in-sync replicas
costs no attempt and no backoff (cut at once, a refusal flapping every 100 ms held the partition 11 s
and dead-lettered records at retry_max_attempts=3; a session 28 review); a rolling restart's refusal
lasts longer. A partition known to refuse is cut at its first refusal."""
_CUT_CODE = -1
"""What a partition's answer proving nothing written becomes, for a batch the send gives up at once: an
error aiokafka does not retry (UnknownError), so the batch fails instead of being retried for ever. Even
at the partition's first refusal: retried, it held the whole sink (every topic) until the send's budget
at the start of each rolling restart, and its producer was renewed. A refusal that clears within
aiokafka's retry backoff (100 ms) now costs the partition its first backoff (``_PROBE_FIRST``) instead."""
_Place = tuple[float, float]
"""A record's place in its partition: when the router received it, then a tie-break (the order in
which the sink noted it; infinity for one not noted)."""
_PROBE_FIRST = 1.0
"""Seconds before a refused partition's records set aside are offered again the first time; doubled at
each refusal, up to the pipeline's retry_max_backoff."""
_HOLD_AGAIN = 1.0
"""Seconds after its partition's set-aside records a record held back behind them is offered again
(not an attempt: nothing was sent): they come first, and it finds them written."""


@dataclass(slots=True)
class _Missing:
    """A topic whose records were set aside as missing: its first and last sighting (time.monotonic),
    and whether it was logged at ERROR (still missing _MISSING_LOUD after the first)."""

    first: float
    last: float
    loud: bool = False


class _Asked:
    """Metadata requests in flight to several brokers at once, each on a connection already made; the
    first answer is taken (see ``KafkaSink._topic_errors``)."""

    def __init__(self, failure: BaseException) -> None:
        self.requests: dict[asyncio.Future[Any], int] = {}  # request -> broker (node id)
        self.failure = failure  # the last failure seen, raised when no broker answers

    def ask(self, client: Any, node: int, request: Any) -> asyncio.Future[Any]:
        task: asyncio.Future[Any] = asyncio.ensure_future(client.send(node, request))
        self.requests[task] = node
        return task

    async def first(self, until: float, watch: asyncio.Future[Any] | None = None) -> tuple[int, Any] | None:
        """The first (broker, answer) to come before ``until`` (the loop's clock); None then, when no
        request is left, or once ``watch`` is done (a connection being made, or the last request
        asked: a failure of its own moves on to the next broker at once)."""
        from aiokafka.errors import KafkaConnectionError, KafkaError

        loop = asyncio.get_running_loop()
        while self.requests or watch is not None:
            if watch is not None and watch.done():
                return None
            waiting: set[asyncio.Future[Any]] = set(self.requests)
            if watch is not None:
                waiting.add(watch)
            done, _ = await asyncio.wait(
                waiting, timeout=until - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                return None
            for task in done:
                node = self.requests.pop(task, None)
                if node is None:
                    continue  # watch: a connection made (or not)
                if task.cancelled():
                    self.failure = KafkaConnectionError(f"metadata request to node {node} cancelled")
                    continue
                error = task.exception()
                if error is None:
                    return node, task.result()
                if not isinstance(error, KafkaError | OSError):
                    raise error
                self.failure = error  # refused, connection lost, aiokafka's own request timeout
        return None

    async def cancel(self) -> None:
        """Cancel what is still asked (a cancelled request's late answer is dropped by aiokafka)."""
        tasks = list(self.requests)
        self.requests.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True)
class _Refused:
    """A topic-partition refused (a retriable error) while the broker took others."""

    backoff: float  # seconds between two offers of its records set aside (see _PROBE_FIRST)
    probe_at: float  # when they are offered again (time.monotonic)
    until: float  # no longer known refused then (time.monotonic): its batches are waited for again


@dataclass(slots=True)
class _SendState:
    """What the lanes of one send share (times are the event loop's clock)."""

    budget: float  # seconds: the context's send_budget
    submit_by: float  # no batch is handed to the producer after this
    deadline: float  # the budget's end: a batch handed over by late_from is given up then
    late_from: float  # a batch handed over after this is waited for past the deadline (see ack_by)
    last_ack: float  # nothing is waited for after this (send_timeout less _ANSWER_MARGIN)
    answer_time: float  # seconds (request_timeout_ms): a produce request is answered or timed out by then
    late: Outcome  # the records not sent in time (held: sent again at once, no failed attempt; _send)
    # The batches given up unacknowledged, judged again when the send ends (_send): until the producer
    # is halted then, aiokafka goes on retrying them and their answers still come.
    given_up: list[tuple[_Batch, asyncio.Future[Any]]]
    stop: Outcome | None = None  # the broker is unreachable: nothing more is sent
    unacknowledged: bool = False  # a batch was given up unacknowledged: the producer must go
    slowest: float = 0.0  # seconds: the longest a batch of this send took to be answered
    taken: bool = False  # a batch of this send was acknowledged: the broker takes records
    # Partitions whose batch was not acknowledged, or answered a retriable error: their records are
    # set aside (defer) when the partition, not the broker, is known to refuse (see _defer_refused).
    refused: set[tuple[str, int]] = dataclasses.field(default_factory=set)
    occurrences: Sequence[Occurrence] = ()  # the send's batch, by the index a _Batch's items hold

    def ack_by(self, handed: float) -> float:
        """Until when the acknowledgement of a batch handed over at ``handed`` is waited for. Its
        request may be answered up to ``answer_time`` later: given up before that, a batch the broker
        writes is sent again (a copy). So a batch handed over late (after ``late_from``: in the budget's
        last ``answer_time`` and its second half) is waited for past the budget's end, until
        ``answer_time`` after it was handed over but not after ``last_ack``. One handed over earlier and
        still unanswered at the budget's end has gone unanswered for ``answer_time`` (or half the budget,
        if less): it is one aiokafka retries (a retriable error, for ever with idempotence), given up at
        the budget's end. Without the half-budget bound, a stuck partition's batch handed over at the
        send's start was waited for until ``last_ack`` whenever ``answer_time`` exceeded the budget: the
        engine's margin gone at every send of an outage."""
        if handed <= self.late_from:
            return self.deadline
        return max(self.deadline, min(handed + self.answer_time, self.last_ack))


def _answer(outcomes: list[Outcome | None], jobs: Collection[_Batch], outcome: Outcome) -> None:
    """Give every record of ``jobs`` ``outcome``; a deque is emptied (its batches are settled)."""
    for job in jobs:
        for i, _ in job.items:
            outcomes[i] = outcome
    if isinstance(jobs, deque):
        jobs.clear()


def _failure(future: asyncio.Future[Any]) -> BaseException | None:
    """Why a settled produce batch failed; None when it was acknowledged."""
    error: BaseException | None
    if future.cancelled():  # not done by aiokafka: as a lost connection (retried)
        from aiokafka.errors import KafkaConnectionError

        error = KafkaConnectionError("produce batch cancelled")
    else:
        error = future.exception()
    return error


# aiokafka's default (16 KiB) holds ~8 of our records; bigger batches mean few produce batches per
# engine batch (compression is per batch too). Never above max_request_size: the broker's limit.
_MAX_BATCH_BYTES = 512 * 1024
# The Java client's murmur2 seed: AIOKafkaProducer (and every Kafka client) partitions keys by
# murmur2(key, seed) & 0x7fffffff % partitions. aiokafka's murmur2 is pure Python (~6 µs a key on a
# slow core), murmurhash2's is native (~0.2 µs) and gives the same values (tested).
_MURMUR2_SEED = 0x9747B28C


class KafkaSink(Sink[KafkaOptions]):
    options_model: ClassVar[type[SinkOptions]] = KafkaOptions
    description: ClassVar[str] = "Apache Kafka topic (aiokafka): JSON records keyed by involved object"

    def __init__(self, options: KafkaOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self._parts = _parse_template(options.topic)
        self._static_topic = options.topic if all(field is None for _, field in self._parts) else None
        self._key_by = options.key_by
        self._include_raw = options.include_raw
        self._event_time = options.timestamp == "event"
        self._truncate = options.oversize == "truncate"
        grace_ms = int(options.future_grace * 1000)
        self._grace_ms = grace_ms - min(_CLOCK_MARGIN_MS, grace_ms // 4)
        self._latest_ms: float = math.inf  # set per batch by send (set_window)
        self._producer: Any = None
        self._murmur2: Any = None
        # An idempotent producer takes a partition's sequence numbers when it sends a batch, and never
        # gives them back when the batch then fails for good (refused, expired): the broker refuses
        # every later batch of that partition as out of order. Set then: a new producer (a new
        # producer id, sequences from 0) is made before the next batch goes out.
        self._sequence_lost = False
        # Set when a send ended (cancelled by the engine's send_timeout) with batches still queued in
        # the producer: that producer was discarded unflushed, and the next send starts a new one.
        self._abandoned = False
        self._unsettled = 0  # batches of the send in progress handed to the producer and not settled
        self._discarding: set[asyncio.Task[None]] = set()
        self._starting: asyncio.Task[None] | None = None  # a new producer's start, outlasting a send
        self._warned_timeout = False
        # Topics whose records were set aside as missing (unknown, not created, no leader), already
        # logged (oldest sighting first). Logged again only after _MISSING_MEMORY without a sighting.
        self._missing: OrderedDict[str, _Missing] = OrderedDict()
        self._answering: Any = None  # the broker that answered the sink's last metadata request
        # Per topic-partition refused while the broker took others: its records set aside (defer) and
        # those held back behind them, (uid, number) -> their place (see _Place). A record of the
        # partition goes only after every one before it here. Each is kept until answered otherwise or
        # given up by the engine (given_up), never by time: one parked in the spool may wait longer than
        # any backoff, and forgotten, a newer record of its object went in first.
        self._aside: dict[tuple[str, int], dict[tuple[str, int], _Place]] = {}
        self._aside_at: dict[tuple[str, int], tuple[str, int]] = {}  # (uid, number) -> its partition
        self._aside_order = itertools.count()
        # The partitions refused so, until a batch of theirs is acknowledged and none set aside after it
        # in that send (or retry_wait_max passes).
        self._refused: dict[tuple[str, int], _Refused] = {}
        # The send in progress, as its producer's own produce answers tell it (_note_answers): each
        # partition's last error code, those whose batch in flight an answer left maybe written, and
        # those whose batch was failed at once (with the code that proved nothing written). One batch
        # per partition is ever outstanding (a lane hands the next over once the one before settled,
        # and aiokafka mutes a partition while a request carries it): what is noted is that batch's.
        self._answered: dict[tuple[str, int], int] = {}
        self._open: set[tuple[str, int]] = set()
        self._cut: dict[tuple[str, int], int] = {}
        # The producer one of whose produce requests was lost on its way back with partitions that
        # could not be read (another aiokafka's layout): none of its batches is cut, any may be written.
        self._blind: object | None = None
        # Per partition not known refused: when this send's first NOT_ENOUGH_REPLICAS came (_CUT_GRACE).
        self._refusing_since: dict[tuple[str, int], float] = {}
        # Records delivered changed (stamped otherwise than their event time, message cut): the send
        # in progress's, index -> _STAMPED | _CUT; in total (``modified``); since the last log
        # (logged at most every _MODIFIED_LOG_EVERY seconds, and at close).
        self._changed: dict[int, int] = {}
        self._modified_log = ModifiedLog(_MODIFIED_LOG_EVERY)
        self._refusal_log = Throttled(self.log, _MODIFIED_LOG_EVERY)

    def take_over(self, previous: Sink[KafkaOptions]) -> None:
        """The set-aside records' order carries over (a credential or certificate file rotated)."""
        if isinstance(previous, KafkaSink):
            self._aside, self._aside_at = previous._aside, previous._aside_at
            self._aside_order, self._refused = previous._aside_order, previous._refused
            self.modified = previous.modified
            self._modified_log = previous._modified_log

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        """Dead-lettered or dropped: a record set aside no longer holds its partition back."""
        if not self._aside_at:
            return
        for occurrence in occurrences:
            self._forget((occurrence.uid, occurrence.number))

    def _forget(self, key: tuple[str, int]) -> None:
        where = self._aside_at.pop(key, None)
        if where is not None and (waiting := self._aside.get(where)) is not None:
            waiting.pop(key, None)
            if not waiting:
                del self._aside[where]

    # -- configuration -------------------------------------------------------------------------

    def producer_config(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer (holds the SASL password: never log it)."""
        o = self.options
        config: dict[str, Any] = {
            "bootstrap_servers": list(o.brokers),
            "client_id": o.client_id,
            "acks": "all" if o.acks == "all" else int(o.acks),
            "enable_idempotence": o.idempotence,
            "compression_type": None if o.compression == "none" else o.compression,
            "request_timeout_ms": o.request_timeout_ms,
            "max_request_size": o.max_request_size,
            "max_batch_size": min(o.max_request_size, _MAX_BATCH_BYTES),
        }
        if o.use_sasl:
            config["security_protocol"] = "SASL_SSL" if o.use_tls else "SASL_PLAINTEXT"
            config["sasl_mechanism"] = o.sasl_mechanism or "PLAIN"
            config["sasl_plain_username"] = o.user
            config["sasl_plain_password"] = o.password.get_secret_value() if o.password else None
        else:
            config["security_protocol"] = "SSL" if o.use_tls else "PLAINTEXT"
        return config

    def _describe_brokers(self) -> str:
        # Validated brokers hold no user info; shown_address all the same, as every address in a message.
        return ", ".join(shown_address(broker) for broker in self.options.brokers)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._begin(0.0)

    async def _begin(self, patience: float) -> None:
        """``start``; ``patience``: see ``_start`` (a new producer's start, cancelled by ``aclose``
        only, lets a bootstrap under way end; the first start's cancellation, at a stop, is prompt)."""
        if self._producer is not None:
            return
        if not self._warned_timeout:  # once: every renewed producer starts here
            self._warned_timeout = True
            self.context.warn_if_outlasting(self.options.request_timeout_ms / 1000, "request_timeout_ms/1000")
        try:
            import murmurhash2
            from aiokafka import AIOKafkaProducer
            from aiokafka.errors import KafkaConnectionError, KafkaError
        except ImportError as exc:
            raise SinkError(f"the kafka sink needs {exc.name}: pip install 'eventrouter[kafka]'") from None
        self._murmur2 = murmurhash2.murmurhash2
        config = self.producer_config()
        if self.options.use_tls:
            try:
                config["ssl_context"] = ssl_context(self.options)
            except (OSError, ssl.SSLError) as exc:
                files = ", ".join(
                    f for f in (self.options.ca_file, self.options.cert_file, self.options.key_file) if f
                )
                raise SinkError(f"kafka TLS setup failed ({files or 'system CA'}): {exc}") from None
        try:
            producer = AIOKafkaProducer(**config)
        except (ValueError, KafkaError) as exc:
            raise SinkError(f"kafka producer options rejected: {type(exc).__name__}: {exc}") from None
        self._watch(producer)
        causes = _BootstrapErrors(self.options.brokers)
        aiokafka_log = logging.getLogger("aiokafka")
        aiokafka_log.addHandler(causes)
        try:
            await _start(producer, patience)
        except BaseException as exc:
            await producer.stop()
            brokers = self._describe_brokers()
            if isinstance(exc, KafkaConnectionError | OSError):
                why = self._bootstrap_cause(causes.errors) or f"{type(exc).__name__}: {exc}"
                raise SinkError(f"cannot connect to Kafka brokers {brokers}: {why}") from None
            if isinstance(exc, KafkaError):
                hint = (
                    " (the idempotent producer is on: if the broker does not support it, set idempotence=false)"
                    if self.options.idempotence
                    else ""
                )
                raise SinkError(
                    f"Kafka brokers {brokers} refused the producer: {type(exc).__name__}: {exc}{hint}"
                ) from None
            raise
        finally:
            aiokafka_log.removeHandler(causes)
        self._producer = producer

    def _watch(self, producer: Any) -> None:
        """Read ``producer``'s produce answers as its sender gets them: its client's ``send`` on this
        instance (the sender calls ``self._client.send``), so no other producer's answers, whatever its
        client_id, and no log line (the router's --log-level=error silences aiokafka's). aiokafka
        retries a partition's retriable error for ever with idempotence and tells nothing of it."""
        client = producer.client
        send = client.send

        async def answered(node_id: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            produce = getattr(request, "API_KEY", None) == _API_PRODUCE
            try:
                response = await send(node_id, request, *args, **kwargs)
            except BaseException:
                if produce and producer is self._producer:
                    # Lost on its way back (connection, timeout): the broker may have written it all.
                    sent = _produce_partitions(request)
                    if sent is None:
                        self._blind = producer  # which partitions it carried is unknown: none is cut
                    else:
                        self._open.update(sent)
                raise
            if produce and response is not None and producer is self._producer:
                with contextlib.suppress(Exception):  # another aiokafka's layout: nothing learnt
                    self._note_answers(response)
            return response

        client.send = answered

    def _note_answers(self, response: Any) -> None:
        """Each partition's error code; a batch answered with a code proving nothing was written (and
        never answered otherwise before: its earlier attempt may be written) is failed, at once for a
        partition known to refuse, after ``_CUT_GRACE`` of refusals for another: the code becomes one
        aiokafka does not retry, so the batch is not
        retried until the send's budget and then written beside the records the engine sends again
        (see _deliver_lane), and the producer goes on (its sequence number given back, _was_cut)."""
        changed = False
        topics = []
        for topic, partitions in response.topics:
            infos = []
            for info in partitions:
                where, code = (topic, info[0]), info[1]
                if not code:
                    self._refusing_since.pop(where, None)
                    infos.append(info)
                    continue
                self._answered[where] = code
                if code not in _NOTHING_WRITTEN:
                    self._open.add(where)
                elif where not in self._open and self._blind is not self._producer:
                    now = time.monotonic()
                    since = self._refusing_since.setdefault(where, now)
                    if where in self._refused or now - since >= _CUT_GRACE:
                        self._cut[where] = code
                        info = (info[0], _CUT_CODE, *info[2:])
                        changed = True
                infos.append(info)
            topics.append((topic, infos))
        if changed:
            response.topics = topics

    def _bootstrap_cause(self, errors: Sequence[tuple[str, BaseException]]) -> str | None:
        """The most telling of the bootstrap connections' errors, with what to change; None when none
        is known. Never the password (aiokafka's texts hold none)."""
        from aiokafka import errors as kerr

        o = self.options
        mechanism = o.sasl_mechanism or "PLAIN"
        found = [err for _, err in errors]
        for err in found:
            if isinstance(err, kerr.SaslAuthenticationFailed | kerr.AuthenticationFailedError):
                return (
                    f"SASL authentication of user {o.user!r} with {mechanism} failed: {err} (check user "
                    "and password, and sasl_mechanism: a SCRAM user cannot log in with PLAIN)"
                )
        for err in found:
            if isinstance(err, kerr.UnsupportedSaslMechanismError | kerr.IllegalSaslStateError):
                # aiokafka's text names the enabled mechanisms when the handshake listed them; when the
                # broker refused the handshake itself it is only a connection's repr.
                detail = str(err) if "mechanisms" in str(err) else type(err).__name__
                return (
                    f"the broker does not accept SASL {mechanism} on this listener ({detail}): set "
                    "sasl_mechanism to one it enables, or leave user and password out for a listener "
                    "without SASL"
                )
        for err in found:
            if isinstance(err, ssl.SSLCertVerificationError):
                if err.verify_code in _NAME_MISMATCH:
                    # The chain is checked first: its CA is trusted, and ca_file is not the cause.
                    return (
                        f"TLS: the broker's certificate does not name this broker address "
                        f"({err.verify_message}): list the broker in brokers by a name or IP address its "
                        "certificate's subjectAltName holds (the certificate's CA is trusted)"
                    )
                return (
                    f"TLS: the broker's certificate is not trusted ({err.verify_message}): set ca_file to "
                    "the CA that signed it"
                )
            if isinstance(err, ssl.SSLError):
                return f"TLS handshake failed: {err} (is the port the broker's TLS listener?)"
        for err in found:
            if isinstance(err, TimeoutError) and o.use_tls:
                return (
                    f"no TLS handshake within request_timeout_ms={o.request_timeout_ms}: the port is most "
                    "likely a plaintext listener (set tls=false, or use the broker's TLS port)"
                )
        for step, err in errors:
            if step.startswith("Unable to request metadata") and isinstance(err, kerr.KafkaConnectionError):
                needs = "TLS (tls=true)" if o.use_sasl else "SASL (user, password) or TLS (tls=true)"
                return (
                    f"the broker closed the connection without answering ({err}): its listener most "
                    f"likely needs {needs}"
                )
        if found:
            err = found[0]
            return f"{type(err).__name__}: {err}".rstrip(": ")
        return None

    async def check(self) -> None:
        await self.start()
        if self._static_topic is not None:
            try:
                await self._producer.partitions_for(self._static_topic)
            except Exception as exc:
                raise SinkError(
                    f"kafka topic {self._static_topic!r} on {self._describe_brokers()} is not available: "
                    f"{type(exc).__name__}: {exc}"
                ) from None

    async def aclose(self) -> None:
        self._changed = {}  # of a send cut off: not delivered
        if self._modified_log.unlogged:
            self._count_modified((), flush=True)
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
            # Not gather: cut off itself (the engine bounds a close by send_timeout), it cancelled the
            # start again during _start's patience. A cancelled wait leaves it to end in the background.
            await asyncio.wait([starting])
            if not starting.cancelled():
                starting.exception()  # retrieved: a start that failed first is of no interest now
        producer, self._producer = self._producer, None
        if producer is not None:
            # Not producer.stop(): it flushes, and anything still queued belongs to a send the engine
            # gave up on and sends again (an idempotent producer's batches never expire: on a reload
            # its sender went on and wrote them beside the new instance's retry).
            await self._discard(producer)
        if self._discarding:
            await asyncio.gather(*self._discarding, return_exceptions=True)

    def _abandon(self, why: str) -> None:
        """Drop the producer of a send that ends with batches queued (cancelled, or past its budget), at
        once (before a cancellation goes on): its sender stops before it drains another batch; the
        client is closed in the background. The next send starts a new producer."""
        producer, self._producer = self._producer, None
        self._abandoned = True
        self._unsettled = 0
        if producer is None:
            return
        self._discard_later(producer)
        self.log.warning(
            "kafka: %s; they are discarded, not flushed, and their records go again with a new producer",
            why,
        )

    def _discard_later(self, producer: Any) -> None:
        """Stop ``producer``'s sender at once and close it in the background (``aclose`` waits)."""
        _halt(producer)
        task = asyncio.get_running_loop().create_task(self._discard(producer))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def _discard(self, producer: Any) -> None:
        """Close ``producer`` without flushing what it has queued. aiokafka internals: ``stop()`` is
        the only public close, and it waits for every queued batch (for ever, for an idempotent
        producer whose broker is away)."""
        _halt(producer)
        sender_task = getattr(getattr(producer, "_sender", None), "sender_task", None)
        with contextlib.suppress(Exception):
            await producer.client.close()  # a produce request under way fails at once
        if isinstance(sender_task, asyncio.Task) and not sender_task.done():
            # The cancelled sender waits for the requests it had started; bounded by their timeout.
            await asyncio.wait([sender_task], timeout=self.options.request_timeout_ms / 1000 + 1)
            with contextlib.suppress(Exception):
                await producer.client.close()  # a connection one of them opened meanwhile

    # -- encoding ------------------------------------------------------------------------------

    def _key(self, occurrence: Occurrence) -> bytes | None:
        mode = self._key_by
        if mode == "object":
            involved = occurrence.record.get("involved_object") or {}
        elif mode == "none":
            return None
        elif mode == "event":
            return occurrence.uid.encode()
        else:  # object_uid
            involved = occurrence.record.get("involved_object") or {}
            if involved.get("uid"):
                return str(involved["uid"]).encode()
        kind, name = involved.get("kind") or "", involved.get("name") or ""
        if not kind and not name:
            return occurrence.uid.encode()  # no object to group by: keep one Event's occurrences together
        return f"{kind}/{involved.get('namespace') or ''}/{name}".encode()

    def set_window(self, now_ms: int) -> None:
        """The latest event time (ms) used as a record timestamp, for the records encoded next."""
        self._latest_ms = now_ms + self._grace_ms

    def encode(self, occurrence: Occurrence) -> _Message:
        record = occurrence.record
        get = record.get
        headers = [
            ("cluster", _header(get("cluster"))),
            ("namespace", _header(get("namespace"))),
            ("type", _header(get("type"))),
            ("reason", _header(get("reason"))),
            ("occurrence", occurrence.key.encode("utf-8", "replace")),
        ]
        timestamp_ms = None
        if self._event_time:
            timestamp_ms = occurrence.time_ns // 1_000_000
            if timestamp_ms > self._latest_ms or timestamp_ms < 0:
                # Kafka 4 refuses one far ahead, and a far-future timestamp keeps a segment from ever
                # expiring by time; one before 1970 is invalid to Kafka's own clients (the Java
                # producer refuses it, Kafka Streams' default extractor fails on it): use the time the
                # router received it (the value keeps the event's own time).
                timestamp_ms = int(occurrence.received_at * 1000)
                headers.append(_TIME_ADJUSTED)
        return _Message(
            self._static_topic or render_topic(self._parts, record),
            self._key(occurrence),
            occurrence.encode(include_raw=self._include_raw),
            headers,
            timestamp_ms,
        )

    def _shortened(self, occurrence: Occurrence, message: _Message, limit: int) -> _Message | None:
        """The record with its message cut so that it fits ``limit``; None when the rest of it is too
        large on its own. ``message`` may be cut already (the broker refused it cut): cut again from
        the whole one, still saying its original size."""
        from aiokafka.record.default_records import DefaultRecordBatchBuilder

        if _TRUNCATED in message.headers:
            headers, size = message.headers, len(occurrence.encode(include_raw=self._include_raw))
        else:
            headers, size = [*message.headers, _TRUNCATED], len(message.value)
        overhead = DefaultRecordBatchBuilder.estimate_size_in_bytes(message.key, b"", headers)
        record = occurrence.to_dict(include_raw=False)  # the raw object repeats the message
        value = shorten_message(
            occurrence, size, limit - overhead, lambda cut: orjson.dumps({**record, **cut})
        )
        if value is None:
            return None
        return _Message(message.topic, message.key, value, headers, message.timestamp_ms)

    # -- delivery ------------------------------------------------------------------------------

    def _classify(self, exc: BaseException, topic: str, job: _Batch | None = None) -> Outcome:
        """The outcome of ``exc`` for the records of ``topic`` (``job``: the produce batch the broker
        answered with it)."""
        from aiokafka import errors as kerr

        text = f"{type(exc).__name__}: {exc}".strip()
        if isinstance(exc, kerr.MessageSizeTooLargeError) and job is not None and len(job.items) == 1:
            # Under max_request_size (checked before it was sent), so the limit is the broker's.
            cut = " even with its message cut" if _TRUNCATED in job.items[0][1].headers else ""
            return reject(
                f"kafka topic {topic!r} refused a {job.builder.size()}-byte record{cut} as too large "
                f"({text}): the topic's max.message.bytes (or the broker's message.max.bytes) is below it; "
                f"raise it, or set max_request_size below it (now {self.options.max_request_size}) so that "
                "oversize=truncate cuts such records to fit"
            )
        if isinstance(exc, kerr.MessageSizeTooLargeError | kerr.RecordTooLargeError):
            return reject(
                f"record too large for Kafka (max_request_size={self.options.max_request_size}): {text}"
            )
        if isinstance(exc, kerr.RecordListTooLargeError | kerr.InvalidTopicError):
            return reject(f"kafka refused the record for topic {topic!r}: {text}")
        if isinstance(exc, kerr.PolicyViolationError | kerr.UnsupportedForMessageFormatError):
            # The topic's own rules (a create-topic policy, an old message.format.version): final.
            return reject(f"kafka refused the record for topic {topic!r}: {text}")
        if type(exc) is kerr.UnknownError:
            # A broker answer aiokafka cannot name: UNKNOWN_SERVER_ERROR, or a code it does not know,
            # most often INVALID_RECORD (the broker's record validation). Final, as the Java client has
            # it; retried it would hold up the sink for good.
            return reject(
                f"kafka refused the record for topic {topic!r} with an error this client cannot name "
                "(often INVALID_RECORD: a compacted topic needs keys, key_by=object; or the broker's own "
                f"record validation): {text}"
            )
        if isinstance(exc, kerr.TopicAuthorizationFailedError | kerr.ClusterAuthorizationFailedError):
            return reject(f"not authorised to write to kafka topic {topic!r}: {text}")
        if isinstance(exc, kerr.UnknownTopicOrPartitionError):
            return retry(f"kafka topic {topic!r} unknown (missing, auto-create off, or broker down): {text}")
        if isinstance(exc, kerr.InvalidTimestampError):  # even the send time: the clocks disagree
            return retry(
                f"kafka refused the record's timestamp for topic {topic!r} although it is the send time: "
                f"the broker's clock and this host's differ more than the topic allows: {text}"
            )
        if isinstance(exc, kerr.KafkaTimeoutError):
            return retry(f"kafka timed out after {self.options.request_timeout_ms} ms: {text}")
        # Connection loss, leader changes, broker errors we cannot judge: never lose the record.
        return retry(f"kafka produce to {topic!r} failed: {text}")

    @staticmethod
    def _stops_batch(outcome: Outcome, exc: BaseException) -> bool:
        """True when the broker is unreachable: enqueueing more would wait request_timeout_ms each."""
        from aiokafka import errors as kerr

        return outcome.kind is OutcomeKind.RETRY and isinstance(
            exc,
            kerr.KafkaTimeoutError
            | kerr.KafkaConnectionError
            | kerr.NodeNotReadyError
            | kerr.UnknownTopicOrPartitionError
            | kerr.ProducerClosed,
        )

    async def _partitions(self, topic: str) -> tuple[list[int], list[int]]:
        """All and available partitions of ``topic`` as ``AIOKafkaProducer._partition`` lists them.
        Raises what ``send`` would (unknown topic, timeout)."""
        producer = self._producer
        all_partitions = list(await producer.partitions_for(topic))
        if not all_partitions:
            from aiokafka.errors import UnknownTopicOrPartitionError

            raise UnknownTopicOrPartitionError(topic)
        available = list(producer.client.cluster.available_partitions_for_topic(topic) or ())
        return all_partitions, available

    async def _absent(
        self, topics: Collection[str], share_end: float
    ) -> tuple[dict[str, Outcome], set[str], Outcome | None]:
        """Of ``topics``: the outcome of each whose records do not go out in this send (set aside:
        unknown to the broker, not created, no leader; rejected: not authorised or invalid), those a
        broker answered as existing, or the outcome of an outage when no broker answers. Only topics the
        producer has no partitions for are asked about, all in one metadata request: aiokafka waits
        ``request_timeout_ms`` for each such topic and then raises UnknownTopicOrPartitionError, whether
        the topic is missing or the broker down. A topic answered as being created (_BEING_CREATED) and
        not known missing is asked about again until _CREATE_GRACE after the answer, not after
        ``share_end`` (the loop's clock)."""
        cluster = self._producer.client.cluster
        unknown = [topic for topic in topics if cluster.partitions_for_topic(topic) is None]
        if not unknown:
            return {}, set(), None
        try:
            errors = await self._topic_errors(unknown)
        except Exception as exc:  # no broker answered: the producer cannot deliver either
            text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
            return {}, set(), retry(f"kafka brokers {self._describe_brokers()} unreachable: {text}")
        described = await self._described(errors)
        loop = asyncio.get_running_loop()
        until = min(loop.time() + _CREATE_GRACE, share_end)
        now = time.monotonic()
        waiting = [t for t in unknown if errors.get(t) in _BEING_CREATED and not self._known_missing(t, now)]
        while waiting and loop.time() + _CREATE_POLL < until:
            await asyncio.sleep(_CREATE_POLL)  # the broker tells nothing when a creation is done
            try:
                async with asyncio.timeout_at(until):
                    errors.update(await self._topic_errors(waiting))
            except Exception:  # out of time, or no answer: the last answers stand
                break
            waiting = [t for t in waiting if errors.get(t) in _BEING_CREATED]
        aside: dict[str, Outcome] = {}
        missing: dict[str, int] = {}
        answered: set[str] = set()
        for topic in unknown:
            code = errors.get(topic)
            if code == _TOPIC_AUTHORIZATION_FAILED:
                if described is None:  # no answer to tell which: asked again at the retry
                    aside[topic] = retry(
                        f"kafka topic {topic!r}: {_error_name(code)} to a request allowing its creation, "
                        "and no broker answered the one asking without",
                        defer=True,
                    )
                    continue
                again = described.get(topic, code)
                if again == _UNKNOWN_TOPIC_OR_PARTITION:  # missing; only its creation is not allowed
                    aside[topic] = self._aside_outcome(topic, code)
                    missing[topic] = code
                    continue
                code = again  # 0: created meanwhile; 29: not even described
            if not code:  # 0, or left out of the answer: aiokafka's own metadata decides (_partitions)
                answered.add(topic)
            elif code == _TOPIC_AUTHORIZATION_FAILED:
                aside[topic] = reject(
                    f"not authorised to describe and write kafka topic {topic!r} (this client needs DESCRIBE "
                    f"and WRITE on it): {_error_name(code)}"
                )
            elif code == _INVALID_TOPIC:
                aside[topic] = reject(f"kafka refused the record for topic {topic!r}: {_error_name(code)}")
            else:
                aside[topic] = self._aside_outcome(topic, code)
                missing[topic] = code
        self._note_missing(missing, answered)
        return aside, answered, None

    async def _described(self, errors: dict[str, int]) -> dict[str, int] | None:
        """The answers to a request not allowing creation for the topics of ``errors`` (answers to one
        allowing it) answered TOPIC_AUTHORIZATION_FAILED; None when no broker answers. Kafka with
        auto-create on answers so a missing topic this client may describe and write but not create (no
        CREATE on the cluster or on the topic: ``KafkaApis.handleTopicMetadataRequest``), and a missing
        one is UNKNOWN_TOPIC_OR_PARTITION to a request that creates nothing: set aside, as a topic
        missing with auto-create off, not rejected as not authorised. Still 29: not even DESCRIBE."""
        denied = [topic for topic, code in errors.items() if code == _TOPIC_AUTHORIZATION_FAILED]
        if not denied:
            return {}
        try:
            return await self._topic_errors(denied, create=False)
        except Exception:  # no broker answered
            return None

    @staticmethod
    def _missing_text(topic: str, code: int) -> str:
        """What the broker's metadata answer ``code`` says of ``topic`` (TOPIC_AUTHORIZATION_FAILED: to a
        request allowing its creation, UNKNOWN_TOPIC_OR_PARTITION to one not: ``_described``), and what
        to do."""
        if code == _LISTED_THEN_DENIED:
            return (
                f"kafka topic {topic!r} was listed by a broker, and the broker asked next answered "
                f"{_error_name(_TOPIC_AUTHORIZATION_FAILED)} to a request allowing its creation: the brokers "
                "do not agree on it yet (each learns a new topic at its own time), or this client's "
                "DESCRIBE or CREATE permission on it changed; asked again at the retry"
            )
        hint = _CREATE_HINTS.get(code)
        name = _error_name(code)
        if code == _TOPIC_AUTHORIZATION_FAILED:
            return (
                f"kafka topic {topic!r} does not exist on the broker, and this client may not create it "
                f"({name} to a request allowing its creation, {_error_name(_UNKNOWN_TOPIC_OR_PARTITION)} "
                "to one not: auto-create is on, and the client has no CREATE permission on the cluster or "
                "the topic): create the topic, or grant this client CREATE on it"
            )
        if code == _UNKNOWN_TOPIC_OR_PARTITION:
            return (
                f"kafka topic {topic!r} does not exist on the broker ({name}: {hint}): create the topic, "
                "or enable auto-create (auto.create.topics.enable=true)"
            )
        if code == _LEADER_NOT_AVAILABLE:
            return f"kafka topic {topic!r} has no leader ({name}: {hint})"
        return f"kafka topic {topic!r} is not created by the broker: {name}" + (f" ({hint})" if hint else "")

    def _aside_outcome(self, topic: str, code: int) -> Outcome:
        return retry(self._missing_text(topic, code), defer=True)

    def _metadata_denied(self, exc: BaseException, topic: str) -> Outcome | None:
        """The outcome of TOPIC_AUTHORIZATION_FAILED raised by aiokafka's own metadata request (its
        ``partitions_for`` or ``send_batch``; a produce answer's comes through the batch's future), or
        None for another failure. Set aside, never rejected: the broker aiokafka happened to ask may not
        have learnt a new topic yet (Kafka's brokers each learn it at its own time), and it answers so a
        request allowing creation from a client without CREATE (``_described``). The sink's own lookup
        asks again at the retry, and rejects a topic not authorised either way."""
        from aiokafka.errors import TopicAuthorizationFailedError

        if not isinstance(exc, TopicAuthorizationFailedError):
            return None
        # A broker listed the topic (the sink's lookup, or aiokafka's before): not "does not exist".
        self._note_missing({topic: _LISTED_THEN_DENIED}, set())
        return self._aside_outcome(topic, _LISTED_THEN_DENIED)

    def _known_missing(self, topic: str, now: float) -> bool:
        seen = self._missing.get(topic)
        return seen is not None and now - seen.last < _MISSING_MEMORY

    async def _topic_errors(self, topics: list[str], *, create: bool = True) -> dict[str, int]:
        """Each topic's error code in a broker's metadata answer (0: it exists). Asked as the producer
        asks (``create``: a broker with auto-create on creates them), of one broker after another (the
        one that answered last first), each in its turn: its share of ``request_timeout_ms`` (what is left
        of it over the brokers not asked yet), at least _TURN or half what is left. A broker whose
        connection is made and that has not answered by its turn's end is still waited for while the
        next one is asked: the first answer is taken. One whose connection is still being made then is
        given up (it holds aiokafka's one connection lock, which the next broker's connection needs): a
        broker that never answers (a stall, a network partition: it accepts connections) costs its turn,
        not the whole timeout, wherever the cluster lists it. (Cut off at the bare share, a twelfth of
        the timeout with 12 brokers, with no wait for the ones asked, a slow cluster's every broker was:
        making a connection alone takes a few round trips, TCP, TLS, SASL, ApiVersions.) A broker that
        fails at once leaves its turn to the next. Raises the last failure (TimeoutError: no answer in
        time) when none answers."""
        from aiokafka.errors import KafkaConnectionError, NodeNotReadyError
        from aiokafka.protocol.metadata import MetadataRequest

        client = self._producer.client
        request = MetadataRequest(topics, allow_auto_topic_creation=create)
        nodes = [broker.nodeId for broker in client.cluster.brokers()]
        if self._answering in nodes:
            nodes.remove(self._answering)
            nodes.insert(0, self._answering)
        loop = asyncio.get_running_loop()
        end = loop.time() + self.options.request_timeout_ms / 1000
        asked = _Asked(KafkaConnectionError("no broker known"))
        try:
            for left, node in zip(range(len(nodes), 0, -1), nodes, strict=True):
                now = loop.time()
                turn_end = now + max((end - now) / left, min(_TURN, (end - now) / 2))
                connecting = asyncio.ensure_future(client.ready(node))
                try:
                    found = await asked.first(turn_end, connecting)
                finally:
                    if not connecting.done():  # a cancel during the set-up closes the connection
                        connecting.cancel()
                        asked.failure = TimeoutError()
                    await asyncio.gather(connecting, return_exceptions=True)
                if found is None and not connecting.cancelled():
                    if connecting.exception() is None and connecting.result():
                        found = await asked.first(turn_end, asked.ask(client, node, request))
                    else:
                        asked.failure = NodeNotReadyError(f"node {node} not ready")
                if found is not None:
                    return self._answered_by(*found)
            found = await asked.first(end)  # every broker asked: the ones still asked, until the end
            if found is not None:
                return self._answered_by(*found)
            if asked.requests:
                raise TimeoutError()
            raise asked.failure
        finally:
            await asked.cancel()

    def _answered_by(self, node: int, answer: Any) -> dict[str, int]:
        self._answering = node
        # (error_code, topic, ...) in every version of the answer.
        return {entry[1]: entry[0] for entry in answer.topics}

    def _note_missing(self, missing: dict[str, int], present: set[str]) -> None:
        """Log each topic set aside as missing (``missing``: topic -> the broker's answer) once per run
        of sightings, at WARNING (it may be created any time), and at ERROR once when it is still
        missing _MISSING_LOUD later; say when one exists again (``present``)."""
        now = time.monotonic()
        for topic in sorted(present & self._missing.keys()):
            del self._missing[topic]
            self.log.info("kafka: topic %r exists now; its records are sent", topic)
        new, still = [], []
        for topic, code in sorted(missing.items()):
            seen = self._missing.pop(topic, None)
            if seen is None or now - seen.last >= _MISSING_MEMORY:
                seen = _Missing(first=now, last=now)
                new.append((topic, code))
            elif not seen.loud and now - seen.first >= _MISSING_LOUD:
                seen.loud = True
                still.append((topic, code, now - seen.first))
            seen.last = now
            self._missing[topic] = seen
        while len(self._missing) > _MISSING_KEPT:
            self._missing.popitem(last=False)
        aside = (
            "its records are set aside and retried (up to retry_max_attempts, if set) while other topics "
            "go on"
        )
        for topic, code in new[:3]:
            self.log.warning("kafka: %s; %s", self._missing_text(topic, code).removeprefix("kafka "), aside)
        if len(new) > 3:
            self.log.warning("kafka: %d more topics are missing on the broker; %s", len(new) - 3, aside)
        for topic, code, since in still[:3]:
            self.log.error(
                "kafka: still missing after %.0fs: %s; %s",
                since,
                self._missing_text(topic, code).removeprefix("kafka "),
                aside,
            )
        if len(still) > 3:
            self.log.error("kafka: %d more topics are still missing on the broker; %s", len(still) - 3, aside)

    async def _renew_producer(self, until: float) -> bool:
        """Replace the producer after a lost sequence number (``_sequence_lost``) or a discarded one
        (``_abandoned``), waiting for its start until ``until`` (the loop's clock). False when it is
        still starting then: it goes on in the background, and the next send waits for the same start
        (a cancelled aiokafka start may leave a connection open, and a new idempotent producer waits for
        its id as long as the broker takes). RetryableError when it cannot start: the next send tries
        again."""
        task = self._starting
        if task is None:
            old, self._producer = self._producer, None
            if old is not None:
                # Every batch of ours is settled: nothing to flush, and nothing to wait for (its close
                # may wait for a request of its own, up to request_timeout_ms, out of this budget).
                self._discard_later(old)
            patience = self.options.request_timeout_ms / 1000
            task = self._starting = asyncio.get_running_loop().create_task(self._begin(patience))
        loop = asyncio.get_running_loop()
        await asyncio.wait([task], timeout=max(0.0, until - loop.time()))
        if not task.done():
            return False
        self._starting = None
        try:
            task.result()
        except SinkError as exc:
            raise RetryableError(f"kafka: a new producer cannot start: {exc}") from None
        if self._sequence_lost:
            self.log.warning(
                "kafka: a produce batch failed after taking sequence numbers; sending on with a new "
                "idempotent producer (the broker would refuse the old one's next batches as out of order)"
            )
        self._sequence_lost = self._abandoned = False
        return True

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        # The send's own deadline, from its start: it ends with an outcome per record before the
        # engine's send_timeout cuts it off and sends the whole batch again (what went in, twice).
        started = asyncio.get_running_loop().time()
        if self._sequence_lost or self._abandoned:
            # Within the budget: a new producer's start (metadata, a producer id) took as long as the
            # broker made it, past the engine's send_timeout. Nothing of this send is queued yet.
            budget = self.context.send_budget
            if not await self._renew_producer(started + budget * _SUBMIT_SHARE):
                raise RetryableError(
                    f"kafka: a new producer did not start within this send's time budget "
                    f"({budget * _SUBMIT_SHARE:g}s of {budget:g}s; the broker is slow to answer metadata "
                    "or a producer id): nothing was sent"
                )
        try:
            return await self._send(batch, started)
        except BaseException:
            # Cancelled (the engine's send_timeout, a lost lease, a stop's deadline) with batches
            # queued: the engine counts them as not delivered and sends them again, so they must never
            # be written. An idempotent producer retries them for ever, each time the broker is back.
            if self._unsettled:
                self._abandon(
                    "a send was given up with produce batches still queued (broker unreachable or slow)"
                )
            raise

    async def _send(self, batch: Sequence[Occurrence], started: float) -> Sequence[Outcome]:
        producer = self._producer
        if producer is None:
            raise RetryableError("kafka producer is not started")
        from aiokafka.record.default_records import DefaultRecordBatchBuilder

        outcomes: list[Outcome | None] = [None] * len(batch)
        self.set_window(int(time.time() * 1000))
        limit = self.options.max_request_size
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes
        by_topic: dict[str, list[tuple[int, _Message]]] = {}
        changed = self._changed = {}
        for i, occurrence in enumerate(batch):
            try:
                message = self.encode(occurrence)
            except Exception as exc:  # a record we cannot encode must not fail the batch
                outcomes[i] = reject(f"cannot encode record for kafka: {type(exc).__name__}: {exc}")
                continue
            if message.headers[-1] is _TIME_ADJUSTED:
                changed[i] = _STAMPED
            size = estimate(message.key, message.value, message.headers)
            if size > limit:
                fitted = self._shortened(occurrence, message, limit) if self._truncate else None
                if fitted is None:
                    outcomes[i] = reject(f"record is {size} bytes, over kafka max_request_size={limit}")
                    continue
                message = fitted
                changed[i] = changed.get(i, 0) | _CUT
            by_topic.setdefault(message.topic, []).append((i, message))

        # Partition as AIOKafkaProducer.send would (murmur2 of the key; random for no key), keeping the
        # batch order within each topic-partition.
        groups: dict[tuple[str, int], list[tuple[int, _Message]]] = {}
        for topic in list(by_topic):
            problem = topic_problem(topic)
            if problem is not None:
                # Asked for it, the broker answers INVALID_TOPIC_EXCEPTION and aiokafka retries until
                # request_timeout_ms: a retry for ever that also held back the batch's other topics.
                refused = reject(f"kafka refuses topic {topic!r}: it {problem}")
                for i, _ in by_topic.pop(topic):
                    outcomes[i] = refused
        budget = self.context.send_budget
        submit_by = started + budget * _SUBMIT_SHARE
        aside, answered, stop = (
            await self._absent(by_topic.keys(), started + budget * _CREATE_SHARE)
            if by_topic
            else ({}, set(), None)
        )
        for topic, items in by_topic.items():
            outcome = aside.get(topic)
            if outcome is not None:
                # Its records wait aside (each with its own backoff) while later batches go on; the
                # topic is asked about again when they come back. (Or rejected: not authorised.)
                for i, _ in items:
                    outcomes[i] = outcome
                continue
            if stop is not None:
                for i, _ in items:
                    outcomes[i] = retry(f"not sent: {stop.reason}")
                continue
            try:
                # Bounded: several topics each waiting request_timeout_ms for their partitions took the
                # engine's send_timeout, and the whole batch was sent again.
                async with asyncio.timeout_at(submit_by):
                    all_partitions, available = await self._partitions(topic)
            except Exception as exc:
                from aiokafka.errors import UnknownTopicOrPartitionError

                if isinstance(exc, TimeoutError):
                    outcome = stop = retry(
                        f"kafka: the partitions of topic {topic!r} were not known within this send's time "
                        f"budget ({budget:g}s): the broker is slow to answer metadata"
                    )
                elif topic in answered and isinstance(exc, UnknownTopicOrPartitionError):
                    # A broker has just answered: no outage, and nothing stops (it stopped the batch, so
                    # every other topic's records were retried with it). The broker aiokafka asked does
                    # not know the topic (yet): it waits aside as a missing one does.
                    outcome = self._aside_outcome(topic, _UNKNOWN_TOPIC_OR_PARTITION)
                    self._note_missing({topic: _UNKNOWN_TOPIC_OR_PARTITION}, set())
                elif (denied := self._metadata_denied(exc, topic)) is not None:
                    outcome = denied
                else:
                    outcome = self._classify(exc, topic)
                    if self._stops_batch(outcome, exc):
                        stop = outcome  # broker unreachable: do not wait request_timeout_ms per topic
                for i, _ in items:
                    outcomes[i] = outcome
                continue
            count = len(all_partitions)
            murmur2 = self._murmur2
            for item in items:
                key = item[1].key
                if key is None:
                    partition = random.choice(available or all_partitions)
                else:
                    partition = all_partitions[(murmur2(key, _MURMUR2_SEED) & 0x7FFFFFFF) % count]
                group = groups.get((topic, partition))
                if group is None:
                    groups[(topic, partition)] = [item]
                else:
                    group.append(item)
        if self._aside:
            self._hold_back(batch, groups, outcomes)

        send_timeout = self.context.send_timeout
        state = _SendState(
            budget=budget,
            # No batch is handed to the producer in the budget's last tenth: what is under way then is
            # normally answered before the deadline, and is not given up (and maybe written twice).
            submit_by=submit_by,
            deadline=started + budget,
            # Waited for past the budget: only a batch handed over in its last request_timeout_ms and
            # its second half. Earlier, and still unanswered at its end, it is stuck (see ack_by).
            late_from=started + budget - min(self.options.request_timeout_ms / 1000, budget / 2),
            last_ack=started + send_timeout - min(_ANSWER_MARGIN, send_timeout / 12),
            answer_time=self.options.request_timeout_ms / 1000,
            late=retry(
                f"kafka: not sent within this send's time budget ({budget:g}s, 5/6 of send_timeout; "
                "slow round trips or acknowledgements, or refused batches sent again in pieces): sent "
                "again at once",
                held=True,
            ),
            given_up=[],
            stop=stop,
            occurrences=batch,
        )
        now = time.monotonic()
        for where in [where for where, refused in self._refused.items() if refused.until < now]:
            del self._refused[where]
        self._answered, self._refusing_since = {}, {}  # read by _note_answers while this send runs
        await self._deliver(groups, outcomes, state)
        if state.refused:
            self._defer_refused(groups, outcomes, state)

        final = [o if o is not None else retry("kafka: no outcome recorded (bug)") for o in outcomes]
        late = sum(o.held and not o.defer for o in final)
        aside_late = (
            late > 0 and any(o.defer for o in final) and any(o.kind is not OutcomeKind.RETRY for o in final)
        )
        if aside_late:
            # Records set aside (a refused partition, a missing topic, held back behind its own), and
            # the send out of time: what it did not send waits aside too (due at once, no attempt).
            # Held in place, it took those set aside back in place with it (the engine retries a batch
            # whole when any of it is), at the head of every resend, each an attempt: at
            # retry_max_attempts records never sent were dead-lettered with the refused partition's
            # reason; without, they waited a doubling backoff behind it (webhook item 192's fault).
            # Only when the send settled something: otherwise item 138's failed attempt below.
            # Noted in their partitions' places (_settle_aside): newer records wait behind them.
            waiting = retry(state.late.reason, retry_after=0.0, held=True, defer=True)
            final = [waiting if o.held and not o.defer else o for o in final]
        if self._aside or self._refused or aside_late:
            self._settle_aside(batch, groups, final)
        if any(o.held and not o.defer for o in final) and all(o.kind is OutcomeKind.RETRY for o in final):
            # Nothing settled: a hold (sent again at once, no failed attempt) would repeat this send for
            # ever, unseen (sink up, no retry counted, retry_max_attempts never reached), when the
            # broker refuses batches slower than the budget lets them be sent again in pieces. (A
            # record held back behind its partition's set-aside ones waits aside: no repeat.)
            stuck = retry(
                f"kafka: no record acknowledged or refused within this send's time budget "
                f"({self.context.send_budget:g}s): the broker answers slower than refused batches can be "
                "sent again in pieces"
            )
            final = [stuck if o.held and not o.defer else o for o in final]
            late = 0  # failures now: counted below
        # Records of a missing topic or a refused partition are not counted here: that topic or
        # partition was logged (_note_missing, _defer_refused).
        failed = [o for o in final if o.kind is not OutcomeKind.OK and not o.defer and not o.held]
        if failed:
            self.log.warning(
                "kafka: %d of %d records not accepted (first: %s)", len(failed), len(final), failed[0].reason
            )
        if late:
            self.log.info(
                "kafka: %d of %d records not sent within this send's time budget%s",
                late,
                len(final),
                " (set aside, due at once, with the records set aside)" if aside_late else "",
            )
        if self._changed or self._modified_log.unlogged:
            self._count_modified(final)
        return final

    def _count_modified(self, final: Sequence[Outcome], *, flush: bool = False) -> None:
        """Count the records the broker took changed (stamped otherwise than their event time, message
        cut): nothing is lost, but only their headers said so, and an operator learned of them only by
        reading the topic. Logged with their counts, at most every _MODIFIED_LOG_EVERY seconds
        (``flush``: now, at close)."""
        changed, self._changed = self._changed, {}
        found: Counter[str] = Counter()
        for i, marks in changed.items():
            if final[i].kind is OutcomeKind.OK:
                if marks & _STAMPED:
                    found["time_adjusted"] += 1
                if marks & _CUT:
                    found["truncated"] += 1
        due = self._modified_log.count(self.modified, found, flush=flush)
        if due is None:
            return
        unlogged, since = due
        self.log.warning(
            "kafka sink %s: the brokers (%s) took %d records with a timestamp other than their event time "
            "(more than future_grace=%gs ahead, before 1970, or refused by the broker: the time the router "
            'received them, or the send time; the value keeps it in "time", the header says '
            "time_adjusted) and %d with their message cut to fit max_request_size=%d or the topic's "
            "max.message.bytes (the header says truncated), since %s",
            self.context.name,
            self._describe_brokers(),
            unlogged["time_adjusted"],
            self.options.future_grace,
            unlogged["truncated"],
            self.options.max_request_size,
            since,
        )

    async def _deliver(
        self,
        groups: dict[tuple[str, int], list[tuple[int, _Message]]],
        outcomes: list[Outcome | None],
        state: _SendState,
    ) -> None:
        """Every topic-partition's records to the broker, each an outcome (see ``_deliver_lane``)."""
        budget = state.budget
        lanes = [deque(self._pack(topic, partition, items)) for (topic, partition), items in groups.items()]
        # Rounds: each lane (one topic-partition) is delivered batch after batch. With idempotence a
        # refused batch ends its lane's round (it took the partition's sequence numbers): the lane goes
        # on with a new producer once every lane has stopped.
        while lanes:
            async with asyncio.TaskGroup() as tasks:
                running = [
                    (lane, tasks.create_task(self._deliver_lane(lane, outcomes, state))) for lane in lanes
                ]
            lanes = [lane for lane, task in running if task.result()]
            if not lanes or state.unacknowledged:
                break
            if asyncio.get_running_loop().time() >= state.submit_by:
                break
            try:
                # The pieces of a refused batch need it. Started later, it could hand over nothing.
                if not await self._renew_producer(state.submit_by):
                    break  # held; the next send waits for the same start (_sequence_lost is still set)
            except RetryableError as exc:
                for lane in lanes:
                    _answer(outcomes, lane, retry(exc.reason))
                lanes = []
        for lane in lanes:  # out of time, or the producer is given up
            _answer(outcomes, lane, state.late)
        if state.unacknowledged:
            # A batch given up at the budget's end while another lane's late batch was waited for past
            # it: its producer went on retrying it (its late answer could come too). Written meanwhile
            # and answered retry, it was written again by the engine's resend. Judged again here, with
            # no await before _abandon halts the producer: still pending, it stays a retry.
            for job, future in state.given_up:
                if future.done():
                    _answer(outcomes, [job], self._settled_late(job, future))
            self._abandon(
                f"produce batches not acknowledged within the send's time ({budget:g}s budget, 5/6 of "
                "send_timeout; the broker is slow or keeps answering a retriable error)"
            )

    async def _deliver_lane(
        self, lane: deque[_Batch], outcomes: list[Outcome | None], state: _SendState
    ) -> bool:
        """Deliver one topic-partition's batches in order, each once the one before was acknowledged,
        so that a refused batch goes again (in pieces) before anything that followed it. True when the
        lane stopped for a new producer (idempotence: a batch failed after taking sequence numbers)
        with batches left; otherwise every record of the lane has its outcome."""
        loop = asyncio.get_running_loop()
        producer = self._producer
        while lane:
            job = lane[0]
            if state.stop is not None:
                _answer(outcomes, lane, retry(f"not sent: {state.stop.reason}"))
                return False
            now = loop.time()
            # Nor a batch whose answer, as slow as this send's slowest, would come after it is given
            # up (acks=all with a slow follower): written, then sent again, it would be a copy.
            if now >= state.submit_by or now + state.slowest > state.ack_by(now):
                _answer(outcomes, lane, state.late)
                return False
            where = (job.topic, job.partition)
            self._open.discard(where)  # what the answers to this batch say, from now on
            self._cut.pop(where, None)
            try:
                async with asyncio.timeout_at(state.submit_by):
                    future = await producer.send_batch(job.builder, job.topic, partition=job.partition)
            except TimeoutError:  # the producer waits for metadata: the broker is slow or away
                _answer(outcomes, lane, retry(f"kafka: the producer took no batch for {job.topic!r} in time"))
                return False
            except Exception as exc:
                denied = self._metadata_denied(exc, job.topic)
                if denied is not None:  # the partition's records wait aside together, in order
                    _answer(outcomes, lane, denied)
                    return False
                outcome = self._classify(exc, job.topic)
                _answer(outcomes, [lane.popleft()], outcome)
                _answer(
                    outcomes,
                    lane,
                    retry(f"not sent: an earlier batch for the same partition failed: {outcome.reason}"),
                )
                if self._stops_batch(outcome, exc):
                    state.stop = outcome
                return False
            handed = loop.time()
            self._unsettled += 1
            try:
                await asyncio.wait([future], timeout=max(0.0, state.ack_by(handed) - handed))
            finally:
                if future.done():
                    self._unsettled -= 1
            lane.popleft()
            if not future.done():
                # aiokafka never expires an idempotent producer's batch: it retries NOT_ENOUGH_REPLICAS,
                # REQUEST_TIMED_OUT and the like for ever. Given up here (the producer discarded unflushed)
                # instead of by the engine's send_timeout, which sent the whole batch again.
                state.unacknowledged = True
                state.given_up.append((job, future))
                state.refused.add(where)
                code = self._answered.get(where)
                why = (
                    f"the broker keeps answering {_error_name(code)}, a retriable error"
                    if code is not None
                    else "the broker is slow or keeps answering a retriable error (not enough in-sync "
                    "replicas, no leader)"
                )
                _answer(
                    outcomes,
                    [job],
                    retry(
                        f"kafka: produce batch for {job.topic!r} partition {job.partition} not acknowledged "
                        f"{loop.time() - handed:.1f}s after it was handed over (this send's time budget: "
                        f"{state.budget:g}s): {why}"
                    ),
                )
                _answer(
                    outcomes,
                    lane,
                    retry("not sent: an earlier batch for the same partition was not acknowledged"),
                )
                return False
            took = loop.time() - handed
            if took > state.slowest:
                state.slowest = took
            error = _failure(future)
            if error is None:
                _answer(outcomes, [job], OK)
                state.taken = True
                continue
            cut = self._was_cut(job, error, producer)
            if cut is not None:
                # Refused, nothing written: its records and the lane's rest (never handed over) wait
                # aside (_defer_refused), the producer goes on (its sequence number given back).
                state.refused.add(where)
                _answer(outcomes, [job], cut)
                _answer(
                    outcomes, lane, retry(f"not sent: an earlier batch for the same partition: {cut.reason}")
                )
                return False
            if self.options.idempotence:
                self._sequence_lost = True
            pieces = self._pieces(job, error, state.occurrences)
            if pieces:
                lane.extendleft(reversed(pieces))
            else:
                outcome = self._classify(error, job.topic, job)
                _answer(outcomes, [job], outcome)
                if outcome.kind is OutcomeKind.RETRY:
                    if isinstance(error, _partition_errors()):
                        # The broker answered for this partition (a batch expired retrying NOT_ENOUGH_
                        # REPLICAS without idempotence): the partition refuses, not the broker.
                        state.refused.add(where)
                    # Nothing after it is written first: the engine sends them again, in order.
                    _answer(
                        outcomes,
                        lane,
                        retry(f"not sent: an earlier batch for the same partition failed: {outcome.reason}"),
                    )
                    return False
            if self.options.idempotence:
                return bool(lane)
        return False

    # -- a refused partition's records set aside ------------------------------------------------

    def _hold_back(
        self,
        batch: Sequence[Occurrence],
        groups: dict[tuple[str, int], list[tuple[int, _Message]]],
        outcomes: list[Outcome | None],
    ) -> None:
        """Keep each partition's order behind its records set aside. The engine offers those again
        each on its own backoff, and newer records of the partition keep coming: written first, they
        went in before older ones of their object. So a record of a partition goes only when every
        record before it there is in this batch (those go first, in their order), or gone; the others
        wait aside, held (no attempt: nothing was sent), and are offered again _HOLD_AGAIN after the
        set-aside ones, which all come back at once (see _defer_refused). Removes them from
        ``groups``, gives them their outcome and notes their place."""
        now = time.monotonic()
        keys = {(occurrence.uid, occurrence.number) for occurrence in batch}
        for where, items in list(groups.items()):
            waiting = self._aside.get(where)
            if not waiting:
                continue
            refused = self._refused.get(where)
            wait = (max(0.0, refused.probe_at - now) if refused is not None else 0.0) + _HOLD_AGAIN
            held: Outcome | None = None
            # The place of the first record noted for the partition and not in this batch: nothing
            # after it may go. A record not noted takes its place by when it was received: a newer
            # occurrence of a set-aside event, which the engine kept back itself, goes with it.
            floor = min((place for key, place in waiting.items() if key not in keys), default=None)
            kept: list[tuple[_Place, tuple[int, _Message]]] = []
            for item in items:
                occurrence = batch[item[0]]
                key = (occurrence.uid, occurrence.number)
                place = waiting.get(key) or (occurrence.received_at, math.inf)
                if floor is None or place < floor:
                    kept.append((place, item))
                    continue
                if held is None:
                    held = retry(
                        f"kafka: held back while older records of its partition ({where[0]!r} partition "
                        f"{where[1]}) wait aside, so that they go in first",
                        retry_after=wait,
                        held=True,
                        defer=True,
                    )
                outcomes[item[0]] = held
                if key not in waiting:
                    # Noted under another partition (a keyless record is drawn anew at each send; a
                    # key maps elsewhere once partitions are added): that record goes first. Kept, the
                    # index named this partition only, and nothing (an answer, given_up) ever let go
                    # of it there: every later record of that partition was held back for good.
                    was = self._aside_at.get(key)
                    if was is not None and was != where:
                        self._forget(key)
                    waiting[key] = (occurrence.received_at, float(next(self._aside_order)))
                    self._aside_at[key] = where
            if kept:
                kept.sort(key=lambda pair: pair[0])  # stable: the batch's order among equals
                groups[where] = [item for _, item in kept]
            else:
                del groups[where]

    def _defer_refused(
        self,
        groups: dict[tuple[str, int], list[tuple[int, _Message]]],
        outcomes: list[Outcome | None],
        state: _SendState,
    ) -> None:
        """Set aside (``defer``) the retried records of the partitions refused in this send, so that
        later batches of other partitions go on (retried in place, one partition refusing held up
        every other), when the partition, not the broker, refuses: the broker acknowledged another
        batch of this send, answered this partition with an error, or refused it before. Otherwise
        (the broker away: nothing answered) they are retried in place, as the others. They all come
        back at once (``retry_after``: the partition's own backoff): each at its own time on the
        engine's jittered backoff, each found an older one still missing and was held back again
        (``_hold_back``), a few records per round."""
        now = time.monotonic()
        for where in state.refused:
            refused = self._refused.get(where)
            if not (state.taken or refused is not None or where in self._answered):
                continue
            backoff = _PROBE_FIRST if refused is None else min(refused.backoff * 2, self._probe_max)
            deferred: dict[str, Outcome] = {}
            count = 0
            for i, _ in groups.get(where, ()):
                outcome = outcomes[i]
                if outcome is None or outcome.kind is not OutcomeKind.RETRY or outcome.held or outcome.defer:
                    continue
                aside = deferred.get(outcome.reason)
                if aside is None:
                    aside = deferred[outcome.reason] = retry(outcome.reason, retry_after=backoff, defer=True)
                outcomes[i] = aside
                count += 1
            if not count:
                continue
            if refused is None:
                self.log.warning(
                    "kafka: topic %r partition %d refused (%s): %d records set aside, and later records of "
                    "the partition held back behind them, while other partitions go on",
                    where[0],
                    where[1],
                    next(iter(deferred)),
                    count,
                )
            self._refused[where] = _Refused(backoff, now + backoff, now + self.context.retry_wait_max)

    @property
    def _probe_max(self) -> float:
        """The pipeline's retry_max_backoff: the context's retry_wait_max is ten times that."""
        return max(_PROBE_FIRST, self.context.retry_wait_max / 10)

    def _settle_aside(
        self,
        batch: Sequence[Occurrence],
        groups: dict[tuple[str, int], list[tuple[int, _Message]]],
        final: Sequence[Outcome],
    ) -> None:
        """Note the records set aside (and those the send had no time for beside them), in the order
        they had in their partition (this send's lane order), and let go of those answered otherwise;
        a partition that acknowledged a batch and had none refused after it is no longer refused."""
        aside, at, order = self._aside, self._aside_at, self._aside_order
        for i, outcome in enumerate(final):  # where it was noted: its key may map elsewhere now
            if outcome.kind is not OutcomeKind.RETRY and at:
                self._forget((batch[i].uid, batch[i].number))
        for where, items in groups.items():
            taken = deferred = False
            for i, _ in items:  # in lane order: the partition's
                outcome = final[i]
                if outcome.kind is not OutcomeKind.RETRY:
                    taken = taken or outcome.kind is OutcomeKind.OK
                    continue
                if not outcome.defer:
                    continue  # retried in place: it keeps its place
                # A batch taken, then one refused (a refusal starting mid-send): still refused, its
                # backoff kept growing. Not for records the send had no time for (held): not refused.
                deferred = deferred or not outcome.held
                key = (batch[i].uid, batch[i].number)
                was = at.get(key)
                if was is not None and was != where:
                    self._forget(key)  # noted where its key mapped before partitions were added
                waiting = aside.setdefault(where, {})
                if key not in waiting:
                    waiting[key] = (batch[i].received_at, float(next(order)))
                    at[key] = where
            if taken and not deferred and self._refused.pop(where, None) is not None:
                self.log.info("kafka: topic %r partition %d takes records again", where[0], where[1])

    def _settled_late(self, job: _Batch, future: asyncio.Future[Any]) -> Outcome:
        """The outcome of a given-up batch whose answer came before its send ended. The records after
        it in its partition stay unsent (retry): they go after it, in order."""
        from aiokafka.errors import InvalidTimestampError, MessageSizeTooLargeError

        error = _failure(future)
        if error is None:
            return OK
        cut = self._was_cut(job, error, self._producer)
        if cut is not None:
            return cut
        outcome = self._classify(error, job.topic, job)
        if isinstance(error, _whole_batch_errors()) and (
            len(job.items) > 1
            or (isinstance(error, InvalidTimestampError) and job.items[0][1].timestamp_ms is not None)
            or (isinstance(error, MessageSizeTooLargeError) and self._truncate)
        ):
            # What _pieces sends again in pieces (cut, or with the send time) in a lane: the next send does.
            return retry(f"kafka: refused as a whole after the send's budget, sent again: {outcome.reason}")
        return outcome

    def _was_cut(self, job: _Batch, error: BaseException, producer: Any) -> Outcome | None:
        """The retry of a batch failed at once for a refused partition (``_note_answers``), or None for
        another failure. The partition's sequence number is given back to ``producer``, which took it for
        the batch the broker did not write: the next batch would otherwise be refused as out of order.
        That batch was the partition's only one outstanding (see ``_answered``); were another behind it,
        ``_give_back_sequence`` would find the numbers moved on and a new producer would be made."""
        from aiokafka.errors import UnknownError

        where = (job.topic, job.partition)
        code = self._cut.get(where)
        if code is None or type(error) is not UnknownError:
            return None
        del self._cut[where]
        if self.options.idempotence and not _give_back_sequence(producer, job):
            self._sequence_lost = True  # aiokafka's internals differ: a new producer, as for a refusal
        return retry(
            f"kafka: topic {job.topic!r} partition {job.partition} refused the batch ({_error_name(code)}: "
            "nothing written)"
        )

    def _pieces(
        self, job: _Batch, error: BaseException, occurrences: Sequence[Occurrence]
    ) -> list[_Batch] | None:
        """What to send instead of a refused batch, in its place; None when its outcome is final."""
        from aiokafka import errors as kerr

        items = job.items
        if isinstance(error, _whole_batch_errors()) and len(items) > 1:
            # The broker refused the batch for what one record may hold (too large for its limit, a
            # timestamp out of its range): halves, so a batch refused for its size goes in two requests
            # and one bad record is found in a few (one per record took longer than send_timeout for
            # a few hundred records); a few records go one by one.
            half = (len(items) + 1) // 2 if len(items) > _ONE_BY_ONE else 1
            self.log.info(
                "kafka: the broker refused a produce batch (%s); sending its %d records %s",
                type(error).__name__,
                len(items),
                "one by one" if half == 1 else "again in two halves",
            )
            return [
                piece
                for start in range(0, len(items), half)
                for piece in self._pack(job.topic, job.partition, items[start : start + half])
            ]
        if isinstance(error, kerr.InvalidTimestampError) and items[0][1].timestamp_ms is not None:
            # The event time is out of the broker's range (log.message.timestamp.after.max.ms, one
            # hour ahead by default since Kafka 4.0: a node whose clock runs ahead). Deliver it with
            # the send time, marked; the value keeps the event's own time.
            [(i, message)] = items
            headers = (
                message.headers if _TIME_ADJUSTED in message.headers else [*message.headers, _TIME_ADJUSTED]
            )
            adjusted = _Message(message.topic, message.key, message.value, headers, None)
            self._changed[i] = self._changed.get(i, 0) | _STAMPED
            # Throttled: a node whose clock runs ahead gives one per event; each is counted (modified).
            self._refusal_log.warning(
                "timestamp",
                "kafka: the broker refused event time %d ms of %s (%s); sending it with the send time",
                message.timestamp_ms,
                dict(message.headers).get("occurrence", b"?").decode("utf-8", "replace"),
                error,
            )
            return [_Batch(job.topic, job.partition, self._single(adjusted), [(i, adjusted)])]
        if isinstance(error, kerr.MessageSizeTooLargeError) and self._truncate and occurrences:
            return self._cut_for_topic(job, occurrences)
        return None

    def _cut_for_topic(self, job: _Batch, occurrences: Sequence[Occurrence]) -> list[_Batch] | None:
        """A lone record under max_request_size that the broker refused MESSAGE_TOO_LARGE (the topic's
        max.message.bytes, or the broker's message.max.bytes, is lower; neither is told to a producer)
        again with its message cut to half its size, in its place; refused again, cut again. None when
        even an empty message does not fit half of it: rejected then, naming that limit."""
        from aiokafka.record.default_records import DefaultRecordBatchBuilder

        [(i, message)] = job.items
        # Uncompressed, as max_request_size is checked: halved, a compressed batch about halves too.
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(message.key, message.value, message.headers)
        fitted = self._shortened(occurrences[i], message, size // 2)
        if fitted is None:
            return None
        self._changed[i] = self._changed.get(i, 0) | _CUT
        # Throttled: a topic with a low limit refuses every large record.
        self._refusal_log.warning(
            "size",
            "kafka: topic %r refused a produce batch of one %d-byte record as too large (MESSAGE_TOO_LARGE: "
            "its max.message.bytes is below max_request_size=%d); sending it with its message cut to "
            "%d bytes",
            job.topic,
            size,
            self.options.max_request_size,
            size // 2,
        )
        return [_Batch(job.topic, job.partition, self._single(fitted), [(i, fitted)])]

    def _pack(self, topic: str, partition: int, items: Sequence[tuple[int, _Message]]) -> list[_Batch]:
        """``items`` in order, in as few produce batches as they fit in."""
        batches: list[_Batch] = []
        job: _Batch | None = None
        for item in items:
            message = item[1]
            if (
                job is None
                or job.builder.append(
                    timestamp=message.timestamp_ms,
                    key=message.key,
                    value=message.value,
                    headers=message.headers,
                )
                is None
            ):  # full: it goes as it is; the record starts the next batch
                job = _Batch(topic, partition, self._single(message), [])
                batches.append(job)
            job.items.append(item)
        return batches

    def _single(self, message: _Message) -> Any:
        """A new batch holding ``message`` (the first record always fits: its size was checked)."""
        builder = self._producer.create_batch()
        builder.append(
            timestamp=message.timestamp_ms, key=message.key, value=message.value, headers=message.headers
        )
        return builder
