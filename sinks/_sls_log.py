"""Encoding of one occurrence as an SLS ``Log`` (LogGroup.Logs = 1), the sls sink's hot path.

``log_contents`` + ``encode_log`` are the definition: the K8s event center's fields, then the record's
top-level fields flattened (see ``sls.py``). ``encode_occurrence`` gives the very same bytes for the
record layout ``normalise`` builds, with far less Python work per event:

* each key's bytes before a value (``Contents`` tag and length, ``Key`` field, ``Value`` tag and
  length) come from a table indexed by the value's length, computed once per key;
* fields with few distinct values (cluster, type, reason, namespace, component, host, ...) are cached
  as finished pairs per tuple of values, in runs of adjacent fields;
* the pairs between ``eventId`` and ``message`` and those after it are assembled as text, one char per
  byte (prefixes and cached pairs are their bytes decoded as latin-1), and encoded once each; the
  values put in as text must be ASCII, so that their length is their UTF-8 length (checked in O(1) on
  the whole text, which is ASCII in the usual case);
* ``eventId`` is the occurrence's raw JSON bytes as they are, not decoded and re-encoded, and the two
  big values (``eventId``, ``message``) are copied once, into the result.

Anything off that path (another layout, a value of an unexpected type, non-ASCII uid/name/time/
resource version, invalid UTF-8) returns None and the caller takes the definition's path, so
errors and output stay identical to it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import orjson

from eventrouter import BoundedCache, Occurrence
from eventrouter.protowire import bytes_field, varint

__all__ = ["encode_log", "encode_occurrence", "log_contents"]


def _flat_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return orjson.dumps(value).decode()


def log_contents(occ: Occurrence) -> list[tuple[str, str]]:
    """The log's key/value pairs: K8s event center fields, then the record's fields flattened."""
    rec = occ.record
    involved = rec.get("involved_object") or {}
    contents: list[tuple[str, str]] = [
        ("eventId", occ.raw_json.decode()),
        ("hostname", rec.get("source_host") or rec.get("reporting_instance") or ""),
        ("level", rec.get("type") or ""),
    ]
    if involved.get("kind") == "Pod":
        contents.append(("pod_id", involved.get("uid") or ""))
        contents.append(("pod_name", involved.get("name") or ""))
    for key, value in rec.items():
        if key == "involved_object" and isinstance(value, dict):
            for sub, sub_value in value.items():
                flat = _flat_value(sub_value)
                if flat is not None:
                    contents.append((f"involved_object_{sub}", flat))
            continue
        flat = _flat_value(value)
        if flat is not None:
            contents.append((key, flat))
    return contents


# -- Contents pair prefixes ---------------------------------------------------------------------------


class _Key:
    """One content key: its ``Key`` field and the bytes before a value of a given length."""

    __slots__ = ("field", "long", "short", "text")

    def __init__(self, key: str, table: int = 0) -> None:
        self.field = bytes_field(1, key.encode("utf-8"))
        # The fast path's keys table the lengths their values have in practice, as bytes and as text
        # (one char per byte); other lengths, and other keys, go through `long`.
        self.short = [self._prefix(n) for n in range(table)]
        self.text = [prefix.decode("latin-1") for prefix in self.short]
        self.long: BoundedCache[int, bytes] = BoundedCache(1024)

    def _prefix(self, n: int) -> bytes:
        value_len = varint(n)
        return b"".join(
            (b"\x12", varint(len(self.field) + 1 + len(value_len) + n), self.field, b"\x12", value_len)
        )

    def prefix(self, n: int) -> bytes:
        """Contents tag and length, Key field, Value tag and length, for a value of n bytes."""
        if n < len(self.short):
            return self.short[n]
        found = self.long.get(n)
        if found is None:
            found = self.long.put(n, self._prefix(n))
        return found

    def pair(self, data: bytes) -> bytes:
        return self.prefix(len(data)) + data


_KEYS: dict[str, _Key] = {}


def _key(name: str) -> _Key:
    key = _KEYS.get(name)
    if key is None:
        if len(_KEYS) >= 256:  # keys come from records: bound the table for odd layouts
            return _Key(name)
        key = _KEYS[name] = _Key(name)
    return key


def _tabled(name: str, table: int = 128) -> _Key:
    key = _KEYS[name] = _Key(name, table)
    return key


_NANOS = struct.Struct("<BI").pack  # Time_ns: field 4, fixed32


def encode_log(seconds: int, nanos: int, contents: Sequence[tuple[str, str]]) -> bytes:
    """One ``Log`` message (Time=1 uint32, Contents=2, Time_ns=4 fixed32), strict UTF-8."""
    parts = [b"\x08", varint(seconds)]
    append = parts.append
    for name, value in contents:
        data = value.encode("utf-8")
        append(_key(name).prefix(len(data)))
        append(data)
    append(_NANOS(0x25, nanos))
    return b"".join(parts)


# -- the fast path ------------------------------------------------------------------------------------

_RECORD = [
    "schema",
    "cluster",
    "uid",
    "name",
    "namespace",
    "occurrence",
    "count",
    "time",
    "time_source",
    "first_time",
    "last_time",
    "type",
    "reason",
    "message",
    "action",
    "involved_object",
    "reporting_component",
    "reporting_instance",
    "source_component",
    "source_host",
    "series",
    "resource_version",
    "labels",
    "annotations",
]
"""The record layout ``normalise`` builds, in order (the order is the order of the log's contents)."""
_INVOLVED = ["kind", "namespace", "name", "uid", "api_version", "field_path"]

_NAMES = 320  # Kubernetes names are at most 253 characters; events are named <object>.<16 hex>
_EVENT_ID = _tabled("eventId")
_EVENT_ID_S = _EVENT_ID.short
_EVENT_ID_L = _EVENT_ID.long
_MESSAGE = _tabled("message")
_MESSAGE_S = _MESSAGE.short
_MESSAGE_L = _MESSAGE.long
# Text prefixes, indexed directly by the value's length (an IndexError sends the occurrence down the
# definition's path).
_POD_ID = _tabled("pod_id").text
_POD_NAME = _tabled("pod_name", _NAMES).text
_UID = _tabled("uid").text
_NAME = _tabled("name", _NAMES).text
_TIME = _tabled("time").text
_FIRST_TIME = _tabled("first_time").text
_LAST_TIME = _tabled("last_time").text
_TIMES = list(zip(_TIME, _FIRST_TIME, _LAST_TIME, strict=True))  # time, first_time, last_time alike
_I_NAME = _tabled("involved_object_name", _NAMES).text
_I_UID = _tabled("involved_object_uid").text
_RESOURCE_VERSION = _tabled("resource_version").text
_NO_MAPS = (_key("labels").pair(b"{}") + _key("annotations").pair(b"{}")).decode("ascii")
_TIME_ADJUSTED = _key("time_adjusted").pair(b"true").decode("ascii")
_NUMBERS = 1024
# occurrence and count: the same number in normalise's records
_NUMBER = [
    (_key("occurrence").pair(str(n).encode()) + _key("count").pair(str(n).encode())).decode("ascii")
    for n in range(_NUMBERS)
]
_OUTER = [b"\x0a" + bytes((n,)) for n in range(128)]  # LogGroup.Logs tag and a one-byte length
_OUTER_LOW = [b"\x0a" + bytes((n | 0x80,)) for n in range(128)]  # ... and a longer one's first byte
_VARINT = [varint(n) for n in range(128)]
_SECONDS_LOW = [b"\x08" + bytes((n | 0x80,)) for n in range(128)]  # Time field: tag, first varint byte

_CACHE_MAX = 4096
# Finished pairs (as text, one char per byte) of the fields with few distinct values, per tuple of those
# values, in caches of values that vary together: per cluster and source; per reason; per namespace.
# Only tuples of exact str (and the schema int, type-checked before the lookup) are stored: a hit then
# implies the very same values, since no other type compares equal to a str (unlike True == 1 == 1.0,
# which flatten apart).
_SETTLED: BoundedCache[tuple[Any, ...], tuple[str, str, str, str]] = BoundedCache(_CACHE_MAX)
_REASONS: BoundedCache[tuple[Any, ...], tuple[str, str]] = BoundedCache(_CACHE_MAX)
_NAMESPACES: BoundedCache[tuple[Any, ...], tuple[str, str]] = BoundedCache(_CACHE_MAX)
_SECONDS_HIGH: BoundedCache[int, bytes] = BoundedCache(_CACHE_MAX)  # Time varint's high bytes, per 128 s
_IS_ASCII = str.isascii


def _pairs(names: tuple[str, ...], values: Sequence[Any]) -> str:
    """Pairs of record fields as the definition writes them (null left out), as text."""
    out = []
    for name, value in zip(names, values, strict=True):
        flat = _flat_value(value)
        if flat is not None:
            out.append(_key(name).pair(flat.encode("utf-8")))
    # latin-1: one char per byte, so that the text encodes back to these very bytes.
    return b"".join(out).decode("latin-1")


def _store(cache: BoundedCache[Any, Any], key: tuple[Any, ...], value: Any, strings: tuple[Any, ...]) -> None:
    if all(type(s) is str for s in strings):
        cache.put(key, value)


_TAIL = (
    "involved_object_api_version",
    "involved_object_field_path",
    "reporting_component",
    "reporting_instance",
    "source_component",
    "source_host",
    "series",
)


def _settled(key: tuple[Any, ...], series: Any) -> tuple[str, str, str, str]:
    (source_host, reporting_instance, type_, schema, cluster, time_source, api, path, component, source) = (
        key[:10]
    )
    found = (
        # hostname and level as the definition takes them (no flattening: a non-str fails here).
        (
            _key("hostname").pair((source_host or reporting_instance or "").encode("utf-8"))
            + _key("level").pair((type_ or "").encode("utf-8"))
        ).decode("latin-1"),
        _pairs(("schema", "cluster"), (schema, cluster)),
        _pairs(("time_source",), (time_source,)),
        _pairs(_TAIL, (api, path, component, reporting_instance, source, source_host, series)),
    )
    _store(_SETTLED, key, found, key[:3] + key[4:])
    return found


def _reasons(key: tuple[Any, ...]) -> tuple[str, str]:
    type_, reason, action, kind = key
    found = (
        _pairs(("type", "reason"), (type_, reason)),
        _pairs(("action", "involved_object_kind"), (action, kind)),
    )
    _store(_REASONS, key, found, key)
    return found


def _namespaces(key: tuple[Any, ...]) -> tuple[str, str]:
    found = _pairs(("namespace",), key[:1]), _pairs(("involved_object_namespace",), key[1:])
    _store(_NAMESPACES, key, found, key)
    return found


def _seconds_high(high: int) -> bytes:
    return _SECONDS_HIGH.put(high, varint(high))


def encode_occurrence(occ: Occurrence, seconds: int, nanos: int, adjusted: bool) -> bytes | None:
    """The LogGroup ``Logs`` field for ``occ`` — ``bytes_field(1, encode_log(seconds, nanos,
    log_contents(occ) [+ time_adjusted]))`` — or None when the definition's path must decide."""
    rec = occ.record
    if type(rec) is not dict or [*rec] != _RECORD:
        return None
    try:
        (
            schema,
            cluster,
            uid,
            name,
            namespace,
            occurrence,
            count,
            time,
            time_source,
            first_time,
            last_time,
            type_,
            reason,
            message,
            action,
            involved,
            reporting_component,
            reporting_instance,
            source_component,
            source_host,
            series,
            resource_version,
            labels,
            annotations,
        ) = rec.values()
        if (
            type(involved) is not dict
            or [*involved] != _INVOLVED
            or type(schema) is not int
            or type(occurrence) is not int
            or type(count) is not int
        ):
            return None
        i_kind, i_namespace, i_name, i_uid, i_api_version, i_field_path = involved.values()
        head, schema_cluster, time_source_s, tail = _SETTLED.get(
            key := (
                source_host,
                reporting_instance,
                type_,
                schema,
                cluster,
                time_source,
                i_api_version,
                i_field_path,
                reporting_component,
                source_component,
                "true" if series is True else "false" if series is False else None,
            )
        ) or _settled(key, series)
        type_reason, action_kind = _REASONS.get(four := (type_, reason, action, i_kind)) or _reasons(four)
        namespace_s, i_namespace_s = _NAMESPACES.get(two := (namespace, i_namespace)) or _namespaces(two)
        if first_time is time and last_time is time:  # normalise shares the text when they are equal
            time_p, first_time_p, last_time_p = _TIMES[len(time)]
        else:
            time_p = _TIME[len(time)]
            if first_time is None:  # left out
                first_time_p = first_time = ""
            else:
                first_time_p = _FIRST_TIME[len(first_time)]
            last_time_p = _LAST_TIME[len(last_time)]
        # Non-str values make join() or len() raise: the definition's path decides what they give.
        middle = "".join(
            (
                head,
                _POD_ID[len(i_uid)] + i_uid + _POD_NAME[len(i_name)] + i_name if i_kind == "Pod" else "",
                schema_cluster,
                _UID[len(uid)],
                uid,
                _NAME[len(name)],
                name,
                namespace_s,
                _NUMBER[occurrence]
                if count is occurrence and 0 <= occurrence < _NUMBERS
                else _pairs(("occurrence", "count"), (occurrence, count)),
                time_p,
                time,
                time_source_s,
                first_time_p,
                first_time,
                last_time_p,
                last_time,
                type_reason,
            )
        )
        end = "".join(
            (
                action_kind,
                i_namespace_s,
                _I_NAME[len(i_name)],
                i_name,
                _I_UID[len(i_uid)],
                i_uid,
                tail,
                _RESOURCE_VERSION[len(resource_version)],
                resource_version,
                _NO_MAPS
                if not labels and not annotations and type(labels) is dict is type(annotations)
                else _pairs(("labels", "annotations"), (labels, annotations)),
                _TIME_ADJUSTED if adjusted else "",
            )
        )
        if middle.isascii() and end.isascii():
            middle_b, end_b = middle.encode(), end.encode()
        elif all(map(_IS_ASCII, (uid, name, time, first_time, last_time, i_name, i_uid, resource_version))):
            # Cached pairs and prefixes are text of one char per byte (latin-1): exact as they are; the
            # values taken as text must be ASCII for their lengths and bytes to be right.
            middle_b, end_b = middle.encode("latin-1"), end.encode("latin-1")
        else:
            return None
        raw = occ.raw_json
        if not raw.isascii():
            raw.decode("utf-8")  # the definition decodes it: invalid UTF-8 must fail as it does there
        message_b = message.encode()
    except Exception:  # unusual input: the definition's path gives the outcome
        return None
    n = len(raw)
    raw_p = _EVENT_ID_S[n] if n < 128 else _EVENT_ID_L.get(n) or _EVENT_ID.prefix(n)
    m = len(message_b)
    message_p = _MESSAGE_S[m] if m < 128 else _MESSAGE_L.get(m) or _MESSAGE.prefix(m)
    if seconds >= 128:  # Time: tag and first varint byte, then the rest, the same for 128 s
        time_field = _SECONDS_LOW[seconds & 0x7F]
        time_rest = _SECONDS_HIGH.get(seconds >> 7) or _seconds_high(seconds >> 7)
    else:
        time_field, time_rest = b"\x08", varint(seconds)
    # The Logs field's length is summed, so that the big values are copied once, into the result.
    n += m + len(time_field) + len(time_rest) + len(raw_p) + len(middle) + len(message_p) + len(end) + 5
    return b"".join(
        (
            # LogGroup.Logs: tag and length (a varint written as its first byte and the rest)
            _OUTER[n] if n < 128 else _OUTER_LOW[n & 0x7F],
            b"" if n < 128 else _VARINT[h] if (h := n >> 7) < 128 else varint(h),
            time_field,
            time_rest,
            raw_p,
            raw,
            middle_b,
            message_p,
            message_b,
            end_b,
            _NANOS(0x25, nanos),
        )
    )
