"""Configuration hygiene (session 29's review of the configuration): TLS files that are no PEM, a
credential typed ``name:value``, a ``+`` in a query, selections that keep nothing, empty credentials,
``python -m eventrouter`` and an online ``check`` that leaves nothing behind. Through the real command
line (``python -m eventrouter.cli``, as tests/test_cli.py) and a whole Router for the reload."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrouter.app import Router
from eventrouter.config import build_specs
from eventrouter.options import redact_url
from eventrouter.testing import event_object
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.routers import router_settings
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.tls import certificate, encrypted_key, server_context
from eventrouter.testing.waiting import until

SECRET = "Zq9SecretPw77"
"""A credential's value: it must appear in no output."""

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _eventrouter(
    *args: str, env: dict[str, str] | None = None, module: str = "eventrouter.cli", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def _refused(*args: str, env: dict[str, str] | None = None) -> str:
    """The output of an `eventrouter` that must exit 2 without a traceback."""
    result = _eventrouter(*args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


# ---- TLS files (finding 3) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A certificate and its key, another key, that key encrypted, and files that are no PEM."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = certificate(tmp, name="client")
    _, other = certificate(tmp, name="other")
    text = tmp / "not-pem.txt"
    text.write_text("this is not a PEM certificate\n")
    truncated = tmp / "truncated.pem"
    truncated.write_text(cert.read_text()[:200])
    return {
        "cert": cert,
        "key": key,
        "other_key": other,
        "encrypted": encrypted_key(key, SECRET),
        "text": text,
        "truncated": truncated,
    }


@needs_openssl
@pytest.mark.parametrize(
    ("sink", "expected"),
    [
        (
            "webhook:https://h/x?ca_file={text}",
            "(sink 'webhook'): option 'ca_file': ca_file '{text}' holds no ",
        ),
        ("loki:https://l:3100?ca_file={truncated}", "(sink 'loki'): option 'ca_file': ca_file '{truncated}'"),
        ("elasticsearch:https://es:9200?ca_file={key}", "(sink 'elasticsearch'): option 'ca_file': "),
        ("kafka:?brokers=k:9093&cacert={text}", "(sink 'kafka'): option 'ca_file': ca_file '{text}'"),
        ("sls:https://sls.example?project=p&logStore=s&ca_file={text}", "(sink 'sls'): option 'ca_file'"),
        (
            "webhook:https://h/x?cert_file={key}&key_file={key}",
            "option 'cert_file': cert_file '{key}' holds no",
        ),
        (
            "webhook:https://h/x?cert_file={cert}&key_file={text}",
            "option 'key_file': key_file '{text}' holds no",
        ),
        (
            "elasticsearch:https://es:9200?cert_file={cert}&key_file={other_key}",
            "option 'key_file': key_file '{other_key}' is not the key of the certificate in cert_file '{cert}'",
        ),
        (
            "webhook:https://h/x?cert_file={cert}&key_file={encrypted}",
            "option 'key_file': key_file '{encrypted}' is encrypted (it wants a pass phrase): give a "
            "decrypted key, or its pass phrase in key_password",
        ),
        (  # Elasticsearch has no key_password: no advice to set it
            "elasticsearch:https://es:9200?cert_file={cert}&key_file={encrypted}",
            "is encrypted (it wants a pass phrase): give a decrypted key\n",
        ),
        (
            "kafka:?brokers=k:9093&cert={cert}&key={encrypted}&key_password=wrong-phrase",
            "option 'key_password': key_password does not decrypt key_file '{encrypted}'",
        ),
    ],
)
def test_a_tls_file_openssl_cannot_load_exits_2_naming_the_option_never_its_content(
    tls_files: dict[str, Path], sink: str, expected: str
) -> None:
    """`readable_file` only opened them: a CA bundle, certificate or key that is no PEM (a key in
    ca.crt, a truncated file, text) passed `check --offline` (exit 0), and the sink then failed its
    start for ever. Nothing of what the files hold is printed (the key, the pass phrase)."""
    paths = {name: str(path) for name, path in tls_files.items()}
    out = _refused("check", "--offline", f"--sink={sink.format(**paths)}")
    assert expected.format(**paths) in out + "\n", out
    key_body = tls_files["key"].read_text().splitlines()[1]
    for never in (SECRET, "wrong-phrase", "PRIVATE KEY", key_body, "_ssl.c"):
        assert never not in out, out


@needs_openssl
def test_the_same_tls_files_with_what_openssl_needs_are_valid(tls_files: dict[str, Path]) -> None:
    """The line between the two: an encrypted key is valid with its pass phrase, refused without."""
    cert, key, encrypted = tls_files["cert"], tls_files["key"], tls_files["encrypted"]
    for sink in (
        f"webhook:https://h/x?ca_file={cert}&cert_file={cert}&key_file={key}",
        f"webhook:https://h/x?cert_file={cert}&key_file={encrypted}&key_password=env:KEY_PHRASE",
        f"kafka:?brokers=k:9093&cacert={cert}&cert={cert}&key={encrypted}&key_password=env:KEY_PHRASE",
        f"elasticsearch:https://es:9200?ca_file={cert}&cert_file={cert}&key_file={key}",
        f"loki:https://l:3100?ca_file={cert}",
    ):
        result = _eventrouter("check", "--offline", f"--sink={sink}", env={"KEY_PHRASE": SECRET})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("valid ")
        without = sink.replace("&key_password=env:KEY_PHRASE", "")
        if without != sink:
            out = _refused("check", "--offline", f"--sink={without}")
            assert "is encrypted (it wants a pass phrase)" in out and SECRET not in out, out


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


def _names(hook: WebhookReceiver) -> list[str]:
    return [record["involved_object"]["name"] for request in hook.accepted for record in request.json()]


@needs_openssl
async def test_a_ca_file_rotated_to_no_pem_is_an_invalid_reload_and_the_working_sink_delivers_on(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """A mounted Secret's ca.crt updated with a wrong value: the options validated, the reload was
    counted `applied`, and the new instance, which took the working one's place, never started; the
    events after the rotation were never delivered. Now it is `invalid` and the old instance goes on."""
    cert, key = await asyncio.to_thread(certificate, tmp_path, name="server")
    volume = SecretVolume(tmp_path / "tls", {"ca.crt": cert.read_bytes()})
    async with WebhookReceiver(ssl_context=server_context(cert, key)) as hook:
        flag = f"webhook:{hook.url}?ca_file={volume.file('ca.crt')}&batch_max_wait=0.02&retry_max_backoff=0.5"
        router = Router(router_settings(api, tmp_path, reload_interval=0), build_specs([flag]))
        async with router.running():
            (reloader,) = router.reloaders
            api.create_event(event_object(object_name="before-0"))
            await until(lambda: "before-0" in _names(hook), timeout=20)
            volume.update({"ca.crt": "this is not a PEM certificate\n"})
            assert not reloader.check() and not reloader.check()  # seen, then settled: refused

            def reloads(result: str) -> float:
                value = router.metrics.registry.get_sample_value(
                    "eventrouter_sink_reloads_total", {"sink": "webhook", "result": result}
                )
                return value or 0.0

            assert (reloads("invalid"), reloads("applied")) == (1.0, 0.0)
            for i in range(3):
                api.create_event(event_object(object_name=f"after-{i}"))
            await until(lambda: {"after-0", "after-1", "after-2"} <= set(_names(hook)), timeout=20)


# ---- a credential typed name:value (finding 5) ----------------------------------------------------


def test_a_credential_typed_with_a_colon_is_never_printed_nor_sent_on(tmp_path: Path) -> None:
    """`?password:S3cret` (a header's Name:Value) and a YAML flow `{password:S3cret}` made an option
    *named* password:S3cret: printed by the exit-2 message, and a webhook kept it in its URL (shown in
    the configured line and `check`, sent on to the endpoint)."""
    flow = tmp_path / "flow.yaml"
    flow.write_text(f'sinks:\n  - {{type: loki, url: "http://l:3100", username: u, password:{SECRET}}}\n')
    cases = [
        (["--sink=loki:http://loki:3100?username=u&password:" + SECRET], "option 'password:…'"),
        (["--sink=dingtalk:https://oapi.dingtalk.com/robot/send?access_token:" + SECRET], "'access_token:…'"),
        (
            ["--sink=webhook:https://hooks.example.com/x?username=u&password:" + SECRET],
            "query key 'password:…'",
        ),
        (["--sink=webhook:https://hooks.example.com/x?token%20" + SECRET + "=1"], "query key 'token …'"),
        ([f"--config={flow}"], f"{flow} sinks[0] (sink 'loki'): option 'password:…'"),
    ]
    for args, expected in cases:
        out = _refused("check", "--offline", *args)
        assert expected in out, out
        assert "did you mean" in out and SECRET not in out, out
    # And wherever a URL is shown (a key that is not refused, e.g. in an error's URL).
    assert redact_url(f"https://h/x?password:{SECRET}=&a b=c") == "https://h/x?password:***=***&a ***=***"


# ---- a + in a query (finding 6) -------------------------------------------------------------------


def test_a_plus_in_a_query_credential_or_regex_is_refused_naming_the_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Form decoding reads `+` as a space (kube-eventer's too): a base64 credential given as a
    literal was silently changed (401 for ever), `message=Back-off.+restarting` kept nothing."""
    value = "k3y+" + SECRET + "/en=="
    spaced = "write %20 for a space, %2B for a plus"
    for sink, option, hint in (
        (f"webhook:http://h/x?secret={value}", "secret", f"{spaced}, or use env:/file:"),
        (f"loki:http://l:3100?bearer_token={value}", "bearer_token", f"{spaced}, or use env:/file:"),
        (
            f"elasticsearch:http://es:9200?esUserName=u&esUserSecret={value}",
            "esUserSecret",
            f"{spaced}, or use env:/file:",
        ),
        (f"stdout:?message=Back-off.+{SECRET}", "message", f"{spaced}, or give the filter"),
        (f"stdout:?exclude_message=a+{SECRET}", "exclude_message", spaced),
    ):
        out = _refused("check", "--offline", f"--sink={sink}")
        assert f"option {option!r}: a + in a query reads as a space: {hint}" in out, out
        assert SECRET not in out, out
    # %2B is a +; a + elsewhere is still a space, as kube-eventer's flags expect.
    (hook,) = build_specs(["webhook:http://h/x?team=a+b&secret=k3y%2BTok/en=="])
    assert hook.options.secret.get_secret_value() == "k3y+Tok/en=="  # type: ignore[attr-defined]
    assert hook.options.url == "http://h/x?team=a+b"
    (stdout,) = build_specs(["stdout:?message=Back-off.%2Brestarting&name=my+stdout"])
    assert stdout.filter.message == "Back-off.+restarting" and stdout.name == "my stdout"


# ---- selections that keep nothing (finding 7) ----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        (
            "",
            ["--namespace=shop", "--sink=file:{tmp}/e.jsonl?name=dflt&namespaces=default"],
            "--sink #1 (sink 'dflt'): option 'namespaces' (default) keeps none of the namespaces "
            "--namespace watches (shop): the sink would receive nothing",
        ),
        (
            "namespaces: [shop, pay]\n",
            ["--sink=file:{tmp}/e.jsonl?exclude_namespaces=shop,pa*"],
            "(sink 'file'): option 'exclude_namespaces' (shop,pa*) drops every namespace namespaces: in "
            "the config watches (shop,pay)",
        ),
        (
            "",
            ["--field-selector=type=Normal", "--sink=dingtalk:?access_token=t0k"],
            "(sink 'dingtalk'): option 'level' (level=Warning, the dingtalk sink's default) keeps Warning "
            "events only, and --field-selector (type=Normal) lets none of them through",
        ),
        (
            "field_selector: type!=Warning\n",
            ["--sink=stdout:?types=Warning"],
            "(sink 'stdout'): option 'types' (types=Warning) keeps Warning events only, and "
            "field_selector: in the config (type!=Warning) lets none of them through",
        ),
        (
            "",
            ["--sink=stdout:?namespaces=default%20kube-system"],
            "(sink 'stdout'): option 'namespaces': Value error, 'default kube-system' is not a namespace "
            "name: letters, digits and '-', at most 63 characters, or a glob such as kube-* (several are "
            "separated by commas, namespaces=a,b, or a YAML list)",
        ),
        (
            "",
            ["--sink=stdout:?namespaces=pay&exclude_namespaces=pay"],
            "(sink 'stdout'): option '(options)': Value error, namespaces keeps 'pay' and "
            "exclude_namespaces drops it",
        ),
        (
            "",
            ["--sink=stdout:?exclude_namespaces=*"],
            "(sink 'stdout'): option 'exclude_namespaces': Value error, exclude_namespaces=* drops everything",
        ),
    ],
)
def test_a_selection_that_keeps_nothing_exits_2_naming_the_sink_and_both_options(
    tmp_path: Path, config: str, args: list[str], expected: str
) -> None:
    """Each passed `check --offline` (exit 0), and `run` was ready and healthy while the sink
    delivered nothing, counted only as filtered."""
    path = tmp_path / "c.yaml"
    path.write_text(config)
    args = [a.format(tmp=tmp_path) for a in args]
    for command in (["check", "--offline"], ["run", "--demo", "--metrics-addr", "127.0.0.1:0"]):
        out = _refused(*command, f"--config={path}", *args)
        assert expected in out, out
    assert not (tmp_path / "e.jsonl").exists()


@pytest.mark.parametrize(
    ("valid", "refused", "says"),
    [
        (  # a glob matches as the filter does, ignoring case
            ["--namespace=shop", "--namespace=kube-system", "--sink=stdout:?namespaces=Kube-*"],
            ["--namespace=shop", "--namespace=kube-system", "--sink=stdout:?namespaces=Kube-x*"],
            "option 'namespaces' (Kube-x*) keeps none of the namespaces --namespace watches",
        ),
        (
            ["--namespace=shop", "--namespace=pay", "--sink=stdout:?exclude_namespaces=pay"],
            ["--namespace=shop", "--namespace=pay", "--sink=stdout:?exclude_namespaces=pay,shop"],
            "option 'exclude_namespaces' (pay,shop) drops every namespace --namespace watches",
        ),
        (
            ["--field-selector=type=Warning", "--sink=dingtalk:?access_token=t0k"],
            ["--field-selector=type=Warning", "--sink=dingtalk:?access_token=t0k&types=Normal"],
            "option 'types' (types=Normal) keeps Normal events only, and --field-selector (type=Warning)",
        ),
        (
            ["--field-selector=type!=Normal", "--sink=stdout:?level=Warning"],
            ["--field-selector=type!=Normal", "--sink=stdout:?types=Normal"],
            "option 'types' (types=Normal) keeps Normal events only, and --field-selector (type!=Normal)",
        ),
        (  # a glob kept and one of its names dropped; not a name kept that a glob drops
            ["--sink=stdout:?namespaces=kube-*&exclude_namespaces=kube-system"],
            ["--sink=stdout:?namespaces=kube-system&exclude_namespaces=kube-*"],
            "namespaces keeps 'kube-system' and exclude_namespaces drops it",
        ),
    ],
)
def test_a_selection_that_keeps_something_is_valid_and_its_neighbour_that_keeps_nothing_is_not(
    valid: list[str], refused: list[str], says: str
) -> None:
    result = _eventrouter("check", "--offline", *valid)
    assert result.returncode == 0, (valid, result.stderr)
    out = _refused("check", "--offline", *refused)
    assert says in out, out


# ---- minor ----------------------------------------------------------------------------------------


def test_an_empty_env_or_file_credential_is_refused_like_an_unset_one(tmp_path: Path) -> None:
    """Loki sent `Authorization: Bearer ` and retried "refused" for ever, DingTalk sent unsigned
    requests, SLS fell back to a credential of the environment."""
    empty = tmp_path / "empty-secret"
    empty.write_text("\n")  # `echo "" > file`: empty once its newline is stripped
    for sink, expected in (
        ("loki:http://l:3100?bearer_token=env:EMPTY_TOKEN", "option 'bearer_token': Value error, environment "
         "variable 'EMPTY_TOKEN' is set but empty"),
        (f"dingtalk:?access_token=t&secret=file:{empty}", f"option 'secret': Value error, secret file '{empty}' "
         "is empty"),
        ("sls:https://sls.example?project=p&logStore=s&accessKeyId=a&accessKeySecret=env:EMPTY_TOKEN",
         "option 'accessKeySecret': Value error, environment variable 'EMPTY_TOKEN' is set but empty"),
    ):  # fmt: skip
        out = _refused("check", "--offline", f"--sink={sink}", env={"EMPTY_TOKEN": ""})
        assert expected in out, out


def test_python_dash_m_eventrouter_is_the_eventrouter_command(tmp_path: Path) -> None:
    result = _eventrouter("check", "--offline", "--sink=stdout", module="eventrouter", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "valid stdout (stdout)\n"
    assert _eventrouter("check", "--offline", "--sink=nosuch:", module="eventrouter").returncode == 2


def test_an_online_check_of_a_file_sink_creates_nothing(tmp_path: Path) -> None:
    """`check` started the file sink, which made its missing folders and the file: a validation left
    /nonexistent-dir behind. Now it checks that the file could be written (a regular file it may
    write, or a folder it may create in) and makes nothing."""
    target = tmp_path / "missing" / "deeper" / "events.jsonl"
    result = _eventrouter("check", f"--sink=file:{target}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok    file (file ")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("")
    for path, reason in (
        (tmp_path / "a-file" / "events.jsonl", f"{tmp_path / 'a-file'} is not a directory"),
        (tmp_path, "not a regular file"),
    ):
        result = _eventrouter("check", f"--sink=file:{path}")
        assert result.returncode == 1, result.stderr
        assert result.stdout.startswith("FAIL  file (file ")
        assert result.stdout.endswith(f": file sink cannot write {path}: {reason}\n")
    existing = tmp_path / "events.jsonl"
    existing.write_text('{"a": 1}\n')
    assert _eventrouter("check", f"--sink=file:{existing}").returncode == 0
    assert existing.read_text() == '{"a": 1}\n'
