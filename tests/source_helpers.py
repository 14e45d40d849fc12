"""What the tests of the source's list pages share (tests/test_source_s34.py, s35.py, s35b.py, s36.py):
a router listing the fake API server into a memory sink, and what to read off it."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import spec_for_class
from eventrouter.testing import MemorySink
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.routers import router_settings


def memory_router(api: FakeApiServer, tmp_path: Path) -> Router:
    """A router on ``api`` delivering to one memory sink, "mem" (not started)."""
    spec = spec_for_class(MemorySink, {"name": "mem", "batch_max_wait": 0.02}, type_="memory")
    return Router(router_settings(api, tmp_path), [spec])


def memory_sink(router: Router) -> MemorySink:
    """``router``'s memory sink, "mem"."""
    sink = router.sinks["mem"]
    assert isinstance(sink, MemorySink)
    return sink


def names(router: Router) -> set[str]:
    """The names of the objects of the Events the memory sink received."""
    return {o.record["involved_object"]["name"] for o in memory_sink(router).received}


def list_pages(api: FakeApiServer) -> int:
    """The list requests (pages) ``api`` answered."""
    return sum(1 for r in api.requests if r.path == "/api/v1/events" and r.query.get("watch") != "true")


def count(router: Router, metric: str, label: str) -> float:
    """The value of ``router``'s ``metric`` labelled ``label``."""
    value: float = getattr(router.metrics, metric).labels(label)._value.get()
    return value


def said(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    """The messages logged that hold ``what``."""
    return [r.getMessage() for r in caplog.records if what in r.getMessage()]
