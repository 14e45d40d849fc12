"""Shared machinery of the fault suite (tests/reliability) and its long soaks (bench/reliability.py).

The accounting rule every scenario uses (see docs/reliability.md, "What lost and duplicated mean"):

* The :class:`Ledger` records every occurrence the API server produced: each create gives
  ``(uid, n)`` with ``n = series.count → count → 1`` and each bump ``(uid, n + 1)``.
* **required** = for every uid its highest occurrence number (whatever happened, that one must
  arrive, also when the event was deleted from the API server after the router saw it), plus every
  occurrence the router was certain to observe: those marked ``observable`` because they were
  written while the router was up with an unbroken (or resumable) watch. Occurrences written while
  the router was down, killed, or relisting after 410 may legitimately fold into one later record
  (3 → 7 is delivered once with count 7); they are reported as ``collapsed``, not as lost.
* **lost** = required occurrences the sink never received.
* **duplicates** = receipts beyond the first of the same ``(uid, n)``.
* **unexpected** = receipts of an ``(uid, n)`` the API server never produced (must be 0).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from eventrouter.config import parse_sink_flag
from eventrouter.record import occurrence_number
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.waiting import until

__all__ = [
    "Account",
    "Ledger",
    "Load",
    "Report",
    "RouterProcess",
    "check",
    "file_keys",
    "free_port",
    "loki_keys",
    "metric",
    "webhook_keys",
]

Key = tuple[str, int]


# ---- accounting -----------------------------------------------------------------------------------


@dataclass
class Account:
    """Expected vs received for one sink in one scenario."""

    sink: str
    required: int
    received: int
    distinct: int
    lost: list[Key]
    duplicates: int
    collapsed: int
    unexpected: list[Key]
    max_copies: int = 1
    exempt: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "sink": self.sink,
            "required": self.required,
            "received": self.received,
            "lost": len(self.lost),
            "duplicates": self.duplicates,
            "collapsed": self.collapsed,
            "unexpected": len(self.unexpected),
            "exempt": self.exempt,
        }

    def __str__(self) -> str:
        return (
            f"{self.sink}: required={self.required} received={self.received} lost={len(self.lost)} "
            f"duplicates={self.duplicates} collapsed={self.collapsed} unexpected={len(self.unexpected)}"
            + (f" exempt={self.exempt}" if self.exempt else "")
            + (f" first lost={self.lost[:5]}" if self.lost else "")
        )


class Ledger:
    """Every occurrence the API server produced, written through these methods."""

    def __init__(self, api: FakeApiServer | None) -> None:
        self._api = api  # replaced by the scenario when the API server is restarted
        self.numbers: dict[str, list[int]] = {}
        self.observable: set[Key] = set()
        self.where: dict[str, tuple[str, str]] = {}
        self.deleted: set[str] = set()
        self._required: set[Key] | None = None  # cached until the next write
        self.observing = True
        """Default for ``observable``: False while the router is down or relisting."""

    @property
    def api(self) -> FakeApiServer:
        assert self._api is not None, "this ledger was built from known occurrences"
        return self._api

    @api.setter
    def api(self, value: FakeApiServer) -> None:
        self._api = value

    @classmethod
    def of(cls, required: Iterable[Key]) -> Ledger:
        """A ledger for occurrences not written through an API server (raw streams)."""
        ledger = cls(None)
        for uid, n in required:
            ledger.numbers.setdefault(uid, []).append(n)
            ledger.observable.add((uid, n))
        return ledger

    def _note(self, obj: Mapping[str, Any], observable: bool | None) -> None:
        meta = obj["metadata"]
        uid, n = meta["uid"], occurrence_number(dict(obj))
        self._required = None
        self.numbers.setdefault(uid, []).append(n)
        self.where[uid] = (meta["namespace"], meta["name"])
        if self.observing if observable is None else observable:
            self.observable.add((uid, n))

    def create(self, obj: Mapping[str, Any], *, observable: bool | None = None) -> dict[str, Any]:
        stored = self.api.create_event(obj)
        self._note(stored, observable)
        return stored

    def bump(self, uid: str, *, observable: bool | None = None) -> dict[str, Any]:
        ns, name = self.where[uid]
        stored = self.api.bump(ns, name)
        self._note(stored, observable)
        return stored

    def delete(self, uid: str) -> None:
        ns, name = self.where[uid]
        self.api.delete_event(ns, name)
        self.deleted.add(uid)

    @property
    def live(self) -> list[str]:
        return [uid for uid in self.numbers if uid not in self.deleted]

    def required(self) -> set[Key]:
        if self._required is None:
            finals = {(uid, max(ns)) for uid, ns in self.numbers.items()}
            self._required = finals | self.observable
        return self._required

    def produced(self) -> set[Key]:
        return {(uid, n) for uid, ns in self.numbers.items() for n in ns}

    def account(self, sink: str, received: Iterable[Key], *, exempt: Iterable[str] = ()) -> Account:
        """``exempt``: event uids the scenario's guarantee does not cover for this sink (said why)."""
        got = collections.Counter(received)
        skip = set(exempt)
        required = {k for k in self.required() if k[0] not in skip}
        produced = self.produced()
        # A jump (1 → 3) may be produced by the API server as one write: count only whole numbers seen.
        unexpected = sorted(k for k in got if k not in produced)
        return Account(
            sink=sink,
            required=len(required),
            received=sum(got.values()),
            distinct=len(got),
            lost=sorted(required - set(got)),
            duplicates=sum(n - 1 for n in got.values()),
            collapsed=len({k for k in produced - required - set(got) if k[0] not in skip}),
            unexpected=unexpected,
            max_copies=max(got.values(), default=0),
            exempt=len(skip),
        )

    def complete(self, received: Iterable[Key]) -> bool:
        return self.required().issubset(received)


# ---- what each receiver holds ---------------------------------------------------------------------


def _record_key(doc: Any) -> Key:
    return (str(doc["uid"]), int(doc["occurrence"]))


def webhook_keys(hook: WebhookReceiver) -> list[Key]:
    """Occurrences in requests the receiver accepted (2xx); batch mode (array) or event mode (object)."""
    keys: list[Key] = []
    for req in hook.accepted:
        doc = req.json()
        keys.extend(_record_key(d) for d in (doc if isinstance(doc, list) else [doc]))
    return keys


def file_keys(path: Path) -> list[Key]:
    if not path.exists():
        return []
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]  # a line being written right now is not there yet
    keys = []
    for line in data.splitlines():
        if line.strip():
            keys.append(_record_key(json.loads(line)))
    return keys


def loki_keys(loki: LokiReceiver) -> list[Key]:
    """Every stored entry (before Loki's query-time de-duplication: what was actually pushed)."""
    return [_record_key(json.loads(e.line)) for e in loki.entries]


# ---- load -----------------------------------------------------------------------------------------


class Load:
    """Creates events and raises repeats of earlier ones at a steady rate until stopped.

    Distinct involved objects and a mix of ``count`` and ``series`` events, so both occurrence
    number fields are exercised."""

    def __init__(
        self, ledger: Ledger, *, rate: float = 100.0, bump_every: int = 3, prefix: str = "ld"
    ) -> None:
        self.ledger = ledger
        self.rate = rate
        self.bump_every = bump_every
        self.prefix = prefix
        self.made = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.paused = False

    def one(self) -> None:
        from eventrouter.testing import event_object

        i = self.made
        if i % 7 == 6:
            obj = event_object(
                object_name=f"{self.prefix}-{i}", count=None, series_count=2, event_time=_micro_now()
            )
        else:
            obj = event_object(object_name=f"{self.prefix}-{i}")
        self.ledger.create(obj)
        if i % self.bump_every == self.bump_every - 1:
            live = self.ledger.live
            self.ledger.bump(live[(i * 7919) % len(live)])
        self.made += 1

    async def _run(self) -> None:
        interval = 1.0 / self.rate
        nxt = time.monotonic()
        while not self._stop.is_set():
            if not self.paused:
                self.one()
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            else:
                await asyncio.sleep(0)
                nxt = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def _micro_now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- the router as a process ----------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on (for a sink that is down until a receiver takes the port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_SERVING = re.compile(rb"serving /metrics /healthz /readyz on [^:\s]+:(\d+)")


class RouterProcess:
    """``python -m eventrouter.cli run`` against a FakeApiServer, restartable, with its log in a file."""

    def __init__(
        self, api: FakeApiServer, tmp: Path, sinks: list[str], *, shutdown_timeout: float = 10
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = api.kubeconfig(tmp / "kubeconfig")
        self.sinks = sinks
        self.sink_names = [str(e.get("name") or e["type"]) for e in map(parse_sink_flag, sinks)]
        self.data = tmp / "data"
        self.log = tmp / "router.log"
        self.shutdown_timeout = shutdown_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.starts = 0
        self._log_fh: IO[bytes] | None = None
        self._log_offset = 0

    async def start(self) -> None:
        if self._log_fh is None:
            self._log_fh = open(self.log, "ab")  # noqa: SIM115, ASYNC230 - shared by every child process
        self._log_offset = self.log.stat().st_size
        self.port = None
        args = [
            sys.executable, "-m", "eventrouter.cli", "run", "--kubeconfig", str(self.kubeconfig),
            "--data-dir", str(self.data), "--metrics-addr", "127.0.0.1:0", "--watch-timeout", "30",
            "--shutdown-timeout", str(self.shutdown_timeout), *(f"--sink={s}" for s in self.sinks),
        ]  # fmt: skip
        self.proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self._log_fh,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.starts += 1

    def _find_port(self) -> int | None:
        if self.port is None:
            with open(self.log, "rb") as fh:
                fh.seek(self._log_offset)
                m = _SERVING.search(fh.read())
            if m:
                self.port = int(m.group(1))
        return self.port

    async def wait_serving(self, timeout: float = 30) -> int:
        await until(lambda: self._find_port() is not None, timeout=timeout, interval=0.05)
        assert self.port is not None
        return self.port

    async def metrics(self) -> dict[str, float]:
        """Samples of /metrics as ``name{label="v",...}`` → value."""
        port = await self.wait_serving()
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    async def per_sink(self, name: str, **labels: str) -> list[float]:
        """One sample of ``name`` for each sink, in the order of the ``--sink`` flags."""
        got = await self.metrics()
        return [metric(got, name, sink=s, **labels) for s in self.sink_names]

    async def wait_per_sink(
        self, name: str, want: list[float], *, timeout: float = 60, **labels: str
    ) -> None:
        """Until ``per_sink(name, **labels)`` reads ``want``; AssertionError with the log otherwise."""
        got: list[float] = []
        try:
            async with asyncio.timeout(timeout):
                while (got := await self.per_sink(name, **labels)) != want:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # a remote metric: polled
        except TimeoutError:
            raise AssertionError(
                f"{name}{labels or ''} = {got} after {timeout:g}s, wanted {want}; router log:\n{self.tail()}"
            ) from None

    async def wait_metric(self, name: str, at_least: float, timeout: float = 30) -> None:
        value = 0.0
        try:
            async with asyncio.timeout(timeout):
                while (value := (await self.metrics()).get(name, 0.0)) < at_least:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # a remote counter: polled
        except TimeoutError:
            # Say where the router is: the log of this process (the last 40 lines) and the value.
            raise AssertionError(
                f"{name} = {value:g} after {timeout:g}s, wanted >= {at_least:g}; router log:\n{self.tail()}"
            ) from None

    def tail(self, lines: int = 40) -> str:
        """The last lines this process (the latest start) logged."""
        rows = self.log.read_bytes()[self._log_offset :].splitlines()[-lines:]
        return b"\n".join(rows).decode(errors="replace")

    async def signal(self, sig: int, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> int:
        return await self.signal(signal.SIGKILL)

    async def term(self) -> int:
        # Until the router has installed its handler, SIGTERM kills Python outright (exit -15): a clean
        # stop is only asked of a router that serves, which it does after installing it.
        await self.wait_serving()
        return await self.signal(signal.SIGTERM)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    @contextlib.asynccontextmanager
    async def managed(self) -> AsyncIterator[RouterProcess]:
        try:
            yield self
        finally:
            await self.close()


def metric(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """One sample by name and labels (``_total`` added for counters when missing)."""
    lab = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for candidate in (name, name + "_total"):
        key = f"{candidate}{{{lab}}}" if lab else candidate
        if key in samples:
            return samples[key]
    return 0.0


@dataclass
class Report:
    """One scenario's outcome: per sink accounts plus scenario facts (kills, relists, timings)."""

    scenario: str
    accounts: list[Account]
    facts: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        facts = " ".join(f"{k}={v}" for k, v in self.facts.items())
        return f"[{self.scenario}] {facts}\n  " + "\n  ".join(str(a) for a in self.accounts)


def check(report: Report, *, max_duplicates: int = 0) -> None:
    """The suite's assertion: lost = 0, no unexpected receipts, duplicates within the bound."""
    print(report)
    for a in report.accounts:
        assert not a.lost, f"{report.scenario}: {a}"
        assert not a.unexpected, (
            f"{report.scenario}: {a.sink} received occurrences never produced: {a.unexpected[:5]}"
        )
        assert a.duplicates <= max_duplicates, f"{report.scenario}: {a}"
