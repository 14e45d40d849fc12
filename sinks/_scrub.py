"""Our own credentials out of text a destination sent back (gateways echo what they refused). The generic
part (``scrub``, ``credentials``) is the engine's, in ``eventrouter/scrub.py``: it scrubs every sink's
errors with it too."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from eventrouter.options import redact_url, shown_address
from eventrouter.scrub import credentials, scrub

__all__ = ["credentials", "scrub", "shown_location"]


def shown_location(location: str, secrets: Iterable[str] = ()) -> str:
    """Where a redirect points (a non-empty Location), as reasons and logs may show it: redacted as
    every URL (no user info, query values or token-like path segments) and ``secrets`` scrubbed; only
    its address when an ``@`` is left past it (user info with a raw ``/`` in the password, which
    ``urlsplit`` reads as a path). Raises ValueError when it cannot be parsed. Shared by the sinks
    that never follow a redirect (the robots, the webhook, Loki, SLS)."""
    parts = urlsplit(location)
    shown = (
        shown_address(location) if "@" in parts.path + parts.query + parts.fragment else redact_url(location)
    )
    return scrub(shown, secrets)[:200]
