"""Start-up: process start → all retained Events listed → every occurrence accepted by each sink.

    python -m bench.startup                         # 50,000 retained events, fast sinks
    python -m bench.startup --sinks webhook         # one sink
    python -m bench.startup --sinks all             # adds elasticsearch (osmem: ~500 docs/s)

The test API server (this process, CPU 1) holds ``--retained`` Events taken from the corpus (real
shapes, many namespaces, long and CJK messages). The router is started as
``python -m eventrouter.cli run`` (CPU 0) and its ``/metrics`` polled every 50 ms:

* ``listed``: ``eventrouter_occurrences_total`` reaches the retained count (the paged relist has
  handed every occurrence to the sink pipelines);
* per sink: ``eventrouter_sink_delivered_total`` reaches it (the receiver accepted every one).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import _common as c
from bench.corpus import CACHE, ensure_corpus

FAST_SINKS = ("stdout", "file", "webhook", "loki", "kafka", "sls")


def retained_events(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """The first ``n`` distinct Events of the corpus, at their latest state seen by then."""
    corpus = ensure_corpus(100_000, seed)
    latest: dict[str, dict[str, Any]] = {}
    with corpus.open("rb") as f:
        for line in f:
            ev = orjson.loads(line)
            obj = ev["object"]
            key = obj["metadata"]["uid"]
            if ev["type"] == "DELETED":
                latest.pop(key, None)
            elif key in latest or len(latest) < n:
                latest[key] = obj
            if len(latest) >= n and ev["type"] == "ADDED":
                break
    return list(latest.values())[:n]


def preload(api: Any, events: list[dict[str, Any]]) -> None:
    for obj in events:
        obj = dict(obj)
        obj["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
        api.create_event(obj)


def sink_list(spec: str) -> list[str]:
    if spec == "all":
        return list(c.ALL_SINKS)
    if spec == "fast":
        return list(FAST_SINKS)
    return [s for s in spec.split(",") if s]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from eventrouter.testing import FakeApiServer

    c.pin(c.other_cpus())
    sinks = sink_list(args.sinks)
    events = retained_events(args.retained)
    n = len(events)
    result: dict[str, Any] = {"machine": c.machine(), "retained": n, "sinks": sinks}
    result["router_python"] = args.router_python or sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmpdir:
        tmp = Path(tmpdir)
        async with (
            c.services(kafka="kafka" in sinks, elasticsearch="elasticsearch" in sinks) as s,
            FakeApiServer(token="bench", history_size=max(10_000, n * 2)) as api,
            aiohttp.ClientSession() as session,
        ):
            t0 = time.monotonic()
            preload(api, events)
            result["preload_s"] = round(time.monotonic() - t0, 2)
            kubeconfig = api.kubeconfig(tmp / "kubeconfig")
            es_ctx = s.es_index() if "elasticsearch" in sinks else _null()
            with es_ctx as es_url:
                options = c.sink_options(args.sink_option)
                flags = [s.flag(x, tmp, es_url=es_url, extra=options.get(x, "")) for x in sinks]
                extra = ["--data-dir", str(tmp / "data")] if args.data_dir else []
                rig0 = _rig_cpu(s)
                rp = await c.spawn_router(
                    kubeconfig, flags, tmp / "router.log", extra=extra, python=args.router_python
                )
                marks: dict[str, float] = {}
                # CPU seconds of the router and of the rig when each mark was first seen: which side
                # set the pace up to that point (both near the wall time: neither waited).
                cpu_at: dict[str, dict[str, float]] = {}

                def mark(name: str, now: float) -> None:
                    if name not in marks:
                        marks[name] = now
                        cpu_at[name] = {
                            "router": round(c.cpu_seconds(rp.pid), 2),
                            "rig": round(_rig_cpu(s) - rig0, 2),
                        }

                hwm = 0.0
                try:
                    deadline = time.monotonic() + args.timeout
                    while time.monotonic() < deadline:
                        if rp.proc.returncode is not None:
                            raise RuntimeError(f"router exited: {(tmp / 'router.log').read_text()[-2000:]}")
                        with_metrics = True
                        try:
                            m = await rp.metrics(session)
                        except aiohttp.ClientError:
                            with_metrics = False
                            m = {}
                        now = time.monotonic() - rp.started
                        hwm = max(hwm, c.hwm_mib(rp.pid))
                        if with_metrics:
                            mark("metrics_up", now)
                        if m.get("eventrouter_occurrences_total", 0) >= n:
                            mark("listed", now)
                        for name, count in c.finished(m).items():
                            if count >= n:
                                mark(f"delivered:{name}", now)
                        if all(f"delivered:{x}" in marks for x in sinks):
                            # At the last delivery. Router CPU below the wall time: it waited on the
                            # API server or the receivers (the other CPU), not on itself. Rig CPU (the
                            # API server, this poller, every receiver) near the wall time: that CPU,
                            # not the router, set the pace.
                            last = cpu_at[max((f"delivered:{x}" for x in sinks), key=marks.__getitem__)]
                            result["router_cpu_s"], result["rig_cpu_s"] = last["router"], last["rig"]
                            break
                        await asyncio.sleep(args.poll)
                    m = await rp.metrics(session)
                    result["delivered"] = c.delivered(m)
                    result["dead_lettered"] = c.dead_lettered(m)
                    result["dropped"] = c.dropped(m)
                    result["sending"] = c.sending(m)
                    result["rss_peak_mib"] = round(hwm, 1)
                    result["rss_after_mib"] = round(c.rss_mib(rp.pid), 1)
                finally:
                    await rp.stop()
    result["poll_s"] = args.poll
    result["seconds"] = {k: round(v, 2) for k, v in marks.items()}
    result["cpu_s_at"] = cpu_at
    done = [marks.get(f"delivered:{x}") for x in sinks]
    result["all_delivered_s"] = round(max(d for d in done if d is not None), 2) if all(done) else None
    for k, v in result["seconds"].items():
        cpu = cpu_at[k]
        print(
            f"{k:28s} {v:7.2f} s after process start (CPU s so far: router {cpu['router']:.2f}, "
            f"rig {cpu['rig']:.2f})",
            file=sys.stderr,
        )
    print(
        f"RSS peak {result['rss_peak_mib']} MiB, router CPU {result.get('router_cpu_s')} s", file=sys.stderr
    )
    return result


def _rig_cpu(s: c.Services) -> float:
    return time.process_time() + sum(c.cpu_seconds(pid) for pid in s.pids)


class _null:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n")[0])
    p.add_argument("--retained", type=int, default=50_000)
    p.add_argument("--sinks", default="fast", help="fast (default: all but elasticsearch), all, or a,b,c")
    p.add_argument(
        "--data-dir", action="store_true", help="run the router with --data-dir (checkpoints, spool)"
    )
    p.add_argument("--timeout", type=float, default=180.0)
    c.add_sink_option(p)
    p.add_argument(
        "--poll",
        type=float,
        default=0.05,
        help="seconds between /metrics scrapes (each costs the router a few ms: 0.05 s, the default "
        "and every earlier session's, is ~300 scrapes where a Prometheus takes one per 15 s)",
    )
    p.add_argument(
        "--router-python",
        default=None,
        help="the router's interpreter (default: this one), e.g. a venv with only `.[all]`, or the "
        "image's own with 'bench/in-image localhost/eventrouter:test'",
    )
    p.add_argument("--out", type=Path, default=CACHE / "results" / "startup.json")
    args = p.parse_args(argv)
    c.dump(asyncio.run(run(args)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
