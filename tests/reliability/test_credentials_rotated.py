"""Credentials rotated under load (a Loki token, a webhook server's CA): the router takes the new
Secret from its volume without a restart; nothing lost, nothing dead-lettered, nothing twice."""

from __future__ import annotations

from pathlib import Path

from reliability_harness import check
from reliability_scenarios import credentials_rotated


async def test_credentials_rotated_under_load_are_taken_without_a_restart_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    report = await credentials_rotated(tmp_path)
    check(report)  # lost = 0, duplicates = 0 (also across the restart after the rotation)
    assert report.facts["loki_401"] >= 1
    assert report.facts["reloads_applied"] == [1.0, 1.0]
    assert report.facts["reloads_invalid"] == [0.0, 0.0]
    assert report.facts["dead_lettered"] == [0.0, 0.0]
    assert report.facts["exit_term"] == 0 and report.facts["exit_term_after_restart"] == 0
    assert report.facts["secrets_in_log"] == 0
