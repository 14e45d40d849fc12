"""webhook sink: an encrypted client key (key_file) never makes OpenSSL ask for a pass phrase."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from eventrouter import OK, SinkContext, SinkError
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.terminal import on_a_terminal, sink_probe
from eventrouter.testing.tls import certificate, encrypted_key, server_context
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

PASS_PHRASE = "pass-phrase-4e7f"


@pytest.fixture
async def client_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate and its key, encrypted."""
    cert, key = await asyncio.to_thread(certificate, tmp_path, name="client")
    return cert, await asyncio.to_thread(encrypted_key, key, PASS_PHRASE)


def _probe_options(cert: Path, key: Path) -> str:
    return json.dumps({"url": "https://127.0.0.1:9/hook", "cert_file": str(cert), "key_file": str(key)})


async def test_an_encrypted_key_file_fails_the_start_at_once_naming_it_without_asking_on_a_terminal(
    client_cert: tuple[Path, Path],
) -> None:
    """OpenSSL asked "Enter PEM pass phrase:" on the controlling terminal (a shell, a pod with
    tty: true) and the router's event loop (every sink, the watch, the health endpoints) waited for
    someone to type, at each retried start; without a terminal the start failed with "[Errno 22]
    Invalid argument", naming nothing. Now no pass phrase is ever asked for: the start fails at
    once, naming key_file and what to do."""
    code = sink_probe("webhook", "WebhookOptions", "WebhookSink", terminal=True)
    out = await on_a_terminal(code, _probe_options(*client_cert), "start", last=b"STALL ", within=30)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert "Enter PEM pass phrase" not in out and len(lines) == 2, out  # nothing else on the terminal
    failed, stall = lines
    assert failed.startswith("FAILED after ") and stall.startswith("STALL "), out
    assert "key_file is encrypted" in failed and "key_password" in failed, out
    assert float(failed.split()[2].removesuffix("s:")) < 1 and float(stall.split()[1]) < 1, out


async def test_without_a_terminal_the_start_fails_naming_key_file(client_cert: tuple[Path, Path]) -> None:
    code = sink_probe("webhook", "WebhookOptions", "WebhookSink", terminal=False)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, _probe_options(*client_cert), "start",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert "key_file is encrypted" in out and "Errno 22" not in out, out


@pytest.fixture
async def mutual_tls(tmp_path: Path) -> AsyncIterator[tuple[WebhookReceiver, Path]]:
    """A receiver that wants a client certificate (the client's own, as its CA), and its CA file."""
    cert, key = await asyncio.to_thread(certificate, tmp_path, name="server")
    client, _ = await asyncio.to_thread(certificate, tmp_path, name="client")  # the fixture's files
    context = server_context(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client)
    async with WebhookReceiver(ssl_context=context) as hook:
        yield hook, cert


def _sink(url: str, **options: object) -> WebhookSink:
    return WebhookSink(
        WebhookOptions.model_validate({"url": url, **options}),
        SinkContext(name="webhook", cluster="t", data_dir=None, logger=logging.getLogger("test.webhook")),
    )


async def test_key_password_opens_an_encrypted_key_for_mutual_tls(
    tmp_path: Path, mutual_tls: tuple[WebhookReceiver, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """An encrypted key, kept so, with its pass phrase beside it (env:, file: or literal)."""
    hook, ca = mutual_tls
    encrypted = await asyncio.to_thread(encrypted_key, tmp_path / "client-key.pem", PASS_PHRASE)
    phrase = tmp_path / "pass-phrase"
    phrase.write_text(PASS_PHRASE + "\n")
    client = {"ca_file": str(ca), "cert_file": str(tmp_path / "client.pem"), "key_file": str(encrypted)}
    sink = _sink(hook.url, key_password=f"file:{phrase}", **client)
    try:
        await sink.start()
        assert await sink.send([make_occurrence()]) == [OK]
    finally:
        await sink.aclose()
    assert len(hook.accepted) == 1
    wrong = _sink(hook.url, key_password="not-the-pass-phrase", **client)
    with pytest.raises(SinkError, match=r"^webhook sink: key_password does not decrypt key_file \(") as info:
        await wrong.start()
    await wrong.aclose()
    assert "not-the-pass-phrase" not in str(info.value) + caplog.text + repr(wrong.options)
    assert PASS_PHRASE not in caplog.text + repr(sink.options)
