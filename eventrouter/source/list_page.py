"""A list page that orjson refuses, parsed again without the items it refuses: one such item costs that
item, not the page.

orjson refuses JSON nested deeper than 1,024 levels (json.loads ~1,000): one such item (a broken
proxy or aggregated API; kube-apiserver cannot store one) made every list page it was on fail, and the
relist failed on it for ever. The page's ``items`` array is walked (brackets and strings only, in a
loop at any depth) to find where its items are, and those orjson refuses alone are replaced by
``null``; orjson then parses that page, which is taken only if its ``items`` has as many entries as
the walk found, with the ``null``s where they were put. Every item kept, and ``metadata`` with its
``continue``, are orjson's own parse: a walk that misreads a page (it is no JSON parser) can only make
the page fail whole, as any page that is not JSON does, with orjson's error. (Taking each item from the
walk, a page that was not JSON was taken with Events, or its continue token, left out silently: item
293.)
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import orjson

from eventrouter.source import unicode_repair

__all__ = ["Page", "Refused", "loads_page", "read_page"]

_WS = re.compile(rb"[ \t\n\r]*")
_STR = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_STRING = re.compile(_STR, re.DOTALL)
# A whole string, else a lone quote (a string that never ends), else a bracket.
_TOKEN = re.compile(_STR + rb'|"|[\[\]{}]', re.DOTALL)
# A number, true, false, null (orjson judges which): nothing that starts a string or a container, so
# that where a scalar ends is where the string and bracket walk would say.
_SCALAR = re.compile(rb'[^,\]}\s"\[{]+')
_NEXT = re.compile(rb"[ \t\n\r]*[,\]]")  # after an item: the next one, or the end of the array
_EMPTY = re.compile(rb"[ \t\n\r]*\]")
_QUOTE, _OPEN_OBJECT, _OPEN_ARRAY, _CLOSE_ARRAY = ord('"'), ord("{"), ord("["), ord("]")
_CLOSER = {_OPEN_OBJECT: ord("}"), _OPEN_ARRAY: ord("]")}
QUOTED = 200
"""Bytes of a refused item kept for the log line, as of a malformed watch line."""


class Refused(NamedTuple):
    """An item of a page that orjson refuses alone."""

    start: int
    end: int
    """Where it is in the page (bytes): what the walk took for one item. An item corrupted so that
    where it ends cannot be told may hold the items after it up to where the walk ends it."""
    quote: bytes
    """Its first ``QUOTED`` bytes."""
    why: str
    """orjson's error."""


@dataclass(slots=True)
class Page:
    doc: Any
    """The List, its ``items`` those that parsed."""
    broken: bool
    """Broken Unicode is left in it, for the caller to repair item by item (``loads_unrepaired``)."""
    refused: list[Refused] = field(default_factory=list)
    """Each item that did not parse."""


def loads_page(data: bytes | bytearray) -> Page:
    """A list page's body, as ``unicode_repair.loads_unrepaired`` parses it. Raises
    ``orjson.JSONDecodeError`` when it is not JSON, unless only some of its ``items`` are not."""
    try:
        return Page(orjson.loads(data), False)
    except orjson.JSONDecodeError as exc:
        return _refused_page(data, exc)


async def read_page(data: bytes | bytearray) -> Page:
    """``loads_page``, all that follows orjson's refusal in a thread: the Unicode fallback's json.loads
    and the walk take seconds on a large page (the walk took 14-29 s for 16 MiB of tiny items), and on
    the event loop every sink, /healthz and /readyz waited for them. ``data`` is not to change meanwhile."""
    try:
        return Page(orjson.loads(data), False)
    except orjson.JSONDecodeError as exc:
        refused = exc
    return await asyncio.to_thread(_refused_page, data, refused)


def _refused_page(data: bytes | bytearray, refused: orjson.JSONDecodeError) -> Page:
    try:
        return Page(unicode_repair.parse_refused(cast(bytes, data), refused), True)  # bytes-like will do
    except orjson.JSONDecodeError:
        pass  # not (only) its Unicode
    try:
        return _without_refused(data, refused)
    except ValueError:  # not JSON around its items, or misread by the walk (JSONDecodeError is one too)
        raise refused from None


@dataclass(slots=True)
class _Walk:
    count: int = 0
    """Items in the ``items`` array."""
    at: list[int] = field(default_factory=list)
    """The index of each item that orjson refuses alone."""
    refused: list[Refused] = field(default_factory=list)


def _without_refused(data: bytes | bytearray, refused: orjson.JSONDecodeError) -> Page:
    # orjson parsed the page up to where it stopped (``pos`` counts characters, so no more bytes in):
    # an item that ends before it parses alone, and is not parsed again to know.
    walk = _walk(data, refused.pos)
    if not walk.refused:
        raise ValueError("every item parses alone")
    doc, broken = unicode_repair.loads_unrepaired(_nulled(data, walk.refused))
    items = doc.get("items") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) != walk.count or any(items[i] is not None for i in walk.at):
        raise ValueError("the walk found other items than orjson")
    doc["items"] = _without(items, walk.at)
    return Page(doc, broken, walk.refused)


def _nulled(data: bytes | bytearray, refused: list[Refused]) -> bytes:
    """The page with ``null`` in place of each refused item."""
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    last = 0
    for item in refused:
        parts += (view[last : item.start], b"null")
        last = item.end
    parts.append(view[last:])
    return b"".join(parts)


def _without(items: list[Any], at: list[int]) -> list[Any]:
    """``items`` without those at the indices ``at`` (ascending): one copy, whatever their number."""
    kept: list[Any] = []
    last = 0
    for i in at:
        kept += items[last:i]
        last = i + 1
    kept += items[last:]
    return kept


def _walk(data: bytes | bytearray, parsed_up_to: int) -> _Walk:
    """The page's ``items``: how many, and those orjson refuses alone (of those that end at or after
    ``parsed_up_to``). ValueError for a page whose top is not an object with one ``items`` array."""
    walk: _Walk | None = None
    pos = _expect(data, 0, b"{")
    if _at(data, pos) == b"}":
        raise ValueError("no items")
    while True:
        pos = _skip(data, pos)
        m = _STRING.match(data, pos)
        if m is None:
            raise ValueError(f"no key at {pos}")
        key = orjson.loads(m.group())
        start = _skip(data, _expect(data, m.end(), b":"))
        if key == "items" and data[start : start + 1] == b"[":
            if walk is not None:  # which one orjson keeps is its business: not worth a guess
                raise ValueError("items twice")
            walk = _Walk()
            pos = _items(data, start, parsed_up_to, walk)
        else:
            pos = _value_end(data, start)
        if _at(data, pos) == b"}":
            break
        pos = _expect(data, pos, b",")
    if walk is None:
        raise ValueError("no items array")
    return walk


def _items(data: bytes | bytearray, start: int, parsed_up_to: int, walk: _Walk) -> int:
    """Walk the array at ``start`` into ``walk``; where it ends."""
    m = _EMPTY.match(data, start + 1)
    if m is not None:
        return m.end()
    pos = start + 1
    while True:
        begin = _skip(data, pos)
        end = _value_end(data, begin)
        if end >= parsed_up_to:
            why = _refusal(data[begin:end])
            if why is not None and not why.startswith(_TOO_DEEP):
                # Not JSON (a corrupted byte, a proxy's page): the page fails whole and is listed
                # again, as before item 279. Taken apart, a lost quote merged the items after it into
                # one refused "item": Events lost, counted as one.
                raise ValueError(f"an item is not JSON: {why}")
            if why is not None:
                walk.at.append(walk.count)
                walk.refused.append(Refused(begin, end, bytes(data[begin : min(end, begin + QUOTED)]), why))
        walk.count += 1
        m = _NEXT.match(data, end)
        if m is None:
            raise ValueError(f"expected ',' or ']' at {end}")
        pos = m.end()
        if data[pos - 1] == _CLOSE_ARRAY:
            return pos


_TOO_DEEP = "depth limit exceeded"
"""orjson's refusal of JSON nested deeper than it parses: the one refusal of an item in a page that is
JSON, which costs that item only."""


def _refusal(item: bytes | bytearray) -> str | None:
    """Why orjson refuses ``item`` alone, None when it (or the Unicode fallback) takes it."""
    try:
        unicode_repair.loads_unrepaired(cast(bytes, item))  # bytes-like will do
    except orjson.JSONDecodeError as exc:
        return str(exc)
    return None


def _value_end(data: bytes | bytearray, start: int) -> int:
    first = data[start] if start < len(data) else -1
    if first in _CLOSER:
        return _container_end(data, start)
    m = (_STRING if first == _QUOTE else _SCALAR).match(data, start)
    if m is None:
        raise ValueError(f"no value at {start}")
    return m.end()


def _container_end(data: bytes | bytearray, start: int) -> int:
    """Where the object or array at ``start`` ends: a loop, not a recursion, at any depth."""
    closers: list[int] = []
    for m in _TOKEN.finditer(data, start):
        c = data[m.start()]
        if c == _QUOTE:
            if m.end() - m.start() == 1:
                raise ValueError(f"a string that does not end at {m.start()}")
        elif c in _CLOSER:
            closers.append(_CLOSER[c])
        elif not closers or closers.pop() != c:
            raise ValueError(f"unbalanced bracket at {m.start()}")
        if not closers:
            return m.end()
    raise ValueError(f"the value at {start} does not end")


def _skip(data: bytes | bytearray, pos: int) -> int:
    m = _WS.match(data, pos)
    return m.end() if m is not None else pos


def _at(data: bytes | bytearray, pos: int) -> bytes:
    pos = _skip(data, pos)
    return bytes(data[pos : pos + 1])


def _expect(data: bytes | bytearray, pos: int, what: bytes) -> int:
    pos = _skip(data, pos)
    if data[pos : pos + 1] != what:
        raise ValueError(f"expected {what!r} at {pos}")
    return pos + 1
