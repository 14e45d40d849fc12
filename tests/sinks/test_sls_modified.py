"""Logs SLS stores stamped otherwise than their own time (``clamp_time``: outside the service's window
[now - 7 days, now + 15 minutes], or refused for their time by a service clock off ours) are counted
in ``SLSSink.modified`` (the engine exports them as ``eventrouter_sink_modified_total``) and logged
with their count, throttled, as Loki's are (items 154, 157): before, only each stored log's
``time_adjusted`` field said so."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from eventrouter import Occurrence, SinkContext
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.sls import SLSOptions, SLSSink

PROJECT = "k8s-log-c1"
LOGSTORE = "k8s-event"
KEY_ID = "LTAI5tTestKeyId"
SECRET = "s3cr3t-Value-9f8e7d"
LOG = logging.getLogger("test.sls.modified")


def _at(offset: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() + offset, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return make_occurrence(cluster="c1", last_timestamp=when, **kwargs)


def _sink(receiver: SLSReceiver) -> SLSSink:
    options = SLSOptions.model_validate(
        {
            "url": receiver.url,
            "project": PROJECT,
            "logStore": LOGSTORE,
            "accessKeyId": KEY_ID,
            "accessKeySecret": SECRET,
        }
    )
    return SLSSink(options, SinkContext(name="sls", cluster="c1", data_dir=None, logger=LOG))


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOG.name and "stamped otherwise" in r.getMessage()
    ]


def _sample(metrics: Metrics, name: str, reason: str) -> float:
    return metrics.registry.get_sample_value(name, {"sink": "sls", "reason": reason}) or 0.0


def _modified(metrics: Metrics, reason: str) -> float:
    return _sample(metrics, "eventrouter_sink_modified_total", reason)


async def test_logs_stored_stamped_otherwise_are_counted_exported_and_logged_throttled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOG.name)
    async with SLSReceiver(projects={PROJECT: [LOGSTORE]}, keys=[AccessKey(KEY_ID, SECRET)]) as receiver:
        sink = _sink(receiver)
        metrics = Metrics()
        pipeline = pipeline_for("sls", sink, metrics, None)
        task = asyncio.create_task(pipeline.run())
        try:
            for occurrence in (
                _at(-30, object_name="plain"),
                _at(-8 * 86400, object_name="old"),  # relisted or replayed: stamped at the old edge
                _at(2 * 3600, object_name="ahead"),  # a node clock ahead: stamped at the router's now
            ):
                pipeline.offer(occurrence)
            await until(lambda: len(receiver.logs()) == 3)
            await pipeline.wait_idle(10)
            assert sink.modified == {"time_adjusted": 2}
            assert _modified(metrics, "time_adjusted") == 2
            assert _logged(caplog) == [
                f"sls sink sls: project {PROJECT!r}, logstore {LOGSTORE!r} at {receiver.url} stored 2 logs "
                "stamped otherwise than their own time (outside the window SLS accepts, now - 7 days ... "
                "now + 15 minutes: at its nearest edge; or refused for their time: at the router's now); "
                "each keeps its own time in time and eventId and says time_adjusted=true, since start"
            ]
            # A service clock 700 s behind ours: inside our window, refused by the service, sent again
            # stamped at our now. Within the minute: counted, not logged until then or the close.
            receiver.clock_offset = -700.0
            pipeline.offer(_at(250, object_name="skewed"))
            await until(lambda: len(receiver.logs()) == 4)
            await pipeline.wait_idle(10)
            assert sink.modified == {"time_adjusted": 3}
            assert _modified(metrics, "time_adjusted") == 3
            assert len(_logged(caplog)) == 1
            # Only what the service stored counts: one it refuses for good is dead-lettered, unchanged.
            receiver.clock_offset = 0.0
            receiver.fail_next(1, "PostBodyInvalid", 400)
            pipeline.offer(_at(-9 * 86400, object_name="refused"))
            await until(lambda: _sample(metrics, "eventrouter_sink_dead_lettered_total", "rejected") == 1)
            assert sink.modified == {"time_adjusted": 3}
        finally:
            pipeline.close()
            await task
            await pipeline.close_sink()
    stored = {log.fields["involved_object_name"]: log for log in receiver.logs()}
    assert [name for name, log in stored.items() if log.fields.get("time_adjusted") == "true"] == [
        "old",
        "ahead",
        "skewed",
    ]
    assert len(_logged(caplog)) == 2  # the rest, at close
    assert " stored 1 logs stamped otherwise " in _logged(caplog)[1]
    assert sum(_modified(metrics, r) for r in ("truncated", "other")) == 0
