"""A child process on a terminal of its own: for tests that a sink never asks for a pass phrase on the
controlling terminal (OpenSSL does, for an encrypted key, unless told not to)."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import sys
import time

__all__ = ["on_a_terminal", "sink_probe"]

_TAKE_TERMINAL = "import fcntl, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0)"

_PROBE = r"""
import asyncio, json, logging, sys, time
from eventrouter import SinkContext
from eventrouter_sinks.MODULE import OPTIONS, SINK

async def main():
    beats = [time.monotonic()]
    async def beat():
        while True:
            await asyncio.sleep(0.02)
            beats.append(time.monotonic())
    task = asyncio.create_task(beat())
    await asyncio.sleep(0.1)
    options = OPTIONS.model_validate(json.loads(sys.argv[1]))
    sink = SINK(options, SinkContext(name="MODULE", cluster="c", data_dir=None, logger=logging.getLogger("t")))
    began = time.monotonic()
    try:
        await getattr(sink, sys.argv[2])()
        print("STARTED", flush=True)
    except Exception as exc:
        print(f"FAILED after {time.monotonic() - began:.2f}s: {exc}", flush=True)
    await sink.aclose()
    await asyncio.sleep(0.1)
    task.cancel()
    print(f"STALL {max(b - a for a, b in zip(beats, beats[1:])):.2f}", flush=True)

asyncio.run(main())
"""


def sink_probe(module: str, options: str, sink: str, *, terminal: bool) -> str:
    """Code for a child that builds ``eventrouter_sinks.<module>``'s sink from the JSON options in its
    argv[1] and awaits the method named in argv[2]. It prints "STARTED" or "FAILED after <s>s: <error>",
    then "STALL <s>": the longest its event loop stalled (a heartbeat every 20 ms). ``terminal``: the
    child's stdin (a pty from ``on_a_terminal``) becomes its controlling terminal, where OpenSSL asks
    for a pass phrase when none is given."""
    code = _PROBE.replace("MODULE", module).replace("OPTIONS", options).replace("SINK", sink)
    return (_TAKE_TERMINAL + "\n" if terminal else "") + code


def _read_until(fd: int, last: bytes, within: float) -> str:
    out = b""
    deadline = time.monotonic() + within
    while last not in out and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child exited, the pty's other end is closed
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


async def on_a_terminal(code: str, *args: str, last: bytes, within: float) -> str:
    """Run ``python -c code args`` with a new pty as stdin, stdout and stderr; what it wrote there until
    ``last`` appears, it exits, or ``within`` seconds pass (a child waiting for a pass phrase does
    neither). A ``sink_probe(..., terminal=True)`` makes the pty its controlling terminal."""
    master, slave = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, *args, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
    finally:
        os.close(slave)
    try:
        return await asyncio.to_thread(_read_until, master, last, within)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        os.close(master)
