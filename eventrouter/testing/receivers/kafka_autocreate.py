"""A Kafka broker with ``auto.create.topics.enable=true``, answering Metadata as Kafka 2.8+ does, made of
Tansu and a relay; it can also list brokers that never answer.

Tansu 0.6 creates a topic inside the Metadata request that names it and answers it at once (error 0).
Kafka does not (``DefaultAutoTopicCreationManager``, 2.8 and later):

- KRaft mode (3.x, and all of 4.x), or a broker forwarding to its controller: the CreateTopics is sent
  to the controller asynchronously, and the Metadata request that asked is answered
  UNKNOWN_TOPIC_OR_PARTITION (3) for the topic (``sendCreateTopicRequest``); so is every request asking
  while that creation is in flight (``filterCreatableTopics``: ``inflightTopics``). The topic appears
  (error 0) in a later answer. A creation the controller refuses is only logged by the broker: the
  topic stays 3.
- ZooKeeper mode (2.8-3.x, ``createTopicsInZk``): the creation is written at once and the answer is
  LEADER_NOT_AVAILABLE (5) when it succeeded (or the topic already exists) and the creation's own error
  when it failed: INVALID_REPLICATION_FACTOR (38) while fewer brokers are alive than
  ``default.replication.factor``, POLICY_VIOLATION (44) under a ``create.topic.policy``. Every later
  Metadata request naming the topic tries again.
- A request with ``allow_auto_topic_creation`` false (Metadata v4+, KIP-361) creates nothing and gets 3.

The relay clears ``allow_auto_topic_creation`` in each Metadata request (so Tansu answers 3 for a missing
topic and creates nothing, as ``kafka_no_autocreate``), and for a topic Tansu answered 3 to a request
that allowed creation:

- ``create_delay`` (seconds; None: never): the "controller" creates it that long after the first such
  answer (with Tansu's admin API, 4 partitions); until then the relay answers ``creating_code`` (3 as
  KRaft answers; 5 as ZooKeeper mode answers once it wrote the creation).
- ``codes``: topic -> error code answered instead, for ever, the topic never created (ZooKeeper mode's
  creation error: 38, 44; or TOPIC_AUTHORIZATION_FAILED, 29, as Kafka answers a client that may describe
  and write the topic but not create it: no CREATE on the cluster nor on the topic, ``KafkaApis``'
  ``unauthorizedForCreateTopics``, checked only when the request allows creation).

``denied``: topics this client may not describe (no DESCRIBE, nor WRITE): answered
TOPIC_AUTHORIZATION_FAILED without partitions to every Metadata request, whether they exist or not and
whether creation is allowed or not (Kafka's ``unauthorizedForDescribeTopics``: their existence is not
disclosed). Only Metadata is answered so; a Produce to one reaches Tansu.

``stale``: topic -> how many answers give it as Tansu has it; later ones answer 3 without partitions (a
broker whose metadata cache does not hold it: Kafka's brokers learn a new topic each at its own time, and
a deleted one leaves each at its own time), or the topic's ``codes`` entry to a request allowing creation
(such a broker answers a client without CREATE TOPIC_AUTHORIZATION_FAILED, as for a missing topic).

``extra_brokers``: (node id, port) of brokers on 127.0.0.1 added to every Metadata answer, before the
broker's own, e.g. a ``silent.SilentServer`` (a broker in a stall, or one behind a network partition,
that accepts connections and never answers). Changing the list changes the next answers.

``more_brokers``: this many more brokers listed (node ids from 201), each another port of this relay: a
cluster whose every broker answers as this one (Tansu behind it), e.g. to count brokers asked in turn.
``answer_delay``: seconds every answer (ApiVersions, SASL, Metadata, Produce, ...) reaches the client
after Tansu gave it, in order, requests not held back: a loaded broker, or a distant one (set at the
start).

``asked`` holds the topics of each Metadata request that named topics, ``answered`` each (topic, code)
as answered. Metadata up to v5 is handled (aiokafka asks with v5 at most); v0-v3 have no such flag, and
Kafka treats them as allowing creation: they reach Tansu unchanged, which creates at once; v6 and later
pass unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any, Self

from aiokafka.protocol import metadata as md

from ._relay import Relay
from .kafka_no_autocreate import metadata_topics
from .tansu import TansuBroker, free_port

__all__ = [
    "INVALID_REPLICATION_FACTOR",
    "LEADER_NOT_AVAILABLE",
    "POLICY_VIOLATION",
    "TOPIC_AUTHORIZATION_FAILED",
    "UNKNOWN_TOPIC_OR_PARTITION",
    "AutoCreate",
    "asks",
    "broker_with_auto_create",
]

API_METADATA = 3
UNKNOWN_TOPIC_OR_PARTITION = 3
LEADER_NOT_AVAILABLE = 5
TOPIC_AUTHORIZATION_FAILED = 29
INVALID_REPLICATION_FACTOR = 38
POLICY_VIOLATION = 44
_MORE_NODES = 201  # the node id of the first of ``more_brokers`` (Tansu is 111)
_RESPONSES: dict[int, Any] = {v: getattr(md, f"MetadataResponse_v{v}") for v in range(6)}
"""The answers aiokafka can decode (it asks with v5 at most)."""


def asks(answered: list[tuple[str, int]], topic: str) -> int:
    """How many answers (``AutoCreate.answered``) named ``topic``."""
    return sum(name == topic for name, _ in answered)


@contextlib.asynccontextmanager
async def broker_with_auto_create(
    *,
    create_delay: float | None = 0.3,
    creating_code: int = UNKNOWN_TOPIC_OR_PARTITION,
    codes: dict[str, int] | None = None,
    stale: dict[str, int] | None = None,
    extra_brokers: Sequence[tuple[int, int]] = (),
    denied: Collection[str] = (),
    more_brokers: int = 0,
    answer_delay: float = 0.0,
) -> AsyncIterator[tuple[TansuBroker, AutoCreate]]:
    """A Tansu broker behind the relay, advertising the relay: clients reach it at
    ``127.0.0.1:{relay.listen_port}``; ``broker`` itself (its own port) still creates topics at once."""
    port = free_port()
    async with TansuBroker(advertised_port=port) as broker:
        relay = AutoCreate(
            listen_port=port,
            target_port=broker.port,
            broker=broker,
            create_delay=create_delay,
            creating_code=creating_code,
            codes=codes,
            stale=stale,
            extra_brokers=extra_brokers,
            denied=denied,
            more_brokers=more_brokers,
            answer_delay=answer_delay,
        )
        async with relay:
            yield broker, relay


class AutoCreate(Relay):
    """In front of Tansu: Metadata answered as a Kafka broker with auto-create on answers (see the
    module). Start the broker with ``advertised_port`` set to this relay's port."""

    def __init__(
        self,
        *,
        listen_port: int,
        target_port: int,
        broker: TansuBroker,
        create_delay: float | None = 0.3,
        creating_code: int = UNKNOWN_TOPIC_OR_PARTITION,
        codes: dict[str, int] | None = None,
        stale: dict[str, int] | None = None,
        extra_brokers: Sequence[tuple[int, int]] = (),
        denied: Collection[str] = (),
        more_brokers: int = 0,
        answer_delay: float = 0.0,
    ) -> None:
        super().__init__(listen_port=listen_port, target_port=target_port)
        self.broker = broker
        self.create_delay = create_delay
        self.creating_code = creating_code
        self.codes: dict[str, int] = dict(codes or {})
        self.stale: dict[str, int] = dict(stale or {})
        self.extra_brokers: list[tuple[int, int]] = list(extra_brokers)
        self.denied: set[str] = set(denied)
        self.more_brokers = more_brokers
        self.answer_delay = answer_delay
        self._more: list[asyncio.Server] = []
        self.creating: set[str] = set()
        """Topics whose creation was started (in flight, or done)."""
        self.asked: list[list[str]] = []
        self.answered: list[tuple[str, int]] = []

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        for i in range(self.more_brokers):
            server = await asyncio.start_server(self._serve, self.host, 0)
            self._more.append(server)
            self.extra_brokers.append((_MORE_NODES + i, server.sockets[0].getsockname()[1]))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._more:
            server.close()
            await server.wait_closed()
        await super().__aexit__(*exc)

    async def _create(self, topic: str) -> None:
        try:
            await asyncio.sleep(self.create_delay or 0.0)
            await self.broker.create_topics(topic)
        except Exception:
            # Not in flight any more: as Kafka's, the next request asking starts a creation again.
            self.creating.discard(topic)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: dict[int, tuple[int, bool]] = {}  # correlation id -> (Metadata version, creation allowed)
        await self.relay_with(
            writer,
            lambda up_reader, up_writer: (
                self._requests(reader, up_writer, pending),
                self._responses(up_reader, writer, pending),
            ),
        )

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, pending: dict[int, tuple[int, bool]]
    ) -> None:
        while True:
            try:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                request = bytearray(await reader.readexactly(size))
            except (asyncio.IncompleteReadError, OSError):
                return
            api_key, version, correlation = struct.unpack_from(">hhi", request)
            if api_key == API_METADATA and version in _RESPONSES:
                allowed = True  # before v4 there is no flag, and Kafka creates
                if version >= 4:
                    topics, at = metadata_topics(request)
                    if topics:
                        self.asked.append(topics)
                    allowed = bool(request[at])
                    request[at] = 0  # Tansu creates nothing: the creation is this relay's (_create)
                pending[correlation] = (version, allowed)
            up.write(struct.pack(">i", size) + bytes(request))
            await up.drain()

    async def _responses(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: dict[int, tuple[int, bool]]
    ) -> None:
        if not self.answer_delay:
            await self._pass_answers(up, writer, pending, None)
            return
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.ensure_future(self._send_late(late, writer))
        try:
            await self._pass_answers(up, writer, pending, late)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _pass_answers(
        self,
        up: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: dict[int, tuple[int, bool]],
        late: asyncio.Queue[tuple[float, bytes]] | None,
    ) -> None:
        """Each answer to the client, rewritten (Metadata), at once or through ``late`` (answer_delay)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                (size,) = struct.unpack(">i", await up.readexactly(4))
                body = await up.readexactly(size)
            except (asyncio.IncompleteReadError, OSError):
                return
            (correlation,) = struct.unpack_from(">i", body)
            asked = pending.pop(correlation, None)
            if asked is not None:
                body = body[:4] + self._answer(*asked, body[4:])
            if late is None:
                writer.write(struct.pack(">i", len(body)) + body)
                await writer.drain()
            else:
                late.put_nowait((loop.time() + self.answer_delay, struct.pack(">i", len(body)) + body))

    @staticmethod
    async def _send_late(late: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, frame = await late.get()
            await asyncio.sleep(due - loop.time())
            writer.write(frame)
            await writer.drain()

    def _answer(self, version: int, allowed: bool, body: bytes) -> bytes:
        answer = _RESPONSES[version].decode(body)
        topics = []
        for code, name, *rest in answer.topics:
            if name in self.denied:
                code, rest[-1] = TOPIC_AUTHORIZATION_FAILED, []
            elif name in self.stale and asks(self.answered, name) >= self.stale[name]:
                # (..., partitions) in every version
                code = (
                    self.codes.get(name, UNKNOWN_TOPIC_OR_PARTITION)
                    if allowed
                    else UNKNOWN_TOPIC_OR_PARTITION
                )
                rest[-1] = []
            elif code == UNKNOWN_TOPIC_OR_PARTITION and allowed:
                if name in self.codes:
                    code = self.codes[name]
                elif self.create_delay is not None:
                    if name not in self.creating:
                        self.creating.add(name)
                        task = asyncio.get_running_loop().create_task(self._create(name))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    code = self.creating_code
            self.answered.append((name, code))
            topics.append((code, name, *rest))
        answer.topics = topics
        if self.extra_brokers:
            extra = [
                (node, self.host, port) if version == 0 else (node, self.host, port, None)
                for node, port in self.extra_brokers
            ]
            answer.brokers = [*extra, *answer.brokers]
        encoded: bytes = answer.encode()
        return encoded
