"""What ``eventrouter replay`` reads: every accepted shape, and JSON lines read one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from eventrouter.source.recording import read_recording
from eventrouter.testing import event_object, recorded_list

DATA = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"


def _lines(text: str) -> list[bytes]:
    return [line + b"\n" for line in text.encode().split(b"\n")]


def test_json_lines_are_read_one_at_a_time() -> None:
    lines = (DATA / "watch-core-v1.jsonl").read_bytes().splitlines(keepends=True)
    pulled = 0

    def source() -> Iterator[bytes]:
        nonlocal pulled
        for line in lines:
            pulled += 1
            yield line

    items = read_recording(source())
    first = next(items)
    assert pulled == 1 and first[0] == "ADDED"
    assert sum(1 for _ in items) + 1 == len(lines)
    assert pulled == len(lines)


def test_every_shape_gives_the_events_with_markers_for_dead_letters_and_broken_lines() -> None:
    listing = recorded_list()
    events = listing["items"][:2]
    dead = {"sink": "es", "reason": "400 x", "key": "u/1", "record": {"cluster": "c1"}, "event": events[0]}
    old_dead = {"sink": "es", "reason": "400 x", "key": "u/2", "record": {"cluster": "c1"}}
    shapes = {
        "pretty-printed List": json.dumps(listing, indent=2),
        "one-line List": json.dumps(listing),
    }
    for name, text in shapes.items():
        got = list(read_recording(_lines(text)))
        assert got == [("LIST", item) for item in listing["items"]], name
    lines = "\n".join(
        [
            json.dumps({"type": "MODIFIED", "object": events[0]}),
            "",
            json.dumps(events[1]),
            "not json",
            json.dumps(dead),
            json.dumps(old_dead),
            json.dumps({"kind": "EventList", "items": [events[1]]}),
        ]
    )
    assert list(read_recording(_lines(lines))) == [
        ("MODIFIED", events[0]),
        ("LIST", events[1]),
        ("MALFORMED", None),
        ("DEADLETTER", ("es", "c1")),
        ("LIST", events[0]),
        ("DEADLETTER", ("es", "c1")),
        ("MALFORMED", None),
        ("LIST", events[1]),
    ]


def test_a_first_line_that_is_not_json_still_reads_the_rest_as_lines() -> None:
    good = event_object(object_name="after-junk")
    got = list(read_recording(_lines("junk\n" + json.dumps(good))))
    assert got == [("MALFORMED", None), ("LIST", good)]
