"""Protobuf wire decoding: the fast paths give what the plain field walk gives, for any bytes."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventrouter.protowire import (
    DecodeError,
    bytes_field,
    decode_fields,
    fixed32_field,
    read_varint,
    varint_field,
)
from eventrouter.testing.receivers.sls import _decode_log_fields, _decode_log_plain


def _reference_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """decode_fields as first written: every varint through read_varint."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            length, pos = read_varint(data, pos)
            if pos + length > len(data):
                raise DecodeError("truncated length-delimited field")
            value = data[pos : pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > len(data):
                raise DecodeError("truncated fixed32")
            value = struct.unpack_from("<I", data, pos)[0]
            pos += 4
        elif wire == 1:
            if pos + 8 > len(data):
                raise DecodeError("truncated fixed64")
            value = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        yield number, wire, value


def _outcome(walk: Iterator[tuple[int, int, int | bytes]]) -> object:
    try:
        return list(walk)
    except DecodeError as exc:
        return ("error", str(exc))


_text = st.one_of(
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=300)
)
_content = st.tuples(_text, _text).map(lambda kv: bytes_field(1, kv[0]) + bytes_field(2, kv[1]))
_log = st.tuples(
    st.integers(0, 2**40),
    st.lists(_content, max_size=30),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
).map(
    lambda t: (
        varint_field(1, t[0])
        + b"".join(bytes_field(2, c) for c in t[1])
        + (fixed32_field(4, t[2]) if t[2] is not None else b"")
    )
)


@st.composite
def _mangled(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A well-formed message, or one with a few bytes changed, cut or inserted."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(("set", "cut", "insert")))
        if action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


@given(st.one_of(st.binary(max_size=64), _mangled(_log)))
@settings(max_examples=500, deadline=None)
def test_decode_fields_fast_path_equals_the_reference_walk(data: bytes) -> None:
    assert _outcome(decode_fields(data)) == _outcome(_reference_fields(data))


@given(_mangled(_log))
@settings(max_examples=500, deadline=None)
def test_sls_receiver_plain_log_path_equals_the_field_walk(data: bytes) -> None:
    """The test SLS receiver reads the usual Log layout in one pass: whatever it returns, the general
    walk returns too, and whatever it refuses (DecodeError), the general walk refuses."""
    try:
        plain = _decode_log_plain(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            _decode_log_fields(data)
        return
    if plain is not None:
        assert plain == _decode_log_fields(data)


def test_the_plain_path_is_taken_for_what_writers_produce() -> None:
    data = varint_field(1, 1_795_310_943) + bytes_field(2, bytes_field(1, b"k") + bytes_field(2, b"v" * 300))
    log = _decode_log_plain(data + fixed32_field(4, 5))
    assert log is not None and log.contents == (("k", "v" * 300),) and log.time_ns == 5
