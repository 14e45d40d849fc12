"""Every sink's checkpoint lives in one shared table: it must behave as one dict per sink."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from eventrouter.engine.checkpoint import CheckpointTable, FileCheckpoint, MemoryCheckpoint, SinkCheckpoint

UIDS = [f"uid-{i}" for i in range(6)]
_op = st.one_of(
    st.tuples(st.just("ack"), st.integers(0, 3), st.dictionaries(st.sampled_from(UIDS), st.integers(1, 5))),
    st.tuples(st.just("forget"), st.integers(0, 3), st.lists(st.sampled_from(UIDS), max_size=3)),
    st.tuples(st.just("prune"), st.integers(0, 3), st.sets(st.sampled_from(UIDS))),
)


@given(st.integers(1, 4), st.lists(_op, max_size=40))
@settings(max_examples=400, deadline=None)
def test_a_shared_table_behaves_as_one_dict_per_sink(width: int, ops: list[tuple[str, int, object]]) -> None:
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
            sinks[i].prune(arg)
            model[i] = {uid: n for uid, n in model[i].items() if uid in arg}
        for j in range(width):
            assert sinks[j].state == model[j]
            assert all(sinks[j].accepted(uid) == model[j].get(uid, 0) for uid in UIDS)
        # Compact: one int per uid (the highest any sink holds), a sink's own number only where it is
        # lower, and nothing for a uid no sink holds.
        for uid in UIDS:
            numbers = [m.get(uid, 0) for m in model]
            assert table.entries.get(uid) == (max(numbers) or None)
            for j in range(width):
                assert table.behind[j].get(uid) == (numbers[j] if numbers[j] < max(numbers) else None)


def test_each_sink_persists_and_reloads_only_its_own_numbers(tmp_path: Path) -> None:
    table = CheckpointTable(2)
    a = SinkCheckpoint(FileCheckpoint(tmp_path, "a"), table=table, index=0)
    b = SinkCheckpoint(FileCheckpoint(tmp_path, "b"), table=table, index=1)
    a.ack({"x": 3, "y": 1})
    b.ack({"x": 3})
    assert (table.entries, table.behind) == ({"x": 3, "y": 1}, ({}, {"y": 0}))
    a.close()
    b.close()
    again = CheckpointTable(2)
    a2 = SinkCheckpoint(FileCheckpoint(tmp_path, "a"), table=again, index=0)
    b2 = SinkCheckpoint(FileCheckpoint(tmp_path, "b"), table=again, index=1)
    assert (a2.state, b2.state) == ({"x": 3, "y": 1}, {"x": 3})
    assert (again.entries, again.behind) == ({"x": 3, "y": 1}, ({}, {"y": 0}))


def test_share_keys_rekeys_on_the_given_strings_and_changes_nothing_else() -> None:
    table = CheckpointTable(2)
    sinks = [SinkCheckpoint(MemoryCheckpoint(), table=table, index=i) for i in range(2)]
    loaded = ["-".join(["a", str(i)]) for i in range(3)]  # strings of their own, as read from a file
    for sink in sinks:
        sink.ack({loaded[0]: 2, loaded[1]: 1})
    sinks[0].ack({loaded[2]: 4})  # sink 1 lags: its own number is kept aside
    before = [sink.state for sink in sinks]
    entries = table.entries
    tracker_uids = ["-".join(["a", str(i)]) for i in (0, 2, 7)]  # equal, distinct objects; a-7 unknown
    assert table.share_keys(tracker_uids) == 2
    assert table.entries is entries  # readers keep its .get
    assert [sink.state for sink in sinks] == before
    keyed_on = {uid: uid for uid in table.entries}
    assert keyed_on["a-0"] is tracker_uids[0] and keyed_on["a-2"] is tracker_uids[1]
    assert keyed_on["a-1"] is loaded[1]  # not tracked: kept as it was (the prune decides about it)
    assert next(iter(table.behind[1])) is tracker_uids[1]
    assert [sink.accepted("a-2") for sink in sinks] == [4, 0]


def test_a_sink_far_behind_the_others_costs_no_object_per_entry() -> None:
    # Six sinks accept a relist of 3,000 events while the seventh has none of them yet: the table
    # must not hold a Python object per event for that (a row per event kept the relist's arenas).
    table = CheckpointTable(7)
    sinks = [SinkCheckpoint(MemoryCheckpoint(), table=table, index=i) for i in range(7)]
    uids = [f"uid-{i:05d}" for i in range(3000)]
    gc.collect()
    before = len(gc.get_objects())
    for sink in sinks[:6]:
        sink.ack(dict.fromkeys(uids, 1))
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert [sinks[6].accepted(u) for u in uids[:3]] == [0, 0, 0] and sinks[0].accepted(uids[0]) == 1
    sinks[6].ack(dict.fromkeys(uids, 1))  # caught up: nothing kept aside any more
    assert table.behind == ({},) * 7 and len(table.entries) == 3000


def test_an_ack_journalled_after_a_kill_cut_the_last_line_short_is_read_back(tmp_path: Path) -> None:
    """A kill mid-append leaves part of a journal line; the load skips it (that batch is delivered
    again). The restarted router's first ack was glued onto the fragment and lost with it: a later
    crash delivered it again too."""
    first = SinkCheckpoint(FileCheckpoint(tmp_path, "s"))
    first.ack({"a": 1})
    first.ack({"b": 2})
    journal = tmp_path / "s.journal"
    os.truncate(journal, journal.stat().st_size - 2)  # "+ b 2\n" cut to "+ b "
    again = SinkCheckpoint(FileCheckpoint(tmp_path, "s"))  # the restarted router
    assert again.state == {"a": 1}
    again.ack({"c": 3})
    again.forget(["a"])
    again.ack({"d": 4})
    assert FileCheckpoint(tmp_path, "s").load() == {"c": 3, "d": 4}
