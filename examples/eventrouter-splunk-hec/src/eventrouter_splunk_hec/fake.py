"""A loopback Splunk HTTP Event Collector for tests: it checks requests the way HEC does.

    async with FakeHEC(tokens={"tok"}) as hec:
        ... send to hec.url with token "tok" ...
        await hec.wait_for(3)
        hec.events[0]["event"]

What it checks, answering HEC's JSON ``{"text": ..., "code": N}`` (codes from Splunk's
documentation of the collector's status codes):

- path ``/services/collector/event`` (also ``/event/1.0`` and ``/services/collector``) → else 404;
  method POST → else 405; ``GET /services/collector/health`` → 200 code 17 "HEC is healthy";
- ``Authorization``: missing → 401 code 2 "Token is required"; not ``Splunk <token>`` → 401 code 3
  "Invalid authorization"; unknown token → 403 code 4 "Invalid token"; a token in
  ``disabled_tokens`` → 403 code 1 "Token disabled";
- a token in ``ack_tokens`` (indexer acknowledgement on, ``useACK``) needs a channel, the
  ``X-Splunk-Request-Channel`` header or ``?channel=``: none → 400 code 10 "Data channel is missing";
  not a GUID → 400 code 11 "Invalid data channel";
- body larger than ``max_content_length`` → 413;
- empty body → 400 code 5 "No data";
- the body is a sequence of JSON objects (whitespace between them allowed). For the first bad one,
  number i: not UTF-8, not JSON or not an object, ``time`` not a number, ``fields`` not a flat
  object of strings (or lists of strings) → 400 code 6 "Invalid data format"; no ``event`` → 400
  code 12 "Event field is required"; ``event`` null or "" → 400 code 13 "Event field cannot be
  blank"; ``index`` not in ``indexes`` (when given) → 400 code 7 "Incorrect index"; each with
  ``"invalid-event-number": i``;
- otherwise every event is stored in ``events`` → 200 code 0 "Success"; for a token in
  ``ack_tokens`` with ``"ackId": n`` (numbered per channel from 0): the events are received, not yet
  confirmed indexed.

Indexer acknowledgement: ``POST /services/collector/ack`` with the token and the channel, body
``{"acks": [n, ...]}`` → 200 ``{"acks": {"n": true|false, ...}}``: true once the request's events
are indexed (at once; ``index_delay`` seconds after HEC received them; or at ``release_acks()`` while
``hold_acks`` is set), and answered true only once (Splunk then forgets it); false too for an ackId it
does not know (never given, forgotten), as Splunk answers; a token not in ``ack_tokens`` → 400 code 14
"ACK is disabled"; a body that is not that → 400 code 6 "Invalid data format". ``ack_queries`` counts
them. A channel not used (an event request or a query) for ``channel_idle_timeout`` seconds is
forgotten with its ackIds (Splunk's ``ackIdleCleanup`` after ``maxIdleTime``): its next request gets
ackId 0 again. ``restart()`` plays a HEC restart: the events of requests not indexed yet are lost (out
of ``events``, into ``lost``), and every channel's ackIds start again from 0 — as two HEC nodes behind
a load balancer without sticky sessions number one channel's requests each on its own.

A request with a bad event stores none of its events by default (the stricter of the behaviours a
client can meet; the sink retries the others, so it loses nothing either way). With
``keep_before_refused=True`` it stores the events before the bad one, as Splunk does (it takes a
request's events in order up to the one it refuses: a client then sends them again, and they are
indexed twice); for a token in ``ack_tokens`` under an ackId, numbered as a request's, which the 400
says (``{"text": ..., "code": 13, "invalid-event-number": 2, "ackId": 3}``, as Splunk's answers quoted
in kafka-connect-splunk #200; none when the refused event is the first, as there too).
``refuse`` (a predicate on the decoded event object) makes the fake refuse the events it is true of
as malformed (400 code 6), so a test can have one event of a well-encoded batch refused.

Fault injection: ``fail_next(n, status, body=..., retry_after=...)`` answers the next ``n`` event
requests that way, before any check, with ``unreadable=`` its body one the client cannot read, or with
``page=`` a front's streamed HTML page of that many bytes instead (``pages`` records how much of each
the client took); ``unreadable_next(n, how)`` sends the next ``n`` answers to event requests (``ack=True``:
to acknowledgement queries), whatever they say (HEC's own after it stored the events, or a fault's),
with a body the client cannot read: ``"stall"`` (the head, then none of the body until the fake
closes), ``"cut"`` (the head, then the connection dropped) or ``"gzip"`` (a plain body labelled
``Content-Encoding: gzip``), as a proxy or gateway in front of HEC may (``answer_unreadable`` of
``eventrouter.testing``), ``status=``: only answers of that status, the others passing untouched and
uncounted (a front that garbles its error pages); ``late_next(n, after)`` (``ack=`` likewise) sends
their body ``after`` seconds after their head, the connection kept; ``reword_next(n, rewrite)``
gives the next ``n`` 400s to event requests (HEC's own, after it stored what it takes) the body
``rewrite(body)`` instead: a front's error template (``{"message": "Bad Request"}``), or HEC's answer
without a field; ``restart_after(n)`` calls ``restart()`` once the next ``n`` requests with an ackId
are answered; ``lose_answers(n)``: the next ``n`` event requests HEC takes are stored (and numbered) as
usual, and the connection is closed instead of answering, as when the answer
of a loaded HEC comes after the client's timeout, or a proxy resets it; ``delay`` (seconds) holds every
event request that long first, as a loaded indexer does.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web
from eventrouter.testing.receivers.front_page import FrontPage, answer_page
from eventrouter.testing.receivers.unreadable import Unreadable, answer_late, answer_unreadable

__all__ = ["FakeHEC"]

_EVENT_PATHS = ("/services/collector/event", "/services/collector/event/1.0", "/services/collector")
ACK_PATH = "/services/collector/ack"


@dataclass
class _Fault:
    status: int
    body: dict[str, Any]
    retry_after: str | None
    unreadable: Unreadable | None = None
    page: int = 0  # bytes of a front's HTML page answered instead of HEC's JSON


@dataclass(frozen=True)
class _Shape:
    """How to send an answer (``unreadable_next``, ``late_next``): its body unreadable so, or that many
    seconds late; only an answer of ``status``, when given."""

    how: Unreadable | float
    status: int | None = None


@dataclass
class _Received:
    """A request of an acknowledged token: its events, when HEC received it (loop time), and whether
    ``hold_acks`` was set then (indexed only at ``release_acks``)."""

    events: list[dict[str, Any]]
    at: float
    held: bool


class _Invalid(Exception):
    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


def _check_fields(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    for item in value.values():
        if isinstance(item, str):
            continue
        if isinstance(item, list) and all(isinstance(x, str) for x in item):
            continue
        return False
    return True


def _check_time(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


class FakeHEC:
    def __init__(
        self,
        *,
        tokens: set[str],
        disabled_tokens: set[str] | None = None,
        ack_tokens: set[str] | None = None,
        hold_acks: bool = False,
        index_delay: float = 0.0,
        channel_idle_timeout: float | None = None,
        indexes: set[str] | None = None,
        max_content_length: int = 1_000_000,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        keep_before_refused: bool = False,
        refuse: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self.tokens = tokens
        self.disabled_tokens = disabled_tokens or set()
        self.ack_tokens = ack_tokens or set()
        self.hold_acks = hold_acks
        """While set, the events of acknowledged tokens are received but not indexed (release_acks)."""
        self.index_delay = index_delay
        """Seconds after HEC received a request (of an acknowledged token) that its events are indexed."""
        self.channel_idle_timeout = channel_idle_timeout
        self.ack_queries = 0
        self._acks: dict[str, dict[int, bool]] = {}  # channel -> ackId -> indexed
        self._received: dict[str, dict[int, _Received]] = {}  # channel -> ackId -> its request
        self._next_ack: dict[str, int] = {}
        self._used: dict[str, float] = {}  # channel -> when last used (loop time)
        self.lost: list[dict[str, Any]] = []
        """Events received and lost in a ``restart()`` before they were indexed."""
        self._restart_in: int | None = None  # restart once this many more ackIds are given
        self._lose = 0  # event requests still to be stored and left unanswered
        self.indexes = indexes
        self.max_content_length = max_content_length
        self.delay = delay
        self.host = host
        self.keep_before_refused = keep_before_refused
        """A request with a bad event stores the events before it, as Splunk does (else none)."""
        self.refuse = refuse
        """Events (decoded objects) it is true of are refused as malformed: 400 code 6."""
        self.events: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        """The status of every answered event request, in order."""
        self._faults: deque[_Fault] = deque()
        self._shapes: dict[str, deque[_Shape]] = {"event": deque(), "ack": deque()}
        self._rewords: deque[Callable[[dict[str, Any]], dict[str, Any]]] = deque()
        self._release = asyncio.Event()  # a stalled answer ends at the fake's close
        self.pages: list[FrontPage] = []
        """The front pages answered (``fail_next(page=)``), with how much of each the client took."""
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail_next(
        self,
        n: int,
        status: int,
        body: dict[str, Any] | None = None,
        *,
        retry_after: str | None = None,
        unreadable: Unreadable | None = None,
        page: int = 0,
    ) -> None:
        """Answer the next ``n`` event requests ``status`` with ``body`` (HEC's "Server is busy" by
        default), before any check; ``unreadable``: with a body the client cannot read; ``page``: a
        front's HTML page of that many bytes instead, streamed."""
        fault = _Fault(status, body or {"text": "Server is busy", "code": 9}, retry_after, unreadable, page)
        self._faults.extend([fault] * n)

    def unreadable_next(
        self, n: int, how: Unreadable, *, ack: bool = False, status: int | None = None
    ) -> None:
        """The next ``n`` answers to event requests (``ack``: to acknowledgement queries), whatever
        they say (``status``: only those of that status), sent with a body the client cannot read
        (``answer_unreadable``)."""
        self._shapes["ack" if ack else "event"].extend([_Shape(how, status)] * n)

    def reword_next(self, n: int, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """The next ``n`` 400s to event requests answered with ``rewrite(body)`` instead of ``body``, as
        a front with its own error bodies (or a HEC version stating less) would."""
        self._rewords.extend([rewrite] * n)

    def late_next(self, n: int, after: float, *, ack: bool = False) -> None:
        """The next ``n`` answers to event requests (``ack``: to acknowledgement queries) sent with
        their body ``after`` seconds after their head (``answer_late``)."""
        self._shapes["ack" if ack else "event"].extend([_Shape(after)] * n)

    @property
    def channels(self) -> list[str]:
        """The channels events were received on with an acknowledged token, in order of their first."""
        return list(self._next_ack)

    def release_acks(self) -> None:
        """Index everything received so far: each pending ackId is answered true (once)."""
        for pending in self._acks.values():
            for ack_id in pending:
                pending[ack_id] = True

    def lose_answers(self, n: int) -> None:
        """The next ``n`` event requests HEC takes are stored (with their ackIds) and left unanswered:
        the connection is closed, as when the client gave up waiting."""
        self._lose = n

    def restart_after(self, n: int) -> None:
        """``restart()`` right after answering the next ``n`` event requests that get an ackId."""
        self._restart_in = n

    def restart(self) -> None:
        """HEC restarts: what it received and had not indexed is lost, and every channel's ackIds start
        again from 0 (what it had indexed stays indexed, but its acknowledgements are forgotten)."""
        for channel in list(self._acks):
            self._index_due(channel)
        gone = [
            request.events
            for channel, pending in self._acks.items()
            for ack_id, indexed in pending.items()
            if not indexed and (request := self._received.get(channel, {}).get(ack_id)) is not None
        ]
        lost = {id(event) for events in gone for event in events}
        self.lost.extend(event for event in self.events if id(event) in lost)
        self.events[:] = [event for event in self.events if id(event) not in lost]
        self._acks.clear()
        self._received.clear()
        self._next_ack.clear()
        self._used.clear()

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` events were stored."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.events) >= count)

    # ---- server ---------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeHEC:
        app = web.Application(client_max_size=self.max_content_length * 4 + 1024)
        app.router.add_get("/services/collector/health", self._health)
        app.router.add_post(ACK_PATH, self._ack)
        for path in _EVENT_PATHS:
            app.router.add_route("*", path, self._collect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release.set()  # a stalled answer ends: its connection is dropped
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"text": "HEC is healthy", "code": 17})

    async def _answer(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> web.Response:
        self.statuses.append(status)
        if status == 400 and self._rewords:
            body = self._rewords.popleft()(body)
        async with self._changed:
            self._changed.notify_all()
        return web.json_response(body, status=status, headers=headers)

    async def _shaped(
        self, request: web.Request, answer: web.StreamResponse, which: str
    ) -> web.StreamResponse:
        """``answer`` as ``unreadable_next`` or ``late_next`` asked (not a lost one, nor a page)."""
        queue = self._shapes[which]
        transport = request.transport
        if not queue or not isinstance(answer, web.Response) or transport is None or transport.is_closing():
            return answer
        if queue[0].status not in (None, answer.status):
            return answer  # not the answers asked for: passes, the shape waits for one
        how = queue.popleft().how
        if isinstance(how, str):
            return await answer_unreadable(request, answer, how, self._release)
        return await answer_late(request, answer, how)

    async def _collect(self, request: web.Request) -> web.StreamResponse:
        return await self._shaped(request, await self._collected(request), "event")

    async def _faulty(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        if fault.page:
            self.statuses.append(fault.status)
            self.pages.append(FrontPage(fault.status, fault.page))
            return await answer_page(request, self.pages[-1], headers)
        if fault.unreadable is not None:  # shaped by ``_collect``, first
            self._shapes["event"].appendleft(_Shape(fault.unreadable))
        return await self._answer(fault.status, fault.body, headers)

    async def _collected(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.json_response({"text": "Method not allowed", "code": 405}, status=405)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._faults:
            return await self._faulty(request, self._faults.popleft())
        refused = self._refused(request)
        if refused is not None:
            return await self._answer(*refused)
        size = request.content_length
        raw = await request.read()
        if (size or len(raw)) > self.max_content_length:
            text = f"Content-Length of {len(raw)} too large (maximum is {self.max_content_length})"
            return await self._answer(413, {"text": text})
        if not raw.strip():
            return await self._answer(400, {"text": "No data", "code": 5})
        events: list[dict[str, Any]] = []
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return await self._answer(
                400, {"text": "Invalid data format", "code": 6, "invalid-event-number": 0}
            )
        decoder = json.JSONDecoder()
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            number = len(events)
            try:
                obj, pos = decoder.raw_decode(text, pos)
                events.append(self._validate(obj))
            except (ValueError, _Invalid) as exc:
                text_, code = (
                    (exc.text, exc.code) if isinstance(exc, _Invalid) else ("Invalid data format", 6)
                )
                said: dict[str, Any] = {"text": text_, "code": code, "invalid-event-number": number}
                if self.keep_before_refused and events:  # as Splunk: those before the bad one are taken
                    self.events.extend(events)
                    if (channel := self._channel(request)) is not None:  # under an ackId, said
                        said["ackId"] = self._receive(channel, events)
                return await self._answer(400, said)
        self.events.extend(events)
        channel = self._channel(request)
        if channel is None:
            if (lost := self._lost(request)) is not None:
                return lost
            return await self._answer(200, {"text": "Success", "code": 0})
        ack_id = self._receive(channel, events)
        answer = self._lost(request)
        if answer is None:
            answer = await self._answer(200, {"text": "Success", "code": 0, "ackId": ack_id})
        if self._restart_in is not None:
            self._restart_in -= 1
            if self._restart_in <= 0:
                self._restart_in = None
                self.restart()
        return answer

    def _receive(self, channel: str, events: list[dict[str, Any]]) -> int:
        """``events`` (stored already) received on ``channel`` of an acknowledged token: their ackId."""
        self._use(channel)
        ack_id = self._next_ack.get(channel, 0)
        self._next_ack[channel] = ack_id + 1
        now = asyncio.get_running_loop().time()
        self._received.setdefault(channel, {})[ack_id] = _Received(events, now, self.hold_acks)
        self._acks.setdefault(channel, {})[ack_id] = not self.hold_acks and self.index_delay <= 0
        return ack_id

    def _lost(self, request: web.Request) -> web.Response | None:
        """With ``lose_answers`` pending, close the connection of a request just stored: the client gets
        no answer (the response returned is never written)."""
        if self._lose <= 0 or request.transport is None:
            return None
        self._lose -= 1
        request.transport.close()
        return web.Response(status=200)

    def _use(self, channel: str) -> None:
        """A request on ``channel``: forgotten first if it was idle past ``channel_idle_timeout``."""
        now = asyncio.get_running_loop().time()
        last = self._used.get(channel)
        if (
            self.channel_idle_timeout is not None
            and last is not None
            and now - last > self.channel_idle_timeout
        ):
            for table in (self._acks, self._received, self._next_ack):
                table.pop(channel, None)
        self._used[channel] = now

    def _index_due(self, channel: str) -> None:
        """Mark indexed the requests of ``channel`` whose ``index_delay`` has passed (not held)."""
        now = asyncio.get_running_loop().time()
        pending, received = self._acks.get(channel, {}), self._received.get(channel, {})
        for ack_id, indexed in pending.items():
            request = received.get(ack_id)
            if not indexed and request is not None and not request.held:
                pending[ack_id] = now - request.at >= self.index_delay

    def _refused(self, request: web.Request) -> tuple[int, dict[str, Any]] | None:
        """The token and channel checks, in Splunk's order: what HEC answers, or None when they pass."""
        auth = request.headers.get("Authorization")
        if not auth:
            return 401, {"text": "Token is required", "code": 2}
        scheme, _, token = auth.partition(" ")
        if scheme != "Splunk" or not token:
            return 401, {"text": "Invalid authorization", "code": 3}
        if token in self.disabled_tokens:
            return 403, {"text": "Token disabled", "code": 1}
        if token not in self.tokens:
            return 403, {"text": "Invalid token", "code": 4}
        if token not in self.ack_tokens:
            return None
        given = request.headers.get("X-Splunk-Request-Channel") or request.query.get("channel")
        if not given:
            return 400, {"text": "Data channel is missing", "code": 10}
        try:
            uuid.UUID(given)
        except ValueError:
            return 400, {"text": "Invalid data channel", "code": 11}
        return None

    def _channel(self, request: web.Request) -> str | None:
        """The channel of a request that passed ``_refused``; None for a token without acknowledgement."""
        if request.headers["Authorization"].partition(" ")[2] not in self.ack_tokens:
            return None
        return request.headers.get("X-Splunk-Request-Channel") or request.query.get("channel")

    async def _ack(self, request: web.Request) -> web.StreamResponse:
        return await self._shaped(request, await self._acked(request), "ack")

    async def _acked(self, request: web.Request) -> web.Response:
        self.ack_queries += 1
        refused = self._refused(request)
        if refused is not None:
            return web.json_response(refused[1], status=refused[0])
        channel = self._channel(request)
        if channel is None:
            return web.json_response({"text": "ACK is disabled", "code": 14}, status=400)
        try:
            asked = json.loads(await request.read())["acks"]
            ids = [int(i) for i in asked if not isinstance(i, bool)]
        except (ValueError, TypeError, KeyError):
            return web.json_response({"text": "Invalid data format", "code": 6}, status=400)
        self._use(channel)
        self._index_due(channel)
        pending = self._acks.get(channel, {})
        done = {i: pending.get(i, False) for i in ids}
        for i, indexed in done.items():
            if indexed:  # answered true once: Splunk forgets it then
                del pending[i]
                self._received.get(channel, {}).pop(i, None)
        return web.json_response({"acks": {str(i): indexed for i, indexed in done.items()}})

    def _validate(self, obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict) or (self.refuse is not None and self.refuse(obj)):
            raise _Invalid("Invalid data format", 6)
        if "time" in obj and not _check_time(obj["time"]):
            raise _Invalid("Invalid data format", 6)
        if "fields" in obj and not _check_fields(obj["fields"]):
            raise _Invalid("Invalid data format", 6)
        if "event" not in obj:
            raise _Invalid("Event field is required", 12)
        if obj["event"] is None or obj["event"] == "":
            raise _Invalid("Event field cannot be blank", 13)
        if self.indexes is not None and obj.get("index") not in self.indexes | {None}:
            raise _Invalid("Incorrect index", 7)
        return obj
