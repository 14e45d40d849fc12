"""What the alert robots keep between sends (the review of item 238's robot rework).

- An accepted digest leaves no occurrence in memory: each group kept its last view (occurrences and
  line) until the group expired, a window later; after a storm that was 50,000 occurrences, 159 MB.
- The saved rate file cannot silence the robot: a ``paused_until`` written by a clock that was ahead
  (or "inf") held every alert, new problems too, for hours or for ever, with nothing logged.
- A start the engine retries reads the saved minute once: each start added it again.
- An occurrence the engine gives up on while a send yields is neither paged nor recorded OK.

Simulated time (``ManualClock``) shared by the sink and the project's DingTalk receiver.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, Outcome, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter_sinks._alerting import RATE_FILE, WARM_UP, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink

SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
TOKEN = "robot-token-5c1e"
LOGGER = "test.robot_state"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def robot(clock: ManualClock) -> AsyncIterator[DingTalkReceiver]:
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall) as r:
        yield r


def made(robot: DingTalkReceiver, clock: ManualClock, data_dir: Path | None, **opts: Any) -> DingTalkSink:
    context = SinkContext(
        name="dingtalk", cluster="prod", data_dir=data_dir, logger=logging.getLogger(LOGGER)
    )
    options = DingTalkOptions.model_validate({"url": robot.url, "secret": SECRET, **opts})
    return DingTalkSink(options, context, clock=clock)


async def started(
    robot: DingTalkReceiver, clock: ManualClock, data_dir: Path | None, **opts: Any
) -> DingTalkSink:
    sink = made(robot, clock, data_dir, **opts)
    await sink.start()
    return sink


def alert(name: str, reason: str = "BackOff", namespace: str = "shop", **kw: Any) -> Occurrence:
    return make_occurrence(cluster="prod", namespace=namespace, object_name=name, reason=reason, **kw)


def kinds(outcomes: Sequence[Outcome] | None) -> set[OutcomeKind]:
    assert outcomes is not None
    return {o.kind for o in outcomes}


async def test_an_accepted_digest_keeps_none_of_its_occurrences(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """200 groups of 3 paged in one send: once the robot took them, no group holds a view (the
    occurrences and their line). Each group kept its last view until it expired, a window later."""
    sink = await started(robot, clock, None)
    clock.advance(WARM_UP)
    batch = [alert(f"api-{i}", count=n) for i in range(200) for n in (1, 2, 3)]
    try:
        assert kinds(await sink.send(batch)) == {OutcomeKind.OK}
        keys = {o.key for o in batch}
        del batch
        gc.collect()
        groups = list(sink._groups.values())
        assert len(groups) == 200  # kept for their window (repeats are held), empty
        assert all(not g.pending for g in groups)
        assert [g for g in groups if g.view is not None] == []
        held = [o for o in gc.get_objects() if isinstance(o, Occurrence) and o.key in keys]
        assert held == []  # nothing else reaches one either
    finally:
        await sink.aclose()


def save(folder: Path, body: bytes) -> Path:
    path = folder / RATE_FILE
    path.write_bytes(body)
    return path


async def test_a_pause_far_ahead_in_the_rate_file_holds_a_new_problem_at_most_the_throttle(
    robot: DingTalkReceiver, clock: ManualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pause saved by a writer whose clock was two hours ahead: a new problem waited two hours
    (every 300 s the engine asked, and the sink said wait), nothing logged. Now the pause is at most
    the sink's throttle backoff (DingTalk's 10 minutes), and the file is named in a warning."""
    path = save(tmp_path, orjson.dumps({"sent": [clock.wall() + 7200], "paused_until": clock.wall() + 7200}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sink = await started(robot, clock, tmp_path)
    loaded = clock.now()
    new = alert("db-0", "NodeNotReady")
    try:
        outs = await sink.send([new])
        assert outs is not None and outs[0].held
        assert 0 < (outs[0].retry_after or 0) <= 600.1
        clock.advance(loaded + 600.1 - clock.now())
        assert kinds(await sink.send([new])) == {OutcomeKind.OK}
    finally:
        await sink.aclose()
    assert len(robot.accepted) == 1 and robot.accepted[0].at <= loaded + 600.1
    warned = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warned) == 1 and "ahead" in warned[0]


@pytest.mark.parametrize("value", ["inf", "nan", "1e30"])
async def test_a_pause_that_is_not_a_finite_number_is_unreadable(
    robot: DingTalkReceiver,
    clock: ManualClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    value: str,
) -> None:
    """``float()`` took "inf": the robot was paused for ever, until someone deleted the file. Now
    only a finite number is a time; the file is unreadable (warned, the first minute paced)."""
    path = save(tmp_path, orjson.dumps({"sent": [], "paused_until": value}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sink = await started(robot, clock, tmp_path)
    try:
        assert kinds(await sink.send([alert("db-0", "NodeNotReady")])) == {OutcomeKind.OK}
    finally:
        await sink.aclose()
    assert any(str(path) in r.getMessage() and "cannot read" in r.getMessage() for r in caplog.records)


async def test_a_retried_start_counts_the_saved_minute_once(
    robot: DingTalkReceiver, clock: ManualClock, tmp_path: Path
) -> None:
    """The engine retries a failed start on the same instance (a WeCom app whose secret is being
    rotated); each start added the saved minute again: 7 messages counted 21, and a new problem
    waited for a robot with 13 free slots."""
    a = await started(robot, clock, tmp_path, min_interval=1)
    clock.advance(WARM_UP)
    try:
        for i in range(7):
            assert kinds(await a.send([alert(f"web-{i}")])) == {OutcomeKind.OK}
            clock.advance(1)
    finally:
        await a.aclose()
    b = made(robot, clock, tmp_path, min_interval=1)
    try:
        for _ in range(3):
            await b.start()
        assert len(b.limiter.history()[0]) == 7
        clock.advance(WARM_UP)
        assert kinds(await b.send([alert("db-0", "NodeNotReady")])) == {OutcomeKind.OK}
    finally:
        await b.aclose()


async def test_an_occurrence_given_up_while_a_send_yields_is_not_paged_or_recorded(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """The engine drops a deferred occurrence (memory full, no spool: ``Pipeline.offer`` in the
    source's task) while a large send gives the loop a turn. Views made before that turn still
    listed it: the digest counted it and ``_done`` recorded it OK, an answer never asked for."""

    def db(n: int) -> Occurrence:
        return alert("db-0", "OOMKilling", count=n)

    storm = [alert(f"api-{i}", namespace="web") for i in range(600)]
    sink = await started(robot, clock, None, window=300)
    clock.advance(WARM_UP)
    try:
        assert kinds(await sink.send([db(1)])) == {OutcomeKind.OK}  # paged: its window starts
        repeats = [db(n) for n in range(2, 6)]
        outs = await sink.send(repeats)  # held for the window; the engine sets them aside
        assert outs is not None and all(o.held for o in outs)
        clock.advance(301)  # the window is over; the engine still holds them
        gone = repeats[0]
        seen: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        turns = 0

        def tick() -> None:
            # One loop turn each: the send takes two in its intake (600 items), then the first in
            # making views, after the OOMKilling group's view was made.
            nonlocal turns
            turns += 1
            if turns < 3:
                loop.call_soon(tick)
                return
            seen.update(pending=gone.key in sink._pending_of, requests=len(robot.requests))
            sink.given_up([gone])

        before = len(robot.requests)
        loop.call_soon(tick)
        assert kinds(await sink.send(storm)) == {OutcomeKind.OK}
        # It happened inside the send, before any message of it went out.
        assert seen == {"pending": True, "requests": before}
        text = "\n".join(m.text for m in robot.accepted[1:])
        assert f"OOMKilling {chr(0xD7)}3" in text.replace("*", "")
        assert f"OOMKilling {chr(0xD7)}4" not in text.replace("*", "")
        assert gone.key not in sink._done
        assert kinds(await sink.send(repeats[1:])) == {OutcomeKind.OK}  # the others were paged
    finally:
        await sink.aclose()
