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
dead-lettered instead. The old edge is taken 25 minutes early: the service's clock may be up to 15
minutes ahead of ours. A request refused with InvalidTimestamp all the same (a clock off the other way)
is halved down to the log refused, which is sent once more stamped at the router's now
(``clamp_time=true``) or dead-lettered alone.

The engine's batch is split here into requests of at most 4096 logs and 3 MB of uncompressed protobuf;
a single occurrence too big for one request is rejected alone.

Time: a send ends on its own within the engine's ``send_budget`` (five sixths of ``send_timeout``): each
request's timeout is ``request_timeout`` or what is left of that budget, whichever is less, and a
further request of the send (the next part of a split batch, a half of a refused one) starts only while
a tenth of the budget and twice the slowest answer of the send are left. What it did not send is
answered retry (held): the engine sends it again in place, at once, and what went in is not sent again.
Before, a batch of several requests (30 s each by default) could outlast ``send_timeout``: the engine
cut it off and sent the whole batch again, the parts already stored too.

Causes of the whole target that the operator puts right (refused credentials, a clock off by more than
15 minutes, a project or logstore that does not exist, e.g. one being re-created, a suspended project,
a logstore without a shard) are retried with the engine's backoff (``retry_max_attempts`` still ends
them), logged once per run of failures, as the start waits for a missing project or logstore. What a
request carries (a body or a log time the service refuses) is rejected. An error code this sink does
not know is judged by its status and logged once per run naming it: 401, 403 and 404 refuse the project
or logstore as a whole (Alibaba's own C producer retries them all by default), so they are retried; any
other 4xx, and an answer without SLS's error JSON (a proxy's page), is taken as a refusal of the
request's logs, which are dead-lettered.
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
from collections.abc import Sequence
from dataclasses import dataclass
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
from eventrouter.options import FilePath
from eventrouter.protowire import bytes_field

from ._scrub import credentials, scrub
from ._sls_log import encode_log, encode_occurrence, log_contents

__all__ = ["SLSOptions", "SLSSink", "encode_log", "log_contents"]

API_VERSION = "0.6.0"
MAX_LOGS_PER_REQUEST = 4096
MAX_REQUEST_BYTES = 3 * 1024 * 1024
LOG_TIME_PAST = 7 * 24 * 3600
LOG_TIME_FUTURE = 15 * 60
_CLAMP_MARGIN = 600  # stay well inside the window: the request may be retried minutes later
# The service takes a Date up to 15 minutes off its clock, so its "now - 7 days" may be that much
# later than ours: a log near the old edge is stamped on the safe side of both clocks.
_PAST_MARGIN = _CLAMP_MARGIN + 15 * 60
_KE_PLACEHOLDER_HOST = "sls.aliyuncs.com"
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
# About the request's own logs: halved down to the log refused, which is rejected.
_REQUEST_CODES = {"PostBodyInvalid", "InvalidTimestamp", "PostBodyTooLarge"}
# A code not named above from the service with one of these statuses refuses the project or logstore
# as a whole, not the request's logs: retried (aliyun-log-c-sdk's producer retries every 403 as a
# quota error, and every 401 and 404 unless told to drop them; iLogtail retries a code it does not know
# several times before it drops the data).
_TARGET_STATUSES = {401, 403, 404}


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
        description="STS security token for temporary credentials; default env ALIBABA_CLOUD_SECURITY_TOKEN.",
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
    """The answer carried SLS's error JSON (``errorCode``)."""


@dataclass(slots=True)
class _Send:
    """One send's progress across its requests."""

    began: float
    deadline: float
    """time.monotonic() by which the send ends on its own (the context's ``send_budget``)."""
    requests: int = 0
    slowest: float = 0.0
    """Seconds the slowest answered request of this send took."""
    delivered: bool = False
    """A request of this send was accepted."""


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
        self._key_id = ""
        self._key_secret = ""
        self._token: str | None = None
        self._secrets: list[str] = []
        self._lz4_buffer = bytearray()
        self.max_logs = MAX_LOGS_PER_REQUEST
        self.max_bytes = MAX_REQUEST_BYTES

    def _credentials(self) -> None:
        opts = self.options
        self._key_id = (
            opts.access_key_id.get_secret_value()
            if opts.access_key_id
            else os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID") or os.environ.get("AccessKeyId") or ""  # noqa: SIM112 - kube-eventer's name
        )
        self._key_secret = (
            opts.access_key_secret.get_secret_value()
            if opts.access_key_secret
            else os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET") or os.environ.get("AccessKeySecret") or ""  # noqa: SIM112
        )
        token = (
            opts.security_token.get_secret_value()
            if opts.security_token
            else os.environ.get("ALIBABA_CLOUD_SECURITY_TOKEN") or ""
        )
        self._token = token or None
        # Out of answers quoted in reasons and logs (the AccessKeyId is no secret: it names the key).
        self._secrets = credentials([self._key_secret, self._token])
        if not self._key_id or not self._key_secret:
            raise SinkError(
                f"sls sink {self.context.name}: accessKeyId and accessKeySecret are required "
                f"for {self._where}"
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
        return headers

    async def _request(
        self, method: str, resource: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> _Answer:
        """Send one signed request, given ``timeout`` seconds in all."""
        session = self._ensure_session()
        signed = self._signed_headers(method, resource, body, headers)
        async with session.request(
            method,
            self._base + resource,
            data=body or None,
            headers=signed,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            payload = await resp.read()
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            if resp.status == 200:
                return _Answer(200, "", "", None, True)
            code, message = "", ""
            try:
                parsed = orjson.loads(payload)
                if isinstance(parsed, dict):
                    code = str(parsed.get("errorCode") or "")
                    message = str(parsed.get("errorMessage") or "")
            except orjson.JSONDecodeError:  # a gateway's page: a credential cut off at its end goes too
                text = payload[:200].decode("utf-8", "replace")
                message = scrub(text, self._secrets, partial=len(payload) > 200)
            request_id = resp.headers.get("x-log-requestid", "")
            if request_id:
                message = f"{message} (request id {request_id})"
            # Quoted in reasons and logs: without our credentials (a gateway echoes those it refused).
            code = scrub(code, self._secrets)
            return _Answer(
                resp.status,
                code or f"HTTP{resp.status}",
                scrub(message, self._secrets),
                retry_after,
                bool(code),
            )

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
        if status == 200:
            return
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

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- sending ----------------------------------------------------------------------------------

    def _encode(self, occ: Occurrence, now: float) -> tuple[bytes | None, str]:
        seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
        low = now - LOG_TIME_PAST + _PAST_MARGIN
        # The fast path gives the definition's bytes, or None when the definition must decide.
        if low <= seconds <= now + LOG_TIME_FUTURE - _CLAMP_MARGIN:
            log = encode_occurrence(occ, seconds if seconds > 0 else 0, nanos, False)
            if log is not None:
                return log, ""
        elif self.options.clamp_time:
            log = encode_occurrence(occ, max(int(low) if seconds < low else int(now), 0), nanos, True)
            if log is not None:
                return log, ""
        return self._encode_contents(occ, now)

    def _encode_contents(self, occ: Occurrence, now: float) -> tuple[bytes | None, str]:
        """The definition (log_contents + encode_log): for what the fast path leaves, and its errors."""
        seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
        contents = log_contents(occ)
        low, high = now - LOG_TIME_PAST + _PAST_MARGIN, now + LOG_TIME_FUTURE - _CLAMP_MARGIN
        if not low <= seconds <= high:
            if not self.options.clamp_time:
                return None, (
                    f"event time {occ.record.get('time')} is outside the window SLS accepts "
                    "(now - 7 days ... now + 15 minutes) and clamp_time is false"
                )
            seconds = int(low) if seconds < low else int(now)
            contents.append(("time_adjusted", "true"))
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

    def _chunks(self, logs: list[tuple[int, bytes]], header_size: int) -> list[_Chunk]:
        if 0 < len(logs) <= self.max_logs:  # usually the whole batch fits one request
            indexes, blobs = zip(*logs, strict=True)
            size = header_size + sum(map(len, blobs))
            if size <= self.max_bytes:
                return [_Chunk(list(indexes), list(blobs), size)]
        chunks: list[_Chunk] = []
        current = _Chunk([], [], header_size)
        for index, log in logs:
            if current.logs and (
                len(current.logs) >= self.max_logs or current.size + len(log) > self.max_bytes
            ):
                chunks.append(current)
                current = _Chunk([], [], header_size)
            current.indexes.append(index)
            current.logs.append(log)
            current.size += len(log)
        if current.logs:
            chunks.append(current)
        return chunks

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
        """Log ``text`` at the first request refused with ``code`` in this run of failures; count each."""
        if code not in self._refused:
            self._refused[code] = 0
            self.log.log(level, "%s", text)
        self._refused[code] += 1

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
        if code in _REQUEST_CODES:
            return reject(what)
        if answer.from_service and status in _TARGET_STATUSES:
            self._log_once(
                code,
                f"sls sink {name}: SLS answered {status} {code} for {self._where}, a code this sink does not "
                f"know ({message}): a {status} refuses the project or logstore as a whole, not these logs, "
                "so its occurrences are retried (up to retry_max_attempts, if set) until that is put right",
            )
            return retry(what, retry_after=retry_after)
        # Not known: taken as the request's own (a body the service refuses). Named in the log, as a
        # whole target refused so would dead-letter everything until it is noticed.
        self._log_once(
            code,
            f"sls sink {name}: SLS answered {status} {code} for {self._where}, "
            + (
                "a code this sink does not know"
                if answer.from_service
                else "with no SLS error code (a proxy?)"
            )
            + f" ({message}): taken as a refusal of the request's own logs, which are dead-lettered "
            f"({count} in this request, and those of every request refused so: if it refuses them all, "
            "put that right and replay the dead-letter file)",
        )
        return reject(what)

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        if not self._key_secret:
            self._credentials()
        now = time.time()
        outcomes: list[Outcome | None] = [None] * len(batch)
        header = self._group_header()
        encoded: list[tuple[int, bytes]] = []
        for index, occ in enumerate(batch):
            try:
                log, why = self._encode(occ, now)
            except Exception as exc:  # bad input must cost one item, never the batch
                log, why = None, f"cannot encode event {occ.key}: {type(exc).__name__}: {exc}"
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
        run = _Send(began, began + self.context.send_budget)
        self._batch = batch
        stop: Outcome | None = None
        try:
            for chunk in self._chunks(encoded, len(header)):
                if stop is not None:
                    for index in chunk.indexes:
                        outcomes[index] = stop
                    continue
                stop = await self._put(run, resource, header, chunk.indexes, chunk.logs, outcomes)
        finally:
            self._batch = ()
        return [outcome if outcome is not None else OK for outcome in outcomes]

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
        """One PutLogs request for ``logs``; their outcomes go into ``outcomes``. Returns what the
        batch's requests not sent yet get when the rest must wait (quota, 5xx, credentials, a missing
        project or logstore, unreachable, the send's budget spent), None to go on."""
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
            stop = retry(reason)
            for index in indexes:
                outcomes[index] = stop
            return stop
        run.slowest = max(run.slowest, time.monotonic() - started)
        status, code = answer.status, answer.code
        if status == 200:
            run.delivered = True
            for index in indexes:
                outcomes[index] = OK
            if self._refused:  # a run of failures is over: the next one is logged again
                self.log.info(
                    "sls sink %s: %s accepts logs again (after %s); requests refused meanwhile: %s",
                    self.context.name,
                    self._where,
                    ", ".join(sorted(self._refused)),
                    ", ".join(f"{c} {n}" for c, n in sorted(self._refused.items())),
                )
                self._refused.clear()
            return None
        if len(logs) > 1 and (
            status == 413 or code in ("PostBodyTooLarge", "PostBodyInvalid", "InvalidTimestamp")
        ):
            # Over a limit below ours (a proxy's; the service's "3 MB" may be 3,000,000 bytes), or one
            # log the service cannot read or whose time it refuses (its clock is not ours): halve, so
            # that only a log refused on its own is dead-lettered.
            mid = len(logs) // 2
            held = await self._put(run, resource, header, indexes[:mid], logs[:mid], outcomes)
            if held is not None:
                for index in indexes[mid:]:
                    outcomes[index] = held
                return held
            return await self._put(run, resource, header, indexes[mid:], logs[mid:], outcomes)
        if code == "InvalidTimestamp" and self.options.clamp_time and not restamped and self._batch:
            # Inside our window, outside the service's: its clock is up to 15 minutes off ours (the
            # Date check allows that). Our "now" is inside its window whatever the difference.
            log = self._encode_at(self._batch[indexes[0]], int(time.time()))
            if log is not None:
                return await self._put(run, resource, header, indexes, [log], outcomes, restamped=True)
        outcome = self._failure(answer, len(indexes))
        for index in indexes:
            outcomes[index] = outcome
        if outcome.kind is OutcomeKind.RETRY:
            return outcome  # quota, 5xx, credentials, a missing target: the same for the rest now
        return None  # this request's logs only (a bad timestamp, an unknown code): the rest go on


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _describe(exc: BaseException) -> str:
    # aiohttp's messages name host and port only, never headers; keep them short.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
