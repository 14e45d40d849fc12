"""Give freed heap memory back to the operating system after bursts (relists, catch-ups).

glibc keeps freed pages in the process; after a relist of tens of thousands of events the RSS stays
at its peak although the objects are gone, and a memory limit sized for the steady state is then
hit by the next burst. ``malloc_trim(0)`` returns them; elsewhere (musl, macOS) this is a no-op."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["release_free_memory"]

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
