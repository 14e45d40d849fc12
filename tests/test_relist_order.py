"""A relist is handed to the sinks oldest-first: the API server lists in key order, and Loki refuses
entries more than an hour behind their stream's newest."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.record import Occurrence, normalise
from eventrouter.source import relist_order
from eventrouter.source.relist_order import RelistOrder
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.loki import KEEP_OLD_SAMPLES, LokiReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiSink

BASE = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)


def _at(minutes: float) -> str:
    return (BASE + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spread_events(n: int, span_minutes: float) -> list[dict[str, object]]:
    """Names in the opposite order of their times: a key-order list is newest first."""
    return [
        event_object(
            namespace="shop",
            name=f"ev-{i:05d}",
            object_name="web-0",
            first_timestamp=_at(span_minutes * (n - 1 - i) / (n - 1)),
            last_timestamp=_at(span_minutes * (n - 1 - i) / (n - 1)),
        )
        for i in range(n)
    ]


def _settings(
    api: FakeApiServer, tmp_path: Path, *, page_size: int, data_dir: Path | None = None, sort: bool = False
) -> RouterSettings:
    return RouterSettings(
        cluster_name="t",
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        data_dir=data_dir,
        watch=WatchSettings(page_size=page_size, backoff_initial=0.05, relist_sorted=sort),
    )


@pytest.mark.parametrize("in_memory", [0, 3, 1000])
def test_drain_is_oldest_first_and_rebuilds_the_same_occurrences(tmp_path: Path, in_memory: int) -> None:
    objects = _spread_events(10, 180)
    originals = [normalise(obj, cluster="c", received_at=1.5 + i) for i, obj in enumerate(objects)]
    order = RelistOrder(cluster="c", directory=str(tmp_path), in_memory=in_memory)
    for occ in originals:
        order.add(occ)
    drained: list[Occurrence] = [occ for page in order.drain(4) for occ in page]
    assert [len(page) for page in [drained[:4], drained[4:8], drained[8:]]] == [4, 4, 2]
    assert [o.time_ns for o in drained] == sorted(o.time_ns for o in originals)
    by_uid = {o.uid: o for o in originals}
    for occ in drained:
        want = by_uid[occ.uid]
        assert (occ.record, occ.raw_json, occ.received_at, occ.number, occ.time_ns, occ.json) == (
            want.record,
            want.raw_json,
            want.received_at,
            want.number,
            want.time_ns,
            want.json,
        )
        # The same uid string as the tracker holds, also when rebuilt from the file: the checkpoint
        # table keys on it, and a copy per relisted event would be ~5 MiB at 50,000.
        assert occ.uid is want.uid
    assert len(order) == 0 and not list(tmp_path.iterdir())  # an anonymous file, gone


def test_equal_times_keep_list_order_and_unhanded_uids_are_reported(tmp_path: Path) -> None:
    objects = [event_object(name=f"e{i}", first_timestamp=_at(0), last_timestamp=_at(0)) for i in range(5)]
    occs = [normalise(obj) for obj in objects]
    order = RelistOrder(cluster="", directory=str(tmp_path), in_memory=2)
    for occ in occs:
        order.add(occ)
    pages = order.drain(2)
    assert [o.uid for o in next(pages)] == [occs[0].uid, occs[1].uid]
    # The consumer failed here: what it did not get must be forgotten by the tracker.
    assert order.not_handed_on() == [o.uid for o in occs[2:]]
    pages.close()
    order.close()


def test_the_sorted_order_holds_no_object_per_row_while_draining(tmp_path: Path) -> None:
    # 50,000 row ints (32 bytes each) kept for the whole drain raised the relist's arena high-water
    # (a census at the peak found them: RelistOrder._order); the order now costs 8 bytes a row.
    rows = 20_000
    occs = [normalise(obj) for obj in _spread_events(rows, 180)]
    order = RelistOrder(cluster="", directory=str(tmp_path), in_memory=0)
    for occ in occs:
        order.add(occ)
    here = tracemalloc.Filter(True, relist_order.__file__)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces([here])
        pages = order.drain(10)
        first = next(pages)
        after = tracemalloc.take_snapshot().filter_traces([here])
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert [o.time_ns for o in first] == sorted(o.time_ns for o in occs)[:10]
    assert grown < 12 * rows, f"{grown / rows:.1f} bytes a row held while draining"
    pages.close()
    order.close()


async def test_a_relist_reaches_the_sink_in_event_time_order(tmp_path: Path) -> None:
    async with FakeApiServer() as api:
        for obj in _spread_events(120, 180):
            api.create_event(obj)
        received = await _sorted_relist(api, tmp_path, page_size=25, count=120)
        times = [occ.time_ns for occ in received]
        assert times == sorted(times)


async def _sorted_relist(
    api: FakeApiServer, tmp_path: Path, *, page_size: int, count: int
) -> list[Occurrence]:
    """What a memory sink receives from a router's sorted first list, once it has ``count`` and the
    router is ready."""
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    router = Router(_settings(api, tmp_path, page_size=page_size, sort=True), [spec])
    async with router.running():
        sink = router.sinks["mem"]
        assert isinstance(sink, MemorySink)
        await sink.wait_for(count)
        await until(lambda: router.ready()[0])
        return list(sink.received)


async def test_a_relist_holding_times_beyond_64_bit_nanoseconds_completes(tmp_path: Path) -> None:
    """A year-9999 eventTime (and one from 1600) does not fit the sort's 64-bit nanoseconds: it sorts
    last (first), and the relist completes. Before, it raised in the middle of the list and the
    watch task's crash stopped the router: one such event in a cluster stopped every router with a
    sink that wants time order (Loki)."""
    async with FakeApiServer() as api:
        for obj in _spread_events(20, 60):
            api.create_event(obj)
        api.create_event(
            event_object(
                namespace="shop", name="far-future", count=None, event_time="9999-12-31T23:59:59.000000Z"
            )
        )
        api.create_event(
            event_object(
                namespace="shop", name="far-past", count=None, event_time="1600-01-01T00:00:00.000000Z"
            )
        )
        names = [occ.record["name"] for occ in await _sorted_relist(api, tmp_path, page_size=10, count=22)]
        assert names[0] == "far-past" and names[-1] == "far-future"


async def test_a_relist_spanning_three_hours_is_not_refused_by_loki(tmp_path: Path) -> None:
    # Without the ordering the key-order list (newest first) makes Loki refuse everything more than
    # an hour behind the first entries of the stream.
    async with (
        FakeApiServer() as api,
        LokiReceiver(reject_old_samples_max_age=KEEP_OLD_SAMPLES) as loki,
    ):
        for obj in _spread_events(300, 180):
            api.create_event(obj)
        settings = _settings(api, tmp_path, page_size=50, data_dir=tmp_path / "data")
        spec = spec_for_class(
            LokiSink,
            {"url": loki.url, "batch_max_wait": 0.02, "batch_max_events": 20, "max_age": KEEP_OLD_SAMPLES},
            type_="loki",
        )
        router = Router(settings, [spec])
        async with router.running():
            m = router.metrics
            await until(lambda: m.delivered.labels("loki")._value.get() == 300)
            assert m.dead_lettered.labels("loki", "rejected")._value.get() == 0
            assert len({e.line for e in loki.entries}) == 300
            # Each at its own time: none had to be stamped at receipt (clamp_time) to be taken.
            assert not any('"time_adjusted":true' in e.line for e in loki.entries)


async def test_a_relist_that_fails_midway_hands_everything_on_at_the_next_one(tmp_path: Path) -> None:
    # Page 1 is buffered, page 2 fails: the tracker must forget page 1's occurrences (they were never
    # handed on) or the next relist would not see them as new, and they would be lost.
    from eventrouter.metrics import Metrics
    from eventrouter.source.kube import connect
    from eventrouter.source.tracker import OccurrenceTracker
    from eventrouter.source.watcher import EventWatcher

    async with FakeApiServer() as api:
        for obj in _spread_events(30, 60):
            api.create_event(obj)
        kube = await connect(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")))
        published: list[Occurrence] = []
        asked = 0

        def needed(occ: Occurrence) -> bool:
            # Called for each new occurrence of page 1: make the request for page 2 fail.
            nonlocal asked
            asked += 1
            if asked == 1:
                api.faults.fail_next(500, verbs=("list",))
            return True

        watcher = EventWatcher(
            kube,
            namespace=None,
            tracker=OccurrenceTracker(cluster="t"),
            publish=published.append,
            forget=lambda uids: None,
            listed=lambda ns: None,
            metrics=Metrics(),
            settings=WatchSettings(page_size=10, backoff_initial=0.01, backoff_max=0.02, relist_sorted=True),
            needed=needed,
        )
        try:
            with pytest.raises(Exception, match="500"):
                await watcher._list()
            assert published == []
            await watcher._list()
        finally:
            await kube.close()
        assert sorted(o.key for o in published) == sorted(f"{e['metadata']['uid']}/1" for e in api.events())
        assert [o.time_ns for o in published] == sorted(o.time_ns for o in published)


def test_an_unusable_temp_dir_keeps_the_relist_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    occs = [normalise(obj) for obj in _spread_events(6, 60)]
    order = RelistOrder(cluster="", directory=str(tmp_path / "missing"), in_memory=2)
    for occ in occs:
        order.add(occ)
    drained = [occ.uid for page in order.drain(4) for occ in page]
    # The rows beyond the first two wait for one write, which fails when the drain starts.
    assert "cannot use a temporary file" in caplog.text
    assert drained == [occ.uid for occ in sorted(occs, key=lambda o: o.time_ns)]


def test_no_usable_temp_dir_at_all_keeps_the_relist_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only root without a writable /tmp: tempfile finds no directory at all (tests/image runs
    the real thing); the relist still sorts everything, in memory, and says why."""
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError):
        tempfile.gettempdir()
    occs = [normalise(obj) for obj in _spread_events(6, 60)]
    order = RelistOrder(cluster="", in_memory=2)
    for occ in occs:
        order.add(occ)
    drained = [occ.uid for page in order.drain(4) for occ in page]
    assert "cannot use a temporary file in the temp dir (" in caplog.text
    assert "No usable temporary directory" in caplog.text
    assert drained == [occ.uid for occ in sorted(occs, key=lambda o: o.time_ns)]


_FULL_DISK = """
import json, resource, signal, sys
from eventrouter.record import normalise
from eventrouter.source import relist_order
from eventrouter.source.relist_order import RelistOrder
from eventrouter.testing import event_object

# The kernel refuses to grow any file of this process past the limit (EFBIG): a disk that fills up
# after the first chunks. Ignored, SIGXFSZ would end the process instead of failing the write.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[2])
objects = [
    event_object(name=f"ev-{i:05d}", last_timestamp=f"2026-11-22T{(2999 - i) // 60 % 24:02d}:{(2999 - i) % 60:02d}:00Z")
    for i in range(3000)
]
occs = [normalise(obj, cluster="c", received_at=float(i)) for i, obj in enumerate(objects)]
raw_bytes = sum(len(o.raw_json) for o in occs)
order = RelistOrder(cluster="c", directory=sys.argv[1], in_memory=0)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
for occ in occs:
    order.add(occ)
written_rows = sum(1 for o in order._offsets if o >= 0)
drained = [occ for page in order.drain(100) for occ in page]
by_uid = {o.uid: o for o in occs}
print(json.dumps({
    "raw_bytes": raw_bytes,
    "chunk": relist_order.WRITE_CHUNK,
    "written_rows": written_rows,
    "failed": order._file_failed,
    "count": len(drained),
    "oldest_first": [o.time_ns for o in drained] == sorted(o.time_ns for o in occs),
    "same": all(
        (o.record, o.raw_json, o.received_at) == (by_uid[o.uid].record, by_uid[o.uid].raw_json, by_uid[o.uid].received_at)
        for o in drained
    ),
}))
"""


def test_a_temp_dir_that_fills_up_mid_relist_keeps_the_rest_in_memory(tmp_path: Path) -> None:
    limit = relist_order.WRITE_CHUNK * 2
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["raw_bytes"] > 2 * limit, "the relist must be larger than what fits"
    # Some chunks reached the file before the limit, the rest fell back to memory: all 3,000 come
    # back, oldest first, exactly as they were built.
    assert got["failed"] and 0 < got["written_rows"] < 3000
    assert (got["count"], got["oldest_first"], got["same"]) == (3000, True, True)
    assert "cannot use a temporary file" in result.stderr and "File too large" in result.stderr


async def test_relists_are_sorted_only_when_a_sink_asks_for_time_order(tmp_path: Path) -> None:
    # Sorting holds the first hand-on back until the whole list is read: only Loki asks for it.
    async with FakeApiServer() as api, LokiReceiver() as loki:
        mem = spec_for_class(MemorySink, {"name": "mem"}, type_="memory")
        lok = spec_for_class(LokiSink, {"url": loki.url}, type_="loki")
        for specs, want in (([mem], False), ([mem, lok], True)):
            router = Router(_settings(api, tmp_path, page_size=25), specs)
            async with router.running():
                assert [w.settings.relist_sorted for w in router.watchers] == [want]


def test_each_members_rows_not_handed_on_follow_adds_and_the_drain(tmp_path: Path) -> None:
    """Several namespaces' lists in one order (a merged relist): each member asks for its own rows
    not handed on (a failed round, a stop). They are grouped in one pass per state of the order, and
    that grouping must follow later adds, a partial drain and discards."""
    occs = [normalise(obj) for obj in _spread_events(12, 60)]
    order = RelistOrder(cluster="", directory=str(tmp_path), in_memory=4)
    order.tag_members()
    for i, occ in enumerate(occs[:9]):
        order.add(occ, i % 3)
    assert order.not_handed_on(1) == [occs[i].uid for i in (1, 4, 7)]
    for i, occ in enumerate(occs[9:], start=9):  # added after the grouping: in the next answer
        order.add(occ, i % 3)
    assert order.not_handed_on(1) == [occs[i].uid for i in (1, 4, 7, 10)]
    assert order.discard(2) == [occs[i].uid for i in (2, 5, 8, 11)]
    assert order.discard(2) == []
    pages = order.drain(3)
    first = next(pages)  # oldest first: the names are in the opposite order of the times
    assert [o.uid for o in first] == [occs[i].uid for i in (10, 9, 7)]
    assert order.not_handed_on(1) == [occs[i].uid for i in (4, 1)]
    assert order.not_handed_on(0) == [occs[i].uid for i in (6, 3, 0)]
    assert order.not_handed_on(2) == []
    pages.close()
    order.close()
    assert order.not_handed_on(1) == []
