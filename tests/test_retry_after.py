"""``eventrouter.parse_retry_after``: the one Retry-After parser every sink uses."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from eventrouter import parse_retry_after

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),  # not RFC delta-seconds, but some servers write it
        ("-5", 0.0),  # a delay in the past: at once
        ("1e3", 1000.0),
        ("86400000", 86_400_000.0),  # huge but a number: the engine caps what it waits
        (formatdate(NOW + 120, usegmt=True), 120.0),  # IMF-fixdate
        (formatdate(NOW - 120, usegmt=True), 0.0),  # in the past
        ("Tuesday, 14-Nov-23 22:15:20 GMT", 120.0),  # RFC 850
        ("Tue Nov 14 22:15:20 2023", 120.0),  # asctime: no zone, GMT (not the local time)
        ("Tue, 14 Nov 2023 22:15:20 +0000", 120.0),
    ],
)
def test_delta_seconds_and_http_dates_are_seconds_from_now(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "inf",
        "Infinity",
        "-inf",
        "nan",
        "NaN",
        "1e400",  # a float's overflow: inf
        "9" * 400,
        "1_000",  # float() takes these; no server means them
        "\uff13",  # a fullwidth 3
        # Dates no datetime can hold: OverflowError out of email.utils (and out of send, before).
        "Mon, 01 Jan 99999999999 00:00:00 GMT",
        "Fri, 31 Dec 99999999999999999999 23:59:59 GMT",
        "Mon, 01 Jan 2024 99999999999:00:00 GMT",
        # ValueError, IndexError, TypeError of the date parser.
        "Mon, 32 Jan 2024 00:00:00 GMT",
        "Mon, 01 Jan 2024 00:00:00 +99999999999",
        "1 Jan 2024",
        "Mon, 01 Jan",
        "Mon,",
        ",",
        "\x00",
    ],
)
def test_anything_else_is_none_and_never_raises(value: str | None) -> None:
    """The destination's text: whatever it is, the sink's own backoff applies. An exception here
    escaped ``send`` and the engine sent the whole batch again (every event already taken in it
    went in once more)."""
    assert parse_retry_after(value, now=NOW) is None
    assert parse_retry_after(value) is None  # against the clock too


def test_a_date_without_now_is_counted_from_the_clock() -> None:
    later = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT")
    assert later is not None and later > 200 * 365 * 86400
