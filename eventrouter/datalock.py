"""One router per data dir: an exclusive ``flock`` on ``<data-dir>/lock`` while a router uses it.

Two routers on one data dir (a second ``eventrouter run`` by hand, a replay with the live router's
``--data-dir``, two pods on one ReadWriteMany volume without leader election) would write the same
checkpoints and spools: one would mark the other's occurrences as delivered, and both would send
what is spooled. The kernel drops the lock when the process dies, SIGKILL included, so a stale lock
file never blocks a restart. The file holds who has it (pid, host, since when), for the message; a
file this user may only read (another uid's) is locked all the same, its holder line left as it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path

from eventrouter.config import ConfigError

__all__ = ["DataDirInUse", "DataDirLock"]


_FIX = "give it to the user the router runs as (chown), or remove it while no router uses the data dir"


def _owner(path: Path) -> str:
    """Who may use the file, for the message: its owner, its mode, and who this process is."""
    try:
        info = os.stat(path)
    except OSError:
        return f"this process is uid {os.geteuid()}"
    return (
        f"owned by uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}; this process is uid "
        f"{os.geteuid()}"
    )


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
        """Take the lock now or raise DataDirInUse; ConfigError if the file cannot be opened or the
        file system cannot lock it."""
        if self._fd is not None:
            return
        fd, writable = self._open()
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
            if not writable:  # NFS locks with fcntl's, whose exclusive lock needs write access (EBADF)
                raise ConfigError(
                    f"--data-dir {self.data_dir}: cannot lock {self.path}, which this user may only read "
                    f"({_owner(self.path)}), on this file system ({exc.strerror or exc}); {_FIX}"
                ) from None
            raise ConfigError(
                f"--data-dir {self.data_dir}: cannot lock {self.path} ({exc.strerror or exc}); the data "
                "dir needs a file system with working file locks (flock): a local volume, or NFS with "
                "its lock service"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if writable:  # else it names whoever wrote it last: the message is poorer, the lock holds
            since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            me = f"eventrouter pid {os.getpid()} on {socket.gethostname()} since {since}\n"
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, me.encode(), 0)
            except OSError:
                pass  # a full disk: the lock holds all the same, only the message is poorer
        self._fd = fd

    def _open(self) -> tuple[int, bool]:
        """The lock file's descriptor, and whether it is open to write who holds the lock. A file this
        user may not write (left by a router that ran as another user: root before a move to a non-root
        uid) is opened to read: flock needs no more, and it is the same file another router locks.
        That ended ``run`` in a traceback before."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ConfigError(
                    f"--data-dir {self.data_dir}: cannot open {self.path} ({exc.strerror or exc})"
                ) from None
            first = exc
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), False
        except OSError:
            fix = "the data dir must be writable" if first.errno == errno.EROFS else _FIX
            raise ConfigError(
                f"--data-dir {self.data_dir}: cannot open {self.path} ({first.strerror or first}; "
                f"{_owner(self.path)}); {fix}"
            ) from None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock
