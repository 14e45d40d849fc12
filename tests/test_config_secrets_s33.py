"""A sink's options validator whose error quotes the sink's credentials (an SDK client made at
validation quotes what it was given): the configuration error masks them, at start and in the log of
a reload, whichever way the validator fails (item 273, session 33)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from eventrouter.config import ConfigError, spec_for_class
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.reload import SinkReloader, watched_state
from eventrouter.metrics import Metrics
from eventrouter.sink import SinkContext

TOKEN = "s3cr3t-t0ken-XYZ"
ROTATED = "r0tated-t0ken-QRS"
PASSWORD = "pa55-w0rd-in-the-url"

_PLUGIN = '''
from pydantic import ValidationInfo, field_validator

from eventrouter.options import Secret, SinkOptions
from eventrouter.sink import Sink


class Boom(BaseException):
    """A library's own BaseException subclass."""


class LeakOptions(SinkOptions):
    token: Secret | None = None
    api_key: str = ""
    kind: str = "Boom"
    region: str = ""

    @field_validator("region")
    @classmethod
    def _region(cls, value, info: ValidationInfo):
        token = info.data.get("token")
        quoted = token.get_secret_value() if token else info.data.get("api_key") or info.data.get("url")
        if quoted == "r0tated-t0ken-QRS" or info.data.get("kind") != "fine":
            # An SDK's client made at validation, whose error quotes what it was given.
            kinds = {"Boom": Boom, "TypeError": TypeError, "ValueError": ValueError, "fine": ValueError}
            raise kinds[info.data.get("kind", "Boom")](f"region {value!r} refused for credentials {quoted}")
        return value


class LeakInValidator(Sink[LeakOptions]):
    options_model = LeakOptions

    async def send(self, batch):
        return None
'''


def _plugin() -> Any:
    module = types.ModuleType("s33leak")
    exec(compile(_PLUGIN, "s33leak.py", "exec", dont_inherit=True), module.__dict__)
    return module.LeakInValidator


_SAID = {
    "Boom": "option 'region': cannot be validated (Boom: region 'eu' refused for credentials ****)",
    # A TypeError fails the option validated alone too (no token then): the whole model is named.
    "TypeError": "option '(options)': cannot be validated (TypeError: region 'eu' refused for credentials ****)",
    "ValueError": "option 'region': Value error, region 'eu' refused for credentials ****",
}


@pytest.mark.parametrize("kind", list(_SAID))
@pytest.mark.parametrize("given", ["literal", "env", "file"])
def test_a_validators_error_quoting_the_token_is_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, given: str
) -> None:
    """Before, the token was in the error (stderr, the pod's log): through item 260's "cannot be
    validated (…)" for a BaseException or TypeError, through pydantic's "Value error, …" for a
    ValueError; also when given as env:NAME or file:/path, read at validation."""
    monkeypatch.setenv("S33_LEAK_TOKEN", TOKEN)
    (tmp_path / "token").write_text(TOKEN + "\n")
    token = {"literal": TOKEN, "env": "env:S33_LEAK_TOKEN", "file": f"file:{tmp_path / 'token'}"}[given]
    with pytest.raises(ConfigError) as refused:
        spec_for_class(_plugin(), {"token": token, "region": "eu", "kind": kind}, type_="leak", where="here")
    assert str(refused.value) == f"here (sink 'leak'): {_SAID[kind]}"


def test_a_credential_named_option_and_the_urls_password_are_masked() -> None:
    """Plain text under a credential's name (a plugin's ``api_key: str``) and the url's user info, as
    ``SinkSpec.build`` masks them in a constructor's error (the user name too, as there)."""
    with pytest.raises(ConfigError) as refused:
        spec_for_class(_plugin(), {"api_key": TOKEN, "region": "eu", "kind": "ValueError"}, type_="leak")
    assert TOKEN not in str(refused.value) and "refused for credentials ****" in str(refused.value)
    url = f"https://user:{PASSWORD}@sdk.example.com/v1"
    with pytest.raises(ConfigError) as refused:
        spec_for_class(_plugin(), {"url": url, "region": "eu", "kind": "Boom"}, type_="leak")
    assert PASSWORD not in str(refused.value)
    assert "refused for credentials https://****:****@sdk.example.com/v1" in str(refused.value)


def test_a_short_token_is_masked_where_it_stands_alone_only() -> None:
    """A token of 1-3 characters masked wherever its letters stood garbled the rest of the text."""
    with pytest.raises(ConfigError) as refused:
        spec_for_class(
            _plugin(), {"token": "eu", "region": "europe-west", "kind": "ValueError"}, type_="leak"
        )
    assert str(refused.value).endswith("Value error, region 'europe-west' refused for credentials ****")


def _install(tmp_path: Path) -> dict[str, str]:
    """The plugin as a distribution on a path entry, found by importlib.metadata as an installed one is."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "s33leak.py").write_text(textwrap.dedent(_PLUGIN))
    info = folder / "s33leak-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: s33leak\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[eventrouter.sinks]\nleak = s33leak:LeakInValidator\n")
    return {"PYTHONPATH": str(folder), "S33_LEAK_TOKEN": TOKEN}


@pytest.mark.parametrize("kind", list(_SAID))
@pytest.mark.parametrize("command", ["check --offline", "run --demo --metrics-addr=127.0.0.1:0"])
def test_check_and_run_exit_2_without_the_token(tmp_path: Path, kind: str, command: str) -> None:
    """The reviewer's reproduction: the token was on stderr, whole, from both commands."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eventrouter.cli",
            *command.split(),
            f"--sink=leak:?token={TOKEN}&region=eu&kind={kind}",
        ],
        capture_output=True,
        text=True,
        timeout=90,  # a bound for a hang, not a speed
        env={**os.environ, **_install(tmp_path)},
    )
    assert result.returncode == 2, result.stderr
    assert f"--sink #1 (sink 'leak'): {_SAID[kind]}" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


def test_a_reload_refusing_the_rotated_token_logs_it_masked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At a reload the same validation (``SinkSpec.reread``) logged the freshly rotated token."""
    token = tmp_path / "token"
    token.write_text(TOKEN)
    spec = spec_for_class(
        _plugin(), {"token": f"file:{token}", "region": "eu", "kind": "fine"}, type_="leak", where="--sink #1"
    )
    read = watched_state(spec)
    metrics = Metrics()
    context = SinkContext(name=spec.name, cluster="t", data_dir=None, logger=logging.getLogger(spec.name))
    pipeline = Pipeline(
        name=spec.name,
        sink=spec.build(context),
        options=spec.pipeline,
        predicate=compile_filter(spec.filter),
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(None, sink=spec.name),
        metrics=metrics,
    )
    token.write_text(ROTATED)  # rotated since the options were read: the first check applies it
    reloader = SinkReloader(spec, pipeline, metrics, read)
    assert not reloader.check()  # refused: it goes on with the options it had
    invalid = metrics.registry.get_sample_value(
        "eventrouter_sink_reloads_total", {"sink": "leak", "result": "invalid"}
    )
    assert invalid == 1
    assert ROTATED not in caplog.text
    assert "option 'region': Value error, region 'eu' refused for credentials ****" in caplog.text, (
        caplog.text
    )
