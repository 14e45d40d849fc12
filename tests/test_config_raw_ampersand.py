"""A raw & inside a credential given in a --sink query (session 31, finding 2 of a review of the
filters): the query's parsing cuts the credential there and its rest becomes a query key, which an
"unknown option" error printed and a webhook sent on in its URL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from eventrouter.config import ConfigError, build_specs
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.webhook import WebhookReceiver

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
