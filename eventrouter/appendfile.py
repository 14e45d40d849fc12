"""Append whole lines or nothing.

A write that fails half way (a full disk, an I/O error) leaves part of a line at the end of the file,
and the next append would glue its first line onto it: that line is then unreadable too, so one
failure costs a second record, silently. Every file the router appends to (the file sink, the spool,
the checkpoint journal, the dead letters) cuts a failed write back off.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["append_all", "append_to"]


def append_all(fd: int, data: bytes, size: int) -> None:
    """Write all of ``data`` at the end of the file open on ``fd`` (``O_APPEND``), which is ``size``
    bytes long. On an error the file is cut back to ``size`` before the error is raised, if it ends
    where this call's part of ``data`` ended: a file another process appended to meanwhile (two
    routers writing one file sink path) keeps its lines, which that writer has acknowledged."""
    view = memoryview(data)
    written = 0
    try:
        while written < len(view):
            written += os.write(fd, view[written:])
    except OSError:
        # Cutting back frees space, so it works on a full disk too.
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size == size + written:
                os.ftruncate(fd, size)
        raise


def append_to(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Append ``data`` to ``path`` (created if missing), all of it or none of it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        append_all(fd, data, os.fstat(fd).st_size)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
