"""A throw-away self-signed certificate for loopback TLS tests (made with the openssl CLI)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

__all__ = ["certificate", "encrypted_key", "self_signed", "server_context"]


def certificate(directory: Path, *, name: str = "cert") -> tuple[Path, Path]:
    """Write ``<name>.pem`` (usable as its own CA, valid for 127.0.0.1 and localhost) and
    ``<name>-key.pem`` into ``directory``; returns (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    done = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"openssl could not make a certificate: {done.stderr.decode(errors='replace')}")
    return cert, key


def encrypted_key(key: Path, pass_phrase: str) -> Path:
    """``key`` encrypted with AES-256 under ``pass_phrase`` (PKCS#8, as `openssl pkey` writes it), beside it."""
    out = key.with_name(key.stem + "-encrypted.pem")
    subprocess.run(
        ["openssl", "pkey", "-in", str(key), "-aes256", "-passout", f"pass:{pass_phrase}", "-out", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    return out


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def self_signed(directory: Path, *, name: str = "ca") -> tuple[Path, ssl.SSLContext]:
    """The certificate path (for clients' CA options) and a server-side SSL context."""
    cert, key = await asyncio.to_thread(certificate, directory, name=name)
    return cert, server_context(cert, key)
