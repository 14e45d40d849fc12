"""List (paged) then watch core/v1 events, for the cluster or one namespace.

Relists on 410 Gone (list continue or in-stream ERROR) and on a watch that closes at once without a
line (kubernetes#104171: a stale resourceVersion can yield an empty 200 instead of 410). Reconnects
with jittered exponential backoff. resourceVersions are opaque: never compared numerically; after a
break that looks like an API server restart, the server is asked whether its store went back behind
ours (an etcd restore), and then the watcher relists.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from eventrouter.metrics import Metrics
from eventrouter.record import MalformedEvent, Occurrence, list_item
from eventrouter.source import list_page, unicode_repair
from eventrouter.source.kube import ApiError, KubeClient, answer_text, api_error, error_body, raise_for_status
from eventrouter.source.relist_merge import Member, RelistFailed, RelistMerge
from eventrouter.source.relist_order import RelistOrder
from eventrouter.source.tracker import OccurrenceTracker

__all__ = ["EventWatcher", "WatchSettings", "shared_relists"]

log = logging.getLogger(__name__)


class _Expired(Exception):
    """The resourceVersion we hold is gone: relist."""


class RoomWait(Protocol):
    """``Fanout.wait_for_room`` as a watcher calls it: ``progress`` is called each time a sink it
    waits for takes a batch, so a watcher waiting its turn behind a slow but working sink is not
    judged stalled by /healthz."""

    def __call__(self, *, progress: Callable[[], object]) -> Awaitable[object]: ...


# The field labels kube-apiserver indexes for core/v1 Events (pkg/registry/core/event/strategy.go).
EVENT_FIELD_LABELS = (
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)
_SELECTOR_TERM = re.compile(r"((?:[^\\=!]|\\.)*?)(!=|==|=)((?:[^\\=,]|\\[\\,=])*)")


def check_field_selector(text: str) -> None:
    """Raise ValueError for a selector the API server refuses (as fields.ParseSelector does: nothing
    is trimmed, so "type=Warning, reason=BackOff" names a field " reason"): sent as it was, every list
    failed with 400 and the router retried for ever, never ready."""
    for term in re.split(r"(?<!\\),", text):
        if not term:
            continue
        m = _SELECTOR_TERM.fullmatch(term)
        if m is None:
            raise ValueError(
                f"cannot understand {term!r} (field=value, field==value or field!=value; a comma, "
                "an = or a backslash in a value is escaped with a backslash)"
            )
        if m.group(1) not in EVENT_FIELD_LABELS:
            raise ValueError(
                f"field {m.group(1)!r} cannot select Events (use one of {', '.join(EVENT_FIELD_LABELS)})"
            )


READ_TIMEOUT_MARGIN = 40
"""Seconds the client waits beyond the watch's server-side timeout before calling it stuck."""

PAGE_BYTES = 8 * 1024 * 1024
"""The body a list page aims at. A page is held about twice over while it is handed on (its parsed
items, their raw JSON), and core/v1 Events have no bound on ``message`` (etcd's ~1.5 MiB an object):
pages of 500 items of 1 MB took the router past its chart's 256 MiB limit at every start."""
PAGE_MAX_BYTES = 2 * PAGE_BYTES
"""A page read past this is dropped and asked again with an eighth of the items (its continue token
still holds): the items after a page of small ones may be large."""
FIRST_PAGE = 16
"""Items of a list's first page; later pages grow (at most 4-fold a page) while they stay small."""
PROBE_TIMEOUT = 30.0
"""Seconds for the check that the API server's store is not behind our resourceVersion."""
_CHECKING = "checking that the store is not behind our resourceVersion: "
EARLY_END = 0.9
"""A watch that ends cleanly before this share of its ``timeoutSeconds`` was ended by the server: the
store behind it is checked as after a break."""


@dataclass(frozen=True, slots=True)
class WatchSettings:
    page_size: int = 500
    """Most items per list page (``limit``); keeps memory flat while relisting large clusters. Pages
    are bounded by bytes too (``PAGE_BYTES``)."""
    watch_timeout: int = 290
    """Server-side ``timeoutSeconds``: the API server ends each watch after this and we reopen it."""
    read_timeout: float = 330.0
    """Client-side bound on silence within a watch; longer means the stream is stuck. Raised to
    ``watch_timeout + READ_TIMEOUT_MARGIN`` when below it: a quiet watch (no bookmarks, which
    kube-apiserver serves Events without by default) must end by its server-side timeout, not in a
    read timeout that counts as a broken connection."""
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    field_selector: str = ""
    """Server-side field selector (e.g. ``type=Warning``) to cut traffic at the source."""
    label_selector: str = ""
    max_line_bytes: int = 16 * 1024 * 1024
    """One watch line above this is treated as a broken stream (Events are limited to ~1 MiB)."""
    relist_sorted: bool = False
    """Hand a list's new occurrences on oldest-first; the router turns it on when a sink asks for
    time order (``Sink.wants_time_order``: Loki refuses entries over an hour out of order)."""
    relist_dir: str | None = None
    """Where a large relist waits for sorting (default: the system temp dir; --data-dir when set)."""

    def __post_init__(self) -> None:
        if self.watch_timeout < 1:
            # 0 lets the API server pick (30-60 min with the default --min-request-timeout), beyond
            # any read timeout we could derive from it.
            raise ValueError(f"watch_timeout must be at least 1 second, not {self.watch_timeout}")
        floor = self.watch_timeout + READ_TIMEOUT_MARGIN
        if self.read_timeout < floor:
            object.__setattr__(self, "read_timeout", float(floor))


def shared_relists(settings: WatchSettings, cluster: str) -> RelistMerge | None:
    """What a router's watchers share when relists are sorted (``relists`` of each EventWatcher):
    relists at the same time, in several namespaces, are handed on in one time order within one
    memory budget. A round waits for a watcher that is reconnecting at most as long as two of its
    longest backoffs (a Retry-After is honoured up to one) and a request."""
    if not settings.relist_sorted:
        return None
    return RelistMerge(cluster=cluster, directory=settings.relist_dir, gather=2 * settings.backoff_max + 5.0)


REFUSED = frozenset({400, 401, 403, 404, 405, 406, 415, 422})
"""API answers a retry soon will not change: a relisting round does not wait for such a watcher."""


def _checking(exc: ApiError) -> ApiError:
    """``exc`` said of the check that the store is not behind (``_store_behind``)."""
    return ApiError(exc.status, exc.reason, f"{_CHECKING}{exc.message}", exc.retry_after)


class EventWatcher:
    def __init__(
        self,
        kube: KubeClient,
        *,
        namespace: str | None,
        tracker: OccurrenceTracker,
        publish: Callable[[Occurrence], None],
        forget: Callable[[list[str]], None],
        listed: Callable[[str | None], None],
        metrics: Metrics,
        settings: WatchSettings | None = None,
        room: RoomWait | None = None,
        needed: Callable[[Occurrence], bool] | None = None,
        relists: RelistMerge | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.tracker = tracker
        self.publish = publish
        self.forget = forget
        self.listed = listed
        self.room = room
        self.needed = needed  # False when every sink already accepted the occurrence
        self.metrics = metrics
        self.settings = settings or WatchSettings()
        self.path = f"/api/v1/namespaces/{namespace}/events" if namespace else "/api/v1/events"
        self.where = f"namespace {namespace}" if namespace else "all namespaces"
        self.initial_list_done = asyncio.Event()
        self.listing = False  # a list is in progress or failed: the tracker is not a complete picture
        # Wall clock, exported as a gauge; /healthz judges by the monotonic one: a clock stepped
        # forward by more than --stall-timeout (NTP, a VM resumed) failed it on a healthy watch.
        self.last_progress = time.time()
        self.progressed = time.monotonic()
        self.resource_version: str | None = None
        self.watch_worked = False  # the last _watch handled a line (or stayed open a while)
        self.watch_lasted = False  # the last _watch stayed open longer than the longest backoff
        # Label children resolved once: a lookup per watch line is measurable at thousands per second.
        self._m_types = {
            t: metrics.watch_events.labels(t) for t in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "LIST")
        }
        self._m_occurrences = metrics.occurrences
        self._counts = dict.fromkeys(self._m_types, 0)
        self._new_occurrences = 0
        # Sorted relists go through rounds shared with the router's other watchers (relist_merge).
        if self.settings.relist_sorted and relists is None:
            relists = shared_relists(self.settings, tracker.cluster)
        self._seat = (
            relists.seat(self.where, self._progress)
            if relists is not None and self.settings.relist_sorted
            else None
        )

    def flush_metrics(self) -> None:
        """Move the per-line counts into the Prometheus counters (per page, per stream end, per scrape)."""
        for kind, n in self._counts.items():
            if n:
                self._m_types[kind].inc(n)
                self._counts[kind] = 0
        if self._new_occurrences:
            self._m_occurrences.inc(self._new_occurrences)
            self._new_occurrences = 0

    def _progress(self, now: float | None = None) -> None:
        # The gauge is refreshed from last_progress when /metrics is scraped, not per line.
        self.last_progress = now or time.time()
        self.progressed = time.monotonic()

    def _selectors(self) -> list[tuple[str, str]]:
        q: list[tuple[str, str]] = []
        if self.settings.field_selector:
            q.append(("fieldSelector", self.settings.field_selector))
        if self.settings.label_selector:
            q.append(("labelSelector", self.settings.label_selector))
        return q

    # ---- objects ------------------------------------------------------------------------------

    def _handle(self, kind: str, obj: Any, received_at: float, order: Member | None = None) -> None:
        if kind in self._counts:
            self._counts[kind] += 1
        else:
            self.metrics.watch_events.labels(kind).inc()
        if kind == "DELETED":
            uid = self.tracker.deleted(obj)
            if uid:
                self.forget([uid])
            return
        try:
            occ = self.tracker.observe(obj, received_at=received_at)
        except MalformedEvent as exc:
            self.metrics.source_dropped.labels("malformed").inc()
            log.warning("dropped a malformed event from %s: %s", self.where, exc)
            return
        except Exception as exc:
            # A value normalise did not foresee: drop this object, counted, and keep the stream.
            # Raising would break the watch, and the reconnect would replay the same object forever.
            self.metrics.source_dropped.labels("malformed").inc()
            log.warning(
                "dropped an event from %s that could not be normalised: %s: %s",
                self.where,
                type(exc).__name__,
                exc,
            )
            return
        if occ is None:
            if self.tracker.dropped:  # a lowered count, a series that moved without a number
                for reason, n in self.tracker.take_dropped().items():
                    self.metrics.source_dropped.labels(reason).inc(n)
            return
        if order is not None and (self.needed is None or self.needed(occ)):
            order.add(occ)  # handed on oldest-first once the list is complete
            return
        self._new_occurrences += 1
        self.publish(occ)

    # ---- list ---------------------------------------------------------------------------------

    async def _list(self) -> str:
        """Paged list; every item goes through the tracker as it arrives. Returns the list's RV.

        Sorted, new occurrences are handed on once the list is complete, oldest first, with those of
        the other namespaces relisting at the same time (``relist_merge``); those every sink already
        accepted go on at once (the sinks skip them, counted)."""
        member = self._seat.join(self._hand_on) if self._seat is not None else None
        self.listing = True
        try:
            rv, live = await self._list_pages(member)
            if member is not None:
                await member.listed()
        except BaseException:
            if member is not None:
                # Not handed on: the next relist must see them as new again.
                for uid in member.leave():
                    self.tracker.seen.pop(uid, None)
            raise  # `listing` stays True until a list succeeds: the tracker is incomplete till then
        if member is not None:
            member.leave()
        self.listing = False
        self.tracker_gc(live)
        self.listed(self.namespace)
        self.tracked_gauge()
        return rv

    async def _read_page(self, query: list[tuple[str, str]], limit: int) -> bytearray | None:
        """A list page's body; None when it grew past ``PAGE_MAX_BYTES`` with more than one item
        asked for (dropped unread: ask again with fewer). Gathered in one growing buffer: aiohttp's
        ``read`` joins its chunks, two copies of the page at once."""
        resp = await self.kube.request("GET", self.path, query)
        try:
            await raise_for_status(resp)
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > PAGE_MAX_BYTES and limit > 1:
                    resp.close()
                    return None
            return body
        finally:
            resp.release()

    def _next_limit(self, limit: int, items: int, size: int) -> int:
        """The next page's ``limit``: as many items as fit ``PAGE_BYTES`` at this page's bytes per
        item, at most 4 times this one's and ``page_size``."""
        per_item = size / max(1, items)
        fit = int(PAGE_BYTES / per_item) if per_item > 0 else self.settings.page_size
        return max(1, min(self.settings.page_size, 4 * limit, fit))

    async def _list_pages(self, order: Member | None) -> tuple[str, set[str]]:
        live: set[str] = set()
        cont = ""
        rv = ""
        limit = min(FIRST_PAGE, self.settings.page_size)
        while True:
            query = [("limit", str(limit)), *self._selectors()]
            if cont:
                query.append(("continue", cont))
            body = await self._read_page(query, limit)
            if body is None:
                log.info(
                    "a list page of %s (%d items) is over %d MiB: asking for fewer",
                    self.where,
                    limit,
                    PAGE_MAX_BYTES >> 20,
                )
                limit = max(1, limit // 8)
                continue
            size = len(body)
            received_at = time.time()
            if self.room is not None and order is None:
                # Every page, the first too, is handed on only once every sink has room, and with no
                # await between that check and the (synchronous) hand-on below: watchers relisting
                # together (start-up, 410s after an API server restart) take turns, and a queue holds
                # at most half its bound plus one page. Checked only between pages, each watcher's
                # first page went out unchecked and all woke together, each with a page of half the
                # queue: the oldest occurrences were dropped (queue_full), and already marked seen,
                # no later relist offered them again. The page waits as its raw bytes. (Sorted, the
                # pages wait for the sinks in _hand_on instead; fetching on keeps continue tokens fresh.)
                await self.room(progress=self._progress)
                self._progress()
            try:
                # One broken string, or one item too deep to parse, must not cost the page: the
                # relist would fail on it forever. Such a page is read again in a thread.
                page = await list_page.read_page(body)
                del body  # parsed: the items hold what is needed
                doc, broken = page.doc, page.broken
                items = doc.get("items") or []
                meta = doc.get("metadata") or {}
                if not isinstance(items, list) or not isinstance(meta, dict):
                    raise TypeError("items is not a list, or metadata not an object")
            except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
                raise ApiError(500, "InvalidList", f"list answer is not an EventList: {exc}") from None
            self._refused_items(page.refused)
            count = len(items) + len(page.refused)
            # Popped as handed on: each parsed item goes once its occurrence is made, not with the page.
            items.reverse()
            while items:
                item = items.pop()
                if broken:
                    item = self._repaired(item, "a list page")
                # With the List's kind and apiVersion, as the watch sends it: the same raw bytes.
                item = list_item(item, doc, "v1")
                self._handle("LIST", item, received_at, order)
                # _handle dropped (and counted) an item without an object as metadata.
                item_meta = item.get("metadata") if isinstance(item, dict) else None
                uid = item_meta.get("uid") if isinstance(item_meta, dict) else None
                if isinstance(uid, str):
                    live.add(uid)
            del doc
            rv = str(meta.get("resourceVersion") or rv)
            cont = str(meta.get("continue") or "")
            limit = self._next_limit(limit, count, size)
            self._progress()
            if order is not None:
                order.page_listed()
            self.flush_metrics()
            if not cont:
                break
        return rv, live

    async def _hand_on(self, order: RelistOrder, where: str, progress: Callable[[], None]) -> None:
        """A round's order to the sinks, oldest first (this watcher's list, or with the lists of the
        namespaces relisting with it); ``progress`` is every such watcher's."""
        log.info("handing %d listed occurrences of %s to the sinks, oldest first", len(order), where)
        chunks = order.drain(self.settings.page_size)
        try:
            while order.left:
                if self.room is not None:
                    # At the sinks' pace, as the list itself: before each chunk, the first too, with
                    # no await between the check and the hand-on. Checked before drain yields the
                    # chunk: a yielded chunk counts as handed on, and a relist failing while it
                    # waited here would have lost it.
                    await self.room(progress=progress)
                    progress()
                chunk = next(chunks)
                for occ in chunk:
                    self.publish(occ)
                self._new_occurrences += len(chunk)
                self.flush_metrics()
                progress()
        finally:
            chunks.close()  # drained: frees the order (its temporary file)

    def _refused_items(self, refused: list[list_page.Refused]) -> None:
        """Items of a list page that did not parse (the page did): counted as objects that are not
        Events, as the same item in a list page that parses is. Each is one JSON value nested too
        deep (``list_page``): a corrupted one that may hold other Events fails the page whole."""
        for item in refused:
            self.metrics.source_dropped.labels("malformed").inc()
            log.warning(
                "skipped a list item from %s that cannot be parsed (%s; %d bytes): %r",
                self.where,
                item.why,
                item.end - item.start,
                item.quote,
            )

    def _repaired(self, obj: Any, where: str) -> Any:
        """``obj`` with its broken strings replaced by U+FFFD; counted and logged by name if any."""
        obj, strings = unicode_repair.repair(obj)
        if strings:
            self.metrics.source_repaired.labels("invalid_unicode").inc()
            log.warning(
                "%s of %s had invalid UTF-8 or lone surrogate escapes in %d strings of event %s:"
                " replaced by U+FFFD, as the API server itself would store them",
                where,
                self.where,
                strings,
                unicode_repair.describe(obj),
            )
        return obj

    def tracker_gc(self, live: set[str]) -> None:
        gone = self.tracker.prune(live)
        if gone:
            log.info("forgot %d events of %s that the API server no longer holds", gone, self.where)

    def tracked_gauge(self) -> None:
        self.metrics.tracked_events.set(len(self.tracker))

    # ---- watch --------------------------------------------------------------------------------

    async def _lines(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """Split the chunked body into lines ourselves: aiohttp's readline caps line length.

        One split per chunk: slicing the rest of the buffer off after each line would copy ~half
        a chunk per line. A line spread over many chunks is joined once, when its newline arrives."""
        limit = self.settings.max_line_bytes
        pending: list[bytes] = []  # the start of a line whose newline has not arrived yet
        pending_len = 0
        async for chunk in resp.content.iter_any():
            if b"\n" not in chunk:
                pending.append(chunk)
                pending_len += len(chunk)
            else:
                parts = chunk.split(b"\n")
                if pending:
                    pending.append(parts[0])
                    parts[0] = b"".join(pending)
                    pending.clear()
                tail = parts.pop()
                for line in parts:
                    if line and not line.isspace():
                        yield line
                if tail:
                    pending.append(tail)
                pending_len = len(tail)
            if pending_len > limit:
                raise ApiError(0, "LineTooLong", f"watch line over {limit} bytes")
        if pending and not b"".join(pending).isspace():
            # The stream ended mid-object (connection cut): what we have is not a whole line.
            raise aiohttp.ClientPayloadError("watch stream ended inside an object")

    async def _watch(self, rv: str) -> str:
        s = self.settings
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", rv),
            ("timeoutSeconds", str(s.watch_timeout)),
            *self._selectors(),
        ]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=s.read_timeout)
        opened = time.monotonic()
        resp = await self.kube.request("GET", self.path, query, timeout=timeout)
        lines = 0
        handled = False
        try:
            await raise_for_status(resp)
            # An open watch is progress too: a quiet cluster on an API server without bookmarks sends
            # no line for a whole watch, and /healthz must not restart a router that is fine.
            self._progress()
            if self._seat is not None:
                self._seat.watch_opened()
            async for line in self._lines(resp):
                lines += 1
                received_at = time.time()
                try:
                    try:
                        ev = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        ev = unicode_repair.parse_refused(line, exc)
                        ev["object"] = self._repaired(ev["object"], "a watch line")
                    kind = ev["type"]
                    obj = ev["object"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    self.metrics.source_dropped.labels("malformed_line").inc()
                    log.warning("skipped a malformed watch line from %s: %r", self.where, line[:200])
                    continue
                self._progress(received_at)
                if kind == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    if code == 410:
                        raise _Expired(str(obj.get("message", "410 Gone")))
                    message = obj.get("message") if isinstance(obj, dict) else obj
                    # A status code, or 500: a list or a huge number crashed the watch task (or became
                    # an unbounded metric label).
                    status = code if type(code) is int and 100 <= code <= 599 else 500
                    raise ApiError(status, "WatchError", answer_text(resp, str(message))[:1000])
                meta = obj.get("metadata") if isinstance(obj, dict) else None
                new_rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
                if kind == "BOOKMARK":
                    self._counts["BOOKMARK"] += 1
                    self.flush_metrics()
                elif kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._handle(kind, obj, received_at)
                else:
                    self.metrics.source_dropped.labels("unknown_watch_type").inc()
                    log.warning("skipped watch event of unknown type %r from %s", kind, self.where)
                if isinstance(new_rv, str) and new_rv:
                    rv = new_rv
                    self.resource_version = rv
                handled = True
        finally:
            resp.release()
            if self._seat is not None:
                self._seat.watch_closed()
            self.flush_metrics()
            # A watch that handled an event or a bookmark, or stayed open longer than the longest
            # backoff, worked: however it ends, the backoff starts over (see run).
            self.watch_lasted = time.monotonic() - opened >= s.backoff_max
            self.watch_worked = handled or self.watch_lasted
        if lines == 0 and time.monotonic() - opened < min(1.0, s.watch_timeout / 2):
            # An empty 200 at once: the resourceVersion is stale (kubernetes#104171). Relist.
            raise _Expired("watch closed at once without any event")
        self.tracked_gauge()
        return rv

    async def _store_behind(self, rv: str) -> str | None:
        """The API server's words when its store is behind ``rv`` (etcd restored from a snapshot:
        its revision went back), None when it is not. A watch at ``rv`` is then not refused: etcd
        and the watch cache send only what comes after ``rv``, so every event written until the
        store passes it again would never come, with no 410 to say so. A list of one item "not older
        than" ``rv`` answers 504 with the cause ResourceVersionTooLarge instead (kube-apiserver's
        validateMinimumResourceVersion), and a 2xx when the store holds ``rv``. Any other answer
        (429, 503, a gateway's 504, a timeout) says nothing: it raises as a failed watch does, and
        the check is asked again after the backoff (see run)."""
        query = [("limit", "1"), ("resourceVersion", rv), ("resourceVersionMatch", "NotOlderThan")]
        resp = await self.kube.request(
            "GET", self.path, query, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
        )
        try:
            if 200 <= resp.status < 300:
                return None
            try:
                body, cut = await error_body(resp)
            except ApiError as exc:  # its body unreadable: a 504 says nothing then
                raise _checking(exc) from None
            if resp.status != 504 or cut:  # a 410 relists; the rest is a failed check
                raise _checking(api_error(resp, body, cut))
        finally:
            resp.release()
        # The request's credentials out of what is quoted: a gateway may quote what it refused.
        message = answer_text(resp, body[:300].decode("utf-8", "replace"), cut=len(body) > 300)
        try:
            status = orjson.loads(body)
            message = answer_text(resp, str(status.get("message") or "Too large resource version"))[:300]
            if any(c.get("reason") == "ResourceVersionTooLarge" for c in status["details"]["causes"]):
                return message
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass
        raise ApiError(resp.status, answer_text(resp, resp.reason or ""), f"{_CHECKING}{message}")

    # ---- loop ---------------------------------------------------------------------------------

    def _resume_from(self, rv: str | None) -> str | None:
        """Where a broken watch goes on: the last resourceVersion it handled, not the one it started
        at. Replayed from the start, an event deleted meanwhile (its uid forgotten, its checkpoint
        entries pruned) would look new and be delivered again. None (a list failed) stays None."""
        return None if rv is None else (self.resource_version or rv)

    def _failed(self, *, refused: bool = False, expired: bool = False) -> None:
        """For relists sharing a round: a watcher refused for good is not waited for, nor one failing
        (other than with a 410) before it was ever healthy."""
        if self._seat is not None:
            self._seat.failed(refused=refused, expired=expired)

    def _failures(self, failures: int) -> int:
        """The failure count after a break. A watch that worked starts it over: counted on, a few
        cuts of working watches (a proxy's or load balancer's connection limit, a reset) within one
        watch timeout backed every reconnect off to 15-30 s, and every event written meanwhile waited
        that long. Storms (errors, 410s and cuts before any line) still back off."""
        return 1 if self.watch_worked else failures + 1

    async def run(self) -> None:
        rv: str | None = None
        failures = 0
        relist_reason = "initial"
        check = False  # the watch ended as an API server restart ends it: is its store behind rv?
        while True:
            # A failing list is not reset by the watch before it.
            self.watch_worked = self.watch_lasted = False
            try:
                if check and rv is not None:
                    # Armed until answered: an unanswered check (a 429 while every client relists
                    # after the restart, a 503 while the server warms up) fails as a watch would,
                    # backs off and asks again. Watching at rv meanwhile would lose every event
                    # written below it, had the store gone back.
                    behind = await self._store_behind(rv)
                    check = False
                    if behind is not None:
                        log.warning(
                            "the API server's store is behind resourceVersion %s of %s (%s): etcd"
                            " restored from a backup? Relisting: a watch would miss every event"
                            " written until the store passes it again",
                            rv,
                            self.where,
                            behind,
                        )
                        rv, relist_reason = None, "rv_regressed"
                if rv is None:
                    check = False  # a list's resourceVersion is the store's own
                    self.metrics.relists.labels(relist_reason).inc()
                    rv = await self._list()
                    self.resource_version = rv
                    if not self.initial_list_done.is_set():
                        log.info("initial list of %s done at resourceVersion %s", self.where, rv)
                    self.initial_list_done.set()
                opened = time.monotonic()
                rv = await self._watch(rv)
                # Ended well before its timeoutSeconds: the server ended it, as one shutting down
                # for a restart may.
                check = time.monotonic() - opened < EARLY_END * self.settings.watch_timeout
                failures = 0
                self.metrics.watch_restarts.labels("timeout").inc()
                continue
            except _Expired as exc:
                if self.watch_lasted:
                    # An in-stream 410 after a watch that went on a while: routine, relisted at once.
                    # Not after one that only handled a line or two: each 410 is a full LIST, and a
                    # watch behind compaction under load (or a broken proxy) that delivers a line and
                    # then 410 every time relisted dozens of times a second, with no backoff.
                    failures = 0
                # Repeats raised while we could not watch fold into one record with the new count.
                # Once after a watch that went well is routine: kube-apiserver serves Events from etcd
                # (no watch cache, no bookmarks by default), so a quiet spell outlives the compacted
                # history. Only a repeat says something is wrong.
                level = logging.INFO if failures == 0 else logging.WARNING
                log.log(level, "resourceVersion expired for %s (%s): relisting", self.where, exc)
                self.metrics.watch_restarts.labels("expired").inc()
                rv, relist_reason = None, "expired"
                failures += 1
                if failures == 1:
                    continue  # the first relist goes at once; storms back off below
                delay_reason = "expired"
                self._failed(expired=True)
            except ApiError as exc:
                failures = self._failures(failures)
                rv = self._resume_from(rv)
                check = check or exc.status >= 500  # still armed when it was the check that failed
                if exc.status == 410:
                    rv, relist_reason = None, "expired"
                level = logging.ERROR if exc.status in (401, 403) else logging.WARNING
                log.log(level, "kubernetes API error for %s: %s", self.where, exc)
                self.metrics.watch_restarts.labels(f"http_{exc.status}" if exc.status else "error").inc()
                delay_reason = "api"
                self._failed(refused=exc.status in REFUSED, expired=exc.status == 410)
                if exc.retry_after:
                    # Honoured up to our own longest backoff: a proxy's "Retry-After: 86400" (or an
                    # unparsable huge one) stopped the watch until the liveness probe restarted us.
                    await asyncio.sleep(min(exc.retry_after, self.settings.backoff_max))
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                failures = self._failures(failures)
                rv = self._resume_from(rv)
                what = "the check of the store behind the watch of" if check else "watch of"
                check = True
                log.warning("%s %s broke: %s: %s", what, self.where, type(exc).__name__, exc)
                self.metrics.watch_restarts.labels("connection").inc()
                delay_reason = "connection"
                self._failed()
            except RelistFailed as exc:
                # The relist it shared with other namespaces failed in another's hand-on (rv is
                # still None): it forgot what was not handed on, and lists again.
                failures = self._failures(failures)
                log.warning("relist of %s failed: %s; relisting", self.where, exc)
                delay_reason = "relist"
                self._failed()
            base = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** min(failures - 1, 16))
            delay = random.uniform(base / 2, base)
            log.debug("reconnecting %s in %.2fs (%s)", self.where, delay, delay_reason)
            await asyncio.sleep(delay)
