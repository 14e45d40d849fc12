"""Router configuration: ``--sink=TYPE:URL?k=v`` flags and a YAML file, validated by pydantic.

Errors name the sink and the option at fault and never echo secret values.
"""

from __future__ import annotations

import asyncio
import builtins
import difflib
import itertools
import logging
import re
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from eventrouter.options import (
    COMMON_KEYS,
    MAX_NAME_CHARS,
    QUERY_PLUS_FIELDS,
    FilterOptions,
    OptionError,
    PipelineOptions,
    SinkOptions,
    check_tls_files,
    field_keys,
    field_names,
    redact_url,
    safe_name,
    shown_address,
    split_list,
    userinfo_hint,
)
from eventrouter.plugins import PluginError, SinkPlugin, class_faults, discover
from eventrouter.scrub import MIN_CUT, Scrubber, given_secrets, option_secrets
from eventrouter.sink import Sink, SinkContext, cancelled_now, raised_by_signal

__all__ = [
    "ConfigError",
    "RouterConfig",
    "SinkSpec",
    "build_specs",
    "load_yaml",
    "parse_sink_flag",
    "redact_url",
]


QUERY_KEYS = "__url_query_keys__"
"""Entry key listing which options came from a --sink URL query (they may belong to the URL)."""

QUERY_PLUS = "__url_query_plus__"
"""Entry key (only when there are any) listing the query keys whose raw value held a ``+``, which
the query's form decoding (kube-eventer's too) reads as a space."""

QUERY_UNDECODABLE = "__url_query_undecodable__"
"""Entry key (only when there are any) listing the query keys whose raw value holds a percent-escape
that is no UTF-8 (``9f%E2kq``): decoded, it became U+FFFD, a value surely not the one meant."""


log = logging.getLogger(__name__)

_REFERENCE = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|file:/\S*")


class ConfigError(Exception):
    """Invalid configuration; the message names the sink and option. Exit code 2."""


@dataclass(frozen=True)
class SinkSpec:
    """One configured sink instance: its type, engine options, filter and the sink's own options."""

    name: str
    type: str
    sink_cls: builtins.type[Sink[Any]]
    options: SinkOptions
    filter: FilterOptions
    pipeline: PipelineOptions
    source: str = field(default="", compare=False)
    """Where it was configured (``--sink #1`` or ``config.yaml sinks[0]``), for messages."""
    entry: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The flat options as configured, ``file:`` references unread: validated again when a file
    they name changes (a rotated credential), see ``reread``."""
    origin: str = field(default="sink", compare=False, repr=False)
    defaulted: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """The filter options the sink's ``default_filter`` set (none configured)."""

    def reread(self) -> SinkSpec:
        """The same sink validated again from its configured options: re-reads every ``file:``
        secret and checks every file option again. Raises ConfigError as at start."""
        return spec_for_class(self.sink_cls, self.entry, type_=self.type, where=self.origin)

    def build(self, context: SinkContext) -> Sink[Any]:
        """The sink instance. ConfigError naming the sink when its constructor refuses (a plugin's
        own checks): a traceback and exit 1 before."""
        try:
            return self.sink_cls(self.options, context)
        except BaseException as exc:
            # Also a SystemExit or GeneratorExit of the plugin's: it ended `run` with the plugin's
            # exit code (0 for `sys.exit()`) and `check` with a traceback, naming no sink.
            if not _plugins_fault(exc):
                raise
            raise ConfigError(
                f"{self.source}: the {self.type} sink cannot be built: {_masked(exc, self.options)}"
            ) from None

    def filter_text(self) -> str:
        """The filter the sink applies, as ``check`` shows it (``level=Warning (default);
        kinds=Pod,Deployment``); empty when it keeps everything."""
        shown = []
        for name in FilterOptions.model_fields:
            value = getattr(self.filter, name)
            if value in ([], None) or (name == "min_count" and value == 1):
                continue
            # Each value as errors show it: `check`'s output is pasted into CI logs and issues, and a
            # flag or token pasted into `types` (any text to core/v1) was printed here whole.
            # A regular expression by the rule for one: its syntax (`5\d\d`, `(?i:a|b)`) is no credential.
            text = shown_values(
                value if isinstance(value, list) else [str(value)], regex=name in _REGEX_OPTIONS
            )
            shown.append(f"{name}={text}" + (" (default)" if name in self.defaulted else ""))
        return "; ".join(shown)

    def describe(self) -> str:
        # The name by the credential rule, as every refusal shows it: `check`'s valid and FAIL lines
        # and the log's "sink … configured" printed a name such as `token:S3cret` whole.
        name = _shown_value(self.name)
        return (
            f"{name} ({self.type} {_shown_url(self.options.url)})"
            if self.options.url
            else f"{name} ({self.type})"
        )


def _shown_url(url: str) -> str:
    """A sink's url as messages show it: redacted (user info, query values, token-like path
    segments), but a path (the file sink's, any url without a scheme, user info or query) as given:
    `…/eventrouter-demo/events.jsonl` was shown `…/***/events.jsonl`, so no one could tell which
    file a sink writes."""
    if "://" in url or any(c in url for c in "@?#"):
        return redact_url(url)
    return url


def _plugins_fault(exc: BaseException) -> bool:
    """``exc``, met in a sink's constructor or options model, is the sink's fault: anything but
    Ctrl-C itself and a cancellation of the running task (as at a send, item 251)."""
    if raised_by_signal(exc):
        return False
    if isinstance(exc, asyncio.CancelledError):
        try:
            return not cancelled_now()
        except RuntimeError:  # no event loop (an embedder validating options): nothing cancels it
            return True
    return True


def _given_masked(model: type[BaseModel], given: Mapping[str, Any]) -> Callable[[str], str]:
    """What takes the secrets of options ``given`` to ``model`` (not validated: a validator of the
    sink's refused them) out of a text: a plugin validator's error may quote its token, and it was
    printed whole at start and logged at a reload."""
    try:
        forms = given_secrets(model, given)
    except Exception:  # an options model of a plugin's own making we cannot read: show no text
        return lambda text: "its text is not shown, as the sink's secrets cannot be told in it"
    return _masker(forms)


def _masker(forms: Iterable[str]) -> Callable[[str], str]:
    """What replaces each of ``forms`` in a text by ``****``."""
    forms = list(forms)
    masked = Scrubber(form for form in forms if len(form) >= MIN_CUT)
    short = sorted({form for form in forms if len(form) < MIN_CUT}, key=len, reverse=True)
    if not short:
        return masked
    # One of 1-3 characters (`access_token=t`) only as a word of its own: masked wherever it stood,
    # it garbled every other error ("secre**** file '/****mp/…' is emp****y").
    word = re.compile(rf"(?<!\w)(?:{'|'.join(map(re.escape, short))})(?!\w)")
    return lambda text: word.sub("****", masked(text))


def _then(first: Callable[[str], str], second: Callable[[str], str]) -> Callable[[str], str]:
    return lambda text: second(first(text))


def _text_of(exc: BaseException, mask: Callable[[str], str]) -> str:
    """``exc``'s text through ``mask``; empty when its ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:
        return ""
    return mask(text) if text else ""


def _masked(exc: BaseException, options: BaseModel) -> str:
    """``Type: text`` of a plugin's exception, without the sink's secrets (its library's error may
    quote the token it was given) and also when its ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    try:
        forms = option_secrets(options)
    except Exception:  # an options model of a plugin's own making: nothing found in it
        forms = []
    return f"{type(exc).__name__}: {Scrubber(forms)(text)}" if text else type(exc).__name__


def parse_sink_flag(
    flag: str, *, where: str = "--sink", name: str | None = None, yaml: bool = False
) -> dict[str, Any]:
    """``TYPE:URL?k=v&k=v2`` → flat dict: ``url`` is the part before ``?``, every query key is an
    option (of the engine or of the sink, e.g. DingTalk's ``access_token``). Repeated keys become lists.
    ``where`` and ``name`` (default: the type) name the sink in errors; ``yaml``: the flag is made of
    a YAML entry's type and url."""
    if ":" not in flag:
        flag += ":"  # `--sink=stdout` needs no URL
    type_, rest = flag.split(":", 1)
    type_ = type_.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", type_):
        raise ConfigError(f"--sink: invalid sink type {_shown_type(type_)}")
    url, _, query = rest.partition("?")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    shown = _shown_quoted(name) if name else repr(type_)
    _refuse_user_info_cut_at_a_query(rest, [k for k, _ in pairs], f"{where} (sink {shown})")
    entry: dict[str, Any] = {"type": type_, QUERY_KEYS: []}
    # Decoded as kube-eventer's Go ParseQuery does (migrated flags rely on it), `+` included; which
    # keys had one is kept for spec_for_class to refuse it where a space is surely not meant (but
    # the space of kube-eventer's header=Authorization=Bearer+TOKEN: _scheme_space).
    plus: set[str] = set()
    undecodable: set[str] = set()
    for part in query.split("&"):
        raw_key, _, raw_value = part.partition("=")
        key = urllib.parse.unquote_plus(raw_key)
        if "+" in raw_value and not _scheme_space(key, raw_value):
            plus.add(key)
        try:
            urllib.parse.unquote_plus(raw_value, errors="strict")
        except UnicodeDecodeError:
            undecodable.add(key)
    if plus:
        entry[QUERY_PLUS] = sorted(plus)
    if undecodable:
        entry[QUERY_UNDECODABLE] = sorted(undecodable)
    if url:
        entry["url"] = url
    for key, value in pairs:
        if key in entry and key not in ("type", "url"):
            existing = entry[key]
            entry[key] = [*existing, value] if isinstance(existing, list) else [existing, value]
        elif key in ("type",):
            # Also a YAML url's query (`_with_url_query`), where the sink's type is the `type:` key.
            given = (
                "a YAML url's query: the sink's type is its type: key"
                if yaml
                else ("the query: the sink's type is what precedes the first ':'")
            )
            raise ConfigError(
                f"{where} (sink {shown}): option 'type' is not allowed in {given}; to keep "
                "events of a type, write types=Warning"
            )
        else:
            entry[key] = value
        entry[QUERY_KEYS].append(key)
    return entry


_AUTH_SCHEMES = frozenset(
    {
        # IANA's registry, and schemes services document (GitLab/DRF Token, Elastic ApiKey, Splunk
        # HEC, Opsgenie GenieKey, Okta SSWS).
        *("basic", "bearer", "concealed", "digest", "dpop", "gnap", "hoba", "mutual", "negotiate"),
        *("oauth", "privatetoken", "vapid", "token", "apikey", "api-key", "key", "splunk", "geniekey"),
        "ssws",
    }
)
"""Authorization schemes (lower case) after which a header value's ``+`` is taken as a space."""

_SCHEME_START = re.compile(r"\s*[!#$%&'*.^_`|~0-9A-Za-z-]+\s*[:=]\s*([A-Za-z][A-Za-z0-9-]*)")


def _scheme_space(key: str, raw_value: str) -> bool:
    """kube-eventer's ``header=Authorization=Bearer+TOKEN``: its Go query parsing reads ``+`` as a
    space, the usual way to write "Bearer TOKEN" in a URL. A single raw ``+`` right after a known
    auth scheme at the start of a header's value is that space; any other ``+`` (a base64 value,
    ``application/cloudevents+json``) is refused, as in any credential."""
    if key not in ("header", "headers") or raw_value.count("+") != 1:
        return False
    before, _, after = raw_value.partition("+")
    start = _SCHEME_START.fullmatch(urllib.parse.unquote(before))
    return start is not None and start.group(1).lower() in _AUTH_SCHEMES and bool(after.strip())


def _refuse_user_info_cut_at_a_query(whole: str, keys: Sequence[str], where: str) -> None:
    """A raw ``?`` in a URL's password ends the address there: what follows (the rest of the
    password, ``@``, the host…) was taken as the options' query, so an "unknown option" error named
    the rest of the password, and the url's own error showed its start as host:port
    (``'http://svc:Sup3r'``). Refused naming the option only, never a part of the URL: when an
    ``@`` follows the ``?`` and what precedes it is no ``host[:port]`` (a password seldom reads as a
    port), or when a query key holds an ``@`` (no option's name does; a webhook sent it on). An
    ``@`` in a query value after a valid address (``?password=p@ss``) is taken as before."""
    reason = ""
    before, sep, after = whole.partition("?")
    if sep and "@" in after and "://" in before:
        # The address the ? ends: of the last URL before it (Elasticsearch takes a list of them).
        address = re.split(r"[/#]", before.rpartition("://")[2], maxsplit=1)[0]
        try:
            parts = urllib.parse.urlsplit(f"//{address}")
            parts.port  # noqa: B018 - raises on a port that is no number: the start of a password
            valid = bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            reason = "what precedes its first ? is no host[:port], and an @ follows it"
    if not reason and any("@" in key for key in keys):
        reason = "a key of its query holds an @, which no option's name does"
    if reason:
        # Shaped as the url's own validation errors ("Value error, url …") so all of them read alike.
        raise ConfigError(
            f"{where}: option 'url': Value error, url {shown_address(whole)!r}: {reason}{userinfo_hint(whole)}"
        )


def _with_url_query(entry: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """A YAML sink whose ``url`` has a query takes its options as ``--sink`` does (its keys were
    ignored: a tenant, a level filter, a password in the URL); a key also given as an option is an
    error (which one was meant is not known)."""
    url, type_ = entry.get("url"), entry.get("type")
    if not (isinstance(url, str) and "?" in url and isinstance(type_, str)) or QUERY_KEYS in entry:
        return entry
    if not _OPTION_NAME.fullmatch(type_):
        return entry  # no type name: build_spec refuses it without quoting it (it may be a flag pasted whole)
    name = entry.get("name")
    parsed = parse_sink_flag(
        f"{type_}:{url}", where=where, name=name if isinstance(name, str) else None, yaml=True
    )
    both = sorted(k for k in parsed[QUERY_KEYS] if k in entry)
    if both:
        raise ConfigError(
            f"{where}: {', '.join(map(_shown_option, both))} given in the url's query and as options"
        )
    return {**entry, **{k: v for k, v in parsed.items() if k != "type"}}


def _coerce_query_value(model: type[BaseModel], key: str, value: Any, where: str) -> Any:
    """A list for an option that takes one value: its one item, else refused naming the option. A
    repeated query key kept its last value without a word: `message=A&message=B` dropped what matched
    only A, `level=Warning&level=Normal` made a robot page Normal events (kube-eventer took the first
    value, so a migrated flag meant the opposite)."""
    info = next((i for n, i in model.model_fields.items() if key in field_keys(n, i)), None)
    if isinstance(value, list) and info is not None:
        origin = getattr(info.annotation, "__origin__", None)
        if origin not in (list, tuple, set, dict) and info.annotation not in (list, dict):
            if len(value) == 1:
                return value[0]
            hint = (
                "; to match any of several patterns, join them in one regular expression: A|B"
                if key in _REGEX_OPTIONS
                else ""
            )
            raise ConfigError(
                f"{where}: option {key!r} is given {len(value)} times (a repeated query key or a YAML "
                f"list), but takes one value{hint}"
            )
    return value


_OPTION_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _shown_option(name: str) -> str:
    """An option's name as messages show it (quoted). A name no option has (a character outside
    letters, digits, ``_ . -``) may hold a credential: ``?password:S3cret`` or a YAML flow
    ``{password:S3cret}`` (``Name:Value``, as headers are written) makes an option *named*
    ``password:S3cret``. Only its part before the first ``:``, ``=`` or white space is shown; a
    name with an ``@`` (a piece of a URL's user info) not at all."""
    if "@" in name:
        return "(a name holding an @, not shown)"
    if _OPTION_NAME.fullmatch(name):
        return repr(name)
    cut = re.search(r"[:=\s]", name)
    if cut is None:
        return repr(name)
    head = name[: cut.start()]
    if not _OPTION_NAME.fullmatch(head):
        return "(a name that is no option's, not shown)"
    return f"{head + cut.group(0) + '…'!r} (the rest not shown: did you mean {head}=…?)"


_KEY_PART = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token: a header's name


def _shown_part(part: str) -> str:
    """A part of an error's location past the option (a key of a mapping, an index) as messages show
    it: a key no header or option is named may hold a credential typed ``Name:Value``; only its part
    before the first ``:``, ``=`` or white space is shown."""
    if _KEY_PART.fullmatch(part):
        return part
    cut = re.search(r"[:=\s]", part)
    head = part[: cut.start()] if cut else ""
    if cut is None or not _KEY_PART.fullmatch(head):
        return "(a key not shown)"
    return f"{head}{cut.group(0)}… (the rest not shown)"


_URL_START = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#\s,]*)")

_PLAIN_PART = re.compile(
    r"[A-Za-z0-9]{1,5}"
    r"|\$\{[A-Za-z_][A-Za-z0-9_]*\}"
    r"|\d{4}-\d{1,2}-\d{1,2}(?:[Tt ]\d{1,2}(?::\d{1,2}){1,2}(?:\.\d+)?)?(?:[Zz]|[+-]\d{1,2}(?::?\d{2})?)?"
    r"|\d{1,2}:\d{2}(?::\d{2})?"
)
"""What may follow ``name:`` or ``name=`` in a value shown whole, being plainly no password: up to 5
letters or digits (a port ``es2:99999``, its typo ``kafka-1:9O92``, a placeholder ``k1:port``), a
template's ``${PORT}`` left unreplaced, a date or time (``until=2026-13-01``). Anything else there
(``password:S3cret``, ``admin:20231207``: a number longer than a port may be a PIN) may be a
credential. Hiding a port typo or a bad date left the user nothing to fix by (item 326)."""

_SAFE_NETLOC = re.compile(rf"(?:\[[0-9A-Za-z:.%]*\]?|[A-Za-z0-9_.~-]*)(?::(?:{_PLAIN_PART.pattern}))?")

_NAME_VALUE = re.compile(r"(?:^|(?<=[\s,;?&'\"(\[{]))[A-Za-z0-9_.-]+\s*[:=]\s*([^\s,;]+)")

_SCHEME_WORD = re.compile(r"(?:^|(?<=[,;]))\s*([A-Za-z][A-Za-z0-9-]*)\s+(\S.*)", re.DOTALL)

_MIXED_RUN = re.compile(r"[A-Za-z0-9+=_-]{16,}")
_LONG_RUN = re.compile(r"[A-Za-z0-9+=]{32,}")


def _token_runs(text: str) -> list[str]:
    """The runs of ``text`` shaped as a generated token: 16+ characters mixing digits, upper and lower
    case (an access key, a password), or 32+ letters and digits (a hex or base64 token). A CamelCase
    kind or a dashed lower-case name is none."""

    def mixed(run: str) -> bool:
        return (
            any(c.isdigit() for c in run) and any(c.isupper() for c in run) and any(c.islower() for c in run)
        )

    def long(run: str) -> bool:
        return any(c.isdigit() for c in run) and any(c.isalpha() for c in run)

    runs = [m.group(0) for m in _MIXED_RUN.finditer(text) if mixed(m.group(0))]
    return runs + [m.group(0) for m in _LONG_RUN.finditer(text) if long(m.group(0))]


_PORT_THEN_PATH = re.compile(r"(?:\d{1,5}|\$\{[A-Za-z_][A-Za-z0-9_]*\})/[a-z0-9._~/-]*")


def _plain_value(value: str) -> bool:
    """Whether what follows a ``name:`` or ``name=`` is plainly no credential: a ``_PLAIN_PART``, or a
    port (or ``${NAME}``) then a path of lower-case path characters (``hook:8080/healthz``, an address
    without a scheme). Not any plain part before a ``/``: ``password:ab/S3cretPassw0rd`` was shown
    whole; nor a path in both cases: ``password=1/Zq9S3cretPw`` was (item 331)."""
    if "/" not in value:
        return bool(_PLAIN_PART.fullmatch(value))
    return bool(_PORT_THEN_PATH.fullmatch(value))


_RULE_CHARS = 2048
"""The longest value the credential rule reads; a longer one is taken for credential-shaped unread:
some of the rule's scans restart at every character (``_URL_START`` over a run of letters, a class
left open in a ``(?x)`` comment), and a 64 KiB value held ``check`` for 30-90 s (item 340)."""


def _credential_shaped(text: str, *, regex: bool = False) -> bool:
    """Whether a value given for an option (or a sink type) may hold a credential, so that messages
    must not quote it whole: an ``@`` (user info), a URL whose address is no ``host[:port]``, a
    ``name:value`` or ``name=value`` (a header, a flag pasted whole: ``loki:http://…``) whose value is
    no port, an authorization scheme followed by more (``Bearer abc``), or a token-shaped run. A
    typo (``Warnig``, ``kube system``, ``kafka-1:9O92``, ``until=2026-13-01``), a path or a plain URL
    is shown as given.

    With ``regex``, ``text`` is a regular expression's text as ``_regex_text`` reads it, and three
    marks of ordinary text are not taken for a credential's: an ``@`` with no user info before it
    (``\\S+@x``); a ``name: `` (or ``name = ``) whose name is no credential's, which ends a clause as in
    prose (``failed: HTTP``, ``statuscode: 5\\d\\d``, ``code = NotFound``), what follows judged from its
    start (``Error: token:S3cret`` still counts, as does ``password: S3cret``); and an authorization scheme
    followed by a plain word (``Token expired``). A scheme counts anywhere there, not only first
    (``failed for Bearer S3cret``): a regex quotes a message."""
    if len(text) > _RULE_CHARS:
        return True
    if _REFERENCE.fullmatch(text.strip()) or _HEADER_REFERENCE.fullmatch(text):
        return False  # env:NAME, file:/path: where a credential is, shown to find it
    if regex:
        text = _PROSE_PAIR.sub(
            lambda m: m.group(0) if _credential_name(m.group(1)) else f"{m.group(1)},", text
        )
    if (_USER_INFO_END.search(text) if regex else "@" in text) or "%40" in text.lower():
        return True
    for found in _URL_START.finditer(text):
        if not _SAFE_NETLOC.fullmatch(found.group(2)):
            return True
    rest = _URL_START.sub(" ", text)
    if any(not _plain_value(m.group(1)) for m in _NAME_VALUE.finditer(rest)):
        return True
    if regex:
        schemes = ((m.group(1), m.group(2)) for m in _SCHEME_ANYWHERE.finditer(text))
        if any(s.lower() in _AUTH_SCHEMES and not _PLAIN_WORD.fullmatch(word) for s, word in schemes):
            return True
    elif any(m.group(1).lower() in _AUTH_SCHEMES for m in _SCHEME_WORD.finditer(text)):
        return True
    return bool(_token_runs(text))


_USER_INFO_END = re.compile(r"[^\s,;/@]@")
"""In a regular expression's text, an ``@`` that ends user info: a literal character before it."""

_PROSE_PAIR = re.compile(r"(?:^|(?<=[\s,;?&'\"(\[{]))([A-Za-z0-9_.-]+)(?:\s*:|\s+=)\s+")
"""A ``name: `` or ``name = `` in a regular expression's text, as prose (``failed: HTTP``) and gRPC's
errors (``rpc error: code = NotFound desc = …``) write a clause."""

_SCHEME_ANYWHERE = re.compile(r"(?:^|(?<=[\s,;]))([A-Za-z][A-Za-z0-9-]*)\s+(?=([^\s,;]+))")
"""A word followed by another, anywhere in a regular expression's text: an authorization scheme and
what follows it (``… for Bearer S3cret``)."""

_CREDENTIAL_WORD = re.compile(r"(?:^|[_.-])(?:pw|pwd|pin|otp|totp|jwt|psk|bearer)$", re.IGNORECASE)
"""A credential's name that ``_SENSITIVE_HEADER``'s stems miss, alone or last (``pwd``, ``MYSQL_ROOT_PW``,
``pin``, ``otp``, ``jwt``): ``pwd: hunter2`` was read as a clause of prose and shown whole (item 340)."""


def _credential_name(name: str) -> bool:
    """Whether a ``name: `` in a regular expression's text names a credential, so is no clause of prose."""
    return bool(_SENSITIVE_HEADER.search(name) or _CREDENTIAL_WORD.search(name))


_PLAIN_WORD = re.compile(r"[A-Za-z][a-z]{0,14}")
"""A word no token is: letters, lower case after the first, fewer than 16 (``expired``, ``Vault``)."""


_REGEX_SKIP = re.compile(r"\(\?#[^)]*\)")  # a comment
_REGEX_GROUP = re.compile(r"\(\?(?:[:=!>]|<[=!]|P<\w+>|P=\w+\)|\(\w+\)|[aiLmsux]*(?:-[imsx]+)?[:)])|\(|\)|\|")
_REGEX_ATOM = re.compile(
    r"\.|\[\^?\]?(?:\\.|[^\]\\])*\]|\\[dDSwW]|\\[1-9][0-9]*|\\0[0-7]*|\\N\{[^}]*\}|\\[A-Za-z0-9]", re.DOTALL
)
_REGEX_ZERO = re.compile(r"[*+?^$]|\{(?=[\d,])\d*,?\d*\}|\\[bBAZ]")
_REGEX_CHAR = re.compile(
    r"\\(?:x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|[afnrtvs]|[^A-Za-z0-9])", re.DOTALL
)
_REGEX_CHARS = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "s": " "}
_PAIR_OPEN = re.compile(r"[:=]\s*$")


def _regex_text(pattern: str) -> str:
    """What a regular expression says as text, for ``_credential_shaped(…, regex=True)``: a credential
    pasted into one is literal text. Escaped characters are the characters (``\\.`` a dot, ``\\s`` a
    space); a quantifier, an anchor or a class that follows text is left out, as if the text went on
    (``Pa$$w0rd`` reads ``Paw0rd``, ``5\\d\\d`` reads ``5``); a group's edge or a ``|`` ends a word
    (``,``). Right after a ``name:`` or ``name=`` a class, a ``.`` or a ``\\S`` is a regex value
    (``password=\\S+``, ``token:.*``), which ends the pair (``password=,``), unless text goes on
    from it (``password=[Hh]unter2`` reads ``password=xunter2``); a group there, or after white
    space, is looked through (``password=(S3cret)`` reads ``password=S3cret,``). A pattern longer
    than ``_RULE_CHARS`` is returned unread (so taken for credential-shaped)."""
    if len(pattern) > _RULE_CHARS:
        return pattern
    out: list[str] = []
    at = 0
    while at < len(pattern):
        if found := _REGEX_SKIP.match(pattern, at):
            pass
        elif found := _REGEX_GROUP.match(pattern, at):
            tail = "".join(out[-8:])
            if not _PAIR_OPEN.search(tail) and not tail[-1:].isspace():  # `Bearer (S3cret)` reads on
                out.append(",")
        elif found := _REGEX_CHAR.match(pattern, at):
            char = found.group(0)[1:]
            if len(char) > 1:  # \x41, \u0041: the character (past U+10FFFF, which re refuses: none)
                out.append(chr(code) if (code := int(char[1:], 16)) <= 0x10FFFF else "")
            else:
                out.append(_REGEX_CHARS.get(char, char))
        elif found := _REGEX_ATOM.match(pattern, at):
            if _PAIR_OPEN.search("".join(out[-8:])):
                # A regex value (`password=\S+`, `token:.*`, `code=\d+/\d+`) unless text goes on from
                # it: one character of the value (`password=[Hh]unter2`, `password=.*S3cret`), item 340.
                after = _REGEX_ZERO.match(pattern, found.end())
                rest = pattern[after.end() if after else found.end() :]
                value = not rest or rest[0] in "|)" or (after is not None and not rest[0].isalnum())
                out.append("," if value else "x")
        elif not (found := _REGEX_ZERO.match(pattern, at)):
            out.append(pattern[at])
            at += 1
            continue
        at = found.end()
    return "".join(out)


def _shown_value(text: str, *, regex: bool = False) -> str:
    """A value as messages show it (unquoted): whole unless ``_credential_shaped`` (with ``regex``,
    a regular expression as ``_regex_text`` reads it); else a URL's scheme, or its part before the
    first ``:``, ``=`` or white space when that is a name (``loki:…``, ``Bearer …``), else ``****``."""
    if not (_credential_shaped(_regex_text(text), regex=True) if regex else _credential_shaped(text)):
        return text
    url = _URL_START.match(text.strip())
    if url is not None:
        return f"{url.group(1)}://…"
    cut = re.search(r"[:=\s]", text.strip())
    head = text.strip()[: cut.start()] if cut else ""
    if cut is None or not _OPTION_NAME.fullmatch(head) or _credential_shaped(head):
        return "****"
    return f"{head}{cut.group(0)}…"


def shown_values(values: Iterable[str], *, regex: bool = False) -> str:
    """Values an option was given (``types``, ``namespaces``), comma-separated, each as
    ``_shown_value`` shows it: for ``check``'s filter line and cli.py's own refusals. With ``regex``
    (``message``, ``exclude_message``) each is a regular expression, whose syntax is no credential's
    mark: ``statuscode: 5\\d\\d`` and ``(?i:oomkilled|evicted)`` were shown ``Readiness …`` and ``****``."""
    return ",".join(_shown_value(value, regex=regex) for value in values)


def _shown_quoted(text: str) -> str:
    """``repr`` of a value (a sink's name) as ``_shown_value`` shows it."""
    return repr(_shown_value(text))


SINK_NAME_REFUSED = re.compile(r"[:=@/\x00-\x1f\x7f-\x9f]")
"""What a sink's name may not hold (item 339), the chart's rule (``checkNameText``): ``:``, ``=`` or ``@``
(the marks of a credential typed ``name:value``, ``name=value`` or ``user@…``), ``/`` (the name names
the sink's files in the data dir) or a control character; nor may it be longer than ``MAX_NAME_CHARS``.
The name is printed whole after start: in the logger's name (``eventrouter.sink.<name>``) on every line
of the sink, in the engine's and replay's log lines and as the ``sink`` label of every metric. A name
such as ``token:<password>`` (a flag pasted whole, a header's Name:Value) was refused only in the
chart (item 323): the router took it and printed it. Every other name (``es prod``, ``a+b``) is taken."""


def _refuse_sink_name(name: str, where: str, *, default: bool = False) -> None:
    """ConfigError if ``name`` holds a ``SINK_NAME_REFUSED`` character or is too long (``default``: it
    is the sink's type, which names a sink given no name). The message names the position (``config
    sinks[0]``, ``--sink #1``), the fault and the rule, never the name: a refused name may hold a
    credential (the chart's refusal shows none either, item 323), and its position finds it."""
    odd = SINK_NAME_REFUSED.search(name)
    if odd is None and len(name) <= MAX_NAME_CHARS:
        return
    subject = "its type (which names a sink given no name=)" if default else "its name (not shown)"
    if odd is None:
        # The words of the pipeline options' own error, which this check now precedes.
        fault = f"a name of {len(name)} characters; at most {MAX_NAME_CHARS} (not shown)"
    elif odd.group(0) in ":=@":
        fault = (
            f"{subject} holds a {odd.group(0)!r}, as a credential typed name:value, a flag pasted "
            "whole or a URL's user info does"
        )
    elif odd.group(0) == "/":
        fault = f"{subject} holds a '/', which would name a directory in its files' names"
    else:
        fault = f"{subject} holds a control character"
    # Shaped as the pipeline options' own errors (`option 'name': Value error, …`).
    raise ConfigError(
        f"{where}: option 'name': Value error, {fault}; a sink's name holds no ':', '=', '@', '/' or "
        f"control character and is at most {MAX_NAME_CHARS} characters: it is printed in every log "
        "line of the sink and in its metric labels, and names its files in the data dir"
    )


_TYPE_TEXT = re.compile(r"[A-Za-z0-9_. -]+")


def _shown_type(type_: str, plugins: Collection[str] = ()) -> str:
    """A sink type that is no type name, quoted as messages show it: whole when it holds only name
    characters and spaces and no credential's shape (``'bad type'``, a typo); else, as
    ``_shown_option`` shows a name, its part before the first ``:``, ``=`` or white space. A flag
    pasted whole into a YAML ``type:`` (``loki:http://admin:S3cret@loki:3100``) was printed whole in
    the pod log, as was a flag's ``Bearer abc.def:…``."""
    if _TYPE_TEXT.fullmatch(type_) and not _credential_shaped(type_):
        return repr(type_)
    cut = re.search(r"[:=\s]", type_.strip())
    head = type_.strip()[: cut.start()] if cut else ""
    if cut is None or not _OPTION_NAME.fullmatch(head) or _credential_shaped(head):
        return "(a type that is no type name, not shown)"
    if head in plugins and cut.group(0) == ":":
        hint = f"did you mean type: {head} and url: …?"
    else:
        hint = "a sink type is a name such as loki"
    return f"{head + cut.group(0) + '…'!r} (the rest not shown: {hint})"


def _texts_given(value: Any) -> list[str]:
    """The texts in an option's value as given: itself, a list's items, a mapping's keys and values,
    and the comma-separated items of each (list options split them, and messages quote one)."""
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")] if "," in value else []
        return [value, *(item for item in items if item)]
    if isinstance(value, Mapping):
        return [t for key, item in value.items() for t in (*_texts_given(key), *_texts_given(item))]
    if isinstance(value, list | tuple | set | frozenset):
        return [t for item in value for t in _texts_given(item)]
    return []


def _secret_parts(text: str) -> list[str]:
    """The parts of a credential-shaped ``text`` a validator may quote without the rest: its user
    info and password, the words after an authorization scheme, what follows its first ``:``, ``=``
    or white space, and its token-shaped runs."""
    parts = list(_token_runs(text))
    for found in re.finditer(r"([^\s/?#@]*)@", text):
        info = found.group(1)
        parts += [info, info.partition(":")[2]]
    parts += [m.group(2).strip() for m in _SCHEME_WORD.finditer(text) if m.group(1).lower() in _AUTH_SCHEMES]
    # Without base64 padding too: `silences` quotes a key cut at its first `=` (`silence key 'Basic YWRt…'`).
    parts += [part.rstrip("=") for part in parts if part.endswith("=") and len(part.rstrip("=")) >= 8]
    cut = re.search(r"[:=\s]", text.strip())
    if cut is not None:
        tail = text.strip()[cut.end() :].strip()
        # Also up to a / ? # of its own: a URL's validator quotes `admin:S3cret/x` as `'admin:S3cret/…'`.
        start = re.match(r"[^/?#@\s]*", tail)
        own = start.group(0) if start is not None and not tail[start.end() :].startswith("//") else ""
        parts += [tail, own]
    return [part for part in parts if part]


def _values_hidden(given: Mapping[str, Any] | None) -> Callable[[str], str]:
    """What takes the credential-shaped values of options ``given`` out of an error's text: a value
    quoted whole is shown as ``_shown_value`` shows it, a part of one (its password, its token) as
    ``****``. Validators quote what they refuse (``level must be Normal or Warning, not
    'loki:http://admin:S3cret@…'``, ``unknown time zone …``, ``cannot read '…'``), which reached the
    pod log whole; a typo is still quoted."""
    hidden = dict.fromkeys(
        t for value in (given or {}).values() for t in _texts_given(value) if _credential_shaped(t)
    )
    if not hidden:
        return lambda text: text
    whole = sorted(hidden, key=len, reverse=True)
    find = re.compile(
        "|".join(re.escape(form) for text in whole for form in dict.fromkeys((text, repr(text)[1:-1])))
    )
    shown = {form: _shown_value(text) for text in whole for form in (text, repr(text)[1:-1])}
    parts = _masker([part for text in whole for part in _secret_parts(text)])

    def mask(text: str) -> str:
        cut = parts(find.sub(lambda m: shown[m.group(0)], text))
        return text if cut == text else f"{cut} (a value that may hold a credential is not shown whole)"

    return mask


def _format_errors(
    where: str,
    exc: ValidationError,
    keys: Mapping[str, Any] | None = None,
    *,
    mask: Callable[[str], str] = str,
    given: Mapping[str, Any] | None = None,
) -> str:
    """``exc``'s errors, one line each naming the option; ``mask`` takes the secrets out of their
    texts (a validator's ``Value error, …`` may quote any option it reads), and so do the options
    ``given`` of a credential's shape (``_values_hidden``): pydantic's own texts quote no input, but
    the validators' do."""
    lines = []
    hide = _values_hidden(given)
    for err in exc.errors(include_url=False, include_input=False):
        parts = [str(p) for p in err["loc"]]
        msg = hide(mask(err["msg"]))
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        if not parts:
            shown = repr("(options)")
        elif _OPTION_NAME.fullmatch(parts[0]):
            # A nested part is a key as typed too: a YAML flow `headers: {Authorization:Bearer T}`
            # makes a header *named* "Authorization:Bearer T" (pydantic then finds its value missing).
            shown = repr(".".join([parts[0], *map(_shown_part, parts[1:])]))
        else:
            # The key as typed: what follows its first : = or space may be a credential.
            shown = _shown_option(parts[0])
        lines.append(f"{where}: option {shown}: {msg}")
    return "\n".join(lines)


def build_spec(entry: Mapping[str, Any], *, where: str, plugins: Mapping[str, SinkPlugin]) -> SinkSpec:
    entry = dict(entry)
    type_ = entry.pop("type", None)
    if not isinstance(type_, str) or not type_:
        raise ConfigError(f"{where}: every sink needs a 'type' (installed: {', '.join(sorted(plugins))})")
    plugin = plugins.get(type_)
    if plugin is None:
        shown = repr(type_) if _OPTION_NAME.fullmatch(type_) else _shown_type(type_, plugins)
        raise ConfigError(f"{where}: unknown sink type {shown} (installed: {', '.join(sorted(plugins))})")
    try:
        sink_cls = plugin.load()
    except PluginError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return spec_for_class(sink_cls, entry, type_=type_, where=where)


def spec_for_class(
    sink_cls: builtins.type[Sink[Any]], entry: Mapping[str, Any], *, type_: str, where: str = "sink"
) -> SinkSpec:
    """Validate flat options for a known sink class (also used by tests and embedders)."""
    if faults := class_faults(sink_cls):
        # As a plugin's entry point is refused at load: a plain `def send` was sent again for ever.
        raise ConfigError(f"{where}: sink type {type_!r} ({_class_name(sink_cls)}): " + "; ".join(faults))
    configured = dict(entry)
    origin = where
    entry = dict(entry)
    entry.pop("type", None)
    query_order: list[str] = list(entry.pop(QUERY_KEYS, ()))
    from_query = set(query_order)
    with_plus = set(entry.pop(QUERY_PLUS, ()))
    undecodable = sorted(entry.pop(QUERY_UNDECODABLE, ()))
    # Sinks may supply defaults fitting their purpose (alert robots: Warning only).
    defaults: Mapping[str, Any] = getattr(sink_cls, "default_filter", {}) or {}
    filter_keys = field_names(FilterOptions)
    pipeline_keys = field_names(PipelineOptions)
    filt = {k: v for k, v in entry.items() if k in filter_keys}
    type_keys = {"level", "types"}
    # A type filter left empty is none, as an empty list is elsewhere: a YAML `level:` or `level: ~`
    # (a value commented out, a blank Helm value), `types: []` or `types=` counted as given and
    # replaced a robot's Warning default with nothing, so it paged every Normal event. (`level=`
    # given as an empty text stays refused, item 93.)
    if filt.get("level", "") is None:
        del filt["level"]
    if "types" in filt and split_list(filt["types"]) in (None, []):
        del filt["types"]
    defaulted: set[str] = set()
    for k, v in defaults.items():
        # A user's own type filter replaces the sink's default type filter entirely.
        if k in type_keys and type_keys & filt.keys():
            continue
        if k not in filt:
            defaulted.add(k)
            filt[k] = v
    pipe = {k: v for k, v in entry.items() if k in pipeline_keys}
    own = {k: v for k, v in entry.items() if k not in filter_keys and k not in pipeline_keys}
    name = str(pipe.get("name") or type_)
    if isinstance(pipe.get("name") or type_, str):
        # Before anything else names the sink (a repeated name= is a list: refused below as such).
        _refuse_sink_name(name, where, default=not pipe.get("name"))
    shown = (
        _shown_quoted(name)
        if isinstance(pipe.get("name") or type_, str)
        else "(a name that is no text, not shown)"
    )
    where = f"{where} (sink {shown})"
    model = sink_cls.options_model
    known_keys = field_names(model) | COMMON_KEYS
    passthrough = getattr(sink_cls, "url_query_passthrough", False)
    for key in entry:
        if passthrough and key in _KUBE_EVENTER_WEBHOOK_KEYS and key not in known_keys:
            # Kept in the URL, they reached the endpoint and did nothing (no template, no filter).
            # Named before the tails below: a key spelt so is no rest of a credential.
            raise ConfigError(f"{where}: option {key!r}: {_KUBE_EVENTER_WEBHOOK_KEYS[key]}")
    for key, credential in _credential_tails(query_order, entry, model).items():
        if key not in known_keys:
            # Before anything else names the key: it may be the credential's rest. A key that is an
            # option's name is taken as that option (`access_token=T&level=Warnig` is named as usual).
            raise ConfigError(
                f"{where}: the query key after option {credential!r} is no option of this sink; it is "
                "not shown, as it may be the rest of that credential cut at a raw &: write & in a value "
                "as %26, or give the credential as env:NAME or file:/path"
                + (f"; a query parameter of the endpoint goes before {credential!r}" if passthrough else "")
            )
    if undecodable:
        # After the tails: a key that may be the rest of a credential is refused unnamed above.
        raise ConfigError(
            f"{where}: option {_shown_option(undecodable[0])}: its value holds a percent-escape that "
            "decodes to no UTF-8 text (it would be used with a U+FFFD in its place): write a % in a "
            "value as %25, or give a credential as env:NAME or file:/path"
        )
    _refuse_spelt_twice(entry, [FilterOptions, PipelineOptions, model], where)
    for key in entry:
        if key != key.strip() and key.strip() in known_keys:
            raise ConfigError(
                f"{where}: option {key.strip()!r} has white space around its name (a space after & "
                "in the query?)"
            )
    if passthrough:
        # Endpoints whose own URL carries query parameters (webhooks with ?token=...): keys the
        # router does not know stay in the URL instead of being refused as unknown options.
        known = field_names(model)
        extra = {k: v for k, v in own.items() if k not in known and k in from_query}
        for key in extra:
            if re.search(r"[:=\s]", key):
                # `?password:S3cret` (a header's Name:Value) made a key that was sent on to the
                # endpoint and shown wherever the URL is: in the configured line, `check`, retries.
                raise ConfigError(
                    f"{where}: query key {_shown_option(key)}: holds a ':', '=' or space, as a "
                    "credential typed name:value does; it is not sent on to the endpoint (write "
                    "name=value)"
                )
            values = extra[key] if isinstance(extra[key], list) else [extra[key]]
            if any(isinstance(v, str) and _REFERENCE.fullmatch(v.strip()) for v in values):
                # Sent on as the text "env:NAME" (a webhook's `token` was bearer_token's alias once).
                raise ConfigError(
                    f"{where}: query key {key!r} is no option of this sink: it stays in the URL as "
                    "written, where env: and file: are not read (give a credential in an option of "
                    "the sink, e.g. the webhook's bearer_token=env:NAME)"
                )
            close = difflib.get_close_matches(key, [*known, *COMMON_KEYS], n=1, cutoff=0.75)
            if close:
                log.warning(
                    "%s: query key %r is not an option and stays in the URL (sent to the endpoint); "
                    "did you mean %r?",
                    where,
                    key,
                    close[0],
                )
        if extra:
            own = {k: v for k, v in own.items() if k not in extra}
            pairs = [(k, x) for k, v in extra.items() for x in (v if isinstance(v, list) else [v])]
            sep = "&" if "?" in str(own.get("url", "")) else "?"
            own["url"] = str(own.get("url", "")) + sep + urllib.parse.urlencode(pairs)
    for key, value in own.items():
        info = model.model_fields.get(key)
        if (
            info is not None
            and info.annotation in (str, str | None)
            and isinstance(value, str)
            and _REFERENCE.fullmatch(value)
        ):
            # It was used as the literal text "env:ES_USER": a user name or tenant that never matched.
            raise ConfigError(
                f"{where}: option {key!r} takes its value as written; env: and file: references are "
                "read for credentials only"
            )
    _refuse_plus(with_plus, [FilterOptions, model], where)
    parts: list[tuple[type[BaseModel], dict[str, Any]]] = [
        (FilterOptions, filt),
        (PipelineOptions, pipe),
        (model, own),
    ]
    # The filter fields a + was read as a space in: `reasons=Back+Off` is refused, a reason with a
    # space written %20 (or in YAML) is taken.
    plus_fields = {
        name for name, info in FilterOptions.model_fields.items() if field_keys(name, info) & with_plus
    }
    validated: list[Any] = []
    for part_model, part in parts:
        values = {k: _coerce_query_value(part_model, k, v, where) for k, v in part.items()}
        try:
            validated.append(part_model.model_validate(values, context={QUERY_PLUS_FIELDS: plus_fields}))
        except ValidationError as exc:
            raise ConfigError(
                _format_errors(where, exc, mask=_given_masked(model, own), given=entry)
            ) from None
        except BaseException as exc:
            # pydantic turns only a ValueError or AssertionError of a validator into an error: a
            # plugin's TypeError (or an OSError) was a traceback and exit 1, its SystemExit an exit
            # with its code, naming nothing.
            if not _plugins_fault(exc):
                raise
            option = _option_at_fault(part_model, values, type(exc))
            info = part_model.model_fields.get(option)
            # Its text may quote the value: not when the option is a credential.
            secret = info is not None and "SecretStr" in str(info.annotation)
            text = "" if secret else _text_of(exc, _then(_given_masked(model, own), _values_hidden(entry)))
            raise ConfigError(
                f"{where}: option {option!r}: cannot be validated ({type(exc).__name__}"
                + (f": {text}" if text else "")
                + ")"
            ) from None
    filter_opts, pipeline_opts, options = validated
    _check_types(filter_opts, where, robot="types" not in defaulted and bool(type_keys & defaults.keys()))
    _refuse_control_characters(options, where)
    try:
        check_tls_files(options)
    except OptionError as exc:
        raise ConfigError(f"{where}: option {exc.option!r}: {_values_hidden(entry)(str(exc))}") from None
    return SinkSpec(
        name=name,
        type=type_,
        sink_cls=sink_cls,
        options=options,
        filter=filter_opts,
        pipeline=pipeline_opts,
        source=where,
        entry=configured,
        origin=origin,
        defaulted=frozenset(defaulted),
    )


def _class_name(cls: object) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def _check_types(filt: FilterOptions, where: str, *, robot: bool) -> None:
    """Types other than Normal and Warning, which Kubernetes' event recorders alone write (core/v1
    does not check them): refused on a sink whose default type filter they replace when they keep
    neither (an alert robot that would page nothing), else a warning. A near miss of Normal or
    Warning is refused by ``FilterOptions`` itself."""
    # Shown as values are: a type is any text to core/v1, and a flag or token pasted into it is one.
    other = [_shown_value(t) for t in filt.types if t not in ("Normal", "Warning")]
    if not other:
        return
    if robot and len(other) == len(filt.types):
        raise ConfigError(
            f"{where}: option 'types': {','.join(other)} has neither Normal nor Warning, the types "
            "of Kubernetes events, and replaces this sink's default level=Warning: it would send nothing"
        )
    log.warning(
        "%s: option 'types': %s is neither Normal nor Warning, the types of Kubernetes events; "
        "this sink keeps only events of the types listed",
        where,
        ",".join(other),
    )


_HEADER_REFERENCE = re.compile(rf"[^=:]+[=:]\s*(?:{_REFERENCE.pattern})\s*")

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token, as sinks/_headers.py

_SENSITIVE_HEADER = re.compile(r"auth|token|key|secret|pass|sign|cookie|session|credential", re.IGNORECASE)
"""A header whose name holds one of these words carries a credential (Authorization,
Proxy-Authorization, Cookie, X-Api-Key, X-Hub-Signature…); the webhook's 401 message names headers
with nearly the same words."""

_KUBE_EVENTER_WEBHOOK_KEYS = {
    "custom_body_configmap": (
        "kube-eventer's body template, which this sink does not read from a ConfigMap: remove it, mount "
        "the ConfigMap as a file and give body_template_file=/path (see docs/migration.md, webhook)"
    ),
    "custom_body_configmap_namespace": (
        "kube-eventer's body template's namespace: remove it, mount the ConfigMap as a file and give "
        "body_template_file=/path (see docs/migration.md, webhook)"
    ),
    "reason": (
        "did you mean reasons? (kube-eventer's reason= was a regular expression matched anywhere: "
        "reason=Failed is reasons=Failed* or *Failed*)"
    ),
}
"""kube-eventer's webhook options a webhook here would send on to its endpoint, where they did
nothing: each refused naming what replaces it (a real endpoint parameter of the same name would have
to be written into a body or header instead)."""


def _is_credential(key: str, value: Any, model: type[BaseModel]) -> bool:
    """Whether the query value ``value`` of the secret option ``key`` is a credential given as a
    literal: not an ``env:``/``file:`` reference, and for a header (a mapping option such as
    ``header=Name=Value``) only when its name says it is one: ``Content-Type=application/json``
    before kube-eventer's ``custom_body_configmap`` is none."""
    if not isinstance(value, str):
        return True
    if _REFERENCE.fullmatch(value.strip()) or _HEADER_REFERENCE.fullmatch(value):
        return False
    info = next((i for n, i in model.model_fields.items() if key in field_keys(n, i)), None)
    if info is not None and getattr(info.annotation, "__origin__", info.annotation) is dict:
        cut = min((i for i in (value.find(":"), value.find("=")) if i > 0), default=-1)
        name = value[:cut].strip()
        # A value that is no Name=Value (a credential cut elsewhere) counts as one.
        return cut < 0 or not _HEADER_NAME.fullmatch(name) or bool(_SENSITIVE_HEADER.search(name))
    return True


def _credential_tails(
    order: Sequence[str], entry: Mapping[str, Any], model: type[BaseModel]
) -> dict[str, str]:
    """The query keys that directly follow a credential given as a literal, each with that
    credential's key. ``password=Xq7&Lm9vR2`` is cut at its raw &: ``Lm9vR2`` becomes a key, which an
    "unknown option" error printed and a webhook sent on in its URL (to the endpoint, its logs,
    ``check``). A key after an ``env:``/``file:`` reference, or after a header that is no credential,
    is no such tail."""
    secrets = {
        alias
        for name, info in model.model_fields.items()
        if "SecretStr" in str(info.annotation)
        for alias in field_keys(name, info)
    }
    tails: dict[str, str] = {}
    for i, (before, key) in enumerate(itertools.pairwise(order)):
        if before not in secrets:
            continue
        value = entry.get(before)
        values = value if isinstance(value, list) else [value]
        # The value right before the key: of a repeated key (header=A&header=B), its occurrence there.
        nth = order[: i + 1].count(before) - 1
        if len(values) == order.count(before):
            values = [values[nth]]
        if any(_is_credential(before, v, model) for v in values):
            tails.setdefault(key, before)
    return tails


_REGEX_OPTIONS = frozenset({"message", "message_regex", "exclude_message"})


def _refuse_plus(keys: set[str], models: Sequence[type[BaseModel]], where: str) -> None:
    """A ``+`` in a query value is a space once decoded: a base64 credential given as a literal
    (``secret=k3y+Tok/en==``) was changed silently (401 for ever), and ``message=Back-off.+restarting``
    kept nothing. Refused for credentials and regular expressions, where a space is surely not what
    was meant (``+`` elsewhere is still a space: kube-eventer's flags rely on it), naming the option,
    never the value."""
    for key in sorted(keys):
        if key in _REGEX_OPTIONS:
            raise ConfigError(
                f"{where}: option {key!r}: a + in a query reads as a space: write %20 for a space, %2B "
                "for a plus, or give the filter in a YAML sinks: entry"
            )
        for model in models:
            info = next((i for n, i in model.model_fields.items() if key in field_keys(n, i)), None)
            if info is not None and "SecretStr" in str(info.annotation):
                raise ConfigError(
                    f"{where}: option {key!r}: a + in a query reads as a space: write %20 for a space, "
                    "%2B for a plus, or use env:/file:"
                )


def _refuse_spelt_twice(entry: Mapping[str, Any], models: Sequence[type[BaseModel]], where: str) -> None:
    """An option given under two of its names (``header=A&headers=B``, ``components=`` beside
    ``component=``): pydantic took one and called the other an "unknown option", a documented
    name the operator was told does not exist."""
    for model in models:
        for name, info in model.model_fields.items():
            given = [key for key in entry if key in field_keys(name, info)]
            if len(given) > 1:
                shown = " and ".join(map(repr, sorted(given)))
                raise ConfigError(
                    f"{where}: options {shown} are the same option given twice: use one name (repeat "
                    "it for several values)"
                )


def _option_at_fault(model: type[BaseModel], values: Mapping[str, Any], error: type[BaseException]) -> str:
    """The option whose validator raised ``error`` (validated alone), else ``(options)``: a
    model validator's, or one that only fails beside others."""
    for key, value in values.items():
        try:
            model.model_validate({key: value})
        except error:
            return key
        except BaseException as exc:  # missing required options and the like: not this one
            if not _plugins_fault(exc):
                raise
            continue
    return "(options)"


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""What no credential holds; a tab, which an HTTP header value may carry, is left alone."""


def _refuse_control_characters(options: BaseModel, where: str) -> None:
    """A credential with a line break (``echo token | base64`` gives one; ``env:`` kept it) made every
    request fail in aiohttp ("Forbidden control character") and the sink retried for ever. Refused
    here, after the sink's own checks (which name a header), naming the option and never the value."""
    for name in type(options).model_fields:
        value = getattr(options, name)
        items: list[tuple[str, Any]] = [(name, value)]
        if isinstance(value, list | tuple):
            items = [(f"{name}.{i}", item) for i, item in enumerate(value)]
        elif isinstance(value, dict):
            items = [(f"{name}.{key}", item) for key, item in value.items()]
        for option, item in items:
            if isinstance(item, SecretStr) and _CONTROL.search(item.get_secret_value()):
                raise ConfigError(
                    f"{where}: option {option!r}: contains a control character (a line break?), which "
                    "no credential holds; check the Secret or file it comes from (`echo -n`, not `echo`)"
                )


class RouterConfig(BaseModel):
    """The YAML file (``--config``). Command-line flags override it."""

    model_config = {"extra": "forbid"}

    cluster_name: str = ""
    namespaces: list[str] = []
    data_dir: str | None = None
    field_selector: str = ""
    sinks: list[dict[str, Any]] = []


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML keeps the last one silently,
    which dropped a whole `sinks:` list or a filter without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *defaults`: keys of the mapping itself override merged ones, as YAML says;
                # SafeLoader merges them (flatten_mapping) in construct_mapping below.
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, str | int | float | bool) and key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> RouterConfig:
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        # Where, and what is wrong, but never the line itself: it may hold a credential.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    try:
        return RouterConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_format_errors(f"config file {path}", exc)) from None


def build_specs(
    flags: Sequence[str], yaml_sinks: Sequence[Mapping[str, Any]] = (), *, yaml_source: str = "config"
) -> list[SinkSpec]:
    plugins = discover()
    specs: list[SinkSpec] = []
    for i, entry in enumerate(yaml_sinks):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{yaml_source} sinks[{i}]: expected a mapping")
        where = f"{yaml_source} sinks[{i}]"
        if isinstance(entry.get("name"), str) and entry["name"]:
            # Before its url's query is read, whose errors name the sink.
            _refuse_sink_name(entry["name"], where)
        specs.append(build_spec(_with_url_query(entry, where), where=where, plugins=plugins))
    for i, flag in enumerate(flags, 1):
        where = f"--sink #{i}"
        specs.append(build_spec(parse_sink_flag(flag, where=where), where=where, plugins=plugins))
    seen: dict[str, str] = {}
    files: dict[str, SinkSpec] = {}
    for spec in specs:
        # The names by the credential rule, as in every other message of the sink.
        if spec.name in seen:
            raise ConfigError(
                f"{spec.source}: sink name {_shown_quoted(spec.name)} is already used by {seen[spec.name]}; "
                "give each instance a distinct name= option"
            )
        seen[spec.name] = spec.source
        # Two names that make the same file name would share a spool, checkpoint and dead letters.
        other = files.setdefault(safe_name(spec.name), spec)
        if other is not spec:
            # The file name spells either name's password again (`admin_S3cret_loki`), whatever its case.
            hidden = _credential_shaped(spec.name) or _credential_shaped(other.name)
            stored = "one file name" if hidden else repr(safe_name(spec.name))
            raise ConfigError(
                f"{spec.source}: sink name {_shown_quoted(spec.name)} and {_shown_quoted(other.name)} "
                f"({other.source}) are both stored as {stored} in the data dir; give them names that "
                "differ in letters, digits, '_', '.' or '-'"
            )
    return specs
