"""Elasticsearch and OpenSearch sink: one ``_bulk`` request per batch.

The request goes through the official client's transport (``elastic_transport.AsyncTransport``, what
``elasticsearch.AsyncElasticsearch`` wraps) with plain ``application/x-ndjson`` / ``application/json``
media types. The high-level client rewrites them to
``application/vnd.elasticsearch+json; compatible-with=8``, which OpenSearch (and ES 7) refuse with 406;
the transport keeps node pooling and TLS but sends exactly what we give it, so one code path serves
Elasticsearch 7/8/9 and OpenSearch. Not importing the high-level client (every API namespace, sync
and async) saves ~7 MiB of resident memory. The transport's own retries are switched off per request:
the engine owns retries and backoff.

Idempotence: ``_id`` is ``<event uid>-<occurrence>``, so a re-delivered occurrence overwrites itself
(``index``) or is refused as already present (``create``, 409, counted as delivered).

Time: a send ends on its own within the engine's ``send_budget`` (five sixths of ``send_timeout``): each
request's timeout is ``timeout`` or what is left of that, whichever is less, so a node that stops
answering times out in the transport rather than being cut off by the engine, which left it in the
round-robin. ``_bulk`` carries ``timeout=`` (half the request's), so the cluster answers an item whose
shard it waits for before we give up on the whole request.

Nodes: the transport's pool (elasticsearch-py's) marks a node dead when a request to it fails or
times out, and tries it again after 1, 2, 4 … s. A node not known to answer (back from its dead time,
or its latest request cut short) is first sent ``HEAD /`` with a tenth of a request's time when
another node is alive: one still hanging holds the send up that long, not its whole budget, is marked
dead again, and the next node takes the request. A request cut short because earlier requests of the
same send (a 413's halves, a failed probe) had used part of its time marks no node dead (it may be
slow and working): that node is probed before its next request instead. A 413 marks no node dead
either (the transport's rule did): it is about our request, which the sink halves. Nor does a mapping
read (``_judge_raw``) that times out: it is given a tenth of the send on purpose.

Redirects are not followed (aiohttp re-sent a POST answered 301/302 as a GET without its body): start
fails naming the ``Location``; one met while sending is logged and retried.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Annotated, Any, ClassVar, Literal, NoReturn
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
import elastic_transport
import orjson
from elastic_transport import (
    AiohttpHttpNode,
    ApiResponseMeta,
    AsyncTransport,
    BaseNode,
    HttpHeaders,
    NodeConfig,
    NodePool,
    OrjsonSerializer,
    SerializationError,
    Serializer,
    SerializerCollection,
    TextSerializer,
    TransportError,
)
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout as TransportTimeout
from elastic_transport.client_utils import DEFAULT, url_to_node_config
from pydantic import AliasChoices, BeforeValidator, Field, field_validator, model_validator

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
    parse_retry_after,
    reject,
    retry,
)
from eventrouter.body_prefix import EXCERPT_WAIT, excerpt
from eventrouter.options import FilePath, http_url, redact_url

from ._scrub import credentials, scrub

__all__ = ["ElasticsearchOptions", "ElasticsearchSink"]


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_NodeList = Annotated[list[str], BeforeValidator(_split)]

# Characters Elasticsearch refuses in index names (plus upper case).
_BAD_INDEX_CHARS = re.compile(r'[\\/*?"<>| ,#:A-Z]')
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_BAD_TEMPLATE_CHARS = re.compile(r'[\\/*?"<>| ,#A-Z]')
# One name for every router's template (item 266): a per-pattern name made overlapping prefixes of one
# priority refuse each other and a rolled-back version's PUT be refused (item 265's).
_DEFAULT_TEMPLATE = "eventrouter-k8s-events"
# Elasticsearch and OpenSearch refuse index names over 255 bytes (UTF-8): "index name is too long".
_MAX_INDEX_BYTES = 255
_HASH_LEN = 8  # hex digits of the suffix that keeps cut field values apart
_MIN_FIELD_BYTES = 1 + 1 + _HASH_LEN  # what a cut field value needs at least: a character, -, the hash
_DOT_NAMES = frozenset({".", ".."})  # names the cluster refuses (invalid_index_name_exception)
# The get-index API's answer cut to what judging raw needs, for many names in one request: each index
# they reach (its uuid says it is there even with nothing mapped, which a _mapping answer cut to raw
# leaves out), the aliases and data stream through which a name reaches it, and its mapping of raw
# alone (typeless, or 7.x's _doc: a day's index may map thousands of labels). A name not there is
# left out of the answer (ignore_unavailable), not refused.
_JUDGE_QUERY = (
    "?ignore_unavailable=true&allow_no_indices=true&filter_path=*.settings.index.uuid,*.aliases,"
    "*.data_stream,*.mappings.properties.raw,*.mappings._doc.properties.raw"
)
# Bytes of (quoted) names in one read: its request line stays within http.max_initial_line_length (4 KB).
_JUDGE_LINE = 3000
_MAX_READ_PAUSE = 600.0  # seconds: the longest the reads pause while they fail
_DATE_TOKENS = re.compile(r"yyyy|YYYY|yy|MM|dd|HH|[A-Za-z]")
_DATE_STRFTIME = {"yyyy": "%Y", "YYYY": "%Y", "yy": "%y", "MM": "%m", "dd": "%d", "HH": "%H"}
# Top-level record fields usable as {field} in index names (strings only: an index name is text).
_INDEX_FIELDS = {
    "cluster",
    "namespace",
    "type",
    "reason",
    "name",
    "reporting_component",
    "source_component",
    "involved_object.kind",
    "involved_object.namespace",
}


class ElasticsearchOptions(SinkOptions):
    """``--sink=elasticsearch:https://es:9200?index=k8s-events-{yyyy.MM.dd}&username=..&password=env:ES_PW``"""

    hosts: _NodeList = Field(
        default_factory=list,
        validation_alias=AliasChoices("hosts", "nodes"),
        description="More node URLs besides `url` (kube-eventer: nodes); `url` may also hold a,b. A bare host gets http and port 9200; a URL without a port, its scheme's (80, 443).",
    )
    index: str = Field(
        "k8s-events-{yyyy.MM.dd}",
        description="Target index. {yyyy.MM.dd}-style parts take the event's UTC date "
        "(yyyy, yy, MM, dd, HH); {namespace}, {cluster}, {type}, {reason}, {involved_object.kind} "
        "take record fields (cut, with a hash, so that the name stays within 255 bytes). "
        "kube-eventer's index=heapster is index=heapster-{yyyy.MM.dd} here.",
    )
    data_stream: str | None = Field(
        None, description="Write to this data stream instead of `index` (action create; needs @timestamp)."
    )
    op_type: Literal["index", "create"] | None = Field(
        None,
        description="Bulk action: index (overwrite; default for indices) or create (default, and required, "
        "for data streams; a 409 on re-delivery counts as delivered).",
    )
    pipeline: str | None = Field(None, description="Ingest pipeline to run on every document.")
    index_template: bool = Field(
        False,
        description="Install an index template with mappings on start (every record field typed, "
        "time fields as dates; label and annotation values keyword, never date-detected). Needs an "
        "index that begins with fixed text: its pattern would otherwise match other applications' indices.",
    )
    template_name: str = Field(
        _DEFAULT_TEMPLATE,
        description="Name of the installed index template. One there that is not eventrouter's, or is "
        "eventrouter's for another index pattern (another router's), is left as it is, with a warning: "
        "give each router writing other indices a name of its own. Templates whose patterns can match "
        "one index may not share a template_priority (the cluster refuses the second).",
    )
    template_priority: int = Field(
        200, ge=0, description="Template priority (built-in logs-*-* templates use 100)."
    )
    dot_replacement: str = Field(
        "_",
        validation_alias=AliasChoices("dot_replacement", "dots"),
        description="Replaces '.' in label/annotation keys (app.kubernetes.io/name would otherwise "
        "become an object path and clash with a label `app`); a key that then equals another gets a "
        "number (team.io beside team_io: team_io_2); '.' keeps keys as they are.",
    )
    username: str | None = Field(
        None, validation_alias=AliasChoices("username", "esUserName"), description="Basic auth user."
    )
    password: Secret | None = Field(
        None, validation_alias=AliasChoices("password", "esUserSecret"), description="Basic auth password."
    )
    api_key: Secret | None = Field(None, description="API key: the encoded form, or id:key.")
    bearer_token: Secret | None = Field(None, description="Bearer token (Authorization: Bearer ...).")
    ca_file: FilePath | None = Field(
        None, description="PEM file of the CA that signed the cluster's certificate."
    )
    cert_file: FilePath | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: FilePath | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    insecure_skip_verify: bool = Field(False, description="Do not verify the cluster's TLS certificate.")
    timeout: float = Field(30.0, gt=0, allow_inf_nan=False, description="Seconds one HTTP request may take.")
    compress: bool = Field(False, description="gzip request bodies.")
    max_document_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Reject a single encoded document larger than this."
    )
    ver: str | None = Field(None, description="Accepted for kube-eventer compatibility; not needed.")

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_url(cls, data: Any) -> Any:
        # https://user:pw@es:9200 → username/password fields, so the secret never stays in `url` or
        # `hosts` (reprs, messages, `eventrouter check`). Every node entry, not only `url`'s: the
        # kube-eventer form is nodes=https://user:pw@es:9200.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        found: set[tuple[str | None, str | None]] = set()
        for key in ("url", "hosts", "nodes"):
            value = data.get(key)
            if isinstance(value, str) and "@" in value:
                data[key] = ",".join(_without_credentials(node, found) for node in value.split(","))
            elif isinstance(value, list | tuple) and any(isinstance(v, str) and "@" in v for v in value):
                data[key] = [
                    ",".join(_without_credentials(node, found) for node in v.split(","))
                    if isinstance(v, str)
                    else v
                    for v in value
                ]
        if len(found) > 1:
            raise ValueError(
                "the node URLs carry different credentials; one set is sent to every node: give "
                "username and password once (or credentials in one URL only)"
            )
        if found:
            if any(k in data for k in ("username", "esUserName", "password", "esUserSecret")):
                # The options won and the url's pair was dropped without a word.
                raise ValueError(
                    "username/password and user info in a node URL give basic auth twice: set one of them"
                )
            ((user, password),) = found
            if user:
                data["username"] = user
            if password:
                data["password"] = password
        return data

    @field_validator("index")
    @classmethod
    def _index(cls, value: str) -> str:
        _compile_index(value)
        return value

    @field_validator("template_name")
    @classmethod
    def _template_name(cls, value: str) -> str:
        if not value or value.startswith("_") or _BAD_TEMPLATE_CHARS.search(value):
            raise ValueError(
                f'template_name {value!r}: index template names must be lower case without \\ / * ? " '
                "< > | space , #, and not empty or start with _"
            )
        return value

    @field_validator("data_stream")
    @classmethod
    def _data_stream(cls, value: str | None) -> str | None:
        if value is not None:
            _check_index_literal(value, what="data_stream")
            if not value or value.startswith(("-", "_", "+", ".")):
                raise ValueError(f"data_stream {value!r} must not be empty or start with - _ + .")
            if len(value.encode()) > _MAX_INDEX_BYTES:
                raise ValueError(
                    f"data_stream {value[:40]!r}…: over {_MAX_INDEX_BYTES} bytes, the longest name "
                    "Elasticsearch and OpenSearch accept"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ElasticsearchOptions:
        if not self.url.strip(" ,") and not self.hosts:
            raise ValueError("no node URL: give the URL (elasticsearch:https://es:9200) or hosts=")
        self.node_urls()  # raises naming a node that is not an http(s) address
        if self.data_stream and self.op_type == "index":
            raise ValueError("data streams accept only op_type=create")
        schemes = 0
        if self.username or self.password:
            schemes += 1
            if not self.username:
                raise ValueError("password needs username")
        schemes += self.api_key is not None
        schemes += self.bearer_token is not None
        if schemes > 1:
            raise ValueError("give only one of username/password, api_key, bearer_token")
        if not self.dot_replacement:
            raise ValueError("dot_replacement must not be empty ('.' keeps dots)")
        pattern = _index_pattern(self.index)
        if self.index_template and not self.data_stream and pattern.startswith("*"):
            # Of the composable templates matching a new index, the one of the highest priority alone
            # applies: a leading * matches other applications' indices too (`*` every index), whose
            # templates ours would replace; and once a data stream would match it, which has no
            # data_stream, Elasticsearch 7.9+ refuses it (elastic/elasticsearch#59106): start failed.
            raise ValueError(
                f"index_template=true with index {self.index!r}: the template's pattern would be "
                f"{pattern!r}, which matches other applications' indices too; at "
                f"template_priority={self.template_priority} it would replace their templates "
                "(Elasticsearch's built-in logs-*-* is at 100). Begin index with fixed text "
                "(k8s-events-{namespace}-{yyyy.MM.dd}), or leave index_template off and install a "
                "template of your own"
            )
        return self

    def node_urls(self) -> list[str]:
        urls = [u.strip() for u in self.url.split(",") if u.strip()] + list(self.hosts)
        return [_node_url(u) for u in urls]


def _without_credentials(node: str, found: set[tuple[str | None, str | None]]) -> str:
    """``node`` without its user info, which is added to ``found`` (decoded). The host and port stay
    as written: a port that is not a number is refused later, naming the node."""
    node = node.strip()
    try:
        parts = urlsplit(node)
    except ValueError:
        return node  # refused by node_urls, which names it without user info
    if parts.username is None and parts.password is None:
        return node
    found.add(
        (
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )
    )
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _node_url(text: str) -> str:
    """A node address as the transport needs it, with scheme and port: ``es`` → ``http://es:9200``
    (Elasticsearch's port, as Beats and kube-eventer assume for a bare host), ``https://es.example.com``
    → port 443 (a URL with a scheme means that scheme's port, as behind an ingress). ValueError naming
    the node when it is not an http(s) address."""
    url = text.strip()
    bare = "://" not in url
    parts = http_url(f"http://{url}" if bare else url, option="node")
    if parts.port is None:
        host = parts.hostname or ""
        netloc = parts.netloc.rpartition("@")[0]
        netloc = (netloc + "@" if netloc else "") + (f"[{host}]" if ":" in host else host)
        port = 9200 if bare else (443 if parts.scheme == "https" else 80)
        url = urlunsplit(parts._replace(netloc=f"{netloc}:{port}"))
    elif bare:
        url = f"http://{url}"
    return url


def _check_index_literal(text: str, *, what: str) -> None:
    if _BAD_INDEX_CHARS.search(text):
        raise ValueError(
            f'{what} {text!r}: index names must be lower case without \\ / * ? " < > | space , # :'
        )


# ---------------------------------------------------------------------------------------- index names

_IndexName = Callable[[Occurrence], str]


def _compile_index(template: str) -> tuple[_IndexName, bool, int | None]:
    """``k8s-events-{yyyy.MM.dd}`` → a function occurrence → index name; second value: depends on
    fields; third: the span of one date bucket in nanoseconds (a day or an hour) when the names hold
    the year (a later date never names an earlier index again; ``{dd}`` alone cycles), else None."""
    pieces = _PLACEHOLDER.split(template)
    literal_text = "".join(pieces[0::2])
    if "{" in literal_text or "}" in literal_text:
        raise ValueError(f"index {template!r}: unbalanced braces")
    if not template.strip():
        raise ValueError("index must not be empty")
    _check_index_literal(literal_text, what="index")
    if template.startswith(("-", "_", "+")):
        raise ValueError(f"index {template!r} must not start with -, _ or +")
    if template in _DOT_NAMES:
        raise ValueError(f"index {template!r}: Elasticsearch and OpenSearch refuse the names . and ..")
    date_format: list[str] = []
    fields: list[str] = []
    # Each part: ("lit", text) | ("date", strftime) | ("field", path)
    parts: list[tuple[str, str]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                parts.append(("lit", piece))
            continue
        if piece in _INDEX_FIELDS:
            parts.append(("field", piece))
            fields.append(piece)
            continue

        def token(m: re.Match[str], piece: str = piece) -> str:
            if m.group(0) not in _DATE_STRFTIME:
                raise ValueError(
                    f"index {template!r}: {{{piece}}} is neither a date pattern (yyyy, yy, MM, dd, HH) "
                    f"nor a record field ({', '.join(sorted(_INDEX_FIELDS))})"
                )
            return _DATE_STRFTIME[m.group(0)]

        fmt = _DATE_TOKENS.sub(token, piece)
        _check_index_literal(re.sub(r"%[YymdH]", "0", fmt), what="index")
        parts.append(("date", fmt))
        date_format.append(fmt)
    hourly = any("%H" in f for f in date_format)
    bucket_ns = 3_600_000_000_000 if hourly else 86_400_000_000_000
    # Literal text and dates have a fixed length (years 1000-9999); the fields share what is left.
    fixed = len(literal_text.encode()) + sum(len(time.strftime(f, time.gmtime(0))) for f in date_format)
    if fixed + len(fields) * _MIN_FIELD_BYTES > _MAX_INDEX_BYTES:
        raise ValueError(
            f"index {template!r}: its names would be over {_MAX_INDEX_BYTES} bytes, the longest index "
            f"name Elasticsearch and OpenSearch accept ({fixed} bytes besides its fields)"
        )
    field_budget = _MAX_INDEX_BYTES - fixed

    def date_text(bucket: int) -> list[str]:
        tm = time.gmtime(bucket * bucket_ns // 1_000_000_000)
        year = f"{tm.tm_year:04d}"  # glibc's %Y writes year 2 as "2"
        return [time.strftime(f.replace("%Y", year), tm) for f in date_format]

    cache: BoundedCache[tuple[Any, ...], str] = BoundedCache(10_000)  # field values are open-ended

    def name(occ: Occurrence) -> str:
        bucket = occ.time_ns // bucket_ns
        values = tuple(_field_value(occ.record, f) for f in fields)
        # A value longer than the name may hold (a legacy event's 64 KB reason) is keyed by its digest:
        # kept whole, 10,000 keys of them held hundreds of MiB for names of 255 bytes.
        key = (bucket, *(v if len(v) <= field_budget else _digest(v) for v in values))
        found = cache.get(key)
        if found is not None:
            return found
        dates = iter(date_text(bucket)) if date_format else iter(())
        vals = iter(_fit(values, field_budget))
        out = []
        for kind, text in parts:
            if kind == "lit":
                out.append(text)
            elif kind == "date":
                out.append(next(dates))
            else:
                out.append(next(vals))
        text = "".join(out)
        # A field that is the whole name may be "." or "..", which the cluster refuses: as empty.
        return cache.put(key, "none" if text in _DOT_NAMES else text)

    yearly = any("%Y" in f or "%y" in f for f in date_format)
    return name, bool(fields), bucket_ns if yearly else None


def _fit(values: tuple[str, ...], budget: int) -> tuple[str, ...]:
    """Field values cut so that together they take at most ``budget`` UTF-8 bytes: a value is never
    cut below an equal share of what the shorter ones leave; a cut one is cut on a character boundary
    and ends in ``-`` and a hash of the whole value, so two values that differ only in their tail
    still name two indices (a 240-character object name is legal in Kubernetes, and a name over 255
    bytes made Elasticsearch refuse every document of it)."""
    sizes = [len(v.encode()) for v in values]
    if sum(sizes) <= budget:
        return values
    caps = [0] * len(values)
    left, count = budget, len(values)
    for i in sorted(range(len(values)), key=sizes.__getitem__):
        caps[i] = min(sizes[i], left // count)
        left -= caps[i]
        count -= 1
    out = []
    for value, size, cap in zip(values, sizes, caps, strict=True):
        if size > cap:
            digest = hashlib.sha256(value.encode()).hexdigest()[:_HASH_LEN]
            head = value.encode()[: cap - 1 - _HASH_LEN].decode("utf-8", "ignore")
            value = f"{head}-{digest}" if head else digest  # never a leading -: may start the name
        out.append(value)
    return tuple(out)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _field_value(record: dict[str, Any], path: str) -> str:
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    text = value if isinstance(value, str) else ""
    text = _BAD_INDEX_CHARS.sub("-", text.lower()).lstrip("-_+")
    return text or "none"


# ---------------------------------------------------------------------------------------- encoding


def _timestamp(ns: int, cache: BoundedCache[int, bytes]) -> bytes:
    """RFC 3339 UTC keeping the sub-second precision the event had (ms, µs or ns digits)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    base = cache.get(seconds)
    if base is None:
        # Not strftime's %Y: glibc writes year 2 as "2", which a date mapping refuses.
        base = cache.put(seconds, b"%04d-%02d-%02dT%02d:%02d:%02d" % time.gmtime(seconds)[:6])
    if frac % 1_000_000 == 0:
        return b"%s.%03dZ" % (base, frac // 1_000_000)
    if frac % 1000 == 0:
        return b"%s.%06dZ" % (base, frac // 1000)
    return b"%s.%09dZ" % (base, frac)


def _has_dot(mapping: Any) -> bool:
    return isinstance(mapping, dict) and any("." in key for key in mapping)


def _safe_keys(mapping: dict[Any, Any], repl: str, deep: bool = False) -> dict[str, Any]:
    """``mapping`` with '.' in its keys replaced. A key that then equals another (``team.io`` and
    ``team_io`` are both valid label keys) gets a number, ``team_io_2``: one value silently replaced
    the other. Keys without a dot keep their names."""
    taken = {key for key in mapping if isinstance(key, str) and "." not in key}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key)
        if "." in name:
            name = base = name.replace(".", repl)
            number = 1
            while name in taken:
                number += 1
                name = f"{base}{repl}{number}"
            taken.add(name)
        out[name] = _safe_keys_deep(value, repl) if deep else value
    return out


def _safe_keys_deep(value: Any, repl: str) -> Any:
    if isinstance(value, dict):
        return _safe_keys(value, repl, deep=True)
    if isinstance(value, list):
        return [_safe_keys_deep(v, repl) for v in value]
    return value


class _PassThrough(Serializer):
    """Request bodies are NDJSON bytes already; skip the transport's copy-and-check."""

    mimetype: ClassVar[str] = "application/x-ndjson"

    def loads(self, data: bytes) -> Any:
        return [orjson.loads(line) for line in data.splitlines() if line.strip()]

    def dumps(self, data: Any) -> bytes:
        if isinstance(data, bytes):
            return data
        raise TypeError("NDJSON bodies must be bytes")


class _Text(TextSerializer):
    """A page of text, whatever its bytes: a proxy's error page need not be UTF-8."""

    def loads(self, data: bytes) -> str:
        return data if isinstance(data, str) else data.decode("utf-8", "replace")


_JSON = OrjsonSerializer()
_NDJSON = _PassThrough()
# Added to the transport's defaults: responses may come back with the compatibility media types
# when a proxy asks for them.
_SERIALIZERS: dict[str, Serializer] = {
    "application/json": _JSON,
    "application/vnd.elasticsearch+json": _JSON,
    "application/x-ndjson": _NDJSON,
    "application/vnd.elasticsearch+x-ndjson": _NDJSON,
    "text/*": _Text(),
}
# What the transport decodes an answer with (its defaults and ours), to tell beforehand whether it can.
_DECODERS = SerializerCollection({**SerializerCollection().serializers, **_SERIALIZERS})
_USER_AGENT = f"eventrouter/{__version__} (elastic-transport/{elastic_transport.__version__})"


_ERROR_BYTES = 64 * 1024
"""Bytes read of an answer's body, not 2xx: its error is quoted from it (``_body_error``), 300
characters of a page. Read whole, a proxy's 150 MB 502 page took the router from 57 to 357 MB, past
the chart's 256Mi, at every retry."""
_WHOLE_MIN = 32 << 20
_WHOLE_PER_BYTE = 8
"""A 2xx answer is read whole (a bulk's items are the documents' outcomes) up to the larger of
``_WHOLE_MIN`` and this many bytes per byte of the request: an item is ~200 bytes for a document of
~1 KB, and a refused one quotes its value at most twice. Longer, it is not the cluster's answer to
it (a front's page): not read further, the request is retried (``_Unread``)."""


@dataclasses.dataclass(slots=True)
class _Reading:
    """How a node reads the answer to its request (``_Answer.read``), and what became of its body."""

    whole: int
    """Bytes of a 2xx answer read at most."""
    unreadable: str | None = None
    """Why the body could not be read, or was not read whole (None: it was, or an error's prefix)."""


# Set by the node around each request, in the task that makes it (as _ANSWERED is).
_READING: ContextVar[_Reading | None] = ContextVar("eventrouter_es_reading", default=None)


class _Answer:
    """An aiohttp answer as the transport's node reads it (``status``, ``headers``, ``read``), whose
    body read never raises: the transport read any body whole in the ``try`` of its request, so one
    that stalled after the head, was cut off or was not in its Content-Encoding became a
    ConnectionError or ConnectionTimeout. The status was then lost: a final 400 retried for ever, a
    413 never halved and every node marked dead in turn, a 429's Retry-After lost. An error's body is
    read in part within ``min(2 s, timeout)``, a 2xx's whole (``_Reading.whole``) within the
    request's own timeout; what could not be read is said in ``_READING``."""

    __slots__ = ("_resp", "_timeout", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, timeout: float | None) -> None:
        self._resp = resp
        self._timeout = timeout
        self.status = resp.status
        self.headers = resp.headers

    async def read(self) -> bytes:
        reading = _READING.get() or _Reading(_WHOLE_MIN)
        if 300 <= self.status < 400:
            return b""  # a redirect's page: not used (its Location is), not read
        if self.status < 300:  # aiohttp's own timer (the request's timeout) ends the wait first
            limit, wait = reading.whole, (self._timeout or 86400.0) + 1
        else:
            limit, wait = _ERROR_BYTES, min(EXCERPT_WAIT, self._timeout or EXCERPT_WAIT)
        data, more, unreadable = await excerpt(self._resp, limit, wait)
        if unreadable is None and more and self.status < 300:
            unreadable = f"longer than {limit} bytes, not read past them"
        reading.unreadable = unreadable
        return b"" if unreadable is not None else data


@contextlib.asynccontextmanager
async def _answering(request: Any, timeout: float | None) -> AsyncIterator[_Answer]:
    async with request as resp:
        yield _Answer(resp, timeout)


class _NoRedirects:
    """A node's aiohttp session that follows no redirect: aiohttp re-sends a POST answered 301/302
    as a GET without its body (the cluster answers 405, and every document was dead-lettered), and a
    307/308 sends the documents on to wherever ``Location`` says. The node uses ``request`` and
    ``close`` only; its answer is read as ``_Answer`` says."""

    __slots__ = ("_session",)

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout")
        total = timeout.total if isinstance(timeout, aiohttp.ClientTimeout) else None
        return _answering(self._session.request(method, url, allow_redirects=False, **kwargs), total or None)

    async def close(self) -> None:
        await self._session.close()


@dataclasses.dataclass(frozen=True, slots=True)
class _Try:
    """What a node is told of the bulk request it is given (through ``_TRY``, set around it)."""

    probe: float
    """Seconds a probe may take, if the node is due one."""
    cut: bool
    """Earlier requests of the send used part of this one's time (it gets less than ``timeout``)."""
    quiet: bool = False
    """Given a short time on purpose (a mapping read): its timeout says nothing of the node, which is
    neither marked dead nor probed before its next request."""


# Set around each bulk request, in the sending task; None (start's, the template's requests): the
# transport's own rules alone (a timeout marks the node dead, no probe).
_TRY: ContextVar[_Try | None] = ContextVar("eventrouter_es_try", default=None)

# The status a node answered this task's latest request with (None: no answer, a connection error or
# a timeout), which the pool reads when the transport marks that node dead. Per task, as the transport
# marks the node in the task that made the request: another send's answer cannot stand in for it.
_ANSWERED: ContextVar[int | None] = ContextVar("eventrouter_es_answered", default=None)

# Answers elastic-transport counts as a failure of the node (it keeps one alive for 2xx and
# 400-404/409 only) that say nothing of it: 413, our request over http.max_content_length (or a
# proxy's body limit), which the sink halves. Each took a working node out of the round-robin with a
# WARNING, and a batch halved twice ran every node dead and took them back by force. A whole-request
# 429 still marks its node dead: it is that node's own limit (indexing pressure, a circuit breaker),
# and the next sends going round it drained a backlog 4x faster than one send in three failing there.
_NOT_THE_NODE = frozenset({413})


class _CutShort(TransportError):
    """A request that timed out with less than its time because earlier requests of its send used the
    rest: it says nothing of the node, which may be slow and working, so the transport does not mark it
    dead (it does for a ConnectionTimeout or ConnectionError only)."""


class _Unread(TransportError):
    """A 2xx whose body could not be read (or was longer than ``_Reading.whole``): the node answered,
    so it is not marked dead, but what the cluster did is unknown."""


class _ProbeFailed(TransportConnectionError):
    """A node not known to answer did not answer ``HEAD /`` in the probe's time: a ConnectionError, so
    the transport marks it dead again (its dead time doubles)."""


class _Node(AiohttpHttpNode):
    def __init__(self, config: NodeConfig) -> None:
        super().__init__(config)
        self.unproven = False
        """Not known to answer: back from its dead time, or its latest request was cut short."""
        self.probe_due = False
        """Set by the pool as it hands the node out: unproven while another node is alive."""
        # The URL's tokens (a gateway's path segment) as aiohttp's errors quote them (see _scrubbed).
        self._secrets = credentials(urls=[self.base_url])

    def _create_aiohttp_session(self) -> None:
        super()._create_aiohttp_session()
        assert self.session is not None
        self.session = _NoRedirects(self.session)  # type: ignore[assignment]  # request/close alike

    async def perform_request(  # type: ignore[override]
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: HttpHeaders | None = None,
        request_timeout: Any = DEFAULT,
    ) -> Any:
        _ANSWERED.set(None)
        given = _TRY.get()
        due, self.probe_due = self.probe_due, False
        timeout: float | None = self.config.request_timeout if request_timeout is DEFAULT else request_timeout
        if due and given is not None and timeout is not None:
            started = time.monotonic()
            # Never cut short: a bulk request gets a tenth of the budget or more, the probe at most that.
            await self._probe(min(given.probe, timeout), headers)
            timeout = max(timeout - (time.monotonic() - started), 0.001)
        reading = _Reading(max(_WHOLE_MIN, _WHOLE_PER_BYTE * len(body or b"")))
        token = _READING.set(reading)
        try:
            resp = await super().perform_request(method, target, body, headers, timeout)
        except TransportTimeout:
            if given is None or not given.cut:
                raise  # it had a request's whole time: the transport marks it dead
            self.unproven = self.unproven or not given.quiet
            raise _CutShort(
                f"{self!r} gave no answer in the {timeout:.2g}s the send had left: not marked dead "
                "(it may be slow and working)"
            ) from None
        except TransportConnectionError as exc:
            raise self._scrubbed(exc) from None
        finally:
            _READING.reset(token)
        self.unproven = False
        _ANSWERED.set(resp.meta.status)
        if reading.unreadable is not None:
            if resp.meta.status < 300:
                raise _Unread(
                    f"{self!r} answered {resp.meta.status} but its body could not be read ({reading.unreadable})"
                )
            # The status decides (a 413 halved, a 400 refused, a 429 waits its Retry-After); the note
            # is quoted where the page would have been.
            return _with_type(resp, "text/plain", f"its body unreadable: {reading.unreadable}".encode())
        if 300 <= resp.meta.status < 400:
            # A redirect's page is no answer of the cluster's (Location is): not decoded, so that one
            # of a media type the transport cannot read (octet-stream) says "redirect", not "cannot
            # reach … SerializationError".
            return _with_type(resp, None, b"")
        if resp.meta.status >= 400 and not _decodes(resp.meta.mimetype, resp.body):
            # A proxy's page the transport cannot decode (RFC 9457 application/problem+json,
            # octet-stream, HTML labelled JSON) raised SerializationError before the sink saw the
            # status: a 413 was never halved, a 429's Retry-After was lost. Read as text, the status
            # decides, and the page is quoted.
            return _with_type(resp, "text/plain", resp.body)
        return resp

    def _scrubbed(self, exc: TransportConnectionError) -> TransportConnectionError:
        """``exc`` without the tokens of this node's URL. aiohttp's text of an answer it cannot parse
        (a header over 8190 bytes, a bad header line) and "Can not write request body for <url>" end in
        the request URL, which the transport's own warning quotes too (a retry at start, with the
        traceback), as well as our reasons and start errors. The aiohttp error (``errors``), which
        quotes it as well, is replaced by its scrubbed text."""
        text = scrub(str(exc.message), self._secrets)
        causes = [(type(e).__name__, str(e)) for e in exc.errors]
        shown = [(name, scrub(said, self._secrets)) for name, said in causes]
        if text == exc.message and shown == causes:
            return exc
        return type(exc)(text, errors=tuple(aiohttp.ClientError(f"{name}: {said}") for name, said in shown))

    async def _probe(self, timeout: float, headers: HttpHeaders | None) -> None:
        """``HEAD /`` (elasticsearch-py's ping) within ``timeout``. Any answer will do: a node that
        hangs gives none."""
        plain = HttpHeaders({k: v for k, v in (headers or {}).items() if k.lower() != "content-type"})
        try:
            await super().perform_request("HEAD", "/", None, plain, timeout)
        except TransportError as exc:
            raise _ProbeFailed(
                f"{self!r}, back from its dead time or cut short before, gave no answer to HEAD / "
                f"within {timeout:.2g}s ({type(exc).__name__})"
            ) from None
        self.unproven = False

    def __repr__(self) -> str:
        # How the transport's own warnings (a node marked dead) show it: no token of the URL's path.
        return f"<ElasticsearchNode({redact_url(self.base_url)})>"


def _decodes(mimetype: str | None, body: bytes) -> bool:
    """Whether the transport decodes ``body`` of that media type without a SerializationError."""
    try:
        _DECODERS.loads(body, mimetype)
    except (SerializationError, ValueError, TypeError):  # _PassThrough raises orjson's ValueError
        return False
    return True


def _with_type(resp: Any, mimetype: str | None, body: bytes) -> Any:
    """A node's answer with its Content-Type replaced (None: removed) and ``body``."""
    headers = HttpHeaders({k: v for k, v in resp.meta.headers.items() if k.lower() != "content-type"})
    if mimetype is not None:
        headers["content-type"] = mimetype
    return resp._replace(meta=dataclasses.replace(resp.meta, headers=headers), body=body)


class _Pool(NodePool):
    """The transport's pool, whose dead/resurrect rules stay as they are (but for a 413, which marks
    no node dead), telling a node it hands out whether to probe first: a node back from its dead time
    (or whose latest request was cut short) is probed when another node is alive to take the request
    instead. Alone (one node, or every other dead) it gets the request as it is: there is nowhere
    else to send it."""

    def resurrect(self, force: bool = False) -> BaseNode | None:  # type: ignore[override]
        node: BaseNode | None = super().resurrect(True) if force else super().resurrect(False)
        if isinstance(node, _Node):
            node.unproven = True
        return node

    def get(self) -> BaseNode:
        node = super().get()
        if isinstance(node, _Node):
            node.probe_due = node.unproven and len(self._alive_nodes) > 1
        return node

    def mark_dead(self, node: BaseNode, _now: float | None = None) -> None:
        if _ANSWERED.get() in _NOT_THE_NODE:
            # It answered, of our request only: alive, as after a 2xx.
            self.mark_live(node)
            return
        super().mark_dead(node, _now)


def _index_pattern(index: str) -> str:
    """The index pattern of every name of an ``index`` template: k8s-events-{yyyy.MM.dd} → k8s-events-*."""
    return re.sub(r"\*+", "*", _PLACEHOLDER.sub("*", index))


def _sample_index(index: str, now: float) -> str:
    """A name ``index`` gives now (fields ``none``): what the cluster is asked which template applies to."""
    tm = time.gmtime(now)

    def part(m: re.Match[str]) -> str:
        if m.group(1) in _INDEX_FIELDS:
            return "none"
        return _DATE_TOKENS.sub(lambda t: time.strftime(_DATE_STRFTIME[t.group(0)], tm), m.group(1))

    return _PLACEHOLDER.sub(part, index)


def _managed(template: dict[str, Any]) -> bool:
    meta = template.get("_meta")
    return isinstance(meta, dict) and meta.get("managed_by") == "eventrouter"


def _covers(template: dict[str, Any]) -> tuple[Any, bool]:
    """What a template applies to: its patterns, and whether it makes data streams."""
    return template.get("index_patterns"), "data_stream" in template


def _shown(template: dict[str, Any]) -> str:
    """A template's patterns as a message shows them."""
    patterns = template.get("index_patterns")
    return f"{patterns}{' (a data stream)' if 'data_stream' in template else ''}"


def _clashes(template: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether the cluster refuses ``ours`` beside ``template`` (another name): composable templates
    of one priority may not both match an index name."""
    priority = template.get("priority") or 0  # none is 0 to the cluster
    patterns = template.get("index_patterns")
    if priority != ours["priority"] or not isinstance(patterns, list):
        return False
    return any(_meet(str(a), b) for a in patterns for b in ours["index_patterns"])


def _clash_text(name: str, ours: dict[str, Any], clashes: dict[str, dict[str, Any]]) -> str:
    return (
        f"elasticsearch: index template {name!r} for {_shown(ours)} would match indices that "
        + ", ".join(f"{other!r} for {_shown(t)}" for other, t in clashes.items())
        + f" also match{'es' if len(clashes) == 1 else ''}, at the same priority {ours['priority']}, "
        "which the cluster refuses: give template_priority another value (the higher applies to the "
        "indices both match), or change index"
    )


def _meet(a: str, b: str) -> bool:
    """Whether some name matches both patterns (``*``: any text, the cluster's only wildcard), as the
    cluster decides it (the intersection of both patterns' automata is not empty): a walk of both at
    once, where a ``*`` may match nothing, or the other's next character."""
    todo, seen = [(0, 0)], set()
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j = state
        if i == len(a) and j == len(b):
            return True
        x, y = a[i : i + 1], b[j : j + 1]
        if x == "*":
            todo += [(i + 1, j)] + ([(i, j + 1)] if y not in ("", "*") else [])
        if y == "*":
            todo += [(i, j + 1)] + ([(i + 1, j)] if x not in ("", "*") else [])
        if x == y != "" and x != "*":
            todo.append((i + 1, j + 1))
    return False


def _raw_unindexed(mappings: Any) -> bool:
    """Whether ``mappings`` (as ``_simulate_index`` says a new index gets them) leave ``raw`` out of
    the index, as ours do."""
    if isinstance(mappings, dict) and "properties" not in mappings and isinstance(mappings.get("_doc"), dict):
        mappings = mappings["_doc"]  # the typed form of 7.x
    properties = mappings.get("properties") if isinstance(mappings, dict) else None
    raw = properties.get("raw") if isinstance(properties, dict) else None
    return isinstance(raw, dict) and raw.get("enabled") in (False, "false")


def _name_lists(names: list[str]) -> list[list[str]]:
    """``names`` in lists whose quoted, comma-joined form takes at most ``_JUDGE_LINE`` bytes."""
    lists: list[list[str]] = [[]]
    size = 0
    for name in names:
        length = len(quote(name, safe="")) + 1
        if lists[-1] and size + length > _JUDGE_LINE:
            lists.append([])
            size = 0
        lists[-1].append(name)
        size += length
    return lists


def _names_text(names: list[str]) -> str:
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"the mappings of {names[0]}{more}"


def index_template_body(options: ElasticsearchOptions) -> dict[str, Any]:
    """The composable index template installed by ``index_template=true``."""
    keyword = {"type": "keyword", "ignore_above": 1024}
    kw = {"type": "keyword"}
    date = {"type": "date"}
    patterns = [options.data_stream] if options.data_stream else [_index_pattern(options.index)]
    mappings: dict[str, Any] = {
        # Every time field is mapped below. Detected, the first date-shaped label or annotation value
        # of a day (2024-05-01) made that field a date in the day's index, and each later document
        # with another value there was refused (mapper_parsing_exception, dead-lettered): a string
        # detected as a date is no `string` to the dynamic templates below.
        "date_detection": False,
        "dynamic_templates": [
            {"labels": {"path_match": "labels.*", "match_mapping_type": "string", "mapping": keyword}},
            {
                "annotations": {
                    "path_match": "annotations.*",
                    "match_mapping_type": "string",
                    "mapping": keyword,
                }
            },
        ],
        "properties": {
            "@timestamp": date,
            "time": date,
            "first_time": date,
            "last_time": date,
            "schema": {"type": "integer"},
            "occurrence": {"type": "long"},
            "count": {"type": "long"},
            "series": {"type": "boolean"},
            "message": {"type": "text", "fields": {"keyword": keyword}},
            **{
                name: kw
                for name in (
                    "cluster",
                    "uid",
                    "name",
                    "namespace",
                    "type",
                    "reason",
                    "action",
                    "time_source",
                    "reporting_component",
                    "reporting_instance",
                    "source_component",
                    "source_host",
                    "resource_version",
                )
            },
            "involved_object": {
                "properties": {
                    name: kw for name in ("kind", "namespace", "name", "uid", "api_version", "field_path")
                }
            },
            "labels": {"type": "object"},
            "annotations": {"type": "object"},
            # Kept in _source, not indexed: the raw object's keys are open-ended.
            "raw": {"type": "object", "enabled": False},
        },
    }
    body: dict[str, Any] = {
        "index_patterns": patterns,
        "priority": options.template_priority,
        "template": {"mappings": mappings},
        "_meta": {"managed_by": "eventrouter"},
    }
    if options.data_stream:
        body["data_stream"] = {}
    return body


def _error_text(error: Any) -> str:
    """``type: reason (caused by type: reason)`` from an Elasticsearch error object or string."""
    if isinstance(error, dict):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
        cause = error.get("caused_by")
        if isinstance(cause, dict) and cause.get("reason") and cause.get("reason") != error.get("reason"):
            text += f" (caused by {cause.get('type')}: {cause.get('reason')})"
        return text
    return str(error) if error is not None else "no error detail"


# One block a cluster_block_exception names: "STATUS/id/description", e.g. "index [x] blocked by:
# [FORBIDDEN/8/index write (api), TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, …];"
_BLOCK = re.compile(r"\b[A-Z][A-Z_]*/\d+/")


def _block_kind(error: Any) -> Literal["index", "cluster", "other"] | None:
    """Which blocks a cluster_block_exception refusing a bulk item names.

    ``index``: only the block a node past its flood-stage disk watermark puts on every index with
    a shard there (``IndexMetadata.INDEX_READ_ONLY_ALLOW_DELETE_BLOCK``, id 12): 429
    "TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete
    block" from Elasticsearch 7.6+ and OpenSearch, 403 "FORBIDDEN/12/index read-only / allow delete
    (api)" before (item 12). Lifted by the cluster itself once disk space is back (7.4+,
    elastic/elasticsearch#42559); the other indices, on other nodes, take documents meanwhile.
    ``cluster``: the cluster-wide one (``cluster.blocks.read_only_allow_delete``, "FORBIDDEN/13/cluster
    read-only / allow delete"), which refuses every index alike. ``other``: an operator's block of
    that index is named, alone or beside those (FORBIDDEN and not a cluster's: ILM's readonly
    ``index.blocks.write``, ``index.blocks.read_only``, a closed index); it stays when the disk block
    is lifted. None when it is no block we know, or a passing one is named too (a cluster's
    maintenance block, no master: the item's status decides)."""
    if not isinstance(error, dict) or error.get("type") != "cluster_block_exception":
        return None
    reason = str(error.get("reason", ""))
    found = list(_BLOCK.finditer(reason))
    if not found:
        return None
    kinds = set()
    ends = [m.start() for m in found[1:]] + [len(reason)]
    for block, end in zip(found, ends, strict=True):
        text = reason[block.end() : end]  # its description, up to the next block
        if "cluster read-only / allow delete" in text:
            kinds.add("cluster")
        elif "index read-only / allow delete" in text or "read-only-allow-delete block" in text:
            kinds.add("index")
        elif block.group(0).startswith("FORBIDDEN/") and not text.startswith("cluster "):
            kinds.add("other")
        else:
            kinds.add("passing")
    if "other" in kinds:
        return "other"
    if "passing" in kinds:
        return None
    return "cluster" if "cluster" in kinds else "index"


# The type of an ingest processor's failure on a document, answered 500: Elasticsearch 7.5+ and
# OpenSearch render the processor's own exception (the wrapper carrying its header is unwrapped):
# the `fail` processor's FailProcessorException, dissect's DissectException.FindMatch.
_PROCESSOR_EXCEPTION = re.compile(r"([a-z0-9_]+?)_processor_exception")
_PROCESSOR_TYPES = {"find_match": "dissect", "dissect_exception": "dissect"}


def _ingest_processor(error: Any) -> str | None:
    """The type of the ingest processor that failed on this document (per-item 500), or None.
    Before 7.5 every processor failure came as a 500 ``exception`` with ``header.processor_type``
    (elastic/elasticsearch#48803); since then those with a status of their own (most: 400, rejected)
    are unwrapped, and the rest keep 500 under the processor's exception type."""
    if not isinstance(error, dict):
        return None
    header = error.get("header")
    if isinstance(header, dict):
        found = header.get("processor_type")
        if isinstance(found, list):
            found = found[0] if found else None
        if isinstance(found, str) and found:
            return found
    kind = error.get("type")
    if not isinstance(kind, str):
        return None
    if m := _PROCESSOR_EXCEPTION.fullmatch(kind):
        return m.group(1)
    return _PROCESSOR_TYPES.get(kind)


def _unavailable_shards(error: Any) -> bool:
    """A bulk item refused because its shard's primary is not active (a red index), after the
    request's ``timeout``; the other indices' items of the request go in meanwhile."""
    return isinstance(error, dict) and error.get("type") == "unavailable_shards_exception"


def _results(items: list[Any]) -> list[dict[str, Any]]:
    return [
        result
        for item in items
        if isinstance(item, dict)
        for result in item.values()
        if isinstance(result, dict)
    ]


def _accepted_indices(items: list[Any]) -> set[str]:
    return {
        _item_index(result)
        for result in _results(items)
        if isinstance(result.get("status"), int) and 200 <= result["status"] < 300
    }


def _item_index(result: dict[str, Any]) -> str:
    error = result.get("error")
    index = result.get("_index") or (error.get("index") if isinstance(error, dict) else None)
    return str(index) if index else "?"


# Elasticsearch's "this action is granted by the index privileges [create_doc,create,index,write,all]".
_GRANTED_BY = re.compile(
    r"action \[(.+?)\] is unauthorized.*granted by the (?:index )?privileges \[([^\]]*)\]"
)
# 400 answers about the target, not the document: every document sent there fails alike until the
# operator acts (creates the pipeline, names the alias's write index, sets op_type=create).
_TARGET_400 = re.compile(
    r"pipeline with id \[.*\] does not exist"
    r"|no write index is defined for alias"
    r"|only write ops with an op_type of create are allowed in data streams"
)
# A new index (the day's, at midnight) the cluster may not create: it is at cluster.max_shards_per_node.
# 400 validation_exception (ES 7/8, OpenSearch: "… [2] total shards, … maximum shards open") or
# illegal_argument_exception (newer ES: "… [2] shards, … maximum normal shards open").
_SHARD_LIMIT = re.compile(
    r"this action would add \[\d+\] (?:total )?shards, but this cluster currently has "
    r"\[\d+\]/\[\d+\] maximum (?:\w+ )?shards open"
)


def _operator_fault(status: int, error: Any, index: str, secrets: Sequence[str]) -> str | None:
    """Why a bulk item was refused when the operator, not the document, is to put it right (a
    privilege, a missing index, pipeline or write index, a read-only cluster), without our
    credentials; None when the document itself is at fault (a mapping error, a version conflict, a
    write-blocked index)."""
    cause = _operator_cause(status, error, index)  # read from the error as it came
    return scrub(cause, secrets) if cause is not None else None


def _operator_cause(status: int, error: Any, index: str) -> str | None:
    kind = error.get("type") if isinstance(error, dict) else None
    reason = str(error.get("reason", "")) if isinstance(error, dict) else str(error or "")
    text = _error_text(error)
    if status == 401:
        return f"credentials rejected writing to index {index} ({text})"
    if status == 403:
        if kind == "index_create_block_exception" or "create-index blocked" in reason:
            # OpenSearch's cluster.blocks.create_index: set by hand, or by OpenSearch itself while
            # every data node is past its high disk watermark (lifted once space is back).
            return (
                f"index {index} does not exist and the cluster blocks creating indices ({text}); "
                "free disk space or lift cluster.blocks.create_index, or create the index"
            )
        if kind == "cluster_block_exception":
            # A cluster-wide read-only block is maintenance and is lifted; an index write block (ILM's
            # readonly on an old daily index) stays: retrying would hold the sink for ever.
            return f"the cluster is read-only ({text})" if "cluster read-only" in reason else None
        granted = _GRANTED_BY.search(reason)
        if granted and granted.group(1) == "indices:admin/auto_create":
            return (
                f"index {index} does not exist and the user's role may not create it: "
                f"{granted.group(1)} needs one of the index privileges {granted.group(2)} ({text})"
            )
        if granted:
            return (
                f"the user's role lacks a privilege on index {index}: {granted.group(1)} needs one of "
                f"the index privileges {granted.group(2)} ({text})"
            )
        return f"index {index} refused the user's writes ({text})"
    if status == 404:
        if kind == "index_not_found_exception":
            return (
                f"index {index} does not exist and the cluster does not create it ({text}); "
                "create it, or allow its automatic creation (action.auto_create_index, an index template)"
            )
        return f"index {index} answered 404 ({text})"
    if status == 400 and _SHARD_LIMIT.search(reason):
        return (
            f"index {index} cannot be created: the cluster is at its shard limit ({text}); raise "
            "cluster.max_shards_per_node or delete (shrink, merge) old indices"
        )
    if status == 400 and _TARGET_400.search(reason):
        return f"index {index}: {text}"
    return None


def _index_missing(item: Any, index: str) -> bool:
    """A refused bulk item's index is ``index`` and does not exist, and the cluster (404
    index_not_found_exception) or the user's role (403 on indices:admin/auto_create) does not create it."""
    ((_, result),) = item.items()
    error = result.get("error")
    if not isinstance(error, dict) or _item_index(result) != index:
        return False
    if result.get("status") == 404:
        return error.get("type") == "index_not_found_exception"
    granted = _GRANTED_BY.search(str(error.get("reason", "")))
    return (
        result.get("status") == 403
        and granted is not None
        and granted.group(1) == "indices:admin/auto_create"
    )


def _body_error(body: Any, secrets: Sequence[str]) -> str:
    """A whole request's error as reasons and logs quote it: without our credentials, which a
    gateway in front of the cluster echoes with the request it refused (a text page, or JSON)."""
    if isinstance(body, dict) and "error" in body:
        return scrub(_error_text(body["error"]), secrets)
    if isinstance(body, (bytes, str)):
        text = (body.decode("utf-8", "replace") if isinstance(body, bytes) else body).strip()
        return scrub(text[:300], secrets, partial=len(text) > 300) or "empty body"
    return "no error detail"


def _item_text(item: Any, secrets: Sequence[str]) -> str:
    """A malformed bulk item as a reason quotes it: cut, without our credentials."""
    text = repr(item)
    return scrub(text[:200], secrets, partial=len(text) > 200)


def _api_key_forms(key: str) -> list[str]:
    """An API key given encoded or as id:key: both forms, and the key part."""
    if ":" in key:
        pair, encoded = key, base64.b64encode(key.encode()).decode()
    else:
        encoded = key
        try:
            pair = base64.b64decode(key, validate=True).decode()
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
            pair = ""
    return [encoded, pair, pair.partition(":")[2]]


def _retry_after(meta: ApiResponseMeta) -> float | None:
    return parse_retry_after(meta.headers.get("retry-after"))


# ---------------------------------------------------------------------------------------- the sink

_Entry = tuple[int, bytes]  # (position in the batch, action line + document line)


@dataclasses.dataclass(slots=True)
class _Run:
    """One send, across its bulk requests (several when a 413 halves it)."""

    began: float
    deadline: float
    """time.monotonic() by which the send ends on its own (the context's ``send_budget``)."""
    taken: int = 0
    """Requests the cluster answered 2xx."""
    requests: int = 0
    """Requests made: mapping reads and bulk requests (a node failing its probe counts)."""
    last: float = 0.0
    """Seconds the latest request took."""
    stop: RetryableError | None = None
    """A part answered retry as a whole: the parts not sent yet get that answer."""
    refused: dict[str, str] = dataclasses.field(default_factory=dict)
    """Index (or "index [error type]": some of its documents) → why, when the operator has to put it
    right."""
    accepted: set[str] = dataclasses.field(default_factory=set)
    """Indices that took a document (tracked while any is refused)."""
    missing: set[int] = dataclasses.field(default_factory=set)
    """Positions refused because their (dated) index does not exist."""
    unstarted: list[int] = dataclasses.field(default_factory=list)
    """Positions not sent for want of time (``_half``)."""
    verbatim: set[int] = dataclasses.field(default_factory=set)
    """Positions whose raw went as it is, where the sink may dot-replace it (``_raw_refused``)."""


class ElasticsearchSink(Sink[ElasticsearchOptions]):
    options_model = ElasticsearchOptions
    description = "Elasticsearch 7/8/9 and OpenSearch: _bulk into daily indices or a data stream."
    refusal_memory: ClassVar[float] = 3600.0
    """Seconds without a refusal from an index after which its refusal is logged again."""
    server_error_tries: ClassVar[int] = 3
    """Per-item 5xx answers in a row after which a document is set aside (``defer``): until then it
    is retried in place, as a passing fault of the cluster is."""
    judged_max: ClassVar[int] = 10_000
    """Index names whose judgment of raw is kept (``_judge_raw``); past it the oldest is forgotten."""
    read_pause: ClassVar[float] = 30.0
    """Seconds mapping reads pause after one went unanswered (doubling while they fail, to 10 min)."""

    def __init__(self, options: ElasticsearchOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self._client: AsyncTransport | None = None
        self._nodes = options.node_urls()
        # As messages show them: node URLs hold no credentials once validated, but a path or query
        # may still carry a token (a proxy's).
        self._shown = ", ".join(redact_url(u) for u in self._nodes)
        self._index_name, by_field, bucket_ns = _compile_index(options.index)
        # Dated names from the date alone (the default k8s-events-{yyyy.MM.dd}): one series, so a
        # newer index accepting documents says an older missing one was removed (_reject_removed).
        self._series_ns = None if options.data_stream or by_field else bucket_ns
        self._newest_ok: tuple[int, str] | None = None  # (time bucket, index) of the newest accepted
        self._action = options.op_type or ("create" if options.data_stream else "index")
        self._prefix_cache: BoundedCache[str, bytes] = BoundedCache(10_000)
        self._ts_cache: BoundedCache[int, bytes] = BoundedCache(4096)
        self._repl = options.dot_replacement
        # With our template the raw object is not indexed, so its dotted keys cannot clash: kept as it
        # is once start installed it and the cluster says a new index gets mappings that leave raw
        # unindexed (``_template_applies``), and only into an index whose own mapping does (or that
        # is not there yet): index name → whether it does (``_judge_raw``).
        self._raw_verbatim = False
        # Not a BoundedCache: emptied after every relist burst (and wholly when full), each index was
        # read again, and one without our mappings warned about again. Oldest first.
        self._raw_kept: OrderedDict[str, bool] = OrderedDict()
        self._mapping_refusal_logged = False
        # Reads answered 408/429/5xx or not in time pause (every name not judged is dot-replaced
        # meanwhile): a cluster shedding load got one more read per new index name at every retry.
        self._reads_after = 0.0
        self._pause = self.read_pause
        self._bulk_path = "/_bulk"
        if options.pipeline:
            self._bulk_path += f"?pipeline={quote(options.pipeline, safe='')}"
        self._headers = {"accept": "application/json", **self._auth_header()}
        self._bulk_headers = {"content-type": "application/x-ndjson", **self._headers}
        self._json_headers = {"content-type": "application/json", **self._headers}
        # Ours, out of the error text quoted in reasons and logs: a gateway echoes the request it refused.
        auth = self._headers.get("authorization", "")
        secrets = [s.get_secret_value() for s in (options.password, options.bearer_token) if s is not None]
        if options.api_key is not None:
            secrets += _api_key_forms(options.api_key.get_secret_value())
        self._secrets = credentials([*secrets, auth.partition(" ")[2]], sent=[auth], urls=self._nodes)
        # Refusals the operator has to put right (a role's privilege, a missing index or pipeline),
        # already logged: once per run of failures, not at every retry. By index (cause, when last
        # refused; oldest first); the whole request's by status.
        self._refusals: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._request_refusal: int | None = None
        # _id → per-item 5xx answers in a row (oldest first; bounded): see server_error_tries.
        self._server_errors: dict[str, int] = {}
        # HEAD / to a node not known to answer, before a bulk request: a tenth of the longest a request
        # may take (2.5 s by default), so that one still hanging holds a send up that long, not 25 s.
        self._probe_time = min(options.timeout, context.send_budget) / 10

    def __repr__(self) -> str:
        return f"<ElasticsearchSink {self.context.name} nodes=[{self._shown}]>"

    def _auth_header(self) -> dict[str, str]:
        o = self.options
        if o.api_key is not None:
            key = o.api_key.get_secret_value()
            if ":" in key:  # id:key → the encoded form Elasticsearch expects
                key = base64.b64encode(key.encode()).decode()
            return {"authorization": f"ApiKey {key}"}
        if o.bearer_token is not None:
            return {"authorization": f"Bearer {o.bearer_token.get_secret_value()}"}
        if o.username:
            pw = o.password.get_secret_value() if o.password is not None else ""
            token = base64.b64encode(f"{o.username}:{pw}".encode()).decode()
            return {"authorization": f"Basic {token}"}
        return {}

    # -- lifecycle

    def _node_configs(self) -> list[NodeConfig]:
        o = self.options
        configs = []
        for url in self._nodes:
            config = url_to_node_config(url)
            if config.scheme == "https":
                tls: dict[str, Any] = {}
                if o.ca_file:
                    tls["ca_certs"] = o.ca_file
                if o.cert_file:
                    tls["client_cert"] = o.cert_file
                if o.key_file:
                    tls["client_key"] = o.key_file
                if o.insecure_skip_verify:
                    tls["verify_certs"] = False
                    tls["ssl_show_warn"] = False  # asked for explicitly; a warning per request helps nobody
                config = config.replace(**tls)
            # Credentials in the URL became an authorization header; the options' own header wins.
            configs.append(
                config.replace(
                    http_compress=o.compress,
                    request_timeout=o.timeout,
                    headers={**config.headers, "user-agent": _USER_AGENT},
                )
            )
        return configs

    def _make_client(self) -> AsyncTransport:
        try:
            return AsyncTransport(
                self._node_configs(),
                serializers=_SERIALIZERS,
                node_class=_Node,
                node_pool_class=_Pool,
                # A node marked dead is tried again after 1, 2, 4 … s, then every 5 min instead of
                # every 30 s: each try of one that accepts and never answers costs a send the probe's
                # time (a node that comes back is used again at once when the others fail).
                max_dead_node_backoff=300.0,
                meta_header=False,
                # The engine owns retries; they are switched off per request too.
                max_retries=0,
                retry_on_status=(),
                retry_on_timeout=False,
            )
        except (ValueError, TypeError) as exc:
            raise SinkError(f"elasticsearch: bad node configuration {self._shown}: {exc}") from None

    async def start(self) -> None:
        deadline = time.monotonic() + self.context.send_budget
        self._raw_kept.clear()  # judged again: the template may have changed meanwhile
        self._reads_after, self._pause = 0.0, self.read_pause
        await self._connect(deadline)
        if self.options.index_template:
            await self._install_template(deadline)

    async def check(self) -> None:
        """``start``'s reads without its writes: as ``start`` did, ``eventrouter check`` of a candidate
        configuration installed its index template into the cluster it checked, replacing the running
        router's (a side effect of a validation, as the file sink's check had). It says what start
        would do with the template, and fails where start would."""
        deadline = time.monotonic() + self.context.send_budget
        await self._connect(deadline)
        if self.options.index_template:
            await self._install_template(deadline, write=False)

    async def _connect(self, deadline: float) -> None:
        """``GET /``: the cluster answers, and takes our credentials."""
        if self.options.timeout > self.context.send_timeout:
            self.log.warning(
                "%s: timeout=%gs is longer than the pipeline's send_timeout=%gs: each request's timeout "
                "is cut to what is left of its send (at most %gs)",
                self.context.name,
                self.options.timeout,
                self.context.send_timeout,
                self.context.send_budget,
            )
        if self._client is None:
            self._client = self._make_client()
        tries = len(self._nodes)
        try:
            # At start every node may be tried once, so one dead node does not fail the boot: each
            # within its share of the budget, so that one that never answers leaves time for the next.
            meta, body = await self._request(
                "GET", "/", None, self._headers, timeout=self._time_left(deadline, tries), tries=tries
            )
        except _Unread as exc:
            await self.aclose()
            raise SinkError(f"elasticsearch: GET /: {exc.message}") from None
        except TransportError as exc:
            await self.aclose()
            raise SinkError(
                f"elasticsearch: cannot reach {self._shown}: {_transport_text(exc, self._secrets)}"
            ) from None
        why = _body_error(body, self._secrets) if meta.status != 200 else ""
        if 300 <= meta.status < 400:
            await self.aclose()
            raise SinkError(
                f"elasticsearch: GET / on {_node_text(meta)} answered {meta.status} "
                f"({_location(meta)}): a redirect, which the sink does not follow (a bulk POST would "
                "come back a GET, or go on to another host); give that URL"
            )
        if meta.status == 401:
            await self.aclose()
            raise SinkError(
                f"elasticsearch: credentials rejected by {_node_text(meta)} ({meta.status} {why})"
            )
        if meta.status == 403:
            # Authenticated, but GET / needs the `monitor` cluster privilege, which a writer that holds
            # index privileges only (create_doc, create_index) lacks: its bulk requests work. The
            # first bulk request says whether writing is allowed.
            self.log.warning(
                "%s: %s refused GET / (403 %s); going on: a role with index privileges only may write "
                "without seeing the cluster's version",
                self.context.name,
                _node_text(meta),
                why,
            )
        elif meta.status != 200:
            await self.aclose()
            raise SinkError(f"elasticsearch: GET / on {_node_text(meta)} answered {meta.status}: {why}")
        else:
            # Any answer will do (a gateway's root, an ES-compatible product): a `version` that is no
            # object (null, "8.15.0") raised AttributeError at every start.
            version = body.get("version") if isinstance(body, dict) else None
            if not isinstance(version, dict):
                version = {}
            self.log.info(
                "%s: connected to %s %s at %s",
                self.context.name,
                version.get("distribution", "elasticsearch"),
                version.get("number", "?"),
                _node_text(meta),
            )

    async def _install_template(self, deadline: float, *, write: bool = True) -> None:
        """Install our index template, or update it, unless one of its name is there that is not ours
        or is ours for other indices: another router's, whose next indices, once it was replaced, had
        no mappings while that router sent ``raw`` verbatim (dotted keys and date-shaped labels refused
        all day). One the cluster refuses beside another of its priority fails start, and ``check``,
        which foresees it, naming that other."""
        name, ours = self.options.template_name, index_template_body(self.options)
        listed = await self._list_templates(deadline)
        found = listed.pop(name, None)
        if found is None and write:
            # Created only if still absent (create=true): two routers started together both found
            # none, and the later PUT replaced the other's pattern (item 265's fault). Refused, it
            # reads who holds the name now and goes on as if it had been there.
            meta, body = await self._template_call(
                "PUT",
                name,
                orjson.dumps(ours),
                deadline,
                f"installing index template {name!r}",
                (400,),
                create=True,
            )
            if meta.status == 200:
                await self._installed(name, deadline)
                return
            listed = await self._list_templates(deadline)
            found = listed.pop(name, None)
            if found is None:
                await self._refused(name, ours, listed, meta, body)
        if found is not None and self._left_alone(name, found, ours):
            return
        clashes = {other: t for other, t in listed.items() if _clashes(t, ours)}
        if not write:
            if clashes:
                await self.aclose()
                raise SinkError(_clash_text(name, ours, clashes))
            self.log.info(
                "%s: index template %r: %s",
                self.context.name,
                name,
                "there, start updates it" if found is not None else "not there, start installs it",
            )
            return
        # The cluster decides (a product of laxer rules may take it); its 400 is then explained.
        meta, body = await self._template_call(
            "PUT",
            name,
            orjson.dumps(ours),
            deadline,
            f"installing index template {name!r}",
            (400,) if clashes else (),
        )
        if meta.status == 400:
            await self._refused(name, ours, listed, meta, body)
        await self._installed(name, deadline)

    async def _installed(self, name: str, deadline: float) -> None:
        self.log.info("%s: index template %r installed", self.context.name, name)
        self._raw_verbatim = await self._template_applies(name, deadline)

    async def _refused(
        self,
        name: str,
        ours: dict[str, Any],
        listed: dict[str, dict[str, Any]],
        meta: ApiResponseMeta,
        body: Any,
    ) -> NoReturn:
        """Start fails: the cluster answered 400 to our template's PUT, explained when another of its
        priority matches the same indices."""
        await self.aclose()
        why = _body_error(body, self._secrets)
        clashes = {other: t for other, t in listed.items() if _clashes(t, ours)}
        if clashes:
            raise SinkError(f"{_clash_text(name, ours, clashes)} (the cluster answered 400 {why})")
        raise SinkError(
            f"elasticsearch: installing index template {name!r} on {_node_text(meta)} failed: 400 {why}"
        )

    def _left_alone(self, name: str, found: dict[str, Any], ours: dict[str, Any]) -> bool:
        """Whether the template ``found`` under our name is left as it is (with a warning): an
        operator's, or another router's (for other indices). Not a failed start: that router, or one
        of an older version, may well keep writing there, and this one's events still go out."""
        if not _managed(found):
            why = "is not eventrouter's (no _meta.managed_by: eventrouter)"
        elif _covers(found) != _covers(ours):
            why = (
                f"is eventrouter's for {_shown(found)} (another router's, or this one's before index "
                f"changed), not for {_shown(ours)}"
            )
        else:
            return False
        # Renamed, ours would be refused beside it if an index can match both at one priority.
        also = ", and template_priority to another value" if _clashes(found, ours) else ""
        self.log.warning(
            "%s: index template %r %s: left as it is, this router's is not installed, and raw is sent "
            "with the dots of its keys replaced; set template_name to install this router's own%s",
            self.context.name,
            name,
            why,
            also,
        )
        return True

    async def _list_templates(self, deadline: float) -> dict[str, dict[str, Any]]:
        """The cluster's composable index templates by name (one read: ours, and those beside it)."""
        meta, body = await self._template_call("GET", None, None, deadline, "listing index templates", (404,))
        found = body.get("index_templates") if meta.status == 200 and isinstance(body, dict) else None
        return {
            entry["name"]: entry["index_template"]
            for entry in (found if isinstance(found, list) else ())
            if isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("index_template"), dict)
        }

    async def _template_applies(self, name: str, deadline: float) -> bool:
        """Whether a new index gets mappings that leave ``raw`` unindexed (ours), so that its dotted keys
        cannot clash: of the composable templates matching it the one of the highest priority alone
        applies, and an operator's own for the same indices (to add ILM or shard settings) silently
        took ours over. Read from the mappings the cluster says a new index of today's gets (7.9+ and
        OpenSearch: ``_simulate_index``), not from the names it passed over, which list a legacy
        (``_template``) one of our name although ours applies. A cluster without that API (an
        older one: no 200) is taken as yes, as before; a 200 without a template says none applies
        (``{}``: another start replaced our patterns since), which is no."""
        sample = self.options.data_stream or _sample_index(self.options.index, time.time())
        try:
            meta, body = await self._request(
                "POST",
                f"/_index_template/_simulate_index/{quote(sample, safe='')}",
                None,
                self._headers,
                timeout=self._time_left(deadline),
            )
        except TransportError:
            return True
        if meta.status != 200 or not isinstance(body, dict):
            return True
        simulated = body.get("template")
        if not isinstance(simulated, dict):
            self.log.warning(
                "%s: index template %r is installed, but the cluster says no index template applies to "
                "new indices such as %s (another start changed its index patterns since): raw is sent "
                "with the dots of its keys replaced",
                self.context.name,
                name,
                sample,
            )
            return False
        if _raw_unindexed(simulated.get("mappings")):
            return True
        self.log.warning(
            "%s: index template %r is installed, but another of a higher priority applies to new "
            "indices such as %s (composable templates do not merge): our mappings do not, and raw is "
            "sent with the dots of its keys replaced; raise template_priority, or move the other's "
            "settings into a component template",
            self.context.name,
            name,
            sample,
        )
        return False

    async def _template_call(
        self,
        method: str,
        name: str | None,
        payload: bytes | None,
        deadline: float,
        doing: str,
        expected: tuple[int, ...] = (),
        create: bool = False,
    ) -> tuple[ApiResponseMeta, Any]:
        """One request to ``/_index_template/<name>`` (None: all of them; ``create``: a PUT that may
        not replace one there); SinkError (the client closed) unless answered 200 or one of
        ``expected``."""
        path = "/_index_template" if name is None else f"/_index_template/{quote(name, safe='')}"
        if create:
            path += "?create=true"
        try:
            meta, body = await self._request(
                method,
                path,
                payload,
                self._json_headers if payload is not None else self._headers,
                timeout=self._time_left(deadline),
            )
        except TransportError as exc:
            await self.aclose()
            raise SinkError(f"elasticsearch: {doing}: {_transport_text(exc, self._secrets)}") from None
        if meta.status != 200 and meta.status not in expected:
            await self.aclose()
            raise SinkError(
                f"elasticsearch: {doing} on {_node_text(meta)} failed: "
                f"{meta.status} {_body_error(body, self._secrets)}"
            )
        return meta, body

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- requests

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        *,
        timeout: float,
        tries: int = 1,
    ) -> tuple[ApiResponseMeta, Any]:
        assert self._client is not None
        resp = await self._client.perform_request(
            method,
            path,
            body=body,
            headers=headers,
            # The engine owns retries and backoff; the transport must not retry behind its back.
            # Only start's GET / tries the next node, after a timeout too (a node that never answers).
            max_retries=tries - 1,
            retry_on_status=(),
            retry_on_timeout=tries > 1,
            request_timeout=timeout,
        )
        return resp.meta, resp.body

    def _time_left(self, deadline: float, share: int = 1) -> float:
        """A request's timeout: ``timeout``, or what is left until ``deadline`` (divided among
        ``share`` tries) if that is less; at least a tenth of the budget. The transport then times out
        a node that does not answer before the engine cuts the send off (which left the node in the
        round-robin: with two nodes, every other send waited for it); it is marked dead then, or, cut
        short before its `timeout`, probed before its next request."""
        left = max(deadline - time.monotonic(), self.context.send_budget / 10)
        return min(self.options.timeout, left / share)

    # -- encoding

    def _encode(self, occ: Occurrence, index: str | None = None) -> bytes:
        """Action line + document line for one occurrence (to ``index``, default its own). Raises
        TypeError/ValueError for bad input."""
        index = index or self.options.data_stream or self._index_name(occ)
        prefix = self._prefix_cache.get(index)
        if prefix is None:
            prefix = self._prefix_cache.put(
                index, b'{"%s":{"_index":%s,"_id":' % (self._action.encode(), orjson.dumps(index))
            )
        doc_id = orjson.dumps(f"{occ.uid}-{occ.number}")
        ts = _timestamp(occ.time_ns, self._ts_cache)
        record = occ.record
        include_raw = self.options.include_raw
        if not include_raw and (
            self._repl == "." or not (_has_dot(record.get("labels")) or _has_dot(record.get("annotations")))
        ):
            # Fast path: splice @timestamp into the record JSON every sink shares (encoded once).
            doc = occ.json
            if len(doc) > 2:
                return b'%s%s}}\n{"@timestamp":"%s",%s\n' % (prefix, doc_id, ts, doc[1:])
        fixed: dict[str, Any] = {"@timestamp": ts.decode(), **record}
        if self._repl != ".":
            for key in ("labels", "annotations"):
                value = record.get(key)
                if isinstance(value, dict) and _has_dot(value):
                    fixed[key] = _safe_keys(value, self._repl)
        if include_raw:
            verbatim = self._repl == "." or (self._raw_verbatim and self._raw_kept.get(index))
            fixed["raw"] = occ.raw if verbatim else _safe_keys_deep(occ.raw, self._repl)
        return b"%s%s}}\n%s\n" % (prefix, doc_id, orjson.dumps(fixed))

    async def _judge_raw(self, names: Iterable[str], run: _Run) -> None:
        """Judge whether ``raw`` may go verbatim into each index of ``names`` not judged yet. The
        template decides what a new index gets, but one that exists keeps the mappings it was made
        with: made before index_template was on, a fixed or undated name, another's. There raw's dotted
        keys were refused (mapper_parsing_exception, dead-lettered) for the rest of the day, or for ever.

        Many names a read (a read each, in turn, took half of a slow cluster's send, and the bulk timed
        out at every send), within a tenth of the send; a name not judged in that time, or while the
        reads pause, is dot-replaced in this send and asked again in a later one."""
        todo = [index for index in names if index not in self._raw_kept]
        if not todo or time.monotonic() < self._reads_after:
            return
        until = time.monotonic() + self._probe_time
        for chunk in _name_lists(todo):
            left = until - time.monotonic()
            if left < self._probe_time / 4:
                return  # the rest in the next send
            run.requests += 1  # the bulk then has less than its whole time: cut short, no node's fault
            judged = await self._read_mappings(chunk, left)
            if judged is None:
                return
            for index, kept in judged.items():
                self._judged(index, kept)

    def _judged(self, index: str, kept: bool) -> None:
        self._raw_kept[index] = kept
        if len(self._raw_kept) > self.judged_max:
            self._raw_kept.popitem(last=False)

    async def _read_mappings(self, names: list[str], timeout: float) -> dict[str, bool] | None:
        """Whether each index of ``names`` leaves ``raw`` unindexed, as our template's does (every
        index an alias or data stream of that name holds); True when it is not there yet (the
        template makes it); None if not known now (the reads pause then)."""
        path = "/" + ",".join(quote(index, safe="") for index in names) + _JUDGE_QUERY
        token = _TRY.set(_Try(self._probe_time, cut=True, quiet=True))
        try:
            meta, body = await self._request("GET", path, None, self._headers, timeout=timeout)
        except SerializationError as exc:  # a 200 in a media type the transport does not read
            what = f"with what the transport cannot decode ({scrub(str(exc.message), self._secrets)[:300]})"
            return self._unreadable(names, f"{self._shown} answered a read of {_names_text(names)} {what}")
        except TransportError:
            self._pause_reads(None)
            return None
        finally:
            _TRY.reset(token)
        if meta.status in (408, 429) or meta.status >= 500:
            self._pause_reads(_retry_after(meta))
            return None
        self._pause = self.read_pause
        if meta.status != 200:
            return self._unreadable(
                names,
                f"{_node_text(meta)} answered {meta.status} to a read of {_names_text(names)} "
                f"({_body_error(body, self._secrets)})"
                + (
                    " (a role needs view_index_metadata on them to have raw kept as it is)"
                    if meta.status in (401, 403)
                    else ""
                ),
            )
        if not isinstance(body, dict) or not all(isinstance(entry, dict) for entry in body.values()):
            # A gateway's or sign-in proxy's page: nothing is known of the indices.
            return self._unreadable(
                names,
                f"{_node_text(meta)} answered a read of {_names_text(names)} with what is not the "
                f"cluster's answer, as something before it (a gateway, a sign-in proxy) does "
                f"({meta.mimetype or 'no Content-Type'}: {_body_error(body, self._secrets)})",
            )
        return self._judged_from(names, body)

    def _judged_from(self, names: list[str], body: dict[str, Any]) -> dict[str, bool]:
        """The judgments of ``names`` from the get-index answer: by index, keyed by its own name, its
        aliases' and its data stream's. An index that none of them names (a data stream's backing
        index where the answer does not say its stream: OpenSearch, Elasticsearch before 7.11) judges
        every name not named in the answer, which is then not known to be missing."""
        wanted = set(names)
        reached: dict[str, list[Any]] = {}
        unnamed: list[Any] = []
        for index, entry in body.items():
            aliases = entry.get("aliases")
            via = {index, *(aliases if isinstance(aliases, dict) else ()), entry.get("data_stream")}
            for name in wanted.intersection(via):
                reached.setdefault(name, []).append(entry.get("mappings"))
            if wanted.isdisjoint(via):
                unnamed.append(entry.get("mappings"))
        judged = {}
        for index in names:
            mappings = reached.get(index, unnamed)
            judged[index] = kept = all(_raw_unindexed(m) for m in mappings)
            if not kept:
                self.log.warning(
                    "%s: index %s exists without the mappings of index template %r (made before "
                    "index_template was on, or not from it): raw is sent there with the dots of its keys "
                    "replaced",
                    self.context.name,
                    index,
                    self.options.template_name,
                )
        return judged

    def _unreadable(self, names: list[str], what: str) -> dict[str, bool]:
        """``names`` judged dot-replaced (safe whatever their mapping), and the first time why."""
        if not self._mapping_refusal_logged:
            self._mapping_refusal_logged = True
            self.log.warning(
                "%s: %s: raw is sent with the dots of its keys replaced into indices whose mapping the "
                "sink cannot read",
                self.context.name,
                what,
            )
        return dict.fromkeys(names, False)

    def _pause_reads(self, retry_after: float | None) -> None:
        """No read for a while (what a 429's Retry-After asks, if longer), longer while they fail."""
        if self._pause == self.read_pause:  # the first of a run
            self.log.info(
                "%s: a read of index mappings went unanswered: raw is sent with the dots of its keys "
                "replaced into indices not judged yet, and the reads pause %gs",
                self.context.name,
                self._pause,
            )
        self._reads_after = time.monotonic() + max(self._pause, retry_after or 0.0)
        self._pause = min(self._pause * 2, _MAX_READ_PAUSE)

    def _raw_refused(self, index: str, item: Any) -> bool:
        """Whether the cluster refused ``raw``, sent verbatim into an index judged to leave it unindexed
        (found missing, then made without our mappings: another start replaced the template's
        patterns since). That index gets raw dot-replaced from now on; each document of a bulk so
        refused is sent again, not only the first (the judgment it was sent by is the caller's)."""
        result = next(iter(item.values()), None) if isinstance(item, dict) else None
        if (
            not isinstance(result, dict)
            or result.get("status") != 400
            or "[raw." not in _error_text(result.get("error"))
        ):
            return False
        if self._raw_kept.get(index):
            self._judged(index, False)
            self.log.warning(
                "%s: index %s refused raw's keys as they are (%s): it was made without the mappings of "
                "index template %r; raw is sent there with the dots of its keys replaced",
                self.context.name,
                index,
                scrub(_error_text(result.get("error")), self._secrets),
                self.options.template_name,
            )
        return True

    # -- send

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        if self._client is None:
            raise RetryableError("elasticsearch sink is not started")
        began = time.monotonic()
        run = _Run(began, began + self.context.send_budget)
        outcomes: list[Outcome] = [OK] * len(batch)
        entries: list[_Entry] = []
        limit = self.options.max_document_bytes
        names: list[str] | None = None
        if self._raw_verbatim and self.options.include_raw and self._repl != ".":
            names = [self.options.data_stream or self._index_name(occ) for occ in batch]
            await self._judge_raw(dict.fromkeys(names), run)
        for i, occ in enumerate(batch):
            try:
                line = self._encode(occ, names[i] if names is not None else None)
            except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
                outcomes[i] = reject(f"cannot encode as JSON: {exc}")
                continue
            if len(line) > limit:
                outcomes[i] = reject(f"document is {len(line)} bytes, more than max_document_bytes={limit}")
                continue
            entries.append((i, line))
            if names is not None and self._raw_kept.get(names[i]):
                # Refused so, it is sent again dot-replaced, however the index is judged by then.
                run.verbatim.add(i)
        if entries:
            await self._bulk(batch, entries, outcomes, run)
            if run.missing and self._series_ns is not None:
                self._reject_removed(batch, outcomes, run.refused, run.missing, self._series_ns)
            if run.refused or self._refusals:
                self._note_refusals(run.refused, run.accepted)
            if run.unstarted and any(o.defer and not o.held for o in outcomes):
                # A document set aside, and the send out of time: what it did not start waits aside
                # too (due at once, no attempt). Answered a retry in place, it took the one set aside
                # back in place with it (the engine retries a batch whole when any of it is), at the
                # head of every resend, each an attempt: at retry_max_attempts the documents not yet
                # in were dead-lettered with it; without, they waited a doubling backoff behind it
                # (what item 192 found in the webhook sink).
                for i in run.unstarted:
                    held = outcomes[i]
                    if held.held and not held.defer:
                        outcomes[i] = retry(held.reason, retry_after=0.0, held=True, defer=True)
        return outcomes

    def _note_newest(
        self, batch: Sequence[Occurrence], entries: list[_Entry], items: list[Any], span: int
    ) -> None:
        """Remember the newest dated index that accepted a document in this run (as the template
        names it: an ingest pipeline may send a document elsewhere)."""
        newest = self._newest_ok[0] if self._newest_ok is not None else None
        for (i, _), item in zip(entries, items, strict=True):
            bucket = batch[i].time_ns // span
            if newest is not None and bucket <= newest:
                continue
            result = next(iter(item.values()), None) if isinstance(item, dict) else None
            status = result.get("status") if isinstance(result, dict) else None
            if isinstance(result, dict) and isinstance(status, int) and 200 <= status < 300:
                index = self._index_name(batch[i])
                if _item_index(result) == index:
                    newest = bucket
                    self._newest_ok = (bucket, index)

    def _reject_removed(
        self,
        batch: Sequence[Occurrence],
        outcomes: list[Outcome],
        refused: dict[str, str],
        missing: set[int],
        span: int,
    ) -> None:
        """Dead-letter a late document whose daily (hourly) index is gone while a newer one accepts.

        With automatic index creation off (or a role that may not create indices), a late event for
        a day whose index retention removed (an ILM delete phase, Curator) was refused for ever: with
        the default retry_max_attempts=0, set aside and retried every 30 s, one ERROR a run. The
        index will not come back, so it is rejected: counted, in the dead-letter file, replayable
        once the index is restored. Only for names made of a date with its year alone (one series,
        never named again: a newer index of it accepting says this one was there and is gone), older
        than both that index and the current date. A missing index of today, of a template with
        record fields, or before any newer one accepted in this run (a cluster being set up) is
        still retried."""
        if self._newest_ok is None:
            return
        newest, newer_index = self._newest_ok
        current = time.time_ns() // span
        gone: set[str] = set()
        for i in sorted(missing):
            bucket = batch[i].time_ns // span
            index = self._index_name(batch[i])
            if bucket < newest and bucket < current and index != newer_index:  # {yyyy.MM}: same month
                outcomes[i] = reject(
                    f"{outcomes[i].reason}; index {index} is older than {newer_index}, which accepts "
                    "documents: removed by retention (an ILM delete phase, Curator), it is not created "
                    "again (restore it, then replay this)"
                )
                gone.add(index)
        for index in gone:  # rejected, not retried: no "retried until put right" line
            refused.pop(index, None)

    async def _bulk(
        self, batch: Sequence[Occurrence], entries: list[_Entry], outcomes: list[Outcome], run: _Run
    ) -> None:
        body = b"".join(line for _, line in entries)
        started = time.monotonic()
        try:
            meta, resp = await self._bulk_request(body, run)
        except _CutShort as exc:
            raise RetryableError(f"elasticsearch: bulk request cut short: {exc.message}") from None
        except _ProbeFailed as exc:
            raise RetryableError(f"elasticsearch: bulk request not sent: {exc.message}") from None
        except _Unread as exc:
            raise RetryableError(
                f"elasticsearch: bulk request: {exc.message}: which documents went in is unknown; sent "
                "again (each under its own _id: no second copy)"
            ) from None
        except TransportTimeout as exc:
            raise RetryableError(
                f"elasticsearch: bulk request timed out: {_transport_text(exc, self._secrets)}"
            ) from None
        except TransportError as exc:
            raise RetryableError(
                f"elasticsearch: bulk request failed: {_transport_text(exc, self._secrets)}"
            ) from None
        finally:
            run.last = time.monotonic() - started
        status = meta.status
        why = _body_error(resp, self._secrets) if status >= 300 else ""
        if status == 413:
            # Too large for http.max_content_length: halve until it fits; a single document is refused.
            if len(entries) == 1:
                outcomes[entries[0][0]] = reject(f"document too large for the cluster (413 {why})")
                return
            mid = len(entries) // 2
            for half in (entries[:mid], entries[mid:]):
                await self._half(batch, half, outcomes, run)
            return
        if status == 429 or status == 408 or status >= 500:
            raise RetryableError(
                f"elasticsearch: bulk answered {status}: {why}", retry_after=_retry_after(meta)
            )
        if 300 <= status < 400:
            self._log_request_refusal(meta, resp)
            raise RetryableError(f"elasticsearch: bulk request redirected: {status} ({_location(meta)})")
        if status in (401, 403, 404, 405):
            # The credentials (revoked or rotated before the Secret reached the pod), the role or the
            # URL (405: something before the cluster takes no POST there): the same documents succeed
            # once that is put right. Retried, not dead-lettered.
            self._log_request_refusal(meta, resp)
            raise RetryableError(f"elasticsearch: bulk request refused: {status} {why}")
        if status >= 300:
            reason = f"bulk request refused: {status} {why}"
            for i, _ in entries:
                outcomes[i] = reject(reason)
            return
        self._request_refusal = None
        run.taken += 1
        items = resp.get("items") if isinstance(resp, dict) else None
        if not isinstance(items, list) or len(items) != len(entries):
            got = len(items) if isinstance(items, list) else "no"
            raise RetryableError(f"elasticsearch: bulk response has {got} items for {len(entries)} documents")
        if self._refusals:
            run.accepted.update(_accepted_indices(items))
        if self._series_ns is not None:
            self._note_newest(batch, entries, items, self._series_ns)
        if resp.get("errors") is False:
            if self._server_errors:
                for i, _ in entries:
                    self._server_errors.pop(f"{batch[i].uid}-{batch[i].number}", None)
            return
        retry_after = _retry_after(meta)
        for (i, _), item in zip(entries, items, strict=True):
            outcomes[i], cause = self._item_outcome(item, retry_after)
            if (
                outcomes[i].kind is OutcomeKind.REJECT
                and i in run.verbatim
                and self._raw_refused(self.options.data_stream or self._index_name(batch[i]), item)
            ):
                outcomes[i] = retry(
                    f"{outcomes[i].reason}; sent again with raw dot-replaced", retry_after=0.0, held=True
                )
                continue
            if cause is not None:
                run.refused.setdefault(cause[0], cause[1])
                if self._series_ns is not None and _index_missing(item, self._index_name(batch[i])):
                    run.missing.add(i)

    async def _bulk_request(self, body: bytes, run: _Run) -> tuple[ApiResponseMeta, Any]:
        """POST the body; a node that fails its probe is marked dead by the transport, and the pool
        hands out the next, in the same send, as long as the send has time left."""
        for tries_left in range(len(self._nodes) - 1, -1, -1):
            timeout = self._time_left(run.deadline)
            # The cluster's own wait (for an index's creation, its primary shard; 1 min by default)
            # ends first, at half of ours: it answers those items 503 and indexes the rest, where the
            # whole request timed out here and every document of it was sent again.
            wait = f"timeout={max(1, int(timeout * 500))}ms"
            path = f"{self._bulk_path}&{wait}" if "?" in self._bulk_path else f"{self._bulk_path}?{wait}"
            # The send's first request has its whole time (or `timeout`): a node silent for that long is
            # marked dead. A later one given less than `timeout` may be cut short by the send's budget.
            token = _TRY.set(_Try(self._probe_time, cut=run.requests > 0 and timeout < self.options.timeout))
            run.requests += 1
            try:
                return await self._request("POST", path, body, self._bulk_headers, timeout=timeout)
            except _ProbeFailed:
                if not tries_left or run.deadline - time.monotonic() < self.context.send_budget / 10:
                    raise
            finally:
                _TRY.reset(token)
        raise AssertionError("unreachable")  # the last try returns or raises

    async def _half(
        self, batch: Sequence[Occurrence], entries: list[_Entry], outcomes: list[Outcome], run: _Run
    ) -> None:
        """Send one half of a request answered 413, unless the send is out of time (then it is
        answered retry, held: sent next, at once; aside beside a document set aside, see ``send``)
        or another part was answered retry as a whole (then it gets that answer, unsent). What went
        in before stays OK, where a later half's failure had the whole batch sent again, and one cut
        off by the engine the same again.

        Out of time: less than a tenth of the budget left, or, once a part went in (each send gets
        that far), less than twice what the latest request took: a request cut short by our
        deadline wastes that time (and its node is probed before its next request), and what it sent
        may have gone in anyway."""
        if run.stop is not None:
            for i, _ in entries:
                outcomes[i] = retry(f"not sent: {run.stop.reason}", retry_after=run.stop.retry_after)
            return
        left = run.deadline - time.monotonic()
        if left < self.context.send_budget / 10 or (run.taken and left < 2 * run.last):
            reason = (
                f"not sent: the send had run for {time.monotonic() - run.began:.1f}s of its "
                f"{self.context.send_budget:g}s ({len(entries)} documents left for the next)"
            )
            for i, _ in entries:
                outcomes[i] = retry(reason, held=True)
            run.unstarted.extend(i for i, _ in entries)
            return
        try:
            await self._bulk(batch, entries, outcomes, run)
        except RetryableError as exc:
            if not run.taken:
                raise  # nothing went in: the send failed as a whole
            run.stop = exc
            for i, _ in entries:
                outcomes[i] = retry(exc.reason, retry_after=exc.retry_after)

    def _item_outcome(self, item: Any, retry_after: float | None) -> tuple[Outcome, tuple[str, str] | None]:
        """The item's outcome, and (key, why) when the operator has to put something right: the key
        is the index, or "index [error type]" for a cause of some of its documents
        (``_server_error``)."""
        if not isinstance(item, dict) or len(item) != 1:
            return retry(f"malformed bulk item {_item_text(item, self._secrets)}"), None
        ((action, result),) = item.items()
        if not isinstance(result, dict):
            return retry(f"malformed bulk item {_item_text(item, self._secrets)}"), None
        status = result.get("status")
        if not isinstance(status, int):
            return retry(f"bulk item without status: {_item_text(item, self._secrets)}"), None
        if 200 <= status < 300 or (status == 409 and action == "create"):  # 409: a re-delivery
            if self._server_errors:
                self._server_errors.pop(str(result.get("_id")), None)
            return OK, None
        err = result.get("error")
        error = scrub(_error_text(err), self._secrets)
        if status >= 500 and _unavailable_shards(err):
            red = _item_index(result)
            why = (
                f"index {red}: a primary shard is not active, the index is red (a node left, or its "
                f"shards cannot be allocated) ({error})"
            )
            # Always set aside, as an index refused for an operator's cause is. Retried in place when
            # nothing of the request was taken (item 132), it held up every other index whenever the
            # request carried red indices only: set-aside retries of two red indices come due together
            # (during a request held for its `timeout`), a 413's later half, a batch of their documents
            # alone. A cluster where every index is red is no worse off aside: the engine marks the
            # sink down when such a refusal takes nothing, each item keeps its own backoff and
            # retry_max_attempts, the pile counts against the queue bound, and each request waits
            # out its `timeout` at the cluster, which paces the sends.
            return retry(f"{status} {error}", retry_after=retry_after, defer=True), (red, why)
        block = _block_kind(err)
        if block == "other":
            # An operator's block of that index (ILM's readonly on an old daily index) beside the disk
            # block: Elasticsearch 7.6+ and OpenSearch answer the highest status of the blocks named,
            # 429 with the disk block's, which was retried in place and held up every other index for
            # as long as the disk stayed full; then, the disk block lifted, it was rejected (403) for
            # the write block. Rejected now, as the pre-7.6 form (403) was and a write block alone is.
            return reject(f"{status} {error}"), None
        if block == "index":
            # Retried in place, it held up every other index (on nodes with room) for as long as the
            # disk stayed full, hours, and without a spool their documents were dropped: set aside,
            # as a red index is. The cluster-wide block (below) refuses every index alike.
            index = _item_index(result)
            why = (
                f"index {index} is read-only: a node holding one of its shards is past the flood-stage "
                f"disk watermark ({error}); free disk space there (Elasticsearch 7.4+ and OpenSearch "
                "lift the block once the node is below the high watermark; before 7.4 remove "
                "index.blocks.read_only_allow_delete by hand)"
            )
            return retry(f"{status} {error}", retry_after=retry_after, defer=True), (index, why)
        if status >= 500:
            return self._server_error(result, status, error, retry_after)
        if status == 429 or block == "cluster":
            # A busy node's full write queue (es_rejected_execution_exception), a circuit breaker, a
            # cluster-wide read-only-allow-delete block: passing, and every index alike. In place.
            return retry(f"{status} {error}", retry_after=retry_after), None
        index = _item_index(result)
        cause = _operator_fault(status, err, index, self._secrets)
        if cause is not None:
            # Not this document's fault: every document to that index fails alike until the
            # operator acts, and then these succeed. The engine's backoff applies (no retry_after),
            # the sink counts as down, and retry_max_attempts still ends it. A cause of that index
            # alone (not the credentials, not a read-only cluster) sets them aside: the other
            # indices go on meanwhile.
            read_only = (
                isinstance(err, dict)
                and err.get("type") == "cluster_block_exception"
                and "cluster read-only" in str(err.get("reason", ""))
            )
            return retry(f"{status} {error}", defer=status != 401 and not read_only), (index, cause)
        return reject(f"{status} {error}"), None

    def _server_error(
        self, result: dict[str, Any], status: int, error: str, retry_after: float | None
    ) -> tuple[Outcome, tuple[str, str] | None]:
        """A per-item 5xx other than a red index's. Elasticsearch answers 500 what it maps to no
        status of its own: an ingest processor's failure on this document (the `fail` processor,
        dissect finding no match, a processor's bug), which fails the same way at every try, as
        well as a shard's passing fault. Retried in place, such a document held up the whole sink
        for ever (retry_max_attempts=0), elastic/beats#14361. An ingest failure is set aside at
        once; any other after ``server_error_tries`` answers in a row. Set aside, it is retried with
        its own backoff (bounded by retry_max_attempts) while the other documents go on.

        The cause is keyed by index and error type (not an index name: never "accepts documents
        again"), and keeps the first text seen, so that it is logged once an hour while it lasts,
        not once per document."""
        err = result.get("error")
        index = _item_index(result)
        kind = err.get("type") if isinstance(err, dict) and err.get("type") else status
        key = f"{index} [{kind}]"
        processor = _ingest_processor(err)
        if processor is not None:
            why = self._remembered(key) or scrub(
                f"index {index}: {self._pipeline_text(err)} failed a document in its {processor} "
                f"processor ({error}); fix the pipeline, or give it an on_failure handler",
                self._secrets,
            )
            return retry(f"{status} {error}", retry_after=retry_after, defer=True), (key, why)
        doc = result.get("_id")
        if not isinstance(doc, str):
            return retry(f"{status} {error}", retry_after=retry_after), None
        tries = self._server_errors.pop(doc, 0) + 1
        self._server_errors[doc] = tries  # newest last
        if len(self._server_errors) > 4096:
            del self._server_errors[next(iter(self._server_errors))]
        if tries < self.server_error_tries:
            return retry(f"{status} {error}", retry_after=retry_after), None
        why = self._remembered(key) or scrub(
            f"index {index}: a document was answered {status} {tries} times in a row ({error}); set "
            "aside while the others go in (a fault of that document, or of its shard)",
            self._secrets,
        )
        return retry(f"{status} {error}", retry_after=retry_after, defer=True), (key, why)

    def _pipeline_text(self, error: Any) -> str:
        """Which pipeline failed, as far as the answer and the options tell."""
        header = error.get("header") if isinstance(error, dict) else None
        origin = header.get("pipeline_origin") if isinstance(header, dict) else None
        if isinstance(origin, str):
            origin = [origin]
        if isinstance(origin, list) and origin:  # nested pipelines (7.x)
            return ("ingest pipeline " if len(origin) == 1 else "ingest pipelines ") + ", ".join(
                str(name) for name in origin
            )
        if self.options.pipeline:
            return f"ingest pipeline {self.options.pipeline} (or the index's final_pipeline)"
        return "the index's ingest pipeline (index.default_pipeline or index.final_pipeline)"

    def _note_refusals(self, refused: dict[str, str], accepted: set[str]) -> None:
        """Log each index's refusal once per run of failures; say when an index accepts again.

        A run ends when that index accepts a document, or after ``refusal_memory`` seconds without a
        refusal from it (its documents went to the dead letters, or nothing was sent there since),
        not when some batch had no refusal: the refused documents are set aside (item 82) and
        retried while batches for other indices go in, so that logged the cause again at every
        retry, 120-240 ERROR lines an hour for as long as it lasted."""
        now = time.monotonic()
        for index in sorted(accepted & self._refusals.keys() - refused.keys()):
            del self._refusals[index]
            self.log.info("%s: index %s accepts documents again", self.context.name, index)
        horizon = now - self.refusal_memory
        while self._refusals and next(iter(self._refusals.values()))[1] <= horizon:
            self._refusals.popitem(last=False)
        if not refused:
            return
        new = [(index, cause) for index, cause in refused.items() if self._remembered(index) != cause]
        for index, cause in refused.items():
            self._refusals[index] = (cause, now)
            self._refusals.move_to_end(index)
        while len(self._refusals) > 4096:  # index names may come from field values
            self._refusals.popitem(last=False)
        for _index, cause in new[:3]:
            self.log.error(
                "%s: %s; its documents are retried (up to retry_max_attempts, if set) until that is put right",
                self.context.name,
                cause,
            )
        if len(new) > 3:
            self.log.error(
                "%s: %d more indices refused the same way or alike", self.context.name, len(new) - 3
            )

    def _remembered(self, index: str) -> str | None:
        found = self._refusals.get(index)
        return found[0] if found is not None else None

    def _log_request_refusal(self, meta: ApiResponseMeta, body: Any) -> None:
        """Say once per run of failures why the whole bulk request is refused (3xx, 401, 403, 404,
        405)."""
        status = meta.status
        if self._request_refusal == status:
            return
        self._request_refusal = status
        node = _node_text(meta)
        error = body.get("error") if isinstance(body, dict) else None
        why = _body_error(body, self._secrets)
        if status == 401:
            text = (
                f"credentials rejected by {node} (401 {why}); "
                "check username/password, api_key or bearer_token"
            )
        elif status == 404 and isinstance(error, dict) and error.get("type") == "index_not_found_exception":
            text = _operator_fault(404, error, str(error.get("index") or "?"), self._secrets) or why
        elif status == 404:
            text = (
                f"POST {node.rstrip('/')}/_bulk answered 404 ({why}): nothing serves the bulk "
                "API there; is the URL's path right (a proxy's path prefix missing, extra or changed)?"
            )
        elif 300 <= status < 400:
            text = (
                f"POST {node.rstrip('/')}/_bulk answered {status} ({_location(meta)}): a redirect, which "
                "the sink does not follow (the POST would come back a GET, or go on to another host); "
                "give that URL"
            )
        elif status == 405:
            text = (
                f"POST {node.rstrip('/')}/_bulk answered 405 ({why}): what answers there takes no POST "
                "(a proxy before the cluster, or the URL's path); is the URL right?"
            )
        else:
            text = (
                f"{node} refused the bulk request (403 {why}): the user's role lacks a "
                "privilege the bulk API needs"
            )
        self.log.error("%s: %s; retrying until that is put right", self.context.name, text)


def _node_text(meta: ApiResponseMeta) -> str:
    # Redacted as every URL we show: a proxy may take a token as a path segment.
    node = meta.node
    return redact_url(f"{node.scheme}://{node.host}:{node.port}{node.path_prefix}")


def _location(meta: ApiResponseMeta) -> str:
    location = meta.headers.get("location")
    return f"Location: {redact_url(location)}" if location else "no Location"


def _transport_text(exc: TransportError, secrets: Sequence[str]) -> str:
    """A transport error as reasons, logs and start errors quote it. Its message is aiohttp's text,
    which for an answer it cannot parse (a header over 8190 bytes, a bad header line) or "Can not
    write request body for <url>" ends in the request URL: the node's path may hold a token (item
    130), scrubbed here as in every text we quote (the node scrubs it too, for the transport's own
    warning). URLs carry no credentials (moved to the Authorization header)."""
    return f"{type(exc).__name__}: {scrub(str(exc.message), secrets)}" if exc.message else type(exc).__name__
