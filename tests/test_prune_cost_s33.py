"""A prune after a complete list drops the expired events of every sink of a table in one pass
(item 274): each sink's forget per uid (``CheckpointTable.set(i, uid, 0)``) recomputed the whole row,
O(width²) per uid, and 50,000 expired events at 7 sinks held the loop ~2 s. What each backend is told
and what it writes stay as they were: the same removed lists, the same ConfigMap, the same files."""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventrouter.engine.checkpoint import CheckpointTable, FileCheckpoint, MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.configmap_checkpoint import DATA_KEY, ConfigMapCheckpointStore, decode_state
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.fanout import Fanout
from eventrouter.metrics import Metrics
from eventrouter.options import PipelineOptions
from eventrouter.sink import SinkContext
from eventrouter.source.kube import KubeClient, connect
from eventrouter.testing import MemorySink, MemorySinkOptions
from eventrouter.testing.apiserver import FakeApiServer

NS = "monitoring"
SINKS = ["elasticsearch", "file", "kafka", "loki", "sls", "stdout", "webhook"]
UIDS = [f"uid-{i}" for i in range(6)]


class CountingTable(CheckpointTable):
    """Counts the per-cell reads and writes (a forget recomputing a row is ``width`` of them)."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.cells = 0

    def get(self, index: int, uid: str) -> int:
        self.cells += 1
        return super().get(index, uid)

    def set(self, index: int, uid: str, n: int) -> None:
        self.cells += 1
        super().set(index, uid, n)


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[tuple[FakeApiServer, KubeClient]]:
    async with FakeApiServer(token="t0ken") as api:
        client = await connect(kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"))
        yield api, client
        await client.close()


def _pipelines(checkpoints: list[SinkCheckpoint]) -> list[Pipeline]:
    out = []
    for name, checkpoint in zip(SINKS, checkpoints, strict=True):
        context = SinkContext(name=name, cluster="t", data_dir=None, logger=logging.getLogger(name))
        out.append(
            Pipeline(
                name=name,
                sink=MemorySink(MemorySinkOptions.model_validate({}), context),
                options=PipelineOptions.model_validate({}),
                predicate=None,
                checkpoint=checkpoint,
                deadletter=DeadLetter(None, sink=name),
                metrics=Metrics(),
            )
        )
    return out


def _fill(sinks: list[SinkCheckpoint], ids: list[str], seed: int) -> None:
    """Every sink level on most uids; some sinks behind, some ahead, some without a uid at all."""
    rng = random.Random(seed)
    for start in range(0, len(ids), 100):
        batch = dict.fromkeys(ids[start : start + 100], 1)
        for ckpt in sinks:
            ckpt.ack(batch)
    for uid in rng.sample(ids, len(ids) // 4):
        for ckpt in rng.sample(sinks, rng.randint(1, len(sinks))):
            ckpt.ack({uid: rng.randint(2, 5)})
    for uid in rng.sample(ids, len(ids) // 10):
        rng.choice(sinks).forget([uid])


_op = st.one_of(
    st.tuples(st.just("ack"), st.integers(0, 3), st.dictionaries(st.sampled_from(UIDS), st.integers(1, 5))),
    st.tuples(st.just("forget"), st.integers(0, 3), st.lists(st.sampled_from(UIDS), max_size=3)),
    st.tuples(st.just("prune_all"), st.integers(0, 3), st.sets(st.sampled_from(UIDS))),
)


@given(st.integers(1, 4), st.lists(_op, max_size=40))
@settings(max_examples=400, deadline=None)
def test_a_table_wide_removal_leaves_each_sink_as_its_own_prune_did(
    width: int, ops: list[tuple[str, int, object]]
) -> None:
    """``CheckpointTable.remove`` of the uids not listed: each sink's entries and compact layout are as
    if each had pruned alone, and each is handed exactly the uids it held, in the table's order."""
    table = CheckpointTable(width)
    sinks = [SinkCheckpoint(MemoryCheckpoint(), table=table, index=i) for i in range(width)]
    model: list[dict[str, int]] = [{} for _ in range(width)]
    for kind, which, arg in ops:
        i = which % width
        if kind == "ack":
            assert isinstance(arg, dict)
            sinks[i].ack(arg)
            for uid, n in arg.items():
                model[i][uid] = max(model[i].get(uid, 0), n)
        elif kind == "forget":
            assert isinstance(arg, list)
            sinks[i].forget(arg)
            for uid in arg:
                model[i].pop(uid, None)
        else:
            assert isinstance(arg, set)
            dead = [uid for uid in table.entries if uid not in arg]
            assert table.remove(dead) == [[uid for uid in dead if uid in m] for m in model]
            model = [{uid: n for uid, n in m.items() if uid in arg} for m in model]
        for j in range(width):
            assert sinks[j].state == model[j]
        for uid in UIDS:
            numbers = [m.get(uid, 0) for m in model]
            assert table.entries.get(uid) == (max(numbers) or None)
            for j in range(width):
                assert table.behind[j].get(uid) == (numbers[j] if numbers[j] < max(numbers) else None)


def test_the_fanouts_prune_of_seven_sinks_reads_no_cell_per_uid_and_sink() -> None:
    """1,000 expired events at 7 sinks: the fanout's prune removes each uid from the table once. Before,
    each sink's forget read and wrote its row cell by cell: ~63 cell operations per uid."""
    table = CountingTable(len(SINKS))
    sinks = [SinkCheckpoint(MemoryCheckpoint(), table=table, index=i) for i in range(len(SINKS))]
    ids = [f"uid-{i}" for i in range(1000)]
    _fill(sinks, ids, seed=1)
    fanout = Fanout(_pipelines(sinks))
    table.cells = 0
    fanout.prune(set(ids[:100]))
    assert table.cells == 0
    assert set(table.entries) <= set(ids[:100])
    assert not any(table.behind[i].keys() - set(ids[:100]) for i in range(len(SINKS)))


async def test_the_fanouts_prune_writes_the_configmap_and_files_the_per_sink_prune_did(
    kube: tuple[FakeApiServer, KubeClient], tmp_path: Path
) -> None:
    """Two routers' stores of 7 sinks with the same lagging, ahead and missing entries: one pruned by
    the fanout (the table at once), one sink by sink as before. The same uids noted removed, the same
    ConfigMap; in data-dir mode the same journals and snapshots."""
    api, client = kube
    ids = [f"uid-{i:04d}" for i in range(3000)]
    live = set(random.Random(2).sample(ids, 500))
    stores, tables = [], []
    for name in ("by-fanout", "by-sink"):
        store = ConfigMapCheckpointStore(client, namespace=NS, name=name)
        await store.load()
        table = CheckpointTable(len(SINKS))
        sinks = [SinkCheckpoint(store.backend(s), table=table, index=i) for i, s in enumerate(SINKS)]
        _fill(sinks, ids, seed=3)
        assert await store.flush()
        if name == "by-fanout":
            Fanout(_pipelines(sinks)).prune(live)
        else:
            for ckpt in sinks:
                ckpt.prune(live)
        stores.append(store)
        tables.append(table)
    assert stores[0]._removed == stores[1]._removed
    assert stores[0]._removed  # the prune removed something to compare
    assert tables[0].entries == tables[1].entries and tables[0].behind == tables[1].behind
    for store in stores:
        assert await store.flush()
    held = [
        decode_state(base64.b64decode(api.get_object("configmaps", NS, name)["binaryData"][DATA_KEY]))
        for name in ("by-fanout", "by-sink")
    ]
    assert held[0] == held[1]

    files = []
    for name in ("by-fanout", "by-sink"):
        table = CheckpointTable(len(SINKS))
        sinks = [
            SinkCheckpoint(FileCheckpoint(tmp_path / name, s), table=table, index=i)
            for i, s in enumerate(SINKS)
        ]
        _fill(sinks, ids, seed=3)
        if name == "by-fanout":
            Fanout(_pipelines(sinks)).prune(live)
        else:
            for ckpt in sinks:
                ckpt.prune(live)
        files.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert files[0] == files[1]
    assert len(files[0]) == 2 * len(SINKS)
