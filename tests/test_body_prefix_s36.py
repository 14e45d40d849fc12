"""An answer's charset label, session 36's review (review-a F1-F3 on item 301's ``answer_text``).

- F1: ``charset=punycode`` was honoured: its decode is quadratic, a 128 KiB Loki answer so labelled
  blocked the event loop 7.8 s (2 MiB: ~35 min). ``idna`` was read as UTF-8 only because it raises.
- F2: every label was handed to ``codecs.lookup``, whose search function keeps every unknown name for
  the life of the process: a front varying the label per answer grew the router without bound.
- F3: an echoed credential under a mislabelled charset (utf-7, utf-16-le, cp037; a lead byte of
  Shift_JIS or GBK before it) decoded to other characters: the scrub, which looks at the text, missed
  it, and the REJECT reason (logged, dead-lettered) quoted it re-encodable.

Only a fixed set of charsets is honoured now, by their normalised name; any other label reads as UTF-8.
Against the real Loki sink and the project's test Loki (``fail_next(echo=True)``, ``charset_next``)."""

from __future__ import annotations

import encodings
import importlib
import itertools

import pytest
from body_helpers import ECHO_BYTES, TOKEN, loki_sink, recent

from eventrouter import OutcomeKind
from eventrouter.body_prefix import _ASCII_COMPATIBLE, answer_text
from eventrouter.scrub import scrub
from eventrouter.testing.receivers.loki import LokiReceiver


def utf8(data: bytes) -> str:
    """``data`` as an unlabelled answer reads."""
    return data.decode("utf-8", "replace")


# -- F1: punycode is not honoured ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "body"),
    [
        ("punycode", b"a-" + b"9" * 4096),  # quadratic: each digit multiplies a growing integer
        ("punycode", b"-" + b"ba" * 2048),  # quadratic: each insertion rebuilds the string
        ("punycode", b"bcher-kva"),
        ("PUNYCODE", b"bcher-kva"),
    ],
    ids=["digits", "insertions", "punycode", "PUNYCODE"],
)
def test_a_punycode_label_is_read_as_utf8(charset: str, body: bytes) -> None:
    """Before: decoded by the label ("bcher-kva" read "bücher"; "a-999…" in quadratic time, 7.8 s at
    128 KiB on the event loop)."""
    assert answer_text(body, charset) == utf8(body)


@pytest.mark.parametrize("charset", ["idna", "IDNA", "'idna'"])
def test_an_idna_label_is_read_as_utf8(charset: str) -> None:
    """A guard: idna decodes punycode labels too (up to 1,024 characters each); it was read as UTF-8
    before only because it raises with ``errors="replace"``."""
    body = b"xn--bcher-kva.example " + b"xn--" + b"a-" + b"9" * 1000
    assert answer_text(body, charset) == utf8(body)


# -- F2: the codec registry is never asked a peer's label ----------------------------------------------


def test_distinct_unknown_labels_leave_the_codec_cache_unchanged() -> None:
    """Before: each distinct unknown label added an entry to ``encodings._cache``, kept for ever (the
    review: 4,000 pushes with 4,033-character labels, +4,000 entries and +17.5 MiB)."""
    cache: dict[str, object] = vars(encodings)["_cache"]
    body = b"entry too far behind"
    for charset in ("utf-8", "iso-8859-1", "windows-1252", "euc-jp", "utf-16", "no-such"):
        answer_text(body, charset)  # the charsets honoured, each looked up once at most
    before = len(cache)
    labels = [f"x-charset-{i}" for i in range(500)] + [f"{i:04d}" + "y" * 1000 for i in range(500)]
    for charset in labels:
        assert answer_text(body, charset) == utf8(body)
    assert len(set(labels)) == 1000
    assert len(cache) == before


# -- F3: an echoed credential is in the text, whatever the label ---------------------------------------

MISLABELLED = [
    ("utf-7", ECHO_BYTES),
    ("utf-16-le", ECHO_BYTES),
    ("utf-16", ECHO_BYTES),
    ("utf-16-be", ECHO_BYTES),
    ("utf-32", ECHO_BYTES),
    ("cp037", ECHO_BYTES),
    ("cp500", ECHO_BYTES),
    # A lead byte whose trail-byte range holds ASCII letters, just before the token: its first letter
    # was taken into a double-byte character.
    ("shift_jis", ECHO_BYTES.replace(b"Bearer ", b"Bearer \x81")),
    ("cp932", ECHO_BYTES.replace(b"Bearer ", b"Bearer \x81")),
    ("gbk", ECHO_BYTES.replace(b"Bearer ", b"Bearer \x81")),
    ("gb18030", ECHO_BYTES.replace(b"Bearer ", b"Bearer \x81")),
    ("big5", ECHO_BYTES.replace(b"Bearer ", b"Bearer \xa1")),
    ("cp949", ECHO_BYTES.replace(b"Bearer ", b"Bearer \x81")),
    ("iso-2022-jp", ECHO_BYTES.replace(b"Bearer ", b"Bearer \x1b$B")),  # ASCII is double-byte after ESC $ B
]


@pytest.mark.parametrize(("charset", "body"), MISLABELLED, ids=[charset for charset, _ in MISLABELLED])
def test_a_secret_echoed_under_a_mislabelled_charset_is_in_the_text_and_scrubbed(
    charset: str, body: bytes
) -> None:
    """Before: decoded by the label, the token was not in the text, the scrub found nothing, and the
    text re-encoded in the label gave it back."""
    text = answer_text(body, charset)
    assert TOKEN in text
    assert text == utf8(body)
    shown = scrub(text, [TOKEN])
    assert TOKEN not in shown and shown.endswith("****\n")


@pytest.mark.parametrize("charset", ["utf-7", "utf-16-le", "cp037"])
async def test_loki_a_400_echoing_the_token_under_a_mislabelled_charset_has_it_scrubbed(charset: str) -> None:
    """The review's scenario: a front echoes the push's headers in a 400 labelled ``charset``. Before:
    the REJECT reason held the token in clear (utf-7, up to its "+") or re-encodable (utf-16-le,
    cp037)."""
    async with LokiReceiver() as loki, loki_sink(loki.url, bearer_token=TOKEN) as sink:
        loki.fail_next(400, message="refused", echo=True)
        loki.charset_next(1, charset)
        outcomes = await sink.send(recent(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert outcome.reason.endswith("Authorization: ****")
    for form in ("utf-16-le", "utf-16-be", "utf-7", "cp037", "cp500"):
        assert TOKEN not in outcome.reason.encode(form, "ignore").decode("latin-1"), form
    assert TOKEN[:6] not in outcome.reason


# -- Guards: what is still honoured --------------------------------------------------------------------


HONOURED = [
    ("ISO-8859-1", "latin-1", "entrée refusée"),
    ('"windows-1252"', "cp1252", "entrée – refusée"),
    ("koi8-r", "koi8-r", "запись отклонена"),
    ("EUC-JP", "euc-jp", "エントリが古すぎます"),
    ("euc-kr", "euc-kr", "항목이 너무 오래됨"),
    ("GB2312", "gb2312", "条目太旧"),
    ("us-ascii", "ascii", "entry too far behind"),
    ("utf-16", "utf-16", "Authorization: Bearer " + TOKEN),  # no two ASCII bytes side by side
    ("UTF-16LE", "utf-16-le", "entrée refusée"),
    ("utf-32-be", "utf-32-be", "entrée refusée"),
]


@pytest.mark.parametrize(("charset", "codec", "text"), HONOURED, ids=[charset for charset, _, _ in HONOURED])
def test_a_body_in_the_charset_its_label_names_is_read_in_it(charset: str, codec: str, text: str) -> None:
    assert answer_text(text.encode(codec), charset) == text


def test_every_ascii_compatible_charset_keeps_a_run_of_ascii_whatever_comes_before() -> None:
    """What the set of charsets honoured rests on: every ASCII byte decodes to itself, and no byte of
    0x80-0xFF before an ASCII run (a lead byte: two of them for a multi-byte charset) takes its first
    character. Shift_JIS, GBK, Big5 or UHC fail this (``MISLABELLED``)."""
    ascii_bytes = bytes(range(128))
    one = [bytes([b]) for b in range(0x80, 0x100)]
    two = one + [bytes(p) for p in itertools.product(range(0x80, 0x100), repeat=2)]
    multi_byte = [
        codec
        for codec in _ASCII_COMPATIBLE
        if codec not in ("ascii", "latin_1")
        and not hasattr(importlib.import_module(f"encodings.{codec}"), "decoding_table")
    ]
    assert multi_byte == ["utf_8", "euc_jp", "euc_kr", "gb2312"]  # the others: a table of 256 characters
    for codec in _ASCII_COMPATIBLE:
        assert ascii_bytes.decode(codec, "replace") == ascii_bytes.decode("ascii"), codec
        for first in "sA0+/-~":
            run = first + TOKEN
            leads = two if codec in multi_byte else one
            assert all(run in answer_text(lead + run.encode(), codec) for lead in leads), (codec, first)
