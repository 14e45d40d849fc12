"""What often stands between a pod and a robot API: an authenticating gateway or egress proxy, on loopback.

    async with DingTalkReceiver() as robot, AuthGateway(upstream_port=robot.port, password="pw") as gw:
        gw.url_for(robot.url)   # the robot's URL through the gateway: http://gw:pw@127.0.0.1:P/robot/send?…
        gw.proxy_url            # as a forward proxy: http://gw:pw@127.0.0.1:P

It answers three kinds of request, as such servers see them:

- origin-form (``POST /robot/send?… HTTP/1.1``): a reverse gateway in front of ``upstream_port``.
  ``Authorization: Basic`` must carry the credentials (else 401 with ``WWW-Authenticate``); the
  request is then relayed to the upstream without that header, and its answer back;
- absolute-form (``POST http://127.0.0.1:P/robot/send?… HTTP/1.1``): a forward proxy for plain http.
  ``Proxy-Authorization: Basic`` must carry them (else 407 with ``Proxy-Authenticate``); relayed to
  that address without the header;
- ``CONNECT 127.0.0.1:P``: a forward proxy's tunnel (https): the same check (407), then
  ``200 Connection established`` and bytes both ways.

``username`` and ``password`` may be changed at any time (a rotation: the old ones stop at once);
``username=None`` asks for no credentials. ``deny`` (a status such as 403) answers every request
with it, authenticated or not: a gateway policy refusing. A refusal's page quotes the request target,
as squid's error pages do (a client must not repeat it in its logs). Only loopback targets are relayed
(this is no open proxy); one request per connection (answers say ``Connection: close``); request
bodies must come with ``Content-Length``. Every request is kept in ``requests``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from eventrouter.testing.receivers._relay import Relay

__all__ = ["AuthGateway", "GatewayRequest"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade"}


@dataclass
class GatewayRequest:
    kind: Literal["gateway", "forward", "connect"]
    method: str
    target: str
    authorized: bool
    """Whether the request carried the credentials asked for (or none were asked for)."""
    status: int = 0
    """What the gateway itself answered (200 for a tunnel), or 0 when the upstream's answer was relayed."""


class AuthGateway(Relay):
    def __init__(
        self,
        *,
        upstream_port: int = 0,
        username: str | None = "gw",
        password: str = "gw-password",
        deny: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(listen_port=0, target_port=upstream_port, host=host)
        self.port = 0
        self.username = username
        self.password = password
        self.deny = deny
        self.requests: list[GatewayRequest] = []

    async def __aenter__(self) -> AuthGateway:
        await super().__aenter__()
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    # ------------------------------------------------------------------ addresses

    def _userinfo(self) -> str:
        if self.username is None:
            return ""
        return f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"

    @property
    def proxy_url(self) -> str:
        """This gateway as a forward proxy, with its current credentials."""
        return f"http://{self._userinfo()}{self.host}:{self.port}"

    def url_for(self, url: str) -> str:
        """``url`` (on the upstream) reached through this gateway, with its current credentials."""
        parts = urlsplit(url)
        return urlunsplit(parts._replace(netloc=f"{self._userinfo()}{self.host}:{self.port}"))

    def refusals(self) -> list[int]:
        return [r.status for r in self.requests if r.status not in (0, 200)]

    # ------------------------------------------------------------------ handling

    def _authorized(self, value: str | None) -> bool:
        if self.username is None:
            return True
        scheme, _, token = (value or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            got = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        want = f"{self.username}:{self.password}".encode()
        return hmac.compare_digest(got, want)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target = [*lines[0].split(" "), "", ""][:2]
            headers: list[tuple[str, str]] = []
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers.append((name.strip(), value.strip()))
            named = {name.lower(): value for name, value in headers}
            if method == "CONNECT":
                kind: Literal["gateway", "forward", "connect"] = "connect"
                host, _, port = target.rpartition(":")
            elif target.startswith(("http://", "https://")):
                kind = "forward"
                parts = urlsplit(target)
                host, port = parts.hostname or "", str(parts.port or 80)
                target_path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
            else:
                kind = "gateway"
                host, port, target_path = self.host, str(self.target_port), target
            body = b""
            if kind != "connect":
                try:
                    body = await reader.readexactly(int(named.get("content-length", "0") or 0))
                except (asyncio.IncompleteReadError, ValueError, OSError):
                    return
            credentials = named.get("authorization" if kind == "gateway" else "proxy-authorization")
            rec = GatewayRequest(kind, method, target, self._authorized(credentials))
            self.requests.append(rec)
            if self.deny is not None:
                await self._answer(writer, rec, self.deny)
                return
            if not rec.authorized:
                await self._answer(writer, rec, 401 if kind == "gateway" else 407)
                return
            if host.strip("[]") not in _LOOPBACK or not port.isdigit():
                await self._answer(writer, rec, 403)
                return
            try:
                up_reader, upstream = await asyncio.open_connection(host.strip("[]"), int(port))
            except OSError:
                await self._answer(writer, rec, 502)
                return
            if kind == "connect":
                rec.status = 200
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await self.splice(reader, writer, up_reader, upstream)
                return
            drop = _HOP_BY_HOP | ({"authorization"} if kind == "gateway" else set())
            out = [f"{method} {target_path} HTTP/1.1"]
            out += [f"{name}: {value}" for name, value in headers if name.lower() not in drop]
            out.append("Connection: close")
            upstream.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
            await upstream.drain()
            await self._relay_answer(up_reader, writer)
        finally:
            await self.close(*(w for w in (writer, upstream) if w is not None))

    async def _relay_answer(self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The upstream's answer, saying ``Connection: close`` (this connection ends with it)."""
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            head = (await up_reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            kept = [head[0]] + [
                line
                for line in head[1:]
                if line and line.partition(":")[0].strip().lower() not in _HOP_BY_HOP
            ]
            writer.write(("\r\n".join([*kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))
            await self.pump(up_reader, writer)

    async def _answer(self, writer: asyncio.StreamWriter, rec: GatewayRequest, status: int) -> None:
        rec.status = status
        phrase = HTTPStatus(status).phrase
        # As squid's error pages do: the refused target quoted (with whatever its query holds).
        page = (
            f"<html><body><h1>{status} {phrase}</h1><p>{rec.method} {rec.target}</p></body></html>".encode()
        )
        extra = ""
        if status == 401:
            extra = 'WWW-Authenticate: Basic realm="gateway"\r\n'
        elif status == 407:
            extra = 'Proxy-Authenticate: Basic realm="proxy"\r\n'
        writer.write(
            f"HTTP/1.1 {status} {phrase}\r\n{extra}Content-Type: text/html\r\n"
            f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            + (b"" if rec.method == "HEAD" else page)
        )
        with contextlib.suppress(OSError):
            await writer.drain()
