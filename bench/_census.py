"""What holds CPython's 1 MiB arenas in a running router: a pymalloc pool census, run inside it.

``python -m bench.memory --census`` starts the router with ``bench/_hook`` on ``PYTHONPATH``; its
``sitecustomize`` installs a SIGUSR2 handler that calls :func:`write_report` in the router process.

Phase 1 reads memory only, into arrays allocated before it starts, so that its own objects do not
change the pools it reads: every 16 KiB-aligned address of every anonymous read-write mapping is read
as a pymalloc pool header (arena index, size class, blocks in use, free list); a header is accepted
only when all its fields are consistent. Each allocated block of the sparse arenas is noted with the
type pointer of an object starting there (plain or behind a collector header). Phase 2 names those
types and finds, for the objects reachable from ``gc.get_objects()`` (through untracked dicts,
tuples and lists too), which container holds each one and which attribute of which object holds that.

CPython 3.11–3.12 on 64-bit Linux only (pool layout of ``Objects/obmalloc.c``); elsewhere the report
says so and holds nothing else.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import os
import re
import struct
import sys
import tempfile
from array import array
from typing import Any

__all__ = ["arena_counts", "write_report"]

POOL = 16 * 1024  # POOL_BITS 14 with the radix tree (3.10+ on 64-bit)
OVERHEAD = 48  # sizeof(struct pool_header)
# An arena with at most this many pools in use is "sparse" (bench.memory --census-sparse).
SPARSE_POOLS = int(os.environ.get("EVENTROUTER_BENCH_CENSUS_SPARSE", "40"))
MAX_BLOCKS = 3_000_000
# Only arenas from this index on (bench.memory --census-from): those a burst added.
FROM_ARENA = int(os.environ.get("EVENTROUTER_BENCH_CENSUS_FROM", "0"))


def arena_counts() -> dict[str, int]:
    """pymalloc's own arena counters (``sys._debugmallocstats``, written to fd 2, read back)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    out: dict[str, int] = {}
    for key, label in (
        ("current", "allocated current"),
        ("highwater", "highwater mark"),
        ("total", "allocated total"),
    ):
        m = re.search(rf"# arenas {label}\s*=\s*([\d,]+)", text)
        if m:
            out[key] = int(m.group(1).replace(",", ""))
    return out


def _anonymous_rw() -> list[tuple[int, int]]:
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 5 and parts[1] == "rw-p" and (len(parts) == 5 or parts[5] == ""):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                regions.append((start, end))
    return regions


class _Pools:
    """Phase 1: pool headers and the first words of the sparse arenas' blocks, in arrays only."""

    def __init__(self) -> None:
        regions = _anonymous_rw()
        cap = sum((end - start) // POOL + 1 for start, end in regions)
        self.addr, self.arena, self.size, self.count, self.next_offset = (
            array("q", bytes(8 * cap)) for _ in range(5)
        )
        self.free = array("Q", bytes(8 * cap))
        self.block = array("Q", bytes(8 * MAX_BLOCKS))
        self.word8 = array("Q", bytes(8 * MAX_BLOCKS))
        self.word24 = array("Q", bytes(8 * MAX_BLOCKS))
        self.n = self.blocks = 0
        self.truncated = False  # more blocks in sparse arenas than MAX_BLOCKS: the rest unread
        self._scan(regions)
        top = max(self.arena[: self.n], default=-1) + 1
        self.arena_pools = array("q", bytes(8 * top))
        self.arena_blocks = array("q", bytes(8 * top))
        for k in range(self.n):
            self.arena_pools[self.arena[k]] += 1
            self.arena_blocks[self.arena[k]] += self.count[k]
        self._blocks()

    def _scan(self, regions: list[tuple[int, int]]) -> None:
        read, unpack = ctypes.string_at, struct.unpack_from
        for start, end in regions:
            p = (start + POOL - 1) & ~(POOL - 1)
            while p + POOL <= end:
                header = read(p, OVERHEAD)
                (count,) = unpack("I", header, 0)
                (free,) = unpack("Q", header, 8)
                arena, szidx, next_offset, max_offset = unpack("IIII", header, 32)
                size = (szidx + 1) * 16
                if (
                    szidx < 32
                    and max_offset == POOL - size
                    and OVERHEAD <= next_offset <= max_offset + size
                    and 0 < count <= (next_offset - OVERHEAD) // size
                    and arena < 1_000_000
                    and (free == 0 or p + OVERHEAD <= free < p + POOL)
                ):
                    k = self.n
                    self.addr[k], self.arena[k], self.size[k] = p, arena, size
                    self.count[k], self.next_offset[k], self.free[k] = count, next_offset, free
                    self.n += 1
                p += POOL

    def _blocks(self) -> None:
        read, unpack = ctypes.string_at, struct.unpack_from
        for k in range(self.n):
            pools = self.arena_pools[self.arena[k]]
            if pools > SPARSE_POOLS or self.arena[k] < FROM_ARENA:
                continue
            p, size, free = self.addr[k], self.size[k], self.free[k]
            first = self.blocks
            if first + (self.next_offset[k] - OVERHEAD) // size >= MAX_BLOCKS:
                self.truncated = True
                return
            for b in range(p + OVERHEAD, p + self.next_offset[k], size):
                self.block[self.blocks] = b
                self.blocks += 1
            steps = 0  # free list: marked with word8 = 1
            while free and steps < POOL // 16 and p + OVERHEAD <= free < p + self.next_offset[k]:
                self.word8[first + (free - p - OVERHEAD) // size] = 1
                (free,) = unpack("Q", read(free, 8))
                steps += 1
            for j in range(first, self.blocks):
                if self.word8[j] != 1:
                    (self.word8[j],) = unpack("Q", read(self.block[j] + 8, 8))
                    if size >= 32:
                        (self.word24[j],) = unpack("Q", read(self.block[j] + 24, 8))


def _type_names() -> dict[int, str]:
    names: dict[int, str] = {}
    stack: list[type] = [object]
    while stack:
        t = stack.pop()
        if id(t) in names:
            continue
        module = getattr(t, "__module__", "")  # a descriptor, not a name, on some metaclasses
        names[id(t)] = f"{module}.{t.__qualname__}" if isinstance(module, str) and module else t.__qualname__
        with contextlib.suppress(TypeError):
            stack.extend(type.__subclasses__(t))
    return names


# Containers the collector untracks once they hold only atoms (str, int, ...): the walk follows them.
_CONTAINERS = (dict, tuple, list, frozenset)


def _short(o: object) -> str:
    if isinstance(o, str | bytes):
        return repr(o[:60])
    if isinstance(o, int | float):
        return repr(o)
    if isinstance(o, dict | list | tuple | set):
        return f"{type(o).__name__}[{len(o)}]"
    return f"<{type(o).__module__}.{type(o).__qualname__}>"


def _holders(blocks: dict[int, str]) -> tuple[collections.Counter[tuple[str, str]], set[int]]:
    """(type, holder) for every reachable object that starts in one of ``blocks``, and their ids."""
    objs = gc.get_objects()
    found: dict[int, list[Any]] = {id(o): [o, None] for o in objs if id(o) in blocks}
    seen: set[int] = set()
    work = list(objs)
    while work:
        o = work.pop()
        # A dict with only str keys does not show them to the collector: they are read here.
        refs = [*gc.get_referents(o), *dict.keys(o)] if isinstance(o, dict) else gc.get_referents(o)
        for r in refs:
            i = id(r)
            if not gc.is_tracked(r) and type(r) in _CONTAINERS and i not in seen:
                seen.add(i)
                work.append(r)
            entry = found.get(i)
            if entry is None:
                if i not in blocks or gc.is_tracked(r):
                    continue
                found[i] = entry = [r, None]
            if entry[1] is None:
                entry[1] = o
    holders = {id(e[1]): e[1] for e in found.values() if e[1] is not None}
    owner_of: dict[int, object] = {}
    for o in [*objs, *(e[1] for e in found.values() if e[1] is not None and not gc.is_tracked(e[1]))]:
        for r in gc.get_referents(o):
            if id(r) in holders and id(r) not in owner_of and r is not o:
                owner_of[id(r)] = o

    def holder(p: object) -> str:
        if p is None:
            return "-"
        owner = owner_of.get(id(p))
        if owner is None:
            return _short(p)
        attr = ""
        with contextlib.suppress(AttributeError, TypeError):
            attr = next((k for k, v in object.__getattribute__(owner, "__dict__").items() if v is p), "")
        return f"{_short(p)} < {_short(owner)}{'.' + attr if attr else ''}"

    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for o, p in found.values():
        out[(type(o).__name__, holder(p))] += 1
    return out, set(found)


def _unreached(blocks: dict[int, str], found: set[int]) -> list[str]:
    """Samples of the str and tuple blocks no collector-visible object holds (a C extension's own
    cache, interned strings, the interpreter's free lists), read as raw memory: the text of compact
    ASCII strings, the length of tuples."""
    read, unpack = ctypes.string_at, struct.unpack_from
    texts: collections.Counter[str] = collections.Counter()
    shapes: collections.Counter[str] = collections.Counter()
    for addr, name in blocks.items():
        if addr in found:
            continue
        if name == "builtins.str":
            (length,) = unpack("q", read(addr + 16, 8))
            (state,) = unpack("I", read(addr + 32, 4))
            if state & 0x60 == 0x60 and 0 <= length <= 64:  # compact and ascii: text right after the header
                texts[read(addr + 48, length).decode("ascii", "replace")] += 1
        elif name == "builtins.tuple":
            # Only the length: a tuple on CPython's free list (up to 2,000 per length) keeps stale
            # item pointers, possibly into arenas already returned to the OS.
            (length,) = unpack("q", read(addr + 16, 8))
            shapes[f"of length {length}"] += 1
    out = [
        f"strings and tuples held by no collector-visible object: {sum(texts.values())} + {sum(shapes.values())}"
    ]
    out.append("  e.g. " + ", ".join(repr(t) for t, _ in texts.most_common(40)))
    for shape, n in shapes.most_common(8):
        out.append(f"  {n:7d} tuple {shape}")
    return out


def write_report(path: str) -> None:
    """Census of this process to ``path`` (text); written to ``path + ".tmp"`` first."""
    if (
        sys.implementation.name != "cpython"
        or sys.version_info[:2] not in ((3, 11), (3, 12))
        or sys.maxsize < 2**32
    ):
        with open(path, "w") as out:
            out.write(f"census: not supported on {sys.implementation.name} {sys.version}\n")
        return
    counts = arena_counts()
    pools = _Pools()  # nothing below allocates before this has read everything
    lines = [
        f"arenas current {counts.get('current')} highwater {counts.get('highwater')} total {counts.get('total')}",
        f"pools in use {pools.n}",
    ]
    by_size: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for k in range(pools.n):
        by_size[pools.arena[k]][pools.size[k]] += pools.count[k]
    for a in range(len(pools.arena_pools)):
        if pools.arena_pools[a]:
            lines.append(
                f"arena {a:3d} pools {pools.arena_pools[a]:2d} blocks {pools.arena_blocks[a]:6d} "
                f"by block size {by_size[a].most_common(5)}"
            )
    names = _type_names()
    blocks: dict[int, str] = {}
    for j in range(pools.blocks):
        w8, w24 = pools.word8[j], pools.word24[j]
        if w8 == 1:
            continue
        if w8 in names:
            blocks[pools.block[j]] = names[w8]
        elif w24 in names:  # behind a 16-byte collector header
            blocks[pools.block[j] + 16] = names[w24]
        else:
            blocks[pools.block[j]] = "?"
    sparse = [
        a for a in range(FROM_ARENA, len(pools.arena_pools)) if 0 < pools.arena_pools[a] <= SPARSE_POOLS
    ]
    lines.append(f"sparse arenas (≤ {SPARSE_POOLS} of 64 pools in use): {len(sparse)} {sparse}")
    lines.append(
        f"allocated blocks in them: {len(blocks)}"
        + (f" (only the first {MAX_BLOCKS:,} block slots read)" if pools.truncated else "")
    )
    for name, n in collections.Counter(blocks.values()).most_common(25):
        lines.append(f"  {n:7d} {name}")
    held, found = _holders(blocks)
    lines.extend(_unreached(blocks, found))
    lines.append(f"of which reachable from the collector's objects: {sum(held.values())}, by (type, holder):")
    for (kind, holder), n in held.most_common(40):
        lines.append(f"  {n:7d} {kind:24s} {holder}")
    with open(path + ".tmp", "w") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
