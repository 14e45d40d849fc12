"""One pod of a rendered chart, run as a process: what tests of the chart's upgrades and pod
replacements play against the test API server, as the Deployment controller would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from eventrouter.testing.apiserver import FakeApiServer

__all__ = ["ChartPod"]


class ChartPod:
    """The rendered container's args, its config file and fieldRef env, the test API server for the
    cluster, and a data dir: its own (a new pod gets a new emptyDir) unless ``data`` names the volume
    a claim keeps. The default sink is stdout: what it delivered is read from the pod's stdout."""

    def __init__(
        self,
        config_yaml: str,
        container: dict[str, Any],
        api: FakeApiServer,
        tmp: Path,
        name: str,
        namespace: str,
        data: Path | None = None,
    ) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.out = self.dir / "stdout.jsonl"
        self.log = self.dir / "stderr.log"
        config = self.dir / "config.yaml"
        config.write_text(config_yaml)
        local = {
            "--config": str(config),
            "--data-dir": str(data or self.dir / "data"),
            "--metrics-addr": "127.0.0.1:0",
        }
        self.args = [
            f"{flag}={local[flag]}" if (flag := arg.split("=", 1)[0]) in local else arg
            for arg in container["args"]
        ]
        assert sum(a.split("=", 1)[0] in local for a in self.args) == len(local), self.args
        self.args.append(f"--kubeconfig={api.kubeconfig(self.dir / 'kubeconfig', namespace=namespace)}")
        fields = {"metadata.name": name, "metadata.uid": str(uuid.uuid4()), "metadata.namespace": namespace}
        self.env = {e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in container["env"]}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.out, "ab") as out, open(self.log, "ab") as log:  # noqa: ASYNC230 - once per start
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "eventrouter.cli", *self.args,
                env={**os.environ, **self.env}, stdout=out, stderr=log,
            )  # fmt: skip

    def port(self) -> int | None:
        """The metrics port, from the router's own log line (--metrics-addr ...:0)."""
        found = re.search(rb"serving /metrics /healthz /readyz on [^\"]*:(\d+)", self.log.read_bytes())
        return int(found[1]) if found else None

    async def ready(self) -> bool:
        port = self.port()
        if port is None:
            return False
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as r:
            return r.status == 200

    async def until_ready(self, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not await self.ready():  # noqa: ASYNC110 - a probe over HTTP has no event to await
                await asyncio.sleep(0.1)

    def delivered(self) -> list[tuple[str, int]]:
        text = self.out.read_bytes()
        complete = text[: text.rfind(b"\n") + 1]  # a line without its newline is still being written
        return [(d["uid"], d["occurrence"]) for d in map(json.loads, complete.splitlines())]

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
