"""The robots (DingTalk, WeCom) behind a front that redirects, or that answers a gateway's 429/503 with
Retry-After (session 29's cross-sink review, findings 4 and 5).

Against the project's robot receivers, through the engine's own Pipeline (``pipeline_for``) where
the engine's part matters (its backoff, set-aside retries, ``retry_max_attempts`` and dead letters).
A redirect is the receiver's ``fail_next(location=...)``; a Retry-After needs headers the receivers
do not send, so a small relay (``Front``) answers those itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, SinkContext, SinkError
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks._alerting import AlertSink, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink
from eventrouter_sinks.wecom import WeComOptions, WeComSink

LOG = logging.getLogger("test.robots")
TOKEN = "tok-7f3a9c2e"  # DingTalk access_token; short enough that redact_url leaves it in a path
SIGN_SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
KEY = "key-5c1e9d0a"  # WeCom webhook key
CORP_SECRET = "corp-secret-9d2b"
GW_PASSWORD = "gw-pa55-3e9c"  # in a Location's user info (the front's, not ours)
SECRETS = (TOKEN, SIGN_SECRET, KEY, CORP_SECRET, GW_PASSWORD)
FAST = {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.05}


@dataclass
class Robot:
    """One robot receiver and how the sink reaches it; ``kind`` is the sink's name."""

    kind: str
    receiver: DingTalkReceiver | WeComReceiver
    options: dict[str, Any]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.receiver.port}"

    @property
    def path(self) -> str:
        return "/robot/send" if self.kind == "dingtalk" else "/cgi-bin/webhook/send"

    def moved(self, status: int) -> str:
        """A Location as a front gives it: its own user info, and our token or key in the path and
        query (a gateway keyed by path); expected shown as ``shown_moved``."""
        secret, name = (TOKEN, "access_token") if self.kind == "dingtalk" else (KEY, "key")
        return f"https://gw:{GW_PASSWORD}@{self.host}/{secret}{self.path}?{name}={secret}&moved={status}"

    def shown_moved(self) -> str:
        name = "access_token" if self.kind == "dingtalk" else "key"
        return f"https://***@{self.host}/****{self.path}?{name}=***&moved=***"

    def sink(self, clock: ManualClock | None = None, **opts: Any) -> AlertSink[Any]:
        context = SinkContext(name=self.kind, cluster="prod", data_dir=None, logger=LOG)
        if self.kind == "dingtalk":
            return DingTalkSink(
                DingTalkOptions.model_validate({**self.options, **opts}), context, clock=clock
            )
        return WeComSink(WeComOptions.model_validate({**self.options, **opts}), context, clock=clock)

    def fail_next(self, n: int, status: int, location: str) -> None:
        self.receiver.fail_next(n, status=status, location=location)

    def pages(self) -> list[str]:
        return [m.text for m in self.receiver.accepted]

    def statuses(self) -> list[int]:
        return [r.status for r in self.receiver.requests]


@asynccontextmanager
async def robot(kind: str, clock: ManualClock | None = None) -> AsyncIterator[Robot]:
    """The project's receiver for ``kind``, limits high enough that only the front's answers matter."""
    now = clock.now if clock is not None else time.monotonic
    if kind == "dingtalk":
        wall = clock.wall if clock is not None else time.time
        async with DingTalkReceiver(
            access_token=TOKEN, secret=SIGN_SECRET, rate_per_minute=1000, clock=now, wall=wall
        ) as ding:
            yield Robot(kind, ding, {"url": ding.url, "secret": SIGN_SECRET})
    else:
        async with WeComReceiver(
            robot_key=KEY, corp_secret=CORP_SECRET, rate_per_minute=1000, clock=now
        ) as wecom:
            yield Robot(kind, wecom, {"url": wecom.robot_url})


@asynccontextmanager
async def engine(bot: Robot, metrics: Metrics, dead: Path, **knobs: Any) -> AsyncIterator[Pipeline]:
    """A running Pipeline of the robot's sink (no pacing of its own); drained and stopped on the way out."""
    sink = bot.sink(min_interval=0, rate_per_minute=1000)
    pipeline = pipeline_for(bot.kind, sink, metrics, dead, **{**FAST, **knobs})
    async with drained(pipeline):
        yield pipeline


def count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def alert(name: str) -> Occurrence:
    return make_occurrence(cluster="prod", namespace="shop", object_name=name, reason="BackOff")


def redirect_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The sink's own warnings about a redirect (the engine's retry lines quote the reason too)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOG.name and r.levelno == logging.WARNING and "redirect" in r.getMessage()
    ]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# ------------------------------------------------------------------------------------------ redirects


@pytest.mark.parametrize(
    ("kind", "status"),
    [("dingtalk", 302), ("dingtalk", 307), ("wecom", 301), ("wecom", 308)],
)
async def test_a_redirect_for_a_while_is_retried_never_followed_nor_dead_lettered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, status: int
) -> None:
    """An egress gateway before the robot switched to https, or moved, for three requests. A 3xx was
    dead-lettered (item 53): every alert of that time was never paged, while the webhook (188), Loki
    (197) and Elasticsearch (131) retry it. Now retried, never followed: each alert paged once, none
    dead-lettered, one warning saying where it points without credentials."""
    caplog.set_level(logging.WARNING)
    metrics = Metrics()
    dead = tmp_path / "dead"
    names = ["web-0", "db-0", "cache-0"]
    async with robot(kind) as bot:
        bot.fail_next(3, status, bot.moved(status))
        async with engine(bot, metrics, dead, retry_max_attempts=10) as pipeline:
            for name in names:
                pipeline.offer(alert(name))
            delivered = metrics.delivered.labels(kind)
            rejected = metrics.dead_lettered.labels(kind, "rejected")
            await until(lambda: delivered._value.get() + rejected._value.get() >= len(names))
        pages = bot.pages()
        statuses = bot.statuses()
    assert count(metrics.dead_lettered, kind, "rejected") == 0 and not dead.exists()
    assert count(metrics.delivered, kind) == len(names)
    assert all(sum(name in page for page in pages) == 1 for name in names)  # each paged once
    # Never followed: the robot saw the front's three answers, then only the sink's POSTs it took.
    assert statuses[:3] == [status] * 3 and set(statuses[3:]) == {200}
    (line,) = redirect_warnings(caplog)
    assert f"answered HTTP {status}: redirect to {bot.shown_moved()} not followed" in line
    assert_no_secret(caplog.text)


@pytest.mark.parametrize("kind", ["dingtalk", "wecom"])
async def test_a_redirect_that_lasts_is_dead_lettered_only_when_retries_run_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """A redirect that stays (the URL moved for good) is a failure as any other: bounded by
    retry_max_attempts, dead-lettered as retries exhausted with the redirect as its reason, and
    warned of once, not at every attempt."""
    caplog.set_level(logging.WARNING)
    metrics = Metrics()
    dead = tmp_path / "dead"
    async with robot(kind) as bot:
        bot.fail_next(100, 301, bot.moved(301))
        async with engine(bot, metrics, dead, retry_max_attempts=3) as pipeline:
            pipeline.offer(alert("web-0"))
            exhausted = metrics.dead_lettered.labels(kind, "retries_exhausted")
            rejected = metrics.dead_lettered.labels(kind, "rejected")
            await until(lambda: exhausted._value.get() + rejected._value.get() >= 1)
        statuses = bot.statuses()
    assert count(metrics.dead_lettered, kind, "rejected") == 0
    assert count(metrics.dead_lettered, kind, "retries_exhausted") == 1
    assert statuses == [301] * 3  # one request an attempt, nothing followed
    letter = dead.read_text()
    assert "retries exhausted after 3 attempts:" in letter
    assert f"answered HTTP 301: redirect to {bot.shown_moved()} not followed" in letter
    assert len(redirect_warnings(caplog)) == 1
    assert_no_secret(caplog.text, letter)


@pytest.mark.parametrize("kind", ["dingtalk", "wecom"])
async def test_a_redirect_costs_none_of_the_robots_messages_a_minute(kind: str) -> None:
    """The robot never saw a redirected message: it is not counted against ``rate_per_minute`` (as a
    refusal of our credentials is not), so the alert goes out as soon as the front relays again, not
    a minute later. It is a failed attempt, not a hold."""
    clock = ManualClock()
    async with robot(kind, clock) as bot:
        sink = bot.sink(clock, min_interval=0, rate_per_minute=2)
        await sink.start()
        bot.fail_next(2, 302, bot.moved(302))
        batch = [alert("web-0")]
        try:
            outcomes = [await sink.send(batch) for _ in range(3)]  # at the same instant
        finally:
            await sink.aclose()
        pages = bot.pages()
    first, second, third = (out[0] if out else None for out in outcomes)
    assert first is not None and second is not None and third is not None
    for out in (first, second):
        assert out.kind is OutcomeKind.RETRY and not out.held
        assert "redirect to" in out.reason and "not followed" in out.reason
        assert_no_secret(out.reason)
    assert third.kind is OutcomeKind.OK and len(pages) == 1


@pytest.mark.parametrize("kind", ["dingtalk", "wecom"])
async def test_check_fails_on_a_redirect_saying_where_it_points(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`eventrouter check` probes the robot's address with HEAD: a redirect passed as "reachable",
    while every alert would meet it. It fails now, naming where it points, without credentials."""
    caplog.set_level(logging.INFO)
    async with robot(kind) as bot:
        sink = bot.sink()  # unstarted, as `eventrouter check` makes it
        bot.fail_next(1, 308, bot.moved(308))
        try:
            with pytest.raises(SinkError) as info:
                await sink.check()
        finally:
            await sink.aclose()
    said = str(info.value)
    assert f"answered HEAD with 308, a redirect to {bot.shown_moved()}" in said
    assert "does not follow" in said
    assert_no_secret(said, caplog.text)


# -------------------------------------------------------------------------------------- Retry-After


class Front(Relay):
    """A gateway before the WeCom receiver: answers the requests queued in ``answers`` itself (path,
    status and headers: a 429 or 503 with Retry-After), each once, and relays every other request."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.answers: list[tuple[str, int, dict[str, str]]] = []
        self.answered: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        for i, (path, status, headers) in enumerate(self.answers):
            if path == request.path:
                del self.answers[i]
                self.answered.append(path)
                return web.Response(status=status, headers=headers, text="slow down")
        return await self.relay(request, body)


def in_two_minutes() -> str:
    return formatdate(time.time() + 120, usegmt=True)


@pytest.mark.parametrize(
    ("mode", "path", "status", "after"),
    [
        ("robot", "/cgi-bin/webhook/send", 429, "120"),
        ("robot", "/cgi-bin/webhook/send", 503, "date"),
        ("app", "/cgi-bin/message/send", 429, "120"),
        ("app", "/cgi-bin/gettoken", 503, "120"),
    ],
    ids=["robot-429", "robot-503-date", "app-send-429", "app-gettoken-503"],
)
async def test_wecom_waits_the_retry_after_of_a_gateway_in_front_of_it(
    mode: str, path: str, status: int, after: str
) -> None:
    """A gateway before WeCom answering 429 or 503 with ``Retry-After: 120`` (or its date): WeCom
    dropped it and the alert was retried at the engine's 0.5 s, doubling, so retry_max_attempts=3
    dead-lettered it within seconds. DingTalk and every other HTTP sink honour it; WeCom now does, on
    a message and on the application API's token fetch."""
    clock = ManualClock()
    async with (
        WeComReceiver(robot_key=KEY, corp_secret=CORP_SECRET, clock=clock.now) as wecom,
        Front(wecom.url) as front,
    ):
        if mode == "robot":
            options: dict[str, Any] = {"url": f"{front.url}/cgi-bin/webhook/send?key={KEY}"}
        else:
            options = {
                "url": front.url,
                "corp_id": wecom.corp_id,
                "corp_secret": CORP_SECRET,
                "agent_id": str(wecom.agent_id),
                "to_user": "alice",
            }
        context = SinkContext(name="wecom", cluster="prod", data_dir=None, logger=LOG)
        sink = WeComSink(WeComOptions.model_validate(options), context, clock=clock)
        await sink.start()  # the application API fetches its token here, relayed
        if path == "/cgi-bin/gettoken":
            clock.advance(wecom.expires_in)  # the token is due for a refresh at the next message
        front.answers.append((path, status, {"Retry-After": in_two_minutes() if after == "date" else after}))
        batch = [alert("web-0")]
        try:
            (out,) = await sink.send(batch) or []
            clock.advance(120)
            (then,) = await sink.send(batch) or []
        finally:
            await sink.aclose()
    assert front.answered == [path]
    assert out.kind is OutcomeKind.RETRY and not out.held and f"HTTP {status}" in out.reason
    assert out.retry_after is not None
    if after == "date":
        assert 110 <= out.retry_after <= 120
    else:
        assert out.retry_after == 120
    assert_no_secret(out.reason)
    assert then.kind is OutcomeKind.OK and len(wecom.accepted) == 1
