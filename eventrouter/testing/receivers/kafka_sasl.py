"""A SASL layer in front of a plaintext Kafka broker (Tansu has no SASL users): answers SaslHandshake
and SaslAuthenticate itself — PLAIN and SCRAM-SHA-256/512 checked as a Kafka broker does (RFC 5802
proofs, not a password compare) — and refuses any other request before authentication, as brokers do.
After authentication it relays bytes both ways, so everything else is the real broker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import struct

from eventrouter.testing.receivers._relay import Relay

__all__ = ["SASLProxy"]

API_SASL_HANDSHAKE = 17
API_VERSIONS = 18
API_SASL_AUTHENTICATE = 36
UNSUPPORTED_SASL_MECHANISM = 33
ILLEGAL_SASL_STATE = 34
SASL_AUTHENTICATION_FAILED = 58
ITERATIONS = 4096


def _string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    data = value.encode()
    return struct.pack(">h", len(data)) + data


def _frame(correlation_id: int, body: bytes) -> bytes:
    return struct.pack(">ii", 4 + len(body), correlation_id) + body


class _Scram:
    def __init__(self, mechanism: str, users: dict[str, str]) -> None:
        self.hash = hashlib.sha256 if mechanism.endswith("256") else hashlib.sha512
        self.users = users
        self.state = "first"
        self.auth_message = ""
        self.server_key = b""
        self.stored_key = b""
        self.nonce = ""

    def _h(self, data: bytes) -> bytes:
        return self.hash(data).digest()

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.hash).digest()

    def step(self, message: bytes) -> tuple[bytes, bool] | str:
        """(server message, done) or an error string."""
        text = message.decode()
        if self.state == "first":
            if not text.startswith("n,,"):
                return "channel binding is not supported"
            bare = text[3:]
            attrs = dict(part.split("=", 1) for part in bare.split(","))
            user, client_nonce = attrs.get("n", ""), attrs.get("r", "")
            password = self.users.get(user)
            if password is None or not client_nonce:
                return "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM"
            salt = os.urandom(16)
            salted = hashlib.pbkdf2_hmac(self.hash().name, password.encode(), salt, ITERATIONS)
            client_key = self._hmac(salted, b"Client Key")
            self.stored_key = self._h(client_key)
            self.server_key = self._hmac(salted, b"Server Key")
            self.nonce = client_nonce + base64.b64encode(os.urandom(18)).decode()
            server_first = f"r={self.nonce},s={base64.b64encode(salt).decode()},i={ITERATIONS}"
            self.auth_message = bare + "," + server_first
            self.state = "final"
            return server_first.encode(), False
        if self.state == "final":
            without_proof, _, proof_part = text.rpartition(",p=")
            attrs = dict(part.split("=", 1) for part in without_proof.split(","))
            if attrs.get("r") != self.nonce:
                return "Invalid nonce"
            auth_message = (self.auth_message + "," + without_proof).encode()
            signature = self._hmac(self.stored_key, auth_message)
            proof = base64.b64decode(proof_part)
            client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=False))
            if len(proof) != len(signature) or not hmac.compare_digest(self._h(client_key), self.stored_key):
                return "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM"
            self.state = "done"
            server_signature = self._hmac(self.server_key, auth_message)
            return b"v=" + base64.b64encode(server_signature), True
        return "unexpected SCRAM message"


class SASLProxy(Relay):
    def __init__(
        self,
        *,
        listen_port: int,
        target_port: int,
        users: dict[str, str],
        mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(listen_port=listen_port, target_port=target_port, host=host)
        self.users = users
        self.mechanisms = mechanisms
        self.authenticated: list[tuple[str, str]] = []  # (mechanism, user)
        self.failures = 0

    @staticmethod
    async def _read_frame(reader: asyncio.StreamReader) -> bytes:
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        return await reader.readexactly(size)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        try:
            if await self._authenticate(reader, writer, up_reader, up_writer):
                await asyncio.gather(self.pump(reader, up_writer), self.pump(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            await self.close(writer, up_writer)
            if task is not None:
                self._tasks.discard(task)

    async def _authenticate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        mechanism: str | None = None
        scram: _Scram | None = None
        while True:
            request = await self._read_frame(reader)
            api_key, api_version, correlation_id = struct.unpack_from(">hhi", request)
            (client_len,) = struct.unpack_from(">h", request, 8)
            body = request[10 + max(client_len, 0) :]
            if api_key == API_VERSIONS:  # allowed before authentication: relay to the broker
                up_writer.write(struct.pack(">i", len(request)) + request)
                await up_writer.drain()
                response = await self._read_frame(up_reader)
                writer.write(struct.pack(">i", len(response)) + response)
                await writer.drain()
                continue
            if api_key == API_SASL_HANDSHAKE:
                (n,) = struct.unpack_from(">h", body)
                asked = body[2 : 2 + n].decode()
                ok = asked in self.mechanisms
                mechanism = asked if ok else None
                scram = _Scram(asked, self.users) if ok and asked.startswith("SCRAM") else None
                listed = struct.pack(">i", len(self.mechanisms)) + b"".join(
                    _string(m) for m in self.mechanisms
                )
                code = 0 if ok else UNSUPPORTED_SASL_MECHANISM
                writer.write(_frame(correlation_id, struct.pack(">h", code) + listed))
                await writer.drain()
                if not ok:
                    return False
                continue
            if api_key == API_SASL_AUTHENTICATE and mechanism is not None:
                (n,) = struct.unpack_from(">i", body)
                token = body[4 : 4 + n]
                error: str | None = None
                reply, done = b"", True
                if mechanism == "PLAIN":
                    parts = token.split(b"\0")
                    user = parts[1].decode() if len(parts) == 3 else ""
                    if len(parts) != 3 or self.users.get(user) != parts[2].decode():
                        error = "Authentication failed: Invalid username or password"
                elif scram is not None:
                    result = scram.step(token)
                    if isinstance(result, str):
                        error = result
                    else:
                        reply, done = result
                code = SASL_AUTHENTICATION_FAILED if error else 0
                tail = struct.pack(">q", 0) if api_version >= 1 else b""
                payload = (
                    struct.pack(">h", code) + _string(error) + struct.pack(">i", len(reply)) + reply + tail
                )
                writer.write(_frame(correlation_id, payload))
                await writer.drain()
                if error:
                    self.failures += 1
                    return False
                if done:
                    user = token.split(b"\0")[1].decode() if mechanism == "PLAIN" else "scram"
                    self.authenticated.append((mechanism, user))
                    return True
                continue
            # Any other request before authentication: brokers drop the connection.
            return False
