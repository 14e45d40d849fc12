"""Long fault soaks: the scenarios of tests/reliability with production-like durations and sizes.

    python -m bench.reliability            # everything (about 12 minutes on 2 cores)
    python -m bench.reliability --only kill_storm,cardinality
    python -m bench.reliability --quick    # the suite's sizes, as a smoke run
    python -m bench.reliability --json results.json

Prints, per scenario and sink: required, received, lost, duplicates, collapsed (repeats that folded
into a later record while the router could not see them), unexpected. Exit status 1 if any scenario
lost an occurrence, received one that was never produced, or exceeded its duplicate bound.
The accounting rule is in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "reliability"))

import reliability_scenarios as sc
from reliability_harness import Report

Scenario = Callable[[Path], Awaitable[Report]]

# name → (long run, quick run, duplicate bound from the report's facts)
SCENARIOS: dict[str, tuple[Scenario, Scenario, Callable[[Report], int]]] = {
    "sink_500": (
        lambda t: sc.sink_outage(t, "500", outage=60.0),
        lambda t: sc.sink_outage(t, "500", outage=5.0),
        lambda r: 0,
    ),
    "sink_429": (
        lambda t: sc.sink_outage(t, "429", outage=20.0),
        lambda t: sc.sink_outage(t, "429", outage=4.0),
        lambda r: 0,
    ),
    "sink_hang": (
        lambda t: sc.sink_outage(t, "hang", outage=10.0),
        lambda t: sc.sink_outage(t, "hang", outage=3.0),
        lambda r: 0,
    ),
    "spool_sigterm": (
        lambda t: sc.disk_spool(t, "sigterm", first=5000, queue=500, batch=100, deleted=1000),
        lambda t: sc.disk_spool(t, "sigterm"),
        lambda r: 0,
    ),
    "spool_sigkill": (
        lambda t: sc.disk_spool(t, "sigkill", first=5000, queue=500, batch=100, deleted=1000),
        lambda t: sc.disk_spool(t, "sigkill"),
        lambda r: 2 * int(r.facts["batch_max_events"]),
    ),
    "data_disk_full": (
        # A burst under the memory queue's bound (1,000): with the disk full, memory is the only buffer.
        lambda t: sc.data_disk_full(t, before=200, during=600, bumps=200),
        sc.data_disk_full,
        lambda r: 0,
    ),
    "credentials_rotated": (
        lambda t: sc.credentials_rotated(t, before=200, rate=200.0, after=100),
        sc.credentials_rotated,
        lambda r: 0,
    ),
    "kill_storm": (
        lambda t: sc.kill_storm(t, kills=20, rate=300.0, batch=100),
        lambda t: sc.kill_storm(t, kills=10),
        lambda r: int(r.facts["dup_bound"]),
    ),
    "watch_cuts": (
        lambda t: sc.watch_cuts(t, cuts=200, rate=300.0),
        lambda t: sc.watch_cuts(t, cuts=15),
        lambda r: 0,
    ),
    "apiserver_restart": (
        lambda t: sc.apiserver_restart(t, restarts=10, down=3.0, rate=200.0),
        lambda t: sc.apiserver_restart(t),
        lambda r: 0,
    ),
    "gone_storm": (
        lambda t: sc.gone_storm(t, duration=60.0, rate=300.0),
        lambda t: sc.gone_storm(t),
        lambda r: 0,
    ),
    "bookmarks_only": (
        lambda t: sc.bookmarks_only(t, duration=180.0),
        lambda t: sc.bookmarks_only(t, duration=15.0),
        lambda r: 0,
    ),
    "etcd_quiet": (
        lambda t: sc.etcd_quiet(t, spells=60),
        lambda t: sc.etcd_quiet(t),
        lambda r: 0,
    ),
    "hostile_objects": (sc.hostile_api_objects, sc.hostile_api_objects, lambda r: 0),
    "hostile_stream": (sc.hostile_stream, sc.hostile_stream, lambda r: 0),
    "cardinality": (
        lambda t: sc.cardinality(t, objects=200_000),
        lambda t: sc.cardinality(t, objects=20_000),
        lambda r: 0,
    ),
}


async def run(names: list[str], quick: bool) -> tuple[list[dict[str, Any]], bool]:
    rows: list[dict[str, Any]] = []
    ok = True
    for name in names:
        long, short, bound = SCENARIOS[name]
        with tempfile.TemporaryDirectory(prefix=f"evr-rel-{name}-") as tmp:
            started = time.monotonic()
            try:
                report = await (short if quick else long)(Path(tmp))
            except Exception as exc:  # a scenario that cannot finish is a failure, with its reason
                print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                rows.append({"scenario": name, "error": f"{type(exc).__name__}: {exc}"})
                ok = False
                continue
            took = round(time.monotonic() - started, 1)
        limit = bound(report)
        print(f"{report}\n  (took {took}s; duplicate bound {limit})", flush=True)
        for acc in report.accounts:
            good = not acc.lost and not acc.unexpected and acc.duplicates <= limit
            ok &= good
            rows.append({"scenario": name, **acc.row(), "dup_bound": limit, "ok": good, "seconds": took})
        rows.append({"scenario": name, "facts": report.facts})
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="the suite's short durations and sizes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    rows, ok = asyncio.run(run(names, args.quick))
    print("\nscenario            sink      required  received  lost  dups  bound  collapsed  unexpected")
    for r in rows:
        if "sink" in r:
            print(
                f"{r['scenario']:<19} {r['sink']:<8} {r['required']:>9} {r['received']:>9} {r['lost']:>5} "
                f"{r['duplicates']:>5} {r['dup_bound']:>6} {r['collapsed']:>10} {r['unexpected']:>11}"
            )
        elif "error" in r:
            print(f"{r['scenario']:<19} ERROR {r['error']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    print("\nresult:", "OK (lost = 0 everywhere, duplicates within bounds)" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
