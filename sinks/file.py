"""``file`` sink: JSON lines appended to a file, with size-based rotation.

``--sink=file:/var/log/events.jsonl?max_bytes=104857600&max_files=5&fsync=true``

Rotation (like logrotate/RotatingFileHandler): before a record would make the current file exceed
``max_bytes``, ``events.jsonl`` → ``.1``, the backups before it moved up one (``.1`` → ``.2`` …, up to the
first number free, or ``.N``, N = ``max_files``, whose file is overwritten), and a fresh file starts. The
current file is renamed first (to ``.1`` if free, else aside to ``events.jsonl.rotating``): a file that
cannot be renamed (a mount point) fails the rotation before any backup has moved, so a failed rotation
removes nothing, however often it is tried. ``check`` and ``start`` refuse a mount point as the path
while rotation is on. A record larger than ``max_bytes`` still gets written, alone, to a fresh file.
Every record is a complete line in exactly one file; new files get exactly ``file_mode`` when it is set
(by default 0644 less the umask).

An item is OK only once it is written (unbuffered ``write(2)``) and, with ``fsync=true``, fsynced
(lines whose fsync failed are cut off the file again, for the retry to write them once).
If the file is removed or renamed by someone else (external logrotate), the next batch reopens the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import orjson
from pydantic import AliasChoices, Field, field_validator, model_validator

from eventrouter import (
    OK,
    Occurrence,
    Outcome,
    Sink,
    SinkContext,
    SinkError,
    SinkOptions,
    reject,
    retry,
)
from eventrouter.appendfile import append_all

from ._worker import CLOSE_GRACE, SinkThread, retrieved

__all__ = ["MAX_BYTES_FLOOR", "FileOptions", "FileSink"]

MAX_BYTES_FLOOR = 1 << 16
"""The least ``max_bytes`` (other than 0), 64 KiB: below it the value was surely meant in MB (sizes in
MB run up to about 10,000). 1 MiB refused small sizes meant in bytes, such as 1M (10^6)."""

_SIZE_UNITS = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

_STOPPING = retry("not written: the router is stopping", held=True)

_ASIDE = ".rotating"
"""Where the current file is renamed while the backups move up: they move only once that worked."""

_MOUNTED = (
    "a mount point (one file mounted on its own, as by docker -v file:file or a Kubernetes subPath "
    "mount), which rename(2) cannot move (EBUSY); mount its folder instead, or set max_bytes=0 never to "
    "rotate it (logrotate's copytruncate can rotate it from outside)"
)


def _unescape(field: bytes) -> bytes:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


def _is_mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point: a file bind-mounted on its own shares the device of its
    folder (``os.path.ismount`` misses it, and looks at folders only), so the mount table is asked. A
    link is no mount point: rotation renames the link."""
    if os.path.islink(path):
        return False
    real = os.fsencode(os.path.join(os.path.realpath(path.parent), path.name))
    try:
        table = Path("/proc/self/mountinfo").read_bytes()
    except OSError:  # not Linux, or no /proc: nothing known
        return False
    return any(
        len(fields := line.split()) > 4 and _unescape(fields[4]) == real for line in table.splitlines()
    )


class FileOptions(SinkOptions):
    path: str = Field(
        "",
        description="File to append to (default: the URL part, as in file:/var/log/events.jsonl).",
    )
    max_bytes: int = Field(
        100 * 1024 * 1024,
        ge=0,
        validation_alias=AliasChoices("max_bytes", "max_size"),
        description="Rotate before the file would exceed this many bytes, or a size such as 100Mi or "
        "1Gi (at least 64Ki, 65536; 0: never rotate).",
    )
    max_files: int = Field(
        5,
        ge=1,
        validation_alias=AliasChoices("max_files", "max_backups"),
        description="Rotated files kept besides the current one (events.jsonl.1 … .N); older are removed.",
    )
    fsync: bool = Field(
        False, description="fsync after each batch (and before each rotation): durable on OK."
    )
    file_mode: int = Field(
        0o644,
        ge=0,
        le=0o7777,
        description="Permissions of newly created files, in octal: 0600, 600 or 0o600; applied exactly "
        "when set (default 0644 less the process umask, as open(2) gives). "
        "A YAML integer whose digits are all 0-7 is read as octal too (600 means 0600). Must include "
        "owner write (0200).",
    )

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        # As --data-dir-max-bytes: a Kubernetes quantity says its unit, a bare number is bytes.
        if not isinstance(value, str):
            return value
        text = value.strip()
        unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if text.endswith(u)), None)
        if unit is not None:
            try:
                number = float(text[: -len(unit)])
                if not math.isfinite(number):
                    raise ValueError
            except ValueError:
                raise ValueError(f"{value!r} is no size: bytes, or a size such as 100Mi or 1Gi") from None
            return int(number * _SIZE_UNITS[unit])
        return value

    @field_validator("max_bytes")
    @classmethod
    def _floor(cls, value: int) -> int:
        # lumberjack's and kube-eventer's maxsize is in MB: max_size=100 rotated at every record and
        # deleted all but the last max_files + 1 of each batch, each counted as delivered.
        if 0 < value < MAX_BYTES_FLOOR:
            raise ValueError(
                f"{value} bytes is below the least rotation size, 64Ki ({MAX_BYTES_FLOOR}): max_bytes (also "
                "written max_size) is in bytes, not MB; write 100Mi (or 104857600) for 100 MiB, or 0 "
                "never to rotate"
            )
        return value

    @field_validator("file_mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> object:
        # Permissions are written in octal everywhere (chmod, kube-eventer's URLs); read as decimal,
        # 0600 became 0o1130, a file its owner cannot open again after a restart.
        if isinstance(value, str):
            digits = value.strip().lower().removeprefix("0o")
            if not digits or digits.strip("01234567"):
                raise ValueError(f"file_mode must be octal permissions such as 0644 or 600, not {value!r}")
            return int(digits, 8)
        if isinstance(value, int) and not isinstance(value, bool) and not str(value).strip("01234567"):
            # YAML reads 600 as decimal 600 (and 0600 as octal, 384, which has an 8 and stays).
            mode = int(str(value), 8)
            if not mode & 0o200:
                raise ValueError(
                    f"file_mode {value} was read as octal {mode:04o} (an integer whose digits are all 0-7 "
                    "is taken as octal digits), which lacks owner write (0200); give the mode as text, "
                    "e.g. '0644'"
                )
            return mode
        return value

    @field_validator("file_mode")
    @classmethod
    def _owner_writes(cls, value: int) -> int:
        if not value & 0o200:
            raise ValueError(
                f"file_mode {value:04o} lacks owner write (0200): the sink could not open its own file "
                "again after a restart or a rotation"
            )
        return value

    @model_validator(mode="after")
    def _has_path(self) -> FileOptions:
        if self.path and self.url:
            # path= won and `check` showed the URL's file: the events went where nobody looked.
            raise ValueError(
                "give the file once: in the URL (file:/var/log/events.jsonl) or as path=, not both"
            )
        if str(_path_of(self)) in ("", "."):
            raise ValueError("the file sink needs a path: --sink=file:/var/log/events.jsonl or path=...")
        return self


def _path_of(options: FileOptions) -> Path:
    raw = options.path or options.url
    if raw.startswith("file://"):
        raw = raw[len("file://") :]
    elif raw.startswith("file:"):
        raw = raw[len("file:") :]
    return Path(raw)


class _Span(NamedTuple):
    """Where a batch's last lines went: the file (device, inode), the bytes, and which lines."""

    dev: int
    ino: int
    start: int
    end: int
    lines: list[int]


class _Job:
    """One batch for the writer: its lines (None: skip) and keys, the state of each line (True once
    written, and synced with fsync=true; an error's text; False: not written), and what the loop's side
    says while it runs: ``stop`` (begin no new write) and ``orphaned`` (the engine was told these lines
    were not delivered: what the job wrote is taken back)."""

    def __init__(self, lines: list[bytes | None], keys: list[str | None]) -> None:
        self.lines = lines
        self.keys = keys
        self.result: list[bool | str] = [False] * len(lines)
        self.stop = threading.Event()
        self.span: _Span | None = None
        self._lock = threading.Lock()
        self._finished = False
        self._orphaned = False
        # Set on the loop: its send was cut off (no longer awaits it), and keys given up meanwhile.
        self.cut = False
        self.gone: frozenset[str] = frozenset()

    def orphan(self) -> bool:
        """Mark it given up; True when the writer will take its lines back as it finishes, False when
        it has finished already (the caller has it done)."""
        with self._lock:
            self._orphaned = True
            return not self._finished

    def finish(self) -> bool:
        """The writer is done with it; True when it was orphaned meanwhile."""
        with self._lock:
            self._finished = True
            return self._orphaned


_TAKEN_BACK = "taken back: its send had been given up"


class _Writer:
    """The blocking part, run in a worker thread. One lock: a send abandoned by the engine's
    timeout may still be running when the next one (or aclose) starts. Each batch also holds an
    exclusive ``flock`` on the file: another eventrouter writing the same path (``eventrouter replay``
    with the live router's configuration) waits, and a failed write's or fsync's cut-back never takes
    away lines it wrote."""

    def __init__(self, path: Path, options: FileOptions, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.max_bytes = options.max_bytes
        self.max_files = options.max_files
        self.fsync = options.fsync
        self.mode = options.file_mode
        # Applied exactly only when set: the default (0644) stays less the umask, as open(2) makes it,
        # so an operator's umask 077 keeps new files 0600 (fchmod to 0644 made them world-readable).
        self.exact_mode = "file_mode" in options.model_fields_set
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.size = 0
        # A created or rotated file's name is not durable until its folder is fsynced; until that
        # succeeds it is tried again before each batch (a reopen sees the file as existing).
        self.dir_unsynced = False
        self._readable = False
        self._check_tail = False  # opened, its last byte not looked at yet (under the lock)
        self._lock_failed: str | None = None  # flock refused (NFS without lockd): said once
        self.unsettled = 0
        """Records written that the engine counts as not delivered (spooled or dead-lettered) and that
        could not be taken back: each is logged by key; written twice if sent again."""

    # -- file handling -------------------------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = os.path.lexists(self.path)
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        readable = True  # read: its last byte, below
        try:
            fd = os.open(self.path, flags | os.O_RDWR | os.O_EXCL, self.mode)
            self._set_mode(fd)
        except FileExistsError:
            try:
                fd = os.open(self.path, flags | os.O_RDWR, self.mode)
            except PermissionError:  # a write-only file: append without the check
                fd = os.open(self.path, flags | os.O_WRONLY, self.mode)
                readable = False
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(self.path))
        self.fd = fd
        self.size = info.st_size
        self._readable = readable
        self._check_tail = True
        if self.fsync and not existed:
            # A new file (first start, after logrotate moved the old one away): its lines are
            # fsynced, and so must be its name, or a power loss can take the file with them.
            self.dir_unsynced = True
        self._sync_dir()  # or one that failed before: the reopen finds the file there already

    def _set_mode(self, fd: int) -> None:
        """A file this process created gets exactly ``file_mode`` when it is set: open(2) takes the
        umask off it (022 made 0664 into 0644)."""
        if not self.exact_mode:
            return
        try:
            os.fchmod(fd, self.mode)
        except OSError as exc:  # a file system without modes (vfat, some CIFS mounts)
            self.log.warning(
                "cannot set the mode of %s to %04o (%s); it is %04o",
                self.path,
                self.mode,
                exc.strerror or exc,
                stat.S_IMODE(os.fstat(fd).st_mode),
            )

    def _mend_tail(self, fd: int) -> None:
        if self._readable and self.size and os.pread(fd, 1, self.size - 1) != b"\n":
            # A write cut short (SIGKILL, OOM kill, power loss) left a partial last line; appending to
            # it would merge it with the next record and spoil both. The batch it belonged to was not
            # acknowledged, so it is written again whole: end the fragment as a line of its own.
            self._write_all(fd, b"\n")
            self.log.warning(
                "%s ended in a partial line (a write cut short, e.g. by a kill); ended it as a line of "
                "its own before appending",
                self.path,
            )

    def close(self) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # drops the flock too

    def _names_ours(self, fd: int) -> bool:
        mine = os.fstat(fd)
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (there.st_ino, there.st_dev) == (mine.st_ino, mine.st_dev)

    def _ensure_current(self) -> int:
        """Reopen when the path no longer names our file (removed, renamed, replaced)."""
        if self.fd is not None and not self._names_ours(self.fd):
            self._close()
        if self.fd is None:
            self.open()
        assert self.fd is not None
        return self.fd

    def _flock(self, fd: int, how: int) -> None:
        try:
            fcntl.flock(fd, how)
        except OSError as exc:
            # ENOLCK (NFS without lockd) and the like: write without it, as before, and say so once.
            if self._lock_failed is None:
                self._lock_failed = exc.strerror or str(exc)
                self.log.warning(
                    "cannot lock %s (%s): writing without the lock; another process writing the same "
                    "file could lose lines to a failed write's cut-back",
                    self.path,
                    self._lock_failed,
                )

    def _current_locked(self) -> int:
        """The path's file, open and locked for this batch, its size read under the lock (another
        writer may have appended, rotated or copytruncated it)."""
        while True:
            fd = self._ensure_current()
            self._flock(fd, fcntl.LOCK_EX)
            if self._names_ours(fd):
                break
            self._close()  # rotated away while we waited for it: the new one
        self.size = os.fstat(fd).st_size
        if self._check_tail:
            self._check_tail = False
            self._mend_tail(fd)
        return fd

    def _unlock(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _sync_dir(self) -> None:
        """fsync the folder if a file was created or renamed in it since the last success."""
        if not self.dir_unsynced:
            return
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.dir_unsynced = False

    def _rotate(self) -> None:
        """The current file to ``.1``, renamed first: to ``.1`` when free, else aside, the backups moved
        up only once that worked. Shifting first, a file that could not be renamed (a mount point,
        EBUSY) left every attempt one backup fewer. Renamed under the lock: a writer waiting for it
        then finds the path names a new file."""
        name = str(self.path)
        aside = name + _ASIDE
        if os.path.lexists(aside):  # left by a rotation cut short: the newest backup, put in place first
            self._into_first(aside)
        if self.max_files == 1 or not os.path.lexists(f"{name}.1"):
            os.replace(name, f"{name}.1")
        else:
            os.replace(name, aside)
            self._into_first(aside)  # failing, the file stays aside (its lines safe) till the next one
        self._close()
        self.dir_unsynced = self.fsync  # the renames, synced by open() with the new file's name

    def _into_first(self, aside: str) -> None:
        """Move the backups up one, up to the first number free (with none free, the oldest, ``.N``,
        is overwritten), then ``aside`` to ``.1``: a retry after a failure half way removes nothing."""
        name = str(self.path)
        free = next((i for i in range(1, self.max_files) if not os.path.lexists(f"{name}.{i}")), None)
        for i in range((free or self.max_files) - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{name}.{i}", f"{name}.{i + 1}")
        os.replace(aside, f"{name}.1")

    def _cannot_rotate(self, exc: OSError) -> str:
        """The reason of the lines a failed rotation left unwritten: what to change."""
        reason = f"cannot rotate {self.path}"
        if exc.filename2 is not None:
            reason += f" (renaming {Path(exc.filename).name} to {Path(exc.filename2).name})"
        reason += f": {exc.strerror or exc}"
        if exc.filename != str(self.path):
            return reason
        if exc.errno in (errno.EBUSY, errno.EXDEV):
            return f"{reason}: it is {_MOUNTED}"
        if exc.errno in (errno.EPERM, errno.EACCES):
            return (
                f"{reason}: rotation renames it within {self.path.parent}, which this user must be "
                "allowed to do (in a sticky folder, only its owner may), or set max_bytes=0 never to "
                "rotate it"
            )
        return reason

    def _write_all(self, fd: int, data: bytes) -> None:
        # Never leave a partial line behind: the retry would append after it and break the JSON lines.
        try:
            append_all(fd, data, self.size)
        except OSError:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size > self.size:
                    self.log.error(
                        "%s: part of a failed write stays in it (the file grew since, by another writer, "
                        "or the cut-back failed); a line there may be torn",
                        self.path,
                    )
            raise
        self.size += len(data)

    def _cut_back(self, fd: int, size: int, count: int, failed: str) -> None:
        """Remove the lines written since ``size`` (``count`` of them) after their fsync failed: they
        are answered retry, and left in the file the retry would append them a second time. Only if
        the file still ends where they ended: cut there, another writer's lines would go too."""
        if self.size <= size:  # nothing written since (a failed write is cut back)
            return
        try:
            now = os.fstat(fd).st_size
            if now != self.size:
                raise OSError(errno.EBUSY, f"the file is {now} bytes, not the {self.size} this batch left")
            os.ftruncate(fd, size)
        except OSError as exc:
            self.log.error(
                "cannot cut %s back to %d bytes after its %s failed: %s; the %d lines of this batch "
                "stay in it and the retry writes them again (duplicates)",
                self.path,
                size,
                failed,
                exc.strerror or exc,
                count,
            )
        else:
            self.size = size

    # -- one batch ------------------------------------------------------------------------------
    def write_batch(self, job: _Job) -> list[bool | str]:
        """Write the job's lines; per line True when durable, or the error that stopped it."""
        with self.lock:
            try:
                self._write_batch(job)
            finally:
                if job.finish():
                    self._take_back(job)
                self._unlock()
            return job.result

    def _write_batch(self, job: _Job) -> None:
        lines, result = job.lines, job.result
        if job.stop.is_set():  # its send was cut off before it began: the next one writes them
            return
        pending: list[int] = []  # indexes written to the current file but not yet synced
        # The current file's size before pending's lines: on a failure it is cut back to it.
        # Lines of earlier batches (and this batch's before a rotation) lie before it: they
        # were answered OK.
        unsynced_from: int | None = None
        batch_from: int | None = None  # where this batch's lines in the current file begin
        in_file: list[int] = []
        doing = "write"
        fd = -1
        try:
            fd = self._current_locked()
            if job.stop.is_set():  # cut off while it waited for another writer's lock
                return
            chunk: list[bytes] = []
            chunk_size = 0
            for i, line in enumerate(lines):
                if line is None:
                    continue
                over = self.max_bytes and self.size + chunk_size + len(line) > self.max_bytes
                if over and (self.size or chunk):
                    if chunk:
                        unsynced_from = self.size
                        self._write_all(fd, b"".join(chunk))
                        chunk, chunk_size = [], 0
                    if self.fsync:
                        doing = "fsync"
                        os.fsync(fd)
                        doing = "write"
                    # In the file now (and synced): OK even if the rotation fails, else the retry
                    # writes them a second time.
                    for j in pending:
                        result[j] = True
                    pending, unsynced_from, batch_from, in_file = [], None, None, []
                    if job.stop.is_set():  # the send's budget is over: no new file begun
                        return
                    doing = "rotate"
                    self._rotate()
                    doing = "write"
                    fd = self._current_locked()
                chunk.append(line)
                chunk_size += len(line)
                pending.append(i)
                in_file.append(i)
            if chunk:
                unsynced_from = batch_from = self.size
                self._write_all(fd, b"".join(chunk))
            if self.fsync:
                doing = "fsync"
                os.fsync(fd)
            for j in pending:
                result[j] = True
            if batch_from is not None:
                info = os.fstat(fd)
                job.span = _Span(info.st_dev, info.st_ino, batch_from, self.size, in_file)
        except OSError as exc:
            if doing == "rotate":
                reason = self._cannot_rotate(exc)
            else:
                reason = f"cannot {doing} {self.path}: {exc.strerror or exc}"
            for i, line in enumerate(lines):
                if line is not None and result[i] is False:
                    result[i] = reason
            if unsynced_from is not None and self.fd is not None:
                # After a failed fsync the lines are in the file but maybe not on the disk.
                self._cut_back(self.fd, unsynced_from, len(pending), f"{doing} ({exc.strerror or exc})")
            # Start from a clean open next time (the fd may be the one that failed).
            with contextlib.suppress(OSError):
                self._close()

    def take_back(self, job: _Job) -> None:
        """``_take_back`` for a job finished before it was given up (run in the worker)."""
        with self.lock:
            if self.fd is not None:
                self._flock(self.fd, fcntl.LOCK_EX)
            try:
                self._take_back(job)
            finally:
                self._unlock()

    def _take_back(self, job: _Job) -> None:
        """The engine was told the job's lines were not delivered (its send was cut off and it spooled
        them at a stop, or dead-lettered them) while the job wrote them: cut the file back off them,
        if they are still the end of the file, for them to be written once, when sent again."""
        span = job.span
        written = [i for i, state in enumerate(job.result) if state is True]
        if not written:
            return
        kept = [i for i in written if span is None or i not in span.lines]  # in a file rotated since
        why = "written before a rotation"
        if span is not None:
            try:
                info = os.fstat(self.fd) if self.fd is not None else None
                if info is None or (info.st_dev, info.st_ino) != (span.dev, span.ino):
                    why = "the file was rotated or reopened since"
                    kept += span.lines
                elif info.st_size != span.end:
                    why = "the file grew since (another writer)"
                    kept += span.lines
                else:
                    assert self.fd is not None
                    os.ftruncate(self.fd, span.start)
                    self.size = span.start
                    # Cut back from here on, whatever the fsync says: the log must not say they stay.
                    for i in span.lines:
                        job.result[i] = _TAKEN_BACK
                    self.log.info(
                        "%s: took back the %d lines of a batch written after its send was given up "
                        "(kept for the next start, or dead-lettered): written once, when sent again",
                        self.path,
                        len(span.lines),
                    )
                    if self.fsync:
                        try:
                            os.fsync(self.fd)
                        except OSError as exc:
                            self.log.warning(
                                "%s: cannot fsync the file after taking those %d lines back (%s): on the "
                                "disk they may still be there after a crash",
                                self.path,
                                len(span.lines),
                                exc.strerror or exc,
                            )
            except OSError as exc:
                why = f"cannot cut the file back: {exc.strerror or exc}"
                kept += [i for i in span.lines if job.result[i] is True]
        if kept:
            keys = [key for i in sorted(set(kept)) if (key := job.keys[i]) is not None]
            self.say_unsettled(keys, f"written after their send was given up stay in it ({why})")

    def say_unsettled(self, keys: Sequence[str], what: str) -> None:
        self.unsettled += len(keys)
        self.log.warning(
            "%s: %d records %s: delivered and also kept for the next start or dead-lettered, so written "
            "twice if sent again (%d such records in all): %s",
            self.path,
            len(keys),
            what,
            self.unsettled,
            ", ".join(keys[:20]) + (f" and {len(keys) - 20} more" if len(keys) > 20 else ""),
        )


class FileSink(Sink[FileOptions]):
    """Appends JSON lines to a file with size-based rotation; writes run in a worker thread."""

    options_model = FileOptions
    description = "JSON lines in a file with size-based rotation"

    def __init__(self, options: FileOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self.path = _path_of(options)
        self._writer = _Writer(self.path, options, self.log)
        # A thread of its own: a hung file system (NFS, a full disk's retries) must not take the loop's
        # default pool, and with it other sinks and DNS lookups, down too.
        self._pool: SinkThread | None = None
        # The write of a send cut off before it ended (the engine's timeout, a stop). It goes on in the
        # worker; the next send waits for it and does not write again what it wrote.
        self._writing: tuple[asyncio.Future[list[bool | str]], _Job] | None = None
        # Keys written whose send has not answered them yet (it was cut off): OK at their next send.
        self._written: set[str] = set()
        self._stopping = False  # stop_sending(): the router is stopping, nothing more is begun

    @staticmethod
    def owned_file(options: FileOptions) -> Path:
        """The file this sink appends to and rotates: ``eventrouter`` refuses two sinks on one."""
        return _path_of(options)

    def _executor(self) -> SinkThread:
        if self._pool is None:
            self._pool = SinkThread(f"sink-{self.context.name}")
        return self._pool

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor(), self._open_checked)
        except OSError as exc:
            raise SinkError(f"file sink cannot write {self.path}: {exc.strerror or exc}") from None

    async def check(self) -> None:
        """What ``start`` needs, without making anything: as ``start`` did, ``eventrouter check`` created
        the file and its missing folders (it left ``/nonexistent-dir`` behind), a side effect of a
        validation. The file, when there, must be a regular file this process may write; otherwise its
        nearest existing folder must be a folder it may create in. With rotation, the file's folder
        must be writable too, as ``start`` checks."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor(), self._writable)
        except OSError as exc:
            raise SinkError(f"file sink cannot write {self.path}: {exc.strerror or exc}") from None

    def _rotatable(self) -> None:
        if self.options.max_bytes and _is_mount_point(self.path):
            raise SinkError(f"file sink cannot rotate {self.path}: it is {_MOUNTED}")

    def _writable(self) -> None:
        if os.path.islink(self.path) and not self.path.exists():
            # A link to a file not there yet: opened with O_CREAT, it is created where the link
            # points, in a folder that must exist (start makes only the link's own folders).
            target = Path(os.path.realpath(self.path))
            if not target.parent.is_dir():
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"{self.path} is a symbolic link to {target}, whose folder {target.parent} does not "
                    "exist",
                )
            if not os.access(target.parent, os.W_OK | os.X_OK):
                raise PermissionError(
                    errno.EACCES, f"{target.parent} (where the link points) is not writable"
                )
            return
        if self.path.exists():
            if not self.path.is_file():
                raise IsADirectoryError(errno.EISDIR, "not a regular file")
            self._rotatable()
            if not os.access(self.path, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
            if self.options.max_bytes and not os.access(self.path.parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "folder not writable (needed for rotation)")
            return
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a directory")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"{folder} is not writable")

    def _open_checked(self) -> None:
        self._rotatable()  # before anything is written that rotation would then fail on
        with self._writer.lock:
            self._writer._close()
            try:
                self._writer._current_locked()
            finally:
                self._writer._unlock()
        # Rotation renames inside the folder: a writable file in a read-only folder fails later otherwise.
        if self.options.max_bytes and not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "folder not writable (needed for rotation)")

    async def _settle(self) -> None:
        """Wait for the write a cut-off send left (the engine's send timeout bounds the wait) and note
        the keys of the lines it wrote: OK, not written again."""
        if self._writing is None:
            return
        future, job = self._writing
        await asyncio.wait([future])  # a cancelled wait leaves the write running, and remembered
        self._writing = None
        if not future.cancelled() and future.exception() is None:
            self._written.update(
                key
                for key, state in zip(job.keys, future.result(), strict=True)
                if key and state is True and key not in job.gone
            )

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        began = time.monotonic()
        # What a write abandoned at the engine's timeout wrote is OK now, not written again.
        await self._settle()
        lines: list[bytes | None] = []
        keys: list[str | None] = []
        settled: dict[int, Outcome] = {}
        for i, occ in enumerate(batch):
            if occ.key in self._written:
                settled[i] = OK
            elif self._stopping:
                settled[i] = _STOPPING
            else:
                try:
                    lines.append(occ.encode(include_raw=self.options.include_raw) + b"\n")
                    keys.append(occ.key)
                    continue
                except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
                    settled[i] = reject(f"cannot encode {occ.key}: {exc}")
            lines.append(None)
            keys.append(None)
        written: list[bool | str] = [False] * len(lines)
        budget = self.context.send_budget
        if any(line is not None for line in lines):
            job = _Job(lines, keys)
            future = asyncio.get_running_loop().run_in_executor(
                self._executor(), self._writer.write_batch, job
            )
            future.add_done_callback(retrieved)
            self._writing = (future, job)
            try:
                await asyncio.wait([future], timeout=max(0.0, budget - (time.monotonic() - began)))
                if not future.done():
                    job.stop.set()  # begins no further file: what is written is said in time
                    await asyncio.wait([future])
            except asyncio.CancelledError:
                job.stop.set()
                job.cut = True  # what it writes is settled by the next send, or taken back
                raise
            self._writing = None
            written = future.result()  # a bug in the worker raises here: the engine retries the batch
            # Given up while this send awaited a job already finished: not taken back (it is answered
            # OK here), so what of it is in the file is said.
            late = [
                key for key, state in zip(keys, written, strict=True) if key in job.gone and state is True
            ]
            if late:
                self._writer.say_unsettled(
                    late, "given up (dead-lettered or dropped) as their send wrote them"
                )
        progress = any(state is True for state in written)
        outcomes: list[Outcome] = []
        for i, state in enumerate(written):
            if i in settled:
                outcomes.append(settled[i])
            elif state is True:
                outcomes.append(OK)
            elif state is False:  # not begun: the send's budget was over, or the router stops
                outcomes.append(
                    _STOPPING
                    if self._stopping
                    else retry(f"{self.path}: no time left in the send's {budget:.3g}s", held=progress)
                )
            else:
                # Items written before a failure stay OK; only the rest is retried.
                outcomes.append(retry(str(state)))
        self._written.difference_update(occ.key for occ in batch)
        return outcomes

    def stop_sending(self) -> None:
        """The router is stopping (its drain deadline passed): nothing new is begun, and a batch in
        progress begins no further file, so that its send answers what it wrote before the leftovers
        are spooled. One write(2) or fsync in progress cannot be called back: if it ends after its send
        was given up, ``aclose`` has its lines taken back off the file."""
        self._stopping = True
        if self._writing is not None:
            self._writing[1].stop.set()

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        """Dead-lettered or dropped: a write still carrying some of them (its send cut off) has its
        lines taken back when it ends, and those not given up are written again by their next send."""
        gone = frozenset(occ.key for occ in occurrences)
        stale = sorted(gone & self._written)
        self._written -= gone
        if self._writing is not None and not gone.isdisjoint(key for key in self._writing[1].keys if key):
            _, job = self._writing
            job.stop.set()
            if job.cut:
                self._writing = None
                self._orphan(job)
            else:
                # Its send still awaits the job. Unfinished, the writer takes the lines back as it
                # ends and the send answers them retry; finished, the send answers what it wrote (a
                # take-back then would cut lines answered OK off the file) and says the given up.
                if job.orphan():
                    self._writing = None
                else:
                    job.gone |= gone
        if stale:
            # Written by an earlier cut-off send and settled since: no longer the end of the file.
            self._writer.say_unsettled(stale, "given up (dead-lettered or dropped) were written already")

    def _orphan(self, job: _Job) -> None:
        if not job.orphan() and self._pool is not None:
            done = asyncio.get_running_loop().run_in_executor(self._pool, self._writer.take_back, job)
            done.add_done_callback(retrieved)

    async def aclose(self) -> None:
        pool = self._pool
        if pool is None:  # never started, or closed already (that close is queued behind the write)
            return
        self._stopping = True
        try:
            # A write left by a cut-off send: the engine kept its batch for the next start (or counted
            # it as not delivered), so what it wrote is taken back. Its lines already settled by a later
            # send that was cut off too are no longer the end of the file: said, as they come again.
            if self._writing is not None:
                _, job = self._writing
                self._writing = None
                job.stop.set()
                self._orphan(job)
            if self._written:
                stale = sorted(self._written)
                self._written.clear()
                self._writer.say_unsettled(stale, "written by a send cut off before it could say so")
            self._pool = None
            # After a write still in progress, if any (the worker runs one job at a time). One hung
            # (a stalled NFS server) is not waited for beyond a moment: it and the close behind it
            # are left to the daemon thread, which does not hold up the process's exit.
            closed = asyncio.get_running_loop().run_in_executor(pool, self._writer.close)
            closed.add_done_callback(retrieved)
            await asyncio.wait([closed], timeout=CLOSE_GRACE)
            if closed.done():
                closed.result()
            else:
                self.log.warning(
                    "sink %s: a write to %s is still hung at the close: its lines are counted as not "
                    "delivered (kept for the next start, or dead-lettered); if it ends before the "
                    "process exits, they stay in the file too (written twice)",
                    self.context.name,
                    self.path,
                )
        finally:
            self._pool = None
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"FileSink(path={str(self.path)!r}, max_bytes={self.options.max_bytes})"
