"""Items 304, 309 and 313: the checkpoint ConfigMap as a dataDir start's seed and as the configMap
mode's own store.

Item 304: `--checkpoint-seed-configmap` seeded only a data dir whose checkpoint store was empty (or
owed a seed). The chart keeps the dataDir claim across mode switches, so dataDir (period 1) → configMap
(period 2, the router writes the ConfigMap) → dataDir (period 3, the old claim with period 1's
checkpoint) skipped the seed silently and sent again everything period 2 delivered that the API server
still held. Now every start reads the ConfigMap and merges it (the higher number of each entry) unless
it is the state (uid, resourceVersion) the data dir took last, which is not decoded again.

Item 309: the checkpoint ConfigMap's decode had no bound. Since item 304 every dataDir start with
`--checkpoint-seed-configmap` decodes a ConfigMap state it has not taken, so a body within the API
server's 1 MiB that unpacks or decodes to hundreds of MiB (a zlib bomb, many sinks differing at many
uids) OOM-killed the start at every restart; the configMap mode's own read at lease-take had the same
decode. Also: an emptied checkpoint folder kept a stale `checkpoint-seed.taken`, so a failed seed was
never merged later; and the WARNING of a failed read at a switch back hid that the sinks get again what
the configMap mode delivered. Item 313: the configMap mode's own load takes all its writer writes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import shutil
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.engine import configmap_checkpoint as cc
from eventrouter.engine.checkpoint import SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import (
    DATA_KEY,
    CheckpointFormatError,
    decode_columns,
    encode_state,
)
from eventrouter.protowire import varint
from eventrouter.record import occurrence_number
from eventrouter.source.kube import KubeClient, connect
from eventrouter.source.watcher import WatchSettings
from eventrouter.testing import FakeApiServer, MemorySink, event_object
from eventrouter.testing.waiting import until

NS, NAME = "monitoring", "er-checkpoint"
WHERE = f"{NS}/{NAME}"
TOKEN = "t0ken"
CONFIGMAP = f"/api/v1/namespaces/{NS}/configmaps/{NAME}"
RESULTS = ("seeded", "unchanged", "absent", "failed")
SINKS = ["loki", "robot"]
MAGIC = b"ERCK\x01"
JSON = {"Content-Type": "application/json"}

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


async def put_checkpoint(api: FakeApiServer, blob: bytes) -> None:
    """Write ``blob`` as the ConfigMap's checkpoint through the API (its 1 MiB limit applies)."""
    obj = api.get_object("configmaps", NS, NAME)
    obj["binaryData"] = {DATA_KEY: base64.b64encode(blob).decode()}
    obj["metadata"].pop("resourceVersion", None)
    async with (
        aiohttp.ClientSession(api.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        # A stream: aiohttp warns of a body this large given whole.
        http.put(CONFIGMAP, data=io.BytesIO(orjson.dumps(obj)), headers=JSON) as resp,
    ):
        assert resp.status == 200, await resp.text()


def bomb() -> bytes:
    """A checkpoint in form: one sink, one uid of 20 MiB (a string uid), in 20 KiB of zlib."""
    size = 20 * 1024 * 1024
    raw = MAGIC + varint(1) + varint(4) + b"loki" + varint(1) + varint(1 << 1 | 1) + varint(size)
    packer = zlib.compressobj(9)
    parts = [bytes([1]), packer.compress(raw)]
    chunk = b"a" * (1024 * 1024)
    parts += [packer.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(packer.compress(varint(0)) + packer.flush())
    return b"".join(parts)


def columns(sinks: int, uids: int) -> bytes:
    """``sinks`` names, ``uids`` empty string uids, each sink one diff: a few bytes of input per sink,
    a copy of every uid's number (8 bytes each) per sink when decoded."""
    names = b"".join(varint(len(n)) + n for n in (f"s{i:04d}".encode() for i in range(sinks)))
    body = MAGIC + varint(sinks) + names + varint(uids) + b"\x03\x00" * uids + b"\x01\x00\x05" * sinks
    return bytes([0]) + body


def many_names(sinks: int) -> bytes:
    names = b"".join(varint(len(n)) + n for n in (f"s{i:06d}".encode() for i in range(sinks)))
    return bytes([0]) + MAGIC + varint(sinks) + names + varint(0) + b"\x00" * sinks


HOSTILE = {
    "zlib bomb": (bomb, "decompresses past 16 MiB"),
    "columns": (lambda: columns(100, 100_000), "more sinks differing at more uids"),
    "sink names": (lambda: many_names(100_000), "100000 sink names"),
}


def seed_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("checkpoint seed:")
    ]


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_configmap_within_the_limit_is_a_failed_seed_refused_before_it_costs_memory(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    """A claim that took the ConfigMap; then the ConfigMap is written with a body of under 1 MiB that
    unpacks to 20 MiB (a 20 MiB uid) or decodes to 100 copies of 100,000 numbers, or holds 100,000 sink
    names. The next start refuses it by the bounds (the reason named: no unbounded unpack or copy was
    made), counts `failed`, starts from its own checkpoint and delivers; the record is kept, so the next
    start tries again (one WARNING each). Before: decoded whole (the 20 MiB uid, 80 MB of columns, a
    line naming 100,000 sinks) and counted `seeded`; a 1 MiB bomb was ~1 GiB (an OOM kill at every start)."""
    make, why = HOSTILE[case]
    new_events(api, "cm", 3)
    await run_once(configmap_mode(api, tmp_path))
    switched = data_dir_mode(api, tmp_path)
    await run_once(switched)
    assert seeds(switched) == only("seeded")
    await put_checkpoint(api, make())
    record = taken(tmp_path)
    new = new_events(api, "after", 2)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        r = data_dir_mode(api, tmp_path)
        await run_once(r)
    assert seeds(r) == only("failed")
    assert received(r, "loki") == received(r, "robot") == new  # started, from its own checkpoint
    [said] = seed_warnings(caplog)
    assert f"ConfigMap {WHERE} holds no checkpoint that can be read ({why}" in said, said
    assert taken(tmp_path) == record  # not taken: tried again at the next start
    assert not any("not configured, ignored" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(CheckpointFormatError, match=why):
        decode_columns(make())


async def test_the_configmap_mode_starts_empty_on_a_zlib_bomb_and_writes_over_it(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The configMap mode's own read at lease-take has the same bound: the bomb is named unreadable
    (ERROR), the leader starts empty as for any damaged ConfigMap (everything the API server holds
    again), and its next write replaces the bomb, so no later start meets it. Before: unpacked whole
    (a 1 MiB bomb: an OOM kill at every lease-take)."""
    events = new_events(api, "cm", 3)
    await run_once(configmap_mode(api, tmp_path))
    await put_checkpoint(api, bomb())
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        r = configmap_mode(api, tmp_path)
        await run_once(r)
    assert received(r, "loki") == received(r, "robot") == events
    assert any(
        rec.getMessage()
        == f"checkpoint ConfigMap {WHERE} is unreadable (decompresses past 16 MiB, more than a checkpoint "
        "of 1 MiB holds); starting empty"
        for rec in caplog.records
    ), [rec.getMessage() for rec in caplog.records]
    stored = base64.b64decode(api.get_object("configmaps", NS, NAME)["binaryData"][DATA_KEY])
    names, _, order = decode_columns(stored)
    assert names == SINKS and len(order) == len(events)


async def test_an_emptied_store_whose_seed_failed_is_merged_at_the_next_start(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim that took the ConfigMap has its checkpoints/ removed by hand; that start cannot read the
    ConfigMap (forbidden) while robot is down, so robot's 10 wait in its spool. The next start, `get`
    granted, merges the ConfigMap and robot's spool sends none of what the configMap mode delivered.
    Before: the stale record made that start call the same ConfigMap "unchanged", robot got all 10
    again, though the failed start's WARNING said the seed is tried again."""
    era = new_events(api, "cm", 10)
    await run_once(configmap_mode(api, tmp_path))
    switched = data_dir_mode(api, tmp_path)
    await run_once(switched)
    assert seeds(switched) == only("seeded") and received(switched, "robot") == set()
    assert taken(tmp_path)
    shutil.rmtree(tmp_path / "claim" / "checkpoints")
    api.forbid(TOKEN, verbs={"get"}, resources={"configmaps"})
    with caplog.at_level(logging.WARNING):
        failed = data_dir_mode(api, tmp_path, down=("robot",))
        await run_once(failed)
    assert seeds(failed) == only("failed")
    assert received(failed, "loki") == era  # an empty store: everything again (said in the WARNING)
    api.permit(TOKEN)
    merged = data_dir_mode(api, tmp_path)
    await run_once(merged)
    assert received(merged, "robot") == received(merged, "loki") == set()
    assert seeds(merged) == only("seeded")
    assert taken(tmp_path) == configmap_state(api)


async def test_a_failed_read_at_a_switch_back_says_what_the_sinks_get_again(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dataDir → configMap → dataDir on the kept claim with `get` forbidden: loki gets period 2's
    again (item 304's Left), and the one WARNING says so. Before: it said only "starting from the data
    dir's own checkpoint; the seed is tried again at the next start"."""
    new_events(api, "p1", 3)
    await run_once(data_dir_mode(api, tmp_path))
    p2 = new_events(api, "p2", 5)
    await run_once(configmap_mode(api, tmp_path))
    api.forbid(TOKEN, verbs={"get"}, resources={"configmaps"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        r = data_dir_mode(api, tmp_path)
        await run_once(r)
    assert seeds(r) == only("failed") and received(r, "loki") == p2
    [said] = seed_warnings(caplog)
    assert said.startswith(f"checkpoint seed: cannot read ConfigMap {WHERE} (403 Forbidden"), said
    assert said.endswith(
        "starting from the data dir's own checkpoint; the seed is tried again at the next start; this "
        "start sends each sink again what a configMap-mode router delivered since this data dir last "
        f"took ConfigMap {WHERE} (if one ran in between: a switch back) and the API server still holds"
    ), said


async def test_the_seeds_line_names_a_few_sinks_not_configured_each_quoted_when_not_plain(
    api: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ConfigMap with 40 sinks this router does not configure, one named with a line break: the
    INFO line names 10 (the odd one quoted, on the same line) and counts the rest. Before: all 40, the
    line break in the log as written."""
    events = new_events(api, "cm", 2)
    order = sorted(uid for uid, _ in events)
    others = {f"old{i:02d}": dict.fromkeys(order, 1) for i in range(39)}
    others["a\nFAKE log line"] = dict.fromkeys(order, 1)
    api.create_object(
        "configmaps",
        {
            "metadata": {"name": NAME, "namespace": NS},
            "binaryData": {DATA_KEY: base64.b64encode(encode_state(others, order)).decode()},
        },
    )
    caplog.clear()
    with caplog.at_level(logging.INFO):
        r = data_dir_mode(api, tmp_path)
        await run_once(r)
    assert seeds(r) == only("seeded")
    [line] = [rec.getMessage() for rec in caplog.records if "not configured, ignored" in rec.getMessage()]
    shown = ", ".join(["'a\\nFAKE log line'"] + [f"old{i:02d}" for i in range(9)])
    assert line.endswith(f"; not configured, ignored: {shown} and 30 more"), line


# ---- item 313: the configMap mode's own load() reads all its writer writes --------------------------


@pytest.fixture
async def kube(api: FakeApiServer, tmp_path: Path) -> AsyncIterator[KubeClient]:
    client = await connect(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"))
    yield client
    await client.close()


def store(kube: KubeClient) -> cc.ConfigMapCheckpointStore:
    return cc.ConfigMapCheckpointStore(kube, namespace=NS, name=NAME, flush_interval=0.1)


def uuids(n: int) -> list[str]:
    rng = random.Random(313)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


def stored_blob(api: FakeApiServer) -> bytes:
    return base64.b64decode(api.get_object("configmaps", NS, NAME)["binaryData"][DATA_KEY])


# KubeClient.request hands the store's ~1 MiB body to aiohttp as bytes: "might lock the event loop" (a
# ResourceWarning, ignored outside tests), as in test_configmap_checkpoint.py.
@pytest.mark.filterwarnings("ignore:Sending a large body directly with raw bytes:ResourceWarning")
async def test_the_configmap_mode_loads_every_sink_of_an_honest_checkpoint_its_writer_wrote(
    api: FakeApiServer, kube: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The store writes 73 sinks (a robot per team) x 58,000 UUIDs, each sink one occurrence ahead at
    one uid of its own (r309 F1): 969 KB, within the 1 MiB. A new leader's load() reads every sink's
    58,000 entries, no ERROR. The dataDir seed's bounded decode still refuses it (a failed seed there
    destroys nothing). Before: load() said "unreadable (more sinks differing at more uids ...); starting
    empty" and every lease-take sent every sink everything the API server held again."""
    ids = uuids(58_000)
    writer = store(kube)
    await writer.load()
    wrote: dict[str, dict[str, int]] = {}
    for i in range(73):
        acks = dict.fromkeys(ids, 1)
        acks[ids[i]] = 2
        SinkCheckpoint(writer.backend(f"robot-team-{i:03d}")).ack(acks)
        wrote[f"robot-team-{i:03d}"] = acks
    assert await writer.flush()
    assert writer.truncations == 0 and writer.last_size <= cc.CONFIGMAP_LIMIT
    with pytest.raises(CheckpointFormatError, match="more sinks differing at more uids"):
        decode_columns(stored_blob(api))  # the seed's bounds: unchanged
    caplog.clear()
    leader = store(kube)
    with caplog.at_level(logging.WARNING):
        await leader.load()
    assert not [rec.getMessage() for rec in caplog.records]
    for sink, acks in wrote.items():
        assert SinkCheckpoint(leader.backend(sink)).state == acks, sink


async def test_a_memory_error_at_the_configmap_modes_load_fails_the_lease_take_and_keeps_the_configmap(
    api: FakeApiServer, kube: KubeClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An honest checkpoint of 5,000 entries; the new leader's decode raises MemoryError once (this
    process short of memory: injected at the decoder, as r309 F2's script does). load() raises it (the
    lease-take fails, as before item 309), says nothing is unreadable, and the ConfigMap is as written;
    the next load() reads all 5,000. Before: ERROR "unreadable (... MemoryError); starting empty", and
    the leader's first write replaced the honest checkpoint with its one new entry."""
    ids = uuids(5_000)
    writer = store(kube)
    await writer.load()
    SinkCheckpoint(writer.backend("loki")).ack(dict.fromkeys(ids, 1))
    assert await writer.flush()
    before = api.get_object("configmaps", NS, NAME)
    real = cc.decode_columns
    calls: list[bytes] = []

    def short_of_memory(blob: bytes, bounded: bool = True) -> tuple[list[str], list[list[int]], list[str]]:
        if not calls:
            calls.append(blob)
            raise MemoryError
        return real(blob, bounded)

    monkeypatch.setattr(cc, "decode_columns", short_of_memory)
    leader = store(kube)
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(MemoryError):
        await leader.load()
    assert calls and not caplog.records, [rec.getMessage() for rec in caplog.records]
    assert api.get_object("configmaps", NS, NAME) == before
    await leader.load()  # the next lease-take
    assert SinkCheckpoint(leader.backend("loki")).state == dict.fromkeys(ids, 1)


async def test_the_writer_packs_at_level_6_only_what_its_reader_unpacks(
    api: FakeApiServer, kube: KubeClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """95 sinks, each at a different count (near int32's top) of every uid: 6 bytes of diff per sink and
    uid that Huffman-only packs past the limit and level 6 packs within it. The writer packs level 6
    only a state that unpacks within MAX_UNPACKED, else leaves the oldest out (counted) until it does, so
    a new leader's load() reads what was written. At scale (MAX_UNPACKED 1 MiB, a 128 KiB limit: the
    full size, 95 sinks x 30,000 uids, takes 20 s and 400 MiB; /tmp/s35/findings/fix-seed4.md). Before:
    the writer wrote 1.25 MB in level 6 and the reader refused it (decompresses past the bound:
    every lease-take started empty)."""
    monkeypatch.setattr(cc, "MAX_UNPACKED", 1024 * 1024)
    ids = uuids(2_200)
    writer = cc.ConfigMapCheckpointStore(kube, namespace=NS, name=NAME, flush_interval=0.1, limit=128 * 1024)
    await writer.load()
    count = {f"s{i:03d}": 2**31 - 1 - i for i in range(95)}
    for sink, n in count.items():
        SinkCheckpoint(writer.backend(sink)).ack(dict.fromkeys(ids, n))
    assert await writer.flush()
    blob = stored_blob(api)
    assert blob[0] == 1 and len(zlib.decompress(blob[1:])) <= cc.MAX_UNPACKED
    assert writer.truncations == 1
    caplog.clear()
    leader = store(kube)
    with caplog.at_level(logging.ERROR):
        await leader.load()
    assert not [rec.getMessage() for rec in caplog.records]
    kept = ids[-len(SinkCheckpoint(leader.backend("s000")).state) :]
    assert 0 < len(kept) < len(ids)
    for sink, n in count.items():
        assert SinkCheckpoint(leader.backend(sink)).state == dict.fromkeys(kept, n), sink
