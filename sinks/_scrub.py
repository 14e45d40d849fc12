"""Our own credentials out of text a destination sent back (gateways echo what they refused)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import yarl

from eventrouter.options import redact_url

__all__ = ["credentials", "scrub"]

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


def credentials(
    secrets: Iterable[str | None] = (), *, sent: Iterable[str] = (), urls: Iterable[str] = ()
) -> list[str]:
    """Our credentials, for ``scrub``: built once per sink. ``secrets`` (passwords, tokens, keys, the
    token of an Authorization header as sent) whatever their length; ``sent``, header values as sent
    (the whole Authorization value, custom headers) with their words of 8+ characters; ``urls``, their
    user info (also as yarl writes it), query values and the long path segments ``redact_url`` hides.
    Of ``sent`` and ``urls`` only values of 4+ characters but the URL password: shorter ones are no
    secret and would only garble the excerpt (``X-Version: 1`` would hide every "1")."""
    values = [s for s in secrets if s]
    named = [v for v in sent if v]
    named += [word for v in named for word in v.split() if len(word) >= 8]
    for url in urls:
        parts = urlsplit(url)
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        users, passwords = _as_yarl_writes(url, user, password)
        values += [password, *passwords]
        named += [user, *users]
        named += [v for _, v in parse_qsl(parts.query)]
        shown = urlsplit(redact_url(url)).path.split("/")
        named += [unquote(seg) for seg, s in zip(parts.path.split("/"), shown, strict=False) if s == "***"]
    return list(dict.fromkeys([v for v in values if v] + [v for v in named if len(v) >= 4]))


def _as_yarl_writes(url: str, user: str, password: str) -> tuple[list[str], list[str]]:
    """The user names and passwords of ``url`` as aiohttp's errors quote them (yarl's ``raw_user``,
    ``raw_password``): yarl encodes some characters (space, ``@``, ``#``, non-ASCII) and keeps others
    (``! $ , ;``), a mix neither ``quote`` nor ``quote_plus`` writes. Both as yarl reads the URL given
    (its escapes normalised, not re-encoded) and as it encodes the decoded values: yarl's own
    quoting, not a guess at its safe set."""
    built: list[yarl.URL] = []
    with contextlib.suppress(ValueError, TypeError):  # not a URL yarl takes: aiohttp cannot quote it
        built.append(yarl.URL(url))
    with contextlib.suppress(ValueError, TypeError):
        built.append(yarl.URL.build(scheme="http", host="h", user=user or None, password=password or None))
    return [u.raw_user or "" for u in built], [u.raw_password or "" for u in built]
