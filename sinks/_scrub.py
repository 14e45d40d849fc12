"""Our own credentials out of text a destination sent back (gateways echo what they refused)."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = ["scrub"]

MIN_CUT = 4
"""A secret cut off at the end of an excerpt is masked from this many characters on: fewer say
nothing of it, and would mask any excerpt ending in a secret's first letter."""


def scrub(text: str, secrets: Iterable[str], *, partial: bool = False) -> str:
    """``text`` (an error answer, an exception) with every one of ``secrets`` replaced by ``****``,
    as written and URL-encoded; longest first, so a secret that contains another goes whole. With
    ``partial`` (``text`` was cut from something longer) a secret cut off at its end is masked too.
    Shared by every sink that quotes a destination's answer (the robots, the webhook)."""
    forms = sorted(
        {form for s in secrets if s for form in (s, quote(s, safe=""), quote_plus(s))}, key=len, reverse=True
    )
    for form in forms:
        text = text.replace(form, "****")
    if partial:
        for form in forms:
            cut = next(
                (n for n in range(min(len(form), len(text)), MIN_CUT - 1, -1) if text.endswith(form[:n])), 0
            )
            if cut:
                text = text[:-cut] + "****"
    return text
