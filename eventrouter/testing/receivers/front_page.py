"""A front's web page answered instead of a service's answer (a proxy's 502, a misrouted ingress serving
a file), streamed, recording how much of it the client took: what proves a sink reads a bounded prefix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

__all__ = ["FrontPage", "answer_page"]


@dataclass
class FrontPage:
    """A front's web page answered instead of the service's answer (``fail_next(page=…)``)."""

    status: int
    size: int
    written: int = 0
    """Bytes the client took before it went away (``size`` when it read the page whole); kernel
    buffers hold a few MB of what it never read."""
    done: bool = False
    """The answer ended: written whole, or the client went away."""


_PAGE_HEAD = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><pre>"
_PAGE_CHUNK = 1 << 20


async def answer_page(
    request: web.Request, page: FrontPage, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Stream ``page`` (an HTML page of ``page.size`` bytes) until written or the client goes away."""
    response = web.StreamResponse(
        status=page.status,
        headers={"Content-Type": "text/html", "Content-Length": str(page.size), **headers},
    )
    rest = b"x" * _PAGE_CHUNK
    first = (_PAGE_HEAD + rest)[:_PAGE_CHUNK]
    try:
        await response.prepare(request)
        while page.written < page.size:
            part = min(page.size - page.written, _PAGE_CHUNK)
            await response.write((first if page.written == 0 else rest)[:part])
            page.written += part
        await response.write_eof()
    except ConnectionError:  # the client read what it wanted and closed the connection
        pass
    finally:
        page.done = True
    return response
