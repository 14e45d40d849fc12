"""Credentials out of text: what a destination or a sink's exception says, before the router logs or
writes it (gateways echo what they refused; a plugin's library quotes the URL holding its token).

Generic: the built-in sinks scrub the answers they quote with it (``sinks/_scrub.py``), and the engine
scrubs what it prints about any sink's errors with the secrets of that sink's options
(``option_secrets``).
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

import yarl
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from eventrouter.options import field_keys, redact_url, resolve_secret

__all__ = ["MIN_CUT", "Scrubber", "credentials", "given_secrets", "option_secrets", "scrub"]

MIN_CUT = 4
"""A secret cut off at the end of an excerpt is masked from this many characters on: fewer say
nothing of it, and would mask any excerpt ending in a secret's first letter."""


def scrub(text: str, secrets: Iterable[str], *, partial: bool = False) -> str:
    """``text`` (an error answer, an exception) with every one of ``secrets`` replaced by ``****``,
    as written and URL-encoded; longest first, so a secret that contains another goes whole. With
    ``partial`` (``text`` was cut from something longer) a secret cut off at its end is masked too,
    also when the cut split its next character (a U+FFFD last). Shared by every sink that quotes a
    destination's answer (the robots, the webhook)."""
    forms = _forms(secrets)
    for form in forms:
        text = text.replace(form, "****")
    if partial:
        for form in forms:
            # A U+FFFD last (the excerpt cut a character in two) may stand for the secret's next one.
            whole = text.removesuffix("\ufffd")
            cut = next(
                (n for n in range(min(len(form), len(whole)), MIN_CUT - 1, -1) if whole.endswith(form[:n])), 0
            )
            if cut:
                text = whole[:-cut] + "****"
    return text


def _forms(secrets: Iterable[str]) -> list[str]:
    """``secrets`` as written and URL-encoded, longest first."""
    return sorted(
        {form for s in secrets if s for form in (s, quote(s, safe=""), quote_plus(s))}, key=len, reverse=True
    )


class Scrubber:
    """``scrub`` compiled for one set of secrets (built once per sink's options: ``scrub`` builds its
    forms on every call, ~20 us for a reason the engine masks per rejected occurrence). One pass of
    a regex finds every place a form starts (overlapping ones too, longest form first); the union of
    those spans is masked, so it hides at least what ``scrub`` hides (two overlapping secrets leave
    no piece of either), and a run of overlapping ones is one ``****``. False without secrets."""

    __slots__ = ("_find", "forms")

    def __init__(self, secrets: Iterable[str]) -> None:
        self.forms = _forms(secrets)
        self._find = re.compile(f"(?=({'|'.join(map(re.escape, self.forms))}))") if self.forms else None

    def __bool__(self) -> bool:
        return self._find is not None

    def __call__(self, text: str) -> str:
        if self._find is None:
            return text
        spans: list[list[int]] = []
        for found in self._find.finditer(text):
            start, end = found.start(), found.end(1)
            if spans and start < spans[-1][1]:  # overlaps the last: one span
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        if not spans:
            return text
        parts: list[str] = []
        kept = 0
        for start, end in spans:
            parts += (text[kept:start], "****")
            kept = end
        parts.append(text[kept:])
        return "".join(parts)


def credentials(
    secrets: Iterable[str | None] = (), *, sent: Iterable[str] = (), urls: Iterable[str] = ()
) -> list[str]:
    """Our credentials, for ``scrub``: built once per sink. ``secrets`` (passwords, tokens, keys, the
    token of an Authorization header as sent) whatever their length; ``sent``, header values as sent
    (the whole Authorization value, custom headers) with their words of 8+ characters; ``urls``, their
    user info, query values and the long path segments ``redact_url`` hides, each also as yarl writes
    it (aiohttp's errors quote the URL so). Of ``sent`` and ``urls`` only values of 4+ characters but
    the URL password: shorter ones are no secret and would only garble the excerpt (``X-Version: 1``
    would hide every "1"). Each also JSON- and HTML-escaped, as an error body may quote it."""
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
    return list(dict.fromkeys(form for s in found for form in (s, *_json_escaped(s), *_html_escaped(s))))


def _json_escaped(secret: str) -> set[str]:
    r"""``secret`` as a JSON encoder may quote it in an error body (a gateway echoing what it
    refused): non-ASCII as ``\u00e4`` (Python's ``json``) or ``\u00E4`` (Java, .NET), ``/`` as
    ``\/`` (PHP's ``json_encode``), quotes and backslashes escaped. None equal to ``secret``."""
    forms = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms |= {_UNICODE_ESCAPE.sub(lambda m: m[0].upper().replace("\\U", "\\u"), f) for f in forms}
    forms |= {f.replace("/", "\\/") for f in forms}
    return forms - {secret}


_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-f]{4}")


def _html_escaped(secret: str) -> set[str]:
    """``secret`` as an HTML error page (a gateway's login or denial page) writes it: ``& < >`` as
    entities, quotes as Python (``&quot;`` ``&#x27;``) or Go (``&#34;`` ``&#39;``) writes them, or
    left in text. None equal to ``secret``: a token (base64url, hex) has none of these characters."""
    text = html.escape(secret, quote=False)
    forms = {text, html.escape(secret), text.replace('"', "&#34;").replace("'", "&#39;")}
    return forms - {secret}


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


_CREDENTIAL_NAME = re.compile(
    r"token|secret|passw|credential|auth|api_?key|access_?key|private_?key|signing|cookie|session",
    re.IGNORECASE,
)
"""An option (or a mapping key: a header) so named holds a credential even as plain text (a plugin's
``api_key: str``, ``headers: {Authorization: Bearer …}``)."""


def option_secrets(options: BaseModel) -> list[str]:
    """The secret values of a sink's options, in the forms ``scrub`` looks for: every ``SecretStr``
    (nested in models, mappings and lists too), plain text under a credential's name, and what the
    ``url`` option hides (``credentials``). Each also as yarl writes it into a URL's path or query,
    as an HTTP library's error quotes the URL a plugin built with it (a bot token in the path)."""
    secrets: list[str] = []
    sent: list[str] = []

    def walk(value: object, named: bool, keyed: bool = False) -> None:
        if isinstance(value, SecretStr):
            # A mapping's values (headers) as sent: one of 1-3 characters is no secret and would
            # garble every excerpt ("X-Team: 1" hid every "1"); a password or token whatever its length.
            (sent if keyed else secrets).append(value.get_secret_value())
        elif isinstance(value, str):
            if named:
                sent.append(value)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name, None), named or bool(_CREDENTIAL_NAME.search(name)))
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, named or (isinstance(key, str) and bool(_CREDENTIAL_NAME.search(key))), True)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in value:
                walk(item, named, keyed)

    walk(options, False)
    url = getattr(options, "url", "")
    # Only a network address hides tokens in its path: a file sink's ``file:/var/log/…`` is a path
    # whose long folder names are no secret, and masking them hid the file at fault.
    is_address = isinstance(url, str) and bool(urlsplit(url).netloc)
    found = credentials(secrets, sent=sent, urls=[url] if is_address else [])
    return list(dict.fromkeys([*found, *(form for s in found for form in _in_urls(s))]))


def given_secrets(model: type[BaseModel], values: Mapping[str, Any]) -> list[str]:
    """The secrets in ``values``, options given to ``model`` and not yet validated (a validator's
    error may quote them: a plugin's SDK client made at validation quotes the token it was given), in
    the forms ``option_secrets`` gives: each value of a ``SecretStr`` option (``env:``/``file:``
    references read, ones that cannot be read skipped), plain text under a credential's name, and
    what the ``url`` option hides."""
    secrets: list[str] = []
    sent: list[str] = []
    for name, info in model.model_fields.items():
        secret = "SecretStr" in str(info.annotation)
        if not secret and not _CREDENTIAL_NAME.search(name):
            continue
        for key in _names(name, info) & values.keys():
            for text in _texts(values[key]):
                (secrets if secret else sent).append(text)
                # A header given as ``Name=Value`` (or ``Name: Value``): its value alone too.
                sent.extend(rest.strip() for rest in re.split(r"[=:]", text, maxsplit=1)[1:])
    url = values.get("url", "")
    is_address = isinstance(url, str) and bool(urlsplit(url).netloc)
    found = credentials(secrets, sent=sent, urls=[url] if is_address else [])
    return list(dict.fromkeys([*found, *(form for s in found for form in _in_urls(s))]))


def _names(name: str, info: FieldInfo) -> set[str]:
    """The keys an option may be given under: its name and aliases."""
    return field_keys(name, info) | ({info.alias} if info.alias else set())


def _texts(value: object) -> list[str]:
    """The texts in an option's value as given (a list of repeated keys, a mapping of headers), with
    ``env:``/``file:`` references read."""
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    if isinstance(value, str):
        if not value.startswith(("env:", "file:")):
            return [value]
        try:
            read = resolve_secret(value)
        except Exception:  # unset, unreadable: nothing to mask, and its error says so without it
            return []
        return _texts(read) if read != value else []
    if isinstance(value, Mapping):
        return [text for item in value.values() for text in _texts(item)]
    if isinstance(value, list | tuple | set | frozenset):
        return [text for item in value for text in _texts(item)]
    return []


def _in_urls(secret: str) -> list[str]:
    """``secret`` as yarl encodes it into a path segment and a query value (neither ``quote`` nor
    ``quote_plus`` writes those: yarl keeps ``:``, ``=`` and ``+`` in a path)."""
    forms = []
    with contextlib.suppress(ValueError, TypeError):
        forms.append(yarl.URL.build(scheme="http", host="h", path="/" + secret).raw_path[1:])
    with contextlib.suppress(ValueError, TypeError):
        forms.append(yarl.URL.build(scheme="http", host="h", query={"k": secret}).raw_query_string[2:])
    return [f for f in forms if f and f != secret]
