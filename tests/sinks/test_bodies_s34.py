"""SLS, DingTalk and WeCom, session 34's review (r2bodies F2, F4, F7, F8): an answer whose body cannot
be read (stalled after the head, cut off, or not in its Content-Encoding) is judged by its status,
not taken for no answer. Before, the failed read threw the status and its Retry-After away: a final
400/404 was retried for ever, a 413 never halved, a 429's Retry-After lost, a robot's 401/302 counted
against its minute, and SLS's 200 (stored) sent again and stored twice.

Against the project's receivers (``unreadable_next(n, how)``: the next answer, whatever it says,
with a body the client cannot read)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from eventrouter import OK, Occurrence, Outcome, OutcomeKind, RetryableError, SinkContext, SinkError
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.receivers.unreadable import Unreadable
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter_sinks._alerting import AlertSink, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink
from eventrouter_sinks.sls import SLSOptions, SLSSink
from eventrouter_sinks.wecom import WeComOptions, WeComSink

LOG = logging.getLogger("test.bodies.s34")
PROJECT, LOGSTORE = "k8s-log-c1", "k8s-event"
KEY_ID, KEY_SECRET = "LTAI-bodies-id", "bodies-s3cr3t-9f8e"
TOKEN, ROBOT_KEY, CORP_SECRET = "tok-2b7d9e41", "key-8c3a1f07", "corp-secret-4e6d"
HOWS: list[Unreadable] = ["stall", "cut", "gzip"]
SLS_HOWS: list[Unreadable] = ["stall", "cut"]
"""SLS reads answers raw (``auto_decompress=False``): a gzip-labelled page is read, and was judged right."""


def pods(n: int) -> list[Occurrence]:
    return [make_occurrence(cluster="c1", namespace="shop", object_name=f"pod-{i}") for i in range(n)]


# -- SLS ------------------------------------------------------------------------------------------


@asynccontextmanager
async def sls_sink(**options: Any) -> AsyncIterator[tuple[SLSReceiver, SLSSink]]:
    async with SLSReceiver(projects={PROJECT: [LOGSTORE]}, keys=[AccessKey(KEY_ID, KEY_SECRET)]) as sls:
        opts = {
            "url": sls.url,
            "project": PROJECT,
            "logStore": LOGSTORE,
            "accessKeyId": KEY_ID,
            "accessKeySecret": KEY_SECRET,
            "request_timeout": 1,
            **options,
        }
        sink = SLSSink(SLSOptions.model_validate(opts), SinkContext("sls", "c1", None, LOG))
        await sink.start()
        try:
            yield sls, sink
        finally:
            await sink.aclose()


def puts(sls: SLSReceiver) -> list[int]:
    return [r.status for r in sls.requests if r.method == "POST"]


@pytest.mark.parametrize("how", SLS_HOWS)
async def test_sls_a_413_with_an_unreadable_body_is_halved(how: Unreadable) -> None:
    """A proxy's body limit at the head: before, "cannot reach" and the same request at every
    attempt (never halved: stuck on that batch with retry_max_attempts=0)."""
    async with sls_sink() as (sls, sink):
        sls.fail_next(1, "RequestEntityTooLarge", 413, echo=True)  # a front's page, no request id
        sls.unreadable_next(1, how)
        assert await sink.send(pods(4)) == [OK] * 4
    first, *rest = puts(sls)
    assert first == 413 and rest and set(rest) == {200}  # in pieces (as with a readable 413)
    assert len(sls.logs()) == 4


@pytest.mark.parametrize("how", SLS_HOWS)
async def test_sls_own_400_with_an_unreadable_body_is_rejected_not_retried(how: Unreadable) -> None:
    """SLS's 400 (x-log-requestid: PostBodyInvalid) whose code cannot be read: the log is dead-
    lettered, as a readable PostBodyInvalid's; before, retried for ever as "cannot reach"."""
    async with sls_sink() as (sls, sink):
        sls.fail_next(1, "PostBodyInvalid", 400)
        sls.unreadable_next(1, how)
        outcomes = await sink.send(pods(1))
    assert outcomes is not None
    [outcome] = outcomes
    assert outcome.kind is OutcomeKind.REJECT
    assert outcome.reason.startswith("SLS 400 HTTP400: its body unreadable: ")
    assert "(request id " in outcome.reason
    assert puts(sls) == [400]


@pytest.mark.parametrize("how", SLS_HOWS)
async def test_sls_own_400_with_an_unreadable_body_to_several_logs_is_halved(how: Unreadable) -> None:
    """Several logs: halved down to a log refused alone, as a readable PostBodyInvalid is."""
    async with sls_sink() as (sls, sink):
        sls.fail_next(1, "PostBodyInvalid", 400)
        sls.unreadable_next(1, how)
        assert await sink.send(pods(4)) == [OK] * 4
    assert puts(sls) == [400, 200, 200]


@pytest.mark.parametrize("how", SLS_HOWS)
@pytest.mark.parametrize("status", [429, 503])
async def test_sls_retry_after_is_honoured_when_the_body_cannot_be_read(status: int, how: Unreadable) -> None:
    """Before, retry_after was None: the engine's backoff hammered a service that asked for 2 min."""
    async with sls_sink() as (sls, sink):
        sls.fail_next(1, "WriteQuotaExceed", status, retry_after=120)
        sls.unreadable_next(1, how)
        try:
            outcomes = await sink.send(pods(1))
        except RetryableError as exc:
            retry_after, reason = exc.retry_after, exc.reason
        else:
            assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY
            retry_after, reason = outcomes[0].retry_after, outcomes[0].reason
    assert retry_after == 120
    assert reason.startswith(f"SLS {status} HTTP{status}: its body unreadable: ")


@pytest.mark.parametrize("how", SLS_HOWS)
async def test_sls_a_200_with_a_request_id_is_stored_whatever_its_body(how: Unreadable) -> None:
    """SLS's 200 names its request (x-log-requestid): the logs are stored, the body is never read.
    Before, a stalled or cut body was "cannot reach" and the logs were sent and stored again (SLS
    does not de-duplicate)."""
    async with sls_sink() as (sls, sink):
        sls.unreadable_next(1, how)
        assert await sink.send(pods(3)) == [OK] * 3
    assert puts(sls) == [200]
    assert len(sls.logs()) == 3


async def test_sls_a_stalled_body_is_waited_for_two_seconds_not_the_whole_timeout() -> None:
    """At the default request_timeout (10 s) the body of an answer whose status decides (a 503: only
    quoted) gets 2 s (the webhook's wait, item 277); before item 292, the whole timeout ran out and
    it was "cannot reach … TimeoutError"."""
    async with sls_sink(request_timeout=10) as (sls, sink):
        sls.fail_next(1, "ServerBusy", 503)
        sls.unreadable_next(1, "stall")
        try:
            outcomes = await sink.send(pods(1))
        except RetryableError as exc:
            reason = exc.reason
        else:
            assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY
            reason = outcomes[0].reason
    assert "its body unreadable: none of it within 2s (request id " in reason


@pytest.mark.parametrize("code", ["RequestTimeExpired", "MissingDate", "PostBodyInvalid"])
async def test_sls_own_400_read_slowly_is_judged_by_its_code(code: str) -> None:
    """SLS's own 400 whose JSON comes 2.5 s after its head, within request_timeout (5 s): its code
    decides (RequestTimeExpired, a header's code: retried; PostBodyInvalid: the log refused), so it
    is read within the request's timeout (body_prefix's rule). Cut at 2 s (item 292), it was "code
    unreadable" and every log dead-lettered, halved down to single logs (2N-1 requests)."""
    async with sls_sink(request_timeout=5) as (sls, sink):
        sls.fail_next(1, code, 400)
        sls.late_next(1, 2.5)
        try:
            outcomes = await sink.send(pods(2 if code != "PostBodyInvalid" else 1))
        except RetryableError as exc:
            kinds, reasons = [OutcomeKind.RETRY], [exc.reason]
        else:
            assert outcomes is not None
            kinds, reasons = [o.kind for o in outcomes], [o.reason for o in outcomes]
    final = code == "PostBodyInvalid"
    assert set(kinds) == {OutcomeKind.REJECT if final else OutcomeKind.RETRY}
    assert all(r.startswith(f"SLS 400 {code}: injected {code} (request id ") for r in reasons), reasons
    assert puts(sls) == [400]


# -- DingTalk and WeCom ---------------------------------------------------------------------------


@dataclass
class Robot:
    kind: str
    """``dingtalk``, ``wecom`` (group robot) or ``wecom-app`` (application API)."""
    receiver: DingTalkReceiver | WeComReceiver
    sink: AlertSink[Any]

    @property
    def who(self) -> str:
        return "DingTalk robot" if self.kind == "dingtalk" else "WeCom"

    def statuses(self) -> list[int]:
        return [r.status for r in self.receiver.requests if getattr(r, "path", "") != "/cgi-bin/gettoken"]

    def accepted(self) -> int:
        return len(self.receiver.accepted)


@asynccontextmanager
async def robot(kind: str, **options: Any) -> AsyncIterator[Robot]:
    """The project's receiver for ``kind`` and a started sink on it, request_timeout 1 s."""
    clock = ManualClock()
    context = SinkContext(name=kind, cluster="c1", data_dir=None, logger=LOG)
    opts = {"request_timeout": 1, **options}
    if kind == "dingtalk":
        async with DingTalkReceiver(access_token=TOKEN, clock=clock.now, wall=clock.wall) as ding:
            opts |= {"url": ding.url}
            sink: AlertSink[Any] = DingTalkSink(DingTalkOptions.model_validate(opts), context, clock=clock)
            async with started(sink):
                yield Robot(kind, ding, sink)
        return
    async with WeComReceiver(robot_key=ROBOT_KEY, corp_secret=CORP_SECRET, clock=clock.now) as wecom:
        if kind == "wecom":
            opts |= {"url": wecom.robot_url}
        else:
            opts |= {"url": wecom.url, "corp_id": wecom.corp_id, "corp_secret": CORP_SECRET}
            opts |= {"agent_id": wecom.agent_id, "to_user": "alice"}
        sink = WeComSink(WeComOptions.model_validate(opts), context, clock=clock)
        async with started(sink):
            yield Robot(kind, wecom, sink)


@asynccontextmanager
async def started(sink: AlertSink[Any]) -> AsyncIterator[None]:
    await sink.start()
    try:
        yield
    finally:
        await sink.aclose()


async def one(bot: Robot) -> Outcome:
    outcomes = await bot.sink.send(pods(1))
    assert outcomes is not None
    [outcome] = outcomes
    return outcome


ROBOTS = ["dingtalk", "wecom", "wecom-app"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("status", [400, 404, 413])
@pytest.mark.parametrize("kind", ROBOTS)
async def test_a_gateways_final_status_with_an_unreadable_body_is_dead_lettered(
    kind: str, status: int, how: Unreadable
) -> None:
    """The robots answer 200: another status is a gateway's (a wrong URL's 404), dead-lettered as with
    a readable body. Before, the body was read first and its failure was "unreachable": retried (for
    ever at retry_max_attempts=0), a slot of the robot's minute spent at every attempt."""
    async with robot(kind) as bot:
        bot.receiver.fail_next(1, status=status, body=b"<html>gateway says no</html>")
        bot.receiver.unreadable_next(1, how)
        outcome = await one(bot)
    assert outcome.kind is OutcomeKind.REJECT
    assert (
        outcome.reason
        == f"{bot.who} answered HTTP {status}, not the API's own answer: check the URL and any proxy"
    )
    assert bot.statuses() == [status]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("kind", ROBOTS)
async def test_a_gateways_retry_after_is_honoured_when_the_body_cannot_be_read(
    kind: str, status: int, how: Unreadable
) -> None:
    """Before, retry_after was None: the gateway was hit again at the engine's backoff."""
    async with robot(kind) as bot:
        bot.receiver.fail_next(1, status=status, body=b"slow down", headers={"Retry-After": "120"})
        bot.receiver.unreadable_next(1, how)
        outcome = await one(bot)
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.retry_after == 120
    assert outcome.reason == f"{bot.who} answered HTTP {status}"


@pytest.mark.parametrize(
    ("status", "how"),
    [(s, h) for s in (401, 403, 302) for h in HOWS if (s, h) != (302, "gzip")],  # a 302 has no body
)
@pytest.mark.parametrize("kind", ROBOTS)
async def test_a_refusal_or_redirect_with_an_unreadable_body_is_warned_and_not_counted(
    kind: str, status: int, how: Unreadable, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway's 401/403 is a refusal of our credentials and a 302 a redirect, whatever the body:
    the robot never saw the message, so it is not one of its 20 a minute. Before, "unreachable",
    and counted."""
    async with robot(kind) as bot:
        location = "https://gw.example/moved" if status == 302 else None
        bot.receiver.fail_next(1, status=status, body=None if location else b"denied", location=location)
        bot.receiver.unreadable_next(1, how)
        free = bot.sink.limiter.free()
        outcome = await one(bot)
        after = bot.sink.limiter.free()
    assert outcome.kind is OutcomeKind.RETRY
    if status == 302:
        assert outcome.reason.startswith(
            f"{bot.who} answered HTTP 302: redirect to https://gw.example/moved "
        )
    else:
        assert f"answered HTTP {status}, not the robot's own answer" in outcome.reason
    assert after == free
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    said = (
        f"{kind}: {outcome.reason}" if status == 302 else f"{kind}: our credentials refused? {outcome.reason}"
    )
    assert [m for m in warned if m.startswith(said)], warned


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("kind", ROBOTS)
async def test_a_robot_reply_that_cannot_be_read_is_sent_again_saying_it_may_have_paged(
    kind: str, how: Unreadable
) -> None:
    """The robot accepted the message (paged) and its 200's reply was lost: retried, as an unknown
    outcome is (at least once), saying so. Before: "unreachable: TimeoutError" (or the parser's text),
    which sent an on-call who saw two pages looking for a network fault."""
    async with robot(kind) as bot:
        bot.receiver.unreadable_next(1, how)
        outcome = await one(bot)
    assert outcome.kind is OutcomeKind.RETRY
    assert outcome.reason.startswith(f"{bot.who} answered HTTP 200 but its reply could not be read (")
    assert outcome.reason.endswith("): the alert may have been paged; sent again, so it may page twice")
    assert bot.accepted() == 1


@pytest.mark.parametrize("kind", ROBOTS)
async def test_a_slow_robot_reply_within_the_timeout_is_one_page(kind: str) -> None:
    """The robot's 200 reply comes 2.5 s after its head, within request_timeout (5 s): it is the
    outcome (sent, throttled, refused), so it is read within the request's timeout and the alert is
    sent once. Cut at 2 s (item 292), it was "could not be read": sent again, a second page."""
    async with robot(kind, request_timeout=5) as bot:
        bot.receiver.late_next(1, 2.5)
        outcome = await one(bot)
    assert outcome == OK, outcome.reason
    assert bot.statuses() == [200]
    assert bot.accepted() == 1


async def test_a_stalled_robot_reply_is_waited_for_the_requests_timeout() -> None:
    """A reply that never comes is waited for until the request's timeout (it decides the outcome),
    then sent again saying it may have paged (item 292's rule for a reply that cannot be read)."""
    async with robot("dingtalk", request_timeout=1) as bot:
        bot.receiver.unreadable_next(1, "stall")
        outcome = await one(bot)
    assert outcome.kind is OutcomeKind.RETRY
    assert "could not be read (the request's timeout ran out while it was read)" in outcome.reason


@pytest.mark.parametrize("how", HOWS)
async def test_wecom_gettoken_answered_404_with_an_unreadable_body_fails_start_naming_it(
    how: Unreadable,
) -> None:
    """Before: "cannot reach WeCom at …: Response payload is not completed" (or TimeoutError)."""
    async with WeComReceiver(corp_secret=CORP_SECRET) as wecom:
        wecom.fail_next(1, status=404, body=b"<html>no such path</html>", gettoken=True)
        wecom.unreadable_next(1, how)
        opts = {
            "url": wecom.url,
            "corp_id": wecom.corp_id,
            "corp_secret": CORP_SECRET,
            "agent_id": wecom.agent_id,
            "to_user": "alice",
            "request_timeout": 1,
        }
        sink = WeComSink(WeComOptions.model_validate(opts), SinkContext("wechat", "c1", None, LOG))
        try:
            with pytest.raises(SinkError) as info:
                await sink.start()
        finally:
            await sink.aclose()
    assert str(info.value) == (
        "wechat: WeCom gettoken answered HTTP 404, not the API's own answer: check the URL and any proxy"
    )
