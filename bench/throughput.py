"""Pipeline throughput: recorded watch lines → source parsing → tracker → fanout/filter → each sink's
encoding and send → a loopback receiver. One sink at a time, then all together.

    python -m bench.throughput                     # every case, 100,000 occurrences (≈ 1.5 min)
    python -m bench.throughput --sinks loki,kafka  # some cases only
    python -m bench.throughput --profile loki      # pyinstrument profile of one case (HTML + text)
    python -m bench.throughput --repeat 3          # each case 3 times; the median run by CPU is kept

Each case runs in a fresh child process pinned to CPU 0 (``os.sched_setaffinity``); the receivers
(webhook/Loki/SLS test receivers, Tansu, osmem) run in their own processes pinned to the other CPU.
The child feeds the corpus through the watcher's own line splitter (``EventWatcher._lines``) and
per-line handling (``orjson.loads`` → ``EventWatcher._handle`` → ``OccurrenceTracker`` → ``Fanout``),
exactly as a watch stream is handled, with the relist's back-pressure (a sink's memory queue 40% full).

Reported per case: occurrences per wall-clock second (includes waiting for the receiver's answer:
one batch in flight per sink) and per CPU second of the router process (``time.process_time``, all
threads: the one-core capacity of the router itself), and how many each receiver counted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from bench import _common as c
from bench.corpus import CACHE, ensure_corpus, read_lines

CHUNK = 64 * 1024
HIGH_WATER = 0.4  # of each memory queue (10,000 by default)

CASES = ("source", *c.ALL_SINKS, "all")


# ---- child: one case in one process ----------------------------------------------------------------


class _Content:
    def __init__(self, chunks: list[bytes], fanout: Any) -> None:
        self.chunks = chunks
        self.fanout = fanout
        self.waits = 0

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            # The relist's own back-pressure (woken per batch taken), not a polling loop: polling
            # every few ms costs the router CPU that a slow receiver (osmem) would then inflate.
            if any(p.backlogged(HIGH_WATER) for p in self.fanout.pipelines):
                self.waits += 1
                await self.fanout.wait_for_room(high_water=HIGH_WATER)
            yield chunk
            await asyncio.sleep(0)  # a socket read yields to the loop; so do we


class _Response:
    def __init__(self, content: _Content) -> None:
        self.content = content


def _chunks(lines: list[bytes]) -> list[bytes]:
    data = b"\n".join(lines) + b"\n"
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


async def run_case(flags: list[str], lines: list[bytes], profile: Path | None = None) -> dict[str, Any]:
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import build_specs
    from eventrouter.gc_tuning import tune_gc
    from eventrouter.metrics import DEAD_LETTER_REASONS, SINK_DROP_REASONS
    from eventrouter.source.tracker import OccurrenceTracker
    from eventrouter.source.watcher import EventWatcher

    specs = build_specs(flags)
    router = Router(RouterSettings(cluster_name="bench", metrics_addr=None), specs)
    tune_gc()  # as the CLI does once the router is built
    await router.start_pipelines()
    await asyncio.gather(*(p.started.wait() for p in router.pipelines))
    watcher = EventWatcher(
        None,  # type: ignore[arg-type]  # no API server: the lines come from the corpus
        namespace=None,
        tracker=OccurrenceTracker(cluster="bench"),
        publish=router.fanout.publish,
        forget=router.fanout.forget,
        listed=router._listed,
        metrics=router.metrics,
    )
    content = _Content(_chunks(lines), router.fanout)
    del lines
    gc.collect()
    profiler = None
    if profile is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # The per-line work of EventWatcher._watch, verbatim in effect.
    n_lines = 0
    async for line in watcher._lines(_Response(content)):  # type: ignore[arg-type]
        n_lines += 1
        received_at = time.time()
        ev = orjson.loads(line)
        kind = ev["type"]
        obj = ev["object"]
        watcher._progress(received_at)
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        new_rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            watcher._handle(kind, obj, received_at)
        if isinstance(new_rv, str) and new_rv:
            watcher.resource_version = new_rv
    fed_wall = time.perf_counter() - wall0
    await asyncio.gather(*(p.wait_idle() for p in router.pipelines))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    if profiler is not None and profile is not None:
        profiler.stop()
        profile.with_suffix(".html").write_text(profiler.output_html())
        profile.with_suffix(".txt").write_text(
            profiler.output_text(unicode=True, color=False, show_all=False)
        )
        # Self time per function: where the hot path's microseconds go, without the call tree.
        profile.with_suffix(".flat.txt").write_text(
            profiler.output_text(unicode=True, color=False, flat=True, show_all=True)
        )
    m = router.metrics
    watcher.flush_metrics()
    occurrences = int(m.occurrences._value.get())
    sinks: dict[str, Any] = {}
    for p in router.pipelines:
        sinks[p.name] = {
            "delivered": int(m.delivered.labels(p.name)._value.get()),
            "dead_lettered": int(
                sum(m.dead_lettered.labels(p.name, r)._value.get() for r in DEAD_LETTER_REASONS)
            ),
            "dropped": int(sum(m.dropped.labels(p.name, r)._value.get() for r in SINK_DROP_REASONS)),
        }
    await router.stop()
    return {
        "lines": n_lines,
        "occurrences": occurrences,
        "wall_s": round(wall, 3),
        "feed_wall_s": round(fed_wall, 3),
        "cpu_s": round(cpu, 3),
        "per_wall_s": round(occurrences / wall),
        "per_cpu_s": round(occurrences / cpu) if cpu else None,
        "cpu_us_per_occurrence": round(cpu / occurrences * 1e6, 2),
        # First touches of new memory: each is a page fault, and in a VM one costs microseconds.
        "page_faults_per_occurrence": round(faults / occurrences, 3),
        "backpressure_waits": content.waits,
        "sinks": sinks,
    }


def child_main(args: argparse.Namespace) -> int:
    pinned = c.pin({c.ROUTER_CPU})
    lines = read_lines(Path(args.corpus))
    if args.lines:
        lines = lines[: args.lines]
    result = asyncio.run(
        run_case(json.loads(args.flags), lines, Path(args.profile) if args.profile else None)
    )
    result["pinned"] = pinned
    Path(args.out).write_bytes(orjson.dumps(result))
    return 0


# ---- parent: orchestrate cases -------------------------------------------------------------------


def _flags(case: str, s: c.Services, tmp: Path, es_url: str, options: dict[str, str]) -> list[str]:
    if case == "source":
        return []
    sinks = c.ALL_SINKS if case == "all" else (case,)
    return [
        s.flag(name, tmp, es_url=es_url, topic=f"bench-{case}", extra=options.get(name, "")) for name in sinks
    ]


async def _one(
    case: str, s: c.Services, corpus: Path, n_lines: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One run of one case in a fresh child process."""
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmpdir:
        tmp = Path(tmpdir)
        await s.reset()
        es_ctx = s.es_index() if case in ("elasticsearch", "all") else _null()
        with es_ctx as es_url:
            flags = _flags(case, s, tmp, es_url, c.sink_options(args.sink_option))
            out = tmp / "result.json"
            cmd = [
                c.PY,
                "-m",
                "bench.throughput",
                "--child",
                "--corpus",
                str(corpus),
                "--flags",
                json.dumps(flags),
                "--out",
                str(out),
            ]
            if args.fraction is not None:
                fraction = args.fraction
            else:
                fraction = args.es_fraction if case in ("elasticsearch", "all") else 1.0
            if fraction < 1:
                # osmem indexes ~500 docs/s: a prefix keeps the default run short. --fraction runs
                # every case on that prefix, so that they compare on the same events (the first
                # 20% have colder caches and more first occurrences than the whole corpus).
                cmd += ["--lines", str(int(n_lines * fraction))]
            if args.profile:
                prof = CACHE / "profiles" / f"throughput-{case}"
                prof.parent.mkdir(parents=True, exist_ok=True)
                cmd += ["--profile-path", str(prof)]
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, cwd=c._root())
            rc = await proc.wait()
            if rc != 0:
                return {"error": f"child exited with {rc}"}
            res: dict[str, Any] = orjson.loads(out.read_bytes())
            counted = await s.counts()
            res["received"], res["requests"] = counted["totals"], counted["requests"]
            return res


async def run(args: argparse.Namespace) -> dict[str, Any]:
    corpus = ensure_corpus(args.occurrences, args.seed)
    cases = [x for x in (args.sinks.split(",") if args.sinks else CASES) if x]
    if args.profile:
        cases = [args.profile]
    n_lines = len(read_lines(corpus))
    need_kafka = any(x in ("kafka", "all") for x in cases)
    need_es = any(x in ("elasticsearch", "all") for x in cases)
    results: dict[str, Any] = {"machine": c.machine(), "corpus": str(corpus), "cases": {}}
    async with c.services(kafka=need_kafka, elasticsearch=need_es) as s:
        for case in cases:
            runs = []
            for _ in range(1 if args.profile else args.repeat):
                res = await _one(case, s, corpus, n_lines, args)
                if "error" in res:
                    runs = [res]
                    break
                runs.append(res)
                print(_row(case, res), file=sys.stderr, flush=True)
            # The median run by CPU (the machine is shared: single runs vary by ±10%).
            ranked = sorted(runs, key=lambda r: r.get("per_cpu_s") or 0)
            chosen = ranked[len(ranked) // 2]
            if len(runs) > 1:
                chosen["runs_per_cpu_s"] = [r["per_cpu_s"] for r in runs]
            results["cases"][case] = chosen
    return results


class _null:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        return None


def _row(case: str, r: dict[str, Any]) -> str:
    requests = r.get("requests", {})
    delivered = ", ".join(
        f"{k} {v['delivered']}" + (f" in {requests[k]} requests" if requests.get(k) else "")
        for k, v in r["sinks"].items()
    )
    return (
        f"{case:14s} {r['occurrences']:>7d} occ  wall {r['wall_s']:6.2f}s {r['per_wall_s']:>7d}/s   "
        f"cpu {r['cpu_s']:6.2f}s {r['per_cpu_s']:>7d}/s ({r['cpu_us_per_occurrence']} µs/occ, "
        f"{r.get('page_faults_per_occurrence', 0)} faults/occ)  "
        f"delivered: {delivered or '-'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    p.add_argument("--sinks", help=f"comma-separated cases from {','.join(CASES)} (default: all of them)")
    p.add_argument("--occurrences", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--profile", choices=CASES, help="profile one case with pyinstrument")
    p.add_argument("--repeat", type=int, default=1, help="runs per case; the median by CPU is reported")
    c.add_sink_option(p)
    p.add_argument("--out", type=Path, default=CACHE / "results" / "throughput.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--flags", help=argparse.SUPPRESS)
    p.add_argument("--profile-path", help=argparse.SUPPRESS)
    p.add_argument("--lines", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--es-fraction",
        type=float,
        default=0.2,
        help="share of the corpus for the elasticsearch and all cases (osmem is slow; 1 = everything)",
    )
    p.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="share of the corpus for every case (overrides --es-fraction), e.g. 0.2 to compare the "
        "other cases with elasticsearch on the same events",
    )
    args = p.parse_args(argv)
    if args.child:
        args.profile = args.profile_path
        args.out = str(args.out)
        return child_main(args)
    result = asyncio.run(run(args))
    c.dump(result, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
