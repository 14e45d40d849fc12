"""Memory: RSS of the router with every built-in sink configured against loopback receivers.

    python -m bench.memory                      # relist 50,000 → idle → 5,000/s for 30 s → idle (≈ 2 min)
    python -m bench.memory --soak 600           # then a 10-minute soak at --soak-rate, RSS slope

The router runs as ``python -m eventrouter.cli run --data-dir ...`` (CPU 0) with stdout, file,
webhook, Loki, Kafka (Tansu), Elasticsearch (osmem) and SLS sinks; RSS is read from
/proc/<pid>/status (VmRSS; VmHWM for the peak). Phases:

1. start and relist ``--retained`` Events held by the test API server (peak = VmHWM), until every
   sink has all of them (the fast ones first: ``fast_sinks_done_s``; Elasticsearch catches up from
   its spool at osmem's pace);
2. idle for ``--idle`` seconds (steady idle);
3. ``--load-rate`` writes/s for ``--load-seconds`` (Events expire after 30 s, as with a short TTL);
4. idle again; then the optional soak: RSS every 5 s, least-squares slope over its second half.

With ``--restart`` the router is stopped after phase 2 and started again on the same ``--data-dir``
(phase "restart": until its relist is complete, then ``--idle`` seconds): every sink already has all
the events, so nothing is delivered again and the checkpoints are read from disk.

With ``--configmap`` the router runs as the chart's configMap mode does: ``--leader-elect`` and the
checkpoints in a ConfigMap of the test API server, the data dir holding only spools and dead letters.

osmem indexes only a few hundred documents/s, so the Elasticsearch pipeline runs behind; with
``--data-dir`` its backlog goes to the disk spool beyond 1,000 queued (the engine's memory bound with
a spool; a relist waits 5 s in all for it first), which is what a deployment with a persistent volume
does. The report shows each sink's backlog at each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import _common as c
from bench.corpus import CACHE
from bench.e2e import Load
from bench.startup import preload, retained_events


def _depths(m: dict[str, float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in m.items():
        mm = re.fullmatch(r'eventrouter_sink_(queue|spool)_depth\{sink="([^"]+)"\}', key)
        if mm:
            out[mm.group(2)] = out.get(mm.group(2), 0) + int(value)
    return out


def _spilled(m: dict[str, float]) -> dict[str, int]:
    """Occurrences each sink wrote to its disk spool (its memory queue was full): a spilled one costs a
    write, a read and a rebuild from its raw object, so a relist that spills more costs more CPU."""
    out: dict[str, int] = {}
    for key, value in m.items():
        mm = re.fullmatch(r'eventrouter_sink_spilled_total\{sink="([^"]+)"\}', key)
        if mm and value:
            out[mm.group(1)] = int(value)
    return out


def _source(m: dict[str, float]) -> dict[str, int]:
    """Relists and watch restarts so far: a phase that relisted again is not comparable."""
    out = {"relists": 0, "watch_restarts": 0}
    for key, value in m.items():
        if key.startswith("eventrouter_relists_total{"):
            out["relists"] += int(value)
        elif key.startswith("eventrouter_watch_restarts_total{"):
            out["watch_restarts"] += int(value)
    return out


class Sampler:
    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None
        self.cpu0 = 0.0

    async def _run(self) -> None:
        t0 = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - t0, c.rss_mib(self.pid)))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self.cpu0 = c.cpu_seconds(self.pid)
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, Any]:
        values = [v for _, v in self.samples] or [0.0]
        half = values[len(values) // 2 :]
        return {
            "min_mib": round(min(values), 1),
            "median_second_half_mib": round(statistics.median(half), 1),
            "max_mib": round(max(values), 1),
            # At the end of the phase: the Python heap and buffers (anonymous) vs mapped files (the
            # interpreter, extension modules and shared libraries such as OpenSSL: shared, reclaimable).
            "end_anon_mib": round(c.status_kib(self.pid, "RssAnon") / 1024, 1),
            "end_file_mib": round(c.status_kib(self.pid, "RssFile") / 1024, 1),
            "end_regions_mib": c.rss_by_region_mib(self.pid),
            "router_cpu_s": round(c.cpu_seconds(self.pid) - self.cpu0, 1),
        }


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    pts = samples[len(samples) // 2 :]
    if len(pts) < 3:
        return float("nan")
    xs = [t for t, _ in pts]
    ys = [v for _, v in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60 if den else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from eventrouter.testing import FakeApiServer

    c.pin(c.other_cpus())
    events = retained_events(args.retained)
    n = len(events)
    router_env = dict(item.split("=", 1) for item in args.router_env)
    configmap = ["--leader-elect", "--checkpoint-configmap", "er-checkpoint"] if args.configmap else []
    sink_options = c.sink_options(args.sink_option)
    result: dict[str, Any] = {
        "machine": c.machine(),
        "retained": n,
        "router_python": args.router_python or sys.executable,
        "router_env": router_env,
        "configmap": args.configmap,
        "sink_options": sink_options,
        "phases": {},
    }
    sinks = list(c.ALL_SINKS)
    fast = [x for x in sinks if x != "elasticsearch"]
    census = args.out.with_suffix(".census.txt") if args.census else None
    census_at = args.census_at if census is not None else None
    peak_census = args.out.with_suffix(".relist.census.txt")
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmpdir:
        tmp = Path(tmpdir)
        async with (
            c.services() as s,
            FakeApiServer(token="bench", history_size=max(10_000, n * 2), watcher_buffer=1_000_000) as api,
            aiohttp.ClientSession() as session,
        ):
            warm = min(args.warm, n)
            preload(api, events[:warm] if warm else events)
            kubeconfig = api.kubeconfig(tmp / "kubeconfig")
            with s.es_index() as es_url:
                flags = [s.flag(x, tmp, es_url=es_url, extra=sink_options.get(x, "")) for x in sinks]
                rp = await c.spawn_router(
                    kubeconfig,
                    flags,
                    tmp / "router.log",
                    extra=["--data-dir", str(tmp / "data"), *configmap],
                    python=args.router_python,
                    env=router_env,
                    census=census,
                )
                try:
                    if warm:
                        # --warm: every sink delivers a few first; the rest then comes by a relist
                        # after 410 Gone (the history compacted while the watch was down), as in a
                        # running router, instead of by the first list of a cold one.
                        await c.wait_metrics(rp, session)
                        warm_deadline = time.monotonic() + args.relist_timeout
                        while True:
                            d = c.finished(await rp.metrics(session))
                            if all(d.get(x, 0) >= warm for x in sinks):
                                break
                            if time.monotonic() > warm_deadline:
                                raise RuntimeError(
                                    f"--warm: the sinks did not all deliver {warm} events: {d}"
                                )
                            await asyncio.sleep(0.2)
                        result["warm_rss_mib"] = round(c.rss_mib(rp.pid), 1)
                        # No await in between: the router cannot reconnect before the history is gone.
                        api.disconnect_watches("bench: --warm")
                        preload(api, events[warm:])
                        api.compact()
                    # 1. start + relist
                    # Until every sink has everything: osmem's backlog would otherwise compete with
                    # the load phase for the rig's CPU. Polled every 0.5 s (a scrape costs the router).
                    fast_done = None
                    with Sampler(rp.pid, 0.1) as sm:
                        await c.wait_metrics(rp, session)
                        t0 = time.monotonic()
                        deadline = t0 + args.relist_timeout
                        while time.monotonic() < deadline:
                            if (
                                census is not None
                                and census_at is not None
                                and c.rss_mib(rp.pid) >= census_at
                            ):
                                # Once, near the relist's peak: what the burst holds while it runs.
                                census_at = None
                                result["census_relist"] = await _census(rp.pid, census, move_to=peak_census)
                            d = c.finished(await rp.metrics(session))
                            if fast_done is None and all(d.get(x, 0) >= n for x in fast):
                                fast_done = round(time.monotonic() - t0, 1)
                            if all(d.get(x, 0) >= n for x in sinks):
                                break
                            await asyncio.sleep(0.5)
                    m = await rp.metrics(session)
                    result["phases"]["relist"] = {
                        **sm.summary(),
                        "peak_hwm_mib": round(c.hwm_mib(rp.pid), 1),
                        "seconds": round(sm.samples[-1][0], 1),
                        "fast_sinks_done_s": fast_done,
                        "delivered": c.delivered(m),
                        "dead_lettered": c.dead_lettered(m),
                        "backlog": _depths(m),
                        "spilled": _spilled(m),
                        **_source(m),
                    }
                    _say("relist", result["phases"]["relist"])
                    # 2. idle
                    with Sampler(rp.pid, 0.5) as sm:
                        await asyncio.sleep(args.idle)
                    m = await rp.metrics(session)
                    result["phases"]["idle"] = {**sm.summary(), "backlog": _depths(m), **_source(m)}
                    _say("idle", result["phases"]["idle"])
                    if census is not None:
                        result["census"] = await _census(rp.pid, census)
                    if args.restart:
                        # 2b. stop cleanly and start again on the same --data-dir: every sink has all
                        # of them, so the relist delivers nothing and the checkpoints come from disk.
                        await rp.stop()
                        rp = await c.spawn_router(
                            kubeconfig,
                            flags,
                            tmp / "router2.log",
                            extra=["--data-dir", str(tmp / "data"), *configmap],
                            python=args.router_python,
                            env=router_env,
                        )
                        with Sampler(rp.pid, 0.1) as sm:
                            await c.wait_metrics(rp, session)
                            t0 = time.monotonic()
                            while time.monotonic() - t0 < args.relist_timeout:
                                m = await rp.metrics(session)
                                if _source(m)["relists"] >= 1 and m.get("eventrouter_tracked_events", 0) >= n:
                                    break
                                await asyncio.sleep(0.5)
                            listed = round(time.monotonic() - t0, 1)
                            await asyncio.sleep(args.idle)
                        m = await rp.metrics(session)
                        result["phases"]["restart"] = {
                            **sm.summary(),
                            "listed_s": listed,
                            "peak_hwm_mib": round(c.hwm_mib(rp.pid), 1),
                            "delivered_again": c.delivered(m),
                            "backlog": _depths(m),
                            **_source(m),
                        }
                        _say("restart", result["phases"]["restart"])
                    # 3. load
                    api.ttl = 30.0
                    load = Load(api)
                    with Sampler(rp.pid, 0.5) as sm:
                        achieved = await load.run(args.load_rate, args.load_seconds)
                    m = await rp.metrics(session)
                    result["phases"]["load"] = {
                        **sm.summary(),
                        "rate": args.load_rate,
                        "achieved": round(achieved, 1),
                        "backlog": _depths(m),
                        "peak_hwm_mib": round(c.hwm_mib(rp.pid), 1),
                        **_source(m),
                    }
                    _say("load", result["phases"]["load"])
                    # 4. idle after load
                    with Sampler(rp.pid, 0.5) as sm:
                        await asyncio.sleep(args.idle)
                    m = await rp.metrics(session)
                    result["phases"]["idle_after"] = {**sm.summary(), "backlog": _depths(m), **_source(m)}
                    _say("idle_after", result["phases"]["idle_after"])
                    if args.soak:
                        api.ttl = 60.0
                        with Sampler(rp.pid, 5.0) as sm:
                            await load.run(args.soak_rate, args.soak)
                        slope = slope_mib_per_min(sm.samples)
                        result["phases"]["soak"] = {
                            **sm.summary(),
                            "seconds": args.soak,
                            "rate": args.soak_rate,
                            "slope_mib_per_min_second_half": round(slope, 3),
                            "samples": [(round(t, 1), round(v, 1)) for t, v in sm.samples],
                            "backlog": _depths(await rp.metrics(session)),
                        }
                        _say("soak", {k: v for k, v in result["phases"]["soak"].items() if k != "samples"})
                    result["peak_hwm_mib"] = round(c.hwm_mib(rp.pid), 1)
                    m = await rp.metrics(session)
                    result["delivered_end"] = c.delivered(m)
                    result["dropped_end"] = c.dropped(m)
                finally:
                    await rp.stop()
    return result


async def _census(
    pid: int, path: Path, timeout: float = 900.0, move_to: Path | None = None
) -> dict[str, Any]:
    """Signal the router to write its pymalloc census and wait for the file (the census takes
    ~10–40 s in a 100 MiB router, which stands still meanwhile; with ``--census-sparse 64`` in the
    configMap mode on a busy host, over 300 s); ``move_to``: renamed there."""
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no census from the router after {timeout:.0f} s (see its log)")
        await asyncio.sleep(0.5)
    head = path.read_text().splitlines()
    if move_to is not None:
        path = path.rename(move_to)
    sparse = next((line for line in head if line.startswith("sparse arenas")), "")
    summary = {"report": str(path), "arenas": head[0] if head else "", "sparse": sparse}
    _say("census", summary)
    return summary


def _say(phase: str, data: dict[str, Any]) -> None:
    print(f"{phase:11s} {data}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--retained", type=int, default=50_000)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument(
        "--relist-timeout", type=float, default=300.0, help="seconds to wait for every sink, osmem included"
    )
    p.add_argument("--load-rate", type=float, default=5000.0)
    p.add_argument("--load-seconds", type=float, default=30.0)
    p.add_argument("--soak", type=float, default=0.0, help="soak seconds (e.g. 600); 0 = no soak")
    p.add_argument("--soak-rate", type=float, default=1000.0)
    p.add_argument(
        "--restart",
        action="store_true",
        help="after the idle phase, restart the router on the same --data-dir and measure it idle again",
    )
    p.add_argument(
        "--router-python",
        default=None,
        help="the router's interpreter, e.g. a venv with only `pip install .[all]` (what the image holds; "
        "the test extras add modules the router then imports, such as requests); default: this one. "
        "Interpreter flags may follow it: '/tmp/prod/bin/python -OO'",
    )
    p.add_argument(
        "--router-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="add to the router's environment (repeatable), e.g. an allocator: "
        "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2, PYTHONMALLOC=malloc, MALLOC_CONF=...",
    )
    c.add_sink_option(p)
    p.add_argument(
        "--census",
        action="store_true",
        help="after the idle phase, have the router write which objects hold its pymalloc arenas "
        "(to the --out path with .census.txt; CPython 3.11/3.12 on 64-bit Linux)",
    )
    p.add_argument(
        "--census-sparse",
        type=int,
        default=None,
        metavar="POOLS",
        help="with --census: take apart the arenas with at most POOLS of their 64 pools in use (default 40; "
        "60 also shows the relist's fuller arenas)",
    )
    p.add_argument(
        "--census-from",
        type=int,
        default=None,
        metavar="ARENA",
        help="with --census: take apart only the arenas from this index on (those the relist added; "
        "with --census-sparse 64, all of them: what shares their pools with the tracked uids)",
    )
    p.add_argument(
        "--census-at",
        type=float,
        default=None,
        metavar="MIB",
        help="with --census: also once during the relist, when the router's RSS first reaches MIB "
        "(to the --out path with .relist.census.txt; the router pauses while it is written, and the "
        "census's own objects, ~140 MiB in a relisting router, make the run's RSS and times meaningless)",
    )
    p.add_argument(
        "--warm",
        type=int,
        default=0,
        help="start with this many of the retained events, wait until every sink has them, then have the "
        "router relist all of them after 410 Gone (a relist in a running router, not a cold start)",
    )
    p.add_argument(
        "--configmap",
        action="store_true",
        help="as the chart's configMap mode: --leader-elect, checkpoints in a ConfigMap (the data dir keeps "
        "the spools and dead letters only)",
    )
    p.add_argument("--out", type=Path, default=CACHE / "results" / "memory.json")
    args = p.parse_args(argv)
    if bad := [item for item in args.router_env if "=" not in item]:
        p.error(f"--router-env wants NAME=VALUE, got {bad[0]!r}")
    c.sink_options(args.sink_option)  # refuses a malformed one before anything starts
    if args.census_sparse is not None:
        os.environ["EVENTROUTER_BENCH_CENSUS_SPARSE"] = str(args.census_sparse)  # read by bench/_census.py
    if args.census_from is not None:
        os.environ["EVENTROUTER_BENCH_CENSUS_FROM"] = str(args.census_from)
    c.dump(asyncio.run(run(args)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
