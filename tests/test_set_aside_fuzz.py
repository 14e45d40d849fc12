"""A short run of the router-level fuzz of set-aside items, the parked FIFO and clean restarts
(``eventrouter.testing.set_aside_fuzz``; what each seed asserts, and why exactly that, is in its
docstring). The long run: ``python -m bench.set_aside_fuzz --seeds 200 [--kills]``.

A session 26 review's fuzz of this kind found occurrences lost, counted nowhere, after clean restarts
(item 163); its script was lost. This one stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventrouter.sink import retry
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import sends_while_refused
from eventrouter.testing.set_aside_fuzz import Plan, run_seed

# Seeds that park a lot (14-36 records at most, on the 2-core machine): each must park some.
SEEDS = [0, 1, 4, 6, 7, 10, 12, 14]


@pytest.mark.parametrize("seed", SEEDS)
async def test_set_aside_items_parked_records_and_clean_restarts_lose_duplicate_and_reorder_nothing(
    seed: int, tmp_path: Path
) -> None:
    """One seed: events created and bumped over 60 steps, keys refused for short and long periods,
    the destination down or slow now and then, 4 clean stops and restarts at random steps with writes
    while down. Then everything owed is stored exactly once, each event's in number order, nothing
    dropped, nothing left in the spool, every stop exits 0."""
    result = await run_seed(seed, tmp_path, Plan(seed), settle_timeout=60)
    assert not result.faults(), result.describe()
    assert result.parked_max > 0, f"the seed parked nothing: it tests less than it says\n{result.describe()}"


async def test_an_event_with_more_items_set_aside_than_a_batch_is_not_resent_at_once() -> None:
    """The fuzz's ``resent_at_once``, minimised: 7 occurrences of one event whose key is refused,
    batches of 3, backoff 0.2-0.4 s. An event's items set aside go out together, lowest first, at
    most a batch of them (item 151); the rest are pushed back with their due time, already past, so
    the next batch was due at once and brought X/1-X/3 along again: ~11,000 sends in a second instead
    of at most a handful, and with a sink whose send does not suspend (the memory sink) the event
    loop never ran again: the router froze (item 170). Now the rest waits as long as those refused."""
    first = make_occurrence(object_name="b-x")
    occurrences = [make_occurrence(object_name="b-x", uid=first.uid, count=n) for n in range(1, 8)]
    refused = retry("stream over its limit", defer=True)
    sends = await sends_while_refused(
        refused,
        occurrences,
        queue_max_events=20,
        batch_max_events=3,
        retry_initial_backoff=0.2,
        retry_max_backoff=0.4,
    )
    # Due at 0, then at most every 0.2 s: 6 rounds of at most 3 batches (7 items, 3 a batch).
    assert sends <= 18, f"{sends} sends in 1 s"
