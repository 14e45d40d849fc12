"""Shared plumbing for the benchmarks: receivers, CPU pinning, RSS, router processes, metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

from bench import receivers as rx

PY = sys.executable
ROUTER_CPU = 0
OTHER_CPU = 1
ALL_SINKS = ("stdout", "file", "webhook", "loki", "kafka", "elasticsearch", "sls")


def add_sink_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sink-option",
        action="append",
        default=[],
        metavar="SINK:NAME=VALUE",
        help="add an option to one sink's --sink URL (repeatable), e.g. loki:new_stream_pushes=false",
    )


def sink_options(values: list[str]) -> dict[str, str]:
    """``--sink-option loki:new_stream_pushes=false`` (repeatable; ``loki=...``, the spelling of
    earlier sessions' records, too) → {"loki": "new_stream_pushes=false"}: the query to add."""
    options: dict[str, str] = {}
    for value in values:
        m = re.fullmatch(r"([a-z]+)[:=]([^=&]+=.*)", value)
        if m is None or m[1] not in ALL_SINKS:
            raise SystemExit(
                f"--sink-option wants SINK:NAME=VALUE with SINK one of {', '.join(ALL_SINKS)}, got {value!r}"
            )
        sink, query = m[1], m[2]
        options[sink] = f"{options[sink]}&{query}" if sink in options else query
    return options


def pin(cpus: set[int], pid: int = 0) -> bool:
    """Pin a process to CPUs where the OS allows it (Linux); False when it could not."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    allowed = os.sched_getaffinity(0) if pid == 0 else os.sched_getaffinity(pid)
    want = cpus & (allowed | set(range(os.cpu_count() or 1)))
    if not want:
        return False
    try:
        os.sched_setaffinity(pid, want)
    except OSError:
        return False
    return True


def other_cpus() -> set[int]:
    """CPUs for everything that is not the router (receivers, load generator, API server)."""
    n = os.cpu_count() or 1
    return {c for c in range(n) if c != ROUTER_CPU} or {ROUTER_CPU}


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model or platform.processor(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def status_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def hwm_mib(pid: int) -> float:
    return status_kib(pid, "VmHWM") / 1024


def rss_by_region_mib(pid: int) -> dict[str, float]:
    """Resident MiB of glibc's main heap (``[heap]``: malloc'd blocks, e.g. dict tables and buffers),
    of anonymous mappings (CPython's 1 MiB small-object arenas, large mmap'd blocks, thread stacks)
    and of mapped files (the interpreter, extension modules, shared libraries), from smaps."""
    out = {"heap": 0.0, "anon_maps": 0.0, "files": 0.0}
    region = "anon_maps"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=6)
        if "-" in first[0] and not first[0].endswith(":"):
            name = first[5] if len(first) > 5 else ""
            region = "heap" if name == "[heap]" else "files" if name.startswith("/") else "anon_maps"
        elif first[0] == "Rss:":
            out[region] += int(first[1]) / 1024
    return {k: round(v, 1) for k, v in out.items()}


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


# ---- receivers ------------------------------------------------------------------------------------


@dataclass
class Services:
    """Loopback receivers for every built-in sink, each in its own process off the router's CPU."""

    urls: dict[str, str] = field(default_factory=dict)
    kafka: Any = None
    osmem: Any = None
    pids: list[int] = field(default_factory=list)
    _proc: subprocess.Popen[bytes] | None = None
    _session: aiohttp.ClientSession | None = None

    async def counts(self, *, keys: bool = False) -> dict[str, Any]:
        assert self._session is not None
        q = "?keys=1" if keys else ""
        async with self._session.get(self.urls["control"] + "/counts" + q) as r:
            result: dict[str, Any] = orjson.loads(await r.read())
            return result

    async def reset(self, *, keys: bool = False) -> None:
        assert self._session is not None
        async with self._session.post(self.urls["control"] + "/reset" + ("?keys=1" if keys else "")) as r:
            r.raise_for_status()

    @contextlib.contextmanager
    def es_index(self) -> Iterator[str]:
        """A fresh, empty OpenSearch cluster (osmem clone) URL."""
        assert self.osmem is not None
        with self.osmem.clone() as clone:
            yield clone.url

    def flag(
        self, sink: str, tmp: Path, *, es_url: str = "", topic: str = "k8s-events", extra: str = ""
    ) -> str:
        """The --sink flag that points ``sink`` at its loopback receiver."""
        amp = f"&{extra}" if extra else ""
        q = f"?{extra}" if extra else ""
        if sink == "stdout":
            return f"stdout:{q}"
        if sink == "file":
            return f"file:{tmp / 'events.jsonl'}?max_bytes=104857600&max_files=2{amp}"
        if sink == "webhook":
            return f"webhook:{self.urls['webhook']}{q}"
        if sink == "loki":
            return f"loki:{self.urls['loki']}{q}"
        if sink == "kafka":
            # Tansu fails idempotent producers (see receivers/tansu.py): acks=all without idempotence.
            return f"kafka:{self.kafka.bootstrap}?topic={topic}&idempotence=false{amp}"
        if sink == "elasticsearch":
            return f"elasticsearch:{es_url}?index=k8s-events{amp}"
        if sink == "sls":
            return (
                f"sls:{self.urls['sls']}?project={rx.SLS_PROJECT}&logstore={rx.SLS_LOGSTORE}"
                f"&access_key_id={rx.SLS_KEY_ID}&access_key_secret={rx.SLS_KEY_SECRET}"
                f"&check_on_start=false{amp}"
            )
        raise ValueError(sink)


@contextlib.asynccontextmanager
async def services(*, kafka: bool = True, elasticsearch: bool = True) -> AsyncIterator[Services]:
    s = Services()
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; its stdout is read in an executor
        [PY, "-m", "bench.receivers"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_root()
    )
    s._proc = proc
    try:
        assert proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        if not line:
            raise RuntimeError("bench.receivers did not start")
        s.urls = orjson.loads(line)
        s.pids.append(proc.pid)
        async with contextlib.AsyncExitStack() as stack:
            if kafka:
                from eventrouter.testing.receivers.tansu import TansuBroker

                s.kafka = await stack.enter_async_context(TansuBroker())
                s.pids.append(s.kafka._proc.pid)
            if elasticsearch:
                from eventrouter.testing.receivers.osmem import osmem

                s.osmem = stack.enter_context(osmem())
                s.pids.append(s.osmem.process.pid)
            for pid in s.pids:
                pin(other_cpus(), pid)
            s._session = await stack.enter_async_context(aiohttp.ClientSession())
            yield s
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


# ---- router process -------------------------------------------------------------------------------


@dataclass
class RouterProcess:
    proc: asyncio.subprocess.Process
    metrics_port: int
    log: IO[bytes]
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """Scraped /metrics as {"name{labels}": value} (counters and gauges only)."""
        async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            text = await r.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
        return out

    async def stop(self, timeout: float = 30.0) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        self.log.close()
        return self.proc.returncode or 0


def delivered(metrics: dict[str, float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in metrics.items():
        m = re.fullmatch(r'eventrouter_sink_delivered_total\{sink="([^"]+)"\}', key)
        if m:
            out[m.group(1)] = int(value)
    return out


def dead_lettered(metrics: dict[str, float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in metrics.items():
        m = re.fullmatch(r'eventrouter_sink_dead_lettered_total\{reason="[^"]+",sink="([^"]+)"\}', key)
        m = m or re.fullmatch(r'eventrouter_sink_dead_lettered_total\{sink="([^"]+)",reason="[^"]+"\}', key)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(value)
    return out


def dropped(metrics: dict[str, float]) -> dict[str, int]:
    """``sink:reason`` → count (labels in either order: prometheus_client sorts them)."""
    out: dict[str, int] = {}
    for key, value in metrics.items():
        if not key.startswith("eventrouter_sink_dropped_total{") or not value:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
        out[f"{labels.get('sink')}:{labels.get('reason')}"] = int(value)
    return out


def sending(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per sink: seconds spent in sends and batches sent. A sink whose sends took nearly the whole
    wall time set the pace of a relist (the source waits for room in its queue)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        m = re.fullmatch(r'eventrouter_sink_send_duration_seconds_(sum|count)\{sink="([^"]+)"\}', key)
        if m:
            out.setdefault(m[2], {})["send_s" if m[1] == "sum" else "sends"] = round(value, 2)
    return out


def finished(metrics: dict[str, float]) -> dict[str, int]:
    """Per sink: occurrences accepted or dead-lettered (nothing left to do for them)."""
    done = delivered(metrics)
    for name, n in dead_lettered(metrics).items():
        done[name] = done.get(name, 0) + n
    return done


async def spawn_router(
    kubeconfig: str,
    flags: list[str],
    log_path: Path,
    *,
    extra: list[str] | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
    census: Path | None = None,
) -> RouterProcess:
    """``python -m eventrouter.cli run`` as its own process, pinned to the router CPU; ``python``: another
    interpreter (a venv with only what the image installs), else this one, with any interpreter flags
    after it (``"/venv/bin/python -OO"``); ``env``: added to the router's environment (an allocator's
    settings); ``census``: SIGUSR2 makes the router write a pymalloc census there (``bench/_census.py``)."""
    port = free_port()
    args = [
        *(shlex.split(python) if python else [PY]),
        "-m",
        "eventrouter.cli",
        "run",
        "--kubeconfig",
        kubeconfig,
        "--metrics-addr",
        f"127.0.0.1:{port}",
        "--cluster-name",
        "bench",
        "--log-level",
        "warning",
        *[f"--sink={f}" for f in flags],
        *(extra or []),
    ]
    log = log_path.open("wb")
    started = time.monotonic()
    child_env = {**os.environ, **(env or {})}
    if census is not None:
        hook = str(Path(__file__).parent / "_hook")
        path = os.pathsep.join(p for p in (hook, os.environ.get("PYTHONPATH", "")) if p)
        child_env.update({"PYTHONPATH": path, "EVENTROUTER_BENCH_CENSUS": str(census)})
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
        cwd=_root(),
        env=child_env,
    )
    pin({ROUTER_CPU}, proc.pid)
    return RouterProcess(proc, port, log, started)


async def wait_metrics(rp: RouterProcess, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
    """Until the router's /metrics answers."""
    deadline = time.monotonic() + timeout
    while True:
        if rp.proc.returncode is not None:
            raise RuntimeError(f"router exited with {rp.proc.returncode}; see {rp.log.name}")
        try:
            await rp.metrics(session)
            return
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


def dump(result: dict[str, Any], path: Path | None) -> None:
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)
