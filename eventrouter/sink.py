"""The one sink contract.

A sink encodes a batch, sends it and says what happened to each item. Everything else —
filtering, queueing, batching, retries with backoff, dead-lettering, checkpoints and metrics —
belongs to the engine, so every sink gets it the same way.

A plugin is a ``Sink`` subclass registered in the ``eventrouter.sinks`` entry-point group::

    [project.entry-points."eventrouter.sinks"]
    mysink = "mypackage.mysink:MySink"

with a pydantic options model in ``options_model`` (see ``eventrouter.options.SinkOptions``).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import enum
import inspect
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from eventrouter.options import QUEUE_DEFAULT, PipelineOptions, SinkOptions
from eventrouter.record import Occurrence

__all__ = [
    "OK",
    "Outcome",
    "OutcomeKind",
    "RetryableError",
    "Sink",
    "SinkContext",
    "SinkError",
    "aside_bound",
    "reject",
    "retry",
]


class OutcomeKind(enum.Enum):
    OK = "ok"
    """Durably accepted by the destination: counts as delivered and advances the checkpoint."""
    RETRY = "retry"
    """Not accepted this time (429, 5xx, timeouts): the engine sends the item again with backoff."""
    REJECT = "reject"
    """Refused for good (400, validation): the engine dead-letters it with the reason."""


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    reason: str = ""
    retry_after: float | None = None
    """Seconds the destination asked us to wait (Retry-After), if it did."""
    held: bool = False
    """RETRY that is no failure: the sink holds the item on purpose (a digest window, its own rate
    limit) and wants it back after ``retry_after``. Not counted as an attempt or a retry."""
    defer: bool = False
    """RETRY of an item refused for a cause of its own (its Loki stream over the stream limit, its
    Elasticsearch index refused) while the destination takes the rest: when every RETRY of a send
    says so, those items wait aside (each with its own backoff, still counting towards
    ``retry_max_attempts``) and later batches go on. Without it a retry holds up the pipeline."""


OK = Outcome(OutcomeKind.OK)


def retry(
    reason: str, *, retry_after: float | None = None, held: bool = False, defer: bool = False
) -> Outcome:
    return Outcome(OutcomeKind.RETRY, reason, retry_after, held, defer)


def reject(reason: str) -> Outcome:
    return Outcome(OutcomeKind.REJECT, reason)


class SinkError(Exception):
    """A sink cannot work as configured (unreachable at start, wrong credentials, bad option).

    The message must name what is at fault, never a secret.
    """


class RetryableError(Exception):
    """The whole batch failed in a way worth retrying (connection refused, 503, timeout)."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What the engine tells a sink about where it runs."""

    name: str
    """The configured instance name (unique per router); use it in log messages."""
    cluster: str
    """``--cluster-name``; the normalised record carries it already."""
    data_dir: Path | None
    """Private folder for this sink's files, when the router has ``--data-dir``."""
    logger: logging.Logger
    send_timeout: float = 30.0
    """The pipeline's ``send_timeout``: the engine cuts a send off after it and sends the batch again
    whole. A sink that sends a batch in several requests keeps within ``send_budget`` instead."""
    retry_wait_max: float = 300.0
    """The longest the engine waits before offering a retried item again (``retry_max_backoff``, or a
    Retry-After up to ten times that): what a sink holding state for a retried item must outlast."""
    aside_max_events: int | None = QUEUE_DEFAULT // 2
    """The most of this sink's occurrences the engine keeps set aside in memory (answered ``retry``,
    waiting while later batches go on) before it drops the oldest of them, counted ``queue_full``
    (``aside_bound``): half the pipeline's ``queue_max_events`` without a disk spool, all of it for a
    sink that defers its retries. None: none is dropped for it (a disk spool keeps what is over). A
    sink that sets items aside on purpose (waiting for a confirmation) keeps them within it: the
    sink cannot see the pipeline's options, and over it the engine dropped what the sink awaited."""

    @property
    def send_budget(self) -> float:
        """Seconds a send may spend before it ends on its own: five sixths of ``send_timeout``, the
        rest left for answering. What it did not send by then it answers retry (``held``). A sink may
        wait past it for the answer to a request it started late in the budget (Kafka does), never
        past ``send_timeout`` less a margin: given up, what that request wrote would be sent again."""
        return self.send_timeout * 5 / 6

    def warn_if_outlasting(self, seconds: float, option: str) -> None:
        """Warn (at start) when one request may take longer than the engine lets a send last: the
        engine cuts such a send off and sends its batch again whole, so what went in goes in twice."""
        if seconds > self.send_timeout:
            self.logger.warning(
                "%s: %s=%gs is longer than the pipeline's send_timeout=%gs: a request that slow is cut "
                "off and its batch sent again whole (duplicates); lower %s or raise send_timeout",
                self.name,
                option,
                seconds,
                self.send_timeout,
                option,
            )


def aside_bound(pipeline: PipelineOptions, *, spooled: bool, defer: bool) -> int | None:
    """``SinkContext.aside_max_events`` of a sink behind ``pipeline``: the pipeline keeps items set
    aside to half its memory bound (a key refused for long leaves the other half to the rest), over it
    parks them in the spool or, without one, drops the oldest; a sink deferring its retries (the alert
    robots) has no share of its own, its holds are its whole queue."""
    if spooled:
        return None
    bound = pipeline.queue_bound(spooled=False)
    return bound if defer else max(1, bound // 2)


OptionsT = TypeVar("OptionsT", bound=SinkOptions)


STRAY_CANCEL = "raised CancelledError without being cancelled (a sink bug)"


def cancelled_now() -> bool:
    """A CancelledError met now is a cancellation of the running task (a stop, a deadline), not one a
    sink let out (a cancelled future awaited inside a library): that one is the sink's fault."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raised_by_signal(exc: BaseException) -> bool:
    """``exc`` may be Ctrl-C itself, not a sink's doing: a KeyboardInterrupt while SIGINT raises one
    wherever the interpreter is (Python's default handler; ``asyncio.run``'s at a second Ctrl-C). Where
    the event loop handles SIGINT (``eventrouter run`` turns it into a stop) none comes from a signal:
    one met then was raised by the code that ran, a sink's fault as any exception of it."""
    if not isinstance(exc, KeyboardInterrupt):
        return False
    handler = signal.getsignal(signal.SIGINT)
    return callable(handler) and getattr(handler, "__name__", "") != "_sighandler_noop"


ASYNC_METHODS = ("start", "send", "check", "aclose")
SYNC_METHODS = ("given_up", "stop_sending", "take_over")


def contract_faults(cls: type[Sink[Any]]) -> list[str]:
    """How ``cls`` breaks the methods' contract: a ``send`` written as a plain ``def`` ran (and
    delivered) before the engine's ``await`` of its list failed, and the batch was sent again for
    ever; an ``async def given_up`` is never run."""
    faults = []
    for name in ASYNC_METHODS:
        method = getattr(cls, name, None)
        if not (_is_async(method) or _is_async(inspect.unwrap(method) if callable(method) else None)):
            faults.append(f"{name} must be async def")
    for name in SYNC_METHODS:
        method = getattr(cls, name, None)
        if _is_async(method) or inspect.isasyncgenfunction(method):
            faults.append(f"{name} must be a plain def (the engine calls it without awaiting it)")
    return faults


def _is_async(method: object) -> bool:
    return inspect.iscoroutinefunction(method)


class Sink(abc.ABC, Generic[OptionsT]):
    """Base class of every sink.

    Lifecycle: ``__init__`` (no I/O) → ``start()`` → many ``send()`` → ``aclose()``. When a file
    named by its options changes, a new instance takes over (``take_over``) between two sends.
    The new instance is started while the one it replaces still stands, and takes over only once
    started: if its ``start`` fails, the previous instance goes on sending and the new one's start is
    tried again later. ``send`` is never called concurrently for one sink instance.
    """

    options_model: ClassVar[type[SinkOptions]] = SinkOptions
    """The pydantic model of this sink's options (``extra="forbid"``)."""

    description: ClassVar[str] = ""
    """One line for ``eventrouter sinks``."""

    wants_time_order: ClassVar[bool] = False
    """The destination refuses entries too far out of time order (Loki: an hour behind the stream's
    newest). The router then hands relists on oldest-first (the API server lists in key order), at
    some start-up cost: the whole list is read, and sorted on disk, before the first is handed on."""

    def __init__(self, options: OptionsT, context: SinkContext) -> None:
        self.options = options
        self.context = context
        self.log = context.logger
        self.modified: collections.Counter[str] = collections.Counter()
        """Occurrences delivered changed, in total, by reason (``truncated``, ``time_adjusted``;
        another is counted as ``other``): the engine exports the increase after each send as
        ``eventrouter_sink_modified_total``. Carry it over in ``take_over``."""

    async def start(self) -> None:
        """Connect and check the destination; raise SinkError with a clear message if it cannot work."""

    @abc.abstractmethod
    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        """Encode and send one batch; return one Outcome per item, in order (None means all OK).

        Raise RetryableError when the whole batch should be retried. Any other exception is
        logged by the engine and treated as retryable, so a sink bug never loses events.
        """

    async def check(self) -> None:
        """Reach the destination for ``eventrouter check`` (defaults to ``start``)."""
        await self.start()

    def take_over(self, previous: Sink[OptionsT]) -> None:
        """Called on an instance built from re-read options (a credential, certificate or template
        file changed) once its ``start`` succeeded (before its start when the instance it replaces
        never started), before its first send, with the instance it replaces, already closed. Keep here
        what must outlive the swap: occurrences held inside the sink (alert digests) or what the
        destination expects to continue. The engine keeps the queue, spool and checkpoint itself."""

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        """The engine gave these up: dead-lettered (refused, or ``retry_max_attempts`` spent),
        dropped from a full memory queue, or dropped from the disk spool over its bound, and counted
        so (overriding this makes the spool rebuild the records it drops, ~8 µs each). A sink that keeps occurrences between sends
        (alert digests) forgets them here, so that it never delivers what was counted as not
        delivered. During a reload it is also called on the instance being replaced while that
        instance closes (what it holds is handed to the new one by ``take_over`` after the close), so
        it must not need the instance's connections. Synchronous; must not raise."""

    def stop_sending(self) -> None:
        """The router is stopping and its drain deadline passed: the send in progress is about to be
        cut off and its batch spooled for the next start. A sink whose writes go on where the engine
        cannot cancel them (a thread blocked in write(2), a hung file system) ends them at a point
        it can answer for and lets its send return what went out, so that nothing spooled also lands
        later (written twice after the restart). Synchronous; must not raise. Default: nothing."""

    async def aclose(self) -> None:
        """Release connections. Must be safe to call twice and without a prior ``start``."""
