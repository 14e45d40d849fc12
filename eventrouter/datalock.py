"""One router per data dir: an exclusive ``flock`` on ``<data-dir>/lock`` while a router uses it.

Two routers on one data dir (a second ``eventrouter run`` by hand, a replay with the live router's
``--data-dir``, two pods on one ReadWriteMany volume without leader election) would write the same
checkpoints and spools: one would mark the other's occurrences as delivered, and both would send
what is spooled. The kernel drops the lock when the process dies, SIGKILL included, so a stale lock
file never blocks a restart. The file holds who has it (pid, host, since when), for the message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from eventrouter.config import ConfigError

__all__ = ["DataDirInUse", "DataDirLock"]


class DataDirInUse(Exception):
    """Another process holds the data dir's lock; the message names the data dir and the holder."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise DataDirInUse; ConfigError if the file system cannot lock it,
        OSError if the file cannot be opened."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DataDirInUse(
                f"data dir {self.data_dir} is in use by {holder}: two routers on one data dir would share "
                "checkpoints and spools"
            ) from None
        except OSError as exc:
            # ENOLCK: an NFS volume without lockd, and the like. A traceback before; running without
            # the lock would let a second router share the checkpoints and spools unseen.
            os.close(fd)
            raise ConfigError(
                f"--data-dir {self.data_dir}: cannot lock {self.path} ({exc.strerror or exc}); the data "
                "dir needs a file system with working file locks (flock): a local volume, or NFS with "
                "its lock service"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        me = f"eventrouter pid {os.getpid()} on {socket.gethostname()} since {since}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the message is poorer
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock
