"""WeCom sink against the project's WeCom receiver: the group robot (key, text/markdown, mentions,
45009/93000) and the application message API (gettoken, cached token, refresh before expiry, 42001
refresh-and-resend). Time is a ``ManualClock`` shared with the receiver (real limits, simulated time).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from importlib.metadata import entry_points
from typing import Any

import pytest

from eventrouter import Occurrence, OutcomeKind, SinkContext, SinkError
from eventrouter.config import parse_sink_flag, spec_for_class
from eventrouter.options import COMMON_KEYS, field_names
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter_sinks._alerting import ManualClock
from eventrouter_sinks.wecom import WeComOptions, WeComSink

KEY = "robot-key-5c1e"
CORP_SECRET = "corp-secret-9d2b"


def occ(n: int = 1, **kw: Any) -> Occurrence:
    kw.setdefault("namespace", "shop")
    return make_occurrence(cluster="prod", count=n, **kw)


def kinds(outcomes: Sequence[Any] | None) -> list[OutcomeKind]:
    assert outcomes is not None
    return [o.kind for o in outcomes]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def wecom(clock: ManualClock) -> AsyncIterator[WeComReceiver]:
    async with WeComReceiver(robot_key=KEY, corp_secret=CORP_SECRET, clock=clock.now) as r:
        yield r


async def make_sink(clock: ManualClock, **opts: Any) -> WeComSink:
    ctx = SinkContext(name="wecom", cluster="prod", data_dir=None, logger=logging.getLogger("test.wecom"))
    sink = WeComSink(WeComOptions.model_validate(opts), ctx, clock=clock)
    await sink.start()
    return sink


def app_opts(wecom: WeComReceiver, **kw: Any) -> dict[str, Any]:
    return {
        "url": wecom.url,
        "corp_id": wecom.corp_id,
        "corp_secret": CORP_SECRET,
        "agent_id": str(wecom.agent_id),
        "to_user": "alice,bob",
        **kw,
    }


_ENTRY = re.compile(r"^(?:\*\*)?[^\s*]+(?:\*\*)? (?:\u00d7(\d+) in |\d\d-\d\d )", re.M)
_SUMMARY = re.compile(r"and (\d+) more events?:")


def counted(text: str) -> int:
    return sum(int(n) if n else 1 for n in _ENTRY.findall(text)) + sum(int(n) for n in _SUMMARY.findall(text))


# ------------------------------------------------------------------------------------- group robot


async def test_group_robot_markdown_digest_with_user_mentions(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(clock, url=wecom.robot_url, at_user_ids="ops-lead", label="team-a")
    try:
        outs = await sink.send([occ(object_name="web-0"), occ(object_name="web-1", reason="Unhealthy")])
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 2
    (msg,) = wecom.accepted
    assert msg.kind == "robot" and msg.msgtype == "markdown"
    assert "<@ops-lead>" in msg.text and "team-a" in msg.text and "cluster prod" in msg.text
    assert counted(msg.text) == 2
    assert KEY not in sink.options.url and KEY not in repr(sink.options)


async def test_group_robot_text_mentions_use_the_mention_lists(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(
        clock, url=wecom.robot_url, msg_type="text", at_mobiles="13800000000", at_all_reasons="OOMKilling"
    )
    try:
        await sink.send(
            [occ(reason="OOMKilling", kind="Node", object_name="node-1", message='a "q" \\ b\nc')]
        )
    finally:
        await sink.aclose()
    (msg,) = wecom.accepted
    assert msg.msgtype == "text"
    assert msg.payload["text"]["mentioned_mobile_list"] == ["13800000000"]
    assert msg.payload["text"]["mentioned_list"] == ["@all"]
    assert 'a "q" \\ b' in msg.text and "**" not in msg.text


async def test_mention_reasons_match_ignoring_case_as_the_sink_filters_do(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    # `reasons=oomkilling` passes OOMKilling through the filter (item 93): the same name in the
    # mention rules must page for it, not mention nobody.
    sink = await make_sink(
        clock,
        url=wecom.robot_url,
        msg_type="text",
        at_mobiles="13800000000",
        at_reasons="oomkilling",
        at_all_reasons="oomKilling",
    )
    try:
        assert kinds(await sink.send([occ(reason="OOMKilling", kind="Node", object_name="node-1")])) == [
            OutcomeKind.OK
        ]
    finally:
        await sink.aclose()
    (msg,) = wecom.accepted
    assert msg.payload["text"]["mentioned_mobile_list"] == ["13800000000"]
    assert msg.payload["text"]["mentioned_list"] == ["@all"]


async def test_an_invalid_webhook_key_93000_is_retried_warned_of_once_then_delivered(
    wecom: WeComReceiver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """93000: the robot's webhook was reset (a new key) or the robot removed. Dead-lettered, every
    alert until the new key reached the pod was lost (item 111 retried the webhook's 401/403)."""
    sink = await make_sink(clock, url=wecom.url + "/cgi-bin/webhook/send?key=wrong-key")
    caplog.set_level(logging.DEBUG)
    a, b = occ(object_name="a"), occ(object_name="b")
    try:
        first = await sink.send([a])
        clock.advance(10)
        second = await sink.send([b])
        wecom.robot_key = "wrong-key"  # the key the pod has is the robot's again
        clock.advance(10)
        third = await sink.send([a, b])
    finally:
        await sink.aclose()
    assert first is not None and second is not None
    assert all(o.kind is OutcomeKind.RETRY and not o.held and "93000" in o.reason for o in [*first, *second])
    assert kinds(third) == [OutcomeKind.OK] * 2 and counted(wecom.accepted[0].text) == 2
    warned = [r.getMessage() for r in caplog.records if "credentials refused" in r.getMessage()]
    assert len(warned) == 1 and "check key" in warned[0]
    assert "wrong-key" not in caplog.text


async def test_a_redirect_is_retried_saying_where_it_points_and_never_followed(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    """aiohttp follows redirects unless told not to: a 301 (a moved gateway) turned the POST into a
    GET, dead-lettered as WeCom's "invalid request method" without a word about the redirect.
    Retried since session 29, never dead-lettered at once (tests/sinks/test_robot_redirects.py)."""
    sink = await make_sink(clock, url=wecom.robot_url)
    wecom.fail_next(1, status=301, location=wecom.robot_url)
    try:
        (out,) = await sink.send([occ()]) or []
    finally:
        await sink.aclose()
    assert out.kind is OutcomeKind.RETRY and not out.held
    where = f"{wecom.url}/cgi-bin/webhook/send?key=***"
    assert f"WeCom answered HTTP 301: redirect to {where} not followed" in out.reason
    assert KEY not in out.reason
    assert [r.status for r in wecom.requests] == [301] and wecom.accepted == []


@pytest.mark.parametrize("errcode", [45009, 45011])
async def test_api_freq_out_of_limit_backs_off_holding_the_alert_then_delivers(
    wecom: WeComReceiver, clock: ManualClock, errcode: int
) -> None:
    """A rate-limit answer is a hold, not a failed attempt: repeated, it must never dead-letter."""
    sink = await make_sink(clock, url=wecom.robot_url, throttle_backoff=20)
    wecom.fail_next(1, errcode=errcode, errmsg="api freq out of limit")
    batch = [occ(object_name="a")]
    try:
        (out,) = await sink.send(batch) or []
        assert out.kind is OutcomeKind.RETRY and str(errcode) in out.reason and out.retry_after == 20
        assert out.held
        clock.advance(20)
        assert kinds(await sink.send(batch)) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    assert wecom.errcodes("/cgi-bin/webhook/send") == [errcode, 0]


async def test_markdown_digest_fits_4096_bytes_and_summarises_the_rest(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(clock, url=wecom.robot_url, rate_per_minute=1)
    batch = [occ(object_name=f"pod-{i}", reason="FailedMount", message="卷挂载失败 " * 20) for i in range(80)]
    try:
        outs = await sink.send(batch)
    finally:
        await sink.aclose()
    assert kinds(outs) == [OutcomeKind.OK] * 80
    (msg,) = wecom.accepted
    assert len(msg.text.encode()) <= 4096
    assert _SUMMARY.search(msg.text) and counted(msg.text) == 80


@pytest.mark.parametrize(
    ("reason_chars", "label", "summary"),
    [
        # Lines fit, but not beside the usual summary of the rest: a shorter summary.
        (64, "", re.compile(r"…and \d+ more events: .*…")),
        # No line fits (each reason alone is 2400 bytes): a message of the summary only.
        (600, "", re.compile(r"^…and 12 more events: (?:\S+… ×1, ){8}other ×4$", re.M)),
        # A header that leaves room for little more: the bare count.
        (600, "标签" * 320, re.compile(r"^…and 12 more events$", re.M)),
    ],
)
async def test_a_summary_of_long_reasons_is_shortened_until_the_message_fits_wecoms_2048_bytes(
    wecom: WeComReceiver, clock: ManualClock, reason_chars: int, label: str, summary: re.Pattern[str]
) -> None:
    """A summary was never measured: eight reasons of 64 four-byte characters made a 2176-byte text
    message, WeCom answered 40058, and every occurrence of the digest was dead-lettered. It now
    lists fewer reasons, cut by bytes on a character boundary, down to the bare count."""
    # Text (2048 bytes); 3 messages a minute leave a budget of one message for all 12 groups.
    sink = await make_sink(clock, url=wecom.robot_url, msg_type="text", rate_per_minute=3, label=label)
    reasons = [chr(0x1F600 + i) * reason_chars for i in range(12)]
    batch = [occ(object_name=f"pod-{i}", reason=r, message="x") for i, r in enumerate(reasons)]
    try:
        outs = await sink.send(batch)
    finally:
        await sink.aclose()
    assert wecom.errcodes() == [0] and kinds(outs) == [OutcomeKind.OK] * 12
    (msg,) = wecom.accepted
    assert len(msg.text.encode()) <= 2048
    assert summary.search(msg.text), msg.text
    lines = sum(f"shop/pod-{i}\n" in msg.text for i in range(12))
    (more,) = map(int, re.findall(r"…and (\d+) more events", msg.text))
    assert lines + more == 12
    for listed in re.findall(r"(\S+)… ×1", msg.text):  # a cut reason is a whole-character prefix
        assert any(r.startswith(listed) for r in reasons)


async def test_a_long_free_text_event_type_never_sends_the_message_over_the_limit(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    """The header counts events by type, and the type is free text: one of 5,007 characters made
    the markdown message 5 KiB, WeCom answered 40058 and the five innocent alerts in it were
    dead-lettered with it. A type is now cut to 64 bytes there (and at most four are named)."""
    sink = await make_sink(clock, url=wecom.robot_url)
    odd = [occ(object_name=f"x-{i}", type="Warning" + "!" * 5000) for i in range(2)]
    weird = [occ(object_name=f"job-{i}", type=f"Custom{i}") for i in range(4)]
    try:
        outs = await sink.send([*odd, *(occ(object_name=f"web-{i}") for i in range(5)), *weird])
    finally:
        await sink.aclose()
    assert wecom.errcodes() == [0] and kinds(outs) == [OutcomeKind.OK] * 11
    (msg,) = wecom.accepted
    assert len(msg.text.encode()) <= 4096 and counted(msg.text) == 11
    cut = "Warning" + "!" * 57 + "…"  # 64 bytes, marked
    assert f"Kubernetes: 11 events (1 Custom0, 1 Custom1, 5 Warning, 2 {cut}, 2 other)" in msg.text


async def test_flood_500_warnings_through_the_group_robot_respects_its_limit(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    """The robot's 4096-byte markdown makes digests summarise more; still ≤ 20/min and none lost."""
    reasons = ["BackOff", "Unhealthy", "FailedMount", "OOMKilling"]
    arrivals: list[tuple[float, Occurrence]] = []
    counts: Counter[tuple[int, str]] = Counter()
    for i in range(500):
        pod, reason = i % 25, reasons[(i // 25) % 4]
        counts[(pod, reason)] += 1
        arrivals.append(
            (
                i * 0.12,
                occ(counts[(pod, reason)], uid=f"u-{pod}-{reason}", object_name=f"web-{pod}", reason=reason),
            )
        )
    sink = await make_sink(clock, url=wecom.robot_url)
    start = clock.now()
    todo = list(arrivals)
    retries: list[tuple[float, Occurrence]] = []
    ok: Counter[str] = Counter()
    try:
        while (todo or retries) and clock.now() - start < 7200:
            now = clock.now()
            batch = [o for t, o in todo if start + t <= now] + [o for d, o in retries if d <= now]
            todo = [(t, o) for t, o in todo if start + t > now]
            retries = [(d, o) for d, o in retries if d > now]
            if batch:
                for o, out in zip(batch, await sink.send(batch) or [], strict=True):
                    assert out.kind is not OutcomeKind.REJECT, out.reason
                    if out.kind is OutcomeKind.OK:
                        ok[o.key] += 1
                    else:
                        retries.append((clock.now() + max(out.retry_after or 1.0, 0.5), o))
            clock.advance(1.0)
    finally:
        await sink.aclose()
    assert set(ok) == {o.key for _, o in arrivals} and set(ok.values()) == {1}
    assert 45009 not in wecom.errcodes()
    times = sorted(m.at for m in wecom.accepted)
    assert max(sum(1 for u in times if t <= u < t + 60) for t in times) <= 20
    assert sum(counted(m.text) for m in wecom.accepted) == 500
    assert all(len(m.text.encode()) <= 4096 for m in wecom.accepted)


# ------------------------------------------------------------------------------------- application API


async def test_application_api_fetches_a_token_once_and_sends_to_the_users(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(clock, **app_opts(wecom))
    try:
        assert wecom.gettoken_calls() == 1  # start() checked the credentials
        assert kinds(await sink.send([occ(object_name="a")])) == [OutcomeKind.OK]
        clock.advance(10)
        assert kinds(await sink.send([occ(object_name="b")])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    assert wecom.gettoken_calls() == 1
    first, second = wecom.accepted
    assert second.kind == "app" and second.payload["agentid"] == wecom.agent_id
    assert first.kind == "app" and first.msgtype == "text"  # kube-eventer's wechat sink sends text
    assert first.payload["touser"] == "alice|bob" and first.payload["agentid"] == wecom.agent_id
    assert "cluster prod" in first.text


async def test_token_is_refreshed_before_it_expires(wecom: WeComReceiver, clock: ManualClock) -> None:
    sink = await make_sink(clock, **app_opts(wecom))
    try:
        clock.advance(7200 - 200)  # within the refresh margin: fetched again (WeCom returns the same one)
        assert kinds(await sink.send([occ(object_name="a")])) == [OutcomeKind.OK]
        assert wecom.gettoken_calls() == 2 and len(wecom.tokens_issued) == 1
        clock.advance(250)  # now it has ended: a new one is fetched before sending
        assert kinds(await sink.send([occ(object_name="b")])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    assert len(wecom.tokens_issued) == 2
    assert 42001 not in wecom.errcodes() and 40014 not in wecom.errcodes()


async def test_expired_token_42001_is_refreshed_and_the_message_resent_once(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(clock, **app_opts(wecom))
    try:
        wecom.expire_tokens()  # the service ended it early (e.g. the secret was reset elsewhere)
        assert kinds(await sink.send([occ()])) == [OutcomeKind.OK]
    finally:
        await sink.aclose()
    assert wecom.errcodes("/cgi-bin/message/send") == [42001, 0]
    assert wecom.gettoken_calls() == 2 and len(wecom.accepted) == 1


async def test_invalid_access_token_40014_twice_is_retried_not_lost(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    sink = await make_sink(clock, **app_opts(wecom))
    wecom.fail_next(2, errcode=40014, errmsg="invalid access_token")
    try:
        (out,) = await sink.send([occ()]) or []
        assert out.kind is OutcomeKind.RETRY
        assert CORP_SECRET not in out.reason and all(t not in out.reason for t in wecom.tokens_issued)
        clock.advance(5)
        (again,) = await sink.send([occ(object_name="x")]) or []
    finally:
        await sink.aclose()
    assert again.kind is OutcomeKind.OK and counted(wecom.accepted[0].text) == 2


async def test_wrong_corp_secret_fails_at_start_without_the_secret(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    ctx = SinkContext(name="wechat", cluster="prod", data_dir=None, logger=logging.getLogger("test.wecom"))
    sink = WeComSink(WeComOptions.model_validate(app_opts(wecom, corp_secret="not-it")), ctx, clock=clock)
    try:
        with pytest.raises(SinkError, match="40001") as err:
            await sink.start()
    finally:
        await sink.aclose()
    assert "not-it" not in str(err.value)


async def test_a_corp_secret_reset_in_the_console_is_retried_until_the_pod_has_the_new_one(
    wecom: WeComReceiver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The application's secret is reset (the old token ended with it): gettoken answers 40001 until
    the new secret reaches the pod. Every alert of that gap was dead-lettered; now it is retried and
    goes out once the sink is rebuilt with the new secret (engine/reload.py)."""
    caplog.set_level(logging.DEBUG)
    old = await make_sink(clock, **app_opts(wecom))
    wecom.corp_secret = "corp-secret-rotated"
    wecom.expire_tokens()
    alert = occ(object_name="a")
    try:
        (out,) = await old.send([alert]) or []
    finally:
        await old.aclose()
    assert out.kind is OutcomeKind.RETRY and not out.held and "40001" in out.reason
    new = WeComSink(
        WeComOptions.model_validate(app_opts(wecom, corp_secret="corp-secret-rotated")),
        SinkContext(name="wecom", cluster="prod", data_dir=None, logger=logging.getLogger("test.wecom")),
        clock=clock,
    )
    new.take_over(old)
    await new.start()
    try:
        clock.advance(5)
        assert kinds(await new.send([alert])) == [OutcomeKind.OK]
    finally:
        await new.aclose()
    assert len(wecom.accepted) == 1 and counted(wecom.accepted[0].text) == 1
    warned = [r.getMessage() for r in caplog.records if "credentials refused" in r.getMessage()]
    assert len(warned) == 1 and "check corp_secret" in warned[0]
    assert CORP_SECRET not in caplog.text and "corp-secret-rotated" not in caplog.text


async def test_unknown_recipients_81013_are_rejected(wecom: WeComReceiver, clock: ManualClock) -> None:
    sink = await make_sink(clock, **app_opts(wecom, to_user="mallory"))
    try:
        (out,) = await sink.send([occ()]) or []
    finally:
        await sink.aclose()
    assert out.kind is OutcomeKind.REJECT and "81013" in out.reason


# ------------------------------------------------------------------------------------- options


def test_wecom_and_wechat_entry_points_load_the_same_sink() -> None:
    eps = {ep.name: ep for ep in entry_points(group="eventrouter.sinks")}
    assert eps["wecom"].load() is WeComSink and eps["wechat"].load() is WeComSink


def test_kube_eventer_wechat_flag_is_accepted() -> None:
    flag = (
        f"wechat:?corp_id=ww123&corp_secret={CORP_SECRET}&agent_id=1000002&to_user=alice,bob"
        "&label=prod-eu&level=Warning&namespaces=shop&kinds=Pod"
    )
    spec = spec_for_class(WeComSink, parse_sink_flag(flag), type_="wechat")
    o = spec.options
    assert isinstance(o, WeComOptions) and o.app
    assert (
        o.corp_id == "ww123"
        and o.agent_id == 1000002
        and o.to_user == ["alice", "bob"]
        and o.label == ["prod-eu"]
    )
    assert (
        spec.filter.level == "Warning" and spec.filter.namespaces == ["shop"] and spec.filter.kinds == ["Pod"]
    )
    assert CORP_SECRET not in repr(o)
    assert not (field_names(WeComOptions) - {"url", "include_raw"}) & COMMON_KEYS


def test_robot_and_application_modes_are_exclusive_and_complete() -> None:
    with pytest.raises(ValueError, match="either key"):
        WeComOptions.model_validate({"key": "k", "corp_id": "c", "corp_secret": "s", "agent_id": 1})
    with pytest.raises(ValueError, match="needs agent_id"):
        WeComOptions.model_validate({"corp_id": "c", "corp_secret": "s"})
    with pytest.raises(ValueError, match="give key"):
        WeComOptions.model_validate({})
    with pytest.raises(ValueError, match="text or markdown"):
        WeComOptions.model_validate({"key": "k", "msg_type": "actionCard"})


async def test_check_reaches_the_robot_without_a_message_or_the_key(
    wecom: WeComReceiver, clock: ManualClock
) -> None:
    """The group robot: a HEAD to its address, no message, no key. The application API's start
    fetches an access token, which proves address and credentials: nothing more is sent."""

    def unstarted(**opts: Any) -> WeComSink:  # as `eventrouter check` makes it
        ctx = SinkContext(name="wecom", cluster="prod", data_dir=None, logger=logging.getLogger("test.wecom"))
        return WeComSink(WeComOptions.model_validate(opts), ctx, clock=clock)

    for sink in (unstarted(url=wecom.robot_url), unstarted(**app_opts(wecom))):
        await sink.check()
        await sink.aclose()
    assert wecom.accepted == []
    assert [(r.path, r.body) for r in wecom.requests] == [
        ("/cgi-bin/webhook/send", b""),
        ("/cgi-bin/gettoken", b""),
    ]
    assert "key" not in wecom.requests[0].query
    closed = unstarted(url=f"http://127.0.0.1:1/cgi-bin/webhook/send?key={KEY}")  # nothing listens on port 1
    with pytest.raises(SinkError, match=r"cannot reach http://127\.0\.0\.1:1/cgi-bin/webhook/send: ") as info:
        await closed.check()
    await closed.aclose()
    assert KEY not in str(info.value)


async def test_check_and_start_never_show_a_password_in_the_url(
    wecom: WeComReceiver, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An authenticating egress gateway in front of WeCom (user info in the URL): `check` logged
    the probed address with the password, and so did its error and the application API's start."""
    caplog.set_level(logging.INFO)
    password = "hunter2-gw-pass"
    ctx = SinkContext(name="wecom", cluster="prod", data_dir=None, logger=logging.getLogger("test.wecom"))
    live = WeComSink(
        WeComOptions.model_validate(
            {"url": f"http://gw:{password}@127.0.0.1:{wecom.port}/cgi-bin/webhook/send?key={KEY}"}
        ),
        ctx,
        clock=clock,
    )
    await live.check()
    await live.aclose()
    assert f"http://***@127.0.0.1:{wecom.port}/cgi-bin/webhook/send answered HEAD with" in caplog.text
    errors = []
    for opts in (
        {"url": f"http://gw:{password}@127.0.0.1:1/cgi-bin/webhook/send?key={KEY}"},
        {**app_opts(wecom), "url": f"http://gw:{password}@127.0.0.1:1"},
    ):
        closed = WeComSink(WeComOptions.model_validate(opts), ctx, clock=clock)
        with pytest.raises(SinkError, match=r"cannot reach .*http://\*\*\*@127\.0\.0\.1:1") as info:
            await closed.check()
        await closed.aclose()
        errors.append(str(info.value))
    assert password not in caplog.text + " ".join(errors)
    assert KEY not in caplog.text + " ".join(errors) and CORP_SECRET not in " ".join(errors)
