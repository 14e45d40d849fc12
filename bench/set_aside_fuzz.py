"""The router-level fuzz of set-aside items, the parked FIFO and restarts, long
(``eventrouter.testing.set_aside_fuzz``; ``tests/test_set_aside_fuzz.py`` runs a few seeds of it).

    python -m bench.set_aside_fuzz --seeds 200              # seeds 0-199, 4 clean stops each
    python -m bench.set_aside_fuzz --seeds 50 --kills       # the router as a process, SIGKILLed
    python -m bench.set_aside_fuzz --first 1000 --seeds 20 --stops 6 --steps 120
    python -m bench.set_aside_fuzz --only 17,42 -v          # again, with each failure described
    python -m bench.set_aside_fuzz --seeds 150 --per-occurrence --deletes 0.08

Prints one line per seed and, for each failing one, what was lost, duplicated, out of order or
resent at once, with the writes and receipts of the events concerned. Exit status 1 if any seed
failed (``--allow resent_at_once`` leaves a known fault out of that).

Two dimensions beside the shared fuzz's (session 29, a review of the spool's owed and parked
records; each found a duplicate after clean restarts that the stock runs never met):

- ``--per-occurrence``: the destination refuses a key per occurrence parity (``a0``, ``a1``: an
  index per day) instead of whole keys, so that an event's X/1 is refused (set aside, parked) while
  X/2 is taken: the owed paths at a stop and the checkpoint held back below X/1. Each event's order
  is not judged then (a destination taking X/2 while refusing X/1 stores X/2 first, as designed).
  Clean stops only: the router processes of ``--kills`` refuse by the shared module's rule.
- ``--deletes P``: each write deletes a live event (TTL expiry) with probability P, while a router
  runs or while none does. Owed then: what the shared fuzz owes, less the latest number of events
  deleted while no router saw it (the relist cannot show it; one written while a router ran is
  still owed).

The shared module (``eventrouter.testing.set_aside_fuzz``) is not changed: these swap its
destination's rule, its ledger and its writes for the run (``_dimensions``), in this process only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import eventrouter.testing.set_aside_fuzz as fuzz
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.set_aside_fuzz import FuzzResult, Plan, run_seed

DAY_KEYS = [key + parity for key in "abcd" for parity in "01"]
"""Refused per occurrence: the object's first letter and the occurrence number's parity."""


_STOCK_DECIDE = fuzz.Destination._decide


def _decide_per_occurrence(self: fuzz.Destination, occ: Occurrence) -> Outcome:
    """Refused when the key of its day is: then as the shared rule refuses (counted, and a resend
    at once detected), which reads the object's first letter, so it is given that alone."""
    letter = str(occ.record["involved_object"]["name"])[0]
    if letter + str(occ.number % 2) not in self.refused:
        return OK
    refused, self.refused = self.refused, {letter}
    try:
        return _STOCK_DECIDE(self, occ)
    finally:
        self.refused = refused


class _DeletingLedger(fuzz.Ledger):
    """The shared ledger, with events deleted (TTL) now and then."""

    def __init__(self, api: FakeApiServer) -> None:
        super().__init__(api)
        self.deleted: set[str] = set()

    def delete(self, uid: str, *, when: str) -> None:
        ev = self.events[uid]
        self.api.delete_event("default", ev.name)
        self.deleted.add(uid)
        ev.history.append(f"deleted@{when}")

    def required(self) -> set[fuzz.Key]:
        # A deleted event's latest number is owed only if a router saw it (then in ``observed``).
        live = {(uid, max(ev.numbers)) for uid, ev in self.events.items() if uid not in self.deleted}
        return live | set(self.observed)


_Write = Callable[..., None]


def _writer(deletes: float) -> _Write:
    """The shared fuzz's writes (names by key, repeats of recent events), and deletions."""

    def write(
        rng: random.Random,
        ledger: fuzz.Ledger,
        names: collections.Counter[str],
        *,
        observed: bool,
        when: str,
    ) -> None:
        assert isinstance(ledger, _DeletingLedger)
        live = [uid for uid in ledger.events if uid not in ledger.deleted]
        if live and deletes and rng.random() < deletes:
            ledger.delete(rng.choice(live), when=when)
            return
        if not live or rng.random() < 0.35:
            key = rng.choice("abcd")
            names[key] += 1
            ledger.create(f"{key}-{names[key]}", observed=observed, when=when)
            return
        uid = rng.choice(live[-12:]) if rng.random() < 0.7 else rng.choice(live)
        for _ in range(rng.choice([1, 1, 1, 2])):
            ledger.bump(uid, observed=observed, when=when)

    return write


@contextlib.contextmanager
def _dimensions(per_occurrence: bool, deletes: float) -> Iterator[None]:
    """Swap the shared module's rule, ledger and writes for the run; put them back after."""
    saved = {name: getattr(fuzz, name) for name in ("KEYS", "Ledger", "_write")}
    decide = fuzz.Destination._decide
    try:
        if per_occurrence:
            fuzz.KEYS = DAY_KEYS  # type: ignore[assignment]  # the weather refuses these
            fuzz.Destination._decide = _decide_per_occurrence  # type: ignore[method-assign]
        if per_occurrence or deletes:
            fuzz.Ledger = _DeletingLedger  # type: ignore[misc]
            fuzz._write = _writer(deletes)  # type: ignore[assignment]
        yield
    finally:
        for name, value in saved.items():
            setattr(fuzz, name, value)
        fuzz.Destination._decide = decide  # type: ignore[method-assign]


async def _run(seeds: list[int], args: argparse.Namespace, allowed: set[str]) -> list[FuzzResult]:
    results: list[FuzzResult] = []
    for seed in seeds:
        plan = Plan(seed, steps=args.steps, stops=args.stops, kills=args.kills)
        with (
            tempfile.TemporaryDirectory(prefix=f"set-aside-fuzz-{seed}-") as tmp,
            _dimensions(args.per_occurrence, args.deletes),
        ):
            result = await run_seed(seed, Path(tmp), plan, settle_timeout=args.settle_timeout)
        results.append(result)
        failed = bool(set(result.faults()) - allowed)
        print(result.describe() if failed and args.verbose else result.summary(), flush=True)
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
    parser.add_argument(
        "--per-occurrence",
        action="store_true",
        help="refuse per key and occurrence parity (an index per day), not whole keys; order not judged",
    )
    parser.add_argument(
        "--deletes", type=float, default=0.0, help="probability that a write deletes a live event (TTL)"
    )
    parser.add_argument("--json", type=Path, help="write every seed's counts here")
    parser.add_argument("-v", "--verbose", action="store_true", help="describe each failing seed")
    args = parser.parse_args()
    if args.per_occurrence and args.kills:
        parser.error("--per-occurrence is for clean stops: the router processes of --kills refuse whole keys")
    if not 0.0 <= args.deletes < 1.0:
        parser.error("--deletes is a probability below 1")
    # The routers' own warnings (refusals, retries) are the scenario, not news.
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    seeds = (
        [int(s) for s in args.only.split(",") if s.strip()]
        if args.only
        else list(range(args.first, args.first + args.seeds))
    )
    allowed = {a.strip() for a in args.allow.split(",") if a.strip()}
    if args.per_occurrence:
        allowed.add("out_of_order")  # X/2 taken while X/1's day is refused: stored first, by design
    started = time.monotonic()
    results = asyncio.run(_run(seeds, args, allowed))
    failed = [r for r in results if set(r.faults()) - allowed]
    faults = collections.Counter(f for r in results for f in r.faults())
    print(
        f"\n{len(results)} seeds ({'kills' if args.kills else 'clean stops'}, {args.stops} each"
        + (", refusals per occurrence" if args.per_occurrence else "")
        + (f", deletes {args.deletes:g}" if args.deletes else "")
        + ") in "
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
