"""file sink: JSON lines with size-based rotation, durability and external rotation, on a real file system."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from eventrouter import OK, Occurrence, OutcomeKind, SinkContext, SinkError, normalise
from eventrouter.config import build_spec, parse_sink_flag
from eventrouter.plugins import discover
from eventrouter.testing import event_object, make_occurrence, recorded_watch
from eventrouter_sinks.file import FileOptions, FileSink


def context() -> SinkContext:
    return SinkContext(name="file", cluster="test", data_dir=None, logger=logging.getLogger("test.file"))


def make_sink(**options: object) -> FileSink:
    # Rotation is tested on a few small lines: a max_bytes below the floor (1 MiB, which refuses
    # a size meant in MB) is set past the validation.
    small = {"max_bytes": options.pop("max_bytes")} if "max_bytes" in options else {}
    return FileSink(FileOptions.model_validate(options).model_copy(update=small), context())


def fixed(i: int, size: int = 50) -> Occurrence:
    """Occurrences whose JSON lines all have the same length."""
    return make_occurrence(
        uid=f"00000000-0000-0000-0000-{i:012d}",
        name=f"ev-{i:06d}",
        message=f"m{i:06d}".ljust(size, "."),
        first_timestamp="2024-05-01T10:00:00Z",
    )


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_writes_json_lines_from_the_url_and_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "events.jsonl"
    occs = [normalise(e["object"]) for e in recorded_watch() if e["type"] != "DELETED"]
    sink = make_sink(url=f"file:{target}")
    await sink.start()
    assert await sink.send(occs) == [OK] * len(occs)
    await sink.aclose()
    assert [orjson.loads(x) for x in lines_of(target)] == [o.record for o in occs]
    messages = [orjson.loads(x)["message"] for x in lines_of(target)]
    assert any(m.startswith("就绪探针失败") and "\n" in m and '"quoted"' in m for m in messages)
    assert any(len(m) == 20_000 for m in messages)


async def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    target.write_bytes(b'{"old":1}\n')
    sink = make_sink(path=str(target))
    await sink.start()
    await sink.send([fixed(1)])
    await sink.aclose()
    assert lines_of(target) == [b'{"old":1}\n', fixed(1).json + b"\n"]


async def test_rotation_keeps_every_record_once_across_files(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    line = len(fixed(0).json) + 1
    occs = [fixed(i) for i in range(20)]
    assert {len(o.json) + 1 for o in occs} == {line}
    sink = make_sink(path=str(target), max_bytes=3 * line, max_files=10)
    await sink.start()
    # Batches that cross file boundaries inside a batch and between batches.
    for chunk in (occs[0:1], occs[1:6], occs[6:13], occs[13:20]):
        assert await sink.send(chunk) == [OK] * len(chunk)
    await sink.aclose()
    # 20 records, 3 per file: .6 … .1 full, the current file holds the last 2.
    assert files_in(tmp_path) == ["events.jsonl"] + [f"events.jsonl.{i}" for i in range(1, 7)]
    for i in range(1, 7):
        assert len(lines_of(tmp_path / f"events.jsonl.{i}")) == 3
        assert (tmp_path / f"events.jsonl.{i}").stat().st_size == 3 * line
    assert len(lines_of(target)) == 2
    ordered = [tmp_path / f"events.jsonl.{i}" for i in range(6, 0, -1)] + [target]
    everything = [x for p in ordered for x in lines_of(p)]
    assert everything == [o.json + b"\n" for o in occs]


async def test_rotation_removes_the_oldest_beyond_max_files(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    line = len(fixed(0).json) + 1
    occs = [fixed(i) for i in range(20)]
    sink = make_sink(path=str(target), max_bytes=3 * line, max_files=2)
    await sink.start()
    await sink.send(occs[:10])
    await sink.send(occs[10:])
    await sink.aclose()
    assert files_in(tmp_path) == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    kept = lines_of(tmp_path / "events.jsonl.2") + lines_of(tmp_path / "events.jsonl.1") + lines_of(target)
    assert kept == [o.json + b"\n" for o in occs[12:]]


@pytest.mark.parametrize("fsync", [False, True])
async def test_lines_written_before_a_failed_rotation_are_ok_and_written_once(
    tmp_path: Path, fsync: bool
) -> None:
    target = tmp_path / "events.jsonl"
    line = len(fixed(0).json) + 1
    occs = [fixed(i) for i in range(6)]
    sink = make_sink(path=str(target), max_bytes=2 * line, max_files=5, fsync=fsync)
    await sink.start()
    old = {f"events.jsonl.{i}": b'{"old":%d}\n' % i for i in range(1, 5)}  # .1 newest
    for name, content in old.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "events.jsonl.5" / "x").mkdir(parents=True)  # .4 → .5 cannot be renamed: the rotation fails
    outcomes = await sink.send(occs)
    assert outcomes is not None
    # The first two were in the file before the rotation was tried: OK, not sent again.
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * 2 + [OutcomeKind.RETRY] * 4
    assert (
        outcomes[2].reason
        == f"cannot rotate {target} (renaming events.jsonl.4 to events.jsonl.5): Is a directory"
    )
    # Nothing removed nor moved: the full file is aside until a rotation can put it in place.
    assert all((tmp_path / name).read_bytes() == content for name, content in old.items())
    assert lines_of(tmp_path / "events.jsonl.rotating") == [o.json + b"\n" for o in occs[:2]]
    shutil.rmtree(tmp_path / "events.jsonl.5")
    assert await sink.send(occs[2:]) == [OK] * 4  # the engine's retry
    await sink.aclose()
    assert "events.jsonl.rotating" not in files_in(tmp_path)
    everything = [x for p in sorted(tmp_path.iterdir(), reverse=True) for x in lines_of(p)]
    # Two rotations with max_files=5: the oldest backup (.4) went, as any rotation removes it.
    assert everything == [old[f"events.jsonl.{i}"] for i in (3, 2, 1)] + [o.json + b"\n" for o in occs]


async def test_record_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    small, big, after = fixed(1), fixed(2, size=600), fixed(3)
    sink = make_sink(path=str(target), max_bytes=400, max_files=5)
    await sink.start()
    assert await sink.send([small, big, after]) == [OK] * 3
    await sink.aclose()
    assert lines_of(tmp_path / "events.jsonl.2") == [small.json + b"\n"]
    assert lines_of(tmp_path / "events.jsonl.1") == [big.json + b"\n"]
    assert lines_of(target) == [after.json + b"\n"]


async def test_max_bytes_zero_never_rotates(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    sink = make_sink(path=str(target), max_bytes=0)
    await sink.start()
    await sink.send([fixed(i, size=2000) for i in range(50)])
    await sink.aclose()
    assert files_in(tmp_path) == ["events.jsonl"]
    assert len(lines_of(target)) == 50


async def test_reopens_after_external_rotation_and_removal(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    sink = make_sink(path=str(target))
    await sink.start()
    await sink.send([fixed(1)])
    os.rename(target, tmp_path / "events.jsonl.logrotate")  # logrotate's "create" mode
    await sink.send([fixed(2)])
    assert lines_of(tmp_path / "events.jsonl.logrotate") == [fixed(1).json + b"\n"]
    assert lines_of(target) == [fixed(2).json + b"\n"]
    target.unlink()
    await sink.send([fixed(3)])
    assert lines_of(target) == [fixed(3).json + b"\n"]
    target.write_bytes(b"")  # copytruncate: same inode, size back to 0
    await sink.send([fixed(4)])
    await sink.aclose()
    assert lines_of(target) == [fixed(4).json + b"\n"]


async def test_unwritable_path_fails_start_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    target = blocker / "events.jsonl"
    with pytest.raises(SinkError, match=r"file sink cannot write .*not-a-folder/events\.jsonl"):
        await make_sink(path=str(target)).start()
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(SinkError, match=r"a-folder.*(directory|regular file)"):
        await make_sink(path=str(folder)).start()
    with pytest.raises(ValidationError, match="the file sink needs a path"):  # exit 2, before any start
        make_sink()


async def test_write_failure_gives_retry_outcomes_then_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    target = folder / "events.jsonl"
    sink = make_sink(path=str(target))
    await sink.start()
    await sink.send([fixed(1)])
    shutil.rmtree(folder)
    folder.write_text("now a file")  # the folder cannot be recreated
    outcomes = await sink.send([fixed(2), fixed(3)])
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.RETRY] * 2
    assert str(target) in outcomes[0].reason
    folder.unlink()
    assert await sink.send([fixed(2), fixed(3)]) == [OK, OK]
    await sink.aclose()
    assert lines_of(target) == [fixed(2).json + b"\n", fixed(3).json + b"\n"]


async def test_unencodable_record_is_rejected_alone(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    bad = fixed(2)
    bad.record = {**bad.record, "count": 2**70}
    sink = make_sink(path=str(target))
    await sink.start()
    outcomes = await sink.send([fixed(1), bad, fixed(3)])
    await sink.aclose()
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.REJECT, OutcomeKind.OK]
    assert lines_of(target) == [fixed(1).json + b"\n", fixed(3).json + b"\n"]


@pytest.mark.parametrize("given", ["0600", "600", "0o600", " 0600 ", 600, 0o600])
async def test_file_mode_is_octal_and_the_file_opens_again_after_a_restart(
    tmp_path: Path, given: object
) -> None:
    # YAML gives 600 for `file_mode: 600` and 384 (0o600) for `file_mode: 0600`.
    target = tmp_path / "events.jsonl"
    for i in range(2):  # the second start is a restart: it opens the file the first one created
        sink = make_sink(path=str(target), file_mode=given)
        await sink.start()
        assert await sink.send([fixed(i)]) == [OK]
        await sink.aclose()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(lines_of(target)) == 2


def test_file_mode_in_a_sink_flag_is_octal(tmp_path: Path) -> None:
    flag = f"file:{tmp_path}/events.jsonl?file_mode=0640"
    spec = build_spec(parse_sink_flag(flag), where="--sink", plugins=discover())
    assert isinstance(spec.options, FileOptions) and spec.options.file_mode == 0o640


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("0400", "lacks owner write"),  # the sink could not open its own file after a restart
        (420, "read as octal 0420"),  # decimal 0o644, digits all 0-7: read as octal, then refused
        ("rw-r--r--", "octal permissions"),
        ("0689", "octal permissions"),
        ("0o", "octal permissions"),
        ("017777", "less than or equal"),
    ],
)
def test_a_file_mode_that_cannot_work_is_refused_naming_the_option(given: object, error: str) -> None:
    with pytest.raises(ValidationError, match=error) as refused:
        FileOptions.model_validate({"path": "/var/log/events.jsonl", "file_mode": given})
    assert "file_mode" in str(refused.value)


async def test_a_write_abandoned_at_the_send_timeout_is_waited_for_not_repeated(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    occs = [fixed(i) for i in range(5)]
    sink = make_sink(path=str(target))
    await sink.start()
    with sink._writer.lock:  # the file system hangs (NFS): the write waits in its thread
        for _ in range(3):  # as the engine does: each send abandoned at its timeout, then tried again
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await sink.send(occs)
    assert await sink.send(occs) == [OK] * 5  # the write in progress ends and wrote them
    await sink.aclose()
    assert lines_of(target) == [o.json + b"\n" for o in occs]


HUNG_CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys, time
    from eventrouter import SinkContext
    from eventrouter.testing import make_occurrence
    from eventrouter_sinks.file import FileOptions, FileSink

    async def main():
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("x"))
        s = FileSink(FileOptions.model_validate({"path": sys.argv[1]}), ctx)
        await s.start()
        s._writer.lock.acquire()  # the file system hangs for good (NFS): the write waits in its thread
        try:
            async with asyncio.timeout(0.2):  # the engine's send timeout
                await s.send([make_occurrence(message="never")])
        except TimeoutError:
            print("send abandoned", file=sys.stderr)
        started = time.monotonic()
        async with asyncio.timeout(5):  # the engine bounds a close by its send timeout
            await s.aclose()
        print(f"closed in {time.monotonic() - started:.3f}s", file=sys.stderr)

    asyncio.run(main())
    """
)


def test_a_hung_write_holds_up_neither_close_nor_the_process_exit(tmp_path: Path) -> None:
    """The worker was a ThreadPoolExecutor thread, which Python joins at exit: a write hung on the
    file system kept the process from exiting after its shutdown, until SIGKILL."""
    target = tmp_path / "events.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", HUNG_CHILD, str(target)], capture_output=True, timeout=30, check=True
    )
    assert b"send abandoned" in proc.stderr
    closed = re.search(rb"closed in ([0-9.]+)s", proc.stderr)
    assert closed is not None, proc.stderr
    assert float(closed[1]) < 4  # a moment for the write in progress, not all of the engine's bound
    assert target.read_bytes() == b""  # the abandoned batch was not written (nor acknowledged)


async def test_aclose_twice_and_without_start(tmp_path: Path) -> None:
    sink = make_sink(path=str(tmp_path / "x.jsonl"))
    await sink.aclose()
    await sink.start()
    await sink.aclose()
    await sink.aclose()


FSYNC_CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys
    from eventrouter import SinkContext
    from eventrouter.testing import make_occurrence
    from eventrouter_sinks.file import FileOptions, FileSink

    async def main():
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("x"))
        opts = FileOptions.model_validate({"path": sys.argv[1], "fsync": sys.argv[2], "max_bytes": 0})
        s = FileSink(opts, ctx)
        await s.start()
        for batch in range(4):
            await s.send([make_occurrence(message=f"b{batch}-{i}") for i in range(10)])
        await s.aclose()

    asyncio.run(main())
    """
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to observe fsync(2)")
@pytest.mark.parametrize(("fsync", "expected"), [("true", 4 + 1), ("false", 0)])
def test_fsync_option_syncs_once_per_batch(tmp_path: Path, fsync: str, expected: int) -> None:
    """Once per batch, and with fsync the folder once when the file is created (its name is data too:
    without it a power loss could take the new file, fsynced lines and all)."""
    target = tmp_path / "events.jsonl"
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(
        [
            *("strace", "-f", "-e", "trace=fsync,fdatasync,openat", "-o", str(trace)),
            *(sys.executable, "-c", FSYNC_CHILD, str(target), fsync),
        ],
        capture_output=True,
        timeout=60,
    )
    if proc.returncode != 0 and b"ptrace" in proc.stderr:
        pytest.skip("ptrace not permitted here")
    assert proc.returncode == 0, proc.stderr.decode()
    lines = trace.read_text().splitlines()
    calls = [x for x in lines if "fsync(" in x and "= 0" in x]
    assert len(calls) == expected
    if expected:  # the first is the folder's: opened O_DIRECTORY, before any line was written
        (opened,) = [x for x in lines if f'"{tmp_path}"' in x and "O_DIRECTORY" in x]
        folder_fd = opened.rsplit("= ", 1)[1].strip()
        assert calls[0].split("fsync(", 1)[1].startswith(f"{folder_fd})")
    assert len(lines_of(target)) == 40


def _under_strace(
    tmp_path: Path, trace: str, inject: list[str], *argv: str
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under strace, tracing ``trace`` to tmp_path/trace.txt and failing the calls ``inject``
    names (strace's own fault injection: a real EIO from the kernel's side of the call)."""
    injected = [arg for spec in inject for arg in ("-e", f"inject={spec}")]
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", f"trace={trace}", *injected, "-o", str(tmp_path / "trace.txt"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip("ptrace not permitted here")
    return proc


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to fail fsync(2)")
@pytest.mark.parametrize("cut_fails", [False, True])
def test_a_failed_fsync_is_cut_back_so_the_retry_writes_each_record_once(
    tmp_path: Path, cut_fails: bool
) -> None:
    """The real `eventrouter replay`; the second fsync (the first batch's, after the folder's) fails
    with EIO. Its lines were in the file already: the retry appended them a second time (1100 lines
    for 600 records). They are cut off again; if even that fails, the duplicates are logged."""
    recording = tmp_path / "events.json"
    items = [
        event_object(object_name=f"pod-{i}", message=f"m{i}", resource_version=str(1000 + i))
        for i in range(600)
    ]
    recording.write_bytes(
        orjson.dumps({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items})
    )
    out = tmp_path / "out" / "events.jsonl"
    inject = ["fsync:error=EIO:when=2"] + (["ftruncate:error=EIO"] if cut_fails else [])
    proc = _under_strace(
        tmp_path,
        "fsync,ftruncate",
        inject,
        *(sys.executable, "-m", "eventrouter.cli", "replay", str(recording), f"--sink=file:{out}?fsync=true"),
    )
    assert proc.returncode == 0, proc.stderr
    summary = orjson.loads(proc.stderr.splitlines()[-1])["sinks"]["file"]
    assert (summary["delivered"], summary["dropped"], summary["dead_lettered"]) == (600, 0, 0)
    uids = [orjson.loads(x)["uid"] for x in lines_of(out)]
    assert set(uids) == {item["metadata"]["uid"] for item in items}
    if not cut_fails:
        assert len(uids) == 600  # each record exactly once
    else:  # left in the file, and said so
        said = re.search(
            r"the (\d+) lines of this batch stay in it and the retry writes them again", proc.stderr
        )
        assert said is not None, proc.stderr
        assert len(uids) == 600 + int(said[1])
    assert f"cannot fsync {out}: Input/output error" in proc.stderr  # the retry's reason
    injected = [
        x.split()[1].split("(")[0]
        for x in (tmp_path / "trace.txt").read_text().splitlines()
        if "INJECTED" in x
    ]
    assert injected == ["fsync", "ftruncate"] if cut_fails else ["fsync"]


ROTATING_CHILD = textwrap.dedent(
    """
    import asyncio, json, logging, sys
    from eventrouter import OutcomeKind, SinkContext
    from eventrouter.testing import make_occurrence
    from eventrouter_sinks.file import FileOptions, FileSink

    async def main():
        occs = [
            make_occurrence(
                uid=f"00000000-0000-0000-0000-{i:012d}",
                name=f"ev-{i:06d}",
                message=f"m{i:06d}".ljust(50, "."),
                first_timestamp="2024-05-01T10:00:00Z",
            )
            for i in range(6)
        ]
        line = len(occs[0].json) + 1
        opts = FileOptions.model_validate({"path": sys.argv[1], "fsync": True})
        opts = opts.model_copy(update={"max_bytes": 3 * line})  # below the floor: a few lines a file
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("x"))
        s = FileSink(opts, ctx)
        await s.start()
        sends = []
        for batch in (occs[0:2], occs[2:4], occs[4:6]):
            while batch and len(sends) < 10:  # as the engine: what is answered retry is sent again
                outcomes = await s.send(batch)
                sends.append([o.kind.value for o in outcomes])
                batch = [occ for occ, o in zip(batch, outcomes) if o.kind is OutcomeKind.RETRY]
        await s.aclose()
        print(json.dumps({"sends": sends, "lines": [o.json.decode() + "\\n" for o in occs]}))

    asyncio.run(main())
    """
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to fail fsync(2)")
@pytest.mark.parametrize(
    ("when", "sends"),
    [
        # fsyncs: 1 the folder at start; 2 batch [0, 1]; batch [2, 3] rotates after 2 (3 lines a file):
        # 3 before the rotation, 4 the folder after it, 5 the new file with 3; 6 batch [4, 5].
        (2, [["retry", "retry"], ["ok", "ok"], ["ok", "ok"], ["ok", "ok"]]),
        (3, [["ok", "ok"], ["retry", "retry"], ["ok", "ok"], ["ok", "ok"]]),
        (4, [["ok", "ok"], ["ok", "retry"], ["ok"], ["ok", "ok"]]),
        (5, [["ok", "ok"], ["ok", "retry"], ["ok"], ["ok", "ok"]]),
    ],
)
def test_a_failed_fsync_around_a_rotation_cuts_back_only_the_lines_not_yet_answered(
    tmp_path: Path, when: int, sends: list[list[str]]
) -> None:
    """Lines of an earlier batch, and of this one before a rotation, were answered OK and stay; those
    whose fsync failed are cut off (the retry wrote them twice). A failed fsync of the folder after a
    rotation is tried again before the next batch (the reopen found the file there and skipped it)."""
    target = tmp_path / "logs" / "events.jsonl"
    proc = _under_strace(
        tmp_path,
        "fsync,openat",
        [f"fsync:error=EIO:when={when}"],
        *(sys.executable, "-c", ROTATING_CHILD, str(target)),
    )
    assert proc.returncode == 0, proc.stderr
    told = orjson.loads(proc.stdout)
    assert told["sends"] == sends
    assert files_in(target.parent) == ["events.jsonl", "events.jsonl.1"]
    everything = [
        x.decode() for name in ("events.jsonl.1", "events.jsonl") for x in lines_of(target.parent / name)
    ]
    assert everything == told["lines"]  # every record once, in order
    # Which fd each fsync was of: the folder's are opened O_DIRECTORY (then closed; numbers are reused).
    opened: dict[str, str] = {}
    folder_syncs = []
    for entry in (tmp_path / "trace.txt").read_text().splitlines():
        if (m := re.search(r'openat\(AT_FDCWD, "([^"]*)", ([A-Z_|]+).*\) = (\d+)$', entry)) is not None:
            opened[m[3]] = m[1] if "O_DIRECTORY" in m[2] else ""
        elif (m := re.search(r"fsync\((\d+)\) += (\S+)", entry)) and opened.get(m[1]) == str(target.parent):
            folder_syncs.append(m[2])
    # Once for the new file, once after the rotation: a failed one is followed by one that worked.
    assert folder_syncs == (["0", "-1", "0"] if when == 4 else ["0", "0"])


async def test_a_partial_last_line_left_by_a_kill_is_not_merged_with_the_next_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGKILL mid-write leaves a fragment without its newline; the next start must not append
    the first new record to it (that record would be unreadable as a JSON line)."""
    target = tmp_path / "events.jsonl"
    whole = fixed(1).json + b"\n"
    target.write_bytes(whole + fixed(2).json[:30])
    sink = make_sink(path=str(target))
    await sink.start()
    assert await sink.send([fixed(2), fixed(3)]) == [OK, OK]
    await sink.aclose()
    lines = lines_of(target)
    assert lines == [whole, fixed(2).json[:30] + b"\n", fixed(2).json + b"\n", fixed(3).json + b"\n"]
    assert f"{target} ended in a partial line" in caplog.text
    # A file that ends in a newline is appended to as it is.
    sink = make_sink(path=str(target))
    await sink.start()
    await sink.send([fixed(4)])
    await sink.aclose()
    assert lines_of(target)[4:] == [fixed(4).json + b"\n"]


def test_a_file_in_the_url_and_as_path_is_refused() -> None:
    """`file:/a.jsonl?path=/b.jsonl` wrote to /b.jsonl while `check` and the logs named /a.jsonl."""
    with pytest.raises(ValidationError, match="give the file once: in the URL"):
        FileOptions.model_validate({"url": "/var/log/a.jsonl", "path": "/var/log/b.jsonl"})
    spec = build_spec(parse_sink_flag("file:?path=/var/log/b.jsonl"), where="--sink #1", plugins=discover())
    assert spec.describe() == "file (file)" and spec.options.path == "/var/log/b.jsonl"  # type: ignore[attr-defined]
