"""An Alibaba Cloud SLS (Log Service) PutLogs endpoint for tests, validating as the service does.

What it checks, in this order, on every request (wire facts: docs sink-protocols.md §5 and the official
``aliyun-log-python-sdk`` 0.9.52 ``auth.py``/``util.py``/``logclient.py``):

- project from the ``Host`` header ``<project>.<endpoint>`` (the first DNS label; project names have no
  dots). A Host that is a bare IP address or has no dot carries no project: the receiver then uses
  ``default_project`` (test mode for clients that address ``http://127.0.0.1:PORT`` without the SDK's
  ``<project>.<ip>`` Host header). Unknown project → 404 ProjectNotExist.
- ``Authorization: LOG <AccessKeyId>:<signature>``; unknown key → 401 Unauthorized.
- ``Date`` (or ``x-log-date``, which the SDK adds after signing for proxies that drop ``Date``): neither
  → 400 MissingDate; not an RFC 822 date → 400 InvalidDateFormat (both from SLS's table of common error
  codes, doc-detail/29013; its later versions name the second InvalidRequestTime); more than ±15 minutes
  from the receiver's clock → 400 RequestTimeExpired.
- ``Content-MD5`` = uppercase hex MD5 of the body as sent (when there is a body).
- the V1 signature: Base64(HMAC-SHA1(secret, VERB\\n Content-MD5\\n Content-Type\\n Date\\n
  <x-log-*/x-acs-* headers sorted, name:value\\n> <path>[?k=v&... sorted, decoded])) → else 401
  SignatureNotMatch. ``x-log-date`` and ``x-log-meta-*`` are not signed: the Python SDK adds ``x-log-date``
  after signing and excludes ``x-log-meta-*`` (so the service must leave them out; inferred from the SDK).
- ``x-acs-security-token`` must match when the key is an STS key (and must be absent otherwise).
- logstore exists → else 404 LogStoreNotExist.
- PutLogs: ``Content-Type: application/x-protobuf`` (→ 400 InvalidContentType), ``x-log-apiversion:
  0.6.0`` (→ 400 MissingAPIVersion / InvalidAPIVersion), ``x-log-bodyrawsize`` (→ 400
  MissingBodyRawSize / InvalidBodyRawSize); ``x-log-compresstype`` absent (raw body), ``lz4`` (raw LZ4
  block, no size prefix), ``deflate`` (zlib) or ``zstd`` (→ 400 InvalidCompressType; these codes are
  the common error table's too); the decompressed length must equal ``x-log-bodyrawsize`` (→ 400
  PostBodyUncompressError); raw size > ``max_raw_body`` (3 MB) → 400 PostBodyTooLarge; protobuf
  ``LogGroup`` decoded field by field (``Log.Time`` required, ``Content.Key``/``Value`` required, wrong
  wire types) → 400 PostBodyInvalid; more than 4096 logs → 400 PostBodyTooLarge; a log time outside
  [now - 7 days, now + 15 min] → 400 InvalidTimestamp.
- ``GET /logstores/<name>`` (GetLogStore) answers 200 with the logstore's JSON, signed like PutLogs.

Every answer carries ``x-log-requestid``; errors are JSON ``{"errorCode": ..., "errorMessage": ...}``.

UNCONFIRMED (not checkable against the service from here): the exact error codes for a wrong
Content-MD5 (InvalidContentMD5 here), the order of the checks, the status of InvalidContentType (400
in the table's later versions, 415 in its first), an unknown AccessKeyId (Unauthorized), too many logs
(PostBodyTooLarge), out-of-range log times (InvalidTimestamp, and whether the service rejects the
request or drops the log); whether the size limit applies to the raw or the compressed body (raw here,
the stricter reading); the service's current body limit (error messages seen from it say 5 MB and 10
MB; the documented 3 MB is enforced here so a client that passes is within every reading).

Fault injection: ``fail_next(n, error_code, status)`` answers the next ``n`` requests with that error
(after reading the body, before any check) — quota errors, 5xx and the like. With ``echo=True`` a
gateway in front of the service answers instead: a text page (no JSON, no ``x-log-requestid``) quoting
the request and the credentials it refused (``Authorization``, ``x-acs-security-token``); with
``page=N`` a front answers with a web page of N bytes (text/html, no ``x-log-requestid``: a proxy's
error page, a misrouted ingress serving a file), streamed, and ``pages`` records how much of it the
client took before it went away (``FrontPage``). ``unreadable_next(n, how)`` sends the next ``n`` answers,
whatever they say (an error of ``fail_next``'s, or the service's own 200 after it stored the logs), with
a body the client cannot read: ``"stall"`` (the head, then none of the body until the receiver closes),
``"cut"`` (the head, then the connection dropped) or ``"gzip"`` (a plain body labelled
``Content-Encoding: gzip``), as a proxy or a slow front in between may; ``late_next(n, after)`` sends
the next ``n`` answers whole, their body ``after`` seconds after their head (``answer_late``).
``delay`` (also settable later) holds every answer that many seconds after the request was handled, as
a far or slow service does: what it stored stays stored when the client gives up waiting (so a client
that cuts a request short and sends it again stores it twice). A project in ``forbidden`` (suspended:
an overdue account, or the project in the recycle bin) is answered 403 ProjectForbidden
``project <name> has been forbidden`` after authentication (the code and text as Alibaba's error
tables give them; the order of checks is UNCONFIRMED).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import ipaddress
import struct
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cramjam
from aiohttp import web

from eventrouter.protowire import WIRE_FIXED32, WIRE_LEN, WIRE_VARINT, DecodeError, decode_fields, read_varint
from eventrouter.testing.receivers.front_page import FrontPage, answer_page
from eventrouter.testing.receivers.unreadable import Unreadable, answer_late, answer_unreadable

__all__ = [
    "AccessKey",
    "ReceivedLog",
    "ReceivedLogGroup",
    "SLSReceiver",
    "SLSRequest",
    "canonical_string",
    "decode_log_group",
    "sign_v1",
]

API_VERSION = "0.6.0"
MAX_RAW_BODY = 3 * 1024 * 1024
MAX_LOGS = 4096
MAX_DATE_SKEW = 15 * 60
LOG_TIME_PAST = 7 * 24 * 3600
LOG_TIME_FUTURE = 15 * 60


@dataclass(frozen=True, slots=True)
class AccessKey:
    id: str
    secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    """Set for an STS key: requests must then carry this ``x-acs-security-token``."""


@dataclass(frozen=True, slots=True)
class ReceivedLog:
    time: int
    time_ns: int | None
    contents: tuple[tuple[str, str], ...]

    @property
    def fields(self) -> dict[str, str]:
        return dict(self.contents)


@dataclass(frozen=True, slots=True)
class ReceivedLogGroup:
    project: str
    logstore: str
    topic: str | None
    source: str | None
    machine_uuid: str | None
    tags: tuple[tuple[str, str], ...]
    logs: tuple[ReceivedLog, ...]
    compress_type: str
    raw_body: bytes
    """The decompressed protobuf, for cross-checks with another decoder."""
    body_size: int
    access_key_id: str
    hash_key: str | None


@dataclass(frozen=True, slots=True)
class SLSRequest:
    """Every request the receiver answered, accepted or not."""

    method: str
    path: str
    project: str | None
    status: int
    error_code: str | None
    headers: Mapping[str, str]


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _is_signed_header(name: str) -> bool:
    lower = name.lower()
    if lower == "x-log-date" or lower.startswith("x-log-meta-"):
        return False
    return lower.startswith(("x-log-", "x-acs-"))


def canonical_string(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
) -> str:
    """The V1 string to sign, from the headers as sent (Date or x-log-date, Content-MD5, Content-Type)."""
    lower = {k.lower(): v for k, v in headers.items()}
    date = lower.get("date") or lower.get("x-log-date", "")
    signed = sorted((k, v.strip()) for k, v in lower.items() if _is_signed_header(k))
    resource = path
    params = sorted(query)
    if params:
        resource += "?" + "&".join(f"{k}={v}" for k, v in params)
    return (
        f"{method}\n{lower.get('content-md5', '')}\n{lower.get('content-type', '')}\n{date}\n"
        + "".join(f"{k}:{v}\n" for k, v in signed)
        + resource
    )


def sign_v1(secret: str, string_to_sign: str) -> str:
    digest = hmac.new(secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _text(value: int | bytes, what: str, part: str = "") -> str:
    if not isinstance(value, bytes):
        raise DecodeError(f"{what}{part} has the wrong wire type")
    # proto2 strings are not checked for UTF-8 by the service's protobuf runtime; keep what we can read.
    return value.decode("utf-8", "replace")


def _decode_pair(data: bytes, what: str) -> tuple[str, str]:
    # The layout every writer produces (Key then Value, each once, both lengths under 128 bytes is
    # the common case) is read directly; anything else goes through the general field walk.
    n = len(data)
    if n >= 4 and data[0] == 0x0A and data[1] < 0x80:
        k_end = 2 + data[1]
        if k_end + 2 <= n and data[k_end] == 0x12:
            length, v_start = read_varint(data, k_end + 1)
            if v_start + length == n:
                return (
                    data[2:k_end].decode("utf-8", "replace"),
                    data[v_start:].decode("utf-8", "replace"),
                )
    key: str | None = None
    value: str | None = None
    for number, _wire, raw in decode_fields(data):
        if number == 1:
            key = _text(raw, what, ".Key")
        elif number == 2:
            value = _text(raw, what, ".Value")
    if key is None or value is None:
        raise DecodeError(f"{what} misses the required Key or Value")
    return key, value


def _decode_log(data: bytes) -> ReceivedLog:
    return _decode_log_plain(data) or _decode_log_fields(data)


def _decode_log_plain(data: bytes) -> ReceivedLog | None:
    """The layout writers produce (Time, then Contents of Key and Value, then optional Time_ns), read
    in one pass without slicing each Content out; None for anything else, which the general walk
    (``_decode_log_fields``) reads or refuses. Both give the same log for this layout."""
    end = len(data)
    if end < 2 or data[0] != 0x08:  # field 1 (Time), varint
        return None
    log_time, pos = read_varint(data, 1)
    contents: list[tuple[str, str]] = []
    while pos < end and data[pos] == 0x12:  # field 2 (Contents), length-delimited
        if pos + 1 >= end or data[pos + 1] >= 0x80:
            length, start = read_varint(data, pos + 1)
        else:
            length, start = data[pos + 1], pos + 2
        stop = start + length
        # Key (field 1) then Value (field 2), nothing else, the Key under 128 bytes.
        if stop > end or length < 4 or data[start] != 0x0A or data[start + 1] >= 0x80:
            return None
        k_end = start + 2 + data[start + 1]
        if k_end + 2 > stop or data[k_end] != 0x12:
            return None
        if data[k_end + 1] < 0x80:
            v_length, v_start = data[k_end + 1], k_end + 2
        else:
            v_length, v_start = read_varint(data, k_end + 1)
        if v_start + v_length != stop:
            return None
        contents.append(
            (
                data[start + 2 : k_end].decode("utf-8", "replace"),
                data[v_start:stop].decode("utf-8", "replace"),
            )
        )
        pos = stop
    time_ns: int | None = None
    if pos + 5 == end and data[pos] == 0x25:  # field 4 (Time_ns), fixed32
        time_ns = struct.unpack_from("<I", data, pos + 1)[0]
        pos = end
    if pos != end:
        return None
    return ReceivedLog(time=log_time & 0xFFFFFFFF, time_ns=time_ns, contents=tuple(contents))


def _decode_log_fields(data: bytes) -> ReceivedLog:
    log_time: int | None = None
    time_ns: int | None = None
    contents: list[tuple[str, str]] = []
    for number, wire, raw in decode_fields(data):
        if number == 1:
            if wire != WIRE_VARINT or not isinstance(raw, int):
                raise DecodeError("Log.Time has the wrong wire type")
            log_time = raw & 0xFFFFFFFF
        elif number == 2:
            if wire != WIRE_LEN or not isinstance(raw, bytes):
                raise DecodeError("Log.Contents has the wrong wire type")
            contents.append(_decode_pair(raw, "Log.Content"))
        elif number == 4:
            if wire != WIRE_FIXED32 or not isinstance(raw, int):
                raise DecodeError("Log.Time_ns must be fixed32")
            time_ns = raw
    if log_time is None:
        raise DecodeError("Log.Time is required")
    return ReceivedLog(time=log_time, time_ns=time_ns, contents=tuple(contents))


def decode_log_group(data: bytes) -> dict[str, Any]:
    """Decode a LogGroup (log_logs.proto). Raises DecodeError on anything the service would refuse."""
    logs: list[ReceivedLog] = []
    tags: list[tuple[str, str]] = []
    out: dict[str, Any] = {"topic": None, "source": None, "machine_uuid": None}
    for number, wire, raw in decode_fields(data):
        if number in (1, 2, 3, 4, 5, 6) and (wire != WIRE_LEN or not isinstance(raw, bytes)):
            raise DecodeError(f"LogGroup field {number} has the wrong wire type")
        if number == 1 and isinstance(raw, bytes):
            logs.append(_decode_log(raw))
        elif number == 3:
            out["topic"] = _text(raw, "LogGroup.Topic")
        elif number == 4:
            out["source"] = _text(raw, "LogGroup.Source")
        elif number == 5:
            out["machine_uuid"] = _text(raw, "LogGroup.MachineUUID")
        elif number == 6 and isinstance(raw, bytes):
            tags.append(_decode_pair(raw, "LogTag"))
    out["logs"] = tuple(logs)
    out["tags"] = tuple(tags)
    return out


def _echo(request: web.Request) -> str:
    quoted = ("Authorization", "x-acs-security-token")
    sent = "; ".join(f"{name}: {request.headers[name]}" for name in quoted if name in request.headers)
    return f"refused {request.method} {request.path_qs} with {sent}"


def _project_from_host(host: str, default: str | None) -> str | None:
    if host.startswith("["):  # [v6]:port
        return default
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        ipaddress.ip_address(name)
        return default
    except ValueError:
        pass
    if "." not in name:
        return default
    return name.split(".", 1)[0]


class SLSReceiver:
    """``async with SLSReceiver(projects={"p": ["k8s-event"]}, keys=[AccessKey("id", "secret")]) as r:``
    then point a client at ``r.url`` (Host ``p.127.0.0.1``, as the SDK sends for an IP endpoint)."""

    def __init__(
        self,
        *,
        projects: Mapping[str, Iterable[str]],
        keys: Iterable[AccessKey],
        default_project: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_raw_body: int = MAX_RAW_BODY,
        max_logs: int = MAX_LOGS,
        clock_offset: float = 0.0,
        delay: float = 0.0,
    ) -> None:
        self.projects: dict[str, set[str]] = {p: set(stores) for p, stores in projects.items()}
        self.keys: dict[str, AccessKey] = {k.id: k for k in keys}
        self.default_project = default_project
        self.host = host
        self.port = port
        self.max_raw_body = max_raw_body
        self.max_logs = max_logs
        self.clock_offset = clock_offset
        """Seconds added to the receiver's clock: simulates a client with a skewed clock."""
        self.delay = delay
        """Seconds every answer waits after its request was handled (stored or refused)."""
        self.forbidden: set[str] = set()
        """Suspended projects: every request to them is answered 403 ProjectForbidden."""
        self.groups: list[ReceivedLogGroup] = []
        self.requests: list[SLSRequest] = []
        self._faults: list[tuple[int, str, str, float | None, bool, int] | None] = []
        self.pages: list[FrontPage] = []
        """The front pages answered (``fail_next(page=…)``), in order."""
        self._unreadable: list[Unreadable] = []
        self._late: list[float] = []
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def now(self) -> float:
        return time.time() + self.clock_offset

    def logs(self, project: str | None = None, logstore: str | None = None) -> list[ReceivedLog]:
        return [
            log
            for group in self.groups
            if (project is None or group.project == project)
            and (logstore is None or group.logstore == logstore)
            for log in group.logs
        ]

    def fail_next(
        self,
        n: int,
        error_code: str,
        status: int,
        message: str = "",
        *,
        retry_after: float | None = None,
        after: int = 0,
        echo: bool = False,
        page: int = 0,
    ) -> None:
        """Answer ``n`` requests with this error (quota, 5xx, ...), after letting ``after`` through;
        with ``echo``, as a gateway that quotes the credentials it refused; with ``page``, as a front
        answering ``status`` with a web page of that many bytes (see the module's doc)."""
        self._faults.extend([None] * after)
        fault = (status, error_code, message or f"injected {error_code}", retry_after, echo, page)
        self._faults.extend([fault] * n)

    def unreadable_next(self, n: int, how: Unreadable) -> None:
        """The next ``n`` answers, whatever they say, sent with a body the client cannot read."""
        self._unreadable.extend([how] * n)

    def late_next(self, n: int, after: float) -> None:
        """The next ``n`` answers, whatever they say, sent with their body ``after`` seconds after
        their head (``answer_late``: a slow proxy or front flushing the head first)."""
        self._late.extend([after] * n)

    async def wait_for_logs(self, count: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.logs()) >= count)

    async def __aenter__(self) -> SLSReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None)
        assert sockets
        self.port = sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # a stalled answer ends: its connection is dropped
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- request handling -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await self._answer(request)
        if self.delay > 0:  # handled (stored) already: a client that stops waiting does not undo it
            await asyncio.sleep(self.delay)
        if self._unreadable and isinstance(response, web.Response) and not response.prepared:
            return await answer_unreadable(request, response, self._unreadable.pop(0), self._release)
        if self._late and isinstance(response, web.Response) and not response.prepared:
            return await answer_late(request, response, self._late.pop(0))
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        request_id = uuid.uuid4().hex[:24].upper()
        body = await request.read()
        project: str | None = None
        try:
            fault = self._faults.pop(0) if self._faults else None
            if fault is not None:
                status, code, message, retry_after, echo, page = fault
                headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
                if page:
                    self._record(request, None, status, code)
                    self.pages.append(FrontPage(status, page))
                    return await answer_page(request, self.pages[-1], headers)
                if echo:
                    self._record(request, None, status, code)
                    return web.Response(status=status, text=_echo(request), headers=headers)
                return self._error(request, request_id, None, status, code, message, headers)
            project = _project_from_host(request.headers.get("Host", ""), self.default_project)
            response = await self._dispatch(request, body, project, request_id)
        except _Reject as exc:
            return self._error(request, request_id, project, exc.status, exc.code, exc.message)
        except Exception as exc:  # a receiver bug must show as a 500, like the service's own failures
            return self._error(request, request_id, project, 500, "InternalServerError", repr(exc))
        self._record(request, project, response.status, None)
        return response

    def _record(self, request: web.Request, project: str | None, status: int, code: str | None) -> None:
        self.requests.append(
            SLSRequest(request.method, request.path, project, status, code, dict(request.headers))
        )

    def _error(
        self,
        request: web.Request,
        request_id: str,
        project: str | None,
        status: int,
        code: str,
        message: str,
        extra: Mapping[str, str] | None = None,
    ) -> web.Response:
        self._record(request, project, status, code)
        return web.json_response(
            {"errorCode": code, "errorMessage": message},
            status=status,
            headers={"x-log-requestid": request_id, **(extra or {})},
        )

    async def _dispatch(
        self, request: web.Request, body: bytes, project: str | None, request_id: str
    ) -> web.Response:
        parts = request.path.strip("/").split("/")
        if len(parts) < 2 or parts[0] != "logstores":
            raise _Reject(404, "RequestPathNotExist", f"request path {request.path} does not exist")
        if project is None or project not in self.projects:
            raise _Reject(404, "ProjectNotExist", f"The Project does not exist : {project}")
        self._authenticate(request, body)
        if project in self.forbidden:
            raise _Reject(403, "ProjectForbidden", f"project {project} has been forbidden")
        logstore = parts[1]
        if logstore not in self.projects[project]:
            raise _Reject(404, "LogStoreNotExist", f"logstore {logstore} does not exist")
        headers = {"x-log-requestid": request_id}
        if request.method == "GET" and len(parts) == 2:
            return web.json_response(
                {
                    "logstoreName": logstore,
                    "ttl": 30,
                    "shardCount": 2,
                    "enable_tracking": False,
                    "autoSplit": True,
                    "maxSplitShard": 64,
                    "appendMeta": True,
                    "mode": "standard",
                    "telemetryType": "",
                    "createTime": 1700000000,
                    "lastModifyTime": 1700000000,
                },
                headers=headers,
            )
        if (
            request.method == "POST"
            and len(parts) == 4
            and parts[2] == "shards"
            and parts[3] in ("lb", "route")
        ):
            hash_key = request.query.get("key") if parts[3] == "route" else None
            if parts[3] == "route" and not hash_key:
                raise _Reject(400, "ParameterInvalid", "key is required for /shards/route")
            await self._put_logs(request, body, project, logstore, hash_key)
            return web.Response(status=200, headers=headers)
        raise _Reject(404, "RequestPathNotExist", f"{request.method} {request.path} is not supported")

    def _authenticate(self, request: web.Request, body: bytes) -> None:
        auth = request.headers.get("Authorization", "")
        scheme, _, credential = auth.partition(" ")
        key_id, sep, signature = credential.rpartition(":")
        if scheme != "LOG" or not sep or not key_id or not signature:
            raise _Reject(401, "Unauthorized", "the Authorization header is missing or malformed")
        key = self.keys.get(key_id)
        if key is None:
            raise _Reject(401, "Unauthorized", f"AccessKeyId not found: {key_id}")
        date_text = request.headers.get("Date") or request.headers.get("x-log-date")
        if not date_text:
            raise _Reject(400, "MissingDate", "Date does not exist in http header.")
        try:
            sent = email.utils.parsedate_to_datetime(date_text).timestamp()
        except (TypeError, ValueError):
            raise _Reject(400, "InvalidDateFormat", f"Date {date_text} must follow RFC822.") from None
        if abs(self.now() - sent) > MAX_DATE_SKEW:
            raise _Reject(
                400,
                "RequestTimeExpired",
                f"Request time {date_text} has been expired while server time is "
                f"{email.utils.formatdate(self.now(), usegmt=True)}",
            )
        if body:
            expected_md5 = hashlib.md5(body).hexdigest().upper()
            if request.headers.get("Content-MD5") != expected_md5:
                raise _Reject(400, "InvalidContentMD5", "Content-MD5 does not match the body")
        text = canonical_string(request.method, request.path, request.query.items(), request.headers)
        if not hmac.compare_digest(sign_v1(key.secret, text), signature):
            raise _Reject(401, "SignatureNotMatch", f"signature {signature} not match")
        token = request.headers.get("x-acs-security-token")
        if key.security_token is not None and token != key.security_token:
            raise _Reject(401, "Unauthorized", "the security token is missing or invalid")
        if key.security_token is None and token is not None:
            raise _Reject(401, "Unauthorized", "the security token is invalid")

    async def _put_logs(
        self, request: web.Request, body: bytes, project: str, logstore: str, hash_key: str | None
    ) -> None:
        content_type = request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip() != "application/x-protobuf":
            raise _Reject(
                400, "InvalidContentType", f"content type {content_type!r} is not application/x-protobuf"
            )
        api_version = request.headers.get("x-log-apiversion")
        if api_version is None:
            raise _Reject(400, "MissingAPIVersion", "x-log-apiversion does not exist in http header.")
        if api_version != API_VERSION:
            raise _Reject(400, "InvalidAPIVersion", f"x-log-apiversion {api_version} is unsupported.")
        raw_size_text = request.headers.get("x-log-bodyrawsize")
        if raw_size_text is None:
            raise _Reject(
                400, "MissingBodyRawSize", "x-log-bodyrawsize does not exist in header when it is necessary."
            )
        if not raw_size_text.isdigit():
            raise _Reject(400, "InvalidBodyRawSize", "x-log-bodyrawsize is invalid.")
        raw_size = int(raw_size_text)
        if raw_size > self.max_raw_body:
            raise _Reject(
                400, "PostBodyTooLarge", f"body size {raw_size} must little than {self.max_raw_body}"
            )
        compress_type = request.headers.get("x-log-compresstype", "").lower()
        try:
            if compress_type == "":
                raw = body
            elif compress_type == "lz4":
                raw = bytes(cramjam.lz4.decompress_block(body, output_len=raw_size)) if raw_size else b""
            elif compress_type == "deflate":
                raw = zlib.decompress(body)
            elif compress_type == "zstd":
                raw = bytes(cramjam.zstd.decompress(body))
            else:
                raise _Reject(
                    400, "InvalidCompressType", f"x-log-compresstype {compress_type} is unsupported."
                )
        except _Reject:
            raise
        except Exception as exc:
            raise _Reject(400, "PostBodyUncompressError", f"cannot decompress the body: {exc}") from None
        if len(raw) != raw_size:
            raise _Reject(
                400,
                "PostBodyUncompressError",
                f"uncompressed size {len(raw)} does not match x-log-bodyrawsize {raw_size}",
            )
        try:
            decoded = decode_log_group(raw)
        except DecodeError as exc:
            raise _Reject(400, "PostBodyInvalid", f"invalid LogGroup: {exc}") from None
        logs: tuple[ReceivedLog, ...] = decoded["logs"]
        if len(logs) > self.max_logs:
            raise _Reject(400, "PostBodyTooLarge", f"logs count {len(logs)} must be at most {self.max_logs}")
        now = self.now()
        for log in logs:
            if not now - LOG_TIME_PAST <= log.time <= now + LOG_TIME_FUTURE:
                raise _Reject(
                    400,
                    "InvalidTimestamp",
                    f"log time {log.time} is outside [now - 7 days, now + 15 minutes]",
                )
        auth = request.headers["Authorization"]
        self.groups.append(
            ReceivedLogGroup(
                project=project,
                logstore=logstore,
                topic=decoded["topic"],
                source=decoded["source"],
                machine_uuid=decoded["machine_uuid"],
                tags=decoded["tags"],
                logs=logs,
                compress_type=compress_type,
                raw_body=raw,
                body_size=len(body),
                access_key_id=auth.partition(" ")[2].rpartition(":")[0],
                hash_key=hash_key,
            )
        )
        async with self._changed:
            self._changed.notify_all()
