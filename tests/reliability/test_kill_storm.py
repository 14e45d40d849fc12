"""The router process SIGKILLed again and again at random moments while it delivers under load."""

from __future__ import annotations

from pathlib import Path

from reliability_harness import check
from reliability_scenarios import kill_storm


async def test_ten_sigkills_under_load_lose_nothing_and_duplicates_stay_within_the_in_flight_window(
    tmp_path: Path,
) -> None:
    report = await kill_storm(tmp_path, kills=10, batch=50)
    check(report, max_duplicates=report.facts["dup_bound"])
    assert report.facts["min_delivered_between_kills"] >= 1
