"""Issue 6, disk spool per sink: a destination down for longer than the memory queue holds, the
router restarted twice mid-outage, then the destination recovers → every occurrence delivered,
including events the API server deleted meanwhile (so they can only have come from the spool)."""

from __future__ import annotations

from pathlib import Path

from reliability_harness import Ledger, Report, check
from reliability_scenarios import api_server, disk_spool, memory_keys, memory_spec, settings_for, settle

from eventrouter.app import Router
from eventrouter.testing import event_object
from eventrouter.testing.waiting import until


async def test_spool_keeps_everything_across_clean_restarts_mid_outage(tmp_path: Path) -> None:
    report = await disk_spool(tmp_path, "sigterm")
    check(report)  # duplicates = 0 after clean restarts
    assert report.facts["exit_1"] == 0 and report.facts["exit_2"] == 0 and report.facts["exit_3"] == 0
    assert report.facts["spool_depth_1"] > 0
    assert report.facts["deleted_events_delivered"] == report.facts["deleted_events"]


async def test_spool_keeps_everything_across_sigkills_mid_outage(tmp_path: Path) -> None:
    report = await disk_spool(tmp_path, "sigkill")
    batch = report.facts["batch_max_events"]
    check(report, max_duplicates=2 * batch)  # two kills, one batch in flight each
    assert report.facts["spool_depth_1"] > 0
    assert report.facts["deleted_events_delivered"] == report.facts["deleted_events"]


async def test_clean_restart_with_a_spool_and_batches_larger_than_the_backlog_duplicates_nothing(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    async with api_server() as api:
        ledger = Ledger(api)
        down = Router(
            settings_for(api, tmp_path, data_dir=data, shutdown_timeout=0.5),
            [memory_spec(queue_max_events=10, fail=True)],
        )
        async with down.running():
            await until(lambda: down.ready()[0])
            for i in range(30):
                ledger.create(event_object(object_name=f"dup-{i}"))
            await until(lambda: len(down.pipelines[0].spool or []) >= 15)
        # Clean stop: the memory queue went to the spool. Restart with the sink up and big batches.
        up = Router(settings_for(api, tmp_path, data_dir=data), [memory_spec(batch_max_events=500)])
        async with up.running():
            await until(lambda: ledger.complete(memory_keys(up)))
            await settle(up)
        check(Report("spool + relist after a clean restart", [ledger.account("mem", memory_keys(up))]))
