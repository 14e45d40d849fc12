"""An answer's charset label, session 36's second review of item 319 (review-c F1-F3).

- F1: Loki read the label through aiohttp's ``response.charset``, which parses the Content-Type with
  ``email``: it decodes any RFC 2231 parameter (``charset*=idna''utf-8``, ``x*=idna''a``) in the codec
  the peer names, before ``answer_text`` runs. ``idna``, ``punycode`` or ``undefined`` raised
  UnicodeError out of ``send`` and ``start`` (a final 400 retried as a sink bug, a 429's Retry-After
  lost: item 301's fault), and every distinct name was cached by the codec registry for ever.
- F2: a UTF-16 answer was decoded in the label's byte order (Python's little-endian for a BOM-less
  ``utf-16``): a big-endian echo, one mislabelled ``utf-16-le`` or one a byte off came out
  byte-swapped, and the echoed credential passed the scrub, re-encodable from the reason.
- F3: ``windows-874`` and ``x-mac-cyrillic``, listed as honoured, were read as UTF-8.

Against the real Loki sink and the project's test Loki (``charset_next``; ``fail_next(echo=True)``
behind a ``Relay`` front that re-encodes its error answers)."""

from __future__ import annotations

import encodings
import time

import pytest
from aiohttp import web
from body_helpers import ECHO_TEXT, TOKEN, loki_sink, recent

from eventrouter import OutcomeKind, RetryableError
from eventrouter.body_prefix import answer_text, charset_of
from eventrouter.scrub import scrub
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.relay import Relay

# -- F1: the label is read from the raw header, never through email's RFC 2231 decoding ----------------

# The test Loki labels its answer ``text/plain; charset=<this>``: each adds an RFC 2231 parameter whose
# "charset" (before the first ') is a codec that cannot decode with surrogateescape. (email decodes a
# ``charset*=`` only when no ``charset=`` has a value.)
RFC2231 = [
    "; charset*=idna''utf-8",
    "; charset*=punycode''utf-8",
    "; charset*=undefined''utf-8",
    "utf-8; x*=idna''a",
]
RFC2231_IDS = ["charset*=idna", "charset*=punycode", "charset*=undefined", "x*=idna"]


@pytest.mark.parametrize("charset", RFC2231, ids=RFC2231_IDS)
async def test_loki_a_final_400_with_an_rfc2231_parameter_is_rejected_with_its_reason(charset: str) -> None:
    """Before: UnicodeError out of ``send`` (a sink bug to the engine, retried for ever)."""
    async with LokiReceiver() as loki, loki_sink(loki.url) as sink:
        loki.fail_next(400, message="entry for stream refused: invalid labels")
        loki.charset_next(1, charset)
        outcomes = await sink.send(recent(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert outcome.reason == (
        "loki: 400 (push of 1 entries refused, possibly partly stored): entry for stream refused: invalid labels"
    )


@pytest.mark.parametrize("charset", RFC2231, ids=RFC2231_IDS)
async def test_loki_a_429_with_an_rfc2231_parameter_keeps_its_retry_after(charset: str) -> None:
    """Before: UnicodeError out of ``send``, the Retry-After thrown away."""
    async with LokiReceiver() as loki, loki_sink(loki.url) as sink:
        loki.fail_next(429, retry_after=30)
        loki.charset_next(1, charset)
        with pytest.raises(RetryableError) as failed:
            await sink.send(recent(1))
    assert failed.value.retry_after == 30
    assert "Ingestion rate limit exceeded" in failed.value.reason


@pytest.mark.parametrize("charset", RFC2231, ids=RFC2231_IDS)
async def test_loki_start_passes_when_ready_has_an_rfc2231_parameter(charset: str) -> None:
    """``/ready``'s 200 "ready" so labelled. Before: ``start`` raised UnicodeError, no SinkError."""
    async with LokiReceiver() as loki:
        loki.charset_next(1, charset, ready=True)
        async with loki_sink(loki.url) as sink:
            outcomes = await sink.send(recent(1))
    assert outcomes is None or {o.kind for o in outcomes} == {OutcomeKind.OK}
    assert len(loki.entries) == 1


async def test_distinct_rfc2231_parameters_leave_the_codec_cache_unchanged() -> None:
    """300 400s, each with its own ``x*=<name>''a``. Before: email asked the codec registry each name,
    and ``encodings._cache`` kept every one (+300 entries; the review: +2,000 after 2,000 answers)."""
    cache: dict[str, object] = vars(encodings)["_cache"]
    async with LokiReceiver() as loki, loki_sink(loki.url) as sink:
        loki.fail_next(400, message="entry too long")
        loki.charset_next(1, "utf-8; x*=warm-up''a")
        await sink.send(recent(1))  # what the path looks up itself, once
        before = len(cache)
        for i in range(300):
            loki.fail_next(400, message="entry too long")
            loki.charset_next(1, f"utf-8; x*=no-such-codec-{i:04d}-{'y' * 200}''a")
            outcomes = await sink.send(recent(1))
            assert outcomes is not None and outcomes[0].kind is OutcomeKind.REJECT
    assert len(cache) == before


@pytest.mark.parametrize(
    ("content_type", "charset"),
    [
        ("text/plain; charset=utf-8", "utf-8"),
        ('text/plain; charset="ISO-8859-1"', "ISO-8859-1"),
        ("text/plain;CHARSET = koi8-r ;format=flowed", "koi8-r"),
        ("text/plain; x*=idna''a; charset=latin1", "latin1"),
        ('text/plain; title="; charset=utf-16"; charset=koi8-r', "koi8-r"),  # ";" inside a quoted string
        ('text/plain; charset="a\\"b"', 'a"b'),
        ("text/plain; charset*=idna''utf-8", None),
        ("text/plain; charset=; charset*=idna''utf-8", None),
        ("text/plain; charset", None),
        ("text/plain; xcharset=utf-16", None),
        ("text/plain", None),
        (None, None),
        ("text/plain" + "; x=y" * 200 + "; charset=utf-16", None),  # past the first 512 characters
    ],
)
def test_charset_of_reads_only_the_charset_parameter(content_type: str | None, charset: str | None) -> None:
    assert charset_of(content_type) == charset


def test_charset_of_is_linear() -> None:
    """Headers of 100,000 characters built to make a backtracking parser work: read from the first 512."""
    hostile = [
        "text/plain" + "; " * 50_000,
        'text/plain; charset="' + "\\" * 100_000,
        "text/plain; charset=" + "a" * 100_000,
        ";" + " " * 100_000,
    ]
    started = time.perf_counter()
    for content_type in hostile * 100:
        charset_of(content_type)
    assert time.perf_counter() - started < 2.0


# -- F2: UTF-16 and UTF-32 in the byte order of the data ----------------------------------------------

WIDE = [
    # (label, the body's bytes)
    ("utf-16", ECHO_TEXT.encode("utf-16-be")),  # RFC 2781: a BOM-less "UTF-16" is big-endian
    ("utf-16-le", ECHO_TEXT.encode("utf-16-be")),
    ("utf-16-be", ECHO_TEXT.encode("utf-16-le")),
    ("utf-16", b"\n" + ECHO_TEXT.encode("utf-16-le")),  # one byte off
    ("utf-16-le", ECHO_TEXT.encode("utf-16")[:2][::-1] + ECHO_TEXT.encode("utf-16-be")),  # a big-endian BOM
    ("utf-32-le", ECHO_TEXT.encode("utf-32-be")),
    ("utf-16", ECHO_TEXT.encode("utf-32-le")),  # UTF-32 labelled UTF-16: a NUL between letters
]
WIDE_IDS = [
    "utf-16,BE",
    "utf-16-le,BE",
    "utf-16-be,LE",
    "utf-16,LE+1",
    "utf-16-le,BOM-BE",
    "utf-32-le,BE",
    "utf-16,32LE",
]


@pytest.mark.parametrize(("charset", "body"), WIDE, ids=WIDE_IDS)
def test_a_wide_echo_is_read_in_the_byte_order_of_its_data_and_scrubbed(charset: str, body: bytes) -> None:
    """Before: decoded byte-swapped ("r" became U+7200), the token not in the text."""
    text = answer_text(body, charset)
    assert TOKEN in text
    assert "\x00" not in text
    assert TOKEN not in scrub(text, [TOKEN])


class Widening(Relay):
    """A front that answers the upstream's error answers re-encoded in ``codec`` (its bytes led by
    ``lead``) and labelled ``charset``."""

    def __init__(self, upstream: str, codec: str, charset: str, lead: bytes = b"") -> None:
        super().__init__(upstream)
        self.codec, self.charset, self.lead = codec, charset, lead

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        answer = await self.relay(request, await request.read())
        if answer.status < 400 or not isinstance(answer.body, bytes):
            return answer
        body = self.lead + answer.body.decode().encode(self.codec)
        headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-type"}
        return web.Response(
            status=answer.status,
            body=body,
            headers={**headers, "Content-Type": f"text/plain; charset={self.charset}"},
        )


@pytest.mark.parametrize(
    ("codec", "charset", "lead"),
    [("utf-16-be", "utf-16", b""), ("utf-16-be", "utf-16-le", b""), ("utf-16-le", "utf-16", b"\n")],
    ids=["BE as utf-16", "BE as utf-16-le", "LE a byte off"],
)
async def test_loki_a_400_echoing_the_token_in_utf16_of_the_other_byte_order_has_it_scrubbed(
    codec: str, charset: str, lead: bytes
) -> None:
    """The review's scenario: a front echoes the push's headers in UTF-16 big-endian without a BOM.
    Before: the REJECT reason (logged, dead-lettered) held the token byte-swapped, given back whole by
    re-encoding it in one byte order and reading it in the other."""
    async with (
        LokiReceiver() as loki,
        Widening(loki.url, codec, charset, lead) as front,
        loki_sink(front.url, bearer_token=TOKEN) as sink,
    ):
        loki.fail_next(400, message="refused", echo=True)
        outcomes = await sink.send(recent(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert "Authorization: ****" in outcome.reason
    for form, other in (("utf-16-le", "utf-16-be"), ("utf-16-be", "utf-16-le")):
        assert TOKEN not in outcome.reason.encode(form, "ignore").decode(other, "ignore")
    assert TOKEN[:6] not in outcome.reason


WIDE_HONOURED = [
    ("utf-16-le", "utf-16-le", "エントリ"),  # no NULs: the label's byte order
    ("utf-16-be", "utf-16-be", "エントリ"),
    ("utf-16", "utf-16", "entrée refusée"),  # Python's: a BOM
    ("UTF-16LE", "utf-16-le", "entrée refusée"),
    ("utf-32-be", "utf-32-be", "entrée refusée"),
    ("utf-32", "utf-32", "entrée refusée"),
]


@pytest.mark.parametrize(("charset", "codec", "text"), WIDE_HONOURED, ids=[c for c, _, _ in WIDE_HONOURED])
def test_a_wide_body_in_the_charset_its_label_names_is_read_in_it(
    charset: str, codec: str, text: str
) -> None:
    """A guard: correctly labelled, as before."""
    assert answer_text(text.encode(codec), charset) == text


# -- F3: every charset item 319 lists is honoured ------------------------------------------------------

DOCUMENTED = {
    "UTF-8": "utf-8",
    "US-ASCII": "ascii",
    **{f"ISO-8859-{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)},
    **{f"windows-{n}": f"cp{n}" for n in range(1250, 1259)},
    "KOI8-R": "koi8-r",
    "KOI8-U": "koi8-u",
    "IBM866": "cp866",
    "windows-874": "cp874",
    "dos-874": "cp874",  # WHATWG's
    "macintosh": "mac-roman",
    "x-mac-roman": "mac-roman",  # WHATWG's
    "x-mac-cyrillic": "mac-cyrillic",
    "EUC-JP": "euc-jp",
    "EUC-KR": "euc-kr",
    "GB2312": "gb2312",
}
"""Item 319's list of charsets honoured (ISO-8859-12 was never assigned), with their Python codecs."""


@pytest.mark.parametrize(("charset", "codec"), DOCUMENTED.items(), ids=list(DOCUMENTED))
def test_every_documented_charset_is_honoured(charset: str, codec: str) -> None:
    """Before: windows-874, dos-874, x-mac-roman and x-mac-cyrillic were read as UTF-8."""
    body = b"entry refused: " + bytes(range(0x80, 0x100))
    assert answer_text(body, charset) == body.decode(codec, "replace")
    assert answer_text(body, charset.lower()) == body.decode(codec, "replace")
