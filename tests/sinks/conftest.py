"""Fixtures shared by the sink tests (test files do not import each other)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from eventrouter import SinkContext
from eventrouter.testing.receivers.kafka_faults import FaultyBroker
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink


def _kafka_sink(
    relay: FaultyBroker,
    send_timeout: float,
    name: str = "kafka",
    retry_wait_max: float = 300.0,
    **options: Any,
) -> KafkaSink:
    model = KafkaOptions.model_validate(
        {"brokers": f"127.0.0.1:{relay.listen_port}", "request_timeout_ms": 1000, **options}
    )
    context = SinkContext(
        name=name,
        cluster="c",
        data_dir=None,
        logger=logging.getLogger(f"test.{name}"),
        send_timeout=send_timeout,
        retry_wait_max=retry_wait_max,
    )
    return KafkaSink(model, context)


@pytest.fixture
def kafka_sink() -> Callable[..., KafkaSink]:
    """Builds a Kafka sink through a broker relay as the router builds it: its context carries the
    pipeline's send_timeout and retry_wait_max (core's ``eventrouter.testing`` may not import a sink)."""
    return _kafka_sink
