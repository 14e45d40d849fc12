"""Cutting a message so that an encoded event fits a destination's limit (Loki lines, Kafka records)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from eventrouter.record import normalise
from eventrouter.testing import event_object, make_occurrence
from eventrouter.truncate import cut_utf8, shorten_message


@pytest.mark.parametrize(
    "message",
    ["x" * 5000, '"' * 5000, "\x01" * 5000, "事件" * 3000],
    ids=["ascii", "quotes", "control", "cjk"],
)
def test_a_shortened_message_fits_the_limit_uses_its_room_and_keeps_json_valid(message: str) -> None:
    occ = make_occurrence(message=message)

    def render(cut: dict[str, Any]) -> bytes:
        return orjson.dumps({**occ.record, **cut})

    out = shorten_message(occ, len(occ.json), 2048, render)
    assert out is not None and 1536 < len(out) <= 2048
    record = orjson.loads(out)
    assert record["truncated"] is True and record["original_bytes"] == len(occ.json)
    assert record["message"].endswith("…") and message.startswith(record["message"][:-1])
    assert shorten_message(occ, len(occ.json), 2048, render) == out  # a retry sends the same bytes


def test_none_when_the_rest_of_the_event_is_too_large_on_its_own() -> None:
    obj = event_object(message="short")
    obj["metadata"]["annotations"] = {"big": "z" * 5000}
    occ = normalise(obj)
    assert shorten_message(occ, len(occ.json), 2048, lambda cut: orjson.dumps({**occ.record, **cut})) is None


def test_cut_utf8_never_splits_a_character() -> None:
    assert cut_utf8("事件".encode(), 4) == "事".encode()
    assert cut_utf8(b"abc", 10) == b"abc"
