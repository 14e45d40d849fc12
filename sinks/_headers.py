"""Extra HTTP headers given as an option (the webhook's and Loki's ``headers``), parsed and checked
alike: each value is a credential (a literal, ``env:NAME`` or ``file:/path``, never echoed)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator, SecretStr

from eventrouter.options import resolve_secret, unexpanded_reference

__all__ = ["HEADERS_HELP", "Headers", "check_headers", "headers_input"]

HEADERS_HELP = (
    "Extra HTTP headers, repeatable `headers=Name:Value` (or Name=Value, or a YAML map); a value may "
    "be env:NAME or file:/path, as may the whole Name:Value. Values are kept secret."
)

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_WHOLE_REFERENCE = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|file:/\S*")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""Characters an HTTP header value cannot carry (a tab it can): aiohttp refuses a CR or LF (a header
injection), so every request would fail and be retried for ever."""


def headers_input(value: Any) -> Any:
    """``Name:Value`` (also kube-eventer's ``Name=Value``), a list of those, or a YAML mapping, as a
    mapping whose values the ``Secret`` type then reads (``X-Token:env:TOKEN``). An entry that is a
    reference as a whole (``env:NAME``, ``file:/path``) holds ``Name:Value`` (Loki's first form).

    Malformed entries are kept under a descriptive (invalid) name and refused by ``check_headers``:
    a pydantic error would print the input, and header values are often credentials."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Mapping):
        mapped: dict[str, Any] = {}
        for n, (key, item) in enumerate(value.items(), 1):
            name = str(key).strip()
            if not _HEADER_NAME.fullmatch(name):
                # A YAML flow `{Authorization:Bearer T}` (no space after the colon) is one key
                # holding the credential, its value null: never echoed, as a malformed entry is not.
                name = _shown_key(n, name)
                item = "" if item is None else item
            mapped[name] = item.strip() if isinstance(item, str) else item
        return mapped
    if isinstance(value, list | tuple):
        result: dict[str, Any] = {}
        for n, entry in enumerate(value, 1):
            text = entry if isinstance(entry, str) else str(entry)
            where = ""
            if _WHOLE_REFERENCE.fullmatch(text.strip()):
                where = f" ({text.strip()})"  # a reference names no secret
                text = resolve_secret(text.strip())
            cut = min((i for i in (text.find(":"), text.find("=")) if i > 0), default=-1)
            name = text[:cut].strip() if cut > 0 else ""
            if not _HEADER_NAME.fullmatch(name):
                # Not Name:Value (e.g. "Authorization Basic dXNl...==" cut at its base64 padding):
                # never echo it, the text is likely a credential.
                result[f"<entry #{n}{where} is not Name:Value>"] = text
            elif where:
                # Read already: a value that itself reads env:X is not read again.
                result[name] = SecretStr(text[cut + 1 :].strip())
            else:
                result[name] = text[cut + 1 :].strip()
        return result
    return value


def _shown_key(n: int, key: str) -> str:
    """A mapping key that is no header's name, as messages show it: its part before a ``:`` or ``=``
    only when that part is a header's name (the rest may be a credential)."""
    cut = re.search(r"[:=\s]", key)
    if cut is None or cut.group(0) not in ":=" or not _HEADER_NAME.fullmatch(key[: cut.start()]):
        return f"<key #{n} is not a header name>"
    flow = cut.group(0) == ":" and not key[cut.end() : cut.end() + 1].isspace()  # {Name:Value}
    hint = ": YAML needs a space after the colon" if flow else ""
    return f"<key #{n} {key[: cut.start()]}{cut.group(0)}… (the rest not shown) is not a header name{hint}>"


def header_value(value: Any) -> Any:
    """A header's value as ``Secret`` reads it, but an empty one is kept (a header may be empty and is
    no credential by itself); one holding an unexpanded ``${NAME}`` (a kubernetes-event-exporter
    config moved over as written) is refused: its text was sent as the credential."""
    literal = isinstance(value, str) and not value.startswith(("env:", "file:"))
    if literal and (problem := unexpanded_reference(value)):
        raise ValueError(problem)
    return resolve_secret(value)


Headers = Annotated[
    dict[str, Annotated[SecretStr, BeforeValidator(header_value)]], BeforeValidator(headers_input)
]
"""The ``headers`` option: header name → value (a credential, read from env:/file: when so given)."""


def check_headers(headers: Mapping[str, SecretStr], *, reserved: Collection[str] = ()) -> None:
    """Raise ``ValueError`` for a name that is not an HTTP token, one in ``reserved`` (lower case:
    set by the sink), or a value no HTTP header can carry (a line break, another control character).
    The message names the header, never its value. Called when the options are validated, so that a
    bad header is a configuration error (exit 2), not a sink that fails every request."""
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if name.lower() in reserved:
            raise ValueError(f"header {name} is set by the sink and cannot be overridden")
        text = value.get_secret_value()
        if any(c in text for c in "\r\n"):
            raise ValueError(f"the value of {name!r} contains a line break")
        if _CONTROL.search(text):
            raise ValueError(f"the value of {name!r} contains a control character")
