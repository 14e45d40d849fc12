"""What a clean stop says of its spool with a ConfigMap checkpoint (the chart's default, each replica's
data dir an emptyDir): the next leader reads the ConfigMap, not this spool. Its relist sends again the
events the API server still holds; the records of events it no longer holds (expired while their sink
was down) are in this data dir only, and the stop said they were "kept for the next start"."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import eventrouter.app as app_module
from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, retry
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

EXPIRED = 50  # spooled while the sink was down, then deleted by the API server's TTL
LIVE = 10  # spooled after that: still held by the API server at the stop
NEXT_START = "kept in the spool for the next start"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="tok") as server:
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path, data: Path, *, configmap: bool, **opts: Any) -> Router:
    spec = spec_for_class(
        MemorySink, {"name": "mem", "batch_max_wait": 0.01, "queue_max_events": 20, **opts}, type_="memory"
    )
    extra: dict[str, Any] = {"checkpoint_configmap": "er-checkpoint", "checkpoint_flush_interval": 0.1}
    settings = router_settings(
        api, tmp_path, data_dir=data, shutdown_timeout=0.5, **(extra if configmap else {})
    )
    return Router(settings, [spec])


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


async def _expire(api: FakeApiServer, router: Router, uids: list[str]) -> None:
    """The API server's TTL passes for every event it holds: deleted, DELETED on the watch."""
    api.ttl = 0.0
    await until(lambda: not api.events(), timeout=10)
    api.ttl = None
    seen = router.watchers[0].tracker.seen
    await until(lambda: not any(uid in seen for uid in uids), timeout=10)


async def _spool_past_the_ttl(api: FakeApiServer, router: Router) -> tuple[list[str], list[str]]:
    """The sink down: 50 events spooled, the TTL deletes them, then 10 new ones; their uids."""
    await until(lambda: router.ready()[0], timeout=20)
    p = router.pipelines[0]
    old = [api.create_event(event_object(object_name=f"old-{i}"))["metadata"]["uid"] for i in range(EXPIRED)]
    await until(lambda: p.depth == EXPIRED, timeout=20)
    await _expire(api, router, old)
    new = [api.create_event(event_object(object_name=f"new-{i}"))["metadata"]["uid"] for i in range(LIVE)]
    await until(lambda: p.depth == EXPIRED + LIVE, timeout=20)
    return old, new


async def _stopped(router: Router, task: asyncio.Task[None]) -> None:
    router.request_stop()  # SIGTERM: a rollout, a node drain, a helm upgrade
    await asyncio.wait_for(task, timeout=30)


def _said(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def test_a_configmap_stop_says_the_records_of_expired_events_are_kept_only_in_its_data_dir(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop said "60 kept in the spool for the next start", exit 0; the next pod (a new emptyDir)
    delivered the 10 live events from its relist and the 50 expired ones never, counted nowhere. The
    stop now says at ERROR that the 50 are kept only in its data dir and what to do, and names the 10
    as the next leader's relist's. Both claims are then checked: a pod on a fresh data dir delivers the
    10 and nothing else, this replica on its own data dir again delivers the 50."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    data_a = tmp_path / "pod-a-emptydir"
    a = _router(api, tmp_path, data_a, configmap=True, fail=True)
    task = asyncio.create_task(a.run())
    old, new = await _spool_past_the_ttl(api, a)
    await _stopped(a, task)

    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "for the next start" in m], messages
    (error,) = _said(caplog, logging.ERROR, "kept only in")
    assert error.startswith(
        f"sink mem: {EXPIRED} undelivered occurrences not retained by the API server ({EXPIRED} of {EXPIRED} "
        f"events it no longer holds: expired or deleted while undelivered), kept only in {data_a}: "
        "delivered if this replica leads again on the same data dir"
    ), error
    assert "lost if the data dir is deleted (an emptyDir when its pod is replaced)" in error, error
    assert "give each replica a claim (persistence.perReplica)" in error, error
    (info,) = _said(caplog, logging.INFO, "the next leader's relist sends them")
    assert re.fullmatch(
        rf"sink mem: {EXPIRED + LIVE} undelivered occurrences left in this replica's spool \(\d+ written at "
        r"this stop, 0 parked: set aside for a key the sink refused\); the next leader reads the checkpoint "
        rf"ConfigMap, not this spool: {LIVE} of them are of events the API server still holds: the next "
        r"leader's relist sends them",
        info,
    ), info
    assert not _said(caplog, logging.WARNING, "not checked")

    # The next pod: a fresh emptyDir, the same ConfigMap, the sink back. Its relist sends the 10.
    b = _router(api, tmp_path, tmp_path / "pod-b-emptydir", configmap=True)
    task = asyncio.create_task(b.run())
    await until(lambda: b.ready()[0], timeout=20)
    await _mem(b).wait_for(LIVE, timeout=20)
    await _stopped(b, task)
    assert sorted(_mem(b).keys) == sorted((uid, 1) for uid in new)

    # This replica again on the same data dir (a container restart keeps an emptyDir): the 50.
    again = _router(api, tmp_path, data_a, configmap=True)
    task = asyncio.create_task(again.run())
    await until(lambda: again.ready()[0], timeout=20)
    await _mem(again).wait_for(EXPIRED, timeout=20)
    await until(lambda: again.pipelines[0].depth == 0, timeout=20)
    await _stopped(again, task)
    assert sorted(_mem(again).keys) == sorted((uid, 1) for uid in old)


async def test_a_file_checkpoint_stop_still_keeps_its_spool_for_the_next_start(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A control: with the checkpoint in the data dir the next start reads this spool, so the stop's
    line is as before and nothing is said to be at risk."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    r = _router(api, tmp_path, tmp_path / "data", configmap=False, fail=True)
    task = asyncio.create_task(r.run())
    await _spool_past_the_ttl(api, r)
    await _stopped(r, task)
    (said,) = _said(caplog, logging.INFO, NEXT_START)
    assert re.fullmatch(
        rf"sink mem: {EXPIRED + LIVE} undelivered occurrences kept in the spool for the next start "
        r"\(\d+ written at this stop, 0 parked: set aside for a key the sink refused\)",
        said,
    ), said
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "kept only in" in m or "relist sends them" in m], messages


def _refuse_db(occ: Occurrence) -> Outcome:
    if occ.record["involved_object"]["name"].startswith("db-"):
        return retry("index refused", defer=True)  # a key of its own: set aside, then parked
    return OK


async def test_parked_records_of_expired_events_are_in_the_configmap_stop_report(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records parked for a key the sink refused (``parked/``, not in the spool's ``len``) are split
    as the main FIFO's are: those of expired events are counted in the ERROR."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    data = tmp_path / "data"
    r = _router(
        api,
        tmp_path,
        data,
        configmap=True,
        queue_max_events=10,
        batch_max_events=5,
        retry_initial_backoff=0.2,
        retry_max_backoff=0.4,
    )
    task = asyncio.create_task(r.run())
    await until(lambda: r.ready()[0], timeout=20)
    _mem(r).decide = _refuse_db
    spool = r.pipelines[0].spool
    assert spool is not None
    refused = [
        api.create_event(event_object(object_name=f"db-{i}", name=f"db-{i}"))["metadata"]["uid"]
        for i in range(13)
    ]
    await until(lambda: spool.parked_count > 0, timeout=20)
    await _expire(api, r, refused)
    parked = spool.parked_count
    await _stopped(r, task)
    (info,) = _said(caplog, logging.INFO, "left in this replica's spool")
    shown = re.match(
        r"sink mem: 13 undelivered occurrences left in this replica's spool \(\d+ written at this stop, (\d+) "
        r"parked: set aside for a key the sink refused\); .*: 0 of them are of events the API server still holds",
        info,
    )
    assert shown is not None and int(shown[1]) >= parked, (parked, info)
    (error,) = _said(caplog, logging.ERROR, "kept only in")
    assert error.startswith(
        "sink mem: 13 undelivered occurrences not retained by the API server (13 of 13 events it no longer "
        f"holds: expired or deleted while undelivered), kept only in {data}: "
    ), error


async def test_a_spool_not_read_within_the_stop_budget_is_reported_as_not_checked(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop reads the spools for STOP_SCAN_SECONDS at most (it must end within the pod's grace
    period): what it did not read is said as not checked, neither kept for the next start nor lost."""
    monkeypatch.setattr(app_module, "STOP_SCAN_SECONDS", 0.0, raising=False)  # absent before
    caplog.set_level(logging.INFO, logger="eventrouter")
    data = tmp_path / "data"
    r = _router(api, tmp_path, data, configmap=True, fail=True)
    task = asyncio.create_task(r.run())
    await _spool_past_the_ttl(api, r)
    await _stopped(r, task)
    (warning,) = _said(caplog, logging.WARNING, "not checked")
    assert warning.startswith(
        f"sink mem: {EXPIRED + LIVE} undelivered occurrences not checked against the events the API server "
        f"holds ({EXPIRED + LIVE} not read: a stop reads the spools for 0s at most): those of events it "
        f"no longer holds are kept only in {data}: "
    ), warning
    assert not _said(caplog, logging.ERROR, "kept only in")
    assert not [r.getMessage() for r in caplog.records if NEXT_START in r.getMessage()]


async def test_older_occurrences_of_a_live_event_are_said_to_be_kept_only_in_the_data_dir(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An event repeated while its sink was down (X/1, X/2, X/3 spooled, the API server holding X at
    count 3): the next leader's relist sends X/3 only. X/1 and X/2 are in this data dir only, said so
    apart from the records of expired events; a pod on a fresh data dir then delivers X/3 alone."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    data = tmp_path / "data"
    a = _router(api, tmp_path, data, configmap=True, fail=True)
    task = asyncio.create_task(a.run())
    await until(lambda: a.ready()[0], timeout=20)
    uid = api.create_event(event_object(name="x", object_name="x"))["metadata"]["uid"]
    api.bump("default", "x")
    api.bump("default", "x")
    await until(lambda: a.pipelines[0].depth == 3, timeout=20)
    await _stopped(a, task)
    (info,) = _said(caplog, logging.INFO, "left in this replica's spool")
    assert info.endswith(
        ": 1 of them are of events the API server still holds: the next leader's relist sends them"
    )
    (error,) = _said(caplog, logging.ERROR, "kept only in")
    assert error.startswith(
        "sink mem: 2 undelivered occurrences not retained by the API server (2 older occurrences of events it "
        f"holds at a newer count: the relist sends that one only), kept only in {data}: "
    ), error

    b = _router(api, tmp_path, tmp_path / "fresh", configmap=True)
    task = asyncio.create_task(b.run())
    await until(lambda: b.ready()[0], timeout=20)
    await _mem(b).wait_for(1, timeout=20)
    await _stopped(b, task)
    assert _mem(b).keys == [(uid, 3)]
