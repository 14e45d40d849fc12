"""A stop's scans of the spools share one budget (``STOP_SCAN_SECONDS``): the marks of deleted
events are checked first, each sink a fair share, before the stop report's scans (item 255)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import eventrouter.app as app
from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.spool import Spool
from eventrouter.record import normalise
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import Gate, gated
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "eventrouter-checkpoint"


class Down(MemorySink):
    """A sink down from the start: its backlog stays in its spool."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.down = True


async def test_one_sinks_long_spool_leaves_the_next_sinks_marks_their_share_of_the_stops_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review of item 244: every sink's mark scan and stop-report scan shared one deadline in
    config order, so a first sink with a long backlog used it all on its report and the next sink
    kept every mark unchecked; in a full ConfigMap those marks pushed live entries out and the next
    leader sent the live events again (11 of 100). The marks now go first, each sink a fair share."""
    monkeypatch.setattr(app, "STOP_SCAN_SECONDS", 0.05)  # what 2 s gives at the chart's 100m CPU
    tmp = tmp_path
    async with FakeApiServer(token="t0ken") as api:
        data = tmp / "data"
        settings = RouterSettings(
            kubeconfig=str(api.kubeconfig(tmp / "kubeconfig")),
            metrics_addr=None,
            data_dir=data,
            checkpoint_configmap=NAME,
            checkpoint_namespace=NS,
            checkpoint_flush_interval=0.1,
            checkpoint_prune_interval=0.3,
            shutdown_timeout=0.3,
            watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        )
        opts = {"name": "mem", "batch_max_wait": 0.01, "queue_max_events": 10, "batch_max_events": 10}
        big = {"name": "big", "batch_max_wait": 0.01, "queue_max_events": 10, "batch_max_events": 10}

        async def run(router: Router, body: Callable[[], Awaitable[None]]) -> None:
            task = asyncio.create_task(router.run())
            try:
                await until(lambda: router.ready()[0], timeout=60)
                if router.checkpoint_store is not None:
                    router.checkpoint_store.limit = 6_000
                await body()
            finally:
                router.request_stop()
                await asyncio.wait_for(task, 120)

        first = Router(
            settings,
            [spec_for_class(Down, big, type_="memory"), spec_for_class(MemorySink, opts, type_="memory")],
        )
        live = [api.create_event(event_object(namespace=NS, object_name=f"live{i}")) for i in range(100)]
        old: list[dict[str, Any]] = []

        async def outage() -> None:
            sink = first.sinks["mem"]
            await sink.wait_for(100)
            sink.down = True
            old.extend(
                api.create_event(event_object(namespace=NS, object_name=f"old{i}")) for i in range(300)
            )
            await until(lambda: first.pipelines[1].depth == 300, timeout=60)

        await run(first, outage)
        for obj in old:
            api.delete_event(NS, obj["metadata"]["name"])
        # The first sink's backlog: events expired long ago (not in the API server).
        sp = Spool(data / "spool" / "big", max_bytes=1 << 40)
        for i in range(60_000):
            sp.append(normalise(event_object(namespace="other", object_name=f"gone{i}", message="m" * 300)))
        sp.commit()
        sp.close()
        gate = Gate()
        second = Router(
            settings,
            [spec_for_class(Down, big, type_="memory"), spec_for_class(gated(gate), opts, type_="memory")],
        )

        async def drain_part() -> None:
            sink = second.sinks["mem"]
            while len(sink.received) < 260:
                await gate.allow(1)
                await sink.wait_for(len(sink.received) + 1)
            await until(lambda: len(second.pipelines[1]._gone) >= 250, timeout=30)

        await run(second, drain_part)
        await gate.allow(10**6)
        assert second.exit_code == 0
        third = Router(
            settings,
            [spec_for_class(Down, big, type_="memory"), spec_for_class(MemorySink, opts, type_="memory")],
        )

        async def rest() -> None:
            await third.pipelines[1].wait_idle(60)

        await run(third, rest)
        again = {(o["metadata"]["uid"], 1) for o in live} & set(third.sinks["mem"].keys)
        assert again == set()
