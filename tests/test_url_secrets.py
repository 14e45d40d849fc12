"""Credentials in URLs, never shown: as aiohttp's errors quote them (yarl's encoding), and when a
password written raw makes the URL malformed.

A password with a raw ``/``, ``?`` or ``#`` ends the URL's address inside it: the parser then reads
its start as the port and its error quoted it (``'http://svc:Sup3r/…': Port could not be cast to
integer value as 'Sup3r'``), for every option validated as a URL, in every start's log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yarl

from eventrouter.config import ConfigError, build_specs
from eventrouter.options import http_url
from eventrouter_sinks._scrub import credentials, scrub

# Generated passwords: characters yarl percent-encodes (space, @, #, non-ASCII) with others it keeps.
PASSWORDS = ["Xy7!k@9#tQ", "pa ss$word99", "p@ss w0rd!", "pässwort$1", "a;b,c=d*e+f"]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("written", ["encoded", "lower-case escapes"])
def test_credentials_cover_the_user_info_as_yarl_writes_it(password: str, written: str) -> None:
    """aiohttp quotes a URL as yarl writes it (``Xy7!k%409%23tQ``): neither the password, nor
    ``quote`` nor ``quote_plus`` of it. ``credentials`` gave only those, so ``scrub`` left the
    mixed form in the text of a proxy's refusal, in every sink that quotes an error."""
    user = "ops team!"
    userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}"
    if written == "lower-case escapes":  # as some tools write them; yarl normalises the case
        userinfo = "%".join(
            part[:2].lower() + part[2:] if i else part for i, part in enumerate(userinfo.split("%"))
        )
    proxy = f"http://{userinfo}@proxy.corp:3128"
    found = credentials(urls=[proxy])
    quoted = yarl.URL(proxy)
    assert quoted.raw_password in found and quoted.raw_user in found
    error = f"407, message='Proxy Authentication Required', url='{quoted}'"  # aiohttp's text
    shown = scrub(error, found)
    assert shown == "407, message='Proxy Authentication Required', url='http://****:****@proxy.corp:3128'"


RAW = [
    ("#", "http://svc:Sup3r#Pw@proxy.corp:3128"),
    ("/", "http://svc:Sup3r/Pw@proxy.corp:3128"),
    ("?", "http://svc:Sup3r?Pw@proxy.corp:3128"),
]


@pytest.mark.parametrize("option", ["url", "proxy", "healthcheck_url", "node"])
@pytest.mark.parametrize(("char", "url"), RAW)
def test_a_raw_slash_query_or_hash_in_a_password_is_refused_without_showing_it(
    option: str, char: str, url: str
) -> None:
    """The error names the option and what to do, and shows nothing of the user info: neither
    the user name nor the start of the password the parser took for a port."""
    with pytest.raises(ValueError, match=rf"^{option} ") as info:
        http_url(url, option=option)
    text = str(info.value)
    assert "Sup3r" not in text and "svc" not in text and "Pw" not in text
    assert "percent-encode any / ? # @" in text


@pytest.mark.parametrize(
    "url",
    [
        "http://svc:1234/Pw@proxy.corp:3128",  # a password starting with digits: a valid port
        "http://svc:1234#Pw@proxy.corp:3128",
        "http://svc:1234?Pw@proxy.corp:3128",
        "http://svc:a@b/Pw@proxy.corp:3128",  # a raw @ too: "b" would be the host
    ],
)
def test_a_proxy_whose_password_ends_its_address_early_is_refused_without_showing_it(url: str) -> None:
    """Where the start of the password is a number, the URL parses (host ``svc``, port 1234): a
    proxy at the wrong address, unreachable at every request. A proxy has no path, query or
    fragment, so such a URL is refused, and the error shows none of it."""
    http_url(url)  # a URL may have a path, a query and a fragment
    with pytest.raises(
        ValueError, match=r"^proxy must be http\(s\)://\[user:password@\]host\[:port\]"
    ) as info:
        http_url(url, option="proxy", address_only=True)
    text = str(info.value)
    assert "svc" not in text and "1234" not in text and "Pw" not in text and ":a@b" not in text
    assert "percent-encode any / ? # @" in text
    assert http_url("http://svc:pw@proxy.corp:3128/", option="proxy", address_only=True).port == 3128


@pytest.mark.parametrize("char", ["#", "/", "?"])
@pytest.mark.parametrize("given", ["as written", "file:"])
@pytest.mark.parametrize(
    "entry",
    [
        {"type": "dingtalk", "url": "http://gw:80/robot/send?access_token=t"},
        {"type": "wecom", "key": "k"},
    ],
)
def test_a_sink_given_such_a_proxy_is_a_configuration_error_without_it(
    char: str, given: str, entry: dict[str, Any], tmp_path: Path
) -> None:
    """As the configuration is loaded (every start, every rotation of a ``file:`` proxy): the
    error names the sink and the option, never the credentials, however the proxy is given."""
    proxy = f"http://svc:Sup3r{char}Pw@proxy.corp:3128"
    secret = tmp_path / "proxy"
    secret.write_text(proxy + "\n")
    with pytest.raises(ConfigError) as info:
        build_specs([], [{**entry, "proxy": proxy if given == "as written" else f"file:{secret}"}])
    text = str(info.value)
    assert "option 'proxy': Value error, proxy " in text
    assert "Sup3r" not in text and "svc" not in text and "Pw" not in text
    assert "percent-encode any / ? # @" in text


@pytest.mark.parametrize("char", ["#", "/"])
@pytest.mark.parametrize(
    "entry",
    [
        {"type": "webhook", "url": "http://svc:Sup3rCHARPw@hook.corp:8080/x"},
        {"type": "webhook", "url": "http://hook/x", "healthcheck_url": "http://svc:Sup3rCHARPw@hook.corp/x"},
        {"type": "loki", "url": "http://svc:Sup3rCHARPw@loki:3100"},
        {"type": "dingtalk", "url": "http://svc:Sup3rCHARPw@gw:80/robot/send?access_token=t"},
        {"type": "elasticsearch", "url": "http://es0:9200,http://svc:Sup3rCHARPw@es:9200"},
    ],
)
def test_a_url_option_with_such_a_password_is_a_configuration_error_without_it(
    char: str, entry: dict[str, Any]
) -> None:
    """Not only the proxy: a gateway's password in a robot's or a webhook's URL, Loki's, a node's."""
    entry = {k: v.replace("CHAR", char) for k, v in entry.items()}
    with pytest.raises(ConfigError) as info:
        build_specs([], [entry])
    text = str(info.value)
    assert (
        "Value error, url " in text or "Value error, healthcheck_url " in text or "Value error, node " in text
    )
    assert "Sup3r" not in text and "svc" not in text and "Pw" not in text
    assert "percent-encode any / ? # @" in text


def test_the_webhook_query_put_back_into_its_url_shows_nothing_of_a_password_cut_at_a_raw_query() -> None:
    """A webhook keeps query keys it does not know in its URL, put back encoded: the rest of a
    password cut at a raw ``?`` comes back as ``?Pw%40hook…=``, and the address before it is the user
    name and the start of the password."""
    with pytest.raises(ConfigError) as info:
        build_specs([], [{"type": "webhook", "url": "http://svc:Sup3r?Pw@hook.corp:8080/x"}])
    text = str(info.value)
    assert "option 'url': Value error, url 'http://…'" in text
    assert "Sup3r" not in text and "svc" not in text and "Pw" not in text


def test_the_parsers_own_text_is_never_quoted() -> None:
    """Its text quotes what it could not read (the port, or the whole address): replaced by ours."""
    with pytest.raises(ValueError) as nfkc:  # a fullwidth solidus: read as "/" once normalised
        http_url("http://svc:Sup3r\uff0fPw@proxy.corp:3128", option="proxy")
    assert "Sup3r" not in str(nfkc.value) and "svc" not in str(nfkc.value)
    assert "NFKC" in str(nfkc.value)
    with pytest.raises(ValueError, match=r"^url 'http://h:1_0': Port could not be cast to an integer$"):
        http_url("http://h:1_0")


CUT_AT_A_QUERY = [
    # (--sink flag or YAML entry, the sink's name in the error)
    ("dingtalk:http://svc:Sup3r?Pw@gw:80/robot/send?access_token=x", "dingtalk"),
    ("loki:http://svc:Sup3r?Pw@loki:3100?tenant=t", "loki"),
    ("loki:http://svc:Sup3r?Pw/x@loki:3100", "loki"),  # a / after the ?: still the password
    ("loki:http://svc:Sup3r?P=w&x@loki:3100", "loki"),  # = and & in it: no key holds the @
    ("loki:http://svc:Sup3r#P?w@loki:3100", "loki"),
    ("elasticsearch:http://es0:9200,http://svc:Sup3r?Pw@es:9200", "elasticsearch"),
    ("loki:http://svc:1234?Pw@loki:3100", "loki"),  # starting with digits: read as a port
    ("webhook:http://svc:1234?Pw@hook.corp/x", "webhook"),  # was valid: sent to svc:1234, shown
    (
        {"type": "dingtalk", "name": "alerts", "url": "http://svc:Sup3r?Pw@gw/robot/send?access_token=t"},
        "alerts",
    ),
    ({"type": "loki", "url": "http://svc:Sup3r?Pw@loki:3100", "tenant": "t"}, "loki"),
]


@pytest.mark.parametrize(("given", "name"), CUT_AT_A_QUERY)
def test_a_raw_query_in_a_url_password_is_refused_naming_the_sink_and_url_only(
    given: str | dict[str, str], name: str
) -> None:
    """The configuration split the URL at the password's raw ``?``: the rest of it was named as an
    unknown option (``option 'Pw@gw:80/robot/send?access_token'``) and its start shown as the url's
    host:port (``url 'http://svc:Sup3r'``), or, with a webhook, put back into a valid URL to svc:1234
    and shown at every start."""
    with pytest.raises(ConfigError) as info:
        build_specs(*(([given], []) if isinstance(given, str) else ([], [given])))
    text = str(info.value)
    assert text.count("\n") == 0 and f"(sink {name!r}): option 'url': Value error, url " in text
    for part in ("Sup3r", "Pw", "svc", "1234", "P=w"):
        assert part not in text
    assert "percent-encode any / ? # @" in text


def test_an_at_in_a_query_value_after_a_valid_address_is_an_option_as_before() -> None:
    """Not refused: a password option given in the query, with an @, as the docs show them."""
    (loki,) = build_specs(["loki:http://loki:3100?tenant=x"])
    assert loki.options.url == "http://loki:3100" and loki.options.tenant == "x"  # type: ignore[attr-defined]
    (loki,) = build_specs([], [{"type": "loki", "url": "http://loki:3100?username=u&password=p@ss"}])
    assert loki.options.password.get_secret_value() == "p@ss"  # type: ignore[attr-defined]
    (es,) = build_specs(["elasticsearch:http://es0:9200,http://es1?username=u&password=p@ss"])
    assert es.options.password.get_secret_value() == "p@ss"  # type: ignore[attr-defined]
    (hook,) = build_specs(["webhook:http://u:p%3Fw@hook/x?team=a@b"])  # ? encoded, and a key of its own
    assert hook.options.url == "http://u:p%3Fw@hook/x?team=a%40b"


def test_an_unknown_option_whose_name_holds_an_at_is_not_quoted() -> None:
    """A name no option has, likely a piece of a URL's user info (a YAML key)."""
    with pytest.raises(ConfigError) as info:
        build_specs([], [{"type": "loki", "url": "http://loki:3100", "svc:Sup3r?Pw@loki": "x"}])
    text = str(info.value)
    assert text == "config sinks[0] (sink 'loki'): option (a name holding an @, not shown): unknown option"
