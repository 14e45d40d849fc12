"""A list page that orjson refuses, parsed again without the items it refuses: one such item costs that
item, not the page.

orjson refuses JSON nested deeper than 1,024 levels (json.loads ~990): one such item (a broken proxy
or aggregated API; kube-apiserver cannot store one) made every list page it was on fail, and the
relist failed on it for ever. The page's ``items`` array is walked (brackets and strings only, in a
loop at any depth) to find where its items are, and each is judged at the depth it has in the page
(two levels more than alone: the List's ``{`` and the ``items`` array). One nested too deep for orjson
there, or with broken Unicode and too deep for the Unicode fallback to repair, is refused, once a
grammar check without a depth limit (``_one_value``) proves it one JSON value; one with broken
Unicode that the fallback parses is taken from that parse. Each such item is replaced by a marker
string, orjson parses that page, and it is taken only if its ``items`` has as many entries as the walk
found with the markers where they were put. Every other item, and ``metadata`` with its ``continue``,
are orjson's own parse: a walk that misreads a page (it is no JSON parser) can only make the page fail
whole, as any page that is not JSON does, with orjson's error. (Taking each item from the walk, a
page that was not JSON was taken with Events, or its continue token, left out silently: item 293; a
stray quote in an item too deep put the walk out of step, and the Events up to the next escaped
quote went with that item as one: item 300.)
"""

from __future__ import annotations

import asyncio
import re
import secrets
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
    """Where it is in the page (bytes): one JSON value, proven by ``_one_value``."""
    quote: bytes
    """Its first ``QUOTED`` bytes."""
    why: str
    """orjson's error (and the depth that made it)."""


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
    """The index of each item refused."""
    refused: list[Refused] = field(default_factory=list)
    cut: list[tuple[int, int]] = field(default_factory=list)
    """Where each item refused or taken from the Unicode fallback is (bytes), in order: a marker
    goes there."""
    repaired: dict[int, Any] = field(default_factory=dict)
    """The Unicode fallback's parse of each item orjson refuses for its Unicode only, by index."""


def _without_refused(data: bytes | bytearray, refused: orjson.JSONDecodeError) -> Page:
    # orjson parsed the page up to where it stopped (``pos`` counts characters, so no more bytes in):
    # an item that ends before it parses where it is, and is not parsed again to know.
    walk = _walk(data, refused.pos)
    if not walk.cut:
        raise ValueError("every item parses where it is")
    mark = _marker(data)
    doc, broken = unicode_repair.loads_unrepaired(_marked(data, walk.cut, mark))
    items = doc.get("items") if isinstance(doc, dict) else None
    marked, text = [*walk.at, *walk.repaired], mark[1:-1].decode()
    if not isinstance(items, list) or len(items) != walk.count or any(items[i] != text for i in marked):
        # A marker that is no item of ``items`` where the walk put it: the walk misread the page.
        raise ValueError("the walk found other items than orjson")
    for i, value in walk.repaired.items():
        items[i] = value
    doc["items"] = _without(items, walk.at)
    return Page(doc, broken or bool(walk.repaired), walk.refused)


_MARK = b'"#eventrouter: cut out '
"""How a marker begins: a string no JSON text reads where a string was open (its quote would close
that string and its ``#`` is no JSON outside one). orjson reads it as an item only where the walk's
item began a value."""


def _marker(data: bytes | bytearray) -> bytes:
    """``_MARK`` and a random token: no item of the page can pass for it, proven by one scan (the page
    would have to hold 128 random bits). Numbered until one was absent, a page holding "… cut out",
    "… 1" … "… 1099" (Event text anyone who may create Events writes) cost a scan each: 4.6 s for 8 MiB."""
    while True:
        mark = _MARK + secrets.token_hex(16).encode() + b'"'
        if data.find(mark[:-1]) < 0:
            return mark


def _marked(data: bytes | bytearray, cut: list[tuple[int, int]], mark: bytes) -> bytes:
    """The page with ``mark`` in place of each item at ``cut``."""
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    last = 0
    for start, end in cut:
        parts += (view[last:start], mark)
        last = end
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
            _judge_into(walk, data, begin, end)
        walk.count += 1
        m = _NEXT.match(data, end)
        if m is None:
            raise ValueError(f"expected ',' or ']' at {end}")
        pos = m.end()
        if data[pos - 1] == _CLOSE_ARRAY:
            return pos


_TOO_DEEP = "depth limit exceeded"
"""orjson's refusal of JSON nested deeper than it parses. It, and broken Unicode in an item too deep
to repair, are the refusals of an item in a page that is JSON that cost that item only. Any other
(HTML, NaN, a corrupted byte) makes the page fail whole, as before item 279: a corruption in transit
heals when the page is listed again."""
ORJSON_DEPTH = 1024
"""The deepest nesting orjson parses."""
IN_PAGE = 2
"""Levels an item is nested in its page: the List's ``{`` and the ``items`` array's ``[``."""
_SHORTEST_TOO_DEEP = 2 * (ORJSON_DEPTH - IN_PAGE + 1)
"""Bytes of the shortest item too deep in the page: an opener and a closer a level."""
REPAIR_DEPTH = 900
"""Nesting from which an item with broken Unicode that the Unicode fallback refuses is taken for too
deep for its json.loads (which runs out of recursion at ~990 levels): refused, not the page failed."""


def _judge_into(walk: _Walk, data: bytes | bytearray, begin: int, end: int) -> None:
    """Judge the item at ``begin:end`` (the walk's ``walk.count``-th) where it is in the page: left
    for orjson's parse of the page, taken from the Unicode fallback, or refused. ValueError (the
    page fails whole) for an item that is not JSON, or that the walk may have misread."""
    item = data[begin:end]
    try:
        orjson.loads(item)
    except orjson.JSONDecodeError as exc:
        if not str(exc).startswith(_TOO_DEEP):
            value = _repaired(item, exc)
            if value is not _TOO_DEEP_TO_REPAIR:
                walk.repaired[walk.count] = value
                walk.cut.append((begin, end))
                return
        why = str(exc)
    else:
        deeper = _deeper_in_page(item) if len(item) >= _SHORTEST_TOO_DEEP else None
        if deeper is None:
            return
        why = deeper
    depth = _one_value(item)
    if depth is None:
        # Out of step (a stray quote): what it took for one item may hold several. Taken, the
        # Events after it were lost, counted as one (item 300).
        raise ValueError(f"the walk found no one value at {begin}: {why}")
    if not why.startswith(_TOO_DEEP) and depth < REPAIR_DEPTH:
        raise ValueError(f"an item is not JSON: {why}")  # the fallback refused it for its text
    if not why.startswith(_TOO_DEEP):
        why = f"{why}; nested {depth} levels, too deep to repair"
    walk.at.append(walk.count)
    walk.cut.append((begin, end))
    walk.refused.append(Refused(begin, end, bytes(data[begin : min(end, begin + QUOTED)]), why))


_TOO_DEEP_TO_REPAIR: Any = object()


def _repaired(item: bytes | bytearray, refused: orjson.JSONDecodeError) -> Any:
    """The Unicode fallback's parse of an item orjson refused (not for its depth), its broken strings
    kept; ``_TOO_DEEP_TO_REPAIR`` when the fallback refuses it too (its recursion, or its text:
    ``_judge_into`` tells them apart). Alone, not in the page: json.loads recursed out of a page
    holding an item ~990 deep that orjson took, and the page failed for ever."""
    try:
        return unicode_repair.parse_refused(cast(bytes, item), refused)  # bytes-like will do
    except orjson.JSONDecodeError:
        return _TOO_DEEP_TO_REPAIR


def _deeper_in_page(item: bytes | bytearray) -> str | None:
    """orjson's refusal of an item it takes alone, at the depth it has in the page; None when it takes
    it there too. Alone, an item nested 1,023 or 1,024 levels parsed, and the page failed for ever."""
    if item.count(b"[") + item.count(b"{") <= ORJSON_DEPTH - IN_PAGE:  # cannot pass the limit there
        return None
    try:
        orjson.loads(b"[" * IN_PAGE + item + b"]" * IN_PAGE)
    except orjson.JSONDecodeError as exc:
        return f"{exc.msg} at its depth in the page (orjson takes {ORJSON_DEPTH} levels)"
    return None


# JSON's tokens (``_one_value``): a string (no control character, valid escapes; its bytes not checked
# as UTF-8: the Unicode fallback's business), a number or literal. NaN and Infinity too (a Python or
# JavaScript encoder's): inside an item too deep they are tokens that leave no doubt where it ends, and
# such an item was refused alone before.
_WS_RUN = rb"[ \t\n\r]*"
_STRING_TOKEN = rb'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
_SCALAR_TOKEN = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null|NaN|-?Infinity"
_STRINGS_VALID = re.compile(rb'(?:[^"]*+' + _STRING_TOKEN + rb')*+[^"]*+')
"""Each string of a text, found where a JSON tokenizer finds it (a ``"`` outside a string begins one),
is a string token."""
_SHORT = 64
_PASSES = 16
_HEIGHT = b"[\\x81-\\x%x]" % (0x80 + _PASSES)
"""A container a pass made a value, its height the byte less 0x80 (pass k makes height-k ones): as
``0`` for the grammar, and no JSON text holds such a byte outside a string (``_one_value`` refuses one
first). A plain ``0`` counted every pass as a level: a pass also takes the short containers of
shallow branches, and ``[[0],[[[0…]]]]`` (its innermost too long for a pass) read 5 for 4, up to 16
levels over."""
_VALUE_TOKEN = rb'(?:""|' + _HEIGHT + rb"|" + _SCALAR_TOKEN + rb")" + _WS_RUN
_MEMBER = rb'""' + _WS_RUN + rb":" + _WS_RUN + _VALUE_TOKEN
_WORTH = 64
"""A pass (~20 ns a byte) goes on to the next while it took a container per ``_WORTH`` bytes: a loop
turn per run of brackets costs ~1 us. At most ``_PASSES``, as a page of many chains might go on."""
_MORE = b"{0,%d}" % _SHORT
_ITEMS = _VALUE_TOKEN + rb"(?:," + _WS_RUN + _VALUE_TOKEN + rb")" + _MORE
_MEMBERS = _MEMBER + rb"(?:," + _WS_RUN + _MEMBER + rb")" + _MORE
_INNERMOST = re.compile(
    rb"\[" + _WS_RUN + rb"(?:" + _ITEMS + rb")?\]|\{" + _WS_RUN + rb"(?:" + _MEMBERS + rb")?\}"
)
"""An array or object of (at most ``_SHORT`` + 1) strings and scalars: a whole value, replaced by
`` <height> `` (``_HEIGHT``), which merges with no neighbour (``-{}`` is no ``-0``). A longer one is
orjson's to check. Each pass takes every such container there is (one that a value replaced a
container in has as many items as before), so one it takes holds one the pass before took, else it
would have been taken then: its height is exactly the pass's number."""
_HEIGHTS = [b" %c " % (0x80 + k) for k in range(_PASSES + 1)]
_AS_ZERO = bytes.maketrans(bytes(range(0x81, 0x81 + _PASSES)), b"0" * _PASSES)
_FLAT = re.compile(rb"(?:" + _WS_RUN + rb'(?:""|' + _SCALAR_TOKEN + rb"|[,:]))*+" + _WS_RUN)
_SCALARS = re.compile(_SCALAR_TOKEN)
_SPACE = re.compile(rb"[ \t\n\r]+")
_ONE = re.compile(_WS_RUN + _VALUE_TOKEN)
_RUN = re.compile(rb"[\[{](?:[ \t\n\r]*[\[{])*|[\]}](?:[ \t\n\r]*[\]}])*")
"""Openers (or closers) with only whitespace between them."""
_WHITESPACE = b" \t\n\r"
_TO_CLOSERS = bytes.maketrans(b"[{", b"]}")
_PROBE = {ord("]"): (b"[", b"0 ", b",0", b"]"), ord("}"): (b"{", b'"":0 ', b',"":0', b"}")}
"""A container's opener; an item (member) before a text that follows one; a comma and an item after a
text that a comma follows; its closer. orjson checks the text between two brackets inside them."""
_PIECE = 1 << 16
"""Bytes of such a text orjson checks at once: one of 16 MiB, parsed whole, held 8 M items (+200 MiB)."""


def _one_value(text: bytes | bytearray) -> int | None:
    """How deep ``text`` nests if it is one JSON value by JSON's grammar, with no depth limit; None if
    it is not. A JSON value starting where it starts ends where only it ends: so the walk cut exactly
    the item orjson would read there. Regex passes at C speed do what they can (strings checked and
    made ``""``; innermost short containers, a level a pass, made a value while many are), then a
    loop over runs of brackets has orjson check the text between them. A loop turn per token took
    13.7 s for an item of 8 M ``0,`` 1,100 deep in a 16 MiB page; 0.6 s now. The depth is exact: a
    container a pass took counts its own height where it stands (``_HEIGHT``), not a level a pass."""
    if _STRINGS_VALID.fullmatch(text) is None:
        return None
    flat, passes = _STRING.sub(b'""', text), 0
    if not flat.isascii():  # outside a string: no JSON, and it would pass for a ``_HEIGHT``
        return None
    while passes < _PASSES:
        smaller, found = _INNERMOST.subn(_HEIGHTS[passes + 1], flat)
        if not found:
            break
        passes += 1
        worth, flat = found * _WORTH >= len(flat), smaller
        if not worth:
            break
    return _brackets(flat, passes)


def _brackets(flat: bytes, passes: int) -> int | None:
    """``_one_value`` of ``flat`` (its strings ``""``, containers the first ``passes`` passes took
    ``_HEIGHT``): how deep its brackets and the heights between them nest, the text between them
    checked by ``_between``."""
    closers = bytearray()
    deepest, last, after_opener = 0, 0, True
    for m in _RUN.finditer(flat):
        run = m.group().translate(None, _WHITESPACE)
        opens = run[0] in _CLOSER
        if not closers:
            if flat[: m.start()].strip(_WHITESPACE) or not opens:
                return None
        else:
            height = _between(closers[-1], after_opener, flat[last : m.start()], opens, passes)
            if height is None:
                return None
            if height:  # else no deeper than the brackets already counted
                deepest = max(deepest, len(closers) + height)
        if opens:
            if b"{" in run[:-1]:  # an object's first member is a key, not a value
                return None
            closers += run.translate(_TO_CLOSERS)
            deepest = max(deepest, len(closers))
        else:
            kept = len(closers) - len(run)
            if kept < 0 or closers[kept:] != run[::-1]:
                return None
            del closers[kept:]
        last, after_opener = m.end(), opens
        if not closers:
            return deepest if not flat[last:].strip(_WHITESPACE) else None
    return _height(flat, passes) if _ONE.fullmatch(flat) is not None else None


_BETWEEN: dict[tuple[int, bool, bytes, bool], int | None] = {}
"""``_between`` of short texts: most between brackets are ``,`` or ``"k":`` (kept for the process)."""
_UNKNOWN = -1


def _between(closer: int, after_opener: bool, text: bytes, before_opener: bool, passes: int) -> int | None:
    """The height of the highest value in ``text`` (``_HEIGHT``; 0 for none), between two brackets in
    the container that ``closer`` closes; None if it is not JSON there. A piece at a time: no bracket
    is in it and its strings are ``""``, so each comma parts two items."""
    key = (closer, after_opener, text, before_opener)
    known = _BETWEEN.get(key, _UNKNOWN)
    if known != _UNKNOWN:
        return known
    height = _height(text, passes)
    if height:
        text = text.translate(_AS_ZERO)
    opener, item, more, end = _PROBE[closer]
    first, last = b"" if after_opener else item, b" 0" if before_opener else b""
    start, fits = 0, True
    while fits and (cut := text.find(b",", start + _PIECE)) >= 0:
        fits = _json_inside(opener, first if start == 0 else item, text[start:cut], more, end)
        start = cut
    fits = fits and _json_inside(opener, first if start == 0 else item, text[start:], last, end)
    found = height if fits else None
    if len(text) <= _SHORT and len(_BETWEEN) < 4096:
        _BETWEEN[key] = found
    return found


def _height(text: bytes, passes: int) -> int:
    """The height of the highest container a pass made a value in ``text``: a scan a pass, at most."""
    for height in range(passes, 0, -1):
        if _HEIGHTS[height][1] in text:
            return height
    return 0


def _json_inside(opener: bytes, before: bytes, text: bytes, after: bytes, end: bytes) -> bool:
    # orjson takes JSON only: NaN, Infinity and a number past a double's range are the grammar's too.
    return _orjson_takes(opener, before, text, after, end) or (
        _FLAT.fullmatch(text) is not None
        and _orjson_takes(opener, before, _SPACE.sub(b"", _SCALARS.sub(b"0", text)), after, end)
    )


def _orjson_takes(*parts: bytes) -> bool:
    try:
        orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError:
        return False
    return True


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
