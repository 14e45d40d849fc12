"""webhook sink against the recording receiver (eventrouter.testing.receivers.webhook) on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yarl

from eventrouter import (
    OK,
    Occurrence,
    OutcomeKind,
    RetryableError,
    Sink,
    SinkContext,
    SinkError,
    normalise,
)
from eventrouter.config import ConfigError, build_spec, build_specs
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.engine.reload import SinkReloader
from eventrouter.metrics import Metrics
from eventrouter.options import PipelineOptions
from eventrouter.plugins import discover
from eventrouter.testing import make_occurrence, recorded_watch
from eventrouter.testing.receivers.webhook import RecordedRequest, WebhookReceiver
from eventrouter.testing.secret_volume import SecretVolume
from eventrouter.testing.tls import certificate, server_context
from eventrouter.testing.waiting import until
from eventrouter_sinks.webhook import (
    WebhookOptions,
    WebhookSink,
    github_signature,
    redact_url,
    standard_webhooks_key,
    standard_webhooks_signature,
)

LOG = logging.getLogger("test.webhook")
WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def config_error(**entry: Any) -> str:
    """The configuration error (exit 2) for a webhook sink entry, as `eventrouter run` prints it."""
    with pytest.raises(ConfigError) as info:
        build_spec({"type": "webhook", **entry}, where="sink", plugins=discover())
    return str(info.value)


def context(send_timeout: float = 30.0) -> SinkContext:
    return SinkContext(name="webhook", cluster="test", data_dir=None, logger=LOG, send_timeout=send_timeout)


@asynccontextmanager
async def webhook(**options: Any) -> AsyncIterator[WebhookSink]:
    sink = WebhookSink(WebhookOptions.model_validate(options), context())
    try:
        await sink.start()
        yield sink
    finally:
        await sink.aclose()


@pytest.fixture
async def hook() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as receiver:
        yield receiver


def recorded() -> list[Occurrence]:
    return [normalise(e["object"], cluster="rec") for e in recorded_watch() if e["type"] != "DELETED"]


def special(occs: list[Occurrence]) -> tuple[Occurrence, Occurrence]:
    chinese = next(o for o in occs if o.record["message"].startswith("就绪探针失败"))
    long = next(o for o in occs if len(o.record["message"]) == 20_000)
    return chinese, long


def kinds(outcomes: Any) -> list[OutcomeKind]:
    return [o.kind for o in outcomes]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- bodies -----------------------------------------------------------------------------------------


async def test_batch_mode_posts_one_json_array_per_batch(hook: WebhookReceiver) -> None:
    occs = recorded()[:25]
    async with webhook(url=hook.url) as sink:
        assert await sink.send(occs) == [OK] * 25
    assert len(hook.requests) == 1
    req = hook.requests[0]
    assert (req.method, req.status, req.headers["Content-Type"]) == ("POST", 200, "application/json")
    assert req.json() == [o.record for o in occs]


async def test_event_mode_sends_one_request_per_occurrence_with_put(hook: WebhookReceiver) -> None:
    occs = recorded()[:4]
    async with webhook(url=hook.url, mode="event", method="put") as sink:
        assert await sink.send(occs) == [OK] * 4
    assert [r.method for r in hook.requests] == ["PUT"] * 4
    assert [r.json() for r in hook.requests] == [o.record for o in occs]


async def test_include_raw_adds_the_event_object(hook: WebhookReceiver) -> None:
    occ = make_occurrence()
    async with webhook(url=hook.url, mode="event", include_raw=True) as sink:
        await sink.send([occ])
    assert hook.requests[0].json()["raw"] == occ.raw


TEMPLATE = (
    '{"text": "{{reason}} on {{involved_object.name}}: {{message}}", "count": {{count}}, '
    '"labels": {{labels}}, "none": "{{labels.nope}}", "null": {{annotations.nope}}, '
    '"rv": "{{raw.metadata.resourceVersion}}"}'
)


async def test_body_template_escapes_recorded_hard_messages(hook: WebhookReceiver) -> None:
    chinese, long = special(recorded())
    async with webhook(url=hook.url, mode="event", body_template=TEMPLATE) as sink:
        assert await sink.send([chinese, long]) == [OK, OK]
    assert [r.status for r in hook.requests] == [200, 200]  # the receiver parsed valid JSON
    for req, occ in zip(hook.requests, (chinese, long), strict=True):
        body = req.json()
        rec = occ.record
        assert body["text"] == f"{rec['reason']} on {rec['involved_object']['name']}: {rec['message']}"
        assert body["count"] == rec["count"]
        assert body["labels"] == rec["labels"]
        assert body["none"] == ""
        assert body["null"] is None
        assert body["rv"] == occ.raw["metadata"]["resourceVersion"]
    assert '"quoted"' in hook.requests[0].json()["text"] and "\n" in hook.requests[0].json()["text"]
    assert len(hook.requests[1].json()["text"]) > 20_000


async def test_body_template_in_batch_mode_is_a_json_array(hook: WebhookReceiver) -> None:
    chinese, long = special(recorded())
    async with webhook(url=hook.url, body_template='{"m": "{{message}}", "ns": {{namespace}}}') as sink:
        assert await sink.send([chinese, long]) == [OK, OK]
    assert hook.requests[0].json() == [
        {"m": chinese.record["message"], "ns": chinese.record["namespace"]},
        {"m": long.record["message"], "ns": long.record["namespace"]},
    ]


async def test_body_template_from_file(hook: WebhookReceiver, tmp_path: Path) -> None:
    path = tmp_path / "body.json"
    path.write_text('{"msgtype": "text", "text": {"content": "{{type}}: {{message}}"}}', encoding="utf-8")
    occ = make_occurrence(message='a "b" \\ c')
    async with webhook(url=hook.url, mode="event", body_template_file=str(path)) as sink:
        await sink.send([occ])
    assert hook.requests[0].json() == {"msgtype": "text", "text": {"content": 'Warning: a "b" \\ c'}}


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ('{"text": "{{message}}"', "Value error, body_template is not valid JSON"),
        ('{"text": {{message}} {{reason}}}', "Value error, body_template is not valid JSON"),
        ("{{message}}}", "Value error, body_template is not valid JSON"),
        (
            '{"text": "{{mesage}}"}',
            r"Value error, body_template placeholder \{\{mesage\}\} names no record field",
        ),
        ('{"text": "{{involved_object.colour}}"}', r"\{\{involved_object.colour\}\} names no record field"),
    ],
)
def test_invalid_body_template_is_a_configuration_error(tmp_path: Path, template: str, match: str) -> None:
    assert re.search(match, config_error(url="http://h/x", body_template=template))
    file = tmp_path / "body.json"
    file.write_text(template)
    error = config_error(url="http://h/x", body_template_file=str(file))
    assert re.search(match.replace("body_template", "body_template_file"), error)
    assert "option 'body_template_file': Value error, cannot read" in config_error(
        url="http://h/x", body_template_file=str(tmp_path / "no")
    )
    assert "not both" in config_error(url="http://h/x", body_template="{}", body_template_file=str(file))


async def test_unencodable_record_is_rejected_alone(hook: WebhookReceiver) -> None:
    good, bad = make_occurrence(message="good"), make_occurrence(message="bad")
    bad.record = {**bad.record, "count": 2**70}
    async with webhook(url=hook.url) as sink:
        outcomes = await sink.send([good, bad, good])
    assert kinds(outcomes) == [OutcomeKind.OK, OutcomeKind.REJECT, OutcomeKind.OK]
    assert [x["message"] for x in hook.requests[0].json()] == ["good", "good"]


# -- signatures -------------------------------------------------------------------------------------


def test_github_signature_test_vector() -> None:
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert github_signature(b"It's a Secret to Everybody", b"Hello, World!") == expected


def test_standard_webhooks_test_vector() -> None:
    # The vector of the Standard Webhooks reference libraries.
    key = standard_webhooks_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    sig = standard_webhooks_signature(
        key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def test_github_signature_verified_by_receiver() -> None:
    secret = "It's a Secret to Everybody"
    async with WebhookReceiver(secret=secret) as hook:
        async with webhook(url=hook.url, secret=secret) as sink:
            assert await sink.send(recorded()[:3]) == [OK] * 3
        async with webhook(url=hook.url, secret="wrong") as sink:
            with pytest.raises(RetryableError) as info:
                await sink.send(recorded()[:2])
        async with webhook(url=hook.url, secret="wrong", mode="event") as sink:
            outcomes = await sink.send(recorded()[:2])
    # batch: the batch, then its first record alone as a probe; event: the event, the next as a probe
    assert [r.signature_ok for r in hook.requests] == [True, False, False, False, False]
    # Retried, not dead-lettered: a wrong secret is put right (a rotation reaching the pod) and the
    # same events then go in. In place: the probe was refused too.
    assert "HTTP 401" in info.value.reason
    assert kinds(outcomes) == [OutcomeKind.RETRY] * 2
    assert outcomes is not None and "HTTP 401" in outcomes[0].reason
    assert not any(o.defer for o in outcomes)


async def test_standard_webhooks_signature_and_stable_id_across_retry() -> None:
    async with WebhookReceiver(secret=WHSEC, signature="standard") as hook:
        occs = recorded()[:2]
        async with webhook(url=hook.url, secret=WHSEC, signature="standard", mode="event") as sink:
            hook.fail_next(1, 503, retry_after="1")  # the endpoint asks for a pause: no probe
            first = await sink.send(occs)
            second = await sink.send(occs)
    assert kinds(first) == [OutcomeKind.RETRY, OutcomeKind.RETRY]
    assert second == [OK, OK]
    assert len(hook.requests) == 3  # the second item was not sent into a failing endpoint
    ids = [r.headers["webhook-id"] for r in hook.requests]
    assert ids[0] == ids[1] != ids[2]
    assert [r.signature_ok for r in hook.requests[1:]] == [True, True]
    assert all(r.headers["webhook-signature"].startswith("v1,") for r in hook.requests)


async def test_a_standard_webhooks_key_rotation_signs_with_both_keys_so_no_request_is_refused() -> None:
    """Secret "whsec_old whsec_new": one v1 signature per key, so a receiver on either key accepts,
    and the receiver can move to the new key with nothing refused in between."""
    new_key = "whsec_" + base64.b64encode(b"the-new-key-0123456789abcdef!").decode()
    both = f"{WHSEC} {new_key}"
    async with (
        WebhookReceiver(secret=WHSEC, signature="standard") as old_receiver,
        WebhookReceiver(secret=new_key, signature="standard") as new_receiver,
    ):
        for hook in (old_receiver, new_receiver):
            async with webhook(url=hook.url, secret=both, signature="standard") as sink:
                assert await sink.send(recorded()[:3]) == [OK] * 3
            async with webhook(url=hook.url, secret=new_key, signature="standard", mode="event") as sink:
                after = await sink.send(recorded()[3:4])
            # (A refusal with no other record to probe with is sent twice: once may be a flap.)
            with_both, *with_new = hook.requests
            assert with_both.signature_ok and len(with_both.headers["webhook-signature"].split()) == 2
            assert {r.signature_ok for r in with_new} == {hook is new_receiver}
            # The old receiver refuses the new key alone: retried (until it moves), not dead-lettered.
            assert kinds(after) == [OutcomeKind.OK if hook is new_receiver else OutcomeKind.RETRY]


async def test_standard_webhooks_batch_id_is_stable_for_the_same_batch() -> None:
    async with WebhookReceiver(secret=WHSEC, signature="standard") as hook:
        occs = recorded()[:5]
        async with webhook(url=hook.url, secret=WHSEC, signature="standard") as sink:
            hook.fail_next(1, 503, retry_after="1")  # a pause: the batch is sent again whole
            with pytest.raises(RetryableError):
                await sink.send(occs)
            assert await sink.send(occs) == [OK] * 5
    assert hook.requests[0].headers["webhook-id"] == hook.requests[1].headers["webhook-id"]
    assert hook.requests[1].signature_ok is True


def test_invalid_standard_secret_is_a_configuration_error() -> None:
    error = config_error(url="http://127.0.0.1:1/h", secret="whsec_***not base64", signature="standard")
    assert "Value error, secret is not a Standard Webhooks secret" in error
    assert "not base64" not in error


# -- outcomes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_ok(status: int) -> None:
    async with WebhookReceiver(ok_status=status) as hook, webhook(url=hook.url) as sink:
        assert await sink.send(recorded()[:3]) == [OK] * 3
    assert hook.requests[0].status == status


@pytest.mark.parametrize(
    ("status", "retry_after", "expected_after", "requests"),
    [(500, None, None, 2), (503, "7", 7.0, 1), (429, "3", 3.0, 1), (408, None, None, 1), (502, "garbage", None, 2)],
)  # fmt: skip
async def test_retryable_status_raises_retryable_error_in_batch_mode(
    hook: WebhookReceiver, status: int, retry_after: str | None, expected_after: float | None, requests: int
) -> None:
    """A 5xx without Retry-After may be the receiver failing on one record: the first record goes
    alone as a probe, and when that fails too the batch is retried whole (two requests). The others
    ask for a pause: one request."""
    hook.fail_next(2, status, retry_after=retry_after, body=b"busy, try later")
    async with webhook(url=hook.url) as sink:
        with pytest.raises(RetryableError) as info:
            await sink.send(recorded()[:3])
    assert info.value.retry_after == expected_after
    assert f"HTTP {status}" in info.value.reason and "busy, try later" in info.value.reason
    assert [len(r.json()) for r in hook.requests] == [3, 1][:requests]


async def test_retry_after_http_date_is_honoured(hook: WebhookReceiver) -> None:
    hook.fail_next(1, 429, retry_after=formatdate(time.time() + 30, usegmt=True))
    async with webhook(url=hook.url, mode="event") as sink:
        outcomes = await sink.send(recorded()[:2])
    assert kinds(outcomes) == [OutcomeKind.RETRY, OutcomeKind.RETRY]
    assert outcomes is not None
    for o in outcomes:
        assert o.retry_after is not None and 25 <= o.retry_after <= 31


async def test_event_mode_outcomes_are_per_item(hook: WebhookReceiver) -> None:
    occs = recorded()[:5]
    async with webhook(url=hook.url, mode="event") as sink:
        await sink.send(occs[:1])  # request 1: OK
        hook.fail_next(1, 400, body=b'{"error": "bad field"}')  # the next request is refused
        outcomes = await sink.send(occs)
    assert kinds(outcomes) == [OutcomeKind.REJECT] + [OutcomeKind.OK] * 4
    assert outcomes is not None and "HTTP 400" in outcomes[0].reason and "bad field" in outcomes[0].reason
    assert len(hook.requests) == 6


@pytest.mark.parametrize(("status", "requests"), [(400, 3), (415, 1)])
async def test_client_errors_reject_with_status_and_excerpt(
    hook: WebhookReceiver, status: int, requests: int
) -> None:
    """A final 4xx rejects with its status and an excerpt. (Session 32: a 400, which may be about one
    record of the array, is sent again in halves, each record then refused alone; a 415 is about
    every request and rejects it whole. A 404 is no longer final: retried, as about the URL.)"""
    hook.fail_next(3, status, body=b"nope " * 200)
    async with webhook(url=hook.url) as sink:
        outcomes = await sink.send(recorded()[:2])
    assert kinds(outcomes) == [OutcomeKind.REJECT] * 2
    assert len(hook.requests) == requests
    assert outcomes is not None
    assert outcomes[0].reason.startswith(f"HTTP {status} from {hook.url}: nope nope")
    assert len(outcomes[0].reason) < 300


async def test_a_body_limit_below_the_batch_halves_it_and_rejects_only_a_record_too_large_alone() -> None:
    # A proxy before the hook takes 16 KiB bodies (nginx's client_max_body_size, 1m by default).
    batch = [o for o in recorded() if len(o.json) < 2000][:40]
    big = make_occurrence(object_name="big", message="x" * 20_000)
    batch.insert(17, big)
    assert sum(len(o.json) for o in batch) > 3 * 16384
    async with WebhookReceiver(max_body_bytes=16384) as hook, webhook(url=hook.url) as sink:
        outcomes = await sink.send(batch)
        assert outcomes is not None
        assert kinds(outcomes) == [OutcomeKind.OK] * 17 + [OutcomeKind.REJECT] + [OutcomeKind.OK] * 23
        assert outcomes[17].reason.startswith(f"HTTP 413 from {hook.url}")
        delivered = [(d["uid"], d["occurrence"]) for r in hook.accepted for d in r.json()]
        assert delivered == [(o.uid, o.number) for o in batch if o is not big]  # once each, in order
        assert {r.status for r in hook.requests} == {200, 413}
        assert all(len(r.body) <= 16384 for r in hook.accepted)


async def test_connection_refused_is_retryable() -> None:
    url = f"http://127.0.0.1:{closed_port()}/hook"
    async with webhook(url=url) as sink:
        with pytest.raises(RetryableError, match="cannot connect"):
            await sink.send(recorded()[:2])
    async with webhook(url=url, mode="event") as sink:
        outcomes = await sink.send(recorded()[:2])
    assert kinds(outcomes) == [OutcomeKind.RETRY] * 2
    assert outcomes is not None and "not sent" in outcomes[1].reason


async def test_hanging_endpoint_times_out_and_retries(hook: WebhookReceiver) -> None:
    hook.hang_next(1)
    async with webhook(url=hook.url, mode="event", timeout=0.5) as sink:
        started = time.monotonic()
        outcomes = await sink.send(recorded()[:3])
        elapsed = time.monotonic() - started
        assert await sink.send(recorded()[:1]) == [OK]
    assert kinds(outcomes) == [OutcomeKind.RETRY] * 3
    assert outcomes is not None and "no answer within 0.5s" in outcomes[0].reason
    assert elapsed < 3  # one timeout, not one per item
    assert hook.requests[0].status is None  # never answered


async def test_a_redirect_is_retried_and_never_followed_or_turned_into_get(hook: WebhookReceiver) -> None:
    hook.fail_next(2, 302, headers={"Location": "https://127.0.0.1:9/hook"})
    async with webhook(url=hook.url) as sink:
        with pytest.raises(RetryableError) as info:
            # Alone, at an endpoint that never answered: failing again could not set it aside, so
            # it is not sent again at once.
            await sink.send(recorded()[:1])
    assert (
        info.value.reason == f"HTTP 302 redirect from {hook.url} to 'https://127.0.0.1:9/hook' (not followed)"
    )
    assert [r.method for r in hook.requests] == ["POST"]


def test_get_method_is_not_an_option() -> None:
    with pytest.raises(ValueError, match="method"):
        WebhookOptions.model_validate({"url": "http://x/", "method": "GET"})


# -- headers, auth, TLS -------------------------------------------------------------------------------


async def test_custom_headers_bearer_and_basic_auth(
    hook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_KEY", "from-env-123")
    async with webhook(
        url=hook.url, headers=["X-Api-Key:env:HOOK_KEY", "X-Team=ops:night"], bearer_token="tok"
    ) as s:
        await s.send(recorded()[:1])
    async with webhook(url=hook.url, username="alice", password="pw") as s:
        await s.send(recorded()[:1])
    with_userinfo = hook.url.replace("http://", "http://bob:pw2@")
    async with webhook(url=with_userinfo) as s:
        await s.send(recorded()[:1])
    first, second, third = hook.requests
    assert first.headers["X-Api-Key"] == "from-env-123"
    assert first.headers["X-Team"] == "ops:night"
    assert first.headers["Authorization"] == "Bearer tok"
    assert second.headers["Authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()
    assert third.headers["Authorization"] == "Basic " + base64.b64encode(b"bob:pw2").decode()


def test_bad_headers_and_auth_are_configuration_errors_without_the_values() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"headers": ["Bad Name:s3cr3t"]},
            "headers: '<entry #1 is not Name:Value>' is not a valid header name",
        ),
        # No colon: cut at the base64 padding, the "name" was the credential itself.
        ({"headers": ["Authorization Basic czNjcjN0czNjcjN0=="]}, "'<entry #1 is not Name:Value>'"),
        (
            {"headers": ["A:1", "s3cr3t"]},
            "headers: '<entry #2 is not Name:Value>' is not a valid header name",
        ),
        ({"headers": {"X-A": "s3cr3t\r\nX-B: 1"}}, "headers: the value of 'X-A' contains a line break"),
        ({"username": "a:b", "password": "s3cr3t"}, "username must not contain ':'"),
        ({"username": "u", "password": "s3cr3t", "bearer_token": "s3cr3t"}, "set bearer_token or basic auth"),
        ({"url": "http://u:s3cr3t@h/x", "bearer_token": "s3cr3t"}, "set bearer_token or basic auth"),
        # An empty user name is basic auth too (an API key as the password): the sink sends it.
        ({"url": "http://:s3cr3t@h/x", "bearer_token": "t0k"}, "set bearer_token or basic auth"),
    ]
    for entry, expected in cases:
        error = config_error(**{"url": "http://127.0.0.1:1/", **entry})
        assert expected in error, (entry, error)
        assert "s3cr3t" not in error and "czNjcjN0" not in error


def test_key_file_without_cert_file_is_a_configuration_error(tmp_path: Path) -> None:
    """A client key alone was accepted and never used (ssl loads a key only beside its
    certificate): mutual TLS silently off, and the server's refusal the first sign of it."""
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    error = config_error(url="https://127.0.0.1:1/", key_file=str(key))
    assert "key_file needs cert_file" in error


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")
async def test_tls_ca_file_and_insecure_skip_verify(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path)
    server_ctx = server_context(cert, key)
    async with WebhookReceiver(ssl_context=server_ctx) as hook:
        assert hook.url.startswith("https://")
        async with webhook(url=hook.url) as sink:
            with pytest.raises(RetryableError, match=r"(?i)certificate"):
                await sink.send(recorded()[:1])
        async with webhook(url=hook.url, ca_file=str(cert)) as sink:
            assert await sink.send(recorded()[:1]) == [OK]
        async with webhook(url=hook.url, insecure_skip_verify=True) as sink:
            assert await sink.send(recorded()[:1]) == [OK]
    assert len(hook.accepted) == 2


# -- check, redaction, lifecycle ------------------------------------------------------------------------


async def test_check_reports_reachability(hook: WebhookReceiver) -> None:
    async with webhook(url=hook.url) as sink:
        await sink.check()  # HEAD answered 405: reachable
    assert [r.method for r in hook.requests] == ["HEAD"]
    url = f"http://user:pw@127.0.0.1:{closed_port()}/hook?access_token=abc123"
    sink = WebhookSink(WebhookOptions.model_validate({"url": url}), context())
    with pytest.raises(
        SinkError, match=r"cannot reach http://127\.0\.0\.1:[0-9]+/hook\?access_token=\*\*\*"
    ) as info:
        await sink.check()
    await sink.aclose()
    assert "abc123" not in str(info.value) and "pw" not in str(info.value)


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"bearer_token": "tok-s3cret"}, "check bearer_token"),
        ({"username": "u", "password": "pw-s3cret"}, "check username/password"),
        ({"headers": ["X-Api-Key:key-s3cret", "X-Source:er"]}, "check headers (X-Api-Key)"),
    ],
)
async def test_check_fails_when_the_endpoint_refuses_our_credentials(
    status: int, options: dict[str, Any], named: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Sending would be refused for every event: check said ok (any answer proved reachability).
    async with WebhookReceiver(head_status=status) as hook, webhook(url=hook.url, **options) as sink:
        with pytest.raises(SinkError) as info:
            await sink.check()
    message = str(info.value)
    assert f"{hook.url} refused our credentials ({status} " in message and message.endswith(named)
    assert [r.method for r in hook.requests] == ["HEAD"]  # the credentials went with it
    assert hook.requests[0].headers.keys() & {"Authorization", "X-Api-Key"}
    assert "s3cret" not in message + caplog.text


async def test_check_sends_our_credentials_only_to_a_healthcheck_url_at_urls_scheme_host_and_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`check` sent the bearer token and every custom header to healthcheck_url wherever it was: a
    public status page, a plain-http health port. Now only to url's scheme, host and port; elsewhere
    a HEAD without them, and the check says so (a 401 there is no verdict on our credentials)."""
    caplog.set_level(logging.INFO)
    creds: dict[str, Any] = {"bearer_token": "tok-s3cret-1234", "headers": ["X-Api-Key:key-s3cret-5678"]}
    async with WebhookReceiver(head_status=200) as hook, WebhookReceiver(head_status=401) as elsewhere:
        async with webhook(url=hook.url, healthcheck_url=hook.url + "/health", **creds) as sink:
            await sink.check()  # the same scheme, host and port: with them
        async with webhook(url=hook.url, healthcheck_url=elsewhere.url, **creds) as sink:
            await sink.check()  # another port
        https = elsewhere.url.replace("http://", "https://")
        async with webhook(url=https, healthcheck_url=elsewhere.url, **creds) as sink:
            await sink.check()  # plain http for an https url, at its host and port
    (ours,) = hook.requests
    assert ours.headers["Authorization"] == "Bearer tok-s3cret-1234"
    assert ours.headers["X-Api-Key"] == "key-s3cret-5678"
    assert [r.method for r in elsewhere.requests] == ["HEAD", "HEAD"]
    for request in elsewhere.requests:
        assert not request.headers.keys() & {"Authorization", "X-Api-Key"}, request.headers
        assert "s3cret" not in str(request.headers)
    ours_line, *withheld = [r.getMessage() for r in caplog.records if "answered HEAD" in r.getMessage()]
    assert ours_line == f"webhook {hook.url}/health answered HEAD with 200"
    assert len(withheld) == 4, withheld  # an info and a warning (a 401: not a verdict) each
    assert all(f"webhook {elsewhere.url} answered HEAD with 401" in line for line in withheld), withheld
    assert all("sent without our credentials: healthcheck_url is not at url's" in w for w in withheld)


async def _cli_check(flag: str) -> tuple[int | None, str]:
    """`eventrouter check <flag>`: (exit code, what it printed and logged)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventrouter.cli", "check", flag,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_eventrouter_check_fails_on_refused_credentials_and_warns_without_any() -> None:
    async with WebhookReceiver(head_status=401) as hook:
        code, out = await _cli_check(f"--sink=webhook:{hook.url}?bearer_token=tok-s3cret")
        assert code == 1, out
        assert (
            f"FAIL  webhook (webhook {hook.url}): webhook sink: {hook.url} refused our credentials "
            "(401 'Unauthorized' to HEAD); check bearer_token"
        ) in out
        userinfo = hook.url.replace("http://", "http://u:pw-s3cret@")
        code, out2 = await _cli_check(f"--sink=webhook:{userinfo}")
        assert code == 1, out2
        assert "refused our credentials (401 'Unauthorized' to HEAD); check the user info in url" in out2
        # Without credentials (a signing secret and a plain header are none) a 401 to HEAD may not
        # be one to POST (a HEAD carries no signature): ok, with a warning saying what it may mean.
        code, out3 = await _cli_check(f"--sink=webhook:{hook.url}?secret=hmac-s3cret&header=X-Source:er")
        assert code == 0 and f"ok    webhook (webhook {hook.url})" in out3, out3
        assert (
            f"WARNING eventrouter.sink.webhook: webhook {hook.url} answered HEAD with 401 'Unauthorized' "
            "and no credentials are configured"
        ) in out3
    assert "s3cret" not in out + out2 + out3


async def test_start_does_not_contact_the_endpoint() -> None:
    async with webhook(url=f"http://127.0.0.1:{closed_port()}/hook") as sink:
        assert sink is not None  # started without an answering endpoint


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://u:p@h.example:8443/a?token=abc&x=1#frag", "https://***@h.example:8443/a?token=***&x=***"),
        (
            "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXX1234XXXXXXXX",
            "https://hooks.slack.com/services/T000/B000/***",
        ),
        ("http://127.0.0.1:8080/hook", "http://127.0.0.1:8080/hook"),
        # A Slack secret without a digit, a Telegram bot token: shown in messages before.
        (
            "https://hooks.slack.com/services/T0ABCDEFG/B0ABCDEFG/AbCdEfGhIjKlMnOpQrStUvWx",
            "https://hooks.slack.com/services/T0ABCDEFG/B0ABCDEFG/***",
        ),
        (
            "https://api.telegram.org/bot123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage",
            "https://api.telegram.org/***/sendMessage",
        ),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


async def test_secrets_never_in_logs_reprs_or_reasons(
    hook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = ["urlpass", "querytoken123", "hdrsecret", "bearersecret", "basicpass", "hmacsecret"]
    url = hook.url.replace("http://", "http://user:urlpass@") + "?access_token=querytoken123"
    options = WebhookOptions.model_validate(
        {
            "url": url,
            "headers": "X-Key:hdrsecret",
            "secret": "hmacsecret",
            "mode": "event",
        }
    )
    sink = WebhookSink(options, context())
    bearer = WebhookOptions.model_validate(
        {"url": url.replace("user:urlpass@", ""), "bearer_token": "bearersecret"}
    )
    # username/password beside the url's user info is refused (item 270): a model of their own.
    basic = WebhookOptions.model_validate(
        {"url": url.replace("user:urlpass@", ""), "username": "u", "password": "basicpass"}
    )
    texts = [repr(options), str(options), repr(sink), repr(bearer), str(bearer), repr(basic), str(basic)]
    await sink.start()
    await sink.check()
    hook.fail_next(1, 400, body=b"bad")
    hook.fail_next(1, 503)
    texts += [o.reason for o in await sink.send(recorded()[:2]) or []]
    await hook.__aexit__(None, None, None)  # the endpoint goes away
    texts += [o.reason for o in await sink.send(recorded()[:1]) or []]
    await sink.aclose()
    await sink.aclose()
    texts.append(caplog.text)
    assert hook.requests[1].query == "access_token=querytoken123"  # the real URL was used
    assert any("access_token=***" in t for t in texts)
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret, text)


BEARER = "tok_live_9f8e7d6c5b4a3f2e1d0c"


@pytest.mark.parametrize(
    ("options", "secret"),
    [
        ({"bearer_token": BEARER}, BEARER),
        ({"username": "alice", "password": "pa55-w0rd"}, "pa55-w0rd"),
        ({"headers": ["X-Api-Key:key-4f3e2d1c", "X-Auth:Token tk-8a7b6c5d4e"]}, "tk-8a7b6c5d4e"),
        ({"headers": "X-Api-Key:key-4f3e2d1c"}, "key-4f3e2d1c"),
        ({"secret": "hmac-signing-7a6b"}, "hmac-signing-7a6b"),
        ({"userinfo": "bob:s3cr3t%2Fpw"}, "s3cr3t/pw"),
        ({"query": "?token=q-t0ken-5e6f&level=Warning"}, "q-t0ken-5e6f"),
        ({"path": "/T0123456789ABCDEFXYZ"}, "T0123456789ABCDEFXYZ"),
        # A / or non-ASCII, which JSON encoders escape (see _json_quoted).
        ({"bearer_token": "k9/Tq+Zr2/aXw8Lm"}, "k9/Tq+Zr2/aXw8Lm"),
        ({"username": "svc", "password": "pässwört-2024"}, "pässwört-2024"),
        ({"headers": "X-Api-Key:Zx/91kQ/77pLmn"}, "Zx/91kQ/77pLmn"),
    ],
    ids=[
        "bearer", "basic", "header-word", "header", "signing", "userinfo", "query", "path",
        "bearer-slash", "basic-non-ascii", "header-slash",
    ],
)  # fmt: skip
async def test_an_answer_quoting_our_credentials_never_carries_them_into_a_reason(
    options: dict[str, Any], secret: str
) -> None:
    """Up to 200 characters of an error answer went into the reason (logged, written to the
    dead-letter file) as they came: gateways that quote the credential they refused put it there,
    also in a JSON body whose encoder escapes / (PHP) or non-ASCII (Python, Java, .NET)."""
    async with WebhookReceiver() as hook:
        userinfo = options.pop("userinfo", "")
        url = hook.url.replace("http://", f"http://{userinfo}@") if userinfo else hook.url
        url += options.pop("path", "") + options.pop("query", "")
        hook.fail_next(1, 401, body=f'{{"error":"invalid credential {secret}"}}'.encode())
        hook.fail_next(1, 503, echo=True)  # the request as it came: URL, Authorization, headers
        hook.fail_next(1, 403, body=f"refused {quote(secret, safe='')}".encode())
        quoted = _json_quoted(secret)
        for status, form in zip([400, 401, 400], quoted.values(), strict=True):
            # (The 401 follows an answer: failed twice alone, it would be set aside, so it is sent twice.)
            hook.fail_next(
                2 if status == 401 else 1, status, body=f'{{"error":"invalid credential {form}"}}'.encode()
            )
        reasons: list[str] = []
        async with webhook(url=url, mode="event", **options) as sink:
            for name in ("a", "b", "c", "d", "e", "f"):
                reasons += [o.reason for o in await sink.send([make_occurrence(object_name=name)]) or []]
    assert [r.status for r in hook.requests] == [401, 503, 403, 400, 401, 401, 400]
    for n in (0, 3, 4, 5):
        assert reasons[n].endswith('{"error":"invalid credential ****"}'), reasons[n]
    assert reasons[2].endswith("refused ****"), reasons[2]
    auth = hook.requests[1].headers.get("Authorization", "").split()  # e.g. Basic base64(user:password)
    for reason in reasons:
        assert secret not in reason and quote(secret, safe="") not in reason, reason
        assert not auth or auth[-1] not in reason, reason
        assert not any(form in reason for form in quoted.values()), reason


@pytest.mark.parametrize(
    "tail",
    ["?sig=Az%2FKey%20S3cret%C3%A9x", "/T0AB/B0CD/AbC%2BdEf%3D%3D99xyz"],
    ids=["query", "path"],
)
async def test_an_answer_quoting_the_url_as_sent_never_carries_its_secret(tail: str) -> None:
    """aiohttp sends (and its errors quote) the URL as yarl writes it: ``%2F`` in a query as ``/``
    beside a ``%20`` kept, ``%3D`` in a path as ``=`` beside a ``%2B`` kept. That is neither the
    secret, nor its quote() or quote_plus(): a receiver quoting the request in its error answer put
    it into the reason (logged, dead-lettered)."""
    async with WebhookReceiver() as hook:
        url = hook.url + tail
        hook.fail_next(1, 503, echo=True)  # "... refused POST <path and query as sent> ..."
        async with webhook(url=url, mode="event") as sink:
            (out,) = await sink.send([make_occurrence()]) or []
    sent = yarl.URL(url)
    written = sent.raw_query_string.partition("=")[2] if sent.query else sent.raw_path.rpartition("/")[2]
    assert written in {"Az/Key%20S3cret%C3%A9x", "AbC%2BdEf==99xyz"}
    assert " refused POST /hook" in out.reason and "****" in out.reason, out.reason
    assert written not in out.reason and "S3cret" not in out.reason and "dEf" not in out.reason, out.reason


def _json_quoted(secret: str) -> dict[str, str]:
    """``secret`` inside a JSON string as encoders write it."""
    python = json.dumps(secret)[1:-1]  # non-ASCII as \u00e4
    return {
        "php json_encode": python.replace("/", "\\/"),  # and / as \/
        "python json.dumps": python,
        "upper-case escapes": re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m[1].upper(), python),
    }


async def test_a_credential_cut_off_by_the_excerpt_limit_is_hidden_too(hook: WebhookReceiver) -> None:
    """Only the first 512 bytes of an answer are read: a token they end in the middle of is masked
    as well (150 two-byte characters and 200 spaces leave 6 of its characters in the read)."""
    hook.fail_next(1, 401, body=("é" * 150 + " " * 200 + f"token {BEARER} refused").encode())
    async with webhook(url=hook.url, mode="event", bearer_token=BEARER) as sink:
        (out,) = await sink.send([make_occurrence()]) or []
    assert out.kind is OutcomeKind.RETRY  # refused credentials are retried (a rotation), not dead-lettered
    assert out.reason.endswith("é token ****"), out.reason
    assert BEARER[:6] not in out.reason


async def test_a_401_or_403_without_credentials_of_ours_is_retried_too_and_says_so(
    hook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver that wants credentials we do not send: a configuration error, which dead-lettered
    every event until someone noticed. Now retried like refused credentials (put right, the same
    events go in), with a warning saying none are configured."""
    hook.fail_next(2, 403, body=b"forbidden")
    async with webhook(url=hook.url, mode="event") as sink:
        outcomes = await sink.send(recorded()[:3])
    assert kinds(outcomes) == [OutcomeKind.RETRY] * 3
    assert [r.status for r in hook.requests] == [403, 403]  # the event, its probe; the third not sent
    (line,) = [r.getMessage() for r in caplog.records if "credentials refused" in r.getMessage()]
    assert "no credentials are configured" in line and "HTTP 403" in line


async def test_a_request_timeout_over_the_engines_send_timeout_is_warned_of_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request allowed longer than the engine lets a send last is cut off and its batch sent again
    whole: the start says so, naming both options."""
    sink = WebhookSink(
        WebhookOptions.model_validate({"url": "http://127.0.0.1:9/h", "timeout": 40}), context(20)
    )
    with caplog.at_level(logging.WARNING):
        await sink.start()
    await sink.aclose()
    (line,) = [r.getMessage() for r in caplog.records if "send_timeout" in r.getMessage()]
    assert "timeout=40s" in line and "send_timeout=20s" in line and "duplicates" in line


# -- through the engine: slow receivers, refused credentials, an event the receiver fails on -----------


def _engine(sink: Sink[Any], tmp_path: Path, metrics: Metrics, **opts: Any) -> Pipeline:
    options = {"batch_max_wait": 0.01, "retry_initial_backoff": 0.01, "retry_max_backoff": 0.05, **opts}
    return Pipeline(
        name="webhook",
        sink=sink,
        options=PipelineOptions.model_validate(options),
        predicate=None,
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(tmp_path / "dead-letters", sink="webhook"),
        metrics=metrics,
    )


async def _stop(pipeline: Pipeline, task: asyncio.Task[None]) -> None:
    """Drain and stop; a pipeline that cannot drain (a test failing) is stopped at once."""
    pipeline.close()
    try:
        await asyncio.wait_for(asyncio.shield(task), 10)
    finally:
        if not task.done():
            pipeline.stop_now()
            await asyncio.wait_for(task, 5)
        await pipeline.close_sink()


def _taken(requests: Iterable[RecordedRequest]) -> list[tuple[str, int]]:
    """(uid, occurrence) of every record the receiver accepted, in the order it took them."""
    keys: list[tuple[str, int]] = []
    for request in requests:
        if request.status is not None and 200 <= request.status < 300:
            body = request.json()
            keys += [(r["uid"], r["occurrence"]) for r in (body if isinstance(body, list) else [body])]
    return keys


def _count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


@pytest.mark.parametrize("mode", ["event", "batch"])
async def test_a_send_longer_than_send_timeout_stops_in_time_and_delivers_everything_once(
    tmp_path: Path, mode: str
) -> None:
    """500 occurrences in one batch against the engine's send_timeout of 1.5 s. mode=event: one request
    each at a receiver answering after 5 ms (2.5 s or more); batch: a 16 KiB body limit (a proxy's)
    halves the batch into 32 requests answered after 80 ms (2.6 s or more). Before, the engine cut
    each send off and sent the whole batch again: what went in before the cutoff went in again, the
    tail never. Now a send starts no request past its budget, and what it did not start the engine
    sends again in place."""
    occs = [make_occurrence(object_name=f"pod-{i}", message=f"event {i} " + "x" * 300) for i in range(500)]
    metrics = Metrics()
    delay, limit = (0.005, 64 * 1024 * 1024) if mode == "event" else (0.08, 16 * 1024)
    async with WebhookReceiver(delay=delay, max_body_bytes=limit) as hook:
        options = WebhookOptions.model_validate({"url": hook.url, "mode": mode, "timeout": 0.6})
        # The sink reads its budget from the engine's send_timeout (1.25 s of 1.5 s).
        pipeline = _engine(WebhookSink(options, context(1.5)), tmp_path, metrics, send_timeout=1.5)
        task = asyncio.create_task(pipeline.run())
        try:
            for occ in occs:
                pipeline.offer(occ)  # one batch of 500 (batch_max_events)
            await until(lambda: _count(metrics.delivered, "webhook") >= 500, timeout=20)
        finally:
            await _stop(pipeline, task)
    taken = _taken(hook.requests)
    assert Counter(taken) == {(o.uid, o.number): 1 for o in occs}  # each once
    assert taken == [(o.uid, o.number) for o in occs]  # in order
    assert _count(metrics.delivered, "webhook") == 500
    assert _count(metrics.send_errors, "webhook", "timeout") == 0
    if mode == "batch":
        assert {r.status for r in hook.requests} == {200, 413}


async def test_after_a_half_is_answered_retry_the_halves_left_are_not_sent() -> None:
    """A 413 halves a batch; the first half is answered 429 Retry-After: 30. The second half went out
    at once all the same, into a receiver that had asked for 30 s. Now it gets the same answer, unsent."""
    occs = [make_occurrence(message=f"m{i}") for i in range(4)]
    assert sum(len(o.json) for o in occs) > 2000 > sum(len(o.json) for o in occs[2:]) + 3
    async with WebhookReceiver(max_body_bytes=2000) as hook, webhook(url=hook.url) as sink:
        hook.fail_next(1, 429, retry_after="30")  # aiohttp's own 413 comes first, without it
        outcomes = await sink.send(occs)
    assert [r.status for r in hook.requests] == [413, 429]
    assert outcomes is not None
    assert [(o.kind, o.retry_after) for o in outcomes] == [(OutcomeKind.RETRY, 30.0)] * 4
    assert "not sent" in outcomes[3].reason and "HTTP 429" in outcomes[3].reason


@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_signing_secret_rotated_at_the_receiver_first_dead_letters_nothing(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver moves to the new secret before the kubelet brings it into the pod: its 401s were
    dead-lettered, every event of the rotation lost to the replay. Now they are retried (logged
    once) and go in with the new secret once the `file:` secret is swapped and the sink rebuilt."""
    old, new = "hmac-old-5c1e", "hmac-new-8d2f"
    volume = SecretVolume(tmp_path / "secrets", {"hook-secret": old})
    async with WebhookReceiver(secret=old) as hook:
        flag = (
            f"webhook:{hook.url}?secret=file:{volume.file('hook-secret')}&mode={mode}"
            "&batch_max_wait=0.01&retry_initial_backoff=0.01&retry_max_backoff=0.05"
        )
        (spec,) = build_specs([flag])
        metrics = Metrics()
        sink = spec.build(SinkContext(name=spec.name, cluster="t", data_dir=None, logger=LOG))
        pipeline = _engine(sink, tmp_path, metrics, **spec.pipeline.model_dump())
        reloader = SinkReloader(spec, pipeline, metrics)
        task = asyncio.create_task(pipeline.run())
        occs = [make_occurrence(object_name=f"pod-{i}") for i in range(15)]
        try:
            for occ in occs[:5]:
                pipeline.offer(occ)
            await until(lambda: _count(metrics.delivered, spec.name) == 5)
            hook.secret = new  # the receiver first
            for occ in occs[5:]:
                pipeline.offer(occ)
            dead = metrics.dead_lettered.labels(spec.name, "rejected")
            await until(lambda: sum(r.status == 401 for r in hook.requests) >= 6 or dead._value.get())
            assert _count(metrics.dead_lettered, spec.name, "rejected") == 0  # retried, 3 rounds or more
            volume.update({"hook-secret": new})  # then the pod's Secret volume
            assert not reloader.check() and reloader.check()  # seen, then settled: rebuilt
            await until(lambda: _count(metrics.delivered, spec.name) == 15)
        finally:
            await _stop(pipeline, task)
    assert _count(metrics.dead_lettered, spec.name, "rejected") == 0
    assert Counter(_taken(hook.requests)) == {(o.uid, o.number): 1 for o in occs}
    refused = [r.getMessage() for r in caplog.records if "credentials refused" in r.getMessage()]
    assert len(refused) == 1, refused  # once, however many 401s
    assert "check secret (signature)" in refused[0] and "HTTP 401" in refused[0]
    assert old not in caplog.text and new not in caplog.text


async def test_an_event_the_receiver_fails_on_waits_aside_while_the_rest_goes_on(tmp_path: Path) -> None:
    """mode=event, a receiver that answers 500 to one payload (a bug of its own) and takes the rest.
    The first retry answer stopped the send and the engine retried it in place: that event held up
    every later one for ever. Now the next event is sent as a probe; taken, the failed one waits aside
    (its own backoff) and the rest goes in. A receiver down for everything is still retried in place:
    nothing else is set aside, and each attempt costs two requests (the event and its probe)."""
    occs = [make_occurrence(object_name=f"pod-{i}", message=f"event {i}") for i in range(200)]
    poison = make_occurrence(object_name="pod-57", message="poison pill")
    occs[57] = poison
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 500)
        options = WebhookOptions.model_validate({"url": hook.url, "mode": "event"})
        pipeline = _engine(WebhookSink(options, context()), tmp_path, metrics, batch_max_events=50)
        task = asyncio.create_task(pipeline.run())

        def aside() -> set[tuple[str, int]]:
            return {(o.uid, o.number) for _, _, o in pipeline._deferred}

        def failed_on_poison() -> int:
            return sum(r.status == 500 for r in hook.requests)

        def sends() -> float:  # the engine's send calls (one an attempt)
            labels = {"sink": "webhook"}
            return (
                metrics.registry.get_sample_value("eventrouter_sink_send_duration_seconds_count", labels)
                or 0.0
            )

        try:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: _count(metrics.delivered, "webhook") == 199)
            assert _taken(hook.requests) == [(o.uid, o.number) for o in occs if o is not poison]
            # Alone now, it is still set aside (the receiver's last answer to another event was a 2xx).
            seen = failed_on_poison()
            await until(lambda: failed_on_poison() >= seen + 3)
            assert aside() == {(poison.uid, poison.number)}
            assert _count(metrics.sink_up, "webhook") == 1

            hook.fail_matching(lambda body: True, 503)  # down
            later = [make_occurrence(object_name=f"later-{i}") for i in range(20)]
            down_from, sends_from = len(hook.requests), sends()
            for occ in later:
                pipeline.offer(occ)
            await until(lambda: sends() >= sends_from + 4 and _count(metrics.sink_up, "webhook") == 0)
            assert aside() <= {(poison.uid, poison.number)}  # the later ones are retried in place
            # The first event and its probe (one not failed alone yet), no more, at each attempt (at
            # most one send under way: its requests are in, its count not yet).
            down = [r.json()["involved_object"]["name"] for r in hook.requests[down_from:]]
            assert len(down) <= 2 * (sends() - sends_from + 1), down
            assert down[0] in {"pod-57", "later-0"} and "later-0" in down, down

            hook.fail_matching(lambda body: b"poison" in body, 500)  # up again, but for that one
            await until(lambda: _count(metrics.delivered, "webhook") == 219)
            assert _taken(hook.requests)[199:] == [(o.uid, o.number) for o in later]
            assert _count(metrics.dead_lettered, "webhook", "retries_exhausted") == 0

            hook.fail_matching(None)  # the receiver's bug fixed
            await until(lambda: _count(metrics.delivered, "webhook") == 220)
        finally:
            await _stop(pipeline, task)
    assert Counter(_taken(hook.requests)) == {(o.uid, o.number): 1 for o in [*occs, *later]}


async def test_a_retry_after_date_no_datetime_can_hold_sends_no_event_twice(tmp_path: Path) -> None:
    """mode=event: the receiver answers event 7 with 429 and a Retry-After date of an 11-digit
    year, three times. Parsing it raised OverflowError out of send; the engine sent the whole batch
    again, and events 0-6, taken already, went in again each time. Now the header counts as none
    (the engine's own backoff) and each event goes in once."""
    occs = [make_occurrence(object_name=f"pod-{i}", message=f"event {i}") for i in range(10)]
    left = [3]

    def seventh(body: bytes) -> bool:
        if b'"event 7"' in body and left[0] > 0:
            left[0] -= 1
            return True
        return False

    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(seventh, 429, retry_after="Mon, 01 Jan 99999999999 00:00:00 GMT")
        options = WebhookOptions.model_validate({"url": hook.url, "mode": "event"})
        pipeline = _engine(WebhookSink(options, context()), tmp_path, metrics, batch_max_events=10)
        task = asyncio.create_task(pipeline.run())
        try:
            for occ in occs:
                pipeline.offer(occ)  # one batch: event 7 has 7 taken before it in its send
            await until(lambda: _count(metrics.delivered, "webhook") == 10)
        finally:
            await _stop(pipeline, task)
    assert [r.status for r in hook.requests].count(429) == 3
    assert Counter(_taken(hook.requests)) == {(o.uid, o.number): 1 for o in occs}
    assert _count(metrics.send_errors, "webhook", "exception") == 0


async def _malformed_answers(answer: bytes) -> asyncio.Server:
    """A server answering every request with ``answer`` (not HTTP aiohttp can parse)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("tail", "forms"),
    [
        # An Azure function key (base64: a /), percent-encoded as it must be: yarl writes it raw.
        ("/api/hook?code=Az%2fKey%2fSecret99", ["Az/Key/Secret99", "Az%2fKey%2fSecret99", "Az%2FKey%2FSecret99"]),
        # A token path segment with an encoded ~: yarl writes ~.
        ("/services/T0AB/B0CD/%7Eslack-s3cret-tok3n", ["~slack-s3cret-tok3n", "%7Eslack-s3cret-tok3n"]),
    ],
    ids=["query", "path"],
)  # fmt: skip
async def test_a_malformed_answer_never_shows_the_urls_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: str, forms: list[str]
) -> None:
    """A response header over 8190 bytes (a gateway's CSP or Set-Cookie): aiohttp's error ends in
    the request URL as yarl writes it, which replacing the URL as configured missed. It went into
    the retry reason, the log, the dead-letter file once retries ran out, and `check`'s error."""
    caplog.set_level(logging.DEBUG)
    server = await _malformed_answers(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n")
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}{tail}"
    metrics = Metrics()
    try:
        options = WebhookOptions.model_validate({"url": url, "mode": "event"})
        pipeline = _engine(WebhookSink(options, context()), tmp_path, metrics, retry_max_attempts=2)
        task = asyncio.create_task(pipeline.run())
        try:
            pipeline.offer(make_occurrence())
            await until(lambda: _count(metrics.dead_lettered, "webhook", "retries_exhausted") == 1)
        finally:
            await _stop(pipeline, task)
        async with webhook(url=url) as sink:
            with pytest.raises(SinkError) as info:
                await sink.check()
    finally:
        server.close()
        await server.wait_closed()
    dead = (tmp_path / "dead-letters").read_text()
    for text in (dead, caplog.text, str(info.value)):
        for form in forms:
            assert form not in text, (form, text)
    assert "invalid HTTP answer (ClientResponseError 400): Got more than 8190 bytes" in dead
    assert "invalid HTTP answer" in str(info.value)
