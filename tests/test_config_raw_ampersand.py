"""A raw & inside a credential given in a --sink query (session 31, finding 2 of a review of the
filters): the query's parsing cuts the credential there and its rest becomes a query key, which an
"unknown option" error printed and a webhook sent on in its URL. And what that rule refused that is
no credential (finding 1 of its review): a header such as Content-Type, kube-eventer's webhook keys."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import ConfigError, build_specs
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until

HEAD, TAIL = "Xq7", "Lm9vR2zzTail"
"""A credential typed with a raw &: HEAD&TAIL."""


def _shows_tail(text: str) -> bool:
    """Whether ``text`` quotes any 4 characters of the credential's rest."""
    return any(TAIL[i : i + 4] in text for i in range(len(TAIL) - 3))


@pytest.mark.parametrize(
    ("flag", "option"),
    [
        (f"kafka:?brokers=k1:9092&user=svc&password={HEAD}&{TAIL}", "password"),
        (f"elasticsearch:http://es:9200?esUserName=u&esUserSecret={HEAD}&{TAIL}", "esUserSecret"),
        (f"dingtalk:https://oapi.dingtalk.com/robot/send?access_token=t&secret={HEAD}&{TAIL}", "secret"),
        (
            f"sls:https://cn-hangzhou.log.aliyuncs.com?project=p&logStore=l&accessKeyId=a&accessKeySecret={HEAD}&{TAIL}",
            "accessKeySecret",
        ),
        (f"loki:http://loki:3100?bearer_token={HEAD}&{TAIL}", "bearer_token"),
        (f"webhook:https://h.example/x?bearer_token={HEAD}&{TAIL}", "bearer_token"),
        (f"webhook:https://h.example/x?password={HEAD}&{TAIL}=x&username=u", "password"),  # a tail with =
        (f"webhook:https://h.example/x?header=Authorization=Bearer%20{HEAD}&{TAIL}", "header"),
        (f"wecom:?key={HEAD}&{TAIL}", "key"),
    ],
)
def test_a_raw_ampersand_in_a_query_credential_is_refused_never_showing_its_rest(
    flag: str, option: str
) -> None:
    """Before: `option 'Lm9vR2zzTail': unknown option`, and a webhook's URL became
    `...?Lm9vR2zzTail=` (printed at start and by `check`, sent to the endpoint) while the
    credential was cut to Xq7."""
    with pytest.raises(ConfigError) as refused:
        build_specs([flag])
    text = str(refused.value)
    assert f"the query key after option {option!r} is no option of this sink" in text, text
    assert "write & in a value as %26" in text
    assert not _shows_tail(text), text


def test_a_credential_in_a_yaml_urls_query_is_read_the_same_way() -> None:
    with pytest.raises(ConfigError) as refused:
        build_specs([], [{"type": "webhook", "url": f"https://h.example/x?bearer_token={HEAD}&{TAIL}"}])
    assert "after option 'bearer_token'" in str(refused.value) and not _shows_tail(str(refused.value))


def test_percent_26_an_endpoint_parameter_before_a_credential_or_after_a_reference_stay_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", "t0k")
    (spec,) = build_specs([f"webhook:https://h.example/x?code=abc&bearer_token={HEAD}%26{TAIL}"])
    assert spec.options.bearer_token.get_secret_value() == f"{HEAD}&{TAIL}"  # type: ignore[attr-defined]
    assert spec.options.url == "https://h.example/x?code=abc"
    for credential in (
        "bearer_token=env:HOOK_TOKEN",
        "header=X-Key:env:HOOK_TOKEN",
        "header=X-Key=env:HOOK_TOKEN",
    ):
        (spec,) = build_specs([f"webhook:https://h.example/x?{credential}&code=abc&level=Warning"])
        assert spec.options.url == "https://h.example/x?code=abc" and spec.filter.level == "Warning"
    # A known option after a literal credential is that option, as before.
    (spec,) = build_specs([f"dingtalk:https://oapi.dingtalk.com/robot/send?access_token={HEAD}&level=Normal"])
    assert spec.filter.level == "Normal"


async def test_a_webhook_given_a_credential_with_a_raw_ampersand_exits_2_and_sends_nothing(
    tmp_path: Path,
) -> None:
    """End to end: before, `run` delivered with `Authorization: Bearer Xq7` to `...?Lm9vR2zzTail=`
    and logged that URL."""
    async with FakeApiServer(token="t") as api, WebhookReceiver() as hook:
        api.create_event(event_object())
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "eventrouter.cli", "run", "--kubeconfig", str(kubeconfig),
            f"--sink=webhook:{hook.url}?batch_max_wait=0.02&bearer_token={HEAD}&{TAIL}",
            "--metrics-addr", "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(30):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = (out + err).decode()
        assert proc.returncode == 2, text
        assert "after option 'bearer_token'" in text and not _shows_tail(text), text
        assert hook.requests == []


# ---- a review of item 235: a header that is no credential, kube-eventer's own webhook keys --------


KUBE_EVENTER_SCENARIOS = [
    # kube-eventer's docs/en/webhook-sink.md, "Typical Scenarios", as written there.
    "webhook:https://oapi.dingtalk.com/robot/send?access_token=token&level=Normal&kinds=Pod&header=Content-Type=application/json&custom_body_configmap=custom-body&custom_body_configmap_namespace=kube-system&method=POST",
    "webhook:http://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=633a31f6-7f9c-4bc4-97a0-0ec1eefa5898&level=Normal&kinds=Pod&header=Content-Type=application/json&custom_body_configmap=custom-body&custom_body_configmap_namespace=kube-system&method=POST",
    "webhook:https://hooks.slack.com/services/d/B00000000/XXX?&level=Normal&kinds=Pod&header=Content-Type=application/json&custom_body_configmap=custom-body&custom_body_configmap_namespace=kube-system&method=POST",
    "webhook:https://hook.bearychat.com/=bwIsS/incoming/xxxxxxxxxxxxxxxxxxxxxx?&level=Normal&kinds=Pod&header=Content-Type=application/json&custom_body_configmap=custom-body&custom_body_configmap_namespace=kube-system&method=POST",
    "webhook:https://open.feishu.cn/open-apis/bot/hook/xxxxxxxxxxxxxxxxxxxxxxxxxx?level=Warning&method=POST&header=Content-Type=application/json&custom_body_configmap=custom-body&custom_body_configmap_namespace=kube-system",
    "webhook:https://open.feishu.cn/open-apis/bot/v2/hook/xxxxxxxxxxxxxxxxxxxxxxxxxx?level=Warning&method=POST&header=Content-Type=application/json&custom_body_configmap=custom-body&custom_body_configmap_namespace=kube-system",
]  # fmt: skip


@pytest.mark.parametrize("flag", KUBE_EVENTER_SCENARIOS)
def test_kube_eventers_documented_webhook_flags_name_the_configmap_and_what_replaces_it(flag: str) -> None:
    """Item 235 took `Content-Type=application/json` for a credential: each of these exited 2 with
    "the query key after option 'header' … may be the rest of that credential", whose hint (put the
    endpoint's parameter before 'header') made the ConfigMap's name go to the endpoint, silently."""
    with pytest.raises(ConfigError) as refused:
        build_specs([flag])
    text = str(refused.value)
    assert "(sink 'webhook'): option 'custom_body_configmap': kube-eventer's body template" in text, text
    assert "body_template_file=/path" in text and "the query key after" not in text
    # Without them, as docs/migration.md says, the flag runs.
    (spec,) = build_specs(
        [flag.replace("&custom_body_configmap=custom-body&custom_body_configmap_namespace=kube-system", "")]
    )
    assert spec.options.headers["Content-Type"].get_secret_value() == "application/json"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "query",
    [
        "reason=BackOff&header=Content-Type=application/json",
        "header=Content-Type=application/json&reason=BackOff",
    ],
)
def test_kube_eventers_reason_on_a_webhook_is_refused_pointing_at_reasons(query: str) -> None:
    """It was sent to the endpoint, filtering nothing (with only a warning; after a header, refused as
    a credential's rest)."""
    with pytest.raises(ConfigError) as refused:
        build_specs([f"webhook:https://hooks.example/k8s?{query}"])
    assert "option 'reason': did you mean reasons?" in str(refused.value), str(refused.value)


def test_an_endpoint_parameter_after_a_header_that_is_no_credential_stays_in_the_url() -> None:
    for query in (
        "header=X-Team=platform&team=platform",
        "header=Content-Type:application/json&team=platform",
        # The header right before the key counts, not an earlier one.
        f"header=X-Api-Key={HEAD}&header=X-Team=platform&team=platform",
    ):
        (spec,) = build_specs([f"webhook:https://h.example/x?{query}"])
        assert spec.options.url == "https://h.example/x?team=platform", query


@pytest.mark.parametrize(
    "header",
    [
        "Authorization=Bearer%20",
        "authorization:Basic%20",
        "Proxy-Authorization=",
        "Cookie=session=",
        "X-Api-Key=",
        "X-Auth-Token=",
        "Private-Token:",
        "X-Hub-Signature-256=",
        "X-Sign=",
        "X-Client-Secret=",
        "X-Password=",
        "X-Passwd=",
        "X-Credential=",
        "",  # no Name=Value at all: a credential cut elsewhere
    ],
)
def test_a_raw_ampersand_in_a_header_whose_name_says_credential_stays_refused(header: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build_specs([f"webhook:https://h.example/x?header={header}{HEAD}&{TAIL}"])
    text = str(refused.value)
    assert "the query key after option 'header' is no option of this sink" in text and not _shows_tail(text)


async def test_a_webhook_sends_an_endpoint_parameter_given_after_a_plain_header(tmp_path: Path) -> None:
    """End to end, as the review ran it: before item 235 delivered with `?team=platform`."""
    async with FakeApiServer(token="t") as api, WebhookReceiver() as hook:
        api.create_event(event_object())
        (spec,) = build_specs(
            [f"webhook:{hook.url}?header=X-Team=platform&team=platform&batch_max_wait=0.02"]
        )
        router = Router(router_settings(api, tmp_path), [spec])
        async with router.running():
            await until(lambda: hook.accepted)
        (request,) = hook.accepted
        assert request.query == "team=platform" and request.headers["X-Team"] == "platform"
