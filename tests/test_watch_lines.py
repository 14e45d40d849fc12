"""The watch body splitter: lines come out whole and in order however the chunks fall."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventrouter.source.kube import ApiError
from eventrouter.source.watcher import EventWatcher, WatchSettings


class _Body:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = self
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def _split(data: bytes, sizes: list[int], limit: int = 1 << 20) -> list[bytes]:
    chunks, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        chunks.append(data[i : i + n])
        i, k = i + n, k + 1
    watcher: Any = EventWatcher.__new__(EventWatcher)
    watcher.settings = WatchSettings(max_line_bytes=limit)

    async def collect() -> list[bytes]:
        return [line async for line in watcher._lines(_Body(chunks))]

    return asyncio.run(collect())


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")), max_size=30),
    blanks=st.lists(st.sampled_from([b"", b" ", b"\t "]), max_size=3),
    sizes=st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=5),
)
def test_lines_are_whole_and_in_order_for_any_chunking(
    lines: list[bytes], blanks: list[bytes], sizes: list[int]
) -> None:
    body = b"".join(line + b"\n" for line in lines + blanks)
    assert _split(body, sizes) == [line for line in lines if line.strip()]


def test_a_stream_cut_inside_an_object_is_an_error() -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        _split(b'{"type":"ADDED"}\n{"type":"ADD', [7])


def test_a_line_over_the_limit_is_refused_before_it_is_complete() -> None:
    with pytest.raises(ApiError, match="LineTooLong"):
        _split(b"x" * 5000, [100], limit=1000)
    assert _split(b"a\n" + b"y" * 900 + b"\nb\n", [100], limit=1000) == [b"a", b"y" * 900, b"b"]
