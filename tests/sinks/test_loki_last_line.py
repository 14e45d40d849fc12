"""The test Loki's last-line skip (item 162) against Loki's own: pkg/ingester/stream.go. Its
``validateEntries`` skips an entry identical (timestamp, line) to a *copy* of ``s.lastLine``, which
it moves past each entry that passed the per-entry rate and "too far behind" checks; the stream's
``s.lastLine`` itself moves only in ``storeEntries``, for each entry appended. So an entry refused
for the per-stream rate (entry by entry, or with its whole stream) is not the last line: sent again,
it is judged and charged again; a copy of it later in the same push is judged again too (entry by
entry) or skipped (whole stream: it passed the loop, the push is refused after it)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from eventrouter.testing.receivers.loki import LokiReceiver

PUSH = "/loki/api/v1/push"


@pytest.mark.parametrize(
    ("whole", "twice_refused"),
    [(False, "total ignored: 2 out of 2"), (True, "total ignored: 1 out of 2")],
    ids=["entry-by-entry", "whole-stream"],
)
async def test_an_entry_refused_for_its_streams_rate_is_not_its_last_line_when_sent_again(
    whole: bool, twice_refused: str
) -> None:
    now = time.time_ns()
    b, a, c = "b" * 150, "a" * 150, "c" * 150

    def push(*lines: str) -> dict[str, Any]:
        return {
            "streams": [{"stream": {"namespace": "busy"}, "values": [[str(now), line] for line in lines]}]
        }

    async with (
        LokiReceiver(per_stream_rate=1, per_stream_burst=200, per_stream_whole=whole) as loki,
        aiohttp.ClientSession() as http,
    ):

        async def send(*lines: str) -> tuple[int, str]:
            async with http.post(loki.url + PUSH, json=push(*lines)) as response:
                return response.status, await response.text()

        assert (await send(b))[0] == 204  # stored: the last line; 50 bytes left in the bucket
        assert (await send(a))[0] == 429  # over the rate: not stored, the last line is still b
        loki.refill_stream_rate_limits()
        assert (await send(a))[0] == 204  # not skipped as the last line: judged, charged, stored
        assert (await send(a))[0] == 204  # now it is the last line: skipped, not charged
        assert (await send(c))[0] == 429  # 50 bytes left: a was charged once
        assert loki.stream_rate_limited == 2
        # Refused for the rate within one push: entry by entry its copy is judged (and refused)
        # again; with the whole stream the copy was skipped in the loop, before the push's refusal.
        status, text = await send(c, c)
        assert status == 429 and twice_refused in text, text
        loki.refill_stream_rate_limits()
        assert (await send(c))[0] == 204  # c was never stored: not the last line
    assert [e.line[0] for e in loki.entries] == ["b", "a", "a", "c"]  # (the second a: as it holds it)
