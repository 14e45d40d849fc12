"""What ``eventrouter replay`` reads: every accepted shape, and JSON lines read one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from eventrouter.source.recording import read_recording
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.testing import event_object, recorded_list, recorded_watch

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


def test_a_torn_first_line_costs_that_line_and_the_rest_is_read_one_line_at_a_time() -> None:
    """A first line cut short (a torn write, `tail -c`, a pasted excerpt) made the reader take the
    file for one document over several lines and read it whole: 9.5x the RSS of the same file
    without it (~1 GiB for a 100 MiB recording)."""
    lines = (DATA / "watch-core-v1.jsonl").read_bytes().splitlines(keepends=True)
    torn = [lines[0][: len(lines[0]) // 2] + b"\n", lines[0][len(lines[0]) // 2 :], *lines]
    pulled = 0

    def source() -> Iterator[bytes]:
        nonlocal pulled
        for line in torn:
            pulled += 1
            yield line

    items = read_recording(source())
    assert next(items) == ("MALFORMED", None) and next(items) == ("MALFORMED", None)
    first = next(items)
    assert pulled == 3 and first == ("ADDED", json.loads(lines[0])["object"])
    assert sum(1 for _ in items) + 1 == len(lines)
    # kubectl's pretty-printed objects cut at the top: the torn object's lines are counted, and every
    # object after them is read.
    items_ = recorded_list()["items"][:3]
    pretty = [json.dumps(item, indent=4) for item in items_]
    text = "\n".join([pretty[0][len(pretty[0]) // 2 :], pretty[1], pretty[2]])
    got = list(read_recording(_lines(text)))
    assert got[-2:] == [("LIST", items_[1]), ("LIST", items_[2])]
    assert {kind for kind, _ in got[:-2]} == {"MALFORMED"}


def _file(name: str) -> list[bytes]:
    return (DATA / name).read_bytes().splitlines(keepends=True)


def _occurrences(items: Iterable[tuple[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """What a replay routes: each event through the tracker, as ``Router.replay`` does."""
    tracker = OccurrenceTracker(cluster="rec")
    found = {}
    for kind, obj in items:
        if kind == "DELETED":
            tracker.deleted(obj)
        elif kind in ("ADDED", "MODIFIED", "LIST"):
            occ = tracker.observe(obj)
            if occ is not None:
                found[(occ.uid, occ.number)] = occ.record
    return found


def test_an_events_k8s_io_recording_gives_the_occurrences_and_records_of_the_core_v1_one() -> None:
    """The same traffic watched through /apis/events.k8s.io/v1: read as core/v1, `note`, `regarding`
    and `deprecatedCount` were lost (102 occurrences of 126, every message and involved object empty)."""
    core = _occurrences(read_recording(_file("watch-core-v1.jsonl")))
    events = _occurrences(read_recording(_file("watch-events-v1.jsonl")))
    assert len(core) == 126
    assert events.keys() == core.keys()
    assert all(r["message"] and r["involved_object"]["kind"] for r in events.values())
    assert events == core  # every field of every record
    # An API server's list response names the version once, on the List; v1beta1 has v1's names.
    last: dict[str, dict[str, Any]] = {}
    for line in recorded_watch("events-v1"):
        last[line["object"]["metadata"]["uid"]] = line["object"]
    bare = [{k: v for k, v in obj.items() if k not in ("apiVersion", "kind")} for obj in last.values()]
    for version in ("events.k8s.io/v1", "events.k8s.io/v1beta1"):
        listing = json.dumps({"kind": "EventList", "apiVersion": version, "items": bare})
        read = [obj for _, obj in read_recording(_lines(listing))]
        assert [o["message"] for o in read] == [o["note"] for o in last.values()], version
        assert [o["involvedObject"] for o in read] == [o["regarding"] for o in last.values()]
        assert [o.get("count") for o in read] == [o.get("deprecatedCount") for o in last.values()]


def test_kubectl_watch_output_of_pretty_printed_objects_one_after_another_is_read() -> None:
    """`kubectl get events -A -w -o json` writes each object pretty-printed, one after another: neither
    one document nor JSON lines, and the replay delivered nothing (every line "not JSON")."""
    items = recorded_list()["items"]
    kubectl = "".join(json.dumps(item, indent=4) + "\n" for item in items)
    assert list(read_recording(_lines(kubectl))) == [("LIST", item) for item in items]
    # With --output-watch-events: watch events; and values may share a line.
    watched = recorded_watch()[:3]
    text = (
        json.dumps(watched[0], indent=4) + json.dumps(watched[1]) + "\n\n" + json.dumps(watched[2], indent=2)
    )
    assert list(read_recording(_lines(text))) == [(w["type"], w["object"]) for w in watched]
    # A broken object (an edit, a cut) costs that object: the next one is read, and a last one cut
    # short (kubectl stopped mid-write) is counted.
    pretty = [json.dumps(item, indent=4) for item in items[:4]]
    broken = pretty[1].replace('"reason":', '"reason"', 1)
    text = "\n".join([pretty[0], broken, pretty[2], pretty[3][: len(pretty[3]) // 2]])
    assert list(read_recording(_lines(text))) == [
        ("LIST", items[0]),
        ("MALFORMED", None),
        ("LIST", items[2]),
        ("MALFORMED", None),
    ]
