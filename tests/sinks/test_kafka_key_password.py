"""Kafka sink: an encrypted client key (key_file) fails the start at once, naming the key, and never makes
OpenSSL ask for a pass phrase on a terminal. Tansu behind a TLS proxy that wants the client's
certificate: the same key decrypted is let in, so the failure is the encryption's alone."""

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

from eventrouter import OK, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.tansu import TansuBroker, free_port
from eventrouter.testing.receivers.tls_proxy import TLSProxy
from eventrouter.testing.terminal import on_a_terminal, sink_probe
from eventrouter.testing.tls import certificate, encrypted_key, self_signed
from eventrouter_sinks.kafka import KafkaOptions, KafkaSink

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

PASS_PHRASE = "pass-phrase-9c2a"
ENCRYPTED = "the client key (key_file, or cert_file when it holds it) is encrypted: give a decrypted key"


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


async def _decrypted_key_is_let_in(tls: MutualTLS) -> None:
    """The same options with the key decrypted: checked and a record acknowledged through the proxy."""
    sink = KafkaSink(
        KafkaOptions.model_validate(tls.options(tls.key)),
        SinkContext(name="kafka", cluster="c", data_dir=None, logger=logging.getLogger("test.kafka")),
    )
    try:
        await sink.check()
        assert await sink.send([make_occurrence()]) == [OK]
    finally:
        await sink.aclose()
    assert tls.proxy.handshakes > 0


async def test_an_encrypted_key_file_fails_the_start_at_once_naming_it_without_asking_on_a_terminal(
    mutual_tls: MutualTLS,
) -> None:
    """Without ``_no_pass_phrase`` OpenSSL asked "Enter PEM pass phrase:" on the controlling terminal (a
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
