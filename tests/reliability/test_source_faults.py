"""Faults on the Kubernetes side: cut streams, an API server restart, 410 storms, long quiet."""

from __future__ import annotations

from pathlib import Path

from reliability_harness import check
from reliability_scenarios import apiserver_restart, bookmarks_only, etcd_quiet, gone_storm, watch_cuts


async def test_watch_cut_mid_object_again_and_again_loses_no_occurrence(tmp_path: Path) -> None:
    report = await watch_cuts(tmp_path, cuts=15)
    check(report)
    assert report.facts["mid_object_resets"] == 15
    assert report.facts["watch_restarts_connection"] >= 15
    assert report.accounts[0].collapsed == 0  # resumed, never relisted: every repeat arrived


async def test_api_server_restart_with_500s_loses_nothing(tmp_path: Path) -> None:
    report = await apiserver_restart(tmp_path, restarts=2, down=1.0)
    check(report)
    assert report.facts["relists_expired"] >= 2
    assert report.facts["watch_restarts_http_500"] >= 1


async def test_410_gone_storm_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = await gone_storm(tmp_path, duration=5.0)
    check(report)
    assert report.facts["relists_expired"] >= 5


async def test_bookmarks_only_keep_healthz_ok_and_deliver_nothing_twice(tmp_path: Path) -> None:
    report = await bookmarks_only(tmp_path, duration=15.0)
    check(report)
    assert report.facts["healthz_failures"] == 0 and report.facts["healthz_probes"] >= 40
    assert report.facts["received_during_quiet"] == 0
    assert report.facts["watch_reopens"] >= 5


async def test_without_a_watch_cache_quiet_spells_past_compaction_relist_and_deliver_nothing_twice(
    tmp_path: Path,
) -> None:
    report = await etcd_quiet(tmp_path, spells=3)
    check(report)
    assert report.facts["relists_expired"] >= 3 and report.facts["bookmarks"] == 0
    assert report.facts["healthz_failures"] == 0
