"""stdout sink (session 32, a review of the stdout and file sinks): stdout redirected to a regular file
whose write hangs (a stalled disk, NFS) could land a whole batch after it was spooled or dead-lettered,
and nothing said so; and the keys a send answered OK while an earlier write was still stuck were
reported at the close as written twice. strace holds the write(2) to the file; the pipe is real."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import io
import itertools
import logging
import os
import shutil
import sys
import termios
import textwrap
from pathlib import Path

import orjson
import pytest

from eventrouter import OK, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.waiting import until
from eventrouter_sinks.stdout import StdoutOptions, StdoutSink

HUNG_CHILD = textwrap.dedent(
    """
    import asyncio, contextlib, logging, sys
    from pathlib import Path
    from eventrouter import SinkContext
    from eventrouter.testing import make_occurrence
    from eventrouter.testing.waiting import until
    from eventrouter_sinks.stdout import StdoutOptions, StdoutSink

    async def main():
        trace, fate = Path(sys.argv[1]), sys.argv[2]
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
        ctx = SinkContext(name="stdout", cluster="c", data_dir=None, logger=logging.getLogger("stdout"))
        sink = StdoutSink(StdoutOptions.model_validate({}), ctx)
        await sink.start()
        batch = [make_occurrence(message=f"m{i}") for i in range(50)]
        print("keys", *(occ.key for occ in batch), file=sys.stderr)
        send = asyncio.ensure_future(sink.send(batch))
        await until(lambda: "write(1, " in trace.read_text(), timeout=60)  # the batch's write(2), held
        if fate == "spooled-at-a-stop":
            sink.stop_sending()  # the drain deadline passed
            outcomes = await send
            print("answered", *sorted({o.kind.name for o in outcomes}), file=sys.stderr)
        else:
            send.cancel()  # the engine's send timeout
            with contextlib.suppress(asyncio.CancelledError):
                await send
            sink.given_up(batch)  # retries spent: dead-lettered
        await sink.aclose()
        print("unsettled", sink.unsettled, file=sys.stderr, flush=True)
        # The test lets the write go (the file system recovers) and it lands, all of it.
        await until(lambda: len(Path("/dev/stdout").read_bytes().splitlines()) == 50, timeout=60)
        print("landed; unsettled", sink.unsettled, file=sys.stderr)

    asyncio.run(main())
    """
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to hold write(2)")
@pytest.mark.parametrize("fate", ["spooled-at-a-stop", "dead-lettered"])
async def test_a_write_to_a_regular_file_hung_past_its_send_is_named_as_maybe_written(
    tmp_path: Path, fate: str
) -> None:
    """The review's reg_hung.py: `eventrouter run > events.jsonl`, the batch's one write(2) held by
    the file system. The send answered retry at the stop (or was cut off and its batch dead-lettered)
    and the close said nothing, and then the write landed all 50 lines: written again after the
    restart, or delivered as well as dead-lettered. Now every line of it is named and counted, once."""
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.txt"
    with out.open("wb") as stdout:
        proc = await asyncio.create_subprocess_exec(
            *("strace", "-f", "-qq", "-o", str(trace), "-P", str(out), "-e", "trace=write"),
            *("-e", "inject=write:delay_enter=600000000:when=1"),  # held until strace goes
            *(sys.executable, "-c", HUNG_CHILD, str(trace), fate),
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
        )
    assert proc.stderr is not None
    said = ""
    try:
        async with asyncio.timeout(120):
            while line := (await proc.stderr.readline()).decode():
                said += line
                if line.startswith("unsettled "):
                    proc.kill()  # strace: the held write(2) goes on (the file system is back)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    if "ptrace" in said and "unsettled" not in said:
        pytest.skip("ptrace not permitted here")
    keys = next(line.split()[1:] for line in said.splitlines() if line.startswith("keys "))
    if fate == "spooled-at-a-stop":
        assert "answered RETRY" in said  # the engine spools all 50
        what = "50 records in a write to stdout (a regular file) still hung at the close"
    else:
        what = (
            "50 records given up (dead-lettered or dropped) while a write of them to stdout (a regular file)"
        )
    [warning] = [line for line in said.splitlines() if what in line]
    assert "maybe delivered (if the write ends)" in warning
    assert sum(key in warning for key in keys) == 20 and warning.endswith(" and 30 more")  # by key
    assert "unsettled 50\n" in said and "landed; unsettled 50\n" in said, said[-3000:]  # each once
    # As said: after the close, the write landed whole.
    assert [orjson.loads(line)["uid"] + "/1" for line in out.read_bytes().splitlines()] == keys


def in_pipe(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)


async def test_keys_answered_ok_while_an_earlier_write_was_stuck_are_not_reported_written_twice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's busy_written.py: a send cut off (the engine's timeout) inside a line, its reader
    slow; the retry finds that write still stuck and answers OK the lines it finished. Those keys
    stayed as "written, not yet answered": the close reported them as written twice, and counted
    them in `unsettled`, though the engine had them as delivered and they were written once."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 16)
    pipe = io.TextIOWrapper(io.FileIO(write_end, "w"), write_through=True)
    monkeypatch.setattr(sys, "stdout", pipe)
    ctx = SinkContext(
        name="stdout", cluster="c", data_dir=None, logger=logging.getLogger("test.s32"), send_timeout=4
    )
    s = StdoutSink(StdoutOptions.model_validate({}), ctx)
    batch = [make_occurrence(object_name=f"p-{i}", message=f"{i} " + "x" * 10_000) for i in range(10)]
    ends = list(itertools.accumulate(len(occ.json) + 1 for occ in batch))
    fit = max(end for end in ends if end <= 1 << 16)  # whole lines an empty pipe takes at once
    got = bytearray()
    try:
        await s.start()
        first = asyncio.create_task(s.send(batch))
        await until(lambda: in_pipe(read_end) >= fit)
        got += os.read(read_end, 8192)  # the reader takes 8 KB, then goes away
        await until(lambda: len(got) + in_pipe(read_end) > fit)  # the next line begun: stuck inside it
        first.cancel()  # the engine's send timeout
        with contextlib.suppress(asyncio.CancelledError):
            await first
        done = ends.index(fit) + 1
        retried = await s.send(batch)  # the engine sends the batch again, whole
        assert retried is not None
        assert retried[:done] == [OK] * done  # finished by the stuck write
        assert {o.kind for o in retried[done:]} == {OutcomeKind.RETRY}
        assert "still inside a line begun by an earlier send" in retried[done].reason

        async def reader() -> None:  # the reader is back
            while got.count(b"\n") < len(batch):
                got.extend(await asyncio.to_thread(os.read, read_end, 1 << 20))

        reading = asyncio.create_task(reader())
        assert await s.send(batch[done:]) == [OK] * (len(batch) - done)
        await asyncio.wait_for(reading, 30)
        with caplog.at_level(logging.WARNING, logger="test.s32"):
            await s.aclose()
    finally:
        await s.aclose()
        pipe.close()
        os.close(read_end)
    assert "written to stdout by a send cut off" not in caplog.text and s.unsettled == 0
    keys = [f"{(doc := orjson.loads(line))['uid']}/{doc['occurrence']}" for line in got.splitlines()]
    assert collections.Counter(keys) == collections.Counter(occ.key for occ in batch)  # each once
