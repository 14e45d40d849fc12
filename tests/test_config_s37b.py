"""Item 339 (session 37, fix-secrets F6): a sink's name that is not a plain name is refused at config
time. Items 322–331 hid a credential-shaped name in the router's refusals, but a valid sink named
``password=Zq9S3cretPw`` or ``token:Zq9S3cretPw`` started, and its name was then printed whole in the
logger's name on every line of the sink, in the engine's and replay's log lines, as the ``sink`` label
of every metric and in its data-dir file names. The chart refused such a name (item 323); the router
did not. Now the router's rule is the chart's: a name holding ``:``, ``=``, ``@``, ``/`` or a control
character, or longer than 200 characters, is refused, the refusal naming the position and the rule,
never the name; every other name (``es prod``, ``a+b``) is taken."""

from __future__ import annotations

import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml

from eventrouter.cli import main

SECRET = "Zq9S3cretPw"

REFUSED = {
    "password=": f"password={SECRET}",
    "token:": f"token:{SECRET}",
    "user@host": "user@host",
    "slash": "logs/prod",
    "control character": "es\tprod",
    "300 characters": "ab-" * 100,
}
"""Names refused, each never printed: a credential typed name=value or name:value, a URL's user info,
a path, a control character, and a name too long (of name characters, so the credential rule showed it
whole)."""

FAULT = {
    "password=": "its name (not shown) holds a '='",
    "token:": "its name (not shown) holds a ':'",
    "user@host": "its name (not shown) holds a '@'",
    "slash": "its name (not shown) holds a '/'",
    "control character": "its name (not shown) holds a control character",
    "300 characters": "a name of 300 characters; at most 200 (not shown)",
}

RULE = "a sink's name holds no ':', '=', '@', '/' or control character and is at most 200 characters"

ORDINARY = ["loki", "loki-prod", "kafka_2", "es.eu-1", "es prod", "a+b", "_x", "é-1", "ab-" * 66 + "ab"]
"""Names the chart renders and the router takes: a space, a '+', a leading '_', non-ASCII, 200
characters."""


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["check", "--offline", *args])
    said = capsys.readouterr()
    return code, said.out + said.err


def _flag(name: str) -> str:
    return f"--sink=stdout:?name={urllib.parse.quote(name, safe='')}"


def _config(tmp_path: Path, sink: dict[str, str]) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"sinks": [sink]}), encoding="utf-8")
    return path


def _forms(tmp_path: Path, name: str) -> dict[str, tuple[list[str], str]]:
    """The ways a sink is named, each as (arguments, the position its refusal names): a flag's name=,
    a config file's name: and a name= in a config url's query."""
    for folder in ("named", "in_url"):
        (tmp_path / folder).mkdir()
    named = _config(tmp_path / "named", {"type": "stdout", "name": name})
    in_url = _config(
        tmp_path / "in_url",
        {"type": "webhook", "url": f"http://127.0.0.1:9/hook?name={urllib.parse.quote(name, safe='')}"},
    )
    return {
        "flag": ([_flag(name)], "--sink #1"),
        "yaml name": ([f"--config={named}"], f"{named} sinks[0]"),
        "yaml url name=": ([f"--config={in_url}"], f"{in_url} sinks[0]"),
    }


@pytest.mark.parametrize("form", ["flag", "yaml name", "yaml url name="])
@pytest.mark.parametrize("shape", REFUSED)
def test_check_refuses_a_sink_name_that_is_no_plain_name_without_printing_it(
    shape: str, form: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``check --offline`` took each (``valid token:… (stdout)``) but the 300-character one, which its
    refusal printed whole; now exit 2 naming the position, the fault and the rule."""
    name = REFUSED[shape]
    args, where = _forms(tmp_path, name)[form]
    code, said = _check(capsys, *args)
    assert code == 2, said
    assert name not in said and SECRET not in said and name[:12] not in said, said
    assert f"{where}: option 'name': Value error, {FAULT[shape]}" in said, said
    assert RULE in said, said
    assert "Traceback" not in said, said


@pytest.mark.parametrize("shape", REFUSED)
def test_run_refuses_a_sink_name_that_is_no_plain_name_and_does_not_start(shape: str) -> None:
    """``run`` started with such a name (``sink token:… (stdout) configured``) and printed it whole
    in the logger's name of every sink line and its metric labels. Now it exits 2 before starting. (On
    the code before, the demo router runs until the timeout ends it.)"""
    name = REFUSED[shape]
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "eventrouter.cli",
                "run",
                "--demo",
                "--metrics-addr",
                "127.0.0.1:0",
                _flag(name),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the router started with the sink name {shape!r}: {exc.stderr!r}")
    said = result.stdout + result.stderr
    assert result.returncode == 2, said
    assert name not in said and SECRET not in said and name[:12] not in said, said
    assert f"--sink #1: option 'name': Value error, {FAULT[shape]}" in said, said
    assert RULE in said and "configured" not in said and "Traceback" not in said, said


@pytest.mark.parametrize("name", ORDINARY)
def test_ordinary_sink_names_are_taken(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The names the docs, the chart and the tests use (a dash, an underscore, a dot, digits) and others
    the chart renders: the rule refuses only the marks of a credential, a path and control characters."""
    for form, (args, _) in _forms(tmp_path, name).items():
        code, said = _check(capsys, *args)
        assert code == 0, (form, said)
        sink_type = "webhook" if form == "yaml url name=" else "stdout"
        assert said.startswith(f"valid {name} ({sink_type}"), (form, said)
