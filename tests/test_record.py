"""The occurrence model and the normalised record, checked against real recorded traffic."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from eventrouter.record import event_time_ns, format_time_ns, normalise, occurrence_number, parse_time_ns
from eventrouter.source.tracker import OccurrenceTracker
from eventrouter.testing import event_object, recorded_list, recorded_watch


def test_time_parsing_keeps_sub_second_precision() -> None:
    assert parse_time_ns("2026-11-22T01:29:03.311521Z") == 1795310943311521000
    assert parse_time_ns("2026-11-22T01:29:03Z") == 1795310943000000000
    assert parse_time_ns("2026-11-22T01:29:03.123456789Z") == 1795310943123456789
    assert format_time_ns(1795310943311521000) == "2026-11-22T01:29:03.311521Z"


def test_null_and_year_one_times_are_skipped_in_the_chain() -> None:
    assert parse_time_ns(None) is None
    assert parse_time_ns("0001-01-01T00:00:00Z") is None
    obj = event_object(count=None, event_time="2026-11-22T01:29:03.311521Z")
    obj["lastTimestamp"] = "0001-01-01T00:00:00Z"
    assert event_time_ns(obj) == 1795310943311521000


def test_a_time_whose_offset_takes_it_out_of_range_is_no_time() -> None:
    """Valid as written, past year 9999 (or before year 1) in UTC: formatting it raised
    OverflowError, which dropped the whole event (and stopped a replay)."""
    assert parse_time_ns("9999-12-31T23:59:59-01:00") is None
    assert parse_time_ns("0001-01-01T00:30:00+01:00") is None
    assert parse_time_ns("2026-01-01T00:00:00+01:00") == parse_time_ns("2025-12-31T23:00:00Z")
    obj = event_object(count=None, event_time="2026-11-22T01:29:03.311521Z")
    obj["lastTimestamp"] = "9999-12-31T23:59:59-01:00"
    assert event_time_ns(obj) == 1795310943311521000  # the next time in the chain


def test_time_chain_order() -> None:
    obj = event_object(
        count=3,
        first_timestamp="2026-11-22T01:00:00Z",
        last_timestamp="2026-11-22T01:10:00Z",
        event_time="2026-11-22T01:05:00.5Z",
    )
    assert format_time_ns(event_time_ns(obj) or 0) == "2026-11-22T01:10:00Z"
    obj["series"] = {"count": 4, "lastObservedTime": "2026-11-22T01:20:00.250000Z"}
    assert format_time_ns(event_time_ns(obj) or 0) == "2026-11-22T01:20:00.25Z"
    assert occurrence_number(obj) == 4


def test_event_time_only_events_flow_like_any_other() -> None:
    occ = normalise(event_object(count=None, event_time="2026-11-22T01:29:03.311521Z"), cluster="c")
    assert occ.number == 1
    assert occ.record["time"] == "2026-11-22T01:29:03.311521Z"
    assert occ.record["time_source"] == "event"


def test_recorded_watch_yields_exactly_its_126_occurrences() -> None:
    tracker = OccurrenceTracker(cluster="rec")
    occurrences = []
    for line in recorded_watch():
        if line["type"] == "DELETED":
            tracker.deleted(line["object"])
            continue
        occ = tracker.observe(line["object"])
        if occ is not None:
            occurrences.append(occ)
    assert len(occurrences) == 126
    assert len({o.key for o in occurrences}) == 126
    event_time_only = [
        o for o in occurrences if o.raw["firstTimestamp"] is None and o.raw["lastTimestamp"] is None
    ]
    assert len(event_time_only) == 35
    assert all(o.record["time"].startswith("2026-11-22T01:") for o in occurrences)
    # Series-raised repeats (events.k8s.io recorder) count like core `count` raises.
    series = [o for o in occurrences if o.record["series"]]
    assert series and {o.number for o in series} >= {2, 3, 4}


def test_modified_without_a_raise_is_not_a_new_occurrence() -> None:
    tracker = OccurrenceTracker()
    obj = event_object(count=2)
    assert tracker.observe(obj) is not None
    same = {**obj, "message": "edited"}
    assert tracker.observe(same) is None
    jumped = {**obj, "count": 7}
    occ = tracker.observe(jumped)
    assert occ is not None and occ.number == 7


def test_record_layout_is_stable() -> None:
    occ = normalise(recorded_list()["items"][0], cluster="prod")
    assert set(occ.record) == {
        "schema", "cluster", "uid", "name", "namespace", "occurrence", "count", "time", "time_source",
        "first_time", "last_time", "type", "reason", "message", "action", "involved_object",
        "reporting_component", "reporting_instance", "source_component", "source_host", "series",
        "resource_version", "labels", "annotations",
    }  # fmt: skip
    assert set(occ.record["involved_object"]) == {
        "kind",
        "namespace",
        "name",
        "uid",
        "api_version",
        "field_path",
    }
    assert occ.to_dict(include_raw=True)["raw"] == occ.raw
    assert "managedFields" not in occ.raw["metadata"]  # server bookkeeping is not kept
    assert orjson.loads(occ.encode(include_raw=True)) == {**occ.record, "raw": occ.raw}


def test_malformed_objects_raise_clear_errors() -> None:
    import pytest

    from eventrouter.record import MalformedEvent

    with pytest.raises(MalformedEvent, match=r"no metadata\.uid"):
        normalise({"metadata": {"name": "x", "namespace": "y"}})
    with pytest.raises(MalformedEvent, match="not an object"):
        normalise([])  # type: ignore[arg-type]
    # Wrong types in optional fields do not break the record.
    occ = normalise({"metadata": {"uid": "u"}, "count": "three", "message": 12, "involvedObject": "pod"})
    assert occ.number == 1 and occ.record["message"] == "12" and occ.record["time_source"] == "received"


def test_fast_time_paths_agree_with_the_reference_parsers() -> None:
    import random

    from eventrouter.record import _format_cached, _parse_cached

    odd = [
        "2026-11-22T01:29:03.311521Z", "2026-11-22T01:29:03Z", "0001-01-01T00:00:00Z",
        "2026-11-22T01:29:03.123456789Z", "2026-11-22T01:29:03+02:00", "2026-11-22T01:29:03.5Z",
        "bad", "", None, "2026-11-22T01:29:03.Z", "2026-11-22T01:29:03.12a4Z", "2026-11-22 01:29:03Z",
    ]  # fmt: skip
    for text in odd:
        assert _parse_cached(text) == parse_time_ns(text), text
    rng = random.Random(7)
    for _ in range(20_000):
        ns = rng.randrange(0, 4_000_000_000 * 10**9)
        assert _format_cached(ns) == format_time_ns(ns)
        assert _parse_cached(format_time_ns(ns)) == ns


_TIME_FIELDS = ("lastTimestamp", "eventTime", "firstTimestamp")
# The API server's forms, and near misses: every character of them may be swapped for another.
_TIME_SHAPES = ("2026-11-22T01:29:03Z", "2026-11-22T01:29:03.311521Z", "2026-11-22T01:29:03.311520Z")
_SWAPS = "0123456789-:.TZz+ ²٣x"


def _reference_times(obj: dict[str, object]) -> tuple[int | None, str | None]:
    """(time ns, first_time text) by the reference parsers, as the record defines them."""
    first = parse_time_ns(obj.get("firstTimestamp")) or parse_time_ns(obj.get("eventTime"))
    return event_time_ns(obj), format_time_ns(first) if first else None


@given(
    st.lists(
        st.tuples(
            st.sampled_from((*_TIME_FIELDS, "series")),
            st.sampled_from(_TIME_SHAPES),
            st.lists(st.tuples(st.integers(0, 26), st.sampled_from(_SWAPS)), max_size=2),
        ),
        max_size=4,
    )
)
@settings(max_examples=400, deadline=None)
def test_record_times_agree_with_the_reference_parsers(
    fields: list[tuple[str, str, list[tuple[int, str]]]],
) -> None:
    """The record's cached time paths give what parse_time_ns/format_time_ns give, for the API
    server's forms and for strings one or two characters away from them (which must never raise)."""
    obj: dict[str, object] = {"metadata": {"uid": "u", "creationTimestamp": "2026-11-22T00:00:00Z"}}
    for field, shape, swaps in fields:
        text = list(shape)
        for at, char in swaps:
            if at < len(text):
                text[at] = char
        value = "".join(text)
        if field == "series":
            obj["series"] = {"count": 2, "lastObservedTime": value}
        else:
            obj[field] = value
    occ = normalise(obj)
    time_ns, first_time = _reference_times(obj)
    assert occ.time_ns == time_ns
    assert occ.record["time"] == format_time_ns(occ.time_ns)
    assert occ.record["first_time"] == first_time


def test_record_times_agree_on_recorded_traffic() -> None:
    for line in recorded_watch():
        obj = line["object"]
        occ = normalise(obj)
        time_ns, first_time = _reference_times(obj)
        assert (occ.time_ns, occ.record["time"], occ.record["first_time"]) == (
            time_ns,
            format_time_ns(time_ns or 0),
            first_time,
        )


def test_times_with_non_ascii_digits_are_unparsable_not_errors() -> None:
    """ "²" passes str.isdigit but int() refuses it: such a time once raised ValueError from
    normalise, which broke the watch stream on every reconnect."""
    assert parse_time_ns("2026-11-22T01:29:03.²Z") is None
    occ = normalise({"metadata": {"uid": "u"}, "lastTimestamp": "2026-11-22T01:29:03.²Z"}, received_at=5.0)
    assert occ.record["time_source"] == "received"
