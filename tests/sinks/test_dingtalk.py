"""DingTalk robot sink against the project's DingTalk receiver (signature, keywords, schema, errcodes,
rate limit as oapi.dingtalk.com enforces them).

Time: tests that involve minutes (the flood, digest windows, "too fast" back-off) share one
``ManualClock`` between the sink and the receiver, so a simulated minute takes milliseconds. The
limits are the real ones (20 messages per rolling 60 s, window 300 s), not scaled down.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext, SinkError, normalise
from eventrouter.config import ConfigError, build_specs, parse_sink_flag, spec_for_class
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.reload import SinkReloader
from eventrouter.metrics import Metrics
from eventrouter.options import COMMON_KEYS, FilterOptions, field_names
from eventrouter.testing import make_occurrence, recorded_watch
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.dingtalk import DingTalkMessage, DingTalkReceiver
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.waiting import until
from eventrouter_sinks._alerting import WARM_UP, GroupView, ManualClock, SystemClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink

SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
TOKEN = "robot-token-7f3a"


def ctx(name: str = "dingtalk", send_timeout: float = 30.0) -> SinkContext:
    return SinkContext(
        name=name,
        cluster="prod",
        data_dir=None,
        logger=logging.getLogger(f"test.{name}"),
        send_timeout=send_timeout,
    )


def stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def occ(n: int = 1, **kw: Any) -> Occurrence:
    kw.setdefault("namespace", "shop")
    return make_occurrence(cluster="prod", count=n, **kw)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


class RealClock(SystemClock):
    """Real time, which a test can move ahead (a sink that has run for a while): for a robot whose
    answers take real time."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def now(self) -> float:
        return super().now() + self.ahead

    def wall(self) -> float:
        return super().wall() + self.ahead

    def advance(self, seconds: float) -> None:
        self.ahead += seconds


@pytest.fixture
async def robot(clock: ManualClock) -> AsyncIterator[DingTalkReceiver]:
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, clock=clock.now, wall=clock.wall) as r:
        yield r


async def make_sink(url: str, clock: ManualClock | None = None, **opts: Any) -> DingTalkSink:
    # A simulated clock everywhere: the sink's pacing (3 s between digests) costs no real time.
    sink = DingTalkSink(
        DingTalkOptions.model_validate({"url": url, **opts}), ctx(), clock=clock or ManualClock()
    )
    await sink.start()
    return sink


def kinds(outcomes: Sequence[Any] | None) -> list[OutcomeKind]:
    assert outcomes is not None
    return [o.kind for o in outcomes]


_ENTRY = re.compile(r"^(?:\*\*)?[^\s*]+(?:\*\*)? (?:\u00d7(\d+) in |\d\d-\d\d )", re.M)
_SUMMARY = re.compile(r"and (\d+) more events?:")
_HEADER = re.compile(r"Kubernetes: (\d+) events?")


def counted(msg: DingTalkMessage | str) -> int:
    """Occurrences a digest accounts for, read from its lines (×N, or 1) and its summary."""
    text = msg if isinstance(msg, str) else msg.text
    lines = sum(int(n) if n else 1 for n in _ENTRY.findall(text))
    summary = sum(int(n) for n in _SUMMARY.findall(text))
    header = _HEADER.search(text)
    assert header is not None and int(header.group(1)) == lines + summary, text
    return lines + summary


async def drive(
    sink: DingTalkSink, clock: ManualClock, arrivals: list[tuple[float, Occurrence]], *, limit: float = 7200
) -> tuple[Counter[str], list[str]]:
    """Stand-in for the engine: every simulated second, send what arrived plus the retries that are
    due (honouring retry_after); count OK outcomes per occurrence key."""
    start = clock.now()
    todo = sorted(arrivals, key=lambda a: a[0])
    retries: list[tuple[float, Occurrence]] = []
    ok: Counter[str] = Counter()
    rejected: list[str] = []
    while (todo or retries) and clock.now() - start < limit:
        now = clock.now()
        batch = [o for t, o in todo if start + t <= now]
        todo = [(t, o) for t, o in todo if start + t > now]
        batch += [o for due, o in retries if due <= now]
        retries = [(due, o) for due, o in retries if due > now]
        if batch:
            outcomes = await sink.send(batch)
            assert outcomes is not None and len(outcomes) == len(batch)
            for o, out in zip(batch, outcomes, strict=True):
                if out.kind is OutcomeKind.OK:
                    ok[o.key] += 1
                elif out.kind is OutcomeKind.RETRY:
                    retries.append((clock.now() + max(out.retry_after or 1.0, 0.5), o))
                else:
                    rejected.append(f"{o.key}: {out.reason}")
        clock.advance(1.0)
    return ok, rejected


def max_in_any_minute(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + 60.0) for t in times), default=0)


# ------------------------------------------------------------------------------------------ signing


async def test_signed_markdown_digest_is_accepted_and_reported_ok(robot: DingTalkReceiver) -> None:
    sink = await make_sink(robot.url, secret=SECRET)
    try:
        batch = [occ(object_name=f"web-{i}", reason="BackOff") for i in range(3)]
        assert kinds(await sink.send(batch)) == [OutcomeKind.OK] * 3
    finally:
        await sink.aclose()
    assert robot.errcodes() == [0]
    (req,) = robot.requests
    assert req.query["access_token"] == TOKEN and req.query["timestamp"].isdigit() and req.query["sign"]
    (msg,) = robot.accepted
    assert msg.msgtype == "markdown"
    assert all(f"shop/web-{i}" in msg.text for i in range(3))
    assert counted(msg) == 3


async def test_a_wrong_secret_310000_is_retried_warned_of_once_and_the_secret_never_logged(
    robot: DingTalkReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """ "sign not match" refuses the sender, not the message (item 111's 401): dead-lettered, every
    alert of a secret rotation was lost. Retried now (a failure: the sink is down), one warning."""
    wrong = "SECwrongwrongwrongwrong"
    sink = await make_sink(robot.url, secret=wrong)
    caplog.set_level(logging.DEBUG)
    try:
        first = await sink.send([occ(object_name="a"), occ(object_name="b", reason="Unhealthy")])
        second = await sink.send([occ(object_name="c", reason="Failed")])
    finally:
        await sink.aclose()
    assert first is not None and second is not None
    assert {(o.kind, o.held) for o in [*first, *second]} == {(OutcomeKind.RETRY, False)}
    assert all("310000" in o.reason and "sign not match" in o.reason for o in [*first, *second])
    assert robot.errcodes() == [310000, 310000]
    warned = [r for r in caplog.records if "credentials refused" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "check secret" in warned[0].getMessage()
    assert sink.limiter.free() == 20  # refused before the robot: no message of its minute
    everything = caplog.text + " ".join(o.reason for o in [*first, *second]) + repr(sink.options)
    assert wrong not in everything and TOKEN not in everything and SECRET not in everything


async def test_an_expired_timestamp_is_refused_like_the_service_and_retried(clock: ManualClock) -> None:
    # The receiver's wall clock is 2 h ahead: the sink's signature timestamp is outside the hour.
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, wall=lambda: clock.wall() + 7200) as robot:
        sink = await make_sink(robot.url, secret=SECRET, clock=clock)
        try:
            (out,) = await sink.send([occ()]) or []
        finally:
            await sink.aclose()
    assert out.kind is OutcomeKind.RETRY and "invalid timestamp" in out.reason and "clock" in out.reason


async def test_an_unknown_access_token_is_retried_not_dead_lettered(robot: DingTalkReceiver) -> None:
    """300001: the robot's webhook was reset (a new access_token) or the robot removed; dead-lettering
    lost every alert until the new token reached the pod."""
    sink = await make_sink(robot.base_url + "?access_token=nope", secret=SECRET)
    alert = occ()
    try:
        (out,) = await sink.send([alert]) or []
        robot.access_token = "nope"  # the pod's token is the robot's again
        (again,) = await sink.send([alert]) or []
    finally:
        await sink.aclose()
    assert out.kind is OutcomeKind.RETRY and "300001" in out.reason and "check access_token" in out.reason
    assert again.kind is OutcomeKind.OK and robot.errcodes() == [300001, 0]


async def test_a_signing_secret_reset_in_the_console_first_dead_letters_nothing(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The secret is reset in the DingTalk console (the old one stops at once); the pod's Secret
    volume follows a little later. Every alert of that gap was dead-lettered (310000 sign not
    match), never paged. Now they wait in the engine and are paged once, with the new secret."""
    old, new = "SEC" + "a" * 61, "SEC" + "b" * 61
    volume = SecretVolume(tmp_path / "secrets", {"ding-secret": old})
    metrics = Metrics()
    async with DingTalkReceiver(access_token=TOKEN, secret=old) as robot:
        (spec,) = build_specs(
            [
                f"dingtalk:{robot.url}&secret=file:{volume.file('ding-secret')}&min_interval=0&rate_per_minute=1000"
                "&batch_max_wait=0.01&retry_initial_backoff=0.01&retry_max_backoff=0.05"
            ]
        )
        sink = spec.build(ctx(spec.name))
        timing = spec.pipeline.model_dump(
            include={"batch_max_wait", "retry_initial_backoff", "retry_max_backoff"}
        )
        pipeline = pipeline_for(spec.name, sink, metrics, tmp_path / "dl", **timing)
        reloader = SinkReloader(spec, pipeline, metrics)
        task = asyncio.create_task(pipeline.run())
        delivered = metrics.delivered.labels(spec.name)
        dead = metrics.dead_lettered.labels(spec.name, "rejected")
        pods = [occ(object_name=f"pod-{i}") for i in range(15)]
        try:
            for o in pods[:5]:
                pipeline.offer(o)
            await until(lambda: delivered._value.get() == 5)
            robot.secret = new  # reset in the console
            for o in pods[5:10]:  # alerts while the kubelet has not synced the Secret yet
                pipeline.offer(o)
            await until(lambda: robot.errcodes().count(310000) >= 3 or dead._value.get() > 0)
            assert dead._value.get() == 0  # retried, three rounds or more
            volume.update({"ding-secret": new})  # the pod's Secret volume follows
            assert not reloader.check() and reloader.check()  # seen, then settled: rebuilt
            for o in pods[10:]:
                pipeline.offer(o)
            await until(lambda: delivered._value.get() == 15)
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 10)
            await pipeline.close_sink()
    assert dead._value.get() == 0
    paged = Counter(re.findall(r"shop/(pod-\d+)", "".join(m.text for m in robot.accepted)))
    assert paged == {f"pod-{i}": 1 for i in range(15)}
    refused = [r.getMessage() for r in caplog.records if "credentials refused" in r.getMessage()]
    assert len(refused) == 1 and "sign not match" in refused[0], refused  # once, however many refusals
    assert old not in caplog.text and new not in caplog.text


# ------------------------------------------------------------------------------------------ keywords


async def test_keyword_security_refuses_without_keyword_and_accepts_with_it() -> None:
    async with DingTalkReceiver(access_token=TOKEN, keywords=["告警"]) as robot:
        plain = await make_sink(robot.url)
        guarded = await make_sink(robot.url, keywords="告警")
        try:
            (refused,) = await plain.send([occ()]) or []
            (accepted,) = await guarded.send([occ(object_name="web-1")]) or []
        finally:
            await plain.aclose()
            await guarded.aclose()
    assert refused.kind is OutcomeKind.REJECT and "keywords not in content" in refused.reason
    assert accepted.kind is OutcomeKind.OK
    (msg,) = robot.accepted
    assert "告警" in msg.text and "告警" in msg.title


# ------------------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("msg_type", ["text", "markdown", "actionCard"])
async def test_each_message_type_passes_the_schema_check(robot: DingTalkReceiver, msg_type: str) -> None:
    action_url = "https://grafana.example/explore?ns={namespace}&obj={object}"
    sink = await make_sink(robot.url, secret=SECRET, msg_type=msg_type, action_url=action_url)
    try:
        outs = await sink.send(
            [occ(object_name="web 0", reason="BackOff"), occ(object_name="api", reason="Failed")]
        )
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 2
    (msg,) = robot.accepted
    assert msg.msgtype == msg_type
    assert counted(msg) == 2
    if msg_type == "actionCard":
        card = msg.payload["actionCard"]
        assert card["singleURL"].startswith("https://grafana.example/explore?ns=shop&obj=")
        assert card["singleTitle"] == "View events"
    if msg_type == "text":
        assert "**" not in msg.text  # no markdown syntax in plain text


async def test_actioncard_without_action_url_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="action_url"):
        DingTalkOptions.model_validate({"access_token": "x", "msg_type": "actionCard"})


# ------------------------------------------------------------------------------------------ mentions


async def test_mentions_follow_the_rules(robot: DingTalkReceiver) -> None:
    sink = await make_sink(
        robot.url,
        secret=SECRET,
        at_mobiles="13800000000",
        at_user_ids="ops-lead",
        at_all_reasons="OOMKilling,NodeNotReady",
    )
    try:
        assert kinds(await sink.send([occ(reason="BackOff")])) == [OutcomeKind.OK]
        assert kinds(await sink.send([occ(reason="OOMKilling", kind="Node", object_name="node-1")])) == [
            OutcomeKind.OK
        ]
    finally:
        await sink.aclose()
    backoff, oom = robot.accepted
    assert backoff.mentions == {"mobiles": ["13800000000"], "user_ids": ["ops-lead"], "all": False}
    assert "@13800000000" in backoff.text and "@ops-lead" in backoff.text  # DingTalk highlights only these
    assert oom.mentions["all"] is True


async def test_at_reasons_limit_who_is_mentioned(robot: DingTalkReceiver) -> None:
    sink = await make_sink(
        robot.url, secret=SECRET, msg_type="text", at_mobiles="13800000000", at_reasons="OOMKilling"
    )
    try:
        await sink.send([occ(reason="BackOff")])
    finally:
        await sink.aclose()
    (msg,) = robot.accepted
    assert msg.mentions["mobiles"] == [] and "@13800000000" not in msg.text


async def test_at_reasons_and_at_all_reasons_match_reasons_ignoring_case_as_the_filters_do(
    robot: DingTalkReceiver,
) -> None:
    # The sink filter `reasons=oomkilling` lets OOMKilling through (item 93); the same lower-case
    # name in the mention rules mentioned nobody, silently.
    keep = compile_filter(FilterOptions.model_validate({"reasons": ["oomkilling", "backoff"]}))
    oom = occ(reason="OOMKilling", kind="Node", object_name="node-1")
    assert keep is not None and keep(oom)
    sink = await make_sink(
        robot.url,
        secret=SECRET,
        at_mobiles="13800000000",
        at_reasons="oomkilling",
        at_all_reasons="OOMKILLING",
    )
    try:
        assert kinds(await sink.send([oom])) == [OutcomeKind.OK]
        assert kinds(await sink.send([occ(reason="BackOff")])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    paged, other = robot.accepted
    assert paged.mentions == {"mobiles": ["13800000000"], "user_ids": [], "all": True}
    assert other.mentions == {"mobiles": [], "user_ids": [], "all": False}


# ------------------------------------------------------------------------------------------ escaping


def recorded_unhealthy() -> Occurrence:
    for ev in recorded_watch():
        obj = ev["object"]
        if ev["type"] == "ADDED" and "就绪探针失败" in str(obj.get("message")):
            return normalise(obj, cluster="prod")
    raise AssertionError("the recording has the Chinese Unhealthy event")


async def test_recorded_chinese_quotes_backslashes_newline_survive_markdown_and_text(
    robot: DingTalkReceiver,
) -> None:
    recorded = recorded_unhealthy()
    raw_message = recorded.record["message"]
    assert '"quoted"' in raw_message and "\\" in raw_message and "\n" in raw_message
    hostile = occ(
        object_name="x",
        reason="Evil",
        message='# Heading\n**bold** [link](http://x) <@all> | `code` _u_ ~s~ "q" \\ end',
    )
    md = await make_sink(robot.url, secret=SECRET)
    text = await make_sink(robot.url, secret=SECRET, msg_type="text")
    try:
        assert kinds(await md.send([recorded, hostile])) == [OutcomeKind.OK] * 2
        assert kinds(await text.send([normalise(recorded.raw, cluster="prod")])) == [OutcomeKind.OK]
    finally:
        await md.aclose()
        await text.aclose()
    md_msg, text_msg = robot.accepted
    body = md_msg.text
    # JSON round trip kept every character; markdown specials of user content are escaped.
    assert "就绪探针失败：连接被拒绝" in body and '"quoted"' in body
    assert "\\\\ back\\\\slash" in body  # each backslash escaped
    assert "> \\# Heading" in body and "\\*\\*bold\\*\\*" in body and "\\[link\\](http://x)" in body
    assert "\\<@all\\>" in body and "\\`code\\`" in body
    # The event's newline stays inside the quote: the second line is quoted too, never a new block.
    lines = body.split("\n")
    assert any(ln == "> second line" for ln in lines)
    assert not any(ln.startswith(("# ", "**bold")) for ln in lines)
    # Plain text: content as written (no escapes), still one JSON string the receiver parsed.
    assert "就绪探针失败" in text_msg.text and '"quoted" \\ back\\slash' in text_msg.text
    assert counted(md_msg) == 2


async def test_huge_and_invalid_utf8_messages_get_outcomes_not_crashes(robot: DingTalkReceiver) -> None:
    sink = await make_sink(robot.url, secret=SECRET)
    try:
        outs = await sink.send(
            [
                occ(object_name="big", reason="Huge", message="x" * 20_000),
                occ(object_name="bad", reason="Broken", message="bad \ud800 surrogate"),
            ]
        )
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 2
    (msg,) = robot.accepted
    assert "…(+19700 chars)" in msg.text  # cut with a marker, never silently
    assert "bad ? surrogate" in msg.text
    assert len(orjson.dumps(msg.payload)) <= 19_000


# ------------------------------------------------------------------------------------------ digests


async def test_repeats_within_the_window_become_one_digest_line(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(robot.url, secret=SECRET, clock=clock)
    uid = "uid-web-0-backoff"
    try:
        t0 = stamp(clock.wall())
        first = await sink.send([occ(1, uid=uid, first_timestamp=t0, last_timestamp=t0)])
        assert kinds(first) == [OutcomeKind.OK]
        held: list[Occurrence] = []
        for n in range(2, 14):  # twelve repeats over four minutes
            clock.advance(20)
            msg = f"Back-off restarting failed container (attempt {n})"
            o = occ(n, uid=uid, message=msg, first_timestamp=t0, last_timestamp=stamp(clock.wall()))
            (out,) = await sink.send([o]) or []
            assert out.kind is OutcomeKind.RETRY and out.retry_after is not None and out.retry_after > 0
            held.append(o)
        assert len(robot.accepted) == 1
        clock.advance(300 - 12 * 20)
        outs = await sink.send(held[:1])  # the engine comes back with one; the digest carries all twelve
        assert kinds(outs) == [OutcomeKind.OK]
        assert kinds(await sink.send(held[1:])) == [OutcomeKind.OK] * 11
    finally:
        await sink.aclose()
    assert len(robot.accepted) == 2
    digest = robot.accepted[1].text
    assert "**BackOff** \u00d712 in 3m40s" in digest and "Pod shop/web-0" in digest
    assert "(attempt 13)" in digest and "12 different messages, last shown" in digest
    assert counted(robot.accepted[1]) == 12


async def test_a_digest_being_collected_survives_a_secret_rotation(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """The router rebuilds a sink whose secret file changed (engine/reload.py); the new instance
    takes over the digests the old one collected, so the repeats held before the change go out in
    one digest, each once, signed with the new secret."""
    old = await make_sink(robot.url, secret=SECRET, clock=clock)
    uid = "uid-web-0-backoff"
    t0 = stamp(clock.wall())
    assert kinds(await old.send([occ(1, uid=uid, first_timestamp=t0, last_timestamp=t0)])) == [OutcomeKind.OK]
    held: list[Occurrence] = []
    for n in range(2, 6):
        clock.advance(20)
        o = occ(n, uid=uid, first_timestamp=t0, last_timestamp=stamp(clock.wall()))
        assert kinds(await old.send([o])) == [OutcomeKind.RETRY]
        held.append(o)
    await old.aclose()
    rotated = "SEC" + "fedcba9876543210" * 4
    robot.secret = rotated
    new = DingTalkSink(
        DingTalkOptions.model_validate({"url": robot.url, "secret": rotated}), ctx(), clock=clock
    )
    new.take_over(old)
    await new.start()
    try:
        clock.advance(300 - 4 * 20)
        assert kinds(await new.send(held[:1])) == [OutcomeKind.OK]
        assert kinds(await new.send(held[1:])) == [OutcomeKind.OK] * 3  # already in that digest
    finally:
        await new.aclose()
    assert len(robot.accepted) == 2 and not [r for r in robot.requests if r.errcode != 0]
    assert "**BackOff** \u00d74 in 1 min" in robot.accepted[1].text and counted(robot.accepted[1]) == 4


async def test_a_repeat_the_engine_set_aside_does_not_ride_along_so_a_restart_cannot_page_it_twice(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """A message going out takes along groups whose window ends within a tenth of it. web-0's repeat
    had been answered "held" and waited in the engine (after a clean stop: in the spool); it rode
    along in web-1's message, and the next start's sink, which no longer knew that, paged it again.
    Only groups the engine offers whole in the batch ride along now."""
    sink = await make_sink(robot.url, secret=SECRET, clock=clock)
    uid = "uid-web-0-backoff"
    t0 = stamp(clock.wall())
    try:
        assert kinds(await sink.send([occ(1, uid=uid, first_timestamp=t0, last_timestamp=t0)])) == [
            OutcomeKind.OK
        ]
        clock.advance(10)
        repeat = occ(2, uid=uid, first_timestamp=t0, last_timestamp=stamp(clock.wall()))
        (held,) = await sink.send([repeat]) or []
        assert held.kind is OutcomeKind.RETRY and held.retry_after == pytest.approx(290)
        clock.advance(275)  # web-0's window ends in 15 s, within a tenth of it
        assert kinds(await sink.send([occ(object_name="web-1")])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    assert len(robot.accepted) == 2 and "shop/web-1" in robot.accepted[1].text
    assert "shop/web-0" not in robot.accepted[1].text
    # A stop now leaves the repeat in the spool, and the next start pages it: once in all.
    restarted = await make_sink(robot.url, secret=SECRET, clock=clock)
    try:
        assert kinds(await restarted.send([repeat])) == [OutcomeKind.OK]
    finally:
        await restarted.aclose()
    assert sum("shop/web-0" in m.text for m in robot.accepted) == 2


async def test_a_held_group_offered_whole_in_the_batch_rides_along_with_a_due_one(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(robot.url, secret=SECRET, clock=clock)
    uid = "uid-web-0-backoff"
    try:
        assert kinds(await sink.send([occ(1, uid=uid)])) == [OutcomeKind.OK]
        clock.advance(285)  # web-0's window ends in 15 s; its repeat and a new problem arrive together
        outs = await sink.send([occ(2, uid=uid), occ(object_name="web-1")])
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 2
    assert len(robot.accepted) == 2
    assert "shop/web-0" in robot.accepted[1].text and "shop/web-1" in robot.accepted[1].text


async def test_a_pool_full_of_held_repeats_does_not_hold_back_a_new_problem(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """``max_pending`` bounded every occurrence: with the pool full of repeats held for their
    window, a new problem was answered "retry in 5 s" until those windows ended, 300 s later. The
    bound now holds back only repeats of held groups; a new or due group goes out in the same send
    (a reserve of a tenth above the bound, used only while the robot takes nothing)."""
    sink = await make_sink(robot.url, secret=SECRET, clock=clock, max_pending=50)
    try:
        first = [occ(1, uid=f"u{i}", object_name=f"web-{i}") for i in range(10)]
        assert kinds(await sink.send(first)) == [OutcomeKind.OK] * 10
        clock.advance(5)
        repeats = [occ(n, uid=f"u{i}", object_name=f"web-{i}") for n in range(2, 7) for i in range(10)]
        outs = await sink.send(repeats)
        assert outs is not None and all(o.kind is OutcomeKind.RETRY and o.held for o in outs)
        oom = occ(object_name="node-7", kind="Node", namespace="", reason="OOMKilling")
        assert kinds(await sink.send([oom])) == [OutcomeKind.OK]  # paged in the same send
        assert "OOMKilling" in robot.accepted[-1].text
        (extra,) = await sink.send([occ(7, uid="u0", object_name="web-0")]) or []
        # The pool is full: a held group's repeat waits, and need not come back before its window ends.
        assert "50 occurrences already wait" in extra.reason and extra.held
        assert extra.retry_after == pytest.approx(295)
        # While the robot takes nothing, new problems fill the reserve (5) and no more.
        robot.fail_next(20, status=502)
        clock.advance(5)
        news = [occ(object_name=f"db-{i}", reason="Unhealthy") for i in range(10)]
        outs = await sink.send(news)
        assert outs is not None and all(o.kind is OutcomeKind.RETRY for o in outs)
        assert sum("already wait" in o.reason for o in outs) == 5
        assert sum("HTTP 502" in o.reason for o in outs) == 5
    finally:
        await sink.aclose()


@pytest.mark.parametrize(
    ("time_zone", "times"),
    [
        (
            "Asia/Shanghai",
            {"first_timestamp": "9999-12-31T23:00:00Z", "last_timestamp": "9999-12-31T23:00:00Z"},
        ),
        ("UTC", {"count": None, "event_time": "9999-12-31T23:59:59.999999Z"}),
    ],
)
async def test_an_event_time_past_what_the_time_zone_can_show_is_written_as_the_record_has_it(
    robot: DingTalkReceiver, time_zone: str, times: dict[str, Any]
) -> None:
    """An event stamped late on 9999-12-31 (a node's broken clock): in Asia/Shanghai, or rounded to
    float seconds, it is past year 9999, which datetime cannot hold. send() raised, the engine
    retried the batch for ever, and the pooled group made every later digest raise too."""
    sink = await make_sink(robot.url, secret=SECRET, time_zone=time_zone)
    late = make_occurrence(cluster="prod", namespace="shop", object_name="clock-broken", **times)
    try:
        outs = await sink.send([late, occ(object_name="web-1")])
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 2
    (msg,) = robot.accepted
    assert f"{late.record['time']} · Pod shop/clock-broken" in msg.text and "shop/web-1" in msg.text


class _Unrenderable(DingTalkSink):
    """Stands for any event content a line cannot be made of (no such content is known since the
    time fix above): the line of the object named ``poison`` raises."""

    def render_entry(self, view: GroupView, excerpt: int) -> str:
        if view.fields["object"] == "poison":
            raise ValueError("this line cannot be made")
        return super().render_entry(view, excerpt)


async def test_a_group_that_cannot_be_rendered_is_rejected_alone_and_the_rest_is_sent(
    robot: DingTalkReceiver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    options = DingTalkOptions.model_validate({"url": robot.url, "secret": SECRET})
    sink = _Unrenderable(options, ctx(), clock=clock)
    await sink.start()
    try:
        first = await sink.send([occ(object_name="poison"), occ(object_name="web-1")])
        clock.advance(10)
        second = await sink.send([occ(object_name="poison"), occ(object_name="web-2")])
    finally:
        await sink.aclose()
    assert first is not None and second is not None
    assert kinds(first) == kinds(second) == [OutcomeKind.REJECT, OutcomeKind.OK]
    reason = "cannot render the event for a digest: ValueError: this line cannot be made"
    assert first[0].reason == second[0].reason == reason
    assert [m.text.count("shop/") for m in robot.accepted] == [1, 1]
    assert "shop/poison" not in "".join(m.text for m in robot.accepted)
    assert sum(reason in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR) == 1


async def test_too_long_digest_is_summarised_with_counts_and_all_count_as_delivered(
    robot: DingTalkReceiver,
) -> None:
    sink = await make_sink(robot.url, secret=SECRET, max_message_bytes=2500, rate_per_minute=1)
    batch = [
        occ(object_name=f"pod-{i}", reason="BackOff" if i % 3 else "Unhealthy", message="m" * 100)
        for i in range(60)
    ]
    try:
        outs = await sink.send(batch)
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 60
    (msg,) = robot.accepted
    assert len(orjson.dumps(msg.payload)) <= 2500
    summary = _SUMMARY.search(msg.text)
    assert summary is not None and int(summary.group(1)) > 0
    assert re.search(r"BackOff \u00d7\d+, Unhealthy \u00d7\d+", msg.text)
    assert counted(msg) == 60
    # Every line shown is whole: each listed pod has its message quote right after it.
    assert msg.text.count("> mmmm") == len(_ENTRY.findall(msg.text))


async def test_one_event_too_long_for_a_line_is_counted_and_its_link_shortened_never_over_the_limit(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """A 20,000-character object name (legacy core/v1 Events do not bound it) in an actionCard: the
    card's link was filled from it, the message went over 20,000 bytes, the robot refused it (460101)
    and the five innocent alerts in it were dead-lettered. Now the lines that fit go out, the long
    one is counted, and a link that would be too long leaves that field out."""
    action = "https://grafana.example/d/k8s?var-ns={namespace}&var-pod={object}"
    sink = await make_sink(robot.url, secret=SECRET, clock=clock, msg_type="actionCard", action_url=action)
    clock.advance(WARM_UP)  # past its first minute, when a flush sends one message only
    batch = [
        occ(object_name="p" * 20_000),
        *(occ(object_name=f"web-{i}", reason="OOMKilling") for i in range(5)),
    ]
    try:
        outs = await sink.send(batch)
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 6
    assert robot.errcodes() == [0, 0]
    assert all(len(orjson.dumps(m.payload)) <= 19_000 for m in robot.accepted)
    lines, count = robot.accepted
    assert all(f"shop/web-{i}" in lines.text for i in range(5)) and counted(lines) == 5
    assert lines.payload["actionCard"]["singleURL"] == action.format(namespace="shop", object="web-0")
    assert "…and 1 more event: BackOff" in count.text and counted(count) == 1
    assert count.payload["actionCard"]["singleURL"] == action.format(namespace="shop", object="")


async def test_an_event_that_cannot_fit_even_as_a_count_is_rejected_alone(
    robot: DingTalkReceiver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The last guard: what no shortening makes fit (here a 30,000-character cluster name, shown
    in every header) is rejected with its reason, never sent over the limit with the rest."""
    sink = await make_sink(robot.url, secret=SECRET, clock=clock)
    huge = make_occurrence(cluster="c" * 30_000, namespace="shop", object_name="huge")
    try:
        outs = await sink.send([huge, *(occ(object_name=f"web-{i}") for i in range(3))])
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.REJECT] + [OutcomeKind.OK] * 3
    assert outs is not None and "does not fit the DingTalk robot's 19000-byte message" in outs[0].reason
    assert robot.errcodes() == [0] and counted(robot.accepted[0]) == 3
    assert sum("does not fit" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR) == 1


async def test_flood_500_warnings_in_a_minute_respects_the_limit_and_loses_nothing(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """500 Warning occurrences over one (simulated) minute from 25 pods × 4 reasons, default options."""
    reasons = ["BackOff", "Unhealthy", "FailedMount", "OOMKilling"]
    arrivals: list[tuple[float, Occurrence]] = []
    counts: Counter[tuple[int, str]] = Counter()
    for i in range(500):
        pod, reason = i % 25, reasons[(i // 25) % 4]
        counts[(pod, reason)] += 1
        o = occ(counts[(pod, reason)], uid=f"uid-{pod}-{reason}", object_name=f"web-{pod}", reason=reason)
        arrivals.append((i * 0.12, o))
    sink = await make_sink(robot.url, secret=SECRET, clock=clock)
    try:
        ok, rejected = await drive(sink, clock, arrivals)
    finally:
        await sink.aclose()
    assert rejected == []
    keys = {o.key for _, o in arrivals}
    assert len(keys) == 500
    assert set(ok) == keys and set(ok.values()) == {1}  # each occurrence OK exactly once
    assert 130101 not in robot.errcodes()  # the robot never had to throttle us
    assert max_in_any_minute([m.at for m in robot.accepted]) <= 20
    assert sum(counted(m) for m in robot.accepted) == 500  # every occurrence is in exactly one digest
    assert len(robot.accepted) < 500 / 5


async def test_a_send_waits_for_the_rate_limiter_only_within_the_engines_send_timeout(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """The engine cuts a send off after its send_timeout and sends the batch again whole, paging again
    a message that went out meanwhile. The sink could not read send_timeout: it waited up to
    max_send_wait (10 s) for its pacing and then sent. With send_timeout=6 (a budget of 5 s) and
    request_timeout=3 it now waits at most 2 s and answers held, to come back when it may send."""
    context = ctx(send_timeout=6)
    options = {"url": robot.url, "secret": SECRET, "rate_per_minute": 12, "request_timeout": 3}
    sink = DingTalkSink(DingTalkOptions.model_validate(options), context, clock=clock)
    await sink.start()
    try:
        assert kinds(await sink.send([occ(namespace="a", reason="BackOff")])) == [OutcomeKind.OK]
        began = clock.now()
        second = occ(namespace="b", reason="Unhealthy")
        outs = await sink.send([second])  # 5 s apart (min_interval, 60/12): over the 2 s it may wait
        assert outs is not None and outs[0].kind is OutcomeKind.RETRY and outs[0].held
        assert clock.now() - began <= 2
        assert len(robot.accepted) == 1
        clock.advance(5)
        assert kinds(await sink.send([second])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    assert len(robot.accepted) == 2


async def test_a_send_starts_no_further_message_past_its_budget() -> None:
    """A batch too big for one message goes out as up to three. Each may take request_timeout, so
    three in a row could outlast the engine's send_timeout, which then sends the batch again: what
    went out is paged twice. A send starts no further message that could end past its budget (here
    5/6 × 1.2 s, less request_timeout 0.5 s: at most one after the first), at a robot answering
    after 0.3 s. Since session 31 the last message it can send summarises the rest, so what it sent
    accounts for everything due (the code of session 24 sent two messages of lines, and the rest
    waited for later sends, each making its lines again)."""
    clock = RealClock()
    context = ctx(send_timeout=1.2)
    batch = [occ(namespace=f"ns-{i}", reason="BackOff", message="m" * 100) for i in range(60)]
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET, rate_per_minute=60, delay=0.3) as robot:
        options = {
            "url": robot.url,
            "secret": SECRET,
            "rate_per_minute": 60,
            "min_interval": 0,
            "request_timeout": 0.5,
            "max_message_bytes": 2500,
        }
        sink = DingTalkSink(DingTalkOptions.model_validate(options), context, clock=clock)
        await sink.start()
        clock.advance(WARM_UP)  # past its first minute, when a flush sends one message only
        try:
            outs = await sink.send(batch)
        finally:
            await sink.aclose()
    assert 1 <= len(robot.accepted) <= 2  # the code of session 24 sent all three (0.9 s of 1.2 s)
    assert kinds(outs) == [OutcomeKind.OK] * 60
    assert sum(counted(m) for m in robot.accepted) == 60 and "…and " in robot.accepted[-1].text


async def test_an_alert_the_engine_gave_up_is_not_paged_with_a_later_digest(tmp_path: Path) -> None:
    """retry_max_attempts=2 and the robot's front answers 502 twice: the engine dead-letters the
    alert (retries exhausted). The sink kept it pooled and paged it with the next digest, while the
    dead-letter file and the metrics said it was not delivered (and a replay paged it again)."""
    async with DingTalkReceiver(access_token=TOKEN, secret=SECRET) as robot:
        sink = DingTalkSink(
            DingTalkOptions.model_validate(
                {"url": robot.url, "secret": SECRET, "min_interval": 0, "rate_per_minute": 1000}
            ),
            ctx(),
        )
        metrics = Metrics()
        dead = tmp_path / "dead-letters"
        pipeline = pipeline_for(
            "dingtalk",
            sink,
            metrics,
            dead,
            retry_max_attempts=2,
            retry_initial_backoff=0.05,
            retry_max_backoff=0.1,
        )
        task = asyncio.create_task(pipeline.run())
        try:
            robot.fail_next(2, status=502)
            pipeline.offer(occ(namespace="shop", object_name="db-0", reason="OOMKilling"))
            exhausted = metrics.dead_lettered.labels("dingtalk", "retries_exhausted")
            await until(lambda: exhausted._value.get() == 1)
            pipeline.offer(occ(namespace="shop", object_name="web-1", reason="BackOff"))
            await until(lambda: metrics.delivered.labels("dingtalk")._value.get() == 1)
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 10)
            await pipeline.close_sink()
    (message,) = robot.accepted
    assert "web-1" in message.text and "db-0" not in message.text
    assert [
        orjson.loads(line)["record"]["involved_object"]["name"] for line in dead.read_bytes().splitlines()
    ] == ["db-0"]


# ------------------------------------------------------------------------------------------ errcodes


async def test_send_too_fast_waits_out_dingtalks_ten_minute_throttle_by_default(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """DingTalk throttles a robot for 10 minutes: tries at 60, 180 and 420 s only failed again."""
    sink = await make_sink(robot.url, secret=SECRET, clock=clock)
    robot.fail_next(1, errcode=130101, errmsg="send too fast, exceed 20 times per minute")
    try:
        outs = await sink.send([occ()])
        assert outs is not None and [o.retry_after for o in outs] == [600]
        clock.advance(420)  # where a 60 s back-off's third try fell
        assert kinds(await sink.send([occ()])) == [OutcomeKind.RETRY]
        assert len(robot.requests) == 1  # nothing sent inside the throttle
        clock.advance(180)
        assert kinds(await sink.send([occ()])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()


async def test_send_too_fast_is_retried_after_backoff_then_delivered(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(robot.url, secret=SECRET, clock=clock, throttle_backoff=30)
    robot.fail_next(1, errcode=130101, errmsg="send too fast, exceed 20 times per minute")
    batch = [occ(object_name="a"), occ(object_name="b")]
    try:
        outs = await sink.send(batch)
        assert outs is not None and kinds(outs) == [OutcomeKind.RETRY] * 2
        assert all("130101" in o.reason and o.retry_after == 30 for o in outs)
        # Before the back-off ends nothing is sent, even when the engine asks.
        assert kinds(await sink.send(batch)) == [OutcomeKind.RETRY] * 2
        assert len(robot.requests) == 1
        clock.advance(30)
        assert kinds(await sink.send(batch)) == [OutcomeKind.OK] * 2
    finally:
        await sink.aclose()
    assert robot.errcodes() == [130101, 0]
    assert counted(robot.accepted[0]) == 2


@pytest.mark.parametrize("errcode", [130101, 410100])
async def test_send_too_fast_holds_the_alerts_so_a_throttle_never_counts_as_failed_attempts(
    robot: DingTalkReceiver, clock: ManualClock, errcode: int
) -> None:
    """ "Send too fast" was a failure: each answer counted towards retry_max_attempts, and so did the
    occurrences of the same send whose digests never went out. It says nothing of the alerts: they
    are held (no attempt, never dead-lettered). 410100 is the newer DingTalk's code for it."""
    # One line per message (1024 bytes, 600-character messages): three digests, the first throttled.
    sink = await make_sink(
        robot.url, secret=SECRET, clock=clock, throttle_backoff=30, max_message_bytes=1024, excerpt_chars=600
    )
    clock.advance(WARM_UP)  # past its first minute, when a flush sends one message only
    robot.fail_next(1, errcode=errcode, errmsg="send too fast, exceed 20 times per minute")
    batch = [occ(object_name=f"web-{i}", message=f"{i}" * 600) for i in range(3)]
    try:
        outs = await sink.send(batch)
        assert len(robot.requests) == 1  # the other two digests were never sent
        assert outs is not None and kinds(outs) == [OutcomeKind.RETRY] * 3
        assert all(o.held and o.retry_after == 30 and str(errcode) in o.reason for o in outs)
        clock.advance(30)
        assert kinds(await sink.send(batch)) == [OutcomeKind.OK] * 3
    finally:
        await sink.aclose()
    assert robot.errcodes() == [errcode, 0, 0, 0]
    assert [counted(m) for m in robot.accepted] == [1, 1, 1]


async def test_a_throttle_outlasting_retry_max_attempts_dead_letters_nothing(tmp_path: Any) -> None:
    """Three "send too fast" answers with retry_max_attempts=3 dead-lettered the alert as "retries
    exhausted" while the robot was only throttled."""
    from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
    from eventrouter.engine.deadletter import DeadLetter
    from eventrouter.engine.pipeline import Pipeline
    from eventrouter.metrics import Metrics
    from eventrouter.options import PipelineOptions
    from eventrouter.testing.waiting import until

    metrics = Metrics()
    async with DingTalkReceiver(access_token=TOKEN) as robot:
        # A short throttle_backoff so that three throttles pass within the test.
        options = {"url": robot.url, "min_interval": 0, "rate_per_minute": 1000, "throttle_backoff": 0.05}
        sink = DingTalkSink(DingTalkOptions.model_validate(options), ctx())
        p = Pipeline(
            name="dingtalk",
            sink=sink,
            options=PipelineOptions.model_validate(
                {
                    "batch_max_wait": 0.01,
                    "retry_initial_backoff": 0.01,
                    "retry_max_backoff": 0.05,
                    "retry_max_attempts": 3,
                }
            ),
            predicate=None,
            checkpoint=SinkCheckpoint(MemoryCheckpoint()),
            deadletter=DeadLetter(tmp_path / "dl", sink="dingtalk"),
            metrics=metrics,
        )
        task = asyncio.create_task(p.run())
        robot.fail_next(3, errcode=130101, errmsg="send too fast, exceed 20 times per minute")
        p.offer(occ(object_name="web-0", reason="BackOff"))
        exhausted = metrics.dead_lettered.labels("dingtalk", "retries_exhausted")
        try:
            await until(lambda: exhausted._value.get() > 0 or len(robot.accepted) == 1, timeout=10)
        finally:
            p.close()
            await asyncio.wait_for(task, 10)
            await p.close_sink()
        assert robot.errcodes() == [130101, 130101, 130101, 0]
    assert exhausted._value.get() == 0
    assert metrics.retries.labels("dingtalk")._value.get() == 0  # a throttle is no failed attempt
    assert metrics.delivered.labels("dingtalk")._value.get() == 1


async def test_two_copies_of_one_occurrence_in_a_batch_get_one_answer_and_one_page(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    """Two copies of a key in one send (a spool copy beside a relist copy, both held aside by the
    engine): the first took the answer the digest left, the second was told "digest state lost;
    sending again" and was paged once more. Every copy now gets the same answer."""
    sink = await make_sink(robot.url, secret=SECRET, clock=clock)
    uid = "uid-web-0-backoff"
    try:
        first = occ(1, uid=uid)
        assert kinds(await sink.send([first, first])) == [OutcomeKind.OK] * 2
        clock.advance(10)
        repeat = occ(2, uid=uid, message="occurrence-2")
        held = await sink.send([repeat, repeat])
        assert held is not None and [o.kind for o in held] == [OutcomeKind.RETRY] * 2
        assert held[0] == held[1] and held[0].held
        clock.advance(290)  # the window ends: both copies come back together
        assert kinds(await sink.send([repeat, repeat])) == [OutcomeKind.OK] * 2
        clock.advance(5)
        assert kinds(await sink.send([occ(object_name="web-1")])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    assert len(robot.accepted) == 3
    assert sum("occurrence-2" in m.text for m in robot.accepted) == 1


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"status": 502}, "HTTP 502"),
        ({"body": b"<html>gateway</html>"}, "not its JSON reply"),
        ({"errcode": -1, "errmsg": "系统繁忙"}, "busy"),
    ],
)
async def test_http_errors_and_non_json_bodies_are_retried(
    robot: DingTalkReceiver, fault: dict[str, Any], reason: str
) -> None:
    sink = await make_sink(robot.url, secret=SECRET)
    robot.fail_next(1, **fault)
    try:
        (out,) = await sink.send([occ()]) or []
        assert out.kind is OutcomeKind.RETRY and reason in out.reason
        (again,) = await sink.send([occ(object_name="other")]) or []
    finally:
        await sink.aclose()
    assert again.kind is OutcomeKind.OK
    assert counted(robot.accepted[0]) == 2  # the retried one went out with the next digest


async def test_a_4xx_from_a_proxy_is_dead_lettered_once_logged_not_retried_for_ever(
    robot: DingTalkReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """DingTalk answers 200 with an errcode; a 404 is a wrong URL (or a proxy's), and retried it only
    spent the robot's rate budget while the backlog grew. (A gateway's or proxy's 401/403/407 refuses
    our credentials, not the URL: retried, tests/sinks/test_robot_proxy.py.)"""
    sink = await make_sink(robot.url, secret=SECRET)
    robot.fail_next(2, status=404)
    try:
        (out,) = await sink.send([occ()]) or []
        (again,) = await sink.send([occ(object_name="other")]) or []
    finally:
        await sink.aclose()
    assert out.kind is OutcomeKind.REJECT and "HTTP 404" in out.reason and "check the URL" in out.reason
    assert again.kind is OutcomeKind.REJECT
    assert sum("HTTP 404" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR) == 1


@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirect_is_retried_saying_where_it_points_and_never_followed(
    robot: DingTalkReceiver, status: int
) -> None:
    """aiohttp follows redirects unless told not to: a 302 (an http→https front, a moved gateway)
    turned the POST into a GET, dead-lettered as "HTTP 405" without a word about the redirect; a 307
    sent the message, and the token in the Location, wherever it pointed. Retried since session 29,
    never dead-lettered at once (tests/sinks/test_robot_redirects.py)."""
    sink = await make_sink(robot.url, secret=SECRET)
    robot.fail_next(1, status=status, location=f"{robot.url}&moved=1")
    try:
        (out,) = await sink.send([occ()]) or []
    finally:
        await sink.aclose()
    assert out.kind is OutcomeKind.RETRY and not out.held
    where = f"{robot.base_url}?access_token=***&moved=***"
    assert f"answered HTTP {status}: redirect to {where} not followed" in out.reason
    assert TOKEN not in out.reason
    assert [r.status for r in robot.requests] == [status] and robot.accepted == []


async def test_unreachable_robot_is_retried_and_the_token_is_not_in_the_reason() -> None:
    async with DingTalkReceiver(access_token=TOKEN) as robot:
        url = robot.url
    sink = await make_sink(url)  # the receiver is gone: connection refused
    try:
        (out,) = await sink.send([occ()]) or []
    finally:
        await sink.aclose()
    assert out.kind is OutcomeKind.RETRY and "unreachable" in out.reason and TOKEN not in out.reason


# ------------------------------------------------------------------------------------------ silences


async def test_silences_reject_matching_events_until_they_expire(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    until = clock.wall() + 600
    spec = f"reason=BackOff,namespace=kube-*,until={stamp(until)};message=*probe*,until=2999-01-01T00:00:00Z"
    sink = await make_sink(robot.url, secret=SECRET, clock=clock, silences=spec)
    try:
        outs = await sink.send(
            [
                occ(namespace="kube-system", reason="BackOff"),
                occ(namespace="shop", reason="BackOff"),
                occ(namespace="shop", reason="Unhealthy", message="Readiness probe failed"),
            ]
        )
        assert outs is not None
        assert [o.kind for o in outs] == [OutcomeKind.REJECT, OutcomeKind.OK, OutcomeKind.REJECT]
        assert outs[0].reason.startswith("silenced by reason=BackOff,namespace=kube-*")
        clock.advance(601)
        (later,) = await sink.send([occ(namespace="kube-system", reason="BackOff", object_name="dns")]) or []
    finally:
        await sink.aclose()
    assert later.kind is OutcomeKind.OK


async def test_silences_match_names_ignoring_case_and_messages_as_written(
    robot: DingTalkReceiver, clock: ManualClock
) -> None:
    # Reasons, kinds, namespaces and components ignore case as the sink filters do (item 93); a
    # message is free text: its glob is matched as written, so a silence keeps no more from people
    # than its pattern says.
    spec = (
        "reason=backoff,kind=POD,namespace=Kube-*,component=KUBELET,until=2999-01-01T00:00:00Z;"
        "message=*Probe*,until=2999-01-01T00:00:00Z"
    )
    sink = await make_sink(robot.url, secret=SECRET, clock=clock, silences=spec)
    try:
        outs = await sink.send(
            [
                occ(namespace="kube-system", reason="BackOff", kind="Pod", component="kubelet"),
                occ(namespace="kube-system", reason="BackOff", kind="Node", object_name="n1"),
                occ(namespace="shop", reason="Unhealthy", message="Probe failed: 503"),
                occ(
                    namespace="shop",
                    reason="Unhealthy",
                    object_name="web-1",
                    message="Readiness probe failed",
                ),
            ]
        )
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.REJECT, OutcomeKind.OK, OutcomeKind.REJECT, OutcomeKind.OK]
    assert outs is not None and outs[0].reason.startswith("silenced by reason=backoff,kind=POD")
    (msg,) = robot.accepted
    assert "Readiness probe failed" in msg.text and "n1" in msg.text


def test_silence_without_expiry_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="needs an expiry"):
        DingTalkOptions.model_validate({"access_token": "x", "silences": "reason=BackOff"})


# ------------------------------------------------------------------------------------------ options


def test_kube_eventer_flag_is_accepted_with_its_option_names() -> None:
    flag = (
        f"dingtalk:https://oapi.dingtalk.com/robot/send?access_token={TOKEN}&sign={SECRET}&label=team-a"
        "&label=shop,eu&level=Warning&msg_type=markdown&cluster_id=c-123&region=cn-hangzhou"
        "&namespaces=shop,pay&kinds=Pod"
    )
    spec = spec_for_class(DingTalkSink, parse_sink_flag(flag), type_="dingtalk")
    o = spec.options
    assert isinstance(o, DingTalkOptions)
    assert o.access_token is not None and o.access_token.get_secret_value() == TOKEN
    assert o.secret is not None and o.secret.get_secret_value() == SECRET
    assert o.label == ["team-a", "shop,eu"] and o.cluster_id == "c-123" and o.region == "cn-hangzhou"
    assert (
        spec.filter.level == "Warning"
        and spec.filter.namespaces == ["shop", "pay"]
        and spec.filter.kinds == ["Pod"]
    )
    assert TOKEN not in repr(o) and SECRET not in repr(o) and TOKEN not in o.url


def test_warning_only_is_the_default_filter_and_no_option_clashes_with_engine_keys() -> None:
    spec = spec_for_class(DingTalkSink, {"access_token": "t"}, type_="dingtalk")
    assert spec.filter.level == "Warning"
    assert DingTalkSink.default_filter == {"level": "Warning"}
    assert not (field_names(DingTalkOptions) - {"url", "include_raw"}) & COMMON_KEYS


async def test_label_cluster_id_and_region_are_in_every_message(robot: DingTalkReceiver) -> None:
    sink = await make_sink(
        robot.url, secret=SECRET, label="team *a*", cluster_id="c-123", region="cn-hangzhou"
    )
    try:
        await sink.send([occ()])
    finally:
        await sink.aclose()
    (msg,) = robot.accepted
    assert "cluster prod" in msg.text and "team \\*a\\*" in msg.text
    assert "cluster\\_id c-123" in msg.text and "region cn-hangzhou" in msg.text
    assert msg.title.startswith("[prod] BackOff")


async def test_templates_are_validated_and_fill_escaped_values(robot: DingTalkReceiver) -> None:
    with pytest.raises(ValueError, match="unknown field"):
        DingTalkOptions.model_validate({"access_token": "x", "line_template": "{reason.__class__}"})
    sink = await make_sink(
        robot.url,
        secret=SECRET,
        title_template="{cluster}: {reason} on {object}",
        line_template="[{namespace}] {reason} x{count}: {message}",
    )
    try:
        await sink.send([occ(object_name="w*1", message='a "b" *c*')])
    finally:
        await sink.aclose()
    (msg,) = robot.accepted
    assert msg.title == "prod: BackOff on w*1"
    assert '[shop] BackOff x1: a "b" \\*c\\*' in msg.text  # the operator's template is as written


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        (
            "line_template",
            "{reason} x{count:d} {object}",
            "line_template: {count:d}: Unknown format code 'd'",
        ),
        ("title_template", "{reason} x{count:>3d}", "title_template: {count:>3d}: Unknown format code 'd'"),
        ("action_url", "https://grafana/d/x?pod={object.name}", "action_url: unknown field {object.name}"),
        ("action_url", "grafana.example/d/x?pod={object}", "action_url must be http(s)://host"),
        ("action_url", "{cluster}", "action_url must be http(s)://host"),
    ],
)
def test_a_template_that_cannot_be_filled_in_is_refused_at_start_naming_the_option(
    option: str, value: str, says: str
) -> None:
    """These passed validation and then raised on every send (the values are text, and action_url
    was not checked at all): the engine retried the batch for ever and the robot got nothing."""
    entry = {
        "access_token": "x",
        "msg_type": "actionCard",
        "action_url": "https://grafana/d/x",
        option: value,
    }
    with pytest.raises(ValueError, match=re.escape(says)):
        DingTalkOptions.model_validate(entry)


def test_format_specs_text_can_take_and_action_url_fields_are_accepted() -> None:
    options = DingTalkOptions.model_validate(
        {
            "access_token": "x",
            "msg_type": "actionCard",
            "title_template": "{reason:>12} x{count:<3}",
            "action_url": "https://{cluster}.grafana.example/d/x?var-ns={namespace}&pod={object}",
        }
    )
    assert options.title_template == "{reason:>12} x{count:<3}"


async def test_check_reaches_the_robot_without_a_message_or_the_token(robot: DingTalkReceiver) -> None:
    """`eventrouter check`: a HEAD to the robot's address (answered 405, as the robot answers what
    is not a POST) proves it reachable; no message is sent and the token stays out of the request."""
    sink = DingTalkSink(DingTalkOptions.model_validate({"url": robot.url, "secret": SECRET}), ctx())
    await sink.check()
    await sink.aclose()
    assert [(r.query, r.body) for r in robot.requests] == [({}, b"")]
    assert robot.accepted == []
    closed = f"http://127.0.0.1:1/robot/send?access_token={TOKEN}"  # nothing listens on port 1
    sink = DingTalkSink(DingTalkOptions.model_validate({"url": closed}), ctx())
    with pytest.raises(SinkError, match=r"cannot reach http://127\.0\.0\.1:1/robot/send: ") as info:
        await sink.check()
    await sink.aclose()
    assert TOKEN not in str(info.value)


async def test_check_never_shows_a_password_in_the_robots_url(
    robot: DingTalkReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """An authenticating egress gateway in front of the robot (user info in the URL): `check`
    logged the probed address and put it in its error with the password."""
    caplog.set_level(logging.INFO)
    password = "hunter2-gw-pass"
    live = f"http://gw:{password}@127.0.0.1:{robot.port}/robot/send?access_token={TOKEN}"
    sink = DingTalkSink(DingTalkOptions.model_validate({"url": live}), ctx())
    await sink.check()
    await sink.aclose()
    assert f"http://***@127.0.0.1:{robot.port}/robot/send answered HEAD with 405" in caplog.text
    closed = f"http://gw:{password}@127.0.0.1:1/robot/send?access_token={TOKEN}"
    sink = DingTalkSink(DingTalkOptions.model_validate({"url": closed}), ctx())
    with pytest.raises(SinkError, match=r"cannot reach http://\*\*\*@127\.0\.0\.1:1/robot/send: ") as info:
        await sink.check()
    await sink.aclose()
    assert password not in caplog.text + str(info.value) and TOKEN not in caplog.text + str(info.value)
    assert (
        sink.redact(f"GET {closed} failed")
        == "GET http://gw:****@127.0.0.1:1/robot/send?access_token=**** failed"
    )


async def test_retry_max_attempts_counts_a_robots_failures_but_not_its_digest_holds(tmp_path: Any) -> None:
    """Deferred retries skipped the attempt count: a robot behind a proxy answering 502 was asked
    every 3 s for ever. A digest hold is no failure: with a limit of 1 it must not dead-letter."""
    from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
    from eventrouter.engine.deadletter import DeadLetter
    from eventrouter.engine.pipeline import Pipeline
    from eventrouter.metrics import Metrics
    from eventrouter.options import PipelineOptions
    from eventrouter.testing.waiting import until

    metrics = Metrics()
    async with DingTalkReceiver(access_token=TOKEN) as robot:
        sink = DingTalkSink(
            DingTalkOptions.model_validate(
                {"url": robot.url, "min_interval": 0, "rate_per_minute": 1000, "window": 0.3}
            ),
            ctx(),
        )
        options = {"batch_max_wait": 0.01, "retry_initial_backoff": 0.01, "retry_max_backoff": 0.05}
        p = Pipeline(
            name="dingtalk",
            sink=sink,
            options=PipelineOptions.model_validate({**options, "retry_max_attempts": 1}),
            predicate=None,
            checkpoint=SinkCheckpoint(MemoryCheckpoint()),
            deadletter=DeadLetter(tmp_path / "dl", sink="dingtalk"),
            metrics=metrics,
        )
        task = asyncio.create_task(p.run())
        p.offer(occ(1, uid="u-web", object_name="web-0"))
        await until(lambda: len(robot.accepted) == 1)
        p.offer(occ(2, uid="u-web", object_name="web-0"))  # held for the window, then paged
        await until(lambda: len(robot.accepted) == 2)
        robot.fail_next(100, status=502)
        p.offer(occ(1, object_name="db-0"))
        exhausted = metrics.dead_lettered.labels("dingtalk", "retries_exhausted")
        await until(lambda: exhausted._value.get() == 1)
        p.close()
        await asyncio.wait_for(task, 10)
        await p.close_sink()
    assert metrics.dead_lettered.labels("dingtalk", "rejected")._value.get() == 0
    assert metrics.retries.labels("dingtalk")._value.get() == 0  # the hold was no retry


def test_a_folder_of_the_zone_database_as_time_zone_is_a_configuration_error() -> None:
    """`time_zone=Europe` opened a folder of tzdata: IsADirectoryError, a traceback and exit 1."""
    for zone in ("Europe", "America", "Etc"):
        with pytest.raises(ConfigError, match=f"option 'time_zone': Value error, unknown time zone '{zone}'"):
            spec_for_class(DingTalkSink, {"access_token": "t", "time_zone": zone}, type_="dingtalk")
