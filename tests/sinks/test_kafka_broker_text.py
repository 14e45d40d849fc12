"""Kafka sink: what a broker's text may hold. ``brokers=user:password@host:9092`` (the form other
sinks take in their URL) passed validation: aiokafka read the host ``user:password@host``, and the
password was printed at every start retry (the router's line and aiokafka's own), and by ``check``;
the scheme form ``sasl_ssl://user:password@k:9093`` was refused with the whole value echoed. Such a
broker is a configuration error naming the option and the broker's position, never its text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PASSWORD = "Pw1x"
CREDENTIALS = "give SASL credentials as user= and password=env:NAME"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    """``eventrouter check --offline`` as run from a shell (the logs on stderr, debug and up)."""
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", "check", "--offline", "--log-level", "debug", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def _refused(result: subprocess.CompletedProcess[str], expected: str, *hidden: str) -> None:
    shown = result.stdout + result.stderr
    assert result.returncode == 2, shown
    assert expected in result.stderr, shown
    assert "Traceback" not in shown
    for text in (PASSWORD, *hidden):
        assert text not in shown, shown


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (
            f"kafka:?brokers=u:{PASSWORD}@k:9092",
            "--sink #1 (sink 'kafka'): option 'brokers': Value error, brokers[0] holds an @ "
            "(user info, not shown)",
        ),
        (
            f"kafka:?brokers=k0:9092,u:{PASSWORD}@k1:9092&brokers=k2:9092",
            "option 'brokers': Value error, brokers[1] holds an @",
        ),
        (
            f"kafka:?brokers=u:{PASSWORD}@k0:9092&brokers=k1:9092,v:{PASSWORD}@k2:9092",
            "option 'brokers': Value error, brokers[0], brokers[2] hold an @",
        ),
        (
            f"kafka:sasl_ssl://u:{PASSWORD}@k:9093",
            "--sink #1 (sink 'kafka'): option 'url': Value error, the sink's URL holds an @ "
            "(user info, not shown)",
        ),
        (f"kafka:u:{PASSWORD}@k:9092", "option 'url': Value error, the sink's URL holds an @"),
        (f"kafka:kafka://u:{PASSWORD}@k0:9092,k1:9092", "option 'url': Value error, the sink's URL holds"),
        # A scheme given with the brokers= option too.
        (f"kafka:?brokers=sasl_ssl://u:{PASSWORD}@k:9093", "option 'brokers': Value error, brokers[0] holds"),
    ],
)
def test_a_broker_with_user_info_is_refused_by_check_naming_its_position_never_its_text(
    flag: str, expected: str
) -> None:
    result = _check(f"--sink={flag}")
    _refused(result, expected)
    assert CREDENTIALS in result.stderr


def test_a_password_split_at_its_comma_shows_no_part_of_it() -> None:
    """``P,w1x`` splits the broker in two: ``u:P`` holds no @, and was shown as a malformed broker
    before its other half was looked at."""
    result = _check("--sink=kafka:?brokers=k0:9092,u:P,w1x@k1:9092")
    _refused(result, "option 'brokers': Value error, brokers[2] holds an @", "u:P", "w1x")


def test_a_broker_with_user_info_in_a_yaml_config_is_refused_never_shown(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    for sink, expected in (
        (
            f'brokers: [kafka-0:9092, "svc-events:{PASSWORD}@kafka-1:9092"]',
            "option 'brokers': Value error, brokers[1] holds an @",
        ),
        (
            f"url: sasl_ssl://svc-events:{PASSWORD}@kafka-0:9093",
            "option 'url': Value error, the sink's URL holds an @",
        ),
    ):
        config.write_text(f"sinks:\n  - type: kafka\n    name: events\n    topic: audit\n    {sink}\n")
        result = _check(f"--config={config}")
        _refused(result, f"{config} sinks[0] (sink 'events'): {expected}", "svc-events")
        assert CREDENTIALS in result.stderr


@pytest.mark.parametrize(
    ("broker", "expected"),
    [
        # aiokafka splits at the last ':' only: these gave the host `a:b`, accepted and never resolved.
        # Shown by the credential rule of items 322/326 (a `name:value` past a port may be user:password).
        ("a:b:9092", "broker 'a:…' must be host or host:port: its host holds a ':' (brokers[1]"),
        ("[a:b]:9092", "broker '****' must be host or host:port: its host in brackets is no IPv6"),
        # A scheme (the security protocol's) says which options set it.
        ("sasl_ssl://k:9093", "broker 'sasl_ssl://k:9093' must be host or host:port, without a scheme"),
    ],
)
def test_a_broker_whose_host_is_no_host_is_refused_naming_its_position(broker: str, expected: str) -> None:
    result = _check(f"--sink=kafka:?brokers=k0:9092,{broker}")
    _refused(result, f"option 'brokers': Value error, {expected}")
    assert "(brokers[1]" in result.stderr


VALID = [
    "kafka-0",
    "kafka-0.kafka.svc:9092",
    "10.0.0.7:9093",
    "[::1]:9092",
    "[2001:db8::7]",
    "::1",  # a bare IPv6 address, port 9092: aiokafka reads it so
    "[fe80::1%eth0]:9092",
]


def test_the_valid_broker_forms_still_pass_and_beside_them_a_broker_with_user_info_does_not() -> None:
    """host, host:port, IPv4, IPv6 (bracketed, bare, scoped), several brokers, repeated keys, the URL
    shorthand with and without kafka://: all valid as before. The same list with one broker holding
    user info is refused naming that broker's position only."""
    brokers = ",".join(VALID)
    for flag in (
        f"kafka:?brokers={brokers}",
        f"kafka:?brokers={VALID[0]}&brokers={','.join(VALID[1:])}",
        "kafka:kafka-0:9092,kafka-1:9092",
        "kafka:kafka://kafka-0:9092",
    ):
        result = _check(f"--sink={flag}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("valid kafka (kafka"), result.stdout
    result = _check(f"--sink=kafka:?brokers={brokers},u:{PASSWORD}@kafka-9:9092")
    _refused(result, f"option 'brokers': Value error, brokers[{len(VALID)}] holds an @ (user info")
