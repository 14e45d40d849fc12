"""A WeChat Work (WeCom) endpoint for tests: the group-robot webhook and the application message API,
checking what qyapi.weixin.qq.com checks.

    async with WeComReceiver(corp_id="ww1", corp_secret="s3cret", agent_id=1000002) as wecom:
        wecom.url          # API base for the application API (…/cgi-bin/gettoken, …/cgi-bin/message/send)
        wecom.robot_url    # …/cgi-bin/webhook/send?key=…

Everything is answered with HTTP 200 and ``{"errcode": .., "errmsg": ..}``:

Group robot ``POST /cgi-bin/webhook/send?key=``
- unknown or missing key → 93000 ``invalid webhook url``;
- a body that is not a JSON object or misses a field → 40058 ``invalid Request Parameter``; an unknown
  ``msgtype`` → 40008 ``invalid message type``; empty content → 44004 ``empty content``;
  ``text.content`` over 2048 bytes or ``markdown.content`` over 4096 bytes → 40058 ``… exceed max
  length …``;
- ``mentioned_list`` / ``mentioned_mobile_list`` must be lists of strings;
- more than 20 accepted messages in a rolling minute for one key → 45009 ``api freq out of limit``.

Application API
- ``GET /cgi-bin/gettoken?corpid=&corpsecret=`` → 40013 ``invalid corpid``, 40001 ``invalid
  credential``; else ``access_token`` + ``expires_in``. While a token is valid the same one is
  returned (with the time it has left), as WeCom does; after it ends a new one.
- ``POST /cgi-bin/message/send?access_token=`` → 41001 ``access_token missing``, 40014 ``invalid
  access_token``, 42001 ``access_token expired``; ``agentid`` must be the application's (40056); at
  least one of ``touser``/``toparty``/``totag``, users outside ``users`` are reported in
  ``invaliduser`` and when nobody is valid → 81013; ``text``/``markdown`` content ≤ 2048 bytes (40058).

Accepted messages go to ``accepted`` (kind ``robot`` or ``app``); every request to ``requests``.
Fault injection: ``fail_next(n, errcode=…)``, ``fail_next(n, status=502)``, ``fail_next(n, body=…)``,
``fail_next(n, status=302, location=url)`` (a redirect), ``fail_next(n, status=429, headers=…)``
(a gateway's headers) (for message sends; gettoken only with ``gettoken=True``),
``unreadable_next(n, how)`` (the next ``n`` answers, whatever they say, gettoken's too, with a body the
client cannot read: ``"stall"``, ``"cut"`` or ``"gzip"``, as the DingTalk receiver's),
``late_next(n, after)`` (the next ``n`` answers, gettoken's too, with their body ``after`` seconds
after their head),
``expire_tokens()`` ends every issued token now.
``clock`` (monotonic seconds) drives rate limits and token lifetimes. ``chunk_bytes=n`` writes every
answer's body (gettoken's too) n bytes at a time, each piece reaching the client on its own (chunked
transfer, as a gateway or proxy in front answers): a client must read the body to its end.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from eventrouter.testing.receivers.chunked import ChunkedAnswers
from eventrouter.testing.receivers.unreadable import Unreadable, answer_late, answer_unreadable

__all__ = ["WeComMessage", "WeComReceiver", "WeComRequest"]


@dataclass
class WeComMessage:
    kind: Literal["robot", "app"]
    payload: dict[str, Any]
    at: float

    @property
    def msgtype(self) -> str:
        return str(self.payload["msgtype"])

    @property
    def text(self) -> str:
        return str(self.payload[self.msgtype]["content"])


@dataclass
class WeComRequest:
    path: str
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
class _Token:
    value: str
    expires: float


@dataclass
class _Rate:
    sent: deque[float] = field(default_factory=deque)


class WeComReceiver(ChunkedAnswers):
    def __init__(
        self,
        *,
        robot_key: str = "robot-key",
        corp_id: str = "ww-corp",
        corp_secret: str = "corp-secret",
        agent_id: int = 1000002,
        users: Iterable[str] = ("alice", "bob"),
        expires_in: int = 7200,
        rate_per_minute: int = 20,
        app_rate_per_minute: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        host: str = "127.0.0.1",
        chunk_bytes: int = 0,
    ) -> None:
        self.robot_key = robot_key
        self.chunk_bytes = chunk_bytes
        """Answers written this many bytes at a time (0: whole), as a gateway in front may."""
        self.corp_id = corp_id
        self.corp_secret = corp_secret
        self.agent_id = agent_id
        self.users = set(users)
        self.expires_in = expires_in
        self.rate_per_minute = rate_per_minute
        self.app_rate_per_minute = app_rate_per_minute
        self.clock = clock
        super().__init__()
        self.host = host
        self.accepted: list[WeComMessage] = []
        self.requests: list[WeComRequest] = []
        self.tokens_issued: list[str] = []
        self._token: _Token | None = None
        self._old_tokens: set[str] = set()
        self._rates: dict[str, _Rate] = {}
        self._faults: deque[_Fault] = deque()
        self._token_faults: deque[_Fault] = deque()
        self._unreadable: deque[Unreadable] = deque()
        self._late: deque[float] = deque()
        self._release = asyncio.Event()
        self._changed = asyncio.Condition()

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # a stalled answer ends: its connection is dropped
        await super().__aexit__(*exc)

    @property
    def url(self) -> str:
        """The API base (what the application API sink takes as ``url``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def robot_url(self) -> str:
        return f"{self.url}/cgi-bin/webhook/send?key={self.robot_key}"

    def errcodes(self, path: str | None = None) -> list[int | None]:
        return [r.errcode for r in self.requests if path is None or r.path == path]

    def gettoken_calls(self) -> int:
        return sum(1 for r in self.requests if r.path == "/cgi-bin/gettoken")

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
        gettoken: bool = False,
    ) -> None:
        fault = _Fault(status, errcode, errmsg, body, location, dict(headers or {}))
        (self._token_faults if gettoken else self._faults).extend(fault for _ in range(n))

    def unreadable_next(self, n: int, how: Unreadable) -> None:
        """The next ``n`` answers, whatever they say, sent with a body the client cannot read."""
        self._unreadable.extend([how] * n)

    def late_next(self, n: int, after: float) -> None:
        """The next ``n`` answers, whatever they say, sent with their body ``after`` seconds after
        their head (``answer_late``: a slow proxy or API flushing the head first)."""
        self._late.extend([after] * n)

    def expire_tokens(self) -> None:
        if self._token is not None:
            self._token.expires = self.clock()

    async def wait_for(self, count: int, within: float = 10.0) -> None:
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
        rec = WeComRequest(request.path, dict(request.query), body)
        self.requests.append(rec)
        gettoken = request.path == "/cgi-bin/gettoken" and request.method == "GET"
        faults = self._token_faults if gettoken else self._faults
        if faults and (gettoken or request.path in ("/cgi-bin/webhook/send", "/cgi-bin/message/send")):
            fault = faults.popleft()
            rec.status = fault.status
            answer = self._fault(rec, fault)
            answer.headers.update(fault.headers)
            return answer
        if gettoken:
            return self._gettoken(rec)
        if request.path not in ("/cgi-bin/webhook/send", "/cgi-bin/message/send"):
            rec.status = 404
            return web.Response(status=404)
        if request.method != "POST":
            return self._reply(rec, 43004, "invalid request method")
        if request.path == "/cgi-bin/webhook/send":
            code, msg, extra = self._robot(rec)
        else:
            code, msg, extra = self._app(rec)
        response = self._reply(rec, code, msg, extra)
        async with self._changed:
            self._changed.notify_all()
        return response

    def _fault(self, rec: WeComRequest, fault: _Fault) -> web.Response:
        if fault.body is not None:
            return web.Response(status=fault.status, body=fault.body, content_type="text/html")
        if fault.location is not None:  # a front that moved: the robot itself never sees it
            return web.Response(status=fault.status, headers={"Location": fault.location})
        if fault.errcode is None:
            return web.Response(status=fault.status, text="fault")
        return self._reply(rec, fault.errcode, fault.errmsg or "injected")

    def _reply(
        self, rec: WeComRequest, code: int, msg: str, extra: dict[str, Any] | None = None
    ) -> web.Response:
        rec.errcode, rec.errmsg = code, msg
        return web.json_response({"errcode": code, "errmsg": msg, **(extra or {})})

    def _gettoken(self, rec: WeComRequest) -> web.Response:
        if rec.query.get("corpid") != self.corp_id:
            return self._reply(rec, 40013, "invalid corpid")
        if rec.query.get("corpsecret") != self.corp_secret:
            return self._reply(rec, 40001, "invalid credential")
        now = self.clock()
        if self._token is None or now >= self._token.expires:
            if self._token is not None:
                self._old_tokens.add(self._token.value)
            self._token = _Token(secrets.token_urlsafe(24), now + self.expires_in)
            self.tokens_issued.append(self._token.value)
        left = max(1, int(self._token.expires - now))
        return self._reply(rec, 0, "ok", {"access_token": self._token.value, "expires_in": left})

    def _rate_ok(self, key: str, limit: int | None) -> bool:
        if limit is None:
            return True
        now = self.clock()
        rate = self._rates.setdefault(key, _Rate())
        while rate.sent and rate.sent[0] <= now - 60.0:
            rate.sent.popleft()
        if len(rate.sent) >= limit:
            return False
        rate.sent.append(now)
        return True

    def _parse(self, body: bytes) -> dict[str, Any] | None:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return payload if isinstance(payload, dict) else None

    def _content(self, payload: dict[str, Any], limits: dict[str, int]) -> tuple[int, str]:
        t = payload.get("msgtype")
        if t not in limits:
            return 40008, "invalid message type"
        part = payload.get(t)
        if not isinstance(part, dict) or not isinstance(part.get("content"), str):
            return 40058, f"{t}.content missing. invalid Request Parameter"
        content = part["content"]
        if not content:
            return 44004, "empty content"
        if len(content.encode("utf-8")) > limits[t]:
            return 40058, f"{t}.content exceed max length {limits[t]}. invalid Request Parameter"
        return 0, ""

    def _robot(self, rec: WeComRequest) -> tuple[int, str, dict[str, Any] | None]:
        if rec.query.get("key") != self.robot_key:
            return 93000, "invalid webhook url, hint: key not found", None
        payload = self._parse(rec.body)
        if payload is None:
            return 40058, "invalid Request Parameter", None
        code, msg = self._content(payload, {"text": 2048, "markdown": 4096})
        if code:
            return code, msg, None
        if payload["msgtype"] == "text":
            for key in ("mentioned_list", "mentioned_mobile_list"):
                v = payload["text"].get(key)
                if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                    return 40058, f"text.{key} invalid. invalid Request Parameter", None
        if not self._rate_ok(f"robot:{self.robot_key}", self.rate_per_minute):
            return 45009, "api freq out of limit", None
        self.accepted.append(WeComMessage("robot", payload, self.clock()))
        return 0, "ok", None

    def _app(self, rec: WeComRequest) -> tuple[int, str, dict[str, Any] | None]:
        token = rec.query.get("access_token")
        if not token:
            return 41001, "access_token missing", None
        if self._token is None or token != self._token.value:
            if token in self._old_tokens:
                return 42001, "access_token expired", None
            return 40014, "invalid access_token", None
        if self.clock() >= self._token.expires:
            return 42001, "access_token expired", None
        payload = self._parse(rec.body)
        if payload is None:
            return 40058, "invalid Request Parameter", None
        if payload.get("agentid") != self.agent_id:
            return 40056, "invalid agentid", None
        code, msg = self._content(payload, {"text": 2048, "markdown": 2048})
        if code:
            return code, msg, None
        touser = payload.get("touser") or ""
        toparty = payload.get("toparty") or ""
        totag = payload.get("totag") or ""
        if not any(isinstance(v, str) and v for v in (touser, toparty, totag)):
            return 40058, "touser, toparty and totag are all empty. invalid Request Parameter", None
        invalid: list[str] = []
        if touser and touser != "@all":
            wanted = touser.split("|")
            invalid = [u for u in wanted if u not in self.users]
            if len(invalid) == len(wanted) and not toparty and not totag:
                return 81013, "user & party & tag all invalid", None
        if not self._rate_ok("app", self.app_rate_per_minute):
            return 45009, "api freq out of limit", None
        self.accepted.append(WeComMessage("app", payload, self.clock()))
        return 0, "ok", {"invaliduser": "|".join(invalid), "msgid": secrets.token_hex(8)}
