"""Writes whose occurrence number does not rise as it should (session 22 review): a count lowered by
its writer, a series that moves on without a higher count. Counted, logged (throttled), and the same
object delivered again (relist, watch restart, a write that changed no number) stays silent."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


def _router(api: FakeApiServer, tmp_path: Path) -> Router:
    settings = router_settings(api, tmp_path)
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    return Router(settings, [spec])


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


def _dropped(router: Router, reason: str) -> float:
    value: float = router.metrics.source_dropped.labels(reason)._value.get()
    return value


def _relists(router: Router) -> float:
    value: float = router.metrics.relists.labels("expired")._value.get()
    return value


def _set(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(obj: dict[str, Any]) -> None:
        obj.update(fields)

    return change


async def _relist_and_restart_the_watch(api: FakeApiServer, router: Router, marker: str) -> None:
    """A 410 relist, then a plain watch restart; returns once a new event made after both arrived."""
    before = _relists(router)
    api.faults.fail_next(410, verbs=("watch",))  # the resourceVersion is gone: list again
    api.disconnect_watches()
    await until(lambda: _relists(router) > before)
    api.disconnect_watches()
    api.create_event(event_object(object_name=marker))
    await until(lambda: any(o.record["involved_object"]["name"] == marker for o in _mem(router).received))


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


async def test_a_count_lowered_by_its_writer_is_counted_and_logged_and_its_relist_stays_silent(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A buggy controller writes 5, then 1, 2, 3, 4, 5, 6 on the same uid: 1–4 were dropped without
    a count or a word. Each is counted now, the first is logged with both numbers (the rest within
    the throttle period only counted), and the same lowered object listed again counts nothing."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    router = _router(api, tmp_path)
    async with router.running():
        await until(lambda: router.ready()[0])
        created = api.create_event(event_object(count=5, namespace="shop", object_name="cart-0"))
        ns, name, uid = (
            created["metadata"]["namespace"],
            created["metadata"]["name"],
            created["metadata"]["uid"],
        )
        await _mem(router).wait_for(1)
        api.update_event(ns, name, _set(count=1))
        await until(lambda: _dropped(router, "count_decreased") == 1)
        (warning,) = _warnings(caplog, "lowered the count")
        assert f"event {ns}/{name} (uid {uid}): occurrence number 1 is below 5" in warning
        await _relist_and_restart_the_watch(api, router, "marker-1")  # count 1 listed again
        for n in (2, 3, 4):
            api.update_event(ns, name, _set(count=n))
        await until(lambda: _dropped(router, "count_decreased") == 4)
        await _relist_and_restart_the_watch(api, router, "marker-2")  # count 4 listed again
        api.update_event(ns, name, _set(count=5))  # back at the number handed on: nothing new
        api.update_event(ns, name, _set(count=6))
        await until(lambda: (uid, 6) in _mem(router).keys)
        assert _dropped(router, "count_decreased") == 4
        assert len(_warnings(caplog, "lowered the count")) == 1  # throttled: the metric has the count
        assert [n for u, n in _mem(router).keys if u == uid] == [5, 6]


async def test_a_series_that_moves_on_without_a_higher_count_is_counted_and_logged_and_its_relist_stays_silent(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Old client-go tools/events numbering: no series, then series.count 1, 2, 3. The second
    occurrence has number 1 again and was folded without a trace; it is counted and logged now.
    (Its numbering is not changed: series 2 and 3 keep numbers 2 and 3, as checkpoints hold them.)"""
    caplog.set_level(logging.INFO, logger="eventrouter")
    router = _router(api, tmp_path)
    async with router.running():
        await until(lambda: router.ready()[0])
        created = api.create_event(
            event_object(count=None, event_time="2026-01-01T00:00:00.000001Z", reason="FailedScheduling")
        )
        ns, name, uid = (
            created["metadata"]["namespace"],
            created["metadata"]["name"],
            created["metadata"]["uid"],
        )
        await _mem(router).wait_for(1)
        api.update_event(
            ns, name, _set(series={"count": 1, "lastObservedTime": "2026-01-01T00:00:10.000001Z"})
        )
        await until(lambda: _dropped(router, "series_not_raised") == 1)
        (warning,) = _warnings(caplog, "series.lastObservedTime moved")
        assert f"event {ns}/{name} (uid {uid}): series.lastObservedTime moved from no series to" in warning
        await _relist_and_restart_the_watch(api, router, "marker-1")
        for n in (2, 3):
            api.update_event(
                ns, name, _set(series={"count": n, "lastObservedTime": f"2026-01-01T00:00:{n}0.000001Z"})
            )
        await until(lambda: (uid, 3) in _mem(router).keys)
        await _relist_and_restart_the_watch(api, router, "marker-2")
        assert [n for u, n in _mem(router).keys if u == uid] == [1, 2, 3]
        assert _dropped(router, "series_not_raised") == 1
        assert _dropped(router, "count_decreased") == 0


async def test_well_formed_repeats_and_deliveries_of_the_same_object_count_nothing(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both recorders' repeats, writes that change no number (a message, a label) and relists of
    everything: each number delivered once, nothing counted as dropped, no warning."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    router = _router(api, tmp_path)
    async with router.running():
        await until(lambda: router.ready()[0])
        core = api.create_event(event_object(object_name="core"))
        new = api.create_event(
            event_object(object_name="new", count=None, event_time="2026-01-01T00:00:00.000001Z")
        )
        for obj in (core, new):
            ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
            for _ in range(3):
                api.bump(ns, name)
            api.update_event(ns, name, _set(message="changed, no new occurrence"))
            api.update_event(ns, name, lambda o: o["metadata"].update(labels={"a": "b"}))
        await _mem(router).wait_for(8)
        await _relist_and_restart_the_watch(api, router, "marker")
        keys = [k for k in _mem(router).keys if k[0] in {core["metadata"]["uid"], new["metadata"]["uid"]}]
        assert sorted(n for _, n in keys) == [1, 1, 2, 2, 3, 3, 4, 4]
        assert _dropped(router, "count_decreased") == 0
        assert _dropped(router, "series_not_raised") == 0
        assert not _warnings(caplog, "lowered the count") and not _warnings(caplog, "series.lastObservedTime")
