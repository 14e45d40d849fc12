"""webhook sink, session 32's review: a stop past the drain deadline (``stop_sending``), a batch a
receiver refuses for one record (halved), 404/405 retried as about the URL, a redirect to
``check``'s HEAD, reserved and conflicting ``headers``, and the test receiver's answer to a body it
cannot read.

Against the project's WebhookReceiver, directly, through the engine's own Pipeline
(``pipeline_for``) or a whole Router on the project's Kubernetes API test server with a data dir."""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from eventrouter import OutcomeKind, SinkContext
from eventrouter.app import Router
from eventrouter.config import ConfigError, build_spec, build_specs
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.plugins import discover
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.apiserver import FakeApiServer
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.webhook import RecordedRequest, WebhookReceiver
from eventrouter.testing.routers import router_settings
from eventrouter.testing.waiting import until
from eventrouter_sinks.webhook import WebhookOptions, WebhookSink

LOG = logging.getLogger("test.webhook.s32")
NAME = "webhook"


def sink(**options: Any) -> WebhookSink:
    return WebhookSink(WebhookOptions.model_validate(options), SinkContext(NAME, "t", None, LOG))


@asynccontextmanager
async def engine(
    options: dict[str, Any], metrics: Metrics, dead: Path, **knobs: Any
) -> AsyncIterator[Pipeline]:
    """A running Pipeline of a webhook sink (fast backoffs); drained and stopped on the way out."""
    knobs = {"retry_initial_backoff": 0.01, "retry_max_backoff": 0.05, **knobs}
    pipeline = pipeline_for(NAME, sink(**options), metrics, dead, **knobs)
    async with drained(pipeline):
        yield pipeline


def carried(request: RecordedRequest) -> list[tuple[str, int]]:
    body = request.json()
    return [(r["uid"], r["occurrence"]) for r in (body if isinstance(body, list) else [body])]


def taken(requests: Iterable[RecordedRequest]) -> list[tuple[str, int]]:
    """(uid, occurrence) of every record the receiver accepted, in the order it took them."""
    return [key for q in requests if q.status is not None and 200 <= q.status < 300 for key in carried(q)]


def count(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def config_error(**entry: Any) -> str:
    """The configuration error (exit 2) for a webhook sink entry, as `eventrouter run` prints it."""
    with pytest.raises(ConfigError) as info:
        build_spec({"type": "webhook", **entry}, where="sink", plugins=discover())
    return str(info.value)


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(token="secret-token") as server:
        server.bookmark_interval = 0.2
        yield server


# -- F2: a stop past the drain deadline --------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "delay", "stop_after"),
    [(300, 0.05, 40), (12, 1.5, 2)],
    ids=["answers-in-50ms", "answers-in-1.5s"],
)
async def test_a_stop_past_the_shutdown_timeout_delivers_again_at_most_the_request_in_flight(
    api: FakeApiServer, tmp_path: Path, events: int, delay: float, stop_after: int
) -> None:
    """The review's stop_dups script: mode=event, a Router with a data dir and shutdown_timeout=1,
    stopped while its send is under way, then restarted on the same data dir. The send did not look
    at the stop: the router cut it off after its 1 s grace and spooled its whole batch, so every
    record it had delivered was delivered again after the restart (79 of 79). Now it starts no
    request once told to stop, the one in flight gets half a second (at a receiver answering in
    1.5 s it is given up, and may have gone in), and the send answers what went in before the
    router spools the rest: each record is delivered once, but at most the one in flight."""
    data = tmp_path / "data"
    async with WebhookReceiver(delay=delay) as hook:
        uids = [api.create_event(event_object(object_name=f"o{i}"))["metadata"]["uid"] for i in range(events)]
        flag = f"webhook:{hook.url}?mode=event&batch_max_events={events}&batch_max_wait=0.5"

        def router() -> Router:
            return Router(
                router_settings(api, tmp_path, data_dir=data, shutdown_timeout=1.0), build_specs([flag])
            )

        first = router()
        async with first.running():
            await until(lambda: len(taken(hook.requests)) >= stop_after, timeout=30)
        assert first.exit_code == 0
        hook.delay = 0.0
        second = router()
        async with second.running():
            await until(lambda: {u for u, _ in taken(hook.requests)} >= set(uids), timeout=60)
            await second.pipelines[0].wait_idle(5)
        assert second.exit_code == 0
    copies = Counter(taken(hook.requests))
    assert set(copies) == {(u, 1) for u in uids}
    twice = [key for key, n in copies.items() if n > 1]
    assert len(twice) <= 1, f"{len(twice)} delivered twice"  # one record a request in mode=event


# -- F6: a batch the receiver refuses for one record -------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
async def test_batch_mode_rejects_only_the_record_the_receiver_refuses_not_its_whole_batch(
    status: int,
) -> None:
    """A receiver validating its input refuses the whole array for one record (#17 of 50). Every
    record of the batch was rejected with that one's reason (50 dead letters). Now the request is
    halved as for a 413, down to the record refused alone: that one is rejected with its own
    answer, the 49 others go in once, in order, in a few requests."""
    occs = [make_occurrence(object_name=f"o{i}", message="poison" if i == 17 else "fine") for i in range(50)]
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, status, body=b'{"error":"field message: invalid"}')
        s = sink(url=hook.url)
        try:
            await s.start()
            outcomes = await s.send(occs)
        finally:
            await s.aclose()
    assert outcomes is not None
    assert [o.kind for o in outcomes] == [OutcomeKind.OK] * 17 + [OutcomeKind.REJECT] + [OutcomeKind.OK] * 32
    assert outcomes[17].reason == f'HTTP {status} from {hook.url}: {{"error":"field message: invalid"}}'
    assert taken(hook.requests) == [(o.uid, o.number) for o in occs if o.record["message"] == "fine"]
    assert len(hook.requests) <= 2 * 6 + 1  # two a halving, 50 → 1 in six


async def test_a_receiver_refusing_every_body_costs_a_bounded_number_of_requests() -> None:
    """A receiver that refuses any array (a wrong body format for it): halving finds nothing to take.
    It is given 64 requests a send; past them a refused request is rejected whole, with a reason
    that says so. Every record is rejected, none twice, in well under the 999 of a full halving."""
    occs = [make_occurrence(object_name=f"o{i}") for i in range(500)]
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: True, 400, body=b"not what I expect")
        s = sink(url=hook.url)
        try:
            await s.start()
            outcomes = await s.send(occs)
        finally:
            await s.aclose()
    assert outcomes is not None and {o.kind for o in outcomes} == {OutcomeKind.REJECT}
    assert all(o.reason.startswith(f"HTTP 400 from {hook.url}: not what I expect") for o in outcomes)
    assert any("refused whole: the send had spent its 64 requests" in o.reason for o in outcomes)
    assert len(hook.requests) == 1 + 64  # the first, then 32 halvings


async def test_a_415_to_a_batch_is_about_every_request_and_rejects_it_whole() -> None:
    occs = [make_occurrence(object_name=f"o{i}") for i in range(8)]
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: True, 415, body=b"unsupported")
        s = sink(url=hook.url)
        try:
            await s.start()
            outcomes = await s.send(occs)
        finally:
            await s.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT] * 8
    assert len(hook.requests) == 1


# -- F5: 404 and 405 are about the URL ----------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 405])
@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_404_or_405_for_a_while_is_retried_dead_letters_nothing_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, status: int
) -> None:
    """An ingress's default backend answers 404 (or a route 405) to everything while the receiver's
    pods roll out. Rejected as final, every event of that window was dead-lettered (20 of 20). Now
    retried until the receiver is back: all 20 go in once, nothing is dead-lettered, and one warning
    names the URL and method to check."""
    caplog.set_level(logging.WARNING)
    occs = [make_occurrence(object_name=f"o{i}") for i in range(20)]
    metrics = Metrics()
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: True, status, body=b"default backend - 404")
        async with engine({"url": hook.url, "mode": mode}, metrics, tmp_path / "dead") as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: sum(q.status == status for q in hook.requests) >= 8)  # several attempts
            assert count(metrics.dead_lettered, NAME, "rejected") == 0
            hook.fail_matching(None)  # the receiver's pods are ready
            await until(lambda: count(metrics.delivered, NAME) == 20)
    assert count(metrics.dead_lettered, NAME, "rejected") == 0
    assert not (tmp_path / "dead").exists()
    assert Counter(taken(hook.requests)) == Counter((o.uid, o.number) for o in occs)  # each once
    said = [r.getMessage() for r in caplog.records if r.name == LOG.name and "check url" in r.getMessage()]
    assert len(said) == 1, said
    assert f"HTTP {status} from {hook.url}: default backend - 404" in said[0]
    assert f"check url: its path or method (POST {hook.url})" in said[0]


@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_404_for_one_record_sets_it_aside_and_dead_letters_it_only_when_retries_run_out(
    tmp_path: Path, mode: str
) -> None:
    """A receiver answering 404 for one record only (the object it names is unknown to it): the
    probe tells it from the URL's 404. It waits aside while the rest goes in, and is dead-lettered
    as retries exhausted (never as rejected) once retry_max_attempts is spent."""
    occs = [make_occurrence(object_name=f"o{i}", message="poison" if i == 3 else "fine") for i in range(10)]
    metrics = Metrics()
    dead = tmp_path / "dead"
    async with WebhookReceiver() as hook:
        hook.fail_matching(lambda body: b"poison" in body, 404, body=b"no such object")
        async with engine({"url": hook.url, "mode": mode}, metrics, dead, retry_max_attempts=3) as pipeline:
            for occ in occs:
                pipeline.offer(occ)
            await until(lambda: count(metrics.dead_lettered, NAME, "retries_exhausted") == 1)
            await until(lambda: count(metrics.delivered, NAME) == 9)
    assert count(metrics.dead_lettered, NAME, "rejected") == 0
    assert Counter(taken(hook.requests)) == Counter((o.uid, o.number) for o in occs if o is not occs[3])
    text = dead.read_text()
    assert occs[3].uid in text and f"HTTP 404 from {hook.url}: no such object" in text


# -- F1: check and a redirect --------------------------------------------------------------------------

SECRETS = ("pw-s3cret-1", "tok-s3cret-2", "bearer-s3cret-3")


@pytest.mark.parametrize("healthcheck", [False, True])
async def test_check_warns_but_passes_for_a_head_redirect_naming_the_redacted_location(
    caplog: pytest.LogCaptureFixture, healthcheck: bool
) -> None:
    """A redirect of HEAD says nothing sure of POST: oauth2-proxy sends HEAD/GET to sign in and lets
    the hook's POST through. `check` failed such an endpoint (item 246) and told the operator to
    give url the sign-in page. Now a warning (item 253) naming where the redirect points, redacted,
    and that the sink's POSTs are not followed; check passes, and the POST is taken."""
    caplog.set_level(logging.WARNING)
    pw, tok, bearer = SECRETS
    location = f"https://admin:{pw}@sso.example/oauth2/start?token={tok}"
    async with WebhookReceiver(head_status=302, head_headers={"Location": location}) as hook:
        options: dict[str, Any] = {"url": hook.url, "bearer_token": bearer}
        if healthcheck:
            options["healthcheck_url"] = hook.url.replace("/hook", "/healthz")
        s = sink(**options)
        try:
            await s.check()  # no SinkError
            outcomes = await s.send([make_occurrence()])
        finally:
            await s.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK]
    assert [(q.method, q.status) for q in hook.requests] == [("HEAD", 302), ("POST", 200)]
    (said,) = [r.getMessage() for r in caplog.records if r.name == LOG.name and "HEAD" in r.getMessage()]
    shown = options.get("healthcheck_url", hook.url)
    assert said.startswith(
        f"webhook {shown} answered HEAD with 302, a redirect to 'https://***@sso.example/oauth2/start"
        "?token=***': not a failure (a HEAD may be redirected while a POST is taken), but the sink's "
        "POSTs are not followed when redirected"
    ), said
    if healthcheck:
        assert said.endswith("give healthcheck_url the address it points to, for a check of the endpoint")
    else:
        assert said.endswith("if a POST to url is redirected too, give url the address it points to")
    for secret in SECRETS:
        assert secret not in caplog.text


# -- F3: headers the sink sets, and an Authorization header beside other auth ------------------------


@pytest.mark.parametrize(
    "header",
    ["Content-Length:10", "Transfer-Encoding:chunked", "content-encoding:gzip", "Content-Encoding:br"],
)
def test_a_header_that_frames_the_body_is_refused_at_validation_naming_it(header: str) -> None:
    """Each broke every request (a body cut at 10 bytes, a gzip claim over plain JSON: rejected or
    retried for ever, the reason naming no option). Now a configuration error naming the header."""
    name = header.partition(":")[0]
    message = config_error(url="http://h/hook", headers=[header])
    assert f"headers: header {name} is set by the sink and cannot be overridden" in message


@pytest.mark.parametrize("mode", ["batch", "event"])
@pytest.mark.parametrize(
    "header",
    ["Connection:keep-alive", "Connection:close", "Content-Encoding:identity", "content-encoding: IDENTITY"],
)
async def test_harmless_framing_headers_that_worked_before_still_validate_and_deliver(
    header: str, mode: str
) -> None:
    """`Connection` (often pasted from a curl example) and `Content-Encoding: identity` break no
    request, and were taken before item 246; it refused them at validation, so such a configuration
    no longer started the router (exit 2, every sink down). Now they validate again (item 253), and
    the records go in."""
    occs = [make_occurrence(object_name=f"o{i}") for i in range(3)]
    async with WebhookReceiver() as hook:
        s = sink(url=hook.url, mode=mode, headers=[header])
        try:
            await s.start()
            outcomes = await s.send(occs)
        finally:
            await s.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 3
    assert taken(hook.requests) == [(o.uid, o.number) for o in occs]


@pytest.mark.parametrize(
    ("auth", "named"),
    [
        ({"bearer_token": "t0k"}, "bearer_token"),
        ({"username": "u", "password": "pw"}, "basic auth"),
        ({"url": "http://u:pw@h/hook"}, "basic auth"),
        ({"url": "http://:pw@h/hook"}, "basic auth"),  # an API key as the password (item 253)
        ({"url": "http://@h/hook"}, "basic auth"),  # user info, both parts empty: sent all the same
    ],
)
def test_an_authorization_header_beside_other_auth_is_refused(auth: dict[str, Any], named: str) -> None:
    """It replaced the bearer token or basic auth without a word (the custom header wins)."""
    entry = {"url": "http://h/hook", "headers": ["Authorization:Basic b3RoZXI6c2VjcmV0LXZhbA=="], **auth}
    message = config_error(**entry)
    assert f"headers: an Authorization header would replace {named}: set one of them" in message
    assert "b3RoZXI6c2VjcmV0LXZhbA" not in message


@pytest.mark.parametrize(("userinfo", "basic"), [(":tok3n", ":tok3n"), ("", ":")])
async def test_url_user_info_with_an_empty_user_name_is_sent_as_basic_auth(userinfo: str, basic: str) -> None:
    """What validation must agree with: user info in url with an empty user name (``:API_KEY@``)
    is sent as basic auth, so an Authorization header or bearer_token beside it would replace it
    (both refused: the tests above and test_webhook.py's configuration errors)."""
    async with WebhookReceiver() as hook:
        s = sink(url=hook.url.replace("http://", f"http://{userinfo}@"))
        try:
            await s.start()
            outcomes = await s.send([make_occurrence()])
        finally:
            await s.aclose()
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK]
    (request,) = hook.requests
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(basic.encode()).decode()


def test_an_authorization_header_alone_is_still_taken() -> None:
    options = WebhookOptions.model_validate({"url": "http://h/hook", "headers": ["Authorization:Basic abc"]})
    assert list(options.headers) == ["Authorization"]


# -- F4: the test receiver and a body it cannot read --------------------------------------------------


async def test_the_receiver_answers_400_to_a_body_it_cannot_read_and_records_it() -> None:
    """A Content-Encoding it cannot undo: aiohttp answered 500 with a traceback (a sink retries that
    for ever) and the request was not recorded. Now 400, recorded with an empty body."""
    async with WebhookReceiver() as hook, aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with session.post(hook.url, data=b'{"a": 1}', headers=headers) as resp:
            status, text = resp.status, await resp.text()
    assert status == 400 and text.startswith("cannot read body:")
    (request,) = hook.requests
    assert (request.method, request.status, request.body) == ("POST", 400, b"")
    assert request.headers["Content-Encoding"] == "gzip"


# -- item 253 (review of item 246), F1: the request given up at the stop is no failed attempt -----------


@pytest.mark.parametrize("mode", ["batch", "event"])
async def test_a_stop_past_the_shutdown_timeout_never_dead_letters_the_request_given_up(
    api: FakeApiServer, tmp_path: Path, mode: str
) -> None:
    """The review's stop_deadletter script: retry_max_attempts=3, the receiver answers 503
    (Retry-After: 0) twice and never answers the third attempt; the Router (data dir,
    shutdown_timeout=0.2) stops meanwhile, then starts again on the same data dir. The request given
    up 0.5 s after ``stop_sending`` was answered a failure, so the third attempt counted, and the
    engine dead-lettered the whole batch at a clean stop (mode=event: the four records never sent
    too) as "retries exhausted", saying they would be sent after the restart. Now it is a hold:
    nothing is dead-lettered, and all five go in after the restart."""
    data = tmp_path / "data"
    async with WebhookReceiver() as hook:
        uids = [api.create_event(event_object(object_name=f"o{i}"))["metadata"]["uid"] for i in range(5)]
        hook.fail_next(2, 503, retry_after="0")
        hook.hang_next(1)  # the third attempt: a receiver stuck
        flag = (
            f"webhook:{hook.url}?mode={mode}&batch_max_events=5&batch_max_wait=0.5&retry_max_attempts=3"
            "&retry_initial_backoff=0.05&retry_max_backoff=0.05"
        )

        def router() -> Router:
            return Router(
                router_settings(api, tmp_path, data_dir=data, shutdown_timeout=0.2), build_specs([flag])
            )

        first = router()
        async with first.running():
            await until(lambda: len(hook.requests) >= 3, timeout=30)  # the third is in flight
        assert first.exit_code == 0
        assert [q.status for q in hook.requests] == [503, 503, None]
        for reason in ("retries_exhausted", "rejected"):
            assert count(first.metrics.dead_lettered, NAME, reason) == 0, reason
        second = router()
        async with second.running():
            await until(lambda: {u for u, _ in taken(hook.requests)} >= set(uids), timeout=30)
            await second.pipelines[0].wait_idle(5)
        assert second.exit_code == 0
        assert count(second.metrics.dead_lettered, NAME, "retries_exhausted") == 0
    assert Counter(taken(hook.requests)) == Counter((u, 1) for u in uids)  # each once (none went in)
    assert not list((data / "deadletter").glob("*.jsonl"))


# -- item 253, F4: a 409 is rejected whole, never halved into new webhook-ids ----------------------------

STANDARD_SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


class _DedupingReceiver(WebhookReceiver):
    """A Standard Webhooks receiver deduping on ``webhook-id`` (the reference's idempotency key):
    409 to an id it has (the IETF Idempotency-Key draft's answer while the first is in progress).
    It stores a request as it arrives; the first is never answered (stuck past the sink's
    ``timeout``), so the engine sends the batch again, with the same id."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.ids: set[str] = set()
        self.stored: list[tuple[str, int]] = []

    async def _answer(self, request: web.Request, rec: RecordedRequest) -> web.Response:
        msg_id = rec.headers.get("webhook-id", "")
        if msg_id in self.ids:
            return web.Response(status=409, text="webhook-id already processed")
        self.ids.add(msg_id)
        self.stored += carried(rec)
        if len(self.ids) == 1:
            await self._release.wait()  # (until the receiver closes)
        return await super()._answer(request, rec)


async def test_a_409_to_a_replayed_webhook_id_is_rejected_whole_never_halved_into_new_ids(
    tmp_path: Path,
) -> None:
    """The review's idem_409 script: mode=batch, signature=standard, timeout=0.5; the receiver
    stores the first request and does not answer in time, the engine sends the batch again with
    the same webhook-id, the receiver answers 409. Item 246 halved that 409 as a 400: each half
    carried a new webhook-id, and the receiver stored all 8 records a second time. Now a 409 is
    rejected whole, as before item 246 and as the reference's "other 4xx final": nothing stored
    twice (the 8 are dead-lettered though the receiver has them: this test's Left)."""
    occs = [make_occurrence(object_name=f"o{i}") for i in range(8)]
    metrics = Metrics()
    options = {"secret": STANDARD_SECRET, "signature": "standard", "timeout": 0.5}
    hook = _DedupingReceiver(secret=STANDARD_SECRET, signature="standard")
    async with hook, engine({"url": hook.url, **options}, metrics, tmp_path / "dead") as pipeline:
        for occ in occs:
            pipeline.offer(occ)
        # Each record finished, either way (taken by a half before, rejected now).
        await until(
            lambda: count(metrics.dead_lettered, NAME, "rejected") + count(metrics.delivered, NAME) >= 8
        )
        # The first stored and not answered yet, the second (the same webhook-id) refused: no halves.
        assert [(q.status, len(carried(q))) for q in hook.requests] == [(None, 8), (409, 8)]
    assert Counter(hook.stored) == Counter((o.uid, o.number) for o in occs)  # each once
    assert count(metrics.dead_lettered, NAME, "rejected") == 8
