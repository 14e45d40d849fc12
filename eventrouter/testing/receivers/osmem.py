"""osmem-server from PyPI: an in-memory OpenSearch 3.x-compatible cluster on loopback, for sink tests.

Use ``with osmem() as server, server.clone() as clone: clone.url``. Each clone is an empty
copy-on-write cluster on its own port (milliseconds to make), so tests do not see each other's indices.

Why not the package's own ``osmem_server`` fixture as is: it leaves the process's stdout pipe open,
which pytest reports as an unraisable ResourceWarning (a failure under ``filterwarnings=error``).
Override it in a conftest with :func:`osmem_fixture_server`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson
from osmem_server import OsmemClone, OsmemServer  # type: ignore[import-untyped]

__all__ = ["Cluster", "OsmemClone", "OsmemServer", "osmem", "osmem_fixture_server"]


@contextmanager
def osmem(*, japanese: bool = False) -> Iterator[OsmemServer]:
    """Start osmem-server (no seed) and stop it afterwards, closing its pipes."""
    server = OsmemServer.start(japanese=japanese)
    try:
        yield server
    finally:
        server.close()
        if server.process.stdout is not None:
            server.process.stdout.close()


def osmem_fixture_server() -> Iterator[OsmemServer]:
    """Body for a session-scoped ``osmem_server`` fixture override (the plugin's ``osmem_clone`` uses it)."""
    with osmem() as server:
        yield server


class Cluster:
    """Reads back (and sets index settings) through plain HTTP, independent of the sink's client."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else orjson.dumps(body)
        headers = {"content-type": "application/json"}
        async with self.session.request(method, self.url + path, data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def count(self, index: str, query: Any = None, *, missing: int | None = None) -> int:
        """The documents in ``index`` (matching ``query``); ``missing`` when it does not exist (else an
        assertion error)."""
        await self.call("POST", "/_refresh")
        status, body = await self.call("POST", f"/{index}/_count", {"query": query} if query else None)
        if status == 404 and missing is not None:
            return missing
        assert status == 200, body
        return int(body["count"])

    async def flood(self, index: str, on: bool) -> None:
        """What DiskThresholdMonitor does to an index with a shard on a node past (and back below)
        the flood-stage watermark."""
        if on:
            status, body = await self.call(
                "PUT", f"/{index}", {"settings": {"index.blocks.read_only_allow_delete": True}}
            )
        else:
            body = {"index.blocks.read_only_allow_delete": None}
            status, body = await self.call("PUT", f"/{index}/_settings", body)
        assert status == 200, body
