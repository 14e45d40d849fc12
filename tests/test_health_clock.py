"""/healthz judges watch progress by the monotonic clock: a wall clock stepped forward (NTP, a VM
resumed from suspension) is no stall (session 30 review, finding 4)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.testing import MemorySink
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


async def test_a_wall_clock_stepped_past_the_stall_timeout_keeps_a_quiet_watch_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet watch (no bookmarks) just opened; the wall clock then jumps beyond --stall-timeout
    (NTP, a VM resumed): /healthz said "watch made no progress within 3s (all namespaces: 103s)" and
    the liveness probe restarted a healthy router. The exported progress timestamp stays wall clock,
    and a watch that really makes no progress still fails /healthz."""
    async with FakeApiServer(bookmark_interval=3600) as api:
        spec = spec_for_class(MemorySink, {"name": "mem"}, type_="memory")
        settings = router_settings(api, tmp_path, stall_timeout=3.0, allow_short_stall_timeout=True)
        router = Router(settings, [spec])
        async with router.running():
            await until(lambda: router.ready()[0] and api.active_watches == 1)
            assert router.healthy() == (True, "ok")
            progressed = router.watchers[0].last_progress
            real = time.time
            with monkeypatch.context() as m:
                m.setattr(time, "time", lambda: real() + settings.stall_timeout + 100)
                verdict = router.healthy()
            assert verdict == (True, "ok")
            # What /metrics exports (eventrouter_watch_last_progress_timestamp_seconds) is still the
            # wall-clock time of that progress.
            assert router.watchers[0].last_progress == progressed
            # The watch stays quiet: after 3 s it is a stall, by the monotonic clock.
            await until(lambda: not router.healthy()[0], timeout=10, interval=0.1)
            assert "watch made no progress within 3s (all namespaces: " in router.healthy()[1]


async def test_a_wall_clock_stepped_forward_keeps_a_leader_not_watching_yet_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader whose watch has not begun (its checkpoint ConfigMap unreadable) is judged from taking
    the lease: by the wall clock, a step past --stall-timeout failed /healthz at once, and the
    liveness probe restarted it. It still fails once that long has really passed."""
    async with FakeApiServer(token="t0ken", bookmark_interval=3600) as api:
        api.forbid("t0ken", verbs=["get"], resources=["configmaps"])
        spec = spec_for_class(MemorySink, {"name": "mem"}, type_="memory")
        settings = router_settings(
            api,
            tmp_path,
            stall_timeout=3.0,
            allow_short_stall_timeout=True,
            leader_elect=True,
            leader_name="er",
            leader_identity="a",
            lease_duration=2.0,
            renew_deadline=1.5,
            retry_period=0.2,
            checkpoint_configmap="er-checkpoint",
        )
        router = Router(settings, [spec])
        running = asyncio.create_task(router.run())  # as the CLI runs it: the election first
        try:
            await until(lambda: "the watch has not begun: cannot read" in router.healthy()[1])
            assert router.healthy()[0]
            real = time.time
            with monkeypatch.context() as m:
                m.setattr(time, "time", lambda: real() + settings.stall_timeout + 100)
                ok, why = router.healthy()
            assert ok and "the watch has not begun" in why, why
            await until(lambda: not router.healthy()[0], timeout=10, interval=0.1)
            assert "(more than --stall-timeout 3s)" in router.healthy()[1]
        finally:
            router.request_stop()
            await asyncio.wait_for(running, 30)
