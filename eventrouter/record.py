"""The unit of delivery: one occurrence of a Kubernetes Event, and its normalised record.

An Event object folds repeats into one object (``count``, or ``series.count`` for the
events.k8s.io recorder). Each raise of that number is one *occurrence*; the pair
(event uid, occurrence number) identifies it across restarts, relists and replicas.

The normalised record is the stable JSON layout every sink stamps with (see docs/record.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from eventrouter.memory import BoundedCache

__all__ = [
    "SCHEMA_VERSION",
    "MalformedEvent",
    "Occurrence",
    "core_v1_event",
    "list_item",
    "normalise",
    "normalise_checked",
    "occurrence_number",
    "parse_time_ns",
]

SCHEMA_VERSION = 1

JSON = dict[str, Any]


def _fit(data: bytes) -> bytes:
    """A right-sized copy: orjson's output keeps its growth buffer (at least 4 KiB per object), which
    multiplies the memory of every occurrence waiting in a queue. ``tobytes``: the same copy, without
    ``bytes()``'s generic buffer path (~1,000 fewer instructions a call)."""
    return memoryview(data).tobytes()


class MalformedEvent(ValueError):
    """The object is not an Event the router can identify (no uid, wrong types)."""


def parse_time_ns(value: object) -> int | None:
    """RFC 3339 (Time or MicroTime) → epoch nanoseconds; None for null, empty or year-1 values."""
    if not value or not isinstance(value, str):
        return None
    text = value
    frac_ns = 0
    # Split the fraction ourselves: fromisoformat keeps only microseconds and 3.11 rejects >6 digits.
    dot = text.find(".")
    if dot != -1:
        end = dot + 1
        while end < len(text) and text[end] in _DIGITS:
            end += 1
        digits = text[dot + 1 : end]
        if digits:
            frac_ns = int(digits[:9].ljust(9, "0"))
        text = text[:dot] + text[end:]
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        utc = parsed.astimezone(UTC)  # "9999-12-31T23:59:59-01:00" is past year 9999 in UTC
    except OverflowError:
        return None
    if utc.year <= 1:
        return None
    return int(parsed.timestamp()) * 1_000_000_000 + frac_ns


_DIGITS = frozenset("0123456789")  # str.isdigit also takes "²", which int() refuses
_CACHE_MAX = 8192
_SECONDS: BoundedCache[str, int | None] = BoundedCache(_CACHE_MAX)  # "YYYY-MM-DDTHH:MM:SS" → epoch s
_TEXTS: BoundedCache[int, str] = BoundedCache(_CACHE_MAX)  # epoch seconds → "YYYY-MM-DDTHH:MM:SS"


def _parse_cached(value: object) -> int | None:
    """parse_time_ns, fast for the API server's own form ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``: events
    of one moment share the second, so only the fraction is parsed per event."""
    if type(value) is not str or len(value) < 20 or value[-1] != "Z" or value[10] != "T":
        return parse_time_ns(value) if value else None
    head = value[:19]
    seconds = _SECONDS.get(head, -1)
    if seconds == -1:
        if not (head[4] == head[7] == "-" and head[13] == head[16] == ":" and head.isascii()) or "." in head:
            return parse_time_ns(value)  # not the API server's form: no shortcut
        seconds = _SECONDS.put(head, _head_seconds(head))
    if seconds is None:
        return None
    if len(value) == 20:
        return seconds * 1_000_000_000
    digits = value[20:-1]
    if value[19] != "." or not (digits.isascii() and digits.isdigit()):
        return parse_time_ns(value)
    return seconds * 1_000_000_000 + int(digits[:9].ljust(9, "0"))


_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)


def _head_seconds(head: str) -> int | None:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) → epoch seconds, as parse_time_ns(head + "Z") // 10**9 but
    without its fraction and offset handling (a miss costs 0.4 µs instead of 1.2 µs).

    Also notes that second's text in ``_TEXTS``: the record formats the times it parses, and
    ``parsed.isoformat()`` is ``_second_text(seconds)`` (a naive datetime without microseconds)
    without its timedelta arithmetic."""
    try:
        parsed = datetime.fromisoformat(head)
    except ValueError:
        return None
    if parsed.year <= 1 or parsed.tzinfo is not None:
        return None
    seconds: int = (parsed - _EPOCH) // _SECOND
    if not parsed.microsecond and seconds not in _TEXTS:
        _TEXTS.put(seconds, parsed.isoformat())
    return seconds


def _second_text(seconds: int) -> str:
    """Epoch seconds → ``YYYY-MM-DDTHH:MM:SS`` (UTC; four-digit year, as RFC 3339 wants). isoformat:
    strftime costs twice as much and does not pad years before 1000."""
    return (_EPOCH + timedelta(seconds=seconds)).isoformat()


def _format_cached(ns: int) -> str:
    """format_time_ns with the per-second text cached."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = _TEXTS.get(seconds)
    if base is None:
        base = _TEXTS.put(seconds, _second_text(seconds))
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def format_time_ns(ns: int) -> str:
    """Epoch nanoseconds → RFC 3339 UTC, with a fraction only when there is one."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = _second_text(seconds)
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return None


# events.k8s.io/v1 (and v1beta1) field → core/v1 field, as the API server converts between them
# (kubernetes pkg/apis/events/v1/conversion.go). The other fields (series, eventTime, action,
# reason, type, reportingInstance, related) have the same names in both.
_EVENTS_API_NAMES = {
    "regarding": "involvedObject",
    "note": "message",
    "deprecatedCount": "count",
    "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp",
    "deprecatedLastTimestamp": "lastTimestamp",
    "reportingController": "reportingComponent",
}


def core_v1_event(obj: Any, api_version: object = None) -> Any:
    """An events.k8s.io Event (a recording of ``/apis/events.k8s.io/v1/events``) with core/v1's field
    names, which ``normalise`` reads; any other value as it is. ``api_version``: the enclosing List's,
    for items that do not carry their own (the API server's list responses)."""
    if type(obj) is not dict:
        return obj
    version = obj.get("apiVersion", api_version)
    if isinstance(version, str) and version.startswith("events.k8s.io/"):
        pass
    elif version is not None or "involvedObject" in obj or not obj.keys() & _EVENTS_API_NAMES.keys():
        return obj  # core/v1, or not an Event; without an apiVersion, told by its field names
    # Read as core/v1, its `note` and `regarding` were an empty message and involved object, and
    # `deprecatedCount` raises were not occurrences.
    converted = {_EVENTS_API_NAMES.get(k, k): v for k, v in obj.items()}
    converted["apiVersion"] = "v1"
    return converted


def list_item(item: Any, listing: JSON, api_version: str | None = None) -> Any:
    """An item of a List (an API list response, ``listing``) as a watch sends the same object.

    kube-apiserver writes ``kind`` and ``apiVersion`` on each watch object but once on the List, not
    on its items: the record's ``raw`` of one object at one resourceVersion differed between the watch
    and a relist, and Loki kept both copies of an occurrence a relist delivered again. Given the List's
    (``api_version`` when it has none), first as on the watch, so the bytes are the same; the kind is
    the List's item kind (``EventList`` → ``Event``). An item with both, or any other value, is left
    as it is; so are the items of a List without an apiVersion (not the API server's)."""
    if type(item) is not dict or ("kind" in item and "apiVersion" in item):
        return item
    version = listing.get("apiVersion")
    if type(version) is not str or not version:
        version = api_version
        if version is None:
            return item
    list_kind = listing.get("kind")
    kind = (
        list_kind[:-4]
        if type(list_kind) is str and len(list_kind) > 4 and list_kind.endswith("List")
        else "Event"
    )
    return {"kind": kind, "apiVersion": version, **item}


def occurrence_number(obj: JSON) -> int:
    """``series.count`` → ``count`` → 1."""
    series = obj.get("series")
    # `type(n) is int` first: the JSON parser's ints skip the call; _int judges the rest (bool is no number).
    if isinstance(series, dict):
        n: int | None = series.get("count")
        if type(n) is not int:
            n = _int(n)
        if n is not None and n > 0:
            return n
    n = obj.get("count")
    if type(n) is not int:
        n = _int(n)
    if n is not None and n > 0:
        return n
    return 1


_TIME_CHAIN = (
    ("series", "lastObservedTime"),
    (None, "lastTimestamp"),
    (None, "eventTime"),
    (None, "firstTimestamp"),
    ("metadata", "creationTimestamp"),
)


def event_time_ns(obj: JSON) -> int | None:
    """The normalised time: series.lastObservedTime → lastTimestamp → eventTime → firstTimestamp →
    metadata.creationTimestamp. Never "now", never year 1."""
    for parent, key in _TIME_CHAIN:
        holder = obj.get(parent) if parent else obj
        if type(holder) is dict:
            ns = _parse_cached(holder.get(key))
            if ns is not None:
                return ns
    return None


_TIMES: BoundedCache[str, tuple[int, str] | None] = BoundedCache(_CACHE_MAX)  # value → (ns, text)
_MISS = object()


def _time(value: object) -> tuple[int, str] | None:
    """(epoch ns, RFC 3339 text as the record writes it) of a Time or MicroTime value, or None.

    Whole-second values (``lastTimestamp``, ``firstTimestamp``) repeat across events and within one
    event: they are looked up whole. MicroTimes are parsed; the API server's own form is already
    canonical, so its text is reused instead of formatted again."""
    if type(value) is not str:
        return None
    size = len(value)
    if size == 27 and value[26] == "Z" and value[19] == "." and value[25] != "0":
        # The API server's MicroTime of a second seen before: what the general path below returns,
        # without its repeated checks (a second is in _SECONDS only once its form was checked).
        head = value[:19]
        seconds = _SECONDS.get(head)
        if seconds is not None:
            digits = value[20:26]
            if digits.isdigit() and digits.isascii() and _TEXTS.get(seconds) == head:
                return (seconds * 1_000_000_000 + int(digits) * 1000, value)
    elif size == 20:  # only whole-second values are kept whole
        hit = _TIMES.get(value, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
    elif not size:
        return None
    ns = _parse_cached(value)
    if ns is None:
        result = None
    elif (
        len(value) == 27
        and value[19] == "."
        and value[25] != "0"
        and value[26] == "Z"
        and value[20:26].isdigit()
        and value.isascii()
        and _TEXTS.get(ns // 1_000_000_000) == value[:19]
    ):
        result = (ns, value)  # YYYY-MM-DDTHH:MM:SS.ffffffZ, the API server's MicroTime
    else:
        result = (ns, _format_cached(ns))
    if size == 20:
        _TIMES.put(value, result)
    return result


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}


@dataclass(slots=True, eq=False)
class Occurrence:
    """One occurrence of an Event, as handed to every sink.

    ``record`` is the normalised record (JSON-ready, shared by all sinks: do not mutate it).
    ``raw`` is the Event object exactly as the API server sent it.
    """

    uid: str
    number: int
    time_ns: int
    record: JSON
    raw_json: bytes
    """The Event object as compact JSON (without ``metadata.managedFields``), as the API server sent it.
    Kept as bytes: a parsed object costs several times the memory while the occurrence waits in queues."""
    received_at: float = field(default_factory=time.time)
    _json: bytes | None = None

    @property
    def raw(self) -> JSON:
        """The Event object (parsed on each access; sinks that need it once per send should keep it)."""
        obj: JSON = orjson.loads(self.raw_json)
        return obj

    @property
    def key(self) -> str:
        """Stable identity across restarts and replicas: ``<uid>/<occurrence>``."""
        return f"{self.uid}/{self.number}"

    @property
    def json(self) -> bytes:
        """The record encoded once as compact JSON and shared by every sink."""
        if self._json is None:
            self._json = _fit(orjson.dumps(self.record))
        return self._json

    def to_dict(self, *, include_raw: bool = False) -> JSON:
        if include_raw:
            return {**self.record, "raw": self.raw}
        return self.record

    def encode(self, *, include_raw: bool = False) -> bytes:
        if include_raw:
            # Splice the raw bytes in instead of parsing and re-encoding them.
            return self.json[:-1] + b',"raw":' + self.raw_json + b"}"
        return self.json

    @property
    def size(self) -> int:
        """Approximate encoded size in bytes, used by the batcher's byte bound."""
        encoded = self._json  # read directly once encoded: asked per offer and per batch
        return len(encoded if encoded is not None else self.json)


def normalise(
    obj: JSON,
    *,
    cluster: str = "",
    received_at: float | None = None,
    raw_json: bytes | None = None,
    owned: bool = False,
    number: int | None = None,
) -> Occurrence:
    """Build the occurrence for a core/v1 Event object. Raises MalformedEvent for unusable input.

    ``raw_json`` may pass the object's JSON when the caller has it; it must not hold managedFields.
    ``owned``: the caller hands the object over (the watcher's freshly parsed objects), so
    ``metadata.managedFields`` is removed in place instead of copying the object without it.
    ``number``: the occurrence number when the caller already has it (``occurrence_number(obj)``)."""
    if type(obj) is not dict:
        raise MalformedEvent(f"event is {type(obj).__name__}, not an object")
    meta = obj.get("metadata")
    if type(meta) is not dict:
        raise MalformedEvent("event has no metadata")
    uid = meta.get("uid")
    if type(uid) is not str or not uid:
        raise MalformedEvent(f"event {meta.get('namespace')}/{meta.get('name')} has no metadata.uid")
    return normalise_checked(obj, meta, uid, cluster, received_at, raw_json, owned, number)


def normalise_checked(
    obj: JSON,
    meta: JSON,
    uid: str,
    cluster: str,
    received_at: float | None,
    raw_json: bytes | None,
    owned: bool,
    number: int | None,
) -> Occurrence:
    """``normalise`` for an object its caller has checked: a dict whose ``metadata`` is a dict with a
    non-empty str ``uid``, passed as ``meta`` and ``uid`` (``OccurrenceTracker.observe`` checks them
    itself; checking twice cost per event). Anything else must go through ``normalise``."""
    if number is None:
        number = occurrence_number(obj)
    get = obj.get
    # The time chain of event_time_ns, through the (ns, text) cache: the record needs both.
    series = get("series")
    event_time: tuple[int, str] | None = None
    event_time_read = False  # event_time holds _time(eventTime): `first` below reads it too
    t = _time(series.get("lastObservedTime")) if type(series) is dict else None
    if t is None:
        t = _time(get("lastTimestamp"))
        if t is None:
            event_time = _time(get("eventTime"))
            event_time_read = True
            t = event_time or _time(get("firstTimestamp")) or _time(meta.get("creationTimestamp"))
    if t is None:
        # Nothing in the chain parsed: the object is not a real Event. Use receipt time but say so.
        time_ns = int((received_at or time.time()) * 1e9)
        when = _format_cached(time_ns)
        time_source = "received"
    else:
        time_ns, when = t
        time_source = "event"
    first = _time(get("firstTimestamp"))
    if not first or not first[0]:
        first = event_time if event_time_read else _time(get("eventTime"))
    involved = get("involvedObject")
    if type(involved) is not dict:
        involved = {}
    source = get("source")
    if type(source) is not dict:
        source = {}
    message = get("message")
    if type(message) is not str:
        message = "" if message is None else str(message)
    # Inline `x if type(x) is str else ""` rather than a helper: ~20 calls per event on the hot path.
    component = source.get("component")
    component = component if type(component) is str else ""
    host = source.get("host")
    host = host if type(host) is str else ""
    labels = meta.get("labels")
    annotations = meta.get("annotations")
    name, namespace, rv = meta.get("name"), meta.get("namespace"), meta.get("resourceVersion")
    kind_, reason, action = get("type"), get("reason"), get("action")
    rep_c, rep_i = get("reportingComponent"), get("reportingInstance")
    i_kind, i_ns, i_name = involved.get("kind"), involved.get("namespace"), involved.get("name")
    i_uid, i_api, i_path = involved.get("uid"), involved.get("apiVersion"), involved.get("fieldPath")
    record: JSON = {
        "schema": SCHEMA_VERSION,
        "cluster": cluster,
        "uid": uid,
        "name": name if type(name) is str else "",
        "namespace": namespace if type(namespace) is str else "",
        "occurrence": number,
        "count": number,
        "time": when,
        "time_source": time_source,
        "first_time": first[1] if first and first[0] else None,
        "last_time": when,
        "type": kind_ if type(kind_) is str and kind_ else "Normal",
        "reason": reason if type(reason) is str else "",
        "message": message,
        "action": action if type(action) is str else "",
        "involved_object": {
            "kind": i_kind if type(i_kind) is str else "",
            "namespace": i_ns if type(i_ns) is str else "",
            "name": i_name if type(i_name) is str else "",
            "uid": i_uid if type(i_uid) is str else "",
            "api_version": i_api if type(i_api) is str else "",
            "field_path": i_path if type(i_path) is str else "",
        },
        "reporting_component": rep_c if type(rep_c) is str and rep_c else component,
        "reporting_instance": rep_i if type(rep_i) is str and rep_i else host,
        "source_component": component,
        "source_host": host,
        "series": bool(series) and type(series) is dict,
        "resource_version": rv if type(rv) is str else "",
        "labels": _str_map(labels) if labels else {},
        "annotations": _str_map(annotations) if annotations else {},
    }
    if raw_json is None:
        raw_json = _raw_json(obj, meta, owned)
    # Positional, in field order: a class called with keywords gets them as a dict (~1 µs more here).
    return Occurrence(
        uid, number, time_ns, record, raw_json, received_at if received_at is not None else time.time()
    )


def _raw_json(obj: JSON, meta: JSON, owned: bool) -> bytes:
    """The object as compact JSON without managedFields (server bookkeeping, often larger than the
    event itself; kubectl hides it too)."""
    if "managedFields" in meta:
        if owned:
            del meta["managedFields"]
        else:
            obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    try:
        return _fit(orjson.dumps(obj))
    except orjson.JSONEncodeError:
        # Lone surrogates (from \ud800-style escapes) are not UTF-8; keep them as JSON escapes.
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()
