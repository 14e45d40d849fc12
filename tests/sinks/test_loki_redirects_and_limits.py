"""Loki sink faults from session 29's review, against the project's Loki-compatible receiver: a
redirect before Loki (followed, it stored nothing and said OK, dead-lettered everything, or sent the
push and our headers to another host), Loki 2.x's stream-limit answer that names no stream (the whole
sink held up), late entries of several streams in one push (a refusal answered 2xx), pushes a send
had no time for retried in place behind a stream set aside, and a token in the URL's path printed.
Then (session 30, item 197's Left) a front's web page answered 2xx with no redirect (taken as
stored), and a 405 (dead-lettered)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext, SinkError
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.testing import make_occurrence
from eventrouter.testing.pipelines import pipeline_for
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.receivers.relay import Relay
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiOptions, LokiSink

LOG = logging.getLogger("test.loki")
CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=LOG)
PUSH = "/loki/api/v1/push"
TOKEN = "gw_7Hq2xLk9Pz4RmT8vWc3N"  # a gateway's path token
SIGN_IN = (
    "<!DOCTYPE html>\n<html><head><title>Sign in \u00b7 Access</title></head>"
    '<body><form action="/login"></form></body></html>'
)


class Front(Relay):
    """An HTTP front before the test Loki, as an ingress, an auth proxy or a path-keyed gateway:
    forwards every request under ``prefix`` to ``upstream`` (the prefix cut off), answers the
    statuses queued in ``fail`` itself first, and with ``redirect`` set answers every request with
    that status and ``location`` (default: the same path on ``upstream``). ``/login`` is a sign-in
    page (200, HTML), and with ``page`` set (status, Content-Type) every request is answered with
    it, as an auth front in front of every path does. ``seen``: "METHOD path" of every request."""

    def __init__(self, upstream: str, prefix: str = "") -> None:
        super().__init__(upstream)
        self.prefix = prefix
        self.redirect: int | None = None
        self.location: str | None = None
        self.fail: list[tuple[int, str]] = []
        self.page: tuple[int, str] | None = None
        self.seen: list[str] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(f"{request.method} {request.path}")
        if request.path == "/login":
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")
        if self.page is not None:
            status, content_type = self.page
            return web.Response(status=status, text=SIGN_IN, content_type=content_type)
        if self.redirect is not None:
            location = self.location or f"{self.upstream}{request.path_qs}"
            return web.Response(status=self.redirect, headers={"Location": location}, text="moved")
        if not request.path.startswith(self.prefix):
            return web.Response(status=404, text="404 page not found")
        if self.fail:
            status, text = self.fail.pop(0)
            return web.Response(status=status, text=text)
        return await self.relay(request, body, request.path_qs[len(self.prefix) :])


def _when(offset: float) -> str:
    return datetime.fromtimestamp(time.time() + offset, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _at(offset: float, **kwargs: Any) -> Occurrence:
    return make_occurrence(first_timestamp=_when(offset), **kwargs)


def _sink(url: str, context: SinkContext = CONTEXT, **options: Any) -> LokiSink:
    return LokiSink(LokiOptions.model_validate({"url": url, **options}), context)


def _names(loki: LokiReceiver) -> Counter[str]:
    """Distinct entries Loki holds per involved object (an identical entry pushed again is one: Loki
    de-duplicates it)."""
    distinct = {(e.labels, e.ts_ns, e.line) for e in loki.entries}
    return Counter(orjson.loads(line)["involved_object"]["name"] for _, _, line in distinct)


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


# ---- 1. redirects are never followed ------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_a_url_that_redirects_fails_start_naming_where_to(code: int) -> None:
    """An http:// URL behind an ingress that redirects to https (OpenShift's Redirect: 302): start's
    GET /ready followed the redirect to Loki's own 200 and said ready, then every push came back a
    GET (301/302: Loki's 405, every entry dead-lettered) or went on to the other host (307/308)."""
    async with LokiReceiver() as loki, Front(loki.url) as front:
        front.redirect = code
        front.location = f"{loki.url}/ready?sig=s3cr3t-signature"
        sink = _sink(front.url)
        try:
            with pytest.raises(SinkError) as info:
                await sink.start()
        finally:
            await sink.aclose()
    assert str(info.value) == (
        f"loki: GET {front.url}/ready answered {code} (Location: {loki.url}/ready?sig=***): a redirect, "
        "which the sink does not follow (a push would come back a GET, or go on to another host with "
        "its headers); give that URL"
    )
    assert front.seen == ["GET /ready"]


@pytest.mark.parametrize("code", [301, 302, 307, 308])
async def test_a_redirect_met_while_sending_is_retried_never_followed_and_logged_once(
    code: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingress starts redirecting while the router runs, to another origin: nothing is taken as
    stored, dead-lettered, or sent there (our custom header, the tenant, the entries), and it is
    logged once with where it points, redacted. Before: 301/302 came back a GET (405: every entry
    dead-lettered), 307/308 took the push and the headers to the other origin."""
    caplog.set_level(logging.WARNING)
    async with LokiReceiver() as loki, Front(loki.url) as other, Front(loki.url) as front:
        sink = _sink(front.url, tenant="ops", headers="X-Api-Key:s3cr3t-gateway-key")
        metrics = Metrics()
        pipeline = pipeline_for(
            "loki", sink, metrics, tmp_path / "dl", retry_initial_backoff=0.01, retry_max_backoff=0.05
        )
        async with _running(pipeline):
            await pipeline.started.wait()  # through the front while it still forwards
            front.redirect = code
            front.location = f"{other.url}{PUSH}?sig=s3cr3t-signature"
            for i in range(5):
                pipeline.offer(_at(-10 + i, namespace=f"ns-{i % 2}", object_name=f"pod-{i}"))
            retried = metrics.send_errors.labels("loki", "retryable")
            answered = (metrics.delivered.labels("loki"), metrics.dead_lettered.labels("loki", "rejected"))
            await until(lambda: retried._value.get() >= 3 or any(m._value.get() for m in answered))
            assert [m._value.get() for m in answered] == [0, 0]  # (before: OK at 307/308, 405 at 301/302)
            assert not loki.entries and not other.seen  # nothing followed, nothing stored
            front.redirect = None  # the URL is put right
            await until(lambda: _count(metrics.delivered, "loki") == 5)
    assert not (tmp_path / "dl").exists()
    assert _names(loki) == {f"pod-{i}": 1 for i in range(5)}
    assert not other.seen
    assert {line for line in front.seen if line != "GET /ready"} == {f"POST {PUSH}"}  # never a GET
    (warning,) = [m for r in caplog.records if (m := r.getMessage()).startswith("loki: ") and "redirect" in m]
    assert warning == (
        f"loki: {front.url} answered {code}, a redirect to {other.url}{PUSH}?sig=*** (not followed, "
        "nothing stored): give url the address it points to (a push redirected would come back a GET, "
        "or go on to another host with its headers); retrying until that is put right"
    )
    assert "s3cr3t" not in caplog.text


async def test_a_redirect_to_a_sign_in_page_is_never_taken_as_stored() -> None:
    """An auth front (oauth2-proxy, Cloudflare Access) answers 302 to its sign-in page, which answers
    200: followed, every push was answered OK and checkpointed, and nothing stored."""
    async with LokiReceiver() as loki, Front(loki.url) as front:
        front.redirect, front.location = 302, "/login"
        sink = _sink(front.url)
        try:
            with pytest.raises(RetryableError) as info:
                await sink.send([_at(-5, namespace="a"), _at(-4, namespace="b")])
        finally:
            await sink.aclose()
    assert info.value.reason == (
        f"loki: {front.url} answered 302, a redirect to /login (not followed, nothing stored)"
    )
    assert front.seen == [f"POST {PUSH}"] * 2  # one push a stream new to the sink; no GET /login
    assert not loki.entries


# ---- 2. Loki 2.x's stream-limit answer names no stream --------------------------------------------


async def test_a_loki_2x_stream_limit_answer_sets_aside_the_push_s_new_stream(tmp_path: Path) -> None:
    """Loki 2.x answers the active stream limit without naming the stream. The tenant is at its limit
    (a, b, c); an event in d is refused. Before, the push was retried whole in place and nothing of
    a, b or c was delivered while the limit lasted; now d waits aside (the only stream of its push
    that Loki may not hold, which the sink puts last), the rest goes in, and d once the limit is
    raised, every entry stored once."""
    async with LokiReceiver(max_streams=3, stream_limit_wording="2.x") as loki:
        metrics = Metrics()
        pipeline = pipeline_for(
            "loki",
            _sink(loki.url),
            metrics,
            tmp_path / "dl",
            retry_initial_backoff=0.2,
            retry_max_backoff=1.0,
        )
        async with _running(pipeline):
            for ns in ("a", "b", "c"):
                pipeline.offer(_at(-60, namespace=ns, object_name=f"{ns}-first"))
            await until(lambda: _count(metrics.delivered, "loki") == 3)
            pipeline.offer(_at(-50, namespace="d", object_name="d-new"))  # with round 0: one push, d last
            for round_ in range(5):
                for ns in ("a", "b", "c"):
                    pipeline.offer(_at(-40 + round_, namespace=ns, object_name=f"{ns}-{round_}"))
                want = 6 + 3 * round_
                await until(lambda: _count(metrics.delivered, "loki") == want)  # noqa: B023 - awaited here
            refused = loki.stream_limited
            await until(lambda: loki.stream_limited > refused)  # d is still being retried, aside
            assert "d-new" not in _names(loki)
            loki.max_streams = 4
            await until(lambda: _count(metrics.delivered, "loki") == 19)
    assert _names(loki) == {f"{ns}-{r}": 1 for ns in "abc" for r in [*range(5), "first"]} | {"d-new": 1}
    assert {p.status for p in loki.pushes} == {204, 429}
    assert all(
        p.message.startswith("Maximum active stream limit exceeded, reduce")
        for p in loki.pushes
        if p.status == 429
    )
    assert not (tmp_path / "dl").exists()


async def test_a_loki_2x_answer_that_cannot_say_which_new_stream_pushes_each_stream_on_its_own() -> None:
    """``new_stream_pushes=false``: one push, its new streams last. Loki 2.x's answer is about the
    last, but this sink cannot tell which of the new streams that is to Loki (a push is spread over
    ingesters), nor whether Loki forgot one it counts on: each stream is pushed again on its own and
    judged by its own answer. Before, the whole push was retried (RetryableError) and every stream
    with it, for as long as the tenant stayed at its limit."""
    async with LokiReceiver(max_streams=2, stream_limit_wording="2.x") as loki:
        sink = _sink(loki.url, new_stream_pushes="false")
        try:
            assert await sink.send([_at(-60, namespace="a", object_name="a-0")]) is not None
            batch = [
                _at(-50, namespace="a", object_name="a-1"),
                _at(-49, namespace="b", object_name="b-0"),
                _at(-48, namespace="c", object_name="c-0"),
            ]
            outcomes = await sink.send(batch)
            assert outcomes is not None
            assert [o.kind for o in outcomes] == [OutcomeKind.OK, OutcomeKind.OK, OutcomeKind.RETRY]
            assert outcomes[2].defer and not outcomes[2].held  # c waits aside, holding up no other
            assert "Maximum active stream limit exceeded, reduce" in outcomes[2].reason
            loki.max_streams = 3
            assert [o.kind for o in await sink.send([batch[2]]) or []] == [OutcomeKind.OK]
        finally:
            await sink.aclose()
    # a and b stored by the first push and again, alone (Loki keeps one copy of identical entries)
    assert {len(s.values) for s in loki.query_range()} == {1, 2}
    assert sum(len(s.values) for s in loki.query_range()) == 4
    statuses = [p.status for p in loki.pushes]
    assert statuses[:2] == [204, 429] and sorted(statuses[2:5]) == [204, 204, 429] and statuses[5:] == [204]


# ---- 3. late entries of several streams: each stream answered by Loki ----------------------------


async def test_late_entries_of_several_streams_are_each_answered_by_loki() -> None:
    """clamp_time=false: entries predicted refused for their time went in one push, a's (two hours
    behind its stream's newest: Loki refuses it) before b's (9.5 min ahead: predicted refused by the
    sink's 60 s margin, Loki takes it). Loki answers for the push's last stream only: 204, and a's
    entry was answered OK, never stored. Now each stream is a push of its own."""
    async with LokiReceiver() as loki:
        sink = _sink(loki.url, clamp_time="false")
        try:
            await sink.send(
                [_at(0, namespace="a", object_name="a-now"), _at(0, namespace="b", object_name="b-now")]
            )
            outcomes = await sink.send(
                [
                    _at(-7200, namespace="a", object_name="a-old"),
                    _at(570, namespace="b", object_name="b-ahead"),
                ]
            )
        finally:
            await sink.aclose()
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.REJECT, OutcomeKind.OK]
    assert "entry too far behind" in outcomes[0].reason
    assert _names(loki) == {"a-now": 1, "b-now": 1, "b-ahead": 1}  # nothing answered OK is missing


# ---- 4. pushes a send had no time for wait aside with the stream it set aside ----------------------


async def test_pushes_a_send_had_no_time_for_wait_aside_with_the_stream_it_set_aside(tmp_path: Path) -> None:
    """A restart's relist at a slow Loki (0.25 s a push) at its stream limit: every stream is new to
    the fresh sink (a push each), ns-0 is new to Loki and refused (set aside), and the send has time
    for some 56 of its 240 pushes. Before, the engine retried the rest in place with ns-0 at its
    head, counting attempts: at retry_max_attempts=3 about 70 entries never sent were dead-lettered
    with ns-0's reason. Now they wait aside too, due at once: every other stream is stored once."""
    n = 240
    slow = [False]
    async with LokiReceiver(max_streams=n - 1, push_delay=lambda _: 0.25 if slow[0] else 0.0) as loki:
        before = _sink(loki.url)  # the router before the restart: Loki holds ns-1 ... ns-239
        try:
            await before.send([_at(-120, namespace=f"ns-{i}", object_name="warm") for i in range(1, n)])
        finally:
            await before.aclose()
        assert len(loki.entries) == n - 1
        slow[0] = True
        context = SinkContext("loki", "test", None, LOG, send_timeout=3.0)
        metrics = Metrics()
        pipeline = pipeline_for(
            "loki",
            _sink(loki.url, context, timeout=1.0),
            metrics,
            tmp_path / "dl",
            batch_max_events=n,
            send_timeout=3.0,
            retry_initial_backoff=0.5,
            retry_max_backoff=30.0,
            retry_max_attempts=3,
        )
        async with _running(pipeline):
            for i in range(n):
                pipeline.offer(_at(-60, namespace=f"ns-{i}", object_name=f"pod-{i}"))
            exhausted = metrics.dead_lettered.labels("loki", "retries_exhausted")
            # Every other stream delivered; or, as before, more than ns-0 dead-lettered.
            await until(
                lambda: _count(metrics.delivered, "loki") >= n - 1 or exhausted._value.get() > 1, timeout=40
            )
    assert exhausted._value.get() <= 1  # ns-0's only, if any
    stored = _names(loki)
    assert {f"pod-{i}" for i in range(1, n)} <= set(stored)
    assert all(stored[f"pod-{i}"] == 1 for i in range(1, n))
    assert "pod-0" not in stored


# ---- 6. a token in the URL's path ---------------------------------------------------------------


async def test_a_token_in_the_urls_path_is_in_no_reason_or_log(caplog: pytest.LogCaptureFixture) -> None:
    """A gateway keyed by a path token (``http://gw/<token>``): the sink's own address, in every reason,
    log line and dead letter, kept the path. It is now shown as the other sinks show it."""
    caplog.set_level(logging.DEBUG)
    async with LokiReceiver() as loki, Front(loki.url, prefix=f"/{TOKEN}") as gateway:
        gateway.fail = [(503, "upstream connect error")] * 2
        sink = _sink(f"{gateway.url}/{TOKEN}")
        try:
            await sink.start()  # warns: /ready answered 503
            with pytest.raises(RetryableError) as info:
                await sink.send([_at(-5)])
            await sink.send([_at(-4)])
        finally:
            await sink.aclose()
    assert info.value.reason == f"loki: {gateway.url}/*** answered 503: upstream connect error"
    assert (
        f"loki: {gateway.url}/***/ready answered 503 'upstream connect error'; pushing anyway" in caplog.text
    )
    assert TOKEN not in caplog.text
    assert len(loki.entries) == 1


# ---- 7. a front's web page answered 2xx (no redirect) and 404/405 are not Loki's answers -----------


@pytest.mark.parametrize(
    "content_type", ["text/html", "text/plain"], ids=["text-html", "an-html-body-labelled-text"]
)
async def test_a_web_page_answered_2xx_by_a_front_is_never_taken_as_stored(
    content_type: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An auth front (oauth2-proxy without --skip-auth-regex, a misrouted ingress) answers every path
    200 with its sign-in page, no redirect. Before: start said ready, and every push was answered OK,
    checkpointed and lost. Now start (and ``eventrouter check``) fails naming the page, and a push so
    answered is retried, never dead-lettered, logged once until one is stored."""
    caplog.set_level(logging.WARNING)
    async with LokiReceiver() as loki, Front(loki.url) as front:
        front.page = (200, content_type)
        sink = _sink(front.url)
        try:
            with pytest.raises(SinkError) as info:
                await sink.check()
        finally:
            await sink.aclose()
        assert str(info.value) == (
            f"loki: GET {front.url}/ready answered 200 with a web page ({content_type}, "
            "'Sign in · Access'), not Loki: something before it (an auth front's sign-in page, an "
            "ingress's default site) answers for it; give url Loki's address, and the credentials its "
            "front takes"
        )
        front.page = None
        metrics = Metrics()
        pipeline = pipeline_for(
            "loki",
            _sink(front.url),
            metrics,
            tmp_path / "dl",
            retry_initial_backoff=0.01,
            retry_max_backoff=0.05,
        )
        async with _running(pipeline):
            await pipeline.started.wait()  # through the front while it still forwards
            front.page = (200, content_type)
            for i in range(5):
                pipeline.offer(_at(-10 + i, namespace=f"ns-{i % 2}", object_name=f"pod-{i}"))
            retried = metrics.send_errors.labels("loki", "retryable")
            answered = (metrics.delivered.labels("loki"), metrics.dead_lettered.labels("loki", "rejected"))
            await until(lambda: retried._value.get() >= 3 or any(m._value.get() for m in answered))
            assert [m._value.get() for m in answered] == [0, 0]  # (before: 5 delivered, none stored)
            assert not loki.entries
            front.page = None  # the front lets the router through
            await until(lambda: _count(metrics.delivered, "loki") == 5)
    assert not (tmp_path / "dl").exists()
    assert _names(loki) == {f"pod-{i}": 1 for i in range(5)}
    (warning,) = [m for r in caplog.records if (m := r.getMessage()).startswith("loki: ") and "web page" in m]
    assert warning == (
        f"loki: {front.url} answered 200 with a web page ({content_type}, 'Sign in · "
        "Access'), not Loki (nothing stored): something before Loki (an auth front's sign-in page, an "
        "ingress's default site) answers for it; give url Loki's address, and the credentials its front "
        "takes; retrying until that is put right"
    )


@pytest.mark.parametrize("status", [404, 405])
async def test_a_404_or_405_from_before_loki_is_retried_and_logged_never_dead_lettered(
    status: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Loki never answers 404 or 405 to a push: a read-only gateway, an ingress route that takes no
    POST, a wrong path answers so, for the operator to put right. Before, a 405 dead-lettered every
    entry (a 404 was retried, logged by the engine only as a failed send). Now both are retried and
    logged once, naming the status and the push URL, its path token masked, until a push is stored."""
    caplog.set_level(logging.DEBUG)
    async with LokiReceiver() as loki, Front(loki.url, prefix=f"/{TOKEN}") as gateway:
        metrics = Metrics()
        pipeline = pipeline_for(
            "loki",
            _sink(f"{gateway.url}/{TOKEN}"),
            metrics,
            tmp_path / "dl",
            retry_initial_backoff=0.01,
            retry_max_backoff=0.05,
        )
        async with _running(pipeline):
            await pipeline.started.wait()
            text = {404: "404 page not found", 405: "405: Method Not Allowed"}[status]
            gateway.fail = [(status, text)] * 4
            for i in range(5):
                pipeline.offer(_at(-10 + i, namespace=f"ns-{i % 2}", object_name=f"pod-{i}"))
            dead = metrics.dead_lettered.labels("loki", "rejected")
            await until(lambda: _count(metrics.delivered, "loki") + dead._value.get() == 5)
            assert dead._value.get() == 0  # (before, at 405: 5)
            assert not gateway.fail
    assert not (tmp_path / "dl").exists()
    assert _names(loki) == {f"pod-{i}": 1 for i in range(5)}
    (warning,) = [m for r in caplog.records if (m := r.getMessage()).startswith(f"loki: POST {gateway.url}")]
    assert warning == (
        f"loki: POST {gateway.url}/***{PUSH} answered {status}, not Loki's answer to a push (nothing "
        f"stored): {text}: nothing there takes Loki's pushes (a wrong host or path, a gateway or an "
        "ingress route that takes no POST, a Loki target without a distributor); give url Loki's "
        "address (e.g. http://loki:3100, or the base path a gateway forwards to Loki); retrying until "
        "that is put right"
    )
    assert TOKEN not in caplog.text
