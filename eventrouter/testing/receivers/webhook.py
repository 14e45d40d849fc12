"""A recording HTTP webhook endpoint for tests, verifying signatures as receivers do.

    async with WebhookReceiver(secret="It's a Secret to Everybody") as hook:
        ... send to hook.url ...
        await hook.wait_for(3)
        hook.requests[0].json()

What it checks on every request (a strict but ordinary webhook consumer):

- method POST or PUT (anything else → 405; ``HEAD``/``OPTIONS`` answer ``head_status``, 405 by default,
  like the many hooks that only accept POST, with ``head_headers``: a redirect's ``Location``);
- a body it can read (a ``Content-Encoding`` it can undo, whole chunks) → else 400, recorded with an
  empty body;
- the body is valid JSON (UTF-8) with a ``Content-Type`` of ``application/json`` → else 400 / 415;
- when built with a ``secret``:
  - ``signature="github"``: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``
    (GitHub's documented verification, constant-time compare) → else 401;
  - ``signature="standard"`` (standardwebhooks.com spec): ``webhook-id``, ``webhook-timestamp`` within
    ``tolerance`` seconds of now, and ``webhook-signature`` a space-separated list of ``v1,<base64>``
    of which one must equal HMAC-SHA256(base64-decoded ``whsec_`` key, ``"{id}.{timestamp}.{body}"``)
    → else 401.

Every request is recorded (method, path, query, headers, raw body, answer status, signature check).

Fault injection: ``fail_next(n, status, retry_after=..., body=..., echo=True, headers=...)`` answers
the next ``n`` requests with that status and headers (a redirect's ``Location``), after recording,
before checks; ``echo`` appends what the request carried (method, path and query, headers but the
plain HTTP ones), as API gateways do that quote the credential they refused; ``body_fault`` sends the
status line and headers, a body promised (``Content-Length``) but none of it: then ``"stall"`` waits
until the receiver closes (a proxy or a slow app that flushed the status first), ``"cut"`` drops the
connection (a front that closes after the head); ``"bad-chunk"`` sends the head (``Transfer-Encoding:
chunked``) and, in the same write, ``body`` as the first chunk-size line, which no HTTP parser takes
(a gateway's page not in the encoding it declares), ``"bad-chunk-later"`` the same line only once
``release_bodies()`` is called (the client has read the head meanwhile), each then stalled until the
receiver closes; ``body_after=s`` sends the whole answer, its body ``s`` seconds after its head, on a
connection kept alive (a proxy or app that flushes the head first); ``hang_next(n)`` never
answers the next ``n`` requests (until the receiver closes) — the client must time out. ``fail_matching(predicate, status)``
answers ``status`` to every request whose raw body ``predicate`` accepts, until ``fail_matching(None)``
(a receiver with a bug for some payloads; ``lambda body: True``: one that is down). ``delay`` (also
settable later) answers each request that many seconds after it arrived, as a receiver far away or
slow does. ``ssl_context`` serves HTTPS. ``max_body_bytes`` is the largest body taken (aiohttp answers
413 beyond it at once, as a proxy with a body limit does; the request is recorded without its body).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict

from eventrouter.testing.receivers.unreadable import answer_late

__all__ = ["BodyFault", "RecordedRequest", "WebhookReceiver", "github_signature", "standard_signature"]


def github_signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def standard_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def standard_signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes
    status: int | None = None
    """What the receiver answered (None: hung, never answered)."""
    signature_ok: bool | None = None
    """None when the receiver has no secret."""
    arrived: float = field(default_factory=time.time)

    def json(self) -> Any:
        return orjson.loads(self.body)


BodyFault = Literal["stall", "cut", "bad-chunk", "bad-chunk-later"]
"""How ``fail_next`` answers without a readable body (the module's docstring says each)."""

_BODY_FAULT = web.ResponseKey("body_fault", str)
"""The key, in a response's own storage, of how ``_handle`` answers it without its body."""
_BODY_AFTER = web.ResponseKey("body_after", float)
"""The key, in a response's own storage, of the seconds ``_handle`` sends its body after its head."""


@dataclass
class _Fault:
    status: int | None  # None: hang
    retry_after: str | None = None
    body: bytes = b""
    echo: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    body_fault: BodyFault | None = None
    body_after: float | None = None


class WebhookReceiver:
    def __init__(
        self,
        *,
        secret: str | None = None,
        signature: Literal["github", "standard"] = "github",
        tolerance: float = 300.0,
        ok_status: int = 200,
        head_status: int = 405,
        head_headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/hook",
        ssl_context: ssl.SSLContext | None = None,
        max_body_bytes: int = 64 * 1024 * 1024,
        delay: float = 0.0,
    ) -> None:
        self.secret = secret
        self.delay = delay
        self.max_body_bytes = max_body_bytes
        self.signature = signature
        self.tolerance = tolerance
        self.ok_status = ok_status
        self.head_status = head_status
        self.head_headers = dict(head_headers or {})
        self.host = host
        self.port = port
        self.path = path
        self.ssl_context = ssl_context
        self.requests: list[RecordedRequest] = []
        self._faults: deque[_Fault] = deque()
        self._matching: tuple[Callable[[bytes], bool], _Fault] | None = None
        self._release = asyncio.Event()
        self._bodies = asyncio.Event()  # set: ``bad-chunk-later`` bodies go out
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}{self.path}"

    @property
    def accepted(self) -> list[RecordedRequest]:
        """Requests answered with 2xx."""
        return [r for r in self.requests if r.status is not None and 200 <= r.status < 300]

    def fail_next(
        self,
        n: int,
        status: int,
        *,
        retry_after: str | None = None,
        body: bytes = b"",
        echo: bool = False,
        headers: dict[str, str] | None = None,
        body_fault: BodyFault | None = None,
        body_after: float | None = None,
    ) -> None:
        fault = _Fault(status, retry_after, body, echo, dict(headers or {}), body_fault, body_after)
        self._faults.extend(fault for _ in range(n))

    def fail_matching(
        self,
        predicate: Callable[[bytes], bool] | None,
        status: int = 500,
        *,
        retry_after: str | None = None,
        body: bytes = b"internal error",
    ) -> None:
        """Answer ``status`` to every request whose body ``predicate`` accepts (after ``fail_next``
        faults, before any check); None ends it."""
        self._matching = None if predicate is None else (predicate, _Fault(status, retry_after, body))

    def release_bodies(self) -> None:
        """Send the bodies ``body_fault="bad-chunk-later"`` holds back (and any such later at once)."""
        self._bodies.set()

    def hang_next(self, n: int = 1) -> None:
        self._faults.extend(_Fault(None) for _ in range(n))

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        """Until at least ``count`` requests arrived (answered or hanging), at most ``within`` s."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # let hanging handlers finish so shutdown does not wait for them
        self._bodies.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # aiohttp's own 413, as a proxy with a body limit answers
            await self._unread(request, 413)
            raise
        except web.RequestPayloadError as exc:
            # A Content-Encoding it cannot undo, a bad chunk: ordinary servers answer 400. Left to
            # aiohttp it was a 500 (a sink retries that for ever) and the request went unrecorded.
            await self._unread(request, 400)
            return web.Response(status=400, text=f"cannot read body: {' '.join(str(exc).split())}")
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=CIMultiDict(request.headers),
            body=body,
        )
        self.requests.append(rec)
        await self._notify()
        response = await self._answer(request, rec)
        rec.status = response.status
        await self._notify()
        how = response.get(_BODY_FAULT)
        if how is not None:
            return await self._no_body(request, response, how)
        after = response.get(_BODY_AFTER)
        if after is not None:
            return await answer_late(request, response, after)
        return response

    async def _unread(self, request: web.Request, status: int) -> None:
        """A request whose body was not read, recorded with an empty body and the status answered."""
        headers = CIMultiDict(request.headers)
        self.requests.append(
            RecordedRequest(request.method, request.path, request.query_string, headers, b"", status)
        )
        await self._notify()

    async def _answer(self, request: web.Request, rec: RecordedRequest) -> web.Response:
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if request.method in ("HEAD", "OPTIONS"):
            return web.Response(status=self.head_status, headers=self.head_headers)
        fault = self._faults.popleft() if self._faults else None
        if fault is None and self._matching is not None and self._matching[0](rec.body):
            fault = self._matching[1]
        if fault is not None:
            if fault.status is None:
                await self._release.wait()
                return web.Response(status=503)
            headers = dict(fault.headers)  # a redirect's Location, ...
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            body = fault.body
            if fault.echo:
                plain = {"host", "accept", "accept-encoding", "content-type", "content-length"}
                sent = "; ".join(f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in plain)
                body += f" refused {request.method} {request.path_qs} with {sent}".encode()
            response = web.Response(status=fault.status, body=body, headers=headers)
            if fault.body_fault is not None:
                response[_BODY_FAULT] = fault.body_fault  # for ``_handle``
            if fault.body_after is not None:
                response[_BODY_AFTER] = fault.body_after  # for ``_handle``
            return response
        if request.method not in ("POST", "PUT"):
            return web.Response(status=405, text="method not allowed")
        if self.secret is not None:
            rec.signature_ok = self._verify(rec)
            if not rec.signature_ok:
                return web.Response(status=401, text="invalid signature")
        if request.content_type != "application/json":
            return web.Response(status=415, text=f"unsupported content type {request.content_type}")
        try:
            orjson.loads(rec.body)
        except orjson.JSONDecodeError as exc:
            return web.Response(status=400, text=f"invalid JSON: {exc}")
        return web.Response(status=self.ok_status)

    async def _no_body(self, request: web.Request, answer: web.Response, how: str) -> web.StreamResponse:
        """The status line and headers of ``answer``, then none of its body that a client can read:
        its length promised (at least one byte) and stalled until the receiver closes (``stall``) or
        the connection dropped (``cut``); or chunked, ``answer``'s body sent raw as the first
        chunk-size line, with the head (``bad-chunk``) or once released (``bad-chunk-later``)."""
        size = len(answer.body) if isinstance(answer.body, bytes) else 0
        chunked = how.startswith("bad-chunk")
        headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-length"}
        if not chunked:
            headers["Content-Length"] = str(max(size, 1))
        response = web.StreamResponse(status=answer.status, headers=headers)
        if chunked:
            response.enable_chunked_encoding()
        await response.prepare(request)  # a StreamResponse sends its head at once
        if chunked:
            if how == "bad-chunk-later":
                await self._bodies.wait()
            line = (answer.body if isinstance(answer.body, bytes) else b"") + b"\r\n"
            if request.transport is not None:  # no await since the head: the same read takes both
                request.transport.write(line)
        if how != "cut":
            await self._release.wait()
        if request.transport is not None:
            request.transport.abort()
        return response

    def _verify(self, rec: RecordedRequest) -> bool:
        assert self.secret is not None
        if self.signature == "github":
            got = rec.headers.get("X-Hub-Signature-256", "")
            return hmac.compare_digest(got, github_signature(self.secret.encode(), rec.body))
        msg_id = rec.headers.get("webhook-id", "")
        ts = rec.headers.get("webhook-timestamp", "")
        if not msg_id or not ts.isdigit() or abs(time.time() - int(ts)) > self.tolerance:
            return False
        expected = standard_signature(standard_key(self.secret), msg_id, ts, rec.body)
        candidates = rec.headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(candidate, expected) for candidate in candidates)
