"""file sink: what its writes and cut-backs may touch (session 30, a review of the local outputs).
Another writer's lines are never cut back, two sinks of one router on one file are refused, a write
that ends after its send was given up is taken back, and a size meant in MB is refused. Real
`eventrouter` processes and real files; strace fails or delays the kernel's side of fsync(2)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from eventrouter import OK, SinkContext
from eventrouter.config import build_spec, parse_sink_flag
from eventrouter.plugins import discover
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.waiting import until
from eventrouter_sinks.file import FileOptions, FileSink

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to fail fsync(2)")


def event_list(path: Path, tag: str, n: int = 100) -> set[str]:
    items = [event_object(object_name=f"{tag}-{i}", message=f"{tag}{i}") for i in range(n)]
    path.write_bytes(orjson.dumps({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items}))
    return {item["metadata"]["uid"] for item in items}


def uids(path: Path) -> list[str]:
    return [orjson.loads(line)["uid"] for line in path.read_bytes().splitlines() if line.startswith(b'{"')]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "eventrouter.cli", *args]


async def under_strace(tmp_path: Path, inject: str, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *("strace", "-f", "-qq", "-e", "trace=fsync", "-e", f"inject={inject}"),
        *("-o", str(tmp_path / "trace.txt"), *argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@needs_strace
@pytest.mark.parametrize("other", ["replay", "plain-append"])
async def test_a_failed_fsync_never_cuts_back_lines_another_writer_wrote(tmp_path: Path, other: str) -> None:
    """The review's two_writers.sh (finding 2): B's batch fsync is held 5 s and then fails with EIO;
    meanwhile another writer appends. B cut the file back to where its batch began, and the lines
    the other wrote and acknowledged went with it (all 100 of a second `eventrouter replay`). Now
    another eventrouter waits for B's lock (flock) and writes after the cut-back; a writer that
    takes no lock keeps its line, and B leaves its own lines there (said, and written again)."""
    out = tmp_path / "events.jsonl"
    out.write_bytes(b"")  # there already (the live router's): B's first fsync is its batch's
    b_uids = event_list(tmp_path / "b.json", "b")
    a_uids = event_list(tmp_path / "a.json", "a")
    b = await under_strace(
        tmp_path,
        "fsync:error=EIO:delay_enter=5000000:when=1",
        *cli("replay", str(tmp_path / "b.json"), f"--sink=file:{out}?fsync=true&batch_max_events=500"),
    )
    try:
        await until(lambda: len(uids(out)) == 100, timeout=30)  # written, its fsync held
        if other == "replay":
            a = await asyncio.create_subprocess_exec(
                *cli("replay", str(tmp_path / "a.json"), f"--sink=file:{out}"),
                stderr=asyncio.subprocess.PIPE,
            )
            _, a_err = await asyncio.wait_for(a.communicate(), 60)
            assert a.returncode == 0, a_err.decode()[-2000:]
            said = orjson.loads(a_err.splitlines()[-1])["sinks"]["file"]
            assert said["delivered"] == 100
        else:
            with out.open("ab") as f:  # no lock: a logrotate helper, a script
                f.write(b'{"uid":"plain"}\n')
        _, b_err = await asyncio.wait_for(b.communicate(), 60)
    finally:
        if b.returncode is None:
            b.kill()
            await b.wait()
    if b.returncode != 0 and b"ptrace" in b_err:
        pytest.skip("ptrace not permitted here")
    assert b.returncode == 0, b_err.decode()[-2000:]
    assert "INJECTED" in (tmp_path / "trace.txt").read_text()
    written = uids(out)
    if other == "replay":
        assert sorted(u for u in written if u in a_uids) == sorted(a_uids)  # every one, once
        assert sorted(u for u in written if u in b_uids) == sorted(b_uids)
    else:
        assert written.count("plain") == 1
        assert (
            "the file is" in b_err.decode() and "stay in it and the retry writes them again" in b_err.decode()
        )
        # B's lines stay where the other's line follows them, and its retry writes them again.
        assert collections.Counter(u for u in written if u in b_uids) == dict.fromkeys(b_uids, 2)


@pytest.mark.parametrize("second", ["same", "through-a-link", "relative"])
def test_two_file_sinks_on_one_file_exit_2_naming_both(tmp_path: Path, second: str) -> None:
    """`check --offline` said both were valid; each would cut back and rotate the other's lines."""
    target = tmp_path / "events.jsonl"
    (tmp_path / "link").symlink_to(tmp_path)
    other = {
        "same": target,
        "through-a-link": tmp_path / "link" / "events.jsonl",
        "relative": Path("events.jsonl"),  # from the folder the router runs in
    }[second]
    args = [f"--sink=file:{target}?name=a", f"--sink=file:{other}?name=b&level=Warning"]
    for command in (["check", "--offline"], ["replay", os.devnull]):
        proc = subprocess.run(
            cli(*command, *args), capture_output=True, text=True, timeout=60, cwd=tmp_path / "link"
        )
        assert proc.returncode == 2, proc.stderr
        assert "sink 'b'" in proc.stderr and "sink 'a'" in proc.stderr and str(target) in proc.stderr
    assert not target.exists()
    ok = subprocess.run(
        cli("check", "--offline", args[0], f"--sink=file:{tmp_path / 'other.jsonl'}?name=b"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("order", ["base-first", "rotated-first"])
def test_a_file_sink_on_another_ones_rotated_file_exits_2_naming_both(tmp_path: Path, order: str) -> None:
    """The second review (item 224): `x.jsonl` beside `x.jsonl.1` passed `check`; the first sink's
    rotation renamed over the second one's file."""
    base = f"--sink=file:{tmp_path / 'x.jsonl'}?name=a&max_files=3"
    args = [base, f"--sink=file:{tmp_path / 'x.jsonl.3'}?name=b"]
    if order == "rotated-first":
        args.reverse()
    proc = subprocess.run(cli("check", "--offline", *args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "sink 'a'" in proc.stderr and "sink 'b'" in proc.stderr and "x.jsonl.3" in proc.stderr
    for ok in (f"--sink=file:{tmp_path / 'x.jsonl.4'}?name=b", f"--sink=file:{tmp_path / 'y.jsonl'}?name=b"):
        done = subprocess.run(cli("check", "--offline", base, ok), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    never = f"--sink=file:{tmp_path / 'x.jsonl'}?name=a&max_bytes=0"  # never rotated: nothing renamed
    done = subprocess.run(
        cli("check", "--offline", never, f"--sink=file:{tmp_path / 'x.jsonl.1'}?name=b"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


GIVEN_UP_CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys
    from eventrouter import SinkContext
    from eventrouter.testing import make_occurrence
    from eventrouter_sinks.file import FileOptions, FileSink

    async def main():
        logging.basicConfig(level=logging.INFO)
        ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("file"))
        s = FileSink(FileOptions.model_validate({"path": sys.argv[1], "fsync": True}), ctx)
        await s.start()
        occs = [make_occurrence(message=f"m{i}") for i in range(5)]
        try:
            async with asyncio.timeout(0.5):  # the engine's send timeout; the fsync is held 1 s
                await s.send(occs)
        except TimeoutError:
            print("cut off", file=sys.stderr)
        if sys.argv[2] == "dead-lettered":
            s.given_up(occs)  # retry_max_attempts spent: dead-lettered
            pool = s._pool
            await asyncio.get_running_loop().run_in_executor(pool, lambda: None)  # after the write
            print("lines now", len(open(sys.argv[1], "rb").read().splitlines()), file=sys.stderr)
        await s.aclose()  # a stop: the batch was spooled
        print("lines at the end", len(open(sys.argv[1], "rb").read().splitlines()), file=sys.stderr)

    asyncio.run(main())
    """
)


@needs_strace
@pytest.mark.parametrize("fate", ["dead-lettered", "spooled-at-a-stop"])
def test_a_write_that_ends_after_its_send_was_given_up_is_taken_back(tmp_path: Path, fate: str) -> None:
    """Findings 1 and 4 on a file system that hangs and recovers (NFS): the batch's fsync is held
    1 s, its send is cut off at 0.5 s, and the engine gives the batch up (dead-lettered, or spooled
    by a stop). The write went on and its lines stayed: in the file and dead-lettered, or in the
    file and written again after the restart. They are cut back off the file once it ends."""
    target = tmp_path / "events.jsonl"
    target.write_bytes(b'{"old":1}\n')  # there already: the first fsync is the batch's
    proc = subprocess.run(
        [
            *("strace", "-f", "-qq", "-e", "trace=fsync", "-e", "inject=fsync:delay_enter=1000000:when=1"),
            *("-o", str(tmp_path / "trace.txt"), sys.executable, "-c", GIVEN_UP_CHILD, str(target), fate),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr:
        pytest.skip("ptrace not permitted here")
    assert proc.returncode == 0, proc.stderr
    assert "cut off" in proc.stderr and "DELAYED" in (tmp_path / "trace.txt").read_text()
    if fate == "dead-lettered":
        assert "lines now 1" in proc.stderr
    assert "lines at the end 1" in proc.stderr, proc.stderr
    assert target.read_bytes() == b'{"old":1}\n'
    assert re.search(r"took back the 5 lines of a batch written after its send was given up", proc.stderr)


@pytest.mark.parametrize("given", ["max_size=100", "max_bytes=100", "max_size=65535"])
def test_a_max_bytes_meant_in_mb_exits_2_saying_it_is_bytes(tmp_path: Path, given: str) -> None:
    """The review's finding 3: lumberjack's and kube-eventer's maxsize is in MB; max_size=100 rotated
    at every record, and `replay` deleted 122 of 126 records, each counted as delivered."""
    out = tmp_path / "events.jsonl"
    proc = subprocess.run(
        cli("replay", os.devnull, f"--sink=file:{out}?{given}&max_backups=3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    option = given.split("=")[0]
    assert f"option '{option}'" in proc.stderr and "in bytes" in proc.stderr and "100Mi" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("given", "value"),
    [
        ("100Mi", 100 * 2**20),
        ("1Gi", 2**30),
        ("500M", 500 * 10**6),
        ("1048576", 2**20),
        ("1M", 10**6),
        ("65536", 2**16),
        ("0", 0),
    ],
)
def test_max_bytes_takes_a_size_with_its_unit(given: str, value: int) -> None:
    spec = build_spec(
        parse_sink_flag(f"file:/var/log/events.jsonl?max_size={given}&max_backups=3"),
        where="--sink",
        plugins=discover(),
    )
    assert isinstance(spec.options, FileOptions)
    assert (spec.options.max_bytes, spec.options.max_files) == (value, 3)


def test_check_fails_a_link_to_a_folder_that_is_not_there(tmp_path: Path) -> None:
    """`check` said ok for a dangling link, which `start` then failed for ever (ENOENT through it)."""
    link = tmp_path / "events.jsonl"
    link.symlink_to(tmp_path / "missing" / "dir" / "events.jsonl")
    proc = subprocess.run(cli("check", f"--sink=file:{link}"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "symbolic link" in proc.stdout and "missing/dir" in proc.stdout
    # A link to a file not made yet, in a folder that is there: start creates it through the link.
    (tmp_path / "missing" / "dir").mkdir(parents=True)
    proc = subprocess.run(cli("check", f"--sink=file:{link}"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr
    assert not (tmp_path / "missing" / "dir" / "events.jsonl").exists()


async def test_a_record_given_up_after_the_write_ended_never_takes_back_lines_answered_ok(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The second review's givenup_race.py (item 224): the worker has written the batch, and before
    the send resumes another callback on the loop gives up a copy of one of its records. The job was
    taken for abandoned: the send answered all 10 OK and the take-back then cut all 10 off the file."""
    path = tmp_path / "events.jsonl"
    ctx = SinkContext(name="file", cluster="c", data_dir=None, logger=logging.getLogger("test.race"))
    s = FileSink(FileOptions.model_validate({"path": str(path)}), ctx)
    await s.start()
    occs = [make_occurrence(object_name=f"p-{i}") for i in range(10)]
    try:
        task = asyncio.create_task(s.send(occs))
        await asyncio.sleep(0)  # the send hands its batch to the sink's thread
        pool = s._pool
        assert pool is not None
        # The loop held (other callbacks of one iteration) until that thread is done with the batch.
        pool.submit(lambda: None).result(timeout=10)
        with caplog.at_level(logging.WARNING, logger="test.race"):
            s.given_up([occs[3]])  # a copy waiting aside, dropped
            outcomes = await task
        await asyncio.get_running_loop().run_in_executor(pool, lambda: None)  # a take-back, if queued
        in_file = uids(path)
        assert outcomes is not None and all(out is OK for out in outcomes)
        assert sorted(in_file) == sorted(occ.record["uid"] for occ in occs)
        assert occs[3].key in caplog.text and "given up" in caplog.text
    finally:
        await s.aclose()
