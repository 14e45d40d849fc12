"""The Loki sink's protobuf encoder and its caches, decoded field by field (no network)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import cramjam
from hypothesis import given, settings
from hypothesis import strategies as st

from eventrouter import Occurrence, SinkContext
from eventrouter.protowire import decode_fields
from eventrouter.testing import make_occurrence
from eventrouter_sinks.loki import _CACHE_MAX, LokiOptions, LokiSink, _Entry

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
NS = 1_000_000_000


def _sink(**options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": "http://127.0.0.1:9", **options}), CONTEXT)


def _entries(sink: LokiSink, batch: list[Occurrence]) -> list[_Entry]:
    entries = [sink._entry(i, occ) for i, occ in enumerate(batch)]
    assert all(isinstance(e, _Entry) for e in entries)
    return entries  # type: ignore[return-value]


def _fields(data: Any) -> list[tuple[int, Any]]:
    return [(number, value) for number, _, value in decode_fields(bytes(data))]


def _decode(body: bytes) -> list[tuple[str, list[tuple[int, bytes, list[tuple[str, str]]]]]]:
    """PushRequest → [(labels, [(timestamp ns, line, structured metadata)])], by the wire format alone."""
    streams = []
    for number, stream in _fields(cramjam.snappy.decompress_raw(body)):
        assert number == 1
        labels, entries = "", []
        for field, value in _fields(stream):
            if field == 1:
                labels = bytes(value).decode()
                continue
            assert field == 2
            ts, line, metadata = 0, b"", []
            for part, inner in _fields(value):
                if part == 1:
                    ts = sum(v * (NS if n == 1 else 1) for n, v in _fields(inner))
                elif part == 2:
                    line = bytes(inner)
                else:
                    pair = dict(_fields(inner))
                    metadata.append((bytes(pair[1]).decode(), bytes(pair[2]).decode()))
            entries.append((ts, line, metadata))
        streams.append((labels, entries))
    return streams


# Seconds around the varint byte boundaries (0 and below 128 have no cached high part), any nanos.
SECONDS = st.sampled_from([0, 1, 127, 128, 129, 16383, 16384, 2**21, 1_763_683_200, 2**35 - 1, 2**35])
NANOS = st.sampled_from([0, 1, 127, 128, 999_999_999]) | st.integers(0, NS - 1)


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(
        st.tuples(SECONDS, NANOS, st.sampled_from(["a", "b"]), st.integers(0, 17_000)),
        min_size=1,
        max_size=12,
    ),
    metadata=st.booleans(),
)
def test_protobuf_body_decodes_to_every_entry_grouped_and_time_sorted_at_varint_boundaries(
    items: list[tuple[int, int, str, int]], metadata: bool
) -> None:
    sink = _sink(structured_metadata=str(metadata).lower())
    batch = [
        dataclasses.replace(
            make_occurrence(namespace=ns, message="m" * size, object_name=f"o-{i}"), time_ns=s * NS + n
        )
        for i, (s, n, ns, size) in enumerate(items)
    ]
    streams = _decode(sink.encode(_entries(sink, batch)))
    want: dict[str, list[tuple[int, int, Occurrence]]] = {}
    for i, occ in enumerate(batch):
        namespace = occ.record["namespace"]
        labels = f'{{cluster="test",kind="Pod",namespace="{namespace}",reason="BackOff",'
        labels += 'reporting_component="kubelet",type="Warning"}'
        want.setdefault(labels, []).append((occ.time_ns, i, occ))
    assert [labels for labels, _ in streams] == list(want)  # first-seen order
    for labels, entries in streams:
        expected = sorted(want[labels], key=lambda t: (t[0], t[1]))
        assert [(ts, line) for ts, line, _ in entries] == [(ts, occ.json) for ts, _, occ in expected]
        for (_, _, got), (_, _, occ) in zip(entries, expected, strict=True):
            involved = occ.record["involved_object"]
            assert got == (
                [
                    ("involved_object_name", involved["name"]),
                    ("involved_object_uid", involved["uid"]),
                    ("event_uid", occ.uid),
                    ("occurrence", str(occ.number)),
                ]
                if metadata
                else []
            )


def _with(occ: Occurrence, **fields: Any) -> Occurrence:
    return dataclasses.replace(occ, record={**occ.record, **fields}, _json=None)


def test_label_cache_keeps_equal_but_differently_typed_values_apart() -> None:
    # 1 == True == 1.0 hash alike; a record that is not normalised must still get its own labels.
    sink = _sink(default_labels="namespace")
    base = make_occurrence()
    got = [
        _decode(sink.encode(_entries(sink, [_with(base, namespace=value)])))[0][0]
        for value in ["1", 1, True, 1.0, "1"]
    ]
    assert got == [
        '{namespace="1"}',
        '{namespace="1"}',
        '{namespace="True"}',
        '{namespace="1.0"}',
        '{namespace="1"}',
    ]


def test_label_templates_over_present_missing_and_odd_fields_match_per_record() -> None:
    sink = _sink(default_labels="kind", labels="app={labels.app}")
    base = make_occurrence(kind="Pod")
    records = [
        _with(base, labels={"app": "web"}),
        _with(base, labels={}),
        _with(base, labels={"app": "api"}),
        _with(base, involved_object="not a dict", labels={"app": "web"}),
        _with(base, labels={"app": "web"}),
    ]
    got = [labels for labels, _ in _decode(sink.encode(_entries(sink, records)))]
    assert got == ['{app="web",kind="Pod"}', '{kind="Pod"}', '{app="api",kind="Pod"}', '{app="web"}']


def test_label_cache_stays_bounded_and_skips_huge_label_values() -> None:
    sink = _sink(labels="msg={message}", allow_high_cardinality_labels="true")
    base = make_occurrence()
    for i in range(_CACHE_MAX + 10):
        sink._entry(0, _with(base, namespace=f"ns-{i}"))
    assert 0 < len(sink._label_cache) <= _CACHE_MAX
    sink._label_cache.clear()
    sink._entry(0, _with(base, message="x" * 5000))
    assert not sink._label_cache
