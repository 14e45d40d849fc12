"""At most the start of an HTTP answer's body: what is quoted or parsed, never a front's whole page
(the source's error answers, and the sinks' answers: SLS, Loki, the robots)."""

from __future__ import annotations

import aiohttp

__all__ = ["read_prefix"]


async def read_prefix(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of an answer's body, and whether it had more (left unread: the caller
    closes the connection, it cannot be reused). Read whole, a proxy's 300 MB error page was held in
    memory, with its copies, at every retry."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:  # one byte past the limit tells a body of exactly ``limit`` from a longer one
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:limit], size > limit
