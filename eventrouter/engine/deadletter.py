"""Dead-letter file: every occurrence a sink refused for good, with the reason, as JSON lines.

``<data-dir>/deadletter/<sink>.jsonl``, rotated at a size bound so a misconfigured sink cannot fill
the disk: it and the one rotated file each stay within the bound, and the dead letters a rotation
discards are logged and counted (``on_discard``). Without --data-dir the reason is only logged and
counted.

Each line: ``sink``, ``reason``, ``dead_lettered_at``, ``key`` (``<uid>/<occurrence>``), ``record`` (the
normalised record) and ``event`` (the Event object as the API server sent it), so that, once the cause
is fixed, ``eventrouter replay FILE --sink=...`` delivers the same occurrences again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import orjson

from eventrouter.appendfile import append_to
from eventrouter.record import Occurrence

__all__ = ["DEADLETTER_MAX", "DeadLetter"]

DEADLETTER_MAX = 100 * 1024 * 1024
"""Bytes per dead-letter file before it is rotated (one rotated file is kept)."""

log = logging.getLogger(__name__)


class DeadLetter:
    def __init__(
        self,
        path: Path | None,
        *,
        sink: str,
        max_bytes: int = DEADLETTER_MAX,
        on_discard: Callable[[int], object] | None = None,
    ) -> None:
        self.path = path
        self.sink = sink
        self.max_bytes = max_bytes
        self.on_discard = on_discard
        """Told how many dead letters a rotation discarded (the router counts them as dropped)."""
        self.discarded = 0
        # A file left by an earlier process may end in part of a line (a kill mid-write): checked
        # before this process first appends to it.
        self._tail_checked = False
        # Dead letters in the current and the rotated file, known for the files this process wrote
        # (None: read once when a rotation discards that file). Each with the file's identity and
        # size when it was counted: an operator may have removed or edited the file since (replayed
        # and deleted `.1`), and the letters it held then must not be counted as discarded.
        self._letters: _Count | None = None
        self._older_letters: _Count | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, items: Sequence[tuple[Occurrence, str]]) -> bool:
        """Append the items; False (the error and the count logged) when the file cannot be written:
        the caller then names each item, as without a file."""
        if self.path is None or not items:
            return True
        now = time.time()
        # The record and the event are spliced in as the JSON they already are.
        lines = [
            orjson.dumps(
                {"sink": self.sink, "reason": _json_text(reason), "dead_lettered_at": now, "key": occ.key}
            )[:-1]
            + b',"record":'
            + occ.json
            + b',"event":'
            + occ.raw_json
            + b"}\n"
            for occ, reason in items
        ]
        try:
            self._write(self.path, lines)
        except OSError as exc:
            # The caller names every one with its reason (the log is then their only record); 20
            # named here and "N more" left the rest of a refused batch known nowhere.
            log.error(
                "cannot write dead-letter file %s: %s; %d dead-lettered occurrences not kept",
                self.path,
                exc.strerror or exc,
                len(items),
            )
            return False
        return True

    def _write(self, path: Path, lines: list[bytes]) -> None:
        """Keep the current file and the rotated one within ``max_bytes`` each (the data dir's share,
        item 14): a batch that fits goes whole into one file; one larger than the bound keeps its
        newest lines that fit two files (a single line larger than the bound has a file of its own)."""
        size = path.stat().st_size if path.exists() else 0
        total = sum(map(len, lines))
        # The batch of the cut record was not acknowledged and is dead-lettered again whole; the next
        # line must not be glued onto the fragment (replay skips it as not JSON).
        torn = bool(size) and not self._tail_checked and _ends_mid_line(path)
        if size + total <= self.max_bytes or (not size and len(lines) == 1):
            prefix = b""
            if torn:
                prefix = b"\n"
                log.warning(
                    "dead-letter file %s ended in a partial line (a write cut short, e.g. by a kill); "
                    "ended it as a line of its own before appending",
                    path,
                )
            known = _known(path, self._letters) if size else _Count(0, 0, 0, 0)
            append_to(path, prefix + b"".join(lines))
            self._tail_checked = True
            self._letters = None if known is None else _counted(path, known.letters + len(lines))
            return
        older = path.with_suffix(path.suffix + ".1")
        if torn:
            # Ended before the rename: nothing writes to the rotated file again, and its replay waited
            # for the rest of that line for ever (review-c F1).
            append_to(path, b"\n")
            size += 1
            self._tail_checked = True
            log.warning(
                "dead-letter file %s ended in a partial line (a write cut short, e.g. by a kill); "
                "ended it as a line of its own before rotating it to %s",
                path,
                older.name,
            )
        if total > self.max_bytes:
            newest, previous, cut = _split_newest(lines, self.max_bytes)
        else:
            newest, previous, cut = lines, [], 0
        # What the two files held and this write discards: counted once it is gone, also when a
        # write after it fails.
        held = [_held(older, self._older_letters)]
        if previous and size:
            held.append(_held(path, self._letters))
        gone = (0, 0)
        written = False
        try:
            if size:
                current = _known(path, self._letters)
                os.replace(path, older)  # the previous rotated file goes
                gone = held[0]
                # A rename keeps the inode and the size: the count still holds for it.
                self._older_letters, self._letters = current, None
            if previous:
                # The batch fills both files: what the rotated file holds now goes too, and it
                # takes the batch's older part.
                with open(older, "wb"):
                    pass
                gone = (sum(n for n, _ in held), sum(b for _, b in held))
                self._older_letters = _counted(older, 0)
                append_to(older, b"".join(previous))
                self._older_letters = _counted(older, len(previous))
            append_to(path, b"".join(newest))
            self._letters = _counted(path, len(newest))
            written = True
            self._tail_checked = True
        finally:
            if written or gone != (0, 0):  # else nothing changed: the error alone is said
                self._rotated(path, older, gone, lines[:cut] if written else [], len(lines), bool(previous))

    def _rotated(
        self, path: Path, older: Path, gone: tuple[int, int], cut: list[bytes], batch: int, both: bool
    ) -> None:
        letters, size = gone
        if both:
            discarded = f"its oldest {len(cut)} and " if cut else ""
            detail = (
                f"; a batch of {batch} dead letters is larger than the bound and fills both files: "
                f"{discarded}the {letters} the files held ({size + sum(map(len, cut))} bytes) are discarded"
            )
            letters += len(cut)
        elif size:
            detail = (
                f" (the previous {older.name}, {size} bytes of older dead letters, is gone); "
                f"{letters} dead letters discarded"
            )
        else:
            detail = ""
        log.warning(
            "dead-letter file %s rotated at %d bytes to %s%s%s; re-send the dead letters kept with "
            "`eventrouter replay`",
            path,
            self.max_bytes,
            older.name,
            detail,
            ", counted as dropped (deadletter_rotated)" if letters else "",
        )
        if letters:
            self.discarded += letters
            if self.on_discard is not None:
                self.on_discard(letters)


def _json_text(reason: object) -> str:
    """The reason as text orjson takes: a plugin's REJECT reason may be an exception object (orjson
    refused it and the pipeline task, the router with it, ended), or text with a lone surrogate (a
    body decoded with ``surrogateescape``), which orjson refuses as well."""
    try:
        text = reason if isinstance(reason, str) else str(reason)
    except Exception:
        text = f"<{type(reason).__name__} whose text cannot be read>"
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode(errors="replace").decode()
    return text


def _split_newest(lines: list[bytes], bound: int) -> tuple[list[bytes], list[bytes], int]:
    """For a batch larger than ``bound``: its newest lines that fit ``bound`` (at least one), the
    lines before them that fit ``bound`` (may be none), and how many lines before those are left out."""
    end = len(lines)
    parts: list[list[bytes]] = []
    for _ in range(2):
        start, room = end, bound
        while start and (len(lines[start - 1]) <= room or start == end):
            start -= 1
            room -= len(lines[start])
        parts.append(lines[start:end])
        end = start
    return parts[0], parts[1], end


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


class _Count(NamedTuple):
    """Dead letters in a file, and the file (device, inode) and size they were counted at."""

    letters: int
    dev: int
    ino: int
    size: int


def _counted(path: Path, letters: int) -> _Count | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return _Count(letters, info.st_dev, info.st_ino, info.st_size)


def _known(path: Path, count: _Count | None) -> _Count | None:
    """``count`` if it still holds for ``path`` (the same file, at the size it had), else None."""
    try:
        info = path.stat()
    except OSError:
        return None
    if count is None or (info.st_dev, info.st_ino, info.st_size) != (count.dev, count.ino, count.size):
        return None
    return count


def _held(path: Path, count: _Count | None) -> tuple[int, int]:
    """Dead letters and bytes in ``path`` ((0, 0) when it is gone): the count kept when it is still
    that of this file at this size, else the lines counted again."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return 0, 0
    except OSError:
        return _count_lines(path)
    if count is not None and (info.st_dev, info.st_ino, info.st_size) == (count.dev, count.ino, count.size):
        return count.letters, info.st_size
    return _count_lines(path)


def _count_lines(path: Path) -> tuple[int, int]:
    """Dead letters (whole lines) and bytes in ``path``; (0, 0) when there is none. Read in chunks:
    a file is up to 100 MiB (~60 ms), read once for a file an earlier process wrote."""
    lines = size = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                lines += chunk.count(b"\n")
                size += len(chunk)
    except FileNotFoundError:
        pass
    return lines, size
