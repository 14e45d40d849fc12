"""Thousands of groups due at once in one robot send (session 31's robot review, finding 1): a large
incident while the robot is unreachable or throttled, or the first send after a restart, when every
pooled group is new. The send's digest work ran on the router's one event loop (the watch, every
other sink, /healthz, the lease renewals): 10,000 due groups held it for about 20 s, and the message
that then went out covered 72 of them.

Against the project's DingTalk receiver (its real limits), with a ticker task beside the send that
records the longest time the event loop did not let it run. A bound on responsiveness, with a wide
margin (the send now holds the loop for a few tens of milliseconds at a time), not a timing of
throughput.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from eventrouter import OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter_sinks._alerting import WARM_UP, SystemClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink

LOG = logging.getLogger("test.robot_many_due")
HEADER = re.compile(r"Kubernetes: (\d+) events?")
TICK = 0.01


class RealClock(SystemClock):
    """Real time, which a test can move ahead (a sink that has run for a while)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def now(self) -> float:
        return super().now() + self.ahead

    def wall(self) -> float:
        return super().wall() + self.ahead


@pytest.mark.parametrize("running", [0.0, WARM_UP], ids=["first-minute", "after-a-minute"])
async def test_one_send_of_ten_thousand_new_problems_pages_them_all_and_never_stalls_the_loop(
    running: float,
) -> None:
    """In its first minute a flush sends one message (then it summarises everything due); after
    it, up to three, lines spread over them before the last summarises the rest. Either way every
    one of the 10,000 is in an accepted message of this send, and the loop is never held for long."""
    n = 10_000
    batch = [
        make_occurrence(
            cluster="prod",
            namespace="shop",
            uid=f"u{i}",
            object_name=f"web-{i}",
            reason="BackOff",
            type="Warning",
            message="Back-off restarting failed container app in pod web: exit code 137 " * 3,
        )
        for i in range(n)
    ]
    stalls: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            stalls.append(now - last - TICK)
            last = now

    async with DingTalkReceiver(access_token="tok") as robot:
        clock = RealClock()
        context = SinkContext(name="dingtalk", cluster="prod", data_dir=None, logger=LOG)
        sink = DingTalkSink(DingTalkOptions.model_validate({"url": robot.url}), context, clock=clock)
        await sink.start()
        clock.ahead = running
        tick = asyncio.create_task(ticker())
        try:
            await asyncio.sleep(5 * TICK)
            outs = await sink.send(batch)
            await asyncio.sleep(5 * TICK)
        finally:
            tick.cancel()
            await sink.aclose()
    assert outs is not None and [o.kind for o in outs] == [OutcomeKind.OK] * n  # 72 of them before
    assert len(robot.accepted) == (1 if running < WARM_UP else 3)
    assert sum(int(m.group(1)) for msg in robot.accepted if (m := HEADER.search(msg.text))) == n
    assert max(stalls) < 1.0  # about 20 s before
