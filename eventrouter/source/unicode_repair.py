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


def repair(value: Any) -> tuple[Any, int]:
    """``value`` with every surrogate in its strings (keys included) replaced by U+FFFD, and how many
    strings changed. Containers without a broken string are returned as they are."""
    if isinstance(value, str):
        fixed, n = _SURROGATE.subn(REPLACEMENT, value)
        return fixed, 1 if n else 0
    if isinstance(value, dict):
        total = 0
        out: dict[str, Any] = {}
        for k, v in value.items():
            k, nk = repair(k)
            v, nv = repair(v)
            total += nk + nv
            out[k] = v
        return (out, total) if total else (value, 0)
    if isinstance(value, list):
        items = [repair(v) for v in value]
        total = sum(n for _, n in items)
        return ([v for v, _ in items], total) if total else (value, 0)
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
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_broken(k) or _broken(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_broken(v) for v in value)
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
