"""At a stop, sinks whose ``aclose`` hangs (a broker gone, a plugin's bug). Each close is bounded by
its sink's send_timeout, but they ran one after another, before the checkpoint ConfigMap's last
write: two hung closes of 60 s ran the stop two minutes past the kubelet's SIGKILL, which came
before the last write, and the next leader delivered again all accepted since the previous one."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.engine.configmap_checkpoint import DATA_KEY, decode_state
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

NAME = "er-checkpoint"
SHUTDOWN = 0.5


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


class _HungClose(MemorySink):
    """Delivers, then its ``aclose`` never returns: only a cancellation ends it."""

    async def aclose(self) -> None:
        await asyncio.Event().wait()


def _states(api: FakeApiServer) -> dict[str, dict[str, int]]:
    (cm,) = api.objects("configmaps")
    return decode_state(base64.b64decode(cm["binaryData"][DATA_KEY]))[0]


async def test_hung_closes_run_at_once_after_the_last_configmap_write(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="eventrouter")
    sinks = ("hung-a", "hung-b", "mem")
    specs = [
        spec_for_class(_HungClose, {"name": name, "batch_max_wait": 0.02, "send_timeout": 60}, type_="hung")
        for name in sinks[:2]
    ] + [spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")]
    settings = router_settings(
        api,
        tmp_path,
        data_dir=tmp_path / "data",
        shutdown_timeout=SHUTDOWN,
        checkpoint_configmap=NAME,
        checkpoint_flush_interval=3600,  # only the stop's last write carries the acks
    )
    router = Router(settings, specs)
    run = asyncio.create_task(router.run())
    await until(lambda: router.ready()[0], timeout=20)
    for i in range(10):
        api.create_event(event_object(object_name=f"o-{i}"))
    for name in sinks:
        sink = router.sinks[name]
        assert isinstance(sink, MemorySink)
        await sink.wait_for(10)
    router.request_stop()  # what SIGTERM does
    try:
        # The grace period is SHUTDOWN + 5 s; before, the stop took 2 × 60 s and wrote nothing.
        await asyncio.wait_for(asyncio.shield(run), SHUTDOWN + 15)
    finally:
        if not run.done():
            run.cancel()
    assert router.stopped.is_set()
    assert {name: len(state) for name, state in _states(api).items()} == dict.fromkeys(sinks, 10)
    said = sorted(r.getMessage() for r in caplog.records if "not closed" in r.getMessage())
    assert said == [
        f"sink {name}: not closed (no time left in the grace period); going on with the stop"
        for name in sinks[:2]
    ]
    mem = router.sinks["mem"]
    assert isinstance(mem, MemorySink) and mem.closed == 1
