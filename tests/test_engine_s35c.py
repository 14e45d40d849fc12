"""A stop on a nearly full disk whose first failed write is an owed leftover's own (item 317).

``owed_at_stop`` marks X/1 owed: undelivered, while X/2 was accepted. ``Spool.extend`` took (X, 1)
out of ``owed`` before the append; when that append was the first write to fail, X/1 was left
where it was spooled (read again after the restart, unmarked), but ``owed_unmarked`` never got X:
``settle_at_stop`` recorded X at 2 and the restart skipped X/1 as a copy.

The disk is nearly full where the spool's appends (``append_all``) and its file writes of more than
4 KiB answer ENOSPC, as tests/test_engine_s35b.py does."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.appendfile import append_all as append_all_on_disk
from eventrouter.config import spec_for_class
from eventrouter.engine import spool as spool_module
from eventrouter.engine.spool import Spool
from eventrouter.record import Occurrence
from eventrouter.sink import OK, retry
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

Key = tuple[str, int]
LIMIT = 4096
"""Bytes a write may still take on the nearly full disk (single small records and the cursor fit)."""


def _keys(occs: Sequence[Occurrence]) -> list[Key]:
    return [(o.uid, o.number) for o in occs]


def _occ(uid: str, number: int, size: int) -> Occurrence:
    return make_occurrence(object_name=uid, uid=uid, count=number, message="m" * size)


def _small_writes_only(monkeypatch: pytest.MonkeyPatch, under: Path) -> list[bool]:
    """A switch: while on, every write under ``under`` of more than ``LIMIT`` bytes fails with ENOSPC."""
    full = [False]
    append_all = append_all_on_disk
    write_bytes = Path.write_bytes

    def no_space() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device")

    def small_append(fd: int, data: bytes, *args: Any) -> None:
        if full[0] and len(data) > LIMIT:
            raise no_space()
        append_all(fd, data, *args)

    def small_write(self: Path, data: Any) -> int:
        if full[0] and str(self).startswith(str(under)) and len(data) > LIMIT:
            raise no_space()
        return write_bytes(self, data)

    monkeypatch.setattr(spool_module, "append_all", small_append)
    monkeypatch.setattr(Path, "write_bytes", small_write)
    return full


def _delivered_after_the_restart(directory: Path, done: dict[str, int]) -> list[Key]:
    """Read the spool as a restart does, the checkpoint (``done``) skipping copies unless owed."""
    again = Spool(directory, max_bytes=64 * 1024 * 1024)
    delivered: list[Key] = []
    for occ in again.pop(1000):
        key = (occ.uid, occ.number)
        if occ.number > done.get(occ.uid, 0) or key in again.owed:
            delivered.append(key)
            done[occ.uid] = max(occ.number, done.get(occ.uid, 0))
    return delivered


def test_an_owed_leftover_whose_own_append_fails_first_keeps_its_event_unrecorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X/1 (8 KB) spooled, committed, read back (the batch in flight); X/2 accepted meanwhile, so
    the stop owes X/1. Its append is the first write to fail: X/1 stays where it was spooled,
    unmarked, so X must be in ``owed_unmarked`` (``settle_at_stop`` does not record X at 2) and the
    restart delivers X/1. Before: ``owed_unmarked`` stayed empty, X was recorded at 2 and X/1 was
    skipped as a copy, though the stop counted it kept."""
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=64 * 1024 * 1024)
    spool.append(_occ("X", 1, 8000))
    spool.commit()
    in_flight = spool.pop(10)
    assert _keys(in_flight) == [("X", 1)]
    full = _small_writes_only(monkeypatch, directory)
    full[0] = True
    owed = {("X", 1)}  # owed_at_stop: accepted(X) = 0 < 1 < done(X) = 2
    assert spool.extend(in_flight, owed) == []  # kept: left in place, nothing raised
    assert spool.owed_unmarked == {"X"}
    done = {uid: n for uid, n in {"X": 2}.items() if uid not in spool.owed_unmarked}  # settle_at_stop
    spool.commit()  # as the stop does last
    spool.close()
    full[0] = False
    assert _delivered_after_the_restart(directory, done) == [("X", 1)]


def _router(api: FakeApiServer, tmp: Path, **sink_options: Any) -> Router:
    settings = RouterSettings(
        cluster_name="test",
        kubeconfig=str(api.kubeconfig(tmp / "kubeconfig")),
        metrics_addr=None,
        shutdown_timeout=0.5,
        data_dir=tmp / "data",
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
    )
    options = {"name": "mem", "batch_max_wait": 0.02, "retry_initial_backoff": 0.05, **sink_options}
    return Router(settings, [spec_for_class(MemorySink, options, type_="memory")])


def _sink(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


async def test_a_router_stopped_on_a_nearly_full_disk_delivers_an_owed_occurrence_left_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router's own stop. X/1 (8 KB) and X/2 were spilled behind a full queue, then read back
    in one batch; the sink refuses X/1 (retried in a minute) and takes X/2; the disk takes only
    small writes from then on. The stop's append of X/1 fails first: X/1 stays where it was
    spooled, and the checkpoint does not record X past it, so the restart (the API server holds
    only X/2 now) delivers X/1. Before: X was recorded at 2 and X/1 skipped as a copy, while the
    stop counted nothing given up."""
    full = _small_writes_only(monkeypatch, tmp_path / "data")
    async with FakeApiServer(token="t", watch_cache=False) as api:
        router = _router(api, tmp_path, queue_max_events=4, batch_max_events=8)
        async with router.running():
            await until(lambda: router.ready()[0])
            sink = _sink(router)
            sink.blocked = asyncio.Event()  # the first batch waits: what follows fills the queue
            sink.decide = lambda occ: (
                retry("refused", retry_after=60) if (occ.uid, occ.number) == ("X", 1) else OK
            )
            api.create_event(event_object(object_name="e-0"))
            p = router.pipelines[0]
            assert p.spool is not None
            spool = p.spool
            await until(lambda: len(p._in_flight) == 1)
            for i in range(1, 5):
                api.create_event(event_object(object_name=f"e-{i}"))
            await until(lambda: len(p._queue) == 4)
            api.create_event(event_object(name="x", uid="X", object_name="x", count=1, message="m" * 8000))
            api.update_event("default", "x", lambda obj: obj.update(count=2, message="small"))
            await until(lambda: len(spool) == 2)  # spilled
            full[0] = True
            sink.blocked.set()
            await until(lambda: ("X", 2) in sink.keys and len(sink.received) == 6 and not len(spool))
        assert router.metrics.dropped.labels("mem", "spool_error")._value.get() == 0
        full[0] = False
        again = _router(api, tmp_path, batch_max_events=1)
        async with again.running():
            await until(lambda: again.ready()[0])
            await until(lambda: ("X", 1) in _sink(again).keys, timeout=10)
