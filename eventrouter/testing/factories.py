"""Event objects as the API server writes them, and the recorded traffic from a real 1.24 cluster."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson

from eventrouter.record import Occurrence, normalise
from eventrouter.source.tracker import OccurrenceTracker

__all__ = ["event_object", "make_occurrence", "recorded_list", "recorded_occurrences", "recorded_watch"]

_seq = itertools.count(1)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_object(
    *,
    namespace: str = "default",
    name: str | None = None,
    uid: str | None = None,
    kind: str = "Pod",
    object_name: str = "web-0",
    reason: str = "BackOff",
    message: str = "Back-off restarting failed container",
    type: str = "Warning",
    count: int | None = 1,
    series_count: int | None = None,
    first_timestamp: str | None = None,
    last_timestamp: str | None = None,
    event_time: str | None = None,
    component: str = "kubelet",
    host: str = "node-1",
    resource_version: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """A core/v1 Event. Core-recorder style by default (count + first/lastTimestamp); pass
    ``count=None, event_time=...`` for the events.k8s.io style (timestamps null)."""
    n = next(_seq)
    now = _now()
    if count is not None and first_timestamp is None and event_time is None:
        first_timestamp = now
    if count is not None and last_timestamp is None and event_time is None:
        last_timestamp = first_timestamp
    obj: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": {
            "name": name or f"{object_name}.{n:016x}",
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "resourceVersion": resource_version,
            "creationTimestamp": first_timestamp or now,
        },
        "involvedObject": {
            "kind": kind,
            "namespace": namespace,
            "name": object_name,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{namespace}/{kind}/{object_name}")),
            "apiVersion": "v1",
        },
        "reason": reason,
        "message": message,
        "source": {"component": component, "host": host} if count is not None else {},
        "firstTimestamp": first_timestamp,
        "lastTimestamp": last_timestamp,
        "type": type,
        "eventTime": event_time,
        "reportingComponent": component if count is None else "",
        "reportingInstance": host if count is None else "",
    }
    if count is not None:
        obj["count"] = count
    if series_count is not None:
        obj["series"] = {"count": series_count, "lastObservedTime": event_time or now}
    obj.update(extra)
    return obj


def make_occurrence(cluster: str = "test", **kwargs: Any) -> Occurrence:
    return normalise(event_object(**kwargs), cluster=cluster)


def _data(name: str) -> bytes:
    return resources.files("eventrouter.testing").joinpath("data", name).read_bytes()


def recorded_watch(api: str = "core-v1") -> list[dict[str, Any]]:
    """The watch stream recorded from a real Kubernetes 1.24 cluster: 93 events, 126 occurrences.

    ``api`` is ``core-v1`` (``/api/v1/events``) or ``events-v1`` (``/apis/events.k8s.io/v1``)."""
    return [orjson.loads(line) for line in _data(f"watch-{api}.jsonl").splitlines() if line.strip()]


def recorded_occurrences(cluster: str = "rec") -> list[Occurrence]:
    """The recorded core/v1 watch's 126 occurrences, as the source makes them (ADDED and MODIFIED)."""
    tracker = OccurrenceTracker(cluster=cluster)
    occs = []
    for watch in recorded_watch():
        if watch["type"] in ("ADDED", "MODIFIED") and (occ := tracker.observe(watch["object"])) is not None:
            occs.append(occ)
    return occs


def recorded_list() -> dict[str, Any]:
    """``kubectl get events -A -o json`` at the end of the recording (92 events)."""
    result: dict[str, Any] = orjson.loads(_data("list-core-v1.json"))
    return result
