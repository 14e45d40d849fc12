"""End to end through the test API server: steady event creation → watch → router → webhook receiver.

    python -m bench.e2e                         # 1,000/s then 5,000/s, 60 s each (≈ 2.5 min)
    python -m bench.e2e --rate 1000 --seconds 20
    python -m bench.e2e --find-max              # ramp until lag is no longer bounded

Three processes: this one (FakeApiServer + the load generator), ``bench.receivers`` (the webhook test
receiver, which notes each occurrence's arrival time) — both pinned to CPU 1 — and the router,
``python -m eventrouter.cli run --sink=webhook:...`` with default batching (500 events / 0.2 s wait),
pinned to CPU 0. On a 2-CPU machine the API server, the load generator and the receiver share one
CPU; the router has the other to itself.

Lag is per occurrence: wall time at arrival in the receiver minus wall time just before the API
server stored the write (same host clock). 70% of writes create Events (a third of them
eventTime-only), 30% raise the count of an Event created in the last 10 s. Events expire after 30 s
(``ttl``), so DELETED lines flow too, as in a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench import _common as c
from bench.corpus import CACHE

TICK = 0.005


class Load:
    """Creates and bumps Events at a steady rate; remembers when each occurrence was written."""

    def __init__(self, api: Any, seed: int = 11) -> None:
        self.api = api
        self.rng = random.Random(seed)
        self.created_at: dict[tuple[str, int], float] = {}
        self.recent: collections.deque[tuple[float, str, str, str]] = collections.deque()
        self.writes = 0
        self.seq = 0

    def write_one(self) -> None:
        from eventrouter.testing import event_object

        now = time.time()
        while self.recent and now - self.recent[0][0] > 10:
            self.recent.popleft()
        if self.recent and self.rng.random() < 0.3:
            _, ns, name, uid = self.recent[self.rng.randrange(len(self.recent))]
            t = time.time()
            obj = self.api.bump(ns, name)
            n = (obj.get("series") or {}).get("count") or obj.get("count") or 1
            self.created_at[(uid, int(n))] = t
        else:
            self.seq += 1
            ns = f"team-{self.rng.randrange(40):02d}"
            uid = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            name = f"pod-{self.seq}.{self.rng.getrandbits(48):012x}"
            if self.seq % 3 == 0:
                obj = event_object(
                    namespace=ns,
                    name=name,
                    uid=uid,
                    object_name=f"pod-{self.seq}",
                    reason="FailedScheduling",
                    message="0/3 nodes are available: 3 Insufficient cpu.",
                    count=None,
                    event_time=_micro(now),
                    component="default-scheduler",
                )
            else:
                obj = event_object(namespace=ns, name=name, uid=uid, object_name=f"pod-{self.seq}")
            t = time.time()
            self.api.create_event(obj)
            self.created_at[(uid, 1)] = t
            self.recent.append((now, ns, name, uid))
        self.writes += 1

    async def run(self, rate: float, seconds: float) -> float:
        """Write at ``rate`` per second for ``seconds``; returns the achieved rate."""
        start = time.monotonic()
        done = 0
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(rate * elapsed)
            while done < due:
                self.write_one()
                done += 1
            await asyncio.sleep(TICK)
        return done / (time.monotonic() - start)


def _micro(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class Lags:
    def __init__(self, load: Load) -> None:
        self.load = load
        self.values: list[float] = []
        self.unmatched = 0

    def take(self, keys: list[list[Any]]) -> None:
        created = self.load.created_at
        for uid, number, arrived in keys:
            t = created.pop((uid, int(number)), None)
            if t is None:
                self.unmatched += 1  # a duplicate, or an occurrence this run did not write
            else:
                self.values.append(arrived - t)


async def _collect(s: c.Services, lags: Lags, stop: asyncio.Event) -> None:
    while not stop.is_set():
        got = await s.counts(keys=True)
        lags.take(got.get("keys", []))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def one_rate(
    api: Any, s: c.Services, rp: c.RouterProcess, session: aiohttp.ClientSession, rate: float, seconds: float
) -> dict[str, Any]:
    await s.reset(keys=True)
    # A seed per rate: uids must never repeat across runs against one API server (as in Kubernetes).
    load = Load(api, seed=11 + int(rate))
    lags = Lags(load)
    stop = asyncio.Event()
    collector = asyncio.create_task(_collect(s, lags, stop))
    cpu0, wall0 = c.cpu_seconds(rp.pid), time.monotonic()
    rss: list[float] = []

    async def sample() -> None:
        while True:
            rss.append(c.rss_mib(rp.pid))
            await asyncio.sleep(1)

    sampler = asyncio.create_task(sample())
    achieved = await load.run(rate, seconds)
    gen_wall = time.monotonic() - wall0
    # Grace: let what is in flight arrive (bounded lag means it does, quickly).
    deadline = time.monotonic() + 15
    while load.created_at and time.monotonic() < deadline:  # noqa: ASYNC110 - filled by another task
        await asyncio.sleep(0.25)
    cpu = c.cpu_seconds(rp.pid) - cpu0
    sampler.cancel()
    stop.set()
    await collector
    lags.take((await s.counts(keys=True)).get("keys", []))
    v = lags.values
    # Lag of the occurrences written in the last 10 s shows whether a backlog was building.
    tail = v[-int(rate * 10) :] if v else []
    p99 = c.percentile(v, 99)
    p99_tail = c.percentile(tail, 99)
    result: dict[str, Any] = {
        "target_rate": rate,
        "achieved_write_rate": round(achieved, 1),
        "seconds": seconds,
        "written": load.writes,
        "delivered": len(v),
        "missing": len(load.created_at),
        "unmatched": lags.unmatched,
        "lag_p50_ms": round(c.percentile(v, 50) * 1000, 1),
        "lag_p90_ms": round(c.percentile(v, 90) * 1000, 1),
        "lag_p99_ms": round(c.percentile(v, 99) * 1000, 1),
        "lag_max_ms": round(max(v) * 1000, 1) if v else None,
        "lag_p99_last10s_ms": round(c.percentile(tail, 99) * 1000, 1),
        "router_cpu_percent": round(cpu / gen_wall * 100, 1),
        "router_rss_max_mib": round(max(rss), 1) if rss else None,
    }
    result["bounded"] = bool(load.created_at == {} and p99 < 2.0 and p99_tail < 2.0)
    print(
        f"rate {rate:>6.0f}/s (achieved {achieved:7.1f}/s): delivered {len(v)}/{load.writes}, "
        f"lag p50 {result['lag_p50_ms']} ms p99 {result['lag_p99_ms']} ms max {result['lag_max_ms']} ms, "
        f"router CPU {result['router_cpu_percent']}%, RSS max {result['router_rss_max_mib']} MiB"
        f"{'' if result['bounded'] else '  [NOT bounded]'}",
        file=sys.stderr,
        flush=True,
    )
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from eventrouter.testing import FakeApiServer

    c.pin(c.other_cpus())
    rates = [float(r) for r in args.rate.split(",")]
    results: dict[str, Any] = {"machine": c.machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmpdir:
        tmp = Path(tmpdir)
        async with (
            c.services(kafka=False, elasticsearch=False) as s,
            FakeApiServer(token="bench", ttl=30.0, history_size=200_000, watcher_buffer=1_000_000) as api,
            aiohttp.ClientSession() as session,
        ):
            kubeconfig = api.kubeconfig(tmp / "kubeconfig")
            flag = (
                s.flag("webhook", tmp, extra=args.sink_options)
                if args.sink_options
                else s.flag("webhook", tmp)
            )
            rp = await c.spawn_router(kubeconfig, [flag], tmp / "router.log")
            try:
                await c.wait_metrics(rp, session)
                await api.wait_until(lambda: api.active_watches > 0, timeout=30)
                if args.find_max:
                    rate = args.start_rate
                    while True:
                        r = await one_rate(api, s, rp, session, rate, args.seconds)
                        results["runs"].append(r)
                        if not r["bounded"] or r["achieved_write_rate"] < 0.95 * rate:
                            break
                        rate = round(rate * 1.4, -2)
                    bounded = [r["target_rate"] for r in results["runs"] if r["bounded"]]
                    results["max_bounded_rate"] = max(bounded) if bounded else None
                else:
                    for rate in rates:
                        results["runs"].append(await one_rate(api, s, rp, session, rate, args.seconds))
            finally:
                await rp.stop()
                log = (tmp / "router.log").read_text(errors="replace")
                warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
                results["router_log_warnings"] = warnings[:20]
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--rate", default="1000,5000", help="comma-separated events/s (default 1000,5000)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per rate (default 60)")
    p.add_argument("--find-max", action="store_true", help="ramp ×1.4 from --start-rate until unbounded")
    p.add_argument("--start-rate", type=float, default=2000.0)
    p.add_argument(
        "--sink-options", default="", help="extra query for the webhook sink, e.g. batch_max_wait=0.05"
    )
    p.add_argument("--out", type=Path, default=CACHE / "results" / "e2e.json")
    args = p.parse_args(argv)
    c.dump(asyncio.run(run(args)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
