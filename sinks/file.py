"""``file`` sink: JSON lines appended to a file, with size-based rotation.

``--sink=file:/var/log/events.jsonl?max_bytes=104857600&max_files=5&fsync=true``

Rotation (like logrotate/RotatingFileHandler): before a record would make the current file exceed
``max_bytes``, ``events.jsonl.(N-1)`` → ``.N`` … ``events.jsonl`` → ``.1`` and a fresh file starts; the
oldest (``.N``, N = ``max_files``) is overwritten. A record larger than ``max_bytes`` still gets written,
alone, to a fresh file. Every record is a complete line in exactly one file.

An item is OK only once it is written (unbuffered ``write(2)``) and, with ``fsync=true``, fsynced.
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
from pydantic import AliasChoices, Field, model_validator

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
    file_mode: int = Field(0o644, ge=0, le=0o7777, description="Permissions of newly created files.")

    @model_validator(mode="after")
    def _has_path(self) -> FileOptions:
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
            self._sync_dir()
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
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _rotate(self) -> None:
        if self.fd is not None and self.fsync:
            os.fsync(self.fd)
        self._close()
        name = str(self.path)
        for i in range(self.max_files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{name}.{i}", f"{name}.{i + 1}")
        os.replace(name, f"{name}.1")
        self.open()
        if self.fsync:
            self._sync_dir()

    def _write_all(self, fd: int, data: bytes) -> None:
        # Never leave a partial line behind: the retry would append after it and break the JSON lines.
        append_all(fd, data, self.size)
        self.size += len(data)

    # -- one batch ------------------------------------------------------------------------------
    def write_batch(self, lines: list[bytes | None]) -> list[bool | str]:
        """Write the lines (None = skip); per line True when durable, or the error that stopped it."""
        with self.lock:
            result: list[bool | str] = [False] * len(lines)
            pending: list[int] = []  # indexes written to the current file but not yet synced
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
                            self._write_all(fd, b"".join(chunk))
                            chunk, chunk_size = [], 0
                        self._rotate()  # fsyncs the old file first when fsync is set
                        for j in pending:
                            result[j] = True
                        pending = []
                        assert self.fd is not None
                        fd = self.fd
                    chunk.append(line)
                    chunk_size += len(line)
                    pending.append(i)
                if chunk:
                    self._write_all(fd, b"".join(chunk))
                if self.fsync:
                    os.fsync(fd)
                for j in pending:
                    result[j] = True
            except OSError as exc:
                reason = f"cannot write {self.path}: {exc.strerror or exc}"
                for i, line in enumerate(lines):
                    if line is not None and result[i] is False:
                        result[i] = reason
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

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._open_checked)
        except OSError as exc:
            raise SinkError(f"file sink cannot write {self.path}: {exc.strerror or exc}") from None

    def _open_checked(self) -> None:
        with self._writer.lock:
            self._writer._close()
            self._writer.open()
        # Rotation renames inside the folder: a writable file in a read-only folder fails later otherwise.
        if self.options.max_bytes and not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "folder not writable (needed for rotation)")

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        lines: list[bytes | None] = []
        encode_errors: dict[int, str] = {}
        for i, occ in enumerate(batch):
            try:
                lines.append(occ.encode(include_raw=self.options.include_raw) + b"\n")
            except (TypeError, ValueError, orjson.JSONEncodeError) as exc:
                lines.append(None)
                encode_errors[i] = f"cannot encode {occ.key}: {exc}"
        written = await asyncio.to_thread(self._writer.write_batch, lines)
        outcomes: list[Outcome] = []
        for i, state in enumerate(written):
            if i in encode_errors:
                outcomes.append(reject(encode_errors[i]))
            elif state is True:
                outcomes.append(OK)
            else:
                # Items written before a failure stay OK; only the rest is retried.
                outcomes.append(retry(str(state)))
        return outcomes

    async def aclose(self) -> None:
        await asyncio.to_thread(self._writer.close)

    def __repr__(self) -> str:
        return f"FileSink(path={str(self.path)!r}, max_bytes={self.options.max_bytes})"
