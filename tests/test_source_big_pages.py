"""Lists of Events with large messages stay within the router's memory (session 32).

core/v1 Events have no bound on ``message`` (an object may reach etcd's ~1.5 MiB), and a buggy
controller can write dozens of 1 MB events. A list page of 500 items was held about three times over
(its body, the parsed document, each item's raw JSON): 80 events of 1 MB took the router to 289 MiB
at every start, past the chart's 256 MiB limit. Pages are now bounded by bytes as well as items, the
body goes once parsed, items as handed on, and a sorted relist holds a bounded number of bytes.
Bounded by events alone, a sink's default memory queue (10,000) then held a sorted relist's 80 MB
whole (213 MiB): it is bounded by bytes as well (session 33, item 259).

Each test runs the router as a process and reads its peak RSS (VmHWM): a memory bound, not a timing."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.waiting import until

EVENTS = 80
SIZE = 1_000_000
PEAK_MIB = 150  # 289 MiB before, ~55 MiB at rest

# The router with sorted relists (what a Loki sink asks for) and a file sink, as a process.
SORTED_ROUTER = """
import asyncio, sys
from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.source.watcher import WatchSettings
from sinks.file import FileSink

async def main(kubeconfig, out, spare):
    settings = RouterSettings(
        cluster_name="c", kubeconfig=kubeconfig, metrics_addr=None,
        watch=WatchSettings(relist_sorted=True, relist_dir=spare),
    )
    # The default queue: bounded by bytes too (item 259), it no longer holds all 80 of these.
    options = {"name": "f", "path": out}
    router = Router(settings, [spec_for_class(FileSink, options, type_="file")])
    async with router.running():
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


def _peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("sort", [False, True], ids=["in_list_order", "sorted"])
async def test_a_start_up_list_of_large_events_stays_far_under_the_memory_limit(
    tmp_path: Path, sort: bool
) -> None:
    async with FakeApiServer(token="t", watch_cache=False) as api:
        for i in range(EVENTS):
            api.create_event(event_object(object_name=f"big-{i}", message="x" * (SIZE - 10) + f"{i:010d}"))
        kubeconfig, out = api.kubeconfig(tmp_path / "kubeconfig"), tmp_path / "events.jsonl"
        if sort:
            (tmp_path / "spare").mkdir()
            args = ["-c", SORTED_ROUTER, kubeconfig, str(out), str(tmp_path / "spare")]
        else:
            args = ["-m", "eventrouter", "run", "--kubeconfig", kubeconfig, "--metrics-addr", "127.0.0.1:0"]
            args += ["--sink", f"file:{out}"]
        log = (tmp_path / "router.log").open("wb")
        proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=log, stderr=log)
        try:
            await until(lambda: _lines(out) >= EVENTS, timeout=120, interval=0.1)
            peak = _peak_mib(proc.pid)
        finally:
            proc.terminate()
            await proc.wait()
            log.close()
        assert _lines(out) == EVENTS
        assert peak < PEAK_MIB, (peak, (tmp_path / "router.log").read_text()[-2000:])
        # Pages shrank to what fits the byte bound: no request asked for 500 of these.
        limits = [
            int(r.query["limit"]) for r in api.requests if r.query.get("limit") and "watch" not in r.query
        ]
        assert limits and max(limits) <= 16 and limits[-1] <= 8
