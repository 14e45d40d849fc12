"""SLS sink faults from session 29's cross-sink review, against the project's SLS receiver behind a
front (an ingress, an auth proxy, a captive or egress gateway): a redirect was followed, on start's
GetLogStore and on every PutLogs (a sign-in page's 200 taken as stored, a 307 taking the signed body
and the STS token to another host), and any HTTP 200 was taken as stored, a front's own page too."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, SinkContext, SinkError
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.receivers.sls import AccessKey, SLSReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.sls import SLSOptions, SLSSink

PROJECT = "k8s-log-c1"
LOGSTORE = "k8s-event"
STS_ID = "STS.NTestTemporaryId"
STS_SECRET = "sts-s3cr3t-1a2b3c"
STS_TOKEN = "CAIS-token-value-xyz"
SIGNATURE = "s3cr3t-signature"  # a query value in a Location: redacted wherever it is shown
LOGGER = "test.sls.redirects"
PUT = f"/logstores/{LOGSTORE}/shards/lb"
GET = f"/logstores/{LOGSTORE}"
PAGE = f"<html><body>Sign in to continue ({STS_TOKEN})</body></html>"  # a page quoting our token


class Front(Relay):
    """An HTTP front before the test SLS: forwards every request to ``upstream`` with its ``Host``
    (SLS reads the project from it) and signed headers untouched. With ``redirect`` set it answers
    every request with that status and ``location`` (default: the same path on ``upstream``); with
    ``page`` set (status, body) it answers every request itself, an HTML page from ``captive-portal``,
    as an auth proxy or a captive gateway does. ``/login`` is a sign-in page (200, HTML). ``seen``:
    "METHOD path" of every request."""

    request_hop = frozenset({"content-length", "transfer-encoding", "connection", "content-encoding"})

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.redirect: int | None = None
        self.location: str | None = None
        self.page: tuple[int, str] | None = None
        self.seen: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(f"{request.method} {request.path}")
        if request.path == "/login":
            return web.Response(text=PAGE, content_type="text/html")
        if self.page is not None:
            status, text = self.page
            return web.Response(
                status=status,
                text=text or None,
                content_type="text/html" if text else None,
                headers={"Server": "captive-portal/2.1"},
            )
        if self.redirect is not None:
            location = self.location or f"{self.upstream}{request.path_qs}"
            return web.Response(status=self.redirect, headers={"Location": location}, text="moved")
        # Only what the sink sent and signed: a Content-Type added to the GET would not match.
        return await self.relay(
            request, body, skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding")
        )


class Other:
    """Another origin, answering 200 to anything: what reaches it, with its headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Other:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append((request.method, request.path, dict(request.headers)))
        return web.Response(text="ok")


@asynccontextmanager
async def _sls() -> AsyncIterator[SLSReceiver]:
    async with SLSReceiver(
        projects={PROJECT: [LOGSTORE]}, keys=[AccessKey(STS_ID, STS_SECRET, STS_TOKEN)]
    ) as receiver:
        yield receiver


def _sink(url: str) -> SLSSink:
    options = SLSOptions.model_validate(
        {
            "url": url,
            "project": PROJECT,
            "logStore": LOGSTORE,
            "accessKeyId": STS_ID,
            "accessKeySecret": STS_SECRET,
            "securityToken": STS_TOKEN,
        }
    )
    return SLSSink(
        options, SinkContext(name="sls", cluster="c1", data_dir=None, logger=logging.getLogger(LOGGER))
    )


def _where(front: Front) -> str:
    return f"project {PROJECT!r}, logstore {LOGSTORE!r} at {front.url}"


def _pods(n: int, prefix: str = "pod") -> list[Occurrence]:
    return [make_occurrence(cluster="c1", object_name=f"{prefix}-{i}") for i in range(n)]


def _names(sls: SLSReceiver) -> list[str]:
    return sorted(log.fields["involved_object_name"] for log in sls.logs())


def _messages(caplog: pytest.LogCaptureFixture, part: str) -> list[str]:
    return [m for r in caplog.records if r.name == LOGGER and part in (m := r.getMessage())]


@asynccontextmanager
async def _running(pipeline: Pipeline) -> AsyncIterator[None]:
    """The pipeline running for the block; then stopped and its sink closed, whatever the block did."""
    task = asyncio.create_task(pipeline.run())
    try:
        yield
    finally:
        pipeline.stop_now()
        await asyncio.wait_for(task, 10)
        await pipeline.close_sink()


def _count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


# ---- redirects are never followed ---------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_an_endpoint_that_redirects_fails_start_and_check_naming_where_to(code: int) -> None:
    """An http:// endpoint behind an ingress that moved, or redirects to https: start's GetLogStore
    followed the redirect (Authorization dropped across origins: a 401 start only warned about, or
    another host's 200) and start and `eventrouter check` passed, for a sink that stores nothing."""
    async with _sls() as sls, Front(sls.url) as front, Other() as other:
        front.redirect = code
        front.location = f"{other.url}{GET}?sig={SIGNATURE}"
        sink = _sink(front.url)
        try:
            with pytest.raises(SinkError) as info:
                await sink.start()
            with pytest.raises(SinkError) as checked:
                await sink.check()
        finally:
            await sink.aclose()
    assert str(info.value) == (
        f"sls sink sls: GetLogStore for {_where(front)} answered {code}, a redirect to "
        f"'{other.url}{GET}?sig=***', not followed (a PutLogs redirected would come back a GET, or go on "
        "to another host with its signed body and security token): give the endpoint it points to"
    )
    assert str(checked.value) == str(info.value)
    assert front.seen == [f"GET {GET}"] * 2
    assert other.seen == [] and sls.requests == []


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_a_redirect_met_while_sending_is_retried_never_followed_nor_dead_lettered(
    code: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The front starts redirecting to another origin while the router runs. Before: 307/308 took the
    signed body and the STS token there and its 200 was taken as stored, 301/302 came back a GET
    whose 200 was taken as stored: every log counted delivered, none in SLS. Now nothing is taken as
    stored, dead-lettered or sent there; it is logged once, where it points redacted; once the front
    is put right every log goes in once."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with _sls() as sls, Front(sls.url) as front, Other() as other:
        metrics = Metrics()
        pipeline = pipeline_for(
            "sls",
            _sink(front.url),
            metrics,
            tmp_path / "dl",
            retry_initial_backoff=0.01,
            retry_max_backoff=0.05,
        )
        async with _running(pipeline):
            await pipeline.started.wait()  # through the front while it still forwards
            front.redirect = code
            front.location = f"{other.url}{PUT}?sig={SIGNATURE}"
            for occurrence in _pods(5):
                pipeline.offer(occurrence)
            retried = metrics.retries.labels("sls")
            answered = (metrics.delivered.labels("sls"), metrics.dead_lettered.labels("sls", "rejected"))
            # Three attempts of the five, or (before) their first answer taken as stored.
            await until(lambda: retried._value.get() >= 15 or any(m._value.get() for m in answered))
            assert [m._value.get() for m in answered] == [0, 0]  # (before: 5 delivered)
            assert not sls.logs() and not other.seen  # nothing followed, nothing stored
            front.redirect = None  # the endpoint is put right
            await until(lambda: _count(metrics.delivered, "sls") == 5)
    assert not (tmp_path / "dl").exists()
    assert _names(sls) == [f"pod-{i}" for i in range(5)]
    assert not other.seen  # the body and x-acs-security-token never left for another host
    assert {line for line in front.seen if line != f"GET {GET}"} == {f"POST {PUT}"}  # never a GET
    (warning,) = _messages(caplog, "redirect")
    assert warning == (
        f"sls sink sls: SLS {code} HTTP{code}: a redirect to '{other.url}{PUT}?sig=***', not followed "
        f"({_where(front)}): give the endpoint it points to (a PutLogs redirected would come back a GET, "
        "or go on to another host with its signed body and security token); retrying until that is put "
        "right (nothing is dead-lettered for it)"
    )
    (back,) = _messages(caplog, "accepts logs again")
    assert f"(after HTTP{code}); requests refused meanwhile: HTTP{code} " in back
    for secret in (SIGNATURE, STS_TOKEN, STS_SECRET):
        assert secret not in caplog.text


async def test_a_redirect_to_a_sign_in_page_is_never_taken_as_stored() -> None:
    """An auth front (oauth2-proxy, Cloudflare Access) answers 302 to its sign-in page, which answers
    200: followed, every PutLogs was answered OK and checkpointed, and nothing stored."""
    async with _sls() as sls, Front(sls.url) as front:
        sink = _sink(front.url)
        try:
            await sink.start()
            front.redirect, front.location = 302, "/login"
            outcomes = await sink.send(_pods(3))
        finally:
            await sink.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.RETRY] * 3
    assert outcomes[0].reason == f"SLS 302 HTTP302: a redirect to '/login', not followed ({_where(front)})"
    assert front.seen == [f"GET {GET}", f"POST {PUT}"]  # no GET /login
    assert not sls.logs()


# ---- a 2xx counts as stored only with SLS's x-log-requestid --------------------------------------


async def test_a_2xx_that_is_not_sls_s_answer_is_retried_named_and_never_quoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A front answers PutLogs itself with its page (a captive gateway, an auth proxy's sign-in), 200
    or 204: before, a 200 was taken as stored (every log counted delivered, none in SLS) and a 204
    dead-lettered. Now retried, logged once naming its status, Content-Type and Server (never the
    body, which here quotes our token); once SLS answers again the same logs go in."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with _sls() as sls, Front(sls.url) as front:
        sink = _sink(front.url)
        try:
            await sink.start()
            front.page = (200, PAGE)
            batch = _pods(3)
            sent = [await sink.send(batch) for _ in range(2)]
            front.page = (204, "")
            sent.append(await sink.send(batch))
            front.page = None
            stored = await sink.send(batch)
        finally:
            await sink.aclose()
    for outcomes in sent:
        assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.RETRY] * 3
    assert sent[0] is not None and sent[0][0].reason == (
        "SLS 200 HTTP200: a 200 without x-log-requestid, not SLS's answer (Content-Type "
        f"'text/html; charset=utf-8', Server 'captive-portal/2.1') ({_where(front)})"
    )
    assert sent[2] is not None and sent[2][0].reason.startswith(
        "SLS 204 HTTP204: a 204 without x-log-requestid, not SLS's answer ("
    )
    (warning,) = _messages(caplog, "x-log-requestid")  # once for the run, 204 included
    assert warning == (
        f"sls sink sls: {sent[0][0].reason}: something before SLS answered in its place (an auth "
        "proxy's sign-in or a captive gateway's page?): let PutLogs through to SLS, or give its "
        "endpoint; retrying until that is put right (nothing is dead-lettered for it)"
    )
    # SLS's own answer (the receiver's, with x-log-requestid) is stored, the same logs once.
    assert stored is not None and [o.kind for o in stored] == [OutcomeKind.OK] * 3
    assert _names(sls) == ["pod-0", "pod-1", "pod-2"]
    (back,) = _messages(caplog, "accepts logs again")
    assert back.endswith("(after HTTP200, HTTP204); requests refused meanwhile: HTTP200 2, HTTP204 1")
    assert "Sign in" not in caplog.text and STS_TOKEN not in caplog.text
    assert all("Sign in" not in o.reason for outcomes in sent if outcomes for o in outcomes)


async def test_start_fails_when_a_front_answers_getlogstore_itself() -> None:
    """Start's GetLogStore answered 200 by a front's page passed start and `eventrouter check`."""
    async with _sls() as sls, Front(sls.url) as front:
        front.page = (200, PAGE)
        sink = _sink(front.url)
        try:
            with pytest.raises(SinkError) as info:
                await sink.start()
        finally:
            await sink.aclose()
    assert str(info.value) == (
        f"sls sink sls: GetLogStore for {_where(front)} answered a 200 without x-log-requestid, not "
        "SLS's answer (Content-Type 'text/html; charset=utf-8', Server 'captive-portal/2.1'): a proxy's "
        "or gateway's own page? Let requests through to SLS, or give its endpoint"
    )
    assert sls.requests == []
