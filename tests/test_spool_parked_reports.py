"""What the router says its spools keep, the parked FIFO (``parked/``, items set aside for a key the
sink refused, item 151) included: the clean stop's "kept in the spool" line and the start's report
of the spool of a sink that is no longer configured (its log line and gauge)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.engine.spool import Spool
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, retry
from eventrouter.testing import MemorySink, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

REFUSED = 13  # events of the key the sink refuses (db-*), through a memory queue of 10
LATE = 3  # events the destination never answers: in memory at the stop


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path, name: str, **opts: Any) -> Router:
    settings = router_settings(api, tmp_path, data_dir=tmp_path / "data", shutdown_timeout=1.0)
    spec = spec_for_class(MemorySink, {"name": name, "batch_max_wait": 0.02, **opts}, type_="memory")
    return Router(settings, [spec])


def _mem(router: Router) -> MemorySink:
    (sink,) = router.sinks.values()
    assert isinstance(sink, MemorySink)
    return sink


def _refuse_db(occ: Occurrence) -> Outcome:
    if occ.record["involved_object"]["name"].startswith("db-"):
        return retry("index refused", defer=True)  # a key of its own: set aside, then parked
    return OK


async def test_the_stop_and_the_orphaned_spool_report_count_the_parked_records(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """13 events of a refused key through a queue of 10: past half the queue they are parked. The
    stop said "N kept in the spool" for what it wrote from memory only, and the start's report of the
    spool once its sink was renamed counted its main FIFO only (with every record parked: nothing
    said, the gauge at 0). Both now count the parked records too, and say how many are parked."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    opts = {
        "queue_max_events": 10,
        "batch_max_events": 5,
        "retry_initial_backoff": 0.2,
        "retry_max_backoff": 0.4,
    }
    first = _router(api, tmp_path, "mem", **opts)
    async with first.running():
        await until(lambda: first.ready()[0])
        _mem(first).decide = _refuse_db
        spool = first.pipelines[0].spool
        assert spool is not None
        for i in range(REFUSED):
            api.create_event(event_object(object_name=f"db-{i}", name=f"db-{i}"))
        for i in range(20):
            api.create_event(event_object(object_name=f"a-{i}", name=f"a-{i}"))
        await _mem(first).wait_for(20, timeout=20)  # the others, past every refused one
        await until(lambda: spool.parked_count > 0, timeout=20)
        # Then the destination hangs: what comes next is in memory at the stop, written then.
        _mem(first).blocked = asyncio.Event()
        for i in range(LATE):
            api.create_event(event_object(object_name=f"c-{i}", name=f"c-{i}"))
        received = first.metrics.received.labels("mem")
        await until(lambda: received._value.get() >= REFUSED + 20 + LATE, timeout=20)
    assert first.exit_code == 0
    kept = Spool(tmp_path / "data" / "spool" / "mem", max_bytes=10**9, cluster="test")
    main, parked = len(kept), kept.parked_count
    kept.close()
    assert parked and main + parked == REFUSED + LATE
    (said,) = [
        r.getMessage() for r in caplog.records if "kept in the spool for the next start" in r.getMessage()
    ]
    shown = re.fullmatch(
        r"sink mem: (\d+) undelivered occurrences kept in the spool for the next start "
        r"\((\d+) written at this stop, (\d+) parked: set aside for a key the sink refused\)",
        said,
    )
    assert shown is not None, said
    assert (int(shown[1]), int(shown[3])) == (REFUSED + LATE, parked), said
    assert LATE <= int(shown[2]) <= main

    # The sink renamed: its spool reaches nobody, every record of it is reported, the parked too.
    caplog.clear()
    renamed = _router(api, tmp_path, "mem2", **opts)
    async with renamed.running():
        await until(lambda: renamed.ready()[0])
    stranded = renamed.metrics.registry.get_sample_value(
        "eventrouter_data_dir_orphaned_occurrences", {"sink": "mem"}
    )
    assert stranded == REFUSED + LATE
    (warning,) = [
        r.getMessage() for r in caplog.records if "which is not configured, holds" in r.getMessage()
    ]
    assert (
        f"the spool of sink 'mem', which is not configured, holds {REFUSED + LATE} occurrences ({parked} of them parked;"
        in warning
    )


async def test_a_spool_holding_parked_records_only_is_reported(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every record of a removed sink's spool parked: before, nothing was said and the gauge was 0."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    spool = Spool(tmp_path / "data" / "spool" / "gone", max_bytes=10**9, cluster="test")
    for i in range(3):
        spool.park(make_occurrence(object_name=f"db-{i}"))
    spool.commit()
    spool.close()
    router = _router(api, tmp_path, "mem")
    async with router.running():
        await until(lambda: router.ready()[0])
    assert (
        router.metrics.registry.get_sample_value(
            "eventrouter_data_dir_orphaned_occurrences", {"sink": "gone"}
        )
        == 3
    )
    assert (
        "the spool of sink 'gone', which is not configured, holds 3 occurrences (3 of them parked;"
        in caplog.text
    )
