"""At most the start of an HTTP answer's body: what is quoted or parsed, never a front's whole page
(the source's error answers, and the sinks' answers: SLS, Loki, the robots).

``excerpt`` reads it once the answer's head is in, never raising for the body: a body that stalls
after the head, is cut off or cannot be decoded is then a note in the reason, never "no answer"
(which threw the status and its Retry-After away: a final 400 retried for ever, a 413 never halved).

How long a body is waited for depends on what it decides (the caller's ``wait``):

- a body that only changes what is quoted (an error answer whose status decides: the webhook's
  400/413/429/5xx, SLS's 413/429/5xx, a front's page) gets ``EXCERPT_WAIT`` (or the request's timeout,
  if less): one that stalls after the head cost the request's whole timeout inside the send's;
- a body that decides the outcome (a robot's 200 reply: sent, throttled or refused; SLS's own 400,
  whose code tells a header's refusal, retried, from a log's) gets the request's own timeout, as it
  did before any excerpt: cut at 2 s, a reply in by 2.5 s was sent (and paged) again, an SLS
  RequestTimeExpired dead-lettered the logs. Only a body that truly cannot be read within that is
  judged without it."""

from __future__ import annotations

import asyncio
import codecs
import encodings.aliases
import re
from typing import NamedTuple

import aiohttp
from aiohttp.http_exceptions import (
    ContentEncodingError,
    ContentLengthError,
    DecompressSizeError,
    HttpProcessingError,
    TransferEncodingError,
)

__all__ = ["EXCERPT_WAIT", "Excerpt", "answer_text", "charset_of", "excerpt", "read_prefix"]

EXCERPT_WAIT = 2.0
"""Seconds a body that only changes what is quoted is waited for once the head is in (or the request's
timeout, if less): one that stalls after the head cost the request's whole timeout (10 s, 30 s)
inside the send's. Never for a body that decides the outcome (the module's docstring)."""

# What reading a body can raise once the head is in: aiohttp's ClientPayloadError (C parser) or the
# pure-Python parser's own errors (AIOHTTP_NO_EXTENSIONS=1: TransferEncodingError is no ClientError),
# a lost connection, a timeout, and StreamReader's RuntimeError("Connection closed.") for a read
# begun after the parser gave up on the connection.
_READ_ERRORS = (aiohttp.ClientError, HttpProcessingError, OSError, TimeoutError, RuntimeError)


class Excerpt(NamedTuple):
    """The start of an answer's body, as far as it could be read."""

    data: bytes
    """At most the limit's bytes: what came before a failure too."""
    more: bool
    """The body had more than the limit (left unread: the connection is closed, not reused)."""
    unreadable: str | None
    """Why the body could not be read to its end or the limit (None: it could): short, and never
    quoting the answer's bytes (a parser's message does, and a partial secret could be in them)."""


async def read_prefix(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of an answer's body, and whether it had more (left unread: the caller
    closes the connection, it cannot be reused). Read whole, a proxy's 300 MB error page was held in
    memory, with its copies, at every retry."""
    parts: list[bytes] = []
    await _read_into(content, limit, parts)
    return _joined(parts, limit)


async def excerpt(resp: aiohttp.ClientResponse, limit: int, wait: float | None) -> Excerpt:
    """``read_prefix`` of ``resp``'s body within ``wait`` seconds, never raising for the body: what
    failed is said in ``unreadable``, and the caller judges the answer by its status (the status line
    and headers are in). ``wait``: ``EXCERPT_WAIT`` for a body only quoted; None for one that decides
    the outcome (the module's docstring): no wait of its own, the request's timeout ends the read
    (its session's or request's ``ClientTimeout(total=...)``, which the caller must have set; a wait
    of the same length raced it, and the reason named one or the other)."""
    parts: list[bytes] = []
    timer = asyncio.timeout(wait)
    try:
        async with timer:
            await _read_into(resp.content, limit, parts)
    except _READ_ERRORS as exc:
        got = sum(map(len, parts))
        data, _ = _joined(parts, limit)
        return Excerpt(data, False, _why(exc, resp, got, wait if timer.expired() else None))
    data, more = _joined(parts, limit)
    return Excerpt(data, more, None)


def answer_text(data: bytes, charset: str | None = None) -> str:
    """``data`` (an answer's body, or its start) as text in the answer's ``charset`` (None: UTF-8; a
    sink reads it with ``charset_of`` from its Content-Type header's raw text), never raising:
    undecodable bytes are replaced. The charset is the peer's to choose, so only one
    of ``_CHARSETS`` is honoured, found by its normalised name
    (``_charset``); any other is read as UTF-8, as an unlabelled body. Python's codecs include
    bytes-to-bytes ones ("charset=base64" raised LookupError out of a sink's ``send`` and ``start``,
    item 301), punycode, whose decode is quadratic (a 128 KiB answer blocked the event loop 7.8 s),
    and ``codecs.lookup`` keeps every unknown name it is asked for the life of the process (a label
    varying per answer grew the router without bound). Whatever is honoured, a run of printable ASCII
    bytes (an echoed credential) comes out as itself, so the sinks' scrub, which looks at the text,
    finds it: under utf-7, utf-16-le or cp037 it did not, and the reason quoted it re-encodable (UTF-16
    and UTF-32 are read in the byte order of the data, ``_wide_order``)."""
    codec = _charset(charset) if charset else None
    if codec is not None and codec in _WIDE:
        # Two printable ASCII bytes side by side: not the ASCII text UTF-16/32 writes (a NUL between),
        # and possibly an echoed credential such a decode would hide.
        codec = None if _ASCII_PAIR.search(data) else _wide_order(data, codec)
    return data.decode(codec or "utf-8", "replace")


def charset_of(content_type: str | None) -> str | None:
    """The ``charset`` parameter of a Content-Type header's raw text (None: none), for ``answer_text``.
    Never aiohttp's ``response.charset`` (or ``content_type``): it parses the header with ``email``,
    which decodes any RFC 2231 parameter (``x*=idna''a``) in the codec the peer names, before
    ``answer_text`` sees it: ``idna`` raised UnicodeError out of the Loki sink's ``send`` and ``start``
    (item 301's fault) and every distinct name was cached by the codec registry for ever. Here only a
    parameter named exactly ``charset`` counts (``charset*=`` is another), its value a token or a
    quoted string, read by one linear regex per parameter from at most ``_HEADER_MAX`` characters."""
    if not content_type:
        return None
    text = content_type[:_HEADER_MAX]
    pos = text.find(";")
    while pos != -1:
        parameter = _PARAMETER.match(text, pos)
        assert parameter is not None  # every ";" starts a match
        name, value = parameter.group(1, 2)
        if value is not None and name.strip(" \t").lower() == "charset":
            if value.startswith('"'):
                value = _QUOTED_PAIR.sub(r"\1", value[1:].removesuffix('"'))
            return value.strip(" \t") or None
        pos = parameter.end() if parameter.end() < len(text) else -1
    return None


_HEADER_MAX = 512
"""Characters of a Content-Type looked at (aiohttp takes up to 8 KiB); a charset past them is not read."""

_PARAMETER = re.compile(r';([^=;]*)(?:=[ \t]*("(?:[^"\\]|\\.)*"?|[^;"]*)[^;]*)?', re.DOTALL)
"""One parameter from its ";": a name, and a value that is a quoted string (a ";" in it is its own)
or a token; what follows a value up to the next ";" is skipped. No part can match another's text, so
no backtracking: linear in the header's length."""

_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _wide_order(data: bytes, codec: str) -> str:
    """The UTF-16 or UTF-32 codec (``codec``'s width) in the byte order ``data`` is written in: its BOM
    (Python's ``utf_16``/``utf_32`` read and drop it), else where its NULs are (the high bytes of the
    ASCII and Latin characters), else the label's order, else big-endian (RFC 2781 §4.3). Taken from
    the label alone, a BOM-less big-endian echo labelled ``utf-16`` (Python reads it little-endian),
    one mislabelled ``utf-16-le`` or one a byte off decoded byte-swapped: an echoed credential became
    CJK characters, which the scrub missed and the reason quoted re-encodable."""
    if codec.startswith("utf_16") and b"\0\0\0" in data:
        # UTF-32's ASCII (UTF-16 writes three NULs in a row only for a U+0000): read as UTF-16, an
        # echoed credential kept a NUL between its letters, and the scrub missed it.
        codec = "utf_32"
    if codec.startswith("utf_16"):
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return "utf_16"
        high_first, high_second = data[0::2].count(0), data[1::2].count(0)
    else:
        if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
            return "utf_32"
        high_first, high_second = data[0::4].count(0), data[3::4].count(0)
    width = codec[:6]
    if high_first != high_second:
        return f"{width}_be" if high_first > high_second else f"{width}_le"
    return codec if codec.endswith(("_le", "_be")) else f"{width}_be"


_ASCII_COMPATIBLE = (
    "utf_8",
    "ascii",
    "latin_1",
    *(f"iso8859_{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)),
    *(f"cp{n}" for n in range(1250, 1259)),
    "koi8_r",
    "koi8_u",
    "cp866",
    "cp874",
    "mac_roman",
    "mac_cyrillic",
    # Multi-byte ones whose every byte of a character is >= 0xA1 (or 0x8E/0x8F then such bytes): no
    # ASCII byte is a trail byte. Not Shift_JIS, GBK, GB18030, Big5 or UHC (a trail byte from 0x40
    # took an echoed credential's first letter), nor ISO-2022-* or HZ (an escape turns ASCII into
    # double-byte characters).
    "euc_jp",
    "euc_kr",
    "gb2312",
)
"""Charsets in which every ASCII byte decodes to itself whatever comes before it."""

_WIDE = frozenset(("utf_16", "utf_16_le", "utf_16_be", "utf_32", "utf_32_le", "utf_32_be"))
"""Honoured only for a body with no two printable ASCII bytes side by side (``answer_text``)."""

_ASCII_PAIR = re.compile(rb"[\x20-\x7e]{2}")

_LABEL_MAX = 40
"""Characters of a charset label looked at (the longest name honoured has 21): a longer one is unknown."""


_LABELS = {
    "windows-874": "cp874",
    "dos-874": "cp874",
    "x-mac-cyrillic": "mac_cyrillic",
    "x-mac-roman": "mac_roman",
}
"""The IANA and WHATWG names of charsets honoured that Python has no alias for (a Thai or Mac answer so
labelled was read as UTF-8)."""


def _names() -> dict[str, str]:
    """Every spelling of the charsets honoured (their ``encodings.aliases`` and ``_LABELS`` too), normalised as
    ``_charset`` does, to the codec's name. Built once: the codec registry is asked only these."""
    names: dict[str, str] = {}
    for codec in (*_ASCII_COMPATIBLE, *_WIDE):
        try:
            codecs.lookup(codec)
        except LookupError:  # a Python built without it (the CJK codecs are optional)
            continue
        spellings = {codec, *(alias for alias, name in encodings.aliases.aliases.items() if name == codec)}
        spellings.update(label for label, name in _LABELS.items() if name == codec)
        for spelling in spellings:
            names[_normalised(spelling)] = codec
    return names


def _normalised(label: str) -> str:
    """``label`` lower-cased, each run of characters other than letters, digits and dots one ``_``
    (``encodings.normalize_encoding``'s form: "UTF-8", "utf_8" and "utf 8" are one name)."""
    return _PUNCTUATION.sub("_", label.lower()).strip("_")


_PUNCTUATION = re.compile(r"[^a-z0-9.]+")


def _charset(label: str) -> str | None:
    """The codec ``label`` (a peer's charset) names among those honoured, None if none: quotes and
    spaces around it dropped, never handed to the codec registry."""
    label = label.strip().strip("\"'").strip()
    if len(label) > _LABEL_MAX:
        return None
    name = _normalised(label)
    return _CHARSETS.get(name) or _CHARSETS.get(name.replace(".", "_"))


_CHARSETS = _names()


async def _read_into(content: aiohttp.StreamReader, limit: int, parts: list[bytes]) -> None:
    """Up to ``limit`` + 1 bytes into ``parts``: one past the limit tells a body of exactly ``limit``
    from a longer one. To its end: one read returns what has arrived, not the body."""
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            return
        parts.append(chunk)
        size += len(chunk)


def _joined(parts: list[bytes], limit: int) -> tuple[bytes, bool]:
    data = b"".join(parts)
    return data[:limit], len(data) > limit


def _why(exc: BaseException, resp: aiohttp.ClientResponse, got: int, waited: float | None) -> str:
    """What went wrong with a body's read, by the error's class (its message quotes the bytes the
    parser failed on); ``waited``: our wait ran out (else the request's own timeout, if a timeout)."""
    after = f" after {got} bytes" if got else ""
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
        # The C parser sets a malformed body's error on the connection, not on the body: the read
        # waits on; the protocol still tells what happened.
        if isinstance(_protocol_error(resp), HttpProcessingError):
            return f"malformed{after} (the HTTP parser gave up on it)"
        if waited is None:
            return f"the request's timeout ran out while it was read{after}"
        return f"none of it within {waited:g}s" if not got else f"stalled{after}, no more within {waited:g}s"
    if isinstance(exc, TimeoutError):  # aiohttp's sock_read: the request's own timeout
        return f"the request's timeout ran out while it was read{after}"
    for cause in (exc, exc.__cause__):
        if isinstance(cause, (ContentEncodingError, DecompressSizeError)):
            return "not in its Content-Encoding"
        if isinstance(cause, ContentLengthError) or (
            isinstance(cause, TransferEncodingError) and str(cause.message).startswith("Not enough data")
        ):
            return f"cut off{after} before its end"
        if isinstance(cause, HttpProcessingError):
            return f"malformed{after} ({type(cause).__name__})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"cut off{after} before its end"
    return f"the connection was lost{after} ({type(exc).__name__})"


def _protocol_error(resp: aiohttp.ClientResponse) -> BaseException | None:
    """The error aiohttp's protocol holds for ``resp``'s connection, if any."""
    connection = resp.connection
    protocol = connection.protocol if connection is not None else None
    return protocol.exception() if protocol is not None else None
