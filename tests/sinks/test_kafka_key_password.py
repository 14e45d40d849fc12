"""Kafka sink: an encrypted client key (key_file) without its pass phrase fails the start at once, naming
the key, and never makes OpenSSL ask for a pass phrase on a terminal; with ``key_password`` it is let in.
Tansu behind a TLS proxy that wants the client's certificate: the same key decrypted is let in, so the
failure is the encryption's alone."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eventrouter import OK, SinkContext, SinkError
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.tansu import TansuBroker, free_port
from eventrouter.testing.receivers.tls_proxy import TLSProxy
from eventrouter.testing.terminal import on_a_terminal, sink_probe
from eventrouter.testing.tls import certificate, encrypted_key, self_signed
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink, ssl_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

PASS_PHRASE = "pass-phrase-9c2a"
ENCRYPTED = (
    "the client key (key_file, or cert_file when it holds it) is encrypted: give a decrypted key, or its "
    "pass phrase in key_password"
)


@dataclass
class MutualTLS:
    proxy: TLSProxy
    bootstrap: str
    ca: Path
    """The proxy's certificate, for ca_file."""
    cert: Path
    key: Path
    encrypted: Path
    """``key`` encrypted under PASS_PHRASE."""

    def options(self, key: Path) -> dict[str, Any]:
        # Tansu refuses InitProducerId: no idempotent producer there.
        return {
            "brokers": self.bootstrap,
            "topic": "secure",
            "ca_file": str(self.ca),
            "cert_file": str(self.cert),
            "key_file": str(key),
            "idempotence": False,
        }


@pytest.fixture
async def mutual_tls(tmp_path: Path) -> AsyncIterator[MutualTLS]:
    """Tansu advertising a TLS proxy that requires a client certificate (the client's own, as CA)."""
    ca, server = await self_signed(tmp_path, name="server")
    cert, key = await asyncio.to_thread(certificate, tmp_path, name="client")
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cert)
    encrypted = await asyncio.to_thread(encrypted_key, key, PASS_PHRASE)
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        TLSProxy(listen_port=port, target_port=broker.port, ssl_context=server) as proxy,
    ):
        yield MutualTLS(proxy, f"127.0.0.1:{port}", ca, cert, key, encrypted)


def kafka_sink(options: dict[str, Any]) -> KafkaSink:
    return KafkaSink(
        KafkaOptions.model_validate(options),
        SinkContext(name="kafka", cluster="c", data_dir=None, logger=logging.getLogger("test.kafka")),
    )


async def _decrypted_key_is_let_in(tls: MutualTLS) -> None:
    """The same options with the key decrypted: checked and a record acknowledged through the proxy."""
    sink = kafka_sink(tls.options(tls.key))
    try:
        await sink.check()
        assert await sink.send([make_occurrence()]) == [OK]
    finally:
        await sink.aclose()
    assert tls.proxy.handshakes > 0


async def test_an_encrypted_key_file_fails_the_start_at_once_naming_it_without_asking_on_a_terminal(
    mutual_tls: MutualTLS,
) -> None:
    """Without a pass phrase callback OpenSSL asked "Enter PEM pass phrase:" on the controlling terminal (a
    shell, a pod with tty: true) and the router's event loop (every sink, the watch, the health
    endpoints) waited for someone to type, at each retried start. The start now fails at once, naming
    the key file and what to do, before any connection to the brokers."""
    options = json.dumps(mutual_tls.options(mutual_tls.encrypted))
    code = sink_probe("kafka", "KafkaOptions", "KafkaSink", terminal=True)
    out = await on_a_terminal(code, options, "start", last=b"STALL ", within=20)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert "pass phrase:" not in out and len(lines) == 2, out  # nothing else on the terminal
    failed, stall = lines
    assert failed.startswith("FAILED after ") and stall.startswith("STALL "), out
    assert f"kafka TLS setup failed ({mutual_tls.ca}, {mutual_tls.cert}, {mutual_tls.encrypted}): " in failed
    assert failed.endswith(ENCRYPTED), out
    # Not a speed target: a prompt waits for the child's 20 s deadline; a loaded CI host is far quicker.
    assert float(failed.split()[2].removesuffix("s:")) < 10 and float(stall.split()[1]) < 10, out
    assert mutual_tls.proxy.handshakes == 0
    await _decrypted_key_is_let_in(mutual_tls)


async def test_without_a_terminal_the_check_fails_naming_the_key_file(mutual_tls: MutualTLS) -> None:
    """No controlling terminal and stdin not a tty (a pod): OpenSSL failed with "[Errno 22] Invalid
    argument", which says nothing of the key. Now the same clear failure, at once."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", sink_probe("kafka", "KafkaOptions", "KafkaSink", terminal=False), json.dumps(mutual_tls.options(mutual_tls.encrypted)), "check",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert out.startswith("FAILED after ") and "Errno 22" not in out, out
    failed = out.splitlines()[0]
    assert str(mutual_tls.encrypted) in failed and failed.endswith(ENCRYPTED), out
    assert float(failed.split()[2].removesuffix("s:")) < 10, out
    assert mutual_tls.proxy.handshakes == 0
    await _decrypted_key_is_let_in(mutual_tls)


async def test_an_encrypted_key_file_with_its_key_password_is_let_in_and_a_wrong_one_names_the_key(
    mutual_tls: MutualTLS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The Kafka sink had no ``key_password`` (the webhook has): an encrypted key had to be decrypted
    onto the pod's disk. Now its pass phrase, from a ``file:`` reference (a mounted Secret, trailing
    newline and all), opens it: checked and a record acknowledged through the proxy. A wrong one fails
    the start at once, before any connection, naming the key file and the option, never the value; so
    does a pass phrase given without a client certificate, at validation."""
    caplog.set_level(logging.DEBUG)
    phrase_file = tmp_path / "key-password"
    phrase_file.write_text(PASS_PHRASE + "\n")
    sink = kafka_sink({**mutual_tls.options(mutual_tls.encrypted), "key_password": f"file:{phrase_file}"})
    try:
        await sink.check()
        assert await sink.send([make_occurrence()]) == [OK]
    finally:
        await sink.aclose()
    assert mutual_tls.proxy.handshakes > 0
    let_in = mutual_tls.proxy.handshakes

    wrong = "not-the-" + PASS_PHRASE
    sink = kafka_sink({**mutual_tls.options(mutual_tls.encrypted), "key_password": wrong})
    with pytest.raises(SinkError) as failed:
        async with asyncio.timeout(10):  # at once: no prompt, no connection attempts
            await sink.start()
    await sink.aclose()
    message = str(failed.value)
    assert f"key_password does not decrypt the client key (key_file {mutual_tls.encrypted})" in message
    assert wrong not in message and PASS_PHRASE not in message
    assert mutual_tls.proxy.handshakes == let_in
    assert PASS_PHRASE not in caplog.text and wrong not in caplog.text
    assert "**********" in repr(sink.options.key_password)  # printed masked wherever options are shown

    without_cert = {"brokers": mutual_tls.bootstrap, "key_password": wrong}
    with pytest.raises(ValueError, match="key_password needs cert_file") as refused:
        KafkaOptions.model_validate(without_cert)
    assert wrong not in str(refused.value)


async def test_a_key_password_that_opens_a_key_of_another_certificate_is_not_blamed(tmp_path: Path) -> None:
    """The pass phrase opened the key, but the key is not the certificate's: OpenSSL's own "key values
    mismatch" is said, not that key_password does not decrypt it (which would send the operator after
    the wrong Secret)."""
    cert, _ = await asyncio.to_thread(certificate, tmp_path, name="client")
    _, other = await asyncio.to_thread(certificate, tmp_path, name="other")
    encrypted = await asyncio.to_thread(encrypted_key, other, PASS_PHRASE)
    options = KafkaOptions.model_validate(
        {
            "brokers": "127.0.0.1:9",
            "cert_file": str(cert),
            "key_file": str(encrypted),
            "key_password": PASS_PHRASE,
        }
    )
    with pytest.raises(ssl.SSLError) as failed:
        ssl_context(options)
    assert "KEY_VALUES_MISMATCH" in str(failed.value) and "key_password" not in str(failed.value)
