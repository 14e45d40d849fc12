"""The sls sink's fast log encoder against its definition (``log_contents`` + ``encode_log``).

``SLSSink._encode`` takes the fast path (``encode_occurrence``) and ``SLSSink._encode_contents`` is the
definition; both must give the same bytes, or the same outcome, for every occurrence. The official
aliyun-log-python-sdk protobuf classes read what the fast path writes.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import cramjam
import pytest
from aliyun.log.log_logs_pb2 import LogGroup  # type: ignore[attr-defined]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventrouter import Occurrence, SinkContext, normalise
from eventrouter.protowire import bytes_field
from eventrouter.testing import make_occurrence, recorded_watch
from eventrouter_sinks._sls_log import encode_log, encode_occurrence, log_contents
from eventrouter_sinks.sls import SLSOptions, SLSSink

NOW = time.time()


def sink(clamp_time: bool = True) -> SLSSink:
    options = SLSOptions.model_validate(
        {"url": "http://127.0.0.1:9", "project": "p", "logStore": "l", "clamp_time": clamp_time}
    )
    return SLSSink(
        options, SinkContext(name="sls", cluster="c1", data_dir=None, logger=logging.getLogger("t"))
    )


def outcome(encode: Any, occ: Occurrence, now: float) -> object:
    try:
        return encode(occ, now)
    except Exception as exc:  # the exception is part of the outcome (send turns it into a reject)
        return ("raised", type(exc).__name__, str(exc))


def assert_same(occ: Occurrence, now: float = NOW) -> None:
    for s in (sink(True), sink(False)):
        assert outcome(s._encode, occ, now) == outcome(s._encode_contents, occ, now)


def recorded() -> list[Occurrence]:
    return [normalise(item["object"], cluster="c1") for item in recorded_watch() if item["type"] != "DELETED"]


def test_fast_path_takes_every_recorded_occurrence_and_matches_the_definition() -> None:
    occurrences = recorded()
    for occ in occurrences:
        seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
        fast = encode_occurrence(occ, seconds, nanos, False)
        # normalise's record layout is the one the fast path knows: a layout change must update it.
        assert fast is not None
        assert fast == bytes_field(1, encode_log(seconds, nanos, log_contents(occ)))
        assert_same(occ)
        assert_same(occ, NOW + 30 * 86400)  # clamped (time_adjusted), or dead-lettered without clamping


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "Pod", "message": "容器反复崩溃，正在重启 " + "x" * 20_000},  # 3-byte lengths
        {"kind": "Pod", "object_name": "w" * 200, "message": "m" * 130},  # two-byte lengths in the text
        {"kind": "Node", "object_name": "n" * 300, "message": ""},
        {"kind": "Pod", "object_name": "w" * 400},  # past the name table: the definition's path
        {"reason": "重启", "host": "节点-1"},  # non-ASCII in cached fields
        {"count": None, "series_count": 5000, "event_time": "2026-11-21T00:00:00.5Z"},
        {"first_timestamp": "2026-11-21T00:00:00Z", "last_timestamp": "2026-11-21T00:05:00Z"},
        {"record": {"labels": {"app": "web"}, "annotations": {"note": "注释"}}},
        {"record": {"labels": {"app": "web"}}},
        {"message": "broken \ud800 surrogate"},  # invalid UTF-8: rejected by the definition
        {"reason": "bad \udcff"},
    ],
)
def test_unusual_occurrences_match_the_definition(kwargs: dict[str, Any]) -> None:
    kwargs = dict(kwargs)
    changes = kwargs.pop("record", {})
    occ = make_occurrence(cluster="c1", **kwargs)
    occ.record.update(changes)  # this test's own occurrence
    assert_same(occ)


def test_official_protobuf_reads_the_fast_path() -> None:
    occ = make_occurrence(cluster="c1", kind="Pod", object_name="p" * 200, message="消息 " + "y" * 20_000)
    seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
    log = encode_occurrence(occ, seconds, nanos, True)
    assert log is not None
    group = LogGroup.FromString(log)
    (parsed,) = group.Logs
    fields = {c.Key: c.Value for c in parsed.Contents}
    assert parsed.Time == seconds and parsed.Time_ns == nanos
    assert [c.Key for c in parsed.Contents] == [key for key, _ in log_contents(occ)] + ["time_adjusted"]
    assert fields["message"] == occ.record["message"] and fields["pod_name"] == "p" * 200
    assert fields["eventId"] == occ.raw_json.decode() and fields["time_adjusted"] == "true"


_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=2**40),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.sampled_from(["", "Pod", "x" * 127, "x" * 128, "é" * 70, "\ud800"]),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    st.lists(st.integers(), max_size=2),
)
_BASE = recorded()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(_BASE) - 1),
    changes=st.lists(st.tuples(st.integers(min_value=0, max_value=40), _ODD), max_size=4),
    shuffle=st.booleans(),
    time_offset=st.sampled_from([0, -8 * 86400, 3600, -(10**12)]),
)
def test_any_record_values_match_the_definition(
    index: int, changes: list[tuple[int, Any]], shuffle: bool, time_offset: int
) -> None:
    base = _BASE[index]
    record = copy.deepcopy(base.record)
    for position, value in changes:
        involved = record["involved_object"]
        if position < len(record):
            record[list(record)[position]] = value
        elif isinstance(involved, dict) and involved:
            involved[list(involved)[position % len(involved)]] = value
    if shuffle:
        record = dict(reversed(record.items()))
    occ = Occurrence(
        uid=base.uid,
        number=base.number,
        time_ns=base.time_ns + time_offset * 1_000_000_000,
        record=record,
        raw_json=base.raw_json,
    )
    assert_same(occ)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "Pod", "object_name": "w" * 200},
        {"reason": "重启", "host": "节点-1", "message": "容器 " * 5000},
    ],
)
def test_fast_path_keeps_long_names_and_non_ascii_fields(kwargs: dict[str, Any]) -> None:
    occ = make_occurrence(cluster="集群", **kwargs)
    seconds, nanos = divmod(occ.time_ns, 1_000_000_000)
    fast = encode_occurrence(occ, seconds, nanos, False)
    assert fast is not None
    assert fast == bytes_field(1, encode_log(seconds, nanos, log_contents(occ)))


def test_lz4_body_is_the_plain_block_compression_whatever_came_before() -> None:
    s = sink()
    small, big = b"abc" * 100, bytes(range(256)) * 8000 + b"z" * 100_000
    for raw in (small, big, small, b"", big[:5000]):  # the kept buffer grows, and is reused smaller
        assert s._compress(raw) == (bytes(cramjam.lz4.compress_block(raw, store_size=False)), "lz4")
        assert bytes(cramjam.lz4.decompress_block(s._compress(raw)[0], output_len=len(raw))) == raw
