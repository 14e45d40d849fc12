"""The robots behind what often stands between a pod and them: an authenticating gateway (user info
in the robot's URL) or an egress proxy (``proxy``, ``trust_env``), played by the project's
``AuthGateway`` in front of its DingTalk and WeCom receivers.

DingTalk and WeCom refuse with HTTP 200 and an errcode, so a 401, 403 or 407 comes from something in
between: credentials being rotated (the proxy first, then the pod's Secret) or a policy. Such answers
are retried as the robots' own refusals of the sender are (item 118): warned of once, never printing a
credential, bounded by ``retry_max_attempts``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import orjson
import pytest
import yarl

from eventrouter import Occurrence, OutcomeKind, SinkContext, SinkError
from eventrouter.config import build_specs
from eventrouter.engine.reload import SinkReloader
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.auth_gateway import AuthGateway
from eventrouter.testing.receivers.dingtalk import DingTalkReceiver
from eventrouter.testing.receivers.wecom import WeComReceiver
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.waiting import until
from eventrouter_sinks._alerting import AlertSink, ManualClock
from eventrouter_sinks.dingtalk import DingTalkOptions, DingTalkSink
from eventrouter_sinks.wecom import WeComOptions, WeComSink

TOKEN = "robot-token-7f3a"
KEY = "robot-key-5c1e"
CORP_SECRET = "corp-secret-9d2b"
GW_PASSWORD = "gw-pass-2b7c91"


def ctx(name: str) -> SinkContext:
    return SinkContext(name=name, cluster="prod", data_dir=None, logger=logging.getLogger(f"test.{name}"))


def occ(name: str = "web-0", **kw: Any) -> Occurrence:
    return make_occurrence(cluster="prod", namespace="shop", object_name=name, **kw)


def kinds(outcomes: Sequence[Any] | None) -> list[OutcomeKind]:
    assert outcomes is not None
    return [o.kind for o in outcomes]


def dingtalk(url: str, clock: ManualClock, **opts: Any) -> DingTalkSink:
    return DingTalkSink(DingTalkOptions.model_validate({"url": url, **opts}), ctx("dingtalk"), clock=clock)


def wecom(clock: ManualClock, **opts: Any) -> WeComSink:
    return WeComSink(WeComOptions.model_validate(opts), ctx("wecom"), clock=clock)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "credentials refused" in r.getMessage()]


# ------------------------------------------------------------------------------ a gateway's 401/403


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("robot", ["dingtalk", "wecom"])
async def test_a_gateway_401_or_403_is_retried_warned_of_once_and_paged_once_put_right(
    robot: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An authenticating gateway in front of the robot moved to new credentials (401) or its policy
    refuses us for a while (403): every alert of that time was dead-lettered (``http_failure``),
    never paged. Now they are retried (a failure, not a hold), one warning names the status and the
    sink, and they go out once the gateway takes us again."""
    caplog.set_level(logging.DEBUG)
    clock = ManualClock()
    async with (
        DingTalkReceiver(access_token=TOKEN, clock=clock.now, wall=clock.wall) as ding,
        WeComReceiver(robot_key=KEY, clock=clock.now) as wc,
        AuthGateway(upstream_port=ding.port if robot == "dingtalk" else wc.port, password=GW_PASSWORD) as gw,
    ):
        sink: AlertSink[Any] = (
            dingtalk(gw.url_for(ding.url), clock)
            if robot == "dingtalk"
            else wecom(clock, url=gw.url_for(wc.robot_url))
        )
        await sink.start()
        if status == 401:
            gw.password = "gw-pass-rotated"  # the gateway first; the pod's URL follows later
        else:
            gw.deny = 403
        a, b = occ("a"), occ("b", reason="Unhealthy")
        try:
            first = await sink.send([a])
            clock.advance(10)
            second = await sink.send([b])
            gw.password, gw.deny = GW_PASSWORD, None  # taken again
            clock.advance(10)
            third = await sink.send([a, b])
        finally:
            await sink.aclose()
        accepted = [m.text for m in ding.accepted] if robot == "dingtalk" else [m.text for m in wc.accepted]
    assert first is not None and second is not None
    refused = [*first, *second]
    assert {(o.kind, o.held) for o in refused} == {(OutcomeKind.RETRY, False)}  # failures: attempts count
    assert all(f"answered HTTP {status}, not the robot's own answer" in o.reason for o in refused)
    assert kinds(third) == [OutcomeKind.OK, OutcomeKind.OK]
    assert gw.refusals() == [status, status]
    assert len(accepted) == 1 and "shop/a" in accepted[0] and "shop/b" in accepted[0]  # paged once
    assert sink.limiter.free() == 19  # the refusals never reached the robot: not of its minute
    (warned,) = refusals(caplog)
    assert warned.startswith(f"{robot}: our credentials refused? ") and f"HTTP {status}" in warned
    assert "check the user name and password in url" in warned
    shown = caplog.text + " ".join(o.reason for o in refused)
    assert GW_PASSWORD not in shown and TOKEN not in shown and KEY not in shown


async def test_retry_max_attempts_still_bounds_a_refusal_in_front_of_the_robot(tmp_path: Path) -> None:
    """Held for ever, a refusal nobody puts right would keep alerts (and the spool) for ever: like
    the robots' own refusals (item 118) it is a failed attempt, dead-lettered once
    ``retry_max_attempts`` runs out, as `retries_exhausted` and without a credential in the file."""
    metrics = Metrics()
    async with (
        DingTalkReceiver(access_token=TOKEN) as robot,
        AuthGateway(upstream_port=robot.port, password=GW_PASSWORD, deny=403) as gw,
    ):
        sink = DingTalkSink(
            DingTalkOptions.model_validate({"url": gw.url_for(robot.url), "min_interval": 0}), ctx("dingtalk")
        )
        pipeline = pipeline_for(
            "dingtalk",
            sink,
            metrics,
            tmp_path / "dl",
            retry_initial_backoff=0.01,
            retry_max_backoff=0.05,
            retry_max_attempts=3,
        )
        task = asyncio.create_task(pipeline.run())
        exhausted = metrics.dead_lettered.labels("dingtalk", "retries_exhausted")
        rejected = metrics.dead_lettered.labels("dingtalk", "rejected")
        try:
            pipeline.offer(occ())
            await until(lambda: exhausted._value.get() + rejected._value.get() > 0)
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 10)
            await pipeline.close_sink()
    assert (exhausted._value.get(), rejected._value.get()) == (1, 0)
    assert gw.refusals() == [403, 403, 403] and robot.requests == []
    text = (tmp_path / "dl").read_text()  # the dead-letter file
    (letter,) = [orjson.loads(x) for x in text.splitlines()]
    assert letter["reason"].startswith("retries exhausted after 3 attempts: DingTalk robot answered HTTP 403")
    assert GW_PASSWORD not in text and TOKEN not in letter["reason"]


# --------------------------------------------------------------------------- an egress proxy


@pytest.mark.parametrize("mode", ["dingtalk", "wecom robot", "wecom application"])
async def test_the_robots_send_through_an_authenticating_proxy(mode: str) -> None:
    """Egress to oapi.dingtalk.com / qyapi.weixin.qq.com often has to go through a proxy; the robots
    had no way to use one (aiohttp ignores HTTP(S)_PROXY unless told). ``proxy`` with its user info:
    every request goes through it, with Proxy-Authorization, and arrives."""
    clock = ManualClock()
    async with (
        DingTalkReceiver(access_token=TOKEN, clock=clock.now, wall=clock.wall) as ding,
        WeComReceiver(robot_key=KEY, corp_secret=CORP_SECRET, clock=clock.now) as wc,
        AuthGateway(password=GW_PASSWORD) as gw,
    ):
        if mode == "dingtalk":
            sink: AlertSink[Any] = dingtalk(ding.url, clock, proxy=gw.proxy_url)
        elif mode == "wecom robot":
            sink = wecom(clock, url=wc.robot_url, proxy=gw.proxy_url)
        else:
            sink = wecom(
                clock,
                url=wc.url,
                corp_id=wc.corp_id,
                corp_secret=CORP_SECRET,
                agent_id=str(wc.agent_id),
                to_user="alice",
                proxy=gw.proxy_url,
            )
        await sink.start()
        try:
            assert kinds(await sink.send([occ()])) == [OutcomeKind.OK]
        finally:
            await sink.aclose()
        accepted = len(ding.accepted) + len(wc.accepted)
        reached = len(ding.requests) + len(wc.requests)
    assert accepted == 1
    assert [(r.kind, r.authorized) for r in gw.requests] == [("forward", True)] * reached
    assert reached == (2 if mode == "wecom application" else 1)  # gettoken, then the message


async def test_trust_env_takes_the_proxy_of_the_environment_and_only_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY / HTTPS_PROXY set in the pod, as Go programs and curl honour them: with
    ``trust_env`` the robot's requests go through that proxy; without it (the default) directly."""
    clock = ManualClock()
    async with (
        DingTalkReceiver(access_token=TOKEN, clock=clock.now, wall=clock.wall) as robot,
        AuthGateway(password=GW_PASSWORD) as gw,
    ):
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, gw.proxy_url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        for trust_env in (True, False):
            sink = dingtalk(robot.url, clock, trust_env=trust_env)
            await sink.start()
            try:
                assert kinds(await sink.send([occ(f"web-{trust_env}")])) == [OutcomeKind.OK]
            finally:
                await sink.aclose()
    assert len(robot.accepted) == 2
    assert [(r.kind, r.authorized) for r in gw.requests] == [("forward", True)]  # the trust_env one


async def test_a_proxy_password_rotated_first_at_the_proxy_dead_letters_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy takes a new password before the kubelet brings it into the pod (``proxy=file:``).
    Meanwhile the proxy answers 407 to every alert: they wait in the engine, one warning names the
    sink and the status (not the password), and each is paged once the new password is taken."""
    caplog.set_level(logging.DEBUG)
    old, new = "proxy-pass-old-41c", "proxy-pass-new-93d"
    metrics = Metrics()
    async with (
        DingTalkReceiver(access_token=TOKEN) as robot,
        AuthGateway(password=old) as gw,
    ):
        volume = SecretVolume(tmp_path / "secrets", {"proxy": gw.proxy_url})
        (spec,) = build_specs(
            [
                f"dingtalk:{robot.url}&proxy=file:{volume.file('proxy')}&min_interval=0&rate_per_minute=1000"
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
        pods = [occ(f"pod-{i}") for i in range(15)]
        try:
            for o in pods[:5]:
                pipeline.offer(o)
            await until(lambda: delivered._value.get() == 5)
            gw.password = new  # rotated at the proxy
            for o in pods[5:10]:
                pipeline.offer(o)
            await until(lambda: gw.refusals().count(407) >= 3 or dead._value.get() > 0)
            assert dead._value.get() == 0  # retried, three rounds or more
            volume.update({"proxy": gw.proxy_url})  # the pod's Secret follows
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
    (warned,) = refusals(caplog)  # once, however many refusals
    assert warned.startswith(f"{spec.name}: our credentials refused? DingTalk robot answered HTTP 407")
    assert "check the user name and password in proxy" in warned
    assert old not in caplog.text and new not in caplog.text and TOKEN not in caplog.text


async def test_a_tunnel_to_an_https_robot_refused_by_the_proxy_is_retried_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real robots are https: the proxy answers the CONNECT, and aiohttp raises for that (its
    text quoting the proxy's URL with the password). Taken as "unreachable", no warning said what to
    check. It is the proxy's refusal like any other: retried, warned of once, no password."""
    caplog.set_level(logging.DEBUG)
    clock = ManualClock()
    async with (
        DingTalkReceiver(access_token=TOKEN) as robot,
        AuthGateway(password=GW_PASSWORD) as gw,
    ):
        https = f"https://127.0.0.1:{robot.port}/robot/send?access_token={TOKEN}"
        wrong = f"http://gw:wrong-{GW_PASSWORD}@127.0.0.1:{gw.port}"
        sink = dingtalk(https, clock, proxy=wrong)
        await sink.start()
        try:
            (out,) = await sink.send([occ()]) or []
        finally:
            await sink.aclose()
    assert out.kind is OutcomeKind.RETRY and not out.held
    assert out.reason.startswith(
        "DingTalk robot's proxy (CONNECT) answered HTTP 407: a proxy refused our request"
    )
    assert [(r.kind, r.authorized, r.status) for r in gw.requests] == [("connect", False, 407)]
    (warned,) = refusals(caplog)
    assert "HTTP 407" in warned and "check the user name and password in proxy" in warned
    assert GW_PASSWORD not in caplog.text + out.reason and TOKEN not in caplog.text + out.reason


async def test_the_robots_own_refusal_after_a_gateways_is_warned_of_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One warning per run of refusals, per cause: the gateway's 401 put right, the robot's own
    "sign not match" next is news, not a repeat kept quiet for 10 minutes."""
    caplog.set_level(logging.DEBUG)
    clock = ManualClock()
    secret = "SEC" + "c" * 61
    async with (
        DingTalkReceiver(access_token=TOKEN, secret=secret, clock=clock.now, wall=clock.wall) as robot,
        AuthGateway(upstream_port=robot.port, password=GW_PASSWORD) as gw,
    ):
        sink = dingtalk(gw.url_for(robot.url), clock, secret=secret)
        await sink.start()
        gw.password = "gw-pass-rotated"
        try:
            (first,) = await sink.send([occ()]) or []
            gw.password = GW_PASSWORD
            robot.secret = "SEC" + "d" * 61  # reset in the console
            clock.advance(10)
            (second,) = await sink.send([occ()]) or []
        finally:
            await sink.aclose()
    assert "HTTP 401" in first.reason and "sign not match" in second.reason
    warned = refusals(caplog)
    assert len(warned) == 2 and "HTTP 401" in warned[0] and "check secret" in warned[1]


@pytest.mark.parametrize(
    "password", [f"wrong-{GW_PASSWORD}", "Xy7!k@9#tQ", "pa ss$word99", "p@ss w0rd!", "pässwort$1"]
)
async def test_wecom_application_start_through_a_refusing_proxy_never_shows_its_password(
    password: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The application API fetches its token at start (and so in `eventrouter check`); through a
    proxy refusing the tunnel, aiohttp's error quotes the proxy's URL with the password, and the
    start's error quoted that error. Scrubbed, it still showed a password with characters yarl
    encodes and others it keeps (``Xy7!k%409%23tQ``): neither ``quote`` form the scrub knew. The
    proxy's refusal is now said by its status alone, with what to check."""
    caplog.set_level(logging.DEBUG)
    clock = ManualClock()
    proxy_url = ""
    async with WeComReceiver(corp_secret=CORP_SECRET) as wc, AuthGateway(password=GW_PASSWORD) as gw:
        proxy_url = f"http://gw:{quote(password, safe='')}@127.0.0.1:{gw.port}"
        sink = wecom(
            clock,
            url=f"https://127.0.0.1:{wc.port}",
            corp_id=wc.corp_id,
            corp_secret=CORP_SECRET,
            agent_id=str(wc.agent_id),
            proxy=proxy_url,
        )
        try:
            with pytest.raises(SinkError, match="cannot reach WeCom") as started:
                await sink.start()
            with pytest.raises(SinkError, match="cannot reach WeCom") as checked:
                await sink.check()
        finally:
            await sink.aclose()
    assert [r.status for r in gw.requests] == [407, 407]
    for info in (started, checked):
        assert "its proxy (CONNECT) answered HTTP 407" in str(info.value)
        assert "check the user name and password in proxy" in str(info.value)
    shown = str(started.value) + str(checked.value) + caplog.text
    forms = {password, quote(password, safe=""), quote(password), quote_plus(password)}
    forms.add(yarl.URL(proxy_url).raw_password or password)  # as aiohttp's error writes it
    assert [form for form in forms if form in shown] == []
    assert CORP_SECRET not in shown


# ------------------------------------------------------------------------------------------ check


async def test_check_fails_when_the_proxy_or_the_gateway_refuses_our_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`eventrouter check` said OK when the proxy or gateway in front of the robot refused every
    request (a HEAD answered 401 or 407 "reached" it). A proxy's 407, or a 401/403 to credentials in
    the URL, now fails it, naming what to check and never the password; a 401/403 without
    credentials of ours may be for HEAD alone (a gateway without a route for it): a warning."""
    caplog.set_level(logging.INFO)
    clock = ManualClock()
    async with (
        DingTalkReceiver(access_token=TOKEN) as robot,
        AuthGateway(upstream_port=robot.port, password=GW_PASSWORD) as gw,
    ):
        good = dingtalk(robot.url, clock, proxy=gw.proxy_url)
        await good.check()
        await good.aclose()
        proxied = dingtalk(robot.url, clock, proxy=f"http://gw:wrong-{GW_PASSWORD}@127.0.0.1:{gw.port}")
        with pytest.raises(SinkError, match=r"answered HTTP 407: a proxy refused our request") as by_proxy:
            await proxied.check()
        await proxied.aclose()
        gateway = dingtalk(gw.url_for(robot.url), clock)
        gw.password = "gw-pass-rotated"  # the URL's password is no longer the gateway's
        with pytest.raises(
            SinkError, match=r"http://\*\*\*@127\.0\.0\.1:\d+/robot/send answered HTTP 401"
        ) as by_gw:
            await gateway.check()
        await gateway.aclose()
        gw.deny = 403
        anonymous = dingtalk(f"http://127.0.0.1:{gw.port}/robot/send?access_token={TOKEN}", clock)
        await anonymous.check()  # said, not failed
        await anonymous.aclose()
    assert "check the user name and password in proxy" in str(by_proxy.value)
    assert "check the user name and password in url" in str(by_gw.value)
    assert any("answered HTTP 403" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert f"http://127.0.0.1:{robot.port}/robot/send answered HEAD with 405" in caplog.text
    shown = caplog.text + str(by_proxy.value) + str(by_gw.value)
    assert GW_PASSWORD not in shown and TOKEN not in shown
