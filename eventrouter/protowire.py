"""Minimal protobuf wire-format encoding and decoding.

Loki's PushRequest and SLS's LogGroup are a handful of fields each; writing the wire format directly
avoids generated code and a protobuf runtime on the hot path. Decoding is here for test receivers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

__all__ = [
    "DecodeError",
    "bytes_field",
    "decode_fields",
    "fixed32_field",
    "read_varint",
    "varint",
    "varint_field",
]

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5


_ONE_BYTE = [bytes([i]) for i in range(128)]  # most lengths and tags fit in one byte


def varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    if value < 0:
        value &= (1 << 64) - 1  # negative int64 is ten bytes, as protobuf does
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_KEYS: dict[tuple[int, int], bytes] = {}


def _key(number: int, wire: int) -> bytes:
    key = _KEYS.get((number, wire))
    if key is None:
        key = _KEYS[(number, wire)] = varint((number << 3) | wire)
    return key


def varint_field(number: int, value: int) -> bytes:
    return _key(number, WIRE_VARINT) + varint(value)


def bytes_field(number: int, value: bytes | str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _key(number, WIRE_LEN) + varint(len(data)) + data


def fixed32_field(number: int, value: int) -> bytes:
    return _key(number, WIRE_FIXED32) + struct.pack("<I", value)


class DecodeError(ValueError):
    pass


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; returns (value, next position). Raises DecodeError."""
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def decode_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for every field of one message."""
    pos = 0
    end = len(data)
    while pos < end:
        key = data[pos]
        if key < 0x80:  # one-byte keys and lengths are the rule: read them inline
            pos += 1
        else:
            key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        value: int | bytes
        if wire == WIRE_LEN:
            if pos < end and data[pos] < 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = read_varint(data, pos)
            if pos + length > end:
                raise DecodeError("truncated length-delimited field")
            value = data[pos : pos + length]
            pos += length
        elif wire == WIRE_VARINT:
            value, pos = read_varint(data, pos)
        elif wire == WIRE_FIXED32:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32")
            value = struct.unpack_from("<I", data, pos)[0]
            pos += 4
        elif wire == WIRE_FIXED64:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64")
            value = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        yield number, wire, value
