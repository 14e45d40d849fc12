"""A seeded fuzz of items set aside for a key of their own, the spool's parked FIFO and restarts,
through the whole Router (shared by ``tests/test_set_aside_fuzz.py`` and ``bench/set_aside_fuzz.py``).

Per seed: a Router with a data dir (so a disk spool), a small memory queue (10-20) and batch (3-7) and
short backoffs, watching the project's test API server. Events are created there for a few keys (the
first letter of the involved object's name: one Loki stream, one index) and bumped (count 2, 3, ...)
over time. The destination (one for all the routers of a seed) refuses whole keys for a cause of their
own (``retry(..., defer=True)``) for varying periods, some much longer than others, so that refused
items go over their share of the queue and are parked in the spool; now and then it is down (every
send fails) or slow. At random moments the router is stopped cleanly (or, with ``kills``, run as a
process and SIGKILLed) and a new one started over the same data dir; meanwhile the API server goes on
(creates, bumps). At the end the destination takes everything, and once the router is idle the seed
is judged.

What is owed, and so asserted (``/work/shared/design.md`` "Delivery guarantee" and "occurrence";
docs/reliability.md "What lost and duplicated mean"; docs/record.md "Occurrences"):

- **lost = 0**: every occurrence ``(uid, n)`` written while a router ran and its watch had it, and
  for every event its highest number. Repeats raised while no router ran are seen by the next one's
  relist only as the event's latest count: a jump 3 → 7 is one record with count 7, the intermediate
  ones are not invented. Those are *collapsed*: neither owed nor counted against the router (they
  cannot arrive: the API server no longer shows them). No write is made while a router starts or
  stops: a stop waits until the watch has handed on everything written (its resourceVersion reached
  the server's), and writing resumes once the new router's list is done, so each write is plainly
  one or the other.
- **duplicates = 0** after clean stops (the drain's deadline may pass: what is left is kept in the
  spool; the test sink stores and answers with no await between, so no outcome is ever unknown).
  After SIGKILLs at most ``batch_max_events`` per kill: the one batch in flight.
- **each event's occurrences in number order** (item 151's behaviour change), in the order the
  destination stored them across routers (after kills: their first copies). This holds because the
  refusals here are by key and all of an event's occurrences have its key; a destination that refuses
  X/1 but takes X/2 (an index per day) may store X/2 first (``test_set_aside_overflow``'s stop test).
- nothing stored that the API server never produced (**unexpected = 0**), every clean stop exits 0,
  nothing is dropped (the spool's bound is far above what a seed writes) and the spool is empty at
  the end.
- **no resending at once**: retries back off (design: "retries with exponential backoff"); an
  occurrence refused ``SPIN`` times within ``SPIN_WINDOW`` is reported (``resent_at_once``).

No timing decides a verdict: the end waits for the owed set to arrive (or times out and reports what
is missing) and for the pipeline to be idle. Pacing between steps uses short sleeps: that is the
scenario's clock (backoffs run out, refusals end), not a wait for a state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.metrics import SINK_DROP_REASONS
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, RetryableError, retry
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.factories import event_object
from eventrouter.testing.memory import MemorySink
from eventrouter.testing.waiting import until

__all__ = ["SPIN", "SPIN_WINDOW", "Destination", "FuzzResult", "Ledger", "Plan", "run_seed"]

Key = tuple[str, int]

KEYS = "abcd"

# Refusals of one occurrence that no backoff allows: the shortest here is 10 ms (half the 20 ms
# initial backoff, jittered), so at most 10 in 0.1 s, plus the drain's last offer at a stop.
SPIN = 25
SPIN_WINDOW = 0.1

SINK = "mem"


# ---- the destination ------------------------------------------------------------------------------


@dataclass
class Destination:
    """What the sink's far end does now, shared by every router of a seed; changed only by the
    scenario between its steps, so each send sees one state for its whole batch. In a router process
    (``kills``) the state comes from ``control`` (written by the scenario) and what is stored goes to
    ``log`` as well."""

    refused: set[str] = field(default_factory=set)  # keys refused for a cause of their own
    down: bool = False
    delay: float = 0.0
    generation: int = 0
    accepted: list[tuple[int, Key]] = field(default_factory=list)  # (router generation, key), in order
    refusals: int = 0
    hasty: dict[Key, int] = field(default_factory=dict)  # occurrence → times found resent at once
    control: Path | None = None
    log: IO[str] | None = None
    _refused_at: dict[Key, collections.deque[float]] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {"refused": sorted(self.refused), "down": self.down, "delay": self.delay}

    def publish(self) -> None:
        """Hand the state to a router process (written whole, then renamed: never read half)."""
        if self.control is not None:
            tmp = self.control.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state()))
            tmp.replace(self.control)

    def _read_control(self) -> None:
        if self.control is not None:
            state = json.loads(self.control.read_text())
            self.refused, self.down, self.delay = set(state["refused"]), state["down"], state["delay"]

    async def send(self, batch: Sequence[Occurrence]) -> list[Outcome]:
        self._read_control()
        # Every send suspends, as a real destination's I/O does. MemorySink's does not, and a pipeline
        # that resends at once (``hasty``) then never gave the event loop back: router and scenario froze.
        await asyncio.sleep(self.delay)
        # From here to the return nothing awaits: one state per batch, and a stop's cancel cannot fall
        # between "stored" and "answered".
        if self.down:
            raise RetryableError("destination down (fuzz)")
        outcomes = [self._decide(occ) for occ in batch]
        lines = []
        for occ, out in zip(batch, outcomes, strict=True):
            if out is OK:
                self.accepted.append((self.generation, (occ.uid, occ.number)))
                lines.append(f"ok {self.generation} {occ.uid} {occ.number}\n")
        if self.log is not None and lines:
            self.log.write("".join(lines))
            self.log.flush()  # in the OS once answered: a SIGKILL does not lose it
        return outcomes

    def _decide(self, occ: Occurrence) -> Outcome:
        if str(occ.record["involved_object"]["name"])[0] not in self.refused:
            return OK
        self.refusals += 1
        key = (occ.uid, occ.number)
        times = self._refused_at.setdefault(key, collections.deque(maxlen=SPIN))
        now = time.monotonic()
        times.append(now)
        if len(times) == SPIN and now - times[0] < SPIN_WINDOW:
            self.hasty[key] = self.hasty.get(key, 0) + 1
            times.clear()
            if self.log is not None:
                self.log.write(f"hasty {self.generation} {occ.uid} {occ.number}\n")
                self.log.flush()  # a send that stores nothing flushes nothing else before a SIGKILL
        return retry("stream over its limit (fuzz)", defer=True)


def _sink_class(dest: Destination) -> type[MemorySink]:
    class FuzzSink(MemorySink):
        async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
            return await dest.send(batch)

    return FuzzSink


# ---- what the API server produced -----------------------------------------------------------------


@dataclass
class _Event:
    name: str
    uid: str
    numbers: list[int] = field(default_factory=list)
    history: list[str] = field(default_factory=list)


class Ledger:
    """Every write to the API server, and which occurrences are owed (see the module docstring)."""

    def __init__(self, api: FakeApiServer) -> None:
        self.api = api
        self.events: dict[str, _Event] = {}
        self.observed: dict[Key, int] = {}  # written while a router ran → its generation
        self.generation = 0

    def create(self, name: str, *, observed: bool, when: str) -> None:
        obj = self.api.create_event(event_object(object_name=name, name=name))
        uid = obj["metadata"]["uid"]
        self.events[uid] = _Event(name, uid)
        self._note(uid, int(obj["count"]), observed, when)

    def bump(self, uid: str, *, observed: bool, when: str) -> None:
        obj = self.api.bump("default", self.events[uid].name)
        self._note(uid, int(obj["count"]), observed, when)

    def _note(self, uid: str, n: int, observed: bool, when: str) -> None:
        ev = self.events[uid]
        ev.numbers.append(n)
        ev.history.append(f"{n}@{when}{'' if observed else '(no router)'}")
        if observed:
            self.observed[(uid, n)] = self.generation

    def killed(self, generation: int) -> None:
        """A router was SIGKILLed: what it held in memory died with it, and the relist after the
        restart sees only each event's latest count. As in the fault suite's kill storm
        (docs/reliability.md: written "while the router was down or killed" may fold), only each
        event's highest number stays owed of what was written while it ran."""
        self.observed = {k: g for k, g in self.observed.items() if g != generation}

    def required(self) -> set[Key]:
        return {(uid, max(ev.numbers)) for uid, ev in self.events.items()} | set(self.observed)

    def produced(self) -> set[Key]:
        return {(uid, n) for uid, ev in self.events.items() for n in ev.numbers}


# ---- the plan and the verdict ---------------------------------------------------------------------


@dataclass
class Plan:
    """A seed's sizes; the rest of its choices come from the seed's random stream, step by step."""

    seed: int
    steps: int = 60
    stops: int = 4
    kills: bool = False  # the router as a process, SIGKILLed instead of stopped
    tick: float = 0.02  # seconds between steps: the scenario's clock
    queue_max_events: int = 0
    batch_max_events: int = 0
    drain_deadline: float = 1.0

    def __post_init__(self) -> None:
        rng = random.Random(f"plan-{self.seed}")
        self.queue_max_events = self.queue_max_events or rng.randint(10, 20)
        self.batch_max_events = self.batch_max_events or rng.randint(3, 7)


@dataclass
class FuzzResult:
    plan: Plan
    produced: int = 0
    required: int = 0
    received: int = 0
    lost: list[Key] = field(default_factory=list)
    duplicates: dict[Key, int] = field(default_factory=dict)  # key → copies beyond the first
    out_of_order: dict[str, list[int]] = field(default_factory=dict)  # uid → numbers as stored
    unexpected: list[Key] = field(default_factory=list)
    hasty: dict[Key, int] = field(default_factory=dict)
    dropped: dict[str, float] = field(default_factory=dict)
    exit_codes: list[int] = field(default_factory=list)  # clean stops only
    parked_max: int = 0
    parked_at_stops: int = 0
    refusals: int = 0
    left_in_spool: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # faults beside the counts above
    context: list[str] = field(default_factory=list)  # for a failure's description
    histories: dict[str, str] = field(default_factory=dict)

    @property
    def duplicate_bound(self) -> int:
        return self.plan.stops * self.plan.batch_max_events if self.plan.kills else 0

    def faults(self) -> list[str]:
        """What went wrong, by name (empty: the seed passed)."""
        checks = {
            "lost": self.lost,
            "duplicates": sum(self.duplicates.values()) > self.duplicate_bound,
            "out_of_order": self.out_of_order,
            "unexpected": self.unexpected,
            "resent_at_once": self.hasty,
            "dropped": any(self.dropped.values()),
            "exit_code": any(self.exit_codes),
            "left_in_spool": self.left_in_spool,
            "notes": self.notes,
        }
        return [name for name, bad in checks.items() if bad]

    @property
    def ok(self) -> bool:
        return not self.faults()

    def summary(self) -> str:
        p = self.plan
        return (
            f"seed {p.seed}: queue {p.queue_max_events} batch {p.batch_max_events} "
            f"{p.stops} {'kills' if p.kills else 'stops'}: produced {self.produced} required {self.required} "
            f"received {self.received} lost {len(self.lost)} dups {sum(self.duplicates.values())} "
            f"out-of-order {len(self.out_of_order)} unexpected {len(self.unexpected)} "
            f"resent-at-once {len(self.hasty)} parked max {self.parked_max} (at stops {self.parked_at_stops}) "
            f"refusals {self.refusals} exits {self.exit_codes} {self.seconds:.1f}s"
        )

    def describe(self) -> str:
        """The summary and, for each event concerned, its writes and what the destination stored."""
        lines = [self.summary() + (f" FAILED: {', '.join(self.faults())}" if not self.ok else "")]
        lines += [f"  fault: {n}" for n in self.notes]
        if any(self.dropped.values()):
            lines.append(f"  dropped: {self.dropped}")
        if self.left_in_spool:
            lines.append(f"  left in the spool at the end: {self.left_in_spool}")
        for what, keys in (("lost", self.lost), ("unexpected", self.unexpected)):
            lines += [f"  {what} #{n} of {self.histories.get(uid, uid)}" for uid, n in keys]
        if sum(self.duplicates.values()) > self.duplicate_bound:
            for (uid, n), extra in self.duplicates.items():
                lines.append(f"  #{n} stored {extra + 1} times: {self.histories.get(uid, uid)}")
        for uid, numbers in self.out_of_order.items():
            lines.append(f"  out of order {numbers}: {self.histories.get(uid, uid)}")
        for (uid, n), times in self.hasty.items():
            lines.append(
                f"  #{n} refused {SPIN} times within {SPIN_WINDOW}s ({times}x: resent without its backoff): "
                f"{self.histories.get(uid, uid)}"
            )
        lines += [f"  ({c})" for c in self.context]
        return "\n".join(lines)


# ---- routers: in this process (clean stops) or as processes (SIGKILLs) -----------------------------


def _settings(kubeconfig: str, data: Path, plan: Plan) -> RouterSettings:
    return RouterSettings(
        cluster_name="test",
        kubeconfig=kubeconfig,
        metrics_addr=None,
        data_dir=data,
        shutdown_timeout=plan.drain_deadline,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )


def _router(settings: RouterSettings, plan: Plan, dest: Destination) -> Router:
    spec = spec_for_class(
        _sink_class(dest),
        {
            "name": SINK,
            "queue_max_events": plan.queue_max_events,
            "batch_max_events": plan.batch_max_events,
            "batch_max_wait": 0.01,
            "retry_initial_backoff": 0.02,
            "retry_max_backoff": 0.1,
        },
        type_="memory",
    )
    return Router(settings, [spec])


def _status(router: Router) -> dict[str, Any]:
    """Where a router stands: its watch's resourceVersion, what is parked, whether it is idle."""
    p = router.pipelines[0] if router.pipelines else None
    spool = p.spool if p is not None else None
    listed = bool(router.watchers) and router.watchers[0].initial_list_done.is_set()
    return {
        "rv": int(router.watchers[0].resource_version or 0) if listed else -1,
        "parked": spool.parked_count if spool is not None else 0,
        "spooled": (len(spool) + spool.parked_count) if spool is not None else 0,
        # What ``Pipeline.wait_idle`` waits for, the spool too.
        "idle": p is not None
        and p.idle.is_set()
        and not (p._queue or p._in_flight or p._filling or p._deferred or p._overflow)
        and not (spool is not None and (len(spool) or spool.parked_count)),
        "dropped": {r: router.metrics.dropped.labels(SINK, r)._value.get() for r in SINK_DROP_REASONS},
    }


class _Routers(Protocol):
    """One router after another over the same data dir."""

    dropped: collections.Counter[str]

    async def start(self) -> None: ...
    def status(self) -> dict[str, Any]: ...
    async def settle(self, timeout: float) -> None: ...
    async def end(self) -> int | None: ...
    async def close(self) -> int | None: ...


class _InProcess:
    """A Router in this event loop; ``end`` is a clean stop."""

    def __init__(self, api: FakeApiServer, tmp: Path, plan: Plan, dest: Destination) -> None:
        self.settings = _settings(api.kubeconfig(tmp / "kubeconfig"), tmp / "data", plan)
        self.plan, self.dest = plan, dest
        self.router: Router | None = None
        self.dropped: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        self.router = _router(self.settings, self.plan, self.dest)
        await self.router.start_pipelines()
        await self.router.start_source()

    def status(self) -> dict[str, Any]:
        assert self.router is not None
        return _status(self.router)

    async def settle(self, timeout: float) -> None:
        assert self.router is not None
        await self.router.pipelines[0].wait_idle(timeout)

    async def end(self) -> int | None:
        """Stop cleanly; the exit code."""
        router, self.router = self.router, None
        if router is None:
            return None
        await router.stop()
        self.dropped.update(_status(router)["dropped"])
        return router.exit_code

    async def close(self) -> int | None:
        return await self.end()


class _Process:
    """``python -m eventrouter.testing.set_aside_fuzz child`` (a Router with the same sink, reading
    the destination's state from a file and logging what it stored); ``end`` is a SIGKILL."""

    def __init__(self, api: FakeApiServer, tmp: Path, plan: Plan, dest: Destination) -> None:
        self.tmp = tmp
        self.config = tmp / "child.json"
        self.status_file = tmp / "status.json"
        self.store = tmp / "stored.log"
        self.dest = dest
        dest.control = tmp / "control.json"
        dest.publish()
        self.config.write_text(
            json.dumps(
                {
                    "kubeconfig": api.kubeconfig(tmp / "kubeconfig"),
                    "data": str(tmp / "data"),
                    "control": str(dest.control),
                    "status": str(self.status_file),
                    "store": str(self.store),
                    "seed": plan.seed,
                    "queue_max_events": plan.queue_max_events,
                    "batch_max_events": plan.batch_max_events,
                    "drain_deadline": plan.drain_deadline,
                }
            )
        )
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._read = 0
        self.dropped: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        self.status_file.unlink(missing_ok=True)
        if self._log is None:
            self._log = open(self.tmp / "router.log", "ab")  # noqa: SIM115, ASYNC230 - shared by every child
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "eventrouter.testing.set_aside_fuzz",
            "child",
            str(self.config),
            str(self.dest.generation),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log,
        )
        await until(self.status_file.exists, timeout=60, interval=0.02)

    def status(self) -> dict[str, Any]:
        self.collect()
        st: dict[str, Any] = json.loads(self.status_file.read_text())
        return st

    def collect(self) -> None:
        """What the router processes stored and found, read into ``dest`` (whole lines only)."""
        if not self.store.exists():
            return
        with open(self.store, "rb") as fh:
            fh.seek(self._read)
            data = fh.read()
        data = data[: data.rfind(b"\n") + 1]
        self._read += len(data)
        for line in data.decode().splitlines():
            what, gen, uid, n = line.split()
            key = (uid, int(n))
            if what == "ok":
                self.dest.accepted.append((int(gen), key))
            else:
                self.dest.hasty[key] = self.dest.hasty.get(key, 0) + 1

    async def settle(self, timeout: float) -> None:
        await until(lambda: bool(self.status()["idle"]), timeout=timeout, interval=0.02)

    async def _signal(self, sig: int) -> int:
        proc, self.proc = self.proc, None
        assert proc is not None
        last = self.status()  # counters of this process; a SIGKILL loses what it counted since
        self.dropped.update(last["dropped"])
        self.dest.refusals += int(last["refusals"])
        proc.send_signal(sig)
        code = await asyncio.wait_for(proc.wait(), 30)
        self.collect()
        return code

    async def end(self) -> int | None:
        await self._signal(signal.SIGKILL)
        return None  # not a clean stop: no exit code to judge

    async def close(self) -> int | None:
        code = None
        if self.proc is not None:
            code = await self._signal(signal.SIGTERM)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


async def _child(config: Path, generation: int) -> int:
    """A router process of the ``kills`` scenario (see ``_Process``)."""
    cfg = json.loads(config.read_text())
    plan = Plan(
        cfg["seed"],
        queue_max_events=cfg["queue_max_events"],
        batch_max_events=cfg["batch_max_events"],
        drain_deadline=cfg["drain_deadline"],
    )
    status = Path(cfg["status"])
    with open(cfg["store"], "a") as store:  # noqa: ASYNC230 - once, at the start
        dest = Destination(generation=generation, control=Path(cfg["control"]), log=store)
        router = _router(_settings(cfg["kubeconfig"], Path(cfg["data"]), plan), plan, dest)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, router.request_stop)
        await router.start_pipelines()
        await router.start_source()
        while True:
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps(_status(router) | {"refusals": dest.refusals}))
            tmp.replace(status)
            if router.stopped.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(router.stopped.wait(), 0.01)
    return router.exit_code


# ---- the scenario ---------------------------------------------------------------------------------


class _Weather:
    """The destination's changes over steps: refusals per key (short or long), outages, slowness."""

    def __init__(self, rng: random.Random, dest: Destination) -> None:
        self.rng = rng
        self.dest = dest
        self.refused_until: dict[str, int] = {}
        self.down_until = -1
        self.slow_until = -1
        self.windows: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)

    def step(self, step: int) -> None:
        rng = self.rng
        if step == 0 or rng.random() < 0.15:  # one key refused for long from the start: it parks
            key = rng.choice(KEYS)
            # Some keys refused briefly, some for long (they park), some for very long.
            length = rng.choice([rng.randint(1, 4), rng.randint(8, 20), rng.randint(25, 50)])
            if step == 0:
                length = rng.randint(25, 50)
            if self.refused_until.get(key, -1) < step:
                self.windows[key].append((step, step + length))
                self.refused_until[key] = step + length
        if rng.random() < 0.03:
            self.down_until = step + rng.randint(2, 8)
        if rng.random() < 0.05:
            self.slow_until = step + rng.randint(2, 6)
        self.dest.refused = {k for k, last in self.refused_until.items() if last > step}
        self.dest.down = self.down_until > step
        self.dest.delay = 0.005 if self.slow_until > step else 0.0
        self.dest.publish()

    def lift(self, step: int) -> None:
        """The limits are lifted while the router is down (an operator raised them and restarts it)."""
        for key, last in self.refused_until.items():
            if last > step:
                self.windows[key][-1] = (self.windows[key][-1][0], step)
        self.refused_until.clear()

    def clear(self) -> None:
        self.refused_until.clear()
        self.down_until = self.slow_until = -1
        self.dest.refused = set()
        self.dest.down = False
        self.dest.delay = 0.0
        self.dest.publish()


def _write(
    rng: random.Random, ledger: Ledger, names: collections.Counter[str], *, observed: bool, when: str
) -> None:
    """One write: a new event for a random key, or a repeat (sometimes two at once) of a recent one."""
    if not ledger.events or rng.random() < 0.35:
        key = rng.choice(KEYS)
        names[key] += 1
        ledger.create(f"{key}-{names[key]}", observed=observed, when=when)
        return
    uids = list(ledger.events)
    uid = rng.choice(uids[-12:]) if rng.random() < 0.7 else rng.choice(uids)
    for _ in range(rng.choice([1, 1, 1, 2])):
        ledger.bump(uid, observed=observed, when=when)


async def run_seed(
    seed: int, tmp: Path, plan: Plan | None = None, *, settle_timeout: float = 60.0
) -> FuzzResult:
    """Run one seed in ``tmp`` (its data dir and kubeconfig) and judge it. A fault of the router under
    test never raises: the result says what was wrong (``faults``, ``describe``)."""
    plan = plan or Plan(seed)
    result = FuzzResult(plan)
    rng = random.Random(seed)
    started = time.monotonic()
    stop_at = set(rng.sample(range(5, plan.steps), plan.stops)) if plan.stops else set()
    dest = Destination()
    weather = _Weather(rng, dest)
    names: collections.Counter[str] = collections.Counter()
    async with FakeApiServer(token="fuzz-token") as api:
        api.bookmark_interval = 0.2
        ledger = Ledger(api)
        routers: _Routers = (_Process if plan.kills else _InProcess)(api, tmp, plan, dest)

        async def has_everything() -> None:
            """Every write so far handed on by the watch: written while it ran, owed."""
            target = api.resource_version
            await until(lambda: routers.status()["rv"] >= target, timeout=60, interval=0.005)

        async def start() -> None:
            dest.generation = ledger.generation = dest.generation + 1
            await routers.start()
            await has_everything()  # its list is done: writes are watched again

        await start()
        try:
            for step in range(plan.steps):
                weather.step(step)
                for _ in range(rng.choice([0, 1, 1, 2, 3, 4])):
                    _write(rng, ledger, names, observed=True, when=f"s{step}g{dest.generation}")
                result.parked_max = max(result.parked_max, routers.status()["parked"])
                if step in stop_at:
                    await has_everything()
                    result.parked_at_stops += routers.status()["parked"]
                    code = await routers.end()
                    if code is not None:
                        result.exit_codes.append(code)
                    else:
                        ledger.killed(dest.generation)
                    for _ in range(rng.randint(0, 6)):  # the API server goes on meanwhile
                        _write(rng, ledger, names, observed=False, when=f"s{step}g{dest.generation}")
                    if rng.random() < 0.5:
                        weather.lift(step)
                    weather.step(step)
                    await start()
                await asyncio.sleep(plan.tick)
            weather.clear()
            required = ledger.required()

            def arrived() -> bool:
                routers.status()  # reads what a router process stored
                return required <= {key for _, key in dest.accepted}

            try:
                await until(arrived, timeout=settle_timeout, interval=0.02)
                await routers.settle(settle_timeout)
            except TimeoutError:
                result.notes.append(
                    f"not everything owed stored and the router idle within {settle_timeout:.0f}s"
                )
            result.left_in_spool = int(routers.status()["spooled"])
        finally:
            code = await routers.close()
            if code is not None:
                result.exit_codes.append(code)
    result.seconds = time.monotonic() - started
    result.dropped = {r: n for r, n in routers.dropped.items() if n}
    _judge(result, ledger, dest)
    if not result.ok:
        result.context.append(f"{'kills' if plan.kills else 'stops'} after steps {sorted(stop_at)}")
        result.context.extend(f"{k!r} refused in steps {w}" for k, w in sorted(weather.windows.items()))
    return result


def _judge(result: FuzzResult, ledger: Ledger, dest: Destination) -> None:
    required, produced = ledger.required(), ledger.produced()
    got = collections.Counter(key for _, key in dest.accepted)
    result.produced, result.required, result.received = len(produced), len(required), len(dest.accepted)
    result.refusals = dest.refusals
    result.lost = sorted(required - set(got))
    result.duplicates = {key: n - 1 for key, n in got.items() if n > 1}
    result.unexpected = sorted(key for key in got if key not in produced)
    result.hasty = dict(dest.hasty)
    order: dict[str, list[int]] = collections.defaultdict(list)
    seen: set[Key] = set()
    for _, (uid, n) in dest.accepted:
        if (uid, n) not in seen:  # after a kill, the batch in flight comes again: its first copies count
            seen.add((uid, n))
            order[uid].append(n)
    result.out_of_order = {
        uid: numbers for uid, numbers in order.items() if any(a >= b for a, b in itertools.pairwise(numbers))
    }
    concerned = {uid for uid, _ in result.lost + result.unexpected + list(result.hasty)}
    concerned |= set(result.out_of_order)
    if sum(result.duplicates.values()) > result.duplicate_bound:
        concerned |= {uid for uid, _ in result.duplicates}
    for uid in concerned:
        ev = ledger.events.get(uid)
        stored = " ".join(f"{n}@g{g}" for g, (u, n) in dest.accepted if u == uid)
        written = " ".join(ev.history) if ev else "?"
        result.histories[uid] = f"{ev.name if ev else uid}: written {written}; stored {stored}"


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os._exit(asyncio.run(_child(Path(sys.argv[2]), int(sys.argv[3]))))
