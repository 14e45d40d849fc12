"""``sls`` sink: Alibaba Cloud Log Service (SLS) PutLogs, compatible with the SLS "K8s event center".

``--sink=sls:https://cn-hangzhou.log.aliyuncs.com?project=p&logStore=k8s-event&accessKeyId=env:AK_ID&accessKeySecret=env:AK_SECRET``

Wire format (docs sink-protocols.md §5, checked against the official aliyun-log-python-sdk 0.9.52):
``POST /logstores/<logstore>/shards/lb`` on host ``<project>.<endpoint>``, body a protobuf ``LogGroup``
compressed with LZ4 (raw block, no size prefix; default) or deflate (zlib), signed with the V1 scheme
(HMAC-SHA1 over verb, Content-MD5, Content-Type, Date, the sorted ``x-log-*``/``x-acs-*`` headers and
the resource), optional STS ``x-acs-security-token``.

Endpoint: the URL, or ``<regionId>.log.aliyuncs.com`` when the URL is empty (or kube-eventer's placeholder
``sls.aliyuncs.com``); ``internal=true`` switches ``<region>.log.aliyuncs.com`` to the VPC endpoint
``<region>-intranet.log.aliyuncs.com``. As the official SDK does, an endpoint that is an IP address is
connected to directly and the project travels in the ``Host`` header (``<project>.<ip>``) — that is also
how tests reach a receiver on 127.0.0.1.

Each occurrence becomes one log with the K8s event center's fields (kube-eventer's sls sink:
``eventId`` = the Event object as JSON, ``hostname`` = source host, ``level`` = type, and for Pod events
``pod_id``/``pod_name``) followed by the normalised record's top-level fields as strings: nested
``involved_object`` flattened with ``_`` (``involved_object_kind``), ``labels``/``annotations`` as JSON
objects, booleans ``true``/``false``, null fields left out. ``include_raw`` changes nothing: the raw Event
is always in ``eventId``. Note: the key is ``eventId`` (not ``event_id``) because that is what
kube-eventer writes and what the event center's dashboards query (``eventId.reason`` ...).

Log time = the occurrence's normalised time (``Time`` seconds, ``Time_ns`` the nanosecond part). The
service accepts log times within [now - 7 days, now + 15 minutes]; with ``clamp_time=true`` (default)
an occurrence outside that window is still delivered, stamped at the nearest allowed time, and carries
``time_adjusted=true`` (its real time stays in ``time`` and ``eventId``); with ``clamp_time=false`` it is
dead-lettered instead. With ``clamp_time=true`` the old edge is taken 25 minutes early (a log before
it is stamped there): the service's clock may be up to 15 minutes ahead of ours, and a request may be
retried minutes later. Otherwise the window is the service's own, and the service has the last word: a
request refused with InvalidTimestamp all the same (its clock is not ours) is halved down to the log
refused, which is sent once more stamped at the router's now (``clamp_time=true``) or dead-lettered
alone. The logs stored so are counted (``SLSSink.modified``:
``eventrouter_sink_modified_total{reason="time_adjusted"}``) and logged with their count, at once, then at
most once a minute, and what is left at close.

The engine's batch is split here into requests of at most 4096 logs and 3 MB of uncompressed protobuf;
a single occurrence too big for one request is rejected alone.

Time: a send ends on its own within the engine's ``send_budget`` (five sixths of ``send_timeout``): each
request's timeout is ``request_timeout`` or what is left of that budget, whichever is less, and a
further request of the send (the next part of a split batch, a half of a refused one) starts only while
a tenth of the budget and twice the slowest answer of the send are left. What it did not send is
answered retry (held): the engine sends it again in place, at once, and what went in is not sent again.
Before, a batch of several requests (30 s each by default) could outlast ``send_timeout``: the engine
cut it off and sent the whole batch again, the parts already stored too. A send in which no log was
stored or refused (a refusal answered too slowly for its pieces to start) is a failed attempt instead:
backoff, ``retry_max_attempts``, a warning at most every 10 minutes. A hold would repeat it at once,
for ever, unseen.

What the service refused is carried across sends: after a refusal for size (PostBodyTooLarge, 413: a
limit below ours, a proxy's) requests hold at most half the refused one's logs and bytes, and after a
refusal for content (PostBodyInvalid, InvalidTimestamp) not halved down within its send, at most half
its logs; a log whose time was refused and whose re-stamped request did not start is sent re-stamped.
So each send starts where the last one stopped, and a slow service still gets the batch in. The
limits double again after every 16 requests taken. A send that did nothing because its first request,
over the limits before that doubling, was refused is held (sent again at once), not failed: that
refusal brought the limits back to a size taken, so raising them never costs a failed attempt.

Causes of the whole target that the operator puts right (refused credentials, a clock off by more than
15 minutes, a project or logstore that does not exist, e.g. one being re-created, a suspended project,
a logstore without a shard) are retried with the engine's backoff (``retry_max_attempts`` still ends
them), logged once per run of failures, as the start waits for a missing project or logstore. What a
request carries (a body or a log time the service refuses) is rejected. SLS's codes about the
request's headers (MissingDate, InvalidHost, InvalidBodyRawSize, ...: its table of common errors) say
nothing about the logs and refuse every request alike until a proxy changing them is put right: retried,
logged once per run naming the header. ``x-log-date`` (not signed, as the SDK sends it) carries the
request's time past a proxy that drops ``Date``. An error code this sink does not know is judged by its
status and logged once per run naming it: 401, 403 and 404 refuse the project or logstore as a whole
(Alibaba's own C producer retries them all by default), so they are retried; any other 4xx is taken as
a refusal of the request's logs, which are dead-lettered. A front's own 4xx page (neither SLS's error
JSON nor ``x-log-requestid``) is retried whatever its status (400, 405, 407, 421, 431 ... refuse every
request alike), but 413, a proxy's body limit: the request is halved as for PostBodyTooLarge, and a
single log refused so is dead-lettered.

What answers before SLS (an ingress, an auth proxy, a captive or egress gateway) is never taken for
it. A redirect (3xx) is not followed: aiohttp turned a PutLogs answered 301/302 into a body-less GET,
took a sign-in page's 200 as stored, and re-sent a 307/308's signed body and STS token to wherever
``Location`` pointed. ``start()`` (and ``eventrouter check``) fails naming the ``Location``, redacted; met
while sending, it is retried, never dead-lettered. A 2xx counts as stored only with the
``x-log-requestid`` every SLS answer carries (sink-protocols.md §5): one without is a front's own page,
retried and named by its status, Content-Type and Server header, never its body. Both are logged at
once, then at most every 10 minutes, until a request is stored again.

A 2xx with ``x-log-requestid`` is stored without its body being read. SLS's own 400 (and another 4xx
its code decides) is read within the request's timeout: its code tells a header's refusal
(RequestTimeExpired, MissingDate: retried) from a log's. Another error answer's body, only quoted, is
read for at most 2 s (or the request's timeout, if less) once its head is in. One that stalls, is cut
off or cannot be decoded is judged by its status alone (413 halved, 429/5xx retried after its Retry-After, 401,
403 and 404 retried as above), and SLS's own 400 (``x-log-requestid``) as a refusal of the request's logs,
halved down to a log refused alone, which is dead-lettered.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import cramjam
import orjson
from pydantic import AliasChoices, Field, model_validator

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
    reject,
    retry,
)
from eventrouter.body_prefix import EXCERPT_WAIT, excerpt
from eventrouter.logs import Throttled
from eventrouter.options import FilePath, resolve_secret
from eventrouter.protowire import bytes_field
from eventrouter.retry_after import parse_retry_after as _retry_after

from ._modified import ModifiedLog
from ._scrub import credentials, scrub, shown_location
from ._sls_log import encode_log, encode_occurrence, log_contents

__all__ = ["SLSOptions", "SLSSink", "encode_log", "log_contents"]

API_VERSION = "0.6.0"
MAX_LOGS_PER_REQUEST = 4096
MAX_REQUEST_BYTES = 3 * 1024 * 1024
LOG_TIME_PAST = 7 * 24 * 3600
LOG_TIME_FUTURE = 15 * 60
# clamp_time=true stamps a log this close to the old edge 25 minutes inside it: the service takes a
# Date up to 15 minutes off its clock, so its "now - 7 days" may be that much later than ours, and the
# request may be retried minutes later (time passing takes an old log out). Nothing else has margins:
# clamp_time=false dead-letters only what is outside the nominal window (the service has the last word,
# InvalidTimestamp, on the rest), and a future log is sent as it is, time passing brings it in.
_PAST_MARGIN = 25 * 60
_KE_PLACEHOLDER_HOST = "sls.aliyuncs.com"
# Default credentials from the environment: Alibaba's names, then kube-eventer's.
_ENV_KEY_ID = ("ALIBABA_CLOUD_ACCESS_KEY_ID", "AccessKeyId")
_ENV_KEY_SECRET = ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "AccessKeySecret")
_ENV_TOKEN = "ALIBABA_CLOUD_SECURITY_TOKEN"
# What aiohttp refuses in a header value (RFC 9110 5.5): a credential carrying one cannot be sent.
_HEADER_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_REGION_HOST = re.compile(r"^([a-z0-9-]+?)(-intranet)?\.log\.aliyuncs\.com$")

# Error codes by what the sink does with them (SLS error JSON "errorCode").
_RETRY_CODES = {
    "WriteQuotaExceed",
    "ShardWriteQuotaExceed",
    "ProjectQuotaExceed",
    "ServerBusy",
    "InternalServerError",
    "RequestTimeout",
}
_TARGET_CODES = {
    "ProjectNotExist",
    "LogStoreNotExist",
    # A suspended project: an overdue account; until late 2025 also a project in the recycle bin,
    # since answered ProjectInRecycleBin (Alibaba's error tables and announcement of 2025-09-26).
    "ProjectForbidden",
    "ProjectInRecycleBin",
    # The logstore has no shard to write to (documented for the shard APIs; UNCONFIRMED for PutLogs).
    "LogStoreWithoutShard",
}
_CREDENTIAL_CODES = {
    "SignatureNotMatch",
    "Unauthorized",
    "InvalidAccessKeyId",
    "SecurityToken.Expired",
    "SecurityTokenExpired",
}
# About the request's HTTP headers, never its logs (SLS's common error codes, doc-detail/29013), each
# with the header it names: every request is refused alike until what changes them (a proxy dropping
# Date, rewriting Host) is put right, so they are retried, as a whole target refused is. The table
# names a bad Date InvalidDateFormat, its later versions InvalidRequestTime; 415 InvalidContentType.
_HEADER_CODES = {
    "MissingDate": "Date",
    "InvalidDateFormat": "Date",
    "InvalidRequestTime": "Date",
    "MissingHost": "Host",
    "InvalidHost": "Host",
    "MissingBodyRawSize": "x-log-bodyrawsize",
    "InvalidBodyRawSize": "x-log-bodyrawsize",
    "InvalidCompressType": "x-log-compresstype",
    "MissingAPIVersion": "x-log-apiversion",
    "InvalidAPIVersion": "x-log-apiversion",
    "MissingContentLength": "Content-Length",
    "MissingContentType": "Content-Type",
    "InvalidContentType": "Content-Type",
}
# About the request's own logs: halved down to the log refused, which is rejected.
_REQUEST_CODES = {"PostBodyInvalid", "InvalidTimestamp", "PostBodyTooLarge"}
# A code not named above from the service with one of these statuses refuses the project or logstore
# as a whole, not the request's logs: retried (aliyun-log-c-sdk's producer retries every 403 as a
# quota error, and every 401 and 404 unless told to drop them; iLogtail retries a code it does not know
# several times before it drops the data).
_TARGET_STATUSES = {401, 403, 404}
# Requests taken after which limits learned from refusals (_Fit) are doubled again.
_GROW_AFTER = 16
# Logs remembered for re-stamping at the next send (their request ran out of the send's budget).
_RESTAMP_KEEP = 1024
_KNOWN_CODES = frozenset(
    {*_RETRY_CODES, *_TARGET_CODES, *_CREDENTIAL_CODES, *_HEADER_CODES, *_REQUEST_CODES, "RequestTimeExpired"}
)
# What of an answer's error is quoted and remembered. SLS's codes are a few dozen short words and its
# messages a sentence; a gateway's or a broken SLS-compatible endpoint's may be anything: a code of
# 30,000 characters differing per request (a request id in it) was logged at ERROR at every request,
# the "once per run" throttle never holding, and kept until a request was stored (9 MB per 300).
_CODE_QUOTED = 64  # characters of an error code quoted (the longest of SLS's is 21)
_MESSAGE_QUOTED = 1000  # characters of an error message quoted
_OTHER_CODES_KEPT = 16  # codes not in _KNOWN_CODES counted and logged each in a run of failures
_OTHER_CODES = "other codes"
"""The key under which the codes past _OTHER_CODES_KEPT are counted (logged once, at the first)."""
_ANSWER_BYTES = 64 * 1024
"""Bytes of an answer read: SLS's error JSON is a few hundred, a 2xx needs none, and of a front's
page 200 are quoted. Read whole, a proxy's 256 MB 502 page took the router from 53 to 580 MB (its
chart's limit is 256Mi), on every retry."""
_LOG_STUCK_EVERY = 600.0  # seconds between warnings of sends that did nothing (then with a count)
_LOG_FRONT_EVERY = 600.0  # seconds between warnings of a redirect or a front's 2xx (then with a count)
_MODIFIED_LOG_EVERY = 60.0  # seconds between two logs of the logs delivered stamped otherwise


class SLSOptions(SinkOptions):
    project: str = Field("", description="SLS project name.")
    logstore: str = Field(
        "",
        validation_alias=AliasChoices("logstore", "logStore", "log_store"),
        description="Logstore to write to (kube-eventer: logStore).",
    )
    topic: str = Field("", description="LogGroup topic (__topic__).")
    source: str = Field(
        "", description="LogGroup source (__source__); default: the cluster name, else the hostname."
    )
    access_key_id: Secret | None = Field(
        None,
        validation_alias=AliasChoices("access_key_id", "accessKeyId"),
        description="AccessKey ID (literal, env:NAME or file:/path); default env ALIBABA_CLOUD_ACCESS_KEY_ID "
        "or AccessKeyId.",
    )
    access_key_secret: Secret | None = Field(
        None,
        validation_alias=AliasChoices("access_key_secret", "accessKeySecret"),
        description="AccessKey secret; default env ALIBABA_CLOUD_ACCESS_KEY_SECRET or AccessKeySecret.",
    )
    security_token: Secret | None = Field(
        None,
        validation_alias=AliasChoices("security_token", "securityToken", "sts_token"),
        description="STS security token for temporary credentials; default env ALIBABA_CLOUD_SECURITY_TOKEN "
        "when the key also comes from ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET, or is a temporary one (STS.), "
        "never with a long-term key.",
    )
    region_id: str = Field(
        "",
        validation_alias=AliasChoices("region_id", "regionId"),
        description="Region; endpoint <regionId>.log.aliyuncs.com when the URL is empty.",
    )
    internal: bool = Field(
        False,
        description="Use the VPC endpoint <region>-intranet.log.aliyuncs.com (kube-eventer's default).",
    )
    compress: Literal["lz4", "deflate"] = Field(
        "lz4", validation_alias=AliasChoices("compress", "compress_type"), description="Body compression."
    )
    clamp_time: bool = Field(
        True,
        description="Stamp occurrences outside the service's [now-7d, now+15m] window at the nearest "
        "allowed time (true) instead of dead-lettering them (false).",
    )
    check_on_start: bool = Field(
        True, description="GetLogStore at start to prove project, logstore and credentials."
    )
    ca_file: FilePath | None = Field(None, description="CA bundle for TLS verification.")
    tls_skip_verify: bool = Field(False, description="Do not verify the server's TLS certificate.")
    request_timeout: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds one HTTP request may take (at most what is left of the send's budget: "
        "5/6 of send_timeout).",
    )

    @model_validator(mode="after")
    def _target(self) -> SLSOptions:
        if not self.project:
            raise ValueError("project is required")
        if not self.logstore:
            raise ValueError("logStore is required")
        endpoint_url(self)  # raises ValueError naming what is missing
        return self


def endpoint_url(options: SLSOptions) -> str:
    """``scheme://host[:port]`` of the endpoint, without the project prefix."""
    url = options.url.strip()
    if url and "://" not in url:
        url = "https://" + url
    parts = urlsplit(url) if url else None
    if parts is None or not parts.hostname or parts.hostname == _KE_PLACEHOLDER_HOST:
        if not options.region_id:
            raise ValueError("give the endpoint URL (sls:https://<region>.log.aliyuncs.com) or regionId")
        suffix = "-intranet" if options.internal else ""
        return f"https://{options.region_id}{suffix}.log.aliyuncs.com"
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint scheme must be http or https, not {parts.scheme!r}")
    host = parts.hostname
    match = _REGION_HOST.match(host)
    if options.internal and match and not match.group(2):
        host = f"{match.group(1)}-intranet.log.aliyuncs.com"
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}"


def _given_or_env(option: str, given: Secret | None, names: tuple[str, ...]) -> tuple[str, str]:
    """A credential option's value (``env:``/``file:`` resolved already) and "", else the first of
    ``names`` set in the environment, read as ``env:NAME`` is (a trailing newline stripped, empty
    refused: ValueError naming ``option``), and its name; ("", "") when none is."""
    if given is not None:
        return given.get_secret_value(), ""
    for name in names:
        if name in os.environ:
            try:
                return resolve_secret(f"env:{name}"), name
            except ValueError as exc:
                raise ValueError(f"{option}: {exc}") from None
    return "", ""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class _Chunk:
    indexes: list[int]
    logs: list[bytes]
    size: int


@dataclass(slots=True)
class _Answer:
    status: int
    code: str
    """The service's errorCode, or ``HTTP<status>`` for an answer without one (a gateway's page)."""
    message: str
    retry_after: float | None
    from_service: bool
    """The answer carried SLS's error JSON (``errorCode``), or is its success."""
    front: bool = False
    """An error with neither SLS's error JSON nor its ``x-log-requestid``: a page of something before
    SLS (a gateway, a WAF, an ingress)."""
    stored: bool = False
    """A 2xx of SLS's own (``x-log-requestid``): the request's logs are stored."""
    unreadable: bool = False
    """An error whose body (its error code) could not be read: judged by its status alone."""


@dataclass(slots=True)
class _Send:
    """One send's progress across its requests."""

    began: float
    deadline: float
    """time.monotonic() by which the send ends on its own (the context's ``send_budget``)."""
    restamped: set[int] = field(default_factory=set)
    """Indexes of the batch encoded at the send's now (their time refused at an earlier send)."""
    adjusted: set[int] = field(default_factory=set)
    """Indexes of the batch sent stamped otherwise than their own time (``time_adjusted``)."""
    requests: int = 0
    slowest: float = 0.0
    """Seconds the slowest answered request of this send took."""
    delivered: bool = False
    """A request of this send was accepted."""
    refused: int = 0
    """The fewest logs of a request refused for its content (halved) in this send."""
    code: str = ""
    """The last code a request was refused with and sent again (in pieces, or re-stamped)."""
    probe: bool = False
    """The first request, over the limits before they were last doubled, was refused for its size."""


@dataclass(slots=True)
class _Fit:
    """Request limits learned from the service's refusals, carried across sends."""

    logs: int
    size: int
    """Raw bytes (the LogGroup before compression, as ``x-log-bodyrawsize``)."""
    before: tuple[int, int] | None = None
    """The limits before they were last doubled (16 requests taken under them)."""
    taken: int = 0
    """Requests accepted since the limits were last set."""


class SLSSink(Sink[SLSOptions]):
    """PutLogs to one project/logstore; splits batches to the service's limits."""

    options_model = SLSOptions
    description = (
        "Alibaba Cloud SLS PutLogs (protobuf LogGroup, LZ4/deflate, V1 signature), K8s event center fields"
    )

    def __init__(self, options: SLSOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self._endpoint = endpoint_url(options)
        parts = urlsplit(self._endpoint)
        host = parts.hostname or ""
        # As the SDK does: the project is the first label of Host; an IP endpoint is dialled directly.
        self._host_header = f"{options.project}.{host}"
        if _is_ip(host):
            self._base = self._endpoint
        else:
            self._base = f"{parts.scheme}://{options.project}.{parts.netloc}"
        self._where = f"project {options.project!r}, logstore {options.logstore!r} at {self._endpoint}"
        self._source = options.source or context.cluster or socket.gethostname()
        self._session: aiohttp.ClientSession | None = None
        # The codes logged in the current run of failures, each with the requests it refused: the run
        # ends at the next request accepted, and the next run is logged again.
        self._refused: dict[str, int] = {}
        self._warned_timeout = False
        self._batch: Sequence[Occurrence] = ()  # the batch being sent (send's own state)
        # Limits below ours the service refused beyond (None: ours), and the keys of logs to send
        # re-stamped at our now: what a send learned and could not finish, for the next one.
        self._fit: _Fit | None = None
        self._restamp: dict[tuple[str, int], None] = {}
        self._stuck_log = Throttled(self.log, _LOG_STUCK_EVERY)
        self._front_log = Throttled(self.log, _LOG_FRONT_EVERY)
        # Logs delivered stamped otherwise than their own time: set by _encode for the log it just
        # clamped; in total (``modified``); since the last log (at most every _MODIFIED_LOG_EVERY
        # seconds, and at close).
        self._clamped = False
        self._modified_log = ModifiedLog(_MODIFIED_LOG_EVERY)
        self._key_id = ""
        self._key_secret = ""
        self._token: str | None = None
        self._secrets: list[str] = []
        self._lz4_buffer = bytearray()
        self.max_logs = MAX_LOGS_PER_REQUEST
        self.max_bytes = MAX_REQUEST_BYTES

    def _credentials(self) -> None:
        opts = self.options
        name = self.context.name
        try:
            # Read as ``env:NAME`` reads them: a Secret made with `echo key | base64` ends in a newline,
            # which went into the HMAC key (SignatureNotMatch, "check accessKeySecret" for a right key).
            key_id, id_from = _given_or_env("accessKeyId", opts.access_key_id, _ENV_KEY_ID)
            secret, secret_from = _given_or_env("accessKeySecret", opts.access_key_secret, _ENV_KEY_SECRET)
        except ValueError as exc:
            raise SinkError(f"sls sink {name}: {exc}") from None
        token, token_from = "", ""
        if opts.security_token:
            token = opts.security_token.get_secret_value()
        elif (id_from, secret_from) == (_ENV_KEY_ID[0], _ENV_KEY_SECRET[0]) or key_id.startswith("STS."):
            # Only beside a key it can go with: the key of the same variables, as Alibaba's credential
            # chain takes it, or a temporary key (Alibaba's start with "STS."), which needs a token.
            # Attached to an explicit long-term key, a token left in the pod's environment made every
            # request refused (401), for ever. Empty: none (as that chain reads it).
            token, token_from = os.environ.get(_ENV_TOKEN, "").rstrip("\r\n"), _ENV_TOKEN
        for option, value, source in (
            ("accessKeyId", key_id, id_from),
            ("security_token", token, token_from),
        ):
            unsafe = _HEADER_UNSAFE.search(value)
            if unsafe:
                # aiohttp raised ValueError at every request, unexplained ("send raised ValueError").
                where = f"environment variable {source}" if source else "the option"
                raise SinkError(
                    f"sls sink {name}: {option} (from {where}) has a control character at position "
                    f"{unsafe.start()}, which no HTTP header may carry: correct it"
                )
        self._key_id, self._key_secret, self._token = key_id, secret, token or None
        # Out of answers quoted in reasons and logs (the AccessKeyId is no secret: it names the key).
        self._secrets = credentials([self._key_secret, self._token])
        if not self._key_id or not self._key_secret:
            raise SinkError(
                f"sls sink {name}: accessKeyId and accessKeySecret are required for {self._where}"
            )

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl_arg: ssl.SSLContext | bool = True
            if self.options.tls_skip_verify:
                ssl_arg = False
            elif self.options.ca_file:
                ssl_arg = ssl.create_default_context(cafile=self.options.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_arg),
                timeout=aiohttp.ClientTimeout(total=self.options.request_timeout),
                auto_decompress=False,
            )
        return self._session

    # -- signing ----------------------------------------------------------------------------------

    def _signed_headers(
        self, method: str, resource: str, body: bytes, headers: dict[str, str]
    ) -> dict[str, str]:
        headers = dict(headers)
        headers["x-log-apiversion"] = API_VERSION
        headers["x-log-signaturemethod"] = "hmac-sha1"
        headers["Date"] = email.utils.formatdate(usegmt=True)
        headers["Host"] = self._host_header
        if self._token:
            headers["x-acs-security-token"] = self._token
        md5 = ""
        if body:
            md5 = hashlib.md5(body).hexdigest().upper()
            headers["Content-MD5"] = md5
        signed = sorted(
            (k.lower(), v.strip()) for k, v in headers.items() if k.lower().startswith(("x-log-", "x-acs-"))
        )
        text = (
            f"{method}\n{md5}\n{headers.get('Content-Type', '')}\n{headers['Date']}\n"
            + "".join(f"{k}:{v}\n" for k, v in signed)
            + resource
        )
        digest = hmac.new(self._key_secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha1).digest()
        headers["Authorization"] = f"LOG {self._key_id}:{base64.b64encode(digest).decode('ascii')}"
        # Not signed, as the official SDK adds it (auth.py: for a proxy that drops Date): SLS reads
        # the request's time from it when Date is missing.
        headers["x-log-date"] = headers["Date"]
        return headers

    async def _request(
        self, method: str, resource: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> _Answer:
        """Send one signed request, given ``timeout`` seconds in all."""
        try:
            return await self._exchange(method, resource, body, headers, timeout)
        except ValueError as exc:
            if isinstance(exc, aiohttp.ClientError):  # InvalidURL is both: unreachable, as before
                raise
            # aiohttp refuses a header value with a control character: one of ours, from the options.
            raise SinkError(
                f"sls sink {self.context.name}: a request header cannot be sent ({exc}): check "
                "security_token, accessKeyId and project for a control character"
            ) from None

    async def _exchange(
        self, method: str, resource: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> _Answer:
        session = self._ensure_session()
        signed = self._signed_headers(method, resource, body, headers)
        async with session.request(
            method,
            self._base + resource,
            data=body or None,
            headers=signed,
            timeout=aiohttp.ClientTimeout(total=timeout),
            # Followed, a 301/302 turned PutLogs into a body-less GET, a sign-in page's 200 was taken
            # as stored, and a 307/308 took the signed body and the STS token to another host.
            allow_redirects=False,
        ) as resp:
            status = resp.status
            if 300 <= status < 400:
                where = self._location(resp.headers.get("Location"))
                return _Answer(status, f"HTTP{status}", f"a redirect to {where}, not followed", None, False)
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            request_id = resp.headers.get("x-log-requestid", "")
            if 200 <= status < 300:
                # Judged by its head, its body never read: SLS's 2xx has stored the logs, whatever
                # becomes of the body after it (a stall or a cut taken for no answer sent them again,
                # and SLS keeps both copies).
                if request_id:
                    return _Answer(status, "", "", None, True, stored=True)
                # Every SLS answer names its request: this one is a front's own (an auth proxy's or a
                # captive gateway's page), and the logs went no further. Named, never quoted.
                return _Answer(
                    status,
                    f"HTTP{status}",
                    f"a {status} without x-log-requestid, not SLS's answer (Content-Type "
                    f"{self._header(resp, 'Content-Type')}, Server {self._header(resp, 'Server')})",
                    None,
                    False,
                )
            # A body that stalls, is cut off or garbled is judged by the status (taken for no answer,
            # a 413 was never halved and a 429's Retry-After was lost); waited for as long as what it
            # decides is worth (body_prefix's rule, ``_wait_for_body``).
            wait = _wait_for_body(status, request_id, timeout)
            payload, cut, unreadable = await excerpt(resp, _ANSWER_BYTES, wait)
            if unreadable is not None:
                return self._unread(status, request_id, retry_after, unreadable)
            code, message = "", ""
            page = cut  # no error JSON of SLS's is that long: a front's page, never parsed in part
            if not cut:
                try:
                    parsed = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    page = True
                else:
                    if isinstance(parsed, dict):
                        # Quoted in reasons and logs: without our credentials (a gateway echoes those
                        # it refused), taken out before the cut (a cut one would not be recognised).
                        code = _cut(scrub(str(parsed.get("errorCode") or ""), self._secrets), _CODE_QUOTED)
                        message = _cut(
                            scrub(str(parsed.get("errorMessage") or ""), self._secrets), _MESSAGE_QUOTED
                        )
            if page:  # a gateway's page: a credential cut off at its end goes too
                text = payload[:200].decode("utf-8", "replace")
                message = scrub(text, self._secrets, partial=len(payload) > 200)
            if request_id:
                message = f"{message} (request id {request_id})"
            return _Answer(
                resp.status,
                code or f"HTTP{resp.status}",
                scrub(message, self._secrets),
                retry_after,
                bool(code),
                front=not code and not request_id,
            )

    def _unread(self, status: int, request_id: str, retry_after: float | None, why: str) -> _Answer:
        """An error answer whose body could not be read (``why``): judged by its status. Without its
        error code SLS's own 400 (``x-log-requestid``) is taken as one of the request's logs refused
        (PostBodyInvalid, InvalidTimestamp: halved, and a log refused alone dead-lettered)."""
        message = f"its body unreadable: {why}"
        if request_id:
            message = f"{message} (request id {scrub(request_id, self._secrets)})"
        return _Answer(
            status, f"HTTP{status}", message, retry_after, False, front=not request_id, unreadable=True
        )

    def _location(self, location: str | None) -> str:
        """Where a redirect points, as logs may show it (``shown_location``, our credentials out)."""
        if not location:
            return "no Location"
        try:
            return repr(shown_location(location, self._secrets))
        except ValueError:
            return "an unparseable Location"

    def _header(self, resp: aiohttp.ClientResponse, name: str) -> str:
        """A header of an answer that is not SLS's, as logs may show it (quoted, cut, scrubbed)."""
        value = resp.headers.get(name)
        return "none" if value is None else repr(scrub(value[:100], self._secrets, partial=len(value) > 100))

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        context = self.context
        if self.options.request_timeout > context.send_timeout and not self._warned_timeout:
            # Once: the engine tries a failed start again and again (a missing logstore).
            self._warned_timeout = True
            self.log.warning(
                "sls sink %s: request_timeout=%gs is longer than the pipeline's send_timeout=%gs: each "
                "request's timeout is cut to what is left of its send (at most %gs); lower "
                "request_timeout or raise send_timeout",
                context.name,
                self.options.request_timeout,
                context.send_timeout,
                context.send_budget,
            )
        self._credentials()
        self._ensure_session()
        if not self.options.check_on_start:
            return
        resource = f"/logstores/{self.options.logstore}"
        # The engine cuts a start off after send_timeout, as it does a send.
        timeout = min(self.options.request_timeout, context.send_budget)
        try:
            answer = await self._request("GET", resource, b"", {"x-log-bodyrawsize": "0"}, timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SinkError(
                f"sls sink {self.context.name}: cannot reach {self._where}: {_describe(exc)}"
            ) from None
        status, code, message = answer.status, answer.code, answer.message
        if answer.stored:
            return
        if 300 <= status < 400:
            raise SinkError(
                f"sls sink {self.context.name}: GetLogStore for {self._where} answered {status}, {message} "
                "(a PutLogs redirected would come back a GET, or go on to another host with its signed "
                "body and security token): give the endpoint it points to"
            )
        if 200 <= status < 300:
            raise SinkError(
                f"sls sink {self.context.name}: GetLogStore for {self._where} answered {message}: a "
                "proxy's or gateway's own page? Let requests through to SLS, or give its endpoint"
            )
        if code in _TARGET_CODES:
            raise SinkError(
                f"sls sink {self.context.name}: {code} for {self._where}: {message}; {self._todo(code)}"
            )
        if code == "SignatureNotMatch" or code == "InvalidAccessKeyId":
            raise SinkError(
                f"sls sink {self.context.name}: credentials rejected ({code}) for {self._where}: "
                "check accessKeyId/accessKeySecret"
            )
        if code == "RequestTimeExpired":
            raise SinkError(
                f"sls sink {self.context.name}: RequestTimeExpired for {self._where}: this machine's clock "
                f"differs from the service's by more than 15 minutes ({message}); fix the clock (NTP)"
            )
        if code in _HEADER_CODES:
            raise SinkError(
                f"sls sink {self.context.name}: GetLogStore for {self._where} answered {status} {code} "
                f"({message}): SLS refuses the request's {_HEADER_CODES[code]} header, as it would every "
                "PutLogs: a proxy between this router and SLS dropping or changing the request's headers?"
            )
        # Unauthorized may only mean the key lacks GetLogStore (a PutLogs-only RAM policy): carry on.
        self.log.warning(
            "sls sink %s: could not verify %s (%s %s: %s); PutLogs may still work",
            self.context.name,
            self._where,
            status,
            code,
            message,
        )

    async def check(self) -> None:
        """GetLogStore whatever check_on_start says: that option only spares the router's start the
        request, while `eventrouter check` is asked to reach SLS (it said ok, contacting nothing)."""
        if self.options.check_on_start:
            await self.start()
            return
        probe = SLSSink(self.options.model_copy(update={"check_on_start": True}), self.context)
        try:
            await probe.start()
        finally:
            await probe.aclose()

    def take_over(self, previous: Sink[SLSOptions]) -> None:
        """The counts of logs delivered changed carry over (a rotated key file)."""
        if isinstance(previous, SLSSink):
            self.modified = previous.modified
            self._modified_log = previous._modified_log

    async def aclose(self) -> None:
        if self._modified_log.unlogged:
            self._count_modified(set(), [], flush=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- sending ----------------------------------------------------------------------------------

    def _window(self, now: float) -> tuple[float, float]:
        """Log times sent as they are: SLS's window [now - 7 days, now + 15 minutes], its old edge
        _PAST_MARGIN later with ``clamp_time`` (a log before it is stamped there)."""
        low = now - LOG_TIME_PAST
        if self.options.clamp_time:
            low += _PAST_MARGIN
        return low, now + LOG_TIME_FUTURE

    def _encode(self, occ: Occurrence, now: float) -> tuple[bytes | None, str]:
        seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
        low, high = self._window(now)
        # The fast path gives the definition's bytes, or None when the definition must decide.
        if low <= seconds <= high:
            log = encode_occurrence(occ, seconds if seconds > 0 else 0, nanos, False)
            if log is not None:
                return log, ""
        elif self.options.clamp_time:
            self._clamped = True
            log = encode_occurrence(occ, max(int(low) if seconds < low else int(now), 0), nanos, True)
            if log is not None:
                return log, ""
        return self._encode_contents(occ, now)

    def _encode_contents(self, occ: Occurrence, now: float) -> tuple[bytes | None, str]:
        """The definition (log_contents + encode_log): for what the fast path leaves, and its errors."""
        seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
        contents = log_contents(occ)
        low, high = self._window(now)
        if not low <= seconds <= high:
            if not self.options.clamp_time:
                return None, (
                    f"event time {occ.record.get('time')} is outside the window SLS accepts "
                    "(now - 7 days ... now + 15 minutes) and clamp_time is false"
                )
            seconds = int(low) if seconds < low else int(now)
            contents.append(("time_adjusted", "true"))
            self._clamped = True
        try:
            log = bytes_field(1, encode_log(max(seconds, 0), nanos, contents))
        except UnicodeEncodeError as exc:
            return None, f"event {occ.key} has text that is not valid UTF-8 ({exc.reason} at {exc.start})"
        return log, ""

    def _encode_at(self, occ: Occurrence, seconds: int) -> bytes | None:
        """``occ``'s log stamped at ``seconds``, marked ``time_adjusted``; None if it cannot be encoded."""
        nanos = occ.time_ns % 1_000_000_000
        log = encode_occurrence(occ, seconds, nanos, True)
        if log is None:
            try:
                log = bytes_field(
                    1, encode_log(seconds, nanos, [*log_contents(occ), ("time_adjusted", "true")])
                )
            except UnicodeEncodeError:
                return None
        return log

    def _group_header(self) -> bytes:
        return bytes_field(3, self.options.topic) + bytes_field(4, self._source)

    def _limits(self) -> tuple[int, int]:
        """Most logs and raw bytes of a request: ours, or less after the service refused more."""
        fit = self._fit
        if fit is None:
            return self.max_logs, self.max_bytes
        return min(fit.logs, self.max_logs), min(fit.size, self.max_bytes)

    def _chunks(self, logs: list[tuple[int, bytes]], header_size: int) -> list[_Chunk]:
        limits = self._limits()
        if 0 < len(logs) <= limits[0]:  # usually the whole batch fits one request
            indexes, blobs = zip(*logs, strict=True)
            size = header_size + sum(map(len, blobs))
            if size <= limits[1]:
                return [_Chunk(list(indexes), list(blobs), size)]
        return _pack(logs, header_size, limits)

    def _shrink(self, logs: int, size: int | None, code: str) -> None:
        """After a refusal of a request of ``logs`` logs (and ``size`` raw bytes, when refused for its
        size): later requests hold at most half of each, until _GROW_AFTER of them are taken."""
        fit = self._fit
        most_logs, most_bytes = (fit.logs, fit.size) if fit else (self.max_logs, self.max_bytes)
        new = _Fit(
            min(most_logs, (logs + 1) // 2), most_bytes if size is None else min(most_bytes, size // 2)
        )
        self._fit = new
        if fit is None and size is not None:
            # Once an episode: a proxy's limit, or the service's below ours; it costs requests, not logs.
            self.log.warning(
                "sls sink %s: %s refused a request of %d logs, %d bytes as too large (%s), a limit below "
                "the sink's (%d logs, %d bytes; a proxy's?): requests now hold at most %d logs, %d bytes, "
                "doubled again after every %d taken",
                self.context.name,
                self._where,
                logs,
                size,
                code,
                self.max_logs,
                self.max_bytes,
                new.logs,
                new.size,
                _GROW_AFTER,
            )
        else:
            self.log.debug(
                "sls sink %s: %s refused a request of %d logs (%s): requests now hold at most %d logs, %d bytes",
                self.context.name,
                self._where,
                logs,
                code,
                new.logs,
                new.size,
            )

    def _taken(self) -> None:
        """A request was accepted: limits learned from refusals double after _GROW_AFTER, so that one
        refusal does not shrink requests for good (a proxy's limit raised, a bad log gone)."""
        fit = self._fit
        if fit is None:
            return
        fit.taken += 1
        if fit.taken < _GROW_AFTER:
            return
        logs, size = min(fit.logs * 2, self.max_logs), min(fit.size * 2, self.max_bytes)
        if logs >= self.max_logs and size >= self.max_bytes:
            self._fit = None
        else:
            self._fit = _Fit(logs, size, (fit.logs, fit.size))
        self.log.debug(
            "sls sink %s: request limits raised to %d logs, %d bytes", self.context.name, logs, size
        )

    def _compress(self, raw: bytes) -> tuple[bytes, str]:
        if self.options.compress == "deflate":
            return zlib.compress(raw, 6), "deflate"
        # Into a buffer kept across requests (identical output to compress_block, without allocating
        # and releasing the worst-case bound, megabytes, per request).
        bound = cramjam.lz4.compress_block_bound(raw)
        if len(self._lz4_buffer) < bound:
            self._lz4_buffer = bytearray(bound)
        size = cramjam.lz4.compress_block_into(raw, self._lz4_buffer, store_size=False)
        return bytes(memoryview(self._lz4_buffer)[:size]), "lz4"

    def _log_once(self, code: str, text: str, level: int = logging.ERROR) -> None:
        """Log ``text`` at the first request refused with ``code`` in this run of failures; count each
        (``_refused_key``: past _OTHER_CODES_KEPT codes SLS does not use, the rest logged once)."""
        key = self._refused_key(code)
        if key not in self._refused:
            self._refused[key] = 0
            if key == _OTHER_CODES:
                text = (
                    f"{text} [the {_OTHER_CODES_KEPT + 1}th code in this run of failures that SLS does not "
                    f"use: it and later ones are counted together as {_OTHER_CODES!r}, not logged, until a "
                    "request is stored]"
                )
            self.log.log(level, "%s", text)
        self._refused[key] += 1

    def _refused_key(self, code: str) -> str:
        """The key ``_refused`` counts ``code`` under: its own for SLS's codes and the first
        _OTHER_CODES_KEPT others of the run, then _OTHER_CODES (bounded, whatever a peer answers)."""
        if code in self._refused or code in _KNOWN_CODES:
            return code
        others = sum(1 for known in self._refused if known not in _KNOWN_CODES)
        return code if others < _OTHER_CODES_KEPT else _OTHER_CODES

    def _todo(self, code: str) -> str:
        """What the operator does about a target code (_TARGET_CODES)."""
        project, logstore = self.options.project, self.options.logstore
        if code == "ProjectNotExist":
            return f"create project {project!r} in this region, or correct project or the endpoint"
        if code == "LogStoreNotExist":
            return f"create logstore {logstore!r} in project {project!r}, or correct logStore"
        if code == "ProjectForbidden":
            return (
                f"project {project!r} is disabled (an overdue account, or the project is in the recycle "
                "bin): settle the account or restore the project"
            )
        if code == "ProjectInRecycleBin":
            return f"project {project!r} is in the recycle bin: restore it"
        return f"logstore {logstore!r} has no shard to write to: check its shards in the SLS console"

    def _failure(self, answer: _Answer, count: int) -> Outcome:
        """The outcome of ``count`` logs refused by ``answer``; logged once per run when the operator
        has something to put right or the code is one this sink does not know."""
        status, code, message, retry_after = answer.status, answer.code, answer.message, answer.retry_after
        what = f"SLS {status} {code}: {message} ({self._where})"
        name = self.context.name
        if 200 <= status < 400:  # SLS's own 2xx never comes here: a redirect, or a front's page
            return self._before_sls(answer, what)
        if code in _RETRY_CODES or status >= 500 or status in (408, 429):
            return retry(what, retry_after=retry_after)
        if code == "RequestTimeExpired":
            self._log_once(
                code,
                f"sls sink {name}: RequestTimeExpired — this machine's clock differs from the SLS service's "
                "by more than 15 minutes, so every request is refused until the clock is fixed (NTP); "
                f"retrying ({message})",
                logging.WARNING,
            )
            return retry(what, retry_after=retry_after)
        if code in _CREDENTIAL_CODES:
            # An expired STS token, a key revoked before its rotated Secret reached the pod, a RAM
            # policy being fixed: the same logs succeed once that is put right (a `file:` credential is
            # read again within seconds of its change). Retried, as the SDK does for expired tokens.
            self._log_once(
                code,
                f"sls sink {self.context.name}: credentials refused ({code}) for {self._where}: check "
                "accessKeyId/accessKeySecret/securityToken and the RAM policy; retrying until they work",
            )
            return retry(what, retry_after=retry_after)
        if code in _TARGET_CODES:
            # The sink's only target: a logstore being re-created or deleted by mistake, a project not
            # created yet or suspended. Its logs go in once that is put right; start() waits the same way.
            until = "it exists" if code.endswith("NotExist") else "that is put right"
            self._log_once(
                code,
                f"sls sink {name}: {code} for {self._where}: {self._todo(code)}; its occurrences are "
                f"retried (up to retry_max_attempts, if set) until {until}",
            )
            return retry(what, retry_after=retry_after)
        if code in _HEADER_CODES:
            # Not these logs: a header every request carries alike (a proxy dropping Date or rewriting
            # Host). Rejected, every occurrence was dead-lettered until someone noticed.
            self._log_once(
                code,
                f"sls sink {name}: SLS answered {status} {code} for {self._where} ({message}): it refuses "
                f"the request's {_HEADER_CODES[code]} header, not its logs, and so every request alike: a "
                "proxy between this router and SLS dropping or changing the request's headers? Its "
                "occurrences are retried (up to retry_max_attempts, if set) until that is put right",
            )
            return retry(what, retry_after=retry_after)
        if code in _REQUEST_CODES or _log_refused_unread(answer):
            return reject(what)
        if status in _TARGET_STATUSES or (answer.front and status != 413):
            # Also without SLS's error JSON: a gateway's or proxy's 401/403 (its credentials, its
            # policy) or 404 (a path prefix) refuses every request alike, never these logs alone, and
            # rejected, every occurrence was dead-lettered until someone noticed (as the robots', item 139).
            # So does a front's own page of another 4xx (400, 405, 407, 421, 431: the request's method,
            # proxy credentials, headers), but 413: a proxy's body limit, about this request's size.
            said = _said(answer)
            why = (
                f"a {status} refuses the project or logstore as a whole"
                if status in _TARGET_STATUSES
                else "a page of something before SLS (no x-log-requestid either) refuses every request alike"
            )
            self._log_once(
                code,
                f"sls sink {name}: SLS answered {status} {code} for {self._where}, {said} ({message}): "
                f"{why}, not these logs, so its occurrences are retried (up to retry_max_attempts, if set) "
                "until that is put right",
            )
            return retry(what, retry_after=retry_after)
        # Not known: taken as the request's own (a body the service refuses). Named in the log, as a
        # whole target refused so would dead-letter everything until it is noticed.
        self._log_once(
            code,
            f"sls sink {name}: SLS answered {status} {code} for {self._where}, {_said(answer)}"
            f" ({message}): taken as a refusal of the request's own logs, which are dead-lettered "
            f"({count} in this request, and those of every request refused so: if it refuses them all, "
            "put that right and replay the dead-letter file)",
        )
        return reject(what)

    def _before_sls(self, answer: _Answer, what: str) -> Outcome:
        """A redirect, or a 2xx that is not SLS's: about the endpoint, not these logs (an ingress
        switched to https, an auth front's sign-in page, a gateway moved). Never followed, never
        stored, never dead-lettered: retried (retry_max_attempts still ends it), logged at once, then
        at most every _LOG_FRONT_EVERY seconds until a request is stored again; counted per code."""
        status, code = answer.status, answer.code
        counted = self._refused_key(code)
        self._refused[counted] = self._refused.get(counted, 0) + 1
        if 300 <= status < 400:
            key = "redirect"
            todo = (
                "give the endpoint it points to (a PutLogs redirected would come back a GET, or go on to "
                "another host with its signed body and security token)"
            )
        else:
            key = "not-sls"
            todo = (
                "something before SLS answered in its place (an auth proxy's sign-in or a captive gateway's "
                "page?): let PutLogs through to SLS, or give its endpoint"
            )
        self._front_log.warning(
            key,
            "sls sink %s: %s: %s; retrying until that is put right (nothing is dead-lettered for it)",
            self.context.name,
            what,
            todo,
        )
        return retry(what)

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        if not self._key_secret:
            self._credentials()
        now = time.time()
        outcomes: list[Outcome | None] = [None] * len(batch)
        header = self._group_header()
        encoded: list[tuple[int, bytes]] = []
        restamp = self._restamp
        restamped: set[int] = set()
        adjusted: set[int] = set()
        for index, occ in enumerate(batch):
            try:
                log, why = None, ""
                if restamp and (occ.uid, occ.number) in restamp:
                    # Its time refused at an earlier send whose re-stamped request did not start.
                    log = self._encode_at(occ, int(now))
                if log is not None:
                    restamped.add(index)
                    adjusted.add(index)
                else:
                    log, why = self._encode(occ, now)
            except Exception as exc:  # bad input must cost one item, never the batch
                log, why = None, f"cannot encode event {occ.key}: {type(exc).__name__}: {exc}"
            if self._clamped:
                self._clamped = False
                if log is not None:
                    adjusted.add(index)
            if log is None:
                outcomes[index] = reject(why)
            elif len(header) + len(log) > self.max_bytes:
                outcomes[index] = reject(
                    f"event {occ.key} encodes to {len(log)} bytes, over the {self.max_bytes}-byte "
                    "PutLogs request limit"
                )
            else:
                encoded.append((index, log))
        resource = f"/logstores/{self.options.logstore}/shards/lb"
        began = time.monotonic()
        run = _Send(began, began + self.context.send_budget, restamped, adjusted)
        self._batch = batch
        try:
            await self._put_all(run, resource, header, self._chunks(encoded, len(header)), outcomes)
        finally:
            self._batch = ()
        final = self._settle(run, batch, [outcome if outcome is not None else OK for outcome in outcomes])
        if run.adjusted or self._modified_log.unlogged:
            self._count_modified(run.adjusted, final)
        return final

    def _count_modified(self, adjusted: set[int], final: list[Outcome], *, flush: bool = False) -> None:
        """Count the logs SLS stored stamped otherwise than their own time (``clamp_time``): nothing is
        lost, but only their ``time_adjusted`` field said so, and an operator learned of them only by
        querying the logstore. Logged with the count, at most every _MODIFIED_LOG_EVERY seconds
        (``flush``: now, at close)."""
        found = sum(final[index].kind is OutcomeKind.OK for index in adjusted)
        due = self._modified_log.count(self.modified, +Counter(time_adjusted=found), flush=flush)
        if due is None:
            return
        unlogged, since = due
        self.log.warning(
            "sls sink %s: %s stored %d logs stamped otherwise than their own time (outside the window "
            "SLS accepts, now - 7 days ... now + 15 minutes: at its nearest edge; or refused for their "
            "time: at the router's now); each keeps its own time in time and eventId and says "
            "time_adjusted=true, since %s",
            self.context.name,
            self._where,
            unlogged["time_adjusted"],
            since,
        )

    def _settle(self, run: _Send, batch: Sequence[Occurrence], final: list[Outcome]) -> list[Outcome]:
        """Keep what the send learned for the next; a send that stored or refused nothing fails."""
        for index in run.restamped:
            if final[index].kind is not OutcomeKind.RETRY:
                self._restamp.pop((batch[index].uid, batch[index].number), None)
        if run.refused:
            # Refused for its content and not halved down within the send: the next starts from
            # the half (each send then settles a log, or halves again).
            self._shrink(run.refused, None, run.code)
        if not any(o.held for o in final) or any(o.kind is not OutcomeKind.RETRY for o in final):
            return final
        if run.probe:
            # Only the limits raised again were refused: back to a size taken, the next send does more.
            return final
        # Nothing stored or refused: a hold (sent again at once, no failed attempt) would repeat a
        # refusal answered too slowly to split within a send for ever, unseen (sink up, no retry
        # counted, retry_max_attempts never reached). A failure backs off, counts and is bounded.
        budget = self.context.send_budget
        stuck = retry(
            f"no log stored or refused within the send's {budget:g}s budget: SLS answered {run.code} in "
            f"{run.slowest:.2g}s, too slowly for the refused request's pieces to start ({self._where})"
        )
        logs, size = self._limits()
        # Throttled: while it lasts such sends come between sends that do get pieces in.
        self._stuck_log.warning(
            "stuck",
            "sls sink %s: no log stored or refused within a send's %gs budget (5/6 of send_timeout): %s "
            "refused a request (%s) and answered in %.2gs, too slowly for its pieces to start in the same "
            "send. Later sends carry at most %d logs, %d bytes a request%s; a send that does nothing is "
            "retried with backoff (up to retry_max_attempts, if set)",
            self.context.name,
            budget,
            self._where,
            run.code,
            run.slowest,
            logs,
            size,
            ", a log whose time is refused stamped at our now" if self._restamp else "",
        )
        return [stuck if o.held else o for o in final]

    def _another_fits(self, run: _Send) -> bool:
        """A further request of the send starts only while a tenth of its budget and twice its slowest
        answer are left: one cut short by the budget may have been stored all the same, and would be
        sent again (the first request always starts: each send gets that far)."""
        left = run.deadline - time.monotonic()
        return left >= self.context.send_budget / 10 and left >= 2 * run.slowest

    def _timeout(self, run: _Send) -> float:
        """A request's timeout: ``request_timeout``, or what is left of the send's budget if that is
        less (at least a tenth of it), so the send ends before the engine cuts it off."""
        left = max(run.deadline - time.monotonic(), self.context.send_budget / 10)
        return min(self.options.request_timeout, left)

    async def _put_all(
        self,
        run: _Send,
        resource: str,
        header: bytes,
        chunks: list[_Chunk],
        outcomes: list[Outcome | None],
    ) -> Outcome | None:
        """The requests of ``chunks`` in turn; once one returns what the rest get, they get that."""
        stop: Outcome | None = None
        for chunk in chunks:
            if stop is not None:
                for index in chunk.indexes:
                    outcomes[index] = stop
                continue
            stop = await self._put(run, resource, header, chunk.indexes, chunk.logs, outcomes)
        return stop

    async def _put(
        self,
        run: _Send,
        resource: str,
        header: bytes,
        indexes: list[int],
        logs: list[bytes],
        outcomes: list[Outcome | None],
        *,
        restamped: bool = False,
    ) -> Outcome | None:
        """One PutLogs request for ``logs`` (several, over limits the service refused before); their
        outcomes go into ``outcomes``. Returns what the batch's requests not sent yet get when the rest
        must wait (quota, 5xx, credentials, a missing project or logstore, unreachable, the send's
        budget spent), None to go on."""
        if len(logs) > 1:
            limits = self._limits()
            if len(logs) > limits[0] or len(header) + sum(map(len, logs)) > limits[1]:
                # Over a limit the service refused (in this send or an earlier one): in pieces.
                pieces = _pack(list(zip(indexes, logs, strict=True)), len(header), limits)
                return await self._put_all(run, resource, header, pieces, outcomes)
        if run.requests and not self._another_fits(run):
            later = retry(
                f"not sent: the send had run for {time.monotonic() - run.began:.1f}s of its "
                f"{self.context.send_budget:g}s (sent next, at once)",
                held=True,
            )
            for index in indexes:
                outcomes[index] = later
            return later
        raw = b"".join(logs) + header
        body, compress_type = self._compress(raw)
        headers = {
            "Content-Type": "application/x-protobuf",
            "x-log-bodyrawsize": str(len(raw)),
            "x-log-compresstype": compress_type,
        }
        timeout = self._timeout(run)
        run.requests += 1
        started = time.monotonic()
        try:
            answer = await self._request("POST", resource, body, headers, timeout)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"cannot reach {self._where}: {_describe(exc)}"
            if isinstance(exc, TimeoutError) and timeout < self.options.request_timeout:
                reason += (
                    f" (no answer within {timeout:.3g}s, what was left of the send's "
                    f"{self.context.send_budget:g}s)"
                )
            if not run.delivered:
                raise RetryableError(reason) from None
            failed = retry(reason)
            for index in indexes:
                outcomes[index] = failed
            return failed
        run.slowest = max(run.slowest, time.monotonic() - started)
        status, code = answer.status, answer.code
        if answer.stored:
            run.delivered = True
            for index in indexes:
                outcomes[index] = OK
            self._taken()
            if self._refused:  # a run of failures is over: the next one is logged again
                self.log.info(
                    "sls sink %s: %s accepts logs again (after %s); requests refused meanwhile: %s",
                    self.context.name,
                    self._where,
                    ", ".join(sorted(self._refused)),
                    ", ".join(f"{c} {n}" for c, n in sorted(self._refused.items())),
                )
                self._refused.clear()
                self._front_log = Throttled(self.log, _LOG_FRONT_EVERY)  # the next run logged at once
            return None
        if len(logs) > 1 and (status == 413 or code in _REQUEST_CODES or _log_refused_unread(answer)):
            run.code = code
            if status == 413 or code == "PostBodyTooLarge":
                # Over a limit below ours (a proxy's; the service's "3 MB" may be 3,000,000 bytes):
                # this request and later ones (of later sends too) go in pieces of half its size.
                before = self._fit.before if self._fit else None
                if run.requests == 1 and before and (len(logs) > before[0] or len(raw) > before[1]):
                    run.probe = True  # larger than what was taken: the limits go back to that
                self._shrink(len(logs), len(raw), code)
                return await self._put(run, resource, header, indexes, logs, outcomes)
            # One log the service cannot read or whose time it refuses (its clock is not ours):
            # halved, so that only a log refused on its own is dead-lettered.
            mid = len(logs) // 2
            halves = [_Chunk(indexes[:mid], logs[:mid], 0), _Chunk(indexes[mid:], logs[mid:], 0)]
            stop = await self._put_all(run, resource, header, halves, outcomes)
            if stop is not None and stop.held:  # not halved down in time: the next send goes on
                run.refused = min(run.refused or len(logs), len(logs))
            return stop
        if (
            code == "InvalidTimestamp"
            and self.options.clamp_time
            and not restamped
            and indexes[0] not in run.restamped
            and self._batch
        ):
            # Inside our window, outside the service's: its clock is up to 15 minutes off ours (the
            # Date check allows that). Our "now" is inside its window whatever the difference.
            run.code = code
            occ = self._batch[indexes[0]]
            log = self._encode_at(occ, int(time.time()))
            if log is not None:
                run.adjusted.add(indexes[0])
                stop = await self._put(run, resource, header, indexes, [log], outcomes, restamped=True)
                if stop is not None and stop.held:  # not sent in time: the next send stamps it so
                    self._restamp[(occ.uid, occ.number)] = None
                    if len(self._restamp) > _RESTAMP_KEEP:  # the engine gave up on the oldest
                        del self._restamp[next(iter(self._restamp))]
                return stop
        outcome = self._failure(answer, len(indexes))
        for index in indexes:
            outcomes[index] = outcome
        if outcome.kind is OutcomeKind.RETRY:
            return outcome  # quota, 5xx, credentials, a missing target: the same for the rest now
        return None  # this request's logs only (a bad timestamp, an unknown code): the rest go on


def _wait_for_body(status: int, request_id: str, timeout: float) -> float | None:
    """Seconds an error answer's body is waited for once its head is in (``excerpt``'s ``wait``).
    SLS's own 4xx but 408, 413, 429 and 401/403/404 (x-log-requestid) is decided by its code (a 400
    RequestTimeExpired or a header's code is retried, PostBodyInvalid dead-letters a log): None,
    until the request's ``timeout`` (its ClientTimeout), as before any excerpt (cut at 2 s, a
    RequestTimeExpired in by 2.5 s dead-lettered every log). The others' status decides and their
    body is only quoted: ``EXCERPT_WAIT``."""
    decided_by_status = status >= 500 or status in (408, 413, 429) or status in _TARGET_STATUSES
    if request_id and not decided_by_status:
        return None
    return min(EXCERPT_WAIT, timeout)


def _cut(text: str, limit: int) -> str:
    """``text`` to at most ``limit`` characters, marked where cut."""
    return text if len(text) <= limit else text[:limit] + "…"


def _log_refused_unread(answer: _Answer) -> bool:
    """SLS's own 400 (``x-log-requestid``) whose error code could not be read: most of its 400s refuse
    one of the request's logs (PostBodyInvalid, InvalidTimestamp), so it is judged as those are."""
    return answer.unreadable and answer.status == 400 and not answer.front


def _said(answer: _Answer) -> str:
    """How an answer with an error code this sink does not act on came, for its log."""
    if answer.from_service:
        return "a code this sink does not know"
    if answer.unreadable and not answer.front:
        return "its error code unreadable"
    return "with no SLS error code (a proxy?)"


def _pack(logs: list[tuple[int, bytes]], header_size: int, limits: tuple[int, int]) -> list[_Chunk]:
    """``logs`` (index, log) in requests of at most ``limits`` (logs, raw bytes); a log over them goes
    alone."""
    chunks: list[_Chunk] = []
    current = _Chunk([], [], header_size)
    most_logs, most_bytes = limits
    for index, log in logs:
        if current.logs and (len(current.logs) >= most_logs or current.size + len(log) > most_bytes):
            chunks.append(current)
            current = _Chunk([], [], header_size)
        current.indexes.append(index)
        current.logs.append(log)
        current.size += len(log)
    if current.logs:
        chunks.append(current)
    return chunks


def _describe(exc: BaseException) -> str:
    # aiohttp's messages name host and port only, never headers; keep them short.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
