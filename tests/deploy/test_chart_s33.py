"""An `extraArgs` item holding `--sink` and its value parted by a space (session 33, item 159's gap):
the chart's credential check looked only at `--sink=VALUE` and at `--sink` followed by a second item,
so a literal password in `--sink loki:http://…?password=…` rendered into the pod spec, and the router
then refused the argument at start and printed it whole. Rendered by Helm's own engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest
from chart_helpers import CHART, deployment

SECRET_VALUE = "hunter2-S3cr3t-Value"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def _args(chart: helm.Chart, values: dict[str, Any]) -> list[str]:
    (container,) = deployment(chart, values)["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


@pytest.mark.parametrize("option", ["--sink", "--sin", "--si"])
@pytest.mark.parametrize(
    "value",
    [
        f"loki:http://loki:3100?password={SECRET_VALUE}",
        f"loki:http://u:{SECRET_VALUE}@loki:3100",
        f"webhook:https://h/k8s?header=Authorization:Bearer%20{SECRET_VALUE}",
    ],
)
def test_a_credential_in_a_sink_arg_written_with_a_space_is_refused(
    chart: helm.Chart, option: str, value: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"extraArgs\[1\]: .*(env:VAR_NAME|user info)") as refused:
        _args(chart, {"extraArgs": ["--watch-timeout=290", f"{option} {value}"]})
    assert SECRET_VALUE not in str(refused.value)


def test_a_sink_arg_written_with_a_space_is_refused_and_the_two_forms_the_router_takes_render(
    chart: helm.Chart,
) -> None:
    """Without a credential, the item still reached the router as one argument that is no option:
    it refused to start (exit 2). Refused at render, saying how to write it."""
    with pytest.raises(
        helm.HelmRenderError, match=r"extraArgs\[0\]: a --sink and its value in one item"
    ) as refused:
        _args(chart, {"extraArgs": ["--sink stdout:?level=Warning"]})
    assert "write --sink=VALUE, or --sink and the value as two items" in str(refused.value)
    # name=: a second sink named stdout beside config's is refused (session 34; the router does).
    for given in (["--sink=stdout:?name=w&level=Warning"], ["--sink", "stdout:?name=w&level=Warning"]):
        assert _args(chart, {"extraArgs": given})[-len(given) :] == given


# Item 271: the extraEnv name check wanted `_` or the start of the name before the word, so
# kube-eventer's `AccessKeySecret` (which the SLS sink reads by default, no env: reference naming it)
# rendered its literal value into the pod spec, while `AccessKeyId` beside it was refused.
SLS_FLAG = "sls:https://sls.aliyuncs.com?project=p&logStore=s&regionId=cn-hangzhou"
CREDENTIAL_NAMES = [
    "AccessKeySecret",
    "accessKeySecret",
    "ACCESS_KEY_SECRET",
    "ACCESSKEYSECRET",
    "AccessKeyId",  # kept refused: see _helpers.tpl, as AWS_ACCESS_KEY_ID and the option accessKeyId
    "clientSecret",
    "authToken",
    "securityToken",
    "dbPassword",
    "DbPasswd",
    "apiKey",
    "privateKey",
    "SecretKey",
    "hook-key",
    "smtp.pass",
    "DbPass",
]
NOT_CREDENTIAL_NAMES = [
    "MONKEY",
    "Monkey",
    "BYPASS",
    "SSL_KEY_FILE",
    "TOKEN_URL",
    "tokenUrl",
    "SecretName",
    "KEYSTORE_TYPE",
    "GOOGLE_APPLICATION_CREDENTIALS",
]


def _env(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    (container,) = deployment(chart, values)["spec"]["template"]["spec"]["containers"]
    return list(container.get("env", []))


@pytest.mark.parametrize("name", CREDENTIAL_NAMES)
def test_a_credential_named_extra_env_literal_is_refused_whatever_the_names_case_or_style(
    chart: helm.Chart, name: str
) -> None:
    values = {
        "sinks": {"flags": [SLS_FLAG]},
        "extraEnv": [{"name": name, "value": SECRET_VALUE}, {"name": "GOMAXPROCS", "value": "2"}],
    }
    with pytest.raises(
        helm.HelmRenderError, match=rf"extraEnv\[0\] \({name}\) holds a literal value.*its name says"
    ) as refused:
        _env(chart, values)
    assert SECRET_VALUE not in str(refused.value)


def test_names_that_only_contain_a_credential_word_still_render(chart: helm.Chart) -> None:
    env: list[dict[str, Any]] = [{"name": name, "value": "/not/a/secret"} for name in NOT_CREDENTIAL_NAMES]
    reference = {"secretKeyRef": {"name": "sls", "key": "secret"}}
    env.append({"name": "AccessKeySecret", "valueFrom": reference})
    assert _env(chart, {"sinks": {"flags": [SLS_FLAG]}, "extraEnv": env})[-len(env) :] == env


# Item 272: item 260's check caught `--sink VALUE` parted by an ASCII space only. Any other item the
# router refuses (a non-breaking or other Unicode space, a space before the flag, a typo of it) rendered
# its literal credential into the pod spec, and the router printed it whole in its exit-2 error.
REFUSED_ITEMS = {
    "nbsp": f"--sink\u00a0loki:http://loki:3100?password={SECRET_VALUE}",
    "em-space": f"--sink\u2003loki:http://loki:3100?password={SECRET_VALUE}",
    "ideographic-space": f"--sin\u3000loki:http://loki:3100?token={SECRET_VALUE}",
    "space-before": f" --sink=loki:http://loki:3100?password={SECRET_VALUE}",
    "nbsp-before": f"\u00a0--sink=loki:http://u:{SECRET_VALUE}@loki:3100",
    "sinks": f"--sinks=loki:http://loki:3100?password={SECRET_VALUE}",
    "sink-dash": f"--sink-loki:http://loki:3100?password={SECRET_VALUE}",
    "user-info": f"--sinks=loki:http://u:{SECRET_VALUE}@loki:3100",
    "header": f"--snk=webhook:https://h/k8s?header=Authorization:Bearer%20{SECRET_VALUE}",
}


@pytest.mark.parametrize("item", REFUSED_ITEMS.values(), ids=REFUSED_ITEMS.keys())
def test_any_extra_arg_holding_a_credential_is_refused_without_printing_it(
    chart: helm.Chart, item: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"extraArgs\[1\]: .*(env:VAR_NAME|user info)") as refused:
        _args(chart, {"extraArgs": ["--watch-timeout=290", item]})
    assert SECRET_VALUE not in str(refused.value)


@pytest.mark.parametrize(
    "item",
    ["--sink\u00a0stdout:?level=Warning", " --sink=stdout:", "\u2003--si stdout:"],
    ids=["nbsp", "space-before", "em-space-before"],
)
def test_a_sink_arg_with_any_space_in_it_is_refused_saying_how_to_write_it(
    chart: helm.Chart, item: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"extraArgs\[0\]: a --sink and its value in one item"):
        _args(chart, {"extraArgs": [item]})


def test_extra_args_without_credentials_still_render(chart: helm.Chart) -> None:
    given = [
        "--watch-timeout=290",
        "--field-selector=type=Warning",
        "--sink",
        "webhook:https://h/k8s?header=Authorization:env:HOOK_TOKEN&level=Warning",
        "--sink=stdout:?name=warnings&level=Warning",
        "--log-format",
        "json",
    ]
    assert _args(chart, {"extraArgs": given})[-len(given) :] == given
