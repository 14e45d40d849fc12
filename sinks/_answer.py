"""Reading a sink's HTTP answers: at most what is quoted or parsed, never a front's whole page."""

from __future__ import annotations

import aiohttp


async def read_prefix(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of an answer's body, and whether it had more (left unread: the
    connection is then closed, not reused). Read whole, a proxy's 256 MB error page was held, with its
    copies, on every retry."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:  # one byte past the limit tells a body of exactly ``limit`` from a longer one
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:limit], size > limit
