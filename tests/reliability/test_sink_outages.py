"""A sink that fails, throttles or hangs while events keep coming: nothing lost, nothing doubled,
and the other sink of the same router is not held up."""

from __future__ import annotations

from pathlib import Path

from reliability_harness import check
from reliability_scenarios import sink_outage


async def test_webhook_500_for_5s_then_recovers_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = await sink_outage(tmp_path, "500", outage=5.0)
    check(report)
    assert report.facts["file_complete_during_outage"]
    assert report.facts["failed_requests"] >= 5


async def test_429_with_retry_after_is_honoured_and_nothing_is_lost(tmp_path: Path) -> None:
    report = await sink_outage(tmp_path, "429", outage=4.0)
    check(report)
    assert report.facts["min_gap_after_429_s"] >= 1.95


async def test_sink_that_accepts_and_never_answers_times_out_and_nothing_is_lost(tmp_path: Path) -> None:
    report = await sink_outage(tmp_path, "hang", outage=3.0)
    check(report)
    assert report.facts["send_errors_timeout"] >= 3
