"""Entries Loki takes changed (stamped at receipt: ``time_adjusted``; message cut to
``max_line_bytes``: ``truncated``) are counted and logged with their counts, throttled: before, only
the lines said so, and an operator learned of them only by querying Loki."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink

LOG = logging.getLogger("test.loki.modified")
CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=LOG)


def _at(offset: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() + offset, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOG.name and "stamped otherwise" in r.getMessage()
    ]


async def test_entries_delivered_stamped_at_receipt_or_truncated_are_counted_and_logged_throttled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOG.name)
    async with LokiReceiver() as loki:
        sink = LokiSink(LokiOptions.model_validate({"url": loki.url, "max_line_bytes": 2048}), CONTEXT)
        try:
            first = [
                _at(-30, object_name="plain"),
                _at(3600, object_name="ahead"),  # a node clock an hour ahead: stamped at receipt
                _at(-20, object_name="long", message="x" * 5000),  # truncated
                _at(-8 * 86400, object_name="both", message="y" * 5000),  # over max_age, and long
            ]
            outcomes = await sink.send(first)
            assert outcomes is None or {o.kind for o in outcomes} == {OutcomeKind.OK}
            assert sink.modified == {"time_adjusted": 2, "truncated": 2}
            assert _logged(caplog) == [
                f"loki: {loki.url} took 2 entries stamped otherwise than their own time (a node clock ahead "
                "of the API server's: at the API server's time of the occurrence; outside Loki's window or "
                "over max_behind behind their stream's newest: at the time the router received them; the "
                'line keeps it in "time" and says "time_adjusted": true) and 2 truncated (their message to '
                'max_line_bytes=2048: "truncated": true; or a structured metadata value to 1024 bytes, the '
                "line keeping it whole), since start"
            ]
            # Within the minute: counted, not logged again until then (or until the sink closes).
            await sink.send([_at(7200, object_name="ahead-2"), _at(-5, object_name="plain-2")])
            assert sink.modified == {"time_adjusted": 3, "truncated": 2}
            assert len(_logged(caplog)) == 1
        finally:
            await sink.aclose()
    assert len(loki.entries) == 6
    assert sum('"time_adjusted":true' in e.line for e in loki.entries) == 3
    assert sum('"truncated":true' in e.line for e in loki.entries) == 2
    assert _logged(caplog)[1].startswith(f"loki: {loki.url} took 1 entries stamped otherwise")
    assert " and 0 truncated (their message " in _logged(caplog)[1]
