"""Answers whose body a client cannot read, as a front or gateway before a sink's server may send
them: the status line and headers are in, the body never comes whole (``answer_unreadable``); and
answers whose body comes whole but late (``answer_late``)."""

from __future__ import annotations

import asyncio
from typing import Literal

from aiohttp import web

__all__ = ["Unreadable", "answer_late", "answer_unreadable"]

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
