"""A Loki-compatible push receiver for tests: validates a push the way Loki 3.x does.

What it checks, and the message it answers with, follows Loki's own code (see
docs/reference sink-protocols.md §1): ``pkg/loghttp/push/push.go`` (Content-Encoding, Content-Type,
JSON or snappy-block protobuf, label parsing), ``pkg/distributor/validator.go`` and
``pkg/validation/validate.go`` (per-stream and per-entry limits), the ingester's "too far behind" check,
and ``X-Scope-OrgID`` tenancy. A 400 may be *partial*: valid entries of the request are stored and the
body lists the errors, exactly like Loki. Entries are stored as pushed; queries de-duplicate identical
(timestamp, labels, line) as Loki does, so a retried push is visible once.

Usage::

    async with LokiReceiver() as loki:
        ... push to loki.url ...
        streams = loki.query_range('{namespace="shop"}')

Fault injection: ``loki.fail_next(429, count=2, retry_after=3)`` answers the next pushes with that
status before looking at them; ``store=True`` stores the push first and then fails (a response lost
after a successful write, the case de-duplication is for); ``echo=True`` appends what the push carried
(method, path and query, headers but the plain HTTP ones), as gateways in front of Loki do that quote
the credential they refused; ``page=N`` has a front answer instead with a web page of N bytes
(streamed; ``ready_page`` does so for ``/ready``), and ``pages`` records how much of it the client took.
``unreadable_next(n, how)`` sends the next ``n`` answers to pushes, whatever they say (a fault's, or
Loki's own after it stored the push), with a body the client cannot read: ``"stall"`` (the head, then
none of the body until the receiver closes), ``"cut"`` (the head, then the connection dropped) or
``"gzip"`` (a plain body labelled ``Content-Encoding: gzip``), as a proxy or gateway in front of Loki
may (``answer_unreadable``; Loki's own 204 has no body to lose); ``ready=True`` does so for ``/ready``'s.
``late_next(n, after)`` sends the next ``n`` answers to pushes with their body ``after`` seconds after
their head (``answer_late``: a slow front, or a loaded Loki). ``charset_next(n, charset)`` labels the
next ``n`` answers to pushes (``ready=True``: to ``/ready``) ``charset=<charset>``, such as ``base64``
(``mislabelled``: a front's label, the body unchanged).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hmac
import json
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import cramjam
from aiohttp import web

from eventrouter.protowire import DecodeError, decode_fields
from eventrouter.testing.receivers.front_page import FrontPage, answer_page
from eventrouter.testing.receivers.unreadable import Unreadable, answer_late, answer_unreadable, mislabelled

__all__ = [
    "KEEP_OLD_SAMPLES",
    "LokiReceiver",
    "Push",
    "StoredEntry",
    "Stream",
    "format_labels",
    "parse_labels",
]

KEEP_OLD_SAMPLES = 100 * 365 * 86400.0
"""A reject_old_samples_max_age (seconds) that takes recorded traffic whenever a test runs; give the sink
the same ``max_age``, or it stamps such old entries at their receipt (``clamp_time``)."""

_NS = 1_000_000_000
_MIN_SECONDS = -62135596800  # 0001-01-01, the bound gogo's stdtime conversion enforces
_MAX_SECONDS = 253402300800  # 10000-01-01
# Loki 3.x default for discover_service_name: the first of these labels that is set names the service.
_SERVICE_NAME_LABELS = (
    "service",
    "app",
    "application",
    "app_name",
    "name",
    "app_kubernetes_io_name",
    "container",
    "container_name",
    "k8s_container_name",
    "component",
    "workload",
    "job",
    "k8s_job_name",
)
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class LabelParseError(ValueError):
    pass


class _BadRequest(Exception):
    """The whole request is refused (nothing stored), like a parse error in Loki."""


@dataclass(frozen=True, slots=True)
class StoredEntry:
    tenant: str
    labels: tuple[tuple[str, str], ...]
    ts_ns: int
    line: str
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(slots=True)
class Stream:
    """One stream of a query result: its labels and its entries (ts_ns, line, structured metadata)."""

    labels: dict[str, str]
    values: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Push:
    """What one push request looked like and what the receiver answered."""

    headers: dict[str, str]
    content_type: str
    content_encoding: str
    body_size: int
    status: int
    message: str
    accepted: int
    """Entries stored from this push (0 when refused; > 0 with status 400 means partial)."""


@dataclass(slots=True)
class _Fault:
    status: int
    message: str
    retry_after: str | None
    store: bool
    echo: bool = False
    page: int = 0


def _echo(request: web.Request) -> str:
    plain = {"host", "accept", "accept-encoding", "content-type", "content-length"}
    sent = "; ".join(f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in plain)
    return f" refused {request.method} {request.path_qs} with {sent}"


# ---------------------------------------------------------------------------------------------
# Labels: Loki parses a stream's label string with the PromQL metric parser.


def _quote(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def format_labels(labels: Iterable[tuple[str, str]]) -> str:
    """Prometheus ``labels.String()``: ``{a="b", c="d"}``."""
    return "{" + ", ".join(f"{k}={_quote(v)}" for k, v in labels) + "}"


# The same few label sets arrive in every push: parse and print each once (a Go Loki is fast enough
# not to matter; this Python receiver shares a core with the router in the benches).
@functools.lru_cache(maxsize=8192)
def _parse_labels_once(text: str) -> tuple[tuple[str, str], ...]:
    return parse_labels(text)


@functools.lru_cache(maxsize=8192)
def _format_labels_once(labels: tuple[tuple[str, str], ...]) -> str:
    return format_labels(labels)


_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _read_string(text: str, pos: int, *, promql: bool = True) -> tuple[str, int]:
    """A quoted string at ``text[pos]``. ``promql``: by the rules of Prometheus' PromQL lexer, which
    Loki parses every pushed stream's labels with (promql/parser/lex.go): ``lexString`` and
    ``lexRawString`` refuse ``utf8.RuneError``, which ``next()`` (utf8.DecodeRuneInString) returns for
    a literal U+FFFD as for an invalid byte (both arrive here as U+FFFD), and ``lexEscape`` refuses an
    escaped surrogate; ``\\ufffd`` is taken. Loki's LogQL query lexer (text/scanner) takes both."""
    quote = text[pos]
    pos += 1
    if quote == "`":
        end = text.find("`", pos)
        if end == -1:
            raise LabelParseError(f"1:{pos}: parse error: unterminated raw string")
        bad = text.find("\ufffd", pos, end) if promql else -1
        if bad != -1:
            raise LabelParseError(f"1:{bad + 1}: parse error: invalid UTF-8 rune")
        return text[pos:end], end + 1
    out: list[str] = []
    while True:
        if pos >= len(text) or text[pos] == "\n":
            raise LabelParseError(f"1:{pos + 1}: parse error: unterminated quoted string")
        ch = text[pos]
        if ch == quote:
            return "".join(out), pos + 1
        if ch == "\ufffd" and promql:
            raise LabelParseError(f"1:{pos + 1}: parse error: invalid UTF-8 rune")
        if ch != "\\":
            out.append(ch)
            pos += 1
            continue
        pos += 1
        if pos >= len(text):
            raise LabelParseError(f"1:{pos + 1}: parse error: escape sequence not terminated")
        esc = text[pos]
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
            pos += 1
        elif esc == quote:
            out.append(quote)
            pos += 1
        elif esc in "xuU01234567":
            width, base, start = {"x": (2, 16, 1), "u": (4, 16, 1), "U": (8, 16, 1)}.get(esc, (3, 8, 0))
            digits = text[pos + start : pos + start + width]
            try:
                if len(digits) != width:
                    raise ValueError
                code = int(digits, base)
                out.append(chr(code))
            except ValueError:
                raise LabelParseError(
                    f"1:{pos + 1}: parse error: invalid escape sequence in string"
                ) from None
            if (esc not in "uU" and code > 255) or (promql and 0xD800 <= code < 0xE000):
                raise LabelParseError(
                    f"1:{pos + 1}: parse error: escape sequence is an invalid Unicode code point"
                )
            pos += start + width
        else:
            raise LabelParseError(f"1:{pos + 1}: parse error: unknown escape sequence {esc!r}")


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """Parse ``{k="v", ...}`` like Loki's ``syntax.ParseLabels``; sorted, empty values dropped."""
    pos = 0
    n = len(text)

    def skip_ws() -> None:
        nonlocal pos
        while pos < n and text[pos] in " \t\r\n":
            pos += 1

    skip_ws()
    if pos >= n or text[pos] != "{":
        found = repr(text[pos]) if pos < n else "EOF"
        raise LabelParseError(f"1:{pos + 1}: parse error: unexpected {found}, expected label set")
    pos += 1
    pairs: list[tuple[str, str]] = []
    while True:
        skip_ws()
        if pos < n and text[pos] == "}":
            pos += 1
            break
        match = _LABEL_NAME.match(text, pos)
        if not match:
            found = repr(text[pos]) if pos < n else "EOF"
            raise LabelParseError(f"1:{pos + 1}: parse error: unexpected character inside braces: {found}")
        name = match.group()
        pos = match.end()
        skip_ws()
        if pos >= n or text[pos] != "=" or text[pos : pos + 2] == "=~":
            found = repr(text[pos]) if pos < n else "EOF"
            raise LabelParseError(
                f"1:{pos + 1}: parse error: unexpected {found} in label matching, expected '='"
            )
        pos += 1
        skip_ws()
        if pos >= n or text[pos] not in "\"'`":
            found = repr(text[pos]) if pos < n else "EOF"
            raise LabelParseError(f"1:{pos + 1}: parse error: unexpected {found}, expected string")
        value, pos = _read_string(text, pos)
        pairs.append((name, value))
        skip_ws()
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "}":
            pos += 1
            break
        found = repr(text[pos]) if pos < n else "EOF"
        raise LabelParseError(
            f"1:{pos + 1}: parse error: unexpected {found} in label set, expected ',' or '}}'"
        )
    skip_ws()
    if pos != n:
        raise LabelParseError(f"1:{pos + 1}: parse error: unexpected {text[pos]!r} after label set")
    # Prometheus' labels.Builder drops empty values; sort so equal sets compare equal.
    return tuple(sorted((k, v) for k, v in pairs if v != ""))


# ---------------------------------------------------------------------------------------------
# Body decoding


@dataclass(slots=True)
class _InEntry:
    ts_ns: int
    line: str
    metadata: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _InStream:
    labels: tuple[tuple[str, str], ...]
    entries: list[_InEntry]


def _utf8(data: bytes) -> str:
    # gogoproto does not validate UTF-8 in string fields; Go strings then print invalid bytes as U+FFFD.
    return data.decode("utf-8", errors="replace")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _decode_timestamp(data: bytes) -> int:
    seconds = 0
    nanos = 0
    for number, wire, value in decode_fields(data):
        if number in (1, 2) and wire != 0:
            raise DecodeError(
                f"proto: wrong wireType = {wire} for field {'Seconds' if number == 1 else 'Nanos'}"
            )
        if number == 1:
            assert isinstance(value, int)
            seconds = _signed64(value)
        elif number == 2:
            assert isinstance(value, int)
            nanos = _signed64(value)
    if seconds < _MIN_SECONDS:
        raise DecodeError(f"timestamp: seconds:{seconds} nanos:{nanos} before 0001-01-01")
    if seconds >= _MAX_SECONDS:
        raise DecodeError(f"timestamp: seconds:{seconds} nanos:{nanos} after 10000-01-01")
    if not 0 <= nanos < _NS:
        raise DecodeError(f"timestamp: seconds:{seconds} nanos:{nanos}: nanos not in range [0, 1e9)")
    return seconds * _NS + nanos


def _len_field(wire: int, value: int | bytes, name: str) -> bytes:
    if wire != 2 or not isinstance(value, bytes):
        raise DecodeError(f"proto: wrong wireType = {wire} for field {name}")
    return value


def _decode_protobuf(data: bytes) -> list[tuple[str, list[_InEntry]]]:
    streams: list[tuple[str, list[_InEntry]]] = []
    for number, wire, value in decode_fields(data):
        if number != 1:
            continue
        labels = ""
        entries: list[_InEntry] = []
        for s_num, s_wire, s_val in decode_fields(_len_field(wire, value, "Streams")):
            if s_num == 1:
                labels = _utf8(_len_field(s_wire, s_val, "Labels"))
            elif s_num == 2:
                ts = 0
                line = ""
                metadata: list[tuple[str, str]] = []
                for e_num, e_wire, e_val in decode_fields(_len_field(s_wire, s_val, "Entries")):
                    if e_num == 1:
                        ts = _decode_timestamp(_len_field(e_wire, e_val, "Timestamp"))
                    elif e_num == 2:
                        line = _utf8(_len_field(e_wire, e_val, "Line"))
                    elif e_num == 3:
                        name = ""
                        val = ""
                        for p_num, p_wire, p_val in decode_fields(
                            _len_field(e_wire, e_val, "StructuredMetadata")
                        ):
                            if p_num == 1:
                                name = _utf8(_len_field(p_wire, p_val, "Name"))
                            elif p_num == 2:
                                val = _utf8(_len_field(p_wire, p_val, "Value"))
                        metadata.append((name, val))
                entries.append(_InEntry(ts, line, tuple(metadata)))
        streams.append((labels, entries))
    return streams


def _json_type(value: object) -> str:
    if isinstance(value, str):
        return '"'
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, (int, float)):
        return str(value)[:1]
    if value is None:
        return "n"
    return "[" if isinstance(value, list) else "{"


def _decode_json(data: bytes) -> list[tuple[str, list[_InEntry]]]:
    # Go's JSON decoding replaces invalid UTF-8 with U+FFFD instead of failing.
    try:
        doc = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise _BadRequest(f"loghttp.PushRequest: ReadObject: {exc}") from None
    if not isinstance(doc, dict):
        raise _BadRequest(f"loghttp.PushRequest: ReadObjectCB: expect {{ or n, but found {_json_type(doc)}")
    raw_streams = doc.get("streams") or []
    if not isinstance(raw_streams, list):
        raise _BadRequest("loghttp.PushRequest.Streams: ReadArray: expect [ or n")
    streams: list[tuple[str, list[_InEntry]]] = []
    for raw in raw_streams:
        if not isinstance(raw, dict):
            raise _BadRequest("loghttp.PushRequest.Streams: ReadObjectCB: expect { or n")
        stream_map = raw.get("stream") or {}
        if not isinstance(stream_map, dict) or not all(isinstance(v, str) for v in stream_map.values()):
            raise _BadRequest('loghttp.PushRequest.Streams: loghttp.LabelSet: ReadString: expects " or n')
        # Loki turns the map into a label string (names unquoted) and parses that: bad names fail there.
        labels = "{" + ", ".join(f"{k}={_quote(v)}" for k, v in sorted(stream_map.items())) + "}"
        entries: list[_InEntry] = []
        values = raw.get("values") or []
        if not isinstance(values, list):
            raise _BadRequest("loghttp.PushRequest.Streams: []loghttp.Entry: ReadArray: expect [ or n")
        for item in values:
            if not isinstance(item, list):
                raise _BadRequest("loghttp.PushRequest.Streams: []loghttp.Entry: ReadArrayCB: expect [ or n")
            if len(item) > 3:
                raise _BadRequest("error reading entry: array must contains 2 values")
            ts_raw = item[0] if item else ""
            if not isinstance(ts_raw, str):
                raise _BadRequest(f'ReadString: expects " or n, but found {_json_type(ts_raw)}')
            try:
                ts = int(ts_raw, 10)
                if not -(1 << 63) <= ts < 1 << 63 or not re.fullmatch(r"[+-]?[0-9]+", ts_raw):
                    raise ValueError
            except ValueError:
                raise _BadRequest(
                    f'error reading entry timestamp: strconv.ParseInt: parsing "{ts_raw}": invalid syntax'
                ) from None
            line = item[1] if len(item) > 1 else ""
            if not isinstance(line, str):
                raise _BadRequest(f'ReadString: expects " or n, but found {_json_type(line)}')
            metadata: tuple[tuple[str, str], ...] = ()
            if len(item) == 3:
                md = item[2]
                if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
                    raise _BadRequest('ReadString: expects " or n in structured metadata')
                metadata = tuple(md.items())
            entries.append(_InEntry(ts, line, metadata))
        streams.append((labels, entries))
    return streams


def _rfc3339(ts_ns: int) -> str:
    """Go's ``Format(time.RFC3339)`` of a UTC time: whole seconds (truncated), ``Z``."""
    return datetime.fromtimestamp(ts_ns // _NS, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _go_time(ts_ns: int) -> str:
    """Go's ``time.Time.String()`` of a UTC time (how the ingester prints an entry's timestamp):
    ``2006-01-02 15:04:05.999999999 +0000 UTC``, trailing zeros of the fraction dropped."""
    seconds, nanos = divmod(ts_ns, _NS)
    fraction = f"{nanos:09d}".rstrip("0")
    text = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{fraction} +0000 UTC" if fraction else f"{text} +0000 UTC"


# ---------------------------------------------------------------------------------------------
# Queries: a LogQL subset (stream selector + line filters)

_MATCHER = re.compile(r"\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*")
_FILTER = re.compile(r"\s*(\|=|!=|\|~|!~)\s*")


def _parse_query(query: str) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    text = query.strip()
    if not text.startswith("{"):
        raise ValueError("query must start with a stream selector {...}")
    pos = 1
    matchers: list[tuple[str, str, str]] = []
    while True:
        while pos < len(text) and text[pos] in " \t\n,":
            pos += 1
        if pos < len(text) and text[pos] == "}":
            pos += 1
            break
        m = _MATCHER.match(text, pos)
        if not m or m.end() >= len(text) or text[m.end()] not in "\"'`":
            raise ValueError(f"parse error at {pos}: expected label matcher")
        value, pos = _read_string(text, m.end(), promql=False)
        matchers.append((m.group(1), m.group(2), value))
    filters: list[tuple[str, str]] = []
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _FILTER.match(text, pos)
        if not m or m.end() >= len(text) or text[m.end()] not in "\"'`":
            raise ValueError(
                f"unsupported in the test receiver at {pos}: only line filters follow the selector"
            )
        value, pos = _read_string(text, m.end(), promql=False)
        filters.append((m.group(1), value))
    if all(_matches({}, [matcher]) for matcher in matchers):
        raise ValueError("queries require at least one matcher that does not match the empty string")
    return matchers, filters


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, value in matchers:
        have = labels.get(name, "")
        if op == "=" and have != value:
            return False
        if op == "!=" and have == value:
            return False
        if op == "=~" and not re.fullmatch(value, have):
            return False
        if op == "!~" and re.fullmatch(value, have):
            return False
    return True


def _line_ok(line: str, filters: list[tuple[str, str]]) -> bool:
    for op, value in filters:
        if op == "|=" and value not in line:
            return False
        if op == "!=" and value in line:
            return False
        if op == "|~" and not re.search(value, line):
            return False
        if op == "!~" and re.search(value, line):
            return False
    return True


def _parse_time(value: str | None, default: int) -> int:
    if not value:
        return default
    if re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    if re.fullmatch(r"-?[0-9]+\.[0-9]*", value):
        return int(float(value) * _NS)
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * _NS)


# ---------------------------------------------------------------------------------------------


class LokiReceiver:
    """A Loki push endpoint on loopback that validates like Loki 3.x and stores what it accepts.

    Limits default to Loki's: ``max_line_size`` 256KB (262,144 bytes: Loki's flagext.ByteSize, as
    c2h5oh/datasize reads it, takes KB as 1,024; the sink's default max_line_bytes is 256,000),
    15 label names, label name/value length 1024/2048, reject_old_samples_max_age 168h,
    creation_grace_period 10m, unordered writes with max_chunk_age 2h (entries more than an hour
    behind the stream's newest are refused), structured metadata allowed (``max_structured_metadata_size``
    "64kb": 65,536 bytes, binary too; 128 pairs).
    ``now`` (epoch seconds) drives the age checks. ``max_body_bytes`` is the largest push body taken
    (Loki's default 100 MB; beyond it aiohttp answers 413, as a gateway with a body limit does).
    Off unless given (Loki has them on): the tenant's ingestion rate limit (``ingestion_rate`` bytes/s,
    ``ingestion_burst`` bytes: 429, nothing stored), its active stream limit (``max_streams``: a
    new stream beyond it is refused, 429 naming it, the push's other streams stored; with
    ``stream_limit_wording="2.x"`` naming no stream, as every Loki 2.x answers) and the
    per-stream rate limit (``per_stream_rate`` bytes/s, ``per_stream_burst`` bytes: a stream's entries
    over it refused, all of them with ``per_stream_whole``, 429 "Per stream rate limit exceeded"
    naming it, the push's other streams stored; ``count_detected_level``: bytes more per entry, as
    Loki releases that counted their own ``detected_level`` metadata).
    An entry identical (timestamp and line) to its stream's last appended one is skipped before it is
    counted or judged, as Loki's ingester does; ``entries`` lists it again, as it lists every duplicate
    (queries de-duplicate).
    A label value holding a literal U+FFFD (or invalid UTF-8) fails the whole push, 400 "couldn't
    parse labels", as Prometheus' lexer refuses it.
    Entries too far behind their stream's newest are answered as Loki's ingester does: 400 listing
    at most ``max_returned_stream_errors`` (10) of them and the total, for one stream; the push's other
    entries stored.
    Like Loki's ingester, the answer is what happened to the *last* stream of the push that reached
    the ingester: a refused stream followed by a stored one is answered 2xx (the refusal unseen).
    With ``distributed``, as a Loki whose streams go to different ingesters (the grafana/loki chart's
    SimpleScalable and distributed modes): the answer is the error of the *first* refused stream
    (pkg/distributor ``pushTracker``: the first stream whose ingesters failed), the streams after
    it stored all the same.
    A push of no stream is answered 422 (Loki 3.4+); a stream without entries is skipped by the
    distributor (its labels parsed all the same): a push of only such streams is answered 204,
    nothing stored or created (``eventrouter check``'s probe). Tenancy comes first: 401 "no org id".
    ``push_delay`` makes the ingester slow for chosen pushes.
    """

    def __init__(
        self,
        *,
        auth_enabled: bool = False,
        username: str | None = None,
        password: str | None = None,
        bearer_token: str | None = None,
        max_line_size: int = 256 * 1024,
        max_label_names_per_series: int = 15,
        max_label_name_length: int = 1024,
        max_label_value_length: int = 2048,
        reject_old_samples_max_age: float = 168 * 3600,
        creation_grace_period: float = 600,
        max_chunk_age: float = 2 * 3600,
        allow_structured_metadata: bool = True,
        max_structured_metadata_size: int = 64 * 1024,
        max_structured_metadata_entries_count: int = 128,
        now: Callable[[], float] = time.time,
        ssl_context: Any = None,
        max_body_bytes: int = 100 * 1024 * 1024,
        block_ingestion_until: float | None = None,
        block_ingestion_status_code: int = 260,
        ingestion_rate: float | None = None,
        ingestion_burst: float | None = None,
        max_streams: int | None = None,
        max_returned_stream_errors: int = 10,
        push_delay: Callable[[list[dict[str, str]]], float] | None = None,
        per_stream_rate: float | None = None,
        per_stream_burst: float | None = None,
        per_stream_whole: bool = True,
        count_detected_level: int = 0,
        stream_limit_wording: Literal["3.x", "2.x"] = "3.x",
        distributed: bool = False,
    ) -> None:
        self.auth_enabled = auth_enabled
        self.username = username
        self.password = password
        self.bearer_token = bearer_token
        self.max_line_size = max_line_size
        self.max_label_names_per_series = max_label_names_per_series
        self.max_label_name_length = max_label_name_length
        self.max_label_value_length = max_label_value_length
        self.reject_old_samples_max_age = reject_old_samples_max_age
        self.creation_grace_period = creation_grace_period
        self.max_chunk_age = max_chunk_age
        self.allow_structured_metadata = allow_structured_metadata
        self.max_structured_metadata_size = max_structured_metadata_size
        self.max_structured_metadata_entries_count = max_structured_metadata_entries_count
        self.now = now
        self.ssl_context = ssl_context
        self.max_body_bytes = max_body_bytes
        # limits_config.block_ingestion_until / block_ingestion_status_code (an operator's stop):
        # pushes are discarded and answered with that code, Loki's default 260, a 2xx.
        self.block_ingestion_until = block_ingestion_until
        self.block_ingestion_status_code = block_ingestion_status_code
        # The distributor's tenant rate limiter (limits_config.ingestion_rate_mb and
        # ingestion_burst_size_mb, in bytes here; Loki's defaults are 4 MiB/s and 6 MiB): a token
        # bucket, full at first; a push that does not fit is answered 429 and nothing is stored, and
        # one larger than the burst never fits. None: no limit (the default here).
        self.ingestion_rate = ingestion_rate
        self.ingestion_burst = ingestion_burst
        self._tokens: float | None = None
        self._tokens_at = 0.0
        self.rate_limited = 0  # pushes refused by the rate limiter
        # The ingester's active stream limit (max_global_streams_per_user): a push's entries for a new
        # stream beyond it are refused with 429, its other streams stored. None: no limit.
        self.max_streams = max_streams
        self.stream_limited = 0  # entries refused by the stream limit
        # How the stream limit's refusal reads: "3.x" names the stream (since grafana/loki#12437);
        # "2.x", as every 2.x release answers, does not.
        if stream_limit_wording not in ("3.x", "2.x"):
            raise ValueError(f"stream_limit_wording must be '3.x' or '2.x', not {stream_limit_wording!r}")
        self.stream_limit_wording = stream_limit_wording
        # The ingester's per-stream rate limit (limits_config.per_stream_rate_limit and
        # per_stream_rate_limit_burst, in bytes here; Loki's defaults "3MB" and "15MB" are 3 MiB/s and
        # 15 MiB: its ByteSize is binary), a golang.org/x/time/rate bucket per stream, full at first.
        # ``per_stream_whole`` (shard_streams.enabled, Loki 3.x's default): a push's entries of a
        # stream are refused all together when they do not fit; otherwise entry by entry. None: off.
        self.per_stream_rate = per_stream_rate
        self.per_stream_burst = per_stream_burst
        self.per_stream_whole = per_stream_whole
        self._stream_tokens: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, float]] = {}
        self.stream_rate_limited = 0  # entries refused by the per-stream rate limit
        # Bytes the limiter counts per entry beyond its line and structured metadata: Loki 3.x
        # releases whose distributor adds ``detected_level`` structured metadata (discover_log_levels,
        # on by default) and whose ingester counted it (util.EntryTotalSize before it excluded
        # constants.LevelLabel): len("detected_level") + len(level), 21 for "unknown". 0: as Loki now.
        self.count_detected_level = count_detected_level
        # Per stream, its last appended entry (timestamp, line): Loki's stream.lastLine. The ingester
        # skips an entry identical to it before counting or storing anything (validateEntries).
        self._last_line: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[int, str]] = {}
        # Each stream on its own ingester, the first refusal answered (see the class doc).
        self.distributed = distributed
        # The ingester's max_returned_stream_errors: refused entries listed per stream (0: all).
        self.max_returned_stream_errors = max_returned_stream_errors
        # A slow ingester: seconds to wait before taking a push, given its streams' label sets. The
        # push is stored after the wait even when the client gave up meanwhile (aiohttp does not
        # cancel a handler whose client left), as Loki stores a push whose answer came too late.
        self.push_delay = push_delay
        self.entries: list[StoredEntry] = []
        """Every stored entry in arrival order, duplicates included (queries de-duplicate)."""
        self.pushes: list[Push] = []
        self.discarded_blocked = 0  # entries discarded while ingestion was blocked
        self.ready = True
        self.ready_page = 0
        """Bytes of a front's web page answering ``/ready`` (502, streamed); 0: Loki's answer."""
        self.pages: list[FrontPage] = []
        """Front pages answered (``fail_next(page=…)``, ``ready_page``): how much the client took."""
        self._faults: list[_Fault] = []
        self._unreadable: dict[str, deque[Unreadable]] = {"push": deque(), "ready": deque()}
        self._late: deque[float] = deque()
        self._charsets: dict[str, deque[str]] = {"push": deque(), "ready": deque()}
        self._release = asyncio.Event()
        self._newest: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._url = ""

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``); the push path is ``/loki/api/v1/push``."""
        if not self._url:
            raise RuntimeError("LokiReceiver is not started")
        return self._url

    async def __aenter__(self) -> LokiReceiver:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/loki/api/v1/push", self._handle_push)
        app.router.add_get("/ready", self._handle_ready)
        app.router.add_get("/loki/api/v1/query_range", self._handle_query_range)
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)  # decode as Loki does
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._url = f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # a stalled answer ends: its connection is dropped
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- test controls ---------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        message: str | None = None,
        retry_after: float | str | None = None,
        store: bool = False,
        echo: bool = False,
        page: int = 0,
    ) -> None:
        """Answer the next ``count`` pushes with ``status``; with ``store`` the push is stored first;
        with ``echo`` the message quotes the request (its headers: Authorization, X-Scope-OrgID...);
        with ``page``, a front answers instead with a web page of that many bytes (``pages``)."""
        default = {
            429: "Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec) while attempting "
            "to ingest lines, reduce log volume or contact your Loki administrator",
            400: "injected bad request",
        }.get(status, "rpc error: code = Unavailable desc = injected failure")
        ra = None if retry_after is None else str(retry_after)
        for _ in range(count):
            self._faults.append(_Fault(status, message or default, ra, store, echo, page))

    def clear_faults(self) -> int:
        """Drop the answers ``fail_next`` queued and no push took yet; how many were dropped."""
        dropped = len(self._faults)
        self._faults.clear()
        return dropped

    def unreadable_next(self, n: int, how: Unreadable, *, ready: bool = False) -> None:
        """The next ``n`` answers to pushes (``ready``: to ``/ready``), whatever they say, sent with a
        body the client cannot read (``answer_unreadable``)."""
        self._unreadable["ready" if ready else "push"].extend([how] * n)

    def late_next(self, n: int, after: float) -> None:
        """The next ``n`` answers to pushes sent with their body ``after`` seconds after their head."""
        self._late.extend([after] * n)

    def charset_next(self, n: int, charset: str, *, ready: bool = False) -> None:
        """The next ``n`` answers to pushes (``ready``: to ``/ready``), whatever they say, labelled
        with ``charset`` (``mislabelled``), their body unchanged."""
        self._charsets["ready" if ready else "push"].extend([charset] * n)

    async def _maybe_unreadable(
        self, request: web.Request, answer: web.StreamResponse, which: str
    ) -> web.StreamResponse:
        """``answer`` as ``charset_next``, ``unreadable_next`` or ``late_next`` asked (not a streamed front
        page)."""
        queue = self._unreadable[which]
        if not isinstance(answer, web.Response):
            return answer
        if self._charsets[which]:
            answer = mislabelled(answer, self._charsets[which].popleft())
        if queue:
            return await answer_unreadable(request, answer, queue.popleft(), self._release)
        if which == "push" and self._late:
            return await answer_late(request, answer, self._late.popleft())
        return answer

    def forget_streams(self, which: Callable[[dict[str, str]], bool] | None = None) -> None:
        """The ingester forgets every stream (``which``: those whose labels it takes), as it does one
        that received nothing for chunk_idle_period (30 min) once its chunks are flushed: the next
        entry creates it anew (which the stream limit may refuse). Stored entries stay queryable."""
        for table in (self._newest, self._stream_tokens, self._last_line):
            # A stream created anew has a new limiter, and no last line: a duplicate of it is
            # appended again.
            for key in [key for key in table if which is None or which(dict(key[1]))]:
                del table[key]

    def refill_rate_limit(self) -> None:
        """The ingestion rate limiter's bucket full again, as after a wait of ``burst / rate`` seconds."""
        self._tokens = None

    def refill_stream_rate_limits(self) -> None:
        """Every stream's rate limiter full again, as after a wait of ``burst / rate`` seconds."""
        self._stream_tokens.clear()

    async def wait_for_entries(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` entries are stored (duplicates included)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.entries) >= count)

    def query_range(
        self,
        query: str | None = None,
        *,
        tenant: str = "",
        start_ns: int | None = None,
        end_ns: int | None = None,
        limit: int | None = None,
        direction: str = "forward",
    ) -> list[Stream]:
        """Streams matching a LogQL stream selector (None: every stream) with optional line filters (``|=``, ``!=``,
        ``|~``, ``!~``), identical (ts, labels, line) entries de-duplicated as Loki does. Unlike Loki's
        HTTP API the defaults are: every time, no limit, oldest first. Stream labels include
        ``service_name`` as Loki adds it; structured metadata stays per entry."""
        if query is None:
            matchers: list[tuple[str, str, str]] = []
            filters: list[tuple[str, str]] = []
        else:
            matchers, filters = _parse_query(query)
        start = start_ns if start_ns is not None else -(1 << 63)
        end = end_ns if end_ns is not None else 1 << 63
        seen: set[tuple[tuple[tuple[str, str], ...], int, str]] = set()
        selected: list[StoredEntry] = []
        for entry in self.entries:
            if entry.tenant != tenant or not start <= entry.ts_ns < end:
                continue
            labels = self._with_service_name(entry.labels)
            if not _matches(dict(labels), matchers) or not _line_ok(entry.line, filters):
                continue
            key = (entry.labels, entry.ts_ns, entry.line)
            if key in seen:
                continue
            seen.add(key)
            selected.append(entry)
        selected.sort(key=lambda e: e.ts_ns, reverse=direction == "backward")
        if limit is not None:
            selected = selected[:limit]
        streams: dict[tuple[tuple[str, str], ...], Stream] = {}
        for entry in selected:
            labels = self._with_service_name(entry.labels)
            stream = streams.get(labels)
            if stream is None:
                stream = streams[labels] = Stream(dict(labels))
            stream.values.append((entry.ts_ns, entry.line, dict(entry.metadata)))
        return list(streams.values())

    @staticmethod
    def _with_service_name(labels: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        as_dict = dict(labels)
        if "service_name" in as_dict:
            return labels
        service = next((as_dict[n] for n in _SERVICE_NAME_LABELS if as_dict.get(n)), "unknown_service")
        return tuple(sorted((*labels, ("service_name", service))))

    # -- HTTP ------------------------------------------------------------------------------

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if self.username is not None or self.bearer_token is not None:
            header = request.headers.get("Authorization", "")
            ok = False
            if self.username is not None and header.startswith("Basic "):
                expected = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
                ok = hmac.compare_digest(header[6:].strip(), expected)
            if self.bearer_token is not None and header.startswith("Bearer "):
                ok = hmac.compare_digest(header[7:].strip(), self.bearer_token)
            if not ok:
                return web.Response(status=401, text="Unauthorized\n", headers={"WWW-Authenticate": "Basic"})
        return None

    def _tenant(self, request: web.Request) -> str | None:
        tenant = request.headers.get("X-Scope-OrgID", "")
        if self.auth_enabled and not tenant:
            return None
        return tenant if self.auth_enabled else ""

    async def _handle_ready(self, request: web.Request) -> web.StreamResponse:
        return await self._maybe_unreadable(request, await self._answer_ready(request), "ready")

    async def _answer_ready(self, request: web.Request) -> web.StreamResponse:
        refused = self._auth_error(request)
        if refused is not None:
            return refused
        if self.ready_page:
            self.pages.append(FrontPage(502, self.ready_page))
            return await answer_page(request, self.pages[-1], {})
        if not self.ready:
            return web.Response(status=503, text="Ingester not ready: waiting for 15s after being ready\n")
        return web.Response(text="ready\n")

    async def _handle_push(self, request: web.Request) -> web.StreamResponse:
        return await self._maybe_unreadable(request, await self._answer_push(request), "push")

    async def _answer_push(self, request: web.Request) -> web.StreamResponse:
        headers = dict(request.headers.items())
        ctype = request.headers.get("Content-Type", "")
        cenc = request.headers.get("Content-Encoding", "")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's own 413, as a gateway with a body limit
            self.pushes.append(
                Push(headers, ctype, cenc, request.content_length or 0, 413, exc.text or "", 0)
            )
            raise

        def answer(
            status: int, message: str, accepted: int = 0, extra: dict[str, str] | None = None
        ) -> web.Response:
            self.pushes.append(Push(headers, ctype, cenc, len(body), status, message, accepted))
            if status == 204:
                return web.Response(status=204, headers=extra)
            return web.Response(status=status, text=message + "\n", headers=extra)

        refused = self._auth_error(request)
        if refused is not None:
            return answer(401, "Unauthorized")
        tenant = self._tenant(request)
        if tenant is None:
            return answer(401, "no org id")
        fault = self._faults.pop(0) if self._faults else None
        extra = {"Retry-After": fault.retry_after} if fault and fault.retry_after else None
        if fault is not None and fault.page:
            self.pushes.append(Push(headers, ctype, cenc, len(body), fault.status, "(a front's page)", 0))
            self.pages.append(FrontPage(fault.status, fault.page))
            return await answer_page(request, self.pages[-1], extra or {})
        if fault is not None and fault.echo:
            fault = replace(fault, message=fault.message + _echo(request))
        if fault is not None and not fault.store:
            return answer(fault.status, fault.message, 0, extra)
        try:
            streams = self._parse(body, ctype, cenc)
            if not streams:
                # Loki 3.4+ (grafana/loki#13706; ``PushWithResolver``, validation.MissingStreamsErrorMsg);
                # before, 204. A stream without entries is skipped instead (below): 204, nothing stored.
                return answer(422, _MISSING_STREAMS)
            if self.push_delay is not None:
                delay = self.push_delay([dict(stream.labels) for stream in streams])
                if delay > 0:
                    await asyncio.sleep(delay)
            blocked = self._blocked(tenant, streams)
            if blocked is not None:
                return blocked
            limited = self._rate_limited(tenant, streams)
            if limited is not None:
                return answer(429, limited)
            accepted, errors, ingester_error = self._ingest(tenant, streams)
        except (_BadRequest, LabelParseError, DecodeError) as exc:
            return answer(400, str(exc))
        if accepted:
            async with self._changed:
                self._changed.notify_all()
        if fault is not None:
            return answer(fault.status, fault.message, accepted, extra)
        if ingester_error is not None:
            # The ingester's error wins over the distributor's 400 (which is then not sent), and it
            # describes the push's last stream only (see _ingest).
            return answer(*ingester_error, accepted)
        if errors:
            return answer(400, _group_errors(errors), accepted)
        return answer(204, "", accepted)

    def _blocked(self, tenant: str, streams: list[_InStream]) -> web.Response | None:
        """The distributor's ``ShouldBlockIngestion``: every entry discarded; the configured code
        answers, with the error as the body, or an empty success when the code is 200. (Loki looks
        after validating the streams; a push whose every entry is invalid would get its 400 first.)"""
        until = self.block_ingestion_until
        if until is None or self.now() >= until or not any(s.entries for s in streams):
            return None
        code = self.block_ingestion_status_code
        self.discarded_blocked += sum(len(s.entries) for s in streams)
        when = datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        message = f"ingestion blocked for user {tenant or 'fake'} until '{when}' with status code '{code}'"
        self.pushes.append(Push({}, "", "", 0, code, message, 0))
        if code == 200:
            return web.Response(status=204)
        return web.Response(status=code, text=message + "\n")

    def _window(self) -> tuple[int, int]:
        now_ns = int(self.now() * _NS)
        oldest = now_ns - int(self.reject_old_samples_max_age * _NS)
        return oldest, now_ns + int(self.creation_grace_period * _NS)

    def _rate_limited(self, tenant: str, streams: list[_InStream]) -> str | None:
        """The distributor's ``ingestionRateLimiter.AllowN(now, tenant, validatedLineSize)``: the
        valid entries' lines plus structured metadata (names and values), against a token bucket of
        ``ingestion_burst`` bytes refilled at ``ingestion_rate`` bytes/s (golang.org/x/time/rate)."""
        rate = self.ingestion_rate
        if rate is None:
            return None
        oldest, newest_ok = self._window()
        lines = size = 0
        for stream in streams:
            shown = _format_labels_once(stream.labels)
            if self._validate_labels(stream.labels, shown):
                continue
            for entry in stream.entries:
                if self._validate_entry(entry, shown, oldest, newest_ok) is None:
                    lines += 1
                    size += len(entry.line.encode("utf-8", "surrogatepass"))
                    size += sum(len(k.encode()) + len(v.encode()) for k, v in entry.metadata)
        if not lines:
            return None  # Loki answers its validation error before it looks at the rate
        burst = self.ingestion_burst if self.ingestion_burst is not None else rate
        now = time.monotonic()
        tokens = burst if self._tokens is None else self._tokens + (now - self._tokens_at) * rate
        tokens = min(burst, tokens)
        self._tokens_at = now
        if size <= tokens:
            self._tokens = tokens - size
            return None
        self._tokens = tokens
        self.rate_limited += 1
        return (
            f"Ingestion rate limit exceeded for user {tenant or 'fake'} (limit: {int(rate)} bytes/sec) while "
            f"attempting to ingest '{lines}' lines totaling '{size}' bytes, reduce log volume or contact your "
            "Loki administrator to see if the limit can be increased"
        )

    def _parse(self, body: bytes, ctype: str, cenc: str) -> list[_InStream]:
        if cenc in ("", "snappy"):
            data = body  # "snappy" is decoded by the protobuf path below, as in Loki
        elif cenc == "gzip":
            try:
                data = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                raise _BadRequest("gzip: invalid header") from None
        elif cenc == "deflate":
            try:
                data = zlib.decompress(body, -15)  # Go's compress/flate: raw deflate, no zlib header
            except zlib.error:
                raise _BadRequest("flate: corrupt input before offset 0") from None
        else:
            raise _BadRequest(f'Content-Encoding "{cenc}" not supported')
        media = ctype.split(";", 1)[0].strip().lower()
        if not media:
            raise _BadRequest("mime: no media type")
        if media == "application/json":
            raw_streams = _decode_json(data)
        else:
            # Any other type (application/x-protobuf, octet-stream, curl's form default): snappy block.
            try:
                raw = bytes(cramjam.snappy.decompress_raw(data))
            except Exception:
                raise _BadRequest("snappy: corrupt input") from None
            raw_streams = _decode_protobuf(raw)
        streams: list[_InStream] = []
        for label_text, entries in raw_streams:
            try:
                labels = _parse_labels_once(label_text)
            except LabelParseError as exc:
                raise _BadRequest(f"couldn't parse labels: {exc}") from None
            streams.append(_InStream(labels, entries))
        return streams

    def _ingest(self, tenant: str, streams: list[_InStream]) -> tuple[int, list[str], tuple[int, str] | None]:
        """Store what Loki would: the entries stored, the distributor's validation errors, and the
        ingester's error (status, message): what happened to the *last* stream it was handed.

        Loki's ingester (pkg/ingester/instance.go ``Push``, 2.x and 3.x) loops over the streams of
        the request: a stream it cannot create (the stream limit) sets ``appendErr = err; continue``,
        and every other stream sets ``_, appendErr = s.Push(...)``, so a later stream's result, nil
        included, overwrites an earlier one's error ("the returned error only reflects what happened
        to *the last stream in the request*", its doc comment). The distributor
        (pkg/distributor/distributor.go) hands the ingester the streams with valid entries, in push
        order (``sendStreamsErr``), and answers its 400 for invalid entries only when the ingester
        succeeded. A stream whose every entry the distributor refused never reaches the ingester.
        ``distributed``: the first stream's refusal is the answer instead (``_answered``)."""
        oldest, newest_ok = self._window()
        behind = int(self.max_chunk_age / 2 * _NS)
        errors: list[str] = []
        ingester_error: tuple[int, str] | None = None
        accepted = 0
        user = tenant or "fake"
        for stream in streams:
            if not stream.entries:
                continue
            shown = _format_labels_once(stream.labels)
            error = self._validate_labels(stream.labels, shown)
            if error:
                errors.append(error)
                continue
            # The distributor drops the entries it refuses; the ingester gets the rest of the stream.
            valid: list[_InEntry] = []
            for entry in stream.entries:
                error = self._validate_entry(entry, shown, oldest, newest_ok)
                if error:
                    errors.append(error)
                else:
                    valid.append(entry)
            if not valid:
                continue
            key = (tenant, stream.labels)
            # The ingester names the stream as its distributor made it (with service_name).
            named = _format_labels_once(self._with_service_name(stream.labels))
            if (
                self.max_streams is not None
                and key not in self._newest
                and sum(1 for t, _ in self._newest if t == tenant) >= self.max_streams
            ):
                # The ingester refuses a new stream beyond the limit and goes on with the push's
                # other streams; a later stream's result overwrites this error.
                self.stream_limited += len(valid)
                which = "" if self.stream_limit_wording == "2.x" else f" when trying to create stream {named}"
                ingester_error = self._answered(
                    ingester_error,
                    429,
                    f"{_STREAM_LIMIT_PREFIX}{which}, reduce the number of active streams (reduce labels "
                    "or reduce label values), or contact your Loki administrator to see if the limit can "
                    f"be increased, user: '{user}'",
                )
                continue
            # The ingester's stream.validateEntries (pkg/ingester/stream.go): with unordered writes,
            # an entry more than max_chunk_age/2 behind the highest timestamp the stream holds (raised
            # by each entry it takes, in push order) is refused; entry by entry, one the per-stream
            # rate limiter does not allow is refused first.
            failed: list[tuple[int, str, bool]] = []  # (entry timestamp, reason, rate limited)
            to_store: list[_InEntry] = []
            # What ``entries`` gets: to_store, and in its place each entry identical to the stream's
            # last line, which Loki skips before anything else (not counted, never refused). It holds
            # that entry already; listed again here as any duplicate is (queries show one).
            to_record: list[_InEntry] = []
            newest = self._newest.get(key)
            limited = self.per_stream_rate is not None
            # validateEntries' copy of s.lastLine: moved past each entry that passed the checks
            # below, before the whole-stream rate check; the stream's own (_last_line) only for
            # entries stored (storeEntries). An entry refused for the rate is judged again when sent
            # again, and entry by entry a copy of it later in the push too.
            last = self._last_line.get(key)
            for entry in valid:
                if last is not None and entry.ts_ns == last[0] and entry.line == last[1]:
                    to_record.append(entry)
                    continue
                if limited and not self.per_stream_whole:
                    size = self._entry_size(entry)
                    if not self._stream_allows(key, size):
                        failed.append((entry.ts_ns, self._stream_rate_reason(named, size), True))
                        continue
                if newest is not None and entry.ts_ns < newest - behind:
                    failed.append((entry.ts_ns, _behind_reason(entry.ts_ns, newest - behind), False))
                    continue
                newest = entry.ts_ns if newest is None else max(newest, entry.ts_ns)
                last = (entry.ts_ns, entry.line)
                to_store.append(entry)
                to_record.append(entry)
            if (
                limited
                and self.per_stream_whole
                and to_store
                and not self._stream_allows(key, sum(self._entry_size(e) for e in to_store))
            ):
                # Whole stream (rateLimitWholeStream): none of it is stored, and the answer lists the
                # entries the limiter refused only (those too far behind are left out of it).
                self.stream_rate_limited += len(to_store)
                refused = [
                    (e.ts_ns, self._stream_rate_reason(named, self._entry_size(e)), True) for e in to_store
                ]
                ingester_error = self._answered(
                    ingester_error, 429, self._failed_entries(user, named, refused, len(valid))
                )
                continue
            self.stream_rate_limited += sum(1 for _, _, rate in failed if rate)
            if newest is not None:
                self._newest[key] = newest
            if to_store:
                self._last_line[key] = (to_store[-1].ts_ns, to_store[-1].line)
            for entry in to_record:
                self.entries.append(
                    StoredEntry(tenant, stream.labels, entry.ts_ns, entry.line, entry.metadata)
                )
            accepted += len(to_record)
            # This stream's result, an earlier stream's error overwritten (also by success). Its
            # status is that of the last entry refused (errorForFailedEntries).
            if failed:
                status = 429 if failed[-1][2] else 400
                ingester_error = self._answered(
                    ingester_error, status, self._failed_entries(user, named, failed, len(valid))
                )
            elif not self.distributed:
                ingester_error = None
        return accepted, errors, ingester_error

    def _answered(self, before: tuple[int, str] | None, status: int, message: str) -> tuple[int, str]:
        """A stream's refusal as the push's answer: the last stream's (one ingester), or the first
        refused (``distributed``)."""
        return before if before is not None and self.distributed else (status, message)

    def _stream_allows(self, key: tuple[str, tuple[tuple[str, str], ...]], size: int) -> bool:
        """The stream's limiter ``AllowN(now, size)`` (golang.org/x/time/rate): refilled at the rate
        up to the burst; ``size`` over the burst is never allowed; a refusal takes no tokens."""
        rate = self.per_stream_rate or 0.0
        burst = self.per_stream_burst if self.per_stream_burst is not None else rate
        now = time.monotonic()
        tokens, at = self._stream_tokens.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if size <= tokens:
            self._stream_tokens[key] = (tokens - size, now)
            return True
        self._stream_tokens[key] = (tokens, now)
        return False

    def _entry_size(self, entry: _InEntry) -> int:
        """What the per-stream limiter counts of an entry (util.EntryTotalSize)."""
        return _entry_size(entry) + self.count_detected_level

    def _stream_rate_reason(self, named: str, size: int) -> str:
        """pkg/validation ``ErrStreamRateLimit.Error()``, sizes as Loki's flagext.ByteSize prints them."""
        return (
            f"Per stream rate limit exceeded (limit: {_byte_size(int(self.per_stream_rate or 0))}/sec) while "
            f"attempting to ingest for stream '{named}' totaling {_byte_size(size)}, consider splitting a "
            "stream via additional labels or contact your Loki administrator to see if the limit can be "
            "increased"
        )

    def _failed_entries(self, user: str, named: str, failed: list[tuple[int, str, bool]], total: int) -> str:
        """pkg/ingester/stream.go errorForFailedEntries: one line per refused entry (at most
        ``max_returned_stream_errors``) with its reason, then a total."""
        cap = self.max_returned_stream_errors
        listed = failed[:cap] if cap > 0 else failed
        lines = [
            f"entry with timestamp {_go_time(ts)} ignored, reason: '{reason}',\n" for ts, reason, _ in listed
        ]
        return (
            "".join(lines) + f"user '{user}', total ignored: {len(failed)} out of {total} for stream: {named}"
        )

    def _validate_labels(self, labels: tuple[tuple[str, str], ...], shown: str) -> str | None:
        if not labels:
            return "error at least one label pair is required per stream"
        names = [k for k, _ in labels]
        count = len(names) - (1 if "service_name" in names else 0)
        if count > self.max_label_names_per_series:
            return (
                f"entry for stream '{shown}' has {count} label names; limit {self.max_label_names_per_series}"
            )
        last = ""
        for name, value in labels:
            if len(name.encode()) > self.max_label_name_length:
                return f"stream '{shown}' has label name too long: '{name}'"
            if len(value.encode()) > self.max_label_value_length:
                return f"stream '{shown}' has label value too long: '{value}'"
            if name == last:
                return f"stream '{shown}' has duplicate label name: '{name}'"
            last = name
        return None

    def _validate_entry(self, entry: _InEntry, shown: str, oldest: int, newest_ok: int) -> str | None:
        if entry.ts_ns < oldest:
            return (
                f"entry for stream '{shown}' has timestamp too old: {_rfc3339(entry.ts_ns)}, "
                f"oldest acceptable timestamp is: {_rfc3339(oldest)}"
            )
        if entry.ts_ns > newest_ok:
            return f"entry for stream '{shown}' has timestamp too new: {_rfc3339(entry.ts_ns)}"
        size = len(entry.line.encode("utf-8", "surrogatepass"))
        if self.max_line_size and size > self.max_line_size:
            return (
                f"Max entry size '{self.max_line_size}' bytes exceeded for stream '{shown}' while adding "
                f"an entry with length '{size}' bytes"
            )
        if entry.metadata:
            if not self.allow_structured_metadata:
                return (
                    f"stream '{shown}' includes structured metadata, but this feature is disallowed. Please see "
                    "`limits_config.allow_structured_metadata` or contact your Loki administrator to enable it."
                )
            md_size = sum(len(k.encode()) + len(v.encode()) for k, v in entry.metadata)
            if md_size > self.max_structured_metadata_size:
                return (
                    f"stream '{shown}' has structured metadata too large: '{md_size}' bytes, limit: "
                    f"'{self.max_structured_metadata_size}' bytes."
                )
            if len(entry.metadata) > self.max_structured_metadata_entries_count:
                return (
                    f"stream '{shown}' has too many structured metadata labels: '{len(entry.metadata)}', "
                    f"limit: '{self.max_structured_metadata_entries_count}'."
                )
        return None

    async def _handle_query_range(self, request: web.Request) -> web.Response:
        refused = self._auth_error(request)
        if refused is not None:
            return refused
        tenant = self._tenant(request)
        if tenant is None:
            return web.Response(status=401, text="no org id\n")
        q = request.query
        now_ns = int(self.now() * _NS)
        try:
            end = _parse_time(q.get("end"), now_ns)
            start = _parse_time(q.get("start"), end - 3600 * _NS)
            limit = int(q.get("limit", "100"))
            direction = q.get("direction", "backward")
            streams = self.query_range(
                q.get("query", ""),
                tenant=tenant,
                start_ns=start,
                end_ns=end + 1,
                limit=limit,
                direction=direction,
            )
        except ValueError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        result: list[dict[str, Any]] = []
        for stream in streams:
            # Without the categorize-labels header Loki 3.x folds structured metadata into stream labels.
            grouped: dict[tuple[tuple[str, str], ...], list[list[str]]] = {}
            for ts, line, metadata in stream.values:
                key = tuple(sorted({**stream.labels, **metadata}.items()))
                grouped.setdefault(key, []).append([str(ts), line])
            result.extend({"stream": dict(k), "values": v} for k, v in grouped.items())
        payload = {"status": "success", "data": {"resultType": "streams", "result": result, "stats": {}}}
        return web.json_response(payload)


_STREAM_LIMIT_PREFIX = "Maximum active stream limit exceeded"
_MISSING_STREAMS = "error at least one valid stream is required for ingestion"


def _behind_reason(ts_ns: int, cutoff_ns: int) -> str:
    """chunkenc's ErrTooFarBehind."""
    return (
        f"entry too far behind, entry timestamp is: {_rfc3339(ts_ns)}, oldest acceptable timestamp is: "
        f"{_rfc3339(cutoff_ns)}"
    )


def _entry_size(entry: _InEntry) -> int:
    """util.EntryTotalSize: the line and the structured metadata's names and values, in bytes."""
    size = len(entry.line.encode("utf-8", "surrogatepass"))
    for name, value in entry.metadata:
        size += len(name.encode()) + len(value.encode())
    return size


def _byte_size(size: int) -> str:
    """Loki's flagext.ByteSize.String() (c2h5oh/datasize): the largest binary unit dividing it exactly."""
    if size == 0:
        return "0B"
    for unit, factor in (("EB", 1 << 60), ("PB", 1 << 50), ("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size // 1024}KB" if size % 1024 == 0 else f"{size}B"


def _group_errors(errors: list[str]) -> str:
    """Like Loki's util.GroupedErrors: one line per distinct message, repeats counted."""
    if len(errors) == 1:
        return errors[0]
    counts: dict[str, int] = {}
    for error in errors:
        counts[error] = counts.get(error, 0) + 1
    parts = [msg if n == 1 else f"{n} errors like: {msg}" for msg, n in counts.items()]
    return "; ".join(parts)
