"""The data dir's volume full under a running router (a real kernel write failure, in the router
process): delivery goes on, nothing lost; once there is room the checkpoints are durable again, and a
SIGKILL with a restart then delivers nothing twice."""

from __future__ import annotations

from pathlib import Path

from reliability_harness import check
from reliability_scenarios import data_disk_full


async def test_a_full_data_disk_stops_no_delivery_and_a_restart_after_it_duplicates_nothing(
    tmp_path: Path,
) -> None:
    report = await data_disk_full(tmp_path)
    check(report)  # lost = 0, duplicates = 0
    assert all(n >= 1 for n in report.facts["checkpoint_errors_while_full"])
    assert report.facts["durable_while_full"] == [0.0, 0.0]
    assert report.facts["readyz_while_full"] == 200
    assert report.facts["exit_term"] == 0
