"""A throw-away self-signed certificate for loopback TLS tests (made with the openssl CLI)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

__all__ = ["self_signed"]


async def self_signed(directory: Path, *, name: str = "ca") -> tuple[Path, ssl.SSLContext]:
    """Write ``<name>.crt`` (a CA-usable certificate for 127.0.0.1) and its key into ``directory``;
    returns the certificate path (for clients' CA options) and a server-side SSL context."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"openssl could not make a certificate: {err.decode(errors='replace')}")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return cert, server
