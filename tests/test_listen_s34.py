"""Where the probe and metrics server listens (session 34, review F1 of the chart).

The kubelet probes the pod's IP, IPv6 on an IPv6 single-stack (or IPv6-first dual-stack) cluster. The
chart told the router `--metrics-addr=0.0.0.0:8080`, IPv4 only, and no address form listened on both
families (an empty host was made 0.0.0.0, `[::]` is IPv6 only): every probe failed, and the pod
crash-looped there. An empty host now listens on every address of both families, on one port.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import helm_python as helm
import pytest

from eventrouter import cli
from eventrouter.testing.waiting import until

CHART = Path(__file__).resolve().parents[1] / "charts" / "eventrouter"
SERVING = re.compile(r"serving /metrics /healthz /readyz on (.*)")


@pytest.fixture(scope="module", autouse=True)
def ipv6_loopback() -> None:
    """These tests need ::1: without it they would prove nothing about IPv6, so they fail (not skip)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.fail(f"this machine has no IPv6 loopback (::1: {exc}); the IPv6 listening tests need one")


@asynccontextmanager
async def demo_router(addr: str, tmp: Path) -> AsyncIterator[tuple[int, str]]:
    """`eventrouter run --demo --metrics-addr=addr`: yields the port it serves on and its log line."""
    log = tmp / "stderr.log"
    with open(log, "wb") as err:  # noqa: ASYNC230 - once, before the process starts
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventrouter.cli", "run", "--demo", f"--metrics-addr={addr}",
            cwd=tmp, stdout=asyncio.subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        await until(lambda: SERVING.search(log.read_text()) or proc.returncode is not None, timeout=60)
        found = SERVING.search(log.read_text())
        assert found, log.read_text()
        line = found[1]
        port = re.search(r":(\d+)\b", line)
        assert port, line
        yield int(port[1]), line
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 60)


async def healthz(host: str, port: int) -> int | None:
    """The status of GET /healthz on host:port, None when the connection is refused."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/healthz") as r:
            return r.status
    except aiohttp.ClientConnectorError:
        return None


def test_the_chart_and_the_cli_default_listen_with_an_empty_host() -> None:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({}, name="er", namespace="monitoring")
    assert "            - --metrics-addr=:8080\n" in rendered["eventrouter/templates/deployment.yaml"]
    assert cli._parser().parse_args(["run"]).metrics_addr == ":8080"
    manifests = (CHART.parents[1] / "deploy" / "eventrouter.yaml").read_text()
    assert "--metrics-addr=:8080" in manifests and "0.0.0.0" not in manifests


async def test_an_empty_host_answers_on_ipv4_and_ipv6_on_one_port(tmp_path: Path) -> None:
    """The chart's form (`:PORT`, here `:0`: the port the kernel gives) answers the kubelet's probe
    on both loopbacks; before, ::1 was refused."""
    async with demo_router(":0", tmp_path) as (port, line):
        assert await healthz("127.0.0.1", port) == 200
        assert await healthz("[::1]", port) == 200
    assert line == f"[::]:{port} (every IPv4 and IPv6 address)"


@pytest.mark.parametrize(
    ("addr", "answers", "refuses"),
    [("0.0.0.0:0", "127.0.0.1", "[::1]"), ("[::]:0", "[::1]", "127.0.0.1")],
    ids=["ipv4-only", "ipv6-only"],
)
async def test_an_explicit_wildcard_listens_on_its_family_only(
    tmp_path: Path, addr: str, answers: str, refuses: str
) -> None:
    async with demo_router(addr, tmp_path) as (port, line):
        assert await healthz(answers, port) == 200
        assert await healthz(refuses, port) is None
    assert line == f"{addr.rpartition(':')[0]}:{port}"
