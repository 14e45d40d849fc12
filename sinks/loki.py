"""Grafana Loki sink: pushes every occurrence as one log entry to ``/loki/api/v1/push``.

``--sink=loki:http://loki:3100?tenant=ops&labels=team=payments``

- Body: snappy-block-compressed protobuf (Loki's native format) by default; ``format=json``
  (optionally ``gzip=true``) for proxies that only pass JSON.
- Entry timestamp: the occurrence's normalised event time in nanoseconds, never the push time, so a
  retried or re-delivered occurrence has the same (timestamp, labels, line) and Loki de-duplicates it
  (one Loki would refuse is stamped otherwise: ``clamp_time``, below).
- Labels: a small, low-cardinality default set (cluster, namespace, kind, type, reason,
  reporting_component) plus user templates such as ``app={labels.app}``. Names are sanitised to
  ``[a-zA-Z_][a-zA-Z0-9_]*``; templates over per-object fields (object name/uid, event name/uid,
  message) are refused unless ``allow_high_cardinality_labels=true``: every distinct value is a new
  Loki stream, which is what makes Loki slow and expensive. Use ``structured_metadata=true`` for those.
  A U+FFFD in a value (a Go client's invalid UTF-8, a lone surrogate repaired) becomes ``?``: Loki's
  label parser (Prometheus' lexer) refuses the whole push for it. The line keeps the value.
- Responses: 2xx all delivered (a web page is not: see below). 400 is final and may be *partial*
  (Loki stores the valid entries of the push and lists the errors, without saying which entries they
  were): a push of several entries is pushed again in halves, down to single entries (as for 413;
  at most 32 such pushes per send, none after its deadline), Loki de-duplicating what it stored, so
  only an entry refused on its own is rejected with Loki's message and goes to the dead-letter file,
  never retried. A push not split further is rejected whole, entries Loki stored included (re-sending
  them later is harmless: Loki de-duplicates identical entries). Except the ingester's "entry too far behind" answer (another
  writer made the stream's newest entry newer than this sink knew): it names the stream, its
  cutoff and the refused entries' exact timestamps (up to 10), so only the refused entries are
  retried (then stamped at receipt, see below; one it cannot place is pushed again as it was), the
  rest of that stream is delivered and the push's other streams are pushed again at once. 429, 5xx,
  401/403/404/405/408 and connection errors are retried by the engine (RetryableError, honouring
  Retry-After). A push answered 413 (a proxy's body limit) is sent
  again in halves, and so is one larger than the tenant's ingestion rate limit (429 naming the limit:
  Loki refuses a push larger than its burst for ever); later pushes stay within that limit. A 429 for
  Loki's active stream limit retries the items of the stream it names only, set aside so they hold
  up no other stream, and pushes the others again at once (Loki de-duplicates what it stored; a stream
  spanning over ``max_behind`` is never among them with one ingester: it goes last in its push, or
  alone, one push per such stream, as Loki would refuse its older entries pushed again rather than
  de-duplicate them; a distributed Loki may still name another stream, and those older entries
  refused so are then rejected as perhaps stored, never stamped anew). Loki
  2.x names no stream: the refused one is then the push's only stream Loki may not hold (see below),
  or, when that cannot be told, each stream of the push is pushed again on its own.
  So does a 429 for Loki's per-stream rate limit, whose listing says which entries of the stream
  Loki stored when it limits entry by entry (2.x; 3.x with shard_streams off): those are not sent
  again when the listing proves it, and are told by Loki's cutoff otherwise (``_rate_listing``).
  That cutoff is read as one Loki's: against a replicated Loki limiting entry by entry (a
  distributed one's default replication factor is 3), the listing and the later cutoff may come
  from replicas that disagree, and an entry one of them stored may then be sent again stamped anew,
  a second copy (kept so: with whole-stream limiting, 3.x's default, it delivers what Loki left out).
  Each stream is kept within that limit beforehand
  (``per_stream_rate``, ``per_stream_burst``: Loki's defaults, planned with a 5 % margin), entries
  over it held back until it refills, since Loki answers for a push's last stream only (see below).
  Loki checks its bucket later than the sink plans, so a stream the budget held part of, or left
  near empty, is pushed last in a push of its own: Loki's 429 for it is then its answer. Streams
  pushed again at once are charged to the budget again (Loki charges a stored entry again before
  de-duplicating it): what does not fit waits, held. The budget is lowered only when Loki's answer
  proves its limits lower than the options, and goes back to them after 10 min without such proof.
  When part of a split push was stored, only the items of the part that failed are retried.
  A redirect (3xx) is never followed (a POST would come back a GET, a sign-in page's 200 be taken
  as stored, or the push and its headers go to another host): the push is retried and the redirect
  logged, where it points redacted; ``start`` fails on one, naming it. A 2xx with a web page (HTML:
  an auth front's sign-in page, an ingress's default site; Loki answers a stored push 204 without a
  body) is not stored either: retried, logged; ``start`` fails on one from ``/ready``. So are 404 and
  405, which Loki never answers to a push (a wrong URL, a front or gateway that takes no POST there):
  retried, never dead-lettered, logged naming the push URL. Each of these is logged at once, then
  every 10 minutes until a push is stored. ``eventrouter check`` also pushes one stream without
  entries (Loki answers 204, stores nothing): a push path refusing it (401/403: a multi-tenant Loki
  without ``tenant``, credentials; 404/405, a redirect, a web page) fails the check, naming it.
  Newer entries of a stream whose entries wait aside are held back (not sent, no attempt) while
  they would put those over ``max_behind`` behind, so the ones set aside go in first.
- A send cut off by the engine (``send_timeout``) is retried identical: what its finished pushes
  taught the sink is applied only when a send returns. An entry Loki then refuses as too far behind
  (Loki refuses, rather than de-duplicates, an identical entry behind its cutoff) is answered OK if
  a finished push stored it, and rejected, not stamped anew, if its push's outcome is unknown (a
  timeout, 5xx). A send starts no push beyond its first eight after its budget less one request's ``timeout`` (15 s
  by default: ``SinkContext.send_budget``), so a long one ends normally; what it did not push is
  sent again: in place, or aside with what the send set aside, if anything.
- Loki's ingester answers for the last stream of a push only: a refused stream followed by a stored
  one gets a 2xx. So a stream Loki has not taken from this sink in the last 20 minutes (it may be
  new to Loki, which then may refuse it for the active stream limit) is pushed last, one such stream
  per push, and up to eight such pushes go at once. ``new_stream_pushes=false`` trades that for
  throughput: one push per batch, new streams last (see the option).
- Loki refuses entries older than ``reject_old_samples_max_age`` (168 h), further ahead than
  ``creation_grace_period`` (10 min), or more than ``max_chunk_age``/2 (1 h) behind the newest entry of
  their stream: a node whose clock is off, an event kept for days, a replay or a relist in key order
  rather than time order. The sink remembers, per stream, the newest entry Loki accepted from it. With
  ``clamp_time=true`` (default) an event whose recorder's clock was ahead of the API server's by more
  than ``future_grace`` less a minute (its first time after its ``creationTimestamp``) is stamped at
  its time by the API server's clock: ``creationTimestamp`` + (its time − its first time). That
  depends on the object only, so a relist delivering it again (after a SIGKILL, or the ConfigMap
  mode's next leader) stamps it the same and Loki keeps one copy. Any other entry Loki would refuse
  for its time, and one whose stamp so Loki would refuse too, is stamped at the time the router
  received it (kept in the spool, so a retried entry is identical; a relist's is not). Either way its
  line says ``"time_adjusted": true`` and its real time stays in the line's ``time``. Whether an entry
  is too far ahead is judged against its receipt, not the attempt's clock, and an entry sent in a push
  whose outcome is unknown is sent again with the timestamp it had, so no retry stamps it otherwise.
  What would still be refused (``clamp_time=false``, or received too long ago) is sent in a push of its
  own, one stream per push, so only it is dead-lettered if Loki refuses it, not the whole push (and
  it is delivered if Loki's limits are wider than ``max_age``, ``future_grace`` and ``max_behind``
  say).
- Lines over ``max_line_bytes`` are truncated (the JSON stays valid and says ``"truncated": true``)
  or, with ``oversize=reject``, rejected one by one; never a whole-batch failure. A structured
  metadata value over 1,024 bytes (an ``involvedObject.name`` is free text in a core/v1 Event) is cut
  to that, so no entry's metadata comes near Loki's max_structured_metadata_size (65,536 bytes); the
  line keeps the value whole.
- Entries Loki took truncated (message or metadata) or stamped at receipt are counted
  (``LokiSink.modified``) and logged with their counts, at most once a minute.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import gzip
import math
import re
import ssl
import string
import time
import weakref
import zlib
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from operator import attrgetter, itemgetter
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import cramjam
import orjson
from pydantic import AliasChoices, Field, field_validator, model_validator

from eventrouter import (
    OK,
    BoundedCache,
    Occurrence,
    Outcome,
    OutcomeKind,
    RetryableError,
    Secret,
    Sink,
    SinkContext,
    SinkError,
    SinkOptions,
    __version__,
    reject,
    retry,
)
from eventrouter.body_prefix import EXCERPT_WAIT, answer_text, charset_of, excerpt
from eventrouter.logs import Throttled
from eventrouter.options import FilePath, http_url, redact_url
from eventrouter.protowire import bytes_field, varint, varint_field
from eventrouter.record import parse_time_ns
from eventrouter.retry_after import parse_retry_after as _retry_after
from eventrouter.truncate import cut_utf8, shorten_message

from ._headers import HEADERS_HELP, Headers, check_headers
from ._modified import ModifiedLog
from ._scrub import credentials, scrub, shown_location

__all__ = ["LokiOptions", "LokiSink"]

PUSH_PATH = "/loki/api/v1/push"
MAX_LABELS = 15
"""Loki's default max_label_names_per_series."""
MAX_LABEL_NAME_BYTES = 1024
"""Loki's default max_label_name_length; a longer name makes Loki refuse every entry of the stream."""
MAX_LABEL_VALUE_BYTES = 2048
"""Loki's default max_label_value_length; longer values would make Loki refuse the stream."""
MAX_TENANT_CHARS = 150
"""Loki (dskit) refuses longer tenant IDs, and characters other than a-z A-Z 0-9 ! - _ . * ' ( )."""
DEFAULT_MAX_LINE_BYTES = 256_000
"""A little below Loki's default max_line_size "256KB", which its ByteSize (c2h5oh/datasize, as for
per_stream_rate_limit) reads as 262,144 bytes (KB = 1024). Kept at 256,000, as it always was: a line
cut at another length after an upgrade would be a second copy in Loki of one re-delivered, and 6 KiB
of 256 is no loss. ``max_line_bytes=262144`` takes Loki's default whole."""
DEFAULT_MAX_AGE = 168 * 3600.0
"""Loki's default reject_old_samples_max_age: older entries are refused (400 "timestamp too old")."""
DEFAULT_FUTURE_GRACE = 600.0
"""Loki's default creation_grace_period: entries further ahead are refused (400 "timestamp too new")."""
DEFAULT_MAX_BEHIND = 3600.0
"""Half Loki's default max_chunk_age (2h): entries further behind the newest of their stream are refused
(400 "entry too far behind")."""
DEFAULT_STREAM_RATE = 3 << 20
"""Loki's default per_stream_rate_limit "3MB", which its ByteSize (c2h5oh/datasize) reads as 3 MiB/s."""
DEFAULT_STREAM_BURST = 15 << 20
"""Loki's default per_stream_rate_limit_burst "15MB" (15 MiB)."""
_METADATA_VALUE_BYTES = 1024
"""Longest structured metadata value sent (UTF-8 bytes; longer ones are cut, the line keeps them).
``involvedObject.name`` and ``.uid`` are free text in a core/v1 Event (the API server checks neither
length nor content), and Loki refuses an entry whose metadata is over max_structured_metadata_size
("64kb": 65,536 bytes) while storing the rest of its push. A Kubernetes name is at most 253 bytes
(a DNS subdomain) for nearly every kind, a uid 36: 1,024 keeps every real one whole."""
_METADATA_ROOM = 4096
"""Bytes an entry with structured metadata may weigh besides its line: four names (58 bytes), three
values of at most _METADATA_VALUE_BYTES, an occurrence number, and their protobuf framing."""
_ENTRY_ROOM = 1024
"""Bytes kept beyond the line of an entry without structured metadata when checking that a stream's
burst takes the largest entry (what Loki may add, a detected_level pair, and to spare)."""
_CLOCK_MARGIN_NS = 60 * 1_000_000_000
"""Kept inside Loki's time window on both sides (at most a quarter of it): Loki judges by its own clock."""
STREAM_KNOWN_FOR = 20 * 60.0
"""Seconds after Loki last took a stream from this sink that the sink counts on the stream still being
in Loki's ingester. An idle stream is flushed after chunk_idle_period (30 min by default) and then
forgotten, so its next entry creates it anew, which the active stream limit may refuse. 20 min leaves
10 min to spare (a request's latency, a chunk_idle_period set a little lower)."""
_PARALLEL_PUSHES = 8
"""Pushes of one send in flight at once (the connection pool's size). A first relist is nearly all
streams Loki may not hold yet, a push each: eight at once took the six-sink start-up from 13.2–15.9 s
to 11.6–12.9 s against four (docs/performance.md, section 4, "Session 27"); the CPU is the same."""
_SPLIT_PUSHES = 32
"""Pushes one send may spend halving pushes answered 400 (``_split_refused``): an entry refused among
500 (a full batch) takes 18. Beyond it, a push answered 400 is rejected whole, as before."""
_HOLD_AGAIN = 5.0
"""Seconds before a held-back entry is offered again (not an attempt: nothing was sent)."""
_LOG_FRONT_EVERY = 600.0
"""Seconds between two warnings about pushes answered by something else than Loki (a redirect, a web
page, 404, 405: the URL is to put right); the first at once."""
_SENT_MAX = 20_000
"""Entries whose storing is unknown (a push timed out, cut off) or known from a send cut off, kept
so that Loki refusing an identical one as too far behind is not answered with a second copy. Those
forgotten beyond it that were not known stored are still told from new ones (``_Lost``)."""
_UNKNOWN_STREAMS = 4096
"""Streams whose newest entry sent in a push of unknown outcome is kept (``_Watch``); beyond, the
oldest noted gives its value to the streams of its bucket (``_UNKNOWN_BUCKETS``)."""
_UNKNOWN_BUCKETS = 16_384
"""Buckets (by CRC-32 of the stream) of what ``_UNKNOWN_STREAMS`` forgets. One floor for every stream
made one 5xx'd push over 4,096 streams deny item 297's proof to every stream for about Loki's
window (r306 F3); a stream now shares its floor with 1 in 16,384 of the others (1.7 MiB at most)."""

# Fields a label template may use, and which of them are unbounded per object or per event.
TEMPLATE_FIELDS = frozenset(
    {
        "cluster", "namespace", "name", "uid", "type", "reason", "message", "action",
        "reporting_component", "reporting_instance", "source_component", "source_host",
        "involved_object.kind", "involved_object.namespace", "involved_object.name",
        "involved_object.uid", "involved_object.api_version", "involved_object.field_path",
    }
)  # fmt: skip
HIGH_CARDINALITY_FIELDS = frozenset(
    {"name", "uid", "message", "involved_object.name", "involved_object.uid", "involved_object.field_path"}
)
DEFAULT_LABELS: dict[str, str] = {
    "cluster": "cluster",
    "namespace": "namespace",
    "kind": "involved_object.kind",
    "type": "type",
    "reason": "reason",
    "reporting_component": "reporting_component",
}

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
_NS = 1_000_000_000


def sanitise_label_name(name: str) -> str:
    """Loki/Prometheus label name: ``[a-zA-Z_][a-zA-Z0-9_]*``; ``.``, ``/``, ``-`` and the like become
    ``_``; a leading digit gets a ``_`` prefix; a leading ``__`` (reserved) is collapsed to ``_``."""
    cleaned = _NAME_BAD.sub("_", name.strip())
    if not cleaned:
        raise ValueError(f"label name {name!r} is empty")
    if cleaned[0].isdigit():
        cleaned = "_" + cleaned
    if cleaned.startswith("__"):
        cleaned = "_" + cleaned.lstrip("_")
    if cleaned == "_" and name.strip() != "_":
        raise ValueError(f"label name {name!r} has no usable characters")
    return cleaned


Template = tuple[tuple[str, str], ...]
"""Parsed template: ("text", literal) and ("field", dotted path) parts."""


def parse_template(text: str) -> Template:
    """``literal {field.path} literal``; ``{{`` and ``}}`` are literal braces. Fields: TEMPLATE_FIELDS,
    ``labels.<key>`` and ``annotations.<key>`` (the Event's own metadata labels/annotations)."""
    parts: list[tuple[str, str]] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"invalid template {text!r}: {exc}") from None
    for literal, field_name, spec, conversion in parsed:
        if literal:
            parts.append(("text", literal))
        if field_name is None:
            continue
        if spec or conversion:
            raise ValueError(f"invalid template {text!r}: format specs and conversions are not supported")
        path = field_name.strip()
        if path not in TEMPLATE_FIELDS and not re.fullmatch(r"(labels|annotations)\.[^{}]+", path):
            known = ", ".join(sorted(TEMPLATE_FIELDS))
            raise ValueError(
                f"unknown field {{{path}}} in template {text!r}; known: {known}, labels.<key>, annotations.<key>"
            )
        parts.append(("field", path))
    return tuple(parts)


def _lookup(record: dict[str, Any], path: str) -> str:
    head, _, rest = path.partition(".")
    value: Any = record.get(head)
    if rest:
        value = value.get(rest) if isinstance(value, dict) else None
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def render_template(template: Template, record: dict[str, Any]) -> str:
    return "".join(value if kind == "text" else _lookup(record, value) for kind, value in template)


def _split_pairs(value: Any) -> Any:
    """``a=1,b=2`` (URL query) or ``["a=1", "b=2"]`` (repeated key) or a YAML mapping → dict."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"expected name=template, got {item!r}")
            name, _, template = item.partition("=")
            out[name.strip()] = template.strip()
        return out
    return value


def _fix_surrogates(value: Any) -> Any:
    """Lone UTF-16 surrogates (from a broken decoder) cannot be encoded as UTF-8: replace them with
    U+FFFD, keeping valid pairs."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {_fix_surrogates(k): _fix_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_surrogates(v) for v in value]
    return value


def _label_value(value: str) -> str:
    """A label value Loki parses. Loki reads a stream's labels with Prometheus' PromQL lexer
    (pkg/loghttp/push/push.go ``syntax.ParseLabels``), whose ``lexString`` refuses a literal U+FFFD
    (``case utf8.RuneError``, promql/parser/lex.go) and with it the whole push (400 "couldn't parse
    labels"). Go writes invalid UTF-8 as U+FFFD, and so does ``_fix_surrogates``: it becomes ``?``
    (the line keeps the value as it came). In both formats, so a stream is the same whichever."""
    value = _fix_surrogates(value)
    if "\ufffd" in value:
        value = value.replace("\ufffd", "?")
    data = value.encode("utf-8")
    if len(data) > MAX_LABEL_VALUE_BYTES:
        value = cut_utf8(data, MAX_LABEL_VALUE_BYTES).decode("utf-8")
    return value


_CREATION = b'"creationTimestamp":"'
"""Found in the object's compact JSON: ``metadata``'s, which the API server writes before ``labels``
and ``annotations`` (a quote inside a string is escaped, so no string value matches). Without parsing
the object, which costs ~10 times as much."""


def _by_stream(entries: Iterable[_Entry]) -> dict[bytes, list[_Entry]]:
    """Entries grouped by stream, streams in first-seen order (the order of a push)."""
    groups: dict[bytes, list[_Entry]] = {}
    for entry in entries:
        group = groups.get(entry.stream)
        if group is None:
            groups[entry.stream] = [entry]
        else:
            group.append(entry)
    return groups


class LokiOptions(SinkOptions):
    """Options of the ``loki`` sink (URL: Loki's base address, e.g. ``http://loki:3100``)."""

    format: Literal["protobuf", "json"] = Field(
        "protobuf", description="Push body: snappy-compressed protobuf (Loki's native) or JSON."
    )
    gzip: bool = Field(False, description="gzip the JSON body (format=json only).")
    line_format: Literal["json", "logfmt"] = Field(
        "json", description="Log line: the normalised record as JSON, or logfmt key=value pairs."
    )
    structured_metadata: bool = Field(
        False,
        description="Attach involved object name/uid, event uid and occurrence as structured metadata "
        "(Loki 3.x; queryable without being stream labels). A value over 1,024 bytes is cut there (the line "
        "keeps it whole) and counted as truncated.",
    )
    default_labels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LABELS),
        description="Which built-in labels to set: cluster, namespace, kind, type, reason, "
        "reporting_component (empty value: none).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels as name=template, comma separated: team=payments,app={labels.app}. "
        "Templates use {field} over the record (namespace, reason, involved_object.kind, labels.<key>...).",
    )
    allow_high_cardinality_labels: bool = Field(
        False,
        description="Allow label templates over per-object fields (object name/uid, event name/uid, "
        "message). Each distinct value creates a Loki stream; prefer structured_metadata.",
    )
    tenant: str | None = Field(
        None,
        validation_alias=AliasChoices("tenant", "orgid", "org_id", "tenant_id"),
        description="Loki tenant, sent as X-Scope-OrgID.",
    )
    username: str | None = Field(None, validation_alias=AliasChoices("username", "user"))
    password: Secret | None = Field(None, description="Basic-auth password (literal, env:NAME, file:/path).")
    bearer_token: Secret | None = Field(
        None, validation_alias=AliasChoices("bearer_token", "token"), description="Bearer token."
    )
    headers: Headers = Field(
        default_factory=dict, validation_alias=AliasChoices("headers", "header"), description=HEADERS_HELP
    )
    ca_file: FilePath | None = Field(None, description="PEM bundle to verify Loki's TLS certificate.")
    insecure_skip_verify: bool = Field(False, description="Do not verify Loki's TLS certificate.")
    # Finite (these and the three below): ``inf`` (or 1e309, read as inf) passed ``gt=0``, and start
    # failed on it with "OverflowError: cannot convert float infinity to integer" (aiohttp's timer,
    # int(seconds * 1e9)), retried for ever, naming no option.
    timeout: float = Field(10.0, gt=0, allow_inf_nan=False, description="Seconds one HTTP request may take.")
    max_line_bytes: int = Field(
        DEFAULT_MAX_LINE_BYTES,
        ge=1024,
        description="Longest log line in bytes (Loki's max_line_size, whose default 256KB Loki reads as "
        "262,144 bytes; 256,000 leaves a little to spare).",
    )
    oversize: Literal["truncate", "reject"] = Field(
        "truncate",
        description="Lines over max_line_bytes: truncate (marked) or reject to the dead-letter file.",
    )
    clamp_time: bool = Field(
        True,
        description="Entries whose event time Loki would refuse (outside now - max_age ... now + "
        "future_grace: a node's clock off, a very old event; or over max_behind behind their stream's "
        "newest: a replay) are stamped otherwise and marked time_adjusted (true), instead of being sent "
        "as they are for Loki to refuse (false). An event from a node whose clock was ahead of the API "
        "server's by more than future_grace less a minute (its first time after its creationTimestamp) "
        "is stamped at its time by the API server's clock (creationTimestamp + its time - its first "
        "time), the same on every delivery (a relist's too); any other, or if Loki would refuse that, "
        "at the time the router received it.",
    )
    max_age: float = Field(
        DEFAULT_MAX_AGE,
        gt=0,
        allow_inf_nan=False,
        description="Seconds: Loki's reject_old_samples_max_age (default 168h); older entries are refused.",
    )
    future_grace: float = Field(
        DEFAULT_FUTURE_GRACE,
        gt=0,
        allow_inf_nan=False,
        description="Seconds: Loki's creation_grace_period (default 10m); entries further ahead are refused.",
    )
    max_behind: float = Field(
        DEFAULT_MAX_BEHIND,
        gt=0,
        allow_inf_nan=False,
        description="Seconds: half Loki's max_chunk_age (default 2h); entries further behind the newest "
        "of their stream are refused.",
    )
    per_stream_rate: int = Field(
        DEFAULT_STREAM_RATE,
        ge=0,
        description="Bytes per second of lines (and structured metadata) pushed into one stream at most: "
        "Loki's per_stream_rate_limit (3MB, which Loki reads as 3 MiB). Loki refuses a stream over it (429) "
        "and answers a push for its last stream only, so a refused stream followed by a stored one would "
        "be lost unseen: entries over 95% of it wait instead (held back, not an attempt), and a stream near "
        "it is pushed last. Lowered for 10 min to what a refusal by Loki proves (the rate it names, a "
        "smaller burst). 0: no budget (Loki's answer is still read).",
    )
    per_stream_burst: int = Field(
        DEFAULT_STREAM_BURST,
        ge=0,
        description="Bytes one stream may take at once: Loki's per_stream_rate_limit_burst (15MB = 15 MiB).",
    )
    new_stream_pushes: bool = Field(
        True,
        description="Push each stream Loki may not hold yet (not taken from this sink in 20 min) last in "
        "a push of its own: Loki answers for a push's last stream only, and a stream refused for the "
        "active stream limit but followed by a stored one is answered 2xx, lost unseen. Costs one push "
        "per new stream (a relist with many streams: about a quarter of the throughput). false: one push "
        "per batch with the new streams last, where a refusal is unseen only while the tenant is at its "
        "stream limit and a stream Loki holds but this sink has not pushed since it started follows it.",
    )

    @field_validator("default_labels", mode="before")
    @classmethod
    def _split_defaults(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("default_labels")
    @classmethod
    def _known_defaults(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in DEFAULT_LABELS]
        if unknown:
            raise ValueError(f"unknown default label(s) {unknown}; choose from {', '.join(DEFAULT_LABELS)}")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        return _split_pairs(value)

    @field_validator("labels")
    @classmethod
    def _clean_labels(cls, value: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for raw_name, template in value.items():
            name = sanitise_label_name(raw_name)
            if len(name) > MAX_LABEL_NAME_BYTES:  # sanitised: ASCII
                # Not echoed: a name this long is most often a value pasted in the wrong place.
                raise ValueError(
                    f"a label name of {len(name)} bytes; Loki accepts at most {MAX_LABEL_NAME_BYTES} "
                    "(max_label_name_length)"
                )
            if name in out:
                raise ValueError(f"labels {raw_name!r} and another label both become {name!r}")
            parse_template(template)
            out[name] = template
        return out

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, Secret]) -> dict[str, Secret]:
        check_headers(value, reserved=("content-type", "content-encoding", "content-length"))
        return value

    def _headers_replace_nothing(self, url_user: bool) -> None:
        """A ``headers`` entry is set after the sink's own (any letter case): an ``X-Scope-OrgID`` one
        sent every entry to its tenant, not to ``tenant``'s (or, in another case, added a second line
        Loki ignores); an ``Authorization`` one replaced the credentials (401 for ever). Named by
        option, never by value, as the webhook does."""
        given = {name.lower() for name in self.headers}
        if "x-scope-orgid" in given and self.tenant:
            raise ValueError("headers: an X-Scope-OrgID header would replace tenant: set one of them")
        auth = "bearer_token" if self.bearer_token is not None else "basic auth"
        if "authorization" in given and (
            self.bearer_token is not None or self.username is not None or url_user
        ):
            raise ValueError(f"headers: an Authorization header would replace {auth}: set one of them")

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, value: str | None) -> str | None:
        # Loki checks X-Scope-OrgID with dskit's ValidTenantID and refuses every push otherwise; a CR
        # or LF fails every request before it is sent (aiohttp). Not echoed.
        if value and (  # empty: no tenant header
            len(value) > MAX_TENANT_CHARS or not _TENANT.fullmatch(value) or value in (".", "..")
        ):
            raise ValueError(
                f"Loki takes tenant IDs of up to {MAX_TENANT_CHARS} characters from a-z A-Z 0-9 ! - _ . * ' ( ) "
                f"(not '.' or '..'); this one has {len(value)} characters"
                + (", with a control character (a line break?)" if _CONTROL.search(value) else "")
            )
        return value

    @field_validator("bearer_token")
    @classmethod
    def _check_token(cls, value: Secret | None) -> Secret | None:
        if value is not None and _CONTROL.search(value.get_secret_value()):
            raise ValueError("contains a control character (a line break?), which no HTTP header can carry")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value:  # empty: _check names what is missing
            http_url(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> LokiOptions:
        if not self.url:
            raise ValueError("url is required: Loki's address, e.g. loki:http://loki:3100")
        parts = urlsplit(self.url)
        if self.gzip and self.format != "json":
            raise ValueError("gzip=true needs format=json (protobuf bodies are already snappy-compressed)")
        if (self.username is not None or self.password is not None) and parts.username is not None:
            # The options won and the url's pair was dropped without a word.
            raise ValueError(
                "username/password and user info in the url give basic auth twice: set one of them"
            )
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        if self.bearer_token is not None and (self.username is not None or parts.username):
            raise ValueError("use either username/password or bearer_token, not both")
        self._headers_replace_nothing(parts.username is not None)
        for name, template in self.labels.items():
            for kind, path in parse_template(template):
                if (
                    kind == "field"
                    and path in HIGH_CARDINALITY_FIELDS
                    and not self.allow_high_cardinality_labels
                ):
                    raise ValueError(
                        f"labels: {name}={template} uses {{{path}}}, which has a new value for every object or "
                        "event and would create unbounded Loki streams; use structured_metadata=true, or set "
                        "allow_high_cardinality_labels=true if you really want it"
                    )
        room = _METADATA_ROOM if self.structured_metadata else _ENTRY_ROOM
        if self.per_stream_rate and self.per_stream_burst < self.max_line_bytes + room:
            raise ValueError(
                f"per_stream_burst={self.per_stream_burst} is below max_line_bytes={self.max_line_bytes} "
                f"(+{room} for metadata): a stream could not take its largest entry"
            )
        names = {n for n in self.default_labels} | set(self.labels)
        if len(names) > MAX_LABELS:
            raise ValueError(
                f"labels: {len(names)} label names; Loki accepts at most {MAX_LABELS} per stream"
            )
        return self


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""Characters an HTTP header value cannot carry (a tab it can)."""
_TENANT = re.compile(r"[a-zA-Z0-9!\-_.*'()]+")


_RATE_LIMITED = re.compile(
    r"Ingestion rate limit exceeded for user [^\n]{0,256}? \(limit: (?P<limit>\d{1,20}) bytes/sec\) while "
    r"attempting to ingest '(?P<lines>\d{1,20})' lines totaling '(?P<bytes>\d{1,20})' bytes"
)
"""Bounded pieces only (a tenant id is at most 150 characters): with ``.*`` for the tenant, a search of
an answer repeating the sentence's start tried every rest of it from each (0.4 s on 128 K
characters, the event loop blocked). Each start now costs at most a few hundred steps."""
_STREAM_RATE_LIMITED = re.compile(
    r"Per stream rate limit exceeded \(limit: (?P<limit>\d+)(?P<unit>[KMGTPE]?B)/sec\)"
)
_BYTE_UNITS = {
    "B": 1,
    "KB": 1 << 10,
    "MB": 1 << 20,
    "GB": 1 << 30,
    "TB": 1 << 40,
    "PB": 1 << 50,
    "EB": 1 << 60,
}
"""Loki's ByteSize (c2h5oh/datasize) units: binary."""
_STREAM_LIMITED = re.compile(
    r"Maximum active stream limit exceeded when trying to create stream (?P<labels>\{.*\}), reduce the number",
    re.DOTALL,
)
_ANSWER_READ = 1 << 17
"""Characters of Loki's answer searched for what it says (the stream it names: up to 15 label values
of 2,048 bytes, each character escaped as up to 10, and its names); the rest is not read."""


_READY_BYTES = 64 * 1024
"""Bytes of ``/ready``'s answer read: "ready", or a page whose first 4,096 characters are looked at."""
_ANSWER_BYTES = 1 << 17
"""Bytes of a push's answer read, but a 400's or 429's: 2,000 characters are quoted, the first 128 K
searched (``_ANSWER_READ``)."""
_LONG_ANSWER_BYTES = 2 << 20
"""Bytes of a 400's or 429's answer read. The ingester's listing of refused entries is parsed whole,
to its last line (``_parse_behind``, ``_last_line``): at most max_returned_stream_errors (10 by
default) entries and the total, each quoting the stream at worst (15 labels and service_name, values
of 2,048 bytes, each byte escaped as up to 4): under 1.7 MB. A longer one is judged from its first
128 K, as other answers are. Read whole, a front's 256 MB page was held (with its copies) on every
retry."""


class _Answer(NamedTuple):
    """The start of an answer's body, decoded (``_read_answer``)."""

    text: str
    cut: bool
    """It had more (left unread: the connection is then closed, not reused)."""
    unreadable: str | None
    """Why the body could not be read (``text`` is then empty): the status alone decides."""


async def _read_answer(response: aiohttp.ClientResponse, limit: int, timeout: float) -> _Answer:
    """At most ``limit`` bytes of an answer, decoded as ``response.text`` does, within ``timeout``
    (the request's) when the body decides the outcome, else ``EXCERPT_WAIT`` (body_prefix's rule):
    a 2xx's (a front's page, or stored) and a 400's or 429's (the streams and entries Loki names)
    decide; the others' are only quoted. Never raises for the body: one that stalls after the head,
    is cut off or is not in its Content-Encoding was taken for no answer (a final 400 retried for
    ever, a 413 never halved, a 429's Retry-After lost); it is said in ``unreadable``, nothing of it
    parsed, and the status decides as for an answer naming no stream."""
    status = response.status
    decides = 200 <= status < 300 or status in (400, 429)
    body, cut, unreadable = await excerpt(response, limit, timeout if decides else min(EXCERPT_WAIT, timeout))
    if unreadable is not None:
        return _Answer("", False, unreadable)
    return _Answer(answer_text(body, charset_of(response.headers.get("Content-Type"))), cut, None)


def _unread_note(unreadable: str | None) -> str:
    """What a reason adds for an answer whose body could not be read."""
    return "" if unreadable is None else f" (its body unreadable: {unreadable})"


def _stream_limited(answer: str) -> re.Match[str] | None:
    """Loki 3.x's stream-limit answer naming the refused stream, found at its first sentence (one
    match from there: a search from every position of a long answer could take quadratic time)."""
    start = answer.find("Maximum active stream limit exceeded when trying to create stream {")
    return None if start == -1 else _STREAM_LIMITED.match(answer, start)


_STREAM_LIMITED_UNNAMED = re.compile(r"Maximum active stream limit exceeded(?! when trying to create stream)")
"""Loki 2.x's answer for the active stream limit (every 2.x release): it names no stream; 3.x's does
(grafana/loki#12437)."""
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*([,}])')
_GO_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)", re.DOTALL)
_GO_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _go_unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code[0] in "xuU" and len(code) > 1:
        return chr(int(code[1:], 16))
    if code[0] in "01234567" and len(code) == 3:
        return chr(int(code, 8))
    return _GO_SIMPLE.get(code, code)


def _parse_label_set(text: str) -> dict[str, str] | None:
    """``{a="b", c="d"}`` as Loki prints a stream (Go-quoted values) or as this sink writes it."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    if text[1:].strip() == "}":
        return {}
    out: dict[str, str] = {}
    pos = 1
    while True:
        match = _LABEL_PAIR.match(text, pos)
        if match is None:
            return None
        out[match.group(1)] = _GO_ESCAPE.sub(_go_unescape, match.group(2))
        pos = match.end()
        if match.group(3) == "}":
            return out if pos == len(text) else None


def _stream_label_set(stream: bytes) -> dict[str, str] | None:
    """The labels of an encoded ``StreamAdapter.labels`` field (tag, length varint, label string)."""
    start = 1
    while start < len(stream) and stream[start] & 0x80:
        start += 1
    return _parse_label_set(stream[start + 1 :].decode("utf-8", "replace"))


_IGNORED_BEHIND = re.compile(
    r"entry with timestamp (?P<ts>[^']+) ignored, reason: 'entry too far behind, entry timestamp is: [^',]+, "
    r"oldest acceptable timestamp is: (?P<cutoff>[^',]+)',"
)
_IGNORED_TOTAL = re.compile(
    r"user '[^\n]{0,256}?', total ignored: (?P<ignored>\d{1,20}) out of (?P<total>\d{1,20}) for stream: "
    r"(?P<labels>\{[^\n]*\})"
)
"""The ingester's last line of an answer listing refused entries; only ever matched whole against one
line (``fullmatch``). Searched over the whole body with ``.*`` twice, a hostile 429 of 128 K characters
repeating the line's start blocked the event loop for 156 s (cubic)."""
_IGNORED_LINE = re.compile(
    r"entry with timestamp (?P<ts>[^'\n]{1,64}) ignored, reason: '(?P<reason>[^\n]*)',"
)
"""One refused entry of the ingester's listing, whatever its reason (matched whole against one line)."""
_BEHIND_REASON = "entry too far behind"


def _parse_ignored(text: str) -> tuple[list[tuple[int, bool]], int, int] | None:
    """The ingester's listing of a stream's refused entries (pkg/ingester/stream.go
    ``errorForFailedEntries``): per listed entry its exact timestamp and whether it was refused as too
    far behind, then Loki's counts (ignored, out of). None when any line is something else."""
    lines = text.strip().split("\n")
    total = _IGNORED_TOTAL.fullmatch(lines[-1])
    if total is None:
        return None
    listed: list[tuple[int, bool]] = []
    for line in lines[:-1]:
        match = _IGNORED_LINE.fullmatch(line)
        ts = _parse_go_time(match["ts"]) if match is not None else None
        if match is None or ts is None:
            return None
        listed.append((ts, match["reason"].startswith(_BEHIND_REASON)))
    return listed, int(total["ignored"]), int(total["total"])


class _Watch:
    """This sink's pushes of a stream that Loki may have stored after a per-stream rate refusal left
    entries of it out of its listing (``_Kept``): those since, counted when they start whatever their
    answer (stored, refused, unknown, the send cut off), and those before whose outcome is unknown
    (Loki may store one later than it answers: a gateway's 504, a timeout). ``newest``: the newest
    entry of the stream any of them carried (None: none), so Loki's newest for it was raised by this
    sink since the refusal at most that far; ``prior``: the same before the last of them (``push``:
    that push's ``id``). A push refusing an entry behind Loki's newest is not counted for it: the
    entries it carries before that one (a stream's are pushed sorted by time) are older, and those
    after it come later."""

    __slots__ = ("__weakref__", "newest", "prior", "push")

    def __init__(self, newest: int | None) -> None:
        # From the start, this sink's pushes of the stream whose outcome is unknown: Loki may store
        # one later than it answers (a gateway's 504, a timeout), after the refusal.
        self.newest = self.prior = newest
        self.push = 0

    def pushed(self, ts_ns: int, push: int) -> None:
        self.prior, self.push = self.newest, push
        self.newest = ts_ns if self.newest is None else max(self.newest, ts_ns)

    def before(self, push: int) -> int | None:
        """The newest entry of the stream in the pushes counted, but for ``push`` if it was the last."""
        return self.prior if self.push == push else self.newest


def _unknown_bucket(stream: bytes) -> int:
    """The bucket of ``stream``'s floor (``_UNKNOWN_BUCKETS``): the same in every process."""
    return zlib.crc32(stream) & (_UNKNOWN_BUCKETS - 1)


class _Kept:
    """Entries of a stream that Loki left out of a per-stream rate 429's listing, when that answer
    cannot tell whether Loki limited the stream entry by entry or whole. Entry by entry (Loki 2.x,
    3.x with shard_streams off) it stored them: it lists every entry it refused. Whole (3.x's
    default) it stored nothing, and lists only the entries it refused for the rate: one left out is
    identical to the stream's last line (held already) or was too far behind its newest then
    (pkg/ingester/stream.go ``validateEntries`` replaces the listing with the rate-limited ones).

    ``stamps``: their distinct timestamps, sorted. Loki's newest for a stream never goes back, so an
    entry it found too far behind then is so at any later push: if two of them (at most one can be
    the last line) are at or after a later cutoff, Loki did not find them behind, so it limited the
    stream entry by entry and stored them all (``stored``).

    ``newest``: the newest entry of that push Loki may have stored with them (they and those whose
    fate its listing left open; never one it refused). Had the push stored one of them, e, Loki's
    newest before it was at most e + W (W: Loki's window, max_chunk_age/2, whatever ``max_behind``
    says; else e was refused as behind), and after it at most max(e + W, ``newest``), then raised
    by this sink's pushes of the stream since (``watch``) and nothing else: a later cutoff C refusing
    e (e < C) is at most max(e, ``newest`` - W, ``watch`` - W), so C after both ``newest`` and
    ``watch`` proves the push did not store it (``unstored``), whatever W is. ``_I64``: never proved
    so (also sent in a push whose outcome is unknown, or its mark in ``_sent`` forgotten)."""

    __slots__ = ("newest", "stamps", "watch")

    def __init__(self, stamps: list[int], newest: int, watch: _Watch) -> None:
        self.stamps = stamps
        self.newest = newest
        self.watch = watch

    def stored(self, bound_ns: int) -> bool:
        """Whether they were stored, given a later cutoff (``bound_ns``: the cutoff Loki names, plus
        the second it truncates)."""
        return len(self.stamps) > 1 and self.stamps[-2] >= bound_ns

    def unstored(self, cutoff_ns: int, push: int) -> bool:
        """Whether a later cutoff that refused one of them (``cutoff_ns``, as Loki prints it: whole
        seconds, at most its own) in push ``push`` proves the push they were left out of did not store
        it: no writer but this sink raised Loki's newest for the stream meanwhile."""
        if self.newest == _I64:
            return False
        mine = self.watch.before(push)
        return cutoff_ns > (self.newest if mine is None else max(self.newest, mine))


class _Bloom:
    """A Bloom filter of 2^21 bits (256 KiB), three per key; ``newest``: at least the timestamp of
    every entry whose key it holds."""

    __slots__ = ("bits", "count", "newest")

    _MASK = (1 << 21) - 1

    def __init__(self) -> None:
        self.bits = bytearray(1 << 18)
        self.count = 0
        self.newest = -_I64

    def add(self, key: int) -> None:
        bits, mask = self.bits, self._MASK
        for shift in (0, 21, 42):
            at = (key >> shift) & mask
            bits[at >> 3] |= 1 << (at & 7)
        self.count += 1

    def __contains__(self, key: int) -> bool:
        bits, mask = self.bits, self._MASK
        for shift in (0, 21, 42):
            at = (key >> shift) & mask
            if not bits[at >> 3] & (1 << (at & 7)):
                return False
        return True


class _Lost:
    """Keys of ``_sent`` marks forgotten (beyond _SENT_MAX) that were not "stored" (True): an entry
    perhaps stored whose mark is gone must not be taken for a new one (stamped anew when refused as
    too far behind: a second copy). Bloom filters in generations of ``LOAD`` keys (each holds a key
    it was never given about once in 2,600 when full), the oldest dropped once every entry it holds is
    older than Loki's time window (``add``'s ``expired_ns``): sent again, such an entry is predicted
    refused (``late``: rejected if Loki refuses it, never stamped anew) or stamped otherwise (another
    key), so its mark no longer matters. A key within the window is never forgotten: past
    ``GENERATIONS`` (2 MiB) the newest generation takes more than ``LOAD``, its false positives
    growing (each a counted dead letter "may be stored", never a second copy). The one filter before
    never forgot, so after an outage's 300,000 given-up entries 1 in 5 new entries refused as behind
    another writer's was dead-lettered (r306 F2); the engine's given-up entries no longer come here
    (``given_up``)."""

    __slots__ = ("generations", "marked")

    LOAD = 50_000
    GENERATIONS = 8

    def __init__(self) -> None:
        self.generations: list[_Bloom] = []
        self.marked = -_I64  # the newest entry given a mark not True so far: no key's is newer

    @property
    def count(self) -> int:
        return sum(generation.count for generation in self.generations)

    def add(self, key: int, expired_ns: float) -> None:
        """Hold ``key``, of an entry stamped ``marked`` at most. ``expired_ns``: an entry before it,
        sent again, is predicted refused (Loki's oldest, less a margin for the clock going back)."""
        generations = self.generations
        if not generations or generations[-1].count >= self.LOAD:
            generations[:] = [generation for generation in generations if generation.newest >= expired_ns]
            if len(generations) < self.GENERATIONS:
                generations.append(_Bloom())
        generation = generations[-1]
        generation.add(key)
        if self.marked > generation.newest:
            generation.newest = self.marked

    def __contains__(self, key: int) -> bool:
        return any(key in generation for generation in self.generations)


_GO_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))? ([+-])(\d\d)(\d\d)(?: \S+)?"
)


def _parse_go_time(text: str) -> int | None:
    """Nanoseconds of Go's ``time.Time.String()`` (``2006-01-02 15:04:05.999999999 -0700 MST``), how
    the ingester lists a refused entry's timestamp: exact to the nanosecond, in Loki's local zone."""
    match = _GO_TIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    offset = (int(match[9]) * 60 + int(match[10])) * 60
    seconds -= offset if match[8] == "+" else -offset
    return seconds * _NS + int((match[7] or "").ljust(9, "0"))


class _Behind:
    """One stream of Loki's "entry too far behind" answer: its labels as Loki names them, the
    latest cutoff listed (whole seconds, as Go's RFC3339 prints it), Loki's counts, and the exact
    timestamps of the refused entries it listed (the first ``max_returned_stream_errors``, 10 by
    default; None when one of them could not be read)."""

    __slots__ = ("cutoff_ns", "ignored", "labels", "listed", "total")

    def __init__(
        self, labels: dict[str, str], cutoff_ns: int, ignored: int, total: int, listed: list[int] | None
    ) -> None:
        self.labels = labels
        self.cutoff_ns = cutoff_ns
        self.ignored = ignored
        self.total = total
        self.listed = listed


def _parse_behind(text: str) -> list[_Behind] | None:
    """Loki's ingester answer for entries too far behind their stream's newest (pkg/ingester/
    stream.go): per stream up to max_returned_stream_errors lines ``entry with timestamp … ignored,
    reason: 'entry too far behind, entry timestamp is: …, oldest acceptable timestamp is: …',`` then
    ``user '…', total ignored: N out of M for stream: {…}``. None when any line is something else."""
    blocks: list[_Behind] = []
    cutoff: int | None = None
    listed: list[int] | None = []
    for line in text.strip().split("\n"):
        match = _IGNORED_BEHIND.fullmatch(line)
        if match is not None:
            try:
                when = datetime.fromisoformat(match["cutoff"])
            except ValueError:
                return None
            if when.tzinfo is None:
                return None
            seconds = int(when.timestamp())
            cutoff = max(cutoff, seconds * _NS) if cutoff is not None else seconds * _NS
            ts = _parse_go_time(match["ts"])
            listed = None if listed is None or ts is None else [*listed, ts]
            continue
        total = _IGNORED_TOTAL.fullmatch(line)
        labels = _parse_label_set(total["labels"]) if total is not None else None
        if total is None or labels is None or cutoff is None:
            return None
        blocks.append(_Behind(labels, cutoff, int(total["ignored"]), int(total["total"]), listed))
        cutoff, listed = None, []
    return blocks if blocks and cutoff is None else None


def _last_line(text: str) -> str:
    """The last line of an answer, at most _ANSWER_READ characters of it (a longer one names no stream
    this sink writes)."""
    return text[text.rfind("\n") + 1 :][-_ANSWER_READ:]


def _names_stream(loki: dict[str, str], stream: bytes) -> bool:
    """Whether Loki's label set is this encoded stream's: the same labels, plus at most those Loki's
    distributor adds (service_name, a stream shard)."""
    ours = _stream_label_set(stream)
    if ours is None or any(loki.get(name) != value for name, value in ours.items()):
        return False
    return all(name in ours or name in _ADDED_BY_LOKI for name in loki)


_ADDED_BY_LOKI = frozenset({"service_name", "__stream_shard__"})


def _stream_text(stream: bytes) -> str:
    """The label string of an encoded ``StreamAdapter.labels`` field, for messages."""
    start = 1
    while start < len(stream) and stream[start] & 0x80:
        start += 1
    return stream[start + 1 :].decode("utf-8", "replace")


def _spans(group: Sequence[_Entry], behind: int) -> bool:
    """Whether a stream's entries reach further apart than ``behind`` (max_behind, in ns)."""
    stamps = [entry.ts_ns for entry in group]
    return max(stamps) - min(stamps) > behind


def _weight(entries: Sequence[_Entry]) -> int:
    """What Loki's rate limiter counts of these entries (line and structured metadata bytes), or a
    little more (protobuf: the encoded metadata)."""
    total = sum([len(entry.line) for entry in entries])
    if entries and (entries[0].metadata or len(entries[0].parts) > 2):  # structured_metadata=true
        for entry in entries:
            if entry.metadata:
                total += sum(len(k.encode()) + len(v.encode()) for k, v in entry.metadata)
            elif len(entry.parts) > 2:
                total += len(entry.parts[2])
    return total


def _redact(url: str) -> str:
    """The URL without user info, query or fragment, and its token-like path segments masked as
    ``redact_url`` masks them for every other sink (a gateway keyed by a path token): where
    credentials hide. It is in every reason, log line and dead letter."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return redact_url(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    except ValueError:
        return "<invalid url>"


_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def _is_web_page(content_type: str, text: str) -> bool:
    """An HTML page: never Loki's answer (text/plain errors, an empty 204), often a front's (an
    auth proxy's sign-in page, an ingress's default site). Other bodies with a 2xx are taken as
    stored: a Loki-compatible receiver may answer 200 with a short text or JSON."""
    if content_type.partition(";")[0].strip().lower() in _HTML_TYPES:
        return True
    return text[:64].lstrip().lower().startswith(("<!doctype html", "<html"))


_ENTRY_REFUSED = re.compile(r"stream '\{|for stream: \{")
"""How Loki names the stream of an entry it refused: its distributor's checks of an entry or of its
stream's labels (pkg/validation/validate.go) print ``stream '{…}'``, its ingester ``for stream: {…}``."""
_DISALLOWED = "includes structured metadata, but this feature is disallowed"
"""Loki's answer when the tenant takes no structured metadata (Loki 2.9's default): every entry of a
sink with structured_metadata=true is refused."""
_INGESTER_REFUSED = "ignored, reason: '"
"""The ingester's listing of entries it refused (too far behind, out of order): Loki's distributor
answers the ingester's error instead of its own 400 when the ingester refused any entry."""


def _about_some_entries(content_type: str, answer: str) -> bool:
    """Whether a 400 is about some entries of a push, so that pushing it again in halves can keep the
    others: Loki named the stream of an entry it refused. Not a web page (a front's 400), a 400 that
    names no stream (a front's "400 Bad Request", a body Loki could not read: nothing stored), or
    structured metadata disallowed for the tenant (every entry refused): 32 more pushes a send to
    the same end."""
    if _is_web_page(content_type, answer) or _DISALLOWED in answer:
        return False
    return _ENTRY_REFUSED.search(answer) is not None


_BLOCKED_UNTIL = re.compile(r"ingestion blocked for user [^\n]{0,256}? until '([^'\n]{1,64})'")
"""Bounded as ``_RATE_LIMITED`` is: searched over the whole answer."""


def _blocked(status: int, text: str) -> bool:
    """A 2xx that stored nothing: Loki's blocked-ingestion code (260 unless configured otherwise)."""
    return status == 260 or "ingestion blocked" in text


def _blocked_for(text: str) -> float | None:
    """Seconds until the block named in Loki's message ends (``until '2026-12-05T22:00:00Z'``)."""
    match = _BLOCKED_UNTIL.search(text)
    if match is None:
        return None
    try:
        until = datetime.fromisoformat(match.group(1))
    except ValueError:
        return None
    if until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    return max(0.0, (until - datetime.now(UTC)).total_seconds())


_PLAIN_LABEL = re.compile(r'[^\x00-\x1f\x7f"\\]*')
_QUOTED: BoundedCache[str, str] = BoundedCache(4096)


def _quote_label_value(value: str) -> str:
    # Label values repeat (namespaces, reasons, kinds): quote each distinct value once.
    quoted = _QUOTED.get(value)
    if quoted is None:
        quoted = _QUOTED.put(value, _quote_slow(value))
    return quoted


def _quote_slow(value: str) -> str:
    # Escapes Loki's label parser (PromQL string rules) understands; raw newlines are not allowed there.
    if _PLAIN_LABEL.fullmatch(value):
        return '"' + value + '"'
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
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def labels_string(labels: Sequence[tuple[str, str]]) -> str:
    """``{a="b",c="d"}`` as Loki's protobuf StreamAdapter.labels expects."""
    return "{" + ",".join(f"{name}={_quote_label_value(value)}" for name, value in labels) + "}"


_LOGFMT_PLAIN = re.compile(r"[^\s=\"\\\x00-\x1f\x7f]+")


def _logfmt_value(value: str) -> str:
    if _LOGFMT_PLAIN.fullmatch(value):
        return value
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def logfmt_line(record: dict[str, Any], *, extra: Sequence[tuple[str, str]] = ()) -> str:
    involved = record.get("involved_object") or {}
    pairs: list[tuple[str, Any]] = [
        ("time", record.get("time")),
        ("cluster", record.get("cluster")),
        ("namespace", record.get("namespace")),
        ("type", record.get("type")),
        ("reason", record.get("reason")),
        ("kind", involved.get("kind")),
        ("object", involved.get("name")),
        ("field_path", involved.get("field_path")),
        ("occurrence", record.get("occurrence")),
        ("component", record.get("reporting_component")),
        ("host", record.get("reporting_instance")),
        ("uid", record.get("uid")),
        *extra,
        ("message", record.get("message")),
    ]
    return " ".join(
        f"{k}={_logfmt_value('' if v is None else str(v))}" for k, v in pairs if v not in (None, "")
    )


class _Entry:
    """One encoded entry. ``stream`` is the stream's encoded ``StreamAdapter.labels`` field (the grouping
    key, cached per label set); with protobuf, ``parts`` is the whole ``StreamAdapter.entries`` field
    (``size`` bytes) ready to join, and ``metadata`` is only kept for the JSON body."""

    __slots__ = (
        "index",
        "labels",
        "late",
        "line",
        "metadata",
        "modified",
        "parts",
        "size",
        "stream",
        "ts_ns",
    )

    def __init__(
        self,
        index: int,
        labels: tuple[tuple[str, str], ...],
        stream: bytes,
        ts_ns: int,
        line: bytes,
        metadata: Sequence[tuple[str, str]],
        parts: tuple[bytes, ...] = (),
        size: int = 0,
        *,
        late: bool = False,
        modified: int = 0,
    ) -> None:
        self.index = index
        self.late = late  # predicted refused for its time: pushed apart
        self.modified = modified  # _STAMPED | _TRUNCATED: how it differs from the event (see below)
        self.labels = labels
        self.stream = stream
        self.ts_ns = ts_ns
        self.line = line
        self.metadata = metadata
        self.parts = parts
        self.size = size


_BUDGETS_MAX = 1 << 14
"""Streams whose rate budget is kept; beyond it those with a full bucket are forgotten."""
_BUDGET_SHARE = 0.95
"""The share of per_stream_rate and per_stream_burst the budget plans with. Loki checks a stream's
bucket when the push reaches its ingester, later than the sink plans it and by a varying delay, and
some 3.x releases count structured metadata they add (``detected_level``, ~21 bytes an entry)."""
_RESERVE_SECONDS = 1.0
_RESERVE_SHARE = 0.1
"""A stream whose bucket a push leaves below max(_RESERVE_SHARE × burst, rate × _RESERVE_SECONDS)
(at most half the burst) is pushed last in a push of its own, where Loki's 429 for it is the answer."""
_UNCOUNTED = 32
"""Bytes an entry may weigh at Loki beyond what ``_weight`` counts (a ``detected_level`` pair)."""
_PROOF_SLACK = 0.1
"""Seconds by which Loki's view of a stream's idle time may fall short of this sink's (a push's
varying way to the ingester): a refusal proves Loki's burst lower only with that to spare."""
_LEARNED_FOR = 600.0
"""Seconds a per-stream limit learned from Loki is kept after its last proof; then the options again."""
_NEWEST_SLOTS = 1 << 14
"""Slots of the newest-per-stream table (2 × 128 KiB)."""
_WAYS = 8
"""Slots a stream may take (one bucket): streams sharing a slot no longer push each other out."""
_I64 = 1 << 63


class _NewestPerStream:
    """Per stream, the newest entry timestamp Loki accepted from this sink (a lower bound of Loki's).

    A table of two arrays, so no Python object per stream or per update: a dict kept one int per
    stream, made anew by each update, and those of a relist's last pushes sat among the relist's
    freed objects, keeping thousands of blocks (and so whole pymalloc arenas) alive after it. Set
    associative (a stream goes in one bucket of _WAYS slots): a direct-mapped table lost about one
    stream in ten of 3,000 to a shared slot, and the two then pushed each other out at every batch;
    as ``_taken`` that sent both as new streams each time (twice the pushes of a relist). A full
    bucket gives up its smallest value: the stalest stream's newest, the least recently taken. A
    stream forgotten only means fewer of its entries are predicted late, or one more push."""

    __slots__ = ("_hashes", "_mask", "_newest", "_ways", "used")

    def __init__(self, slots: int = _NEWEST_SLOTS) -> None:
        if slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self._ways = min(_WAYS, slots)
        self._mask = (slots - 1) & ~(self._ways - 1)  # the first slot of a bucket
        self._hashes = array("q", bytes(8 * slots))
        self._newest = array("q", bytes(8 * slots))
        self.used = False

    def get(self, stream: bytes) -> int | None:
        h = hash(stream)
        i = h & self._mask
        try:
            return self._newest[self._hashes.index(h, i, i + self._ways)]
        except ValueError:
            return None

    def update(self, stream: bytes, ts_ns: int) -> None:
        if not -_I64 <= ts_ns < _I64:
            return  # after 2262 (a hostile or broken event time): not kept, not predicted
        h = hash(stream)
        i = h & self._mask
        end = i + self._ways
        hashes, newest = self._hashes, self._newest
        try:
            j = hashes.index(h, i, end)
        except ValueError:
            try:  # a free slot (hash 0: no label string hashes to 0 in practice), else the smallest
                j = hashes.index(0, i, end)
            except ValueError:
                j = min(range(i, end), key=newest.__getitem__)
            hashes[j] = h
            newest[j] = ts_ns
        else:
            if ts_ns > newest[j]:
                newest[j] = ts_ns
        self.used = True


_ORDER = attrgetter("ts_ns", "index")
_STAMPED = 1
"""_Entry.modified: stamped otherwise than its own time (``"time_adjusted": true``): by the API server's
clock, or at its receipt."""
_TRUNCATED = 2
"""_Entry.modified: its message cut to fit max_line_bytes (``"truncated": true``), or a structured
metadata value cut to _METADATA_VALUE_BYTES (the line keeps it whole)."""
_MODIFIED_LOG_EVERY = 60.0
"""Seconds between two logs of the entries delivered changed (their counts add up meanwhile)."""
_TIME_ADJUSTED: dict[str, Any] = {"time_adjusted": True}
_CACHE_MAX = 4096
"""Entries per cache (label sets, timestamps); a full cache is cleared, not evicted piecemeal."""
_CACHE_LABELS_MAX = 1024
"""Longest cached label string, and longest value in a cached key (characters): a key holds each value
whole, one that is no label's (``type``, the fallback, when not a default label) too."""
_METADATA_FIELDS = ("involved_object_name", "involved_object_uid", "event_uid", "occurrence")
# Protobuf field tags (number << 3 | 2, length-delimited) of Loki's push.proto messages.
_TAG_STREAM = b"\x0a"  # PushRequest.streams = 1
_TAG_ENTRY = b"\x12"  # StreamAdapter.entries = 2 (labels = 1 is encoded whole, per label set)
_TAG_TIMESTAMP = b"\x0a"  # EntryAdapter.timestamp = 1
_TAG_LINE = b"\x12"  # EntryAdapter.line = 2
_TAG_METADATA = b"\x1a"  # EntryAdapter.structuredMetadata = 3, LabelPairAdapter{name = 1, value = 2}
_METADATA_NAMES = {name: bytes_field(1, name) + b"\x12" for name in _METADATA_FIELDS}


def _plain(key: Any) -> bool:
    """A key worth caching: str/None values only, each at most _CACHE_LABELS_MAX characters. The
    length bound is for a value in the key but in no label (``type`` when it is not a label, the
    fallback's field): a core/v1 Event's ``type`` is any string, and 4,096 keys of 1 MiB values were
    held until the cache filled."""
    if type(key) is tuple:
        return all(_plain(value) for value in key)
    return key is None or (type(key) is str and len(key) <= _CACHE_LABELS_MAX)


_SECONDS_LOW = [varint_field(1, 0x80 | low)[:2] for low in range(128)]
"""Timestamp.seconds tag and the first (continued) varint byte of seconds >= 128."""
_TIMESTAMP_TAGS = [_TAG_TIMESTAMP + varint(size) for size in range(128)]
_FIELD2: BoundedCache[int, bytes] = BoundedCache(_CACHE_MAX)
"""Tag and length varint by size of a field 2 (EntryAdapter.line, StreamAdapter.entries; sizes recur)."""


def _field2(size: int) -> bytes:
    return _FIELD2.put(size, _TAG_LINE + varint(size))


def _metadata_values(occurrence: Occurrence, record: dict[str, Any]) -> tuple[list[tuple[str, str]], bool]:
    """The entry's structured metadata, and whether a value was cut to _METADATA_VALUE_BYTES."""
    involved = record.get("involved_object") or {}
    out: list[tuple[str, str]] = []
    cut = False
    for name, value in (
        ("involved_object_name", involved.get("name")),
        ("involved_object_uid", involved.get("uid")),
        ("event_uid", occurrence.uid),
        ("occurrence", str(occurrence.number)),
    ):
        if value:
            text = value if type(value) is str else str(value)
            if len(text) > _METADATA_VALUE_CHARS:  # perhaps over the bytes: measured
                text, shortened = _cut_metadata_value(text)
                cut = cut or shortened
            out.append((name, text))
    return out, cut


_METADATA_VALUE_CHARS = _METADATA_VALUE_BYTES // 4
"""Characters a value may have without being measured: at most 4 bytes each in UTF-8."""


def _cut_metadata_value(value: str) -> tuple[str, bool]:
    """At most _METADATA_VALUE_BYTES bytes of UTF-8, not splitting a character (lone surrogates
    repaired first), and whether it was cut. Deterministic: a retried entry is identical."""
    value = _fix_surrogates(value)
    data = value.encode("utf-8")
    if len(data) <= _METADATA_VALUE_BYTES:
        return value, False
    return cut_utf8(data, _METADATA_VALUE_BYTES).decode("utf-8"), True


def _metadata_field(name: str, value: str) -> bytes:
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        data = _fix_surrogates(value).encode("utf-8")
    pair = _METADATA_NAMES[name] + varint(len(data))
    return _TAG_METADATA + varint(len(pair) + len(data)) + pair + data


class _Waiting(dict[tuple[str, int], tuple[int, int]]):
    """A stream's records aside in ``LokiSink._aside``, with the very bytes object it is keyed by:
    ``_aside_at`` indexes that one. An entry's own copy (the label cache misses over 1 KiB or 4,096
    label sets) cost 1,268 B a record in the index (r-g N2)."""

    __slots__ = ("stream",)

    def __init__(self, stream: bytes) -> None:
        super().__init__()
        self.stream = stream


class LokiSink(Sink[LokiOptions]):
    """Pushes occurrences to Grafana Loki, one log entry each, grouped into streams by labels."""

    options_model = LokiOptions
    description = "Grafana Loki (push API, snappy protobuf or JSON; tenant, auth, TLS)"
    wants_time_order = True  # entries over an hour behind their stream's newest are refused

    def __init__(self, options: LokiOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        parts = urlsplit(options.url)
        base_path = parts.path.rstrip("/")
        if base_path.endswith(PUSH_PATH):
            base_path = base_path[: -len(PUSH_PATH)]
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        self._base = urlunsplit((parts.scheme, netloc, base_path, "", ""))
        self._push_url = self._base + PUSH_PATH
        self._shown = _redact(options.url)
        self._templates = [(name, parse_template(t)) for name, t in options.labels.items()]
        self._defaults = [
            (name, DEFAULT_LABELS[name]) for name in options.default_labels if name not in options.labels
        ]
        # The label set depends only on the raw values of these record fields: top-level names, and
        # (head, keys) for dotted paths. Their values are the key of the label-set cache.
        paths = [path for _, path in self._defaults] + [
            path for _, template in self._templates for kind, path in template if kind == "field"
        ]
        top: list[str] = ["type"]  # the fallback label when every other value is empty
        nested: list[tuple[str, str]] = []
        for path in paths:
            head, _, rest = path.partition(".")
            if rest:
                if (head, rest) not in nested:
                    nested.append((head, rest))
            elif head not in top:
                top.append(head)
        self._key_top = itemgetter(*top)  # a normalised record has every top-level field
        self._key_nested = tuple(nested)
        self._label_cache: BoundedCache[tuple[Any, ...], tuple[tuple[tuple[str, str], ...], bytes]] = (
            BoundedCache(_CACHE_MAX)
        )
        self._seconds: BoundedCache[int, bytes] = BoundedCache(_CACHE_MAX)
        self._protobuf = options.format == "protobuf"
        self._fast_line = options.line_format == "json" and not options.include_raw
        self._max_line = options.max_line_bytes
        self._newest = _NewestPerStream()
        # Per stream, when (time.monotonic_ns) Loki last took entries of it from this sink: one it has
        # not taken within STREAM_KNOWN_FOR may be new to Loki, and is pushed where its refusal shows.
        self._taken = _NewestPerStream()
        self._known_ns = int(STREAM_KNOWN_FOR * _NS)
        self._max_age_ns = int(options.max_age * _NS)
        self._grace_ns = int(options.future_grace * _NS)
        self._behind_ns = int(options.max_behind * _NS)
        # How far ahead of the API server's clock an event's recorder may be (its first time after
        # its creation) before it is stamped by the API server's clock: Loki's grace less the margin.
        self._skew_ns = self._grace_ns - min(_CLOCK_MARGIN_NS, self._grace_ns // 4)
        # Loki's time window for the batch being encoded (set by send); open until then.
        self._oldest_ns: float = -math.inf
        self._newest_ns: float = math.inf
        self._ahead_ns: float = math.inf  # how far ahead of now it reaches (less the clock margin)
        self._late = False  # an entry of this batch is predicted refused for its time (and not clamped)
        # Entries delivered changed, by "time_adjusted" and "truncated": in total (``modified``) and
        # since the last log (logged at most every _MODIFIED_LOG_EVERY seconds, and at close).
        self._modified_batch = False  # an entry of the batch being encoded is changed
        self.modified: Counter[str] = Counter()
        self._modified_log = ModifiedLog(_MODIFIED_LOG_EVERY)
        # The tenant's ingestion rate (bytes/s) once Loki named it refusing a push over it: larger
        # pushes are split before they are sent.
        self._max_push_bytes: int | None = None
        # Loki's per-stream rate limit kept on this side: per stream, its bucket (bytes, when in
        # time.monotonic it was last planned or pushed) refilled at _stream_rate up to _stream_burst
        # (both times _BUDGET_SHARE), lowered while Loki's answers prove its limits lower than the
        # options (_learned_at: when last proved; None: the options).
        self._stream_rate = float(options.per_stream_rate)
        self._stream_burst = float(options.per_stream_burst)
        self._budgets: dict[bytes, tuple[float, float]] = {}
        self._learned_at: float | None = None
        # Since when this sink knows every push of a stream (its start, or when full budgets were
        # forgotten): a stream it has no record of was last pushed before then, if at all.
        self._known_since = time.monotonic()
        # Per stream planned by the send under way: (when, when it was planned before), and per
        # stream, when the last send that pushed it returned (Loki had checked its pushes by then):
        # how long Loki's bucket had to refill, for a refusal to prove Loki's burst lower.
        self._idle: dict[bytes, tuple[float, float]] = {}
        self._answered: dict[bytes, float] = {}
        # What the send under way learned, applied to the two tables above only when it returns: a
        # send cut off (send_timeout) is retried whole, and predicted as before it is byte-identical,
        # so Loki de-duplicates what its finished pushes stored instead of taking a re-stamped copy.
        self._stored: list[list[_Entry]] = []  # pushes Loki answered 2xx
        self._raised: list[tuple[bytes, int]] = []  # newest raised from Loki's "too far behind"
        self._deadline = math.inf  # time.monotonic() after which the send starts no further push
        self._unstarted: list[_Entry] = []  # entries of pushes the send under way had no time for
        self._splits_left = _SPLIT_PUSHES  # pushes the send under way may spend halving 400s
        # Entries (by hash of stream, timestamp, line) sent in a push whose outcome is unknown
        # (False: also pushed again after another stream's refusal, which Loki answered for that one
        # only), or that Loki stored if they reached its ingester (True: a push of a send cut off,
        # the rest of a stream Loki answered "too far behind" for), or stored unless Loki refused
        # their stream whole (_Kept). Loki refuses an identical entry behind its cutoff instead of
        # de-duplicating it (pkg/ingester/stream.go validateEntries), which must not be taken for a
        # refusal of a new entry and stamped anew (a second copy).
        self._sent: dict[int, bool | _Kept] = {}
        self._lost = _Lost()  # the keys of marks it forgot that were not True
        # Per stream, the _Watch of each _Kept mark alive (weakly: forgotten with its last mark), and
        # the newest entry sent in a push whose outcome is unknown (of any stream, once forgotten).
        self._watches: dict[bytes, weakref.WeakSet[_Watch]] = {}
        self._unknown: dict[bytes, int] = {}
        self._unknown_floors: dict[int, int] = {}  # by _unknown_bucket: the newest of those forgotten
        # The timestamp each of those entries was sent with, by (uid, number): sent again, an entry
        # keeps it whatever the clock says by then (at the window's old edge, or its stream's newest
        # raised meanwhile), so Loki de-duplicates it rather than keeping a copy stamped otherwise.
        # Forgotten, with the entry's _sent mark, once it is answered OK or rejected, or given up.
        self._chosen: dict[tuple[str, int], tuple[int, int]] = {}  # with the key of its _sent mark
        self._batch: Sequence[Occurrence] = ()  # the batch of the send under way
        # Per stream, the entries set aside (defer) for it: (uid, number) → (timestamp, expiry in
        # time.monotonic_ns). A newer entry of the stream that would put one of them over max_behind
        # behind Loki's newest waits aside too, so they go in first (see _hold_back).
        self._aside: dict[bytes, _Waiting] = {}
        # Each (uid, number) in _aside → the streams whose records hold it, kept in step with _aside
        # (_put_aside, _unindex), so given_up finds an entry's records without a scan: the engine
        # calls it once per occurrence dropped in an overload, and a scan of thousands of records
        # cost ~1 ms each time (r-b F3). One stream, or more once a reload changed the labels: each
        # the object _aside is keyed by (_Waiting.stream), not a copy.
        self._aside_at: dict[tuple[str, int], tuple[bytes, ...]] = {}
        self._deferring = False  # an outcome of the send under way is a defer
        self._metadata = options.structured_metadata
        self._headers = self._build_headers(parts.username, parts.password)
        # Ours, out of the answers quoted in reasons and logs: a gateway echoes the request it refused.
        auth = self._headers.get("Authorization", "")
        self._secrets = credentials(
            [s.get_secret_value() for s in (options.password, options.bearer_token) if s is not None]
            + [auth.partition(" ")[2]],  # the Basic token as sent (base64), or the bearer token
            sent=[auth, *(v.get_secret_value() for v in options.headers.values())],
            urls=[options.url],
        )
        self._push_headers = {"Content-Type": "application/x-protobuf"}
        if options.format == "json":
            self._push_headers = {"Content-Type": "application/json"}
            if options.gzip:
                self._push_headers["Content-Encoding"] = "gzip"
        self._session: aiohttp.ClientSession | None = None
        self._front_log = Throttled(self.log, _LOG_FRONT_EVERY)
        self._fronted = False  # the last push was answered by something before Loki (logged)
        self._push_shown = _redact(self._push_url)

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        """The engine gave these up (dead-lettered, ``retry_max_attempts`` spent, dropped): never pushed
        again, so their marks go (``_sent``, ``_chosen``). Kept, each one sent in a push of unknown
        outcome was forgotten into ``_Lost`` once 20,000 newer ones came, and after a long 5xx outage
        with ``retry_max_attempts`` its filter held so many that 1 new entry in 5 refused as too far
        behind another writer's was dead-lettered "may be stored" instead of stamped anew (r306 F2).
        Their records aside go too: kept, each held its stream's newer entries back for nothing, up
        to ``stream_hold`` and its Retry-After (r312 F1; the timed expiry stays for pipelines that
        do not call this). O(1) per occurrence (``_aside_at``): called once per occurrence dropped
        while the queue is full, a scan of the records aside cost ~1 ms a call (r-b F3)."""
        if self._aside:
            self._let_go(occurrences)
        chosen = self._chosen
        if not chosen:
            return
        sent = self._sent
        for occurrence in occurrences:
            kept = chosen.pop((occurrence.uid, occurrence.number), None)
            if kept is not None:
                sent.pop(kept[1], None)

    def _let_go(self, occurrences: Sequence[Occurrence]) -> None:
        """Drop the records aside (``_hold_back``) of occurrences the engine gave up: one look-up in
        ``_aside_at`` each, however many records wait aside."""
        at = self._aside_at
        for occurrence in occurrences:
            key = (occurrence.uid, occurrence.number)
            if key in at:
                self._let_go_key(key)

    def _let_go_key(self, key: tuple[str, int]) -> None:
        """Drop ``key``'s records aside under every stream the index names (it is in ``_aside_at``)."""
        aside = self._aside
        for stream in self._aside_at.pop(key):
            waiting = aside[stream]
            del waiting[key]
            if not waiting:
                del aside[stream]

    def _put_aside(self, stream: bytes, key: tuple[str, int], record: tuple[int, int]) -> None:
        """Note (or renew) the record aside of ``key`` for ``stream``, and index it."""
        waiting = self._aside.get(stream)
        if waiting is None:
            waiting = self._aside[stream] = _Waiting(stream)
        if key not in waiting:
            stream = waiting.stream  # the key's object: an entry's own copy kept no bytes alive
            streams = self._aside_at.get(key)
            self._aside_at[key] = (stream,) if streams is None else (*streams, stream)
        waiting[key] = record

    def _unindex(self, stream: bytes, key: tuple[str, int]) -> None:
        """``key``'s record for ``stream`` was taken out of ``_aside``: out of the index too."""
        streams = self._aside_at[key]
        if len(streams) == 1:
            del self._aside_at[key]
        else:
            self._aside_at[key] = tuple(other for other in streams if other != stream)

    def take_over(self, previous: Sink[LokiOptions]) -> None:
        """Each stream's newest accepted time carries over, so entries Loki would refuse as too far
        behind are still predicted (and clamped) after a credential change."""
        if isinstance(previous, LokiSink):
            self._newest = previous._newest
            self._taken = previous._taken
            self._max_push_bytes = previous._max_push_bytes
            self._budgets = previous._budgets
            if (previous.options.per_stream_rate, previous.options.per_stream_burst) == (
                self.options.per_stream_rate,
                self.options.per_stream_burst,
            ):  # what Loki taught it, unless the options changed
                self._stream_rate, self._stream_burst = previous._stream_rate, previous._stream_burst
                self._learned_at = previous._learned_at
            self._known_since = previous._known_since
            self._answered = previous._answered
            self._sent = previous._sent
            self._lost = previous._lost
            self._watches = previous._watches
            self._unknown, self._unknown_floors = previous._unknown, previous._unknown_floors
            self._chosen = previous._chosen
            self.modified = previous.modified
            self._modified_log = previous._modified_log
            self._aside, self._aside_at = previous._aside, previous._aside_at

    def _build_headers(self, url_user: str | None, url_password: str | None) -> dict[str, str]:
        opts = self.options
        headers = {"User-Agent": f"eventrouter/{__version__}"}
        if opts.tenant:
            headers["X-Scope-OrgID"] = opts.tenant
        if opts.username is not None:
            user: str | None = opts.username
            password = opts.password.get_secret_value() if opts.password is not None else ""
        else:  # credentials in the URL (percent-encoded there)
            user = unquote(url_user) if url_user is not None else None
            password = unquote(url_password or "")
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        elif opts.bearer_token is not None:
            headers["Authorization"] = f"Bearer {opts.bearer_token.get_secret_value()}"
        headers.update((name, value.get_secret_value()) for name, value in opts.headers.items())
        return headers

    def _ssl(self) -> ssl.SSLContext | None:
        if not self._base.startswith("https:"):
            return None
        try:
            context = ssl.create_default_context(cafile=self.options.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SinkError(f"loki: cannot load ca_file {self.options.ca_file!r}: {exc}") from None
        if self.options.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl() or True, limit=_PARALLEL_PUSHES)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.options.timeout),
                headers=self._headers,
            )
        return self._session

    async def start(self) -> None:
        """Reach ``/ready``: fail on connection errors and refused credentials; warn on anything else
        (Loki answers 503 while starting, gateways may not expose /ready)."""
        self.context.warn_if_outlasting(self.options.timeout, "timeout")
        # Not followed (see _push): a sign-in page's 200 behind it said "ready" for a Loki that
        # stores nothing, and an http -> https redirect for one whose every push is refused.
        status, location, content_type, body, text = await self._ask(
            "GET", self._base + "/ready", f"cannot reach {self._shown}"
        )
        if 300 <= status < 400:
            raise SinkError(
                f"loki: GET {self._shown}/ready answered {status} (Location: {self._location(location)}): "
                "a redirect, which the sink does not follow (a push would come back a GET, or go on to "
                "another host with its headers); give that URL"
            )
        if status != 204 and 200 <= status < 300 and _is_web_page(content_type, body):
            # An auth front's sign-in page or an ingress's default site, answering for every path:
            # not Loki, whose /ready answers "ready" (text/plain). Every push would be answered so.
            raise SinkError(
                f"loki: GET {self._shown}/ready answered {status} with a web page"
                f"{self._page(content_type, body)}, not Loki: something before it (an auth front's "
                "sign-in page, an ingress's default site) answers for it; give url Loki's address, and "
                "the credentials its front takes"
            )
        if status in (401, 403):
            raise SinkError(
                f"loki: {self._shown} refused our credentials ({status} {text!r}); check username/password, "
                "bearer_token, tenant and headers"
            )
        if status != 200:
            self.log.warning("loki: %s/ready answered %s %r; pushing anyway", self._shown, status, text)

    async def _ask(
        self, method: str, url: str, failing: str, **request: Any
    ) -> tuple[int, str | None, str, str, str]:
        """``start``'s and ``check``'s request, not followed: its status, Location, Content-Type and
        short body (as read and as quoted); a request that fails is a SinkError saying ``failing``."""
        session = self._ensure_session()
        try:
            async with session.request(method, url, allow_redirects=False, **request) as response:
                body, text = await self._read_short(response)
                headers = response.headers
                return response.status, headers.get("Location"), headers.get("Content-Type", ""), body, text
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"loki: {failing}: {scrub(_describe(exc), self._secrets)}") from None

    async def check(self) -> None:
        """``start``, then a push of one stream without entries, sent as every push is (URL, headers,
        format). ``/ready`` is served outside Loki's tenant and auth middleware, so a multi-tenant Loki
        without ``tenant`` (401 "no org id"), credentials only the push path checks, or a URL whose push
        path takes no push (404, 405: a read path, a gateway route without POST) passed the check and
        ``run`` retried every push for ever. Loki's distributor skips a stream without entries and
        answers a push left with none 204, storing nothing (2.x and 3.x; a push of no stream at all
        3.4+ answers 422). A refusal of the push path fails the check naming what to put right;
        anything else not 2xx (5xx, 429) is logged, as ``start`` does for ``/ready``."""
        await self.start()
        status, location, content_type, body, text = await self._ask(
            "POST",
            self._push_url,
            f"cannot push to {self._push_shown}",
            data=self._probe_body(),
            headers=self._push_headers,
        )
        refused = self._probe_refused(status, location, content_type, body, text)
        if refused is not None:
            raise SinkError(refused)
        if not 200 <= status < 300:
            self.log.warning(
                "loki: POST %s (a push of no entries) answered %s %r; pushing anyway",
                self._push_shown,
                status,
                text,
            )

    async def _read_short(self, response: aiohttp.ClientResponse) -> tuple[str, str]:
        """The body of ``/ready``'s or the probe's answer (none of a redirect's), and the text quoted of
        it: 200 characters without our credentials, or why it could not be read (its status decides)."""
        if 300 <= response.status < 400:
            return "", ""
        body, _, unreadable = await _read_answer(response, _READY_BYTES, self.options.timeout)
        if unreadable is not None:
            return "", f"its body unreadable: {unreadable}"
        return body, scrub(body[:200], self._secrets, partial=len(body) > 200).strip()

    def _probe_body(self) -> bytes:
        """``check``'s push: one stream (a label Loki parses, as it parses every stream's) and no entry."""
        labels = (("source", "eventrouter"),)
        if self.options.format == "json":
            body = orjson.dumps({"streams": [{"stream": dict(labels), "values": []}]})
            return gzip.compress(body, mtime=0) if self.options.gzip else body
        stream = bytes_field(1, labels_string(labels))  # StreamAdapter{labels=1}
        return bytes(cramjam.snappy.compress_raw(bytes_field(1, stream)))  # PushRequest{streams=1}

    def _probe_refused(
        self, status: int, location: str | None, content_type: str, body: str, text: str
    ) -> str | None:
        """Why every push of ``run`` would be refused, from the answer to ``check``'s push; None if not."""
        push = f"loki: POST {self._push_shown} (a push of no entries, as check sends)"
        if 300 <= status < 400:
            return (
                f"{push} answered {status} (Location: {self._location(location)}): a redirect, which the sink "
                "does not follow (a push would come back a GET, or go on to another host with its headers); "
                "give that URL"
            )
        if status != 204 and 200 <= status < 300 and _is_web_page(content_type, body):
            return (
                f"{push} answered {status} with a web page{self._page(content_type, body)}, not Loki: "
                "something before it answers for it; give url Loki's address, and the credentials its front takes"
            )
        if status == 401 and "org id" in text and not self.options.tenant:
            return f"{push} answered 401 {text!r}: this Loki is multi-tenant: set tenant=<org id>"
        if status in (401, 403):
            return (
                f"{push} answered {status} {text!r}: our credentials are refused; check username/password, "
                "bearer_token, tenant and headers"
            )
        if status in (404, 405):
            return (
                f"{push} answered {status} {text!r}, which Loki never answers to a push: nothing there takes Loki's "
                "pushes (a wrong host or path, a gateway or an ingress route that takes no POST, a Loki target "
                "without a distributor); give url Loki's address (e.g. http://loki:3100, or the base path a "
                "gateway forwards to Loki)"
            )
        return None

    def _location(self, location: str | None) -> str:
        """Where a redirect points, as logs may show it (``shown_location``, our credentials out)."""
        if not location:
            return "none"
        try:
            return shown_location(location, self._secrets)
        except ValueError:
            return "unparseable"

    def _page(self, content_type: str, body: str) -> str:
        """`` (text/html, "<title>")`` of a web page, as logs may show it (our credentials out)."""
        media = content_type.partition(";")[0].strip() or "no Content-Type"
        match = _TITLE.search(body, 0, 4096)
        title = " ".join(match[1].split())[:80] if match else ""
        return f" ({media}" + (f", {scrub(title, self._secrets)!r})" if title else ")")

    def _not_loki(
        self, key: str, reason: str, advice: str, retry_after: float | None = None
    ) -> RetryableError:
        """A push answered by something before Loki, or a wrong URL: about the URL, not the entries.
        Never taken as stored nor dead-lettered: retried (until the operator puts the URL right), and
        logged at once, then at most every _LOG_FRONT_EVERY seconds until a push is stored again."""
        self._fronted = True
        self._front_log.warning(key, "%s: %s; retrying until that is put right", reason, advice)
        return RetryableError(reason, retry_after=retry_after)

    def _redirected(self, status: int, location: str | None) -> RetryableError:
        """A push answered with a redirect (an ingress switched to force-ssl-redirect, an auth front
        sending to its sign-in page): never followed (see ``_push``)."""
        reason = (
            f"loki: {self._shown} answered {status}, a redirect to {self._location(location)} (not "
            "followed, nothing stored)"
        )
        return self._not_loki(
            "redirect",
            reason,
            "give url the address it points to (a push redirected would come back a GET, or go on to "
            "another host with its headers)",
        )

    def set_window(self, now_ns: int) -> None:
        """Loki's time window (max_age, future_grace) around ``now_ns``, for the entries encoded next."""
        self._oldest_ns = now_ns - self._max_age_ns + min(_CLOCK_MARGIN_NS, self._max_age_ns // 4)
        self._ahead_ns = self._grace_ns - min(_CLOCK_MARGIN_NS, self._grace_ns // 4)
        self._newest_ns = now_ns + self._ahead_ns

    @property
    def pushes_deadline(self) -> float:
        """Seconds into a send after which it starts no further push (beyond the first eight, which
        always go): its budget less one push's ``timeout`` (15 s by default), so a push started by
        then ends before the engine's send_timeout. A send of many pushes (a relist's batch of ~300
        new streams) so ends
        normally instead of being cut off with some pushes stored. The pushes not started are
        answered retry (held: not sent, no failure) and sent again in place, or aside (due at once)
        when the send set anything aside (``_unstarted_aside``)."""
        return max(0.0, self.context.send_budget - self.options.timeout)

    @property
    def stream_hold(self) -> float:
        """Seconds an entry set aside (``defer``) keeps its stream's much newer entries back after the
        sink last answered it: the longest the engine waits before offering it again (300 s by
        default). So an entry the engine gave up (retry_max_attempts) unheard (``given_up`` not
        called) holds its stream back this long at most, and the Retry-After it was answered with,
        capped there as the engine caps it."""
        return self.context.retry_wait_max

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        outcomes: list[Outcome] = [OK] * len(batch)
        entries: list[_Entry] = []
        self.set_window(time.time_ns())
        self._modified_batch = False
        for index, occurrence in enumerate(batch):
            try:
                entry = self._entry(index, occurrence)
            except Exception as exc:  # one bad item must never fail the batch
                outcomes[index] = reject(f"loki: cannot encode occurrence {occurrence.key}: {exc}")
                continue
            if isinstance(entry, Outcome):
                outcomes[index] = entry
            else:
                entries.append(entry)
        if not entries:
            self._late = False
            return outcomes
        self._stored, self._raised, self._deferring, self._unstarted = [], [], False, []
        self._deadline = time.monotonic() + self.pushes_deadline
        self._splits_left = _SPLIT_PUSHES
        self._batch = batch
        self._idle.clear()
        encoded = entries
        try:
            if self._aside:
                entries = self._hold_back(batch, entries, outcomes)
            await self._send_entries(entries, outcomes)
        except BaseException:
            # Cut off (send_timeout) or failed as a whole: the engine sends the batch again. What
            # Loki stored meanwhile is not applied to the prediction, so the retry is identical;
            # remembered, so Loki refusing an identical entry as too far behind is answered OK.
            self._remember([entry for push in self._stored for entry in push], stored=True)
            self._stored, self._raised = [], []
            raise
        finally:
            self._batch = ()
            if self._idle:
                self._answer_times()
        if self._unstarted:
            if self._deferring:
                self._unstarted_aside(outcomes)
            self._unstarted = []
        self._settle(batch, encoded, outcomes)
        if self._modified_batch:
            self._count_modified(encoded, outcomes)
        elif self._modified_log.unlogged:
            self._count_modified([], outcomes)  # counted before: logged once its period is over
        if self._chosen:
            chosen, sent = self._chosen, self._sent
            for entry in encoded:
                if outcomes[entry.index].kind is not OutcomeKind.RETRY:
                    occurrence = batch[entry.index]
                    kept = chosen.pop((occurrence.uid, occurrence.number), None)
                    if kept is not None:
                        sent.pop(kept[1], None)  # never pushed again: no longer a mark to forget (_Lost)
        return outcomes

    def _count_modified(self, entries: list[_Entry], outcomes: list[Outcome], *, flush: bool = False) -> None:
        """Count the entries Loki took changed (stamped otherwise than its own time, message truncated:
        the line says so; a structured metadata value cut: the line keeps it whole): nothing is
        lost, but only a query of Loki would show it. Logged with their counts, at most every
        _MODIFIED_LOG_EVERY seconds (``flush``: now, at close)."""
        found: Counter[str] = Counter()
        for entry in entries:
            if entry.modified and outcomes[entry.index].kind is OutcomeKind.OK:
                if entry.modified & _STAMPED:
                    found["time_adjusted"] += 1
                if entry.modified & _TRUNCATED:
                    found["truncated"] += 1
        due = self._modified_log.count(self.modified, found, flush=flush)
        if due is None:
            return
        unlogged, since = due
        self.log.warning(
            "loki: %s took %d entries stamped otherwise than their own time (a node clock ahead of the "
            "API server's: at the API server's time of the occurrence; outside Loki's window or over "
            "max_behind behind their stream's newest: at the time the router received them; the line "
            'keeps it in "time" and says "time_adjusted": true) and %d truncated (their message to '
            'max_line_bytes=%d: "truncated": true; or a structured metadata value to %d bytes, the line '
            "keeping it whole), since %s",
            self._shown,
            unlogged["time_adjusted"],
            unlogged["truncated"],
            self._max_line,
            _METADATA_VALUE_BYTES,
            since,
        )

    async def _send_entries(self, entries: list[_Entry], outcomes: list[Outcome]) -> None:
        # Loki refuses entries more than max_chunk_age/2 (1 h by default) behind the newest entry it
        # holds for their stream, and those outside its time window, and answers 400 for the whole push.
        # Entries this sink still expects to be refused (not clamped: clamp_time=false, or received too
        # long ago) go in a second push, so they do not dead-letter a whole push of good ones; if Loki's
        # limits are wider than expected it takes them.
        late: list[_Entry] = []
        if self._late:
            late = [entry for entry in entries if entry.late]
            entries = [entry for entry in entries if not entry.late]
            self._late = False
        if entries:
            await self._push_streams(entries, outcomes)
        if late:
            if entries and time.monotonic() >= self._deadline:
                self._not_started([late], outcomes)
                return
            try:
                # Each stream in a push of its own: Loki answers for a push's last stream only, so a
                # late entry it refused followed by another stream's it took was answered 2xx (lost).
                await self._push_streams(late, outcomes, alone=True)
            except RetryableError as exc:  # the on-time entries are stored: retry only these
                for entry in late:
                    outcomes[entry.index] = retry(str(exc), retry_after=exc.retry_after)

    def _settle(self, batch: Sequence[Occurrence], entries: list[_Entry], outcomes: list[Outcome]) -> None:
        """The send returned: what Loki stored raises each stream's newest and marks it taken, and
        the entries set aside (defer) for their stream are noted, those answered otherwise let go."""
        update = self._newest.update
        taken, now = self._taken.update, time.monotonic_ns()
        for push in self._stored:
            for entry in push:
                update(entry.stream, entry.ts_ns)
                taken(entry.stream, now)
        for stream, ts_ns in self._raised:
            update(stream, ts_ns)
            taken(stream, now)  # Loki holds the stream: it refused entries behind its newest
        self._stored, self._raised = [], []
        if not (self._deferring or self._aside):
            return
        at = self._aside_at
        clamp, newest, behind = self.options.clamp_time, self._newest.get, self._behind_ns
        for entry in entries:
            outcome = outcomes[entry.index]
            occurrence = batch[entry.index]
            key = (occurrence.uid, occurrence.number)
            ts_ns = entry.ts_ns
            if outcome.kind is OutcomeKind.RETRY and outcome.defer:
                # The timestamp it will be sent again with: stamped anew if now predicted too far
                # behind (Loki refused it so), as _entry does.
                top = newest(entry.stream)
                if clamp and top is not None and ts_ns < top - behind:
                    ts_ns = self._stamp(occurrence, top)[0]
                if top is None or ts_ns >= top - behind:
                    # Retry-After capped as the engine caps it (a front's wild value, an HTTP-date years
                    # ahead): uncapped, an entry the engine gave up held its stream's newer ones back,
                    # unseen, for as long as the header said.
                    wait = outcome.retry_after
                    wait = min(wait, self.context.retry_wait_max) if wait is not None and wait >= 0.0 else 0.0
                    hold = self.stream_hold + wait
                    self._put_aside(entry.stream, key, (ts_ns, now + int(hold * _NS)))
                    continue
                # Predicted refused even so: sent apart and judged alone, nothing to keep in order.
            # Answered otherwise: its records under every label set go (r-g N1). Kept under a set a
            # reload replaced, one stored under the new set held the old stream's entries back (a
            # reload back) until it expired.
            if key in at:
                self._let_go_key(key)

    def _hold_back(
        self, batch: Sequence[Occurrence], entries: list[_Entry], outcomes: list[Outcome]
    ) -> list[_Entry]:
        """The entries to push now. A stream's entries set aside (refused for the stream limit, or
        as too far behind) come back on their own backoff, and newer entries of that stream keep
        arriving: pushed first, those would make Loki's newest for the stream more than max_behind
        ahead of the ones waiting, which Loki then refuses (and the sink predicts late and
        dead-letters). So an entry over half max_behind newer than the oldest entry of its stream
        waiting aside (not in this batch) waits aside too, held (no attempt, nothing was sent), and
        comes back after _HOLD_AGAIN seconds. A record ends when its entry is answered otherwise or
        given up (``given_up``), or else ``stream_hold`` after its last answer."""
        now = time.monotonic_ns()
        for stream, waiting in list(self._aside.items()):
            for key in [key for key, (_, until) in waiting.items() if until < now]:
                del waiting[key]
                self._unindex(stream, key)
            if not waiting:
                del self._aside[stream]
        if not self._aside:
            return entries
        in_batch = {(occurrence.uid, occurrence.number) for occurrence in batch}
        floors: dict[bytes, int | None] = {}
        reason = ""
        kept: list[_Entry] = []
        for entry in entries:
            records = self._aside.get(entry.stream)
            if records is None:
                kept.append(entry)
                continue
            if entry.stream in floors:
                floor = floors[entry.stream]
            else:
                older = [ts for key, (ts, _) in records.items() if key not in in_batch]
                floor = floors[entry.stream] = min(older) if older else None
            if floor is None or entry.ts_ns <= floor + self._behind_ns // 2:
                kept.append(entry)
                continue
            if not reason:
                reason = (
                    f"loki: held back while older entries of its stream wait aside (refused by "
                    f"{self._shown}), so that they go in first"
                )
            outcomes[entry.index] = retry(reason, retry_after=_HOLD_AGAIN, held=True, defer=True)
            self._deferring = True
        return kept

    def _not_started(self, pushes: Sequence[list[_Entry]], outcomes: list[Outcome]) -> None:
        """Pushes the send did not start before its deadline: sent again by the engine (in place, or
        aside with what the send set aside: ``_unstarted_aside``)."""
        count = sum(len(push) for push in pushes)
        reason = (
            f"loki: not sent, the send had pushed for {self.pushes_deadline:g}s "
            f"({len(pushes)} pushes of {count} entries left for the next)"
        )
        for push in pushes:
            for entry in push:
                outcomes[entry.index] = retry(reason, held=True)
            self._unstarted += push

    def _unstarted_aside(self, outcomes: list[Outcome]) -> None:
        """The send set something aside (``defer``) and had no time for some pushes: those wait aside
        too, due at once (held: nothing was sent, no attempt). The engine retries a whole batch in
        place when any of it is: the stream set aside came back at the head of every resend, and
        what was never sent waited its doubling backoff behind it, or was dead-lettered with it at
        ``retry_max_attempts`` (webhook item 192's fault, here). Their order is kept: newer entries
        of their streams are held back behind them (``_hold_back``, the records ``_settle`` makes),
        and the engine sends an event's occurrences in order. Checked once the pool has ended: a
        worker gives up on its pushes before another's comes back set aside."""
        for entry in self._unstarted:
            outcome = outcomes[entry.index]
            if outcome.kind is OutcomeKind.RETRY and outcome.held and not outcome.defer:
                outcomes[entry.index] = retry(outcome.reason, retry_after=0.0, held=True, defer=True)

    def _remember(self, entries: Sequence[_Entry], *, stored: bool | _Kept, push: int = 0) -> None:
        """Note entries sent whose storing is unknown (``stored`` False: a push timed out, cut off,
        answered 5xx, or Loki's answer left it open), known (True) though the send did not say so, or
        to be told by a later cutoff (_Kept, from the rate refusal of the push whose ``id`` is
        ``push``)."""
        sent, chosen, batch = self._sent, self._chosen, self._batch
        if stored is not True and entries:
            newest = max(entry.ts_ns for entry in entries)
            if newest > self._lost.marked:
                self._lost.marked = newest  # what _Lost may be given of these is no newer
        for entry in entries:
            key = hash((entry.stream, entry.ts_ns, entry.line))
            if stored is True:
                sent[key] = True
            elif stored is False:
                self._unknown_push(entry)
                known = sent.get(key)
                if known is None:
                    sent[key] = False
                elif isinstance(known, _Kept) and known.newest != _I64:
                    # Perhaps stored by this push: never "not stored".
                    sent[key] = _Kept(known.stamps, _I64, known.watch)
            else:
                known = sent.get(key)
                if known is None:
                    # Its mark forgotten, it may have been sent in a push whose outcome is unknown.
                    sent[key] = _Kept(stored.stamps, _I64, stored.watch) if key in self._lost else stored
                elif known is not True:
                    # Sent before too: not stored is proved only if no such push stored it, nor this
                    # sink's pushes since the first (its watch) raised Loki's newest over the cutoff.
                    if known is False:
                        sent[key] = _Kept(stored.stamps, _I64, stored.watch)
                    else:
                        sent[key] = self._kept_again(known, stored, push)
            occurrence = batch[entry.index]
            chosen[occurrence.uid, occurrence.number] = entry.ts_ns, key
        unknown = self._unknown
        while len(unknown) > _UNKNOWN_STREAMS:
            stream = next(iter(unknown))
            top, bucket = unknown.pop(stream), _unknown_bucket(stream)
            floor = self._unknown_floors.get(bucket)
            if floor is None or top > floor:
                self._unknown_floors[bucket] = top
        while len(sent) > _SENT_MAX:
            key = next(iter(sent))
            if sent.pop(key) is not True:
                # Perhaps stored: never taken for a new entry (_behind_refused).
                self._lost.add(key, self._oldest_ns - _CLOCK_MARGIN_NS)
        while len(chosen) > _SENT_MAX:
            del chosen[next(iter(chosen))]

    @staticmethod
    def _kept_again(known: _Kept, stored: _Kept, push: int) -> _Kept:
        """An entry ``_Kept`` since an earlier rate refusal, left out of this one's too. Its old watch
        counted this push whole (its newest entry of the stream), but a rate refusal whose listing
        fits stored at most ``stored.newest`` of it: that bound replaces it, the old watch still counts
        the pushes before this one, the new watch those after. Kept whole, a second rate 429 in a row
        (Loki's bucket still short at the retry) made the proof need a cutoff after the stream's
        newest entries, and a never-stored entry was rejected "may be stored" (r306 F1)."""
        mine = known.watch.before(push)  # this push's own count left out only if it was the last
        newest = max(known.newest, stored.newest) if mine is None else max(known.newest, stored.newest, mine)
        return _Kept(stored.stamps, newest, stored.watch)

    def _watch(self, stream: bytes) -> _Watch:
        """A new watch of this sink's pushes of ``stream`` (``_Kept``), kept while a mark holds it."""
        watches = self._watches
        self._forget_watches()
        floor = self._unknown_floors.get(_unknown_bucket(stream)) if self._unknown_floors else None
        unknown = [ts for ts in (self._unknown.get(stream), floor) if ts is not None]
        watch = _Watch(max(unknown) if unknown else None)
        watches.setdefault(stream, weakref.WeakSet()).add(watch)
        return watch

    def _unknown_push(self, entry: _Entry) -> None:
        """An entry sent in a push whose outcome is unknown: its stream's newest such (``_Watch``)."""
        top = self._unknown.get(entry.stream)
        if top is None or entry.ts_ns > top:
            self._unknown[entry.stream] = entry.ts_ns

    def _forget_watches(self) -> bool:
        """Drop the streams whose watches are all gone (their marks answered or forgotten); whether any
        is left."""
        watches = self._watches
        for stream in [stream for stream, alive in watches.items() if not alive]:
            del watches[stream]
        return bool(watches)

    def _watch_push(self, entries: list[_Entry]) -> None:
        """A push starts: its newest entry of each watched stream is counted (``_Watch``)."""
        watches, push = self._watches, id(entries)
        if not self._forget_watches():
            return
        newest: dict[bytes, int] = {}
        for entry in entries:
            if entry.stream in watches:
                top = newest.get(entry.stream)
                if top is None or entry.ts_ns > top:
                    newest[entry.stream] = entry.ts_ns
        for stream, ts_ns in newest.items():
            for watch in watches[stream]:
                watch.pushed(ts_ns, push)

    def _share(self) -> tuple[float, float, float]:
        """The budget's rate and burst (a _BUDGET_SHARE of what Loki is taken to allow) and its
        reserve. A learned limit not proved again for _LEARNED_FOR seconds gives way to the options
        (Loki's limits may have been raised; if not, its next 429 proves them again)."""
        learned = self._learned_at
        if learned is not None and time.monotonic() - learned >= _LEARNED_FOR:
            self._learned_at = None
            self._stream_rate = float(self.options.per_stream_rate)
            self._stream_burst = float(self.options.per_stream_burst)
            self.log.info(
                "loki: %s refused no stream for its rate in %.0fs that proved its limits lower: back to "
                "per_stream_rate=%d and per_stream_burst=%d",
                self._shown,
                _LEARNED_FOR,
                self.options.per_stream_rate,
                self.options.per_stream_burst,
            )
        rate, burst = self._stream_rate * _BUDGET_SHARE, self._stream_burst * _BUDGET_SHARE
        return rate, burst, min(max(burst * _RESERVE_SHARE, rate * _RESERVE_SECONDS), burst / 2)

    def _over_budget(
        self, groups: dict[bytes, list[_Entry]], outcomes: list[Outcome]
    ) -> tuple[bool, set[bytes]]:
        """Hold back what Loki's per-stream rate limit would refuse. Loki's ingester refuses a stream
        whose entries in a push do not fit its token bucket (pkg/ingester/stream.go validateEntries;
        whole, with shard_streams on), 429, and answers a push for its last stream only, so a stream
        refused before a stored one is answered 2xx: lost unseen, whichever place it has. Each stream
        is kept within a bucket of _BUDGET_SHARE of Loki's (per_stream_rate, per_stream_burst), per
        push and stream, not per entry; the oldest go first, the rest wait (held, defer: no attempt,
        no other stream held up) until the bucket has refilled.

        The copy cannot be exact: Loki checks when the push reaches its ingester, a varying delay
        after this plan, and may count more (detected_level). So a stream held back in part, or
        left below the reserve by this push, is returned to be pushed last in a push of its own,
        where Loki's 429 for it is the answer (``_stream_refused``). Also returned: whether any was
        held."""
        rate, burst, reserve = self._share()
        now = time.monotonic()
        budgets, idle = self._budgets, self._idle
        held = False
        tight: set[bytes] = set()
        for stream, group in list(groups.items()):
            weight = _weight(group)
            last = budgets.get(stream)
            if last is None:
                tokens = burst
                idle[stream] = (now, self._known_since)
            else:
                tokens = min(burst, last[0] + (now - last[1]) * rate)
                idle[stream] = (now, last[1])
            if weight <= tokens:
                budgets[stream] = (tokens - weight, now)
                if tokens - weight < reserve:
                    tight.add(stream)
                continue
            group.sort(key=_ORDER)
            fit = 0
            for entry in group:
                size = _weight((entry,))
                if size > tokens and (fit or tokens < burst):
                    break  # (an entry over the burst on its own goes when the bucket is full)
                tokens = max(0.0, tokens - size)
                fit += 1
            if fit:  # (none: as it was, so it still says when the stream was last pushed)
                budgets[stream] = (tokens, now)
            waiting = group[fit:]
            wait = max(0.1, (min(float(_weight(waiting)), burst) - tokens) / rate)
            reason = (
                f"loki: held back {len(waiting)} entries of stream {_stream_text(stream)}: over "
                f"{self._stream_rate:.0f} bytes/s (per_stream_rate, Loki's per_stream_rate_limit), which "
                f"Loki would refuse the stream for; sent in {wait:.1f}s"
            )
            for entry in waiting:
                outcomes[entry.index] = retry(reason, retry_after=wait, held=True, defer=True)
            if fit:
                del group[fit:]
                tight.add(stream)
            else:
                del groups[stream]
            held = True
        if held:
            self._deferring = True
        if len(budgets) > _BUDGETS_MAX:  # forget the full ones: a stream not in the table is full
            for stream, (tokens, at) in list(budgets.items()):
                if tokens + (now - at) * rate >= burst:
                    del budgets[stream]
            if len(budgets) > _BUDGETS_MAX:
                budgets.clear()
            self._known_since = now  # when those were last pushed is forgotten
        return held, tight

    def _answer_times(self) -> None:
        """The send returned: Loki has checked every push of it (or never will), so each stream it
        planned had its bucket there refilling since at the latest now."""
        now, answered = time.monotonic(), self._answered
        for stream in self._idle:
            answered[stream] = now
        if len(answered) > _BUDGETS_MAX:
            answered.clear()
            self._known_since = now  # a stream not in it was last pushed before now, if at all

    def _again(
        self, entries: list[_Entry], outcomes: list[Outcome], *, cause: str = "another stream of their push"
    ) -> list[_Entry]:
        """Of entries to push again at once (Loki refused another stream of their push and answered
        for that one only), those their stream's budget takes a second time. Loki may hold them
        already, but charges its per-stream bucket before it de-duplicates: pushed again regardless,
        a stream would be refused for its rate and its stored entries retried as failures. A stream
        that does not fit, or would be left below the reserve while not the push's last, waits: held
        (no attempt), sent once its bucket has refilled (Loki keeps one copy)."""
        if not self._stream_rate:
            return entries
        rate, burst, reserve = self._share()
        now = time.monotonic()
        budgets = self._budgets
        groups = _by_stream(entries)
        final = next(reversed(groups))
        kept: set[bytes] = set()
        for stream, group in groups.items():
            weight = _weight(group)
            tokens, at = budgets.get(stream) or (burst, self._known_since)
            tokens = min(burst, tokens + (now - at) * rate)
            self._idle[stream] = (now, at)
            if weight + (0.0 if stream == final else reserve) <= tokens:
                budgets[stream] = (tokens - weight, now)
                kept.add(stream)
                continue
            wait = max(0.1, (min(float(weight), burst) - tokens) / rate)
            reason = (
                f"loki: held back {len(group)} entries of stream {_stream_text(stream)}: {self._shown} "
                f"refused {cause}, and may hold them; pushed again at once they "
                f"would be charged to its per-stream rate limit twice (per_stream_rate); sent in {wait:.1f}s"
            )
            for entry in group:
                outcomes[entry.index] = retry(reason, retry_after=wait, held=True, defer=True)
            self._deferring = True
        if len(kept) == len(groups):
            return entries
        return [entry for entry in entries if entry.stream in kept]

    def _plan(self, entries: list[_Entry], outcomes: list[Outcome]) -> list[list[_Entry]]:
        """The pushes for these entries. Loki's ingester answers for the last stream of a push only
        (pkg/ingester/instance.go ``Push``: ``_, appendErr = s.Push(...)`` per stream, so a later
        stream's success overwrites an earlier one's error): a new stream refused for the active
        stream limit, followed by a stream Loki stored, is answered 2xx and would be lost unseen. So
        a stream Loki has not taken from this sink within STREAM_KNOWN_FOR goes last in its push, one
        such stream per push; streams it took recently (Loki creates none of them) go before it.
        Entries over their stream's rate budget are held back (``_over_budget``), and a stream at
        its budget's edge goes last in a push of its own too (after the new ones).

        A stream whose entries here span over max_behind (a relist after a watch gap, a replay) is a
        push's last stream or alone in a push: after another stream's refusal the rest of a push is
        pushed again at once, and Loki refuses, rather than de-duplicates, the older entries of such a
        stream then (behind the newest the first push stored); they were taken for new ones and
        stamped anew: a second copy. With one ingester (Loki answers for the last stream) its push is
        never pushed again for another stream's sake. A distributed Loki answers for the first
        stream whose ingesters failed, so it may be: its entries that far behind are then remembered
        as perhaps stored (``_unseen``), rejected if refused as too far behind, never stamped anew.
        Cost: one push per spanning stream (K of them: K pushes where the batch has no new or tight
        stream, the first last in the push of the others; K more otherwise), whether or not any
        stream is refused: a batch of 300 known streams each spanning over max_behind takes 300
        pushes instead of 1."""
        groups = _by_stream(entries)
        tight: set[bytes] = set()
        if self._stream_rate:
            held, tight = self._over_budget(groups, outcomes)
            if held:
                entries = [entry for group in groups.values() for entry in group]
                if not entries:
                    return []
        if len(groups) == 1:
            return [entries]
        since = time.monotonic_ns() - self._known_ns
        taken = self._taken.get if self._taken.used else None
        behind = self._behind_ns
        spread = _spans(entries, behind)  # no stream of the batch spans more than the batch (once)
        known: list[_Entry] = []
        new: list[list[_Entry]] = []
        last: list[list[_Entry]] = []
        apart: list[list[_Entry]] = []  # streams spanning over max_behind: last in a push
        for stream, group in groups.items():
            if tight and stream in tight:
                last.append(group)
                continue
            if spread and len(group) > 1 and _spans(group, behind):
                apart.append(group)
                continue
            at = taken(stream) if taken is not None else None
            if at is not None and at >= since:
                known += group
            else:
                new.append(group)
        if not new and not last:
            if not apart:
                return [entries]
            return [known + apart[0], *apart[1:]]
        if self.options.new_stream_pushes:
            last = new + last
        elif new:
            known += [entry for group in new for entry in group]  # new streams last of the first push
            return [known, *last, *apart]
        return [known + last[0], *last[1:], *apart]

    async def _push_streams(
        self, entries: list[_Entry], outcomes: list[Outcome], *, alone: bool = False
    ) -> None:
        """Push ``entries`` as ``_plan`` says (``alone``: each stream in a push of its own). One push
        raises RetryableError as ``_push`` does; of several (independent: each stream is in one), a
        few go at once, and when Loki fails as a whole (5xx, the tenant's rate, unreachable) that
        push's items and those of pushes not sent yet are retried, while what the others stored is
        not sent again."""
        pushes = self._plan(entries, outcomes)
        if alone:
            pushes = [group for push in pushes for group in _by_stream(push).values()]
        await self._push_all(pushes, outcomes)

    async def _push_all(self, pushes: list[list[_Entry]], outcomes: list[Outcome]) -> None:
        """Send these pushes, a few at once (see ``_push_streams``)."""
        if not pushes:
            return
        if len(pushes) == 1:
            await self._push(pushes[0], outcomes)
            return
        # A pool, not waves: a wave waited for its slowest push before the next began, and a relist's
        # first batches (nearly every stream new: a push each) spent most of their time so.
        todo = iter(pushes)
        started = 0
        answered = False  # a push that did not fail as a whole (stored, or its items rejected)
        failed: RetryableError | None = None

        async def worker() -> None:
            nonlocal started, answered, failed
            for push in todo:
                if failed is not None or (started >= _PARALLEL_PUSHES and time.monotonic() >= self._deadline):
                    rest = [push, *todo]
                    if failed is None:
                        self._not_started(rest, outcomes)
                    else:
                        self._not_sent(rest, outcomes, failed)
                    return
                started += 1
                try:
                    await self._push(push, outcomes)
                except RetryableError as exc:
                    failed = exc
                    self._not_sent([push], outcomes, exc)
                else:
                    answered = True

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(_PARALLEL_PUSHES, len(pushes))):
                    group.create_task(worker())
        except BaseExceptionGroup as errors:  # a bug, not Loki's answer: raised as it is, not wrapped
            raise errors.exceptions[0] from None
        if failed is not None and not answered:
            raise failed  # nothing stored: the whole batch, as one push would

    @staticmethod
    def _not_sent(pushes: Sequence[list[_Entry]], outcomes: list[Outcome], failed: RetryableError) -> None:
        """Pushes that failed, or not started after one failed (Loki failing as a whole: 5xx, the
        tenant's rate, unreachable): retried, while what the others stored is not sent again."""
        for push in pushes:
            for entry in push:
                outcomes[entry.index] = retry(failed.reason, retry_after=failed.retry_after)

    async def _push(self, entries: list[_Entry], outcomes: list[Outcome]) -> None:
        """POST one push; 200/204 leave ``outcomes`` OK, a final 4xx rejects every item of this push.
        RetryableError only when nothing of it is known stored: a push split in parts marks the
        items of a part that failed after another was stored for retry instead."""
        cap = self._max_push_bytes
        if cap is not None and len(entries) > 1 and _weight(entries) > cap:
            await self._push_halves(entries, outcomes)  # Loki would refuse it whole: see below
            return
        if self._watches:
            self._watch_push(entries)
        body = self.encode(entries)
        session = self._ensure_session()
        try:
            # Redirects are not followed: aiohttp turned a POST answered 301/302 into a GET (Loki's
            # 405: every entry dead-lettered) or into a sign-in page's 200 (taken as stored: lost),
            # and re-sent a 307/308's body and our custom headers to wherever Location pointed.
            async with session.post(
                self._push_url, data=body, headers=self._push_headers, allow_redirects=False
            ) as response:
                status = response.status
                if 300 <= status < 400:
                    raise self._redirected(status, response.headers.get("Location"))
                retry_after = _retry_after(response.headers.get("Retry-After"))
                content_type = response.headers.get("Content-Type", "")
                limit = _LONG_ANSWER_BYTES if status in (400, 429) else _ANSWER_BYTES
                # Never raises for the body: taken for no answer, it threw the status away.
                text, cut, unreadable = await _read_answer(response, limit, self.options.timeout)
                text = text.strip()
        except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
            raise RetryableError(
                f"loki: cannot reach {self._shown}: {scrub(_describe(exc), self._secrets)}"
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._remember(entries, stored=False)  # sent, perhaps stored: no answer
            raise RetryableError(
                f"loki: cannot reach {self._shown}: {scrub(_describe(exc), self._secrets)}"
            ) from None
        except asyncio.CancelledError:
            self._remember(entries, stored=False)  # the send was cut off with this push under way
            raise
        if status != 204 and 200 <= status < 300 and _is_web_page(content_type, text):
            # Loki answers a stored push 204 without a body; a front answering for it (an auth
            # proxy's sign-in page, an ingress's default site) 200 with a page: nothing stored.
            raise self._not_loki(
                "web page",
                f"loki: {self._shown} answered {status} with a web page{self._page(content_type, text)}, "
                "not Loki (nothing stored)",
                "something before Loki (an auth front's sign-in page, an ingress's default site) answers "
                "for it; give url Loki's address, and the credentials its front takes",
            )
        if unreadable is not None and 200 <= status < 300:
            # Loki answers a stored push 204 without a body: one with a body lost on the way (a
            # front's 200, Loki's 260 of a block) may or may not have stored it. Pushed again: Loki
            # keeps one copy of an identical entry, and those perhaps stored far behind are not
            # stamped anew (_remember).
            self._remember(entries, stored=False)
            raise RetryableError(
                f"loki: {self._shown} answered {status} but its body could not be read ({unreadable}): "
                "whether the push was stored is unknown; pushed again",
                retry_after=retry_after,
            )
        if status in (200, 204) or (200 <= status < 300 and not _blocked(status, text)):
            if self._fronted:  # a run of answers from a front is over: the next one is logged at once
                self._fronted = False
                self._front_log = Throttled(self.log, _LOG_FRONT_EVERY)
            self._stored.append(entries)  # applied to the prediction when the send returns
            if self._sent:  # stored now: answered OK, or remembered stored if the send is cut off
                sent = self._sent
                for entry in entries:
                    sent.pop(hash((entry.stream, entry.ts_ns, entry.line)), None)
            return
        if status == 413 and len(entries) > 1:
            # A body limit below this push (a proxy's: nginx's client_max_body_size is 1m by default):
            # halve it, so only an entry too large on its own is refused.
            await self._push_halves(entries, outcomes)
            return
        # Loki's own answers are read from ``answer``: a stream it names may be 15 labels of up to
        # 2,048 bytes each, escaped (before, the first 2,000 characters were read, and a stream limit
        # naming a stream longer than that was retried in place, every stream of the sink held up).
        # ``message``, the first 2,000 characters, is quoted, without our credentials.
        answer = text[:_ANSWER_READ] or (response.reason or "")
        message = scrub(answer[:2000], self._secrets, partial=len(text) > 2000) + _unread_note(unreadable)
        if 200 <= status < 300:
            # Ingestion blocked by the operator (limits_config.block_ingestion_until): Loki discarded
            # the push and answers 260 by default, a 2xx. Not stored: retried, at the earliest when
            # the block ends.
            raise RetryableError(
                f"loki: {self._shown} answered {status}, nothing stored: {message}",
                retry_after=retry_after if retry_after is not None else _blocked_for(answer),
            )
        if status == 429:
            rate = _RATE_LIMITED.search(answer)
            if rate is not None and len(entries) > 1 and int(rate["bytes"]) > int(rate["limit"]):
                # The tenant's ingestion rate limit (a token bucket of ingestion_burst_size_mb, 6 MiB,
                # refilled at the named ingestion_rate_mb, 4 MiB/s): a push larger than the bucket is
                # refused whole, for ever. From now on pushes stay within the named rate.
                limit = int(rate["limit"])
                if self._max_push_bytes != limit:
                    self.log.warning(
                        "loki: %s limits this tenant's ingestion to %d bytes/s; a push of %s bytes was "
                        "refused, pushes are now split to at most %d bytes of lines",
                        self._shown,
                        limit,
                        rate["bytes"],
                        limit,
                    )
                    self._max_push_bytes = limit
                await self._push_halves(entries, outcomes)
                return
            named = _stream_limited(answer)
            if named is not None and await self._stream_refused(
                entries,
                outcomes,
                named["labels"],
                f"loki: {self._shown} answered 429: {message}",
                retry_after,
            ):
                return
            if named is None and _STREAM_LIMITED_UNNAMED.search(answer) is not None:
                await self._unnamed_stream_refused(
                    entries, outcomes, f"loki: {self._shown} answered 429: {message}", retry_after
                )
                return
            # The per-stream rate limit: the stream is named on the answer's last line, which the
            # entries listed before it (up to 10, each quoting the stream) can put past ``answer``.
            limited = _STREAM_RATE_LIMITED.search(answer)
            # Cut, its last line is not the answer's: nothing to match.
            total = _IGNORED_TOTAL.fullmatch(_last_line(text)) if limited is not None and not cut else None
            if (
                limited is not None
                and total is not None
                and await self._stream_refused(
                    entries,
                    outcomes,
                    total["labels"],
                    f"loki: {self._shown} answered 429: {message}",
                    retry_after,
                    rate_limit=int(limited["limit"]) * _BYTE_UNITS[limited["unit"]],
                    listing=text,
                )
            ):
                return
        if status in (404, 405):
            # Loki takes POST at its push path: never 404 nor 405 there. Those come from what is
            # before it, or from a URL that is not Loki's (a wrong path, a read-only gateway, a Loki
            # target without a distributor): the operator's to put right, the entries are fine.
            raise self._not_loki(
                str(status),
                f"loki: POST {self._push_shown} answered {status}, not Loki's answer to a push (nothing "
                f"stored): {scrub(text[:200], self._secrets, partial=len(text) > 200) or message}",
                "nothing there takes Loki's pushes (a wrong host or path, a gateway or an ingress route "
                "that takes no POST, a Loki target without a distributor); give url Loki's address "
                "(e.g. http://loki:3100, or the base path a gateway forwards to Loki)",
                retry_after,
            )
        if status == 429 or status >= 500 or status in (401, 403, 408):
            if status >= 500:
                self._remember(entries, stored=False)  # a distributor may have stored some of it
            if status == 401 and "org id" in message and not self.options.tenant:
                message += " (this Loki is multi-tenant: set tenant=<org id>)"
            raise RetryableError(f"loki: {self._shown} answered {status}: {message}", retry_after=retry_after)
        if status == 400:
            behind = None if cut else _parse_behind(text)  # cut: its last stream's total is not there
            if behind is not None:
                if await self._behind_refused(entries, outcomes, behind, message):
                    return
            elif len(entries) > 1 and _about_some_entries(content_type, answer) and self._may_split():
                # Only the distributor's own checks refused entries: it answers them only once the
                # ingesters stored every entry that passed (its ingesters' errors win).
                await self._split_refused(entries, outcomes, stored=_INGESTER_REFUSED not in answer)
                return
        # 400 (and other 4xx) is final. It may be partial: Loki stored the valid entries but does not say
        # which, so every item of this push goes to the dead-letter file with Loki's message.
        if status == 400 and _DISALLOWED in answer:
            message += " (this Loki takes no structured metadata: set the sink's structured_metadata=false)"
        reason = f"loki: {status} (push of {len(entries)} entries refused, possibly partly stored): {message}"
        for entry in entries:
            outcomes[entry.index] = reject(reason)

    def _may_split(self) -> bool:
        """Whether the send may push a refused push again in halves: _SPLIT_PUSHES per send at most,
        none started after its deadline (``pushes_deadline``)."""
        if self._splits_left < 2 or time.monotonic() >= self._deadline:
            return False
        self._splits_left -= 2
        return True

    async def _split_refused(self, entries: list[_Entry], outcomes: list[Outcome], *, stored: bool) -> None:
        """A push of several entries answered 400 naming an entry's stream (``_about_some_entries``):
        an entry Loki's distributor refused (over a limit this sink does not know of, or configured
        lower than the options say) and the rest stored, without saying which. Each half is pushed
        again, down to single entries (as for 413), so only the entry refused alone is rejected and the
        others are answered OK: Loki de-duplicates what it stored (same stream, timestamp and line).
        Before, every item was dead-lettered, those Loki held included.

        Pushed again, an entry may now be refused as too far behind its stream's newest, which the
        first push raised (a stream spanning over max_behind: a relist of its last hours). ``stored``
        (the answer was the distributor's alone): every entry that passed its checks was stored, for
        Loki's distributor answers its own 400 only once the ingesters stored the rest, and answers
        theirs when they refused any. An entry refused as behind passed those checks now, so it did
        then: they judge the entry alone, against limits that do not change within a send (the age
        check only gets harder to pass; one an hour behind an entry Loki took is not too new). It is
        answered OK (``_remember``); before, those over max_behind were dead-lettered though Loki
        held them. Not
        ``stored`` (the ingester's words in the answer): only those this push may have put over
        max_behind are marked, as perhaps stored, and rejected if refused as behind, not stamped anew
        (a second copy). Charged to the streams' budgets again (``_again``): what does not fit
        waits, held."""
        if stored:
            self._remember(entries, stored=True)
        else:
            self._unseen(entries)
        rest = self._again(entries, outcomes, cause="an entry of their push (400)")
        try:
            if len(rest) > 1:
                await self._push_halves(rest, outcomes)
            elif rest:
                await self._push(rest, outcomes)
        except RetryableError as exc:  # Loki failing as a whole (5xx, unreachable): these only
            for entry in rest:
                outcomes[entry.index] = retry(exc.reason, retry_after=exc.retry_after)

    async def _push_halves(self, entries: list[_Entry], outcomes: list[Outcome]) -> None:
        """Push each half on its own. When the second fails after the first was stored, only its items
        are retried: re-sending the stored half would spend the tenant's rate limit on it again."""
        mid = len(entries) // 2
        await self._push(entries[:mid], outcomes)  # raises only when nothing of it was stored
        await self._push_or_retry(entries[mid:], outcomes)

    async def _push_or_retry(self, entries: list[_Entry], outcomes: list[Outcome]) -> None:
        try:
            await self._push(entries, outcomes)
        except RetryableError as exc:
            for entry in entries:
                outcomes[entry.index] = retry(exc.reason, retry_after=exc.retry_after)

    async def _stream_refused(
        self,
        entries: list[_Entry],
        outcomes: list[Outcome],
        named: str | bytes,
        reason: str,
        retry_after: float | None,
        *,
        rate_limit: int | None = None,
        listing: str = "",
    ) -> bool:
        """Loki's active stream limit: the ingester refused a new stream (``_plan`` makes it the push's
        last, whose result Loki answers) and stored the push's other streams. The named stream's items
        are retried, set aside (``defer``: its refusal holds up no other stream); the others are pushed
        again at once (Loki de-duplicates what it stored), as far as their budget takes them again
        (``_again``). False when the named stream is none of this push's. ``rate_limit``: refused
        for Loki's per-stream rate limit (bytes/s), which ``_over_budget`` keeps to, and a stream at
        its edge is pushed last (this answer); what the refusal proves is learned, and ``listing``
        (Loki's answer) says which of its entries Loki may have stored (``_rate_listing``). ``named``
        as bytes: the encoded stream itself (Loki 2.x names none: ``_unnamed_stream_refused``).

        The others are pushed again although Loki may hold them: in a distributed Loki the answer
        is about the first stream whose ingesters failed, not the push's last (item 84's rule is per
        ingester), so a stream spanning over max_behind may be among them, stored. Its entries that
        far behind its newest are remembered as perhaps stored (``_unseen``): refused as too far
        behind then, they are rejected, never stamped anew (a second copy)."""
        refused: list[_Entry] = []
        rest: list[_Entry] = []
        if isinstance(named, bytes):
            for entry in entries:
                (refused if entry.stream == named else rest).append(entry)
        else:
            wanted = _parse_label_set(named)
            if wanted is None:
                return False
            seen: dict[bytes, bool] = {}
            for entry in entries:
                hit = seen.get(entry.stream)
                if hit is None:
                    # Exactly the named stream (plus what Loki's distributor adds): a stream with one
                    # label fewer (an empty value is dropped) is another stream, one Loki may have stored.
                    hit = seen[entry.stream] = _names_stream(wanted, entry.stream)
                (refused if hit else rest).append(entry)
        if not refused:
            return False
        if rate_limit:
            weight = _weight(refused)
            # The time Loki's bucket takes to hold the refused entries (as Loki may count them),
            # and a little more: refused again after it, the stream proves Loki's burst lower.
            wait = (weight + _UNCOUNTED * len(refused)) / rate_limit + 2 * _PROOF_SLACK
            retry_after = wait if retry_after is None else max(retry_after, wait)
            if self._stream_rate:
                self._learn_stream_rate(refused, weight, rate_limit, wait)
            refused = self._rate_listing(refused, listing, id(entries))
        if rest:
            self._unseen(rest)
            rest = self._again(rest, outcomes)
            if rest:
                await self._push_or_retry(rest, outcomes)
        for entry in refused:
            outcomes[entry.index] = retry(reason, retry_after=retry_after, defer=True)
        self._deferring = True
        return True

    def _rate_listing(self, group: list[_Entry], listing: str, push: int) -> list[_Entry]:
        """Of a stream Loki refused for its per-stream rate, the entries to send again, by its
        ``listing`` (``_parse_ignored``). Limiting entry by entry (Loki 2.x; 3.x with shard_streams
        off), Loki stored the entries it did not list (the oldest, while its bucket lasted); pushed
        again, one more than max_behind behind the newest it stored was refused as too far behind
        rather than de-duplicated, and stamped anew: a second copy. Limiting whole (3.x's default)
        it stored nothing, and lists only the entries it refused for the rate. So, of the entries it
        did not list up to the last it listed (all, when it listed every refused one):

        - when it lists an entry refused as too far behind, it limited entry by entry: they are
          stored, answered OK now (not charged to the stream's bucket again);
        - otherwise they are sent again; those more than max_behind behind the newest of them are
          ``_Kept``: refused as too far behind later, taken as stored when Loki's cutoff then proves
          it limited entry by entry, stamped anew when that cutoff proves this push stored none of
          them (Loki limited the stream whole: they were too far behind another writer's newest),
          rejected otherwise (counted, never a second copy).

        The others Loki did not list (after the last listed, when it listed fewer than it refused;
        the whole stream, when the listing does not fit this push: the distributor dropped some,
        or sharded the stream) may be stored: those over max_behind behind the stream's newest are
        rejected if refused as too far behind later, never stamped anew. ``push``: the refused push's
        ``id`` (``_Watch``)."""
        parsed = _parse_ignored(listing) if listing else None
        if parsed is not None and parsed[1] >= parsed[2]:
            return group  # every entry refused: nothing of it stored
        order = sorted(group, key=_ORDER)
        cut = order[-1].ts_ns - self._behind_ns
        if parsed is None or parsed[2] != len(group) or not parsed[0]:
            self._remember([entry for entry in order if entry.ts_ns < cut], stored=False)
            return group
        listed, ignored, _ = parsed
        want = Counter(ts for ts, _ in listed)
        have = Counter(entry.ts_ns for entry in order if entry.ts_ns in want)
        if any(have[ts] < count for ts, count in want.items()):
            self._remember([entry for entry in order if entry.ts_ns < cut], stored=False)
            return group  # a listed timestamp none of ours has
        # An entry at a listed timestamp is refused; which of several at one, Loki does not say.
        last = max(i for i, entry in enumerate(order) if entry.ts_ns in want)
        end = len(order) if len(listed) == ignored else last + 1
        refused = [entry for entry in order[:end] if entry.ts_ns in want]
        kept = [entry for entry in order[:end] if entry.ts_ns not in want]
        unsure = order[end:]
        if unsure and have == want and len(unsure) == ignored - len(listed):
            # Loki lists the first refused entries: as many as it refused besides are after the last
            # it listed, so when that is every one of them none was stored.
            unsure = []
        unsure += [entry for entry in refused if have[entry.ts_ns] > want[entry.ts_ns]]
        self._remember([entry for entry in unsure if entry.ts_ns < cut], stored=False)
        if not kept:
            return group
        if any(behind for _, behind in listed):
            self._stored.append(kept)  # applied to the prediction when the send returns
            if self._sent:
                for entry in kept:
                    self._sent.pop(hash((entry.stream, entry.ts_ns, entry.line)), None)
            return refused + order[end:]
        # Stored, one could be refused as too far behind later only behind the newest stored with it
        # (Loki's newest before took it): those are told by their cutoff then (another writer's
        # newer entries aside, as for any entry). Any other stays unmarked: stamped anew if refused
        # so, as when Loki's whole-stream refusal left it out for being behind another writer's.
        top = kept[-1].ts_ns - self._behind_ns
        exposed = [entry for entry in kept if entry.ts_ns < top]
        if exposed:
            # What Loki may have stored with them: they, and those whose fate the listing left open.
            newest = max([kept[-1].ts_ns] + [entry.ts_ns for entry in unsure])
            stamps = sorted({entry.ts_ns for entry in kept})
            self._remember(exposed, stored=_Kept(stamps, newest, self._watch(kept[0].stream)), push=push)
        return group

    def _unseen(self, entries: list[_Entry]) -> None:
        """Entries to push again after another stream's refusal, which Loki may hold: those more than
        max_behind behind their stream's newest here are remembered as perhaps stored, so Loki
        refusing them as too far behind (behind the newest the first push stored) is not taken for
        a refusal of new entries."""
        newest: dict[bytes, int] = {}
        for entry in entries:
            top = newest.get(entry.stream)
            if top is None or entry.ts_ns > top:
                newest[entry.stream] = entry.ts_ns
        behind = self._behind_ns
        exposed = [entry for entry in entries if entry.ts_ns < newest[entry.stream] - behind]
        if exposed:
            self._remember(exposed, stored=False)

    async def _unnamed_stream_refused(
        self, entries: list[_Entry], outcomes: list[Outcome], reason: str, retry_after: float | None
    ) -> None:
        """Loki 2.x's answer for the active stream limit, which names no stream. Loki refuses only a
        stream it does not hold, and answers for a push's last stream: so it is the push's stream
        when it has one, and its last when that is the only one this sink has not had taken within
        STREAM_KNOWN_FOR (``_plan`` puts one such stream last in a push). It is then set aside as
        when Loki names it. Otherwise (several such streams:
        ``new_stream_pushes=false``; or none: Loki forgot one sooner than this sink counts on) the
        refused stream cannot be told: each stream of the push is pushed again on its own, where
        Loki's answer is about it alone (it de-duplicates what it stored). Retried whole in place,
        the push held up every stream of the sink for as long as the tenant stayed at its limit."""
        groups = _by_stream(entries)
        last = next(reversed(groups))
        if len(groups) > 1:
            since = time.monotonic_ns() - self._known_ns
            taken = self._taken.get if self._taken.used else None
            new = [
                stream for stream in groups if taken is None or (at := taken(stream)) is None or at < since
            ]
            if new != [last]:
                self._unseen(entries)
                pushes = [self._again(group, outcomes) for group in groups.values()]
                await self._push_all([push for push in pushes if push], outcomes)
                return
        await self._stream_refused(entries, outcomes, last, reason, retry_after)

    def _learn_stream_rate(self, refused: list[_Entry], weight: int, limit: int, wait: float) -> None:
        """Loki refused a stream for its per-stream rate: its bucket there is empty, so this one's is
        too. That alone says nothing of Loki's limits: the bucket may have been drained by the
        process before a restart, a second writer, this sink pushing stored entries again, or a
        push that reached Loki later than planned. So the budget is lowered only as far as the
        answer proves: to the rate Loki names, when below per_stream_rate; and its burst, when Loki
        had the time to refill the whole refused push since this sink last pushed the stream (or
        started) and still refused it (its burst is below that push: then half of it, at least its
        largest entry, so the stream's pushes shrink until they fit). What was proved lasts
        _LEARNED_FOR seconds after the last proof; then the options again (``_share``). The stream's
        bucket here takes the refused push again only after ``wait``, the time that proof needs."""
        stream = refused[0].stream
        now = time.monotonic()
        rate, burst = self._stream_rate, self._stream_burst
        wrong: list[str] = []
        if limit < self.options.per_stream_rate:
            wrong.append(
                f"per_stream_rate={self.options.per_stream_rate} to its per_stream_rate_limit ({limit})"
            )
            rate = min(rate, float(limit))
        planned = self._idle.get(stream)
        if planned is not None and weight <= burst:
            # Since Loki last checked a push of it, at the latest: the answer (a push's plan is
            # earlier than Loki's check by a varying delay, a send's end later).
            at, last = planned
            taken = self._taken.get(stream)
            last = max(last, self._answered.get(stream, last), last if taken is None else taken / _NS)
            idle = at - last
            if weight + _UNCOUNTED * len(refused) <= limit * (idle - _PROOF_SLACK):
                wrong.append(
                    f"per_stream_burst={self.options.per_stream_burst} to its per_stream_rate_limit_burst "
                    f"(below {weight}: it refused that much of a stream this sink had not pushed for "
                    f"{idle:.1f}s)"
                )
                burst = min(burst, max(weight / 2, float(max(_weight((entry,)) for entry in refused))))
        if wrong:
            self._learned_at = now
        if (rate, burst) != (self._stream_rate, self._stream_burst):
            self.log.warning(
                "loki: %s refused stream %s over its per-stream rate limit (%d bytes/s), which proves "
                "its limits lower than the options: now at most %d bytes/s and %d at once per stream "
                "(for %.0fs after the last such refusal); set %s",
                self._shown,
                _stream_text(stream),
                limit,
                rate,
                burst,
                _LEARNED_FOR,
                " and ".join(wrong),
            )
            self._stream_rate, self._stream_burst = rate, burst
        # Empty, and below: it refills to the refused push in ``wait`` (held back until then).
        self._budgets[stream] = (min(0.0, weight - rate * _BUDGET_SHARE * wait), now)

    async def _behind_refused(
        self, entries: list[_Entry], outcomes: list[Outcome], behind: list[_Behind], message: str
    ) -> bool:
        """Loki's ingester refused entries of a stream as too far behind the newest entry it holds for
        it, newer than this sink knew (another writer: a replay, this router before a restart), and
        stored the rest. Loki judges a stream's entries in push order (sorted here) against its newest
        before the push, so the refused ones are its oldest: those before the cutoff it names. That
        stream's newest is raised to match, so they are retried stamped at receipt (clamp_time), or
        rejected with Loki's reason if they were sent although predicted refused. Loki names one stream
        per answer, and drops the distributor's own refusals from it, so whatever it did not account
        for is pushed again at once (it de-duplicates what it stored). False (reject the push as
        before) when the answer does not fit this push."""
        groups: dict[bytes, list[_Entry]] = {}
        for entry in entries:
            groups.setdefault(entry.stream, []).append(entry)
        named: list[tuple[bytes, list[_Entry], list[_Entry], int]] = []
        for block in behind:
            streams = [stream for stream in groups if _names_stream(block.labels, stream)]
            if len(streams) != 1:
                return False
            group = sorted(groups.pop(streams[0]), key=_ORDER)
            # Go prints the cutoff in whole seconds: Loki's own is up to a second later.
            bound = block.cutoff_ns + _NS
            if sum(1 for entry in group if entry.ts_ns < bound) < block.ignored:
                return False  # Loki refused entries newer than its cutoff: not an answer we understand
            if block.total == len(group):
                # Loki judged every entry of ours: the refused are exactly the oldest ones, so none it
                # stored is sent again (stamped at receipt it would be a second copy).
                refused, stored = group[: block.ignored], group[block.ignored :]
            else:
                split = self._split_behind(group, block)
                if split is None:
                    return False
                refused, groups[streams[0]] = split
                stored = []
            named.append((streams[0], refused, stored, bound))
        sent = self._sent
        for stream, refused, stored, bound in named:
            for entry in stored:
                self._raised.append((stream, entry.ts_ns))
            final = f"loki: 400 (refused, the rest of the push stored): {message}"
            again = (
                f"loki: {self._shown} refused {len(refused)} entries as too far behind their stream's newest "
                "entry, which another writer (a replay, an earlier run) made newer than this sink knew; "
                "sent again: " + message.split("\n", 1)[0]
            )
            unsure = (
                f"loki: {self._shown} refused an entry as too far behind its stream's newest, and an "
                "identical one was sent in a push whose outcome is unknown (timed out, cut off, 5xx, "
                "in the second of Loki's cutoff, answered for another stream, left out of a "
                "per-stream rate refusal, or its record forgotten), so it may be stored: not sent "
                "again with a new timestamp (a second copy); " + message.split("\n", 1)[0]
            )
            for entry in refused:
                key = hash((entry.stream, entry.ts_ns, entry.line))
                known = sent.pop(key, None) if sent else None
                if known is None and key in self._lost:
                    known = False  # its mark forgotten (_SENT_MAX): perhaps stored, never stamped anew
                fresh = False
                if isinstance(known, _Kept):
                    if known.stored(bound):
                        known = True
                    elif known.unstored(bound - _NS, id(entries)):
                        # Loki limited its stream whole and it was too far behind then: never stored,
                        # stamped anew as any new entry refused so (its kept timestamp forgotten).
                        known, fresh = None, True
                        occurrence = self._batch[entry.index]
                        self._chosen.pop((occurrence.uid, occurrence.number), None)
                    else:
                        known = False
                if known:
                    # Stored by a push of a send cut off (its retry is identical): Loki refused this
                    # copy as behind its newest, which that push raised, instead of de-duplicating it.
                    outcomes[entry.index] = OK
                elif known is not None:
                    outcomes[entry.index] = reject(unsure)
                elif entry.late and not fresh:
                    # Predicted refused and sent anyway (clamp_time=false, or received too long ago):
                    # Loki's refusal is final.
                    outcomes[entry.index] = reject(final)
                else:
                    # The retry is predicted, and clamped. Set aside (defer): a cause of this stream's
                    # own, which holds up no other stream.
                    outcomes[entry.index] = retry(again, defer=True)
                    self._deferring = True
            # From now on an entry before Loki's cutoff is predicted refused for this stream.
            self._raised.append((stream, bound + self._behind_ns))
        again_ids = {id(entry) for group in groups.values() for entry in group}
        rest = [entry for entry in entries if id(entry) in again_ids]  # in push order: a new stream last
        if rest:
            self._unseen(rest)
            rest = self._again(rest, outcomes)
            if rest:
                await self._push_or_retry(rest, outcomes)
        return True

    def _split_behind(self, group: list[_Entry], block: _Behind) -> tuple[list[_Entry], list[_Entry]] | None:
        """The refused entries of a stream, and those to push again, when Loki's total is not this
        push's count for it: the distributor dropped some (over max_line_size…; their error is not
        in the answer), so the count does not say which were refused. The timestamps Loki lists do,
        exact to the nanosecond. An entry that may be stored is pushed again with its own timestamp
        (Loki de-duplicates it), never stamped anew. None when the answer does not fit."""
        listed = block.listed
        if listed and len(listed) == block.ignored:
            # Every refused entry is listed; the others reached the ingester and were stored, or
            # were dropped by the distributor (pushed again, which answers their error).
            want = Counter(listed)
            refused: list[_Entry] = []
            rest: list[_Entry] = []
            for entry in group:
                if want[entry.ts_ns] > 0:
                    want[entry.ts_ns] -= 1
                    refused.append(entry)
                else:
                    rest.append(entry)
            if any(want.values()):
                return None  # a listed timestamp none of ours has
            self._remember(rest, stored=True)  # Loki refusing one of them later is its newest's doing
            return refused, rest
        # More refused than listed (or unreadable): those before Loki's exact cutoff, which is after
        # every listed one and within the second after the one it prints.
        low = block.cutoff_ns if not listed else max(block.cutoff_ns, max(listed) + 1)
        high = block.cutoff_ns + _NS
        refused = [entry for entry in group if entry.ts_ns < low]
        unsure = [entry for entry in group if low <= entry.ts_ns < high]
        rest = [entry for entry in group if entry.ts_ns >= high]
        if len(refused) + len(unsure) == block.ignored:
            refused, unsure = refused + unsure, []  # Loki counts them all: every one was refused
        self._remember(rest, stored=True)
        if unsure and group[-1].ts_ns >= block.cutoff_ns + self._behind_ns:
            # This push may have raised Loki's newest for the stream (an entry of it newer than Loki's
            # newest before it can be), so pushed again an unsure entry may be refused though stored:
            # then it is rejected, not stamped anew. Otherwise the push again meets the same cutoff,
            # and Loki refuses it again exactly when it refused it first.
            self._remember(unsure, stored=False)
        return refused, unsure + rest

    # -- encoding ----------------------------------------------------------------------------------

    def _stream(self, record: dict[str, Any]) -> tuple[tuple[tuple[str, str], ...], bytes]:
        """The entry's label set and its encoded ``StreamAdapter.labels`` field, cached per distinct
        input values (namespaces, kinds, reasons repeat heavily)."""
        key: Any
        try:
            key = self._key_top(record)
            for head, name in self._key_nested:
                key = (key, record[head].get(name))
        except (KeyError, TypeError, AttributeError):
            key = None  # not a normalised record (missing field, not a dict): not worth a cache entry
        if key is not None:
            try:
                hit = self._label_cache.get(key)
            except TypeError:  # an unhashable value (not from normalise)
                key, hit = None, None
            if hit is not None:
                return hit
        labels = self._labels(record)
        # The pairs serve only the JSON body; protobuf pushes use the encoded field alone, so the
        # cache (up to 4,096 label sets) does not hold ~2 MiB of pair tuples it never reads.
        result = (() if self._protobuf else labels), bytes_field(1, labels_string(labels))
        # Only str/None keys: then an equal key means equal label values (1 == True == 1.0 would not);
        # and short ones (``_plain``).
        if key is not None and len(result[1]) <= _CACHE_LABELS_MAX and _plain(key):
            self._label_cache.put(key, result)
        return result

    def _labels(self, record: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        pairs: dict[str, str] = {}
        for name, path in self._defaults:
            pairs[name] = _lookup(record, path)
        for name, template in self._templates:
            pairs[name] = render_template(template, record)
        out: list[tuple[str, str]] = []
        for name, value in pairs.items():
            if value:  # Loki drops empty label values anyway
                out.append((name, _label_value(value)))
        if not out:
            fallback = record.get("type")
            out.append(
                ("type", _label_value(fallback) if isinstance(fallback, str) and fallback else "Normal")
            )
        return tuple(sorted(out))

    def _line(self, occurrence: Occurrence, marks: dict[str, Any] | None = None) -> bytes:
        """The log line; ``marks`` are fields added to the record (``time_adjusted``, or a truncated
        ``message`` with ``truncated`` and ``original_bytes``)."""
        if not marks:
            if self.options.line_format == "logfmt":
                return logfmt_line(occurrence.to_dict(include_raw=self.options.include_raw)).encode("utf-8")
            return occurrence.encode(include_raw=self.options.include_raw)
        record = {**occurrence.to_dict(include_raw=self.options.include_raw), **marks}
        if "truncated" in marks:
            record.pop("raw", None)  # the raw object repeats the message: the first thing to drop
        if self.options.line_format == "logfmt":
            extra = tuple((name, "true") for name in ("truncated", "time_adjusted") if name in marks)
            return logfmt_line(record, extra=extra).encode("utf-8")
        return orjson.dumps(record)

    def _stamp(self, occurrence: Occurrence, newest: int | None) -> tuple[int, bool, bool]:
        """The timestamp to send an entry with, not sent before: (timestamp, stamped otherwise than
        its own time, predicted refused for its time). ``newest``: its stream's newest known to Loki.

        Its own time, unless Loki would refuse it (outside its window, over max_behind behind the
        stream's newest) or, with ``clamp_time``, it is more than Loki's grace ahead of its receipt.
        Ahead is judged against the receipt, not this attempt's clock, so every attempt (and one
        after a restart) stamps it the same; by the clock, one a few seconds inside the edge would be
        stamped at receipt first and keep its own time on a retry: two entries in Loki if the first
        push was stored unanswered. With ``clamp_time``, an event whose recorder's clock was ahead of
        the API server's is stamped at its time by the API server's clock (``_api_time``), decided
        from the object alone: a relist (after a SIGKILL, the ConfigMap mode's next leader) delivers
        it again with another receipt, and a stamp at receipt made a second copy. Otherwise, or if
        Loki would refuse that too, at its receipt, when Loki takes that."""
        ts_ns = occurrence.time_ns
        clamp = self.options.clamp_time
        oldest, latest, behind = self._oldest_ns, self._newest_ns, self._behind_ns
        if clamp:
            api_ns = self._api_time(occurrence)
            if (
                api_ns is not None
                and oldest <= api_ns <= latest
                and api_ns - self._ahead_ns <= occurrence.received_at * _NS
                and (newest is None or api_ns >= newest - behind)
            ):
                return api_ns, True, False
        refused = not oldest <= ts_ns <= latest or (newest is not None and ts_ns < newest - behind)
        if refused or (clamp and ts_ns - self._ahead_ns > occurrence.received_at * _NS):
            received_ns = int(occurrence.received_at * _NS)
            if (
                clamp
                and oldest <= received_ns <= latest
                and (newest is None or received_ns >= newest - behind)
            ):
                # The time the router received it: one Loki takes, and the same on every retry (it
                # is kept in the spool), so Loki still de-duplicates it; not on a relist's delivery.
                return received_ns, True, False
        return ts_ns, False, refused

    def _api_time(self, occurrence: Occurrence) -> int | None:
        """The occurrence's time by the API server's clock, when its recorder's clock was ahead of it
        by more than Loki's grace (less the margin) when it created the Event: ``creationTimestamp``
        (the API server's) + (its time − ``firstTimestamp``, or ``eventTime`` for an events.k8s.io
        event). The same for every delivery of the occurrence: it depends on the object only (kept
        in the spool as it came). None when the clock was not that far ahead or a field is missing.
        ~0.6 µs for an event first seen less than a second after its creation (most)."""
        first = occurrence.record.get("first_time")
        if type(first) is not str:
            return None
        raw = occurrence.raw_json
        start = raw.find(_CREATION)
        if start == -1:
            return None
        start += len(_CREATION)
        if (
            self._skew_ns >= _NS
            and raw.startswith(b'Z"', start + 19)
            and first[:19].encode() <= raw[start : start + 19]
        ):
            # First seen less than a second after its creation: both "YYYY-MM-DDTHH:MM:SS" in UTC
            # (the API server's Time, the record's time), so ordered as text.
            return None
        end = raw.find(b'"', start, start + 64)
        first_ns = parse_time_ns(first)
        created_ns = parse_time_ns(raw[start:end].decode("latin-1")) if end != -1 else None
        if first_ns is None or created_ns is None or first_ns - created_ns <= self._skew_ns:
            return None
        # Rare: the object itself says (a label named creationTimestamp may come first in the bytes).
        meta = orjson.loads(occurrence.raw_json).get("metadata")
        created_ns = parse_time_ns(meta.get("creationTimestamp")) if isinstance(meta, dict) else None
        if created_ns is None or first_ns - created_ns <= self._skew_ns:
            return None
        return occurrence.time_ns - (first_ns - created_ns)

    def _entry(self, index: int, occurrence: Occurrence) -> _Entry | Outcome:
        record = occurrence.record
        labels, stream = self._stream(record)
        ts_ns = occurrence.time_ns
        marks: dict[str, Any] | None = None
        late = False
        # Loki refuses an entry outside its time window, or over max_behind behind the newest entry it
        # holds for the stream (as far as this sink knows: what it pushed there).
        newest = self._newest.get(stream) if self._newest.used else None
        kept = self._chosen.get((occurrence.uid, occurrence.number)) if self._chosen else None
        chosen = None if kept is None else kept[0]
        if chosen is not None:
            # Sent before in a push Loki may have stored (no answer, a 5xx, a send cut off): the
            # same timestamp again, though the clock or the stream's newest moved on meanwhile, so
            # Loki de-duplicates it instead of keeping a copy stamped otherwise. Predicted refused
            # now, it is pushed apart and Loki judges (refused, it is rejected: _behind_refused).
            if chosen != ts_ns:
                ts_ns, marks = chosen, _TIME_ADJUSTED
            if not self._oldest_ns <= ts_ns <= self._newest_ns or (
                newest is not None and ts_ns < newest - self._behind_ns
            ):
                late = self._late = True
        else:
            ts_ns, stamped, late = self._stamp(occurrence, newest)
            if stamped:
                marks = _TIME_ADJUSTED
            if late:
                self._late = True  # send() pushes it apart, for Loki to judge
        try:
            if marks is not None:
                line = self._line(occurrence, marks)
            else:
                line = occurrence.json if self._fast_line else self._line(occurrence)
        except (orjson.JSONEncodeError, UnicodeEncodeError):
            # Lone surrogates in some string: encode a repaired copy (U+FFFD) instead of failing.
            occurrence = Occurrence(
                uid=occurrence.uid,
                number=occurrence.number,
                time_ns=occurrence.time_ns,
                record=_fix_surrogates(record),
                raw_json=occurrence.raw_json,
                received_at=occurrence.received_at,
            )
            record = occurrence.record
            line = self._line(occurrence, marks)
        modified = 0 if marks is None else _STAMPED
        limit = self._max_line
        if len(line) > limit:
            if self.options.oversize == "reject":
                return reject(
                    f"loki: line of {len(line)} bytes exceeds max_line_bytes={limit} (oversize=reject)"
                )
            line = self._truncate(occurrence, line, limit, marks)
            modified |= _TRUNCATED
        pairs: list[tuple[str, str]] = []
        if self._metadata:
            pairs, cut = _metadata_values(occurrence, record)
            if cut:
                modified |= _TRUNCATED
        if modified:
            self._modified_batch = True
        if not self._protobuf:
            metadata = [(name, _fix_surrogates(value)) for name, value in pairs]
            return _Entry(index, labels, stream, ts_ns, line, metadata, late=late, modified=modified)
        # EntryAdapter{timestamp=1, line=2, structuredMetadata=3...} as one StreamAdapter.entries field.
        seconds, nanos = divmod(ts_ns, _NS)
        if seconds >= 128:
            # varint(s) is its low 7 bits (continued) then varint(s >> 7): cache the high part per
            # 128-second block, so any plausible spread of event times hits the cache.
            high = self._seconds.get(seconds >> 7)
            if high is None:
                high = self._seconds.put(seconds >> 7, varint(seconds >> 7))
            timestamp = _SECONDS_LOW[seconds & 0x7F] + high
        else:
            timestamp = varint_field(1, seconds) if seconds else b""
        if nanos:
            timestamp += varint_field(2, nanos)
        size = len(line)
        # A Timestamp is at most 22 bytes: its length varint is one byte.
        head = _TIMESTAMP_TAGS[len(timestamp)] + timestamp + (_FIELD2.get(size) or _field2(size))
        if self._metadata:
            metadata_bytes = b"".join([_metadata_field(name, value) for name, value in pairs])
            size += len(head) + len(metadata_bytes)  # the EntryAdapter message
            prefix = _FIELD2.get(size) or _field2(size)
            parts: tuple[bytes, ...] = (prefix + head, line, metadata_bytes)
        else:
            size += len(head)
            prefix = _FIELD2.get(size) or _field2(size)
            parts = (prefix + head, line)
        return _Entry(
            index, labels, stream, ts_ns, line, (), parts, len(prefix) + size, late=late, modified=modified
        )

    def _truncate(
        self, occurrence: Occurrence, line: bytes, limit: int, marks: dict[str, Any] | None = None
    ) -> bytes:
        """Shorten the message until the line fits, keeping JSON valid; byte-cut as a last resort.
        Deterministic, so a retried entry is identical and Loki de-duplicates it."""
        shortened = shorten_message(
            occurrence, len(line), limit, lambda cut: self._line(occurrence, {**(marks or {}), **cut})
        )
        if shortened is not None:
            return shortened
        marker = f"… [truncated from {len(line)} bytes]".encode()
        return cut_utf8(line, limit - len(marker)) + marker

    def encode(self, entries: Sequence[_Entry]) -> bytes:
        """The push body: one stream per label set (in first-seen order), entries sorted by time."""
        streams = _by_stream(entries)
        for stream_entries in streams.values():
            if len(stream_entries) > 1:
                stream_entries.sort(key=_ORDER)
        if self.options.format == "json":
            doc = {
                "streams": [
                    {
                        "stream": dict(stream_entries[0].labels),
                        "values": [
                            [str(e.ts_ns), e.line.decode("utf-8"), dict(e.metadata)]
                            if e.metadata
                            else [str(e.ts_ns), e.line.decode("utf-8")]
                            for e in stream_entries
                        ],
                    }
                    for stream_entries in streams.values()
                ]
            }
            body = orjson.dumps(doc)
            return gzip.compress(body, mtime=0) if self.options.gzip else body
        # PushRequest{streams=1: StreamAdapter{labels=1, entries=2...}}: lengths summed, one join.
        out: list[bytes] = []
        for stream, stream_entries in streams.items():
            out.append(_TAG_STREAM + varint(len(stream) + sum([e.size for e in stream_entries])))
            out.append(stream)
            for e in stream_entries:
                out += e.parts
        return bytes(cramjam.snappy.compress_raw(b"".join(out)))

    async def aclose(self) -> None:
        if self._modified_log.unlogged:
            self._count_modified([], [], flush=True)
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
