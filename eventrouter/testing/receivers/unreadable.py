"""Answers whose body a client cannot read, as a front or gateway before a sink's server may send
them: the status line and headers are in, the body never comes whole (``answer_unreadable``);
answers whose body comes whole but late (``answer_late``); and answers labelled with a charset no
text can be decoded in (``mislabelled``)."""

from __future__ import annotations

import asyncio
from typing import Literal

from aiohttp import web

__all__ = ["Unreadable", "answer_late", "answer_unreadable", "mislabelled"]

Unreadable = Literal["stall", "cut", "gzip"]
"""How an answer's body cannot be read (``answer_unreadable``)."""


async def answer_unreadable(
    request: web.Request, answer: web.Response, how: Unreadable, release: asyncio.Event
) -> web.StreamResponse:
    """``answer`` with a body the client cannot read: labelled ``Content-Encoding: gzip`` but plain
    (``gzip``); or its status line and headers, a body promised (``Content-Length``, at least one
    byte) and none of it sent, then held until ``release`` is set (``stall``: a proxy or slow app
    that flushed the head) or the connection dropped (``cut``). Used by the receivers of the robots
    and SLS; the webhook receiver's ``body_fault`` is the same answer."""
    if how == "gzip":
        answer.headers["Content-Encoding"] = "gzip"
        return answer
    size = len(answer.body) if isinstance(answer.body, bytes) else 0
    headers = {**answer.headers, "Content-Length": str(max(size, 1))}
    response = web.StreamResponse(status=answer.status, headers=headers)
    await response.prepare(request)  # a StreamResponse sends its head at once
    if how == "stall":
        await release.wait()
    if request.transport is not None:
        request.transport.abort()
    return response


async def answer_late(request: web.Request, answer: web.Response, after: float) -> web.StreamResponse:
    """``answer`` whole, its status line and headers at once and its body (``Content-Length``
    framed, in one write) ``after`` seconds later, the connection kept alive: a slow egress proxy or
    a loaded API that flushes the head first. A client that waits for the body reads it."""
    body = answer.body if isinstance(answer.body, bytes) else b""
    headers = {**answer.headers, "Content-Length": str(len(body))}
    response = web.StreamResponse(status=answer.status, headers=headers)
    await response.prepare(request)  # a StreamResponse sends its head at once
    await asyncio.sleep(after)
    await response.write(body)
    await response.write_eof()
    return response


def mislabelled(answer: web.Response, charset: str) -> web.Response:
    """``answer``, its body unchanged, labelled ``Content-Type: <its type>; charset=<charset>``: a
    front's or a broken proxy's label, which is the peer's to choose. Python knows ``base64``,
    ``rot13``, ``hex`` or ``zlib`` as codecs that are no text encodings, and ``idna`` or
    ``undefined`` as text ones that cannot decode with ``errors="replace"``: a client decoding by
    the label raises."""
    kind = answer.content_type if answer.body else "text/plain"
    answer.headers["Content-Type"] = f"{kind}; charset={charset}"
    return answer
