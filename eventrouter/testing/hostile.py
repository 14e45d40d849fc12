"""Event objects the API server would store (valid name and namespace, anything else): for tests and
the fault suite that prove the router delivers or dead-letters each one, with a reason."""

from __future__ import annotations

import time
from typing import Any

from eventrouter.testing.factories import event_object

__all__ = ["MIB", "hostile_objects"]

MIB = 1024 * 1024


def _iso_from_now(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))


def hostile_objects() -> list[dict[str, Any]]:
    """Objects the API server stores (name and namespace are valid, the rest is anything): missing
    fields, wrong types, 1 MiB messages, label values that are not valid label names or values."""
    base = event_object
    weird_labels = {
        "app": 'a"b\\c\nd{}=,',
        "app.kubernetes.io/name": "with space/and.dots",
        "": "empty key",
        "x" * 300: "y" * 5000,
        "emoji": "🔥💥",
        "num": 5,
    }
    objs: list[dict[str, Any]] = [
        {"metadata": {"name": "bare", "namespace": "default"}},
        {"metadata": {"name": "no-times", "namespace": "default"}, "reason": "X", "involvedObject": {}},
        base(object_name="str-count", count=None) | {"count": "7"},
        base(object_name="neg-count") | {"count": -3},
        base(object_name="bool-count") | {"count": True},
        base(object_name="float-count") | {"count": 2.5},
        base(object_name="series-list") | {"series": [1, 2]},
        base(object_name="msg-int") | {"message": 12345},
        base(object_name="msg-obj") | {"message": {"nested": ["x"]}},
        base(object_name="involved-str") | {"involvedObject": "pod/web-0"},
        base(object_name="source-list") | {"source": ["kubelet"]},
        base(object_name="bad-times") | {"firstTimestamp": "yesterday", "lastTimestamp": 42, "eventTime": []},
        base(
            object_name="year-one",
            first_timestamp="0001-01-01T00:00:00Z",
            last_timestamp="0001-01-01T00:00:00Z",
        ),
        base(object_name="type-int") | {"type": 7},
        base(object_name="ascii-1mib", message="A" * MIB),
        base(object_name="cjk-1mib", message="事件" * (MIB // 6)),
        base(object_name="control-chars", message="nul\x00 bell\x07 esc\x1b[31m tab\t cr\r lf\n del\x7f"),
        base(object_name="weird-reason", reason='Bad Reason/With*Chars"{}\\', kind="Ünïcödé Kind"),
        # Times Loki refuses (outside now - 168 h ... now + 10 min): a node whose clock runs two hours
        # ahead, an event kept for eight days (--event-ttl), a year-9999 eventTime.
        base(object_name="clock-ahead", last_timestamp=_iso_from_now(2 * 3600)),
        base(object_name="week-old", first_timestamp=_iso_from_now(-8 * 86400)),
        base(object_name="year-9999", count=None, event_time="9999-12-31T23:59:59.000000Z"),
        # Before the Unix epoch: negative seconds; before 1678: beyond 64-bit nanoseconds.
        base(object_name="before-epoch", count=None, event_time="1969-12-31T23:59:58.500000Z"),
        base(object_name="year-1600", count=None, event_time="1600-01-01T00:00:00.000000Z"),
    ]
    labelled = base(object_name="weird-labels")
    labelled["metadata"]["labels"] = weird_labels
    labelled["metadata"]["annotations"] = {"big": "z" * 100_000, "k": None}
    objs.append(labelled)
    for i, o in enumerate(objs):
        o.setdefault("metadata", {}).setdefault("name", f"hostile-{i}")
        o["metadata"]["name"] = f"hostile-{i}-{o['metadata']['name']}"
        o["metadata"].setdefault("namespace", "default")
    return objs
