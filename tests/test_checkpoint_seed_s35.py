"""Item 299: the Left of item 286's checkpoint seed (`--checkpoint-seed-configmap`). A seed that could not
be had (403, a damaged ConfigMap, a timeout) was logged only, counted by no metric, and never tried
again: the first start's stop wrote the data dir's checkpoint, and a later start took that for a data
dir seeded before. Now every try is counted by result, and a seed that failed is owed and tried again at
each start, over the data dir's own checkpoint (the higher number of each entry kept).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrouter import app
from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.checkpoint import FileCheckpoint
from eventrouter.engine.configmap_checkpoint import DATA_KEY, decode_state, encode_state
from eventrouter.record import occurrence_number
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "er-checkpoint"
TOKEN = "t0ken"
CONFIGMAP = f"/api/v1/namespaces/{NS}/configmaps/{NAME}"
RESULTS = ("seeded", "absent", "failed")


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        server.bookmark_interval = 0.5
        yield server


def router(
    api: FakeApiServer, tmp_path: Path, sinks: list[str], down: tuple[str, ...] = (), **settings: Any
) -> Router:
    options = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.1,
        shutdown_timeout=settings.pop("shutdown_timeout", 5.0),
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        **settings,
    )
    specs = [
        spec_for_class(MemorySink, {"name": s, "batch_max_wait": 0.01, "fail": s in down}, type_="memory")
        for s in sinks
    ]
    return Router(options, specs)


def data_dir_mode(api: FakeApiServer, tmp_path: Path, sinks: list[str], down: tuple[str, ...] = ()) -> Router:
    """The chart's dataDir mode on its claim, seeded from the configMap mode's ConfigMap."""
    return router(
        api,
        tmp_path,
        sinks,
        down,
        data_dir=tmp_path / "claim",
        checkpoint_seed_configmap=NAME,
        shutdown_timeout=1.0 if down else 5.0,
    )


def received(r: Router, sink: str) -> list[tuple[str, int]]:
    got = r.sinks[sink]
    assert isinstance(got, MemorySink)
    return got.keys


def seeds(r: Router) -> dict[str, float | None]:
    return {
        result: r.metrics.registry.get_sample_value("eventrouter_checkpoint_seeds_total", {"result": result})
        for result in RESULTS
    }


async def run_once(r: Router, body: Callable[[], Awaitable[None]] | None = None) -> None:
    """Start, deliver what the relist brings (a sink that is down: tried once), run ``body``, stop."""
    task = asyncio.create_task(r.run())
    try:
        await until(lambda: r.ready()[0], timeout=20)
        for p in r.pipelines:
            sink = r.sinks[p.name]
            assert isinstance(sink, MemorySink)
            if sink.down:
                await until(tried(r, p.name), timeout=20)
            else:
                await p.wait_idle(20)
        if body is not None:
            await body()
    finally:
        r.request_stop()
        await asyncio.wait_for(task, 30)
    assert r.exit_code == 0


def tried(r: Router, sink: str) -> Callable[[], bool]:
    """Whether ``sink`` (down) was tried at least once."""
    sample = r.metrics.registry.get_sample_value
    labels = {"sink": sink, "kind": "retryable"}
    return lambda: (sample("eventrouter_sink_send_errors_total", labels) or 0.0) > 0


def occurrences(api: FakeApiServer) -> set[tuple[str, int]]:
    return {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}


def configmap_requests(api: FakeApiServer, since: int = 0) -> list[str]:
    return [
        r.method for r in api.requests[since:] if r.path.startswith(f"/api/v1/namespaces/{NS}/configmaps")
    ]


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def delivered_in_configmap_mode(api: FakeApiServer, tmp_path: Path, sinks: list[str], n: int) -> None:
    for i in range(n):
        api.create_event(event_object(namespace=NS, object_name=f"before-{i}"))
    first = router(api, tmp_path, sinks, checkpoint_configmap=NAME, data_dir=tmp_path / "emptydir")
    await run_once(first)
    assert set(received(first, sinks[0])) == occurrences(api)


def new_events(api: FakeApiServer, n: int) -> set[tuple[str, int]]:
    before = occurrences(api)
    for i in range(n):
        api.create_event(event_object(namespace=NS, object_name=f"new-{len(before)}-{i}"))
    return occurrences(api) - before


def forbid(api: FakeApiServer) -> None:
    api.forbid(TOKEN, verbs={"get"}, resources={"configmaps"})


async def replace_configmap(api: FakeApiServer, obj: dict[str, Any]) -> None:
    async with (
        aiohttp.ClientSession(api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.put(CONFIGMAP, json=obj) as resp,
    ):
        assert resp.status == 200, await resp.text()


# ---- (1) each try counted by its result ----------------------------------------------------------


async def _configmap_mode_then(api: FakeApiServer, tmp_path: Path) -> None:
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 5)


async def _forbidden(api: FakeApiServer, tmp_path: Path) -> None:
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 5)
    forbid(api)


async def _damaged(api: FakeApiServer, tmp_path: Path) -> None:
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 5)
    cm = api.get_object("configmaps", NS, NAME)
    cm["binaryData"][DATA_KEY] = base64.b64encode(b"\x01not zlib at all").decode()
    await replace_configmap(api, cm)


async def _timed_out(api: FakeApiServer, tmp_path: Path) -> None:
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 5)
    api.hold_answers("GET", "configmaps")  # answered never: a stuck API server


async def _absent(api: FakeApiServer, tmp_path: Path) -> None:
    for i in range(5):
        api.create_event(event_object(namespace=NS, object_name=f"e-{i}"))


CASES: dict[str, tuple[Callable[[FakeApiServer, Path], Awaitable[None]], str, str]] = {
    "seeded": (_configmap_mode_then, "seeded", "checkpoint seeded from ConfigMap"),
    "absent": (_absent, "absent", f"ConfigMap {NS}/{NAME} does not exist"),
    "forbidden": (_forbidden, "failed", f"cannot read ConfigMap {NS}/{NAME} (403 Forbidden"),
    "damaged": (_damaged, "failed", f"ConfigMap {NS}/{NAME} holds no checkpoint that can be read"),
    "timed out": (_timed_out, "failed", f"cannot read ConfigMap {NS}/{NAME} ("),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_seed_is_counted_by_its_result(
    api: FakeApiServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """Before: no metric at all; a failed seed (everything sent again) was one WARNING among many."""
    prepare, result, said = CASES[case]
    monkeypatch.setattr(app, "SEED_READ_SECONDS", 1.0)  # the timed-out read gives up after 1 s, not 30
    await prepare(api, tmp_path)
    caplog.set_level(logging.INFO, logger="eventrouter")
    switched = data_dir_mode(api, tmp_path, ["loki"])
    assert seeds(switched) == dict.fromkeys(RESULTS, 0.0)  # exported at 0 from the start
    await run_once(switched)
    assert seeds(switched) == {r: 1.0 if r == result else 0.0 for r in RESULTS}
    assert [m for m in messages(caplog, logging.WARNING if result == "failed" else logging.INFO, said)]
    if result == "failed":
        assert "the seed is tried again at the next start" in messages(caplog, logging.WARNING, said)[0]


# ---- (2) a seed that failed is tried again -------------------------------------------------------


async def test_a_seed_that_failed_is_taken_at_the_next_start_keeping_what_was_accepted_since(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first start on the data dir cannot read the ConfigMap (its Role lacked `get`) while robot
    is down: loki gets all 30 again (that is done), robot's 30 wait in its spool. The Role is fixed and
    the pod restarted: the seed is taken then. Before: never tried again (the stop had written the data
    dir's checkpoint), and robot got all 30 again from its spool. And what the data dir recorded since
    stands: loki's before-0, raised to 2 after the ConfigMap's 1, is not sent again."""
    await delivered_in_configmap_mode(api, tmp_path, ["loki", "robot"], 30)
    old = next(e["metadata"] for e in api.events() if e["involvedObject"]["name"] == "before-0")
    api.bump(old["namespace"], old["name"])  # occurrence 2, after the ConfigMap's last write
    forbid(api)
    first = data_dir_mode(api, tmp_path, ["loki", "robot"], down=("robot",))
    await run_once(first)
    assert set(received(first, "loki")) == occurrences(api)  # sent again: the seed failed
    assert received(first, "robot") == []

    api.permit(TOKEN)
    new = new_events(api, 2)
    caplog.set_level(logging.INFO, logger="eventrouter")
    mark = len(api.requests)
    second = data_dir_mode(api, tmp_path, ["loki", "robot"])
    await run_once(second)
    assert set(received(second, "robot")) == new | {(old["uid"], 2)}  # not the 30 the ConfigMap had
    assert set(received(second, "loki")) == new  # before-0's 2 not again, though the ConfigMap says 1
    assert configmap_requests(api, mark) == ["GET"]
    assert seeds(first)["failed"] == 1.0 and seeds(second) == {"seeded": 1.0, "absent": 0.0, "failed": 0.0}
    (said,) = messages(caplog, logging.INFO, "checkpoint seeded from ConfigMap")
    assert "over the data dir's own checkpoint" in said and "loki=0, robot=30" in said
    assert FileCheckpoint(tmp_path / "claim" / "checkpoints", "loki").load()[old["uid"]] == 2

    # Taken: the data dir's checkpoint rules from now on (read, the same state: not taken again, item 304).
    mark = len(api.requests)
    third = data_dir_mode(api, tmp_path, ["loki", "robot"])
    await run_once(third)
    assert configmap_requests(api, mark) == ["GET"]
    assert seeds(third) == dict.fromkeys(RESULTS, 0.0)
    sample = third.metrics.registry.get_sample_value
    assert sample("eventrouter_checkpoint_seeds_total", {"result": "unchanged"}) == 1.0
    assert received(third, "loki") == received(third, "robot") == []


async def test_a_seed_still_failing_is_owed_until_the_configmap_is_gone(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each start with the seed still forbidden tries once more and counts it; a ConfigMap deleted
    since (404: nothing to seed) ends it. Before: the second start did not read the ConfigMap."""
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 5)
    forbid(api)
    await run_once(data_dir_mode(api, tmp_path, ["loki"]))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="eventrouter")
    mark = len(api.requests)
    again = data_dir_mode(api, tmp_path, ["loki"])
    await run_once(again)
    assert configmap_requests(api, mark) == ["GET"]
    (said,) = messages(caplog, logging.WARNING, "checkpoint seed: cannot read ConfigMap")
    assert "starting from the data dir's own checkpoint; the seed is tried again at the next start" in said
    assert seeds(again)["failed"] == 1.0

    api.permit(TOKEN)
    async with (
        aiohttp.ClientSession(api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.delete(CONFIGMAP) as resp,
    ):
        assert resp.status == 200, await resp.text()
    gone = data_dir_mode(api, tmp_path, ["loki"])
    await run_once(gone)
    assert seeds(gone)["absent"] == 1.0
    assert messages(caplog, logging.INFO, "does not exist; nothing to seed (read again at each start")
    # Item 304: still read at each start (one made later is merged), said at INFO only the first time.
    caplog.clear()
    mark = len(api.requests)
    still = data_dir_mode(api, tmp_path, ["loki"])
    await run_once(still)
    assert configmap_requests(api, mark) == ["GET"] and seeds(still)["absent"] == 1.0
    assert not messages(caplog, logging.INFO, "checkpoint seed")


# ---- (3) the decode keeps columns, not a dict per sink ----------------------------------------------


def test_a_sinks_entries_read_from_the_columns_are_decode_states_in_order() -> None:
    """The seed writes each sink's snapshot from its decoded column (ConfigMapCheckpoint.entries): the
    same entries, in the same order, as decode_state's dicts, for a sink level with the others, one
    behind, one with a forgotten entry and one with numbers above the base."""
    from eventrouter.engine.configmap_checkpoint import ConfigMapCheckpoint, decode_columns  # item 299's

    order = [f"uid-{i}" for i in range(40)]
    level = {u: 3 for u in order}
    states = {
        "level": level,
        "other": dict(level),
        "behind": {u: 3 for u in order[:25]},
        "forgot": {u: 3 for u in order if u != "uid-7"},
        "ahead": {u: 5 if i % 3 else 3 for i, u in enumerate(order)},
    }
    blob = encode_state(states, order)
    names, columns, decoded_order = decode_columns(blob)
    found = ConfigMapCheckpoint(
        decoded_order, dict(zip(names, columns, strict=True)), {"uid-30": 10.0, "uid-1": 5.0}
    )
    expected = decode_state(blob)[0]
    assert sorted(found.sinks) == sorted(states)
    for sink, state in states.items():
        got = found.entries(sink)
        assert (
            list(got.items()) == list(expected[sink].items()) == [(u, state[u]) for u in order if u in state]
        )
        assert len(got) == len(state) and dict(got) == state
    assert columns[names.index("level")] is columns[names.index("other")]  # level with the base: one list
    assert dict(found.entries("missing")) == {}
    assert found.unseen_of(["behind"]) == {"uid-1": 5.0}  # uid-30 is past what "behind" holds
    assert found.unseen_of(["behind", "level"]) == {"uid-30": 10.0, "uid-1": 5.0}
