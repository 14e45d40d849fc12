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
  indexed), OK once ``/services/collector/ack`` says that request's events are indexed, asked again
  (every 0.1 s, doubling up to 2 s) while a request can end within the send's ``send_budget``; those
  not confirmed by then are retried (HEC may index them all the same: twice, never lost).
* 400 with ``invalid-event-number`` n → item n is rejected (dead-lettered with Splunk's text and
  code); the other items are retried. Splunk may have indexed the events before n already, so they
  can arrive twice — at-least-once, never lost. ``Incorrect index`` (code 7) rejects the whole batch.
* 413 (body above HEC's ``max_content_length``) → from then on (until a restart) the sink sends
  bodies of at most half that size, a batch in several requests; a single event still too large is
  rejected.
* 401/403 (token missing, invalid or disabled), 408, 429, 5xx (503 "Server is busy"), 400 code 10/11
  (the channel missing or invalid: a proxy drops the header), connection errors and timeouts →
  retried, honouring ``Retry-After``.
* any other answer → rejected with the status and a short excerpt.

A batch sent in several requests keeps within the engine's ``send_budget``: no request starts that
could end after it. Cut off at ``send_timeout``, the send would be sent again whole and what went
in would go in twice; instead what was not sent is answered ``retry(held=True)``, and the engine
sends it again at once.

The token is a ``Secret``: give ``env:NAME`` or ``file:/path``; it never appears in logs or errors.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
import uuid
from collections.abc import Sequence
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
    Secret,
    Sink,
    SinkContext,
    SinkError,
    SinkOptions,
    reject,
    retry,
)
from eventrouter.options import FilePath
from pydantic import AliasChoices, Field, field_validator

__all__ = ["DEFAULT_PATH", "SplunkHECOptions", "SplunkHECSink", "redact"]

DEFAULT_PATH = "/services/collector/event"
ACK_PATH = "/services/collector/ack"
_EXCERPT = 200
_CHANNEL_CODES = frozenset({10, 11})  # "Data channel is missing", "Invalid data channel"
_ACK_POLL_FIRST = 0.1  # seconds between two queries of /services/collector/ack, doubled each time ...
_ACK_POLL_MAX = 2.0  # ... up to this


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
    verify_tls: bool = Field(True, description="Verify the server certificate (https).")
    ca_file: FilePath | None = Field(None, description="PEM bundle to verify the server with (https).")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be the HEC address, e.g. https://splunk:8088")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials; give the token as token=env:NAME")
        return value


def redact(url: str) -> str:
    """Scheme, host, port and path only: the HEC URL never holds the token, but a query might."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


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
    """HEC's JSON answer → (text, code, invalid-event-number); a non-JSON body becomes an excerpt."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        text = str(doc.get("text", ""))[:_EXCERPT]
        code = doc.get("code")
        number = doc.get("invalid-event-number")
        return (
            text,
            code if isinstance(code, int) else None,
            number if isinstance(number, int) and not isinstance(number, bool) else None,
        )
    return body[:_EXCERPT].decode("utf-8", "replace"), None, None


class SplunkHECSink(Sink[SplunkHECOptions]):
    """Sends occurrences to a Splunk HTTP Event Collector."""

    options_model = SplunkHECOptions
    description = "Splunk HTTP Event Collector (example plugin)"

    def __init__(self, options: SplunkHECOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        parts = urlsplit(options.url)
        path = parts.path if parts.path not in ("", "/") else DEFAULT_PATH
        self.endpoint = urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        at = path.find("/services/collector")  # behind a proxy's own prefix, the ack path keeps it
        ack_path = (path[:at] if at >= 0 else "") + ACK_PATH
        self.ack_endpoint = urlunsplit((parts.scheme, parts.netloc, ack_path, parts.query, ""))
        self._where = redact(self.endpoint)
        self.channel = str(uuid.uuid4())
        self._headers = {
            "Authorization": f"Splunk {options.token.get_secret_value()}",
            "Content-Type": "application/json",
            # A token with indexer acknowledgement on refuses every request without a channel; its
            # ackIds are per channel, so one for the sink's life.
            "X-Splunk-Request-Channel": self.channel,
        }
        self._session: aiohttp.ClientSession | None = None
        self._max_body: int | None = None  # the most bytes a request carries, learnt from HEC's 413s

    # ---- lifecycle ------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.options.verify_tls:
            return False
        if self.options.ca_file:
            return ssl.create_default_context(cafile=self.options.ca_file)
        return True

    async def start(self) -> None:
        """Open the session and prove the token: an empty POST must get HEC's 400 "No data"."""
        self.context.warn_if_outlasting(self.options.timeout, "timeout")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl()),
                timeout=aiohttp.ClientTimeout(total=self.options.timeout),
            )
        try:
            async with self._session.post(self.endpoint, data=b"", headers=self._headers) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SinkError(f"splunk_hec cannot reach {self._where}: {_describe(exc)}") from None
        text, code, _ = _answer(body)
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
        self.log.info("splunk_hec %s accepts the token (HTTP %d %s)", self._where, status, text)

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
        # Cut off at send_timeout, the engine would send the whole batch again (what went in, twice):
        # no request starts that could end past send_budget (but the first, so each send gets on),
        # and what is left is answered held (no failure): the engine sends it again at once.
        until = time.monotonic() + self.context.send_budget - self.options.timeout
        todo = self._requests(list(bodies), bodies)
        acks: dict[int, list[int]] = {}  # ackId -> its request's items: received, not yet indexed
        started = False
        while todo:
            items = todo.pop(0)
            if started and time.monotonic() > until:
                left = retry(f"not sent within the send's {self.context.send_budget:g}s budget", held=True)
                for i in (i for run in (items, *todo) for i in run):
                    outcomes[i] = left
                break
            started = True
            if await self._post(items, bodies, outcomes, acks):  # too large: in smaller requests
                todo[:0] = self._requests(items, bodies)
        if acks:
            await self._confirm(acks, outcomes, until)
        return outcomes

    async def _confirm(self, acks: dict[int, list[int]], outcomes: list[Outcome], until: float) -> None:
        """Wait for HEC to confirm the requests of ``acks`` indexed (indexer acknowledgement: a 200
        only says received), asking while a request can end within the send's budget (``until``: no
        query starts after it). The items of those it did not confirm are retried."""
        wait, problem = _ACK_POLL_FIRST, "no time left in the send to ask"
        while time.monotonic() <= until:
            problem = await self._ask_acks(acks) or "not indexed yet"
            if not acks or time.monotonic() + wait > until:
                break
            await asyncio.sleep(wait)
            wait = min(wait * 2, _ACK_POLL_MAX)
        if not acks:
            return
        left = retry(
            f"HEC received the events but did not confirm them indexed within the send's "
            f"{self.context.send_budget:g}s budget (indexer acknowledgement: {problem}); sent again, "
            "they may be indexed twice"
        )
        for items in acks.values():
            for i in items:
                outcomes[i] = left

    async def _ask_acks(self, acks: dict[int, list[int]]) -> str | None:
        """One query of ``/services/collector/ack``: the ackIds HEC confirms indexed leave ``acks``.
        What went wrong, or None."""
        if self._session is None:
            return "splunk_hec sink is not started"
        query = orjson.dumps({"acks": list(acks)})
        try:
            async with self._session.post(self.ack_endpoint, data=query, headers=self._headers) as resp:
                status, body = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"cannot reach {redact(self.ack_endpoint)}: {_describe(exc)}"
        if status != 200:
            text, code, _ = _answer(body)
            return f"HEC {status} to the acknowledgement query: {text}" + (f" (code {code})" if code else "")
        try:
            answered = orjson.loads(body)["acks"]
            confirmed = [int(ack_id) for ack_id, indexed in answered.items() if indexed is True]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
            return f'an acknowledgement answer that is not {{"acks": {{...}}}}: {body[:_EXCERPT]!r}'
        for ack_id in confirmed:
            acks.pop(ack_id, None)
        return None

    def _requests(self, items: list[int], bodies: dict[int, bytes]) -> list[list[int]]:
        """``items`` in order, in runs whose body is at most ``_max_body`` (a larger event alone)."""
        runs: list[list[int]] = []
        size = 0
        for i in items:
            if runs and (self._max_body is None or size + len(bodies[i]) <= self._max_body):
                runs[-1].append(i)
                size += len(bodies[i])
            else:
                runs.append([i])
                size = len(bodies[i])
        return runs

    async def _post(
        self, items: list[int], bodies: dict[int, bytes], outcomes: list[Outcome], acks: dict[int, list[int]]
    ) -> bool:
        """Send ``items`` in one request and set their outcomes (``acks``: its ackId, when HEC answers
        one, for ``_confirm``). True: HEC refused the body as too large and ``_max_body`` is now below
        it; the items are to be sent again in smaller requests."""
        if self._session is None:
            for i in items:
                outcomes[i] = retry("splunk_hec sink is not started")
            return False
        payload = b"".join(bodies[i] for i in items)
        try:
            async with self._session.post(self.endpoint, data=payload, headers=self._headers) as resp:
                status, body = resp.status, await resp.read()
                wait = _retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Per item, not RetryableError: earlier requests of this batch may be accepted already.
            for i in items:
                outcomes[i] = retry(f"cannot reach {self._where}: {_describe(exc)}")
            return False
        if 200 <= status < 300:
            ack_id = _ack_id(body)
            if ack_id is not None:  # received, not yet indexed: OK once HEC confirms it
                acks[ack_id] = items
            return False  # outcomes stay OK
        text, code, bad = _answer(body)
        what = f"HEC {status}: {text}" + (f" (code {code})" if code is not None else "")
        if status == 413:
            if len(items) > 1:  # kept for later batches too: HEC does not say what it takes
                self._max_body = len(payload) // 2
                return True
            outcomes[items[0]] = reject(f"event of {len(payload)} bytes is too large for HEC: {what}")
            return False
        if status == 400 and bad is not None and 0 <= bad < len(items) and code != 7:
            for n, i in enumerate(items):
                outcomes[i] = reject(what) if n == bad else retry(f"sent again after another event: {what}")
            return False
        # 400 code 10/11: the channel did not reach HEC (see start), not the events' fault.
        if status in (401, 403, 408, 429) or status >= 500 or (status == 400 and code in _CHANNEL_CODES):
            self.log.warning("splunk_hec %s: %s; will retry", self._where, what)
            for i in items:
                outcomes[i] = retry(what, retry_after=wait)
            return False
        for i in items:
            outcomes[i] = reject(what)
        return False


def _ack_id(body: bytes) -> int | None:
    """The ``ackId`` of HEC's answer to an event request (a token with indexer acknowledgement on)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    ack_id = doc.get("ackId") if isinstance(doc, dict) else None
    return ack_id if isinstance(ack_id, int) and not isinstance(ack_id, bool) else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
