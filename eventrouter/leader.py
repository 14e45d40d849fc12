"""Lease-based leader election (coordination.k8s.io/v1), with the semantics of client-go's leaderelection.

* The lease is created when it does not exist (404).
* A held lease is taken over only when its record has not changed for ``leaseDurationSeconds``
  measured on the LOCAL monotonic clock from the moment this replica observed it: renewTime is never
  compared with our wall clock, so clock skew between nodes cannot cause two leaders.
* Every write carries ``metadata.resourceVersion``: a 409 Conflict means another replica won the race.
* The leader renews every ``retry_period``. When it has not renewed successfully within
  ``renew_deadline`` of sending its last successful renewal, it stops leading (``on_stopped_leading``)
  before anyone else can consider the lease expired (others wait at least ``lease_duration`` after they
  saw that renewal, and ``renew_deadline < lease_duration``).
* ``release()`` on clean shutdown empties ``holderIdentity`` (and sets ``leaseDurationSeconds=1``,
  as client-go does) so that a standby takes over at its next retry instead of waiting for expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from eventrouter.metrics import Metrics
from eventrouter.source.kube import ApiError, KubeClient, failure_text, raise_for_status

__all__ = ["LEASE_DURATION_MAX", "LeaderElector", "check_timings", "micro_time"]

log = logging.getLogger(__name__)

# Errors of one request: API answers, connection failures and our own per-request deadline.
_REQUEST_ERRORS = (ApiError, aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError)


LEASE_DURATION_MAX = 2**31 - 1
"""leaseDurationSeconds is an int32: the API server refuses a Lease with more, so every replica
would stand by for ever."""
JITTER_FACTOR = 1.2
"""client-go's: a standby's retry waits up to this many retry periods (see ``_acquire``)."""
LEAD_FAILED = "on_started_leading failed"
"""``stopped_reason`` when the leader's own work raised: the lease is still held, not lost."""
STOPPING = "stopping"
"""``stopped_reason`` when ``stop()`` ended the leadership."""


def check_timings(
    lease_duration: float,
    renew_deadline: float,
    retry_period: float,
    names: tuple[str, str, str] = ("lease duration", "renew deadline", "retry period"),
) -> None:
    """Refuse timings client-go's NewLeaderElector refuses (and a leaseDurationSeconds the API server
    refuses), naming the settings by ``names`` (the command line's option names)."""
    lease, renew, retry = names
    for name, value in zip(names, (lease_duration, renew_deadline, retry_period), strict=True):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"leader election: {name} ({value:g}s) must be a positive number of seconds")
    if math.ceil(lease_duration) > LEASE_DURATION_MAX:
        raise ValueError(
            f"leader election: {lease} ({lease_duration:g}s) must be at most {LEASE_DURATION_MAX} s: the "
            "Lease's leaseDurationSeconds is an int32, and the API server refuses a larger one"
        )
    if renew_deadline >= lease_duration:
        raise ValueError(
            f"leader election: {renew} ({renew_deadline:g}s) must be shorter than the {lease} "
            f"({lease_duration:g}s): a leader that cannot renew must stop before its lease expires"
        )
    if renew_deadline <= JITTER_FACTOR * retry_period:
        raise ValueError(
            f"leader election: {renew} ({renew_deadline:g}s) must be longer than {JITTER_FACTOR:g} x the "
            f"{retry} ({retry_period:g}s): a leader must get more than one renewal attempt, with "
            "jitter, before its deadline"
        )


def micro_time(now: datetime | None = None) -> str:
    """A metav1.MicroTime as the API server writes it: RFC 3339, UTC, exactly six fraction digits."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One replica's participation in the election for ``namespace/name``. ``identity`` must be unique
    per process (e.g. pod name plus a random suffix): two processes with one identity both lead."""

    def __init__(
        self,
        kube: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15,
        renew_deadline: float = 10,
        retry_period: float = 2,
        metrics: Metrics | None = None,
    ) -> None:
        if not identity:
            raise ValueError("leader election identity must not be empty")
        check_timings(lease_duration, renew_deadline, retry_period)
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.metrics = metrics
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.is_leader = False
        # Counters for operators and tests (exported as eventrouter_leader_transitions_total and
        # eventrouter_lease_renew_failures_total).
        self.transitions = 0  # times this replica became leader
        self.conflicts = 0  # writes answered 409: another replica won the race
        # Why the last leadership ended, as run() logged it; None while leading or before the first.
        # on_stopped_leading reads it: a failed start is not a lost lease (review-b N1).
        self.stopped_reason: str | None = None
        self.lead_failed = False  # the last leadership ended because on_started_leading raised
        # A leadership counted "acquired" and not yet counted as ended ("lost", "released" or
        # "release_failed"): each one counted once, a release after a lost lease not again.
        self._uncounted_end = False
        # The last record seen (spec of the Lease) and when it was first seen, on the monotonic clock.
        self._observed: dict[str, Any] | None = None
        self._observed_at = 0.0
        self._observed_holder: str | None = None
        self._resource_version: str | None = None
        self._last_error: str | None = None
        self._last_sent = 0.0  # monotonic time the last successful attempt started
        # A write naming us was sent and not answered (cancelled, timed out, 5xx): it may have taken
        # effect, so release() must look even though we never saw ourselves as the holder.
        self._maybe_holder = False
        self._claim_version: str | None = None  # the resourceVersion that write was conditional on
        self._stopping = False
        self._wake = asyncio.Event()
        self._run_task: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return (
            f"<LeaderElector {self.namespace}/{self.name} identity={self.identity} leader={self.is_leader}>"
        )

    # ---- public -------------------------------------------------------------------------------

    async def run(
        self,
        on_started_leading: Callable[[], Awaitable[None]],
        on_stopped_leading: Callable[[], Awaitable[None]],
        *,
        release_on_failure: bool = True,
    ) -> None:
        """Acquire, lead, and when the lease cannot be renewed stop leading and try again; until
        ``stop()``/``release()`` is called or the task is cancelled. Cancelling cancels the ``on_started_leading``
        task too but does not call ``on_stopped_leading`` (shutdown is the caller's business; call
        ``release()`` once delivery has stopped). An exception from ``on_started_leading`` ends leadership
        (``on_stopped_leading``, lease released) and is raised from here. ``release_on_failure=False``:
        the caller releases after its own stop (a last checkpoint write), which the next leader reads."""
        self._stopping = False
        self._run_task = asyncio.current_task()
        while not self._stopping:
            if not await self._acquire():
                return
            leading = asyncio.create_task(self._lead(on_started_leading), name=f"leader:{self.name}")
            try:
                reason = await self._renew_loop(leading)
            except asyncio.CancelledError:
                self._set_leader(False)
                await _cancel(leading)
                raise
            lost_at = time.monotonic()
            self._set_leader(False)
            await _cancel(leading)
            failure = leading.exception() if leading.done() and not leading.cancelled() else None
            self.stopped_reason, self.lead_failed = reason, reason == LEAD_FAILED
            if reason not in (LEAD_FAILED, STOPPING):  # those end with release(), counted there
                self._count_end("lost")
            log.warning("leader election: stopped leading %s (%s)", self._where(), reason)
            await on_stopped_leading()
            elapsed = time.monotonic() - lost_at
            if elapsed > self.lease_duration - self.renew_deadline:
                log.error(
                    "leader election: on_stopped_leading took %.2fs, longer than the %.2fs margin between the "
                    "renew deadline and the lease duration: another replica may have started meanwhile",
                    elapsed,
                    self.lease_duration - self.renew_deadline,
                )
            if failure is not None:
                if release_on_failure:
                    await self.release()
                raise failure

    def stop(self) -> None:
        """Do not acquire again: ``run()`` returns once the current leadership ended (after
        ``on_stopped_leading``) or at once when standing by. Call it from ``on_stopped_leading`` when the
        process is going to exit rather than stand by again."""
        self._stopping = True
        self._wake.set()

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown, after delivery stopped): ends a running ``run()``
        (as cancelling it does) so that no renewal races the release. Never raises."""
        self._stopping = True
        self._wake.set()
        task = self._run_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task])
        held = self.is_leader or self._observed_holder == self.identity
        self._set_leader(False)
        if not held and not self._maybe_holder:
            return
        try:
            async with asyncio.timeout(self.renew_deadline):
                lease = await self._get()
                spec = (lease or {}).get("spec") or {}
                if lease is None or spec.get("holderIdentity") != self.identity:
                    return
                now = micro_time()
                lease["spec"] = {
                    **spec,
                    "holderIdentity": "",
                    "leaseDurationSeconds": 1,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": int(spec.get("leaseTransitions") or 0),
                }
                await self._write("PUT", self.path, lease)
        except _REQUEST_ERRORS as exc:
            self._count_end("release_failed")
            log.warning(
                "leader election: could not %s (%s); %sa standby takes over when it expires",
                f"release {self._where()}"
                if held
                else f"check whether our unanswered claim of {self._where()} took effect",
                failure_text(exc),
                "" if held else "if it did, ",
            )
            return
        self._observed_holder = ""
        self._count_end("released")
        log.info("leader election: released %s", self._where())

    def standby_reason(self) -> str:
        """Why this replica does not lead, for /readyz: "another replica holds the lease" was also said
        when the Lease could not be read or written at all (403) and nobody led."""
        if self._last_error is not None:
            return f"cannot read or write the {self._where()}: {self._last_error}"
        holder = self._observed_holder
        if holder and holder != self.identity:
            return f"{holder!r} holds the {self._where()}"
        return f"waiting for the {self._where()}"

    async def try_acquire_or_renew(self, timeout: float | None = None) -> bool:
        """One attempt, as client-go's tryAcquireOrRenew: True when this replica holds the lease now."""
        try:
            async with asyncio.timeout(timeout):
                held = await self._try(timeout)
        except _REQUEST_ERRORS as exc:
            self._note_error(exc)
            return False
        except Exception as exc:  # e.g. a failing credential plugin: never let it skip on_stopped_leading
            log.exception("leader election: %s: unexpected error", self._where())
            self._count_renew_failure(exc)
            self._last_error = f"{type(exc).__name__}: {failure_text(exc)}"
            return False
        # Only a whole attempt clears it: cleared when the read succeeded, a write refused every time
        # (RBAC with `get` but not `update`) was logged again at every retry.
        if held and self.is_leader and self._last_error is not None:
            log.info("leader election: %s renewed again (after %s)", self._where(), self._last_error)
        self._last_error = None
        return held

    # ---- internals ----------------------------------------------------------------------------

    def _where(self) -> str:
        return f"lease {self.namespace}/{self.name}"

    def _count_transition(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.leader_transitions.labels(reason).inc()

    def _count_end(self, reason: str) -> None:
        if self._uncounted_end:
            self._uncounted_end = False
            self._count_transition(reason)

    def _count_renew_failure(self, exc: BaseException) -> None:
        """A failed renewal of the held lease, by a reason of LEASE_RENEW_FAILURE_REASONS."""
        if self.metrics is None or not self.is_leader:
            return
        self.metrics.lease_renew_failures.labels(_failure_reason(exc)).inc()

    def _set_leader(self, value: bool) -> None:
        if value and not self.is_leader:
            self.transitions += 1
            self.stopped_reason, self.lead_failed = None, False
            self._uncounted_end = True
            self._count_transition("acquired")
        self.is_leader = value
        if self.metrics is not None:
            self.metrics.leader.set(1 if value else 0)

    def _note_error(self, exc: BaseException) -> None:
        self._count_renew_failure(exc)
        if isinstance(exc, ApiError) and exc.status == 409:
            self.conflicts += 1
            self._last_error = None  # read and written: another replica was just quicker
            log.info("leader election: %s was updated by another replica first (409)", self._where())
            return
        # A timed-out request's TimeoutError has no text: "TimeoutError: " was all /readyz said.
        text = f"{type(exc).__name__}: {failure_text(exc)}" if not isinstance(exc, ApiError) else str(exc)
        if text != self._last_error:  # one line per new kind of failure, not one per retry
            log.warning("leader election: %s: %s", self._where(), text)
        self._last_error = text

    async def _lead(self, on_started_leading: Callable[[], Awaitable[None]]) -> None:
        await on_started_leading()

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _acquire(self) -> bool:
        """Retry until this replica holds the lease (True) or release() was called (False)."""
        while not self._stopping:
            if await self.try_acquire_or_renew(timeout=self.renew_deadline):
                self._set_leader(True)
                log.info(
                    "leader election: %s acquired, this replica (%s) leads (lease transitions: %s)",
                    self._where(),
                    self.identity,
                    (self._observed or {}).get("leaseTransitions", 0),
                )
                return True
            # Jitter keeps standbys that started together from always colliding.
            await self._sleep(self.retry_period * (1 + 0.2 * random.random()))
        return False

    async def _renew_loop(self, leading: asyncio.Task[None]) -> str:
        """Renew until the deadline passes without success; returns why leadership ended."""
        last_ok = self._last_sent
        while True:
            await self._sleep(self.retry_period)
            if self._stopping:
                return STOPPING
            if leading.done() and not leading.cancelled() and leading.exception() is not None:
                log.error("leader election: the leader's work failed", exc_info=leading.exception())
                return LEAD_FAILED
            deadline = last_ok + self.renew_deadline
            while True:
                sent = time.monotonic()
                remaining = deadline - sent
                if remaining <= 0:
                    return f"could not renew within {self.renew_deadline:g}s"
                if await self.try_acquire_or_renew(timeout=remaining):
                    last_ok = self._last_sent
                    break
                if self._observed_holder not in (None, self.identity):
                    return f"the lease is now held by {self._observed_holder!r}"
                if self._stopping:
                    return STOPPING
                await self._sleep(min(self.retry_period, deadline - time.monotonic()))

    async def _try(self, timeout: float | None) -> bool:
        # Monotonic time before the request that may succeed: the lease counts from no earlier than this.
        sent = time.monotonic()
        now = micro_time()
        lease = await self._get(timeout)
        if lease is None:
            record = self._record(now, acquire_time=now, transitions=0)
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": record,
            }
            created = await self._claim(
                "POST", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body, timeout
            )
            self._observe(created)
            self._last_sent = sent
            return True
        self._observe(lease)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity and not self._expired(spec):
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            record = self._record(now, acquire_time=spec.get("acquireTime") or now, transitions=transitions)
        else:
            record = self._record(now, acquire_time=now, transitions=transitions + 1)
            if holder:
                log.info("leader election: %s held by %r has expired, taking over", self._where(), holder)
        lease["spec"] = {**spec, **record}
        updated = await self._claim("PUT", self.path, lease, timeout)
        self._observe(updated)
        self._last_sent = sent
        return True

    async def _claim(
        self, method: str, path: str, body: dict[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        """``_write`` of a record naming us. Until it is answered it may have taken effect: a standby
        stopped meanwhile left the Lease naming a stopped process for a whole lease duration."""
        self._maybe_holder = True
        self._claim_version = (body.get("metadata") or {}).get("resourceVersion")
        try:
            out = await self._write(method, path, body, timeout)
        except ApiError as exc:
            if exc.status < 500:  # refused (409, 403, 422, 429): not applied. A 5xx may have been.
                self._maybe_holder = False
            raise
        self._maybe_holder = False  # answered: the record it returns says who holds the lease
        return out

    def _record(self, now: str, *, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            # An int32 on the wire; rounding up only makes others wait longer.
            "leaseDurationSeconds": max(1, math.ceil(self.lease_duration)),
            "acquireTime": acquire_time,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def _expired(self, spec: dict[str, Any]) -> bool:
        try:
            duration = float(spec.get("leaseDurationSeconds") or 0)
        except (TypeError, ValueError):
            duration = 0.0
        if duration <= 0:
            duration = self.lease_duration
        return time.monotonic() > self._observed_at + duration

    def _observe(self, lease: dict[str, Any]) -> None:
        spec = lease.get("spec") or {}
        meta = lease.get("metadata") or {}
        self._resource_version = meta.get("resourceVersion")
        if spec != self._observed:
            self._observed = spec
            self._observed_at = time.monotonic()
        holder = spec.get("holderIdentity") or ""
        if self._maybe_holder and holder != self.identity and self._resource_version != self._claim_version:
            # Changed since our unanswered write, and not to us: that write (conditional on the
            # version it read) can no longer apply. Kept, a standby that lost the race after a 5xx
            # read the Lease at its stop, waited renew_deadline when that read was not answered,
            # and logged that it could not release a lease it never held.
            self._maybe_holder = False
        if holder != self._observed_holder:
            if holder and holder != self.identity:
                log.info("leader election: %s is held by %r", self._where(), holder)
            elif not holder:
                log.info("leader election: %s is free", self._where())
            self._observed_holder = holder

    async def _get(self, timeout: float | None = None) -> dict[str, Any] | None:
        resp = await self.kube.request("GET", self.path, timeout=_client_timeout(timeout))
        try:
            if resp.status == 404:
                return None
            await raise_for_status(resp)
            lease = orjson.loads(await resp.read())
        finally:
            resp.release()
        if not isinstance(lease, dict):
            raise orjson.JSONDecodeError("a Lease must be a JSON object", "", 0)
        return lease

    async def _write(
        self, method: str, path: str, body: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        resp = await self.kube.request(
            method, path, body=body, content_type="application/json", timeout=_client_timeout(timeout)
        )
        try:
            await raise_for_status(resp)
            out = orjson.loads(await resp.read())
        finally:
            resp.release()
        return out if isinstance(out, dict) else {}


def _failure_reason(exc: BaseException) -> str:
    """A bounded label for a failed request (LEASE_RENEW_FAILURE_REASONS): never the error's text."""
    if isinstance(exc, ApiError):
        status = exc.status
        if status == 409:
            return "conflict"
        if status == 401:
            return "unauthorized"
        if status == 403:
            return "forbidden"
        if status == 429:
            return "throttled"
        return "server_error" if status >= 500 else "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "connection"
    return "other"


def _client_timeout(timeout: float | None) -> aiohttp.ClientTimeout | None:
    return aiohttp.ClientTimeout(total=max(timeout, 0.01)) if timeout is not None else None


async def _cancel(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
        await asyncio.wait([task])  # does not raise the task's outcome (nor swallow our own cancellation)
