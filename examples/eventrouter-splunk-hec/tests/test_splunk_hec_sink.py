"""The splunk_hec sink against FakeHEC on loopback, using eventrouter.testing's events and recording."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from email.utils import formatdate
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
from aiohttp import web
from eventrouter import OK, Occurrence, OutcomeKind, SinkContext, SinkError, normalise
from eventrouter.app import Router, RouterSettings
from eventrouter.config import spec_for_class
from eventrouter.metrics import Metrics
from eventrouter.options import PipelineOptions
from eventrouter.plugins import discover
from eventrouter.testing import event_object, make_occurrence, recorded_watch
from eventrouter.testing.pipelines import drained, pipeline_for
from eventrouter.testing.receivers.unreadable import Unreadable
from eventrouter.testing.waiting import until
from hec_fronts import relay, serve
from pydantic import ValidationError

from eventrouter_splunk_hec import SplunkHECOptions, SplunkHECSink
from eventrouter_splunk_hec.fake import FakeHEC

TOKEN = "11111111-2222-3333-4444-555555555555"
LOG = logging.getLogger("test.splunk_hec")


def context(**settings: Any) -> SinkContext:
    return SinkContext(name="splunk_hec", cluster="test", data_dir=None, logger=LOG, **settings)


@asynccontextmanager
async def hec_sink(
    context_settings: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[SplunkHECSink]:
    sink = SplunkHECSink(
        SplunkHECOptions.model_validate({"token": TOKEN, **options}), context(**(context_settings or {}))
    )
    try:
        await sink.start()
        yield sink
    finally:
        await sink.aclose()


@pytest.fixture
async def hec() -> AsyncIterator[FakeHEC]:
    async with FakeHEC(tokens={TOKEN}) as server:
        yield server


def recorded() -> list[Occurrence]:
    return [normalise(e["object"], cluster="rec") for e in recorded_watch() if e["type"] != "DELETED"]


def test_the_entry_point_names_the_sink_class() -> None:
    plugin = discover()["splunk_hec"]
    assert plugin.distribution == "eventrouter-splunk-hec"
    assert plugin.load() is SplunkHECSink


def test_token_comes_from_the_environment_and_never_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEC_TOKEN", TOKEN)
    options = SplunkHECOptions.model_validate({"url": "https://splunk:8088", "hec_token": "env:HEC_TOKEN"})
    assert options.token.get_secret_value() == TOKEN
    assert TOKEN not in repr(options) and TOKEN not in str(options.model_dump())
    sink = SplunkHECSink(options, context())
    assert sink.endpoint == "https://splunk:8088/services/collector/event"


def test_options_refuse_a_missing_token_and_credentials_in_the_url() -> None:
    with pytest.raises(ValidationError, match="token"):
        SplunkHECOptions.model_validate({"url": "http://splunk:8088"})
    with pytest.raises(ValidationError, match="must not carry credentials"):
        SplunkHECOptions.model_validate({"url": "http://admin:hunter2@splunk:8088", "token": TOKEN})
    # A CA bundle that is not there is a configuration error naming it, not a start that fails for ever.
    with pytest.raises(ValidationError, match="ca_file"):
        SplunkHECOptions.model_validate(
            {"url": "https://splunk:8088", "token": TOKEN, "ca_file": "/no/such.pem"}
        )


async def test_the_recording_is_indexed_with_time_host_sourcetype_and_fields(hec: FakeHEC) -> None:
    occurrences = recorded()
    assert len(occurrences) == 126
    async with hec_sink(url=hec.url, index="k8s", sourcetype="kube:events") as sink:
        outcomes = await sink.send(occurrences)
    assert outcomes is not None and all(o is OK for o in outcomes)
    assert len(hec.events) == 126
    assert [(e["event"]["uid"], e["event"]["occurrence"]) for e in hec.events] == [
        (o.uid, o.number) for o in occurrences
    ]
    first, occ = hec.events[0], occurrences[0]
    assert first["time"] == pytest.approx(occ.time_ns / 1e9, abs=0.001)
    assert first["host"] == "rec" and first["index"] == "k8s" and first["sourcetype"] == "kube:events"
    assert first["event"] == occ.record
    assert first["fields"]["namespace"] == occ.record["namespace"]
    assert first["fields"]["reason"] == occ.record["reason"]


async def test_a_wrong_token_fails_start_clearly_without_showing_it(hec: FakeHEC) -> None:
    sink = SplunkHECSink(
        SplunkHECOptions.model_validate({"url": hec.url, "token": "not-the-token"}), context()
    )
    try:
        with pytest.raises(SinkError, match="refused the token: Invalid token") as err:
            await sink.start()
        assert "not-the-token" not in str(err.value)
    finally:
        await sink.aclose()
        await sink.aclose()  # idempotent


async def test_an_unreachable_collector_fails_start_and_retries_sends() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sink = SplunkHECSink(
        SplunkHECOptions.model_validate({"url": f"http://127.0.0.1:{port}", "token": TOKEN}), context()
    )
    try:
        with pytest.raises(SinkError, match="cannot reach"):
            await sink.start()
        outcomes = await sink.send([make_occurrence()])
        assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY
        assert "cannot reach" in outcomes[0].reason
    finally:
        await sink.aclose()


async def test_the_refused_event_is_rejected_and_the_others_retried(hec: FakeHEC) -> None:
    batch = [make_occurrence(reason=f"R{i}") for i in range(3)]
    async with hec_sink(url=hec.url) as sink:
        hec.fail_next(1, 400, {"text": "Invalid data format", "code": 6, "invalid-event-number": 1})
        outcomes = await sink.send(batch)
        assert outcomes is not None
        assert [o.kind for o in outcomes] == [OutcomeKind.RETRY, OutcomeKind.REJECT, OutcomeKind.RETRY]
        assert outcomes[1].reason == "HEC 400: Invalid data format (code 6)"
        again = await sink.send([batch[0], batch[2]])  # what the engine does with the retries
    assert again is not None and all(o is OK for o in again)
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R2"]


async def test_an_index_the_token_may_not_use_rejects_the_batch() -> None:
    async with FakeHEC(tokens={TOKEN}, indexes={"main"}) as hec, hec_sink(url=hec.url, index="k8s") as sink:
        outcomes = await sink.send([make_occurrence(), make_occurrence()])
    assert outcomes is not None
    assert [o.reason for o in outcomes] == ["HEC 400: Incorrect index (code 7)"] * 2
    assert all(o.kind is OutcomeKind.REJECT for o in outcomes) and hec.events == []


async def test_a_busy_collector_is_retried_after_its_retry_after(hec: FakeHEC) -> None:
    async with hec_sink(url=hec.url) as sink:
        hec.fail_next(1, 503, retry_after="7")
        outcomes = await sink.send([make_occurrence(), make_occurrence()])
    assert outcomes is not None
    assert all(o.kind is OutcomeKind.RETRY and o.retry_after == 7.0 for o in outcomes)
    assert "Server is busy (code 9)" in outcomes[0].reason and hec.events == []


async def test_a_rate_limited_request_honours_an_http_date_retry_after(hec: FakeHEC) -> None:
    async with hec_sink(url=hec.url) as sink:
        hec.fail_next(
            1, 429, {"text": "Too many requests"}, retry_after=formatdate(time.time() + 30, usegmt=True)
        )
        outcomes = await sink.send([make_occurrence()])
    assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY
    assert outcomes[0].retry_after is not None and 25 <= outcomes[0].retry_after <= 31


async def test_a_body_over_max_content_length_is_split_and_a_lone_giant_rejected() -> None:
    async with FakeHEC(tokens={TOKEN}, max_content_length=4000) as hec, hec_sink(url=hec.url) as sink:
        small = [make_occurrence(message="x" * 900, reason=f"S{i}") for i in range(6)]  # ~6.5 kB together
        giant = make_occurrence(message="y" * 5000, reason="GIANT")
        outcomes = await sink.send([*small[:3], giant, *small[3:]])
    assert outcomes is not None
    kinds = [o.kind for o in outcomes]
    assert kinds == [OutcomeKind.OK] * 3 + [OutcomeKind.REJECT] + [OutcomeKind.OK] * 3
    assert "too large for HEC: HEC 413" in outcomes[3].reason
    assert sorted(e["event"]["reason"] for e in hec.events) == [f"S{i}" for i in range(6)]
    assert 413 in hec.statuses


async def test_a_message_that_is_not_valid_unicode_is_rejected_alone(hec: FakeHEC) -> None:
    bad = make_occurrence(message="broken \ud800 surrogate", reason="BAD")
    good = make_occurrence(message="Grüße, 世界 🚀", reason="GOOD")
    async with hec_sink(url=hec.url) as sink:
        outcomes = await sink.send([bad, good])
    assert outcomes is not None
    assert outcomes[0].kind is OutcomeKind.REJECT and "cannot encode occurrence" in outcomes[0].reason
    assert outcomes[1] is OK
    assert [e["event"]["message"] for e in hec.events] == ["Grüße, 世界 🚀"]


async def test_include_raw_sends_the_event_object_as_the_api_server_wrote_it(hec: FakeHEC) -> None:
    occ = make_occurrence(reason="Raw")
    async with hec_sink(url=hec.url, include_raw=True, indexed_fields=False) as sink:
        await sink.send([occ])
    (event,) = hec.events
    assert event["event"]["raw"] == occ.raw and "fields" not in event


async def test_a_split_batch_keeps_within_the_send_budget_and_goes_in_once() -> None:
    """HEC takes about two events a request and answers each after 0.3 s: 16 events split in halves
    take 15 requests (4.5 s), past send_timeout (3 s). Cut off, the engine would send the whole batch
    again, the first halves indexed again each time and the rest never sent. Within the budget, what
    is not sent is answered held, sent again at once, and the sizes HEC refused are remembered."""
    batch = [("ADDED", event_object(object_name=f"e-{i}", message="x" * 1000)) for i in range(16)]
    sink = SplunkHECSink(SplunkHECOptions.model_validate({"url": "http://hec", "token": TOKEN}), context())
    one = len(sink.encode(normalise(batch[0][1], cluster="test")))  # the body of one event
    async with FakeHEC(tokens={TOKEN}, max_content_length=one * 5 // 2, delay=0.3) as hec:
        options = {"url": hec.url, "token": TOKEN, "timeout": 1, "send_timeout": 3, "batch_max_wait": 0.01}
        spec = spec_for_class(SplunkHECSink, options, type_="splunk_hec")
        router = Router(RouterSettings(metrics_addr=None, shutdown_timeout=1), [spec])
        await router.start_pipelines()
        assert await router.replay(batch) == (16, 0)
        drained = await router.drain(20)
        await router.stop()
    assert sorted(e["event"]["name"] for e in hec.events) == sorted(o["metadata"]["name"] for _, o in batch)
    timeouts = router.metrics.registry.get_sample_value(
        "eventrouter_sink_send_errors_total", {"sink": "splunk_hec", "kind": "timeout"}
    )
    assert drained and not timeouts
    assert 413 in hec.statuses


# ---- indexer acknowledgement (useACK) -----------------------------------------------------------

OTHER_TOKEN = "99999999-8888-7777-6666-555555555555"


async def test_the_fake_answers_an_ack_token_as_splunk_does() -> None:
    """HEC's contract for a token with indexer acknowledgement on: a channel is required, a 200 carries
    an ackId (per channel, from 0), and /services/collector/ack answers true once the events are indexed
    (once: then Splunk forgets it); a token without acknowledgement cannot query it."""
    channel = str(uuid.uuid4())
    event = b'{"event": "x"}'
    async with (
        FakeHEC(tokens={TOKEN, OTHER_TOKEN}, ack_tokens={TOKEN}) as hec,
        aiohttp.ClientSession(f"{hec.url}") as http,
    ):

        async def post(path: str, body: bytes, token: str = TOKEN, **headers: str) -> tuple[int, Any]:
            async with http.post(
                path, data=body, headers={"Authorization": f"Splunk {token}", **headers}
            ) as r:
                return r.status, await r.json()

        assert await post("/services/collector/event", event) == (
            400,
            {"text": "Data channel is missing", "code": 10},
        )
        bad = await post("/services/collector/event", event, **{"X-Splunk-Request-Channel": "nope"})
        assert bad == (400, {"text": "Invalid data channel", "code": 11})
        on_channel = {"X-Splunk-Request-Channel": channel}
        for n in (0, 1):
            assert await post("/services/collector/event", event, **on_channel) == (
                200,
                {"text": "Success", "code": 0, "ackId": n},
            )
        assert await post(f"/services/collector/event?channel={channel}", b"") == (
            400,
            {"text": "No data", "code": 5},
        )
        ack = "/services/collector/ack"
        assert await post(ack, b'{"acks": [0, 1, 7]}', **on_channel) == (
            200,
            {"acks": {"0": True, "1": True, "7": False}},
        )
        assert await post(ack, b'{"acks": [0]}', **on_channel) == (200, {"acks": {"0": False}})
        assert await post(ack, b'{"acks": [0]}', OTHER_TOKEN, **on_channel) == (
            400,
            {"text": "ACK is disabled", "code": 14},
        )
        assert await post("/services/collector/event", event, OTHER_TOKEN) == (
            200,
            {"text": "Success", "code": 0},
        )
    assert hec.channels == [channel] and len(hec.events) == 3


async def test_an_ack_token_gets_a_channel_and_events_are_ok_once_confirmed_indexed(tmp_path: Path) -> None:
    """A token with indexer acknowledgement on (common: Amazon Data Firehose needs it) answers every
    request without a channel 400 code 10 "Data channel is missing". The sink sent none: start()
    took that answer to its empty POST for "accepts the token", and every event was dead-lettered
    as rejected, even never giving up (retry_max_attempts=0). Now every request carries one channel
    for the sink's life, and an event is OK once HEC confirms it indexed."""
    batch = [make_occurrence(reason=f"R{i}") for i in range(3)]
    async with FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec:
        async with hec_sink(url=hec.url) as sink:
            outcomes = await sink.send(batch)
        assert outcomes is not None and all(o is OK for o in outcomes), outcomes
        assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1", "R2"]
        assert hec.channels == [sink.channel] and hec.ack_queries >= 1

        # Through the engine, never giving up: every event delivered, none dead-lettered.
        metrics = Metrics()
        sink = SplunkHECSink(SplunkHECOptions.model_validate({"url": hec.url, "token": TOKEN}), context())
        pipeline = pipeline_for("splunk_hec", sink, metrics, tmp_path / "dl", retry_max_attempts=0)
        delivered = metrics.delivered.labels("splunk_hec")
        async with drained(pipeline):
            for i in range(5):
                pipeline.offer(make_occurrence(reason=f"P{i}"))
            await until(lambda: delivered._value.get() == 5, timeout=8)
    assert metrics.dead_lettered.labels("splunk_hec", "rejected")._value.get() == 0
    assert not (tmp_path / "dl").exists() or not (tmp_path / "dl").read_bytes().strip()


async def test_events_not_confirmed_within_a_send_are_asked_about_again_not_posted_again() -> None:
    """A 200 with an ackId only says HEC received the events. Not confirmed indexed within the send,
    they are held (no failure) and, offered again, asked about, not posted again: each post is one
    more copy indexed, and before, every retry posted the batch again (item 269)."""
    batch = [make_occurrence(reason=f"R{i}") for i in range(2)]
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        hec_sink({"send_timeout": 2.4}, url=hec.url, timeout=0.5) as sink,
    ):
        held = await sink.send(batch)
        still = await sink.send(batch)  # as the engine does: asked, still not indexed
        hec.hold_acks = False  # the indexers catch up
        hec.release_acks()
        again = await sink.send(batch)
    assert held is not None and still is not None and again is not None
    for outcome in (*held, *still):
        assert outcome.kind is OutcomeKind.RETRY and outcome.held and outcome.defer, outcome
        assert outcome.retry_after is not None and outcome.retry_after > 0
    assert "has not confirmed it indexed yet (indexer acknowledgement" in held[0].reason
    assert all(o is OK for o in again), again
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1"]  # once


async def test_an_ack_token_with_send_timeout_close_to_timeout_is_confirmed_and_delivered_once() -> None:
    """timeout=10 (the default) with send_timeout=12: the ack poll stopped at send_budget - timeout,
    before the send began, so nothing was ever asked: every event retried and indexed again, for ever
    (item 269). The acknowledgement has its own share of the send now."""
    batch = [make_occurrence(reason=f"R{i}") for i in range(3)]
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        hec_sink({"send_timeout": 12.0}, url=hec.url, timeout=10.0) as sink,
    ):
        outcomes = await sink.send(batch)
    assert outcomes is not None and all(o is OK for o in outcomes), outcomes
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1", "R2"] and hec.ack_queries >= 1


async def test_a_split_batch_with_an_ack_token_makes_progress_and_goes_in_once(tmp_path: Path) -> None:
    """A batch HEC takes in several requests (after a 413), each answered in 0.3 s: posting ran up to
    the point the ack poll had to stop, so nothing was confirmed, and the engine sent every event
    again and again: none delivered, copy after copy indexed (item 269). Now posting stops short of the
    acknowledgement's share, what was posted is confirmed, the rest held and sent at once."""
    async with FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, max_content_length=3000, delay=0.3) as hec:
        metrics = Metrics()
        sink = SplunkHECSink(
            SplunkHECOptions.model_validate({"url": hec.url, "token": TOKEN, "timeout": 0.8}),
            context(send_timeout=3.0),
        )
        pipeline = pipeline_for(
            "splunk_hec",
            sink,
            metrics,
            tmp_path / "dl",
            send_timeout=3.0,
            retry_max_attempts=0,
            retry_initial_backoff=0.1,
            retry_max_backoff=0.5,
            batch_max_events=12,
        )
        delivered = metrics.delivered.labels("splunk_hec")
        async with drained(pipeline):
            for i in range(12):
                pipeline.offer(make_occurrence(reason=f"R{i}", message="m" * 1000))
            await until(lambda: delivered._value.get() == 12, timeout=30)
    assert sorted(e["event"]["reason"] for e in hec.events) == sorted(f"R{i}" for i in range(12))
    assert 413 in hec.statuses and metrics.retries.labels("splunk_hec")._value.get() == 0


async def test_a_slow_indexer_is_waited_for_across_sends_and_each_event_indexed_once(tmp_path: Path) -> None:
    """Splunk confirms a request 3 s after it received it, longer than a send waits (Firehose allows
    180-600 s). Each retry posted the batch again and waited the same short window: nothing delivered,
    ever, one copy indexed per attempt (item 269). Now the events wait aside, asked about (not posted)
    each time the engine offers them, and are delivered once indexed, once; no retry counted."""
    async with FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, index_delay=3.0) as hec:
        metrics = Metrics()
        sink = SplunkHECSink(
            SplunkHECOptions.model_validate({"url": hec.url, "token": TOKEN, "timeout": 0.5}),
            context(send_timeout=3.0),
        )
        pipeline = pipeline_for(
            "splunk_hec",
            sink,
            metrics,
            tmp_path / "dl",
            send_timeout=3.0,
            retry_max_attempts=2,
            retry_initial_backoff=0.1,
            retry_max_backoff=0.5,
        )
        delivered = metrics.delivered.labels("splunk_hec")
        async with drained(pipeline):
            for i in range(3):
                pipeline.offer(make_occurrence(reason=f"R{i}"))
            await until(lambda: delivered._value.get() == 3, timeout=20)
    assert sorted(e["event"]["reason"] for e in hec.events) == ["R0", "R1", "R2"]
    assert metrics.retries.labels("splunk_hec")._value.get() == 0
    for reason in ("rejected", "retries_exhausted"):
        assert metrics.dead_lettered.labels("splunk_hec", reason)._value.get() == 0


async def test_events_never_confirmed_are_sent_again_after_ack_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HEC never confirms (its ack state lost, a proxy eating the query): after ack_timeout the events
    are retried as a failure (counted, towards retry_max_attempts) and posted again, with a warning."""
    batch = [make_occurrence(reason="R0")]
    caplog.set_level(logging.WARNING, LOG.name)
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        hec_sink({"send_timeout": 2.4}, url=hec.url, timeout=0.5, ack_timeout=1.0) as sink,
    ):
        sends = 0
        while (outcome := (await sink.send(batch) or [OK])[0]).held:  # each send asks ~0.5 s
            sends += 1
            assert sends < 10, outcome
        assert outcome.kind is OutcomeKind.RETRY and outcome.defer, outcome
        assert "within ack_timeout=1s" in outcome.reason and "sent again" in outcome.reason
        assert len(hec.events) == 1
        await sink.send(batch)  # the engine's retry: posted again
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R0"]
    assert any("ack_timeout=1s" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_hec_restart_between_two_requests_of_a_send_never_answers_the_first_ok(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """HEC restarted after the first request of a send (after a 413, a batch goes in several): what it
    had not indexed was lost, and the channel's ackIds began at 0 again. The second request's ackId 0
    overwrote the first's, whose events were answered OK, never confirmed: lost silently (item 269).
    An ackId not above the channel's last now voids the requests waiting: retried, never OK."""
    batch = [make_occurrence(reason=f"R{i}", message="m" * 900) for i in range(4)]
    caplog.set_level(logging.WARNING, LOG.name)
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, max_content_length=2500, index_delay=0.2) as hec,
        hec_sink(url=hec.url) as sink,
    ):
        hec.restart_after(1)
        outcomes = await sink.send(batch)
        assert outcomes is not None and hec.lost
        lost = {e["event"]["reason"] for e in hec.lost}
        for occ, outcome in zip(batch, outcomes, strict=True):
            if occ.record["reason"] in lost:
                assert outcome.kind is OutcomeKind.RETRY and not outcome.held, outcome
                assert "HEC answered ackId 0 again" in outcome.reason, outcome
            else:
                assert outcome is OK, outcome
        again = await sink.send([occ for occ, o in zip(batch, outcomes, strict=True) if o is not OK])
    assert again is not None and all(o is OK for o in again), again
    assert sorted(e["event"]["reason"] for e in hec.events) == ["R0", "R1", "R2", "R3"]
    assert any("sticky sessions" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_the_fake_plays_a_slow_indexer_a_restart_and_an_idle_channel() -> None:
    """FakeHEC's new faults keep HEC's contract: ``index_delay`` answers false until then; ``restart()``
    loses what was not indexed and numbers every channel from 0 again; a channel idle past
    ``channel_idle_timeout`` is forgotten (its ackIds answered false, the next request ackId 0)."""
    channel = str(uuid.uuid4())
    on_channel = {"Authorization": f"Splunk {TOKEN}", "X-Splunk-Request-Channel": channel}
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, index_delay=0.3) as hec,
        aiohttp.ClientSession(hec.url) as http,
    ):

        async def post(path: str, body: bytes) -> Any:
            async with http.post(path, data=body, headers=on_channel) as r:
                assert r.status == 200
                return await r.json()

        async def asked(*ids: int) -> dict[str, bool]:
            answer: dict[str, bool] = (await post("/services/collector/ack", orjson.dumps({"acks": ids})))[
                "acks"
            ]
            return answer

        event = "/services/collector/event"
        assert (await post(event, b'{"event": "a"}'))["ackId"] == 0
        assert await asked(0) == {"0": False}  # received, not indexed yet
        async with asyncio.timeout(5):  # indexed index_delay after it was received
            while (answer := await asked(0)) == {"0": False}:  # noqa: ASYNC110 - HEC tells nothing
                await asyncio.sleep(0.05)
        assert answer == {"0": True}
        assert await asked(0) == {"0": False}  # answered true once: forgotten
        assert (await post(event, b'{"event": "b"}'))["ackId"] == 1
        hec.restart()  # "b" not indexed yet: lost
        assert [e["event"] for e in hec.events] == ["a"] and [e["event"] for e in hec.lost] == ["b"]
        assert await asked(1) == {"1": False}  # forgotten
        assert (await post(event, b'{"event": "c"}'))["ackId"] == 0  # numbered anew
        hec.channel_idle_timeout = 0.0  # every channel idle since its last use
        assert await asked(0) == {"0": False}  # forgotten with the channel
        assert (await post(event, b'{"event": "d"}'))["ackId"] == 0


async def test_a_channel_dropped_on_the_way_fails_start_naming_it_and_sends_are_retried(hec: FakeHEC) -> None:
    """A proxy that drops the X-Splunk-Request-Channel header: HEC answers 400 code 10 for an ack
    token. start() names it; a send is retried, not rejected (the events are not at fault)."""
    missing = {"text": "Data channel is missing", "code": 10}
    sink = SplunkHECSink(SplunkHECOptions.model_validate({"url": hec.url, "token": TOKEN}), context())
    try:
        hec.fail_next(1, 400, missing)
        with pytest.raises(SinkError, match="indexer acknowledgement on") as err:
            await sink.start()
        assert "X-Splunk-Request-Channel" in str(err.value) and TOKEN not in str(err.value)
        hec.fail_next(1, 400, missing)
        outcomes = await sink.send([make_occurrence()])
    finally:
        await sink.aclose()
    assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY
    assert "Data channel is missing (code 10)" in outcomes[0].reason


# ---- item 283: the waiting bound, the acknowledgement endpoint, a lost answer ---------------------

EVENT_PATH, ACK_PATH = "/services/collector/event", "/services/collector/ack"


@asynccontextmanager
async def gateway(hec: FakeHEC, routes: dict[str, str]) -> AsyncIterator[str]:
    """An HTTP gateway in front of ``hec`` routing only ``routes`` (its path → HEC's path, or another
    server's whole URL; the dict may change while it runs); any other path gets the gateway's own 404
    page. Yields its base URL."""
    async with aiohttp.ClientSession() as http:

        async def forward(request: web.Request) -> web.Response:
            target = routes.get(request.path)
            if target is None:
                return web.Response(status=404, text="404: Not Found")
            url = target if target.startswith("http") else hec.url + target
            return await relay(http, url, request)

        async with serve(forward) as base:
            yield base


def test_the_ack_endpoint_is_found_from_the_event_url_as_splunk_clients_do() -> None:
    """Splunk's clients append HEC's paths to a base URL: the event URL's path up to /services/collector
    is that base, and a gateway's route without it (https://gw/hec) is the base itself. Before, such a
    route sent the acknowledgement query to /services/collector/ack at the host's root (item 283)."""
    found = {
        "https://splunk:8088": "https://splunk:8088/services/collector/ack",
        "https://splunk:8088/services/collector/event/1.0": "https://splunk:8088/services/collector/ack",
        "https://proxy/splunk/services/collector/raw": "https://proxy/splunk/services/collector/ack",
        "https://gw/hec": "https://gw/hec/services/collector/ack",
        "https://gw/hec/": "https://gw/hec/services/collector/ack",
    }
    for url, ack in found.items():
        sink = SplunkHECSink(SplunkHECOptions.model_validate({"url": url, "token": TOKEN}), context())
        assert sink.ack_endpoint == ack, url
    given = {"url": "https://gw/hec", "token": TOKEN, "ack_url": "https://gw/hec-ack"}
    assert (
        SplunkHECSink(SplunkHECOptions.model_validate(given), context()).ack_endpoint == "https://gw/hec-ack"
    )
    with pytest.raises(ValidationError, match="must not carry credentials"):
        SplunkHECOptions.model_validate({**given, "ack_url": "https://u:pw@gw/hec-ack"})
    with pytest.raises(ValidationError, match="acknowledgement endpoint"):
        SplunkHECOptions.model_validate({**given, "ack_url": "gw/hec-ack"})


async def test_an_ack_endpoint_the_gateway_does_not_route_fails_start_naming_it(tmp_path: Path) -> None:
    """url=http://gw/hec, a gateway routing only that path to HEC's event endpoint: the acknowledgement
    query got the gateway's 404. start() passed, and every event was received, held for ack_timeout and
    posted again, for ever: none delivered, a copy per period (item 283). Now start() and check() fail
    naming the address (no token) and ack_url; a token without acknowledgement needs none; with ack_url
    at the gateway's route for it, each event is confirmed and delivered once."""
    async with (
        FakeHEC(tokens={TOKEN, OTHER_TOKEN}, ack_tokens={TOKEN}) as hec,
        gateway(hec, routes := {"/hec": EVENT_PATH}) as gw,
    ):
        sink = SplunkHECSink(SplunkHECOptions.model_validate({"url": f"{gw}/hec", "token": TOKEN}), context())
        try:
            for attempt in (sink.start, sink.check):
                with pytest.raises(SinkError) as err:
                    await attempt()
                message = str(err.value)
                assert f"{gw}/hec/services/collector/ack" in message and "HTTP 404" in message, message
                assert "indexer acknowledgement on" in message and "set ack_url" in message, message
                assert TOKEN not in message
        finally:
            await sink.aclose()
        assert hec.events == []

        async with hec_sink(url=f"{gw}/hec", token=OTHER_TOKEN):  # no acknowledgement: no need of it
            pass

        routes["/hec/ack"] = ACK_PATH
        metrics = Metrics()
        options = {"url": f"{gw}/hec", "ack_url": f"{gw}/hec/ack", "token": TOKEN, "timeout": 1.0}
        sink = SplunkHECSink(SplunkHECOptions.model_validate(options), context(send_timeout=4.0))
        pipeline = pipeline_for("splunk_hec", sink, metrics, tmp_path / "dl", send_timeout=4.0)
        delivered = metrics.delivered.labels("splunk_hec")
        async with drained(pipeline):
            for i in range(3):
                pipeline.offer(make_occurrence(reason=f"R{i}"))
            await until(lambda: delivered._value.get() == 3, timeout=10)
    assert sorted(e["event"]["reason"] for e in hec.events) == ["R0", "R1", "R2"]


async def test_an_ack_endpoint_lost_after_start_is_reported_once_and_nothing_is_posted_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway stops routing the acknowledgement path after start(): every query gets its 404. The
    events HEC received were held as "not indexed yet" and, after ack_timeout, posted again, for ever
    (item 283). Now the first send logs one ERROR naming the address and ack_url; the events are
    retried as a failure (counted, the sink down), asked about, never posted again, also past
    ack_timeout; nothing new is posted; once the route is back they are confirmed, each indexed once."""
    caplog.set_level(logging.INFO, LOG.name)
    batch = [make_occurrence(reason=f"R{i}") for i in range(2)]
    late = make_occurrence(reason="LATE")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        gateway(hec, routes := {"/hec": EVENT_PATH, f"/hec{ACK_PATH}": ACK_PATH}) as gw,
        hec_sink({"send_timeout": 2.4}, url=f"{gw}/hec", timeout=0.5, ack_timeout=0.3) as sink,
    ):
        del routes[f"/hec{ACK_PATH}"]
        t0 = time.monotonic()
        outcomes = list(await sink.send(batch) or [])
        await until(lambda: time.monotonic() > t0 + 0.3)  # past ack_timeout
        outcomes += await sink.send(batch) or []  # the engine's retries
        outcomes += await sink.send([late]) or []
        for outcome in outcomes:
            assert outcome.kind is OutcomeKind.RETRY and not outcome.held and not outcome.defer, outcome
            assert f"{gw}/hec/services/collector/ack" in outcome.reason and "ack_url" in outcome.reason
        assert "not sent" in outcomes[-1].reason
        assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1"]  # once, and LATE not at all

        routes[f"/hec{ACK_PATH}"] = ACK_PATH
        again = await sink.send([*batch, late])
    assert again is not None and all(o is OK for o in again), again
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1", "LATE"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{gw}/hec/services/collector/ack" in errors[0] and TOKEN not in errors[0]
    assert any("answers as HEC's acknowledgement endpoint again" in r.getMessage() for r in caplog.records)


async def test_more_events_than_ack_max_waiting_wait_in_the_queue_and_each_is_indexed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the occurrences the sink remembered (10,000) the least recently posted were forgotten
    before Splunk confirmed them: offered again they were posted again, pushing others out, and
    nothing was ever delivered, every recheck indexing one more copy (item 283). Now nothing new is
    posted while ack_max_waiting events wait to be confirmed (held in the engine's queue): all are
    delivered, each indexed once, no retry counted. Scaled: 40 waiting at most, HEC confirming 1 s
    after receipt, 120 events offered at once."""
    caplog.set_level(logging.WARNING, LOG.name)
    async with FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, index_delay=1.0) as hec:
        metrics = Metrics()
        options = {"url": hec.url, "token": TOKEN, "timeout": 0.5, "ack_max_waiting": 40}
        sink = SplunkHECSink(SplunkHECOptions.model_validate(options), context(send_timeout=3.0))
        pipeline = pipeline_for(
            "splunk_hec",
            sink,
            metrics,
            tmp_path / "dl",
            send_timeout=3.0,
            batch_max_events=20,
            retry_max_attempts=2,
            retry_initial_backoff=0.1,
            retry_max_backoff=0.5,
        )
        delivered = metrics.delivered.labels("splunk_hec")
        async with drained(pipeline):
            for i in range(120):
                pipeline.offer(make_occurrence(reason=f"R{i}"))
            await until(lambda: delivered._value.get() == 120, timeout=60)
    reasons = [e["event"]["reason"] for e in hec.events]
    assert sorted(reasons) == sorted(f"R{i}" for i in range(120))  # each once
    assert metrics.retries.labels("splunk_hec")._value.get() == 0
    assert metrics.dropped.labels("splunk_hec", "queue_full")._value.get() == 0
    assert any("ack_max_waiting=40" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_a_lost_answer_after_a_hec_restart_never_confirms_a_waiting_request_by_another() -> None:
    """HEC restarts (R0, received under ackId 0 and not indexed, is lost; the channel is numbered from
    0 again), and the answer to the next request (R1, taken as ackId 0) is lost. Asked about ackId 0,
    HEC confirmed R1's request, and R0 was answered OK: lost silently (item 283; the restart rule sees
    only answers). Now after a lost answer the waiting request with ackId 0 is posted again, and the
    sink goes on on a new channel."""
    r0, r1 = make_occurrence(reason="R0"), make_occurrence(reason="R1")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        hec_sink({"send_timeout": 2.4}, url=hec.url, timeout=0.5) as sink,
    ):
        held = await sink.send([r0])
        assert held is not None and held[0].held, held
        hec.restart()
        hec.hold_acks = False
        hec.lose_answers(1)
        lost = await sink.send([r1])
        assert lost is not None and lost[0].kind is OutcomeKind.RETRY and "cannot reach" in lost[0].reason
        assert [e["event"]["reason"] for e in hec.events] == ["R1"] and hec.lost[0]["event"]["reason"] == "R0"
        again = await sink.send([r0, r1])
        assert again is not None
        indexed = [e["event"]["reason"] for e in hec.events]
        for occ, outcome in zip((r0, r1), again, strict=True):
            assert outcome is not OK or occ.record["reason"] in indexed, (outcome, indexed)
        assert all(o is OK for o in again), again
    assert indexed == ["R1", "R0", "R1"]  # R1 twice: its answer was lost (at least once)
    # R0, voided, went again on a channel of its own (item 325), new requests on the sink's new one.
    assert len(hec.channels) == 3 and hec.channels[-1] == sink.channel


async def test_the_fake_stores_a_request_whose_answer_it_loses() -> None:
    """``lose_answers(n)``: the request is stored and numbered as usual, and the client gets no answer."""
    channel = str(uuid.uuid4())
    headers = {"Authorization": f"Splunk {TOKEN}", "X-Splunk-Request-Channel": channel}
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        aiohttp.ClientSession(hec.url) as http,
    ):
        hec.lose_answers(1)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.post(EVENT_PATH, data=b'{"event": "a"}', headers=headers):
                pass
        async with http.post(EVENT_PATH, data=b'{"event": "b"}', headers=headers) as r:
            assert (await r.json())["ackId"] == 1
        async with http.post(ACK_PATH, data=b'{"acks": [0, 1]}', headers=headers) as r:
            assert await r.json() == {"acks": {"0": True, "1": True}}
    assert [e["event"] for e in hec.events] == ["a", "b"]


async def test_acknowledgement_turned_off_after_hec_received_the_events_counts_them_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The token's indexer acknowledgement is turned off while events wait for it: HEC answers the query
    400 code 14 "ACK is disabled". They were held until ack_timeout and posted again; HEC took them and
    nothing more can be known, so they are OK now, with a WARNING."""
    caplog.set_level(logging.WARNING, LOG.name)
    batch = [make_occurrence(reason=f"R{i}") for i in range(2)]
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        hec_sink({"send_timeout": 2.4}, url=hec.url, timeout=0.5) as sink,
    ):
        held = await sink.send(batch)
        assert held is not None and all(o.held for o in held), held
        hec.ack_tokens.clear()
        again = await sink.send(batch)
    assert again is not None and all(o is OK for o in again), again
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1"]
    assert any("ACK is disabled" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_acknowledgement_turned_off_with_events_waiting_on_two_channels_is_checked_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Events wait on two channels (an answer was lost in between) when the token's acknowledgement is
    turned off. Each channel's "ACK is disabled" sent one more empty POST and logged the same WARNING
    (r308 F2); learnt on the first, the others' events are confirmed without asking."""
    caplog.set_level(logging.WARNING, LOG.name)
    r0, r1, r2, r3 = (make_occurrence(reason=f"R{i}") for i in range(4))
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        hec_sink({"send_timeout": 3}, url=hec.url, timeout=0.5, ack_timeout=30) as sink,
    ):
        for occ in (r0, r1):  # ackIds 0, 1 of the first channel
            held = await sink.send([occ])
            assert held is not None and held[0].held, held
        hec.lose_answers(1)  # R2's: a new channel (R0, ackId 0 there, is to be sent again)
        lost = await sink.send([r2])
        assert lost is not None and lost[0].kind is OutcomeKind.RETRY, lost
        held = await sink.send([r3])
        assert held is not None and held[0].held, held
        assert len(hec.channels) == 2
        hec.ack_tokens.clear()
        asked_from = len(hec.statuses)
        answered = await sink.send([r1, r3])
    assert answered is not None and all(o is OK for o in answered), answered
    assert hec.statuses[asked_from:] == [400], hec.statuses  # one empty POST: "No data"
    said = [r.getMessage() for r in caplog.records if "turned off" in r.getMessage()]
    assert len(said) == 1, said


# ---- item 288: an acknowledgement route that confirms nothing; the engine's memory for waiting events --


@asynccontextmanager
async def header_dropping_route(hec: FakeHEC, dropped: str) -> AsyncIterator[str]:
    """A route to ``hec`` that passes every path on but drops the ``dropped`` request header. Yields its
    base URL."""
    async with aiohttp.ClientSession() as http:

        async def forward(request: web.Request) -> web.Response:
            return await relay(http, hec.url + request.path, request, dropped)

        async with serve(forward) as base:
            yield base


@pytest.mark.parametrize(
    ("reached", "meaning"),
    [
        ("event-endpoint", "answered as HEC's event endpoint does"),
        ("drops-Authorization", "refused the token"),
        ("drops-X-Splunk-Request-Channel", "did not get the sink's channel"),
        ("another-hec", "refused the token"),
    ],
)
async def test_an_ack_url_that_can_confirm_nothing_fails_start_naming_what_it_reached(
    reached: str, meaning: str
) -> None:
    """ack_url reaching HEC's event endpoint (400 code 12), a route dropping the token (401 code 2) or
    the channel (400 code 10), or a HEC that does not know the token (403 code 4): start() and check()
    passed, as any JSON with a code did, and every event was held ack_timeout and posted again, for
    ever (item 288). Now only HEC's acknowledgement answers pass; each of these fails naming the
    address, ack_url and what the answer means, never the token."""
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        FakeHEC(tokens={OTHER_TOKEN}, ack_tokens={OTHER_TOKEN}) as other,
        header_dropping_route(hec, reached.removeprefix("drops-")) as route,
    ):
        ack_url = {
            "event-endpoint": hec.url + EVENT_PATH,
            "another-hec": other.url + ACK_PATH,
        }.get(reached, route + ACK_PATH)
        options = {"url": hec.url, "token": TOKEN, "ack_url": ack_url}
        sink = SplunkHECSink(SplunkHECOptions.model_validate(options), context())
        try:
            for attempt in (sink.start, sink.check):
                with pytest.raises(SinkError) as err:
                    await attempt()
                message = str(err.value)
                assert f"{ack_url} (ack_url) {meaning}" in message and "correct ack_url" in message, message
                assert TOKEN not in message
        finally:
            await sink.aclose()
    assert hec.events == []


async def test_an_ack_route_sent_to_the_event_endpoint_after_start_is_reported_once_and_nothing_is_posted_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway's acknowledgement route is pointed at HEC's event endpoint after start(): each query
    got 400 code 12, taken for HEC's answer; the events were held ack_timeout and posted again, for
    ever, with no ERROR (item 288). Now one ERROR names the address and what it reached; the events
    are retried as a failure, asked about, never posted again (also past ack_timeout); nothing new
    is posted; once the route is back each is confirmed, indexed once."""
    caplog.set_level(logging.INFO, LOG.name)
    batch = [make_occurrence(reason=f"R{i}") for i in range(2)]
    late = make_occurrence(reason="LATE")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        gateway(hec, routes := {"/hec": EVENT_PATH, "/hec/ack": ACK_PATH}) as gw,
        hec_sink(
            {"send_timeout": 2.4}, url=f"{gw}/hec", ack_url=f"{gw}/hec/ack", timeout=0.5, ack_timeout=0.3
        ) as sink,
    ):
        routes["/hec/ack"] = EVENT_PATH
        t0 = time.monotonic()
        outcomes = list(await sink.send(batch) or [])
        await until(lambda: time.monotonic() > t0 + 0.3)  # past ack_timeout
        outcomes += await sink.send(batch) or []  # the engine's retries
        outcomes += await sink.send([late]) or []
        for outcome in outcomes:
            assert outcome.kind is OutcomeKind.RETRY and not outcome.held and not outcome.defer, outcome
            assert f"{gw}/hec/ack (ack_url)" in outcome.reason, outcome.reason
        assert "answered as HEC's event endpoint does" in outcomes[0].reason
        assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1"]  # once, and LATE not at all

        routes["/hec/ack"] = ACK_PATH
        again = await sink.send([*batch, late])
    assert again is not None and all(o is OK for o in again), again
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1", "LATE"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and TOKEN not in errors[0], errors
    assert "answered as HEC's event endpoint does" in errors[0] and f"{gw}/hec/ack" in errors[0]


class RecordedHECSink(SplunkHECSink):
    """The sink, noting what the engine gave up (dropped or dead-lettered), in order."""

    def __init__(self, options: SplunkHECOptions, context: SinkContext) -> None:
        super().__init__(options, context)
        self.gave_up: list[str] = []

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        self.gave_up.extend(o.record["reason"] for o in occurrences)
        super().given_up(occurrences)


async def test_events_waiting_for_confirmation_fit_the_engines_memory_and_a_larger_bound_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The events waiting for HEC's confirmation, and those confirmed until offered again, are set aside
    in the engine's memory, which without a spool keeps at most half of queue_max_events so and drops
    the oldest over it. ack_max_waiting (10,000) was the whole default queue: the engine dropped
    waiting events, received and indexed by Splunk, counted queue_full, and the sink posted more in
    their place (scaled, bound = queue = 40: 300 of 360 dropped had been received; item 288). The
    default is now a quarter of the default queue, start() names a larger one, and at that relation
    (scaled: queue 40, bound 10, 40 events/s, HEC confirming after 1.5 s) only events never posted are
    dropped, and every event HEC received is delivered."""
    caplog.set_level(logging.WARNING, LOG.name)
    default = SplunkHECOptions.model_fields["ack_max_waiting"].default
    assert 4 * default <= PipelineOptions.model_validate({}).queue_bound(spooled=False)
    async with FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, index_delay=1.5) as hec:
        async with hec_sink(url=hec.url, ack_max_waiting=default + 1):
            pass
        named = [
            r.getMessage() for r in caplog.records if "set queue_max_events to at least" in r.getMessage()
        ]
        assert len(named) == 1 and f"ack_max_waiting={default + 1}" in named[0], named

        metrics = Metrics()
        options = {"url": hec.url, "token": TOKEN, "timeout": 0.5, "ack_max_waiting": 40 // 4}
        sink = RecordedHECSink(SplunkHECOptions.model_validate(options), context(send_timeout=3.0))
        pipeline = pipeline_for(
            "splunk_hec",
            sink,
            metrics,
            tmp_path / "dl",
            send_timeout=3.0,
            queue_max_events=40,
            batch_max_events=10,
            retry_initial_backoff=0.1,
            retry_max_backoff=0.5,
        )
        delivered = metrics.delivered.labels("splunk_hec")
        dropped = metrics.dropped.labels("splunk_hec", "queue_full")
        offered = 0
        async with drained(pipeline, timeout=60):
            for _ in range(12):  # 10 events each 0.25 s: faster than HEC confirms, the queue overflows
                for _ in range(10):
                    pipeline.offer(make_occurrence(reason=f"R{offered}"))
                    offered += 1
                await asyncio.sleep(0.25)
            await until(lambda: delivered._value.get() + dropped._value.get() >= offered, timeout=60)
    received = {e["event"]["reason"] for e in hec.events}
    assert dropped._value.get() > 0 and len(sink.gave_up) == dropped._value.get()
    assert not received & set(sink.gave_up)  # only events never posted were dropped
    assert delivered._value.get() == len(received) == len(hec.events)  # each received once, delivered


# ---- answers whose body cannot be read, a front's page, the waiting bound (item 298) ----------------

HOWS: list[Unreadable] = ["stall", "cut", "gzip"]
BODY_TIMEOUT = 3
"""The sink's request timeout in these tests: an error body only quoted is waited for 2 s of it, a
2xx's or a 400's (they decide) all of it."""
PAGE = 64 << 20
"""Bytes of a front's page: far more than the kernel buffers of a loopback connection hold."""
REFUSED = {"text": "Invalid data format", "code": 6, "invalid-event-number": 0}


async def test_the_fake_sends_answers_a_client_cannot_read_as_a_front_may() -> None:
    """``fail_next(unreadable=)``, ``unreadable_next`` (also for acknowledgement queries) and
    ``late_next``: the status line and headers come, the body cannot be read (or comes late); HEC's own
    answer behind it is unchanged (the events stored, the ackId numbered)."""
    channel = str(uuid.uuid4())
    headers = {"Authorization": f"Splunk {TOKEN}", "X-Splunk-Request-Channel": channel}
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        aiohttp.ClientSession(hec.url, timeout=aiohttp.ClientTimeout(total=BODY_TIMEOUT)) as http,
    ):
        hec.fail_next(1, 400, REFUSED, unreadable="cut")
        hec.unreadable_next(1, "gzip")
        hec.unreadable_next(1, "stall", ack=True)
        hec.late_next(1, 0.2)
        for body in (b'{"event": "a"}', b'{"event": "b"}'):
            async with http.post(EVENT_PATH, data=body, headers=headers) as r:
                status = r.status
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
            assert status == (400 if body.endswith(b'"a"}') else 200)
        async with http.post(ACK_PATH, data=b'{"acks": [0]}', headers=headers) as r:
            assert r.status == 200
            with pytest.raises(TimeoutError):
                await r.read()
        async with http.post(EVENT_PATH, data=b'{"event": "c"}', headers=headers) as r:
            assert (r.status, await r.json()) == (200, {"text": "Success", "code": 0, "ackId": 1})
    assert [e["event"] for e in hec.events] == ["b", "c"]


@pytest.mark.parametrize("how", HOWS)
async def test_a_refusal_whose_body_cannot_be_read_is_sent_one_by_one_down_to_the_event_refused(
    hec: FakeHEC, how: Unreadable
) -> None:
    """HEC refuses R0 (400 code 6) and its answer's body cannot be read: its status line came, so the
    status decides. The events are sent again one per request: R0 alone is rejected, R1 indexed.
    Before item 298, it was "cannot reach", and the batch was retried for ever at the default
    retry_max_attempts=0 (item 298 halved the batch; item 305 sends one by one)."""
    batch = [make_occurrence(reason=f"R{i}") for i in range(2)]
    async with hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink:
        hec.fail_next(2, 400, REFUSED, unreadable=how)
        outcomes = await sink.send(batch)
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.REJECT, OutcomeKind.OK]
    assert outcomes[0].reason.startswith("HEC 400 (its body unreadable: "), outcomes[0].reason
    assert [e["event"]["reason"] for e in hec.events] == ["R1"]


@pytest.mark.parametrize("how", HOWS)
async def test_a_batch_answered_413_with_an_unreadable_body_is_halved(hec: FakeHEC, how: Unreadable) -> None:
    """A 413 says the body is too large whatever its own body: sent in halves. Before, "cannot reach",
    never halved: the batch retried as large for ever."""
    batch = [make_occurrence(reason=f"R{i}") for i in range(4)]
    async with hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink:
        hec.fail_next(1, 413, {"text": "Content-Length too large"}, unreadable=how)
        outcomes = await sink.send(batch)
    assert outcomes is not None and all(o is OK for o in outcomes), outcomes
    assert hec.statuses[-3:] == [413, 200, 200]
    assert sorted(e["event"]["reason"] for e in hec.events) == [f"R{i}" for i in range(4)]


@pytest.mark.parametrize("status", [429])
@pytest.mark.parametrize("how", HOWS)
async def test_retry_after_is_honoured_and_the_channel_kept_when_the_body_cannot_be_read(
    status: int, how: Unreadable
) -> None:
    """A busy answer whose body cannot be read keeps its Retry-After, and, a status having come, is no
    lost answer: the channel is kept and the request waiting with ackId 0 is not posted again. Before,
    "cannot reach": Retry-After lost, the sink moved to a new channel and R0 was indexed twice. A
    stalled body only quoted is waited for 2 s. (A 5xx whose body cannot be read may be a front's after
    HEC took the request: a lost answer since session 36, tests/test_front_s36.py.)"""
    r0, r1 = make_occurrence(reason="R0"), make_occurrence(reason="R1")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        hec_sink({"send_timeout": 2.4}, url=hec.url, timeout=BODY_TIMEOUT) as sink,
    ):
        held = await sink.send([r0])
        assert held is not None and held[0].held, held
        channel = sink.channel
        hec.fail_next(1, status, retry_after="120", unreadable=how)
        busy = await sink.send([r1])
        assert busy is not None and busy[0].kind is OutcomeKind.RETRY and busy[0].retry_after == 120
        assert busy[0].reason.startswith(f"HEC {status} (its body unreadable: "), busy[0].reason
        assert how != "stall" or "none of it within 2s" in busy[0].reason
        assert sink.channel == channel
        hec.hold_acks = False
        hec.release_acks()
        again = await sink.send([r0, r1])
    assert again is not None and all(o is OK for o in again), again
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1"]  # each once


@pytest.mark.parametrize("how", HOWS)
async def test_a_2xx_whose_body_cannot_be_read_is_final_when_the_token_has_no_indexer_acknowledgement(
    hec: FakeHEC, how: Unreadable, caplog: pytest.LogCaptureFixture
) -> None:
    """A token without indexer acknowledgement (start() learns it): HEC's 2xx is its whole answer,
    there is no ackId to learn. Its body unreadable (a front garbling every answer), the events are
    delivered, indexed once, one WARNING naming the front. Before (item 298), each was posted again
    "may be indexed twice": behind a lasting fault, posted for ever, one more copy each attempt, never
    delivered (r298 F1)."""
    caplog.set_level(logging.WARNING, LOG.name)
    batch = [make_occurrence(reason=f"R{i}") for i in range(3)]
    async with hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink:
        hec.unreadable_next(2, how)
        outcomes = [await sink.send([occ]) for occ in batch]  # R0, R1 unreadable; R2 read
    assert all(o is not None and o[0] is OK for o in outcomes), outcomes
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R1", "R2"]  # each once
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert "answer could not be read (" in said[0] and "acknowledgement off" in said[0]
    assert "count as delivered" in said[0] and "garbles its answers" in said[0]


@pytest.mark.parametrize("how", HOWS)
async def test_an_unreadable_2xx_with_indexer_acknowledgement_is_sent_again_and_a_lasting_fault_is_an_error(
    how: Unreadable, caplog: pytest.LogCaptureFixture
) -> None:
    """With indexer acknowledgement on, an unreadable 2xx hides the ackId: sent again, saying it may
    be indexed twice (item 298, kept). Two in a row are an ERROR saying each attempt indexes one more
    copy and to fix the front: before, only the WARNING "may be indexed twice" at each attempt, though
    a lasting fault indexes a copy per attempt and delivers none (r298 F1)."""
    caplog.set_level(logging.WARNING, LOG.name)
    occ = make_occurrence(reason="R0")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink,
    ):
        hec.unreadable_next(2, how)
        first = await sink.send([occ])
        second = await sink.send([occ])
        third = await sink.send([occ])
    for outcome in (first, second):
        assert outcome is not None and outcome[0].kind is OutcomeKind.RETRY, outcome
        assert outcome[0].reason.startswith("HEC answered HTTP 200 but its answer could not be read (")
        assert "sent again, so the events may be indexed twice" in outcome[0].reason
    assert third is not None and third[0] is OK, third
    assert [e["event"]["reason"] for e in hec.events] == ["R0"] * 3  # one copy per attempt
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "two answers of HEC in a row could not be read" in errors[0], errors
    assert "Splunk indexes one more copy" in errors[0] and "fix what is in front of HEC" in errors[0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("may be indexed twice" in m for m in warned) == 2, warned


def splunk_like(**settings: Any) -> FakeHEC:
    """A FakeHEC that keeps the events before the one it refuses, as Splunk does, and refuses the events
    whose reason is BAD (400 code 6)."""
    return FakeHEC(
        tokens={TOKEN},
        keep_before_refused=True,
        refuse=lambda event: event["event"]["reason"] == "BAD",
        **settings,
    )


async def test_the_fake_keeps_the_events_before_the_one_it_refuses_when_asked_as_splunk_does() -> None:
    """``refuse`` has the fake refuse an event as malformed; by default it stores none of that request,
    with ``keep_before_refused`` those before the refused one, as Splunk does. ``unreadable_next(...,
    status=400)`` garbles only 400s: a 200 passes readable and uncounted."""
    body = b'{"event": {"reason": "A"}}{"event": {"reason": "BAD"}}{"event": {"reason": "C"}}'
    refused = {"text": "Invalid data format", "code": 6, "invalid-event-number": 1}
    headers = {"Authorization": f"Splunk {TOKEN}"}
    kept: dict[bool, list[str]] = {}
    for keep in (False, True):
        async with (
            FakeHEC(
                tokens={TOKEN}, keep_before_refused=keep, refuse=lambda e: e["event"]["reason"] == "BAD"
            ) as hec,
            aiohttp.ClientSession(hec.url) as http,
        ):
            hec.unreadable_next(1, "gzip", status=400)
            async with http.post(EVENT_PATH, data=b'{"event": {"reason": "OK"}}', headers=headers) as r:
                assert (r.status, await r.json()) == (200, {"text": "Success", "code": 0})
            async with http.post(EVENT_PATH, data=body, headers=headers) as r:
                assert r.status == 400
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
            async with http.post(EVENT_PATH, data=body, headers=headers) as r:
                assert (r.status, await r.json()) == (400, refused)
            kept[keep] = [e["event"]["reason"] for e in hec.events]
    assert kept == {False: ["OK"], True: ["OK", "A", "A"]}


@pytest.mark.parametrize("how", HOWS)
async def test_a_refusal_whose_body_cannot_be_read_sends_the_events_one_by_one_each_indexed_twice_at_most(
    how: Unreadable, caplog: pytest.LogCaptureFixture
) -> None:
    """HEC takes R0-R6, refuses BAD (last of 8), and every 400's body cannot be read. Halved level by
    level, each level posted again the events Splunk had just indexed before BAD: R6 four times (ten
    at a batch of 500), silently (r298 F2). Now the events are sent one per request, in order: each
    indexed twice at most, BAD rejected alone, 9 requests, one WARNING saying so."""
    caplog.set_level(logging.WARNING, LOG.name)
    batch = [*(make_occurrence(reason=f"R{i}") for i in range(7)), make_occurrence(reason="BAD")]
    async with splunk_like() as hec, hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink:
        hec.unreadable_next(len(batch), how, status=400)
        before = len(hec.statuses)
        outcomes = await sink.send(batch)
        requests = len(hec.statuses) - before
    assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK] * 7 + [OutcomeKind.REJECT]
    assert outcomes[7].reason.startswith("HEC 400 (its body unreadable: "), outcomes[7].reason
    assert Counter(e["event"]["reason"] for e in hec.events) == {f"R{i}": 2 for i in range(7)}
    assert requests == 9
    said = [r.getMessage() for r in caplog.records if "one per request" in r.getMessage()]
    assert len(said) == 1 and "a request of 8" in said[0] and "may be indexed twice" in said[0], said


async def test_events_that_may_be_indexed_already_stay_one_per_request_in_a_later_send() -> None:
    """The send's budget ends before every event went alone (each request takes 0.3 s): the rest is
    held, and sent again at once. Sent as one request again, HEC would index the events before BAD a
    third time (and a fourth, alone); they stay one per request until HEC takes each: twice at most."""
    batch = [*(make_occurrence(reason=f"R{i}") for i in range(5)), make_occurrence(reason="BAD")]
    outcomes: dict[str, OutcomeKind] = {}
    held = 0
    async with (
        splunk_like(delay=0.3) as hec,
        hec_sink({"send_timeout": 2.4}, url=hec.url, timeout=0.5) as sink,
    ):
        hec.unreadable_next(20, "gzip", status=400)
        todo = batch
        for _ in range(10):  # as the engine does: what is held is sent again at once
            answered = await sink.send(todo)
            assert answered is not None
            held += sum(o.held for o in answered)
            outcomes.update((occ.key, o.kind) for occ, o in zip(todo, answered, strict=True))
            todo = [occ for occ, o in zip(todo, answered, strict=True) if o.kind is OutcomeKind.RETRY]
            if not todo:
                break
    assert held, "the first send was not cut short: the test proves nothing"
    assert [outcomes[occ.key] for occ in batch] == [OutcomeKind.OK] * 5 + [OutcomeKind.REJECT]
    assert Counter(e["event"]["reason"] for e in hec.events) == {f"R{i}": 2 for i in range(5)}


async def test_a_huge_error_page_is_read_in_part(hec: FakeHEC) -> None:
    """A proxy's 64 MiB 502 page: retried from its first bytes, the rest never read. Before, read
    whole (with its copies) at every retry: 150 MB took the router from 57 to 357 MB."""
    async with hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink:
        hec.fail_next(1, 502, page=PAGE)
        outcomes = await sink.send([make_occurrence()])
        await until(lambda: len(hec.pages) == 1 and hec.pages[0].done)
        again = await sink.send([make_occurrence()])
    assert hec.pages[0].written < hec.pages[0].size, "the page was read whole"
    assert outcomes is not None and outcomes[0].kind is OutcomeKind.RETRY
    assert outcomes[0].reason.startswith("HEC 502: <!DOCTYPE html>"), outcomes[0].reason
    assert again is not None and again[0] is OK


@pytest.mark.parametrize("how", HOWS)
async def test_an_acknowledgement_answer_that_cannot_be_read_fails_start_saying_so(how: Unreadable) -> None:
    """Start asks the acknowledgement endpoint, whose 200 cannot be read: the token has acknowledgement
    on, and whether the address can confirm events cannot be told: start fails saying so, and is tried
    again. Before, it said the endpoint "cannot be reached", though it had answered."""
    async with FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec:
        hec.unreadable_next(1, how, ack=True)
        sink = SplunkHECSink(
            SplunkHECOptions.model_validate({"url": hec.url, "token": TOKEN, "timeout": BODY_TIMEOUT}),
            context(),
        )
        try:
            with pytest.raises(SinkError) as failed:
                await sink.start()
            await sink.start()  # tried again: it answers now
        finally:
            await sink.aclose()
    assert f"{hec.url}/services/collector/ack answered HTTP 200, its body unreadable (" in str(failed.value)
    assert "whether it can confirm events cannot be told" in str(failed.value)
    assert TOKEN not in str(failed.value)


async def test_bodies_that_decide_are_read_past_two_seconds() -> None:
    """Guards: a 400 naming the event refused and a 200's ackId decide the outcome, and are waited for
    the request's timeout (2.5 s after their head at timeout=5), as before: not the 2 s of a body
    only quoted."""
    batch = [make_occurrence(reason=f"R{i}") for i in range(3)]
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        hec_sink({"send_timeout": 8}, url=hec.url, timeout=5) as sink,
    ):
        hec.fail_next(1, 400, {**REFUSED, "invalid-event-number": 1})
        hec.late_next(2, 2.5)
        refused = await sink.send(batch)
        confirmed = await sink.send([batch[0], batch[2]])
    assert refused is not None and [o.kind for o in refused] == [
        OutcomeKind.RETRY,
        OutcomeKind.REJECT,
        OutcomeKind.RETRY,
    ]
    assert confirmed is not None and all(o is OK for o in confirmed), confirmed
    assert [e["event"]["reason"] for e in hec.events] == ["R0", "R2"]


async def test_ack_max_waiting_is_bounded_by_what_the_engine_keeps_aside_and_said_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through the router: queue_max_events=40 without a spool keeps 20 set aside; ack_max_waiting=40
    (events waiting for HEC's confirmation, set aside) was past it, and the engine dropped waiting
    events HEC had received, counted queue_full (item 288's Left: the sink was not told the queue's
    bound). Now the engine tells it (SinkContext.aside_max_events), the sink keeps at most 10 waiting,
    says so at start naming both options, and only events never posted are dropped. Scaled: 40 events
    a second, HEC confirming 1.5 s after receipt."""
    caplog.set_level(logging.WARNING, "eventrouter.sink.splunk_hec")
    async with FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, index_delay=1.5) as hec:
        options = {
            "url": hec.url,
            "token": TOKEN,
            "timeout": 0.5,
            "ack_max_waiting": 40,
            "send_timeout": 3.0,
            "queue_max_events": 40,
            "batch_max_events": 10,
            "batch_max_wait": 0.01,
            "retry_initial_backoff": 0.1,
            "retry_max_backoff": 0.5,
        }
        spec = spec_for_class(RecordedHECSink, options, type_="splunk_hec")
        router = Router(RouterSettings(metrics_addr=None, shutdown_timeout=1), [spec])
        await router.start_pipelines()
        pipeline = router.pipelines[0]
        sink = pipeline.sink
        assert isinstance(sink, RecordedHECSink) and sink.context.aside_max_events == 20
        delivered = router.metrics.delivered.labels("splunk_hec")
        dropped = router.metrics.dropped.labels("splunk_hec", "queue_full")
        offered = 0
        try:
            await until(lambda: pipeline.started.is_set(), timeout=10)
            for _ in range(12):  # 10 events each 0.25 s: faster than HEC confirms, the queue overflows
                for _ in range(10):
                    pipeline.offer(make_occurrence(reason=f"R{offered}"))
                    offered += 1
                await asyncio.sleep(0.25)
            await until(lambda: delivered._value.get() + dropped._value.get() >= offered, timeout=60)
        finally:
            await router.drain(10)
            await router.stop()
    received = {e["event"]["reason"] for e in hec.events}
    assert dropped._value.get() > 0 and len(sink.gave_up) == dropped._value.get()
    assert not received & set(sink.gave_up)  # only events never posted were dropped
    assert delivered._value.get() == len(received) == len(hec.events)  # each received once, delivered
    said = [r.getMessage() for r in caplog.records if "is bounded to" in r.getMessage()]
    assert len(said) == 1 and "ack_max_waiting=40 is bounded to 10" in said[0], said
    assert "set queue_max_events to at least 160" in said[0]


# ---- item 308: a refusal's ackId, ack state learnt from the event endpoint, bodies that decide nothing -


def is_bad(event: dict[str, Any]) -> bool:
    body = event.get("event")
    return isinstance(body, dict) and body.get("reason") == "BAD"


async def test_the_fake_gives_the_events_before_a_refused_one_an_ackid_as_splunk_does() -> None:
    """With an acknowledged token and ``keep_before_refused``, the 400 refusing event n carries the
    ackId under which the fake took the events before it (Splunk's answers quoted in
    kafka-connect-splunk #200), numbered as a request's and confirmed as one; none when the refused
    event is the first. Before, the prefix was stored with no ackId, and a sink's blindness to it hidden."""
    headers = {"Authorization": f"Splunk {TOKEN}", "X-Splunk-Request-Channel": str(uuid.uuid4())}
    body = b'{"event": {"reason": "A"}}{"event": {"reason": "BAD"}}'
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, keep_before_refused=True, refuse=is_bad) as hec,
        aiohttp.ClientSession(hec.url) as http,
    ):
        async with http.post(EVENT_PATH, data=body, headers=headers) as r:
            assert (r.status, await r.json()) == (
                400,
                {"text": "Invalid data format", "code": 6, "invalid-event-number": 1, "ackId": 0},
            )
        async with http.post(EVENT_PATH, data=body[body.index(b"}}") + 2 :], headers=headers) as r:
            assert (r.status, await r.json()) == (
                400,
                {"text": "Invalid data format", "code": 6, "invalid-event-number": 0},
            )
        async with http.post(EVENT_PATH, data=b'{"event": "c"}', headers=headers) as r:
            assert (await r.json())["ackId"] == 1
        async with http.post(ACK_PATH, data=b'{"acks": [0, 1]}', headers=headers) as r:
            assert await r.json() == {"acks": {"0": True, "1": True}}
    assert [e["event"] for e in hec.events] == [{"reason": "A"}, "c"]


def _front_template(body: dict[str, Any]) -> dict[str, Any]:
    """A front (API gateway, WAF) answering its own 400 body in place of HEC's."""
    return {"message": "Bad Request"}


def _ackid_unstated(body: dict[str, Any]) -> dict[str, Any]:
    """A HEC whose 400 names the refused event but not the ackId it took those before it under."""
    return {k: v for k, v in body.items() if k != "ackId"}


_REWORDS = {"front": _front_template, "unstated": _ackid_unstated}


@pytest.mark.parametrize("how", [None, *HOWS, *_REWORDS])
async def test_a_refusal_carrying_an_ackid_after_a_hec_restart_never_confirms_a_waiting_request_by_another(
    how: str | None,
) -> None:
    """R0 waits under ackId 0; HEC restarts (R0 lost, the channel numbered from 0) and refuses BAD in
    [P0, BAD], taking P0 under ackId 0, which its 400 says. The sink never read it: its next request got
    ackId 1, above the last, so no renumbering was seen, and asked about ackId 0, HEC confirmed P0's
    prefix: R0 answered OK, lost silently (r305 F1); the same with the 400 unreadable (one by one).
    Now a readable 400's ackId counts in the channel's numbering and P0 waits for it (indexed once);
    an unreadable one is a lost answer (a new channel). R0 is sent again: OK only once indexed. So is
    any 400 whose ackId cannot be read: a front's readable body naming no event ("front"), or one
    naming event 1 without the ackId ("unstated"): R0 was answered OK, never indexed (r308 F1/F1b)."""
    r0, p0, bad = (make_occurrence(reason=r) for r in ("R0", "P0", "BAD"))
    final: dict[str, Any] = {}
    async with (
        FakeHEC(
            tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True, keep_before_refused=True, refuse=is_bad
        ) as hec,
        hec_sink({"send_timeout": 2.4}, url=hec.url, timeout=0.5) as sink,
    ):
        held = await sink.send([r0])
        assert held is not None and held[0].held, held
        hec.restart()
        hec.hold_acks = False
        if how in _REWORDS:
            hec.reword_next(1, _REWORDS[how])
        elif how is not None:
            hec.unreadable_next(1, cast(Unreadable, how), status=400)
        todo = [p0, bad]
        for _ in range(5):  # as the engine does: what is retried is offered again, with R0 set aside
            answered = await sink.send(todo)
            assert answered is not None
            indexed = [e["event"]["reason"] for e in hec.events]
            for occ, outcome in zip(todo, answered, strict=True):
                assert outcome is not OK or occ.record["reason"] in indexed, (occ.record["reason"], indexed)
                final[occ.record["reason"]] = outcome.kind
            todo = [r0, *(o for o, a in zip(todo, answered, strict=True) if a.kind is OutcomeKind.RETRY)]
            if final.get("R0") is OutcomeKind.OK:
                break
    assert final == {"R0": OutcomeKind.OK, "P0": OutcomeKind.OK, "BAD": OutcomeKind.REJECT}
    copies = Counter(e["event"]["reason"] for e in hec.events)
    assert copies["R0"] == 1 and [e["event"]["reason"] for e in hec.lost] == ["R0"]
    assert copies["P0"] == (1 if how is None else 2), copies  # readable: it waited for the 400's ackId


async def test_an_ack_url_reaching_another_hec_where_acknowledgement_is_off_fails_start() -> None:
    """``ack_url`` reaches another HEC where the token has indexer acknowledgement off: its "ACK is
    disabled" passed start() as the token's state (r305 F2), and in sends every event HEC received and
    had not indexed counted delivered. The state is now learnt from the event endpoint: it gives
    ackIds, so start() and check() fail naming ack_url, never the token."""
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}) as hec,
        FakeHEC(tokens={TOKEN}) as other,
    ):
        ack_url = other.url + ACK_PATH
        options = {"url": hec.url, "token": TOKEN, "ack_url": ack_url}
        sink = SplunkHECSink(SplunkHECOptions.model_validate(options), context())
        try:
            for attempt in (sink.start, sink.check):
                with pytest.raises(SinkError) as err:
                    await attempt()
                message = str(err.value)
                assert f'{ack_url} (ack_url) answered "ACK is disabled" (HTTP 400, code 14) though' in message
                assert f"{hec.url}{EVENT_PATH} gives the token ackIds" in message, message
                assert "it reaches another HEC" in message and "correct ack_url" in message, message
                assert TOKEN not in message
        finally:
            await sink.aclose()


async def test_ack_is_disabled_from_another_hec_after_start_is_an_ack_fault_and_nothing_counts_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway's acknowledgement route is moved to another HEC (the token's acknowledgement off
    there) after start(): its "ACK is disabled" was taken for the token's acknowledgement turned off,
    R0 (received, not indexed) counted delivered with a WARNING saying so, and lost in HEC's restart
    (r305 F2). Now HEC's event endpoint is asked, still gives ackIds: an ERROR names ack_url, R0 is
    retried, asked again, never OK until indexed."""
    caplog.set_level(logging.INFO, LOG.name)
    r0 = make_occurrence(reason="R0")
    async with (
        FakeHEC(tokens={TOKEN}, ack_tokens={TOKEN}, hold_acks=True) as hec,
        FakeHEC(tokens={TOKEN}) as other,
        gateway(hec, routes := {"/hec": EVENT_PATH, "/hec/ack": ACK_PATH}) as gw,
        hec_sink(
            {"send_timeout": 2.4}, url=f"{gw}/hec", ack_url=f"{gw}/hec/ack", timeout=0.5, ack_timeout=0.3
        ) as sink,
    ):
        routes["/hec/ack"] = other.url + ACK_PATH
        outcomes = [await sink.send([r0]), await sink.send([r0])]
        hec.restart()  # R0 received, never indexed: lost
        hec.hold_acks = False
        outcomes.append(await sink.send([r0]))
        for outcome in outcomes:
            assert outcome is not None and outcome[0].kind is OutcomeKind.RETRY and not outcome[0].held, (
                outcome
            )
            assert f"{gw}/hec/ack (ack_url)" in outcome[0].reason, outcome[0].reason
        routes["/hec/ack"] = ACK_PATH
        t0, delivered = time.monotonic(), False
        for _ in range(10):  # held while HEC says ackId 0 is not indexed; past ack_timeout sent again
            again = await sink.send([r0])
            assert again is not None and (again[0] is not OK or hec.events), again
            if delivered := again[0] is OK:
                break
            await until(lambda: time.monotonic() > t0 + 0.3)
    assert delivered and [e["event"]["reason"] for e in hec.events] == ["R0"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f'{gw}/hec/ack (ack_url) answered "ACK is disabled"' in errors[0], errors
    assert "it reaches another HEC" in errors[0] and TOKEN not in errors[0]
    assert not any("turned off" in r.getMessage() for r in caplog.records)


async def test_a_2xx_body_without_acknowledgement_is_waited_only_as_long_as_a_quoted_one(
    hec: FakeHEC, caplog: pytest.LogCaptureFixture
) -> None:
    """With the token's indexer acknowledgement off a 2xx's body holds no ackId and decides nothing
    (item 305), yet one that stalled was waited the request's whole ``timeout``: a front stalling every
    2xx body cost a request per ``timeout`` (r305 F3). Now it gets the 2 s a quoted body gets: the
    WARNING says none of it came within 2 s, not that the request's timeout ran out."""
    caplog.set_level(logging.WARNING, LOG.name)
    async with hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink:
        hec.unreadable_next(1, "stall")
        outcomes = await sink.send([make_occurrence(reason="R0")])
    assert outcomes is not None and outcomes[0] is OK
    said = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(said) == 1 and "(none of it within 2s)" in said[0], said
    assert [e["event"]["reason"] for e in hec.events] == ["R0"]


async def test_a_readable_400_naming_no_event_sends_the_events_one_by_one_and_quotes_the_answer(
    hec: FakeHEC, caplog: pytest.LogCaptureFixture
) -> None:
    """A 400 whose body names no event (a front's JSON): the whole batch was dead-lettered with the
    empty reason "HEC 400: ", while the same answer unreadable sent the events one by one (r305 F4).
    Splunk names the event it refuses (``invalid-event-number``); an answer that names none does not
    tell which, so now it is judged as the unreadable one: one per request, each indexed once here;
    an event refused alone is rejected with the answer quoted."""
    caplog.set_level(logging.WARNING, LOG.name)
    batch = [make_occurrence(reason=f"R{i}") for i in range(5)]
    async with hec_sink(url=hec.url, timeout=BODY_TIMEOUT) as sink:
        hec.fail_next(1, 400, {"message": "Request blocked by policy"})
        before = len(hec.statuses)
        outcomes = await sink.send(batch)
        requests = len(hec.statuses) - before
        hec.fail_next(1, 400, {"message": "Request blocked by policy"})
        alone = await sink.send([make_occurrence(reason="ALONE")])
    assert outcomes is not None and all(o is OK for o in outcomes), outcomes
    assert [e["event"]["reason"] for e in hec.events] == [f"R{i}" for i in range(5)] and requests == 6
    said = [r.getMessage() for r in caplog.records if "one per request" in r.getMessage()]
    assert len(said) == 1 and "a request of 5 and its answer named none (HEC 400: {" in said[0], said
    assert alone is not None and alone[0].kind is OutcomeKind.REJECT, alone
    assert alone[0].reason == 'HEC 400: {"message": "Request blocked by policy"}', alone[0].reason
