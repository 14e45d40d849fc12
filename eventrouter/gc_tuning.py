"""Garbage-collector settings for the router process (not for embedders: the CLI applies them).

Every occurrence allocates a few dozen container objects (the parsed watch object, its record), so
CPython's default first-generation threshold (700 allocations) runs a young collection every ~20
occurrences, and each older collection walks every object the imports created (~100k: the Kubernetes
client models, pydantic, aiohttp). Freezing what exists after start-up takes those out of every
collection; a larger young threshold makes collections fewer for the same work. Nothing is freed
later than before: reference counting frees an occurrence as soon as its last sink is done with it;
the collector only ever finds reference cycles, which the hot path does not create.
"""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]

YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Call once the process has imported what it runs (the CLI: after building the router)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
