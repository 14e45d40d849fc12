"""stdout sink: JSON lines / text lines on stdout or stderr, captured at the file-descriptor level."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import io
import logging
import os
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path

import orjson
import pytest

from eventrouter import OK, Occurrence, OutcomeKind, SinkContext, normalise
from eventrouter.testing import make_occurrence, recorded_watch
from eventrouter.testing.waiting import until
from eventrouter_sinks._worker import CLOSE_GRACE
from eventrouter_sinks.file import FileOptions, FileSink
from eventrouter_sinks.stdout import StdoutOptions, StdoutSink


def context() -> SinkContext:
    return SinkContext(name="stdout", cluster="test", data_dir=None, logger=logging.getLogger("test.stdout"))


def recorded() -> list[Occurrence]:
    return [normalise(e["object"], cluster="rec") for e in recorded_watch() if e["type"] != "DELETED"]


def sink(**options: object) -> StdoutSink:
    return StdoutSink(StdoutOptions.model_validate(options), context())


async def test_json_lines_on_stdout_are_the_records(capfd: pytest.CaptureFixture[str]) -> None:
    occs = recorded()
    s = sink()
    await s.start()
    outcomes = list(await s.send(occs[:60]) or []) + list(await s.send(occs[60:]) or [])
    await s.aclose()
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert outcomes == [OK] * len(occs)
    assert [orjson.loads(line) for line in lines] == [o.record for o in occs]
    assert err == ""
    # The hard ones survive byte-exact: Chinese + quotes + backslash + newline, and 20,000 characters.
    messages = {orjson.loads(line)["message"] for line in lines}
    assert any(m.startswith("就绪探针失败") and '"quoted"' in m and "\\" in m and "\n" in m for m in messages)
    assert any(len(m) == 20_000 for m in messages)


async def test_include_raw_adds_the_event_object(capfd: pytest.CaptureFixture[str]) -> None:
    occ = make_occurrence(reason="Pulled")
    s = sink(include_raw=True)
    await s.send([occ])
    line = orjson.loads(capfd.readouterr().out)
    assert line["raw"] == occ.raw
    assert {k: v for k, v in line.items() if k != "raw"} == occ.record


async def test_stream_stderr_writes_to_stderr_only(capfd: pytest.CaptureFixture[str]) -> None:
    occ = make_occurrence()
    await sink(stream="stderr").send([occ])
    out, err = capfd.readouterr()
    assert out == ""
    assert orjson.loads(err) == occ.record


async def test_text_format_is_one_summary_line_per_event(capfd: pytest.CaptureFixture[str]) -> None:
    occ = make_occurrence(
        namespace="shop",
        kind="Pod",
        object_name="checkout-0",
        reason="Unhealthy",
        type="Warning",
        message='probe "failed"\nsecond line',
        first_timestamp="2024-05-01T10:00:00Z",
    )
    await sink(format="text").send([occ, make_occurrence(message="other")])
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 2
    assert (
        lines[0] == '2024-05-01T10:00:00Z Warning shop Pod/checkout-0 Unhealthy: probe "failed"\\nsecond line'
    )


async def test_text_format_escapes_every_field_not_only_the_message(
    capfd: pytest.CaptureFixture[str],
) -> None:
    forged = "\n2026-01-01T00:00:00Z Normal kube-system Pod/x Fake: all good"
    occ = make_occurrence(
        namespace="ns\rx",
        kind="Pod\\",
        object_name="web\n0",
        reason="BackOff" + forged,
        message="m",
        first_timestamp="2024-05-01T10:00:00Z",
    )
    await sink(format="text").send([occ])
    lines = capfd.readouterr().out.splitlines()
    assert lines == [
        "2024-05-01T10:00:00Z Warning ns\\rx Pod\\\\/web\\n0 BackOff\\n2026-01-01T00:00:00Z Normal kube-system "
        "Pod/x Fake: all good: m"
    ]


async def test_unencodable_record_is_rejected_alone(capfd: pytest.CaptureFixture[str]) -> None:
    good = make_occurrence(message="good")
    bad = make_occurrence(message="bad")
    bad.record = {**bad.record, "count": 2**70}  # orjson refuses integers beyond 64 bits
    outcomes = await sink().send([good, bad, good])
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.REJECT, OutcomeKind.OK]
    assert bad.key in outcomes[1].reason
    assert [orjson.loads(x)["message"] for x in capfd.readouterr().out.splitlines()] == ["good", "good"]


CHILD = textwrap.dedent(
    """
    import asyncio, logging, sys
    from eventrouter import SinkContext, RetryableError
    from eventrouter.testing import make_occurrence
    from eventrouter_sinks.stdout import StdoutOptions, StdoutSink

    async def main():
        ctx = SinkContext(name="stdout", cluster="c", data_dir=None, logger=logging.getLogger("x"))
        s = StdoutSink(StdoutOptions(), ctx)
        await s.start()
        try:
            out = await s.send([make_occurrence(message=f"m{i}") for i in range(int(sys.argv[1]))])
            print("outcomes", [o.kind.value for o in out], file=sys.stderr)
        except RetryableError as exc:
            print("retryable", exc.reason, file=sys.stderr)
        await s.aclose()

    asyncio.run(main())
    """
)


def test_subprocess_stdout_is_parseable_json_lines() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, "5"], capture_output=True, timeout=60, check=True)
    assert [orjson.loads(line)["message"] for line in proc.stdout.splitlines()] == [f"m{i}" for i in range(5)]
    assert b"outcomes ['ok', 'ok', 'ok', 'ok', 'ok']" in proc.stderr


def test_broken_pipe_is_retryable() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write gets EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, "3"], stdout=write_end, stderr=subprocess.PIPE, timeout=60
        )
    finally:
        os.close(write_end)
    assert b"retryable cannot write to stdout" in proc.stderr
    assert b"Broken pipe" in proc.stderr


async def test_aclose_twice_and_without_start() -> None:
    s = sink()
    await s.aclose()
    await s.aclose()
    assert "StdoutSink" in repr(s)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="colour"):
        StdoutOptions.model_validate({"colour": "yes"})
    with pytest.raises(ValueError, match="format"):
        StdoutOptions.model_validate({"format": "xml"})


# -- a stalled or odd stdout ------------------------------------------------------------------------


class Reader:
    """The pipe's reader: away until ``come_back()``, then reads the pipe to its end."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.got = bytearray()
        self.back = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.back.wait()
        while chunk := os.read(self.fd, 1 << 20):
            self.got.extend(chunk)
        os.close(self.fd)

    def come_back(self) -> None:
        self.back.set()

    def copies(self) -> dict[str, int]:
        """Lines per message, once the writer has closed its end."""
        self.come_back()
        self.thread.join(10)
        return dict(collections.Counter(orjson.loads(line)["message"] for line in self.got.splitlines()))


async def test_a_stalled_reader_holds_up_no_other_sink_nor_dns_and_nothing_is_written_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end, write_end = os.pipe()  # nobody reads it yet: a log collector away, a pager
    reader = Reader(read_end)
    pipe = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")), write_through=True)
    monkeypatch.setattr(sys, "stdout", pipe)
    s = sink()
    occs = [
        make_occurrence(message=f"{i}:" + "y" * 5000) for i in range(30)
    ]  # 150 KB: more than a pipe holds
    try:
        await s.start()
        for _ in range(40):  # as the engine does: each send abandoned at its timeout, then tried again
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):
                    await s.send(occs)
        # Other blocking work still gets a thread: a file sink, and DNS (aiohttp's default resolver).
        other = FileSink(FileOptions.model_validate({"path": str(tmp_path / "events.jsonl")}), context())
        async with asyncio.timeout(5):
            await other.start()
            assert await other.send(occs[:3]) == [OK] * 3
            await asyncio.get_running_loop().getaddrinfo("localhost", 80)
            await other.aclose()
        reader.come_back()
        async with asyncio.timeout(10):
            # The engine's next try: the write in progress ends and delivered these; not written again.
            assert await s.send(occs) == [OK] * 30
    finally:
        reader.come_back()  # blocked writes end, whatever failed above
        await s.aclose()
        pipe.close()
    assert reader.copies() == {o.record["message"]: 1 for o in occs}


@pytest.mark.parametrize("inside_a_line", [False, True], ids=["at-a-line-end", "inside-a-line"])
async def test_close_waits_a_moment_for_a_write_in_progress_then_leaves_it_to_a_daemon_thread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, inside_a_line: bool
) -> None:
    """A write left by a cut-off send begins no new line (session 30: before, it went on past the
    close and landed after the engine had spooled its batch). Stuck at a line's end it is done at
    once; stuck inside a line (one larger than the pipe) it is not waited for beyond a moment, and its
    thread is a daemon: Python joined the old executor's thread at exit, and the process never exited.
    What went out is said by key, as written twice once sent again."""
    read_end, write_end = os.pipe()
    reader = Reader(read_end)
    pipe = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w")), write_through=True)
    monkeypatch.setattr(sys, "stdout", pipe)
    s = sink()
    size = 200_000 if inside_a_line else 5000  # a line larger than the pipe, or 30 lines more than it holds
    occs = [make_occurrence(message=f"{i}:" + "y" * size) for i in range(3 if inside_a_line else 30)]
    try:
        await s.start()
        with pytest.raises(TimeoutError):  # cut off at the engine's send timeout
            async with asyncio.timeout(0.05):
                await s.send(occs)
        assert s._writing is not None
        writing = s._writing[0]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with caplog.at_level(logging.WARNING, logger="test.stdout"):
            await s.aclose()
        took = loop.time() - started
        if not inside_a_line:
            assert writing.done() and writing.exception() is None and took < CLOSE_GRACE
            assert "by a send cut off before it could say so" in caplog.text
        else:
            assert not writing.done() and CLOSE_GRACE * 0.9 <= took < CLOSE_GRACE + 2
            workers = [t for t in threading.enumerate() if t.name == "sink-stdout"]
            assert workers and all(t.daemon for t in workers)
            assert f"{occs[0].key}" in caplog.text and "it may yet be written" in caplog.text
            reader.come_back()
            await until(writing.done)  # left to its thread, which finishes the line, and only it
    finally:
        reader.come_back()
        await s.aclose()
        pipe.close()
    copies = reader.copies()
    assert set(copies.values()) == {1}  # nothing twice, nothing torn
    out = [o.record["message"] for o in occs if o.record["message"] in copies]
    assert list(copies) == out == [o.record["message"] for o in occs[: len(out)]]  # the first ones
    assert 0 < len(out) < len(occs) and (len(out) == 1 or not inside_a_line)


def in_pipe(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder)


async def test_a_non_blocking_stdout_is_made_blocking_and_every_line_is_written_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    read_end, write_end = os.pipe()
    reader = Reader(read_end)
    os.set_blocking(write_end, False)  # O_NONBLOCK set by a parent sharing the pipe
    pipe = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w"), 8192), write_through=True)
    monkeypatch.setattr(sys, "stdout", pipe)
    s = sink()
    occs = [make_occurrence(message=f"{i}:" + "z" * 3000) for i in range(100)]  # 300 KB
    try:
        with caplog.at_level(logging.WARNING, logger="test.stdout"):
            await s.start()
        send = asyncio.create_task(s.send(occs))
        # The pipe is full: within a line of its capacity (the sink writes whole lines as room allows).
        capacity = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
        line = max(len(o.json) + 1 for o in occs)
        await until(lambda: send.done() or in_pipe(read_end) > capacity - line)
        reader.come_back()
        async with asyncio.timeout(10):
            assert await send == [OK] * 100
        assert "non-blocking" in caplog.text and os.get_blocking(write_end)
    finally:
        reader.come_back()
        await s.aclose()
        with contextlib.suppress(OSError):  # what a failed non-blocking write left in the buffer
            pipe.close()
    assert reader.copies() == {o.record["message"]: 1 for o in occs}


def test_an_address_the_stdout_sink_would_ignore_is_refused() -> None:
    """`--sink=stdout:stderr` wrote to stdout, as if nothing had been said."""
    from eventrouter.config import ConfigError, build_specs

    for flag in ("stdout:stderr", "stdout:/dev/stderr?format=text"):
        with pytest.raises(ConfigError, match="option 'url': Value error, the stdout sink takes no address"):
            build_specs([flag])
    specs = build_specs(["stdout", "stdout:?name=b", "stdout:?format=text&stream=stderr&name=c"])
    assert [(s.name, s.options.url) for s in specs] == [("stdout", ""), ("b", ""), ("c", "")]
    assert build_specs([], [{"type": "stdout", "url": ""}])[0].options.url == ""
