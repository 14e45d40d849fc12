"""Reading what ``eventrouter replay`` routes: a ``kubectl get events -o json`` List, JSON lines of
watch events, bare Event objects, Lists or dead-letter entries (``<data-dir>/deadletter/<sink>.jsonl``),
or JSON values one after another (``kubectl get events -w -o json`` pretty-prints each object).
events.k8s.io/v1 and v1beta1 Events are read with core/v1's field names.

JSON lines are read one at a time, so a large file (a dead-letter file grows to 100 MiB) costs the
memory of one line, not of the file; a document over several lines (kubectl's pretty-printed List)
and pretty-printed values one after another are read whole.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import orjson

from eventrouter.record import core_v1_event, list_item
from eventrouter.source import unicode_repair

__all__ = ["DEAD_LETTER_FIELDS", "read_recording"]

log = logging.getLogger(__name__)

DEAD_LETTER_FIELDS = frozenset({"sink", "reason", "key", "record"})
"""The fields that make a JSON line a dead-letter entry."""


def read_recording(lines: Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    """(watch event type or ``LIST``, Event object) pairs from the lines of a file.

    Broken Unicode (invalid UTF-8, lone surrogate escapes) is replaced by U+FFFD, as the watch does;
    each repaired object is preceded by a ``("REPAIRED", None)`` marker, an unreadable line is a
    ``("MALFORMED", None)``, and a dead-letter entry's Event by ``("DEADLETTER", (sink, cluster))``."""
    numbered = enumerate(lines, 1)
    for number, line in numbered:
        if not line.strip():
            continue
        try:
            obj, strings = unicode_repair.loads(line)
        except orjson.JSONDecodeError as exc:
            following: list[tuple[int, bytes]] = []
            if _opens_document(line):
                following = _up_to_filled(numbered)
                if not following or not _is_value(following[-1][1]):
                    # Not one JSON value per line: one document over several lines, read whole.
                    head = line + b"".join(text for _, text in following)
                    yield from _document(head + b"".join(rest for _, rest in numbered), first_line=number)
                    return
            # A torn first line (a cut, `tail -c`): reading the rest whole for it cost the memory of
            # the whole file (a 100 MiB recording, ~1 GiB). Skipped; the next line is a first line,
            # or, when it is a whole value, the first of JSON lines (a letter torn after its `{`).
            log.warning("replay: line %d is not JSON (%s); skipped", number, exc)
            yield "MALFORMED", None
            if following:
                yield from _json_lines(itertools.chain(following, numbered))
                return
            continue
        yield from _value(obj, strings, f"line {number}")
        break
    yield from _json_lines(numbered)


_DOCUMENT_HEAD_MAX = 1024
"""Bytes at most in the first line of a document over several lines: a pretty printer's is ``{``
or a short header (``{"apiVersion": "v1", "items": [``)."""

_LINE_HEAD = re.compile(rb'\{\s*"(?:sink|type)"\s*:')
"""How a dead-letter entry and a watch event start when written one to a line."""


def _opens_document(line: bytes) -> bool:
    """Whether a line that is no JSON value starts one over several lines, as pretty printers
    (kubectl, jq, ``json.dumps(indent=…)``) write it: ``{`` and, at its end, an opening or a comma.
    Not a long line, nor one that starts as a dead letter or a watch event does: a letter torn right
    after a ``,`` (a kill during the first append to a new file) read the whole file into memory."""
    text = line.strip()
    return (
        len(text) <= _DOCUMENT_HEAD_MAX
        and text.startswith(b"{")
        and text.endswith((b"{", b"[", b","))
        and _LINE_HEAD.match(text) is None
    )


def _up_to_filled(numbered: Iterator[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The next lines up to the first that is not blank (none at the end of the file)."""
    taken = []
    for number, line in numbered:
        taken.append((number, line))
        if line.strip():
            break
    return taken


def _is_value(line: bytes) -> bool:
    """Whether a line is a JSON value by itself: a document's second line (``"apiVersion": "v1",``)
    is not; that after a letter torn right after its ``{`` (the line ``{``) is."""
    try:
        unicode_repair.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _json_lines(numbered: Iterable[tuple[int, bytes]]) -> Iterator[tuple[str, Any]]:
    for number, line in numbered:
        if not line.strip():
            continue
        try:
            obj, strings = unicode_repair.loads(line)
        except orjson.JSONDecodeError as exc:
            log.warning("replay: line %d is not JSON (%s); skipped", number, exc)
            yield "MALFORMED", None
            continue
        yield from _value(obj, strings, f"line {number}")


def _document(data: bytes, *, first_line: int) -> Iterator[tuple[str, Any]]:
    text = data.lstrip()
    if text.startswith(b"{"):
        try:
            doc, broken = unicode_repair.loads_unrepaired(text)
        except orjson.JSONDecodeError:
            doc, broken = None, False
        if isinstance(doc, dict):
            yield from _items(doc, repaired=broken, where="the document")
            return
        # Not one document: values one after another, each over several lines (`kubectl get -w -o
        # json`), when the first of them is one; read line by line, each of those was "not JSON".
        chars = data.decode("utf-8", "surrogateescape")  # bytes back unchanged for orjson and repair
        start = _skip_blank(chars, 0)
        try:
            _DECODER.raw_decode(chars, start)
        except (ValueError, RecursionError):
            pass
        else:
            yield from _values(chars, start, first_line=first_line + chars.count("\n", 0, start))
            return
    # Not a document either: JSON lines of which some are broken.
    yield from _json_lines(enumerate(data.splitlines(), first_line))


_DECODER = json.JSONDecoder()
_BLANK = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _values(text: str, pos: int, *, first_line: int) -> Iterator[tuple[str, Any]]:
    """The JSON values of ``text`` one after another from ``pos``. A value that cannot be read is
    skipped up to the next line that starts with ``{`` (where kubectl starts each object)."""
    line, counted = first_line, pos
    while pos < len(text):
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            # The stdlib decoder finds where the value ends; orjson (with repair) reads it as a line
            # would be read, as strictly.
            end = _DECODER.raw_decode(text, pos)[1]
            obj, strings = unicode_repair.loads(text[pos:end].encode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError is a ValueError
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)  # msg: no offsets
            log.warning("replay: the JSON value at line %d cannot be read (%s); skipped", line, reason)
            yield "MALFORMED", None
            nxt = text.find("\n{", pos)
            end = len(text) if nxt == -1 else nxt + 1
        else:
            yield from _value(obj, strings, f"line {line}")
        pos = _skip_blank(text, end)


def _skip_blank(text: str, pos: int) -> int:
    blank = _BLANK.match(text, pos)
    return blank.end() if blank else pos


def _value(obj: Any, strings: int, where: str) -> Iterator[tuple[str, Any]]:
    """One parsed line; ``strings``: how many of its strings were repaired."""
    if strings:
        yield from _note_repaired(obj, strings, where)
    yield from _items(obj, repaired=False, where=where)


def _items(obj: Any, *, repaired: bool, where: str) -> Iterator[tuple[str, Any]]:
    """The events of one JSON value; ``repaired``: repair each (a document orjson refused)."""
    if isinstance(obj, dict) and isinstance(obj.get("items"), list):  # a List
        # The API server's own list responses give the apiVersion once, on the List.
        version = obj.get("apiVersion")
        for n, item in enumerate(obj["items"]):
            if repaired:
                item = yield from _repaired(item, f"item {n}")
            yield "LIST", core_v1_event(list_item(item, obj), version)
        return
    if repaired:
        obj = yield from _repaired(obj, where)
    if isinstance(obj, dict) and "type" in obj and isinstance(obj.get("object"), dict):
        yield str(obj["type"]), core_v1_event(obj["object"])
    elif isinstance(obj, dict) and obj.keys() >= DEAD_LETTER_FIELDS:
        # A dead-letter entry: the Event object it was made from (its occurrence number included).
        record = obj["record"]
        yield "DEADLETTER", (str(obj["sink"]), record.get("cluster") if isinstance(record, dict) else None)
        if isinstance(obj.get("event"), dict):
            yield "LIST", core_v1_event(obj["event"])
        else:
            log.warning(
                "replay: dead-letter line for %s has no event object (written before eventrouter kept it); "
                "skipped",
                obj.get("key"),
            )
            yield "MALFORMED", None
    else:
        yield "LIST", core_v1_event(obj)


def _repaired(obj: Any, where: str) -> Generator[tuple[str, Any], None, Any]:
    obj, strings = unicode_repair.repair(obj)
    if strings:
        yield from _note_repaired(obj, strings, where)
    return obj


def _note_repaired(obj: Any, strings: int, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict) and obj.keys() >= DEAD_LETTER_FIELDS and isinstance(obj.get("event"), dict):
        obj = obj["event"]  # a dead letter: its event's namespace, name and uid, not `?/? (uid ?)`
    log.warning(
        "replay: %s (event %s) had invalid UTF-8 or lone surrogate escapes in %d strings: replaced by U+FFFD",
        where,
        unicode_repair.describe(obj),
        strings,
    )
    yield "REPAIRED", None
