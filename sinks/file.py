"""``file`` sink: JSON lines appended to a file, with size-based rotation.

``--sink=file:/var/log/events.jsonl?max_bytes=104857600&max_files=5&fsync=true``

Rotation (like logrotate/RotatingFileHandler): before a record would make the current file exceed
``max_bytes``, ``events.jsonl.(N-1)`` → ``.N`` … ``events.jsonl`` → ``.1`` and a fresh file starts; the
oldest (``.N``, N = ``max_files``) is overwritten. A record larger than ``max_bytes`` still gets written,
alone, to a fresh file. Every record is a complete line in exactly one file.

An item is OK only once it is written (unbuffered ``write(2)``) and, with ``fsync=true``, fsynced
(lines whose fsync failed are cut off the file again, for the retry to write them once).
If the file is removed or renamed by someone else (external logrotate), the next batch reopens the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

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

__all__ = ["FileOptions", "FileSink"]


class FileOptions(SinkOptions):
    path: str = Field(
        "",
        description="File to append to (default: the URL part, as in file:/var/log/events.jsonl).",
    )
    max_bytes: int = Field(
        100 * 1024 * 1024,
        ge=0,
        validation_alias=AliasChoices("max_bytes", "max_size"),
        description="Rotate before the file would exceed this many bytes (0: never rotate).",
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
        description="Permissions of newly created files, in octal (default 0644): 0600, 600 or 0o600. "
        "A YAML integer whose digits are all 0-7 is read as octal too (600 means 0600). Must include "
        "owner write (0200).",
    )

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


class _Writer:
    """The blocking part, run in a worker thread. One lock: a send abandoned by the engine's
    timeout may still be running when the next one (or aclose) starts."""

    def __init__(self, path: Path, options: FileOptions, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.max_bytes = options.max_bytes
        self.max_files = options.max_files
        self.fsync = options.fsync
        self.mode = options.file_mode
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.size = 0
        # A created or rotated file's name is not durable until its folder is fsynced; until that
        # succeeds it is tried again before each batch (a reopen sees the file as existing).
        self.dir_unsynced = False

    # -- file handling -------------------------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = os.path.lexists(self.path)
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_RDWR, self.mode)  # read: its last byte, below
            readable = True
        except PermissionError:  # a write-only file: append without the check
            fd = os.open(self.path, flags | os.O_WRONLY, self.mode)
            readable = False
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(self.path))
        self.fd = fd
        self.size = info.st_size
        if self.fsync and not existed:
            # A new file (first start, after logrotate moved the old one away): its lines are
            # fsynced, and so must be its name, or a power loss can take the file with them.
            self.dir_unsynced = True
        self._sync_dir()  # or one that failed before: the reopen finds the file there already
        if readable and self.size and os.pread(fd, 1, self.size - 1) != b"\n":
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
            os.close(fd)

    def _ensure_current(self) -> int:
        """Reopen when the path no longer names our file (removed, renamed, replaced)."""
        if self.fd is not None:
            mine = os.fstat(self.fd)
            try:
                there = os.stat(self.path)
            except FileNotFoundError:
                there = None
            if there is None or (there.st_ino, there.st_dev) != (mine.st_ino, mine.st_dev):
                self._close()
            else:
                self.size = mine.st_size  # also catches copytruncate
        if self.fd is None:
            self.open()
        assert self.fd is not None
        return self.fd

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
        self._close()
        name = str(self.path)
        for i in range(self.max_files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{name}.{i}", f"{name}.{i + 1}")
        os.replace(name, f"{name}.1")
        self.dir_unsynced = self.fsync  # the renames, synced by open() with the new file's name
        self.open()

    def _write_all(self, fd: int, data: bytes) -> None:
        # Never leave a partial line behind: the retry would append after it and break the JSON lines.
        append_all(fd, data, self.size)
        self.size += len(data)

    def _cut_back(self, size: int, count: int, failed: str) -> None:
        """Remove the lines written since ``size`` (``count`` of them) after their fsync failed: they
        are answered retry, and left in the file the retry would append them a second time."""
        if self.fd is None or self.size <= size:  # nothing written since (a failed write is cut back)
            return
        try:
            os.ftruncate(self.fd, size)
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
    def write_batch(self, lines: list[bytes | None]) -> list[bool | str]:
        """Write the lines (None = skip); per line True when durable, or the error that stopped it."""
        with self.lock:
            result: list[bool | str] = [False] * len(lines)
            pending: list[int] = []  # indexes written to the current file but not yet synced
            # The current file's size before pending's lines: on a failure it is cut back to it.
            # Lines of earlier batches (and this batch's before a rotation) lie before it: they
            # were answered OK.
            unsynced_from: int | None = None
            doing = "write"
            try:
                fd = self._ensure_current()
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
                        pending, unsynced_from = [], None
                        self._rotate()
                        assert self.fd is not None
                        fd = self.fd
                    chunk.append(line)
                    chunk_size += len(line)
                    pending.append(i)
                if chunk:
                    unsynced_from = self.size
                    self._write_all(fd, b"".join(chunk))
                if self.fsync:
                    doing = "fsync"
                    os.fsync(fd)
                for j in pending:
                    result[j] = True
            except OSError as exc:
                reason = f"cannot {doing} {self.path}: {exc.strerror or exc}"
                for i, line in enumerate(lines):
                    if line is not None and result[i] is False:
                        result[i] = reason
                if unsynced_from is not None:
                    # After a failed fsync the lines are in the file but maybe not on the disk.
                    self._cut_back(unsynced_from, len(pending), f"{doing} ({exc.strerror or exc})")
                # Start from a clean open next time (the fd may be the one that failed).
                with contextlib.suppress(OSError):
                    self._close()
            return result


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
        # The write in progress and the key of each of its lines (None: not written). A send the
        # engine abandoned at its timeout goes on in the worker; the next send waits for it and does
        # not write again what it wrote.
        self._writing: tuple[asyncio.Future[list[bool | str]], list[str | None]] | None = None

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

    def _writable(self) -> None:
        if self.path.exists():
            if not self.path.is_file():
                raise IsADirectoryError(errno.EISDIR, "not a regular file")
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
        with self._writer.lock:
            self._writer._close()
            self._writer.open()
        # Rotation renames inside the folder: a writable file in a read-only folder fails later otherwise.
        if self.options.max_bytes and not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "folder not writable (needed for rotation)")

    async def _settle(self) -> frozenset[str]:
        """Wait for the write in progress (the engine's send timeout bounds the wait); the keys of
        the lines it wrote."""
        if self._writing is None:
            return frozenset()
        future, keys = self._writing
        await asyncio.wait([future])  # a cancelled wait leaves the write running, and remembered
        self._writing = None
        if future.cancelled() or future.exception() is not None:
            return frozenset()
        return frozenset(
            key for key, state in zip(keys, future.result(), strict=True) if key and state is True
        )

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        # What a write abandoned at the engine's timeout wrote is OK now, not written again.
        delivered = await self._settle()
        lines: list[bytes | None] = []
        keys: list[str | None] = []
        settled: dict[int, Outcome] = {}
        for i, occ in enumerate(batch):
            if occ.key in delivered:
                settled[i] = OK
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
        if any(line is not None for line in lines):
            future = asyncio.get_running_loop().run_in_executor(
                self._executor(), self._writer.write_batch, lines
            )
            future.add_done_callback(retrieved)
            self._writing = (future, keys)
            await self._settle()
            written = future.result()  # a bug in the worker raises here: the engine retries the batch
        outcomes: list[Outcome] = []
        for i, state in enumerate(written):
            if i in settled:
                outcomes.append(settled[i])
            elif state is True:
                outcomes.append(OK)
            else:
                # Items written before a failure stay OK; only the rest is retried.
                outcomes.append(retry(str(state)))
        return outcomes

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:  # never started, or closed already (that close is queued behind the write)
            return
        try:
            # After a write still in progress, if any (the worker runs one job at a time). One hung
            # (a stalled NFS server) is not waited for beyond a moment: it and the close behind it
            # are left to the daemon thread, which does not hold up the process's exit.
            closed = asyncio.get_running_loop().run_in_executor(pool, self._writer.close)
            closed.add_done_callback(retrieved)
            await asyncio.wait([closed], timeout=CLOSE_GRACE)
            if closed.done():
                closed.result()
        finally:
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"FileSink(path={str(self.path)!r}, max_bytes={self.options.max_bytes})"
