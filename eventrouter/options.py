"""Option models shared by every sink: the sink's own base model, secrets, filters and engine knobs.

A sink is configured by one flat set of keys, the same in a ``--sink=TYPE:URL?k=v`` flag and in a
YAML ``sinks:`` entry. Filter keys and pipeline keys are common to all sinks; every other key
belongs to the sink's own ``options_model``.
"""

from __future__ import annotations

import fnmatch
import os
import re
import ssl
import warnings
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin
from urllib.parse import SplitResult, parse_qsl, urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

__all__ = [
    "FilePath",
    "FilterOptions",
    "OptionError",
    "PipelineOptions",
    "Secret",
    "SinkOptions",
    "check_tls_files",
    "file_options",
    "http_url",
    "name_matches",
    "readable_file",
    "resolve_secret",
    "safe_name",
    "secret_input",
    "shown_address",
    "split_list",
    "unexpanded_reference",
    "userinfo_hint",
]


def resolve_secret(value: Any) -> Any:
    """``env:NAME`` reads an environment variable, ``file:/path`` a file (trailing newlines stripped
    from both: a Secret made with ``echo token | base64`` holds one, in a file or through secretKeyRef).

    Lets credentials come from Kubernetes Secrets mounted as env or files instead of plain flags.
    """
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, str):
        if value.startswith("env:"):
            name = value[4:]
            if name not in os.environ:
                raise ValueError(f"environment variable {name!r} is not set")
            text = os.environ[name].rstrip("\r\n")
            if not text.strip():
                # As good as unset: Loki sent "Bearer " and retried "refused" for ever, DingTalk sent
                # unsigned requests, SLS fell back to another credential from the environment.
                raise ValueError(
                    f"environment variable {name!r} is set but empty: a credential is never empty"
                )
            return text
        if value.startswith("file:"):
            path = Path(value[5:])
            try:
                text = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"cannot read secret file {str(path)!r}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise ValueError(f"secret file {str(path)!r} is not UTF-8 text") from None
            if not text.strip():
                raise ValueError(f"secret file {str(path)!r} is empty: a credential is never empty")
            return text
    return value


def readable_file(value: Any) -> Any:
    """A file option (CA bundle, client certificate, template) that names a file this process can
    open: a missing or unreadable one is a configuration error at start, not a sink that fails to
    start again and again. ``None`` (not set) passes."""
    if value is not None:
        try:
            with open(value, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {str(value)!r}: {exc.strerror}") from None
    return value


FilePath = Annotated[str, AfterValidator(readable_file)]
"""A file option (``ca_file``, ``cert_file``, …): the file must be there and readable at start.
The router watches it: when it changes, the sink is rebuilt with it (``eventrouter.engine.reload``)."""


class OptionError(ValueError):
    """A ValueError about one option, named in ``option`` (the configuration layer's messages say
    ``option 'ca_file': …`` with it)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def check_tls_files(options: BaseModel) -> None:
    """OptionError unless the TLS files a sink's options name hold what OpenSSL will load at its
    start: ``ca_file`` a PEM bundle with a certificate, ``cert_file`` a certificate and, with
    ``key_file`` (or in ``cert_file``), its key, opened with ``key_password`` if the model has one.

    ``readable_file`` only opened them: a rotated Secret whose ``ca.crt`` held a key or text was
    validated, counted an ``applied`` reload, and the new instance, which replaced the working one,
    never started; given at start, it passed ``check --offline`` and was retried for ever. Applied by
    the configuration layer (``config.spec_for_class``: start, ``check``, every reload) to the
    ``FilePath`` fields of these names of any sink, a plugin's too. Never asks for a pass phrase on a
    terminal; the messages name the option and its path, never what the files hold (OpenSSL's
    reasons quote nothing of them)."""
    fields = set(file_options(type(options)))
    ca = getattr(options, "ca_file", None) if "ca_file" in fields else None
    if isinstance(ca, str) and ca:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise OptionError(
                "ca_file",
                f"ca_file {ca!r} holds no certificate OpenSSL can load ({_tls_reason(exc)}): it must be "
                "PEM, one or more -----BEGIN CERTIFICATE----- blocks",
            ) from None
    cert = getattr(options, "cert_file", None) if "cert_file" in fields else None
    if isinstance(cert, str) and cert:
        key = getattr(options, "key_file", None) if "key_file" in fields else None
        _check_client_certificate(options, cert, key if isinstance(key, str) and key else None)


class _PassPhraseAsked(Exception):
    """OpenSSL wants a pass phrase and none is configured."""


def _check_client_certificate(options: BaseModel, cert: str, key: str | None) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except (OSError, ssl.SSLError) as exc:
        raise OptionError(
            "cert_file",
            f"cert_file {cert!r} holds no certificate OpenSSL can load ({_tls_reason(exc)}): it must be PEM",
        ) from None
    where = "key_file" if key else "cert_file"  # the file holding the key
    has_phrase = "key_password" in type(options).model_fields
    phrase = getattr(options, "key_password", None) if has_phrase else None
    asked = False

    def pass_phrase() -> str:
        # Always given: without it OpenSSL asks on the terminal (`check` waits for someone to type).
        nonlocal asked
        asked = True
        if not isinstance(phrase, SecretStr):
            raise _PassPhraseAsked
        return phrase.get_secret_value()

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=pass_phrase)
    except _PassPhraseAsked:
        advice = (
            "give a decrypted key, or its pass phrase in key_password"
            if has_phrase
            else "give a decrypted key"
        )
        raise OptionError(
            where, f"{where} {key or cert!r} is encrypted (it wants a pass phrase): {advice}"
        ) from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise OptionError(
                where, f"{where} {key or cert!r} is not the key of the certificate in cert_file {cert!r}"
            ) from None
        if asked:  # encrypted, and the pass phrase given does not open it
            raise OptionError(
                "key_password", f"key_password does not decrypt {where} {key or cert!r}"
            ) from None
        raise OptionError(
            where,
            f"{where} {key or cert!r} holds no private key OpenSSL can load ({_tls_reason(exc)}): it must be PEM",
        ) from None


def _tls_reason(exc: Exception) -> str:
    """OpenSSL's reason, without the ``(_ssl.c:NNNN)`` of CPython's text."""
    if isinstance(exc, ssl.SSLError):
        return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc)) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def file_options(model: type[BaseModel]) -> list[str]:
    """The fields of ``model`` declared as ``FilePath`` (alone, optional or in a union)."""

    def is_file(annotation: Any) -> bool:
        if get_origin(annotation) is Annotated:
            args = get_args(annotation)
            if any(getattr(m, "func", None) is readable_file for m in args[1:]):
                return True
            return is_file(args[0])
        return any(is_file(arg) for arg in get_args(annotation))

    return [name for name, info in model.model_fields.items() if is_file(info.annotation)]


def http_url(value: str, *, option: str = "url", address_only: bool = False) -> SplitResult:
    """``value`` split, once it is an http(s) URL with a host and a valid port (and with
    ``address_only``, no path but ``/``, no query, no fragment: a proxy); otherwise a ValueError
    naming ``option`` and the URL without its credentials. Checked when the options are validated, a
    malformed address is a configuration error (exit 2) instead of a sink that fails to start again
    and again."""
    text = value.strip()
    if value != value.rstrip():
        # Checked stripped, it was used as given: yarl sent a webhook's batches to `/hook%20` (a
        # 404), Loki's constructor failed on a port `3100 `. (A leading one every parser drops.)
        raise ValueError(
            f"{option} {shown_address(text)!r} ends in white space (a quoted value, a flags file's line?): "
            "remove it, it would be sent as part of the address"
        )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number in 0-65535
    except ValueError as exc:
        # Never the parser's text: it quotes the "port" (or the netloc), which is the start of the
        # password when a raw / ? # ends the address inside it.
        raise ValueError(
            f"{option} {shown_address(text)!r}: {_parse_error(exc)}{userinfo_hint(text)}"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{option} must be http(s)://host[:port][/path], not {shown_address(text)!r}{userinfo_hint(text)}"
        )
    if address_only and (parts.path.strip("/") or parts.query or parts.fragment):
        raise ValueError(
            f"{option} must be http(s)://[user:password@]host[:port], without a path, query or "
            f"fragment, not {shown_address(text)!r}{userinfo_hint(text)}"
        )
    return parts


def _parse_error(exc: ValueError) -> str:
    """What ``urlsplit`` found wrong, in words of ours: its own text may quote the input."""
    said = str(exc)
    for known in ("Port out of range 0-65535", "Invalid IPv6 URL"):
        if said.startswith(known):
            return known
    if said.startswith("Port could not be cast"):
        return "Port could not be cast to an integer"
    if "NFKC" in said:
        return "its address has characters that read as / ? # @ or : once NFKC-normalised"
    return "not a valid URL"


def userinfo_hint(url: str) -> str:
    """Advice for a URL with an ``@`` past its address (the first ``/``, ``?`` or ``#`` after the
    scheme): likely user info whose password has one of them raw, which ends the address there (the
    rest of the password then reads as a port, a path or a fragment)."""
    if not _at_past_address(url):
        return ""
    return (
        "; if it holds user:password@, percent-encode any / ? # @ in them (%2F %3F %23 %40): "
        "raw, they end the address"
    )


_TOKENISH = re.compile(r"^.{16,}$")
"""A path segment long enough to be a secret. Any characters: requiring a digit missed 1.5 % of
Slack's (24 letters) and Telegram's ``bot123:AAH…`` has a ``:``; hiding a long plain name is harmless."""


def redact_url(url: str) -> str:
    """A URL as logs and messages may show it: ``https://user:pw@host/services/T0/B0/abcDEF123456789xyz
    ?token=abc&level=Warning#x`` → ``https://***@host/services/T0/B0/***?token=***&level=***``. No
    user info, no query values (Azure's ``code=``/``sig=``, a webhook's ``?key=``), no fragment, and no
    long token-like path segments (Slack, Discord and Teams keep the secret in the path)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.netloc.rpartition("@")
    netloc = f"***@{host[2]}" if host[1] else host[2]
    path = "/".join("***" if _TOKENISH.match(seg) else seg for seg in parts.path.split("/"))
    query = "&".join(f"{_masked_key(k)}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def _masked_key(key: str) -> str:
    """A query key up to its first ``:``, ``=`` or white space: past it, a credential typed
    ``password:S3cret`` (the ``Name:Value`` of a header) instead of ``password=S3cret``."""
    return re.sub(r"[:=\s].*", lambda m: m.group(0)[0] + "***", key, count=1, flags=re.DOTALL)


def shown_address(url: str) -> str:
    """scheme://host:port of a URL that may not parse, for messages: no user info (credentials), and
    no path or query (tokens hide there too). A URL with an ``@`` past its address shows none: either
    a password holds a raw ``/``, ``?`` or ``#`` (what precedes it, read as host:port, is the user
    name and the start of the password) or the path or query holds the ``@`` (what follows it is no
    host, and may be a token)."""
    start, netloc, rest = _split_address(url)
    if _at_past_address(url):
        return f"{start}…"
    return f"{start}{netloc.rpartition('@')[2]}" + ("/…" if rest else "")


def _at_past_address(url: str) -> bool:
    """An ``@`` past the address, also as ``%40``: a webhook's query keys the router does not know
    are put back into its URL encoded, the rest of a password cut at a raw ``?`` among them."""
    rest = _split_address(url)[2]
    return "@" in rest or "%40" in rest


def _split_address(url: str) -> tuple[str, str, str]:
    """``url`` as ``scheme://``, the address (``[user info@]host[:port]``: up to the first ``/``,
    ``?`` or ``#``) and what follows, without parsing it (it may not parse)."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        scheme, rest = "", scheme
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    return f"{scheme}{sep}", netloc, rest[len(netloc) :]


_UNEXPANDED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""``${NAME}``: kubernetes-event-exporter expands it in its whole config file, so a migrated config
holds its credentials so; here nothing expands it (``env:NAME`` does)."""


def unexpanded_reference(text: str) -> str | None:
    """Why a credential written as ``text`` (a literal) is surely not the one meant: it holds a
    ``${NAME}`` nobody expands here (the text itself was sent: 401 for ever, the operator sent to
    check a password that is right in the environment). None when it holds none. Quotes no part of
    the value: a real password holding ``${…}`` would be shown in part."""
    if _UNEXPANDED.search(text) is None:
        return None
    return (
        "holds a ${…} reference (a shell or kubernetes-event-exporter variable), which is not expanded "
        "here: write env:NAME for an environment variable holding the whole value; a value that really "
        "holds ${ is given through env: or file:"
    )


def secret_input(value: Any, info: ValidationInfo) -> Any:
    """``resolve_secret``, and a literal that is empty or all white space (a YAML ``secret: ""``, a
    Helm value left blank, ``bearer_token=``) or holds an unexpanded ``${NAME}`` refused as an empty
    ``env:``/``file:`` one is: Loki sent ``Bearer `` and was refused for ever, DingTalk signed with
    an empty key. A basic-auth user without a password is written by leaving ``password`` out (the
    HTTP sinks then send the empty password), so an empty ``password=`` is refused too: one way to
    say it, and a blank Helm value is never taken for it."""
    if isinstance(value, str) and not value.startswith(("env:", "file:")):
        if not value.strip():
            leave = (
                "leave it out for a user without a password"
                if info.field_name == "password"
                else "leave the option out to have none"
            )
            raise ValueError(f"empty (or only white space): a credential is never empty; {leave}")
        if problem := unexpanded_reference(value):
            raise ValueError(problem)
    return resolve_secret(value)


Secret = Annotated[SecretStr, BeforeValidator(secret_input)]
"""A credential: accepts a literal, ``env:NAME`` or ``file:/path``; printed as ``**********``. Never
empty, never an unexpanded ``${NAME}``."""


def safe_name(name: str) -> str:
    """A sink name as a file or folder name in the data dir (spool, checkpoint, dead letters)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


MAX_NAME_CHARS = 200
"""Longest sink name: it names files in the data dir (``checkpoints/<name>.snapshot.tmp``, a replay's
``<input>.refused-<name>.jsonl``), which a file system takes up to 255 bytes."""


def _instance_name(value: str | None) -> str | None:
    if value in (".", ".."):
        raise ValueError(f"{value!r} cannot name a sink: the name is a folder name in the data dir")
    if value is not None and len(value) > MAX_NAME_CHARS:
        # Valid for `check`, it ended `run` with a traceback (File name too long) at the checkpoint.
        raise ValueError(
            f"a name of {len(value)} characters; at most {MAX_NAME_CHARS}: it names files in the data dir"
        )
    return value


def split_list(value: Any) -> Any:
    """Accept ``a,b,c`` (URL query form) as well as a YAML list, and both at once: a repeated query
    key (``kinds=Pod,Node&kinds=Deployment``) gives a list whose items are ``a,b`` too, which were
    kept whole (a kind ``Pod,Node`` that never matched)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return [
            part
            for item in value
            for part in ([p.strip() for p in item.split(",")] if isinstance(item, str) else [item])
            if part != ""
        ]
    return value


StrList = Annotated[list[str], BeforeValidator(split_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SinkOptions(_Strict):
    """Base of every sink's options model. Subclass it and add fields; use ``Secret`` for credentials."""

    url: str = Field("", description="The part after TYPE: in --sink=TYPE:URL (may be empty).")
    include_raw: bool = Field(False, description="Add the raw Event object to each record as `raw`.")


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def name_matches(patterns: list[str], value: str) -> bool:
    """Whether a filter list (``namespaces``, ``kinds``, …) takes ``value``, as ``engine/filter.py``
    matches: names ignoring case, shell-style globs when a pattern has ``*``, ``?`` or ``[``."""
    return any(
        re.match(fnmatch.translate(p), value, re.IGNORECASE) is not None
        if _is_glob(p)
        else p.casefold() == value.casefold()
        for p in patterns
    )


_NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # a DNS-1123 label, as --namespace
_NAMESPACE_GLOB = re.compile(r"[-a-z0-9*?\[\]!^]+")

# What a kind, reason or component filter value may not hold. Kinds are Go type names: built-in ones
# CamelCase, a CRD's a DNS-1035 label once lower-cased (apiextensions validation), so letters, digits,
# '-' (and '_', which a Go name may hold). Reasons and components are free text in core/v1 (UpperCamelCase
# and names like k8s.io/kubelet by convention, but the CSI sidecars' component is "external-resizer
# ebs.csi.aws.com" and operators write sentences as reasons), so only what cannot be meant literally is
# refused: regular-expression syntax (kube-eventer's webhook `reason=` and kubernetes-event-exporter's
# rules are regexps, and such a value kept nothing here, counted only as filtered) and separators typed
# for a comma. A name that really holds one of these characters can still be matched with the glob `?`.
_KIND_CHAR = re.compile(r"[A-Za-z0-9_-]")
_REGEX_SYNTAX = re.compile(r"[|^$()+\\{}]")
# `.*` is a glob too (a dot, then anything): over dotted names (`components=ebs.*`,
# `reasons=cert-manager.*`) it is meant so; a kind holds no dot, so there it is a regexp.
_KIND_REGEX_SYNTAX = re.compile(rf"{_REGEX_SYNTAX.pattern}|\.\*")
_KIND_SEPARATOR = re.compile(r"[\s;]")
# A space is part of a reason or component; a ';', a tab or a line break (a YAML block `|` listing
# names on lines) is a separator typed for a comma. `;` stays refused: no reason or component the
# review of item 235 found holds one, a list typed `A;B` is the likelier meaning, and `?` matches one.
_NAME_SEPARATOR = re.compile(r"[^\S ]|;")

_POSIX_CLASS = re.compile(
    r"(?:^|[^\\])(?:\\\\)*"  # a `[` not escaped (`\[:alpha:]` matches that text and is fine)
    r"\[:(alnum|alpha|ascii|blank|cntrl|digit|graph|lower|print|punct|space|upper|word|xdigit):\]"
)
"""A POSIX class (``[:digit:]``), only ever meant inside a set: ``[[:digit:]]``."""

QUERY_PLUS_FIELDS = "query_plus_fields"
"""Validation context key (``FilterOptions.model_validate(..., context=...)``): the filter fields
whose ``--sink`` query value held a raw ``+``, which the query's form decoding reads as a space."""


def _glob_literals(pattern: str) -> str | None:
    """The characters a shell glob (``fnmatch``) matches as themselves: outside ``*``, ``?`` and
    ``[...]`` sets. None when a ``[`` opens no set (fnmatch then takes it as itself) or a ``]``
    closes none: the shape of ``[Pod,Node]`` split at its comma."""
    literal: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            j = i + 1
            if j < len(pattern) and pattern[j] == "!":
                j += 1
            if j < len(pattern) and pattern[j] == "]":
                j += 1  # a ] first in a set is one of its characters
            end = pattern.find("]", j)
            if end < 0:
                return None
            i = end + 1
            continue
        if c == "]":
            return None
        if c not in "*?":
            literal.append(c)
        i += 1
    return "".join(literal)


def _name_filter_problem(value: str, field: str, *, plus: bool = False) -> str | None:
    """Why no event can carry ``value`` in the filter list ``field`` (kinds, reasons, components
    and their ``exclude_`` forms), or None. ``plus``: the value came from a ``--sink`` query whose
    raw value held a ``+``, so a space in it may have been typed as a plus."""
    several = f"list several as {field}=A,B or as a YAML list"
    kinds = field.endswith("kinds")
    glob = {"kinds": "*Set", "reasons": "Failed*", "components": "kube-*"}[field.removeprefix("exclude_")]
    if (_KIND_REGEX_SYNTAX if kinds else _REGEX_SYNTAX).search(value):
        return (
            f"{value!r} reads as a regular expression, which {field} does not take: names (any case) "
            f"or shell globs such as {glob}; {several} (only message= and exclude_message= take a "
            "regular expression)"
        )
    if kinds and _KIND_SEPARATOR.search(value):
        return (
            f"{value!r} holds a space or ';', which no kind does: {several} (a + in a --sink query "
            "reads as a space)"
        )
    if not kinds and (separator := _NAME_SEPARATOR.search(value)):
        return (
            f"{value!r} holds {separator.group()!r}: {several} (a name that really holds one is "
            "matched with ?)"
        )
    if plus and " " in value:
        # `reasons=Back+Off`: a space or a plus? Either is a name no event was seen to carry.
        return (
            f"{value!r} holds a space read from a + in the --sink query, which may have been meant as "
            f"a plus: write %20 for a space, or ? for a plus (a + itself, %2B, reads as "
            f"regular-expression syntax); {several}"
        )
    literal = _glob_literals(value)
    if literal is None:
        return f"{value!r} has a [ or ] that opens or closes no glob set: {several}, not [A,B]"
    if kinds and not all(_KIND_CHAR.fullmatch(c) for c in literal):
        return (
            f"{value!r} is no kind: a kind is a name such as Pod or HorizontalPodAutoscaler "
            "(letters, digits, '-'), without its group or version, or a shell glob such as *Set"
        )
    return None


def _near_miss(value: str, known: str) -> bool:
    """Whether ``value`` is a typo of ``known`` (both lower case): one letter added, dropped,
    changed or two swapped (``warnig``, ``nomal``, ``wraning``, ``warnings``), or its first four
    letters or more (``warn``, ``norm``). A longer distance takes real names: ``abnormal`` and
    ``learning`` are two edits away, ``normalevent`` holds all of ``normal``."""
    if value == known:
        return False
    if len(value) >= 4 and known.startswith(value):
        return True
    if abs(len(value) - len(known)) > 1:
        return False
    i = next(
        (i for i, (a, b) in enumerate(zip(value, known, strict=False)) if a != b), min(len(value), len(known))
    )
    return (
        value[i + 1 :] == known[i + 1 :]  # changed (or added or dropped at the end)
        or value[i:] == known[i + 1 :]  # dropped
        or value[i + 1 :] == known[i:]  # added
        or (value[i : i + 2] == known[i : i + 2][::-1] and value[i + 2 :] == known[i + 2 :])  # swapped
    )


_KNOWN_TYPES = ("Normal", "Warning")

_TYPE_SYNTAX = re.compile(rf"{_REGEX_SYNTAX.pattern}|[*?\[\]]|\.\*")
"""What no event type holds: regular-expression syntax (kubernetes-event-exporter's and kube-eventer's
``type`` rules are regexps) and glob characters (types are exact names, unlike the other lists)."""


def _type_problem(value: str) -> str | None:
    """Why ``value`` can be no event type, or None. ``Warning|Normal``, ``^Warning$`` or ``Warn*``
    were kept with a warning and matched nothing: the sink went quiet, every occurrence counted
    only as filtered (the migration guide promised exit 2, as for the other lists)."""
    if _TYPE_SYNTAX.search(value):
        # The types its words start (`^Warning$`, `Warn*`, `W.*`, `Warning|Normal`), as the advice.
        words = re.findall(r"[a-z]+", value.lower())
        names = [n for n in _KNOWN_TYPES if any(n.lower().startswith(w) for w in words)]
        advice = f"types={','.join(names)}" if names else "types=Warning or types=Normal"
        return (
            f"{value!r} reads as a regular expression or a glob, which types does not take: event types "
            f"are names (Normal, Warning), matched whole; write {advice} (several as types=A,B or a YAML list)"
        )
    if _KIND_SEPARATOR.search(value):
        return f"{value!r} holds a space or ';', which no event type does: list several as types=A,B or as a YAML list"
    return None


class FilterOptions(_Strict):
    """Which occurrences a sink receives. Empty lists, and an empty message or exclude_message, mean
    "no restriction"."""

    # No `type` alias: in a YAML entry `type` is the sink's type, and a --sink query refuses it.
    types: StrList = Field(default_factory=list, description="Event types to keep (Normal, Warning).")
    level: str | None = Field(
        None,
        description="kube-eventer style minimum level: Normal keeps all, Warning keeps Warning only.",
    )
    # Names match ignoring case (engine/filter.py): `kinds=pod` matched nothing, as Kubernetes spells
    # it Pod, while `types=warning` was already taken as Warning. (Namespaces are lower case anyway.)
    namespaces: StrList = Field(default_factory=list, description="Keep only these namespaces.")
    exclude_namespaces: StrList = Field(default_factory=list, description="Drop these namespaces.")
    kinds: StrList = Field(
        default_factory=list,
        description="Keep only these involved-object kinds (any case: pod is Pod; globs such as *Set).",
    )
    exclude_kinds: StrList = Field(
        default_factory=list, description="Drop these involved-object kinds (any case)."
    )
    reasons: StrList = Field(
        default_factory=list,
        description="Keep only these reasons (any case: backoff is BackOff; globs such as Failed*).",
    )
    exclude_reasons: StrList = Field(default_factory=list, description="Drop these reasons (any case).")
    message: str | None = Field(
        None,
        validation_alias=AliasChoices("message", "message_regex"),
        description="Keep only messages matching this regular expression (search; empty: keep all).",
    )
    exclude_message: str | None = Field(
        None, description="Drop messages matching this regular expression (search; empty: drop none)."
    )
    components: StrList = Field(
        default_factory=list,
        validation_alias=AliasChoices("components", "component"),
        description="Keep only these reporting/source components (any case).",
    )
    min_count: int = Field(1, ge=1, description="Keep only occurrences whose number is at least this.")

    @field_validator("level")
    @classmethod
    def _level(cls, value: str | None) -> str | None:
        if value is None:
            return None
        canonical = {"normal": "Normal", "warning": "Warning"}.get(value.lower())
        if canonical is None:
            raise ValueError(f"level must be Normal or Warning, not {value!r}")
        return canonical

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        # Spelt as the API server does; other types are kept as given (core/v1 does not check them),
        # but a typo of Normal or Warning (`_near_miss`) is refused: `types=Warnig` kept nothing, and
        # on an alert robot it replaced the Warning default, so the channel went quiet.
        known = {t.lower(): t for t in _KNOWN_TYPES}
        for t in value:
            if problem := _type_problem(t):
                raise ValueError(problem)
            close = next((k for k in known if _near_miss(t.lower(), k)), None)
            if close is not None:
                raise ValueError(
                    f"{t!r} is no event type: did you mean {known[close]}? "
                    f"(Kubernetes events are {' or '.join(_KNOWN_TYPES)})"
                )
        return [known.get(t.lower(), t) for t in value]

    @field_validator("kinds", "exclude_kinds", "reasons", "exclude_reasons", "components")
    @classmethod
    def _names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        field = info.field_name or "kinds"
        plus = field in ((info.context or {}).get(QUERY_PLUS_FIELDS) or ())
        for name in value:
            problem = _name_filter_problem(name, field, plus=plus)
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _level_and_types(self) -> FilterOptions:
        if self.level == "Warning" and self.types and "Warning" not in self.types:
            raise ValueError(
                f"level=Warning keeps Warning events only and types={','.join(self.types)} has no Warning: "
                "together they keep nothing (use one of them)"
            )
        return self

    @field_validator("namespaces", "exclude_namespaces")
    @classmethod
    def _namespace_names(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # What no namespace is called never matched: `namespaces=default kube-system` (one name with
        # a space) kept nothing, counted only as filtered, as item 49 found for --namespace.
        for name in value:
            folded = name.lower()  # matched ignoring case
            if _is_glob(name):
                valid = _NAMESPACE_GLOB.fullmatch(folded) is not None
            else:
                valid = len(name) <= 63 and _NAMESPACE_NAME.fullmatch(folded) is not None
            if not valid:
                several = re.search(r"[\s;]", name.strip()) is not None
                hint = (
                    f" (several are separated by commas, {info.field_name}=a,b, or a YAML list)"
                    if several
                    else ""
                )
                raise ValueError(
                    f"{name!r} is not a namespace name: letters, digits and '-', at most 63 characters, "
                    f"or a glob such as kube-*{hint}"
                )
        return value

    @field_validator("exclude_namespaces", "exclude_kinds", "exclude_reasons")
    @classmethod
    def _not_everything(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for pattern in value:
            # `*`, and `*?` or `?*`: every name (of at least as many characters as there are ?).
            if "*" in pattern and set(pattern) <= {"*", "?"}:
                raise ValueError(
                    f"{info.field_name}={pattern} drops everything: the sink would receive nothing "
                    "(a sink that should receive nothing is one to remove)"
                )
        return value

    @model_validator(mode="after")
    def _kept_and_dropped(self) -> FilterOptions:
        # Exclusion wins: a sink whose every kept name is dropped receives nothing. A list that still
        # keeps something beside a dropped name is valid (kinds=Pod,Node&exclude_kinds=Pod, as the
        # migration guide's translation of a route tree's drop and match gives).
        for keep, drop in (
            ("namespaces", "exclude_namespaces"),
            ("kinds", "exclude_kinds"),
            ("reasons", "exclude_reasons"),
        ):
            dropped: list[str] = getattr(self, drop)
            kept: list[str] = getattr(self, keep)
            if kept and all(not _is_glob(name) and name_matches(dropped, name) for name in kept):
                names = ", ".join(map(repr, kept))
                them = "it" if len(kept) == 1 else "them all"
                raise ValueError(
                    f"{keep} keeps {names} and {drop} drops {them}: the sink would receive nothing"
                )
        return self

    @field_validator("message", "exclude_message")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value == "":
            # Unset, as an empty list is: the empty regex matches every message, so a Helm value
            # left blank (`exclude_message: ""`) dropped everything, counted only as filtered.
            return None
        if value is not None:
            if _POSIX_CLASS.search(value):
                # Go RE2's (kube-eventer's, kubernetes-event-exporter's): Python reads `[[:digit:]]` as
                # the set `[[:digt]` then `]`, which matches "exit code d]" and not "exit code 1".
                raise ValueError(
                    f"{value!r} holds a POSIX class such as [[:digit:]], which Python's regular expressions "
                    "do not take: write [0-9] or \\d, [a-zA-Z], \\s, \\w"
                )
            try:
                with warnings.catch_warnings(action="error", category=FutureWarning):
                    re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
            except FutureWarning as exc:
                # "Possible nested set", "Possible set difference": syntax of another engine, read
                # otherwise here (and printed raw on stderr with a source path).
                raise ValueError(
                    f"regular expression {value!r}: {exc} (another engine's syntax? escape a [ or a "
                    "doubled - & ~ | inside [...] with a backslash)"
                ) from None
        return value


QUEUE_DEFAULT = 10_000
"""Memory queue bound without a disk spool: the only buffer while a sink is down."""
QUEUE_DEFAULT_SPOOLED = 1_000
"""With a spool the disk takes the backlog: a slow sink then holds ~1,000 occurrences (~7 MB) in
memory instead of 10,000 (~64 MB), per sink. 2,000 measured 153–157 MiB peak for a relist of 50,000
with seven sinks, 1,000 measured 146 MiB, at the same relist time for the sinks that keep up."""
QUEUE_BYTES_DEFAULT = 48 * 1024 * 1024
"""Memory queue bound in bytes as the engine counts them (each occurrence its Event's JSON twice: the
raw JSON and the record made of it), with or without a spool. Above what 10,000 ordinary events count
(~24 MB: 1.2 KB of JSON each, recorded), so only large events meet it: 80 events of 1 MB fitted the
count bound and took the router to 213 MiB, against the chart's 256 MiB limit. A relist hands on up to
32 MiB of them at once (a list page of 16 MiB): a smaller bound would then drop (or spill) the oldest."""


class PipelineOptions(_Strict):
    """Engine knobs per sink: queue, batching, retries. Sinks never see these."""

    name: Annotated[str | None, AfterValidator(_instance_name)] = Field(
        None, description="Instance name (default: the sink type); unique per router."
    )
    queue_max_events: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("queue_max_events", "queue_size"),
        description=(
            "Memory queue bound (default 10,000; 1,000 with the disk spool, which takes the rest); beyond "
            "it occurrences spill to disk, or without a spool the oldest are dropped."
        ),
    )

    queue_max_bytes: int | None = Field(
        None,
        ge=0,
        description=(
            "Memory queue bound in bytes, beside queue_max_events (default 48 MiB, more in proportion to a "
            "queue_max_events above 10,000; 0 = none): each occurrence counts twice its Event's JSON. Past it, "
            "as past queue_max_events; one larger than it is still taken into an empty queue. Below 32 MiB, a "
            "relist of large events may spill or drop."
        ),
    )

    def queue_bound(self, *, spooled: bool) -> int:
        if self.queue_max_events is not None:
            return self.queue_max_events
        return QUEUE_DEFAULT_SPOOLED if spooled else QUEUE_DEFAULT

    def queue_bytes_bound(self) -> int:
        """The byte bound; 0: none. By default it grows with a ``queue_max_events`` set above the
        default: a queue raised to 60,000 ordinary events (~2.4 KB each as counted) must not be cut
        to 20,000 by a byte bound it was never given."""
        if self.queue_max_bytes is not None:
            return self.queue_max_bytes
        events = self.queue_max_events or QUEUE_DEFAULT
        return max(QUEUE_BYTES_DEFAULT, events * (QUEUE_BYTES_DEFAULT // QUEUE_DEFAULT))

    spool_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Disk spool bound in bytes (needs --data-dir; 0 disables the spool; "
        "--data-dir-max-bytes may lower it to fit the volume).",
    )
    batch_max_events: int = Field(
        500,
        ge=1,
        validation_alias=AliasChoices("batch_max_events", "batch_size"),
        description="Most occurrences per send.",
    )
    batch_max_bytes: int = Field(1024 * 1024, ge=1, description="Most encoded record bytes per send.")
    batch_max_wait: float = Field(
        0.2,
        ge=0,
        allow_inf_nan=False,  # inf: a batch that never went out
        validation_alias=AliasChoices("batch_max_wait", "batch_wait"),
        description="Seconds to wait for a batch to fill after its first occurrence.",
    )
    retry_initial_backoff: float = Field(
        0.5, gt=0, allow_inf_nan=False, description="First retry delay in seconds."
    )
    retry_max_backoff: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="Longest retry delay in seconds."
    )
    retry_max_attempts: int = Field(
        0,
        ge=0,
        description="Attempts before an item is dead-lettered as 'retries exhausted' (0 = never give up).",
    )
    send_timeout: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,  # inf: a hung send held its sink for ever
        description="Seconds one send may take before it counts as failed.",
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> PipelineOptions:
        if self.retry_max_backoff < self.retry_initial_backoff:
            raise ValueError("retry_max_backoff must be >= retry_initial_backoff")
        return self

    @property
    def retry_wait_max(self) -> float:
        """The longest the engine waits before offering a retried item again: ``retry_max_backoff``,
        or a destination's Retry-After up to ten times that (a wild value must not stop a sink for days)."""
        return self.retry_max_backoff * 10


def field_keys(name: str, info: FieldInfo) -> set[str]:
    """A field's name and the keys of its validation alias."""
    names = {name}
    alias = info.validation_alias
    if isinstance(alias, str):
        names.add(alias)
    elif isinstance(alias, AliasChoices):
        names.update(choice for choice in alias.choices if isinstance(choice, str))
    return names


def field_names(model: type[BaseModel]) -> set[str]:
    """Every key a model accepts, aliases included."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names |= field_keys(name, info)
        if info.alias:
            names.add(info.alias)
    return names


COMMON_KEYS = (field_names(FilterOptions) | field_names(PipelineOptions)) - {"url"}
