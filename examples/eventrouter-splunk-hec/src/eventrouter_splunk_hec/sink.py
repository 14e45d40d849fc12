"""``splunk_hec`` sink: every occurrence as one event to a Splunk HTTP Event Collector.

``--sink=splunk_hec:https://splunk:8088?token=env:HEC_TOKEN&index=k8s&sourcetype=kube:events``

One request per batch to ``<url>/services/collector/event`` (unless the URL has a path already),
``Authorization: Splunk <token>``, the body the batch's events concatenated, one JSON object a line::

    {"time":1700000000.123,"host":"prod","source":"eventrouter","sourcetype":"kube:events",
     "index":"k8s","fields":{"namespace":"default","kind":"Pod","reason":"BackOff","type":"Warning"},
     "event":<the normalised record>}

Every request carries ``X-Splunk-Request-Channel``: a UUID, the same for the sink's life. A token with
indexer acknowledgement on (``useACK``, which e.g. Amazon Data Firehose needs) refuses requests without
one (400 code 10 "Data channel is missing"); one without ignores it.

Outcomes (what Splunk answers → what the engine does):

* 200 → every item OK. With an ``ackId`` (indexer acknowledgement on: the events are received, not yet
  indexed), OK once HEC's acknowledgement endpoint says that request's events are indexed, asked (every
  0.1 s, doubling up to 2 s) for a quarter of the send's ``send_budget`` at most (posting stops short
  of that share). Those not confirmed by then are held aside (``retry(held=True, defer=True)``, no
  failure) and remembered with their ackId: offered again, they are asked about, not posted again.
  Still not confirmed after ``ack_timeout``, or when HEC numbers the channel anew (an ackId not above
  the last: it restarted, dropped the idle channel, or another node behind a load balancer without
  sticky sessions answered) and so can no longer confirm them, they are retried as a failure and
  posted again: indexed twice perhaps, never lost. At most ``ack_max_waiting`` events wait so: past
  it new ones are not posted but held (``retry(held=True)``: the engine keeps them queued) until HEC
  confirms some. A request whose answer was lost (a timeout) may hold an ackId the sink never learnt;
  the sink then goes on on a new channel, and the request waiting with ackId 0 is posted again on a
  channel of its own until HEC confirms it (see ``_answer_lost``).
* The acknowledgement endpoint is ``ack_url``, by default the event URL's path up to
  ``/services/collector`` (the whole path if it has none: a gateway's route) + ``/services/collector/ack``,
  as Splunk's clients append HEC's paths to their base URL. One that answers as HEC's acknowledgement
  endpoint never does (HEC's event endpoint, a route dropping the token or the channel, another HEC,
  404, 405, a page: ``_judge_ack``) fails ``start`` when the token has indexer acknowledgement on; met
  in a send, it is logged at ERROR once and what HEC received is retried as a failure, asked about,
  never posted again, and nothing new is posted, until it answers. Whether the token has
  acknowledgement on is learnt from the event endpoint alone (an empty POST without a channel): an
  "ACK is disabled" while it gives the token ackIds is such a fault (another HEC). The events
  waiting are held in the engine's memory: without a spool ``ack_max_waiting`` is bounded by a
  quarter of ``queue_max_events`` (``SinkContext.aside_max_events``; said at start).
* 400 with ``invalid-event-number`` n → item n is rejected (dead-lettered with Splunk's text and
  code); those after it are retried. Splunk takes the events before n: with indexer acknowledgement
  under an ackId the 400 carries (kafka-connect-splunk #200), which counts in the channel's numbering
  and which they wait for as for a 200's; without one they are retried, and arrive twice —
  at-least-once, never lost. ``Incorrect index`` (code 7) rejects the whole batch. A 400 on several
  events that names none (a front's) is sent one per request, as an unreadable one.
* 413 (body above HEC's ``max_content_length``) → from then on (until a restart) the sink sends
  bodies of at most half that size, a batch in several requests; a single event still too large is
  rejected.
* 401/403 (token missing, invalid or disabled), 408, 429, 5xx (503 "Server is busy"), 400 code 10/11
  (the channel missing or invalid: a proxy drops the header), connection errors and timeouts →
  retried, honouring ``Retry-After``. A 5xx or 408 that is not HEC's own JSON answer (a front's: a
  gateway's 502 when HEC's answer was cut off, its 504 when HEC answered later than it waits) may
  follow a request HEC took: with indexer acknowledgement on (or not known), as a lost answer, the
  sink goes on on a new channel; HEC's own (503 code 9) keeps it.
* any other answer → rejected with the status and a short excerpt.
* An answer's body is read to 64 KiB at most (``excerpt``). One that cannot be read (it stalls after
  the head, is cut off, or is labelled gzip and is not) is judged by its status: only no status at
  all is "cannot reach". A 2xx's (its ackId) and a 400's (the event refused) decide and get the
  request's timeout, others 2 s (a 2xx's too while acknowledgement is off: it holds no ackId). A
  400's lost with acknowledgement on (or not known) may have held an ackId: as a lost answer, the
  sink goes on on a new channel; so does one read without an ackId that may have taken events (one
  naming none on several, a front's; one naming event n > 0). A 2xx whose body is lost: with the
  token's indexer acknowledgement off (``start`` asks) it is HEC's whole answer, OK (WARNING once
  until one is read again); on (or not known), sent again, saying it may be indexed twice (its ackId
  unknown: as a lost answer, the sink goes on on a new channel; ERROR at the second in a row). A 400 on several events: they are
  sent again one per request, in order, until HEC takes or refuses each (the refused one rejected
  alone; also in later sends), WARNING once a send: Splunk indexed those before the refused one, so
  each is indexed twice at most. A 413 halves as ever, a 429/5xx keeps its Retry-After (a 5xx's, as
  a front's, is a lost answer with acknowledgement on or not known).

A batch sent in several requests keeps within the engine's ``send_budget``: no request starts that
could end after it (less the acknowledgement's share, once HEC answered an ackId). Cut off at
``send_timeout``, the send would be sent again whole and what went in would go in twice; instead what
was not sent is answered ``retry(held=True)``, and the engine sends it again at once.

The token is a ``Secret``: give ``env:NAME`` or ``file:/path``; it never appears in logs or errors.
"""

from __future__ import annotations

import asyncio
import enum
import math
import ssl
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
from eventrouter import (
    OK,
    Occurrence,
    Outcome,
    OutcomeKind,
    Secret,
    Sink,
    SinkContext,
    SinkError,
    SinkOptions,
    reject,
    retry,
)
from eventrouter.body_prefix import EXCERPT_WAIT, Excerpt, excerpt
from eventrouter.options import FilePath, PipelineOptions
from pydantic import AliasChoices, Field, ValidationInfo, field_validator

__all__ = ["DEFAULT_PATH", "SplunkHECOptions", "SplunkHECSink", "ack_address", "redact"]

DEFAULT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
_EXCERPT = 200
_BODY_MAX = 64 << 10
"""Bytes of an answer's body read at most: HEC's answers are a few hundred bytes of JSON, and read
whole, a proxy's 150 MB error page took the router from 57 to 357 MB, at every retry."""
_CHANNEL_CODES = frozenset({10, 11})  # "Data channel is missing", "Invalid data channel"
_ACK_POLL_FIRST = 0.1  # seconds between two queries of /services/collector/ack, doubled each time ...
_ACK_POLL_MAX = 2.0  # ... up to this
_ACK_SHARE = 0.25
"""The share of the send's budget kept for asking HEC to confirm what it posted (posting stops short of
it), and the longest a send asks: an item not confirmed by then is held aside and asked about again."""
_ACK_QUERY_MIN = 0.05  # seconds: less left in the send's budget, no acknowledgement query starts
_RECHECK_MAX = 10.0  # seconds: the longest an item held for its confirmation waits to be asked again
_ACK_DISABLED = 14  # HEC's "ACK is disabled": the token has no indexer acknowledgement (any more)
_NO_DATA = 5  # "No data": HEC's answer to an empty request it takes (token, and channel if needed)
_INVALID_FORMAT = 6  # "Invalid data format": to a query, a body HEC cannot read
# Codes only HEC's event endpoint answers (Splunk's "HTTP Event Collector error codes"): "No data",
# "Incorrect index", "Event field is required", "Event field cannot be blank", "Error in handling
# indexed fields". Its acknowledgement endpoint answers 200, 400 code 6, 10, 11 or 14, 401/403 codes
# 1-4, or busy (500 code 8, 503 code 9).
_EVENT_CODES = frozenset({5, 7, 12, 13, 15})
_ENGINE = PipelineOptions.model_validate({})
_WAITING_DEFAULT = _ENGINE.queue_bound(spooled=False) // 4
"""The events waiting for HEC's confirmation the engine keeps in memory at its defaults without a spool
(2,500): they are set aside there (``retry(held=True, defer=True)``), and items set aside take at most
half the memory queue (``queue_max_events``, 10,000; ``SinkContext.aside_max_events``): over it, the
oldest are dropped. Half that share: those HEC confirmed since are set aside too until offered again
(up to ``_RECHECK_MAX`` later). Another queue bound bounds ``ack_max_waiting`` too (``_waiting_bound``)."""
_PROBE = b'{"acks": [0]}'  # asked on a channel nothing is posted on: HEC answers {"acks": {"0": false}}


class SplunkHECOptions(SinkOptions):
    """Options of the ``splunk_hec`` sink (every key also works as a YAML key)."""

    url: str = Field(
        description="HEC address, e.g. https://splunk:8088 (path default /services/collector/event)."
    )
    token: Secret = Field(
        validation_alias=AliasChoices("token", "hec_token"),
        description="HEC token (literal, env:NAME or file:/path); sent as 'Authorization: Splunk <token>'.",
    )
    index: str | None = Field(None, description="Target index (default: the token's default index).")
    sourcetype: str = Field("kube:events", description="Splunk sourcetype of every event.")
    source: str = Field("eventrouter", description="Splunk source of every event.")
    host: str | None = Field(
        None, description="Splunk host of every event (default: the record's cluster name, if any)."
    )
    indexed_fields: bool = Field(
        True, description="Add namespace, kind, reason, type and cluster as HEC indexed `fields`."
    )
    timeout: float = Field(10.0, gt=0, description="Seconds one HTTP request may take.")
    ack_timeout: float = Field(
        300.0,
        gt=0,
        description="Indexer acknowledgement: seconds HEC may take to confirm events indexed before they "
        "are sent again (they may then be indexed twice).",
    )
    ack_url: str | None = Field(
        None,
        description="Indexer acknowledgement endpoint (default: the url's path up to /services/collector, "
        "or all of it when it has none, followed by /services/collector/ack).",
    )
    ack_max_waiting: int = Field(
        _WAITING_DEFAULT,
        gt=0,
        description="Indexer acknowledgement: the most events HEC received and has not confirmed indexed; "
        "past it new events wait in the queue (at most this many go through per confirmation time). They "
        "are held in the engine's memory, half of queue_max_events at most without a spool: there this "
        "is bounded by a quarter of queue_max_events (said at start).",
    )
    verify_tls: bool = Field(True, description="Verify the server certificate (https).")
    ca_file: FilePath | None = Field(None, description="PEM bundle to verify the server with (https).")

    @field_validator("url", "ack_url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            if info.field_name == "ack_url":
                raise ValueError(
                    "must be the address of HEC's acknowledgement endpoint, e.g. https://gw/hec/ack"
                )
            raise ValueError("must be the HEC address, e.g. https://splunk:8088")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; give the token as token=env:NAME")
        return value


def redact(url: str) -> str:
    """Scheme, host, port and path only: the HEC URL never holds the token, but a query might."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def ack_address(event_url: str) -> str:
    """Where HEC's acknowledgement endpoint is, found as Splunk's clients find it (they append HEC's paths
    to a base URL): the event URL's path up to ``/services/collector`` (a proxy's prefix kept) is the
    base; a path without it (a gateway's route, ``https://gw/hec``) is the base itself."""
    parts = urlsplit(event_url)
    path = parts.path.rstrip("/")
    at = path.find("/services/collector")
    base = path[:at] if at >= 0 else path
    return urlunsplit((parts.scheme, parts.netloc, base + ACK_PATH, parts.query, ""))


class _Ack(enum.Enum):
    """How HEC's acknowledgement endpoint answered a query (``_judge_ack``)."""

    ANSWERED = "answered"  # 200 {"acks": {...}}
    DISABLED = "disabled"  # 400 code 14: the token has no indexer acknowledgement
    BUSY = "busy"  # 5xx, 408, 429: it may answer later; says nothing of the address


def _judge_ack(status: int, body: bytes) -> _Ack | str:
    """An acknowledgement query's answer judged by what HEC's acknowledgement endpoint answers (Splunk:
    200 ``{"acks": {...}}``; 400 code 14 "ACK is disabled"; busy), else what the answer means: the
    address reaches something that can never confirm an event (HEC's event endpoint, a route that drops
    the token or the channel, another HEC, a page). Before, any JSON with a ``code`` passed, and each
    event was held ``ack_timeout`` and posted again, for ever."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    fields = doc if isinstance(doc, dict) else {}
    if status == 200 and isinstance(fields.get("acks"), dict):
        return _Ack.ANSWERED
    text, code, _ = _answer(body)
    if status == 400 and code == _ACK_DISABLED:
        return _Ack.DISABLED
    if status >= 500 or status in (408, 429):
        return _Ack.BUSY
    said = (
        f"HTTP {status}"
        + (f' "{text.strip()}"' if text.strip() else "")
        + (f", code {code}" if code is not None else "")
    )
    event_answer = 200 <= status < 300 and ("ackId" in fields or code == 0)
    if event_answer or code in _EVENT_CODES or "invalid-event-number" in fields:
        return f"answered as HEC's event endpoint does ({said}), not as its acknowledgement endpoint"
    if status in (401, 403) and code is not None:
        return (
            f"refused the token ({said}): the route does not pass the Authorization header to HEC, "
            "reaches another HEC, or the token was disabled"
        )
    if status == 400 and code in _CHANNEL_CODES:
        return f"did not get the sink's channel ({said}): the route drops the X-Splunk-Request-Channel header"
    if status == 400 and code == _INVALID_FORMAT:
        return f"refused a well-formed query ({said}): something between changes the request's body"
    return f"answered {said}, which no HEC acknowledgement endpoint does"


def _waiting_bound(limit: int, aside: int | None) -> int:
    """``ack_max_waiting`` (``limit``) within what the engine keeps set aside (``aside``, the context's
    ``aside_max_events``; None: a spool keeps what is over): half of it, as the events HEC confirmed
    stay aside too until offered again."""
    return limit if aside is None else max(1, min(limit, aside // 2))


def _judge_read(status: int, answer: Excerpt) -> _Ack | str | None:
    """``_judge_ack`` of an answer as far as it was read; None: its body decides (a 2xx's acks, a
    400's code 14) and could not be read. Another's status decides without it: taken for no answer,
    a gateway's 404 page labelled gzip hid an address that can never confirm an event."""
    if answer.unreadable is None:
        return _judge_ack(status, answer.data)
    return None if 200 <= status < 300 or status == 400 else _judge_ack(status, b"")


def _unreadable(answer: Excerpt) -> str:
    return f"its body unreadable ({answer.unreadable})"


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _answer(body: bytes) -> tuple[str, int | None, int | None]:
    """HEC's JSON answer → (text, code, invalid-event-number); another body (not JSON, or JSON without
    HEC's ``text``: a front's) becomes an excerpt, so a reason says who answered what."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        text = str(doc["text"]) if "text" in doc else body.decode("utf-8", "replace")
        text = text[:_EXCERPT]
        code = doc.get("code")
        number = doc.get("invalid-event-number")
        return (
            text,
            code if isinstance(code, int) else None,
            number if isinstance(number, int) and not isinstance(number, bool) else None,
        )
    return body[:_EXCERPT].decode("utf-8", "replace"), None, None


@dataclass(eq=False)
class _Post:
    """A request HEC answered with an ackId: received, to be confirmed indexed."""

    channel: str  # the ackId is this channel's
    ack_id: int
    at: float  # time.monotonic() of HEC's answer
    waiting: int = 0  # occurrences still waiting on it
    confirmed: bool = False
    void: str | None = None  # why HEC can no longer confirm it: it numbers the channel anew

    @property
    def done(self) -> bool:
        return self.confirmed or self.void is not None


class _Pending:
    """The requests HEC received and has not confirmed indexed, and which occurrence each carried, across
    sends: a retried occurrence is asked about, not posted again. An occurrence is forgotten only once
    confirmed, given up, or to be posted again: memory is bounded by what the sink lets wait unconfirmed
    (``ack_max_waiting``; it posts nothing new past it), never by forgetting what waits."""

    def __init__(self) -> None:
        self.by_key: dict[str, _Post] = {}
        self.by_ack: dict[tuple[str, int], _Post] = {}  # neither confirmed nor void: what HEC is asked
        # Each channel still posted on: its last ackId, and when HEC gave it (time.monotonic()).
        self.last: dict[str, tuple[int, float]] = {}
        self.used = False  # HEC answered an ackId: the token has indexer acknowledgement on

    def get(self, key: str) -> _Post | None:
        return self.by_key.get(key)

    def posted(self, channel: str, ack_id: int, keys: list[str], now: float) -> tuple[_Post | None, int]:
        """HEC received ``keys`` under ``ack_id``: their post (None without keys: HEC gave the ackId to
        nothing of the sink's to wait for, a 400 refusing a request's first event), and how many
        waiting posts it voided. A channel's ackIds only grow: one not above the last means HEC numbers
        it anew, and the ids it gave before can no longer be asked about (one might now name another
        request). Every ackId HEC gives is seen here, or the channel is left (``_answer_lost``).

        Voided: the channel's posts, and those of other channels HEC answered before the channel's
        last ackId (before the renumbering: lost too if it was a restart). Not those answered since on
        another channel (a voided request's own, ``_answer_lost``): they may follow the restart, and
        each voided at its own channel's first post after it, a restart cost every waiting request
        one copy per channel posted on. A post left so is safe: a later ackId on its channel is
        checked here, a lost answer there voids its ackId 0, and else it is asked until ack_timeout."""
        voided, last = 0, self.last.get(channel)
        if last is not None and ack_id <= last[0]:
            reason = (
                f"HEC answered ackId {ack_id} again (after {last[0]}): it restarted, forgot the channel, "
                "or another HEC node answered, and can no longer confirm this event's request"
            )
            for post in list(self.by_ack.values()):
                if post.channel == channel or post.at <= last[1]:
                    self.void(post, reason)
                    voided += 1
        self.last[channel], self.used = (ack_id, now), True
        if not keys:
            return None, voided
        post = self.by_ack[channel, ack_id] = _Post(channel, ack_id, now)
        for key in keys:
            self.forget(key)
            self.by_key[key] = post
            post.waiting += 1
        return post, voided

    def unconfirmed(self, now: float, ack_timeout: float) -> int:
        """Occurrences HEC received and has not confirmed, not yet due to be posted again."""
        return sum(post.waiting for post in self.by_ack.values() if now - post.at < ack_timeout)

    def on(self, channel: str) -> bool:
        """Some request on ``channel`` waits to be confirmed."""
        return any(post.channel == channel for post in self.by_ack.values())

    def keys_of(self, post: _Post) -> list[str]:
        """The occurrences waiting on ``post``."""
        return [key for key, on in self.by_key.items() if on is post]

    def confirm(self, post: _Post) -> None:
        post.confirmed = True
        self._drop(post)

    def void(self, post: _Post, reason: str) -> None:
        post.void = reason
        self._drop(post)

    def forget(self, key: str) -> None:
        post = self.by_key.pop(key, None)
        if post is None:
            return
        post.waiting -= 1
        if post.waiting <= 0:
            self._drop(post)  # nobody waits on it any more

    def _drop(self, post: _Post) -> None:
        if self.by_ack.get((post.channel, post.ack_id)) is post:
            del self.by_ack[post.channel, post.ack_id]


class SplunkHECSink(Sink[SplunkHECOptions]):
    """Sends occurrences to a Splunk HTTP Event Collector."""

    options_model = SplunkHECOptions
    description = "Splunk HTTP Event Collector (example plugin)"

    def __init__(self, options: SplunkHECOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        parts = urlsplit(options.url)
        path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
        self.endpoint = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        self.ack_endpoint = options.ack_url or ack_address(self.endpoint)
        self._where = redact(self.endpoint)
        self._ack_where = redact(self.ack_endpoint)
        self._auth = {
            "Authorization": f"Splunk {options.token.get_secret_value()}",
            "Content-Type": "application/json",
        }
        self._session: aiohttp.ClientSession | None = None
        self._max_body: int | None = None  # the most bytes a request carries, learnt from HEC's 413s
        self._pending = _Pending()
        # The events of a request voided by a lost answer (``_answer_lost``), each such request's on a
        # channel of its own, which nothing else is posted on until HEC confirms them (or they are
        # given up): no other request's lost answer can make their ackId ambiguous again there.
        self._own: dict[str, str] = {}
        self.channel = ""
        self._headers: dict[str, str] = {}
        self._use_channel(str(uuid.uuid4()))
        # Where the acknowledgement endpoint is asked whether it answers as HEC's: no request is posted
        # on it, so ackId 0 is never HEC's to confirm (asked on a channel in use, it might be).
        self._probe_channel = str(uuid.uuid4())
        self._ack_fault: str | None = None  # what is wrong with the acknowledgement endpoint, if it is
        # The token has indexer acknowledgement off (start() asked, or HEC answered "ACK is disabled"
        # since): a 2xx is HEC's final word, its body says nothing more.
        self._ack_off = False
        self._unread_2xx = 0  # 2xx answers in a row whose body could not be read
        # Events that may be indexed already (before an event HEC refused, its answer unreadable): each
        # goes in a request of its own until HEC takes or refuses it, so it is indexed twice at most.
        self._alone: set[str] = set()
        self._alone_said = False  # the WARNING of that was logged in this send
        self._full = False  # ack_max_waiting events wait to be confirmed: nothing new is posted
        self._waiting_max = _waiting_bound(options.ack_max_waiting, context.aside_max_events)
        self._limit = f"ack_max_waiting={options.ack_max_waiting}" + (
            f", bounded to {self._waiting_max} by queue_max_events"
            if self._waiting_max < options.ack_max_waiting
            else ""
        )

    def _use_channel(self, channel: str) -> None:
        """Post on ``channel`` from now on. A token with indexer acknowledgement on refuses every request
        without one; its ackIds are per channel, numbered from 0 on a channel HEC does not know."""
        self._pending.last.pop(self.channel, None)  # nothing is posted on the old one any more
        self.channel = channel
        self._headers = self._on(channel)

    def _on(self, channel: str) -> dict[str, str]:
        return {**self._auth, "X-Splunk-Request-Channel": channel}

    # ---- lifecycle ------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.options.verify_tls:
            return False
        if self.options.ca_file:
            return ssl.create_default_context(cafile=self.options.ca_file)
        return True

    async def start(self) -> None:
        """Open the session and prove the token: an empty POST must get HEC's 400 "No data". With
        indexer acknowledgement on, the acknowledgement endpoint must answer as HEC's."""
        self.context.warn_if_outlasting(self.options.timeout, "timeout")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl()),
                timeout=aiohttp.ClientTimeout(total=self.options.timeout),
            )
        status, text, code = await self._empty_post(self._headers)
        if status in (401, 403):
            raise SinkError(
                f"splunk_hec {self._where} refused the token: {text} (HTTP {status}, code {code})"
            )
        if status == 404:
            raise SinkError(f"splunk_hec: no HTTP Event Collector at {self._where} (HTTP 404)")
        if status >= 500:
            raise SinkError(f"splunk_hec {self._where} is not ready: {text} (HTTP {status})")
        if status == 400 and code in _CHANNEL_CODES:
            # The channel is sent: something between (a proxy) drops or rewrites the header.
            raise SinkError(
                f"splunk_hec {self._where}: the token has indexer acknowledgement on and HEC did not get "
                f"this sink's channel: {text} (HTTP 400, code {code}); let the X-Splunk-Request-Channel "
                "header through to HEC, or turn indexer acknowledgement off for this token"
            )
        ack = await self._check_ack_endpoint()
        if ack is _Ack.ANSWERED:
            self._check_waiting_bound()
        self._ack_off = ack is _Ack.DISABLED
        self.log.info("splunk_hec %s accepts the token (HTTP %d %s)", self._where, status, text)

    def _check_waiting_bound(self) -> None:
        """Say once that ``ack_max_waiting`` is bounded by what the engine keeps set aside (without a
        spool; with one, the rest waits on disk): past it the engine dropped the oldest waiting, events
        Splunk indexes, counted queue_full (item 288's Left). Bounded rather than refused: a start that
        fails is tried again for ever while the queue drops, and a default ack_max_waiting beside a
        lowered queue_max_events would stop a sink that delivers."""
        if self._waiting_max >= self.options.ack_max_waiting:
            return
        self.log.warning(
            "splunk_hec %s: ack_max_waiting=%d is bounded to %d: the events waiting for HEC's confirmation, "
            "and those confirmed until offered again, are set aside in the engine's memory, which without "
            "a disk spool keeps at most %s of this sink's (half of queue_max_events) and drops the oldest "
            "over it; at most %d events go through per confirmation time: set queue_max_events to at "
            "least %d (four times ack_max_waiting) or give the router a --data-dir spool",
            self._where,
            self.options.ack_max_waiting,
            self._waiting_max,
            self.context.aside_max_events,
            self._waiting_max,
            4 * self.options.ack_max_waiting,
        )

    async def _empty_post(
        self, headers: dict[str, str], timeout: float | None = None
    ) -> tuple[int, str, int | None]:
        """An empty POST to the event endpoint (HEC answers 400 "No data" once the token and channel
        pass): its status, text and code. ``timeout``: within it (a send's budget), else the session's."""
        if self._session is None:
            raise SinkError("splunk_hec sink is not started")
        within = aiohttp.ClientTimeout(total=self.options.timeout if timeout is None else timeout)
        try:
            async with self._session.post(self.endpoint, data=b"", headers=headers, timeout=within) as resp:
                status = resp.status
                body = await excerpt(resp, _BODY_MAX, self._body_wait(status))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"splunk_hec cannot reach {self._where}: {_describe(exc)}") from None
        if body.unreadable is None:
            text, code, _ = _answer(body.data)
            return status, text, code
        if self._body_wait(status) is None:  # HEC's code tells the token's and the channel's fate
            raise SinkError(
                f"splunk_hec {self._where} answered an empty request HTTP {status}, {_unreadable(body)}: "
                "whether it takes the token cannot be told"
            )
        return status, f"(its body unreadable: {body.unreadable})", None

    async def _check_ack_endpoint(self) -> _Ack | None:
        """A token with indexer acknowledgement on needs HEC's acknowledgement endpoint: at an address
        that answers as something else (a gateway's 404, HEC's event endpoint, a route dropping the
        token or the channel), every event was received, held for ack_timeout and posted again, for
        ever. A query tells (``_judge_ack``); what answers otherwise, or "ACK is disabled" (code 14),
        matters only if the token has it on, which an empty POST without a channel tells (400 code
        10; "No data" without one: off, ``_Ack.DISABLED``): the token's state is learnt there, never
        from an ``ack_url`` that may reach another HEC. None: not known."""
        assert self._session is not None
        unread = None
        try:
            async with self._session.post(
                self.ack_endpoint, data=_PROBE, headers=self._on(self._probe_channel)
            ) as resp:
                status = resp.status
                answer = await excerpt(resp, _BODY_MAX, self._body_wait(status))
            judged = _judge_read(status, answer)
            if judged is None:
                unread = judged = f"answered HTTP {status}, {_unreadable(answer)}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            judged = f"cannot be reached ({_describe(exc)})"
        if judged is _Ack.DISABLED:
            return self._disabled_at_start(await self._acks_at_event_endpoint())
        if not isinstance(judged, str):
            return judged
        _, _, code = await self._empty_post(self._auth)
        if code in _CHANNEL_CODES and unread is not None:
            raise SinkError(
                f"splunk_hec: the token has indexer acknowledgement on, and {self._ack_where} {unread}: "
                "whether it can confirm events cannot be told"
            )
        if code in _CHANNEL_CODES:
            raise SinkError(
                f"splunk_hec: the token has indexer acknowledgement on, and {self._fault_text(judged)}"
            )
        self.log.info(
            "splunk_hec: %s %s; the token has indexer acknowledgement off, so nothing asks it",
            self._ack_where,
            judged,
        )
        return _Ack.DISABLED if code == _NO_DATA else None

    def _disabled_at_start(self, acks: bool | None) -> _Ack | None:
        """The acknowledgement endpoint answered "ACK is disabled"; ``acks``: whether the event endpoint
        gives the token ackIds. Only the event endpoint tells the token's state: an ``ack_url`` that
        reaches another HEC (or tier) where the token has acknowledgement off answers so too, and
        taken for the token's state, every event HEC received and had not indexed counted delivered."""
        if acks:
            raise SinkError(
                "splunk_hec: the token has indexer acknowledgement on, and "
                + self._fault_text(self._disabled_elsewhere)
            )
        return _Ack.DISABLED if acks is False else None

    @property
    def _disabled_elsewhere(self) -> str:
        return (
            f'answered "ACK is disabled" (HTTP 400, code 14) though {self._where} gives the token ackIds '
            "(indexer acknowledgement on there): it reaches another HEC"
        )

    async def _acks_at_event_endpoint(self, timeout: float | None = None) -> bool | None:
        """Whether the event endpoint gives the token ackIds (indexer acknowledgement on): an empty
        POST without a channel answers 400 code 10 then, "No data" (code 5) when off. None: not told
        (busy, unreachable, unreadable)."""
        try:
            _, _, code = await self._empty_post(self._auth, timeout)
        except SinkError:
            return None
        return True if code in _CHANNEL_CODES else False if code == _NO_DATA else None

    def _fault_text(self, fault: str) -> str:
        """The acknowledgement endpoint's fault, naming its address (no credentials) and the fix."""
        if self.options.ack_url:
            source, fix = "ack_url", "correct ack_url"
        else:
            source = "the acknowledgement endpoint derived from url"
            fix = "set ack_url to the address that reaches HEC's /services/collector/ack (a gateway route of its own)"
        return f"{self._ack_where} ({source}) {fault}: no event can be confirmed indexed; {fix}"

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, occ: Occurrence) -> bytes:
        """One HEC event object: the envelope, then the record's shared JSON as ``event``."""
        record = occ.record
        envelope: dict[str, Any] = {
            # Epoch seconds with milliseconds, as HEC documents; the record keeps full precision.
            "time": round(occ.time_ns // 1_000_000 / 1000, 3),
            "source": self.options.source,
            "sourcetype": self.options.sourcetype,
        }
        host = self.options.host or record.get("cluster")
        if host:
            envelope["host"] = host
        if self.options.index:
            envelope["index"] = self.options.index
        if self.options.indexed_fields:
            involved = record.get("involved_object") or {}
            fields = {
                "cluster": record.get("cluster"),
                "namespace": record.get("namespace"),
                "kind": involved.get("kind"),
                "reason": record.get("reason"),
                "type": record.get("type"),
            }
            envelope["fields"] = {k: v for k, v in fields.items() if isinstance(v, str) and v}
        head = orjson.dumps(envelope)
        return head[:-1] + b',"event":' + occ.encode(include_raw=self.options.include_raw) + b"}\n"

    # ---- sending --------------------------------------------------------------------------------

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        outcomes: list[Outcome] = [OK] * len(batch)
        bodies: dict[int, bytes] = {}
        for i, occ in enumerate(batch):
            try:
                bodies[i] = self.encode(occ)
            except (TypeError, ValueError) as exc:  # orjson: lone surrogates, non-str keys
                outcomes[i] = reject(f"cannot encode occurrence {occ.key} as JSON: {exc}")
        end = time.monotonic() + self.context.send_budget
        # What HEC received in an earlier send and has not confirmed indexed is asked about first,
        # not posted again (each post of it is one more copy indexed).
        posts = self._waiting(batch, bodies)
        problem = await self._ask_acks(set(posts.values()), end) if posts else None
        if self._ack_fault is not None and not posts:
            await self._ask(self._probe_channel, {}, end)  # does the acknowledgement endpoint answer again?
        await self._admit(bodies, outcomes, end)
        new = await self._post_all(batch, bodies, outcomes, end)
        posts.update(new)
        if any(not post.done for post in posts.values()):
            # Asked just now if nothing new was posted: the next query after the first pause.
            first = 0.0 if new else _ACK_POLL_FIRST
            problem = await self._confirm(set(posts.values()), end, first) or problem
        self._settle(batch, posts, outcomes, problem)
        self._release(batch, outcomes)
        return outcomes

    def _release(self, batch: Sequence[Occurrence], outcomes: list[Outcome]) -> None:
        """Forget the own channel of each item settled (confirmed, OK without an ackId, rejected): only
        those still to be offered again keep one. A channel no item keeps is never posted on again."""
        for occ, outcome in zip(batch, outcomes, strict=True):
            if outcome.kind is not OutcomeKind.RETRY:
                self._own.pop(occ.key, None)
        self._forget_channels()

    def _forget_channels(self) -> None:
        """Keep the last ackId of the channels still posted on only (the sink's and the own ones)."""
        if self._pending.last:
            used = {self.channel, *self._own.values()}
            for channel in [c for c in self._pending.last if c not in used]:
                del self._pending.last[channel]

    def _waiting(self, batch: Sequence[Occurrence], bodies: dict[int, bytes]) -> dict[int, _Post]:
        """The items of ``batch`` HEC received before under an ackId still to be confirmed (or confirmed
        since): taken out of ``bodies``. One whose request can no longer be confirmed is posted again."""
        posts: dict[int, _Post] = {}
        for i in list(bodies):
            post = self._pending.get(batch[i].key)
            if post is None:
                continue
            if post.void is not None:
                self._pending.forget(batch[i].key)
                continue
            posts[i] = post
            del bodies[i]
        return posts

    async def _admit(self, bodies: dict[int, bytes], outcomes: list[Outcome], end: float) -> None:
        """Leave in ``bodies`` what may be posted now. While the acknowledgement endpoint answers as no
        HEC does, nothing: it could never be confirmed (a failure, retried). While ``ack_max_waiting``
        events wait for HEC to confirm them, what is over: held (no failure), it waits in the engine's
        queue, and the queue behind it, where what cannot be kept is counted. Before, the sink forgot
        the oldest waiting instead: offered again, they were posted again and pushed others out, and
        past the bound nothing was ever confirmed, every recheck one more copy indexed."""
        if not bodies or not (self._pending.used or self._ack_fault):
            return
        room = await self._room(len(bodies), end) if self._ack_fault is None else 0  # may find a fault
        if self._ack_fault is not None:
            refused = retry(f"not sent: {self._ack_fault}")
            for i in bodies:
                outcomes[i] = refused
            bodies.clear()
            return
        if room >= len(bodies):
            if self._full:
                self._full = False
                self.log.info("splunk_hec %s: HEC confirmed events indexed; posting again", self._where)
            return
        now, limit = time.monotonic(), self._waiting_max
        if not self._full:
            self._full = True
            self.log.warning(
                "splunk_hec %s: %d events HEC received wait for it to confirm them indexed (%s): new events "
                "wait in the queue until it confirms some; at most that many go through per confirmation "
                "time (raise ack_max_waiting, and queue_max_events to at least four times it)",
                self._where,
                limit - room,
                self._limit,
            )
        oldest = min((post.at for post in self._pending.by_ack.values()), default=now)
        held = retry(
            f"not sent yet: {limit - room} events HEC received wait for it to confirm them indexed "
            f"({self._limit})",
            held=True,
            retry_after=_recheck_in(now - oldest),
        )
        for i in list(bodies)[room:]:
            outcomes[i] = held
            del bodies[i]

    async def _room(self, wanted: int, end: float) -> int:
        """How many new events may be posted: ``ack_max_waiting`` less those HEC received and has not
        confirmed (not those past ack_timeout: posted again when offered). Short of room, HEC is asked
        about every waiting request: those the engine holds aside come back only after this send."""
        limit, timeout = self._waiting_max, self.options.ack_timeout
        room = limit - self._pending.unconfirmed(time.monotonic(), timeout)
        if room < wanted and self._pending.by_ack:
            await self._ask_acks(set(self._pending.by_ack.values()), end)
            room = limit - self._pending.unconfirmed(time.monotonic(), timeout)
        return max(0, room)

    async def _post_all(
        self, batch: Sequence[Occurrence], bodies: dict[int, bytes], outcomes: list[Outcome], end: float
    ) -> dict[int, _Post]:
        """Post ``bodies`` (in several requests once a 413 was learnt) and set their outcomes; the
        items HEC answered with an ackId, by their request. Cut off at send_timeout, the engine would
        send the whole batch again (what went in, twice): no request starts that could end past
        ``end`` less the acknowledgement's share (but the first, so each send gets on), and what is
        left is answered held (no failure): the engine sends it again at once."""
        reserve = self.context.send_budget * _ACK_SHARE if self._pending.used else 0.0
        post_by = end - self.options.timeout - reserve
        alone = frozenset(i for i in bodies if batch[i].key in self._alone)
        # A voided request's events go on their channel, in requests of their own (None: the sink's).
        groups: dict[str | None, list[int]] = {}
        for i in bodies:
            groups.setdefault(self._own.get(batch[i].key), []).append(i)
        todo = [run for group in groups.values() for run in self._requests(group, bodies, alone)]
        posts: dict[int, _Post] = {}
        started = False
        self._alone_said = False
        while todo:
            items = todo.pop(0)
            if started and time.monotonic() > post_by:
                left = retry(f"not sent within the send's {self.context.send_budget:g}s budget", held=True)
                for i in (i for run in (items, *todo) for i in run):
                    outcomes[i] = left
                break
            started = True
            keys = [batch[i].key for i in items]
            channel = self._own.get(keys[0], self.channel)  # a run is all of one group
            again, ack_id = await self._post(channel, items, keys, bodies, outcomes)
            if ack_id is not None:  # the items HEC took under it: those whose outcome stays OK
                taken = [] if again else [i for i in items if outcomes[i] is OK]
                post = self._posted(channel, ack_id, [batch[i].key for i in taken])
                posts.update(dict.fromkeys(taken, post) if post is not None else {})
            if again:  # in smaller requests
                todo[:0] = again
                continue
            # Taken (or refused alone): no longer possibly indexed without the sink knowing.
            self._alone.difference_update(
                k for i, k in zip(items, keys, strict=True) if outcomes[i].kind is not OutcomeKind.RETRY
            )
        return posts

    def _posted(self, channel: str, ack_id: int, keys: list[str]) -> _Post | None:
        """HEC received a request (``keys``) under ``ack_id`` (none: an ackId HEC gave with a refusal).
        An ackId not above the channel's last means HEC numbers the channel anew: it restarted (what it
        had not indexed is lost), dropped the channel as idle, or another HEC node answered (a load
        balancer without sticky sessions): the requests waiting to be confirmed can no longer be, and
        are sent again."""
        post, voided = self._pending.posted(channel, ack_id, keys, time.monotonic())
        if voided:
            self.log.warning(
                "splunk_hec %s: HEC answered ackId %d again on this sink's channel: it restarted, forgot "
                "the channel (idle), or another HEC node answered (indexer acknowledgement needs sticky "
                "sessions at a load balancer); %d requests it had not confirmed indexed are sent again",
                self._where,
                ack_id,
                voided,
            )
        return post

    async def _confirm(self, posts: set[_Post], end: float, first: float) -> str | None:
        """Ask HEC to confirm ``posts`` indexed (indexer acknowledgement: a 200 only says received),
        every 0.1 s doubling up to 2 s, for the acknowledgement's share of the send at most, within
        the send's budget (``end``). What is wrong, or None."""
        stop = min(end, time.monotonic() + self.context.send_budget * _ACK_SHARE)
        wait, problem = first, None
        while any(not post.done for post in posts) and self._ack_fault is None:
            if time.monotonic() + wait > stop:
                return problem
            await asyncio.sleep(wait)
            wait = min(max(wait * 2, _ACK_POLL_FIRST), _ACK_POLL_MAX)
            problem = await self._ask_acks(posts, end)
        return self._ack_fault

    def _settle(
        self,
        batch: Sequence[Occurrence],
        posts: dict[int, _Post],
        outcomes: list[Outcome],
        problem: str | None,
    ) -> None:
        """The outcome of each item HEC received under an ackId: OK once confirmed indexed; while
        not, held aside (no failure) and asked about again when the engine offers it again, until
        ``ack_timeout``; after it, or when HEC can no longer confirm it, retried: posted again."""
        now, expired = time.monotonic(), 0
        for i, post in posts.items():
            key = batch[i].key
            if post.confirmed:
                self._pending.forget(key)
                continue  # OK
            age = now - post.at
            if post.void is None and self._ack_fault is not None:
                # A fault of the address, not of HEC: posted again it would only be received again.
                outcomes[i] = retry(
                    f"HEC received it (ackId {post.ack_id}, {age:.0f}s ago), and cannot be asked whether "
                    f"it indexed it: {self._ack_fault}; asked again, not sent again"
                )
                continue
            if post.void is None and age < self.options.ack_timeout:
                outcomes[i] = retry(
                    f"HEC received it (ackId {post.ack_id}, {age:.0f}s ago) and has not confirmed it "
                    f"indexed yet (indexer acknowledgement: {problem or 'not indexed yet'}); asked again, "
                    f"not sent again, for up to ack_timeout={self.options.ack_timeout:g}s",
                    held=True,
                    defer=True,
                    retry_after=_recheck_in(age),
                )
                continue
            self._pending.forget(key)
            expired += post.void is None
            why = post.void or (
                f"HEC did not confirm it indexed within ack_timeout={self.options.ack_timeout:g}s "
                f"(indexer acknowledgement, ackId {post.ack_id}: {problem or 'not indexed yet'})"
            )
            outcomes[i] = retry(f"{why}; sent again, it may be indexed twice", defer=True)
        if expired:
            self.log.warning(
                "splunk_hec %s: HEC did not confirm %d events indexed within ack_timeout=%gs (%s); they "
                "are sent again and may be indexed twice",
                self._where,
                expired,
                self.options.ack_timeout,
                problem or "not indexed yet",
            )

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        # Dead-lettered or dropped: never offered again, so nothing to wait for.
        for occ in occurrences:
            self._pending.forget(occ.key)
            self._alone.discard(occ.key)
            self._own.pop(occ.key, None)
        self._forget_channels()

    async def _ask_acks(self, posts: set[_Post], end: float) -> str | None:
        """Ask HEC about ``posts`` not confirmed yet (one query per channel, within ``end``, the send's
        budget): those it confirms indexed are marked so. What went wrong, or None."""
        asked: dict[str, dict[int, _Post]] = {}
        for post in posts:
            if not post.done:
                asked.setdefault(post.channel, {})[post.ack_id] = post
        problem, off = None, self._ack_off
        for channel, ids in asked.items():
            if self._ack_off and not off:  # turned off, learnt on another channel: said once (r308 F2)
                for post in ids.values():
                    self._pending.confirm(post)
                continue
            problem = await self._ask(channel, ids, end) or problem
        return problem

    async def _ask(self, channel: str, asked: dict[int, _Post], end: float) -> str | None:
        """One query of the acknowledgement endpoint on ``channel`` for ``asked`` (none: whether it
        answers as HEC's, asked on the probe channel). What went wrong, or None."""
        left = min(self.options.timeout, end - time.monotonic())
        if self._session is None:
            return "splunk_hec sink is not started"
        if left < _ACK_QUERY_MIN:
            return "no time left in the send to ask"
        try:
            async with self._session.post(
                self.ack_endpoint,
                data=orjson.dumps({"acks": sorted(asked)}) if asked else _PROBE,
                headers=self._on(channel),
                timeout=aiohttp.ClientTimeout(total=left),
            ) as resp:
                status = resp.status
                answer = await excerpt(resp, _BODY_MAX, self._body_wait(status))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"cannot reach {self._ack_where}: {_describe(exc)}"
        judged = _judge_read(status, answer)
        if judged is None:  # says nothing of the address either: asked again
            return f"HEC answered the acknowledgement query HTTP {status}, {_unreadable(answer)}"
        if isinstance(judged, str):
            self._set_ack_fault(judged)
            return self._ack_fault
        if judged is _Ack.BUSY:  # says nothing of the address: a fault found stays until it answers
            what, _, _ = _what(status, answer)
            return f"{what}, to the acknowledgement query"
        if judged is _Ack.DISABLED:
            return await self._ack_disabled(asked, end)
        body = answer.data
        self._set_ack_fault(None)
        try:
            answered = orjson.loads(body)["acks"]
            confirmed = [int(ack_id) for ack_id, indexed in answered.items() if indexed is True]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            return f'an acknowledgement answer that is not {{"acks": {{...}}}}: {body[:_EXCERPT]!r}'
        for ack_id in confirmed:
            if (post := asked.get(ack_id)) is not None and post.void is None:
                self._pending.confirm(post)
        return None

    def _set_ack_fault(self, fault: str | None) -> None:
        """Note how the acknowledgement endpoint answered: as no HEC does (``fault``), logged at ERROR
        once; or as HEC again."""
        text = None if fault is None else self._fault_text(fault)
        if text == self._ack_fault:
            return
        if text is not None:
            self.log.error(
                "splunk_hec: %s; what HEC received is asked about again, not sent again, and nothing new is "
                "sent until it answers",
                text,
            )
        else:
            self.log.info("splunk_hec: %s answers as HEC's acknowledgement endpoint again", self._ack_where)
        self._ack_fault = text

    async def _ack_disabled(self, asked: dict[int, _Post], end: float) -> str | None:
        """The acknowledgement endpoint answered "ACK is disabled" (code 14). Only the event endpoint
        tells whether the token's acknowledgement was turned off: if it still gives ackIds, the
        acknowledgement address reaches another HEC (a route moved), and taken for the token's state,
        every event HEC received and had not indexed counted delivered, lost on HEC's restart."""
        left = min(self.options.timeout, end - time.monotonic())
        acks = await self._acks_at_event_endpoint(left) if left >= _ACK_QUERY_MIN else None
        if acks is None:
            return (
                f'{self._ack_where} answered "ACK is disabled", and whether {self._where} still gives the '
                "token ackIds could not be told; asked again"
            )
        if acks:
            self._set_ack_fault(self._disabled_elsewhere)
            return self._ack_fault
        self._set_ack_fault(None)
        if asked:
            self._acknowledgement_off(asked.values())
        return None

    def _acknowledgement_off(self, posts: Iterable[_Post]) -> None:
        """HEC answered "ACK is disabled" (code 14) about requests it gave ackIds, and its event endpoint
        takes the token without a channel: the token's indexer acknowledgement was turned off since.
        HEC took them, and nothing more can be known: OK."""
        self.log.warning(
            'splunk_hec %s: HEC answered the acknowledgement query "ACK is disabled" and takes the token '
            "without a channel: the token's indexer acknowledgement was turned off; the events HEC "
            "received under an ackId count as delivered",
            self._where,
        )
        for post in posts:
            self._pending.confirm(post)
        self._pending.used = False
        self._ack_off = True

    def _answer_lost(self, channel: str) -> None:
        """A request's answer on ``channel`` was lost (a timeout, a reset, a front's 5xx): HEC may have
        taken it under an ackId the sink never learnt. Had HEC restarted (or dropped the idle channel)
        just before, that is ackId 0, which a request still waiting there may hold from before: asked
        about, HEC would confirm the other request's events, and this one's, lost in the restart, would
        be answered OK. So that one is posted again, and nothing more is posted on ``channel``: only one
        request of unknown ackId per channel, always the last, so only ackId 0 can be mistaken (any
        later answer not above the last ackId shows the renumbering, as ``_posted`` checks).

        The voided request is posted again on a channel of its own (``_own``), kept until HEC confirms
        it: posted on the sink's new channel, it was the first there, ackId 0 again, and the next lost
        answer voided it again, one copy per lost answer (r318 F4: 21 after 20 alternating front
        502s). On its own channel only its own events go, so only a lost answer of its own voids it
        again; then what is left of it moves to another channel of its own."""
        if not self._pending.on(channel):
            return  # nothing waits on this channel: nothing to mistake
        apart, main = str(uuid.uuid4()), channel == self.channel
        post = self._pending.by_ack.get((channel, 0))
        if post is not None:
            self._own.update(dict.fromkeys(self._pending.keys_of(post), apart))
            self._pending.void(
                post,
                "the answer to a later request on its channel was lost, and had HEC restarted in between "
                "that request would hold ackId 0 too, confirming another request's events",
            )
        if main:
            self._use_channel(str(uuid.uuid4()))
        else:  # a voided request's own channel: the rest of it leaves it too
            self._own.update({key: apart for key, on in self._own.items() if on == channel})
            self._forget_channels()
        self.log.info(
            "splunk_hec %s: an answer was lost: %s, the waiting ones are asked about on their own%s",
            self._where,
            f"new requests go on a new channel ({self.channel})"
            if main
            else "a request sent again on a channel of its own goes on another",
            "" if post is None else " (but the one with ackId 0, sent again on a channel of its own)",
        )

    def _requests(
        self, items: list[int], bodies: dict[int, bytes], alone: frozenset[int] = frozenset()
    ) -> list[list[int]]:
        """``items`` in order, in runs whose body is at most ``_max_body`` (a larger event alone);
        those in ``alone`` each in a run of its own."""
        runs: list[list[int]] = []
        size = 0
        for i in items:
            joins = runs and runs[-1][-1] not in alone and i not in alone
            if joins and (self._max_body is None or size + len(bodies[i]) <= self._max_body):
                runs[-1].append(i)
                size += len(bodies[i])
            else:
                runs.append([i])
                size = len(bodies[i])
        return runs

    async def _post(
        self,
        channel: str,
        items: list[int],
        keys: list[str],
        bodies: dict[int, bytes],
        outcomes: list[Outcome],
    ) -> tuple[list[list[int]] | None, int | None]:
        """Send ``items`` (their occurrences' ``keys``) in one request on ``channel`` and set their
        outcomes. (runs, _): the items are to be sent again in these smaller requests (HEC refused the
        body as too large, ``_max_body`` is now below it; or refused an event its answer did not name:
        one per request). (_, n): HEC gave the request ackId n: those of ``items`` whose outcome stays OK it
        received under it (all, for a 2xx; those before the event a 400 refused), not yet confirmed
        indexed; the ackId counts in the channel's numbering whatever the answer."""
        if self._session is None:
            for i in items:
                outcomes[i] = retry("splunk_hec sink is not started")
            return None, None
        payload = b"".join(bodies[i] for i in items)
        try:
            headers = self._headers if channel == self.channel else self._on(channel)
            async with self._session.post(self.endpoint, data=payload, headers=headers) as resp:
                status, wait = resp.status, _retry_after(resp.headers.get("Retry-After"))
                body = await excerpt(resp, _BODY_MAX, self._body_wait(status, receipt=True))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # No status came (the body's faults are in ``body``): sent, HEC may have taken it.
            if not isinstance(exc, aiohttp.ClientConnectorError):
                self._answer_lost(channel)
            # Per item, not RetryableError: earlier requests of this batch may be accepted already.
            for i in items:
                outcomes[i] = retry(f"cannot reach {self._where}: {_describe(exc)}")
            return None, None
        if 200 <= status < 300:  # outcomes stay OK; with an ackId, once HEC confirms them indexed
            if body.unreadable is None:
                self._unread_2xx = 0
                return None, _ack_id(body.data)
            self._unread_2xx += 1
            if self._receipt_is_final:
                self._receipt_final(status, body.unreadable)
            else:
                self._receipt_unread(channel, items, status, body.unreadable, outcomes)
            return None, None
        ack_id = _ack_id(body.data) if body.unreadable is None else None
        if ack_id is None and (
            (status == 400 and self._may_have_taken(len(items), body)) or self._front_answered(status, body)
        ):
            self._answer_lost(channel)
        again = self._refused(items, keys, bodies, len(payload), status, body, wait, outcomes)
        return again, ack_id

    def _may_have_taken(self, count: int, body: Excerpt) -> bool:
        """A 400 to a request of ``count`` events whose ackId the sink could not read: with
        acknowledgement on (or not known) HEC may have taken the events before the one it refused under
        an ackId (kafka-connect-splunk #200) the sink never saw, as for a lost answer. So may a 400
        unreadable, one naming no event (a front's own body in place of HEC's), or one naming event
        n > 0 without the ackId (r308 F1/F1b). Not one saying nothing was taken: the channel's (code
        10/11: it did not reach HEC), the first event named, or a request of one event."""
        if self._receipt_is_final:
            return False
        if body.unreadable is not None:
            return True  # item 308: whatever the request
        _, code, bad = _answer(body.data)
        return count > 1 and code not in _CHANNEL_CODES and bad != 0

    def _front_answered(self, status: int, body: Excerpt) -> bool:
        """A 5xx or 408 that is not HEC's own answer (JSON with its ``text`` and ``code``): a front's (a
        gateway's HTML, an empty or unreadable body, a gateway's own JSON). Behind nginx, an ALB or an
        API gateway that is a 502 when HEC's answer was cut off, a 504 when it came later than the
        front waits: HEC may have taken the request under an ackId the sink never saw, as for a lost
        answer (session 36). HEC's own keeps the channel (item 298): 503 code 9, busy, is given before
        it takes anything; so, unchecked, is taken 500 code 8."""
        if self._receipt_is_final or not (status >= 500 or status == 408):
            return False
        return body.unreadable is not None or not _hec_said(body.data)

    def _refused(
        self,
        items: list[int],
        keys: list[str],
        bodies: dict[int, bytes],
        size: int,
        status: int,
        body: Excerpt,
        wait: float | None,
        outcomes: list[Outcome],
    ) -> list[list[int]] | None:
        """The outcomes of ``items`` (a request of ``size`` bytes) HEC answered ``status``, not a 2xx;
        or the runs to send them again in."""
        what, code, bad = _what(status, body)
        if status == 413:
            if len(items) > 1:  # kept for later batches too: HEC does not say what it takes
                self._max_body = size // 2
                return self._requests(items, bodies)
            outcomes[items[0]] = reject(f"event of {size} bytes is too large for HEC: {what}")
            return None
        if status == 400 and bad is not None and 0 <= bad < len(items) and code != 7:
            # Splunk took the events before ``bad``; with an ackId, under it: they wait for it.
            taken = body.unreadable is None and _ack_id(body.data) is not None
            for n, i in enumerate(items):
                if n == bad:
                    outcomes[i] = reject(what)
                elif n > bad or not taken:
                    outcomes[i] = retry(f"sent again after another event: {what}")
            return None
        # 400 code 10/11: the channel did not reach HEC (see start), not the events' fault.
        if status in (401, 403, 408, 429) or status >= 500 or (status == 400 and code in _CHANNEL_CODES):
            self.log.warning("splunk_hec %s: %s; will retry", self._where, what)
            for i in items:
                outcomes[i] = retry(what, retry_after=wait)
            return None
        if status == 400 and code != 7 and len(items) > 1:
            # HEC names the event it refuses: an answer that names none (unreadable, or a front's)
            # does not tell which; one per request finds it, rejected alone.
            said = f"its answer named none ({what})"
            if body.unreadable is not None:
                said = f"its answer could not be read ({body.unreadable})"
            return self._one_by_one(items, keys, said)
        for i in items:
            outcomes[i] = reject(what)
        return None

    @property
    def _receipt_is_final(self) -> bool:
        """The token has indexer acknowledgement off (and no ackId came since): a 2xx is HEC's whole
        answer, its body decides nothing."""
        return self._ack_off and not self._pending.used

    def _body_wait(self, status: int, *, receipt: bool = False) -> float | None:
        """How long an answer's body is waited for once its head is in (``body_prefix``'s rule). A 2xx's
        (its ackId) and a 400's (the event HEC refused, its code) decide the outcome: the request's
        timeout. Another only changes what is quoted, the status decides: 2 s at most; so does a 2xx
        to an event request (``receipt``) while the token has acknowledgement off, which holds no
        ackId (item 305): waited the whole timeout, a front stalling every 2xx body cost a request
        per ``timeout``."""
        decides = status == 400 or (200 <= status < 300 and not (receipt and self._receipt_is_final))
        return None if decides else min(EXCERPT_WAIT, self.options.timeout)

    def _one_by_one(self, items: list[int], keys: list[str], said: str) -> list[list[int]]:
        """HEC (or a front) refused ``items`` with a 400 that names no event (``said``: unreadable, or
        not naming one). Splunk names the event it refuses and indexes those before it: sent again,
        each is one more copy. Halved level by level, the events just before it were posted at every
        level (10 copies of one in a batch of 500); one per request, in order, each is posted twice
        at most (and kept alone across sends, ``_alone``), the event refused rejected alone, N
        requests at most. Before, a readable 400 naming none dead-lettered the whole batch."""
        self._alone.update(keys)
        if not self._alone_said:
            self._alone_said = True
            self.log.warning(
                "splunk_hec %s: HEC refused an event of a request of %d and %s: the events are sent again "
                "one per request, in order, to find it; any Splunk took before it may be indexed twice",
                self._where,
                len(items),
                said,
            )
        return [[i] for i in items]

    def _receipt_final(self, status: int, why: str) -> None:
        """HEC answered a 2xx whose body could not be read, and the token has indexer acknowledgement
        off: there is no ackId to learn, HEC took the request (its status says so) and that is all it
        ever says. The events are delivered (outcomes stay OK). Before, they were posted again, one
        more copy at every attempt, and never delivered behind a front that garbles every answer."""
        if self._unread_2xx > 1:
            return  # said once, until an answer is read again
        self.log.warning(
            "splunk_hec %s: HEC answered HTTP %d but its answer could not be read (%s): the token has "
            "indexer acknowledgement off, so the status is HEC's whole answer and the events count as "
            "delivered; something in front of HEC (a proxy, a gateway) garbles its answers",
            self._where,
            status,
            why,
        )

    def _receipt_unread(
        self, channel: str, items: list[int], status: int, why: str, outcomes: list[Outcome]
    ) -> None:
        """HEC answered a 2xx whose body could not be read, and the token has (or may have) indexer
        acknowledgement on: the events are received, perhaps under an ackId the sink cannot learn (as
        when the answer is lost: ``_answer_lost``). Sent again: before, this was "cannot reach",
        though HEC had answered. A second in a row is an ERROR: a front that garbles every answer
        gets one more copy indexed at every attempt, and nothing delivered."""
        self._answer_lost(channel)
        reason = (
            f"HEC answered HTTP {status} but its answer could not be read ({why}): whether it holds an "
            "ackId is unknown; sent again, so the events may be indexed twice"
        )
        self.log.warning("splunk_hec %s: %s", self._where, reason)
        if self._unread_2xx == 2:  # once a run of them
            self.log.error(
                "splunk_hec %s: two answers of HEC in a row could not be read (%s): with indexer "
                "acknowledgement each attempt posts the events again and Splunk indexes one more copy, "
                "none delivered; fix what is in front of HEC (a proxy, a gateway)",
                self._where,
                why,
            )
        for i in items:
            outcomes[i] = retry(reason)


def _what(status: int, body: Excerpt) -> tuple[str, int | None, int | None]:
    """An error answer as quoted in a reason (HEC's text and code), with its code and
    invalid-event-number; a body that could not be read is said so, and names neither."""
    if body.unreadable is not None:
        return f"HEC {status} (its body unreadable: {body.unreadable})", None, None
    text, code, bad = _answer(body.data)
    return f"HEC {status}: {text}" + (f" (code {code})" if code is not None else ""), code, bad


def _hec_said(body: bytes) -> bool:
    """``body`` is HEC's own JSON answer: an object with its ``text`` and an integer ``code``."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    code = doc.get("code") if isinstance(doc, dict) else None
    return isinstance(doc, dict) and isinstance(doc.get("text"), str) and type(code) is int


def _ack_id(body: bytes) -> int | None:
    """The ``ackId`` of HEC's answer to an event request (a token with indexer acknowledgement on)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    ack_id = doc.get("ackId") if isinstance(doc, dict) else None
    return ack_id if isinstance(ack_id, int) and not isinstance(ack_id, bool) else None


def _recheck_in(age: float) -> float:
    """Seconds until a request HEC received ``age`` seconds ago is asked about again."""
    return min(_RECHECK_MAX, max(_ACK_POLL_MAX, age / 2))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
