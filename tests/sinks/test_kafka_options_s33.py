"""Kafka's brokers given both in the url and in ``brokers=`` (item 273, session 33): the url's were
ignored while ``check`` and the start-up line showed them as the sink's address."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from eventrouter.config import ConfigError, build_specs
from eventrouter_sinks.kafka import KafkaOptions

BOTH = "give the brokers in the url or in brokers=, not both"


@pytest.mark.parametrize(
    "flag",
    [
        "kafka:k1:9092?brokers=k2:9092&topic=t",
        "kafka:k1:9092?brokers=k1:9092&topic=t",  # the same broker twice: still one place to say it
        "kafka:kafka://k1:9092,k3:9092/?brokers=k2:9092,k4:9092&topic=t",
    ],
)
def test_brokers_in_the_url_and_as_an_option_are_refused(flag: str) -> None:
    """Before: `valid kafka (kafka k1:9092)` in `check`, and the producer connected to k2 alone."""
    with pytest.raises(
        ConfigError, match=f"^--sink #1 \\(sink 'kafka'\\): option '\\(options\\)': Value error, {BOTH}$"
    ):
        build_specs([flag])


def test_a_yaml_url_beside_a_brokers_list_is_refused() -> None:
    with pytest.raises(ValidationError, match=BOTH):
        KafkaOptions.model_validate({"url": "k1:9092", "brokers": ["k2:9092"], "topic": "t"})


@pytest.mark.parametrize(
    ("entry", "brokers"),
    [
        ({"url": "k1:9092,k3:9092"}, ["k1:9092", "k3:9092"]),
        ({"url": "kafka://k1:9092/"}, ["k1:9092"]),
        ({"brokers": "k2:9092"}, ["k2:9092"]),
        ({"url": "", "brokers": ["k2:9092"]}, ["k2:9092"]),
        ({"url": "k1:9092", "brokers": ""}, ["k1:9092"]),  # `brokers=` left empty: none given
    ],
)
def test_brokers_given_in_one_place_are_taken(entry: dict[str, object], brokers: list[str]) -> None:
    assert KafkaOptions.model_validate(entry).brokers == brokers


def test_check_refuses_both_without_naming_the_ignored_address() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eventrouter.cli",
            "check",
            "--offline",
            "--sink=kafka:k1:9092?brokers=k2:9092&topic=t",
        ],
        capture_output=True,
        text=True,
        timeout=90,  # a bound for a hang, not a speed
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert BOTH in result.stderr and "valid" not in result.stdout
