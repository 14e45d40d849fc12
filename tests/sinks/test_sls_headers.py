"""SLS sink faults from session 31's review, against the project's SLS receiver: answers about the
request's headers (a proxy dropping ``Date``, SLS's MissingDate/InvalidHost/...) and a front's own 4xx
page dead-lettered every occurrence; credentials from the environment skipped the clean-up ``env:``
values get, and an ambient STS token went with an explicit key; the time screen was narrower than the
window SLS accepts."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, SinkContext, SinkError
from eventrouter.protowire import bytes_field, varint_field
from eventrouter.testing import make_occurrence
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver, canonical_string, sign_v1
from eventrouter_sinks.sls import SLSOptions, SLSSink

PROJECT = "k8s-log-c1"
LOGSTORE = "k8s-event"
KEY_ID = "LTAI5tTestKeyId"
SECRET = "s3cr3t-Value-9f8e7d"
STS_ID = "STS.NTestTemporaryId"
STS_SECRET = "sts-s3cr3t-1a2b3c"
STS_TOKEN = "CAIS-token-value-xyz"
LOGGER = "test.sls.headers"
PUT = f"/logstores/{LOGSTORE}/shards/lb"
ENV_NAMES = (
    "ALIBABA_CLOUD_ACCESS_KEY_ID",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    "ALIBABA_CLOUD_SECURITY_TOKEN",
    "AccessKeyId",
    "AccessKeySecret",
)

MakeSink = Callable[..., Awaitable[SLSSink]]


@pytest.fixture
async def receiver() -> AsyncIterator[SLSReceiver]:
    async with SLSReceiver(
        projects={PROJECT: [LOGSTORE]},
        keys=[AccessKey(KEY_ID, SECRET), AccessKey(STS_ID, STS_SECRET, STS_TOKEN)],
    ) as r:
        yield r


@pytest.fixture
async def make_sink(receiver: SLSReceiver, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeSink]:
    for name in ENV_NAMES:  # only what a test sets
        monkeypatch.delenv(name, raising=False)
    sinks: list[SLSSink] = []

    async def make(start: bool = True, **overrides: Any) -> SLSSink:
        values: dict[str, Any] = {
            "url": receiver.url,
            "project": PROJECT,
            "logStore": LOGSTORE,
            "accessKeyId": KEY_ID,
            "accessKeySecret": SECRET,
        }
        values.update(overrides)
        values = {k: v for k, v in values.items() if v is not None}
        context = SinkContext(name="sls", cluster="c1", data_dir=None, logger=logging.getLogger(LOGGER))
        sink = SLSSink(SLSOptions.model_validate(values), context)
        sinks.append(sink)
        if start:
            await sink.start()
        return sink

    yield make
    for sink in sinks:
        await sink.aclose()


def fresh(**kwargs: Any) -> Occurrence:
    return make_occurrence(cluster="c1", **kwargs)


def at(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def kinds(outcomes: Any) -> list[OutcomeKind]:
    return [o.kind for o in outcomes]


class DateDropper(Relay):
    """A proxy that lets everything through to SLS but the ``Date`` header (the case the official
    SDK sends ``x-log-date`` for: "bypass some proxy doesn't allow Date in header")."""

    request_hop = frozenset({"content-length", "transfer-encoding", "connection", "date"})

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: list[dict[str, str]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(dict(request.headers))
        # Only what the sink sent and signed: a Content-Type added to the GET would not match.
        return await self.relay(
            request, body, skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding")
        )


# -- the request's headers --------------------------------------------------------------------------


async def test_a_proxy_dropping_date_still_gets_every_log_in(
    receiver: SLSReceiver, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ``x-log-date`` nothing got through such a proxy (SLS: 400 MissingDate, dead-lettered;
    the receiver said RequestTimeExpired, a clock fault). The SDK gets through it, and now the sink."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    async with DateDropper(receiver.url) as proxy:
        sink = await make_sink(url=proxy.url)  # GetLogStore through the proxy too
        batch = [fresh(message=f"m{i}") for i in range(3)]
        assert kinds(await sink.send(batch)) == [OutcomeKind.OK] * 3
    assert sorted(log.fields["message"] for log in receiver.logs()) == ["m0", "m1", "m2"]
    assert [(r.method, r.status) for r in receiver.requests] == [("GET", 200), ("POST", 200)]
    for sent, got in zip(proxy.seen, receiver.requests, strict=True):
        assert sent["x-log-date"] == sent["Date"]  # the Date it signed, beside it
        assert "Date" not in got.headers and got.headers["x-log-date"] == sent["Date"]
    assert caplog.records == []


HEADER_CODES = [
    (400, "MissingDate", "Date"),
    (400, "InvalidDateFormat", "Date"),
    (400, "InvalidRequestTime", "Date"),
    (400, "MissingHost", "Host"),
    (400, "InvalidHost", "Host"),
    (400, "MissingBodyRawSize", "x-log-bodyrawsize"),
    (400, "InvalidBodyRawSize", "x-log-bodyrawsize"),
    (400, "InvalidCompressType", "x-log-compresstype"),
    (400, "MissingAPIVersion", "x-log-apiversion"),
    (400, "InvalidAPIVersion", "x-log-apiversion"),
    (411, "MissingContentLength", "Content-Length"),
    (400, "MissingContentType", "Content-Type"),
    (415, "InvalidContentType", "Content-Type"),
    (400, "InvalidContentType", "Content-Type"),
]


@pytest.mark.parametrize(("status", "code", "header"), HEADER_CODES)
async def test_a_refusal_of_the_requests_headers_is_retried_and_logged_once_per_run(
    receiver: SLSReceiver,
    make_sink: MakeSink,
    caplog: pytest.LogCaptureFixture,
    status: int,
    code: str,
    header: str,
) -> None:
    """SLS's common error codes about a request's headers refuse every request alike until what
    changes them (a proxy) is put right: each was taken as a refusal of the request's own logs, and
    every occurrence sent meanwhile dead-lettered."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    sink = await make_sink()
    receiver.fail_next(3, code, status, retry_after=7)
    for _ in range(3):
        outcomes = await sink.send([fresh(), fresh()])
        assert outcomes is not None and kinds(outcomes) == [OutcomeKind.RETRY] * 2
        assert f"SLS {status} {code}" in outcomes[0].reason and outcomes[0].retry_after == 7
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said  # once per run
    assert f"SLS answered {status} {code} for project {PROJECT!r}" in said[0]
    assert f"refuses the request's {header} header, not its logs" in said[0] and "proxy" in said[0]
    assert "retried (up to retry_max_attempts, if set)" in said[0]
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    assert f"accepts logs again (after {code}); requests refused meanwhile: {code} 3" in caplog.text
    assert len(receiver.logs()) == 1


async def test_start_fails_naming_the_header_sls_refuses(receiver: SLSReceiver, make_sink: MakeSink) -> None:
    """GetLogStore refused for a header: it said "could not verify ... PutLogs may still work" and
    started, and every PutLogs was refused the same way."""
    receiver.fail_next(1, "InvalidHost", 400)
    with pytest.raises(SinkError, match=r"InvalidHost .*the request's Host header.*a proxy"):
        await make_sink()


def _signed(method: str, path: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` as given, signed with the test key over what they hold (Date or x-log-date)."""
    headers = {"Host": f"{PROJECT}.127.0.0.1", **headers}
    if body:
        headers["Content-MD5"] = hashlib.md5(body).hexdigest().upper()
    signature = sign_v1(SECRET, canonical_string(method, path, [], headers))
    return {**headers, "Authorization": f"LOG {KEY_ID}:{signature}"}


async def test_receiver_answers_header_faults_with_slss_common_error_codes(receiver: SLSReceiver) -> None:
    """The receiver answered a missing or unreadable Date 400 RequestTimeExpired (which the sink
    retries as a clock fault), where SLS answers MissingDate / InvalidDateFormat; x-log-date stands
    in for a missing Date, as the SDK relies on."""
    now = time.time()
    date = datetime.fromtimestamp(now, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    body = bytes_field(1, varint_field(1, int(now)))  # a LogGroup of one log, stamped now
    put = {
        "Content-Type": "application/x-protobuf",
        "x-log-apiversion": "0.6.0",
        "x-log-bodyrawsize": str(len(body)),
        "x-log-signaturemethod": "hmac-sha1",
    }
    cases: list[tuple[dict[str, str], tuple[int, str | None]]] = [
        ({**put}, (400, "MissingDate")),
        ({**put, "Date": "yesterday"}, (400, "InvalidDateFormat")),
        ({**put, "x-log-date": "yesterday"}, (400, "InvalidDateFormat")),
        ({**put, "x-log-date": date}, (200, None)),  # a proxy dropped Date: its copy is read
        ({**put, "Date": date, "x-log-apiversion": "0.5.0"}, (400, "InvalidAPIVersion")),
        (
            {k: v for k, v in put.items() if k != "x-log-apiversion"} | {"Date": date},
            (400, "MissingAPIVersion"),
        ),
        (
            {k: v for k, v in put.items() if k != "x-log-bodyrawsize"} | {"Date": date},
            (400, "MissingBodyRawSize"),
        ),
        ({**put, "Date": date, "x-log-bodyrawsize": "many"}, (400, "InvalidBodyRawSize")),
        ({**put, "Date": date, "x-log-compresstype": "snappy"}, (400, "InvalidCompressType")),
    ]
    got = []
    async with aiohttp.ClientSession() as session:
        for headers, _ in cases:
            async with session.post(
                receiver.url + PUT,
                data=body,
                headers=_signed("POST", PUT, body, headers),
                skip_auto_headers=("Content-Type",),
            ) as r:
                answer = await r.json(content_type=None) if r.status != 200 else {}
                got.append((r.status, answer.get("errorCode")))
    assert got == [expected for _, expected in cases]
    assert len(receiver.logs()) == 1


# -- credentials from the environment ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "options", "token"),
    [
        # A Secret made with `echo key | base64`, through secretKeyRef: kube-eventer's names ...
        ({"AccessKeyId": KEY_ID + "\n", "AccessKeySecret": SECRET + "\n"}, {}, None),
        # ... and Alibaba's, with an STS token (a newline in a header was a ValueError at every request).
        (
            {
                "ALIBABA_CLOUD_ACCESS_KEY_ID": STS_ID,
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": STS_SECRET + "\n",
                "ALIBABA_CLOUD_SECURITY_TOKEN": STS_TOKEN + "\n",
            },
            {},
            STS_TOKEN,
        ),
        # A token left in the pod's environment goes with the key it came with, not an explicit one.
        (
            {"ALIBABA_CLOUD_SECURITY_TOKEN": "leftover"},
            {"accessKeyId": KEY_ID, "accessKeySecret": SECRET},
            None,
        ),
        (
            {"ALIBABA_CLOUD_SECURITY_TOKEN": "leftover", "AccessKeyId": KEY_ID, "AccessKeySecret": SECRET},
            {},
            None,
        ),
    ],
)
async def test_credentials_from_the_environment_are_read_as_env_values_are(
    receiver: SLSReceiver,
    make_sink: MakeSink,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    options: dict[str, str],
    token: str | None,
) -> None:
    """The default environment variables skipped what ``env:NAME`` does: a trailing newline went into
    the HMAC key (start failed "check accessKeySecret", sends retried for ever) or into the token
    header (ValueError at every request); and an ambient ALIBABA_CLOUD_SECURITY_TOKEN went with an
    explicit long-term key (401 for ever)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sink = await make_sink(**({"accessKeyId": None, "accessKeySecret": None} | options))
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    assert [r.status for r in receiver.requests] == [200, 200]
    assert receiver.requests[-1].headers.get("x-acs-security-token") == token


async def test_a_temporary_key_given_in_the_options_takes_the_environments_token(
    make_sink: MakeSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment's token goes with the environment's key (above), and with a temporary (STS)
    key given in the options, which cannot work without one; not with a long-term key."""
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", STS_TOKEN)
    sink = await make_sink(accessKeyId=STS_ID, accessKeySecret=STS_SECRET)
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]


async def test_an_empty_or_unsendable_credential_fails_start_naming_it(
    make_sink: MakeSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AccessKeyId", KEY_ID)
    monkeypatch.setenv("AccessKeySecret", "\n")  # as good as unset: refused, as env:NAME refuses it
    with pytest.raises(
        SinkError, match=r"accessKeySecret: environment variable 'AccessKeySecret' is set but empty"
    ):
        await make_sink(accessKeyId=None, accessKeySecret=None)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", STS_ID)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", STS_SECRET)
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", "CAIS-a\nb")  # no HTTP header may carry it
    with pytest.raises(
        SinkError,
        match=r"security_token \(from environment variable ALIBABA_CLOUD_SECURITY_TOKEN\) has a control character at position 6",
    ) as raised:
        await make_sink(accessKeyId=None, accessKeySecret=None)
    assert "CAIS" not in str(raised.value)
    with pytest.raises(SinkError, match=r"security_token \(from the option\) has a control character"):
        await make_sink(securityToken="tok\x01en")
    assert os.environ["ALIBABA_CLOUD_SECURITY_TOKEN"] == "CAIS-a\nb"


# -- the time window --------------------------------------------------------------------------------


@pytest.mark.parametrize("clamp_time", [True, False])
async def test_a_log_time_inside_slss_window_is_sent_as_it_is(
    receiver: SLSReceiver, make_sink: MakeSink, clamp_time: bool
) -> None:
    """The sink's window was [now - 7 days + 25 min, now + 5 min], its reason said SLS's: an event
    10 minutes ahead (a node clock fast) was dead-lettered (clamp_time=false) or re-stamped at now,
    though SLS stores it as it is."""
    sink = await make_sink(clamp_time=clamp_time)
    now = time.time()
    ahead = fresh(last_timestamp=at(now + 600), message="ahead")
    too_far = fresh(last_timestamp=at(now + 1200), message="too far")
    old = fresh(last_timestamp=at(now - 7 * 86400 + 600), message="old")
    outcomes = await sink.send([ahead, too_far, old])
    assert outcomes is not None
    stored = {log.fields["message"]: log for log in receiver.logs()}
    assert outcomes[0].kind is OutcomeKind.OK
    assert stored["ahead"].time == int(now + 600) and "time_adjusted" not in stored["ahead"].fields
    if clamp_time:  # outside: stamped at now, marked
        assert kinds(outcomes[1:]) == [OutcomeKind.OK] * 2
        assert stored["too far"].fields["time_adjusted"] == "true"
        # Near the old edge: stamped 25 minutes inside it (the service's clock may be ahead of ours).
        assert stored["old"].fields["time_adjusted"] == "true"
    else:
        assert outcomes[1].kind is OutcomeKind.REJECT and "too far" not in stored
        assert "outside the window SLS accepts (now - 7 days ... now + 15 minutes)" in outcomes[1].reason
        assert outcomes[2].kind is OutcomeKind.OK  # SLS has the last word on what is inside
        assert (
            stored["old"].time == int(now - 7 * 86400 + 600) and "time_adjusted" not in stored["old"].fields
        )


# -- a front's own 4xx page -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 405, 407, 421, 431])
async def test_a_fronts_own_4xx_page_is_retried_not_dead_lettered(
    receiver: SLSReceiver, make_sink: MakeSink, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway, WAF or ingress before SLS answering a 4xx page of its own (no SLS error JSON, no
    x-log-requestid) refuses every request alike: only 401/403/404 were retried, any other status
    dead-lettered every occurrence. SLS's own 400 with a code the sink does not know still is."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    sink = await make_sink()
    receiver.fail_next(2, "ignored", status, echo=True)
    for _ in range(2):
        outcomes = await sink.send([fresh(), fresh()])
        assert outcomes is not None and kinds(outcomes) == [OutcomeKind.RETRY] * 2
        assert f"SLS {status} HTTP{status}" in outcomes[0].reason
    said = [r.getMessage() for r in caplog.records if "no SLS error code (a proxy?)" in r.getMessage()]
    assert len(said) == 1  # once per run
    assert "refuses every request alike, not these logs, so its occurrences are retried" in said[0]
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.OK]
    receiver.fail_next(1, "SomeFutureInvalid", 400)  # SLS's own answer: the request's logs
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.REJECT]
    receiver.fail_next(1, "ignored", 413, echo=True)  # a proxy's body limit: about this request
    assert kinds(await sink.send([fresh()])) == [OutcomeKind.REJECT]
