"""The router's own configuration errors never print a credential a user put where no credential
goes (session 36): a flag pasted whole into a YAML ``type:``, a flag whose type is ``Bearer …``, and
a credential-shaped value in any option a validator quotes (``level``, a time zone, a topic, a file
path), for every built-in sink type, in a ``--sink`` flag and a YAML entry. Typos are still quoted."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any

import pytest

from eventrouter.config import ConfigError, build_spec, build_specs, parse_sink_flag
from eventrouter.options import FilterOptions, PipelineOptions, field_keys
from eventrouter.plugins import SinkPlugin, discover

SECRET = "Zq9S3cretPw"
"""A credential's value: it must appear in no message."""

TOKEN = "Ab3dE5gH7jK9mN1pQ3sT5vX7"
"""A generated token (an access key, an API key) given bare."""

CREDENTIAL_SHAPED = [
    f"loki:http://admin:{SECRET}@loki:3100",  # a --sink flag pasted whole
    f"Bearer abc.{SECRET}",  # an Authorization header's value
    f"password:{SECRET}",  # a credential typed name:value
    f"admin:{SECRET}/x",  # quoted in part by a URL's validator ('admin:…/…' from shown_address)
    TOKEN,
]

# A valid base for each built-in type, so that a value the sink takes is checked too (its warnings).
BASES: dict[str, tuple[str, dict[str, str]]] = {
    "stdout": ("", {}),
    "file": ("/tmp/eventrouter-s36/events.jsonl", {}),
    "webhook": ("http://hook:8080/x", {}),
    "loki": ("http://loki:3100", {}),
    "kafka": ("kafka-0:9092", {"topic": "events"}),
    "elasticsearch": ("http://es:9200", {}),
    "opensearch": ("http://es:9200", {}),
    "sls": ("https://cn-hangzhou.log.aliyuncs.com", {"project": "p", "logstore": "s"}),
    "dingtalk": ("https://oapi.dingtalk.com/robot/send", {"access_token": "t0ken"}),
    "wecom": ("https://qyapi.weixin.qq.com/cgi-bin/webhook/send", {"key": "k3y"}),
    "wechat": ("https://qyapi.weixin.qq.com/cgi-bin/webhook/send", {"key": "k3y"}),
}


@pytest.fixture(scope="module")
def plugins() -> Mapping[str, SinkPlugin]:
    return discover()


def _refusal(flags: list[str], sinks: list[dict[str, Any]] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_specs(flags, sinks or [])
    return str(info.value)


@pytest.mark.parametrize(
    "sink",
    [
        {"type": f"loki:http://admin:{SECRET}@loki:3100"},
        # A url with a query is read as a flag's: the type must not be split into it.
        {"type": f"loki:http://admin:{SECRET}@loki:3100", "url": "http://loki:3100?tenant=a"},
    ],
)
def test_a_flag_pasted_whole_into_a_yaml_type_is_not_printed(sink: dict[str, Any]) -> None:
    """Printed whole before (``unknown sink type 'loki:http://admin:S3cret@loki:3100'``) in the pod
    log; now as an option name is shown, with the likely meaning."""
    said = _refusal([], [sink])
    assert SECRET not in said, said
    assert "unknown sink type 'loki:…' (the rest not shown: did you mean type: loki and url: …?)" in said, (
        said
    )
    # A type that is no name and whose head is none either is not shown at all.
    said = _refusal([], [{"type": f"{SECRET}@loki"}])
    assert SECRET not in said and "unknown sink type (a type that is no type name, not shown)" in said, said
    # A plain unknown type is still named as before.
    assert "unknown sink type 'lokii'" in _refusal([], [{"type": "lokii"}])


@pytest.mark.parametrize(
    ("flag", "shown"),
    [
        (f"Bearer abc.{SECRET}:x", "invalid sink type 'Bearer …' (the rest not shown"),
        (f"{SECRET}@x:y", "invalid sink type (a type that is no type name, not shown)"),
        (f"{TOKEN} x:y", "invalid sink type (a type that is no type name, not shown)"),
    ],
)
def test_a_flag_type_holding_a_credential_is_not_printed(flag: str, shown: str) -> None:
    """The part of a flag before its first ``:`` was printed whole (``invalid sink type 'Bearer
    abc.…'``)."""
    said = _refusal([flag])
    assert SECRET not in said and TOKEN not in said, said
    assert shown in said, said
    # A typo is shown whole as before.
    assert "invalid sink type 'bad type'" in _refusal(["bad type:x"])


@pytest.mark.parametrize("value", CREDENTIAL_SHAPED)
@pytest.mark.parametrize("given", ["flag", "yaml"])
def test_a_level_holding_a_credential_is_not_printed(value: str, given: str) -> None:
    """``level`` (and any option a validator quotes): ``level must be Normal or Warning, not
    'loki:http://admin:S3cret@…'`` before. The option is still named and what it takes said."""
    if given == "flag":
        said = _refusal([f"loki:http://loki:3100?level={urllib.parse.quote(value, safe='')}"])
    else:
        said = _refusal([], [{"type": "loki", "url": "http://loki:3100", "level": value}])
    assert SECRET not in said and TOKEN not in said, said
    assert "option 'level': Value error, level must be Normal or Warning, not '" in said, said
    assert "(a value that may hold a credential is not shown whole)" in said, said
    # Typos are still quoted.
    said = _refusal(["loki:http://loki:3100?level=Warnig"])
    assert "level must be Normal or Warning, not 'Warnig'" in said and "not shown" not in said, said
    said = _refusal(["kafka:k0:9092,k1:port?topic=t"])
    assert "broker 'k1:port' must be host or host:port" in said, said
    said = _refusal(["loki:http://loki:3100?namespaces=kube%20system"])
    assert "'kube system' is not a namespace name" in said, said


def _keys(plugin: SinkPlugin) -> list[str]:
    """Every key of the sink's options, the engine's and the filter's but credentials' (masked as such
    since item 273) and ``url`` (shown by its own rules)."""
    keys: list[str] = []
    for model in (FilterOptions, PipelineOptions, plugin.load().options_model):
        for name, info in model.model_fields.items():
            if "SecretStr" not in str(info.annotation) and name != "url":
                keys += sorted(field_keys(name, info))
    return keys


@pytest.mark.parametrize("type_", sorted(BASES))
def test_no_credential_shaped_value_is_printed_for_any_option_of_any_built_in_sink(
    type_: str, plugins: Mapping[str, SinkPlugin], caplog: pytest.LogCaptureFixture
) -> None:
    """Each option of the sink given each credential-shaped value, in a flag and in a YAML entry (a
    text and a list): the secret is in no ConfigError and in no log record (a sink taking it may
    warn). Before, 29 option keys of the built-in sinks and the filter's quoted it (level, namespaces,
    kinds, types, time_zone, topic, index, file paths, silences, group_by, labels, name, url…), and a
    type the sink took was logged whole ("… is neither Normal nor Warning")."""
    assert set(BASES) == set(plugins), "a built-in type without a base here"
    url, base = BASES[type_]
    caplog.set_level(logging.DEBUG)
    leaks: list[str] = []
    for key in _keys(plugins[type_]):
        for value in CREDENTIAL_SHAPED:
            given = {**base, key: value}
            query = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in given.items())
            entries = [
                parse_sink_flag(f"{type_}:{url}?{query}", where="--sink #1"),
                {"type": type_, "url": url, **given},
                {"type": type_, "url": url, **base, key: [value]},
            ]
            for entry in entries:
                try:
                    build_spec(entry, where="config", plugins=plugins)
                except ConfigError as exc:
                    if SECRET in str(exc) or TOKEN in str(exc):
                        leaks.append(f"{key}={value!r}: {exc}")
    assert not leaks, "\n".join(leaks)
    assert SECRET not in caplog.text and TOKEN not in caplog.text, caplog.text
