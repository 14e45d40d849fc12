"""What an operator writes, taken as meant or refused naming the option (item 270, session 33's
reviews of the configuration and of the docs): a url ending in white space, a percent-escape that is
no UTF-8, an option under its name and its alias, a file sink's path shown as ``***``, an empty or
``${VAR}`` credential, a ``type=`` in a YAML url, a sink name too long for a file name, a POSIX class
in a message regex, a regexp or glob in ``types``, and a plugin option named ``type``. Through the
real command line (``python -m eventrouter.cli``, as tests/test_cli.py) and a webhook receiver."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import Field

from eventrouter import Sink, SinkOptions
from eventrouter.config import ConfigError, build_specs, spec_for_class
from eventrouter.engine.checkpoint import FileCheckpoint
from eventrouter.sink import SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter_sinks.elasticsearch import ElasticsearchOptions
from eventrouter_sinks.loki import LokiOptions
from eventrouter_sinks.webhook import WebhookOptions

MAX_NAME_CHARS = 200  # eventrouter.options.MAX_NAME_CHARS

SECRET = "Zq9SecretPw77"
"""A credential's value: it must appear in no output."""


def _eventrouter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _refused(*args: str, env: dict[str, str] | None = None) -> str:
    """The output of an `eventrouter check --offline` that must exit 2 without a traceback."""
    result = _eventrouter("check", "--offline", *args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "FutureWarning" not in result.stderr, result.stderr
    return result.stdout + result.stderr


def _valid(*args: str) -> str:
    result = _eventrouter("check", "--offline", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return f"--config={path}"


# ---- config.md F1: a url ending in white space ------------------------------------------------------


@pytest.mark.parametrize(
    "flag",
    ["webhook:http://h.example/hook ", "webhook:http://h.example/hook\t", "loki:http://loki:3100 "],
    ids=["webhook-space", "webhook-tab", "loki-space"],
)
def test_a_url_ending_in_white_space_exits_2_naming_url(flag: str) -> None:
    """Validated stripped, it was used as given: the webhook posted every batch to `/hook%20` (a real
    endpoint's 404), Loki's constructor failed quoting the parser ("'3100 '")."""
    out = _refused(f"--sink={flag}")
    assert "option 'url': Value error, url 'http://" in out and "ends in white space" in out, out


def test_a_robots_quoted_yaml_url_ending_in_a_space_exits_2_naming_url(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        """
        sinks:
          - type: dingtalk
            url: "https://oapi.dingtalk.com/robot/send "
            access_token: env:DT_TOKEN
        """,
    )
    result = _eventrouter("check", "--offline", config, env={"DT_TOKEN": SECRET})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "sinks[0] (sink 'dingtalk'): option 'url'" in result.stderr
    assert "ends in white space" in result.stderr


async def test_a_url_with_a_space_before_it_reaches_the_path_configured() -> None:
    """A leading space every parser drops (`--sink='webhook: http://…'`): validated and used alike."""
    async with WebhookReceiver() as hook:
        (spec,) = build_specs([f"webhook: {hook.url}"])  # http://127.0.0.1:PORT/hook
        sink = spec.build(
            SinkContext(name="webhook", cluster="", data_dir=None, logger=logging.getLogger("t"))
        )
        await sink.start()
        await sink.send([make_occurrence()])
        await sink.aclose()
        assert [r.path for r in hook.requests if r.method == "POST"] == ["/hook"]


# ---- config.md F2: a percent-escape that is no UTF-8 ------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "option"),
    [
        ("loki:http://loki:3100?username=u&password=9f%E2kqZq9", "password"),
        ("webhook:http://h.example/x?bearer_token=Zq9%E2kq", "bearer_token"),
        ("webhook:http://h.example/x?headers=X-Key:Zq9%E2kq", "headers"),
        ("stdout:?message=exit%E2code", "message"),
    ],
    ids=["loki-password", "webhook-bearer", "header", "regex"],
)
def test_an_invalid_percent_escape_in_a_query_value_is_refused_naming_the_option_never_the_value(
    flag: str, option: str
) -> None:
    """Decoded with U+FFFD in its place: a password never the one meant, every push 401."""
    out = _refused(f"--sink={flag}")
    assert f"option {option!r}: its value holds a percent-escape that decodes to no UTF-8 text" in out, out
    assert "%25" in out and "Zq9" not in out and "kq" not in out


def test_an_escape_of_utf8_text_is_taken_as_before() -> None:
    (spec,) = build_specs(["loki:http://loki:3100?username=u&password=p%C3%A4ss%25"])
    assert isinstance(spec.options, LokiOptions) and spec.options.password is not None
    assert spec.options.password.get_secret_value() == "päss%"


def test_an_invalid_escape_in_a_yaml_urls_query_is_refused_naming_the_entry(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        """
        sinks:
          - type: webhook
            name: alerts
            url: https://h.example/x?bearer_token=Zq9%E2kq
        """,
    )
    out = _refused(config)
    assert "sinks[0] (sink 'alerts'): option 'bearer_token': its value holds a percent-escape" in out
    assert "Zq9" not in out


# ---- config.md F3: one option under two of its names -----------------------------------------------


@pytest.mark.parametrize(
    ("flag", "names"),
    [
        ("webhook:http://h.example/x?header=X-Team=a&headers=X-Env=b", "'header' and 'headers'"),
        ("stdout:?components=kubelet&component=kube-scheduler", "'component' and 'components'"),
        ("stdout:?batch_size=3&batch_max_events=4", "'batch_max_events' and 'batch_size'"),
        ("stdout:?message=a&message_regex=b", "'message' and 'message_regex'"),
        ("loki:http://loki:3100?user=a&username=b", "'user' and 'username'"),
    ],
)
def test_an_option_and_its_alias_together_are_named_as_one_option(flag: str, names: str) -> None:
    """Before: "option 'header': unknown option", of a name `eventrouter sinks` documents."""
    out = _refused(f"--sink={flag}")
    assert f"options {names} are the same option given twice: use one name" in out, out
    assert "unknown option" not in out


def test_an_option_and_its_alias_in_yaml_are_named_as_one_option(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        """
        sinks:
          - type: webhook
            url: https://h.example/x
            header: [X-Team=a]
            headers: {X-Env: b}
        """,
    )
    assert "options 'header' and 'headers' are the same option given twice" in _refused(config)


# ---- config.md F4: a file sink's path -------------------------------------------------------------


def test_check_shows_the_file_path_whole(tmp_path: Path) -> None:
    """A folder or file name of 16+ characters was taken for a URL token: README's own quick start
    logged `…/***/events.jsonl`. A path holds no credential; a URL's token-like segment still hides."""
    path = tmp_path / "eventrouter-archive" / "k8s-events-production.jsonl"
    assert _valid(f"--sink=file:{path}") == f"valid file (file {path})\n"
    slack = "https://hooks.slack.com/services/T0/B0/XXXXXXXXXXXXXXXXXXXXXXXX"
    assert (
        _valid(f"--sink=webhook:{slack}")
        == "valid webhook (webhook https://hooks.slack.com/services/T0/B0/***)\n"
    )


# ---- config.md F6: an empty literal credential -----------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "option"),
    [
        ("loki:http://loki:3100?bearer_token=", "bearer_token"),
        ("webhook:http://h.example/x?bearer_token=", "bearer_token"),
        ("webhook:http://h.example/x?bearer_token=%20%20", "bearer_token"),
        ("webhook:http://h.example/x?secret=", "secret"),
        ("dingtalk:https://oapi.dingtalk.com/robot/send?access_token=t&secret=", "secret"),
        ("elasticsearch:http://es:9200?api_key=", "api_key"),
        ("loki:http://loki:3100?username=u&password=", "password"),
    ],
)
def test_an_empty_literal_credential_is_refused_like_an_empty_env_one(flag: str, option: str) -> None:
    """Loki sent `Bearer ` (401, retried for ever), DingTalk signed with an empty key (310000 sign
    not match for every alert): item 199 refused only the empty env:/file: route to them."""
    out = _refused(f"--sink={flag}")
    assert (
        f"option {option!r}: Value error, empty (or only white space): a credential is never empty" in out
    ), out
    if option == "password":
        assert "leave it out for a user without a password" in out


def test_an_empty_yaml_credential_is_refused_and_an_empty_header_is_not(tmp_path: Path) -> None:
    """`secret: ""`: a Helm value left blank, the case of item 199 (5). A header may be empty."""
    config = _yaml(
        tmp_path,
        """
        sinks:
          - type: loki
            url: http://loki:3100
            bearer_token: ""
        """,
    )
    assert "sinks[0] (sink 'loki'): option 'bearer_token': Value error, empty" in _refused(config)
    (spec,) = build_specs(["webhook:http://h.example/x?headers=X-Empty:"])
    assert isinstance(spec.options, WebhookOptions)
    assert spec.options.headers["X-Empty"].get_secret_value() == ""


# ---- docsrev F6: a `${VAR}` left in a credential ---------------------------------------------------


def test_a_kee_variable_left_in_a_credential_or_header_is_refused_with_the_env_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kubernetes-event-exporter expands `${VAR}` in its whole config: copied over as written, the
    text `${ES_PASSWORD}` was the password (401 for ever), `${ALERTS_KEY}` the header sent."""
    config = _yaml(
        tmp_path,
        """
        sinks:
          - type: elasticsearch
            url: http://elasticsearch:9200
            username: elastic
            password: ${ES_PASSWORD}
          - type: webhook
            url: https://alerts.example/k8s
            headers:
              X-API-KEY: ${ALERTS_KEY}
        """,
    )
    out = _refused(config)
    assert "sinks[0] (sink 'elasticsearch'): option 'password': Value error, holds a ${…} reference" in out
    assert "write env:NAME" in out and "ES_PASSWORD" not in out  # no part of the value shown
    config = _yaml(
        tmp_path,
        """
        sinks:
          - type: webhook
            url: https://alerts.example/k8s
            headers:
              X-API-KEY: ${ALERTS_KEY}
        """,
    )
    out = _refused(config)
    assert (
        "option 'headers.X-API-KEY': Value error, holds a ${…} reference" in out and "ALERTS_KEY" not in out
    )
    # A password that really holds "${…}" is refused, and no part of it is shown (a review of item 270).
    out = _refused("--sink=loki:http://l:3100?username=u&password=p${x}q")
    assert "holds a ${…} reference" in out and "${x}" not in out and "env:x" not in out, out
    for flag, option in (
        ("webhook:https://h.example/x?bearer_token=${TOKEN}", "bearer_token"),
        ("kafka:?brokers=k:9092&topic=t&user=u&password=${KAFKA_PW}", "password"),
    ):
        out = _refused(f"--sink={flag}")
        assert (
            f"option {option!r}: Value error, holds a ${{…}} reference" in out
            and "is not expanded here" in out
        ), out
    monkeypatch.setenv("S33_ES_PASSWORD", SECRET)
    (spec,) = build_specs(["elasticsearch:http://es:9200?username=elastic&password=env:S33_ES_PASSWORD"])
    assert isinstance(spec.options, ElasticsearchOptions) and spec.options.password is not None
    assert spec.options.password.get_secret_value() == SECRET


# ---- config.md F8: `type=` in a YAML url's query ---------------------------------------------------


def test_type_in_a_yaml_urls_query_names_the_file_and_entry(tmp_path: Path) -> None:
    config = _yaml(
        tmp_path,
        """
        sinks:
          - type: webhook
            name: alerts
            url: https://hooks.example.com/k8s?type=kubernetes
        """,
    )
    out = _refused(config)
    assert "config.yaml sinks[0] (sink 'alerts'): option 'type' is not allowed in a YAML url's query" in out
    assert "--sink" not in out and "first ':'" not in out
    out = _refused("--sink=webhook:https://hooks.example.com/k8s?type=kubernetes")
    assert "--sink #1 (sink 'webhook'): option 'type' is not allowed in the query" in out


# ---- config.md F9: a sink name too long for a file name ---------------------------------------------


def test_a_sink_name_too_long_for_a_file_name_exits_2(tmp_path: Path) -> None:
    """It passed `check` and ended `run` with a traceback: `File name too long` at its checkpoint."""
    out = _refused(f"--sink=stdout:?name={'a' * (MAX_NAME_CHARS + 1)}")
    assert (
        f"option 'name': Value error, a name of {MAX_NAME_CHARS + 1} characters; at most {MAX_NAME_CHARS}"
        in out
    )
    name = "b" * MAX_NAME_CHARS
    assert _valid(f"--sink=stdout:?name={name}") == f"valid {name} (stdout)\n"
    # The longest name allowed makes every data-dir file name its checkpoint writes.
    checkpoint = FileCheckpoint(tmp_path / "checkpoints", name)
    checkpoint.record({"uid-1": 1})
    checkpoint.compact({"uid-1": 1})
    assert checkpoint.load() == {"uid-1": 1}


# ---- config.md F10: a POSIX class in a message regex --------------------------------------------------


@pytest.mark.parametrize(
    ("option", "regex", "said"),
    [
        ("message", "exit code [[:digit:]]", "holds a POSIX class such as [[:digit:]]"),
        ("exclude_message", "[[:space:]]probe", "holds a POSIX class such as [[:digit:]]"),
        ("message", "[[a-z]", "Possible nested set"),
    ],
)
def test_a_posix_class_in_a_message_regex_is_refused_naming_the_option(
    tmp_path: Path, option: str, regex: str, said: str
) -> None:
    """Python read `[[:digit:]]` as the set `[[:digt]` then `]`: "exit code 1" was not kept, "exit
    code d]" was; stderr showed Python's FutureWarning with a source path, naming no sink."""
    config = _yaml(tmp_path, f"sinks:\n  - type: stdout\n    {option}: {json.dumps(regex)}\n")
    out = _refused(config)
    assert f"sinks[0] (sink 'stdout'): option {option!r}: Value error," in out and said in out, out
    assert "FutureWarning" not in out
    if "POSIX" in said:
        assert "\\d" in out


@pytest.mark.parametrize("regex", ["exit code [0-9]", "\\[:alpha:]"], ids=["no_class", "escaped"])
def test_a_regex_without_a_posix_class_is_valid(tmp_path: Path, regex: str) -> None:
    """`\\[:alpha:]` matches the text "[:alpha:]": its `[` is escaped, no class (a review of item 270)."""
    config = _yaml(tmp_path, f"sinks:\n  - type: stdout\n    message: {json.dumps(regex)}\n")
    assert "valid stdout" in _valid(config)


# ---- docsrev F7: a regexp or glob in types --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "advice"),
    [
        ("Warning|Normal", "types=Normal,Warning"),
        ("^Warning$", "types=Warning"),
        ("W.*", "types=Warning"),
        ("Warn*", "types=Warning"),
        ("Norm?l", "types=Normal"),
        ("[WN]*", "types=Warning or types=Normal"),
    ],
)
def test_a_regexp_or_glob_in_types_exits_2_naming_the_option(tmp_path: Path, value: str, advice: str) -> None:
    """Accepted with a warning, the sink then received nothing (every occurrence counted filtered);
    docs/migration.md promised exit 2 for regular-expression syntax in a filter value."""
    config = _yaml(
        tmp_path,
        f"sinks:\n  - type: webhook\n    url: https://h.example/x\n    types: [{json.dumps(value)}]\n",
    )
    out = _refused(config)
    assert f"option 'types': Value error, {value!r} reads as a regular expression or a glob" in out, out
    assert f"write {advice} " in out


def test_a_custom_type_is_still_valid_with_a_warning() -> None:
    result = _eventrouter("check", "--offline", "--sink=stdout:?types=Error")
    assert result.returncode == 0, result.stderr
    assert "option 'types': Error is neither Normal nor Warning" in result.stderr


# ---- docsrev F5: a plugin option named `type` --------------------------------------------------------

_TYPEPLUG = """
from pydantic import Field

from eventrouter import Sink, SinkOptions


class TypedOptions(SinkOptions):
    type: str = Field("json", description="output type")


class Typed(Sink[TypedOptions]):
    options_model = TypedOptions

    async def send(self, batch):
        return None
"""


def test_a_plugin_option_named_type_is_refused_at_load(tmp_path: Path) -> None:
    """Accepted before, it could never be set: a YAML `type:` is the sink's type, a query's `type=`
    is refused. `eventrouter sinks` listed it as an option."""
    (tmp_path / "typeplug.py").write_text(_TYPEPLUG)
    info = tmp_path / "typeplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: typeplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[eventrouter.sinks]\ntyped = typeplug:Typed\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    listing = _eventrouter("sinks", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "typed  [broken]" in listing.stdout and "defines reserved option names ['type']" in listing.stdout
    out = _refused("--sink=typed:", env=env)
    assert "defines reserved option names ['type']" in out


def test_an_options_model_with_a_type_field_is_refused_by_spec_for_class() -> None:
    class Options(SinkOptions):
        type: str = Field("json")

    class Typed(Sink[Options]):
        options_model = Options

        async def send(self, batch: object) -> None:
            return None

    with pytest.raises(ConfigError, match=r"defines reserved option names \['type'\]"):
        spec_for_class(Typed, {"url": "x"}, type_="typed")
