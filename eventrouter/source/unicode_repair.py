"""JSON that orjson refuses only for its Unicode, made usable: each broken character becomes U+FFFD.

orjson refuses the whole text for one invalid UTF-8 byte or one lone surrogate escape (``"\\ud800"``).
The API server never sends either (Go's encoder writes U+FFFD for invalid UTF-8), but a proxy in
between, an aggregated API or a hand-made recording can; one such string must cost that string, not
the event, and in a list page not the page: the relist would fail on it forever. Go's decoder makes the
same replacement, so a repaired object is what the API server itself would have stored.

Otherwise the fallback is as strict as orjson: NaN, Infinity and numbers that overflow a double are
refused, and integers outside 64 bits become floats, as orjson makes them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import orjson

__all__ = ["REPLACEMENT", "describe", "loads", "parse_refused", "repair"]

REPLACEMENT = "\ufffd"

# Surrogate code points only exist in a decoded str as lone surrogate escapes (a valid escaped pair
# decodes to one astral character) or as surrogateescape's stand-ins for invalid UTF-8 bytes.
_SURROGATE = re.compile("[\ud800-\udfff]")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # orjson's integer range; outside it gives a float


def loads(data: bytes) -> tuple[Any, int]:
    """The document and how many of its strings were repaired (0: orjson took it as it is).

    Raises ``orjson.JSONDecodeError`` for text that is not JSON, or that orjson refuses for a reason
    other than its Unicode."""
    try:
        return orjson.loads(data), 0
    except orjson.JSONDecodeError as exc:
        return repair(parse_refused(data, exc))


def loads_unrepaired(data: bytes) -> tuple[Any, bool]:
    """The document, and whether its broken characters are still in it (kept as surrogates) for the
    caller to ``repair`` piece by piece (a List, item by item). Raises ``orjson.JSONDecodeError`` for
    text that is not JSON."""
    try:
        return orjson.loads(data), False
    except orjson.JSONDecodeError as exc:
        return parse_refused(data, exc), True


def parse_refused(data: bytes, refused: orjson.JSONDecodeError) -> Any:
    """Parse text that orjson refused (with ``refused``), keeping its broken characters as
    surrogates for ``repair``. Raises ``refused`` again unless the text parses and has at least one
    broken character: then Unicode was the only reason orjson refused it."""
    try:
        text = data.decode("utf-8", "surrogateescape")
        doc = json.loads(text, parse_constant=_refuse, parse_float=_finite, parse_int=_int)
    except (ValueError, RecursionError):
        raise refused from None
    if not _broken(doc):
        raise refused
    return doc


_DONE: Any = object()  # what next() gives for a finished frame


class _Frame:
    """A container being repaired: its items still to do, and what is done."""

    __slots__ = ("container", "key", "keys", "parts", "todo", "total")

    def __init__(self, container: dict[Any, Any] | list[Any]) -> None:
        self.container = container
        self.keys = isinstance(container, dict)
        self.todo: Iterator[Any] = iter(container.items() if isinstance(container, dict) else container)
        self.parts: list[Any] = []  # (key, value) pairs of a dict, values of a list
        self.key: Any = None  # the repaired key of the dict value being repaired
        self.total = 0

    def add(self, value: Any, n: int) -> None:
        self.parts.append((self.key, value) if self.keys else value)
        self.total += n

    def result(self) -> tuple[Any, int]:
        if not self.total:
            return self.container, 0
        return (dict(self.parts) if self.keys else self.parts), self.total


def repair(value: Any) -> tuple[Any, int]:
    """``value`` with every surrogate in its strings (keys included) replaced by U+FFFD, and how many
    strings changed. Containers without a broken string are returned as they are.

    Iterative: json.loads takes ~1,000 levels of nesting, and recursing two frames a level, a broken
    string ~500 deep raised RecursionError out of the watcher: the router stopped, and failed again
    on the same list page at every start."""
    if not isinstance(value, dict | list):
        return _repair_leaf(value)
    stack = [_Frame(value)]
    while True:
        frame = stack[-1]
        child = next(frame.todo, _DONE)
        if child is _DONE:
            stack.pop()
            done = frame.result()
            if not stack:
                return done
            stack[-1].add(*done)
            continue
        if frame.keys:
            key, child = child
            frame.key, n = _repair_leaf(key)
            frame.total += n
        if isinstance(child, dict | list):
            stack.append(_Frame(child))
        else:
            frame.add(*_repair_leaf(child))


def _repair_leaf(value: Any) -> tuple[Any, int]:
    if isinstance(value, str):
        fixed, n = _SURROGATE.subn(REPLACEMENT, value)
        return fixed, 1 if n else 0
    return value, 0


def describe(obj: Any) -> str:
    """``namespace/name (uid …)`` of an Event object or a watch event around one, for the log line
    that names what was repaired; ``?`` for what it lacks."""
    if isinstance(obj, dict) and isinstance(obj.get("object"), dict):
        obj = obj["object"]
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    namespace = str(meta.get("namespace", "?"))[:253]
    name = str(meta.get("name", "?"))[:253]
    return f"{namespace}/{name} (uid {str(meta.get('uid', '?'))[:64]})"


def _broken(value: Any) -> bool:
    # Iterative, as repair: any depth json.loads takes.
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v) is not None:
                return True
        elif isinstance(v, dict):
            todo.extend(v)
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    return False


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    f = float(text)
    if math.isinf(f):
        raise ValueError(f"number out of range: {text[:40]}")
    return f


def _int(text: str) -> int | float:
    i = int(text)
    return i if _INT_MIN <= i <= _INT_MAX else _finite(text)
