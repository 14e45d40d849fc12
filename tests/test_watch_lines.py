"""The watch body splitter: lines come out whole and in order however the chunks fall. And how a
watch that ends goes on: a watch that worked starts the reconnect backoff over, and the client's read
timeout outlasts the server-side watch timeout."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventrouter.app import Router
from eventrouter.cli import _parser, _settings, main
from eventrouter.config import RouterConfig, spec_for_class
from eventrouter.source.kube import ApiError
from eventrouter.source.watcher import EventWatcher, WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until


class _Body:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = self
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def _split(data: bytes, sizes: list[int], limit: int = 1 << 20) -> list[bytes]:
    chunks, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        chunks.append(data[i : i + n])
        i, k = i + n, k + 1
    watcher: Any = EventWatcher.__new__(EventWatcher)
    watcher.settings = WatchSettings(max_line_bytes=limit)

    async def collect() -> list[bytes]:
        return [line async for line in watcher._lines(_Body(chunks))]

    return asyncio.run(collect())


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), max_size=30),
    blanks=st.lists(st.sampled_from([b"", b" ", b"\t "]), max_size=3),
    sizes=st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=5),
)
def test_lines_are_whole_and_in_order_for_any_chunking(
    lines: list[bytes], blanks: list[bytes], sizes: list[int]
) -> None:
    body = b"".join(line + b"\n" for line in lines + blanks)
    assert _split(body, sizes) == [line for line in lines if line.strip()]


def test_a_stream_cut_inside_an_object_is_an_error() -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        _split(b'{"type":"ADDED"}\n{"type":"ADD', [7])


def test_a_line_over_the_limit_is_refused_before_it_is_complete() -> None:
    with pytest.raises(ApiError, match="LineTooLong"):
        _split(b"x" * 5000, [100], limit=1000)
    assert _split(b"a\n" + b"y" * 900 + b"\nb\n", [100], limit=1000) == [b"a", b"y" * 900, b"b"]


# ---- after a watch ends -------------------------------------------------------------------------


def _router(api: FakeApiServer, tmp_path: Path, watch: WatchSettings) -> Router:
    settings = dataclasses.replace(router_settings(api, tmp_path), watch=watch)
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    return Router(settings, [spec])


def _delivered(router: Router, name: str) -> bool:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return any(o.record["involved_object"]["name"] == name for o in sink.received)


def _reconnect_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delays the watcher chose (its debug record), not wall-clock measurements."""
    delays = []
    for r in caplog.records:
        if r.name == "eventrouter.source.watcher" and str(r.msg).startswith("reconnecting"):
            assert isinstance(r.args, tuple) and isinstance(r.args[1], float)
            delays.append(r.args[1])
    return delays


async def test_watches_cut_after_they_worked_reconnect_at_once_however_often(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Five watches in a row deliver a line and are then cut (a proxy's connection limit, a reset).
    The failure count was reset only by a watch ending at its own timeout: the reconnects backed off
    0.5, 1, 2, 4, 8 s (then 15-30 s), and every event written meanwhile waited that long."""
    async with FakeApiServer(token="t") as api:
        router = _router(api, tmp_path, WatchSettings(watch_timeout=30))  # the product's backoffs
        async with router.running():
            await router.watchers[0].initial_list_done.wait()
            caplog.set_level(logging.DEBUG, logger="eventrouter.source.watcher")
            api.faults.cut_next_watch(after_lines=1, count=5)
            api.disconnect_watches()  # this one ends cleanly; the next five are cut
            async with api.steady_events(interval=0.02):
                await until(lambda: api.faults.pending == 0, timeout=30)
            api.create_event(event_object(object_name="after-the-cuts"))
            await until(lambda: _delivered(router, "after-the-cuts"), timeout=20)
        assert router.metrics.watch_restarts.labels("connection")._value.get() == 5
    delays = _reconnect_delays(caplog)
    assert len(delays) == 5
    assert max(delays) <= 0.5  # backoff_initial: each cut watch had worked


async def test_a_watch_open_longer_than_the_longest_backoff_starts_the_backoff_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Quiet watches (no line) reset by a load balancer's idle timeout, each after longer than
    backoff_max: the connections worked, and reconnects that far apart are no storm."""
    async with FakeApiServer(token="t") as api:
        watch = WatchSettings(watch_timeout=30, backoff_initial=0.1, backoff_max=0.4)
        router = _router(api, tmp_path, watch)
        async with router.running():
            await router.watchers[0].initial_list_done.wait()
            caplog.set_level(logging.DEBUG, logger="eventrouter.source.watcher")
            api.faults.stall_next_watch(0.5, count=3, reset=True)
            api.disconnect_watches()  # this one ends cleanly; the next three are reset
            await until(lambda: api.faults.pending == 0, timeout=20)
            api.create_event(event_object(object_name="after-the-resets"))
            await until(lambda: _delivered(router, "after-the-resets"), timeout=20)
        assert router.metrics.watch_restarts.labels("connection")._value.get() == 3
    delays = _reconnect_delays(caplog)
    assert len(delays) == 3
    assert max(delays) <= 0.1  # backoff_initial (the old code: up to 0.1, 0.2, 0.4)


def test_the_read_timeout_outlasts_the_server_side_watch_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """--watch-timeout 600 (or 0: the API server's 30-60 min) with the fixed 330 s read timeout: on a
    quiet cluster without bookmarks every watch ended in the read timeout, counted as broken."""
    assert WatchSettings().read_timeout == 330
    assert WatchSettings(watch_timeout=600).read_timeout == 640
    assert dataclasses.replace(WatchSettings(), watch_timeout=900).read_timeout == 940
    assert WatchSettings(watch_timeout=30, read_timeout=500).read_timeout == 500
    with pytest.raises(ValueError, match="watch_timeout"):
        WatchSettings(watch_timeout=0)
    for value in ("0", "-5"):
        with pytest.raises(SystemExit) as exc:
            main(["run", "--watch-timeout", value, "--sink", "stdout"])
        assert exc.value.code == 2
        assert f"--watch-timeout: {value!r}: must be 1 or more" in capsys.readouterr().err


GONE = (
    b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure",'
    b'"message":"too old resource version","reason":"Expired","code":410}}'
)


async def test_watches_that_end_in_410_after_a_line_back_off_their_relists(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four watches in a row deliver a line, then an in-stream 410 (a watch behind compaction under
    load, a proxy in a bad state). Any handled line started the count over: each relisted at once, a
    LIST of the whole namespace dozens of times a second. Only a watch that stayed open longer than
    the longest backoff starts it over now; these back off as a storm."""
    async with FakeApiServer(token="t", watch_cache=False) as api:
        watch = WatchSettings(watch_timeout=30, backoff_initial=0.1, backoff_max=30.0)
        router = _router(api, tmp_path, watch)
        relists = router.metrics.relists.labels("expired")
        async with router.running():
            await router.watchers[0].initial_list_done.wait()
            caplog.set_level(logging.DEBUG, logger="eventrouter.source.watcher")
            api.faults.malformed_next_watch_line(after_lines=1, count=4, line=GONE)
            api.disconnect_watches()  # this one ends cleanly; the next four end in 410
            async with api.steady_events(interval=0.02):
                await until(lambda: api.faults.pending == 0 and relists._value.get() >= 4, timeout=30)
                api.create_event(event_object(object_name="after-the-410s"))
                await until(lambda: _delivered(router, "after-the-410s"), timeout=20)
        assert relists._value.get() == 4
    delays = _reconnect_delays(caplog)
    # The first relist at once, then 0.1-0.2, 0.2-0.4 and 0.4-0.8 s (the old code: all at once).
    assert len(delays) == 3, delays
    assert delays[0] >= 0.1 and delays[1] >= 0.2 and delays[2] >= 0.4, delays


def test_a_stall_timeout_shorter_than_a_quiet_watch_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--watch-timeout 1800 (taken at its word since the read timeout outlasts it) with the default
    --stall-timeout 600: on a quiet cluster a watch of Events (no bookmarks by default) sends nothing
    for 30 min, and /healthz failed from 600 s to 1,800 s of each; the liveness probe restarted the
    router again and again. Refused before anything starts, naming both ways out."""
    base = [
        "run",
        "--sink",
        "stdout",
        "--metrics-addr",
        "127.0.0.1:0",
        "--kubeconfig",
        str(tmp_path / "none"),
    ]
    for args, least, most in (
        (["--watch-timeout", "1800"], 1840, " or --watch-timeout to at most 560"),
        (["--stall-timeout", "300"], 330, " or --watch-timeout to at most 260"),
        (["--watch-timeout", "600", "--stall-timeout", "639.5"], 640, " or --watch-timeout to at most 599"),
        (["--stall-timeout", "30"], 330, ""),
    ):
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert f"raise --stall-timeout to at least {least} (--watch-timeout + 40){most}\n" in err, err
    accepted = _parser().parse_args([*base, "--watch-timeout", "1800", "--stall-timeout", "1840"])
    settings = _settings(accepted, RouterConfig())
    assert (settings.watch.watch_timeout, settings.stall_timeout) == (1800, 1840)
    assert _settings(_parser().parse_args(base), RouterConfig()).stall_timeout == 600  # the defaults
