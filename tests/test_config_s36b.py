"""Item 322's follow-ups (session 36, item 326): a credential pasted into ``types`` is shown by the
same rule in ``check``'s filter line and in the field-selector refusal as in the warning; plain typos
(a port typo, an unreplaced ``${PORT}``, a bad silence date) are quoted again; the duplicate-name
refusals show the sink's name by the rule too."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from eventrouter.cli import main
from eventrouter.config import ConfigError, build_specs
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.testing.factories import recorded_occurrences

SECRET = "Zq9S3cretPw"
"""A credential's value: it must appear in no output."""

TOKEN = "Ab3dE5gH7jK9mN1pQ3sT5vX7"

CREDENTIAL_SHAPED = [
    f"loki:http://admin:{SECRET}@loki:3100",  # a --sink flag pasted whole
    f"Bearer abc.{SECRET}",
    f"password:{SECRET}",
    f"admin:{SECRET}/x",
    TOKEN,
]

NOT_WHOLE = "(a value that may hold a credential is not shown whole)"


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["check", "--offline", *args])
    said = capsys.readouterr()
    return code, said.out + said.err


# `types` refuses a value with a space (`Bearer …`), hidden since item 322: the others are taken.
TAKEN_AS_TYPES = [value for value in CREDENTIAL_SHAPED if " " not in value]


@pytest.mark.parametrize("value", TAKEN_AS_TYPES)
def test_check_filter_line_never_prints_a_credential_put_in_types(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The warning hid it since item 322, but the next line of ``check`` (``filter: types=…``)
    printed it whole."""
    query = urllib.parse.quote(f"Warning,{value}", safe=",")
    code, said = _check(capsys, f"--sink=stdout:?types={query}")
    assert code == 0, said
    assert SECRET not in said and TOKEN not in said, said
    assert "valid stdout (stdout)  filter: types=Warning," in said, said


@pytest.mark.parametrize("value", TAKEN_AS_TYPES)
def test_the_field_selector_refusal_never_prints_a_credential_put_in_types(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sink that ``--field-selector type=Warning`` leaves nothing was refused quoting ``types``
    twice, in ``check``'s output and the pod log."""
    query = urllib.parse.quote(f"Normal,{value}", safe=",")
    code, said = _check(
        capsys, f"--sink=loki:http://loki:3100?types={query}", "--field-selector=type=Warning"
    )
    assert code == 2, said
    assert SECRET not in said and TOKEN not in said, said
    assert "option 'types' (types=Normal," in said and "--field-selector (type=Warning) lets none" in said, (
        said
    )


def test_check_shows_a_types_list_from_yaml_by_the_same_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A YAML ``types:`` list, beside a plain type that is still shown whole."""
    config = tmp_path / "c.yaml"
    config.write_text(
        f"sinks:\n  - type: stdout\n    types: [Warning, OOMKilled, 'loki:http://admin:{SECRET}@loki:3100']\n"
    )
    code, said = _check(capsys, f"--config={config}")
    assert code == 0, said
    assert SECRET not in said, said
    assert "filter: types=Warning,OOMKilled,loki:…" in said, said


def _refusal(flags: list[str], sinks: list[dict[str, Any]] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_specs(flags, sinks or [])
    return str(info.value)


DINGTALK = {"type": "dingtalk", "url": "https://oapi.dingtalk.com/robot/send", "access_token": "t0ken"}


@pytest.mark.parametrize(
    ("flags", "sinks", "shown"),
    [
        (
            ["kafka:kafka-0:9092,kafka-1:9O92?topic=events"],
            None,
            "broker 'kafka-1:9O92' must be host or host:port",
        ),
        (
            ["kafka:kafka-0:9092,kafka-1:${KAFKA_PORT}?topic=events"],
            None,
            "broker 'kafka-1:${KAFKA_PORT}' must be",
        ),
        (
            ["loki:http://loki.monitoring:31OO"],
            None,
            "url 'http://loki.monitoring:31OO': Port could not be cast",
        ),
        (
            [],
            [{"type": "loki", "url": "http://loki.monitoring:${LOKI_PORT}"}],
            "url 'http://loki.monitoring:${LOKI_PORT}': Port could not be cast",
        ),
        (
            [],
            [{"type": "elasticsearch", "url": "https://es.example.com:92OO"}],
            "node 'https://es.example.com:92OO': Port could not be cast",
        ),
        (
            [],
            [{"type": "elasticsearch", "hosts": ["http://es-0:9200", "http://es-1:92OO"]}],
            "node 'http://es-1:92OO': Port could not be cast",
        ),
        (
            [],
            [{**DINGTALK, "silences": ["namespace=default,until=2026-13-01"]}],
            "until='2026-13-01' is not an RFC 3339 time",
        ),
        (
            [],
            [{"type": "webhook", "url": "http://hook:8080/x", "healthcheck_url": "hook:8080/healthz"}],
            "healthcheck_url must be http(s)://host[:port][/path], not 'hook:8080/…'",
        ),
    ],
    ids=[
        "broker-port",
        "broker-placeholder",
        "loki-port",
        "loki-placeholder",
        "es-url",
        "es-hosts",
        "until",
        "health",
    ],
)
def test_a_plain_typo_is_quoted_whole_again(
    flags: list[str], sinks: list[dict[str, Any]] | None, shown: str
) -> None:
    """Item 322 took a port typo, an unreplaced template placeholder or a bad date for a credential and
    showed ``'kafka-1:…'``, ``'http://…'``, ``until='****'``, ``'hook:****/…'``: nothing to fix by."""
    said = _refusal(flags, sinks)
    assert shown in said and NOT_WHOLE not in said, said


HIDDEN_BESIDE_THE_TYPOS: list[tuple[list[str], list[dict[str, Any]] | None, str]] = [
    # A number longer than a port after a name (a PIN, an all-digit password) was quoted whole.
    (["kafka:kafka-0:9092,admin:20231207?topic=events"], None, "20231207"),
    (["kafka:kafka-0:9092,admin:Zq9S3cretPw?topic=events"], None, SECRET),
    ([], [{"type": "loki", "url": "http://loki:3100", "level": f"password:{SECRET}"}], SECRET),
    # A short plain part, then a `/` and the rest of a password (r326 F1: shown whole after item 326).
    (
        [],
        [{"type": "loki", "url": "http://loki:3100", "level": "password:ab/S3cretPassw0rd"}],
        "S3cretPassw0rd",
    ),
    ([], [{"type": "loki", "url": "http://loki:3100", "level": "admin:Pa55/word!"}], "word!"),
    (
        [],
        [{"type": "webhook", "url": "http://hook:8080/x", "healthcheck_url": f"admin:{SECRET}/x"}],
        SECRET,
    ),
    (
        [],
        [{"type": "webhook", "url": "http://hook:8080/x", "healthcheck_url": "hook:8080/a=Zq9S3cretPw"}],
        SECRET,
    ),
    ([], [{**DINGTALK, "silences": [f"namespace=default,until={SECRET}"]}], SECRET),
    # `silences` cuts a key at its first `=`: a base64 credential was quoted without its padding.
    ([], [{**DINGTALK, "silences": ["Basic YWRtaW46cGFzcw=="]}], "YWRtaW46cGFzcw"),
]


def test_credential_shapes_beside_the_typos_stay_hidden() -> None:
    """What the typos' rule must not let through: a number longer than a port (was quoted whole), a
    base64 key without its padding (was quoted so), and the shapes item 322 hid."""
    for flags, sinks, secret in HIDDEN_BESIDE_THE_TYPOS:
        said = _refusal(flags, sinks)
        assert secret not in said and NOT_WHOLE in said, said


def test_the_duplicate_name_refusals_show_the_name_by_the_credential_rule() -> None:
    """Both refusals of ``build_specs`` quoted the names whole, the second also their file name. (Item
    339: a name holding ':', '=' or '@' is now refused before either, not shown.)"""
    name = f"loki:http://admin:{SECRET}@loki:3100"
    said = _refusal([], [{"type": "stdout", "name": name}, {"type": "stdout", "name": name}])
    assert SECRET not in said, said
    assert "config sinks[0]: option 'name': Value error, its name (not shown) holds a ':'" in said, said
    # A lower-case password makes no token run in the file name: it must not be shown there either.
    said = _refusal(
        [],
        [
            {"type": "stdout", "name": "loki:http://admin:hunter2prod@loki:3100"},
            {"type": "stdout", "name": "loki_http_//admin_hunter2prod@loki_3100"},
        ],
    )
    assert "hunter2prod" not in said, said
    assert "config sinks[0]: option 'name': Value error, its name (not shown) holds a ':'" in said, said
    # Plain names are named as before.
    said = _refusal([], [{"type": "stdout", "name": "team-a"}, {"type": "stdout", "name": "team-a"}])
    assert "sink name 'team-a' is already used by config sinks[0]" in said, said
    said = _refusal([], [{"type": "stdout", "name": "team:a"}, {"type": "stdout", "name": "team/a"}])
    assert "config sinks[0]: option 'name': Value error, its name (not shown) holds a ':'" in said, said


NAMED = f"token:{SECRET}"  # a name the router took (r326 F3: quoted whole by cli.py's own refusals)
NAME_REFUSED = "option 'name': Value error, its name (not shown) holds a ':'"  # item 339


def test_two_sinks_on_one_file_are_refused_without_quoting_a_credential_shaped_name(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """cli.py's "two sinks on one file" refusal quoted both names whole beside config's hidden form."""
    path = tmp_path / "events.jsonl"
    config = tmp_path / "router.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sinks": [
                    {"type": "file", "name": NAMED, "path": str(path)},
                    {"type": "file", "name": "plain", "path": str(path)},
                ]
            }
        ),
        encoding="utf-8",
    )
    code, said = _check(capsys, f"--config={config}")
    assert code == 2, said
    assert SECRET not in said, said
    assert f"sinks[0]: {NAME_REFUSED}" in said, said  # item 339: refused before the shared file


def test_replay_names_the_configured_sinks_without_quoting_a_credential_shaped_name(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``replay --to nosuch`` listed the configured sinks whole (``configured: token:…``)."""
    letters = tmp_path / "deadletter" / "hook.jsonl"
    assert DeadLetter(letters, sink="hook").write(
        [(occ, "webhook answered 400") for occ in recorded_occurrences()[:2]]
    )
    name = urllib.parse.quote(NAMED, safe="")
    code = main(["replay", str(letters), f"--sink=stdout:?name={name}", "--to", "nosuch"])
    said = capsys.readouterr()
    text = said.out + said.err
    assert code == 2, text
    assert SECRET not in text, text
    assert f"--sink #1: {NAME_REFUSED}" in text, text  # item 339: refused before --to is read
