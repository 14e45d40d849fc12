"""Give freed heap memory back to the operating system after bursts (relists, catch-ups).

glibc keeps freed pages in the process; after a relist of tens of thousands of events the RSS stays
at its peak although the objects are gone, and a memory limit sized for the steady state is then
hit by the next burst. ``malloc_trim(0)`` returns them; elsewhere (musl, macOS) this is a no-op.

The encoding caches (label sets, timestamps, field prefixes) fill during a relist with entries for
every value it saw, and would hold that memory, and with it heap pages the burst used, for good.
``BoundedCache`` registers every such cache so that the router empties them all after a burst
(``clear_caches``); they refill at the steady pace. Measured in an idle 7-sink router after a
50,000-event relist: 114.3 → 105.7 MiB, all of it glibc heap (docs/performance.md, section 4).
CPython's 1 MiB small-object arenas are freed only when every object in them is gone, which the
tracked events' uid strings prevent while those events live."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import weakref
from typing import Any, TypeVar

__all__ = ["BoundedCache", "clear_caches", "release_free_memory"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(dict[K, V]):
    """A dict of derived values that empties itself when full (no per-hit bookkeeping: lookups are
    plain ``dict.get``), and that ``clear_caches`` empties after a burst."""

    __slots__ = ("__weakref__", "maxsize")

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        _caches.append(weakref.ref(self))

    def put(self, key: K, value: V) -> V:
        """Store and return ``value``, first emptying the cache if it is full."""
        if len(self) >= self.maxsize:
            self.clear()
        self[key] = value
        return value


_caches: list[weakref.ref[BoundedCache[Any, Any]]] = []


def clear_caches() -> int:
    """Empty every live BoundedCache; the number of entries dropped."""
    dropped = 0
    alive = []
    for ref in _caches:
        cache = ref()
        if cache is not None:
            dropped += len(cache)
            cache.clear()
            alive.append(ref)
    _caches[:] = alive
    return dropped


log = logging.getLogger(__name__)

_libc: ctypes.CDLL | None = None
_checked = False


def release_free_memory() -> bool:
    """True when glibc's malloc_trim ran."""
    global _libc, _checked
    if not _checked:
        _checked = True
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else None
    if _libc is None:
        return False
    _libc.malloc_trim(0)
    return True
