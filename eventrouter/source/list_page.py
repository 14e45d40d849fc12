"""A list page that does not parse whole, read item by item: one item the parser refuses costs that
item, not the page.

orjson refuses JSON nested deeper than 1,024 levels (json.loads ~1,000): one such item (a broken
proxy or aggregated API; kube-apiserver cannot store one) made every list page it was on fail, and the
relist failed on it for ever. The page's own structure (an object whose ``items`` is an array) is
walked here, only its brackets and strings, never recursing; each member and each item is then
parsed on its own. A page whose structure is not JSON is still refused whole, with orjson's error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from eventrouter.source import unicode_repair

__all__ = ["Page", "loads_page"]

_WS = re.compile(rb"[ \t\n\r]*")
_STR = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_STRING = re.compile(_STR, re.DOTALL)
# A whole string, else a lone quote (a string that never ends), else a bracket.
_TOKEN = re.compile(_STR + rb'|"|[\[\]{}]', re.DOTALL)
_SCALAR = re.compile(rb"[^,\]}\s]+")  # a number, true, false, null (orjson judges which)
_QUOTE, _OPEN_OBJECT, _OPEN_ARRAY = ord('"'), ord("{"), ord("[")
_CLOSER = {_OPEN_OBJECT: ord("}"), _OPEN_ARRAY: ord("]")}
QUOTED = 200
"""Bytes of a refused item kept for the log line, as of a malformed watch line."""


@dataclass(slots=True)
class Page:
    doc: Any
    """The List, its ``items`` those that parsed."""
    broken: bool
    """Broken Unicode is left in it, for the caller to repair item by item (``loads_unrepaired``)."""
    refused: list[tuple[bytes, str]] = field(default_factory=list)
    """Each item that did not parse: its first ``QUOTED`` bytes and why."""


def loads_page(data: bytes) -> Page:
    """A list page's body, as ``unicode_repair.loads_unrepaired`` parses it. Raises
    ``orjson.JSONDecodeError`` when it is not JSON, unless only some of its ``items`` are not."""
    try:
        return Page(*unicode_repair.loads_unrepaired(data))
    except orjson.JSONDecodeError as exc:
        refused = exc
    try:
        return _by_item(data)
    except ValueError:  # its structure is not JSON either (orjson.JSONDecodeError is a ValueError)
        raise refused from None


def _by_item(data: bytes) -> Page:
    page = Page({}, False)
    items: list[Any] = []
    for key, start, end in _members(data):
        if key == "items" and data[start] == _OPEN_ARRAY:
            items = []
            for s, e in _elements(data, start):
                try:
                    item, broken = unicode_repair.loads_unrepaired(data[s:e])
                except orjson.JSONDecodeError as exc:
                    page.refused.append((bytes(data[s : min(e, s + QUOTED)]), str(exc)))
                    continue
                page.broken |= broken
                items.append(item)
            page.doc[key] = items
        else:
            page.doc[key], broken = unicode_repair.loads_unrepaired(data[start:end])
            page.broken |= broken
    return page


def _members(data: bytes) -> list[tuple[str, int, int]]:
    """The top-level object's keys and where their values are."""
    pos = _expect(data, 0, b"{")
    members: list[tuple[str, int, int]] = []
    if _at(data, pos) == b"}":
        return _end(data, _skip(data, pos) + 1, members)
    while True:
        pos = _skip(data, pos)
        m = _STRING.match(data, pos)
        if m is None:
            raise ValueError(f"no key at {pos}")
        key = orjson.loads(m.group())
        pos = _expect(data, m.end(), b":")
        start = _skip(data, pos)
        pos = _value_end(data, start)
        members.append((key, start, pos))
        if _at(data, pos) == b"}":
            return _end(data, _skip(data, pos) + 1, members)
        pos = _expect(data, pos, b",")


def _elements(data: bytes, start: int) -> list[tuple[int, int]]:
    """Where the values of the array at ``start`` are."""
    pos = start + 1
    spans: list[tuple[int, int]] = []
    if _at(data, pos) == b"]":
        return spans
    while True:
        begin = _skip(data, pos)
        pos = _value_end(data, begin)
        spans.append((begin, pos))
        if _at(data, pos) == b"]":
            return spans
        pos = _expect(data, pos, b",")


def _value_end(data: bytes, start: int) -> int:
    first = data[start] if start < len(data) else -1
    if first in _CLOSER:
        return _container_end(data, start)
    m = (_STRING if first == _QUOTE else _SCALAR).match(data, start)
    if m is None:
        raise ValueError(f"no value at {start}")
    return m.end()


def _container_end(data: bytes, start: int) -> int:
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


def _skip(data: bytes, pos: int) -> int:
    m = _WS.match(data, pos)
    return m.end() if m is not None else pos


def _at(data: bytes, pos: int) -> bytes:
    pos = _skip(data, pos)
    return bytes(data[pos : pos + 1])


def _expect(data: bytes, pos: int, what: bytes) -> int:
    pos = _skip(data, pos)
    if data[pos : pos + 1] != what:
        raise ValueError(f"expected {what!r} at {pos}")
    return pos + 1


def _end(data: bytes, pos: int, members: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    if _skip(data, pos) != len(data):
        raise ValueError(f"more after the object at {pos}")
    return members
