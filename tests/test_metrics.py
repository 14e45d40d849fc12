"""Metric helpers: batched histogram observations equal one observation per value."""

from __future__ import annotations

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
