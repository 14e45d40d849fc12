"""What the alert robots (DingTalk, WeCom) share: digests, a rate limiter, silences and rendering.

A robot that pages people must not be flooded (about 20 messages a minute per robot, and DingTalk
throttles a robot for 10 minutes when that is exceeded), yet the engine contract says an occurrence is
OK only once it is durably accepted. Here that means: the occurrence was included in a digest message
the robot answered ``errcode 0`` to.

How it fits (see docs/alerting.md for the whole story):

- ``send(batch)`` puts each occurrence into a *group* (default key: namespace + involved object +
  reason) kept in a bounded in-memory pool.
- A group that was not notified within the last ``window`` seconds is *due* at once; a group that was
  is held until its window ends, so its repeats become one line ("BackOff x12 in 4m50s ...").
- Due groups are packed into as few messages as fit ``max_message_bytes``; what does not fit is
  summarised with counts ("...and 37 more events: BackOff x30, Unhealthy x7") and counts as delivered
  in that message. Nothing is cut mid-event.
- Messages go out only when the per-robot limiter (``rate_per_minute`` in any 60 s) allows; ``send``
  waits for it at most ``max_send_wait`` seconds.
- Occurrences of this batch that are in an accepted message are OK; the others get ``retry`` with a
  ``retry_after`` saying when their digest is due. They stay pooled, so when the engine offers them
  again they are answered from what happened meanwhile (OK if a digest carried them). A restart loses
  the pool but not the occurrences: the engine never saw them OK.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import functools
import hashlib
import math
import os
import re
import string
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import getproxies
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import orjson
from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, field_validator

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
from eventrouter.body_prefix import Excerpt, excerpt
from eventrouter.logs import Throttled
from eventrouter.options import StrList, http_url, redact_url

from ._scrub import credentials, shown_location

__all__ = [
    "AlertOptions",
    "AlertSink",
    "Clock",
    "Delivery",
    "ManualClock",
    "RateLimiter",
    "Silence",
    "SystemClock",
    "md_escape",
    "text_clean",
]

# --------------------------------------------------------------------------------------------- clocks


class Clock(Protocol):
    """Time as the sink sees it; injectable so tests can run a simulated minute instantly."""

    def now(self) -> float:
        """Monotonic seconds (rate limiting, windows)."""
        ...

    def wall(self) -> float:
        """Epoch seconds (signatures, silences' expiry)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to (or when something sleeps on it): for tests.

    ``sleep`` advances the time at once, which is what a simulated minute needs. Receivers take
    ``clock.now`` / ``clock.wall`` so both sides of a test agree on the time.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float | None = None) -> None:
        self._now = start
        self._wall_offset = (time.time() if wall_start is None else wall_start) - start

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


# --------------------------------------------------------------------------------------- rate limiter


class RateLimiter:
    """At most ``limit`` messages in any ``period`` seconds (a sliding log, never a burst over it).

    A send is recorded when its answer arrives: the server received it no later than that, so
    measuring the next send's start against it keeps the server-side spacing as well.
    """

    def __init__(self, limit: int, period: float, clock: Clock) -> None:
        self.limit = limit
        self.period = period
        self.clock = clock
        self._log: deque[float] = deque()
        self._in_flight = 0
        self._paused_until = 0.0

    def _trim(self, now: float) -> None:
        while self._log and self._log[0] <= now - self.period:
            self._log.popleft()

    def free(self) -> int:
        now = self.clock.now()
        if now < self._paused_until:
            return 0
        self._trim(now)
        return max(0, self.limit - len(self._log) - self._in_flight)

    def wait_time(self) -> float:
        """Seconds until one more message may go out (0 when it may go now)."""
        now = self.clock.now()
        self._trim(now)
        wait = max(0.0, self._paused_until - now)
        used = len(self._log) + self._in_flight
        if used >= self.limit:
            if len(self._log) <= used - self.limit:
                return max(wait, self.period)  # only in-flight sends hold the budget
            wait = max(wait, self._log[used - self.limit] + self.period - now)
        return wait

    def begin(self) -> None:
        self._in_flight += 1

    def end(self, *, counted: bool = True) -> None:
        """A send answered; ``counted=False`` when the robot refused the sender (token, signature)
        before the message reached anyone: the robots count only the messages they take, and
        refusals counted used up the minute, so the alerts of a rotation waited a minute once the
        new secret was in."""
        self._in_flight -= 1
        if counted:
            self._log.append(self.clock.now())

    def pause(self, seconds: float) -> None:
        """The robot said "too fast" (someone else shares it): send nothing for a while."""
        self._paused_until = max(self._paused_until, self.clock.now() + seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self.clock.now())

    def last(self) -> float | None:
        """When the last send counted was answered; None when none is known."""
        return self._log[-1] if self._log else None

    def history(self) -> tuple[list[float], float]:
        """(the sends of the last ``period``, the end of a pause), in this clock's time."""
        self._trim(self.clock.now())
        return list(self._log), self._paused_until

    def merge(self, sent: Iterable[float], paused_until: float) -> None:
        """Sends another record holds (an earlier process's rate file, another sink entry's file for
        the same robot, an instance replaced), in this clock's time: the robot still counts them.
        Each once: one within ``SAME_SEND`` of a send already known is that send (two entries' files
        hold the same minute), and each known send stands for one of them at most."""
        known = sorted(self._log)
        new: list[float] = []
        i = 0
        for t in sorted(sent):
            while i < len(known) and known[i] < t - SAME_SEND:
                i += 1
            if i < len(known) and known[i] <= t + SAME_SEND:
                i += 1  # that send: matched once
            else:
                new.append(t)
        self._log = deque(sorted([*known, *new]))
        self._paused_until = max(self._paused_until, paused_until)


SAME_SEND = 0.05
"""Seconds within which a send read back from a rate file is one already known: read back, a time
lands up to ``_CLOCK_SLACK`` plus a millisecond (the file's precision) after the send it records."""


# ------------------------------------------------------------------------------------------- escaping

TIMES = "\u00d7"
"""The multiplication sign of "BackOff x12" in digests."""

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]#|~<>])")
_MD_LEADING = re.compile(r"^(\s*(?:\d+)?)([-+=.)])")


def text_clean(value: object) -> str:
    """Any record value as safe text: str, valid UTF-8 (lone surrogates replaced), no control chars."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return _CONTROL.sub(" ", text)


_ISO_TEXT = re.compile(r"[0-9][0-9T:.Z+\-]{0,39}")
"""A record's ``time`` as the router writes it (digits, ``-``, ``:``, ``T``, ``.``, ``Z``)."""


def one_line(value: object) -> str:
    return " ".join(text_clean(value).split("\n")).strip()


def md_escape(value: object) -> str:
    """User content for markdown, one line: CommonMark backslash escapes for the characters that can
    change structure (emphasis, code, links, headings, quotes, tables, HTML and WeCom's ``<@user>``
    mentions) and for a list marker at the start; other punctuation stays readable."""
    escaped = _MD_SPECIAL.sub(r"\\\1", one_line(value))
    return _MD_LEADING.sub(r"\1\\\2", escaped)


def _shorten(text: str, limit: int) -> str:
    """Cut at ``limit`` characters and say so; an excerpt is never shortened silently."""
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + f" …(+{len(text) - limit} chars)"


def _cut_bytes(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes of ``text``, cut on a character boundary, marked when cut."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore").rstrip() + "…"


SUMMARY_LEVELS: tuple[tuple[int, int | None], ...] = ((8, None), (8, 64), (4, 32), (2, 16), (0, 0))
"""(reasons listed, UTF-8 bytes per reason) of a digest's summary, tried in turn until the message
fits: first the usual 64 characters, last the bare "…and N more events"."""


TYPE_BYTES = 64
"""UTF-8 bytes of an event type in a digest's header (Kubernetes sets Normal or Warning)."""
TYPES_LISTED = 4
"""Event types counted by name in a digest's header; the rest as "N other"."""


def humanize(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m}m{s:02d}s" if s else f"{m} min"
    h, rem = divmod(s, 3600)
    return f"{h}h{rem // 60:02d}m"


# ------------------------------------------------------------------------------------------- silences

_SILENCE_KEYS = ("reason", "namespace", "kind", "object", "type", "message", "host", "component")


@dataclass(frozen=True)
class Silence:
    """``reason=BackOff,namespace=kube-*,until=2026-12-01T00:00:00Z``: shell-style patterns (all must
    match, ignoring case) and an expiry; ``message`` matches anywhere in the message (glob, e.g.
    ``*probe*``), case as written."""

    matchers: tuple[tuple[str, str], ...]
    until: float
    text: str

    @classmethod
    def parse(cls, spec: object) -> Silence:
        if isinstance(spec, dict):
            items = [(str(k).strip(), str(v).strip()) for k, v in spec.items()]
        elif isinstance(spec, str):
            items = []
            for part in spec.split(","):
                if not part.strip():
                    continue
                key, sep, value = part.partition("=")
                if not sep:
                    raise ValueError(f"silence {spec!r}: {part!r} is not key=pattern")
                items.append((key.strip(), value.strip()))
        else:
            raise ValueError(f"silence must be a string or a mapping, not {type(spec).__name__}")
        until: float | None = None
        matchers: list[tuple[str, str]] = []
        for key, value in items:
            if key == "until":
                until = _parse_until(value)
            elif key in _SILENCE_KEYS:
                matchers.append((key, value))
            else:
                raise ValueError(f"silence key {key!r} is not one of {', '.join(_SILENCE_KEYS)}, until")
        if until is None:
            raise ValueError(f"silence {spec!r} needs an expiry: until=2026-12-01T00:00:00Z")
        if not matchers:
            raise ValueError(f"silence {spec!r} matches nothing: give reason=, namespace=, …")
        text = ",".join(f"{k}={v}" for k, v in matchers) + f",until={_iso(until)}"
        return cls(tuple(matchers), until, text)

    def matches(self, fields: dict[str, str], wall: float) -> bool:
        if wall >= self.until:
            return False
        for key, pattern in self.matchers:
            value = fields.get(key, "")
            if key == "message":
                # Free text, matched as written (as the `message` filter's regex is): ignoring case
                # would silence more than the pattern says, and a silence keeps pages from people.
                if not fnmatch.fnmatchcase(value, pattern if "*" in pattern else f"*{pattern}*"):
                    return False
            elif not _name_glob(pattern).match(value):
                return False
        return True


@functools.lru_cache(maxsize=256)
def _name_glob(pattern: str) -> re.Pattern[str]:
    """A silence's pattern for a name (reason, kind, namespace, …), ignoring case as the sink filters
    do (item 93): `reason=oomkilling` passes OOMKilling through the filter, so it must silence it too."""
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


def _parse_until(value: str) -> float:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"until={value!r} is not an RFC 3339 time such as 2026-12-01T00:00:00Z") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _silences(value: Any) -> Any:
    """``a=1,b=2;c=3`` (URL query: ``;`` between silences) or a list; every entry parsed."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    out: list[Silence] = []
    for item in value:
        if isinstance(item, Silence):
            out.append(item)
        elif isinstance(item, str):
            out.extend(Silence.parse(part) for part in item.split(";") if part.strip())
        else:
            out.append(Silence.parse(item))
    return out


def _plain_list(value: Any) -> Any:
    """A repeated key or YAML list; a single string is one item (labels may contain commas)."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    return value


# -------------------------------------------------------------------------------------------- options

GROUP_FIELDS = ("cluster", "namespace", "kind", "object", "reason", "type", "message", "host", "component")
ENTRY_FIELDS = (*GROUP_FIELDS, "count", "span", "first_time", "last_time")
TITLE_FIELDS = (
    "cluster",
    "label",
    "events",
    "groups",
    "more",
    "reason",
    "namespace",
    "kind",
    "object",
    "count",
)


def check_template(template: str | None, allowed: Iterable[str], option: str) -> str | None:
    if template is None:
        return None
    allowed_set = set(allowed)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed_set:
            raise ValueError(f"{option}: unknown field {{{name}}}; use {', '.join(sorted(allowed_set))}")
        if conversion or (spec and "{" in spec):
            raise ValueError(f"{option}: {{{name}}} may not use conversions or nested fields")
        try:
            format("x", spec or "")  # every value is text: {count:d} fails on every send
        except ValueError as exc:
            raise ValueError(f"{option}: {{{name}:{spec}}}: {exc} (the values are text)") from None
    sample_template(template, allowed_set, option)
    return template


def sample_template(template: str, allowed: Iterable[str], option: str) -> str:
    """``template`` filled with sample text, as a send fills it (every value is a str), so what would
    fail on every send fails at start, naming the option (not the template: it may hold a secret)."""
    try:
        return template.format_map(dict.fromkeys(allowed, "x"))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(f"{option} cannot be filled in: {type(exc).__name__}: {exc}") from None


MENTION_OPTIONS = ("at_mobiles", "at_user_ids", "at_reasons", "at_all", "at_all_reasons")


class AlertOptions(SinkOptions):
    """Options both robots share. Filters (level, namespaces, kinds, reasons, message regex) are the
    engine's common keys; these robots default to Warning events only (``default_filter``)."""

    msg_type: Literal["text", "markdown", "actionCard"] | None = Field(
        None, description="Message type; default markdown (WeCom application API: text)."
    )
    label: Annotated[list[str], BeforeValidator(_plain_list)] = Field(
        default_factory=list,
        validation_alias=AliasChoices("label", "labels"),
        description="kube-eventer `label`: text shown in every message next to the cluster name (repeatable).",
    )
    cluster_id: str = Field("", description="kube-eventer `cluster_id`, shown in every message.")
    region: str = Field("", description="kube-eventer `region`, shown in every message.")
    group_by: StrList = Field(
        default_factory=lambda: ["namespace", "kind", "object", "reason"],
        description=f"Digest group key, any of {', '.join(GROUP_FIELDS)}.",
    )
    window: float = Field(
        300.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds: after a group was notified, its repeats are held and sent as one digest line.",
    )
    rate_per_minute: int = Field(20, ge=1, le=1000, description="Most messages per 60 s to this robot.")
    min_interval: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Seconds between digests (default 60/rate_per_minute): a burst becomes one message.",
    )
    max_send_wait: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description=(
            "Seconds one send may wait for the rate limiter (at most five sixths of send_timeout less "
            "request_timeout)."
        ),
    )
    max_message_bytes: int | None = Field(
        None, ge=1024, description="Largest message; default per robot (docs/alerting.md)."
    )
    excerpt_chars: int = Field(
        300, ge=20, description="Longest event message excerpt in a digest line (cut with a marker)."
    )
    title_template: str | None = Field(
        None, description="Title: {cluster} {reason} {object} {count} {more} …"
    )
    line_template: str | None = Field(None, description="First line of a digest entry: {reason} {count} …")
    time_zone: str = Field("UTC", description="Time zone for times in messages, e.g. Asia/Shanghai.")
    silences: Annotated[list[Silence], BeforeValidator(_silences)] = Field(
        default_factory=list,
        description=(
            "reason=BackOff,namespace=kube-*,until=2026-12-01T00:00:00Z (';' or repeat for more);"
            " ignoring case, except message=."
        ),
    )
    at_mobiles: StrList = Field(default_factory=list, description="Mobiles to @ in every digest.")
    at_user_ids: StrList = Field(default_factory=list, description="User ids to @ in every digest.")
    at_reasons: StrList = Field(
        default_factory=list,
        description="If set, @mobiles/@user ids only when a digest has these reasons (ignoring case).",
    )
    at_all: bool = Field(False, description="@all in every digest.")
    at_all_reasons: StrList = Field(
        default_factory=list,
        description="@all when a digest contains one of these reasons (e.g. OOMKilling; ignoring case).",
    )
    # Not finite, every request raised OverflowError out of send (aiohttp's timer), naming no option.
    request_timeout: float = Field(10.0, gt=0, allow_inf_nan=False, description="Seconds per HTTP request.")
    proxy: Secret | None = Field(
        None,
        description=(
            "HTTP proxy for the robot's requests, http://[user:password@]host:port (the user info goes as "
            "Proxy-Authorization; file: takes a rotated password within seconds)."
        ),
    )
    trust_env: bool = Field(
        False,
        description="Without proxy: use HTTPS_PROXY / HTTP_PROXY / NO_PROXY of the environment (and ~/.netrc).",
    )
    throttle_backoff: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds to pause after a 'send too fast' answer (doubles up to 600).",
    )
    # Bounds the repeats held for a window; a new or due group may use a tenth more (``_full``).
    max_pending: int = Field(10_000, ge=1, description="Most occurrences held for digests at once.")

    def mention_options(self, names: Iterable[str] = MENTION_OPTIONS) -> list[str]:
        """Of ``names``, the mention options given (for refusing those a message type cannot apply)."""
        return [name for name in names if getattr(self, name)]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value:  # empty: the robot's or API's default address
            http_url(value)
        return value

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # `proxy=` (empty): none
        parts = http_url(value.get_secret_value(), option="proxy", address_only=True)
        if ":" in unquote(parts.username or ""):
            raise ValueError("proxy: the user name cannot contain ':' (Basic authentication)")
        return value

    @field_validator("group_by")
    @classmethod
    def _group_by(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in GROUP_FIELDS]
        if bad:
            raise ValueError(f"unknown group_by field(s) {bad}; use {', '.join(GROUP_FIELDS)}")
        if not value:
            raise ValueError("group_by needs at least one field")
        return value

    @field_validator("time_zone")
    @classmethod
    def _tz(cls, value: str) -> str:
        if value.upper() != "UTC":
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                # OSError: a folder of the zone database (`Europe`) was opened as a zone, a traceback.
                raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("title_template")
    @classmethod
    def _title(cls, value: str | None) -> str | None:
        return check_template(value, TITLE_FIELDS, "title_template")

    @field_validator("line_template")
    @classmethod
    def _line(cls, value: str | None) -> str | None:
        return check_template(value, ENTRY_FIELDS, "line_template")


# ----------------------------------------------------------------------------------------- the pool


def _fields(occ: Occurrence) -> dict[str, str]:
    r = occ.record
    inv = r.get("involved_object") or {}
    return {
        "cluster": text_clean(r.get("cluster")),
        "namespace": text_clean(r.get("namespace") or inv.get("namespace")),
        "kind": text_clean(inv.get("kind")),
        "object": text_clean(inv.get("name")),
        "reason": text_clean(r.get("reason")),
        "type": text_clean(r.get("type")),
        "message": text_clean(r.get("message")),
        "host": text_clean(r.get("source_host") or r.get("reporting_instance")),
        "component": text_clean(r.get("reporting_component")),
    }


@dataclass(eq=False)
class Group:
    """Compared by identity (``eq=False``): ``g in due`` compared every field of every group, and a
    send with 10,000 groups due spent seconds of the router's one event loop on it."""

    key: tuple[str, ...]
    pending: OrderedDict[str, Occurrence] = field(default_factory=OrderedDict)
    last_notified: float | None = None
    version: int = 0
    """Bumped whenever ``pending`` changes: a view made of an older version is stale."""
    view: GroupView | None = None
    """The group's digest line as last made, with what was measured of it (``_views``); None once
    ``pending`` changed. Kept stale, it held every paged occurrence (and its line) for a window
    after a storm: 50,000 of them, 159 MB."""

    def add(self, occ: Occurrence) -> None:
        self.pending[occ.key] = occ
        self.version += 1
        self.view = None

    def drop(self, key: str) -> None:
        if self.pending.pop(key, None) is not None:
            self.version += 1
            self.view = None


@dataclass(eq=False)
class GroupView:
    """One digest line: the pending occurrences of one group."""

    group: Group
    occurrences: list[Occurrence]
    fields: dict[str, str]
    first_ns: int
    last_ns: int
    messages: int
    new: bool
    version: int = 0
    """The group's ``version`` this view was made of."""
    line: str | None = None
    """The line at the configured ``excerpt_chars`` (made once: a failing robot made every line again
    at every send)."""
    room: int | None = None
    """Bytes the line takes in a message, at least (``max_bytes`` when it fits only shortened, alone;
    0 when not even that: only a count); None until measured."""
    countable: bool | None = None
    """Whether it fits a message as a bare count; None until measured."""

    @property
    def keys(self) -> list[str]:
        return [o.key for o in self.occurrences]

    @property
    def stale(self) -> bool:
        """Its group's pending changed since it was made (``given_up`` while a send yielded)."""
        return self.version != self.group.version

    @property
    def count(self) -> int:
        return len(self.occurrences)


@dataclass
class Tally:
    """What a digest's header, summary and mentions need of its views, summed once: a message that
    summarises 10,000 groups is composed a few dozen times while it is packed."""

    events: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    """Occurrences per reason (one line)."""
    clusters: Counter[str] = field(default_factory=Counter)
    """Views per cluster named in a record (not empty)."""
    types: Counter[str] = field(default_factory=Counter)
    """Occurrences per event type as the header shows it."""

    @classmethod
    def of(cls, views: Iterable[GroupView]) -> Tally:
        tally = cls()
        for v in views:
            tally.events += v.count
            tally.reasons[one_line(v.fields["reason"])] += v.count
            if v.fields["cluster"]:
                tally.clusters[v.fields["cluster"]] += 1
            # The type is free text (legacy core/v1 Events): cut, so no type makes a header too long.
            tally.types[_cut_bytes(one_line(v.fields["type"]), TYPE_BYTES) or "Normal"] += v.count
        return tally

    def __sub__(self, other: Tally) -> Tally:
        """This tally without ``other``'s views (which it holds)."""
        return Tally(
            self.events - other.events,
            self.reasons - other.reasons,
            self.clusters - other.clusters,
            self.types - other.types,
        )


@dataclass(eq=False)
class Digest:
    """One message: some lines, and maybe a summary of the lines that did not fit."""

    views: list[GroupView]
    summarised: list[GroupView]
    totals: tuple[Tally, Tally] | None = None
    """(of the views and the summarised, of the summarised) when the packer has them summed."""

    @functools.cached_property
    def whole(self) -> Tally:
        return self.totals[0] if self.totals is not None else Tally.of(self.views + self.summarised)

    @functools.cached_property
    def rest(self) -> Tally:
        return self.totals[1] if self.totals is not None else Tally.of(self.summarised)

    @property
    def events(self) -> int:
        return self.whole.events

    @property
    def reasons(self) -> set[str]:
        return set(self.whole.reasons)


def _candidate(views: list[GroupView], tally: Tally, lines: int, summarise: bool) -> Digest:
    """The first ``lines`` of ``views`` (whose tally is ``tally``) as lines, and the others summarised
    when ``summarise``."""
    if not summarise:
        return Digest(views[:lines], [])
    return Digest(views[:lines], views[lines:], (tally, tally - Tally.of(views[:lines])))


# --------------------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class Delivery:
    """What the robot said about one message."""

    kind: Literal["ok", "retry", "reject"]
    reason: str = ""
    retry_after: float | None = None
    too_fast: bool = False
    cause: str = ""
    """For rejections: what to log once (same cause, one log line); for a refusal by a gateway or
    proxy (``http 407``), which run of refusals it belongs to."""
    refused: bool = False
    """A retry because the robot, or a gateway or proxy in front of it, refused our credentials
    (token, key, signature, proxy password), not the message: being rotated (the robot first, then
    the pod's Secret) or wrong. Warned of once per run."""
    redirected: bool = False
    """A retry because something in front of the robot answered with a redirect (not followed): the
    robot never saw the message. Warned of once per run, as a refusal is."""
    held: bool = False
    """A retry that is no failure (not an attempt towards ``retry_max_attempts``)."""
    unsent: bool = False
    """No message reached the robot (``out_of_time``): not one of its messages a minute."""


REFUSED_STATUSES = (401, 403, 407)
"""HTTP statuses of something between us and the robot refusing the request: a gateway's 401/403
(credentials in the URL's user info, a policy), a proxy's 407 (its credentials). The robots
themselves answer 200 with an errcode, so the robot never saw the message."""


def _shown_location(location: str | None) -> str:
    """Where a redirect points, as reasons and logs may show it (``_scrub.shown_location``; the sink
    scrubs its own credentials out first, ``AlertSink.http_failure``)."""
    if not location:
        return "nowhere (no Location)"
    try:
        return shown_location(location)
    except ValueError:
        return "an unparseable Location"


def http_failure(
    who: str,
    status: int,
    retry_after: float | None = None,
    location: str | None = None,
    *,
    advice: str = "",
) -> Delivery:
    """A status other than 200: not the robot API's answer (it answers 200 with an errcode) but a
    gateway's or a proxy's. 408, 425, 429 and 5xx may pass later; so may a refusal (401, 403, 407:
    credentials being rotated, a policy), retried as the robots' own refusals of the sender are
    (``refused``; ``advice`` says what to check). A redirect is never followed (a 301/302 would turn
    the POST into a body-less GET, a 307/308 send the message and the token wherever it points), and
    is retried (``redirected``), saying where it points (without credentials). Another status (a
    wrong URL's 404) does not pass until someone acts: dead-lettered, logged once per status."""
    reason = f"{who} answered HTTP {status}"
    if status in (408, 425, 429) or status >= 500:
        return Delivery("retry", reason, retry_after=retry_after)
    if status in REFUSED_STATUSES:
        # Dead-lettered, every alert of a proxy's or gateway's credential rotation was lost (item 118
        # retried the robots' own refusals). A failure, not a hold: retry_max_attempts still applies.
        if status == 407:
            said = f"{reason}: a proxy refused our request (Proxy Authentication Required)"
        else:
            said = (
                f"{reason}, not the robot's own answer (it refuses with HTTP 200 and an errcode): "
                "a gateway or proxy in front of it refused our request"
            )
        return Delivery(
            "retry",
            f"{said}: {advice}" if advice else said,
            retry_after=retry_after,
            refused=True,
            cause=f"http {status}",
        )
    if 300 <= status < 400:
        # About the URL, not the alert (an egress gateway switched to https, or moved). Dead-
        # lettered, every alert of that time went unpaged: retried, as the webhook, Loki and
        # Elasticsearch do. A failure, not a hold: retry_max_attempts still ends a lasting one.
        return Delivery(
            "retry",
            f"{reason}: redirect to {_shown_location(location)} not followed: "
            "set the robot's URL to where it should go",
            retry_after=retry_after,
            cause=f"http {status}",
            redirected=True,
        )
    return Delivery(
        "reject", f"{reason}, not the API's own answer: check the URL and any proxy", cause=f"http {status}"
    )


def unread_reply(who: str, why: str) -> Delivery:
    """A message answered HTTP 200 whose reply could not be read (``why``: stalled, cut off, not in
    its Content-Encoding): the robot had the message, and whether it paged is unknown. Retried, as an
    answer lost is (at least once), and said so: "unreachable" sent an on-call who saw two pages
    looking for a network fault."""
    return Delivery(
        "retry",
        f"{who} answered HTTP 200 but its reply could not be read ({why}): the alert may have been "
        "paged; sent again, so it may page twice",
    )


def _basic(url: str) -> str:
    """The Basic token aiohttp makes of ``url``'s user info ('' without): it sends it as
    Proxy-Authorization, and an error may quote the request's headers."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return ""
    pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return base64.b64encode(pair.encode("utf-8")).decode("ascii")


_LOG_REFUSED_EVERY = 600.0
"""Seconds between two warnings about refused credentials (the first at once), as the webhook's."""

RATE_FILE = "robot-rate.json"
"""In the sink's data dir: the sends of the robot's last minute and the end of a pause, in wall-clock
seconds (``AlertSink._save_rate``)."""

WARM_UP = 60.0
"""Seconds after start in which a flush sends one message, at least 60/rate_per_minute apart."""

_CLOCK_SLACK = 0.01
"""Seconds added to each time read from ``RATE_FILE``."""
_MAX_THROTTLE = 600.0
"""Seconds: the longest pause a "too fast" answer doubles to (DingTalk throttles for 10 minutes)."""
_AHEAD_SLACK = 60.0
"""Seconds a saved time may be ahead of this clock (hosts' skew) before it is a bad clock's."""


def _finite(value: object) -> float:
    """A saved time: a finite number (``float("inf")`` and "nan" parse, and paused for ever)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


_CHUNK = 256
"""Groups (or occurrences) handled between two turns given to the event loop in a large send."""

OptionsT = TypeVar("OptionsT", bound=AlertOptions)


@dataclass(eq=False)
class SharedRobot:
    """One robot's minute in this process: the limiter of every started sink entry addressing it.

    Two entries for one robot (warnings of two teams into one group, split by namespace or mention
    rules) each paced at the robot's whole limit: together 40 messages a minute, DingTalk answered
    the 21st with 130101 and throttled the robot 10 minutes, new problems paged 420 s late."""

    limiter: RateLimiter
    members: weakref.WeakSet[AlertSink[Any]] = field(default_factory=weakref.WeakSet)
    """Started instances using it; weak, so an instance dropped unclosed does not hold it."""
    loaded: set[Path] = field(default_factory=set)
    """Rate files merged into the limiter (a rebuilt instance's is its predecessor's: not again)."""

    def paths(self) -> dict[Path, AlertSink[Any]]:
        """Each member's rate file, once (a rebuilt instance shares its predecessor's)."""
        return {path: m for m in list(self.members) if (path := m._rate_path()) is not None}

    def pace(self) -> None:
        """The strictest member's ``rate_per_minute``: the robot's limit is the same for all."""
        rates = [m.options.rate_per_minute for m in list(self.members)]
        if rates:
            self.limiter.limit = min(rates)


_ROBOTS: dict[tuple[object, ...], SharedRobot] = {}
"""Per robot (``AlertSink._key``), the minute its sink entries share in this process."""


def robot_address(url: str) -> str:
    """Where ``url`` points, for a robot's identity: without its query (a token goes there) and a
    trailing slash."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


class AlertSink(Sink[OptionsT]):
    """Digesting, rate-limited robot sink; subclasses turn a ``Digest`` into a request and an answer."""

    default_filter: ClassVar[dict[str, str]] = {"level": "Warning"}
    """Used by the engine when the user gives no level/type filter: robots page on Warnings."""

    defer_retries: ClassVar[bool] = True
    """Held occurrences come back as RETRY with their digest's due time; the engine sets them aside
    and keeps sending new batches, so a new problem pages at once."""

    robot: ClassVar[str] = "robot"
    default_max_bytes: ClassVar[int] = 4096
    hard_max_bytes: ClassVar[int] = 4096

    def __init__(self, options: OptionsT, context: SinkContext, *, clock: Clock | None = None) -> None:
        super().__init__(options, context)
        self.clock: Clock = clock or SystemClock()
        self.limiter = RateLimiter(options.rate_per_minute, 60.0, self.clock)
        """This robot's minute: shared with the process's other entries for it once started."""
        self._shared: SharedRobot | None = None
        self._robot_key: tuple[object, ...] | None = None
        self._groups: dict[tuple[str, ...], Group] = {}
        self._pending_of: dict[str, Group] = {}
        self._done: OrderedDict[str, tuple[Outcome, float]] = OrderedDict()
        self._logged: set[str] = set()
        self._tz: tzinfo = UTC if options.time_zone.upper() == "UTC" else ZoneInfo(options.time_zone)
        self._session: aiohttp.ClientSession | None = None
        self._last_failure = ""
        self._failure_retry_after: float | None = None
        self._failure_held = False
        self._throttle = options.throttle_backoff
        self._last_flush: float | None = None
        self._started: float | None = None
        """When ``start`` ran (``WARM_UP``); None before."""
        self._rate_loaded = False
        self._save_log = Throttled(self.log, _LOG_REFUSED_EVERY)
        self._excerpt = options.excerpt_chars
        self._refused_log = Throttled(self.log, _LOG_REFUSED_EVERY)
        # The last answer refused our credentials or was a redirect (warned): an OK ends that run.
        self._refusing = False
        self.sent_messages = 0
        """Messages the robot accepted (errcode 0)."""
        self._proxy = options.proxy.get_secret_value() if options.proxy is not None else None
        proxies = [self._proxy] if self._proxy else []
        if options.trust_env and not proxies:
            proxies = list(getproxies().values())
        self.proxy_secrets = credentials(urls=proxies) + [_basic(url) for url in proxies if _basic(url)]
        """The proxy's user name and password (and their Basic token), for ``redact``: aiohttp's
        error for a refused tunnel quotes the proxy's URL with them."""

    # --------------------------------------------------------------- subclass hooks

    @property
    def max_bytes(self) -> int:
        return min(self.options.max_message_bytes or self.default_max_bytes, self.hard_max_bytes)

    @property
    def markdown(self) -> bool:
        return self.msg_type != "text"

    @property
    def msg_type(self) -> str:
        return self.options.msg_type or "markdown"

    def measure(self, text: str) -> int:
        """Bytes ``text`` adds to a message (a robot sending JSON may count escapes)."""
        return len(text.encode("utf-8"))

    def payload_size(self, title: str, text: str, digest: Digest) -> int:
        """The size the robot checks against its limit, for the finished message."""
        return self.measure(text)

    async def deliver(self, title: str, text: str, digest: Digest, *, until: float) -> Delivery:
        """Send one message. ``until`` (``clock.now()`` time) is when the send's budget ends: a
        delivery that takes more than one request starts no further one that could end after it
        (``out_of_time``), or the engine cuts the send off and pages again what the robot took."""
        raise NotImplementedError

    async def prepare(self) -> Delivery | None:
        """Work of a send before it waits for the rate limiter (WeCom's application API: renew an
        access token near its end, rather than between that wait and the message). None when it made
        no request; else its result (``ok``, or why nothing can be sent now: a retry)."""
        return None

    def out_of_time(self, what: str) -> Delivery:
        """What ``deliver`` answers when the send's budget has no room for its next request: no
        failure (held), and no message the robot counted."""
        return Delivery(
            "retry",
            f"{what} would end after the send's budget (send_timeout): sent with the next send",
            held=True,
            unsent=True,
        )

    def redact(self, text: str) -> str:
        """Remove every secret this sink knows from ``text`` (exception messages may carry URLs)."""
        return text

    def robot_identity(self) -> tuple[str, tuple[str, ...]] | None:
        """(what names the robot, for logs: "URL and access_token"; the values that do) when sink
        entries with the same values address one robot and share its minute; None: no sharing."""
        return None

    # --------------------------------------------------------------- lifecycle

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.options.request_timeout),
                raise_for_status=False,
                trust_env=self.options.trust_env,
            )
        return self._session

    def request_options(self) -> dict[str, Any]:
        """Keyword arguments of every request: the ``proxy`` with its user info, which aiohttp sends
        as Proxy-Authorization to the proxy (with a plain-http robot's request, or in the CONNECT to
        an https one; ``proxy_headers`` would go only into a CONNECT). Per request, not to the
        session: older aiohttp versions take it only there."""
        return {"proxy": self._proxy} if self._proxy else {}

    async def read_reply(self, resp: aiohttp.ClientResponse, limit: int) -> Excerpt:
        """The start of a 200's reply, its JSON (of a status no other reply is read: the status alone
        says what it is). The reply is the outcome (sent, throttled, refused), so it gets the request's
        own timeout, not ``EXCERPT_WAIT`` (body_prefix's rule): cut at 2 s, a reply in by 2.5 s was
        taken as unread and the alert sent (and paged) again. The session's total timeout
        (``request_timeout``, begun before the head) ends a reply that stalls."""
        return await excerpt(resp, limit, None)

    def refusal_advice(self, status: int) -> str:
        """What to check when a gateway or proxy in front of the robot refused a request (401, 403,
        407): the options involved by name, never their values."""
        o = self.options
        proxy = urlsplit(self._proxy) if self._proxy else None
        if status == 407:
            if proxy is not None and (proxy.username or proxy.password):
                return (
                    "check the user name and password in proxy (a rotated file: one is taken within seconds)"
                )
            if proxy is not None:
                return "proxy has no user name and password, and the proxy wants some"
            if o.trust_env:
                return "check the user name and password of the environment's HTTPS_PROXY / HTTP_PROXY"
            return "no proxy is configured (proxy, trust_env), yet one in between wants credentials"
        if urlsplit(o.url).username is not None:
            return (
                "check the user name and password in url, and the policy of the gateway or proxy in between"
            )
        return "url has no user name and password for it (it may want some), or its policy refuses us"

    def http_failure(
        self, who: str, status: int, retry_after: float | None = None, location: str | None = None
    ) -> Delivery:
        """``http_failure`` with what to check for a refusal, from this sink's options, and a
        redirect's ``Location`` without our credentials (a gateway may put the token in its path)."""
        advice = self.refusal_advice(status) if status in REFUSED_STATUSES else ""
        if location:
            location = self.redact(location)
        return http_failure(who, status, retry_after, location, advice=advice)

    async def start(self) -> None:
        self.context.warn_if_outlasting(self.options.request_timeout, "request_timeout")
        self.session()
        self._started = self.clock.now()
        if self._shared is None:
            self._join()
        if not self._rate_loaded:
            # Once per instance: the engine retries a failed start on the same instance, and each
            # load added the saved minute again (three starts: the robot's 7 messages counted 21).
            # Once per file for the robot: a rebuilt instance's file is the one its predecessor
            # read, and has been written from this limiter since.
            self._rate_loaded = True
            path = self._rate_path()
            if path is not None and path not in self._joined.loaded:
                self._joined.loaded.add(path)
                self._load_rate()
        now = self.clock.wall()
        for s in self.options.silences:
            if s.until <= now:
                self.log.warning(
                    "%s: silence %s has already expired; it has no effect", self.context.name, s.text
                )

    def probe_url(self) -> str | None:
        """The address ``eventrouter check`` probes, without query (no token leaves in it); None when
        ``start()`` already reached the destination. It may carry user info (a gateway's password):
        shown only through ``redact_url``."""
        parts = urlsplit(self.options.url)
        return urlunsplit(parts._replace(query="", fragment=""))

    async def check(self) -> None:
        """Start, then probe the robot's address with HEAD: any HTTP answer (a robot endpoint says 405)
        proves it is reachable. No message is sent, so the token itself is proven only by the first
        digest (its errcode is logged and counted)."""
        await self.start()
        url = self.probe_url()
        if url is None:
            return
        shown = redact_url(url)
        location: str | None = None
        try:
            async with self.session().head(url, allow_redirects=False, **self.request_options()) as resp:
                status = resp.status
                location = resp.headers.get("Location")
                self.log.info("%s: %s answered HEAD with %d", self.context.name, shown, status)
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the tunnel to an https robot
            status = exc.status
            if status not in REFUSED_STATUSES:
                raise SinkError(
                    f"{self.context.name}: cannot reach {shown}: the proxy answered HTTP {status} to CONNECT"
                ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = self.redact(f"{type(exc).__name__}: {exc}")
            raise SinkError(f"{self.context.name}: cannot reach {shown}: {reason}") from None
        if 300 <= status < 400:
            # Every alert would meet it too (never followed, retried until retry_max_attempts):
            # said now, as Loki's and Elasticsearch's start do, not at the first page that fails.
            raise SinkError(
                f"{self.context.name}: {shown} answered HEAD with {status}, a redirect to "
                f"{_shown_location(self.redact(location or ''))}, which the sink does not follow: "
                "set the robot's URL to where it points"
            )
        if status not in REFUSED_STATUSES:
            return
        refused = self.http_failure(shown, status).reason
        # A proxy wants its credentials for every method, and so does a gateway refusing the
        # credentials in the URL: every alert would be refused. Without credentials of ours a 401/403
        # may be the gateway's answer to HEAD alone (no route for it): said, not failed.
        if status == 407 or urlsplit(self.options.url).username is not None:
            raise SinkError(f"{self.context.name}: {refused}")
        self.log.warning(
            "%s: %s (to HEAD: if to POST too, every alert will wait)", self.context.name, refused
        )

    def take_over(self, previous: Sink[OptionsT]) -> None:
        """Digests being collected, the record of what was already sent (so that the engine's
        re-sends of those occurrences are answered OK, not paged twice) and the rate limit's
        history carry over a credential change. Which refusals were logged does not: the same
        refusal with the new credential is news."""
        if isinstance(previous, AlertSink):
            if previous.limiter is not self.limiter:
                # Started, this instance rejoined its robot's limiter (the same one, unless the
                # token changed: a webhook reset, the same robot); before its start, it joins
                # with what it holds. Merged, each send once: never a budget reset.
                self.limiter.merge(*previous.limiter.history())
            self._groups = previous._groups
            self._pending_of = previous._pending_of
            self._done = previous._done
            self._last_flush = previous._last_flush
            self._started = previous._started  # the same process: its history is all known
            # What the file said is in the limiter only if the previous instance read it: one
            # replaced before its start never did, and this one's start reads it then.
            self._rate_loaded = self._rate_loaded or previous._rate_loaded
            self.sent_messages = previous.sent_messages
            for group in self._groups.values():
                group.view = None  # made with the previous instance's options

    async def aclose(self) -> None:
        self._leave()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # --------------------------------------------------------------- the robot's minute

    # Sink entries addressing one robot share one limiter (``SharedRobot``): joined at start (a
    # rebuilt instance starts while its predecessor stands, so the robot's minute is never reset),
    # left at close. Each entry's rate file holds the robot's whole minute (each save writes them
    # all); at start each file is merged once, a send in two files counted once.

    def _key(self) -> tuple[object, ...] | None:
        identity = self.robot_identity()
        if identity is None:
            return None
        # Hashed: the token is in no key a debugger or a dump could show.
        digest = hashlib.sha256("\0".join(identity[1]).encode("utf-8")).hexdigest()
        # Times of one clock only (a test's simulated clock is not the system's).
        domain: object = "system" if isinstance(self.clock, SystemClock) else self.clock
        return (self.robot, digest, domain)

    @property
    def _joined(self) -> SharedRobot:
        assert self._shared is not None, "joined at start"
        return self._shared

    def _join(self) -> None:
        key = self._key()
        shared = _ROBOTS.get(key) if key is not None else None
        if shared is None or not shared.members:
            shared = SharedRobot(RateLimiter(self.options.rate_per_minute, 60.0, self.clock))
            if key is not None:
                _ROBOTS[key] = shared
        others = sorted({m.context.name for m in list(shared.members)} - {self.context.name})
        shared.limiter.merge(*self.limiter.history())  # what was taken over before this start
        shared.members.add(self)
        shared.pace()
        self._shared, self._robot_key, self.limiter = shared, key, shared.limiter
        identity = self.robot_identity()
        if others and identity is not None:
            self.log.info(
                "%s: sinks %s and %s send to the same %s (the same %s): they share its %d messages a "
                "minute (the lowest rate_per_minute of theirs); each one's %s holds the robot's minute",
                self.context.name,
                ", ".join(others),
                self.context.name,
                self.robot,
                identity[0],
                shared.limiter.limit,
                RATE_FILE,
            )

    def _leave(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        shared.members.discard(self)
        if shared.members:
            shared.pace()
        elif self._robot_key is not None and _ROBOTS.get(self._robot_key) is shared:
            del _ROBOTS[self._robot_key]

    # The robot counts the messages of its last minute whoever sent them. A router restarted in a
    # storm (a rolling update, an OOM kill, a leader hand-over) started with an empty minute, sent
    # at once, and DingTalk answered 130101 and throttled the robot for 10 minutes: not even a new
    # problem was paged meanwhile. The limiter's minute is kept in the data dir (wall-clock times:
    # another process's monotonic clock means nothing here), written as each answer is counted,
    # and read at start. For a predecessor with another data dir (the standby of a hand-over) the
    # first minute is paced (``WARM_UP``).

    def _rate_path(self) -> Path | None:
        folder = self.context.data_dir
        return folder / RATE_FILE if folder is not None else None

    def _load_rate(self) -> None:
        path = self._rate_path()
        if path is None:
            return
        try:
            saved = orjson.loads(path.read_bytes())
            sent = [_finite(t) for t in saved["sent"]]
            paused = _finite(saved["paused_until"])
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.log.warning(
                "%s: cannot read %s (%s): the robot's last minute is not known; the first minute is paced",
                self.context.name,
                path,
                exc.strerror if isinstance(exc, OSError) else type(exc).__name__,
            )
            return
        now, wall = self.clock.now(), self.clock.wall()
        # A time a little ahead of this clock (stepped back, or another host's) counts as now; each a
        # little later than written (the two clocks are read apart, the file keeps milliseconds),
        # never earlier than the robot counted it. One far ahead is a writer's bad clock: ignored.
        ahead = [t for t in sent if t - wall > _AHEAD_SLACK]
        recent = [
            now - max(0.0, wall - t) + _CLOCK_SLACK
            for t in sent
            if wall - t < self.limiter.period and t - wall <= _AHEAD_SLACK
        ]
        # The sink never writes a pause longer than its throttle backoff (600 s at most, as
        # DingTalk's own): one longer (a writer's clock ahead, a hand edit) held every alert, new
        # problems too, for hours or for ever, with nothing logged.
        most = max(_MAX_THROTTLE, self.options.throttle_backoff)
        pause = min(paused - wall, most)
        odd = [f"{len(ahead)} sends, the latest {humanize(max(ahead) - wall)} ahead"] if ahead else []
        if paused - wall > most + _AHEAD_SLACK:
            odd.append(f"a pause until {humanize(paused - wall)} from now")
        if odd:
            self.log.warning(
                "%s: %s holds times out of range (%s); written by a clock that was ahead? "
                "Sends ahead are ignored, a pause is kept at most %s",
                self.context.name,
                path,
                "; ".join(odd),
                humanize(most),
            )
        self.limiter.merge(recent, now + pause + _CLOCK_SLACK if pause > 0 else 0.0)
        if recent:  # the predecessor's pacing too
            last = max(recent)
            self._last_flush = last if self._last_flush is None else max(self._last_flush, last)

    def _save_rate(self) -> None:
        """The robot's minute into the rate file of every entry sharing it, so that each file alone
        holds it (the others' sends and pauses too): after a restart that drops an entry from the
        configuration, the robot's minute is still known."""
        writers = self._shared.paths() if self._shared is not None else {}
        if not writers and (own := self._rate_path()) is not None:
            writers = {own: self}
        if not writers:
            return
        sent, paused = self.limiter.history()
        now, wall = self.clock.now(), self.clock.wall()
        saved = orjson.dumps(
            {
                "sent": [math.ceil((wall - (now - t)) * 1000) / 1000 for t in sent],
                "paused_until": math.ceil((wall + paused - now) * 1000) / 1000 if paused > now else 0,
            }
        )
        for path, member in writers.items():
            member._write_rate(path, saved)

    def _write_rate(self, path: Path, saved: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(saved)
            os.replace(tmp, path)  # never half a file
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._save_log.warning(
                "save",
                "%s: cannot write %s (%s): after a restart the robot's last minute is not known "
                "(the first minute is paced)",
                self.context.name,
                path,
                exc.strerror or exc,
            )

    def _warming(self, now: float) -> bool:
        """In the first minute after start: a predecessor this process cannot know of (another pod,
        another data dir) may have used the robot's minute."""
        return self._started is not None and now - self._started < WARM_UP

    def _budget(self, now: float) -> int:
        """Messages this flush may send: one in the first minute (a predecessor's last minute plus a
        burst of three got DingTalk's throttle), else up to 3, keeping budget for alerts to come."""
        if self._warming(now):
            return 1
        return max(1, min(3, self.limiter.free() // 2))

    # --------------------------------------------------------------- send

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        now = self.clock.now()
        self._expire(now)
        self._last_failure = ""
        self._failure_retry_after = None
        self._failure_held = False
        early: list[Outcome | None] = [None] * len(batch)
        wall = self.clock.wall()
        for i, occ in enumerate(batch):
            if i % _CHUNK == _CHUNK - 1:
                await asyncio.sleep(0)  # a large batch: the router's other work goes on meanwhile
            key = occ.key
            if key in self._done or key in self._pending_of:
                continue
            try:
                fields = _fields(occ)
            except Exception as exc:  # a malformed record must not sink the batch
                early[i] = reject(f"cannot read the event for a digest: {exc!r}")
                continue
            silence = next((s for s in self.options.silences if s.matches(fields, wall)), None)
            if silence is not None:
                early[i] = reject(f"silenced by {silence.text}")
                continue
            gkey = tuple(fields[f] for f in self.options.group_by)
            group = self._groups.get(gkey)
            full = self._full(group, now)
            if full is not None:
                early[i] = full
                continue
            if group is None:
                group = self._groups[gkey] = Group(gkey)
            group.add(occ)
            self._pending_of[key] = group
        await self._flush(now, {occ.key for occ in batch})
        out: list[Outcome] = []
        now = self.clock.now()
        # One answer per key: a second copy in the batch (a spool copy beside a relist copy) found
        # the first one's answer already taken from ``_done`` and was told "sending again": paged twice.
        answers: dict[str, Outcome] = {}
        for i, occ in enumerate(batch):
            first = early[i]
            if first is not None:
                out.append(first)
                continue
            answer = answers.get(occ.key)
            if answer is None:
                done = self._done.pop(occ.key, None)
                answer = done[0] if done is not None else self._waiting(occ.key, now)
                answers[occ.key] = answer
            out.append(answer)
        return out

    def _full(self, group: Group | None, now: float) -> Outcome | None:
        """Why the pool takes no more of ``group`` now, or None. ``max_pending`` bounds the repeats
        held for a window; a new or due group goes out in this send, so it may use a reserve above
        that (a tenth): a pool full of held repeats held a new problem back until their windows
        ended (300 s). The reserve fills only while the robot takes nothing."""
        pending = len(self._pending_of)
        limit = self.options.max_pending
        if pending < limit:
            return None
        due = now if group is None else self._due_at(group, now)
        if due <= now and pending < limit + max(1, limit // 10):
            return None
        wait = max(5.0, due - now)  # a held group's repeat is not wanted before its window ends
        return retry(f"{limit} occurrences already wait for digests", retry_after=wait, held=True)

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        """The engine dead-lettered or dropped these: out of the pool, or a later digest paged them
        while the dead-letter file and the metrics said they were not delivered (and a replay of
        that file paged them again)."""
        for occ in occurrences:
            key = occ.key
            self._done.pop(key, None)
            group = self._pending_of.pop(key, None)
            if group is not None:
                group.drop(key)

    def _waiting(self, key: str, now: float) -> Outcome:
        group = self._pending_of.get(key)
        if group is None:  # pragma: no cover - every pooled key is pending or done
            return retry("digest state lost; sending again")
        due = self._due_at(group, now)
        if due > now:
            return retry(
                f"held for the digest of {'/'.join(group.key)} (window {humanize(self.options.window)})",
                retry_after=due - now,
                held=True,  # no failure: not an attempt towards retry_max_attempts
            )
        if self._last_failure:
            return retry(self._last_failure, retry_after=self._failure_retry_after, held=self._failure_held)
        wait = max(self.limiter.wait_time(), self._spacing_wait(now))
        return retry(
            f"waiting for the {self.robot} rate limit ({self._pace()})",
            retry_after=max(wait, 0.1),
            held=True,
        )

    def _pace(self) -> str:
        """The pace the robot is sent at: an entry sharing it with a stricter one said its own rate,
        and the operator looked for why that was never reached."""
        limit = self.limiter.limit
        said = f"{limit} messages a minute"
        if self._shared is None or limit >= self.options.rate_per_minute:
            return said
        others = sorted({m.context.name for m in list(self._shared.members)} - {self.context.name})
        if not others:  # its own replacement's, a reload having lowered it
            return said
        return f"{said}, shared with {', '.join(others)}: the lowest rate_per_minute of theirs"

    def _due_at(self, group: Group, now: float) -> float:
        if group.last_notified is None:
            return now
        return group.last_notified + self.options.window

    def _expire(self, now: float) -> None:
        """Forget groups idle past their window and answers the engine never came back for."""
        stale = [
            k
            for k, g in self._groups.items()
            if not g.pending and (g.last_notified is None or now - g.last_notified >= self.options.window)
        ]
        for k in stale:
            del self._groups[k]
        ttl = max(3600.0, 4 * self.options.window)
        while self._done:
            key, (_, at) = next(iter(self._done.items()))
            if now - at < ttl and len(self._done) <= 100_000:
                break
            del self._done[key]

    def _spacing_wait(self, now: float) -> float:
        interval = self.options.min_interval
        pace = 60.0 / self.options.rate_per_minute
        if interval is None:
            interval = pace
        wait = max(0.0, self._last_flush + interval - now) if self._last_flush is not None else 0.0
        if self._warming(now):
            # In the first minute the robot's own pace after each message it counted (a predecessor's
            # too, when the data dir has them): a predecessor's last minute and this one's first then
            # add up to about one message more than the robot allows, not three.
            last = self.limiter.last()
            if last is not None:
                wait = max(wait, last + pace - now)
        return wait

    async def _flush(self, start: float, offered: set[str]) -> None:
        """Send what is due, in rounds (groups come due while a send goes on), within the send's
        budget: a request of the send other than its first starts only if it can end within
        ``send_budget``, and the limiter is waited for at most ``max_send_wait`` (both from
        ``start``). Past that the engine cuts the send off and sends the batch again whole: a
        message the robot took would be paged twice."""
        options, budget = self.options, self.context.send_budget
        until = start + budget
        latest = start + max(0.0, budget - options.request_timeout)  # the last start of a request
        deadline = min(start + options.max_send_wait, latest)  # of waiting for the limiter
        grace = options.window / 10
        first = True  # no request of this send yet: the first always goes (no progress otherwise)
        prepared = False
        while True:
            now = self.clock.now()
            due = [g for g in self._groups.values() if g.pending and self._due_at(g, now) <= now]
            if not due:
                return
            if not prepared:
                prepared = True
                made = await self.prepare()
                if made is not None:
                    first = False
                    if made.kind != "ok":
                        self._failed(made)
                        return
                    continue  # that took time: what is due, and the wait, anew
            wait = max(self.limiter.wait_time(), self._spacing_wait(now))
            if wait > 0:
                if now + wait > deadline:
                    return
                await self.clock.sleep(wait)
                continue
            if not first and now > latest:
                return  # the next round's first message would end past the budget (item 115)
            # A message goes out anyway: groups whose window ends within a tenth of it ride along,
            # but only those the engine offers whole in this batch. One it set aside (answered
            # "held" earlier) would be paged while the engine still holds it: a stop before it comes
            # back spools it, and the next start pages it again (its OK is only in this memory).
            chosen = set(due)
            due += [
                g
                for g in self._groups.values()
                if g.pending
                and g not in chosen
                and self._due_at(g, now) - grace <= now
                and offered.issuperset(g.pending)
            ]
            count = self._budget(now)
            views = await self._renderable(await self._views(due), now, count)
            if not views:
                continue
            spaced, self._last_flush = self._last_flush, now

            def more() -> bool:
                # Only when a next message could still start after this one's longest answer; else
                # this one summarises everything left, so an accepted message accounts for all due.
                return self.clock.now() + options.request_timeout <= latest

            for n, (digest, title, text) in enumerate(self._pack(views, count, more)):
                if self.limiter.wait_time() > 0:
                    break
                if any(v.stale for v in digest.views) or any(v.stale for v in digest.summarised):
                    # ``given_up`` ran while this send yielded (the engine dropped a deferred
                    # occurrence): the message would page and count it. Made again from the pool
                    # in the next round, not held for the spacing when none of these went out.
                    if n == 0:
                        self._last_flush = spaced
                    break
                if not first and self.clock.now() > latest:
                    return  # it could end past the send's budget: the rest goes with the next send
                first = False
                self.limiter.begin()
                result = None
                try:
                    result = await self._deliver_safely(title, text, digest, until)
                finally:
                    # Refused or redirected, the robot never saw it: not one of its messages a minute.
                    self.limiter.end(
                        counted=result is None or not (result.refused or result.redirected or result.unsent)
                    )
                    if result is None or not result.unsent:
                        self._save_rate()
                if not self._settle(digest, result):
                    return

    async def _deliver_safely(self, title: str, text: str, digest: Digest, until: float) -> Delivery:
        try:
            return await self.deliver(title, text, digest, until=until)
        except aiohttp.ClientHttpProxyError as exc:
            # The proxy answered the CONNECT to an https robot: a status like any other answer (its
            # text quotes the proxy's URL with the password: never used).
            return self.http_failure(f"{self.robot}'s proxy (CONNECT)", exc.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            detail = self.redact(str(exc)) or type(exc).__name__
            return Delivery("retry", f"{self.robot} unreachable: {type(exc).__name__}: {detail}")

    async def _renderable(self, views: list[GroupView], now: float, budget: int) -> list[GroupView]:
        """The views that render, those whose line fits a message first; a group whose line cannot
        be made (an event content no template or time zone can show) is rejected with the reason, so
        it never fails the message of the rest (``send`` raising would retry the batch for ever while
        the group stays pooled). So is one that does not fit even as a count: sent, the robot refused
        the whole message (460101, 40058) and every alert in it was dead-lettered.

        Lines are made and measured only for as many views as ``budget`` messages can hold; the rest
        are summarised, and need only fit as a count. What was measured stays with the view until
        its group changes."""
        lines: list[GroupView] = []
        counts: list[GroupView] = []  # too long for a line, or past what can be sent as lines
        limit = self.max_bytes
        room = budget * limit
        for i, view in enumerate(views):
            if i % _CHUNK == _CHUNK - 1:
                await asyncio.sleep(0)  # thousands of groups due: the router's other work goes on
            try:
                if room > 0 and view.room is None:
                    view.room = self._room(view, limit)
                if room > 0 and view.room:
                    room -= view.room
                    lines.append(view)
                    continue
                if view.countable is None:
                    view.countable = bool(view.room) or self._fits_bare(Digest([], [view]), limit)
            except Exception as exc:  # any failure of one group's content
                detail = self.redact(str(exc))
                self._refuse(
                    view,
                    f"cannot render the event for a digest: {type(exc).__name__}: {detail}",
                    f"render:{type(exc).__name__}",
                    now,
                )
                continue
            finally:
                self._excerpt = self.options.excerpt_chars
            if view.countable:
                counts.append(view)
            else:
                self._refuse(
                    view,
                    f"the event does not fit the {self.robot}'s {limit}-byte message, not even as a count",
                    "render:too-large",
                    now,
                )
        return lines + counts

    def _room(self, view: GroupView, limit: int) -> int:
        """Bytes ``view``'s line takes in a message, at least: its own size when it fits, all of
        ``limit`` when it fits only shortened (then it goes alone), 0 when not even that (a count)."""
        alone = Digest([view], [])
        if self._fits(alone, limit):
            return max(1, self.measure(self._line(view)))
        return limit if self._fit_single(alone, limit) else 0

    def _refuse(self, view: GroupView, reason: str, cause: str, now: float) -> None:
        """Reject one group for its own content, logged once per cause."""
        reason = _shorten(reason, 300)
        if cause not in self._logged:
            self._logged.add(cause)
            group = _shorten(one_line("/".join(view.group.key)), 200)
            self.log.error("%s: %s (group %s)", self.context.name, reason, group)
        self._finish(view, reject(reason), now)

    def _finish(self, view: GroupView, outcome: Outcome, now: float) -> None:
        group = view.group
        for occ in view.occurrences:
            group.drop(occ.key)
            # Only what is still pending: one the engine gave up on meanwhile (``given_up`` while
            # the send awaited) is dropped there, and an OK kept here would never be asked for.
            if self._pending_of.pop(occ.key, None) is not None:
                self._done[occ.key] = (outcome, now)

    def _settle(self, digest: Digest, result: Delivery) -> bool:
        """Record the answer for every occurrence in ``digest``; False stops this flush."""
        now = self.clock.now()
        if result.kind == "retry":
            self._failed(result)
            return False
        outcome = OK if result.kind == "ok" else reject(result.reason)
        if result.kind == "ok":
            self.sent_messages += 1
            self._throttle = self.options.throttle_backoff
            if self._refusing:  # that run of refusals or redirects is over: the next one is news
                self._refusing = False
                self._refused_log = Throttled(self.log, _LOG_REFUSED_EVERY)
        elif result.cause not in self._logged:
            self._logged.add(result.cause)
            self.log.error("%s: %s", self.context.name, result.reason)
        for view in digest.views + digest.summarised:
            self._finish(view, outcome, now)
            if result.kind == "ok":
                view.group.last_notified = now
        return True

    def _failed(self, result: Delivery) -> None:
        """A send that failed (``retry``): what the occurrences still pooled are answered."""
        self._last_failure = result.reason
        self._failure_retry_after = result.retry_after
        self._failure_held = result.held
        if result.refused:
            # Every message is refused until the credential is put right (a rotated file: one is
            # taken within seconds): held in the engine, not dead-lettered, and said once a run
            # of each cause (a proxy's 407 put right, the robot's own refusal next is news).
            self._refusing = True
            self._refused_log.warning(
                f"refused {result.cause}".strip(),
                "%s: our credentials refused? %s; retrying until that is put right "
                "(not dead-lettered for it, unless retry_max_attempts runs out)",
                self.context.name,
                result.reason,
            )
        if result.redirected:
            # Every message meets it until the URL is put right: failed (retry_max_attempts
            # ends a lasting one), not dead-lettered at once, and said once a run, not per digest.
            self._refusing = True
            self._refused_log.warning(
                "redirect",
                "%s: %s (a POST redirected would come back a GET, or go on to another host with "
                "the token); retrying until that is put right (not dead-lettered for it, unless "
                "retry_max_attempts runs out)",
                self.context.name,
                result.reason,
            )
        if result.too_fast:
            # The robot throttles us (someone else shares it, or its own limit): nothing is wrong
            # with the alerts, so they are held, not failed: a throttle that outlasts
            # retry_max_attempts must not dead-letter them. The engine logs no hold: say it here.
            self.log.warning(
                "%s: %s; sending nothing for %s (held alerts wait, none is dropped)",
                self.context.name,
                result.reason,
                humanize(self._throttle),
            )
            self.limiter.pause(self._throttle)
            self._failure_retry_after = self._throttle
            self._failure_held = True
            self._throttle = min(self._throttle * 2, _MAX_THROTTLE)
            self._save_rate()

    # --------------------------------------------------------------- rendering

    async def _views(self, groups: list[Group]) -> list[GroupView]:
        views = []
        work = 0
        for g in groups:
            view = g.view
            if view is None or view.version != g.version:
                work += len(g.pending)
                if work >= _CHUNK:
                    work = 0
                    await asyncio.sleep(0)  # thousands of groups: the router's other work goes on
                occs = list(g.pending.values())
                last = max(occs, key=lambda o: (o.time_ns, o.number))
                view = g.view = GroupView(
                    group=g,
                    occurrences=occs,
                    fields=_fields(last),
                    first_ns=min(o.time_ns for o in occs),
                    last_ns=last.time_ns,
                    messages=len({text_clean(o.record.get("message")) for o in occs}),
                    new=g.last_notified is None,
                    version=g.version,
                )
            view.new = g.last_notified is None
            views.append(view)
        # New problems first, then the oldest waiting.
        views.sort(key=lambda v: (not v.new, v.first_ns))
        return views

    def _time(self, ns: int, occurrences: Sequence[Occurrence] = ()) -> str:
        try:
            dt = datetime.fromtimestamp(ns / 1e9, tz=self._tz)
        except (OverflowError, ValueError, OSError):
            # Past what datetime holds in this zone (an event stamped late on 9999-12-31): the
            # record's own RFC 3339 text, which the router made from the same time.
            text = next((o.record.get("time") for o in occurrences if o.time_ns == ns), None)
            if isinstance(text, str) and _ISO_TEXT.fullmatch(text):
                return text
            return f"{ns // 1_000_000_000} s after 1970 UTC"
        zone = "UTC" if self._tz is UTC else (dt.tzname() or "")
        return dt.strftime("%m-%d %H:%M:%S") + f" {zone}"

    def _entry_values(self, view: GroupView, esc: Callable[[object], str], excerpt: int) -> dict[str, str]:
        f = view.fields
        span = (view.last_ns - view.first_ns) / 1e9
        values = {k: esc(f[k]) for k in GROUP_FIELDS}
        values["message"] = esc(_shorten(one_line(f["message"]), excerpt))
        values.update(
            count=str(view.count),
            span=humanize(span),
            first_time=self._time(view.first_ns, view.occurrences),
            last_time=self._time(view.last_ns, view.occurrences),
        )
        return values

    def render_entry(self, view: GroupView, excerpt: int) -> str:
        md = self.markdown
        esc = md_escape if md else one_line
        v = self._entry_values(view, esc, excerpt)
        template = self.options.line_template
        if template is not None:
            head = template.format_map(v)
        else:
            times = v["last_time"]
            if view.count > 1:
                times = f"{TIMES}{view.count} in {v['span']} · last {v['last_time']}"
            obj = (
                f"{v['kind']} {v['namespace']}/{v['object']}"
                if v["namespace"]
                else f"{v['kind']} {v['object']}"
            )
            reason = f"**{v['reason']}**" if md else v["reason"]
            head = f"{reason} {times} · {obj}"
        if template is not None and "{message" in template:
            return head
        message = _shorten(text_clean(view.fields["message"]), excerpt)
        lines = [ln for ln in message.split("\n") if ln.strip()] or [""]
        note = f" ({view.messages} different messages, last shown)" if view.messages > 1 else ""
        if md:
            body = "\n".join("> " + md_escape(ln) for ln in lines)
            return f"{head}\n\n{body}" + (" " + md_escape(note) if note else "")
        body = "\n".join("    " + ln for ln in lines)
        return f"{head}\n{body}{note}"

    def header(self, digest: Digest) -> str:
        whole = digest.whole
        clusters = sorted(whole.clusters) or [self.context.cluster or "kubernetes"]
        # Types are cut (``Tally``) and only a few listed, so that no event's type can make even a
        # bare summary larger than the robot accepts.
        top = sorted(whole.types.items(), key=lambda kn: (-kn[1], kn[0]))
        shown = sorted(top[:TYPES_LISTED])
        others = sum(n for _, n in top[TYPES_LISTED:])
        what = ", ".join([f"{n} {t}" for t, n in shown] + ([f"{others} other"] if others else []))
        parts = [f"cluster {', '.join(clusters)}"]
        parts += [lbl for lbl in self.options.label]
        if self.options.cluster_id:
            parts.append(f"cluster_id {self.options.cluster_id}")
        if self.options.region:
            parts.append(f"region {self.options.region}")
        noun = "event" if digest.events == 1 else "events"
        if self.markdown:
            meta = " · ".join(md_escape(p) for p in parts)
            return f"#### Kubernetes: {digest.events} {noun} ({md_escape(what)})\n\n{meta}"
        return f"Kubernetes: {digest.events} {noun} ({one_line(what)})\n" + " · ".join(
            one_line(p) for p in parts
        )

    def summary(self, rest: Tally) -> str:
        """The line that counts the summarised views (``rest``), at ``_summary_level``."""
        total = rest.events
        if not total:
            return ""
        noun = "event" if total == 1 else "events"
        listed, cut = self._summary_level
        if not listed:
            return f"…and {total} more {noun}"
        by_reason: Counter[str] = Counter()
        for reason, n in rest.reasons.items():
            reason = reason[:64] if cut is None else _cut_bytes(reason, cut)
            by_reason[reason or "(no reason)"] += n
        top = by_reason.most_common(listed)
        others = sum(by_reason.values()) - sum(n for _, n in top)
        esc = md_escape if self.markdown else one_line
        parts = [f"{esc(r)} {TIMES}{n}" for r, n in top] + ([f"other {TIMES}{others}"] if others else [])
        return f"…and {total} more {noun}: " + ", ".join(parts)

    def title(self, digest: Digest) -> str:
        top = (digest.views or digest.summarised)[0]
        f = top.fields
        values = {
            "cluster": one_line(f["cluster"] or self.context.cluster),
            "label": one_line(" ".join(self.options.label)),
            "events": str(digest.events),
            "groups": str(len(digest.views) + len(digest.summarised)),
            "more": str(len(digest.views) + len(digest.summarised) - 1),
            "reason": one_line(f["reason"]),
            "namespace": one_line(f["namespace"]),
            "kind": one_line(f["kind"]),
            "object": one_line(f["object"]),
            "count": str(top.count),
        }
        if self.options.title_template is not None:
            return _shorten(self.options.title_template.format_map(values), 120)
        more = int(values["more"])
        title = f"[{values['cluster'] or 'k8s'}] {values['reason']}"
        if top.count > 1:
            title += f" {TIMES}{top.count}"
        title += (
            f" {values['namespace']}/{values['object']}" if values["namespace"] else f" {values['object']}"
        )
        if more:
            title += f" (+{more} more)"
        return _shorten(title, 120)

    def mentions(self, digest: Digest) -> tuple[list[str], list[str], bool]:
        """(mobiles, user ids, @all) for this digest by the configured rules."""
        o = self.options
        # Ignoring case, as the sink filters match reasons (item 93): with `reasons=oomkilling`
        # the filter lets OOMKilling through, and `at_all_reasons=oomkilling` must page for it.
        reasons = {r.casefold() for r in digest.reasons}
        people = not o.at_reasons or bool(reasons & {r.casefold() for r in o.at_reasons})
        mobiles = list(o.at_mobiles) if people else []
        users = list(o.at_user_ids) if people else []
        at_all = o.at_all or bool(reasons & {r.casefold() for r in o.at_all_reasons})
        return mobiles, users, at_all

    def mention_line(self, digest: Digest) -> str:
        mobiles, users, at_all = self.mentions(digest)
        names = [f"@{m}" for m in mobiles + users]
        if at_all:
            names.append("@all")
        return " ".join(one_line(n) for n in names)

    def compose(self, digest: Digest) -> tuple[str, str]:
        """(title, text) of one message; subclasses may add robot specifics (keywords, mentions)."""
        parts = [self.header(digest)]
        sep = "\n\n" if self.markdown else "\n"
        if self.markdown:
            parts.append("---")
        parts += [self._line(v) for v in digest.views]
        summary = self.summary(digest.rest) if digest.summarised else ""
        if summary:
            parts.append(summary)
        mention = self.mention_line(digest)
        if mention:
            parts.append(mention)
        return self.title(digest), sep.join(parts)

    def _line(self, view: GroupView) -> str:
        """``render_entry`` at the current excerpt; made once per view at the configured one."""
        if self._excerpt != self.options.excerpt_chars:
            return self.render_entry(view, self._excerpt)
        if view.line is None:
            view.line = self.render_entry(view, self._excerpt)
        return view.line

    _excerpt: int = 0
    _summary_level: tuple[int, int | None] = SUMMARY_LEVELS[0]

    def _pack(
        self, views: list[GroupView], budget: int, more: Callable[[], bool] = lambda: True
    ) -> Iterable[tuple[Digest, str, str]]:
        """Up to ``budget`` messages covering every view: whole lines while they fit, and the last
        message summarises the rest with counts. A message is the last one too when ``more()``
        (asked as it is made) says no other could follow it in this send: one accepted message then
        accounts for everything due, not only for the lines it holds."""
        limit = self.max_bytes
        rest = list(views)
        left = Tally.of(rest)  # of ``rest``: each candidate's summary is ``left`` less its lines
        for n in range(budget):
            last = n == budget - 1 or not more()
            self._excerpt = self.options.excerpt_chars
            # No more lines than their own bytes can fit (``_renderable`` measured each): composing
            # candidates of thousands of lines, each send, held the event loop for seconds.
            most, used = 0, 0
            for view in rest:
                if not view.room or used + view.room > limit:
                    break
                most, used = most + 1, used + view.room
            # Largest prefix of whole lines that fits (with the summary of what follows, if last;
            # a shorter summary only when not one line fits beside the usual one).
            best = 0
            for level in SUMMARY_LEVELS if last else SUMMARY_LEVELS[:1]:
                self._summary_level = level
                lo, hi = 1, most
                while lo <= hi:
                    mid = (lo + hi) // 2
                    if self._fits(_candidate(rest, left, mid, last), limit):
                        best, lo = mid, mid + 1
                    else:
                        hi = mid - 1
                if best:
                    break
            if best == 0 and rest[0].room:
                best = self._fit_single(_candidate(rest, left, 1, last), limit)
            if best == 0:
                last = True  # not even one line fits: this message summarises everything left
            digest = _candidate(rest, left, best, last)
            if not self._fit_summary(digest, limit):
                # Too many clusters or types even for a bare count: count fewer (each fits alone,
                # ``_renderable`` made sure); the rest stays pooled for the next message.
                lo, hi, size = 1, len(digest.summarised) - 1, 1
                while lo <= hi:
                    mid = (lo + hi) // 2
                    if self._fits_bare(Digest([], digest.summarised[:mid]), limit):
                        size, lo = mid, mid + 1
                    else:
                        hi = mid - 1
                digest = Digest([], digest.summarised[:size])
                self._summary_level = SUMMARY_LEVELS[-1]
                rest = []
            title, text = self.compose(digest)
            self._excerpt = self.options.excerpt_chars
            self._summary_level = SUMMARY_LEVELS[0]
            yield digest, title, text
            if last or best >= len(rest):
                return
            left = left - Tally.of(rest[:best])
            rest = rest[best:]

    def _fit_single(self, digest: Digest, limit: int) -> int:
        """One line alone (``digest``'s one view) is too long: shorten its excerpt (marked) until it
        fits, and leave ``_excerpt`` there (1); else summarise it (0)."""
        excerpt = self.options.excerpt_chars
        while excerpt > 20:
            excerpt //= 2
            self._excerpt = excerpt
            if self._fits(digest, limit):
                return 1
        self._excerpt = self.options.excerpt_chars
        return 0

    def _fit_summary(self, digest: Digest, limit: int) -> bool:
        """A message that is only a summary was never measured: eight long reasons (64 characters of
        up to 4 bytes each) passed WeCom's 2048 bytes, and the robot refused it for good. List fewer
        reasons, cut shorter, until the message fits; the last level is the bare count. False when
        not even that fits."""
        for level in SUMMARY_LEVELS:
            self._summary_level = level
            if not digest.summarised or self._fits(digest, limit):
                return True
        return False

    def _fits_bare(self, digest: Digest, limit: int) -> bool:
        """Whether ``digest`` fits with its summary at the last level (a bare count)."""
        level, self._summary_level = self._summary_level, SUMMARY_LEVELS[-1]
        try:
            return self._fits(digest, limit)
        finally:
            self._summary_level = level

    def _fits(self, digest: Digest, limit: int) -> bool:
        title, text = self.compose(digest)
        return self.payload_size(title, text, digest) <= limit
