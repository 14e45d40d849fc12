"""Item 304: `--checkpoint-seed-configmap` seeded only a data dir whose checkpoint store was empty (or
owed a seed). The chart keeps the dataDir claim across mode switches, so dataDir (period 1) → configMap
(period 2, the router writes the ConfigMap) → dataDir (period 3, the old claim with period 1's
checkpoint) skipped the seed silently and sent again everything period 2 delivered that the API server
still held. Now every start reads the ConfigMap and merges it (the higher number of each entry) unless
it is the state (uid, resourceVersion) the data dir took last, which is not decoded again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.record import occurrence_number
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "er-checkpoint"
TOKEN = "t0ken"
CONFIGMAP = f"/api/v1/namespaces/{NS}/configmaps/{NAME}"
RESULTS = ("seeded", "unchanged", "absent", "failed")
SINKS = ["loki", "robot"]

Key = tuple[str, int]


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        server.bookmark_interval = 0.5
        yield server


def router(api: FakeApiServer, tmp_path: Path, down: tuple[str, ...] = (), **settings: Any) -> Router:
    options = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.1,
        shutdown_timeout=1.0 if down else 5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        **settings,
    )
    specs = [
        spec_for_class(MemorySink, {"name": s, "batch_max_wait": 0.01, "fail": s in down}, type_="memory")
        for s in SINKS
    ]
    return Router(options, specs)


def data_dir_mode(api: FakeApiServer, tmp_path: Path, down: tuple[str, ...] = ()) -> Router:
    """The chart's dataDir mode on its claim (`<release>-eventrouter-data`, kept across switches)."""
    return router(api, tmp_path, down, data_dir=tmp_path / "claim", checkpoint_seed_configmap=NAME)


def configmap_mode(api: FakeApiServer, tmp_path: Path) -> Router:
    """The chart's configMap mode: the checkpoint in the ConfigMap, spools in an emptyDir."""
    return router(api, tmp_path, checkpoint_configmap=NAME, data_dir=tmp_path / "emptydir")


def received(r: Router, sink: str) -> set[Key]:
    got = r.sinks[sink]
    assert isinstance(got, MemorySink)
    assert len(got.keys) == len(set(got.keys)), got.keys  # none twice within one run either
    return set(got.keys)


def seeds(r: Router) -> dict[str, float | None]:
    sample = r.metrics.registry.get_sample_value
    return {result: sample("eventrouter_checkpoint_seeds_total", {"result": result}) for result in RESULTS}


def only(result: str) -> dict[str, float]:
    return {r: 1.0 if r == result else 0.0 for r in RESULTS}


def tried(r: Router, sink: str) -> Callable[[], bool]:
    """Whether ``sink`` (down) was tried at least once."""
    labels = {"sink": sink, "kind": "retryable"}
    return lambda: (
        (r.metrics.registry.get_sample_value("eventrouter_sink_send_errors_total", labels) or 0) > 0
    )


async def run_once(r: Router) -> None:
    """Start, deliver what the relist and the spools bring (a sink that is down: tried once), stop."""
    task = asyncio.create_task(r.run())
    try:
        await until(lambda: r.ready()[0], timeout=20)
        for p in r.pipelines:
            sink = r.sinks[p.name]
            assert isinstance(sink, MemorySink)
            await (until(tried(r, p.name), timeout=20) if sink.down else p.wait_idle(20))
    finally:
        r.request_stop()
        await asyncio.wait_for(task, 30)
    assert r.exit_code == 0


def occurrences(api: FakeApiServer) -> set[Key]:
    return {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}


def new_events(api: FakeApiServer, era: str, n: int) -> set[Key]:
    before = occurrences(api)
    for i in range(n):
        api.create_event(event_object(namespace=NS, object_name=f"{era}-{i}"))
    return occurrences(api) - before


def configmap_gets(api: FakeApiServer, since: int) -> list[str]:
    return [r.method for r in api.requests[since:] if r.path == CONFIGMAP]


def configmap_state(api: FakeApiServer) -> str:
    meta = api.get_object("configmaps", NS, NAME)["metadata"]
    return f"{NS}/{NAME} uid={meta['uid']} resourceVersion={meta['resourceVersion']}"


def taken(tmp_path: Path) -> str:
    """The ConfigMap state the claim took last, as it records it ("" for none)."""
    record = tmp_path / "claim" / "checkpoint-seed.taken"
    return record.read_text(encoding="utf-8").strip() if record.exists() else ""


async def delete_configmap(api: FakeApiServer) -> None:
    async with (
        aiohttp.ClientSession(api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.delete(CONFIGMAP) as resp,
    ):
        assert resp.status == 200, await resp.text()


class Periods:
    """dataDir (robot down: its 5 wait in the claim's spool) → configMap (everything delivered once
    more, as documented; one of period 1's events deleted before it, so only the spool holds it) →
    dataDir again on the same claim, as NOTES.txt advises to deliver that spool."""

    def __init__(self, api: FakeApiServer, tmp_path: Path) -> None:
        self.api, self.tmp_path = api, tmp_path
        self.era1: set[Key] = set()
        self.gone: Key = ("", 0)
        self.delivered: set[Key] = set()  # by period 2

    async def first_two(self) -> None:
        api = self.api
        self.era1 = new_events(api, "era1", 5)
        r1 = data_dir_mode(api, self.tmp_path, down=("robot",))
        await run_once(r1)
        assert received(r1, "loki") == self.era1 and received(r1, "robot") == set()
        assert seeds(r1)["absent"] == 1.0
        first = next(e["metadata"] for e in api.events() if e["involvedObject"]["name"] == "era1-0")
        gone = api.delete_event(NS, first["name"])  # its TTL: only robot's spool on the claim holds it now
        self.gone = (gone["metadata"]["uid"], occurrence_number(gone))
        new_events(api, "era2", 10)
        r2 = configmap_mode(api, self.tmp_path)
        await run_once(r2)
        self.delivered = occurrences(api)
        assert received(r2, "loki") == received(r2, "robot") == self.delivered  # 14, once more

    async def back(self, down: tuple[str, ...] = ()) -> tuple[Router, set[Key]]:
        new = new_events(self.api, f"back-{len(self.api.events())}", 2)
        r = data_dir_mode(self.api, self.tmp_path, down)
        await run_once(r)
        return r, new


async def test_a_switch_back_onto_the_kept_claim_delivers_nothing_the_configmap_mode_delivered(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Before: period 3 did not read the ConfigMap (its claim held period 1's checkpoint) and loki got
    10 of period 2's 14 again, robot all 14 (its spool's 4, the relist's 10) besides the 2 new and the
    spool's deleted one."""
    periods = Periods(api, tmp_path)
    await periods.first_two()
    mark = len(api.requests)
    r3, new = await periods.back()
    assert received(r3, "loki") == new
    assert received(r3, "robot") == new | {periods.gone}  # the spool's event delivered, the rest not again
    assert configmap_gets(api, mark) == ["GET"]
    assert seeds(r3) == only("seeded")
    assert taken(tmp_path) == configmap_state(api)


async def test_a_restart_on_a_claim_that_took_the_configmap_does_not_decode_it_again(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """One GET per start (nothing else tells a data dir that a configMap period came between); the
    same uid and resourceVersion as the record: not decoded, counted "unchanged". Before: no result
    "unchanged" (the start did not read the ConfigMap at all)."""
    periods = Periods(api, tmp_path)
    await periods.first_two()
    await periods.back()
    record = taken(tmp_path)
    mark = len(api.requests)
    r4, new = await periods.back()
    assert received(r4, "loki") == received(r4, "robot") == new
    assert configmap_gets(api, mark) == ["GET"]
    assert seeds(r4) == only("unchanged")
    assert taken(tmp_path) == record


@pytest.mark.parametrize("how", ["written again", "made anew"])
async def test_a_configmap_period_after_the_switch_back_is_merged_at_the_next(
    api: FakeApiServer, tmp_path: Path, how: str
) -> None:
    """dataDir → configMap → dataDir → configMap (the ConfigMap written again, or deleted and made anew
    by the router: another uid) → dataDir: the second return takes the newer state too. Before: the
    second return, like the first, sent again what the configMap period delivered."""
    periods = Periods(api, tmp_path)
    await periods.first_two()
    _, new3 = await periods.back()
    before = taken(tmp_path)
    if how == "made anew":
        await delete_configmap(api)
    era4 = new_events(api, "era4", 3)
    r4 = configmap_mode(api, tmp_path)
    await run_once(r4)
    # dataDir → configMap delivers again what the ConfigMap lacks (documented): all, or period 3's.
    assert received(r4, "loki") == (occurrences(api) if how == "made anew" else new3 | era4)
    mark = len(api.requests)
    r5, new = await periods.back()
    assert received(r5, "loki") == received(r5, "robot") == new
    assert configmap_gets(api, mark) == ["GET"]
    assert seeds(r5) == only("seeded")
    assert taken(tmp_path) == configmap_state(api) != before


async def test_the_first_start_after_the_upgrade_merges_once(api: FakeApiServer, tmp_path: Path) -> None:
    """A claim seeded by item 286/299's code holds a checkpoint and no record: its first start on this
    code decodes and merges the ConfigMap once (the same numbers it took: harmless), then records it.
    Before: not read at all."""
    new_events(api, "era1", 5)
    await run_once(configmap_mode(api, tmp_path))
    await run_once(data_dir_mode(api, tmp_path))  # the switch: seeded
    (tmp_path / "claim" / "checkpoint-seed.taken").unlink(missing_ok=True)  # as item 286/299 left it
    periods = Periods(api, tmp_path)
    upgraded, new = await periods.back()
    assert received(upgraded, "loki") == received(upgraded, "robot") == new
    assert seeds(upgraded) == only("seeded")
    later, new = await periods.back()
    assert received(later, "loki") == new and seeds(later) == only("unchanged")


async def test_a_read_that_fails_on_the_kept_claim_is_taken_at_the_next_start(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Period 3 cannot read the ConfigMap (its Role lacked `get`) while robot is down: loki gets period
    2's again (no merge could be had: counted "failed"), robot's wait in its spool. The Role is fixed:
    the next start merges, and robot gets from its spool only what no period delivered. Before:
    neither start read the ConfigMap, and robot got period 2's 14 again."""
    periods = Periods(api, tmp_path)
    await periods.first_two()
    api.forbid(TOKEN, verbs={"get"}, resources={"configmaps"})
    r3, new3 = await periods.back(down=("robot",))
    assert received(r3, "loki") == periods.delivered - periods.era1 | new3  # period 2's 10 again
    assert received(r3, "robot") == set()
    record = taken(tmp_path)
    api.permit(TOKEN)
    mark = len(api.requests)
    r4, new4 = await periods.back()
    assert received(r4, "loki") == new4
    assert received(r4, "robot") == new3 | new4 | {periods.gone}
    assert configmap_gets(api, mark) == ["GET"] and seeds(r4) == only("seeded")
    assert seeds(r3) == only("failed")
    assert record == f"{NS}/{NAME} absent"  # period 1's, kept by the failed read: the next start merged
