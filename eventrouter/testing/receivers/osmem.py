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

from osmem_server import OsmemClone, OsmemServer  # type: ignore[import-untyped]

__all__ = ["OsmemClone", "OsmemServer", "osmem", "osmem_fixture_server"]


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
