"""A robot send keeps within the engine's ``send_timeout`` (session 31's robot review, findings 2
and 4): cut off, the engine sends the batch again whole, and a message the robot took meanwhile is
paged a second time.

Through the engine's own Pipeline (``pipeline_for``), against the project's robot receivers behind a
``SlowFront``: the robot takes each request at once and its answer comes back late (a slow gateway,
a far region), so a request costs its time while the robot has already counted and shown it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from eventrouter import Occurrence, SinkContext
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks._alerting import AlertSink
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink
from eventrouter_sinks.wecom import WeComOptions, WeComSink

LOG = logging.getLogger("test.robot_budget")
HEADER = re.compile(r"Kubernetes: (\d+) events?")


class SlowFront(Relay):
    """Relays each request at once and holds the answer ``delay`` seconds."""

    delay = 0.0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        answer = await self.relay(request, body)  # the robot has taken it ...
        await asyncio.sleep(self.delay)  # ... and its answer is slow to come back
        return answer


@asynccontextmanager
async def running(
    sink: AlertSink[Any], metrics: Metrics, dead: Path, **knobs: Any
) -> AsyncIterator[Pipeline]:
    pipeline = pipeline_for(sink.context.name, sink, metrics, dead, **knobs)
    async with drained(pipeline, 15):
        yield pipeline


def occ(obj: str, n: int) -> Occurrence:
    return make_occurrence(
        cluster="prod",
        namespace="shop",
        name=f"{obj}.ev",
        uid=f"uid-{obj}",
        object_name=obj,
        reason="BackOff",
        type="Warning",
        count=n,
    )


def timeouts(metrics: Metrics, name: str) -> float:
    return float(metrics.send_errors.labels(name, "timeout")._value.get())


async def test_no_round_of_a_send_starts_a_message_past_its_budget(tmp_path: Path) -> None:
    """Item 115 checked the send's deadline only between the messages of one pack. When the pack
    ended, the send went round again for groups that came due meanwhile (held repeats whose window
    ended), and when the robot's answers took longer than ``min_interval`` no wait, and no deadline,
    came before the next message. In a storm one send chained messages until the engine cut it off
    at ``send_timeout``; the message in flight then was taken by the robot and paged again with the
    next send (the review counted 32 occurrences paged of 30 offered, 474 of 450 at the defaults).
    Now every message but the send's first starts only when it can end within the budget."""
    async with (
        DingTalkReceiver(access_token="tok", rate_per_minute=1000) as robot,
        SlowFront(robot.base_url.rsplit("/robot", 1)[0]) as front,
    ):
        front.delay = 0.5
        options = {
            "url": f"{front.url}/robot/send?access_token=tok",
            "window": 3,
            "min_interval": 0.2,
            "request_timeout": 1.0,
            "rate_per_minute": 1000,
        }
        context = SinkContext(name="dingtalk", cluster="prod", data_dir=None, logger=LOG, send_timeout=2.0)
        sink = DingTalkSink(DingTalkOptions.model_validate(options), context)
        metrics = Metrics()
        knobs = {"send_timeout": 2.0, "retry_initial_backoff": 0.05, "retry_max_backoff": 0.2}
        offered = 0
        async with running(sink, metrics, tmp_path / "dead", **knobs) as pipeline:
            # Six crash-looping pods, first paged about 0.6 s apart (their windows end so) ...
            pods = [f"pod-{i}" for i in range(6)]
            for pod in pods:
                pipeline.offer(occ(pod, 1))
                offered += 1
                await asyncio.sleep(0.6)
            # ... each repeats twice, held until its window ends ...
            for pod in pods:
                pipeline.offer(occ(pod, 2))
                pipeline.offer(occ(pod, 3))
                offered += 2
            await asyncio.sleep(0.3)
            # ... while new problems keep a send going as the held groups come due.
            for k in range(4):
                pipeline.offer(occ(f"new-{k}", 1))
                offered += 1
                await asyncio.sleep(0.9)
            delivered = metrics.delivered.labels("dingtalk")
            await until(lambda: delivered._value.get() >= offered, timeout=15)
    paged = sum(int(m.group(1)) for msg in robot.accepted if (m := HEADER.search(msg.text)))
    assert paged == offered  # each occurrence in exactly one accepted message
    assert timeouts(metrics, "dingtalk") == 0


async def test_wecoms_application_api_spends_no_more_than_the_sends_budget_on_one_message(
    tmp_path: Path,
) -> None:
    """WeCom's application API may need up to four requests for one message (gettoken when the
    token is near its end, message/send, and after a 42001 both again), but a send's budget held
    one. WeCom ended the token early; message/send answered 42001 and the new token's message/send
    went out at 1.4 s of a 2 s send_timeout; the engine cut the send off after WeCom took it, and
    the retry paged it again: two messages for one alert. Now no request that could end past the
    send's budget starts (the alert is held, and goes with a later send), and a token near its end
    (or refused) is renewed before the send waits for the rate limiter."""
    async with (
        WeComReceiver(corp_secret="corp-secret-1") as wecom,
        SlowFront(wecom.url) as front,
    ):
        options = {
            "url": front.url,
            "corp_id": wecom.corp_id,
            "corp_secret": "corp-secret-1",
            "agent_id": wecom.agent_id,
            "to_user": "alice",
            "request_timeout": 1.2,
        }
        context = SinkContext(name="wechat", cluster="prod", data_dir=None, logger=LOG, send_timeout=2.0)
        sink = WeComSink(WeComOptions.model_validate(options), context)
        metrics = Metrics()
        knobs = {"send_timeout": 2.0, "retry_initial_backoff": 0.05, "retry_max_backoff": 0.1}
        async with running(sink, metrics, tmp_path / "dead", **knobs) as pipeline:
            await until(lambda: wecom.gettoken_calls() == 1)  # started: a token
            wecom.expire_tokens()  # WeCom ends it early: 42001 next
            front.delay = 0.7  # every answer 0.7 s, below request_timeout
            pipeline.offer(
                make_occurrence(
                    cluster="prod", namespace="shop", name="db-0", reason="OOMKilling", type="Warning"
                )
            )
            delivered = metrics.delivered.labels("wechat")
            # Delivered once the engine has its OK: after the second page when a send was cut off.
            await until(lambda: delivered._value.get() == 1, timeout=15)
    assert len(wecom.accepted) == 1
    assert timeouts(metrics, "wechat") == 0
    assert wecom.errcodes("/cgi-bin/message/send") == [42001, 0]
