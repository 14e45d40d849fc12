"""Our own credentials out of text a destination sent back (gateways echo what they refused)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import yarl

from eventrouter.options import redact_url, shown_address

__all__ = ["credentials", "scrub", "shown_location"]

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
    user info, query values and the long path segments ``redact_url`` hides, each also as yarl writes
    it (aiohttp's errors quote the URL so). Of ``sent`` and ``urls`` only values of 4+ characters but
    the URL password: shorter ones are no secret and would only garble the excerpt (``X-Version: 1``
    would hide every "1"). Each also JSON-escaped, as an error body may quote it."""
    values = [s for s in secrets if s]
    named = [v for v in sent if v]
    named += [word for v in named for word in v.split() if len(word) >= 8]
    for url in urls:
        parts = urlsplit(url)
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        users, passwords = _as_yarl_writes(url, user, password)
        values += [password, *passwords]
        named += [user, *users]
        queries = [v for _, v in parse_qsl(parts.query)]
        shown = urlsplit(redact_url(url)).path.split("/")
        tokens = [unquote(seg) for seg, s in zip(parts.path.split("/"), shown, strict=False) if s == "***"]
        named += [*queries, *tokens, *_as_yarl_quotes(url, queries, tokens)]
    found = dict.fromkeys([v for v in values if v] + [v for v in named if len(v) >= 4])
    return list(dict.fromkeys(form for s in found for form in (s, *_json_escaped(s))))


def _json_escaped(secret: str) -> set[str]:
    r"""``secret`` as a JSON encoder may quote it in an error body (a gateway echoing what it
    refused): non-ASCII as ``\u00e4`` (Python's ``json``) or ``\u00E4`` (Java, .NET), ``/`` as
    ``\/`` (PHP's ``json_encode``), quotes and backslashes escaped. None equal to ``secret``."""
    forms = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms |= {_UNICODE_ESCAPE.sub(lambda m: m[0].upper().replace("\\U", "\\u"), f) for f in forms}
    forms |= {f.replace("/", "\\/") for f in forms}
    return forms - {secret}


_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-f]{4}")


def _as_yarl_quotes(url: str, queries: list[str], tokens: list[str]) -> list[str]:
    """The query values and hidden path segments (``tokens``, decoded) of ``url`` as aiohttp sends
    the URL and its errors quote it: yarl decodes escapes it need not keep (``%2f`` in a query as
    ``/``, ``%7E`` as ``~``, ``%3D`` in a path as ``=``), keeps others as given (``%20``, ``%2B``)
    and encodes non-ASCII, a mix of the decoded value and ``quote`` of it. As for the user info,
    both the URL as yarl reads it and the decoded values as yarl encodes them."""
    try:
        read = yarl.URL(url)
    except (ValueError, TypeError):  # not a URL yarl takes: aiohttp cannot quote it
        return []
    found = [pair.partition("=")[2] for pair in read.raw_query_string.split("&")]
    # yarl drops "." and ".." segments: a hidden one is known by its place or by what it decodes to.
    hidden = set(tokens)
    raw_shown = zip(read.raw_path.split("/"), urlsplit(redact_url(str(read))).path.split("/"), strict=False)
    found += [raw for raw, shown in raw_shown if shown == "***" or unquote(raw) in hidden]
    for value in queries:
        with contextlib.suppress(ValueError, TypeError):
            found.append(yarl.URL.build(scheme="http", host="h", query={"k": value}).raw_query_string[2:])
    for token in tokens:
        with contextlib.suppress(ValueError, TypeError):
            found.append(yarl.URL.build(scheme="http", host="h", path="/" + token).raw_path[1:])
    return found


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
