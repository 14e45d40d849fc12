"""Item 286: a router moving from the ConfigMap checkpoint (`--checkpoint-configmap`) to the data dir's
(`--data-dir`) started without a checkpoint and delivered everything the API server still held again,
to every sink. `--checkpoint-seed-configmap` starts the data dir's first run from the ConfigMap's
checkpoint (read only), written to the data dir at once.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine.configmap_checkpoint import DATA_KEY
from eventrouter.record import occurrence_number
from eventrouter.source.kube import connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "er-checkpoint"
TOKEN = "t0ken"
CONFIGMAP = f"/api/v1/namespaces/{NS}/configmaps/{NAME}"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token=TOKEN) as server:
        server.bookmark_interval = 0.5
        yield server


def router(api: FakeApiServer, tmp_path: Path, sinks: list[str], **settings: Any) -> Router:
    options = RouterSettings(
        kubeconfig=str(api.kubeconfig(tmp_path / "kubeconfig")),
        metrics_addr=None,
        checkpoint_namespace=NS,
        checkpoint_flush_interval=0.1,
        shutdown_timeout=5.0,
        watch=WatchSettings(watch_timeout=30, backoff_initial=0.05, backoff_max=0.5),
        **settings,
    )
    specs = [spec_for_class(MemorySink, {"name": s, "batch_max_wait": 0.01}, type_="memory") for s in sinks]
    return Router(options, specs)


def configmap_mode(api: FakeApiServer, tmp_path: Path, sinks: list[str]) -> Router:
    """The chart's configMap mode: the checkpoint in the ConfigMap, spools in an emptyDir."""
    return router(api, tmp_path, sinks, checkpoint_configmap=NAME, data_dir=tmp_path / "emptydir")


def data_dir_mode(api: FakeApiServer, tmp_path: Path, sinks: list[str], seed: str | None = NAME) -> Router:
    """The chart's dataDir mode on its claim, seeded from the configMap mode's ConfigMap."""
    return router(api, tmp_path, sinks, data_dir=tmp_path / "claim", checkpoint_seed_configmap=seed)


def received(r: Router, sink: str) -> list[tuple[str, int]]:
    got = r.sinks[sink]
    assert isinstance(got, MemorySink)
    return got.keys


async def run_once(r: Router, body: Callable[[], Awaitable[None]] | None = None) -> None:
    """Start, deliver what the relist brings, run ``body``, stop (SIGTERM)."""
    task = asyncio.create_task(r.run())
    try:
        await until(lambda: r.ready()[0], timeout=20)
        for p in r.pipelines:
            await p.wait_idle(20)
        if body is not None:
            await body()
    finally:
        r.request_stop()
        await asyncio.wait_for(task, 30)
    assert r.exit_code == 0


def occurrences(api: FakeApiServer) -> set[tuple[str, int]]:
    return {(e["metadata"]["uid"], occurrence_number(e)) for e in api.events()}


def configmap_requests(api: FakeApiServer, since: int = 0) -> list[str]:
    return [
        r.method for r in api.requests[since:] if r.path.startswith(f"/api/v1/namespaces/{NS}/configmaps")
    ]


async def replace_configmap(api: FakeApiServer, obj: dict[str, Any]) -> None:
    """Write the ConfigMap as someone else would (a PUT over HTTP)."""
    async with (
        aiohttp.ClientSession(api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.put(CONFIGMAP, json=obj) as resp,
    ):
        assert resp.status == 200, await resp.text()


def messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def delivered_in_configmap_mode(api: FakeApiServer, tmp_path: Path, sinks: list[str], n: int) -> None:
    for i in range(n):
        api.create_event(event_object(namespace=NS, object_name=f"before-{i}"))
    first = configmap_mode(api, tmp_path, sinks)
    await run_once(first)
    assert set(received(first, sinks[0])) == occurrences(api)


# ---- the switch ---------------------------------------------------------------------------------


async def test_the_switch_to_the_data_dir_delivers_nothing_the_configmap_mode_delivered(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the data dir's first start had no checkpoint, and loki and robot got all 30 again."""
    await delivered_in_configmap_mode(api, tmp_path, ["loki", "robot", "gone"], 30)
    before = occurrences(api)
    version = api.get_object("configmaps", NS, NAME)["metadata"]["resourceVersion"]
    # While no router runs: new events and a new occurrence of an old one.
    for i in range(3):
        api.create_event(event_object(namespace=NS, object_name=f"after-{i}"))
    old = next(e["metadata"] for e in api.events() if e["involvedObject"]["name"] == "before-0")
    api.bump(old["namespace"], old["name"])
    new = occurrences(api) - before
    assert len(new) == 4

    caplog.set_level(logging.INFO, logger="eventrouter")
    mark = len(api.requests)
    switched = data_dir_mode(api, tmp_path, ["loki", "robot", "added"])
    await run_once(switched)
    assert set(received(switched, "loki")) == new and len(received(switched, "loki")) == 4
    assert received(switched, "robot") == received(switched, "loki")
    # A sink the ConfigMap does not name starts empty, as before; one it names but not configured is ignored.
    assert set(received(switched, "added")) == occurrences(api)
    (said,) = messages(caplog, logging.INFO, "checkpoint seeded from ConfigMap")
    assert f"ConfigMap {NS}/{NAME}" in said and "loki=30, robot=30, added=0" in said
    assert "not configured, ignored: gone" in said
    # Read once, never written.
    assert configmap_requests(api, mark) == ["GET"]
    assert api.get_object("configmaps", NS, NAME)["metadata"]["resourceVersion"] == version
    assert (tmp_path / "claim" / "checkpoints" / "loki.snapshot").is_file()


async def test_a_restart_on_the_seeded_data_dir_does_not_take_the_same_configmap_again(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart reads the ConfigMap (one GET: item 304, a configMap period may have come between) and,
    the state the data dir took (its uid and resourceVersion), neither decodes nor takes it again: the
    data dir's own checkpoint rules, and no INFO line says more. (A ConfigMap written since is merged:
    tests/test_checkpoint_seed_s35b.py.)"""
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 10)
    await run_once(data_dir_mode(api, tmp_path, ["loki"]))
    later = api.create_event(event_object(namespace=NS, object_name="later"))

    caplog.set_level(logging.INFO, logger="eventrouter")
    mark = len(api.requests)
    restarted = data_dir_mode(api, tmp_path, ["loki"])
    await run_once(restarted, lambda: restarted.sinks["loki"].wait_for(1))  # type: ignore[attr-defined]
    assert received(restarted, "loki") == [(later["metadata"]["uid"], occurrence_number(later))]
    assert configmap_requests(api, mark) == ["GET"]
    sample = restarted.metrics.registry.get_sample_value
    assert sample("eventrouter_checkpoint_seeds_total", {"result": "unchanged"}) == 1.0
    assert not [r for r in caplog.records if "checkpoint seed" in r.getMessage()]


async def test_a_seed_read_that_fails_for_a_moment_is_tried_again(api: FakeApiServer, tmp_path: Path) -> None:
    """A 503 (an API server busy with the rollout) is not a reason to send everything again."""
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 10)
    api.faults.fail_next(503, count=2, verbs=("get",), resource="configmaps")
    switched = data_dir_mode(api, tmp_path, ["loki"])
    await run_once(switched)
    assert received(switched, "loki") == []
    assert api.faults.pending == 0


# ---- a seed that cannot be had ------------------------------------------------------------------


async def test_a_missing_configmap_starts_as_before_and_says_so_once(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A first install in the data dir mode: no ConfigMap (404) is no error."""
    for i in range(5):
        api.create_event(event_object(namespace=NS, object_name=f"e-{i}"))
    caplog.set_level(logging.INFO, logger="eventrouter")
    fresh = data_dir_mode(api, tmp_path, ["loki"])
    await run_once(fresh)
    assert set(received(fresh, "loki")) == occurrences(api)
    (said,) = messages(caplog, logging.INFO, "checkpoint seed:")
    assert f"ConfigMap {NS}/{NAME} does not exist" in said
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "seed" in r.getMessage()]
    assert api.objects("configmaps") == []  # never created
    assert configmap_requests(api) == ["GET"]


async def _forbid(api: FakeApiServer) -> None:
    api.forbid(TOKEN, verbs={"get"}, resources={"configmaps"})


async def _damage(api: FakeApiServer) -> None:
    cm = api.get_object("configmaps", NS, NAME)
    cm["binaryData"][DATA_KEY] = base64.b64encode(b"\x01not zlib at all").decode()
    await replace_configmap(api, cm)


async def _not_a_checkpoint(api: FakeApiServer) -> None:
    cm = api.get_object("configmaps", NS, NAME)
    cm["binaryData"] = {}
    await replace_configmap(api, cm)


UNUSABLE: dict[str, tuple[Callable[[FakeApiServer], Awaitable[None]], str]] = {
    "forbidden": (_forbid, f"checkpoint seed: cannot read ConfigMap {NS}/{NAME} (403 Forbidden"),
    "damaged": (
        _damage,
        f"checkpoint seed: ConfigMap {NS}/{NAME} holds no checkpoint that can be read (bad ",
    ),
    "no checkpoint": (
        _not_a_checkpoint,
        f"checkpoint seed: ConfigMap {NS}/{NAME} holds no checkpoint that can be read (no binaryData.checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
async def test_a_configmap_that_cannot_be_used_is_named_and_the_router_starts_without_it(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    spoil, warning = UNUSABLE[case]
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 10)
    await spoil(api)
    caplog.set_level(logging.INFO, logger="eventrouter")
    mark = len(api.requests)
    switched = data_dir_mode(api, tmp_path, ["loki"])
    await run_once(switched)  # started, delivered, stopped with 0: no crash loop for a seed
    assert set(received(switched, "loki")) == occurrences(api)  # as before the seed: everything again
    (said,) = messages(caplog, logging.WARNING, "checkpoint seed:")
    assert said.startswith(warning), said
    assert "starting with an empty checkpoint" in said
    assert configmap_requests(api, mark) == ["GET"]  # refused for what it is: not tried again


# ---- settings ---------------------------------------------------------------------------------


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "eventrouter.cli",
            "run",
            "--sink=stdout:",
            "--metrics-addr=127.0.0.1:0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )


def test_the_seed_beside_the_configmap_checkpoint_exits_2_naming_both(tmp_path: Path) -> None:
    data = f"--data-dir={tmp_path / 'data'}"
    both = _run(tmp_path, data, "--checkpoint-configmap=cp", "--checkpoint-seed-configmap=cp")
    assert both.returncode == 2, both.stderr
    assert "--checkpoint-seed-configmap and --checkpoint-configmap exclude each other" in both.stderr
    alone = _run(tmp_path, "--checkpoint-seed-configmap=cp")
    assert alone.returncode == 2 and "--checkpoint-seed-configmap needs --data-dir" in alone.stderr
    named = _run(tmp_path, data, "--checkpoint-seed-configmap=Not_A_Name")
    assert named.returncode == 2 and "'Not_A_Name' is not a ConfigMap name" in named.stderr
    with pytest.raises(
        ValueError, match="checkpoint_seed_configmap and checkpoint_configmap exclude each other"
    ):
        Router(RouterSettings(data_dir=tmp_path, checkpoint_configmap="a", checkpoint_seed_configmap="a"), [])
    with pytest.raises(ValueError, match="checkpoint_seed_configmap needs data_dir"):
        Router(RouterSettings(checkpoint_seed_configmap="a"), [])


# ---- item 295: all or nothing, and the decode's memory handed back -------------------------------

KILLED_SEED = r"""
import asyncio, os, pathlib, sys
from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine import checkpoint
from eventrouter.source.kube import connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import MemorySink

kubeconfig, data, namespace, name, *sinks = sys.argv[1:]
compact, written = checkpoint.FileCheckpoint.compact, []


def compact_then_die(self, state):
    # What a SIGKILL (an OOM kill, the liveness probe) leaves after the second sink's file.
    compact(self, state)
    written.append(self)
    if len(written) == 2:
        os._exit(137)


checkpoint.FileCheckpoint.compact = compact_then_die
specs = [spec_for_class(MemorySink, {"name": s}, type_="memory") for s in sinks]
settings = RouterSettings(
    kubeconfig=kubeconfig, metrics_addr=None, checkpoint_namespace=namespace, data_dir=pathlib.Path(data),
    checkpoint_seed_configmap=name, watch=WatchSettings(watch_timeout=30),
)
asyncio.run(Router(settings, specs).run())
"""


async def test_a_kill_between_two_sinks_seed_files_seeds_every_sink_at_the_next_start(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """Before: the kill left loki's and robot's snapshots; the next start took that for a whole
    checkpoint, did not seed, and es got all 30 again (with no word of it)."""
    sinks = ["loki", "robot", "es"]
    await delivered_in_configmap_mode(api, tmp_path, sinks, 30)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_SEED,
        str(api.kubeconfig(tmp_path / "kubeconfig")),
        str(tmp_path / "claim"),
        NS,
        NAME,
        *sinks,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 137, err.decode()
    left = sorted(p.name for p in (tmp_path / "claim" / "checkpoints").glob("*"))

    restarted = data_dir_mode(api, tmp_path, sinks)
    await run_once(restarted)
    assert {s: len(received(restarted, s)) for s in sinks} == {"loki": 0, "robot": 0, "es": 0}
    assert left == []  # before: ['loki.snapshot', 'robot.snapshot']
    assert sorted(p.name for p in (tmp_path / "claim").iterdir() if "checkpoint" in p.name) == [
        "checkpoint-seed.taken",  # item 304: the ConfigMap state taken
        "checkpoints",
    ]


@pytest.mark.parametrize("seed", [NAME, None])
async def test_a_seed_folder_left_by_a_kill_is_removed_at_the_next_start(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, seed: str | None
) -> None:
    """A kill before the seed's rename leaves ``checkpoints.seed``: removed (and, when asked, the seed
    written anew from the ConfigMap, not from what the folder held). Before: it stayed for good."""
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 5)
    left = tmp_path / "claim" / "checkpoints.seed"
    left.mkdir(parents=True)
    (left / "loki.snapshot.tmp").write_text("half a line")
    caplog.set_level(logging.INFO, logger="eventrouter")
    restarted = data_dir_mode(api, tmp_path, ["loki"], seed=seed)
    await run_once(restarted)
    assert not left.exists()
    assert messages(caplog, logging.INFO, f"removed {left}, left by a seed that did not finish")
    assert len(received(restarted, "loki")) == (0 if seed else 5)


async def test_the_seeded_start_hands_the_decode_memory_back(api: FakeApiServer, tmp_path: Path) -> None:
    """The seed's decode and snapshots (~80 MiB at the start's peak with 7 sinks x 50,000 entries) are
    followed by one trim, counted with the router's own. Before: none until the periodic one."""
    await delivered_in_configmap_mode(api, tmp_path, ["loki"], 5)
    seeded = data_dir_mode(api, tmp_path, ["loki"])
    seeded.kube = await connect(kubeconfig=seeded.settings.kubeconfig, context=None, connections=2)
    try:
        await seeded.start_pipelines()  # the pipelines built, no relist (and no trim after one) yet
        assert seeded.memory_trims == 1
        assert (tmp_path / "claim" / "checkpoints" / "loki.snapshot").is_file()
    finally:
        await seeded.stop()
