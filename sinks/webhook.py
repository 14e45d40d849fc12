"""``webhook`` sink: POST (or PUT) JSON to any HTTP endpoint, per batch or per occurrence.

``--sink=webhook:https://hooks.example/events?mode=event&secret=env:HOOK_SECRET&signature=standard``

Body
    ``mode=batch`` (default): one request per batch, the body a JSON array of records.
    ``mode=event``: one request per occurrence, the body one record (JSON object); outcomes per item.

``body_template`` (or ``body_template_file``) replaces the record with your own JSON. Placeholders are
``{{path}}`` with dotted paths into the normalised record, e.g. ``{{reason}}``,
``{{involved_object.name}}``, ``{{labels.app.kubernetes.io/name}}`` (after ``labels.``/``annotations.``
the rest is one key) and ``{{raw.metadata.resourceVersion}}`` (the Event object as the API sent it):

* inside a JSON string (``"text": "{{reason}}: {{message}}"``) the value is inserted JSON-escaped
  (quotes, backslashes, newlines, control characters), so any message yields valid JSON; non-string
  values are inserted as their JSON text, a missing value as nothing;
* outside a string (``"count": {{count}}``, ``"labels": {{labels}}``) the value is inserted as JSON
  (a missing value as ``null``).

The template must be valid JSON once substituted; ``start()`` refuses it otherwise. In batch mode the
rendered bodies are joined into one JSON array.

Signatures (``secret=...``) over the exact bytes sent:
    ``signature=github`` (default): ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>``.
    ``signature=standard`` (standardwebhooks.com): ``webhook-id`` (hash of the occurrence keys: stable
    across retries, the receiver's idempotency key), ``webhook-timestamp`` and
    ``webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`` where the key is the
    base64 after ``whsec_``. Several keys separated by spaces (``whsec_old whsec_new``) each sign, one
    ``v1,`` signature per key as the spec allows, so a receiver can move to a new key without a
    refused request: put both in the secret file (the router reads it again when it changes), move
    the receiver, then leave only the new one.

Outcomes: any 2xx is OK; 408, 429, 5xx, connection errors and timeouts are retried (honouring
Retry-After, seconds or HTTP-date); so are 401 and 403 (credentials being rotated, or missing: put
right, the same events go in; logged once, never dead-lettered) and redirects (3xx: never followed, a
302 would turn the POST into a GET; an ingress switched to force-ssl-redirect, a framework's
trailing-slash redirect: logged once with where ``Location`` points, redacted, never dead-lettered;
``retry_max_attempts`` still applies), and 404 and 405: the webhook posts every record to one
URL, so those are about the URL (an ingress's default backend while the receiver's pods roll out, a
path prefix a rewrite dropped, a route that takes no PUT): logged once ("check url: its path or
method"), never dead-lettered for it. Other 4xx are rejected with the status and a short excerpt of
the answer. The status decides once it is in: an answer whose body cannot be read (stalled after
its head, cut off, or not in its Content-Encoding) is judged by it, its excerpt "(its body
unreadable: ...)" after at most 2 s. A batch answered 413 (a body limit below
``batch_max_bytes``, e.g. a proxy's) is sent again in halves, so only a record too large on its
own is rejected; once a half is answered retry (429, 5xx with Retry-After), the halves left get
that answer without being sent. So is a batch
answered 400 or 422 (a receiver's validation refusing the array for one record), down to the
record refused alone, which alone is rejected, with its own answer; the halves taken are OK. That
costs about two requests per halving (18 for one record among 500), at most 64 requests a send
(beyond, a refused request is rejected whole, as before) and within the send's budget. With
``signature=standard`` each half carries a new ``webhook-id`` (the hash of its records' keys): a
receiver that refused the request stored none of it, so it has no id to dedupe against and the new
ones are harmless. Other final 4xx (409, 410, 415, ...) are about every request: rejected whole. A
409 above all: a conflict about the request, or a receiver deduping on ``webhook-id`` answering an
id it has (a request sent again after our ``timeout`` cut one it was still storing); halves with new
ids would be stored a second time. A receiver that stored part of an array and then refused it gets
that part again in a half: the receiver's concern (an ordinary receiver takes or refuses a request
whole).

A 5xx without Retry-After, a 401, a 403 or a redirect may be about the records sent (a receiver's bug
for one payload, a WAF rule) as well as about the endpoint; a probe with other records tells which.
``mode=batch``: the batch is halved as for a 413 (its first record alone first, while nothing of the
send was taken) down to the record the receiver fails on, which waits aside with its own backoff
(``retry_max_attempts`` still applies; its event's later occurrences wait with it) while the rest goes
in, in order. It is set aside only after failing alone on both sides of a request of others taken (or,
with none left, twice in a row, the receiver having failed nothing else since its last success), and
only when every failed request of the send carried such a record: a flapping receiver sets nothing
aside. A receiver that fails everything costs two requests an attempt and is retried in place. A
record set aside and not taken since stays aside when it fails alone again with no other record to
probe with, or as the probe of another such record; when only such records failed since the last
answer, the next record failing alone is judged as after that answer. Their keys are kept in the sink's data dir
(``webhook-set-aside.json``, with ``--data-dir``), so that after a restart, read back first from
the spool, they do not hold up the rest while the receiver still fails them; a record the engine
gives up (dead-lettered, dropped) leaves it.
``mode=event`` sends one request at a time, in order. After a retry answer the rest of the send is not
sent (retried with it), except after one of those answers: then the next record of another event is
sent once as a probe (never the same event's next occurrence). If the receiver takes it, the failed
record is sent again, and waits aside (its event's later occurrences with it) only if it fails again;
if the probe fails too, all of it is retried in place. The rest is as in batch mode, one record a
request: the same confirmation, and nothing set aside when the receiver flaps.

A send starts no request that could end more than its budget after it began (its time so far plus
``timeout``; the budget is five sixths of the pipeline's ``send_timeout``, 25 s by default): the engine
cuts a send off after ``send_timeout`` and sends it again whole, so at a slow receiver (mode=event, 500 events, 60 ms each) or through many 413 halves the
same head was sent again and again and the tail never. What a send did not start is sent again.
Nor does it start one once the router stops past its drain deadline (``stop_sending``): the request
in flight gets half a second more, then the send answers what went in (OK) and holds the rest,
before the router spools its batch. The request given up so is held too (our stop is no failed
attempt, so never a dead letter at ``retry_max_attempts``): sent again after the restart, a second
time if it went in. Cut off by the router instead, every record the send had delivered was spooled
and delivered again after the restart.

Every URL in logs and errors is redacted: no userinfo, no query values, no token-like path segments.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import os
import re
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import orjson
import yarl
from aiohttp.http_exceptions import (
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    PayloadEncodingError,
    TransferEncodingError,
)
from pydantic import AliasChoices, Field, field_validator, model_validator

import eventrouter
from eventrouter import (
    OK,
    Occurrence,
    Outcome,
    OutcomeKind,
    RetryableError,
    Secret,
    Sink,
    SinkContext,
    SinkError,
    SinkOptions,
    normalise,
    parse_retry_after,
    reject,
    retry,
)
from eventrouter.logs import Throttled
from eventrouter.options import FilePath, http_url, redact_url

from ._headers import HEADERS_HELP, Headers, check_headers
from ._scrub import credentials, scrub, shown_location
from ._worker import retrieved

__all__ = [
    "BodyTemplate",
    "TemplateError",
    "WebhookOptions",
    "WebhookSink",
    "redact_url",
    "standard_webhooks_keys",
    "standard_webhooks_signature",
]

# --------------------------------------------------------------------------------------------------
# Body template
# --------------------------------------------------------------------------------------------------


class TemplateError(ValueError):
    pass


_PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")
_FREE_MAPS = ("labels", "annotations")


def _known_paths() -> tuple[set[str], dict[str, set[str]]]:
    sample = normalise({"metadata": {"uid": "x"}}).record
    nested = {k: set(v) for k, v in sample.items() if isinstance(v, dict) and k not in _FREE_MAPS}
    return set(sample), nested


@dataclass(frozen=True, slots=True)
class _Slot:
    path: tuple[str, ...]
    in_string: bool


class BodyTemplate:
    """A JSON template with ``{{path}}`` placeholders, compiled once (see the module docstring)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[str | _Slot] = []
        top, nested = _known_paths()
        in_string = False
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            literal = text[pos : match.start()]
            in_string = self._scan(literal, in_string)
            if literal:
                self.parts.append(literal)
            path = self._path(match.group(1), top, nested)
            self.parts.append(_Slot(path, in_string))
            pos = match.end()
        tail = text[pos:]
        if tail:
            self.parts.append(tail)
        # Valid JSON for any values? Strings become "x", other slots null: both keep the structure.
        probe = "".join(p if isinstance(p, str) else ("x" if p.in_string else "null") for p in self.parts)
        try:
            orjson.loads(probe)
        except orjson.JSONDecodeError as exc:
            raise TemplateError(f"is not valid JSON once substituted ({exc})") from None

    @staticmethod
    def _scan(literal: str, in_string: bool) -> bool:
        escaped = False
        for ch in literal:
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
        return in_string

    @staticmethod
    def _path(spec: str, top: set[str], nested: dict[str, set[str]]) -> tuple[str, ...]:
        head, _, rest = spec.partition(".")
        if head == "raw":
            return ("raw", *rest.split(".")) if rest else ("raw",)
        if head in _FREE_MAPS:
            return (head, rest) if rest else (head,)
        if head not in top:
            known = ", ".join(sorted(top))
            raise TemplateError(f"placeholder {{{{{spec}}}}} names no record field (fields: {known})")
        if rest:
            if head not in nested or rest not in nested[head]:
                raise TemplateError(f"placeholder {{{{{spec}}}}} names no record field")
            return (head, rest)
        return (head,)

    @staticmethod
    def _lookup(occ: Occurrence, path: tuple[str, ...]) -> Any:
        value: Any = occ.raw if path[0] == "raw" else occ.record.get(path[0])
        for key in path[1:]:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    def render(self, occ: Occurrence) -> bytes:
        out: list[bytes] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part.encode())
                continue
            value = self._lookup(occ, part.path)
            if not part.in_string:
                out.append(orjson.dumps(value))
            elif value is None:
                continue
            else:
                text = value if isinstance(value, str) else orjson.dumps(value).decode()
                out.append(orjson.dumps(text)[1:-1])  # the escaped content, without the quotes
        return b"".join(out)


# --------------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------------


def github_signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def standard_webhooks_key(secret: str) -> bytes:
    """``whsec_<base64>`` (the prefix is optional) → the HMAC key, as the Standard Webhooks libraries do."""
    text = secret.removeprefix("whsec_")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a Standard Webhooks secret (whsec_ followed by base64)") from None


def standard_webhooks_keys(secret: str) -> list[bytes]:
    """One HMAC key per whitespace-separated ``whsec_`` secret (several while a key is rotated)."""
    keys = [standard_webhooks_key(part) for part in secret.split()]
    if not keys:
        raise ValueError("empty: not a Standard Webhooks secret (whsec_ followed by base64)")
    return keys


def standard_webhooks_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def _basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _read_template(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read body_template_file {path}: {exc}") from None


def _compile_template(text: str, option: str) -> BodyTemplate:
    try:
        return BodyTemplate(text)
    except TemplateError as exc:
        raise ValueError(f"{option} {exc}") from None


_RESERVED_HEADERS = ("content-length", "transfer-encoding")
"""The body's framing, set by aiohttp: one in ``headers`` broke every request (a body cut at a
Content-Length, a chunked claim over a plain body), refused or retried with a reason that did not
name the option. So does a ``Content-Encoding`` other than ``identity`` (a gzip claim over plain
JSON: ``_check_encoding``). ``Connection`` (any value) and ``Content-Encoding: identity`` are
harmless and were taken: refused, a configuration that ran stopped the router (exit 2)."""


def _check_encoding(headers: dict[str, Secret]) -> None:
    """A ``Content-Encoding`` in ``headers`` other than ``identity``: the body is sent as is, so a
    receiver decoding it by that claim refuses every request. (Its value is not shown.)"""
    for name, value in headers.items():
        if name.lower() == "content-encoding" and value.get_secret_value().strip().lower() != "identity":
            raise ValueError(
                f"header {name} is set by the sink and cannot be overridden (the body is sent "
                "unencoded: only identity is taken)"
            )


class WebhookOptions(SinkOptions):
    method: Literal["POST", "PUT"] = Field("POST", description="HTTP method: POST or PUT (never GET).")
    mode: Literal["batch", "event"] = Field(
        "batch", description="batch: one request per batch (JSON array); event: one request per occurrence."
    )
    headers: Headers = Field(
        default_factory=dict, validation_alias=AliasChoices("headers", "header"), description=HEADERS_HELP
    )
    body_template: str | None = Field(
        None, description="JSON body with {{field}} placeholders, values JSON-escaped (see docs)."
    )
    body_template_file: FilePath | None = Field(None, description="Read body_template from this file.")
    secret: Secret | None = Field(None, description="HMAC-SHA256 signing secret (signature header).")
    signature: Literal["github", "standard"] = Field(
        "github",
        description=(
            "github: X-Hub-Signature-256; standard: Standard Webhooks (secret whsec_<base64>; several "
            "separated by spaces each sign, for a key rotation)."
        ),
    )
    timeout: float = Field(
        10.0,
        gt=0,
        allow_inf_nan=False,  # inf passed, then every request raised OverflowError naming no option
        description=(
            "Seconds one HTTP request may take. A send starts no request later than five sixths of "
            "send_timeout minus this (so it ends before the engine cuts it off); the rest is sent next."
        ),
    )
    ca_file: FilePath | None = Field(None, description="CA bundle (PEM) to verify the server's certificate.")
    cert_file: FilePath | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: FilePath | None = Field(None, description="Client certificate key (PEM) for mutual TLS.")
    key_password: Secret | None = Field(
        None, description="Pass phrase of an encrypted key_file (never asked for on a terminal)."
    )
    insecure_skip_verify: bool = Field(False, description="Do not verify the server's certificate.")
    username: str | None = Field(None, description="HTTP basic auth user.")
    password: Secret | None = Field(None, description="HTTP basic auth password.")
    # No `token` alias: endpoints such as Google Chat's take ?key=&token= in their URL, and unknown
    # query keys stay there (url_query_passthrough); an alias took that token out as a Bearer header.
    bearer_token: Secret | None = Field(None, description="Authorization: Bearer token.")
    healthcheck_url: str | None = Field(
        None,
        description=(
            "URL that `eventrouter check` probes with HEAD (default: the webhook URL). Our credentials "
            "(Authorization, headers) go with it only when it has url's scheme, host and port."
        ),
    )

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.strip():  # empty: _consistent names what is missing
            http_url(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WebhookOptions:
        # Checked here, not when the sink starts: a start that fails is retried for ever, while a
        # configuration error stops the router at once (exit 2) naming the option. The messages name
        # options and header names, never values (header values are often credentials).
        if not self.url.strip():
            raise ValueError("url is required: the webhook's address, e.g. webhook:https://host/path")
        if self.username is not None and ":" in self.username:
            raise ValueError("username must not contain ':'")
        # User info with an empty name (``https://:API_KEY@host``, a key as the password) is basic
        # auth too: ``_configure`` sends it whenever the URL has user info.
        url_user = urlsplit(self.url).username is not None
        if url_user and (self.username is not None or self.password is not None):
            # username/password won and the url's pair was dropped without a word.
            raise ValueError(
                "username/password and user info in the url give basic auth twice: set one of them"
            )
        if self.password is not None and self.username is None and not url_user:
            raise ValueError("password needs username")  # it was never sent
        basic = self.username is not None or url_user
        if self.bearer_token is not None and basic:
            raise ValueError(
                "set bearer_token or basic auth (username/password or user info in the url), not both"
            )
        try:
            check_headers(self.headers, reserved=_RESERVED_HEADERS)
            _check_encoding(self.headers)
        except ValueError as exc:
            raise ValueError(f"headers: {exc}") from None
        # A custom header wins over what the sink sets: an Authorization header silently replaced
        # the bearer token or basic auth configured beside it.
        if (self.bearer_token is not None or basic) and any(
            n.lower() == "authorization" for n in self.headers
        ):
            raise ValueError(
                "headers: an Authorization header would replace "
                f"{'bearer_token' if self.bearer_token is not None else 'basic auth'}: set one of them"
            )
        if self.key_file is not None and self.cert_file is None:
            # load_cert_chain only reads a key beside a certificate: alone it was silently ignored.
            raise ValueError("key_file needs cert_file (the client certificate the key belongs to)")
        if self.key_password is not None and self.cert_file is None:
            raise ValueError("key_password needs cert_file and the encrypted key (key_file or in cert_file)")
        if self.body_template is not None and self.body_template_file is not None:
            raise ValueError("set body_template or body_template_file, not both")
        if self.body_template is not None:
            _compile_template(self.body_template, "body_template")
        if self.body_template_file is not None:
            _compile_template(_read_template(self.body_template_file), "body_template_file")
        if self.secret is not None and self.signature == "standard":
            try:
                standard_webhooks_keys(self.secret.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"secret is {exc}") from None
        return self

    @field_validator("healthcheck_url")
    @classmethod
    def _healthcheck_url(cls, value: str | None) -> str | None:
        if value:
            http_url(value, option="healthcheck_url")
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:  # type: ignore[override]
        for name, value in super().__repr_args__():
            if name in ("url", "healthcheck_url") and isinstance(value, str):
                value = redact_url(value)
            yield name, value


# --------------------------------------------------------------------------------------------------
# The sink
# --------------------------------------------------------------------------------------------------

_RETRY_STATUSES = {408, 425, 429}
_REFUSED = (401, 403)
"""Credentials refused: being rotated (the endpoint first, then the pod's Secret) or missing. Retried:
put right, the same events go in; dead-lettering them lost a whole rotation's events."""
_ABOUT_THE_URL = (404, 405)
"""Not found, method not allowed: every record goes to one URL, so nearly always about the URL (an
ingress's default backend during a rollout, a path a rewrite dropped, a route without PUT), not the
record. Retried like a 401/403 (a probe tells one record's 404 from the URL's); rejected, every event
of a rollout behind an ingress was dead-lettered."""
_PER_RECORD = (400, 422)
"""Final answers that may be about one record of an array (a receiver's validation): a request of
several answered so is sent again in halves (``_split``); with ``signature=standard`` each half has a
new ``webhook-id``, harmless, as the receiver stored nothing of the request it refused. Others (409,
415, 410, 414, ...) are about every request, and rejected whole: a 409 is a conflict about the
request or its idempotency key (a ``webhook-id`` the receiver has), and halves with new ids were
stored again, the whole batch twice."""
_SPLIT_REQUESTS = 64
"""Requests one send may spend halving requests answered a final 4xx (400, 422, ...) to find the
records refused (one among 500 takes 18). Beyond it, a refused request is rejected whole: a receiver
refusing every body (a wrong format) cost two requests per record."""
_EXCERPT_WAIT = 2.0
"""Seconds an error answer's body gets for its excerpt once its status is in (at most ``timeout``):
the status decides, the excerpt is only quoted."""
_READ_ERRORS = (aiohttp.ClientError, HttpProcessingError, TimeoutError, OSError, RuntimeError)
"""What reading an answer's body can raise: aiohttp's ClientPayloadError; with its pure-Python parser
(``AIOHTTP_NO_EXTENSIONS=1``, a platform without its C wheel) that parser's own errors, no ClientError
(a TransferEncodingError left ``send`` as a sink's bug: a final 400 retried for ever); and
StreamReader's RuntimeError("Connection closed.") for a read begun after the connection was lost."""
_LLHTTP = re.compile(r"([A-Za-z][\w ,.'/-]{0,79}):\n\n  ")
"""The C parser's message: llhttp's reason, then the bytes it failed on (``{reason}:\n\n  b'...'``)."""
_C_PARSER = aiohttp.http.HttpResponseParser is not aiohttp.http_parser.HttpResponseParserPy
"""aiohttp parses answers with its C extension (llhttp), not its pure-Python parser, whose message
for a bad chunk-size line is that line, ``{reason}:\n\n  `` in it or not."""
_PARSE_MEANINGS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (ContentLengthError, "cut off before its Content-Length"),
    (TransferEncodingError, "not valid chunked encoding"),
    (ContentEncodingError, "not in its Content-Encoding"),
    (InvalidHeader, "an invalid header"),
    (BadStatusLine, "an invalid status line"),
    (HttpProcessingError, "not valid HTTP"),
)
"""What aiohttp's parse errors mean, by class: said instead of their messages, which quote the bytes
the parser failed on."""
_STOP_GRACE = 0.5
"""Seconds the request in flight gets after ``stop_sending``: under the router's 1 s wait, so that
the send returns what went in before the router gives up on it."""
_LOG_REFUSED_EVERY = 600.0
"""Seconds between two warnings about refused credentials or a redirect (the first at once)."""
_FAILING_MAX = 4096
"""Keys of records set aside for failing alone kept at most (the oldest forgotten first): one
forgotten costs its next send an attempt before it is known again."""

_FAILING_FILE = "webhook-set-aside.json"
"""In the sink's data dir: the keys of ``_failing`` (a JSON array, oldest first)."""

_Item = tuple[int, bytes]
"""A record of the send: its index in the batch and its encoded body."""


@dataclass(slots=True)
class _Send:
    """One send's progress: when it must stop starting requests, and why it stopped."""

    until: float
    """time.monotonic() after which no request starts (but the first)."""
    began: float
    requests: int = 0
    stop: Outcome | None = None
    """A RETRY answered to the endpoint as a whole: what is left of the send gets it, unsent."""
    taken: bool = False
    """The endpoint answered (2xx, or a final 4xx) a request of this send: it is up for some records."""
    whole: Outcome | None = None
    """mode=batch: the retry answer to a request that carried every record of the send."""
    unstarted: list[int] = field(default_factory=list)
    """Records not sent for want of time (``_not_started``)."""
    splits_left: int = _SPLIT_REQUESTS
    """Requests the send may still spend halving requests refused (a final 4xx)."""

    def rest(self) -> Outcome:
        assert self.stop is not None
        return retry(f"not sent: {self.stop.reason}", retry_after=self.stop.retry_after)


@dataclass(slots=True)
class _Part:
    """Records of a batch-mode send that go as one request (a JSON array), in the batch's order."""

    items: list[_Item]
    confirm: bool = False
    """Records that failed alone, sent again after a request of others was taken: one failing alone
    again is its own problem (set aside), never a flap's: the receiver failed it on both sides of a
    success."""


class WebhookSink(Sink[WebhookOptions]):
    """POSTs JSON to an HTTP endpoint; any 2xx is success."""

    options_model = WebhookOptions
    description = "POST JSON per batch or per event to any HTTP endpoint (template, HMAC signature)"
    url_query_passthrough = True  # --sink=webhook:https://h/hook?token=..: unknown keys stay in the URL

    def __init__(self, options: WebhookOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self._session: aiohttp.ClientSession | None = None
        self._template: BodyTemplate | None = None
        self._headers: dict[str, str] = {}
        self._target = ""
        self._redacted = redact_url(options.url)
        self._standard_keys: list[bytes] = []
        self._secrets: list[str] = []
        self._shown_urls: list[tuple[str, str]] = []
        self._refused_log = Throttled(self.log, _LOG_REFUSED_EVERY)
        self._save_log = Throttled(self.log, _LOG_REFUSED_EVERY)
        self._refusing = False  # the last answer was a 401/403 or a redirect (logged): a 2xx ends that run
        self._stopping = False  # stop_sending(): the router is stopping, no request is begun
        self._in_flight: asyncio.Timeout | None = None  # the request's deadline: stop_sending brings it in
        # What the endpoint answered lately, to judge a record that failed with no other left to
        # probe with: the keys carried by every request it failed since it last answered one (None:
        # none failed since), and whether it ever answered one.
        self._common: set[str] | None = None
        self._answered = False
        # mode=batch: keys of records that failed alone (see _walk): set aside for it and not
        # answered since, and those retried in place, which may have failed only because the
        # endpoint did (forgotten when it answers a request). Their next send does not put them in
        # a probe: one at the head goes alone first, the others wait for a request of others taken.
        # (Read from the data dir by ``start``: ``__init__`` does no I/O.)
        self._failing: dict[str, None] = {}
        self._failing_saved: frozenset[str] = frozenset()
        self._failing_read = False
        self._unsure: set[str] = set()

    # ``_failing`` is kept in the sink's data dir: after a restart the records set aside come back
    # from the spool at the head of the first batch, often with none of another event to probe with,
    # and the endpoint not answered yet in this run. Forgotten, they were retried in place, and held
    # up the whole sink until the receiver took them.
    def _failing_path(self) -> Path | None:
        folder = self.context.data_dir
        return folder / _FAILING_FILE if folder is not None else None

    def _read_failing(self) -> dict[str, None]:
        path = self._failing_path()
        if path is None:
            return {}
        try:
            keys = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as exc:
            self.log.warning(
                "webhook %s: cannot read %s (%s): the records set aside before are judged anew",
                self.context.name,
                path,
                exc,
            )
            return {}
        if not isinstance(keys, list):
            return {}
        return {key: None for key in keys[-_FAILING_MAX:] if isinstance(key, str)}

    def _load_failing(self) -> None:
        """``_failing`` as the data dir keeps it, once (a rebuilt sink takes its predecessor's)."""
        if self._failing_read:
            return
        self._failing_read = True
        kept = self._read_failing()
        self._failing.update(kept)  # in place: a walk may hold it (a send before any start)
        self._failing_saved = frozenset(kept)

    def _save_failing(self) -> None:
        """Written when it changed (so a crash keeps it too: the spool reads its aside file back)."""
        path = self._failing_path()
        if path is None or self._failing.keys() == self._failing_saved:
            return
        keys = frozenset(self._failing)
        tmp = path.with_name(path.name + ".tmp")
        try:
            if not keys:
                path.unlink(missing_ok=True)
            else:
                with open(tmp, "wb") as fh:
                    fh.write(orjson.dumps(list(self._failing)))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            _sync_dir(path.parent)  # the rename (or removal) too: a power cut brought back the old set
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._save_log.warning(
                "save",
                "webhook %s: cannot write %s (%s): after a restart the records set aside now are "
                "judged anew (retried in place while nothing else is sent)",
                self.context.name,
                path,
                exc.strerror or exc,
            )
            return
        self._failing_saved = keys

    @property
    def send_budget(self) -> float:
        """Seconds a send may last: it starts no request that could end after that (its time so far
        plus ``timeout``; the first request always starts). The engine cuts a send off after
        ``send_timeout`` and sends the whole batch again: what went in before the cutoff went in
        again, and at a slow receiver the tail was never reached. What a send does not start is
        answered retry (held: not sent, no failure), and the engine sends it again in place, at once."""
        return self.context.send_budget

    def take_over(self, previous: Sink[WebhookOptions]) -> None:
        """What the endpoint last answered carries over a credential change: a failed record sent
        alone next is judged by it. (New credentials refused too are logged again: that is news.)"""
        if isinstance(previous, WebhookSink):
            self._common, self._answered = previous._common, previous._answered
            self._unsure = previous._unsure
            if previous._failing_read:  # (one never started read nothing: this one's start reads it)
                self._failing, self._failing_saved = previous._failing, previous._failing_saved
                self._failing_read = True

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        """Dead-lettered or dropped: never sent again, so no answer would ever take their keys out of
        ``_failing`` and the data dir's file, where they stayed (up to 4,096, rewritten whole at each
        change) and took the room of live ones."""
        # Given up before a start read the file (the spool drops its head, the records set aside,
        # while start fails): read it now, or the next start would bring those keys back.
        self._load_failing()
        removed = False
        for occ in occurrences:
            self._unsure.discard(occ.key)
            if occ.key in self._failing:
                del self._failing[occ.key]
                removed = True
        if removed:  # at once: nothing may be sent before a stop
            self._save_failing()

    def stop_sending(self) -> None:
        """The router is stopping past its drain deadline: it waits 1 s for the send, then cancels it
        and spools its whole batch. A send is many requests (one per record in mode=event, halves
        and probes in mode=batch) over up to ``send_budget``: cut off, every record it had delivered
        was spooled and delivered again after the restart. Now it starts no request (``_walk``), the
        one in flight gets ``_STOP_GRACE`` more, and the send answers what went in (OK) and holds
        the rest, the request given up too (item 213 for stdout and file). Held, not failed: a
        failure counted as an attempt, and on the last of ``retry_max_attempts`` the engine
        dead-lettered the send's records at a clean stop, those never sent too."""
        self._stopping = True
        if self._in_flight is not None and self._in_flight.when() is None:
            with contextlib.suppress(RuntimeError):  # (no running loop: nothing in flight either)
                self._in_flight.reschedule(asyncio.get_running_loop().time() + _STOP_GRACE)

    # -- configuration ---------------------------------------------------------------------------
    def _configure(self) -> None:
        opts = self.options
        parts = urlsplit(opts.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SinkError(f"webhook sink: url must be http(s)://host/path, got {self._redacted!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise SinkError(f"webhook sink: url has an invalid port: {self._redacted!r}") from None
        # Userinfo in the URL becomes basic auth and never travels in (or gets logged with) the URL.
        netloc = parts.netloc.rpartition("@")[2]
        self._target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"eventrouter/{eventrouter.__version__}",
        }
        if opts.username is not None:
            password = opts.password.get_secret_value() if opts.password else ""
            headers["Authorization"] = _basic_auth(opts.username, password)
        elif parts.username is not None:
            headers["Authorization"] = _basic_auth(unquote(parts.username), unquote(parts.password or ""))
        # The options' validator has refused conflicting auth, bad headers and templates already.
        if opts.bearer_token is not None:
            headers["Authorization"] = "Bearer " + opts.bearer_token.get_secret_value()
        headers.update((name, value.get_secret_value()) for name, value in opts.headers.items())
        self._headers = headers
        self._secrets = self._credentials()
        # As configured and as yarl writes them (aiohttp's errors quote that): never shown unredacted.
        self._shown_urls = _url_forms(
            [(opts.url, self._redacted), (self._target, self._redacted)]
            + ([(opts.healthcheck_url, redact_url(opts.healthcheck_url))] if opts.healthcheck_url else [])
        )
        try:
            if opts.body_template_file is not None:  # read again: it may have changed since
                text = _read_template(opts.body_template_file)
                self._template = _compile_template(text, "body_template_file")
            elif opts.body_template is not None:
                self._template = _compile_template(opts.body_template, "body_template")
        except ValueError as exc:
            raise SinkError(f"webhook sink: option {exc}") from None
        if opts.secret is not None and opts.signature == "standard":
            self._standard_keys = standard_webhooks_keys(opts.secret.get_secret_value())

    def _credentials(self) -> list[str]:
        """Everything of ours an error answer must not carry into a reason (log line, dead-letter
        file): gateways echo the credential they refused. The bearer token, the passwords, the
        signing secret(s) and their words; the Authorization header as sent and the custom header
        values (see ``_scrub.credentials``); the URLs' credentials and token-like path segments."""
        opts = self.options
        secrets = [
            s.get_secret_value()
            for s in (opts.bearer_token, opts.password, opts.secret, opts.key_password)
            if s is not None
        ]
        return credentials(
            [*secrets, *(word for s in secrets for word in s.split())],
            sent=[
                *(v.get_secret_value() for v in opts.headers.values()),
                self._headers.get("Authorization", ""),
            ],
            urls=[opts.url, *([opts.healthcheck_url] if opts.healthcheck_url else [])],
        )

    def _ssl(self) -> ssl.SSLContext | bool:
        opts = self.options
        if not (opts.ca_file or opts.cert_file or opts.insecure_skip_verify):
            return True
        try:
            ctx = ssl.create_default_context(cafile=str(opts.ca_file) if opts.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise SinkError(f"webhook sink: cannot load ca_file: {exc}") from None
        if opts.cert_file:
            self._load_client_certificate(ctx, opts.cert_file)
        if opts.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _load_client_certificate(self, ctx: ssl.SSLContext, cert_file: str) -> None:
        opts = self.options
        where = "key_file" if opts.key_file else "cert_file"  # the file holding the key
        asked = False

        def pass_phrase() -> str:
            # Without a password argument OpenSSL asks on the terminal (the event loop, so every
            # sink, the watch and /healthz, waits for someone to type) or, without one, fails with
            # "[Errno 22] Invalid argument", naming nothing.
            nonlocal asked
            asked = True
            if opts.key_password is None:
                raise _PassPhraseAsked
            return opts.key_password.get_secret_value()

        try:
            ctx.load_cert_chain(cert_file, opts.key_file, password=pass_phrase)
        except _PassPhraseAsked:
            raise SinkError(
                f"webhook sink: {where} is encrypted (it wants a pass phrase): give a decrypted key, "
                "or its pass phrase in key_password"
            ) from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            if asked:  # the key is encrypted and the pass phrase given did not open it
                raise SinkError(f"webhook sink: key_password does not decrypt {where} ({exc})") from None
            raise SinkError(f"webhook sink: cannot load cert_file/key_file: {exc}") from None

    async def start(self) -> None:
        # No request here: many webhooks only accept POST, and a start must not emit a fake event.
        self.context.warn_if_outlasting(self.options.timeout, "timeout")
        self._configure()
        self._load_failing()
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl())
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.options.timeout)
            )

    async def check(self) -> None:
        """Start, then probe with HEAD: any HTTP answer (even 405) proves the endpoint is reachable,
        but a 401/403 to the credentials we send means it will refuse every event. A redirect is a
        warning (a HEAD redirected may be a POST taken)."""
        await self.start()
        assert self._session is not None
        opts = self.options
        url = opts.healthcheck_url or self._target
        # Our credentials go where the events go, not to a status page elsewhere or a plain-http
        # health port: a healthcheck_url at another scheme, host or port gets a HEAD without them.
        ours = _origin(url) == _origin(self._target)
        if ours:
            headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        else:
            headers = {"User-Agent": self._headers["User-Agent"]}
        try:
            async with self._session.head(url, headers=headers, allow_redirects=False) as resp:
                status, reason = resp.status, resp.reason or ""
                location = resp.headers.get("Location")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"webhook sink cannot reach {redact_url(url)}: {self._describe(exc)}") from None
        withheld = "" if ours else f" ({_WITHHELD})"
        self.log.info("webhook %s answered HEAD with %d%s", redact_url(url), status, withheld)
        if 300 <= status < 400:
            # A warning, not a failure: a redirect of HEAD says nothing sure of POST (oauth2-proxy
            # sending HEAD/GET to sign in and letting the hook's POST through, an app serving a page
            # on GET/HEAD of its hook path). Failed, check told such a working sink to send its
            # events to the sign-in page. (A force-ssl-redirect redirects POST too: a send retries
            # each such request, never following it, and logs where it points.)
            if opts.healthcheck_url:
                advice = "give healthcheck_url the address it points to, for a check of the endpoint"
            else:
                advice = f"if a {opts.method} to url is redirected too, give url the address it points to"
            self.log.warning(
                "webhook %s answered HEAD with %d, a redirect to %s: not a failure (a HEAD may be "
                "redirected while a %s is taken), but the sink's %ss are not followed when redirected "
                "(retried until put right): %s",
                redact_url(url),
                status,
                self._location(location),
                opts.method,
                opts.method,
                advice,
            )
            return
        if status not in (401, 403):
            return
        if not ours:  # says nothing of our credentials: they were not sent
            self.log.warning(
                "webhook %s answered HEAD with %d %r (%s): it is reachable; whether %s takes our "
                "credentials is not checked",
                redact_url(url),
                status,
                reason,
                _WITHHELD,
                self._redacted,
            )
            return
        # What of the request authenticates it: named, never shown. A header counts when its name
        # says so (X-Api-Key, Private-Token, Cookie, ...); X-Source: or X-Amz-Acl: do not.
        sent = [
            *(["bearer_token"] if opts.bearer_token is not None else []),
            *(["username/password"] if opts.username is not None else []),
            *(["the user info in url"] if urlsplit(opts.url).username is not None else []),
        ]
        pattern = re.compile(r"auth|token|key|secret|pass|cookie|session|credential", re.IGNORECASE)
        if names := [name for name in opts.headers if pattern.search(name)]:
            sent.append(f"headers ({', '.join(names)})")
        if sent:
            raise SinkError(
                f"webhook sink: {redact_url(url)} refused our credentials ({status} {reason!r} to HEAD); "
                f"check {', '.join(sent)}"
            )
        # No credentials of ours: the endpoint may want some we lack (it will then refuse every event),
        # or only refuse this HEAD: a URL with its credentials in the query (presigned URLs sign the
        # method), a signature `secret` (a HEAD has no body to sign), API gateways that answer 403 to
        # a method without a route. So a warning: failing check would fail working webhooks.
        self.log.warning(
            "webhook %s answered HEAD with %d %r and no credentials are configured (bearer_token, "
            "username/password, headers): if it wants them for %s too, it will refuse every event",
            redact_url(url),
            status,
            reason,
            opts.method,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def __repr__(self) -> str:
        return f"WebhookSink(url={self._redacted!r}, mode={self.options.mode!r})"

    # -- sending ----------------------------------------------------------------------------------
    def _encode(self, occ: Occurrence) -> bytes:
        if self._template is not None:
            return self._template.render(occ)
        return occ.encode(include_raw=self.options.include_raw)

    def _sign(self, body: bytes, keys: Sequence[str]) -> dict[str, str]:
        secret = self.options.secret
        if secret is None:
            return {}
        if self._standard_keys:
            msg_id = "evr_" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:40]
            ts = int(time.time())
            signatures = (standard_webhooks_signature(key, msg_id, ts, body) for key in self._standard_keys)
            return {
                "webhook-id": msg_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": " ".join(signatures),
            }
        return {"X-Hub-Signature-256": github_signature(secret.get_secret_value().encode(), body)}

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.options.timeout:g}s"
        if isinstance(exc, aiohttp.ClientConnectorError):
            return f"cannot connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
        if isinstance(exc, aiohttp.ClientResponseError | HttpProcessingError):
            # An answer aiohttp cannot parse (a header over 8190 bytes, a bad status line or
            # Content-Length, a bad chunk with the head): its text ends in the request URL, which no
            # replacement needs to find. Its status (400 for a parse error) and what the parser says.
            status = exc.status if isinstance(exc, aiohttp.ClientResponseError) else exc.code
            error = _parse_error(exc)
            if error is not None:
                said = f"{_parser_says(error)} ({type(error).__name__})"
            else:
                said = " ".join(scrub(str(exc.message), self._secrets).split())[:100]
            text = f"invalid HTTP answer ({type(exc).__name__} {status}): {said}"
        else:
            text = f"{type(exc).__name__}: {exc}"
            for raw, shown in self._shown_urls:  # some aiohttp errors quote the request URL
                text = text.replace(raw, shown)
        return scrub(text, self._secrets)[:300]

    async def _post(self, body: bytes, keys: Sequence[str]) -> tuple[int | None, Outcome]:
        """One request → its status (None: no answer) and OK, retry(...) or reject(...)."""
        if self._session is None:
            await self.start()
        assert self._session is not None
        headers = {**self._headers, **self._sign(body, keys)}
        cut: asyncio.Timeout | None = None
        # The request's timeout covers its answer's body too: the excerpt's wait ends at it (at once
        # or a little before aiohttp's own timer), for the reason to say which ran out.
        deadline = asyncio.get_running_loop().time() + self.options.timeout
        try:
            async with asyncio.timeout(None) as cut:  # no deadline of its own until stop_sending
                self._in_flight = cut
                async with self._session.request(
                    self.options.method,
                    self._target,
                    data=io.BytesIO(body),  # a stream: aiohttp warns about (and blocks on) large raw bytes
                    headers=headers,
                    allow_redirects=False,
                ) as resp:
                    return await self._answer(resp, deadline)
        except (aiohttp.ClientError, HttpProcessingError, TimeoutError, OSError) as exc:
            if cut is not None and cut.expired():
                # Our stop, not the endpoint's failure: a hold (no attempt). As a failure it was
                # counted one, and on the last of retry_max_attempts dead-lettered at a clean stop.
                return None, retry(
                    f"{self._redacted}: no answer within {_STOP_GRACE:g}s of the router's stop (whether "
                    "it went in is unknown: sent again after the restart)",
                    held=True,
                )
            return None, retry(f"{self._redacted}: {self._describe(exc)}")
        finally:
            self._in_flight = None

    async def _answer(self, resp: aiohttp.ClientResponse, deadline: float) -> tuple[int, Outcome]:
        """The response's status and OK, retry(...) or reject(...); ``deadline``: the request's
        timeout ends then (loop time)."""
        status = resp.status
        if 200 <= status < 300:
            return status, OK
        if 300 <= status < 400:
            # Not followed: a 301/302 would turn the POST into a GET, a 307/308 send the
            # events wherever it points. An answer about the URL, not the events (an ingress
            # switched to force-ssl-redirect, a framework's trailing-slash redirect): retried,
            # as the Elasticsearch sink does, and logged (``_log_endpoint``).
            where = self._location(resp.headers.get("Location"))
            return status, retry(f"HTTP {status} redirect from {self._redacted} to {where} (not followed)")
        detail = f"HTTP {status} from {self._redacted}" + await self._excerpt(resp, deadline)
        if status in _RETRY_STATUSES or status >= 500 or status in _REFUSED or status in _ABOUT_THE_URL:
            after = parse_retry_after(resp.headers.get("Retry-After"))
            return status, retry(detail, retry_after=after)
        return status, reject(detail)

    async def _excerpt(self, resp: aiohttp.ClientResponse, deadline: float) -> str:
        """``": <the answer's first bytes>"`` (none: ``""``), or why its body could not be read. The
        status line is in, so the status decides the outcome: a body that stalled, was cut off or is
        not in its Content-Encoding turned a final 400 into a retry (for ever, by default), and a
        429's Retry-After was lost. Waited for ``_EXCERPT_WAIT``, or until the request's timeout."""
        left = deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(max(0.0, min(_EXCERPT_WAIT, left))):
                raw = await _body_start(resp, 512)
        except _READ_ERRORS as exc:
            return f" (its body unreadable: {self._unreadable(exc, left < _EXCERPT_WAIT)})"
        # Our secrets out before anything is cut, and one cut off by the read too.
        excerpt = scrub(raw.decode("utf-8", "replace"), self._secrets, partial=not resp.content.at_eof())
        excerpt = " ".join(excerpt.split())[:200]
        return f": {excerpt}" if excerpt else ""

    def _unreadable(self, exc: BaseException, late: bool) -> str:
        """Why an error answer's body could not be read, for its reason; ``late``: the request's
        timeout, which covers the body too, came before the excerpt's wait could end."""
        if isinstance(exc, TimeoutError):
            if late:
                return f"none of it before the request's timeout ({self.options.timeout:g}s) ran out"
            return f"none of it within {_EXCERPT_WAIT:g}s"
        # aiohttp's parse error (under its ClientPayloadError, or alone from its pure-Python parser):
        # what it means, never its message. Its code (400) is no status of the answer.
        error = _parse_error(exc)
        if error is not None:
            return f"{_parser_says(error)} ({type(error).__name__})"
        return self._describe(exc)[:100]

    def _location(self, location: str | None) -> str:
        """Where a redirect points, as logs may show it (``shown_location``, our credentials out)."""
        if not location:
            return "no Location"
        try:
            return repr(shown_location(location, self._secrets))
        except ValueError:
            return "an unparseable Location"

    def _log_endpoint(self, status: int | None, outcome: Outcome) -> None:
        """A 401/403, a 404/405 or a redirect taken as the endpoint's answer, not the records': logged
        once per run (then at most every 10 min; at once again after a 2xx)."""
        if status in _ABOUT_THE_URL:
            self._refusing = True
            self._refused_log.warning(
                "url",
                "webhook %s: %s: check url: its path or method (%s %s); retrying until that is put "
                "right (nothing is dead-lettered for it)",
                self.context.name,
                outcome.reason,
                self.options.method,
                self._redacted,
            )
            return
        if status is not None and 300 <= status < 400:
            self._refusing = True
            self._refused_log.warning(
                "redirect",
                "webhook %s: %s: give url the address it points to (a POST redirected would come "
                "back a GET, or go on to another host); retrying until that is put right (nothing "
                "is dead-lettered for it)",
                self.context.name,
                outcome.reason,
            )
            return
        if status not in _REFUSED:
            return
        self._refusing = True
        opts = self.options
        sent = [
            *(["bearer_token"] if opts.bearer_token is not None else []),
            *(["username/password"] if opts.username is not None else []),
            *(["the user info in url"] if urlsplit(opts.url).username is not None else []),
            *(["the query of url"] if urlsplit(opts.url).query else []),
            *(["secret (signature)"] if opts.secret is not None else []),
            *([f"headers ({', '.join(opts.headers)})"] if opts.headers else []),
        ]
        if sent:
            advice = f"check {', '.join(sent)} (a rotated file: credential is taken within seconds)"
        else:
            advice = (
                "no credentials are configured (bearer_token, username/password, secret, headers, "
                "a token in url): it may want some"
            )
        self._refused_log.warning(
            "refused",
            "webhook %s: our credentials refused? %s; retrying until that is put right "
            "(nothing is dead-lettered for it): %s",
            self.context.name,
            advice,
            outcome.reason,
        )

    def _accepted(self) -> None:
        if self._refusing:  # a run of refusals or redirects is over: the next one is logged at once
            self._refusing = False
            self._refused_log = Throttled(self.log, _LOG_REFUSED_EVERY)

    def _begin(self) -> _Send:
        now = time.monotonic()
        return _Send(until=now + self.send_budget - self.options.timeout, began=now)

    def _out_of_time(self, run: _Send) -> bool:
        return run.requests > 0 and time.monotonic() > run.until

    def _not_started(self, indices: Sequence[int], outcomes: list[Outcome | None], run: _Send) -> None:
        """What the send did not start within its budget, or once the router is stopping: sent
        again by the engine, in place (or after the restart, from the spool)."""
        if self._stopping:
            reason = f"not sent: the router is stopping ({len(indices)} occurrences left for the restart)"
        else:
            reason = (
                f"not sent: the send had run for {time.monotonic() - run.began:.1f}s of its "
                f"{self.send_budget:g}s ({len(indices)} occurrences left for the next)"
            )
        for i in indices:
            outcomes[i] = retry(reason, held=True)
        run.unstarted.extend(indices)

    @staticmethod
    def _either(status: int | None, outcome: Outcome) -> bool:
        """A retry answer that may be about the records sent (a receiver's bug for one payload, a WAF
        rule, a per-object authorization, a 404 for the object a record names) as well as about the
        endpoint (down, our credentials, a redirect, a wrong path or method): a probe with other
        records tells which. Not one with Retry-After (the endpoint asks for a pause), a
        408/425/429, or no answer at all."""
        return status is not None and (
            status in _REFUSED
            or status in _ABOUT_THE_URL
            or 300 <= status < 400
            or (status >= 500 and outcome.retry_after is None)
        )

    def _note(self, keys: Sequence[str], answered: bool) -> None:
        """What the endpoint answered to a request carrying ``keys`` (answered: 2xx or a final 4xx)."""
        if answered:
            self._answered = True
            self._common = None
            self._unsure.clear()  # up: what failed alone before may have failed only with the rest
            if self._failing:
                for key in keys:
                    self._failing.pop(key, None)
        else:
            # (Failures of records set aside count too: when one fails beside a fresh record, that
            # is the only sign the endpoint fails everything, and ignored, every fresh record of an
            # outage was then set aside alone, 27 of 30 at a receiver down in a quiet cluster.)
            self._common = set(keys) if self._common is None else self._common.intersection(keys)

    def _failing_alone(self, key: str) -> bool:
        """The endpoint failed nothing but requests carrying ``key`` since it last answered one: with
        no other record to probe with, the latest answer to others says it takes them."""
        return self._answered and self._common is not None and key in self._common

    def _still_failing(self, key: str) -> bool:
        """A record failing alone with no other to probe with stays aside when it was set aside before
        and not answered since (``_failing``), whatever else failed meanwhile; otherwise it is set
        aside when the endpoint failed nothing else since its last answer (``_failing_alone``).
        Retried in place after another record's failure (a 401 on one request, a flap), it came
        back alone at every attempt with nothing to probe with, and held up the whole sink for
        ever: no request of others was answered again, and the engine sent nothing else."""
        return key in self._failing or self._failing_alone(key)

    @staticmethod
    def _aside(outcome: Outcome) -> Outcome:
        """Failed for a cause of its own (the endpoint takes other events): set aside."""
        return retry(outcome.reason, retry_after=outcome.retry_after, defer=True)

    async def _walk(
        self,
        batch: Sequence[Occurrence],
        bodies: list[_Item],
        outcomes: list[Outcome | None],
        run: _Send,
    ) -> None:
        """mode=batch: the records as one JSON array, or in parts when the endpoint does not take it
        whole; mode=event: one request per record, in order, by the same rules (so an event's later
        occurrences wait behind one set aside, and a flap sets nothing aside there either). A 413 (a
        body limit below ours: nginx's client_max_body_size is 1m by default) halves a batch, so
        only a record too large on its own is rejected; so does a 400/422 (``_split``: a
        receiver's validation refusing the array for one record), so that only that record is. So
        does a retry answer that may be about the records rather than the endpoint (``_either``: a
        receiver's bug for one payload), down to the record it fails on, which then waits aside
        (``defer``) while the rest goes in, in order. Before, that record held up the whole sink,
        for ever.

        * Nothing of the send taken yet, the first record goes alone, as a probe. Failing too, the
          endpoint may be down (two requests an attempt while it is): all of it is retried in place,
          and that record, remembered (``_unsure``), goes alone first at its next send.
        * A record failing alone, while a record of another event is left, waits for the next
          request: one such record (not one failed alone before, if any is left). Taken, the record
          is sent alone again at once and set aside only if it fails again: a flap must fail it on
          both sides of a success. The probe failing too, what is left is retried in place (a probe
          set aside before and not taken since, none other left, is a suspect instead). (In
          mode=event the first record failing is such a record: its request was the send's only
          failure yet, as the whole batch's is in mode=batch.)
        * With no other record to probe with, it is sent alone once more (unless it failed twice
          already with nothing of the send taken: two requests an attempt), and failing again set
          aside when the endpoint failed nothing but requests carrying it since it last answered
          one, or only records set aside (event mode's rule).
        * Later records of an event with one set aside are held back with it (``held``), so that
          the event's occurrences go in in order; a probe is never one of a suspect's event.
        * Nothing is set aside when a failed request carried none of those records: the endpoint
          flaps (``_unless_flapping``).

        No record taken is sent again; what is not started within the send's budget, or once the
        router is stopping (``stop_sending``), is held, and so is the request given up then."""
        failing, unsure = self._failing, self._unsure
        single = self.options.mode == "event"  # a request per record, its body the record alone

        def known(i: int) -> bool:  # failed alone before, and not answered since
            key = batch[i].key
            return key in failing or key in unsure

        stack = [_Part(bodies)]
        if len(bodies) > 1 and known(bodies[0][0]):
            stack = [_Part(bodies[1:]), _Part(bodies[:1])]  # alone first, not the whole again
        suspects: list[_Item] = []  # failed alone, waiting for a request of other records
        alone: dict[int, int | None] = {}  # failed alone in this send → the status
        held: dict[str, Outcome] = {}  # uid of an event with a record set aside → its later records'
        failed: list[list[int]] = []  # the records of each request failed (``_either``)
        while stack:
            part = stack.pop()
            items = self._not_held(part.items, batch, outcomes, held)
            if not items:
                continue
            if self._stopping:  # held for the restart, whatever else stopped the send (no attempt)
                self._not_started([i for i, _ in items], outcomes, run)
                continue
            if run.stop is not None:  # the endpoint fails other records too, or wants a pause
                rest = run.rest()
                for i, _ in items:
                    outcomes[i] = rest
                continue
            if suspects and not part.confirm:
                items = self._probe(items, batch, known, suspects, outcomes, stack)
                if not items:
                    continue
            elif suspects:  # a confirmation, past a record it failed again: its event waits
                items = self._behind(items, batch, suspects, outcomes)
                if not items:
                    continue
            if self._out_of_time(run):
                self._not_started([i for i, _ in items], outcomes, run)
                continue
            if single:
                if len(items) > 1:  # the head alone, the rest after it
                    stack.append(_Part(items[1:], part.confirm))
                    items = items[:1]
                body = items[0][1]
            else:
                body = b"[" + b",".join(b for _, b in items) + b"]"
            keys = [batch[i].key for i, _ in items]
            run.requests += 1
            status, outcome = await self._post(body, keys)
            if outcome.held:  # given up at the router's stop (``_post``): no answer, held as unsent
                for i, _ in items:
                    outcomes[i] = outcome
                run.unstarted.extend(i for i, _ in items)
                continue
            answered = outcome.kind is not OutcomeKind.RETRY
            self._note(keys, answered)
            if outcome.kind is OutcomeKind.REJECT and len(items) > 1:
                if self._split(status, run):
                    self._halve(items, part.confirm, stack)
                    continue
                if status in _PER_RECORD:
                    outcome = reject(
                        f"{outcome.reason} (a request of {len(items)} records, refused whole: the send had "
                        f"spent its {_SPLIT_REQUESTS} requests for finding the records at fault)"
                    )
            for i, _ in items:
                outcomes[i] = outcome
            if answered:
                run.taken = True
                if outcome.kind is OutcomeKind.OK:
                    self._accepted()
                if suspects:  # their probe was taken: each is tried alone again, all together first
                    stack.append(_Part(sorted(suspects), confirm=True))
                    suspects = []
                continue
            if run.whole is None and len(items) == len(bodies):
                run.whole = outcome
            if not self._either(status, outcome):
                run.stop = outcome
                continue
            failed.append([i for i, _ in items])
            if len(items) > 1:
                if run.taken or part.confirm:
                    self._halve(items, part.confirm, stack)
                else:  # the first record alone, as a probe
                    stack += [_Part(items[1:]), _Part(items[:1])]
                continue
            i = items[0][0]
            again = i in alone or known(i)
            alone[i] = status
            if part.confirm and again:  # failed alone on both sides of a request of others taken
                self._set_aside(i, batch, outcomes, held)
            elif (
                suspects
                and not part.confirm
                and batch[i].key in failing
                and all(batch[j].key in failing for j, _ in suspects)
            ):
                # A probe set aside before and not taken since, behind suspects all set aside too
                # (two events set aside, read back first after a restart) fails by itself, not as the
                # endpoint's answer: a suspect too, set aside again (``_still_failing``). As the
                # endpoint's answer, all was retried in place, the same at every attempt, for ever.
                # Behind a fresh suspect its failure is the endpoint's: it may be down.
                suspects.append(items[0])
            elif suspects and not part.confirm:  # it was their probe: the endpoint fails others too
                run.stop = outcome
                self._log_endpoint(status, outcome)
            elif self._others_left(batch[i].uid, batch, stack):
                # (A confirmation failing a record not failed alone before, sent with the suspects
                # as it was behind one of its event: it too waits for a probe.)
                if run.taken or again or len(failed) == 1:  # (mode=event: the send's first request)
                    suspects.append(items[0])
                else:  # nothing of the send taken, and it did not fail alone before: down, maybe
                    run.stop = outcome
                    self._log_endpoint(status, outcome)
            elif (
                again
                or (not run.taken and sum(i in records for records in failed) > 1)
                or not self._failing_alone(batch[i].key)  # failing again would not set it aside
            ):
                suspects.append(items[0])  # none left to probe with: judged by the latest answers
            else:  # alone once more first: one flap is not enough to set it aside
                stack.append(_Part(items))
        for i, _ in sorted(suspects):  # no request of other records after them
            uid = batch[i].uid
            if uid in held:
                outcomes[i] = held[uid]
            elif run.stop is None and i in alone and self._still_failing(batch[i].key):
                self._set_aside(i, batch, outcomes, held)
            elif i in alone and run.stop is None:  # (a stop logged its cause)
                self._log_endpoint(alone[i], _known(outcomes[i]))
        self._unless_flapping(failed, outcomes)
        for i in alone:  # not in a probe again, alone first at the head
            outcome = _known(outcomes[i])
            if outcome.kind is OutcomeKind.RETRY:
                key = batch[i].key
                if outcome.defer:  # until answered
                    failing.pop(key, None)
                    failing[key] = None
                else:  # until the endpoint answers a request
                    unsure.add(key)
        while len(failing) > _FAILING_MAX:
            del failing[next(iter(failing))]
        if self._common and self._common <= failing.keys():
            # Every failure since the last answer is the doing of records now set aside: the next
            # record failing alone with none other to probe with is judged as after that answer.
            # Kept, a second record the receiver fails (Y/1 after X/1) was never set aside: retried
            # in place alone, nothing else sent, nothing answered, the sink held up for ever. (The
            # cost: at a receiver down in a quiet cluster, a fresh record failing alone twice is set
            # aside too; item 210.)
            self._common = None

    @staticmethod
    def _unless_flapping(failed: list[list[int]], outcomes: list[Outcome | None]) -> None:
        """Nothing set aside when the endpoint failed a request of this send carrying none of the
        records set aside: it fails records it takes at other times (it flaps, or went down in
        between), and a record failing alone may have been its victim. Those are retried in place
        then, with the rest. A record the receiver cannot take fails every request carrying it, so
        that explains every failure of a send that finds it."""
        aside = {i for i, o in enumerate(outcomes) if o is not None and o.defer and not o.held}
        if not aside or all(not aside.isdisjoint(records) for records in failed):
            return
        for i, o in enumerate(outcomes):
            if o is not None and o.defer:
                outcomes[i] = retry(o.reason, retry_after=o.retry_after, held=o.held)

    @staticmethod
    def _split(status: int | None, run: _Send) -> bool:
        """Whether a request of several records answered a final 4xx is sent again in halves: a 413
        always (a body limit: halves fit), a 400/422 (a receiver refusing the array for one
        record) while the send has requests left for it (``_SPLIT_REQUESTS``). Rejected whole,
        every record of the batch went to the dead-letter file with the one record's reason."""
        if status == 413:
            return True
        if status not in _PER_RECORD or run.splits_left < 2:
            return False
        run.splits_left -= 2
        return True

    @staticmethod
    def _halve(items: list[_Item], confirm: bool, stack: list[_Part]) -> None:
        """Both halves of ``items`` on ``stack``, the first to be sent first."""
        mid = len(items) // 2
        stack += [_Part(items[mid:], confirm), _Part(items[:mid], confirm)]

    @staticmethod
    def _others_left(uid: str, batch: Sequence[Occurrence], stack: list[_Part]) -> bool:
        """A record of another event is still to be sent: a probe."""
        return any(batch[i].uid != uid for part in stack for i, _ in part.items)

    @staticmethod
    def _probe(
        items: list[_Item],
        batch: Sequence[Occurrence],
        known: Callable[[int], bool],
        suspects: list[_Item],
        outcomes: list[Outcome | None],
        stack: list[_Part],
    ) -> list[_Item]:
        """The request after records failed alone (``suspects``): one record of another event, not
        one that failed alone before if any is left (those would fail it; every record failed alone
        while the endpoint was down: the first of another event). The records before it join the
        suspects unsent (an event's occurrences go in order), the rest goes back on ``stack``."""
        uids = {batch[i].uid for i, _ in suspects}
        chosen = None
        for fresh in (True, False):
            skipped = set(uids)
            for n, (i, _) in enumerate(items):
                uid = batch[i].uid
                if uid in skipped or (fresh and known(i)):
                    skipped.add(uid)
                    continue
                chosen = n
                break
            if chosen is not None:
                break
        before = items if chosen is None else items[:chosen]
        for i, body in before:
            suspects.append((i, body))
            if outcomes[i] is None:
                outcomes[i] = retry("not sent: behind a record the endpoint failed alone")
        if chosen is None:
            return []
        if chosen + 1 < len(items):
            stack.append(_Part(items[chosen + 1 :]))
        return [items[chosen]]

    @staticmethod
    def _behind(
        items: list[_Item], batch: Sequence[Occurrence], suspects: list[_Item], outcomes: list[Outcome | None]
    ) -> list[_Item]:
        """The records of a confirmation (``items``) of an event with a record that failed alone
        again there and waits for the next probe (not set aside: its first failure alone since the
        probe was taken): they join it unsent, as the records before a probe do (``_probe``). Sent,
        X/2 went in before X/1, which had joined the suspects behind another record (two records
        the receiver fails on, or a good one caught twice by a run of 401s)."""
        uids = {batch[i].uid for i, _ in suspects}
        kept: list[_Item] = []
        for i, body in items:
            if batch[i].uid not in uids:
                kept.append((i, body))
                continue
            suspects.append((i, body))
            if outcomes[i] is None:
                outcomes[i] = retry("not sent: behind a record the endpoint failed alone")
        return kept

    def _set_aside(
        self, i: int, batch: Sequence[Occurrence], outcomes: list[Outcome | None], held: dict[str, Outcome]
    ) -> None:
        """Record ``i`` failed for a cause of its own: set aside, its event's later records with it."""
        outcomes[i] = self._aside(_known(outcomes[i]))
        occ = batch[i]
        held.setdefault(
            occ.uid,
            retry(
                f"held back behind {occ.key}, set aside: an event's occurrences go in in order",
                held=True,
                defer=True,
            ),
        )

    @staticmethod
    def _not_held(
        items: list[_Item],
        batch: Sequence[Occurrence],
        outcomes: list[Outcome | None],
        held: dict[str, Outcome],
    ) -> list[_Item]:
        """``items`` but the records of events with one set aside (those get their hold)."""
        if not held:
            return items
        kept: list[_Item] = []
        for i, body in items:
            hold = held.get(batch[i].uid)
            if hold is None:
                kept.append((i, body))
            else:
                outcomes[i] = hold
        return kept

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        outcomes: list[Outcome | None] = [None] * len(batch)
        bodies: list[_Item] = []
        for i, occ in enumerate(batch):
            try:
                bodies.append((i, self._encode(occ)))
            except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
                outcomes[i] = reject(f"cannot encode {occ.key}: {exc}")

        run = self._begin()
        if bodies:
            await self._walk(batch, bodies, outcomes, run)
            whole = run.whole
            if (
                self.options.mode == "batch"
                and not self._stopping  # (what the stop held stays held: no failed attempt)
                and whole is not None
                and not run.taken
                and len(bodies) == len(batch)
                and not any(o is not None and o.defer for o in outcomes)
            ):
                raise RetryableError(whole.reason, retry_after=whole.retry_after)
            if run.unstarted and any(o is not None and o.defer and not o.held for o in outcomes):
                # A record set aside, and the send out of time: what it did not start waits aside too
                # (due at once, no attempt). Retried in place, it took the record set aside back in
                # place with it, at the head of every resend: the good records behind it waited a
                # doubling backoff, or were dead-lettered with it at retry_max_attempts, most never
                # sent (a session 28 review).
                for i in run.unstarted:
                    held = _known(outcomes[i])
                    if held.held and not held.defer:
                        outcomes[i] = retry(held.reason, retry_after=0.0, held=True, defer=True)
        self._save_failing()
        # Every record has its outcome by now; one without would be no success (never sent).
        return [o if o is not None else retry("not sent") for o in outcomes]


class _PassPhraseAsked(Exception):
    """OpenSSL wants a pass phrase for the client key and key_password is not set."""


async def _body_start(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``resp``'s body, as they come. aiohttp's C parser, failing on a body
    after the head (a bad chunk), sets its error on the connection and closes it without a word to the
    body's reader: the read waited out the whole excerpt wait and then said "none of it". The
    connection's close ends the read, with that error."""
    connection = resp.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None:  # released: the body is all in
        return await resp.content.read(limit)

    def wake(closed: asyncio.Future[None] | None = None) -> None:
        if closed is not None:
            retrieved(closed)  # a connection lost with an error is said by the read
        content = resp.content
        if content.is_eof() or content.exception() is not None:  # the body ended, or its error is in
            return
        error = aiohttp.ClientPayloadError("the connection was closed before the body ended")
        error.__cause__ = protocol.exception()
        content.set_exception(error)

    closed = protocol.closed
    if closed is None or closed.done():  # lost already: a read would wait for nothing
        wake(closed)
        return await resp.content.read(limit)
    closed.add_done_callback(wake)
    try:
        return await resp.content.read(limit)
    finally:
        # Made by asking for it: a pooled connection lost later with an error would leave it
        # "never retrieved" (an error in the log). One mark per connection: the future lives as
        # long as the connection, and added at every answer read so, a receiver refusing every
        # record on a kept-alive connection piled up one callback (and a Context) per record.
        closed.remove_done_callback(wake)
        closed.remove_done_callback(retrieved)
        closed.add_done_callback(retrieved)


def _parse_error(exc: BaseException) -> HttpProcessingError | None:
    """The innermost of aiohttp's parse errors behind ``exc`` (its ClientPayloadError and
    ClientResponseError wrap one, its protocol copies one), if any."""
    found = None
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        if isinstance(at, HttpProcessingError):
            found = at
        at = at.__cause__
    return found


def _parser_says(error: HttpProcessingError) -> str:
    """What aiohttp's parser found wrong, never the bytes it quotes: the line it failed on, cut at a
    TCP segment's end, held a piece of our token that a gateway echoed, which no scrub finds (and the
    pure-Python parser's whole message for a bad chunk-size line is that line)."""
    message = str(error.message)
    if _C_PARSER and not isinstance(error, PayloadEncodingError) and (found := _LLHTTP.match(message)):
        return found[1]  # llhttp's own reason
    if isinstance(error, LineTooLong):
        return f"Got more than {error.args[1]} bytes when reading a line"
    if isinstance(error, ContentLengthError | TransferEncodingError) and message.startswith(
        "Not enough data"
    ):
        return "cut off before its end"
    return next(meaning for kind, meaning in _PARSE_MEANINGS if isinstance(error, kind))


_WITHHELD = "sent without our credentials: healthcheck_url is not at url's scheme, host and port"


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port (the scheme's default when not written) of ``url``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not past the options' validation; -1 is no port the other can have
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _url_forms(urls: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(URL, what to show instead) for each URL as given and as yarl writes it (``%2f`` in a query
    as ``/``, ``%7E`` as ``~``, non-ASCII encoded): aiohttp's errors quote the latter. Longest
    first, so no URL is replaced inside a longer one."""
    forms: dict[str, str] = {}
    for url, shown in urls:
        forms.setdefault(url, shown)
        with contextlib.suppress(ValueError, TypeError):
            forms.setdefault(str(yarl.URL(url)), shown)
    return sorted(forms.items(), key=lambda form: len(form[0]), reverse=True)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _known(outcome: Outcome | None) -> Outcome:
    assert outcome is not None
    return outcome
