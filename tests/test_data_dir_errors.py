"""A data dir that cannot be written (a full disk, a failed volume): the router keeps delivering,
counts and logs every failed write, loses nothing, and is durable again once the disk is.

The failures are the kernel's own: a file size limit (``RLIMIT_FSIZE``, which fails a write part way
through, as a disk filling up does) in a child process, and folders taken away under the router."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson

from eventrouter.engine.checkpoint import FileCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.testing import make_occurrence
from eventrouter.testing.waiting import until


def test_a_write_that_fails_part_way_leaves_no_torn_line_behind(tmp_path: Path) -> None:
    """Each append-only file (spool, checkpoint journal, dead letters) under a size limit that cuts a
    record in two: the failed record is gone whole, and the next one (after the limit is lifted)
    reads back intact. Without the cut-back the next record was glued onto the torn one and lost."""
    script = textwrap.dedent(
        """
        import json, resource, sys
        from pathlib import Path
        from eventrouter.engine.checkpoint import FileCheckpoint
        from eventrouter.engine.deadletter import DeadLetter
        from eventrouter.engine.spool import Spool
        from eventrouter.testing import make_occurrence

        tmp = Path(sys.argv[1])
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        first, failed, last = (make_occurrence(message=m * 300) for m in "abc")
        out = {}

        spool = Spool(tmp / "spool", max_bytes=10_000_000)
        spool.append(first)
        size = spool.bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # inside the next record
        try:
            spool.append(failed)
        except OSError as exc:
            out["spool_error"] = exc.strerror
        out["spool_file_after_error"] = (tmp / "spool" / next((tmp / "spool").glob("*.seg")).name).stat().st_size
        out["spool_writable"] = spool.writable
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        spool.append(last)
        spool.close()
        again = Spool(tmp / "spool", max_bytes=10_000_000)
        out["spool_read"] = [o.record["message"][:1] for o in again.pop(10)]
        out["spool_unreadable"] = again.unreadable
        out["spool_size"] = size

        journal = FileCheckpoint(tmp / "cp", "s")
        journal.record({"uid-1": 1})
        size = journal.journal.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 5, hard))
        try:
            journal.record({"uid-2": 2})
        except OSError as exc:
            out["journal_error"] = exc.strerror
        out["journal_file_after_error"] = journal.journal.stat().st_size - size
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        journal.record({"uid-3": 3})
        out["journal_read"] = FileCheckpoint(tmp / "cp", "s").load()

        dead = DeadLetter(tmp / "dl.jsonl", sink="s")
        dead.write([(first, "no")])
        size = (tmp / "dl.jsonl").stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
        out["deadletter_written"] = dead.write([(failed, "no")])
        out["deadletter_file_after_error"] = (tmp / "dl.jsonl").stat().st_size - size
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        dead.write([(last, "no")])
        out["deadletter_read"] = [
            json.loads(line)["record"]["message"][:1] for line in (tmp / "dl.jsonl").read_text().splitlines()
        ]
        print(json.dumps(out))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["spool_error"] == "File too large"
    assert out["spool_file_after_error"] == out["spool_size"]  # cut back to the last whole record
    assert out["spool_writable"] is False  # not tried again for a while
    assert out["spool_read"] == ["a", "c"] and out["spool_unreadable"] == 0
    assert out["journal_error"] == "File too large" and out["journal_file_after_error"] == 0
    assert out["journal_read"] == {"uid-1": 1, "uid-3": 3}
    assert out["deadletter_written"] is False and out["deadletter_file_after_error"] == 0
    assert out["deadletter_read"] == ["a", "c"]


def test_a_dead_letter_written_after_a_kill_cut_the_last_one_short_reads_back_and_replays(
    tmp_path: Path,
) -> None:
    """A kill (SIGKILL, the OOM killer) during a dead-letter append leaves part of a line at the end
    of the file. The restarted router glued its next dead letter onto it, so that one was unreadable
    too, although counted and acknowledged: replay skipped it. Item 4 for the file sink, now for the
    dead-letter file: the fragment is ended as a line of its own first."""
    path = tmp_path / "deadletter" / "mem.jsonl"
    before = [make_occurrence(object_name=f"before-{i}") for i in range(3)]
    assert DeadLetter(path, sink="mem").write([(occ, "HTTP 400") for occ in before])
    os.truncate(path, path.stat().st_size - 700)  # the last letter's write cut short by the kill
    after = [make_occurrence(object_name=f"after-{i}") for i in range(3)]
    letters = DeadLetter(path, sink="mem")  # the restarted router
    assert letters.write([(occ, "HTTP 400") for occ in after[:2]])
    assert letters.write([(occ, "HTTP 400") for occ in after[2:]])
    lines = path.read_bytes().splitlines()
    assert len(lines) == 6  # the fragment is a line of its own
    kept = [*before[:2], *after]
    assert [orjson.loads(line)["key"] for line in lines[:2] + lines[3:]] == [occ.key for occ in kept]
    out = tmp_path / "replayed.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "replay", str(path), f"--sink=file:{out}?name=mem"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "line 3 is not JSON" in done.stderr  # the fragment, skipped and said
    replayed = {(r["uid"], r["occurrence"]) for r in map(json.loads, out.read_text().splitlines())}
    assert replayed == {(occ.uid, occ.number) for occ in kept}


async def test_a_checkpoint_that_cannot_be_written_is_retried_as_a_whole_snapshot(tmp_path: Path) -> None:
    folder = tmp_path / "cp"
    events: list[OSError | None] = []
    cp = SinkCheckpoint(FileCheckpoint(folder, "s"))
    cp.on_write = events.append
    cp.ack({"a": 1})
    shutil.rmtree(folder)  # the volume is gone
    cp.ack({"b": 2})  # never raises into the pipeline
    cp.forget(["a"])
    assert not cp.durable and len(events) == 1 and isinstance(events[0], OSError)
    assert cp.state == {"b": 2}  # the table in memory stays right
    cp.retry()  # within retry_interval (5 s): not tried again
    cp.ack({"c": 3})
    assert cp.write_errors == 1
    folder.mkdir()

    # The first write once retry_interval has passed is a whole snapshot: the journal missed lines.
    def retried() -> bool:
        cp.retry()
        return cp.durable

    await until(retried, timeout=cp.retry_interval + 5)
    assert events[-1] is None and cp.write_errors == 1
    assert FileCheckpoint(folder, "s").load() == {"b": 2, "c": 3}
    cp.ack({"d": 4})  # back to journal lines
    assert FileCheckpoint(folder, "s").load() == {"b": 2, "c": 3, "d": 4}


def test_an_occurrence_offered_while_the_spool_cannot_be_written_waits_behind_it(tmp_path: Path) -> None:
    """A failed spool write while older occurrences are spooled: the new one went into the memory
    queue, ahead of them. Its event's older occurrence, still spooled, was then skipped as a copy by
    the checkpoint: lost, counted nowhere. Now it waits behind the spool and arrives after it."""
    script = textwrap.dedent(
        """
        import asyncio, json, logging, resource, sys
        from pathlib import Path
        from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
        from eventrouter.engine.deadletter import DeadLetter
        from eventrouter.engine.pipeline import Pipeline
        from eventrouter.engine.spool import Spool
        from eventrouter.metrics import Metrics
        from eventrouter.options import PipelineOptions
        from eventrouter.sink import SinkContext
        from eventrouter.testing import MemorySink, MemorySinkOptions, make_occurrence

        async def main() -> dict:
            tmp = Path(sys.argv[1])
            metrics = Metrics()
            ctx = SinkContext(name="mem", cluster="t", data_dir=None, logger=logging.getLogger("mem"))
            sink = MemorySink(MemorySinkOptions.model_validate({}), ctx)
            spool = Spool(tmp / "spool", max_bytes=10_000_000)
            options = {"batch_max_wait": 0.01, "queue_max_events": 10, "batch_max_events": 5}
            p = Pipeline(
                name="mem", sink=sink, options=PipelineOptions.model_validate(options), predicate=None,
                checkpoint=SinkCheckpoint(MemoryCheckpoint()), deadletter=DeadLetter(None, sink="mem"),
                metrics=metrics, spool=spool,
            )
            for _ in range(10):
                p.offer(make_occurrence())  # the memory queue is full
            p.offer(make_occurrence(uid="uid-a", count=1))  # spilled
            for _ in range(5):
                p._queue.popleft()  # room in memory again, as after a batch was taken
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (spool.bytes, hard))  # the disk is full
            p.offer(make_occurrence(uid="uid-a", count=2))
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            out = {"spool": len(spool), "queued": len(p._queue), "depth": p.depth}
            task = asyncio.create_task(p.run())
            await p.wait_idle(10)
            p.close()
            await task
            out["uid_a"] = [n for uid, n in sink.keys if uid == "uid-a"]
            out["delivered"] = len(sink.keys)
            out["skipped"] = metrics.skipped.labels("mem")._value.get()
            out["spool_errors"] = metrics.data_dir_errors.labels("mem", "spool")._value.get()
            out["dropped"] = metrics.dropped.labels("mem", "spool_error")._value.get()
            return out

        print(json.dumps(asyncio.run(main())))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["spool"] == 1 and out["queued"] == 5 and out["depth"] == 7  # one waits behind the spool
    assert out["spool_errors"] == 1 and out["dropped"] == 0
    assert out["uid_a"] == [1, 2] and out["delivered"] == 7 and out["skipped"] == 0


def test_records_dropped_over_the_bound_by_a_spill_whose_write_fails_are_counted(tmp_path: Path) -> None:
    """A spill drops the spool's oldest segment to make room, then its own write fails (the disk
    full): the append raised, so the dropped keys never reached the pipeline. Those occurrences were
    gone from the disk and counted nowhere. Now they are counted as spool_full and logged."""
    script = textwrap.dedent(
        """
        import json, logging, resource, sys
        from pathlib import Path
        from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
        from eventrouter.engine.deadletter import DeadLetter
        from eventrouter.engine.pipeline import Pipeline
        from eventrouter.engine.spool import Spool
        from eventrouter.metrics import Metrics
        from eventrouter.options import PipelineOptions
        from eventrouter.sink import SinkContext
        from eventrouter.testing import MemorySink, MemorySinkOptions, make_occurrence

        tmp = Path(sys.argv[1])
        metrics = Metrics()
        ctx = SinkContext(name="mem", cluster="t", data_dir=None, logger=logging.getLogger("mem"))
        sink = MemorySink(MemorySinkOptions.model_validate({}), ctx)
        # Small segments: each spilled record fills one, and the bound holds about nine.
        spool = Spool(tmp / "spool", max_bytes=20_000, segment_bytes=1_000)
        p = Pipeline(
            name="mem", sink=sink, options=PipelineOptions.model_validate({"queue_max_events": 1}),
            predicate=None, checkpoint=SinkCheckpoint(MemoryCheckpoint()),
            deadletter=DeadLetter(None, sink="mem"), metrics=metrics, spool=spool,
        )
        occs = [make_occurrence(object_name=f"m-{i}", message="x" * 1500) for i in range(12)]
        for occ in occs[:11]:
            p.offer(occ)  # one in memory, the rest spilled (the oldest dropped over the bound)
        full_before = metrics.dropped.labels("mem", "spool_full")._value.get()
        spooled = len(spool)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))  # the next write fails
        p.offer(occs[11])
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        full = metrics.dropped.labels("mem", "spool_full")._value.get()
        print(json.dumps({
            "spooled_before": spooled, "spooled_after": len(spool), "full_before": full_before,
            "full": full, "in_memory": p.depth - len(spool),
            "errors": metrics.data_dir_errors.labels("mem", "spool")._value.get(),
        }))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["errors"] == 1 and out["in_memory"] == 2  # the failed spill waits in memory
    lost = out["spooled_before"] - out["spooled_after"]
    assert lost > 0  # the append dropped the oldest segment before its write failed
    assert out["full"] - out["full_before"] == lost  # each counted
    assert "dropped oldest occurrence" in run.stderr
