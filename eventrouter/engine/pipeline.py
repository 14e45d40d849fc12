"""One pipeline per sink: filter → bounded queue → batcher → send with retries → per-item outcome.

``offer`` never blocks and never raises: a slow or broken sink only fills its own queue, so the
source and the other sinks are never held up. What cannot be kept is counted and logged.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import math
import numbers
import random
import time
import traceback
from collections.abc import Callable, Container, Generator, Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from eventrouter.engine.checkpoint import SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.spool import RETRY_SECONDS, Spool
from eventrouter.logs import Throttled
from eventrouter.metrics import SINK_MODIFIED_REASONS, Metrics, observe_many
from eventrouter.options import PipelineOptions
from eventrouter.record import Occurrence
from eventrouter.scrub import MIN_CUT, Scrubber, option_secrets
from eventrouter.sink import (
    OK,
    STRAY_CANCEL,
    Outcome,
    OutcomeKind,
    RetryableError,
    Sink,
    SinkError,
    cancelled_now,
    raised_by_signal,
    retry,
)

__all__ = ["BLOCKING_STEP", "INTAKE_PATIENCE", "Pipeline"]

INTAKE_PATIENCE = 5.0
"""Seconds in all that a relist waits for a sink that has a disk spool before that sink's overflow
goes to the spool: a slow sink (an Elasticsearch indexing a few hundred documents a second) must not
hold the relist up for the others, and a fast one is never spilled (spilling costs ~20 µs an item)."""

BLOCKING_STEP = 0.5
"""Seconds one synchronous step of a sink's ``send``/``start``/``aclose`` (the code between two of its
awaits) may hold the event loop before it is named: meanwhile the watch, every other sink and
/healthz wait, and ``send_timeout`` cannot cut it."""

BLOCKED_LOG_PERIOD = 60.0
"""At most one warning a minute per sink about blocking the event loop (each one is counted)."""

CUT_OFF_GRACE = 5.0
"""Seconds at most that a sink's call may go on after its cancellation (``send_timeout``, a stop)
before it is named as swallowing it; at least 1 s, else the send_timeout (cleanup that awaits, as
closing a connection, takes less)."""

UNBOUNDED = 1 << 62
"""``queue_max_bytes`` 0: no byte bound."""

INTAKE_ROOM = 32 * 1024 * 1024
"""Bytes (as ``queue_cost`` counts them) a bulk intake may hand on at once after one room check: a list
page (at most 16 MiB of JSON, ``source.watcher.PAGE_MAX_BYTES``) or a sorted relist's chunk (8 MiB),
counted twice. A queue within this of ``queue_max_bytes`` is backlogged, so that the page after the
check still fits: at half the bound, a page of 1 MB events pushed the oldest out (``queue_full``)."""

KEEP_GONE_SECONDS = 1.0
"""How long a stop's ``keep_gone`` reads the spool when its caller gives no deadline (the router's
stop gives one for all its sinks): past it, every mark is kept unchecked."""


class Pipeline:
    def __init__(
        self,
        *,
        name: str,
        sink: Sink[Any],
        options: PipelineOptions,
        predicate: Callable[[Occurrence], bool] | None,
        checkpoint: SinkCheckpoint,
        deadletter: DeadLetter,
        metrics: Metrics,
        spool: Spool | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.sink = sink
        self.options = options
        self.predicate = predicate
        self.checkpoint = checkpoint
        self.deadletter = deadletter
        self.metrics = metrics
        self.spool = spool
        self.log = logger or logging.getLogger(f"eventrouter.sink.{name}")
        self._throttled = Throttled(self.log)
        self._queue: collections.deque[Occurrence] = collections.deque()
        # Offered while the spool holds older occurrences but cannot be written (a full disk): they
        # wait here, behind the spool, and go into the spool once it can be written again.
        self._overflow: collections.deque[Occurrence] = collections.deque()
        # Their bytes as ``queue_cost`` counts them (the items set aside: ``_aside.bytes``), beside their
        # lengths: 80 events of 1 MB fitted the default count bound and took the router past its limit.
        self._queue_bytes = 0
        self._overflow_bytes = 0
        self._wakeup = asyncio.Event()
        # Queue length at which an offer wakes the batcher: 1 while it waits for work, the rest of
        # the batch while it fills one. Waking it per offer cost ~10 loop turns per occurrence and sink.
        # Large occurrences fill a batch by bytes first: ``_wake_bytes`` is the room left in bytes,
        # ``_offered_bytes`` what arrived since the batcher went to wait.
        self._wake_at = 1
        self._wake_bytes = 0
        self._offered_bytes = 0
        self._closing = False
        self._stop_now = asyncio.Event()
        # Set by stop_now and by a reloaded sink: ends a wait between retries or start attempts.
        self._nudge = asyncio.Event()
        self._replacement: Sink[Any] | None = None
        self._superseded: list[Sink[Any]] = []  # replacements replaced before they were used
        # The instance a swap is closing, until the new one's take_over carries its state: what is
        # given up meanwhile is told to it too (its records would be carried over, never dropped).
        self._handing_over: Sink[Any] | None = None
        # A replacement whose start failed while the instance it replaces worked: that one goes on
        # sending, and the replacement's start is tried again at the first send after `_failed_due`.
        self._failed_replacement: Sink[Any] | None = None
        self._failed_tries = 0
        self._failed_due = 0.0
        self._contract_said: set[str] = set()  # outcome contract faults already logged (once each)
        self._secret_forms: dict[int, tuple[object, Scrubber]] = {}  # id(options) → their secrets
        self._blocking = Throttled(self.log, BLOCKED_LOG_PERIOD)
        self._abandoned = False  # the stop went on without this pipeline's task (``abandon``)
        self._in_flight: list[Occurrence] = []
        # The batch being filled (taken from the queue, not sent yet): a cancel while it waits for
        # more must leave it to ``leftovers``, not lose it with the task's frame.
        self._filling: list[Occurrence] = []
        # Sinks that hold items on purpose (alert digests) answer RETRY with a due time; with
        # `defer_retries` those items wait aside while later batches go on (no head-of-line blocking).
        # Any sink may ask the same for single items (``retry(..., defer=True)``: refused for a
        # cause of their own, a Loki stream or an Elasticsearch index, while the rest goes in).
        self._defer = bool(getattr(sink, "defer_retries", False))
        self._aside = _Aside()
        self._deferred = self._aside.heap  # read as a heap; changed only through ``_aside``
        self._seq = itertools.count()
        self._held: dict[str, set[int]] = {}  # uid → occurrence numbers deferred and not finished
        # Events read back from the parked FIFO (refused for long) and not finished since: refused
        # again, they go behind the parked ones (``_to_park``).
        self._went_round: set[str] = set()
        self._failures: dict[tuple[str, int], int] = {}  # deferred occurrence → failed attempts so far
        # Checkpoint entries removed (event deleted) while copies may still wait here: a relist after
        # a restart spills a second copy of each spooled occurrence behind the first. Kept until the
        # backlog is gone, so the copy is still known as delivered (``_note_gone``, ``_trim_gone``).
        self._gone: dict[str, int] = {}
        self._gone_trimmed = 0  # its size when last trimmed to the parked events' marks
        self._deferred_offered = False  # on close, the deferred items were offered once more
        # Deferred occurrences that came from the spool, in memory only: kept in the spool's aside file
        # (``Spool.keep_aside``) before its read position passes them, or a crash would lose them.
        # `_popped`: those of the last refill.
        self._spooled_deferred: set[tuple[str, int]] = set()
        self._popped: list[Occurrence] = []
        self._popped_keys: set[tuple[str, int]] | None = None  # built when needed (``_behind_older``)
        self._parked_read = False  # records read back from the parked FIFO since its position was durable
        # Records spooled before the start, read back and not yet sent (at the queue's front): parked
        # records wait until they have left memory (``_unpark``).
        self._before_start: set[tuple[str, int]] = set()
        self._modified_seen: dict[str, int] = {}  # the sink's ``modified`` totals already exported
        self._done: dict[str, int] = {}  # finished, not yet checkpointed (a lower one is pending)
        # Read from the spool marked owed (see ``Spool``): sent although the checkpoint is past them;
        # a key leaves the set once it finished (accepted, rejected or given up).
        self._owed: set[tuple[str, int]] = set()
        self._spooled_copies = 0  # offered again while the spool holds them (``Spool.holds``)
        self.idle = asyncio.Event()
        self.idle.set()
        self.started = asyncio.Event()
        self.start_tried = asyncio.Event()
        """Set once the sink's first start finished, whether it succeeded or failed."""
        self.healthy = True  # the last send (or start) succeeded
        self._room = asyncio.Event()
        self._room.set()
        # Seconds a relist may still wait for this sink before its overflow goes to the disk spool
        # instead (see Fanout.wait_for_room); renewed each time the sink has caught up.
        self.intake_patience = INTAKE_PATIENCE
        self._received = 0
        self.queue_max = options.queue_bound(spooled=spool is not None)
        self.queue_max_bytes = options.queue_bytes_bound() or UNBOUNDED
        # Items set aside for a key of their own (``defer``: one Loki stream, one index) take at most
        # half the memory bound, so that a key refused for long leaves the other half to the other
        # keys. Beyond it they are parked in the spool, or without one the oldest set aside are
        # dropped (counted). An alert robot's holds and failures are its whole traffic: no share.
        self._aside_max: int | None = None if self._defer else max(1, self.queue_max // 2)
        self._aside_bytes_max = _aside_bytes_share(self.queue_max_bytes)
        # What a refill may read beside a full wait behind an unwritable spool (about a batch, twice
        # its encoded bytes as ``queue_cost`` counts them): with the wait at the whole bound, each
        # refill read one record, and the backlog drained one record a send.
        self._refill_share = min(2 * options.batch_max_bytes, self.queue_max_bytes // 4)
        # Named in every log of a full memory queue: built once, not at each drop (a drop per offer
        # while a live watch outruns a stuck sink without a spool).
        self._bounds = self._name_bounds()
        # Metric children resolved once: label lookups are not free on the hot path.
        m = metrics
        self._m_received = m.received.labels(name)
        self._m_filtered = m.filtered.labels(name)
        self._m_skipped = m.skipped.labels(name)
        self._m_delivered = m.delivered.labels(name)
        self._m_retries = m.retries.labels(name)
        self._m_queue = m.queue_depth.labels(name)
        self._m_queue_bytes = m.queue_bytes.labels(name)
        self._m_spool = m.spool_depth.labels(name)
        self._m_spilled = m.spilled.labels(name)
        self._m_latency = m.send_latency.labels(name)
        self._m_batch = m.batch_size.labels(name)
        self._m_lag = m.delivery_lag.labels(name)
        self._m_event_lag = m.event_lag.labels(name)
        self._m_up = m.sink_up.labels(name)
        self._m_blocked = m.loop_blocked.labels(name)
        self._m_durable = m.checkpoint_durable.labels(name)
        checkpoint.on_write = self._checkpoint_written
        self._m_queue_full = m.dropped.labels(name, "queue_full")
        self._m_spool_error = m.dropped.labels(name, "spool_error")
        self._m_up.set(1)
        m.sink_children(name)
        if spool is not None:
            self._m_spool.set(self._spool_depth())
            # Records dropped over the spool's bound are rebuilt for a sink that hears of given-up
            # occurrences, and only for one (a replacement after a reload is of the same type).
            spool.decode_dropped = type(sink).given_up is not Sink.given_up

    # ---- intake -------------------------------------------------------------------------------

    def offer(self, occ: Occurrence) -> None:
        # Counted in a plain int and added to the Prometheus counter per batch and per scrape: a
        # locked counter update per occurrence and sink is measurable at tens of thousands per second.
        self._received += 1
        if occ.number <= self.checkpoint.accepted(occ.uid):
            self._m_skipped.inc()
            return
        if self.predicate is not None and not self.predicate(occ):
            self._m_filtered.inc()
            if self.log.isEnabledFor(logging.DEBUG):
                rec = occ.record
                self.log.debug(
                    "filtered %s (%s %s %s)", occ.key, rec["type"], rec["namespace"], rec["reason"]
                )
            return
        spool = self.spool
        if spool is not None and spool.held_at_open is not None and spool.holds(occ):
            # The relist after a restart offers again what the spool kept: a second record of each,
            # behind the backlog, filled the bound after a few restarts during an outage, and the
            # bound then dropped the oldest records, the originals.
            self._m_skipped.inc()
            self._spooled_copies += 1
            return
        if self._closing:
            self.metrics.dropped.labels(self.name, "shutdown").inc()
            self._throttled.warning(
                "shutdown", "sink %s: dropped %s offered after shutdown began", self.name, occ.key
            )
            return
        self.idle.clear()
        if spool is not None and (len(spool) or self._overflow):
            # Once spilling starts, everything goes through the spool until it drains: order is kept.
            if not ((not self._overflow or self._spill_overflow()) and self._spill(occ)):
                self._hold_back(occ, queue_cost(occ))
            self._wakeup.set()
            return
        cost = 2 * len(occ.raw_json)  # ``queue_cost``, inline: this runs per occurrence and sink
        held = self._queue_bytes + self._aside.bytes
        # Deferred retries (alert digests) are held in memory too: they count against the bounds.
        full = len(self._queue) + len(self._deferred) >= self.queue_max or (
            held + cost > self.queue_max_bytes and held > 0  # one larger than the bound, alone, fits
        )
        if full:
            if spool is None or not self._spill(occ):
                if spool is not None and len(spool):
                    self._hold_back(occ, cost)
                else:
                    self._into_memory(occ, cost)
        else:
            self._queue.append(occ)
            self._queue_bytes += cost
            if len(self._queue) < self._wake_at:
                self._offered_bytes += occ.size
                if self._offered_bytes < self._wake_bytes:
                    return  # the batch being filled waits for its deadline or for enough to fill it
        self._wakeup.set()

    def _full_for(self, cost: int) -> bool:
        """Memory holds something and has no room for one more occurrence of ``cost`` bytes."""
        count = len(self._queue) + len(self._deferred)
        held = self._queue_bytes + self._aside.bytes
        return count > 0 and (count >= self.queue_max or held + cost > self.queue_max_bytes)

    def _aside_over_share(self) -> bool:
        """Items set aside are over their share of memory, by count or by bytes (one alone never)."""
        return self._aside_max is not None and (
            len(self._deferred) > self._aside_max
            or (self._aside.bytes > self._aside_bytes_max and len(self._deferred) > 1)
        )

    def _into_memory(self, occ: Occurrence, cost: int) -> None:
        """Queue in memory, full (by count or by bytes, ``offer`` found): the oldest occurrence there
        is dropped, counted, until there is room: one large occurrence may need that of several."""
        while True:
            if self._deferred and self._aside_over_share():
                # Items set aside for a refused key over their share give way first: the other keys
                # keep their place (before, each new occurrence pushed out the oldest of another key).
                if self.spool is None:
                    self._drop_aside(1, self._m_queue_full, "")
                else:
                    self._drop_aside(1, self._m_spool_error, " and the disk spool cannot be written")
            else:
                self._drop_oldest()
            if not self._full_for(cost):
                break
        self._queue.append(occ)
        self._queue_bytes += cost

    def _drop_oldest(self) -> None:
        """Drop the oldest occurrence in memory for a newer one: counted, told to the sink, logged
        (throttled; the bounds' text built once: per drop, it made a drop 2.3 times as costly)."""
        if self._queue:
            dropped = self._queue.popleft()
            self._queue_bytes -= 2 * len(dropped.raw_json)  # ``queue_cost``, inline: once per drop
        else:  # memory holds deferred retries only (an alert robot down): the first due goes
            dropped = self._aside.pop()[2]
            self._release(dropped)
        self._given_up([dropped])
        # With a spool, memory fills only while the disk fails: that is the cause.
        (self._m_queue_full if self.spool is None else self._m_spool_error).inc()
        self._throttled.warning(
            "queue_full",
            "sink %s: memory queue full (%s)%s, dropped oldest occurrence %s",
            self.name,
            self._bounds,
            "" if self.spool is None else " and the disk spool cannot be written",
            dropped.key,
        )

    def _name_bounds(self) -> str:
        """The memory bounds, as logs name them."""
        if self.queue_max_bytes >= UNBOUNDED:
            return f"{self.queue_max} occurrences"
        return f"{self.queue_max} occurrences or {_mib(self.queue_max_bytes)}"

    def _hold_back(self, occ: Occurrence, cost: int) -> None:
        """The spool holds older occurrences and cannot be written now. Sent before them, a newer
        occurrence of an event would make the checkpoint skip an older one as a copy (lost): it waits
        behind the spool instead, in memory (bounded as the queue: the oldest dropped, counted). Its
        bytes share the bound with the queue and the items set aside: bounded by itself, it held a
        whole bound beside a full queue. It leaves a refill its share (``_refill_share``) even while
        the queue is empty (between batches, when the batch in flight took it)."""
        overflow = self._overflow
        beside = max(self._queue_bytes + self._aside.bytes, self._refill_share)
        while overflow and (
            len(overflow) >= self.queue_max or beside + self._overflow_bytes + cost > self.queue_max_bytes
        ):
            dropped = overflow.popleft()
            self._overflow_bytes -= queue_cost(dropped)
            self._given_up([dropped])
            self._m_spool_error.inc()
            self._throttled.warning(
                "queue_full",
                "sink %s: memory queue full (%s) and the disk spool cannot be written, dropped oldest "
                "occurrence %s",
                self.name,
                self._bounds,
                dropped.key,
            )
        overflow.append(occ)
        self._overflow_bytes += cost

    def _spill_overflow(self) -> bool:
        """Move what waited behind the spool into it, in order; False while the disk cannot take it."""
        overflow = self._overflow
        while overflow:
            if not self._spill(overflow[0]):
                return False
            self._overflow_bytes -= queue_cost(overflow.popleft())
        return True

    def _spill(self, occ: Occurrence) -> bool:
        """Append to the spool; False when the disk cannot take it (the caller keeps it in memory)."""
        assert self.spool is not None
        if not self.spool.writable:
            return False
        try:
            dropped = self.spool.append(occ)
        except OSError as exc:
            # A full or broken disk must not stop the source, nor lose what memory still holds: the
            # memory queue takes over (oldest dropped past its bound, counted) until the disk works.
            self._spool_full(self.spool.lost_on_error)
            self.spool.lost_on_error = []
            self.metrics.data_dir_errors.labels(self.name, "spool").inc()
            self._throttled.warning(
                "spool_write",
                "sink %s: cannot write the disk spool (%s); occurrences wait in memory (at most %s, "
                "then the oldest are dropped) until it can be written again",
                self.name,
                exc.strerror or exc,
                self._bounds,
            )
            return False
        self._m_spilled.inc()
        self._spool_full(dropped)
        self._m_spool.set(self._spool_depth())
        return True

    def _spool_depth(self) -> int:
        """What the spool holds: its backlog and the records parked in it."""
        spool = self.spool
        return 0 if spool is None else len(spool) + spool.parked_count

    def _spool_full(self, dropped: list[str]) -> None:
        for lost in dropped:
            self.metrics.dropped.labels(self.name, "spool_full").inc()
            self._throttled.warning(
                "spool_full", "sink %s: disk spool full, dropped oldest occurrence %s", self.name, lost
            )
        self.tell_spool_drops()

    def tell_spool_drops(self) -> None:
        """Tell the sink of the records the spool dropped over its bound (``given_up``), as of every
        other occurrence the engine gives up: the contract promises every one, and a sink keeping
        state per occurrence must not wait for, or send later, what is gone. (The robots never hold a
        record still unread in the spool; at a stop, leftovers they pooled are spooled and may be
        dropped.) Counted and logged by the caller, by key."""
        spool = self.spool
        if spool is not None and spool.dropped_occurrences:
            dropped, spool.dropped_occurrences = spool.dropped_occurrences, []
            self._given_up(dropped)

    def _dead_letter(self, items: list[tuple[Occurrence, str]]) -> None:
        """``items``' reasons are masked already (``_scrub``): a plugin's reason may quote its
        library's error, with the token in a URL."""
        if not self.deadletter.write(items):
            self.metrics.data_dir_errors.labels(self.name, "deadletter").inc()
            self._name_dead_letters(items, unwritable=str(self.deadletter.path))
        elif self.deadletter.path is None:
            self._name_dead_letters(items)
        self._given_up([occ for occ, _ in items])

    def _name_dead_letters(
        self, items: list[tuple[Occurrence, str]], *, unwritable: str | None = None
    ) -> None:
        """Without a dead-letter file (no --data-dir), or with one that cannot be written
        (``unwritable``: a full volume), the log is the dead letters' only record: each key is named
        with its reason (the log named 3 rejected of a batch and no key given up after retries, then
        20 of a batch the file could not take, so which to send again was known nowhere). Grouped by
        reason, at most _NAMED_PER_LINE keys a line."""
        for start in range(0, len(items), _NAMED_PER_LINE):
            part = items[start : start + _NAMED_PER_LINE]
            by_reason: dict[str, list[str]] = {}
            for occ, reason in part:
                by_reason.setdefault(_text(reason), []).append(occ.key)
            named = "; ".join(f"{', '.join(keys)} ({reason})" for reason, keys in by_reason.items())
            if unwritable is not None:
                self.log.warning(
                    "sink %s: dead-letter file %s cannot be written, this log is the only record of %d "
                    "dead-lettered occurrences not kept: %s",
                    self.name,
                    unwritable,
                    len(part),
                    named,
                )
            else:
                self.log.warning(
                    "sink %s: %d dead-lettered occurrences not kept (no --data-dir: this log is their "
                    "only record): %s",
                    self.name,
                    len(part),
                    named,
                )

    def _given_up(self, occs: Sequence[Occurrence]) -> None:
        """Tell the sink: an alert robot kept a given-up occurrence pooled and paged it with its next
        digest, while the dead-letter file and the metrics said it was not delivered."""
        sinks = [self.sink]
        if self._handing_over is not None and self._handing_over is not self.sink:
            sinks.append(self._handing_over)  # a swap closes it: its records are yet to be carried
        for sink in sinks:
            try:
                sink.given_up(occs)
            except BaseException as exc:  # a plugin's bug must not stop the pipeline
                if raised_by_signal(exc):
                    raise
                self.log_fault(logging.ERROR, "sink %s: given_up() failed", self.name, exc=exc, sink=sink)

    # ---- a sink's faults, named ----------------------------------------------------------------

    def _secrets(self, sink: Sink[Any] | None = None) -> Scrubber:
        """The masker of the secret values of ``sink``'s options (default: the current instance),
        built once per options object: what the engine prints about that sink's errors never shows
        them. False when they hold none."""
        options = getattr(self.sink if sink is None else sink, "options", None)
        known = self._secret_forms.get(id(options))
        if known is None or known[0] is not options:
            if len(self._secret_forms) > 8:  # instances of the past (reloads)
                self._secret_forms.clear()
            try:
                forms = option_secrets(options) if isinstance(options, BaseModel) else []
            except Exception:  # an options object of a plugin's own making: nothing found in it
                forms = []
            known = self._secret_forms[id(options)] = (options, Scrubber(forms))
        return known[1]

    def _scrub(self, text: str, *sinks: Sink[Any]) -> str:
        """``text`` without the secrets of ``sinks``' options (default: the current instance)."""
        for sink in sinks or (self.sink,):
            if scrubber := self._secrets(sink):
                text = scrubber(text)
        return text

    def _fault(self, exc: BaseException, *sinks: Sink[Any]) -> str:
        """``exc`` as a reason: its type and text, without the sink's secrets."""
        text = _text(exc)
        return self._scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, *sinks)

    def log_fault(
        self,
        level: int,
        msg: str,
        *args: object,
        exc: BaseException,
        sink: Sink[Any] | None = None,
        said: bool = False,
    ) -> None:
        """Log ``msg`` about a sink's exception with its traceback, unless the sink's options hold
        secrets (its library's error may quote them: a token in the URL): then with the exception's
        text scrubbed (added unless ``said``: ``args`` hold it), and the traceback scrubbed too, in
        the same line (a bug in a sink keeps its stack), or at DEBUG only when a secret of under
        MIN_CUT characters would mask every such piece of it (a password "a")."""
        scrubber = self._secrets(sink)
        if not scrubber:
            self.log.log(level, msg, *args, exc_info=exc)
            return
        sinks = () if sink is None else (sink,)
        if not said:
            msg, args = msg + ": %s", (*args, self._fault(exc, *sinks))
        readable = len(scrubber.forms[-1]) >= MIN_CUT  # the shortest form
        if not readable:
            self.log.log(level, msg, *args)
            if not self.log.isEnabledFor(logging.DEBUG):
                return
        stack = self._scrub("".join(traceback.format_exception(exc)), *sinks).rstrip("\n")
        if readable:
            self.log.log(level, msg + "\n%s", *args, stack)
        else:
            self.log.debug("sink %s: its traceback (secrets masked):\n%s", self.name, stack)

    def _blocked(self, method: str, seconds: float) -> None:
        """One step of the sink's ``method`` held the event loop ``seconds`` (``_Watched``)."""
        self._m_blocked.inc(seconds)
        self._blocking.warning(
            "blocked",
            "sink %s: its %s() held the event loop for %.2fs without yielding (a blocking call: a "
            "synchronous client, time.sleep); the watch, every other sink and /healthz waited "
            "meanwhile, and send_timeout cannot cut it: use an asyncio client or asyncio.to_thread",
            self.name,
            method,
            seconds,
        )

    def _cut_off_grace(self) -> float:
        return max(1.0, min(CUT_OFF_GRACE, self.options.send_timeout))

    def _overran(self, method: str, seconds: float) -> None:
        """The sink's ``method`` goes on ``seconds`` after it was cancelled: it swallows cancellation."""
        kind = {"send": "timeout", "start": "start"}.get(method, "exception")
        self.metrics.send_errors.labels(self.name, kind).inc()
        if method != "aclose":
            self._set_up(False)
        self.log.error(
            "sink %s: %s() did not end %.1fs after it was cancelled (send_timeout %gs, or a stop): it "
            "swallows its cancellation%s",
            self.name,
            method,
            seconds,
            self.options.send_timeout,
            "" if method == "aclose" else "; the sink delivers nothing until it ends, and is down",
        )

    def _ended_late(self, method: str, seconds: float) -> None:
        self.log.warning("sink %s: %s() ended %.1fs after it was cancelled", self.name, method, seconds)

    def abandon(self) -> None:
        """The stop went on without this pipeline's task (a send that swallows its cancellation):
        its batch in flight went with the leftovers, so nothing that send answers later is recorded."""
        self._abandoned = True

    def _checkpoint_written(self, error: OSError | None) -> None:
        if error is not None:
            self.metrics.data_dir_errors.labels(self.name, "checkpoint").inc()
        self._m_durable.set(0 if error is not None else 1)

    def flush_metrics(self) -> None:
        """Move the locally counted intake into the Prometheus counter (per batch and per scrape),
        and log what throttled warnings held back once their period is over."""
        if self._received:
            self._m_received.inc(self._received)
            self._received = 0
        self._m_queue_bytes.set(self.queued_bytes)
        self._throttled.report()
        self._blocking.report()

    def _set_up(self, up: bool) -> None:
        self.healthy = up
        self._m_up.set(1 if up else 0)
        if not up:
            self._room.set()  # a failing sink must not hold up a relist for the others

    def backlogged(self, high_water: float) -> bool:
        """True while a working sink's memory queue is past ``high_water`` (a fraction of its bound, by
        count or by bytes: a relist of large events waits as one of many small ones does),
        unless it is already spilling into a disk spool that has room: then a relist's overflow waits
        on disk and the sink catches up from there, holding up no other sink."""
        spilling = self.spool is not None and len(self.spool) > 0
        return (
            self.healthy
            and self.started.is_set()
            and not self._closing
            and (
                len(self._queue) + len(self._overflow) >= high_water * self.queue_max
                or self._bytes_backlogged(high_water)
            )
            and not (spilling and self.can_spill)
        )

    def _bytes_backlogged(self, high_water: float) -> bool:
        """The queue and the items set aside (what ``offer`` counts) hold ``high_water`` of the byte
        bound, or leave no room for a page (``INTAKE_ROOM``); never while the queue is empty (no batch
        would end the wait: the items set aside then hold at most their share, which leaves a page's
        room). Counting the queue alone, a page went on beside 22 MiB set aside and overflowed."""
        queued = self._queue_bytes + self._overflow_bytes
        held, bound = queued + self._aside.bytes, self.queue_max_bytes
        return queued > 0 and held >= min(high_water * bound, bound - INTAKE_ROOM)

    @property
    def can_spill(self) -> bool:
        """A disk spool with room below half its bound takes what the memory queue cannot."""
        spool = self.spool
        return spool is not None and spool.writable and spool.bytes < spool.max_bytes // 2

    async def room_or_batch(self, high_water: float) -> None:
        """Return once the queue is below ``high_water``, or the sink has taken a batch from it (or
        gone down, or closes): a bulk intake waiting in turn with others can tell a slow sink from a
        stuck one (``Fanout.wait_for_room``)."""
        if self.backlogged(high_water):
            self._room.clear()
            await self._room.wait()

    @property
    def queued(self) -> int:
        """Occurrences in the memory queue, set aside in memory and waiting behind a spool that cannot
        be written: what ``queue_max_events`` bounds (the queue-depth gauge; items set aside, then
        the wait, were in no gauge: on a full disk it read half of what memory held)."""
        return len(self._queue) + len(self._deferred) + len(self._overflow)

    @property
    def queued_bytes(self) -> int:
        """The bytes ``queue_max_bytes`` bounds: those of ``queued`` (``queue_cost``)."""
        return self._queue_bytes + self._aside.bytes + self._overflow_bytes

    @property
    def depth(self) -> int:
        spooled = self._spool_depth()
        held = len(self._in_flight) + len(self._filling) + len(self._deferred) + len(self._overflow)
        return len(self._queue) + spooled + held

    # ---- batching and sending -----------------------------------------------------------------

    def _refill(self) -> None:
        """Move spooled occurrences back into memory once the memory queue has drained.

        Called only between batches, when nothing is in flight: everything popped before has
        finished, so the spool's read position can be made durable first. A crash replays at most
        one batch from the spool, and the checkpoint skips what was already accepted."""
        if self._before_start and (
            not self._queue or (self._queue[0].uid, self._queue[0].number) not in self._before_start
        ):
            # Nothing is in flight between batches: what was read from before the start was sent
            # (accepted, rejected, or set aside: then held, and its parked ones go out behind it).
            self._before_start = set()
        if self.spool is not None and self._queue and self._parked_read:
            # Under steady traffic the queue is seldom empty here, and the parked FIFO's read position
            # was made durable only then: after a SIGKILL every record read back from it since was read
            # again, a copy still parked holding the checkpoint back. What was read back is finished or
            # waits aside (in the aside file first); what is queued came from the main FIFO, whose
            # position waits for it.
            aside = self._spooled_aside() if self._spooled_deferred else []
            if self.spool.keep_aside(aside, self._owed):
                self.spool.commit_parked()
                self._parked_read = False
        if self.spool is not None and not self._queue:
            # Items from the spool set aside in memory go to the spool's file of their own first: the
            # read position may then pass them, however long they wait.
            aside = self._spooled_aside() if self._spooled_deferred else []
            if self.spool.keep_aside(aside, self._owed):
                self.spool.commit()
                self._parked_read = False
            if len(self.spool):
                if self._overflow and self.spool.writable:
                    # The disk may take writes again: what waited behind the spool goes in behind its
                    # backlog, as ``offer`` puts it, and the refill has the whole bound. Left to the next
                    # offer, a quiet cluster left the wait in memory and the backlog drained one record
                    # a send beside it.
                    self._spill_overflow()
                # Deferred retries count against the memory bound: a robot that is down must not make
                # the spool's backlog pile up in memory.
                room = min(self.options.batch_max_events, self.queue_max - len(self._deferred))
                behind = self.spool.behind_open
                popped = self._pop_spooled(room) if room > 0 else []
                if behind:
                    self._before_start = {(occ.uid, occ.number) for occ in popped}
                self._queue.extend(popped)
                self._queue_bytes += sum(map(queue_cost, popped))
                self._popped = popped
                self._popped_keys = None
                if self.spool.owed:
                    self._owed |= self.spool.owed
                    self.spool.owed.clear()
            else:
                # Not kept once delivered: an idle router would hold its last batch (session 5).
                self._popped = []
                if self._overflow:
                    self._queue.extend(self._overflow)  # the spool has drained: what waited behind it
                    self._queue_bytes += self._overflow_bytes
                    self._overflow.clear()
                    self._overflow_bytes = 0
            # Also what opening the spool found (a segment set aside at start), even if nothing is left.
            if self.spool.unreadable:
                self.metrics.dropped.labels(self.name, "spool_unreadable").inc(self.spool.unreadable)
                self.spool.unreadable = 0
            if self.spool.read_errors:
                self.metrics.data_dir_errors.labels(self.name, "spool").inc(self.spool.read_errors)
                self.spool.read_errors = 0
            self._m_spool.set(self._spool_depth())
        spool = self.spool
        if (
            spool is not None
            and self._aside_max is not None
            and not self._closing  # a drain delivers no parked record: they stay for the next start
            and spool.parked_count
            and (room := self._aside_max - len(self._deferred)) > 0
        ):
            # Room in the share of items set aside (some finished): the first parked come back, due
            # now. Kept in the aside file at the next refill, before the parked read position passes.
            self._unpark_into_share(room, ())
            self._m_spool.set(self._spool_depth())
        self._trim_gone()

    def _pop_spooled(self, room: int) -> list[Occurrence]:
        """Up to ``room`` records from the spool, within the byte bound's room beside the items set
        aside and what waits behind the spool (on a full disk ``_overflow`` fills the bound but for a
        refill's share, ``_hold_back``: a refill beside the whole wait held twice the bound), by each
        record's own size: read by count alone, a refill took a batch's 500 records of 1 MB into
        memory at once; by the mean size of the first read, one small record let 499 large ones in.
        The first whatever its size (the queue is empty; items set aside or a full overflow must not
        stall the spool)."""
        spool = self.spool
        assert spool is not None
        budget = self.queue_max_bytes - self._aside.bytes - self._overflow_bytes
        popped = spool.pop(room, _lines_within(budget))
        return popped or spool.pop(1)

    def _spooled_aside(self) -> list[Occurrence]:
        """The deferred occurrences that came from the spool (one per key), in the order received,
        each event's in number order. After a crash the aside file is read back first, in its order:
        written in the heap's list order (y/2 before y/1), y/2 went out in an earlier batch and y/1
        was then skipped as a copy (lost, counted only as skipped)."""
        keys = self._spooled_deferred
        seen: dict[tuple[str, int], Occurrence] = {}
        for _, _, occ in sorted(self._deferred, key=lambda entry: (entry[2].received_at, entry[1])):
            key = (occ.uid, occ.number)
            if key in keys:
                seen.setdefault(key, occ)
        return _numbers_rising(list(seen.values()))

    def _copies_may_wait(self) -> bool:
        """A copy of any event's delivered occurrence may still come out of the queue, the overflow or
        the main FIFO (the aside file's included): item 50's relisted copies wait there. Not for items
        set aside in memory (``_held``) or parked (a parked record's copy is skipped by
        ``parked_holds``): a key refused for hours kept every deleted event's mark meanwhile."""
        return bool(
            self._queue
            or self._in_flight
            or self._filling
            or self._overflow
            or (self.spool is not None and len(self.spool))
        )

    def _note_gone(self, uids: Iterable[str]) -> None:
        """Remember what was accepted of events whose checkpoint entries go, while a copy of them may
        still come: of any event while ``_copies_may_wait``, else only of those with parked records
        (a parked FIFO an older version left holds an original beside its owed copy: item 207)."""
        spool = self.spool
        parked = None
        if not self._copies_may_wait():
            if spool is None or not spool.parked_count:
                return
            parked = spool.parked_floor
        accepted, gone = self.checkpoint.accepted, self._gone
        for uid in uids:
            if parked is not None and parked(uid) is None:
                continue
            n = accepted(uid)
            if n > gone.get(uid, 0):
                gone[uid] = n

    def _trim_gone(self) -> None:
        """Between batches, once no copy can come but a parked one: ``_gone`` keeps the marks of
        events with parked records only (each trim when it has doubled since the last: the marks of
        records read back since go then). Before, it was cleared only once nothing at all waited,
        and one item set aside for hours (an index refused) kept ~130 bytes per event deleted
        meanwhile: ~0.5 GiB a day at 50 events/s."""
        if not self._gone or self._copies_may_wait():
            return
        spool = self.spool
        if spool is None or not spool.parked_count:
            self._gone.clear()
            self._gone_trimmed = 0
        elif len(self._gone) > 2 * self._gone_trimmed:
            floor = spool.parked_floor
            self._gone = {uid: n for uid, n in self._gone.items() if floor(uid) is not None}
            self._gone_trimmed = len(self._gone)

    def forget(self, uids: list[str]) -> None:
        """The events were deleted (TTL): drop their checkpoint entries."""
        self._note_gone(uids)
        self.checkpoint.forget(uids)

    def listed(self) -> None:
        """Every watched namespace has been listed once: what the spool held at open cannot be
        offered as new any more, so its keys are freed."""
        if self.spool is not None and self.spool.held_at_open is not None:
            self.spool.release_held_at_open()
        if self._spooled_copies:
            self.log.info(
                "sink %s: %d relisted occurrences were already in the disk spool: not spooled twice",
                self.name,
                self._spooled_copies,
            )
            self._spooled_copies = 0

    def keep_gone(self, deadline: float | None = None) -> None:
        """At a stop with records still spooled: what was accepted of events deleted (or pruned)
        meanwhile goes into the checkpoint. Kept only in memory, the restart sent those copies
        again; the first complete list after the restart prunes the entries. The spool is read until
        ``deadline`` (``time.monotonic()``; default ``KEEP_GONE_SECONDS`` from now)."""
        # The parked FIFO's records too: a stop with only those left kept no mark, and a spool a
        # previous version left (an owed copy of a parked record beside its original) sent the
        # original after the next restart, then the copy.
        spool = self.spool
        if not self._gone or spool is None or not (len(spool) or spool.parked_count):
            return
        # Only for events the spool still holds records of: ``_gone`` holds what was accepted of
        # every event deleted since the backlog began (nearly all of a long drain), and acked, those
        # marks pushed live events' entries out of a full checkpoint ConfigMap (their events then
        # delivered again after the restart).
        held = spool.unread_uids(time.monotonic() + KEEP_GONE_SECONDS if deadline is None else deadline)
        if held is None:
            # Not all read, in time or at all (the scan ran unbounded on the event loop, before the
            # checkpoint and the ConfigMap's last write): a mark not checked may stand for a copy.
            gone = dict(self._gone)
            self.log.info(
                "sink %s: the stop kept the marks of %d deleted events without reading the whole spool "
                "(no time left, or a segment could not be read): the first complete list after the restart "
                "removes those not needed",
                self.name,
                len(gone),
            )
        else:
            floor = spool.parked_floor
            gone = {uid: n for uid, n in self._gone.items() if uid in held or floor(uid) is not None}
        if gone:
            self.checkpoint.ack(gone)

    def prune(self, live: Container[str]) -> None:
        """After a complete list: drop checkpoint entries of events the API server no longer holds."""
        self._note_gone(uid for uid in self.checkpoint.table.entries if uid not in live)
        self.checkpoint.prune(live)

    def note_pruned(self, uids: Iterable[str]) -> None:
        """Its table is about to drop these uids of every sink at once (``Fanout.prune``): what
        ``prune`` notes first."""
        self._note_gone(uids)

    def _take(self, batch: list[Occurrence], size: int, keys: set[tuple[str, int]]) -> int:
        """Move queued occurrences into ``batch`` (whose (uid, number) pairs are ``keys``) up to its bounds."""
        max_events, max_bytes = self.options.batch_max_events, self.options.batch_max_bytes
        accepted = self.checkpoint.accepted
        gone = self._gone
        owed = self._owed
        held = self._held
        done = self._done
        queue = self._queue
        # Something set aside for a key the sink refuses: newer occurrences of its events wait behind.
        ordered = self._aside_max is not None and bool(
            held or (self.spool is not None and self.spool.parked_count)
        )
        parked = self.spool.parked_holds if self.spool is not None and self.spool.parked_count else None
        waited = False
        left = 0  # the bytes of what left the queue
        while queue and len(batch) < max_events:
            nxt = queue[0]
            key = (nxt.uid, nxt.number)
            if (
                key in keys
                or (
                    (nxt.number <= accepted(nxt.uid) or (gone and nxt.number <= gone.get(nxt.uid, 0)))
                    and not (owed and key in owed)
                )
                or (held and nxt.number in held.get(nxt.uid, ()))
                or (parked is not None and parked(nxt.uid, nxt.number))
                or (done and done.get(nxt.uid) == nxt.number)
            ):
                # A second copy (spooled before a restart and relisted after it, or replayed from the
                # spool after a crash): already delivered, already in this batch, waiting aside
                # (an alert robot's digest would have paged it twice), parked (a relist's copy
                # offered once the spool's keys from before the start were freed: it went out
                # beside the parked original, stored twice in one run), or finished and not
                # recorded yet while an older occurrence of its event waits aside (a relist's copy
                # likewise: set aside behind that one, it went out again with it). Only the number
                # finished last (``_done``): an older one may be pending.
                left += queue_cost(queue.popleft())
                self._m_skipped.inc()
                continue
            if ordered and self._behind_older(nxt, keys):
                left += queue_cost(queue.popleft())
                waited = True
                continue
            nxt_size = nxt.size
            if batch and size + nxt_size > max_bytes:
                break
            batch.append(queue.popleft())
            keys.add(key)
            size += nxt_size
            left += 2 * len(nxt.raw_json)
        self._queue_bytes -= left
        if waited and self._aside_over_share():
            self._bound_aside([])
        return size

    def _behind_older(self, occ: Occurrence, keys: set[tuple[str, int]]) -> bool:
        """True when ``occ`` went to wait behind older occurrences of its event set aside: parked
        (it is parked after them) or in memory and not in this batch (it waits with them, held: no
        attempt, and goes out with them, after them, ``_with_their_events``). Sent before them, it
        went in first once the key was taken again: the event's occurrences out of order. It waits
        at most their backoff, or their turn among the parked ones, also when it alone would be
        taken (an index of its own day)."""
        spool = self.spool
        uid, number = occ.uid, occ.number
        key = (uid, number)
        if (
            spool is not None
            and spool.parked_count
            and (lowest := spool.parked_floor(uid)) is not None
            and lowest < number
            and spool.parking
        ):
            try:
                dropped = spool.park(occ, 0, key in self._owed)
            except OSError:
                spool.lost_on_error, lost = [], spool.lost_on_error
                self._spool_full(lost)
                return False  # sent now: out of order, nothing lost (the floor holds the checkpoint)
            self._owed.discard(key)
            if dropped:
                self._spool_full(dropped)
            return True
        numbers = self._held.get(uid)
        if not numbers or all(n > number or (uid, n) in keys for n in numbers):
            return False  # none older, or all of them in this batch: it goes after them
        due = self._aside.due_of(uid)
        self._aside.push((time.monotonic() if due is None else due, next(self._seq), occ))
        numbers.add(number)
        if self._popped:
            if self._popped_keys is None:
                self._popped_keys = {(o.uid, o.number) for o in self._popped}
            if key in self._popped_keys:
                self._spooled_deferred.add(key)  # from the spool: in the aside file before it is passed
        return True

    def _due(self) -> bool:
        return bool(self._deferred) and self._deferred[0][0] <= time.monotonic()

    def _take_due(self, batch: list[Occurrence], size: int, keys: set[tuple[str, int]]) -> int:
        deferred = self._deferred
        if not deferred:
            return size
        now = time.monotonic()
        limit = self.options.batch_max_events
        if self._queue or (self.spool is not None and len(self.spool)):
            # Other traffic waits: items set aside take at most half a batch, so that many of a
            # refused key coming due at once do not hold the other keys up batch after batch.
            limit = max(1, limit // 2)
        taken: list[tuple[float, int, Occurrence]] = []
        seen: set[tuple[str, int]] = set()
        while deferred and deferred[0][0] <= now and len(batch) + len(taken) < limit:
            entry = self._aside.pop()
            occ = entry[2]
            key = (occ.uid, occ.number)
            if key in keys or key in seen:  # a copy waiting aside beside the first: that one answers for both
                self._m_skipped.inc()
                continue
            taken.append(entry)
            seen.add(key)
        if taken and self._aside_max is not None:
            taken = self._with_their_events(taken, seen, limit - len(batch))
        for _, _, occ in taken:
            batch.append(occ)
            keys.add((occ.uid, occ.number))
            size += occ.size
        return size

    def _with_their_events(
        self, taken: list[tuple[float, int, Occurrence]], seen: set[tuple[str, int]], room: int
    ) -> list[tuple[float, int, Occurrence]]:
        """Each event's items set aside go out together, lowest number first, when one of them is due:
        one going in while an older one of its event still waited (a longer backoff, refused again,
        parked) put the event's occurrences out of order once the key was taken again. What of an
        event is over ``room`` (the batch's bound, half of it while other traffic waits) waits (its
        newest): filling the whole batch, a refused key's events held the others up."""
        held, aside = self._held, self._aside
        counts = collections.Counter(entry[2].uid for entry in taken)
        wanted = {uid for uid, n in counts.items() if len(held.get(uid, ())) > n}
        if wanted:
            rest = aside.entries_of(wanted)
            if rest:
                aside.remove(rest)
                for entry in rest:
                    key = (entry[2].uid, entry[2].number)
                    if key in seen:
                        self._m_skipped.inc()
                        continue
                    seen.add(key)
                    taken.append(entry)
        events: dict[str, list[tuple[float, int, Occurrence]]] = {}
        for entry in taken:
            events.setdefault(entry[2].uid, []).append(entry)
        out: list[tuple[float, int, Occurrence]] = []
        for group in events.values():
            group.sort(key=lambda entry: entry[2].number)
            for entry in group:
                if len(out) < room:
                    out.append(entry)
                else:
                    aside.push(entry)
        return out

    async def _next_batch(self) -> list[Occurrence] | None:
        opts = self.options
        self._refill()
        while not self._queue and not self._due():
            if self._closing:
                if self._deferred and not self._deferred_offered:
                    # Closing: what waits aside is offered once more, whatever its due time. An alert
                    # robot may have carried it in a message meanwhile: it answers OK now from its
                    # memory of that, which a restart would lose and page the spooled copy again.
                    self._deferred_offered = True
                    self._aside.replace([(0.0, seq, occ) for _, seq, occ in self._deferred])
                    continue
                return None
            if not self._deferred:
                self.idle.set()
                self.intake_patience = INTAKE_PATIENCE  # caught up: a next relist may wait again
            self._wakeup.clear()
            wait = self._deferred[0][0] - time.monotonic() if self._deferred else None
            if wait is None and self.spool is not None and (len(self.spool) or self.spool.parked_count):
                wait = RETRY_SECONDS  # a spool read failed: try it again then, not at the next offer
            try:
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._refill()
        batch: list[Occurrence] = []
        self._filling = batch
        keys: set[tuple[str, int]] = set()
        size = self._take(batch, self._take_due(batch, 0, keys), keys)
        deadline = time.monotonic() + opts.batch_max_wait
        while (
            len(batch) < opts.batch_max_events
            and size < opts.batch_max_bytes
            and not self._closing
            and (remaining := deadline - time.monotonic()) > 0
        ):
            if self._queue:
                break  # _take stopped at the byte bound: the batch is full
            if self.spool is not None and len(self.spool):
                break  # the rest is on disk: send this batch, refill before the next
            self._wakeup.clear()
            self._wake_at = opts.batch_max_events - len(batch)
            self._wake_bytes = opts.batch_max_bytes - size
            self._offered_bytes = 0
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                size = self._take(batch, size, keys)
                break
            finally:
                self._wake_at = 1
            size = self._take(batch, size, keys)
        self._m_queue.set(self.queued)
        self.flush_metrics()
        self._room.set()
        self._filling = []  # the caller makes it `_in_flight` before it next awaits
        return batch

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        opts = self.options
        # Capped exponent: after ~1,000 failed attempts (hours of outage) 2**n overflowed the float
        # and the pipeline task crashed, taking the router down with it.
        base = min(opts.retry_max_backoff, opts.retry_initial_backoff * 2.0 ** min(attempt - 1, 64))
        delay = base / 2 + random.uniform(0, base / 2)  # equal jitter: spread, but never near zero
        if (wait := self._server_wait(retry_after)) is not None:
            delay = max(delay, wait)
        return float(delay)

    def _server_wait(self, retry_after: float | None) -> float | None:
        """A destination's Retry-After, bounded: a wild value must not stop the sink for days. One
        that is no delay (NaN, negative: a plugin's arithmetic) is none, and the backoff applies: a
        NaN due time headed the heap of items set aside, and none of them came due until a stop; a
        negative one retried at once, without a backoff."""
        if retry_after is None or not retry_after >= 0.0:  # NaN is not >= 0
            return None
        return min(retry_after, self.options.retry_wait_max)

    def _defer_retries(
        self, pending: Sequence[Occurrence], outcomes: Sequence[Outcome], done: dict[str, int]
    ) -> None:
        """Set aside what the sink wants again later. A hold (a digest window) is no failure; a
        failure counts towards ``retry_max_attempts`` and backs off per occurrence."""
        limit = self.options.retry_max_attempts
        exhausted: list[tuple[Occurrence, str]] = []
        failed = 0
        from_spool = {(o.uid, o.number) for o in self._popped}
        refused: list[tuple[float, int, Occurrence]] = []
        # One due time per event (its oldest item's), so that its items stay together (see
        # ``_with_their_events``) without retrying the older ones sooner than their backoff.
        event_due: dict[str, float] | None = {} if self._aside_max is not None else None
        for occ, out in zip(pending, outcomes, strict=True):
            if out.kind is not OutcomeKind.RETRY:
                continue
            key = (occ.uid, occ.number)
            tries = self._failures.get(key, 0)
            if not out.held:
                tries += 1
                if limit and tries >= limit:
                    self._release(occ)
                    self._owed.discard(key)
                    exhausted.append(
                        (occ, f"retries exhausted after {tries} attempts: {self._scrub(out.reason)}")
                    )
                    done[occ.uid] = max(done.get(occ.uid, 0), occ.number)
                    continue
                self._failures[key] = tries
                failed += 1
            # Bounded as every other Retry-After: `inf` or a day set an item aside until a restart.
            wait = self._server_wait(out.retry_after)
            # A hold keeps its own time (a digest window, a stream's refill); a failure backs off at
            # least as a retry in place does: a Retry-After of 0 (a past date, parsed so) resent an
            # item set aside ~90 times a second.
            delay = wait if out.held and wait is not None else self._backoff(max(tries, 1), wait)
            due = time.monotonic() + delay
            if event_due is not None:
                due = event_due.setdefault(occ.uid, due)
            entry = (due, next(self._seq), occ)
            self._aside.push(entry)
            refused.append(entry)
            self._held.setdefault(occ.uid, set()).add(occ.number)
            if key in from_spool:
                self._spooled_deferred.add(key)
        self._m_retries.inc(failed)
        if event_due:
            self._wait_with_their_events(event_due)
        if self._aside_max is not None and refused:
            self._bound_aside(refused)
        if exhausted:
            self._dead_letter(exhausted)
            self.metrics.dead_lettered.labels(self.name, "retries_exhausted").inc(len(exhausted))
            self.log.error(
                "sink %s: %d occurrences dead-lettered, %s", self.name, len(exhausted), exhausted[0][1]
            )

    def _wait_with_their_events(self, event_due: dict[str, float]) -> None:
        """An event's other items set aside wait as long as those just refused: its items beyond a
        batch (``_with_their_events`` sends the lowest, the rest kept their due time, already past)
        came due at once and brought the refused ones along again, batch after batch without a
        backoff (11,209 sends in a second; with a sink whose send never suspends, the event loop froze)."""
        aside = self._aside
        for uid, due in event_due.items():
            later = [entry for entry in aside.entries_of((uid,)) if entry[0] < due]
            if later:
                aside.remove(later)
                for _, seq, occ in later:
                    aside.push((due, seq, occ))

    def _bound_aside(self, refused: list[tuple[float, int, Occurrence]]) -> None:
        """Keep the items set aside in memory within their share (``_aside_max``; ``refused``: those
        just set aside again). Before, they counted against the whole memory bound: a key refused
        for long with more items than it filled the queue, and every other key's new occurrences
        were dropped, or spilled and never read back. With a spool, whole events are parked on disk
        (``_to_park``: those refused for long go round, the others keep their own backoff) and the
        first parked come forward into the room left. Without a spool, once memory is full, the
        oldest set aside over the share are dropped (and so at each offer, ``_into_memory``)."""
        assert self._aside_max is not None
        share, heap, spool = self._aside_max, self._deferred, self.spool
        if spool is None:
            # Over their share only while memory is full: each new occurrence finds room, taken from them.
            excess = min(len(heap) - share, len(self._queue) + len(heap) - self.queue_max)
            if excess > 0:
                self._drop_aside(excess, self._m_queue_full, "")
            while self._aside_over_share() and self.queued_bytes > self.queue_max_bytes:
                self._drop_aside(1, self._m_queue_full, "")
            return
        dues: list[float] = []
        unwritable = not spool.parking
        if (self._aside_over_share() or spool.parked_count) and not unwritable:
            leaving = self._to_park(refused)
            if leaving:
                entries = self._aside.entries_of(leaving)
                dues = self._park(entries)
                unwritable = len(dues) < len(entries)
        if (room := share - len(self._deferred)) > 0 and spool.parked_count and not self._closing:
            # The first parked come forward into the room left, in the parked ones' places in time.
            self._unpark_into_share(room, sorted(dues))
        self._m_spool.set(self._spool_depth())
        if not unwritable:
            # What was over the share is parked, and what came back fits the bound: nothing to drop.
            # Before, records read back past the bound were dropped here as "cannot be written".
            return
        if len(self._deferred) > self.queue_max:  # the disk cannot be written: memory's bound still holds
            self._drop_aside(
                len(self._deferred) - self.queue_max,
                self._m_spool_error,
                " and the disk spool cannot be written",
            )
        while self._aside.bytes > self.queue_max_bytes and len(self._deferred) > 1:
            self._drop_aside(1, self._m_spool_error, " and the disk spool cannot be written")

    def _to_park(self, refused: list[tuple[float, int, Occurrence]]) -> list[str]:
        """The events set aside that leave memory for the parked FIFO, whole. While records are
        parked, an event that came back from them (refused for long) and is refused again goes
        behind them, and the first parked come forward in its place and time (round robin). An event
        never parked stays in memory with its own backoff, the short ones of a key refused for the
        first time: before, it went behind the parked ones at once, and a key refused for 1 s while
        another had 10,000 parked waited a whole round for each retry (30.7 s; minutes at the
        default backoffs). Those take at most half the share, so that the round goes on. Over that,
        and over the share, those refused longest go first: that came back from the parked ones,
        then with the most failed attempts, then received first. An event with newer records parked
        stays (they join it when read back: its older ones going behind them, a newer one accepted
        alone, an index of its own day, would wait for ever), unless no other can leave room. Parked
        records come back in number order all the same (``_unpark``)."""
        assert self._aside_max is not None and self.spool is not None
        share, heap, went_round = self._aside_max, self._deferred, self._went_round
        byte_share = self._aside_bytes_max
        floor, failures = self.spool.parked_floor, self._failures
        sizes: dict[str, int] = {}
        weights: dict[str, int] = {}  # its bytes (``queue_cost``): the share bounds both
        tries: dict[str, int] = {}
        since: dict[str, float] = {}  # its oldest received
        for _, _, occ in heap:
            uid = occ.uid
            sizes[uid] = sizes.get(uid, 0) + 1
            weights[uid] = weights.get(uid, 0) + queue_cost(occ)
            tries[uid] = max(tries.get(uid, 0), failures.get((uid, occ.number), 0))
            since[uid] = min(since.get(uid, occ.received_at), occ.received_at)

        def first(uid: str) -> tuple[bool, bool, int, float]:
            return floor(uid) is None, uid in went_round, tries[uid], -since[uid]

        chosen: list[str] = []
        if self.spool.parked_count:
            again = [
                uid for uid in dict.fromkeys(e[2].uid for e in refused) if uid in went_round and uid in sizes
            ]
            chosen = [uid for uid in again if floor(uid) is None]
            if not chosen and (len(heap) >= share or self._aside.bytes >= byte_share):
                chosen = again
            fresh = sorted((uid for uid in sizes if uid not in went_round), key=first, reverse=True)
            excess = sum(sizes[uid] for uid in fresh) - share // 2
            excess_bytes = sum(weights[uid] for uid in fresh) - byte_share // 2
            for uid in fresh:
                if excess <= 0 and excess_bytes <= 0:
                    break
                chosen.append(uid)
                excess -= sizes[uid]
                excess_bytes -= weights[uid]
        over = len(heap) - share - sum(sizes[uid] for uid in chosen)
        over_bytes = self._aside.bytes - byte_share - sum(weights[uid] for uid in chosen)
        if over > 0 or over_bytes > 0:
            taken = set(chosen)
            for uid in sorted((uid for uid in sizes if uid not in taken), key=first, reverse=True):
                if over <= 0 and over_bytes <= 0:
                    break
                chosen.append(uid)
                over -= sizes[uid]
                over_bytes -= weights[uid]
        return chosen

    def _park(self, leaving: list[tuple[float, int, Occurrence]]) -> list[float]:
        """Move ``leaving`` (entries of the items set aside) to the spool's parked FIFO, each event's
        in number order; returns their due times. What the disk does not take stays in memory."""
        spool = self.spool
        assert spool is not None
        aside = self._aside
        aside.remove(leaving)
        leaving.sort(key=lambda entry: (entry[2].uid, entry[2].number))
        dues: list[float] = []
        dropped: list[str] = []
        now, wall = time.monotonic(), time.time()
        for i, (due, _, occ) in enumerate(leaving):
            key = (occ.uid, occ.number)
            # Its backoff goes with it: an event refused a moment ago and parked behind its own
            # records was read back at the next refill due at once, a burst of resends (item 181).
            not_before = wall + (due - now) if due > now else 0.0
            try:
                dropped.extend(spool.park(occ, self._failures.get(key, 0), key in self._owed, not_before))
            except OSError as exc:
                for entry in leaving[i:]:
                    aside.push(entry)
                dropped.extend(spool.lost_on_error)
                spool.lost_on_error = []
                self.metrics.data_dir_errors.labels(self.name, "spool").inc()
                self._throttled.warning(
                    "spool_write",
                    "sink %s: cannot park occurrences set aside in the disk spool (%s); they wait in "
                    "memory (at most %s, then the oldest are dropped)",
                    self.name,
                    exc.strerror or exc,
                    self._bounds,
                )
                break
            dues.append(due)
            self._release(occ)  # the parked FIFO's floor keeps the checkpoint before it now
            self._owed.discard(key)  # the record says so
        if dropped:
            self._spool_full(dropped)
        return dues

    def _unpark_into_share(self, room: int, dues: Iterable[float]) -> None:
        """Bring parked records back into the room left in the share of items set aside: ``room``
        records, and its bytes by each record's own size (by the mean size of the first read, one
        small record let hundreds of large ones in, past the whole bound, and those over it were then
        dropped). The first one also when it is larger than the room left in the share, if it fits
        the whole bound beside those set aside (or none is): one larger than the share's room must
        not wait for ever."""
        dues = iter(dues)  # shared by the reads: each record brought back takes the next
        aside = self._deferred
        before = len(aside)
        while room > 0 and (left := self._unpark_room()) > 0:
            # Again while those read were copies (skipped) or went behind their event's (parked again).
            count = self._unpark(room, dues, _lines_within(left))
            if not count and len(aside) == before:
                alone = self.queue_max_bytes - self._aside.bytes if aside else UNBOUNDED
                count = self._unpark(1, dues, _lines_within(alone))
            if not count:
                return
            room -= count

    def _unpark_room(self) -> int:
        """Bytes parked records may bring back: the room left in the share of items set aside, and in
        the whole bound beside the queue (a refill had filled the queue to the bound less the share's
        use, and records unparked on top went up to a whole share past it)."""
        held = self._queue_bytes + self._overflow_bytes + self._aside.bytes
        return min(self._aside_bytes_max - self._aside.bytes, self.queue_max_bytes - held)

    def _unpark(self, count: int, dues: Iterable[float], max_bytes: int | None = None) -> int:
        """Bring ``count`` parked records back among the items set aside in memory, due at ``dues``
        (then now), with their failed attempts so far, within ``max_bytes`` of spooled lines (the
        first too); returns how many were read."""
        spool = self.spool
        assert spool is not None
        if spool.behind_open or self._before_start:
            # Records spooled before the restart first: an event's older occurrences kept at the
            # stop (or in the aside file at a crash) are there, and go before its parked ones. Read
            # is not enough: a parked X/2, due at once, went first in a batch, and X/1, queued
            # behind the batch's bound, was then skipped as a copy (lost).
            return 0
        back = spool.unpark(count, max_bytes)
        self._parked_read = self._parked_read or bool(back)
        if spool.owed:
            self._owed |= spool.owed
            spool.owed.clear()
        now, wall = time.monotonic(), time.time()
        # A "not before" is wall-clock time (it outlives a restart): bounded as a server's wait is, so
        # that a clock stepped back holds no record for long.
        longest = max(self.options.retry_max_backoff, self.options.retry_wait_max)
        accepted, held, owed, floor = self.checkpoint.accepted, self._held, self._owed, spool.parked_floor
        gone, done = self._gone, self._done
        dropped: list[str] = []
        due = iter(dues)
        for occ, tries, not_before in back:
            uid, number = occ.uid, occ.number
            key = (uid, number)
            if (
                ((number <= accepted(uid) or (gone and number <= gone.get(uid, 0))) and key not in owed)
                or number in held.get(uid, ())
                or (done and done.get(uid) == number)
            ):
                # A copy: accepted before a crash (read again), or of an event deleted or pruned
                # since (its checkpoint entry gone: as ``_take`` checks), waiting aside beside it, or
                # finished and not recorded yet.
                self._m_skipped.inc()
                continue
            if (lowest := floor(occ.uid)) is not None and lowest < occ.number:
                # An older occurrence of its event is still parked (round robin put it behind): this
                # one goes behind it again, so that the event's come back, and go out, in number order.
                try:
                    dropped.extend(spool.park(occ, tries, key in owed, not_before))
                    owed.discard(key)  # the record says so
                    continue
                except OSError:
                    dropped.extend(spool.lost_on_error)
                    spool.lost_on_error = []  # kept in memory: out of order, nothing lost
            at = next(due, now)
            if not_before > wall:
                at = max(at, now + min(not_before - wall, longest))
            if (event_at := self._aside.due_of(occ.uid)) is not None and event_at > at:
                # Its event's items in memory were refused and wait their backoff: it waits with them.
                # Due now, it brought them along at once (``_with_their_events``), again at each turn.
                at = event_at
            self._aside.push((at, next(self._seq), occ))
            held.setdefault(occ.uid, set()).add(occ.number)
            self._went_round.add(occ.uid)
            if tries:
                self._failures[key] = tries
            self._spooled_deferred.add(key)  # in the aside file before the parked position passes it
        if dropped:
            self._spool_full(dropped)
        return len(back)

    def _drop_aside(self, count: int, counter: Any, cause: str) -> None:
        """Drop the ``count`` oldest (by receipt) items set aside in memory: counted, logged, and told
        to the sink (``given_up``)."""
        oldest = self._aside.drop_oldest(count)
        occs = [occ for _, _, occ in oldest]
        for occ in occs:
            self._release(occ)
            self._owed.discard((occ.uid, occ.number))
        self._given_up(occs)
        counter.inc(len(occs))
        self._throttled.warning(
            "aside_full",
            "sink %s: occurrences set aside for a key the sink refuses are over their share of the memory "
            "queue (%d occurrences or %s, of %s)%s: dropped the oldest %d (%s)",
            self.name,
            self._aside_max,
            _mib(self._aside_bytes_max),
            self._bounds,
            cause,
            len(occs),
            ", ".join(occ.key for occ in occs[:3]) + (", ..." if len(occs) > 3 else ""),
        )

    def _count_modified(self) -> None:
        """Export the increase of the sink's ``modified`` totals (a plugin may not call the base
        ``__init__``: read with getattr). A replacement that did not carry them over starts at 0.
        A plugin's totals of the wrong kind (one gone below 0, a text, no mapping) stopped the router
        after a send it answered OK, so that batch was sent again after each restart: now a contract
        fault, logged once, its value not exported."""
        faults: list[str] = []
        modified: object = None
        try:
            modified = getattr(self.sink, "modified", None)
            if not modified:
                return
            totals = list(modified.items())  # type: ignore[attr-defined]
        except Exception:
            faults.append(f"an object of type {type(modified).__name__}, not a Counter of totals by reason")
            totals = []
        for reason, total in totals:
            if not isinstance(reason, str):
                faults.append(f"a reason of type {type(reason).__name__}")
                continue
            if (fault := _no_count(total)) is not None:
                faults.append(f"the total {reason[:40]!r} {fault}")
                continue
            seen = self._modified_seen.get(reason, 0)
            if total != seen:
                label = reason if reason in SINK_MODIFIED_REASONS else "other"
                self.metrics.modified.labels(self.name, label).inc(total - seen if total > seen else total)
                self._modified_seen[reason] = total
        if faults:
            new = self._contract_faults(faults)
            if new:
                self.log.error(
                    "sink %s: its modified totals (Sink.modified) hold %s; not exported (each fault logged once; counted "
                    'in eventrouter_sink_send_errors_total{kind="contract"})',
                    self.name,
                    "; ".join(new),
                )

    def _contract_faults(self, faults: list[str]) -> list[str]:
        """Count a send that broke the contract; the faults not logged before (each is logged once)."""
        self.metrics.send_errors.labels(self.name, "contract").inc()
        new = [f for f in dict.fromkeys(faults) if f not in self._contract_said]
        self._contract_said.update(new)
        return new

    async def _send_once(self, items: Sequence[Occurrence]) -> Sequence[Outcome]:
        if self._replacement_due() and not await self._take_replacement():
            return [retry("stopped before the reloaded sink started")] * len(items)
        started = time.monotonic()
        sending = _Watched(self, "send", self.sink.send, items)
        try:
            async with asyncio.timeout(self.options.send_timeout):
                outcomes = await sending
        except RetryableError as exc:
            self.metrics.send_errors.labels(self.name, "retryable").inc()
            # A plugin's subclass may not have called RetryableError.__init__: no attributes.
            out = Outcome(
                OutcomeKind.RETRY,
                getattr(exc, "reason", None) or _text(exc),
                getattr(exc, "retry_after", None),
            )
            if not _well_formed(out):
                out = self._mended([out], "a RetryableError it raised")[0]
            return [out] * len(items)
        except TimeoutError:
            self.metrics.send_errors.labels(self.name, "timeout").inc()
            return [retry(f"send timed out after {self.options.send_timeout:g}s")] * len(items)
        except asyncio.CancelledError:
            if cancelled_now():
                raise  # this pipeline is being stopped
            # A CancelledError the sink let out (a cancelled future awaited inside a library) is
            # not a stop: the pipeline task ended, unseen, while health and metrics said all was well.
            self.metrics.send_errors.labels(self.name, "exception").inc()
            self.log.error("sink %s: send raised CancelledError without being cancelled; retrying", self.name)
            return [retry("send raised CancelledError")] * len(items)
        except Exception as exc:
            # A sink bug must not lose events: log it loudly and retry.
            return self._send_raised(exc, items)
        except BaseException as exc:
            # Also one that is no Exception (GeneratorExit, an anyio group, a library's own kind): it
            # ended the pipeline task unseen; SystemExit and KeyboardInterrupt ended the router.
            if raised_by_signal(exc) or sending.closing:
                raise
            return self._send_raised(exc, items)
        finally:
            self._m_latency.observe(time.monotonic() - started)
        self._count_modified()
        if outcomes is None:
            return [OK] * len(items)
        if isinstance(outcomes, Outcome | str | bytes | dict) or not hasattr(outcomes, "__iter__"):
            # One Outcome was read as "0 outcomes", a dict as its keys, a text as its characters.
            self.metrics.send_errors.labels(self.name, "contract").inc()
            self.log.error(
                "sink %s returned an object of type %s for %d occurrences, not a sequence of one Outcome each; "
                "retrying the batch",
                self.name,
                type(outcomes).__name__,
                len(items),
            )
            return [retry("sink broke the outcome contract")] * len(items)
        if not isinstance(outcomes, list):
            try:
                # A generator or a list of something else crashed the pipeline task, and the router.
                outcomes = list(outcomes)
            except Exception:  # not iterable: the contract error below
                outcomes = []
        if len(outcomes) != len(items) or not all(isinstance(o, Outcome) for o in outcomes):
            self.metrics.send_errors.labels(self.name, "contract").inc()
            self.log.error(
                "sink %s returned %d outcomes for %d occurrences (%s), not one Outcome each; retrying the batch",
                self.name,
                len(outcomes),
                len(items),
                ", ".join(sorted({type(o).__name__ for o in outcomes})) or "none",
            )
            return [retry("sink broke the outcome contract")] * len(items)
        if not all(o is OK or _well_formed(o) for o in outcomes):
            return self._mended(outcomes, "its outcomes")
        return outcomes

    def _send_raised(self, exc: BaseException, items: Sequence[Occurrence]) -> list[Outcome]:
        self.metrics.send_errors.labels(self.name, "exception").inc()
        reason = self._fault(exc)
        self.log_fault(logging.ERROR, "sink %s: send raised %s", self.name, reason, exc=exc, said=True)
        return [retry(reason)] * len(items)

    def _mended(self, outcomes: Sequence[Outcome], how: str) -> Sequence[Outcome]:
        """Outcomes whose fields hold what the engine reads. A Retry-After passed on as the header's
        text ("30") or a timedelta, or an exception as a REJECT's reason, ended the pipeline task (the
        router with it, again after each restart); a kind given as its string (``Outcome("ok")``) was
        taken as a retry, and an accepted batch was sent again for ever. A string naming a kind is
        taken as that kind; any other kind retries the batch, as an object that is no Outcome does.
        Counted once per send as a ``contract`` error, each fault logged once (types only: a reason
        may quote the record)."""
        faults: list[str] = []
        mended: list[Outcome] = []
        usable = True
        for out in outcomes:
            kind = out.kind
            if not isinstance(kind, OutcomeKind):
                named = _KINDS.get(kind.lower()) if isinstance(kind, str) else None
                if named is None:
                    faults.append(f"a kind of type {type(kind).__name__} that names no OutcomeKind")
                    usable = False
                    continue
                faults.append(f"the kind as the string {named.value!r}, taken as {named}")
                kind = named
            reason = out.reason
            if not isinstance(reason, str):
                if reason is not None:
                    faults.append(f"a reason of type {type(reason).__name__}, taken as its text")
                reason = "" if reason is None else _text(reason)
            wait = out.retry_after
            if wait is not None and not isinstance(wait, float):
                if isinstance(wait, numbers.Real) and not isinstance(wait, bool):
                    try:
                        wait = float(wait)
                    except OverflowError:  # an int past a float's range: as long as can be (bounded)
                        wait = math.inf
                else:
                    faults.append(
                        f"a retry_after of type {type(wait).__name__}, not seconds as a number: "
                        "ignored, the backoff applies"
                    )
                    wait = None
            flags = []
            for name in ("held", "defer"):
                flag = getattr(out, name)
                if not isinstance(flag, bool):
                    faults.append(f"{name} of type {type(flag).__name__}, taken as a bool")
                flags.append(_truth(flag))
            mended.append(Outcome(kind, reason, wait, flags[0], flags[1]))
        if faults:
            new = self._contract_faults(faults)
            if new:
                self.log.error(
                    "sink %s broke the outcome contract in %s (each fault logged once; counted in "
                    'eventrouter_sink_send_errors_total{kind="contract"}): %s%s',
                    self.name,
                    how,
                    "; ".join(new),
                    "" if usable else "; the batch is retried",
                )
        if not usable:
            return [retry("sink broke the outcome contract")] * len(outcomes)
        return mended

    async def _deliver(self, batch: list[Occurrence]) -> None:
        self._in_flight = batch
        self._m_batch.observe(len(batch))
        pending: list[Occurrence] = batch
        done = self._done  # finished (accepted or dead-lettered), not yet checkpointed
        attempt = 0
        try:
            while pending:
                attempt += 1
                outcomes = await self._send_once(pending)
                if self._abandoned:
                    return  # a send that swallowed its cancellation ended after the stop went on
                now = time.time()
                retry_items: list[Occurrence] = []
                dead: list[tuple[Occurrence, str]] = []
                retry_after: float | None = None
                last_reason = ""
                lags: list[float] = []
                oldest_event_ns = 0
                failed = 0  # RETRY outcomes that are failures, not holds
                in_place = 0  # RETRY outcomes to be retried in place (not set aside)
                own = 0  # failures of items refused for a cause of their own (``defer``)
                held, owed = self._held, self._owed
                masked: dict[str, str] = {}  # reason → as logged: a batch's rejects mostly share one
                # Every item set aside before (retried alone in a quiet sink): no news of the rest.
                aside_only = bool(held) and all(occ.number in held.get(occ.uid, ()) for occ in pending)
                for occ, out in zip(pending, outcomes, strict=True):
                    if held and out.kind is not OutcomeKind.RETRY and occ.uid in held:
                        self._release(occ)
                    if owed and out.kind is not OutcomeKind.RETRY:
                        owed.discard((occ.uid, occ.number))
                    if out.kind is OutcomeKind.OK:
                        lag = now - occ.received_at
                        lags.append(lag if lag > 0.0 else 0.0)
                        if not oldest_event_ns or occ.time_ns < oldest_event_ns:
                            oldest_event_ns = occ.time_ns
                        if occ.number > done.get(occ.uid, 0):
                            done[occ.uid] = occ.number
                    elif out.kind is OutcomeKind.REJECT:
                        if (reason := masked.get(out.reason)) is None:
                            reason = masked[out.reason] = (
                                self._scrub(out.reason) if out.reason else "rejected"
                            )
                        dead.append((occ, reason))
                        self.metrics.dead_lettered.labels(self.name, "rejected").inc()
                        done[occ.uid] = max(done.get(occ.uid, 0), occ.number)
                    else:
                        retry_items.append(occ)
                        if not out.held or not last_reason:  # a failure's reason over a hold's
                            last_reason = out.reason
                        failed += not out.held
                        in_place += not out.defer
                        own += out.defer and not out.held
                        if (wait := self._server_wait(out.retry_after)) is not None:
                            retry_after = max(retry_after or 0.0, wait)
                if last_reason:
                    last_reason = self._scrub(last_reason)
                if lags:
                    self._m_delivered.inc(len(lags))
                    observe_many(self._m_lag, lags)
                    # The event's own age, once per send: the oldest accepted (relists make it large).
                    self._m_event_lag.observe(max(0.0, now - oldest_event_ns / 1e9))
                if dead:
                    self._dead_letter(dead)
                    if self.deadletter.path is not None:  # else _dead_letter named each
                        for occ, reason in dead[:3]:
                            self.log.warning("sink %s rejected %s: %s", self.name, occ.key, reason)
                        if len(dead) > 3:
                            self.log.warning(
                                "sink %s rejected %d more occurrences of this batch", self.name, len(dead) - 3
                            )
                if retry_items and (self._defer or not in_place):
                    # Down: a failed send, not only holds; or items refused for a cause of their own
                    # with nothing else taken (one index refused, and all the traffic goes there).
                    # A send of set-aside items only, refused again for their own cause, says nothing
                    # of the sink's other traffic: sink_up stays what the last send that carried any
                    # made it (up if that was taken, down if nothing was), until the next such send.
                    taken = bool(lags or dead)
                    if failed > own or (own and not taken and not aside_only):
                        self._set_up(False)
                    if failed:
                        self._throttled.warning(
                            "retry",
                            "sink %s: %d occurrences not accepted (%s); set aside for a retry",
                            self.name,
                            failed,
                            last_reason,
                        )
                    self._defer_retries(pending, outcomes, done)
                    self._checkpoint(done, [])
                    if failed <= own and (taken or not own):
                        # Only holds, or items refused for a cause of their own (one Loki stream,
                        # one index) while the destination takes the rest: it is up (the refused
                        # ones are counted in eventrouter_sink_retries_total and logged).
                        self._set_up(True)
                    break
                self._checkpoint(done, retry_items)
                if not retry_items:
                    self._set_up(True)
                    break
                if not failed:
                    # Held on purpose (``retry(..., held=True)``): no failed attempt, the sink is up.
                    attempt -= 1
                    pending = retry_items
                    self._in_flight = pending
                    await self._pause(self._backoff(1, retry_after))
                    if self._stop_now.is_set():
                        return
                    continue
                self._set_up(False)
                limit = self.options.retry_max_attempts
                if limit and attempt >= limit:
                    reason = f"retries exhausted after {attempt} attempts: {last_reason}"
                    self._dead_letter([(occ, reason) for occ in retry_items])
                    self.metrics.dead_lettered.labels(self.name, "retries_exhausted").inc(len(retry_items))
                    self.log.error(
                        "sink %s: %d occurrences dead-lettered, %s", self.name, len(retry_items), reason
                    )
                    for occ in retry_items:
                        done[occ.uid] = max(done.get(occ.uid, 0), occ.number)
                        self._owed.discard((occ.uid, occ.number))
                        # One set aside before (``defer``) and given up here: no longer held, or it
                        # would block its event's checkpoint and the spool's read position for good.
                        self._release(occ)
                    self._checkpoint(done, [])
                    break
                self._m_retries.inc(failed)
                delay = self._backoff(attempt, retry_after)
                firm = self._server_wait(retry_after) or 0.0
                self._throttled.warning(
                    "retry",
                    "sink %s: %d occurrences not accepted (%s); retry %d in %.2fs",
                    self.name,
                    len(retry_items),
                    last_reason,
                    attempt,
                    delay,
                )
                pending = retry_items
                self._in_flight = pending
                await self._pause(delay, firm)
                if self._stop_now.is_set():
                    return  # `_in_flight` keeps what is left, for the spool or the drop count
        finally:
            # Entries left on stop or cancellation stay unrecorded while a lower one is pending.
            if not self._abandoned:  # else the stop recorded what it could, and closed the checkpoint
                self._checkpoint(done, pending)
        self._in_flight = []

    def _release(self, occ: Occurrence) -> None:
        if self._failures:
            self._failures.pop((occ.uid, occ.number), None)
        if self._spooled_deferred:
            self._spooled_deferred.discard((occ.uid, occ.number))
        numbers = self._held.get(occ.uid)
        if numbers is not None:
            numbers.discard(occ.number)
            if not numbers:
                del self._held[occ.uid]
                self._went_round.discard(occ.uid)

    def _checkpoint(self, done: dict[str, int], still_pending: Sequence[Occurrence]) -> None:
        """Advance the checkpoint for finished occurrences unless a lower one of the same event is
        still pending: recording 5 while 4 waits for a retry would lose 4 after a crash."""
        if not done:
            return
        blocked: dict[str, int] = {}
        for occ in still_pending:
            if occ.uid in done:
                blocked[occ.uid] = min(blocked.get(occ.uid, occ.number), occ.number)
        for uid in done:
            held = self._held.get(uid)
            if held:
                blocked[uid] = min(blocked.get(uid, min(held)), min(held))
        spool = self.spool
        if spool is not None and spool.parked_count:
            floor = spool.parked_floor
            for uid in done:
                if (lowest := floor(uid)) is not None and lowest < blocked.get(uid, lowest + 1):
                    blocked[uid] = lowest  # parked: a crash or restart would skip it as a copy
        ready = {uid: n for uid, n in done.items() if uid not in blocked or n < blocked[uid]}
        if ready:
            self.checkpoint.ack(ready)
            for uid in ready:
                del done[uid]

    async def _start_sink(self) -> bool:
        """Start the sink, retrying with backoff: a destination down at boot only holds up its own
        pipeline (its queue fills, then spills or drops, all counted) while the rest runs."""
        attempt = 0
        while not self._stop_now.is_set():
            if self._replacement is not None:  # options re-read while this one could not start
                await self._use_replacement()
            attempt += 1
            starting = _Watched(self, "start", self.sink.start)
            try:
                async with asyncio.timeout(self.options.send_timeout) as deadline:
                    await starting
            except BaseException as exc:
                if self._stopping_for(exc, starting):
                    raise
                # A CancelledError a plugin let out, or any BaseException that is no Exception,
                # ended the pipeline task unseen: nothing delivered again, sink_up 1, no error
                # counted or logged. A failed start, retried as any.
                reason = self._start_failure(exc, deadline.expired(), self.sink)
                self._set_up(False)
                self.start_tried.set()
                self.metrics.send_errors.labels(self.name, "start").inc()
                delay = self._backoff(attempt, None)
                self.log.error("sink %s cannot start: %s (retry in %.1fs)", self.name, reason, delay)
                # Closing (a drain) is no reason to give up: what is queued may still be delivered
                # before the drain's deadline, as for a sink that started and then failed.
                await self._pause(delay)
                continue
            self.started.set()
            self.start_tried.set()
            self._set_up(True)
            return True
        return False

    @staticmethod
    def _stopping_for(exc: BaseException, call: _Watched) -> bool:
        """``exc``, met around a sink's call, stops the pipeline (a stop's cancellation, Ctrl-C, the
        coroutine closed) rather than being the sink's fault."""
        if isinstance(exc, asyncio.CancelledError):
            return cancelled_now()
        return raised_by_signal(exc) or call.closing

    def _start_failure(self, exc: BaseException, expired: bool, *sinks: Sink[Any]) -> str:
        """Why a start failed, as logged: a hung start said only "TimeoutError: "."""
        if isinstance(exc, asyncio.CancelledError):
            return f"start() {STRAY_CANCEL}"
        if isinstance(exc, TimeoutError) and expired:
            return f"start() did not finish within send_timeout {self.options.send_timeout:g}s"
        if isinstance(exc, SinkError):
            return self._scrub(_text(exc), *sinks)
        return self._fault(exc, *sinks)

    async def _pause(self, delay: float, firm: float = 0.0) -> None:
        """Wait ``delay`` seconds, less when told to stop or given a reloaded sink to try. A reloaded
        sink waits for the first ``firm`` seconds all the same: the destination's own Retry-After, which
        a rotated credential does not change (the new instance was sent at once, before the time asked)."""
        start = time.monotonic()
        end, floor = start + delay, start + min(firm, delay)
        while not self._stop_now.is_set():
            self._nudge.clear()
            remaining = (floor if self._replacement is not None else end) - time.monotonic()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._nudge.wait()
            except TimeoutError:
                pass

    # ---- reloaded options ---------------------------------------------------------------------

    def replace_sink(self, sink: Sink[Any]) -> None:
        """Send with ``sink`` (the same sink built from re-read options: a rotated credential) from
        the next send or start attempt on. A send in progress finishes with the current instance; a
        wait between retries ends at once. Queue, spool, checkpoint and metrics stay."""
        if self._replacement is not None:  # never started; closed with the next swap
            self._superseded.append(self._replacement)
        if self._failed_replacement is not None:  # a newer file: the one that could not start goes
            self._superseded.append(self._failed_replacement)
            self._failed_replacement = None
        self._replacement = sink
        self._nudge.set()

    def _replacement_due(self) -> bool:
        """A replacement to try at this send: a new one, or one whose start failed, once its time came."""
        if self._replacement is not None:
            return True
        return self._failed_replacement is not None and time.monotonic() >= self._failed_due

    async def _take_replacement(self) -> bool:
        """Send with the replacement from now on if it starts; False when stopped before a sink
        started. The working instance is kept until the replacement has started: closed first, a
        sink whose new instance could not start (a rotated CA file that is no PEM, a credential the
        destination does not take yet) was down for good. One that never started itself is no
        better: the replacement takes its place at once and is started as a first start is."""
        if not self.started.is_set():
            await self._use_replacement()
            return await self._start_sink()
        await self._start_replacement()
        return True

    async def _start_replacement(self) -> None:
        if self._replacement is not None:
            new, self._replacement, tries = self._replacement, None, 0
        elif self._failed_replacement is not None:
            new, self._failed_replacement, tries = self._failed_replacement, None, self._failed_tries
        else:
            return
        starting = _Watched(self, "start", new.start)
        try:
            async with asyncio.timeout(self.options.send_timeout) as deadline:
                await starting
        except BaseException as exc:
            if self._stopping_for(exc, starting):
                self._superseded.append(new)  # a stop: close_sink closes it
                raise
            # A CancelledError the plugin let out (or another BaseException) ended the pipeline
            # task unseen: a failed start.
            tries += 1
            self.metrics.send_errors.labels(self.name, "start").inc()
            reason = self._start_failure(exc, deadline.expired(), new, self.sink)
            if self._replacement is None:
                # Tried again, as a failing first start is (a credential not taken yet may be soon),
                # at a send: the working instance's sends are not held up for it.
                delay = self._backoff(tries, None)
                self._failed_replacement, self._failed_tries = new, tries
                self._failed_due = time.monotonic() + delay
                then = f"tried again at a send in {delay:.3g}s or more"
            else:  # a newer one came while it started
                self._superseded.append(new)
                then = "a newer one is tried next"
            self.log.error(
                "sink %s: the instance rebuilt with its re-read options cannot start: %s; the "
                "previous instance goes on sending (the rebuilt one is %s)",
                self.name,
                reason,
                then,
            )
            await self._close_superseded()
            return
        old, self.sink = self.sink, new
        self._superseded.append(old)
        await self._hand_over(new, old)

    async def _use_replacement(self) -> None:
        """Swap at once (the instance replaced never started): started by the caller."""
        new, self._replacement = self._replacement, None
        if new is None:
            return
        old, self.sink = self.sink, new
        self._superseded.append(old)
        await self._hand_over(new, old)
        self.started.clear()

    async def _hand_over(self, new: Sink[Any], old: Sink[Any]) -> None:
        """Close ``old``, then let ``new`` take over from it. While the close awaits, offers run (a
        drop, a dead letter): told to ``new`` alone, their records still in ``old`` were carried over
        and held their stream back for nothing until they expired (r-g F1)."""
        self._handing_over = old
        try:
            await self._close_superseded()
        finally:
            self._handing_over = None
        self._took_over(new, old)

    async def _close_superseded(self) -> None:
        while self._superseded:  # taken out before each await: a swap meanwhile adds to it
            closing = self._superseded.pop()
            try:
                await self._close_quietly(closing)
            except asyncio.CancelledError:
                # A stop: close_sink closes it (aclose may run twice); it was left unclosed.
                self._superseded.append(closing)
                raise

    def _took_over(self, new: Sink[Any], old: Sink[Any]) -> None:
        try:
            new.take_over(old)
        except BaseException as exc:
            if raised_by_signal(exc):
                raise
            self.log_fault(
                logging.ERROR,
                "sink %s: take_over from the previous instance raised",
                self.name,
                exc=exc,
                sink=new,
            )
        self.log.info("sink %s: now sending with its re-read options", self.name)

    async def _close_quietly(self, sink: Sink[Any], what: str = "the previous instance") -> None:
        closing = _Watched(self, "aclose", sink.aclose)
        try:
            # Bounded: a close that flushes into a broken connection must not stall the pipeline.
            async with asyncio.timeout(self.options.send_timeout):
                await closing
        except asyncio.CancelledError:
            if cancelled_now():
                raise  # a stop's deadline: close_sink closes what is left
            # Let out by the plugin: it ended the pipeline task (a swap) or the router's stop (which
            # then never finished: no checkpoint written, no lock or lease released) unseen.
            self.metrics.send_errors.labels(self.name, "exception").inc()
            self.log.error("sink %s: aclose() %s; going on", self.name, STRAY_CANCEL)
        except BaseException as exc:
            if raised_by_signal(exc) or closing.closing:
                raise
            self.metrics.send_errors.labels(self.name, "exception").inc()
            self.log.warning(
                "sink %s: closing %s raised %s: %s",
                self.name,
                what,
                type(exc).__name__,
                self._scrub(_text(exc), sink),
            )

    async def close_sink(self) -> None:
        """Release the sink's connections (and those of a reloaded one not used yet)."""
        pending, self._replacement = self._replacement, None
        failed, self._failed_replacement = self._failed_replacement, None
        await self._close_quietly(self.sink, "it")
        for sink in (pending, failed):
            if sink is not None:
                await self._close_quietly(sink, "its instance rebuilt with re-read options (not used)")
        while self._superseded:
            await self._close_quietly(self._superseded.pop())

    async def run(self) -> None:
        """Start the sink, then deliver until closed and drained (or told to stop now)."""
        try:
            started = self.started.is_set() or await self._start_sink()
        finally:
            # Stopped, or cancelled by a stop's deadline, before a first try ended: the first list
            # waits for this, and would wait for ever (the process did not exit after SIGTERM).
            self.start_tried.set()
        if not started:
            self.idle.set()
            return
        while not self._stop_now.is_set():
            batch = await self._next_batch()
            if batch is None:
                break
            await self._deliver(batch)
            # Not kept while waiting for the next one: an idle router would otherwise hold its
            # last batch (records and encodings, ~4 KiB an occurrence) in every pipeline.
            del batch
        self.idle.set()

    # ---- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """No more offers; ``run`` returns once the queue is delivered."""
        self._closing = True
        self._wakeup.set()
        self._room.set()

    def stop_now(self) -> None:
        """Give up on what is left (drain deadline passed)."""
        self._closing = True
        self._stop_now.set()
        self._nudge.set()
        self._wakeup.set()

    def owed_at_stop(self, left: Iterable[Occurrence]) -> set[tuple[str, int]]:
        """Which of the leftovers to keep in the spool as owed, so that ``settle_at_stop`` may then
        record what was accepted past them: an occurrence that waited while a newer one of its event
        was accepted (X/4 retried, X/5 accepted: the checkpoint held X/5 back for X/4's sake, and the
        relist after the restart would send X/5 again), or one read from the spool owed and not
        finished yet."""
        done, owed, accepted = self._done, self._owed, self.checkpoint.accepted
        keys: set[tuple[str, int]] = set()
        for occ in left:
            key = (occ.uid, occ.number)
            newer = done.get(occ.uid, 0)
            if key in owed or accepted(occ.uid) < occ.number < newer:
                keys.add(key)
        return keys

    def settle_at_stop(self) -> None:
        """The leftovers are in the spool, owed where ``owed_at_stop`` said: record what was
        accepted past them."""
        if self._done:
            done = self._done
            spool = self.spool
            if spool is not None and spool.owed_unmarked:
                # Left in place by a stop that could not write them (``Spool.prepend``), unmarked:
                # recorded past, an owed one would be skipped as a copy after the restart.
                done = {uid: n for uid, n in done.items() if uid not in spool.owed_unmarked}
            if spool is not None and spool.parked_count:
                # An occurrence parked (X/1) below one accepted (X/2): recorded past it, it would be
                # skipped as a copy after the restart, so it is marked owed first, as leftovers are.
                # What cannot be kept so is not recorded (the relist sends X/2 again: no loss).
                floor = spool.parked_floor
                behind = {
                    uid: n for uid, n in done.items() if (lowest := floor(uid)) is not None and lowest < n
                }
                if behind:
                    ok = spool.owe_parked(behind)
                    done = {uid: n for uid, n in done.items() if uid not in behind or uid in ok}
            self.checkpoint.ack(done)
            self._done.clear()

    def leftovers(self) -> tuple[list[Occurrence], list[Occurrence]]:
        """What was not delivered: (older than the spool's backlog: in flight, the batch being
        filled, deferred, queued; newer than it: what waited behind it), each in order."""
        self._throttled.report(now=True)  # a stop: what was held back is said now or never
        # In the order received, not due: a due time grows with each refusal, and one held behind
        # (no attempt) is due sooner, so an object's events went into the spool newest first and,
        # after the restart, to the sink so (a Kafka partition keeps what it is given in that order).
        deferred = [occ for _, _, occ in sorted(self._deferred, key=lambda e: (e[2].received_at, e[1]))]
        older = _numbers_rising(list(self._in_flight) + self._filling + deferred + list(self._queue))
        newer = list(self._overflow)
        self._in_flight = []
        self._filling = []
        self._aside.clear()
        self._failures.clear()
        self._queue.clear()
        self._overflow.clear()
        self._queue_bytes = self._overflow_bytes = 0
        return older, newer

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until everything offered so far has been sent (tests, drains)."""
        async with asyncio.timeout(timeout):
            while True:
                await self.idle.wait()
                if not (
                    self._queue
                    or self._in_flight
                    or self._filling
                    or self._deferred
                    or self._overflow
                    # ``is not None``: a Spool with an empty main FIFO is falsy (``__len__``), and
                    # what was parked in it was not waited for.
                    or (self.spool is not None and (len(self.spool) or self.spool.parked_count))
                ):
                    return
                self.idle.clear()
                self._wakeup.set()


class _Watched:
    """Awaits a sink's ``send``, ``start`` or ``aclose`` as ``await`` would, step by step, timing each
    synchronous step (two clock reads): one that holds the event loop ``BLOCKING_STEP`` or more (a
    synchronous client, ``time.sleep``) is named (``Pipeline._blocked``), as is a call still going on
    some seconds after its cancellation (it swallows it: neither send_timeout nor a stop ended it).
    Only while that cancellation is pending on the task: one the call's own ``asyncio.timeout``,
    aiohttp's request timeout or a ``TaskGroup`` made and turned into an error (``uncancel``) is no
    swallowed one, and the call may well go on working."""

    __slots__ = ("_args", "_call", "_cut_at", "_late", "_method", "_overran", "_pipeline", "_task", "closing")

    def __init__(self, pipeline: Pipeline, method: str, call: Callable[..., Any], *args: Any) -> None:
        self._pipeline = pipeline
        self._method = method
        self._call = call
        self._args = args
        self._cut_at = 0.0
        self._late: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None  # that runs the call, known once it is cancelled
        self._overran = False
        self.closing = False
        """The awaiting coroutine was closed (a GeneratorExit from outside, not one the sink raised)."""

    def __await__(self) -> Generator[Any, Any, Any]:
        clock = time.monotonic
        began = clock()
        try:
            awaitable = self._call(*self._args)  # a plain `def` runs (and may block) here
        finally:
            if (spent := clock() - began) >= BLOCKING_STEP:
                self._pipeline._blocked(self._method, spent)
        to_await = getattr(type(awaitable), "__await__", None)
        if to_await is None:
            raise TypeError(
                f"{self._method}() returned {type(awaitable).__name__}, not an awaitable: it must be async def"
            )
        steps = to_await(awaitable)
        value: Any = None
        thrown: BaseException | None = None
        try:
            while True:
                began = clock()
                try:
                    step = steps.send(value) if thrown is None else steps.throw(thrown)
                except StopIteration as done:
                    return done.value
                finally:
                    if (spent := clock() - began) >= BLOCKING_STEP:
                        self._pipeline._blocked(self._method, spent)
                if self._late is not None and not self._pending():
                    self._late.cancel()  # that step handled its own cancellation (and goes on)
                    self._late = None
                try:
                    value, thrown = (yield step), None
                except GeneratorExit:
                    self.closing = True
                    steps.close()
                    raise
                except BaseException as exc:  # thrown in by the task: a cancellation
                    value, thrown = None, exc
                    if self._late is None and isinstance(exc, asyncio.CancelledError):
                        self._task = asyncio.current_task()
                        self._cut_at = clock()
                        grace = self._pipeline._cut_off_grace()
                        self._late = asyncio.get_running_loop().call_later(grace, self._still_going)
        finally:
            if self._late is not None:
                self._late.cancel()
                if self._overran:
                    self._pipeline._ended_late(self._method, clock() - self._cut_at)

    def _pending(self) -> bool:
        """A cancellation is still pending on the task (send_timeout's, a stop's), or the alarm fired."""
        task = self._task
        return self._overran or task is None or task.cancelling() > 0

    def _still_going(self) -> None:
        if not self._pending():
            self._late = None
            return
        self._overran = True
        self._pipeline._overran(self._method, time.monotonic() - self._cut_at)


_KINDS = {kind.value: kind for kind in OutcomeKind}


_NAMED_PER_LINE = 100
"""Dead-letter keys a log line names without --data-dir: ~5 KB, below a container runtime's line
split (16 KiB)."""


def _well_formed(out: Outcome) -> bool:
    """The fields hold the types the engine reads (checked for every outcome: kept cheap)."""
    wait = out.retry_after
    return (
        type(out.kind) is OutcomeKind
        and type(out.reason) is str
        and (wait is None or type(wait) is float)
        and type(out.held) is bool
        and type(out.defer) is bool
    )


def _text(value: object) -> str:
    """``str(value)``, also for a plugin's object whose ``__str__`` raises."""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__} whose text cannot be read>"


def _no_count(value: object) -> str | None:
    """Why ``value`` is no total a counter can take (a finite real number, not below 0); None if it is
    one. Without the value: each fault is logged once, and a total going down goes on changing."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return f"of type {type(value).__name__}"
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):  # an int past a float's range, an odd Real
        return "past a float's range"
    if not math.isfinite(number):
        return "not finite"
    return "below 0" if number < 0 else None


def _truth(value: object) -> bool:
    try:
        return bool(value)
    except Exception:  # a plugin's object whose __bool__ raises (a numpy array)
        return False


def _numbers_rising(occs: list[Occurrence]) -> list[Occurrence]:
    """``occs`` with each event's occurrences in rising number order, in the places they hold. Items
    set aside wait in due-time order (a longer backoff for one failed more often), and one may be in
    flight while an older one waits aside: spooled so at a stop, the newer went first after the
    restart and the older was skipped as a copy (the checkpoint past it): lost, counted nowhere."""
    places: dict[str, list[int]] = {}
    for i, occ in enumerate(occs):
        places.setdefault(occ.uid, []).append(i)
    out = list(occs)
    for where in places.values():
        if len(where) > 1:
            for i, occ in zip(where, sorted((occs[i] for i in where), key=lambda o: o.number), strict=True):
                out[i] = occ
    return out


def queue_cost(occ: Occurrence) -> int:
    """What an occurrence counts against the memory queue's byte bound: its Event's JSON twice, for
    the raw JSON and the record made of it (its strings: as large). Its encoding, made when a batch
    takes it, is not counted (one batch's worth), nor the empty structures of a small event. The
    same for an occurrence whenever it is counted; costs no encoding at the offer."""
    return 2 * len(occ.raw_json)


def _aside_bytes_share(bound: int) -> int:
    """The bytes items set aside may hold in memory: half the bound, but no more than leaves a page's
    room (``INTAKE_ROOM``: 16 MiB of the default 48), so that a relist finding the queue empty hands
    a page on beside them without overflowing; at least a quarter of a bound that small."""
    return max(bound // 4, min(bound // 2, bound - INTAKE_ROOM))


def _lines_within(cost: int) -> int:
    """The spooled lines' bytes that count at most ``cost`` in memory once read: a line is its raw
    JSON and a few bytes more, which ``queue_cost`` counts twice."""
    return max(0, cost) // 2


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"


_Entry = tuple[float, int, Occurrence]
"""An item set aside: (due, seq, occurrence), in due-time order, then by ``seq`` (never equal)."""


class _Aside:
    """The items set aside: ``heap``, a min-heap of entries by due time as ``heapq`` keeps one, that
    also knows where each entry sits (seq → index), so that any entry leaves in O(log n). Beside it,
    cleaned lazily (an entry whose seq has left is skipped, and rebuilt once they are mostly stale):
    the entries by receipt, which give way first when memory is full (before, each offer then sorted
    and rebuilt the whole heap: 5,000 offers blocked the event loop for seconds), and each event's by
    due time, for its earliest due and its entries without a scan of the heap (before, each newer
    occurrence waiting behind an older one of its event scanned it all: quadratic)."""

    __slots__ = ("_at", "_count", "_events", "_received", "bytes", "heap")

    def __init__(self) -> None:
        self.heap: list[_Entry] = []
        self.bytes = 0  # of its occurrences (``queue_cost``): they count against the memory's byte bound
        self._at: dict[int, int] = {}  # seq → index in ``heap``
        self._received: list[tuple[float, int]] = []  # (received_at, seq), a heap
        self._events: dict[str, list[tuple[float, int]]] = {}  # uid → its (due, seq), a heap
        self._count: dict[str, int] = {}  # uid → its entries in ``heap``

    def push(self, entry: _Entry) -> None:
        heap, seq, occ = self.heap, entry[1], entry[2]
        heap.append(entry)
        self.bytes += queue_cost(occ)
        self._up(len(heap) - 1)
        received = self._received
        heapq.heappush(received, (occ.received_at, seq))
        if len(received) > 2 * len(heap) + 16:
            self._received = [(e[2].received_at, e[1]) for e in heap]
            heapq.heapify(self._received)
        uid = occ.uid
        count = self._count[uid] = self._count.get(uid, 0) + 1
        dues = self._events.get(uid)
        if dues is None:
            dues = self._events[uid] = []
        heapq.heappush(dues, (entry[0], seq))
        if len(dues) > 2 * count + 8:
            self._events[uid] = dues = [(due, s) for due, s in dues if self._live(s, due)]
            heapq.heapify(dues)

    def pop(self) -> _Entry:
        """The entry due first (``heap`` is not empty)."""
        return self._take_at(0)

    def remove(self, entries: Iterable[_Entry]) -> None:
        """Take ``entries`` out (those still in)."""
        at = self._at
        for entry in entries:
            i = at.get(entry[1])
            if i is not None:
                self._take_at(i)

    def entries_of(self, uids: Iterable[str]) -> list[_Entry]:
        """The entries of the events ``uids``, each once."""
        heap, at = self.heap, self._at
        out: list[_Entry] = []
        for uid in uids:
            seen: set[int] = set()
            for due, seq in self._events.get(uid, ()):
                if seq not in seen and self._live(seq, due):
                    seen.add(seq)
                    out.append(heap[at[seq]])
        return out

    def due_of(self, uid: str) -> float | None:
        """The earliest due time of ``uid``'s entries (None: it has none)."""
        dues = self._events.get(uid)
        while dues:
            due, seq = dues[0]
            if self._live(seq, due):
                return due
            heapq.heappop(dues)
        return None

    def drop_oldest(self, count: int) -> list[_Entry]:
        """Take out the ``count`` entries received first (then by ``seq``), oldest first."""
        received, heap, at = self._received, self.heap, self._at
        out: list[_Entry] = []
        while received and len(out) < count:
            _, seq = heapq.heappop(received)
            i = at.get(seq)
            if i is not None:
                out.append(heap[i])
                self._take_at(i)
        return out

    def replace(self, entries: list[_Entry]) -> None:
        """Hold ``entries`` instead (in the same ``heap`` list)."""
        heap = self.heap
        heap[:] = entries
        heapq.heapify(heap)
        self._at = {entry[1]: i for i, entry in enumerate(heap)}
        self._received = [(entry[2].received_at, entry[1]) for entry in heap]
        heapq.heapify(self._received)
        events: dict[str, list[tuple[float, int]]] = {}
        for due, seq, occ in heap:
            events.setdefault(occ.uid, []).append((due, seq))
        for dues in events.values():
            heapq.heapify(dues)
        self._events = events
        self._count = {uid: len(dues) for uid, dues in events.items()}
        self.bytes = sum(queue_cost(entry[2]) for entry in heap)

    def clear(self) -> None:
        self.replace([])

    def _live(self, seq: int, due: float) -> bool:
        """The (due, seq) noted beside the heap is still one of its entries."""
        i = self._at.get(seq)
        return i is not None and self.heap[i][0] == due

    def _take_at(self, i: int) -> _Entry:
        heap, at = self.heap, self._at
        entry = heap[i]
        last = heap.pop()
        del at[entry[1]]
        if i < len(heap):
            heap[i] = last
            at[last[1]] = i
            self._down(i)
            self._up(at[last[1]])
        self.bytes -= queue_cost(entry[2])
        uid = entry[2].uid
        left = self._count[uid] - 1
        if left:
            self._count[uid] = left
        else:
            del self._count[uid]
            del self._events[uid]
        return entry

    def _up(self, i: int) -> None:
        """Move ``heap[i]`` towards the root to its place (``heapq``'s order)."""
        heap, at = self.heap, self._at
        entry = heap[i]
        while i:
            parent = (i - 1) >> 1
            above = heap[parent]
            if not entry < above:
                break
            heap[i] = above
            at[above[1]] = i
            i = parent
        heap[i] = entry
        at[entry[1]] = i

    def _down(self, i: int) -> None:
        """Move ``heap[i]`` towards the leaves to its place."""
        heap, at = self.heap, self._at
        n = len(heap)
        entry = heap[i]
        while (child := 2 * i + 1) < n:
            if child + 1 < n and heap[child + 1] < heap[child]:
                child += 1
            below = heap[child]
            if not below < entry:
                break
            heap[i] = below
            at[below[1]] = i
            i = child
        heap[i] = entry
        at[entry[1]] = i
