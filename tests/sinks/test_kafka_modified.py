"""Records the broker takes changed (a timestamp other than their event time: more than
``future_grace`` ahead, or refused by a stricter topic and sent with the send time; a message cut to
fit ``max_request_size``) are counted in ``KafkaSink.modified`` (the engine exports them as
``eventrouter_sink_modified_total``) and logged with their counts, throttled, as Loki's are (items
154, 157): before, only each record's headers said so."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

import pytest

from eventrouter import Occurrence, SinkContext
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.kafka_checks import BrokerChecksProxy
from eventrouter.testing.receivers.tansu import TansuBroker, free_port
from eventrouter.testing.waiting import until
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink

LOG = logging.getLogger("test.kafka.modified")
SAID = re.compile(r" took (\d+) records with a timestamp other than .* and (\d+) with their message cut ")


def _at(offset: float, **kwargs: Any) -> Occurrence:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset))
    return make_occurrence(last_timestamp=when, **kwargs)


def _said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int]]:
    """(time_adjusted, truncated) of each log line that counts records delivered changed."""
    return [
        (int(m[1]), int(m[2]))
        for r in caplog.records
        if r.name == LOG.name and (m := SAID.search(r.getMessage())) is not None
    ]


def _refused_time_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the broker refused event time" in r.getMessage()]


def _modified(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "eventrouter_sink_modified_total", {"sink": "kafka", "reason": reason}
    )
    return value or 0.0


async def test_records_delivered_stamped_otherwise_or_cut_are_counted_exported_and_logged_throttled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOG.name)
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        # A topic stricter than future_grace (5 minutes ahead): the sink cannot predict its refusal.
        BrokerChecksProxy(listen_port=port, target_port=broker.port, after_max_ms=300_000),
    ):
        options = KafkaOptions.model_validate(
            {"brokers": f"127.0.0.1:{port}", "topic": "modified", "idempotence": False}
        )
        sink = KafkaSink(options, SinkContext(name="kafka", cluster="c", data_dir=None, logger=LOG))
        metrics = Metrics()
        pipeline = pipeline_for("kafka", sink, metrics, None)
        task = asyncio.create_task(pipeline.run())
        try:
            for occurrence in (
                _at(-30, reason="Plain"),
                _at(3 * 3600, reason="Ahead"),  # over future_grace: stamped at receipt
                _at(-20, reason="Long", message="x" * 2_000_000),  # over max_request_size: cut
                _at(1800, reason="Strict"),  # refused by the topic: sent again with the send time
            ):
                pipeline.offer(occurrence)
            await until(lambda: sum(sink.modified.values()) == 3, timeout=30)
            await pipeline.wait_idle(30)
            assert sink.modified == {"time_adjusted": 2, "truncated": 1}
            assert (_modified(metrics, "time_adjusted"), _modified(metrics, "truncated")) == (2, 1)
            assert len(_said(caplog)) == 1  # at once; more within the minute wait for it (or the close)
            assert len(_refused_time_lines(caplog)) == 1
            # Within the minute: counted, neither logged again (the broker's refusal is throttled too).
            pipeline.offer(_at(1800, reason="Strict-2"))
            await until(lambda: sink.modified["time_adjusted"] == 3, timeout=30)
            await pipeline.wait_idle(30)
            assert _modified(metrics, "time_adjusted") == 3
            assert len(_said(caplog)) == 1
            assert len(_refused_time_lines(caplog)) == 1
        finally:
            pipeline.close()
            await task
            await pipeline.close_sink()
        records = await broker.consume("modified", expected=5)
    headers = {json.loads(r.value)["reason"]: dict(r.headers) for r in records}
    assert sorted(r for r, h in headers.items() if h.get("time_adjusted") == b"true") == [
        "Ahead",
        "Strict",
        "Strict-2",
    ]
    assert [r for r, h in headers.items() if h.get("truncated") == b"true"] == ["Long"]
    said = _said(caplog)
    assert len(said) == 2  # the rest, at close
    assert (sum(t for t, _ in said), sum(c for _, c in said)) == (3, 1)
    assert (_modified(metrics, "other")) == 0
