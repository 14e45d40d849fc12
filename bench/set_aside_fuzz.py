"""The router-level fuzz of set-aside items, the parked FIFO and restarts, long
(``eventrouter.testing.set_aside_fuzz``; ``tests/test_set_aside_fuzz.py`` runs a few seeds of it).

    python -m bench.set_aside_fuzz --seeds 200              # seeds 0-199, 4 clean stops each
    python -m bench.set_aside_fuzz --seeds 50 --kills       # the router as a process, SIGKILLed
    python -m bench.set_aside_fuzz --first 1000 --seeds 20 --stops 6 --steps 120
    python -m bench.set_aside_fuzz --only 17,42 -v          # again, with each failure described

Prints one line per seed and, for each failing one, what was lost, duplicated, out of order or
resent at once, with the writes and receipts of the events concerned. Exit status 1 if any seed
failed (``--allow resent_at_once`` leaves a known fault out of that).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from eventrouter.testing.set_aside_fuzz import FuzzResult, Plan, run_seed


async def _run(seeds: list[int], args: argparse.Namespace) -> list[FuzzResult]:
    results: list[FuzzResult] = []
    for seed in seeds:
        plan = Plan(seed, steps=args.steps, stops=args.stops, kills=args.kills)
        with tempfile.TemporaryDirectory(prefix=f"set-aside-fuzz-{seed}-") as tmp:
            result = await run_seed(seed, Path(tmp), plan, settle_timeout=args.settle_timeout)
        results.append(result)
        print(result.describe() if not result.ok and args.verbose else result.summary(), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds (from --first)")
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument("--only", default="", help="comma-separated seeds, instead of --first/--seeds")
    parser.add_argument("--stops", type=int, default=4, help="stops (or kills) per seed")
    parser.add_argument("--steps", type=int, default=60, help="steps per seed (20 ms apart, plus the work)")
    parser.add_argument("--kills", action="store_true", help="SIGKILL a router process instead of stopping")
    parser.add_argument("--settle-timeout", type=float, default=60.0, help="seconds the end waits for")
    parser.add_argument("--allow", default="", help="comma-separated fault names not failing the run")
    parser.add_argument("--json", type=Path, help="write every seed's counts here")
    parser.add_argument("-v", "--verbose", action="store_true", help="describe each failing seed")
    args = parser.parse_args()
    # The routers' own warnings (refusals, retries) are the scenario, not news.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    seeds = (
        [int(s) for s in args.only.split(",") if s.strip()]
        if args.only
        else list(range(args.first, args.first + args.seeds))
    )
    started = time.monotonic()
    results = asyncio.run(_run(seeds, args))
    allowed = {a.strip() for a in args.allow.split(",") if a.strip()}
    failed = [r for r in results if set(r.faults()) - allowed]
    faults = collections.Counter(f for r in results for f in r.faults())
    print(
        f"\n{len(results)} seeds ({'kills' if args.kills else 'clean stops'}, {args.stops} each) in "
        f"{time.monotonic() - started:.0f}s: {len(failed)} failed"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(faults.items()))})" if faults else "")
        + f"; lost {sum(len(r.lost) for r in results)}, duplicates "
        f"{sum(sum(r.duplicates.values()) for r in results)}, out of order "
        f"{sum(len(r.out_of_order) for r in results)} events; parked at stops in "
        f"{sum(1 for r in results if r.parked_at_stops)} seeds"
    )
    if failed and not args.verbose:
        print("failing seeds:", ",".join(str(r.plan.seed) for r in failed), "(again with --only ... -v)")
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "seed": r.plan.seed,
                        "faults": r.faults(),
                        "summary": r.summary(),
                        "description": r.describe() if not r.ok else "",
                    }
                    for r in results
                ],
                indent=1,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
