"""Metric helpers: batched histogram observations equal one observation per value."""

from __future__ import annotations

import json
import logging
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from eventrouter.metrics import observe_many


def _exposition(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_observe_many_equals_observing_each_value() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    buckets = (0.05, 0.1, 1, 5)
    h_one = Histogram("lag", "lag", ["sink"], buckets=buckets, registry=one)
    h_many = Histogram("lag", "lag", ["sink"], buckets=buckets, registry=many)
    rng = random.Random(3)
    # Values on every bound (le is inclusive), below the first, past the last, and in between.
    values = [0.0, 0.05, 0.1, 1.0, 5.0, 5.001, 1e9] + [rng.randrange(0, 8000) / 1000 for _ in range(2000)]
    for value in values:
        h_one.labels("a").observe(value)
    observe_many(h_many.labels("a"), values[:1000])
    observe_many(h_many.labels("a"), values[1000:])
    observe_many(h_many.labels("a"), [])
    # Buckets and count exactly; the sum up to float rounding (it is added in another order).
    exact = [line for line in _exposition(one) if "_sum" not in line]
    assert exact == [line for line in _exposition(many) if "_sum" not in line]
    assert h_many.labels("a")._sum.get() == pytest.approx(h_one.labels("a")._sum.get(), rel=1e-12)


def test_the_zero_initialised_reasons_are_every_reason_the_code_counts() -> None:
    """A reason counted in the code but missing from its list would appear only at its first
    increment, which an increase() alert never sees."""
    import re
    from pathlib import Path

    from eventrouter import metrics as m

    lists = {
        "dropped": m.SINK_DROP_REASONS,
        "dead_lettered": m.DEAD_LETTER_REASONS,
        "send_errors": m.SEND_ERROR_KINDS,
        "source_dropped": m.SOURCE_DROP_REASONS,
        "source_repaired": m.SOURCE_REPAIR_REASONS,
        "watch_restarts": m.WATCH_RESTART_REASONS,
        "relists": m.RELIST_REASONS,
    }
    root = Path(m.__file__).parent
    code = "\n".join(p.read_text(encoding="utf-8") for p in root.rglob("*.py") if "testing" not in p.parts)
    found: dict[str, set[str]] = {name: set() for name in lists}
    for name, literal in re.findall(r"\.(\w+)\.labels\((?:[\w.]+, )?\"(\w+)\"\)", code):
        if name in found:
            found[name].add(literal)
    for name, reasons in lists.items():
        assert found[name] <= set(reasons), (name, found[name] - set(reasons))
    assert found["dropped"] == set(m.SINK_DROP_REASONS)  # the pattern does find them
    # relist reasons are passed in a variable: its values are the list's.
    assert set(re.findall(r'relist_reason = "(\w+)"', code)) | set(
        re.findall(r'relist_reason = None, "(\w+)"', code)
    ) == set(m.RELIST_REASONS)


def test_a_sink_and_the_source_export_every_reason_at_zero() -> None:
    from eventrouter.metrics import Metrics

    metrics = Metrics()
    metrics.sink_children("s")
    text = generate_latest(metrics.registry).decode()
    for reason in ("queue_full", "spool_full", "spool_error", "shutdown"):
        assert f'eventrouter_sink_dropped_total{{reason="{reason}",sink="s"}} 0.0' in text
    for kind in ("retryable", "timeout", "exception", "contract", "start"):
        assert f'eventrouter_sink_send_errors_total{{kind="{kind}",sink="s"}} 0.0' in text
    for reason in ("timeout", "expired", "connection", "error"):
        assert f'eventrouter_watch_restarts_total{{reason="{reason}"}} 0.0' in text


def test_a_json_log_line_with_text_that_was_not_utf8_is_written_escaped() -> None:
    """A path that was not UTF-8 (decoded with surrogateescape) made orjson refuse the record and
    the whole line was lost ("--- Logging error ---")."""
    from eventrouter.logs import JsonFormatter

    record = logging.LogRecord(
        "eventrouter", logging.ERROR, __file__, 1, "cannot open %s", ("out\udcff.jsonl",), None
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "cannot open out\\udcff.jsonl" and line["level"] == "error"
