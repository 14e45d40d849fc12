"""Several --namespace values relisting at the same time (start-up, an API server outage) are handed on
in one time order within one memory budget (session 30 review of the source, findings 1 and 2)."""

from __future__ import annotations

import asyncio
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.metrics import Metrics
from eventrouter.record import Occurrence
from eventrouter.source.kube import connect
from eventrouter.source.relist_order import RelistOrder
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.source.watcher import EventWatcher, WatchSettings, shared_relists
from eventrouter.testing import MemorySink, event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.memory import Gate, gated
from eventrouter.testing.receivers.loki import KEEP_OLD_SAMPLES, LokiReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiSink

BASE = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)


def _at(seconds: float) -> str:
    return (BASE + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _interleaved(api: FakeApiServer, namespaces: list[str], each: int, *, step: float = 1.0) -> None:
    """``each`` events per namespace whose times interleave across the namespaces; in each namespace
    the names run opposite to the times (a key-order list is newest first)."""
    n = len(namespaces)
    for k, ns in enumerate(namespaces):
        for j in range(each):
            t = _at(step * (j * n + k))
            api.create_event(
                event_object(
                    namespace=ns,
                    name=f"ev-{each - j:05d}",
                    object_name=f"o{j}",
                    first_timestamp=t,
                    last_timestamp=t,
                )
            )


def _settings(api: FakeApiServer, tmp_path: Path, namespaces: list[str], **watch: Any) -> RouterSettings:
    return RouterSettings(
        cluster_name="t",
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        namespaces=namespaces,
        watch=WatchSettings(**{"watch_timeout": 30, "backoff_initial": 0.05, **watch}),
    )


class _Held:
    """The most occurrences the live relist orders held in memory at once (RelistOrder.add wrapped).
    No row is discarded in these runs: every occurrence in ``_held`` is one kept in memory."""

    def __init__(self) -> None:
        self.orders: weakref.WeakSet[RelistOrder] = weakref.WeakSet()
        self.peak = 0
        self.added = 0

    def wrap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = RelistOrder.add

        def add(order: RelistOrder, occ: Occurrence, *args: Any) -> None:
            self.orders.add(order)
            original(order, occ, *args)
            self.added += 1
            self.peak = max(self.peak, sum(len(o._held) for o in self.orders))

        monkeypatch.setattr(RelistOrder, "add", add)


def _in_time_order(received: list[Occurrence]) -> bool:
    times = [o.time_ns for o in received]
    return times == sorted(times)


async def test_fifty_namespaces_listing_at_start_up_hold_500_in_memory_and_hand_on_in_one_time_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 namespaces × 200 retained events and a sink that wants time order, held up while they list.
    Each watcher kept its own 500 in memory (here all 200): 10,000 held at once, and each namespace
    went on sorted on its own. One order for all now: at most 500 in memory, the rest in its
    temporary file, all 10,000 delivered once, oldest first across the namespaces."""
    held = _Held()
    held.wrap(monkeypatch)
    gate = Gate()

    class Ordered(gated(gate)):  # type: ignore[misc]  # a class made at run time
        wants_time_order = True

    namespaces = [f"ns{i:02d}" for i in range(50)]
    async with FakeApiServer() as api:
        _interleaved(api, namespaces, 200)
        spec = spec_for_class(
            Ordered, {"name": "ordered", "queue_size": 400, "batch_max_events": 100}, type_="memory"
        )
        router = Router(_settings(api, tmp_path, namespaces), [spec])
        async with router.running():
            await until(lambda: held.added == 10_000, timeout=60)
            await gate.allow(1_000_000)
            sink = router.sinks["ordered"]
            assert isinstance(sink, MemorySink)
            await sink.wait_for(10_000, timeout=60)
            await until(lambda: router.ready()[0], timeout=30)
            assert router.metrics.dropped.labels("ordered", "queue_full")._value.get() == 0
    assert held.peak <= 500, f"{held.peak} occurrences held in memory at once"
    assert len(set(sink.keys)) == len(sink.keys) == 10_000
    assert _in_time_order(sink.received)


async def test_a_loki_stream_spanning_two_namespaces_gets_three_hours_of_relist_in_order(
    tmp_path: Path,
) -> None:
    """Loki stream labels without the namespace: a small namespace's three hours went first, and the
    large namespace's older entries, over an hour behind, were stamped at their receipt (300 of 310)."""
    async with (
        FakeApiServer() as api,
        LokiReceiver(reject_old_samples_max_age=KEEP_OLD_SAMPLES) as loki,
    ):
        for ns, n in (("a", 10), ("b", 300)):
            for i in range(n):
                t = _at(3 * 3600 * (n - 1 - i) / (n - 1))
                api.create_event(
                    event_object(namespace=ns, name=f"ev-{i:05d}", first_timestamp=t, last_timestamp=t)
                )
        settings = _settings(api, tmp_path, ["a", "b"], page_size=50)
        spec = spec_for_class(
            LokiSink,
            {
                "url": loki.url,
                "batch_max_wait": 0.02,
                "batch_max_events": 20,
                "max_age": KEEP_OLD_SAMPLES,
                "default_labels": "cluster,type",
            },
            type_="loki",
        )
        router = Router(settings, [spec])
        async with router.running():
            m = router.metrics
            await until(lambda: m.delivered.labels("loki")._value.get() == 310, timeout=30)
            assert m.dead_lettered.labels("loki", "rejected")._value.get() == 0
        assert len({e.labels for e in loki.entries}) == 1  # one stream for both namespaces
        assert len({e.line for e in loki.entries}) == 310
        assert [e for e in loki.entries if '"time_adjusted":true' in e.line] == []
        stamps = [e.ts_ns for e in loki.entries]
        assert stamps == sorted(stamps)


class _Ordered(MemorySink):
    wants_time_order = True


def _ordered(router: Router) -> MemorySink:
    sink = router.sinks["ordered"]
    assert isinstance(sink, MemorySink)
    return sink


async def test_namespaces_relisting_after_an_outage_at_their_own_times_hand_on_together(
    tmp_path: Path,
) -> None:
    """An API server outage: every watch cut, the history compacted, and the reconnects answered 503
    for a while, so each namespace gets its 410 and relists after its own backoff. Each relist was
    handed on alone as soon as it was complete: the sink got one namespace's outage, then another's,
    out of time order. The first relist now waits for the watchers still reconnecting, and the three
    go on together, oldest first. Then a 410 in one namespace alone, while the others watch, is handed
    on at once: a round waits for reconnecting watchers only, never its whole gathering time (65 s
    here, beyond every wait of this test)."""
    namespaces = ["ns0", "ns1", "ns2"]
    async with FakeApiServer() as api:
        spec = spec_for_class(_Ordered, {"name": "ordered", "batch_max_wait": 0.01}, type_="memory")
        router = Router(_settings(api, tmp_path, namespaces, backoff_max=30.0), [spec])
        async with router.running():
            await until(lambda: router.ready()[0])
            sink = _ordered(router)
            await _each_watch_handles_a_line(api, sink, namespaces, "live", 3)
            # The outage: nothing awaited between these lines, no watch sees the new events.
            api.faults.fail_next(503, count=6, verbs=("watch", "list"))
            api.disconnect_watches("API server restarting")
            _interleaved(api, namespaces, 20, step=60.0)
            api.compact()
            await sink.wait_for(63, timeout=20)
            outage = sink.received[3:]
            assert len({(o.uid, o.number) for o in outage}) == len(outage) == 60
            assert _in_time_order(outage)

            # A 410 for whichever namespace reconnects first; the others resume their watches.
            await _each_watch_handles_a_line(api, sink, namespaces, "again", 66)
            relists = router.metrics.relists.labels("expired")._value.get()
            api.faults.fail_next(410, verbs=("watch",))
            api.disconnect_watches()
            for ns in namespaces:
                api.create_event(event_object(namespace=ns, object_name="after"))
            await sink.wait_for(69, timeout=20)
            assert router.metrics.relists.labels("expired")._value.get() == relists + 1
            assert len(set(sink.keys)) == len(sink.keys) == 69


class _FailingNamespace(FakeApiServer):
    """Answers 500 to every events request in namespace ``c`` (an object there the API server cannot
    decode or decrypt), as a retry will not change."""

    async def _events_get(self, request: web.Request) -> web.StreamResponse:
        if request.match_info.get("ns") == "c":
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "code": 500,
                    "message": "injected",
                    "reason": "InternalError",
                },
                status=500,
            )
        return await super()._events_get(request)


async def test_a_namespace_failing_for_ever_does_not_hold_up_the_others_relists(tmp_path: Path) -> None:
    """One namespace answering 500 for ever was awaited by every round: the others' start-up relist,
    and later each routine 410 of theirs, waited the whole gathering time (65 s here) with no watch
    open. Now a watcher failing since it started, or not healthy for a gathering time, is not waited
    for, and its retries list in a round of their own: both go on at once (within 20 s here)."""
    async with _FailingNamespace() as api:
        for ns in ("a", "b", "c"):
            for i in range(5):
                api.create_event(event_object(namespace=ns, object_name=f"o{i}"))
        spec = spec_for_class(_Ordered, {"name": "ordered", "batch_max_wait": 0.01}, type_="memory")
        router = Router(_settings(api, tmp_path, ["a", "b", "c"], backoff_max=30.0), [spec])
        async with router.running():
            sink = _ordered(router)
            await sink.wait_for(10, timeout=20)  # start-up: a's and b's, not after 65 s
            await _each_watch_handles_a_line(api, sink, ["a", "b"], "live", 12)
            # A routine 410 for whichever of a and b reconnects first; the other resumes its watch.
            relists = router.metrics.relists.labels("expired")._value.get()
            api.faults.fail_next(410, verbs=("watch",))
            api.disconnect_watches()
            for ns in ("a", "b"):
                api.create_event(event_object(namespace=ns, object_name="after"))
            await sink.wait_for(14, timeout=20)
            assert router.metrics.relists.labels("expired")._value.get() == relists + 1
            assert len(set(sink.keys)) == len(sink.keys) == 14


async def _each_watch_handles_a_line(
    api: FakeApiServer, sink: MemorySink, namespaces: list[str], name: str, count: int
) -> None:
    """An event in each namespace through its open watch: a stream that then ends is one that worked
    (not one closed at once, which relists)."""
    await until(lambda: api.active_watches == len(namespaces))
    for ns in namespaces:
        api.create_event(event_object(namespace=ns, object_name=name))
    await sink.wait_for(count, timeout=20)


async def test_a_namespace_whose_list_fails_midway_leaves_the_merged_relist_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """Two namespaces relisting together; the history is compacted while the first page of one is in
    hand, so its next page (and perhaps the other's) answers 410. What it had put into the shared
    order is taken out and forgotten by its tracker; it lists again, and everything is handed on once,
    oldest first across both namespaces."""
    async with FakeApiServer() as api:
        _interleaved(api, ["a", "b"], 30, step=60.0)
        kube = await connect(kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")))
        settings = WatchSettings(page_size=10, backoff_initial=0.01, backoff_max=0.05, relist_sorted=True)
        relists = shared_relists(settings, "t")
        published: list[Occurrence] = []
        asked = 0

        def needed(occ: Occurrence) -> bool:
            nonlocal asked
            asked += 1
            if asked == 1:  # a page in hand: its continue token is compacted under it
                api.create_event(event_object(namespace="elsewhere"))
                api.compact()
            return True

        metrics = Metrics()
        watchers = [
            EventWatcher(
                kube,
                namespace=ns,
                tracker=OccurrenceTracker(cluster="t"),
                publish=published.append,
                forget=lambda uids: None,
                listed=lambda ns: None,
                metrics=metrics,
                settings=settings,
                needed=needed,
                relists=relists,
            )
            for ns in ("a", "b")
        ]
        tasks = [asyncio.create_task(w.run()) for w in watchers]
        try:
            async with asyncio.timeout(20):
                await asyncio.gather(*(w.initial_list_done.wait() for w in watchers))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await kube.close()
        assert metrics.watch_restarts.labels("http_410")._value.get() >= 1
        want = sorted(
            f"{e['metadata']['uid']}/1" for e in api.events() if e["metadata"]["namespace"] != "elsewhere"
        )
        assert sorted(o.key for o in published) == want
        assert _in_time_order(published)
        assert relists is not None and relists.budget.held == 0 and relists.open is None
