"""A robot's minute across a restart (session 31's robot review, finding 3).

The robot counts the messages of its last minute whoever sent them; DingTalk answers the 21st with
130101 and then throttles the robot for 10 minutes, paging nothing, not even a new problem. The
sink's rate limiter lived in memory only: a router restarted in a storm (a rolling update, an OOM
kill, a leader hand-over) started with an empty minute and sent at once, up to three messages.

Simulated time (``ManualClock``) shared by the sinks and the project's DingTalk receiver, whose
limits are the real ones (20 a rolling minute, a 10-minute throttle).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from eventrouter import Occurrence, Outcome, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter_sinks._alerting import WARM_UP, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink

SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
TOKEN = "robot-token-7f3a"
LONG = (
    "Back-off restarting failed container app in pod web: exit code 137, last state terminated "
    "(OOMKilled); readiness probe failed: Get http://10.0.0.1:8080/healthz: connection refused"
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def robot(clock: ManualClock) -> AsyncIterator[DingTalkReceiver]:
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall) as r:
        yield r


async def started(
    robot: DingTalkReceiver, clock: ManualClock, data_dir: Path | None, **opts: Any
) -> DingTalkSink:
    context = SinkContext(
        name="dingtalk", cluster="prod", data_dir=data_dir, logger=logging.getLogger("test.robot_restart")
    )
    options = DingTalkOptions.model_validate({"url": robot.url, "secret": SECRET, **opts})
    sink = DingTalkSink(options, context, clock=clock)
    await sink.start()
    return sink


def alert(name: str, reason: str = "BackOff") -> Occurrence:
    return make_occurrence(cluster="prod", namespace="shop", object_name=name, reason=reason, message=LONG)


def three_messages() -> list[Occurrence]:
    """What a flush out of its first minute sends as three messages (19,000 bytes each)."""
    return [alert(f"api-{i}", "Unhealthy") for i in range(150)]


def kinds(outcomes: Sequence[Outcome] | None) -> set[OutcomeKind]:
    assert outcomes is not None
    return {o.kind for o in outcomes}


async def a_minute_of(sink: DingTalkSink, clock: ManualClock, messages: int, every: float) -> None:
    """``messages`` alerts, one a message, ``every`` seconds apart, each accepted."""
    for i in range(messages):
        assert kinds(await sink.send([alert(f"web-{i}")])) == {OutcomeKind.OK}
        clock.advance(every)


async def test_a_restart_on_the_same_data_dir_waits_for_the_robots_minute(
    robot: DingTalkReceiver, clock: ManualClock, tmp_path: Path
) -> None:
    """Pod A sends 20 messages in 20 s; pod B starts 3 s later on the same data dir with a batch
    that needs three messages. B sent at once and the robot answered 130101 (a 10-minute throttle);
    now B reads A's minute, holds the batch and sends when the robot's minute has room."""
    a = await started(robot, clock, tmp_path, min_interval=1)
    clock.advance(WARM_UP)
    first = clock.now()
    try:
        await a_minute_of(a, clock, 20, every=1)
    finally:
        await a.aclose()
    clock.advance(3)
    b = await started(robot, clock, tmp_path, min_interval=1)
    batch = three_messages()
    try:
        outs = await b.send(batch)
        assert outs is not None and kinds(outs) == {OutcomeKind.RETRY} and all(o.held for o in outs)
        assert len(robot.requests) == 20  # B waits for a slot: nothing sent yet
        clock.advance(max(o.retry_after or 0 for o in outs))
        assert kinds(await b.send(batch)) == {OutcomeKind.OK}
    finally:
        await b.aclose()
    assert 130101 not in robot.errcodes()
    assert robot.accepted[20].at >= first + 60


async def test_a_throttle_is_waited_out_after_a_restart(
    robot: DingTalkReceiver, clock: ManualClock, tmp_path: Path
) -> None:
    """A robot shared with another sender (here: a rate_per_minute above the robot's own) answers
    130101, and the sink pauses for DingTalk's 10 minutes. Restarted 3 s later, it sent at once,
    into the throttle; now the pause's end is read from the data dir."""
    a = await started(robot, clock, tmp_path, min_interval=1, rate_per_minute=30)
    clock.advance(WARM_UP)
    try:
        await a_minute_of(a, clock, 20, every=1)
        outs = await a.send([alert("web-20")])
        assert outs is not None and outs[0].held and outs[0].retry_after == 600
    finally:
        await a.aclose()
    assert robot.errcodes().count(130101) == 1
    throttled = clock.now()
    clock.advance(3)
    b = await started(robot, clock, tmp_path, min_interval=1, rate_per_minute=30)
    new = alert("db-0", "NodeNotReady")
    try:
        outs = await b.send([new])
        assert outs is not None and outs[0].held and (outs[0].retry_after or 0) >= 590
        assert len(robot.requests) == 21  # nothing sent into the throttle
        clock.advance(throttled + 600 - clock.now())
        assert kinds(await b.send([new])) == {OutcomeKind.OK}
    finally:
        await b.aclose()
    assert robot.errcodes().count(130101) == 1


async def test_a_standby_with_its_own_data_dir_adds_one_message_to_a_full_minute_not_three(
    robot: DingTalkReceiver, clock: ManualClock, tmp_path: Path
) -> None:
    """A hand-over between pods that do not share a data dir: the new leader cannot know the old
    one's minute. The old one sent 19 messages at the robot's pace (3 s); the new one starts 3 s
    after its last with a batch needing three messages. It sent all three: the robot's 21st was
    answered 130101. In its first minute a flush now sends one message (it summarises the rest),
    at least 60/rate_per_minute after the one before."""
    a = await started(robot, clock, tmp_path / "a")
    clock.advance(WARM_UP)
    try:
        await a_minute_of(a, clock, 19, every=3)
    finally:
        await a.aclose()
    b = await started(robot, clock, tmp_path / "b")
    batch = three_messages()
    try:
        assert kinds(await b.send(batch)) == {OutcomeKind.OK}
    finally:
        await b.aclose()
    assert 130101 not in robot.errcodes()
    assert len(robot.accepted) == 20  # one message accounts for the whole batch
