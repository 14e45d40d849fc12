"""The command line: sinks, check, replay, configuration errors (exit 2), secrets redacted."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eventrouter.cli import main
from eventrouter.config import QUERY_KEYS, ConfigError, build_specs, load_yaml, parse_sink_flag, redact_url

DATA = Path(__file__).resolve().parents[1] / "eventrouter" / "testing" / "data"


def _eventrouter(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventrouter.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_sink_flag_parsing_kube_eventer_style() -> None:
    entry = parse_sink_flag("loki:http://loki:3100/x?level=Warning&namespaces=a,b&header=A:1&header=B:2")
    entry.pop(QUERY_KEYS)
    assert entry == {
        "type": "loki",
        "url": "http://loki:3100/x",
        "level": "Warning",
        "namespaces": "a,b",
        "header": ["A:1", "B:2"],
    }
    assert parse_sink_flag("kafka:?brokers=k:9092")["brokers"] == "k:9092"


def test_specs_split_filter_pipeline_and_sink_options(tmp_path: Path) -> None:
    (spec,) = build_specs(
        [f"file:{tmp_path / 'e.jsonl'}?level=Warning&namespaces=a,b&batch_size=7&max_files=3&name=f1"]
    )
    assert spec.name == "f1" and spec.type == "file"
    assert spec.filter.level == "Warning" and spec.filter.namespaces == ["a", "b"]
    assert spec.pipeline.batch_max_events == 7
    assert spec.options.max_files == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("file:/tmp/x?bogus=1", "(sink 'file'): option 'bogus': unknown option"),
        (
            "file:/tmp/x?batch_size=zero",
            "(sink 'file'): option 'batch_size': Input should be a valid integer",
        ),
        ("file:/tmp/x?level=Critical", "option 'level': Value error, level must be Normal or Warning"),
        ("file:/tmp/x?message=(unclosed", "invalid regular expression"),
        # inf: a batch that never went out, a send that held its sink for ever.
        ("file:/tmp/x?batch_max_wait=inf", "option 'batch_max_wait': Input should be a finite number"),
        ("file:/tmp/x?send_timeout=inf", "option 'send_timeout': Input should be a finite number"),
        ("file:/tmp/x?retry_max_backoff=inf", "option 'retry_max_backoff': Input should be a finite number"),
        ("file:/tmp/x?retry_initial_backoff=nan", "option 'retry_initial_backoff': Input should be a finite"),
        ("nosuch:http://x", "unknown sink type 'nosuch'"),
        ("no-colon", "unknown sink type 'no-colon'"),
        ("bad type:x", "invalid sink type 'bad type'"),
    ],
)
def test_bad_configuration_names_the_sink_and_option(flag: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_specs([flag])
    assert expected in str(info.value)


# A malformed address is a configuration error (exit 2) naming the sink and the option, never a sink
# that "cannot start" again and again; the message shows no credentials of the URL.
@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (
            "webhook:http://u:pw-SECRET@127.0.0.1:99999/h?token=q-SECRET",
            "option 'url': Value error, url 'http://127.0.0.1:99999/…': Port out of range",
        ),
        (
            "webhook:ftp://h/x",
            "option 'url': Value error, url must be http(s)://host[:port][/path], not 'ftp://h/…'",
        ),
        ("webhook:", "url is required"),
        ("file:", "the file sink needs a path"),
        (
            "webhook:http://h/x?healthcheck_url=http://[::1",
            "option 'healthcheck_url': Value error, healthcheck_url 'http://[::1': Invalid IPv6 URL",
        ),
        (
            "loki:http://u:pw-SECRET@loki:port",
            "option 'url': Value error, url 'http://loki:port': Port could not be cast",
        ),
        ("loki:loki:3100", "option 'url': Value error, url must be http(s)://"),
        (
            "dingtalk:http://:80/robot/send?access_token=t-SECRET",
            "(sink 'dingtalk'): option 'url': Value error, url must be",
        ),
        (
            "wecom:https://qyapi:70000/cgi-bin/webhook/send?key=k-SECRET",
            "(sink 'wecom'): option 'url': Value error, url 'https://qyapi:70000/…'",
        ),
        (
            "elasticsearch:http://es:9200,ftp://x",
            "(sink 'elasticsearch'): option '(options)': Value error, node must be http(s)://",
        ),
        (
            "elasticsearch:http://es?hosts=es2:99999",
            "Value error, node 'http://es2:99999': Port out of range",
        ),
        (
            "kafka:?brokers=k0:9092,k1:port&topic=t",
            "(sink 'kafka'): option 'brokers': Value error, broker 'k1:port' must be host or host:port",
        ),
        ("kafka:?brokers=kafka://k0:9092&topic=t", "broker 'kafka://k0:9092' must be host or host:port"),
    ],
)
def test_malformed_addresses_are_configuration_errors(flag: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_specs([flag])
    assert expected in str(info.value)
    assert "SECRET" not in str(info.value)


def test_addresses_without_a_port_get_the_usual_one() -> None:
    (es,) = build_specs(
        ["elasticsearch:es-master,http://es-a,https://es.example.com/prefix?hosts=[::1]:9201"]
    )
    assert es.options.node_urls() == [  # type: ignore[attr-defined]
        "http://es-master:9200",
        "http://es-a:80",
        "https://es.example.com:443/prefix",
        "http://[::1]:9201",
    ]
    (kafka,) = build_specs(["kafka:?brokers=kafka,[::1]:9093&topic=t"])
    assert kafka.options.brokers == ["kafka", "[::1]:9093"]  # type: ignore[attr-defined]


def test_a_config_or_secret_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\xff\xfesinks: []\n")
    result = _eventrouter("check", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"config file {str(config)!r} is not UTF-8 text (byte 0)" in result.stderr
    assert "Traceback" not in result.stderr
    secret = tmp_path / "secret"
    secret.write_bytes(b"\x80binary")
    with pytest.raises(
        ConfigError, match=f"option 'secret': Value error, secret file '{secret}' is not UTF-8 text"
    ):
        build_specs([f"webhook:http://h/x?secret=file:{secret}"])


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["--metrics-addr", "127.0.0.1:99999"],
            {},
            "argument --metrics-addr: '127.0.0.1:99999' is not host:port",
        ),
        (["--metrics-addr", "8080"], {}, "argument --metrics-addr: '8080' is not host:port"),
        (["--metrics-addr", "::1:8080"], {}, "an IPv6 address goes in brackets"),
        (["--log-level", "loud"], {}, "argument --log-level: invalid choice: 'loud'"),
        ([], {"EVENTROUTER_LOG_LEVEL": "LOUD"}, "log level 'loud': use one of debug, info"),
        ([], {"EVENTROUTER_LOG_FORMAT": "jsn"}, "log format 'jsn': use one of text, json"),
        # nan made a SIGTERM drain wait for ever; inf raised OverflowError (a traceback, exit 1).
        (["--shutdown-timeout", "nan"], {}, "argument --shutdown-timeout: 'nan': expected a finite number"),
        (["--shutdown-timeout", "-5"], {}, "argument --shutdown-timeout: '-5': expected a finite number"),
        (["--data-dir-max-bytes", "inf"], {}, "argument --data-dir-max-bytes: 'inf': expected bytes"),
        (["--stall-timeout", "0"], {}, "argument --stall-timeout: '0': must be more than 0"),
        (["--checkpoint-flush-interval", "0"], {}, "argument --checkpoint-flush-interval: '0': must be more"),
        # leaseDurationSeconds is an int32: the API server refused every write of 1e10, nobody led.
        (
            ["--leader-elect", "--leader-elect-lease-duration", "1e10"],
            {},
            "argument --leader-elect-lease-duration: '1e10': at most 2147483647 seconds",
        ),
        # As client-go: renewDeadline > 1.2 x retryPeriod (a retry's jitter), checked before starting.
        (
            ["--leader-elect", "--leader-elect-renew-deadline", "2.2"],
            {},
            "leader election: --leader-elect-renew-deadline (2.2s) must be longer than 1.2 x the "
            "--leader-elect-retry-period (2s)",
        ),
        (
            ["--leader-elect", "--leader-elect-lease-duration", "10"],
            {},
            "leader election: --leader-elect-renew-deadline (10s) must be shorter than the "
            "--leader-elect-lease-duration (10s)",
        ),
        # The API server trims nothing: every list failed with 400, and the router was never ready.
        (["--field-selector", "type=Warning, reason=BackOff"], {}, "field ' reason' cannot select Events"),
        (["--field-selector", "reason=a=b"], {}, "field selector 'reason=a=b': cannot understand"),
        # Each was watched as one (empty) namespace: ready and healthy, and nothing delivered.
        (
            ["--namespace", "default,kube-system"],
            {},
            "namespace 'default,kube-system' is not a namespace name: lower-case letters, digits and '-', "
            "at most 63 characters (one per --namespace, repeated, or a list under `namespaces:`)",
        ),
        (["--namespace", "Default"], {}, "namespace 'Default' is not a namespace name"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args: list[str], env: dict[str, str], expected: str) -> None:
    result = _eventrouter("run", "--demo", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_address_in_use_exits_2_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        result = _eventrouter("run", "--demo", "--metrics-addr", addr)
    assert result.returncode == 2, result.stderr
    assert f"metrics address {addr}: cannot listen there (Address already in use)" in result.stderr
    assert "Traceback" not in result.stderr


def test_duplicate_sink_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already used"):
        build_specs([f"file:{tmp_path}/a", f"file:{tmp_path}/b"])


def test_sink_names_that_would_share_files_in_the_data_dir_are_refused(tmp_path: Path) -> None:
    # Both would keep their spool, checkpoint and dead letters under "es_prod": one sink's checkpoint
    # would mark the other's occurrences delivered.
    with pytest.raises(
        ConfigError,
        match=r"'es_prod' and 'es prod' \(--sink #1 \(sink 'es prod'\)\) are both stored as 'es_prod'",
    ):
        build_specs([f"file:{tmp_path}/a?name=es prod", f"file:{tmp_path}/b?name=es_prod"])
    for name in (".", ".."):
        with pytest.raises(ConfigError, match=r"option 'name': Value error, '\.+' cannot name a sink"):
            build_specs([f"file:{tmp_path}/a?name={name}"])


def test_a_data_dir_another_process_uses_exits_2_naming_it_and_its_holder(tmp_path: Path) -> None:
    from eventrouter.datalock import DataDirLock

    data = tmp_path / "data"
    data.mkdir()
    held = DataDirLock(data)
    held.acquire()  # this test process is the other router
    try:
        for args in (["run", "--demo", "--metrics-addr", "127.0.0.1:0"], ["replay", "-"]):
            result = _eventrouter(*args, "--data-dir", str(data), "--sink=stdout")
            assert result.returncode == 2, result.stderr
            assert f"data dir {data} is in use by eventrouter pid {os.getpid()} on " in result.stderr
            assert "Traceback" not in result.stderr
    finally:
        held.release()
    # Released (or its process gone, SIGKILL included): the next router takes it.
    result = _eventrouter("replay", "-", "--data-dir", str(data), "--sink=stdout")
    assert result.returncode == 0, result.stderr


def test_bad_config_exits_2_and_never_echoes_secrets(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "sinks:\n  - type: webhook\n    url: http://127.0.0.1:9/h\n    secret: hunter2-very-secret\n    nope: 1\n"
    )
    result = _eventrouter("check", "--config", str(config))
    assert result.returncode == 2
    assert "option 'nope': unknown option" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_a_data_dir_that_cannot_be_written_exits_2_naming_it(tmp_path: Path) -> None:
    """As a volume that was not mounted on a read-only root (tests/image runs that case): here a file
    stands where the data dir should be, since root may write anywhere."""
    (tmp_path / "volume").write_text("not a directory")
    data = tmp_path / "volume" / "eventrouter"
    result = _eventrouter("run", "--demo", "--metrics-addr", "127.0.0.1:0", "--data-dir", str(data))
    assert result.returncode == 2, result.stderr
    assert f"--data-dir {data}: cannot write there (Not a directory)" in result.stderr
    assert "Traceback" not in result.stderr


def test_secrets_from_env_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "s"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("HOOK_SECRET", "from-env")
    (a,) = build_specs(["webhook:http://h/x?secret=env:HOOK_SECRET"])
    (b,) = build_specs([f"webhook:http://h/x?secret=file:{secret_file}"])
    assert a.options.secret.get_secret_value() == "from-env"  # type: ignore[attr-defined]
    assert b.options.secret.get_secret_value() == "from-file"  # type: ignore[attr-defined]
    assert "from-env" not in repr(a.options) and "from-file" not in repr(b.options)
    with pytest.raises(ConfigError, match="environment variable 'MISSING_SECRET_VAR' is not set"):
        build_specs(["webhook:http://h/x?secret=env:MISSING_SECRET_VAR"])


def test_a_yaml_error_names_the_place_but_never_shows_the_line(tmp_path: Path) -> None:
    """PyYAML's message quotes the line, and an unclosed quote is most likely a credential's."""
    config = tmp_path / "config.yaml"
    config.write_text('sinks:\n  - type: loki\n    url: http://loki:3100\n    password: "s3cr3tP@ss\n')
    with pytest.raises(ConfigError) as refused:
        load_yaml(config)
    assert "s3cr3tP@ss" not in str(refused.value)
    assert f"config file {str(config)!r} is not valid YAML at line 5, column 1" in str(refused.value)


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path: Path) -> None:
    """YAML keeps the last of two `sinks:` silently: a whole list of sinks was gone without a word."""
    config = tmp_path / "config.yaml"
    config.write_text("sinks:\n  - type: stdout\ncluster_name: x\nsinks:\n  - type: stdout\n    name: b\n")
    with pytest.raises(
        ConfigError, match="at line 4, column 1: the key 'sinks' is given twice in one mapping"
    ):
        load_yaml(config)


def test_a_yaml_url_query_gives_options_as_a_sink_flag_does(tmp_path: Path) -> None:
    """Its keys were ignored: the tenant, the level filter, a password in the URL."""
    config = tmp_path / "config.yaml"
    config.write_text("sinks:\n  - type: loki\n    url: http://loki:3100?tenant=team-a&level=Warning\n")
    (spec,) = build_specs([], load_yaml(config).sinks)
    assert spec.options.url == "http://loki:3100"
    assert spec.options.tenant == "team-a" and spec.filter.level == "Warning"  # type: ignore[attr-defined]
    config.write_text("sinks:\n  - type: loki\n    url: http://loki:3100?tenant=a\n    tenant: b\n")
    with pytest.raises(ConfigError, match="'tenant' given in the url's query and as options"):
        build_specs([], load_yaml(config).sinks)


def test_a_webhook_query_key_that_looks_like_an_option_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unknown keys stay in a webhook's URL (its own parameters); a misspelt filter was one of them."""
    (spec,) = build_specs(["webhook:http://hook/x?levle=Warning&team=ops"])
    assert spec.options.url == "http://hook/x?levle=Warning&team=ops"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "--sink #1 (sink 'webhook'): query key 'levle' is not an option and stays in the URL (sent to the "
        "endpoint); did you mean 'level'?"
    ]


def test_an_env_reference_on_an_option_that_is_not_a_credential_is_refused() -> None:
    """Only credentials read env: and file:; anywhere else the text was used as it is, so a user
    name or a tenant "env:ES_USER" never matched anything, without a word."""
    for flag, option in (
        ("elasticsearch:http://es:9200?username=env:ES_USER", "username"),
        ("loki:http://loki:3100?tenant=file:/etc/tenant", "tenant"),
    ):
        with pytest.raises(ConfigError, match=f"option '{option}' takes its value as written"):
            build_specs([flag])


def test_urls_are_redacted() -> None:
    assert redact_url("https://u:p@h/robot/send?access_token=abc&level=Warning") == (
        "https://***@h/robot/send?access_token=***&level=***"
    )


def test_the_configured_line_hides_a_secret_in_the_path_or_any_query_value(tmp_path: Path) -> None:
    """Slack/Discord/Teams keep the secret in the path, Azure in `code=` or `sig=`: the start-up
    line ``sink … configured`` and `check` printed them (only names hinting at a secret were hidden)."""
    url = "http://127.0.0.1:9/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX1a?code=AZFUNCSECRET"
    result = _eventrouter("check", f"--sink=webhook:{url}")
    assert "XXXXXXXXXXXXXXXXXXXXXXXX1a" not in result.stdout + result.stderr
    assert "AZFUNCSECRET" not in result.stdout + result.stderr
    assert "http://127.0.0.1:9/services/T00000000/B00000000/***?code=***" in result.stdout + result.stderr


def test_sinks_lists_every_builtin_with_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sinks", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"stdout", "file", "webhook"} <= set(doc["sinks"])
    file_opts = {row["name"] for row in doc["sinks"]["file"]["options"]}
    assert {"max_bytes", "max_files"} <= file_opts
    assert {row["name"] for row in doc["common"]["filter"]} >= {"level", "namespaces", "min_count"}


def test_the_cli_runs_under_python_OO_with_the_same_output() -> None:
    """`python -OO` (PYTHONOPTIMIZE=2) strips docstrings: nothing the CLI prints may come from one."""
    for args in (("--help",), ("run", "--help"), ("sinks",)):
        plain = _eventrouter(*args)
        optimised = _eventrouter(*args, env={"PYTHONOPTIMIZE": "2"})
        assert plain.returncode == optimised.returncode == 0, optimised.stderr
        assert optimised.stdout == plain.stdout


def test_replay_under_python_OO_delivers_every_occurrence(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = _eventrouter(
        "replay", str(DATA / "watch-core-v1.jsonl"), f"--sink=file:{out}", env={"PYTHONOPTIMIZE": "2"}
    )
    assert result.returncode == 0, result.stderr
    assert len({(x["uid"], x["occurrence"]) for x in map(json.loads, out.read_text().splitlines())}) == 126


def test_sinks_into_a_closed_pipe_exits_without_a_traceback() -> None:
    """`eventrouter sinks | head`: the reader is gone before the listing is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "eventrouter.cli", "sinks"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr


def test_check_reports_unreachable_sinks_with_exit_1() -> None:
    result = _eventrouter("check", "--sink=webhook:http://127.0.0.1:9/hook?access_token=tok123")
    assert result.returncode == 1, result.stderr
    assert "FAIL" in result.stdout and "tok123" not in result.stdout + result.stderr


def test_replay_routes_a_recording_to_a_file(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = _eventrouter(
        "replay", str(DATA / "watch-core-v1.jsonl"), f"--sink=file:{out}", "--cluster-name", "rec"
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 126 and len({(x["uid"], x["occurrence"]) for x in lines}) == 126
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["occurrences"] == 126 and summary["sinks"]["file"]["delivered"] == 126


def test_replay_counts_and_names_an_object_of_an_unknown_watch_type(tmp_path: Path) -> None:
    """A recording line typed "Added" (not ADDED): the live watch counts and logs it, the replay
    skipped it without a trace."""
    lines = (DATA / "watch-core-v1.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    odd = dict(first, type="Added")
    odd["object"] = dict(first["object"], metadata=dict(first["object"]["metadata"], uid="odd-uid-1"))
    recording = tmp_path / "rec.jsonl"
    recording.write_text("\n".join([json.dumps(odd), *lines]) + "\n")
    out = tmp_path / "events.jsonl"
    result = _eventrouter("replay", str(recording), f"--sink=file:{out}")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["malformed"] == 1 and summary["occurrences"] == 126
    assert "skipped an object recorded with the unknown watch type 'Added'" in result.stderr


def test_replay_says_that_the_configs_namespaces_are_not_applied(tmp_path: Path) -> None:
    """`replay --config` with the router's own file: its namespaces silently did not apply."""
    config, out = tmp_path / "config.yaml", tmp_path / "events.jsonl"
    config.write_text("namespaces: [kube-system]\nsinks:\n  - type: file\n    url: " + str(out) + "\n")
    result = _eventrouter("replay", str(DATA / "watch-core-v1.jsonl"), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "replay: the configuration's namespaces and field_selector are not applied" in result.stderr
    assert len(out.read_text().splitlines()) == 126


def test_replay_of_more_than_the_memory_queue_holds_waits_for_the_sink_and_drops_nothing(
    tmp_path: Path,
) -> None:
    # The file is read without a pause of its own: the replay must let the sink start and keep up.
    out = tmp_path / "events.jsonl"
    result = _eventrouter(
        "replay", str(DATA / "watch-core-v1.jsonl"), f"--sink=file:{out}?queue_max_events=20"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["sinks"]["file"] == {
        "delivered": 126,
        "filtered": 0,
        "skipped": 0,
        "dead_lettered": 0,
        "dropped": 0,
    }
    assert len(out.read_text().splitlines()) == 126


def test_replay_repairs_broken_unicode_and_delivers_the_event(tmp_path: Path) -> None:
    # A kubectl List that orjson refuses (one item with invalid UTF-8, one with a lone surrogate
    # escape), and the same two items as JSON lines: nothing is skipped, each broken char is U+FFFD.
    doc = json.loads((DATA / "list-core-v1.json").read_text())
    doc["items"][0]["message"], doc["items"][1]["message"] = "MARK0", "MARK1"
    uids = [doc["items"][0]["metadata"]["uid"], doc["items"][1]["metadata"]["uid"]]

    def broken(text: str) -> bytes:
        return text.encode().replace(b'"MARK0"', b'"caf\xe9"').replace(b'"MARK1"', b'"a \\ud800"')

    listing, lines = tmp_path / "list.json", tmp_path / "lines.jsonl"
    listing.write_bytes(broken(json.dumps(doc, indent=2)))
    lines.write_bytes(broken("\n".join(json.dumps(item) for item in doc["items"][:2])))
    for recording, total in ((listing, 92), (lines, 2)):
        out = tmp_path / f"{recording.stem}.out.jsonl"
        result = _eventrouter("replay", str(recording), f"--sink=file:{out}")
        assert result.returncode == 0, result.stderr
        records = {r["uid"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert len(records) == total
        assert [records[u]["message"] for u in uids] == ["caf\ufffd", "a \ufffd"]
        summary = json.loads(result.stderr.strip().splitlines()[-1])
        assert summary["repaired"] == 2 and summary["malformed"] == 0, summary
        name = doc["items"][1]["metadata"]["name"]
        assert "replaced by U+FFFD" in result.stderr and f"/{name} (uid " in result.stderr


async def test_a_dead_letter_file_replays_once_the_cause_is_fixed(tmp_path: Path) -> None:
    # The hook checks signatures and the sink has no secret: every batch is refused (401), retried
    # once (retry_max_attempts=1) and dead-lettered. With the secret given, replaying the
    # dead-letter file delivers them.
    from eventrouter.testing.receivers.webhook import WebhookReceiver

    secret, data = "It's a Secret to Everybody", tmp_path / "data"
    recording = str(DATA / "watch-core-v1.jsonl")
    async with WebhookReceiver(secret=secret) as hook:
        sink = f"--sink=webhook:{hook.url}?batch_max_wait=0.05&retry_max_attempts=1"
        first = await asyncio.to_thread(
            _eventrouter, "replay", recording, sink, "--data-dir", str(data), "--cluster-name", "rec"
        )
        assert first.returncode == 1, first.stderr  # nothing delivered: no success, whatever was kept
        assert json.loads(first.stderr.strip().splitlines()[-1])["sinks"]["webhook"]["dead_lettered"] == 126
        assert hook.accepted == [] and {r.status for r in hook.requests} == {401}
        deadletter = data / "deadletter" / "webhook.jsonl"
        entries = [json.loads(line) for line in deadletter.read_text().splitlines()]
        assert len(entries) == 126 and all("HTTP 401" in e["reason"] for e in entries)

        # Replayed with the router's own configuration: another sink, and the data dir whose checkpoint
        # counts the dead letters as done. They go to the sink that refused them, and only there.
        fixed, other = f"{sink}&secret={secret}", tmp_path / "other.jsonl"
        second = await asyncio.to_thread(
            _eventrouter,
            "replay",
            str(deadletter),
            fixed,
            f"--sink=file:{other}",
            "--data-dir",
            str(data),
        )  # no --cluster-name: the records' own ("rec") is kept
        assert second.returncode == 0, second.stderr
        summary = json.loads(second.stderr.strip().splitlines()[-1])
        assert summary["occurrences"] == 126 and summary["sinks"]["webhook"]["delivered"] == 126, summary
        assert list(summary["sinks"]) == ["webhook"] and not other.exists()
        assert "dead letters of webhook: sending them to that sink only" in second.stderr
        assert all(r.signature_ok for r in hook.accepted)
        delivered = [record for r in hook.accepted for record in r.json()]
    # The same occurrences, the same records: what was refused is what arrives.
    assert sorted(f"{r['uid']}/{r['occurrence']}" for r in delivered) == sorted(e["key"] for e in entries)
    by_key = {e["key"]: e["record"] for e in entries}
    assert all(r == by_key[f"{r['uid']}/{r['occurrence']}"] for r in delivered)


def test_data_dir_max_bytes_takes_kubernetes_quantities() -> None:
    from eventrouter.cli import _byte_size

    assert [_byte_size(v) for v in ("1Gi", "512Mi", "2G", "1000", "1.5Gi")] == [
        2**30,
        512 * 2**20,
        2 * 10**9,
        1000,
        3 * 2**29,
    ]
    result = _eventrouter("replay", "-", "--sink=stdout:", "--data-dir-max-bytes", "lots")
    assert result.returncode == 2 and "--data-dir-max-bytes: 'lots': expected bytes" in result.stderr


def test_a_dead_letter_line_without_its_event_is_counted_malformed(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"sink": "es", "reason": "400", "key": "u/1", "record": {"uid": "u"}}) + "\n")
    out = tmp_path / "out.jsonl"
    result = _eventrouter("replay", str(old), f"--sink=file:{out}?name=es")
    summary = json.loads(result.stderr.strip().splitlines()[-1])
    assert summary["malformed"] == 1 and summary["occurrences"] == 0
    assert "dead-letter line for u/1 has no event object" in result.stderr


def test_replay_of_a_kubectl_list_with_data_dir_skips_what_was_delivered(tmp_path: Path) -> None:
    out, data = tmp_path / "events.jsonl", tmp_path / "data"
    args = ("replay", str(DATA / "list-core-v1.json"), f"--sink=file:{out}", "--data-dir", str(data))
    assert _eventrouter(*args).returncode == 0
    assert len(out.read_text().splitlines()) == 92
    second = _eventrouter(*args)
    assert second.returncode == 0
    assert len(out.read_text().splitlines()) == 92  # nothing twice
    assert json.loads(second.stderr.strip().splitlines()[-1])["sinks"]["file"]["skipped"] == 92


def test_a_dead_letter_replay_sorted_for_loki_waits_on_the_data_volume_not_in_tmp(tmp_path: Path) -> None:
    """Sorted for a sink that wants time order, a replay waits in a temporary file. Dead letters are
    replayed without the data dir; the file must still not go to /tmp, which in the chart's pod is a
    64Mi emptyDir that a large dead-letter file would get the pod evicted for."""
    from eventrouter.app import RouterSettings
    from eventrouter.cli import _dead_letter_replay

    specs = build_specs(["loki:http://loki:3100"])
    dead = tmp_path / "deadletter" / "loki.jsonl"
    _, settings = _dead_letter_replay(("loki", "c"), specs, RouterSettings(data_dir=tmp_path), str(dead))
    assert settings.data_dir is None and settings.watch.relist_dir == str(tmp_path)
    _, settings = _dead_letter_replay(("loki", "c"), specs, RouterSettings(), str(dead))
    assert settings.watch.relist_dir == str(dead.parent.resolve())


# ---- plugins that misbehave ------------------------------------------------------------------------

_BADPLUG = '''
import asyncio

from pydantic import field_validator

from eventrouter import Sink, SinkOptions


class BuggyOptions(SinkOptions):
    region: str = "x"

    @field_validator("region")
    @classmethod
    def _region(cls, value):
        return int(value) + None  # a plugin's bug: TypeError, which pydantic lets through


class BuggyValidator(Sink[SinkOptions]):
    options_model = BuggyOptions


class Impostor(Sink[SinkOptions]):
    """Claims the name of a built-in sink."""

    options_model = SinkOptions


class NoModel(Sink[SinkOptions]):
    options_model = dict


class LeakyCheck(Sink[SinkOptions]):
    """Its check awaits a future someone else cancelled (what a client library may do)."""

    options_model = SinkOptions

    async def check(self):
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    async def aclose(self):
        await self.check()

    async def send(self, batch):
        return None


class Refuses(Sink[SinkOptions]):
    options_model = SinkOptions

    def __init__(self, options, context):
        raise ValueError("the region is not supported by this client")

    async def send(self, batch):
        return None
'''


def _install_badplug(tmp_path: Path) -> dict[str, str]:
    """A distribution on a path entry, found by importlib.metadata as an installed one is."""
    (tmp_path / "badplug.py").write_text(_BADPLUG)
    info = tmp_path / "badplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: badplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[eventrouter.sinks]\nloki = badplug:Impostor\nnomodel = badplug:NoModel\nrefuses = badplug:Refuses\n"
        "buggy = badplug:BuggyValidator\nleaky = badplug:LeakyCheck\n"
    )
    return {"PYTHONPATH": str(tmp_path)}


def test_a_plugin_cannot_take_over_a_builtin_sinks_name(tmp_path: Path) -> None:
    """The first distribution by name won: a package registering `loki` received the Loki token."""
    env = _install_badplug(tmp_path)
    result = _eventrouter("sinks", "loki", env=env)
    assert result.returncode == 0, result.stderr
    assert "(eventrouter " in result.stdout and "badplug" not in result.stdout
    assert (
        "sink type 'loki' is registered by eventrouter and by badplug: the one from eventrouter is used"
        in (result.stderr)
    )


def test_broken_plugins_are_named_not_a_traceback(tmp_path: Path) -> None:
    env = _install_badplug(tmp_path)
    listing = _eventrouter("sinks", env=env)
    assert listing.returncode == 0, listing.stderr
    assert (
        "nomodel  [broken]" in listing.stdout
        and "not an eventrouter.options.SinkOptions subclass" in listing.stdout
    )
    assert "stdout" in listing.stdout  # the others are listed still
    for command in ("check", "run"):
        args = [command, "--sink=refuses:"] + (["--demo"] if command == "run" else [])
        result = _eventrouter(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert "the refuses sink cannot be built: ValueError: the region is not supported" in result.stderr
        assert "Traceback" not in result.stderr


def test_check_names_a_plugin_whose_check_lets_a_cancellederror_out_and_checks_the_others(
    tmp_path: Path,
) -> None:
    """A stray CancelledError (not a cancellation of the check) from a plugin's check() or aclose()
    was a traceback naming no sink, and the sinks after it were never checked."""
    env = _install_badplug(tmp_path)
    result = _eventrouter("check", "--sink=leaky:", "--sink=stdout:", env=env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "FAIL  leaky (leaky): check() raised CancelledError without being cancelled (a sink bug)",
        "ok    stdout (stdout)",
    ]
    assert "Traceback" not in result.stderr
    offline = _eventrouter("check", "--offline", "--sink=leaky:", "--sink=stdout:", env=env)
    assert offline.returncode == 0 and "Traceback" not in offline.stderr, offline.stderr
    assert offline.stdout.splitlines() == ["valid leaky (leaky)", "valid stdout (stdout)"]


def test_a_plugin_validator_raising_another_error_than_valueerror_names_the_sink_and_option(
    tmp_path: Path,
) -> None:
    """pydantic turns only a validator's ValueError into a validation error: a plugin's TypeError
    was a traceback and exit 1, naming neither the sink nor the option."""
    env = _install_badplug(tmp_path)
    for command in ("check", "run"):
        args = [command, "--sink=buggy:?region=7&name=b1"] + (["--demo"] if command == "run" else [])
        result = _eventrouter(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert (
            "--sink #1 (sink 'b1'): option 'region': cannot be validated (TypeError: unsupported operand"
            in result.stderr
        )
        assert "Traceback" not in result.stderr


# ---- check validates what run refuses, flags given twice ---------------------------------------


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        (
            'namespaces: ["default,kube-system"]\n',
            [],
            "namespace 'default,kube-system' is not a namespace name",
        ),
        ("", ["--namespace", "Default"], "namespace 'Default' is not a namespace name"),
        ("field_selector: foo\n", [], "field selector 'foo': cannot understand 'foo'"),
        ("", ["--field-selector", "reason=a=b"], "field selector 'reason=a=b': cannot understand"),
        (
            "data_dir: {tmp}/file/data\n",
            [],
            "--data-dir {tmp}/file/data: cannot write there (Not a directory)",
        ),
        ("", ["--data-dir", "{tmp}/file/data"], "--data-dir {tmp}/file/data: cannot write there"),
    ],
)
def test_check_refuses_the_settings_run_refuses(
    tmp_path: Path, config: str, args: list[str], expected: str
) -> None:
    """`check` validated the sinks only: a namespace list, field selector or data dir that `run`
    refuses (exit 2) passed `check` (exit 0), the pipeline's gate."""
    (tmp_path / "file").write_text("a file where the data dir's parent should be")
    path = tmp_path / "c.yaml"
    path.write_text(config.format(tmp=tmp_path) + "sinks:\n  - type: stdout\n")
    args = [a.format(tmp=tmp_path) for a in args]
    for offline in ([], ["--offline"]):
        result = _eventrouter("check", f"--config={path}", *args, *offline)
        assert result.returncode == 2, result.stdout + result.stderr
        assert expected.format(tmp=tmp_path) in result.stderr
        assert "Traceback" not in result.stderr
    path.write_text(
        "namespaces: [default, kube-system]\nfield_selector: type=Warning\nsinks:\n  - type: stdout\n"
    )
    result = _eventrouter(
        "check", f"--config={path}", "--namespace=default", "--data-dir", str(tmp_path / "d")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok    stdout (stdout)\n"


def test_check_offline_validates_and_builds_every_sink_without_contacting_it() -> None:
    """For a gate that cannot reach the sinks (CI, a rendered chart): exit 0 for a valid
    configuration whatever the sinks' state, 2 for an invalid one."""
    sink = "--sink=webhook:http://127.0.0.1:9/hook?access_token=tok123"
    result = _eventrouter("check", "--offline", sink)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "valid webhook (webhook http://127.0.0.1:9/hook?access_token=***)\n"
    result = _eventrouter("check", "--offline", sink + "&batch_size=0")
    assert result.returncode == 2 and "option 'batch_size'" in result.stderr


@pytest.mark.parametrize(
    "flag", ["--config", "--data-dir", "--cluster-name", "--data-dir-max-bytes", "--field-selector"]
)
def test_a_single_value_flag_given_twice_is_refused_naming_it(tmp_path: Path, flag: str) -> None:
    """argparse kept the last silently: a second --config replaced the first file's sinks, a second
    --data-dir left the first one's checkpoints unread."""
    values = {
        "--config": [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")],
        "--data-dir": [str(tmp_path / "a"), str(tmp_path / "b")],
        "--cluster-name": ["a", "b"],
        "--data-dir-max-bytes": ["1Gi", "2Gi"],
        "--field-selector": ["type=Warning", "type=Normal"],
    }[flag]
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(f"sinks:\n  - type: stdout\n    name: from-{name}\n")
    for command in ("check", "run"):
        result = _eventrouter(command, "--sink=stdout", f"{flag}={values[0]}", flag, values[1])
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"argument {flag}: given more than once; it takes one value" in result.stderr


# ---- the YAML file -----------------------------------------------------------------------------


def test_yaml_merge_keys_are_taken_and_a_key_given_twice_still_refused(tmp_path: Path) -> None:
    """The duplicate-key loader refused `<<: *anchor` ("could not determine a constructor for the
    tag merge"), the usual way to share options between sinks."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "cluster_name: prod\n"
        "sinks:\n"
        "  - &common\n"
        "    type: stdout\n"
        "    name: all\n"
        "    batch_max_events: 100\n"
        "  - <<: *common\n"
        "    name: warnings\n"  # the mapping's own key wins over the merged one, as YAML says
        "    level: Warning\n"
        "  - <<: [*common]\n"
        "    name: third\n"
    )
    loaded = load_yaml(config)
    assert loaded.sinks == [
        {"type": "stdout", "name": "all", "batch_max_events": 100},
        {"type": "stdout", "name": "warnings", "batch_max_events": 100, "level": "Warning"},
        {"type": "stdout", "name": "third", "batch_max_events": 100},
    ]
    specs = build_specs([], loaded.sinks)
    assert [(s.name, s.pipeline.batch_max_events, s.filter.level) for s in specs] == [
        ("all", 100, None),
        ("warnings", 100, "Warning"),
        ("third", 100, None),
    ]
    config.write_text(
        "sinks:\n  - &common\n    type: stdout\n  - <<: *common\n    name: a\n    level: Warning\n    name: b\n"
    )
    with pytest.raises(
        ConfigError, match="at line 7, column 5: the key 'name' is given twice in one mapping"
    ):
        load_yaml(config)


# ---- list options and credentials --------------------------------------------------------------


def test_a_list_option_given_as_a_b_and_as_a_repeated_key_at_once_is_split() -> None:
    """`kinds=Pod,Node&kinds=Deployment` kept ['Pod,Node', 'Deployment']: a kind "Pod,Node" that
    never matched, and the Pods and Nodes the sink was meant for filtered out without a word."""
    (spec,) = build_specs(
        ["stdout:?kinds=Pod,Node&kinds=Deployment&exclude_namespaces=a, b&exclude_namespaces=c"]
    )
    assert spec.filter.kinds == ["Pod", "Node", "Deployment"]
    assert spec.filter.exclude_namespaces == ["a", "b", "c"]
    (spec,) = build_specs([], [{"type": "stdout", "reasons": ["BackOff,Failed", "Killing"]}])
    assert spec.filter.reasons == ["BackOff", "Failed", "Killing"]


async def test_an_env_credential_ending_in_a_newline_is_sent_without_it(tmp_path: Path) -> None:
    """A Secret made with `echo token | base64` and mounted through secretKeyRef: `file:` stripped the
    newline, `env:` kept it, and every request failed in aiohttp ("Forbidden control character")
    while the sink retried for ever."""
    from eventrouter.testing.receivers.webhook import WebhookReceiver

    recording = str(DATA / "watch-core-v1.jsonl")
    async with WebhookReceiver() as hook:
        sink = f"--sink=webhook:{hook.url}?bearer_token=env:HOOK_TOKEN&batch_max_wait=0.05"
        result = await asyncio.to_thread(
            _eventrouter, "replay", recording, sink, "--timeout=20", env={"HOOK_TOKEN": "tok\r\n"}
        )
        assert result.returncode == 0, result.stderr
        assert sum(len(r.json()) for r in hook.accepted) == 126
        assert {r.headers["Authorization"] for r in hook.accepted} == {"Bearer tok"}


def test_a_credential_with_a_control_character_is_refused_naming_the_option_not_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the value no newline is stripped: a request could never carry it."""
    monkeypatch.setenv("HOOK_TOKEN", "s3cr3t\nX-Other: 1")
    (tmp_path / "pw").write_text("s3cr3t\x00pw\n")
    cases = [
        ("webhook:http://h/x?bearer_token=env:HOOK_TOKEN", "option 'bearer_token'"),
        (f"webhook:http://h/x?username=u&password=file:{tmp_path / 'pw'}", "option 'password'"),
        (f"elasticsearch:http://es:9200?username=u&password=file:{tmp_path / 'pw'}", "option 'password'"),
        (
            "kafka:?brokers=k:9092&topic=t&sasl_mechanism=PLAIN&username=u&password=env:HOOK_TOKEN",
            "option 'password'",
        ),
        # The Loki sink's own check, which says the same, comes first.
        ("loki:http://loki:3100?bearer_token=env:HOOK_TOKEN", "option 'bearer_token'"),
    ]
    for flag, option in cases:
        with pytest.raises(ConfigError) as refused:
            build_specs([flag])
        message = str(refused.value)
        assert option in message and "control character (a line break?)" in message, message
        assert "s3cr3t" not in message
    monkeypatch.setenv("HOOK_TOKEN", "tab\tinside")  # a header may carry a tab
    build_specs(["webhook:http://h/x?bearer_token=env:HOOK_TOKEN"])


def test_a_raw_query_in_a_url_password_exits_2_showing_nothing_of_it(tmp_path: Path) -> None:
    """`--sink TYPE:URL` and a YAML `url:` were split at the password's raw `?`: the error named the
    rest of it as an unknown option and showed its start as the url's host:port."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "sinks:\n  - type: loki\n    name: logs\n    url: http://svc:Sup3r?Pw@loki:3100\n    tenant: t\n"
    )
    for args, where in (
        (
            ["--sink=dingtalk:http://svc:Sup3r?Pw@gw:80/robot/send?access_token=x"],
            "--sink #1 (sink 'dingtalk')",
        ),
        ([f"--config={config}"], f"{config} sinks[0] (sink 'logs')"),
    ):
        result = _eventrouter("check", "--offline", *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{where}: option 'url': Value error, url 'http://…': " in result.stderr
        assert "percent-encode any / ? # @" in result.stderr
        for part in ("Sup3r", "Pw", "svc"):
            assert part not in result.stdout + result.stderr
    result = _eventrouter("check", "--offline", "--sink=loki:http://loki:3100?tenant=x")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "valid loki (loki http://loki:3100)\n"
