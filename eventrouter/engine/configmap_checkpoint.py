"""Checkpoints kept in one ConfigMap, for deployments without a volume.

Every sink's state (event uid → highest occurrence number accepted) lives in memory, in the pipelines'
CheckpointTable (read at each write; the store keeps only the order of the uids and what a merge raised
above the table); ``record`` and ``remove`` only mark it dirty and ``run()`` writes the whole ConfigMap
at most every ``flush_interval`` with optimistic concurrency. A crash loses at most the last interval,
which is re-delivered, never lost; a smaller interval (0: write-through, one write at a time) narrows
that window at failover.

The API server refuses ConfigMaps above 1 MiB (the values only, binaryData counted decoded: its
ValidateConfigMap adds up ``len(value)``), so the state is packed (``binaryData["checkpoint"]``, zlib
when that helps):

    "ERCK" version(1) | varint #sinks, (varint len, utf-8 name)* | varint #uids |
    per uid, least recently acknowledged first: varint (base << 1 | is_string), then 16 raw bytes
    (canonical lowercase UUID) or varint len + utf-8 | per sink: varint #diffs, (varint index delta,
    varint value)*

``base`` is the value most sinks hold for that uid (0 = absent) and each sink stores only where it
differs (value 0 = absent), so sinks that accepted the same events cost almost nothing more: about
17 bytes per live event in all. When even that does not fit, the least recently acknowledged events
are left out of the ConfigMap (logged and counted): after a restart they are re-delivered, never lost.

A scoped watch (namespaces, a selector) keeps the entries of events it does not see for a while
(fanout.py); when they were first not seen goes beside the state (``binaryData["unseen"]``, see
``encode_unseen``), and those entries are the first left out when the ConfigMap is full: they are
mostly of deleted events, and leaving them out is neither counted in ``truncated`` nor an error.

The entries of a sink the running configuration lacks (taken out by an upgrade, disabled for a while)
are written back as read (see ``UNCONFIGURED_KEEP``): dropped, a rollback or the sink enabled again
sent it everything the API server still held. When each such sink was first written while not
configured goes beside the state (``data["unconfigured"]``, JSON); their entries are the very first
left out when the ConfigMap is full.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import math
import re
import threading
import time
import zlib
from collections.abc import (
    Awaitable,
    Callable,
    Container,
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import chain, compress, repeat
from operator import lshift, ne, or_, sub
from typing import Any, NamedTuple, ParamSpec, TypeVar

import aiohttp
import orjson

from eventrouter.engine.checkpoint import CheckpointBackend, CheckpointTable
from eventrouter.memory import release_free_memory
from eventrouter.protowire import DecodeError, read_varint, varint
from eventrouter.source.kube import ApiError, KubeClient, failure_text, raise_for_status

__all__ = [
    "CONFIGMAP_LIMIT",
    "DATA_KEY",
    "UNCONFIGURED_KEEP",
    "UNCONFIGURED_KEY",
    "UNSEEN_KEY",
    "CheckpointAbandoned",
    "CheckpointFormatError",
    "ConfigMapCheckpoint",
    "ConfigMapCheckpointStore",
    "configmap_size",
    "decode_columns",
    "decode_state",
    "decode_unseen",
    "encode_state",
    "encode_unseen",
    "unreadable",
]

log = logging.getLogger(__name__)

CONFIGMAP_LIMIT = 1024 * 1024  # kube-apiserver: "Too long: must have at most 1048576 bytes"
WRITE_BYTES_PER_SECOND = 64 * 1024
"""At most this much is written per second on average: every write is a new revision of the whole
ConfigMap in etcd, kept until compaction (5 min by default). A 1 MiB checkpoint then goes out every 16 s
instead of every second (~300 MiB of history against etcd's 2 GiB default quota)."""
DATA_KEY = "checkpoint"
SUMMARY_KEY = "summary"
UNSEEN_KEY = "unseen"
UNCONFIGURED_KEY = "unconfigured"
UNCONFIGURED_KEEP = 2 * 3600.0
"""Seconds the entries of a sink that is not configured are kept (from when a router first wrote them
without it). Twice the API server's default ``--event-ttl`` (1 h), as for the entries of events a
scoped watch does not see (fanout.UNSEEN_KEEP): after that each event they name has expired or
occurred again (a new count, sent once to the sink configured again, with or without its entry), so
they would spare it nothing. Meanwhile they are also pruned to the events the API server holds, as
the configured sinks' are (an unscoped watch).

It assumes ``--event-ttl`` is at most 2 h: the router has no setting for it and cannot read the API
server's. Where Events are kept longer (OpenShift keeps them 3 h), a sink configured again more than
2 h after it was left out is sent again what it had accepted of the events still held: duplicates,
never a loss."""
_MAGIC = b"ERCK\x01"
_UNSEEN_MAGIC = b"ERUS\x01"
_RAW, _ZLIB = 0, 1
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class CheckpointFormatError(ValueError):
    pass


# What a checkpoint of CONFIGMAP_LIMIT can hold, with room to spare; a blob past any of these is no
# checkpoint a router wrote (crafted, or damaged) and is refused as unreadable before it costs memory:
# decoded without bounds, 1 MiB made ~1 GiB of zlib output, or ~4 GB of columns (item 309). The
# configMap mode's own load() applies MAX_UNPACKED only: it must read whatever its writer wrote (item 313).
MAX_UNPACKED = 16 * 1024 * 1024
"""Bytes a checkpoint may unpack to, and the writer never writes more: Huffman-only (at least a bit per
byte: at most 8x, 8 MiB from 1 MiB), raw, or level 6 only for a state of at most this much (_build)."""
MAX_UIDS = 2 * CONFIGMAP_LIMIT // 16
"""Uids a checkpoint may hold: each an API server's UUID, 16 random bytes that do not compress, so a
full ConfigMap holds ~61,000 (twice the most that fits)."""
MAX_SINKS = 1024
"""Sink names a checkpoint may hold (a router's configured sinks, and those kept while not configured)."""
MAX_SINK_NAME = 1024
"""Bytes of one sink name."""
MAX_COPIED = 4 * 1024 * 1024
"""Numbers of the columns a bounded decode_columns copies (one list per sink that differs from the
base, 8 bytes a number: 32 MiB): 64 sinks, each differing, at a full ConfigMap's ~61,000 uids. A diff
costs a few bytes of input and its copy 8 bytes per uid."""


P = ParamSpec("P")
T = TypeVar("T")
_workers: ThreadPoolExecutor | None = None


def _off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
    """Run ``fn`` in the checkpoint's own threads, not the loop's default pool. glibc gives each thread
    that allocates a heap of its own (an arena) and malloc_trim leaves what a write's buffers used there
    (~9 MiB at 50,000 events and 7 sinks): encoding in whichever pool thread was free left such a heap
    in several (~20 MiB more than the data-dir mode after a relist). One thread does the writes; a
    second starts only for work that comes while the first is busy (an abandoned encoding finishing its
    pass: the stop's write does not wait for it)."""
    global _workers
    if _workers is None:
        _workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="checkpoint-configmap")
    return asyncio.get_running_loop().run_in_executor(_workers, functools.partial(fn, *args, **kwargs))


# ---- encoding -----------------------------------------------------------------------------------


def _uid_bytes(uid: str) -> bytes | None:
    """16 raw bytes when ``uid`` is a canonical lowercase UUID (what the API server assigns)."""
    if len(uid) == 36 and _UUID.fullmatch(uid):
        return bytes.fromhex(uid.replace("-", ""))
    return None


def _uuids_bytes(uids: Sequence[str]) -> bytes | None:
    """The 16 raw bytes of each uid, end to end, when every one is a canonical lowercase UUID; checked
    and converted all at once (a regex per uid cost more than the rest of the uid part)."""
    n = len(uids)
    joined = "".join(uids)
    if len(joined) != 36 * n or (n and min(map(len, uids)) != 36):  # every one 36 characters
        return None
    dashes = "-" * n
    if not (joined[8::36] == joined[13::36] == joined[18::36] == joined[23::36] == dashes):
        return None
    digits = joined.replace("-", "")
    if len(digits) != 32 * n or digits.lower() != digits:  # no other dash, no upper case
        return None
    try:
        raw = bytes.fromhex(digits)
    except ValueError:  # not hex
        return None
    return raw if len(raw) == 16 * n else None  # fromhex skips whitespace


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def encode_state(states: Mapping[str, Mapping[str, int]], order: Sequence[str]) -> bytes:
    """Pack the states of several sinks. ``order``: every uid present in any state, oldest first."""
    return _pack(_encode(states, order))


_TRIM_FROM = 256 * 1024
"""ConfigMap bytes from which a periodic write hands its freed memory back to the OS (~15,000 events)."""
_TRIM_REMOVED_FROM = 15_000
"""Uids removed since the last write from which a write also trims, however small (events expired):
what held them (the removed uids, the order's stale ones, their strings) is freed by that write."""
_PACK_FAST_FROM = 64 * 1024
"""Bytes from which a write packs fast first (below, level 6 takes a few milliseconds)."""


def _pack(data: bytes, fast: bool = False) -> bytes:
    """zlib at level 6, or ``fast``: Huffman coding only, a fifth of the time on what is mostly random
    uids and as small within 1% (larger where a sink lags: its diffs repeat, which only level 6 finds)."""
    if fast:
        packer = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_HUFFMAN_ONLY)
        packed = packer.compress(data) + packer.flush()
    else:
        packed = zlib.compress(data, 6)
    if len(packed) < len(data):
        return bytes([_ZLIB]) + packed
    return bytes([_RAW]) + data


def _encode(
    states: Mapping[str, Mapping[str, int]], order: Sequence[str], stop: threading.Event | None = None
) -> bytes:
    """encode_state's bytes before compression. ``stop``: set by a caller that no longer wants them
    (CheckpointAbandoned between passes, not a thread left encoding beside the write that follows).

    Column by column, in C where it can (``map``, ``compress``): it runs at every write of the whole
    state, and uid by uid in Python 50,000 events x 7 sinks took 0.3-0.6 CPU-s, ten times that in wall
    time on a CPU-starved node, where it made the stop's last write miss its time budget."""
    names = sorted(states)
    n = len(order)
    out = bytearray(_MAGIC)
    out += varint(len(names))
    for name in names:
        raw = name.encode("utf-8")
        out += varint(len(raw)) + raw
    out += varint(n)
    # Each sink's value of each uid (0: absent), in ``order``.
    columns = [list(map(states[name].get, order, repeat(0, n))) for name in names]
    _check(stop)
    bases = _bases(columns, n)
    _check(stop)
    out += _uids(order, bases)
    for column in columns:
        _check(stop)
        if column == bases:  # mostly: a sink level with the others differs nowhere
            out += varint(0)
            continue
        differs = list(map(ne, column, bases))
        at = list(compress(range(n), differs))
        deltas = map(sub, at, chain((0,), at))  # each index from the previous one (the first from 0)
        out += varint(len(at))
        out += _varints(list(chain.from_iterable(zip(deltas, compress(column, differs), strict=True))))
    _check(stop)
    return bytes(out)


def _varints(values: list[int]) -> bytes:
    if not values or (min(values) >= 0 and max(values) < 128):
        return bytes(values)  # each its own varint: one byte
    return b"".join(map(varint, values))


class CheckpointAbandoned(Exception):
    """encode_state's caller set its ``stop``: the encoding was given up."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise CheckpointAbandoned


def _bases(columns: list[list[int]], n: int) -> list[int]:
    """Per uid, the value most sinks hold (ties go to the larger: fewer sinks differ from
    "accepted"). Only the uids whose sinks disagree are looked at one by one."""
    if not columns:
        return [0] * n
    first = columns[0]
    if len(columns) == 1:
        return first
    mixed = list(map(ne, first, columns[1]))
    for column in columns[2:]:
        mixed = list(map(or_, mixed, map(ne, first, column)))
    if not any(mixed):
        return first
    bases = list(first)
    half = len(columns) / 2
    for index, row in zip(
        compress(range(n), mixed), compress(zip(*columns, strict=True), mixed), strict=True
    ):
        # Mostly one sink behind the others: a majority is the most common value.
        if row.count(value := row[0]) > half or row.count(value := row[-1]) > half:
            bases[index] = value
        else:  # max keeps the first of equals: in descending order, the larger
            bases[index] = max(sorted(set(row), reverse=True), key=row.count)
    return bases


def _uids(order: Sequence[str], bases: list[int]) -> bytes:
    """The uid part: per uid, varint (base << 1 | is_string), then 16 raw bytes or varint len + utf-8."""
    n = len(order)
    raw = _uuids_bytes(order)
    if raw is not None:
        if not bases or (min(bases) >= 0 and max(bases) < 64):
            # Every head one byte: 17 bytes per uid, laid out by strided copies.
            out = bytearray(17 * n)
            out[0::17] = bytes(map(lshift, bases, repeat(1)))
            for i in range(16):
                out[1 + i :: 17] = raw[i::16]
            return bytes(out)
        heads = map(varint, map(lshift, bases, repeat(1)))
        uids = map(raw.__getitem__, map(slice, range(0, 16 * n, 16), range(16, 16 * n + 16, 16)))
        return b"".join(chain.from_iterable(zip(heads, uids, strict=True)))
    out = bytearray()
    for uid, base in zip(order, bases, strict=True):
        raw_uid = _uid_bytes(uid)
        if raw_uid is not None:
            out += varint(base << 1)
            out += raw_uid
        else:
            text = uid.encode("utf-8")
            out += varint(base << 1 | 1) + varint(len(text)) + text
    return bytes(out)


def encode_unseen(order: Sequence[str], unseen: Mapping[str, float]) -> bytes:
    """When each uid of ``unseen`` found in ``order`` (encode_state's) was first not seen:
    ``"ERUS" version(1) | varint #entries | (varint index delta, varint whole seconds)*``, beside the
    state and not in it, so that a router of an earlier version still reads the state."""
    out = bytearray()
    count = last = 0
    for index, uid in enumerate(order):
        since = unseen.get(uid)
        if since is not None:
            out += varint(index - last) + varint(max(0, int(since)))
            last = index
            count += 1
    data = _UNSEEN_MAGIC + varint(count) + bytes(out)
    packed = zlib.compress(data, 6)
    if len(packed) < len(data):
        return bytes([_ZLIB]) + packed
    return bytes([_RAW]) + data


def decode_unseen(blob: bytes, order: Sequence[str]) -> dict[str, float]:
    """The inverse of encode_unseen, against the ``order`` decoded from the same ConfigMap."""
    data = _unpack(blob)
    if not data.startswith(_UNSEEN_MAGIC):
        raise CheckpointFormatError("not the first-unseen times of an eventrouter checkpoint (version 1)")
    count, pos = _read_varint(data, len(_UNSEEN_MAGIC))
    unseen: dict[str, float] = {}
    index = 0
    for _ in range(count):
        delta, pos = _read_varint(data, pos)
        since, pos = _read_varint(data, pos)
        index += delta
        if index >= len(order):
            raise CheckpointFormatError("unseen index out of range")
        unseen[order[index]] = float(since)
    if pos != len(data):
        raise CheckpointFormatError("trailing bytes")
    return unseen


def _unpack(blob: bytes) -> bytes:
    if not blob:
        raise CheckpointFormatError("empty checkpoint")
    if blob[0] == _ZLIB:
        unpacker = zlib.decompressobj()
        try:
            # One byte past the bound tells a blob that unpacks further (a zlib bomb: 1 MiB of it is
            # ~1 GiB) without unpacking the rest.
            data = unpacker.decompress(blob[1:], MAX_UNPACKED + 1)
        except zlib.error as exc:
            raise CheckpointFormatError(f"bad compression: {exc}") from None
        if len(data) > MAX_UNPACKED:
            raise CheckpointFormatError(
                f"decompresses past {MAX_UNPACKED >> 20} MiB, more than a checkpoint of "
                f"{CONFIGMAP_LIMIT >> 20} MiB holds"
            )
        if not unpacker.eof:  # as zlib.decompress says it
            raise CheckpointFormatError("bad compression: incomplete or truncated stream")
        return data
    if blob[0] == _RAW:
        return blob[1:]
    raise CheckpointFormatError(f"unknown encoding {blob[0]}")


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varint(data, pos)
    except DecodeError as exc:
        raise CheckpointFormatError(str(exc)) from None


def decode_state(blob: bytes) -> tuple[dict[str, dict[str, int]], list[str]]:
    """The inverse of encode_state: (states by sink, uids oldest first)."""
    names, columns, order = decode_columns(blob)
    return {name: _entries(order, column) for name, column in zip(names, columns, strict=True)}, order


def decode_columns(blob: bytes, bounded: bool = True) -> tuple[list[str], list[list[int]], list[str]]:
    """encode_state's content as columns: (sink names, each sink's number of each uid of ``order``, 0
    where it holds none, and ``order``, the uids oldest first). No dict is built: a sink level with
    the base shares its list, another gets a copy with its diffs. Not ``bounded``: only MAX_UNPACKED
    (the configMap mode's own load(): every count its writer can write, 73 sinks each a uid off at a
    full ConfigMap copy ~34 MiB)."""
    data = _unpack(blob)
    if not data.startswith(_MAGIC):
        raise CheckpointFormatError("not an eventrouter checkpoint (version 1)")
    names, pos = _names(data, len(_MAGIC), bounded)
    total, pos = _read_varint(data, pos)
    if bounded and total > MAX_UIDS:
        raise CheckpointFormatError(f"{total} uids, more than a checkpoint holds ({MAX_UIDS})")
    if 2 * total > len(data) - pos:  # each uid at least 2 bytes: refused before any list is built
        raise CheckpointFormatError(f"truncated: {total} uids in {len(data) - pos} bytes")
    order: list[str] = []
    bases: list[int] = []
    for _ in range(total):
        head, pos = _read_varint(data, pos)
        if head & 1:
            size, pos = _read_varint(data, pos)
            uid = data[pos : pos + size].decode("utf-8")
            pos += size
        else:
            if pos + 16 > len(data):
                raise CheckpointFormatError("truncated uid")
            uid = _uuid_text(data[pos : pos + 16])
            pos += 16
        order.append(uid)
        bases.append(head >> 1)
    columns: list[list[int]] = []
    copied = 0
    for name in names:
        n, pos = _read_varint(data, pos)
        if n > total:  # each uid differs once at most
            raise CheckpointFormatError(f"sink {name[:64]!r}: {n} diffs for {total} uids")
        copied += total if n else 0
        if bounded and copied > MAX_COPIED:
            raise CheckpointFormatError(
                f"more sinks differing at more uids than a checkpoint holds ({len(names)} sinks, "
                f"{total} uids)"
            )
        column = list(bases) if n else bases
        index = 0
        for _ in range(n):
            delta, pos = _read_varint(data, pos)
            value, pos = _read_varint(data, pos)
            index += delta
            if index >= total:
                raise CheckpointFormatError("diff index out of range")
            column[index] = value
        columns.append(column)
    if pos != len(data):
        raise CheckpointFormatError("trailing bytes")
    return names, columns, order


def _names(data: bytes, pos: int, bounded: bool) -> tuple[list[str], int]:
    """decode_columns' sink names and the position after them: each once (the keys of a router's dict
    of states); ``bounded``: at most MAX_SINKS, each non-empty and at most MAX_SINK_NAME bytes."""
    count, pos = _read_varint(data, pos)
    if bounded and count > MAX_SINKS:
        raise CheckpointFormatError(f"{count} sink names, more than a checkpoint holds ({MAX_SINKS})")
    names: list[str] = []
    for _ in range(count):
        size, pos = _read_varint(data, pos)
        if bounded and not 0 < size <= MAX_SINK_NAME:
            raise CheckpointFormatError(f"a sink name of {size} bytes (1 to {MAX_SINK_NAME})")
        if pos + size > len(data):
            raise CheckpointFormatError("truncated sink name")
        names.append(data[pos : pos + size].decode("utf-8"))
        pos += size
    if len(set(names)) != count:
        raise CheckpointFormatError("a sink name given twice")
    return names, pos


def unreadable(exc: BaseException) -> str:
    """Why a checkpoint could not be decoded, for a log line (a MemoryError says nothing itself)."""
    if isinstance(exc, MemoryError):
        return "more than the memory left to decode it: MemoryError"
    return str(exc)


def _entries(order: list[str], column: list[int]) -> dict[str, int]:
    """A column (decode_columns) as the sink's entries, oldest first (0: not an entry)."""
    return dict(zip(compress(order, column), filter(None, column), strict=True))


def configmap_size(obj: Mapping[str, Any]) -> int:
    """What the API server counts against the 1 MiB limit: the values, not the keys (binaryData
    decoded)."""
    total = 0
    for value in (obj.get("data") or {}).values():
        total += len(str(value).encode("utf-8"))
    for value in (obj.get("binaryData") or {}).values():
        total += len(base64.b64decode(value))
    return total


def configmap_version(obj: Mapping[str, Any]) -> str | None:
    """What tells one state of a ConfigMap from every other: its uid (one deleted and made anew has
    another) and resourceVersion (each write changes it); None when the object lacks either."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    uid, version = meta.get("uid"), meta.get("resourceVersion")
    if not isinstance(uid, str) or not uid or not isinstance(version, str) or not version:
        return None
    return f"uid={uid} resourceVersion={version}"


# ---- the store ----------------------------------------------------------------------------------


class ConfigMapCheckpoint:
    """A checkpoint ConfigMap's content as read (``ConfigMapCheckpointStore.read``), kept as decoded:
    the uids and one list of numbers per sink. A dict per sink (7 of 50,000 entries, and their copies
    while decoding) left ~21 MiB at the top of the decoding thread's glibc heap, which malloc_trim does
    not hand back outside the main arena (item 299)."""

    __slots__ = ("_columns", "order", "unseen")

    def __init__(self, order: list[str], columns: dict[str, list[int]], unseen: dict[str, float]) -> None:
        self.order = order
        """The uids, oldest first."""
        self._columns = columns
        self.unseen = unseen
        """When each event a scoped watch did not see was first not seen (wall-clock seconds)."""

    @property
    def sinks(self) -> list[str]:
        """The sinks the ConfigMap holds entries of."""
        return list(self._columns)

    def entries(self, sink: str) -> Mapping[str, int]:
        """``sink``'s entries (uid → the highest occurrence number it accepted), oldest first, read from
        its column when iterated (no dict built); empty for a sink the ConfigMap lacks."""
        return ColumnEntries(self.order, self._columns.get(sink, []))

    def unseen_of(self, sinks: Iterable[str]) -> dict[str, float]:
        """The first-unseen times of the uids one of ``sinks`` holds an entry of."""
        if not self.unseen:
            return {}
        columns = [self._columns[s] for s in sinks if s in self._columns]
        held = set(compress(self.order, map(any, zip(*columns, strict=True)))) if columns else set()
        return {uid: t for uid, t in self.unseen.items() if uid in held}


class ColumnEntries(Mapping[str, int]):
    """One sink's entries of a decoded checkpoint, as a mapping over its column: ``items()`` pairs
    each uid with its number in C (``compress``), and only a lookup builds a dict."""

    __slots__ = ("_index", "column", "order")

    def __init__(self, order: list[str], column: list[int]) -> None:
        self.order = order
        self.column = column
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.column) - self.column.count(0)

    def __iter__(self) -> Iterator[str]:
        return compress(self.order, self.column)

    def __getitem__(self, uid: str) -> int:
        if self._index is None:
            self._index = _entries(self.order, self.column)
        return self._index[uid]

    def items(self) -> ItemsView[str, int]:
        return _ColumnItems(self)


class _ColumnItems(ItemsView[str, int]):
    def __init__(self, entries: ColumnEntries) -> None:
        super().__init__(entries)
        self._entries = entries

    def __iter__(self) -> Iterator[tuple[str, int]]:
        e = self._entries
        return zip(compress(e.order, e.column), filter(None, e.column), strict=True)


class _Lagging(NamedTuple):
    """A sink read from its table that is behind another or holds merged numbers: copies taken on the
    loop (C-level: its table's entries, shared, its own lower numbers, the merged ones), its state built
    from them in the store's thread (built on the loop, row by row in Python, it cost ~6 ms of loop per
    lagging sink per write at 50,000 events: a relist's whole drain)."""

    entries: dict[str, int]
    behind: dict[str, int]
    merged: dict[str, int]

    def state(self) -> dict[str, int]:
        """What ``CheckpointTable.view`` and the store's ``_state`` give, from the copies."""
        out = dict(self.entries)
        behind = self.behind
        out.update(behind)  # every uid of ``behind`` is one of ``entries``: their order is kept
        for uid in [uid for uid, n in behind.items() if not n]:  # not accepted at all
            del out[uid]
        for uid, n in self.merged.items():  # a merge's numbers, where higher
            if n > out.get(uid, 0):
                out[uid] = n
        return out


def _built(
    states: Mapping[str, dict[str, int] | _Lagging], stop: threading.Event | None
) -> dict[str, dict[str, int]]:
    """Every sink's state, the lagging ones built; one equal to another shares its dict (as on the loop)."""
    distinct = list({id(c): c for c in states.values() if isinstance(c, dict)}.values())
    out: dict[str, dict[str, int]] = {}
    for sink, state in states.items():
        if isinstance(state, _Lagging):
            _check(stop)
            new = state.state()
            state = next((c for c in distinct if c == new), new)
            if state is new:
                distinct.append(new)
        out[sink] = state
    return out


class _SinkBackend:
    """The CheckpointBackend of one sink (a TableBackend): memory only; the store persists it."""

    def __init__(self, store: ConfigMapCheckpointStore, sink: str) -> None:
        self.store = store
        self.sink = sink

    def load(self) -> dict[str, int]:
        return self.store._state(self.sink)

    def bind(self, table: CheckpointTable, index: int) -> None:
        self.store._bind(self, table, index)

    def record(self, acks: Mapping[str, int]) -> None:
        self.store._record(self.sink, acks, self)

    def remove(self, uids: Iterable[str]) -> None:
        self.store._remove(self.sink, uids, self)

    def compact(self, state: Mapping[str, int]) -> None:
        self.store._replace(self.sink, state, self)

    def close(self, state: Mapping[str, int]) -> None:
        self.store._replace(self.sink, state, self)


class ConfigMapCheckpointStore:
    """Every sink's checkpoint in the ConfigMap ``namespace/name``. Call ``load()`` before creating
    backends (when leader election is on: after becoming leader, so the state is the old leader's
    latest), run ``run()`` while routing and ``flush()`` once more at shutdown."""

    def __init__(
        self,
        kube: KubeClient,
        *,
        namespace: str,
        name: str,
        flush_interval: float = 5.0,
        limit: int = CONFIGMAP_LIMIT,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.flush_interval = flush_interval
        self.limit = limit
        self.path = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self._states: dict[str, dict[str, int]] = {}
        # The sinks whose entries are read from their pipeline's CheckpointTable column (_bind): the
        # backend bound, the table, the column. Their _states hold only the numbers a merge raised above
        # the column's (another writer's; usually none): a copy of every entry per sink was ~16.5 MiB at
        # 50,000 events and 7 sinks, where the data-dir mode keeps the table alone.
        self._columns: dict[str, tuple[_SinkBackend, CheckpointTable, int]] = {}
        # Every uid of any sink, least recently acknowledged first (values unused; stale keys are
        # dropped when encoding).
        self._order: dict[str, None] = {}
        # Uids removed since the last successful write, each with a bit per sink it was removed from
        # (``_bit``): a merge must not bring them back. One map for all sinks: a set per sink was
        # ~21 MiB of heap when 50,000 events expired at 7 sinks.
        self._removed: dict[str, int] = {}
        self._bits: dict[str, int] = {}
        self._freed = 0  # uids removed before the last successful write (_TRIM_REMOVED_FROM)
        # The fanout's first-unseen times (uid → wall-clock seconds; its own map, read at each write),
        # those read at load, and those of the last write.
        self._unseen: Mapping[str, float] = {}
        self._unseen_loaded: dict[str, float] = {}
        self._unseen_written: dict[str, float] = {}
        self._sinks: set[str] = set()
        # Sinks whose entries are kept though not configured: when a router first wrote them so
        # (wall-clock seconds, from the ConfigMap), and those dropped after UNCONFIGURED_KEEP (a merge
        # must not bring them back).
        self._unconfigured_since: dict[str, float] = {}
        self._expired: set[str] = set()
        self._resource_version: str | None = None
        self._exists = False
        self._generation = 0
        self._flushed_generation = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        # A write whose caller was cancelled after its request went out (the stop cancels the periodic
        # write wherever it is): it finishes on its own and the next write waits for it first.
        self._in_flight: asyncio.Future[None] | None = None
        # The body of the last request not answered (timed out, cancelled) since the last write: a 409
        # may be this very write, applied; it is recognised by its content, not merged as another's.
        self._unanswered: dict[str, Any] | None = None
        # Reported numbers.
        self.last_size = 0  # bytes the last written ConfigMap counted against the limit
        self.truncated = 0  # uids left out of the last write because they would not fit
        # Uids of events the scoped watch does not see, left out of the last write before any other
        # (not in ``truncated``: mostly deleted events; one that comes back into scope is delivered
        # again after a restart).
        self.unseen_left_out = 0
        # Entries of sinks not configured left out of the last write to fit (before any other; not in
        # ``truncated``: a sink configured again gets again only what the API server still holds).
        self.unconfigured_left_out = 0
        self.truncations = 0  # writes that had to leave uids out
        self.conflicts = 0  # 409 answers merged
        self.flushes = 0  # successful writes
        self.trims = 0  # freed memory handed back to the OS after a large write
        self.rounds = 0  # run() write attempts
        self.errors = 0  # failed writes
        self.last_failure: BaseException | None = None
        """Why the last write failed (None after a success): the stop judges whether to try again."""
        self.on_write: Callable[[bool], None] | None = None
        """Told the outcome of each write (True: persisted): the router's metrics."""
        self.on_trim: Callable[[], None] | None = None
        """Told of each trim after a large write (the router counts them with its own)."""

    def __repr__(self) -> str:
        return f"<ConfigMapCheckpointStore {self.namespace}/{self.name} sinks={sorted(self._states)}>"

    @property
    def write_interval(self) -> float:
        """Seconds between writes: ``flush_interval``, longer for a large ConfigMap (see
        WRITE_BYTES_PER_SECOND); the re-delivery window after a leader is killed grows with it."""
        return max(self.flush_interval, self.last_size / WRITE_BYTES_PER_SECOND)

    @property
    def dirty(self) -> bool:
        return self._generation != self._flushed_generation

    @property
    def unconfigured(self) -> list[str]:
        """The sinks whose entries are kept though not configured (``backend()`` not called)."""
        return sorted(s for s in self._states if s not in self._sinks)

    # ---- API -----------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the ConfigMap (404: start empty). Raises ApiError when it cannot be read at all."""
        obj = await self._get()
        self._states, self._order, self._columns = {}, {}, {}
        self._removed = {}
        self._unseen = self._unseen_loaded = {}
        self._unconfigured_since, self._expired = {}, set()
        if obj is None:
            self._exists, self._resource_version = False, None
            log.info("checkpoint ConfigMap %s/%s does not exist yet", self.namespace, self.name)
            return
        self._exists = True
        self._resource_version = (obj.get("metadata") or {}).get("resourceVersion")
        states, order = self._parse(obj)
        self._states = states
        self._order = dict.fromkeys(order)
        self._unconfigured_since = {s: t for s, t in self._parse_since(obj).items() if s in states}
        self._unseen_loaded = self._parse_unseen(obj, order)
        # Written again as read until the fanout hands its own (at its first prune): a leader that
        # fails before must not write the ConfigMap without them.
        self._unseen = self._unseen_written = dict(self._unseen_loaded)
        log.info(
            "checkpoint ConfigMap %s/%s: %s",
            self.namespace,
            self.name,
            ", ".join(f"{s}={len(m)}" for s, m in sorted(states.items())) or "empty",
        )

    async def read(self) -> ConfigMapCheckpoint | None:
        """The ConfigMap's checkpoint as it stands, for another store to start from (the data dir's
        seed, ``--checkpoint-seed-configmap``); None when it does not exist (404). Only a GET: this
        store's own state is not touched. Raises ApiError (403, 5xx) or a request's error when it cannot
        be read, and CheckpointFormatError when it holds no readable checkpoint, or one past what a
        checkpoint can hold (MAX_UNPACKED and the others; a seed says so. load() applies MAX_UNPACKED
        only, which its writer never passes, and starts empty past it: a leader must not stop for it)."""
        obj = await self.read_object()
        if obj is None:
            return None
        return await self.decode(obj)

    async def read_object(self) -> dict[str, Any] | None:
        """The ConfigMap as it stands, not decoded (a GET only); None when it does not exist (404).
        Its ``configmap_version`` tells whether it is one a reader took before (``decode`` then spared)."""
        return await self._get()

    async def decode(self, obj: Mapping[str, Any]) -> ConfigMapCheckpoint:
        """The checkpoint ``obj`` (``read_object``'s) holds, decoded off the loop (seconds of CPU when
        large); CheckpointFormatError when it holds none that can be read."""
        return await _off_loop(self._read_columns, obj)

    def _read_columns(self, obj: Mapping[str, Any]) -> ConfigMapCheckpoint:
        names, columns, order = _decode_columns(obj)
        return ConfigMapCheckpoint(
            order, dict(zip(names, columns, strict=True)), self._parse_unseen(obj, order)
        )

    def load_unseen(self) -> dict[str, float]:
        """When each event a scoped watch did not see was first not seen, as the last leader wrote it
        (fanout.UnseenStore)."""
        return dict(self._unseen_loaded)

    def save_unseen(self, unseen: Mapping[str, float]) -> None:
        """The fanout's first-unseen times (fanout.UnseenStore): kept as the caller's own map, read at
        each write; written (soon) when it changed since the last write."""
        self._unseen = unseen
        if unseen != self._unseen_written:
            self._touch()

    def backend(self, sink: str) -> CheckpointBackend:
        self._sinks.add(sink)
        self._states.setdefault(sink, {})
        self._unconfigured_since.pop(sink, None)
        return _SinkBackend(self, sink)

    def report_unconfigured(self) -> None:
        """Once the backends of the configured sinks exist (the router's start): say whose entries are
        kept though not configured, and drop those kept for UNCONFIGURED_KEEP already."""
        now = time.time()
        self._expire_unconfigured(now)
        for sink in self.unconfigured:
            since = self._unconfigured_since.setdefault(sink, now)
            if not self._states[sink]:
                continue
            log.info(
                "checkpoint ConfigMap %s/%s: keeping the entries of sink %r, which is not configured "
                "(%d events; not configured since %s): configured again by %s it gets only what it has not "
                "accepted; they are pruned to the events the API server holds and dropped after that",
                self.namespace,
                self.name,
                sink,
                len(self._states[sink]),
                _utc(since),
                _utc(since + UNCONFIGURED_KEEP),
            )

    def prune_unconfigured(self, live: Container[str]) -> None:
        """Drop the entries of sinks not configured whose events the API server no longer holds
        (``live``: a complete list of an unscoped watch), as the configured sinks' are pruned."""
        changed = False
        for sink in self.unconfigured:
            state = self._states[sink]
            gone = [uid for uid in state if uid not in live]
            if gone:
                for uid in gone:
                    del state[uid]
                self._note_removed(sink, gone)
                changed = True
        if changed:
            self._touch()

    def _expire_unconfigured(self, now: float) -> None:
        for sink in self.unconfigured:
            since = self._unconfigured_since.setdefault(sink, now)
            if now - since < UNCONFIGURED_KEEP:
                continue
            entries = len(self._states.pop(sink))
            del self._unconfigured_since[sink]
            self._forget_removed(sink)
            self._expired.add(sink)
            self._touch()
            log.info(
                "checkpoint ConfigMap %s/%s: dropped the %d entries of sink %r, not configured since %s "
                "(kept for %s)",
                self.namespace,
                self.name,
                entries,
                sink,
                _utc(since),
                _duration(UNCONFIGURED_KEEP),
            )

    async def run(self) -> None:
        """Write changes until cancelled: at most one write per ``flush_interval`` (0: as soon as the
        previous write finished, for the smallest re-delivery window at failover); failures are retried."""
        while True:
            await self._changed.wait()
            await asyncio.sleep(self.write_interval)  # coalesce the acks of this interval into one write
            self._changed.clear()
            written = self.flushes
            ok = await self.flush()
            self.rounds += 1
            if self.flushes != written and (
                self.last_size >= _TRIM_FROM or self._freed >= _TRIM_REMOVED_FROM
            ):
                # A large write's copies and buffers (the snapshot, the columns, the packed body and its
                # base64) stay in glibc's heaps, a worker thread's among them, until the router's next
                # periodic trim (60 s): ~11 MiB more idle after a relist of 50,000 events to 7 sinks. So
                # does what a write after a large removal frees (the events expired), however small.
                await _off_loop(release_free_memory)
                self.trims += 1
                if self.on_trim is not None:
                    self.on_trim()
            if not ok:
                self._changed.set()
                await asyncio.sleep(max(self.flush_interval, 1.0))  # do not hammer a failing API server

    async def flush(self, *, timeout: float | None = None) -> bool:
        """Write the current state if it changed since the last write. True when persisted.
        ``timeout``: seconds the whole write may take (a 409's merge included); by default each
        request may take the client's 60 s."""
        ok = await self._flush(timeout)
        if self.on_write is not None:
            self.on_write(ok)
        return ok

    async def _flush(self, timeout: float | None) -> bool:
        requests = aiohttp.ClientTimeout(total=timeout) if timeout is not None else None
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    await self._settle(None if timeout is None else timeout / 2)
                    return await self._write_merging(requests)
            except TimeoutError as exc:  # the whole write's bound (a request's own is caught inside)
                self._failed(exc)
                return False

    async def _settle(self, timeout: float | None) -> None:
        """Wait for a write whose request was out when its caller was cancelled: cancelled with it, it
        may still be applied, and the write that follows met it as a 409 (a GET, a decode, a merge
        and one more PUT, said to be "another writer"), which made the stop's last write of a large
        checkpoint miss its time budget on a CPU-starved node. ``timeout``: half of the write's own
        bound; past it, the request (hung, on a dead connection) is given up."""
        task = self._in_flight
        if task is None:
            return
        if not task.done():
            log.debug(
                "checkpoint ConfigMap %s/%s: waiting for the write in progress", self.namespace, self.name
            )
            await asyncio.wait([task], timeout=timeout)
        if not task.done():
            task.cancel()  # _unanswered keeps its body: a 409 that follows is recognised
            await asyncio.wait([task])
        self._in_flight = None

    async def _write_merging(self, timeout: aiohttp.ClientTimeout | None) -> bool:
        for attempt in range(5):
            if not self.dirty:
                self.last_failure = None
                return True
            try:
                try:
                    await self._write_once(timeout)
                    self.last_failure = None
                    return True
                except ApiError as exc:
                    if exc.status == 409 and attempt < 4:
                        await self._merge_current(timeout)
                        continue
                    if exc.status == 404 and attempt < 4:  # deleted under us: create it again
                        self._exists, self._resource_version = False, None
                        continue
                    raise
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                self._failed(exc)
                return False
        return False

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_failure = exc
        log.error(
            "checkpoint ConfigMap %s/%s not written: %s",
            self.namespace,
            self.name,
            failure_text(exc),
        )

    # ---- memory (called by the pipelines' SinkCheckpoint through the backends) ------------------

    def _touch(self) -> None:
        self._generation += 1
        self._changed.set()

    def _state(self, sink: str) -> dict[str, int]:
        """The sink's entries, as a new dict."""
        own = self._states.setdefault(sink, {})
        column = self._columns.get(sink)
        if column is None:
            return dict(own)
        _, table, index = column
        state = table.view(index)
        for uid, n in own.items():  # a merge's numbers, where higher
            if n > state.get(uid, 0):
                state[uid] = n
        return state

    def _value(self, sink: str) -> Callable[[str], int]:
        """uid → the sink's number for it (0: none)."""
        own = self._states.setdefault(sink, {})
        column = self._columns.get(sink)
        if column is None:
            return lambda uid: own.get(uid, 0)
        _, table, index = column
        return lambda uid: max(table.get(index, uid), own.get(uid, 0))

    def _bind(self, backend: _SinkBackend, table: CheckpointTable, index: int) -> None:
        """From now on read ``backend``'s sink from this column of its SinkCheckpoint's table, which
        it has just loaded from ``_state``; the store's own entries of it go."""
        sink = backend.sink
        column = self._columns.get(sink)
        loaded = self._states.setdefault(sink, {}) if column is None else self._state(sink)
        if table.view(index) != loaded:  # a column that held entries before: kept apart, as it was
            return
        self._columns[sink] = (backend, table, index)
        self._states[sink] = {}
        if self._share_keys not in table.on_share_keys:
            table.on_share_keys.append(self._share_keys)

    def _share_keys(self, keys: Mapping[str, str]) -> None:
        """Key the order (and the entries of the sinks the store keeps itself: not configured, merged)
        on the strings the table now keys its entries on (the tracker's): decoded from the ConfigMap at
        the start, the order's own copies were ~5 MiB at 50,000 events."""
        if not keys:
            return
        self._order = {keys.get(uid, uid): None for uid in self._order}
        for sink, state in self._states.items():
            if state:
                self._states[sink] = {keys.get(uid, uid): n for uid, n in state.items()}

    def _merged(self, sink: str, via: _SinkBackend | None) -> dict[str, int] | None:
        """The merged numbers of a sink read from the table ``via`` is bound to; None when its dict in
        _states is the whole state (not bound; or bound to another backend, whose entries are then
        copied back first: two SinkCheckpoints of one sink write into one state, as before)."""
        column = self._columns.get(sink)
        if column is None:
            return None
        if column[0] is via:
            return self._states.setdefault(sink, {})
        self._states[sink] = self._state(sink)
        del self._columns[sink]
        return None

    def _record(self, sink: str, acks: Mapping[str, int], via: _SinkBackend | None = None) -> None:
        merged = self._merged(sink, via)
        order = self._order
        if merged is not None:
            # The table holds each ``n`` already (SinkCheckpoint passes only numbers above its own):
            # the sink's entry unless a merge had raised it that far.
            for uid, n in acks.items():
                if n > merged.get(uid, 0):
                    merged.pop(uid, None)
                    order.pop(uid, None)
                    order[uid] = None  # most recently acknowledged last
            self._touch()
            return
        state = self._states.setdefault(sink, {})
        for uid, n in acks.items():
            if n > state.get(uid, 0):
                state[uid] = n
                order.pop(uid, None)
                order[uid] = None  # most recently acknowledged last
        self._touch()

    def _remove(self, sink: str, uids: Iterable[str], via: _SinkBackend | None = None) -> None:
        merged = self._merged(sink, via)
        if merged is not None:
            # Gone from the table already (a forget, a prune), and each one was the sink's.
            uids = list(uids)
            for uid in uids:
                merged.pop(uid, None)
            self._note_removed(sink, uids)
            self._touch()
            return
        state = self._states.setdefault(sink, {})
        self._note_removed(sink, [uid for uid in uids if state.pop(uid, None) is not None])
        self._touch()

    def _bit(self, sink: str) -> int:
        """The sink's bit in ``_removed`` (never reused: a sink keeps its bit for the store's life)."""
        bit = self._bits.get(sink)
        if bit is None:
            bit = self._bits[sink] = 1 << len(self._bits)
        return bit

    def _note_removed(self, sink: str, uids: Iterable[str]) -> None:
        removed, bit = self._removed, self._bit(sink)
        get = removed.get
        for uid in uids:
            removed[uid] = get(uid, 0) | bit

    def _was_removed(self, sink: str) -> Callable[[str], bool]:
        """uid → removed from ``sink`` since the last successful write."""
        bit, get = self._bits.get(sink, 0), self._removed.get
        return lambda uid: bool(get(uid, 0) & bit)

    def _forget_removed(self, sink: str) -> None:
        """Take ``sink`` out of ``_removed`` (its entries are dropped whole)."""
        bit = self._bits.get(sink, 0)
        if not bit:
            return
        removed = self._removed
        for uid in [uid for uid, bits in removed.items() if bits & bit]:
            if bits := removed[uid] & ~bit:
                removed[uid] = bits
            else:
                del removed[uid]

    def _replace(self, sink: str, state: Mapping[str, int], via: _SinkBackend | None = None) -> None:
        merged = self._merged(sink, via)
        if merged is not None:
            # ``state`` is the table's column (SinkCheckpoint.state): only merged numbers to sort out.
            # A merged uid the column does not hold goes, as a copy of the column would drop it: kept, an
            # entry another writer had of an event this one never held (deleted since) stayed for the
            # whole tenure, as no prune or forget of the table ever names it.
            gone = [uid for uid in merged if uid not in state]
            self._states[sink] = {uid: n for uid, n in merged.items() if uid in state and n > state[uid]}
            for uid in state:
                if uid not in self._order:
                    self._order[uid] = None
            self._note_removed(sink, gone)
            self._touch()
            return
        old = self._states.get(sink, {})
        gone = [uid for uid in old if uid not in state]
        new: dict[str, int] = {}
        for uid, n in state.items():
            # A merged higher number (another writer's) is kept: it was accepted too.
            new[uid] = max(n, old.get(uid, 0))
            if uid not in self._order:
                self._order[uid] = None
        self._states[sink] = new
        self._note_removed(sink, gone)
        self._touch()

    # ---- persistence ---------------------------------------------------------------------------

    def _snapshot(
        self,
    ) -> tuple[dict[str, dict[str, int] | _Lagging], list[str], dict[str, float], dict[str, float]]:
        """What to write: (states, a lagging sink's still to build, see _built; uids oldest first;
        first-unseen times; when each sink written though not configured was first written so)."""
        now = time.time()
        self._expire_unconfigured(now)
        # One pruned empty is left out: nothing of it to keep.
        unconfigured = {
            s: self._unconfigured_since.setdefault(s, now) for s in self.unconfigured if self._states[s]
        }
        # One copy per distinct state: sinks that accepted the same events (all of them, once level)
        # share it. _build only drops uids from every state alike, so a shared copy stays right; seven
        # copies of 50,000 entries were ~13 MiB of glibc heap per write, kept until the next trim.
        states: dict[str, dict[str, int] | _Lagging] = {}
        copies: list[tuple[Mapping[str, int], dict[str, int]]] = []  # (what was copied, the copy)
        merged: list[dict[str, int]] = []
        for s in sorted(self._sinks | unconfigured.keys()):
            lagging = self._lagging(s, copies)
            if lagging is not None:
                states[s] = lagging
                merged.append(lagging.merged)
                continue
            state, new = self._current(s)
            # The same mapping (sinks level in one table) or equal (a length differs: at once).
            copy = next((c for was, c in copies if was is state or c == state), None)
            if copy is None:
                copy = new if new is not None else dict(state)
                copies.append((state, copy))
            states[s] = copy
        # On the loop, so set operations rather than a test per uid and sink. Every uid of a state is
        # in _order: the same number means that every one is held. A lagging sink's uids are among its
        # table's entries (all held: _lagging) and its merged ones.
        held_now = set().union(*(c for _, c in copies), *merged)
        if len(held_now) == len(self._order):
            live = list(self._order)
        else:
            live = list(filter(held_now.__contains__, self._order))
            self._order = dict.fromkeys(live)  # forget uids no sink holds any more
        held = self._order
        # Copied here, in the loop's thread: the fanout changes its map while _build runs.
        unseen = {uid: since for uid, since in self._unseen.items() if uid in held}
        return states, live, unseen, unconfigured

    def _lagging(self, sink: str, copies: list[tuple[Mapping[str, int], dict[str, int]]]) -> _Lagging | None:
        """The copies to build a sink's state from in the store's thread, when it is read from a table
        and is behind another sink of it or holds merged numbers; its table's entries copied once into
        ``copies`` (shared by the sinks level in it). None: copied as a whole (_current)."""
        column = self._columns.get(sink)
        if column is None:
            return None
        _, table, index = column
        merged, behind = self._states.get(sink), table.behind[index]
        if not merged and not behind:
            return None  # level with the highest: the table's entries themselves
        bound = [i for _, t, i in self._columns.values() if t is table]
        if len(bound) < table.width and all(table.behind[i] for i in bound):
            # A column not read here may alone hold an entry: the held uids are known only from the
            # states themselves (a test's tables, never the router's).
            return None
        entries = next((c for was, c in copies if was is table.entries), None)
        if entries is None:
            entries = dict(table.entries)
            copies.append((table.entries, entries))
        return _Lagging(entries, dict(behind), dict(merged or {}))

    def _current(self, sink: str) -> tuple[Mapping[str, int], dict[str, int] | None]:
        """The sink's entries to copy (the table's, the store's own), or (a new dict, the same)."""
        column = self._columns.get(sink)
        if column is None:
            return self._states.get(sink, {}), None
        _, table, index = column
        if not self._states.get(sink) and not table.behind[index]:
            return table.entries, None  # level with the highest: the table's entries themselves
        state = self._state(sink)
        return state, state

    def _build(
        self,
        snapshot: Mapping[str, dict[str, int] | _Lagging],
        order: list[str],
        unseen: dict[str, float],
        unconfigured: dict[str, float] | None = None,
        stop: threading.Event | None = None,
    ) -> tuple[dict[str, Any], int, int, dict[str, int]]:
        """The ConfigMap body within the limit, dropping entries when needed: first the sinks of
        ``unconfigured`` (whole sinks, the longest not configured first: taking one sink's entry of an
        event others hold at the same number costs a diff), then the uids of ``unseen``, then the
        oldest; (body, dropped, unseen dropped, entries left out by sink not configured). ``snapshot``:
        _snapshot's states, the lagging sinks' built here. ``stop``: set when the write was cancelled
        (CheckpointAbandoned)."""
        states = _built(snapshot, stop)
        dropped = dropped_unseen = 0
        left_out: dict[str, int] = {}
        kept = dict(unconfigured or {})
        unseen_order = [uid for uid in order if uid in unseen]  # oldest first
        # A large state packed fast; also at level 6 (the smaller kept) once that does not fit, before
        # anything is left out.
        hard, raw = False, b""
        while True:
            if not raw:
                raw = _encode(states, order, stop)
            if len(raw) < _PACK_FAST_FROM:
                blob, hard = _pack(raw), True
            else:
                blob = _pack(raw, fast=True)
                if hard and len(raw) <= MAX_UNPACKED:  # past it no reader unpacks it: left out instead
                    _check(stop)
                    blob = min(blob, _pack(raw), key=len)
            times = encode_unseen(order, unseen) if unseen_order else b""
            summary = orjson.dumps(
                {
                    "format": "eventrouter-checkpoint/1",
                    "updated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "sinks": {s: len(m) for s, m in sorted(states.items())},
                    **({"truncated": dropped} if dropped else {}),
                    **({"unseen": len(unseen_order)} if unseen_order else {}),
                    **({"unseen_left_out": dropped_unseen} if dropped_unseen else {}),
                    **({"unconfigured_left_out": sum(left_out.values())} if left_out else {}),
                }
            ).decode()
            since = orjson.dumps({s: int(t) for s, t in sorted(kept.items())}).decode() if kept else ""
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/managed-by": "eventrouter"},
                },
                "data": {SUMMARY_KEY: summary},
                "binaryData": {DATA_KEY: base64.b64encode(blob).decode("ascii")},
            }
            # What the API server counts: the values (binaryData decoded), not the keys.
            size = len(blob) + len(summary.encode())
            if times:
                body["binaryData"][UNSEEN_KEY] = base64.b64encode(times).decode("ascii")
                size += len(times)
            if since:
                body["data"][UNCONFIGURED_KEY] = since
                size += len(since.encode())
            if size <= self.limit or not order:
                return body, dropped, dropped_unseen, left_out
            if not hard and len(raw) <= MAX_UNPACKED:
                hard = True  # the same bytes packed harder, then (from here on) every attempt so
                continue
            unpacked, raw = len(raw), b""
            if kept:
                # A sink not configured goes first: nothing runs that needs its entries now.
                sink = min(kept, key=lambda s: (kept[s], s))
                del kept[sink]
                entries = states.pop(sink)
                left_out[sink] = len(entries)
                order = [uid for uid in order if any(uid in m for m in states.values())]
                for uid in entries:
                    if not any(uid in m for m in states.values()):
                        unseen.pop(uid, None)
                unseen_order = [uid for uid in unseen_order if uid in unseen]
                continue
            # Random uids do not compress: size is about proportional to the number of uids. A state
            # past MAX_UNPACKED was only packed Huffman-only: cut to that first, where level 6 may fit.
            have, room = (unpacked, MAX_UNPACKED) if unpacked > MAX_UNPACKED else (size, self.limit)
            excess = math.ceil(len(order) * (have - room) / have * 1.02) + 1
            if unseen_order:
                # Entries of events not seen go first: mostly of deleted events, they must not cost
                # the entries of live ones (whose events the next leader would deliver again).
                cut = unseen_order[:excess]
                unseen_order = unseen_order[excess:]
                gone = set(cut)
                order = [uid for uid in order if uid not in gone]
                for uid in cut:
                    del unseen[uid]
                dropped_unseen += len(cut)
            else:
                cut = order[:excess]
                order = order[excess:]
                dropped += len(cut)
            for m in states.values():
                for uid in cut:
                    m.pop(uid, None)

    async def _write_once(self, timeout: aiohttp.ClientTimeout | None = None) -> None:
        generation = self._generation
        states, order, unseen, unconfigured = self._snapshot()
        written_unseen = dict(unseen)  # _build takes out what it leaves out
        started = time.monotonic()
        stop = threading.Event()
        try:
            body, dropped, dropped_unseen, left_out = await _off_loop(
                self._build, states, order, unseen, unconfigured, stop
            )
        except asyncio.CancelledError:
            stop.set()  # the thread gives up at its next pass, not encoding beside the write that follows
            raise
        if left_out and not self.unconfigured_left_out:  # once per episode, as below
            log.warning(
                "checkpoint ConfigMap %s/%s: left out the entries of sinks that are not configured (%s) to fit "
                "in %d bytes: a sink of that name configured again gets again what the API server holds",
                self.namespace,
                self.name,
                ", ".join(f"{s}: {n}" for s, n in sorted(left_out.items())),
                self.limit,
            )
        if dropped:
            self.truncations += 1
        if dropped and not self.truncated:  # once per episode, not every flush_interval
            log.error(
                "checkpoint ConfigMap %s/%s: %d live events do not fit in %d bytes; left out the %d least "
                "recently acknowledged (they are re-delivered after a restart, not lost). Use --data-dir "
                "for clusters this large.",
                self.namespace,
                self.name,
                len(order) - len(written_unseen),
                self.limit,
                dropped,
            )
        if dropped_unseen and not self.unseen_left_out:
            log.warning(
                "checkpoint ConfigMap %s/%s: left out the entries of %d events the scoped watch does not "
                "see (mostly deleted) to fit in %d bytes; one of them that comes back into scope is "
                "delivered again after a restart",
                self.namespace,
                self.name,
                dropped_unseen,
                self.limit,
            )
        if self._exists:
            body["metadata"]["resourceVersion"] = self._resource_version
            method, path = "PUT", self.path
        else:
            method, path = "POST", f"/api/v1/namespaces/{self.namespace}/configmaps"

        async def send() -> None:
            try:
                resp = await self.kube.request(
                    method, path, body=body, timeout=timeout, content_type="application/json"
                )
            except BaseException:
                self._unanswered = body  # maybe applied: a 409 that follows may be this very write
                raise
            try:
                await raise_for_status(resp)  # refused: not applied
                try:
                    written = orjson.loads(await resp.read())
                except BaseException:
                    self._unanswered = body  # applied, its answer lost
                    raise
            finally:
                resp.release()
            self._written(
                written, body, generation, written_unseen, dropped, dropped_unseen, left_out, started
            )

        sending = asyncio.ensure_future(send())
        try:
            await asyncio.shield(sending)
        except asyncio.CancelledError:
            if not sending.done():
                # Its request is out: it finishes on its own, and the next write waits for it (_settle).
                self._in_flight = sending
                sending.add_done_callback(self._orphan_done)
            raise

    def _orphan_done(self, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.errors += 1
            log.warning(
                "checkpoint ConfigMap %s/%s: the write in progress when its caller was cancelled failed (%s); "
                "the next write carries its state",
                self.namespace,
                self.name,
                failure_text(exc),
            )

    def _written(
        self,
        written: Mapping[str, Any],
        body: Mapping[str, Any],
        generation: int,
        written_unseen: dict[str, float],
        dropped: int,
        dropped_unseen: int,
        left_out: dict[str, int],
        started: float,
    ) -> None:
        """A write's answer: what was persisted."""
        self._unanswered = None
        self._exists = True
        self._resource_version = (written.get("metadata") or {}).get("resourceVersion")
        self._flushed_generation = generation
        self._freed = len(self._removed)
        self._removed = {}
        self._unseen_written = written_unseen
        if self.truncated and not dropped:
            log.warning("checkpoint ConfigMap %s/%s fits again", self.namespace, self.name)
        self.truncated = dropped
        self.unseen_left_out = dropped_unseen
        self.unconfigured_left_out = sum(left_out.values())
        self.last_size = configmap_size(body)
        self.flushes += 1
        log.debug(
            "checkpoint ConfigMap %s/%s written: %d bytes in %.3fs",
            self.namespace,
            self.name,
            self.last_size,
            time.monotonic() - started,
        )

    async def _merge_current(self, timeout: aiohttp.ClientTimeout | None = None) -> None:
        """After a 409: take the current resourceVersion and keep the higher number per uid (the
        other writer can only be an old leader whose sinks accepted what it recorded). The sinks it
        wrote that are not configured here are kept as those read at load are."""
        obj = await self._get(timeout)
        if obj is None:
            self._exists, self._resource_version = False, None
            return
        # Its resourceVersion is taken only with its content merged (no await in between): a merge given
        # up in its decode (the stop's timeout, a cancel) that had taken it made the next write succeed
        # without a 409, over the other writer's numbers.
        version = (obj.get("metadata") or {}).get("resourceVersion")
        sent = self._unanswered
        if (
            sent is not None
            and obj.get("data") == sent["data"]
            and obj.get("binaryData") == sent["binaryData"]
        ):
            # Our own write, applied though its answer never came: nothing of another writer to merge.
            self._unanswered = None
            self._exists, self._resource_version = True, version
            log.info(
                "checkpoint ConfigMap %s/%s: a write of ours whose answer did not come was applied; "
                "writing again over it",
                self.namespace,
                self.name,
            )
            return
        self.conflicts += 1
        log.warning(
            "checkpoint ConfigMap %s/%s was changed by another writer; merging", self.namespace, self.name
        )
        theirs, _ = await _off_loop(self._parse, obj)  # off the loop: seconds of CPU when large
        for sink, since in self._parse_since(obj).items():
            if sink not in self._sinks and sink in theirs:
                self._unconfigured_since[sink] = min(since, self._unconfigured_since.get(sink, since))
        for sink in sorted(self._sinks | (theirs.keys() - self._expired)):
            mine = self._states.setdefault(sink, {})  # of a sink read from its table: the merged numbers
            value = self._value(sink)
            removed = self._was_removed(sink)
            for uid, n in theirs.get(sink, {}).items():
                if not removed(uid) and n > value(uid):
                    mine[uid] = n
                    if uid not in self._order:
                        self._order[uid] = None
        self._exists, self._resource_version = True, version
        self._touch()

    def _parse(self, obj: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], list[str]]:
        binary = obj.get("binaryData")
        if not (isinstance(binary, dict) and binary.get(DATA_KEY)):
            return {}, []
        try:
            return _decode(obj)
        except CheckpointFormatError as exc:
            # Starting empty only re-delivers what the API server still holds; the next write replaces
            # it (a leader that stopped for it failed at every lease-take). Not a MemoryError: that is
            # this process short of memory, not the ConfigMap damaged, and writing over it destroyed
            # an honest checkpoint (item 313); it fails the lease-take, the ConfigMap kept.
            log.error(
                "checkpoint ConfigMap %s/%s is unreadable (%s); starting empty",
                self.namespace,
                self.name,
                unreadable(exc),
            )
            return {}, []

    def _parse_unseen(self, obj: Mapping[str, Any], order: Sequence[str]) -> dict[str, float]:
        """``binaryData["unseen"]`` against the ``order`` read from the same ConfigMap ({} when none)."""
        binary = obj.get("binaryData")
        encoded = binary.get(UNSEEN_KEY) if isinstance(binary, dict) and order else None
        if not encoded:
            return {}
        try:
            return decode_unseen(base64.b64decode(encoded), order)
        except (CheckpointFormatError, ValueError, TypeError, MemoryError) as exc:
            log.warning(
                "checkpoint ConfigMap %s/%s: the first-unseen times are unreadable (%s); the "
                "entries of events a scoped watch does not see are kept for the keep period from now",
                self.namespace,
                self.name,
                unreadable(exc),
            )
            return {}

    def _parse_since(self, obj: Mapping[str, Any]) -> dict[str, float]:
        """``data["unconfigured"]``: when each sink written though not configured was first so."""
        text = (obj.get("data") or {}).get(UNCONFIGURED_KEY)
        if not text:
            return {}
        try:
            since = orjson.loads(text)
        except orjson.JSONDecodeError:
            since = None
        if not isinstance(since, dict):
            # Their keep period starts again now: kept a little longer, never lost.
            log.warning(
                "checkpoint ConfigMap %s/%s: %r is unreadable; the entries of sinks not configured are "
                "kept for %s from now",
                self.namespace,
                self.name,
                UNCONFIGURED_KEY,
                _duration(UNCONFIGURED_KEEP),
            )
            return {}
        # Seconds since 1970, at most the keep period ahead (another replica's clock): milliseconds
        # (a hand edit, another tool) are out of datetime's range, and every leader failed at start.
        latest = time.time() + UNCONFIGURED_KEEP
        readable: dict[str, float] = {}
        unreadable: list[str] = []
        for sink, t in since.items():
            if (
                isinstance(t, int | float)
                and not isinstance(t, bool)
                and math.isfinite(t)
                and 0 <= t <= latest
            ):
                readable[str(sink)] = float(t)
            else:
                unreadable.append(f"{sink}: {orjson.dumps(t).decode()[:40]}")
        if unreadable:
            log.warning(
                "checkpoint ConfigMap %s/%s: %r has no usable time for %s (seconds since 1970, at most %s "
                "ahead); the entries of those sinks are kept for %s from now",
                self.namespace,
                self.name,
                UNCONFIGURED_KEY,
                ", ".join(unreadable),
                _duration(UNCONFIGURED_KEEP),
                _duration(UNCONFIGURED_KEEP),
            )
        return readable

    async def _get(self, timeout: aiohttp.ClientTimeout | None = None) -> dict[str, Any] | None:
        resp = await self.kube.request("GET", self.path, timeout=timeout)
        try:
            if resp.status == 404:
                return None
            await raise_for_status(resp)
            obj = orjson.loads(await resp.read())
        finally:
            resp.release()
        return obj if isinstance(obj, dict) else None


def _decode(obj: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """The checkpoint a ConfigMap holds (``binaryData["checkpoint"]``): (states by sink, uids oldest
    first), all of what a writer can write (only MAX_UNPACKED). CheckpointFormatError when it holds
    none, or none that can be read."""
    names, columns, order = _decode_columns(obj, bounded=False)
    return {name: _entries(order, column) for name, column in zip(names, columns, strict=True)}, order


def _decode_columns(
    obj: Mapping[str, Any], bounded: bool = True
) -> tuple[list[str], list[list[int]], list[str]]:
    """As ``_decode``, as decode_columns gives it."""
    binary = obj.get("binaryData")
    encoded = binary.get(DATA_KEY) if isinstance(binary, dict) else None
    if not encoded or not isinstance(encoded, str):
        raise CheckpointFormatError(f"no binaryData.{DATA_KEY}: not an eventrouter checkpoint")
    try:
        return decode_columns(base64.b64decode(encoded), bounded)
    except (CheckpointFormatError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(str(exc)) from None


def _utc(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # only for a log line: never fail the caller
        return f"{seconds:g} s after 1970"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"
