"""A DingTalk custom-robot endpoint for tests that checks what the real service checks.

    async with DingTalkReceiver(secret="SEC...", keywords=["k8s"]) as robot:
        ... POST to robot.url (…/robot/send?access_token=…) ...
        robot.accepted[0].payload

Like oapi.dingtalk.com it answers HTTP 200 with ``{"errcode": .., "errmsg": ..}`` for everything it
understands, in this order:

- ``access_token`` unknown or missing → 300001 ``token is not exist``;
- IP allowlist (``ip_allowlist``) → 310000 ``ip X not in whitelist``;
- signing (``secret``): ``timestamp`` (epoch ms) within 1 hour of the receiver's time and
  ``sign`` = URL-encoded Base64 HMAC-SHA256 of ``"{timestamp}\\n{secret}"`` → 310000 ``invalid
  timestamp`` / ``sign not match``;
- body larger than 20,000 bytes → 460101 ``message too long, exceed 20000 bytes``;
- not a JSON object, unknown ``msgtype`` or a field of the wrong type/missing → 40035;
- keyword security (``keywords``): one keyword in the content (text ``content``; markdown and
  actionCard ``title`` + ``text``) → 310000 ``keywords not in content``;
- ``at`` (mentions) is read with text and markdown only, as DingTalk documents: another msgtype's
  is ignored, and ``mentions`` reports nobody for it;
- rate: 20 accepted messages per rolling minute per robot (``rate_per_minute``); the next one answers
  130101 ``send too fast`` and the robot stays throttled for ``throttle_seconds`` (600, as the service
  does) — every message in that time answers 130101.

Accepted messages are kept in ``accepted`` (payload, mentions, receive time); every request with its
answer in ``requests``. Fault injection: ``fail_next(n, errcode=, errmsg=)`` answers the next ``n``
requests with that errcode; ``fail_next(n, status=502)`` with an HTTP status; ``fail_next(n,
body=b"<html>")`` with a raw body; ``fail_next(n, status=302, location=url)`` with a redirect (a
front that moved), ``fail_next(n, status=429, headers={"Retry-After": "120"})`` with a gateway's
headers; ``unreadable_next(n, how)`` sends the next ``n`` answers, whatever they say (a fault's, or
the robot's own after it accepted the message), with a body the client cannot read: ``"stall"`` (the
head, then none of the body until the receiver closes), ``"cut"`` (the head, then the connection
dropped) or ``"gzip"`` (a plain body labelled ``Content-Encoding: gzip``), as a gateway or proxy in
front of the robot may (``answer_unreadable``); ``late_next(n, after)`` sends the next ``n`` answers
whole, their body ``after`` seconds after their head (``answer_late``). ``clock`` (monotonic seconds) drives the rate limit, ``wall`` (epoch seconds) the
timestamp check; tests may share a simulated clock with the sink. ``chunk_bytes=n`` writes every
answer's body n bytes at a time, each piece reaching the client on its own (chunked transfer, as a
gateway or proxy in front of the robot answers): a client must read the body to its end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import orjson
from aiohttp import web

from eventrouter.testing.receivers.chunked import ChunkedAnswers
from eventrouter.testing.receivers.unreadable import Unreadable, answer_late, answer_unreadable

__all__ = ["DingTalkMessage", "DingTalkReceiver", "DingTalkRequest"]

MAX_BODY = 20_000
MENTIONING = ("text", "markdown")
"""The msgtypes whose ``at`` DingTalk applies; it ignores that of the others."""


@dataclass
class DingTalkMessage:
    """An accepted message."""

    payload: dict[str, Any]
    at: float
    """Receiver clock time it was accepted."""

    @property
    def msgtype(self) -> str:
        return str(self.payload["msgtype"])

    @property
    def text(self) -> str:
        """The visible content: text ``content``, or markdown / actionCard ``text``."""
        p = self.payload
        if p["msgtype"] == "text":
            return str(p["text"]["content"])
        if p["msgtype"] == "markdown":
            return str(p["markdown"]["text"])
        if p["msgtype"] == "actionCard":
            return str(p["actionCard"]["text"])
        return ""

    @property
    def title(self) -> str:
        p = self.payload
        for key in ("markdown", "actionCard", "link"):
            if key in p:
                return str(p[key].get("title", ""))
        return ""

    @property
    def mentions(self) -> dict[str, Any]:
        """Who the message notifies: DingTalk reads ``at`` with text and markdown only (another
        msgtype's ``at`` notifies nobody, so it is not reported)."""
        at = (self.payload.get("at") or {}) if self.msgtype in MENTIONING else {}
        return {
            "mobiles": list(at.get("atMobiles") or []),
            "user_ids": list(at.get("atUserIds") or []),
            "all": bool(at.get("isAtAll")),
        }


@dataclass
class DingTalkRequest:
    query: dict[str, str]
    body: bytes
    errcode: int | None = None
    errmsg: str = ""
    status: int = 200


@dataclass
class _Fault:
    status: int = 200
    errcode: int | None = None
    errmsg: str = ""
    body: bytes | None = None
    location: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Robot:
    sent: deque[float] = field(default_factory=deque)
    throttled_until: float = 0.0


class DingTalkReceiver(ChunkedAnswers):
    def __init__(
        self,
        *,
        access_token: str = "robot-token",
        secret: str | None = None,
        keywords: Sequence[str] = (),
        ip_allowlist: Sequence[str] | None = None,
        rate_per_minute: int = 20,
        throttle_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        delay: float = 0.0,
        chunk_bytes: int = 0,
    ) -> None:
        self.access_token = access_token
        self.delay = delay
        """Seconds each answer takes (a robot slow to answer; real time)."""
        self.chunk_bytes = chunk_bytes
        """Answers written this many bytes at a time (0: whole), as a gateway in front may."""
        self.secret = secret
        self.keywords = list(keywords)
        self.ip_allowlist = list(ip_allowlist) if ip_allowlist is not None else None
        self.rate_per_minute = rate_per_minute
        self.throttle_seconds = throttle_seconds
        self.clock = clock
        self.wall = wall
        super().__init__()
        self.host = host
        self.accepted: list[DingTalkMessage] = []
        self.requests: list[DingTalkRequest] = []
        self._robot = _Robot()
        self._faults: deque[_Fault] = deque()
        self._unreadable: deque[Unreadable] = deque()
        self._late: deque[float] = deque()
        self._release = asyncio.Event()
        self._changed = asyncio.Condition()

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # a stalled answer ends: its connection is dropped
        await super().__aexit__(*exc)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/robot/send"

    @property
    def url(self) -> str:
        """The webhook URL as the DingTalk console shows it (with the access_token)."""
        return f"{self.base_url}?access_token={self.access_token}"

    def errcodes(self) -> list[int | None]:
        return [r.errcode for r in self.requests]

    def fail_next(
        self,
        n: int = 1,
        *,
        errcode: int | None = None,
        errmsg: str = "",
        status: int = 200,
        body: bytes | None = None,
        location: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        fault = _Fault(status, errcode, errmsg, body, location, dict(headers or {}))
        self._faults.extend(fault for _ in range(n))

    def unreadable_next(self, n: int, how: Unreadable) -> None:
        """The next ``n`` answers, whatever they say, sent with a body the client cannot read."""
        self._unreadable.extend([how] * n)

    def late_next(self, n: int, after: float) -> None:
        """The next ``n`` answers, whatever they say, sent with their body ``after`` seconds after
        their head (``answer_late``: a slow proxy or API flushing the head first)."""
        self._late.extend([after] * n)

    async def wait_for(self, count: int, within: float = 10.0) -> None:
        """Until at least ``count`` messages were accepted."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.accepted) >= count)

    # ------------------------------------------------------------------ handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        answer = await self._answer(request)
        if self._unreadable:
            return await answer_unreadable(request, answer, self._unreadable.popleft(), self._release)
        if self._late:
            return await answer_late(request, answer, self._late.popleft())
        return answer

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        rec = DingTalkRequest(dict(request.query), body)
        self.requests.append(rec)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._faults:
            fault = self._faults.popleft()
            rec.status = fault.status
            answer = self._fault(rec, fault)
            answer.headers.update(fault.headers)
            return answer
        if request.method != "POST":
            return web.Response(status=405)
        code, msg, payload = self._check(request, rec)
        if code == 0:
            assert payload is not None
            self.accepted.append(DingTalkMessage(payload, self.clock()))
        response = self._reply(rec, code, msg)
        async with self._changed:
            self._changed.notify_all()
        return response

    def _fault(self, rec: DingTalkRequest, fault: _Fault) -> web.Response:
        if fault.body is not None:
            return web.Response(status=fault.status, body=fault.body, content_type="text/html")
        if fault.location is not None:  # a front that moved: the robot itself never sees it
            return web.Response(status=fault.status, headers={"Location": fault.location})
        if fault.errcode is None:
            return web.Response(status=fault.status, text="fault")
        return self._reply(rec, fault.errcode, fault.errmsg or "injected")

    def _reply(self, rec: DingTalkRequest, code: int, msg: str) -> web.Response:
        rec.errcode, rec.errmsg = code, msg
        return web.json_response({"errcode": code, "errmsg": msg})

    def _check(self, request: web.Request, rec: DingTalkRequest) -> tuple[int, str, dict[str, Any] | None]:
        if rec.query.get("access_token") != self.access_token:
            return 300001, "token is not exist", None
        if self.ip_allowlist is not None:
            peer = request.remote or ""
            if peer not in self.ip_allowlist:
                return 310000, f"ip {peer} not in whitelist", None
        if self.secret is not None:
            problem = self._check_sign(request.query_string)
            if problem:
                return 310000, problem, None
        if len(rec.body) > MAX_BODY:
            return 460101, f"message too long, exceed {MAX_BODY} bytes", None
        if request.content_type != "application/json":
            return 43004, "无效的HTTP HEADER Content-Type", None
        try:
            payload = orjson.loads(rec.body)
        except orjson.JSONDecodeError:
            return 40035, "缺少参数 json", None
        problem = _schema(payload)
        if problem:
            return 40035, f"缺少参数 json: {problem}", None
        if self.keywords:
            content = _content(payload)
            if not any(k in content for k in self.keywords):
                return 310000, "keywords not in content", None
        now = self.clock()
        robot = self._robot
        if now < robot.throttled_until:
            return 130101, "send too fast, exceed 20 times per minute", None
        while robot.sent and robot.sent[0] <= now - 60.0:
            robot.sent.popleft()
        if len(robot.sent) >= self.rate_per_minute:
            robot.throttled_until = now + self.throttle_seconds
            return 130101, "send too fast, exceed 20 times per minute", None
        robot.sent.append(now)
        return 0, "ok", payload

    def _check_sign(self, query_string: str) -> str:
        assert self.secret is not None
        # Read the raw query: a '+' in the Base64 sign must arrive URL-encoded (%2B) as the service needs.
        raw = dict(part.split("=", 1) for part in query_string.split("&") if "=" in part)
        ts = raw.get("timestamp", "")
        if not ts.isdigit() or abs(self.wall() * 1000 - int(ts)) > 3600 * 1000:
            return "invalid timestamp"
        expected = base64.b64encode(
            hmac.new(self.secret.encode(), f"{ts}\n{self.secret}".encode(), hashlib.sha256).digest()
        ).decode()
        if not hmac.compare_digest(unquote_plus(raw.get("sign", "")), expected):
            return "sign not match"
        return ""


def _content(payload: dict[str, Any]) -> str:
    t = payload["msgtype"]
    if t == "text":
        return str(payload["text"]["content"])
    if t in ("markdown", "actionCard", "link"):
        part = payload[t]
        return f"{part.get('title', '')}\n{part.get('text', '')}"
    if t == "feedCard":
        return "\n".join(str(link.get("title", "")) for link in payload["feedCard"]["links"])
    return ""


def _str(obj: Any, key: str, required: bool = True) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        return f"{key} must be a non-empty string"
    return ""


def _schema(payload: Any) -> str:
    """What the service requires per msgtype; '' when valid."""
    if not isinstance(payload, dict):
        return "body must be a JSON object"
    t = payload.get("msgtype")
    part = payload.get(t) if isinstance(t, str) else None
    if t not in ("text", "markdown", "actionCard", "link", "feedCard"):
        return f"unknown msgtype {t!r}"
    if not isinstance(part, dict):
        return f"{t} must be an object"
    problems: list[str] = []
    if t == "text":
        problems.append(_str(part, "content"))
    elif t == "markdown":
        problems += [_str(part, "title"), _str(part, "text")]
    elif t == "actionCard":
        problems += [_str(part, "title"), _str(part, "text")]
        btns = part.get("btns")
        if btns is None:
            problems += [_str(part, "singleTitle"), _str(part, "singleURL")]
        elif (
            not isinstance(btns, list)
            or not btns
            or not all(
                isinstance(b, dict) and not _str(b, "title") and not _str(b, "actionURL") for b in btns
            )
        ):
            problems.append("btns must be a list of {title, actionURL}")
    elif t == "link":
        problems += [_str(part, "title"), _str(part, "text"), _str(part, "messageUrl")]
    at = payload.get("at")
    if at is not None and t in MENTIONING:
        if not isinstance(at, dict):
            problems.append("at must be an object")
        else:
            for key in ("atMobiles", "atUserIds"):
                v = at.get(key)
                if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                    problems.append(f"at.{key} must be a list of strings")
            if at.get("isAtAll") is not None and not isinstance(at.get("isAtAll"), bool):
                problems.append("at.isAtAll must be a boolean")
    return "; ".join(p for p in problems if p)
