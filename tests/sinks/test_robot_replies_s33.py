"""Robot replies read to their end, and the pace a held alert quotes (session 33, item 267).

The DingTalk and WeCom sinks read the robot's JSON reply with one ``content.read(n)``, which returns
what has arrived, not the body. A reply in two chunks (a gateway's chunked transfer, a body split
across TCP or TLS records) was "not its JSON reply": an alert the robot accepted was retried and
paged again on every retry, then dead-lettered; a split "send too fast" took no pause. The project's
receivers answer in pieces here (``chunk_bytes``), each reaching the client in its own read.

An entry sharing its robot with a stricter one (item 263) is paced at the shared limit, but its held
alerts said its own ``rate_per_minute``.

Simulated time (``ManualClock``) shared by the sinks and the receivers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest

from eventrouter import Occurrence, Outcome, OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter_sinks._alerting import WARM_UP, AlertSink, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink
from eventrouter_sinks.wecom import WeComOptions, WeComSink

SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
TOKEN = "robot-token-61fa"
KEY = "wecom-robot-key-0d4c"
CORP_SECRET = "corp-s3cret-4b17"
ANSWER_BYTES = 256 * 1024
"""What the sinks read of an answer (``sinks/dingtalk.py``)."""
S = TypeVar("S", bound=AlertSink[Any])
PIECE = 7
"""Bytes per piece of an answer: ``{"errco`` first, as a gateway's first chunk may cut it."""


def context(name: str = "robot") -> SinkContext:
    return SinkContext(name=name, cluster="prod", data_dir=None, logger=logging.getLogger("test.replies"))


def alert(name: str = "db-0", reason: str = "OOMKilling") -> Occurrence:
    return make_occurrence(cluster="prod", namespace="shop", object_name=name, reason=reason)


def kinds(outcomes: Sequence[Any] | None) -> list[OutcomeKind]:
    assert outcomes is not None
    return [o.kind for o in outcomes]


async def ding(robot: DingTalkReceiver, clock: ManualClock, name: str = "ding", **opts: Any) -> DingTalkSink:
    options = DingTalkOptions.model_validate({"url": robot.url, "secret": SECRET, **opts})
    return await started(DingTalkSink(options, context(name), clock=clock))


async def wecom_sink(clock: ManualClock, **opts: Any) -> WeComSink:
    return await started(WeComSink(WeComOptions.model_validate(opts), context("wecom"), clock=clock))


async def started(sink: S) -> S:
    try:
        await sink.start()
    except BaseException:
        await sink.aclose()  # its session: a start that failed leaves nothing open
        raise
    return sink


# ------------------------------------------------------------------------------ replies in pieces


async def test_a_dingtalk_reply_in_pieces_is_judged_whole_so_an_accepted_alert_pages_once() -> None:
    """Before: 'not its JSON reply' for an accepted message, so each retry paged it again."""
    clock = ManualClock()
    async with DingTalkReceiver(
        access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall, chunk_bytes=PIECE
    ) as robot:
        sink = await ding(robot, clock)
        try:
            assert kinds(await sink.send([alert()])) == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    assert robot.errcodes() == [0] and len(robot.accepted) == 1


@pytest.mark.parametrize("errcode", [130101, 410100])
async def test_a_dingtalk_send_too_fast_in_pieces_still_pauses(errcode: int) -> None:
    """Before: the cut reply was no 'send too fast': no pause, and the throttled robot hit again."""
    clock = ManualClock()
    async with DingTalkReceiver(
        access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall, chunk_bytes=PIECE
    ) as robot:
        sink = await ding(robot, clock, throttle_backoff=30)
        robot.fail_next(1, errcode=errcode, errmsg="send too fast, exceed 20 times per minute")
        try:
            (out,) = await sink.send([alert()]) or []
            assert out.kind is OutcomeKind.RETRY and out.held and out.retry_after == 30
            assert str(errcode) in out.reason
            assert kinds(await sink.send([alert()])) == [OutcomeKind.RETRY]
            assert len(robot.requests) == 1  # nothing sent inside the pause
        finally:
            await sink.aclose()


async def test_a_wecom_robot_reply_in_pieces_is_judged_whole_so_an_accepted_alert_pages_once() -> None:
    clock = ManualClock()
    async with WeComReceiver(robot_key=KEY, clock=clock.now, chunk_bytes=PIECE) as wecom:
        sink = await wecom_sink(clock, url=wecom.robot_url)
        try:
            assert kinds(await sink.send([alert()])) == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    assert wecom.errcodes() == [0] and len(wecom.accepted) == 1


async def test_a_wecom_api_freq_out_of_limit_in_pieces_still_pauses() -> None:
    clock = ManualClock()
    async with WeComReceiver(robot_key=KEY, clock=clock.now, chunk_bytes=PIECE) as wecom:
        sink = await wecom_sink(clock, url=wecom.robot_url, throttle_backoff=20)
        wecom.fail_next(1, errcode=45009, errmsg="api freq out of limit")
        try:
            (out,) = await sink.send([alert()]) or []
            assert out.kind is OutcomeKind.RETRY and out.held and out.retry_after == 20
            assert "45009" in out.reason
            clock.advance(20)
            assert kinds(await sink.send([alert()])) == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    assert wecom.errcodes() == [45009, 0] and len(wecom.accepted) == 1


async def test_wecom_application_token_and_message_replies_in_pieces_are_read_whole() -> None:
    """gettoken's reply too: before, the start failed ('not its JSON reply') on every try."""
    clock = ManualClock()
    async with WeComReceiver(corp_secret=CORP_SECRET, clock=clock.now, chunk_bytes=PIECE) as wecom:
        sink = await wecom_sink(
            clock,
            url=wecom.url,
            corp_id=wecom.corp_id,
            corp_secret=CORP_SECRET,
            agent_id=str(wecom.agent_id),
            to_user="alice",
        )
        try:
            assert kinds(await sink.send([alert()])) == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    assert wecom.gettoken_calls() == 1
    assert wecom.errcodes("/cgi-bin/message/send") == [0] and len(wecom.accepted) == 1


async def test_a_reply_longer_than_any_robots_is_never_judged_from_its_first_part() -> None:
    """A front's 200 page over the bound is cut and not parsed, however its first part reads."""
    clock = ManualClock()
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall) as robot:
        sink = await ding(robot, clock)
        robot.fail_next(1, status=200, body=b'{"errcode":0,"errmsg":"ok"}' + b" " * ANSWER_BYTES)
        try:
            (out,) = await sink.send([alert()]) or []
        finally:
            await sink.aclose()
    assert out.kind is OutcomeKind.RETRY and "not its JSON reply" in out.reason


# ------------------------------------------------------------------------------ the pace quoted


async def test_a_held_alert_quotes_the_shared_robots_pace_and_who_shares_it() -> None:
    """team-a (20 a minute) and team-b (5) address one robot, paced at 5: team-a's held alerts
    said '(20 messages a minute)', and the operator looked for why 20 was never reached."""
    clock = ManualClock()
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall) as robot:
        a = await ding(robot, clock, "team-a", rate_per_minute=20, min_interval=0)
        b = await ding(robot, clock, "team-b", rate_per_minute=5, min_interval=0)
        clock.advance(WARM_UP)
        try:
            outcomes: list[Outcome] = []
            for i in range(6):
                outcomes += await a.send([alert(f"web-{i}", "BackOff")]) or []
                clock.advance(1)
        finally:
            await a.aclose()
            await b.aclose()
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * 5 + [OutcomeKind.RETRY]
    held = outcomes[-1]
    assert held.held and "20 messages" not in held.reason
    assert "(5 messages a minute, shared with team-b" in held.reason
