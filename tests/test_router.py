"""The whole router against the project's Kubernetes API test server: the delivery guarantee.

Each test counts occurrences expected vs received: lost must be 0 and duplicates 0 (clean restarts).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrouter.app import Router, RouterSettings, disk_bounds
from eventrouter.config import spec_for_class
from eventrouter.engine.checkpoint import FileCheckpoint, SinkCheckpoint
from eventrouter.metrics import DEAD_LETTER_REASONS, SINK_DROP_REASONS
from eventrouter.record import Occurrence, parse_time_ns
from eventrouter.sink import OK, Outcome, reject, retry
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink, event_object, recorded_watch
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import Gate, gated
from eventrouter.testing.waiting import until


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _settings(api: FakeApiServer, tmp_path: Path, **kw: Any) -> RouterSettings:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    return RouterSettings(
        cluster_name="test",
        kubeconfig=str(kubeconfig),
        metrics_addr=kw.pop("metrics_addr", None),
        shutdown_timeout=kw.pop("shutdown_timeout", 5.0),
        watch=WatchSettings(watch_timeout=kw.pop("watch_timeout", 30), backoff_initial=0.05, backoff_max=0.5),
        **kw,
    )


def _router(settings: RouterSettings, **opts: Any) -> Router:
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02, **opts}, type_="memory")
    return Router(settings, [spec])


def _mem(router: Router) -> MemorySink:
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


async def _ready(router: Router) -> None:
    await until(lambda: router.ready()[0])


def _cut_watches(api: FakeApiServer) -> None:
    """End every open watch stream now (as an API server restart or a load balancer would)."""
    api.disconnect_watches()


def _expected(api: FakeApiServer) -> set[tuple[str, int]]:
    """Every occurrence up to the current one for each live event (what a lossless consumer holds)."""
    from eventrouter.record import occurrence_number

    return {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}


async def test_each_sink_is_told_its_pipelines_send_timeout_and_longest_retry_wait(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Sinks that send a batch in several requests (Loki, the webhook, the robots) keep a send within
    a budget of the engine's send_timeout, and Loki holds a stream back for as long as the engine may
    wait to retry. They could not read either and assumed the defaults (30 s, 300 s)."""
    router = _router(_settings(api, tmp_path), send_timeout=12, retry_max_backoff=4)
    async with router.running():
        await _ready(router)
        context = _mem(router).context
    assert (context.send_timeout, context.retry_wait_max, context.send_budget) == (12, 40, 10)


async def _spooled_while_down(
    api: FakeApiServer, tmp_path: Path, data: Path, names: list[str], opts: dict[str, Any]
) -> None:
    """A router on ``data`` whose sink is down takes events of ``names`` into its spool, then stops."""
    down = _router(_settings(api, tmp_path, data_dir=data, shutdown_timeout=0.3), fail=True, **opts)
    async with down.running():
        await _ready(down)
        for name in names:
            api.create_event(event_object(object_name=name))
        await until(lambda: down.pipelines[0].depth == len(names))


async def test_recorded_traffic_through_the_api_server_yields_exactly_its_occurrences(
    api: FakeApiServer, tmp_path: Path
) -> None:
    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        await api.load_recording(recorded_watch())
        await _mem(router).wait_for(126)
        await asyncio.sleep(0.3)  # a few bookmarks' worth: nothing more may arrive
    keys = _mem(router).keys
    assert len(keys) == 126 and len(set(keys)) == 126


async def test_events_created_while_stopped_are_delivered_once_after_restart(
    api: FakeApiServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = [api.create_event(event_object(object_name=f"web-{i}")) for i in range(10)]
    router = _router(_settings(api, tmp_path, data_dir=data))
    async with router.running():
        await _mem(router).wait_for(10)
    delivered_first = collections.Counter(_mem(router).keys)
    # While the router is down: new events and repeats of old ones (count raised).
    for i in range(12):
        api.create_event(event_object(object_name=f"new-{i}"))
    for obj in first[:6]:
        api.bump(obj["metadata"]["namespace"], obj["metadata"]["name"])
        api.bump(obj["metadata"]["namespace"], obj["metadata"]["name"])
    router2 = _router(_settings(api, tmp_path, data_dir=data))
    async with router2.running():
        await _ready(router2)
        await _mem(router2).wait_for(18)
        await asyncio.sleep(0.3)
    second = collections.Counter(_mem(router2).keys)
    both = delivered_first + second
    # Lost = 0: the newest occurrence of every live event was delivered.
    assert _expected(api) <= set(both)
    # Duplicates = 0 after a clean stop.
    assert all(n == 1 for n in both.values()), [k for k, n in both.items() if n > 1]
    # The bumped events jumped 1 → 3: one record with the new count each.
    assert sorted(n for _, n in second if n > 1) == [3] * 6


async def test_after_a_restart_the_checkpoints_share_the_trackers_uid_strings(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Entries read from the checkpoint file are keyed on strings of their own: without re-keying,
    every live event's uid would be held twice (~100 bytes each) for as long as it lives."""
    data = tmp_path / "data"
    for i in range(5):
        api.create_event(event_object(object_name=f"web-{i}"))
    router = _router(_settings(api, tmp_path, data_dir=data))
    async with router.running():
        await _mem(router).wait_for(5)
    router2 = _router(_settings(api, tmp_path, data_dir=data))
    async with router2.running():
        await _ready(router2)
        await until(lambda: router2._keys_shared)
        tracker = router2.watchers[0].tracker
        table = router2.pipelines[0].checkpoint.table
        keyed_on = {uid: uid for uid in table.entries}
        assert len(tracker.seen) == 5 and len(keyed_on) == 5
        assert all(keyed_on[uid] is uid for uid in tracker.seen)
        assert router2.pipelines[0].checkpoint.state == router.pipelines[0].checkpoint.state
    assert _mem(router2).keys == []  # nothing delivered again


async def test_a_410_relist_mid_stream_loses_and_duplicates_nothing(
    api: FakeApiServer, tmp_path: Path
) -> None:
    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        objs = [api.create_event(event_object(object_name=f"a-{i}")) for i in range(20)]
        await _mem(router).wait_for(20)
        # Cut the watch, change things unseen, compact history: the reconnect gets 410 and must relist.
        _cut_watches(api)
        for o in objs[:5]:
            api.bump(o["metadata"]["namespace"], o["metadata"]["name"])
        for i in range(10):
            api.create_event(event_object(object_name=f"b-{i}"))
        api.compact()
        await _mem(router).wait_for(35)
        for i in range(5):
            api.create_event(event_object(object_name=f"c-{i}"))
        await _mem(router).wait_for(40)
        await asyncio.sleep(0.3)
    got = collections.Counter(_mem(router).keys)
    assert _expected(api) <= set(got)
    assert all(n == 1 for n in got.values())
    assert router.metrics.relists.labels("expired")._value.get() >= 1


async def test_watch_closing_at_once_triggers_a_relist(api: FakeApiServer, tmp_path: Path) -> None:
    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        api.faults.empty_next_watch()
        _cut_watches(api)
        api.create_event(event_object())
        await _mem(router).wait_for(1)
        await until(lambda: router.metrics.relists.labels("expired")._value.get() >= 1)


async def test_a_watch_cut_mid_stream_goes_on_from_the_last_line_it_handled_so_a_deleted_event_is_not_sent_again(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Resumed from where the broken watch started, the stream replays an event already deleted:
    its uid forgotten and its checkpoint entries pruned, it looked new and was delivered twice."""
    api.bookmark_interval = 3600  # bookmarks would count as lines of the cut watch
    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        api.faults.cut_next_watch(after_lines=3, mid_object=True)
        _cut_watches(api)
        mem = _mem(router)
        gone = api.create_event(event_object(object_name="ci-pod"))  # line 1
        await mem.wait_for(1)
        await router.pipelines[0].wait_idle(10)
        api.delete_event(
            gone["metadata"]["namespace"], gone["metadata"]["name"]
        )  # line 2: its namespace went
        await until(lambda: gone["metadata"]["uid"] not in router._tracked())
        api.create_event(event_object(object_name="b"))  # line 3
        api.create_event(event_object(object_name="c"))  # line 4, cut in half
        await mem.wait_for(3)
        watches = [r.query["resourceVersion"] for r in api.requests if r.query.get("watch") == "true"]
        # From a line it handled: at least the ADDED that was delivered (a reset may discard lines
        # the kernel had received but the router had not read yet).
        assert int(watches[-1]) >= int(gone["metadata"]["resourceVersion"]) > int(watches[0])
        await router.pipelines[0].wait_idle(10)
    assert sorted(collections.Counter(mem.keys).values()) == [1, 1, 1]


async def test_list_items_whose_metadata_is_not_an_object_are_counted_and_the_list_goes_on(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A broken proxy's list page: the same objects in a watch stream were dropped and counted; in a
    list they raised AttributeError, the watch task crashed and the router stopped."""
    for i in range(3):
        api.create_event(event_object(object_name=f"kept-{i}"))
    api.faults.malformed_next_list({"metadata": "oops", "reason": "x"}, {"metadata": ["a"]}, 17)
    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        await _mem(router).wait_for(3)
        api.create_event(event_object(object_name="after"))
        await _mem(router).wait_for(4)
    assert api.faults.applied == ["list_item"] and api.faults.pending == 0
    assert router.metrics.source_dropped.labels("malformed")._value.get() == 3
    assert router.metrics.relists.labels("initial")._value.get() == 1  # listed once: it did not fail


async def test_a_task_that_crashes_stops_the_router_with_exit_code_1(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A bug must end in a restart under any restart policy: it exited 0 before (on-failure: down)."""

    async def broken() -> None:
        raise RuntimeError("a bug")

    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        router._guard(broken(), "broken")
        await until(lambda: router._stopping)
    assert router.exit_code == 1


async def test_leftovers_of_a_clean_stop_go_before_the_spool_so_an_older_occurrence_is_not_skipped(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A SIGTERM while the sink is down and spilling: the memory queue is older than the spool.
    Appended after it, an event's newer occurrence (spooled) was delivered first after the restart,
    and the checkpoint then skipped the older one as a copy: lost, counted only as `skipped`."""
    data = tmp_path / "data"
    opts = {"queue_max_events": 10, "batch_max_events": 5}
    down = _router(_settings(api, tmp_path, data_dir=data, shutdown_timeout=0.3), fail=True, **opts)
    async with down.running():
        await _ready(down)
        a = api.create_event(event_object(name="ev-a", object_name="a"))  # a/1: in memory
        for i in range(20):
            api.create_event(event_object(object_name=f"o{i}"))  # the queue fills, then it spills
        await until(lambda: down.pipelines[0].depth == 21)
        api.bump("default", "ev-a")  # a/2: spooled, behind a/1
        for i in range(10):
            api.create_event(event_object(object_name=f"late{i}"))  # spooled behind a/2
        await until(lambda: down.pipelines[0].depth == 32)
    up = _router(_settings(api, tmp_path, data_dir=data), **opts)
    async with up.running():
        await _ready(up)
        await up.pipelines[0].wait_idle(10)
        keys = _mem(up).keys
    uid = a["metadata"]["uid"]
    assert [n for u, n in keys if u == uid] == [1, 2]
    assert len(keys) == 32 and len(set(keys)) == 32  # (the relist's copies are skipped as such)


async def test_the_first_list_waits_for_a_sink_still_starting_so_its_queue_does_not_overflow(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Without a spool a relist is paced by the sinks' queues; a sink still starting (a Kafka
    bootstrap) took nothing, so 900 of 1,000 retained events were dropped from its queue of 100."""

    class SlowStart(MemorySink):
        async def start(self) -> None:
            await asyncio.sleep(1.0)
            await super().start()

    for i in range(300):
        api.create_event(event_object(object_name=f"kept-{i}"))
    spec = spec_for_class(
        SlowStart, {"name": "mem", "batch_max_wait": 0.01, "queue_max_events": 50}, type_="memory"
    )
    router = Router(_settings(api, tmp_path), [spec])
    async with router.running():
        await _mem(router).wait_for(300)
    assert router.metrics.dropped.labels("mem", "queue_full")._value.get() == 0


async def test_a_stop_while_the_first_list_waits_for_a_starting_sink_returns_and_starts_no_watch(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A SIGTERM while a sink's first start is still in progress (a Kafka bootstrap): the stop's
    deadline cancelled the start, the first list waited for it for ever and the process did not exit;
    and had the start ended, the watch the first list then started ran on after the router stopped."""
    release = asyncio.Event()

    class Starting(MemorySink):
        async def start(self) -> None:
            await release.wait()
            await super().start()

    api.create_event(event_object())
    spec = spec_for_class(Starting, {"name": "mem", "batch_max_wait": 0.01}, type_="memory")
    router = Router(_settings(api, tmp_path, shutdown_timeout=0.2), [spec])
    await router.start_pipelines()
    source = asyncio.create_task(router.start_source())
    await until(lambda: router.kube is not None)
    await router.stop()
    release.set()
    await asyncio.wait_for(source, 5)
    assert router.watchers == [] and not any(t.get_name().startswith("watch:") for t in router._tasks)
    assert api.count_requests() == 0  # no list, no watch


async def test_a_quiet_watch_without_bookmarks_stays_healthy(api: FakeApiServer, tmp_path: Path) -> None:
    """No events and no bookmarks (an API server without the watch cache): each watch ends at its
    timeout and is opened again. That is progress; /healthz failed and the pod was restarted."""
    api.bookmark_interval = 3600
    # Shorter than watch_timeout + 40 s: the test server ends each watch on time.
    router = _router(
        _settings(api, tmp_path, watch_timeout=1, stall_timeout=2.5, allow_short_stall_timeout=True)
    )
    async with router.running():
        await _ready(router)
        verdicts: list[bool] = []

        def watched_past_the_stall_timeout() -> bool:
            verdicts.append(router.healthy()[0])
            return bool(router.metrics.watch_restarts.labels("timeout")._value.get() >= 4)

        await until(watched_past_the_stall_timeout, timeout=15, interval=0.1)
    assert all(verdicts), router.healthy()


async def test_without_a_watch_cache_a_quiet_spell_past_compaction_relists_and_delivers_nothing_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kube-apiserver 1.24 serves Events from etcd: no bookmarks, and its compactor forgets the
    history every few minutes. On a quiet cluster the watch's resourceVersion falls behind it, the
    next watch gets 410 and the router relists: routine, so logged at INFO, and nothing is sent twice."""
    caplog.set_level(logging.INFO, logger="eventrouter.source.watcher")
    async with FakeApiServer(token="secret-token", watch_cache=False, compaction_interval=0.1) as api:
        router = _router(_settings(api, tmp_path, watch_timeout=1))
        async with router.running():
            await _ready(router)
            objs = [api.create_event(event_object(object_name=f"a-{i}")) for i in range(10)]
            await _mem(router).wait_for(10)
            # No Event changes, but other writes move etcd's revision (node leases do, every 10 s).
            quiet_from = api.resource_version
            api.create_object("configmaps", {"metadata": {"name": "lease-like", "namespace": "default"}})
            await api.wait_until(lambda: api.oldest_resource_version > quiet_from, timeout=5)
            await until(lambda: router.metrics.relists.labels("expired")._value.get() >= 1, timeout=10)
            api.bump(objs[0]["metadata"]["namespace"], objs[0]["metadata"]["name"])
            api.create_event(event_object(object_name="after"))
            await _mem(router).wait_for(12)
        got = collections.Counter(_mem(router).keys)
        assert set(got) == _expected(api) | {(o["metadata"]["uid"], 1) for o in objs}
        assert all(n == 1 for n in got.values()), got
        expired = [r for r in caplog.records if "resourceVersion expired" in r.getMessage()]
        assert expired and expired[0].levelno == logging.INFO
        assert "The resourceVersion for the provided watch is too old." in expired[0].getMessage()


async def test_a_huge_retry_after_from_the_api_server_waits_no_longer_than_the_longest_backoff(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A proxy's "Retry-After: 86400" on a 429 stopped the watch for a day (until a liveness restart)."""
    router = _router(_settings(api, tmp_path))  # backoff_max 0.5 s
    api.faults.fail_next(429, retry_after=86400)
    async with router.running():
        api.create_event(event_object())
        await _mem(router).wait_for(1, timeout=10)
    assert router.metrics.watch_restarts.labels("http_429")._value.get() == 1


async def test_malformed_watch_lines_are_counted_and_skipped(api: FakeApiServer, tmp_path: Path) -> None:
    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        api.faults.malformed_next_watch_line()
        _cut_watches(api)
        for i in range(3):
            api.create_event(event_object(object_name=f"m-{i}"))
        await _mem(router).wait_for(3)
    assert router.metrics.source_dropped.labels("malformed_line")._value.get() >= 1


async def test_a_hostile_time_does_not_stop_the_stream(api: FakeApiServer, tmp_path: Path) -> None:
    # "²" passes str.isdigit: this time once raised ValueError from normalise, the watch broke, and
    # every reconnect replayed the same object: nothing after it was delivered.
    router = _router(_settings(api, tmp_path))
    async with router.running():
        await _ready(router)
        hostile = api.create_event(event_object(object_name="odd", last_timestamp="2026-11-22T01:29:03.²Z"))
        for i in range(3):
            api.create_event(event_object(object_name=f"after-{i}"))
        await _mem(router).wait_for(4)
        got = {occ.uid: occ for occ in _mem(router).received}
        # lastTimestamp does not parse: the time chain goes on to firstTimestamp.
        assert got[hostile["metadata"]["uid"]].time_ns == parse_time_ns(hostile["firstTimestamp"])


async def test_an_object_the_source_cannot_handle_is_dropped_counted_and_the_stream_goes_on(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Whatever normalise did not foresee: one object is dropped (counted, logged), not the stream.
    from eventrouter.metrics import Metrics
    from eventrouter.source.kube import connect
    from eventrouter.source.tracker import OccurrenceTracker
    from eventrouter.source.watcher import EventWatcher

    class Unforeseen(OccurrenceTracker):
        def observe(self, obj: Any, *, received_at: float | None = None) -> Occurrence | None:
            if obj["involvedObject"]["name"] == "bad":
                raise OverflowError("unforeseen")
            return super().observe(obj, received_at=received_at)

    kube = await connect(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")))
    published: list[Occurrence] = []
    metrics = Metrics()
    watcher = EventWatcher(
        kube,
        namespace=None,
        tracker=Unforeseen(),
        publish=published.append,
        forget=lambda uids: None,
        listed=lambda ns: None,
        metrics=metrics,
        settings=WatchSettings(backoff_initial=0.01),
    )
    caplog.set_level(logging.WARNING)
    task = asyncio.create_task(watcher.run())
    try:
        await watcher.initial_list_done.wait()
        for name in ("before", "bad", "after"):
            api.create_event(event_object(object_name=name))
        await until(lambda: len(published) == 2)
        assert [o.record["involved_object"]["name"] for o in published] == ["before", "after"]
        assert metrics.source_dropped.labels("malformed")._value.get() == 1
        assert metrics.watch_restarts.labels("connection")._value.get() == 0
        assert "OverflowError: unforeseen" in caplog.text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await kube.close()


async def test_a_sink_behind_the_ttl_does_not_grow_the_checkpoint_with_deleted_events(
    api: FakeApiServer, tmp_path: Path
) -> None:
    # The slow sink accepts occurrences of events already deleted (their DELETED cleared the entries
    # before it got to them): the periodic prune must drop those entries, and only those.
    fast = spec_for_class(MemorySink, {"name": "fast", "batch_max_wait": 0.02}, type_="memory")
    slow = spec_for_class(MemorySink, {"name": "slow", "batch_max_wait": 0.02}, type_="memory")
    router = Router(_settings(api, tmp_path, checkpoint_prune_interval=0.1), [fast, slow])
    async with router.running(watch=False):
        behind = router.sinks["slow"]
        assert isinstance(behind, MemorySink)
        behind.blocked = asyncio.Event()
        await router.start_source()
        await _ready(router)
        doomed = [api.create_event(event_object(object_name=f"gone-{i}")) for i in range(20)]
        kept = [api.create_event(event_object(object_name=f"kept-{i}")) for i in range(5)]
        fast_sink = router.sinks["fast"]
        assert isinstance(fast_sink, MemorySink)
        await fast_sink.wait_for(25)
        for obj in doomed:
            api.delete_event(obj["metadata"]["namespace"], obj["metadata"]["name"])
        table = router.pipelines[0].checkpoint.table
        gone = {obj["metadata"]["uid"] for obj in doomed}
        await until(lambda: not gone & table.entries.keys())  # the DELETEDs arrived
        behind.blocked.set()
        await behind.wait_for(25)
        await router.pipelines[1].wait_idle()  # its accepts are in the checkpoint now
        await until(lambda: not gone & table.entries.keys())  # pruned again after the late accepts
        assert {obj["metadata"]["uid"] for obj in kept} <= table.entries.keys()
        assert all(table.entries[obj["metadata"]["uid"]] == 1 for obj in kept)


async def test_wrong_token_is_reported_and_the_router_keeps_trying(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(api, tmp_path)
    kubeconfig = Path(settings.kubeconfig or "")
    kubeconfig.write_text(kubeconfig.read_text().replace("secret-token", "wrong-token"))
    router = _router(settings)
    caplog.set_level(logging.WARNING)
    async with router.running():
        await until(lambda: router.metrics.watch_restarts.labels("http_401")._value.get() >= 1)
        assert not router.ready()[0]
    assert "401" in caplog.text and "wrong-token" not in caplog.text


async def test_health_ready_and_metrics_endpoints(api: FakeApiServer, tmp_path: Path) -> None:
    settings = _settings(api, tmp_path, metrics_addr="127.0.0.1:0")
    settings.stall_timeout = 1.0  # the test server's bookmarks every 0.2 s are progress
    settings.allow_short_stall_timeout = True
    router = _router(settings)
    async with router.running(), aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{router.http_port}"
        await _ready(router)
        api.create_event(event_object())
        await _mem(router).wait_for(1)
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/metrics") as r:
            text = await r.text()
        assert 'eventrouter_sink_delivered_total{sink="mem"} 1.0' in text
        assert "eventrouter_relists_total" in text and "eventrouter_sink_queue_depth" in text
        # Loss counters exist at 0 before the first loss: increase() in an alert sees that one too.
        for family, reasons in (
            ("eventrouter_sink_dropped_total", SINK_DROP_REASONS),
            ("eventrouter_sink_dead_lettered_total", DEAD_LETTER_REASONS),
        ):
            for reason in reasons:
                assert f'{family}{{reason="{reason}",sink="mem"}} 0.0' in text, (family, reason)
        for reason in ("malformed", "malformed_line", "unknown_watch_type"):
            assert f'eventrouter_source_dropped_total{{reason="{reason}"}} 0.0' in text
        assert 'eventrouter_source_repaired_total{reason="invalid_unicode"} 0.0' in text
        # A watch that makes no progress (no events, no bookmarks) fails /healthz.
        api.bookmark_interval = 3600
        api.faults.stall_next_watch(30)
        _cut_watches(api)
        async with asyncio.timeout(10):
            while True:
                async with http.get(base + "/healthz") as r:
                    if r.status == 503:
                        assert "no progress" in await r.text()
                        break
                await asyncio.sleep(0.1)


async def test_a_scrape_shows_the_source_counters_of_a_watch_still_open(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Without bookmarks (1.24's default for Events) the watcher's counts reached /metrics only when
    its stream ended, up to 290 s later: the source and sink counters did not balance."""
    api.bookmark_interval = 3600
    router = _router(_settings(api, tmp_path, metrics_addr="127.0.0.1:0"))
    async with router.running(), aiohttp.ClientSession() as http:
        await _ready(router)
        for i in range(20):
            api.create_event(event_object(object_name=f"s-{i}"))
        await _mem(router).wait_for(20)
        async with http.get(f"http://127.0.0.1:{router.http_port}/metrics") as r:
            text = await r.text()
    assert "eventrouter_occurrences_total 20.0" in text
    assert 'eventrouter_watch_events_total{type="ADDED"} 20.0' in text
    assert "eventrouter_tracked_events 20.0" in text


async def test_the_watch_progress_gauge_is_not_0_while_the_first_list_waits_for_a_sink(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """0 fired EventrouterWatchStalled at every start with a sink slow to start, /healthz being 200."""
    release = asyncio.Event()

    class Starting(MemorySink):
        async def start(self) -> None:
            await release.wait()
            await super().start()

    spec = spec_for_class(Starting, {"name": "mem"}, type_="memory")
    router = Router(_settings(api, tmp_path, metrics_addr="127.0.0.1:0"), [spec])
    await router.start_pipelines()  # with its /metrics
    source = asyncio.create_task(router.start_source())
    try:
        await until(lambda: router.kube is not None)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{router.http_port}/metrics") as r,
        ):
            text = await r.text()
        [line] = [
            x for x in text.splitlines() if x.startswith("eventrouter_watch_last_progress_timestamp_seconds ")
        ]
        assert abs(float(line.split()[1]) - time.time()) < 60
    finally:
        release.set()
        await source
        await router.stop()


async def test_readiness_is_off_while_draining_and_undelivered_items_are_counted(
    api: FakeApiServer, tmp_path: Path
) -> None:
    settings = _settings(api, tmp_path, shutdown_timeout=0.5)
    router = _router(settings)
    await router.start_pipelines()
    await router.start_source()
    await _ready(router)
    _mem(router).blocked = asyncio.Event()  # the destination hangs
    for i in range(3):
        api.create_event(event_object(object_name=f"d-{i}"))
    await until(lambda: router.pipelines[0].depth == 3)
    stopping = asyncio.create_task(router.stop())
    await until(lambda: router.draining)
    assert router.ready() == (False, "draining")
    await stopping
    # Without --data-dir the undelivered ones are counted (they come back from the API server on restart).
    assert router.metrics.dropped.labels("mem", "shutdown")._value.get() == 3


@pytest.mark.parametrize("namespaces", [[], ["shop", "payments"]])
async def test_checkpoints_of_events_gone_while_stopped_are_pruned_once_every_namespace_is_listed(
    api: FakeApiServer, tmp_path: Path, namespaces: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A watch scoped to namespaces keeps entries it does not see for a while (tests/test_scope.py):
    # here, none, so that the prune itself is what is tested.
    monkeypatch.setattr("eventrouter.fanout.UNSEEN_KEEP", 0.0)
    data = tmp_path / "data"
    made = [
        api.create_event(event_object(namespace=ns, object_name=f"{ns}-pod")) for ns in ("shop", "payments")
    ]
    gone = api.create_event(event_object(namespace="shop", object_name="gone-pod"))
    router = _router(_settings(api, tmp_path, data_dir=data, namespaces=namespaces))
    async with router.running():
        await _mem(router).wait_for(3)
        await until(lambda: len(router.pipelines[0].checkpoint.table.entries) == 3)
    api.delete_event("shop", gone["metadata"]["name"])  # while stopped: no DELETED is ever seen
    router2 = _router(_settings(api, tmp_path, data_dir=data, namespaces=namespaces))
    async with router2.running():
        table = router2.pipelines[0].checkpoint.table
        await until(lambda: gone["metadata"]["uid"] not in table.entries)
        assert set(table.entries) == {obj["metadata"]["uid"] for obj in made}
    assert _mem(router2).received == []  # nothing re-delivered


async def test_chosen_namespaces_are_listed_and_watched_alone(api: FakeApiServer, tmp_path: Path) -> None:
    router = _router(_settings(api, tmp_path, namespaces=["shop", "payments"]))
    async with router.running():
        await _ready(router)
        for ns in ("shop", "payments", "default", "kube-system"):
            api.create_event(event_object(namespace=ns, object_name=f"{ns}-pod"))
        await _mem(router).wait_for(2)
        await asyncio.sleep(0.3)  # other namespaces would have arrived by now
    assert sorted(o.record["namespace"] for o in _mem(router).received) == ["payments", "shop"]
    paths = {r.path for r in api.requests if r.method == "GET"}
    assert {"/api/v1/namespaces/shop/events", "/api/v1/namespaces/payments/events"} <= paths
    assert "/api/v1/events" not in paths


async def test_server_side_timeouts_and_errors_reconnect_without_loss_or_duplicates(
    api: FakeApiServer, tmp_path: Path
) -> None:
    router = _router(_settings(api, tmp_path, watch_timeout=1))
    async with router.running():
        await _ready(router)
        for i in range(5):
            api.create_event(event_object(object_name=f"t-{i}"))
        # The server ends each watch after 1 s; then three answers fail with 500 before it recovers.
        await until(lambda: router.metrics.watch_restarts.labels("timeout")._value.get() >= 1)
        api.faults.fail_next(500, count=3)
        api.disconnect_watches()
        for i in range(5):
            api.create_event(event_object(object_name=f"u-{i}"))
        await _mem(router).wait_for(10)
        await until(lambda: router.metrics.watch_restarts.labels("http_500")._value.get() >= 1)
    got = collections.Counter(_mem(router).keys)
    assert _expected(api) <= set(got) and all(n == 1 for n in got.values())


def test_json_logs_are_structured(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from eventrouter.logs import setup_logging

    setup_logging("info", "json")
    try:
        logging.getLogger("eventrouter.test").warning(
            "sink %s rejected %d", "loki", 3, extra={"sink": "loki"}
        )
    finally:
        setup_logging("warning", "text")
    doc = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert doc["level"] == "warning" and doc["msg"] == "sink loki rejected 3" and doc["sink"] == "loki"


async def test_a_large_relist_waits_for_slow_sinks_instead_of_dropping(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """1,000 retained events, a memory queue of 100 and a slow destination: the list is paged at the
    sinks' pace, so nothing is dropped and memory holds about one page."""
    for i in range(1000):
        api.create_event(event_object(object_name=f"r-{i}"))
    router = _router(_settings(api, tmp_path), queue_max_events=100, batch_max_events=20)
    await router.start_pipelines()
    _mem(router).delay = 0.01
    await router.start_source()
    try:
        await _mem(router).wait_for(1000, timeout=60)
        assert router.metrics.dropped.labels("mem", "queue_full")._value.get() == 0
        assert api.count_requests(watch=False) >= 1000 // 50  # pages of half the queue
        assert len(set(_mem(router).keys)) == 1000
    finally:
        await router.stop()


async def test_with_a_disk_spool_a_slow_sink_does_not_hold_up_a_relist_for_the_others(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Without a spool a relist waits for the slowest working sink (above); with one, it waits for
    that sink INTAKE_PATIENCE seconds at most, then the sink's overflow goes to disk and the other
    sinks get the rest of the list at once. Nothing is dropped."""
    for i in range(1000):
        api.create_event(event_object(object_name=f"r-{i}"))
    opts = {"batch_max_wait": 0.02, "queue_max_events": 100, "batch_max_events": 20}
    fast = spec_for_class(MemorySink, {"name": "fast", **opts}, type_="memory")
    # A working sink (its send never times out), only slow: without a spool it would pace the relist.
    slow = spec_for_class(MemorySink, {"name": "slow", "send_timeout": 600, **opts}, type_="memory")
    settings = _settings(api, tmp_path, data_dir=tmp_path / "data", metrics_addr="127.0.0.1:0")
    router = Router(settings, [fast, slow])
    await router.start_pipelines()
    fast_sink, slow_sink = router.sinks["fast"], router.sinks["slow"]
    assert isinstance(fast_sink, MemorySink) and isinstance(slow_sink, MemorySink)
    slow_sink.blocked = asyncio.Event()
    await router.start_source()
    try:
        # Well below the relist's 60 s wait for a backlogged sink without a spool.
        await fast_sink.wait_for(1000, timeout=20)
        assert len(slow_sink.keys) == 0
        spool = router.pipelines[1].spool
        assert spool is not None and len(spool) >= 1000 - 100 - 20
        # The gauges tell memory from disk: the queue within its bound, the rest in the spool.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{router.http_port}/metrics") as r,
        ):
            text = await r.text()
        queued = float(text.split('eventrouter_sink_queue_depth{sink="slow"} ')[1].split()[0])
        spooled = float(text.split('eventrouter_sink_spool_depth{sink="slow"} ')[1].split()[0])
        assert queued <= 100 and spooled == len(spool)
        assert router.metrics.spilled.labels("slow")._value.get() >= spooled
        assert router.metrics.spilled.labels("fast")._value.get() == 0
        slow_sink.delay = 0.05  # ~2.5 s to catch up: still behind when the first trim comes (≤ 1 s)
        slow_sink.blocked.set()
        await slow_sink.wait_for(1000, timeout=60)
        assert len(set(fast_sink.keys)) == len(set(slow_sink.keys)) == 1000
        # Once the spool and then the memory queues have drained, the memory is given back again
        # (the first time was when the memory queues came down to half).
        await until(lambda: router.memory_trims >= 2, timeout=40)
        for name in ("fast", "slow"):
            for reason in ("queue_full", "spool_full"):
                assert router.metrics.dropped.labels(name, reason)._value.get() == 0
    finally:
        await router.stop()


async def test_a_sink_that_stays_down_does_not_hold_off_the_trims_after_a_relist(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Its memory queue stays full and its spool grows: waiting for them to drain would keep what
    the relist put in the caches for as long as the sink is down."""
    from eventrouter.memory import BoundedCache

    for i in range(300):
        api.create_event(event_object(object_name=f"r-{i}"))
    opts = {"batch_max_wait": 0.02, "queue_max_events": 100, "batch_max_events": 20}
    up = spec_for_class(MemorySink, {"name": "up", **opts}, type_="memory")
    down = spec_for_class(MemorySink, {"name": "down", "send_timeout": 600, **opts}, type_="memory")
    router = Router(
        _settings(api, tmp_path, data_dir=tmp_path / "data", memory_trim_interval=3600), [up, down]
    )
    router.burst_trim_patience = 0.5
    await router.start_pipelines()
    up_sink, down_sink = router.sinks["up"], router.sinks["down"]
    assert isinstance(up_sink, MemorySink) and isinstance(down_sink, MemorySink)
    down_sink.blocked = asyncio.Event()  # never set: every send hangs
    filled: BoundedCache[str, str] = BoundedCache(100)
    filled.put("from", "the relist")
    await router.start_source()
    try:
        await up_sink.wait_for(300, timeout=30)
        await until(lambda: router.memory_trims >= 2, timeout=30)  # both trims after the relist
        assert not filled and router.cache_entries_cleared > 0
        assert len(down_sink.keys) == 0 and router.pipelines[1].depth > 100  # still down, nothing lost
    finally:
        await router.stop()


async def test_the_trim_after_a_relist_waits_for_a_sink_that_is_catching_up(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """The other side of the patience: a backlog that keeps coming down is waited for, however long,
    so the second trim comes once the slow sink has everything (and frees what it decoded)."""
    for i in range(120):
        api.create_event(event_object(object_name=f"r-{i}"))
    router = _router(
        _settings(api, tmp_path, memory_trim_interval=3600), queue_max_events=100, batch_max_events=20
    )
    router.burst_trim_patience = 2.0  # the catch-up below takes ~5 s: more than twice this
    backlog_at_trim: list[int] = []
    trim = router._trim

    def recording_trim(*, caches: bool = False) -> None:
        backlog_at_trim.append(sum(p.depth for p in router.pipelines))
        trim(caches=caches)

    router._trim = recording_trim  # type: ignore[method-assign]
    await router.start_pipelines()
    _mem(router).delay = 1.0  # one batch of 20 a second
    await router.start_source()
    try:
        await _mem(router).wait_for(120, timeout=60)
        await until(lambda: len(backlog_at_trim) >= 2, timeout=30)
        assert backlog_at_trim[1] == 0, backlog_at_trim  # not after 2 s of patience, at ~60 still queued
    finally:
        await router.stop()


async def test_with_a_disk_spool_a_relist_still_waits_for_sinks_that_keep_up(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """The spool is for sinks slower than the relist: two sinks that keep up get it at their pace
    from memory, and nothing is written to disk (spilling costs CPU per item)."""
    for i in range(1000):
        api.create_event(event_object(object_name=f"r-{i}"))
    opts = {"batch_max_wait": 0.02, "queue_max_events": 100, "batch_max_events": 20}
    specs = [spec_for_class(MemorySink, {"name": n, **opts}, type_="memory") for n in ("a", "b")]
    router = Router(_settings(api, tmp_path, data_dir=tmp_path / "data"), specs)
    await router.start_pipelines()
    for name in ("a", "b"):
        sink = router.sinks[name]
        assert isinstance(sink, MemorySink)
        sink.delay = 0.001
    await router.start_source()
    try:
        for name in ("a", "b"):
            sink = router.sinks[name]
            assert isinstance(sink, MemorySink)
            await sink.wait_for(1000, timeout=60)
            assert len(set(sink.keys)) == 1000
            assert router.metrics.spilled.labels(name)._value.get() == 0
    finally:
        await router.stop()


async def test_freed_memory_is_returned_after_a_relist_and_periodically(
    api: FakeApiServer, tmp_path: Path
) -> None:
    router = _router(_settings(api, tmp_path, memory_trim_interval=0.05))
    async with router.running():
        await _ready(router)
        await until(lambda: router.memory_trims >= 3)


async def test_encoding_caches_are_emptied_after_a_relist(api: FakeApiServer, tmp_path: Path) -> None:
    """What a relist put in the caches (every value it saw) would otherwise stay, with its heap."""
    from eventrouter.memory import BoundedCache

    for i in range(50):
        api.create_event(event_object(object_name=f"web-{i}"))
    filled: BoundedCache[str, str] = BoundedCache(100)
    filled.put("from", "the relist")
    router = _router(_settings(api, tmp_path, memory_trim_interval=3600))
    async with router.running():
        await _mem(router).wait_for(50)
        await until(lambda: router.cache_entries_cleared > 0)
        assert not filled
        # The periodic trim leaves them alone: in steady state they are what makes encoding cheap.
        filled.put("steady", "state")
        router._trim()
        assert filled == {"steady": "state"}


def test_a_bounded_cache_empties_itself_when_full_and_on_clear_caches() -> None:
    from eventrouter.memory import BoundedCache, clear_caches

    cache: BoundedCache[int, str] = BoundedCache(2)
    assert cache.put(1, "a") == "a"
    cache.put(2, "b")
    cache.put(3, "c")  # full: emptied first, never more than maxsize entries
    assert cache == {3: "c"}
    other: BoundedCache[int, str] = BoundedCache(5)
    other.put(1, "x")
    assert clear_caches() >= 2
    assert not cache and not other
    del cache, other
    clear_caches()  # collected caches are dropped from the registry, not an error


def test_freed_memory_can_be_returned_to_the_os() -> None:
    import platform

    from eventrouter.memory import release_free_memory

    blob = [bytes(1000) for _ in range(50_000)]
    del blob
    assert release_free_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_a_data_dir_budget_bounds_every_sinks_spool_and_dead_letters_to_fit_it(tmp_path: Path) -> None:
    from eventrouter.app import DISK_RESERVE, disk_bounds
    from eventrouter.engine.deadletter import DEADLETTER_MAX

    specs = [
        spec_for_class(MemorySink, {"name": "a"}, type_="memory"),
        spec_for_class(MemorySink, {"name": "b", "spool_max_bytes": 10 * 2**20}, type_="memory"),
        spec_for_class(MemorySink, {"name": "c"}, type_="memory"),
    ]
    budget = 2**30  # the chart's default emptyDir sizeLimit
    router = Router(RouterSettings(data_dir=tmp_path, data_dir_max_bytes=budget, metrics_addr=None), specs)
    router._build()
    used = {
        p.name: (p.spool.max_bytes if p.spool is not None else 0, p.deadletter.max_bytes)
        for p in router.pipelines
    }
    assert used == disk_bounds(specs, budget)
    # Every sink's spool and both its dead-letter files fit the volume with the reserve left over.
    assert sum(spool + 2 * dead for spool, dead in used.values()) <= budget * (1 - DISK_RESERVE)
    share = int(budget * (1 - DISK_RESERVE)) // 3
    assert used["a"] == (share - 2 * (share // 8), share // 8)
    assert used["b"] == (10 * 2**20, share // 8)  # a smaller configured spool stays
    # Without a budget, the configured bounds.
    plain = Router(RouterSettings(data_dir=tmp_path / "p", metrics_addr=None), specs)
    plain._build()
    assert [
        (p.spool.max_bytes if p.spool is not None else 0, p.deadletter.max_bytes) for p in plain.pipelines
    ] == [
        (256 * 2**20, DEADLETTER_MAX),
        (10 * 2**20, DEADLETTER_MAX),
        (256 * 2**20, DEADLETTER_MAX),
    ]


async def test_dead_letters_stay_within_their_share_of_the_data_dir_and_what_a_rotation_discards_is_counted(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A batch of dead letters larger than the file bound rotated the file at every write: both
    files held a whole batch each, far over their share of the volume (item 14), and the letters a
    rotation discarded were logged in bytes only, never counted."""
    data = tmp_path / "data"
    for i in range(60):  # ~4 KiB a dead letter: a batch of 20 is 4 times the bound below
        api.create_event(event_object(object_name=f"o{i}", message="x" * 1500))
    settings = _settings(api, tmp_path, data_dir=data, data_dir_max_bytes=200_000)
    discarded = 0.0
    for run, new in enumerate((60, 30)):  # and a restart, which finds the files of the first run
        for i in range(30 if run else 0):
            api.create_event(event_object(object_name=f"later-{i}", message="x" * 1500))
        router = _router(settings, batch_max_events=20, batch_max_wait=0.2)
        async with router.running(watch=False):
            _mem(router).decide = lambda occ: reject("HTTP 400 mapping error")
            await router.start_source()
            dead = router.metrics.dead_lettered.labels("mem", "rejected")
            await until(lambda: dead._value.get() == new)  # noqa: B023 - awaited in this iteration
        discarded += router.metrics.dropped.labels("mem", "deadletter_rotated")._value.get()
    bound = router.pipelines[0].deadletter.max_bytes
    assert bound == 20_000
    files = [data / "deadletter" / "mem.jsonl", data / "deadletter" / "mem.jsonl.1"]
    lines = [line for f in files for line in f.read_bytes().splitlines()]
    assert all(f.stat().st_size <= bound for f in files)  # no single letter is over the bound here
    assert discarded > 0 and len(lines) + discarded == 90  # every dead letter on disk or counted


async def test_the_router_keeps_delivering_while_its_checkpoints_cannot_be_written(
    api: FakeApiServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the first ack after the disk filled raised out of the pipeline task, which stopped the
    router: every sink stopped delivering, and a restart crashed the same way (a crash loop)."""
    monkeypatch.setattr(SinkCheckpoint, "retry_interval", 0.2)  # 5 s in production
    data = tmp_path / "data"
    router = _router(_settings(api, tmp_path, data_dir=data))
    m = router.metrics
    async with router.running():
        sink = _mem(router)
        await _ready(router)
        for i in range(5):
            api.create_event(event_object(object_name=f"before-{i}"))
        await sink.wait_for(5)
        # The checkpoint folder becomes unwritable: a file where the folder was.
        shutil.rmtree(data / "checkpoints")
        (data / "checkpoints").write_text("not a folder")
        for i in range(10):
            api.create_event(event_object(object_name=f"during-{i}"))
        await sink.wait_for(15)
        assert router.ready()[0]
        assert m.checkpoint_durable.labels("mem")._value.get() == 0
        assert m.data_dir_errors.labels("mem", "checkpoint")._value.get() >= 1
        assert "cannot be written" in caplog.text
        # The disk works again: the periodic retry persists everything, also without new acks.
        (data / "checkpoints").unlink()
        (data / "checkpoints").mkdir()
        await until(lambda: m.checkpoint_durable.labels("mem")._value.get() == 1, timeout=15)
    second = _router(_settings(api, tmp_path, data_dir=data))
    async with second.running():
        await _ready(second)
        api.create_event(event_object(object_name="after"))
        await _mem(second).wait_for(1)
    both = collections.Counter(sink.keys + _mem(second).keys)
    assert _expected(api) <= set(both)  # lost = 0
    assert all(n == 1 for n in both.values()), [k for k, n in both.items() if n > 1]  # duplicates = 0


async def test_an_event_deleted_while_a_spool_backlog_drains_after_a_restart_is_not_delivered_twice(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """After a clean stop with a backlog in the spool, the relist spills a second copy of each
    occurrence behind the first. An event deleted (TTL) between its first copy's delivery and its
    second's cleared its checkpoint entry, so the second copy was sent again."""

    gate = Gate()  # the sink takes a batch only when the test allows one
    allow = gate.allow

    data = tmp_path / "data"
    opts = {"batch_max_wait": 0.02, "queue_max_events": 10, "batch_max_events": 5}
    await _spooled_while_down(api, tmp_path, data, [f"o{i}" for i in range(30)], opts)
    spec = spec_for_class(gated(gate), {"name": "mem", **opts}, type_="memory")
    up = Router(_settings(api, tmp_path, data_dir=data), [spec])
    async with up.running():
        await _ready(up)
        await until(
            lambda: up.metrics.skipped.labels("mem")._value.get() >= 30
        )  # the relist: each in the spool (item 123)
        await allow(1)
        sink = _mem(up)
        await sink.wait_for(5)
        first = sink.received[0]
        [gone] = [e["metadata"] for e in api.events() if e["metadata"]["uid"] == first.uid]
        api.delete_event(gone["namespace"], gone["name"])
        await until(lambda: first.uid not in up.watchers[0].tracker.seen)
        await allow(1000)
        await up.pipelines[0].wait_idle(30)
    got = collections.Counter(sink.keys)
    assert [k for k, n in got.items() if n > 1] == []
    assert len(got) == 30


async def test_occurrences_of_one_event_set_aside_at_a_stop_are_spooled_in_number_order(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """X/1 set aside (its index red) failed more often than X/2, so it waited longer: a clean stop
    spooled the leftovers in due-time order, X/2 before X/1. After the restart X/2 was accepted first
    and X/1 skipped as a copy: lost, counted nowhere, exit 0."""
    data = tmp_path / "data"
    opts = {"batch_max_wait": 0.01, "retry_initial_backoff": 1.0, "retry_max_backoff": 60.0}
    first = _router(_settings(api, tmp_path, data_dir=data, shutdown_timeout=1.0), **opts)
    async with first.running():
        await _ready(first)
        _mem(first).decide = lambda occ: retry("index red", defer=True)
        x = api.create_event(event_object(object_name="db-0", reason="BackOff"))
        uid = x["metadata"]["uid"]
        failures = first.pipelines[0]._failures
        await until(lambda: failures.get((uid, 1), 0) >= 3, timeout=30)
        api.bump("default", x["metadata"]["name"])  # X/2, due long before X/1
        await until(lambda: (uid, 2) in failures, timeout=10)
    assert first.exit_code == 0
    # One occurrence a batch: the two records fall into two batches, as among other records.
    second = _router(_settings(api, tmp_path, data_dir=data), **{**opts, "batch_max_events": 1})
    async with second.running():
        await _mem(second).wait_for(2)
    assert [n for u, n in _mem(second).keys if u == uid] == [1, 2]
    assert second.metrics.skipped.labels("mem")._value.get() == 0


async def test_copies_of_deleted_events_still_spooled_at_a_second_clean_stop_are_not_delivered_again(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Item 50 across one more clean stop. The relist after a restart offers again what the spool
    kept, once the spool's backlog has been read: the copies wait behind the newer events. The
    originals are delivered and their events deleted (TTL), and the drain deadline passes before the
    copies drain. What the pipeline accepted of the deleted events was kept in memory only, the stop
    wrote the checkpoint without it, and after the restart the copies were delivered a second time."""

    gate = Gate()  # the sink takes a batch only when the test allows one
    allow = gate.allow

    data = tmp_path / "data"
    opts = {"batch_max_wait": 0.02, "queue_max_events": 10, "batch_max_events": 5}
    # Listed last: names in key order.
    await _spooled_while_down(api, tmp_path, data, [f"z{i}" for i in range(5)], opts)
    for i in range(10):
        api.create_event(event_object(object_name=f"a{i}"))  # while the router is stopped
    spec = spec_for_class(gated(gate), {"name": "mem", **opts}, type_="memory")
    up = Router(_settings(api, tmp_path, data_dir=data, shutdown_timeout=0.5), [spec])
    async with up.running(watch=False):
        up.pipelines[0].intake_patience = 0.0  # the relist spills at once instead of waiting 5 s
        await up.start_source()
        await _ready(up)
        # The 5 spooled read back before the relist came, 10 new ones, and the relisted copies.
        await until(lambda: up.pipelines[0].depth == 20)
        await allow(1)
        sink = _mem(up)
        await sink.wait_for(5)
        first = sink.received[:5]
        assert sorted(occ.record["involved_object"]["name"] for occ in first) == [f"z{i}" for i in range(5)]
        for occ in first:
            [gone] = [e["metadata"] for e in api.events() if e["metadata"]["uid"] == occ.uid]
            api.delete_event(gone["namespace"], gone["name"])
        await until(lambda: all(occ.uid not in up.watchers[0].tracker.seen for occ in first))
        # A clean stop (a rolling update): the drain deadline passes with the copies still waiting.
    await allow(10**6)
    assert up.exit_code == 0
    again = _router(_settings(api, tmp_path, data_dir=data), **opts)
    async with again.running():
        await _ready(again)
        await again.pipelines[0].wait_idle(30)
    got = collections.Counter(sink.keys + _mem(again).keys)
    assert [k for k, n in got.items() if n > 1] == []
    assert len(got) == 15


async def test_a_stop_while_an_older_occurrence_waits_and_a_newer_one_was_accepted_delivers_each_once(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """X/2 refused (retried) and X/3 accepted in one batch when the drain deadline passes: X/2 is kept
    in the spool, owed, and the checkpoint records X/3. Before, the checkpoint stayed at X/1 for
    X/2's sake, and after the restart the relist sent X/3 a second time."""
    data = tmp_path / "data"
    obj = api.create_event(event_object(object_name="web"))
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    router = _router(_settings(api, tmp_path, data_dir=data, shutdown_timeout=0.3), batch_max_wait=0.5)

    def refuse_2(occ: Occurrence) -> Outcome:
        return retry("refused") if occ.number == 2 else OK

    async with router.running():
        sink = _mem(router)
        await sink.wait_for(1)
        sink.decide = refuse_2
        api.bump(ns, name)
        api.bump(ns, name)  # within the batch wait: X/2 and X/3 go together
        await sink.wait_for(2)
        assert sink.keys[1][1] == 3 and sink.batches[-1] == 2
        await until(lambda: router.metrics.retries.labels("mem")._value.get() >= 1)
    assert router.metrics.dropped.labels("mem", "shutdown")._value.get() == 0
    again = _router(_settings(api, tmp_path, data_dir=data))
    async with again.running():
        await _ready(again)
        await _mem(again).wait_for(1)
        await again.pipelines[0].wait_idle(10)
    got = collections.Counter(sink.keys + _mem(again).keys)
    assert got == {(obj["metadata"]["uid"], n): 1 for n in (1, 2, 3)}
    assert again.metrics.registry.get_sample_value("eventrouter_sink_skipped_total", {"sink": "mem"}) == 1


async def test_a_stop_whose_checkpoint_cannot_be_written_exits_1(api: FakeApiServer, tmp_path: Path) -> None:
    """The restart re-delivers what was accepted since the last write: the exit said 0 (clean)."""
    data = tmp_path / "data"
    router = _router(_settings(api, tmp_path, data_dir=data))
    async with router.running():
        await _ready(router)
        api.create_event(event_object())
        await _mem(router).wait_for(1)
        shutil.rmtree(data / "checkpoints")
        (data / "checkpoints").write_text("not a folder")
    assert router.exit_code == 1


async def test_a_stop_whose_spool_cannot_be_written_counts_what_it_could_not_keep_and_closes_every_sink(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """At stop, undelivered occurrences go to the spool. Before, a spool that could not be written
    raised out of the stop half way, and the other sinks' checkpoints were never written."""
    data = tmp_path / "data"
    down = spec_for_class(MemorySink, {"name": "down", "batch_max_wait": 0.02, "fail": True}, type_="memory")
    up = spec_for_class(MemorySink, {"name": "up", "batch_max_wait": 0.02}, type_="memory")
    router = Router(_settings(api, tmp_path, data_dir=data, shutdown_timeout=0.3), [down, up])
    m = router.metrics
    async with router.running():
        await _ready(router)
        for i in range(5):
            api.create_event(event_object(object_name=f"stop-{i}"))
        await router.sinks["up"].wait_for(5)
        await until(lambda: router.pipelines[0].depth == 5)  # the down sink holds them
        shutil.rmtree(data / "spool" / "down")
        (data / "spool" / "down").write_text("not a folder")  # its spool cannot be written now
    assert m.dropped.labels("down", "spool_error")._value.get() == 5
    assert m.data_dir_errors.labels("down", "spool")._value.get() == 1
    # The stop went on: the healthy sink's checkpoint was written, so a restart skips its five.
    assert len(FileCheckpoint(data / "checkpoints", "up").load()) == 5


async def test_a_new_leader_waits_for_the_data_dir_until_the_old_one_has_let_go(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas on one ReadWriteMany volume: the new leader's pipelines start only once the old
    leader (here: this test) has released the data dir's lock, which it does at the end of its drain."""
    from eventrouter.datalock import DataDirLock

    data = tmp_path / "data"
    data.mkdir()
    old_leader = DataDirLock(data)
    old_leader.acquire()
    router = _router(_settings(api, tmp_path, data_dir=data, leader_elect=True))
    starting = asyncio.create_task(router.start_pipelines())
    try:
        await until(lambda: "is in use by eventrouter pid" in caplog.text)
        assert not starting.done() and not router.pipelines
        old_leader.release()
        await asyncio.wait_for(starting, 5)
        assert router.pipelines and (data / "checkpoints").is_dir()
    finally:
        old_leader.release()
        if not starting.done():
            starting.cancel()
        await router.stop()
    assert "waiting for it before delivering" in caplog.text


async def test_a_spool_left_by_a_sink_no_longer_configured_is_counted_and_named_at_start(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink renamed or removed while its destination was down leaves occurrences in its spool that
    no configured sink will send: said at start, with a gauge an alert can read."""
    caplog.set_level(logging.INFO, logger="eventrouter")
    data = tmp_path / "data"
    for i in range(30):
        api.create_event(event_object(object_name=f"web-{i}"))
    down = Router(
        _settings(api, tmp_path, data_dir=data, shutdown_timeout=0.2),
        [spec_for_class(MemorySink, {"name": "es old", "fail": True, "queue_max_events": 5}, type_="memory")],
    )
    async with down.running():
        await until(lambda: len(down.pipelines[0].spool or []) >= 20)
    on_disk = sum(f.stat().st_size for f in (data / "spool" / "es_old").glob("*.seg"))
    # Dead letters of a removed sink are named too (once), an empty file or the sink's own are not.
    letters = data / "deadletter"
    letters.mkdir(exist_ok=True)
    (letters / "gone.jsonl").write_text('{"reason": "rejected"}\n')
    (letters / "empty.jsonl").touch()
    (letters / "mem.jsonl").write_text('{"reason": "rejected"}\n')
    volume = 64 * 2**20
    renamed = _router(_settings(api, tmp_path, data_dir=data, data_dir_max_bytes=volume))
    async with renamed.running():
        await _mem(renamed).wait_for(30)
        # The stranded spool keeps its room on the volume: the configured sink's share is smaller.
        spool = renamed.pipelines[0].spool
        assert spool is not None
        assert spool.max_bytes == disk_bounds(renamed.specs, volume - on_disk)["mem"][0]
        assert spool.max_bytes < disk_bounds(renamed.specs, volume)["mem"][0]
    stranded = renamed.metrics.registry.get_sample_value(
        "eventrouter_data_dir_orphaned_occurrences", {"sink": "es_old"}
    )
    assert stranded is not None and 20 <= stranded <= 30
    warning = next(r.getMessage() for r in caplog.records if "which is not configured" in r.getMessage())
    assert (
        f"the spool of sink 'es_old', which is not configured, holds {int(stranded)} occurrences" in warning
    )
    assert str(data / "spool" / "es_old") in warning
    assert "MiB of spools of sinks not configured" in caplog.text
    named = [r.getMessage() for r in caplog.records if "dead letters of sink" in r.getMessage()]
    assert named == [
        f"data dir: dead letters of sink 'gone', which is not configured, are in {letters / 'gone.jsonl'} "
        "(eventrouter replay can send them to another sink)"
    ]
