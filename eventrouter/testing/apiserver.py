"""A Kubernetes API server for tests that keeps the real list/watch contract of kube-apiserver 1.24.

There is no real API server on these machines, so this one follows the wire format recorded from a
real 1.24 cluster (``eventrouter/testing/data``) and the semantics of the etcd3 store and the watch
cache:

* one global resourceVersion shared by every resource; Events keep a bounded change history
  (``history_size``); a resourceVersion older than that history answers 410 Expired;
* lists: ``resourceVersion`` unset = consistent read, ``limit``/``continue`` paging at the first
  page's revision with ``remainingItemCount``; ``resourceVersion=0`` is served "from the cache":
  the whole list, ``limit`` ignored (as 1.24 does); a continue token whose revision is compacted
  answers 410 with a fresh token in ``metadata.continue``; items sorted like etcd keys; a
  ``resourceVersion`` ahead of the store answers 504 "Too large resource version" (cause
  ``ResourceVersionTooLarge``; from the watch cache after waiting up to 3 s, with retryAfterSeconds
  1), or 500 "future revision" where etcd is asked for that revision (Exact, or a legacy ``limit``);
* watches: chunked JSON lines; unset/``0`` starts with synthetic ADDED for the current state;
  ``resourceVersion=N`` replays every retained change after N, or sends one in-stream ERROR 410 line;
  nothing at or below N is ever sent, also when N is ahead of the store (an etcd restore);
  ``allowWatchBookmarks``, ``timeoutSeconds``, ``fieldSelector``/``labelSelector`` (an object that
  leaves or enters the selector becomes DELETED/ADDED, as in the cacher);
* Events TTL (``ttl``), bearer-token auth (401), RBAC denials (403), ConfigMaps (1 MiB limit on the
  values, as ``ValidateConfigMap`` counts) and coordination.k8s.io Leases (optimistic concurrency,
  created by a PUT as ``leaseStrategy.AllowCreateOnUpdate`` allows, the spec validated as
  ``ValidateLeaseSpec`` and the decoder do) for leader election and checkpoints; an update that
  changes nothing is a no-op (the same resourceVersion), a ``metadata.uid`` that is not the stored
  object's a 409 (the UID precondition);
* fault injection (``api.faults``), answers held back after the request took effect
  (``api.hold_answers``) and a log of every request (``api.requests``).

Two ways to serve Events, as kube-apiserver can be set up:

* ``watch_cache=True`` (this server's default): Events go through the watch cache, as with
  ``--watch-cache-sizes=events#N``: bookmarks, ``resourceVersion=0`` lists from the cache, a bounded
  history (``history_size``).
* ``watch_cache=False``: straight from etcd, **the default of kube-apiserver 1.24** (its
  ``DefaultWatchCacheSizes`` sets ``events`` to 0): no bookmarks whatever the client asks, every list
  honours ``limit``, a watch replays every change etcd still holds and answers an in-stream 410
  "The resourceVersion for the provided watch is too old." below the compacted revision.

``compaction_interval`` runs etcd's compactor as kube-apiserver does (``--etcd-compaction-interval``,
5 min): each tick compacts to the revision seen at the tick before, so between one and two intervals
of history stay. On a quiet cluster without bookmarks a watch's resourceVersion falls behind it and
the next watch gets 410.

Usage::

    async with FakeApiServer(token="t") as api:
        api.create_event(event_object(...))
        await load_kube_config(config_file=api.kubeconfig(tmp_path / "kubeconfig"))
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import html
import math
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import yaml
from aiohttp import web

from eventrouter.testing.apiserver_select import (
    EVENT_FIELDS,
    FieldSelector,
    LabelSelector,
    apply_patch,
    event_fields,
)
from eventrouter.testing.apiserver_status import (
    DEFAULT_MESSAGES,
    ApiError,
    bad_request,
    conflict,
    invalid,
    invalid_fields,
    qualified,
)
from eventrouter.testing.apiserver_store import (
    EventStore,
    ObjectStore,
    Revision,
    Snapshot,
    Stored,
    Watcher,
    now_micro,
    now_time,
)

__all__ = ["ApiError", "FakeApiServer", "Faults", "RequestRecord"]

CONFIGMAP_LIMIT = 1024 * 1024
REQUEST_BODY_LIMIT = 3 * 1024 * 1024
COORDINATION = "coordination.k8s.io"
INCONSISTENT_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new "
    "list without the continue parameter, or use the continue token in this response to retrieve the "
    "remainder of the results. Continuing with the provided token results in an inconsistent list - "
    "objects that were created, modified, or deleted between the time the first chunk was returned and "
    "now may show up in the list."
)
EXPIRED_LIST = "The resourceVersion for the provided list is too old."
FUTURE_REVISION = "Internal error occurred: etcdserver: mvcc: required revision is a future revision"
CACHE_BLOCK_TIMEOUT = 3.0  # the cacher's blockTimeout
# A line that starts like an event and is cut: what a corrupting proxy or a broken encoder sends.
MALFORMED_LINE = b'{"type":"MODIFIED","object":{"kind":"Event","apiVersion":"v1","metadata":{"name":\n'
TRUE = ("1", "true", "True")
# A gateway's error page, written again and again up to the size asked for (Faults.error_page_next).
ERROR_PAGE = b"<html><body><h1>503 Service Temporarily Unavailable</h1>" + b"<p>upstream gone</p>" * 3200
_TOKEN = web.RequestKey("token", str)  # "" when auth is disabled


class RequestRecord(NamedTuple):
    method: str
    path: str
    query: dict[str, str]


@dataclass
class _Fault:
    kind: str  # fail | page | unreadable | cut | stall | malformed | empty | list_item
    remaining: int
    status: int = 500
    retry_after: float | None = None
    message: str | None = None
    verbs: tuple[str, ...] = ("list", "watch")
    resource: str = "events"
    after_lines: int = 0
    mid_object: bool = True
    seconds: float = 0.0
    raw: bytes = b""  # what a "malformed" or "list_item" fault sends, as it is
    reset: bool = False  # a "stall" ends in a connection reset
    size: int = 0  # bytes of a "page"
    echo: str | None = None  # a request header a "fail" or "page" answer quotes, as some gateways do
    echo_at: int = 0  # where a "page" quotes it
    echo_basic: bool = False  # it quotes a Basic header's password and user decoded instead


class Faults:
    """One-shot or counted faults, applied in the order they were added to the next matching request."""

    def __init__(self) -> None:
        self._pending: list[_Fault] = []
        self.applied: list[str] = []
        self.pages_sent: list[int] = []  # bytes of each "page" written before the client went away

    def fail_next(
        self,
        status: int,
        count: int = 1,
        retry_after: float | None = None,
        *,
        message: str | None = None,
        verbs: Iterable[str] = ("list", "watch"),
        resource: str = "events",
        echo: str | None = None,
        echo_basic: bool = False,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` and a Status body (429 adds
        ``Retry-After`` in whole seconds and ``details.retryAfterSeconds``, as priority and fairness does).
        ``echo`` (Event requests): the Status message ends with that request header as it came, as
        an auth proxy or gateway in front of the API server quotes the credentials it refused;
        ``echo_basic``: with the password and user of that Basic header instead, decoded
        (`` (password PASSWORD refused for USER)``), as a Basic-auth front may."""
        self._pending.append(
            _Fault(
                "fail",
                count,
                status=status,
                retry_after=retry_after,
                message=message,
                verbs=tuple(verbs),
                resource=resource,
                echo=echo,
                echo_basic=echo_basic,
            )
        )

    def error_page_next(
        self,
        size: int,
        status: int = 503,
        count: int = 1,
        *,
        verbs: Iterable[str] = ("list", "watch"),
        echo: str | None = None,
        echo_at: int = 0,
        echo_basic: bool = False,
    ) -> None:
        """Answer the next ``count`` matching Event requests as a broken proxy or gateway in front of
        the API server may: ``status`` with an HTML page of ``size`` bytes, not a Status. What each
        page sent before the client closed the connection is added to ``pages_sent``. ``echo``: the
        page quotes that request header (``<p>Name: value</p>``) from its byte ``echo_at`` on;
        ``echo_basic``: the password and user of that Basic header instead, decoded and HTML-escaped
        as a page writes text (``<p>password PASSWORD refused for USER</p>``)."""
        self._pending.append(
            _Fault(
                "page",
                count,
                status=status,
                verbs=tuple(verbs),
                size=size,
                echo=echo,
                echo_at=echo_at,
                echo_basic=echo_basic,
            )
        )

    def unreadable_error_next(
        self,
        status: int,
        count: int = 1,
        *,
        stall: float = 0.0,
        verbs: Iterable[str] = ("list", "watch"),
    ) -> None:
        """Answer the next ``count`` matching Event requests as a gateway that breaks off an error
        answer: ``status`` and the Content-Length of its whole Status, the first 40 bytes of it, then
        the connection reset (``stall``: that many seconds later, nothing sent meanwhile)."""
        self._pending.append(_Fault("unreadable", count, status=status, verbs=tuple(verbs), seconds=stall))

    def cut_next_watch(self, after_lines: int = 0, mid_object: bool = True, count: int = 1) -> None:
        """Send ``after_lines`` lines, then half of the next one (``mid_object``), then reset."""
        self._pending.append(_Fault("cut", count, after_lines=after_lines, mid_object=mid_object))

    def stall_next_watch(self, seconds: float, count: int = 1, *, reset: bool = False) -> None:
        """Send the 200 headers, then nothing at all (not even bookmarks) for ``seconds``, then end
        (``reset``: reset the connection instead, as a load balancer's idle timeout does)."""
        self._pending.append(_Fault("stall", count, seconds=seconds, reset=reset))

    def malformed_next_watch_line(
        self, after_lines: int = 0, count: int = 1, line: bytes = MALFORMED_LINE
    ) -> None:
        """Put one line that is not JSON (or ``line``, as it is: e.g. an event with invalid UTF-8 or
        a lone surrogate escape, as a broken proxy could send) into the next watch stream after
        ``after_lines`` lines."""
        line = line if line.endswith(b"\n") else line + b"\n"
        self._pending.append(_Fault("malformed", count, after_lines=after_lines, raw=line))

    def malformed_next_list(self, *items: Any, count: int = 1) -> None:
        """Put ``items`` (any JSON values, e.g. ``{"metadata": "oops"}``; ``bytes`` go as they are:
        invalid UTF-8, lone surrogate escapes) first in the items of the next list page, as a broken
        proxy or aggregated API could answer; the rest is the real page."""
        joined = b",".join(item if isinstance(item, bytes) else orjson.dumps(item) for item in items)
        self._pending.append(_Fault("list_item", count, raw=joined or b"null"))

    def empty_next_watch(self, count: int = 1) -> None:
        """200 and an immediately finished body with no lines (kubernetes#104171)."""
        self._pending.append(_Fault("empty", count))

    def clear(self) -> None:
        self._pending.clear()

    @property
    def pending(self) -> int:
        return sum(f.remaining for f in self._pending)

    def take(self, verb: str, resource: str) -> _Fault | None:
        for f in self._pending:
            applies = (
                (f.kind in ("fail", "page", "unreadable") and verb in f.verbs and f.resource == resource)
                or (f.kind == "list_item" and verb == "list" and resource == "events")
                or (
                    f.kind not in ("fail", "page", "unreadable", "list_item")
                    and verb == "watch"
                    and resource == "events"
                )
            )
            if applies:
                f.remaining -= 1
                if f.remaining <= 0:
                    self._pending.remove(f)
                self.applied.append(f.kind)
                return f
        return None


@dataclass(frozen=True)
class _Rule:
    user: str
    verbs: frozenset[str] | None
    resources: frozenset[str] | None


@dataclass(frozen=True)
class _Resource:
    store: ObjectStore
    list_kind: str
    create_on_update: bool
    unconditional_update: bool


def _encode_continue(rv: int, start: str) -> str:
    raw = orjson.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start})
    # orjson writes NUL raw; the Go encoder writes \u0000 (the recorded token has it).
    raw = raw.replace(b"\x00", b"\\u0000")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _basic(header: str) -> tuple[str, str]:
    """The user and password of a Basic Authorization header ("" for another)."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    user, _, password = base64.b64decode(token.strip()).decode().partition(":")
    return user, password


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != "meta.k8s.io/v1":
        raise bad_request("continue key is not valid: server does not recognize this encoded version")
    start, rv = data.get("start"), data.get("rv")
    if not isinstance(start, str) or not start:
        raise bad_request("continue key is not valid: encoded start key empty")
    if not isinstance(rv, int) or rv == 0 or rv < -1:
        raise bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"
        )
    return rv, start


def _parse_rv(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise bad_request(
            f"invalid resource version: strconv.ParseUint: parsing {text!r}: invalid syntax"
        ) from None
    if value < 0:
        raise bad_request(f"invalid resource version: {text}")
    return value


def too_large_rv(rv: int, current: int, *, retry_seconds: int) -> ApiError:
    """storage.NewTooLargeResourceVersionError: a 504 Timeout naming both revisions, with the cause
    ResourceVersionTooLarge; retryAfterSeconds (and Retry-After) only when nonzero (the cacher's 1,
    the etcd3 store's 0)."""
    details: dict[str, Any] = {
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]
    }
    headers: dict[str, str] = {}
    if retry_seconds:
        details["retryAfterSeconds"] = retry_seconds
        headers["Retry-After"] = str(retry_seconds)
    message = f"Timeout: Too large resource version: {rv}, current: {current}"
    return ApiError(504, message, details=details, headers=headers)


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(body=raw, status=status, content_type="application/json", headers=headers)


def _error_line(status: dict[str, Any]) -> bytes:
    return b'{"type":"ERROR","object":' + orjson.dumps(status) + b"}\n"


def _configmap_size(obj: Mapping[str, Any]) -> int:
    """What ValidateConfigMap adds up: ``len(value)`` of data and of binaryData (decoded), not keys."""
    total = 0
    for value in (obj.get("data") or {}).values():
        total += len(str(value).encode())
    for value in (obj.get("binaryData") or {}).values():
        try:
            total += len(base64.b64decode(value))
        except (binascii.Error, ValueError, TypeError):
            total += len(str(value))
    return total


class _ConfigMapStore(ObjectStore):
    def validate(self, obj: Mapping[str, Any]) -> None:
        if _configmap_size(obj) > CONFIGMAP_LIMIT:
            name = (obj.get("metadata") or {}).get("name", "")
            raise invalid(
                "ConfigMap",
                name,
                "",
                "[]",
                "FieldValueTooLong",
                f"Too long: must have at most {CONFIGMAP_LIMIT} bytes",
            )


_INT32 = (-(2**31), 2**31 - 1)
_MICRO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})")
_MICRO_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"  # metav1.RFC3339Micro: exactly six digits


class _LeaseStore(ObjectStore):
    """Leases as kube-apiserver takes them: the JSON decoder refuses what does not fit the Go type
    (400: an int32 out of range, a MicroTime that does not parse), then ValidateLeaseSpec (422)."""

    def validate(self, obj: Mapping[str, Any]) -> None:
        spec = obj.get("spec")
        if spec is None:
            return
        if not isinstance(spec, dict):
            raise self._undecodable(
                f"json: cannot unmarshal {_json_kind(spec)} into Go struct field Lease.spec of type v1.LeaseSpec"
            )
        for name in ("leaseDurationSeconds", "leaseTransitions"):
            value = spec.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._undecodable(
                    f"json: cannot unmarshal {_json_kind(value)} into Go struct field LeaseSpec.spec.{name} of type int32"
                )
            if not isinstance(value, int) or not _INT32[0] <= value <= _INT32[1]:
                raise self._undecodable(
                    f"json: cannot unmarshal number {orjson.dumps(value).decode()} into Go struct field "
                    f"LeaseSpec.spec.{name} of type int32"
                )
        for name in ("acquireTime", "renewTime"):
            value = spec.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise self._undecodable(
                    f"json: cannot unmarshal {_json_kind(value)} into Go value of type string"
                )
            if not _valid_micro_time(value):
                raise self._undecodable(
                    f'parsing time "{value}" as "{_MICRO_LAYOUT}": cannot parse "{value}"'
                )
        causes: list[tuple[str, str, str]] = []
        duration, transitions = spec.get("leaseDurationSeconds"), spec.get("leaseTransitions")
        if duration is not None and duration <= 0:
            causes.append(
                (
                    "spec.leaseDurationSeconds",
                    "FieldValueInvalid",
                    f"Invalid value: {duration}: must be greater than 0",
                )
            )
        if transitions is not None and transitions < 0:
            causes.append(
                (
                    "spec.leaseTransitions",
                    "FieldValueInvalid",
                    f"Invalid value: {transitions}: must be greater than or equal to 0",
                )
            )
        if causes:
            raise invalid_fields(self.kind, (obj.get("metadata") or {}).get("name", ""), self.group, causes)

    def _undecodable(self, why: str) -> ApiError:
        return bad_request(f'{self.kind} in version "v1" cannot be handled as a {self.kind}: {why}')


def _json_kind(value: Any) -> str:
    """How Go's encoding/json names a JSON value's kind in an UnmarshalTypeError."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _valid_micro_time(text: str) -> bool:
    if not _MICRO_TIME.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:  # a month, day or hour out of range
        return False
    return True


class FakeApiServer:
    """See the module docstring. Python-side methods change the store exactly as API writes would."""

    def __init__(
        self,
        *,
        token: str | None = None,
        tokens: Iterable[str] = (),
        forbidden_tokens: Mapping[str, str] | Iterable[str] = (),
        history_size: int = 10_000,
        bookmark_interval: float = 1.0,
        watch_cache: bool = True,
        compaction_interval: float | None = None,
        ttl: float | None = None,
        ttl_check_interval: float = 0.05,
        watcher_buffer: int = 100_000,
        default_watch_timeout: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        git_version: str = "v1.24.17",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.tokens: set[str] = set(tokens) | ({token} if token else set())
        self._rules: dict[str, _Rule] = {}
        if isinstance(forbidden_tokens, Mapping):
            for tok, user in forbidden_tokens.items():
                self.forbid(tok, user)
        else:
            for tok in forbidden_tokens:
                self.forbid(tok)
        self.bookmark_interval = bookmark_interval
        self.watch_cache = watch_cache
        self.compaction_interval = compaction_interval
        self.ttl = ttl
        self.ttl_check_interval = ttl_check_interval
        self.default_watch_timeout = default_watch_timeout
        self.git_version = git_version
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self._holds: dict[tuple[str, str], asyncio.Event] = {}
        self.held = 0  # answers held back by hold_answers (counted as they start waiting)
        self._host, self._port = host, port
        self._ssl = ssl_context  # serve HTTPS (in-cluster clients only speak TLS)
        self._revision = Revision()
        self._events = EventStore(
            self._revision,
            # etcd keeps every revision until it is compacted; the watch cache keeps a window.
            history_size=history_size if watch_cache else None,
            watcher_buffer=watcher_buffer,
            extract=event_fields,
        )
        self._events.on_change = self._notify
        self._resources: dict[str, _Resource] = {
            "events": _Resource(self._events, "EventList", create_on_update=True, unconditional_update=True),
            "configmaps": _Resource(
                _ConfigMapStore(self._revision, kind="ConfigMap", resource="configmaps"),
                "ConfigMapList",
                create_on_update=False,
                unconditional_update=True,
            ),
            # leaseStrategy: AllowCreateOnUpdate true, AllowUnconditionalUpdate false.
            "leases": _Resource(
                _LeaseStore(self._revision, kind="Lease", resource="leases", group=COORDINATION),
                "LeaseList",
                create_on_update=True,
                unconditional_update=False,
            ),
        }
        self._runner: web.AppRunner | None = None
        self._ttl_task: asyncio.Task[None] | None = None
        self._compactor: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._changed: asyncio.Event | None = None
        self._active = 0
        self.url = ""

    def __repr__(self) -> str:  # never show tokens
        return f"<FakeApiServer {self.url or 'not started'} rv={self._revision.value}>"

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=REQUEST_BODY_LIMIT)
        self._routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        await web.SockSite(self._runner, sock, ssl_context=self._ssl).start()
        port = sock.getsockname()[1]
        scheme = "https" if self._ssl else "http"
        self.url = (
            f"{scheme}://[{self._host}]:{port}" if ":" in self._host else f"{scheme}://{self._host}:{port}"
        )
        self._ttl_task = asyncio.create_task(self._ttl_loop(), name="fake-apiserver-ttl")
        if self.compaction_interval is not None:
            self._compactor = asyncio.create_task(self._compact_loop(), name="fake-apiserver-compactor")

    async def close(self, *, reset: bool = False) -> None:
        """Ends every watch stream and stops the server (idempotent). ``reset``: the watches' connections
        are reset, not ended: what a kube-apiserver 1.24 restart does (its graceful shutdown does not
        end watches; they break when the process exits)."""
        self._closing.set()
        for w in list(self._events.watchers):
            w.terminate("server shutting down", reset=reset)
        for task in (self._ttl_task, self._compactor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._ttl_task = self._compactor = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def kubeconfig(
        self,
        path: str | Path,
        *,
        namespace: str = "default",
        token: str | None = None,
        basic: tuple[str, str] | None = None,
    ) -> str:
        """Write a kubeconfig for this server (user = ``token`` or any allowed token; ``basic``, a user
        name and password instead, for a server without tokens behind a Basic-auth front) and return
        its path."""
        user: dict[str, Any] = {}
        tok = token if token is not None else (sorted(self.tokens)[0] if self.tokens else None)
        if basic is not None:
            user["username"], user["password"] = basic
        elif tok:
            user["token"] = tok
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
            ],
            "current-context": "fake",
        }
        Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    def forbid(
        self,
        token: str,
        user: str = "system:serviceaccount:default:eventrouter",
        *,
        verbs: Iterable[str] | None = None,
        resources: Iterable[str] | None = None,
    ) -> None:
        """Let ``token`` authenticate as ``user`` but deny ``verbs`` on ``resources`` (default: all)."""
        self._rules[token] = _Rule(
            user,
            frozenset(verbs) if verbs is not None else None,
            frozenset(resources) if resources is not None else None,
        )

    def permit(self, token: str) -> None:
        """Lift what ``forbid`` denied ``token`` (the role was fixed)."""
        self._rules.pop(token, None)

    # --- Python-side store API -----------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion (strings on the wire)."""
        return self._revision.value

    @property
    def oldest_resource_version(self) -> int:
        """The oldest resourceVersion a watch or a continued list can still start from."""
        return self._events.oldest_valid

    @property
    def active_watches(self) -> int:
        return len(self._events.watchers)

    def disconnect_watches(self, why: str = "disconnected by test", *, reset: bool = False) -> int:
        """End every open watch stream now, as a load balancer would (``reset``: reset the connection
        without ending the body, as a kube-apiserver 1.24 that exits does)."""
        watchers = list(self._events.watchers)
        for w in watchers:
            w.terminate(why, reset=reset)
        return len(watchers)

    @contextlib.asynccontextmanager
    async def steady_events(self, prefix: str = "during", interval: float = 0.01) -> AsyncIterator[None]:
        """A steady load for fault tests: a new Event (``<prefix>-0``, ``-1``, …) every ``interval``
        seconds while the block runs."""
        from .factories import event_object

        stop = asyncio.Event()

        async def create() -> None:
            i = 0
            while not stop.is_set():
                self.create_event(event_object(object_name=f"{prefix}-{i}"))
                i += 1
                await asyncio.sleep(interval)

        task = asyncio.create_task(create())
        try:
            yield
        finally:
            stop.set()
            await task

    def create_event(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Store a new Event (uid and creationTimestamp kept when given) and emit ADDED."""
        return self._events.create(orjson.loads(orjson.dumps(obj))).copy()

    def update_event(
        self,
        namespace: str,
        name: str,
        change: Mapping[str, Any] | Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> dict[str, Any]:
        """Replace an Event with ``change`` (an object, or a function that mutates or returns a copy)."""
        if callable(change):
            current = self._events.get(namespace, name).copy()
            result = change(current)
            new = result if result is not None else current
        else:
            new = orjson.loads(orjson.dumps(change))
        return self._events.replace(namespace, name, new).copy()

    def bump(self, namespace: str, name: str) -> dict[str, Any]:
        """Raise a repeat the way the recorders do: ``series.count`` (events.k8s.io style) or ``count``."""

        def mutate(obj: dict[str, Any]) -> None:
            series = obj.get("series")
            if series or (obj.get("count") is None and obj.get("eventTime")):
                series = dict(series or {"count": 1})
                series["count"] = int(series.get("count") or 1) + 1
                series["lastObservedTime"] = now_micro()
                obj["series"] = series
            else:
                obj["count"] = int(obj.get("count") or 1) + 1
                obj["lastTimestamp"] = now_time()

        return self.update_event(namespace, name, mutate)

    def delete_event(self, namespace: str, name: str) -> dict[str, Any]:
        return self._events.delete(namespace, name).copy()

    def get_event(self, namespace: str, name: str) -> dict[str, Any]:
        return self._events.get(namespace, name).copy()

    def events(self) -> list[dict[str, Any]]:
        """Current Events, sorted by namespace/name."""
        return [s.copy() for s in self._events.snapshot().objs]

    def compact(self, resource_version: int | None = None) -> None:
        """Forget the history up to ``resource_version`` (default: now): older resourceVersions and
        continue tokens answer 410."""
        self._events.compact(resource_version)

    def expire(self) -> list[dict[str, Any]]:
        """Delete (with DELETED) every Event whose last write is older than ``ttl``."""
        if self.ttl is None:
            return []
        return [s.copy() for s in self._events.expire(self.ttl)]

    async def load_recording(self, lines: Iterable[Mapping[str, Any] | str | bytes]) -> int:
        """Apply a recorded watch stream in order with new resourceVersions; returns the changes applied.

        ADDED creates with the recorded content (uid, timestamps, managedFields), MODIFIED replaces,
        DELETED deletes; BOOKMARK and ERROR lines are skipped."""
        applied = 0
        for line in lines:
            if isinstance(line, (str, bytes)):
                if not line.strip():
                    continue
                entry = orjson.loads(line)
            else:
                entry = line
            kind, obj = entry.get("type"), entry.get("object") or {}
            meta = obj.get("metadata") or {}
            if kind == "ADDED":
                self._events.create(orjson.loads(orjson.dumps(obj)))
            elif kind == "MODIFIED":
                self._events.replace(meta["namespace"], meta["name"], orjson.loads(orjson.dumps(obj)))
            elif kind == "DELETED":
                self._events.delete(meta["namespace"], meta["name"])
            else:
                continue
            applied += 1
            if applied % 200 == 0:
                await asyncio.sleep(0)  # let watch streams drain on long recordings
        return applied

    def hold_answers(self, method: str, resource: str) -> asyncio.Event:
        """Answer the successful ``method`` requests (``PUT``, ``POST``, ``GET``...) of ``resource``
        only once the returned event is set, after they took effect: a slow answer path (a congested
        link, a busy API server's write-out). A client that gives up meanwhile finds the write done."""
        gate = self._holds[(method, resource)] = asyncio.Event()
        return gate

    def objects(self, resource: str) -> list[dict[str, Any]]:
        """Current ``configmaps`` / ``leases`` / ``events``."""
        return [s.copy() for s in self._resources[resource].store.list(None)]

    def get_object(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        return self._resources[resource].store.get(namespace, name).copy()

    def create_object(self, resource: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self._resources[resource].store.create(orjson.loads(orjson.dumps(obj))).copy()

    def count_requests(
        self, *, watch: bool | None = None, path: str | None = None, method: str = "GET"
    ) -> int:
        """Requests seen for Event lists (``watch=False``), watches (``True``) or both (``None``)."""
        n = 0
        for r in self.requests:
            if r.method != method or (path is not None and r.path != path):
                continue
            if path is None and not (r.path.endswith("/events") and r.path.startswith("/api/v1")):
                continue
            is_watch = r.query.get("watch", "") in TRUE or "/watch/" in r.path
            if watch is None or watch == is_watch:
                n += 1
        return n

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; re-checked on every request, watch and store change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _ttl_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_check_interval)
            if self.ttl is not None:
                self._events.expire(self.ttl)

    async def _compact_loop(self) -> None:
        # kube-apiserver's compactor (storage/etcd3/compact.go): compact to the previous tick's revision.
        assert self.compaction_interval is not None
        previous = self._revision.value
        while True:
            await asyncio.sleep(self.compaction_interval)
            self._events.compact(previous)
            previous = self._revision.value
            self._notify()

    # --- HTTP ----------------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        get, r = web.get, app.router
        app.add_routes(
            [
                get("/version", self._version),
                get("/api", self._api),
                get("/apis", self._apis),
                get("/api/v1", self._core_resources),
                get(f"/apis/{COORDINATION}", self._coordination_group),
                get(f"/apis/{COORDINATION}/v1", self._coordination_resources),
                get("/api/v1/events", self._events_get),
                get("/api/v1/watch/events", self._events_get),
                get("/api/v1/watch/namespaces/{ns}/events", self._events_get),
            ]
        )
        prefixes = {"events": "/api/v1", "configmaps": "/api/v1", "leases": f"/apis/{COORDINATION}/v1"}
        for resource, prefix in prefixes.items():
            base = f"{prefix}/namespaces/{{ns}}/{resource}"
            if resource == "events":
                r.add_get(base, self._events_get)
            else:
                r.add_get(base, self._make(self._simple_list, resource))
            r.add_post(base, self._make(self._create, resource))
            item = base + "/{name}"
            r.add_get(item, self._make(self._get, resource))
            r.add_put(item, self._make(self._put, resource))
            r.add_patch(item, self._make(self._patch, resource))
            r.add_delete(item, self._make(self._delete, resource))

    def _make(
        self, fn: Callable[[web.Request, str], Awaitable[web.StreamResponse]], resource: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            answer = await fn(request, resource)
            gate = self._holds.get((request.method, resource))
            if gate is not None and not gate.is_set():
                self.held += 1
                self._notify()
                await gate.wait()
            return answer

        return handler

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests.append(RequestRecord(request.method, request.path, dict(request.query)))
        self._active += 1
        self._notify()
        try:
            request[_TOKEN] = self._authenticate(request)
            return await handler(request)
        except ApiError as exc:
            return _json(exc.status, exc.code, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = {
                404: "the server could not find the requested resource",
                405: "the server does not allow this method on the requested resource",
                413: f"Request entity too large: limit is {REQUEST_BODY_LIMIT}",
            }.get(exc.status, exc.reason)
            err = ApiError(exc.status, message, details={} if exc.status == 404 else None)
            return _json(err.status, err.code)
        finally:
            self._active -= 1
            self._notify()

    def _authenticate(self, request: web.Request) -> str:
        if not self.tokens and not self._rules:
            return ""  # auth disabled: anonymous is allowed everything
        header = request.headers.get("Authorization", "")
        scheme, _, tok = header.partition(" ")
        tok = tok.strip()
        if scheme.lower() == "bearer" and tok and (tok in self.tokens or tok in self._rules):
            return tok
        raise ApiError(401, "Unauthorized")

    def _authorize(
        self, request: web.Request, verb: str, resource: str, namespace: str | None, name: str | None = None
    ) -> None:
        rule = self._rules.get(request.get(_TOKEN, ""))
        if rule is None:
            return
        if (rule.verbs is not None and verb not in rule.verbs) or (
            rule.resources is not None and resource not in rule.resources
        ):
            return
        group = self._group(resource)
        what = f'{qualified(resource, group)} "{name}"' if name else qualified(resource, group)
        where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        details: dict[str, Any] = {}
        if name:
            details["name"] = name
        if group:
            details["group"] = group
        details["kind"] = resource
        raise ApiError(
            403,
            f'{what} is forbidden: User "{rule.user}" cannot {verb} resource "{resource}" '
            f'in API group "{group}" {where}',
            details=details,
        )

    @staticmethod
    def _group(resource: str) -> str:
        return COORDINATION if resource == "leases" else ""

    # discovery

    async def _version(self, request: web.Request) -> web.StreamResponse:
        major, minor = self.git_version.lstrip("v").split(".")[:2]
        return _json(
            {
                "major": major,
                "minor": minor,
                "gitVersion": self.git_version,
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2023-01-01T00:00:00Z",
                "goVersion": "go1.20.10",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    async def _api(self, request: web.Request) -> web.StreamResponse:
        address = self.url.removeprefix("http://")
        return _json(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
            }
        )

    def _group_doc(self) -> dict[str, Any]:
        gv = {"groupVersion": f"{COORDINATION}/v1", "version": "v1"}
        return {"name": COORDINATION, "versions": [gv], "preferredVersion": gv}

    async def _apis(self, request: web.Request) -> web.StreamResponse:
        return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": [self._group_doc()]})

    async def _coordination_group(self, request: web.Request) -> web.StreamResponse:
        return _json({"kind": "APIGroup", "apiVersion": "v1", **self._group_doc()})

    @staticmethod
    def _resource_doc(name: str, kind: str, short: list[str] | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": name,
            "singularName": "",
            "namespaced": True,
            "kind": kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update"]
            + (["watch"] if name == "events" else []),
        }
        if short:
            doc["shortNames"] = short
        return doc

    async def _core_resources(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [
                    self._resource_doc("configmaps", "ConfigMap", ["cm"]),
                    self._resource_doc("events", "Event", ["ev"]),
                ],
            }
        )

    async def _coordination_resources(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{COORDINATION}/v1",
                "resources": [self._resource_doc("leases", "Lease")],
            }
        )

    # events list / watch

    async def _events_get(self, request: web.Request) -> web.StreamResponse:
        ns = request.match_info.get("ns")
        q = request.query
        watching = q.get("watch", "") in TRUE or "/watch/" in request.path
        verb = "watch" if watching else "list"
        self._authorize(request, verb, "events", ns)
        fields = FieldSelector(q.get("fieldSelector", ""), EVENT_FIELDS)
        labels = LabelSelector(q.get("labelSelector", ""))
        fault = self.faults.take(verb, "events")
        if fault is not None and fault.kind == "fail":
            raise self._fault_error(fault, request.headers)
        if fault is not None and fault.kind == "page":
            return await self._error_page(request, fault)
        if fault is not None and fault.kind == "unreadable":
            return await self._unreadable_error(request, fault)
        if watching:
            return await self._watch(request, ns, fields, labels, fault)
        await self._cache_fresh(q)
        response = self._list(ns, q, fields, labels)
        if fault is not None and fault.kind == "list_item" and isinstance(response.body, bytes):
            body, extra = response.body, fault.raw
            items_open = body.rindex(b'"items":[') + len(b'"items":[')
            sep = b"," if body[items_open : items_open + 1] != b"]" else b""
            response.body = body[:items_open] + extra + sep + body[items_open:]
        return response

    async def _error_page(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        resp = web.StreamResponse(status=fault.status, headers={"Content-Type": "text/html"})
        resp.content_length = fault.size
        await resp.prepare(request)
        sent = 0
        first = ERROR_PAGE
        if fault.echo is not None:
            header = request.headers.get(fault.echo, "")
            if fault.echo_basic:
                user, password = (html.escape(part, quote=False) for part in _basic(header))
                quoted = f"<p>password {password} refused for {user}</p>".encode()
            else:
                quoted = f"<p>{fault.echo}: {header}</p>".encode()
            first = ERROR_PAGE[: fault.echo_at] + quoted + ERROR_PAGE[fault.echo_at :]
        try:
            while sent < fault.size:
                piece = (ERROR_PAGE if sent else first)[: fault.size - sent]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client closed the connection: the rest is never sent
        finally:
            self.faults.pages_sent.append(sent)
        return resp

    async def _unreadable_error(self, request: web.Request, fault: _Fault) -> web.StreamResponse:
        body = orjson.dumps(self._fault_error(fault).status)
        resp = web.StreamResponse(status=fault.status, headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:40])
        if fault.seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.seconds)
        if request.transport is not None:
            request.transport.abort()  # the client sees a body cut short
        return resp

    def _injected(self, verb: str, resource: str) -> None:
        fault = self.faults.take(verb, resource)
        if fault is not None:
            raise self._fault_error(fault)

    @staticmethod
    def _fault_error(fault: _Fault, sent: Mapping[str, str] | None = None) -> ApiError:
        """``sent``: the request's headers, for a fault that quotes one."""
        message = fault.message or DEFAULT_MESSAGES.get(fault.status, "injected fault")
        if fault.echo is not None and sent is not None:
            if fault.echo_basic:
                user, password = _basic(sent.get(fault.echo, ""))
                message += f" (password {password} refused for {user})"
            else:
                message += f" (refused {fault.echo}: {sent.get(fault.echo, '')})"
        headers: dict[str, str] = {}
        details: dict[str, Any] | None = None
        if fault.retry_after is not None:
            seconds = max(0, math.ceil(fault.retry_after))
            headers["Retry-After"] = str(seconds)
            details = {"retryAfterSeconds": seconds}
        elif fault.status == 500:
            details = {"causes": [{"message": "injected fault"}]}
        return ApiError(fault.status, message, details=details, headers=headers)

    def _list(
        self, ns: str | None, q: Mapping[str, str], fields: FieldSelector, labels: LabelSelector
    ) -> web.Response:
        store = self._events
        rv_text, match, token = (
            q.get("resourceVersion", ""),
            q.get("resourceVersionMatch", ""),
            q.get("continue", ""),
        )
        try:
            limit = int(q.get("limit", "0") or "0")
        except ValueError:
            raise bad_request(f"invalid limit: {q.get('limit')!r}") from None
        if match not in ("", "Exact", "NotOlderThan"):
            raise bad_request(f'resourceVersionMatch: Unsupported value: "{match}"')
        if match and not rv_text:
            raise bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")
        if match and token:
            raise bad_request("resourceVersionMatch is forbidden when continue is provided")
        if match == "Exact" and rv_text == "0":
            raise bad_request('resourceVersionMatch "exact" is forbidden for resourceVersion "0"')
        rv = _parse_rv(rv_text) if rv_text else None
        current = self._revision.value
        if rv is not None and rv > current and not token:
            if self._from_cache(rv_text, match, limit, token):
                # watchCache.waitUntilFreshAndBlock: not caught up within 3 s (see _events_get).
                raise too_large_rv(rv, current, retry_seconds=1)
            if match == "Exact" or (not match and limit > 0):
                raise ApiError(500, FUTURE_REVISION)  # etcd is asked for that revision
            # The etcd3 store's validateMinimumResourceVersion: its latest revision is older.
            raise too_large_rv(rv, current, retry_seconds=0)
        if token:
            if rv_text not in ("", "0"):
                raise bad_request("specifying resource version is not allowed when using continue")
            at, start = _decode_continue(token)
            if ns is not None:
                start = f"{ns}/{start}"
            if at == -1:
                snap = store.snapshot()
            elif at < store.oldest_valid:
                raise ApiError(
                    410, INCONSISTENT_CONTINUE, continue_token=_encode_continue(-1, self._relative(start, ns))
                )
            else:
                snap = store.snapshot(at)
            return self._page(snap, ns, start, limit, fields, labels)
        if (rv_text == "0" and self.watch_cache) or (limit <= 0 and match != "Exact"):
            # The watch cache answers: its whole current state, limit ignored (kube-apiserver 1.24).
            return self._page(store.snapshot(), ns, "", 0, fields, labels)
        if not rv or match == "NotOlderThan":  # 0 without the cache: etcd's latest, paged
            snap = store.snapshot()
        else:
            if rv < store.oldest_valid:
                raise ApiError(410, EXPIRED_LIST)
            snap = store.snapshot(rv)
        return self._page(snap, ns, "", limit, fields, labels)

    def _from_cache(self, rv_text: str, match: str, limit: int, token: str) -> bool:
        """Whether the watch cache serves a list (1.24's cacher.shouldDelegateList, negated): a consistent
        read, a continue, a limit at a resourceVersion other than 0 and Exact all go to etcd."""
        delegate = not rv_text or bool(token) or (limit > 0 and rv_text != "0") or match == "Exact"
        return self.watch_cache and not delegate

    async def _cache_fresh(self, q: Mapping[str, str]) -> None:
        """A list the watch cache serves at a resourceVersion it has not reached waits up to 3 s for
        it (the cacher's waitUntilFreshAndBlock); _list then answers it, or the 504."""
        rv_text = q.get("resourceVersion", "")
        try:
            rv, limit = int(rv_text), int(q.get("limit", "0") or "0")
        except ValueError:
            return  # _list refuses it
        match, token = q.get("resourceVersionMatch", ""), q.get("continue", "")
        if rv > self._revision.value and self._from_cache(rv_text, match, limit, token):
            with contextlib.suppress(TimeoutError):
                await self.wait_until(lambda: self._revision.value >= rv, timeout=CACHE_BLOCK_TIMEOUT)

    @staticmethod
    def _relative(key: str, ns: str | None) -> str:
        return key.split("/", 1)[1] if ns is not None else key

    def _page(
        self,
        snap: Snapshot,
        ns: str | None,
        start: str,
        limit: int,
        fields: FieldSelector,
        labels: LabelSelector,
    ) -> web.Response:
        lo, hi = snap.range(ns, start)
        filtering = not fields.empty or not labels.empty
        items: list[bytes] = []
        i = lo
        while i < hi and (limit <= 0 or len(items) < limit):
            s = snap.objs[i]
            i += 1
            if filtering and not (
                fields.matches(s.fields(event_fields)) and (labels.empty or labels.matches(s.labels))
            ):
                continue
            items.append(s.item)
        meta: dict[str, Any] = {"resourceVersion": str(snap.rv)}
        if limit > 0 and len(items) >= limit and i < hi:
            meta["continue"] = _encode_continue(snap.rv, self._relative(snap.keys[i - 1], ns) + "\x00")
            if not filtering:  # etcd only counts what is left when no predicate filters
                meta["remainingItemCount"] = hi - i
        body = (
            b'{"kind":"EventList","apiVersion":"v1","metadata":'
            + orjson.dumps(meta)
            + b',"items":['
            + b",".join(items)
            + b"]}"
        )
        return _json(body)

    def _bookmark(self, rv: int, *, initial_end: bool = False) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(rv), "creationTimestamp": None}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        # An empty Event as the Go encoder writes the cacher's bookmark object.
        obj = {
            "kind": "Event",
            "apiVersion": "v1",
            "metadata": meta,
            "involvedObject": {},
            "source": {},
            "firstTimestamp": None,
            "lastTimestamp": None,
            "eventTime": None,
            "reportingComponent": "",
            "reportingInstance": "",
        }
        return b'{"type":"BOOKMARK","object":' + orjson.dumps(obj) + b"}\n"

    async def _watch(
        self,
        request: web.Request,
        ns: str | None,
        fields: FieldSelector,
        labels: LabelSelector,
        fault: _Fault | None,
    ) -> web.StreamResponse:
        q = request.query
        rv_text = q.get("resourceVersion", "")
        since = _parse_rv(rv_text) if rv_text not in ("", "0") else None
        timeout: float | None = self.default_watch_timeout
        if q.get("timeoutSeconds"):
            try:
                timeout = float(int(q["timeoutSeconds"]))
            except ValueError:
                raise bad_request(f"invalid timeoutSeconds: {q['timeoutSeconds']!r}") from None
        # Bookmarks come from the watch cache; etcd's watch has none to send.
        bookmarks = q.get("allowWatchBookmarks", "") in TRUE and self.watch_cache
        send_initial = q.get("sendInitialEvents", "") in TRUE
        if send_initial and not (bookmarks and q.get("resourceVersionMatch") == "NotOlderThan"):
            raise invalid(
                "ListOptions",
                "",
                "meta.k8s.io",
                "sendInitialEvents",
                "FieldValueForbidden",
                "Forbidden: sendInitialEvents requires setting allowWatchBookmarks=true and "
                "resourceVersionMatch=NotOlderThan",
            )
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout and timeout > 0 else math.inf

        if fault is not None and fault.kind in ("empty", "stall"):
            await resp.prepare(request)
            if fault.kind == "stall":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), min(fault.seconds, deadline - loop.time()))
                if fault.reset and request.transport is not None:
                    request.transport.abort()  # no terminating chunk: the client sees a broken body
                    return resp
            await resp.write_eof()
            return resp

        if since is not None and not send_initial and since < self._events.oldest_valid:
            # "Too old" comes inside a 200 stream, which then ends (the cacher's words, or etcd's).
            await resp.prepare(request)
            message = (
                f"too old resource version: {since} ({self._events.oldest_valid})"
                if self.watch_cache
                else "The resourceVersion for the provided watch is too old."
            )
            status = ApiError(410, message).status
            await resp.write(_error_line(status))
            await resp.write_eof()
            return resp

        initial = [self._bookmark(self._revision.value, initial_end=True)] if send_initial else []
        watcher = self._events.watch(
            namespace=ns,
            fields=fields,
            labels=labels,
            since=None if send_initial else since,
            initial=initial,
        )
        try:
            await resp.prepare(request)
            await self._stream(request, resp, watcher, fault, bookmarks, deadline)
        except (ConnectionError, asyncio.CancelledError):
            return resp
        finally:
            self._events.unwatch(watcher)
        return resp

    async def _stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        w: Watcher,
        fault: _Fault | None,
        bookmarks: bool,
        deadline: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        sent = 0
        next_bookmark = loop.time() + self.bookmark_interval if bookmarks else math.inf
        malformed_at = fault.after_lines if fault is not None and fault.kind == "malformed" else None
        cut_at = fault.after_lines if fault is not None and fault.kind == "cut" else None
        while not w.terminated and not self._closing.is_set():
            now = loop.time()
            if now >= deadline:
                break
            if malformed_at is not None and sent >= malformed_at:
                await resp.write(fault.raw if fault is not None else MALFORMED_LINE)
                malformed_at = None
                continue
            if w.queue:
                batch: list[bytes] = []
                size = 0
                room = math.inf
                if malformed_at is not None:
                    room = malformed_at - sent
                if cut_at is not None:
                    room = min(room, cut_at - sent)
                while w.queue and len(batch) < 1000 and size < 1 << 20 and len(batch) < room:
                    line = w.queue.popleft()
                    batch.append(line)
                    size += len(line)
                if batch:
                    await resp.write(b"".join(batch))
                    sent += len(batch)
                    continue
                if cut_at is not None and sent >= cut_at:
                    line = w.queue.popleft()
                    if fault is not None and fault.mid_object:
                        await resp.write(line[: max(1, len(line) // 2)])
                    # Reset without the terminating chunk: the client sees a broken body.
                    if request.transport is not None:
                        request.transport.abort()
                    raise ConnectionResetError("injected cut")
                continue
            if now >= next_bookmark:
                if self._revision.value >= w.start_rv:
                    # Nothing at or below a watch's resourceVersion: no bookmark while the store is
                    # behind it (restored from a snapshot).
                    w.queue.append(self._bookmark(self._revision.value))
                next_bookmark = now + self.bookmark_interval
                continue
            w.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.wake.wait(), min(deadline, next_bookmark, now + 0.25) - now)
            if request.transport is None or request.transport.is_closing():
                return  # the client went away: stop watching even if nothing is written
        if not request.transport or request.transport.is_closing():
            return
        if w.reset:
            request.transport.abort()  # no terminating chunk: the client sees a broken body
            return
        await resp.write_eof()

    # generic object verbs

    def _res(self, resource: str) -> _Resource:
        return self._resources[resource]

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from None

    async def _simple_list(self, request: web.Request, resource: str) -> web.StreamResponse:
        ns = request.match_info["ns"]
        if request.query.get("watch", "") in TRUE:
            raise ApiError(405, f"this test server does not watch {resource}")
        self._authorize(request, "list", resource, ns)
        self._injected("list", resource)
        res = self._res(resource)
        body = (
            b'{"kind":"'
            + res.list_kind.encode()
            + b'","apiVersion":"'
            + res.store.api_version.encode()
            + b'","metadata":'
            + orjson.dumps({"resourceVersion": str(self._revision.value)})
            + b',"items":['
            + b",".join(s.item for s in res.store.list(ns))
            + b"]}"
        )
        return _json(body)

    async def _get(self, request: web.Request, resource: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        self._authorize(request, "get", resource, ns, name)
        self._injected("get", resource)
        return _json(self._res(resource).store.get(ns, name).raw)

    def _check_identity(self, obj: Any, ns: str, name: str | None) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise bad_request("the object provided is unrecognized (must be of type object)")
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if meta.get("namespace") and meta["namespace"] != ns:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        if name is not None and meta.get("name") and meta["name"] != name:
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
        meta["namespace"] = ns
        return obj

    async def _create(self, request: web.Request, resource: str) -> web.StreamResponse:
        ns = request.match_info["ns"]
        self._authorize(request, "create", resource, ns)
        self._injected("create", resource)
        obj = self._check_identity(await self._body(request), ns, None)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise ApiError(
                500, "Internal error occurred: resourceVersion should not be set on objects to be created"
            )
        # The server owns identity and creation time.
        meta.pop("uid", None)
        meta.pop("creationTimestamp", None)
        return _json(self._res(resource).store.create(obj).raw, 201)

    def _write(self, res: _Resource, ns: str, name: str, obj: dict[str, Any], current: Stored) -> Stored:
        meta = obj["metadata"]
        given = meta.get("resourceVersion")
        if given:
            if str(given) != str(current.rv):
                raise conflict(res.store.resource, name, res.store.group)
        elif not res.unconditional_update:
            # The store names the resource here, not the kind (registry/store.go: "TODO: The Invalid
            # error should have a field for Resource").
            raise invalid(
                res.store.resource,
                name,
                res.store.group,
                "metadata.resourceVersion",
                "FieldValueInvalid",
                "Invalid value: 0x0: must be specified for an update",
            )
        # uid and creationTimestamp cannot be changed by an update.
        meta["uid"] = current.obj["metadata"].get("uid")
        meta["creationTimestamp"] = current.obj["metadata"].get("creationTimestamp")
        return res.store.replace(ns, name, obj)

    async def _put(self, request: web.Request, resource: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        self._authorize(request, "update", resource, ns, name)
        self._injected("update", resource)
        res = self._res(resource)
        obj = self._check_identity(await self._body(request), ns, name)
        obj["metadata"]["name"] = name
        current = res.store.objects.get(f"{ns}/{name}")
        if current is None and not res.create_on_update:
            raise ApiError(
                404,
                f'{qualified(resource, res.store.group)} "{name}" not found',
                details={
                    "name": name,
                    **({"group": res.store.group} if res.store.group else {}),
                    "kind": resource,
                },
            )
        # An update is conditional on the uid it carries (rest.defaultUpdatedObjectInfo): checked
        # against the stored object, or an empty one when the PUT would create it.
        uid = obj["metadata"].get("uid")
        stored_uid = "" if current is None else current.obj["metadata"].get("uid", "")
        if uid and uid != stored_uid:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {qualified(resource, res.store.group)} "{name}": '
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: {stored_uid}",
                reason="Conflict",
                details={
                    "name": name,
                    **({"group": res.store.group} if res.store.group else {}),
                    "kind": resource,
                },
            )
        if current is None:
            # AllowCreateOnUpdate (leases, events): created whatever resourceVersion it carries.
            obj["metadata"].pop("resourceVersion", None)
            return _json(res.store.create(obj).raw, 201)
        return _json(self._write(res, ns, name, obj, current).raw)

    async def _patch(self, request: web.Request, resource: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        self._authorize(request, "patch", resource, ns, name)
        self._injected("patch", resource)
        res = self._res(resource)
        current = res.store.get(ns, name)
        patched = apply_patch(
            request.headers.get("Content-Type", ""), current.copy(), await self._body(request)
        )
        meta = patched.get("metadata")
        if not isinstance(meta, dict) or meta.get("name") != name or meta.get("namespace") != ns:
            raise bad_request("the patch may not change the name or namespace of the object")
        if not meta.get("resourceVersion"):
            meta["resourceVersion"] = str(current.rv)
        return _json(self._write(res, ns, name, patched, current).raw)

    async def _delete(self, request: web.Request, resource: str) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["name"]
        self._authorize(request, "delete", resource, ns, name)
        self._injected("delete", resource)
        res = self._res(resource)
        current = res.store.get(ns, name)
        raw = await request.read()
        options = orjson.loads(raw) if raw.strip() else {}
        pre = options.get("preconditions") or {} if isinstance(options, dict) else {}
        uid = current.obj["metadata"].get("uid")
        if pre.get("uid") and pre["uid"] != uid:
            raise ApiError(
                409,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {uid}",
                details={"name": name, "kind": resource},
            )
        if pre.get("resourceVersion") and str(pre["resourceVersion"]) != str(current.rv):
            raise ApiError(
                409,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                f"ResourceVersion in object meta: {current.rv}",
                details={"name": name, "kind": resource},
            )
        res.store.delete(ns, name)
        details: dict[str, Any] = {"name": name}
        if res.store.group:
            details["group"] = res.store.group
        details["kind"] = resource
        details["uid"] = uid
        return _json(
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
        )
