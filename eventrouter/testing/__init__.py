"""Helpers for tests of eventrouter and of sink plugins: event factories, a memory sink,
recorded traffic and a Kubernetes API server that keeps the list/watch contract."""

from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.factories import (
    event_object,
    make_occurrence,
    recorded_list,
    recorded_watch,
)
from eventrouter.testing.memory import MemorySink, MemorySinkOptions

__all__ = [
    "FakeApiServer",
    "MemorySink",
    "MemorySinkOptions",
    "event_object",
    "make_occurrence",
    "recorded_list",
    "recorded_watch",
]
