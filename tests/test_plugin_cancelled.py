"""A plugin sink that lets a stray ``CancelledError`` out of ``start()``, a rebuilt instance's
``start()`` or ``aclose()`` (a cancelled future awaited inside a client library), in a whole Router
against the project's Kubernetes API test server. Item 72 made such an error from ``send`` a counted,
retried failure; from the other three it ended the sink's pipeline task unseen (sink_up 1, nothing
counted or logged, the sink delivering nothing until a restart), or, from ``aclose`` at SIGTERM, the
router's stop (never finished: no checkpoint of the other sinks, no lock or lease released, the
process hanging until SIGKILL). Now it is the plugin's fault: counted, logged naming the sink, and
the sink goes on (a failed start is retried as any)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.datalock import DataDirLock
from eventrouter.options import Secret
from eventrouter.sink import Sink
from eventrouter.testing import MemorySink, MemorySinkOptions, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.waiting import until

QUICK = {"batch_max_wait": 0.02, "retry_initial_backoff": 0.05, "retry_max_backoff": 0.2}


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="t") as server:
        server.bookmark_interval = 0.2
        yield server


async def _stray() -> None:
    """What a client library may do: await a future someone else cancelled. The CancelledError it
    raises is no cancellation of the task that awaits it."""
    future = asyncio.get_running_loop().create_future()
    future.cancel()
    await future


def _sample(router: Router, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, {"sink": "plugin", **labels}) or 0.0


def _send_errors(router: Router, kind: str) -> float:
    return _sample(router, "eventrouter_sink_send_errors_total", kind=kind)


def _messages(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if part in r.getMessage()]


# ---- a first start -------------------------------------------------------------------------------------


class _LeakyStart(MemorySink):
    """Its first ``start`` lets a CancelledError out; the next waits for ``gate``, then starts."""

    gate: asyncio.Event

    def __init__(self, options: MemorySinkOptions, context: Any) -> None:
        super().__init__(options, context)
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        if self.starts == 1:
            await _stray()
        await _LeakyStart.gate.wait()
        await super().start()


async def test_a_start_that_lets_a_cancellederror_out_is_a_failed_start_retried_counted_and_logged(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the pipeline task ended cancelled: the plugin got none of the events, its queue filled
    and dropped, sink_up said 1, send_errors{start} 0, and no line said why."""
    _LeakyStart.gate = asyncio.Event()
    specs = [
        spec_for_class(_LeakyStart, {"name": "plugin", **QUICK}, type_="leaky"),
        spec_for_class(MemorySink, {"name": "mem", **QUICK}, type_="memory"),
    ]
    router = Router(router_settings(api, tmp_path), specs)
    async with router.running():
        plugin, mem = router.sinks["plugin"], router.sinks["mem"]
        assert isinstance(plugin, _LeakyStart) and isinstance(mem, MemorySink)
        await until(lambda: plugin.starts == 2)  # the failed start was tried again
        for i in range(10):
            api.create_event(event_object(object_name=f"o-{i}"))
        await mem.wait_for(10)
        assert _send_errors(router, "start") == 1
        assert _sample(router, "eventrouter_sink_up") == 0  # down until it starts
        assert router.ready() == (False, "sinks not started: plugin")
        assert plugin.received == []
        _LeakyStart.gate.set()
        await plugin.wait_for(10)
        assert _sample(router, "eventrouter_sink_up") == 1
        assert not router._pipeline_tasks[0].done()
    assert sorted(plugin.keys) == sorted(mem.keys) and len(set(plugin.keys)) == 10  # each once
    assert router.exit_code == 0
    said = _messages(caplog, "sink plugin cannot start")
    assert len(said) == 1 and said[0].startswith(
        "sink plugin cannot start: start() raised CancelledError without being cancelled (a sink bug) "
        "(retry in "
    ), said


# ---- a rebuilt instance's start, the superseded instance's aclose ----------------------------------------


class _KeyOptions(MemorySinkOptions):
    api_key: Secret


class _Keyed(MemorySink):
    """A plugin rebuilt when its ``file:`` key rotates. The instance with a key in ``LEAKS`` lets a
    CancelledError out of ``start`` (once) or of ``aclose``, as ``LEAKS`` says."""

    options_model = _KeyOptions  # type: ignore[assignment]  # a narrower model, as a plugin has
    LEAKS: dict[str, str] = {}
    instances: list[_Keyed] = []

    def __init__(self, options: _KeyOptions, context: Any) -> None:
        super().__init__(options, context)
        self.key = options.api_key.get_secret_value()
        self.starts = 0
        _Keyed.instances.append(self)

    async def start(self) -> None:
        self.starts += 1
        if _Keyed.LEAKS.get(self.key) == "start" and self.starts == 1:
            await _stray()
        await super().start()

    async def aclose(self) -> None:
        await super().aclose()
        if _Keyed.LEAKS.get(self.key) == "aclose":
            await _stray()

    def take_over(self, previous: Sink[Any]) -> None:
        assert isinstance(previous, MemorySink)


@pytest.mark.parametrize("leak", ["start", "aclose"])
async def test_a_swap_whose_instance_lets_a_cancellederror_out_leaves_the_sink_delivering(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, leak: str
) -> None:
    """A rotated key file: the rebuilt instance's ``start`` (``start``) or the superseded instance's
    ``aclose`` (``aclose``) lets a CancelledError out. Before, the pipeline task ended cancelled with
    no line logged and /readyz still 200: nothing delivered after the rotation until a restart."""
    _Keyed.instances = []
    # "start": the rebuilt instance's first start leaks; "aclose": the first instance's close does.
    _Keyed.LEAKS = {"key-two": "start"} if leak == "start" else {"key-one": "aclose"}
    volume = SecretVolume(tmp_path / "secrets", {"api-key": "key-one"})
    entry = {"name": "plugin", "api_key": f"file:{volume.file('api-key')}", **QUICK}
    router = Router(
        router_settings(api, tmp_path, reload_interval=0.05), [spec_for_class(_Keyed, entry, type_="keyed")]
    )

    def received(total: int) -> Callable[[], bool]:
        return lambda: sum(len(s.received) for s in _Keyed.instances) == total

    async with router.running():
        (first,) = _Keyed.instances
        for i in range(5):
            api.create_event(event_object(object_name=f"before-{i}"))
        await until(lambda: len(first.received) == 5)
        volume.update({"api-key": "key-two"})
        await until(lambda: len(_Keyed.instances) == 2)
        second = _Keyed.instances[1]
        sent = 5
        while not second.received and sent < 100:  # the swap is tried at a send; the rebuilt one
            sent += 1  # takes over once started (a failed start again after its backoff)
            api.create_event(event_object(object_name=f"after-{sent}"))
            await until(received(sent))  # before: nothing more was delivered
        assert second.received and router.sinks["plugin"] is second
        assert not router._pipeline_tasks[0].done()
        assert router.ready() == (True, "ok")
    keys = [k for s in (first, second) for k in s.keys]
    assert len(keys) == sent and len(set(keys)) == sent  # each once
    assert first.closed >= 1
    if leak == "start":
        assert _send_errors(router, "start") == 1
        said = _messages(caplog, "the instance rebuilt with its re-read options cannot start")
        assert len(said) == 1 and said[0].startswith(
            "sink plugin: the instance rebuilt with its re-read options cannot start: start() raised "
            "CancelledError without being cancelled (a sink bug); the previous instance goes on sending"
        ), said
    else:
        assert _send_errors(router, "exception") == 1
        said = _messages(caplog, "aclose()")
        assert said == [
            "sink plugin: aclose() raised CancelledError without being cancelled (a sink bug); going on"
        ]
    assert router.exit_code == 0


# ---- the stop -------------------------------------------------------------------------------------------


class _LeakyClose(MemorySink):
    async def aclose(self) -> None:
        await super().aclose()
        await _stray()


def _snapshot(data: Path, sink: str) -> list[str]:
    path = data / "checkpoints" / f"{sink}.snapshot"
    return path.read_text().splitlines() if path.exists() else []


async def test_sigterm_with_a_plugin_whose_aclose_lets_a_cancellederror_out_still_stops_cleanly(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the CLI runs it: ``Router.run()``, then what SIGTERM does. Before, the stop task ended
    cancelled at the plugin's close: ``run()`` never returned (the pod hung until SIGKILL), and the
    other sink's close, its checkpoint snapshot and the data dir's lock release were skipped."""
    data = tmp_path / "data"
    specs = [
        spec_for_class(_LeakyClose, {"name": "plugin", **QUICK}, type_="leaky"),
        spec_for_class(MemorySink, {"name": "mem", **QUICK}, type_="memory"),
    ]
    settings = router_settings(api, tmp_path, data_dir=data)
    router = Router(settings, specs)
    run = asyncio.create_task(router.run())
    await until(lambda: router.ready()[0], timeout=20)
    plugin, mem = router.sinks["plugin"], router.sinks["mem"]
    assert isinstance(plugin, MemorySink) and isinstance(mem, MemorySink)
    for i in range(10):
        api.create_event(event_object(object_name=f"o-{i}"))
    await mem.wait_for(10)
    await plugin.wait_for(10)
    router.request_stop()  # what SIGTERM does
    try:
        await asyncio.wait_for(asyncio.shield(run), settings.shutdown_timeout + 5)
    finally:
        if not run.done():  # the code before: the test fails here, without hanging
            run.cancel()
    assert router.stopped.is_set() and router.exit_code == 0
    assert (plugin.closed, mem.closed) == (1, 1)
    for sink in ("plugin", "mem"):
        assert len(_snapshot(data, sink)) == 10
    lock = DataDirLock(data)
    lock.acquire()  # released: DataDirInUse otherwise
    lock.release()
    assert _messages(caplog, "aclose()") == [
        "sink plugin: aclose() raised CancelledError without being cancelled (a sink bug); going on"
    ]
    assert _send_errors(router, "exception") == 1


class _HungClose(MemorySink):
    """Its ``aclose`` never returns (within the test): only a cancellation ends it."""

    closing: asyncio.Event

    async def aclose(self) -> None:
        _HungClose.closing.set()
        await asyncio.Event().wait()


async def test_a_stop_cancelled_during_a_plugins_close_still_closes_the_rest_then_is_cancelled(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """The stop itself cancelled (the task running ``Router.running()`` cancelled) while a plugin's
    ``aclose`` hangs: before, the cancellation left the stop at once, and the other sink was never
    closed, its checkpoint never written, and the data dir's lock never released."""
    _HungClose.closing = asyncio.Event()
    data = tmp_path / "data"
    specs = [
        spec_for_class(_HungClose, {"name": "plugin", **QUICK, "send_timeout": 120}, type_="hung"),
        spec_for_class(MemorySink, {"name": "mem", **QUICK}, type_="memory"),
    ]
    router = Router(router_settings(api, tmp_path, data_dir=data), specs)
    await router.start_pipelines()
    await router.start_source()
    mem = router.sinks["mem"]
    assert isinstance(mem, MemorySink)
    for i in range(5):
        api.create_event(event_object(object_name=f"o-{i}"))
    await mem.wait_for(5)
    stop = asyncio.create_task(router.stop())
    await asyncio.wait_for(_HungClose.closing.wait(), 10)
    stop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(stop, 10)
    assert mem.closed == 1 and router.stopped.is_set()
    assert len(_snapshot(data, "mem")) == 5
    lock = DataDirLock(data)
    lock.acquire()
    lock.release()


async def test_a_task_that_ends_cancelled_outside_a_stop_stops_the_router_as_a_crash_does(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The safety net: a guarded task that a stray CancelledError ends (nobody cancelled it) ended
    unseen, its work undone while the router looked healthy. Now it is a crash: logged, exit 1."""
    router = Router(
        router_settings(api, tmp_path), [spec_for_class(MemorySink, {"name": "mem", **QUICK}, type_="memory")]
    )
    async with router.running():
        router._tasks.append(router._guard(_stray(), "probe"))
        await until(router.stopped.is_set)
    assert router.exit_code == 1
    assert _messages(caplog, "task probe") == [
        "task probe ended with a CancelledError though nothing cancelled it (a bug); stopping the router"
    ]
