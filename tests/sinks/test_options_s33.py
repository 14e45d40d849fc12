"""Sink options that replaced one another without a word (item 270, session 33): a Loki ``headers=``
entry that replaced ``tenant`` (X-Scope-OrgID) or the credentials (Authorization), and user info in
the url beside ``username=``/``password=`` (Loki, webhook, Elasticsearch), where one pair was dropped.
Refused naming the options, never the values; what is still taken is delivered, against the project's
Loki and webhook receivers."""

from __future__ import annotations

import base64
import logging
from collections import Counter

import pytest

from eventrouter.config import ConfigError, build_specs
from eventrouter.sink import SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.webhook import WebhookReceiver
from eventrouter.testing.waiting import until

VALUE = "Zq9HeaderValue77"
"""A header's value: never in a message."""


def _context(name: str) -> SinkContext:
    return SinkContext(name=name, cluster="test", data_dir=None, logger=logging.getLogger(f"test.{name}"))


def _refused(flag: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_specs([flag])
    return str(info.value)


@pytest.mark.parametrize("header", ["X-Scope-OrgID", "x-scope-orgid", "X-SCOPE-ORGID"])
def test_a_header_that_would_replace_the_tenant_is_refused(header: str) -> None:
    """`tenant=ops&headers=X-Scope-OrgID:dev` wrote every entry to `dev` (in another letter case, a
    second header line Loki ignores): the events were where the operator did not look."""
    message = _refused(f"loki:http://loki:3100?tenant=ops&headers={header}:{VALUE}")
    assert "headers: an X-Scope-OrgID header would replace tenant: set one of them" in message
    assert VALUE not in message


@pytest.mark.parametrize("header", ["Authorization", "authorization", "AUTHORIZATION"])
@pytest.mark.parametrize(
    ("auth", "replaced"),
    [
        ("?username=u&password=p&", "basic auth"),
        ("?bearer_token=t&", "bearer_token"),
        ("@?", "basic auth"),  # user info in the url
    ],
    ids=["username", "bearer_token", "userinfo"],
)
def test_a_header_that_would_replace_the_credentials_is_refused(
    header: str, auth: str, replaced: str
) -> None:
    """`username=u&password=p&headers=Authorization:Bearer …`: the header replaced the basic auth,
    every push 401, retried until dropped. The webhook refused it already."""
    url = "http://u:p@loki:3100" if auth == "@?" else "http://loki:3100"
    query = "?" if auth == "@?" else auth
    message = _refused(f"loki:{url}{query}headers={header}:Bearer%20{VALUE}")
    assert f"headers: an Authorization header would replace {replaced}: set one of them" in message
    assert VALUE not in message


async def test_a_tenant_header_alone_still_reaches_its_tenant() -> None:
    """Without `tenant`, the header is the only tenant (a whole `Name: value` from a Secret): taken."""
    async with LokiReceiver(auth_enabled=True) as loki:
        (spec,) = build_specs([f"loki:{loki.url}?headers=X-Scope-OrgID:dev"])
        sink = spec.build(_context("loki"))
        await sink.start()
        await sink.send([make_occurrence()])
        await sink.aclose()
        await until(lambda: len(loki.entries) == 1)
        assert Counter(e.tenant for e in loki.entries) == {"dev": 1}


@pytest.mark.parametrize(
    "flag",
    [
        "loki:http://urluser:urlpass@loki:3100?username=c&password=d",
        "loki:http://urluser:urlpass@loki:3100?username=c",
        "webhook:https://urluser:urlpass@hook.example/x?username=c&password=d",
        "webhook:https://urluser@hook.example/x?password=d",
        "elasticsearch:http://urluser:urlpass@es:9200?username=c&password=d",
        "elasticsearch:http://es:9200?hosts=http://urluser:urlpass@es2:9200&esUserName=c",
    ],
    ids=["loki", "loki-username", "webhook", "webhook-password", "elasticsearch", "elasticsearch-hosts"],
)
def test_user_info_and_username_together_are_refused(flag: str) -> None:
    """One pair was used and the other dropped without a word (Loki and webhook: the options)."""
    message = _refused(flag)
    assert (
        "username/password and user info in" in message
        and "give basic auth twice: set one of them" in message
    )
    assert "urlpass" not in message and "urluser" not in message


async def test_basic_auth_from_either_place_alone_and_a_user_without_a_password_are_sent() -> None:
    """What is still taken reaches the endpoint: the url's user info, the options, and a user with no
    password written by leaving `password` out (an empty `password=` is refused, item 270)."""
    async with WebhookReceiver() as hook:
        host = hook.url.removeprefix("http://")  # 127.0.0.1:PORT/hook
        flags = [
            f"webhook:http://urluser:urlpass@{host}/a",
            f"webhook:{hook.url}/b?username=c&password=d&name=b",
            f"webhook:{hook.url}/c?username=apikey&name=c",
        ]
        for spec in build_specs(flags):
            sink = spec.build(_context(spec.name))
            await sink.start()
            await sink.send([make_occurrence()])
            await sink.aclose()
        sent = {r.path: r.headers.get("Authorization") for r in hook.requests if r.method == "POST"}
    expected = {"/hook/a": "urluser:urlpass", "/hook/b": "c:d", "/hook/c": "apikey:"}
    assert sent == {
        path: "Basic " + base64.b64encode(pair.encode()).decode() for path, pair in expected.items()
    }
    with pytest.raises(ConfigError, match="option 'password': Value error, empty"):
        build_specs([f"webhook:{hook.url}/c?username=apikey&password="])


def test_a_webhook_password_without_a_user_is_refused() -> None:
    """It was never sent: no username and no user info, so no basic auth at all."""
    assert "password needs username" in _refused("webhook:https://hook.example/x?password=d")
