"""The `headers` option of the Loki and webhook sinks: one parser, each value a credential that may
be read from env:NAME or file:/path (as may a whole Name:Value), checked alike, never shown."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from eventrouter import OutcomeKind, SinkContext
from eventrouter.config import ConfigError, build_specs, spec_for_class
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))
TOKEN = "tok-from-env-5f2a9c"
FILED = "key-from-file-81b7e3"
WHOLE = "whole-from-env-c04d6a"


def _recent() -> Any:
    when = datetime.fromtimestamp(time.time() - 5, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when)


async def test_a_loki_header_value_read_from_env_or_a_file_reaches_loki_resolved_and_stays_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`headers=X-Token:env:TOKEN` was sent as the text "env:TOKEN" (only a whole `env:`/`file:`
    header was read), while the webhook's headers read their values so."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("LOKI_HEADER_TOKEN", TOKEN + "\n")  # as `echo token | base64` leaves it
    monkeypatch.setenv("LOKI_WHOLE_HEADER", f"X-Whole: {WHOLE}")
    key_file = tmp_path / "loki-key"
    key_file.write_text(FILED + "\n")
    async with LokiReceiver() as loki:
        query = "&".join(
            [
                "headers=" + quote("X-Token: env:LOKI_HEADER_TOKEN", safe=":"),
                "headers=" + quote(f"X-Key=file:{key_file}", safe=":/"),  # kube-eventer's Name=Value
                "headers=env:LOKI_WHOLE_HEADER",  # the whole Name:Value, as before
            ]
        )
        (spec,) = build_specs([f"loki:{loki.url}?{query}"])
        for hidden in (TOKEN, FILED, WHOLE):
            assert hidden not in repr(spec.options)
        sink = spec.build(CONTEXT)
        assert isinstance(sink, LokiSink)
        try:
            await sink.start()
            assert [o.kind for o in await sink.send([_recent()]) or []] == [OutcomeKind.OK]
            # A gateway echoing the request it refused: the values read are ours, masked.
            loki.fail_next(400, message=f"invalid key {FILED} for {TOKEN};", echo=True)
            (refused,) = await sink.send([_recent()]) or []
        finally:
            await sink.aclose()
    sent = loki.pushes[0].headers
    assert (sent["X-Token"], sent["X-Key"], sent["X-Whole"]) == (TOKEN, FILED, WHOLE)
    assert refused.kind is OutcomeKind.REJECT and "****" in refused.reason
    for text in (refused.reason, caplog.text):
        for hidden in (TOKEN, FILED, WHOLE):
            assert hidden not in text


SINKS = [pytest.param(LokiSink, "loki", id="loki"), pytest.param(WebhookSink, "webhook", id="webhook")]


@pytest.mark.parametrize(("sink_cls", "type_"), SINKS)
def test_both_sinks_read_the_same_headers_alike(
    sink_cls: Any, type_: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each form of the option gives the same headers in both sinks (before: Loki kept `Name=Value`
    as an invalid name and `Name:env:X` as text; the webhook sent `env:X` as a header named "env")."""
    monkeypatch.setenv("HDR_TOKEN", TOKEN)
    monkeypatch.setenv("HDR_WHOLE", f"X-Whole:{WHOLE}")
    key_file = tmp_path / "key"
    key_file.write_text(FILED)
    forms: list[tuple[Any, dict[str, str]]] = [
        ("X-Token:env:HDR_TOKEN", {"X-Token": TOKEN}),
        (["X-Key = file:" + str(key_file), "X-Team=ops:night"], {"X-Key": FILED, "X-Team": "ops:night"}),
        (["env:HDR_WHOLE", "X-Plain: a=b"], {"X-Whole": WHOLE, "X-Plain": "a=b"}),
        ({"X-Token": "env:HDR_TOKEN", "X-Lit": " lit "}, {"X-Token": TOKEN, "X-Lit": "lit"}),
    ]
    for given, expected in forms:
        spec = spec_for_class(sink_cls, {"url": "http://127.0.0.1:1/x", "headers": given}, type_=type_)
        assert isinstance(spec.options, LokiOptions | WebhookOptions)
        got = {name: value.get_secret_value() for name, value in spec.options.headers.items()}
        assert got == expected, given


@pytest.mark.parametrize(("sink_cls", "type_"), SINKS)
@pytest.mark.parametrize(
    ("given", "env", "said"),
    [
        (
            "X-Token:env:HDR_BROKEN",
            "s3cr3t-part\r\nX-Injected: 1",
            "the value of 'X-Token' contains a line break",
        ),
        (
            "X-Token:env:HDR_BROKEN",
            "s3cr3t-part\x1b[0m",
            "the value of 'X-Token' contains a control character",
        ),
        ("env:HDR_BROKEN", "X-Token s3cr3t-part", "'<entry #1 (env:HDR_BROKEN) is not Name:Value>'"),
        ("X-Token:env:HDR_UNSET", None, "environment variable 'HDR_UNSET' is not set"),
        (
            ["X-A:1", "Bad Name:s3cr3t-part"],
            None,
            "'<entry #2 is not Name:Value>' is not a valid header name",
        ),
    ],
    ids=["crlf-from-env", "escape-from-env", "whole-not-name-value", "unset", "bad-name"],
)
def test_both_sinks_refuse_a_bad_header_at_configuration_naming_it_never_its_value(
    sink_cls: Any,
    type_: str,
    given: Any,
    env: str | None,
    said: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if env is not None:
        monkeypatch.setenv("HDR_BROKEN", env)
    with pytest.raises(ConfigError) as caught:
        spec_for_class(sink_cls, {"url": "http://127.0.0.1:1/x", "headers": given}, type_=type_)
    message = str(caught.value)
    assert said in message, message
    assert "s3cr3t" not in message and "X-Injected" not in message
