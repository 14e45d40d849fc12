from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import aiohttp
import pytest

from eventrouter.config import SinkSpec, spec_for_class
from eventrouter.sink import Sink
from eventrouter.testing.receivers.osmem import Cluster, OsmemServer, osmem_fixture_server


def make_spec(sink_cls: type[Sink[Any]], name: str = "mem", **options: Any) -> SinkSpec:
    return spec_for_class(sink_cls, {"name": name, **options}, type_="memory", where=f"test sink {name}")


@pytest.fixture
def spec_factory() -> Any:
    return make_spec


def keys(occs: Sequence[Any]) -> list[tuple[str, int]]:
    return [(o.uid, o.number) for o in occs]


@pytest.fixture(scope="session")
def osmem_server() -> Iterator[OsmemServer]:
    """Overrides the osmem plugin's fixture (which leaks the server's stdout pipe); osmem_clone uses it."""
    yield from osmem_fixture_server()


@pytest.fixture
async def cluster(osmem_clone: Any) -> AsyncIterator[Cluster]:
    """The osmem clone read back through plain HTTP, independent of the sink's client."""
    async with aiohttp.ClientSession() as session:
        yield Cluster(osmem_clone.url, session)
