"""A reload's swap and what the engine gives up meanwhile, for the alert robots and the webhook (item
328's Left).

The swap sets ``self.sink = new``, awaits the old instance's close, and only then calls
``new.take_over(old)``. An occurrence given up while the close awaits (here: dropped from a full
memory queue) was told to the new instance alone, which held nothing yet; ``take_over`` then carried
the old instance's record of it. A robot kept it pooled and paged it with its next digest, while the
metrics counted it dropped; the webhook's ``_failing`` kept its key (and the data dir's file got it
back at the next write). tests/test_engine_s36.py has Loki's side."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from swap_helpers import ClosesSlowly

from eventrouter.engine.pipeline import Pipeline, queue_cost
from eventrouter.metrics import Metrics
from eventrouter.record import Occurrence
from eventrouter.sink import SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks._alerting import AlertSink, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink
from eventrouter_sinks.wecom import WeComOptions, WeComSink

Key = tuple[str, int]
ROBOT = "robot"
HOOK = "webhook"


def _keys(occs: Sequence[Occurrence]) -> set[Key]:
    return {(occ.uid, occ.number) for occ in occs}


def _aside(pipeline: Pipeline) -> set[Key]:
    """What the engine holds set aside now."""
    return {(occ.uid, occ.number) for _, _, occ in pipeline._aside.heap}


def _count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


# ---------------------------------------------------------------------------------------- the robots


class _SlowDingTalk(ClosesSlowly, DingTalkSink):
    """A DingTalk instance whose close waits until the test lets it end."""


class _SlowWeCom(ClosesSlowly, WeComSink):
    """A WeCom group-robot instance whose close waits until the test lets it end."""


def _robot_sink(kind: str, url: str, clock: ManualClock, *, slow: bool = False) -> AlertSink[Any]:
    context = SinkContext(name=ROBOT, cluster="prod", data_dir=None, logger=logging.getLogger("test.robot"))
    if kind == "dingtalk":
        ding: type[DingTalkSink] = _SlowDingTalk if slow else DingTalkSink
        return ding(DingTalkOptions.model_validate({"url": url}), context, clock=clock)
    wecom: type[WeComSink] = _SlowWeCom if slow else WeComSink
    return wecom(WeComOptions.model_validate({"url": url}), context, clock=clock)


@asynccontextmanager
async def _robot(kind: str, clock: ManualClock) -> AsyncIterator[tuple[str, Callable[[], list[str]]]]:
    """The robot's receiver (its rate limit on ``clock``): its URL, and the texts it accepted."""
    if kind == "dingtalk":
        async with DingTalkReceiver(access_token="robot-token-328", clock=clock.now, wall=clock.wall) as ding:
            yield ding.url, lambda: [m.text for m in ding.accepted]
    else:
        async with WeComReceiver(robot_key="robot-key-328", clock=clock.now) as wecom:
            yield wecom.robot_url, lambda: [m.text for m in wecom.accepted]


def _alert(name: str, message: str, **kwargs: Any) -> Occurrence:
    return make_occurrence(cluster="prod", namespace="shop", object_name=name, message=message, **kwargs)


def _costing(cost: int) -> Occurrence:
    """An occurrence of ``cost`` bytes against the memory bound (``queue_cost``), its message padded."""
    bare = _alert("storm", "", reason="Storm")
    occ = _alert("storm", "x" * ((cost - queue_cost(bare)) // 2), reason="Storm")
    assert queue_cost(occ) == cost
    return occ


@pytest.mark.parametrize("kind", ["dingtalk", "wecom"])
async def test_a_robot_never_pages_an_occurrence_given_up_while_the_swap_closes_the_old_instance(
    kind: str,
) -> None:
    """Four groups paged; a repeat of each held for its digest (window 300 s): pooled by the old
    instance, set aside by the engine. A reload's swap closes the old instance, and meanwhile an
    occurrence too large for the memory left drops the two repeats due first (`queue_full`). After
    the take-over, the digest at the end of the window pages the two kept, once each (the engine's
    offer of them at the stop is answered from the sink's memory), and never the two dropped."""
    clock = ManualClock()  # the sinks' and the receiver's time: a window passes at once
    metrics = Metrics()
    async with _robot(kind, clock) as (url, texts):
        old = _robot_sink(kind, url, clock, slow=True)
        assert isinstance(old, ClosesSlowly)
        new = _robot_sink(kind, url, clock)
        names = [f"web-{i}" for i in range(4)]
        firsts = [_alert(name, f"first {name}") for name in names]
        repeats = [
            _alert(name, f"again {name}", uid=f.uid, count=2) for name, f in zip(names, firsts, strict=True)
        ]
        kick, tick = _alert("kick", "kick", reason="Kick"), _alert("tick", "tick", reason="Tick")
        (cost,) = {queue_cost(occ) for occ in [*firsts, *repeats]}
        # Memory holds the four repeats set aside and the kick; the storm needs the room of two repeats.
        bound = 4 * cost + queue_cost(kick)
        storm = _costing(queue_cost(kick) + 2 * cost - 2)
        pipeline = pipeline_for(
            ROBOT, old, metrics, None, queue_max_bytes=bound, retry_initial_backoff=60, retry_max_backoff=60
        )
        async with drained(pipeline):
            try:
                for occ in firsts:
                    pipeline.offer(occ)
                await until(lambda: _count(metrics.delivered, ROBOT) == 4)
                for occ in repeats:
                    pipeline.offer(occ)
                await until(lambda: _aside(pipeline) == _keys(repeats))  # held for their digest
                assert {occ.key for occ in repeats} <= old._pending_of.keys()

                pipeline.replace_sink(new)
                pipeline.offer(kick)  # a send is due: the swap runs
                await asyncio.wait_for(old.closing.wait(), 10)
                assert pipeline.sink is new and new._pending_of is not old._pending_of  # not taken over yet

                pipeline.offer(storm)  # memory is full: the repeats due first are dropped
                kept = [occ for occ in repeats if (occ.uid, occ.number) in _aside(pipeline)]
                dropped = [occ for occ in repeats if (occ.uid, occ.number) not in _aside(pipeline)]
                assert len(dropped) == 2 and _count(metrics.dropped, ROBOT, "queue_full") == 2

                old.release.set()
                await until(lambda: new._pending_of is old._pending_of)  # taken over
                await until(lambda: _count(metrics.delivered, ROBOT) == 6)  # the kick and the storm, paged
                clock.advance(300)  # the repeats' window ends: their digest goes with the next send
                pipeline.offer(tick)
                await until(lambda: _count(metrics.delivered, ROBOT) == 7)
            finally:
                old.release.set()
        digest = texts()[-1]
        assert "tick" in digest and all(
            f"again {occ.record['involved_object']['name']}" in digest for occ in kept
        )
        for occ in dropped:
            name = occ.record["involved_object"]["name"]
            assert not [text for text in texts() if f"again {name}" in text], (
                f"{occ.key} was given up, then paged"
            )
            assert occ.key not in new._pending_of and occ.key not in new._done
        for occ in kept:  # paged once: the digest; at the stop the engine's offer is answered OK
            name = occ.record["involved_object"]["name"]
            assert sum(text.count(f"again {name}") for text in texts()) == 1, texts()
    assert _count(metrics.delivered, ROBOT) == 9  # 4 firsts, kick, storm, tick, the 2 repeats kept
    assert len(texts()) == 4  # the firsts; the kick; the storm; the digest


# --------------------------------------------------------------------------------------- the webhook


class _SlowWebhook(ClosesSlowly, WebhookSink):
    """A webhook instance whose close waits until the test lets it end."""


def _webhook(cls: type[WebhookSink], url: str, data_dir: Path) -> WebhookSink:
    context = SinkContext(
        name=HOOK, cluster="test", data_dir=data_dir, logger=logging.getLogger("test.webhook")
    )
    return cls(WebhookOptions.model_validate({"url": url}), context)


def _written(path: Path) -> list[str]:
    """The keys of records set aside, as the webhook keeps them in its data dir (oldest first)."""
    keys: list[str] = orjson.loads(path.read_bytes())
    return keys


async def _set_aside_beside_a_good_one(pipeline: Pipeline, i: int) -> Occurrence:
    """A record the receiver fails on, in a batch with one it takes: the webhook sets it aside alone
    (``_failing``) and the engine holds it for a retry (in 60 s)."""
    before = _aside(pipeline)
    good = make_occurrence(object_name=f"good-{i}", message=f"fine {i}")
    bad = make_occurrence(object_name=f"bad-{i}", message=f"poison {i}")
    pipeline.offer(good)
    pipeline.offer(bad)
    await until(lambda: _aside(pipeline) == before | _keys([bad]))
    return bad


async def test_a_webhook_key_given_up_while_the_swap_closes_the_old_instance_does_not_come_back(
    tmp_path: Path,
) -> None:
    """Two records the receiver fails on are set aside (the webhook keeps their keys in ``_failing``
    and its data dir's file). A reload's swap closes the old instance, and meanwhile a full memory
    queue drops the older of them (the items set aside are over their share). After the take-over
    its key is not in the new instance's ``_failing``, and when the new instance next writes the
    file (a third record set aside), the file does not name it."""
    data = tmp_path / "data"
    data.mkdir()
    written = data / "webhook-set-aside.json"
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)  # a receiver's bug for some payloads
        old = _webhook(_SlowWebhook, hook.url, data)
        assert isinstance(old, ClosesSlowly)
        new = _webhook(WebhookSink, hook.url, data)
        # Memory: 3 occurrences, of which the items set aside may keep 1 once it is full.
        pipeline = pipeline_for(
            HOOK, old, metrics, None, queue_max_events=3, retry_initial_backoff=60, retry_max_backoff=60
        )
        async with drained(pipeline):
            try:
                first = await _set_aside_beside_a_good_one(pipeline, 0)
                second = await _set_aside_beside_a_good_one(pipeline, 1)
                assert _written(written) == [first.key, second.key]

                pipeline.replace_sink(new)
                pipeline.offer(make_occurrence(object_name="kick"))  # a send is due: the swap runs
                await asyncio.wait_for(old.closing.wait(), 10)
                assert pipeline.sink is new and new._failing is not old._failing  # not taken over yet
                for i in range(2):  # memory is full: the oldest set aside over their share is dropped
                    pipeline.offer(make_occurrence(object_name=f"storm-{i}"))
                assert _aside(pipeline) == _keys([second])
                assert _count(metrics.dropped, HOOK, "queue_full") == 1
                sent = len([r for r in hook.requests if b"poison 0" in r.body])

                old.release.set()
                await until(lambda: new._failing is old._failing)  # taken over
                await until(lambda: _count(metrics.delivered, HOOK) == 5)  # 2 good, the kick, the storms
                third = await _set_aside_beside_a_good_one(pipeline, 2)  # the new instance writes the file
                assert _written(written) == [second.key, third.key], "a key given up came back"
                assert first.key not in new._failing and first.key not in new._unsure
            finally:
                old.release.set()
    assert _count(metrics.dropped, HOOK, "queue_full") == 1
    assert len([r for r in hook.requests if b"poison 0" in r.body]) == sent  # given up: never sent again
